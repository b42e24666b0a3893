//! Generation through `KvCache`: tokens appended one at a time for a few hundred steps, every
//! step's output compared with the f64 reference on the whole prefix (tolerance rule of
//! `posattn::harness::check`, output poisoned with NaN before each step). The same loop proves
//! the hot path: wgpu's internal resource counters (the `counters` feature, turned on for tests
//! only through the dev-dependency) show that after the first step, encoding a step creates no
//! buffer, bind group, pipeline or shader module. Counters hold live objects and are read
//! while the step's encoder (which keeps everything a pass uses alive) is still open.
//! Also: the typed errors of bad decode input. Vulkan only (lavapipe): one small variant.

use posattn::decode::{DecodeBuffers, DecodePlan, DecodeSpec, KvCache};
use posattn::harness::check::Status;
use posattn::harness::decode::History;
use posattn::{
    AttentionSpec, Context, PositionEncoding, Rope, RopeConfig, RopeLayout, RopeScaling, Window,
};

fn storage(ctx: &Context, bytes: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn read(ctx: &Context, buf: &wgpu::Buffer) -> Vec<f32> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    ctx.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec()
}

/// (buffers, bind groups, compute pipelines, shader modules) alive now.
fn live(ctx: &Context) -> [isize; 4] {
    let h = ctx.device().get_internal_counters().hal;
    [
        h.buffers.read(),
        h.bind_groups.read(),
        h.compute_pipelines.read(),
        h.shader_modules.read(),
    ]
}

/// A position encoding for the context length (largest position + 1) of the step about to run.
type Retable<'a> = &'a dyn Fn(u32) -> PositionEncoding;

/// Appends `steps` tokens one at a time to two sequences (the second starting later), checks
/// every step, and checks the hot path's counters; returns the number of compared steps.
fn generate(ctx: &Context, spec: DecodeSpec, steps: u32) -> u32 {
    generate_with(ctx, spec, steps, None)
}

/// `generate`, with the plan's encoding replaced before each step by `retable` at the longer
/// sequence's length (`DecodePlan::set_position`) and each step checked against the reference
/// with that encoding. Where `retable` gives a table other than the first step's, the output is
/// also checked to fail against the first step's table, which proves the new table is in use.
fn generate_with(ctx: &Context, spec: DecodeSpec, steps: u32, retable: Option<Retable>) -> u32 {
    let mut spec = spec;
    let a = spec.attention.clone();
    let mut plan = DecodePlan::new(ctx, &spec).expect("plan");
    let first_position = spec.attention.position.clone();
    let mut cache = KvCache::new(ctx, &plan).expect("cache");
    let row = (a.num_kv_heads * a.head_dim) as usize;
    let qrow = (a.num_heads * a.head_dim) as usize;
    // The whole history up front: sequence 1 starts at step 10.
    let total = [steps, steps - 10];
    let history = History::new(&spec, &total, 0, 99);
    let q = storage(ctx, a.q_len() as u64 * 4);
    let new_k = storage(ctx, (a.batch as usize * row * 4) as u64);
    let new_v = storage(ctx, (a.batch as usize * row * 4) as u64);
    let out = storage(ctx, a.q_len() as u64 * 4);
    let poison = vec![f32::NAN; a.q_len()];
    let mut first_encode = None;
    let mut compared = 0;
    for step in 0..steps {
        let counts = [1, u32::from(step >= 10)];
        let mut kq = vec![0.0f32; a.batch as usize * row];
        let mut vq = vec![0.0f32; a.batch as usize * row];
        let mut qs = vec![0.0f32; a.q_len()];
        for b in 0..2 {
            if counts[b] == 0 {
                continue;
            }
            let t = cache.keys()[b] as usize;
            kq[b * row..(b + 1) * row].copy_from_slice(&history.k[b][t * row..(t + 1) * row]);
            vq[b * row..(b + 1) * row].copy_from_slice(&history.v[b][t * row..(t + 1) * row]);
            // A fresh query per step, drawn from the history's K rows (any values do).
            let src = &history.k[b][t * row..(t + 1) * row];
            for h in 0..a.num_heads as usize {
                let kvh = h / (a.num_heads / a.num_kv_heads) as usize;
                let d = a.head_dim as usize;
                qs[b * qrow + h * d..b * qrow + (h + 1) * d]
                    .copy_from_slice(&src[kvh * d..(kvh + 1) * d]);
            }
        }
        ctx.queue()
            .write_buffer(&new_k, 0, bytemuck::cast_slice(&kq));
        ctx.queue()
            .write_buffer(&new_v, 0, bytemuck::cast_slice(&vq));
        ctx.queue().write_buffer(&q, 0, bytemuck::cast_slice(&qs));
        ctx.queue()
            .write_buffer(&out, 0, bytemuck::cast_slice(&poison));
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        cache
            .append(ctx, &mut enc, &new_k, &new_v, &counts, None)
            .expect("append");
        if let Some(retable) = retable {
            let len = cache.keys().iter().copied().max().unwrap_or(0);
            let position = retable(len);
            plan.set_position(ctx, position.clone())
                .expect("set_position");
            spec.attention.position = position;
        }
        let before = live(ctx);
        plan.encode(ctx, &mut enc, &cache.buffers(&q, &out))
            .expect("encode");
        let after = live(ctx);
        match first_encode {
            None => {
                // The first call makes the bind group: proof that the counters count.
                assert_eq!(after[1], before[1] + 1, "first step: one bind group");
                first_encode = Some(after);
            }
            Some(_) => assert_eq!(before, after, "step {step}: encode created objects"),
        }
        ctx.queue().submit([enc.finish()]);
        let gpu = read(ctx, &out);
        // Compare both sequences' rows with the reference on their whole prefix.
        let mut hist = History {
            k: history.k.clone(),
            v: history.v.clone(),
            pos: history.pos.clone(),
            q: qs.clone(),
            bias: None,
        };
        hist.q.resize(a.q_len(), 0.0);
        let lengths: Vec<(u32, u32)> = (0..2).map(|b| (counts[b], cache.keys()[b])).collect();
        let (status, err, _, bound) =
            posattn::harness::decode::check_output(&spec, &hist, &lengths, &gpu);
        assert_eq!(
            status,
            Status::Pass,
            "step {step}: err {err:.3e} bound {bound:.3e}"
        );
        if retable.is_some() && spec.attention.position != first_position {
            let mut stale = spec.clone();
            stale.attention.position = first_position.clone();
            let (status, err, _, bound) =
                posattn::harness::decode::check_output(&stale, &hist, &lengths, &gpu);
            assert!(
                matches!(status, Status::Fail(_)),
                "step {step}: the output also matches the first table (err {err:.3e} bound {bound:.3e})"
            );
        }
        compared += 1;
    }
    compared
}

fn small(capacity: u32) -> AttentionSpec {
    AttentionSpec::default()
        .with_batch(2)
        .with_seq_q(1)
        .with_seq_k(capacity)
        .with_heads(4)
        .with_kv_heads(2)
        .with_position(PositionEncoding::Rope(Rope::new(10000.0)))
}

#[test]
fn generation_step_by_step_matches_the_reference_and_allocates_nothing() {
    let Some(ctx) = crate::common::vulkan("decode generation") else {
        return;
    };
    let n = generate(&ctx, DecodeSpec::new(small(320)), 300);
    assert_eq!(n, 300);
    // Forced split: the reduce pass joins the same loop.
    let n = generate(&ctx, DecodeSpec::new(small(320)).with_splits(3), 120);
    assert_eq!(n, 120);
}

/// Dynamic NTK crossing its threshold mid-generation: the table is rebuilt for the current
/// length before every step (it is the initial one up to max_position_embeddings = 96, then grows
/// its base), and the plan follows it without recompiling or allocating.
#[test]
fn dynamic_ntk_follows_the_context_length_through_its_threshold() {
    let Some(ctx) = crate::common::vulkan("decode generation") else {
        return;
    };
    let config = RopeConfig {
        theta: 10000.0,
        head_dim: 64,
        partial_rotary_factor: 1.0,
        scaling: RopeScaling::Dynamic {
            factor: 4.0,
            max_position_embeddings: 96,
        },
        logn_train_len: None,
    };
    let table = |len: u32| {
        PositionEncoding::Rope(
            config
                .to_rope(RopeLayout::Half, Some(len as u64))
                .expect("dynamic table"),
        )
    };
    let spec = DecodeSpec::new(small(200).with_position(table(1)));
    let n = generate_with(&ctx, spec.clone(), 180, Some(&table));
    assert_eq!(n, 180);
    // A different kind of encoding, or a table of another size, is a typed error.
    let mut plan = DecodePlan::new(&ctx, &spec).unwrap();
    let alibi = PositionEncoding::Alibi(posattn::Alibi {
        slopes: posattn::AlibiSlopes::Standard,
        form: posattn::AlibiForm::Causal,
    });
    let e = plan.set_position(&ctx, alibi).unwrap_err();
    assert_eq!(e.field(), Some("position"));
    let half_rotary = RopeConfig {
        partial_rotary_factor: 0.5,
        ..config.clone()
    };
    let e = plan
        .set_position(
            &ctx,
            PositionEncoding::Rope(half_rotary.to_rope(RopeLayout::Half, None).unwrap()),
        )
        .unwrap_err();
    assert_eq!(e.field(), Some("position"));
    // Keys stored rotated carry their table.
    let mut rotated = DecodePlan::new(&ctx, &spec.clone().with_keys_rotated()).unwrap();
    let e = rotated.set_position(&ctx, table(500)).unwrap_err();
    assert_eq!(e.field(), Some("position"));
}

#[test]
fn ring_generation_with_sinks_matches_the_reference() {
    let Some(ctx) = crate::common::vulkan("decode generation") else {
        return;
    };
    let a = small(4 + 48 + 1)
        .with_window(Window::recent(48))
        .with_sink_tokens(4);
    let n = generate(&ctx, DecodeSpec::new(a).with_ring(), 250);
    assert_eq!(n, 250);
}

#[test]
fn bad_decode_input_is_a_typed_error_naming_the_field() {
    let Some(ctx) = crate::common::vulkan("decode generation") else {
        return;
    };
    let field = |r: posattn::Result<DecodePlan>| r.err().and_then(|e| e.field());
    // Split count 0.
    let s = DecodeSpec::new(small(64)).with_splits(0);
    assert_eq!(field(DecodePlan::new(&ctx, &s)), Some("splits"));
    // A ring cache too small for its window.
    let s = DecodeSpec::new(small(40).with_window(Window::recent(48))).with_ring();
    assert_eq!(field(DecodePlan::new(&ctx, &s)), Some("capacity"));
    // A ring cache needs a window.
    let s = DecodeSpec::new(small(40)).with_ring();
    assert_eq!(field(DecodePlan::new(&ctx, &s)), Some("window"));
    // An extrapolation method rotates the stored keys itself: not with keys stored rotated.
    let s = DecodeSpec::new(
        small(64).with_extrapolation(posattn::Extrapolation::ReRope {
            window: 8,
            leak: None,
        }),
    )
    .with_keys_rotated();
    assert_eq!(field(DecodePlan::new(&ctx, &s)), Some("extrapolation"));

    let plan = DecodePlan::new(&ctx, &DecodeSpec::new(small(64))).unwrap();
    // Host lengths beyond the capacity, queries beyond max_q or the keys, wrong count.
    let f = |l: &[(u32, u32)]| plan.check_lengths(l).err().and_then(|e| e.field());
    assert_eq!(f(&[(1, 65), (1, 1)]), Some("lengths.keys"));
    assert_eq!(f(&[(2, 10), (1, 1)]), Some("lengths.queries"));
    assert_eq!(f(&[(1, 0), (1, 1)]), Some("lengths.queries"));
    assert_eq!(f(&[(1, 10)]), Some("lengths"));
    assert!(plan.check_lengths(&[(1, 64), (0, 0)]).is_ok());

    let a = &plan.spec().attention;
    let q = storage(&ctx, a.q_len() as u64 * 4);
    let out = storage(&ctx, a.q_len() as u64 * 4);
    let k = storage(&ctx, a.kv_len() as u64 * 4);
    let v = storage(&ctx, a.kv_len() as u64 * 4);
    let small_k = storage(&ctx, a.kv_len() as u64 * 4 - 4);
    let lengths = storage(&ctx, 16);
    let short_lengths = storage(&ctx, 8);
    let bufs = DecodeBuffers::new(&q, &k, &v, &lengths, &out);
    let encode = |b: DecodeBuffers| {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        plan.encode(&ctx, &mut enc, &b)
            .err()
            .and_then(|e| e.field())
    };
    assert_eq!(encode(bufs.clone()), None);
    // A lengths buffer too short; a cache too small for the plan.
    assert_eq!(
        encode({
            let mut b = bufs.clone();
            b.lengths = short_lengths.as_entire_buffer_binding();
            b
        }),
        Some("lengths")
    );
    assert_eq!(
        encode({
            let mut b = bufs.clone();
            b.k_cache = small_k.as_entire_buffer_binding();
            b
        }),
        Some("k_cache")
    );
    assert_eq!(
        encode({
            let mut b = bufs.clone();
            b.v_cache = small_k.as_entire_buffer_binding();
            b
        }),
        Some("v_cache")
    );

    // The caller's bias: a buffer the plan does not ask for; a plan that asks for one, without
    // it, with one too short, and on the host with the wrong count.
    let bias = storage(&ctx, 4 * 2 * 64 * 4);
    assert_eq!(encode(bufs.clone().with_bias(&bias)), Some("bias"));
    let biased = DecodeSpec::new(small(64).with_bias(posattn::BiasLayout::default()));
    let bplan = DecodePlan::new(&ctx, &biased).unwrap();
    let a = &bplan.spec().attention;
    let need = posattn::spec::bias_len(a) as u64 * 4;
    let (full, short) = (storage(&ctx, need), storage(&ctx, need - 4));
    let bencode = |b: DecodeBuffers| {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        bplan
            .encode(&ctx, &mut enc, &b)
            .err()
            .and_then(|e| e.field())
    };
    assert_eq!(bencode(bufs.clone()), Some("bias"));
    assert_eq!(bencode(bufs.clone().with_bias(&short)), Some("bias"));
    assert_eq!(bencode(bufs.clone().with_bias(&full)), None);
    let zeros = |n: usize| vec![0.0f32; n];
    let r = bplan.run_with_bias(
        &ctx,
        &zeros(a.q_len()),
        &zeros(a.kv_len()),
        &zeros(a.kv_len()),
        None,
        &[(1, 1), (1, 1)],
        Some(&zeros(posattn::spec::bias_len(a) - 1)),
    );
    assert_eq!(r.err().and_then(|e| e.field()), Some("bias"));

    // A ring cache without positions.
    let ring = DecodeSpec::new(small(64).with_window(Window::recent(32))).with_ring();
    let ring_plan = DecodePlan::new(&ctx, &ring).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let e = ring_plan.encode(&ctx, &mut enc, &bufs).unwrap_err();
    assert_eq!(e.field(), Some("positions"));
}

/// Lengths past the capacity written straight into the device buffer: the kernel clamps them
/// and reads nothing out of bounds; the result is the clamped step's (capacity keys).
#[test]
fn device_lengths_past_the_capacity_are_clamped() {
    let Some(ctx) = crate::common::vulkan("decode generation") else {
        return;
    };
    let spec = DecodeSpec::new(small(100));
    let plan = DecodePlan::new(&ctx, &spec).unwrap();
    let history = History::new(&spec, &[100, 100], 0, 5);
    let (k, v, p) = history.cache(&spec);
    let a = &spec.attention;
    let mk = |data: &[u8]| {
        let b = storage(&ctx, data.len() as u64);
        ctx.queue().write_buffer(&b, 0, data);
        b
    };
    let (qb, kb, vb, pb) = (
        mk(bytemuck::cast_slice(&history.q)),
        mk(bytemuck::cast_slice(&k)),
        mk(bytemuck::cast_slice(&v)),
        mk(bytemuck::cast_slice(&p)),
    );
    let lengths = mk(bytemuck::cast_slice(&[1u32, 1_000_000, 7, u32::MAX]));
    let out = mk(bytemuck::cast_slice(&vec![f32::NAN; a.q_len()]));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    plan.encode(
        &ctx,
        &mut enc,
        &DecodeBuffers::new(&qb, &kb, &vb, &lengths, &out).with_positions(&pb),
    )
    .unwrap();
    ctx.queue().submit([enc.finish()]);
    let gpu = read(&ctx, &out);
    // Sequence 0: 1 query over 100 keys; sequence 1: queries clamped to max_q = 1.
    let (status, err, _, bound) =
        posattn::harness::decode::check_output(&spec, &history, &[(1, 100), (1, 100)], &gpu);
    assert_eq!(status, Status::Pass, "err {err:.3e} bound {bound:.3e}");
    assert!(ctx.take_uncaptured_errors().is_empty());
}
