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

// f16 bits (the low 16 bits of each component) to f32, exactly, in integer operations: a normal
// half rebiased in place, a subnormal (or zero) as its integer mantissa times 2^-24 (a normal f32,
// so a driver that flushes subnormals loses nothing), Inf and NaN with the f32 exponent set.
// Software drivers build unpack2x16float from many more operations than this.
fn f16_bits_to_f32x4(h: vec4<u32>) -> vec4<f32> {
    let em = h & vec4<u32>(0x7fffu);
    let sign = (h & vec4<u32>(0x8000u)) << vec4<u32>(16u);
    let normal = bitcast<vec4<f32>>(((em << vec4<u32>(13u)) + vec4<u32>(0x38000000u)) | sign);
    // (Through i32: CPU vector units convert signed integers in one instruction.)
    let small = vec4<f32>(vec4<i32>(em)) * 5.9604644775390625e-8;
    let subnormal = bitcast<vec4<f32>>(bitcast<vec4<u32>>(small) | sign);
    let special = bitcast<vec4<f32>>((em << vec4<u32>(13u)) | vec4<u32>(0x7f800000u) | sign);
    return select(select(normal, subnormal, em < vec4<u32>(0x400u)), special,
                  em >= vec4<u32>(0x7c00u));
}

// Eight f16 elements from four words (element 2k in the low half of word k).
fn f16x8_to_f32(w: vec4<u32>) -> array<vec4<f32>, 2> {
    let lo = f16_bits_to_f32x4(w & vec4<u32>(0xffffu));
    let hi = f16_bits_to_f32x4(w >> vec4<u32>(16u));
    return array<vec4<f32>, 2>(vec4<f32>(lo.x, hi.x, lo.y, hi.y), vec4<f32>(lo.z, hi.z, lo.w, hi.w));
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
