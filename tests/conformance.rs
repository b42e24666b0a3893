//! GPU against the f64 CPU reference on every adapter present, one test per backend.
//!
//! Each case's output buffer is poisoned with NaN before the dispatch and the tolerance rule is
//! `posattn::harness::check`'s (FlashAttention style, stated there). Set `POSATTN_REQUIRE_BACKENDS`
//! (e.g. `vulkan,gl`) to make a backend with no adapter a failure rather than a reported skip.

use posattn::harness::check::{self, Group, Status};
use posattn::{
    Accumulation, Context, ContextOptions, Dtype, Dtypes, HalfForm, ScoreTile, enumerate_adapters,
};

/// Forms beside the score tile and the lanes: P·V's arithmetic and where the queries live.
#[derive(Clone, Copy)]
struct Extra {
    acc: Accumulation,
    q_shared: bool,
}

impl Extra {
    const NONE: Extra = Extra {
        acc: Accumulation::F32,
        q_shared: false,
    };
    const HALF_ACC: Extra = Extra {
        acc: Accumulation::F16,
        q_shared: false,
    };
    const Q_SHARED: Extra = Extra {
        acc: Accumulation::F32,
        q_shared: true,
    };
}

fn conformance(backends: wgpu::Backends, name: &str) {
    run_matrix(backends, name, None, check::conformance_cases());
}

fn run_matrix(backends: wgpu::Backends, name: &str, rows: Option<u32>, cases: Vec<check::Case>) {
    run_matrix_with(backends, name, rows, None, cases);
}

fn run_matrix_with(
    backends: wgpu::Backends,
    name: &str,
    rows: Option<u32>,
    half: Option<HalfForm>,
    cases: Vec<check::Case>,
) {
    run_matrix_scores(backends, name, rows, half, ScoreTile::Rows, cases);
}

fn run_matrix_scores(
    backends: wgpu::Backends,
    name: &str,
    rows: Option<u32>,
    half: Option<HalfForm>,
    tile: ScoreTile,
    cases: Vec<check::Case>,
) {
    run_matrix_form(
        backends,
        name,
        rows,
        None,
        half,
        tile,
        None,
        Extra::NONE,
        cases,
    );
}

/// Runs `cases` on every adapter of `backends`; `rows` overrides the rows per invocation,
/// `lanes` the lanes per query row (the lane-split form), `half` the f16 storage form (a case
/// may force its own), `tile` how scores are formed, `block_q` the query rows per workgroup and
/// `extra` the arithmetic of P·V and where the queries live.
#[allow(clippy::too_many_arguments)]
fn run_matrix_form(
    backends: wgpu::Backends,
    name: &str,
    rows: Option<u32>,
    lanes: Option<u32>,
    half: Option<HalfForm>,
    tile: ScoreTile,
    block_q: Option<u32>,
    extra: Extra,
    cases: Vec<check::Case>,
) {
    let acc = extra.acc;
    let options = ContextOptions::default()
        .with_backends(backends)
        .with_adapter_name(None);
    let adapters = enumerate_adapters(&options);
    if adapters.is_empty() {
        assert!(
            !crate::common::required(name),
            "no {name} adapter, but POSATTN_REQUIRE_BACKENDS names it"
        );
        println!("conformance [{name}]: no adapter on this machine, nothing run");
        return;
    }
    check::assert_unique_names(&cases).unwrap();
    let mut failures = Vec::new();
    let open = |adapter: &wgpu::Adapter| -> posattn::Result<Context> {
        let mut ctx = Context::from_adapter(adapter)?;
        if let Some(r) = rows {
            ctx.set_rows_per_invocation(Some(r))?;
        }
        ctx.set_row_lanes(lanes)?;
        ctx.set_block_q(block_q)?;
        ctx.set_half_form(half);
        ctx.set_score_tile(tile)?;
        ctx.set_accumulation(acc)?;
        ctx.set_q_in_workgroup(Some(extra.q_shared));
        Ok(ctx)
    };
    for adapter in adapters {
        let ctx = open(&adapter).expect("open device");
        // The lane-split form asked for must be what the cases compile (one-branch kernels),
        // in the reduction the device's subgroups allow.
        let mut lane_forms = std::collections::BTreeSet::new();
        if let Some(l) = lanes {
            for c in &cases {
                let half = c.half_form.unwrap_or(ctx.half_form());
                if let Ok(k) = check::case_kernel(c, |d| ctx.rows_per_invocation(d), half) {
                    let k = ctx.fused_variant(k, &c.spec);
                    if k.row_lanes() > 1 {
                        lane_forms.insert(format!("{} lanes {:?}", k.lanes, k.lane_reduce));
                    }
                }
            }
            assert!(
                !lane_forms.is_empty(),
                "{l} lanes per row asked for, but no case compiles the lane-split form"
            );
        }
        // Likewise f16 accumulation and the queries in workgroup memory (one-branch kernels;
        // two-branch ones keep registers): every case compiles what was asked for.
        if acc == Accumulation::F16 || extra.q_shared {
            for c in &cases {
                let half = c.half_form.unwrap_or(ctx.half_form());
                let k = check::case_kernel(c, |d| ctx.rows_per_invocation(d), half)
                    .expect("a fused kernel");
                let k = ctx.fused_variant(k, &c.spec);
                let name = k.name();
                assert_eq!(k.half_acc, acc == Accumulation::F16, "{}: {name}", c.name);
                assert_eq!(
                    k.q_shared,
                    extra.q_shared && !k.two_branch,
                    "{}: {name}",
                    c.name
                );
            }
        }
        // Likewise the query block asked for.
        if let Some(b) = block_q {
            let compiled = cases.iter().any(|c| {
                let half = c.half_form.unwrap_or(ctx.half_form());
                check::case_kernel(c, |d| ctx.rows_per_invocation(d), half)
                    .is_ok_and(|k| ctx.fused_variant(k, &c.spec).block_q == b)
            });
            assert!(
                compiled,
                "query block {b} asked for, but no case compiles it"
            );
        }
        let verbose = std::env::var_os("POSATTN_VERBOSE").is_some();
        // A device per kernel variant on llvmpipe (`check::isolates_kernels`), as `posattn check`.
        let info = ctx.adapter_info().clone();
        let reopen = || open(&check::reopen_adapter(&info)?);
        let run =
            check::run_cases_isolated(&ctx, &cases, check::default_check_threads(), reopen, |r| {
                if verbose {
                    println!("  {:<44} {:?} {:.2?}", r.name, r.status, r.time);
                }
            });
        let results = run.results;
        let (mut pass, mut fail, mut unsup) = (0, 0, 0);
        let mut worst: f64 = 0.0;
        for r in &results {
            match &r.status {
                Status::Pass => pass += 1,
                Status::Unsupported(_) => unsup += 1,
                Status::Fail(why) => {
                    fail += 1;
                    failures.push(format!("{} on {}: {why}", r.name, ctx.describe()));
                }
            }
            if r.bound > 0.0 {
                worst = worst.max(r.err_gpu / r.bound);
            }
        }
        println!(
            "conformance on {} ({} rows per invocation at head_dim 64, scores {tile:?}, {acc:?} P·V{}{}): {pass} passed, {fail} failed, {unsup} unsupported; \
             worst error/bound {worst:.3}; {} kernels on {} devices",
            ctx.describe(),
            // The score-tile forms run one row per invocation.
            if tile == ScoreTile::Rows {
                ctx.rows_per_invocation(64)
            } else {
                1
            },
            if extra.q_shared {
                ", queries in workgroup memory"
            } else {
                ""
            },
            if lane_forms.is_empty() {
                String::new()
            } else {
                format!(
                    ", {}",
                    lane_forms.into_iter().collect::<Vec<_>>().join(" and ")
                )
            },
            run.kernels,
            run.devices
        );
        if tile != ScoreTile::Rows {
            // Declared: the two-branch methods run in the row form only, and the emulated tile's
            // f32 Q tile fits lavapipe's and llvmpipe GL's 32 KiB of workgroup memory only up
            // to head size 64. Anything else unsupported is a failure.
            for r in &results {
                if let Status::Unsupported(why) = &r.status {
                    assert!(
                        why.contains("two-branch") || why.contains("workgroup storage"),
                        "{}: unsupported for an undeclared reason: {why}",
                        r.name
                    );
                }
            }
        }
        let errs = run.uncaptured;
        assert!(errs.is_empty(), "uncaptured wgpu errors: {errs:?}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The RoPE cases of the head-size sweep, which the one-row test runs at every size (the
/// multi-row tests run the whole sweep, RoPE and ALiBi).
const SWEEP_ENCODING: &str = "rope_half";

/// The cases of `cases` whose kernel variant is in half `part` of their variants (sorted by name,
/// alternating), given the adapter's rows per invocation and f16 form: the two halves compile
/// side by side on two test threads. Cases the planner rejects (no compile) go to the first.
fn variant_half(
    cases: Vec<check::Case>,
    part: usize,
    rows_for: impl Fn(u32) -> u32 + Copy,
    half: HalfForm,
) -> Vec<check::Case> {
    let variant = |c: &check::Case| check::case_kernel(c, rows_for, half).map(|k| k.name()).ok();
    let mut names: Vec<_> = cases.iter().filter_map(variant).collect();
    names.sort();
    names.dedup();
    cases
        .into_iter()
        .filter(|c| match variant(c) {
            Some(v) => names.iter().position(|n| *n == v).unwrap() % 2 == part,
            None => part == 0,
        })
        .collect()
}

/// One half of the whole f32 matrix on Vulkan, in the kernel software Vulkan runs by default
/// (several rows per invocation; see `Context::rows_per_invocation`).
fn vulkan_half(part: usize) -> Vec<check::Case> {
    variant_half(
        check::conformance_cases(),
        part,
        posattn::kernel::multi_rows_for,
        HalfForm::Native,
    )
}

/// One half of the whole f32 matrix on GL (several rows per invocation up to head size 64,
/// `kernel::gl_rows_for`; no native f16).
fn gl_half(part: usize) -> Vec<check::Case> {
    variant_half(
        check::conformance_cases(),
        part,
        posattn::kernel::gl_rows_for,
        HalfForm::Packed,
    )
}

#[test]
fn conformance_vulkan_first_half_of_variants() {
    run_matrix(wgpu::Backends::VULKAN, "vulkan", None, vulkan_half(0));
}

#[test]
fn conformance_vulkan_second_half_of_variants() {
    run_matrix(wgpu::Backends::VULKAN, "vulkan", None, vulkan_half(1));
}

/// Software Vulkan runs the CPU-shaped kernel (8 rows per invocation) in the full matrix; this
/// runs the GPU-shaped one (1 row per invocation) on the quick subset (which has one case per
/// encoding and the combinations of masks and extrapolation methods), the tile edges, the
/// positions and the RoPE head-size sweep.
#[test]
fn conformance_vulkan_one_row_per_invocation() {
    let cases = check::conformance_cases()
        .into_iter()
        .filter(|c| {
            check::is_quick(c)
                || (c.group == Group::TileEdges && c.spec.seq_q == 1 && c.spec.seq_k == 100)
                || (c.group == Group::HeadDims && c.encoding == SWEEP_ENCODING)
                || c.group == Group::Positions
        })
        .collect();
    run_matrix(wgpu::Backends::VULKAN, "vulkan", Some(1), cases);
}

/// The lane-split form (each query row's head dimension split over several invocations, their
/// partial scores summed by subgroup operations; the GPU-shaped kernel with a register tile of
/// rows × channels) on the one-row test's cases, with the RoPE sweep at head sizes 32, 80, 128
/// and 256 (2, 5, 8 and 16 vec4s per lane): 2 rows by a quarter of the channels per
/// invocation, summed by `subgroupShuffleXor` butterflies on lavapipe (subgroups of 8), and the
/// half-storage subset (native and packed f16, bf16, an f16 K/V cache). The same tolerance rules
/// as every other form.
#[test]
fn conformance_vulkan_lane_split() {
    let mut cases: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| {
            check::is_quick(c)
                || (c.group == Group::TileEdges && c.spec.seq_q == 1 && c.spec.seq_k == 100)
                || (c.group == Group::HeadDims
                    && c.encoding == SWEEP_ENCODING
                    && [32, 80, 128, 256].contains(&c.spec.head_dim))
                || c.group == Group::Positions
        })
        .collect();
    cases.extend(half_cases());
    run_matrix_form(
        wgpu::Backends::VULKAN,
        "vulkan",
        Some(2),
        Some(4),
        None,
        ScoreTile::Rows,
        None,
        Extra::NONE,
        cases,
    );
}

/// The lane-split form with 8 lanes per row on lavapipe, whose subgroup size is fixed at 8: the
/// `subgroupAdd` reduction, two rows per invocation (256 invocations per workgroup), on the
/// quick subset.
#[test]
fn conformance_vulkan_lane_split_subgroup_add() {
    let cases = check::conformance_cases()
        .into_iter()
        .filter(check::is_quick)
        .collect();
    run_matrix_form(
        wgpu::Backends::VULKAN,
        "vulkan",
        Some(2),
        Some(8),
        None,
        ScoreTile::Rows,
        None,
        Extra::NONE,
        cases,
    );
}

/// The lane-split form where the device has no subgroups (llvmpipe's GL): 4 lanes per row sum
/// their partial scores through workgroup memory (two barriers per four keys), on the quick
/// subset and the tile edges.
#[test]
fn conformance_gl_lane_split_workgroup_reduce() {
    let cases = check::conformance_cases()
        .into_iter()
        .filter(|c| {
            check::is_quick(c)
                || (c.group == Group::TileEdges && c.spec.seq_q == 1 && c.spec.seq_k == 100)
        })
        .collect();
    run_matrix_form(
        wgpu::Backends::GL,
        "gl",
        Some(1),
        Some(4),
        None,
        ScoreTile::Rows,
        None,
        Extra::NONE,
        cases,
    );
}

/// 256 query rows per workgroup, which lavapipe's plans take for long rows
/// (`Context::block_q`) and which the matrix's short cases never reach: the tile edges, windows
/// (with sinks, and StreamingLLM's two-branch form), and cases whose rows straddle 256-row
/// blocks (255 to 257 rows, queries at the end of a longer key range, a window over 600 keys).
#[test]
fn conformance_vulkan_query_block_256() {
    use posattn::{AttentionSpec, PositionEncoding, Rope, Window};
    let named = [
        "window_l16_causal_s150",
        "window_l16_r8_bidir_s150",
        "streaming_s4_r32_cache_index_s150",
    ];
    let mut cases: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| c.group == Group::TileEdges || named.contains(&c.name.as_str()))
        .collect();
    let rope = PositionEncoding::Rope(Rope::new(10000.0));
    let spec = |sq: u32, sk: u32, causal: bool| {
        AttentionSpec::default()
            .with_seq_q(sq)
            .with_seq_k(sk)
            .with_heads(2)
            .with_kv_heads(1)
            .with_causal(causal)
            .with_position(rope.clone())
    };
    for (sq, sk) in [(255, 255), (256, 256), (257, 257), (300, 700), (700, 300)] {
        for causal in [true, false] {
            let mask = if causal { "causal" } else { "bidir" };
            cases.push(
                check::Case::new(
                    format!("rope_half_{mask}_q{sq}_k{sk}_bq256"),
                    spec(sq, sk, causal),
                )
                .tagged(Group::TileEdges, SWEEP_ENCODING),
            );
        }
    }
    cases.push(
        check::Case::new(
            "rope_half_window100_sinks4_causal_s600_bq256",
            spec(600, 600, true)
                .with_window(Window::recent(100))
                .with_sink_tokens(4),
        )
        .tagged(Group::TileEdges, SWEEP_ENCODING),
    );
    run_matrix_form(
        wgpu::Backends::VULKAN,
        "vulkan",
        None,
        None,
        None,
        ScoreTile::Rows,
        Some(256),
        Extra::NONE,
        cases,
    );
}

#[test]
fn conformance_gl_first_half_of_variants() {
    run_matrix(wgpu::Backends::GL, "gl", None, gl_half(0));
}

#[test]
fn conformance_gl_second_half_of_variants() {
    run_matrix(wgpu::Backends::GL, "gl", None, gl_half(1));
}

/// Half storage (the full cross product is `posattn check`'s). The subset reuses one kernel per
/// storage form: every case of the matrix that runs the plain RoPE kernel at head size 64 (the
/// encodings with every mask and head grouping, tile edges, positions, NaN placement, scaling
/// tables, log-n, windows, sinks, softcap, sink logits and the caller bias), each in f16 native,
/// f16 packed, bf16, and an f16 K/V cache with f32 queries and output. Tolerance: `check`'s rule
/// for half storage (references on the rounded inputs, the plain implementation's output rounded
/// to the output dtype).
fn half_cases() -> Vec<check::Case> {
    let base: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| c.is_rope_d64())
        .collect();
    let kv_cache = Dtypes {
        k: Dtype::F16,
        v: Dtype::F16,
        ..Dtypes::F32
    };
    let mut cases = Vec::new();
    for c in &base {
        cases.push(c.clone().with_dtype(Dtype::F16));
        cases.push(
            c.clone()
                .with_dtype(Dtype::F16)
                .with_half_form(HalfForm::Packed),
        );
        cases.push(c.clone().with_dtype(Dtype::Bf16));
        cases.push(c.clone().with_dtypes(kv_cache));
    }
    cases
}

/// RoPE pairs that straddle the kernel's vec4 chunks of channels. Q and K are staged a vec4 of
/// channels at a time with the vec4 of their RoPE partners; with rotary_dim 20 in the half
/// layout, pair i couples channels i and i + 10, so a chunk's partners span two chunks and are
/// read one by one, and with rotary_dim 4 both channels of each pair sit in the same chunk.
/// The matrix's own partial rotations (24 half, 16 interleaved) take the whole-chunk path, and
/// its head-size sweep the chunk mappings of every size. Causal GQA and bidirectional MHA at
/// head size 64, on the matrix's kernel (no extra compile); with `half`, also in native f16,
/// packed f16 and bf16 (the scalar reads of each storage form). The same tolerance rules as
/// every case.
fn straddling_cases(half: bool) -> Vec<check::Case> {
    let mut cases = Vec::new();
    for r in [20, 4] {
        for (causal, kv) in [(true, 2), (false, 4)] {
            let spec = posattn::AttentionSpec::default()
                .with_seq_len(37)
                .with_heads(4)
                .with_kv_heads(kv)
                .with_causal(causal)
                .with_position(posattn::PositionEncoding::Rope(
                    posattn::Rope::new(10000.0).with_rotary_dim(r),
                ));
            let mask = if causal { "causal" } else { "bidir" };
            let name = format!("rope_r{r}_{mask}_kv{kv}_s37_d64");
            let case = check::Case::new(name, spec).tagged(Group::Encodings, "rope_straddling");
            if half && r == 20 {
                cases.push(case.clone().with_dtype(Dtype::F16));
                cases.push(
                    case.clone()
                        .with_dtype(Dtype::F16)
                        .with_half_form(HalfForm::Packed),
                );
                cases.push(case.clone().with_dtype(Dtype::Bf16));
            }
            cases.push(case);
        }
    }
    cases
}

#[test]
fn conformance_vulkan_rope_pairs_straddling_chunks() {
    run_matrix(
        wgpu::Backends::VULKAN,
        "vulkan",
        None,
        straddling_cases(true),
    );
}

#[test]
fn conformance_gl_rope_pairs_straddling_chunks() {
    run_matrix(wgpu::Backends::GL, "gl", None, straddling_cases(false));
}

#[test]
fn conformance_vulkan_half_storage() {
    run_matrix_with(wgpu::Backends::VULKAN, "vulkan", None, None, half_cases());
}

/// GL (llvmpipe) has no SHADER_F16, so its f16 runs packed: the half-storage subset (f16, bf16,
/// an f16 K/V cache; the native-f16 cases run packed there, as the planner picks), and one
/// kernel that mixes the forms (bf16 Q and V, packed f16 K and O: both unpackings and the f16
/// store) on the NaN placements and the encodings' masks and head groupings.
#[test]
fn conformance_gl_half_storage() {
    let mixed = Dtypes {
        q: Dtype::Bf16,
        k: Dtype::F16,
        v: Dtype::Bf16,
        out: Dtype::F16,
    };
    let mut cases: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| c.is_rope_d64() && matches!(c.group, Group::Encodings | Group::NanPlacement))
        .map(|c| c.with_dtypes(mixed))
        .collect();
    cases.extend(half_cases());
    run_matrix_with(wgpu::Backends::GL, "gl", None, None, cases);
}

/// The score-tile kernel (the cooperative-matrix forms' staging, score tile, softmax and P·V)
/// with its product emulated in plain WGSL, on lavapipe: the RoPE head-size-64 cases (every
/// mask and KV layout of the encodings group, the tile edges, the NaN placements) in f32 and
/// the half-storage cases. Everything before P·V is the code `conformance_vulkan_pv_tile` runs
/// over the whole matrix, and P·V is the row form's, which every other conformance test runs.
/// Tolerance: `check`'s rule with the plain implementation also rounding the score operands to
/// f16 (`reference::attention_half_scores`). The hardware forms differ only in `mma_product`;
/// tests/portability.rs translates them.
#[test]
fn conformance_vulkan_score_tile() {
    let mut cases: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| c.is_rope_d64())
        .collect();
    cases.extend(half_cases());
    run_matrix_scores(
        wgpu::Backends::VULKAN,
        "vulkan",
        None,
        None,
        ScoreTile::Emulated,
        cases,
    );
}

/// The score-tile kernel with P·V as a tile product too (the cooperative-matrix P·V forms'
/// staging, softmax weights on one scale per key tile, the output formed a slice at a time
/// through workgroup memory, and each row's own P·V where it hides a key whose V is not
/// finite), both products emulated in plain WGSL: every conformance case in f32 and the
/// half-storage cases, on lavapipe. Tolerance: `check`'s rule with the plain implementation
/// also rounding the softmax weights and V to f16 (`reference::attention_half_pv`).
#[test]
fn conformance_vulkan_pv_tile() {
    let mut cases = check::conformance_cases();
    cases.extend(half_cases());
    run_matrix_scores(
        wgpu::Backends::VULKAN,
        "vulkan",
        None,
        None,
        ScoreTile::EmulatedPv,
        cases,
    );
}

/// P·V in f16 arithmetic (`Accumulation::F16`: f16 weights, V tile and accumulators, the
/// running maximum offset by 3 in base 2) on lavapipe, which has `SHADER_F16`: the RoPE
/// head-size-64 cases of `posattn check --quick --accumulate f16` (masks, NaN placements, sinks
/// and sink logits, softcaps, windows) in f32 and native f16 storage and its two-branch case
/// (ReRoPE) at the adapter's rows per invocation, then the lane-split form (4 lanes a row) on
/// the f32 ones. `posattn check --accumulate f16` runs every encoding.
/// Tolerance: `check`'s rule with the plain implementation that rounds the weights (scaled by
/// 1/8) and V to f16 and sums in f16 (`reference::attention_half_acc`). An adapter without
/// `SHADER_F16` must refuse the form, naming `accumulation`.
#[test]
fn conformance_vulkan_half_accumulation() {
    let Some(ctx) = crate::common::vulkan("f16 accumulation") else {
        return;
    };
    if !ctx.has_native_f16() {
        let mut c = ctx;
        let e = c.set_accumulation(Accumulation::F16).unwrap_err();
        assert_eq!(e.field(), Some("accumulation"), "{e}");
        println!(
            "f16 accumulation: {} has no SHADER_F16, refused",
            c.describe()
        );
        return;
    }
    // The RoPE kernel (masks, NaN placements, sinks and sink logits, softcaps, windows, in f32
    // and native f16 storage) and the two-branch one: the P·V code is the same in every
    // encoding's kernel, so the others are left out (eight fewer cold compiles).
    let quick: Vec<_> = check::quick_check_cases(&ctx)
        .into_iter()
        .filter(|c| {
            c.spec.extrapolation != posattn::Extrapolation::None
                || (c.is_rope_d64()
                    && (c.spec.dtypes == Dtypes::F32
                        || (c.spec.dtypes == Dtypes::all(Dtype::F16) && c.half_form.is_none())))
        })
        .collect();
    let rope64: Vec<_> = quick
        .iter()
        .filter(|c| c.is_rope_d64() && c.spec.dtypes == Dtypes::F32)
        .cloned()
        .collect();
    drop(ctx);
    run_matrix_form(
        wgpu::Backends::VULKAN,
        "vulkan",
        None,
        None,
        None,
        ScoreTile::Rows,
        None,
        Extra::HALF_ACC,
        quick,
    );
    run_matrix_form(
        wgpu::Backends::VULKAN,
        "vulkan",
        Some(2),
        Some(4),
        None,
        ScoreTile::Rows,
        None,
        Extra::HALF_ACC,
        rope64,
    );
}

/// Queries in workgroup memory (`KernelKey::with_q_shared`, the GPU form that frees their
/// registers) on lavapipe, in 64-row query blocks (the queries' 16 KiB at head size 64 and the
/// K and V tiles fill lavapipe's 32 KiB), on the quick matrix's RoPE head-size-64 cases (the
/// queries' staging and reads are the same code for every encoding): one row per invocation (a
/// GPU's) and the lane-split form (2 rows, 4 lanes). Two-branch methods keep their queries in
/// registers. The same tolerance rules as the register form, whose arithmetic this is.
#[test]
fn conformance_vulkan_queries_in_workgroup_memory() {
    let rope64: Vec<_> = check::conformance_cases()
        .into_iter()
        .filter(|c| check::is_quick(c) && c.is_rope_d64())
        .collect();
    for (rows, lanes) in [(1, None), (2, Some(4))] {
        run_matrix_form(
            wgpu::Backends::VULKAN,
            "vulkan",
            Some(rows),
            lanes,
            None,
            ScoreTile::Rows,
            Some(64),
            Extra::Q_SHARED,
            rope64.clone(),
        );
    }
}

#[test]
fn conformance_metal() {
    conformance(wgpu::Backends::METAL, "metal");
}

#[test]
fn conformance_dx12() {
    conformance(wgpu::Backends::DX12, "dx12");
}

/// `check::run_cases_isolated` groups the cases by kernel variant, opens a device per variant
/// where the adapter is llvmpipe (and shares one elsewhere), returns the results in the cases'
/// order, and fails every case of a variant whose device cannot be opened, naming why.
#[test]
fn isolated_runs_keep_the_case_order_and_open_a_device_per_kernel() {
    let options = ContextOptions::default().with_adapter_name(None);
    let Some(adapter) = enumerate_adapters(&options).into_iter().next() else {
        assert!(
            !crate::common::required("vulkan") && !crate::common::required("gl"),
            "no adapter, but POSATTN_REQUIRE_BACKENDS names one"
        );
        println!("isolated runs: no adapter on this machine, nothing run");
        return;
    };
    // Three cases, two variants (RoPE, then ALiBi at head size 64, then RoPE again).
    let all = check::conformance_cases();
    let pick = |prefix: &str| {
        all.iter()
            .find(|c| c.name.starts_with(prefix) && c.spec.head_dim == 64)
            .unwrap_or_else(|| panic!("a case named {prefix}*"))
            .clone()
    };
    let cases = vec![
        pick("rope_half_causal_mha"),
        pick("alibi_causal_causal_mha"),
        pick("rope_half_bidir_mha"),
    ];
    let ctx = Context::from_adapter(&adapter).expect("open device");
    let isolated = check::isolates_kernels(ctx.adapter_info());
    let info = ctx.adapter_info().clone();
    let mut ran = Vec::new();
    let run = check::run_cases_isolated(
        &ctx,
        &cases,
        2,
        || Context::from_adapter(&check::reopen_adapter(&info)?),
        |r| ran.push(r.name.clone()),
    );
    let names: Vec<_> = run.results.iter().map(|r| r.name.clone()).collect();
    let given: Vec<_> = cases.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, given, "results in the order of the cases");
    for r in &run.results {
        assert_eq!(r.status, Status::Pass, "{}", r.name);
    }
    assert_eq!(run.kernels, 2, "one pipeline per variant");
    assert!(run.uncaptured.is_empty(), "{:?}", run.uncaptured);
    if isolated {
        assert_eq!(run.devices, 2, "a device per variant on {}", ctx.describe());
        // Grouped by variant: the RoPE cases in their order on the first device, the ALiBi
        // case on its own (possibly at the same time, on a second thread).
        let at = |n: &String| ran.iter().position(|x| x == n).expect("reported");
        assert_eq!(ran.len(), 3, "{ran:?}");
        assert!(at(&given[0]) < at(&given[2]), "{ran:?}");
        // One thread runs the groups one after another, RoPE first.
        let mut serial = Vec::new();
        let run = check::run_cases_isolated(
            &ctx,
            &cases,
            1,
            || Context::from_adapter(&check::reopen_adapter(&info)?),
            |r| serial.push(r.name.clone()),
        );
        assert_eq!(run.devices, 2);
        assert_eq!(
            serial,
            [given[0].clone(), given[2].clone(), given[1].clone()],
            "grouped by variant"
        );
    } else {
        assert_eq!(run.devices, 1, "one device on {}", ctx.describe());
    }
    // A device that cannot be opened fails its variant's cases (isolating adapters only: the
    // others never reopen).
    if isolated {
        let run = check::run_cases_isolated(
            &ctx,
            &cases,
            2,
            || Err(posattn::Error::NoAdapter("gone".into())),
            |_| {},
        );
        let failed: Vec<_> = run
            .results
            .iter()
            .filter_map(|r| match &r.status {
                Status::Fail(why) => Some((r.name.clone(), why.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, given[1]);
        assert!(failed[0].1.contains("gone"), "{}", failed[0].1);
    }
}
