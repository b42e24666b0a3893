//! The unfused baseline: what a user writes without a fused kernel. A RoPE pass writes rotated Q
//! and K, a scores pass writes the seq_q × seq_k matrix for every head, a softmax pass normalises
//! it in place, and a P·V pass writes the output: four dispatches and three intermediate tensors.
//! It exists to be measured against (and is checked against the same CPU reference).

use crate::attention::{AttentionBuffers, check_call_buffers, check_limits};
use crate::binding::{BindingLimits, entry};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernel::abi::{Family, Params, PosKind};
use crate::kernel::{KernelKey, Stage};
use crate::plan::lower;
use crate::spec::AttentionSpec;

/// Most workgroups along one dimension that every WebGPU device accepts.
const MAX_GROUPS: u32 = 65535;

/// A planned unfused attention: pipelines, parameters and intermediate buffers allocated once.
pub struct Unfused {
    spec: AttentionSpec,
    kind: PosKind,
    rope: Option<wgpu::ComputePipeline>,
    scores: wgpu::ComputePipeline,
    softmax: wgpu::ComputePipeline,
    pv: wgpu::ComputePipeline,
    params: wgpu::Buffer,
    params_q: wgpu::Buffer,
    params_k: wgpu::Buffer,
    aux: wgpu::Buffer,
    default_pos_q: wgpu::Buffer,
    default_pos_k: wgpu::Buffer,
    q_rot: wgpu::Buffer,
    k_rot: wgpu::Buffer,
    score_buf: wgpu::Buffer,
}

fn grid_1d(n: u32) -> (u32, u32) {
    let x = n.clamp(1, MAX_GROUPS);
    (x, n.div_ceil(x))
}

impl Unfused {
    /// Plans the unfused pipeline. Supports no position encoding or RoPE.
    pub fn new(ctx: &Context, spec: &AttentionSpec) -> Result<Self> {
        let plan = lower(spec)?;
        if spec.dtypes != crate::dtype::Dtypes::F32 {
            return Err(Error::invalid(
                "dtypes",
                "f32 for every tensor in the unfused baseline",
                spec.dtypes.name(),
            ));
        }
        if !matches!(plan.kind, PosKind::None | PosKind::Rope) {
            return Err(Error::invalid(
                "position",
                "none or rope for the unfused baseline",
                spec.position.name(),
            ));
        }
        let plain = AttentionSpec::default()
            .with_seq_len(1)
            .with_head_dim(spec.head_dim);
        if spec.window != plain.window
            || spec.sink_tokens != 0
            || spec.extrapolation != plain.extrapolation
            || spec.softcap.is_some()
            || spec.sink_logits.is_some()
            || spec.bias.is_some()
        {
            return Err(Error::invalid(
                "spec",
                "no window, sinks, extrapolation, softcap, sink logits or bias for the unfused baseline",
                "one of them set",
            ));
        }
        if spec.logn_train_len.is_some() {
            return Err(Error::invalid(
                "logn_train_len",
                "None for the unfused baseline",
                format!("{:?}", spec.logn_train_len),
            ));
        }
        check_limits(ctx, spec, [1, 1, 1])?;
        let score_bytes =
            spec.batch as u64 * spec.num_heads as u64 * spec.seq_q as u64 * spec.seq_k as u64 * 4;
        let limits = ctx.device().limits();
        let max_bind = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if score_bytes > max_bind {
            return Err(Error::unavailable(
                "score matrix bytes",
                score_bytes,
                format!("{max_bind} (max storage binding)"),
            ));
        }
        let key = |stage| KernelKey::unfused(stage, spec.head_dim, plan.kind);
        let rope = match plan.kind {
            PosKind::Rope => Some(ctx.pipeline(key(Stage::RopeApply))?),
            _ => None,
        };
        let scores = ctx.pipeline(key(Stage::Scores))?;
        let softmax = ctx.pipeline(key(Stage::Softmax))?;
        let pv = ctx.pipeline(key(Stage::Pv))?;

        let params = plan.params;
        // The RoPE pass sees each tensor as [batch, seq_q, num_heads, d].
        let params_q = params;
        let params_k = Params {
            seq_q: spec.seq_k,
            num_heads: spec.num_kv_heads,
            ..params
        };
        let (pq, pk) = spec.default_positions();
        ctx.scoped("allocating the unfused pipeline", || {
            let init = |label, contents: &[u8], usage| ctx.buffer_init(label, contents, usage);
            let scratch = |label, size: u64| {
                ctx.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size.max(4),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            };
            let st = wgpu::BufferUsages::STORAGE;
            let un = wgpu::BufferUsages::UNIFORM;
            Unfused {
                spec: spec.clone(),
                rope,
                scores,
                softmax,
                pv,
                params: init("unfused params", bytemuck::bytes_of(&params), un),
                params_q: init("unfused params q", bytemuck::bytes_of(&params_q), un),
                params_k: init("unfused params k", bytemuck::bytes_of(&params_k), un),
                aux: init("unfused aux", bytemuck::cast_slice(&plan.aux), st),
                default_pos_q: init("unfused pos_q", bytemuck::cast_slice(&pq), st),
                default_pos_k: init("unfused pos_k", bytemuck::cast_slice(&pk), st),
                q_rot: scratch("unfused q_rot", spec.q_len() as u64 * 4),
                k_rot: scratch("unfused k_rot", spec.kv_len() as u64 * 4),
                score_buf: scratch("unfused scores", score_bytes),
                kind: plan.kind,
            }
        })
    }

    /// Device bytes of the intermediates (rotated Q and K, the score matrix) and tables.
    pub fn own_bytes(&self) -> u64 {
        [
            &self.params,
            &self.params_q,
            &self.params_k,
            &self.aux,
            &self.default_pos_q,
            &self.default_pos_k,
            &self.q_rot,
            &self.k_rot,
            &self.score_buf,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }

    /// Records the four passes into `encoder`.
    pub fn encode(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &AttentionBuffers,
    ) -> Result<()> {
        let s = &self.spec;
        let limits = BindingLimits::of(ctx.device());
        let c = check_call_buffers(s, &limits, bufs, &self.default_pos_q, &self.default_pos_k)?;
        let (pos_q, pos_k) = (&c.pos_q, &c.pos_k);
        let roped = self.kind == PosKind::Rope;
        let (q_rot, k_rot) = (
            self.q_rot.as_entire_buffer_binding(),
            self.k_rot.as_entire_buffer_binding(),
        );
        let (qr, kr) = if roped {
            (&q_rot, &k_rot)
        } else {
            (&c.q, &c.k)
        };
        let score = self.score_buf.as_entire_buffer_binding();
        let groups = ctx.scoped("creating unfused bind groups", || {
            let aux = self.aux.as_entire_buffer_binding();
            let bg = |a: &wgpu::BufferBinding,
                      b: &wgpu::BufferBinding,
                      dst: &wgpu::BufferBinding,
                      pos: &wgpu::BufferBinding,
                      params: &wgpu::Buffer| {
                let params = params.as_entire_buffer_binding();
                let entries: Vec<_> = [
                    ("src_a", a),
                    ("src_b", b),
                    ("dst", dst),
                    ("positions", pos),
                    ("aux", &aux),
                    ("params", &params),
                ]
                .iter()
                .map(|(name, buf)| entry(Family::Unfused.slot(name), buf))
                .collect();
                ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("posattn unfused"),
                    layout: ctx.bind_group_layout(Family::Unfused),
                    entries: &entries,
                })
            };
            [
                bg(&c.q, &c.q, &q_rot, pos_q, &self.params_q),
                bg(&c.k, &c.k, &k_rot, pos_k, &self.params_k),
                bg(qr, kr, &score, pos_q, &self.params),
                bg(qr, kr, &score, pos_q, &self.params),
                bg(&score, &c.v, &c.out, pos_q, &self.params),
            ]
        })?;
        let mut pass =
            |label, pipeline: &wgpu::ComputePipeline, bg: &wgpu::BindGroup, g: [u32; 3]| {
                let mut p = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                });
                p.set_pipeline(pipeline);
                p.set_bind_group(0, bg, &[]);
                p.dispatch_workgroups(g[0], g[1], g[2]);
            };
        let d = s.head_dim;
        if let Some(rope) = &self.rope {
            let (x, y) = grid_1d((s.q_len() as u32).div_ceil(256));
            pass("unfused rope q", rope, &groups[0], [x, y, 1]);
            let (x, y) = grid_1d((s.kv_len() as u32).div_ceil(256));
            pass("unfused rope k", rope, &groups[1], [x, y, 1]);
        }
        let bh = s.batch * s.num_heads;
        pass(
            "unfused scores",
            &self.scores,
            &groups[2],
            [s.seq_k.div_ceil(64), s.seq_q.div_ceil(64), bh],
        );
        let (x, y) = grid_1d(bh * s.seq_q);
        pass("unfused softmax", &self.softmax, &groups[3], [x, y, 1]);
        pass(
            "unfused pv",
            &self.pv,
            &groups[4],
            [d.div_ceil(64), s.seq_q.div_ceil(64), bh],
        );
        Ok(())
    }
}
