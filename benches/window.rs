//! Sliding windows skip the key tiles they hide: a window of w over n tokens should cost about
//! n·w, not the n²/2 of full causal attention. Causal RoPE, 8 heads, head_dim 64, n = 4096
//! (`POSATTN_WINDOW_SEQ` changes it), windows 1024 / 256 / 64 and StreamingLLM (4 sinks + 256
//! recent), each against full causal on the same adapter; and ReRoPE (window 512) over the full
//! triangle, the price of the two-branch kernel. Criterion reports visible-pair FLOP/s
//! (4·h·d per visible (query, key) pair).
//!
//! The summary (median GPU time, visible pairs, time and pair ratios to full causal) is printed
//! and written to target/posattn-window-bench.md.

mod common;

use std::fmt::Write as _;

use common::{Setup, contexts, group, rope_causal, short_name};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use posattn::harness::timing::{median, time_encoded};
use posattn::{Attention, Extrapolation, Window};

fn bench(c: &mut Criterion) {
    let seq: u32 = std::env::var("POSATTN_WINDOW_SEQ")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let base = rope_causal(seq);
    let variants = [
        ("full_causal".to_string(), base.clone()),
        (
            "window_1024".into(),
            base.clone().with_window(Window::recent(1024)),
        ),
        (
            "window_256".into(),
            base.clone().with_window(Window::recent(256)),
        ),
        (
            "window_64".into(),
            base.clone().with_window(Window::recent(64)),
        ),
        (
            "streaming_4+256".into(),
            base.clone().with_streaming(4, 256, false),
        ),
        // The two-branch kernel over the full causal triangle: ReRoPE's cost of one pass.
        (
            "rerope_512".into(),
            base.clone().with_extrapolation(Extrapolation::ReRope {
                window: 512,
                leak: None,
            }),
        ),
    ];
    let mut report = String::new();
    for ctx in contexts() {
        let tag = short_name(&ctx);
        let _ = writeln!(report, "\n{} — n = {seq}\n", ctx.describe());
        let _ = writeln!(
            report,
            "| mask | ms | visible pairs | GFLOP/s (visible) | time / full | pairs / full | clock |\n|---|---|---|---|---|---|---|"
        );
        let mut group = group(c, format!("window/{tag}"));
        let mut full_ms = None;
        let full_pairs = base.visible_pairs() as f64;
        for (name, spec) in &variants {
            let s = Setup::new(&ctx, spec.clone());
            let plan = Attention::new(&ctx, spec).expect("fused plan");
            group.throughput(Throughput::Elements(spec.flops() as u64));
            group.bench_function(BenchmarkId::new(name.as_str(), seq), |b| {
                b.iter_custom(|iters| {
                    let (_, d) = time_encoded(&ctx, iters as usize, |enc| {
                        plan.encode(&ctx, enc, &s.bufs())
                    })
                    .expect("timed run");
                    d.iter().sum()
                })
            });
            let (clock, d) =
                time_encoded(&ctx, 5, |enc| plan.encode(&ctx, enc, &s.bufs())).expect("run");
            let ms = median(&d).as_secs_f64() * 1e3;
            let full = *full_ms.get_or_insert(ms);
            let pairs = spec.visible_pairs() as f64;
            let _ = writeln!(
                report,
                "| {name} | {ms:.2} | {pairs:.0} | {:.2} | {:.3} | {:.3} | {clock} |",
                spec.flops() / (ms * 1e-3) / 1e9,
                ms / full,
                pairs / full_pairs
            );
        }
        group.finish();
    }
    println!("\nposattn window summary (h=8, d=64, causal, RoPE, batch 1){report}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/posattn-window-bench.md", &report);
}

criterion_group!(benches, bench);
criterion_main!(benches);
