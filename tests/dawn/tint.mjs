// Tint's verdict on every variant: node tint.mjs MANIFEST, where MANIFEST is a JSON list of
// {name, file, entry, features?}. Each WGSL module is created on Dawn; any message Tint gives (error,
// warning or info, uniformity analysis included) fails the variant, printed with its name.
// With --pipelines each compute pipeline is also created (Tint's SPIR-V backend and the driver).
// Prints `tint: N modules, F failed, T s` last; exits 1 on any failure and 3 when Dawn has no
// adapter.

import { readFileSync } from 'node:fs';
import { openDevice } from './gpu.mjs';

const args = process.argv.slice(2);
const pipelines = args.includes('--pipelines');
const manifest = JSON.parse(readFileSync(args.find((a) => !a.startsWith('--')), 'utf8'));
let dev;
try {
  dev = await openDevice();
} catch (e) {
  console.log(`tint: unavailable: ${e.message}`);
  process.exit(3);
}
const { device, label } = dev;
console.log(`tint: ${label}`);
// Modules that need a device feature (manifest entries' `features`) cannot be checked without it.
const missing = [...new Set(manifest.flatMap((v) => v.features || []))].filter(
  (f) => !device.features.has(f),
);
if (missing.length) {
  console.log(`tint: unavailable: the device lacks ${missing.join(', ')}`);
  process.exit(3);
}
if (!manifest.length) {
  console.log('tint: no modules given');
  process.exit(1);
}
const t0 = performance.now();
let failed = 0;
for (const v of manifest) {
  const code = readFileSync(v.file, 'utf8');
  device.pushErrorScope('validation');
  const module = device.createShaderModule({ label: v.name, code });
  const info = await module.getCompilationInfo();
  let err = await device.popErrorScope();
  const notes = info.messages.map((m) => `${m.type} at ${m.lineNum}:${m.linePos}: ${m.message}`);
  if (!notes.length && !err && pipelines) {
    device.pushErrorScope('validation');
    try {
      await device.createComputePipelineAsync({
        layout: 'auto',
        compute: { module, entryPoint: v.entry },
      });
    } catch (e) {
      notes.push(`pipeline: ${e.message}`);
    }
    err = await device.popErrorScope();
  }
  // The compilation messages already say why a module is invalid; other errors are added.
  if (err && !notes.length) notes.push(`validation error: ${err.message}`);
  if (notes.length) {
    failed++;
    console.log(`FAIL ${v.name}\n  ${notes.join('\n  ')}`);
  }
}
const secs = ((performance.now() - t0) / 1000).toFixed(1);
console.log(`tint: ${manifest.length} modules, ${failed} failed, ${secs} s`);
device.destroy();
process.exitCode = failed ? 1 : 0;
