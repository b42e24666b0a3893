//! A plain wgpu application that owns its device and runs a small two-layer transformer (pre-norm
//! blocks: RMSNorm, Q/K/V projections, causal RoPE attention with GQA, output projection and
//! residual, RMSNorm, SiLU MLP and residual) with its own WGSL passes, and this crate's attention
//! recorded into the same encoder and the same compute pass (`encode_in_pass`):
//!
//! 1. a prefill of the prompt through [`posattn::Attention`], whose K and V rows are appended to
//!    one [`posattn::KvCache`] per layer;
//! 2. decode steps, one token each, through [`posattn::DecodePlan`] against those caches (split
//!    over two key chunks, so the split-KV reduce runs as a second dispatch in the application's
//!    pass).
//!
//! The queries and the MLP's hidden activations live in one arena buffer at aligned offsets,
//! bound as ranges (`wgpu::BufferBinding`); the weights live in another. Every buffer set is
//! seen once during the prefill and first step, so the steps after create no bind group.
//!
//! The final hidden state of the last token is compared with a host reference: the same model
//! over the whole sequence in f64 (causal attention by `posattn::harness::reference`, the crate's
//! own reference). Tolerance: max |gpu − ref| ≤ 1e-5 · max(1, max |ref|), about 84 f32 ulps at
//! unit scale: each f32 sum of at most 512 unit-scale products carries about √512 · 2⁻²⁴ ≈ 1.3e-6
//! relative error, and the two blocks measure 7e-7 relative on lavapipe; the bound leaves 14×
//! headroom and still catches a RoPE base off by one part in 10⁴ (6.5e-5 there). The program
//! exits non-zero beyond it (or on any error).
//!
//! Run: `cargo run --release --example embed` (`WGPU_BACKEND=vulkan` or `gl` picks a backend).

use posattn::harness::check::SplitMix;
use posattn::harness::reference;
use posattn::{
    Attention, AttentionBuffers, AttentionSpec, Context, DecodePlan, DecodeSpec, KvCache,
    PositionEncoding, Rope,
};

const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const HEAD_DIM: u32 = 64;
const D: u32 = HEADS * HEAD_DIM; // model width, 256
const DKV: u32 = KV_HEADS * HEAD_DIM; // 128
const FF: u32 = 2 * D; // MLP width, 512
const LAYERS: usize = 2;
const PROMPT: u32 = 24;
const STEPS: u32 = 8;
const CAPACITY: u32 = PROMPT + STEPS;
const TOLERANCE: f64 = 1e-5;
const EPS: f32 = 1e-5;

/// The application's own kernels: a row-major matmul with three epilogues, and RMSNorm.
const WGSL: &str = r#"
struct Mm { m: u32, n: u32, k: u32, mode: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;        // [m, k]
@group(0) @binding(1) var<storage, read> w: array<f32>;        // [k, n]
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // [m, n]
@group(0) @binding(3) var<uniform> p: Mm;

// mode 0: y = x w; 1: y += x w (residual); 2: y = silu(x w)
@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) g: vec3<u32>) {
    let col = g.x;
    let row = g.y;
    if (col >= p.n || row >= p.m) { return; }
    var acc = 0.0;
    for (var i = 0u; i < p.k; i++) {
        acc += x[row * p.k + i] * w[i * p.n + col];
    }
    let at = row * p.n + col;
    if (p.mode == 1u) {
        y[at] = y[at] + acc;
    } else if (p.mode == 2u) {
        y[at] = acc / (1.0 + exp(-acc));
    } else {
        y[at] = acc;
    }
}

// RMSNorm without a gain: y = x / sqrt(mean(x^2) + eps), one invocation per row (m rows of k).
@compute @workgroup_size(64)
fn rmsnorm(@builtin(global_invocation_id) g: vec3<u32>) {
    let row = g.x;
    if (row >= p.m) { return; }
    var ss = 0.0;
    for (var i = 0u; i < p.k; i++) {
        let v = x[row * p.k + i];
        ss += v * v;
    }
    let r = inverseSqrt(ss / f32(p.k) + bitcast<f32>(p.mode));
    for (var i = 0u; i < p.k; i++) {
        y[row * p.k + i] = x[row * p.k + i] * r;
    }
}
"#;

/// Weights of one layer, row-major [in, out].
struct Layer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
}

impl Layer {
    fn new(rng: &mut SplitMix) -> Self {
        // Uniform in ±√(3/in): unit variance in, unit variance out.
        let mut m = |i: u32, o: u32| rng.vec((i * o) as usize, (3.0 / i as f32).sqrt());
        Layer {
            wq: m(D, D),
            wk: m(D, DKV),
            wv: m(D, DKV),
            wo: m(D, D),
            w1: m(D, FF),
            w2: m(FF, D),
        }
    }

    fn mats(&self) -> [&[f32]; 6] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w1, &self.w2]
    }
}

fn whole(b: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    b.as_entire_buffer_binding()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("embed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The application's device, opened the way any wgpu program opens one (on the adapter the
    // crate ranks first: real GPUs before software ones, `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`
    // honoured).
    let adapter = posattn::enumerate_adapters(&posattn::ContextOptions::from_env()?)
        .into_iter()
        .next()
        .ok_or("no adapter")?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("embed"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    // The crate shares it; it reads the kernel shape from the device itself.
    let ctx = Context::from_device(device.clone(), queue.clone());
    println!("device: {}", ctx.describe());

    let mut rng = SplitMix::new(14);
    let layers: Vec<Layer> = (0..LAYERS).map(|_| Layer::new(&mut rng)).collect();
    let tokens = rng.vec(((PROMPT + STEPS) * D) as usize, 1.0);

    // Weights in one buffer, each matrix at an aligned offset.
    let align = device.limits().min_storage_buffer_offset_alignment as u64;
    let up = |n: u64| n.div_ceil(align) * align;
    let mut weight_at = vec![];
    let mut at = 0;
    for l in &layers {
        for m in l.mats() {
            weight_at.push((at, m.len() as u64 * 4));
            at = up(at + m.len() as u64 * 4);
        }
    }
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let buffer = |label, size: u64, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let weights = buffer("weights", at, storage);
    for (i, m) in layers.iter().flat_map(|l| l.mats()).enumerate() {
        queue.write_buffer(&weights, weight_at[i].0, bytemuck::cast_slice(m));
    }
    let w = |layer: usize, i: usize| {
        let (offset, size) = weight_at[layer * 6 + i];
        wgpu::BufferBinding {
            buffer: &weights,
            offset,
            size: wgpu::BufferSize::new(size),
        }
    };

    // Activations, sized for the prompt (a decode step uses the first row). Queries and the
    // MLP's hidden layer share an arena; K and V have their own buffers, since the caches copy
    // from them; the attention output has its own, since a written buffer is bound alone.
    let rows = PROMPT as u64;
    let x = buffer(
        "x",
        rows * D as u64 * 4,
        storage | wgpu::BufferUsages::COPY_SRC,
    );
    let xn = buffer("xn", rows * D as u64 * 4, storage);
    let k = buffer(
        "k",
        rows * DKV as u64 * 4,
        storage | wgpu::BufferUsages::COPY_SRC,
    );
    let v = buffer(
        "v",
        rows * DKV as u64 * 4,
        storage | wgpu::BufferUsages::COPY_SRC,
    );
    let attn = buffer("attention out", rows * D as u64 * 4, storage);
    let (q_at, q_size) = (0, rows * D as u64 * 4);
    let (h_at, h_size) = (up(q_size), rows * FF as u64 * 4);
    let arena = buffer("arena", h_at + h_size, storage);
    let range = |offset, size| wgpu::BufferBinding {
        buffer: &arena,
        offset,
        size: wgpu::BufferSize::new(size),
    };
    let (q, h) = (range(q_at, q_size), range(h_at, h_size));

    // The crate's plans: prefill over the prompt, decode with one new token per step.
    let rope = PositionEncoding::Rope(Rope::default());
    let prefill_spec = AttentionSpec::default()
        .with_seq_len(PROMPT)
        .with_heads(HEADS)
        .with_kv_heads(KV_HEADS)
        .with_head_dim(HEAD_DIM)
        .with_position(rope.clone());
    let prefill = Attention::new(&ctx, &prefill_spec)?;
    // max_q = PROMPT so that the prompt's K and V rows append in one call.
    let decode_spec = DecodeSpec::new(prefill_spec.clone().with_seq_q(PROMPT).with_seq_k(CAPACITY))
        .with_splits(2);
    let decode = DecodePlan::new(&ctx, &decode_spec)?;
    let mut caches = (0..LAYERS)
        .map(|_| KvCache::new(&ctx, &decode))
        .collect::<Result<Vec<_>, _>>()?;

    // The application's pipelines and bind groups, made once.
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("embed kernels"),
        source: wgpu::ShaderSource::Wgsl(WGSL.into()),
    });
    // One layout for both entry points: x, w (read), y (written), parameters.
    let storage_entry = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("embed"),
        entries: &[
            storage_entry(0, true),
            storage_entry(1, true),
            storage_entry(2, false),
            wgpu::BindGroupLayoutEntry {
                binding: 3,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
        ],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("embed"),
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    let pipeline = |entry| {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let (matmul, rmsnorm) = (pipeline("matmul"), pipeline("rmsnorm"));
    let uniform = |m: u32, n: u32, k: u32, mode: u32| {
        let b = buffer(
            "params",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        queue.write_buffer(&b, 0, bytemuck::cast_slice(&[m, n, k, mode]));
        b
    };
    let group = |x: wgpu::BufferBinding,
                 w: wgpu::BufferBinding,
                 y: wgpu::BufferBinding,
                 u: &wgpu::Buffer| {
        let entries = [x, w, y, whole(u)]
            .into_iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b),
            })
            .collect::<Vec<_>>();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &bgl,
            entries: &entries,
        })
    };
    /// One phase's recorded steps (prefill: PROMPT rows; decode: 1 row).
    struct Phase {
        rows: u32,
        norm: wgpu::BindGroup,
        /// Per layer: q, k, v, o (+residual), w1 (silu), w2 (+residual).
        mm: Vec<[(wgpu::BindGroup, [u32; 3]); 6]>,
    }
    let phase = |m: u32| -> Phase {
        // RMSNorm reads x, writes xn; eps travels in the mode word.
        let norm_u = uniform(m, 0, D, EPS.to_bits());
        // A second entry point reading the same layout: w is bound but unused.
        let norm = group(whole(&x), w(0, 0), whole(&xn), &norm_u);
        let mm = (0..LAYERS)
            .map(|l| {
                let mk = |x: wgpu::BufferBinding,
                          i: usize,
                          y: wgpu::BufferBinding,
                          n: u32,
                          kk: u32,
                          mode: u32| {
                    let u = uniform(m, n, kk, mode);
                    (group(x, w(l, i), y, &u), [n.div_ceil(64), m, 1])
                };
                [
                    mk(whole(&xn), 0, q.clone(), D, D, 0),
                    mk(whole(&xn), 1, whole(&k), DKV, D, 0),
                    mk(whole(&xn), 2, whole(&v), DKV, D, 0),
                    mk(whole(&attn), 3, whole(&x), D, D, 1),
                    mk(whole(&xn), 4, h.clone(), FF, D, 2),
                    mk(h.clone(), 5, whole(&x), D, FF, 1),
                ]
            })
            .collect();
        Phase { rows: m, norm, mm }
    };
    let (pre, dec) = (phase(PROMPT), phase(1));
    let dispatch = |pass: &mut wgpu::ComputePass,
                    p: &wgpu::ComputePipeline,
                    g: &wgpu::BindGroup,
                    grid: [u32; 3]| {
        pass.set_pipeline(p);
        pass.set_bind_group(0, g, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    };
    let norm = |pass: &mut wgpu::ComputePass, ph: &Phase| {
        dispatch(pass, &rmsnorm, &ph.norm, [ph.rows.div_ceil(64), 1, 1]);
    };
    let poison = vec![f32::NAN; (rows * D as u64) as usize];

    // Prefill: per layer one pass (norm, Q/K/V, the crate's attention, O + residual, norm, MLP
    // + residual), then the layer's K and V rows appended to its cache.
    queue.write_buffer(
        &x,
        0,
        bytemuck::cast_slice(&tokens[..(PROMPT * D) as usize]),
    );
    let mut enc = device.create_command_encoder(&Default::default());
    for (l, cache) in caches.iter_mut().enumerate() {
        let mm = &pre.mm[l];
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            norm(&mut pass, &pre);
            for (g, grid) in &mm[..3] {
                dispatch(&mut pass, &matmul, g, *grid);
            }
            let bufs = AttentionBuffers::new(q.clone(), &k, &v, &attn);
            prefill.encode_in_pass(&ctx, &mut pass, &bufs)?;
            dispatch(&mut pass, &matmul, &mm[3].0, mm[3].1);
            norm(&mut pass, &pre);
            dispatch(&mut pass, &matmul, &mm[4].0, mm[4].1);
            dispatch(&mut pass, &matmul, &mm[5].0, mm[5].1);
        }
        cache.append(&ctx, &mut enc, &k, &v, &[PROMPT], None)?;
    }
    queue.write_buffer(&attn, 0, bytemuck::cast_slice(&poison));
    queue.submit([enc.finish()]);

    // Decode: one token per step. The copies into the caches sit between two passes per layer.
    for step in 0..STEPS {
        let t = (PROMPT + step) as usize;
        queue.write_buffer(
            &x,
            0,
            bytemuck::cast_slice(&tokens[t * D as usize..(t + 1) * D as usize]),
        );
        // The attention output starts as NaN: a row the kernel fails to write shows.
        queue.write_buffer(&attn, 0, bytemuck::cast_slice(&poison));
        let mut enc = device.create_command_encoder(&Default::default());
        for (l, cache) in caches.iter_mut().enumerate() {
            let mm = &dec.mm[l];
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                norm(&mut pass, &dec);
                for (g, grid) in &mm[..3] {
                    dispatch(&mut pass, &matmul, g, *grid);
                }
            }
            cache.append(&ctx, &mut enc, &k, &v, &[1], None)?;
            let mut pass = enc.begin_compute_pass(&Default::default());
            decode.encode_in_pass(&ctx, &mut pass, &cache.buffers(q.clone(), &attn))?;
            dispatch(&mut pass, &matmul, &mm[3].0, mm[3].1);
            norm(&mut pass, &dec);
            dispatch(&mut pass, &matmul, &mm[4].0, mm[4].1);
            dispatch(&mut pass, &matmul, &mm[5].0, mm[5].1);
        }
        // Each step is its own submission: the caches' length writes land in order.
        queue.submit([enc.finish()]);
    }

    // The last token's hidden state.
    let staging = buffer(
        "readback",
        D as u64 * 4,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    );
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&x, 0, &staging, 0, D as u64 * 4);
    queue.submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let gpu: Vec<f32> = bytemuck::cast_slice(&staging.get_mapped_range(..)?).to_vec();

    let want = host_reference(&layers, &tokens, &prefill_spec);
    if want.iter().any(|r| !r.is_finite()) {
        return Err("the host reference is not finite".into());
    }
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let err = gpu
        .iter()
        .zip(&want)
        .map(|(&g, &r)| (g as f64 - r).abs())
        .fold(
            0.0,
            |m: f64, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
        );
    let bound = TOLERANCE * scale;
    println!(
        "prefill of {PROMPT} tokens, {STEPS} decode steps, {LAYERS} layers: final hidden state \
         max |gpu - f64 reference| = {err:.3e} (bound {bound:.3e}, max |ref| {scale:.3})"
    );
    if err > bound {
        return Err(format!("final hidden state off by {err:.3e}, beyond {bound:.3e}").into());
    }
    println!("ok");
    Ok(())
}

/// The same model over the whole sequence on the host in f64 (attention by the crate's own
/// reference): causal, so the last row equals the last decode step's.
fn host_reference(layers: &[Layer], tokens: &[f32], prompt: &AttentionSpec) -> Vec<f64> {
    let n = (PROMPT + STEPS) as usize;
    let (d, dkv, ff) = (D as usize, DKV as usize, FF as usize);
    let spec = prompt.clone().with_seq_len(n as u32);
    let (pq, pk) = spec.default_positions();
    let mut x: Vec<f64> = tokens.iter().map(|&t| t as f64).collect();
    let matmul = |a: &[f64], w: &[f32], k: usize, m: usize| -> Vec<f64> {
        let rows = a.len() / k;
        let mut y = vec![0.0; rows * m];
        for r in 0..rows {
            for i in 0..k {
                let a = a[r * k + i];
                for c in 0..m {
                    y[r * m + c] += a * w[i * m + c] as f64;
                }
            }
        }
        y
    };
    let rmsnorm = |x: &[f64]| -> Vec<f64> {
        x.chunks(d)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + EPS as f64).sqrt();
                row.iter().map(move |v| v * r).collect::<Vec<_>>()
            })
            .collect()
    };
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    for l in layers {
        let xn = rmsnorm(&x);
        let (q, k, v) = (
            matmul(&xn, &l.wq, d, d),
            matmul(&xn, &l.wk, d, dkv),
            matmul(&xn, &l.wv, d, dkv),
        );
        // The reference takes f32 tensors and computes in f64.
        let o = reference::attention::<f64>(&spec, &f32s(&q), &f32s(&k), &f32s(&v), &pq, &pk);
        for (xi, oi) in x.iter_mut().zip(matmul(&o, &l.wo, d, d)) {
            *xi += oi;
        }
        let xn = rmsnorm(&x);
        let h: Vec<f64> = matmul(&xn, &l.w1, d, ff)
            .into_iter()
            .map(|a| a / (1.0 + (-a).exp()))
            .collect();
        for (xi, hi) in x.iter_mut().zip(matmul(&h, &l.w2, ff, d)) {
            *xi += hi;
        }
    }
    x[(n - 1) * d..].to_vec()
}
