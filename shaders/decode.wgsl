// Decode attention: a few new query rows per sequence against a KV cache of many keys.
//
// One workgroup serves one row block of one KV group: up to R_MAX query rows, which are the
// query heads of the group times the sequence's new queries (row = query · group + head in
// group), so every staged key tile, and its rotation, is shared by all of them. The keys that
// any row of the block can see (the sink tiles, then the window's, or every tile up to the causal
// bound) are cut into `dparams.splits` chunks, one workgroup each (flash-decoding). With one split
// the workgroup writes the output; otherwise it writes its unnormalised partial output, running
// max and sum, and `decode_reduce` merges the chunks by their log-sum-exp.
//
// Per key tile, four phases separated by barriers:
//   1. stage BLOCK_K keys, rotated as they are loaded (keys are stored unrotated unless
//      `keys_rotated`), with their cache slots and positions; each invocation loads whole vec4s
//      (and, in the half layout, the vec4 of the partner channels), since every load costs
//      about the same whatever its width on CPU adapters;
//   2. one invocation per key: the scaled dot products with every row, the per-score
//      modifications (softcap, ALiBi, table biases; the same position.wgsl functions as the
//      prefill kernel) and the masks (bounds, bottom-right causal, window, sinks; common.wgsl);
//   3. one invocation per row: the tile's max, the running max and sum, the softmax weights;
//   4. each invocation owns one 4-channel slice of the output for every row of the block and a
//      share of the tile's keys (KG key groups): each V vec4 is read from the cache once per
//      workgroup and folded into all rows. The key groups' accumulators are summed at the end.
//
// Lengths come from the caller's `lengths` buffer, (new queries, keys) per sequence, and are
// clamped: keys to the capacity (in a ring cache, key indices wrap onto slots instead), new
// queries to max_q and to the keys. A bad length in the buffer therefore never reads outside
// the cache. Query row i of a sequence sits at key index keys − queries + i: its position is the
// position of that slot (its own key was appended with it), and the masks are bottom-right
// aligned as in the prefill kernel.
//
// Every Q, K, V and O element is read or written through load_q, load_k, load_v4 and store_o4.
// The bindings, `Params` and `DecodeParams` come from src/kernel/abi.rs (generated).

const HEAD_VEC: u32 = HEAD_DIM / 4u;
const HALF_D: u32 = HEAD_DIM / 2u;
const WG: u32 = 64u;
// Query rows per workgroup: the variant's ROWS constant (the unroll bound of the loops over
// them), 4 · WG / HEAD_VEC, so that the staged queries take 4 KiB.
const R_MAX: u32 = ROWS;
// Key groups of phase 4: invocations (g, c) with c < HEAD_VEC fold keys g, g + KG, ...
const KG: u32 = WG / HEAD_VEC;
const LOG2E: f32 = 1.4426950408889634;
const ROTATES: bool = POS_KIND == POS_ROPE || POS_KIND == POS_XPOS || CUSTOM_ROTATE;
const TABLE_BIAS: bool = POS_KIND == POS_TABLE;

var<workgroup> q_sh: array<vec4<f32>, R_MAX * HEAD_VEC>;
var<workgroup> k_tile: array<vec4<f32>, BLOCK_K * HEAD_VEC>;
var<workgroup> s_sh: array<f32, R_MAX * BLOCK_K>;
var<workgroup> p_sh: array<f32, R_MAX * BLOCK_K>;
// Running max of each row, double-buffered: [cur] before the tile, [1 − cur] after it.
var<workgroup> m_sh: array<f32, 2u * R_MAX>;
// Running sum of each row.
var<workgroup> l_sh: array<f32, R_MAX>;
var<workgroup> qpos_sh: array<i32, R_MAX>;
var<workgroup> nan_sh: array<atomic<u32>, R_MAX>;
var<workgroup> kslot_sh: array<u32, BLOCK_K>;
var<workgroup> kpos_sh: array<i32, BLOCK_K>;
var<workgroup> lens_sh: vec2<u32>;

// Tensor access, one function per tensor and direction, through the variant's storage accessors
// (q_at4, k_at4, v_at4, o_put4: f32, native or packed f16, or bf16; src/kernel/storage.rs).
fn load_q4(b: u32, qi: u32, head: u32, c: u32) -> vec4<f32> {
    return q_at4(((b * dparams.max_q + qi) * params.num_heads + head) * HEAD_VEC + c);
}

fn load_k4(b: u32, slot: u32, kv: u32, c: u32) -> vec4<f32> {
    return k_at4(((b * dparams.capacity + slot) * params.num_kv_heads + kv) * HEAD_VEC + c);
}

fn load_v4(b: u32, slot: u32, kv: u32, c: u32) -> vec4<f32> {
    return v_at4(((b * dparams.capacity + slot) * params.num_kv_heads + kv) * HEAD_VEC + c);
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

// Two vec4s of channels.
struct Vec4Pair {
    a: vec4<f32>,
    b: vec4<f32>,
}

// Rotates the four pairs (a[e], b[e]) = pairs i0 + e (the half layout's vec4 u and its partner
// vec4 u + rotary_dim / 8) with position.wgsl's rope_rotate.
fn rotate_half4(x: Vec4Pair, i0: u32, pos: i32, rel: i32, sign: f32) -> Vec4Pair {
    let p0 = rope_rotate(vec2<f32>(x.a.x, x.b.x), i0, pos, rel, sign);
    let p1 = rope_rotate(vec2<f32>(x.a.y, x.b.y), i0 + 1u, pos, rel, sign);
    let p2 = rope_rotate(vec2<f32>(x.a.z, x.b.z), i0 + 2u, pos, rel, sign);
    let p3 = rope_rotate(vec2<f32>(x.a.w, x.b.w), i0 + 3u, pos, rel, sign);
    return Vec4Pair(vec4<f32>(p0.x, p1.x, p2.x, p3.x), vec4<f32>(p0.y, p1.y, p2.y, p3.y));
}

// Rotates the two pairs of an interleaved-layout vec4 (pairs i0 and i0 + 1).
fn rotate_interleaved4(x: vec4<f32>, i0: u32, pos: i32, rel: i32, sign: f32) -> vec4<f32> {
    return vec4<f32>(rope_rotate(x.xy, i0, pos, rel, sign),
                     rope_rotate(x.zw, i0 + 1u, pos, rel, sign));
}

// Stages vec4 slot u of one row (a query when `is_q`, else a key) into `dst` at `base`:
// rotated unless `rotate` is false, times `mul`. In the half layout the slots below
// rotary_dim / 8 carry their partner vec4 too and the slots up to rotary_dim / 4 have nothing
// to do; the host checks that rotary_dim is a multiple of 8 (half) or 4 (interleaved).
// Returns the two vec4s and whether the second one is written (at u + rotary_dim / 8).
fn stage_vec4(is_q: bool, b: u32, row: u32, head: u32, u: u32, valid: bool, rotate: bool,
              pos: i32, rel: i32, mul: f32) -> Vec4Pair {
    let rot = select(0u, params.rotary_dim, ROTATES);
    var x = Vec4Pair(vec4<f32>(0.0), vec4<f32>(0.0));
    let half_v = select(rot / 8u, 0u, params.rope_interleaved != 0u);
    if (!valid || (u >= half_v && u < 2u * half_v)) {
        return x;
    }
    let sign = select(-1.0, 1.0, is_q);
    if (is_q) {
        x.a = load_q4(b, row, head, u);
    } else {
        x.a = load_k4(b, row, head, u);
    }
    if (u < half_v) {
        if (is_q) {
            x.b = load_q4(b, row, head, u + half_v);
        } else {
            x.b = load_k4(b, row, head, u + half_v);
        }
        if (rotate) {
            x = rotate_half4(x, 4u * u, pos, rel, sign);
        }
    } else if (params.rope_interleaved != 0u && rotate && u < rot / 4u) {
        x.a = rotate_interleaved4(x.a, 2u * u, pos, rel, sign);
    }
    x.a *= mul;
    x.b *= mul;
    return x;
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
    let rot = select(0u, params.rotary_dim, ROTATES);
    let sinks = i32(params.sink_tokens);
    let has_sink_logits = params.sink_logit_offset != NO_SINK_LOGITS && split == 0u;

    // Rows: running max (a sink logit starts it, in the first chunk only), NaN flag, position.
    for (var lr = lid; lr < R_MAX; lr += WG) {
        let head = kv * group + (row0 + lr) % group;
        var m0 = MASKED;
        if (has_sink_logits) {
            m0 = aux_f(params.sink_logit_offset + head) * LOG2E;
        }
        m_sh[lr] = m0;
        l_sh[lr] = select(0.0, 1.0, has_sink_logits);
        atomicStore(&nan_sh[lr], 0u);
        qpos_sh[lr] = query_position(b, (row0 + min(lr, n_rows - 1u)) / group, diag);
    }
    // Queries, rotated and times scale · log2 e (and the log-n factor).
    let half_v = select(rot / 8u, 0u, params.rope_interleaved != 0u);
    for (var idx = lid; idx < R_MAX * HEAD_VEC; idx += WG) {
        let lr = idx / HEAD_VEC;
        let u = idx % HEAD_VEC;
        let gr = row0 + min(lr, n_rows - 1u);
        let qi = gr / group;
        let head = kv * group + gr % group;
        let pos = query_position(b, qi, diag);
        let x = stage_vec4(true, b, qi, head, u, lr < n_rows, true, pos, pos - origin,
                           params.scale_log2 * logn_scale(pos));
        if (u < half_v || u >= 2u * half_v) {
            q_sh[lr * HEAD_VEC + u] = x.a;
        }
        if (u < half_v) {
            q_sh[lr * HEAD_VEC + u + half_v] = x.b;
        }
    }

    // The key tiles any row of the block can see, as in the prefill kernel.
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
    let n_sink_tiles = (u32(sink_hi) + BLOCK_K - 1u) / BLOCK_K;
    let win_t0 = max(u32(lo) / BLOCK_K, n_sink_tiles);
    let win_t1 = max((u32(hi) + BLOCK_K - 1u) / BLOCK_K, win_t0);
    let n_tiles = n_sink_tiles + win_t1 - win_t0;
    // This workgroup's chunk of them.
    let chunk = (n_tiles + splits - 1u) / splits;
    let t_begin = min(split * chunk, n_tiles);
    let t_end = min(t_begin + chunk, n_tiles);

    // This invocation's slice c of every row's output, over key group g's keys.
    var acc: array<vec4<f32>, R_MAX>;
    let g = lid / HEAD_VEC;
    let c = lid % HEAD_VEC;
    // @unroll
    for (var r = 0u; r < ROWS; r++) {
        acc[r] = vec4<f32>(0.0);
    }
    var cur = 0u;
    workgroupBarrier();
    for (var t = t_begin; t < t_end; t++) {
        let tile = select(win_t0 + t - n_sink_tiles, t, t < n_sink_tiles);
        let key0 = tile * BLOCK_K;
        workgroupBarrier();
        // Phase 1: stage the keys (rotated), their slots and positions.
        for (var idx = lid; idx < BLOCK_K * HEAD_VEC; idx += WG) {
            let j = idx / HEAD_VEC;
            let u = idx % HEAD_VEC;
            let key = key0 + j;
            let valid = key < k_len;
            var slot = 0u;
            var pos = 0;
            if (valid) {
                slot = slot_of(key);
                pos = pos_k[b * cap + slot];
            }
            if (u == 0u) {
                kslot_sh[j] = slot;
                kpos_sh[j] = pos;
            }
            let x = stage_vec4(false, b, slot, kv, u, valid, dparams.keys_rotated == 0u, pos,
                               pos - origin, 1.0);
            if (u < half_v || u >= 2u * half_v) {
                k_tile[j * HEAD_VEC + u] = x.a;
            }
            if (u < half_v) {
                k_tile[j * HEAD_VEC + u + half_v] = x.b;
            }
        }
        workgroupBarrier();
        // Phase 2: one invocation per key: its scores against every row (the staged queries'
        // indices are constants after unrolling, so only the key's reads vary by invocation),
        // modified and masked (MASKED marks a hidden key).
        for (var j = lid; j < BLOCK_K; j += WG) {
            var d: array<vec4<f32>, R_MAX>;
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                d[r] = vec4<f32>(0.0);
            }
            // @unroll
            for (var c = 0u; c < HEAD_VEC; c++) {
                let k = k_tile[j * HEAD_VEC + c];
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    d[r] = fma(q_sh[r * HEAD_VEC + c], k, d[r]);
                }
            }
            let key = key0 + j;
            let kk = i32(key);
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                if (r < n_rows) {
                    let gr = row0 + r;
                    let head = kv * group + gr % group;
                    let ip = i32(gr / group) + diag;
                    var vis = key < k_len && (params.causal == 0u || kk <= ip)
                        && (in_window(vec4<i32>(kk), ip).x || kk < sinks);
                    // A custom scheme's hooks (identities in every other variant), with the
                    // query's index among its sequence's new queries and the key's index.
                    let qi = gr / group;
                    if (CUSTOM_MASK && vis) {
                        vis = pa_mask4(qpos_sh[r], vec4<i32>(kpos_sh[j]), head, qi,
                                       vec4<u32>(key)).x;
                    }
                    var s = MASKED;
                    if (vis) {
                        let dr = d[r];
                        s = modify_score((dr.x + dr.y) + (dr.z + dr.w), head, qpos_sh[r],
                                         kpos_sh[j]);
                        if (CUSTOM_SCORE) {
                            s = pa_score4(vec4<f32>(s), qpos_sh[r], vec4<i32>(kpos_sh[j]), head,
                                          qi, vec4<u32>(key)).x;
                        }
                        // A NaN at a visible key makes the row NaN, as in a plain softmax.
                        if (is_nan_bits(s)) {
                            atomicOr(&nan_sh[r], 1u);
                            s = MASKED;
                        }
                    }
                    s_sh[r * BLOCK_K + j] = s;
                }
            }
        }
        workgroupBarrier();
        // Phase 3: one invocation per row: the new running max and sum, and the keys' weights
        // (−1: hidden).
        for (var r = lid; r < n_rows; r += WG) {
            var tmax = MASKED;
            for (var j = 0u; j < BLOCK_K; j++) {
                tmax = max(tmax, s_sh[r * BLOCK_K + j]);
            }
            let m_old = m_sh[cur * R_MAX + r];
            let m_new = max(m_old, tmax);
            m_sh[(1u - cur) * R_MAX + r] = m_new;
            var l = l_sh[r] * exp2(m_old - m_new);
            for (var j = 0u; j < BLOCK_K; j++) {
                let s = s_sh[r * BLOCK_K + j];
                let p = select(-1.0, exp2(s - m_new), s > MASKED);
                p_sh[r * BLOCK_K + j] = p;
                l += max(p, 0.0);
            }
            l_sh[r] = l;
        }
        workgroupBarrier();
        // Phase 4: rescale and fold the tile's V rows into every row's slice c. Hidden keys
        // are never multiplied in, so whatever their slots hold cannot reach the output.
        if (g < KG) {
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                if (r < n_rows) {
                    acc[r] *= exp2(m_sh[cur * R_MAX + r] - m_sh[(1u - cur) * R_MAX + r]);
                }
            }
            for (var j = g; j < BLOCK_K; j += KG) {
                let v = load_v4(b, kslot_sh[j], kv, c);
                // @unroll
                for (var r = 0u; r < ROWS; r++) {
                    if (r < n_rows) {
                        let p = p_sh[r * BLOCK_K + j];
                        if (p >= 0.0) {
                            acc[r] = fma(vec4<f32>(p), v, acc[r]);
                        }
                    }
                }
            }
        }
        cur = 1u - cur;
    }

    // Sum the key groups' accumulators into group 0's, through q_sh (no longer needed).
    for (var g2 = 1u; g2 < KG; g2++) {
        workgroupBarrier();
        if (g == g2) {
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                q_sh[r * HEAD_VEC + c] = acc[r];
            }
        }
        workgroupBarrier();
        if (g == 0u) {
            // @unroll
            for (var r = 0u; r < ROWS; r++) {
                acc[r] += q_sh[r * HEAD_VEC + c];
            }
        }
    }

    // A NaN built at run time (WGSL forbids a constant expression that evaluates to NaN).
    var nan_bits = 0x7fc00000u;
    let nan = bitcast<f32>(nan_bits);
    if (g == 0u) {
        // @unroll
        for (var r = 0u; r < ROWS; r++) {
            if (r < n_rows) {
                let gr = row0 + r;
                let qi = gr / group;
                let head = kv * group + gr % group;
                let row_nan = atomicLoad(&nan_sh[r]) != 0u;
                let l = l_sh[r];
                if (splits == 1u) {
                    let out = select(vec4<f32>(0.0), acc[r] * (1.0 / l), l > 0.0);
                    store_o4(b, qi, head, c, select(out, vec4<f32>(nan), row_nan));
                } else {
                    let base = partial_index(b, qi, head, split);
                    partials[base + c] = acc[r];
                    if (c == 0u) {
                        let m = m_sh[cur * R_MAX + r];
                        partials[base + HEAD_VEC] =
                            vec4<f32>(m, select(l, nan, row_nan), 0.0, 0.0);
                    }
                }
            }
        }
    }
}

// Merges the chunks of one (sequence, new query, head): O = Σ acc_s 2^(m_s − M) / Σ l_s 2^(m_s − M)
// with M the largest running max; 0 when no key was visible, NaN when a chunk saw a NaN score.
@compute @workgroup_size(WG)
fn decode_reduce(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qi = wg.x;
    let head = wg.y;
    let b = wg.z;
    if (qi >= seq_lengths(b).x) {
        return;
    }
    let splits = dparams.splits;
    let base0 = partial_index(b, qi, head, 0u);
    let stride = HEAD_VEC + 1u;
    var m = MASKED;
    var row_nan = false;
    for (var s = 0u; s < splits; s++) {
        let ml = partials[base0 + s * stride + HEAD_VEC];
        m = max(m, ml.x);
        row_nan = row_nan || is_nan_bits(ml.y);
    }
    var nan_bits = 0x7fc00000u;
    let nan4 = vec4<f32>(bitcast<f32>(nan_bits));
    for (var c = lid; c < HEAD_VEC; c += WG) {
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
}
