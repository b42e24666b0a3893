//! Figures of what each position scheme does (feature `cli`): PNGs drawn with plotters, the
//! curves computed by the crate's own f64 reference ([`crate::harness::reference`]), never by a
//! second transcription of the formulas.
//!
//! - **Score against relative distance**: the logit of one query at position `N` against one
//!   key at `N − Δ`, as the reference's log-sum-exp of a one-key problem (softmax over a single
//!   key: the log-sum-exp is the logit itself), with q = k = all ones, minus its value at Δ = 0.
//! - **Attention weights over a long sequence**: one head's softmax weights of the last query
//!   over 2048 keys (seeded content around all ones), with and without each extrapolation
//!   method, recovered from the reference's output with one-hot values, 64 keys per run.

use std::path::Path;

use crate::encoding::masks::Extrapolation;
use crate::encoding::position::{Alibi, PositionEncoding, Rope, RopeLayout, Xpos};
use crate::encoding::relative::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
use crate::encoding::scaling::{LongRope, RopeScaling, Yarn, rope_frequencies};
use crate::error::{Error, Result};
use crate::harness::check::SplitMix;
use crate::harness::reference;
use crate::spec::AttentionSpec;

/// The schemes `posattn plot --scheme` knows, and `all`.
pub const SCHEMES: &[&str] = &[
    "rope", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "alibi", "xpos", "t5",
    "kerple", "sandwich", "fire", "all",
];

/// Heads of the figures' problems; the curves show head [`HEAD`].
pub const HEADS: u32 = 8;
/// The head whose curves are drawn.
pub const HEAD: usize = 3;
const HEAD_DIM: u32 = 64;
const THETA: f64 = 10000.0;
/// The context a scaled RoPE is set up to extend (its original length).
pub const TRAIN_LEN: u32 = 512;
/// Keys of the long-sequence figure (4 × the training length).
pub const LONG_SEQ: u32 = 2048;

/// A named curve: (x, y) points.
pub type Curve = (String, Vec<(f64, f64)>);

fn scaled(scaling: RopeScaling, seq: u32) -> Result<PositionEncoding> {
    let f = rope_frequencies(THETA, HEAD_DIM, 1.0, &scaling, Some(seq as u64))?;
    Ok(PositionEncoding::Rope(f.to_rope(THETA, RopeLayout::Half)))
}

/// The encoding a figure draws for `name` (a single scheme, not `all`), with `seq` the longest
/// sequence it will see (dynamic NTK depends on it).
pub fn encoding(name: &str, seq: u32) -> Result<PositionEncoding> {
    let t = TRAIN_LEN as u64;
    let heads = HEADS as usize;
    Ok(match name {
        "rope" => PositionEncoding::Rope(Rope::new(THETA)),
        "linear" => scaled(RopeScaling::Linear { factor: 4.0 }, seq)?,
        "ntk" => scaled(RopeScaling::NtkAlpha { alpha: 4.0 }, seq)?,
        "dynamic" => scaled(
            RopeScaling::Dynamic {
                factor: 4.0,
                max_position_embeddings: t,
            },
            seq,
        )?,
        "yarn" => scaled(
            RopeScaling::Yarn(Yarn {
                factor: Some(4.0),
                original_max_position_embeddings: t,
                max_position_embeddings: 4 * t,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            }),
            seq,
        )?,
        "longrope" => {
            let factors = |step: f64| (0..HEAD_DIM / 2).map(|i| 1.0 + step * i as f64).collect();
            scaled(
                RopeScaling::LongRope(LongRope {
                    short_factor: factors(0.02),
                    long_factor: factors(0.25),
                    factor: None,
                    original_max_position_embeddings: t,
                    max_position_embeddings: 4 * t,
                    attention_factor: None,
                }),
                seq,
            )?
        }
        "llama3" => scaled(
            RopeScaling::Llama3 {
                factor: 4.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: t,
            },
            seq,
        )?,
        "alibi" => PositionEncoding::Alibi(Alibi::default()),
        "xpos" => PositionEncoding::Xpos(Xpos::default()),
        // A decoder's table, decreasing with the bucket (a learned table's usual shape).
        "t5" => PositionEncoding::T5(T5Bias {
            num_buckets: 32,
            max_distance: 128,
            bidirectional: false,
            table: (0..32)
                .flat_map(|b| {
                    (0..heads).map(move |h| -(1.0 + b as f32).ln() * (h + 1) as f32 / 4.0)
                })
                .collect(),
        }),
        "kerple" => PositionEncoding::Kerple(Kerple {
            form: KerpleForm::Log,
            p: (0..heads).map(|h| 0.5 + 0.25 * h as f32).collect(),
            a: vec![0.5; heads],
        }),
        "sandwich" => PositionEncoding::Sandwich(Sandwich::default()),
        // FIRE with a seeded MLP of width 32 (c = 0.1, L = the training length).
        "fire" => {
            let mut rng = SplitMix::new(5);
            let w = 32;
            PositionEncoding::Fire(Fire {
                c: 0.1,
                l: TRAIN_LEN as f32,
                ..Fire::new(
                    rng.vec(w, 2.0),
                    rng.vec(w, 1.0),
                    rng.vec(w * heads, 1.0),
                    rng.vec(heads, 1.0),
                )
            })
        }
        other => {
            return Err(Error::invalid(
                "scheme",
                format!("one of {}", SCHEMES.join(", ")),
                other,
            ));
        }
    })
}

fn is_rope(name: &str) -> bool {
    matches!(
        name,
        "rope" | "linear" | "ntk" | "dynamic" | "yarn" | "longrope" | "llama3"
    )
}

fn base_spec(position: PositionEncoding, seq_k: u32) -> AttentionSpec {
    AttentionSpec::default()
        .with_seq_q(1)
        .with_seq_k(seq_k)
        .with_heads(HEADS)
        .with_head_dim(HEAD_DIM)
        .with_position(position)
}

fn finite(what: &str, x: f64) -> Result<f64> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(Error::Invalid {
            field: "scheme",
            expected: "finite reference values".into(),
            got: format!("{x} in the {what}"),
        })
    }
}

/// Logit of head [`HEAD`] of a query at position `max_distance` against a key at
/// `max_distance − Δ`, Δ = 0..=max_distance, minus its value at Δ = 0 (q = k = all ones).
pub fn distance_curve(position: &PositionEncoding, max_distance: u32) -> Result<Vec<(f64, f64)>> {
    let spec = base_spec(position.clone(), 1).with_causal(false);
    spec.validate()?;
    let d = HEAD_DIM as usize;
    let q = vec![1.0f32; HEADS as usize * d];
    let k = q.clone();
    let v = vec![0.0f32; HEADS as usize * d];
    let m = max_distance as i32;
    let logit = |delta: i32| {
        let (_, lse) = reference::attention_lse::<f64>(&spec, &q, &k, &v, &[m], &[m - delta], None);
        lse[HEAD]
    };
    let at0 = finite("score at distance 0", logit(0))?;
    let step = (max_distance / 512).max(1);
    (0..=max_distance)
        .step_by(step as usize)
        .map(|delta| {
            let y = finite("score curve", logit(delta as i32))? - at0;
            Ok((delta as f64, y))
        })
        .collect()
}

/// Softmax weights of head [`HEAD`]'s last query over `spec.seq_k` keys (seeded content near
/// all ones), as (key index, weight) for the visible keys.
pub fn weight_curve(spec: &AttentionSpec) -> Result<Vec<(f64, f64)>> {
    spec.validate()?;
    let d = HEAD_DIM as usize;
    let (h, n) = (HEADS as usize, spec.seq_k as usize);
    let mut rng = SplitMix::new(9);
    let near_ones = |rng: &mut SplitMix, len: usize| -> Vec<f32> {
        rng.vec(len, 0.25).into_iter().map(|x| 1.0 + x).collect()
    };
    let q = near_ones(&mut rng, h * d);
    let k = near_ones(&mut rng, n * h * d);
    let (pq, pk) = spec.default_positions();
    // Values one-hot by key: run c gives the weights of keys 64c..64c+63 in the output's
    // channels.
    let mut weights = vec![0.0f64; n];
    for chunk in 0..n.div_ceil(d) {
        let mut v = vec![0.0f32; n * h * d];
        for j in chunk * d..((chunk + 1) * d).min(n) {
            for head in 0..h {
                v[(j * h + head) * d + (j - chunk * d)] = 1.0;
            }
        }
        let out = reference::attention::<f64>(spec, &q, &k, &v, &pq, &pk);
        for j in chunk * d..((chunk + 1) * d).min(n) {
            weights[j] = finite("attention weights", out[HEAD * d + (j - chunk * d)])?;
        }
    }
    Ok(weights
        .into_iter()
        .enumerate()
        .filter(|&(j, _)| spec.visible(0, j))
        .map(|(j, w)| (j as f64, w))
        .collect())
}

/// The score-against-distance curves of a figure: a RoPE scaling next to plain RoPE; `all`:
/// one curve per scheme.
pub fn distance_curves(name: &str) -> Result<Vec<Curve>> {
    let names: Vec<&str> = match name {
        "all" => SCHEMES[..SCHEMES.len() - 1].to_vec(),
        n if is_rope(n) && n != "rope" => vec!["rope", n],
        n => vec![n],
    };
    names
        .into_iter()
        .map(|n| {
            let e = encoding(n, LONG_SEQ)?;
            Ok((n.to_string(), distance_curve(&e, LONG_SEQ)?))
        })
        .collect()
}

/// Turns a spec into one setup of the long-sequence figure.
pub type Setup = fn(AttentionSpec) -> AttentionSpec;

/// The extrapolation setups of the long-sequence figure for a scheme: none, then (RoPE
/// family) ReRoPE, LM-Infinite and StreamingLLM with cache-index positions, or (other
/// schemes) StreamingLLM's sinks and window alone.
pub fn extrapolations(name: &str) -> Vec<(&'static str, Setup)> {
    let mut v: Vec<(&'static str, Setup)> = vec![("none", |s| s)];
    if is_rope(name) {
        v.push(("ReRoPE (window 256)", |s| {
            s.with_extrapolation(Extrapolation::ReRope {
                window: 256,
                leak: None,
            })
        }));
        v.push(("LM-Infinite", |s| {
            s.with_lm_infinite(4, TRAIN_LEN, TRAIN_LEN)
        }));
        v.push(("StreamingLLM (cache index)", |s| {
            s.with_streaming(4, TRAIN_LEN - 4, true)
        }));
    } else {
        v.push(("StreamingLLM (sinks + window)", |s| {
            s.with_streaming(4, TRAIN_LEN - 4, false)
        }));
    }
    v
}

/// The long-sequence weight curves of a figure (`all` draws plain RoPE's).
pub fn weight_curves(name: &str) -> Result<Vec<Curve>> {
    let name = if name == "all" { "rope" } else { name };
    let e = encoding(name, LONG_SEQ)?;
    extrapolations(name)
        .into_iter()
        .map(|(label, with)| {
            let spec = with(base_spec(e.clone(), LONG_SEQ));
            Ok((label.to_string(), weight_curve(&spec)?))
        })
        .collect()
}

fn draw_error(out: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field: "out",
        expected: "a PNG file that can be written".into(),
        got: format!("{}: {e}", out.display()),
    }
}

/// The font every label is drawn with (DejaVu Sans, cut to the characters the figures use;
/// `assets/DejaVuSans-LICENSE.txt`), registered once: no system font lookup. (plotters has no
/// font registration on wasm32, where the figures are not drawn.)
#[cfg(target_arch = "wasm32")]
fn register_font() {}

#[cfg(not(target_arch = "wasm32"))]
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
        // The font is ours and valid; registration fails only on a malformed file.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, font);
    });
}

/// Draws the figure of `scheme` (one of [`SCHEMES`]) into `out` (PNG, 1400 × 520): score
/// against distance on the left, long-sequence weights on the right.
pub fn draw(scheme: &str, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let left = distance_curves(scheme)?;
    let right = weight_curves(scheme)?;
    register_font();
    let (width, height) = (1400u32, 520u32);
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(out, e))?;
        let (a, b) = root.split_horizontally(700);
        let palette = |i: usize| Palette99::pick(i).to_rgba();

        let (lo, hi) = left
            .iter()
            .flat_map(|c| c.1.iter().map(|p| p.1))
            .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
        // Linear biases run off far below the rest: the view stops at −40 (points below are
        // left out, not clamped).
        let (lo, hi) = (lo.max(-40.0) - 0.5, hi + 0.5);
        let mut chart = ChartBuilder::on(&a)
            .caption(
                format!("{scheme}: logit(Δ) − logit(0), head {HEAD} of {HEADS}, q = k = 1"),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..LONG_SEQ as f64, lo..hi)
            .map_err(|e| draw_error(out, e))?;
        chart
            .configure_mesh()
            .x_desc("relative distance Δ = m − n")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("logit difference")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| draw_error(out, e))?;
        for (i, (label, pts)) in left.iter().enumerate() {
            let color = palette(i);
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied().filter(|p| p.1 >= lo),
                    color.stroke_width(2),
                ))
                .map_err(|e| draw_error(out, e))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| draw_error(out, e))?;

        // One strip per setup: the curves overlap too much to share axes.
        let floor = 1e-8;
        let strips = b.split_evenly((right.len(), 1));
        for (i, ((label, pts), area)) in right.iter().zip(&strips).enumerate() {
            let color = palette(i);
            let caption = if i == 0 {
                format!(
                    "weights of the last of {LONG_SEQ} tokens (trained on {TRAIN_LEN}): {label}"
                )
            } else {
                label.clone()
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 16))
                .margin(6)
                .x_label_area_size(if i + 1 == right.len() { 30 } else { 0 })
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..LONG_SEQ as f64, (floor..1.0).log_scale())
                .map_err(|e| draw_error(out, e))?;
            let mut mesh = chart.configure_mesh();
            mesh.y_labels(3)
                .y_label_formatter(&|y| format!("{y:.0e}"))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 12));
            if i + 1 == right.len() {
                mesh.x_desc("key index");
            }
            mesh.draw().map_err(|e| draw_error(out, e))?;
            // Masked keys carry no weight and are absent, as are weights below the floor.
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y.max(floor)), 1, color.filled())),
                )
                .map_err(|e| draw_error(out, e))?;
        }
        root.present().map_err(|e| draw_error(out, e))?;
    }
    write_png(out, width, height, &rgb).map_err(|e| draw_error(out, e))
}

fn write_png(out: &Path, width: u32, height: u32, rgb: &[u8]) -> std::result::Result<(), String> {
    let file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())
}
