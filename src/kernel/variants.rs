//! Kernel variants: an explicit, enumerable key per compiled pipeline, with the rules that pick
//! the compile-time sizes (rows per invocation, keys per tile) for a head size and an adapter.

use super::abi::{Binding, Family, LSE_BINDING, PosKind};
use super::source::{self, ComposeError};
use super::storage::{StorageForm, family_tensors};

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

/// Packed half storage listed among the default variants: all packed f16, all bf16, and a mix
/// (bf16 Q and V, packed f16 K and O) that runs both unpackings and the f16 store in one kernel.
pub const PORTABLE_STORAGE_EXAMPLES: [[StorageForm; 4]; 3] = {
    use StorageForm::{Bf16, F16Packed};
    [
        [F16Packed; 4],
        [Bf16; 4],
        [Bf16, F16Packed, Bf16, F16Packed],
    ]
};

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
    /// The decode kernel: few query rows per sequence against a KV cache.
    Decode,
    /// The decode kernel's split-KV reduce (merges partial outputs by their log-sum-exp).
    DecodeReduce,
}

/// Invocations per decode workgroup.
pub const DECODE_WG: u32 = 64;
/// Query rows of a decode workgroup, in units of 64 / head_vec4s: the staged queries take 4 KiB.
pub const DECODE_OWN: u32 = 4;

/// Keys per decode tile: at most 16, and at most an 8 KiB tile of rotated keys (16 keys up to
/// head_dim 128, 12 at 160, 8 at 192 and 256), so that the tile, the staged queries and the
/// per-row scores fit WebGPU's default 16 KiB of workgroup memory.
pub fn decode_block_k(head_dim: u32) -> u32 {
    ((2048 / head_dim).min(16) / 4 * 4).max(4)
}

/// Workgroup bytes of the decode kernel: the staged queries, the key tile, the scores and
/// weights of each row, and the per-row and per-key words.
pub fn decode_workgroup_bytes(head_dim: u32) -> u32 {
    let (bk, r) = (decode_block_k(head_dim), decode_rows(head_dim));
    4 * (r * head_dim + bk * head_dim + 2 * r * bk + 5 * r + 2 * bk + 2)
}

/// Query rows (query heads × new queries of one KV group) one decode workgroup serves (the
/// decode key's `rows`): 8 at head_dim 128, 16 at 64, 32 at 32; each invocation accumulates one
/// output vec4 of every row.
pub fn decode_rows(head_dim: u32) -> u32 {
    DECODE_WG * DECODE_OWN / (head_dim / 4)
}

/// One compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// Which kernel.
    pub stage: Stage,
    /// Head size.
    pub head_dim: u32,
    /// Query rows per workgroup.
    pub block_q: u32,
    /// Keys per tile.
    pub block_k: u32,
    /// Query rows per invocation of the fused kernel.
    pub rows: u32,
    /// The encoding's kernel kind.
    pub pos: PosKind,
    /// Two RoPE scores per key (ReRoPE, LM-Infinite, StreamingLLM cache-index positions).
    pub two_branch: bool,
    /// How the fused kernel stores Q, K, V and O (f32 in the unfused baseline).
    pub storage: [StorageForm; 4],
    /// The fused kernel also writes each row's log-sum-exp (binding `lse_buf`).
    pub lse: bool,
    /// A custom scheme's id (`CheckedScheme::id`, a hash of its composed hooks), 0 for none.
    /// Its WGSL comes with it: [`KernelKey::try_wgsl_with`].
    pub custom: u64,
}

impl KernelKey {
    /// The fused kernel at `head_dim`, `rows` query rows per invocation, for encoding kind `pos`.
    pub fn fused(head_dim: u32, rows: u32, pos: PosKind) -> Self {
        KernelKey {
            stage: Stage::Fused,
            head_dim,
            block_q: BLOCK_Q,
            block_k: block_k_for(head_dim, false),
            rows,
            pos,
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
            custom: 0,
        }
    }

    /// The variant of a custom scheme whose checked hooks have id `custom`.
    pub fn fused_custom(head_dim: u32, rows: u32, custom: u64) -> Self {
        KernelKey {
            custom,
            ..KernelKey::fused(head_dim, rows, PosKind::Custom)
        }
    }

    /// This key with Q, K, V and O stored as `storage` says.
    pub fn with_storage(self, storage: [StorageForm; 4]) -> Self {
        KernelKey { storage, ..self }
    }

    /// This key writing the log-sum-exp too.
    pub fn with_lse(self) -> Self {
        KernelKey { lse: true, ..self }
    }

    /// Whether the module needs `enable f16;` (and the device `SHADER_F16`).
    pub fn native_f16(&self) -> bool {
        self.storage.iter().any(|s| s.native_f16())
    }

    /// The bindings of this variant: the family's table with the tensors' storage types.
    pub fn bindings(&self) -> Vec<Binding> {
        let mut b = self.family().bindings().to_vec();
        if let Some(tensors) = family_tensors(self.family()) {
            for (form, (name, _, accessor)) in self.storage.iter().zip(tensors) {
                let slot = self.family().slot(name) as usize;
                b[slot].ty = form.binding_type(*accessor);
            }
        }
        if self.family() == Family::Fused && self.lse {
            b.push(LSE_BINDING);
        }
        b
    }

    /// The two-branch RoPE variant.
    pub fn fused_two_branch(head_dim: u32, rows: u32) -> Self {
        KernelKey {
            block_k: block_k_for(head_dim, true),
            two_branch: true,
            ..KernelKey::fused(head_dim, rows, PosKind::Rope)
        }
    }

    /// A stage of the unfused baseline.
    pub fn unfused(stage: Stage, head_dim: u32, pos: PosKind) -> Self {
        KernelKey {
            stage,
            head_dim,
            block_q: 0,
            block_k: 0,
            rows: 1,
            pos,
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
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
            for pos in PosKind::VARIANTS {
                add(KernelKey::fused(d, 1, pos));
                add(KernelKey::fused(d, multi_rows_for(d), pos));
                // Half storage in the packed forms every adapter runs (f16, bf16 and a mix),
                // on the RoPE kernel at head size 64; native f16 is listed by
                // `native_f16_examples` (it needs the SHADER_F16 capability).
                if pos == PosKind::Rope && d == 64 {
                    add(KernelKey::fused(d, 1, pos).with_lse());
                    add(KernelKey::fused(d, multi_rows_for(d), pos).with_lse());
                    for storage in PORTABLE_STORAGE_EXAMPLES {
                        add(KernelKey::fused(d, 1, pos).with_storage(storage));
                        add(KernelKey::fused(d, multi_rows_for(d), pos).with_storage(storage));
                    }
                }
                if pos == PosKind::Rope {
                    add(KernelKey::fused_two_branch(d, 1));
                    add(KernelKey::fused_two_branch(
                        d,
                        two_branch_rows(multi_rows_for(d)),
                    ));
                }
            }
        }
        keys
    }

    /// The decode kernel for a head size and encoding.
    pub fn decode(head_dim: u32, pos: PosKind) -> Self {
        KernelKey {
            stage: Stage::Decode,
            head_dim,
            block_q: 0,
            block_k: decode_block_k(head_dim),
            rows: decode_rows(head_dim),
            pos: pos.variant(),
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
            custom: 0,
        }
    }

    /// The split-KV reduce for a head size (the same for every encoding).
    pub fn decode_reduce(head_dim: u32) -> Self {
        KernelKey {
            stage: Stage::DecodeReduce,
            ..KernelKey::decode(head_dim, PosKind::None)
        }
    }

    /// Every decode variant the crate can build.
    pub fn all_decode() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            keys.push(KernelKey::decode_reduce(d));
            for pos in PosKind::VARIANTS {
                keys.push(KernelKey::decode(d, pos));
            }
        }
        // Half storage in the packed forms every adapter runs, on the RoPE kernel at head size
        // 64 and its reduce (native f16 needs the SHADER_F16 capability).
        for storage in PORTABLE_STORAGE_EXAMPLES {
            keys.push(KernelKey::decode(64, PosKind::Rope).with_storage(storage));
            keys.push(KernelKey::decode_reduce(64).with_storage(storage));
        }
        keys
    }

    /// Native-f16 storage variants of the RoPE kernels at head size 64 (all f16, and an f16 K/V
    /// cache with f32 queries and output): prefill at one and several rows per invocation, and
    /// decode with its reduce.
    pub fn native_f16_examples() -> Vec<KernelKey> {
        use StorageForm::{F16, F32};
        let mut keys = Vec::new();
        for storage in [[F16; 4], [F32, F16, F16, F32]] {
            for rows in [1, multi_rows_for(64)] {
                keys.push(KernelKey::fused(64, rows, PosKind::Rope).with_storage(storage));
            }
            keys.push(KernelKey::decode(64, PosKind::Rope).with_storage(storage));
        }
        keys.push(KernelKey::decode_reduce(64).with_storage([F16; 4]));
        keys
    }

    /// Every unfused-baseline variant the crate can build.
    pub fn all_unfused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for stage in [Stage::RopeApply, Stage::Scores, Stage::Softmax, Stage::Pv] {
                for pos in [PosKind::None, PosKind::Rope] {
                    keys.push(KernelKey::unfused(stage, d, pos));
                }
            }
        }
        keys
    }

    /// A name that spells the configuration, e.g. `attention_fused_d64_bq64_bk32_rope_half`.
    pub fn name(&self) -> String {
        let pos = self.pos.name();
        let branch = if self.two_branch { "_2branch" } else { "" };
        // Storage letters (q, k, v, o) unless all four are f32: `_dthhhh` is native f16.
        // Then `_lse` when the variant writes the log-sum-exp.
        let mut dt = if self.storage == [StorageForm::F32; 4] {
            String::new()
        } else {
            format!(
                "_dt{}",
                self.storage.iter().map(|s| s.letter()).collect::<String>()
            )
        };
        if self.lse {
            dt += "_lse";
        }
        let pos = if self.custom != 0 {
            format!("{pos}{:016x}", self.custom)
        } else {
            pos.to_string()
        };
        match self.stage {
            Stage::Fused => format!(
                "attention_fused_d{}_bq{}_bk{}_r{}_{pos}{branch}{dt}",
                self.head_dim, self.block_q, self.block_k, self.rows
            ),
            Stage::Decode => format!("decode_d{}_bk{}_{pos}{dt}", self.head_dim, self.block_k),
            Stage::DecodeReduce => format!("decode_reduce_d{}{dt}", self.head_dim),
            _ => format!("unfused_{}_d{}_{pos}", self.entry_point(), self.head_dim),
        }
    }

    /// The kernel family, which fixes the bindings.
    pub fn family(&self) -> Family {
        match self.stage {
            Stage::Fused => Family::Fused,
            Stage::Decode | Stage::DecodeReduce => Family::Decode,
            _ => Family::Unfused,
        }
    }

    /// The WGSL entry point.
    pub fn entry_point(&self) -> &'static str {
        match self.stage {
            Stage::Fused => "attention_fused",
            Stage::RopeApply => "rope_apply",
            Stage::Scores => "scores",
            Stage::Softmax => "softmax_rows",
            Stage::Pv => "pv",
            Stage::Decode => "decode_attention",
            Stage::DecodeReduce => "decode_reduce",
        }
    }

    /// The variant's constants, prepended to the family source.
    pub fn wgsl_header(&self) -> String {
        format!(
            "// variant {}\nconst HEAD_DIM: u32 = {}u;\nconst BLOCK_Q: u32 = {}u;\n\
             const BLOCK_K: u32 = {}u;\nconst ROWS: u32 = {}u;\nconst POS_KIND: u32 = {}u;\n\
             const TWO_BRANCH: bool = {};\nconst K_TILES: u32 = {}u;\n",
            self.name(),
            self.head_dim,
            self.block_q.max(1),
            self.block_k.max(1),
            self.rows.max(1),
            self.pos as u32,
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
