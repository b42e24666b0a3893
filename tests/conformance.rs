//! GPU against the f64 CPU reference on every adapter present, one test per backend.
//!
//! Each case's output buffer is poisoned with NaN before the dispatch and the tolerance rule is
//! `posattn::check`'s (FlashAttention style, stated there). Set `POSATTN_REQUIRE_BACKENDS`
//! (e.g. `vulkan,gl`) to make a backend with no adapter a failure rather than a reported skip.

use posattn::check::{self, Status};
use posattn::{Context, ContextOptions, enumerate_adapters};

fn required(name: &str) -> bool {
    std::env::var("POSATTN_REQUIRE_BACKENDS")
        .map(|v| v.split(',').any(|b| b.trim().eq_ignore_ascii_case(name)))
        .unwrap_or(false)
}

fn conformance(backends: wgpu::Backends, name: &str) {
    let options = ContextOptions {
        backends,
        adapter_name: None,
        ..ContextOptions::default()
    };
    let adapters = enumerate_adapters(&options);
    if adapters.is_empty() {
        assert!(
            !required(name),
            "no {name} adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("conformance [{name}]: no adapter on this machine, nothing run");
        return;
    }
    let cases = check::conformance_cases();
    check::assert_unique_names(&cases).unwrap();
    let mut failures = Vec::new();
    for adapter in adapters {
        let ctx = Context::from_adapter(&adapter).expect("open device");
        let verbose = std::env::var_os("POSATTN_VERBOSE").is_some();
        let results = check::run_cases(&ctx, &cases, |r| {
            if verbose {
                println!("  {:<44} {:?} {:.2?}", r.name, r.status, r.time);
            }
        });
        let (mut pass, mut fail, mut unsup) = (0, 0, 0);
        let mut worst: f64 = 0.0;
        for r in &results {
            match &r.status {
                Status::Pass => pass += 1,
                Status::Unsupported(_) => unsup += 1,
                Status::Fail(why) => {
                    fail += 1;
                    failures.push(format!("{} on {}: {why}", r.name, ctx.describe()));
                }
            }
            if r.bound > 0.0 {
                worst = worst.max(r.err_gpu / r.bound);
            }
        }
        println!(
            "conformance on {}: {pass} passed, {fail} failed, {unsup} unsupported; \
             worst error/bound {worst:.3}",
            ctx.describe()
        );
        let errs = ctx.take_uncaptured_errors();
        assert!(errs.is_empty(), "uncaptured wgpu errors: {errs:?}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn conformance_vulkan() {
    conformance(wgpu::Backends::VULKAN, "vulkan");
}

#[test]
fn conformance_gl() {
    conformance(wgpu::Backends::GL, "gl");
}

#[test]
fn conformance_metal() {
    conformance(wgpu::Backends::METAL, "metal");
}

#[test]
fn conformance_dx12() {
    conformance(wgpu::Backends::DX12, "dx12");
}
