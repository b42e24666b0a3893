//! Sliding windows skip the key tiles they hide: a window of w over n tokens should cost about
//! n·w, not the n²/2 of full causal attention. Causal RoPE, 8 heads, head_dim 64, n = 4096
//! (`POSATTN_WINDOW_SEQ` changes it), windows 1024 / 256 / 64 and StreamingLLM (4 sinks + 256
//! recent), each against full causal on the same adapter. Criterion reports visible-pair FLOP/s
//! (4·h·d per visible (query, key) pair).
//!
//! The summary (median GPU time, visible pairs, time and pair ratios to full causal) is printed
//! and written to target/posattn-window-bench.md.

mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::{Setup, rope_causal, short_name};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use posattn::timing::{median, time_encoded};
use posattn::{Attention, Context, ContextOptions, Window, enumerate_adapters};

fn bench(c: &mut Criterion) {
    let seq: u32 = std::env::var("POSATTN_WINDOW_SEQ")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let base = rope_causal(seq);
    let variants = [
        ("full_causal".to_string(), base.clone()),
        ("window_1024".into(), base.clone().with_window(Window::recent(1024))),
        ("window_256".into(), base.clone().with_window(Window::recent(256))),
        ("window_64".into(), base.clone().with_window(Window::recent(64))),
        ("streaming_4+256".into(), base.clone().with_streaming(4, 256, false)),
    ];
    let mut report = String::new();
    for adapter in enumerate_adapters(&ContextOptions::default()) {
        let ctx = match Context::from_adapter(&adapter) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping an adapter that failed to open: {e}");
                continue;
            }
        };
        let tag = short_name(&ctx);
        let _ = writeln!(report, "\n{} — n = {seq}\n", ctx.describe());
        let _ = writeln!(
            report,
            "| mask | ms | visible pairs | GFLOP/s (visible) | time / full | pairs / full | clock |\n|---|---|---|---|---|---|---|"
        );
        let mut group = c.benchmark_group(format!("window/{tag}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
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
