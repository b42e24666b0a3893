//! Merging partial attentions by their log-sum-exp.
//!
//! Attention over a key set that is split into disjoint parts (chunked prefill, a shared prefix
//! cached apart from each request's suffix, keys spread over devices) can be computed part by
//! part: each part gives an output `o_p` and, per query row, `lse_p = ln Σ_{j∈p} exp(s_j)` over
//! its scores ([`crate::Attention::run_with_lse`], [`crate::Attention::encode_with_lse`]). The
//! whole is then
//!
//! ```text
//! lse = ln(exp(lse_a) + exp(lse_b))          (computed as m + ln(e^(lse_a−m) + e^(lse_b−m)), m = max)
//! o   = (e^(lse_a−lse) · o_a + e^(lse_b−lse) · o_b)
//! ```
//!
//! A part that attends to nothing has `lse = −∞` and weight 0; if both do, the merged row is 0
//! with `lse = −∞`, as the kernel gives for a fully masked row. A NaN in either part's row
//! makes the merged row NaN. A sink logit belongs to the denominator once: give it to one part
//! only.

use crate::error::{Error, Result};
use crate::spec::AttentionSpec;

/// Merges two partial attentions over disjoint key sets of the same queries. `a` and `b` are
/// (output [batch, seq_q, num_heads, head_dim], lse [batch, num_heads, seq_q]) with the shapes of
/// `spec`; returns the merged pair. Lengths that do not match the spec are errors naming the
/// argument (`a.out`, `a.lse`, `b.out`, `b.lse`).
pub fn merge(
    spec: &AttentionSpec,
    a: (&[f32], &[f32]),
    b: (&[f32], &[f32]),
) -> Result<(Vec<f32>, Vec<f32>)> {
    for (field, got, want) in [
        ("a.out", a.0.len(), spec.q_len()),
        ("a.lse", a.1.len(), spec.lse_len()),
        ("b.out", b.0.len(), spec.q_len()),
        ("b.lse", b.1.len(), spec.lse_len()),
    ] {
        if got != want {
            return Err(Error::invalid(
                field,
                format!("{want} values"),
                format!("{got} values"),
            ));
        }
    }
    let (sq, heads, d) = (
        spec.seq_q as usize,
        spec.num_heads as usize,
        spec.head_dim as usize,
    );
    let mut out = vec![0.0f32; spec.q_len()];
    let mut lse = vec![f32::NEG_INFINITY; spec.lse_len()];
    for bt in 0..spec.batch as usize {
        for h in 0..heads {
            for i in 0..sq {
                let li = (bt * heads + h) * sq + i;
                let oi = ((bt * sq + i) * heads + h) * d;
                let (la, lb) = (a.1[li] as f64, b.1[li] as f64);
                let (oa, ob) = (&a.0[oi..oi + d], &b.0[oi..oi + d]);
                let nan = la.is_nan() || lb.is_nan() || oa.iter().chain(ob).any(|x| x.is_nan());
                let o = &mut out[oi..oi + d];
                if nan {
                    lse[li] = f32::NAN;
                    o.fill(f32::NAN);
                    continue;
                }
                let m = la.max(lb);
                if m == f64::NEG_INFINITY {
                    continue; // both empty: 0 and −∞
                }
                let (wa, wb) = ((la - m).exp(), (lb - m).exp());
                let total = wa + wb;
                lse[li] = (m + total.ln()) as f32;
                let (wa, wb) = (wa / total, wb / total);
                for c in 0..d {
                    o[c] = (wa * oa[c] as f64 + wb * ob[c] as f64) as f32;
                }
            }
        }
    }
    Ok((out, lse))
}
