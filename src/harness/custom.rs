//! Built-in schemes re-expressed as custom schemes (WGSL hooks with Rust twins), to show that
//! the hook computes what the built-in does at the built-in's speed, and a block-sparse mask to
//! show that a tile predicate skips what it hides. Tests, benches and `posattn check` use them.

use crate::encoding::custom::CustomScheme;
use crate::encoding::position::{PositionEncoding, alibi_slopes};
use crate::encoding::relative::{KerpleForm, T5Bias, kerple_params};

/// ALiBi, causal form (`slope · (n − m)`), with a per-head slope table.
pub const ALIBI_WGSL: &str = "\
// ALiBi: a linear penalty on the distance, one slope per head.
// @table slopes: heads
fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {
    return score - slopes(head) * f32(q_pos - k_pos);
}
";

/// ALiBi through the hook with the standard slopes (as f32, as the built-in stores them).
pub fn alibi(num_heads: u32) -> PositionEncoding {
    let slopes: Vec<f32> = alibi_slopes(num_heads).iter().map(|&s| s as f32).collect();
    PositionEncoding::Custom(
        CustomScheme::new(ALIBI_WGSL)
            .with_table("slopes", slopes)
            .with_score(|a| {
                a.score - a.table("slopes")[a.head as usize] as f64 * (a.q_pos - a.k_pos) as f64
            }),
    )
}

/// T5's relative buckets: the head's row of the bucket table by relative position, clamped to
/// ±max_distance (the built-in's lookup table, `T5Bias::lut`).
pub const T5_WGSL: &str = "\
// T5: a learned bias per head and relative-position bucket, looked up by k_pos - q_pos.
// @table t5_lut: heads
// @table t5_max: 1
fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {
    let dmax = i32(t5_max(0u));
    let rel = clamp(k_pos - q_pos, -dmax, dmax);
    return score + t5_lut(head * u32(2 * dmax + 1) + u32(rel + dmax));
}
";

/// T5 through the hook, from the same description as the built-in `PositionEncoding::T5`.
pub fn t5(bias: &T5Bias, num_heads: u32) -> PositionEncoding {
    let lut = bias.lut(num_heads);
    let d = bias.max_distance as i64;
    PositionEncoding::Custom(
        CustomScheme::new(T5_WGSL)
            .with_table("t5_lut", lut)
            .with_table("t5_max", vec![bias.max_distance as f32])
            .with_score(move |a| {
                let rel = (a.k_pos - a.q_pos).clamp(-d, d);
                let row = a.head as i64 * (2 * d + 1);
                a.score + a.table("t5_lut")[(row + rel + d) as usize] as f64
            }),
    )
}

/// KERPLE's logarithmic kernel, `−p · ln(1 + a·|Δ|)` per head.
pub const KERPLE_LOG_WGSL: &str = "\
// KERPLE (log): -p ln(1 + a |m - n|), (p, a) per head.
// @table kerple_p: heads
// @table kerple_a: heads
fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {
    let dist = f32(abs(q_pos - k_pos));
    return score - kerple_p(head) * log(1.0 + kerple_a(head) * dist);
}
";

/// KERPLE (log) through the hook, with the built-in's clamps applied to the tables.
pub fn kerple_log(p: &[f32], a: &[f32]) -> PositionEncoding {
    let (p, a): (Vec<f32>, Vec<f32>) = p
        .iter()
        .zip(a)
        .map(|(&p, &a)| kerple_params(KerpleForm::Log, p, a))
        .unzip();
    PositionEncoding::Custom(
        CustomScheme::new(KERPLE_LOG_WGSL)
            .with_table("kerple_p", p)
            .with_table("kerple_a", a)
            .with_score(|x| {
                let h = x.head as usize;
                let (p, a) = (x.table("kerple_p")[h] as f64, x.table("kerple_a")[h] as f64);
                x.score - p * (1.0 + a * (x.q_pos - x.k_pos).abs() as f64).ln()
            }),
    )
}

/// A sliding window of `left` keys back (by row and key index, so the same as the built-in
/// window when seq_q = seq_k) as a mask hook; with `tiles`, also a tile
/// predicate so that the tiles it hides are never loaded.
pub fn window_mask(left: u32, tiles: bool) -> PositionEncoding {
    let mut wgsl = format!(
        "// A window of {left} keys back, by index.\n\
         fn mask_mod(q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> bool {{\n\
         \x20   return k_index + {left}u >= q_index;\n\
         }}\n"
    );
    if tiles {
        wgsl += &format!(
            "fn tile_mask(q_first: u32, q_last: u32, k_first: u32, k_last: u32, head: u32) -> u32 {{\n\
             \x20   if (k_last + {left}u < q_first) {{\n\
             \x20       return TILE_HIDDEN;\n\
             \x20   }}\n\
             \x20   if (k_first + {left}u >= q_last) {{\n\
             \x20       return TILE_FULL;\n\
             \x20   }}\n\
             \x20   return TILE_PARTIAL;\n\
             }}\n"
        );
    }
    PositionEncoding::Custom(
        CustomScheme::new(wgsl)
            .with_mask(move |a| a.k_index as u64 + left as u64 >= a.q_index as u64),
    )
}

/// RoPE (half layout, base `theta`) through the rotation hook, angles in f32 from a frequency
/// table; the WGSL builtins `cos` and `sin` (the built-in RoPE uses its own accurate sincos).
pub fn rope(theta: f64, head_dim: u32) -> PositionEncoding {
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let wgsl = format!(
        "// RoPE through the rotation hook.\n// @table inv_freq: {}\n\
         fn rotate_mod(x: vec2<f32>, pair: u32, pos: i32, is_query: bool) -> vec2<f32> {{\n\
         \x20   let angle = f32(pos) * inv_freq(pair);\n\
         \x20   let c = cos(angle);\n\
         \x20   let s = sin(angle);\n\
         \x20   return vec2<f32>(x.x * c - x.y * s, x.y * c + x.x * s);\n\
         }}\n",
        head_dim / 2
    );
    PositionEncoding::Custom(
        CustomScheme::new(wgsl)
            .with_table("inv_freq", inv)
            .with_rotate(|a| {
                let angle = a.pos as f64 * a.table("inv_freq")[a.pair as usize] as f64;
                let (s, c) = angle.sin_cos();
                [a.x[0] * c - a.x[1] * s, a.x[1] * c + a.x[0] * s]
            }),
    )
}
