//! The conformance page (examples/web) in headless Chromium: tests/web/page.mjs serves it,
//! drives Chromium through chromedriver with the flags of tests/web/webdriver.json (SwiftShader's
//! WebGPU adapter), waits for the run to finish and checks the rendered table: at least one case,
//! one row per case, every row "pass", the page's counts agreeing with its rows, the page's state
//! `done` (not `error` or `failed`).
//!
//! The page must be built first (README, Browser: `cargo build --example web` for wasm32, then
//! `wasm-bindgen --target web`). A missing page, Node or chromedriver is reported as not run;
//! with `POSATTN_REQUIRE_BROWSER` set (CI) it is a failure. `POSATTN_PAGE_FILTER` (default
//! `encoding=rope_half,dtype=f32`: 7 cases, one kernel variant, at the context's own choice of
//! rows per invocation) selects the cases the page runs here: the browser test (tests/browser.rs)
//! runs the whole quick matrix, and each kernel variant costs SwiftShader tens of seconds to
//! compile. An empty value runs the whole matrix on the page too.

use std::path::Path;
use std::process::Command;

const REQUIRE: &str = "POSATTN_REQUIRE_BROWSER";
/// page.mjs's exit status when chromedriver, Chromium or the built page is missing.
const MISSING: i32 = 2;

fn not_run(why: &str) {
    assert!(
        std::env::var_os(REQUIRE).is_none(),
        "{why} ({REQUIRE} is set, so this is a failure)"
    );
    println!("conformance page NOT RUN: {why}");
}

/// Runs page.mjs with `args`; its exit status and output, or None when it could not run.
fn page(args: &[&str]) -> Option<(i32, String)> {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        not_run("node not found (Debian: apt-get install nodejs)");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("node")
        .arg(root.join("tests/web/page.mjs"))
        .args(args)
        .output()
        .expect("run node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().unwrap_or(-1);
    if code == MISSING {
        not_run(text.trim());
        return None;
    }
    Some((code, text))
}

/// The page never passes silently: no WebGPU adapter, a filter the parser rejects and a filter
/// that matches no case end in the error state with the reason shown, and the driver fails them.
/// (No kernel compiles here: each is a browser start and a second of page.)
#[test]
fn page_shows_its_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let no_webgpu = root.join("tests/web/no-webgpu.json");
    let no_webgpu = no_webgpu.to_str().expect("a UTF-8 path");
    for (args, shown) in [
        (vec!["--webdriver", no_webgpu], "error: no adapter found"),
        (
            vec!["--filter", "name=no_such_case"],
            "error: invalid `filter`",
        ),
        (
            vec!["--filter", "encoding=rope_half,head_dim=128"],
            "matches none of the quick matrix's cases",
        ),
    ] {
        let Some((code, text)) = page(&args) else {
            return;
        };
        assert_eq!(code, 1, "{args:?} should fail:\n{text}");
        assert!(
            text.contains("page: FAILED: state error") && text.contains(shown),
            "{args:?}: expected the error state showing {shown:?}:\n{text}"
        );
        assert!(text.contains("page: 0 cases"), "{text}");
    }
}

#[test]
fn page_renders_a_passing_table() {
    let filter = std::env::var("POSATTN_PAGE_FILTER")
        .unwrap_or_else(|_| "encoding=rope_half,dtype=f32".into());
    let Some((code, text)) = page(&["--filter", &filter]) else {
        return;
    };
    println!("{text}");
    assert_eq!(code, 0, "the page failed:\n{text}");
    // The driver's summary line: N cases, all passed.
    let summary = text
        .lines()
        .find(|l| l.starts_with("page: ") && l.contains(" cases, "))
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    let n: usize = summary["page: ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable summary {summary:?}"));
    assert!(n > 0, "the page ran no case: {summary}");
    assert!(
        summary.ends_with(&format!("{n} cases, {n} passed, 0 failed, 0 unsupported")),
        "{summary}"
    );
}
