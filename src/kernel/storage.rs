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
    /// `fn NAME(j: u32) -> Vec4Pair`: elements 8j..8j+7 in one 16-byte load per lane where the
    /// storage is half (two in f32), and beside it `NAME4(i) -> vec4<f32>` (NAME with its
    /// last character `8` made `4`) on the same binding. The decode kernel's cache reads.
    Load8,
    /// `fn NAME(i: u32) -> f32`, element i, and beside it `NAME4(i) -> vec4<f32>`, elements
    /// 4i..4i+3, on one vector binding (as `Load4`'s). The fused kernel's Q and K reads: whole
    /// chunks of a row where it can, single elements where RoPE pairs straddle chunks.
    Load1And4,
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
        if accessor == Accessor::Load8 {
            // Half forms read 8 elements as one vec4<u32> (native f16 too).
            return match self {
                StorageForm::F32 => "array<vec4<f32>>",
                _ => "array<vec4<u32>>",
            };
        }
        let vector = accessor != Accessor::Load1;
        // (Load1And4 binds as Load4.)
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
        if accessor == Load8 {
            return self.accessor8(name, buffer);
        }
        if accessor == Load1And4 {
            return self.accessor1and4(name, buffer);
        }
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
            (Load8 | Load1And4, _) => unreachable!("accessor8, accessor1and4"),
        };
        let sig = match accessor {
            Load1 => format!("fn {name}(i: u32) -> f32"),
            Load4 => format!("fn {name}(i: u32) -> vec4<f32>"),
            Store4 => format!("fn {name}(i: u32, x: vec4<f32>)"),
            Load8 | Load1And4 => unreachable!("accessor8, accessor1and4"),
        };
        format!("{sig} {{\n    {body}\n}}\n")
    }

    /// The `Load1And4` pair of accessors: `NAME4(i)`, the `Load4` accessor, and `NAME(i)`,
    /// element i of the same vector binding.
    fn accessor1and4(self, name: &str, buffer: &str) -> String {
        use StorageForm::*;
        let one = match self {
            F32 => format!("return {buffer}[i >> 2u][i & 3u];"),
            F16 => format!("return f32({buffer}[i >> 2u][i & 3u]);"),
            F16Packed => {
                format!("return unpack2x16float({buffer}[i >> 2u][(i >> 1u) & 1u])[i & 1u];")
            }
            Bf16 => format!(
                "let w = {buffer}[i >> 2u][(i >> 1u) & 1u];\n    \
                 return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));"
            ),
        };
        format!(
            "fn {name}(i: u32) -> f32 {{\n    {one}\n}}\n{}",
            self.accessor(Accessor::Load4, &format!("{name}4"), buffer)
        )
    }

    /// The `Load8` pair of accessors: `NAME(j)`, elements 8j..8j+7, and `NAME4(i)`, elements
    /// 4i..4i+3, over a binding of [`StorageForm::binding_type`]`(Load8)`.
    fn accessor8(self, name: &str, buffer: &str) -> String {
        use StorageForm::*;
        let name4 = format!("{}4", name.strip_suffix('8').unwrap_or(name));
        let (body8, body4) = match self {
            F32 => (
                format!("return Vec4Pair({buffer}[2u * j], {buffer}[2u * j + 1u]);"),
                format!("return {buffer}[i];"),
            ),
            // Native f16 is read as words too: one 16-byte read per 8 halves, where a vec4<f16>
            // read moves 8 bytes (a CPU adapter pays per read, whatever its width); the halves
            // are widened in integer operations (storage.wgsl).
            F16 | F16Packed => (
                format!("let x = f16x8_to_f32({buffer}[j]);\n    return Vec4Pair(x[0], x[1]);"),
                format!(
                    "let w = {buffer}[i >> 1u];\n    let h = select(w.xy, w.zw, (i & 1u) == 1u);\n    \
                     return f16_bits_to_f32x4(vec4<u32>(h.x, h.x >> 16u, h.y, h.y >> 16u) & \
                     vec4<u32>(0xffffu));"
                ),
            ),
            Bf16 => (
                format!(
                    "let w = {buffer}[j];\n    return Vec4Pair(vec4<f32>(unpack_bf16x2(w.x), \
                     unpack_bf16x2(w.y)), vec4<f32>(unpack_bf16x2(w.z), unpack_bf16x2(w.w)));"
                ),
                format!(
                    "let w = {buffer}[i >> 1u];\n    let h = select(w.xy, w.zw, (i & 1u) == 1u);\n    \
                     return vec4<f32>(unpack_bf16x2(h.x), unpack_bf16x2(h.y));"
                ),
            ),
        };
        // The first word of unit j, for a read ahead that brings its cache line in early.
        let touch = match self {
            F32 => format!("return bitcast<u32>({buffer}[2u * j].x);"),
            _ => format!("return {buffer}[j].x;"),
        };
        let base = name.strip_suffix("_at8").unwrap_or(name);
        let name_touch = format!("{base}_touch");
        // Units of 8 elements in a 64-byte cache line.
        let per_line = if self == F32 { 2 } else { 4 };
        let per_line_name = format!("{}_UNITS_PER_LINE", base.to_uppercase());
        format!(
            "fn {name}(j: u32) -> Vec4Pair {{\n    {body8}\n}}\n\
             fn {name4}(i: u32) -> vec4<f32> {{\n    {body4}\n}}\n\
             fn {name_touch}(j: u32) -> u32 {{\n    {touch}\n}}\n\
             const {per_line_name}: u32 = {per_line}u;\n"
        )
    }
}

/// The fused kernel's tensors: binding, accessor name and kind, in `[q, k, v, out]` order.
pub const FUSED_TENSORS: [(&str, &str, Accessor); 4] = [
    ("q_buf", "load_q", Accessor::Load1And4),
    ("k_buf", "load_k", Accessor::Load1And4),
    ("v_buf", "load_v4", Accessor::Load4),
    ("o_buf", "store_o4", Accessor::Store4),
];

/// The decode kernel's tensors, as [`FUSED_TENSORS`]: the queries and the output a vec4 at a
/// time, the cache's keys and values 8 channels (a lane's unit) at a time, the keys also a
/// vec4 at a time (RoPE partners held by another lane).
pub const DECODE_TENSORS: [(&str, &str, Accessor); 4] = [
    ("q_buf", "q_at4", Accessor::Load4),
    ("k_cache", "k_at8", Accessor::Load8),
    ("v_cache", "v_at8", Accessor::Load8),
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
