//! Adding a position scheme the crate does not have, fused into the kernel, and checking it:
//! an asymmetric power-law decay bias. A past key at distance Δ = m − n > 0 is weighted by
//! (1 + Δ/τ_h)^(−α_h), a future one (bidirectional attention) by (1 + |Δ|/τ_h)^(−β_h), with
//! α, β and τ learned per head; as a logit bias that is −α_h · ln(1 + Δ/τ_h) (or β_h for
//! future keys). KERPLE's log kernel is the symmetric special case; the crate has no
//! asymmetric one.
//!
//! Why not CoPE: CoPE's position of key j for query i is Σ_{t=j..i} σ(q_i · k_t), a sum of gates
//! over every key between the two, so the bias of one (query, key) pair depends on the scores of
//! other keys. A score hook sees one score at a time (that is what lets it fuse into a single
//! pass); CoPE needs the running sum of gates per query row first, a second pass.
//!
//! The scheme is written twice: in WGSL (below), which the crate composes into the fused kernel
//! as its own variant after validating it with naga, and in Rust, the twin the f64 CPU
//! reference runs. The example then runs the conformance cases (every mask × MHA/GQA/MQA, tile
//! edges, batches with their own positions) on every adapter present and exits non-zero on any
//! failure. Run: `WGPU_BACKEND=vulkan cargo run --release --example custom_scheme` (or `gl`).

use posattn::harness::check::{self, Case, Positions, SplitMix, Status};
use posattn::{
    AttentionSpec, Context, ContextOptions, CustomScheme, PositionEncoding, enumerate_adapters,
};

/// The WGSL half: three per-head tables and a score modifier.
const WGSL: &str = "\
// Asymmetric power-law decay: -alpha_h ln(1 + d / tau_h) for past keys,
// -beta_h ln(1 + |d| / tau_h) for future ones, d = q_pos - k_pos.
// @table alpha: heads
// @table beta: heads
// @table tau: heads
fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {
    let d = q_pos - k_pos;
    let rate = select(beta(head), alpha(head), d >= 0);
    return score - rate * log(1.0 + f32(abs(d)) / tau(head));
}
";

/// The scheme with its tables and its Rust twin.
fn power_decay(heads: u32) -> PositionEncoding {
    let mut rng = SplitMix::new(42);
    let mut draw = |lo: f32, hi: f32| -> Vec<f32> {
        (0..heads)
            .map(|_| lo + (rng.uniform() + 1.0) * 0.5 * (hi - lo))
            .collect()
    };
    let (alpha, beta, tau) = (draw(0.2, 2.0), draw(0.5, 4.0), draw(1.0, 64.0));
    let scheme = CustomScheme::new(WGSL)
        .with_table("alpha", alpha)
        .with_table("beta", beta)
        .with_table("tau", tau)
        .with_score(|a| {
            let h = a.head as usize;
            let d = a.q_pos - a.k_pos;
            let rate = if d >= 0 {
                a.table("alpha")[h]
            } else {
                a.table("beta")[h]
            } as f64;
            a.score - rate * (d.abs() as f64 / a.table("tau")[h] as f64).ln_1p()
        });
    PositionEncoding::Custom(scheme)
}

/// The conformance cases, on the new scheme.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for causal in [true, false] {
        let mask = if causal { "causal" } else { "bidir" };
        for (g, kv) in [("mha", 4), ("gqa", 2), ("mqa", 1)] {
            let spec = AttentionSpec::default()
                .with_seq_len(37)
                .with_heads(4)
                .with_kv_heads(kv)
                .with_causal(causal)
                .with_position(power_decay(4));
            cases.push(Case::new(format!("power_decay_{mask}_{g}_s37"), spec));
        }
        for (sq, sk) in [
            (1, 1),
            (1, 100),
            (63, 63),
            (65, 65),
            (33, 33),
            (17, 100),
            (100, 17),
            (129, 129),
        ] {
            let spec = AttentionSpec::default()
                .with_seq_q(sq)
                .with_seq_k(sk)
                .with_heads(2)
                .with_kv_heads(1)
                .with_causal(causal)
                .with_position(power_decay(2));
            cases.push(Case::new(format!("power_decay_{mask}_q{sq}_k{sk}"), spec));
        }
    }
    for (name, pos) in [
        ("offset1000", Positions::Offset(1000)),
        ("stride3", Positions::Stride(3)),
        ("random4096", Positions::RandomSubset(4096)),
    ] {
        let spec = AttentionSpec::default()
            .with_batch(3)
            .with_seq_q(40)
            .with_seq_k(70)
            .with_heads(4)
            .with_kv_heads(2)
            .with_position(power_decay(4));
        cases.push(Case::new(format!("power_decay_b3_q40_k70_{name}"), spec).with_positions(pos));
    }
    cases
}

fn main() -> posattn::Result<()> {
    let adapters = enumerate_adapters(&ContextOptions::from_env()?);
    if adapters.is_empty() {
        eprintln!("no adapter: nothing checked");
        std::process::exit(2);
    }
    let cases = cases();
    check::assert_unique_names(&cases)?;
    let mut failed = 0;
    for adapter in adapters {
        let ctx = Context::from_adapter(&adapter)?;
        let start = std::time::Instant::now();
        let results = check::run_cases(&ctx, &cases, |_| {});
        let mut worst: f64 = 0.0;
        let mut pass = 0;
        for r in &results {
            match &r.status {
                Status::Pass => pass += 1,
                other => {
                    failed += 1;
                    println!("FAIL {}: {other:?}", r.name);
                }
            }
            if r.bound > 0.0 {
                worst = worst.max(r.err_gpu / r.bound);
            }
        }
        println!(
            "power-law decay on {}: {pass}/{} cases pass, worst error/bound {worst:.3} ({:.1?} with the compile)",
            ctx.describe(),
            results.len(),
            start.elapsed()
        );
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
