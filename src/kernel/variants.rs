//! Kernel variants: an explicit, enumerable key per compiled pipeline, with the rules that pick
//! the compile-time sizes (rows per invocation, keys per tile) for a head size and an adapter.

use super::abi::{Binding, Family, LSE_BINDING, PosKind};
use super::source::{self, ComposeError};
use super::storage::{StorageForm, family_tensors};

/// Query rows per workgroup of the fused kernel (one per invocation).
pub const BLOCK_Q: u32 = 64;
/// Query rows per workgroup of the fused row form on CPU adapters
/// ([`crate::Context::block_q`], [`KernelKey::with_block_q`]).
pub const CPU_BLOCK_Q: u32 = 128;
/// Query rows per workgroup of the fused row form on Vulkan CPU adapters for long rows: from
/// [`CPU_LONG_KEYS`] visible keys per query row on average ([`crate::Context::block_q`]).
pub const CPU_LONG_BLOCK_Q: u32 = 256;
/// Mean visible keys per query row from which Vulkan CPU adapters take [`CPU_LONG_BLOCK_Q`].
pub const CPU_LONG_KEYS: u64 = 1024;
/// Query rows per workgroup a caller may ask for ([`crate::Context::set_block_q`]).
pub const BLOCK_Q_CHOICES: &[u32] = &[64, 128, 256];
/// Query rows per invocation the fused kernel can be built with.
pub const ROWS_CHOICES: &[u32] = &[1, 2, 4, 8];

/// Whether an adapter runs several query rows per invocation: CPU adapters do, lavapipe and
/// llvmpipe's GL alike (each K/V read from workgroup memory is a lane-by-lane gather there, so it
/// should feed several rows: on GL, head size 64, 8 rows ran at 8.1 GFLOP/s at seq 512 against
/// 3.1 for one row); GPUs do not (registers are the limit there).
pub fn multi_row_device(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

/// The largest head size at which llvmpipe's GL path runs several rows per invocation. Its
/// compile time grows faster with the rows than lavapipe's: at head size 128, 4 rows took 24 s
/// to compile against 5.5 s for one (lavapipe: 11 s at 4 rows), and at 160, 2 rows 17.5 s
/// against 8.2. A cold `check` of the whole matrix with every head size multi-row was on course
/// for about 7.5 minutes on GL; with this cap it stays under 6. `posattn tune` measures the
/// other sizes per adapter.
pub const GL_MULTI_ROW_MAX_HEAD_DIM: u32 = 64;

/// Rows per invocation on llvmpipe's GL path: [`multi_rows_for`] up to
/// [`GL_MULTI_ROW_MAX_HEAD_DIM`], one above.
pub fn gl_rows_for(head_dim: u32) -> u32 {
    if head_dim <= GL_MULTI_ROW_MAX_HEAD_DIM {
        multi_rows_for(head_dim)
    } else {
        1
    }
}

/// The rows per invocation an adapter gets at `head_dim` when nothing is tuned or overridden:
/// one on GPUs, [`gl_rows_for`] on a CPU adapter's GL backend, [`multi_rows_for`] on the other
/// CPU adapters.
pub fn default_rows(info: &wgpu::AdapterInfo, head_dim: u32) -> u32 {
    if !multi_row_device(info) {
        1
    } else if info.backend == wgpu::Backend::Gl {
        gl_rows_for(head_dim)
    } else {
        multi_rows_for(head_dim)
    }
}

/// Rows per invocation on a multi-row adapter: the most (up to 8) whose queries and accumulators
/// stay within 2 × 1024 floats per invocation up to head_dim 128 (8 rows there) and within
/// 2 × 512 above (2 rows at 160–256). More rows feed each workgroup-memory read to more rows,
/// but llvmpipe's compile time grows with them. Measured on lavapipe (`posattn tune`, seq 1024,
/// causal RoPE): 8 rows ran 1.28× faster than 4 at head_dim 128 for 2.4× the compile (27.6 s
/// against 11.3), and 4 rows 1.37× faster than 2 at 256 for 2.4× (50 s against 20.8); the cold
/// `check` of the whole matrix took 411 s with 4 rows above 128, against the 6 minutes it must
/// stay under, so those sizes keep 2 rows by default and `posattn tune` finds 4 per adapter.
pub fn multi_rows_for(head_dim: u32) -> u32 {
    let floats = if head_dim <= 128 { 1024 } else { 512 };
    let mut rows = 8;
    while rows > 1 && rows * head_dim > floats {
        rows /= 2;
    }
    rows
}

/// Rows per invocation of the two-branch variant given the one-branch count: half (it holds two
/// rotated copies of each query row).
pub fn two_branch_rows(rows: u32) -> u32 {
    (rows / 2).max(1)
}

/// Workgroup memory the fused kernel may use: WebGPU's default limit.
pub const WORKGROUP_BYTES: u32 = 16384;

/// Keys per tile for a head size: the largest power of two ≤ 64 whose K and V tiles (and the
/// second K tile of a two-branch kernel) fit in WebGPU's default 16 KiB of workgroup memory.
pub fn block_k_for(head_dim: u32, two_branch: bool) -> u32 {
    block_k_fitting(head_dim, if two_branch { 3 } else { 2 }, 0)
}

/// Keys per tile: the largest power of two ≤ 64 whose `tiles` tiles of keys and values fit in
/// WebGPU's default 16 KiB of workgroup memory beside `extra_bytes` (the lane-split form's
/// workgroup-memory reduction, [`lane_red_bytes`]).
pub fn block_k_fitting(head_dim: u32, tiles: u32, extra_bytes: u32) -> u32 {
    let mut bk = 64;
    while bk > 4 && tiles * bk * head_dim * 4 + extra_bytes > WORKGROUP_BYTES {
        bk /= 2;
    }
    bk
}

/// Lanes per query row the fused kernel can be built with (1: the ordinary form).
pub const ROW_LANES_CHOICES: &[u32] = &[1, 2, 4, 8];

/// Elements (vec4) of the fused kernel's workgroup-memory lane reduction: four partial scores
/// per row of every invocation where the lanes of a row sum through workgroup memory, else 1.
pub fn lane_red_len(key: &KernelKey) -> u32 {
    if key.stage == Stage::Fused && key.lanes > 1 && key.lane_reduce == LaneReduce::Workgroup {
        key.rows.max(1) * key.invocations()
    } else {
        1
    }
}

/// Bytes of the fused kernel's workgroup-memory lane reduction (0 in the other forms).
pub fn lane_red_bytes(key: &KernelKey) -> u32 {
    if lane_red_len(key) > 1 {
        16 * lane_red_len(key)
    } else {
        0
    }
}

/// Workgroup bytes of a fused variant.
pub fn workgroup_bytes(key: &KernelKey) -> u32 {
    if key.scores != ScoreTile::Rows {
        let (q, k, _, s) = score_tile_lens(key);
        // V in f32; Q and K in f16 (coop) or f32 holding f16 values (emulated); the scores.
        let half = if key.scores.coop() { 2 } else { 4 };
        if key.scores.pv() {
            // V and P tiles as half operands, a PV_CH-channel slice of the output tile in f32,
            // the non-finite-V flags.
            let (p, v, o) = pv_tile_lens(key);
            return (q + k + p + v) * half + (s + o) * 4 + 16 + 4;
        }
        return key.block_k * key.head_dim * 4 + (q + k) * half + s * 4 + 16;
    }
    // K tiles in f32; the V tile in f32, or f16 with f16 accumulation.
    let k_tiles = if key.two_branch { 2 } else { 1 };
    let v_bytes = if key.half_acc { 2 } else { 4 };
    // Queries in workgroup memory: every row of the block.
    let q_bytes = if key.q_shared {
        key.block_q * key.head_dim * 4
    } else {
        0
    };
    (k_tiles * 4 + v_bytes) * key.block_k * key.head_dim + lane_red_bytes(key) + q_bytes
}

/// Element counts of the score-tile forms' workgroup arrays: the Q tile, the K tile, `k_tile`
/// (one vec4: unused there) and the score tile; 1 each where the form has none.
pub fn score_tile_lens(key: &KernelKey) -> (u32, u32, u32, u32) {
    if key.scores == ScoreTile::Rows || key.stage != Stage::Fused {
        return (
            1,
            1,
            key.k_tiles() * key.block_k.max(1) * key.head_dim / 4,
            1,
        );
    }
    (
        key.block_q * key.head_dim,
        key.block_k * key.head_dim,
        1,
        key.block_q * key.s_stride(),
    )
}

/// Elements of padding after each row of the score-tile forms' row-major tiles that invocations
/// read a row each of (the scores, the softmax weights, the output slice): rows of 16 or 32
/// floats start in the same bank of a GPU's workgroup memory, so 32 invocations reading their
/// own rows at once would be served one at a time. The cooperative forms pad by 16 bytes (the
/// alignment a fragment's rows keep); the emulated forms by one element, which keeps them
/// within a CPU adapter's 32 KiB and still exercises a stride unequal to the row.
fn tile_pad(scores: ScoreTile, elem_bytes: u32) -> u32 {
    if scores.coop() { 16 / elem_bytes } else { 1 }
}

/// Output channels one round of the P·V tile product forms (`PV_CH`): the output tile is
/// formed a slice of this many channels at a time through workgroup memory, so that it never
/// needs `BLOCK_Q × HEAD_DIM` floats of it (32 KiB at head size 128).
pub const PV_CH: u32 = 32;

/// Output channels per round of the P·V tile product of `scores` at `head_dim`: the largest of
/// [`PV_CH`], 16, 8 and 4 that divides it; at most 8 in the emulated form, whose f32 operand
/// tiles must leave room in a CPU adapter's 32 KiB (head size 64: 30 KiB in all).
pub fn pv_ch_for(scores: ScoreTile, head_dim: u32) -> u32 {
    let most = if scores.coop() { PV_CH } else { 8 };
    [PV_CH, 16, 8, 4]
        .into_iter()
        .find(|c| *c <= most && head_dim.is_multiple_of(*c))
        .unwrap_or(4)
}

/// Element counts of the P·V tile product forms' workgroup arrays: the P tile, the V tile and
/// the output slice (no P tile in the emulated form, which keeps it in the score tile); 1 each
/// in every other form.
pub fn pv_tile_lens(key: &KernelKey) -> (u32, u32, u32) {
    if !key.scores.pv() || key.stage != Stage::Fused {
        return (1, 1, 1);
    }
    // The emulated form keeps its P tile in the score tile.
    let p = if key.scores.coop() {
        key.block_q * key.p_stride()
    } else {
        0
    };
    (p, key.block_k * key.head_dim, key.block_q * key.op_stride())
}

/// Packed half storage listed among the default variants: all packed f16, all bf16, and a mix
/// (bf16 Q and V, packed f16 K and O) that runs both unpackings and the f16 store in one kernel.
pub const PORTABLE_STORAGE_EXAMPLES: [[StorageForm; 4]; 3] = {
    use StorageForm::{Bf16, F16Packed};
    [
        [F16Packed; 4],
        [Bf16; 4],
        [Bf16, F16Packed, Bf16, F16Packed],
    ]
};

/// Which kernel of which family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The fused attention kernel.
    Fused,
    /// Unfused baseline: RoPE written to memory.
    RopeApply,
    /// Unfused baseline: the score matrix.
    Scores,
    /// Unfused baseline: row softmax.
    Softmax,
    /// Unfused baseline: P·V.
    Pv,
    /// The decode kernel: few query rows per sequence against a KV cache.
    Decode,
    /// The decode kernel's split-KV reduce (merges partial outputs by their log-sum-exp).
    DecodeReduce,
}

/// Invocations per decode workgroup.
pub const DECODE_WG: u32 = 64;
/// The most query rows (query heads × new queries of one KV group) a decode workgroup serves.
pub const DECODE_MAX_ROWS: u32 = 8;
/// Lanes per key of the decode kernel where the adapter's subgroups do not decide it.
pub const DECODE_MAX_LANES: u32 = 8;
/// Lanes per key a decode plan can be asked for ([`crate::Context::set_decode_lanes`], a
/// stored `posattn tune` choice). Each lane holds at least one unit of 8 channels, so a head
/// size takes at most `head_dim / 8` of them ([`decode_lanes_at_most`]).
pub const DECODE_LANES_CHOICES: &[u32] = &[1, 2, 4, 8, 16];
/// Keys each key group of the decode kernel folds in per step
/// ([`crate::Context::set_decode_keys_per_step`], [`KernelKey::with_keys_per_step`]): 1 (the
/// default: one softmax update per key), 2 or 4 (their dot products first, one update for all,
/// the accumulators rescaled once, then their values; the field's decode kernels, llama.cpp's
/// and FlashInfer's, take a block of keys a step).
pub const DECODE_KEYS_PER_STEP_CHOICES: &[u32] = &[1, 2, 4];

/// How the lanes that share a key sum their partial dot products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LaneReduce {
    /// Through workgroup memory, two barriers per key step (every adapter: GL, browsers
    /// without the `subgroups` feature).
    #[default]
    Workgroup,
    /// `subgroupShuffleXor` butterflies over the key's lanes: right for any power-of-two
    /// subgroup size at least the lanes per key.
    Shuffle,
    /// `subgroupAdd`: the subgroup is exactly the key's lanes (the adapter's subgroup size is
    /// fixed and equal to them).
    Add,
}

impl LaneReduce {
    /// Whether the module uses subgroup operations (the device needs `Features::SUBGROUP`).
    pub fn subgroups(self) -> bool {
        self != LaneReduce::Workgroup
    }

    fn suffix(self) -> &'static str {
        match self {
            LaneReduce::Workgroup => "wg",
            LaneReduce::Shuffle => "sx",
            LaneReduce::Add => "sa",
        }
    }
}

/// How the decode kernel rotates keys as it reads them: a variant constant, since a software
/// driver runs both sides of a branch and the general form is several times the pair form's
/// work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyRotation {
    /// No rotation: the encoding does not rotate, or the keys are stored rotated.
    #[default]
    None,
    /// Full-width RoPE (or xPos) in the half layout with the lanes per key dividing half the
    /// units: each lane holds both channels of the pairs it rotates, frequencies read once.
    Pairs,
    /// Any layout (interleaved, partial rotary width, a custom rotation): each vec4's partner
    /// is read from the cache as well.
    General,
}

impl KeyRotation {
    /// The form for an encoding that rotates (`rotates`), with its layout.
    pub fn choose(
        rotates: bool,
        custom: bool,
        keys_rotated: bool,
        interleaved: bool,
        rotary_dim: u32,
        head_dim: u32,
        lanes: u32,
    ) -> Self {
        if !rotates || keys_rotated {
            KeyRotation::None
        } else if !custom
            && !interleaved
            && rotary_dim == head_dim
            && (head_dim / 16).is_multiple_of(lanes.max(1))
        {
            KeyRotation::Pairs
        } else {
            KeyRotation::General
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            KeyRotation::None => "_kn",
            KeyRotation::Pairs => "",
            KeyRotation::General => "_kg",
        }
    }
}

/// How the fused kernel forms a tile's scores (Q·Kᵀ): a variant constant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScoreTile {
    /// Each invocation's own query rows against the staged K tile, f32 dot products (every
    /// adapter; the default).
    #[default]
    Rows,
    /// The workgroup's whole BLOCK_Q × BLOCK_K score tile as one product of Q and K rounded to
    /// f16 with f32 accumulation, written to workgroup memory, in plain WGSL loops: the
    /// arithmetic of the cooperative-matrix forms on any adapter, which is how their kernel
    /// (staging, the score tile, the softmax and P·V that read it) is checked where no adapter
    /// has the hardware.
    Emulated,
    /// The same product on 8×8×8 cooperative matrices (f16 operands, f32 accumulator: Metal's
    /// simdgroup matrices). The device needs `EXPERIMENTAL_COOPERATIVE_MATRIX`, `SHADER_F16`
    /// and `SUBGROUP`.
    Coop8,
    /// The same product on 16×16×16 cooperative matrices (f16 operands, f32 accumulator:
    /// NVIDIA's and AMD's Vulkan drivers).
    Coop16,
    /// [`ScoreTile::Emulated`] with P·V formed the same way: each key tile's softmax weights
    /// (rounded to f16) times its V tile (rounded to f16), f32 accumulation, in plain WGSL
    /// loops. The checking path of [`ScoreTile::Coop8Pv`] and [`ScoreTile::Coop16Pv`].
    EmulatedPv,
    /// [`ScoreTile::Coop8`] with P·V on 8×8×8 cooperative matrices too.
    Coop8Pv,
    /// [`ScoreTile::Coop16`] with P·V on 16×16×16 cooperative matrices too.
    Coop16Pv,
}

impl ScoreTile {
    /// Whether the scores come from f16-rounded operands (every form but `Rows`).
    pub fn half_operands(self) -> bool {
        self != ScoreTile::Rows
    }

    /// Whether the module uses cooperative matrices.
    pub fn coop(self) -> bool {
        matches!(
            self,
            ScoreTile::Coop8 | ScoreTile::Coop16 | ScoreTile::Coop8Pv | ScoreTile::Coop16Pv
        )
    }

    /// Whether P·V is formed as a tile product too (the `*Pv` forms): the WGSL constant
    /// `PV_MMA`.
    pub fn pv(self) -> bool {
        matches!(
            self,
            ScoreTile::EmulatedPv | ScoreTile::Coop8Pv | ScoreTile::Coop16Pv
        )
    }

    /// This form with P·V formed as a tile product too (`Rows` stays `Rows`).
    pub fn with_pv(self) -> ScoreTile {
        match self {
            ScoreTile::Emulated => ScoreTile::EmulatedPv,
            ScoreTile::Coop8 => ScoreTile::Coop8Pv,
            ScoreTile::Coop16 => ScoreTile::Coop16Pv,
            other => other,
        }
    }

    /// This form with only the score product as a tile product.
    pub fn without_pv(self) -> ScoreTile {
        match self {
            ScoreTile::EmulatedPv => ScoreTile::Emulated,
            ScoreTile::Coop8Pv => ScoreTile::Coop8,
            ScoreTile::Coop16Pv => ScoreTile::Coop16,
            other => other,
        }
    }

    /// The fragment size (the tile product's granularity): 8 or 16, 4 for the emulated form.
    pub fn fragment(self) -> u32 {
        match self.without_pv() {
            ScoreTile::Coop8 => 8,
            ScoreTile::Coop16 => 16,
            _ => 4,
        }
    }

    /// The WGSL constant `MMA`: 0 rows, 1 emulated, else the fragment size.
    fn code(self) -> u32 {
        match self.without_pv() {
            ScoreTile::Rows => 0,
            ScoreTile::Emulated => 1,
            t => t.fragment(),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            ScoreTile::Rows => "",
            ScoreTile::Emulated => "_tile",
            ScoreTile::Coop8 => "_cm8",
            ScoreTile::Coop16 => "_cm16",
            ScoreTile::EmulatedPv => "_tilepv",
            ScoreTile::Coop8Pv => "_cm8pv",
            ScoreTile::Coop16Pv => "_cm16pv",
        }
    }

    /// The cooperative-matrix form an adapter offers for the score tile: 16×16×16 f16 × f16 →
    /// f32 where listed, else 8×8×8; `None` without the feature or either configuration.
    pub fn coop_for(
        features: wgpu::Features,
        props: &[wgpu::CooperativeMatrixProperties],
    ) -> Option<ScoreTile> {
        let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP;
        if !features.contains(needed) {
            return None;
        }
        let has = |n: u32| {
            props.iter().any(|p| {
                p.m_size == n
                    && p.n_size == n
                    && p.k_size == n
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            })
        };
        if has(16) {
            Some(ScoreTile::Coop16)
        } else if has(8) {
            Some(ScoreTile::Coop8)
        } else {
            None
        }
    }
}

/// Keys per tile of the score-tile forms: 16 (one 16×16 fragment column; the staged f16 Q
/// tile takes the workgroup memory that larger K tiles would).
pub const TILE_BLOCK_K: u32 = 16;

/// Query rows a decode workgroup is built for, given the rows of one KV group (query heads per
/// KV head × most new queries): the smallest power of two that holds them, at most
/// [`DECODE_MAX_ROWS`] (more rows are cut into row blocks). Llama-3's GQA (4 heads per KV
/// head, one new query) gets 4, so no FMA is spent on rows that do not exist.
pub fn decode_rows(group_rows: u32) -> u32 {
    group_rows.clamp(1, DECODE_MAX_ROWS).next_power_of_two()
}

/// Lanes that share one key (each holds a slice of its channels, 8 channels a unit): the
/// largest power of two at most `max_lanes` that divides half the units, so that a lane holds
/// both halves of each RoPE pair it rotates (at least 1).
pub fn decode_lanes(head_dim: u32, max_lanes: u32) -> u32 {
    let half_units = head_dim / 16;
    let mut lanes = max_lanes.clamp(1, DECODE_MAX_LANES).next_power_of_two();
    if lanes > max_lanes.max(1) {
        lanes /= 2;
    }
    while lanes > 1 && !half_units.is_multiple_of(lanes) {
        lanes /= 2;
    }
    lanes
}

/// Most lanes per key on a CPU adapter (see [`decode_lane_plan`]).
pub const DECODE_CPU_MAX_LANES: u32 = 4;

/// Lanes per key for an asked count `wish` at `head_dim`: the largest power of two at most
/// `wish` and at most the head's units of 8 channels (at least 1). Unlike the rule's
/// [`decode_lanes`] it may leave RoPE pairs split across lanes; the plan then reads the
/// partners from the cache ([`KeyRotation::General`]).
pub fn decode_lanes_at_most(head_dim: u32, wish: u32) -> u32 {
    let cap = wish.min(head_dim / 8).max(1);
    1 << (31 - cap.leading_zeros())
}

/// How `lanes` per key sum their partial dot products on a device: `subgroupAdd` where a GPU's
/// subgroup size is fixed and equal to them, butterflies where its smallest subgroup holds
/// them (always on a CPU adapter, see [`decode_lane_plan`]), else workgroup memory (no
/// subgroups, sizes not reported, or more lanes than the smallest subgroup).
pub fn decode_lane_reduce(lanes: u32, subgroups: bool, info: &wgpu::AdapterInfo) -> LaneReduce {
    let min = info.subgroup_min_size;
    if lanes <= 1 || !subgroups || min == 0 || lanes > min {
        LaneReduce::Workgroup
    } else if info.device_type != wgpu::DeviceType::Cpu
        && min == info.subgroup_max_size
        && min == lanes
    {
        LaneReduce::Add
    } else {
        LaneReduce::Shuffle
    }
}

/// The lanes per key and lane reduction for an adapter: subgroup lanes where the device has
/// `Features::SUBGROUP`, no more than its smallest subgroup (read from the adapter, never
/// assumed), with `subgroupAdd` when its subgroup size is fixed and equal to them; otherwise
/// [`DECODE_MAX_LANES`] lanes reduced through workgroup memory.
///
/// A CPU adapter (lavapipe) takes butterflies over at most [`DECODE_CPU_MAX_LANES`] lanes
/// instead. Its subgroup operations are loops over the lanes, and LLVM moves the arithmetic that
/// feeds a `subgroupAdd` into that loop, one lane at a time: the partial dot products then run
/// in scalar code. Butterflies keep them in vector code: Llama-3-8B decode at cache 8192 ran
/// 1.3× faster (BENCHMARKS.md), and 4 lanes a key a little faster than 8.
///
/// `wish` (a forced or tuned count, one of [`DECODE_LANES_CHOICES`]) replaces the rule's count,
/// through [`decode_lanes_at_most`]; the reduction follows [`decode_lane_reduce`] either way.
pub fn decode_lane_plan(
    head_dim: u32,
    subgroups: bool,
    info: &wgpu::AdapterInfo,
    wish: Option<u32>,
) -> (u32, LaneReduce) {
    let lanes = match wish {
        Some(w) => decode_lanes_at_most(head_dim, w),
        None if !subgroups || info.subgroup_min_size == 0 => {
            decode_lanes(head_dim, DECODE_MAX_LANES)
        }
        None if info.device_type == wgpu::DeviceType::Cpu => {
            decode_lanes(head_dim, info.subgroup_min_size.min(DECODE_CPU_MAX_LANES))
        }
        None => decode_lanes(head_dim, info.subgroup_min_size.min(DECODE_MAX_LANES)),
    };
    (lanes, decode_lane_reduce(lanes, subgroups, info))
}

/// Units of 8 channels each lane of a key holds.
pub fn decode_units(head_dim: u32, lanes: u32) -> u32 {
    (head_dim / 8).div_ceil(lanes.max(1))
}

/// Workgroup bytes of a decode variant: the merge of the key groups' accumulators (one row
/// block's output), their maxima, sums and NaN flags, the lengths, and every lane's partial dot
/// product of every row (the workgroup-memory reduction; declared in every form).
pub fn decode_workgroup_bytes(key: &KernelKey) -> u32 {
    let r = key.rows.max(1);
    4 * (r * key.head_dim + 3 * r + 2 + DECODE_WG * r)
}

/// One compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// Which kernel.
    pub stage: Stage,
    /// Head size.
    pub head_dim: u32,
    /// Query rows per workgroup.
    pub block_q: u32,
    /// Keys per tile.
    pub block_k: u32,
    /// Query rows per invocation of the fused kernel.
    pub rows: u32,
    /// The encoding's kernel kind.
    pub pos: PosKind,
    /// Two RoPE scores per key (ReRoPE, LM-Infinite, StreamingLLM cache-index positions).
    pub two_branch: bool,
    /// How the fused kernel stores Q, K, V and O (f32 in the unfused baseline).
    pub storage: [StorageForm; 4],
    /// The fused kernel also writes each row's log-sum-exp (binding `lse_buf`).
    pub lse: bool,
    /// A custom scheme's id (`CheckedScheme::id`, a hash of its composed hooks), 0 for none.
    /// Its WGSL comes with it: [`KernelKey::try_wgsl_with`].
    pub custom: u64,
    /// Decode: lanes that share one key. Fused: lanes that share one query row, splitting its
    /// head dimension (0 or 1: one invocation per row slot). 0 in other families.
    pub lanes: u32,
    /// Decode and the fused lane-split form: how those lanes sum their partial dot products.
    pub lane_reduce: LaneReduce,
    /// Decode: how keys are rotated as they are read (0 in other families).
    pub key_rot: KeyRotation,
    /// Decode: read one word of each cache line of the next keys' K and V rows ahead of their
    /// use, so that a CPU adapter's cache misses overlap (see [`crate::DecodeSpec::read_ahead`]).
    pub read_ahead: bool,
    /// Fused: how a tile's scores are formed ([`ScoreTile::Rows`] elsewhere).
    pub scores: ScoreTile,
    /// Decode: adds the caller's bias (binding `user_bias`); the fused kernel always binds it.
    pub bias: bool,
    /// Fused row form: the invocations of a subgroup of exactly this many read each key group's
    /// K and V vec4s from the tile once between them and hand them round with
    /// `subgroupBroadcast` (0: each invocation reads every vec4 itself). For CPU adapters, whose
    /// workgroup-memory reads are loops over the lanes ([`KernelKey::with_tile_share`]).
    pub tile_share: u32,
    /// Fused row form and decode: P·V in f16 arithmetic ([`KernelKey::with_half_acc`]): the
    /// softmax weights, V (the fused kernel's staged tile) and the output accumulators are f16
    /// (the module enables f16).
    pub half_acc: bool,
    /// Fused row form: each invocation keeps its rows' queries in workgroup memory instead of
    /// registers ([`KernelKey::with_q_shared`]).
    pub q_shared: bool,
    /// Decode: keys each key group folds in per step ([`KernelKey::with_keys_per_step`]; 1 in
    /// other families).
    pub keys_per_step: u32,
}

impl KernelKey {
    /// The fused kernel at `head_dim`, `rows` query rows per invocation, for encoding kind `pos`.
    pub fn fused(head_dim: u32, rows: u32, pos: PosKind) -> Self {
        KernelKey {
            stage: Stage::Fused,
            head_dim,
            block_q: BLOCK_Q,
            block_k: block_k_for(head_dim, false),
            rows,
            pos,
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
            custom: 0,
            lanes: 0,
            lane_reduce: LaneReduce::Workgroup,
            key_rot: KeyRotation::None,
            read_ahead: false,
            scores: ScoreTile::Rows,
            bias: false,
            tile_share: 0,
            half_acc: false,
            q_shared: false,
            keys_per_step: 1,
        }
    }

    /// The variant of a custom scheme whose checked hooks have id `custom`.
    pub fn fused_custom(head_dim: u32, rows: u32, custom: u64) -> Self {
        KernelKey {
            custom,
            ..KernelKey::fused(head_dim, rows, PosKind::Custom)
        }
    }

    /// This key with Q, K, V and O stored as `storage` says.
    pub fn with_storage(self, storage: [StorageForm; 4]) -> Self {
        KernelKey { storage, ..self }
    }

    /// This key writing the log-sum-exp too.
    pub fn with_lse(self) -> Self {
        KernelKey { lse: true, ..self }
    }

    /// This fused key with `block_q` query rows per workgroup (instead of [`BLOCK_Q`]) where
    /// the form applies: the row form ([`ScoreTile::Rows`]; the score tiles keep their fragment
    /// shapes), with `block_q` a multiple of the rows per invocation and of the keys per tile,
    /// and at most 256 invocations. Every workgroup stages each key tile once for all of its
    /// rows, so larger blocks read K and V fewer times in all; a causal workgroup also walks
    /// keys up to its last row, about `block_q / 2` masked keys per row.
    pub fn with_block_q(self, block_q: u32) -> Self {
        let rows = self.rows.max(1);
        let applies = self.stage == Stage::Fused
            && self.scores == ScoreTile::Rows
            && block_q > 0
            && block_q.is_multiple_of(rows)
            && block_q.is_multiple_of(self.block_k.max(1))
            && block_q / rows * self.row_lanes() <= 256;
        if !applies {
            return self;
        }
        KernelKey { block_q, ..self }
    }

    /// This fused key with its tile reads shared across subgroups of exactly `subgroup`
    /// invocations (see [`KernelKey::tile_share`]) where the form applies: the row form
    /// ([`ScoreTile::Rows`]) of a one-branch kernel with one lane per row, whose workgroup is a
    /// whole number of such subgroups and whose head size is a multiple of the subgroup size.
    /// 0 (or 1) turns it off. The kernel then needs `Features::SUBGROUP`.
    pub fn with_tile_share(self, subgroup: u32) -> Self {
        let applies = self.stage == Stage::Fused
            && subgroup >= 2
            && subgroup.is_power_of_two()
            && !self.two_branch
            && !self.half_acc
            && !self.q_shared
            && self.scores == ScoreTile::Rows
            && self.row_lanes() == 1
            && self.invocations().is_multiple_of(subgroup)
            && self.head_dim.is_multiple_of(subgroup);
        KernelKey {
            tile_share: if applies { subgroup } else { 0 },
            ..self
        }
    }

    /// This fused key in the lane-split form: `lanes` invocations per row slot, each holding
    /// `head_dim / lanes` channels of its rows, their partial scores summed as `reduce` says,
    /// where the form applies; else the key unchanged. It applies to the row form
    /// ([`ScoreTile::Rows`]) of one-branch kernels, with `lanes` (rounded down to a power of
    /// two, at most 8) halved until it divides `head_dim / 4`; one lane is the ordinary form.
    /// Keys per tile shrink where the workgroup-memory reduction needs room.
    pub fn with_row_lanes(self, lanes: u32, reduce: LaneReduce) -> Self {
        if self.stage != Stage::Fused || self.two_branch || self.scores != ScoreTile::Rows {
            return self;
        }
        let mut l = 8;
        while l > 1 && (l > lanes || !(self.head_dim / 4).is_multiple_of(l)) {
            l /= 2;
        }
        if l <= 1 {
            return KernelKey {
                lanes: 0,
                lane_reduce: LaneReduce::Workgroup,
                block_k: block_k_for(self.head_dim, false),
                ..self
            };
        }
        // subgroupAdd sums a whole subgroup: right only for the lanes it was chosen for.
        let reduce = if l < lanes && reduce == LaneReduce::Add {
            LaneReduce::Shuffle
        } else {
            reduce
        };
        let key = KernelKey {
            lanes: l,
            lane_reduce: reduce,
            ..self
        };
        KernelKey {
            block_k: block_k_fitting(self.head_dim, 2, lane_red_bytes(&key)),
            ..key
        }
    }

    /// This fused or decode key with P·V in f16 arithmetic (`on`), or in f32, where the form
    /// applies: the fused row form ([`ScoreTile::Rows`], any rows and lanes per row, one or two
    /// branches) and every decode form (the split-KV reduce merges in f32); else the key
    /// unchanged. The softmax weights, the staged V tile and the output
    /// accumulators are then f16, as llama.cpp's f16-accumulating flash attention keeps them:
    /// half the accumulator registers and half the V tile, and twice the arithmetic rate
    /// where a GPU packs two halves per register. Scores, the running maximum and sum stay
    /// f32, and the running maximum carries a fixed offset of 3 (base-2 units) so that every
    /// weight is at most 1/8 and a row's sum of weights times V stays within f16's range. The
    /// module enables f16 (the device needs `SHADER_F16`); the shared tile reads
    /// ([`KernelKey::with_tile_share`], a CPU adapter's form) are turned off.
    pub fn with_half_acc(self, on: bool) -> Self {
        let applies = (self.stage == Stage::Fused && self.scores == ScoreTile::Rows)
            || self.stage == Stage::Decode;
        if !applies {
            return self;
        }
        KernelKey {
            half_acc: on,
            tile_share: if on { 0 } else { self.tile_share },
            ..self
        }
    }

    /// This fused key keeping each invocation's query rows in workgroup memory (`on`) instead
    /// of registers, where the form applies: the row form ([`ScoreTile::Rows`]) of one-branch
    /// kernels, any rows and lanes per row; else the key unchanged. The queries then cost no
    /// registers (a row of 128 channels is 128 of them, beside its accumulator), and every dot
    /// product reads its query vec4 from workgroup memory, laid out so that consecutive
    /// invocations read consecutive vec4s; llama.cpp's scalar flash attention keeps Q in shared
    /// memory the same way. The workgroup holds `block_q × head_dim` more floats, and the
    /// shared tile reads ([`KernelKey::with_tile_share`], a CPU adapter's form) are turned off.
    pub fn with_q_shared(self, on: bool) -> Self {
        if self.stage != Stage::Fused || self.scores != ScoreTile::Rows || self.two_branch {
            return self;
        }
        KernelKey {
            q_shared: on,
            tile_share: if on { 0 } else { self.tile_share },
            ..self
        }
    }

    /// Whether the module uses subgroup operations (lane sums or shared tile reads; the
    /// device needs `Features::SUBGROUP`); the cooperative-matrix forms ask for theirs apart.
    pub fn uses_subgroups(&self) -> bool {
        self.lane_reduce.subgroups() || self.tile_share > 0
    }

    /// Lanes per query row of the fused kernel (1 in the ordinary form).
    pub fn row_lanes(&self) -> u32 {
        if self.stage == Stage::Fused {
            self.lanes.max(1)
        } else {
            1
        }
    }

    /// Invocations per workgroup of the fused kernel: row slots (`block_q / rows`) times lanes.
    pub fn invocations(&self) -> u32 {
        self.block_q / self.rows.max(1) * self.row_lanes()
    }

    /// This fused key forming its scores as `scores` says. The score-tile forms use
    /// [`TILE_BLOCK_K`] keys per tile and one query row per invocation: the
    /// cooperative-matrix forms need whole subgroups (64 invocations), and the emulated form
    /// mirrors them. (With eight rows per invocation, Mesa 22.3's lavapipe computes the
    /// emulated form wrongly once a row sees more than seven key tiles, error 1.2e-2 on a
    /// 113-key case; Mesa 25.0.7's lavapipe computes the same variant right, 2.6e-5: a driver
    /// bug, which one row per invocation does not meet.)
    pub fn with_scores(self, scores: ScoreTile) -> Self {
        let (block_k, rows) = if scores == ScoreTile::Rows {
            (block_k_for(self.head_dim, self.two_branch), self.rows)
        } else {
            (TILE_BLOCK_K, 1)
        };
        // The score-tile forms have one lane per row slot.
        let (lanes, lane_reduce) = if scores == ScoreTile::Rows {
            (self.lanes, self.lane_reduce)
        } else {
            (0, LaneReduce::Workgroup)
        };
        KernelKey {
            scores,
            block_k,
            rows,
            lanes,
            lane_reduce,
            // f16 accumulation and queries in workgroup memory are forms of the row form.
            half_acc: self.half_acc && scores == ScoreTile::Rows,
            q_shared: self.q_shared && scores == ScoreTile::Rows,
            ..self
        }
    }

    /// Whether the module needs `enable f16;` (and the device `SHADER_F16`).
    pub fn native_f16(&self) -> bool {
        self.half_acc || self.storage.iter().any(|s| s.native_f16())
    }

    /// The bindings of this variant: the family's table with the tensors' storage types.
    pub fn bindings(&self) -> Vec<Binding> {
        let mut b = self.family().bindings().to_vec();
        if let Some(tensors) = family_tensors(self.family()) {
            for (form, (name, _, accessor)) in self.storage.iter().zip(tensors) {
                let slot = self.family().slot(name) as usize;
                b[slot].ty = form.binding_type(*accessor);
            }
        }
        if self.family() == Family::Fused && self.lse {
            b.push(LSE_BINDING);
        }
        if self.family() == Family::Decode && self.bias {
            b.push(super::abi::DECODE_BIAS_BINDING);
        }
        b
    }

    /// The two-branch RoPE variant.
    pub fn fused_two_branch(head_dim: u32, rows: u32) -> Self {
        KernelKey {
            block_k: block_k_for(head_dim, true),
            two_branch: true,
            ..KernelKey::fused(head_dim, rows, PosKind::Rope)
        }
    }

    /// A stage of the unfused baseline.
    pub fn unfused(stage: Stage, head_dim: u32, pos: PosKind) -> Self {
        KernelKey {
            stage,
            head_dim,
            block_q: 0,
            block_k: 0,
            rows: 1,
            pos,
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
            custom: 0,
            lanes: 0,
            lane_reduce: LaneReduce::Workgroup,
            key_rot: KeyRotation::None,
            read_ahead: false,
            scores: ScoreTile::Rows,
            bias: false,
            tile_share: 0,
            half_acc: false,
            q_shared: false,
            keys_per_step: 1,
        }
    }

    /// Every fused variant the crate builds by default (one row per invocation, and the
    /// multi-row count for the head size, in 64-row query blocks, and at head size 64 also in
    /// the CPU adapters' 128: [`CPU_BLOCK_Q`]; the block only sizes the workgroup, and
    /// lavapipe's forms with shared tile reads are in [`KernelKey::subgroup_examples`] at every
    /// head size).
    pub fn all_fused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        // Listed once each: at the largest head sizes the two-branch row counts coincide.
        let mut add = |k: KernelKey| {
            if !keys.contains(&k) {
                keys.push(k);
            }
        };
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for pos in PosKind::VARIANTS {
                add(KernelKey::fused(d, 1, pos));
                add(KernelKey::fused(d, multi_rows_for(d), pos));
                if d == 64 {
                    add(KernelKey::fused(d, multi_rows_for(d), pos).with_block_q(CPU_BLOCK_Q));
                }
                // Half storage in the packed forms every adapter runs (f16, bf16 and a mix),
                // on the RoPE kernel at head size 64; native f16 is listed by
                // `native_f16_examples` (it needs the SHADER_F16 capability).
                if pos == PosKind::Rope && d == 64 {
                    add(KernelKey::fused(d, 1, pos).with_lse());
                    add(KernelKey::fused(d, multi_rows_for(d), pos).with_lse());
                    for storage in PORTABLE_STORAGE_EXAMPLES {
                        add(KernelKey::fused(d, 1, pos).with_storage(storage));
                        add(KernelKey::fused(d, multi_rows_for(d), pos).with_storage(storage));
                    }
                }
                // The emulated score tile (the cooperative-matrix kernel's arithmetic in plain
                // WGSL) for every encoding kind at head size 64, with P·V as a tile product
                // too, and that form at every head size for RoPE (their P·V rounds differ).
                if d == 64 {
                    add(KernelKey::fused(d, 1, pos).with_scores(ScoreTile::Emulated));
                    add(KernelKey::fused(d, 1, pos).with_scores(ScoreTile::EmulatedPv));
                } else if pos == PosKind::Rope {
                    add(KernelKey::fused(d, 1, pos).with_scores(ScoreTile::EmulatedPv));
                }
                // The lane-split form in its portable reduction (workgroup memory): every
                // encoding kind at head size 64 and the RoPE kernel at every head size, 4 lanes
                // per row, one and two rows per invocation (subgroup forms:
                // `subgroup_examples`).
                if d == 64 || pos == PosKind::Rope {
                    for rows in [1, 2] {
                        add(KernelKey::fused(d, rows, pos).with_row_lanes(4, LaneReduce::Workgroup));
                    }
                }
                // Queries in workgroup memory (a GPU's form): the RoPE kernel at head sizes 64
                // and 128, one row per invocation and in the lane-split form, and several rows
                // at 64.
                if pos == PosKind::Rope && (d == 64 || d == 128) {
                    add(KernelKey::fused(d, 1, pos).with_q_shared(true));
                    add(KernelKey::fused(d, 2, pos)
                        .with_row_lanes(4, LaneReduce::Workgroup)
                        .with_q_shared(true));
                    if d == 64 {
                        add(KernelKey::fused(d, multi_rows_for(d), pos).with_q_shared(true));
                    }
                }
                if pos == PosKind::Rope {
                    add(KernelKey::fused_two_branch(d, 1));
                    let two = KernelKey::fused_two_branch(d, two_branch_rows(multi_rows_for(d)));
                    add(two);
                    if d == 64 {
                        add(two.with_block_q(CPU_BLOCK_Q));
                    }
                }
            }
        }
        keys
    }

    /// The decode kernel for a head size and encoding, in its portable form (lanes reduced
    /// through workgroup memory) for `rows` query rows per workgroup (a [`decode_rows`] bucket).
    pub fn decode(head_dim: u32, rows: u32, pos: PosKind) -> Self {
        KernelKey {
            stage: Stage::Decode,
            head_dim,
            block_q: 0,
            block_k: 0,
            rows,
            pos: pos.variant(),
            two_branch: false,
            storage: [StorageForm::F32; 4],
            lse: false,
            custom: 0,
            lanes: decode_lanes(head_dim, DECODE_MAX_LANES),
            lane_reduce: LaneReduce::Workgroup,
            key_rot: if pos.variant().rotates() {
                KeyRotation::Pairs
            } else {
                KeyRotation::None
            },
            read_ahead: false,
            scores: ScoreTile::Rows,
            bias: false,
            tile_share: 0,
            half_acc: false,
            q_shared: false,
            keys_per_step: 1,
        }
    }

    /// This decode key with a second RoPE branch per key (an extrapolation method), or not.
    pub fn with_two_branch(self, two_branch: bool) -> Self {
        KernelKey { two_branch, ..self }
    }

    /// This decode key adding the caller's bias, or not.
    pub fn with_bias(self, bias: bool) -> Self {
        KernelKey { bias, ..self }
    }

    /// This decode key reading the next keys' cache lines ahead, or not.
    pub fn with_read_ahead(self, read_ahead: bool) -> Self {
        KernelKey { read_ahead, ..self }
    }

    /// This decode key folding `keys` keys into each key group's softmax per step (one of
    /// [`DECODE_KEYS_PER_STEP_CHOICES`]; other counts, and other families, leave the key as it
    /// is).
    pub fn with_keys_per_step(self, keys: u32) -> Self {
        if self.stage != Stage::Decode || !DECODE_KEYS_PER_STEP_CHOICES.contains(&keys) {
            return self;
        }
        KernelKey {
            keys_per_step: keys,
            ..self
        }
    }

    /// This decode key rotating keys as `key_rot` says.
    pub fn with_key_rotation(self, key_rot: KeyRotation) -> Self {
        KernelKey { key_rot, ..self }
    }

    /// This decode key with `lanes` per key reduced as `reduce` says.
    pub fn with_lanes(self, lanes: u32, reduce: LaneReduce) -> Self {
        KernelKey {
            lanes,
            lane_reduce: reduce,
            ..self
        }
    }

    /// The split-KV reduce for a head size (the same for every encoding and shape).
    pub fn decode_reduce(head_dim: u32) -> Self {
        KernelKey {
            stage: Stage::DecodeReduce,
            rows: 1,
            ..KernelKey::decode(head_dim, 1, PosKind::None)
        }
    }

    /// Every decode variant listed by default: the portable form (workgroup-memory
    /// reduction) of every head size and encoding at 4 rows (Llama-3's GQA), the other row
    /// buckets on the RoPE kernel, the read-ahead form (CPU adapters) and the two-branch form
    /// (extrapolation methods) of the 4-row RoPE kernel, several keys a softmax step,
    /// and half storage in the packed forms every adapter runs on the RoPE kernel at head size
    /// 64, with and without read-ahead (native f16 needs the SHADER_F16 capability, subgroup
    /// forms the `subgroups` feature: [`KernelKey::native_f16_examples`],
    /// [`KernelKey::subgroup_examples`]).
    pub fn all_decode() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            keys.push(KernelKey::decode_reduce(d));
            for pos in PosKind::VARIANTS {
                keys.push(KernelKey::decode(d, 4, pos));
            }
            for rows in [1, 2, 8] {
                keys.push(KernelKey::decode(d, rows, PosKind::Rope));
            }
            // The read-ahead form CPU adapters run.
            keys.push(KernelKey::decode(d, 4, PosKind::Rope).with_read_ahead(true));
            // Two RoPE scores per key (ReRoPE, LM-Infinite, StreamingLLM's cache index).
            keys.push(KernelKey::decode(d, 4, PosKind::Rope).with_two_branch(true));
        }
        // More lanes than the rule takes (a forced or tuned count): 16 at head size 128, whose
        // RoPE pairs then span lanes, so partners are read from the cache.
        keys.push(
            KernelKey::decode(128, 4, PosKind::Rope)
                .with_lanes(16, LaneReduce::Workgroup)
                .with_key_rotation(KeyRotation::General),
        );
        // Several keys a softmax step: 4 on the 4-row RoPE kernel at head sizes 64 and 128, 2
        // with two RoPE scores per key and the caller's bias.
        for d in [64, 128] {
            keys.push(KernelKey::decode(d, 4, PosKind::Rope).with_keys_per_step(4));
        }
        keys.push(
            KernelKey::decode(64, 4, PosKind::Rope)
                .with_two_branch(true)
                .with_bias(true)
                .with_keys_per_step(2),
        );
        // The caller's bias (a ninth storage buffer), with its reduce.
        keys.push(KernelKey::decode(64, 4, PosKind::Rope).with_bias(true));
        keys.push(KernelKey::decode(64, 2, PosKind::Rope).with_bias(true));
        keys.push(KernelKey::decode_reduce(64).with_bias(true));
        for storage in PORTABLE_STORAGE_EXAMPLES {
            keys.push(KernelKey::decode(64, 8, PosKind::Rope).with_storage(storage));
            keys.push(
                KernelKey::decode(64, 8, PosKind::Rope)
                    .with_storage(storage)
                    .with_read_ahead(true),
            );
            keys.push(KernelKey::decode_reduce(64).with_storage(storage));
        }
        keys
    }

    /// Variants with subgroup reductions (the device needs `Features::SUBGROUP`): the fused
    /// kernel's lane-split forms (listed below), and the decode kernel's: the
    /// RoPE kernel at every head size with `subgroupAdd` over 8 lanes (lavapipe's fixed
    /// subgroup) or as few as the head size allows, butterflies over 4 lanes (any subgroup of
    /// 4 or more), and the half storage forms at head size 128, with and without read-ahead;
    /// and the fused kernel's shared tile reads ([`KernelKey::with_tile_share`]) in the CPU
    /// adapters' query blocks of 128 and, at head sizes 64 and 128, 256 rows.
    pub fn subgroup_examples() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            // Head sizes whose keys take one lane have nothing to sum.
            let lanes = decode_lanes(d, DECODE_MAX_LANES);
            if lanes > 1 {
                keys.push(
                    KernelKey::decode(d, 4, PosKind::Rope).with_lanes(lanes, LaneReduce::Add),
                );
                keys.push(
                    KernelKey::decode(d, 8, PosKind::Rope)
                        .with_lanes(decode_lanes(d, 4), LaneReduce::Shuffle),
                );
            }
        }
        // Four keys a step with each key's 8 lanes summed by butterflies (a GPU's form at
        // head size 128).
        keys.push(
            KernelKey::decode(128, 4, PosKind::Rope)
                .with_lanes(8, LaneReduce::Shuffle)
                .with_keys_per_step(4),
        );
        // Forced or tuned lanes beyond the rule's: butterflies over 16 lanes at head size 128
        // (a GPU's 32-lane subgroups) and over 8 at head size 64 (lavapipe's), both with the
        // partners read from the cache.
        for (d, lanes) in [(128, 16), (64, 8)] {
            keys.push(
                KernelKey::decode(d, 8, PosKind::Rope)
                    .with_lanes(lanes, LaneReduce::Shuffle)
                    .with_key_rotation(KeyRotation::General),
            );
        }
        // The fused kernel's lane-split form with subgroup reductions: butterflies over 4 lanes
        // (one and two rows) and subgroupAdd over 8 (two rows) on the RoPE kernel at every head
        // size, every encoding kind at head size 128 (4 lanes, one row), and half storage with
        // the log-sum-exp output at head size 64.
        let mut fused = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for rows in [1, 2] {
                fused.push(
                    KernelKey::fused(d, rows, PosKind::Rope).with_row_lanes(4, LaneReduce::Shuffle),
                );
            }
            fused.push(KernelKey::fused(d, 2, PosKind::Rope).with_row_lanes(8, LaneReduce::Add));
        }
        for pos in PosKind::VARIANTS {
            fused.push(KernelKey::fused(128, 1, pos).with_row_lanes(4, LaneReduce::Shuffle));
        }
        for storage in PORTABLE_STORAGE_EXAMPLES {
            fused.push(
                KernelKey::fused(64, 1, PosKind::Rope)
                    .with_storage(storage)
                    .with_lse()
                    .with_row_lanes(4, LaneReduce::Shuffle),
            );
        }
        // The shared tile reads over lavapipe's 8-lane subgroups, in the CPU adapters' query
        // blocks: the RoPE kernel at every head size at the CPU adapters' rows, every encoding
        // kind at head size 64, and the storage forms with the log-sum-exp output.
        let cpu = |k: KernelKey| k.with_block_q(CPU_BLOCK_Q).with_tile_share(8);
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            fused.push(cpu(KernelKey::fused(d, multi_rows_for(d), PosKind::Rope)));
        }
        for pos in PosKind::VARIANTS {
            fused.push(cpu(KernelKey::fused(64, 8, pos)));
        }
        for storage in PORTABLE_STORAGE_EXAMPLES {
            fused.push(cpu(KernelKey::fused(64, 8, PosKind::Rope)
                .with_storage(storage)
                .with_lse()));
        }
        // lavapipe's block for long rows, on the RoPE kernel at head sizes 64 and 128.
        for d in [64, 128] {
            fused.push(
                KernelKey::fused(d, multi_rows_for(d), PosKind::Rope)
                    .with_block_q(CPU_LONG_BLOCK_Q)
                    .with_tile_share(8),
            );
        }
        for k in fused {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        for storage in PORTABLE_STORAGE_EXAMPLES {
            for read_ahead in [false, true] {
                keys.push(
                    KernelKey::decode(128, 4, PosKind::Rope)
                        .with_lanes(8, LaneReduce::Add)
                        .with_storage(storage)
                        .with_read_ahead(read_ahead),
                );
            }
        }
        keys
    }

    /// Native-f16 storage variants of the RoPE kernels at head size 64 (all f16, and an f16 K/V
    /// cache with f32 queries and output): prefill at one and several rows per invocation, and
    /// decode with its reduce.
    pub fn native_f16_examples() -> Vec<KernelKey> {
        use StorageForm::{F16, F32};
        let mut keys = Vec::new();
        for storage in [[F16; 4], [F32, F16, F16, F32]] {
            for rows in [1, multi_rows_for(64)] {
                keys.push(KernelKey::fused(64, rows, PosKind::Rope).with_storage(storage));
            }
            keys.push(KernelKey::decode(64, 8, PosKind::Rope).with_storage(storage));
        }
        keys.push(KernelKey::decode_reduce(64).with_storage([F16; 4]));
        // P·V in f16 arithmetic (KernelKey::with_half_acc): one and several rows per
        // invocation, the lane-split form, the two-branch kernel, head size 128, half storage.
        for rows in [1, multi_rows_for(64)] {
            keys.push(KernelKey::fused(64, rows, PosKind::Rope).with_half_acc(true));
        }
        keys.push(KernelKey::fused(64, 1, PosKind::Alibi).with_half_acc(true));
        keys.push(
            KernelKey::fused(64, 2, PosKind::Rope)
                .with_row_lanes(4, LaneReduce::Workgroup)
                .with_half_acc(true),
        );
        keys.push(KernelKey::fused_two_branch(64, 1).with_half_acc(true));
        keys.push(KernelKey::fused(128, 1, PosKind::Rope).with_half_acc(true));
        // And in decode: 4 rows (Llama-3's GQA) at head sizes 64 and 128, with an f16 cache,
        // the two-branch form.
        for d in [64, 128] {
            keys.push(KernelKey::decode(d, 4, PosKind::Rope).with_half_acc(true));
        }
        keys.push(
            KernelKey::decode(64, 4, PosKind::Rope)
                .with_storage([F32, F16, F16, F32])
                .with_half_acc(true),
        );
        keys.push(
            KernelKey::decode(64, 4, PosKind::Rope)
                .with_two_branch(true)
                .with_half_acc(true),
        );
        keys.push(
            KernelKey::fused(64, 1, PosKind::Rope)
                .with_storage([F16; 4])
                .with_half_acc(true),
        );
        keys
    }

    /// The cooperative-matrix score-tile variants (the device needs
    /// `EXPERIMENTAL_COOPERATIVE_MATRIX`, `SHADER_F16` and `SUBGROUP`): both fragment sizes for
    /// every encoding kind at head size 64 and the RoPE kernel at every head size, one row per
    /// invocation (a GPU's), plus native f16 storage and the log-sum-exp output; each with the score
    /// product only and with P·V as a tile product too.
    pub fn coop_examples() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for tile in [
            ScoreTile::Coop16,
            ScoreTile::Coop8,
            ScoreTile::Coop16Pv,
            ScoreTile::Coop8Pv,
        ] {
            for pos in PosKind::VARIANTS {
                keys.push(KernelKey::fused(64, 1, pos).with_scores(tile));
            }
            for &d in crate::spec::SUPPORTED_HEAD_DIMS {
                if d != 64 && d.is_multiple_of(tile.fragment()) {
                    keys.push(KernelKey::fused(d, 1, PosKind::Rope).with_scores(tile));
                }
            }
            keys.push(
                KernelKey::fused(64, 1, PosKind::Rope)
                    .with_storage([StorageForm::F16; 4])
                    .with_scores(tile),
            );
            keys.push(
                KernelKey::fused(64, 1, PosKind::Rope)
                    .with_lse()
                    .with_scores(tile),
            );
        }
        keys
    }

    /// Every unfused-baseline variant the crate can build.
    pub fn all_unfused() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for stage in [Stage::RopeApply, Stage::Scores, Stage::Softmax, Stage::Pv] {
                for pos in [PosKind::None, PosKind::Rope] {
                    keys.push(KernelKey::unfused(stage, d, pos));
                }
            }
        }
        keys
    }

    /// A name that spells the configuration, e.g. `attention_fused_d64_bq64_bk32_rope_half`.
    pub fn name(&self) -> String {
        let pos = self.pos.name();
        let branch = if self.two_branch { "_2branch" } else { "" };
        // Storage letters (q, k, v, o) unless all four are f32: `_dthhhh` is native f16.
        // Then `_lse` when the variant writes the log-sum-exp.
        let mut dt = if self.storage == [StorageForm::F32; 4] {
            String::new()
        } else {
            format!(
                "_dt{}",
                self.storage.iter().map(|s| s.letter()).collect::<String>()
            )
        };
        if self.lse {
            dt += "_lse";
        }
        let pos = if self.custom != 0 {
            format!("{pos}{:016x}", self.custom)
        } else {
            pos.to_string()
        };
        match self.stage {
            Stage::Fused => format!(
                "attention_fused_d{}_bq{}_bk{}_r{}{}_{pos}{branch}{}{}{}{dt}",
                self.head_dim,
                self.block_q,
                self.block_k,
                self.rows,
                if self.row_lanes() > 1 {
                    format!("_l{}{}", self.lanes, self.lane_reduce.suffix())
                } else if self.tile_share > 0 {
                    format!("_ts{}", self.tile_share)
                } else {
                    String::new()
                },
                self.scores.suffix(),
                if self.half_acc { "_acch" } else { "" },
                if self.q_shared { "_qwg" } else { "" }
            ),
            Stage::Decode => format!(
                "decode_d{}_r{}_l{}{}_{pos}{branch}{}{}{}{}{}{dt}",
                self.head_dim,
                self.rows,
                self.lanes,
                self.lane_reduce.suffix(),
                self.key_rot.suffix(),
                if self.keys_per_step > 1 {
                    format!("_ks{}", self.keys_per_step)
                } else {
                    String::new()
                },
                if self.read_ahead { "_ra" } else { "" },
                if self.bias { "_ub" } else { "" },
                if self.half_acc { "_acch" } else { "" }
            ),
            Stage::DecodeReduce => format!(
                "decode_reduce_d{}{}{dt}",
                self.head_dim,
                if self.bias { "_ub" } else { "" }
            ),
            _ => format!("unfused_{}_d{}_{pos}", self.entry_point(), self.head_dim),
        }
    }

    /// The kernel family, which fixes the bindings.
    pub fn family(&self) -> Family {
        match self.stage {
            Stage::Fused => Family::Fused,
            Stage::Decode | Stage::DecodeReduce => Family::Decode,
            _ => Family::Unfused,
        }
    }

    /// Whether the kernel writes every element of its workgroup memory before reading it, so
    /// that wgpu's zero-initialization of workgroup memory can be left out of its pipeline.
    /// True for:
    /// - the fused kernel's row form: each key tile's K and V (and the query rows staged
    ///   through the K tile) are written whole, rows past the sequence as zeros, behind a
    ///   barrier before any read;
    /// - the decode kernel: the lengths are written by invocation 0 before a
    ///   `workgroupUniformLoad`; each lane reads back only the lane sums of its own key's lanes,
    ///   all written before the barrier; the key-group merge reads exactly the channels, maxima,
    ///   sums and NaN flags the merged group wrote, with the same index formulas;
    /// - the split-KV reduce: every invocation writes its own slot of each array before the
    ///   barrier that precedes the reads.
    ///
    /// Where the driver cannot zero workgroup memory itself, wgpu writes it from the shader at
    /// the start of every workgroup: on llvmpipe's GL path (naga writes it as one array
    /// constructor per array) that made up about 95 % of the row form's compile time (22.6 s
    /// against 1.3 s at head size 64, one row per invocation). The score-tile forms and the
    /// unfused baseline keep it.
    pub fn writes_workgroup_memory_first(&self) -> bool {
        match self.stage {
            Stage::Fused => self.scores == ScoreTile::Rows,
            Stage::Decode | Stage::DecodeReduce => true,
            _ => false,
        }
    }

    /// The WGSL entry point.
    pub fn entry_point(&self) -> &'static str {
        match self.stage {
            Stage::Fused => "attention_fused",
            Stage::RopeApply => "rope_apply",
            Stage::Scores => "scores",
            Stage::Softmax => "softmax_rows",
            Stage::Pv => "pv",
            Stage::Decode => "decode_attention",
            Stage::DecodeReduce => "decode_reduce",
        }
    }

    /// The variant's constants, prepended to the family source.
    pub fn wgsl_header(&self) -> String {
        let lens = score_tile_lens(self);
        let pv = pv_tile_lens(self);
        format!(
            "// variant {}\nconst HEAD_DIM: u32 = {}u;\nconst BLOCK_Q: u32 = {}u;\n\
             const BLOCK_K: u32 = {}u;\nconst ROWS: u32 = {}u;\nconst POS_KIND: u32 = {}u;\n\
             const TWO_BRANCH: bool = {};\nconst K_TILES: u32 = {}u;\nconst LANES: u32 = {}u;\n\
             const UNITS: u32 = {}u;\nconst LANE_REDUCE: u32 = {}u;\nconst KEY_ROT: u32 = {}u;\n\
             const READ_AHEAD: bool = {};\nconst MMA: u32 = {}u;\nconst MMA_FRAG: u32 = {}u;\n\
             const MQ_LEN: u32 = {}u;\nconst MK_LEN: u32 = {}u;\nconst K_TILE_LEN: u32 = {}u;\n\
             const S_LEN: u32 = {}u;\nconst RED_LEN: u32 = {}u;\nconst TILE_SHARE: u32 = {}u;\n\
             const PV_MMA: bool = {};\nconst PV_CH: u32 = {}u;\nconst PV_ROUNDS: u32 = {}u;\n\
             const MP_LEN: u32 = {}u;\nconst MV_LEN: u32 = {}u;\nconst OP_LEN: u32 = {}u;\n\
             const V_TILE_LEN: u32 = {}u;\nconst S_STRIDE: u32 = {}u;\nconst P_STRIDE: u32 = {}u;\n\
             const OP_STRIDE: u32 = {}u;\nconst PV_HALF: bool = {};\nconst Q_SHARED: bool = {};\n\
             const Q_TILE_LEN: u32 = {}u;\nconst KEY_STEP: u32 = {}u;\n",
            self.name(),
            self.head_dim,
            self.block_q.max(1),
            self.block_k.max(1),
            self.rows.max(1),
            self.pos as u32,
            self.two_branch,
            self.k_tiles(),
            self.lanes.max(1),
            self.units(),
            self.lane_reduce as u32,
            self.key_rot as u32,
            self.read_ahead,
            self.scores.code(),
            self.scores.fragment(),
            lens.0,
            lens.1,
            lens.2,
            lens.3,
            lane_red_len(self),
            self.tile_share,
            self.scores.pv(),
            self.pv_ch(),
            self.pv_rounds(),
            pv.0,
            pv.1,
            pv.2,
            if self.scores.pv() {
                1
            } else {
                self.block_k.max(1) * self.head_dim / 4
            },
            self.s_stride(),
            self.p_stride(),
            self.op_stride(),
            self.half_acc,
            self.q_shared,
            if self.q_shared {
                self.block_q * self.head_dim / 4
            } else {
                1
            },
            self.keys_per_step.max(1)
        )
    }

    /// Output channels per round of the P·V tile product: the largest of [`PV_CH`], 16, 8 and
    /// 4 that divides the head size.
    pub fn pv_ch(&self) -> u32 {
        pv_ch_for(self.scores, self.head_dim)
    }

    /// Row stride of the score tile, in floats (`tile_pad`).
    pub fn s_stride(&self) -> u32 {
        self.block_k + tile_pad(self.scores, 4)
    }

    /// Row stride of the P tile (f16, cooperative P·V forms), in elements.
    pub fn p_stride(&self) -> u32 {
        self.block_k + tile_pad(self.scores, 2)
    }

    /// Row stride of the P·V forms' output slice, in floats.
    pub fn op_stride(&self) -> u32 {
        self.pv_ch() + tile_pad(self.scores, 4)
    }

    /// Rounds of the P·V tile product (0 in the other forms, which have none).
    pub fn pv_rounds(&self) -> u32 {
        if self.scores.pv() {
            self.head_dim / self.pv_ch()
        } else {
            0
        }
    }

    /// Bounds the composer may unroll loops over.
    pub(crate) fn unroll_bounds(&self) -> [(&'static str, u32); 14] {
        [
            ("PV_ROUNDS", self.pv_rounds()),
            ("PV_VEC", self.pv_ch() / 4),
            ("PV_HVEC", self.pv_rounds() * self.pv_ch() / 4),
            ("HEAD_VEC", self.head_dim / 4),
            ("LVEC", self.head_dim / 4 / self.row_lanes()),
            ("BLOCK_K", self.block_k.max(1)),
            ("ROWS", self.rows.max(1)),
            ("K_TILES", self.k_tiles()),
            ("LANES", self.lanes.max(1)),
            ("UNITS", self.units()),
            ("HALVES", 2),
            ("ROW_QUADS", self.rows.max(1).div_ceil(4)),
            // Vec4s of a key group (4 keys) each invocation of a sharing subgroup reads.
            (
                "TILE_LOADS",
                self.head_dim.checked_div(self.tile_share).unwrap_or(1),
            ),
            ("KEY_STEP", self.keys_per_step.max(1)),
        ]
    }

    /// Decode: units of 8 channels each lane holds (1 in other families).
    pub fn units(&self) -> u32 {
        if self.lanes == 0 || self.family() != Family::Decode {
            1
        } else {
            decode_units(self.head_dim, self.lanes)
        }
    }

    /// RoPE branches, each with its own K tile: 2 for the two-branch variant, else 1.
    pub fn k_tiles(&self) -> u32 {
        if self.two_branch { 2 } else { 1 }
    }

    /// The whole WGSL module of this variant, or why it could not be composed.
    pub fn try_wgsl(&self) -> Result<String, ComposeError> {
        source::compose(self, None)
    }

    /// The whole WGSL module of a custom scheme's variant, given its hooks
    /// (`CheckedScheme::hooks_wgsl`); the same as [`KernelKey::try_wgsl`] for other variants.
    pub fn try_wgsl_with(&self, hooks: Option<&str>) -> Result<String, ComposeError> {
        source::compose(self, hooks)
    }

    /// The whole WGSL module of this variant: the generated contract, the variant constants and
    /// the family's source with every marked loop unrolled.
    ///
    /// # Panics
    /// If the crate's own shader sources do not compose, which tests/shaders.rs rules out for
    /// every variant; [`KernelKey::try_wgsl`] returns the error instead.
    pub fn wgsl(&self) -> String {
        self.try_wgsl()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }
}

#[cfg(test)]
mod lane_tests {
    use super::*;

    #[test]
    fn the_lane_split_form_applies_where_it_can() {
        let k = KernelKey::fused(128, 2, PosKind::Rope).with_row_lanes(4, LaneReduce::Shuffle);
        assert_eq!(
            (k.lanes, k.lane_reduce, k.rows),
            (4, LaneReduce::Shuffle, 2)
        );
        assert_eq!(k.invocations(), 128);
        assert_eq!(k.block_k, block_k_for(128, false), "subgroups need no room");
        assert!(k.name().contains("_r2_l4sx_"), "{}", k.name());
        // One lane is the ordinary form, under the ordinary name.
        let one = KernelKey::fused(64, 8, PosKind::Rope);
        assert_eq!(one.with_row_lanes(1, LaneReduce::Shuffle), one);
        // Head size 80 has 20 vec4s: 8 lanes become 4, and subgroupAdd (a whole subgroup of
        // 8) becomes butterflies over 4.
        let d80 = KernelKey::fused(80, 1, PosKind::Rope).with_row_lanes(8, LaneReduce::Add);
        assert_eq!((d80.lanes, d80.lane_reduce), (4, LaneReduce::Shuffle));
        // Two-branch kernels and the score-tile forms keep one lane.
        let two = KernelKey::fused_two_branch(64, 1);
        assert_eq!(two.with_row_lanes(4, LaneReduce::Shuffle), two);
        let tile = KernelKey::fused(64, 1, PosKind::Rope).with_scores(ScoreTile::Emulated);
        assert_eq!(tile.with_row_lanes(4, LaneReduce::Shuffle), tile);
        // And a lane-split key given a score tile drops its lanes.
        assert_eq!(k.with_scores(ScoreTile::Emulated).row_lanes(), 1);
    }

    #[test]
    fn tile_sharing_applies_to_the_one_lane_row_form_only() {
        let k = KernelKey::fused(64, 8, PosKind::Rope).with_tile_share(8);
        assert_eq!(k.tile_share, 8);
        assert!(k.name().contains("_r8_ts8_"), "{}", k.name());
        assert!(k.wgsl_header().contains("const TILE_SHARE: u32 = 8u;"));
        assert!(k.unroll_bounds().contains(&("TILE_LOADS", 8)));
        // Off: no subgroup, a size that is no power of two, two branches, a score tile,
        // several lanes per row, a workgroup (8 invocations at 8 rows) smaller than the subgroup.
        for off in [
            KernelKey::fused(64, 8, PosKind::Rope).with_tile_share(0),
            KernelKey::fused(64, 8, PosKind::Rope).with_tile_share(6),
            KernelKey::fused_two_branch(64, 1).with_tile_share(8),
            KernelKey::fused(64, 1, PosKind::Rope)
                .with_scores(ScoreTile::Emulated)
                .with_tile_share(8),
            KernelKey::fused(128, 1, PosKind::Rope)
                .with_row_lanes(4, LaneReduce::Shuffle)
                .with_tile_share(8),
            KernelKey::fused(64, 8, PosKind::Rope).with_tile_share(16),
            KernelKey::decode(128, 4, PosKind::Rope).with_tile_share(8),
        ] {
            assert_eq!(off.tile_share, 0, "{}", off.name());
            assert!(!off.name().contains("_ts"), "{}", off.name());
        }
    }

    #[test]
    fn query_blocks_apply_to_the_row_form_only() {
        let k = KernelKey::fused(64, 8, PosKind::Rope).with_block_q(128);
        assert_eq!((k.block_q, k.invocations()), (128, 16));
        assert!(k.name().contains("_bq128_"), "{}", k.name());
        assert!(k.wgsl_header().contains("const BLOCK_Q: u32 = 128u;"));
        // With tile sharing after it, as Context::fused_variant applies them: 16 invocations
        // are two subgroups of 8.
        assert_eq!(k.with_tile_share(8).tile_share, 8);
        let two = KernelKey::fused_two_branch(64, 1).with_block_q(128);
        assert_eq!(two.block_q, 128);
        // Unchanged: a score tile, the decode family, a block that is no multiple of the rows
        // (nor of the keys per tile), one that is no multiple of the 8 keys per tile, zero, and
        // more than 256 invocations.
        let tile = KernelKey::fused(64, 1, PosKind::Rope).with_scores(ScoreTile::Emulated);
        for (key, block) in [
            (tile, 128),
            (KernelKey::decode(128, 4, PosKind::Rope), 128),
            (KernelKey::fused(64, 8, PosKind::Rope), 100),
            (KernelKey::fused(64, 1, PosKind::Rope), 12),
            (KernelKey::fused(64, 8, PosKind::Rope), 0),
            (KernelKey::fused(64, 1, PosKind::Rope), 512),
        ] {
            assert_eq!(key.with_block_q(block), key, "{} at {block}", key.name());
        }
    }

    #[test]
    fn decode_lanes_follow_the_adapter() {
        let info = |ty: wgpu::DeviceType, min: u32, max: u32| wgpu::AdapterInfo {
            subgroup_min_size: min,
            subgroup_max_size: max,
            ..wgpu::AdapterInfo::new(ty, wgpu::Backend::Vulkan)
        };
        let cpu = info(wgpu::DeviceType::Cpu, 8, 8);
        // lavapipe: butterflies over 4 lanes, never subgroupAdd.
        assert_eq!(
            decode_lane_plan(128, true, &cpu, None),
            (4, LaneReduce::Shuffle)
        );
        assert_eq!(
            decode_lane_plan(32, true, &cpu, None),
            (2, LaneReduce::Shuffle)
        );
        // A GPU whose fixed subgroup is the 8 lanes: subgroupAdd; wider or varying: butterflies.
        let gpu8 = info(wgpu::DeviceType::DiscreteGpu, 8, 8);
        assert_eq!(
            decode_lane_plan(128, true, &gpu8, None),
            (8, LaneReduce::Add)
        );
        let gpu32 = info(wgpu::DeviceType::DiscreteGpu, 32, 32);
        assert_eq!(
            decode_lane_plan(128, true, &gpu32, None),
            (8, LaneReduce::Shuffle)
        );
        let intel = info(wgpu::DeviceType::IntegratedGpu, 8, 32);
        assert_eq!(
            decode_lane_plan(128, true, &intel, None),
            (8, LaneReduce::Shuffle)
        );
        // No subgroups: workgroup memory, whatever the adapter.
        assert_eq!(
            decode_lane_plan(128, false, &cpu, None),
            (8, LaneReduce::Workgroup)
        );
        assert_eq!(
            decode_lane_plan(128, true, &info(wgpu::DeviceType::Cpu, 0, 0), None).1,
            LaneReduce::Workgroup
        );
        // An asked count: rounded down to a power of two within the head's units of 8
        // channels; summed by subgroups only where the smallest subgroup holds the lanes.
        assert_eq!(
            decode_lane_plan(128, true, &gpu32, Some(16)),
            (16, LaneReduce::Shuffle)
        );
        assert_eq!(
            decode_lane_plan(64, true, &gpu32, Some(16)),
            (8, LaneReduce::Shuffle)
        );
        assert_eq!(
            decode_lane_plan(128, true, &gpu8, Some(16)),
            (16, LaneReduce::Workgroup)
        );
        assert_eq!(
            decode_lane_plan(128, true, &cpu, Some(8)),
            (8, LaneReduce::Shuffle)
        );
        assert_eq!(
            decode_lane_plan(128, true, &gpu8, Some(1)),
            (1, LaneReduce::Workgroup)
        );
        assert_eq!(
            decode_lane_plan(128, false, &gpu32, Some(4)),
            (4, LaneReduce::Workgroup)
        );
        assert_eq!(decode_lanes_at_most(80, 16), 8);
        assert_eq!(decode_lanes_at_most(32, 3), 2);
        assert_eq!(decode_lanes_at_most(32, 0), 1);
    }

    #[test]
    fn the_workgroup_reduction_fits_webgpus_workgroup_memory() {
        for &d in crate::spec::SUPPORTED_HEAD_DIMS {
            for rows in [1, 2, 4, 8] {
                for lanes in [2, 4, 8] {
                    let k = KernelKey::fused(d, rows, PosKind::Rope)
                        .with_row_lanes(lanes, LaneReduce::Workgroup);
                    if k.row_lanes() == 1 {
                        continue;
                    }
                    assert!(
                        workgroup_bytes(&k) <= WORKGROUP_BYTES,
                        "{}: {} bytes",
                        k.name(),
                        workgroup_bytes(&k)
                    );
                    assert_eq!(lane_red_len(&k), rows * k.invocations());
                    assert!(k.block_k >= 4 && k.block_k.is_power_of_two());
                }
            }
        }
    }
}

#[cfg(test)]
mod score_tile_tests {
    use super::*;

    fn prop(n: u32, ab: wgpu::CooperativeScalarType) -> wgpu::CooperativeMatrixProperties {
        wgpu::CooperativeMatrixProperties {
            m_size: n,
            n_size: n,
            k_size: n,
            ab_type: ab,
            cr_type: wgpu::CooperativeScalarType::F32,
            saturating_accumulation: false,
        }
    }

    #[test]
    fn the_coop_form_follows_the_adapters_configurations() {
        use wgpu::CooperativeScalarType::{F16, F32};
        let all = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP;
        let both = [prop(8, F16), prop(16, F16)];
        assert_eq!(ScoreTile::coop_for(all, &both), Some(ScoreTile::Coop16));
        assert_eq!(ScoreTile::coop_for(all, &both[..1]), Some(ScoreTile::Coop8));
        // f32 operands only (wgpu's Metal listing): no f16 tile.
        assert_eq!(ScoreTile::coop_for(all, &[prop(8, F32)]), None);
        // Any of the three features missing: none.
        for missing in [
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            wgpu::Features::SHADER_F16,
            wgpu::Features::SUBGROUP,
        ] {
            assert_eq!(ScoreTile::coop_for(all - missing, &both), None);
        }
    }

    #[test]
    fn score_tile_keys_use_one_row_and_their_own_tiles() {
        let rows = KernelKey::fused(64, 8, PosKind::Rope);
        for t in [ScoreTile::Emulated, ScoreTile::Coop8, ScoreTile::Coop16] {
            let k = rows.with_scores(t);
            assert_eq!((k.rows, k.block_k), (1, TILE_BLOCK_K));
            assert_ne!(k.name(), rows.name());
            // Back to the row form: its own tile size (the row count stays 1).
            assert_eq!(k.with_scores(ScoreTile::Rows).block_k, rows.block_k);
        }
        // Workgroup bytes: V in f32, Q and K tiles in f16 (coop) or f32 (emulated), scores
        // (rows padded by 16 bytes, or by one float in the emulated form).
        let d = 64;
        let coop = rows.with_scores(ScoreTile::Coop16);
        assert_eq!(coop.s_stride(), 20);
        assert_eq!(
            workgroup_bytes(&coop),
            16 * d * 4 + (64 * d + 16 * d) * 2 + 64 * 20 * 4 + 16
        );
        let emu = rows.with_scores(ScoreTile::Emulated);
        assert_eq!(emu.s_stride(), 17);
        assert_eq!(
            workgroup_bytes(&emu),
            16 * d * 4 + (64 * d + 16 * d) * 4 + 64 * 17 * 4 + 16
        );
        // The row form is unchanged: WebGPU's default 16 KiB at head size 64.
        assert_eq!(workgroup_bytes(&rows), WORKGROUP_BYTES);
    }

    #[test]
    fn pv_tile_forms_fit_their_devices_and_divide_the_head() {
        let rows = KernelKey::fused(64, 8, PosKind::Rope);
        for t in [ScoreTile::Emulated, ScoreTile::Coop8, ScoreTile::Coop16] {
            let pv = t.with_pv();
            assert!(pv.pv() && !t.pv());
            assert_eq!(pv.without_pv(), t);
            assert_eq!((pv.coop(), pv.fragment()), (t.coop(), t.fragment()));
            let k = rows.with_scores(pv);
            assert_ne!(k.name(), rows.with_scores(t).name());
            // Whole rounds, each a whole number of fragments.
            for &d in crate::spec::SUPPORTED_HEAD_DIMS {
                let k = KernelKey::fused(d, 1, PosKind::Rope).with_scores(pv);
                assert_eq!(k.pv_rounds() * k.pv_ch(), d, "{pv:?} d{d}");
                if pv.coop() && d.is_multiple_of(t.fragment()) {
                    assert!(k.pv_ch().is_multiple_of(t.fragment()), "{pv:?} d{d}");
                }
            }
            assert_eq!(rows.with_scores(t).pv_rounds(), 0);
        }
        assert_eq!(ScoreTile::Rows.with_pv(), ScoreTile::Rows);
        // The emulated form within a CPU adapter's 32 KiB at head size 64: Q, K, V tiles and
        // scores in f32, an 8-channel output slice; the coop form within 48 KiB at 128.
        let emu = KernelKey::fused(64, 1, PosKind::Rope).with_scores(ScoreTile::EmulatedPv);
        assert_eq!((emu.pv_ch(), emu.op_stride()), (8, 9));
        assert_eq!(
            workgroup_bytes(&emu),
            (64 * 64 + 16 * 64 + 16 * 64) * 4 + (64 * 17 + 64 * 9) * 4 + 20
        );
        assert!(workgroup_bytes(&emu) <= 32768);
        // The coop form's rows padded by 16 bytes: P (f16) by 8, the scores and the output
        // slice (f32) by 4.
        let coop = KernelKey::fused(128, 1, PosKind::Rope).with_scores(ScoreTile::Coop16Pv);
        assert_eq!(coop.pv_ch(), PV_CH);
        assert_eq!(
            (coop.s_stride(), coop.p_stride(), coop.op_stride()),
            (20, 24, 36)
        );
        assert_eq!(
            workgroup_bytes(&coop),
            (64 * 128 + 16 * 128 + 64 * 24 + 16 * 128) * 2 + (64 * 20 + 64 * 36) * 4 + 20
        );
        assert!(
            workgroup_bytes(&coop) <= 49152,
            "{}",
            workgroup_bytes(&coop)
        );
    }
}
