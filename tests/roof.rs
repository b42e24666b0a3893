//! The benchmark roofs compute what they claim: the matmul roof's shapes each give the product
//! (64 elements against an f64 product, on a NaN-poisoned output; bound in `MatmulRoof::verify`)
//! and time to a finite rate; the GPU timing repeats and divides as it says. Vulkan only
//! (lavapipe): three small kernels and a copy.

use posattn::harness::roof::MatmulRoof;

#[test]
fn matmul_roof_computes_the_product_and_times_it() {
    let Some(ctx) = crate::common::vulkan("the roof test") else {
        return;
    };
    // 200 rounds up to 256: every shape's grid covers it exactly.
    let roof = MatmulRoof::new(&ctx, 200).expect("roof");
    assert_eq!(roof.n(), 256);
    roof.verify(&ctx).expect("every shape computes A·B");
    let rates = roof.measure(&ctx, 1).expect("timed");
    assert_eq!(rates.len(), 3);
    for (name, gflops) in rates {
        assert!(gflops.is_finite() && gflops > 0.0, "{name}: {gflops}");
    }
    assert!(ctx.take_uncaptured_errors().is_empty());
}

/// The timing a GPU gets (clocks brought up first, commands repeated to fill each run) records
/// the commands `reps` times per run and reports the time of one repetition: a 16 MiB copy
/// timed that way takes, per repetition, within a factor of 3 of the same copy timed once per
/// run (the factor is lavapipe's run-to-run spread on a loaded 2-core machine, with margin).
#[test]
fn settled_timing_repeats_the_commands_and_reports_per_repetition() {
    use posattn::harness::decode::CopyRoof;
    use posattn::harness::timing::{Settle, median, time_encoded_with};
    use std::time::Duration;
    let Some(ctx) = crate::common::vulkan("the settled-timing test") else {
        return;
    };
    let copy = CopyRoof::new(&ctx, 16 << 20).expect("copy kernel");
    let mut calls = 0usize;
    let (_, once) = time_encoded_with(&ctx, 3, None, |e| {
        calls += 1;
        copy.encode(e);
        Ok(())
    })
    .expect("timed once per run");
    assert_eq!(
        calls, 3,
        "without settling, each run records the commands once"
    );
    let settle = Settle {
        idle: Duration::from_millis(30),
        warm: Duration::from_millis(5),
        recent: Duration::from_millis(100),
        // Longer than four copies take, so each run repeats them `max_reps` times.
        run: Duration::from_secs(1),
        max_reps: 4,
    };
    calls = 0;
    let (_, settled) = time_encoded_with(&ctx, 3, Some(settle), |e| {
        calls += 1;
        copy.encode(e);
        Ok(())
    })
    .expect("timed with settling");
    assert!(
        calls > 3 * 4,
        "three runs of four repetitions after at least one settling submission, got {calls} recordings"
    );
    let (a, b) = (median(&once).as_secs_f64(), median(&settled).as_secs_f64());
    assert!(a > 0.0 && b > 0.0, "{a} {b}");
    assert!(
        b / a < 3.0 && a / b < 3.0,
        "per repetition {b:.6} s against {a:.6} s once per run"
    );
    assert!(ctx.take_uncaptured_errors().is_empty());
}
