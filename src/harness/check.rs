//! The conformance harness: cases that probe every encoding, mask, head grouping and tile edge,
//! each run on the GPU with a poisoned output and compared against the f64 CPU reference.
//! The tests and the `posattn check` command both run it.
//!
//! Tolerance rule (FlashAttention style): with `ref64` the f64 reference and `ref32` the same
//! reference computed in plain f32,
//!
//! ```text
//! max|gpu − ref64|  ≤  ERR_MULTIPLE · max|ref32 − ref64|  +  ERR_FLOOR · max(1, max|ref64|)
//! ```
//!
//! and the GPU output is NaN exactly where the reference is NaN. The multiple allows for the
//! kernel's different summation order and exp2-based softmax; the floor covers cases where the
//! plain f32 implementation happens to be nearly exact (a single visible key, say).
//!
//! Half storage (f16, bf16) keeps the same rule with both references on the stored inputs: Q, K
//! and V are rounded to their dtypes first and `ref64` runs on the rounded values (so input
//! rounding is not counted as kernel error), and `ref32` (the plain f32 implementation on the
//! same rounded inputs) has its output rounded to the output's dtype, as the kernel's is. The
//! bound is then dominated by the output rounding that any implementation storing that dtype
//! must make (half an ulp of the largest outputs), times the same multiple.
//!
//! A score tile ([`crate::ScoreTile`] other than `Rows`: tensor-core products) rounds the
//! rotated, scaled queries and the rotated keys to f16 before Q·Kᵀ. Its `ref32` does the same
//! (the plain f32 implementation with f16 score operands, `reference::attention_half_scores`),
//! so the bound is that rounding's error, times the same multiple; `ref64` stays exact.
//!
//! P·V in f16 arithmetic ([`crate::Accumulation::F16`]) is bounded the same way by the plain
//! implementation that rounds each weight (scaled by 1/8, as the kernel's offset maximum makes
//! it) and V to f16 and sums their products in f16 (`reference::attention_half_acc`).

use std::time::Duration;

use web_time::Instant;

use crate::attention::{Attention, bias_len};
use crate::context::Context;
use crate::dtype::{Dtype, Dtypes, HalfForm};
use crate::encoding::masks::{BiasLayout, Extrapolation, Window};
use crate::encoding::position::{
    Alibi, AlibiForm, AlibiSlopes, PositionEncoding, Rope, RopeLayout, Xpos,
};
use crate::encoding::relative::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
use crate::encoding::scaling::{RopeScaling, Yarn, rope_frequencies};
use crate::error::{Error, Result};
use crate::harness::reference;
use crate::kernel::KernelKey;
use crate::spec::{AttentionSpec, SUPPORTED_HEAD_DIMS};

/// GPU error may be this many times the plain f32 implementation's error.
pub const ERR_MULTIPLE: f64 = 4.0;
/// Plus this much, relative to the largest reference magnitude (at least 1).
pub const ERR_FLOOR: f64 = 2e-6;

/// How a case lays out its token positions.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    /// Keys at 0..seq_k, queries at the last seq_q of them.
    Default,
    /// Default positions shifted by this much (a continued sequence).
    Offset(i32),
    /// Every position multiplied by this stride (gaps).
    Stride(i32),
    /// Sorted random subsets of 0..max, different per batch (randomized positional encodings).
    RandomSubset(i32),
}

/// Which input gets a NaN planted, to check masking and propagation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NanPlant {
    /// No NaN planted.
    None,
    /// A NaN in V at a key the causal mask hides from some rows: must reach only rows that see it.
    MaskedValue,
    /// A NaN in K at the same place: rows that see the key become NaN, the others must not.
    MaskedKey,
}

/// q, k, v ([batch, seq, heads, head_dim]) and query and key positions ([batch, seq]).
pub type Inputs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<i32>, Vec<i32>);

/// The part of the matrix a case belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// Every encoding × causal/bidirectional × MHA/GQA/MQA.
    Encodings,
    /// Sequence lengths around the tile sizes.
    TileEdges,
    /// Batches with their own positions, unusual position layouts.
    Positions,
    /// Every supported head size.
    HeadDims,
    /// NaN placement under the causal mask.
    NanPlacement,
    /// RoPE scaling schemes.
    Scaling,
    /// Log-n query scaling.
    Logn,
    /// A non-default softmax scale.
    Scale,
    /// Table-driven relative biases.
    RelativeBias,
    /// Table-driven relative biases at positions far apart.
    RelativeBiasFar,
    /// Windows, sinks, softcap, sink logits, the caller bias, extrapolation methods.
    Features,
    /// Combinations of the features that models use.
    Combination,
    /// A case built outside the matrix.
    Other,
}

impl Group {
    /// Every group, in report order.
    pub const ALL: [Group; 13] = [
        Group::Encodings,
        Group::TileEdges,
        Group::Positions,
        Group::HeadDims,
        Group::NanPlacement,
        Group::Scaling,
        Group::Logn,
        Group::Scale,
        Group::RelativeBias,
        Group::RelativeBiasFar,
        Group::Features,
        Group::Combination,
        Group::Other,
    ];

    /// The group's name, as `--filter group=` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Group::Encodings => "encodings",
            Group::TileEdges => "tile_edges",
            Group::Positions => "positions",
            Group::HeadDims => "head_dims",
            Group::NanPlacement => "nan_placement",
            Group::Scaling => "scaling",
            Group::Logn => "logn",
            Group::Scale => "scale",
            Group::RelativeBias => "relative_bias",
            Group::RelativeBiasFar => "relative_bias_far",
            Group::Features => "features",
            Group::Combination => "combination",
            Group::Other => "other",
        }
    }
}

/// One conformance case. Besides its spec it carries the attributes that selections use (its
/// group and the matrix's name for its encoding); the mask, head counts and sizes are read from
/// the spec.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case's name (unique in the matrix).
    pub name: String,
    /// What is computed.
    pub spec: AttentionSpec,
    /// How positions are drawn.
    pub positions: Positions,
    /// Which input gets a NaN.
    pub nan: NanPlant,
    /// Seed of the inputs.
    pub seed: u64,
    /// The report group.
    pub group: Group,
    /// The matrix's name of the encoding (`rope_half`, `alibi_causal`, ...); by default the
    /// encoding's own name.
    pub encoding: String,
    /// How the kernel stores f16 tensors; `None`: the context's choice.
    pub half_form: Option<HalfForm>,
}

/// The outcome of one case.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Within the tolerance rule.
    Pass,
    /// Beyond it, with the reason.
    Fail(String),
    /// The adapter cannot run this case (a limit or a missing feature), with the reason.
    Unsupported(String),
}

/// A case's result with its errors against the f64 reference.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Pass, fail or unsupported.
    pub status: Status,
    /// max |gpu − ref64|
    pub err_gpu: f64,
    /// max |ref32 − ref64|
    pub err_f32: f64,
    /// The allowed error.
    pub bound: f64,
    /// Wall time of the GPU run (upload, dispatch, readback).
    pub time: Duration,
}

/// Deterministic generator for inputs (SplitMix64): the same seed gives the same tensors on every
/// platform and crate version, so a failing case can be replayed by name.
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// `n` values uniform in ±`amplitude`.
    pub fn vec(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * amplitude).collect()
    }
}

impl Case {
    /// A case of `spec` with default positions, no NaN and a seed from its name.
    pub fn new(name: impl Into<String>, spec: AttentionSpec) -> Self {
        let name = name.into();
        // Seed from the name so that each case has its own inputs and replays identically.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Case {
            name,
            encoding: spec.position.name().to_string(),
            spec,
            positions: Positions::Default,
            nan: NanPlant::None,
            seed,
            group: Group::Other,
            half_form: None,
        }
    }

    /// This case with every tensor stored as `d` (same inputs before rounding: the seed stays),
    /// named with a `_f16` or `_bf16` suffix unless `d` is f32.
    pub fn with_dtype(self, d: Dtype) -> Self {
        self.with_dtypes(Dtypes::all(d))
    }

    /// This case with its tensors stored as `dtypes` (the seed stays), named with a suffix: the
    /// dtype when all four agree (none for f32), else `_q<dtype>_k<dtype>_v<dtype>_o<dtype>`.
    pub fn with_dtypes(mut self, dtypes: Dtypes) -> Self {
        self.spec.dtypes = dtypes;
        if dtypes == Dtypes::all(dtypes.q) {
            if dtypes.q != Dtype::F32 {
                self.name = format!("{}_{}", self.name, dtypes.q);
            }
        } else {
            let d = dtypes;
            self.name = format!("{}_q{}_k{}_v{}_o{}", self.name, d.q, d.k, d.v, d.out);
        }
        self
    }

    /// Whether the case runs the plain RoPE kernel (half layout, one branch) at head size 64,
    /// which the dtype subsets of the tests reuse so as to compile few variants.
    pub fn is_rope_d64(&self) -> bool {
        matches!(&self.spec.position, PositionEncoding::Rope(r) if r.layout == RopeLayout::Half)
            && self.spec.head_dim == 64
            && self.spec.extrapolation == Extrapolation::None
    }

    /// This case with its f16 tensors forced into `form` (suffix `_native` or `_packed`).
    pub fn with_half_form(mut self, form: HalfForm) -> Self {
        self.half_form = Some(form);
        self.name = format!(
            "{}_{}",
            self.name,
            match form {
                HalfForm::Native => "native",
                HalfForm::Packed => "packed",
            }
        );
        self
    }

    /// The case's inputs as the kernel sees them: Q, K and V rounded to their storage dtypes.
    pub fn stored_inputs(&self) -> Inputs {
        let (mut q, mut k, mut v, pq, pk) = self.inputs();
        let d = self.spec.dtypes;
        for (x, t) in [(&mut q, d.q), (&mut k, d.k), (&mut v, d.v)] {
            x.iter_mut().for_each(|e| *e = t.round(*e));
        }
        (q, k, v, pq, pk)
    }

    /// Places the case in `group`, its encoding named `encoding`.
    pub fn tagged(mut self, group: Group, encoding: &str) -> Self {
        self.group = group;
        self.encoding = encoding.to_string();
        self
    }

    /// `causal` or `bidir`.
    pub fn mask(&self) -> &'static str {
        if self.spec.causal { "causal" } else { "bidir" }
    }

    /// `mha`, `gqa` or `mqa`.
    pub fn kv_sharing(&self) -> &'static str {
        match self.spec.num_kv_heads {
            k if k == self.spec.num_heads => "mha",
            1 => "mqa",
            _ => "gqa",
        }
    }

    /// Draws positions as `p` says.
    pub fn with_positions(mut self, p: Positions) -> Self {
        self.positions = p;
        self
    }

    /// Plants a NaN as `nan` says.
    pub fn with_nan(mut self, nan: NanPlant) -> Self {
        self.nan = nan;
        self
    }

    /// The case's inputs: q, k, v and positions.
    pub fn inputs(&self) -> Inputs {
        let s = &self.spec;
        let mut rng = SplitMix::new(self.seed);
        // Amplitude 2 gives logits of a few units: softmax neither flat nor one-hot.
        let q = rng.vec(s.q_len(), 2.0);
        let mut k = rng.vec(s.kv_len(), 2.0);
        let mut v = rng.vec(s.kv_len(), 1.0);
        let (mut pq, mut pk) = s.default_positions();
        match self.positions {
            Positions::Default => {}
            Positions::Offset(o) => {
                pq.iter_mut().chain(pk.iter_mut()).for_each(|p| *p += o);
            }
            Positions::Stride(st) => {
                pq.iter_mut().chain(pk.iter_mut()).for_each(|p| *p *= st);
            }
            Positions::RandomSubset(max) => {
                // Per batch: a sorted random subset of 0..max for the keys; queries take the last
                // seq_q of them, as in a self-attention over the subset.
                let (sq, sk) = (s.seq_q as usize, s.seq_k as usize);
                for b in 0..s.batch as usize {
                    let mut chosen: Vec<i32> = Vec::with_capacity(sk);
                    while chosen.len() < sk {
                        let c = (rng.next_u64() % max as u64) as i32;
                        if !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                    chosen.sort_unstable();
                    pk[b * sk..(b + 1) * sk].copy_from_slice(&chosen);
                    for i in 0..sq {
                        pq[b * sq + i] = chosen[(i + sk).saturating_sub(sq).min(sk - 1)];
                    }
                }
            }
        }
        if self.nan != NanPlant::None {
            // The last key of batch 0, kv head 0: hidden from every row but the last under the
            // causal mask.
            let j = s.seq_k as usize - 1;
            let base = j * s.num_kv_heads as usize * s.head_dim as usize;
            match self.nan {
                NanPlant::MaskedValue => v[base + 1] = f32::NAN,
                NanPlant::MaskedKey => k[base + 1] = f32::NAN,
                NanPlant::None => {}
            }
        }
        (q, k, v, pq, pk)
    }
}

impl Case {
    /// The caller bias of a spec with a bias layout: uniform in [-2, 2), about one entry in
    /// eight −∞ (a masked key), and the first query row of each plane fully masked.
    pub fn bias(&self) -> Option<Vec<f32>> {
        self.spec.bias?;
        let mut rng = SplitMix::new(self.seed ^ 0x5eed_b1a5);
        let sk = self.spec.seq_k as usize;
        let mut b = rng.vec(bias_len(&self.spec), 2.0);
        for (i, x) in b.iter_mut().enumerate() {
            if rng.next_u64().is_multiple_of(8) || (i / sk).is_multiple_of(self.spec.seq_q as usize)
            {
                *x = f32::NEG_INFINITY;
            }
        }
        Some(b)
    }
}

/// Compares a GPU output with the references; returns (status, err_gpu, err_f32, bound).
pub fn compare(gpu: &[f32], ref64: &[f64], ref32: &[f32]) -> (Status, f64, f64, f64) {
    let mut err_gpu = 0.0f64;
    let mut err_f32 = 0.0f64;
    let mut max_ref = 1.0f64;
    let mut nan_mismatch = None;
    for (i, ((&g, &r), &r32)) in gpu.iter().zip(ref64).zip(ref32).enumerate() {
        if r.is_nan() != g.is_nan() || (!r.is_nan() && !g.is_finite()) {
            nan_mismatch.get_or_insert((i, g, r));
            continue;
        }
        if r.is_nan() {
            continue;
        }
        max_ref = max_ref.max(r.abs());
        err_gpu = err_gpu.max((g as f64 - r).abs());
        if !r32.is_nan() {
            err_f32 = err_f32.max((r32 as f64 - r).abs());
        }
    }
    let bound = ERR_MULTIPLE * err_f32 + ERR_FLOOR * max_ref;
    let status = if let Some((i, g, r)) = nan_mismatch {
        Status::Fail(format!("element {i}: gpu {g}, reference {r}"))
    } else if err_gpu > bound {
        Status::Fail(format!("error {err_gpu:.3e} > bound {bound:.3e}"))
    } else {
        Status::Pass
    };
    (status, err_gpu, err_f32, bound)
}

/// The fused kernel variant `case` compiles when the adapter runs `rows_for(head_dim)` query rows
/// per invocation (see `Context::rows_per_invocation`) and stores f16 in form `half`, found
/// without a device; a case the planner rejects gives its error. Compiling variants is what the
/// software adapters spend their time on, so a test run's cost is its number of distinct
/// variants.
pub fn case_kernel(
    case: &Case,
    rows_for: impl Fn(u32) -> u32,
    half: crate::dtype::HalfForm,
) -> Result<KernelKey> {
    let plan = crate::plan::lower(&case.spec)?;
    Ok(plan.fused_key(case.spec.head_dim, rows_for(case.spec.head_dim), half))
}

/// Runs one case on `ctx` and checks it against the CPU reference.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_case(ctx: &Context, case: &Case) -> CaseResult {
    pollster::block_on(run_case_async(ctx, case))
}

/// [`run_case`] as a future (the form the browser runs: plan creation and readback awaited).
pub async fn run_case_async(ctx: &Context, case: &Case) -> CaseResult {
    // A custom scheme is checked against its Rust twins: a hook without one cannot be checked.
    if let PositionEncoding::Custom(c) = &case.spec.position {
        let missing = c.missing_twins();
        if !missing.is_empty() {
            return CaseResult {
                name: case.name.clone(),
                status: Status::Fail(format!(
                    "the custom scheme has no Rust twin for {}: nothing to check it against",
                    missing.join(", ")
                )),
                err_gpu: f64::NAN,
                err_f32: f64::NAN,
                bound: f64::NAN,
                time: Duration::ZERO,
            };
        }
    }
    let (q, k, v, pq, pk) = case.stored_inputs();
    let bias = case.bias();
    let start = Instant::now();
    let half = case.half_form.unwrap_or(ctx.half_form());
    let gpu = match Attention::with_half_form_async(ctx, &case.spec, half).await {
        Ok(plan) => {
            plan.run_with_bias_async(ctx, &q, &k, &v, Some(&pq), Some(&pk), bias.as_deref())
                .await
        }
        Err(e) => Err(e),
    };
    let time = start.elapsed();
    let mut result = CaseResult {
        name: case.name.clone(),
        status: Status::Pass,
        err_gpu: f64::NAN,
        err_f32: f64::NAN,
        bound: f64::NAN,
        time,
    };
    match gpu {
        Err(e @ Error::Unavailable { .. }) => result.status = Status::Unsupported(e.to_string()),
        Err(e) => result.status = Status::Fail(e.to_string()),
        Ok(gpu) => {
            let b = bias.as_deref();
            let r64 = reference::attention_with_bias::<f64>(&case.spec, &q, &k, &v, &pq, &pk, b);
            // A score tile rounds its product's operands to f16: the plain implementation
            // that bounds it does too.
            let mut r32 = if ctx.score_tile().pv() {
                reference::attention_half_pv::<f32>(&case.spec, &q, &k, &v, &pq, &pk, b)
            } else if ctx.score_tile().half_operands() {
                reference::attention_half_scores::<f32>(&case.spec, &q, &k, &v, &pq, &pk, b)
            } else if ctx.accumulation() == crate::dtype::Accumulation::F16 {
                reference::attention_half_acc::<f32>(&case.spec, &q, &k, &v, &pq, &pk, b)
            } else {
                reference::attention_with_bias::<f32>(&case.spec, &q, &k, &v, &pq, &pk, b)
            };
            // The plain implementation stores its output in the output's dtype too.
            let out = case.spec.dtypes.out;
            r32.iter_mut().for_each(|x| *x = out.round(*x));
            let (mut status, eg, ef, b) = compare(&gpu, &r64, &r32);
            // NaN the case did not plant comes from the scheme itself (a custom scheme) or the
            // reference: reported, even where the kernel agrees with it, since a NaN reference
            // checks nothing.
            if case.nan == NanPlant::None
                && let Some(i) = r64.iter().position(|x| x.is_nan())
            {
                let what = match case.spec.position {
                    PositionEncoding::Custom(_) => "the custom scheme produces",
                    _ => "the reference is",
                };
                status = Status::Fail(format!(
                    "{what} NaN where no NaN was planted (reference element {i}, gpu {})",
                    gpu[i]
                ));
            }
            result.status = status;
            result.err_gpu = eg;
            result.err_f32 = ef;
            result.bound = b;
        }
    }
    result
}

/// Runs every case; `progress` is called after each one.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_cases(
    ctx: &Context,
    cases: &[Case],
    mut progress: impl FnMut(&CaseResult),
) -> Vec<CaseResult> {
    cases
        .iter()
        .map(|c| {
            let r = run_case(ctx, c);
            progress(&r);
            r
        })
        .collect()
}

/// Whether [`run_cases_isolated`] gives each kernel variant a device of its own, opened from a
/// new wgpu instance: on llvmpipe (lavapipe and llvmpipe's GL path, the CPU adapters), compiling
/// a kernel gets slower with every kernel compiled before it in the same instance. Measured on
/// this project's machine (Mesa 22.3, first dispatch of a fused variant): on GL, the head-size-32
/// RoPE kernel took 21.6 s first and 49.4 s when compiled again after three others; from a new
/// instance each time, 21–23 s every time. On lavapipe, a head-size-256 kernel took 46 s alone
/// and 89 s after one other. On Vulkan a new device on the same adapter is enough; on GL the
/// adapter holds the driver's context, so the instance is new too. GPUs compile without it.
pub fn isolates_kernels(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

/// The adapter that `info` describes, enumerated from a new wgpu instance on its backend (the
/// same name, vendor, device, type and driver), or [`crate::Error::NoAdapter`] naming it if it is
/// no longer there.
#[cfg(not(target_arch = "wasm32"))]
pub fn reopen_adapter(info: &wgpu::AdapterInfo) -> Result<wgpu::Adapter> {
    let options = crate::context::ContextOptions::default()
        .with_backends(info.backend.into())
        .with_adapter_name(None);
    crate::context::enumerate_adapters(&options)
        .into_iter()
        .find(|a| {
            let i = a.get_info();
            i.name == info.name
                && i.vendor == info.vendor
                && i.device == info.device
                && i.device_type == info.device_type
                && i.driver == info.driver
                && i.driver_info == info.driver_info
        })
        .ok_or_else(|| {
            crate::Error::NoAdapter(format!(
                "{} is not listed by a new wgpu instance",
                info.name
            ))
        })
}

/// What [`run_cases_isolated`] did, over every device it used.
#[derive(Debug)]
pub struct IsolatedRun {
    /// One result per case, in the order of the cases given.
    pub results: Vec<CaseResult>,
    /// Kernel pipelines created, summed over the devices.
    pub kernels: usize,
    /// Time spent creating those pipelines.
    pub compile: Duration,
    /// wgpu errors no scope caught, from every device.
    pub uncaptured: Vec<String>,
    /// Devices the run used.
    pub devices: usize,
    /// Threads the groups ran on (1: one after another).
    pub threads: usize,
}

/// Runs `cases` grouped by the fused kernel variant each compiles (first appearance order, stable
/// within a group). Where [`isolates_kernels`] holds for `ctx`'s adapter, each group after the
/// first runs on a context from `reopen` (set up as `ctx` is: rows per invocation, f16 form, score
/// tile), which is dropped after its group; `ctx` runs the first group and every case whose plan
/// is rejected (those compile nothing). Elsewhere every case runs on `ctx`. A group whose context
/// cannot be opened fails each of its cases with that error.
///
/// The isolated groups run on up to `threads` threads at once (at least 1;
/// [`default_check_threads`] is the machine's): llvmpipe compiles a kernel on one core at its
/// first dispatch, so on a machine with two cores a cold run compiles two variants at a time.
/// `progress` is called as each case ends: in case order within a group, with the groups
/// interleaved.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_cases_isolated(
    ctx: &Context,
    cases: &[Case],
    threads: usize,
    reopen: impl Fn() -> Result<Context> + Sync,
    progress: impl FnMut(&CaseResult) + Send,
) -> IsolatedRun {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let isolate = isolates_kernels(ctx.adapter_info());
    // Group index per case: 0 for the first group and the rejected plans.
    let mut keys: Vec<KernelKey> = Vec::new();
    let group: Vec<usize> = cases
        .iter()
        .map(|c| {
            let half = c.half_form.unwrap_or(ctx.half_form());
            match case_kernel(c, |d| ctx.rows_per_invocation(d), half)
                .map(|k| ctx.fused_variant(k, &c.spec))
            {
                Ok(k) if isolate => match keys.iter().position(|x| *x == k) {
                    Some(i) => i,
                    None => {
                        keys.push(k);
                        keys.len() - 1
                    }
                },
                _ => 0,
            }
        })
        .collect();
    let groups = keys.len().max(1);
    let results: Mutex<Vec<Option<CaseResult>>> = Mutex::new(vec![None; cases.len()]);
    let run = Mutex::new(IsolatedRun {
        results: Vec::new(),
        kernels: 0,
        compile: Duration::ZERO,
        uncaptured: Vec::new(),
        devices: 0,
        threads: 1,
    });
    let progress = Mutex::new(progress);
    let account = |c: &Context| {
        let (k, t) = c.compile_stats();
        let mut run = run.lock().expect("run record");
        run.kernels += k;
        run.compile += t;
        run.uncaptured.extend(c.take_uncaptured_errors());
        run.devices += 1;
    };
    // Runs group `g` on `on` (or fails its cases with why it has no context).
    let run_group = |g: usize, on: std::result::Result<&Context, String>| {
        for i in (0..cases.len()).filter(|&i| group[i] == g) {
            let r = match on {
                Ok(c) => run_case(c, &cases[i]),
                Err(ref why) => CaseResult {
                    name: cases[i].name.clone(),
                    status: Status::Fail(why.clone()),
                    err_gpu: f64::NAN,
                    err_f32: f64::NAN,
                    bound: f64::NAN,
                    time: Duration::ZERO,
                },
            };
            (progress.lock().expect("progress"))(&r);
            results.lock().expect("results")[i] = Some(r);
        }
    };
    // Groups 1.. on their own contexts, taken in order by whichever thread is free.
    let next = AtomicUsize::new(1);
    let worker = || {
        loop {
            let g = next.fetch_add(1, Ordering::Relaxed);
            if g >= groups {
                break;
            }
            match reopen() {
                Ok(c) => {
                    run_group(g, Ok(&c));
                    account(&c);
                }
                Err(e) => run_group(
                    g,
                    Err(format!("could not open a device for this kernel: {e}")),
                ),
            }
        }
    };
    let threads = threads.clamp(1, groups);
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(worker);
        }
        run_group(0, Ok(ctx));
        worker();
    });
    account(ctx);
    let mut run = run.into_inner().expect("run record");
    run.threads = threads;
    run.results = results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|r| r.expect("every case ran"))
        .collect();
    run
}

/// Threads for [`run_cases_isolated`] unless told otherwise: the machine's available
/// parallelism, at most 4 (each llvmpipe compile holds its own LLVM context, some hundreds of
/// MiB for the largest kernels).
#[cfg(not(target_arch = "wasm32"))]
pub fn default_check_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

fn rope() -> PositionEncoding {
    PositionEncoding::Rope(Rope::new(10000.0))
}

/// RoPE at theta 500000 with a scaling scheme's table and attention factor (head_dim 64).
fn scaled(scheme: RopeScaling) -> PositionEncoding {
    scaled_at(scheme, None)
}

fn scaled_at(scheme: RopeScaling, seq_len: Option<u64>) -> PositionEncoding {
    let f = rope_frequencies(500000.0, 64, 1.0, &scheme, seq_len).expect("scaling table");
    PositionEncoding::Rope(f.to_rope(500000.0, RopeLayout::Half))
}

/// The matrix's encoding called `name`.
fn encoding(name: &str, num_heads: u32) -> PositionEncoding {
    encodings(num_heads)
        .into_iter()
        .find(|e| e.0 == name)
        .map(|e| e.1)
        .unwrap_or_else(|| panic!("no encoding {name} in the matrix"))
}

/// The encodings the matrix covers, by name.
pub fn encodings(num_heads: u32) -> Vec<(&'static str, PositionEncoding)> {
    vec![
        ("none", PositionEncoding::None),
        ("rope_half", rope()),
        (
            "rope_interleaved",
            PositionEncoding::Rope(Rope::new(10000.0).with_layout(RopeLayout::Interleaved)),
        ),
        (
            "rope_partial_af",
            PositionEncoding::Rope(
                Rope::new(500000.0)
                    .with_rotary_dim(24)
                    .with_attention_factor(1.1),
            ),
        ),
        (
            "rope_partial_interleaved",
            PositionEncoding::Rope(
                Rope::new(10000.0)
                    .with_rotary_dim(16)
                    .with_layout(RopeLayout::Interleaved),
            ),
        ),
        (
            "alibi_causal",
            PositionEncoding::Alibi(Alibi {
                slopes: AlibiSlopes::Standard,
                form: AlibiForm::Causal,
            }),
        ),
        (
            "alibi_symmetric",
            PositionEncoding::Alibi(Alibi {
                slopes: AlibiSlopes::Standard,
                form: AlibiForm::Symmetric,
            }),
        ),
        (
            "alibi_custom",
            PositionEncoding::Alibi(Alibi {
                slopes: AlibiSlopes::Custom(
                    (0..num_heads).map(|h| 0.05 + 0.1 * h as f32).collect(),
                ),
                form: AlibiForm::Causal,
            }),
        ),
        (
            "rope_yarn",
            scaled(RopeScaling::Yarn(Yarn {
                factor: Some(4.0),
                original_max_position_embeddings: 4096,
                max_position_embeddings: 16384,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            })),
        ),
        (
            "rope_llama3",
            scaled(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
        ),
        ("xpos", PositionEncoding::Xpos(Xpos::default())),
        (
            "xpos_half",
            PositionEncoding::Xpos(Xpos {
                layout: RopeLayout::Half,
                ..Xpos::default()
            }),
        ),
    ]
}

/// Every RoPE scaling scheme through the fused kernel (head_dim 64, theta 500000), by name.
pub fn scaling_encodings() -> Vec<(&'static str, PositionEncoding)> {
    let long = |n: usize, step: f64| (0..n).map(|i| 1.0 + step * i as f64).collect::<Vec<_>>();
    vec![
        ("rope_linear", scaled(RopeScaling::Linear { factor: 4.0 })),
        (
            "rope_ntk_alpha",
            scaled(RopeScaling::NtkAlpha { alpha: 8.0 }),
        ),
        (
            "rope_dynamic_past",
            scaled_at(
                RopeScaling::Dynamic {
                    factor: 2.0,
                    max_position_embeddings: 32,
                },
                Some(70),
            ),
        ),
        (
            "rope_longrope_long",
            scaled_at(
                RopeScaling::LongRope(crate::encoding::scaling::LongRope {
                    short_factor: long(32, 0.01),
                    long_factor: long(32, 0.5),
                    factor: None,
                    original_max_position_embeddings: 32,
                    max_position_embeddings: 1024,
                    attention_factor: None,
                }),
                Some(70),
            ),
        ),
        ("rope_proportional", {
            let f = rope_frequencies(
                500000.0,
                64,
                0.25,
                &RopeScaling::Proportional { factor: 2.0 },
                None,
            )
            .expect("table");
            PositionEncoding::Rope(f.to_rope(500000.0, RopeLayout::Half))
        }),
    ]
}

/// The conformance matrix: every encoding × causal/bidirectional × MHA/GQA/MQA, then the tile
/// edges, sequence-length mismatches, batches with their own positions, every head size, and
/// NaN placement.
pub fn conformance_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let heads = 4;
    for (ename, enc) in encodings(heads) {
        for causal in [true, false] {
            for (gname, kv) in [("mha", 4), ("gqa", 2), ("mqa", 1)] {
                let mask = if causal { "causal" } else { "bidir" };
                let spec = AttentionSpec::default()
                    .with_seq_len(37)
                    .with_heads(heads)
                    .with_kv_heads(kv)
                    .with_causal(causal)
                    .with_position(enc.clone());
                cases.push(
                    Case::new(format!("{ename}_{mask}_{gname}_s37_d64"), spec)
                        .tagged(Group::Encodings, ename),
                );
            }
        }
    }
    // Tile edges: 64 query rows per workgroup, 32 keys per tile at d = 64.
    for enc_name in ["rope_half", "alibi_causal", "xpos"] {
        let enc = encoding(enc_name, 2);
        for (sq, sk) in [
            (1, 1),
            (1, 100),
            (63, 63),
            (64, 64),
            (65, 65),
            (31, 31),
            (32, 32),
            (33, 33),
            (17, 100),
            (100, 17),
            (129, 129),
        ] {
            for causal in [true, false] {
                let mask = if causal { "causal" } else { "bidir" };
                let spec = AttentionSpec::default()
                    .with_seq_q(sq)
                    .with_seq_k(sk)
                    .with_heads(2)
                    .with_kv_heads(1)
                    .with_causal(causal)
                    .with_position(enc.clone());
                cases.push(
                    Case::new(format!("{enc_name}_{mask}_q{sq}_k{sk}_d64"), spec)
                        .tagged(Group::TileEdges, enc_name),
                );
            }
        }
    }
    // Batches whose rows have different positions, and unusual position layouts.
    for (pname, pos) in [
        ("offset1000", Positions::Offset(1000)),
        ("stride3", Positions::Stride(3)),
        ("random4096", Positions::RandomSubset(4096)),
        ("offset100000", Positions::Offset(100_000)),
    ] {
        for enc_name in ["rope_half", "alibi_symmetric", "xpos"] {
            let enc = encoding(enc_name, 4);
            let spec = AttentionSpec::default()
                .with_batch(3)
                .with_seq_q(40)
                .with_seq_k(70)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(enc);
            cases.push(
                Case::new(format!("{enc_name}_b3_q40_k70_{pname}"), spec)
                    .with_positions(pos.clone())
                    .tagged(Group::Positions, enc_name),
            );
        }
    }
    // Every supported head size.
    for &d in SUPPORTED_HEAD_DIMS {
        for (ename, enc) in [
            ("rope_half", rope()),
            ("alibi_causal", encoding("alibi_causal", 2)),
        ] {
            let spec = AttentionSpec::default()
                .with_seq_len(50)
                .with_heads(2)
                .with_head_dim(d)
                .with_position(enc);
            cases.push(
                Case::new(format!("{ename}_causal_s50_d{d}"), spec).tagged(Group::HeadDims, ename),
            );
        }
    }
    // NaN placement: masked-out NaN must not leak; attended NaN must propagate.
    for (nname, nan) in [
        ("nan_masked_v", NanPlant::MaskedValue),
        ("nan_masked_k", NanPlant::MaskedKey),
    ] {
        let spec = AttentionSpec::default()
            .with_seq_len(70)
            .with_heads(2)
            .with_position(rope());
        cases.push(
            Case::new(format!("rope_causal_s70_{nname}"), spec)
                .with_nan(nan)
                .tagged(Group::NanPlacement, "rope_half"),
        );
    }
    // Every scaling scheme's table through the kernel, causal and bidirectional, with GQA.
    for (ename, enc) in scaling_encodings() {
        for causal in [true, false] {
            let mask = if causal { "causal" } else { "bidir" };
            let spec = AttentionSpec::default()
                .with_seq_len(70)
                .with_heads(4)
                .with_kv_heads(2)
                .with_causal(causal)
                .with_position(enc.clone());
            cases.push(
                Case::new(format!("{ename}_{mask}_gqa_s70_d64"), spec)
                    .tagged(Group::Scaling, ename),
            );
        }
    }
    // Log-n query scaling, with queries past the training length.
    for (ename, enc) in [("none", PositionEncoding::None), ("rope_half", rope())] {
        for causal in [true, false] {
            let mask = if causal { "causal" } else { "bidir" };
            let spec = AttentionSpec::default()
                .with_batch(2)
                .with_seq_q(40)
                .with_seq_k(70)
                .with_heads(4)
                .with_kv_heads(2)
                .with_causal(causal)
                .with_logn(32)
                .with_position(enc.clone());
            cases.push(
                Case::new(format!("{ename}_{mask}_logn32_b2_q40_k70"), spec)
                    .tagged(Group::Logn, ename),
            );
        }
    }
    // A non-default softmax scale (T5 style: unscaled logits).
    let spec = AttentionSpec::default()
        .with_seq_len(45)
        .with_heads(2)
        .with_scale(1.0)
        .with_causal(false);
    cases.push(Case::new("none_bidir_s45_d64_scale1", spec).tagged(Group::Scale, "none"));
    cases.extend(bias_and_mask_cases());
    cases
}

/// Seeded per-head parameters for the table-driven biases.
fn params(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| lo + (rng.uniform() + 1.0) * 0.5 * (hi - lo))
        .collect()
}

/// T5 buckets with a seeded table.
pub fn t5(
    num_buckets: u32,
    max_distance: u32,
    bidirectional: bool,
    heads: u32,
) -> PositionEncoding {
    PositionEncoding::T5(T5Bias {
        num_buckets,
        max_distance,
        bidirectional,
        table: params(7, (num_buckets * heads) as usize, -2.0, 2.0),
    })
}

/// KERPLE with seeded parameters (one head's below the clamp floor).
pub fn kerple(form: KerpleForm, heads: u32) -> PositionEncoding {
    let mut p = params(11, heads as usize, 0.05, 1.9);
    p[0] = 0.001;
    PositionEncoding::Kerple(Kerple {
        form,
        p,
        a: params(13, heads as usize, 0.02, 1.0),
    })
}

/// FIRE with a seeded MLP of width 32 and a small threshold L, so max(m, L) switches inside the
/// sequence.
pub fn fire(heads: u32) -> PositionEncoding {
    let w = 32;
    PositionEncoding::Fire(Fire {
        c: 0.1,
        l: 16.0,
        ..Fire::new(
            params(17, w, -2.0, 2.0),
            params(19, w, -1.0, 1.0),
            params(23, w * heads as usize, -1.0, 1.0),
            params(29, heads as usize, -1.0, 1.0),
        )
    })
}

/// The relative biases alone, then masks, sinks, softcap, the caller bias and the
/// extrapolation methods, alone and in the combinations models use.
fn bias_and_mask_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let heads = 4;
    let base = |sq, sk| {
        AttentionSpec::default()
            .with_seq_q(sq)
            .with_seq_k(sk)
            .with_heads(heads)
            .with_kv_heads(2)
    };
    // Relative biases, each causal and bidirectional.
    for (name, enc) in [
        ("t5_bidirectional", t5(32, 128, true, heads)),
        ("t5_unidirectional_nb16_md40", t5(16, 40, false, heads)),
        ("kerple_log", kerple(KerpleForm::Log, heads)),
        ("kerple_power", kerple(KerpleForm::Power, heads)),
        ("sandwich", PositionEncoding::Sandwich(Sandwich::default())),
        (
            "sandwich_dim128",
            PositionEncoding::Sandwich(Sandwich { dim: Some(128) }),
        ),
        ("fire", fire(heads)),
    ] {
        for causal in [true, false] {
            let mask = if causal { "causal" } else { "bidir" };
            let spec = base(100, 100)
                .with_causal(causal)
                .with_position(enc.clone());
            cases.push(
                Case::new(format!("{name}_{mask}_gqa_s100"), spec)
                    .tagged(Group::RelativeBias, name),
            );
        }
        // Positions far apart: past T5's max distance, past the Sandwich table (summed in the
        // kernel), FIRE's normaliser at large m.
        let spec = base(40, 70).with_kv_heads(1).with_position(enc.clone());
        cases.push(
            Case::new(format!("{name}_causal_q40_k70_stride300"), spec)
                .with_positions(Positions::Stride(300))
                .tagged(Group::RelativeBiasFar, name),
        );
    }
    let rope_w = |spec: AttentionSpec| spec.with_position(rope());
    // Sliding windows: causal (Mistral), two-sided, with seq_q ≠ seq_k, and with rows that see
    // nothing (they give 0).
    for (name, spec) in [
        (
            "window_l16_causal_s150",
            rope_w(base(150, 150)).with_window(Window::recent(17)),
        ),
        (
            "window_l16_r8_bidir_s150",
            rope_w(base(150, 150))
                .with_causal(false)
                .with_window(Window {
                    left: Some(16),
                    right: Some(8),
                }),
        ),
        (
            "window_l20_causal_q40_k150",
            rope_w(base(40, 150)).with_window(Window::recent(21)),
        ),
        (
            "window_r0_bidir_q90_k30_empty_rows",
            rope_w(base(90, 30)).with_causal(false).with_window(Window {
                left: Some(3),
                right: Some(0),
            }),
        ),
        (
            "alibi_window_l32_causal_s150",
            base(150, 150)
                .with_position(encodings(heads)[5].1.clone())
                .with_window(Window::recent(33)),
        ),
        // Softcap alone: strong (2) and Gemma 2's 50.
        (
            "softcap2_rope_causal_s70",
            rope_w(base(70, 70)).with_softcap(2.0),
        ),
        (
            "softcap50_rope_bidir_s70",
            rope_w(base(70, 70)).with_causal(false).with_softcap(50.0),
        ),
        // Caps from far below the logits (saturated) to far above them (tanh of tiny
        // arguments, where the cap must leave the logits as they are).
        (
            "softcap1e-2_rope_causal_s40",
            rope_w(base(40, 40)).with_softcap(1e-2),
        ),
        (
            "softcap3e2_rope_causal_s40",
            rope_w(base(40, 40)).with_softcap(300.0),
        ),
        (
            "softcap1e4_rope_causal_s40",
            rope_w(base(40, 40)).with_softcap(1e4),
        ),
        (
            "softcap1e8_rope_causal_s40",
            rope_w(base(40, 40)).with_softcap(1e8),
        ),
        // Learned sink logits, one of them dominant, and with rows that see no key.
        (
            "sink_logits_rope_causal_s70",
            rope_w(base(70, 70)).with_sink_logits(vec![-1.0, 0.5, 3.0, 10.0]),
        ),
        (
            "sink_logits_none_causal_q90_k30",
            base(90, 30).with_sink_logits(vec![0.0, 1.0, -2.0, 5.0]),
        ),
        // The caller's bias: per head and batch, broadcast over heads, with −∞ entries.
        (
            "user_bias_none_bidir_b2_s70",
            base(70, 70)
                .with_causal(false)
                .with_bias(BiasLayout::default()),
        ),
        (
            "user_bias_heads_broadcast_rope_causal_s70",
            rope_w(base(70, 70)).with_bias(BiasLayout {
                broadcast_batch: true,
                broadcast_heads: true,
            }),
        ),
        // StreamingLLM: 4 sinks and 32 recent keys, original and cache-index positions.
        (
            "streaming_s4_r32_original_s150",
            rope_w(base(150, 150)).with_streaming(4, 32, false),
        ),
        (
            "streaming_s4_r32_cache_index_s150",
            rope_w(base(150, 150)).with_streaming(4, 32, true),
        ),
        // LM-Infinite: global 4, local 32, limit at and past the local branch.
        (
            "lm_infinite_g4_l32_limit32_s150",
            rope_w(base(150, 150)).with_lm_infinite(4, 32, 32),
        ),
        (
            "lm_infinite_g10_l24_limit40_s150",
            rope_w(base(150, 150)).with_lm_infinite(10, 24, 40),
        ),
        // ReRoPE and Leaky ReRoPE, causal and bidirectional.
        (
            "rerope_w16_causal_s100",
            rope_w(base(100, 100)).with_extrapolation(Extrapolation::ReRope {
                window: 16,
                leak: None,
            }),
        ),
        (
            "rerope_w16_bidir_s100",
            rope_w(base(100, 100))
                .with_causal(false)
                .with_extrapolation(Extrapolation::ReRope {
                    window: 16,
                    leak: None,
                }),
        ),
        (
            "leaky_rerope_w16_k4_causal_s100",
            rope_w(base(100, 100)).with_extrapolation(Extrapolation::ReRope {
                window: 16,
                leak: Some(4.0),
            }),
        ),
        // Combinations models use. RoPE + window + sinks + softcap + sink logits.
        (
            "combo_rope_window_sinks_softcap_sink_logits_s150",
            rope_w(base(150, 150))
                .with_streaming(4, 48, false)
                .with_softcap(30.0)
                .with_sink_logits(vec![0.3, -0.7, 1.5, 2.0]),
        ),
        // Gemma 2 local layer: window and softcap.
        (
            "combo_gemma2_window_softcap_s150",
            rope_w(base(150, 150))
                .with_window(Window::recent(64))
                .with_softcap(50.0),
        ),
        // gpt-oss: sliding window 128 with learned sinks.
        (
            "combo_gpt_oss_window_sink_logits_s150",
            rope_w(base(150, 150))
                .with_window(Window::recent(40))
                .with_sink_logits(vec![1.0, 2.0, 0.0, -1.0]),
        ),
        // RoPE scaling + log-n + ReRoPE (ReRoPE's own recipe with a YaRN table).
        (
            "combo_yarn_logn_rerope_s150",
            base(150, 150)
                .with_position(
                    encodings(heads)
                        .into_iter()
                        .chain(scaling_encodings())
                        .find(|e| e.0 == "rope_yarn")
                        .expect("rope_yarn")
                        .1,
                )
                .with_logn(32)
                .with_extrapolation(Extrapolation::ReRope {
                    window: 24,
                    leak: None,
                }),
        ),
        // T5 with a caller mask as a bias buffer (padding), and KERPLE with a window.
        (
            "combo_t5_user_bias_bidir_s70",
            base(70, 70)
                .with_causal(false)
                .with_position(t5(32, 128, true, heads))
                .with_bias(BiasLayout {
                    broadcast_batch: false,
                    broadcast_heads: true,
                }),
        ),
        (
            "combo_kerple_log_window_s150",
            base(150, 150)
                .with_position(kerple(KerpleForm::Log, heads))
                .with_window(Window::recent(33)),
        ),
    ] {
        let group = if name.starts_with("combo_") {
            Group::Combination
        } else {
            Group::Features
        };
        let encoding = spec.position.name();
        cases.push(Case::new(name, spec).tagged(group, encoding));
    }
    // A NaN that only the window hides: in K at the last key, bidirectional, so that only rows
    // whose window reaches it become NaN.
    let spec = rope_w(base(100, 100))
        .with_causal(false)
        .with_window(Window {
            left: Some(8),
            right: Some(8),
        });
    cases.push(
        Case::new("window_l8_r8_bidir_s100_nan_masked_k", spec)
            .with_nan(NanPlant::MaskedKey)
            .tagged(Group::Features, "rope_half"),
    );
    cases
}

/// Every case in every dtype of `dtypes` (f32 names unchanged, others suffixed).
pub fn in_dtypes(cases: &[Case], dtypes: &[Dtype]) -> Vec<Case> {
    dtypes
        .iter()
        .flat_map(|&d| cases.iter().map(move |c| c.clone().with_dtype(d)))
        .collect()
}

/// The dtype cross product `posattn check` runs on one adapter: every case in f32, f16 (the
/// adapter's form) and bf16 as `dtypes` selects, plus f16 forced packed where the adapter's own
/// form is native, so that both f16 forms are checked there.
pub fn dtype_matrix(cases: &[Case], dtypes: &[Dtype], ctx: &Context) -> Vec<Case> {
    let mut out = in_dtypes(cases, dtypes);
    if dtypes.contains(&Dtype::F16) && ctx.half_form() == HalfForm::Native {
        out.extend(
            in_dtypes(cases, &[Dtype::F16])
                .into_iter()
                .map(|c| c.with_half_form(HalfForm::Packed)),
        );
    }
    out
}

/// A short subset of the matrix for quick runs: one case per encoding and relative bias, the
/// combinations of masks and extrapolation methods, and a few edges.
pub fn quick_cases() -> Vec<Case> {
    conformance_cases().into_iter().filter(is_quick).collect()
}

/// What `posattn check --quick` runs on `ctx`: the quick subset in f32, and its RoPE head_dim 64
/// cases (the covering subset of the half dtypes) in f16 (the adapter's form, plus packed where
/// that is native) and bf16. The browser tests and the conformance page run these.
pub fn quick_check_cases(ctx: &Context) -> Vec<Case> {
    dtype_matrix(&quick_cases(), &Dtype::ALL, ctx)
        .into_iter()
        .filter(|c| c.spec.dtypes == Dtypes::F32 || c.is_rope_d64())
        .collect()
}

/// Whether a case is in the quick subset: the encodings with MHA, the tile edge at 65 × 65,
/// every NaN placement, each relative bias causal, and the combinations.
pub fn is_quick(c: &Case) -> bool {
    let s = &c.spec;
    c.nan != NanPlant::None
        || match c.group {
            Group::Encodings => c.kv_sharing() == "mha",
            Group::TileEdges => s.seq_q == 65 && s.seq_k == 65,
            Group::RelativeBias => s.causal,
            Group::Combination => true,
            _ => false,
        }
}

/// A selection of cases by their attributes: comma-separated `KEY=VALUE` terms that must all
/// hold, with keys `group`, `encoding`, `mask` (causal, bidir), `kv` (mha, gqa, mqa),
/// `head_dim`, `dtype` (f32, f16, bf16) and `name` (the exact case name, to replay one case).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    terms: Vec<(&'static str, String)>,
}

impl Selection {
    /// The keys `--filter` accepts.
    pub const KEYS: [&'static str; 7] = [
        "group", "encoding", "mask", "kv", "head_dim", "dtype", "name",
    ];

    /// Parses a selection; an unknown key, a term without `=` or a value no case of the full
    /// matrix can have is an error naming `filter`.
    pub fn parse(text: &str) -> Result<Self> {
        let all = conformance_cases();
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let Some((key, value)) = term.split_once('=') else {
                return Err(Error::invalid("filter", "KEY=VALUE terms", term));
            };
            let Some(&key) = Self::KEYS.iter().find(|k| **k == key.trim()) else {
                return Err(Error::invalid(
                    "filter",
                    format!("keys among {:?}", Self::KEYS),
                    key,
                ));
            };
            let value = value.trim().to_string();
            let mut known: Vec<String> = if key == "dtype" {
                Dtype::ALL.iter().map(|d| d.name().to_string()).collect()
            } else {
                all.iter().map(|c| Self::attr(c, key)).collect()
            };
            known.sort_unstable();
            known.dedup();
            if !known.contains(&value) {
                let shown = if key == "name" {
                    "the name of a case".to_string()
                } else {
                    format!("one of {known:?}")
                };
                return Err(Error::invalid("filter", format!("{key}: {shown}"), value));
            }
            terms.push((key, value));
        }
        if terms.is_empty() {
            return Err(Error::invalid(
                "filter",
                "at least one KEY=VALUE term",
                "none",
            ));
        }
        Ok(Selection { terms })
    }

    fn attr(c: &Case, key: &str) -> String {
        match key {
            "group" => c.group.name().to_string(),
            "encoding" => c.encoding.clone(),
            "mask" => c.mask().to_string(),
            "kv" => c.kv_sharing().to_string(),
            "head_dim" => c.spec.head_dim.to_string(),
            "dtype" => c.spec.dtypes.name(),
            _ => c.name.clone(),
        }
    }

    /// Whether case `c` has every selected attribute.
    pub fn matches(&self, c: &Case) -> bool {
        self.terms.iter().all(|(k, v)| Self::attr(c, k) == *v)
    }
}

/// Checks `case` names are unique (a replayed failure must find its case).
pub fn assert_unique_names(cases: &[Case]) -> Result<()> {
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    for w in names.windows(2) {
        if w[0] == w[1] {
            return Err(Error::invalid("case name", "unique names", w[0]));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN in the reference where the case plants none fails the case (a NaN reference checks
    /// nothing); no case of the matrix may have one, or it could never pass.
    #[test]
    fn references_are_nan_free_unless_planted() {
        let cases = conformance_cases();
        assert!(!cases.is_empty());
        for c in cases.iter().filter(|c| c.nan == NanPlant::None) {
            let (q, k, v, pq, pk) = c.stored_inputs();
            let b = c.bias();
            let r =
                reference::attention_with_bias::<f64>(&c.spec, &q, &k, &v, &pq, &pk, b.as_deref());
            assert!(!r.iter().any(|x| x.is_nan()), "{}", c.name);
        }
    }

    #[test]
    fn every_matrix_case_is_tagged() {
        let cases = conformance_cases();
        assert_unique_names(&cases).unwrap();
        for c in &cases {
            assert_ne!(c.group, Group::Other, "{}", c.name);
        }
        for g in Group::ALL.into_iter().filter(|g| *g != Group::Other) {
            assert!(cases.iter().any(|c| c.group == g), "no case in {g:?}");
        }
    }

    #[test]
    fn quick_covers_every_encoding_and_relative_bias() {
        let quick = quick_cases();
        for (name, _) in encodings(4) {
            assert!(quick.iter().any(|c| c.encoding == name), "{name}");
        }
        let all = conformance_cases();
        for c in all.iter().filter(|c| c.group == Group::RelativeBias) {
            assert!(
                quick.iter().any(|q| q.encoding == c.encoding),
                "{}",
                c.encoding
            );
        }
        assert!(quick.iter().any(|c| c.group == Group::Combination));
        assert!(quick.len() < all.len());
    }

    #[test]
    fn selections_match_attributes_and_reject_unknowns() {
        let sel = Selection::parse("group=relative_bias, mask=causal").unwrap();
        let got: Vec<Case> = conformance_cases()
            .into_iter()
            .filter(|c| sel.matches(c))
            .collect();
        assert!(!got.is_empty());
        assert!(
            got.iter()
                .all(|c| c.group == Group::RelativeBias && c.spec.causal)
        );
        for bad in [
            "rope",
            "colour=red",
            "group=nope",
            "head_dim=65",
            "",
            "name=nope",
        ] {
            let e = Selection::parse(bad).unwrap_err();
            assert_eq!(e.field(), Some("filter"), "{bad}");
        }
    }
}
