//! The device this crate runs on: either one it opens itself (adapter chosen from the
//! environment, a name filter, or the best present) or the caller's own `wgpu::Device`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dtype::HalfForm;
use crate::error::{Error, Result};
use crate::kernel::abi::Family;
use crate::kernel::pipeline::Pipelines;
use crate::kernel::{KernelKey, ScoreTile};
use crate::spec::AttentionSpec;

/// Longest wait for one submission unless `ContextOptions::timeout` or `set_timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How to pick an adapter when the crate opens its own device.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ContextOptions {
    /// Backends to look at. Default: `WGPU_BACKEND` if set (e.g. `vulkan`, `gl`), else all.
    pub backends: wgpu::Backends,
    /// Case-insensitive substring of the adapter name. Default: `WGPU_ADAPTER_NAME` if set.
    pub adapter_name: Option<String>,
    /// Longest wait for the device to finish one submission.
    pub timeout: Duration,
    /// Ask for wgpu's `EXPERIMENTAL_COOPERATIVE_MATRIX` where the adapter offers it, so that
    /// [`Context::set_score_tile`] can select the cooperative-matrix score tile. Off by default:
    /// wgpu marks the feature experimental (its use goes through an `unsafe` opt-in, and on
    /// Vulkan it switches shaders to the Vulkan memory model). Default:
    /// `POSATTN_COOPERATIVE_MATRIX=1`.
    pub cooperative_matrix: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all()),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME")
                .ok()
                .filter(|s| !s.is_empty()),
            timeout: DEFAULT_TIMEOUT,
            cooperative_matrix: std::env::var("POSATTN_COOPERATIVE_MATRIX").is_ok_and(|v| v == "1"),
        }
    }
}

impl ContextOptions {
    /// Asks for cooperative matrices where the adapter offers them (see the field).
    pub fn with_cooperative_matrix(mut self, on: bool) -> Self {
        self.cooperative_matrix = on;
        self
    }

    /// Looks only at `backends`.
    pub fn with_backends(mut self, backends: wgpu::Backends) -> Self {
        self.backends = backends;
        self
    }

    /// Picks the first adapter whose name contains `name` (case-insensitive); `None` takes any.
    pub fn with_adapter_name(mut self, name: Option<String>) -> Self {
        self.adapter_name = name;
        self
    }

    /// Sets the longest wait for one submission.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The defaults, with `WGPU_BACKEND` and `WGPU_ADAPTER_NAME` read strictly: an unknown
    /// backend name is an error naming the variable (`Default` cannot fail, and there an
    /// unreadable variable leaves the setting at its default).
    pub fn from_env() -> Result<Self> {
        Ok(ContextOptions {
            backends: crate::env::backends_from_env()?.unwrap_or(wgpu::Backends::all()),
            adapter_name: crate::env::adapter_name_from_env()?,
            timeout: DEFAULT_TIMEOUT,
            cooperative_matrix: crate::env::flag_from_env("POSATTN_COOPERATIVE_MATRIX")?,
        })
    }
}

/// A device and queue plus the compiled pipelines this crate made on them.
pub struct Context {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    timeout: Duration,
    pipelines: Pipelines,
    /// Rows and lanes by head size from `posattn tune` (crate::tune), where stored.
    tuned: crate::tune::Tuned,
    rows_override: Option<u32>,
    lanes_override: Option<u32>,
    decode_lanes_override: Option<u32>,
    decode_keys_override: Option<u32>,
    q_shared_override: Option<bool>,
    block_q_override: Option<u32>,
    half_override: Option<HalfForm>,
    accumulation: crate::dtype::Accumulation,
    /// The cooperative-matrix score tile the device runs (requested feature and an f16
    /// configuration of the adapter), if any.
    coop: Option<ScoreTile>,
    score_tile: ScoreTile,
    uncaptured: Arc<Mutex<Vec<String>>>,
}

/// [`Context::block_q`]'s rule for an adapter of `device_type` on `backend`, with `threads` CPU
/// threads to fill.
fn block_q_rule(
    device_type: wgpu::DeviceType,
    backend: wgpu::Backend,
    spec: &AttentionSpec,
    threads: u64,
) -> u32 {
    use crate::kernel::{BLOCK_Q, CPU_BLOCK_Q, CPU_LONG_BLOCK_Q, CPU_LONG_KEYS};
    if device_type != wgpu::DeviceType::Cpu {
        return BLOCK_Q;
    }
    let rows = spec.seq_q.max(1) as u64;
    let keys_per_row = spec.visible_pairs() / rows;
    let workgroups =
        rows.div_ceil(CPU_LONG_BLOCK_Q as u64) * spec.num_heads as u64 * spec.batch as u64;
    if backend == wgpu::Backend::Vulkan
        && keys_per_row >= CPU_LONG_KEYS
        && rows >= CPU_LONG_BLOCK_Q as u64
        && workgroups >= 2 * threads
    {
        CPU_LONG_BLOCK_Q
    } else {
        CPU_BLOCK_Q
    }
}

/// Rank used to pick the best adapter: real GPUs first, software rasterisers last.
fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Every adapter on the chosen backends that matches the name filter, best first.
#[cfg(not(target_arch = "wasm32"))]
pub fn enumerate_adapters(options: &ContextOptions) -> Vec<wgpu::Adapter> {
    pollster::block_on(enumerate_adapters_async(options))
}

/// [`enumerate_adapters`] as a future (the only form on the web, where the browser offers at
/// most one WebGPU adapter).
pub async fn enumerate_adapters_async(options: &ContextOptions) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = options.backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters: Vec<wgpu::Adapter> = instance
        .enumerate_adapters(options.backends)
        .await
        .into_iter()
        .filter(|a| {
            let info = a.get_info();
            // wgpu's GL backend can list the same GPU twice through different EGL platforms.
            info.backend != wgpu::Backend::Noop
                && match &options.adapter_name {
                    Some(f) => info.name.to_lowercase().contains(&f.to_lowercase()),
                    None => true,
                }
        })
        .collect();
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (device_rank(i.device_type), i.backend as u8)
    });
    adapters
}

/// Why no adapter was found, and what to install or set.
#[cfg(not(target_arch = "wasm32"))]
fn no_adapter_hint(backends: wgpu::Backends) -> String {
    crate::env::no_adapter_hint(backends)
}

/// In a browser the only adapter is the browser's own WebGPU one.
#[cfg(target_arch = "wasm32")]
fn no_adapter_hint(_backends: wgpu::Backends) -> String {
    "this browser offers no WebGPU adapter (`navigator.gpu` is missing or `requestAdapter()` \
     found none; Chromium-based browsers may need WebGPU enabled in chrome://flags)"
        .into()
}

/// One line naming an adapter: name, backend, type and driver.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let driver = if info.driver.is_empty() {
        String::new()
    } else {
        format!(", {} {}", info.driver, info.driver_info)
    };
    format!(
        "{} ({:?}, {:?}{})",
        info.name, info.backend, info.device_type, driver
    )
}

impl Context {
    /// Opens a device on the best adapter that `ContextOptions::default()` allows.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// [`Context::new`] as a future; on the web (wgpu's WebGPU backend), the browser's adapter.
    pub async fn new_async() -> Result<Self> {
        Self::with_options_async(&ContextOptions::from_env()?).await
    }

    /// Opens a device on the best adapter that `options` allows.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options(options: &ContextOptions) -> Result<Self> {
        pollster::block_on(Self::with_options_async(options))
    }

    /// [`Context::with_options`] as a future.
    pub async fn with_options_async(options: &ContextOptions) -> Result<Self> {
        let adapter = enumerate_adapters_async(options)
            .await
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "backends {:?}, name filter {:?}; {}",
                    options.backends,
                    options.adapter_name,
                    no_adapter_hint(options.backends)
                ))
            })?;
        let mut ctx = Self::open_async(&adapter, options.cooperative_matrix).await?;
        ctx.timeout = options.timeout;
        Ok(ctx)
    }

    /// Opens a device on `adapter` with the features this crate can use (timestamp queries when
    /// present) and the adapter's own limits.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        pollster::block_on(Self::from_adapter_async(adapter))
    }

    /// [`Context::from_adapter`] as a future.
    pub async fn from_adapter_async(adapter: &wgpu::Adapter) -> Result<Self> {
        Self::open_async(adapter, false).await
    }

    /// [`Context::from_adapter_async`], asking for cooperative matrices too where `coop` and
    /// the adapter offers them.
    pub async fn open_async(adapter: &wgpu::Adapter, coop: bool) -> Result<Self> {
        let info = adapter.get_info();
        let mut wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP;
        let coop_tile = if coop {
            ScoreTile::coop_for(adapter.features(), &adapter.cooperative_matrix_properties())
        } else {
            None
        };
        if coop_tile.is_some() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = adapter.features() & wanted;
        let desc = wgpu::DeviceDescriptor {
            label: Some("posattn"),
            required_features: features,
            required_limits: adapter.limits(),
            // SAFETY: asked for only on the caller's opt-in (`ContextOptions::cooperative_matrix`);
            // the feature's operations appear only in the cooperative-matrix score-tile
            // variants, selected only through `Context::set_score_tile`.
            experimental_features: if coop_tile.is_some() {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        };
        let (device, queue) =
            adapter
                .request_device(&desc)
                .await
                .map_err(|source| Error::RequestDevice {
                    adapter: describe_adapter(&info),
                    source,
                })?;
        // Our own device: errors outside our scopes are recorded, never panicked on.
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let mut ctx = Self::build(device, queue, info, uncaptured);
        ctx.coop = coop_tile;
        Ok(ctx)
    }

    /// Wraps a caller's device and queue (a game engine's, an application's). The crate does not
    /// touch the device's uncaptured-error handler: every error from this crate's own operations
    /// is caught in error scopes and returned.
    ///
    /// What shapes the kernels is read from the device itself, never from a value the caller
    /// passes: its features (`SHADER_F16` picks native or packed f16 storage, timestamp
    /// queries), its limits (workgroup storage, storage buffers per stage, binding sizes,
    /// offset alignment) and the adapter it was opened on (`Device::adapter_info`: the device
    /// type and backend choose the rows per invocation, see
    /// [`Context::rows_per_invocation`], and the decode split rule). Where that report is not
    /// to be trusted (a browser may hide the adapter), choose explicitly with
    /// [`Context::set_rows_per_invocation`], [`Context::set_half_form`] and
    /// [`crate::DecodeSpec::with_splits`].
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        Self::build(device, queue, info, Arc::new(Mutex::new(Vec::new())))
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        uncaptured: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        let pipelines = Pipelines::new(&device);
        #[cfg(not(target_arch = "wasm32"))]
        let tuned = crate::tune::stored(&info);
        #[cfg(target_arch = "wasm32")]
        let tuned = Default::default();
        Context {
            tuned,
            rows_override: None,
            lanes_override: None,
            decode_lanes_override: None,
            decode_keys_override: None,
            q_shared_override: None,
            block_q_override: None,
            half_override: None,
            accumulation: crate::dtype::Accumulation::F32,
            coop: None,
            score_tile: ScoreTile::Rows,
            device,
            queue,
            info,
            timeout: DEFAULT_TIMEOUT,
            pipelines,
            uncaptured,
        }
    }

    /// The device (the caller's, or the one this context opened).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue commands are submitted on.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The adapter the device was opened on, as the device reports it.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Name, backend, type and driver of the adapter.
    pub fn describe(&self) -> String {
        describe_adapter(&self.info)
    }

    /// Query rows each invocation of the fused kernel handles at `head_dim`: the override if
    /// set, else the adapter's tuned choice for that head size (`posattn tune`, see
    /// [`crate::tune`]), else the heuristic (`kernel::default_rows`).
    pub fn rows_per_invocation(&self, head_dim: u32) -> u32 {
        match (self.rows_override, self.tuned.rows.get(&head_dim)) {
            (Some(r), _) => r,
            (None, Some(&r)) => r,
            (None, None) => crate::kernel::default_rows(&self.info, head_dim),
        }
    }

    /// Where [`Context::rows_per_invocation`] comes from at `head_dim`: `"override"`,
    /// `"tuned"` or `"heuristic"`.
    pub fn rows_source(&self, head_dim: u32) -> &'static str {
        if self.rows_override.is_some() {
            "override"
        } else if self.tuned.rows.contains_key(&head_dim) {
            "tuned"
        } else {
            "heuristic"
        }
    }

    /// Overrides the rows per invocation for every head size (one of `kernel::ROWS_CHOICES`);
    /// `None` restores the adapter's default.
    pub fn set_rows_per_invocation(&mut self, rows: Option<u32>) -> Result<()> {
        if let Some(r) = rows
            && !crate::kernel::ROWS_CHOICES.contains(&r)
        {
            return Err(Error::invalid(
                "rows_per_invocation",
                format!("one of {:?}", crate::kernel::ROWS_CHOICES),
                r,
            ));
        }
        self.rows_override = rows;
        Ok(())
    }

    /// Lanes that share each query row of the fused kernel at `head_dim`, splitting its channels
    /// (1: one invocation per row slot): the override if set, else the adapter's tuned choice,
    /// else 1 (the heuristic; `posattn tune` measures 2, 4 and 8 where the device has
    /// subgroups). Plans use it for one-branch kernels with the row-form scores, rounded down to
    /// a count that divides `head_dim / 4` ([`crate::kernel::KernelKey::with_row_lanes`]).
    pub fn row_lanes(&self, head_dim: u32) -> u32 {
        match (self.lanes_override, self.tuned.lanes.get(&head_dim)) {
            (Some(l), _) => l,
            (None, Some(&l)) => l,
            (None, None) => 1,
        }
    }

    /// How the lanes of a row sum their partial scores on this device with `lanes` per row:
    /// `subgroupAdd` where the adapter's subgroup size is fixed and equal to them,
    /// `subgroupShuffleXor` butterflies where its smallest subgroup holds them (sizes read from
    /// the adapter, never assumed), else workgroup memory.
    pub fn row_lane_reduce(&self, lanes: u32) -> crate::kernel::LaneReduce {
        use crate::kernel::LaneReduce;
        let sg_min = self.info.subgroup_min_size;
        if lanes <= 1
            || !self.device.features().contains(wgpu::Features::SUBGROUP)
            || sg_min < lanes
        {
            LaneReduce::Workgroup
        } else if sg_min == self.info.subgroup_max_size && sg_min == lanes {
            LaneReduce::Add
        } else {
            LaneReduce::Shuffle
        }
    }

    /// Overrides the lanes per query row for every head size (one of
    /// `kernel::ROW_LANES_CHOICES`); `None` restores the adapter's default.
    pub fn set_row_lanes(&mut self, lanes: Option<u32>) -> Result<()> {
        if let Some(l) = lanes
            && !crate::kernel::ROW_LANES_CHOICES.contains(&l)
        {
            return Err(Error::invalid(
                "row_lanes",
                format!("one of {:?}", crate::kernel::ROW_LANES_CHOICES),
                l,
            ));
        }
        self.lanes_override = lanes;
        Ok(())
    }

    /// Whether the fused kernel's row form keeps its queries in workgroup memory at `head_dim`
    /// ([`crate::kernel::KernelKey::with_q_shared`]): the override if set, else the adapter's
    /// tuned choice (`posattn tune` measures both placements on GPUs), else `false` (the
    /// heuristic: registers).
    pub fn q_in_workgroup(&self, head_dim: u32) -> bool {
        self.q_shared_override
            .or_else(|| self.tuned.q_shared.get(&head_dim).copied())
            .unwrap_or(false)
    }

    /// Where [`Context::q_in_workgroup`] comes from at `head_dim`: `"override"`, `"tuned"` or
    /// `"heuristic"`.
    pub fn q_in_workgroup_source(&self, head_dim: u32) -> &'static str {
        if self.q_shared_override.is_some() {
            "override"
        } else if self.tuned.q_shared.contains_key(&head_dim) {
            "tuned"
        } else {
            "heuristic"
        }
    }

    /// Keeps (`Some(true)`) or does not keep (`Some(false)`) the fused kernel's queries in
    /// workgroup memory in plans made from now on, for every head size; `None` restores the
    /// adapter's default. A plan whose workgroup memory the queries would overflow is an
    /// [`Error::Unavailable`] naming the workgroup storage bytes.
    pub fn set_q_in_workgroup(&mut self, on: Option<bool>) {
        self.q_shared_override = on;
    }

    /// Lanes per key a decode plan at `head_dim` is asked for: the override if set, else the
    /// adapter's tuned choice (`posattn tune`), else `None`, the adapter rule
    /// ([`crate::kernel::decode_lane_plan`]). A count above the head's units of 8 channels is
    /// rounded down ([`crate::kernel::decode_lanes_at_most`]).
    pub fn decode_lanes(&self, head_dim: u32) -> Option<u32> {
        self.decode_lanes_override
            .or_else(|| self.tuned.decode_lanes.get(&head_dim).copied())
    }

    /// Where [`Context::decode_lanes`] comes from at `head_dim`: `"override"`, `"tuned"` or
    /// `"heuristic"`.
    pub fn decode_lanes_source(&self, head_dim: u32) -> &'static str {
        if self.decode_lanes_override.is_some() {
            "override"
        } else if self.tuned.decode_lanes.contains_key(&head_dim) {
            "tuned"
        } else {
            "heuristic"
        }
    }

    /// Overrides the decode kernel's lanes per key for every head size (one of
    /// `kernel::DECODE_LANES_CHOICES`) in plans built afterwards; `None` restores the adapter's
    /// default.
    pub fn set_decode_lanes(&mut self, lanes: Option<u32>) -> Result<()> {
        if let Some(l) = lanes
            && !crate::kernel::DECODE_LANES_CHOICES.contains(&l)
        {
            return Err(Error::invalid(
                "decode_lanes",
                format!("one of {:?}", crate::kernel::DECODE_LANES_CHOICES),
                l,
            ));
        }
        self.decode_lanes_override = lanes;
        Ok(())
    }

    /// Keys each key group of the decode kernel folds into its softmax per step at `head_dim`
    /// (one of `kernel::DECODE_KEYS_PER_STEP_CHOICES`): the override if set, else the adapter's
    /// tuned choice (`posattn tune` measures 2 and 4 on GPUs, and with `--decode-keys` on CPU
    /// adapters), else 1, one softmax update per key. More keys a step make the keys' reads
    /// independent of each other's arithmetic and rescale the accumulators once per step, the
    /// shape of llama.cpp's and FlashInfer's decode kernels; on lavapipe, whose decode time is
    /// the per-lane reads of K and V, it is not faster (BENCHMARKS.md), and on GPUs it is
    /// measured by `posattn bench --decode --keys-per-step` and `benches/gpu.sh`.
    pub fn decode_keys_per_step(&self, head_dim: u32) -> u32 {
        self.decode_keys_override
            .or_else(|| self.tuned.decode_keys.get(&head_dim).copied())
            .unwrap_or(1)
    }

    /// Where [`Context::decode_keys_per_step`] comes from at `head_dim`: `"override"`,
    /// `"tuned"` or `"heuristic"`.
    pub fn decode_keys_per_step_source(&self, head_dim: u32) -> &'static str {
        if self.decode_keys_override.is_some() {
            "override"
        } else if self.tuned.decode_keys.contains_key(&head_dim) {
            "tuned"
        } else {
            "heuristic"
        }
    }

    /// Overrides the decode kernel's keys per step for every head size (one of
    /// `kernel::DECODE_KEYS_PER_STEP_CHOICES`) in plans built afterwards; `None` restores 1.
    pub fn set_decode_keys_per_step(&mut self, keys: Option<u32>) -> Result<()> {
        if let Some(k) = keys
            && !crate::kernel::DECODE_KEYS_PER_STEP_CHOICES.contains(&k)
        {
            return Err(Error::invalid(
                "decode_keys_per_step",
                format!("one of {:?}", crate::kernel::DECODE_KEYS_PER_STEP_CHOICES),
                k,
            ));
        }
        self.decode_keys_override = keys;
        Ok(())
    }

    /// The fused kernel variant this context builds for `key` (the planner's key at the
    /// context's rows per invocation) for a plan of shape `spec`: its score tile (one-branch
    /// kernels), lanes per row, query block ([`Context::block_q`]) and tile sharing applied.
    pub fn fused_variant(&self, key: KernelKey, spec: &AttentionSpec) -> KernelKey {
        let key = if self.score_tile != ScoreTile::Rows && !key.two_branch {
            key.with_scores(self.score_tile)
        } else {
            key
        };
        let lanes = self.row_lanes(key.head_dim);
        key.with_row_lanes(lanes, self.row_lane_reduce(lanes))
            .with_block_q(self.block_q(spec))
            .with_half_acc(self.accumulation == crate::dtype::Accumulation::F16)
            .with_q_shared(self.q_in_workgroup(key.head_dim))
            .with_tile_share(self.tile_share())
    }

    /// Query rows per workgroup of the fused row form ([`KernelKey::with_block_q`]) for a plan
    /// of shape `spec`, unless [`Context::set_block_q`] fixed it:
    ///
    /// - GPUs: [`crate::kernel::BLOCK_Q`] (64) until measured.
    /// - CPU adapters: [`crate::kernel::CPU_BLOCK_Q`] (128). On Vulkan (lavapipe)
    ///   [`crate::kernel::CPU_LONG_BLOCK_Q`] (256) where a query row sees at least
    ///   [`crate::kernel::CPU_LONG_KEYS`] (1024) keys on average (a causal self-attention from
    ///   2048 tokens), the plan has at least 256 query rows, and the grid keeps at least two
    ///   workgroups per CPU thread. Other CPU adapters (llvmpipe's GL, WARP) keep 128 until
    ///   measured.
    ///
    /// Why: a CPU adapter reads device memory at a per-invocation address as a loop over the
    /// lanes, and every workgroup stages each K/V tile once for all of its rows, so a larger
    /// block reads K and V fewer times per row. With 64 rows lavapipe's prefill at head size 64
    /// spent about 43 % of its time outside the key-group loop, mostly staging K and V; 128
    /// rows made it about 1.2× faster at 2048 tokens, and 256 rows about 1.05× more at 2048
    /// and 1.1× at 4096. The cost: a causal or windowed workgroup walks the keys of its whole
    /// block, about `block / 2` masked keys per row (a window's band about `block`), which short
    /// rows do not repay: 256 rows were 0.98× of 128 at 1024 tokens (BENCHMARKS.md).
    pub fn block_q(&self, spec: &AttentionSpec) -> u32 {
        if let Some(b) = self.block_q_override {
            return b;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        block_q_rule(self.info.device_type, self.info.backend, spec, threads)
    }

    /// Fixes the query rows per workgroup of the fused row form (one of
    /// `kernel::BLOCK_Q_CHOICES`) for every plan; `None` restores [`Context::block_q`]'s rule.
    /// A form the block does not fit (more than 256 invocations, or not a multiple of the rows
    /// per invocation and keys per tile) keeps its own ([`KernelKey::with_block_q`]).
    pub fn set_block_q(&mut self, block_q: Option<u32>) -> Result<()> {
        if let Some(b) = block_q
            && !crate::kernel::BLOCK_Q_CHOICES.contains(&b)
        {
            return Err(Error::invalid(
                "block_q",
                format!("one of {:?}", crate::kernel::BLOCK_Q_CHOICES),
                b,
            ));
        }
        self.block_q_override = block_q;
        Ok(())
    }

    /// The subgroup size the fused row form shares its tile reads across
    /// ([`KernelKey::with_tile_share`]): a Vulkan CPU adapter's with `Features::SUBGROUP` and
    /// one fixed subgroup size (lavapipe: 8), else 0. lavapipe runs each workgroup-memory read
    /// at a per-invocation address as a loop over the lanes; sharing them made prefill at head
    /// size 64 about 1.3× faster there (BENCHMARKS.md). A GPU reads workgroup memory in one
    /// step and keeps the ordinary form, and the other CPU adapters (WARP, SwiftShader in a
    /// browser) keep it until measured.
    pub fn tile_share(&self) -> u32 {
        let sg = self.info.subgroup_min_size;
        if self.info.device_type == wgpu::DeviceType::Cpu
            && self.info.backend == wgpu::Backend::Vulkan
            && self.device.features().contains(wgpu::Features::SUBGROUP)
            && sg == self.info.subgroup_max_size
        {
            sg
        } else {
            0
        }
    }

    /// How plans made from now on form a tile's scores (Q·Kᵀ): [`ScoreTile::Rows`] unless set
    /// with [`Context::set_score_tile`].
    pub fn score_tile(&self) -> ScoreTile {
        self.score_tile
    }

    /// The cooperative-matrix score tile this device runs (`Coop16` or `Coop8`), if it was
    /// opened with [`ContextOptions::cooperative_matrix`] on an adapter that lists an f16 × f16
    /// → f32 configuration of either size; on a caller's device, once
    /// [`Context::set_cooperative_matrix_properties`] was told the adapter's configurations.
    pub fn coop_score_tile(&self) -> Option<ScoreTile> {
        self.coop
    }

    /// For a caller's device ([`Context::from_device`]) that was opened with
    /// `EXPERIMENTAL_COOPERATIVE_MATRIX`, `SHADER_F16` and `SUBGROUP`: the adapter's
    /// cooperative-matrix configurations (`adapter.cooperative_matrix_properties()`, which the
    /// device does not carry). Returns the form they allow on this device, which
    /// [`Context::coop_score_tile`] reports from then on; `None` when the device lacks a
    /// feature or the list has no f16 × f16 → f32 configuration of size 16 or 8.
    pub fn set_cooperative_matrix_properties(
        &mut self,
        props: &[wgpu::CooperativeMatrixProperties],
    ) -> Option<ScoreTile> {
        self.coop = ScoreTile::coop_for(self.device.features(), props);
        if self.score_tile.coop() && self.coop != Some(self.score_tile.without_pv()) {
            self.score_tile = ScoreTile::Rows;
        }
        self.coop
    }

    /// Sets how plans made from now on form a tile's scores. [`ScoreTile::Rows`] (the default)
    /// and [`ScoreTile::Emulated`] run everywhere; the cooperative-matrix forms only where
    /// [`Context::coop_score_tile`] names that form, else an [`Error::Unavailable`] naming
    /// `score_tile`. The score-tile forms round Q and K to f16 for the product (f32
    /// accumulation): what tensor cores do, and a precision choice for f32 inputs.
    pub fn set_score_tile(&mut self, tile: ScoreTile) -> Result<()> {
        if tile.coop() && self.coop != Some(tile.without_pv()) {
            return Err(Error::unavailable(
                "score_tile",
                format!("{tile:?}"),
                match self.coop {
                    Some(c) => format!("{c:?} or {:?} only", c.with_pv()),
                    None => "no cooperative matrices (not offered by the adapter, or the \
                             context was opened without ContextOptions::cooperative_matrix)"
                        .to_string(),
                },
            ));
        }
        self.score_tile = tile;
        Ok(())
    }

    /// Whether the device runs native `f16` in shaders (`SHADER_F16`).
    pub fn has_native_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    /// How plans made from now on store f16 tensors: native where the device has `SHADER_F16`,
    /// packed otherwise, unless set here.
    pub fn half_form(&self) -> HalfForm {
        match self.half_override {
            Some(f) => f,
            None if self.has_native_f16() => HalfForm::Native,
            None => HalfForm::Packed,
        }
    }

    /// Forces the f16 storage form of plans made from now on (`None`: the device's default).
    /// Forcing [`HalfForm::Native`] on a device without `SHADER_F16` is accepted here and refused,
    /// as unavailable, by a plan that stores an f16 tensor.
    pub fn set_half_form(&mut self, form: Option<HalfForm>) {
        self.half_override = form;
    }

    /// The arithmetic of P·V in the fused kernel's row form and in decode for plans made from
    /// now on: [`crate::Accumulation::F32`] unless set with [`Context::set_accumulation`]. The
    /// score-tile forms ([`Context::set_score_tile`]) keep their own (f32 accumulation of f16
    /// products).
    pub fn accumulation(&self) -> crate::dtype::Accumulation {
        self.accumulation
    }

    /// Sets the arithmetic of P·V for plans made from now on. [`crate::Accumulation::F16`]
    /// (f16 weights, V and accumulators; a precision choice, see its docs) needs `SHADER_F16`,
    /// else an [`Error::Unavailable`] naming `accumulation`. No heuristic and no `posattn tune`
    /// chooses it: `posattn bench --accumulate f32,f16` measures what it buys on an adapter.
    pub fn set_accumulation(&mut self, acc: crate::dtype::Accumulation) -> Result<()> {
        if acc == crate::dtype::Accumulation::F16 && !self.has_native_f16() {
            return Err(Error::unavailable(
                "accumulation",
                "f16 (P·V in f16 arithmetic)",
                "f32 only (the device has no SHADER_F16)",
            ));
        }
        self.accumulation = acc;
        Ok(())
    }

    /// Sets the longest wait for one submission.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether GPU time can be read with timestamp queries written between commands.
    pub fn has_timestamps(&self) -> bool {
        self.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// Errors that reached the uncaptured handler of a device this crate opened.
    pub fn take_uncaptured_errors(&self) -> Vec<String> {
        self.uncaptured
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes and returns the first
    /// error wgpu reported, tagged with `during`.
    pub(crate) fn scoped<R>(&self, during: &'static str, f: impl FnOnce() -> R) -> Result<R> {
        crate::error::scoped(&self.device, during, f)
    }

    /// [`Context::scoped`] with the scopes popped asynchronously.
    pub(crate) async fn scoped_async<R>(
        &self,
        during: &'static str,
        f: impl FnOnce() -> R,
    ) -> Result<R> {
        crate::error::scoped_async(&self.device, during, f).await
    }

    /// The pipeline for `key`, compiled on first use and cached for the context's lifetime.
    #[cfg_attr(not(feature = "harness"), allow(dead_code))]
    pub(crate) fn pipeline(&self, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        self.pipelines.get(&self.device, key, None)
    }

    /// [`Context::pipeline`] with the compile's error scopes popped asynchronously.
    pub(crate) async fn pipeline_async(&self, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        self.pipelines.get_async(&self.device, key, None).await
    }

    /// The pipeline for `key`, which may be a custom scheme's variant, with the compile's error
    /// scopes popped asynchronously.
    pub(crate) async fn pipeline_with_async(
        &self,
        key: KernelKey,
        custom: Option<&crate::encoding::custom::CheckedScheme>,
    ) -> Result<wgpu::ComputePipeline> {
        self.pipelines.get_async(&self.device, key, custom).await
    }

    /// Kernels this context has compiled so far, and the wall time their pipeline creation took
    /// (where the driver compiles them): the compile share of a run's time.
    pub fn compile_stats(&self) -> (usize, std::time::Duration) {
        self.pipelines.compile_stats()
    }

    /// The bind-group layout every kernel of `family` uses.
    pub(crate) fn bind_group_layout(&self, family: Family) -> &wgpu::BindGroupLayout {
        self.pipelines.bind_group_layout(family)
    }

    /// The bind-group layout of the fused kernels that write the log-sum-exp, or an
    /// [`Error::Unavailable`] when the device binds too few storage buffers per stage.
    pub(crate) fn lse_bind_group_layout(&self) -> Result<&wgpu::BindGroupLayout> {
        self.pipelines.lse_bind_group_layout(&self.device)
    }

    /// The bind-group layout of the decode kernels with the caller's bias, or an
    /// [`Error::Unavailable`] when the device binds too few storage buffers per stage.
    pub(crate) fn decode_bias_bind_group_layout(&self) -> Result<&wgpu::BindGroupLayout> {
        self.pipelines.decode_bias_bind_group_layout(&self.device)
    }

    /// Waits for `submission`, at most `self.timeout`.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn wait(&self, submission: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: Some(self.timeout),
            })
            .map(|_| ())
            .map_err(|e| match e {
                wgpu::PollError::Timeout => Error::Timeout(self.timeout),
                other => Error::Device {
                    during: "waiting for the device",
                    message: other.to_string(),
                },
            })
    }

    /// A buffer holding `contents`: created empty and filled by a queue write. (wgpu's
    /// `create_buffer_init` maps at creation and panics when the device is lost; this way a
    /// lost device is an error in the caller's error scope instead.)
    pub(crate) fn buffer_init(
        &self,
        label: &str,
        contents: &[u8],
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        let align = wgpu::COPY_BUFFER_ALIGNMENT as usize;
        let padded = contents.len().div_ceil(align).max(1) * align;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded as u64,
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if padded == contents.len() {
            self.queue.write_buffer(&buffer, 0, contents);
        } else {
            let mut bytes = contents.to_vec();
            bytes.resize(padded, 0);
            self.queue.write_buffer(&buffer, 0, &bytes);
        }
        buffer
    }

    /// Copies the first `size` bytes of `src` (which needs `BufferUsages::COPY_SRC`) back to the
    /// host: a copy into a staging buffer, submitted, then mapped. Waits at most the context's
    /// timeout.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_buffer(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        pollster::block_on(self.read_buffer_async(src, size))
    }

    /// [`Context::read_buffer`] as a future. The map callback resolves it: on the web the browser
    /// runs the callback when the copy is done; on native wgpu runs it from `Device::poll`, which
    /// this future calls itself (waiting at most the context's timeout), so it needs no executor
    /// of its own.
    pub async fn read_buffer_async(&self, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let need = size.div_ceil(wgpu::COPY_BUFFER_ALIGNMENT) * wgpu::COPY_BUFFER_ALIGNMENT;
        if !src.usage().contains(wgpu::BufferUsages::COPY_SRC) || src.size() < need {
            return Err(Error::invalid(
                "src",
                format!("a COPY_SRC buffer of at least {need} bytes"),
                format!("{} bytes, usage {:?}", src.size(), src.usage()),
            ));
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("posattn readback"),
            size: need,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("posattn readback"),
            });
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, need);
        #[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
        let sub = self.queue.submit([enc.finish()]);
        let (tx, rx) = oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| tx.send(r));
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.wait(sub)?;
            // After the wait the callback has run; if not, the future below would never resolve.
            if !rx.is_ready() {
                return Err(Error::Timeout(self.timeout));
            }
        }
        match rx.await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(Error::Device {
                    during: "mapping a readback buffer",
                    message: e.to_string(),
                });
            }
            None => {
                return Err(Error::Device {
                    during: "mapping a readback buffer",
                    message: "the map callback was dropped without being called".into(),
                });
            }
        }
        let mut bytes = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device {
                during: "reading a mapped buffer",
                message: e.to_string(),
            })?
            .to_vec();
        staging.unmap();
        bytes.truncate(size as usize);
        Ok(bytes)
    }
}

/// A one-value channel whose receiver is a future: what a wgpu callback (buffer mapping) sends is
/// awaited without an executor-specific channel.
mod oneshot {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    struct Slot<T> {
        value: Option<T>,
        waker: Option<Waker>,
        /// The sender is gone (sent or dropped).
        closed: bool,
    }

    pub struct Sender<T>(Arc<Mutex<Slot<T>>>);
    pub struct Receiver<T>(Arc<Mutex<Slot<T>>>);

    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let slot = Arc::new(Mutex::new(Slot {
            value: None,
            waker: None,
            closed: false,
        }));
        (Sender(slot.clone()), Receiver(slot))
    }

    impl<T> Sender<T> {
        pub fn send(self, value: T) {
            if let Ok(mut s) = self.0.lock() {
                s.value = Some(value);
            }
            // Drop wakes the receiver.
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            let waker = match self.0.lock() {
                Ok(mut s) => {
                    s.closed = true;
                    s.waker.take()
                }
                Err(_) => None,
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    impl<T> Receiver<T> {
        /// Whether awaiting now resolves at once (a value was sent or the sender is gone).
        #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
        pub fn is_ready(&self) -> bool {
            self.0.lock().map(|s| s.closed).unwrap_or(true)
        }
    }

    /// Resolves to the value sent, or `None` when the sender was dropped without sending.
    impl<T> Future for Receiver<T> {
        type Output = Option<T>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            let Ok(mut s) = self.0.lock() else {
                return Poll::Ready(None);
            };
            if let Some(v) = s.value.take() {
                return Poll::Ready(Some(v));
            }
            if s.closed {
                return Poll::Ready(None);
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod block_q_tests {
    use super::block_q_rule;
    use crate::{AttentionSpec, Window};
    use wgpu::{Backend, DeviceType};

    fn causal(seq: u32) -> AttentionSpec {
        AttentionSpec::default().with_seq_len(seq).with_heads(8)
    }

    #[test]
    fn long_rows_take_256_row_blocks_on_vulkan_cpu_adapters_only() {
        let cpu = |spec: &AttentionSpec, threads| {
            block_q_rule(DeviceType::Cpu, Backend::Vulkan, spec, threads)
        };
        // Causal: 1024 visible keys per row on average from 2048 tokens.
        assert_eq!(cpu(&causal(1024), 2), 128);
        assert_eq!(cpu(&causal(2048), 2), 256);
        assert_eq!(cpu(&causal(8192), 2), 256);
        // Bidirectional rows see every key.
        let bidir = causal(1024).with_causal(false);
        assert_eq!(cpu(&bidir, 2), 256);
        // A window caps the keys per row whatever the length.
        let window = causal(8192).with_window(Window::recent(512));
        assert_eq!(cpu(&window, 2), 128);
        // Few query rows against a long cache: no 256-row block to fill.
        let short_q = AttentionSpec::default()
            .with_seq_q(200)
            .with_seq_k(8192)
            .with_heads(8);
        assert_eq!(cpu(&short_q, 2), 128);
        // Too few workgroups for the threads: 8 heads × 8 blocks = 64 < 2 × 64.
        assert_eq!(cpu(&causal(2048), 64), 128);
        // Other adapters.
        assert_eq!(
            block_q_rule(DeviceType::Cpu, Backend::Gl, &causal(8192), 2),
            128
        );
        for t in [DeviceType::DiscreteGpu, DeviceType::IntegratedGpu] {
            assert_eq!(block_q_rule(t, Backend::Vulkan, &causal(8192), 2), 64);
        }
    }
}
