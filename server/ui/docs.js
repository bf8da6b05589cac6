// Renders /openapi.yaml as a reference page: the description, then every operation grouped by
// tag (parameters, request body, responses with their schemas), then the schemas. A small
// renderer of our own over the vendored js-yaml, so /docs works offline.
'use strict';
(function () {
  const doc = document.getElementById('doc');
  let spec = null;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }

  // The spec's Markdown subset: paragraphs, `code`, **bold**, [text](link) and "- " lists.
  function inline(text) {
    const frag = document.createDocumentFragment();
    const re = /`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)]+)\)/g;
    let last = 0, m;
    while ((m = re.exec(text))) {
      frag.append(text.slice(last, m.index));
      if (m[1] != null) frag.append(el('code', {}, m[1]));
      else if (m[2] != null) frag.append(el('strong', {}, m[2]));
      else frag.append(el('a', { href: m[4] }, m[3]));
      last = re.lastIndex;
    }
    frag.append(text.slice(last));
    return frag;
  }

  function markdown(text) {
    const box = el('div', { class: 'md' });
    for (const block of String(text || '').trim().split(/\n\s*\n/)) {
      const lines = block.split('\n');
      if (lines.every((l) => /^\s*- /.test(l) || /^\s{2,}\S/.test(l))) {
        const ul = el('ul');
        let li = null;
        for (const l of lines) {
          if (/^\s*- /.test(l)) ul.append((li = el('li', {}, inline(l.replace(/^\s*- /, '')))));
          else if (li) li.append(' ', inline(l.trim()));
        }
        box.append(ul);
      } else {
        box.append(el('p', {}, inline(lines.join(' '))));
      }
    }
    return box;
  }

  function refName(ref) { return ref.split('/').pop(); }

  function resolve(obj) {
    let o = obj;
    for (let i = 0; o && o.$ref && i < 16; i++) {
      const parts = o.$ref.replace(/^#\//, '').split('/');
      o = parts.reduce((a, p) => (a ? a[p] : undefined), spec);
    }
    return o || {};
  }

  function typeText(s) {
    if (!s) return 'any';
    if (s.$ref) return null;
    let t = Array.isArray(s.type) ? s.type.join(' | ') : s.type || (s.oneOf ? 'one of' : s.anyOf ? 'any of' : s.enum ? 'enum' : 'any');
    if (t === 'array' && s.items) t = 'array of ' + (s.items.$ref ? refName(s.items.$ref) : typeText(s.items));
    const bits = [];
    if (s.enum) bits.push(s.enum.map((v) => JSON.stringify(v)).join(', '));
    for (const k of ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'minItems', 'maxItems', 'pattern', 'default', 'format'])
      if (s[k] !== undefined) bits.push(k + ' ' + JSON.stringify(s[k]));
    return bits.length ? `${t} (${bits.join('; ')})` : t;
  }

  // A schema as a nested list; $refs become links to the schema section.
  function schemaView(s, depth) {
    if (!s) return el('span', {}, 'any');
    if (s.$ref) return el('a', { href: '#schema-' + refName(s.$ref) }, refName(s.$ref));
    const box = el('div', { class: 'schema' });
    box.append(el('span', { class: 'type' }, typeText(s)));
    if (s.description && depth > 0) box.append(markdown(s.description));
    const alts = s.oneOf || s.anyOf || s.allOf;
    if (alts) {
      const ul = el('ul');
      for (const a of alts) ul.append(el('li', {}, schemaView(a, depth + 1)));
      box.append(ul);
    }
    if (s.properties && depth < 6) {
      const req = new Set(s.required || []);
      const ul = el('ul', { class: 'props' });
      for (const [name, p] of Object.entries(s.properties))
        ul.append(el('li', {}, el('code', {}, name), req.has(name) ? el('span', { class: 'req' }, ' required ') : ' ', schemaView(p, depth + 1)));
      box.append(ul);
    }
    if (s.items && s.items.properties && depth < 6) box.append(schemaView(s.items, depth + 1));
    return box;
  }

  function operation(path, method, op, shared) {
    const id = op.operationId || method + path;
    const sum = el('summary', {}, el('span', { class: 'method m-' + method }, method.toUpperCase()), ' ', el('code', {}, path), ' ', op.summary || '');
    const box = el('details', { id: 'op-' + id }, sum);
    if (op.description) box.append(markdown(op.description));
    const params = [...(shared || []), ...(op.parameters || [])].map(resolve);
    if (params.length) {
      const tb = el('tbody');
      for (const p of params)
        tb.append(el('tr', {}, el('td', {}, el('code', {}, p.name)), el('td', {}, p.in + (p.required ? ', required' : '')), el('td', {}, schemaView(p.schema, 1), p.description ? markdown(p.description) : null)));
      box.append(el('h4', {}, 'Parameters'), el('table', {}, el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'name'), el('th', { scope: 'col' }, 'in'), el('th', { scope: 'col' }, 'schema'))), tb));
    }
    if (op.requestBody) {
      const rb = resolve(op.requestBody);
      box.append(el('h4', {}, 'Request body'));
      if (rb.description) box.append(markdown(rb.description));
      for (const [ct, media] of Object.entries(rb.content || {})) box.append(el('p', {}, el('code', {}, ct)), schemaView(media.schema, 0));
    }
    box.append(el('h4', {}, 'Responses'));
    const dl = el('dl');
    for (const [code, r0] of Object.entries(op.responses || {})) {
      const r = resolve(r0);
      const dd = el('dd', {}, markdown(r.description || ''));
      for (const [ct, media] of Object.entries(r.content || {})) dd.append(el('p', {}, el('code', {}, ct)), schemaView(media.schema, 0));
      dl.append(el('dt', {}, el('strong', {}, code)), dd);
    }
    box.append(dl);
    return box;
  }

  function render() {
    doc.textContent = '';
    const info = spec.info || {};
    doc.append(el('h2', {}, `${info.title || 'API'} ${info.version || ''}`), el('p', {}, info.summary || ''), markdown(info.description));
    const byTag = new Map();
    for (const [path, item] of Object.entries(spec.paths || {}))
      for (const m of ['get', 'post', 'put', 'patch', 'delete'])
        if (item[m]) {
          const tag = (item[m].tags || ['other'])[0];
          if (!byTag.has(tag)) byTag.set(tag, []);
          byTag.get(tag).push(operation(path, m, item[m], item.parameters));
        }
    for (const [tag, ops] of byTag) {
      const t = (spec.tags || []).find((x) => x.name === tag);
      const sec = el('section', { 'aria-labelledby': 'tag-' + tag }, el('h2', { id: 'tag-' + tag }, tag));
      if (t && t.description) sec.append(markdown(t.description));
      sec.append(...ops);
      doc.append(sec);
    }
    const schemas = (spec.components || {}).schemas || {};
    const sec = el('section', { 'aria-labelledby': 'schemas' }, el('h2', { id: 'schemas' }, 'Schemas'));
    for (const [name, s] of Object.entries(schemas)) {
      const d = el('details', { id: 'schema-' + name }, el('summary', {}, el('code', {}, name)));
      if (s.description) d.append(markdown(s.description));
      d.append(schemaView(s, 0));
      sec.append(d);
    }
    doc.append(sec);
    // a link to a schema opens it
    if (location.hash) {
      const t = document.getElementById(location.hash.slice(1));
      if (t && t.tagName === 'DETAILS') t.open = true;
    }
  }

  document.addEventListener('click', (ev) => {
    const a = ev.target.closest('a[href^="#schema-"]');
    if (!a) return;
    const t = document.getElementById(a.getAttribute('href').slice(1));
    if (t) t.open = true;
  });

  fetch('/openapi.yaml')
    .then((r) => {
      if (!r.ok) throw new Error(`GET /openapi.yaml: ${r.status}`);
      return r.text();
    })
    .then((text) => {
      spec = window.jsyaml.load(text);
      render();
    })
    .catch((e) => {
      doc.textContent = 'The specification could not be loaded: ' + e.message;
    });
})();
