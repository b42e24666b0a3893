//! Set-up shared by the benchmarks: seeded device tensors for a spec, and adapter tags.

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use posattn::harness::check::SplitMix;
use posattn::{AttentionBuffers, AttentionSpec, Context, ContextOptions, enumerate_adapters};
use wgpu::util::DeviceExt;

pub struct Setup {
    #[allow(dead_code)]
    pub spec: AttentionSpec,
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub out: wgpu::Buffer,
}

// Not every benchmark uses every helper (each bench compiles this module on its own).
#[allow(dead_code)]
impl Setup {
    /// Seeded q, k, v (uniform in [-1, 1)) and an output buffer for `spec`.
    pub fn new(ctx: &Context, spec: AttentionSpec) -> Self {
        let mut rng = SplitMix::new(spec.seq_q as u64);
        let mk = |data: Vec<f32>| {
            ctx.device()
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&data),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let q = mk(rng.vec(spec.q_len(), 1.0));
        let k = mk(rng.vec(spec.kv_len(), 1.0));
        let v = mk(rng.vec(spec.kv_len(), 1.0));
        let out = mk(vec![0.0; spec.q_len()]);
        Setup { spec, q, k, v, out }
    }

    pub fn bufs(&self) -> AttentionBuffers<'_> {
        AttentionBuffers::new(&self.q, &self.k, &self.v, &self.out)
    }

    #[allow(dead_code)]
    pub fn io_bytes(&self) -> u64 {
        self.q.size() + self.k.size() + self.v.size() + self.out.size()
    }
}

/// A short tag for the adapter, e.g. `llvmpipe-vulkan`.
pub fn short_name(ctx: &Context) -> String {
    let i = ctx.adapter_info();
    let name: String = i
        .name
        .split_whitespace()
        .next()
        .unwrap_or("adapter")
        .to_lowercase();
    format!("{name}-{:?}", i.backend).to_lowercase()
}

/// The causal RoPE problem both benchmarks measure: batch 1, 8 heads, head_dim 64.
#[allow(dead_code)]
pub fn rope_causal(seq: u32) -> AttentionSpec {
    AttentionSpec::default()
        .with_seq_len(seq)
        .with_heads(8)
        .with_position(posattn::PositionEncoding::Rope(posattn::Rope::new(10000.0)))
}

/// A context on every adapter present (`WGPU_BACKEND` / `WGPU_ADAPTER_NAME` select); adapters
/// that fail to open are reported and left out.
pub fn contexts() -> Vec<Context> {
    enumerate_adapters(&ContextOptions::default())
        .iter()
        .filter_map(|a| match Context::from_adapter(a) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("skipping an adapter that failed to open: {e}");
                None
            }
        })
        .collect()
}

/// A criterion group sized for slow adapters: 10 samples, 3 s.
pub fn group<'a>(c: &'a mut Criterion, name: String) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group
}
