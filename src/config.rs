//! Position settings as users have them: a Hugging Face `config.json` (or just its rope dict, in
//! the transformers 5 `rope_parameters` form or the legacy `rope_scaling` form), and llama.cpp's
//! rope parameters as a GGUF model carries them. Both become a [`RopeConfig`] or a frequency
//! table for the same kernel.

use serde::Deserialize;
use serde_json::Value;

use crate::encoding::position::{Rope, RopeLayout, rope_inv_freq};
use crate::encoding::scaling::{LongRope, RopeFrequencies, RopeScaling, Yarn, rope_frequencies};
use crate::error::{Error, Result};

/// A model's RoPE settings: everything needed to build its frequency table.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f64,
    /// Head size the table is built for.
    pub head_dim: u32,
    /// Fraction of each head that rotates (`partial_rotary_factor`, 1 = all).
    pub partial_rotary_factor: f64,
    /// The scaling scheme (`rope_type` and its parameters).
    pub scaling: RopeScaling,
    /// Log-n query scaling's training length (Qwen-1's `use_logn_attn` with `seq_length`).
    pub logn_train_len: Option<u32>,
}

impl RopeConfig {
    /// The frequency table at the current length `seq_len` (largest position + 1; `None` for the
    /// model's initial table).
    pub fn frequencies(&self, seq_len: Option<u64>) -> Result<RopeFrequencies> {
        rope_frequencies(
            self.theta,
            self.head_dim,
            self.partial_rotary_factor,
            &self.scaling,
            seq_len,
        )
    }

    /// The kernel's RoPE encoding for this model at `seq_len`. Hugging Face checkpoints use the
    /// half layout.
    pub fn to_rope(&self, layout: RopeLayout, seq_len: Option<u64>) -> Result<Rope> {
        Ok(self.frequencies(seq_len)?.to_rope(self.theta, layout))
    }

    /// Sets `spec`'s position encoding (this model's table at `seq_len`, in `layout`) and its
    /// log-n scaling.
    pub fn apply(
        &self,
        spec: crate::spec::AttentionSpec,
        layout: RopeLayout,
        seq_len: Option<u64>,
    ) -> Result<crate::spec::AttentionSpec> {
        let mut spec = spec.with_position(crate::encoding::position::PositionEncoding::Rope(
            self.to_rope(layout, seq_len)?,
        ));
        if self.logn_train_len.is_some() {
            spec.logn_train_len = self.logn_train_len;
        }
        Ok(spec)
    }

    /// From a whole Hugging Face `config.json`: `rope_theta`, `head_dim` (or `hidden_size /
    /// num_attention_heads`), `partial_rotary_factor`, `max_position_embeddings` and the rope dict
    /// (`rope_parameters`, else `rope_scaling`). Keys this crate does not read are left alone (a
    /// config carries every setting of a model); the ones it reads must have the right type, and
    /// the rope dict must not hold keys its `rope_type` does not use.
    pub fn from_hf_config(config: &Value) -> Result<Self> {
        HfConfigFile::from_value(config)?.into_rope_config()
    }

    /// From a `config.json` given as text.
    pub fn from_hf_config_str(text: &str) -> Result<Self> {
        let file: HfConfigFile = crate::json::from_str("config", "", text)?;
        // The rope dict again from the text itself, where a key given twice can still be seen
        // (a parsed `Value` keeps only the last).
        let raw: RawRope = crate::json::from_str("config", "", text)?;
        let dict = match (&raw.rope_parameters, &raw.rope_scaling) {
            (Some(r), _) if r.get() != "null" => Some(("rope_parameters", r)),
            (_, Some(r)) if r.get() != "null" => Some(("rope_scaling", r)),
            _ => None,
        };
        if let Some((root, r)) = dict {
            crate::json::from_str::<RopeDict>("config", root, r.get())?;
        }
        file.into_rope_config()
    }

    /// From a rope dict alone (`None`: plain RoPE), with the top-level values a config would
    /// supply.
    pub fn from_hf_rope_dict(
        rope: Option<&Value>,
        head_dim: u32,
        defaults: &HfDefaults,
    ) -> Result<Self> {
        Self::from_rope_dict_at("rope_parameters", rope, head_dim, defaults)
    }

    /// [`RopeConfig::from_hf_rope_dict`] with errors named from `root` (the dict's own path).
    pub(crate) fn from_rope_dict_at(
        root: &str,
        rope: Option<&Value>,
        head_dim: u32,
        defaults: &HfDefaults,
    ) -> Result<Self> {
        let dict: RopeDict = match rope {
            None | Some(Value::Null) => RopeDict::default(),
            Some(v) => crate::json::from_value("rope_parameters", root, v)?,
        };
        dict.into_rope_config(root, head_dim, defaults)
    }
}

/// The parts of a Hugging Face `config.json` this crate reads: the one mapping from a model's
/// configuration to its RoPE, shared by the library, the command line and the tests.
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct HfConfigFile {
    head_dim: Option<UInt>,
    /// Qwen-1's name for head_dim.
    kv_channels: Option<UInt>,
    hidden_size: Option<UInt>,
    num_attention_heads: Option<UInt>,
    rope_theta: Option<f64>,
    /// Qwen-1's name for rope_theta.
    rotary_emb_base: Option<f64>,
    partial_rotary_factor: Option<f64>,
    /// GPT-NeoX's name for partial_rotary_factor.
    rotary_pct: Option<f64>,
    max_position_embeddings: Option<UInt>,
    original_max_position_embeddings: Option<UInt>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    use_logn_attn: Option<bool>,
    seq_length: Option<UInt>,
}

impl HfConfigFile {
    /// Reads the keys from a parsed config (every key's type checked, paths in errors).
    pub fn from_value(config: &Value) -> Result<Self> {
        crate::json::from_value("config", "", config)
    }

    /// The model's head size: `head_dim`, else `kv_channels`, else `hidden_size /
    /// num_attention_heads`.
    pub fn head_dim(&self) -> Result<u32> {
        let d = match (self.head_dim, self.kv_channels) {
            (Some(d), _) => d.u32("head_dim")?,
            (None, Some(d)) => d.u32("kv_channels")?,
            (None, None) => {
                let hidden = need(self.hidden_size, "hidden_size")?.u32("hidden_size")?;
                let heads = need(self.num_attention_heads, "num_attention_heads")?
                    .u32("num_attention_heads")?;
                if heads == 0 {
                    return Err(Error::invalid("num_attention_heads", "at least 1", 0));
                }
                hidden / heads
            }
        };
        Ok(d)
    }

    /// The top-level values a rope dict may rely on.
    pub fn defaults(&self) -> HfDefaults {
        HfDefaults {
            theta: self.rope_theta.or(self.rotary_emb_base),
            partial_rotary_factor: self.partial_rotary_factor.or(self.rotary_pct),
            max_position_embeddings: self.max_position_embeddings.map(|u| u.0),
            original_max_position_embeddings: self.original_max_position_embeddings.map(|u| u.0),
        }
    }

    /// The model's RoPE.
    pub fn into_rope_config(self) -> Result<RopeConfig> {
        let head_dim = self.head_dim()?;
        let defaults = self.defaults();
        let (root, rope) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(r), _) if !r.is_null() => ("rope_parameters", Some(r)),
            (_, Some(r)) if !r.is_null() => ("rope_scaling", Some(r)),
            _ => ("rope_parameters", None),
        };
        let mut cfg = RopeConfig::from_rope_dict_at(root, rope, head_dim, &defaults)?;
        if self.use_logn_attn == Some(true) {
            let len = need(self.seq_length, "seq_length")?.u32("seq_length")?;
            if len < 2 {
                return Err(Error::invalid(
                    "seq_length",
                    "at least 2 (for use_logn_attn)",
                    len,
                ));
            }
            cfg.logn_train_len = Some(len);
        }
        Ok(cfg)
    }
}

/// The rope dicts of a config as text.
#[derive(Deserialize)]
struct RawRope {
    rope_parameters: Option<Box<serde_json::value::RawValue>>,
    rope_scaling: Option<Box<serde_json::value::RawValue>>,
}

/// A rope dict's `rope_type` (`type` in legacy `rope_scaling` dicts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RopeType {
    #[default]
    Default,
    Linear,
    Dynamic,
    Yarn,
    Longrope,
    /// The name early Phi-3 configs used for LongRoPE.
    Su,
    Llama3,
    /// Not a transformers rope_type: the fixed-alpha NTK-aware base change, for configs that
    /// spell it out this way.
    Ntk,
    Proportional,
}

/// A Hugging Face rope dict: the union of the keys the rope types use. Which of them a given
/// type accepts is checked after reading (`RopeDict::check_keys`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
struct RopeDict {
    rope_type: Option<RopeType>,
    #[serde(rename = "type")]
    legacy_type: Option<RopeType>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<UInt>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
    truncate: Option<bool>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    alpha: Option<f64>,
}

impl RopeDict {
    /// Keys present beyond the type, base and partial rotation every dict may carry.
    fn present(&self) -> Vec<&'static str> {
        let f = |x: bool, k: &'static str| x.then_some(k);
        [
            f(self.factor.is_some(), "factor"),
            f(
                self.original_max_position_embeddings.is_some(),
                "original_max_position_embeddings",
            ),
            f(self.low_freq_factor.is_some(), "low_freq_factor"),
            f(self.high_freq_factor.is_some(), "high_freq_factor"),
            f(self.beta_fast.is_some(), "beta_fast"),
            f(self.beta_slow.is_some(), "beta_slow"),
            f(self.mscale.is_some(), "mscale"),
            f(self.mscale_all_dim.is_some(), "mscale_all_dim"),
            f(self.attention_factor.is_some(), "attention_factor"),
            f(self.truncate.is_some(), "truncate"),
            f(self.short_factor.is_some(), "short_factor"),
            f(self.long_factor.is_some(), "long_factor"),
            f(self.alpha.is_some(), "alpha"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The keys each type uses; any other key present is an error, not silently dropped.
    fn uses(ty: RopeType, key: &str) -> bool {
        use RopeType::*;
        let keys: &[&str] = match ty {
            Default => &[],
            Linear | Proportional => &["factor"],
            Dynamic => &["factor", "original_max_position_embeddings"],
            Yarn => &[
                "factor",
                "original_max_position_embeddings",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "attention_factor",
                "truncate",
            ],
            Longrope | Su => &[
                "short_factor",
                "long_factor",
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
            ],
            Llama3 => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
            Ntk => &["alpha"],
        };
        keys.contains(&key)
    }

    fn into_rope_config(
        self,
        root: &str,
        head_dim: u32,
        defaults: &HfDefaults,
    ) -> Result<RopeConfig> {
        let path = |key: &str| crate::json::join(root, key);
        let ty = match (self.rope_type, self.legacy_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::InvalidAt {
                    path: path("type"),
                    message: format!("the same type as rope_type ({a:?}), got {b:?}"),
                });
            }
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => RopeType::Default,
        };
        if let Some(k) = self.present().into_iter().find(|k| !Self::uses(ty, k)) {
            return Err(Error::InvalidAt {
                path: path(k),
                message: format!("only keys that rope_type {ty:?} uses, got this one"),
            });
        }
        let required = |x: Option<f64>, key: &str| -> Result<f64> {
            x.ok_or_else(|| Error::InvalidAt {
                path: path(key),
                message: format!("a number (rope_type {ty:?} needs it), missing"),
            })
        };
        let max_pos = || -> Result<u64> {
            defaults.max_position_embeddings.ok_or_else(|| {
                Error::invalid(
                    "max_position_embeddings",
                    "present in the config",
                    "missing",
                )
            })
        };
        let orig = || -> Result<u64> {
            match (
                self.original_max_position_embeddings,
                defaults.original_max_position_embeddings,
            ) {
                (Some(v), _) => Ok(v.0),
                (None, Some(v)) => Ok(v),
                (None, None) => Err(Error::InvalidAt {
                    path: path("original_max_position_embeddings"),
                    message: "an integer in the rope dict or the config, missing".into(),
                }),
            }
        };
        let list = |x: &Option<Vec<f64>>, key: &str| -> Result<Vec<f64>> {
            x.clone().ok_or_else(|| Error::InvalidAt {
                path: path(key),
                message: format!("a list of numbers (rope_type {ty:?} needs it), missing"),
            })
        };
        let scaling = match ty {
            RopeType::Default => RopeScaling::Default,
            RopeType::Linear => RopeScaling::Linear {
                factor: required(self.factor, "factor")?,
            },
            RopeType::Dynamic => RopeScaling::Dynamic {
                factor: required(self.factor, "factor")?,
                max_position_embeddings: max_pos()?,
            },
            RopeType::Yarn => RopeScaling::Yarn(Yarn {
                factor: self.factor,
                original_max_position_embeddings: orig()?,
                max_position_embeddings: max_pos().unwrap_or(0),
                beta_fast: self.beta_fast.unwrap_or(32.0),
                beta_slow: self.beta_slow.unwrap_or(1.0),
                mscale: self.mscale,
                mscale_all_dim: self.mscale_all_dim,
                attention_factor: self.attention_factor,
                truncate: self.truncate.unwrap_or(true),
            }),
            RopeType::Longrope | RopeType::Su => RopeScaling::LongRope(LongRope {
                short_factor: list(&self.short_factor, "short_factor")?,
                long_factor: list(&self.long_factor, "long_factor")?,
                factor: self.factor,
                original_max_position_embeddings: orig()?,
                max_position_embeddings: max_pos().unwrap_or(0),
                attention_factor: self.attention_factor,
            }),
            RopeType::Llama3 => RopeScaling::Llama3 {
                factor: required(self.factor, "factor")?,
                low_freq_factor: required(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: required(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: orig()?,
            },
            RopeType::Ntk => RopeScaling::NtkAlpha {
                alpha: required(self.alpha, "alpha")?,
            },
            RopeType::Proportional => RopeScaling::Proportional {
                factor: self.factor.unwrap_or(1.0),
            },
        };
        let cfg = RopeConfig {
            theta: self.rope_theta.or(defaults.theta).unwrap_or(10000.0),
            head_dim,
            partial_rotary_factor: self
                .partial_rotary_factor
                .or(defaults.partial_rotary_factor)
                .unwrap_or(1.0),
            scaling,
            logn_train_len: None,
        };
        // Surface every parameter error now rather than at first use.
        cfg.frequencies(None)?;
        Ok(cfg)
    }
}

/// Top-level config values a rope dict may rely on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HfDefaults {
    /// `rope_theta` when the config has one.
    pub theta: Option<f64>,
    /// `partial_rotary_factor` when the config has one.
    pub partial_rotary_factor: Option<f64>,
    /// `max_position_embeddings` when the config has one.
    pub max_position_embeddings: Option<u64>,
    /// `original_max_position_embeddings` when the config has one.
    pub original_max_position_embeddings: Option<u64>,
}

fn need(v: Option<UInt>, key: &'static str) -> Result<UInt> {
    v.ok_or_else(|| Error::invalid(key, "present", "missing"))
}

/// A non-negative integer as configs write it: `4096` or `4096.0` (some tools write floats).
/// A negative, fractional or non-numeric value is an error at its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UInt(pub u64);

impl UInt {
    fn u32(self, key: &'static str) -> Result<u32> {
        u32::try_from(self.0).map_err(|_| Error::invalid(key, "an integer below 2^32", self.0))
    }
}

impl<'de> Deserialize<'de> for UInt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = UInt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<UInt, E> {
                Ok(UInt(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<UInt, E> {
                u64::try_from(v)
                    .map(UInt)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<UInt, E> {
                if v.fract() == 0.0 && (0.0..9.0e15).contains(&v) {
                    Ok(UInt(v as u64))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// llama.cpp's rope parameters (`ggml_rope_ext`), as a GGUF model and llama.cpp's context carry
/// them.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaCppRope {
    /// Rotating channels (`n_dims`).
    pub n_dims: u32,
    /// Base of the frequencies (`freq_base`).
    pub freq_base: f64,
    /// `1 / factor` for linear and YaRN scaling.
    pub freq_scale: f64,
    /// YaRN mix weight (0 disables YaRN; 1 is full YaRN).
    pub ext_factor: f64,
    /// Magnitude factor on cos and sin (`attn_factor`).
    pub attn_factor: f64,
    /// YaRN's fast boundary, in rotations (`beta_fast`).
    pub beta_fast: f64,
    /// YaRN's slow boundary, in rotations (`beta_slow`).
    pub beta_slow: f64,
    /// Original training context.
    pub n_ctx_orig: u64,
    /// Per-pair divisors of the frequencies (Llama 3 and LongRoPE arrive this way).
    pub freq_factors: Option<Vec<f64>>,
}

impl LlamaCppRope {
    /// The frequency table ggml computes: for pair i,
    /// `θ_i = base^(−2i/n) / ff_i`, mixed as `θ_i · (freq_scale · (1 − m_i) + m_i)` with the YaRN
    /// ramp `m_i = (1 − clamp((i − low) / max(0.001, high − low), 0, 1)) · ext_factor`, and the
    /// attention factor `attn_factor · (1 + 0.1 · ln(1 / freq_scale))` when ext_factor ≠ 0: ggml's
    /// implicit YaRN magnitude, which llama.cpp compensates in attn_factor when it converts a HF
    /// YaRN model (so the product equals HF's attention factor).
    pub fn frequencies(&self) -> Result<RopeFrequencies> {
        let n = self.n_dims;
        if n < 2 || !n.is_multiple_of(2) {
            return Err(Error::invalid("n_dims", "an even number ≥ 2", n));
        }
        for (field, x) in [
            ("freq_base", self.freq_base),
            ("freq_scale", self.freq_scale),
        ] {
            if !x.is_finite() || x <= 0.0 {
                return Err(Error::invalid(field, "a finite number > 0", x));
            }
        }
        for (field, x) in [
            ("ext_factor", self.ext_factor),
            ("attn_factor", self.attn_factor),
            ("beta_fast", self.beta_fast),
            ("beta_slow", self.beta_slow),
        ] {
            if !x.is_finite() {
                return Err(Error::invalid(field, "a finite number", x));
            }
        }
        if let Some(ff) = &self.freq_factors {
            if ff.len() != (n / 2) as usize {
                return Err(Error::invalid(
                    "freq_factors",
                    format!("{} factors (n_dims / 2)", n / 2),
                    format!("{} factors", ff.len()),
                ));
            }
            if let Some(bad) = ff.iter().find(|x| !x.is_finite() || **x <= 0.0) {
                return Err(Error::invalid("freq_factors", "finite factors > 0", bad));
            }
        }
        let nf = n as f64;
        let corr = |beta: f64| {
            nf * (self.n_ctx_orig as f64 / (beta * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * self.freq_base.ln())
        };
        let low = corr(self.beta_fast).floor().max(0.0);
        let high = corr(self.beta_slow).ceil().min(nf - 1.0);
        let base = rope_inv_freq(self.freq_base, n);
        let inv = base
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let extrap = b / self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let interp = extrap * self.freq_scale;
                if self.ext_factor == 0.0 {
                    return interp;
                }
                let y = (i as f64 - low) / (high - low).max(0.001);
                let mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
                interp * (1.0 - mix) + extrap * mix
            })
            .collect();
        let attention_factor = if self.ext_factor != 0.0 {
            self.attn_factor * (1.0 + 0.1 * (1.0 / self.freq_scale).ln())
        } else {
            self.attn_factor
        };
        Ok(RopeFrequencies {
            inv_freq: inv,
            attention_factor,
            rotary_dim: n,
        })
    }
}
