// Declarations shared by every kernel family: the uniform block, the encoding codes and the
// masked-score sentinel. Prepended by the host before position.wgsl and the family's source.
//
// `Params` is declared once here and once in src/kernel.rs: keep in sync (tests/shaders.rs
// compares the layouts).

const POS_NONE: u32 = 0u;
const POS_ROPE: u32 = 1u;
const POS_ALIBI: u32 = 2u;
const POS_XPOS: u32 = 3u;
const POS_T5: u32 = 4u;
const POS_KERPLE_LOG: u32 = 5u;
const POS_KERPLE_POWER: u32 = 6u;
const POS_SANDWICH: u32 = 7u;
const POS_FIRE: u32 = 8u;

// Finite stand-in for −∞: WGSL lets implementations assume there are no infinities.
const MASKED: f32 = -1.0e30;

struct Params {
    batch: u32,
    seq_q: u32,
    seq_k: u32,
    num_heads: u32,
    num_kv_heads: u32,
    causal: u32,
    rotary_dim: u32,
    alibi_symmetric: u32,
    scale_log2: f32,
    attn_factor: f32,
    xpos_inv_scale_base: f32,
    scale: f32,
    freq_offset: u32,
    // First aux entry of the per-head bias tables (floats packed four to an entry).
    bias_offset: u32,
    // 1 / ln(train_len) for log-n query scaling; 0 turns it off.
    logn_inv_ln_len: f32,
    // Keys below this index ignore the window (attention sinks).
    sink_tokens: u32,
    // Sliding window on key indices; negative = unbounded.
    window_left: i32,
    window_right: i32,
    // Softcap · log2(e); 0 turns it off.
    softcap_log2: f32,
    // Float index of the per-head sink logits in aux; 0xffffffff = none.
    sink_logit_offset: u32,
    // T5: max_distance; Sandwich: table length; FIRE: MLP width.
    bias_len: u32,
    // FIRE: c and L.
    bias_p0: f32,
    bias_p1: f32,
    // 1 when the caller's bias buffer is bound, with its strides (0 = broadcast).
    user_bias: u32,
    user_bias_stride_b: u32,
    user_bias_stride_h: u32,
    // Second RoPE branch: rule (0 none, 1 |Δ| ≥ w, 2 sink-only keys), query position mode
    // (0 own, 1 zero, 2 cache index), w, and the aux entry of its frequency table.
    branch_rule: u32,
    branch_q_mode: u32,
    branch_w: i32,
    branch_offset: u32,
    _pad0: u32,
    _pad1: u32,
}
