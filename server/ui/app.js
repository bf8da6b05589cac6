// The web UI: builds job requests from the form, follows a job over EventSource (progress,
// previews, images), keeps this browser's jobs in localStorage as a gallery, and edits images
// (img2img, inpainting with a painted mask, inversion with a class change, boundary files).
// It uses the job API as openapi.yaml documents it; with API keys the key goes in headers only
// and <img>/EventSource URLs carry job-scoped tokens (POST /v1/jobs/{id}/token).
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const GALLERY_KEY = 'denoised.gallery.v1';
  const GALLERY_MAX = 50;
  const st = {
    key: sessionStorage.getItem('denoised.key') || '',
    auth: false,
    models: [],
    caps: null,
    tokens: new Map(), // job id -> {q, until}
    es: null,
    current: null,
    events: 0,
    input: null, // the input image at the model's size: ImageData
    mask: null, // Uint8Array, 1 = redraw
    boundary: null,
  };

  // ---- HTTP ----

  async function api(method, path, body) {
    const headers = {};
    if (st.key) headers.Authorization = 'Bearer ' + st.key;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await r.text();
    let j = null;
    try {
      j = text ? JSON.parse(text) : null;
    } catch (e) {
      j = null;
    }
    if (!r.ok) {
      const err = j && j.error ? j.error : { message: `${method} ${path}: HTTP ${r.status}` };
      const e = new Error(err.field ? `${err.message} (${err.field})` : err.message);
      e.status = r.status;
      throw e;
    }
    return j;
  }

  // The query that lets <img> and EventSource read a job: "" without keys, else a URL token.
  async function tokenQuery(id) {
    if (!st.auth) return '';
    const c = st.tokens.get(id);
    if (c && c.until > Date.now() + 60000) return c.q;
    const t = await api('POST', `/v1/jobs/${id}/token?ttl=900`);
    const q = t.token ? '?token=' + encodeURIComponent(t.token) : '';
    st.tokens.set(id, { q, until: Date.now() + 900000 });
    return q;
  }

  function showTop(msg) {
    const p = $('status-top');
    p.textContent = msg || '';
    p.hidden = !msg;
  }

  // ---- start-up: key, models, solvers ----

  async function load() {
    try {
      const [models, caps] = await Promise.all([api('GET', '/v1/models'), api('GET', '/v1/capabilities')]);
      st.models = models.models || [];
      st.caps = caps;
      st.auth = !!(caps.features && caps.features.auth);
      $('key-card').hidden = !st.auth;
      showTop('');
      fillForm();
      renderGallery();
    } catch (e) {
      if (e.status === 401 || e.status === 403) {
        st.auth = true;
        $('key-card').hidden = false;
        showTop(st.key ? 'That key was refused: ' + e.message : 'This server needs an API key: enter it above the form.');
        $('api-key').focus();
      } else {
        showTop('The server could not be reached: ' + e.message);
      }
    }
  }

  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    st.key = $('api-key').value.trim();
    sessionStorage.setItem('denoised.key', st.key);
    st.tokens.clear();
    load();
  });
  $('key-forget').addEventListener('click', () => {
    st.key = '';
    $('api-key').value = '';
    sessionStorage.removeItem('denoised.key');
    st.tokens.clear();
    load();
  });

  function option(sel, value, text, selected) {
    const o = document.createElement('option');
    o.value = value;
    o.textContent = text;
    if (selected) o.selected = true;
    sel.append(o);
  }

  function model() {
    return st.models.find((m) => m.name === $('model').value) || st.models[0] || {};
  }

  function classNames(m) {
    if (Array.isArray(m.class_labels) && m.class_labels.length) return m.class_labels;
    const n = m.num_classes || 0;
    return Array.from({ length: n }, (_, i) => String(i));
  }

  function fillForm() {
    const msel = $('model');
    const keep = msel.value;
    msel.textContent = '';
    for (const m of st.models) option(msel, m.name, m.default ? `${m.name} (default)` : m.name, keep ? m.name === keep : m.default);
    const ssel = $('solver');
    const skeep = ssel.value || 'dpm++2m';
    ssel.textContent = '';
    // usf runs a schedule file, which the API takes by name only: not offered here
    for (const s of st.caps.solvers || []) if (s.name !== 'usf') option(ssel, s.name, `${s.name}: ${s.summary}`, s.name === skeep);
    const lim = st.caps.limits || {};
    $('steps').max = lim.max_steps || 1000;
    $('batch').max = lim.max_batch || 16;
    onModel();
  }

  function onModel() {
    const m = model();
    const names = classNames(m);
    for (const id of ['class', 'source-class']) {
      const sel = $(id);
      const keep = sel.value;
      sel.textContent = '';
      names.forEach((n) => option(sel, n, n, n === keep));
    }
    const cond = names.length > 0;
    // a text-to-image model (a Stable-Diffusion pipeline) takes prompts instead of classes
    const text = !!m.text_conditional;
    $('class-box').hidden = !cond || text;
    $('class').disabled = !cond || text;
    $('prompt-box').hidden = !text;
    $('guidance').disabled = !cond && !text;
    if (text && st.textModel !== m.name) {
      // its own guidance default: the recommendation, else StableDiffusionPipeline's 7.5
      const rec = m.recommended && m.recommended.guidance_scale;
      $('guidance').value = rec >= 0 ? rec : 7.5;
    }
    st.textModel = text ? m.name : null;
    // latents: img2img and inpainting only, no previews
    $('preview-every').disabled = text;
    for (const o of $('edit-type').options) if (o.value === 'invert_ddpm' || o.value === 'boundary') o.disabled = o.hidden = text;
    if (text && $('edit-type').selectedOptions[0].disabled) {
      $('edit-type').value = '';
      onEditType();
    }
    $('class-hint').textContent = cond ? `(${names.length} classes)` : '';
    // a pixel UNet runs at the size it was trained at: the only size offered; a latent model
    // takes multiples of 8 latents up to twice its size (and the server's limit)
    const size = $('size');
    const keep = Number(size.value);
    size.textContent = '';
    const px = m.sample_size || 32;
    const step = text && m.sizes && m.sizes.multiple_of;
    const top = Math.min(2 * px, (st.caps.limits || {}).max_image_size || 2 * px);
    const sizes = step ? Array.from({ length: Math.floor(top / step) }, (_, i) => (i + 1) * step) : [px];
    for (const n of sizes) option(size, n, `${n} x ${n}`, sizes.includes(keep) ? n === keep : n === px);
    resetCanvas();
  }
  $('model').addEventListener('change', onModel);
  $('solver').addEventListener('change', () => {
    const s = (st.caps.solvers || []).find((x) => x.name === $('solver').value);
    if (s && s.default_steps) $('steps').value = Math.min(s.default_steps, 100);
  });

  // ---- editing: input image, mask, boundary ----

  function onEditType() {
    const t = $('edit-type').value;
    $('edit-input').hidden = !t;
    $('mask-tools').hidden = t !== 'inpaint';
    $('edit-strength-box').hidden = !(t === 'img2img' || t === 'inpaint' || t === 'boundary');
    $('edit-invert-box').hidden = t !== 'invert_ddpm';
    $('edit-boundary-box').hidden = t !== 'boundary';
    const hint = { img2img: '(0-1: the share of the steps that runs)', inpaint: '(0-1; 1 redraws the mask fully)', boundary: '(signed distance from the boundary; about +-1 to +-10)' };
    $('strength-hint').textContent = hint[t] || '';
    // each edit's strength has its own scale: a value of another one is put back in range
    const v = Number($('strength').value);
    if (t === 'img2img' && !(v > 0 && v <= 1)) $('strength').value = 0.6;
    if (t === 'inpaint' && !(v > 0 && v <= 1)) $('strength').value = 1;
    if (t === 'boundary' && v > 0 && v <= 1) $('strength').value = 6;
    drawCanvas();
  }
  $('edit-type').addEventListener('change', onEditType);

  function px() {
    return Number($('size').value) || 32;
  }

  function resetCanvas() {
    const n = px();
    const c = $('input-canvas');
    c.width = c.height = n;
    st.input = null;
    st.mask = new Uint8Array(n * n);
    drawCanvas();
  }

  function drawCanvas() {
    const c = $('input-canvas');
    const ctx = c.getContext('2d');
    const n = c.width;
    ctx.clearRect(0, 0, n, n);
    if (st.input) ctx.putImageData(st.input, 0, 0);
    if ($('edit-type').value === 'inpaint' && st.mask) {
      const over = ctx.getImageData(0, 0, n, n);
      for (let i = 0; i < n * n; i++)
        if (st.mask[i]) {
          over.data[4 * i] = Math.round(over.data[4 * i] * 0.4 + 255 * 0.6);
          over.data[4 * i + 1] = Math.round(over.data[4 * i + 1] * 0.4);
          over.data[4 * i + 2] = Math.round(over.data[4 * i + 2] * 0.4);
          over.data[4 * i + 3] = 255;
        }
      ctx.putImageData(over, 0, 0);
    }
    const masked = st.mask ? st.mask.reduce((a, b) => a + b, 0) : 0;
    c.setAttribute('aria-label', st.input ? `Input image, ${n} x ${n}` + ($('edit-type').value === 'inpaint' ? `, ${masked} of ${n * n} pixels masked` : '') : 'No input image yet');
  }

  // An image (file, blob or URL) scaled to the model's size.
  async function setInput(src) {
    const img = new Image();
    const url = typeof src === 'string' ? src : URL.createObjectURL(src);
    img.src = url;
    try {
      await img.decode();
    } finally {
      if (typeof src !== 'string') URL.revokeObjectURL(url);
    }
    const n = px();
    const c = document.createElement('canvas');
    c.width = c.height = n;
    const ctx = c.getContext('2d');
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(img, 0, 0, n, n);
    st.input = ctx.getImageData(0, 0, n, n);
    for (let i = 3; i < st.input.data.length; i += 4) st.input.data[i] = 255;
    drawCanvas();
  }

  $('input-file').addEventListener('change', () => {
    const f = $('input-file').files[0];
    if (f) setInput(f).catch((e) => ($('form-error').textContent = 'That image could not be read: ' + e.message));
  });
  const drop = $('drop');
  drop.addEventListener('dragover', (ev) => {
    ev.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    const f = ev.dataTransfer.files[0];
    if (f) setInput(f).catch((e) => ($('form-error').textContent = 'That image could not be read: ' + e.message));
  });

  function paint(ev) {
    const c = $('input-canvas');
    const r = c.getBoundingClientRect();
    const n = c.width;
    const x = ((ev.clientX - r.left) / r.width) * n, y = ((ev.clientY - r.top) / r.height) * n;
    const rad = Number($('brush').value);
    for (let j = 0; j < n; j++)
      for (let i = 0; i < n; i++) if ((i + 0.5 - x) ** 2 + (j + 0.5 - y) ** 2 <= rad * rad) st.mask[j * n + i] = 1;
    drawCanvas();
  }
  let painting = false;
  $('input-canvas').addEventListener('pointerdown', (ev) => {
    if ($('edit-type').value !== 'inpaint') return;
    painting = true;
    $('input-canvas').setPointerCapture(ev.pointerId);
    paint(ev);
  });
  $('input-canvas').addEventListener('pointermove', (ev) => painting && paint(ev));
  $('input-canvas').addEventListener('pointerup', () => (painting = false));

  document.querySelectorAll('[data-mask]').forEach((b) =>
    b.addEventListener('click', () => {
      const n = $('input-canvas').width;
      const what = b.dataset.mask;
      for (let j = 0; j < n; j++)
        for (let i = 0; i < n; i++) {
          const k = j * n + i;
          const h = n / 2, q = n / 4;
          const set = { clear: 0, all: 1, invert: 1 - st.mask[k], left: i < h ? 1 : st.mask[k], right: i >= h ? 1 : st.mask[k], top: j < h ? 1 : st.mask[k], bottom: j >= h ? 1 : st.mask[k], centre: i >= q && i < n - q && j >= q && j < n - q ? 1 : st.mask[k] }[what];
          st.mask[k] = set;
        }
      drawCanvas();
    })
  );

  $('boundary-file').addEventListener('change', async () => {
    const f = $('boundary-file').files[0];
    st.boundary = null;
    if (!f) return;
    try {
      st.boundary = JSON.parse(await f.text());
      $('form-error').textContent = '';
    } catch (e) {
      $('form-error').textContent = 'The boundary file is not JSON: ' + e.message;
    }
  });

  function pngOf(fill) {
    const n = $('input-canvas').width;
    const c = document.createElement('canvas');
    c.width = c.height = n;
    const ctx = c.getContext('2d');
    const im = ctx.createImageData(n, n);
    fill(im.data, n);
    ctx.putImageData(im, 0, 0);
    return c.toDataURL('image/png');
  }

  // ---- the request ----

  function intField(id, lo, hi, what) {
    const v = Number($(id).value);
    if (!Number.isInteger(v) || v < lo || v > hi) throw new Error(`${what} must be a whole number in [${lo}, ${hi}]`);
    return v;
  }

  function buildRequest() {
    const m = model();
    const lim = st.caps.limits || {};
    const steps = intField('steps', 1, lim.max_steps || 1000, 'Steps');
    const req = {
      model: m.name,
      batch_size: intField('batch', 1, lim.max_batch || 16, 'Images'),
      seed: intField('seed', -1, 9007199254740991, 'Seed'),
      width: px(),
      height: px(),
      scheduler: { name: $('solver').value, steps },
    };
    const names = classNames(m);
    if (m.text_conditional) {
      req.prompt = $('prompt').value;
      const neg = $('negative-prompt').value;
      if (neg) req.negative_prompt = neg;
      const g = Number($('guidance').value);
      if (!(g >= 0 && g <= 50)) throw new Error('Guidance scale must be in [0, 50]');
      req.guidance = { scale: g };
    } else if (names.length) {
      req.class_label = Array.isArray(m.class_labels) && m.class_labels.length ? $('class').value : Number($('class').value);
      const g = Number($('guidance').value);
      if (!(g >= 0 && g <= 50)) throw new Error('Guidance scale must be in [0, 50]');
      if (g !== 1) req.guidance = { scale: g };
    }
    const type = $('edit-type').value;
    const every = intField('preview-every', 0, steps, 'Preview every');
    if (every > 0 && !type && !m.text_conditional) req.preview = { every }; // none of latents
    if (!type) return req;
    if (type !== 'boundary' && !st.input) throw new Error('Choose an input image for this edit');
    if (st.input) req.input_image = pngOf((d) => d.set(st.input.data));
    const strength = Number($('strength').value);
    if (type === 'img2img' || type === 'inpaint') {
      if (!(strength > 0 && strength <= 1)) throw new Error('Strength must be in (0, 1]');
      req.edit = { type, strength };
      if (type === 'inpaint') {
        if (!st.mask.some((v) => v)) throw new Error('Paint the mask first (red is redrawn)');
        req.mask = pngOf((d, n) => {
          for (let i = 0; i < n * n; i++) {
            d[4 * i] = d[4 * i + 1] = d[4 * i + 2] = st.mask[i] ? 255 : 0;
            d[4 * i + 3] = 255;
          }
        });
      }
    } else if (type === 'invert_ddpm') {
      // edit-friendly inversion runs on DDIM's grid
      req.scheduler = { name: 'ddim', steps };
      const src = Array.isArray(m.class_labels) && m.class_labels.length ? $('source-class').value : Number($('source-class').value);
      req.edit = { type, source_class: src, skip: intField('skip', 0, steps - 1, 'Skip') };
    } else if (type === 'boundary') {
      if (!st.boundary) throw new Error('Choose a boundary file');
      if (!Number.isFinite(strength)) throw new Error('Strength must be a number');
      delete req.scheduler; // the boundary's own DDIM grid
      req.edit = { type, boundary: st.boundary, strength };
    }
    return req;
  }

  // ---- running a job ----

  $('gen-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('form-error').textContent = '';
    let req;
    try {
      req = buildRequest();
    } catch (e) {
      $('form-error').textContent = e.message;
      return;
    }
    $('go').disabled = true;
    try {
      const job = await api('POST', '/v1/jobs', req);
      remember(job, req);
      follow(job.id).catch((e) => setStatus(`Job ${job.id}: cannot follow it: ${e.message}`));
    } catch (e) {
      $('form-error').textContent = 'Not accepted: ' + e.message;
    } finally {
      $('go').disabled = false;
    }
  });

  $('cancel').addEventListener('click', async () => {
    if (!st.current) return;
    try {
      await api('DELETE', `/v1/jobs/${st.current}`);
    } catch (e) {
      $('run-status').textContent = 'Cancel: ' + e.message;
    }
  });

  function setStatus(text) {
    $('run-status').textContent = text;
  }

  function img(src, alt) {
    const i = document.createElement('img');
    i.src = src;
    i.alt = alt;
    i.width = i.height = 96;
    return i;
  }

  async function follow(id) {
    if (st.es) st.es.close();
    st.current = id;
    st.events = 0;
    $('event-count').textContent = '0';
    $('previews').textContent = '';
    $('results').textContent = '';
    $('run-bar').value = 0;
    $('cancel').disabled = false;
    setStatus(`Job ${id}: submitted.`);
    const q = await tokenQuery(id);
    const es = new EventSource(`/v1/jobs/${id}/events${q}`);
    st.es = es;
    const data = (e) => JSON.parse(e.data);
    es.addEventListener('queued', (e) => setStatus(`Job ${id}: queued, position ${data(e).position}.`));
    es.addEventListener('started', () => setStatus(`Job ${id}: running.`));
    es.addEventListener('progress', (e) => {
      const d = data(e);
      st.events++;
      $('event-count').textContent = String(st.events);
      $('run-bar').max = d.total;
      $('run-bar').value = d.step;
      setStatus(`Job ${id}: step ${d.step} of ${d.total} (NFE ${d.nfe}, about ${d.eta} s left).`);
      if (d.preview) {
        const box = $('previews');
        box.append(img(d.preview, `Preview at step ${d.step} of ${d.total}`));
        while (box.children.length > 8) box.firstChild.remove();
      }
    });
    es.addEventListener('image', (e) => {
      const d = data(e);
      const a = document.createElement('a');
      a.href = d.url + q;
      a.download = `${id}-${d.index}.png`;
      a.append(img(d.url + q, `Image ${d.index + 1} of job ${id}`));
      $('results').append(a);
    });
    const end = (what) => (e) => {
      const d = e.data ? data(e) : {};
      es.close();
      if (st.es === es) st.es = null;
      $('cancel').disabled = true;
      if (what === 'done') $('run-bar').value = $('run-bar').max;
      setStatus(what === 'failed' ? `Job ${id} failed: ${d.error || d.reason || 'see the gallery'}.` : `Job ${id}: ${what}.`);
      refreshEntry(id);
    };
    es.addEventListener('done', end('done'));
    es.addEventListener('failed', end('failed'));
    es.addEventListener('cancelled', end('cancelled'));
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED && st.es === es) setStatus(`Job ${id}: the event stream closed.`);
    };
  }

  // ---- the gallery (localStorage) ----

  function gallery() {
    try {
      return JSON.parse(localStorage.getItem(GALLERY_KEY) || '[]');
    } catch (e) {
      return [];
    }
  }

  function saveGallery(g) {
    localStorage.setItem(GALLERY_KEY, JSON.stringify(g.slice(0, GALLERY_MAX)));
  }

  function remember(job, req) {
    const g = gallery().filter((x) => x.id !== job.id);
    const small = { ...req };
    delete small.input_image; // the picture is not kept: the job's view says whether it had one
    delete small.mask;
    if (small.edit && small.edit.boundary) small.edit = { ...small.edit, boundary: { attribute: small.edit.boundary.attribute || 'boundary' } };
    g.unshift({ id: job.id, created: Date.now(), request: small, seed: job.seed });
    saveGallery(g);
    renderGallery();
  }

  function summary(r, m) {
    const names = classNames(m || {});
    let cls = r.class_label;
    if (typeof cls === 'number' && names[cls] !== undefined) cls = names[cls];
    const bits = [];
    if (cls !== undefined) bits.push(`class ${cls}`);
    if (r.prompt !== undefined) bits.push(`“${r.prompt.length > 60 ? r.prompt.slice(0, 60) + '…' : r.prompt}”`);
    if (r.negative_prompt) bits.push(`not “${r.negative_prompt.length > 30 ? r.negative_prompt.slice(0, 30) + '…' : r.negative_prompt}”`);
    if (r.scheduler) bits.push(`${r.scheduler.name} ${r.scheduler.steps || ''} steps`);
    if (r.guidance) bits.push(`guidance ${r.guidance.scale}`);
    bits.push(`seed ${r.seed}`);
    if (r.batch_size > 1) bits.push(`${r.batch_size} images`);
    if (r.edit) bits.push(`edit ${r.edit.type}`);
    return bits.join(' · ');
  }

  // The A1111 infotext of a PNG (its tEXt "parameters" chunk).
  function pngText(buf, keyword) {
    const b = new Uint8Array(buf);
    const dv = new DataView(buf);
    for (let p = 8; p + 8 <= b.length; ) {
      const len = dv.getUint32(p);
      const type = String.fromCharCode(...b.subarray(p + 4, p + 8));
      if (type === 'tEXt') {
        const d = b.subarray(p + 8, p + 8 + len);
        const z = d.indexOf(0);
        if (new TextDecoder('latin1').decode(d.subarray(0, z)) === keyword) return new TextDecoder('latin1').decode(d.subarray(z + 1));
      }
      if (type === 'IEND') break;
      p += 12 + len;
    }
    return null;
  }

  function button(text, fn, label) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = text;
    if (label) b.setAttribute('aria-label', label);
    b.addEventListener('click', fn);
    return b;
  }

  async function renderEntry(li, entry) {
    li.textContent = '';
    const m = st.models.find((x) => x.name === entry.request.model) || model();
    const h = document.createElement('h3');
    h.textContent = `Job ${entry.id.slice(-8)}`;
    h.style.fontSize = '1rem';
    h.style.margin = '0';
    const meta = document.createElement('p');
    meta.className = 'meta';
    meta.textContent = `${new Date(entry.created).toLocaleString()} · ${summary(entry.view ? entry.view.request : entry.request, m)}`;
    const state = document.createElement('p');
    state.className = 'meta';
    state.setAttribute('aria-live', 'polite');
    li.append(h, meta, state);
    const v = entry.view;
    state.textContent = entry.gone ? 'State: no longer on the server (expired).' : v ? `State: ${v.state}${v.error ? ' — ' + v.error.message : ''}` : 'State: loading...';
    const imgs = document.createElement('div');
    imgs.className = 'images';
    li.append(imgs);
    const acts = document.createElement('div');
    const short = entry.id.slice(-8);
    acts.append(button('Reuse these settings', () => reuse(entry), `Reuse these settings of job ${short}`));
    if (v && (v.state === 'queued' || v.state === 'running') && st.current !== entry.id)
      acts.append(button('Watch progress', () => follow(entry.id).catch((e) => setStatus(`Job ${entry.id}: cannot follow it: ${e.message}`)), `Watch the progress of job ${short}`));
    if (v && (v.state === 'queued' || v.state === 'running'))
      acts.append(
        button('Cancel', async () => {
          try {
            await api('DELETE', `/v1/jobs/${entry.id}`);
          } catch (e) {
            state.textContent = 'Cancel: ' + e.message;
          }
          refreshEntry(entry.id);
        }, `Cancel job ${short}`)
      );
    acts.append(button('Delete', () => forget(entry.id), `Delete job ${short} from this gallery`));
    li.append(acts);
    if (!v || v.state !== 'succeeded') return;
    const q = await tokenQuery(entry.id);
    v.images.forEach((im) => {
      const fig = document.createElement('div');
      const a = document.createElement('a');
      a.href = im.url + q;
      a.download = `${entry.id}-${im.index}.png`;
      a.append(img(im.url + q, `Image ${im.index + 1} of job ${short}, ${summary(v.request, m)}`));
      const dl = document.createElement('a');
      dl.href = im.url + q;
      dl.download = `${entry.id}-${im.index}.png`;
      dl.textContent = `Download image ${im.index + 1}`;
      dl.setAttribute('aria-label', `Download image ${im.index + 1} of job ${short}`);
      const ed = button('Edit', () => editFrom(im.url + q), `Edit image ${im.index + 1} of job ${short}`);
      fig.append(a, document.createElement('br'), dl, ' ', ed);
      imgs.append(fig);
    });
    if (v.images.length) {
      const det = document.createElement('details');
      const sm = document.createElement('summary');
      sm.textContent = 'Infotext';
      const pre = document.createElement('pre');
      pre.className = 'infotext';
      det.append(sm, pre);
      det.addEventListener('toggle', async () => {
        if (!det.open || pre.textContent) return;
        try {
          const r = await fetch(v.images[0].url + q);
          pre.textContent = pngText(await r.arrayBuffer(), 'parameters') || '(none)';
        } catch (e) {
          pre.textContent = 'Could not read the image: ' + e.message;
        }
      });
      li.append(det);
    }
  }

  async function refreshEntry(id) {
    const g = gallery();
    const entry = g.find((x) => x.id === id);
    if (!entry) return;
    try {
      entry.view = await api('GET', `/v1/jobs/${id}`);
    } catch (e) {
      if (e.status === 404) entry.gone = true;
    }
    const li = document.querySelector(`#gallery li[data-id="${id}"]`);
    if (li) await renderEntry(li, entry).catch((e) => (li.querySelector('.meta').textContent += ` (${e.message})`));
  }

  function renderGallery() {
    const ul = $('gallery');
    ul.textContent = '';
    const g = gallery();
    $('gallery-empty').hidden = g.length > 0;
    for (const entry of g) {
      const li = document.createElement('li');
      li.dataset.id = entry.id;
      ul.append(li);
      renderEntry(li, entry)
        .catch(() => {})
        .then(() => refreshEntry(entry.id));
    }
  }

  function forget(id) {
    saveGallery(gallery().filter((x) => x.id !== id));
    renderGallery();
    setStatus(`Job ${id} removed from this gallery (the server keeps its results until they expire).`);
  }

  function reuse(entry) {
    const r = (entry.view && entry.view.request) || entry.request;
    if (r.model && st.models.some((m) => m.name === r.model)) {
      $('model').value = r.model;
      onModel();
    }
    const names = classNames(model());
    const cls = typeof r.class_label === 'number' ? names[r.class_label] : r.class_label;
    if (cls !== undefined) $('class').value = cls;
    if (r.prompt !== undefined) $('prompt').value = r.prompt;
    $('negative-prompt').value = r.negative_prompt || '';
    if (r.width && [...$('size').options].some((o) => Number(o.value) === r.width)) {
      $('size').value = r.width;
      resetCanvas();
    }
    if (r.scheduler) {
      $('solver').value = r.scheduler.name;
      if (r.scheduler.steps) $('steps').value = r.scheduler.steps;
    }
    $('guidance').value = r.guidance ? r.guidance.scale : 1;
    $('seed').value = r.seed;
    $('batch').value = r.batch_size || 1;
    $('preview-every').value = r.preview ? r.preview.every : 0;
    $('edit-type').value = r.edit && ['img2img', 'inpaint', 'invert_ddpm', 'boundary'].includes(r.edit.type) ? r.edit.type : '';
    if (r.edit && r.edit.strength !== undefined) $('strength').value = r.edit.strength;
    onEditType();
    setStatus('Settings loaded into the form.');
    $('model').focus();
  }

  async function editFrom(url) {
    if (!$('edit-type').value) $('edit-type').value = 'img2img';
    onEditType();
    try {
      const r = await fetch(url);
      await setInput(await r.blob());
      setStatus('The image is the input now: pick the edit and press Generate.');
      $('edit-type').focus();
    } catch (e) {
      $('form-error').textContent = 'That image could not be loaded: ' + e.message;
    }
  }

  $('api-key').value = st.key;
  load();
})();
