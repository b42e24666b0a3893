//! Storage dtypes of the tensors: f32, f16 and bf16, chosen per tensor (Q, K, V, O) in the spec.
//! Only storage changes: the kernels widen every element to f32 as they read it, keep scores,
//! softmax state and accumulators in f32, and round the output once, as they store it.
//!
//! f16 is stored natively (WGSL `f16`, `enable f16;`) on adapters with `SHADER_F16`, and packed
//! two to a `u32` word elsewhere (`unpack2x16float` / `pack2x16float`); see [`HalfForm`]. bf16
//! has no WGSL type: it is always packed two to a word, widened with a shift and stored rounded
//! to nearest, ties to even. Both forms use the same bytes in memory (little-endian halves), so a
//! buffer never depends on the form.
//!
//! The host conversions here ([`f32_to_f16_bits`], [`f32_to_bf16_bits`] and their inverses)
//! round to nearest, ties to even, keep NaN a NaN and overflow to ±∞.

use crate::error::{Error, Result};

/// How one tensor's elements are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the upper half of an f32.
    Bf16,
}

impl Dtype {
    /// Every dtype, f32 first.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Parses a name of [`Dtype::name`]; anything else is an error naming `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Self> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| Error::invalid(field, "one of f32, f16, bf16", s))
    }

    /// `x` rounded to this dtype and widened back (nearest, ties to even).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
            Dtype::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(x)),
        }
    }

    /// `values` in this dtype's little-endian bytes (rounded to nearest, ties to even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&x| f32_to_f16_bits(x).to_le_bytes())
                .collect(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|&x| f32_to_bf16_bits(x).to_le_bytes())
                .collect(),
        }
    }

    /// Little-endian bytes of this dtype widened to f32 (exact). The length must be a multiple
    /// of [`Dtype::size`]; otherwise an error names `field`.
    pub fn decode(self, field: &'static str, bytes: &[u8]) -> Result<Vec<f32>> {
        check_bytes(field, self, bytes.len(), None)?;
        Ok(match self {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The storage dtypes of one call's tensors; any mix is allowed (an f16 K/V cache with f32
/// queries and output, say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Dtypes {
    /// Storage of the queries.
    pub q: Dtype,
    /// Storage of the keys.
    pub k: Dtype,
    /// Storage of the values.
    pub v: Dtype,
    /// Storage of the output.
    pub out: Dtype,
}

impl Dtypes {
    /// Every tensor in f32.
    pub const F32: Dtypes = Dtypes::all(Dtype::F32);

    /// Every tensor in `d`.
    pub const fn all(d: Dtype) -> Self {
        Dtypes {
            q: d,
            k: d,
            v: d,
            out: d,
        }
    }

    /// (field name, dtype) of q, k, v, out.
    pub fn fields(&self) -> [(&'static str, Dtype); 4] {
        [
            ("q", self.q),
            ("k", self.k),
            ("v", self.v),
            ("out", self.out),
        ]
    }

    /// Whether any tensor is stored as f16.
    pub fn any_f16(&self) -> bool {
        self.fields().iter().any(|f| f.1 == Dtype::F16)
    }

    /// `f32` when all four agree, else `q:f16,k:bf16,...`.
    pub fn name(&self) -> String {
        if *self == Dtypes::all(self.q) {
            return self.q.name().to_string();
        }
        self.fields()
            .iter()
            .map(|(f, d)| format!("{f}:{d}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How a kernel stores f16: natively (`f16`, needs the adapter's `SHADER_F16`) or packed two to a
/// `u32` word (every adapter). Chosen when a call is planned: native where the adapter has it,
/// unless the context is told otherwise (`Context::set_half_form`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfForm {
    /// WGSL's `f16` (needs `SHADER_F16`).
    Native,
    /// Two halves per `u32` word, unpacked in the kernel (every adapter).
    Packed,
}

/// The arithmetic of P·V in the fused kernel's row form and in decode: f32 throughout (the
/// default), or
/// f16 weights, V and output accumulators, which halve the accumulator registers and let a GPU
/// pack two halves per register, at the cost of f16 rounding in every product and sum
/// (`Context::set_accumulation`; needs the adapter's `SHADER_F16`). Scores, the softmax's
/// running maximum and sum, and the final division stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Accumulation {
    /// f32 weights, V and accumulators.
    #[default]
    F32,
    /// f16 weights, V and accumulators, with the running maximum offset so that every weight
    /// is at most 1/8 (llama.cpp's f16-accumulating kernels do the same).
    F16,
}

impl Accumulation {
    /// Its name on the command line: `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Accumulation::F32 => "f32",
            Accumulation::F16 => "f16",
        }
    }

    /// The form named `name` (`f32` or `f16`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Accumulation::F32),
            "f16" => Some(Accumulation::F16),
            _ => None,
        }
    }
}

/// Checks that `len` bytes hold whole elements of `d` (and `want` of them, when given).
pub(crate) fn check_bytes(
    field: &'static str,
    d: Dtype,
    len: usize,
    want: Option<usize>,
) -> Result<()> {
    if !len.is_multiple_of(d.size()) {
        return Err(Error::invalid(
            field,
            format!("a whole number of {d} elements ({} bytes each)", d.size()),
            format!("{len} bytes"),
        ));
    }
    if let Some(n) = want
        && len != n * d.size()
    {
        return Err(Error::invalid(
            field,
            format!("{} bytes ({n} {d} values)", n * d.size()),
            format!("{len} bytes ({} {d} values)", len / d.size()),
        ));
    }
    Ok(())
}

/// f32 to IEEE binary16 bits: nearest, ties to even; NaN stays NaN (quiet), overflow gives ±∞,
/// tiny values round to subnormals or ±0.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | if man != 0 { 0x7e00 } else { 0x7c00 };
    }
    // Unbiased exponent; f16 normals have -14..=15.
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7c00;
    }
    if e >= -14 {
        // Normal: keep 10 of 23 mantissa bits, round the 13 dropped.
        let mut h = (((e + 15) as u32) << 10) | (man >> 13);
        let rest = man & 0x1fff;
        if rest > 0x1000 || (rest == 0x1000 && (h & 1) == 1) {
            h += 1; // may carry into the exponent, up to ∞: both correct
        }
        return sign | h as u16;
    }
    if e < -25 {
        return sign; // below half the smallest subnormal
    }
    // Subnormal: value = m · 2^-24 with the implicit bit restored.
    let m = man | 0x80_0000;
    let shift = (-14 - e + 13) as u32; // 14..=24
    let mut h = m >> shift;
    let rest = m & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rest > half || (rest == half && (h & 1) == 1) {
        h += 1;
    }
    sign | h as u16
}

/// IEEE binary16 bits to f32 (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24.
            let x = m as f32 * 2f32.powi(-24);
            return if sign != 0 { -x } else { x };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 to bfloat16 bits: nearest, ties to even; NaN stays NaN (quiet).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bfloat16 bits to f32 (exact: a shift).
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_is_exact_for_every_half() {
        for h in 0..=u16::MAX {
            let x = f16_bits_to_f32(h);
            if x.is_nan() {
                assert!(f16_bits_to_f32(f32_to_f16_bits(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16_bits(x), h, "{h:#06x} = {x}");
            }
        }
    }

    #[test]
    fn f16_rounds_ties_to_even_and_overflows_to_infinity() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to 1 (even).
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3·2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to the even one.
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert_eq!(f32_to_f16_bits(65519.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(-1e9), 0xfc00);
        assert_eq!(f32_to_f16_bits(2f32.powi(-25)), 0); // tie with 0: even
        assert_eq!(f32_to_f16_bits(2f32.powi(-25) * 1.5), 1);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn bf16_rounds_ties_to_even_and_keeps_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn byte_lengths_are_checked() {
        assert_eq!(
            Dtype::F16.decode("q", &[0, 0, 0]).unwrap_err().field(),
            Some("q")
        );
        assert!(check_bytes("k", Dtype::Bf16, 8, Some(4)).is_ok());
        assert_eq!(
            check_bytes("k", Dtype::Bf16, 8, Some(3))
                .unwrap_err()
                .field(),
            Some("k")
        );
    }
}
