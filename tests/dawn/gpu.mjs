// Opens a Dawn device through npm's `webgpu` package (Dawn for Node, Tint inside) on a Vulkan
// driver. Dawn needs Vulkan features Mesa 22.3's lavapipe lacks, so the Vulkan driver used is
// SwiftShader's, which Debian's chromium-common package ships as an ICD; POSATTN_DAWN_ICD names another
// ICD manifest, and an empty value keeps the system's drivers.

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const DEBIAN_SWIFTSHADER = '/usr/lib/chromium/vk_swiftshader_icd.json';

// The Dawn instance must outlive its devices: collected early, it takes them down mid-use.
const keep = [];

export async function openDevice() {
  let icd = process.env.POSATTN_DAWN_ICD;
  if (icd === undefined && existsSync(DEBIAN_SWIFTSHADER)) icd = DEBIAN_SWIFTSHADER;
  if (icd) {
    // Read by the Vulkan loader when Dawn creates its instance (both spellings: old and new
    // loaders).
    process.env.VK_ICD_FILENAMES = icd;
    process.env.VK_DRIVER_FILES = icd;
  }
  // Without a runtime directory the Vulkan loader complains on stderr; a private one quiets it.
  if (!process.env.XDG_RUNTIME_DIR) {
    const runtime = mkdtempSync(join(tmpdir(), 'posattn-dawn-'));
    process.env.XDG_RUNTIME_DIR = runtime;
    process.on('exit', () => rmSync(runtime, { recursive: true, force: true }));
  }
  let webgpu;
  try {
    webgpu = await import('webgpu');
  } catch (e) {
    throw new Error(`npm package 'webgpu' missing (run 'npm ci' in tests/dawn): ${e.message}`);
  }
  Object.assign(globalThis, webgpu.globals);
  const gpu = webgpu.create(['backend=vulkan']);
  keep.push(gpu);
  const adapter = await gpu.requestAdapter();
  if (!adapter) throw new Error(`Dawn found no Vulkan adapter (ICD: ${icd || 'system'})`);
  const info = adapter.info;
  const name = [info.vendor, info.architecture, info.device, info.description]
    .filter((s) => s)
    .join(' ');
  // WebGPU's default limits, as a web page gets them: the kernels are built to fit those. The
  // `subgroups` feature where the adapter has it (the decode kernel's subgroup forms need it).
  const requiredFeatures = ['subgroups'].filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({ requiredFeatures });
  device.addEventListener('uncapturederror', (ev) => {
    console.error(`uncaptured Dawn error: ${ev.error.message}`);
    process.exitCode = 1;
  });
  keep.push(adapter);
  return { device, adapter, label: `Dawn (Vulkan, ${name || 'unnamed adapter'}; ICD ${icd || 'system'})` };
}
