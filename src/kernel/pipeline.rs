//! Bind-group layouts (from the contract's tables) and the pipeline cache of one device.

use std::collections::HashMap;
use std::sync::Mutex;

use super::abi::Family;
use super::variants::KernelKey;
use crate::encoding::custom::{CheckedScheme, parse_and_validate};
use crate::error::{Error, Result, scoped, scoped_async};

/// A custom scheme's variant composed and validated with naga (no device involved).
pub(crate) fn compose_checked(key: &KernelKey, custom: &CheckedScheme) -> Result<String> {
    let source = key
        .try_wgsl_with(Some(&custom.hooks_wgsl()))
        .map_err(|e| Error::Device {
            during: "composing a kernel",
            message: format!("{}: {e}", key.name()),
        })?;
    // The snippet is the module's tail.
    let lines = custom.snippet.lines().count() as u32;
    let total = source.lines().count() as u32;
    parse_and_validate(
        &source,
        total - lines + 1,
        lines,
        "position.wgsl",
        naga_capabilities(key),
    )?;
    Ok(source)
}

/// The naga capabilities a variant's module needs: f16 conversions in f32 code for half
/// storage, f16 itself for native f16, subgroup operations for the decode kernel's subgroup
/// forms.
pub fn naga_capabilities(key: &KernelKey) -> naga::valid::Capabilities {
    use naga::valid::Capabilities;
    let mut caps = Capabilities::empty();
    if key
        .storage
        .iter()
        .any(|s| *s != super::storage::StorageForm::F32)
    {
        caps |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    if key.native_f16() {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if key.uses_subgroups() {
        caps |= Capabilities::SUBGROUP;
    }
    // The emulated score tile rounds with quantizeToF16 (an f16 conversion in f32 code).
    if key.scores.half_operands() && !key.scores.coop() {
        caps |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    if key.scores.coop() {
        caps |= Capabilities::SHADER_FLOAT16
            | Capabilities::COOPERATIVE_MATRIX
            | Capabilities::SUBGROUP;
    }
    caps
}

struct FamilyLayout {
    bind_group: wgpu::BindGroupLayout,
    pipeline: wgpu::PipelineLayout,
}

/// The layouts of both kernel families and every pipeline compiled so far.
pub(crate) struct Pipelines {
    fused: FamilyLayout,
    unfused: FamilyLayout,
    decode: FamilyLayout,
    /// The fused layout plus `lse_buf`, where the device allows that many storage buffers.
    fused_lse: Option<FamilyLayout>,
    lse_storage_buffers: u32,
    /// The decode layout plus `user_bias`, where the device allows that many storage buffers.
    decode_bias: Option<FamilyLayout>,
    decode_bias_storage_buffers: u32,
    cache: Mutex<HashMap<KernelKey, wgpu::ComputePipeline>>,
    /// Kernels compiled so far and the time their compilation took (native only).
    compiled: Mutex<(usize, std::time::Duration)>,
}

impl Pipelines {
    pub fn new(device: &wgpu::Device) -> Self {
        // The layouts of a table of bindings.
        let layout = |bindings: &[super::abi::Binding], label: &'static str| {
            let bind_group = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries: &super::abi::layout_entries(bindings),
            });
            let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(&bind_group)],
                immediate_size: 0,
            });
            FamilyLayout {
                bind_group,
                pipeline,
            }
        };
        let make = |family: Family, label| layout(family.bindings(), label);
        // The log-sum-exp variants bind one storage buffer more than the others (nine).
        let lse_bindings = KernelKey::fused(64, 1, super::abi::PosKind::None)
            .with_lse()
            .bindings();
        // A layout for a variant's own bindings, where the device allows its storage buffers.
        let extra = |bindings: &[super::abi::Binding], label: &'static str| {
            let storage = bindings
                .iter()
                .filter(|b| {
                    !matches!(
                        b.access,
                        super::abi::Access::Uniform | super::abi::Access::DecodeUniform
                    )
                })
                .count() as u32;
            let fits = device.limits().max_storage_buffers_per_shader_stage >= storage;
            (fits.then(|| layout(bindings, label)), storage)
        };
        let (fused_lse, storage) = extra(&lse_bindings, "posattn fused lse");
        // The decode variants with the caller's bias bind one more storage buffer too (nine).
        let bias_bindings = KernelKey::decode(64, 1, super::abi::PosKind::None)
            .with_bias(true)
            .bindings();
        let (decode_bias, decode_bias_storage_buffers) =
            extra(&bias_bindings, "posattn decode bias");
        Pipelines {
            fused: make(Family::Fused, "posattn fused"),
            unfused: make(Family::Unfused, "posattn unfused"),
            decode: make(Family::Decode, "posattn decode"),
            fused_lse,
            lse_storage_buffers: storage,
            decode_bias,
            decode_bias_storage_buffers,
            cache: Mutex::new(HashMap::new()),
            compiled: Mutex::new((0, std::time::Duration::ZERO)),
        }
    }

    fn layout(&self, family: Family) -> &FamilyLayout {
        match family {
            Family::Fused => &self.fused,
            Family::Unfused => &self.unfused,
            Family::Decode => &self.decode,
        }
    }

    /// The layout of the log-sum-exp variants, or why the device cannot bind them.
    fn lse_layout(&self, device: &wgpu::Device) -> Result<&FamilyLayout> {
        self.fused_lse.as_ref().ok_or_else(|| {
            Error::unavailable(
                "storage buffers per shader stage (lse output)",
                self.lse_storage_buffers,
                device.limits().max_storage_buffers_per_shader_stage,
            )
        })
    }

    /// The layout of the decode variants with the caller's bias, or why the device cannot bind
    /// them.
    fn decode_bias_layout(&self, device: &wgpu::Device) -> Result<&FamilyLayout> {
        self.decode_bias.as_ref().ok_or_else(|| {
            Error::unavailable(
                "storage buffers per shader stage (decode with a caller bias)",
                self.decode_bias_storage_buffers,
                device.limits().max_storage_buffers_per_shader_stage,
            )
        })
    }

    /// The bind-group layout of the decode variants with the caller's bias.
    pub fn decode_bias_bind_group_layout(
        &self,
        device: &wgpu::Device,
    ) -> Result<&wgpu::BindGroupLayout> {
        Ok(&self.decode_bias_layout(device)?.bind_group)
    }

    /// The bind-group layout of the log-sum-exp variants.
    pub fn lse_bind_group_layout(&self, device: &wgpu::Device) -> Result<&wgpu::BindGroupLayout> {
        Ok(&self.lse_layout(device)?.bind_group)
    }

    pub fn bind_group_layout(&self, family: Family) -> &wgpu::BindGroupLayout {
        &self.layout(family).bind_group
    }

    /// The pipeline for `key`, compiled on first use. A custom scheme's variant comes with its
    /// hooks (`CheckedScheme`); its composed module is validated with naga before any pipeline
    /// is made, and an error inside the snippet names the snippet's line. (On the web this
    /// synchronous form cannot read the compile's error scopes; see `error::scoped`.)
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: KernelKey,
        custom: Option<&CheckedScheme>,
    ) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.cached(&key) {
            return Ok(p);
        }
        let (name, source, layout) = self.prepare(device, &key, custom)?;
        let start = clock();
        let pipeline = scoped(device, "compiling a kernel", || {
            create(device, &key, &name, source, layout)
        })?;
        self.record(start);
        Ok(self.insert(key, pipeline))
    }

    /// [`Pipelines::get`] with the compile's error scopes popped asynchronously.
    pub async fn get_async(
        &self,
        device: &wgpu::Device,
        key: KernelKey,
        custom: Option<&CheckedScheme>,
    ) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.cached(&key) {
            return Ok(p);
        }
        let (name, source, layout) = self.prepare(device, &key, custom)?;
        let start = clock();
        let pipeline = scoped_async(device, "compiling a kernel", || {
            create(device, &key, &name, source, layout)
        })
        .await?;
        self.record(start);
        Ok(self.insert(key, pipeline))
    }

    /// Counts one compiled kernel and, natively, the time since `start`.
    fn record(&self, start: Option<Clock>) {
        let mut c = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        c.0 += 1;
        if let Some(s) = start {
            c.1 += s.elapsed();
        }
    }

    /// Kernels compiled so far and the wall time their creation took (shader module and
    /// pipeline, where the driver compiles; zero on wasm32, which has no clock here).
    pub fn compile_stats(&self) -> (usize, std::time::Duration) {
        *self.compiled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, key: &KernelKey) -> Option<wgpu::ComputePipeline> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).cloned()
    }

    fn insert(&self, key: KernelKey, pipeline: wgpu::ComputePipeline) -> wgpu::ComputePipeline {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(key).or_insert(pipeline).clone()
    }

    /// The variant's name, composed source and pipeline layout.
    fn prepare(
        &self,
        device: &wgpu::Device,
        key: &KernelKey,
        custom: Option<&CheckedScheme>,
    ) -> Result<(String, String, &wgpu::PipelineLayout)> {
        let name = key.name();
        let source = match custom {
            Some(c) => compose_checked(key, c)?,
            None => key.try_wgsl().map_err(|e| Error::Device {
                during: "composing a kernel",
                message: format!("{name}: {e}"),
            })?,
        };
        let layout = if key.lse {
            &self.lse_layout(device)?.pipeline
        } else if key.bias && key.family() == Family::Decode {
            &self.decode_bias_layout(device)?.pipeline
        } else {
            &self.layout(key.family()).pipeline
        };
        Ok((name, source, layout))
    }
}

type Clock = std::time::Instant;

/// The start of a compile, natively; none on wasm32, where std's clock panics.
fn clock() -> Option<Clock> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        Some(std::time::Instant::now())
    }
    #[cfg(target_arch = "wasm32")]
    {
        None
    }
}

fn create(
    device: &wgpu::Device,
    key: &KernelKey,
    name: &str,
    source: String,
    layout: &wgpu::PipelineLayout,
) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(layout),
        module: &module,
        entry_point: Some(key.entry_point()),
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: !key.writes_workgroup_memory_first(),
            ..Default::default()
        },
        cache: None,
    })
}
