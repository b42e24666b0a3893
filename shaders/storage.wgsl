// Element storage shared by every kernel: how an element stored as f16 or bf16 becomes an f32
// and back. Each kernel reads and writes its tensors only through accessors generated per binding
// from src/kernel/storage.rs (`load_q`, `load_v4`, `store_o4`, ...), whose bodies use these
// helpers; the binding's WGSL type and the accessor depend on the storage form, a variant
// constant, so a kernel's source never changes with the dtype.
//
// Packed forms hold two elements per u32 word, the lower-indexed one in the low half (the bytes
// of little-endian halves, so a buffer reads the same in the native and the packed form).

// NaN test on the bits (WGSL lets compilers assume floats are never NaN).
fn storage_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// bf16 is the upper half of an f32: widening is a shift.
fn unpack_bf16x2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// f32 to bf16 bits, rounded to nearest, ties to even; a NaN stays a (quiet) NaN.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (storage_nan(x)) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn pack_bf16x2(x: vec2<f32>) -> u32 {
    return bf16_bits(x.x) | (bf16_bits(x.y) << 16u);
}

// pack2x16float with NaN kept NaN (WGSL leaves the conversion of a NaN indeterminate).
fn pack_f16x2(x: vec2<f32>) -> u32 {
    let w = pack2x16float(x);
    let lo = select(w & 0xffffu, 0x7e00u, storage_nan(x.x));
    let hi = select(w >> 16u, 0x7e00u, storage_nan(x.y));
    return lo | (hi << 16u);
}
