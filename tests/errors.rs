//! Every invalid request gets a typed error naming the field, on the CPU side before any GPU work
//! where possible, and never a panic (wgpu's default handler is never reached).

use posattn::{
    Alibi, AlibiForm, AlibiSlopes, Attention, AttentionBuffers, AttentionSpec, BiasLayout, Context,
    ContextOptions, Error, Extrapolation, Fire, Kerple, KerpleForm, PositionEncoding, Rope,
    Sandwich, T5Bias, Window, Xpos, enumerate_adapters,
};

fn base() -> AttentionSpec {
    AttentionSpec::default().with_seq_len(8).with_heads(4)
}

fn invalid_field(r: Result<(), Error>) -> &'static str {
    match r {
        Err(Error::Invalid { field, .. }) => field,
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn shape_errors_name_their_field() {
    let cases: Vec<(AttentionSpec, &str)> = vec![
        (base().with_batch(0), "batch"),
        (base().with_seq_q(0), "seq_q"),
        (base().with_seq_k(0), "seq_k"),
        (
            {
                let mut s = base();
                s.num_heads = 0;
                s
            },
            "num_heads",
        ),
        (base().with_kv_heads(0), "num_kv_heads"),
        (base().with_kv_heads(3), "num_kv_heads"),
        (base().with_head_dim(0), "head_dim"),
        (base().with_head_dim(72), "head_dim"),
        (base().with_head_dim(512), "head_dim"),
        (base().with_scale(f64::NAN), "scale"),
        (base().with_logn(1), "logn_train_len"),
        (base().with_scale(f64::INFINITY), "scale"),
        (
            base().with_position(PositionEncoding::Rope(Rope::new(f64::NAN))),
            "rope.theta",
        ),
        (
            base().with_position(PositionEncoding::Rope(Rope::new(-1.0))),
            "rope.theta",
        ),
        (
            base().with_position(PositionEncoding::Rope(Rope::new(1e4).with_rotary_dim(7))),
            "rope.rotary_dim",
        ),
        (
            base().with_position(PositionEncoding::Rope(Rope::new(1e4).with_rotary_dim(80))),
            "rope.rotary_dim",
        ),
        (
            base().with_position(PositionEncoding::Rope(
                Rope::new(1e4).with_attention_factor(f64::INFINITY),
            )),
            "rope.attention_factor",
        ),
        (
            base().with_position(PositionEncoding::Rope(
                Rope::new(1e4).with_inv_freq(vec![1.0; 3]),
            )),
            "rope.inv_freq",
        ),
        (
            base().with_position(PositionEncoding::Rope(
                Rope::new(1e4).with_inv_freq(vec![f64::NAN; 32]),
            )),
            "rope.inv_freq",
        ),
        (
            base().with_position(PositionEncoding::Alibi(Alibi {
                slopes: AlibiSlopes::Custom(vec![0.5; 3]),
                form: AlibiForm::Causal,
            })),
            "alibi.slopes",
        ),
        (
            base().with_position(PositionEncoding::Alibi(Alibi {
                slopes: AlibiSlopes::Custom(vec![0.5, 0.5, f32::NAN, 0.5]),
                form: AlibiForm::Causal,
            })),
            "alibi.slopes",
        ),
        (
            base().with_position(PositionEncoding::Xpos(Xpos::default().with_scale_base(0.0))),
            "xpos.scale_base",
        ),
    ];
    for (spec, field) in cases {
        assert_eq!(invalid_field(spec.validate()), field, "{spec:?}");
    }
}

fn rope() -> PositionEncoding {
    PositionEncoding::Rope(Rope::new(1e4))
}

fn t5(num_buckets: u32, max_distance: u32, table: usize) -> PositionEncoding {
    PositionEncoding::T5(T5Bias {
        num_buckets,
        max_distance,
        bidirectional: true,
        table: vec![0.5; table],
    })
}

fn fire(w: usize, heads: usize) -> Fire {
    Fire::new(
        vec![0.1; w],
        vec![0.1; w],
        vec![0.1; w * heads],
        vec![0.1; heads],
    )
}

#[test]
fn bias_mask_and_extrapolation_errors_name_their_field() {
    let rerope = |window, leak| Extrapolation::ReRope { window, leak };
    let cases: Vec<(AttentionSpec, &str)> = vec![
        (base().with_position(t5(32, 128, 100)), "t5.table"),
        (base().with_position(t5(2, 128, 8)), "t5.num_buckets"),
        (base().with_position(t5(32, 8, 128)), "t5.max_distance"),
        (
            base().with_position(t5(32, 1 << 20, 128)),
            "t5.max_distance",
        ),
        (
            base().with_position(PositionEncoding::Kerple(Kerple {
                form: KerpleForm::Log,
                p: vec![1.0; 3],
                a: vec![1.0; 4],
            })),
            "kerple.p",
        ),
        (
            base().with_position(PositionEncoding::Kerple(Kerple {
                form: KerpleForm::Power,
                p: vec![1.0; 4],
                a: vec![1.0, f32::NAN, 1.0, 1.0],
            })),
            "kerple.a",
        ),
        (
            base().with_position(PositionEncoding::Sandwich(Sandwich { dim: Some(7) })),
            "sandwich.dim",
        ),
        (
            base().with_position(PositionEncoding::Fire(fire(0, 4))),
            "fire.w1",
        ),
        (
            base().with_position(PositionEncoding::Fire({
                let mut f = fire(32, 4);
                f.b2 = vec![0.0; 3];
                f
            })),
            "fire.b2",
        ),
        (
            base().with_position(PositionEncoding::Fire({
                let mut f = fire(32, 4);
                f.w2 = vec![0.0; 32];
                f
            })),
            "fire.w2",
        ),
        (
            base().with_position(PositionEncoding::Fire({
                let mut f = fire(32, 4);
                f.c = f32::INFINITY;
                f
            })),
            "fire.c",
        ),
        (base().with_softcap(0.0), "softcap"),
        (base().with_softcap(f64::NAN), "softcap"),
        (base().with_sink_logits(vec![0.0; 3]), "sink_logits"),
        (
            base().with_sink_logits(vec![0.0, 0.0, f32::NAN, 0.0]),
            "sink_logits",
        ),
        // Sinks mean nothing without a window.
        (base().with_sink_tokens(4), "sink_tokens"),
        (
            base().with_window(Window {
                left: Some(u32::MAX),
                right: None,
            }),
            "window.left",
        ),
        // Extrapolation methods rotate: they need RoPE.
        (base().with_extrapolation(rerope(16, None)), "extrapolation"),
        (
            base()
                .with_position(PositionEncoding::Xpos(Xpos::default()))
                .with_extrapolation(rerope(16, None)),
            "extrapolation",
        ),
        (
            base()
                .with_position(PositionEncoding::Alibi(Alibi {
                    slopes: AlibiSlopes::Standard,
                    form: AlibiForm::Causal,
                }))
                .with_streaming(4, 16, true),
            "extrapolation",
        ),
        (
            base()
                .with_position(rope())
                .with_extrapolation(rerope(0, None)),
            "extrapolation.window",
        ),
        (
            base()
                .with_position(rope())
                .with_extrapolation(rerope(16, Some(0.5))),
            "extrapolation.leak",
        ),
        // LM-Infinite and StreamingLLM's cache index need sinks and a left window.
        (
            base()
                .with_position(rope())
                .with_extrapolation(Extrapolation::LmInfinite { limit: 32 }),
            "extrapolation",
        ),
        (
            base().with_position(rope()).with_streaming(0, 16, true),
            "extrapolation",
        ),
    ];
    for (spec, field) in cases {
        assert_eq!(invalid_field(spec.validate()), field, "{spec:?}");
    }
    // The valid forms of the same.
    for spec in [
        base().with_position(rope()).with_streaming(4, 16, true),
        base().with_position(rope()).with_lm_infinite(4, 16, 16),
        base()
            .with_position(rope())
            .with_extrapolation(rerope(16, Some(8.0)))
            .with_logn(512),
        base()
            .with_position(t5(32, 128, 128))
            .with_bias(BiasLayout::default()),
        base()
            .with_position(PositionEncoding::Fire(fire(32, 4)))
            .with_softcap(30.0),
    ] {
        spec.validate().unwrap();
    }
}

#[test]
fn position_errors_name_their_field() {
    let s = AttentionSpec::default()
        .with_batch(2)
        .with_seq_q(3)
        .with_seq_k(5)
        .with_head_dim(32);
    let (q, k) = s.default_positions();
    assert!(s.validate_positions(&q, &k).is_ok());
    assert_eq!(
        invalid_field(s.validate_positions(&q[..5], &k)),
        "positions_q"
    );
    assert_eq!(
        invalid_field(s.validate_positions(&q, &k[..9])),
        "positions_k"
    );
    let mut far = k.clone();
    far[3] = i32::MIN;
    assert_eq!(invalid_field(s.validate_positions(&q, &far)), "positions_k");
}

fn ctx() -> Option<Context> {
    let a = enumerate_adapters(&ContextOptions::default())
        .into_iter()
        .next();
    if a.is_none() {
        println!("no adapter: the device-side error checks did not run");
    }
    a.map(|a| Context::from_adapter(&a).expect("open device"))
}

#[test]
fn device_side_errors_are_typed() {
    let Some(ctx) = ctx() else { return };
    println!("device-side error checks on {}", ctx.describe());
    // Sizes beyond the device's binding limit are Unavailable, not a wgpu panic.
    let huge = AttentionSpec::default()
        .with_seq_q(1 << 20)
        .with_seq_k(16)
        .with_heads(64);
    match Attention::new(&ctx, &huge) {
        Err(Error::Unavailable { what, .. }) => assert_eq!(what, "q / out bytes"),
        other => panic!("expected Unavailable, got {:?}", other.err()),
    }
    let spec = AttentionSpec::default()
        .with_seq_len(8)
        .with_heads(2)
        .with_head_dim(32);
    let plan = Attention::new(&ctx, &spec).unwrap();
    // Host slices of the wrong length.
    let q = vec![0.5f32; spec.q_len()];
    let k = vec![0.5f32; spec.kv_len()];
    for (field, r) in [
        ("q", plan.run(&ctx, &q[1..], &k, &k, None, None)),
        ("k", plan.run(&ctx, &q, &k[1..], &k, None, None)),
        ("v", plan.run(&ctx, &q, &k, &[], None, None)),
        (
            "positions_q",
            plan.run(&ctx, &q, &k, &k, Some(&[0; 3]), None),
        ),
        (
            "positions_k",
            plan.run(&ctx, &q, &k, &k, None, Some(&[0; 3])),
        ),
    ] {
        match r {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    // Caller buffers too small or without STORAGE usage.
    let mk = |size: u64, usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let st = wgpu::BufferUsages::STORAGE;
    let good_q = mk(spec.q_len() as u64 * 4, st);
    let good_kv = mk(spec.kv_len() as u64 * 4, st);
    let small = mk(16, st);
    let no_storage = mk(spec.q_len() as u64 * 4, wgpu::BufferUsages::COPY_DST);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let mut try_bufs = |q, k, v, out, pq: Option<&wgpu::Buffer>| {
        plan.encode(&ctx, &mut enc, &{
            let mut b = AttentionBuffers::new(q, k, v, out);
            b.positions_q = pq.map(|x| x.as_entire_buffer_binding());
            b
        })
    };
    for (field, r) in [
        ("q", try_bufs(&small, &good_kv, &good_kv, &good_q, None)),
        ("k", try_bufs(&good_q, &small, &good_kv, &good_q, None)),
        ("v", try_bufs(&good_q, &good_kv, &small, &good_q, None)),
        (
            "out",
            try_bufs(&good_q, &good_kv, &good_kv, &no_storage, None),
        ),
        (
            "positions_q",
            try_bufs(&good_q, &good_kv, &good_kv, &good_q, Some(&no_storage)),
        ),
    ] {
        match r {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    // A caller bias: the spec's layout and the buffer must agree.
    let biased = AttentionSpec::default()
        .with_seq_len(8)
        .with_heads(2)
        .with_head_dim(32)
        .with_bias(BiasLayout::default());
    let bplan = Attention::new(&ctx, &biased).unwrap();
    let bias = vec![0.0f32; 2 * 8 * 8];
    for (want, r) in [
        ("bias", bplan.run(&ctx, &q, &k, &k, None, None)),
        (
            "bias",
            bplan.run_with_bias(&ctx, &q, &k, &k, None, None, Some(&bias[1..])),
        ),
        (
            "bias",
            plan.run_with_bias(&ctx, &q, &k, &k, None, None, Some(&bias)),
        ),
    ] {
        match r {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, want),
            other => panic!("expected Invalid bias, got {other:?}"),
        }
    }
    assert!(
        bplan
            .run_with_bias(&ctx, &q, &k, &k, None, None, Some(&bias))
            .is_ok()
    );
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let r = bplan.encode(
        &ctx,
        &mut enc,
        &AttentionBuffers::new(&good_q, &good_kv, &good_kv, &good_q).with_bias(&small),
    );
    assert!(
        matches!(r, Err(Error::Invalid { field: "bias", .. })),
        "{r:?}"
    );
    assert!(ctx.take_uncaptured_errors().is_empty());
}

/// Half storage: byte lengths that are not whole elements or not the tensor's count, device
/// buffers sized for another dtype, and native f16 demanded where the adapter has no
/// SHADER_F16 are typed errors naming the tensor.
#[test]
fn half_storage_errors_are_typed() {
    use posattn::{Dtype, Dtypes, HalfForm};
    assert_eq!(
        Dtype::parse("dtype", "f8").unwrap_err().field(),
        Some("dtype")
    );
    let kv_f16 = Dtypes {
        k: Dtype::F16,
        v: Dtype::F16,
        ..Dtypes::F32
    };
    // Native f16 on every adapter without SHADER_F16 (llvmpipe's GL): refused as unavailable,
    // naming the first f16 tensor, before anything is compiled.
    let mut without = 0;
    for a in enumerate_adapters(&ContextOptions::default()) {
        let mut c = Context::from_adapter(&a).expect("open device");
        if c.has_native_f16() {
            continue;
        }
        without += 1;
        assert_eq!(c.half_form(), HalfForm::Packed, "{}", c.describe());
        // f16 arithmetic for P·V needs SHADER_F16 too.
        let e = c
            .set_accumulation(posattn::Accumulation::F16)
            .expect_err("f16 accumulation without SHADER_F16");
        assert!(matches!(e, Error::Unavailable { .. }), "{e}");
        assert_eq!(e.field(), Some("accumulation"), "{e}");
        c.set_half_form(Some(HalfForm::Native));
        let spec = AttentionSpec::default()
            .with_seq_len(8)
            .with_heads(2)
            .with_dtypes(kv_f16);
        match Attention::new(&c, &spec) {
            Err(Error::Unavailable { what, .. }) => assert_eq!(what, "k"),
            other => panic!("expected Unavailable, got {:?}", other.err()),
        }
    }
    println!("native f16 refused on {without} adapters without SHADER_F16");
    let Some(ctx) = ctx() else { return };
    let spec = AttentionSpec::default()
        .with_seq_len(8)
        .with_heads(2)
        .with_position(rope())
        .with_dtypes(kv_f16);
    let plan = Attention::new(&ctx, &spec).unwrap();
    let q = Dtype::F32.encode(&vec![0.5; spec.q_len()]);
    let kv = Dtype::F16.encode(&vec![0.5; spec.kv_len()]);
    for (field, r) in [
        // Not a whole number of f16 elements.
        (
            "k",
            plan.run_bytes(&ctx, &q, &kv[1..], &kv, None, None, None),
        ),
        // Whole elements, but f32-sized: the dtype's count does not match.
        (
            "v",
            plan.run_bytes(
                &ctx,
                &q,
                &kv,
                &[kv.clone(), kv.clone()].concat(),
                None,
                None,
                None,
            ),
        ),
        // f32 bytes where f32 is stored, short by one element.
        (
            "q",
            plan.run_bytes(&ctx, &q[4..], &kv, &kv, None, None, None),
        ),
    ] {
        match r {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!(
                "{field}: expected Invalid, got {:?}",
                other.map(|o| o.len())
            ),
        }
    }
    assert_eq!(
        plan.run_bytes(&ctx, &q, &kv, &kv, None, None, None)
            .unwrap()
            .len(),
        spec.q_len() * 4
    );
    // Device buffers: K sized for f16 is enough; V one f16 element short is not.
    let mk = |size: u64| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (qb, kb, vb) = (
        mk(spec.q_len() as u64 * 4),
        mk(spec.kv_len() as u64 * 2),
        mk(spec.kv_len() as u64 * 2 - 4),
    );
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    let r = plan.encode(&ctx, &mut enc, &AttentionBuffers::new(&qb, &kb, &vb, &qb));
    assert!(matches!(r, Err(Error::Invalid { field: "v", .. })), "{r:?}");
    assert!(ctx.take_uncaptured_errors().is_empty());
}

/// The cooperative-matrix score tile on a device that has none (every adapter here, and any
/// context opened without `ContextOptions::cooperative_matrix`) is `Unavailable` naming
/// `score_tile`, and the context keeps its form; the emulated tile with a two-branch method is
/// `Unavailable` naming `score_tile` at plan time, and at a head size whose f32 Q tile exceeds
/// the device's workgroup memory it names that limit.
#[test]
fn score_tile_errors_are_typed() {
    use posattn::ScoreTile;
    let Some(mut ctx) = ctx() else { return };
    assert_eq!(ctx.coop_score_tile(), None);
    for t in [
        ScoreTile::Coop16,
        ScoreTile::Coop8,
        ScoreTile::Coop16Pv,
        ScoreTile::Coop8Pv,
    ] {
        match ctx.set_score_tile(t) {
            Err(Error::Unavailable { what, .. }) => assert_eq!(what, "score_tile"),
            other => panic!("{t:?}: {other:?}"),
        }
        assert_eq!(ctx.score_tile(), ScoreTile::Rows);
    }
    ctx.set_score_tile(ScoreTile::EmulatedPv).unwrap();
    ctx.set_score_tile(ScoreTile::Emulated).unwrap();
    let rerope = AttentionSpec::default()
        .with_seq_len(8)
        .with_position(PositionEncoding::Rope(Rope::new(10000.0)))
        .with_extrapolation(Extrapolation::ReRope {
            window: 4,
            leak: None,
        });
    match Attention::new(&ctx, &rerope) {
        Err(Error::Unavailable { what, .. }) => assert_eq!(what, "score_tile"),
        other => panic!("two-branch: {:?}", other.map(|_| ())),
    }
    let limit = ctx.device().limits().max_compute_workgroup_storage_size;
    let wide = AttentionSpec::default().with_seq_len(8).with_head_dim(256);
    let needed = posattn::kernel::workgroup_bytes(
        &posattn::kernel::KernelKey::fused(256, 1, posattn::kernel::PosKind::None)
            .with_scores(ScoreTile::Emulated),
    );
    match Attention::new(&ctx, &wide) {
        Err(Error::Unavailable { what, .. }) if needed > limit => {
            assert_eq!(what, "workgroup storage bytes")
        }
        Ok(_) if needed <= limit => {}
        other => panic!("d256 ({needed} of {limit} B): {:?}", other.map(|_| ())),
    }
}
