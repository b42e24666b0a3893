//! How a kernel stores a tensor's elements: the WGSL type of its binding and the one accessor
//! through which the kernel reads or writes it. Every kernel family uses this: a kernel names its
//! tensor accessors (`load_q(i) -> f32`, `load_v4(i) -> vec4<f32>`, `store_o4(i, x)`), the
//! variant's [`StorageForm`] per tensor picks the binding type and the accessor's body, and the
//! helpers they call live in shaders/storage.wgsl. So the dtype is a variant constant, not a copy
//! of the kernel.
//!
//! Addressing: an element accessor (`Load1`) takes an element index; a vector accessor (`Load4`,
//! `Store4`) takes the index of a group of four consecutive elements (element 4i..4i+3), as
//! `array<vec4<f32>>` indexing does. Packed forms hold two elements per `u32` word, so a
//! vector binding is `array<vec2<u32>>` and element i sits in word i / 2, half i % 2.

use crate::dtype::{Dtype, HalfForm};

/// A tensor's storage inside a kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StorageForm {
    /// `f32` elements.
    #[default]
    F32,
    /// Native `f16` elements (`enable f16;`, the adapter's `SHADER_F16`).
    F16,
    /// f16 packed two to a `u32` (`unpack2x16float` / `pack2x16float`).
    F16Packed,
    /// bf16 packed two to a `u32`, widened with a shift, stored rounded to nearest even.
    Bf16,
}

/// What an accessor does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accessor {
    /// `fn NAME(i: u32) -> f32`: element i.
    Load1,
    /// `fn NAME(i: u32) -> vec4<f32>`: elements 4i..4i+3.
    Load4,
    /// `fn NAME(i: u32, x: vec4<f32>)`: writes elements 4i..4i+3.
    Store4,
}

impl StorageForm {
    /// The form of `d` given how f16 is stored.
    pub fn of(d: Dtype, half: HalfForm) -> Self {
        match (d, half) {
            (Dtype::F32, _) => StorageForm::F32,
            (Dtype::F16, HalfForm::Native) => StorageForm::F16,
            (Dtype::F16, HalfForm::Packed) => StorageForm::F16Packed,
            (Dtype::Bf16, _) => StorageForm::Bf16,
        }
    }

    /// One letter for variant names: f (f32), h (native f16), p (packed f16), b (bf16).
    pub fn letter(self) -> char {
        match self {
            StorageForm::F32 => 'f',
            StorageForm::F16 => 'h',
            StorageForm::F16Packed => 'p',
            StorageForm::Bf16 => 'b',
        }
    }

    /// Whether the module needs `enable f16;`.
    pub fn native_f16(self) -> bool {
        self == StorageForm::F16
    }

    /// The binding's WGSL type for an accessor kind.
    pub fn binding_type(self, accessor: Accessor) -> &'static str {
        let vector = accessor != Accessor::Load1;
        match (self, vector) {
            (StorageForm::F32, false) => "array<f32>",
            (StorageForm::F32, true) => "array<vec4<f32>>",
            (StorageForm::F16, false) => "array<f16>",
            (StorageForm::F16, true) => "array<vec4<f16>>",
            (StorageForm::F16Packed | StorageForm::Bf16, false) => "array<u32>",
            (StorageForm::F16Packed | StorageForm::Bf16, true) => "array<vec2<u32>>",
        }
    }

    /// The accessor `name` over the binding `buffer`, in WGSL.
    pub fn accessor(self, accessor: Accessor, name: &str, buffer: &str) -> String {
        use Accessor::*;
        use StorageForm::*;
        let body = match (accessor, self) {
            (Load1, F32) => format!("return {buffer}[i];"),
            (Load1, F16) => format!("return f32({buffer}[i]);"),
            (Load1, F16Packed) => format!("return unpack2x16float({buffer}[i >> 1u])[i & 1u];"),
            (Load1, Bf16) => format!(
                "let w = {buffer}[i >> 1u];\n    \
                 return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));"
            ),
            (Load4, F32) => format!("return {buffer}[i];"),
            (Load4, F16) => format!("return vec4<f32>({buffer}[i]);"),
            (Load4, F16Packed) => format!(
                "let w = {buffer}[i];\n    \
                 return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));"
            ),
            (Load4, Bf16) => format!(
                "let w = {buffer}[i];\n    \
                 return vec4<f32>(unpack_bf16x2(w.x), unpack_bf16x2(w.y));"
            ),
            (Store4, F32) => format!("{buffer}[i] = x;"),
            // Vulkan and Metal convert a NaN to a NaN; the NaN cases of the conformance matrix
            // check it on every adapter that runs this form.
            (Store4, F16) => format!("{buffer}[i] = vec4<f16>(x);"),
            (Store4, F16Packed) => {
                format!("{buffer}[i] = vec2<u32>(pack_f16x2(x.xy), pack_f16x2(x.zw));")
            }
            (Store4, Bf16) => {
                format!("{buffer}[i] = vec2<u32>(pack_bf16x2(x.xy), pack_bf16x2(x.zw));")
            }
        };
        let sig = match accessor {
            Load1 => format!("fn {name}(i: u32) -> f32"),
            Load4 => format!("fn {name}(i: u32) -> vec4<f32>"),
            Store4 => format!("fn {name}(i: u32, x: vec4<f32>)"),
        };
        format!("{sig} {{\n    {body}\n}}\n")
    }
}

/// The fused kernel's tensors: binding, accessor name and kind, in `[q, k, v, out]` order.
pub const FUSED_TENSORS: [(&str, &str, Accessor); 4] = [
    ("q_buf", "load_q", Accessor::Load1),
    ("k_buf", "load_k", Accessor::Load1),
    ("v_buf", "load_v4", Accessor::Load4),
    ("o_buf", "store_o4", Accessor::Store4),
];

/// The decode kernel's tensors, as [`FUSED_TENSORS`]: whole vec4s at a time (the cache's keys
/// and values, the queries, the output).
pub const DECODE_TENSORS: [(&str, &str, Accessor); 4] = [
    ("q_buf", "q_at4", Accessor::Load4),
    ("k_cache", "k_at4", Accessor::Load4),
    ("v_cache", "v_at4", Accessor::Load4),
    ("o_buf", "o_put4", Accessor::Store4),
];

/// The tensor table of a kernel family, or none (the unfused baseline stores f32 only).
pub fn family_tensors(
    family: super::abi::Family,
) -> Option<&'static [(&'static str, &'static str, Accessor); 4]> {
    match family {
        super::abi::Family::Fused => Some(&FUSED_TENSORS),
        super::abi::Family::Decode => Some(&DECODE_TENSORS),
        super::abi::Family::Unfused => None,
    }
}
