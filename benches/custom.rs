//! Custom schemes against the built-ins, on every adapter present:
//!
//! 1. ALiBi through the score hook against the built-in ALiBi (and T5 and KERPLE's log kernel
//!    likewise, each built-in in its own kernel variant), same shape,
//!    same run, interleaved rounds so that drift on a shared machine hits both alike: causal,
//!    batch 1, 8 heads, head_dim 64, n = 1024 (`POSATTN_CUSTOM_SEQ` changes it).
//!    Sandwich and FIRE have no hook twin here; their built-ins are timed against ALiBi's.
//! 2. A block-sparse mask: a sliding window of 256 written as a `mask_mod`, with and without its
//!    `tile_mask`, against the built-in window and full causal attention, on the window
//!    benchmark's shape (n = 4096, `POSATTN_WINDOW_SEQ` changes it; no position encoding, since
//!    a custom scheme takes the encoding's place).
//!
//! Prints median GPU times and writes the summary to target/posattn-custom-bench.md.
//! Run: `WGPU_BACKEND=vulkan cargo bench --bench custom`.

#[allow(dead_code)]
mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::{Setup, contexts};
use posattn::harness::custom;
use posattn::harness::timing::{median, time_encoded};
use posattn::{
    Alibi, AlibiForm, AlibiSlopes, Attention, AttentionSpec, Context, PositionEncoding, Window,
};

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Median ms of each spec over `rounds` interleaved rounds of `per` runs each.
fn interleaved(ctx: &Context, specs: &[AttentionSpec], rounds: usize, per: usize) -> Vec<f64> {
    let setups: Vec<(Setup, Attention)> = specs
        .iter()
        .map(|s| {
            (
                Setup::new(ctx, s.clone()),
                Attention::new(ctx, s).expect("plan"),
            )
        })
        .collect();
    // Warm-up: one run each.
    for (s, p) in &setups {
        time_encoded(ctx, 1, |enc| p.encode(ctx, enc, &s.bufs())).expect("run");
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); specs.len()];
    for _ in 0..rounds {
        for (i, (s, p)) in setups.iter().enumerate() {
            let (_, d) = time_encoded(ctx, per, |enc| p.encode(ctx, enc, &s.bufs())).expect("run");
            times[i].extend(d);
        }
    }
    times
        .iter()
        .map(|d| median(d).as_secs_f64() * 1e3)
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let n = env_u32("POSATTN_CUSTOM_SEQ", 1024);
    let n_win = env_u32("POSATTN_WINDOW_SEQ", 4096);
    let mut report = String::new();
    for ctx in contexts() {
        let _ = writeln!(report, "\n{}\n", ctx.describe());
        let base = AttentionSpec::default().with_seq_len(n).with_heads(8);
        let alibi = PositionEncoding::Alibi(Alibi {
            slopes: AlibiSlopes::Standard,
            form: AlibiForm::Causal,
        });
        let t5 = posattn::harness::check::t5(32, 128, false, 8);
        let t5_desc = match &t5 {
            PositionEncoding::T5(t) => t.clone(),
            _ => unreachable!(),
        };
        let kerple = posattn::harness::check::kerple(posattn::KerpleForm::Log, 8);
        let (kp, ka) = match &kerple {
            PositionEncoding::Kerple(k) => (k.p.clone(), k.a.clone()),
            _ => unreachable!(),
        };
        let specs = [
            base.clone().with_position(alibi),
            base.clone().with_position(custom::alibi(8)),
            // T5 leaves its logits unscaled by default; the hook takes the spec's scale.
            base.clone().with_scale(1.0).with_position(t5),
            base.clone()
                .with_scale(1.0)
                .with_position(custom::t5(&t5_desc, 8)),
            base.clone().with_position(kerple),
            base.clone().with_position(custom::kerple_log(&kp, &ka)),
        ];
        let ms = interleaved(&ctx, &specs, 12, 3);
        let _ = writeln!(
            report,
            "Hook against built-in, causal, b1 h8 d64, n = {n} (median of 36 runs each, interleaved):\n\n\
             | scheme | built-in ms | hook ms | hook / built-in |\n|---|---|---|---|\n\
             | ALiBi | {:.2} | {:.2} | {:.3} |\n| T5 | {:.2} | {:.2} | {:.3} |\n\
             | KERPLE (log) | {:.2} | {:.2} | {:.3} |",
            ms[0],
            ms[1],
            ms[1] / ms[0],
            ms[2],
            ms[3],
            ms[3] / ms[2],
            ms[4],
            ms[5],
            ms[5] / ms[4]
        );
        // Sandwich and FIRE (the variant they share), as multiples of ALiBi in the same rounds.
        let rel = [
            specs[0].clone(),
            base.clone()
                .with_position(PositionEncoding::Sandwich(Default::default())),
            base.clone().with_position(posattn::harness::check::fire(8)),
        ];
        let rm = interleaved(&ctx, &rel, 8, 3);
        let _ = writeln!(
            report,
            "\nBuilt-in Sandwich and FIRE against ALiBi, same shape (median of 24 runs each, interleaved):\n\n\
             | scheme | ms | time / ALiBi |\n|---|---|---|\n\
             | ALiBi | {:.2} | 1.000 |\n| Sandwich | {:.2} | {:.3} |\n| FIRE | {:.2} | {:.3} |",
            rm[0],
            rm[1],
            rm[1] / rm[0],
            rm[2],
            rm[2] / rm[0]
        );
        let base = AttentionSpec::default().with_seq_len(n_win).with_heads(8);
        let rows = [
            ("full causal", base.clone()),
            (
                "built-in window 256",
                base.clone().with_window(Window {
                    left: Some(256),
                    right: None,
                }),
            ),
            (
                "mask_mod window 256, no tile_mask",
                base.clone().with_position(custom::window_mask(256, false)),
            ),
            (
                "mask_mod window 256 + tile_mask",
                base.clone().with_position(custom::window_mask(256, true)),
            ),
        ];
        let specs: Vec<AttentionSpec> = rows.iter().map(|r| r.1.clone()).collect();
        let ms = interleaved(&ctx, &specs, 3, 2);
        let _ = writeln!(
            report,
            "\nBlock-sparse mask, causal, b1 h8 d64, n = {n_win}, no position encoding (median of 6 runs each, interleaved):\n\n\
             | mask | ms | time / full causal |\n|---|---|---|"
        );
        for ((name, _), t) in rows.iter().zip(&ms) {
            let _ = writeln!(report, "| {name} | {t:.1} | {:.3} |", t / ms[0]);
        }
    }
    println!("\nposattn custom-scheme summary{report}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/posattn-custom-bench.md", &report);
}
