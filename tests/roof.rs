//! The benchmark roofs compute what they claim: the matmul roof's shapes each give the product
//! (64 elements against an f64 product, on a NaN-poisoned output; bound in `MatmulRoof::verify`)
//! and time to a finite rate. Vulkan only (lavapipe): three small kernels.

use posattn::harness::roof::MatmulRoof;
use posattn::{Context, ContextOptions};

fn vulkan() -> Option<Context> {
    let options = ContextOptions::default()
        .with_backends(wgpu::Backends::VULKAN)
        .with_adapter_name(None);
    let adapter = posattn::enumerate_adapters(&options).into_iter().next();
    if adapter.is_none() {
        let required = std::env::var("POSATTN_REQUIRE_BACKENDS")
            .map(|v| v.to_lowercase().contains("vulkan"))
            .unwrap_or(false);
        assert!(
            !required,
            "no Vulkan adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("no Vulkan adapter: the roof test did not run");
    }
    adapter.map(|a| Context::from_adapter(&a).expect("open device"))
}

#[test]
fn matmul_roof_computes_the_product_and_times_it() {
    let Some(ctx) = vulkan() else { return };
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
