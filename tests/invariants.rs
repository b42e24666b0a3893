//! Invariants on every adapter present (one test per backend, small shapes so that they cost
//! little beyond one kernel compile): reruns are bitwise identical, two threads can run plans
//! on one `Context` at once with the same bits as a sequential run, a plan used with buffers
//! that were destroyed gets a typed error, and after the device is destroyed mid-run every
//! later call returns a typed error without hanging. Set `POSATTN_REQUIRE_BACKENDS` (e.g.
//! `vulkan,gl`) to make a backend with no adapter a failure rather than a reported skip.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use posattn::harness::check::SplitMix;
use posattn::{
    Attention, AttentionBuffers, AttentionSpec, Context, ContextOptions, Error, PositionEncoding,
    Rope, enumerate_adapters,
};
use wgpu::util::DeviceExt;

/// `Context` and a plan are shared across threads by design: checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Context>();
    send_sync::<Attention>();
    send_sync::<Error>();
};

/// Longest any step here may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(120);

/// The one small case every invariant uses (one kernel to compile per adapter).
fn spec() -> AttentionSpec {
    AttentionSpec::default()
        .with_seq_len(24)
        .with_heads(2)
        .with_position(PositionEncoding::Rope(Rope::new(10000.0)))
}

fn inputs(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = spec();
    let mut rng = SplitMix::new(seed);
    (
        rng.vec(s.q_len(), 1.0),
        rng.vec(s.kv_len(), 1.0),
        rng.vec(s.kv_len(), 1.0),
    )
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `f` on another thread and fails if it has not finished within `HANG`.
fn within_time<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {HANG:?} (a hang)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn contexts(backends: wgpu::Backends, name: &str) -> Vec<wgpu::Adapter> {
    let adapters = enumerate_adapters(
        &ContextOptions::default()
            .with_backends(backends)
            .with_adapter_name(None),
    );
    if adapters.is_empty() {
        assert!(
            !crate::common::required(name),
            "no {name} adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("invariants [{name}]: no adapter on this machine, nothing run");
    }
    adapters
}

fn invariants(backends: wgpu::Backends, name: &str) {
    for adapter in contexts(backends, name) {
        let ctx = std::sync::Arc::new(Context::from_adapter(&adapter).expect("open device"));
        println!("invariants on {}", ctx.describe());
        reruns_are_bitwise_identical(&ctx);
        two_threads_share_a_context(&ctx);
        destroyed_buffers_are_a_typed_error(&ctx);
        assert!(
            ctx.take_uncaptured_errors().is_empty(),
            "errors escaped the crate's scopes"
        );
        device_lost_mid_run(&adapter);
    }
}

/// 100 runs of one case: every output bit for bit the same as the first.
fn reruns_are_bitwise_identical(ctx: &Context) {
    let start = Instant::now();
    let plan = Attention::new(ctx, &spec()).unwrap();
    let (q, k, v) = inputs(1);
    let first = plan.run(ctx, &q, &k, &v, None, None).unwrap();
    assert!(first.iter().all(|x| x.is_finite()), "output not finite");
    let want = bits(&first);
    for i in 1..100 {
        let again = plan.run(ctx, &q, &k, &v, None, None).unwrap();
        assert!(bits(&again) == want, "run {i} differs from run 0");
    }
    println!("  100 reruns bitwise identical ({:.2?})", start.elapsed());
}

/// Two threads, each with its own plan and inputs, run at once on one `Context`; each result
/// equals, bit for bit, the same run made alone.
fn two_threads_share_a_context(ctx: &std::sync::Arc<Context>) {
    let start = Instant::now();
    let alone: Vec<Vec<u32>> = (0..2u64)
        .map(|seed| {
            let (q, k, v) = inputs(10 + seed);
            bits(&ctx.attention(&spec(), &q, &k, &v, None).unwrap())
        })
        .collect();
    let handles: Vec<_> = (0..2u64)
        .map(|seed| {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                let plan = Attention::new(&ctx, &spec()).unwrap();
                let (q, k, v) = inputs(10 + seed);
                (0..10)
                    .map(|_| bits(&plan.run(&ctx, &q, &k, &v, None, None).unwrap()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (seed, h) in handles.into_iter().enumerate() {
        for (i, got) in h.join().expect("thread panicked").iter().enumerate() {
            assert!(
                *got == alone[seed],
                "thread {seed} run {i} differs from the run made alone"
            );
        }
    }
    println!(
        "  2 threads × 10 runs on one Context match the runs made alone ({:.2?})",
        start.elapsed()
    );
}

/// A plan given buffers that were destroyed: a validation error at submission for a set whose
/// bind group the plan keeps, a typed error from `encode` for a new set; never a panic.
fn destroyed_buffers_are_a_typed_error(ctx: &Context) {
    let s = spec();
    let plan = Attention::new(ctx, &s).unwrap();
    let (q, k, v) = inputs(3);
    let mk = |data: &[f32]| {
        ctx.device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("invariants input"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            })
    };
    let (qb, kb, vb, ob) = (mk(&q), mk(&k), mk(&v), mk(&q));
    let bufs = AttentionBuffers::new(&qb, &kb, &vb, &ob);
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    plan.encode(ctx, &mut enc, &bufs)
        .expect("live buffers encode");
    drop(enc);
    kb.destroy();
    // The set's bind group is kept by the plan, so recording it again checks nothing on the
    // host (the hot path); the destroyed buffer surfaces when the commands are finished or
    // submitted, as a wgpu validation error in the caller's scope.
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    plan.encode(ctx, &mut enc, &bufs)
        .expect("a kept set records without checks");
    let scope = ctx.device().push_error_scope(wgpu::ErrorFilter::Validation);
    ctx.queue().submit([enc.finish()]);
    match pollster::block_on(scope.pop()) {
        Some(e) => println!("  destroyed input buffer in a kept set: at submission: {e}"),
        None => panic!("a destroyed input buffer was submitted without a validation error"),
    }
    // A set not seen before gets its bind group made in an error scope: a typed error.
    plan.clear_bind_groups();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    match plan.encode(ctx, &mut enc, &bufs) {
        Err(Error::Wgpu { during, message }) => {
            println!("  destroyed input buffer: typed error during {during}: {message}")
        }
        other => panic!("a destroyed input buffer gave {other:?}"),
    }
    // The plan and the context still work with live buffers.
    let out = plan.run(ctx, &q, &k, &v, None, None).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}

/// The device destroyed while a thread is running plans: that thread's calls, and every call
/// after, return a typed error; none hangs and none panics.
fn device_lost_mid_run(adapter: &wgpu::Adapter) {
    let ctx = std::sync::Arc::new(Context::from_adapter(adapter).expect("open device"));
    let plan = std::sync::Arc::new(Attention::new(&ctx, &spec()).unwrap());
    let (q, k, v) = inputs(4);
    plan.run(&ctx, &q, &k, &v, None, None).unwrap();
    let runner = {
        let (ctx, plan, q, k, v) = (ctx.clone(), plan.clone(), q.clone(), k.clone(), v.clone());
        std::thread::spawn(move || {
            // Runs until the loss shows up as an error (or a bounded number of runs).
            for _ in 0..10_000 {
                if let Err(e) = plan.run(&ctx, &q, &k, &v, None, None) {
                    return Some(e);
                }
            }
            None
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    ctx.device().destroy();
    let first = within_time(
        "the run in flight when the device was destroyed",
        move || runner.join().expect("runner panicked"),
    );
    let first = first.expect("10000 runs succeeded after the device was destroyed");
    println!("  device destroyed mid-run: {first}");
    let later: Vec<(&str, posattn::Result<()>)> = {
        let (ctx, plan, q, k, v) = (ctx.clone(), plan.clone(), q.clone(), k.clone(), v.clone());
        within_time("calls after the device was destroyed", move || {
            vec![
                ("run", plan.run(&ctx, &q, &k, &v, None, None).map(|_| ())),
                ("Attention::new", Attention::new(&ctx, &spec()).map(|_| ())),
                (
                    "Context::attention",
                    ctx.attention(&spec(), &q, &k, &v, None).map(|_| ()),
                ),
            ]
        })
    };
    for (call, r) in later {
        match r {
            Err(e @ (Error::Wgpu { .. } | Error::Device { .. } | Error::Timeout(_))) => {
                println!("  then {call}: {e}")
            }
            other => panic!("{call} after the device was destroyed gave {other:?}"),
        }
    }
}

#[test]
fn invariants_vulkan() {
    invariants(wgpu::Backends::VULKAN, "vulkan");
}

#[test]
fn invariants_gl() {
    invariants(wgpu::Backends::GL, "gl");
}
