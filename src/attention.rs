//! The fused attention call: a validated plan that records into the caller's command encoder
//! with the caller's buffers, and a convenience call on host slices.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernel::abi::Family;
use crate::kernel::{BLOCK_Q, KernelKey, workgroup_bytes};
use crate::plan::lower;
use crate::spec::AttentionSpec;
pub use crate::spec::{bias_dims, bias_len};

/// Device buffers of one call. Tensors are f32, contiguous [batch, seq, heads, head_dim];
/// positions are i32 [batch, seq]. Every buffer needs `BufferUsages::STORAGE`.
pub struct AttentionBuffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
    /// Query positions; `None` uses the plan's defaults (the last seq_q of 0..seq_k).
    pub positions_q: Option<&'a wgpu::Buffer>,
    /// Key positions; `None` uses 0..seq_k.
    pub positions_k: Option<&'a wgpu::Buffer>,
    /// The additive bias the spec's `bias` layout describes; required when it is set.
    pub bias: Option<&'a wgpu::Buffer>,
}

/// A validated attention call on one context: pipeline, parameters and tables uploaded once,
/// ready to be recorded any number of times.
pub struct Attention {
    spec: AttentionSpec,
    #[cfg_attr(not(feature = "harness"), allow(dead_code))]
    key: KernelKey,
    pipeline: wgpu::ComputePipeline,
    params: wgpu::Buffer,
    aux: wgpu::Buffer,
    default_pos_q: wgpu::Buffer,
    default_pos_k: wgpu::Buffer,
    workgroups: [u32; 3],
    own_bytes: u64,
}

/// Checks that a buffer the caller passes can be bound as storage and holds `need` bytes.
pub(crate) fn check_buffer(field: &'static str, buf: &wgpu::Buffer, need: u64) -> Result<()> {
    if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::invalid(
            field,
            "a buffer with BufferUsages::STORAGE",
            format!("usage {:?}", buf.usage()),
        ));
    }
    if buf.size() < need {
        return Err(Error::invalid(
            field,
            format!("at least {need} bytes"),
            format!("{} bytes", buf.size()),
        ));
    }
    Ok(())
}

/// Checks every buffer of a call and returns the position buffers to bind (the caller's, or the
/// plan's defaults).
pub(crate) fn check_call_buffers<'a>(
    s: &AttentionSpec,
    bufs: &AttentionBuffers<'a>,
    default_q: &'a wgpu::Buffer,
    default_k: &'a wgpu::Buffer,
) -> Result<(&'a wgpu::Buffer, &'a wgpu::Buffer)> {
    check_buffer("q", bufs.q, s.q_len() as u64 * 4)?;
    check_buffer("k", bufs.k, s.kv_len() as u64 * 4)?;
    check_buffer("v", bufs.v, s.kv_len() as u64 * 4)?;
    check_buffer("out", bufs.out, s.q_len() as u64 * 4)?;
    let pos_q = bufs.positions_q.unwrap_or(default_q);
    let pos_k = bufs.positions_k.unwrap_or(default_k);
    check_buffer("positions_q", pos_q, s.batch as u64 * s.seq_q as u64 * 4)?;
    check_buffer("positions_k", pos_k, s.batch as u64 * s.seq_k as u64 * 4)?;
    match (s.bias.is_some(), bufs.bias) {
        (true, Some(b)) => check_buffer("bias", b, bias_len(s) as u64 * 4)?,
        (true, None) => {
            return Err(Error::invalid(
                "bias",
                "a bias buffer (the spec sets a bias layout)",
                "none",
            ));
        }
        (false, Some(_)) => {
            return Err(Error::invalid(
                "bias",
                "no buffer (the spec sets no bias layout)",
                "a buffer",
            ));
        }
        (false, None) => {}
    }
    Ok((pos_q, pos_k))
}

/// Checks sizes against the device's binding and dispatch limits.
pub(crate) fn check_limits(ctx: &Context, spec: &AttentionSpec, grid: [u32; 3]) -> Result<()> {
    let limits = ctx.device().limits();
    let max_bind = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    for (what, bytes) in [
        ("q / out bytes", spec.q_len() as u64 * 4),
        ("k / v bytes", spec.kv_len() as u64 * 4),
        ("bias bytes", bias_len(spec) as u64 * 4),
    ] {
        if bytes > max_bind {
            return Err(Error::unavailable(
                what,
                bytes,
                format!("{max_bind} (max storage binding)"),
            ));
        }
    }
    for (what, n) in [
        ("workgroups along seq_q", grid[0]),
        ("workgroups along num_heads", grid[1]),
        ("workgroups along batch", grid[2]),
    ] {
        if n > limits.max_compute_workgroups_per_dimension {
            return Err(Error::unavailable(
                what,
                n,
                limits.max_compute_workgroups_per_dimension,
            ));
        }
    }
    Ok(())
}

impl Attention {
    /// Validates `spec` against itself and the device, compiles (or reuses) the pipeline and
    /// uploads the tables.
    pub fn new(ctx: &Context, spec: &AttentionSpec) -> Result<Self> {
        let plan = lower(spec)?;
        let key = plan.fused_key(spec.head_dim, ctx.rows_per_invocation(spec.head_dim));
        let limits = ctx.device().limits();
        let wg_bytes = workgroup_bytes(&key);
        if wg_bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::unavailable(
                "workgroup storage bytes",
                wg_bytes,
                limits.max_compute_workgroup_storage_size,
            ));
        }
        if key.block_q / key.rows > limits.max_compute_invocations_per_workgroup {
            return Err(Error::unavailable(
                "invocations per workgroup",
                key.block_q / key.rows,
                limits.max_compute_invocations_per_workgroup,
            ));
        }
        let workgroups = [spec.seq_q.div_ceil(BLOCK_Q), spec.num_heads, spec.batch];
        check_limits(ctx, spec, workgroups)?;
        let pipeline = ctx.pipeline_with(key, plan.custom.as_ref())?;
        let (pq, pk) = spec.default_positions();
        let (params, aux, default_pos_q, default_pos_k) = ctx.scoped("uploading tables", || {
            let init = |label, contents: &[u8], usage| ctx.buffer_init(label, contents, usage);
            let st = wgpu::BufferUsages::STORAGE;
            (
                init(
                    "posattn params",
                    bytemuck::bytes_of(&plan.params),
                    wgpu::BufferUsages::UNIFORM,
                ),
                init("posattn aux", bytemuck::cast_slice(&plan.aux), st),
                init("posattn default pos_q", bytemuck::cast_slice(&pq), st),
                init("posattn default pos_k", bytemuck::cast_slice(&pk), st),
            )
        })?;
        let own_bytes = params.size() + aux.size() + default_pos_q.size() + default_pos_k.size();
        Ok(Attention {
            spec: spec.clone(),
            key,
            pipeline,
            params,
            aux,
            default_pos_q,
            default_pos_k,
            workgroups,
            own_bytes,
        })
    }

    pub fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    /// The kernel variant this call runs (for tools; feature `harness`).
    #[cfg(feature = "harness")]
    pub fn kernel(&self) -> KernelKey {
        self.key
    }

    /// Device bytes this plan allocated itself (parameters, tables, default positions).
    pub fn own_bytes(&self) -> u64 {
        self.own_bytes
    }

    fn bind_group(&self, ctx: &Context, bufs: &AttentionBuffers) -> Result<wgpu::BindGroup> {
        let (pos_q, pos_k) =
            check_call_buffers(&self.spec, bufs, &self.default_pos_q, &self.default_pos_k)?;
        ctx.scoped("creating the bind group", || {
            // Without a caller bias, `user_bias` gets the aux table (never read: user_bias = 0).
            let entries = [
                ("q_buf", bufs.q),
                ("k_buf", bufs.k),
                ("v_buf", bufs.v),
                ("o_buf", bufs.out),
                ("pos_q", pos_q),
                ("pos_k", pos_k),
                ("aux", &self.aux),
                ("params", &self.params),
                ("user_bias", bufs.bias.unwrap_or(&self.aux)),
            ]
            .iter()
            .map(|(name, b)| wgpu::BindGroupEntry {
                binding: Family::Fused.slot(name),
                resource: b.as_entire_binding(),
            })
            .collect::<Vec<_>>();
            ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("posattn fused"),
                layout: ctx.bind_group_layout(Family::Fused),
                entries: &entries,
            })
        })
    }

    /// Records the attention into `encoder`: one compute pass, one dispatch, no submit.
    pub fn encode(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &AttentionBuffers,
    ) -> Result<()> {
        let bg = self.bind_group(ctx, bufs)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("posattn fused"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
        Ok(())
    }

    /// Runs on host slices: uploads, dispatches, waits (at most the context's timeout) and
    /// reads the output back. The output buffer is filled with NaN before the dispatch, so an
    /// element the kernel failed to write can never pass for a plausible value.
    pub fn run(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        self.run_with_bias(ctx, q, k, v, positions_q, positions_k, None)
    }

    /// `run` with the caller's additive bias (laid out as the spec's `bias` says).
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_bias(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let s = &self.spec;
        let empty = [0.0f32; 0];
        for (field, data, want) in [
            ("q", q, s.q_len()),
            ("k", k, s.kv_len()),
            ("v", v, s.kv_len()),
            ("bias", bias.unwrap_or(&empty), bias_len(s)),
        ] {
            if data.len() != want {
                return Err(Error::invalid(
                    field,
                    format!("{want} values (shape {:?})", shape(s, field)),
                    format!("{} values", data.len()),
                ));
            }
        }
        let (dq, dk) = s.default_positions();
        let pq = positions_q.unwrap_or(&dq);
        let pk = positions_k.unwrap_or(&dk);
        s.validate_positions(pq, pk)?;
        let out = ctx.scoped("running attention", || -> Result<wgpu::Buffer> {
            let st = wgpu::BufferUsages::STORAGE;
            let init = |label, contents: &[u8]| ctx.buffer_init(label, contents, st);
            let (qb, kb, vb) = (
                init("posattn q", bytemuck::cast_slice(q)),
                init("posattn k", bytemuck::cast_slice(k)),
                init("posattn v", bytemuck::cast_slice(v)),
            );
            let (pqb, pkb) = (
                init("posattn pos_q", bytemuck::cast_slice(pq)),
                init("posattn pos_k", bytemuck::cast_slice(pk)),
            );
            let bb = bias.map(|b| init("posattn bias", bytemuck::cast_slice(b)));
            let poison = vec![f32::NAN; s.q_len()];
            let out = ctx.buffer_init(
                "posattn out",
                bytemuck::cast_slice(&poison),
                st | wgpu::BufferUsages::COPY_SRC,
            );
            let mut enc = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("posattn run"),
                });
            self.encode(
                ctx,
                &mut enc,
                &AttentionBuffers {
                    q: &qb,
                    k: &kb,
                    v: &vb,
                    out: &out,
                    positions_q: Some(&pqb),
                    positions_k: Some(&pkb),
                    bias: bb.as_ref(),
                },
            )?;
            ctx.queue().submit([enc.finish()]);
            Ok(out)
        })??;
        let bytes = ctx.read_buffer(&out, s.q_len() as u64 * 4)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }
}

fn shape(s: &AttentionSpec, field: &str) -> [u32; 4] {
    match field {
        "q" | "out" => [s.batch, s.seq_q, s.num_heads, s.head_dim],
        "bias" => bias_dims(s).unwrap_or([0; 4]),
        _ => [s.batch, s.seq_k, s.num_kv_heads, s.head_dim],
    }
}

impl Context {
    /// One-shot attention on host slices with default or given positions.
    pub fn attention(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions: Option<(&[i32], &[i32])>,
    ) -> Result<Vec<f32>> {
        let plan = Attention::new(self, spec)?;
        plan.run(
            self,
            q,
            k,
            v,
            positions.map(|p| p.0),
            positions.map(|p| p.1),
        )
    }
}
