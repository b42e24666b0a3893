//! The runnable examples, as CI runs them (`cargo test` builds every example first):
//! - `embed` on Vulkan (lavapipe) must exit 0 and report its final hidden state within its
//!   stated tolerance of the f64 host reference; its kernels are the RoPE head_dim-64 prefill,
//!   decode and split-KV reduce variants the conformance and decode tests compile anyway;
//! - `plot` and `posattn plot` must write PNGs of the figure's size, and refuse an unknown
//!   scheme naming the field.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::posattn;

/// The built example `name` (target/<profile>/examples/<name>, beside this test's deps dir).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "example {name} not built at {} (cargo test builds the examples)",
        path.display()
    );
    path
}

fn vulkan_present() -> bool {
    let options = posattn::ContextOptions::default()
        .with_backends(wgpu::Backends::VULKAN)
        .with_adapter_name(None);
    let found = !posattn::enumerate_adapters(&options).is_empty();
    if !found {
        let required = std::env::var("POSATTN_REQUIRE_BACKENDS")
            .map(|v| v.to_lowercase().contains("vulkan"))
            .unwrap_or(false);
        assert!(
            !required,
            "no Vulkan adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("no Vulkan adapter: the embed example did not run");
    }
    found
}

#[test]
fn embed_runs_and_matches_the_host_reference() {
    if !vulkan_present() {
        return;
    }
    let start = std::time::Instant::now();
    let out = Command::new(example("embed"))
        .env("WGPU_BACKEND", "vulkan")
        .output()
        .expect("run embed");
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "{text}{}(embed took {:.1} s)",
        String::from_utf8_lossy(&out.stderr),
        start.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "embed exited with {}", out.status);
    assert!(text.contains("final hidden state") && text.trim_end().ends_with("ok"));
}

/// Width and height from a PNG's IHDR, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).expect("read png");
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is no PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    // A blank 1400 × 520 image compresses to under a kilobyte; the figures are tens of KB.
    assert!(bytes.len() > 10_000, "{} is nearly empty", path.display());
    (be(16), be(20))
}

#[test]
fn plot_writes_the_figures() {
    let dir = std::env::temp_dir().join(format!("posattn-plot-{}", std::process::id()));
    let start = std::time::Instant::now();
    let out = Command::new(example("plot"))
        .arg(&dir)
        .args(["yarn", "alibi"])
        .output()
        .expect("run plot");
    println!(
        "{}{}(plot took {:.1} s)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        start.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "plot exited with {}", out.status);
    for s in ["yarn", "alibi"] {
        assert_eq!(png_size(&dir.join(format!("{s}.png"))), (1400, 520));
    }

    let file = dir.join("cli-t5.png");
    let (code, text) = posattn(&["plot", "--scheme", "t5", "--out", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(png_size(&file), (1400, 520));
    let (code, text) = posattn(&[
        "plot",
        "--scheme",
        "rotary",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `scheme`"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
