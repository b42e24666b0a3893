//! Files for `posattn run`: tensors and positions as `.npy` (what `numpy.save` writes), and the
//! run spec as JSON. Every malformed or hostile input is a typed error naming the file or key;
//! nothing is allocated before the header's claims are checked against the file's real size.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::RopeConfig;
use crate::dtype::Dtype;
use crate::encoding::custom::CustomScheme;
use crate::encoding::masks::{Extrapolation, Window};
use crate::encoding::position::{
    Alibi, AlibiForm, AlibiSlopes, PositionEncoding, Rope, RopeLayout, Xpos,
};
use crate::encoding::relative::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
use crate::error::{Error, Result};
use crate::json;
use crate::spec::AttentionSpec;

/// Largest .npy file accepted (1 GiB): bigger than any tensor a storage binding can hold.
pub const MAX_NPY_BYTES: u64 = 1 << 30;

/// A tensor read from a .npy file: its values widened to f32 (exact for f32, f16 and integers
/// up to 2^24), and for f32 and f16 files the stored bytes themselves, which `posattn run`
/// uploads as they are (f16 stays f16 on the device).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Elements widened to f32, row-major.
    pub data: Vec<f32>,
    /// The file's dtype and little-endian element bytes, for `<f4` and `<f2` files.
    pub stored: Option<(Dtype, Vec<u8>)>,
}

impl Tensor {
    /// The dtype the tensor is stored in on the device (f32 for f64 and integer files, which
    /// are converted) and its bytes in that dtype.
    pub fn storage(&self) -> (Dtype, std::borrow::Cow<'_, [u8]>) {
        match &self.stored {
            Some((d, bytes)) => (*d, std::borrow::Cow::Borrowed(bytes)),
            None => (
                Dtype::F32,
                std::borrow::Cow::Owned(Dtype::F32.encode(&self.data)),
            ),
        }
    }
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
    // f32 and f16 keep their bytes: the data follows the header, count · width of them.
    let raw = |d: Dtype| {
        let start = bytes.len() - data_len(bytes) as usize;
        (d, bytes[start..start + (count * width) as usize].to_vec())
    };
    let stored = match ty.as_str() {
        "<f4" => Some(raw(Dtype::F32)),
        "<f2" => Some(raw(Dtype::F16)),
        _ => None,
    };
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
    Ok(Tensor {
        shape,
        data,
        stored,
    })
}

/// Integer positions from .npy bytes (`<i4` or `<i8`, each within ±2^30), shaped [batch, seq]
/// or `[seq]` (the same positions for every batch).
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
    // A [batch, seq] array in Fortran order holds its elements column by column: refused like
    // Fortran-ordered tensors rather than read in the wrong order.
    if npy.order() != npyz::Order::C && shape.len() > 1 {
        return Err(bad(field, "C (row-major) order", "Fortran order"));
    }
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
    // unsigned_abs: −2^63 has no i64 absolute value.
    if let Some(p) = wide.iter().find(|p| p.unsigned_abs() > limit as u64) {
        return Err(bad(field, format!("positions within ±{limit}"), p));
    }
    let one: Vec<i32> = wide.into_iter().map(|p| p as i32).collect();
    Ok(if per_batch {
        (0..batch).flat_map(|_| one.iter().copied()).collect()
    } else {
        one
    })
}

/// Largest config or spec file accepted (4 MiB): real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Reads a regular file of at most `MAX_NPY_BYTES`.
pub fn read_limited(field: &'static str, path: &Path) -> Result<Vec<u8>> {
    read_capped(field, path, MAX_NPY_BYTES)
}

/// Reads a spec or config: a regular file of at most `MAX_CONFIG_BYTES`.
pub fn read_config(field: &'static str, path: &Path) -> Result<Vec<u8>> {
    read_capped(field, path, MAX_CONFIG_BYTES)
}

/// Reads `path` if it is a regular file of at most `cap` bytes. The kind and the size come from
/// metadata before the file is opened, so a named pipe, a device or a directory is refused
/// without blocking and nothing larger than the cap is read.
pub fn read_capped(field: &'static str, path: &Path, cap: u64) -> Result<Vec<u8>> {
    let shown = || path.display().to_string();
    let meta = std::fs::metadata(path)
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", shown())))?;
    check_regular(field, path, &meta, cap)?;
    let f = std::fs::File::open(path)
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", shown())))?;
    // The file opened may not be the one inspected (a rename in between): look again.
    let meta = f
        .metadata()
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", shown())))?;
    check_regular(field, path, &meta, cap)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(field, "a readable file", format!("{}: {e}", shown())))?;
    if bytes.len() as u64 > cap {
        return Err(bad(
            field,
            format!("a file of at most {cap} bytes"),
            "a file that grew past it while read",
        ));
    }
    Ok(bytes)
}

fn check_regular(
    field: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    cap: u64,
) -> Result<()> {
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file (a pipe, socket or device)"
        };
        return Err(bad(
            field,
            "a regular file",
            format!("{}: {what}", path.display()),
        ));
    }
    if meta.len() > cap {
        return Err(bad(
            field,
            format!("a file of at most {cap} bytes"),
            format!("{}: {} bytes", path.display(), meta.len()),
        ));
    }
    Ok(())
}

/// Writes a [batch, seq, heads, head_dim] f32 tensor as .npy.
/// Writes little-endian element bytes of `dtype` (f32 or f16; numpy has no bf16) as .npy.
pub fn write_npy_bytes(path: &Path, shape: &[u64], dtype: Dtype, bytes: &[u8]) -> Result<()> {
    let descr = match dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
        Dtype::Bf16 => {
            return Err(bad(
                "out_dtype",
                "f32 or f16 (numpy has no bf16 dtype)",
                "bf16",
            ));
        }
    };
    let count: u64 = shape.iter().product();
    crate::dtype::check_bytes("out", dtype, bytes.len(), Some(count as usize))?;
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Version 1.0: magic (6) + version (2) + length (2) + header, padded to 64 with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut file = Vec::with_capacity(10 + header.len() + bytes.len());
    file.extend_from_slice(b"\x93NUMPY\x01\x00");
    file.extend_from_slice(&(header.len() as u16).to_le_bytes());
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(bytes);
    std::fs::write(path, file)
        .map_err(|e| bad("out", "a writable file", format!("{}: {e}", path.display())))
}

/// Writes `data` of `shape` as a little-endian f32 `.npy` file.
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
/// config.json, relative to the spec file, with optional `layout`), or `custom` (`wgsl`: a WGSL
/// snippet's path relative to the spec file, `tables`: the tables it declares by name,
/// `layout`: the pairs its `rotate_mod` sees; see `encoding::custom`). `seq_len` picks the table of
/// length-dependent schemes (default: largest position + 1).
///
/// Every object rejects keys it does not have, values of the wrong type and keys given twice,
/// with the path of the offending key in the error (`position.theta`).
pub fn parse_spec(
    text: &str,
    shape: [u32; 6],
    spec_dir: &Path,
    max_position: i64,
) -> Result<AttentionSpec> {
    let [batch, seq_q, seq_k, heads, kv_heads, head_dim] = shape;
    let file: SpecFile = json::from_str("spec", "", text)?;
    let mut spec = AttentionSpec::default()
        .with_batch(batch)
        .with_seq_q(seq_q)
        .with_seq_k(seq_k)
        .with_heads(heads)
        .with_head_dim(head_dim)
        .with_kv_heads(kv_heads);
    if let Some(c) = file.causal {
        spec.causal = c;
    }
    if let Some(s) = file.scale {
        spec = spec.with_scale(s);
    }
    if let Some(l) = file.logn_train_len {
        spec = spec.with_logn(l);
    }
    if let Some(raw) = &file.window {
        let w: WindowFile = json::from_str("spec", "window", raw.get())?;
        spec.window = Window {
            left: w.left,
            right: w.right,
        };
    }
    spec.sink_tokens = file.sink_tokens.unwrap_or(0);
    spec.softcap = file.softcap;
    if let Some(s) = file.sink_logits {
        spec.sink_logits = Some(f32s("sink_logits", &s)?);
    }
    if let Some(raw) = &file.extrapolation {
        spec.extrapolation = parse_extrapolation(raw)?;
    }
    let seq_len = match file.seq_len {
        Some(s) => s,
        None => (max_position.max(0) + 1) as u64,
    };
    let Some(raw) = &file.position else {
        spec.validate()?;
        return Ok(spec);
    };
    let kind: Tagged<PositionType> = json::from_str("spec", "position", raw.get())?;
    let body = raw.get();
    spec.position = match kind.kind {
        PositionType::None => {
            json::from_str::<NoneFile>("spec", "position", body)?;
            PositionEncoding::None
        }
        PositionType::Rope => {
            let r: RopeFile = json::from_str("spec", "position", body)?;
            let mut rope = Rope::new(r.theta.unwrap_or(10000.0))
                .with_layout(r.layout.map_or(RopeLayout::Half, Into::into))
                .with_attention_factor(r.attention_factor.unwrap_or(1.0));
            if let Some(rd) = r.rotary_dim {
                rope = rope.with_rotary_dim(rd);
            }
            PositionEncoding::Rope(rope)
        }
        PositionType::Alibi => {
            let a: AlibiFile = json::from_str("spec", "position", body)?;
            let slopes = match a.slopes {
                None | Some(SlopesFile::Named(NamedSlopes::Standard)) => AlibiSlopes::Standard,
                Some(SlopesFile::List(l)) => AlibiSlopes::Custom(f32s("position.slopes", &l)?),
            };
            let form = match a.form.unwrap_or(AlibiFormFile::Causal) {
                AlibiFormFile::Causal => AlibiForm::Causal,
                AlibiFormFile::Symmetric => AlibiForm::Symmetric,
            };
            PositionEncoding::Alibi(Alibi { slopes, form })
        }
        PositionType::Xpos => {
            let x: XposFile = json::from_str("spec", "position", body)?;
            PositionEncoding::Xpos(Xpos {
                layout: x.layout.map_or(RopeLayout::Interleaved, Into::into),
                theta: x.theta.unwrap_or(10000.0),
                scale_base: x.scale_base.unwrap_or(512.0),
            })
        }
        PositionType::T5 => {
            let t: T5File = json::from_str("spec", "position", body)?;
            PositionEncoding::T5(T5Bias {
                num_buckets: t.num_buckets.unwrap_or(32),
                max_distance: t.max_distance.unwrap_or(128),
                bidirectional: t.bidirectional.unwrap_or(true),
                table: f32s("position.table", &t.table)?,
            })
        }
        PositionType::Kerple => {
            let k: KerpleFile = json::from_str("spec", "position", body)?;
            PositionEncoding::Kerple(Kerple {
                form: match k.form.unwrap_or(KerpleFormFile::Log) {
                    KerpleFormFile::Log => KerpleForm::Log,
                    KerpleFormFile::Power => KerpleForm::Power,
                },
                p: f32s("position.p", &k.p)?,
                a: f32s("position.a", &k.a)?,
            })
        }
        PositionType::Sandwich => {
            let s: SandwichFile = json::from_str("spec", "position", body)?;
            PositionEncoding::Sandwich(Sandwich { dim: s.dim })
        }
        PositionType::Fire => {
            let f: FireFile = json::from_str("spec", "position", body)?;
            PositionEncoding::Fire(Fire {
                c: f32_of("position.c", f.c.unwrap_or(0.1))?,
                l: f32_of("position.l", f.l.unwrap_or(512.0))?,
                ..Fire::new(
                    f32s("position.w1", &f.w1)?,
                    f32s("position.b1", &f.b1)?,
                    f32s("position.w2", &f.w2)?,
                    f32s("position.b2", &f.b2)?,
                )
            })
        }
        PositionType::Custom => {
            let c: CustomFile = json::from_str("spec", "position", body)?;
            let bytes = read_config("position.wgsl", &spec_dir.join(&c.wgsl))?;
            let wgsl = String::from_utf8(bytes)
                .map_err(|_| bad("position.wgsl", "a UTF-8 WGSL file", &c.wgsl))?;
            let mut scheme = CustomScheme::new(wgsl);
            if let Some(layout) = c.layout {
                scheme = scheme.with_layout(layout.into());
            }
            for (name, values) in c.tables.map(|t| t.0).unwrap_or_default() {
                let mut data = Vec::with_capacity(values.len());
                for (i, &x) in values.iter().enumerate() {
                    if !x.is_finite() || x.abs() > f32::MAX as f64 {
                        return Err(Error::InvalidAt {
                            path: format!("position.tables.{name}[{i}]"),
                            message: format!("expected a finite f32, got {x}"),
                        });
                    }
                    data.push(x as f32);
                }
                scheme = scheme.with_table(name, data);
            }
            PositionEncoding::Custom(scheme)
        }
        PositionType::Hf | PositionType::HfConfig => {
            let (cfg, layout) = if kind.kind == PositionType::Hf {
                let h: HfFile = json::from_str("spec", "position", body)?;
                let defaults = crate::config::HfDefaults {
                    max_position_embeddings: h.max_position_embeddings,
                    original_max_position_embeddings: h.original_max_position_embeddings,
                    ..Default::default()
                };
                let cfg = RopeConfig::from_rope_dict_at(
                    "position.rope_parameters",
                    h.rope_parameters.as_ref(),
                    head_dim,
                    &defaults,
                )?;
                (cfg, h.layout)
            } else {
                let h: HfConfigRef = json::from_str("spec", "position", body)?;
                let bytes = read_config("position.path", &spec_dir.join(&h.path))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| bad("position.path", "a UTF-8 config.json", &h.path))?;
                (RopeConfig::from_hf_config_str(&text)?, h.layout)
            };
            if cfg.head_dim != head_dim {
                return Err(bad(
                    "head_dim",
                    format!("the tensors' head_dim {head_dim}"),
                    format!("{} in the config", cfg.head_dim),
                ));
            }
            let spec = cfg.apply(
                spec,
                layout.map_or(RopeLayout::Half, Into::into),
                Some(seq_len),
            )?;
            spec.validate()?;
            return Ok(spec);
        }
    };
    spec.validate()?;
    Ok(spec)
}

/// f64 values from JSON as the f32 the kernel reads: a value beyond f32's range is an error,
/// never an infinity.
fn f32s(field: &'static str, xs: &[f64]) -> Result<Vec<f32>> {
    xs.iter().map(|&x| f32_of(field, x)).collect()
}

fn f32_of(field: &'static str, x: f64) -> Result<f32> {
    if x.is_finite() && x.abs() <= f32::MAX as f64 {
        Ok(x as f32)
    } else {
        Err(bad(
            field,
            format!(
                "numbers within f32's range (±{:e}), as the kernel computes in f32",
                f32::MAX
            ),
            x,
        ))
    }
}

/// The top level of the run spec.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
struct SpecFile {
    causal: Option<bool>,
    scale: Option<f64>,
    position: Option<Box<RawValue>>,
    seq_len: Option<u64>,
    logn_train_len: Option<u32>,
    window: Option<Box<RawValue>>,
    sink_tokens: Option<u32>,
    softcap: Option<f64>,
    sink_logits: Option<Vec<f64>>,
    extrapolation: Option<Box<RawValue>>,
}

/// The `type` of a tagged object; read first, then the object again as that type's struct,
/// so that paths in errors stay exact.
#[derive(Deserialize)]
struct Tagged<K> {
    #[serde(rename = "type")]
    kind: K,
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PositionType {
    None,
    Rope,
    Alibi,
    Xpos,
    T5,
    Kerple,
    Sandwich,
    Fire,
    Hf,
    HfConfig,
    Custom,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LayoutFile {
    Half,
    Interleaved,
}

impl From<LayoutFile> for RopeLayout {
    fn from(l: LayoutFile) -> Self {
        match l {
            LayoutFile::Half => RopeLayout::Half,
            LayoutFile::Interleaved => RopeLayout::Interleaved,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoneFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RopeFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    theta: Option<f64>,
    layout: Option<LayoutFile>,
    rotary_dim: Option<u32>,
    attention_factor: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum NamedSlopes {
    Standard,
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "\"standard\" or a list of numbers")]
enum SlopesFile {
    Named(NamedSlopes),
    List(Vec<f64>),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum AlibiFormFile {
    Causal,
    Symmetric,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlibiFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    slopes: Option<SlopesFile>,
    form: Option<AlibiFormFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct XposFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    theta: Option<f64>,
    scale_base: Option<f64>,
    layout: Option<LayoutFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct T5File {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    num_buckets: Option<u32>,
    max_distance: Option<u32>,
    bidirectional: Option<bool>,
    table: Vec<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum KerpleFormFile {
    Log,
    Power,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KerpleFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    form: Option<KerpleFormFile>,
    p: Vec<f64>,
    a: Vec<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SandwichFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    dim: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FireFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    c: Option<f64>,
    l: Option<f64>,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
}

/// `{"type": "custom", "wgsl": "file.wgsl", "tables": {"NAME": [..]}, "layout": "half"}`; the
/// WGSL path is relative to the spec file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    wgsl: String,
    tables: Option<TablesFile>,
    layout: Option<LayoutFile>,
}

/// Named tables; a name given twice is an error, as everywhere in a spec.
struct TablesFile(std::collections::BTreeMap<String, Vec<f64>>);

impl<'de> Deserialize<'de> for TablesFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TablesFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of named lists of numbers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<TablesFile, A::Error> {
                let mut out = std::collections::BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate table `{key}`")));
                    }
                    let v: Vec<f64> = map.next_value()?;
                    out.insert(key, v);
                }
                Ok(TablesFile(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HfFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<u64>,
    original_max_position_embeddings: Option<u64>,
    layout: Option<LayoutFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HfConfigRef {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    path: String,
    layout: Option<LayoutFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    left: Option<u32>,
    right: Option<u32>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExtrapolationType {
    Rerope,
    LmInfinite,
    StreamingCacheIndex,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReropeFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    window: u32,
    leak: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LmInfiniteFile {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    limit: u32,
}

fn parse_extrapolation(raw: &RawValue) -> Result<Extrapolation> {
    let body = raw.get();
    let kind: Tagged<ExtrapolationType> = json::from_str("spec", "extrapolation", body)?;
    Ok(match kind.kind {
        ExtrapolationType::Rerope => {
            let r: ReropeFile = json::from_str("spec", "extrapolation", body)?;
            Extrapolation::ReRope {
                window: r.window,
                leak: r.leak,
            }
        }
        ExtrapolationType::LmInfinite => {
            let l: LmInfiniteFile = json::from_str("spec", "extrapolation", body)?;
            Extrapolation::LmInfinite { limit: l.limit }
        }
        ExtrapolationType::StreamingCacheIndex => {
            json::from_str::<NoneFile>("spec", "extrapolation", body)?;
            Extrapolation::StreamingCacheIndex
        }
    })
}
