//! The CPU reference: attention computed the plain way (rotate, full score matrix, bias, mask,
//! softmax, weighted sum), generic over the float type so that the same code gives the f64
//! reference and the plain f32 implementation whose error sets the tolerance. It shares no code
//! with the tiled GPU algorithm; its steps carry the names of the shader functions they mirror
//! (`rope_rotate`, `xpos_scale`, `alibi_bias`). Loops index like the formulas they transcribe.
#![allow(clippy::needless_range_loop)]

use crate::position::{
    AlibiForm, AlibiSlopes, PositionEncoding, RopeLayout, alibi_slopes, rope_inv_freq, xpos_zeta,
};
use crate::spec::AttentionSpec;

/// The float operations the reference needs.
pub trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn cos(self) -> Self;
    fn sin(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Channel `c` of `x` after rotating by `pos · inv_freq` (HF `apply_rotary_pos_emb` for the half
/// layout, torchscale/GPT-J `rotate_every_two` for the interleaved one), with cos and sin scaled
/// by `attention_factor`. Channels at or past `rotary_dim` pass through.
pub fn rope_rotate<T: Real>(
    x: &[T],
    pos: i64,
    inv_freq: &[T],
    layout: RopeLayout,
    attention_factor: T,
) -> Vec<T> {
    let r = inv_freq.len() * 2;
    let mut out = x.to_vec();
    for i in 0..r / 2 {
        let (a, b) = match layout {
            RopeLayout::Half => (i, i + r / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let angle = T::from_f64(pos as f64) * inv_freq[i];
        let (c, s) = (
            angle.cos() * attention_factor,
            angle.sin() * attention_factor,
        );
        out[a] = x[a] * c - x[b] * s;
        out[b] = x[b] * c + x[a] * s;
    }
    out
}

/// xPos' factor on the logit term of pair i: `ζ_i^((m − n)/γ)`, the product of the query's
/// upscale and the key's downscale, formed from the relative distance.
pub fn xpos_scale<T: Real>(zeta: T, m: i64, n: i64, scale_base: T) -> T {
    zeta.powf(T::from_f64((m - n) as f64) / scale_base)
}

/// ALiBi's bias for query position m and key position n.
pub fn alibi_bias<T: Real>(slope: T, m: i64, n: i64, form: AlibiForm) -> T {
    let delta = T::from_f64((m - n) as f64);
    match form {
        AlibiForm::Causal => -slope * delta,
        AlibiForm::Symmetric => -slope * delta.abs(),
    }
}

/// Log-n query scaling: `max(1, ln(m + 1) / ln(train_len))`.
pub fn logn_scale(m: i64, train_len: u32) -> f64 {
    ((m.max(0) as f64 + 1.0).ln() / (train_len as f64).ln()).max(1.0)
}

/// Whether query row `i` sees key `j` (bottom-right aligned causal mask, FlashAttention ≥ 2.1).
pub fn visible(spec: &AttentionSpec, i: usize, j: usize) -> bool {
    !spec.causal || (j as i64) <= i as i64 + spec.seq_k as i64 - spec.seq_q as i64
}

/// Attention over [batch, seq, heads, head_dim] tensors in precision `T`. `pos_q` and `pos_k`
/// are [batch, seq]. Rows with no visible key give 0.
pub fn attention<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
) -> Vec<T> {
    let (b_n, sq, sk) = (
        spec.batch as usize,
        spec.seq_q as usize,
        spec.seq_k as usize,
    );
    let (h_n, hkv, d) = (
        spec.num_heads as usize,
        spec.num_kv_heads as usize,
        spec.head_dim as usize,
    );
    let group = h_n / hkv;
    let scale = T::from_f64(spec.softmax_scale());
    let cvt = |s: &[f32]| s.iter().map(|&x| T::from_f64(x as f64)).collect::<Vec<T>>();
    let row = |t: &[f32], b: usize, s: usize, seq: usize, heads: usize, h: usize| {
        let base = ((b * seq + s) * heads + h) * d;
        cvt(&t[base..base + d])
    };

    // Per-encoding preparation.
    let (inv_freq, layout, af): (Vec<T>, RopeLayout, T) = match &spec.position {
        PositionEncoding::Rope(r) => (
            r.inv_freq(spec.head_dim)
                .iter()
                .map(|&f| T::from_f64(f))
                .collect(),
            r.layout,
            T::from_f64(r.attention_factor),
        ),
        PositionEncoding::Xpos(x) => (
            rope_inv_freq(x.theta, spec.head_dim)
                .iter()
                .map(|&f| T::from_f64(f))
                .collect(),
            x.layout,
            T::from_f64(1.0),
        ),
        _ => (Vec::new(), RopeLayout::Half, T::from_f64(1.0)),
    };
    let slopes: Vec<T> = match &spec.position {
        PositionEncoding::Alibi(a) => match &a.slopes {
            AlibiSlopes::Standard => alibi_slopes(spec.num_heads)
                .iter()
                .map(|&s| T::from_f64(s as f32 as f64))
                .collect(),
            AlibiSlopes::Custom(s) => s.iter().map(|&x| T::from_f64(x as f64)).collect(),
        },
        _ => Vec::new(),
    };
    let zeta: Vec<T> = xpos_zeta(spec.head_dim)
        .iter()
        .map(|&z| T::from_f64(z))
        .collect();

    let mut out = vec![T::from_f64(0.0); b_n * sq * h_n * d];
    let mut scores = vec![T::from_f64(0.0); sk];
    for b in 0..b_n {
        for h in 0..h_n {
            let kvh = h / group;
            // Rotate every key of this head once.
            let keys: Vec<Vec<T>> = (0..sk)
                .map(|j| {
                    let kj = row(k, b, j, sk, hkv, kvh);
                    let n = pos_k[b * sk + j] as i64;
                    if inv_freq.is_empty() {
                        kj
                    } else {
                        rope_rotate(&kj, n, &inv_freq, layout, af)
                    }
                })
                .collect();
            for i in 0..sq {
                let m = pos_q[b * sq + i] as i64;
                let mut qi = row(q, b, i, sq, h_n, h);
                if let Some(l) = spec.logn_train_len {
                    let f = T::from_f64(logn_scale(m, l));
                    qi.iter_mut().for_each(|x| *x = *x * f);
                }
                if !inv_freq.is_empty() {
                    qi = rope_rotate(&qi, m, &inv_freq, layout, af);
                }
                let mut max = T::from_f64(f64::NEG_INFINITY);
                let mut any = false;
                for j in 0..sk {
                    if !visible(spec, i, j) {
                        continue;
                    }
                    let n = pos_k[b * sk + j] as i64;
                    let dot = match &spec.position {
                        PositionEncoding::Xpos(x) => {
                            let gamma = T::from_f64(x.scale_base);
                            let mut acc = T::from_f64(0.0);
                            for p in 0..d / 2 {
                                let (a, c) = match layout {
                                    RopeLayout::Half => (p, p + d / 2),
                                    RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                                };
                                let pair = qi[a] * keys[j][a] + qi[c] * keys[j][c];
                                acc = acc + pair * xpos_scale(zeta[p], m, n, gamma);
                            }
                            acc
                        }
                        _ => {
                            let mut acc = T::from_f64(0.0);
                            for c in 0..d {
                                acc = acc + qi[c] * keys[j][c];
                            }
                            acc
                        }
                    };
                    let mut s = dot * scale;
                    if let PositionEncoding::Alibi(a) = &spec.position {
                        s = s + alibi_bias(slopes[h], m, n, a.form);
                    }
                    scores[j] = s;
                    if !any || s > max {
                        max = s;
                    }
                    any = true;
                }
                let o = &mut out[((b * sq + i) * h_n + h) * d..][..d];
                if !any {
                    continue;
                }
                let mut sum = T::from_f64(0.0);
                for j in 0..sk {
                    if visible(spec, i, j) {
                        scores[j] = (scores[j] - max).exp();
                        sum = sum + scores[j];
                    }
                }
                for j in 0..sk {
                    if !visible(spec, i, j) {
                        continue;
                    }
                    let p = scores[j] / sum;
                    let vj = row(v, b, j, sk, hkv, kvh);
                    for c in 0..d {
                        o[c] = o[c] + p * vj[c];
                    }
                }
            }
        }
    }
    out
}
