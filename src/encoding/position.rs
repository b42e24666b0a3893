//! Position encodings: their descriptions, their validation, and the host-side tables (computed
//! in f64) that the kernels read. The exact math follows `shared/reference/position-encodings.md`
//! and the code that defines each scheme (Hugging Face transformers, torchscale, BLOOM).

use crate::encoding::custom::{CheckedScheme, CustomScheme, push_tables};
use crate::encoding::relative::{
    Fire, Kerple, KerpleForm, SANDWICH_TABLE_MAX, Sandwich, T5Bias, kerple_params, sandwich_freqs,
    sandwich_sum,
};
use crate::error::{Error, Result};
use crate::kernel::abi::{AuxTable, BiasArgs, PosKind, freq_entry};

/// Which channels of a head form a rotation pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Pair (i, i + r/2): GPT-NeoX, Hugging Face `rotate_half`, FlashAttention `interleaved=False`.
    Half,
    /// Pair (2i, 2i + 1): GPT-J, llama.cpp's NORMAL mode, torchscale.
    Interleaved,
}

/// Rotary position embedding (Su et al.), applied to queries and keys inside the kernel.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Rope {
    /// Which channels form the rotation pairs.
    pub layout: RopeLayout,
    /// Channels that rotate (even, at most head_dim); the rest pass through. `None` = head_dim.
    pub rotary_dim: Option<u32>,
    /// Base of the default frequencies `1 / theta^(2i / r)`.
    pub theta: f64,
    /// Multiplies cos and sin for queries and keys alike (HF `attention_scaling`), so the logits
    /// carry its square.
    pub attention_factor: f64,
    /// Explicit inverse frequencies, `rotary_dim / 2` of them, replacing the ones derived from
    /// `theta`. This is where a scaling scheme plugs in: it is just another table.
    pub inv_freq: Option<Vec<f64>>,
}

impl Default for Rope {
    /// Plain RoPE with the usual base of 10000 (`Rope::new(10000.0)`).
    fn default() -> Self {
        Rope::new(10000.0)
    }
}

impl Rope {
    /// Plain RoPE in the half layout over the whole head with the given base.
    pub fn new(theta: f64) -> Self {
        Rope {
            layout: RopeLayout::Half,
            rotary_dim: None,
            theta,
            attention_factor: 1.0,
            inv_freq: None,
        }
    }

    /// Sets the channel layout.
    pub fn with_layout(mut self, layout: RopeLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Rotates only the first `rotary_dim` channels (even, at most head_dim).
    pub fn with_rotary_dim(mut self, rotary_dim: u32) -> Self {
        self.rotary_dim = Some(rotary_dim);
        self
    }

    /// Scales cos and sin by `attention_factor` (the logits by its square).
    pub fn with_attention_factor(mut self, attention_factor: f64) -> Self {
        self.attention_factor = attention_factor;
        self
    }

    /// Uses explicit inverse frequencies (`rotary_dim / 2` of them) instead of `theta`'s.
    pub fn with_inv_freq(mut self, inv_freq: Vec<f64>) -> Self {
        self.inv_freq = Some(inv_freq);
        self
    }

    /// The rotary dimension for a head of `head_dim` channels.
    pub fn rotary_dim(&self, head_dim: u32) -> u32 {
        self.rotary_dim.unwrap_or(head_dim)
    }

    /// The inverse frequencies in f64, one per rotation pair.
    pub fn inv_freq(&self, head_dim: u32) -> Vec<f64> {
        match &self.inv_freq {
            Some(table) => table.clone(),
            None => rope_inv_freq(self.theta, self.rotary_dim(head_dim)),
        }
    }
}

/// ALiBi slopes: the standard geometric sequence or the caller's own.
#[derive(Clone, Debug, PartialEq)]
pub enum AlibiSlopes {
    /// Press et al.'s slopes, with non-power-of-two head counts as BLOOM computes them.
    Standard,
    /// One slope per query head.
    Custom(Vec<f32>),
}

/// How ALiBi turns a distance into a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlibiForm {
    /// `slope · (n − m)`: BLOOM's `slope · n` up to a per-row constant that softmax removes.
    Causal,
    /// `−slope · |m − n|`, FlashAttention's `alibi_slopes` for bidirectional attention.
    Symmetric,
}

/// Attention with linear biases (Press et al. 2022). `Default`: the standard slopes, causal form.
#[derive(Clone, Debug, PartialEq)]
pub struct Alibi {
    /// The slope of each head.
    pub slopes: AlibiSlopes,
    /// How a distance becomes a bias.
    pub form: AlibiForm,
}

/// xPos (Sun et al. 2022) as torchscale defines it: RoPE whose pair i is scaled by
/// `ζ_i^(m/γ)` for queries and `ζ_i^(−n/γ)` for keys, `ζ_i = (2i + 0.4d) / (1.4d)`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Xpos {
    /// torchscale rotates every two channels (interleaved); lucidrains' rotary-embedding-torch
    /// uses the half layout.
    pub layout: RopeLayout,
    /// Base of the frequencies.
    pub theta: f64,
    /// γ, 512 in torchscale.
    pub scale_base: f64,
}

impl Default for Alibi {
    fn default() -> Self {
        Alibi {
            slopes: AlibiSlopes::Standard,
            form: AlibiForm::Causal,
        }
    }
}

impl Xpos {
    /// Sets γ (`scale_base`).
    pub fn with_scale_base(mut self, scale_base: f64) -> Self {
        self.scale_base = scale_base;
        self
    }

    /// Sets the channel layout.
    pub fn with_layout(mut self, layout: RopeLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the frequency base.
    pub fn with_theta(mut self, theta: f64) -> Self {
        self.theta = theta;
        self
    }
}

impl Default for Xpos {
    fn default() -> Self {
        Xpos {
            layout: RopeLayout::Interleaved,
            theta: 10000.0,
            scale_base: 512.0,
        }
    }
}

/// The position encoding fused into the attention kernel.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum PositionEncoding {
    #[default]
    /// No position encoding.
    None,
    /// Rotary embedding.
    Rope(Rope),
    /// Linear biases.
    Alibi(Alibi),
    /// xPos.
    Xpos(Xpos),
    /// T5's learned relative buckets.
    T5(T5Bias),
    /// KERPLE, log or power kernel.
    Kerple(Kerple),
    /// Sandwich.
    Sandwich(Sandwich),
    /// FIRE, with the caller's MLP.
    Fire(Fire),
    /// The caller's own scheme: WGSL hooks fused into the kernel, with Rust twins for the
    /// reference (see [`crate::encoding::custom`]).
    Custom(CustomScheme),
}

impl PositionEncoding {
    /// Short name used in kernel keys, reports and test names.
    pub fn name(&self) -> &'static str {
        match self {
            PositionEncoding::None => "none",
            PositionEncoding::Rope(_) => "rope",
            PositionEncoding::Alibi(_) => "alibi",
            PositionEncoding::Xpos(_) => "xpos",
            PositionEncoding::T5(_) => "t5",
            PositionEncoding::Kerple(k) => match k.form {
                KerpleForm::Log => "kerple_log",
                KerpleForm::Power => "kerple_power",
            },
            PositionEncoding::Sandwich(_) => "sandwich",
            PositionEncoding::Fire(_) => "fire",
            PositionEncoding::Custom(_) => "custom",
        }
    }
}

/// `1 / theta^(2i / r)` for i in 0..r/2, in f64.
pub fn rope_inv_freq(theta: f64, rotary_dim: u32) -> Vec<f64> {
    (0..rotary_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64))
        .collect()
}

/// ALiBi's standard slopes for `num_heads` heads (BLOOM `build_alibi_tensor`).
pub fn alibi_slopes(num_heads: u32) -> Vec<f64> {
    let cp = 1u32 << (31 - num_heads.leading_zeros());
    let cpf = cp as f64;
    let mut slopes: Vec<f64> = (1..=cp).map(|k| 2f64.powf(-8.0 * k as f64 / cpf)).collect();
    let remaining = num_heads - cp;
    slopes.extend((0..remaining).map(|j| 2f64.powf(-4.0 * (2 * j + 1) as f64 / cpf)));
    slopes
}

/// xPos' per-pair ratios `ζ_i = (2i + 0.4d) / (1.4d)`.
pub fn xpos_zeta(head_dim: u32) -> Vec<f64> {
    let d = head_dim as f64;
    (0..head_dim / 2)
        .map(|i| (2.0 * i as f64 + 0.4 * d) / (1.4 * d))
        .collect()
}

/// An encoding checked against the shapes and turned into what the kernel reads.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedPosition {
    pub kind: PosKind,
    pub interleaved: bool,
    pub rotary_dim: u32,
    pub attention_factor: f32,
    pub xpos_inv_scale_base: f32,
    pub alibi_symmetric: bool,
    /// Frequency entries (rotary_dim / 2 of them, at `freq_offset`), then the per-head bias
    /// tables at `bias_offset` (see the aux layout in `kernel::abi`).
    pub aux: AuxTable,
    pub freq_offset: u32,
    pub bias_offset: u32,
    pub bias: BiasArgs,
    /// A custom scheme's checked hooks.
    pub custom: Option<CheckedScheme>,
}

fn check_finite(field: &'static str, x: f64, positive: bool) -> Result<()> {
    if !x.is_finite() || (positive && x <= 0.0) {
        let expected = if positive {
            "a finite number > 0"
        } else {
            "a finite number"
        };
        return Err(Error::invalid(field, expected, x));
    }
    Ok(())
}

fn check_rotary_dim(field: &'static str, r: u32, head_dim: u32) -> Result<()> {
    if r == 0 || !r.is_multiple_of(2) || r > head_dim {
        return Err(Error::invalid(
            field,
            format!("an even number in 2..={head_dim} (head_dim)"),
            r,
        ));
    }
    Ok(())
}

impl PositionEncoding {
    /// Checks the encoding and builds its tables. `seq_hint` (the longest sequence of the call)
    /// sizes the Sandwich table; longer distances are summed in the kernel.
    pub(crate) fn resolve(
        &self,
        head_dim: u32,
        num_heads: u32,
        seq_hint: u32,
    ) -> Result<ResolvedPosition> {
        let mut out = ResolvedPosition {
            kind: PosKind::None,
            interleaved: false,
            rotary_dim: 0,
            attention_factor: 1.0,
            xpos_inv_scale_base: 0.0,
            alibi_symmetric: false,
            aux: AuxTable::default(),
            freq_offset: 0,
            bias_offset: 0,
            bias: BiasArgs::None,
            custom: None,
        };
        match self {
            PositionEncoding::None => {}
            PositionEncoding::Rope(rope) => {
                let r = rope.rotary_dim(head_dim);
                check_rotary_dim("rope.rotary_dim", r, head_dim)?;
                check_finite("rope.attention_factor", rope.attention_factor, false)?;
                let inv = match &rope.inv_freq {
                    Some(table) => {
                        if table.len() != (r / 2) as usize {
                            return Err(Error::invalid(
                                "rope.inv_freq",
                                format!("{} entries (rotary_dim / 2)", r / 2),
                                format!("{} entries", table.len()),
                            ));
                        }
                        if let Some(bad) = table.iter().find(|f| !f.is_finite() || **f < 0.0) {
                            return Err(Error::invalid(
                                "rope.inv_freq",
                                "finite frequencies ≥ 0",
                                bad,
                            ));
                        }
                        table.clone()
                    }
                    None => {
                        check_finite("rope.theta", rope.theta, true)?;
                        rope_inv_freq(rope.theta, r)
                    }
                };
                out.kind = PosKind::Rope;
                out.interleaved = rope.layout == RopeLayout::Interleaved;
                out.rotary_dim = r;
                out.attention_factor = rope.attention_factor as f32;
                out.freq_offset = out
                    .aux
                    .push_entries(inv.iter().map(|&f| freq_entry(f, 0.0)));
            }
            PositionEncoding::Xpos(x) => {
                check_finite("xpos.theta", x.theta, true)?;
                check_finite("xpos.scale_base", x.scale_base, true)?;
                let inv = rope_inv_freq(x.theta, head_dim);
                let zeta = xpos_zeta(head_dim);
                out.kind = PosKind::Xpos;
                out.interleaved = x.layout == RopeLayout::Interleaved;
                out.rotary_dim = head_dim;
                out.xpos_inv_scale_base = (1.0 / x.scale_base) as f32;
                out.freq_offset = out.aux.push_entries(
                    inv.iter()
                        .zip(&zeta)
                        .map(|(&f, &z)| freq_entry(f, z.log2())),
                );
            }
            PositionEncoding::Alibi(a) => {
                let slopes: Vec<f32> = match &a.slopes {
                    AlibiSlopes::Standard => {
                        alibi_slopes(num_heads).iter().map(|&s| s as f32).collect()
                    }
                    AlibiSlopes::Custom(s) => {
                        if s.len() != num_heads as usize {
                            return Err(Error::invalid(
                                "alibi.slopes",
                                format!("{num_heads} slopes (one per query head)"),
                                format!("{} slopes", s.len()),
                            ));
                        }
                        if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
                            return Err(Error::invalid("alibi.slopes", "finite slopes", bad));
                        }
                        s.clone()
                    }
                };
                out.kind = PosKind::Alibi;
                out.alibi_symmetric = a.form == AlibiForm::Symmetric;
                out.bias_offset = out.aux.push_floats(&slopes);
            }
            PositionEncoding::T5(t) => {
                t.validate(num_heads)?;
                out.kind = PosKind::T5;
                out.bias = BiasArgs::T5 {
                    max_distance: t.max_distance,
                };
                out.bias_offset = out.aux.push_floats(&t.lut(num_heads));
            }
            PositionEncoding::Kerple(k) => {
                k.validate(num_heads)?;
                out.kind = match k.form {
                    KerpleForm::Log => PosKind::KerpleLog,
                    KerpleForm::Power => PosKind::KerplePower,
                };
                let pa: Vec<f32> =
                    k.p.iter()
                        .zip(&k.a)
                        .flat_map(|(&p, &a)| {
                            let (p, a) = kerple_params(k.form, p, a);
                            [p, a]
                        })
                        .collect();
                out.bias_offset = out.aux.push_floats(&pa);
            }
            PositionEncoding::Sandwich(sw) => {
                sw.validate(head_dim)?;
                let dim = sw.dim(head_dim);
                let freqs = sandwich_freqs(dim);
                out.kind = PosKind::Sandwich;
                // The kernel's fallback sum reads the frequencies as rotation entries.
                out.rotary_dim = dim;
                out.freq_offset = out
                    .aux
                    .push_entries(freqs.iter().map(|&f| freq_entry(f, 0.0)));
                let len = seq_hint.clamp(1, SANDWICH_TABLE_MAX);
                out.bias = BiasArgs::Sandwich { table_len: len };
                let mut table: Vec<f32> = (0..len as i64)
                    .map(|d| sandwich_sum(d, &freqs) as f32)
                    .collect();
                table.extend((1..=num_heads).map(|h| (num_heads as f64 / (8.0 * h as f64)) as f32));
                out.bias_offset = out.aux.push_floats(&table);
            }
            PositionEncoding::Custom(c) => {
                let checked = c.check(num_heads)?;
                out.kind = PosKind::Custom;
                out.interleaved = c.layout == RopeLayout::Interleaved;
                if checked.hooks.rotate {
                    out.rotary_dim = head_dim;
                }
                out.bias_offset = push_tables(&checked, c, &mut out.aux);
                out.custom = Some(checked);
            }
            PositionEncoding::Fire(f) => {
                f.validate(num_heads)?;
                out.kind = PosKind::Fire;
                out.bias = BiasArgs::Fire {
                    width: f.width() as u32,
                    c: f.c,
                    l: f.l.abs(),
                };
                let mut w = f.w1.clone();
                w.extend(&f.b1);
                w.extend(&f.w2);
                w.extend(&f.b2);
                out.bias_offset = out.aux.push_floats(&w);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_slopes_for_power_of_two_and_not() {
        let s8 = alibi_slopes(8);
        assert_eq!(s8.len(), 8);
        for (k, s) in s8.iter().enumerate() {
            assert_eq!(*s, 2f64.powi(-(k as i32 + 1)));
        }
        // 12 heads: 8 from base 2^-1, then 4 from 2^-0.5 at odd powers (BLOOM).
        let s12 = alibi_slopes(12);
        assert_eq!(s12.len(), 12);
        assert_eq!(&s12[..8], &s8[..]);
        for j in 0..4 {
            assert_eq!(s12[8 + j], 2f64.powf(-0.5 * (2 * j + 1) as f64));
        }
    }
}
