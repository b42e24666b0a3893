// Declarations shared by every kernel family: the uniform block, the encoding codes and the
// masked-score sentinel. Prepended by the host before position.wgsl and the family's source.
//
// `Params` is declared once here and once in src/kernel.rs: keep in sync (tests/shaders.rs
// compares the layouts).

const POS_NONE: u32 = 0u;
const POS_ROPE: u32 = 1u;
const POS_ALIBI: u32 = 2u;
const POS_XPOS: u32 = 3u;

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
    slope_offset: u32,
    // 1 / ln(train_len) for log-n query scaling; 0 turns it off.
    logn_inv_ln_len: f32,
    _pad2: u32,
}
