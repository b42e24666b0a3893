//! The benchmark roofs compute what they claim: the matmul roof's shapes each give the product
//! (64 elements against an f64 product, on a NaN-poisoned output; bound in `MatmulRoof::verify`)
//! and time to a finite rate. Vulkan only (lavapipe): three small kernels.

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
