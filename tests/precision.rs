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
