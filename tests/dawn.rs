//! Dawn, the WebGPU implementation of Chromium-based browsers and many native apps, through npm's
//! `webgpu` package (Dawn for Node, prebuilt; tests/dawn). Its WGSL compiler Tint follows the
//! specification more strictly than naga, and translates WGSL to SPIR-V on its own, so these
//! tests catch what only naga's reading of the kernels happens to accept.
//!
//! - Every kernel variant is compiled by Tint: any error, warning or note fails it.
//! - The quick subset's RoPE cases (one kernel) run their math on Dawn: written out as bundles
//!   (posattn::harness::bundle), tests/dawn/cases.mjs runs them with a NaN-poisoned output and checks them
//!   with the conformance tolerance rule, and the outputs are checked here again with
//!   `check::compare`.
//!
//! Dawn refuses Mesa 22.3's lavapipe, so the runner uses SwiftShader's Vulkan driver, which
//! Debian's chromium package ships (tests/dawn/gpu.mjs). Node, the npm package (`npm ci` in
//! tests/dawn) or a Dawn adapter missing is reported as "not run"; with `POSATTN_REQUIRE_DAWN`
//! set (CI) it is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use posattn::harness::bundle;
use posattn::harness::check::{self, Status};
use posattn::kernel::export;

const REQUIRE: &str = "POSATTN_REQUIRE_DAWN";
/// Exit status of the runners when Dawn finds no adapter.
const NO_ADAPTER: i32 = 3;

fn runner_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dawn")
}

fn not_run(why: &str) {
    assert!(
        std::env::var_os(REQUIRE).is_none(),
        "{why} ({REQUIRE} is set, so this is a failure)"
    );
    println!("Dawn checks NOT RUN: {why}");
}

/// Whether node and the npm package are there; if not, reported (or a failure when required).
fn have_node_and_package() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        not_run("node not found (Debian: apt-get install nodejs)");
        return false;
    }
    if !runner_dir().join("node_modules/webgpu").is_dir() {
        not_run("npm package `webgpu` missing (run `npm ci` in tests/dawn)");
        return false;
    }
    true
}

/// Runs a runner script; returns its exit status and output, or None when Dawn has no adapter.
fn node(script: &str, args: &[&Path]) -> Option<(i32, String)> {
    let out = Command::new("node")
        .arg(runner_dir().join(script))
        .args(args)
        .output()
        .expect("run node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().unwrap_or(-1);
    if code == NO_ADAPTER {
        not_run(&format!("Dawn found no adapter: {}", text.trim()));
        return None;
    }
    Some((code, text))
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("posattn-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn tint_accepts_every_variant() {
    if !have_node_and_package() {
        return;
    }
    let dir = scratch("tint");
    let keys = export::all_variants();
    let paths = export::write_all(&dir, export::Lang::Wgsl).expect("write the variants");
    assert_eq!(paths.len(), keys.len());
    let manifest: Vec<_> = keys
        .iter()
        .zip(&paths)
        .map(|(k, p)| serde_json::json!({"name": k.name(), "file": p, "entry": k.entry_point()}))
        .collect();
    let list = dir.join("variants.json");
    std::fs::write(&list, serde_json::to_string(&manifest).unwrap()).unwrap();
    let start = Instant::now();
    let Some((code, text)) = node("tint.mjs", &[&list]) else {
        return;
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(code, 0, "Tint rejected variants:\n{text}");
    let summary = format!("tint: {} modules, 0 failed", keys.len());
    assert!(text.contains(&summary), "expected `{summary}` in:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    let adapter = text.lines().next().unwrap_or("");
    println!(
        "{} variants accepted by Tint with no message, {secs:.1} s ({adapter})",
        keys.len()
    );
}

/// The decode kernel's subgroup forms (`enable subgroups;`, subgroupAdd and shuffle
/// butterflies): Tint checks them, uniformity analysis included, where Dawn's device has the
/// `subgroups` feature; without it they are reported as not run.
#[test]
fn tint_accepts_subgroup_variants() {
    if !have_node_and_package() {
        return;
    }
    let dir = scratch("tint-subgroups");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = Vec::new();
    for key in posattn::kernel::KernelKey::subgroup_examples() {
        let module = export::Module::new(key).expect("naga reads the variant");
        let path = dir.join(export::file_name(&key, export::Lang::Wgsl));
        std::fs::write(&path, module.emit(export::Lang::Wgsl).unwrap()).unwrap();
        manifest.push(serde_json::json!({
            "name": key.name(), "file": path, "entry": key.entry_point(),
            "features": ["subgroups"],
        }));
    }
    assert!(!manifest.is_empty());
    let list = dir.join("variants.json");
    std::fs::write(&list, serde_json::to_string(&manifest).unwrap()).unwrap();
    let Some((code, text)) = node("tint.mjs", &[&list]) else {
        return;
    };
    assert_eq!(code, 0, "Tint rejected subgroup variants:\n{text}");
    let summary = format!("tint: {} modules, 0 failed", manifest.len());
    assert!(text.contains(&summary), "expected `{summary}` in:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} subgroup variants accepted by Tint with no message",
        manifest.len()
    );
}

/// Custom schemes' variants (every hook: score, mask with tile predicate, rotation), at one and
/// at eight rows per invocation: Tint reads the generated glue and the snippets too.
#[test]
fn tint_accepts_custom_scheme_variants() {
    if !have_node_and_package() {
        return;
    }
    use posattn::PositionEncoding;
    use posattn::harness::custom;
    let dir = scratch("tint-custom");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = Vec::new();
    for enc in [
        custom::alibi(4),
        custom::window_mask(40, true),
        custom::rope(10000.0, 64),
    ] {
        let PositionEncoding::Custom(c) = enc else {
            unreachable!()
        };
        let checked = c.check(4).expect("check");
        for rows in [1, 8] {
            let key = posattn::kernel::KernelKey::fused_custom(64, rows, checked.id);
            let path = dir.join(format!("{}.wgsl", key.name()));
            std::fs::write(
                &path,
                key.try_wgsl_with(Some(&checked.hooks_wgsl())).unwrap(),
            )
            .unwrap();
            manifest.push(
                serde_json::json!({"name": key.name(), "file": path, "entry": key.entry_point()}),
            );
        }
    }
    let list = dir.join("variants.json");
    std::fs::write(&list, serde_json::to_string(&manifest).unwrap()).unwrap();
    let Some((code, text)) = node("tint.mjs", &[&list]) else {
        return;
    };
    assert_eq!(code, 0, "Tint rejected custom variants:\n{text}");
    let summary = format!("tint: {} modules, 0 failed", manifest.len());
    assert!(text.contains(&summary), "expected `{summary}` in:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} custom-scheme variants accepted by Tint with no message",
        manifest.len()
    );
}

/// The quick conformance subset's cases that share its RoPE kernel (f32, head_dim 64, one row
/// per invocation): the case bundles' path through Dawn, one kernel to compile. The whole quick
/// matrix, half dtypes included, runs on Dawn through the crate's own WebGPU path in headless
/// Chromium (tests/browser.rs), where each kernel costs the same SwiftShader compile again.
fn dawn_cases() -> Vec<check::Case> {
    let cases: Vec<check::Case> = check::quick_cases()
        .into_iter()
        .filter(|c| c.encoding.starts_with("rope"))
        .collect();
    let kernel = |c: &check::Case| {
        check::case_kernel(c, |_| 1, posattn::HalfForm::Packed).expect("a case's kernel")
    };
    let first = kernel(&cases[0]);
    cases.into_iter().filter(|c| kernel(c) == first).collect()
}

/// Splits the cases into `n` lists with whole kernels in each (compiling a kernel on SwiftShader
/// takes seconds, running a case a fraction of that), largest kernel groups first, each to the
/// list with the fewest kernels.
fn split_by_kernel(written: &[bundle::WrittenCase], n: usize) -> Vec<Vec<&str>> {
    let mut kernels: Vec<(&str, Vec<&str>)> = Vec::new();
    for w in written {
        match kernels.iter_mut().find(|k| k.0 == w.kernel) {
            Some(k) => k.1.push(&w.name),
            None => kernels.push((&w.kernel, vec![&w.name])),
        }
    }
    kernels.sort_by_key(|k| std::cmp::Reverse(k.1.len()));
    let mut lists: Vec<(usize, Vec<&str>)> = vec![(0, Vec::new()); n.min(kernels.len())];
    for (_, names) in kernels {
        let list = lists.iter_mut().min_by_key(|l| l.0).unwrap();
        list.0 += 1;
        list.1.extend(names);
    }
    lists.into_iter().map(|l| l.1).collect()
}

#[test]
fn quick_subset_runs_on_dawn() {
    if !have_node_and_package() {
        return;
    }
    let dir = scratch("dawn-cases");
    let cases = dawn_cases();
    let written = bundle::write_cases(&dir, &cases, 1).expect("write the case bundles");
    // One runner per core: each compiles its own kernels (Dawn compiles one at a time).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lists = split_by_kernel(&written, cores.min(4));
    let start = Instant::now();
    let runs: Vec<Option<(i32, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = lists
            .iter()
            .enumerate()
            .map(|(i, names)| {
                let list = dir.join(format!("list{i}.json"));
                std::fs::write(&list, serde_json::to_string(names).unwrap()).unwrap();
                let dir = &dir;
                s.spawn(move || node("cases.mjs", &[dir, &list]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut ran = 0;
    for (run, names) in runs.iter().zip(&lists) {
        let Some((code, text)) = run else {
            return;
        };
        println!("{text}");
        assert_eq!(*code, 0, "cases failed on Dawn:\n{text}");
        let summary = format!("dawn: {} cases, 0 failed", names.len());
        assert!(text.contains(&summary), "expected `{summary}` in:\n{text}");
        ran += names.len();
    }
    assert_eq!(ran, written.len());
    // The runner's verdict, checked again with the harness's own comparison.
    for w in &written {
        let bytes = std::fs::read(w.dir.join("out.f32")).expect("the runner's output");
        let out: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (status, err, _, bound) = check::compare(&out, &w.ref64, &w.ref32);
        assert_eq!(status, Status::Pass, "{} ({})", w.name, w.kernel);
        assert!(err <= w.bound && bound == w.bound, "{}", w.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let names: Vec<&str> = written.iter().map(|w| w.name.as_str()).collect();
    let mut kernels: Vec<&str> = written.iter().map(|w| w.kernel.as_str()).collect();
    kernels.sort_unstable();
    kernels.dedup();
    println!(
        "{} quick cases ({} kernels) passed on Dawn in {secs:.1} s with {} runners: {}",
        names.len(),
        kernels.len(),
        lists.len(),
        names.join(", ")
    );
}
