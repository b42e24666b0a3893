//! Position settings as users have them: a Hugging Face `config.json` (or just its rope dict, in
//! the transformers 5 `rope_parameters` form or the legacy `rope_scaling` form), and llama.cpp's
//! rope parameters as a GGUF model carries them. Both become a [`RopeConfig`] or a frequency
//! table for the same kernel.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::position::{Rope, RopeLayout, rope_inv_freq};
use crate::scaling::{LongRope, RopeFrequencies, RopeScaling, Yarn, rope_frequencies};

/// A model's RoPE settings: everything needed to build its frequency table.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub head_dim: u32,
    pub partial_rotary_factor: f64,
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
        let mut spec = spec.with_position(crate::position::PositionEncoding::Rope(
            self.to_rope(layout, seq_len)?,
        ));
        if self.logn_train_len.is_some() {
            spec.logn_train_len = self.logn_train_len;
        }
        Ok(spec)
    }

    /// From a whole Hugging Face `config.json`: `rope_theta`, `head_dim` (or `hidden_size /
    /// num_attention_heads`), `partial_rotary_factor`, `max_position_embeddings` and the rope dict
    /// (`rope_parameters`, else `rope_scaling`).
    pub fn from_hf_config(config: &Value) -> Result<Self> {
        let obj = config
            .as_object()
            .ok_or_else(|| Error::invalid("config", "a JSON object", kind(config)))?;
        // Aliases of older model families: Qwen-1 (`kv_channels`, `rotary_emb_base`) and
        // GPT-NeoX (`rotary_pct`).
        let head_dim = match obj.get("head_dim").filter(|v| !v.is_null()) {
            Some(v) => uint(v, "head_dim")?,
            None if obj.contains_key("kv_channels") => uint(&obj["kv_channels"], "kv_channels")?,
            None => {
                let hidden = uint(need(obj.get("hidden_size"), "hidden_size")?, "hidden_size")?;
                let heads = uint(
                    need(obj.get("num_attention_heads"), "num_attention_heads")?,
                    "num_attention_heads",
                )?;
                if heads == 0 {
                    return Err(Error::invalid("num_attention_heads", "at least 1", 0));
                }
                hidden / heads
            }
        };
        let rope = obj
            .get("rope_parameters")
            .filter(|v| !v.is_null())
            .or_else(|| obj.get("rope_scaling").filter(|v| !v.is_null()));
        let defaults = HfDefaults {
            theta: match obj.get("rope_theta").filter(|v| !v.is_null()) {
                Some(v) => Some(num(v, "rope_theta")?),
                None => obj
                    .get("rotary_emb_base")
                    .filter(|v| !v.is_null())
                    .map(|v| num(v, "rotary_emb_base"))
                    .transpose()?,
            },
            partial_rotary_factor: match obj.get("partial_rotary_factor").filter(|v| !v.is_null()) {
                Some(v) => Some(num(v, "partial_rotary_factor")?),
                None => obj
                    .get("rotary_pct")
                    .map(|v| num(v, "rotary_pct"))
                    .transpose()?,
            },
            max_position_embeddings: obj
                .get("max_position_embeddings")
                .filter(|v| !v.is_null())
                .map(|v| uint64(v, "max_position_embeddings"))
                .transpose()?,
            original_max_position_embeddings: obj
                .get("original_max_position_embeddings")
                .filter(|v| !v.is_null())
                .map(|v| uint64(v, "original_max_position_embeddings"))
                .transpose()?,
        };
        let mut cfg = Self::from_hf_rope_dict(rope, head_dim as u32, &defaults)?;
        if obj.get("use_logn_attn").and_then(Value::as_bool) == Some(true) {
            let len = uint(need(obj.get("seq_length"), "seq_length")?, "seq_length")?;
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

    /// From a `config.json` given as text.
    pub fn from_hf_config_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid("config", "valid JSON", e.to_string()))?;
        Self::from_hf_config(&v)
    }

    /// From a rope dict alone (`None`: plain RoPE), with the top-level values a config would
    /// supply.
    pub fn from_hf_rope_dict(
        rope: Option<&Value>,
        head_dim: u32,
        defaults: &HfDefaults,
    ) -> Result<Self> {
        let empty = serde_json::Map::new();
        let d = match rope {
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(Error::invalid(
                    "rope_parameters",
                    "a JSON object",
                    kind(other),
                ));
            }
            None => &empty,
        };
        let get = |k: &str| d.get(k).filter(|v| !v.is_null());
        let theta = match get("rope_theta") {
            Some(v) => num(v, "rope_theta")?,
            None => defaults.theta.unwrap_or(10000.0),
        };
        let prf = match get("partial_rotary_factor") {
            Some(v) => num(v, "partial_rotary_factor")?,
            None => defaults.partial_rotary_factor.unwrap_or(1.0),
        };
        let rope_type = match get("rope_type").or_else(|| get("type")) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(Error::invalid("rope_type", "a string", kind(other))),
            None => "default",
        };
        let factor = |key: &'static str| -> Result<f64> { num(need(get(key), key)?, key) };
        let opt = |key: &'static str| -> Result<Option<f64>> {
            get(key).map(|v| num(v, key)).transpose()
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
            match get("original_max_position_embeddings") {
                Some(v) => uint64(v, "original_max_position_embeddings"),
                None => defaults.original_max_position_embeddings.map_or_else(
                    || {
                        Err(Error::invalid(
                            "original_max_position_embeddings",
                            "present in the rope dict or the config",
                            "missing",
                        ))
                    },
                    Ok,
                ),
            }
        };
        let list = |key: &'static str| -> Result<Vec<f64>> {
            match need(get(key), key)? {
                Value::Array(a) => a.iter().map(|x| num(x, key)).collect(),
                other => Err(Error::invalid(key, "a list of numbers", kind(other))),
            }
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: factor("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor("factor")?,
                max_position_embeddings: max_pos()?,
            },
            "yarn" => RopeScaling::Yarn(Yarn {
                factor: opt("factor")?,
                original_max_position_embeddings: orig()?,
                max_position_embeddings: max_pos().unwrap_or(0),
                beta_fast: opt("beta_fast")?.unwrap_or(32.0),
                beta_slow: opt("beta_slow")?.unwrap_or(1.0),
                mscale: opt("mscale")?,
                mscale_all_dim: opt("mscale_all_dim")?,
                attention_factor: opt("attention_factor")?,
                truncate: match get("truncate") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(Error::invalid("truncate", "true or false", kind(other)));
                    }
                },
            }),
            // "su" is the name early Phi-3 configs used for LongRoPE.
            "longrope" | "su" => RopeScaling::LongRope(LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                factor: opt("factor")?,
                original_max_position_embeddings: orig()?,
                max_position_embeddings: max_pos().unwrap_or(0),
                attention_factor: opt("attention_factor")?,
            }),
            "llama3" => RopeScaling::Llama3 {
                factor: factor("factor")?,
                low_freq_factor: factor("low_freq_factor")?,
                high_freq_factor: factor("high_freq_factor")?,
                original_max_position_embeddings: orig()?,
            },
            // Not a transformers rope_type: the fixed-alpha NTK-aware base change, for configs
            // that spell it out this way.
            "ntk" => RopeScaling::NtkAlpha {
                alpha: factor("alpha")?,
            },
            "proportional" => RopeScaling::Proportional {
                factor: opt("factor")?.unwrap_or(1.0),
            },
            other => {
                return Err(Error::invalid(
                    "rope_type",
                    "one of default, linear, dynamic, yarn, longrope (su), llama3, proportional, ntk",
                    other,
                ));
            }
        };
        let cfg = RopeConfig {
            theta,
            head_dim,
            partial_rotary_factor: prf,
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
    pub theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: Option<u64>,
    pub original_max_position_embeddings: Option<u64>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn need<'a>(v: Option<&'a Value>, key: &'static str) -> Result<&'a Value> {
    v.ok_or_else(|| Error::invalid(key, "present", "missing"))
}

fn num(v: &Value, key: &'static str) -> Result<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(Error::invalid(key, "a finite number", kind(v))),
    }
}

fn uint64(v: &Value, key: &'static str) -> Result<u64> {
    // Accept 4096.0 as well as 4096.
    match v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < 9.0e15)
            .map(|x| x as u64)
    }) {
        Some(x) => Ok(x),
        None => Err(Error::invalid(key, "a non-negative integer", v.to_string())),
    }
}

fn uint(v: &Value, key: &'static str) -> Result<u32> {
    let x = uint64(v, key)?;
    u32::try_from(x).map_err(|_| Error::invalid(key, "an integer below 2^32", x))
}

/// llama.cpp's rope parameters (`ggml_rope_ext`), as a GGUF model and llama.cpp's context carry
/// them.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaCppRope {
    /// Rotating channels (`n_dims`).
    pub n_dims: u32,
    pub freq_base: f64,
    /// `1 / factor` for linear and YaRN scaling.
    pub freq_scale: f64,
    /// YaRN mix weight (0 disables YaRN; 1 is full YaRN).
    pub ext_factor: f64,
    pub attn_factor: f64,
    pub beta_fast: f64,
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
