//! The embedding path: the caller owns the device, the buffers and the command encoder, and
//! submits; the crate records one pass and nothing else. Also checks the unfused baseline
//! against the same reference, since the benchmark compares against it.

use posattn::harness::Unfused;
use posattn::harness::check::{Case, Status, compare};
use posattn::harness::reference;
use posattn::{
    Attention, AttentionBuffers, AttentionSpec, Context, ContextOptions, PositionEncoding, Rope,
    RopeLayout, enumerate_adapters,
};
use wgpu::util::DeviceExt;

/// A device opened the way an application would, then wrapped.
fn caller_context() -> Option<Context> {
    let adapter = enumerate_adapters(&ContextOptions::default())
        .into_iter()
        .next()?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("application device"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .expect("device");
    Some(Context::from_device(device, queue))
}

fn run_encoded(ctx: &Context, case: &Case, unfused: bool) -> Vec<f32> {
    let (q, k, v, pq, pk) = case.inputs();
    let dev = ctx.device();
    let st = wgpu::BufferUsages::STORAGE;
    let init = |data: &[u8], usage| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: data,
            usage,
        })
    };
    let (qb, kb, vb) = (
        init(bytemuck::cast_slice(&q), st),
        init(bytemuck::cast_slice(&k), st),
        init(bytemuck::cast_slice(&v), st),
    );
    let (pqb, pkb) = (
        init(bytemuck::cast_slice(&pq), st),
        init(bytemuck::cast_slice(&pk), st),
    );
    // Poisoned output: an element the kernel does not write stays NaN.
    let poison = vec![f32::NAN; case.spec.q_len()];
    let out = init(
        bytemuck::cast_slice(&poison),
        st | wgpu::BufferUsages::COPY_SRC,
    );
    let size = out.size();
    let staging = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bufs = AttentionBuffers::new(&qb, &kb, &vb, &out)
        .with_positions_q(&pqb)
        .with_positions_k(&pkb);
    let mut enc = dev.create_command_encoder(&Default::default());
    if unfused {
        Unfused::new(ctx, &case.spec)
            .unwrap()
            .encode(ctx, &mut enc, &bufs)
            .unwrap();
    } else {
        Attention::new(ctx, &case.spec)
            .unwrap()
            .encode(ctx, &mut enc, &bufs)
            .unwrap();
    }
    enc.copy_buffer_to_buffer(&out, 0, &staging, 0, size);
    let sub = ctx.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    dev.poll(wgpu::PollType::Wait {
        submission_index: Some(sub),
        timeout: Some(std::time::Duration::from_secs(120)),
    })
    .expect("poll");
    let bytes = staging.get_mapped_range(..).expect("mapped").to_vec();
    bytemuck::cast_slice(&bytes).to_vec()
}

fn check(ctx: &Context, case: &Case, unfused: bool) {
    let gpu = run_encoded(ctx, case, unfused);
    let (q, k, v, pq, pk) = case.inputs();
    let r64 = reference::attention::<f64>(&case.spec, &q, &k, &v, &pq, &pk);
    let r32 = reference::attention::<f32>(&case.spec, &q, &k, &v, &pq, &pk);
    let (status, err, _, bound) = compare(&gpu, &r64, &r32);
    println!(
        "{} ({}) on {}: error {err:.2e}, bound {bound:.2e}",
        case.name,
        if unfused { "unfused" } else { "fused" },
        ctx.describe()
    );
    assert_eq!(status, Status::Pass, "{}", case.name);
}

fn cases() -> Vec<Case> {
    let rope = PositionEncoding::Rope(Rope::new(10000.0));
    vec![
        Case::new(
            "embed_rope_gqa_causal",
            AttentionSpec::default()
                .with_batch(2)
                .with_seq_len(70)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(rope.clone()),
        ),
        Case::new(
            "embed_rope_interleaved_bidir_q20_k90",
            AttentionSpec::default()
                .with_seq_q(20)
                .with_seq_k(90)
                .with_heads(2)
                .with_head_dim(32)
                .with_causal(false)
                .with_position(PositionEncoding::Rope(
                    Rope::new(10000.0).with_layout(RopeLayout::Interleaved),
                )),
        ),
        Case::new(
            "embed_none_causal_q90_k20_d128",
            AttentionSpec::default()
                .with_seq_q(90)
                .with_seq_k(20)
                .with_heads(2)
                .with_head_dim(128),
        ),
    ]
}

#[test]
fn fused_in_a_callers_encoder() {
    let Some(ctx) = caller_context() else {
        println!("no adapter: embedding test did not run");
        return;
    };
    for case in cases() {
        check(&ctx, &case, false);
    }
}

#[test]
fn unfused_baseline_matches_the_reference() {
    let Some(ctx) = caller_context() else {
        println!("no adapter: unfused test did not run");
        return;
    };
    for case in cases() {
        check(&ctx, &case, true);
    }
}

/// A caller's device carries no cooperative-matrix configurations: the context offers none
/// until told the adapter's, and then only if the device was opened with the features (this
/// application device was not, so even a 16×16 f16 configuration allows nothing), and a
/// cooperative form asked for anyway is `Unavailable` naming `score_tile`.
#[test]
fn cooperative_matrices_on_a_callers_device_follow_its_features() {
    let Some(mut ctx) = caller_context() else {
        println!("no adapter: cooperative-matrix embedding test did not run");
        return;
    };
    assert_eq!(ctx.coop_score_tile(), None);
    let f16_16 = wgpu::CooperativeMatrixProperties {
        m_size: 16,
        n_size: 16,
        k_size: 16,
        ab_type: wgpu::CooperativeScalarType::F16,
        cr_type: wgpu::CooperativeScalarType::F32,
        saturating_accumulation: false,
    };
    let has_feature = ctx
        .device()
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    assert!(!has_feature, "the application device did not ask for it");
    assert_eq!(ctx.set_cooperative_matrix_properties(&[f16_16]), None);
    let e = ctx.set_score_tile(posattn::ScoreTile::Coop16).unwrap_err();
    assert_eq!(e.field(), Some("score_tile"));
    assert_eq!(ctx.score_tile(), posattn::ScoreTile::Rows);
}
