//! The quick conformance subset in a real browser: this crate compiled to wasm32, on wgpu's
//! WebGPU backend, on the browser's own WebGPU implementation and adapter (in CI, headless
//! Chromium's Dawn on SwiftShader, which has no `shader-f16`, so f16 runs packed). Every case
//! runs with a NaN-poisoned output and is checked against the f64 reference with the
//! conformance tolerance rule (`posattn::harness::check`), as `posattn check --quick` does.
//!
//! Run with wasm-bindgen-test-runner as the cargo runner and chromedriver (README, Browser):
//!
//! ```text
//! WASM_BINDGEN_TEST_WEBDRIVER_JSON=tests/web/webdriver.json CHROMEDRIVER=chromedriver \
//! CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
//!   cargo test --release --target wasm32-unknown-unknown --no-default-features \
//!   --features harness --test browser
//! ```
//!
//! The kernels run one query row per invocation, the variants every GPU adapter gets. SwiftShader
//! reports a CPU device, for which the context would pick 8 rows (the lavapipe choice); those
//! variants take it about 4.7 times as long to compile (76 s against 16 s for the RoPE kernel,
//! measured side by side), and compiling is nearly all of this test's time. The conformance page
//! runs the context's own choice (tests/web_page.rs).
//!
//! The browser's flags are in `tests/web/webdriver.json`. No adapter is a failure, not a skip:
//! this test exists to run on one.
#![cfg(target_arch = "wasm32")]

use posattn::Context;
use posattn::harness::check::{self, Status};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn quick_subset_passes_in_the_browser() {
    let mut ctx = Context::new_async()
        .await
        .unwrap_or_else(|e| panic!("no WebGPU device in this browser: {e}"));
    ctx.set_rows_per_invocation(Some(1))
        .expect("one row per invocation");
    let info = ctx.adapter_info();
    assert_eq!(
        info.backend,
        wgpu::Backend::BrowserWebGpu,
        "{}",
        ctx.describe()
    );
    let cases = check::quick_check_cases(&ctx);
    assert!(!cases.is_empty(), "zero cases would pass any browser");
    let mut failed = Vec::new();
    let (mut passed, mut unsupported) = (0, 0);
    for case in &cases {
        let r = check::run_case_async(&ctx, case).await;
        match &r.status {
            Status::Pass => passed += 1,
            Status::Unsupported(why) => {
                unsupported += 1;
                wasm_bindgen_test::console_log!("{}: unsupported: {why}", r.name);
            }
            Status::Fail(why) => failed.push(format!("{}: {why}", r.name)),
        }
        wasm_bindgen_test::console_log!(
            "{:<44} {:?} error {:.3e} bound {:.3e} {:.0} ms",
            r.name,
            r.status,
            r.err_gpu,
            r.bound,
            r.time.as_secs_f64() * 1e3
        );
    }
    let uncaptured = ctx.take_uncaptured_errors();
    wasm_bindgen_test::console_log!(
        "{} on {}: {passed} passed, {} failed, {unsupported} unsupported (f16 {:?})",
        cases.len(),
        ctx.describe(),
        failed.len(),
        ctx.half_form()
    );
    assert!(
        failed.is_empty(),
        "failed in the browser:\n{}",
        failed.join("\n")
    );
    assert!(uncaptured.is_empty(), "uncaptured errors: {uncaptured:?}");
    // The browser's adapter meets WebGPU's default limits, which every quick case fits.
    assert_eq!(unsupported, 0, "cases the browser's adapter could not run");
    assert_eq!(passed, cases.len());
}
