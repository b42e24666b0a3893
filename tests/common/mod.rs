//! Helpers the command-line tests share.
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
