//! Every invalid request gets a typed error naming the field, on the CPU side before any GPU work
//! where possible, and never a panic (wgpu's default handler is never reached).

use posattn::{
    Alibi, AlibiForm, AlibiSlopes, Attention, AttentionBuffers, AttentionSpec, Context,
    ContextOptions, Error, PositionEncoding, Rope, Xpos, enumerate_adapters,
};

fn base() -> AttentionSpec {
    AttentionSpec::new(1, 8, 8, 4, 64)
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
        (AttentionSpec { batch: 0, ..base() }, "batch"),
        (AttentionSpec { seq_q: 0, ..base() }, "seq_q"),
        (AttentionSpec { seq_k: 0, ..base() }, "seq_k"),
        (
            AttentionSpec {
                num_heads: 0,
                ..base()
            },
            "num_heads",
        ),
        (base().with_kv_heads(0), "num_kv_heads"),
        (base().with_kv_heads(3), "num_kv_heads"),
        (
            AttentionSpec {
                head_dim: 0,
                ..base()
            },
            "head_dim",
        ),
        (
            AttentionSpec {
                head_dim: 72,
                ..base()
            },
            "head_dim",
        ),
        (
            AttentionSpec {
                head_dim: 512,
                ..base()
            },
            "head_dim",
        ),
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
            base().with_position(PositionEncoding::Rope(Rope {
                inv_freq: Some(vec![1.0; 3]),
                ..Rope::new(1e4)
            })),
            "rope.inv_freq",
        ),
        (
            base().with_position(PositionEncoding::Rope(Rope {
                inv_freq: Some(vec![f64::NAN; 32]),
                ..Rope::new(1e4)
            })),
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
            base().with_position(PositionEncoding::Xpos(Xpos {
                scale_base: 0.0,
                ..Xpos::default()
            })),
            "xpos.scale_base",
        ),
    ];
    for (spec, field) in cases {
        assert_eq!(invalid_field(spec.validate()), field, "{spec:?}");
    }
}

#[test]
fn position_errors_name_their_field() {
    let s = AttentionSpec::new(2, 3, 5, 1, 32);
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
    let huge = AttentionSpec::new(1, 1 << 20, 16, 64, 64);
    match Attention::new(&ctx, &huge) {
        Err(Error::Unavailable { what, .. }) => assert_eq!(what, "q / out bytes"),
        other => panic!("expected Unavailable, got {:?}", other.err()),
    }
    let spec = AttentionSpec::new(1, 8, 8, 2, 32);
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
        plan.encode(
            &ctx,
            &mut enc,
            &AttentionBuffers {
                q,
                k,
                v,
                out,
                positions_q: pq,
                positions_k: None,
                bias: None,
            },
        )
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
    assert!(ctx.take_uncaptured_errors().is_empty());
}
