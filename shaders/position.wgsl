// Position math shared by every attention kernel.
//
// The vec4 layout of one frequency entry is the contract's (`freq_entry` in src/kernel/abi.rs).
// The CPU reference (src/harness/reference.rs) computes the same math independently, in f64,
// under the same function names; the conformance matrix compares the two.

// One RoPE frequency, stored as turns per position (inv_freq / 2π) split in three so that the
// product with a 12-bit chunk of a position is exact in f32:
//   x = the leading 12 significant bits, y = the next 12 bits, z = the remainder,
//   w = log2(ζ_i) for xPos (0 for plain RoPE).
// The phase of `pos · inv_freq` is then formed from exact products and exact `fract`s, so the
// angle keeps about 1e-6 turns of accuracy at any position an i32 holds (a plain f32 product loses
// the phase entirely near 1e6).
fn rope_turns(pos: i32, f: vec4<f32>) -> f32 {
    let u = select(u32(pos), 0u - u32(pos), pos < 0);
    let p0 = f32(u & 0xfffu);
    let p1 = f32((u >> 12u) & 0xfffu);
    let p2 = f32(u >> 24u);
    var t = fract(p0 * f.x) + fract(p0 * f.y);
    t = fract(t) + fract(p1 * (f.x * 4096.0)) + fract(p1 * (f.y * 4096.0));
    t = fract(t) + fract(p2 * (f.x * 16777216.0)) + fract(p2 * (f.y * 16777216.0));
    t = fract(t) + fract(f32(u & 0xffffffu) * f.z) + fract(p2 * (f.z * 16777216.0));
    t = fract(t);
    return select(t, -t, pos < 0);
}

// (cos, sin) of 2π·t for t in (-1, 1). Quadrant reduction is exact; the polynomials are Taylor
// series to degree 9/10 on [-π/4, π/4] (truncation below 3e-8), so the result does not depend on
// the backend's sin/cos precision (Vulkan only promises 2^-11 absolute).
fn sincos_turns(t: f32) -> vec2<f32> {
    let x = t * 4.0;
    let k = round(x);
    let r = (x - k) * 1.5707963267948966;
    let r2 = r * r;
    let s = r + r * r2 * (-0.16666666666666666 + r2 * (0.008333333333333333
        + r2 * (-0.0001984126984126984 + r2 * 2.7557319223985893e-6)));
    let c = 1.0 + r2 * (-0.5 + r2 * (0.041666666666666664 + r2 * (-0.001388888888888889
        + r2 * 2.48015873015873e-5)));
    let q = i32(k) & 3;
    if (q == 0) {
        return vec2<f32>(c, s);
    } else if (q == 1) {
        return vec2<f32>(-s, c);
    } else if (q == 2) {
        return vec2<f32>(-c, -s);
    }
    return vec2<f32>(s, -c);
}

// rope_turns for four frequencies at once (their x, y and z parts in fx, fy, fz), the same
// operations lane by lane. A copy on purpose: the vec4 staging built from four scalar calls
// (rope_turns, sincos_turns) ran prefill 6 % slower on lavapipe (head_dim 64, seq 2048).
fn rope_turns4(pos: i32, fx: vec4<f32>, fy: vec4<f32>, fz: vec4<f32>) -> vec4<f32> {
    let u = select(u32(pos), 0u - u32(pos), pos < 0);
    let p0 = f32(u & 0xfffu);
    let p1 = f32((u >> 12u) & 0xfffu);
    let p2 = f32(u >> 24u);
    var t = fract(p0 * fx) + fract(p0 * fy);
    t = fract(t) + fract(p1 * (fx * 4096.0)) + fract(p1 * (fy * 4096.0));
    t = fract(t) + fract(p2 * (fx * 16777216.0)) + fract(p2 * (fy * 16777216.0));
    t = fract(t) + fract(f32(u & 0xffffffu) * fz) + fract(p2 * (fz * 16777216.0));
    t = fract(t);
    return select(t, -t, pos < 0);
}

// sincos_turns for four turns at once: [cos, sin], the quadrant picked by selects.
fn sincos_turns4(t: vec4<f32>) -> array<vec4<f32>, 2> {
    let x = t * 4.0;
    let k = round(x);
    let r = (x - k) * 1.5707963267948966;
    let r2 = r * r;
    let s = r + r * r2 * (-0.16666666666666666 + r2 * (0.008333333333333333
        + r2 * (-0.0001984126984126984 + r2 * 2.7557319223985893e-6)));
    let c = 1.0 + r2 * (-0.5 + r2 * (0.041666666666666664 + r2 * (-0.001388888888888889
        + r2 * 2.48015873015873e-5)));
    let q = vec4<i32>(k) & vec4<i32>(3);
    let q1 = q == vec4<i32>(1);
    let q2 = q == vec4<i32>(2);
    let q3 = q == vec4<i32>(3);
    let cv = select(select(select(c, -s, q1), -c, q2), s, q3);
    let sv = select(select(select(s, c, q1), -s, q2), -c, q3);
    return array<vec4<f32>, 2>(cv, sv);
}

// xPos magnitude for a token at `rel` positions from the tile's origin: ζ^(rel / scale_base).
// `sign` is +1 for queries and -1 for keys (torchscale's `downscale`).
fn xpos_scale(log2_zeta: f32, rel: i32, inv_scale_base: f32, sign: f32) -> f32 {
    return exp2(log2_zeta * (sign * f32(rel) * inv_scale_base));
}

// Log-n attention scaling of a query at `pos` (Qwen's use_logn_attn, ReRoPE's form):
// max(1, ln(pos + 1) / ln(train_len)); 1 when turned off.
fn logn_scale(pos: i32) -> f32 {
    if (params.logn_inv_ln_len == 0.0) {
        return 1.0;
    }
    return max(1.0, log(f32(max(pos, 0)) + 1.0) * params.logn_inv_ln_len);
}

// ALiBi bias in natural-log units for query position m and key position n.
// Causal form: slope · (n − m), which differs from BLOOM's slope · n by a per-row constant that
// softmax removes, and stays small at large positions. Symmetric form: −slope · |m − n|.
fn alibi_bias(slope: f32, m: i32, n: i32, symmetric: bool) -> f32 {
    let delta = f32(m - n);
    return select(-slope * delta, -slope * abs(delta), symmetric);
}

// The two channels of rotation pair i: (i, i + r/2) in the half layout, (2i, 2i + 1) in the
// interleaved one.
fn rope_pair_channels(i: u32, rotary_dim: u32) -> vec2<u32> {
    if (params.rope_interleaved != 0u) {
        return vec2<u32>(2u * i, 2u * i + 1u);
    }
    return vec2<u32>(i, i + rotary_dim / 2u);
}

// Rotates the pair (x_a, x_b) of rotation pair i at position `pos`:
// (x_a cos − x_b sin, x_b cos + x_a sin), with cos and sin scaled by the attention factor and,
// for xPos, by ζ_i^(sign · rel / scale_base).
fn rope_rotate(x: vec2<f32>, i: u32, pos: i32, rel: i32, sign: f32) -> vec2<f32> {
    // A custom scheme's rotate_mod takes RoPE's place (the hook glue, src/encoding/custom.rs).
    if (CUSTOM_ROTATE) {
        return pa_rotate(x, i, pos, sign > 0.0);
    }
    return rope_rotate_freq(x, aux[params.freq_offset + i], pos, rel, sign);
}

// rope_rotate for a pair whose frequency entry f = aux[freq_offset + i] was read already (a
// kernel that rotates the same pairs for many positions reads them once).
fn rope_rotate_freq(x: vec2<f32>, f: vec4<f32>, pos: i32, rel: i32, sign: f32) -> vec2<f32> {
    var cs = sincos_turns(rope_turns(pos, f)) * params.attn_factor;
    if (POS_KIND == POS_XPOS) {
        cs *= xpos_scale(f.w, rel, params.xpos_inv_scale_base, sign);
    }
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.y * cs.x + x.x * cs.y);
}

// Float `i` of the aux table (floats packed four to an entry).
fn aux_f(i: u32) -> f32 {
    return aux[i / 4u][i % 4u];
}

// The second RoPE branch (ReRoPE, LM-Infinite, StreamingLLM cache index): pair i rotated at
// `pos` with the branch's own frequency table, whose `w` holds a constant phase in turns that
// queries add (ReRoPE's w·(1 − 1/k)·θ_i, LM-Infinite's limit·θ_i).
fn rope_rotate_branch(x: vec2<f32>, i: u32, pos: i32, add_phase: bool) -> vec2<f32> {
    let f = aux[params.branch_offset + i];
    var t = rope_turns(pos, vec4<f32>(f.xyz, 0.0));
    if (add_phase) {
        t += f.w;
    }
    let cs = sincos_turns(t) * params.attn_factor;
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.y * cs.x + x.x * cs.y);
}

// Relative-position bias in natural-log units of head h for query position m and key position
// n, for the table-driven encodings (src/harness/reference.rs `position_bias` computes the same
// from the definitions):
//   T5: the head's table by relative position n − m, clamped to ±max_distance (every bucket past
//       it is the last one);
//   KERPLE: −p·ln(1 + a|Δ|) or −a·|Δ|^p with the head's (p, a);
//   Sandwich: (Σ_k cos(Δ·ω_k) − d'/2) · H/(8h), from a table below bias_len, else summed here;
//   FIRE: the MLP at ln(|cΔ| + 1) / (ln(|c·max(m, L)| + 1) + 1e-6).
fn table_bias(h: u32, m: i32, n: i32) -> f32 {
    if (POS_KIND == POS_TABLE && params.pos_kind == POS_FIRE) {
        return fire_bias4(h, m, vec4<i32>(n)).x;
    }
    return distance_bias(h, m, n);
}

// table_bias for four keys of one query.
fn table_bias4(h: u32, m: i32, n: vec4<i32>) -> vec4<f32> {
    if (POS_KIND == POS_TABLE && params.pos_kind == POS_FIRE) {
        return fire_bias4(h, m, n);
    }
    return vec4<f32>(distance_bias(h, m, n.x), distance_bias(h, m, n.y), distance_bias(h, m, n.z),
                     distance_bias(h, m, n.w));
}

// FIRE for four keys of one query: each MLP weight is read once for the four (a software driver
// reads a table at a per-lane address lane by lane, and the MLP reads 3 · width entries).
fn fire_bias4(h: u32, m: i32, n: vec4<i32>) -> vec4<f32> {
    let base = params.bias_offset * 4u;
    let w = params.bias_len;
    let c = params.bias_p0;
    let x = log(abs(c * vec4<f32>(vec4<i32>(m) - n)) + 1.0)
        / (log(abs(c * max(f32(m), params.bias_p1)) + 1.0) + 1e-6);
    let w2 = base + 2u * w + h * w;
    var acc = vec4<f32>(aux_f(base + 2u * w + params.num_heads * w + h));
    for (var j = 0u; j < w; j++) {
        acc += aux_f(w2 + j) * max(aux_f(base + j) * x + aux_f(base + w + j), vec4<f32>(0.0));
    }
    return acc;
}

// T5, KERPLE and Sandwich for one score (table_bias's cases besides FIRE).
fn distance_bias(h: u32, m: i32, n: i32) -> f32 {
    let base = params.bias_offset * 4u;
    let kind = params.pos_kind;
    // T5 and KERPLE have variants of their own (POS_KIND, a constant), and the Table variant
    // serves Sandwich and FIRE: a software driver runs both sides of a branch on the uniform
    // `kind`, and with every body in one variant T5 and KERPLE ran about 2x slower.
    if (POS_KIND == POS_T5) {
        let dmax = i32(params.bias_len);
        let rel = clamp(n - m, -dmax, dmax);
        return aux_f(base + h * u32(2 * dmax + 1) + u32(rel + dmax));
    }
    let dist = abs(m - n);
    if (POS_KIND == POS_KERPLE) {
        let p = aux_f(base + 2u * h);
        let a = aux_f(base + 2u * h + 1u);
        // One logarithm for both kernels (a software driver runs both sides of a branch):
        // log: −p · ln(1 + a|Δ|); power: −a · 2^(p · log2 |Δ|), 0 at Δ = 0.
        let is_log = kind == POS_KERPLE_LOG;
        let l2 = log2(select(f32(dist), 1.0 + a * f32(dist), is_log));
        if (is_log) {
            return -p * 0.6931471805599453 * l2;
        }
        return select(-a * exp2(p * l2), 0.0, dist == 0);
    }
    if (kind == POS_SANDWICH) {
        let len = params.bias_len;
        var s = 0.0;
        if (u32(dist) < len) {
            s = aux_f(base + u32(dist));
        } else {
            let pairs = params.rotary_dim / 2u;
            for (var k = 0u; k < pairs; k++) {
                s += sincos_turns(rope_turns(dist, aux[params.freq_offset + k])).x;
            }
            s -= f32(pairs);
        }
        return s * aux_f(base + len + h);
    }
    return 0.0;
}

// Logit softcap, cap · tanh(s / cap), accurate for every cap (1e-2 to 1e8 are checked). When
// s / cap is tiny (large caps), the result must come out as s itself, but a builtin tanh built
// on exp(2x) − 1 cancels there and loses every digit. So |x| < 1/4 uses tanh's odd series to
// x⁹ (the next term is below 1e-8 relative there), and the rest 1 − 2 / (exp(2|x|) + 1), which
// cancels by at most two bits; |x| is clamped to 10, where tanh is 1 in f32.
fn softcap4(s: vec4<f32>, cap: f32) -> vec4<f32> {
    let x = clamp(s / cap, vec4<f32>(-10.0), vec4<f32>(10.0));
    let x2 = x * x;
    let series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0
        + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
    let far = sign(x) * (1.0 - 2.0 / (exp(2.0 * abs(x)) + 1.0));
    return cap * select(far, series, abs(x) < vec4<f32>(0.25));
}
