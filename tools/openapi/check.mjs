// Validates openapi.yaml with a real OpenAPI 3.1 validator (swagger-parser: the spec against the
// official schema, all $refs resolvable), then, if given a JSONL file of recorded responses
// ({method, path, status, content_type, headers, body}), checks each against the operation it
// hit: documented status, documented media type, JSON body valid against the schema (Ajv,
// JSON Schema 2020-12 as OpenAPI 3.1 uses).
// Usage: node tools/openapi/check.mjs openapi.yaml [responses.jsonl]
import SwaggerParser from '@apidevtools/swagger-parser';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import fs from 'node:fs';

const [specPath, recorded] = process.argv.slice(2);
if (!specPath) {
  console.error('usage: check.mjs openapi.yaml [responses.jsonl]');
  process.exit(2);
}
let api;
try {
  api = await SwaggerParser.validate(specPath);
} catch (e) {
  console.error(`openapi: ${specPath} is invalid: ${e.message}`);
  process.exit(1);
}
if (!String(api.openapi).startsWith('3.1')) {
  console.error(`openapi: expected OpenAPI 3.1, found ${api.openapi}`);
  process.exit(1);
}
const nops = Object.values(api.paths).reduce(
  (n, p) => n + ['get', 'post', 'delete', 'put', 'patch'].filter((m) => p[m]).length, 0);
console.log(`openapi: ${specPath} is a valid OpenAPI ${api.openapi} document (${nops} operations)`);
if (!recorded) process.exit(0);

const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
const templates = Object.keys(api.paths).map((t) => ({
  t,
  re: new RegExp('^' + t.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{[^}]+\\?\}/g, '[^/]+') + '$'),
}));
let checked = 0;
const failures = [];
for (const line of fs.readFileSync(recorded, 'utf8').split('\n')) {
  if (!line.trim()) continue;
  const r = JSON.parse(line);
  const path = r.path.split('?')[0];
  const where = `${r.method} ${r.path} -> ${r.status}`;
  const tpl = templates.find((x) => x.re.test(path));
  if (!tpl) { failures.push(`${where}: path not in the spec`); continue; }
  const op = api.paths[tpl.t][r.method.toLowerCase()];
  if (!op) { failures.push(`${where}: method not in the spec`); continue; }
  const resp = op.responses[String(r.status)] || op.responses.default;
  if (!resp) { failures.push(`${where}: status not documented`); continue; }
  for (const [h, def] of Object.entries(resp.headers || {})) {
    if (['Location', 'Retry-After', 'WWW-Authenticate'].includes(h) &&
        !Object.keys(r.headers || {}).some((k) => k.toLowerCase() === h.toLowerCase()))
      failures.push(`${where}: header ${h} documented but missing`);
    void def;
  }
  const ctype = (r.content_type || '').split(';')[0].trim();
  if (!resp.content) {
    if (r.body) failures.push(`${where}: a body where none is documented`);
    checked++;
    continue;
  }
  const media = resp.content[ctype];
  if (!media) { failures.push(`${where}: content type '${ctype}' not documented`); continue; }
  if (ctype === 'text/event-stream' && r.body) {
    // every event's data against the Event schema, ids increasing and equal to data.seq
    const validate = ajv.compile(api.components.schemas.Event);
    let last = 0;
    for (const block of r.body.split('\n\n')) {
      const id = /^id: (\d+)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
      if (!id || !data) continue;
      const ev = JSON.parse(data[1]);
      if (!validate(ev)) failures.push(`${where}: event ${id[1]}: ${ajv.errorsText(validate.errors)}`);
      if (Number(id[1]) <= last || ev.seq !== Number(id[1]))
        failures.push(`${where}: event ${id[1]}: id out of order or not its seq`);
      last = Number(id[1]);
    }
  }
  if (ctype === 'application/json') {
    let body;
    try { body = JSON.parse(r.body); } catch { failures.push(`${where}: body is not JSON`); continue; }
    const validate = ajv.compile(media.schema);
    if (!validate(body))
      failures.push(`${where}: ${ajv.errorsText(validate.errors)}\n    body: ${r.body.slice(0, 300)}`);
  }
  checked++;
}
for (const f of failures) console.error(`openapi: ${f}`);
console.log(`openapi: ${checked} responses checked against the spec, ${failures.length} failures`);
process.exit(failures.length ? 1 : 0);
