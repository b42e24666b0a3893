// Fused forward attention with the position encoding applied inside the kernel.
//
// FlashAttention-2 style: one workgroup owns BLOCK_Q query rows of one (batch, head); each
// invocation owns ROWS of them (rows slot, slot + SLOTS, ...), held rotated and pre-scaled in
// registers, with their output accumulators. ROWS > 1 makes every K or V value read from
// workgroup memory feed ROWS rows: CPU adapters gather those reads lane by lane, so it pays
// there; GPUs run ROWS = 1 to keep registers low. With LANES > 1 (the lane-split form), LANES
// invocations share each row slot and split the head dimension between them: each holds
// HEAD_DIM / LANES channels of its rows' queries and accumulators (a register tile of ROWS rows
// by those channels), and the lanes sum their partial scores by subgroup shuffles or through
// workgroup memory, so that no invocation holds a whole row (on a GPU, a row of 128 channels
// and its accumulator spill registers). The workgroup walks the keys in tiles of BLOCK_K: each
// tile of K (rotated on load) and V is staged in workgroup memory, and the invocation folds the
// tile into its accumulator four keys at a time with an online softmax in base 2 (one rescale per four keys). No rotated
// Q/K, score or bias matrix ever reaches device memory.
//
// Code shape matters on software drivers: llvmpipe turns a shader with barriers into a
// coroutine, and LLVM's coroutine splitting grows much faster than linearly with the code between
// barriers. So the rotation code appears once (queries are rotated through workgroup memory by
// the same loop shape as keys), and only the per-channel loops over one group of keys are
// expanded. Staging reads and writes whole vec4s (stage_rows_vec), since llvmpipe performs
// every read or write at a per-invocation address as a loop over its lanes.
//
// Score-tile forms (MMA != 0; src/kernel/variants.rs, ScoreTile): Q and K are staged rounded
// to f16 (the whole BLOCK_Q-row Q tile once, then each K tile), and after each K tile's barrier
// the workgroup forms the BLOCK_Q × BLOCK_K score tile in workgroup memory at once, through
// cooperative matrices (MMA 8 or 16: 8×8 or 16×16 f16 fragments, f32 accumulation, fragments
// split over the subgroups) or plain loops that do the same arithmetic (MMA 1, emulated, for
// adapters without them). Each invocation then reads its rows' scores instead of forming dot
// products, and everything after the product (biases, masks, softcap, the online softmax and
// P·V) is the code of the row form, so every encoding, mask and bias works in both. The
// functions mma_put_q, mma_put_k, mma_product and mma_score and their arrays are generated per
// form (src/kernel/source.rs); the row form gets empty stubs and no arrays.
//
// Masks (causal, sliding window, attention sinks), the softcap, per-head sink logits, a caller
// bias and the table-driven biases (T5, KERPLE, Sandwich, FIRE) act per score; key tiles that
// the masks hide from the whole workgroup are never visited. The two-branch variant
// (TWO_BRANCH) holds a second rotation of each query row and a second K tile and picks one of
// the two scores per key: ReRoPE's clamped distance, LM-Infinite's distance limit and
// StreamingLLM's cache-index positions.
//
// The host prepends the variant constants (see src/kernel/variants.rs, `KernelKey::wgsl_header`):
//   HEAD_DIM, BLOCK_Q, BLOCK_K, ROWS, POS_KIND, TWO_BRANCH, K_TILES,
// and expands every loop marked `@unroll` into straight-line copies with a constant index, so no
// private array is ever indexed dynamically (Mesa's GL path turns such indexing into branch
// ladders; every driver keeps constant-indexed arrays in registers).
// The bindings, `Params` and the codes come from src/kernel/abi.rs (generated declarations).
// Tensors are read and written only through load_q, load_k, load_v4, store_o4 (and store_lse), generated for
// the variant's storage forms (f32, f16, packed f16, bf16) by src/kernel/storage.rs.
// The hook glue comes last (src/encoding/custom.rs): CUSTOM_SCORE, CUSTOM_MASK, CUSTOM_TILES,
// CUSTOM_ROTATE and the wrappers pa_score4, pa_mask4, pa_tile, pa_rotate, which a custom scheme's
// variant routes to its snippet and every other variant makes identities (folded away).


const HEAD_VEC: u32 = HEAD_DIM / 4u;
// The shared tile reads (TILE_SHARE, a variant constant: the key group's vec4s read once per
// subgroup, see the key loop); TS1 keeps the constant expressions of the other variants defined.
const TS1: u32 = max(TILE_SHARE, 1u);
// Vec4s of a key group each invocation of a sharing subgroup reads (also an unroll bound).
const TILE_LOADS: u32 = select(1u, HEAD_DIM / TS1, TILE_SHARE > 0u);
// Invocations that share a query row (the variant's LANES): lane j holds vec4s j, j + LANES, ...
// of the row's query and accumulator (LVEC of them), forms partial dot products over them, and
// the row's lanes sum the partials (lane_sum4: subgroup operations, or workgroup memory when
// LANE_REDUCE is 0). One lane per row in the ordinary form.
const LVEC: u32 = HEAD_VEC / LANES;
// Row slots per workgroup (each ROWS rows), and invocations.
const SLOTS: u32 = BLOCK_Q / ROWS;
const WG_SIZE: u32 = SLOTS * LANES;
const LANE_WG: bool = LANES > 1u && LANE_REDUCE == 0u;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;


// K_TILES tiles of keys (the second one rotated for the second branch), then one of values.
// The score-tile forms (MMA != 0) stage Q and K through their own arrays (mma_put_q,
// mma_put_k) and leave k_tile at one element (K_TILE_LEN).
var<workgroup> k_tile: array<vec4<f32>, K_TILE_LEN>;
// The P·V tile product forms (PV_MMA) stage V through their own array (mma_put_v) and leave
// v_tile at one element (V_TILE_LEN). pv4 and pv_t are the row form's P·V types (generated per
// variant, src/kernel/source.rs): vec4<f32> and f32, or vec4<f16> and f16 with f16
// accumulation (PV_HALF), whose V tile, weights and accumulators are then f16.
var<workgroup> v_tile: array<pv4, V_TILE_LEN>;
// Q_SHARED: each invocation's query vec4s in workgroup memory instead of registers, vec4 i of
// invocation lid at i · WG_SIZE + lid (consecutive invocations read consecutive vec4s); one
// element elsewhere (Q_TILE_LEN). Only its own invocation reads what it wrote, so no barrier
// guards it.
var<workgroup> q_tile: array<vec4<f32>, Q_TILE_LEN>;
// The workgroup-memory lane reduction (LANE_WG) keeps each invocation's four partial scores per
// row in an array of its own, reached through lane_red_put and lane_red_get (generated per
// variant, src/kernel/source.rs; other variants get stubs and no array, since WebGPU counts
// every declared workgroup array against its 16 KiB).

const ROTATES: bool = POS_KIND == POS_ROPE || POS_KIND == POS_XPOS || CUSTOM_ROTATE;
const TABLE_BIAS: bool = POS_KIND == POS_TABLE || POS_KIND == POS_T5 || POS_KIND == POS_KERPLE;
const KPOS: bool = POS_KIND == POS_ALIBI || TABLE_BIAS || TWO_BRANCH || CUSTOM_SCORE || CUSTOM_MASK;
const K2: u32 = BLOCK_K * HEAD_VEC;
// The P·V tile product forms' output slice, in vec4s per row.
const PV_VEC: u32 = PV_CH / 4u;

// The vector staging form, for every one-branch variant without a custom rotation: stage_rows
// with each invocation taking whole vec4 chunks of channels. Chunk c of a row is read as one
// vec4, with the vec4 of its RoPE partners (the chunk itself swizzled in the interleaved layout,
// the chunk rotary_dim / 8 away in the half layout, or four single reads when rotary_dim / 2 is
// not a multiple of 4), rotated four channels at once and written as one vec4. Invocation lid
// keeps chunks lid % ST_JW + m · ST_JW of rows lid / ST_JW, + ST_RSTEP, ..., so it reads each
// chunk's four frequency entries once per tile, not once per row: a CPU adapter performs every
// read with a per-invocation address as a loop over its lanes, so the number of reads decides
// the staging's cost there, and a GPU gets 16-byte reads of consecutive words.
const VEC_STAGE: bool = !TWO_BRANCH && !CUSTOM_ROTATE;
const ST_JW: u32 = min(WG_SIZE, HEAD_VEC);
const ST_RSTEP: u32 = WG_SIZE / ST_JW;
const ST_M: u32 = (HEAD_VEC + ST_JW - 1u) / ST_JW;

fn stage_rows_vec(from_q: bool, lid: u32, batch: u32, head: u32, row0: u32, rows: u32,
                  origin: i32, q_mul: f32, dst_row0: u32) {
    let seq = select(params.seq_k, params.seq_q, from_q);
    let heads = select(params.num_kv_heads, params.num_heads, from_q);
    let r = select(0u, params.rotary_dim, ROTATES);
    let half_r = r / 2u;
    let inter = params.rope_interleaved != 0u;
    // Whether a chunk's partners are one aligned vec4 (or the chunk itself).
    let aligned = inter | (half_r % 4u == 0u);
    let sign = select(-1.0, 1.0, from_q);
    let t0 = lid / ST_JW;
    for (var m = 0u; m < ST_M; m++) {
        let chunk = lid % ST_JW + m * ST_JW;
        if (chunk >= HEAD_VEC || t0 >= ST_RSTEP) {
            break;
        }
        let c0 = 4u * chunk;
        let cc = vec4<u32>(c0) + vec4<u32>(0u, 1u, 2u, 3u);
        let rot = cc < vec4<u32>(r);
        // Per channel: its rotation pair, the channel it pairs with, and whether it is the
        // pair's first channel (x_a cos − x_b sin) or second (x_b cos + x_a sin).
        var first = (cc & vec4<u32>(1u)) == vec4<u32>(0u);
        var pair = cc / 2u;
        var partner = cc ^ vec4<u32>(1u);
        if (!inter) {
            first = cc < vec4<u32>(half_r);
            pair = select(cc - vec4<u32>(half_r), cc, first);
            partner = select(cc - vec4<u32>(half_r), cc + vec4<u32>(half_r), first);
        }
        pair = select(vec4<u32>(0u), pair, rot);
        partner = select(cc, partner, rot);
        let sgn = select(vec4<f32>(1.0), vec4<f32>(-1.0), first);
        var fx = vec4<f32>(0.0);
        var fy = vec4<f32>(0.0);
        var fz = vec4<f32>(0.0);
        var fw = vec4<f32>(0.0);
        if (ROTATES) {
            let f0 = aux[params.freq_offset + pair.x];
            let f1 = aux[params.freq_offset + pair.y];
            let f2 = aux[params.freq_offset + pair.z];
            let f3 = aux[params.freq_offset + pair.w];
            fx = vec4<f32>(f0.x, f1.x, f2.x, f3.x);
            fy = vec4<f32>(f0.y, f1.y, f2.y, f3.y);
            fz = vec4<f32>(f0.z, f1.z, f2.z, f3.z);
            fw = vec4<f32>(f0.w, f1.w, f2.w, f3.w);
        }
        for (var t = t0; t < BLOCK_K; t += ST_RSTEP) {
            let src_row = row0 + t;
            var y = vec4<f32>(0.0);
            if (src_row < rows) {
                let base = ((batch * seq + src_row) * heads + head) * HEAD_DIM;
                let pos = select(pos_k[batch * seq + src_row], pos_q[batch * seq + src_row], from_q);
                var x: vec4<f32>;
                if (from_q) {
                    x = load_q4((base + c0) / 4u);
                } else {
                    x = load_k4((base + c0) / 4u);
                }
                y = x;
                if (ROTATES && c0 < r) {
                    var p = x.yxwz;
                    if (!inter) {
                        if (aligned) {
                            if (from_q) {
                                p = load_q4((base + partner.x) / 4u);
                            } else {
                                p = load_k4((base + partner.x) / 4u);
                            }
                        } else if (from_q) {
                            p = vec4<f32>(load_q(base + partner.x), load_q(base + partner.y),
                                          load_q(base + partner.z), load_q(base + partner.w));
                        } else {
                            p = vec4<f32>(load_k(base + partner.x), load_k(base + partner.y),
                                          load_k(base + partner.z), load_k(base + partner.w));
                        }
                    }
                    let cs = sincos_turns4(rope_turns4(pos, fx, fy, fz));
                    var c = cs[0] * params.attn_factor;
                    var sn = cs[1] * params.attn_factor;
                    if (POS_KIND == POS_XPOS) {
                        let sc = exp2(fw * (sign * f32(pos - origin) * params.xpos_inv_scale_base));
                        c *= sc;
                        sn *= sc;
                    }
                    y = select(x, x * c + (sgn * p) * sn, rot);
                }
                y *= select(q_mul, q_mul * logn_scale(pos), from_q);
            }
            if (MMA != 0u) {
                let m0 = (dst_row0 + t) * HEAD_DIM + c0;
                if (from_q) {
                    mma_put_q(m0, y.x);
                    mma_put_q(m0 + 1u, y.y);
                    mma_put_q(m0 + 2u, y.z);
                    mma_put_q(m0 + 3u, y.w);
                } else {
                    mma_put_k(m0, y.x);
                    mma_put_k(m0 + 1u, y.y);
                    mma_put_k(m0 + 2u, y.z);
                    mma_put_k(m0 + 3u, y.w);
                }
            } else {
                k_tile[(t * HEAD_DIM + c0) / 4u] = y;
            }
        }
    }
}

// Stages one tile into k_tile: BLOCK_K rows of Q (rotated, times `q_mul`) when `from_q`, else of
// K (rotated), starting at `row0`, rows past `rows` zero. Work is split by channel pairs so that
// the rotation code exists once and each pair's angle is computed once. With TWO_BRANCH, keys
// fill both tiles (the second with the branch rotation) and `branch_q` stages the queries'
// branch rotation instead of the ordinary one.
fn stage_rows(from_q: bool, branch_q: bool, lid: u32, batch: u32, head: u32, row0: u32, rows: u32,
              origin: i32, q_mul: f32, dst_row0: u32) {
    if (VEC_STAGE) {
        stage_rows_vec(from_q, lid, batch, head, row0, rows, origin, q_mul, dst_row0);
        return;
    }
    let seq = select(params.seq_k, params.seq_q, from_q);
    let heads = select(params.num_kv_heads, params.num_heads, from_q);
    let half_d = HEAD_DIM / 2u;
    let r = select(0u, params.rotary_dim, ROTATES);
    let tiles = select(K_TILES, 1u, from_q);
    let diag = i32(params.seq_k) - i32(params.seq_q);
    for (var idx = lid; idx < tiles * BLOCK_K * half_d; idx += WG_SIZE) {
        let tile = idx / (BLOCK_K * half_d);
        let t_row = (idx / half_d) % BLOCK_K;
        let slot = idx % half_d;
        let src_row = row0 + t_row;
        let branch = (TWO_BRANCH & (tile == 1u)) | branch_q;
        // Pair slots below r/2 rotate; the others carry two pass-through channels.
        var ch = vec2<u32>(r + 2u * (slot - r / 2u), r + 2u * (slot - r / 2u) + 1u);
        if (slot < r / 2u) {
            ch = rope_pair_channels(slot, r);
        }
        var y = vec2<f32>(0.0);
        if (src_row < rows) {
            let base = ((batch * seq + src_row) * heads + head) * HEAD_DIM;
            let pos = select(pos_k[batch * seq + src_row], pos_q[batch * seq + src_row], from_q);
            var x: vec2<f32>;
            if (from_q) {
                x = vec2<f32>(load_q(base + ch.x), load_q(base + ch.y));
            } else {
                x = vec2<f32>(load_k(base + ch.x), load_k(base + ch.y));
            }
            y = x;
            if (slot < r / 2u) {
                if (TWO_BRANCH && branch) {
                    var bpos = pos;
                    if (from_q && params.branch_q_mode == BRANCH_Q_ZERO) {
                        bpos = 0;
                    } else if (from_q && params.branch_q_mode == BRANCH_Q_CACHE_INDEX) {
                        // StreamingLLM: the query's index in the rolling cache of sinks and
                        // window, min(i', sinks + left); keys keep their positions.
                        let ip = i32(src_row) + diag;
                        bpos = pos - max(0, ip - i32(params.sink_tokens) - params.window_left);
                    }
                    y = rope_rotate_branch(x, slot, bpos, from_q);
                } else {
                    y = rope_rotate(x, slot, pos, pos - origin, select(-1.0, 1.0, from_q));
                }
            }
            y *= select(q_mul, q_mul * logn_scale(pos), from_q);
        }
        if (MMA != 0u) {
            // The score-tile forms: Q rows at dst_row0 + t_row of the Q tile, keys in the K tile.
            let m0 = (dst_row0 + t_row) * HEAD_DIM;
            if (from_q) {
                mma_put_q(m0 + ch.x, y.x);
                mma_put_q(m0 + ch.y, y.y);
            } else {
                mma_put_k(m0 + ch.x, y.x);
                mma_put_k(m0 + ch.y, y.y);
            }
        } else {
            let e0 = tile * BLOCK_K * HEAD_DIM + t_row * HEAD_DIM + ch.x;
            let e1 = tile * BLOCK_K * HEAD_DIM + t_row * HEAD_DIM + ch.y;
            k_tile[e0 / 4u][e0 % 4u] = y.x;
            k_tile[e1 / 4u][e1 % 4u] = y.y;
        }
    }
}



// The four dot products whose lanes are in a, b, c, d.
fn lane_sums(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) -> vec4<f32> {
    return vec4<f32>((a.x + a.y) + (a.z + a.w), (b.x + b.y) + (b.z + b.w),
                     (c.x + c.y) + (c.z + c.w), (d.x + d.y) + (d.z + d.w));
}

fn alibi_bias4(slope: f32, m: i32, n: vec4<i32>, sym: bool) -> vec4<f32> {
    return vec4<f32>(alibi_bias(slope, m, n.x, sym), alibi_bias(slope, m, n.y, sym),
                     alibi_bias(slope, m, n.z, sym), alibi_bias(slope, m, n.w, sym));
}

@compute @workgroup_size(WG_SIZE)
fn attention_fused(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    // @score-tile-builtins
) {
    // @score-tile-ids
    let lane = lid % LANES;
    let slot = lid / LANES;
    let head = wg.y;
    let batch = wg.z;
    let kv_head = head / (params.num_heads / params.num_kv_heads);
    let first_row = wg.x * BLOCK_Q;
    let last_row = min(first_row + BLOCK_Q, params.seq_q) - 1u;
    // Query row r sits at key index r + diag (bottom-right alignment of the masks).
    let diag = i32(params.seq_k) - i32(params.seq_q);
    let first_ip = i32(first_row) + diag;
    let last_ip = i32(last_row) + diag;
    // xPos origin: the first query of the tile, so that per-token scales stay near 1.
    let origin = pos_q[batch * params.seq_q + first_row];

    var slope = 0.0;
    if (POS_KIND == POS_ALIBI) {
        slope = aux[params.bias_offset + head / 4u][head % 4u] * LOG2E;
    }
    let sym = params.alibi_symmetric != 0u;
    let left = params.window_left;
    let right = params.window_right;
    let sinks = i32(params.sink_tokens);
    let capped = params.softcap_log2 != 0.0;
    let cap = params.softcap_log2;
    let has_bias = params.user_bias != 0u;
    let bias_base = batch * params.user_bias_stride_b + head * params.user_bias_stride_h;
    // A NaN built at run time (WGSL forbids a constant expression that evaluates to NaN, and a
    // function variable is never one): NaN rows' outputs, and the P·V tile product forms' hidden
    // keys' scores.
    var qnan_bits = 0x7fc00000u;
    let qnan = bitcast<f32>(qnan_bits);

    // Per row: its index, position, query (rotated, times scale · log2 e), accumulator, running
    // max and sum, and whether a NaN score was seen at a visible key (then the row is NaN, as in
    // a plain softmax). A sink logit starts the running max and sum (exp of itself relative to
    // itself is 1) and adds nothing to the accumulator.
    var m0 = MASKED;
    var l0 = 0.0;
    if (params.sink_logit_offset != NO_SINK_LOGITS) {
        m0 = aux_f(params.sink_logit_offset + head) * LOG2E + PV_OFFSET;
        l0 = exp2(-PV_OFFSET);
    }
    var rows: array<u32, ROWS>;
    var qpos: array<i32, ROWS>;
    // Branch br's rotation of row r at (br · ROWS + r) · LVEC (K_TILES branches; this lane's
    // vec4s of it).
    // (One element with Q_SHARED, where the queries live in q_tile.)
    var q: array<vec4<f32>, select(K_TILES * ROWS * LVEC, 1u, Q_SHARED)>;
    var acc: array<pv4, ROWS * LVEC>;
    var m_run: array<f32, ROWS>;
    var l_run: array<f32, ROWS>;
    var row_nan: array<bool, ROWS>;
    // @unroll
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = first_row + r * SLOTS + slot;
        qpos[r] = pos_q[batch * params.seq_q + min(rows[r], params.seq_q - 1u)];
        m_run[r] = m0;
        l_run[r] = l0;
        row_nan[r] = false;
        // @unroll
        for (var c = 0u; c < LVEC; c++) {
            acc[r * LVEC + c] = pv4(0.0);
        }
    }

    // The key tiles any row of the workgroup can see: the sink tiles, then the window's (or
    // every tile up to the causal bound). Tiles outside both are never loaded.
    var hi = i32(params.seq_k);
    if (params.causal != 0u) {
        hi = min(hi, last_ip + 1);
    }
    let sink_hi = clamp(min(sinks, hi), 0, i32(params.seq_k));
    if (right >= 0) {
        hi = min(hi, last_ip + right + 1);
    }
    hi = max(hi, 0);
    var lo = 0;
    if (left >= 0) {
        lo = clamp(first_ip - left, 0, hi);
    }
    let n_sink_tiles = (u32(sink_hi) + BLOCK_K - 1u) / BLOCK_K;
    let win_t0 = max(u32(lo) / BLOCK_K, n_sink_tiles);
    let win_t1 = max((u32(hi) + BLOCK_K - 1u) / BLOCK_K, win_t0);
    let n_tiles = n_sink_tiles + win_t1 - win_t0;

    // Steps 0..q_rounds stage the workgroup's query rows (rotated, times scale · log2 e)
    // through k_tile, BLOCK_K rows at a time, and each invocation copies its rows to registers
    // (twice with TWO_BRANCH: ordinary, then branch rotation); the steps after that walk the key
    // tiles. One loop, so the staging code exists once.
    let q_steps = BLOCK_Q / BLOCK_K;
    let q_rounds = q_steps * select(1u, 2u, TWO_BRANCH);
    for (var step = 0u; step < q_rounds + n_tiles; step++) {
        let is_q = step < q_rounds;
        let t = step - select(q_rounds, 0u, is_q);
        let tile = select(win_t0 + t - n_sink_tiles, t, t < n_sink_tiles);
        let key0 = tile * BLOCK_K;
        let q_branch = is_q & (step >= q_steps);
        let q_step = step % q_steps;
        // A custom scheme's tile predicate (the hook glue, src/encoding/custom.rs): a tile it
        // hides from every row of the workgroup is never loaded; one it shows whole needs no
        // per-key mask. The same for every invocation, so the barriers stay uniform.
        var tile_state = TILE_PARTIAL;
        if (CUSTOM_TILES && !is_q) {
            tile_state = pa_tile(first_row, last_row, key0, min(key0 + BLOCK_K, params.seq_k) - 1u, head);
            if (tile_state == TILE_HIDDEN) {
                continue;
            }
        }
        workgroupBarrier();
        if (is_q) {
            stage_rows(true, q_branch, lid, batch, head, first_row + q_step * BLOCK_K, params.seq_q,
                       origin, params.scale_log2, q_step * BLOCK_K);
        } else {
            stage_rows(false, false, lid, batch, kv_head, key0, params.seq_k, origin, 1.0, 0u);
            for (var idx = lid; idx < BLOCK_K * HEAD_VEC; idx += WG_SIZE) {
                let key = key0 + idx / HEAD_VEC;
                var vv = vec4<f32>(0.0);
                if (key < params.seq_k) {
                    let v_base = ((batch * params.seq_k + key) * params.num_kv_heads + kv_head) * HEAD_VEC;
                    vv = load_v4(v_base + idx % HEAD_VEC);
                }
                if (PV_MMA) {
                    // Keys whose V is not finite in f16 (NaN, ±∞, or beyond f16's range):
                    // a row that hides such a key forms this tile's P·V itself (below).
                    mma_put_v(idx, vv);
                    let big = !(abs(vv) <= vec4<f32>(65504.0));
                    if (any(big)) {
                        pv_flag_keys(1u << (idx / HEAD_VEC));
                    }
                } else {
                    v_tile[idx] = pv4(vv);
                }
            }
        }
        workgroupBarrier();
        if (is_q && MMA != 0u) {
            // The score-tile forms keep the staged Q tile in workgroup memory.
            continue;
        }
        if (MMA != 0u) {
            // The tile's scores, every row of the workgroup against every key, at once (through
            // cooperative matrices or their emulation) into workgroup memory.
            mma_product(sg_id, n_sg, lid);
            workgroupBarrier();
        }
        if (is_q) {
            // Step: copy this invocation's staged query rows of branch `br` to registers.
            // @unroll
            for (var br = 0u; br < K_TILES; br++) {
                if (select(0u, 1u, q_branch) == br) {
                    // @unroll
                    for (var r = 0u; r < ROWS; r++) {
                        let local = r * SLOTS + slot;
                        if (local / BLOCK_K == q_step) {
                            let r0 = (local % BLOCK_K) * HEAD_VEC + lane;
                            // @unroll
                            for (var c = 0u; c < LVEC; c++) {
                                let qi = (br * ROWS + r) * LVEC + c;
                                if (Q_SHARED) {
                                    q_tile[qi * WG_SIZE + lid] = k_tile[r0 + c * LANES];
                                } else {
                                    q[qi] = k_tile[r0 + c * LANES];
                                }
                            }
                        }
                    }
                }
            }
            continue;
        }

        // The tile is visible to every row of the workgroup with no per-key test: inside the
        // bounds, before the causal bound, and inside the window or among the sinks.
        let k_last = i32(key0 + BLOCK_K) - 1;
        // Bitwise, not short-circuit, operators: naga turns `&&` and `||` into branches, and
        // llvmpipe's compile time grows with the branches between barriers.
        let tile_in_window = ((left < 0) | (i32(key0) >= last_ip - left))
            & ((right < 0) | (k_last <= first_ip + right));
        let full = (key0 + BLOCK_K <= params.seq_k)
            & ((params.causal == 0u) | (k_last <= first_ip))
            & (tile_in_window | (k_last < sinks))
            & !has_bias
            & (!CUSTOM_MASK | (tile_state == TILE_FULL));

        // The P·V tile product forms: the tile's largest visible score and the keys hidden from
        // this invocation's row (one row per invocation there), one bit each.
        var m_tile = MASKED;
        var hidden = 0u;
        for (var g = 0u; g < BLOCK_K; g += 4u) {
            let kb = g * HEAD_VEC;
            let key = vec4<u32>(key0 + g) + vec4<u32>(0u, 1u, 2u, 3u);
            let kk = vec4<i32>(key);
            var kpos = vec4<i32>(0);
            if (KPOS) {
                let kp = batch * params.seq_k;
                let last = params.seq_k - 1u;
                kpos = vec4<i32>(pos_k[kp + min(key.x, last)], pos_k[kp + min(key.y, last)],
                                 pos_k[kp + min(key.z, last)], pos_k[kp + min(key.w, last)]);
            }
            // Two-branch kernels pick a score per (row, key) from the indices and positions alone,
            // so an invocation computes only the dot products some of its rows and keys use (the
            // rows of an invocation are close, so this is nearly always one of the two).
            var use2: array<vec4<bool>, ROWS>;
            var need1 = true;
            var need2 = false;
            if (TWO_BRANCH) {
                need1 = false;
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    let ip = i32(rows[r]) + diag;
                    var u = (kk < vec4<i32>(sinks)) & !in_window(kk, ip);
                    if (params.branch_rule == BRANCH_RULE_DISTANCE) {
                        u = abs(vec4<i32>(qpos[r]) - kpos) >= vec4<i32>(params.branch_w);
                    }
                    use2[r] = u;
                    need1 = need1 | !all(u);
                    need2 = need2 | any(u);
                }
            }
            // Step: score four keys. For each branch br that some row uses, the lanes of the
            // dot products of keys key0+g .. key0+g+3 with every row: d[4 (br · ROWS + r) + e]
            // holds key e's lanes for row r.
            //
            // With TILE_SHARE (CPU adapters; one branch, one lane per row) the invocations of a
            // subgroup read the key group's 4 · HEAD_VEC vec4s of K and of V between them,
            // TILE_LOADS each (vec4 i of the group: kl[i / TILE_SHARE] of lane i % TILE_SHARE),
            // and hand them round with subgroupBroadcast (`tile_bcast`) at constant lanes. Every
            // invocation of the row form needs the same vec4s, and a CPU adapter runs each
            // workgroup-memory read at a per-invocation address as a loop over its lanes.
            var kl: array<vec4<f32>, TILE_LOADS>;
            var vl: array<vec4<f32>, TILE_LOADS>;
            if (TILE_SHARE > 0u) {
                // @unroll
                for (var m = 0u; m < TILE_LOADS; m++) {
                    kl[m] = k_tile[kb + m * TS1 + sg_lane];
                    vl[m] = vec4<f32>(v_tile[kb + m * TS1 + sg_lane]);
                }
            }
            var d: array<vec4<f32>, K_TILES * ROWS * 4u>;
            // @unroll
            for (var br = 0u; br < K_TILES; br++) {
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    let e = 4u * (br * ROWS + r);
                    d[e] = vec4<f32>(0.0);
                    d[e + 1u] = vec4<f32>(0.0);
                    d[e + 2u] = vec4<f32>(0.0);
                    d[e + 3u] = vec4<f32>(0.0);
                }
                // (A branch of its own: subgroupBroadcast needs uniform control flow, and the
                // two-branch kernels' condition below is not.)
                if (TILE_SHARE > 0u) {
                    // @unroll
                    for (var c = 0u; c < LVEC; c++) {
                        let k0 = tile_bcast(kl[min(c / TS1, TILE_LOADS - 1u)], c % TS1);
                        let k1 = tile_bcast(kl[min((c + HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                            (c + HEAD_VEC) % TS1);
                        let k2 = tile_bcast(kl[min((c + 2u * HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                            (c + 2u * HEAD_VEC) % TS1);
                        let k3 = tile_bcast(kl[min((c + 3u * HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                            (c + 3u * HEAD_VEC) % TS1);
                        // @unroll
                        for (var r = 0u; r < ROWS; r++) {
                            let qc = q[r * LVEC + c];
                            d[4u * r] = fma(qc, k0, d[4u * r]);
                            d[4u * r + 1u] = fma(qc, k1, d[4u * r + 1u]);
                            d[4u * r + 2u] = fma(qc, k2, d[4u * r + 2u]);
                            d[4u * r + 3u] = fma(qc, k3, d[4u * r + 3u]);
                        }
                    }
                } else if (MMA == 0u && select(need1, need2, br == 1u)) {
                    // @unroll
                    for (var c = 0u; c < LVEC; c++) {
                        let kt = br * K2 + kb + c * LANES + lane;
                        let k0 = k_tile[kt];
                        let k1 = k_tile[kt + HEAD_VEC];
                        let k2 = k_tile[kt + 2u * HEAD_VEC];
                        let k3 = k_tile[kt + 3u * HEAD_VEC];
                        // @unroll
                        for (var r = 0u; r < ROWS; r++) {
                            let e = 4u * (br * ROWS + r);
                            let qi = (br * ROWS + r) * LVEC + c;
                            var qc: vec4<f32>;
                            if (Q_SHARED) {
                                qc = q_tile[qi * WG_SIZE + lid];
                            } else {
                                qc = q[qi];
                            }
                            d[e] = fma(qc, k0, d[e]);
                            d[e + 1u] = fma(qc, k1, d[e + 1u]);
                            d[e + 2u] = fma(qc, k2, d[e + 2u]);
                            d[e + 3u] = fma(qc, k3, d[e + 3u]);
                        }
                    }
                }
            }
            // The four scores per row: this lane's partial sums, then the sum over the row's
            // lanes (the same values, added in the same order, in every lane of the row).
            var sp: array<vec4<f32>, ROWS>;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                sp[r] = lane_sums(d[4u * r], d[4u * r + 1u], d[4u * r + 2u], d[4u * r + 3u]);
            }
            if (LANE_WG) {
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    lane_red_put(r * WG_SIZE + lid, sp[r]);
                }
                workgroupBarrier();
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    var t = vec4<f32>(0.0);
                    // @unroll
                    for (var j = 0u; j < LANES; j++) {
                        t += lane_red_get(r * WG_SIZE + slot * LANES + j);
                    }
                    sp[r] = t;
                }
                workgroupBarrier();
            } else if (LANES > 1u) {
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    sp[r] = lane_sum4(sp[r]);
                }
            }
            // Table-driven biases (T5, KERPLE, Sandwich, FIRE) in log2 units, in a loop left
            // rolled: the shared body is large (Sandwich's and FIRE's loops among them), and a
            // copy per row and key made this the slowest variant to compile on llvmpipe (57 s on
            // GL against 18-26 s for the other head-size-64 kernels).
            var tb: array<vec4<f32>, ROWS>;
            if (TABLE_BIAS) {
                for (var r = 0u; r < ROWS; r++) {
                    tb[r] = LOG2E * table_bias4(head, qpos[r], kpos);
                }
            }
            // Softmax weights of the four keys per row; alpha rescales the row's accumulator.
            var p: array<vec4<f32>, ROWS>;
            var alpha: array<f32, ROWS>;
            var vis: array<vec4<bool>, ROWS>;
            var all_vis = true;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                // Step: update the softmax with the four scores.
                var s = sp[r];
                if (MMA != 0u) {
                    let si = (r * SLOTS + slot) * BLOCK_K + g;
                    s = vec4<f32>(mma_score(si), mma_score(si + 1u), mma_score(si + 2u),
                                  mma_score(si + 3u));
                }
                let m = qpos[r];
                let ip = i32(rows[r]) + diag;
                let win = in_window(kk, ip);
                let sink = kk < vec4<i32>(sinks);
                if (TWO_BRANCH) {
                    // The last branch's block (the second one here; written so that the index
                    // stays in bounds in the one-branch variant, where this is dead code).
                    let e = 4u * ((K_TILES - 1u) * ROWS + r);
                    s = select(s, lane_sums(d[e], d[e + 1u], d[e + 2u], d[e + 3u]), use2[r]);
                }
                // Softcap on the scaled logits, before any bias (softcap4 in position.wgsl).
                if (capped) {
                    s = softcap4(s, cap);
                }
                if (POS_KIND == POS_ALIBI) {
                    s += alibi_bias4(slope, m, kpos, sym);
                }
                if (TABLE_BIAS) {
                    s += tb[r];
                }
                // A custom scheme's score_mod (identity in every other variant).
                if (CUSTOM_SCORE) {
                    s = pa_score4(s, m, kpos, head, rows[r], key);
                }
                // Masked keys get p = 0 and their V is never multiplied in, so a NaN there
                // cannot reach the output.
                var v4 = vec4<bool>(true);
                if (!full) {
                    // WGSL requires parentheses where relational and bitwise operators mix.
                    v4 = (key < vec4<u32>(params.seq_k))
                        & (vec4<bool>(params.causal == 0u) | (kk <= vec4<i32>(ip)))
                        & (win | sink);
                    // A custom scheme's mask_mod narrows the built-in masks.
                    if (CUSTOM_MASK) {
                        v4 = v4 & pa_mask4(m, kpos, head, rows[r], key);
                    }
                    if (has_bias) {
                        let row_base = bias_base + min(rows[r], params.seq_q - 1u) * params.seq_k;
                        let last = params.seq_k - 1u;
                        let ub = vec4<f32>(user_bias[row_base + min(key.x, last)],
                                           user_bias[row_base + min(key.y, last)],
                                           user_bias[row_base + min(key.z, last)],
                                           user_bias[row_base + min(key.w, last)]);
                        v4 = v4 & !vec4<bool>(bias_masks(ub.x), bias_masks(ub.y), bias_masks(ub.z),
                                              bias_masks(ub.w));
                        s += select(vec4<f32>(0.0), ub * LOG2E, v4);
                    }
                    s = select(vec4<f32>(MASKED), s, v4);
                }
                vis[r] = v4;
                all_vis = all_vis & all(v4);
                row_nan[r] = row_nan[r] | any(v4 & vec4<bool>(is_nan_bits(s.x), is_nan_bits(s.y),
                                                                is_nan_bits(s.z), is_nan_bits(s.w)));
                if (PV_MMA) {
                    // The final scores back into the score tile, a hidden key's as NaN (a
                    // visible NaN score makes the row NaN anyway); the softmax waits for the
                    // tile's maximum.
                    let si = (r * SLOTS + slot) * BLOCK_K + g;
                    let sv = select(vec4<f32>(qnan), s, v4);
                    mma_set_score(si, sv.x);
                    mma_set_score(si + 1u, sv.y);
                    mma_set_score(si + 2u, sv.z);
                    mma_set_score(si + 3u, sv.w);
                    m_tile = max(m_tile, max(max(s.x, s.y), max(s.z, s.w)));
                    // (WGSL requires parentheses where `|` and `<<` mix.)
                    let hid4 = select(0u, 1u, !v4.x) | select(0u, 2u, !v4.y)
                        | select(0u, 4u, !v4.z) | select(0u, 8u, !v4.w);
                    hidden = hidden | (hid4 << g);
                } else {
                    var s_max = max(max(s.x, s.y), max(s.z, s.w));
                    if (PV_HALF) {
                        s_max += PV_OFFSET;
                    }
                    let m_new = max(m_run[r], s_max);
                    alpha[r] = exp2(m_run[r] - m_new);
                    p[r] = select(vec4<f32>(0.0), exp2(s - vec4<f32>(m_new)), v4);
                    l_run[r] = l_run[r] * alpha[r] + ((p[r].x + p[r].y) + (p[r].z + p[r].w));
                    m_run[r] = m_new;
                }
            }
            if (PV_MMA) {
                continue;
            }
            // Step: accumulate P·V. A masked key has p = 0, but 0 · NaN is NaN, so each row
            // takes the V of a key hidden from it as zero (`keep`; every key is kept when the
            // four are visible to all rows). One copy of the loop: llvmpipe's compile time grows
            // with the unrolled code, and a second copy for partly masked groups cost 30-45 %
            // of a variant's compile.
            var keep: array<vec4<bool>, ROWS>;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                keep[r] = vis[r] | vec4<bool>(all_vis);
            }
            // The weights and rescales in the P·V type (f16 with PV_HALF), once per row.
            var pp: array<pv4, ROWS>;
            var pa: array<pv_t, ROWS>;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                pp[r] = pv4(p[r]);
                pa[r] = pv_t(alpha[r]);
            }
            let z = pv4(0.0);
            // @unroll
            for (var c = 0u; c < LVEC; c++) {
                let vc = kb + c * LANES + lane;
                var v0 = v_tile[vc];
                var v1 = v_tile[vc + HEAD_VEC];
                var v2 = v_tile[vc + 2u * HEAD_VEC];
                var v3 = v_tile[vc + 3u * HEAD_VEC];
                if (TILE_SHARE > 0u) {
                    v0 = pv4(tile_bcast(vl[min(c / TS1, TILE_LOADS - 1u)], c % TS1));
                    v1 = pv4(tile_bcast(vl[min((c + HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                        (c + HEAD_VEC) % TS1));
                    v2 = pv4(tile_bcast(vl[min((c + 2u * HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                        (c + 2u * HEAD_VEC) % TS1));
                    v3 = pv4(tile_bcast(vl[min((c + 3u * HEAD_VEC) / TS1, TILE_LOADS - 1u)],
                                        (c + 3u * HEAD_VEC) % TS1));
                }
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    let pr = pp[r];
                    let kr = keep[r];
                    var a = acc[r * LVEC + c] * pa[r];
                    a = fma(pv4(pr.x), select(z, v0, kr.x), a);
                    a = fma(pv4(pr.y), select(z, v1, kr.y), a);
                    a = fma(pv4(pr.z), select(z, v2, kr.z), a);
                    acc[r * LVEC + c] = fma(pv4(pr.w), select(z, v3, kr.w), a);
                }
            }
        }
        if (PV_MMA) {
            // The tile's softmax weights on one scale (the running maximum after the whole
            // tile), rounded into the P tile, then P·V as a tile product, PV_CH output channels
            // a round through o_part, each row adding its slice to its rescaled accumulator.
            // A row that hides a key whose V is not finite (0 · ∞ would make it NaN) forms the
            // tile's P·V itself instead, from the same rounded V, taking hidden keys' V as zero.
            let si = slot * BLOCK_K;
            let m_new = max(m_run[0], m_tile);
            let a = exp2(m_run[0] - m_new);
            var lsum = 0.0;
            for (var k = 0u; k < BLOCK_K; k++) {
                let sc = mma_score(si + k);
                let pk = select(exp2(sc - m_new), 0.0, is_nan_bits(sc));
                lsum += pk;
                mma_put_p(si + k, pk);
            }
            l_run[0] = l_run[0] * a + lsum;
            m_run[0] = m_new;
            let own = (pv_flagged() & hidden) != 0u;
            workgroupBarrier();
            if (lid == 0u) {
                pv_flags_clear();
            }
            // @unroll
            for (var rd = 0u; rd < PV_ROUNDS; rd++) {
                mma_pv(rd, sg_id, n_sg, lid);
                workgroupBarrier();
                if (!own) {
                    // @unroll
                    for (var c = 0u; c < PV_VEC; c++) {
                        let ci = rd * PV_VEC + c;
                        acc[ci] = fma(acc[ci], vec4<f32>(a), mma_opart4(slot * PV_VEC + c));
                    }
                }
                workgroupBarrier();
            }
            if (own) {
                // (PV_HVEC is HEAD_VEC in these forms, 0 elsewhere: no copies there.)
                // @unroll
                for (var c = 0u; c < PV_HVEC; c++) {
                    acc[c] = acc[c] * a;
                }
                let z = vec4<f32>(0.0);
                for (var k = 0u; k < BLOCK_K; k++) {
                    let pk = vec4<f32>(mma_p(si + k));
                    let keep = ((hidden >> k) & 1u) == 0u;
                    // @unroll
                    for (var c = 0u; c < PV_HVEC; c++) {
                        acc[c] = fma(pk, select(z, mma_v4(k * HEAD_VEC + c), keep), acc[c]);
                    }
                }
            }
        }
    }

    let nan4 = vec4<f32>(qnan);
    // @unroll
    for (var r = 0u; r < ROWS; r++) {
        if (rows[r] < params.seq_q) {
            let o_base = ((batch * params.seq_q + rows[r]) * params.num_heads + head) * HEAD_VEC;
            let l = l_run[r];
            let inv_l = select(0.0, 1.0 / l, l > 0.0);
            // @unroll
            for (var c = 0u; c < LVEC; c++) {
                let o = select(vec4<f32>(0.0), vec4<f32>(acc[r * LVEC + c]) * inv_l, l > 0.0);
                store_o4(o_base + c * LANES + lane, select(o, nan4, row_nan[r]));
            }
            // Log-sum-exp in natural log ([batch, heads, seq_q]; −∞ when nothing is attended,
            // NaN with the row); store_lse does nothing unless the variant writes it.
            var ninf_bits = 0xff800000u;
            let lse = select(bitcast<f32>(ninf_bits), (m_run[r] + log2(l)) * LN2, l > 0.0);
            if (lane == 0u) {
                store_lse((batch * params.num_heads + head) * params.seq_q + rows[r],
                          select(lse, nan4.x, row_nan[r]));
            }
        }
    }
}
