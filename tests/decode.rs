//! Decode against a KV cache, checked against the f64 reference on each sequence's whole prefix
//! (`posattn::harness::decode`; tolerance rule of `posattn::harness::check`, outputs poisoned
//! with NaN before each dispatch). The matrix runs on Vulkan; GL runs a two-case subset that
//! compiles one decode variant (15.6 s for the test with an empty Mesa cache).

use posattn::harness::check::Status;
use posattn::harness::decode::{self, DecodeCase};
use posattn::{Accumulation, Context, ContextOptions, enumerate_adapters};

fn contexts(backends: wgpu::Backends, name: &str) -> Vec<Context> {
    let options = ContextOptions::default()
        .with_backends(backends)
        .with_adapter_name(None);
    let adapters = enumerate_adapters(&options);
    if adapters.is_empty() {
        let required = std::env::var("POSATTN_REQUIRE_BACKENDS")
            .map(|v| v.split(',').any(|b| b.trim().eq_ignore_ascii_case(name)))
            .unwrap_or(false);
        assert!(
            !required,
            "no {name} adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("decode [{name}]: no adapter on this machine, nothing run");
    }
    adapters
        .iter()
        .map(|a| Context::from_adapter(a).expect("open device"))
        .collect()
}

fn run(backends: wgpu::Backends, name: &str, cases: Vec<DecodeCase>) {
    run_with_lanes(backends, name, cases, None);
}

fn run_with_lanes(
    backends: wgpu::Backends,
    name: &str,
    cases: Vec<DecodeCase>,
    lanes: Option<u32>,
) {
    run_with(backends, name, cases, lanes, Accumulation::F32, 1);
}

/// `run` with the context's decode lanes per key forced (`Context::set_decode_lanes`), its
/// P·V arithmetic set (`Context::set_accumulation`) and its keys per step
/// (`Context::set_decode_keys_per_step`); each case checks the variant it built.
fn run_with(
    backends: wgpu::Backends,
    name: &str,
    cases: Vec<DecodeCase>,
    lanes: Option<u32>,
    acc: Accumulation,
    keys: u32,
) {
    assert!(!cases.is_empty());
    let filter = std::env::var("POSATTN_DECODE_FILTER").ok();
    let mut failures = Vec::new();
    for mut ctx in contexts(backends, name) {
        ctx.set_decode_lanes(lanes).unwrap();
        ctx.set_accumulation(acc).unwrap();
        ctx.set_decode_keys_per_step(Some(keys)).unwrap();
        let (mut pass, mut unsup) = (0, 0);
        for case in &cases {
            if filter.as_deref().is_some_and(|f| !case.name.contains(f)) {
                continue;
            }
            let r = decode::run_decode_case(&ctx, case);
            let built = posattn::DecodePlan::new(&ctx, &case.spec).unwrap().kernel();
            assert_eq!(built.keys_per_step, keys, "{}: {}", case.name, built.name());
            if acc == Accumulation::F16 {
                let k = posattn::DecodePlan::new(&ctx, &case.spec).unwrap().kernel();
                assert!(k.half_acc, "{}: {}", case.name, k.name());
            }
            // The variant the case ran (its pipeline is cached by now): the forced lanes, with
            // the partners read from the cache where the pairs span lanes.
            if let Some(l) = lanes {
                let k = posattn::DecodePlan::new(&ctx, &case.spec).unwrap().kernel();
                assert_eq!(k.lanes, l, "{}", case.name);
                assert_eq!(
                    k.key_rot,
                    posattn::kernel::KeyRotation::General,
                    "{}",
                    case.name
                );
            }
            println!(
                "  {:<32} {:?} err {:.2e} bound {:.2e} {:.2?}",
                r.name, r.status, r.err_gpu, r.bound, r.time
            );
            match r.status {
                Status::Pass => pass += 1,
                Status::Unsupported(_) => unsup += 1,
                Status::Fail(why) => {
                    failures.push(format!("{} on {}: {why}", r.name, ctx.describe()))
                }
            }
        }
        println!(
            "decode [{name}] {}: {pass} passed, {unsup} unsupported",
            ctx.describe()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Cases with half storage or a custom scheme: their own kernel variants, so they run in a test
/// of their own, compiling beside the rest.
fn storage_or_custom(c: &DecodeCase) -> bool {
    let a = &c.spec.attention;
    a.dtypes != posattn::Dtypes::F32 || matches!(a.position, posattn::PositionEncoding::Custom(_))
}

/// P·V in f16 arithmetic (`Accumulation::F16`: f16 weights, V and accumulators, the running
/// maximum offset by 3 in base 2) in decode on lavapipe (`SHADER_F16`), bounded by the plain
/// implementation that sums P·V in f16 (`reference::attention_half_acc`): the quick subset, one
/// and four new queries against 2049 and 4100 keys, forced splits (chunks merge in f32), the ring
/// cache with sinks, and an f16 cache (the kernels of one and four rows and of the f16 cache; the
/// arithmetic is the same code in every row bucket).
#[test]
fn decode_half_accumulation_vulkan() {
    let mut cases = decode::decode_quick_cases();
    let more = [
        "decode_rope_q1_k2049",
        "decode_rope_q4_k4100",
        "decode_split7",
        "decode_split130",
        "decode_ring_w64_sinks4_q3",
        "decode_kv_f16_b2_split2",
    ];
    cases.extend(
        decode::decode_cases()
            .into_iter()
            .filter(|c| more.contains(&c.name.as_str())),
    );
    assert_eq!(cases.len(), 2 + more.len(), "a named case is missing");
    run_with(
        wgpu::Backends::VULKAN,
        "vulkan",
        cases,
        None,
        Accumulation::F16,
        1,
    );
}

#[test]
fn decode_matrix_vulkan() {
    let cases = decode::decode_cases()
        .into_iter()
        .filter(|c| !storage_or_custom(c))
        .collect();
    run(wgpu::Backends::VULKAN, "vulkan", cases);
}

#[test]
fn decode_half_storage_and_custom_schemes_vulkan() {
    let cases = decode::decode_cases()
        .into_iter()
        .filter(storage_or_custom)
        .collect();
    run(wgpu::Backends::VULKAN, "vulkan", cases);
}

#[test]
fn decode_subset_gl() {
    run(wgpu::Backends::GL, "gl", decode::decode_quick_cases());
}

/// Lanes per key beyond the adapter rule's, as `posattn tune` or `Context::set_decode_lanes`
/// asks for them: 8 at head size 64 (butterflies over lavapipe's 8-lane subgroups; the rule
/// takes 4 there) on the quick subset, and 16 at head size 128 (more than lavapipe's subgroup,
/// so summed through workgroup memory) on the head-size-128 cases; both leave RoPE pairs split
/// across lanes, so the partners are read from the cache. Each set checks the variant it built.
#[test]
fn decode_forced_lanes_vulkan() {
    for (lanes, cases) in [
        (8, decode::decode_quick_cases()),
        (
            16,
            decode::decode_cases()
                .into_iter()
                .filter(|c| c.spec.attention.head_dim == 128)
                .collect(),
        ),
    ] {
        run_with_lanes(wgpu::Backends::VULKAN, "vulkan", cases, Some(lanes));
    }
}

/// Several keys a softmax step (`Context::set_decode_keys_per_step`): four keys on cases that
/// share one kernel (ragged lengths, runs that end inside a step, StreamingLLM's sinks and
/// window, the ring cache, forced splits), two keys with ReRoPE in the interleaved layout (two
/// branches picked per key, keys rotated with partners read from the cache) and the caller's
/// bias (read at each key's slot). Each case checks the variant it built.
#[test]
fn decode_keys_per_step_vulkan() {
    let pick = |names: &[&str]| -> Vec<DecodeCase> {
        let cases: Vec<DecodeCase> = decode::decode_cases()
            .into_iter()
            .filter(|c| names.contains(&c.name.as_str()))
            .collect();
        assert_eq!(cases.len(), names.len(), "a named case is missing");
        cases
    };
    let mut four = decode::decode_quick_cases();
    four.extend(pick(&[
        "decode_window_sinks",
        "decode_ring_w64_sinks4_q3",
        "decode_split7",
    ]));
    run_with(
        wgpu::Backends::VULKAN,
        "vulkan",
        four,
        None,
        Accumulation::F32,
        4,
    );
    // One kernel for the rest: ReRoPE in the interleaved layout with the caller's bias added.
    let mut both = pick(&["decode_rerope_w16_interleaved"]);
    both[0].name += "_bias";
    both[0].spec.attention = both[0]
        .spec
        .attention
        .clone()
        .with_bias(posattn::BiasLayout::default());
    run_with(
        wgpu::Backends::VULKAN,
        "vulkan",
        both,
        None,
        Accumulation::F32,
        2,
    );
}
