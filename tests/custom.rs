//! Custom schemes: composed variants validate with naga (no device), built-ins re-expressed as
//! hooks agree with the built-ins and with the reference, a block-sparse mask agrees with the
//! built-in window, the rotation hook, and a NaN-producing scheme or one without its twin fails
//! the check. GPU cases run on Vulkan (each custom scheme is one more compiled variant); GL runs
//! one case. Tolerance: `posattn::harness::check`'s rule against the f64 reference; hook and
//! built-in outputs are compared directly under the same bound (they differ by rounding only:
//! the hook gets the logit in natural-log units and the kernel works in base 2, so the hook's
//! result is rounded twice more than the built-in bias). Set `POSATTN_REQUIRE_BACKENDS` (e.g.
//! `vulkan,gl`) to make a backend with no adapter a failure rather than a reported skip.

use posattn::encoding::custom::CustomScheme;
use posattn::harness::check::{self, Case, Status};
use posattn::harness::custom;
use posattn::kernel::KernelKey;
use posattn::{
    Attention, AttentionSpec, Context, ContextOptions, Error, PositionEncoding, Window,
    enumerate_adapters,
};

fn contexts(backends: wgpu::Backends, name: &str) -> Vec<Context> {
    let adapters = enumerate_adapters(
        &ContextOptions::default()
            .with_backends(backends)
            .with_adapter_name(None),
    );
    if adapters.is_empty() {
        assert!(
            !crate::common::required(name),
            "no {name} adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("custom schemes [{name}]: no adapter on this machine, nothing run");
    }
    adapters
        .iter()
        .map(|a| Context::from_adapter(a).expect("open device"))
        .collect()
}

fn scheme(enc: &PositionEncoding) -> &CustomScheme {
    match enc {
        PositionEncoding::Custom(c) => c,
        _ => panic!("not a custom scheme"),
    }
}

fn validate(src: &str) {
    let module =
        naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
}

#[test]
fn every_hook_composes_into_a_valid_kernel_without_a_device() {
    let t5 = match check::t5(32, 128, true, 4) {
        PositionEncoding::T5(t) => t,
        _ => unreachable!(),
    };
    for enc in [
        custom::alibi(4),
        custom::t5(&t5, 4),
        custom::kerple_log(&[0.5; 4], &[0.1; 4]),
        custom::window_mask(40, true),
        custom::window_mask(40, false),
        custom::rope(10000.0, 64),
    ] {
        let checked = scheme(&enc).check(4).expect("check");
        for rows in [1, 8] {
            let key = KernelKey::fused_custom(64, rows, checked.id);
            let src = key.try_wgsl_with(Some(&checked.hooks_wgsl())).unwrap();
            validate(&src);
        }
        // The hooks are this variant's only: a plain key refuses them, a custom key needs them.
        let key = KernelKey::fused_custom(64, 1, checked.id);
        assert!(key.try_wgsl().is_err());
        assert!(
            KernelKey::fused(64, 1, posattn::kernel::PosKind::None)
                .try_wgsl_with(Some(&checked.hooks_wgsl()))
                .is_err()
        );
    }
}

/// Runs `case` and asserts it passes; returns the GPU output on a fixed seed's inputs (a case's
/// own inputs are seeded by its name).
fn pass(ctx: &Context, case: &Case) -> Vec<f32> {
    let r = check::run_case(ctx, case);
    assert_eq!(
        r.status,
        Status::Pass,
        "{} on {}",
        case.name,
        ctx.describe()
    );
    let mut same = case.clone();
    same.seed = 1;
    let (q, k, v, pq, pk) = same.inputs();
    Attention::new(ctx, &case.spec)
        .unwrap()
        .run(ctx, &q, &k, &v, Some(&pq), Some(&pk))
        .unwrap()
}

/// The hook's output against the built-in's: max |difference| and the rule's bound for the case.
fn hook_vs_builtin(
    ctx: &Context,
    name: &str,
    builtin: PositionEncoding,
    hook: PositionEncoding,
    spec: AttentionSpec,
) {
    let b = Case::new(
        format!("{name}_builtin"),
        spec.clone().with_position(builtin),
    );
    let h = Case::new(format!("{name}_hook"), spec.with_position(hook));
    let out_b = pass(ctx, &b);
    let out_h = pass(ctx, &h);
    let r = check::run_case(ctx, &h);
    let diff = out_b
        .iter()
        .zip(&out_h)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let identical = out_b
        .iter()
        .zip(&out_h)
        .filter(|(x, y)| x.to_bits() == y.to_bits())
        .count();
    println!(
        "{name} on {}: max |hook − built-in| {diff:.2e} (bound {:.2e}), {identical}/{} elements bit-identical",
        ctx.describe(),
        r.bound,
        out_b.len()
    );
    assert!(
        diff <= r.bound,
        "{name}: hook and built-in differ by {diff:.3e} > {:.3e}",
        r.bound
    );
}

#[test]
fn builtins_through_the_hook_match_on_vulkan() {
    for ctx in contexts(wgpu::Backends::VULKAN, "vulkan") {
        let t5 = check::t5(32, 16, true, 4);
        let t5_desc = match &t5 {
            PositionEncoding::T5(t) => t.clone(),
            _ => unreachable!(),
        };
        let alibi = PositionEncoding::Alibi(posattn::Alibi {
            slopes: posattn::AlibiSlopes::Standard,
            form: posattn::AlibiForm::Causal,
        });
        for (sq, sk, causal, kv) in [(37, 37, true, 2), (100, 100, false, 4), (30, 90, true, 1)] {
            let spec = AttentionSpec::default()
                .with_seq_q(sq)
                .with_seq_k(sk)
                .with_heads(4)
                .with_kv_heads(kv)
                .with_causal(causal);
            let tag = format!("q{sq}_k{sk}_{}", if causal { "causal" } else { "bidir" });
            hook_vs_builtin(
                &ctx,
                &format!("alibi_{tag}"),
                alibi.clone(),
                custom::alibi(4),
                spec.clone(),
            );
            // T5 leaves its logits unscaled by default; the hook gets the spec's scale as given.
            let unscaled = spec.clone().with_scale(1.0);
            hook_vs_builtin(
                &ctx,
                &format!("t5_{tag}"),
                t5.clone(),
                custom::t5(&t5_desc, 4),
                unscaled,
            );
            // KERPLE through the hook is composed and validated above without a device; on a
            // device it would be one more compiled variant for CI.
        }
    }
}

#[test]
fn block_sparse_mask_and_rotation_hook_on_vulkan() {
    for ctx in contexts(wgpu::Backends::VULKAN, "vulkan") {
        for (sq, left) in [(200, 40), (130, 7)] {
            let spec = AttentionSpec::default()
                .with_seq_len(sq)
                .with_heads(2)
                .with_causal(true);
            let builtin = Case::new(
                format!("window{left}_builtin_s{sq}"),
                spec.clone().with_window(Window {
                    left: Some(left),
                    right: None,
                }),
            );
            let out_b = pass(&ctx, &builtin);
            // Without the tile predicate the same mask only visits more tiles (benches/custom.rs
            // measures that); the predicate is what can go wrong, so only it is compiled here.
            let case = Case::new(
                format!("window{left}_hook_tiles_s{sq}"),
                spec.clone().with_position(custom::window_mask(left, true)),
            );
            let out = pass(&ctx, &case);
            let diff = out_b
                .iter()
                .zip(&out)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            // Same scores, same masks, same order of keys: the same bits.
            assert_eq!(
                diff, 0.0,
                "{}: differs from the built-in window by {diff}",
                case.name
            );
        }
        let spec = AttentionSpec::default()
            .with_seq_len(40)
            .with_heads(2)
            .with_kv_heads(1);
        pass(
            &ctx,
            &Case::new(
                "rope_hook_s40",
                spec.with_position(custom::rope(10000.0, 64)),
            ),
        );
    }
}

#[test]
fn a_nan_scheme_and_a_missing_twin_fail_the_check_on_vulkan() {
    let nan = "fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {\n    return score + log(f32(k_pos - q_pos) - 0.5);\n}\n";
    let spec = AttentionSpec::default().with_seq_len(20).with_heads(2);
    // The twin has no GPU to wait for: this failure needs no adapter.
    let no_twin = Case::new(
        "no_twin",
        spec.clone()
            .with_position(PositionEncoding::Custom(CustomScheme::new(nan))),
    );
    let ctxs = contexts(wgpu::Backends::VULKAN, "vulkan");
    for ctx in &ctxs {
        let r = check::run_case(ctx, &no_twin);
        assert!(
            matches!(&r.status, Status::Fail(m) if m.contains("no Rust twin for score_mod")),
            "{:?}",
            r.status
        );
        let scheme = CustomScheme::new(nan)
            .with_score(|a| a.score + ((a.k_pos - a.q_pos) as f64 - 0.5).ln());
        let case = Case::new(
            "nan_scheme",
            spec.clone().with_position(PositionEncoding::Custom(scheme)),
        );
        let r = check::run_case(ctx, &case);
        assert!(
            matches!(&r.status, Status::Fail(m) if m.contains("produces NaN")),
            "{:?}",
            r.status
        );
        // An invalid snippet is a typed error before any device work, with its line.
        let bad = spec.clone().with_position(PositionEncoding::Custom(CustomScheme::new(
            "\nfn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {\n    return score + k_buf[0];\n}\n",
        ).with_score(|a| a.score)));
        match Attention::new(ctx, &bad) {
            Err(e @ Error::Scheme { .. }) => {
                assert_eq!(e.path(), Some("position.wgsl"));
                assert!(e.to_string().contains("at line 3"), "{e}");
            }
            Err(e) => panic!("expected a scheme error, got {e}"),
            Ok(_) => panic!("a snippet reading k_buf was accepted"),
        }
    }
}

#[test]
fn alibi_through_the_hook_on_gl() {
    // One case on GL: one more compiled variant on llvmpipe.
    for ctx in contexts(wgpu::Backends::GL, "gl") {
        let spec = AttentionSpec::default()
            .with_seq_len(70)
            .with_heads(4)
            .with_kv_heads(2);
        pass(
            &ctx,
            &Case::new("alibi_hook_gl_s70", spec.with_position(custom::alibi(4))),
        );
    }
}

#[test]
fn custom_spec_files_parse_strictly() {
    use posattn::files::parse_spec;
    let dir = std::env::temp_dir().join(format!("posattn-custom-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("alibi.wgsl"), custom::ALIBI_WGSL).unwrap();
    let shape = [1, 8, 8, 2, 2, 64];
    let parse = |text: &str| parse_spec(text, shape, &dir, 7);
    let spec = parse(r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5, 0.25]}}}"#)
        .unwrap();
    let c = scheme(&spec.position);
    assert_eq!(c.tables["slopes"], [0.5, 0.25]);
    assert!(c.wgsl.contains("fn score_mod"));
    assert_eq!(c.missing_twins(), ["score_mod"]);
    for (text, path) in [
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5, 0.25]}, "extra": 1}}"#,
            "position",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5], "slopes": [0.5, 0.25]}}}"#,
            "position.tables",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5, 1e300]}}}"#,
            "position.tables.slopes[1]",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "missing.wgsl"}}"#,
            "position.wgsl",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl"}}"#,
            "position.tables.slopes",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5]}}}"#,
            "position.tables.slopes",
        ),
        (
            r#"{"position": {"type": "custom", "wgsl": "alibi.wgsl", "tables": {"slopes": [0.5, 0.25], "other": [1]}}}"#,
            "position.tables.other",
        ),
    ] {
        match parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => assert!(
                e.path().is_some_and(|p| p.starts_with(path)),
                "{text}: {e} (path {:?})",
                e.path()
            ),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
