//! Model configs to frequency tables: every golden case of tests/golden/rope_scaling.json, given
//! as a transformers 5 `config.json` (`rope_parameters`) and as a legacy one (`rope_scaling` with
//! `type`, `rope_theta` at the top level), must give transformers' table; llama.cpp's parameters
//! for the same models must give the same tables; malformed configs are typed errors naming the
//! key.

use posattn::{Error, LlamaCppRope, RopeConfig, RopeScaling};
use serde_json::{Value, json};

fn golden() -> Vec<Value> {
    let doc: Value = serde_json::from_str(include_str!("golden/rope_scaling.json")).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn assert_table(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = if *w == 0.0 {
            g.abs()
        } else {
            ((g - w) / w).abs()
        };
        assert!(err <= 1e-6, "{name}: entry {i}: {g} vs {w}");
    }
}

fn want(case: &Value) -> (Vec<f64>, f64) {
    let inv = case["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (inv, case["attention_factor"].as_f64().unwrap())
}

#[test]
fn hf_configs_in_both_forms_give_transformers_tables() {
    for case in golden() {
        let name = case["name"].as_str().unwrap();
        let params = case["rope_parameters"].clone();
        let base = json!({
            "hidden_size": case["hidden_size"],
            "num_attention_heads": case["num_attention_heads"],
            "head_dim": case["head_dim"],
            "max_position_embeddings": case["max_position_embeddings"],
        });
        // transformers 5: everything inside rope_parameters.
        let mut v5 = base.clone();
        v5["rope_parameters"] = params.clone();
        // Legacy: rope_scaling with `type`, theta and partial_rotary_factor at the top level
        // (no rope_scaling at all for default RoPE).
        let mut legacy = base.clone();
        let mut scaling = params.as_object().unwrap().clone();
        legacy["rope_theta"] = scaling.remove("rope_theta").unwrap();
        if let Some(p) = scaling.remove("partial_rotary_factor") {
            legacy["partial_rotary_factor"] = p;
        }
        let t = scaling.remove("rope_type").unwrap();
        if t != "default" {
            scaling.insert("type".into(), t);
            legacy["rope_scaling"] = Value::Object(scaling);
        }
        let (inv, af) = want(&case);
        let seq = case["seq_len"].as_u64();
        for (form, cfg) in [("v5", &v5), ("legacy", &legacy)] {
            let rc =
                RopeConfig::from_hf_config(cfg).unwrap_or_else(|e| panic!("{name} {form}: {e}"));
            let f = rc.frequencies(seq).unwrap();
            assert_table(&format!("{name} ({form})"), &f.inv_freq, &inv);
            assert!(
                (f.attention_factor - af).abs() < 1e-12,
                "{name} ({form}): attention factor"
            );
        }
    }
}

#[test]
fn head_dim_comes_from_hidden_size_when_absent() {
    let cfg = json!({"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
                     "max_position_embeddings": 8192});
    let rc = RopeConfig::from_hf_config(&cfg).unwrap();
    assert_eq!(rc.head_dim, 128);
    assert_eq!(rc.scaling, RopeScaling::Default);
    assert_eq!(rc.theta, 500000.0);
}

#[test]
fn ntk_alpha_is_read() {
    let cfg = json!({"head_dim": 64, "rope_parameters": {"rope_type": "ntk", "alpha": 8.0, "rope_theta": 10000.0}});
    let rc = RopeConfig::from_hf_config(&cfg).unwrap();
    assert_eq!(rc.scaling, RopeScaling::NtkAlpha { alpha: 8.0 });
    // base' = base · alpha^(r/(r−2)): the second frequency is base'^(−2/64).
    let f = rc.frequencies(None).unwrap();
    let base = 10000.0 * 8f64.powf(64.0 / 62.0);
    assert!((f.inv_freq[1] - base.powf(-2.0 / 64.0)).abs() < 1e-15);
}

#[test]
fn qwen_logn_attention_is_read() {
    let cfg = json!({"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
                     "seq_length": 8192, "use_logn_attn": true, "rotary_emb_base": 20000,
                     "rotary_pct": 0.5, "max_position_embeddings": 32768});
    let rc = RopeConfig::from_hf_config(&cfg).unwrap();
    assert_eq!(rc.logn_train_len, Some(8192));
    assert_eq!(
        (rc.theta, rc.head_dim, rc.partial_rotary_factor),
        (20000.0, 128, 0.5)
    );
    let spec = rc
        .apply(
            posattn::AttentionSpec::default()
                .with_seq_len(4)
                .with_heads(32)
                .with_head_dim(128),
            posattn::RopeLayout::Half,
            None,
        )
        .unwrap();
    assert_eq!(spec.logn_train_len, Some(8192));
    let missing = json!({"head_dim": 64, "use_logn_attn": true});
    assert!(matches!(
        RopeConfig::from_hf_config(&missing),
        Err(Error::Invalid {
            field: "seq_length",
            ..
        })
    ));
}

#[test]
fn malformed_configs_name_the_key() {
    let field = |v: Value| match RopeConfig::from_hf_config(&v) {
        Err(e) if e.is_invalid() => e.path().unwrap().to_string(),
        other => panic!("expected an invalid-request error for {v}, got {other:?}"),
    };
    let base = |rope: Value| json!({"head_dim": 64, "max_position_embeddings": 4096, "rope_parameters": rope});
    assert_eq!(field(json!([1, 2])), "config");
    assert_eq!(field(json!({"num_attention_heads": 8})), "hidden_size");
    assert_eq!(field(json!({"head_dim": "64"})), "head_dim");
    assert_eq!(
        field(base(json!({"rope_type": "warp", "rope_theta": 1e4}))),
        "rope_parameters.rope_type"
    );
    assert_eq!(
        field(base(json!({"rope_type": "linear", "rope_theta": 1e4}))),
        "rope_parameters.factor"
    );
    assert_eq!(
        field(base(
            json!({"rope_type": "linear", "rope_theta": "big", "factor": 2})
        )),
        "rope_parameters.rope_theta"
    );
    assert_eq!(
        field(base(
            json!({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8,
                          "high_freq_factor": 4, "original_max_position_embeddings": 8192})
        )),
        "rope_parameters.low_freq_factor"
    );
    assert_eq!(
        field(base(
            json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4})
        )),
        "rope_parameters.original_max_position_embeddings"
    );
    assert_eq!(
        field(base(
            json!({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                          "long_factor": [1.0], "original_max_position_embeddings": 4096})
        )),
        "short_factor"
    );
    assert_eq!(
        field(json!({"head_dim": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}})),
        "max_position_embeddings"
    );
    assert_eq!(
        field(base(
            json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4,
                                  "original_max_position_embeddings": 4096, "truncate": "no"})
        )),
        "rope_parameters.truncate"
    );
    // A misspelt key, a key the type does not use, a key given twice: errors, not dropped.
    assert_eq!(
        field(base(
            json!({"rope_type": "linear", "factr": 2, "factor": 2})
        )),
        "rope_parameters.factr"
    );
    assert_eq!(
        field(
            json!({"head_dim": 64, "rope_scaling": {"type": "linear", "factor": 2, "beta_fast": 3}})
        ),
        "rope_scaling.beta_fast"
    );
    match RopeConfig::from_hf_config_str(
        r#"{"head_dim": 64, "rope_parameters": {"rope_type": "linear", "factor": 2, "factor": 4}}"#,
    ) {
        Err(e) => assert_eq!(e.path(), Some("rope_parameters.factor"), "{e}"),
        other => panic!("{other:?}"),
    }
    // max_position_embeddings that is negative, fractional or a string is named as such.
    for bad in [json!(-1), json!(32.5), json!("16384")] {
        let cfg = json!({"head_dim": 64, "max_position_embeddings": bad,
                         "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}});
        let e = RopeConfig::from_hf_config(&cfg).unwrap_err();
        assert_eq!(e.path(), Some("max_position_embeddings"), "{e}");
        assert!(!e.to_string().contains("missing"), "{e}");
    }
    // An integral float is an integer (some tools write 4096.0).
    RopeConfig::from_hf_config(&json!({"head_dim": 64, "max_position_embeddings": 4096.0,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
    .unwrap();
    match RopeConfig::from_hf_config_str("{ not json") {
        Err(e) => assert_eq!(e.path(), Some("config"), "{e}"),
        other => panic!("{other:?}"),
    }
}

fn golden_case(name: &str) -> Value {
    golden().into_iter().find(|c| c["name"] == name).unwrap()
}

#[test]
fn llama_cpp_parameters_give_the_same_tables() {
    // YaRN as llama.cpp's converter writes it: freq_scale = 1/factor, ext_factor = 1, and
    // attn_factor divided by ggml's implicit 1 + 0.1·ln(factor).
    let y = golden_case("yarn_f4");
    let (inv, af) = want(&y);
    let cpp = LlamaCppRope {
        n_dims: 64,
        freq_base: 10000.0,
        freq_scale: 0.25,
        ext_factor: 1.0,
        attn_factor: af / (1.0 + 0.1 * 4f64.ln()),
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 4096,
        freq_factors: None,
    }
    .frequencies()
    .unwrap();
    assert_table("yarn via llama.cpp", &cpp.inv_freq, &inv);
    assert!((cpp.attention_factor - af).abs() < 1e-12);

    // Linear: freq_scale alone.
    let l = golden_case("linear_f2");
    let cpp = LlamaCppRope {
        n_dims: 64,
        freq_base: 10000.0,
        freq_scale: 0.5,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 4096,
        freq_factors: None,
    }
    .frequencies()
    .unwrap();
    assert_table("linear via llama.cpp", &cpp.inv_freq, &want(&l).0);
    assert_eq!(cpp.attention_factor, 1.0);

    // Llama 3.1 arrives as freq_factors (rope_freqs.weight): default θ_i divided by ff_i.
    let l3 = golden_case("llama3_8b");
    let (inv, _) = want(&l3);
    let plain = posattn::encoding::position::rope_inv_freq(500000.0, 128);
    let ff: Vec<f64> = plain.iter().zip(&inv).map(|(p, q)| p / q).collect();
    let cpp = LlamaCppRope {
        n_dims: 128,
        freq_base: 500000.0,
        freq_scale: 1.0,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 8192,
        freq_factors: Some(ff),
    }
    .frequencies()
    .unwrap();
    assert_table("llama3 via llama.cpp freq_factors", &cpp.inv_freq, &inv);

    // Bad parameters are typed errors.
    let bad = LlamaCppRope {
        n_dims: 63,
        freq_base: 1e4,
        freq_scale: 1.0,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig: 4096,
        freq_factors: None,
    };
    assert!(matches!(
        bad.frequencies(),
        Err(Error::Invalid {
            field: "n_dims",
            ..
        })
    ));
    let bad = LlamaCppRope {
        n_dims: 64,
        freq_factors: Some(vec![1.0; 5]),
        ..bad
    };
    assert!(matches!(
        bad.frequencies(),
        Err(Error::Invalid {
            field: "freq_factors",
            ..
        })
    ));
}
