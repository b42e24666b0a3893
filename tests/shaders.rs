//! Every kernel variant the crate can build parses and validates with naga (no device needed),
//! every `@unroll` marker was expanded, and the uniform block's layout matches the Rust struct.

use posattn::kernel::{KernelKey, Params};

fn validate(key: &KernelKey) -> naga::Module {
    let src = key.wgsl();
    assert!(
        !src.contains("// @unroll"),
        "{}: an @unroll loop was not expanded",
        key.name()
    );
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{}: {}", key.name(), e.emit_to_string(&src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{}: {}", key.name(), e.emit_to_string(&src)));
    module
}

#[test]
fn every_variant_validates() {
    let keys: Vec<KernelKey> = KernelKey::all_fused()
        .into_iter()
        .chain(KernelKey::all_unfused())
        .collect();
    for key in &keys {
        validate(key);
    }
    println!("{} kernel variants validated with naga", keys.len());
}

/// `Params`' fields on the Rust side, in declaration order, with their offsets (keep the list
/// in sync with src/kernel.rs; the offsets come from the compiler).
fn rust_params() -> Vec<(&'static str, usize)> {
    use std::mem::offset_of;
    vec![
        ("batch", offset_of!(Params, batch)),
        ("seq_q", offset_of!(Params, seq_q)),
        ("seq_k", offset_of!(Params, seq_k)),
        ("num_heads", offset_of!(Params, num_heads)),
        ("num_kv_heads", offset_of!(Params, num_kv_heads)),
        ("causal", offset_of!(Params, causal)),
        ("rotary_dim", offset_of!(Params, rotary_dim)),
        ("alibi_symmetric", offset_of!(Params, alibi_symmetric)),
        ("scale_log2", offset_of!(Params, scale_log2)),
        ("attn_factor", offset_of!(Params, attn_factor)),
        (
            "xpos_inv_scale_base",
            offset_of!(Params, xpos_inv_scale_base),
        ),
        ("scale", offset_of!(Params, scale)),
        ("freq_offset", offset_of!(Params, freq_offset)),
        ("bias_offset", offset_of!(Params, bias_offset)),
        ("logn_inv_ln_len", offset_of!(Params, logn_inv_ln_len)),
        ("sink_tokens", offset_of!(Params, sink_tokens)),
        ("window_left", offset_of!(Params, window_left)),
        ("window_right", offset_of!(Params, window_right)),
        ("softcap_log2", offset_of!(Params, softcap_log2)),
        ("sink_logit_offset", offset_of!(Params, sink_logit_offset)),
        ("bias_len", offset_of!(Params, bias_len)),
        ("bias_p0", offset_of!(Params, bias_p0)),
        ("bias_p1", offset_of!(Params, bias_p1)),
        ("user_bias", offset_of!(Params, user_bias)),
        ("user_bias_stride_b", offset_of!(Params, user_bias_stride_b)),
        ("user_bias_stride_h", offset_of!(Params, user_bias_stride_h)),
        ("branch_rule", offset_of!(Params, branch_rule)),
        ("branch_q_mode", offset_of!(Params, branch_q_mode)),
        ("branch_w", offset_of!(Params, branch_w)),
        ("branch_offset", offset_of!(Params, branch_offset)),
        ("_pad0", offset_of!(Params, _pad0)),
        ("_pad1", offset_of!(Params, _pad1)),
    ]
}

#[test]
fn params_layout_matches_the_shaders() {
    for key in [KernelKey::all_fused()[0], KernelKey::all_unfused()[0]] {
        let module = validate(&key);
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .expect("struct Params");
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("Params is not a struct")
        };
        assert_eq!(
            *span as usize,
            std::mem::size_of::<Params>(),
            "{}: Params size",
            key.name()
        );
        let got: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let want: Vec<(String, usize)> = rust_params()
            .iter()
            .map(|(n, o)| (n.to_string(), *o))
            .collect();
        assert_eq!(got, want, "{}: Params members", key.name());
    }
}
