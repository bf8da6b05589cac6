// ONNX Runtime side of bench/peers: loads one exported UNet (tools/export_onnx.py), times
// forwards on the CPU provider and prints one JSON line (median, load time, peak RSS).
//
//   node tools/onnxruntime/run.mjs --model M.onnx --batch B --size S [--channels 3]
//        [--classes 0|1] [--threads 2] [--warmup 2] [--reps 5] [--max-seconds 120]
//        [--input X.f32 --output Y.f32]
//
// --input/--output: raw little-endian float32 [B, C, S, S] in and the model output out (one
// untimed forward, for the harness's cross-check); without them the input is Gaussian noise.
// Threads: intra-op T, inter-op 1, sequential execution, every graph optimization on, so
// ORT gets the same two cores as the others and its best fused graph.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

function fail(msg) {
  process.stderr.write(`onnxruntime/run: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const a = { channels: 3, classes: 0, threads: 2, warmup: 2, reps: 5, 'max-seconds': 120 };
  const ints = new Set(['batch', 'size', 'channels', 'classes', 'threads', 'warmup', 'reps']);
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '');
    const v = argv[i + 1];
    if (!argv[i].startsWith('--') || v === undefined) fail(`bad argument ${argv[i]}`);
    if (ints.has(k) || k === 'max-seconds') {
      const n = Number(v);
      if (!Number.isFinite(n) || n < 0 || (ints.has(k) && !Number.isInteger(n)))
        fail(`--${k} wants a non-negative number, got '${v}'`);
      a[k] = n;
    } else if (['model', 'input', 'output'].includes(k)) {
      a[k] = v;
    } else {
      fail(`unknown option --${k}`);
    }
  }
  if (!a.model || !a.batch || !a.size) fail('--model, --batch and --size are required');
  if (a.reps < 1 || a.threads < 1) fail('--reps and --threads must be at least 1');
  return a;
}

function peakRssMb() {
  const m = readFileSync('/proc/self/status', 'utf8').match(/VmHWM:\s+(\d+)/);
  return m ? Number(m[1]) / 1024 : null;
}

// Box-Muller over a fixed LCG: reproducible noise without a dependency
function gaussian(n) {
  const out = new Float32Array(n);
  let s = 12345n;
  const next = () => {
    s = (s * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn;
    return (Number(s >> 11n) + 1) / 2 ** 53;
  };
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(next())), th = 2 * Math.PI * next();
    out[i] = r * Math.cos(th);
    if (i + 1 < n) out[i + 1] = r * Math.sin(th);
  }
  return out;
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  let ort;
  try {
    ort = require('onnxruntime-node');
  } catch (e) {
    fail('onnxruntime-node is not installed (scripts/install-deps.sh --peers)');
  }
  const n = a.batch * a.channels * a.size * a.size;
  let x;
  if (a.input) {
    const buf = readFileSync(a.input);
    if (buf.length !== 4 * n) fail(`${a.input}: ${buf.length} bytes, expected ${4 * n}`);
    x = new Float32Array(buf.buffer, buf.byteOffset, n).slice();
  } else {
    x = gaussian(n);
  }
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(a.model, {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    executionMode: 'sequential',
    intraOpNumThreads: a.threads,
    interOpNumThreads: 1,
  });
  const loadMs = performance.now() - t0;
  const feeds = {
    sample: new ort.Tensor('float32', x, [a.batch, a.channels, a.size, a.size]),
    timestep: new ort.Tensor('float32', new Float32Array(a.batch).fill(500), [a.batch]),
  };
  if (a.classes) feeds.class_labels = new ort.Tensor('int64', new BigInt64Array(a.batch), [a.batch]);
  if (a.output) {
    const r = await session.run(feeds);
    const y = r.eps.data;
    writeFileSync(a.output, Buffer.from(y.buffer, y.byteOffset, y.byteLength));
  }
  for (let i = 0; i < a.warmup; i++) await session.run(feeds);
  const times = [];
  const deadline = performance.now() + 1000 * a['max-seconds'];
  for (let i = 0; i < a.reps; i++) {
    const s = performance.now();
    const r = await session.run(feeds);
    times.push(performance.now() - s);
    if (!r.eps.data.every(Number.isFinite)) fail('non-finite output');
    if (i >= 2 && performance.now() > deadline) break;
  }
  times.sort((p, q) => p - q);
  const med = times.length % 2 ? times[(times.length - 1) / 2]
                               : (times[times.length / 2 - 1] + times[times.length / 2]) / 2;
  process.stdout.write(JSON.stringify({
    ms_per_forward: med, ms_per_image: med / a.batch, min_ms: times[0], runs: times.length,
    load_ms: loadMs, peak_rss_mb: peakRssMb(), threads: a.threads,
    onnxruntime: require('onnxruntime-node/package.json').version,
  }) + '\n');
}

main().catch((e) => fail(e && e.message ? e.message : String(e)));
