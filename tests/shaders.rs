//! Every kernel variant the crate can build parses and validates with naga (no device needed),
//! every `@unroll` marker was expanded, and the uniform block's layout matches the Rust struct.

use posattn::kernel::KernelKey;

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

/// Offsets of `Params`' fields on the Rust side, in declaration order (keep in sync with
/// src/kernel.rs).
const RUST_PARAMS: &[(&str, usize)] = &[
    ("batch", 0),
    ("seq_q", 4),
    ("seq_k", 8),
    ("num_heads", 12),
    ("num_kv_heads", 16),
    ("causal", 20),
    ("rotary_dim", 24),
    ("alibi_symmetric", 28),
    ("scale_log2", 32),
    ("attn_factor", 36),
    ("xpos_inv_scale_base", 40),
    ("scale", 44),
    ("freq_offset", 48),
    ("slope_offset", 52),
    ("logn_inv_ln_len", 56),
    ("_pad2", 60),
];

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
        assert_eq!(*span as usize, 64, "{}: Params size", key.name());
        let got: Vec<(String, usize)> = members
            .iter()
            .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
            .collect();
        let want: Vec<(String, usize)> = RUST_PARAMS
            .iter()
            .map(|(n, o)| (n.to_string(), *o))
            .collect();
        assert_eq!(got, want, "{}: Params members", key.name());
    }
}
