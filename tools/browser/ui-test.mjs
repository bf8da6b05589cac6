// The web UI in a real browser (ctest test_browser): Debian's headless chromium driven by
// puppeteer-core through a daemon of the default model on port 0. Generates (progress events
// and previews arrive, the final images load), checks that a finished job's EventSource ends
// (the 204), reads the infotext, runs two edits (img2img and inpainting with a mask made by the
// keyboard-usable buttons), checks a phone-sized screen, runs axe-core (no serious or critical
// violations), then the same under API keys (the key field, images through URL tokens). Fails on
// any console error, page error, failed request or HTTP error the step did not expect. Saves
// screenshots to OUT (web-ui.png, web-ui-phone.png).
// Usage: node ui-test.mjs --bin build/denoised --out build/artifacts [--chromium /usr/bin/chromium]
//        [--base URL --keyed-base URL: test daemons already running instead]
// Exit: 0 passed, 1 failed, 77 skipped (no chromium installed).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

const args = Object.fromEntries(process.argv.slice(2).reduce((a, v, i, all) => (v.startsWith('--') ? [...a, [v.slice(2), all[i + 1]]] : a), []));
const chromium = args.chromium || ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));
if (!chromium || !fs.existsSync(chromium)) {
  console.log('test_browser: SKIPPED: no chromium (scripts/install-deps.sh --browser installs it)');
  process.exit(77);
}
if ((!args.bin && !args.base) || !args.out) {
  console.error('usage: ui-test.mjs --bin DENOISED --out DIR [--chromium PATH]');
  process.exit(2);
}
let puppeteer;
try {
  puppeteer = (await import('puppeteer-core')).default;
} catch (e) {
  console.error('test_browser: FAILED: chromium is installed but puppeteer-core is not: run scripts/install-deps.sh --browser (' + e.message + ')');
  process.exit(1);
}
const require = createRequire(import.meta.url);
const axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
fs.mkdirSync(args.out, { recursive: true });
const t0 = Date.now();
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
const daemons = [];
let browser = null;

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
}

// `denoised serve` on 127.0.0.1:0 with the default model (or the models of `more`, flags);
// resolves with its base URL.
function startDaemon(env, more = []) {
  const state = fs.mkdtempSync(path.join(os.tmpdir(), 'denoised-browser-'));
  const p = spawn(args.bin, ['serve', '--listen', '127.0.0.1:0', '--state-dir', state, ...more], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  daemons.push({ p, state });
  let text = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the daemon did not start: ' + text)), 20000);
    const on = (b) => {
      text += b;
      const m = /url=(http:\/\/127\.0\.0\.1:\d+)/.exec(text);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    };
    p.stdout.on('data', on);
    p.stderr.on('data', on);
    p.on('exit', (code) => reject(new Error(`the daemon exited (${code}): ${text}`)));
  });
}

// Every console error, page error, failed request and HTTP error, unless `allowed` matches it.
function watch(page, problems, allowed) {
  const ok = (s) => allowed.some((re) => re.test(s));
  page.on('console', (m) => {
    const s = `console ${m.type()}: ${m.text()} (${(m.location() || {}).url || ''})`;
    if (m.type() === 'error' && !ok(s)) problems.push(s);
  });
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  page.on('requestfailed', (r) => {
    const s = `request failed: ${r.method()} ${r.url()} ${(r.failure() || {}).errorText}`;
    // an EventSource the page closed itself, or a download link, is not a failure
    if (!/net::ERR_ABORTED/.test(s) && !ok(s)) problems.push(s);
  });
  page.on('response', (r) => {
    const s = `HTTP ${r.status()}: ${r.request().method()} ${r.url()}`;
    if (r.status() >= 400 && !ok(s)) problems.push(s);
  });
}

async function images(page, sel) {
  return page.$$eval(sel, (xs) => xs.map((i) => ({ ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, src: i.getAttribute('src') })));
}

// Submits the form and waits for the job's final event and its images.
async function generate(page, n, what) {
  const before = await page.$eval('#run-status', (e) => e.textContent);
  await page.click('#go');
  await page.waitForFunction((b) => {
    const t = document.querySelector('#run-status').textContent;
    return t !== b && /: (done|failed|cancelled)\.|failed:|Not accepted/.test(t + document.querySelector('#form-error').textContent);
  }, { timeout: 90000 }, before);
  const status = await page.$eval('#run-status', (e) => e.textContent);
  const err = await page.$eval('#form-error', (e) => e.textContent);
  check(/: done\./.test(status) && !err, `${what}: ${status} ${err}`);
  await page.waitForFunction((k) => {
    const xs = [...document.querySelectorAll('#results img')];
    return xs.length === k && xs.every((i) => i.complete && i.naturalWidth > 0);
  }, { timeout: 15000 }, n);
  const imgs = await images(page, '#results img');
  check(imgs.every((i) => i.w === 32), `${what}: images are 32 px wide (${JSON.stringify(imgs)})`);
  log(`${what}: ${status}`);
  return status.match(/Job ([0-9a-f]+)/)[1];
}

async function uiRun(base) {
  const page = await browser.newPage();
  const problems = [];
  watch(page, problems, []);
  await page.setViewport({ width: 1200, height: 1000 });
  await page.goto(base + '/', { waitUntil: 'load' });
  await page.waitForSelector('#model option');
  await page.waitForSelector('#class option');
  check((await page.$eval('#key-card', (e) => e.hidden)) === true, 'no key field without keys');
  // ddim 30 steps with a preview every 3: progress arrives over the run (short enough for the
  // ASan build, where a step of this batch takes about 0.3 s)
  await page.select('#class', 'G');
  await page.select('#solver', 'ddim');
  for (const [id, v] of [['#steps', '30'], ['#seed', '7'], ['#batch', '2'], ['#preview-every', '3'], ['#guidance', '2']]) {
    await page.$eval(id, (e) => (e.value = ''));
    await page.type(id, v);
  }
  const job = await generate(page, 2, 'generate');
  const events = Number(await page.$eval('#event-count', (e) => e.textContent));
  const previews = await images(page, '#previews img');
  log(`progress events seen: ${events}, previews: ${previews.length}`);
  check(events >= 5, `progress events arrived (${events})`);
  check(previews.length >= 3 && previews.every((p) => p.ok && p.src.startsWith('data:image/png')), 'previews shown');
  // a finished job's stream ends for good: EventSource gets 204 on its reconnect and closes
  const closed = await page.evaluate((id) => new Promise((resolve) => {
    const es = new EventSource(`/v1/jobs/${id}/events`);
    let n = 0;
    es.addEventListener('done', () => n++);
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) resolve({ closed: true, done: n });
    };
    setTimeout(() => {
      es.close();
      resolve({ closed: false, done: n });
    }, 8000);
  }), job);
  check(closed.closed && closed.done === 1, `EventSource closed after the final event (${JSON.stringify(closed)})`);
  log('a finished job\'s EventSource closed after one replay (204 on the reconnect)');
  // the gallery: the job, its images, its infotext
  await page.waitForFunction((id) => {
    const li = document.querySelector(`#gallery li[data-id="${id}"]`);
    return li && [...li.querySelectorAll('img')].filter((i) => i.complete && i.naturalWidth > 0).length === 2;
  }, { timeout: 10000 }, job);
  await page.click(`#gallery li[data-id="${job}"] details summary`);
  await page.waitForFunction((id) => /Steps: 30/.test(document.querySelector(`#gallery li[data-id="${id}"] .infotext`).textContent), { timeout: 5000 }, job);
  log('gallery shows the job with its infotext');
  // edit 1: img2img of image 1 into a Q
  await page.click(`#gallery li[data-id="${job}"] button[aria-label^="Edit image 1"]`);
  await page.waitForFunction(() => document.querySelector('#input-canvas').getAttribute('aria-label').startsWith('Input image'));
  check((await page.$eval('#edit-type', (e) => e.value)) === 'img2img', 'Edit selects img2img');
  await page.select('#class', 'Q');
  await page.$eval('#strength', (e) => (e.value = ''));
  await page.type('#strength', '0.6');
  const edited = await generate(page, 2, 'img2img');
  check(edited !== job, 'the edit is a new job');
  // edit 2: inpainting, the mask from the keyboard: focus a mask button and press Enter
  await page.select('#edit-type', 'inpaint');
  await page.focus('#mask-tools button[data-mask="left"]');
  await page.keyboard.press('Enter');
  const label = await page.$eval('#input-canvas', (e) => e.getAttribute('aria-label'));
  check(/512 of 1024 pixels masked/.test(label), 'the mask covers the left half: ' + label);
  await generate(page, 2, 'inpaint');
  // edit 3: invert the same picture as a G and sample its noise maps as an E
  await page.select('#edit-type', 'invert_ddpm');
  await page.select('#source-class', 'G');
  await page.select('#class', 'E');
  await generate(page, 2, 'invert and change the class');
  // reuse the first job's settings
  await page.click(`#gallery li[data-id="${job}"] button[aria-label^="Reuse"]`);
  check((await page.$eval('#steps', (e) => e.value)) === '30' && (await page.$eval('#class', (e) => e.value)) === 'G', 'reuse fills the form');
  await page.screenshot({ path: path.join(args.out, 'web-ui.png'), fullPage: true });
  // cancel a long job from the form, then delete it from the gallery
  await page.select('#edit-type', '');
  await page.select('#solver', 'ddpm');
  for (const [id, v] of [['#steps', '1000'], ['#batch', '1'], ['#preview-every', '0']]) {
    await page.$eval(id, (e) => (e.value = ''));
    await page.type(id, v);
  }
  await page.click('#go');
  await page.waitForFunction(() => /: step \d+ of 1000/.test(document.querySelector('#run-status').textContent), { timeout: 30000 });
  const long = (await page.$eval('#run-status', (e) => e.textContent)).match(/Job ([0-9a-f]+)/)[1];
  await page.click('#cancel');
  await page.waitForFunction(() => /: cancelled\./.test(document.querySelector('#run-status').textContent), { timeout: 30000 });
  await page.waitForFunction((id) => /State: cancelled/.test((document.querySelector(`#gallery li[data-id="${id}"]`) || {}).textContent || ''), { timeout: 10000 }, long);
  await page.click(`#gallery li[data-id="${long}"] button[aria-label^="Delete"]`);
  check((await page.$(`#gallery li[data-id="${long}"]`)) === null, 'Delete removes the job from the gallery');
  check((await page.evaluate(() => JSON.parse(localStorage.getItem('denoised.gallery.v1')).length)) === 4, 'four jobs are left in localStorage');
  log('cancelled a running job and deleted it from the gallery');
  if (!args.base) await textRun(page);
  // accessibility: axe-core, no serious or critical violations
  await page.evaluate(axeSource);
  const axe = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, n: v.nodes.length, help: v.help, at: v.nodes.slice(0, 3).map((x) => x.target.join(' ')) }));
  });
  for (const v of axe) log(`axe: ${v.impact} ${v.id} (${v.n}): ${v.help} at ${v.at.join(', ')}`);
  const serious = axe.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  check(serious.length === 0, `no serious accessibility violations (${serious.map((v) => v.id).join(', ')})`);
  log(`axe-core: ${axe.length} violations, none serious or critical`);
  // a phone: nothing wider than the screen
  await page.setViewport({ width: 390, height: 844, isMobile: true, hasTouch: true });
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 390, `the page fits a 390 px screen (scrollWidth ${width})`);
  await page.screenshot({ path: path.join(args.out, 'web-ui-phone.png'), fullPage: false });
  log(`fits a phone: scrollWidth ${width} at 390 px`);
  // /docs renders the spec offline
  await page.goto(base + '/docs', { waitUntil: 'load' });
  await page.waitForSelector('#op-submitJob');
  log('/docs renders the spec');
  check(problems.length === 0, 'no console errors or failed requests:\n  ' + problems.join('\n  '));
  await page.close();
}

// A text-to-image model: the prompt fields replace the class picker, its edits are img2img and
// inpainting; a job with a prompt runs, its infotext carries A1111's prompt lines, and its
// picture redrawn by img2img with another prompt runs too.
async function textRun(page) {
  await page.select('#model', 'sd');
  const shown = await page.evaluate(() => ['#prompt-box', '#class-box', 'option[value=invert_ddpm]', 'option[value=img2img]'].map((s) => !document.querySelector(s).hidden));
  check(JSON.stringify(shown) === '[true,false,false,true]', `a text model shows the prompt and img2img, no classes or inversions (${shown})`);
  check((await page.$eval('#guidance', (e) => e.value)) === '7.5', 'a text model\'s guidance defaults to 7.5');
  await page.type('#prompt', 'a photo of a cat');
  await page.type('#negative-prompt', 'blurry');
  await page.select('#solver', 'dpm++2m');
  for (const [id, v] of [['#steps', '5'], ['#batch', '1'], ['#seed', '3']]) {
    await page.$eval(id, (e) => (e.value = ''));
    await page.type(id, v);
  }
  const job = await generate(page, 1, 'text to image');
  await page.click(`#gallery li[data-id="${job}"] details summary`);
  await page.waitForFunction((id) => /a photo of a cat\s*Negative prompt: blurry\s*Steps: 5/.test(document.querySelector(`#gallery li[data-id="${id}"] .infotext`).textContent), { timeout: 5000 }, job);
  await page.click(`#gallery li[data-id="${job}"] button[aria-label^="Edit image 1"]`);
  await page.waitForFunction(() => document.querySelector('#input-canvas').getAttribute('aria-label').startsWith('Input image'));
  check((await page.$eval('#edit-type', (e) => e.value)) === 'img2img', 'Edit selects img2img on a text model');
  await page.$eval('#prompt', (e) => (e.value = ''));
  await page.type('#prompt', 'a photo of a dog');
  await page.$eval('#strength', (e) => (e.value = ''));
  await page.type('#strength', '0.6');
  await generate(page, 1, 'text-guided img2img');
  await page.select('#edit-type', '');
  await page.select('#model', 'default');
  check(await page.$eval('#prompt-box', (e) => e.hidden) && !(await page.$eval('#class-box', (e) => e.hidden)), 'back on the glyph model the classes return');
  await page.select('#model', 'sd'); // the accessibility check below sees the prompt fields too
  log('text to image: prompt fields, the job, its infotext with the prompt lines');
}

async function keyRun(base) {
  const page = await browser.newPage();
  const problems = [];
  // before the key: the listings answer 401, which is how the page learns it needs one
  watch(page, problems, [/401.*\/v1\/(models|capabilities)/, /status of 401/]);
  await page.goto(base + '/', { waitUntil: 'load' });
  await page.waitForFunction(() => !document.querySelector('#key-card').hidden);
  await page.type('#api-key', 'browser-key-0123456789abcdef');
  await page.click('#key-form button[type=submit]');
  await page.waitForSelector('#class option');
  await page.select('#class', 'K');
  for (const [id, v] of [['#steps', '20'], ['#batch', '1'], ['#preview-every', '5']]) {
    await page.$eval(id, (e) => (e.value = ''));
    await page.type(id, v);
  }
  await generate(page, 1, 'generate with an API key');
  const srcs = (await images(page, '#results img, #gallery img')).map((i) => i.src);
  check(srcs.length >= 2 && srcs.every((s) => /\?token=\d+\.[0-9a-f]{32}$/.test(s)), 'images load through URL tokens: ' + srcs.join(' '));
  check(!srcs.some((s) => s.includes('browser-key')), 'no key in a URL');
  log('with API keys: images and events load through URL tokens');
  check(problems.length === 0, 'no console errors or failed requests:\n  ' + problems.join('\n  '));
  await page.close();
}

// the plain daemon also serves the tiny Stable-Diffusion pipeline fixture as `sd`
const src = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');
const withPipeline = ['--model', `default=${src}/models/glyphs32`, '--model', `sd=${src}/tests/fixtures/sd_pipeline/tiny`];

let code = 0;
try {
  // --base/--keyed-base: daemons already running (the second with that key), for UI work
  const [plain, keyed] = args.base
    ? [args.base, args['keyed-base']]
    : await Promise.all([startDaemon({}, withPipeline), startDaemon({ DENOISED_API_KEYS: 'browser:browser-key-0123456789abcdef' })]);
  browser = await puppeteer.launch({ executablePath: chromium, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'] });
  log(`chromium ${await browser.version()}, daemons at ${plain} and ${keyed}`);
  await uiRun(plain);
  await keyRun(keyed);
  log(`passed; screenshots in ${path.resolve(args.out)}`);
} catch (e) {
  console.error('test_browser: FAILED: ' + e.message);
  code = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const d of daemons) {
    d.p.kill('SIGTERM');
    fs.rmSync(d.state, { recursive: true, force: true });
  }
}
process.exit(code);
