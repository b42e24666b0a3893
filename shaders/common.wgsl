// Declarations shared by every kernel family besides the host contract: the masked-score
// sentinel, the NaN test and the window rule (the prefill and decode kernels both call them).
// The contract itself (`struct Params`, the POS_* and BRANCH_* codes, NO_SINK_LOGITS and every
// binding) is generated from src/kernel/abi.rs and prepended by the host.

// Finite stand-in for −∞: WGSL lets implementations assume there are no infinities.
const MASKED: f32 = -1.0e30;

// With f16 accumulation (PV_HALF, the prefill row form and decode) the running maximum carries
// this offset (base-2 units, so every weight is at most 2^-3) to keep the accumulators within
// f16's range, as llama.cpp's FATTN_KQ_MAX_OFFSET does; the running sum carries it too, so
// outputs and log-sum-exp are unchanged.
const PV_OFFSET: f32 = select(0.0, 3.0, PV_HALF);

// NaN test on the bits: WGSL lets compilers assume floats are never NaN, so `x != x` and
// max() cannot be trusted to see one.
fn is_nan_bits(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Which of four keys (indices kk) lie in the sliding window of a query at key index ip.
fn in_window(kk: vec4<i32>, ip: i32) -> vec4<bool> {
    var win = vec4<bool>(true);
    if (params.window_left >= 0) {
        win = win & (kk >= vec4<i32>(ip - params.window_left));
    }
    if (params.window_right >= 0) {
        win = win & (kk <= vec4<i32>(ip + params.window_right));
    }
    return win;
}

// Whether the caller's bias value hides the key: −∞ or at most −1e30 (tested on the bits, since
// WGSL lets compilers assume there are no infinities).
fn bias_masks(b: f32) -> bool {
    let bits = bitcast<u32>(b);
    return (bits >= bitcast<u32>(MASKED)) & (bits <= 0xff800000u);
}
