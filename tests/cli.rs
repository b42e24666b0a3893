//! The `posattn` command end to end: `run` on tensors dumped from a Hugging Face Llama attention
//! (Llama 3.1 RoPE scaling, GQA, causal, positions 100..148; tests/golden/gen_llama_attention.py)
//! reproduces it within the tolerance rule, and malformed or hostile files and specs give a clear
//! error and exit code 2, never a panic. A property test drives the parsers with arbitrary bytes.

use std::path::{Path, PathBuf};

use posattn::files::{parse_npy, parse_positions, parse_spec};
use proptest::prelude::*;

use crate::common::{have_adapter, posattn};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama_attention")
}

#[test]
fn run_reproduces_a_hugging_face_llama_attention() {
    if !have_adapter("the GPU half of the CLI test") {
        return;
    }
    let g = golden();
    let out = std::env::temp_dir().join(format!("posattn-cli-{}.npy", std::process::id()));
    let p = |f: &str| g.join(f).to_string_lossy().into_owned();
    let (code, text) = posattn(&[
        "run",
        "--q",
        &p("q.npy"),
        "--k",
        &p("k.npy"),
        "--v",
        &p("v.npy"),
        "--positions-q",
        &p("positions.npy"),
        "--positions-k",
        &p("positions.npy"),
        "--spec",
        &p("spec.json"),
        "--out",
        out.to_str().unwrap(),
        "--compare",
        &p("out.npy"),
    ]);
    println!("{text}");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("posattn and the given reference agree within the tolerance rule"),
        "{text}"
    );
    // The written file is a valid .npy of the output's shape.
    let written = parse_npy("out", &std::fs::read(&out).unwrap(), Some(4)).unwrap();
    assert_eq!(written.shape, vec![2, 48, 8, 64]);
    let _ = std::fs::remove_file(out);
}

/// `run --bias`: a caller bias broadcast over heads, with −inf entries, on the same tensors and a
/// window; the output matches the f64 reference with that bias.
#[test]
fn run_takes_a_bias_file() {
    if !have_adapter("the GPU half of the CLI test") {
        return;
    }
    let g = golden();
    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let (out, bias_path, spec_path) = (
        tmp.join(format!("posattn-bias-out-{id}.npy")),
        tmp.join(format!("posattn-bias-{id}.npy")),
        tmp.join(format!("posattn-bias-spec-{id}.json")),
    );
    let load = |f: &'static str| parse_npy(f, &std::fs::read(g.join(f)).unwrap(), Some(4)).unwrap();
    let (q, k, v) = (load("q.npy"), load("k.npy"), load("v.npy"));
    let (b, s) = (q.shape[0] as usize, q.shape[1] as usize);
    let mut rng = posattn::harness::check::SplitMix::new(5);
    let bias: Vec<f32> = (0..b * s * s)
        .map(|i| {
            if i % 7 == 3 {
                f32::NEG_INFINITY
            } else {
                rng.uniform()
            }
        })
        .collect();
    let shape = [b as u64, 1, s as u64, s as u64];
    posattn::files::write_npy(&bias_path, &shape, &bias).unwrap();
    let spec_text = r#"{"causal": true, "position": {"type": "rope", "theta": 500000},
                        "window": {"left": 20}, "softcap": 20}"#;
    std::fs::write(&spec_path, spec_text).unwrap();
    let run = || {
        let arg = |p: &Path| p.to_str().unwrap().to_string();
        let args = [
            "run".into(),
            "--q".into(),
            arg(&g.join("q.npy")),
            "--k".into(),
            arg(&g.join("k.npy")),
            "--v".into(),
            arg(&g.join("v.npy")),
            "--bias".into(),
            arg(&bias_path),
            "--spec".into(),
            arg(&spec_path),
            "--out".into(),
            arg(&out),
        ];
        posattn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, text) = run();
    assert_eq!(code, 0, "{text}");
    let got = parse_npy("out", &std::fs::read(&out).unwrap(), Some(4)).unwrap();
    let dims = [
        b as u32,
        s as u32,
        s as u32,
        q.shape[2] as u32,
        k.shape[2] as u32,
        64,
    ];
    let mut spec = parse_spec(spec_text, dims, Path::new("."), s as i64).unwrap();
    spec.bias = Some(posattn::BiasLayout {
        broadcast_batch: false,
        broadcast_heads: true,
    });
    let (pq, pk) = spec.default_positions();
    let r = |bias| {
        posattn::harness::reference::attention_with_bias::<f64>(
            &spec, &q.data, &k.data, &v.data, &pq, &pk, bias,
        )
    };
    let r32 = posattn::harness::reference::attention_with_bias::<f32>(
        &spec,
        &q.data,
        &k.data,
        &v.data,
        &pq,
        &pk,
        Some(&bias),
    );
    let (status, err, _, bound) =
        posattn::harness::check::compare(&got.data, &r(Some(&bias)), &r32);
    assert_eq!(
        status,
        posattn::harness::check::Status::Pass,
        "{err} > {bound}"
    );
    // The bias mattered: without it the reference differs.
    let plain = r(None);
    assert!(
        got.data
            .iter()
            .zip(&plain)
            .any(|(a, b)| (*a as f64 - b).abs() > 1e-3)
    );
    // A bias whose shape does not fit is a clear error.
    posattn::files::write_npy(
        &bias_path,
        &[b as u64, 3, s as u64, s as u64],
        &vec![0.0; b * 3 * s * s],
    )
    .unwrap();
    let (code, text) = run();
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("bias"), "{text}");
    for f in [out, bias_path, spec_path] {
        let _ = std::fs::remove_file(f);
    }
}

/// A .npy header for `descr` and `shape`, followed by `payload` bytes.
fn npy(descr: &str, shape: &str, payload: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, payload));
    out
}

#[test]
fn malformed_files_are_clear_errors() {
    let field = |r: posattn::Result<posattn::files::Tensor>| match r {
        Err(posattn::Error::Invalid {
            field, expected, ..
        }) => format!("{field}: {expected}"),
        Ok(t) => panic!("accepted {:?}", t.shape),
        Err(e) => panic!("{e}"),
    };
    // Valid, for contrast.
    assert_eq!(
        parse_npy("q", &npy("<f4", "(1, 2, 1, 4)", 32), Some(4))
            .unwrap()
            .data
            .len(),
        8
    );
    // Wrong dtype, wrong rank, big-endian, truncated data, a header that claims gigabytes.
    assert!(field(parse_npy("q", &npy("<c8", "(1, 2, 1, 4)", 64), Some(4))).contains("dtype"));
    assert!(field(parse_npy("q", &npy("<f4", "(2, 4)", 32), Some(4))).contains("rank 4"));
    assert!(
        field(parse_npy("q", &npy(">f4", "(1, 2, 1, 4)", 32), Some(4))).contains("little-endian")
    );
    assert!(
        field(parse_npy("q", &npy("<f4", "(1, 2, 1, 4)", 31), Some(4))).contains("header says")
    );
    assert!(
        field(parse_npy(
            "q",
            &npy("<f4", "(100000, 100000, 1000, 64)", 16),
            Some(4)
        ))
        .contains("header says")
    );
    assert!(
        field(parse_npy(
            "q",
            &npy("<f4", "(18446744073709551615, 2, 2, 2)", 16),
            Some(4)
        ))
        .contains("64 bits")
    );
    assert!(field(parse_npy("q", b"not a numpy file at all", Some(4))).contains("valid .npy"));
    // Positions: float dtype, wrong length, out of range.
    let pos_err = |r: posattn::Result<Vec<i32>>| match r {
        Err(posattn::Error::Invalid { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        pos_err(parse_positions(
            "positions_q",
            &npy("<f4", "(4,)", 16),
            1,
            4
        )),
        "positions_q"
    );
    assert_eq!(
        pos_err(parse_positions(
            "positions_q",
            &npy("<i4", "(5,)", 20),
            1,
            4
        )),
        "positions_q"
    );
    let mut far = npy("<i8", "(1,)", 0);
    far.extend_from_slice(&(1i64 << 40).to_le_bytes());
    assert_eq!(
        pos_err(parse_positions("positions_k", &far, 1, 1)),
        "positions_k"
    );
}

#[test]
fn malformed_specs_are_clear_errors() {
    let shape = [1, 4, 4, 2, 2, 64];
    let dir = Path::new(".");
    let err = |text: &str| match parse_spec(text, shape, dir, 3) {
        Err(e) if e.is_invalid() => e.path().unwrap().to_string(),
        other => panic!("{text}: {other:?}"),
    };
    assert!(
        parse_spec(
            r#"{"causal": false, "position": {"type": "rope", "theta": 1e4}}"#,
            shape,
            dir,
            3
        )
        .is_ok()
    );
    assert_eq!(err("[1, 2"), "spec");
    assert_eq!(err("[]"), "spec");
    assert_eq!(err(r#"{"casual": true}"#), "casual");
    assert_eq!(err(r#"{"causal": "yes"}"#), "causal");
    assert_eq!(
        err(r#"{"position": {"type": "rope", "theta": "NaN"}}"#),
        "position.theta"
    );
    assert_eq!(
        err(r#"{"position": {"type": "rope", "theta": -3}}"#),
        "rope.theta"
    );
    assert_eq!(err(r#"{"position": {"type": "warp"}}"#), "position.type");
    assert_eq!(
        err(r#"{"position": {"type": "alibi", "slopes": [1, 2, 3]}}"#),
        "alibi.slopes"
    );
    assert_eq!(
        err(
            r#"{"position": {"type": "hf", "rope_parameters": {"rope_type": "yarn", "factor": 4}}}"#
        ),
        "position.rope_parameters.original_max_position_embeddings"
    );
    assert_eq!(
        err(r#"{"position": {"type": "hf_config", "path": "/nonexistent/config.json"}}"#),
        "position.path"
    );
    assert_eq!(err(r#"{"scale": 1e999}"#), "scale");
    // Masks, extras and the table-driven biases.
    let ok = |text: &str| parse_spec(text, shape, dir, 3).unwrap();
    let s = ok(
        r#"{"position": {"type": "rope"}, "window": {"left": 16}, "sink_tokens": 4,
                  "softcap": 30, "sink_logits": [0.5, 1],
                  "extrapolation": {"type": "streaming_cache_index"}}"#,
    );
    assert_eq!(
        s.window,
        posattn::Window {
            left: Some(16),
            right: None
        }
    );
    assert_eq!(s.sink_tokens, 4);
    assert_eq!(s.softcap, Some(30.0));
    assert_eq!(s.extrapolation, posattn::Extrapolation::StreamingCacheIndex);
    let s = ok(r#"{"position": {"type": "rope"},
                  "extrapolation": {"type": "rerope", "window": 8, "leak": 4}}"#);
    assert_eq!(
        s.extrapolation,
        posattn::Extrapolation::ReRope {
            window: 8,
            leak: Some(4.0)
        }
    );
    ok(
        r#"{"position": {"type": "t5", "num_buckets": 8, "max_distance": 16, "table": [
           0,1,2,3,4,5,6,7,0,1,2,3,4,5,6,7]}}"#,
    );
    ok(r#"{"position": {"type": "kerple", "form": "power", "p": [1, 1.5], "a": [0.1, 0.2]}}"#);
    ok(r#"{"position": {"type": "sandwich"}}"#);
    ok(r#"{"position": {"type": "fire", "w1": [1], "b1": [0], "w2": [1, 2], "b2": [0, 0]}}"#);
    assert_eq!(
        err(r#"{"position": {"type": "t5", "table": [1, 2]}}"#),
        "t5.table"
    );
    assert_eq!(
        err(r#"{"position": {"type": "kerple", "form": "cubic", "p": [], "a": []}}"#),
        "position.form"
    );
    assert_eq!(
        err(r#"{"position": {"type": "fire", "w1": [1]}}"#),
        "position.b1"
    );
    assert_eq!(err(r#"{"window": 5}"#), "window");
    assert_eq!(err(r#"{"sink_tokens": 4}"#), "sink_tokens");
    assert_eq!(err(r#"{"softcap": -1}"#), "softcap");
    assert_eq!(err(r#"{"sink_logits": [1, 2, 3]}"#), "sink_logits");
    assert_eq!(
        err(r#"{"extrapolation": {"type": "rerope", "window": 8}}"#),
        "extrapolation"
    );
    assert_eq!(
        err(r#"{"position": {"type": "rope"}, "extrapolation": {"type": "warp"}}"#),
        "extrapolation.type"
    );
}

#[test]
fn bench_and_check_reject_bad_sizes_before_opening_an_adapter() {
    let (code, text) = posattn(&["bench", "--head-dim", "64,65", "--seq", "64"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `head_dim`") && text.contains("got 65"),
        "{text}"
    );
    assert!(!text.contains("matmul roof"), "{text}");
    let (code, text) = posattn(&["bench", "--decode", "--head-dim", "128"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `--head-dim`"), "{text}");
    // Lanes per row: a count no kernel is built with, or with decode.
    let (code, text) = posattn(&["bench", "--row-lanes", "2,3", "--seq", "64"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `row_lanes`") && text.contains("got 3"),
        "{text}"
    );
    assert!(!text.contains("matmul roof"), "{text}");
    let (code, text) = posattn(&["bench", "--decode", "--row-lanes", "4"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `--row-lanes`"), "{text}");
    // Query blocks: a size no kernel is built with, or with decode.
    let (code, text) = posattn(&["bench", "--block-q", "128,96", "--seq", "64"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `block_q`") && text.contains("got 96"),
        "{text}"
    );
    assert!(!text.contains("matmul roof"), "{text}");
    let (code, text) = posattn(&["bench", "--decode", "--block-q", "256"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `--block-q`"), "{text}");
    // Decode lanes per key: a count no kernel is built with, or with prefill.
    let (code, text) = posattn(&["bench", "--decode", "--lanes", "4,32"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `lanes`") && text.contains("got 32"),
        "{text}"
    );
    assert!(!text.contains("copy roof"), "{text}");
    let (code, text) = posattn(&["bench", "--lanes", "8", "--seq", "64"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `--lanes`"), "{text}");
    assert!(!text.contains("matmul roof"), "{text}");
    // Decode keys per softmax step: a count no kernel is built with, or with prefill.
    let (code, text) = posattn(&["bench", "--decode", "--keys-per-step", "2,3"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `keys_per_step`") && text.contains("got 3"),
        "{text}"
    );
    assert!(!text.contains("copy roof"), "{text}");
    let (code, text) = posattn(&["bench", "--keys-per-step", "2", "--seq", "64"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `--keys-per-step`"), "{text}");
    assert!(!text.contains("matmul roof"), "{text}");
    let (code, text) = posattn(&["check", "--quick", "--row-lanes", "16"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `--row-lanes`") && text.contains("got 16"),
        "{text}"
    );
    assert!(!text.contains("adapters found"), "{text}");
    let (code, text) = posattn(&["check", "--quick", "--threads", "0"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid `--threads`") && text.contains("got 0"),
        "{text}"
    );
    assert!(!text.contains("adapters found"), "{text}");
}

#[test]
fn the_command_reports_bad_files_with_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("posattn-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.npy");
    std::fs::write(&bad, npy("<f4", "(100000, 100000, 1000, 64)", 16)).unwrap();
    let spec = dir.join("spec.json");
    std::fs::write(&spec, [0xff, 0xfe, 0x00]).unwrap();
    let b = bad.to_str().unwrap();
    let (code, text) = posattn(&[
        "run",
        "--q",
        b,
        "--k",
        b,
        "--v",
        b,
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        "/dev/null",
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("error: invalid `q`"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let g = golden();
    let q = g.join("q.npy");
    let k = g.join("k.npy");
    let (code, text) = posattn(&[
        "run",
        "--q",
        q.to_str().unwrap(),
        "--k",
        k.to_str().unwrap(),
        "--v",
        k.to_str().unwrap(),
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        "/dev/null",
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("invalid `spec`"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn npy_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_npy("q", &bytes, Some(4));
        let _ = parse_positions("positions_q", &bytes, 2, 3);
    }

    #[test]
    fn npy_parser_survives_mutated_headers(
        descr in prop::sample::select(vec!["<f4", "<f2", "<f8", "<i4", "<i8", ">f4", "|u1", "<c8", "O"]),
        dims in proptest::collection::vec(0u64..1u64 << 40, 0..6),
        payload in 0usize..256,
        flip in any::<(usize, u8)>(),
    ) {
        let shape = format!("({}{})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "), if dims.len() == 1 { "," } else { "" });
        let mut bytes = npy(descr, &shape, payload);
        let i = flip.0 % bytes.len();
        bytes[i] ^= flip.1;
        if let Ok(t) = parse_npy("q", &bytes, None) {
            prop_assert!(t.data.len() as u64 * 2 <= bytes.len() as u64);
        }
    }

    #[test]
    fn spec_parser_never_panics(text in "\\PC{0,200}") {
        let _ = parse_spec(&text, [1, 4, 4, 2, 2, 64], Path::new("."), 3);
    }
}

/// `run` on f16 .npy files: the tensors are uploaded as f16 (no conversion to f32), the output
/// keeps their dtype (an `<f2` file), and its values meet `check`'s rule for half storage: the
/// references run on the f16 inputs, the plain f32 implementation's output rounded to f16.
#[test]
fn run_keeps_f16_files_in_f16() {
    let g = golden();
    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let path = |name: &str| tmp.join(format!("posattn-f16-{name}-{id}.npy"));
    let load = |f: &'static str| parse_npy(f, &std::fs::read(g.join(f)).unwrap(), Some(4)).unwrap();
    let (q, k, v) = (load("q.npy"), load("k.npy"), load("v.npy"));
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        let bytes = posattn::Dtype::F16.encode(&t.data);
        posattn::files::write_npy_bytes(&path(name), &t.shape, posattn::Dtype::F16, &bytes)
            .unwrap();
    }
    let arg = |p: PathBuf| p.to_string_lossy().into_owned();
    let spec_path = arg(g.join("spec.json"));
    let pos = arg(g.join("positions.npy"));
    let base = |out: &str| {
        vec![
            "run".to_string(),
            "--q".into(),
            arg(path("q")),
            "--k".into(),
            arg(path("k")),
            "--v".into(),
            arg(path("v")),
            "--positions-q".into(),
            pos.clone(),
            "--positions-k".into(),
            pos.clone(),
            "--spec".into(),
            spec_path.clone(),
            "--out".into(),
            arg(path(out)),
        ]
    };
    let run = |args: Vec<String>| posattn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // bf16 cannot be written as .npy: refused before any device work.
    let mut bad = base("out");
    bad.extend(["--out-dtype".to_string(), "bf16".to_string()]);
    let (code, text) = run(bad);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("out_dtype"), "{text}");
    if !have_adapter("the GPU half of the f16 CLI test") {
        return;
    }
    let (code, text) = run(base("out"));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("storage f16"), "{text}");
    let bytes = std::fs::read(path("out")).unwrap();
    let got = parse_npy("out", &bytes, Some(4)).unwrap();
    assert_eq!(
        got.stored.as_ref().map(|s| s.0),
        Some(posattn::Dtype::F16),
        "the output file is f16"
    );
    assert_eq!(got.shape, q.shape);
    // The reference on the f16 inputs, as the device saw them.
    let f16 = |t: &posattn::files::Tensor| {
        t.data
            .iter()
            .map(|x| posattn::Dtype::F16.round(*x))
            .collect::<Vec<_>>()
    };
    let (qh, kh, vh) = (f16(&q), f16(&k), f16(&v));
    let dims = [
        q.shape[0] as u32,
        q.shape[1] as u32,
        k.shape[1] as u32,
        q.shape[2] as u32,
        k.shape[2] as u32,
        q.shape[3] as u32,
    ];
    let text = std::fs::read_to_string(g.join("spec.json")).unwrap();
    let positions = parse_positions(
        "p",
        &std::fs::read(g.join("positions.npy")).unwrap(),
        q.shape[0],
        q.shape[1],
    )
    .unwrap();
    let max_pos = *positions.iter().max().unwrap() as i64;
    let spec = parse_spec(&text, dims, &g, max_pos).unwrap();
    let r64 = posattn::harness::reference::attention_with_bias::<f64>(
        &spec, &qh, &kh, &vh, &positions, &positions, None,
    );
    let mut r32 = posattn::harness::reference::attention_with_bias::<f32>(
        &spec, &qh, &kh, &vh, &positions, &positions, None,
    );
    r32.iter_mut()
        .for_each(|x| *x = posattn::Dtype::F16.round(*x));
    let (status, err, _, bound) = posattn::harness::check::compare(&got.data, &r64, &r32);
    assert_eq!(
        status,
        posattn::harness::check::Status::Pass,
        "{err} > {bound}"
    );
    for name in ["q", "k", "v", "out"] {
        let _ = std::fs::remove_file(path(name));
    }
}
