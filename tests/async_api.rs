//! The async forms (the only ones on the web) against the blocking ones, which wrap them: the
//! same device work, so bit-identical outputs. Driven here by pollster; in the browser by the
//! page's event loop (tests/browser.rs). The spec is one `errors.rs` compiles anyway (head_dim
//! 32, no position encoding), so this adds no kernel variant to the run.

use posattn::{Attention, AttentionSpec, Context, Error};

fn spec() -> AttentionSpec {
    AttentionSpec::default()
        .with_seq_len(8)
        .with_heads(2)
        .with_head_dim(32)
}

#[test]
fn async_forms_match_the_blocking_ones() {
    let ctx = match pollster::block_on(Context::new_async()) {
        Ok(c) => c,
        Err(Error::NoAdapter(why)) => {
            println!("no adapter: the async checks did not run ({why})");
            return;
        }
        Err(e) => panic!("opening a device: {e}"),
    };
    println!("async forms on {}", ctx.describe());
    let s = spec();
    let mut rng = posattn::harness::check::SplitMix::new(7);
    let q = rng.vec(s.q_len(), 1.0);
    let k = rng.vec(s.kv_len(), 1.0);
    let v = rng.vec(s.kv_len(), 1.0);
    let blocking = Attention::new(&ctx, &s)
        .and_then(|p| p.run(&ctx, &q, &k, &v, None, None))
        .expect("blocking run");
    let plan = pollster::block_on(Attention::new_async(&ctx, &s)).expect("async plan");
    let awaited = pollster::block_on(plan.run_async(&ctx, &q, &k, &v, None, None)).expect("run");
    let one_shot =
        pollster::block_on(ctx.attention_async(&s, &q, &k, &v, None)).expect("attention_async");
    assert_eq!(blocking.len(), s.q_len());
    assert!(blocking.iter().all(|x| x.is_finite()));
    for (name, other) in [("run_async", &awaited), ("attention_async", &one_shot)] {
        let same = blocking
            .iter()
            .zip(other.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same && other.len() == blocking.len(), "{name} differs");
    }
    // Caller mistakes are typed errors in the async forms too.
    match pollster::block_on(plan.run_async(&ctx, &q[1..], &k, &v, None, None)) {
        Err(Error::Invalid { field: "q", .. }) => {}
        other => panic!("expected Invalid q, got {other:?}"),
    }
    assert!(ctx.take_uncaptured_errors().is_empty());
}

/// The public readback: any byte count (the copy is rounded up to the copy alignment and the
/// result cut back), and a buffer that cannot be copied from is an error naming `src`.
#[test]
fn readback_reads_any_length_and_names_a_bad_buffer() {
    let ctx = match Context::new() {
        Ok(c) => c,
        Err(Error::NoAdapter(_)) => {
            println!("no adapter: the readback checks did not run");
            return;
        }
        Err(e) => panic!("opening a device: {e}"),
    };
    let bytes: Vec<u8> = (0..12u8).map(|i| i.wrapping_mul(37)).collect();
    let buf = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 12,
        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.queue().write_buffer(&buf, 0, &bytes);
    let six = pollster::block_on(ctx.read_buffer_async(&buf, 6)).expect("read 6 bytes");
    assert_eq!(six, bytes[..6]);
    assert_eq!(ctx.read_buffer(&buf, 12).expect("read 12 bytes"), bytes);
    let no_copy = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    for (what, r) in [
        ("no COPY_SRC", ctx.read_buffer(&no_copy, 16)),
        ("too short", ctx.read_buffer(&buf, 16)),
    ] {
        match r {
            Err(Error::Invalid { field: "src", .. }) => {}
            other => panic!("{what}: expected Invalid src, got {other:?}"),
        }
    }
    assert!(ctx.take_uncaptured_errors().is_empty());
}
