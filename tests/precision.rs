//! RoPE phase accuracy at long positions. The FlashAttention-style rule of the conformance matrix
//! scales with a plain f32 implementation's error, which is large here (an f32 `pos · inv_freq`
//! loses about 1e-2 rad near 1e6), so these cases use a fixed rule instead:
//! max|gpu − ref64| / max|ref64| ≤ 1e-4, at positions around 2^16, 1e6 and just under 2^24.

use posattn::harness::check::{Case, Positions};
use posattn::harness::reference;
use posattn::{
    Attention, AttentionSpec, Context, ContextOptions, PositionEncoding, Rope, RopeLayout,
    enumerate_adapters,
};

const REL_BOUND: f64 = 1e-4;

#[test]
fn rope_phase_stays_exact_at_long_positions() {
    let adapters = enumerate_adapters(&ContextOptions::default());
    if adapters.is_empty() {
        println!("no adapter: precision test did not run");
        return;
    }
    for adapter in adapters {
        let ctx = Context::from_adapter(&adapter).expect("device");
        for (layout, lname) in [
            (RopeLayout::Half, "half"),
            (RopeLayout::Interleaved, "interleaved"),
        ] {
            for offset in [65_536 - 40, 1_000_000, (1 << 24) - 1 - 80] {
                let spec = AttentionSpec::default()
                    .with_seq_q(40)
                    .with_seq_k(80)
                    .with_heads(2)
                    .with_position(PositionEncoding::Rope(
                        Rope::new(10000.0).with_layout(layout),
                    ));
                let case = Case::new(format!("rope_{lname}_offset{offset}"), spec.clone())
                    .with_positions(Positions::Offset(offset));
                let (q, k, v, pq, pk) = case.inputs();
                let gpu = Attention::new(&ctx, &spec)
                    .and_then(|p| p.run(&ctx, &q, &k, &v, Some(&pq), Some(&pk)))
                    .expect("run");
                let r64 = reference::attention::<f64>(&spec, &q, &k, &v, &pq, &pk);
                let r32 = reference::attention::<f32>(&spec, &q, &k, &v, &pq, &pk);
                let max_ref = r64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let rel = |o: &dyn Fn(usize) -> f64| {
                    (0..r64.len())
                        .map(|i| (o(i) - r64[i]).abs())
                        .fold(0.0, f64::max)
                        / max_ref
                };
                let e_gpu = rel(&|i| gpu[i] as f64);
                let e_f32 = rel(&|i| r32[i] as f64);
                println!(
                    "{} on {}: relative error {e_gpu:.2e} (plain f32: {e_f32:.2e})",
                    case.name,
                    ctx.describe()
                );
                assert!(
                    e_gpu <= REL_BOUND,
                    "{}: {e_gpu:.3e} > {REL_BOUND}",
                    case.name
                );
            }
        }
    }
}

/// f16 accumulation (`Accumulation::F16`) keeps a row's sums within f16's range: the running
/// maximum carries an offset of 3 in base 2, so every weight is at most 1/8. Equal scores (zero
/// queries) over 64 keys whose V is 3000 everywhere sum to 24 000 with the offset, where
/// weights of 1 would sum to 192 000, past f16's 65 504 (infinite). Rule: the output is finite
/// and within the worst case of 64 f16 roundings of the running sum (each at most half an ulp,
/// 2⁻¹¹ of the sum: 64 · 2⁻¹¹ = 1/32 relative; lavapipe is 0.5 % off), and the log-sum-exp is
/// ln 64 to f32 precision (the offset cancels there). A sink logit of 0 adds a 65th equal
/// weight, through the same offset.
#[test]
fn half_accumulation_keeps_sums_in_range() {
    let options = ContextOptions::default().with_adapter_name(None);
    let mut ran = 0;
    for adapter in enumerate_adapters(&options) {
        let mut ctx = Context::from_adapter(&adapter).expect("device");
        if ctx.set_accumulation(posattn::Accumulation::F16).is_err() {
            println!(
                "{}: no SHADER_F16, f16 accumulation refused",
                ctx.describe()
            );
            continue;
        }
        for sink in [false, true] {
            let mut spec = AttentionSpec::default()
                .with_seq_q(3)
                .with_seq_k(64)
                .with_heads(2)
                .with_causal(false);
            if sink {
                spec = spec.with_sink_logits(vec![0.0; 2]);
            }
            let plan = Attention::new(&ctx, &spec).expect("plan");
            assert!(plan.kernel().half_acc, "{}", plan.kernel().name());
            let q = vec![0.0; spec.q_len()];
            let k = vec![0.5; spec.kv_len()];
            let v = vec![3000.0; spec.kv_len()];
            let (out, lse) = plan
                .run_with_lse(&ctx, &q, &k, &v, None, None, None)
                .expect("run");
            let keys: f32 = if sink { 65.0 } else { 64.0 };
            // With a sink, 64 of 65 equal weights reach V.
            let want = 3000.0 * 64.0 / keys;
            for &o in &out {
                assert!(
                    o.is_finite() && ((o - want) / want).abs() <= 64.0 / 2048.0,
                    "{}: output {o}, expected {want} (sink {sink})",
                    ctx.describe()
                );
            }
            for &l in &lse {
                assert!(
                    (l - keys.ln()).abs() <= 1e-5,
                    "{}: lse {l}, expected {}",
                    ctx.describe(),
                    keys.ln()
                );
            }
        }
        ran += 1;
    }
    println!("f16 accumulation in range on {ran} adapters");
}

/// The same in decode (the decode kernel has its own softmax): one new query against 64 cached
/// keys of equal score whose V is 3000, in one chunk and in four (split-KV: the chunks, each
/// with the offset, merge in f32), and with a sink logit. Same rule as above.
#[test]
fn decode_half_accumulation_keeps_sums_in_range() {
    let options = ContextOptions::default().with_adapter_name(None);
    let mut ran = 0;
    for adapter in enumerate_adapters(&options) {
        let mut ctx = Context::from_adapter(&adapter).expect("device");
        if ctx.set_accumulation(posattn::Accumulation::F16).is_err() {
            continue;
        }
        for (splits, sink) in [(1, false), (4, false), (1, true)] {
            let mut a = AttentionSpec::default()
                .with_seq_q(1)
                .with_seq_k(64)
                .with_heads(2)
                .with_causal(false);
            if sink {
                a = a.with_sink_logits(vec![0.0; 2]);
            }
            let spec = posattn::DecodeSpec::new(a).with_splits(splits);
            let plan = posattn::DecodePlan::new(&ctx, &spec).expect("plan");
            assert!(plan.kernel().half_acc, "{}", plan.kernel().name());
            let q = vec![0.0; spec.q_len()];
            let k = vec![0.5; spec.cache_len()];
            let v = vec![3000.0; spec.cache_len()];
            let out = plan.run(&ctx, &q, &k, &v, None, &[(1, 64)]).expect("run");
            let want = if sink { 3000.0 * 64.0 / 65.0 } else { 3000.0 };
            for &o in &out {
                assert!(
                    o.is_finite() && ((o - want) / want).abs() <= 64.0 / 2048.0,
                    "{}: output {o}, expected {want} ({splits} splits, sink {sink})",
                    ctx.describe()
                );
            }
        }
        ran += 1;
    }
    println!("decode f16 accumulation in range on {ran} adapters");
}
