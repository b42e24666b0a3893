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

use std::sync::Mutex;

use crate::attention::check_buffer;
use crate::context::Context;
use crate::dtype::{Dtype, HalfForm};
use crate::encoding::masks::Extrapolation;
use crate::error::{Error, Result};
use crate::kernel::abi::{DecodeParams, Family, PosKind};
use crate::kernel::storage::StorageForm;
use crate::kernel::{
    DECODE_WG, KernelKey, KeyRotation, decode_lane_plan, decode_rows, decode_workgroup_bytes,
};
use crate::plan::lower;
use crate::spec::AttentionSpec;

/// What a decode plan is built for.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeSpec {
    /// Heads, head size, encoding, masks and the rest, with `seq_q` the most new queries per
    /// sequence and `seq_k` the cache capacity. `bias` and `extrapolation` are not available in
    /// decode plans.
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
}

impl DecodeSpec {
    pub fn new(attention: AttentionSpec) -> Self {
        DecodeSpec {
            attention,
            ring: false,
            keys_rotated: false,
            splits: None,
            subgroups: true,
        }
    }

    pub fn with_ring(mut self) -> Self {
        self.ring = true;
        self
    }

    pub fn with_keys_rotated(mut self) -> Self {
        self.keys_rotated = true;
        self
    }

    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = Some(splits);
        self
    }

    /// Whether subgroup operations may be used (see [`DecodeSpec::subgroups`]).
    pub fn with_subgroups(mut self, subgroups: bool) -> Self {
        self.subgroups = subgroups;
        self
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

    /// Query rows per workgroup ([`decode_rows`] of [`DecodeSpec::group_rows`]).
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
        if a.bias.is_some() {
            return Err(Error::invalid(
                "bias",
                "no caller bias (not available in decode plans)",
                "a bias layout",
            ));
        }
        if a.extrapolation != Extrapolation::None {
            return Err(Error::invalid(
                "extrapolation",
                "none (ReRoPE, LM-Infinite and cache-index positions are not available in decode plans)",
                format!("{:?}", a.extrapolation),
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
pub fn target_workgroups(info: &wgpu::AdapterInfo) -> u32 {
    if info.device_type == wgpu::DeviceType::Cpu {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        2 * threads
    } else {
        512
    }
}

/// Keys one chunk holds at least (below this a chunk's fixed cost outweighs its parallelism).
pub const MIN_KEYS_PER_SPLIT: u32 = 256;

/// The split rule: enough chunks that batch × kv_heads × row blocks × splits reaches
/// [`target_workgroups`], and no more than capacity / [`MIN_KEYS_PER_SPLIT`] (at least 1).
pub fn default_splits(info: &wgpu::AdapterInfo, spec: &DecodeSpec) -> u32 {
    let a = &spec.attention;
    let base = a.batch * a.num_kv_heads * spec.row_blocks();
    let want = target_workgroups(info).div_ceil(base.max(1));
    want.clamp(1, (a.seq_k / MIN_KEYS_PER_SPLIT).max(1))
}

/// Device buffers of one decode step (layouts in the module docs). Every buffer needs
/// `BufferUsages::STORAGE`.
#[derive(Clone, Copy)]
pub struct DecodeBuffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    /// Positions per slot; `None`: slot index (not for a ring cache).
    pub positions: Option<&'a wgpu::Buffer>,
    /// (new queries, keys) per sequence, u32.
    pub lengths: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
}

/// Bind groups kept per buffer set.
const BIND_GROUP_CACHE: usize = 8;

type BufferSet = [wgpu::Buffer; 6];

/// A decode plan on one context: pipelines, tables and split-KV scratch made once.
pub struct DecodePlan {
    spec: DecodeSpec,
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
    bind_groups: Mutex<Vec<(BufferSet, wgpu::BindGroup)>>,
}

impl DecodePlan {
    /// Validates `spec` against itself and the device, compiles (or reuses) the pipelines and
    /// makes the tables and the split-KV scratch.
    pub fn new(ctx: &Context, spec: &DecodeSpec) -> Result<Self> {
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
        // Lanes per key and their sum: from the adapter's subgroup sizes where the device has
        // subgroups (and the spec allows them).
        let subgroups =
            spec.subgroups && ctx.device().features().contains(wgpu::Features::SUBGROUP);
        let (lanes, lane_reduce) = decode_lane_plan(a.head_dim, subgroups, ctx.adapter_info());
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
        .with_storage(storage);
        let wg_bytes = decode_workgroup_bytes(&key);
        if wg_bytes > limits.max_compute_workgroup_storage_size {
            return Err(Error::unavailable(
                "workgroup storage bytes",
                wg_bytes,
                limits.max_compute_workgroup_storage_size,
            ));
        }
        let pipeline = ctx.pipeline_with(key, plan.custom.as_ref())?;
        let reduce = if splits > 1 {
            Some(ctx.pipeline(KernelKey::decode_reduce(a.head_dim).with_storage(storage))?)
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
        let (params, dparams, aux, default_positions, partials) =
            ctx.scoped("making the decode plan's buffers", || {
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
            })?;
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
            bind_groups: Mutex::new(Vec::new()),
        })
    }

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

    fn check_buffers(&self, bufs: &DecodeBuffers) -> Result<()> {
        let a = &self.spec.attention;
        let d = a.dtypes;
        let bytes = |n: usize, t: Dtype| n as u64 * t.size() as u64;
        check_buffer("q", bufs.q, bytes(a.q_len(), d.q))?;
        check_buffer("out", bufs.out, bytes(a.q_len(), d.out))?;
        check_buffer("k_cache", bufs.k_cache, bytes(a.kv_len(), d.k))?;
        check_buffer("v_cache", bufs.v_cache, bytes(a.kv_len(), d.v))?;
        check_buffer("lengths", bufs.lengths, self.lengths_bytes())?;
        match bufs.positions {
            Some(p) => check_buffer("positions", p, a.batch as u64 * a.seq_k as u64 * 4),
            None if self.spec.ring => Err(Error::invalid(
                "positions",
                "a positions buffer (a ring cache reuses slots, so slot index is no position)",
                "none",
            )),
            None => Ok(()),
        }
    }

    /// The bind group of a buffer set: made (inside an error scope) on its first use, then
    /// reused.
    fn bind_group(&self, ctx: &Context, bufs: &DecodeBuffers) -> Result<wgpu::BindGroup> {
        let positions = bufs.positions.unwrap_or(&self.default_positions);
        let set: BufferSet = [
            bufs.q.clone(),
            bufs.k_cache.clone(),
            bufs.v_cache.clone(),
            positions.clone(),
            bufs.lengths.clone(),
            bufs.out.clone(),
        ];
        let mut cache = self.bind_groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, bg)) = cache.iter().find(|(s, _)| *s == set) {
            return Ok(bg.clone());
        }
        let bg = ctx.scoped("creating the decode bind group", || {
            let entries = [
                ("q_buf", bufs.q),
                ("k_cache", bufs.k_cache),
                ("v_cache", bufs.v_cache),
                ("o_buf", bufs.out),
                ("pos_k", positions),
                ("lengths", bufs.lengths),
                ("aux", &self.aux),
                ("params", &self.params),
                ("dparams", &self.dparams),
                ("partials", &self.partials),
            ]
            .iter()
            .map(|(name, b)| wgpu::BindGroupEntry {
                binding: Family::Decode.slot(name),
                resource: b.as_entire_binding(),
            })
            .collect::<Vec<_>>();
            ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("posattn decode"),
                layout: ctx.bind_group_layout(Family::Decode),
                entries: &entries,
            })
        })?;
        if cache.len() == BIND_GROUP_CACHE {
            cache.remove(0);
        }
        cache.push((set, bg.clone()));
        Ok(bg)
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
        self.check_buffers(bufs)?;
        let bg = self.bind_group(ctx, bufs)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("posattn decode"),
            timestamp_writes: None,
        });
        pass.set_bind_group(0, &bg, &[]);
        pass.set_pipeline(&self.pipeline);
        let [x, y, z] = self.grid;
        pass.dispatch_workgroups(x, y, z);
        if let Some(reduce) = &self.reduce {
            pass.set_pipeline(reduce);
            let [x, y, z] = self.reduce_grid;
            pass.dispatch_workgroups(x, y, z);
        }
        Ok(())
    }

    /// Runs one step on host data: uploads the cache, positions and lengths, dispatches, waits
    /// and reads the output back. The output starts as NaN, so rows the kernel does not write
    /// (past a sequence's query count) come back NaN.
    pub fn run(
        &self,
        ctx: &Context,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        positions: Option<&[i32]>,
        lengths: &[(u32, u32)],
    ) -> Result<Vec<f32>> {
        let a = &self.spec.attention;
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
        let out = ctx.scoped("running decode", || -> Result<wgpu::Buffer> {
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
            let poison = a.dtypes.out.encode(&vec![f32::NAN; a.q_len()]);
            let out = ctx.buffer_init("posattn out", &poison, st | wgpu::BufferUsages::COPY_SRC);
            let mut enc = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("posattn decode run"),
                });
            self.encode(
                ctx,
                &mut enc,
                &DecodeBuffers {
                    q: &qb,
                    k_cache: &kb,
                    v_cache: &vb,
                    positions: pb.as_ref(),
                    lengths: &lb,
                    out: &out,
                },
            )?;
            ctx.queue().submit([enc.finish()]);
            Ok(out)
        })??;
        let out_dt = a.dtypes.out;
        let bytes = ctx.read_buffer(&out, (a.q_len() * out_dt.size()) as u64)?;
        out_dt.decode("out", &bytes)
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
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub positions: wgpu::Buffer,
    pub lengths: wgpu::Buffer,
    keys: Vec<u32>,
}

impl KvCache {
    /// Zeroed K/V caches, positions and lengths for `plan`'s maxima, every sequence empty.
    pub fn new(ctx: &Context, plan: &DecodePlan) -> Result<Self> {
        let spec = plan.spec().clone();
        let a = &spec.attention;
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let (k, v, positions, lengths) = ctx.scoped("allocating a KV cache", || {
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
        })?;
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
    pub fn buffers<'a>(&'a self, q: &'a wgpu::Buffer, out: &'a wgpu::Buffer) -> DecodeBuffers<'a> {
        DecodeBuffers {
            q,
            k_cache: &self.k,
            v_cache: &self.v,
            positions: Some(&self.positions),
            lengths: &self.lengths,
            out,
        }
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
