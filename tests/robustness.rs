//! Invalid input the way a new user gives it: through `posattn` on the command line. Every kind
//! below must end in a typed error naming the field (exit code 2) or, for `--compare`, in an
//! honest verdict (exit code 1 when posattn and the given reference disagree). None may pass
//! silently, panic or hang. The kinds are listed one per row and counted; the README's
//! robustness section gives the count.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn golden(f: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/llama_attention")
        .join(f)
        .to_string_lossy()
        .into_owned()
}

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("posattn-robust-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        std::fs::write(self.0.join(name), bytes).unwrap();
        self.path(name)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs posattn with `env` set, failing on a run longer than five minutes (a hang; a kernel
/// compile on a loaded software adapter can take a minute).
fn posattn(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_posattn"));
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start posattn");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("posattn {args:?} did not finish within five minutes (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A .npy file: `descr`, order and shape as given, then `payload`.
fn npy(descr: &str, fortran: bool, shape: &str, payload: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn f32s(n: usize, x: f32) -> Vec<u8> {
    std::iter::repeat_n(x.to_le_bytes(), n).flatten().collect()
}

/// `run` on the golden Llama tensors with these flags replaced or added.
fn run_args<'a>(over: &[(&'a str, &'a str)], out: &'a str) -> Vec<String> {
    let mut flags: Vec<(String, String)> = vec![
        ("--q".into(), golden("q.npy")),
        ("--k".into(), golden("k.npy")),
        ("--v".into(), golden("v.npy")),
        ("--positions-q".into(), golden("positions.npy")),
        ("--positions-k".into(), golden("positions.npy")),
        ("--spec".into(), golden("spec.json")),
        ("--out".into(), out.into()),
    ];
    for (k, v) in over {
        match flags.iter_mut().find(|(f, _)| f == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => flags.push((k.to_string(), v.to_string())),
        }
    }
    std::iter::once("run".to_string())
        .chain(flags.into_iter().flat_map(|(k, v)| [k, v]))
        .collect()
}

/// One kind of invalid input and what it must give.
struct Kind {
    what: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, std::ffi::OsString)>,
    /// Text the error must contain (the field, or path, it names).
    names: &'static str,
}

fn check(kinds: &[Kind]) {
    let mut failures = Vec::new();
    for k in kinds {
        let args: Vec<&str> = k.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &std::ffi::OsStr)> =
            k.env.iter().map(|(a, b)| (*a, b.as_os_str())).collect();
        let (code, text) = posattn(&args, &env);
        let ok = code == 2 && text.contains(k.names) && !text.contains("panicked");
        println!(
            "{} {:<58} exit {code}: {}",
            if ok { "ok  " } else { "FAIL" },
            k.what,
            text.lines().last().unwrap_or("")
        );
        if !ok {
            failures.push(format!(
                "{}: exit {code}, wanted 2 naming {}: {text}",
                k.what, k.names
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "{} kinds of invalid input, each a typed error with exit code 2",
        kinds.len()
    );
}

/// Everything refused before any device work: files, specs, configs, flags and environment.
#[test]
fn invalid_input_is_refused_with_exit_code_2() {
    let t = Tmp::new("kinds");
    let out = t.path("out.npy");
    let spec = |name: &str, text: &str| t.write(name, text);
    let cfg = |name: &str, text: &str| t.write(name, text);
    let mut kinds = Vec::new();
    let mut add = |what, over: Vec<(&str, String)>, names| {
        let over: Vec<(&str, &str)> = over.iter().map(|(a, b)| (*a, b.as_str())).collect();
        kinds.push(Kind {
            what,
            args: run_args(&over, &out),
            env: vec![],
            names,
        });
    };
    // Tensors: dtypes other than f32/f16/f64/i32/i64, one by one.
    for (what, descr, width) in [
        ("q of dtype int8", "|i1", 1),
        ("q of dtype bool", "|b1", 1),
        ("q of dtype object", "|O", 8),
        ("q of dtype unicode", "<U4", 16),
    ] {
        let f = t.write(
            &format!("{}.npy", descr.replace(['|', '<'], "")),
            npy(
                descr,
                false,
                "(2, 48, 8, 64)",
                &vec![0u8; 2 * 48 * 8 * 64 * width],
            ),
        );
        add(what, vec![("--q", f)], "invalid `q`");
    }
    // Shapes that do not fit together, and dimensions of 0 (blamed on q, not k).
    let k_batch = t.write(
        "kb.npy",
        npy("<f4", false, "(1, 48, 2, 64)", &f32s(48 * 2 * 64, 0.1)),
    );
    add(
        "k with another batch than q",
        vec![("--k", k_batch.clone()), ("--v", k_batch)],
        "invalid `k`",
    );
    let k_dim = t.write(
        "kd.npy",
        npy("<f4", false, "(2, 48, 2, 32)", &f32s(2 * 48 * 2 * 32, 0.1)),
    );
    add(
        "k with another head_dim than q",
        vec![("--k", k_dim)],
        "invalid `k`",
    );
    let v_seq = t.write(
        "vs.npy",
        npy("<f4", false, "(2, 40, 2, 64)", &f32s(2 * 40 * 2 * 64, 0.1)),
    );
    add(
        "v with another shape than k",
        vec![("--v", v_seq)],
        "invalid `v`",
    );
    let q_b0 = t.write("qb0.npy", npy("<f4", false, "(0, 48, 8, 64)", &[]));
    add("q with batch 0", vec![("--q", q_b0)], "invalid `q`");
    let q_d0 = t.write("qd0.npy", npy("<f4", false, "(2, 48, 8, 0)", &[]));
    add("q with head_dim 0", vec![("--q", q_d0)], "invalid `q`");
    // Positions.
    let mut p = (i64::MIN).to_le_bytes().to_vec();
    p.extend((1..48i64).flat_map(|x| x.to_le_bytes()));
    let pmin = t.write("pmin.npy", npy("<i8", false, "(48,)", &p));
    add(
        "an int64 position of -2^63",
        vec![("--positions-q", pmin)],
        "invalid `positions_q`",
    );
    let pf: Vec<u8> = (0..96i64).flat_map(|x| x.to_le_bytes()).collect();
    let pfort = t.write("pf.npy", npy("<i8", true, "(2, 48)", &pf));
    add(
        "Fortran-order positions",
        vec![("--positions-q", pfort)],
        "invalid `positions_q`",
    );
    // Specs: keys below the top level, types, duplicates, nesting, ranges.
    let rope = |extra: &str| format!(r#"{{"position": {{"type": "rope"{extra}}}}}"#);
    for (what, text, names, i) in [
        ("position.thetaa (a misspelt key)", rope(r#", "thetaa": 500000"#), "`position.thetaa`"),
        ("position.type of 5", r#"{"position": {"type": 5}}"#.to_string(), "`position.type`"),
        ("a position without a type", r#"{"position": {"theta": 5}}"#.to_string(), "`position.type`"),
        ("position.layout of 1", rope(r#", "layout": 1"#), "`position.layout`"),
        ("window.lft (a misspelt key)", r#"{"window": {"lft": 4}}"#.to_string(), "`window.lft`"),
        (
            "a misspelt key in extrapolation",
            r#"{"position": {"type": "rope"}, "extrapolation": {"type": "rerope", "windw": 8}}"#.to_string(),
            "`extrapolation.windw`",
        ),
        ("a key given twice", rope(r#", "theta": 1, "theta": 2"#), "`position.theta`"),
        ("JSON nested 100 deep", format!(r#"{{"position": {}1{}}}"#, "[".repeat(100), "]".repeat(100)), "nested at most"),
        ("theta 0", rope(r#", "theta": 0"#), "`rope.theta`"),
        ("window.left of -1", r#"{"window": {"left": -1}}"#.to_string(), "`window.left`"),
        ("window.right of -5", r#"{"window": {"right": -5}}"#.to_string(), "`window.right`"),
        ("softcap 3e38 (beyond f32 once scaled)", r#"{"softcap": 3e38}"#.to_string(), "`softcap`"),
        ("theta 1e-38 (angles beyond f32)", rope(r#", "theta": 1e-38"#), "`rope.theta`"),
        ("scale 1e39", r#"{"scale": 1e39}"#.to_string(), "`scale`"),
        ("attention_factor 1e20", rope(r#", "attention_factor": 1e20"#), "`rope.attention_factor`"),
        (
            "max_position_embeddings -1",
            r#"{"position": {"type": "hf", "max_position_embeddings": -1, "rope_parameters": {"rope_type": "dynamic", "factor": 2}}}"#.to_string(),
            "`position.max_position_embeddings`",
        ),
        (
            "max_position_embeddings 32.5",
            r#"{"position": {"type": "hf", "max_position_embeddings": 32.5, "rope_parameters": {"rope_type": "dynamic", "factor": 2}}}"#.to_string(),
            "`position.max_position_embeddings`",
        ),
        (
            "max_position_embeddings \"16384\"",
            r#"{"position": {"type": "hf", "max_position_embeddings": "16384", "rope_parameters": {"rope_type": "dynamic", "factor": 2}}}"#.to_string(),
            "`position.max_position_embeddings`",
        ),
        (
            "a rope dict key its rope_type does not use",
            r#"{"position": {"type": "hf", "rope_parameters": {"rope_type": "linear", "factor": 2, "beta_fast": 3}}}"#.to_string(),
            "`position.rope_parameters.beta_fast`",
        ),
        (
            "hf_config pointing to a directory",
            r#"{"position": {"type": "hf_config", "path": "."}}"#.to_string(),
            "invalid `position.path`",
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (a, b, c))| (a, b, c, i))
    {
        let f = spec(&format!("spec-{i}.json"), &text);
        add(what, vec![("--spec", f)], names);
    }
    // A config with max_position_embeddings as a string, through hf_config.
    cfg(
        "config-str.json",
        r#"{"head_dim": 64, "max_position_embeddings": "16384", "rope_scaling": {"type": "dynamic", "factor": 2}}"#,
    );
    let f = spec(
        "spec-cfg.json",
        r#"{"position": {"type": "hf_config", "path": "config-str.json"}}"#,
    );
    add(
        "config max_position_embeddings \"16384\"",
        vec![("--spec", f)],
        "`max_position_embeddings`",
    );
    // Files that are not small regular files: refused by metadata, without reading or blocking.
    let fifo = t.path("fifo.json");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "mkfifo is needed for the named-pipe case");
    add(
        "a named pipe as the spec",
        vec![("--spec", fifo)],
        "invalid `spec`",
    );
    add(
        "/dev/zero as the spec",
        vec![("--spec", "/dev/zero".into())],
        "invalid `spec`",
    );
    let sparse = t.path("sparse.json");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    add(
        "a 2 GiB sparse file as the spec",
        vec![("--spec", sparse.clone())],
        "invalid `spec`",
    );
    add(
        "a directory as q",
        vec![("--q", t.0.to_string_lossy().into_owned())],
        "invalid `q`",
    );
    // --out naming an input, and --compare of the wrong shape (checked before running).
    add(
        "--out equal to --compare",
        vec![
            ("--compare", golden("out.npy")),
            ("--out", golden("out.npy")),
        ],
        "invalid `out`",
    );
    add(
        "--out equal to --q",
        vec![("--out", golden("q.npy"))],
        "invalid `out`",
    );
    add(
        "--compare with another shape",
        vec![("--compare", golden("k.npy"))],
        "invalid `compare`",
    );
    // Flags and environment.
    for (what, filter) in [
        ("check --filter matching no case", "name=no-such-case"),
        ("check --filter that is not KEY=VALUE", "no-such-case"),
        ("check --filter with an unknown key", "colour=red"),
    ] {
        kinds.push(Kind {
            what,
            args: vec!["check".into(), "--filter".into(), filter.into()],
            env: vec![],
            names: "invalid `filter`",
        });
    }
    for (what, value) in [
        ("WGPU_BACKEND=bogus", "bogus"),
        ("WGPU_BACKEND=vulkan,bogus", "vulkan,bogus"),
        ("WGPU_BACKEND empty", ""),
    ] {
        kinds.push(Kind {
            what,
            args: run_args(&[], &out),
            env: vec![("WGPU_BACKEND", value.into())],
            names: "invalid `WGPU_BACKEND`",
        });
    }
    {
        use std::os::unix::ffi::OsStringExt;
        kinds.push(Kind {
            what: "WGPU_ADAPTER_NAME not UTF-8",
            args: vec!["info".into()],
            env: vec![(
                "WGPU_ADAPTER_NAME",
                std::ffi::OsString::from_vec(vec![0xff, 0xfe]),
            )],
            names: "invalid `WGPU_ADAPTER_NAME`",
        });
    }
    kinds.push(Kind {
        what: "--backend metal on a machine without Metal",
        args: vec!["info".into(), "--backend".into(), "metal".into()],
        env: vec![],
        names: if cfg!(target_os = "macos") {
            ""
        } else {
            "Metal exists only on Apple platforms"
        },
    });
    check(&kinds);
    // Nothing was written: every kind was refused before the run.
    assert!(!Path::new(&out).exists(), "an output was written");
    assert!(!Path::new(&sparse).exists() || std::fs::metadata(&sparse).unwrap().len() == 2 << 30);
}

/// `run --compare` tells agreement from disagreement: the true reference agrees; an all-NaN
/// reference, or one computed without RoPE, disagrees with exit code 1 and the element named.
#[test]
fn compare_is_honest() {
    if !crate::common::have_adapter("the --compare verdicts") {
        return;
    }
    let t = Tmp::new("compare");
    let out = t.path("out.npy");
    let (code, text) = posattn(
        &run_args(&[("--compare", &golden("out.npy"))], &out)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("agree within the tolerance rule"), "{text}");
    let nan = t.write(
        "nan.npy",
        npy(
            "<f4",
            false,
            "(2, 48, 8, 64)",
            &f32s(2 * 48 * 8 * 64, f32::NAN),
        ),
    );
    let no_rope_spec = t.write("norope.json", r#"{"causal": true}"#);
    let no_rope = t.path("norope.npy");
    let args = run_args(&[("--spec", &no_rope_spec)], &no_rope);
    let (code, text) = posattn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(code, 0, "{text}");
    for (what, reference) in [("all NaN", &nan), ("computed without RoPE", &no_rope)] {
        let args = run_args(&[("--compare", reference)], &out);
        let (code, text) = posattn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        println!("reference {what}: exit {code}\n{text}");
        assert_eq!(code, 1, "a reference {what} must disagree: {text}");
        assert!(
            text.contains("DISAGREE") && text.contains("element ["),
            "{text}"
        );
    }
}
