// The unfused attention pipeline a user would otherwise write, kept as the baseline that the fused
// kernel is measured against: a RoPE pass that writes rotated Q and K, a scores pass that writes
// the seq_q × seq_k matrix, a row softmax over it, then P·V. Four dispatches, each a plain
// WGSL kernel in a reasonable style (64×64 register-blocked tiles for the two products).
//
// Shares `Params` and the position math with attention.wgsl; its bindings, like the fused
// kernel's, are generated from src/kernel/abi.rs.

const TILE: u32 = 64u;
const KSTEP: u32 = 16u;

// Pass 1: rotate one tensor ([batch, seq, heads, HEAD_DIM] in src_a) into dst. The host binds Q or
// K, with `num_heads` and `seq_q` set to that tensor's head count and length.
@compute @workgroup_size(256)
fn rope_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let total = params.batch * params.seq_q * params.num_heads * HEAD_DIM;
    if (i >= total) {
        return;
    }
    let ch = i % HEAD_DIM;
    let token = i / (HEAD_DIM * params.num_heads);
    let base = i - ch;
    var x = src_a[i];
    let r = params.rotary_dim;
    if (POS_KIND == POS_ROPE && ch < r) {
        var pair = ch / 2u;
        if (params.rope_interleaved == 0u) {
            pair = select(ch - r / 2u, ch, ch < r / 2u);
        }
        let chs = rope_pair_channels(pair, r);
        let y = rope_rotate(vec2<f32>(src_a[base + chs.x], src_a[base + chs.y]), pair,
                            positions[token], 0, 1.0);
        x = select(y.y, y.x, ch == chs.x);
    }
    dst[i] = x;
}

var<workgroup> tile_a: array<vec4<f32>, KSTEP * 16u>;
var<workgroup> tile_b: array<vec4<f32>, KSTEP * 16u>;

// Pass 2: S[b, h, i, j] = scale · q_i · k_j (+ causal mask), written to device memory.
@compute @workgroup_size(16, 16)
fn scores(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bh = wg.z;
    let b = bh / params.num_heads;
    let h = bh % params.num_heads;
    let kvh = h / (params.num_heads / params.num_kv_heads);
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < HEAD_DIM; k0 += KSTEP) {
        workgroupBarrier();
        // 256 threads load 64 rows × 16 channels of each operand, stored [k][row].
        for (var e = li; e < TILE * KSTEP; e += 256u) {
            let rr = e / KSTEP;
            let kk = e % KSTEP;
            let ch = k0 + kk;
            var a = 0.0;
            var bv = 0.0;
            if (row0 + rr < params.seq_q && ch < HEAD_DIM) {
                a = src_a[((b * params.seq_q + row0 + rr) * params.num_heads + h) * HEAD_DIM + ch];
            }
            if (col0 + rr < params.seq_k && ch < HEAD_DIM) {
                bv = src_b[((b * params.seq_k + col0 + rr) * params.num_kv_heads + kvh) * HEAD_DIM + ch];
            }
            tile_a[kk * 16u + rr / 4u][rr % 4u] = a;
            tile_b[kk * 16u + rr / 4u][rr % 4u] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KSTEP; kk++) {
            let a = tile_a[kk * 16u + lid.y];
            let bv = tile_b[kk * 16u + lid.x];
            acc[0] = fma(vec4<f32>(a.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(a.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(a.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(a.w), bv, acc[3]);
        }
    }
    let diag = i32(params.seq_k) - i32(params.seq_q);
    for (var r = 0u; r < 4u; r++) {
        let i = row0 + lid.y * 4u + r;
        for (var c = 0u; c < 4u; c++) {
            let j = col0 + lid.x * 4u + c;
            if (i < params.seq_q && j < params.seq_k) {
                var s = acc[r][c] * params.scale;
                if (params.causal != 0u && i32(j) > i32(i) + diag) {
                    s = MASKED;
                }
                dst[((b * params.num_heads + h) * params.seq_q + i) * params.seq_k + j] = s;
            }
        }
    }
}

var<workgroup> red: array<f32, 256>;

// Pass 3: row softmax of S in place; one workgroup per row; fully masked rows become 0.
@compute @workgroup_size(256)
fn softmax_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    let rows = params.batch * params.num_heads * params.seq_q;
    let live = row < rows;
    let base = min(row, rows - 1u) * params.seq_k;
    var m = MASKED;
    for (var j = li; j < params.seq_k; j += 256u) {
        m = max(m, dst[base + j]);
    }
    red[li] = m;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) {
            red[li] = max(red[li], red[li + w]);
        }
        workgroupBarrier();
    }
    m = red[0];
    workgroupBarrier();
    var l = 0.0;
    for (var j = li; j < params.seq_k; j += 256u) {
        let s = dst[base + j];
        l += select(0.0, exp(s - m), s != MASKED);
    }
    red[li] = l;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) {
            red[li] += red[li + w];
        }
        workgroupBarrier();
    }
    l = red[0];
    let inv = select(0.0, 1.0 / l, l > 0.0);
    if (live) {
        for (var j = li; j < params.seq_k; j += 256u) {
            let s = dst[base + j];
            dst[base + j] = select(0.0, exp(s - m) * inv, s != MASKED);
        }
    }
}

// Pass 4: O[b, i, h, :] = Σ_j P[b, h, i, j] · V[b, j, kvh, :].
@compute @workgroup_size(16, 16)
fn pv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bh = wg.z;
    let b = bh / params.num_heads;
    let h = bh % params.num_heads;
    let kvh = h / (params.num_heads / params.num_kv_heads);
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < params.seq_k; k0 += KSTEP) {
        workgroupBarrier();
        for (var e = li; e < TILE * KSTEP; e += 256u) {
            // P tile: 64 rows × 16 keys, stored [key][row].
            let rr = e / KSTEP;
            let kk = e % KSTEP;
            var p = 0.0;
            if (row0 + rr < params.seq_q && k0 + kk < params.seq_k) {
                p = src_a[((b * params.num_heads + h) * params.seq_q + row0 + rr) * params.seq_k + k0 + kk];
            }
            tile_a[kk * 16u + rr / 4u][rr % 4u] = p;
            // V tile: 16 keys × 64 channels, stored [key][channel].
            let vk = e / TILE;
            let vc = e % TILE;
            var v = 0.0;
            if (k0 + vk < params.seq_k && col0 + vc < HEAD_DIM) {
                v = src_b[((b * params.seq_k + k0 + vk) * params.num_kv_heads + kvh) * HEAD_DIM + col0 + vc];
            }
            tile_b[vk * 16u + vc / 4u][vc % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KSTEP; kk++) {
            let a = tile_a[kk * 16u + lid.y];
            let bv = tile_b[kk * 16u + lid.x];
            acc[0] = fma(vec4<f32>(a.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(a.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(a.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(a.w), bv, acc[3]);
        }
    }
    for (var r = 0u; r < 4u; r++) {
        let i = row0 + lid.y * 4u + r;
        for (var c = 0u; c < 4u; c++) {
            let ch = col0 + lid.x * 4u + c;
            if (i < params.seq_q && ch < HEAD_DIM) {
                dst[((b * params.seq_q + i) * params.num_heads + h) * HEAD_DIM + ch] = acc[r][c];
            }
        }
    }
}
