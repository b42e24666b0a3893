//! The crate's RoPE scaling tables against golden tables made by Hugging Face transformers' own
//! functions (tests/golden/gen_rope_scaling.py; versions in the JSON). transformers computes in
//! float32 and this crate in f64: inverse frequencies agree within 1e-6 relative, attention
//! factors (python floats there) within 1e-12.

use posattn::{LongRope, RopeConfig, RopeScaling, rope_frequencies};
use serde_json::Value;

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn list(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .expect(key)
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn tables_match_transformers() {
    let doc: Value = serde_json::from_str(include_str!("golden/rope_scaling.json")).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        assert!(
            case.get("error").is_none(),
            "{name}: the generator failed: {}",
            case["error"]
        );
        // Each case is a config (head_dim, max_position_embeddings, rope_parameters) read by the
        // crate's one mapping from Hugging Face settings, the one the command line uses.
        let got = RopeConfig::from_hf_config(case)
            .and_then(|cfg| cfg.frequencies(case["seq_len"].as_u64()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = list(case, "inv_freq");
        assert_eq!(got.inv_freq.len(), want.len(), "{name}: table length");
        let worst = got
            .inv_freq
            .iter()
            .zip(&want)
            .map(|(g, w)| {
                if *w == 0.0 {
                    g.abs()
                } else {
                    ((g - w) / w).abs()
                }
            })
            .fold(0.0f64, f64::max);
        assert!(worst <= 1e-6, "{name}: inv_freq relative error {worst:.2e}");
        let af = f(case, "attention_factor").unwrap();
        assert!(
            (got.attention_factor - af).abs() <= 1e-12 * af.abs().max(1.0),
            "{name}: attention factor {} vs {af}",
            got.attention_factor
        );
        println!("{name}: inv_freq within {worst:.1e}, attention factor {af}");
    }
    println!(
        "{} schemes match transformers {}",
        cases.len(),
        doc["transformers"].as_str().unwrap_or("?")
    );
}

#[test]
fn invalid_scaling_parameters_name_their_field() {
    use posattn::Error;
    let field = |r: posattn::Result<posattn::RopeFrequencies>| match r {
        Err(Error::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert_eq!(
        field(rope_frequencies(
            f64::NAN,
            64,
            1.0,
            &RopeScaling::Default,
            None
        )),
        "rope_theta"
    );
    assert_eq!(
        field(rope_frequencies(1e4, 64, 0.0, &RopeScaling::Default, None)),
        "partial_rotary_factor"
    );
    assert_eq!(
        field(rope_frequencies(
            1e4,
            64,
            1.0,
            &RopeScaling::Linear { factor: -2.0 },
            None
        )),
        "factor"
    );
    let long = LongRope::new(vec![1.0; 3], vec![1.0; 32], 4096, 131072);
    assert_eq!(
        field(rope_frequencies(
            1e4,
            64,
            1.0,
            &RopeScaling::LongRope(long),
            None
        )),
        "short_factor"
    );
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 4.0,
        high_freq_factor: 1.0,
        original_max_position_embeddings: 8192,
    };
    assert_eq!(
        field(rope_frequencies(5e5, 128, 1.0, &llama3, None)),
        "high_freq_factor"
    );
}

/// Dynamic NTK while the sequence grows past max_position_embeddings: the table is computed for
/// the current length (largest position + 1) and the kernel rotates queries and keys with it on
/// every call, so every key uses the current frequencies. (A cache of keys pre-rotated with the
/// table of the length at which each arrived mixes tables: transformers issue 25104.)
#[test]
fn dynamic_ntk_uses_the_current_length_for_every_key() {
    use posattn::harness::check::{Case, Positions, Status, run_case};
    use posattn::{AttentionSpec, Context, ContextOptions, RopeLayout, enumerate_adapters};
    let scheme = RopeScaling::Dynamic {
        factor: 2.0,
        max_position_embeddings: 2048,
    };
    let at = |len| rope_frequencies(10000.0, 64, 1.0, &scheme, Some(len)).unwrap();
    // Up to the threshold the table is the plain one; past it every frequency but the first shrinks.
    assert_eq!(at(100).inv_freq, at(2048).inv_freq);
    let (before, after) = (at(2048), at(2070));
    assert_eq!(before.inv_freq[0], after.inv_freq[0]);
    assert!(
        before.inv_freq[1..]
            .iter()
            .zip(&after.inv_freq[1..])
            .all(|(b, a)| a < b)
    );

    let Some(adapter) = enumerate_adapters(&ContextOptions::default())
        .into_iter()
        .next()
    else {
        println!("no adapter: the GPU half of the dynamic NTK test did not run");
        return;
    };
    let ctx = Context::from_adapter(&adapter).unwrap();
    // Keys 2000..2069: the sequence crosses 2048, so the table is the one at length 2070.
    let rope = after.to_rope(10000.0, RopeLayout::Half);
    let spec = AttentionSpec::default()
        .with_seq_len(70)
        .with_heads(2)
        .with_position(posattn::PositionEncoding::Rope(rope));
    let case = Case::new("dynamic_ntk_crossing_2048", spec).with_positions(Positions::Offset(2000));
    let r = run_case(&ctx, &case);
    println!(
        "{} on {}: {:?}, error {:.2e}",
        r.name,
        ctx.describe(),
        r.status,
        r.err_gpu
    );
    assert_eq!(r.status, Status::Pass);
}
