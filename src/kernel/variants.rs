//! Kernel variants: an explicit, enumerable key per compiled pipeline, with the rules that pick
//! the compile-time sizes (rows per invocation, keys per tile) for a head size and an adapter.

use super::abi::{Family, PosKind};
use super::source::{self, ComposeError};

/// Query rows per workgroup of the fused kernel (one per invocation).
pub const BLOCK_Q: u32 = 64;
/// Query rows per invocation the fused kernel can be built with.
pub const ROWS_CHOICES: &[u32] = &[1, 2, 4, 8];

/// Whether an adapter runs several query rows per invocation: CPU adapters do (each K/V read
/// from workgroup memory is a lane-by-lane gather there, so it should feed several rows); GPUs
/// do not (registers are the limit there), nor does GL, whose software driver compiles the larger
/// kernel very slowly.
pub fn multi_row_device(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu && info.backend != wgpu::Backend::Gl
}

/// Rows per invocation on a multi-row adapter: the most (up to 8) whose queries and accumulators
/// stay within 2 × 512 floats per invocation, since LLVM's compile time grows steeply past that
/// (8 at head_dim ≤ 64, 4 up to 128, 2 above).
pub fn multi_rows_for(head_dim: u32) -> u32 {
    let mut rows = 8;
    while rows > 1 && rows * head_dim > 512 {
        rows /= 2;
    }
    rows
}

/// Rows per invocation of the two-branch variant given the one-branch count: half (it holds two
/// rotated copies of each query row).
pub fn two_branch_rows(rows: u32) -> u32 {
    (rows / 2).max(1)
}

/// Workgroup memory the fused kernel may use: WebGPU's default limit.
pub const WORKGROUP_BYTES: u32 = 16384;

/// Keys per tile for a head size: the largest power of two ≤ 64 whose K and V tiles (and the
/// second K tile of a two-branch kernel) fit in WebGPU's default 16 KiB of workgroup memory.
pub fn block_k_for(head_dim: u32, two_branch: bool) -> u32 {
    let tiles = if two_branch { 3 } else { 2 };
    let mut bk = 64;
    while bk > 4 && tiles * bk * head_dim * 4 > WORKGROUP_BYTES {
        bk /= 2;
    }
    bk
}

/// Workgroup bytes of a fused variant.
pub fn workgroup_bytes(key: &KernelKey) -> u32 {
    let tiles = if key.two_branch { 3 } else { 2 };
    tiles * key.block_k * key.head_dim * 4
}

/// Which kernel of which family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The fused attention kernel.
    Fused,
    /// Unfused baseline: RoPE written to memory.
    RopeApply,
    /// Unfused baseline: the score matrix.
    Scores,
    /// Unfused baseline: row softmax.
    Softmax,
    /// Unfused baseline: P·V.
    Pv,
}

/// One compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub stage: Stage,
    pub head_dim: u32,
    pub block_q: u32,
    pub block_k: u32,
    /// Query rows per invocation of the fused kernel.
    pub rows: u32,
    pub pos: PosKind,
    pub interleaved: bool,
    /// Two RoPE scores per key (ReRoPE, LM-Infinite, StreamingLLM cache-index positions).
    pub two_branch: bool,
    /// A custom scheme's id (`CheckedScheme::id`, a hash of its composed hooks), 0 for none.
    /// Its WGSL comes with it: [`KernelKey::try_wgsl_with`].
    pub custom: u64,
}

impl KernelKey {
    pub fn fused(head_dim: u32, rows: u32, pos: PosKind, interleaved: bool) -> Self {
        KernelKey {
            stage: Stage::Fused,
            head_dim,
            block_q: BLOCK_Q,
            block_k: block_k_for(head_dim, false),
            rows,
            pos,
            interleaved,
            two_branch: false,
            custom: 0,
        }
    }

    /// The variant of a custom scheme whose checked hooks have id `custom`.
    pub fn fused_custom(head_dim: u32, rows: u32, custom: u64, interleaved: bool) -> Self {
        KernelKey {
            custom,
            ..KernelKey::fused(head_dim, rows, PosKind::Custom, interleaved)
        }
    }

    /// The two-branch RoPE variant.
    pub fn fused_two_branch(head_dim: u32, rows: u32, interleaved: bool) -> Self {
        KernelKey {
            block_k: block_k_for(head_dim, true),
            two_branch: true,
            ..KernelKey::fused(head_dim, rows, PosKind::Rope, interleaved)
        }
    }

    pub fn unfused(stage: Stage, head_dim: u32, pos: PosKind, interleaved: bool) -> Self {
        KernelKey {
            stage,
            head_dim,
            block_q: 0,
            block_k: 0,
            rows: 1,
            pos,
            interleaved,
            two_branch: false,
            custom: 0,
        }
    }

    /// Every fused variant the crate builds by default (one row per invocation, and the
    /// multi-row count for the head size).
    pub fn all_fused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        // Listed once each: at the largest head sizes the two-branch row counts coincide.
        let mut add = |k: KernelKey| {
            if !keys.contains(&k) {
                keys.push(k);
            }
        };
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for pos in PosKind::ALL {
                for interleaved in [false, true] {
                    if interleaved && !pos.rotates() {
                        continue;
                    }
                    add(KernelKey::fused(d, 1, pos, interleaved));
                    add(KernelKey::fused(d, multi_rows_for(d), pos, interleaved));
                    if pos == PosKind::Rope {
                        add(KernelKey::fused_two_branch(d, 1, interleaved));
                        add(KernelKey::fused_two_branch(
                            d,
                            two_branch_rows(multi_rows_for(d)),
                            interleaved,
                        ));
                    }
                }
            }
        }
        keys
    }

    /// Every unfused-baseline variant the crate can build.
    pub fn all_unfused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for stage in [Stage::RopeApply, Stage::Scores, Stage::Softmax, Stage::Pv] {
                for (pos, il) in [
                    (PosKind::None, false),
                    (PosKind::Rope, false),
                    (PosKind::Rope, true),
                ] {
                    keys.push(KernelKey::unfused(stage, d, pos, il));
                }
            }
        }
        keys
    }

    /// A name that spells the configuration, e.g. `attention_fused_d64_bq64_bk32_rope_half`.
    pub fn name(&self) -> String {
        let pos = self.pos.name();
        let layout = if self.interleaved { "_interleaved" } else { "" };
        let branch = if self.two_branch { "_2branch" } else { "" };
        let pos = if self.custom != 0 {
            format!("{pos}{:016x}", self.custom)
        } else {
            pos.to_string()
        };
        match self.stage {
            Stage::Fused => format!(
                "attention_fused_d{}_bq{}_bk{}_r{}_{pos}{layout}{branch}",
                self.head_dim, self.block_q, self.block_k, self.rows
            ),
            _ => format!(
                "unfused_{}_d{}_{pos}{layout}",
                self.entry_point(),
                self.head_dim
            ),
        }
    }

    /// The kernel family, which fixes the bindings.
    pub fn family(&self) -> Family {
        match self.stage {
            Stage::Fused => Family::Fused,
            _ => Family::Unfused,
        }
    }

    pub fn entry_point(&self) -> &'static str {
        match self.stage {
            Stage::Fused => "attention_fused",
            Stage::RopeApply => "rope_apply",
            Stage::Scores => "scores",
            Stage::Softmax => "softmax_rows",
            Stage::Pv => "pv",
        }
    }

    /// The variant's constants, prepended to the family source.
    pub fn wgsl_header(&self) -> String {
        format!(
            "// variant {}\nconst HEAD_DIM: u32 = {}u;\nconst BLOCK_Q: u32 = {}u;\n\
             const BLOCK_K: u32 = {}u;\nconst ROWS: u32 = {}u;\nconst POS_KIND: u32 = {}u;\n\
             const ROPE_INTERLEAVED: bool = {};\nconst TWO_BRANCH: bool = {};\nconst K_TILES: u32 = {}u;\n",
            self.name(),
            self.head_dim,
            self.block_q.max(1),
            self.block_k.max(1),
            self.rows.max(1),
            self.pos as u32,
            self.interleaved,
            self.two_branch,
            self.k_tiles()
        )
    }

    /// Bounds the composer may unroll loops over.
    pub(crate) fn unroll_bounds(&self) -> [(&'static str, u32); 4] {
        [
            ("HEAD_VEC", self.head_dim / 4),
            ("BLOCK_K", self.block_k.max(1)),
            ("ROWS", self.rows.max(1)),
            ("K_TILES", self.k_tiles()),
        ]
    }

    /// RoPE branches, each with its own K tile: 2 for the two-branch variant, else 1.
    pub fn k_tiles(&self) -> u32 {
        if self.two_branch { 2 } else { 1 }
    }

    /// The whole WGSL module of this variant, or why it could not be composed.
    pub fn try_wgsl(&self) -> Result<String, ComposeError> {
        source::compose(self, None)
    }

    /// The whole WGSL module of a custom scheme's variant, given its hooks
    /// (`CheckedScheme::hooks_wgsl`); the same as [`KernelKey::try_wgsl`] for other variants.
    pub fn try_wgsl_with(&self, hooks: Option<&str>) -> Result<String, ComposeError> {
        source::compose(self, hooks)
    }

    /// The whole WGSL module of this variant: the generated contract, the variant constants and
    /// the family's source with every marked loop unrolled.
    ///
    /// # Panics
    /// If the crate's own shader sources do not compose, which tests/shaders.rs rules out for
    /// every variant; [`KernelKey::try_wgsl`] returns the error instead.
    pub fn wgsl(&self) -> String {
        self.try_wgsl()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }
}
