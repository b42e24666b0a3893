//! The prefill hot path and sub-allocated buffers. wgpu's internal resource counters (the
//! `counters` feature, on for tests only through the dev-dependency) show that over 100 encodes
//! of one plan with one buffer set, after the first, no buffer, bind group, pipeline or shader
//! module is created, whether the plan opens its own pass (`encode`) or joins the caller's
//! (`encode_in_pass`). The buffers are ranges of one arena at aligned offsets and the output
//! sits at an offset of its own buffer, NaN-poisoned; the result is compared with the f64
//! reference under `posattn::harness::check::compare`'s rule (the f32 reference's own error
//! times a margin, so a kernel reading the wrong range cannot pass). Bad bindings are typed
//! errors naming the field, for prefill and decode plans alike. Counters hold live objects and
//! are read while the encoder (which keeps everything a pass uses alive) is still open. Vulkan only (lavapipe), and only the
//! RoPE head_dim-64 variant the conformance run compiles anyway.

use posattn::harness::check::{Case, Status, compare};
use posattn::harness::reference;
use posattn::{Attention, AttentionBuffers, AttentionSpec, Context, PositionEncoding, Rope};

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

fn buffer(ctx: &Context, size: u64) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn read(ctx: &Context, buf: &wgpu::Buffer, offset: u64, size: u64) -> Vec<f32> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, offset, &staging, 0, size);
    ctx.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec()
}

fn spec() -> AttentionSpec {
    AttentionSpec::default()
        .with_seq_len(96)
        .with_heads(4)
        .with_kv_heads(2)
        .with_position(PositionEncoding::Rope(Rope::new(10000.0)))
}

fn binding(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset,
        size: wgpu::BufferSize::new(size),
    }
}

#[test]
fn hundred_encodes_of_one_plan_from_an_arena_create_nothing() {
    let Some(ctx) = crate::common::vulkan("the prefill hot-path test") else {
        return;
    };
    let case = Case::new("hot_path_rope_gqa", spec());
    let s = &case.spec;
    let (q, k, v, pq, pk) = case.inputs();
    let align = ctx.device().limits().min_storage_buffer_offset_alignment as u64;
    let up = |n: u64| n.div_ceil(align) * align;
    // Q, K, V and both position tables as ranges of one arena, each at an aligned offset past
    // a leading gap (so an offset ignored would read the gap's zeros).
    let parts: [&[u8]; 5] = [
        bytemuck::cast_slice(&q),
        bytemuck::cast_slice(&k),
        bytemuck::cast_slice(&v),
        bytemuck::cast_slice(&pq),
        bytemuck::cast_slice(&pk),
    ];
    let mut offsets = Vec::new();
    let mut at = align;
    for p in parts {
        offsets.push(at);
        at = up(at + p.len() as u64);
    }
    let arena = buffer(&ctx, at);
    for (p, &o) in parts.iter().zip(&offsets) {
        ctx.queue().write_buffer(&arena, o, p);
    }
    let out_bytes = s.q_len() as u64 * 4;
    let out_at = align;
    let out = buffer(&ctx, out_at + up(out_bytes));
    let poison = vec![f32::NAN; s.q_len()];
    let r = |i: usize| binding(&arena, offsets[i], parts[i].len() as u64);
    let bufs = AttentionBuffers::new(r(0), r(1), r(2), binding(&out, out_at, out_bytes))
        .with_positions(r(3), r(4));

    let plan = Attention::new(&ctx, s).expect("plan");
    let mut first = None;
    let mut last_enc = None;
    for i in 0..100 {
        // The output is poisoned before every recorded call.
        ctx.queue()
            .write_buffer(&out, out_at, bytemuck::cast_slice(&poison));
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let before = live(&ctx);
        if i % 2 == 0 {
            plan.encode(&ctx, &mut enc, &bufs).expect("encode");
        } else {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("the caller's pass"),
                timestamp_writes: None,
            });
            plan.encode_in_pass(&ctx, &mut pass, &bufs)
                .expect("encode_in_pass");
        }
        let after = live(&ctx);
        match first {
            None => {
                // The first call makes the bind group: proof that the counters count.
                assert_eq!(after[1], before[1] + 1, "first encode: one bind group");
                assert_eq!(after[0], before[0], "first encode: no buffer");
                first = Some(after);
            }
            Some(_) => assert_eq!(before, after, "encode {i} created objects"),
        }
        last_enc = Some(enc);
    }
    // The 100th call (in the caller's pass) runs; its output is checked.
    ctx.queue().submit([last_enc.unwrap().finish()]);
    let gpu = read(&ctx, &out, out_at, out_bytes);
    let r64 = reference::attention::<f64>(s, &q, &k, &v, &pq, &pk);
    let r32 = reference::attention::<f32>(s, &q, &k, &v, &pq, &pk);
    let (status, err, _, bound) = compare(&gpu, &r64, &r32);
    println!(
        "arena bindings, 100 encodes: error {err:.2e}, bound {bound:.2e} on {}",
        ctx.describe()
    );
    assert_eq!(status, Status::Pass, "err {err:.3e} bound {bound:.3e}");
    assert!(ctx.take_uncaptured_errors().is_empty());
}

#[test]
fn bad_bindings_are_typed_errors_naming_the_field() {
    let Some(ctx) = crate::common::vulkan("the prefill hot-path test") else {
        return;
    };
    let s = spec();
    let plan = Attention::new(&ctx, &s).expect("plan");
    let align = ctx.device().limits().min_storage_buffer_offset_alignment as u64;
    let q_bytes = s.q_len() as u64 * 4;
    let kv_bytes = s.kv_len() as u64 * 4;
    let arena = buffer(&ctx, 4 * align + 2 * q_bytes + 2 * kv_bytes);
    let out = buffer(&ctx, 2 * align + 2 * q_bytes);
    let whole = |b| wgpu::BufferBinding {
        buffer: b,
        offset: 0,
        size: None,
    };
    let field = |b: AttentionBuffers| {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        plan.encode(&ctx, &mut enc, &b)
            .err()
            .and_then(|e| e.field())
    };
    let good = || {
        AttentionBuffers::new(
            binding(&arena, 0, q_bytes),
            binding(&arena, align * (q_bytes.div_ceil(align)), kv_bytes),
            whole(&arena),
            binding(&out, 0, q_bytes),
        )
    };
    // The same set less one thing.
    let mut b = good();
    if align > 4 {
        b.q.offset = 4;
        assert_eq!(field(b), Some("q"), "an offset off the device's alignment");
    }
    let mut b = good();
    b.k.offset = arena.size() - align;
    assert_eq!(field(b), Some("k"), "a range past the buffer's end");
    let mut b = good();
    b.v.size = wgpu::BufferSize::new(kv_bytes - 4);
    assert_eq!(field(b), Some("v"), "a range smaller than the tensor");
    let mut b = good();
    b.out = binding(
        &arena,
        arena.size() - align - q_bytes.div_ceil(align) * align,
        q_bytes,
    );
    assert_eq!(field(b), Some("out"), "out in a buffer the call reads");
    let b = good().with_lse(binding(&out, 0, s.lse_len() as u64 * 4));
    assert_eq!(field(b), Some("lse"), "lse overlapping out");
    let b = good().with_bias(whole(&out));
    assert_eq!(field(b), Some("bias"), "a bias the spec does not ask for");
    assert_eq!(field(good()), None, "the good set encodes");
    assert!(ctx.take_uncaptured_errors().is_empty());
}

/// The decode plan checks its bindings the same way (the cache at an offset of an arena).
#[test]
fn decode_bindings_at_offsets_are_checked() {
    use posattn::{DecodeBuffers, DecodePlan, DecodeSpec};
    let Some(ctx) = crate::common::vulkan("the prefill hot-path test") else {
        return;
    };
    let a = AttentionSpec::default()
        .with_batch(2)
        .with_seq_q(1)
        .with_seq_k(64)
        .with_heads(4)
        .with_kv_heads(2)
        .with_position(PositionEncoding::Rope(Rope::new(10000.0)));
    let plan = DecodePlan::new(&ctx, &DecodeSpec::new(a.clone())).expect("plan");
    let align = ctx.device().limits().min_storage_buffer_offset_alignment as u64;
    let kv = a.kv_len() as u64 * 4;
    let q_bytes = a.q_len() as u64 * 4;
    // K and V caches side by side in one arena, past an aligned gap.
    let arena = buffer(&ctx, align + 2 * kv.div_ceil(align) * align);
    let q = buffer(&ctx, q_bytes);
    let out = buffer(&ctx, q_bytes);
    let lengths = buffer(&ctx, 16);
    let k_at = align;
    let v_at = align + kv.div_ceil(align) * align;
    let good = || {
        DecodeBuffers::new(
            &q,
            binding(&arena, k_at, kv),
            binding(&arena, v_at, kv),
            &lengths,
            &out,
        )
    };
    let field = |b: DecodeBuffers| {
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        plan.encode(&ctx, &mut enc, &b)
            .err()
            .and_then(|e| e.field())
    };
    assert_eq!(field(good()), None, "caches at offsets of one arena encode");
    if align > 4 {
        let mut b = good();
        b.k_cache.offset += 4;
        assert_eq!(field(b), Some("k_cache"), "an offset off the alignment");
    }
    let mut b = good();
    b.v_cache.size = wgpu::BufferSize::new(kv - 4);
    assert_eq!(field(b), Some("v_cache"), "a cache range too small");
    let mut b = good();
    b.out = binding(&arena, 0, q_bytes);
    assert_eq!(field(b), Some("out"), "out in the caches' buffer");
    assert!(ctx.take_uncaptured_errors().is_empty());
}
