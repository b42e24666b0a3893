//! Structure-aware fuzzing of every parser a user's file reaches: .npy tensors and positions
//! (valid headers with mutated fields), run specs (valid specs of every position type with
//! mutated values, types and keys) and Hugging Face configs (every rope type, mutated the same
//! way). Random bytes rarely get past a magic number or JSON's syntax; these inputs are built
//! to get past them and then break one thing.
//!
//! Each parser must never panic, and the checkable promises must hold: an accepted tensor has
//! the size its header claims and no more data than the file, and a key that was inserted where
//! none belongs is always an error naming that key's path.
//!
//! `cargo test --release --test suite fuzz::` runs `POSATTN_FUZZ_INPUTS` inputs per parser (default
//! 20 000, a few seconds, as CI runs it); `POSATTN_FUZZ_SEED` changes the seed. The count is
//! printed per parser with its time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use posattn::RopeConfig;
use posattn::files::{parse_npy, parse_positions, parse_spec};
use serde_json::{Value, json};

/// splitmix64: small, seedable, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn inputs() -> u64 {
    std::env::var("POSATTN_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("POSATTN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED)
}

/// Runs `one` on `inputs()` generated cases; a panic fails with the input that caused it.
fn fuzz(name: &str, mut one: impl FnMut(&mut Rng) -> (String, Result<(), String>)) {
    let n = inputs();
    let mut rng = Rng(seed() ^ name.len() as u64);
    let start = Instant::now();
    for i in 0..n {
        let mut input = String::new();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let (shown, r) = one(&mut rng);
            input = shown;
            r
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(broken)) => panic!("{name} input {i}: {broken}\ninput: {input}"),
            Err(_) => panic!("{name} input {i} panicked (seed {})", seed()),
        }
    }
    println!(
        "fuzz {name}: {n} inputs, no panic, every promise held, {:.1?} ({:.0} inputs/s)",
        start.elapsed(),
        n as f64 / start.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// .npy

const DESCRS: &[&str] = &[
    "<f4", "<f2", "<f8", "<i4", "<i8", "|i1", "|u1", "|b1", "|O", "<U4", ">f4", ">i8", "<c8",
    "<i2", "<u4", "|V8", "<f16", "", "f4", "<f", "<M8[s]",
];

fn dim(rng: &mut Rng) -> u64 {
    *rng.pick(&[
        0,
        1,
        2,
        3,
        4,
        7,
        64,
        1 << 31,
        1 << 32,
        1 << 40,
        u64::MAX / 3,
        i64::MAX as u64,
    ])
}

/// A .npy file: a valid header for a random dtype, order and shape, a payload that often
/// matches the header exactly, then one or two mutations of the header's fields or bytes.
fn npy_case(rng: &mut Rng) -> Vec<u8> {
    let descr = *rng.pick(DESCRS);
    let rank = rng.below(6);
    let dims: Vec<u64> = (0..rank)
        .map(|_| {
            if rng.chance(3) {
                dim(rng)
            } else {
                1 + rng.below(4) as u64
            }
        })
        .collect();
    let shape = format!(
        "({}{})",
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if dims.len() == 1 { "," } else { "" }
    );
    let fortran = if rng.chance(4) { "True" } else { "False" };
    let mut fields = vec![
        format!("'descr': '{descr}'"),
        format!("'fortran_order': {fortran}"),
        format!("'shape': {shape}"),
    ];
    match rng.below(8) {
        0 => {
            fields.remove(rng.below(3));
        }
        1 => fields.push("'extra': 1".into()),
        2 => {
            let i = rng.below(3);
            let dup = fields[i].clone();
            fields.push(dup);
        }
        3 => {
            let i = rng.below(3);
            fields[i] = fields[i].replacen('\'', "\"", 2);
        }
        4 => fields[2] = "'shape': (-1, 4)".into(),
        5 => fields[2] = format!("'shape': [{}]", dims.len()),
        _ => {}
    }
    let mut header = format!("{{{}, }}", fields.join(", "));
    let v2 = rng.chance(5);
    let pre = if v2 { 12 } else { 10 };
    while (pre + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.push(if v2 { 2 } else { 1 });
    out.push(0);
    if v2 {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    let width = match descr.as_bytes().last() {
        Some(b'8') => 8,
        Some(b'2') => 2,
        Some(b'1') => 1,
        _ => 4,
    };
    let claimed = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|c| c.checked_mul(width))
        .unwrap_or(u64::MAX);
    let payload = if claimed <= 512 && !rng.chance(4) {
        claimed as usize
    } else {
        rng.below(300)
    };
    for _ in 0..payload {
        out.push(rng.next() as u8);
    }
    for _ in 0..rng.below(3) {
        if out.is_empty() {
            break;
        }
        match rng.below(4) {
            0 => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(out.len());
                out.truncate(i);
            }
            2 if out.len() > 9 => {
                out[8] = rng.next() as u8;
                out[9] = rng.next() as u8;
            }
            _ => {
                let i = 10 + rng.below(header.len());
                if i < out.len() {
                    out[i] = *rng.pick(b"{}()[],:' \"0123456789-.eE\nTF");
                }
            }
        }
    }
    out
}

fn show_bytes(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

#[test]
fn npy_tensors() {
    fuzz("npy tensors (parse_npy)", |rng| {
        let bytes = npy_case(rng);
        let rank = if rng.chance(2) { Some(4) } else { None };
        let r = match parse_npy("q", &bytes, rank) {
            Ok(t) => {
                let n = t.shape.iter().product::<u64>();
                if n != t.data.len() as u64 {
                    Err(format!("shape {:?} but {} values", t.shape, t.data.len()))
                } else if t.data.len() as u64 * 2 > bytes.len() as u64 {
                    Err(format!(
                        "{} values from {} bytes",
                        t.data.len(),
                        bytes.len()
                    ))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.field() == Some("q") => Ok(()),
            Err(e) => Err(format!("error names the wrong field: {e}")),
        };
        (show_bytes(&bytes), r)
    });
}

#[test]
fn npy_positions() {
    fuzz("npy positions (parse_positions)", |rng| {
        let bytes = npy_case(rng);
        let (b, s) = (1 + rng.below(3) as u64, 1 + rng.below(4) as u64);
        let r = match parse_positions("positions_q", &bytes, b, s) {
            Ok(p) if p.len() as u64 != b * s => {
                Err(format!("{} positions for [{b}, {s}]", p.len()))
            }
            Ok(p) if p.iter().any(|x| x.unsigned_abs() > 1 << 30) => {
                Err("a position beyond ±2^30 accepted".into())
            }
            Ok(_) => Ok(()),
            Err(e) if e.field() == Some("positions_q") => Ok(()),
            Err(e) => Err(format!("error names the wrong field: {e}")),
        };
        (show_bytes(&bytes), r)
    });
}

// ---------------------------------------------------------------------------------------------
// JSON values, mutated

/// A value of a random JSON type, often one a field would not take.
fn any_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 2 { 9 } else { 11 }) {
        0 => Value::Null,
        1 => json!(rng.chance(2)),
        2 => json!(*rng.pick(&[-1i64, 0, 1, 2, 7, 64, 4096, i64::MIN, i64::MAX])),
        3 => json!(*rng.pick(&[u64::MAX, 1 << 32, 1 << 31])),
        4 => json!(*rng.pick(&[0.5, -0.0, 1e-38, 1e-45, 3e38, 1e39, 1e300, -1e300, 32.5])),
        5 => json!(*rng.pick(&[
            "", "none", "rope", "half", "NaN", "standard", "yarn", "16384"
        ])),
        6 => json!([]),
        7 => json!([1, 2.5, -3]),
        8 => json!("x".repeat(rng.below(40))),
        9 => json!([any_value(rng, depth + 1), any_value(rng, depth + 1)]),
        _ => json!({"k": any_value(rng, depth + 1)}),
    }
}

const TYPO_KEYS: &[&str] = &[
    "thetaa", "lft", "Type", "rope_typ", "factr", "layoutt", "", " ", "type ", "windw", "x",
];

/// Every path to a value inside `v` (objects only; list elements by index).
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                prefix.push(k.clone());
                out.push(prefix.clone());
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(3) {
                prefix.push(i.to_string());
                out.push(prefix.clone());
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, seg| match v {
        Value::Object(m) => m.get_mut(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    })
}

/// What a mutation promises about the result.
enum Promise {
    /// Nothing but no panic (the value may still be valid).
    None,
    /// An error whose path is this (dotted) path: a key inserted where no key of that name
    /// belongs.
    ErrorAt(String),
}

/// One mutation of `doc`: a value replaced by one of another type, a key inserted, renamed or
/// removed, an object nested deeply. `keyed` lists the object paths whose keys are closed (where
/// an inserted unknown key must be refused).
fn mutate(rng: &mut Rng, doc: &mut Value, closed: &dyn Fn(&[String]) -> Option<String>) -> Promise {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all);
    let objects: Vec<Vec<String>> = std::iter::once(Vec::new())
        .chain(all.iter().cloned())
        .filter(|p| get_mut(doc, p).is_some_and(|v| v.is_object()))
        .collect();
    match rng.below(6) {
        0 | 1 if !all.is_empty() => {
            let p = rng.pick(&all).clone();
            let v = any_value(rng, 0);
            *get_mut(doc, &p).unwrap() = v;
            Promise::None
        }
        2 => {
            let p = rng.pick(&objects).clone();
            let key = rng.pick(TYPO_KEYS).to_string();
            let obj = get_mut(doc, &p).unwrap().as_object_mut().unwrap();
            if obj.contains_key(&key) {
                return Promise::None;
            }
            obj.insert(key.clone(), any_value(rng, 0));
            // An empty key is shown as "" in a path.
            let shown = if key.is_empty() {
                "\"\"".to_string()
            } else {
                key
            };
            match closed(&p) {
                Some(prefix) if prefix.is_empty() => Promise::ErrorAt(shown),
                Some(prefix) => Promise::ErrorAt(format!("{prefix}.{shown}")),
                None => Promise::None,
            }
        }
        3 => {
            let p = rng.pick(&objects).clone();
            let obj = get_mut(doc, &p).unwrap().as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            if !keys.is_empty() {
                let k = rng.pick(&keys).clone();
                let v = obj.remove(&k).unwrap();
                if rng.chance(2) {
                    let mut renamed = k.clone();
                    renamed.push(*rng.pick(&['_', 's', 'x']));
                    obj.insert(renamed, v);
                }
            }
            Promise::None
        }
        4 if !all.is_empty() => {
            let p = rng.pick(&all).clone();
            let mut v = json!(1);
            for _ in 0..rng.below(80) {
                v = if rng.chance(2) {
                    json!([v])
                } else {
                    json!({"a": v})
                };
            }
            *get_mut(doc, &p).unwrap() = v;
            Promise::None
        }
        _ => Promise::None,
    }
}

/// Text-level mutations JSON values cannot express: a key given twice, a cut, a flipped byte.
fn mutate_text(rng: &mut Rng, text: &mut String) {
    match rng.below(10) {
        0 => {
            // Duplicate the first key of the innermost object found at a random brace.
            if let Some(i) = text.match_indices("{\"").map(|(i, _)| i).nth(rng.below(4))
                && let Some(end) = text[i + 2..].find(',')
            {
                let pair = text[i + 1..i + 2 + end].to_string();
                text.insert_str(i + 1, &format!("{pair},"));
            }
        }
        1 if !text.is_empty() => {
            let i = rng.below(text.len());
            if text.is_char_boundary(i) {
                text.truncate(i);
            }
        }
        2 if !text.is_empty() => {
            let i = rng.below(text.len());
            if text.is_char_boundary(i) && text.is_char_boundary(i + 1) {
                let with = *rng.pick(&["{", "}", "\"", ",", ":", "]", "1e999"]);
                text.replace_range(i..i + 1, with);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face rope dicts and configs

/// A valid rope dict of `ty`.
fn rope_dict(rng: &mut Rng, ty: &str) -> Value {
    let mut d = json!({"rope_type": ty, "rope_theta": *rng.pick(&[10000.0, 500000.0, 1e6])});
    let m = d.as_object_mut().unwrap();
    let half = 32;
    match ty {
        "linear" | "dynamic" | "proportional" => {
            m.insert("factor".into(), json!(*rng.pick(&[2.0, 4.0, 8.0])));
        }
        "yarn" => {
            m.insert("factor".into(), json!(4.0));
            m.insert("original_max_position_embeddings".into(), json!(4096));
            if rng.chance(2) {
                m.insert("beta_fast".into(), json!(32));
                m.insert("mscale".into(), json!(1.0));
            }
        }
        "longrope" | "su" => {
            m.insert("short_factor".into(), json!(vec![1.0; half]));
            m.insert("long_factor".into(), json!(vec![2.0; half]));
            m.insert("original_max_position_embeddings".into(), json!(4096));
        }
        "llama3" => {
            m.insert("factor".into(), json!(8.0));
            m.insert("low_freq_factor".into(), json!(1.0));
            m.insert("high_freq_factor".into(), json!(4.0));
            m.insert("original_max_position_embeddings".into(), json!(8192));
        }
        "ntk" => {
            m.insert("alpha".into(), json!(2.0));
        }
        _ => {}
    }
    if rng.chance(3) && ty != "default" {
        // The legacy spelling.
        let t = m.remove("rope_type").unwrap();
        m.insert("type".into(), t);
    }
    d
}

const ROPE_TYPES: &[&str] = &[
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "su",
    "llama3",
    "ntk",
    "proportional",
];

fn hf_config(rng: &mut Rng) -> Value {
    let ty = *rng.pick(ROPE_TYPES);
    let mut c = json!({"max_position_embeddings": 131072, "vocab_size": 32000,
                       "architectures": ["LlamaForCausalLM"]});
    let m = c.as_object_mut().unwrap();
    match rng.below(3) {
        0 => {
            m.insert("head_dim".into(), json!(64));
        }
        1 => {
            m.insert("hidden_size".into(), json!(512));
            m.insert("num_attention_heads".into(), json!(8));
        }
        _ => {
            m.insert("kv_channels".into(), json!(64));
        }
    }
    if rng.chance(4) {
        m.insert("use_logn_attn".into(), json!(true));
        m.insert("seq_length".into(), json!(2048));
    }
    let key = if rng.chance(2) {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    m.insert(key.into(), rope_dict(rng, ty));
    c
}

#[test]
fn hf_configs() {
    fuzz("HF configs (RopeConfig::from_hf_config_str)", |rng| {
        let mut cfg = hf_config(rng);
        let mutated = !rng.chance(8);
        let promise = if mutated {
            // Only the rope dict's keys are closed; a config's top level has every key a
            // model needs.
            mutate(rng, &mut cfg, &|p: &[String]| {
                (p.len() == 1 && (p[0] == "rope_parameters" || p[0] == "rope_scaling"))
                    .then(|| p[0].clone())
            })
        } else {
            Promise::None
        };
        let mut text = cfg.to_string();
        let text_mutated = rng.chance(3);
        if text_mutated {
            mutate_text(rng, &mut text);
        }
        let r = RopeConfig::from_hf_config_str(&text);
        let verdict = match (&r, &promise) {
            (Ok(_), _) if !mutated && !text_mutated => Ok(()),
            (Err(e), _) if !mutated && !text_mutated => {
                Err(format!("a valid config was refused: {e}"))
            }
            (Ok(c), Promise::ErrorAt(p)) if !text_mutated => {
                Err(format!("key {p} accepted: {c:?}"))
            }
            (Err(e), Promise::ErrorAt(p)) if !text_mutated && e.path() != Some(p.as_str()) => {
                // Another error may come first only if it is in the same dict.
                if e.path()
                    .is_some_and(|q| q.starts_with(p.split('.').next().unwrap()))
                {
                    Ok(())
                } else {
                    Err(format!("inserted key {p}, error names {:?}: {e}", e.path()))
                }
            }
            (Ok(c), _) => {
                let _ = c.frequencies(Some(1 + rng.below(1 << 20) as u64));
                Ok(())
            }
            (Err(e), _) if e.is_invalid() && !e.path().unwrap_or("").is_empty() => Ok(()),
            (Err(e), _) => Err(format!(
                "not an invalid-request error naming a field: {e:?}"
            )),
        };
        (text, verdict)
    });
}

// ---------------------------------------------------------------------------------------------
// Run specs

fn spec_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("posattn-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(1);
    for ty in ROPE_TYPES {
        let mut c = hf_config(&mut rng);
        c["head_dim"] = json!(64);
        c.as_object_mut().unwrap().remove("hidden_size");
        c["rope_parameters"] = rope_dict(&mut rng, ty);
        c.as_object_mut().unwrap().remove("rope_scaling");
        std::fs::write(dir.join(format!("{ty}.json")), c.to_string()).unwrap();
    }
    dir
}

/// A valid spec for a [1, 4, 4, 2, 2, 64] problem with a random position type.
fn spec_doc(rng: &mut Rng) -> Value {
    let position = match rng.below(10) {
        0 => json!({"type": "none"}),
        1 => json!({"type": "rope", "theta": 10000, "layout": "interleaved", "rotary_dim": 32,
                    "attention_factor": 1.0}),
        2 => json!({"type": "alibi", "slopes": [0.5, 0.25], "form": "symmetric"}),
        3 => json!({"type": "xpos", "theta": 10000, "scale_base": 512, "layout": "half"}),
        4 => json!({"type": "t5", "num_buckets": 4, "max_distance": 8, "bidirectional": true,
                    "table": [0, 1, 2, 3, 0, 1, 2, 3]}),
        5 => json!({"type": "kerple", "form": "power", "p": [1, 1.5], "a": [0.1, 0.2]}),
        6 => json!({"type": "sandwich", "dim": 64}),
        7 => json!({"type": "fire", "w1": [1], "b1": [0], "w2": [1, 2], "b2": [0, 0]}),
        8 => {
            let ty = *rng.pick(ROPE_TYPES);
            json!({"type": "hf", "rope_parameters": rope_dict(rng, ty),
                   "max_position_embeddings": 131072, "layout": "half"})
        }
        _ => json!({"type": "hf_config", "path": format!("{}.json", rng.pick(ROPE_TYPES))}),
    };
    let mut doc = json!({"causal": rng.chance(2), "scale": 0.125, "position": position,
                         "seq_len": null, "logn_train_len": 4096});
    if rng.chance(2) {
        let m = doc.as_object_mut().unwrap();
        m.insert("window".into(), json!({"left": 2, "right": 0}));
        m.insert("sink_tokens".into(), json!(1));
        m.insert("softcap".into(), json!(30.0));
        m.insert("sink_logits".into(), json!([0.5, 1.0]));
        if doc["position"]["type"] == "rope" {
            doc["extrapolation"] = json!({"type": "lm_infinite", "limit": 2});
        }
    }
    doc
}

#[test]
fn run_specs() {
    let dir = spec_dir();
    let shape = [1, 4, 4, 2, 2, 64];
    fuzz("run specs (parse_spec)", |rng| {
        let mut doc = spec_doc(rng);
        let mutated = !rng.chance(8);
        let promise = if mutated {
            // Every object of a spec is closed except the HF rope dict's, which is closed too
            // but named from `position.rope_parameters`.
            mutate(rng, &mut doc, &|p: &[String]| {
                let joined = p.join(".");
                let open = p.iter().any(|s| s.parse::<usize>().is_ok());
                (!open).then_some(joined)
            })
        } else {
            Promise::None
        };
        let mut text = doc.to_string();
        let text_mutated = rng.chance(3);
        if text_mutated {
            mutate_text(rng, &mut text);
        }
        let r = parse_spec(&text, shape, &dir, 3);
        let verdict = match (&r, &promise) {
            (Ok(_), _) if !mutated && !text_mutated => Ok(()),
            (Err(e), _) if !mutated && !text_mutated => {
                Err(format!("a valid spec was refused: {e}"))
            }
            (Ok(s), Promise::ErrorAt(p)) if !text_mutated => {
                Err(format!("key {p} accepted: {s:?}"))
            }
            (Err(e), Promise::ErrorAt(p)) if !text_mutated && e.path() != Some(p.as_str()) => {
                Err(format!("inserted key {p}, error names {:?}: {e}", e.path()))
            }
            (Ok(s), _) => s
                .validate()
                .map_err(|e| format!("accepted but invalid: {e}")),
            (Err(e), _) if e.is_invalid() && !e.path().unwrap_or("").is_empty() => Ok(()),
            (Err(e), _) => Err(format!(
                "not an invalid-request error naming a field: {e:?}"
            )),
        };
        (text, verdict)
    });
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
