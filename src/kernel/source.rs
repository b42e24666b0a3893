//! Composes a variant's WGSL module: the contract generated from [`super::abi`], the variant's
//! constants, the shared sources and the family's source, with the branches its constants decide
//! folded, then unrolls every marked loop.
//!
//! Specialisation needs no preprocessor: each variant choice is a WGSL `const`, and every driver
//! folds `if (POS_KIND == POS_ROPE)` on a constant. The composer folds those branches itself too
//! (`fold_constant_ifs`), so that another form's dead code never reaches naga, whose front end
//! parses and validates every line on each pipeline creation; the source stays valid WGSL
//! without it. What a preprocessor cannot give is unrolling, which the software drivers need (a
//! private array indexed by a loop variable becomes a branch ladder on Mesa's GL path): a loop
//! written as
//!
//! ```text
//! // @unroll
//! for (var c = 0u; c < BOUND; c++) { BODY }
//! ```
//!
//! with BOUND one of the variant's unroll bounds (`HEAD_VEC`, `BLOCK_K`, `ROWS`) becomes
//! `{ const c = 0u; BODY } { const c = 1u; BODY } …`, nested loops included. A marker before
//! anything else is an error, never a loop left as written.

use super::abi::{self, Family};
use super::storage::{StorageForm, family_tensors};
use super::variants::{KernelKey, LaneReduce, ScoreTile};

pub(crate) const COMMON_WGSL: &str = include_str!("../../shaders/common.wgsl");
pub(crate) const STORAGE_WGSL: &str = include_str!("../../shaders/storage.wgsl");
pub(crate) const POSITION_WGSL: &str = include_str!("../../shaders/position.wgsl");
pub(crate) const ATTENTION_WGSL: &str = include_str!("../../shaders/attention.wgsl");
pub(crate) const UNFUSED_WGSL: &str = include_str!("../../shaders/unfused.wgsl");
pub(crate) const DECODE_WGSL: &str = include_str!("../../shaders/decode.wgsl");

/// The line that marks a loop for unrolling.
pub const UNROLL_MARK: &str = "// @unroll";

/// Why a shader source could not be composed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ComposeError {
    #[error(
        "a `// @unroll` loop must read `for (var NAME = 0u; NAME < BOUND; NAME++) {{`; found `{0}`"
    )]
    /// A marked loop that is not `for (var i = 0u; i < BOUND; i++) {`.
    LoopShape(String),
    #[error("unroll bound `{bound}` in `{header}` is none of {known:?}")]
    /// A marked loop whose bound is not a known constant.
    UnknownBound {
        /// The loop header.
        header: String,
        /// The bound it names.
        bound: String,
        /// The bounds that are known.
        known: Vec<&'static str>,
    },
    #[error("the body of `{0}` has no closing brace")]
    /// A marked loop without its closing brace.
    Unclosed(String),
    #[error("a custom scheme's variant needs its hooks, and only it takes them")]
    /// Hooks given to a variant that takes none, or none to one that needs them.
    Hooks,
}

/// The whole module of `key`: the header, the contract, the family's source with its loops
/// unrolled, then the hook glue: a custom scheme's (`hooks`, ending with its snippet, so that
/// snippet lines map back by a fixed offset), or the identity hooks every other variant gets.
pub(crate) fn compose(key: &KernelKey, hooks: Option<&str>) -> Result<String, ComposeError> {
    if (key.custom != 0) != hooks.is_some() {
        return Err(ComposeError::Hooks);
    }
    let family = match key.family() {
        Family::Fused => ATTENTION_WGSL,
        Family::Unfused => UNFUSED_WGSL,
        Family::Decode => DECODE_WGSL,
    };
    // The half-storage helpers only where a tensor is stored in half: pack2x16float needs a
    // capability (f16 in f32) that a kernel with f32 storage should not ask for.
    let storage = if key.storage.iter().any(|s| *s != StorageForm::F32) {
        STORAGE_WGSL
    } else {
        ""
    };
    // Branches the variant's constants decide are folded before unrolling, so that another
    // form's dead loops are never expanded.
    let source = format!("{COMMON_WGSL}\n{storage}\n{POSITION_WGSL}\n{family}");
    let consts = module_constants(&format!(
        "{}\n{}\n{source}",
        key.wgsl_header(),
        abi::wgsl_declarations_with(&key.bindings())
    ));
    let body = unroll(&fold_constant_ifs(&source, &consts), &key.unroll_bounds())?;
    // The tensor accessors of the variant's storage forms (src/kernel/storage.rs).
    let mut accessors = String::new();
    if let Some(tensors) = family_tensors(key.family()) {
        for (form, (buffer, name, accessor)) in key.storage.iter().zip(tensors) {
            accessors += &form.accessor(*accessor, name, buffer);
        }
    }
    // P·V's types in the fused row form and the decode kernel: f32, or f16 with f16
    // accumulation (KernelKey::half_acc).
    if matches!(key.family(), Family::Fused | Family::Decode) {
        accessors += if key.half_acc {
            "alias pv_t = f16;\nalias pv4 = vec4<f16>;\n"
        } else {
            "alias pv_t = f32;\nalias pv4 = vec4<f32>;\n"
        };
    }
    if key.family() == Family::Decode {
        accessors += lane_sum_wgsl(key.lane_reduce);
        // The caller's bias: read only by the variants that bind `user_bias`.
        accessors += if key.bias {
            "const USER_BIAS: bool = true;\nfn user_bias_at(i: u32) -> f32 {\n    return user_bias[i];\n}\n"
        } else {
            "const USER_BIAS: bool = false;\nfn user_bias_at(i: u32) -> f32 {\n    return 0.0;\n}\n"
        };
    }
    if key.family() == Family::Fused {
        accessors += lane_sum4_wgsl(key.lane_reduce, key.row_lanes());
        // The workgroup-memory lane reduction's array, only in the variants that use it.
        accessors += if super::variants::lane_red_len(key) > 1 {
            "var<workgroup> lane_red: array<vec4<f32>, RED_LEN>;\n\
             fn lane_red_put(i: u32, x: vec4<f32>) {\n    lane_red[i] = x;\n}\n\
             fn lane_red_get(i: u32) -> vec4<f32> {\n    return lane_red[i];\n}\n"
        } else {
            "fn lane_red_put(i: u32, x: vec4<f32>) {}\n\
             fn lane_red_get(i: u32) -> vec4<f32> {\n    return vec4<f32>(0.0);\n}\n"
        };
        accessors += &score_tile_wgsl(key.scores);
        // The row's log-sum-exp: written only by the variants that bind `lse_buf`.
        accessors += if key.lse {
            "fn store_lse(i: u32, x: f32) {\n    lse_buf[i] = x;\n}\n"
        } else {
            "fn store_lse(i: u32, x: f32) {}\n"
        };
    }
    let enable = if key.scores.coop() {
        "enable f16;\nenable wgpu_cooperative_matrix;\n"
    } else if key.native_f16() {
        "enable f16;\n"
    } else {
        ""
    };
    // The subgroup builtins the cooperative-matrix forms split the score tile's fragments by;
    // every other variant names the same two values as constants.
    let (mut builtins, mut ids) = if key.scores.coop() {
        (
            "    @builtin(subgroup_id) sg_id: u32,\n    @builtin(num_subgroups) n_sg: u32,\n"
                .to_string(),
            String::new(),
        )
    } else {
        (
            String::new(),
            "    let sg_id = 0u;\n    let n_sg = 1u;\n".to_string(),
        )
    };
    // The shared tile reads (KernelKey::tile_share): the invocation's index in its subgroup,
    // and `tile_bcast` is subgroupBroadcast itself (its lane index must be a constant
    // expression, which a function parameter is not). Elsewhere the form's code is dead and
    // `tile_bcast` a plain function, so the module names no subgroup operation.
    let mut body = body.to_string();
    if key.family() == Family::Fused {
        if key.tile_share > 0 {
            builtins += "    @builtin(subgroup_invocation_id) sg_lane: u32,\n";
            body = body.replace("tile_bcast(", "subgroupBroadcast(");
        } else {
            ids += "    let sg_lane = 0u;\n";
            accessors += "fn tile_bcast(x: vec4<f32>, i: u32) -> vec4<f32> {\n    return x;\n}\n";
        }
    }
    let body = body
        .replace("    // @score-tile-builtins\n", &builtins)
        .replace("    // @score-tile-ids\n", &ids);
    let hooks = match hooks {
        Some(h) => h.to_string(),
        None => crate::encoding::custom::default_hooks_wgsl(),
    };
    // The hooks come last: a custom snippet's lines map back by their offset from the end.
    Ok(format!(
        "{enable}{}\n{}\n{accessors}\n{}\n{}",
        key.wgsl_header(),
        abi::wgsl_declarations_with(&key.bindings()),
        body,
        hooks
    ))
}

/// The fused kernel's score-tile functions for `scores` (shaders/attention.wgsl calls them only
/// where `MMA != 0`): `mma_put_q` and `mma_put_k` store one staged channel of the Q and K
/// tiles (rounded to f16), `mma_product` forms the BLOCK_Q × BLOCK_K score tile in workgroup
/// memory and `mma_score` reads one score. The row form gets empty stubs and no arrays, so its
/// workgroup memory stays within WebGPU's default limit.
fn score_tile_wgsl(scores: ScoreTile) -> String {
    let qk = match scores.without_pv() {
        ScoreTile::Rows => "fn mma_put_q(i: u32, x: f32) {}\nfn mma_put_k(i: u32, x: f32) {}\n\
             fn mma_product(sg: u32, nsg: u32, lid: u32) {}\n\
             fn mma_score(i: u32) -> f32 {\n    return 0.0;\n}\n\
             fn mma_set_score(i: u32, x: f32) {}\n"
            .to_string(),
        // f32 arrays holding f16 values (quantizeToF16 needs no f16 type, only the f16-in-f32
        // conversions every WebGPU device has): the same operands as the cooperative-matrix
        // forms, accumulated in f32.
        ScoreTile::Emulated => "var<workgroup> mq: array<f32, MQ_LEN>;\n\
             var<workgroup> mk: array<f32, MK_LEN>;\n\
             var<workgroup> s_tile: array<f32, S_LEN>;\n\
             fn mma_put_q(i: u32, x: f32) {\n    mq[i] = quantizeToF16(x);\n}\n\
             fn mma_put_k(i: u32, x: f32) {\n    mk[i] = quantizeToF16(x);\n}\n\
             fn mma_product(sg: u32, nsg: u32, lid: u32) {\n    \
                 for (var e = lid; e < BLOCK_Q * BLOCK_K; e += WG_SIZE) {\n        \
                     let qb = (e / BLOCK_K) * HEAD_DIM;\n        \
                     let kb = (e % BLOCK_K) * HEAD_DIM;\n        \
                     var acc = 0.0;\n        \
                     for (var c = 0u; c < HEAD_DIM; c++) {\n            \
                         acc = fma(mq[qb + c], mk[kb + c], acc);\n        }\n        \
                     s_tile[(e / BLOCK_K) * S_STRIDE + e % BLOCK_K] = acc;\n    }\n}\n\
             fn mma_score(i: u32) -> f32 {\n    return s_tile[(i / BLOCK_K) * S_STRIDE + i % BLOCK_K];\n}\n\
             fn mma_set_score(i: u32, x: f32) {\n    s_tile[(i / BLOCK_K) * S_STRIDE + i % BLOCK_K] = x;\n}\n"
            .to_string(),
        // Each subgroup takes fragments sg, sg + nsg, ... of the tile: A is a row-major slice
        // of the Q tile, B = Kᵀ a column-major view of the row-major K tile, the accumulator
        // is stored row-major into the score tile.
        ScoreTile::Coop8 | ScoreTile::Coop16 => {
            let t = scores.fragment();
            format!(
                "var<workgroup> mq: array<f16, MQ_LEN>;\n\
                 var<workgroup> mk: array<f16, MK_LEN>;\n\
                 var<workgroup> s_tile: array<f32, S_LEN>;\n\
                 fn mma_put_q(i: u32, x: f32) {{\n    mq[i] = f16(x);\n}}\n\
                 fn mma_put_k(i: u32, x: f32) {{\n    mk[i] = f16(x);\n}}\n\
                 const MMA_FQ: u32 = BLOCK_Q / MMA_FRAG;\nconst MMA_FK: u32 = BLOCK_K / MMA_FRAG;\n\
                 fn mma_product(sg: u32, nsg: u32, lid: u32) {{\n    \
                     for (var f = sg; f < MMA_FQ * MMA_FK; f += nsg) {{\n        \
                         let r0 = (f / MMA_FK) * MMA_FRAG;\n        \
                         let k0 = (f % MMA_FK) * MMA_FRAG;\n        \
                         var acc = coop_mat{t}x{t}<f32, C>();\n        \
                         for (var c = 0u; c < HEAD_DIM; c += MMA_FRAG) {{\n            \
                             let a = coopLoadT<coop_mat{t}x{t}<f16, A>>(&mq[r0 * HEAD_DIM + c], HEAD_DIM);\n            \
                             let b = coopLoad<coop_mat{t}x{t}<f16, B>>(&mk[k0 * HEAD_DIM + c], HEAD_DIM);\n            \
                             acc = coopMultiplyAdd(a, b, acc);\n        }}\n        \
                         coopStoreT(acc, &s_tile[r0 * S_STRIDE + k0], S_STRIDE);\n    }}\n}}\n\
                 fn mma_score(i: u32) -> f32 {{\n    return s_tile[(i / BLOCK_K) * S_STRIDE + i % BLOCK_K];\n}}\n\
                 fn mma_set_score(i: u32, x: f32) {{\n    s_tile[(i / BLOCK_K) * S_STRIDE + i % BLOCK_K] = x;\n}}\n"
            )
        }
        _ => unreachable!("without_pv gives a score form"),
    };
    qk + &pv_tile_wgsl(scores)
}

/// The P·V tile product's functions (shaders/attention.wgsl calls them only where `PV_MMA`):
/// `mma_put_p` and `mma_put_v` store one softmax weight and one vec4 of V (rounded to f16),
/// `mma_p` and `mma_v4` read them back, `mma_pv(rd, ...)` forms the output channels
/// `rd · PV_CH ..` of every row of the workgroup into `o_part` and `mma_opart4` reads four of
/// them; `pv_flag_keys` marks keys whose V holds a value that is not finite in f16,
/// `pv_flagged` reads the marks and `pv_flags_clear` clears them. Other forms get stubs.
fn pv_tile_wgsl(scores: ScoreTile) -> String {
    let common = "var<workgroup> o_part: array<f32, OP_LEN>;\n\
         var<workgroup> v_nf: atomic<u32>;\n\
         fn mma_v4(i: u32) -> vec4<f32> {\n    \
             return vec4<f32>(f32(mv[4u * i]), f32(mv[4u * i + 1u]), f32(mv[4u * i + 2u]), f32(mv[4u * i + 3u]));\n}\n\
         fn mma_opart4(i: u32) -> vec4<f32> {\n    \
             let o = (i / PV_VEC) * OP_STRIDE + 4u * (i % PV_VEC);\n    \
             return vec4<f32>(o_part[o], o_part[o + 1u], o_part[o + 2u], o_part[o + 3u]);\n}\n\
         fn pv_flag_keys(bits: u32) {\n    atomicOr(&v_nf, bits);\n}\n\
         fn pv_flagged() -> u32 {\n    return atomicLoad(&v_nf);\n}\n\
         fn pv_flags_clear() {\n    atomicStore(&v_nf, 0u);\n}\n";
    match scores {
        // The P tile shares the score tile (each weight replaces its own score), which keeps
        // the form within a CPU adapter's 32 KiB of workgroup memory at head size 64.
        ScoreTile::EmulatedPv => format!(
            "var<workgroup> mv: array<f32, MV_LEN>;\n{common}\
             fn mma_put_p(i: u32, x: f32) {{\n    mma_set_score(i, quantizeToF16(x));\n}}\n\
             fn mma_p(i: u32) -> f32 {{\n    return mma_score(i);\n}}\n\
             fn mma_put_v(i: u32, x: vec4<f32>) {{\n    \
                 mv[4u * i] = quantizeToF16(x.x);\n    mv[4u * i + 1u] = quantizeToF16(x.y);\n    \
                 mv[4u * i + 2u] = quantizeToF16(x.z);\n    mv[4u * i + 3u] = quantizeToF16(x.w);\n}}\n\
             fn mma_pv(rd: u32, sg: u32, nsg: u32, lid: u32) {{\n    \
                 for (var e = lid; e < BLOCK_Q * PV_CH; e += WG_SIZE) {{\n        \
                     let row = e / PV_CH;\n        \
                     let c = rd * PV_CH + e % PV_CH;\n        \
                     var acc = 0.0;\n        \
                     for (var k = 0u; k < BLOCK_K; k++) {{\n            \
                         acc = fma(s_tile[row * S_STRIDE + k], mv[k * HEAD_DIM + c], acc);\n        }}\n        \
                     o_part[row * OP_STRIDE + e % PV_CH] = acc;\n    }}\n}}\n"
        ),
        // A is a row-major slice of the P tile, B a row-major slice of the V tile (keys ×
        // channels), the accumulator stored row-major into the output slice.
        ScoreTile::Coop8Pv | ScoreTile::Coop16Pv => {
            let t = scores.fragment();
            format!(
                "var<workgroup> mp: array<f16, MP_LEN>;\n\
                 var<workgroup> mv: array<f16, MV_LEN>;\n{common}\
                 fn mma_put_p(i: u32, x: f32) {{\n    mp[(i / BLOCK_K) * P_STRIDE + i % BLOCK_K] = f16(x);\n}}\n\
                 fn mma_p(i: u32) -> f32 {{\n    return f32(mp[(i / BLOCK_K) * P_STRIDE + i % BLOCK_K]);\n}}\n\
                 fn mma_put_v(i: u32, x: vec4<f32>) {{\n    \
                     mv[4u * i] = f16(x.x);\n    mv[4u * i + 1u] = f16(x.y);\n    \
                     mv[4u * i + 2u] = f16(x.z);\n    mv[4u * i + 3u] = f16(x.w);\n}}\n\
                 const MMA_FC: u32 = PV_CH / MMA_FRAG;\n\
                 fn mma_pv(rd: u32, sg: u32, nsg: u32, lid: u32) {{\n    \
                     for (var f = sg; f < MMA_FQ * MMA_FC; f += nsg) {{\n        \
                         let r0 = (f / MMA_FC) * MMA_FRAG;\n        \
                         let c0 = (f % MMA_FC) * MMA_FRAG;\n        \
                         var acc = coop_mat{t}x{t}<f32, C>();\n        \
                         for (var k = 0u; k < BLOCK_K; k += MMA_FRAG) {{\n            \
                             let a = coopLoadT<coop_mat{t}x{t}<f16, A>>(&mp[r0 * P_STRIDE + k], P_STRIDE);\n            \
                             let b = coopLoadT<coop_mat{t}x{t}<f16, B>>(&mv[k * HEAD_DIM + rd * PV_CH + c0], HEAD_DIM);\n            \
                             acc = coopMultiplyAdd(a, b, acc);\n        }}\n        \
                         coopStoreT(acc, &o_part[r0 * OP_STRIDE + c0], OP_STRIDE);\n    }}\n}}\n"
            )
        }
        _ => "fn mma_put_p(i: u32, x: f32) {}\nfn mma_put_v(i: u32, x: vec4<f32>) {}\n\
              fn mma_p(i: u32) -> f32 {\n    return 0.0;\n}\n\
              fn mma_v4(i: u32) -> vec4<f32> {\n    return vec4<f32>(0.0);\n}\n\
              fn mma_pv(rd: u32, sg: u32, nsg: u32, lid: u32) {}\n\
              fn mma_opart4(i: u32) -> vec4<f32> {\n    return vec4<f32>(0.0);\n}\n\
              fn pv_flag_keys(bits: u32) {}\nfn pv_flagged() -> u32 {\n    return 0u;\n}\n\
              fn pv_flags_clear() {}\n"
            .to_string(),
    }
}

/// The decode kernel's sum over the lanes of one key, `lane_sum(x)`, four rows' partial scores
/// at once (one shuffle of a vec4 a round rather than one per row: a software driver runs
/// each as a loop over its lanes): subgroup operations only in the variants that use them (a
/// module that names one needs the device's subgroup feature); the workgroup-memory form sums
/// in the kernel and never calls it. naga reads subgroup operations without an `enable`
/// directive (it rejects `enable subgroups;`), Tint needs one: [`enable_directives`] adds it
/// where a module is written for other compilers.
fn lane_sum_wgsl(reduce: LaneReduce) -> &'static str {
    match reduce {
        LaneReduce::Workgroup => "fn lane_sum(x: vec4<f32>) -> vec4<f32> {\n    return x;\n}\n",
        LaneReduce::Add => {
            "fn lane_sum(x: vec4<f32>) -> vec4<f32> {\n    return subgroupAdd(x);\n}\n"
        }
        LaneReduce::Shuffle => {
            "fn lane_sum(x: vec4<f32>) -> vec4<f32> {\n    var y = x;\n    \
             for (var o = LANES / 2u; o > 0u; o = o / 2u) {\n        \
             y += subgroupShuffleXor(y, o);\n    }\n    return y;\n}\n"
        }
    }
}

/// The fused lane-split form's sum of four partial scores over the lanes of a row,
/// `lane_sum4(x)`: subgroup operations only where the variant has several lanes per row and
/// sums them so (the workgroup-memory form sums in the kernel and never calls it).
fn lane_sum4_wgsl(reduce: LaneReduce, lanes: u32) -> &'static str {
    match reduce {
        LaneReduce::Add if lanes > 1 => {
            "fn lane_sum4(x: vec4<f32>) -> vec4<f32> {\n    return subgroupAdd(x);\n}\n"
        }
        LaneReduce::Shuffle if lanes > 1 => {
            "fn lane_sum4(x: vec4<f32>) -> vec4<f32> {\n    var y = x;\n    \
             for (var o = LANES / 2u; o > 0u; o = o / 2u) {\n        \
             y += subgroupShuffleXor(y, o);\n    }\n    return y;\n}\n"
        }
        _ => "fn lane_sum4(x: vec4<f32>) -> vec4<f32> {\n    return x;\n}\n",
    }
}

/// The `enable` directives a module of `key` needs beyond what naga reads: `subgroups` for the
/// subgroup forms of the decode and fused kernels (Tint and the WebGPU specification require
/// it).
pub fn enable_directives(key: &KernelKey) -> &'static str {
    if key.uses_subgroups() {
        "enable subgroups;\n"
    } else {
        ""
    }
}

/// Parses `for (var c = 0u; c < BOUND; c++)` into (c, BOUND).
fn loop_header(header: &str) -> Option<(&str, &str)> {
    let inner = header.strip_prefix("for (var ")?.strip_suffix(')')?;
    let mut parts = inner.split(';').map(str::trim);
    let var = parts.next()?.strip_suffix("= 0u")?.trim();
    let bound = parts
        .next()?
        .strip_prefix(var)?
        .trim()
        .strip_prefix('<')?
        .trim();
    let step = parts.next()?;
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (parts.next().is_none() && step == format!("{var}++") && ident(var) && ident(bound))
        .then_some((var, bound))
}

/// Expands every loop marked with [`UNROLL_MARK`] (on a line of its own), innermost loops
/// included, with bounds looked up in `bounds`.
pub(crate) fn unroll(src: &str, bounds: &[(&'static str, u32)]) -> Result<String, ComposeError> {
    let mut out = src.to_string();
    while let Some(at) = find_mark(&out) {
        let after = at + UNROLL_MARK.len();
        let open = out[after..].find('{').map(|i| after + i).ok_or_else(|| {
            ComposeError::LoopShape(out[after..].trim().chars().take(80).collect())
        })?;
        let header = out[after..open].trim().to_string();
        let (var, bound) =
            loop_header(&header).ok_or_else(|| ComposeError::LoopShape(header.clone()))?;
        let n = bounds
            .iter()
            .find(|b| b.0 == bound)
            .map(|b| b.1)
            .ok_or_else(|| ComposeError::UnknownBound {
                header: header.clone(),
                bound: bound.to_string(),
                known: bounds.iter().map(|b| b.0).collect(),
            })?;
        let var = var.to_string();
        let mut depth = 1;
        let mut close = None;
        for (i, ch) in out[open + 1..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + 1 + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| ComposeError::Unclosed(header.clone()))?;
        let body = out[open + 1..close].to_string();
        let expanded: String = (0..n)
            .map(|k| format!("{{ const {var} = {k}u;{body}}}\n"))
            .collect();
        out.replace_range(at..close + 1, &expanded);
    }
    Ok(out)
}

/// A module-scope constant's value, as far as [`fold_constant_ifs`] evaluates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConstValue {
    /// An integer literal (`8u`, `-1`, `3i`).
    Int(i64),
    /// A boolean, literal or a condition over known constants.
    Bool(bool),
}

/// The module-scope constants of `src` (lines `const NAME: T = VALUE;` at column 0) whose value
/// is an integer or boolean literal, or a boolean condition [`eval_condition`] decides from the
/// constants before it.
pub(crate) fn module_constants(src: &str) -> std::collections::HashMap<String, ConstValue> {
    let mut map = std::collections::HashMap::new();
    for line in src.lines() {
        let Some(rest) = line.strip_prefix("const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((ty, value)) = rest.split_once('=') else {
            continue;
        };
        let Some(value) = value.trim().strip_suffix(';') else {
            continue;
        };
        let v = match ty.trim() {
            "bool" => eval_condition(value, &map).map(ConstValue::Bool),
            "u32" | "i32" => literal(value.trim()),
            _ => None,
        };
        if let Some(v) = v {
            map.insert(name.trim().to_string(), v);
        }
    }
    map
}

/// An integer or boolean literal.
fn literal(tok: &str) -> Option<ConstValue> {
    match tok {
        "true" => return Some(ConstValue::Bool(true)),
        "false" => return Some(ConstValue::Bool(false)),
        _ => {}
    }
    let digits = tok.strip_suffix(['u', 'i']).unwrap_or(tok);
    digits.parse::<i64>().ok().map(ConstValue::Int)
}

/// Splits `s` at each top-level (outside parentheses) occurrence of `op`.
fn split_top(s: &str, op: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0i32, 0, 0);
    let bytes = s.as_bytes();
    while i < s.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ if depth == 0 && s[i..].starts_with(op) => {
                parts.push(s[start..i].to_string());
                i += op.len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(s[start..].to_string());
    parts
}

/// The value of a condition over module constants: `NAME`, `!NAME`, `A op B` (op one of `==`,
/// `!=`, `<`, `<=`, `>`, `>=`; each side a known constant or a literal), and `&&` / `||` of
/// those; `None` where any part it needs is not known (a runtime value, a function call).
pub(crate) fn eval_condition(
    cond: &str,
    consts: &std::collections::HashMap<String, ConstValue>,
) -> Option<bool> {
    let c = cond.trim();
    // Parentheses around the whole condition (not `(a) && (b)`).
    if c.starts_with('(') && matching(c, 0) == Some(c.len() - 1) {
        return eval_condition(&c[1..c.len() - 1], consts);
    }
    // `||` (decided by any true part) binds looser than `&&` (by any false part); WGSL needs
    // parentheses to mix them.
    for (op, decisive) in [("||", true), ("&&", false)] {
        let parts = split_top(c, op);
        if parts.len() > 1 {
            let vals: Vec<Option<bool>> = parts.iter().map(|p| eval_condition(p, consts)).collect();
            return if vals.contains(&Some(decisive)) {
                Some(decisive)
            } else if vals.iter().all(|v| *v == Some(!decisive)) {
                Some(!decisive)
            } else {
                None
            };
        }
    }
    let value = |t: &str| -> Option<ConstValue> {
        let t = t.trim();
        consts.get(t).copied().or_else(|| literal(t))
    };
    for op in ["==", "!=", "<=", ">=", "<", ">"] {
        let parts = split_top(c, op);
        if parts.len() == 2 {
            let (a, b) = (value(&parts[0])?, value(&parts[1])?);
            return match (a, b) {
                (ConstValue::Int(a), ConstValue::Int(b)) => Some(match op {
                    "==" => a == b,
                    "!=" => a != b,
                    "<=" => a <= b,
                    ">=" => a >= b,
                    "<" => a < b,
                    _ => a > b,
                }),
                (ConstValue::Bool(a), ConstValue::Bool(b)) if op == "==" => Some(a == b),
                (ConstValue::Bool(a), ConstValue::Bool(b)) if op == "!=" => Some(a != b),
                _ => None,
            };
        }
    }
    if let Some(x) = c.strip_prefix('!') {
        return eval_condition(x, consts).map(|b| !b);
    }
    match value(c)? {
        ConstValue::Bool(b) => Some(b),
        ConstValue::Int(_) => None,
    }
}

/// The index of the bracket matching the one at `open` (`(`/`)` or `{`/`}`).
fn matching(s: &str, open: usize) -> Option<usize> {
    let (o, c) = match s.as_bytes()[open] {
        b'(' => (b'(', b')'),
        _ => (b'{', b'}'),
    };
    let mut depth = 0;
    for (i, &b) in s.as_bytes()[open..].iter().enumerate() {
        if b == o {
            depth += 1;
        } else if b == c {
            depth -= 1;
            if depth == 0 {
                return Some(open + i);
            }
        }
    }
    None
}

/// Drops the branches of `if` statements whose conditions the module's constants decide
/// ([`eval_condition`]): a decided-false clause goes, a decided-true one becomes a plain block
/// and ends its chain. The drivers fold these anyway; folding them here keeps another form's
/// dead code (unrolled, it can be a fifth of a kernel) out of the module that naga parses and
/// validates on every pipeline creation (BENCHMARKS.md, "naga's WGSL front end on the unrolled
/// kernels"). Only statements whose line starts with `if (` are considered; anything it cannot
/// parse is left as written.
pub(crate) fn fold_constant_ifs(
    src: &str,
    consts: &std::collections::HashMap<String, ConstValue>,
) -> String {
    let mut out = src.to_string();
    let mut line_start = 0;
    while line_start < out.len() {
        let line_end = out[line_start..]
            .find('\n')
            .map_or(out.len(), |i| line_start + i + 1);
        let indent = out[line_start..line_end].len() - out[line_start..line_end].trim_start().len();
        let at = line_start + indent;
        if out[at..line_end].starts_with("if (")
            && let Some((end, text)) = fold_chain(&out, at, consts)
        {
            out.replace_range(at..end, &text);
            // The same line again: what replaced the chain may start another one.
            continue;
        }
        line_start = line_end;
    }
    out
}

/// The `if` chain starting at `at` rewritten with its decided clauses folded, and where it ends;
/// `None` when nothing is decided (or it does not parse).
fn fold_chain(
    s: &str,
    at: usize,
    consts: &std::collections::HashMap<String, ConstValue>,
) -> Option<(usize, String)> {
    // (condition, block) clauses; an `else` block has no condition.
    let mut clauses: Vec<(Option<&str>, &str)> = Vec::new();
    let mut pos = at;
    let end = loop {
        let open = pos + s[pos..].find('(')?;
        let close = matching(s, open)?;
        let brace = close + 1 + s[close + 1..].find(|c: char| !c.is_whitespace())?;
        if s.as_bytes()[brace] != b'{' {
            return None;
        }
        let block_end = matching(s, brace)?;
        clauses.push((Some(&s[open + 1..close]), &s[brace..=block_end]));
        let next = block_end + 1;
        let rest = s[next..].trim_start();
        if let Some(r) = rest.strip_prefix("else") {
            let r2 = r.trim_start();
            let r_at = s.len() - r2.len();
            if r2.starts_with("if ") || r2.starts_with("if(") {
                pos = r_at;
                continue;
            }
            if r2.starts_with('{') {
                let e = matching(s, r_at)?;
                clauses.push((None, &s[r_at..=e]));
                break e + 1;
            }
            return None;
        }
        break next;
    };
    // A taken block that can leave (return, continue, break, discard) keeps a condition, so that
    // what follows the statement stays reachable in WGSL's behaviour analysis (Tint warns of
    // unreachable code otherwise); an `else` block then reads `if (true)`.
    let jumps = |block: &str| {
        block
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .any(|w| matches!(w, "return" | "continue" | "break" | "discard"))
    };
    let mut kept: Vec<(Option<&str>, &str)> = Vec::new();
    let mut changed = false;
    for (cond, block) in clauses {
        match cond.map(|c| eval_condition(c, consts)) {
            Some(Some(false)) => changed = true,
            Some(Some(true)) => {
                changed = true;
                kept.push((jumps(block).then_some(cond.unwrap_or("true")), block));
                break;
            }
            Some(None) => kept.push((cond, block)),
            None => {
                let guard = kept.is_empty() && jumps(block);
                kept.push((guard.then_some("true"), block));
                break;
            }
        }
    }
    if !changed {
        return None;
    }
    let mut text = String::new();
    let original = &s[at..end];
    for (i, (cond, block)) in kept.iter().enumerate() {
        match (i, cond) {
            (0, Some(c)) => text += &format!("if ({c}) {block}"),
            (0, None) => text += block,
            (_, Some(c)) => text += &format!(" else if ({c}) {block}"),
            (_, None) => text += &format!(" else {block}"),
        }
    }
    // A taken branch kept with its own condition and nothing dropped is the chain as written.
    (text != original).then_some((end, text))
}

/// Byte offset of the first marker that is a line of its own (after indentation).
fn find_mark(s: &str) -> Option<usize> {
    let mut line_start = 0;
    for line in s.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.trim_end() == UNROLL_MARK {
            return Some(line_start + (line.len() - trimmed.len()));
        }
        line_start += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &[(&str, u32)] = &[("N", 3), ("M", 2)];

    fn squash(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn constants_decide_conditions_and_unknowns_stay_unknown() {
        let c = module_constants(
            "const A: u32 = 8u;\nconst B: bool = false;\nconst K: u32 = 2u;\n\
             const D: bool = A > 4u && !B;\nconst E: bool = A == K || RUNTIME;\n    \
             const LOCAL: u32 = 1u;\nconst F: u32 = A / 2u;\n",
        );
        assert_eq!(c.get("A"), Some(&ConstValue::Int(8)));
        assert_eq!(c.get("D"), Some(&ConstValue::Bool(true)));
        // Unknown parts: no value; an indented const is not module scope; no arithmetic.
        assert_eq!(c.get("E"), None);
        assert_eq!(c.get("LOCAL"), None);
        assert_eq!(c.get("F"), None);
        for (cond, want) in [
            ("A > 0u", Some(true)),
            ("(A == K)", Some(false)),
            ("!B", Some(true)),
            ("B || A != 8u", Some(false)),
            ("A == 8u && x > 1", None),
            ("A == 7u && select(a, b, c)", Some(false)),
            ("B == false", Some(true)),
            ("(A > 1u) && (K >= 2u)", Some(true)),
            ("x", None),
            ("A", None),
        ] {
            assert_eq!(eval_condition(cond, &c), want, "{cond}");
        }
    }

    #[test]
    fn decided_branches_fold_and_the_rest_stays() {
        let c = module_constants("const ON: bool = true;\nconst OFF: bool = false;\n");
        let src = "fn f() {\n    if (OFF) {\n        a();\n    } else if (x > 1) {\n        b();\n    \
                   } else if (ON) {\n        c();\n    } else {\n        d();\n    }\n    \
                   if (ON) {\n        if (OFF) { e(); }\n        g();\n    } else {\n        h();\n    }\n    \
                   if (OFF) { i(); }\n    if (y) { j(); } else if (OFF) { k(); }\n    if (z) { l(); }\n}\n";
        // A taken branch that leaves keeps a condition, so the code after it stays reachable.
        let jump = "if (ON) {\n    continue;\n}\nif (OFF) {\n    a();\n} else {\n    return;\n}\n";
        assert_eq!(
            squash(&fold_constant_ifs(jump, &c)),
            "if (ON) { continue; } if (true) { return; }"
        );
        let got = squash(&fold_constant_ifs(src, &c));
        assert_eq!(
            got,
            squash(
                "fn f() { if (x > 1) { b(); } else { c(); } { g(); } if (y) { j(); } \
                 if (z) { l(); } }"
            ),
        );
    }

    #[test]
    fn unrolls_a_loop_into_constant_copies() {
        let src = "a\n// @unroll\nfor (var i = 0u; i < N; i++) { x[i] = i; }\nb\n";
        let got = unroll(src, B).unwrap();
        assert_eq!(
            squash(&got),
            "a { const i = 0u; x[i] = i; } { const i = 1u; x[i] = i; } { const i = 2u; x[i] = i; } b"
        );
    }

    #[test]
    fn unrolls_nested_loops_and_inner_braces() {
        let src = "    // @unroll\n    for (var i = 0u; i < M; i++) {\n        if (c) { y(); }\n        // @unroll\n        for (var j = 0u; j < M; j++) { z[i][j] = 1.0; }\n    }\n";
        let got = unroll(src, B).unwrap();
        assert!(!got.contains(UNROLL_MARK), "{got}");
        assert!(!got.contains("for ("), "{got}");
        assert_eq!(got.matches("z[i][j] = 1.0;").count(), 4);
        assert_eq!(got.matches("if (c) { y(); }").count(), 2);
        assert_eq!(got.matches("const j = 1u;").count(), 2);
    }

    #[test]
    fn leaves_unmarked_loops_and_mentions_in_prose() {
        let src =
            "// loops marked `// @unroll` are expanded\nfor (var i = 0u; i < N; i++) { f(i); }\n";
        assert_eq!(unroll(src, B).unwrap(), src);
    }

    #[test]
    fn a_marked_loop_of_another_shape_is_an_error() {
        for header in [
            "for (var i = 1u; i < N; i++)",
            "for (var i = 0u; i <= N; i++)",
            "for (var i = 0u; i < N; i += 2u)",
            "for (var i = 0u; j < N; i++)",
            "loop",
            "while (i < N)",
        ] {
            let src = format!("// @unroll\n{header} {{ f(i); }}\n");
            assert!(
                matches!(unroll(&src, B), Err(ComposeError::LoopShape(_))),
                "{header}: {:?}",
                unroll(&src, B)
            );
        }
    }

    #[test]
    fn an_unknown_bound_is_an_error() {
        let src = "// @unroll\nfor (var i = 0u; i < K; i++) { f(i); }\n";
        assert!(matches!(
            unroll(src, B),
            Err(ComposeError::UnknownBound { bound, .. }) if bound == "K"
        ));
    }

    #[test]
    fn an_unclosed_body_is_an_error() {
        let src = "// @unroll\nfor (var i = 0u; i < N; i++) { f(i);\n";
        assert!(matches!(unroll(src, B), Err(ComposeError::Unclosed(_))));
        let src = "// @unroll\n";
        assert!(matches!(unroll(src, B), Err(ComposeError::LoopShape(_))));
    }

    #[test]
    fn a_zero_bound_removes_the_loop() {
        let src = "// @unroll\nfor (var i = 0u; i < Z; i++) { f(i); }\nend";
        assert_eq!(unroll(src, &[("Z", 0)]).unwrap().trim(), "end");
    }
}
