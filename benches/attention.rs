//! Fused attention against the unfused pipeline a user would otherwise write, on every adapter
//! present (or those `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` select): causal, RoPE, 8 heads,
//! head_dim 64, seq 512 / 1024 / 2048. Criterion reports FLOP/s as its throughput (elements =
//! nominal FLOPs, 4·b·h·seq_q·seq_k·d halved for causal). GPU time comes from timestamp queries
//! where the adapter has them, else wall time after waiting for the device.
//!
//! After the criterion groups, a summary table (median GPU time, GFLOP/s, fused/unfused ratio,
//! device memory of each path) is printed and written to target/posattn-bench.md.
//! `POSATTN_BENCH_SEQS=512,1024` narrows the lengths.

use std::fmt::Write as _;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use posattn::Attention;
use posattn::harness::Unfused;
use posattn::harness::timing::{median, time_encoded};

mod common;

use common::{Setup, contexts, group, rope_causal, short_name};

fn bench(c: &mut Criterion) {
    let seqs: Vec<u32> = std::env::var("POSATTN_BENCH_SEQS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![512, 1024, 2048]);
    let mut report = String::new();
    for mut ctx in contexts() {
        let tag = short_name(&ctx);
        let _ = writeln!(report, "\n{}\n", ctx.describe());
        let _ = writeln!(
            report,
            "| seq | fused ms | fused GFLOP/s | unfused ms | unfused GFLOP/s | fused/unfused speed | fused MiB | unfused MiB | clock |\n|---|---|---|---|---|---|---|---|---|"
        );
        let mut group = group(c, format!("attention/{tag}"));
        for &seq in &seqs {
            let s = Setup::new(&ctx, rope_causal(seq));
            let fused = Attention::new(&ctx, &s.spec).expect("fused plan");
            let unfused = match Unfused::new(&ctx, &s.spec) {
                Ok(u) => Some(u),
                Err(e) => {
                    eprintln!("{tag} seq {seq}: unfused baseline unavailable: {e}");
                    None
                }
            };
            group.throughput(Throughput::Elements(s.spec.flops() as u64));
            group.bench_function(BenchmarkId::new("fused_rope_causal", seq), |b| {
                b.iter_custom(|iters| {
                    let (_, d) = time_encoded(&ctx, iters as usize, |enc| {
                        fused.encode(&ctx, enc, &s.bufs())
                    })
                    .expect("timed run");
                    d.iter().sum()
                })
            });
            if let Some(u) = &unfused {
                group.bench_function(BenchmarkId::new("unfused_rope_causal", seq), |b| {
                    b.iter_custom(|iters| {
                        let (_, d) = time_encoded(&ctx, iters as usize, |enc| {
                            u.encode(&ctx, enc, &s.bufs())
                        })
                        .expect("timed run");
                        d.iter().sum()
                    })
                });
            }
            // Summary: medians of five runs each.
            let (clock, fd) =
                time_encoded(&ctx, 5, |enc| fused.encode(&ctx, enc, &s.bufs())).expect("fused");
            let f_ms = median(&fd).as_secs_f64() * 1e3;
            let gf = |ms: f64| s.spec.flops() / (ms * 1e-3) / 1e9;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let f_mem = mib(s.io_bytes() + fused.own_bytes());
            let line = match &unfused {
                Some(u) => {
                    let (_, ud) = time_encoded(&ctx, 5, |enc| u.encode(&ctx, enc, &s.bufs()))
                        .expect("unfused");
                    let u_ms = median(&ud).as_secs_f64() * 1e3;
                    format!(
                        "| {seq} | {f_ms:.2} | {:.2} | {u_ms:.2} | {:.2} | {:.2}× | {f_mem:.1} | {:.1} | {clock} |",
                        gf(f_ms),
                        gf(u_ms),
                        u_ms / f_ms,
                        mib(s.io_bytes() + u.own_bytes())
                    )
                }
                None => format!(
                    "| {seq} | {f_ms:.2} | {:.2} | - | - | - | {f_mem:.1} | - | {clock} |",
                    gf(f_ms)
                ),
            };
            let _ = writeln!(report, "{line}");
        }
        group.finish();
        // The fused kernel with each rows-per-invocation choice, to show why the default is what
        // it is on this adapter. Not on GL: llvmpipe's GL compiler takes many minutes for the
        // multi-row variants, and GL always runs one row.
        if ctx.adapter_info().backend == wgpu::Backend::Gl {
            let _ = writeln!(report, "\n(rows-per-invocation table not run on GL)");
            continue;
        }
        let default_rows = ctx.rows_per_invocation(64);
        let _ = writeln!(
            report,
            "\nfused kernel by rows per invocation (default {default_rows}):\n\n| seq | rows | ms | GFLOP/s |\n|---|---|---|---|"
        );
        for &seq in &seqs {
            let s = Setup::new(&ctx, rope_causal(seq));
            for &rows in posattn::kernel::ROWS_CHOICES {
                ctx.set_rows_per_invocation(Some(rows)).expect("rows");
                let plan = Attention::new(&ctx, &s.spec).expect("fused plan");
                let (_, d) =
                    time_encoded(&ctx, 5, |enc| plan.encode(&ctx, enc, &s.bufs())).expect("fused");
                let ms = median(&d).as_secs_f64() * 1e3;
                let _ = writeln!(
                    report,
                    "| {seq} | {rows} | {ms:.2} | {:.2} |",
                    s.spec.flops() / (ms * 1e-3) / 1e9
                );
            }
        }
        ctx.set_rows_per_invocation(None).expect("rows");
    }
    println!("\nposattn summary (h=8, d=64, causal, RoPE, batch 1){report}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/posattn-bench.md", &report);
}

criterion_group!(benches, bench);
criterion_main!(benches);
