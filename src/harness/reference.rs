//! The CPU reference: attention computed the plain way (rotate, full score matrix, bias, mask,
//! softmax, weighted sum), generic over the float type so that the same code gives the f64
//! reference and the plain f32 implementation whose error sets the tolerance. It shares no code
//! with the tiled GPU algorithm; its steps carry the names of the shader functions they mirror
//! (`rope_rotate`, `xpos_scale`, `alibi_bias`). Loops index like the formulas they transcribe.
#![allow(clippy::needless_range_loop)]

use crate::encoding::custom::{CustomScheme, MaskArgs, RotateArgs, ScoreArgs};
use crate::encoding::masks::Extrapolation;
use crate::encoding::position::{
    AlibiForm, AlibiSlopes, PositionEncoding, RopeLayout, alibi_slopes, rope_inv_freq, xpos_zeta,
};
use crate::encoding::relative::{FIRE_EPS, KerpleForm, T5Bias};
use crate::kernel::BLOCK_Q;
use crate::spec::AttentionSpec;

/// The float operations the reference needs.
pub trait Real:
    'static
    + Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// `x` in this precision.
    fn from_f64(x: f64) -> Self;
    /// The value in f64.
    fn to_f64(self) -> f64;
    /// e^x.
    fn exp(self) -> Self;
    /// Cosine.
    fn cos(self) -> Self;
    /// Sine.
    fn sin(self) -> Self;
    /// x^e.
    fn powf(self, e: Self) -> Self;
    /// |x|.
    fn abs(self) -> Self;
    /// Whether x is NaN.
    fn is_nan(self) -> bool;
    /// Natural log.
    fn ln(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
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
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
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
    let p = T::from_f64(pos as f64);
    let angles: Vec<T> = inv_freq.iter().map(|&f| p * f).collect();
    rope_rotate_angles(x, &angles, layout, attention_factor)
}

/// `rope_rotate` with the angle of each pair given.
pub fn rope_rotate_angles<T: Real>(
    x: &[T],
    angles: &[T],
    layout: RopeLayout,
    attention_factor: T,
) -> Vec<T> {
    let r = angles.len() * 2;
    let mut out = x.to_vec();
    for i in 0..r / 2 {
        let (a, b) = match layout {
            RopeLayout::Half => (i, i + r / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        };
        let angle = angles[i];
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

/// Whether query row `i` sees key `j`: the causal mask (bottom-right aligned, FlashAttention
/// ≥ 2.1), the window and the sinks (`AttentionSpec::visible`).
pub fn visible(spec: &AttentionSpec, i: usize, j: usize) -> bool {
    spec.visible(i, j)
}

/// T5's bucket of `rel = key_pos − query_pos`, from the definition (transformers'
/// `T5Attention._relative_position_bucket`), written apart from the kernel's table builder so that
/// a mistake there shows as a mismatch. transformers takes the log of a float32 tensor and the log
/// of the distance ratio as a Python float, then truncates; so does this.
fn t5_bucket(b: &T5Bias, rel: i64) -> usize {
    let mut nb = b.num_buckets as i64;
    let mut offset = 0;
    let r = if b.bidirectional {
        nb /= 2;
        if rel > 0 {
            offset = nb;
        }
        rel.abs()
    } else {
        -rel.min(0)
    };
    let max_exact = nb / 2;
    let bucket = if r < max_exact {
        r
    } else {
        let ratio_log = (b.max_distance as f64 / max_exact as f64).ln();
        let large = (r as f32 / max_exact as f32).ln() / ratio_log as f32 * (nb - max_exact) as f32;
        (max_exact + large as i64).min(nb - 1)
    };
    (offset + bucket) as usize
}

/// The table-driven relative biases (T5, KERPLE, Sandwich, FIRE) of head `h` for query position
/// m and key position n, in natural-log units; 0 for other encodings. Mirrors `table_bias` in
/// shaders/position.wgsl, computed from the definitions rather than the kernel's tables.
pub fn position_bias<T: Real>(spec: &AttentionSpec, h: usize, m: i64, n: i64) -> T {
    let t = |x: f64| T::from_f64(x);
    let heads = spec.num_heads as usize;
    let dist = t((m - n).abs() as f64);
    match &spec.position {
        PositionEncoding::T5(b) => {
            let bucket = t5_bucket(b, n - m);
            t(b.table[bucket * heads + h] as f64)
        }
        PositionEncoding::Kerple(k) => {
            // Per-head parameters clamped to ≥ 1e-2 (and p ≤ 2 for the power form).
            let p = (k.p[h] as f64).max(0.01);
            let p = if k.form == KerpleForm::Power {
                p.min(2.0)
            } else {
                p
            };
            let (p, a) = (t(p), t((k.a[h] as f64).max(0.01)));
            match k.form {
                KerpleForm::Log => -(p * (t(1.0) + a * dist).ln()),
                KerpleForm::Power if m == n => t(0.0),
                KerpleForm::Power => -(a * dist.powf(p)),
            }
        }
        PositionEncoding::Sandwich(sw) => {
            // Σ_{k=1..d'/2} cos(Δ / 10000^(2k/d')), minus d'/2, times H / (8h).
            let d = sw.dim(spec.head_dim) as f64;
            let half = sw.dim(spec.head_dim) / 2;
            let mut sum = t(0.0);
            for k in 1..=half {
                sum = sum + (dist / t(10000f64.powf(2.0 * k as f64 / d))).cos();
            }
            (sum - t(half as f64)) * t(heads as f64 / (8.0 * (h + 1) as f64))
        }
        PositionEncoding::Fire(f) => {
            let (c, l) = (t(f.c as f64), t(f.l.abs() as f64));
            let mp = t(m as f64);
            let norm = if mp > l { mp } else { l };
            let x = (t((m - n) as f64) * c).abs().ln_1p_t()
                / ((c * norm).abs().ln_1p_t() + t(FIRE_EPS));
            let w = f.width();
            let mut acc = t(f.b2[h] as f64);
            for j in 0..w {
                let hidden = t(f.w1[j] as f64) * x + t(f.b1[j] as f64);
                if hidden > t(0.0) {
                    acc = acc + t(f.w2[h * w + j] as f64) * hidden;
                }
            }
            acc
        }
        _ => t(0.0),
    }
}

/// A custom scheme's rotation twin on every channel pair of `x` (its layout), in f64 and
/// rounded back to `T`.
fn rotate_twin<T: Real>(c: &CustomScheme, x: &[T], pos: i64, is_query: bool) -> Vec<T> {
    let f = c.rotate_twin.as_ref().expect("a rotation twin");
    let d = x.len();
    let mut out = x.to_vec();
    for p in 0..d / 2 {
        let (a, b) = match c.layout {
            RopeLayout::Half => (p, p + d / 2),
            RopeLayout::Interleaved => (2 * p, 2 * p + 1),
        };
        let y = f(&RotateArgs {
            x: [x[a].to_f64(), x[b].to_f64()],
            pair: p as u32,
            pos,
            is_query,
            tables: &c.tables,
        });
        out[a] = T::from_f64(y[0]);
        out[b] = T::from_f64(y[1]);
    }
    out
}

trait Ln1p {
    fn ln_1p_t(self) -> Self;
}

impl<T: Real> Ln1p for T {
    /// ln(x + 1) as the sources write it (`torch.log(x + 1)`), not a dedicated log1p.
    fn ln_1p_t(self) -> Self {
        (self + T::from_f64(1.0)).ln()
    }
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
    attention_with_bias(spec, q, k, v, pos_q, pos_k, None)
}

/// The second RoPE branch of an extrapolation method: per pair, the query's angle and the key's.
struct Branch<T> {
    /// Query angles for a query at position m and key index ip.
    q_angles: Box<dyn Fn(i64, i64) -> Vec<T>>,
    /// Key angles for a key at position n.
    k_angles: Box<dyn Fn(i64) -> Vec<T>>,
}

fn branch<T: Real>(spec: &AttentionSpec, inv: &[f64]) -> Option<Branch<T>> {
    let inv = inv.to_vec();
    let at = move |inv: &[f64], p: f64, scale: f64, phase: f64| -> Vec<T> {
        inv.iter()
            .map(|&f| T::from_f64(p) * T::from_f64(f * scale) + T::from_f64(phase * f))
            .collect()
    };
    match spec.extrapolation {
        Extrapolation::None => None,
        Extrapolation::ReRope { window, leak } => {
            // Beyond the window the distance is w + (Δ − w)/k: the query at m/k + w(1 − 1/k),
            // the key at n/k (unrotated for plain ReRoPE, k = ∞).
            let inv_k = leak.map_or(0.0, |k| 1.0 / k);
            let w = window as f64;
            let (iq, ik) = (inv.clone(), inv);
            Some(Branch {
                q_angles: Box::new(move |m, _| at(&iq, m as f64, inv_k, w * (1.0 - inv_k))),
                k_angles: Box::new(move |n| at(&ik, n as f64, inv_k, 0.0)),
            })
        }
        Extrapolation::LmInfinite { limit } => {
            let (iq, ik) = (inv.clone(), inv);
            Some(Branch {
                q_angles: Box::new(move |_, _| at(&iq, 0.0, 0.0, limit as f64)),
                k_angles: Box::new(move |_| at(&ik, 0.0, 0.0, 0.0)),
            })
        }
        Extrapolation::StreamingCacheIndex => {
            let cache_last = spec.sink_tokens as i64 + spec.window.left.unwrap_or(0) as i64;
            let (iq, ik) = (inv.clone(), inv);
            Some(Branch {
                q_angles: Box::new(move |m, ip| {
                    at(&iq, (m - (ip - cache_last).max(0)) as f64, 1.0, 0.0)
                }),
                k_angles: Box::new(move |n| at(&ik, n as f64, 1.0, 0.0)),
            })
        }
    }
}

/// Whether the score of query row at key index `ip` (position m) for key j at position n comes
/// from the second branch.
fn uses_branch(spec: &AttentionSpec, ip: i64, m: i64, j: i64, n: i64) -> bool {
    match spec.extrapolation {
        Extrapolation::None => false,
        Extrapolation::ReRope { window, .. } => (m - n).abs() >= window as i64,
        Extrapolation::LmInfinite { .. } | Extrapolation::StreamingCacheIndex => {
            j < spec.sink_tokens as i64 && !spec.in_window(ip, j)
        }
    }
}

/// `attention` with the caller's additive bias, laid out as `spec.bias` says.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_bias<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
) -> Vec<T> {
    attention_lse(spec, q, k, v, pos_q, pos_k, bias).0
}

/// `attention_with_bias` with the score products' operands (the rotated, log-n-scaled queries
/// and the rotated keys) rounded to f16 first: the plain implementation of what a kernel with
/// f16 score products (tensor cores, `ScoreTile`) computes, for that kernel's error bound.
#[allow(clippy::too_many_arguments)]
pub fn attention_half_scores<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
) -> Vec<T> {
    attention_impl(spec, q, k, v, pos_q, pos_k, bias, true, Pv::Exact).0
}

/// `attention_half_scores` with P·V's operands rounded to f16 too: each visible key's softmax
/// weight relative to the row's maximum (exp(s − max), in (0, 1]) and its V row, accumulated
/// in the working precision and divided by the sum of the unrounded weights. The plain
/// implementation of what a kernel with f16 tile products for both Q·Kᵀ and P·V
/// (`ScoreTile::*Pv`) computes, for that kernel's error bound.
#[allow(clippy::too_many_arguments)]
pub fn attention_half_pv<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
) -> Vec<T> {
    attention_impl(spec, q, k, v, pos_q, pos_k, bias, true, Pv::Half).0
}

/// `attention_with_bias` with P·V in f16 arithmetic: each visible key's softmax weight relative
/// to the row's maximum plus ln 8 (exp(s − max) / 8, in (0, 1/8]) rounded to f16, its V row
/// rounded to f16, and their products summed in key order into f16 accumulators (each sum
/// rounded to f16), then divided by the sum of the unrounded weights (f32 arithmetic). The
/// plain implementation of what the fused kernel with f16 accumulation
/// (`Accumulation::F16`, `KernelKey::with_half_acc`) computes, for that kernel's error bound;
/// Q·Kᵀ and the softmax stay in the working precision.
#[allow(clippy::too_many_arguments)]
pub fn attention_half_acc<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
) -> Vec<T> {
    attention_impl(spec, q, k, v, pos_q, pos_k, bias, false, Pv::HalfAcc).0
}

/// P·V's arithmetic in `attention_impl`.
#[derive(Clone, Copy, PartialEq)]
enum Pv {
    /// The working precision.
    Exact,
    /// f16 weights and V, accumulated in the working precision.
    Half,
    /// f16 weights (scaled by 1/8) and V, accumulated in f16.
    HalfAcc,
}

/// `attention_with_bias` and each row's log-sum-exp ([batch, num_heads, seq_q], natural log,
/// of the softmax denominator: visible keys and the sink logit; −∞ when that is empty).
#[allow(clippy::too_many_arguments)]
pub fn attention_lse<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
) -> (Vec<T>, Vec<T>) {
    attention_impl(spec, q, k, v, pos_q, pos_k, bias, false, Pv::Exact)
}

/// The smallest normal f16, 2⁻¹⁴.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

#[allow(clippy::too_many_arguments)]
fn attention_impl<T: Real>(
    spec: &AttentionSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos_q: &[i32],
    pos_k: &[i32],
    bias: Option<&[f32]>,
    half_scores: bool,
    pv: Pv,
) -> (Vec<T>, Vec<T>) {
    // Rounded to f16 with subnormals flushed to zero, which SPIR-V's f16 conversions allow
    // (OpQuantizeToF16, the emulated tile's, does on lavapipe).
    let round_half = |e: T| {
        let x = crate::dtype::Dtype::F16.round(e.to_f64() as f32);
        T::from_f64(if x.abs() < F16_MIN_NORMAL {
            0.0
        } else {
            x as f64
        })
    };
    // The kernel scales xPos queries and keys relative to its query tile's first position
    // (`origin`, every BLOCK_Q rows) before rounding them: ζ^((m − origin)/γ) and
    // ζ^((origin − n)/γ). Mirrored here, since with far-apart positions either factor can push
    // an operand out of f16's normal range.
    let xpos_half = half_scores && matches!(spec.position, PositionEncoding::Xpos(_));
    let half = |x: Vec<T>| -> Vec<T> {
        if half_scores {
            x.into_iter().map(round_half).collect()
        } else {
            x
        }
    };
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
    let (inv_f64, layout, af): (Vec<f64>, RopeLayout, T) = match &spec.position {
        PositionEncoding::Rope(r) => (
            r.inv_freq(spec.head_dim),
            r.layout,
            T::from_f64(r.attention_factor),
        ),
        PositionEncoding::Xpos(x) => (
            rope_inv_freq(x.theta, spec.head_dim),
            x.layout,
            T::from_f64(1.0),
        ),
        _ => (Vec::new(), RopeLayout::Half, T::from_f64(1.0)),
    };
    let inv_freq: Vec<T> = inv_f64.iter().map(|&f| T::from_f64(f)).collect();
    let second = branch::<T>(spec, &inv_f64);
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
    let cap = spec.softcap.map(T::from_f64);
    let layout_b = spec.bias.unwrap_or_default();
    let custom = match &spec.position {
        PositionEncoding::Custom(c) => Some(c),
        _ => None,
    };

    let mut out = vec![T::from_f64(0.0); b_n * sq * h_n * d];
    let mut lse = vec![T::from_f64(f64::NEG_INFINITY); b_n * h_n * sq];
    let mut scores = vec![T::from_f64(0.0); sk];
    let mut vis = vec![false; sk];
    for b in 0..b_n {
        for h in 0..h_n {
            let kvh = h / group;
            // Every key of this head, rotated once (and once more for the second branch).
            let raw_keys: Vec<Vec<T>> = (0..sk).map(|j| row(k, b, j, sk, hkv, kvh)).collect();
            let keys: Vec<Vec<T>> = (0..sk)
                .map(|j| {
                    let n = pos_k[b * sk + j] as i64;
                    if let Some(c) = custom.filter(|c| c.rotate_twin.is_some()) {
                        rotate_twin(c, &raw_keys[j], n, false)
                    } else if inv_freq.is_empty() {
                        raw_keys[j].clone()
                    } else {
                        rope_rotate(&raw_keys[j], n, &inv_freq, layout, af)
                    }
                })
                // xPos keys are rounded with their position scale below.
                .map(|x| if xpos_half { x } else { half(x) })
                .collect();
            let keys2: Vec<Vec<T>> = match &second {
                Some(br) => (0..sk)
                    .map(|j| {
                        let n = pos_k[b * sk + j] as i64;
                        rope_rotate_angles(&raw_keys[j], &(br.k_angles)(n), layout, af)
                    })
                    .collect(),
                None => Vec::new(),
            };
            for i in 0..sq {
                let m = pos_q[b * sq + i] as i64;
                let ip = i as i64 + sk as i64 - sq as i64;
                let mut q_raw = row(q, b, i, sq, h_n, h);
                if let Some(l) = spec.logn_train_len {
                    let f = T::from_f64(logn_scale(m, l));
                    q_raw.iter_mut().for_each(|x| *x = *x * f);
                }
                let qi = if let Some(c) = custom.filter(|c| c.rotate_twin.is_some()) {
                    rotate_twin(c, &q_raw, m, true)
                } else if inv_freq.is_empty() {
                    q_raw.clone()
                } else {
                    rope_rotate(&q_raw, m, &inv_freq, layout, af)
                };
                let qi = if xpos_half { qi } else { half(qi) };
                let q2 = second
                    .as_ref()
                    .map(|br| rope_rotate_angles(&q_raw, &(br.q_angles)(m, ip), layout, af));
                let dot = |a: &[T], c: &[T]| {
                    let mut acc = T::from_f64(0.0);
                    for x in 0..d {
                        acc = acc + a[x] * c[x];
                    }
                    acc
                };
                let mut max = T::from_f64(f64::NEG_INFINITY);
                let mut any = false;
                for j in 0..sk {
                    let n = pos_k[b * sk + j] as i64;
                    vis[j] = visible(spec, i, j)
                        && custom.is_none_or(|c| {
                            c.mask_twin.as_ref().is_none_or(|f| {
                                f(&MaskArgs {
                                    q_pos: m,
                                    k_pos: n,
                                    head: h as u32,
                                    q_index: i as u32,
                                    k_index: j as u32,
                                    tables: &c.tables,
                                })
                            })
                        });
                    if !vis[j] {
                        continue;
                    }
                    let raw = match (&spec.position, &q2) {
                        (PositionEncoding::Xpos(x), _) => {
                            let gamma = T::from_f64(x.scale_base);
                            let mut acc = T::from_f64(0.0);
                            for p in 0..d / 2 {
                                let (a, c) = match layout {
                                    RopeLayout::Half => (p, p + d / 2),
                                    RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                                };
                                let sc = xpos_scale(zeta[p], m, n, gamma);
                                if xpos_half {
                                    let origin = pos_q[b * sq + i - i % BLOCK_Q as usize] as i64;
                                    let sq_ = xpos_scale(zeta[p], m, origin, gamma);
                                    let sk_ = xpos_scale(zeta[p], origin, n, gamma);
                                    // The kernel's queries also carry scale · log2 e.
                                    let qs = scale * T::from_f64(std::f64::consts::LOG2_E);
                                    let qa = round_half(qi[a] * sq_ * qs) / qs;
                                    let qc = round_half(qi[c] * sq_ * qs) / qs;
                                    acc = acc
                                        + qa * round_half(keys[j][a] * sk_)
                                        + qc * round_half(keys[j][c] * sk_);
                                    continue;
                                }
                                let pair = qi[a] * keys[j][a] + qi[c] * keys[j][c];
                                acc = acc + pair * sc;
                            }
                            acc
                        }
                        (_, Some(q2)) if uses_branch(spec, ip, m, j as i64, n) => {
                            dot(q2, &keys2[j])
                        }
                        _ => dot(&qi, &keys[j]),
                    };
                    let mut s = raw * scale;
                    if let Some(c) = cap {
                        s = c * (s / c).tanh();
                    }
                    if let PositionEncoding::Alibi(a) = &spec.position {
                        s = s + alibi_bias(slopes[h], m, n, a.form);
                    }
                    s = s + position_bias::<T>(spec, h, m, n);
                    // A custom score_mod's twin, in f64 (rounded back once for the f32
                    // reference, as the kernel rounds its result once).
                    if let Some(f) = custom.and_then(|c| c.score_twin.as_ref()) {
                        s = T::from_f64(f(&ScoreArgs {
                            score: s.to_f64(),
                            q_pos: m,
                            k_pos: n,
                            head: h as u32,
                            q_index: i as u32,
                            k_index: j as u32,
                            tables: &custom.expect("custom").tables,
                        }));
                    }
                    if let Some(bias) = bias {
                        let bb = if layout_b.broadcast_batch { 0 } else { b };
                        let hh = if layout_b.broadcast_heads { 0 } else { h };
                        let hb = if layout_b.broadcast_heads { 1 } else { h_n };
                        let x = bias[((bb * hb + hh) * sq + i) * sk + j];
                        if x <= -1e30 {
                            vis[j] = false;
                            continue;
                        }
                        s = s + T::from_f64(x as f64);
                    }
                    scores[j] = s;
                    if !any || s > max || s.is_nan() {
                        max = s;
                    }
                    any = true;
                }
                let o = &mut out[((b * sq + i) * h_n + h) * d..][..d];
                let sink = spec.sink_logits.as_ref().map(|l| T::from_f64(l[h] as f64));
                let li = (b * h_n + h) * sq + i;
                if !any {
                    if let Some(sl) = sink {
                        lse[li] = sl;
                    }
                    continue;
                }
                if let Some(sl) = sink
                    && sl > max
                    && !max.is_nan()
                {
                    max = sl;
                }
                let mut sum = sink.map_or(T::from_f64(0.0), |sl| (sl - max).exp());
                for j in 0..sk {
                    if vis[j] {
                        scores[j] = (scores[j] - max).exp();
                        sum = sum + scores[j];
                    }
                }
                lse[li] = max + sum.ln();
                // The weights keep f16's subnormals: a kernel's weights are relative to its
                // running maximum, so which tiny ones a flush would drop differs.
                let round_p =
                    |e: T| T::from_f64(crate::dtype::Dtype::F16.round(e.to_f64() as f32) as f64);
                if pv == Pv::HalfAcc {
                    let eighth = T::from_f64(0.125);
                    for j in 0..sk {
                        if !vis[j] {
                            continue;
                        }
                        let p = round_p(scores[j] * eighth);
                        let vj = row(v, b, j, sk, hkv, kvh);
                        for c in 0..d {
                            o[c] = round_p(o[c] + p * round_p(vj[c]));
                        }
                    }
                    let l = sum * eighth;
                    o.iter_mut().for_each(|x| *x = *x / l);
                    continue;
                }
                if pv == Pv::Half {
                    for j in 0..sk {
                        if !vis[j] {
                            continue;
                        }
                        let p = round_p(scores[j]);
                        let vj = half(row(v, b, j, sk, hkv, kvh));
                        for c in 0..d {
                            o[c] = o[c] + p * vj[c];
                        }
                    }
                    o.iter_mut().for_each(|x| *x = *x / sum);
                    continue;
                }
                for j in 0..sk {
                    if !vis[j] {
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
    (out, lse)
}
