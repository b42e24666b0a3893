// Runs case bundles (written by posattn::harness::bundle) on Dawn and checks each with the conformance
// tolerance rule: node cases.mjs DIR.
//
// Per case: the output buffer is filled with NaN, the kernel dispatched once with the case's
// bindings, and the output read back; it passes when it is NaN exactly where the f64 reference
// is NaN, finite elsewhere, and max|out - ref64| <= bound (ERR_MULTIPLE * max|ref32 - ref64| +
// ERR_FLOOR * max(1, max|ref64|), computed by the Rust side with check::compare). The output is
// also written to DIR/<case>/out.f32 for the host to check again.
// Prints one line per case and `dawn: N cases, F failed, ...` last; exits 1 on any failure and
// 3 when Dawn has no adapter.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openDevice } from './gpu.mjs';

const dir = process.argv[2];
let dev;
try {
  dev = await openDevice();
} catch (e) {
  console.log(`dawn: unavailable: ${e.message}`);
  process.exit(3);
}
const { device, label } = dev;
console.log(`dawn: ${label}`);

// Compiled pipelines and their layouts, by kernel variant.
const pipelines = new Map();
async function pipeline(c) {
  if (pipelines.has(c.kernel)) return { ...pipelines.get(c.kernel), compileMs: 0 };
  const t = performance.now();
  const code = readFileSync(join(dir, c.kernel_file), 'utf8');
  device.pushErrorScope('validation');
  const module = device.createShaderModule({ label: c.kernel, code });
  const info = await module.getCompilationInfo();
  const bgl = device.createBindGroupLayout({
    entries: c.bindings.map((b) => ({
      binding: b.binding,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: b.type },
    })),
  });
  const p = await device.createComputePipelineAsync({
    label: c.kernel,
    layout: device.createPipelineLayout({ bindGroupLayouts: [bgl] }),
    compute: { module, entryPoint: c.entry_point },
  });
  const err = await device.popErrorScope();
  if (info.messages.length || err) {
    const msgs = info.messages.map((m) => `${m.type} at ${m.lineNum}:${m.linePos}: ${m.message}`);
    throw new Error(`${c.kernel}: ${[...msgs, err?.message ?? ''].join('; ')}`);
  }
  const entry = { pipeline: p, bgl };
  pipelines.set(c.kernel, entry);
  return { ...entry, compileMs: performance.now() - t };
}

function check(out, ref, bound) {
  let err = 0;
  for (let i = 0; i < ref.length; i++) {
    const g = out[i];
    const r = ref[i];
    if (Number.isNaN(r) !== Number.isNaN(g) || (!Number.isNaN(r) && !Number.isFinite(g))) {
      return { ok: false, err, why: `element ${i}: dawn ${g}, reference ${r}` };
    }
    if (!Number.isNaN(r)) err = Math.max(err, Math.abs(g - r));
  }
  if (!(err <= bound)) return { ok: false, err, why: `error ${err.toExponential(3)} > bound ${bound.toExponential(3)}` };
  return { ok: true, err };
}

async function run(name) {
  const cdir = join(dir, name);
  const c = JSON.parse(readFileSync(join(cdir, 'case.json'), 'utf8'));
  const { pipeline: p, bgl, compileMs } = await pipeline(c);
  const t = performance.now();
  device.pushErrorScope('validation');
  let out;
  const buffers = c.bindings.map((b) => {
    if (b.output) {
      out = device.createBuffer({
        size: b.floats * 4,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
        mappedAtCreation: true,
      });
      new Float32Array(out.getMappedRange()).fill(NaN);
      out.unmap();
      return out;
    }
    const bytes = readFileSync(join(cdir, b.file));
    const usage = b.type === 'uniform' ? GPUBufferUsage.UNIFORM : GPUBufferUsage.STORAGE;
    // Bindings may not be empty; sizes are rounded up to 4 bytes.
    const buf = device.createBuffer({ size: Math.max(4, (bytes.length + 3) & ~3), usage, mappedAtCreation: true });
    new Uint8Array(buf.getMappedRange()).set(bytes);
    buf.unmap();
    return buf;
  });
  const bg = device.createBindGroup({
    layout: bgl,
    entries: c.bindings.map((b, i) => ({ binding: b.binding, resource: { buffer: buffers[i] } })),
  });
  const read = device.createBuffer({ size: out.size, usage: GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ });
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(p);
  pass.setBindGroup(0, bg);
  pass.dispatchWorkgroups(...c.workgroups);
  pass.end();
  enc.copyBufferToBuffer(out, 0, read, 0, out.size);
  device.queue.submit([enc.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const result = new Float32Array(read.getMappedRange().slice(0));
  read.unmap();
  const err = await device.popErrorScope();
  for (const b of [...buffers, read]) b.destroy();
  if (err) throw new Error(`${name}: ${err.message}`);
  writeFileSync(join(cdir, 'out.f32'), Buffer.from(result.buffer));
  const expBytes = readFileSync(join(cdir, c.expected));
  const ref = new Float64Array(expBytes.buffer.slice(expBytes.byteOffset, expBytes.byteOffset + expBytes.length));
  return { ...check(result, ref, c.bound), bound: c.bound, compileMs, runMs: performance.now() - t, kernel: c.kernel };
}

const names = JSON.parse(readFileSync(process.argv[3] ?? join(dir, 'cases.json'), 'utf8'));
if (!names.length) {
  console.log('cases: no cases given');
  process.exit(1);
}
const t0 = performance.now();
let failed = 0;
let compileMs = 0;
for (const name of names) {
  let r;
  try {
    r = await run(name);
  } catch (e) {
    r = { ok: false, why: e.message, err: NaN, bound: NaN, compileMs: 0, runMs: 0 };
  }
  compileMs += r.compileMs;
  if (!r.ok) failed++;
  console.log(
    `  ${name.padEnd(52)} ${r.ok ? 'pass' : 'FAIL'} ${r.err.toExponential(2)} ${r.bound.toExponential(2)} ` +
      `compile ${(r.compileMs / 1000).toFixed(1)} s run ${(r.runMs / 1000).toFixed(2)} s ${r.ok ? '' : r.why}`,
  );
}
const secs = (performance.now() - t0) / 1000;
console.log(
  `dawn: ${names.length} cases, ${failed} failed, ${pipelines.size} kernels compiled in ` +
    `${(compileMs / 1000).toFixed(1)} s, ${secs.toFixed(1)} s in all`,
);
device.destroy();
process.exitCode = failed ? 1 : 0;
