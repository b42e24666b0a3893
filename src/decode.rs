//! Decode against a KV cache: a plan built once for maxima (batch, cache capacity, new queries
//! per sequence) that records a decode step into the caller's encoder with no allocation, and
//! whose per-call lengths live in a device buffer.
//!
//! # The cache
//! - `k_cache`, `v_cache`: `[batch, capacity, kv_heads, head_dim]` in the spec's dtypes (f32, f16
//!   or bf16, `AttentionSpec::dtypes`; the kernel computes in f32), keys stored unrotated
//!   (rotated as they are staged, so that scaled RoPE tables stay exact), or rotated with
//!   [`DecodeSpec::with_keys_rotated`].
//! - `positions`: i32 `[batch, capacity]`, the position of the token in each slot; `None` binds
//!   the plan's own table, slot index = position (not allowed for a ring cache).
//! - `lengths`: u32 `[batch, 2]`, per sequence (new queries, keys), the keys including the new
//!   tokens' own. The kernel clamps them: keys to the capacity (a ring cache wraps instead),
//!   new queries to `max_q` and to the keys, so a bad value on the device never reads out of
//!   bounds. Ragged batches are just different lengths per sequence.
//! - `q`, `out`: `[batch, max_q, heads, head_dim]` in their dtypes; row i of a sequence is its i-th new
//!   query, at key index keys − queries + i, whose position is that slot's. Rows at and past a
//!   sequence's query count are not written.
//!
//! # Ring cache
//! [`DecodeSpec::with_ring`]: key index i lives in slot i below the sink count, else in
//! sinks + (i − sinks) mod (capacity − sinks). The keys count grows past the capacity; the
//! masks act on key indices, so the window must fit: capacity ≥ sinks + window_left + max_q.
//!
//! # Split rule
//! See [`default_splits`]; [`DecodeSpec::with_splits`] overrides it.

use crate::binding::{BindGroupCache, BindingLimits, IntoBinding, check_written_alone, entry};
use crate::context::Context;
use crate::dtype::{Dtype, HalfForm};
use crate::encoding::masks::Extrapolation;
use crate::error::{Error, Result};
use crate::kernel::abi::{DECODE_BINDINGS, DecodeParams, Family, PosKind};
use crate::kernel::storage::StorageForm;
use crate::kernel::{
    DECODE_WG, KernelKey, KeyRotation, decode_lane_plan, decode_rows, decode_workgroup_bytes,
};
use crate::plan::lower;
use crate::spec::AttentionSpec;

/// What a decode plan is built for.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DecodeSpec {
    /// Heads, head size, encoding, masks and the rest, with `seq_q` the most new queries per
    /// sequence and `seq_k` the cache capacity. `bias` is not available in decode plans, and an
    /// `extrapolation` method needs keys stored unrotated.
    pub attention: AttentionSpec,
    /// Slots are reused (see the module docs).
    pub ring: bool,
    /// Keys are stored already rotated (RoPE only).
    pub keys_rotated: bool,
    /// Chunks of the key range per row block; `None` applies [`default_splits`].
    pub splits: Option<u32>,
    /// Sum the lanes of a key with subgroup operations where the device has them (the
    /// default); `false` keeps the workgroup-memory form every adapter runs.
    pub subgroups: bool,
    /// Read one word of each 64-byte line of the next keys' K and V rows before their turn, so
    /// that their cache misses overlap instead of stalling each key. `None` (the default)
    /// applies the rule: on for CPU adapters (lavapipe, llvmpipe, SwiftShader: they read a row
    /// lane by lane and wait on each miss, and a KV head's rows are a whole cache row apart),
    /// off for GPUs, which keep many loads in flight on their own.
    pub read_ahead: Option<bool>,
}

impl DecodeSpec {
    /// A decode plan for `attention` (`seq_q` = most new queries per sequence, `seq_k` = cache capacity), not a ring, keys stored unrotated, the default split rule.
    pub fn new(attention: AttentionSpec) -> Self {
        DecodeSpec {
            attention,
            ring: false,
            keys_rotated: false,
            splits: None,
            subgroups: true,
            read_ahead: None,
        }
    }

    /// Reuses slots: a ring cache keeping the sinks and the window (see the module docs).
    pub fn with_ring(mut self) -> Self {
        self.ring = true;
        self
    }

    /// Keys are stored already rotated (RoPE only): the kernel does not rotate them.
    pub fn with_keys_rotated(mut self) -> Self {
        self.keys_rotated = true;
        self
    }

    /// Splits each row block's keys into `splits` chunks, merged by a second dispatch (overrides [`default_splits`]).
    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = Some(splits);
        self
    }

    /// Whether subgroup operations may be used (see [`DecodeSpec::subgroups`]).
    pub fn with_subgroups(mut self, subgroups: bool) -> Self {
        self.subgroups = subgroups;
        self
    }

    /// Reads the next keys' rows ahead or not, whatever the adapter (see
    /// [`DecodeSpec::read_ahead`]).
    pub fn with_read_ahead(mut self, read_ahead: bool) -> Self {
        self.read_ahead = Some(read_ahead);
        self
    }

    /// Whether a plan for this spec on an adapter of `device_type` reads ahead.
    pub fn reads_ahead(&self, device_type: wgpu::DeviceType) -> bool {
        self.read_ahead
            .unwrap_or(device_type == wgpu::DeviceType::Cpu)
    }

    /// Key slots per sequence.
    pub fn capacity(&self) -> u32 {
        self.attention.seq_k
    }

    /// Most new queries per sequence.
    pub fn max_q(&self) -> u32 {
        self.attention.seq_q
    }

    /// Elements of `q` and `out`.
    pub fn q_len(&self) -> usize {
        self.attention.q_len()
    }

    /// Elements of `k_cache` and of `v_cache`.
    pub fn cache_len(&self) -> usize {
        self.attention.kv_len()
    }

    /// Query rows of one KV group: query heads per KV head × most new queries.
    pub fn group_rows(&self) -> u32 {
        let a = &self.attention;
        a.num_heads / a.num_kv_heads * a.seq_q
    }

    /// Query rows per workgroup (the decode kernel's `decode_rows` of
    /// [`DecodeSpec::group_rows`]).
    pub fn rows(&self) -> u32 {
        decode_rows(self.group_rows())
    }

    /// Query rows per KV group, cut into blocks of [`DecodeSpec::rows`].
    pub fn row_blocks(&self) -> u32 {
        self.group_rows().div_ceil(self.rows())
    }

    /// The checks of the decode-only fields.
    pub fn validate(&self) -> Result<()> {
        let a = &self.attention;
        if a.extrapolation != Extrapolation::None && self.keys_rotated {
            return Err(Error::invalid(
                "extrapolation",
                "none with keys stored rotated (the second branch rotates the stored keys \
                 itself)",
                a.extrapolation.name(),
            ));
        }
        if self.splits == Some(0) {
            return Err(Error::invalid("splits", "at least 1", 0));
        }
        if self.keys_rotated && !matches!(a.position, crate::PositionEncoding::Rope(_)) {
            return Err(Error::invalid(
                "keys_rotated",
                "a RoPE encoding (only RoPE keys can be stored rotated)",
                "another encoding",
            ));
        }
        if self.ring {
            let Some(left) = a.window.left else {
                return Err(Error::invalid(
                    "window",
                    "a left window bound (a ring cache keeps only the window)",
                    "none",
                ));
            };
            let need = a.sink_tokens as u64 + left as u64 + a.seq_q as u64;
            if (a.seq_k as u64) < need {
                return Err(Error::invalid(
                    "capacity",
                    format!("at least sink_tokens + window left + max_q = {need} for a ring cache"),
                    a.seq_k,
                ));
            }
        }
        Ok(())
    }
}

/// Workgroups a device wants in flight: twice the host threads on a CPU adapter (lavapipe and
/// llvmpipe run one workgroup per thread), 512 on a GPU.
///
/// On a GPU a decode workgroup's keys are a serial chain (each key group takes one key a step)
/// and a step is latency-bound, so short chunks pay: on an H200 (Vulkan, batch 1, Llama-3-8B
/// heads) 2 chunks of 256 keys took 126 µs at cache 512 and 16 chunks of 32 keys 60 µs. Past
/// about 512 workgroups more chunks cost more than they save (64, 128, 256 and 512 chunks at
/// cache 8192: 143, 208, 281 and 484 µs); BENCHMARKS.md has the sweep.
pub fn target_workgroups(info: &wgpu::AdapterInfo) -> u32 {
    if info.device_type == wgpu::DeviceType::Cpu {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        2 * threads
    } else {
        512
    }
}

/// Keys one chunk holds at least on a CPU adapter (below this a chunk's fixed cost outweighs its
/// parallelism).
pub const MIN_KEYS_PER_SPLIT: u32 = 256;

/// Keys one chunk holds at least on a GPU: 4 steps of each of the workgroup's key groups.
pub const MIN_KEYS_PER_SPLIT_GPU: u32 = 32;

/// The least keys per chunk on this adapter: [`MIN_KEYS_PER_SPLIT`] on a CPU adapter,
/// [`MIN_KEYS_PER_SPLIT_GPU`] elsewhere.
pub fn min_keys_per_split(info: &wgpu::AdapterInfo) -> u32 {
    if info.device_type == wgpu::DeviceType::Cpu {
        MIN_KEYS_PER_SPLIT
    } else {
        MIN_KEYS_PER_SPLIT_GPU
    }
}

/// The split rule: enough chunks that batch × kv_heads × row blocks × splits reaches
/// [`target_workgroups`], and no more than capacity / [`min_keys_per_split`] (at least 1).
pub fn default_splits(info: &wgpu::AdapterInfo, spec: &DecodeSpec) -> u32 {
    let a = &spec.attention;
    let base = a.batch * a.num_kv_heads * spec.row_blocks();
    let want = target_workgroups(info).div_ceil(base.max(1));
    want.clamp(1, (a.seq_k / min_keys_per_split(info)).max(1))
}

/// Device buffers of one decode step (layouts in the module docs), each a whole buffer or a
/// range of one (see [`IntoBinding`]: a cache can sit at an offset of an arena). Every buffer
/// needs `BufferUsages::STORAGE`; an offset must be a multiple of the device's
/// `min_storage_buffer_offset_alignment`; `out` cannot share a buffer with the others (the
/// kernel writes it). [`KvCache::buffers`] fills in a cache's own.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DecodeBuffers<'a> {
    /// New queries.
    pub q: wgpu::BufferBinding<'a>,
    /// Keys, per slot.
    pub k_cache: wgpu::BufferBinding<'a>,
    /// Values, per slot.
    pub v_cache: wgpu::BufferBinding<'a>,
    /// Positions per slot; `None`: slot index (not for a ring cache).
    pub positions: Option<wgpu::BufferBinding<'a>>,
    /// (new queries, keys) per sequence, u32.
    pub lengths: wgpu::BufferBinding<'a>,
    /// The output, written by the kernel.
    pub out: wgpu::BufferBinding<'a>,
    /// The caller's additive bias (f32 `[batch or 1, num_heads or 1, max_q, capacity]`, over
    /// cache slots, as the spec's `bias` layout says); required exactly when the spec has one.
    pub bias: Option<wgpu::BufferBinding<'a>>,
}

impl<'a> DecodeBuffers<'a> {
    /// The step's buffers with slot-index positions (set [`DecodeBuffers::with_positions`] for a
    /// ring cache or any other positions).
    pub fn new(
        q: impl IntoBinding<'a>,
        k_cache: impl IntoBinding<'a>,
        v_cache: impl IntoBinding<'a>,
        lengths: impl IntoBinding<'a>,
        out: impl IntoBinding<'a>,
    ) -> Self {
        DecodeBuffers {
            q: q.into_binding(),
            k_cache: k_cache.into_binding(),
            v_cache: v_cache.into_binding(),
            positions: None,
            lengths: lengths.into_binding(),
            out: out.into_binding(),
            bias: None,
        }
    }

    /// The caller's bias over cache slots (see the field).
    pub fn with_bias(mut self, bias: impl IntoBinding<'a>) -> Self {
        self.bias = Some(bias.into_binding());
        self
    }

    /// Positions per slot from the caller's buffer.
    pub fn with_positions(mut self, positions: impl IntoBinding<'a>) -> Self {
        self.positions = Some(positions.into_binding());
        self
    }
}

/// A decode plan on one context: pipelines, tables and split-KV scratch made once.
pub struct DecodePlan {
    spec: DecodeSpec,
    #[cfg_attr(not(feature = "harness"), allow(dead_code))]
    key: KernelKey,
    pipeline: wgpu::ComputePipeline,
    reduce: Option<wgpu::ComputePipeline>,
    params: wgpu::Buffer,
    dparams: wgpu::Buffer,
    aux: wgpu::Buffer,
    default_positions: wgpu::Buffer,
    partials: wgpu::Buffer,
    splits: u32,
    grid: [u32; 3],
    reduce_grid: [u32; 3],
    limits: BindingLimits,
    bind_groups: BindGroupCache,
}

impl DecodePlan {
    /// Validates `spec` against itself and the device, compiles (or reuses) the pipelines and
    /// makes the tables and the split-KV scratch.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(ctx: &Context, spec: &DecodeSpec) -> Result<Self> {
        pollster::block_on(Self::new_async(ctx, spec))
    }

    /// [`DecodePlan::new`] as a future: the compiles' and the uploads' error scopes are awaited.
    pub async fn new_async(ctx: &Context, spec: &DecodeSpec) -> Result<Self> {
        spec.validate()?;
        let a = &spec.attention;
        let plan = lower(a)?;
        let half = ctx.half_form();
        if half == HalfForm::Native
            && !ctx.has_native_f16()
            && let Some((field, _)) = a.dtypes.fields().into_iter().find(|f| f.1 == Dtype::F16)
        {
            return Err(Error::unavailable(
                field,
                "native f16 storage (the context's half form is Native)",
                "packed f16 only (no SHADER_F16)",
            ));
        }
        // Q, K, V and O in the spec's dtypes, f16 in the context's form (the reduce writes O).
        let d = a.dtypes;
        let storage = [d.q, d.k, d.v, d.out].map(|t| StorageForm::of(t, half));
        let splits = spec
            .splits
            .unwrap_or_else(|| default_splits(ctx.adapter_info(), spec));
        let limits = ctx.device().limits();
        if DECODE_WG > limits.max_compute_invocations_per_workgroup {
            return Err(Error::unavailable(
                "invocations per workgroup",
                DECODE_WG,
                limits.max_compute_invocations_per_workgroup,
            ));
        }
        let grid_x = spec.row_blocks() as u64 * splits as u64;
        let grid = [
            u32::try_from(grid_x).unwrap_or(u32::MAX),
            a.num_kv_heads,
            a.batch,
        ];
        let reduce_grid = [a.seq_q, a.num_heads, a.batch];
        let max_bind = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let partial_bytes = if splits > 1 {
            a.batch as u64
                * a.num_heads as u64
                * a.seq_q as u64
                * splits as u64
                * (a.head_dim as u64 / 4 + 1)
                * 16
        } else {
            16
        };
        for (what, bytes) in [
            ("q / out bytes", a.q_len() as u64 * 4),
            ("k_cache / v_cache bytes", a.kv_len() as u64 * 4),
            ("split-KV partial bytes", partial_bytes),
        ] {
            if bytes > max_bind {
                return Err(Error::unavailable(what, bytes, max_bind));
            }
        }
        for (what, n) in [
            ("workgroups along row blocks × splits", grid[0]),
            ("workgroups along kv_heads", grid[1]),
            ("workgroups along batch", grid[2]),
            ("workgroups along max_q", reduce_grid[0]),
            ("workgroups along num_heads", reduce_grid[1]),
        ] {
            if n > limits.max_compute_workgroups_per_dimension {
                return Err(Error::unavailable(
                    what,
                    n,
                    limits.max_compute_workgroups_per_dimension,
                ));
            }
        }
        let r = plan.params.rotary_dim;
        let step = if plan.params.rope_interleaved != 0 {
            4
        } else {
            8
        };
        let custom_rotates = plan.custom.as_ref().is_some_and(|c| c.hooks.rotate);
        if (plan.kind.rotates() || custom_rotates) && !r.is_multiple_of(step) {
            return Err(Error::invalid(
                "position.rotary_dim",
                format!("a multiple of {step} in decode plans (keys are staged a vec4 at a time)"),
                r,
            ));
        }
        let kind = if spec.keys_rotated {
            PosKind::Rope
        } else {
            plan.kind
        };
        // Lanes per key and their sum: the context's forced or tuned count, else from the
        // adapter's subgroup sizes where the device has subgroups (and the spec allows them).
        let subgroups =
            spec.subgroups && ctx.device().features().contains(wgpu::Features::SUBGROUP);
        let (lanes, lane_reduce) = decode_lane_plan(
            a.head_dim,
            subgroups,
            ctx.adapter_info(),
            ctx.decode_lanes(a.head_dim),
        );
        // A custom scheme's hooks compose into the decode kernel as into the prefill kernel.
        let base = KernelKey::decode(a.head_dim, spec.rows(), kind);
        let key = match &plan.custom {
            Some(c) => KernelKey {
                custom: c.id,
                ..base
            },
            None => base,
        }
        .with_lanes(lanes, lane_reduce)
        .with_key_rotation(KeyRotation::choose(
            plan.kind.rotates() || custom_rotates,
            custom_rotates,
            spec.keys_rotated,
            plan.params.rope_interleaved != 0,
            plan.params.rotary_dim,
            a.head_dim,
            lanes,
        ))
        .with_storage(storage)
        .with_two_branch(plan.two_branch)
        .with_read_ahead(spec.reads_ahead(ctx.adapter_info().device_type))
        .with_bias(a.bias.is_some())
        .with_half_acc(ctx.accumulation() == crate::dtype::Accumulation::F16)
        .with_keys_per_step(ctx.decode_keys_per_step(a.head_dim));
        let wg_bytes = decode_workgroup_bytes(&key);
        if wg_bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::unavailable(
                "workgroup storage bytes",
                wg_bytes,
                limits.max_compute_workgroup_storage_size,
            ));
        }
        let pipeline = ctx.pipeline_with_async(key, plan.custom.as_ref()).await?;
        let reduce = if splits > 1 {
            // The reduce shares the step's bind group, so its layout too.
            let reduce_key = KernelKey::decode_reduce(a.head_dim)
                .with_storage(storage)
                .with_bias(a.bias.is_some());
            Some(ctx.pipeline_async(reduce_key).await?)
        } else {
            None
        };
        let dp = DecodeParams {
            capacity: a.seq_k,
            max_q: a.seq_q,
            splits,
            group: a.num_heads / a.num_kv_heads,
            ring: spec.ring as u32,
            keys_rotated: spec.keys_rotated as u32,
            _pad0: 0,
            _pad1: 0,
        };
        let positions: Vec<i32> = (0..a.batch).flat_map(|_| 0..a.seq_k as i32).collect();
        let (params, dparams, aux, default_positions, partials) = ctx
            .scoped_async("making the decode plan's buffers", || {
                let st = wgpu::BufferUsages::STORAGE;
                let un = wgpu::BufferUsages::UNIFORM;
                (
                    ctx.buffer_init(
                        "posattn decode params",
                        bytemuck::bytes_of(&plan.params),
                        un,
                    ),
                    ctx.buffer_init("posattn decode dparams", bytemuck::bytes_of(&dp), un),
                    ctx.buffer_init("posattn decode aux", bytemuck::cast_slice(&plan.aux), st),
                    ctx.buffer_init(
                        "posattn decode positions",
                        bytemuck::cast_slice(&positions),
                        st,
                    ),
                    ctx.device().create_buffer(&wgpu::BufferDescriptor {
                        label: Some("posattn decode partials"),
                        size: partial_bytes,
                        usage: st,
                        mapped_at_creation: false,
                    }),
                )
            })
            .await?;
        Ok(DecodePlan {
            spec: spec.clone(),
            key,
            pipeline,
            reduce,
            params,
            dparams,
            aux,
            default_positions,
            partials,
            splits,
            grid,
            reduce_grid,
            limits: BindingLimits::of(ctx.device()),
            bind_groups: BindGroupCache::default(),
        })
    }

    /// The spec this plan was made for.
    pub fn spec(&self) -> &DecodeSpec {
        &self.spec
    }

    /// Chunks of the key range (1: no reduce pass).
    pub fn splits(&self) -> u32 {
        self.splits
    }

    /// The kernel variant (for tools; feature `harness`).
    #[cfg(feature = "harness")]
    pub fn kernel(&self) -> KernelKey {
        self.key
    }

    /// Replaces the plan's position encoding with another of the same kernel shape (the same
    /// encoding kind and custom scheme, the same rotary_dim and layout, tables of the same
    /// sizes), rewriting the plan's parameters and tables with queue writes: no pipeline, buffer
    /// or bind group is made, and it takes effect from the next submission on (like any
    /// `write_buffer`). This is how a decode loop follows a table that depends on the context
    /// length, dynamic NTK or LongRoPE past its original length: keys are stored unrotated and
    /// every step rotates them with the current table. Refused (field `position`) for a plan
    /// whose keys are stored rotated, since their rotation is frozen into the cache.
    pub fn set_position(
        &mut self,
        ctx: &Context,
        position: crate::encoding::position::PositionEncoding,
    ) -> Result<()> {
        if self.spec.keys_rotated {
            return Err(Error::invalid(
                "position",
                "a plan whose keys are stored unrotated (keys stored rotated carry their table)",
                "keys stored rotated",
            ));
        }
        let mut attention = self.spec.attention.clone();
        attention.position = position;
        let new = lower(&attention)?;
        let old = lower(&self.spec.attention)?;
        let shape = |p: &crate::plan::Plan| {
            (
                p.kind,
                p.two_branch,
                p.custom.as_ref().map(|c| c.id),
                p.aux.len(),
                p.params.rotary_dim,
                p.params.rope_interleaved,
            )
        };
        if shape(&new) != shape(&old) {
            return Err(Error::invalid(
                "position",
                format!(
                    "an encoding of the plan's shape: {} with rotary_dim {} and {} table entries",
                    self.spec.attention.position.name(),
                    old.params.rotary_dim,
                    old.aux.len()
                ),
                format!(
                    "{} with rotary_dim {} and {} table entries",
                    attention.position.name(),
                    new.params.rotary_dim,
                    new.aux.len()
                ),
            ));
        }
        ctx.queue()
            .write_buffer(&self.params, 0, bytemuck::bytes_of(&new.params));
        ctx.queue()
            .write_buffer(&self.aux, 0, bytemuck::cast_slice(&new.aux));
        self.spec.attention = attention;
        Ok(())
    }

    /// Bytes the lengths buffer needs: two u32 per sequence.
    pub fn lengths_bytes(&self) -> u64 {
        self.spec.attention.batch as u64 * 8
    }

    /// Checks host-side lengths, (new queries, keys) per sequence: one pair per sequence, new
    /// queries at most `max_q` and at most the keys, keys at most the capacity (a ring cache:
    /// any count, its slots wrap).
    pub fn check_lengths(&self, lengths: &[(u32, u32)]) -> Result<()> {
        let a = &self.spec.attention;
        if lengths.len() != a.batch as usize {
            return Err(Error::invalid(
                "lengths",
                format!("{} (new queries, keys) pairs, one per sequence", a.batch),
                format!("{} pairs", lengths.len()),
            ));
        }
        for &(q, k) in lengths {
            if q > a.seq_q {
                return Err(Error::invalid(
                    "lengths.queries",
                    format!("at most max_q = {}", a.seq_q),
                    q,
                ));
            }
            if q > k {
                return Err(Error::invalid(
                    "lengths.queries",
                    format!("at most the keys ({k}): new tokens are in the cache"),
                    q,
                ));
            }
            if !self.spec.ring && k > a.seq_k {
                return Err(Error::invalid(
                    "lengths.keys",
                    format!("at most the capacity ({})", a.seq_k),
                    k,
                ));
            }
            if k > crate::spec::MAX_ABS_POSITION as u32 {
                return Err(Error::invalid(
                    "lengths.keys",
                    format!("at most {}", crate::spec::MAX_ABS_POSITION),
                    k,
                ));
            }
        }
        Ok(())
    }

    /// Checks `lengths` and writes them into `buffer` with a queue write (it lands before the
    /// next submission's commands).
    pub fn write_lengths(
        &self,
        ctx: &Context,
        buffer: &wgpu::Buffer,
        lengths: &[(u32, u32)],
    ) -> Result<()> {
        self.check_lengths(lengths)?;
        let need = self.lengths_bytes();
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_DST) || buffer.size() < need {
            return Err(Error::invalid(
                "lengths",
                format!("a COPY_DST buffer of at least {need} bytes"),
                format!("{} bytes, usage {:?}", buffer.size(), buffer.usage()),
            ));
        }
        let words: Vec<u32> = lengths.iter().flat_map(|&(q, k)| [q, k]).collect();
        ctx.queue()
            .write_buffer(buffer, 0, bytemuck::cast_slice(&words));
        Ok(())
    }

    /// Checks the bindings; returns their bound sizes (q, k_cache, v_cache, positions,
    /// lengths, out, bias; positions 0 when the plan's own are used, bias 0 without one).
    fn check_buffers(&self, bufs: &DecodeBuffers) -> Result<[u64; 7]> {
        let a = &self.spec.attention;
        let d = a.dtypes;
        let l = &self.limits;
        let bytes = |n: usize, t: Dtype| n as u64 * t.size() as u64;
        let q = l.check("q", &bufs.q, bytes(a.q_len(), d.q))?;
        let out = l.check("out", &bufs.out, bytes(a.q_len(), d.out))?;
        let k = l.check("k_cache", &bufs.k_cache, bytes(a.kv_len(), d.k))?;
        let v = l.check("v_cache", &bufs.v_cache, bytes(a.kv_len(), d.v))?;
        let len = l.check("lengths", &bufs.lengths, self.lengths_bytes())?;
        let pos = match &bufs.positions {
            Some(p) => l.check("positions", p, a.batch as u64 * a.seq_k as u64 * 4)?,
            None if self.spec.ring => {
                return Err(Error::invalid(
                    "positions",
                    "a positions buffer (a ring cache reuses slots, so slot index is no position)",
                    "none",
                ));
            }
            None => 0,
        };
        check_bias_given(bufs.bias.is_some(), a)?;
        let bias = match &bufs.bias {
            Some(b) => l.check("bias", b, crate::attention::bias_len(a) as u64 * 4)?,
            None => 0,
        };
        check_written_alone(
            ("out", &bufs.out),
            &[
                ("q", Some(&bufs.q)),
                ("k_cache", Some(&bufs.k_cache)),
                ("v_cache", Some(&bufs.v_cache)),
                ("positions", bufs.positions.as_ref()),
                ("lengths", Some(&bufs.lengths)),
                ("bias", bufs.bias.as_ref()),
            ],
        )?;
        Ok([q, k, v, pos, len, out, bias])
    }

    /// Forgets the bind groups kept for the buffer sets seen so far (they hold the caller's
    /// buffers alive; at most eight sets are kept, the oldest dropped first).
    pub fn clear_bind_groups(&self) {
        self.bind_groups.clear();
    }

    /// The bind group of a buffer set: made (inside an error scope) on its first use, then
    /// reused from the plan's cache.
    fn bind_group(
        &self,
        ctx: &Context,
        bufs: &DecodeBuffers,
        cache: bool,
    ) -> Result<wgpu::BindGroup> {
        let [sq, sk, sv, sp, sl, so, sb] = self.check_buffers(bufs)?;
        let own = self.default_positions.as_entire_buffer_binding();
        let (positions, sp) = match &bufs.positions {
            Some(p) => (p.clone(), sp),
            None => (own, self.default_positions.size()),
        };
        let mut probe = vec![
            (bufs.q.buffer, bufs.q.offset, sq),
            (bufs.k_cache.buffer, bufs.k_cache.offset, sk),
            (bufs.v_cache.buffer, bufs.v_cache.offset, sv),
            (positions.buffer, positions.offset, sp),
            (bufs.lengths.buffer, bufs.lengths.offset, sl),
            (bufs.out.buffer, bufs.out.offset, so),
        ];
        if let Some(b) = &bufs.bias {
            probe.push((b.buffer, b.offset, sb));
        }
        let make = || {
            ctx.scoped("creating the decode bind group", || {
                let f = Family::Decode;
                let (aux, params, dparams, partials) = (
                    self.aux.as_entire_buffer_binding(),
                    self.params.as_entire_buffer_binding(),
                    self.dparams.as_entire_buffer_binding(),
                    self.partials.as_entire_buffer_binding(),
                );
                let mut entries = vec![
                    entry(f.slot("q_buf"), &bufs.q),
                    entry(f.slot("k_cache"), &bufs.k_cache),
                    entry(f.slot("v_cache"), &bufs.v_cache),
                    entry(f.slot("o_buf"), &bufs.out),
                    entry(f.slot("pos_k"), &positions),
                    entry(f.slot("lengths"), &bufs.lengths),
                    entry(f.slot("aux"), &aux),
                    entry(f.slot("params"), &params),
                    entry(f.slot("dparams"), &dparams),
                    entry(f.slot("partials"), &partials),
                ];
                // The bias variants' own layout (nine storage buffers; checked at plan time).
                let layout = match &bufs.bias {
                    Some(b) => {
                        entries.push(entry(DECODE_BINDINGS.len() as u32, b));
                        ctx.decode_bias_bind_group_layout()
                    }
                    None => Ok(ctx.bind_group_layout(Family::Decode)),
                };
                layout.map(|layout| {
                    ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("posattn decode"),
                        layout,
                        entries: &entries,
                    })
                })
            })
            .and_then(|r| r)
        };
        if cache {
            self.bind_groups.get_or_make(&probe, make)
        } else {
            make()
        }
    }

    /// Records one decode step into `encoder`: one compute pass with the decode dispatch and,
    /// when the keys are split, the reduce dispatch. After the first call with a buffer set this
    /// creates nothing and never waits on the host.
    pub fn encode(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &DecodeBuffers,
    ) -> Result<()> {
        let bg = self.bind_group(ctx, bufs, true)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("posattn decode"),
            timestamp_writes: None,
        });
        self.record(&mut pass, &bg);
        Ok(())
    }

    /// Records one decode step into the caller's compute pass: the decode dispatch and, when
    /// the keys are split, the reduce as a second dispatch in the same pass. The pass's pipeline
    /// and bind group 0 are left set to this call's. Creates nothing after the first call with a
    /// buffer set.
    pub fn encode_in_pass(
        &self,
        ctx: &Context,
        pass: &mut wgpu::ComputePass<'_>,
        bufs: &DecodeBuffers,
    ) -> Result<()> {
        let bg = self.bind_group(ctx, bufs, true)?;
        self.record(pass, &bg);
        Ok(())
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup) {
        pass.set_bind_group(0, bg, &[]);
        pass.set_pipeline(&self.pipeline);
        let [x, y, z] = self.grid;
        pass.dispatch_workgroups(x, y, z);
        if let Some(reduce) = &self.reduce {
            pass.set_pipeline(reduce);
            let [x, y, z] = self.reduce_grid;
            pass.dispatch_workgroups(x, y, z);
        }
    }

    /// Runs one step on host data: uploads the cache, positions and lengths, dispatches, waits
    /// and reads the output back. The output starts as NaN, so rows the kernel does not write
    /// (past a sequence's query count) come back NaN.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(
        &self,
        ctx: &Context,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        positions: Option<&[i32]>,
        lengths: &[(u32, u32)],
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.run_async(ctx, q, k_cache, v_cache, positions, lengths))
    }

    /// [`DecodePlan::run`] as a future: the readback is a `map_async` awaited.
    pub async fn run_async(
        &self,
        ctx: &Context,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        positions: Option<&[i32]>,
        lengths: &[(u32, u32)],
    ) -> Result<Vec<f32>> {
        self.run_with_bias_async(ctx, q, k_cache, v_cache, positions, lengths, None)
            .await
    }

    /// [`DecodePlan::run`] with the caller's bias over cache slots (f32 `[batch or 1,
    /// num_heads or 1, max_q, capacity]`), required exactly when the spec has a bias layout.
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_bias(
        &self,
        ctx: &Context,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        positions: Option<&[i32]>,
        lengths: &[(u32, u32)],
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        pollster::block_on(
            self.run_with_bias_async(ctx, q, k_cache, v_cache, positions, lengths, bias),
        )
    }

    /// [`DecodePlan::run_with_bias`] as a future.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_with_bias_async(
        &self,
        ctx: &Context,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        positions: Option<&[i32]>,
        lengths: &[(u32, u32)],
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let a = &self.spec.attention;
        check_bias_given(bias.is_some(), a)?;
        let bias_len = crate::spec::bias_len(a);
        if let Some(b) = bias.filter(|b| b.len() != bias_len) {
            return Err(Error::invalid(
                "bias",
                format!("{bias_len} values"),
                format!("{} values", b.len()),
            ));
        }
        let cap_len = a.batch as usize * a.seq_k as usize;
        for (field, got, want) in [
            ("q", q.len(), a.q_len()),
            ("k_cache", k_cache.len(), a.kv_len()),
            ("v_cache", v_cache.len(), a.kv_len()),
            ("positions", positions.map_or(cap_len, |p| p.len()), cap_len),
        ] {
            if got != want {
                return Err(Error::invalid(
                    field,
                    format!("{want} values"),
                    format!("{got} values"),
                ));
            }
        }
        self.check_lengths(lengths)?;
        let out = ctx.scoped_async("running decode", || -> Result<wgpu::Buffer> {
            let st = wgpu::BufferUsages::STORAGE;
            let init = |label, bytes: &[u8]| ctx.buffer_init(label, bytes, st);
            // Stored in the spec's dtypes (rounded to nearest even).
            let d = a.dtypes;
            let qb = init("posattn q", &d.q.encode(q));
            let kb = init("posattn k cache", &d.k.encode(k_cache));
            let vb = init("posattn v cache", &d.v.encode(v_cache));
            let pb = positions.map(|p| init("posattn positions", bytemuck::cast_slice(p)));
            let words: Vec<u32> = lengths.iter().flat_map(|&(q, k)| [q, k]).collect();
            let lb = init("posattn lengths", bytemuck::cast_slice(&words));
            let bb = bias.map(|b| init("posattn bias", bytemuck::cast_slice(b)));
            let poison = a.dtypes.out.encode(&vec![f32::NAN; a.q_len()]);
            let out = ctx.buffer_init("posattn out", &poison, st | wgpu::BufferUsages::COPY_SRC);
            let mut enc = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("posattn decode run"),
                });
            let mut bufs = DecodeBuffers::new(&qb, &kb, &vb, &lb, &out);
            bufs.positions = pb.as_ref().map(|p| p.as_entire_buffer_binding());
            bufs.bias = bb.as_ref().map(|b| b.as_entire_buffer_binding());
            // One-off buffers: their bind group is made here and not kept.
            let bg = self.bind_group(ctx, &bufs, false)?;
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("posattn decode"),
                    timestamp_writes: None,
                });
                self.record(&mut pass, &bg);
            }
            ctx.queue().submit([enc.finish()]);
            Ok(out)
        });
        let out = out.await??;
        let out_dt = a.dtypes.out;
        let bytes = ctx
            .read_buffer_async(&out, (a.q_len() * out_dt.size()) as u64)
            .await?;
        out_dt.decode("out", &bytes)
    }
}

/// A bias is given exactly when the spec has a bias layout.
fn check_bias_given(given: bool, a: &AttentionSpec) -> Result<()> {
    match (given, a.bias.is_some()) {
        (true, false) => Err(Error::invalid(
            "bias",
            "no bias (the plan's spec has no bias layout)",
            "a bias",
        )),
        (false, true) => Err(Error::invalid(
            "bias",
            "a bias (the plan's spec has a bias layout)",
            "none",
        )),
        _ => Ok(()),
    }
}

/// The slot of key index `i` in a cache of `capacity` slots (the kernel's `slot_of`).
pub fn cache_slot(ring: bool, sinks: u32, capacity: u32, i: u32) -> u32 {
    if !ring {
        i.min(capacity - 1)
    } else if i < sinks {
        i
    } else {
        sinks + (i - sinks) % (capacity - sinks)
    }
}

/// Cache buffers for a plan, with the keys count of each sequence kept on the host, and an
/// append that records copies into the caller's encoder.
pub struct KvCache {
    spec: DecodeSpec,
    /// Keys, `[batch, capacity, kv_heads, head_dim]` in the spec's K dtype.
    pub k: wgpu::Buffer,
    /// Values, laid out like `k`.
    pub v: wgpu::Buffer,
    /// Position of the token in each slot, i32 `[batch, capacity]`.
    pub positions: wgpu::Buffer,
    /// (new queries, keys) per sequence, u32 `[batch, 2]`.
    pub lengths: wgpu::Buffer,
    keys: Vec<u32>,
}

impl KvCache {
    /// Zeroed K/V caches, positions and lengths for `plan`'s maxima, every sequence empty.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(ctx: &Context, plan: &DecodePlan) -> Result<Self> {
        pollster::block_on(Self::new_async(ctx, plan))
    }

    /// [`KvCache::new`] as a future: the allocations' error scopes are awaited.
    pub async fn new_async(ctx: &Context, plan: &DecodePlan) -> Result<Self> {
        let spec = plan.spec().clone();
        let a = &spec.attention;
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let buffers = ctx.scoped_async("allocating a KV cache", || {
            let mk = |label, size: u64| {
                ctx.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            };
            (
                mk("posattn k cache", (a.kv_len() * a.dtypes.k.size()) as u64),
                mk("posattn v cache", (a.kv_len() * a.dtypes.v.size()) as u64),
                mk(
                    "posattn cache positions",
                    a.batch as u64 * a.seq_k as u64 * 4,
                ),
                mk("posattn cache lengths", plan.lengths_bytes()),
            )
        });
        let (k, v, positions, lengths) = buffers.await?;
        Ok(KvCache {
            keys: vec![0; a.batch as usize],
            spec,
            k,
            v,
            positions,
            lengths,
        })
    }

    /// Keys held per sequence (appended so far; past the capacity in a ring cache).
    pub fn keys(&self) -> &[u32] {
        &self.keys
    }

    /// The buffers of a decode step on this cache.
    pub fn buffers<'a>(
        &'a self,
        q: impl IntoBinding<'a>,
        out: impl IntoBinding<'a>,
    ) -> DecodeBuffers<'a> {
        DecodeBuffers::new(q, &self.k, &self.v, &self.lengths, out).with_positions(&self.positions)
    }

    /// Appends `counts[b]` new tokens to sequence b: their K and V rows, read from `new_k` and
    /// `new_v` laid out like `q` but with kv heads (`[batch, max_q, kv_heads, head_dim]`), are
    /// copied into their slots by commands recorded into `encoder`; their positions
    /// (`positions[b][i]`, or the key index when `None`) and the new lengths (queries = counts,
    /// keys = old keys + counts) are queue writes, which land before that submission runs.
    pub fn append(
        &mut self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        new_k: &wgpu::Buffer,
        new_v: &wgpu::Buffer,
        counts: &[u32],
        positions: Option<&[Vec<i32>]>,
    ) -> Result<()> {
        let a = &self.spec.attention;
        if counts.len() != a.batch as usize {
            return Err(Error::invalid(
                "counts",
                format!("{} counts, one per sequence", a.batch),
                counts.len(),
            ));
        }
        // One token's K or V row in bytes, in the cache's dtype (the new rows are stored alike).
        let row_of = |t: Dtype| a.num_kv_heads as u64 * a.head_dim as u64 * t.size() as u64;
        let (row_k, row_v) = (row_of(a.dtypes.k), row_of(a.dtypes.v));
        for (field, b, row) in [("new_k", new_k, row_k), ("new_v", new_v, row_v)] {
            let need = a.batch as u64 * a.seq_q as u64 * row;
            if !b.usage().contains(wgpu::BufferUsages::COPY_SRC) || b.size() < need {
                return Err(Error::invalid(
                    field,
                    format!("a COPY_SRC buffer of at least {need} bytes"),
                    format!("{} bytes, usage {:?}", b.size(), b.usage()),
                ));
            }
        }
        let mut lengths = Vec::with_capacity(counts.len());
        for (b, &n) in counts.iter().enumerate() {
            let keys = self.keys[b] as u64 + n as u64;
            if n > a.seq_q {
                return Err(Error::invalid(
                    "counts",
                    format!("at most max_q = {}", a.seq_q),
                    n,
                ));
            }
            if !self.spec.ring && keys > a.seq_k as u64 {
                return Err(Error::invalid(
                    "counts",
                    format!(
                        "at most the free slots ({}) of sequence {b}",
                        a.seq_k - self.keys[b]
                    ),
                    n,
                ));
            }
            if let Some(p) = positions
                && p.get(b).map(|p| p.len()) != Some(n as usize)
            {
                return Err(Error::invalid(
                    "positions",
                    format!("{n} positions for sequence {b}"),
                    p.get(b).map_or(0, |p| p.len()),
                ));
            }
            lengths.push((n, keys as u32));
        }
        for (b, &n) in counts.iter().enumerate() {
            let sinks = a.sink_tokens;
            for i in 0..n {
                let idx = self.keys[b] + i;
                let slot = cache_slot(self.spec.ring, sinks, a.seq_k, idx) as u64;
                let src = b as u64 * a.seq_q as u64 + i as u64;
                let dst = b as u64 * a.seq_k as u64 + slot;
                encoder.copy_buffer_to_buffer(new_k, src * row_k, &self.k, dst * row_k, row_k);
                encoder.copy_buffer_to_buffer(new_v, src * row_v, &self.v, dst * row_v, row_v);
                let pos = positions.map_or(idx as i32, |p| p[b][i as usize]);
                ctx.queue().write_buffer(
                    &self.positions,
                    (b as u64 * a.seq_k as u64 + slot) * 4,
                    bytemuck::bytes_of(&pos),
                );
            }
        }
        let words: Vec<u32> = lengths.iter().flat_map(|&(q, k)| [q, k]).collect();
        ctx.queue()
            .write_buffer(&self.lengths, 0, bytemuck::cast_slice(&words));
        for (b, &(_, k)) in lengths.iter().enumerate() {
            self.keys[b] = k;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batch: u32, kv_heads: u32, capacity: u32) -> DecodeSpec {
        DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(batch)
                .with_heads(4 * kv_heads)
                .with_kv_heads(kv_heads)
                .with_head_dim(128)
                .with_seq_q(1)
                .with_seq_k(capacity),
        )
    }

    /// On a GPU the rule fills 512 workgroups with chunks of at least 32 keys; on a CPU
    /// adapter it keeps chunks of at least 256 keys and twice the host threads.
    #[test]
    fn the_split_rule_follows_the_device_type() {
        let gpu = wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan);
        let cpu = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan);
        // Llama-3-8B's 8 KV heads, one new query (4 query heads per KV head: one row block).
        assert_eq!(default_splits(&gpu, &spec(1, 8, 512)), 16);
        assert_eq!(default_splits(&gpu, &spec(1, 8, 1024)), 32);
        assert_eq!(default_splits(&gpu, &spec(1, 8, 8192)), 64);
        assert_eq!(default_splits(&gpu, &spec(1, 8, 32768)), 64);
        assert_eq!(default_splits(&gpu, &spec(4, 8, 512)), 16);
        assert_eq!(default_splits(&gpu, &spec(4, 8, 32768)), 16);
        assert_eq!(default_splits(&gpu, &spec(1, 8, 63)), 1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let cpu_want = (2 * threads).div_ceil(8).clamp(1, 8192 / 256);
        assert_eq!(default_splits(&cpu, &spec(1, 8, 8192)), cpu_want);
        assert_eq!(default_splits(&cpu, &spec(1, 8, 255)), 1);
    }
}
