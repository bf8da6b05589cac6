/* DPM-OT (Li et al. 2023, cognaclee/DPM-OT @b7956eb): the semi-discrete optimal-transport map from
 * a uniform source to noised data latents at an intermediate step (the "expressway"), fitted as
 * the authors' ot_utils/optimal_transport.py does, and the sampler that maps and then runs the
 * remaining steps of an ordinary solver. The map file: a JSON header (format
 * "denoised-ot-map") with the targets [N, C, H, W] and the Brenier potential's intercepts h [N]
 * in two .npy files beside it. */

/* Where this follows the code rather than the paper: the source is U[0, 1]^d (torch.rand), not
 * Gaussian, both for the fit and at sampling; the potential is u_h(x) = max_i <x, y_i> + h_i with
 * the argmax taken in float32 over all targets (first index on ties, as their batched max does);
 * the dual step is their Adam-like update (m, v with 0.9 / 0.999, lr 0.1, eps 1e-8, then h
 * centred); the measure is the histogram of 10 N / batch source samples per iteration; after 50
 * iterations without a new best gradient norm (at most 3 times) the samples double and lr is
 * multiplied by 0.8; the result is the last h (their sampler uses the object's h, not h_best).
 * Deviations: the stop test (g_norm < 8e-4 with no empty cell) counts the empty cells every
 * iteration, where their code reads a count refreshed every 50th (and fails with a NameError if
 * the norm drops before iteration 49); the targets are the model's VP latents at a solver step
 * (x_t = sqrt(abar) x0 + sqrt(1 - abar) z) instead of an NCSN's VE levels, and the remaining
 * steps are that solver's, not annealed Langevin dynamics. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "gemm.h"
#include "mem.h"
#include "npy.h"
#include "rng.h"
#include "sampler_impl.h"

#define OT_MAX_TARGETS 100000
#define OT_COLS 256 /* source samples scored per gemm */

void sampler_ot_free(struct ot_map *m) {
  if (!m)
    return;
  free(m->targets);
  free(m->h);
  free(m);
}

/* Scores <y_i, x_s> + h_i of cols source points (x: cols * d) against every target, and the
 * first argmax per point. xt is d * OT_COLS scratch, sc n * OT_COLS, gs the gemm scratch. */
static void assign_block(const gemm_packed *P, const float *h, int n, size_t d, const float *x,
                         int cols, int *idx, float *xt, float *sc, float *gs) {
  for (int c = 0; c < cols; c++)
    for (size_t k = 0; k < d; k++)
      xt[k * cols + c] = x[(size_t)c * d + k];
  gemm_run(P, 0, n, xt, cols, cols, sc, cols, 0, gs);
  for (int c = 0; c < cols; c++) {
    int best = 0;
    float bv = sc[c] + h[0];
    for (int i = 1; i < n; i++) {
      const float v = sc[(size_t)i * cols + c] + h[i];
      if (v > bv) {
        bv = v;
        best = i;
      }
    }
    idx[c] = best;
  }
}

typedef struct ot_scorer {
  gemm_packed P;
  float *xt, *sc, *gs;
} ot_scorer;

static void scorer_free(ot_scorer *s) {
  gemm_packed_free(&s->P);
  free(s->xt);
  free(s->sc);
  free(s->gs);
}

static int scorer_new(ot_scorer *s, const float *targets, int n, size_t d, err *e) {
  memset(s, 0, sizeof *s);
  s->xt = mem_malloc(d * OT_COLS * sizeof *s->xt);
  s->sc = mem_malloc((size_t)n * OT_COLS * sizeof *s->sc);
  s->gs = mem_malloc(gemm_scratch_floats((int)d, OT_COLS) * sizeof *s->gs);
  if (!s->xt || !s->sc || !s->gs || gemm_pack_a(&s->P, targets, n, (int)d) != 0) {
    scorer_free(s);
    return err_set(e, ERR_NOMEM, "out of memory for %d transport targets", n);
  }
  return ERR_OK;
}

static void scorer_assign(ot_scorer *s, const float *h, int n, size_t d, const float *x, int m,
                          int *idx) {
  for (int c0 = 0; c0 < m; c0 += OT_COLS) {
    const int cols = m - c0 < OT_COLS ? m - c0 : OT_COLS;
    assign_block(&s->P, h, n, d, x + (size_t)c0 * d, cols, idx + c0, s->xt, s->sc, s->gs);
  }
}

int sampler_ot_assign(const float *targets, const float *h, int n, size_t d, const float *x, int m,
                      int *idx, err *e) {
  ot_scorer s;
  int rc = scorer_new(&s, targets, n, d, e);
  if (rc != ERR_OK)
    return rc;
  scorer_assign(&s, h, n, d, x, m, idx);
  scorer_free(&s);
  return ERR_OK;
}

static int default_source(void *user, int iteration, int batch, float *out, size_t count, err *e) {
  (void)e;
  rng_uniform(*(const uint64_t *)user, (uint64_t)iteration, (uint64_t)batch, out, count);
  return ERR_OK;
}

/* The histogram of nb batches of bs source points over the cells (cal_measure). */
static int measure(ot_scorer *s, const sampler_ot_fit_opts *o, const float *h, int n, size_t d,
                   int it, int nb, int bs, float *src, int *idx, double *cnt, err *e) {
  sampler_ot_source_fn src_fn = o->source ? o->source : default_source;
  void *user = o->source ? o->source_user : (void *)&o->seed;
  memset(cnt, 0, (size_t)n * sizeof *cnt);
  for (int b = 0; b < nb; b++) {
    int rc = src_fn(user, it, b, src, (size_t)bs * d, e);
    if (rc != ERR_OK)
      return rc;
    scorer_assign(s, h, n, d, src, bs, idx);
    for (int k = 0; k < bs; k++)
      cnt[idx[k]] += 1;
  }
  return ERR_OK;
}

int sampler_ot_fit(const float *targets, int n, size_t d, const sampler_ot_fit_opts *o, float *h,
                   sampler_ot_fit_report *rep, err *e) {
  if (n < 2 || n > OT_MAX_TARGETS)
    return err_set(e, ERR_INVALID, "transport targets: 2 to %d, not %d", OT_MAX_TARGETS, n);
  if (o->batch < 1 || o->max_iter < 1 || !(o->lr > 0))
    return err_set(e, ERR_INVALID, "transport fit: batch, iterations and lr must be positive");
  int nb = 10 * n / o->batch; /* num_bat_sr */
  if (nb < 1)
    return err_set(e, ERR_INVALID,
                   "transport fit: 10 x %d targets is fewer than one source batch of %d", n,
                   o->batch);
  ot_scorer s;
  int rc = scorer_new(&s, targets, n, d, e);
  if (rc != ERR_OK)
    return rc;
  float *src = mem_malloc((size_t)o->batch * d * sizeof *src);
  int *idx = mem_malloc((size_t)o->batch * sizeof *idx);
  double *cnt = mem_malloc((size_t)n * sizeof *cnt);
  float *am = mem_calloc((size_t)n, sizeof *am), *av = mem_calloc((size_t)n, sizeof *av);
  float *g = mem_malloc((size_t)n * sizeof *g);
  if (!src || !idx || !cnt || !am || !av || !g) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  float lr = (float)o->lr;
  double best = 1e20;
  int bad = 0, doubled = 0, it;
  const float nu = 1.0f / (float)n;
  sampler_ot_fit_report r = {0};
  for (it = 1; it <= o->max_iter; it++) {
    if ((rc = measure(&s, o, h, n, d, it, nb, o->batch, src, idx, cnt, e)) != ERR_OK)
      goto done;
    const float tot = (float)nb * (float)o->batch;
    double gn = 0, hm = 0;
    int empty = 0;
    for (int i = 0; i < n; i++) {
      g[i] = (float)cnt[i] / tot - nu;
      empty += cnt[i] == 0;
      am[i] = am[i] * 0.9f + 0.1f * g[i];
      av[i] = av[i] * 0.999f + 0.001f * g[i] * g[i];
      h[i] = h[i] + -lr * (am[i] / (sqrtf(av[i]) + 1e-8f));
      hm += h[i];
      gn += (double)g[i] * g[i];
    }
    hm /= n;
    for (int i = 0; i < n; i++)
      h[i] -= (float)hm;
    gn = sqrt(gn);
    r = (sampler_ot_fit_report){.iterations = it,
                                .g_norm = gn,
                                .empty = empty,
                                .doublings = doubled,
                                .lr = lr,
                                .samples = (long long)nb * o->batch};
    if (o->progress)
      o->progress(it, o->max_iter, 0, o->progress_user);
    if (gn < best) {
      best = gn;
      bad = 0;
    } else {
      bad++;
    }
    if (gn < 8e-4 && empty == 0)
      break;
    if (bad > 50 && doubled < 3) {
      nb *= 2;
      bad = 0;
      best = 1e20;
      lr *= 0.8f;
      doubled++;
    }
  }
  if (rep)
    *rep = r;
done:
  scorer_free(&s);
  free(src);
  free(idx);
  free(cnt);
  free(am);
  free(av);
  free(g);
  return rc;
}

/* ---- the map file ---- */

/* path with its file name replaced by name (beside it). */
static int beside(const char *path, const char *name, char *out, size_t n, err *e) {
  const char *slash = strrchr(path, '/');
  const int dir = slash ? (int)(slash - path + 1) : 0;
  if (!name || !*name || strchr(name, '/') || strcmp(name, "..") == 0)
    return err_set(e, ERR_INVALID, "transport map %s: arrays must be .npy files beside it", path);
  if ((size_t)snprintf(out, n, "%.*s%s", dir, path, name) >= n)
    return err_set(e, ERR_INVALID, "transport map %s: path too long", path);
  return ERR_OK;
}

int sampler_ot_write(const char *path, json_t *header, const float *targets, const float *h, int n,
                     const int shape[3], err *e) {
  const char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  const size_t bl = strlen(base);
  char stem[512], tn[600], hn[600], tp[4096], hp[4096];
  if (bl < 6 || bl - 5 >= sizeof stem)
    return err_set(e, ERR_INVALID, "transport map %s: expected NAME.json", path);
  snprintf(stem, sizeof stem, "%.*s", (int)(bl - 5), base);
  snprintf(tn, sizeof tn, "%s.npy", stem);
  snprintf(hn, sizeof hn, "%s.h.npy", stem);
  int rc = beside(path, tn, tp, sizeof tp, e);
  if (rc == ERR_OK)
    rc = beside(path, hn, hp, sizeof hp, e);
  const int64_t ts[4] = {n, shape[0], shape[1], shape[2]}, hs[1] = {n};
  if (rc == ERR_OK)
    rc = npy_write_f32(tp, targets, 4, ts, e);
  if (rc == ERR_OK)
    rc = npy_write_f32(hp, h, 1, hs, e);
  if (rc != ERR_OK)
    return rc;
  json_object_set_new(header, "format", json_string("denoised-ot-map"));
  json_object_set_new(header, "version", json_integer(1));
  json_object_set_new(header, "targets", json_integer(n));
  json_object_set_new(header, "shape", json_pack("[i, i, i]", shape[0], shape[1], shape[2]));
  json_object_set_new(header, "arrays", json_string(tn));
  json_object_set_new(header, "potential", json_string(hn));
  if (json_dump_file(header, path, JSON_INDENT(1) | JSON_SORT_KEYS) != 0)
    return err_set(e, ERR_IO, "cannot write %s", path);
  return ERR_OK;
}

static int hdr_int(const json_t *h, const char *key, long long lo, long long hi, const char *path,
                   long long *v, err *e) {
  const json_t *j = json_object_get(h, key);
  if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi)
    return err_set(e, ERR_INVALID, "transport map %s: '%s' must be an integer in [%lld, %lld]",
                   path, key, lo, hi);
  *v = json_integer_value(j);
  return ERR_OK;
}

/* Reads the arrays of header h (at path) into m. */
static int load_arrays(const json_t *h, const char *path, struct ot_map *m, err *e) {
  char tp[4096], hp[4096];
  npy_array a = {0}, b = {0};
  int rc = beside(path, json_string_value(json_object_get(h, "arrays")), tp, sizeof tp, e);
  if (rc == ERR_OK)
    rc = beside(path, json_string_value(json_object_get(h, "potential")), hp, sizeof hp, e);
  if (rc == ERR_OK && (rc = npy_read_f32(tp, &a, e)) == ERR_OK &&
      (rc = npy_read_f32(hp, &b, e)) != ERR_OK)
    err_prefix(e, "transport map %s", path);
  if (rc == ERR_OK &&
      (a.ndim != 4 || a.shape[0] != m->n || a.shape[1] != m->shape[0] ||
       a.shape[2] != m->shape[1] || a.shape[3] != m->shape[2] || b.ndim != 1 || b.shape[0] != m->n))
    rc = err_set(e, ERR_INVALID,
                 "transport map %s: the arrays must be targets [%d, %d, %d, %d] and h [%d]", path,
                 m->n, m->shape[0], m->shape[1], m->shape[2], m->n);
  if (rc == ERR_OK && ((rc = npy_check_finite(&a, "transport targets", e)) != ERR_OK ||
                       (rc = npy_check_finite(&b, "transport potential", e)) != ERR_OK))
    err_prefix(e, "transport map %s", path);
  if (rc == ERR_OK) {
    m->targets = a.data;
    m->h = b.data;
    a.data = b.data = NULL;
  }
  npy_array_free(&a);
  npy_array_free(&b);
  return rc;
}

int sampler_ot_load(const char *path, struct ot_map **out, json_t **header, err *e) {
  json_error_t je;
  json_t *h = json_load_file(path, 0, &je);
  if (!h)
    return je.line > 0
               ? err_set(e, ERR_INVALID, "transport map %s: %s (line %d)", path, je.text, je.line)
               : err_set(e, ERR_IO, "transport map %s: %s", path, je.text);
  struct ot_map *m = mem_calloc(1, sizeof *m);
  const char *fmt = json_string_value(json_object_get(h, "format"));
  long long v = 0, n = 0, step = 0;
  int rc = m ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK && (!fmt || strcmp(fmt, "denoised-ot-map") != 0))
    rc = err_set(e, ERR_INVALID,
                 "transport map %s: not a DPM-OT map (expected format \"denoised-ot-map\")", path);
  if (rc == ERR_OK)
    rc = hdr_int(h, "version", 1, 1, path, &v, e);
  if (rc == ERR_OK)
    rc = hdr_int(h, "targets", 2, OT_MAX_TARGETS, path, &n, e);
  if (rc == ERR_OK)
    rc = hdr_int(h, "step", 1, 100000, path, &step, e);
  const json_t *sh = json_object_get(h, "shape");
  if (rc == ERR_OK && (!json_is_array(sh) || json_array_size(sh) != 3))
    rc = err_set(e, ERR_INVALID, "transport map %s: 'shape' must be [C, H, W]", path);
  for (int i = 0; rc == ERR_OK && i < 3; i++) {
    const json_t *x = json_array_get(sh, (size_t)i);
    if (!json_is_integer(x) || json_integer_value(x) < 1 || json_integer_value(x) > 4096)
      rc = err_set(e, ERR_INVALID, "transport map %s: 'shape' entries must be in [1, 4096]", path);
    else
      m->shape[i] = (int)json_integer_value(x);
  }
  const json_t *sol = json_object_get(h, "solver");
  if (rc == ERR_OK && (!json_is_object(sol) || !json_is_string(json_object_get(sol, "name")) ||
                       !json_is_integer(json_object_get(sol, "steps"))))
    rc = err_set(e, ERR_INVALID, "transport map %s: 'solver' must be {\"name\", \"steps\"}", path);
  if (rc == ERR_OK && !json_is_object(json_object_get(h, "computed_for")))
    rc = err_set(e, ERR_INVALID, "transport map %s: 'computed_for' is missing", path);
  if (rc == ERR_OK) {
    m->n = (int)n;
    m->step = (int)step;
    m->d = (size_t)m->shape[0] * m->shape[1] * m->shape[2];
    rc = load_arrays(h, path, m, e);
  }
  if (rc != ERR_OK) {
    sampler_ot_free(m);
    json_decref(h);
    return rc;
  }
  *out = m;
  *header = h;
  return ERR_OK;
}

/* ---- the sampler: map, then the remaining steps ---- */

int sampler_ot_start(const sampler *s, const sampler_run_opts *o, size_t d, float *x, err *e) {
  const struct ot_map *m = s->ot;
  if (m->d != d)
    return err_set(e, ERR_INVALID,
                   "transport map %s is for images of %d x %d x %d (C x H x W), the run's have "
                   "%zu values: computed for another model or size",
                   s->data, m->shape[0], m->shape[1], m->shape[2], d);
  int *idx = mem_malloc((size_t)o->batch * sizeof *idx);
  float *u = mem_malloc((size_t)o->batch * d * sizeof *u);
  int rc = idx && u ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  /* the source point of image b: U[0, 1]^d from the image's stream 0 (where x_T would be) */
  for (int b = 0; rc == ERR_OK && b < o->batch; b++)
    rng_uniform(o->seed, o->first_image + (uint64_t)b, 0, u + (size_t)b * d, d);
  if (rc == ERR_OK)
    rc = sampler_ot_assign(m->targets, m->h, m->n, d, u, o->batch, idx, e);
  for (int b = 0; rc == ERR_OK && b < o->batch; b++)
    memcpy(x + (size_t)b * d, m->targets + (size_t)idx[b] * d, d * sizeof *x);
  free(idx);
  free(u);
  return rc;
}

/* The inner solver a map names, with the map attached (sampler_new_from_json for "dpm-ot"). */
int sampler_ot_new(const char *path, const json_t *model_config, sampler **out, err *e) {
  struct ot_map *m = NULL;
  json_t *h = NULL;
  int rc = sampler_ot_load(path, &m, &h, e);
  if (rc != ERR_OK)
    return rc;
  const json_t *sol = json_object_get(h, "solver");
  json_t *spec = json_pack("{s:O, s:O}", "name", json_object_get(sol, "name"), "steps",
                           json_object_get(sol, "steps"));
  sampler *s = NULL;
  rc = spec ? sampler_new_from_json(spec, model_config, &s, e)
            : err_set(e, ERR_NOMEM, "out of memory");
  json_decref(spec);
  if (rc != ERR_OK)
    err_prefix(e, "transport map %s: its solver", path);
  if (rc == ERR_OK && (rc = sampler_ot_solver_ok(s, m->step, e)) != ERR_OK)
    err_prefix(e, "transport map %s", path);
  if (rc == ERR_OK && !(s->data = mem_strdup(path)))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc != ERR_OK) {
    sampler_free(s);
    sampler_ot_free(m);
    json_decref(h);
    return rc;
  }
  s->ot = m;
  s->data_for = json_incref(json_object_get(h, "computed_for"));
  s->ot_header = h;
  *out = s;
  return ERR_OK;
}

int sampler_ot_solver_ok(const sampler *s, int step, err *e) {
  if (!s->desc->step || s->stochastic || s->init_sigma != 1.0f || s->n_evals != s->n)
    return err_set(e, ERR_INVALID,
                   "DPM-OT needs a deterministic solver of one evaluation per step on the VP "
                   "latents (ddim, dpm++2m, dpm++3m, unipc, deis), not %s",
                   s->name);
  if (step < 1 || step >= s->n)
    return err_set(e, ERR_INVALID, "DPM-OT step %d must be in [1, %d] of %d steps", step, s->n - 1,
                   s->n);
  return ERR_OK;
}

double sampler_ot_abar(const sampler *s, int step) {
  return sampler_abar_at(s, s->tm[step]);
}

/* Only for listings (class DPM_OT, no keys): sampler_new_from_json builds "dpm-ot" from its map,
 * as the map's own solver. */
static int ot_prepare(sampler *s, err *e) {
  (void)s;
  return err_set(e, ERR_INVALID,
                 "dpm-ot samples through a transport map given as its data "
                 "('denoised ot fit' makes one)");
}

const solver_desc solver_dpm_ot = {"dpm_ot", "DPM_OT", 10, ot_prepare, NULL, NULL, 0, 0, NULL};
