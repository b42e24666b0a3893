//! Files for `posattn run`: tensors and positions as `.npy` (what `numpy.save` writes), and the
//! run spec as JSON. Every malformed or hostile input is a typed error naming the file or key;
//! nothing is allocated before the header's claims are checked against the file's real size.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::bias::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
use crate::config::RopeConfig;
use crate::error::{Error, Result};
use crate::mask::{Extrapolation, Window};
use crate::position::{Alibi, AlibiForm, AlibiSlopes, PositionEncoding, Rope, RopeLayout, Xpos};
use crate::spec::AttentionSpec;

/// Largest .npy file accepted (1 GiB): bigger than any tensor a storage binding can hold.
pub const MAX_NPY_BYTES: u64 = 1 << 30;

/// A tensor read from a .npy file, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

/// Bytes after the .npy header (format versions 1 to 3), for checking the header's claims.
fn data_len(bytes: &[u8]) -> u64 {
    let (len_at, width) = match bytes.get(6) {
        Some(1) => (8, 2),
        _ => (8, 4),
    };
    let hlen = match bytes.get(len_at..len_at + width) {
        Some(b) if width == 2 => u16::from_le_bytes([b[0], b[1]]) as u64,
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
        None => return 0,
    };
    (bytes.len() as u64).saturating_sub(len_at as u64 + width as u64 + hlen)
}

fn bad(field: &'static str, expected: impl Into<String>, got: impl std::fmt::Display) -> Error {
    Error::invalid(field, expected, got)
}

/// Parses .npy bytes: little-endian f32, f16 or f64 (`<f4`, `<f2`, `<f8`) or i32 / i64 (`<i4`,
/// `<i8`, converted exactly when they fit), C order, with `rank` dimensions (any rank if `None`).
pub fn parse_npy(field: &'static str, bytes: &[u8], rank: Option<usize>) -> Result<Tensor> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| bad(field, "a valid .npy file", e))?;
    let shape = npy.shape().to_vec();
    if let Some(r) = rank
        && shape.len() != r
    {
        return Err(bad(
            field,
            format!("an array of rank {r}"),
            format!("shape {shape:?}"),
        ));
    }
    if npy.order() != npyz::Order::C {
        return Err(bad(field, "C (row-major) order", "Fortran order"));
    }
    let ty = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => return Err(bad(field, "a plain numeric dtype", other.descr())),
    };
    let width: u64 = match ty.as_str() {
        "<f4" | "<i4" => 4,
        "<f2" => 2,
        "<f8" | "<i8" => 8,
        other => {
            return Err(bad(
                field,
                "dtype <f4, <f2, <f8, <i4 or <i8 (little-endian)",
                other,
            ));
        }
    };
    let count = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            bad(
                field,
                "a shape whose size fits 64 bits",
                format!("{shape:?}"),
            )
        })?;
    // The header's claim against the bytes really present, before anything is allocated.
    count
        .checked_mul(width)
        .filter(|&n| n <= data_len(bytes))
        .ok_or_else(|| {
            bad(
                field,
                format!("{count} elements of {width} bytes as the header says"),
                format!("{} bytes of data", data_len(bytes)),
            )
        })?;
    let io = |e: std::io::Error| bad(field, "readable data", e);
    let data: Vec<f32> = match ty.as_str() {
        "<f4" => npy.into_vec::<f32>().map_err(io)?,
        "<f2" => npy
            .into_vec::<half::f16>()
            .map_err(io)?
            .into_iter()
            .map(f32::from)
            .collect(),
        "<f8" => npy
            .into_vec::<f64>()
            .map_err(io)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        "<i4" => npy
            .into_vec::<i32>()
            .map_err(io)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        _ => npy
            .into_vec::<i64>()
            .map_err(io)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
    };
    Ok(Tensor { shape, data })
}

/// Integer positions from .npy bytes (`<i4` or `<i8`, each within ±2^30), shaped [batch, seq]
/// or [seq] (the same positions for every batch).
pub fn parse_positions(
    field: &'static str,
    bytes: &[u8],
    batch: u64,
    seq: u64,
) -> Result<Vec<i32>> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| bad(field, "a valid .npy file", e))?;
    let shape = npy.shape().to_vec();
    let per_batch = match shape.as_slice() {
        [b, s] if *b == batch && *s == seq => false,
        [s] if *s == seq => true,
        _ => {
            return Err(bad(
                field,
                format!("shape [{batch}, {seq}] or [{seq}]"),
                format!("{shape:?}"),
            ));
        }
    };
    let ty = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => return Err(bad(field, "an integer dtype", other.descr())),
    };
    let width = match ty.as_str() {
        "<i4" => 4u64,
        "<i8" => 8,
        other => return Err(bad(field, "dtype <i4 or <i8", other)),
    };
    let count: u64 = shape.iter().product();
    if count * width > data_len(bytes) {
        return Err(bad(
            field,
            format!("{count} positions as the header says"),
            format!("{} bytes of data", data_len(bytes)),
        ));
    }
    let io = |e: std::io::Error| bad(field, "readable data", e);
    let wide: Vec<i64> = if width == 4 {
        npy.into_vec::<i32>()
            .map_err(io)?
            .into_iter()
            .map(i64::from)
            .collect()
    } else {
        npy.into_vec::<i64>().map_err(io)?
    };
    let limit = crate::spec::MAX_ABS_POSITION as i64;
    if let Some(p) = wide.iter().find(|p| p.abs() > limit) {
        return Err(bad(field, format!("positions within ±{limit}"), p));
    }
    let one: Vec<i32> = wide.into_iter().map(|p| p as i32).collect();
    Ok(if per_batch {
        (0..batch).flat_map(|_| one.iter().copied()).collect()
    } else {
        one
    })
}

/// Reads a file of at most `MAX_NPY_BYTES`.
pub fn read_limited(field: &'static str, path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path)
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    f.take(MAX_NPY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_NPY_BYTES {
        return Err(bad(
            field,
            format!("a file of at most {MAX_NPY_BYTES} bytes"),
            "a larger file",
        ));
    }
    Ok(bytes)
}

/// Writes a [batch, seq, heads, head_dim] f32 tensor as .npy.
pub fn write_npy(path: &Path, shape: &[u64], data: &[f32]) -> Result<()> {
    use npyz::WriterBuilder;
    let err = |e: std::io::Error| bad("out", "a writable file", format!("{}: {e}", path.display()));
    let file = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(file)
        .begin_nd()
        .map_err(err)?;
    w.extend(data.iter().copied()).map_err(err)?;
    w.finish().map_err(err)
}

/// The run spec: everything about the attention that the tensors' shapes do not say.
///
/// ```json
/// {
///   "causal": true,
///   "scale": null,
///   "position": {"type": "rope", "theta": 10000, "layout": "half", "rotary_dim": 64,
///                "attention_factor": 1.0},
///   "seq_len": null,
///   "logn_train_len": null
/// }
/// ```
///
/// `position.type` is `none`, `rope`, `alibi` (`slopes`: `"standard"` or a list, `form`:
/// `causal` or `symmetric`), `xpos` (`theta`, `scale_base`, `layout`), `hf` (a Hugging Face
/// rope dict under `rope_parameters`, with optional `max_position_embeddings`,
/// `original_max_position_embeddings`, `layout`), or `hf_config` (`path` of a model's
/// config.json, relative to the spec file, with optional `layout`). `seq_len` picks the table of
/// length-dependent schemes (default: largest position + 1).
pub fn parse_spec(
    text: &str,
    shape: [u32; 6],
    spec_dir: &Path,
    max_position: i64,
) -> Result<AttentionSpec> {
    let [batch, seq_q, seq_k, heads, kv_heads, head_dim] = shape;
    let v: Value =
        serde_json::from_str(text).map_err(|e| bad("spec", "valid JSON", e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("spec", "a JSON object", &v))?;
    const KEYS: &[&str] = &[
        "causal",
        "scale",
        "position",
        "seq_len",
        "logn_train_len",
        "window",
        "sink_tokens",
        "softcap",
        "sink_logits",
        "extrapolation",
    ];
    for key in obj.keys() {
        if !KEYS.contains(&key.as_str()) {
            return Err(bad("spec", format!("keys {}", KEYS.join(", ")), key));
        }
    }
    let mut spec = AttentionSpec::new(batch, seq_q, seq_k, heads, head_dim).with_kv_heads(kv_heads);
    if let Some(c) = obj.get("causal") {
        spec.causal = c
            .as_bool()
            .ok_or_else(|| bad("causal", "true or false", c))?;
    }
    if let Some(s) = obj.get("scale").filter(|s| !s.is_null()) {
        let s = s.as_f64().ok_or_else(|| bad("scale", "a number", s))?;
        spec = spec.with_scale(s);
    }
    if let Some(l) = obj.get("logn_train_len").filter(|s| !s.is_null()) {
        let l = l
            .as_u64()
            .filter(|&l| l <= u32::MAX as u64)
            .ok_or_else(|| bad("logn_train_len", "an integer", l))?;
        spec = spec.with_logn(l as u32);
    }
    parse_masks(obj, &mut spec)?;
    let seq_len = match obj.get("seq_len").filter(|s| !s.is_null()) {
        Some(s) => s
            .as_u64()
            .ok_or_else(|| bad("seq_len", "a non-negative integer", s))?,
        None => (max_position.max(0) + 1) as u64,
    };
    let empty = serde_json::Map::new();
    let pos = match obj.get("position") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => return Err(bad("position", "an object", other)),
    };
    let num = |key: &'static str, default: f64| -> Result<f64> {
        match pos.get(key).filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad(key, "a number", v)),
        }
    };
    let layout = |default: RopeLayout| -> Result<RopeLayout> {
        match pos.get("layout").and_then(Value::as_str) {
            None => Ok(default),
            Some("half") => Ok(RopeLayout::Half),
            Some("interleaved") => Ok(RopeLayout::Interleaved),
            Some(other) => Err(bad("layout", "half or interleaved", other)),
        }
    };
    let kind = pos.get("type").and_then(Value::as_str).unwrap_or("none");
    spec.position = match kind {
        "none" => PositionEncoding::None,
        "rope" => {
            let mut r = Rope::new(num("theta", 10000.0)?)
                .with_layout(layout(RopeLayout::Half)?)
                .with_attention_factor(num("attention_factor", 1.0)?);
            if let Some(rd) = pos.get("rotary_dim").filter(|v| !v.is_null()) {
                let rd = rd
                    .as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .ok_or_else(|| bad("rotary_dim", "an integer", rd))?;
                r = r.with_rotary_dim(rd as u32);
            }
            PositionEncoding::Rope(r)
        }
        "alibi" => {
            let slopes = match pos.get("slopes") {
                None => AlibiSlopes::Standard,
                Some(Value::String(s)) if s == "standard" => AlibiSlopes::Standard,
                Some(Value::Array(a)) => AlibiSlopes::Custom(
                    a.iter()
                        .map(|x| {
                            x.as_f64()
                                .map(|f| f as f32)
                                .ok_or_else(|| bad("slopes", "numbers", x))
                        })
                        .collect::<Result<_>>()?,
                ),
                Some(other) => {
                    return Err(bad("slopes", "\"standard\" or a list of numbers", other));
                }
            };
            let form = match pos.get("form").and_then(Value::as_str).unwrap_or("causal") {
                "causal" => AlibiForm::Causal,
                "symmetric" => AlibiForm::Symmetric,
                other => return Err(bad("form", "causal or symmetric", other)),
            };
            PositionEncoding::Alibi(Alibi { slopes, form })
        }
        "xpos" => PositionEncoding::Xpos(Xpos {
            layout: layout(RopeLayout::Interleaved)?,
            theta: num("theta", 10000.0)?,
            scale_base: num("scale_base", 512.0)?,
        }),
        "t5" => PositionEncoding::T5(T5Bias {
            num_buckets: uint(pos, "num_buckets")?.unwrap_or(32),
            max_distance: uint(pos, "max_distance")?.unwrap_or(128),
            bidirectional: match pos.get("bidirectional") {
                None => true,
                Some(b) => b
                    .as_bool()
                    .ok_or_else(|| bad("bidirectional", "true or false", b))?,
            },
            table: floats(pos, "table")?,
        }),
        "kerple" => PositionEncoding::Kerple(Kerple {
            form: match pos.get("form").and_then(Value::as_str).unwrap_or("log") {
                "log" => KerpleForm::Log,
                "power" => KerpleForm::Power,
                other => return Err(bad("form", "log or power", other)),
            },
            p: floats(pos, "p")?,
            a: floats(pos, "a")?,
        }),
        "sandwich" => PositionEncoding::Sandwich(Sandwich {
            dim: uint(pos, "dim")?,
        }),
        "fire" => PositionEncoding::Fire(Fire {
            c: num("c", 0.1)? as f32,
            l: num("l", 512.0)? as f32,
            ..Fire::new(
                floats(pos, "w1")?,
                floats(pos, "b1")?,
                floats(pos, "w2")?,
                floats(pos, "b2")?,
            )
        }),
        "hf" | "hf_config" => {
            let cfg = if kind == "hf" {
                let defaults = crate::config::HfDefaults {
                    max_position_embeddings: pos
                        .get("max_position_embeddings")
                        .and_then(Value::as_u64),
                    original_max_position_embeddings: pos
                        .get("original_max_position_embeddings")
                        .and_then(Value::as_u64),
                    ..Default::default()
                };
                RopeConfig::from_hf_rope_dict(pos.get("rope_parameters"), head_dim, &defaults)?
            } else {
                let rel = pos
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("path", "the path of a config.json", "missing"))?;
                let bytes = read_limited("path", &spec_dir.join(rel))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| bad("path", "a UTF-8 config.json", rel))?;
                RopeConfig::from_hf_config_str(&text)?
            };
            if cfg.head_dim != head_dim {
                return Err(bad(
                    "head_dim",
                    format!("the tensors' head_dim {head_dim}"),
                    format!("{} in the config", cfg.head_dim),
                ));
            }
            return cfg
                .apply(spec, layout(RopeLayout::Half)?, Some(seq_len))
                .and_then(|s| {
                    s.validate()?;
                    Ok(s)
                });
        }
        other => {
            return Err(bad(
                "position.type",
                "none, rope, alibi, xpos, t5, kerple, sandwich, fire, hf or hf_config",
                other,
            ));
        }
    };
    spec.validate()?;
    Ok(spec)
}

/// An optional unsigned integer under `key`.
fn uint(obj: &serde_json::Map<String, Value>, key: &'static str) -> Result<Option<u32>> {
    match obj.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&x| x <= u32::MAX as u64)
            .map(|x| Some(x as u32))
            .ok_or_else(|| bad(key, "a non-negative integer", v)),
    }
}

/// A required list of numbers under `key`.
fn floats(obj: &serde_json::Map<String, Value>, key: &'static str) -> Result<Vec<f32>> {
    match obj.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| bad(key, "a list of numbers", x))
            })
            .collect(),
        Some(other) => Err(bad(key, "a list of numbers", other)),
        None => Err(bad(key, "a list of numbers", "missing")),
    }
}

/// `window`, `sink_tokens`, `softcap`, `sink_logits` and `extrapolation`.
fn parse_masks(obj: &serde_json::Map<String, Value>, spec: &mut AttentionSpec) -> Result<()> {
    if let Some(w) = obj.get("window").filter(|v| !v.is_null()) {
        let w = w
            .as_object()
            .ok_or_else(|| bad("window", "an object with left and/or right", w))?;
        spec.window = Window {
            left: uint(w, "left")?,
            right: uint(w, "right")?,
        };
    }
    spec.sink_tokens = uint(obj, "sink_tokens")?.unwrap_or(0);
    if let Some(c) = obj.get("softcap").filter(|v| !v.is_null()) {
        spec.softcap = Some(c.as_f64().ok_or_else(|| bad("softcap", "a number", c))?);
    }
    if obj.get("sink_logits").is_some_and(|v| !v.is_null()) {
        spec.sink_logits = Some(floats(obj, "sink_logits")?);
    }
    if let Some(e) = obj.get("extrapolation").filter(|v| !v.is_null()) {
        let e = e
            .as_object()
            .ok_or_else(|| bad("extrapolation", "an object with a type", e))?;
        let need = |key: &'static str| -> Result<u32> {
            uint(e, key)?.ok_or_else(|| bad(key, "a non-negative integer", "missing"))
        };
        spec.extrapolation = match e.get("type").and_then(Value::as_str) {
            Some("rerope") => Extrapolation::ReRope {
                window: need("window")?,
                leak: match e.get("leak").filter(|v| !v.is_null()) {
                    None => None,
                    Some(k) => Some(k.as_f64().ok_or_else(|| bad("leak", "a number", k))?),
                },
            },
            Some("lm_infinite") => Extrapolation::LmInfinite {
                limit: need("limit")?,
            },
            Some("streaming_cache_index") => Extrapolation::StreamingCacheIndex,
            other => {
                return Err(bad(
                    "extrapolation.type",
                    "rerope, lm_infinite or streaming_cache_index",
                    format!("{other:?}"),
                ));
            }
        };
    }
    Ok(())
}
