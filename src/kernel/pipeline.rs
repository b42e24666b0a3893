//! Bind-group layouts (from the contract's tables) and the pipeline cache of one device.

use std::collections::HashMap;
use std::sync::Mutex;

use super::abi::Family;
use super::variants::KernelKey;
use crate::encoding::custom::{CheckedScheme, parse_and_validate};
use crate::error::{Error, Result, scoped};

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
    parse_and_validate(&source, total - lines + 1, lines, "position.wgsl")?;
    Ok(source)
}

struct FamilyLayout {
    bind_group: wgpu::BindGroupLayout,
    pipeline: wgpu::PipelineLayout,
}

/// The layouts of both kernel families and every pipeline compiled so far.
pub(crate) struct Pipelines {
    fused: FamilyLayout,
    unfused: FamilyLayout,
    cache: Mutex<HashMap<KernelKey, wgpu::ComputePipeline>>,
}

impl Pipelines {
    pub fn new(device: &wgpu::Device) -> Self {
        let make = |family: Family, label| {
            let bind_group = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries: &family.layout_entries(),
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
        Pipelines {
            fused: make(Family::Fused, "posattn fused"),
            unfused: make(Family::Unfused, "posattn unfused"),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn layout(&self, family: Family) -> &FamilyLayout {
        match family {
            Family::Fused => &self.fused,
            Family::Unfused => &self.unfused,
        }
    }

    pub fn bind_group_layout(&self, family: Family) -> &wgpu::BindGroupLayout {
        &self.layout(family).bind_group
    }

    /// The pipeline for `key`, compiled on first use. A custom scheme's variant comes with its
    /// hooks (`CheckedScheme`); its composed module is validated with naga before any pipeline
    /// is made, and an error inside the snippet names the snippet's line.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: KernelKey,
        custom: Option<&CheckedScheme>,
    ) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.cache.lock().expect("pipeline cache").get(&key) {
            return Ok(p.clone());
        }
        let name = key.name();
        let source = match custom {
            Some(c) => compose_checked(&key, c)?,
            None => key.try_wgsl().map_err(|e| Error::Device {
                during: "composing a kernel",
                message: format!("{name}: {e}"),
            })?,
        };
        let layout = &self.layout(key.family()).pipeline;
        let pipeline = scoped(device, "compiling a kernel", || {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&name),
                layout: Some(layout),
                module: &module,
                entry_point: Some(key.entry_point()),
                compilation_options: Default::default(),
                cache: None,
            })
        })?;
        self.cache
            .lock()
            .expect("pipeline cache")
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
