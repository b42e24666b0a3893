// Loads the conformance page (examples/web, built with wasm-bindgen into examples/web/pkg) in
// headless Chromium through chromedriver and checks the rendered table:
//
//   node tests/web/page.mjs [--filter KEY=VALUE,...] [--rows N] [--screenshot FILE.png]
//                           [--timeout SECONDS] [--webdriver CAPABILITIES.json]
//
// The page is served from a static server on 127.0.0.1 (Node's http, .wasm as application/wasm);
// Chromium gets the flags of tests/web/webdriver.json (SwiftShader's WebGPU adapter) unless
// --webdriver names other capabilities. Passes
// when the page reaches data-state="done" and its table has one row per case, every row "pass",
// with at least one case; prints the table and `page: N cases, P passed, F failed, U
// unsupported` last. Exits 1 on any failure, 2 when chromedriver, Chromium or the built page is
// missing.

import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync, existsSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { extname, join, normalize, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');
const site = join(root, 'examples', 'web');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const filter = opt('--filter', '');
const rows = opt('--rows', '');
const capsFile = opt('--webdriver', join(here, 'webdriver.json'));
const screenshot = opt('--screenshot', '');
const timeoutS = Number(opt('--timeout', '1200'));
const chromedriver = process.env.CHROMEDRIVER || 'chromedriver';

function die(code, msg) {
  console.log(`page: ${msg}`);
  process.exit(code);
}

if (!existsSync(join(site, 'pkg', 'web.js')) || !existsSync(join(site, 'pkg', 'web_bg.wasm'))) {
  die(2, 'the page is not built (examples/web/pkg/web.js missing; see README, Browser)');
}

// A static server for examples/web.
const types = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
};
const server = createServer((req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
  const file = join(site, path === '/' ? 'index.html' : path);
  if (!file.startsWith(site) || !existsSync(file) || !statSync(file).isFile()) {
    res.writeHead(404);
    res.end();
    return;
  }
  res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' });
  res.end(readFileSync(file));
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const pagePort = server.address().port;

// chromedriver on a free port.
const probe = createServer();
await new Promise((ok) => probe.listen(0, '127.0.0.1', ok));
const driverPort = probe.address().port;
await new Promise((ok) => probe.close(ok));
const driver = spawn(chromedriver, [`--port=${driverPort}`], { stdio: 'ignore' });
let driverError = null;
driver.on('error', (e) => (driverError = e));
const base = `http://127.0.0.1:${driverPort}`;

async function wd(method, path, body) {
  const r = await fetch(base + path, {
    method,
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${JSON.stringify(json.value ?? json)}`);
  return json.value;
}

let session = null;
let code = 1;
try {
  for (let i = 0; ; i++) {
    if (driverError) die(2, `chromedriver not found (${chromedriver}): ${driverError.message}`);
    try {
      const s = await wd('GET', '/status');
      if (s.ready) break;
    } catch {}
    if (i > 100) die(2, 'chromedriver did not start');
    await new Promise((ok) => setTimeout(ok, 100));
  }
  const caps = JSON.parse(readFileSync(capsFile, 'utf8'));
  try {
    session = (await wd('POST', '/session', { capabilities: { alwaysMatch: caps } })).sessionId;
  } catch (e) {
    die(2, `Chromium did not start: ${e.message}`);
  }
  const s = `/session/${session}`;
  await wd('POST', `${s}/window/rect`, { width: 1100, height: 900 });
  await wd('POST', `${s}/timeouts`, { script: 30000 });
  const params = new URLSearchParams();
  if (filter) params.set('filter', filter);
  if (rows) params.set('rows', rows);
  const query = params.size ? `?${params}` : '';
  const url = `http://127.0.0.1:${pagePort}/index.html${query}`;
  console.log(`page: ${url}`);
  await wd('POST', `${s}/url`, { url });
  const start = Date.now();
  let state;
  for (;;) {
    state = await wd('POST', `${s}/execute/sync`, {
      script: 'return document.body.dataset.state',
      args: [],
    });
    if (!['loading', 'running'].includes(state)) break;
    if (Date.now() - start > timeoutS * 1000) break;
    await new Promise((ok) => setTimeout(ok, 1000));
  }
  const secs = (Date.now() - start) / 1000;
  const page = await wd('POST', `${s}/execute/sync`, {
    script: `return {
      data: Object.assign({}, document.body.dataset),
      status: document.getElementById('status').textContent,
      adapter: document.getElementById('adapter').textContent,
      rows: [...document.querySelectorAll('#results tr')].map((tr) =>
        [...tr.children].map((td) => td.textContent)),
    }`,
    args: [],
  });
  console.log(`page: adapter ${page.adapter}`);
  for (const r of page.rows) console.log(`  ${r[0].padEnd(44)} ${r[1].padEnd(11)} ${r.slice(2, 6).join('  ')}  ${r[6]}`);
  console.log(`page: status "${page.status}" after ${secs.toFixed(1)} s`);
  if (screenshot) {
    // The whole table: the window as tall as the document.
    const height = await wd('POST', `${s}/execute/sync`, {
      script: 'return document.documentElement.scrollHeight',
      args: [],
    });
    await wd('POST', `${s}/window/rect`, { width: 1100, height: Math.min(height + 40, 4000) });
    const png = await wd('GET', `${s}/screenshot`);
    writeFileSync(screenshot, Buffer.from(png, 'base64'));
    console.log(`page: screenshot ${screenshot}`);
  }
  const d = page.data;
  const cases = Number(d.cases ?? 0);
  const passed = page.rows.filter((r) => r[1] === 'pass').length;
  const failed = page.rows.filter((r) => r[1] === 'FAIL').length;
  const unsupported = page.rows.filter((r) => r[1] === 'unsupported').length;
  const problems = [];
  if (state !== 'done') problems.push(`state ${state} (expected done): ${page.status}`);
  if (!(cases > 0)) problems.push('no cases ran');
  if (page.rows.length !== cases) problems.push(`${page.rows.length} rows for ${cases} cases`);
  if (passed !== cases) problems.push(`${passed} rows pass of ${cases}`);
  if (Number(d.passed) !== passed || Number(d.failed) !== failed) {
    problems.push(`the counts (${d.passed} passed, ${d.failed} failed) disagree with the table`);
  }
  console.log(`page: ${cases} cases, ${passed} passed, ${failed} failed, ${unsupported} unsupported`);
  if (problems.length) console.log(`page: FAILED: ${problems.join('; ')}`);
  code = problems.length ? 1 : 0;
} catch (e) {
  console.log(`page: error: ${e.message}`);
  code = 1;
} finally {
  if (session) await wd('DELETE', `/session/${session}`).catch(() => {});
  driver.kill();
  server.close();
}
process.exit(code);
