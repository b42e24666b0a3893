// Decode attention: a few new query rows per sequence against a KV cache of many keys.
//
// One workgroup serves one row block of one KV group: up to ROWS query rows, which are the
// query heads of the group times the sequence's new queries (row = query · group + head in
// group), so every key and value read from the cache, and every key's rotation, is shared by
// all of them. ROWS is chosen at plan time from group × max_q (1, 2, 4 or 8), so Llama-3's GQA
// (4 heads per KV head, one new query) computes 4 rows, not more. The keys that any row of the
// block can see (the sinks, then the window's, or every key up to the causal bound) are cut
// into `dparams.splits` chunks, one workgroup each (flash-decoding). With one split the
// workgroup writes the output; otherwise it writes its unnormalised partial output, running max
// and sum, and `decode_reduce` merges the chunks by their log-sum-exp.
//
// The head dimension is split across invocations: LANES consecutive invocations (a key group)
// share one key, each holding UNITS units of 8 channels (unit lane + LANES · i), and the
// KPW = 64 / LANES key groups take contiguous runs of the chunk's keys. Per key, each lane
//   1. reads its channels of the key (one 16-byte read per unit in half storage), rotated
//      unless the keys are stored rotated: with full-width RoPE in the half layout a lane holds
//      both channels of each pair it rotates (LANES divides half the units; the frequencies
//      are read once), otherwise the partner vec4 is read as well;
//   2. forms its share of the dot product with every row's query (held in registers, rotated
//      and scaled once) and the key's lanes sum them, four rows at once: `subgroupAdd` or
//      `subgroupShuffleXor` butterflies where the device has subgroups (the variant's
//      LANE_REDUCE; the lanes per key never exceed the adapter's smallest subgroup), else
//      through workgroup memory with two barriers per step. Every lane then holds the same
//      scores;
//   3. applies the per-score modifications (softcap, ALiBi, table biases; the same
//      position.wgsl functions as the prefill kernel) and the masks (bounds, bottom-right
//      causal, window, sinks; common.wgsl), and updates its own running max and sum (no
//      workgroup memory, no barrier);
//   4. folds its channels of the value (read with the key, so that both rows' cache misses
//      overlap) into the accumulator of every row that sees the key. A hidden key is never
//      multiplied in, so whatever its slot holds cannot reach the output.
// With KEY_STEP > 1 (2 or 4 keys a step, a variant constant: `Context::set_decode_keys_per_step`,
// or `posattn tune` on GPUs) a step takes the group's next KEY_STEP keys: steps 1 and 2 for each
// of them (their reads independent of each other's arithmetic), then one softmax update per
// row for all of them (the accumulators rescaled once per step, not once per key), then their
// values read and folded in, as llama.cpp's and FlashInfer's decode kernels take a block of
// keys at a time. A key past the group's run is hidden like a masked one.
// With TWO_BRANCH (an extrapolation method: ReRoPE, LM-Infinite, StreamingLLM's cache index)
// each row also holds its query in the second branch's rotation, each key is rotated a second
// way as well, both dot products are summed, and the method's rule picks one score per row and
// key, as in the prefill kernel. With READ_AHEAD (CPU adapters) each key group reads one word of
// each cache line of its next AHEAD keys' rows every AHEAD keys (see the key loop).
// At the end the key groups' (max, sum, accumulator) are merged through workgroup memory with
// the same log-sum-exp rule as the split-KV reduce.
//
// Lengths come from the caller's `lengths` buffer, (new queries, keys) per sequence, and are
// clamped: keys to the capacity (in a ring cache, key indices wrap onto slots instead), new
// queries to max_q and to the keys. A bad length in the buffer therefore never reads outside
// the cache. Query row i of a sequence sits at key index keys − queries + i: its position is the
// position of that slot (its own key was appended with it), and the masks are bottom-right
// aligned as in the prefill kernel.
//
// Every Q, K, V and O element is read or written through the storage accessors q_at4, k_at8,
// k_at4, v_at8 and o_put4 (src/kernel/storage.rs). The bindings, `Params` and `DecodeParams`
// come from src/kernel/abi.rs (generated).

const HEAD_VEC: u32 = HEAD_DIM / 4u;
const HEAD_UNITS: u32 = HEAD_DIM / 8u;
const WG: u32 = 64u;
const R_MAX: u32 = ROWS;
// Groups of four rows (the lane sums take four rows at once).
const ROW_QUADS: u32 = (ROWS + 3u) / 4u;
// Key groups per workgroup.
const KPW: u32 = WG / LANES;
// Vec4s of one key a lane holds: two per unit, slot 2i + h is vec4 2 (lane + LANES · i) + h.
const SLOTS: u32 = 2u * UNITS;
const LOG2E: f32 = 1.4426950408889634;
// Read ahead the next key's rows (a variant constant; see the key loop).
const PREFETCH: bool = true;
// Units of 8 elements per 64-byte cache line.
// Keys read ahead at a time.
const AHEAD: u32 = 8u;
const ROTATES: bool = POS_KIND == POS_ROPE || POS_KIND == POS_XPOS || CUSTOM_ROTATE;
const TABLE_BIAS: bool = POS_KIND == POS_TABLE || POS_KIND == POS_T5 || POS_KIND == POS_KERPLE;
// Key rotation forms (KEY_ROT): none (no rotation, or keys stored rotated), pairs held by one
// lane, or any layout with partners read from the cache.
const KEY_ROT_NONE: u32 = 0u;
const KEY_ROT_PAIRS: u32 = 1u;
const KEY_ROT_GENERAL: u32 = 2u;

// Each lane's partial dot product of each row (the workgroup-memory lane sum), [row][lane].
var<workgroup> red_sh: array<f32, R_MAX * WG>;
// The merge of the key groups: one group's accumulators, max, sum and NaN flag per row.
var<workgroup> mrg_acc: array<vec4<f32>, R_MAX * HEAD_VEC>;
var<workgroup> mrg_m: array<f32, R_MAX>;
var<workgroup> mrg_l: array<f32, R_MAX>;
var<workgroup> mrg_nan: array<u32, R_MAX>;
var<workgroup> lens_sh: vec2<u32>;

// Two vec4s of channels.
struct Vec4Pair {
    a: vec4<f32>,
    b: vec4<f32>,
}

// The frequency entries of four rotation pairs, transposed: x holds the four pairs' first parts
// (position.wgsl's f.x), y their second, z their third, w their xPos exponents.
struct Freq4 {
    x: vec4<f32>,
    y: vec4<f32>,
    z: vec4<f32>,
    w: vec4<f32>,
}

// Freq4 of entries a, b, c, d (pairs i0 .. i0 + 3).
fn freq4(a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>) -> Freq4 {
    return Freq4(vec4<f32>(a.x, b.x, c.x, d.x), vec4<f32>(a.y, b.y, c.y, d.y),
                 vec4<f32>(a.z, b.z, c.z, d.z), vec4<f32>(a.w, b.w, c.w, d.w));
}

// Tensor access, one function per tensor and direction, through the variant's storage accessors
// (f32, native or packed f16, or bf16; src/kernel/storage.rs).
fn load_q4(b: u32, qi: u32, head: u32, c: u32) -> vec4<f32> {
    return q_at4(((b * dparams.max_q + qi) * params.num_heads + head) * HEAD_VEC + c);
}

fn kv_row(b: u32, slot: u32, kv: u32) -> u32 {
    return (b * dparams.capacity + slot) * params.num_kv_heads + kv;
}

fn store_o4(b: u32, qi: u32, head: u32, c: u32, o: vec4<f32>) {
    o_put4(((b * dparams.max_q + qi) * params.num_heads + head) * HEAD_VEC + c, o);
}

// (new queries, keys) of sequence b, clamped (see the top of this file).
fn seq_lengths(b: u32) -> vec2<u32> {
    var k_len = lengths[2u * b + 1u];
    if (dparams.ring == 0u) {
        k_len = min(k_len, dparams.capacity);
    } else {
        k_len = min(k_len, 1u << 30u);
    }
    let q_len = min(min(lengths[2u * b], dparams.max_q), k_len);
    return vec2<u32>(q_len, k_len);
}

// The cache slot of key index i: i itself, or in a ring cache the sinks' own slots and the
// rest wrapping over the others.
fn slot_of(i: u32) -> u32 {
    if (dparams.ring == 0u) {
        return min(i, dparams.capacity - 1u);
    }
    let s = params.sink_tokens;
    if (i < s) {
        return i;
    }
    return s + (i - s) % (dparams.capacity - s);
}

fn position_of(b: u32, i: u32) -> i32 {
    return pos_k[b * dparams.capacity + slot_of(i)];
}

// The position of new query qi of sequence b (that of its own key, at index qi + diag).
fn query_position(b: u32, qi: u32, diag: i32) -> i32 {
    return position_of(b, u32(i32(qi) + diag));
}

// Rotation pair i of a query (`sign` 1) or key (−1): position.wgsl's rope_rotate, or with
// `branch` the second RoPE branch's rope_rotate_branch (ReRoPE, LM-Infinite, StreamingLLM's
// cache index), whose constant phase queries add and keys do not.
fn rotate_pair(x: vec2<f32>, i: u32, pos: i32, rel: i32, sign: f32, branch: bool) -> vec2<f32> {
    if (TWO_BRANCH && branch) {
        return rope_rotate_branch(x, i, pos, sign > 0.0);
    }
    return rope_rotate(x, i, pos, rel, sign);
}

// Rotates the four pairs (a[e], b[e]) = pairs i0 + e (the half layout's vec4 u and its partner
// vec4 u + rotary_dim / 8): RoPE itself four pairs at once (rotate_half4_freq), the second branch
// and a custom rotation pair by pair with rotate_pair.
fn rotate_half4(x: Vec4Pair, i0: u32, pos: i32, rel: i32, sign: f32, branch: bool) -> Vec4Pair {
    if (!CUSTOM_ROTATE && !(TWO_BRANCH && branch)) {
        let j = params.freq_offset + i0;
        return rotate_half4_freq(x, freq4(aux[j], aux[j + 1u], aux[j + 2u], aux[j + 3u]), pos,
                                 rel, sign);
    }
    let p0 = rotate_pair(vec2<f32>(x.a.x, x.b.x), i0, pos, rel, sign, branch);
    let p1 = rotate_pair(vec2<f32>(x.a.y, x.b.y), i0 + 1u, pos, rel, sign, branch);
    let p2 = rotate_pair(vec2<f32>(x.a.z, x.b.z), i0 + 2u, pos, rel, sign, branch);
    let p3 = rotate_pair(vec2<f32>(x.a.w, x.b.w), i0 + 3u, pos, rel, sign, branch);
    return Vec4Pair(vec4<f32>(p0.x, p1.x, p2.x, p3.x), vec4<f32>(p0.y, p1.y, p2.y, p3.y));
}

// rotate_half4 with the four pairs' frequency entries read already: the four pairs at once with
// position.wgsl's four-lane helpers (quadrants by selects: a software driver runs every side of
// a branch, and on lavapipe the scalar form's quadrant branches were about a third of the
// rotation's cost).
fn rotate_half4_freq(x: Vec4Pair, f: Freq4, pos: i32, rel: i32, sign: f32) -> Vec4Pair {
    let cs = sincos_turns4(rope_turns4(pos, f.x, f.y, f.z));
    var c = cs[0] * params.attn_factor;
    var sn = cs[1] * params.attn_factor;
    if (POS_KIND == POS_XPOS) {
        let sc = exp2(f.w * (sign * f32(rel) * params.xpos_inv_scale_base));
        c *= sc;
        sn *= sc;
    }
    return Vec4Pair(x.a * c - x.b * sn, x.b * c + x.a * sn);
}

// Rotates the two pairs of an interleaved-layout vec4 (pairs i0 and i0 + 1).
fn rotate_interleaved4(x: vec4<f32>, i0: u32, pos: i32, rel: i32, sign: f32,
                       branch: bool) -> vec4<f32> {
    return vec4<f32>(rotate_pair(x.xy, i0, pos, rel, sign, branch),
                     rotate_pair(x.zw, i0 + 1u, pos, rel, sign, branch));
}

// The vec4 holding the RoPE partners of vec4 c in the half layout (c ± rotary_dim / 8), or c
// itself where c has none (interleaved layout, or past the rotary channels).
fn partner_vec4(c: u32) -> u32 {
    let half_v = params.rotary_dim / 8u;
    if (params.rope_interleaved != 0u || c >= 2u * half_v) {
        return c;
    }
    return select(c - half_v, c + half_v, c < half_v);
}

// Vec4 c of a query or key (`sign` 1 or −1) rotated, given its partner vec4 p (partner_vec4).
// The host checks that rotary_dim is a multiple of 8 (half) or 4 (interleaved).
fn rotate_vec4(x: vec4<f32>, p: vec4<f32>, c: u32, pos: i32, rel: i32, sign: f32,
               branch: bool) -> vec4<f32> {
    let rot = params.rotary_dim;
    if (params.rope_interleaved != 0u) {
        if (c < rot / 4u) {
            return rotate_interleaved4(x, 2u * c, pos, rel, sign, branch);
        }
        return x;
    }
    let half_v = rot / 8u;
    if (c >= 2u * half_v) {
        return x;
    }
    let first = c < half_v;
    let u = select(c - half_v, c, first);
    let r = rotate_half4(Vec4Pair(select(p, x, first), select(x, p, first)), 4u * u, pos, rel,
                         sign, branch);
    return select(r.b, r.a, first);
}

// Entry j of the second branch's table without the phase (the key side's rotation).
fn branch_entry(j: u32) -> vec4<f32> {
    let f = aux[j];
    return vec4<f32>(f.xyz, 0.0);
}

// A lane's key channels rotated in the pair form (KEY_ROT_PAIRS: slot s of the first half of
// the units pairs with slot s + UNITS of the second), with the pairs' frequency entries f read
// already (the first branch's table, or the second's without its phase).
fn rotate_key_pairs(x: array<vec4<f32>, SLOTS>, f: array<Freq4, SLOTS>, pos: i32,
                    rel: i32) -> array<vec4<f32>, SLOTS> {
    var y = x;
    // @unroll
    for (var i = 0u; i < UNITS; i++) {
        if (i < UNITS / 2u) {
            // @unroll
            for (var h = 0u; h < HALVES; h++) {
                let s0 = 2u * i + h;
                // (Modulo SLOTS keeps the index in bounds where i is not.)
                let s1 = (2u * (i + UNITS / 2u) + h) % SLOTS;
                let r = rotate_half4_freq(Vec4Pair(x[s0], x[s1]), f[s0], pos, rel, -1.0);
                y[s0] = r.a;
                y[s1] = r.b;
            }
        }
    }
    return y;
}

// The lanes of a key sum each row's partial dot product: subgroup operations (the variant's
// LANE_REDUCE) or workgroup memory with two barriers. Every lane then holds the same sums.
fn sum_key_lanes(dot: array<f32, R_MAX>, lid: u32, kg: u32) -> array<f32, R_MAX> {
    var out = dot;
    if (LANE_REDUCE == 0u && LANES > 1u) {
        // @unroll
        for (var r = 0u; r < ROWS; r++) {
            red_sh[r * WG + lid] = dot[r];
        }
        workgroupBarrier();
        // Every lane of the key adds the same values in the same order.
        // @unroll
        for (var r = 0u; r < ROWS; r++) {
            var sum = 0.0;
            // @unroll
            for (var k = 0u; k < LANES; k++) {
                sum += red_sh[r * WG + kg * LANES + k];
            }
            out[r] = sum;
        }
        workgroupBarrier();
    } else {
        // Four rows a sum.
        // @unroll
        for (var j = 0u; j < ROW_QUADS; j++) {
            let v = lane_sum(vec4<f32>(dot[4u * j], dot[min(4u * j + 1u, ROWS - 1u)],
                                       dot[min(4u * j + 2u, ROWS - 1u)],
                                       dot[min(4u * j + 3u, ROWS - 1u)]));
            out[4u * j] = v.x;
            out[min(4u * j + 1u, ROWS - 1u)] = select(out[min(4u * j + 1u, ROWS - 1u)], v.y,
                                                      4u * j + 1u < ROWS);
            out[min(4u * j + 2u, ROWS - 1u)] = select(out[min(4u * j + 2u, ROWS - 1u)], v.z,
                                                      4u * j + 2u < ROWS);
            out[min(4u * j + 3u, ROWS - 1u)] = select(out[min(4u * j + 3u, ROWS - 1u)], v.w,
                                                      4u * j + 3u < ROWS);
        }
    }
    return out;
}

// Softcap, then the encoding's bias, on one scaled logit (base-2 units), in the prefill kernel's
// order and with its functions.
fn modify_score(dot: f32, head: u32, m: i32, n: i32) -> f32 {
    var s = dot;
    if (params.softcap_log2 != 0.0) {
        s = softcap4(vec4<f32>(s), params.softcap_log2).x;
    }
    if (POS_KIND == POS_ALIBI) {
        let slope = aux[params.bias_offset + head / 4u][head % 4u] * LOG2E;
        s += alibi_bias(slope, m, n, params.alibi_symmetric != 0u);
    }
    if (TABLE_BIAS) {
        s += LOG2E * table_bias(head, m, n);
    }
    return s;
}

// The cache slot of the chunk's key v (the sinks' keys first, then the window's; see the loop).
fn step_slot(v: u32, n_sink: u32, win_lo: u32, ring: bool, ring_base: u32, ring_len: u32,
             ring_s: u32, cap: u32) -> u32 {
    let key = select(v - n_sink + win_lo, v, v < n_sink);
    var t = ring_base + (v - n_sink);
    t = select(t, t - ring_len, t >= ring_len);
    let win_slot = select(min(key, cap - 1u), min(ring_s + t, cap - 1u), ring && key >= ring_s);
    return select(win_slot, key, v < n_sink);
}

// Where the partial result of (b, qi, head) from chunk `split` starts: HEAD_VEC vec4s of
// unnormalised output, then (max, sum, 0, 0); the sum is NaN when a visible score was NaN.
fn partial_index(b: u32, qi: u32, head: u32, split: u32) -> u32 {
    return (((b * params.num_heads + head) * dparams.max_q + qi) * dparams.splits + split)
        * (HEAD_VEC + 1u);
}

@compute @workgroup_size(WG)
fn decode_attention(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let splits = dparams.splits;
    let block = wg.x / splits;
    let split = wg.x % splits;
    let kv = wg.y;
    let b = wg.z;
    let group = dparams.group;
    let cap = dparams.capacity;
    if (lid == 0u) {
        lens_sh = seq_lengths(b);
    }
    let lens = workgroupUniformLoad(&lens_sh);
    let q_len = lens.x;
    let k_len = lens.y;
    let row0 = block * R_MAX;
    if (row0 >= q_len * group) {
        return;
    }
    let n_rows = min(R_MAX, q_len * group - row0);
    let diag = i32(k_len) - i32(q_len);
    let first_ip = i32(row0 / group) + diag;
    let last_ip = i32((row0 + n_rows - 1u) / group) + diag;
    // xPos origin: the block's first query, so that per-token scales stay near 1.
    let origin = position_of(b, u32(first_ip));
    let sinks = i32(params.sink_tokens);
    let lane = lid % LANES;
    let kg = lid / LANES;
    let has_sink_logits = params.sink_logit_offset != NO_SINK_LOGITS && split == 0u
        && kg == 0u;

    // Per row: running max (a sink logit starts it, in the first chunk's first key group
    // only), running sum, NaN flag, query position; the lane's channels of the query, rotated
    // and times scale · log2 e (and the log-n factor); its accumulators.
    var m: array<f32, R_MAX>;
    var l: array<f32, R_MAX>;
    var nanf: array<bool, R_MAX>;
    var qpos: array<i32, R_MAX>;
    var q: array<vec4<f32>, R_MAX * SLOTS>;
    // The second branch's rotation of the same channels (TWO_BRANCH).
    var q2: array<vec4<f32>, R_MAX * SLOTS>;
    // (pv4: vec4<f32>, or vec4<f16> with f16 accumulation, PV_HALF.)
    var acc: array<pv4, R_MAX * SLOTS>;
    // @unroll
    for (var r = 0u; r < ROWS; r++) {
        let gr = row0 + min(r, n_rows - 1u);
        let qi = gr / group;
        let head = kv * group + gr % group;
        let pos = query_position(b, qi, diag);
        qpos[r] = pos;
        m[r] = MASKED;
        l[r] = 0.0;
        if (has_sink_logits) {
            m[r] = aux_f(params.sink_logit_offset + head) * LOG2E + PV_OFFSET;
            l[r] = exp2(-PV_OFFSET);
        }
        let mul = params.scale_log2 * logn_scale(pos);
        // The query's position in the second branch: its own, 0 (LM-Infinite), or StreamingLLM's
        // index in the rolling cache of sinks and window, min(i', sinks + left).
        var bpos = pos;
        if (params.branch_q_mode == BRANCH_Q_ZERO) {
            bpos = 0;
        } else if (params.branch_q_mode == BRANCH_Q_CACHE_INDEX) {
            let ip = i32(qi) + diag;
            bpos = pos - max(0, ip - sinks - params.window_left);
        }
        // @unroll
        for (var i = 0u; i < UNITS; i++) {
            // @unroll
            for (var h = 0u; h < HALVES; h++) {
                let c = 2u * (lane + LANES * i) + h;
                if (r < n_rows && c < HEAD_VEC) {
                    let raw = load_q4(b, qi, head, c);
                    var x = raw;
                    if (ROTATES) {
                        let partner = load_q4(b, qi, head, partner_vec4(c));
                        x = rotate_vec4(raw, partner, c, pos, pos - origin, 1.0, false);
                        if (TWO_BRANCH) {
                            q2[r * SLOTS + 2u * i + h] =
                                rotate_vec4(raw, partner, c, bpos, 0, 1.0, true) * mul;
                        }
                    }
                    q[r * SLOTS + 2u * i + h] = x * mul;
                }
            }
        }
    }

    // Keys are rotated as they are read unless stored rotated, in the form the plan chose
    // (KEY_ROT, a variant constant: a software driver runs both sides of every branch, so the
    // form not taken must not be in the loop). The pair form (full-width RoPE in the half
    // layout): unit lane + LANES · i (i < UNITS / 2) pairs with unit lane + LANES · (i +
    // UNITS / 2) of the same lane, and its frequencies are read here once.
    var freq: array<Freq4, SLOTS>;
    // The second branch's entries (TWO_BRANCH), whose phase keys do not add.
    var bfreq: array<Freq4, SLOTS>;
    if (KEY_ROT == KEY_ROT_PAIRS) {
        // @unroll
        for (var i = 0u; i < UNITS; i++) {
            if (i < UNITS / 2u) {
                // @unroll
                for (var h = 0u; h < HALVES; h++) {
                    let pair = 4u * (2u * (lane + LANES * i) + h);
                    let i0 = params.freq_offset + pair;
                    freq[2u * i + h] = freq4(aux[i0], aux[i0 + 1u], aux[i0 + 2u], aux[i0 + 3u]);
                    if (TWO_BRANCH) {
                        let j0 = params.branch_offset + pair;
                        bfreq[2u * i + h] = freq4(branch_entry(j0), branch_entry(j0 + 1u),
                                                  branch_entry(j0 + 2u), branch_entry(j0 + 3u));
                    }
                }
            }
        }
    }
    // Per row: the query's index among its sequence's new queries, its head and key index.
    var row_qi: array<u32, R_MAX>;
    var row_head: array<u32, R_MAX>;
    var row_ip: array<i32, R_MAX>;
    // @unroll
    for (var r = 0u; r < ROWS; r++) {
        let gr = row0 + r;
        row_qi[r] = gr / group;
        row_head[r] = kv * group + gr % group;
        row_ip[r] = i32(row_qi[r]) + diag;
    }

    // The keys any row of the block can see, as in the prefill kernel: the sinks [0, n_sink)
    // and the window [win_lo, win_hi), numbered v = 0 .. n_keys.
    let left = params.window_left;
    let right = params.window_right;
    var hi = i32(k_len);
    if (params.causal != 0u) {
        hi = min(hi, last_ip + 1);
    }
    let sink_hi = clamp(min(sinks, hi), 0, i32(k_len));
    if (right >= 0) {
        hi = min(hi, last_ip + right + 1);
    }
    hi = max(hi, 0);
    var lo = 0;
    if (left >= 0) {
        lo = clamp(first_ip - left, 0, hi);
    }
    let n_sink = u32(sink_hi);
    let win_lo = max(u32(lo), n_sink);
    let win_hi = max(u32(hi), win_lo);
    let n_keys = n_sink + win_hi - win_lo;
    // This workgroup's chunk of them, KPW keys a step.
    let chunk = (n_keys + splits - 1u) / splits;
    let v_begin = min(split * chunk, n_keys);
    let v_end = min(v_begin + chunk, n_keys);
    // Each key group takes a contiguous run of them (consecutive keys are consecutive rows of
    // the cache, which CPU prefetchers follow), one key a step.
    let steps = (v_end - v_begin + KPW - 1u) / KPW;
    let g_begin = v_begin + kg * steps;
    let g_end = min(g_begin + steps, v_end);
    // Cache slots without a division per key: the sinks' keys are their slots; a ring cache's
    // window key k (≥ sinks) lives in slot sinks + (k − sinks) mod L, L = capacity − sinks, and
    // the window spans at most L keys (capacity ≥ sinks + window + max_q), so the offset from
    // its first key's slot wraps at most once.
    let ring = dparams.ring != 0u;
    let ring_len = max(cap - min(params.sink_tokens, cap - 1u), 1u);
    let ring_s = cap - ring_len;
    var ring_base = 0u;
    if (ring && win_lo >= ring_s) {
        ring_base = (win_lo - ring_s) % ring_len;
    }

    // Read-ahead words (see below); never nonzero in effect, folded into the output through a
    // factor the compiler cannot know to be 0.
    var touched = 0u;
    for (var s0 = 0u; s0 < steps; s0 += AHEAD) {
        // Read ahead: one word of each cache line of the K and V rows of the next AHEAD keys,
        // all at once, so that their cache misses overlap each other and these keys' work
        // instead of stalling each key in turn (a CPU adapter reads a row lane by lane, and the
        // rows of one KV head are a whole cache row apart, a stride that hardware prefetchers
        // do not follow).
        if (READ_AHEAD) {
            for (var d = 0u; d < AHEAD; d++) {
                let nv = min(g_begin + s0 + AHEAD + d, max(g_end, 1u) - 1u);
                let nslot = step_slot(nv, n_sink, win_lo, ring, ring_base, ring_len, ring_s, cap);
                let nrow = kv_row(b, nslot, kv);
                // @unroll
                for (var i = 0u; i < UNITS; i++) {
                    let j = lane + LANES * i;
                    if (j < HEAD_UNITS && j % K_UNITS_PER_LINE == 0u) {
                        touched |= k_touch(nrow * HEAD_UNITS + j);
                    }
                    if (j < HEAD_UNITS && j % V_UNITS_PER_LINE == 0u) {
                        touched |= v_touch(nrow * HEAD_UNITS + j);
                    }
                }
            }
        }
        for (var step = s0; step < min(s0 + AHEAD, steps); step += KEY_STEP) {
            // KEY_STEP consecutive keys of the group's run a step (a variant constant, 1, 2 or
            // 4): their scores first, then one softmax update for all of them, then their
            // values. With more than one, the keys' reads are independent of each other's
            // arithmetic and the accumulators are rescaled once per step, not once per key.
            var kvalid: array<bool, KEY_STEP>;
            var kkey: array<u32, KEY_STEP>;
            var kslot: array<u32, KEY_STEP>;
            var kpos: array<i32, KEY_STEP>;
            // One key's value channels, read with its key where a step holds one key (both
            // rows' cache misses overlap), else after the softmax.
            var vx: array<vec4<f32>, SLOTS>;
            // 2. Each key's share of each row's dot product, summed over the key's lanes (in
            // both branches with TWO_BRANCH): dot[j][r].
            var dot: array<f32, R_MAX * KEY_STEP>;
            var dot2: array<f32, R_MAX * KEY_STEP>;
            // @unroll
            for (var j = 0u; j < KEY_STEP; j++) {
                let v = g_begin + step + j;
                let valid = v < g_end;
                kvalid[j] = valid;
                kkey[j] = select(v - n_sink + win_lo, v, v < n_sink);
                kslot[j] = 0u;
                kpos[j] = 0;
                var kx: array<vec4<f32>, SLOTS>;
                // The key in the second branch's rotation (TWO_BRANCH).
                var kx2: array<vec4<f32>, SLOTS>;
                // 1. The lane's channels of the key, rotated.
                if (valid) {
                    let slot = step_slot(v, n_sink, win_lo, ring, ring_base, ring_len, ring_s,
                                         cap);
                    let kp = pos_k[b * cap + slot];
                    kslot[j] = slot;
                    kpos[j] = kp;
                    let row = kv_row(b, slot, kv);
                    // @unroll
                    for (var i = 0u; i < UNITS; i++) {
                        let u = lane + LANES * i;
                        if (u < HEAD_UNITS) {
                            let x = k_at8(row * HEAD_UNITS + u);
                            kx[2u * i] = x.a;
                            kx[2u * i + 1u] = x.b;
                            if (KEY_STEP == 1u) {
                                let y = v_at8(row * HEAD_UNITS + u);
                                vx[2u * i] = y.a;
                                vx[2u * i + 1u] = y.b;
                            }
                        }
                    }
                    let kraw = kx;
                    // The partner vec4s the general form reads, kept for the second branch.
                    var kpart: array<vec4<f32>, SLOTS>;
                    if (KEY_ROT == KEY_ROT_PAIRS) {
                        kx = rotate_key_pairs(kraw, freq, kp, kp - origin);
                    } else if (KEY_ROT == KEY_ROT_GENERAL) {
                        // @unroll
                        for (var i = 0u; i < UNITS; i++) {
                            // @unroll
                            for (var h = 0u; h < HALVES; h++) {
                                let c = 2u * (lane + LANES * i) + h;
                                if (c < HEAD_VEC) {
                                    kpart[2u * i + h] = k_at4(row * HEAD_VEC + partner_vec4(c));
                                    kx[2u * i + h] = rotate_vec4(kraw[2u * i + h],
                                                                 kpart[2u * i + h], c, kp,
                                                                 kp - origin, -1.0, false);
                                }
                            }
                        }
                    }
                    if (TWO_BRANCH) {
                        if (KEY_ROT == KEY_ROT_PAIRS) {
                            kx2 = rotate_key_pairs(kraw, bfreq, kp, 0);
                        } else {
                            // @unroll
                            for (var i = 0u; i < UNITS; i++) {
                                // @unroll
                                for (var h = 0u; h < HALVES; h++) {
                                    let c = 2u * (lane + LANES * i) + h;
                                    if (c < HEAD_VEC) {
                                        kx2[2u * i + h] = rotate_vec4(kraw[2u * i + h],
                                                                      kpart[2u * i + h], c, kp,
                                                                      0, -1.0, true);
                                    }
                                }
                            }
                        }
                    }
                }
                var dj: array<f32, R_MAX>;
                var dj2: array<f32, R_MAX>;
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    var d = vec4<f32>(0.0);
                    var d2 = vec4<f32>(0.0);
                    // @unroll
                    for (var i = 0u; i < UNITS; i++) {
                        // @unroll
                        for (var h = 0u; h < HALVES; h++) {
                            d = fma(q[r * SLOTS + 2u * i + h], kx[2u * i + h], d);
                            if (TWO_BRANCH) {
                                d2 = fma(q2[r * SLOTS + 2u * i + h], kx2[2u * i + h], d2);
                            }
                        }
                    }
                    dj[r] = (d.x + d.y) + (d.z + d.w);
                    dj2[r] = (d2.x + d2.y) + (d2.z + d2.w);
                }
                dj = sum_key_lanes(dj, lid, kg);
                if (TWO_BRANCH) {
                    dj2 = sum_key_lanes(dj2, lid, kg);
                }
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    dot[j * R_MAX + r] = dj[r];
                    dot2[j * R_MAX + r] = dj2[r];
                }
            }
            // 3. Modifications, masks and the online softmax, per row, over the step's keys.
            var p: array<f32, R_MAX * KEY_STEP>;
            var seen: array<bool, R_MAX * KEY_STEP>;
            var alpha: array<f32, R_MAX>;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                let qi = row_qi[r];
                let head = row_head[r];
                let ip = row_ip[r];
                var sj: array<f32, KEY_STEP>;
                var visj: array<bool, KEY_STEP>;
                var s_top = m[r];
                // @unroll
                for (var j = 0u; j < KEY_STEP; j++) {
                    let kk = i32(kkey[j]);
                    let kp = kpos[j];
                    var vis = kvalid[j] && r < n_rows && (params.causal == 0u || kk <= ip)
                        && (in_window(vec4<i32>(kk), ip).x || kk < sinks);
                    // A custom scheme's hooks (identities in every other variant), with the
                    // query's index among its sequence's new queries and the key's index.
                    if (CUSTOM_MASK && vis) {
                        vis = pa_mask4(qpos[r], vec4<i32>(kp), head, qi, vec4<u32>(kkey[j])).x;
                    }
                    // The second branch's score where its rule picks it (as in the prefill
                    // kernel): keys at distance ≥ w (ReRoPE), or keys seen only as sinks
                    // (LM-Infinite, StreamingLLM's cache index).
                    var dk = dot[j * R_MAX + r];
                    if (TWO_BRANCH) {
                        var use2 = kk < sinks && !in_window(vec4<i32>(kk), ip).x;
                        if (params.branch_rule == BRANCH_RULE_DISTANCE) {
                            use2 = abs(qpos[r] - kp) >= params.branch_w;
                        }
                        dk = select(dk, dot2[j * R_MAX + r], use2);
                    }
                    var s = MASKED;
                    if (vis) {
                        s = modify_score(dk, head, qpos[r], kp);
                        if (CUSTOM_SCORE) {
                            s = pa_score4(vec4<f32>(s), qpos[r], vec4<i32>(kp), head, qi,
                                          vec4<u32>(kkey[j])).x;
                        }
                        // The caller's bias at (sequence, head, new query, cache slot), in
                        // natural log units: −∞ (or ≤ −1e30) hides the key, NaN propagates.
                        if (USER_BIAS) {
                            let ub = user_bias_at(b * params.user_bias_stride_b
                                + head * params.user_bias_stride_h + qi * cap + kslot[j]);
                            if (bias_masks(ub)) {
                                s = MASKED;
                                vis = false;
                            } else {
                                s += ub * LOG2E;
                            }
                        }
                        // A NaN at a visible key makes the row NaN, as in a plain softmax.
                        if (is_nan_bits(s)) {
                            nanf[r] = true;
                            s = MASKED;
                            vis = false;
                        }
                    }
                    var s_max = s;
                    if (PV_HALF) {
                        s_max += PV_OFFSET;
                    }
                    s_top = max(s_top, s_max);
                    sj[j] = s;
                    visj[j] = vis;
                }
                let m_new = s_top;
                alpha[r] = exp2(m[r] - m_new);
                var l_new = l[r] * alpha[r];
                // @unroll
                for (var j = 0u; j < KEY_STEP; j++) {
                    let pj = select(0.0, exp2(sj[j] - m_new), visj[j]);
                    p[j * R_MAX + r] = pj;
                    seen[j * R_MAX + r] = visj[j];
                    l_new += pj;
                }
                l[r] = l_new;
                m[r] = m_new;
            }
            // 4. The lane's channels of each value, folded into the rows that see its key, the
            // accumulators rescaled first.
            // @unroll
            for (var j = 0u; j < KEY_STEP; j++) {
                if (KEY_STEP > 1u && kvalid[j]) {
                    let row = kv_row(b, kslot[j], kv);
                    // @unroll
                    for (var i = 0u; i < UNITS; i++) {
                        let u = lane + LANES * i;
                        if (u < HEAD_UNITS) {
                            let y = v_at8(row * HEAD_UNITS + u);
                            vx[2u * i] = y.a;
                            vx[2u * i + 1u] = y.b;
                        }
                    }
                }
                // (In the P·V type: the value converted once for every row.)
                var vp: array<pv4, SLOTS>;
                // @unroll
                for (var i = 0u; i < UNITS; i++) {
                    // @unroll
                    for (var h = 0u; h < HALVES; h++) {
                        vp[2u * i + h] = pv4(vx[2u * i + h]);
                    }
                }
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    let pr = pv4(pv_t(p[j * R_MAX + r]));
                    // The rescale by alpha goes with the step's first key (for one key a step,
                    // the multiply and the fused add of the form before).
                    var ar = pv_t(1.0);
                    if (j == 0u) {
                        ar = pv_t(alpha[r]);
                    }
                    // @unroll
                    for (var i = 0u; i < UNITS; i++) {
                        // @unroll
                        for (var h = 0u; h < HALVES; h++) {
                            let s = r * SLOTS + 2u * i + h;
                            var a = acc[s];
                            if (j == 0u) {
                                a = a * ar;
                            }
                            acc[s] = select(a, fma(pr, vp[2u * i + h], a), seen[j * R_MAX + r]);
                        }
                    }
                }
            }
        }
    }

    // Merge the key groups into group 0, one group at a time.
    for (var g2 = 1u; g2 < KPW; g2++) {
        workgroupBarrier();
        if (kg == g2) {
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                // @unroll
                for (var i = 0u; i < UNITS; i++) {
                    // @unroll
                    for (var h = 0u; h < HALVES; h++) {
                        let c = 2u * (lane + LANES * i) + h;
                        if (c < HEAD_VEC) {
                            mrg_acc[r * HEAD_VEC + c] = vec4<f32>(acc[r * SLOTS + 2u * i + h]);
                        }
                    }
                }
                if (lane == 0u) {
                    mrg_m[r] = m[r];
                    mrg_l[r] = l[r];
                    mrg_nan[r] = select(0u, 1u, nanf[r]);
                }
            }
        }
        workgroupBarrier();
        if (kg == 0u) {
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                let mo = mrg_m[r];
                let m_new = max(m[r], mo);
                let a0 = exp2(m[r] - m_new);
                let a1 = exp2(mo - m_new);
                l[r] = l[r] * a0 + mrg_l[r] * a1;
                m[r] = m_new;
                nanf[r] = nanf[r] || mrg_nan[r] != 0u;
                // @unroll
                for (var i = 0u; i < UNITS; i++) {
                    // @unroll
                    for (var h = 0u; h < HALVES; h++) {
                        let c = 2u * (lane + LANES * i) + h;
                        if (c < HEAD_VEC) {
                            let s = r * SLOTS + 2u * i + h;
                            acc[s] = pv4(vec4<f32>(acc[s]) * a0
                                + mrg_acc[r * HEAD_VEC + c] * a1);
                        }
                    }
                }
            }
        }
    }

    // The read-ahead words, kept alive: capacity < 2^31, so this adds +0.0.
    l[0] += f32(touched & (cap >> 31u));

    // A NaN built at run time (WGSL forbids a constant expression that evaluates to NaN).
    var nan_bits = 0x7fc00000u;
    let nan = bitcast<f32>(nan_bits);
    if (kg == 0u) {
        // @unroll
        for (var r = 0u; r < ROWS; r++) {
            if (r < n_rows) {
                let gr = row0 + r;
                let qi = gr / group;
                let head = kv * group + gr % group;
                let base = partial_index(b, qi, head, split);
                // @unroll
                for (var i = 0u; i < UNITS; i++) {
                    // @unroll
                    for (var h = 0u; h < HALVES; h++) {
                        let c = 2u * (lane + LANES * i) + h;
                        let a = vec4<f32>(acc[r * SLOTS + 2u * i + h]);
                        if (c < HEAD_VEC) {
                            if (splits == 1u) {
                                let out = select(vec4<f32>(0.0), a * (1.0 / l[r]), l[r] > 0.0);
                                store_o4(b, qi, head, c, select(out, vec4<f32>(nan), nanf[r]));
                            } else {
                                partials[base + c] = a;
                            }
                        }
                    }
                }
                if (splits > 1u && lane == 0u) {
                    partials[base + HEAD_VEC] =
                        vec4<f32>(m[r], select(l[r], nan, nanf[r]), 0.0, 0.0);
                }
            }
        }
    }
}

// Merges the chunks of one (sequence, new query, head): O = Σ acc_s 2^(m_s − M) / Σ l_s 2^(m_s − M)
// with M the largest running max; 0 when no key was visible, NaN when a chunk saw a NaN score.
// The chunks are shared out over a workgroup of RED_WG invocations rather than walked by each
// channel in turn (a GPU plan runs up to 64 of them, and a walk is a chain of dependent
// reads): the max and the NaN flag by a strided pass and a tree, then RED_GROUPS groups of
// RED_CH invocations each sum a strided share of the chunks for every channel, and the first
// group adds the groups' sums in a fixed order. At head_dim 128 that is 8 groups.
const RED_WG: u32 = 256u;
const RED_GROUPS: u32 = max(1u, RED_WG / HEAD_VEC);
const RED_CH: u32 = RED_WG / RED_GROUPS;
var<workgroup> red_m: array<f32, RED_WG>;
var<workgroup> red_n: array<u32, RED_WG>;
var<workgroup> red_a: array<vec4<f32>, RED_WG>;
var<workgroup> red_l: array<f32, RED_WG>;

@compute @workgroup_size(RED_WG)
fn decode_reduce(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qi = wg.x;
    let head = wg.y;
    let b = wg.z;
    if (lid == 0u) {
        lens_sh = seq_lengths(b);
    }
    let lens = workgroupUniformLoad(&lens_sh);
    if (qi >= lens.x) {
        return;
    }
    let splits = dparams.splits;
    let base0 = partial_index(b, qi, head, 0u);
    let stride = HEAD_VEC + 1u;
    var m_own = MASKED;
    var nan_own = 0u;
    for (var s = lid; s < splits; s += RED_WG) {
        let ml = partials[base0 + s * stride + HEAD_VEC];
        m_own = max(m_own, ml.x);
        nan_own |= u32(is_nan_bits(ml.y));
    }
    red_m[lid] = m_own;
    red_n[lid] = nan_own;
    workgroupBarrier();
    for (var half = RED_WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            red_m[lid] = max(red_m[lid], red_m[lid + half]);
            red_n[lid] |= red_n[lid + half];
        }
        workgroupBarrier();
    }
    let m = red_m[0];
    let row_nan = red_n[0] != 0u;
    var nan_bits = 0x7fc00000u;
    let nan4 = vec4<f32>(bitcast<f32>(nan_bits));
    if (RED_GROUPS == 1u) {
        // One group (HEAD_VEC ≥ RED_WG): each invocation walks every chunk for its channels.
        for (var c = lid; c < HEAD_VEC; c += RED_WG) {
            var a = vec4<f32>(0.0);
            var l = 0.0;
            for (var s = 0u; s < splits; s++) {
                let ml = partials[base0 + s * stride + HEAD_VEC];
                let w = exp2(ml.x - m);
                a = fma(partials[base0 + s * stride + c], vec4<f32>(w), a);
                l += ml.y * w;
            }
            let o = select(vec4<f32>(0.0), a * (1.0 / select(1.0, l, l > 0.0)), l > 0.0);
            store_o4(b, qi, head, c, select(o, nan4, row_nan));
        }
    } else {
        // HEAD_VEC ≤ RED_CH: one channel per invocation, chunks g, g + RED_GROUPS, ...
        let g = lid / RED_CH;
        let c = lid % RED_CH;
        var a = vec4<f32>(0.0);
        var l = 0.0;
        if (g < RED_GROUPS && c < HEAD_VEC) {
            for (var s = g; s < splits; s += RED_GROUPS) {
                let ml = partials[base0 + s * stride + HEAD_VEC];
                let w = exp2(ml.x - m);
                a = fma(partials[base0 + s * stride + c], vec4<f32>(w), a);
                l += ml.y * w;
            }
        }
        red_a[lid] = a;
        red_l[lid] = l;
        workgroupBarrier();
        if (g == 0u && c < HEAD_VEC) {
            var at = vec4<f32>(0.0);
            var lt = 0.0;
            for (var k = 0u; k < RED_GROUPS; k++) {
                at += red_a[k * RED_CH + c];
                lt += red_l[k * RED_CH + c];
            }
            let o = select(vec4<f32>(0.0), at * (1.0 / select(1.0, lt, lt > 0.0)), lt > 0.0);
            store_o4(b, qi, head, c, select(o, nan4, row_nan));
        }
    }
}
