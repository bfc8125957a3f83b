// Runs one .tflite file on prepared inputs in LiteRT.js (@litertjs/core) on WebGPU, inside
// headless Chromium: the GPU code path a web app gets. Started by worker.py in a scratch folder
// holding this script, page.html, a node_modules link to the runtime environment's packages,
// cases.json and the inputs as raw float32 files; writes out/case<i>.<name>.bin and out/run.json.
//
//   node runner.mjs --model FILE --chromium PATH [--accelerator webgpu]
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const options = {accelerator: 'webgpu'};
for (let i = 2; i < process.argv.length; i += 2) options[process.argv[i].slice(2)] = process.argv[i + 1];
const work = path.dirname(new URL(import.meta.url).pathname);
fs.mkdirSync(path.join(work, 'out'), {recursive: true});

// Files by URL: the model under one fixed name, everything else from the scratch folder; PUT
// /out/<name> is how the page hands back each output's bytes.
const server = http.createServer((request, response) => {
  const url = decodeURIComponent(new URL(request.url, 'http://localhost').pathname);
  if (request.method === 'PUT' && url.startsWith('/out/')) {
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', () => {
      fs.writeFileSync(path.join(work, 'out', path.basename(url)), Buffer.concat(chunks));
      response.end('ok');
    });
    return;
  }
  const file = url === '/model.tflite' ? options.model : path.join(work, path.normalize(url));
  fs.readFile(file, (error, data) => {
    if (error) { response.statusCode = 404; response.end(); return; }
    const type = file.endsWith('.html') ? 'text/html' : file.endsWith('.wasm') ? 'application/wasm'
      : file.endsWith('.js') || file.endsWith('.mjs') ? 'text/javascript' : 'application/octet-stream';
    response.setHeader('Content-Type', type);
    response.end(data);
  });
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));

const browser = await puppeteer.launch({
  executablePath: options.chromium, headless: true, protocolTimeout: 3600000,
  // SwiftShader: Chromium's software Vulkan, the one WebGPU adapter a machine without a GPU has
  args: ['--no-sandbox', '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-vulkan=swiftshader',
    '--use-webgpu-adapter=swiftshader', '--disable-vulkan-surface'],
});
const log = [];
let result;
try {
  const page = await browser.newPage();
  page.on('console', (message) => log.push(message.text()));
  page.on('pageerror', (error) => log.push(String(error)));
  await page.goto(`http://127.0.0.1:${server.address().port}/page.html`);
  const cases = JSON.parse(fs.readFileSync(path.join(work, 'cases.json'), 'utf8'));
  result = await page.evaluate((c, a) => window.runFile(c, a), cases, options.accelerator);
} catch (error) {
  result = {status: 'refused', stage: 'run', error: String(error).split('\n')[0].slice(0, 400)};
} finally {
  await browser.close();
  server.close();
}
result.log = log;
fs.writeFileSync(path.join(work, 'out', 'run.json'), JSON.stringify(result));
