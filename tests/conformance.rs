//! GPU against the f64 CPU reference on every adapter present, one test per backend.
//!
//! Each case's output buffer is poisoned with NaN before the dispatch and the tolerance rule is
//! `posattn::harness::check`'s (FlashAttention style, stated there). Set `POSATTN_REQUIRE_BACKENDS`
//! (e.g. `vulkan,gl`) to make a backend with no adapter a failure rather than a reported skip.

use posattn::harness::check::{self, Group, Status};
use posattn::{Context, ContextOptions, Dtype, Dtypes, HalfForm, ScoreTile, enumerate_adapters};

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

/// Runs `cases` on every adapter of `backends`; `rows` overrides the rows per invocation,
/// `half` the f16 storage form (a case may force its own) and `tile` how scores are formed.
fn run_matrix_scores(
    backends: wgpu::Backends,
    name: &str,
    rows: Option<u32>,
    half: Option<HalfForm>,
    tile: ScoreTile,
    cases: Vec<check::Case>,
) {
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
    for adapter in adapters {
        let mut ctx = Context::from_adapter(&adapter).expect("open device");
        if let Some(r) = rows {
            ctx.set_rows_per_invocation(Some(r)).unwrap();
        }
        ctx.set_half_form(half);
        ctx.set_score_tile(tile).unwrap();
        let verbose = std::env::var_os("POSATTN_VERBOSE").is_some();
        let results = check::run_cases(&ctx, &cases, |r| {
            if verbose {
                println!("  {:<44} {:?} {:.2?}", r.name, r.status, r.time);
            }
        });
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
            "conformance on {} ({} rows per invocation at head_dim 64, scores {tile:?}): {pass} passed, {fail} failed, {unsup} unsupported; \
             worst error/bound {worst:.3}",
            ctx.describe(),
            // The score-tile forms run one row per invocation.
            if tile == ScoreTile::Rows {
                ctx.rows_per_invocation(64)
            } else {
                1
            }
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
        let errs = ctx.take_uncaptured_errors();
        assert!(errs.is_empty(), "uncaptured wgpu errors: {errs:?}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Declared limitation: the head-size sweep (every supported head size × RoPE and ALiBi) runs
/// with RoPE only in the tests; ALiBi is checked at head_dim 64 in every other group, and
/// `posattn check` runs the whole sweep. The multi-row kernels at head sizes 128 to 256 take
/// lavapipe about a minute each to compile.
const SWEEP_ENCODING: &str = "rope_half";

/// Head sizes of the sweep in the multi-row (CPU-shaped) kernel: one per row count it takes
/// (8 rows at 32 and 64, 4 at 128, 2 at 256; `kernel::multi_rows_for`). Declared limitation:
/// the other sizes (80, 96, 160, 192) run in the one-row (GPU-shaped) kernel
/// (`conformance_vulkan_one_row_per_invocation`) instead, so each size runs in one form, not
/// both (multi-row compiles take lavapipe about a minute each at those sizes); `posattn check`
/// runs them all.
const MULTI_ROW_SWEEP: [u32; 4] = [32, 64, 128, 256];

/// Whether the multi-row Vulkan runs take a case (see `SWEEP_ENCODING`, `MULTI_ROW_SWEEP`).
fn runs_on_vulkan(c: &check::Case) -> bool {
    c.group != Group::HeadDims
        || (c.encoding == SWEEP_ENCODING && MULTI_ROW_SWEEP.contains(&c.spec.head_dim))
}

/// Declared limitation: llvmpipe's GL path compiles each fused variant slowly (LLVM coroutine
/// splitting of the barrier code: about half a minute at head_dim 64, two at 128), so the GL
/// run leaves out the head-size sweep (it runs every other case of the matrix: all encodings,
/// masks and extrapolation methods at head_dim 64). Vulkan runs the RoPE sweep, and
/// `posattn check --backend gl` the whole matrix on GL. Also left out on GL, for CI's
/// 20-minute budget: the two-branch kernel (ReRoPE, Leaky ReRoPE, LM-Infinite, StreamingLLM's
/// cache-index positions), the largest of GL's six fused variants (two K tiles, two
/// rotations); it runs on Vulkan.
fn runs_on_gl(c: &check::Case) -> bool {
    (c.group != Group::HeadDims || (c.encoding == SWEEP_ENCODING && c.spec.head_dim == 64))
        && c.spec.extrapolation == posattn::Extrapolation::None
}

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

/// One half of the full matrix on Vulkan, in the kernel software Vulkan runs by default (several
/// rows per invocation; see `Context::rows_per_invocation`).
fn vulkan_half(part: usize) -> Vec<check::Case> {
    let (cases, left): (Vec<_>, Vec<_>) = check::conformance_cases()
        .into_iter()
        .partition(runs_on_vulkan);
    if part == 0 {
        let left: Vec<_> = left.iter().map(|c| c.name.as_str()).collect();
        println!(
            "conformance [vulkan]: declared as not run in the multi-row tests (compile time; the one-row test runs RoPE at 80, 96, 160 and 192, `posattn check` all of them): {}",
            left.join(", ")
        );
    }
    variant_half(
        cases,
        part,
        posattn::kernel::multi_rows_for,
        HalfForm::Native,
    )
}

/// One half of the GL run (see `runs_on_gl`); GL runs one query row per invocation and has no
/// native f16.
fn gl_half(part: usize) -> Vec<check::Case> {
    let (cases, left): (Vec<_>, Vec<_>) =
        check::conformance_cases().into_iter().partition(runs_on_gl);
    if part == 0 {
        let left: Vec<_> = left.iter().map(|c| c.name.as_str()).collect();
        println!(
            "conformance [gl]: declared as not run on GL (compile time): {}",
            left.join(", ")
        );
    }
    variant_half(cases, part, |_| 1, HalfForm::Packed)
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
/// encoding and the combinations of masks and extrapolation methods) and the RoPE head sizes the
/// multi-row run leaves out (80, 96, 160, 192), so that each size runs in one of the two forms.
#[test]
fn conformance_vulkan_one_row_per_invocation() {
    let cases = check::conformance_cases()
        .into_iter()
        .filter(|c| {
            check::is_quick(c)
                || (c.group == Group::TileEdges && c.spec.seq_q == 1 && c.spec.seq_k == 100)
                || (c.group == Group::HeadDims
                    && c.encoding == SWEEP_ENCODING
                    && !MULTI_ROW_SWEEP.contains(&c.spec.head_dim))
                || c.group == Group::Positions
        })
        .collect();
    run_matrix(wgpu::Backends::VULKAN, "vulkan", Some(1), cases);
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

#[test]
fn conformance_vulkan_half_storage() {
    run_matrix_with(wgpu::Backends::VULKAN, "vulkan", None, None, half_cases());
}

/// GL (llvmpipe) has no SHADER_F16: the packed forms only, in one kernel that mixes them (bf16 Q
/// and V, packed f16 K and O: both unpackings and the f16 store), on the NaN placements and the
/// encodings' masks and head groupings. Declared limitation: compile time allows one such
/// variant on GL; the bf16 store runs on Vulkan.
#[test]
fn conformance_gl_half_storage() {
    let mixed = Dtypes {
        q: Dtype::Bf16,
        k: Dtype::F16,
        v: Dtype::Bf16,
        out: Dtype::F16,
    };
    let cases = check::conformance_cases()
        .into_iter()
        .filter(|c| c.is_rope_d64() && matches!(c.group, Group::Encodings | Group::NanPlacement))
        .map(|c| c.with_dtypes(mixed))
        .collect();
    run_matrix_with(wgpu::Backends::GL, "gl", None, None, cases);
}

/// The score-tile kernel (the cooperative-matrix forms' staging, score tile, softmax and P·V)
/// with its product emulated in plain WGSL: every conformance case in f32 and the half-storage
/// cases, on lavapipe. Tolerance: `check`'s rule with the plain implementation also rounding
/// the score operands to f16 (`reference::attention_half_scores`). The hardware forms differ
/// only in `mma_product`; tests/portability.rs translates them.
#[test]
fn conformance_vulkan_score_tile() {
    let mut cases = check::conformance_cases();
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

#[test]
fn conformance_metal() {
    conformance(wgpu::Backends::METAL, "metal");
}

#[test]
fn conformance_dx12() {
    conformance(wgpu::Backends::DX12, "dx12");
}
