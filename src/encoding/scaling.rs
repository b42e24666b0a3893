//! RoPE scaling schemes: each one is a frequency table and an attention factor, computed on the
//! host in f64 and handed to the kernel as a [`Rope`] with an explicit `inv_freq`. The formulas
//! follow Hugging Face transformers' `modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS`); where
//! transformers computes in float32 this computes in f64, and tests/scaling.rs holds the two
//! within 1e-6 relative on golden tables made by transformers itself
//! (tests/golden/gen_rope_scaling.py).

use std::f64::consts::PI;

use crate::encoding::position::{Rope, RopeLayout, rope_inv_freq};
use crate::error::{Error, Result};

/// YaRN (Peng et al. 2023) as transformers computes it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Yarn {
    /// Context extension factor; `None` means max_position_embeddings / original (DeepSeek-V3).
    pub factor: Option<f64>,
    /// The context the model was trained on.
    pub original_max_position_embeddings: u64,
    /// The context it is extended to.
    pub max_position_embeddings: u64,
    /// Rotations at which the ramp starts extrapolating (32) and stops interpolating (1).
    pub beta_fast: f64,
    /// See `beta_fast`.
    pub beta_slow: f64,
    /// DeepSeek's `mscale` (`None`: 1).
    pub mscale: Option<f64>,
    /// DeepSeek's `mscale_all_dim` (`None`: 0).
    pub mscale_all_dim: Option<f64>,
    /// Explicit attention factor; `None` derives it from factor, mscale and mscale_all_dim.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions (default true).
    pub truncate: bool,
}

impl Yarn {
    /// YaRN extending `original_max_position_embeddings` by `factor`, with transformers'
    /// defaults for the rest (beta_fast 32, beta_slow 1, no mscale, derived attention factor,
    /// truncated correction range, max_position_embeddings = factor × original); set the public
    /// fields to change them.
    pub fn new(factor: f64, original_max_position_embeddings: u64) -> Self {
        Yarn {
            factor: Some(factor),
            original_max_position_embeddings,
            max_position_embeddings: (factor * original_max_position_embeddings as f64) as u64,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        }
    }
}

/// LongRoPE (Ding et al. 2024; Phi-3) as transformers computes it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LongRope {
    /// Per-pair rescale factors used up to the original context (rotary_dim / 2 of them).
    pub short_factor: Vec<f64>,
    /// Per-pair rescale factors used past it.
    pub long_factor: Vec<f64>,
    /// `None` means max_position_embeddings / original.
    pub factor: Option<f64>,
    /// The context the model was trained on.
    pub original_max_position_embeddings: u64,
    /// The context it is extended to.
    pub max_position_embeddings: u64,
    /// Explicit attention factor; `None` derives it from the factor.
    pub attention_factor: Option<f64>,
}

impl LongRope {
    /// LongRoPE with its two factor tables, the original context and the extended one; the
    /// factor follows from them and the attention factor from the factor (set the public fields
    /// to give either).
    pub fn new(
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: u64,
        max_position_embeddings: u64,
    ) -> Self {
        LongRope {
            short_factor,
            long_factor,
            factor: None,
            original_max_position_embeddings,
            max_position_embeddings,
            attention_factor: None,
        }
    }
}

/// A RoPE scaling scheme.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// `1 / theta^(2i / r)`.
    Default,
    /// Position interpolation (kaiokendev, Chen et al. 2023): every frequency divided by `factor`.
    Linear {
        /// Positions divided by `factor`.
        factor: f64,
    },
    /// NTK-aware scaling with a fixed alpha (bloc97): `theta · alpha^(r / (r − 2))`.
    NtkAlpha {
        /// The NTK-aware base change `theta · alpha^(d / (d − 2))`.
        alpha: f64,
    },
    /// Dynamic NTK (emozilla): the NTK base grows with the current length past
    /// `max_position_embeddings`. The table depends on `seq_len` given to
    /// [`rope_frequencies`]; keys and queries are rotated with the same table inside the kernel,
    /// so there is no stale pre-rotated cache (transformers issue 25104).
    Dynamic {
        /// The extension factor.
        factor: f64,
        /// The trained context; past it the base grows with the sequence.
        max_position_embeddings: u64,
    },
    /// YaRN.
    Yarn(Yarn),
    /// LongRoPE.
    LongRope(LongRope),
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The extension factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled by the factor.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The trained context.
        original_max_position_embeddings: u64,
    },
    /// HF "proportional" (p-RoPE): `int(prf · d // 2)` rotated pairs with exponent denominator d,
    /// zero frequencies for the rest, everything divided by `factor`.
    Proportional {
        /// The extension factor.
        factor: f64,
    },
}

/// A scheme's output: the table the kernel reads.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    /// Inverse frequencies, one per rotation pair (rotary_dim / 2).
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (HF `attention_scaling`).
    pub attention_factor: f64,
    /// Rotating channels.
    pub rotary_dim: u32,
}

impl RopeFrequencies {
    /// The RoPE encoding that applies this table in `layout`.
    pub fn to_rope(&self, theta: f64, layout: RopeLayout) -> Rope {
        Rope {
            layout,
            rotary_dim: Some(self.rotary_dim),
            theta,
            attention_factor: self.attention_factor,
            inv_freq: Some(self.inv_freq.clone()),
        }
    }
}

fn positive(field: &'static str, x: f64) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(Error::invalid(field, "a finite number > 0", x))
    }
}

/// YaRN's magnitude correction `0.1 · m · ln(s) + 1` (1 for s ≤ 1).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Largest head size a frequency table is computed for.
pub const MAX_TABLE_HEAD_DIM: u32 = 1 << 16;

/// The frequency table of `scaling` for a head of `head_dim` channels, `partial_rotary_factor`
/// of which rotate (HF truncates `head_dim · prf` to an integer), at base `theta`. `seq_len` is the
/// current length (largest position + 1) for the schemes that depend on it (dynamic NTK,
/// LongRoPE); `None` means the model's initial table, as transformers builds at load time.
pub fn rope_frequencies(
    theta: f64,
    head_dim: u32,
    partial_rotary_factor: f64,
    scaling: &RopeScaling,
    seq_len: Option<u64>,
) -> Result<RopeFrequencies> {
    let theta = positive("rope_theta", theta)?;
    // Far above any model's head size; a table for a head of 2^31 channels would take 8 GiB.
    if head_dim > MAX_TABLE_HEAD_DIM {
        return Err(Error::invalid(
            "head_dim",
            format!("at most {MAX_TABLE_HEAD_DIM}"),
            head_dim,
        ));
    }
    let prf = positive("partial_rotary_factor", partial_rotary_factor)?;
    if prf > 1.0 {
        return Err(Error::invalid(
            "partial_rotary_factor",
            "a number in (0, 1]",
            prf,
        ));
    }
    let dim = (head_dim as f64 * prf) as u32;
    if dim < 2 {
        return Err(Error::invalid(
            "partial_rotary_factor",
            "at least two rotating channels",
            prf,
        ));
    }
    let dim = dim - dim % 2;
    let r = dim as f64;
    let plain = |base: f64| rope_inv_freq(base, dim);
    let out = |inv_freq: Vec<f64>, attention_factor: f64| RopeFrequencies {
        inv_freq,
        attention_factor,
        rotary_dim: dim,
    };
    Ok(match scaling {
        RopeScaling::Default => out(plain(theta), 1.0),
        RopeScaling::Linear { factor } => {
            let f = positive("factor", *factor)?;
            out(plain(theta).iter().map(|x| x / f).collect(), 1.0)
        }
        RopeScaling::NtkAlpha { alpha } => {
            let a = positive("alpha", *alpha)?;
            out(plain(theta * a.powf(r / (r - 2.0))), 1.0)
        }
        RopeScaling::Dynamic {
            factor,
            max_position_embeddings,
        } => {
            let f = positive("factor", *factor)?;
            let max = *max_position_embeddings as f64;
            positive("max_position_embeddings", max)?;
            let len = seq_len.map_or(max, |s| (s as f64).max(max));
            let base = theta * ((f * len / max) - (f - 1.0)).powf(r / (r - 2.0));
            out(plain(base), 1.0)
        }
        RopeScaling::Yarn(y) => {
            let orig = positive(
                "original_max_position_embeddings",
                y.original_max_position_embeddings as f64,
            )?;
            let factor = match y.factor {
                Some(f) => positive("factor", f)?,
                None => {
                    positive("max_position_embeddings", y.max_position_embeddings as f64)? / orig
                }
            };
            let attention_factor = match y.attention_factor {
                Some(a) => positive("attention_factor", a)?,
                None => match (y.mscale, y.mscale_all_dim) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        yarn_get_mscale(factor, m) / yarn_get_mscale(factor, ma)
                    }
                    _ => yarn_get_mscale(factor, 1.0),
                },
            };
            // transformers: `beta_fast or 32`, `beta_slow or 1`.
            let beta_fast = if y.beta_fast == 0.0 {
                32.0
            } else {
                y.beta_fast
            };
            let beta_slow = if y.beta_slow == 0.0 { 1.0 } else { y.beta_slow };
            let corr_dim = |rot: f64| r * (orig / (rot * 2.0 * PI)).ln() / (2.0 * theta.ln());
            let (mut low, mut high) = (corr_dim(beta_fast), corr_dim(beta_slow));
            if y.truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(r - 1.0);
            if low == high {
                high += 0.001;
            }
            let inv = (0..dim / 2)
                .map(|i| {
                    let extrap = theta.powf(-(2.0 * i as f64) / r);
                    let interp = extrap / factor;
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let e = 1.0 - ramp;
                    interp * (1.0 - e) + extrap * e
                })
                .collect();
            out(inv, attention_factor)
        }
        RopeScaling::LongRope(l) => {
            let orig = positive(
                "original_max_position_embeddings",
                l.original_max_position_embeddings as f64,
            )?;
            for (field, f) in [
                ("short_factor", &l.short_factor),
                ("long_factor", &l.long_factor),
            ] {
                if f.len() != (dim / 2) as usize {
                    return Err(Error::invalid(
                        field,
                        format!("{} factors (rotary_dim / 2)", dim / 2),
                        format!("{} factors", f.len()),
                    ));
                }
                if let Some(bad) = f.iter().find(|x| !x.is_finite() || **x <= 0.0) {
                    return Err(Error::invalid(field, "finite factors > 0", bad));
                }
            }
            let factor = match l.factor {
                Some(f) => positive("factor", f)?,
                None => {
                    positive("max_position_embeddings", l.max_position_embeddings as f64)? / orig
                }
            };
            let attention_factor = match l.attention_factor {
                Some(a) => positive("attention_factor", a)?,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / orig.ln()).sqrt(),
            };
            let ext = match seq_len {
                Some(s) if s > l.original_max_position_embeddings => &l.long_factor,
                _ => &l.short_factor,
            };
            let inv = (0..dim / 2)
                .map(|i| 1.0 / (ext[i as usize] * theta.powf(2.0 * i as f64 / r)))
                .collect();
            out(inv, attention_factor)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let f = positive("factor", *factor)?;
            let lo = positive("low_freq_factor", *low_freq_factor)?;
            let hi = positive("high_freq_factor", *high_freq_factor)?;
            if hi <= lo {
                return Err(Error::invalid(
                    "high_freq_factor",
                    format!("more than low_freq_factor ({lo})"),
                    hi,
                ));
            }
            let old = positive(
                "original_max_position_embeddings",
                *original_max_position_embeddings as f64,
            )?;
            let (low_wavelen, high_wavelen) = (old / lo, old / hi);
            let inv = plain(theta)
                .into_iter()
                .map(|x| {
                    let wavelen = 2.0 * PI / x;
                    if wavelen < high_wavelen {
                        x
                    } else if wavelen > low_wavelen {
                        x / f
                    } else {
                        let s = (old / wavelen - lo) / (hi - lo);
                        (1.0 - s) * x / f + s * x
                    }
                })
                .collect();
            out(inv, 1.0)
        }
        RopeScaling::Proportional { factor } => {
            let f = positive("factor", *factor)?;
            let d = head_dim as f64;
            let angles = ((prf * d) / 2.0).floor() as u32;
            let inv = (0..head_dim / 2)
                .map(|i| {
                    if i < angles {
                        1.0 / theta.powf(2.0 * i as f64 / d) / f
                    } else {
                        0.0
                    }
                })
                .collect();
            return Ok(RopeFrequencies {
                inv_freq: inv,
                attention_factor: 1.0,
                rotary_dim: head_dim,
            });
        }
    })
}
