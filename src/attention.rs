//! The fused attention call: a validated plan that records into the caller's command encoder
//! with the caller's buffers, and a convenience call on host slices.

use std::sync::OnceLock;

use crate::binding::{
    BindGroupCache, BindingLimits, IntoBinding, check_disjoint, check_written_alone, entry,
};
use crate::context::Context;
use crate::dtype::{Dtype, HalfForm, check_bytes};
use crate::error::{Error, Result};
use crate::kernel::abi::Family;
use crate::kernel::{KernelKey, ScoreTile, workgroup_bytes};
use crate::plan::lower;
use crate::spec::AttentionSpec;
pub use crate::spec::{bias_dims, bias_len};

/// Device buffers of one call, each a whole buffer or a range of one (see [`IntoBinding`]).
/// Tensors are contiguous [batch, seq, heads, head_dim] in the spec's dtypes (f32 by default; f16
/// and bf16 as little-endian halves); positions are i32 [batch, seq]. Every buffer needs
/// `BufferUsages::STORAGE`; an offset must be a multiple of the device's
/// `min_storage_buffer_offset_alignment`. The kernel writes `out` (and `lse`): their buffers
/// cannot hold any range the call reads.
///
/// ```no_run
/// # fn f(q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, arena: &wgpu::Buffer) {
/// use posattn::AttentionBuffers;
/// // The output at offset 4096 of an arena, 65536 bytes long.
/// let out = wgpu::BufferBinding { buffer: arena, offset: 4096, size: wgpu::BufferSize::new(65536) };
/// let bufs = AttentionBuffers::new(q, k, v, out);
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AttentionBuffers<'a> {
    /// Queries.
    pub q: wgpu::BufferBinding<'a>,
    /// Keys.
    pub k: wgpu::BufferBinding<'a>,
    /// Values.
    pub v: wgpu::BufferBinding<'a>,
    /// The output, written by the kernel.
    pub out: wgpu::BufferBinding<'a>,
    /// Query positions; `None` uses the plan's defaults (the last seq_q of 0..seq_k).
    pub positions_q: Option<wgpu::BufferBinding<'a>>,
    /// Key positions; `None` uses 0..seq_k.
    pub positions_k: Option<wgpu::BufferBinding<'a>>,
    /// The additive bias the spec's `bias` layout describes; required when it is set.
    pub bias: Option<wgpu::BufferBinding<'a>>,
    /// Where to write each query row's log-sum-exp (see [`Attention::encode_with_lse`]);
    /// `None` runs the plain kernel.
    pub lse: Option<wgpu::BufferBinding<'a>>,
}

impl<'a> AttentionBuffers<'a> {
    /// Q, K, V and the output, with default positions, no bias and no log-sum-exp.
    pub fn new(
        q: impl IntoBinding<'a>,
        k: impl IntoBinding<'a>,
        v: impl IntoBinding<'a>,
        out: impl IntoBinding<'a>,
    ) -> Self {
        AttentionBuffers {
            q: q.into_binding(),
            k: k.into_binding(),
            v: v.into_binding(),
            out: out.into_binding(),
            positions_q: None,
            positions_k: None,
            bias: None,
            lse: None,
        }
    }

    /// Query and key positions from the caller's buffers.
    pub fn with_positions(mut self, q: impl IntoBinding<'a>, k: impl IntoBinding<'a>) -> Self {
        self.positions_q = Some(q.into_binding());
        self.positions_k = Some(k.into_binding());
        self
    }

    /// Query positions from the caller's buffer (keys keep theirs).
    pub fn with_positions_q(mut self, q: impl IntoBinding<'a>) -> Self {
        self.positions_q = Some(q.into_binding());
        self
    }

    /// Key positions from the caller's buffer (queries keep theirs).
    pub fn with_positions_k(mut self, k: impl IntoBinding<'a>) -> Self {
        self.positions_k = Some(k.into_binding());
        self
    }

    /// The additive bias (the spec must set a bias layout).
    pub fn with_bias(mut self, bias: impl IntoBinding<'a>) -> Self {
        self.bias = Some(bias.into_binding());
        self
    }

    /// Also writes each row's log-sum-exp, f32 [batch, num_heads, seq_q].
    pub fn with_lse(mut self, lse: impl IntoBinding<'a>) -> Self {
        self.lse = Some(lse.into_binding());
        self
    }
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
    limits: BindingLimits,
    /// The log-sum-exp variant's pipeline, compiled on the first call that asks for it.
    lse_pipeline: OnceLock<wgpu::ComputePipeline>,
    bind_groups: BindGroupCache,
}

/// The checked bindings of one call: the caller's, or the plan's own default positions, the
/// aux table in place of an absent bias, and each one's bound size.
pub(crate) struct CheckedBuffers<'a> {
    pub q: wgpu::BufferBinding<'a>,
    pub k: wgpu::BufferBinding<'a>,
    pub v: wgpu::BufferBinding<'a>,
    pub out: wgpu::BufferBinding<'a>,
    pub pos_q: wgpu::BufferBinding<'a>,
    pub pos_k: wgpu::BufferBinding<'a>,
    pub bias: Option<wgpu::BufferBinding<'a>>,
    pub lse: Option<wgpu::BufferBinding<'a>>,
    /// Bound sizes in the order q, k, v, out, pos_q, pos_k, bias, lse (0 where absent).
    pub sizes: [u64; 8],
}

/// Checks every binding of a call against the spec and the device (usage, alignment, range,
/// size) and that the written ones (`out`, `lse`) share no buffer with a read one.
pub(crate) fn check_call_buffers<'a>(
    s: &AttentionSpec,
    limits: &BindingLimits,
    bufs: &AttentionBuffers<'a>,
    default_q: &'a wgpu::Buffer,
    default_k: &'a wgpu::Buffer,
) -> Result<CheckedBuffers<'a>> {
    let d = s.dtypes;
    let q = limits.check("q", &bufs.q, (s.q_len() * d.q.size()) as u64)?;
    let k = limits.check("k", &bufs.k, (s.kv_len() * d.k.size()) as u64)?;
    let v = limits.check("v", &bufs.v, (s.kv_len() * d.v.size()) as u64)?;
    let out = limits.check("out", &bufs.out, (s.q_len() * d.out.size()) as u64)?;
    let pos_q = bufs
        .positions_q
        .clone()
        .unwrap_or_else(|| default_q.as_entire_buffer_binding());
    let pos_k = bufs
        .positions_k
        .clone()
        .unwrap_or_else(|| default_k.as_entire_buffer_binding());
    let pq = limits.check("positions_q", &pos_q, s.batch as u64 * s.seq_q as u64 * 4)?;
    let pk = limits.check("positions_k", &pos_k, s.batch as u64 * s.seq_k as u64 * 4)?;
    let bias = match (s.bias.is_some(), &bufs.bias) {
        (true, Some(b)) => limits.check("bias", b, bias_len(s) as u64 * 4)?,
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
        (false, None) => 0,
    };
    let lse = match &bufs.lse {
        Some(l) => limits.check("lse", l, s.lse_len() as u64 * 4)?,
        None => 0,
    };
    let read = [
        ("q", Some(&bufs.q)),
        ("k", Some(&bufs.k)),
        ("v", Some(&bufs.v)),
        ("positions_q", Some(&pos_q)),
        ("positions_k", Some(&pos_k)),
        ("bias", bufs.bias.as_ref()),
    ];
    check_written_alone(("out", &bufs.out), &read)?;
    if let Some(l) = &bufs.lse {
        check_written_alone(("lse", l), &read)?;
        check_disjoint(("out", &bufs.out, out), ("lse", l, lse))?;
    }
    Ok(CheckedBuffers {
        q: bufs.q.clone(),
        k: bufs.k.clone(),
        v: bufs.v.clone(),
        out: bufs.out.clone(),
        pos_q,
        pos_k,
        bias: bufs.bias.clone(),
        lse: bufs.lse.clone(),
        sizes: [q, k, v, out, pq, pk, bias, lse],
    })
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
        ("lse bytes", spec.lse_len() as u64 * 4),
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
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(ctx: &Context, spec: &AttentionSpec) -> Result<Self> {
        pollster::block_on(Self::new_async(ctx, spec))
    }

    /// [`Attention::new`] as a future: the compile's and the uploads' error scopes are awaited,
    /// not waited for (the only form on the web).
    pub async fn new_async(ctx: &Context, spec: &AttentionSpec) -> Result<Self> {
        Self::with_half_form_async(ctx, spec, ctx.half_form()).await
    }

    /// `new` with f16 tensors stored in `half` form whatever the context's choice; native f16
    /// on a device without `SHADER_F16` is an [`Error::Unavailable`] naming the first f16 tensor.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_half_form(ctx: &Context, spec: &AttentionSpec, half: HalfForm) -> Result<Self> {
        pollster::block_on(Self::with_half_form_async(ctx, spec, half))
    }

    /// [`Attention::with_half_form`] as a future.
    pub async fn with_half_form_async(
        ctx: &Context,
        spec: &AttentionSpec,
        half: HalfForm,
    ) -> Result<Self> {
        let plan = lower(spec)?;
        if half == HalfForm::Native
            && !ctx.has_native_f16()
            && let Some((field, _)) = spec.dtypes.fields().into_iter().find(|f| f.1 == Dtype::F16)
        {
            return Err(Error::unavailable(
                field,
                "native f16 storage (the context's half form is Native)",
                "packed f16 only (no SHADER_F16)",
            ));
        }
        let mut key = plan.fused_key(spec.head_dim, ctx.rows_per_invocation(spec.head_dim), half);
        let tile = ctx.score_tile();
        if tile != ScoreTile::Rows {
            if key.two_branch {
                return Err(Error::unavailable(
                    "score_tile",
                    format!("{tile:?}"),
                    "the row form only for two-branch methods (ReRoPE, Leaky ReRoPE, \
                     LM-Infinite, StreamingLLM cache positions)",
                ));
            }
            key = key.with_scores(tile);
            // Cooperative matrices are subgroup-scoped: every subgroup of the workgroup must be
            // whole.
            let wg = key.block_q / key.rows;
            let sg = ctx.adapter_info().subgroup_max_size;
            if tile.coop() && (sg == 0 || !wg.is_multiple_of(sg)) {
                return Err(Error::unavailable(
                    "invocations per workgroup",
                    format!("{wg}, for the cooperative-matrix score tile"),
                    format!("a multiple of the subgroup size {sg}"),
                ));
            }
        }
        // Lanes per row (the lane-split form) where the context asks for them and the variant
        // takes them.
        let key = ctx.fused_variant(key, spec);
        let limits = ctx.device().limits();
        let wg_bytes = workgroup_bytes(&key);
        if wg_bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::unavailable(
                "workgroup storage bytes",
                wg_bytes,
                limits.max_compute_workgroup_storage_size,
            ));
        }
        if key.invocations() > limits.max_compute_invocations_per_workgroup {
            return Err(Error::unavailable(
                "invocations per workgroup",
                key.invocations(),
                limits.max_compute_invocations_per_workgroup,
            ));
        }
        let workgroups = [spec.seq_q.div_ceil(key.block_q), spec.num_heads, spec.batch];
        check_limits(ctx, spec, workgroups)?;
        let pipeline = ctx.pipeline_with_async(key, plan.custom.as_ref()).await?;
        let (pq, pk) = spec.default_positions();
        let tables = ctx.scoped_async("uploading tables", || {
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
        });
        let (params, aux, default_pos_q, default_pos_k) = tables.await?;
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
            limits: BindingLimits::of(ctx.device()),
            lse_pipeline: OnceLock::new(),
            bind_groups: BindGroupCache::default(),
        })
    }

    /// The spec this plan was made for.
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

    /// Forgets the bind groups kept for the buffer sets seen so far (they hold the caller's
    /// buffers alive; at most eight sets are kept, the oldest dropped first).
    pub fn clear_bind_groups(&self) {
        self.bind_groups.clear();
    }

    /// Checks the buffers and returns the pipeline and bind group to record: the bind group of
    /// a buffer set seen before comes from the plan's cache (no allocation, no error scope, no
    /// wait); a new set's is made once, inside an error scope.
    fn prepare(
        &self,
        ctx: &Context,
        bufs: &AttentionBuffers,
        cache: bool,
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        let c = check_call_buffers(
            &self.spec,
            &self.limits,
            bufs,
            &self.default_pos_q,
            &self.default_pos_k,
        )?;
        let pipeline = match c.lse {
            None => self.pipeline.clone(),
            Some(_) => match self.lse_pipeline.get() {
                Some(p) => p.clone(),
                None => {
                    let p = ctx.pipeline(self.key.with_lse())?;
                    self.lse_pipeline.get_or_init(|| p).clone()
                }
            },
        };
        let [sq, sk, sv, so, spq, spk, sb, sl] = c.sizes;
        let aux = self.aux.as_entire_buffer_binding();
        // Without a caller bias, `user_bias` gets the aux table (never read: user_bias = 0).
        let (bias, sb) = match &c.bias {
            Some(b) => (b.clone(), sb),
            None => (aux.clone(), self.aux.size()),
        };
        let lse = c.lse.as_ref().map(|l| (l.buffer, l.offset, sl));
        let none = (c.q.buffer, u64::MAX, u64::MAX);
        let probe = [
            (c.q.buffer, c.q.offset, sq),
            (c.k.buffer, c.k.offset, sk),
            (c.v.buffer, c.v.offset, sv),
            (c.out.buffer, c.out.offset, so),
            (c.pos_q.buffer, c.pos_q.offset, spq),
            (c.pos_k.buffer, c.pos_k.offset, spk),
            (bias.buffer, bias.offset, sb),
            lse.unwrap_or(none),
        ];
        let make = || {
            let layout = match c.lse {
                Some(_) => ctx.lse_bind_group_layout()?,
                None => ctx.bind_group_layout(Family::Fused),
            };
            ctx.scoped("creating the bind group", || {
                let f = Family::Fused;
                let params = self.params.as_entire_buffer_binding();
                let entries = [
                    entry(f.slot("q_buf"), &c.q),
                    entry(f.slot("k_buf"), &c.k),
                    entry(f.slot("v_buf"), &c.v),
                    entry(f.slot("o_buf"), &c.out),
                    entry(f.slot("pos_q"), &c.pos_q),
                    entry(f.slot("pos_k"), &c.pos_k),
                    entry(f.slot("aux"), &aux),
                    entry(f.slot("params"), &params),
                    entry(f.slot("user_bias"), &bias),
                ];
                let lse_entry = c.lse.as_ref().map(|l| entry(f.bindings().len() as u32, l));
                let all: Vec<_> = entries.into_iter().chain(lse_entry).collect();
                ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("posattn fused"),
                    layout,
                    entries: &all,
                })
            })
        };
        let bg = if cache {
            self.bind_groups.get_or_make(&probe, make)?
        } else {
            make()?
        };
        Ok((pipeline, bg))
    }

    /// Records the attention into `encoder`: one compute pass, one dispatch, no submit. After
    /// the first call with a buffer set this creates nothing and never waits on the host.
    pub fn encode(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &AttentionBuffers,
    ) -> Result<()> {
        self.encode_cached(ctx, encoder, bufs, true)
    }

    fn encode_cached(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &AttentionBuffers,
        cache: bool,
    ) -> Result<()> {
        let (pipeline, bg) = self.prepare(ctx, bufs, cache)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("posattn fused"),
            timestamp_writes: None,
        });
        self.record(&mut pass, &pipeline, &bg);
        Ok(())
    }

    /// Records the attention into the caller's compute pass (one dispatch, the pass's timestamp
    /// writes and neighbours are the caller's). The pass's pipeline and bind group 0 are left
    /// set to this call's. Like [`Attention::encode`], nothing is created after the first call
    /// with a buffer set.
    pub fn encode_in_pass(
        &self,
        ctx: &Context,
        pass: &mut wgpu::ComputePass<'_>,
        bufs: &AttentionBuffers,
    ) -> Result<()> {
        let (pipeline, bg) = self.prepare(ctx, bufs, true)?;
        self.record(pass, &pipeline, &bg);
        Ok(())
    }

    fn record(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        bg: &wgpu::BindGroup,
    ) {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bg, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// `encode`, also writing each query row's log-sum-exp to `lse` (the same as
    /// [`AttentionBuffers::with_lse`]): f32 [batch, num_heads, seq_q], natural log, of the
    /// softmax denominator (the visible keys' scaled, biased logits and the sink logit if any);
    /// −∞ for a row that attends to nothing, NaN where the output row is NaN. With it, partial
    /// attentions over disjoint key sets merge exactly ([`crate::lse::merge`]). Its variant binds
    /// a ninth storage buffer: a device allowing fewer per stage gives [`Error::Unavailable`].
    pub fn encode_with_lse<'a>(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &AttentionBuffers<'a>,
        lse: impl IntoBinding<'a>,
    ) -> Result<()> {
        self.encode(ctx, encoder, &bufs.clone().with_lse(lse))
    }

    /// Runs on host slices: uploads, dispatches, waits (at most the context's timeout) and
    /// reads the output back. The output buffer is filled with NaN before the dispatch, so an
    /// element the kernel failed to write can never pass for a plausible value. With half
    /// storage dtypes the inputs are rounded to them (nearest, ties to even) on the host and the
    /// output is widened to f32 exactly; [`Attention::run_bytes`] takes and returns the stored
    /// bytes themselves.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.run_async(ctx, q, k, v, positions_q, positions_k))
    }

    /// [`Attention::run`] as a future: the readback is a `map_async` awaited, not waited for.
    pub async fn run_async(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        self.run_with_bias_async(ctx, q, k, v, positions_q, positions_k, None)
            .await
    }

    /// `run` with the caller's additive bias (laid out as the spec's `bias` says).
    #[cfg(not(target_arch = "wasm32"))]
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
        pollster::block_on(self.run_with_bias_async(ctx, q, k, v, positions_q, positions_k, bias))
    }

    /// [`Attention::run_with_bias`] as a future.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_with_bias_async(
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
        check_f32_lengths(s, q, k, v)?;
        let d = s.dtypes;
        let (q, k, v) = (d.q.encode(q), d.k.encode(k), d.v.encode(v));
        let io = (&q[..], &k[..], &v[..], positions_q, positions_k, bias);
        let out = self.run_inner(ctx, io, false).await?.0;
        d.out.decode("out", &out)
    }

    /// Runs on the tensors' stored bytes: Q, K and V as little-endian elements of the spec's
    /// dtypes (f16 or bf16 halves, f32), uploaded as they are; returns the output's bytes in its
    /// dtype. A length that is not a whole number of elements, or not the tensor's element count,
    /// is an error naming the tensor.
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(clippy::too_many_arguments)]
    pub fn run_bytes(
        &self,
        ctx: &Context,
        q: &[u8],
        k: &[u8],
        v: &[u8],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
        bias: Option<&[f32]>,
    ) -> Result<Vec<u8>> {
        pollster::block_on(self.run_bytes_async(ctx, q, k, v, positions_q, positions_k, bias))
    }

    /// [`Attention::run_bytes`] as a future.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_bytes_async(
        &self,
        ctx: &Context,
        q: &[u8],
        k: &[u8],
        v: &[u8],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
        bias: Option<&[f32]>,
    ) -> Result<Vec<u8>> {
        let io = (q, k, v, positions_q, positions_k, bias);
        Ok(self.run_inner(ctx, io, false).await?.0)
    }

    /// `run_with_bias` that also returns each row's log-sum-exp (see
    /// [`Attention::encode_with_lse`]): (output, lse [batch, num_heads, seq_q]).
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_lse(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        pollster::block_on(self.run_with_lse_async(ctx, q, k, v, positions_q, positions_k, bias))
    }

    /// [`Attention::run_with_lse`] as a future.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_with_lse_async(
        &self,
        ctx: &Context,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions_q: Option<&[i32]>,
        positions_k: Option<&[i32]>,
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = &self.spec;
        check_f32_lengths(s, q, k, v)?;
        let d = s.dtypes;
        let (q, k, v) = (d.q.encode(q), d.k.encode(k), d.v.encode(v));
        let io = (&q[..], &k[..], &v[..], positions_q, positions_k, bias);
        let (out, lse) = self.run_inner(ctx, io, true).await?;
        Ok((d.out.decode("out", &out)?, lse.unwrap_or_default()))
    }

    async fn run_inner(
        &self,
        ctx: &Context,
        io: HostIo<'_>,
        want_lse: bool,
    ) -> Result<(Vec<u8>, Option<Vec<f32>>)> {
        let (q, k, v, positions_q, positions_k, bias) = io;
        let s = &self.spec;
        let d = s.dtypes;
        for (field, data, dtype, want) in [
            ("q", q, d.q, s.q_len()),
            ("k", k, d.k, s.kv_len()),
            ("v", v, d.v, s.kv_len()),
        ] {
            check_bytes(field, dtype, data.len(), Some(want))?;
        }
        let b = bias.unwrap_or(&[]);
        if b.len() != bias_len(s) {
            return Err(Error::invalid(
                "bias",
                format!("{} values (shape {:?})", bias_len(s), shape(s, "bias")),
                format!("{} values", b.len()),
            ));
        }
        let (dq, dk) = s.default_positions();
        let pq = positions_q.unwrap_or(&dq);
        let pk = positions_k.unwrap_or(&dk);
        s.validate_positions(pq, pk)?;
        let out_bytes = (s.q_len() * d.out.size()) as u64;
        if want_lse {
            // Compiled here with its errors awaited; `encode_inner` then finds it cached.
            ctx.pipeline_async(self.key.with_lse()).await?;
        }
        type Out = (wgpu::Buffer, Option<wgpu::Buffer>);
        let out = ctx.scoped_async("running attention", || -> Result<Out> {
            let st = wgpu::BufferUsages::STORAGE;
            let init = |label, contents: &[u8]| ctx.buffer_init(label, contents, st);
            let (qb, kb, vb) = (
                init("posattn q", q),
                init("posattn k", k),
                init("posattn v", v),
            );
            let (pqb, pkb) = (
                init("posattn pos_q", bytemuck::cast_slice(pq)),
                init("posattn pos_k", bytemuck::cast_slice(pk)),
            );
            let bb = bias.map(|b| init("posattn bias", bytemuck::cast_slice(b)));
            let poison = d.out.encode(&vec![f32::NAN; s.q_len()]);
            let out = ctx.buffer_init("posattn out", &poison, st | wgpu::BufferUsages::COPY_SRC);
            let lse = want_lse.then(|| {
                let poison = vec![f32::NAN; s.lse_len()];
                ctx.buffer_init(
                    "posattn lse",
                    bytemuck::cast_slice(&poison),
                    st | wgpu::BufferUsages::COPY_SRC,
                )
            });
            let mut enc = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("posattn run"),
                });
            let mut bufs = AttentionBuffers::new(&qb, &kb, &vb, &out).with_positions(&pqb, &pkb);
            bufs.bias = bb.as_ref().map(|b| b.as_entire_buffer_binding());
            bufs.lse = lse.as_ref().map(|l| l.as_entire_buffer_binding());
            // One-off buffers: their bind group is not kept.
            self.encode_cached(ctx, &mut enc, &bufs, false)?;
            ctx.queue().submit([enc.finish()]);
            Ok((out, lse))
        });
        let out = out.await??;
        let (out, lse) = out;
        let lse = match lse {
            Some(l) => {
                let bytes = ctx.read_buffer_async(&l, s.lse_len() as u64 * 4).await?;
                Some(bytemuck::pod_collect_to_vec(&bytes))
            }
            None => None,
        };
        Ok((ctx.read_buffer_async(&out, out_bytes).await?, lse))
    }
}

/// Q, K, V bytes, positions and bias of one host call.
type HostIo<'a> = (
    &'a [u8],
    &'a [u8],
    &'a [u8],
    Option<&'a [i32]>,
    Option<&'a [i32]>,
    Option<&'a [f32]>,
);

fn check_f32_lengths(s: &AttentionSpec, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
    for (field, data, want) in [
        ("q", q, s.q_len()),
        ("k", k, s.kv_len()),
        ("v", v, s.kv_len()),
    ] {
        if data.len() != want {
            return Err(Error::invalid(
                field,
                format!("{want} values (shape {:?})", shape(s, field)),
                format!("{} values", data.len()),
            ));
        }
    }
    Ok(())
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
    #[cfg(not(target_arch = "wasm32"))]
    pub fn attention(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions: Option<(&[i32], &[i32])>,
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.attention_async(spec, q, k, v, positions))
    }

    /// [`Context::attention`] as a future.
    pub async fn attention_async(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        positions: Option<(&[i32], &[i32])>,
    ) -> Result<Vec<f32>> {
        let plan = Attention::new_async(self, spec).await?;
        plan.run_async(
            self,
            q,
            k,
            v,
            positions.map(|p| p.0),
            positions.map(|p| p.1),
        )
        .await
    }
}
