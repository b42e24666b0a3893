//! Relative-position biases computed inside the kernel from the token positions and a few
//! per-head parameters: T5's buckets, KERPLE, Sandwich and FIRE. The exact math follows
//! `shared/reference/position-encodings.md` and the code that defines each one (Hugging Face
//! `T5Attention`, chijames/KERPLE, NeMo's `SandwichRelativePositionEmbedding`, the FIRE paper's
//! reference module). None of them materialises a seq_q × seq_k matrix: the host builds per-head
//! tables indexed by distance (or the MLP weights) and the kernel looks them up per score.

use crate::error::{Error, Result};

/// T5's relative position buckets (HF `T5Attention._relative_position_bucket`) with the
/// caller's learned table. Logits are not scaled by 1/√d in T5: a spec with this encoding and no
/// explicit scale uses 1.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Bias {
    /// Buckets of the table (HF `relative_attention_num_buckets`).
    pub num_buckets: u32,
    /// Distance at which the logarithmic buckets end (HF `relative_attention_max_distance`).
    pub max_distance: u32,
    /// Encoder self-attention uses both directions; decoders use `false`.
    pub bidirectional: bool,
    /// `relative_attention_bias.weight`: [num_buckets, num_heads], row-major.
    pub table: Vec<f32>,
}

/// The two kernels of KERPLE (Chi et al. 2022).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KerpleForm {
    /// `−p · ln(1 + a·|Δ|)`
    Log,
    /// `−a · |Δ|^p`, p in (0, 2]
    Power,
}

/// KERPLE with per-head learned parameters. As in chijames/KERPLE, both are clamped to at
/// least 1e-2 before use (and the power form's p to at most 2).
#[derive(Clone, Debug, PartialEq)]
pub struct Kerple {
    /// Which kernel.
    pub form: KerpleForm,
    /// One per query head.
    pub p: Vec<f32>,
    /// One per query head.
    pub a: Vec<f32>,
}

/// Sandwich (Chi et al. 2023, NeMo): `Σ_{k=1..d'/2} cos(Δ / 10000^(2k/d'))`, shifted by `−d'/2`
/// and divided by `8h/H` for head h = 1..H.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Sandwich {
    /// d' (NeMo's `hidden_size`, the size per head); `None` = head_dim.
    pub dim: Option<u32>,
}

/// FIRE (Li et al. 2024): `b(m, n) = MLP(ln(|c·Δ| + 1) / (ln(|c·max(m, L)| + 1) + 1e-6))` with
/// MLP = Linear(1, W) → ReLU → Linear(W, H) (W = 32 in the paper). Weights in PyTorch's layout.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Fire {
    /// The learned `c` (initialised at 0.1).
    pub c: f32,
    /// The threshold L (`|L_multiplier · init_L|`, initialised at 512).
    pub l: f32,
    /// First layer weight `[W, 1]` and bias `[W]`.
    pub w1: Vec<f32>,
    /// First layer bias `[W]`.
    pub b1: Vec<f32>,
    /// Second layer weight `[H, W]` and bias `[H]`.
    pub w2: Vec<f32>,
    /// Second layer bias `[H]`.
    pub b2: Vec<f32>,
}

/// FIRE's normaliser epsilon.
pub const FIRE_EPS: f64 = 1e-6;
/// Largest FIRE MLP width.
pub const FIRE_MAX_WIDTH: usize = 1024;
/// Largest T5 `max_distance`: the kernel's table holds one entry per distance up to it.
pub const T5_MAX_DISTANCE: u32 = 1 << 16;
/// Sandwich distances below this many come from a table built in f64; larger ones are summed in
/// the kernel.
pub const SANDWICH_TABLE_MAX: u32 = 1 << 16;
/// KERPLE's parameter floor.
pub const KERPLE_EPS: f32 = 1e-2;

/// T5's bucket of a relative position `rel = key_pos − query_pos`, computed in f32 as
/// transformers does (`torch.log` on float32, then truncation).
pub(crate) fn t5_bucket(rel: i64, num_buckets: u32, max_distance: u32, bidirectional: bool) -> u32 {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let mut rel = rel;
    if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = nb / 2;
    if rel < max_exact {
        return (bucket + rel) as u32;
    }
    let large = (rel as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (nb - max_exact) as f32;
    let large = (max_exact + large as i64).min(nb - 1);
    (bucket + large) as u32
}

/// KERPLE's parameters after the source's clamps.
pub(crate) fn kerple_params(form: KerpleForm, p: f32, a: f32) -> (f32, f32) {
    let p = p.max(KERPLE_EPS);
    let p = if form == KerpleForm::Power {
        p.min(2.0)
    } else {
        p
    };
    (p, a.max(KERPLE_EPS))
}

/// Sandwich's frequencies `10000^(−2k/d')`, k = 1..d'/2.
pub(crate) fn sandwich_freqs(dim: u32) -> Vec<f64> {
    (1..=dim / 2)
        .map(|k| 10000f64.powf(-2.0 * k as f64 / dim as f64))
        .collect()
}

/// Sandwich's head-independent part: `Σ cos(δ·ω_k) − d'/2`.
pub(crate) fn sandwich_sum(delta: i64, freqs: &[f64]) -> f64 {
    let s: f64 = freqs.iter().map(|w| (delta as f64 * w).cos()).sum();
    s - freqs.len() as f64
}

fn check_len<T>(field: &'static str, v: &[T], want: usize, what: &str) -> Result<()> {
    if v.len() != want {
        return Err(Error::invalid(
            field,
            format!("{want} values ({what})"),
            format!("{} values", v.len()),
        ));
    }
    Ok(())
}

fn check_finite(field: &'static str, v: &[f32]) -> Result<()> {
    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
        return Err(Error::invalid(field, "finite values", bad));
    }
    Ok(())
}

impl T5Bias {
    pub(crate) fn validate(&self, num_heads: u32) -> Result<()> {
        let min = if self.bidirectional { 4 } else { 2 };
        if self.num_buckets < min {
            return Err(Error::invalid(
                "t5.num_buckets",
                format!("at least {min}"),
                self.num_buckets,
            ));
        }
        let max_exact = if self.bidirectional {
            self.num_buckets / 4
        } else {
            self.num_buckets / 2
        };
        if self.max_distance <= max_exact || self.max_distance > T5_MAX_DISTANCE {
            return Err(Error::invalid(
                "t5.max_distance",
                format!("in {}..={T5_MAX_DISTANCE}", max_exact + 1),
                self.max_distance,
            ));
        }
        check_len(
            "t5.table",
            &self.table,
            self.num_buckets as usize * num_heads as usize,
            "num_buckets × num_heads",
        )?;
        check_finite("t5.table", &self.table)
    }

    /// Per head, the bias of every relative position `rel` in `−D..=D` (D = max_distance), at
    /// index `rel + D`: past D every bucket is the last one, so the kernel clamps `rel`.
    pub(crate) fn lut(&self, num_heads: u32) -> Vec<f32> {
        let d = self.max_distance as i64;
        let mut out = Vec::with_capacity(num_heads as usize * (2 * d as usize + 1));
        for h in 0..num_heads as usize {
            for rel in -d..=d {
                let b = t5_bucket(rel, self.num_buckets, self.max_distance, self.bidirectional)
                    as usize;
                out.push(self.table[b * num_heads as usize + h]);
            }
        }
        out
    }
}

impl Kerple {
    pub(crate) fn validate(&self, num_heads: u32) -> Result<()> {
        check_len(
            "kerple.p",
            &self.p,
            num_heads as usize,
            "one per query head",
        )?;
        check_len(
            "kerple.a",
            &self.a,
            num_heads as usize,
            "one per query head",
        )?;
        check_finite("kerple.p", &self.p)?;
        check_finite("kerple.a", &self.a)
    }
}

impl Sandwich {
    /// d' for a head of `head_dim` channels.
    pub fn dim(&self, head_dim: u32) -> u32 {
        self.dim.unwrap_or(head_dim)
    }

    pub(crate) fn validate(&self, head_dim: u32) -> Result<()> {
        let d = self.dim(head_dim);
        if d < 2 || !d.is_multiple_of(2) || d > 4096 {
            return Err(Error::invalid(
                "sandwich.dim",
                "an even number in 2..=4096",
                d,
            ));
        }
        Ok(())
    }
}

impl Fire {
    /// FIRE with the paper's initial c and L and the given MLP.
    pub fn new(w1: Vec<f32>, b1: Vec<f32>, w2: Vec<f32>, b2: Vec<f32>) -> Self {
        Fire {
            c: 0.1,
            l: 512.0,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The MLP's hidden width W.
    pub fn width(&self) -> usize {
        self.w1.len()
    }

    pub(crate) fn validate(&self, num_heads: u32) -> Result<()> {
        let w = self.w1.len();
        if w == 0 || w > FIRE_MAX_WIDTH {
            return Err(Error::invalid(
                "fire.w1",
                format!("1..={FIRE_MAX_WIDTH} values (the MLP width)"),
                format!("{w} values"),
            ));
        }
        check_len("fire.b1", &self.b1, w, "the MLP width")?;
        check_len(
            "fire.w2",
            &self.w2,
            w * num_heads as usize,
            "num_heads × width",
        )?;
        check_len(
            "fire.b2",
            &self.b2,
            num_heads as usize,
            "one per query head",
        )?;
        for (field, v) in [
            ("fire.w1", &self.w1),
            ("fire.b1", &self.b1),
            ("fire.w2", &self.w2),
            ("fire.b2", &self.b2),
        ] {
            check_finite(field, v)?;
        }
        if !self.c.is_finite() {
            return Err(Error::invalid("fire.c", "a finite number", self.c));
        }
        if !self.l.is_finite() {
            return Err(Error::invalid("fire.l", "a finite number", self.l));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t5_buckets_match_the_published_layout() {
        // Bidirectional, 32 buckets, max distance 128 (T5 defaults): exact up to 7 each way,
        // the positive side offset by 16, logarithmic after that, capped at 15 / 31.
        let b = |rel| t5_bucket(rel, 32, 128, true);
        assert_eq!(b(0), 0);
        assert_eq!(b(-7), 7);
        assert_eq!(b(7), 23);
        assert_eq!(b(-8), 8);
        assert_eq!(b(-16), 10);
        assert_eq!(b(-127), 15);
        assert_eq!(b(-100_000), 15);
        assert_eq!(b(100_000), 31);
        // Unidirectional: future keys share bucket 0.
        let u = |rel| t5_bucket(rel, 32, 128, false);
        assert_eq!(u(5), 0);
        assert_eq!(u(-15), 15);
        assert_eq!(u(-16), 16);
        assert_eq!(u(-100_000), 31);
        for rel in -300..300 {
            assert!(b(rel) < 32 && u(rel) < 32);
        }
    }

    #[test]
    fn sandwich_is_zero_at_distance_zero() {
        let f = sandwich_freqs(64);
        assert_eq!(f.len(), 32);
        assert!(sandwich_sum(0, &f).abs() < 1e-12);
        assert!(sandwich_sum(10, &f) < 0.0);
    }
}
