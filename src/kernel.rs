//! Kernel variants, their WGSL, their bindings, and the pipeline cache.
//!
//! A variant is an explicit, enumerable key; the host prepends the key's constants to the shader
//! family's source, so every loop bound and array size is a compile-time constant for the driver.
//! Continuous parameters (sizes, theta, scale, slopes) travel in `Params` and the aux table, so a
//! new shape never compiles a new shader.

use bytemuck::{Pod, Zeroable};

use crate::context::Context;
use crate::error::Result;
use crate::position::PosKind;

pub(crate) const COMMON_WGSL: &str = include_str!("../shaders/common.wgsl");
pub(crate) const POSITION_WGSL: &str = include_str!("../shaders/position.wgsl");
pub(crate) const ATTENTION_WGSL: &str = include_str!("../shaders/attention.wgsl");
pub(crate) const UNFUSED_WGSL: &str = include_str!("../shaders/unfused.wgsl");

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

/// The uniform block every kernel reads. Keep in sync with `struct Params` in
/// shaders/common.wgsl (tests/shaders.rs compares the layouts).
/// Public for that test and for tools that inspect kernels; not needed to call attention.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Params {
    pub batch: u32,
    pub seq_q: u32,
    pub seq_k: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub causal: u32,
    pub rotary_dim: u32,
    pub alibi_symmetric: u32,
    pub scale_log2: f32,
    pub attn_factor: f32,
    pub xpos_inv_scale_base: f32,
    pub scale: f32,
    pub freq_offset: u32,
    pub bias_offset: u32,
    pub logn_inv_ln_len: f32,
    pub sink_tokens: u32,
    /// Negative: unbounded.
    pub window_left: i32,
    pub window_right: i32,
    /// cap · log2(e); 0 turns the softcap off.
    pub softcap_log2: f32,
    /// Float index of the sink logits in aux; `NO_SINK_LOGITS` when there are none.
    pub sink_logit_offset: u32,
    pub bias_len: u32,
    pub bias_p0: f32,
    pub bias_p1: f32,
    /// 1 when a caller bias is bound.
    pub user_bias: u32,
    pub user_bias_stride_b: u32,
    pub user_bias_stride_h: u32,
    /// 0 none, 1 ReRoPE distance rule, 2 keys seen only through the sink rule.
    pub branch_rule: u32,
    /// Second-branch query position: 0 its own, 1 zero (LM-Infinite), 2 cache index (StreamingLLM).
    pub branch_q_mode: u32,
    pub branch_w: i32,
    pub branch_offset: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// `Params::sink_logit_offset` when there are no sink logits.
pub const NO_SINK_LOGITS: u32 = u32::MAX;

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
        }
    }

    /// Every fused variant the crate builds by default (one row per invocation, and the
    /// multi-row count for the head size).
    pub fn all_fused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for pos in PosKind::ALL {
                for interleaved in [false, true] {
                    if interleaved && !pos.rotates() {
                        continue;
                    }
                    keys.push(KernelKey::fused(d, 1, pos, interleaved));
                    keys.push(KernelKey::fused(d, multi_rows_for(d), pos, interleaved));
                    if pos == PosKind::Rope {
                        keys.push(KernelKey::fused_two_branch(d, 1, interleaved));
                        keys.push(KernelKey::fused_two_branch(
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
             const BLOCK_K: u32 = {}u;\nconst ROWS: u32 = {}u;\nconst POS_KIND: u32 = {}u;\nconst ROPE_INTERLEAVED: bool = {};\n\
             const TWO_BRANCH: bool = {};\nconst K_TILES: u32 = {}u;\n",
            self.name(),
            self.head_dim,
            self.block_q.max(1),
            self.block_k.max(1),
            self.rows.max(1),
            self.pos as u32,
            self.interleaved,
            self.two_branch,
            if self.two_branch { 2 } else { 1 }
        )
    }

    /// The whole WGSL module of this variant, with `@unroll` loops expanded.
    pub fn wgsl(&self) -> String {
        let family = match self.stage {
            Stage::Fused => ATTENTION_WGSL,
            _ => UNFUSED_WGSL,
        };
        let bounds = [
            ("HEAD_VEC", self.head_dim / 4),
            ("BLOCK_K", self.block_k.max(1)),
            ("ROWS", self.rows.max(1)),
        ];
        let body = unroll(
            &format!("{COMMON_WGSL}\n{POSITION_WGSL}\n{family}"),
            &bounds,
        );
        format!("{}\n{}", self.wgsl_header(), body)
    }
}

/// Expands each loop written as
/// ```text
/// // @unroll
/// for (var c = 0u; c < BOUND; c++) { BODY }
/// ```
/// into `{ const c = 0u; BODY } { const c = 1u; BODY } …`, innermost loops included, with BOUND
/// looked up in `bounds`. A marked loop of any other shape is left as written; the naga
/// validation test of every variant would then show the leftover marker in the source.
pub(crate) fn unroll(src: &str, bounds: &[(&str, u32)]) -> String {
    const MARK: &str = "// @unroll";
    let mut out = src.to_string();
    while let Some(at) = out.find(MARK) {
        let rest = &out[at + MARK.len()..];
        let Some(open) = rest.find('{') else { break };
        let header = rest[..open].trim();
        // header: for (var c = 0u; c < BOUND; c++)
        let parsed = header
            .strip_prefix("for (var ")
            .and_then(|h| h.strip_suffix(')'))
            .and_then(|h| {
                let mut parts = h.split(';').map(str::trim);
                let init = parts.next()?;
                let cond = parts.next()?;
                let var = init.strip_suffix("= 0u")?.trim();
                let bound = cond.strip_prefix(var)?.trim().strip_prefix('<')?.trim();
                let n = bounds.iter().find(|b| b.0 == bound)?.1;
                Some((var.to_string(), n))
            });
        let Some((var, n)) = parsed else {
            // Unknown shape: drop the marker so that the loop stays a loop.
            out.replace_range(at..at + MARK.len(), "// unrolled: no");
            continue;
        };
        // Find the loop body's closing brace.
        let body_start = at + MARK.len() + open + 1;
        let mut depth = 1;
        let mut end = body_start;
        for (i, ch) in out[body_start..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = body_start + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = out[body_start..end].to_string();
        let mut expanded = String::new();
        for k in 0..n {
            expanded.push_str(&format!("{{ const {var} = {k}u;{body}}}\n"));
        }
        out.replace_range(at..end + 1, &expanded);
    }
    out
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
        },
        count: None,
    }
}

/// Bind group layouts of the two kernel families (keep in sync with the `@binding`s).
pub(crate) struct Kernels {
    pub fused_bgl: wgpu::BindGroupLayout,
    pub unfused_bgl: wgpu::BindGroupLayout,
    fused_layout: wgpu::PipelineLayout,
    unfused_layout: wgpu::PipelineLayout,
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Self {
        // q, k, v, out, pos_q, pos_k, aux, params, caller bias
        let fused_bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("posattn fused"),
            entries: &[
                storage(0, true),
                storage(1, true),
                storage(2, true),
                storage(3, false),
                storage(4, true),
                storage(5, true),
                storage(6, true),
                uniform(7),
                storage(8, true),
            ],
        });
        // src_a, src_b, dst, positions, aux, params
        let unfused_bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("posattn unfused"),
            entries: &[
                storage(0, true),
                storage(1, true),
                storage(2, false),
                storage(3, true),
                storage(4, true),
                uniform(5),
            ],
        });
        let layout = |bgl: &wgpu::BindGroupLayout, label| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(bgl)],
                immediate_size: 0,
            })
        };
        Kernels {
            fused_layout: layout(&fused_bgl, "posattn fused"),
            unfused_layout: layout(&unfused_bgl, "posattn unfused"),
            fused_bgl,
            unfused_bgl,
        }
    }
}

impl Context {
    /// The pipeline for `key`, compiled on first use and cached for the context's lifetime.
    pub(crate) fn pipeline(&self, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.pipelines.lock().expect("pipeline cache").get(&key) {
            return Ok(p.clone());
        }
        let layout = match key.stage {
            Stage::Fused => &self.kernels.fused_layout,
            _ => &self.kernels.unfused_layout,
        };
        let source = key.wgsl();
        let name = key.name();
        let pipeline = self.scoped("compiling a kernel", || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&name),
                    layout: Some(layout),
                    module: &module,
                    entry_point: Some(key.entry_point()),
                    compilation_options: Default::default(),
                    cache: None,
                })
        })?;
        self.pipelines
            .lock()
            .expect("pipeline cache")
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
