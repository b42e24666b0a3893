//! The attainable compute roof of an adapter for the prefill benchmark: a plain register-tiled
//! f32 matrix product in WGSL (`C = A · B`, square, n a multiple of 64), timed like the kernels.
//! Attention is two such products plus a softmax, so the best plain matmul the adapter runs is
//! what the fused kernel can hope to approach; `posattn bench` reports the fused kernel's
//! GFLOP/s as a fraction of it, measured in the same run.
//!
//! Two shapes are tried and the faster one is the roof: 64×64 outputs per workgroup of 16×16
//! invocations holding 4×4 each, K-slices of 16 staged through workgroup memory (the usual GPU
//! shape), and a CPU-adapter shape without workgroup memory (`matmul_rows_wgsl`). Accumulators
//! are named registers, never an indexed private array, which Mesa's GL path turns into a
//! branch ladder.

use crate::context::Context;
use crate::harness::timing::{Statistic, time_encoded};

/// One tiling: `tile` outputs per side of a workgroup, `tile / 4` invocations per side.
fn matmul_wgsl(tile: u32) -> String {
    let threads = tile / 4;
    format!(
        "
const TILE: u32 = {tile}u;
const THREADS: u32 = {threads}u;
const KT: u32 = 16u;
@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> dims: vec4<u32>;
// A's K-slice transposed ([k][row]), B's as vec4 rows ([k][col / 4]).
var<workgroup> a_sh: array<array<f32, TILE>, KT>;
var<workgroup> b_sh: array<array<vec4<f32>, THREADS>, KT>;

@compute @workgroup_size(THREADS, THREADS)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {{
    let n = dims.x;
    let n4 = n / 4u;
    let row0 = wg.y * TILE;
    let col4 = wg.x * THREADS + lid.x;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < n; k0 += KT) {{
        // TILE × KT floats of A and KT × TILE of B: TILE · KT / 4 vec4s each.
        for (var i = li; i < TILE * KT / 4u; i += THREADS * THREADS) {{
            let r = i / (KT / 4u);
            let kq = i % (KT / 4u);
            let x = a[(row0 + r) * n4 + k0 / 4u + kq];
            a_sh[4u * kq][r] = x.x;
            a_sh[4u * kq + 1u][r] = x.y;
            a_sh[4u * kq + 2u][r] = x.z;
            a_sh[4u * kq + 3u][r] = x.w;
            let kk = i / THREADS;
            let cc = i % THREADS;
            b_sh[kk][cc] = b[(k0 + kk) * n4 + wg.x * THREADS + cc];
        }}
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {{
            let bv = b_sh[kk][lid.x];
            let r = lid.y * 4u;
            c0 = fma(vec4<f32>(a_sh[kk][r]), bv, c0);
            c1 = fma(vec4<f32>(a_sh[kk][r + 1u]), bv, c1);
            c2 = fma(vec4<f32>(a_sh[kk][r + 2u]), bv, c2);
            c3 = fma(vec4<f32>(a_sh[kk][r + 3u]), bv, c3);
        }}
        workgroupBarrier();
    }}
    let r = row0 + lid.y * 4u;
    c[r * n4 + col4] = c0;
    c[(r + 1u) * n4 + col4] = c1;
    c[(r + 2u) * n4 + col4] = c2;
    c[(r + 3u) * n4 + col4] = c3;
}}
"
    )
}

/// The CPU-adapter shape, after the fused kernel's: 64 invocations, four columns (one vec4)
/// each, sharing `rows` rows. Each 16-wide K-slice of those rows is staged in workgroup memory
/// and read at constant indices (the loops are written out), so every invocation reads the same
/// A values, which software adapters load once for all lanes; B is read a whole vec4 at a time,
/// since a per-invocation load costs them about the same whatever its width.
fn matmul_rows_wgsl(rows: u32) -> String {
    let decl: String = (0..rows)
        .map(|i| format!("    var c{i} = vec4<f32>(0.0);\n"))
        .collect();
    let mut body = String::new();
    for kk in 0..16u32 {
        body += &format!("        let b{kk} = b[(k0 + {kk}u) * n4 + col4];\n");
        for i in 0..rows {
            let (slot, lane) = (i * 4 + kk / 4, ["x", "y", "z", "w"][kk as usize % 4]);
            body += &format!("        c{i} = fma(vec4<f32>(a_sh[{slot}u].{lane}), b{kk}, c{i});\n");
        }
    }
    let store: String = (0..rows)
        .map(|i| format!("    c[(row0 + {i}u) * n4 + col4] = c{i};\n"))
        .collect();
    format!(
        "
@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> dims: vec4<u32>;
var<workgroup> a_sh: array<vec4<f32>, {slots}>;

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let n = dims.x;
    let n4 = n / 4u;
    let col4 = wg.x * 64u + li;
    let row0 = wg.y * {rows}u;
{decl}    for (var k0 = 0u; k0 < n; k0 += 16u) {{
        if (li < {slots}u) {{
            a_sh[li] = a[(row0 + li / 4u) * n4 + k0 / 4u + li % 4u];
        }}
        workgroupBarrier();
{body}        workgroupBarrier();
    }}
{store}}}
",
        slots = rows * 4
    )
}

/// The shapes tried, by name: (name, WGSL, workgroups along x and y for side n).
type Shape = (&'static str, String, fn(u32) -> [u32; 2]);

fn shapes() -> Vec<Shape> {
    vec![
        ("64x64 tiles", matmul_wgsl(64), |n| [n / 64, n / 64]),
        ("uniform rows x4", matmul_rows_wgsl(4), |n| [n / 256, n / 4]),
        ("uniform rows x8", matmul_rows_wgsl(8), |n| [n / 256, n / 8]),
    ]
}

/// A square f32 matmul of side `n`, in each tiling.
pub struct MatmulRoof {
    n: u32,
    kernels: Vec<(
        &'static str,
        [u32; 2],
        wgpu::ComputePipeline,
        wgpu::BindGroup,
    )>,
    _buffers: [wgpu::Buffer; 4],
    a: Vec<f32>,
    b: Vec<f32>,
}

impl MatmulRoof {
    /// The side `posattn bench` uses: 512 on a CPU adapter (128 workgroups or more of every
    /// shape, enough for its threads), 4096 elsewhere (large enough that a GPU's launch cost
    /// does not count).
    pub fn default_side(ctx: &Context) -> u32 {
        if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu {
            512
        } else {
            4096
        }
    }

    /// Inputs of side `n` (rounded up to a multiple of 64), seeded random.
    pub fn new(ctx: &Context, n: u32) -> crate::Result<Self> {
        use wgpu::util::DeviceExt;
        let n = n.div_ceil(64).max(1) * 64;
        let d = ctx.device();
        let mut rng = crate::harness::check::SplitMix::new(n as u64);
        let elems = n as usize * n as usize;
        ctx.scoped("building the matmul roof", || {
            let mk = |data: &[f32], usage| {
                d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("posattn matmul roof"),
                    contents: bytemuck::cast_slice(data),
                    usage,
                })
            };
            let st = wgpu::BufferUsages::STORAGE;
            let (ha, hb) = (rng.vec(elems, 1.0), rng.vec(elems, 1.0));
            let a = mk(&ha, st);
            let b = mk(&hb, st);
            let c = mk(
                &vec![0.0; elems],
                st | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            );
            let dims = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("posattn matmul roof dims"),
                contents: bytemuck::cast_slice(&[n, 0, 0, 0]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let kernels = shapes()
                .into_iter()
                .map(|(name, wgsl, grid)| {
                    let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("posattn matmul roof"),
                        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
                    });
                    let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some("posattn matmul roof"),
                        layout: None,
                        module: &module,
                        entry_point: Some("matmul"),
                        compilation_options: Default::default(),
                        cache: None,
                    });
                    let entries: Vec<wgpu::BindGroupEntry> = [&a, &b, &c, &dims]
                        .iter()
                        .enumerate()
                        .map(|(i, buf)| wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: buf.as_entire_binding(),
                        })
                        .collect();
                    let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    });
                    (name, grid(n), pipeline, bind_group)
                })
                .collect();
            MatmulRoof {
                n,
                kernels,
                _buffers: [a, b, c, dims],
                a: ha,
                b: hb,
            }
        })
    }

    /// Floating-point operations of one product (2n³).
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }

    /// Side of the product.
    pub fn n(&self) -> u32 {
        self.n
    }

    fn encode(&self, index: usize, encoder: &mut wgpu::CommandEncoder) {
        let (_, grid, pipeline, bind_group) = &self.kernels[index];
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], 1);
    }

    /// GFLOP/s of each shape (median of `runs` after a warm-up), as (shape, GFLOP/s).
    pub fn measure(&self, ctx: &Context, runs: usize) -> crate::Result<Vec<(&'static str, f64)>> {
        self.measure_by(ctx, runs, Statistic::Median)
    }

    /// [`Self::measure`] reporting the run `stat` picks.
    pub fn measure_by(
        &self,
        ctx: &Context,
        runs: usize,
        stat: Statistic,
    ) -> crate::Result<Vec<(&'static str, f64)>> {
        let mut out = Vec::new();
        for (i, (name, ..)) in self.kernels.iter().enumerate() {
            time_encoded(ctx, 1, |e| {
                self.encode(i, e);
                Ok(())
            })?;
            let (_, t) = time_encoded(ctx, runs, |e| {
                self.encode(i, e);
                Ok(())
            })?;
            out.push((*name, self.flops() / stat.of(&t).as_secs_f64() / 1e9));
        }
        Ok(out)
    }

    /// The best tiling's GFLOP/s.
    pub fn best_gflops(&self, ctx: &Context, runs: usize) -> crate::Result<f64> {
        Ok(self
            .measure(ctx, runs)?
            .into_iter()
            .map(|(_, g)| g)
            .fold(0.0, f64::max))
    }

    /// Runs each tiling once on a poisoned C and compares 64 of its elements with the f64
    /// product of the inputs: a roof must compute the product, not merely take time. The bound
    /// is f32 accumulation's: 1e-5 · n · Σ|a·b| of the element (n roundings of the running sum).
    pub fn verify(&self, ctx: &Context) -> crate::Result<()> {
        let n = self.n as usize;
        for i in 0..self.kernels.len() {
            ctx.queue().write_buffer(
                &self._buffers[2],
                0,
                bytemuck::cast_slice(&vec![f32::NAN; n * n]),
            );
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            self.encode(i, &mut enc);
            ctx.queue().submit([enc.finish()]);
            let bytes = ctx.read_buffer(&self._buffers[2], (n * n * 4) as u64)?;
            let c: &[f32] = bytemuck::cast_slice(&bytes);
            for s in 0..64usize {
                let (r, col) = ((s * 7919) % n, (s * 104_729 + 13) % n);
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for k in 0..n {
                    let x = self.a[r * n + k] as f64 * self.b[k * n + col] as f64;
                    want += x;
                    mag += x.abs();
                }
                let got = c[r * n + col] as f64;
                let bound = 1e-5 * n as f64 * mag;
                // NaN (a lane left unwritten) fails too.
                if (got - want).abs().partial_cmp(&bound) != Some(std::cmp::Ordering::Less) {
                    return Err(crate::Error::invalid(
                        "matmul roof",
                        format!("C[{r}][{col}] = {want} within {bound:.3e}"),
                        format!("{got} ({})", self.kernels[i].0),
                    ));
                }
            }
        }
        Ok(())
    }
}
