//! Helpers the test files share.
#![allow(dead_code)]

use std::process::Command;

/// Runs the `posattn` binary; returns its exit code and stdout followed by stderr.
pub fn posattn(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_posattn"))
        .args(args)
        .output()
        .expect("run posattn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Whether any adapter is present; when none is, says which part (`what`) did not run.
pub fn have_adapter(what: &str) -> bool {
    let found = !posattn::enumerate_adapters(&posattn::ContextOptions::default()).is_empty();
    if !found {
        println!("no adapter: {what} did not run");
    }
    found
}

/// Whether `POSATTN_REQUIRE_BACKENDS` names backend `name` (then a missing adapter fails the test
/// instead of being reported and skipped).
pub fn required(name: &str) -> bool {
    std::env::var("POSATTN_REQUIRE_BACKENDS")
        .map(|v| v.split(',').any(|b| b.trim().eq_ignore_ascii_case(name)))
        .unwrap_or(false)
}

/// A context on the first Vulkan adapter; without one, says which part (`what`) did not run, or
/// fails when `POSATTN_REQUIRE_BACKENDS` names Vulkan.
pub fn vulkan(what: &str) -> Option<posattn::Context> {
    let options = posattn::ContextOptions::default()
        .with_backends(wgpu::Backends::VULKAN)
        .with_adapter_name(None);
    let adapter = posattn::enumerate_adapters(&options).into_iter().next();
    if adapter.is_none() {
        assert!(
            !required("vulkan"),
            "no Vulkan adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("no Vulkan adapter: {what} did not run");
    }
    adapter.map(|a| posattn::Context::from_adapter(&a).expect("open device"))
}
