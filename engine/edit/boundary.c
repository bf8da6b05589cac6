/* Semantic boundaries for BoundaryDiffusion (L-YeZhu/BoundaryDiffusion, re-derived): a linear
 * SVM on labelled latents (the release fits sklearn's SVC(kernel='linear'); here dual
 * coordinate descent on centred data), the one-step move to a signed distance, the boundary
 * file, and the automatic mixing step. */
#include "boundary.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- fitting ---- */

static uint64_t lcg(uint64_t *s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return *s >> 33;
}

/* Dual coordinate descent for min 0.5 |w|^2 + 0.5 w_b^2 + C sum max(0, 1 - y (w.x + w_b)) on
 * the rows idx[0..m) of centred data xc (dim each). */
static void svm_dcd(const float *xc, const int *y, const int *idx, int m, int dim, double C,
                    int max_epochs, double *w, double *wb) {
  double *alpha = calloc((size_t)m, sizeof *alpha), *qii = malloc((size_t)m * sizeof *qii);
  int *perm = malloc((size_t)m * sizeof *perm);
  if (!alpha || !qii || !perm)
    goto done;
  memset(w, 0, (size_t)dim * sizeof *w);
  *wb = 0;
  for (int i = 0; i < m; i++) {
    const float *x = xc + (size_t)idx[i] * dim;
    double q = 1;
    for (int k = 0; k < dim; k++)
      q += (double)x[k] * x[k];
    qii[i] = q;
    perm[i] = i;
  }
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  for (int ep = 0; ep < max_epochs; ep++) {
    for (int i = m - 1; i > 0; i--) { /* a fixed shuffle per epoch: deterministic results */
      const int j = (int)(lcg(&seed) % (uint64_t)(i + 1)), t = perm[i];
      perm[i] = perm[j];
      perm[j] = t;
    }
    double pgmax = -INFINITY, pgmin = INFINITY;
    for (int r = 0; r < m; r++) {
      const int i = perm[r];
      const float *x = xc + (size_t)idx[i] * dim;
      const double yi = y[idx[i]] ? 1.0 : -1.0;
      double f = *wb;
      for (int k = 0; k < dim; k++)
        f += w[k] * x[k];
      const double g = yi * f - 1;
      double pg = g;
      if (alpha[i] == 0)
        pg = g < 0 ? g : 0;
      else if (alpha[i] == C)
        pg = g > 0 ? g : 0;
      pgmax = fmax(pgmax, pg);
      pgmin = fmin(pgmin, pg);
      if (fabs(pg) > 1e-12) {
        const double old = alpha[i];
        alpha[i] = fmin(fmax(old - g / qii[i], 0), C);
        const double dlt = (alpha[i] - old) * yi;
        for (int k = 0; k < dim; k++)
          w[k] += dlt * x[k];
        *wb += dlt;
      }
    }
    if (pgmax - pgmin < 1e-3)
      break;
  }
done:
  free(alpha);
  free(qii);
  free(perm);
}

int boundary_fit(const float *latents, const int *labels, int n, int dim,
                 const boundary_fit_opts *o, boundary *b, err *e) {
  memset(b, 0, sizeof *b);
  if (n < 2 || dim < 1 || dim > BOUNDARY_MAX_DIM)
    return err_set(e, ERR_INVALID, "boundary fit: %d latents of %d values", n, dim);
  const double C = o && o->C > 0 ? o->C : 1.0;
  const double tf = o ? o->test_fraction : 0;
  if (o && (!isfinite(o->C) || o->C < 0))
    return err_set(e, ERR_INVALID, "boundary fit: C %g must be positive", o->C);
  if (!isfinite(tf) || tf < 0 || tf > 0.9)
    return err_set(e, ERR_INVALID, "boundary fit: test_fraction %g must be in [0, 0.9]", tf);
  const int every = tf > 0 ? (int)lround(1.0 / tf) : 0;
  int *is_test = calloc((size_t)n, sizeof *is_test), *tr = malloc((size_t)n * sizeof *tr);
  float *xc = malloc((size_t)n * dim * sizeof *xc);
  double *mu = calloc((size_t)dim, sizeof *mu), *w = malloc((size_t)dim * sizeof *w);
  int rc = ERR_OK;
  if (!is_test || !tr || !xc || !mu || !w) {
    rc = err_set(e, ERR_NOMEM, "out of memory for %d latents of %d values", n, dim);
    goto done;
  }
  int ntr = 0, npos = 0, nneg = 0;
  for (int i = 0; i < n; i++) {
    if (labels[i] != 0 && labels[i] != 1) {
      rc = err_set(e, ERR_INVALID, "boundary fit: label %d of sample %d is not 0 or 1", labels[i],
                   i);
      goto done;
    }
    for (int k = 0; k < dim; k++)
      if (!isfinite(latents[(size_t)i * dim + k])) {
        rc = err_set(e, ERR_INVALID, "boundary fit: latent %d has a non-finite value", i);
        goto done;
      }
    is_test[i] = every > 1 && i % every == every - 1;
    if (!is_test[i]) {
      tr[ntr++] = i;
      npos += labels[i] == 1;
      nneg += labels[i] == 0;
    }
  }
  if (!npos || !nneg) {
    rc = err_set(e, ERR_INVALID,
                 "boundary fit: the training split needs both labels (%d positive, %d negative)",
                 npos, nneg);
    goto done;
  }
  for (int r = 0; r < ntr; r++)
    for (int k = 0; k < dim; k++)
      mu[k] += latents[(size_t)tr[r] * dim + k];
  for (int k = 0; k < dim; k++)
    mu[k] /= ntr;
  for (int i = 0; i < n; i++)
    for (int k = 0; k < dim; k++)
      xc[(size_t)i * dim + k] = (float)(latents[(size_t)i * dim + k] - mu[k]);
  double wb = 0;
  svm_dcd(xc, labels, tr, ntr, dim, C, o && o->max_epochs > 0 ? o->max_epochs : 1000, w, &wb);
  double norm = 0, wmu = 0;
  for (int k = 0; k < dim; k++) {
    norm += w[k] * w[k];
    wmu += w[k] * mu[k];
  }
  norm = sqrt(norm);
  if (!(norm > 0) || !isfinite(norm)) {
    rc = err_set(e, ERR_INVALID, "boundary fit: the classes cannot be told apart (zero normal)");
    goto done;
  }
  b->normal = malloc((size_t)dim * sizeof *b->normal);
  if (!b->normal) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  for (int k = 0; k < dim; k++)
    b->normal[k] = (float)(w[k] / norm);
  b->dim = dim;
  b->c = 1;
  b->h = 1;
  b->w = dim;
  b->offset = (wb - wmu) / norm;
  /* statistics of the signed distances */
  double sum = 0, sum2 = 0, sp = 0, sn = 0, rad = 0;
  int ok_tr = 0, ok_te = 0, nte = 0;
  for (int i = 0; i < n; i++) {
    const float *x = latents + (size_t)i * dim;
    const double dd = boundary_distance(b, x);
    const int right = (dd > 0) == (labels[i] == 1);
    if (is_test[i]) {
      nte++;
      ok_te += right;
      continue;
    }
    ok_tr += right;
    sum += dd;
    sum2 += dd * dd;
    if (labels[i])
      sp += dd;
    else
      sn += dd;
    double r2 = 0;
    for (int k = 0; k < dim; k++)
      r2 += (double)x[k] * x[k];
    rad += sqrt(r2 / dim);
  }
  const double mean = sum / ntr;
  b->scale = sqrt(fmax(sum2 / ntr - mean * mean, 0));
  b->mean_pos = sp / npos;
  b->mean_neg = sn / nneg;
  b->train_accuracy = (double)ok_tr / ntr;
  b->test_accuracy = nte ? (double)ok_te / nte : -1;
  b->n_train = ntr;
  b->n_test = nte;
  b->radius = rad / ntr;
done:
  free(is_test);
  free(tr);
  free(xc);
  free(mu);
  free(w);
  return rc;
}

double boundary_distance(const boundary *b, const float *x) {
  double s = b->offset;
  for (int k = 0; k < b->dim; k++)
    s += (double)b->normal[k] * x[k];
  return s;
}

void boundary_move(const boundary *b, float *x, int n, double target) {
  for (int i = 0; i < n; i++) {
    float *xi = x + (size_t)i * b->dim;
    const double step = target - boundary_distance(b, xi);
    for (int k = 0; k < b->dim; k++)
      xi[k] = (float)(xi[k] + step * b->normal[k]);
  }
}

void boundary_free(boundary *b) {
  if (!b)
    return;
  free(b->normal);
  json_decref(b->solver);
  if (b->mid) {
    boundary_free(b->mid);
    free(b->mid);
  }
  b->normal = NULL;
  b->solver = NULL;
  b->mid = NULL;
}

/* ---- the file ---- */

/* The hyperplane and its statistics: what an x-space and an h-space boundary share. */
static json_t *geometry_to_json(const boundary *b) {
  json_t *normal = json_array();
  for (int k = 0; normal && k < b->dim; k++)
    json_array_append_new(normal, json_real(b->normal[k]));
  return json_pack("{s:[i,i,i], s:o, s:f, s:f, s:f, s:f, s:f, s:f, s:i, s:i, s:f}", "shape", b->c,
                   b->h, b->w, "normal", normal, "offset", b->offset, "scale", b->scale,
                   "mean_positive", b->mean_pos, "mean_negative", b->mean_neg, "train_accuracy",
                   b->train_accuracy, "test_accuracy", b->test_accuracy, "n_train", b->n_train,
                   "n_test", b->n_test, "radius", b->radius);
}

json_t *boundary_to_json(const boundary *b) {
  json_t *j = geometry_to_json(b);
  if (!j || json_object_set_new(j, "format", json_string(BOUNDARY_FORMAT)) ||
      json_object_set_new(j, "version", json_integer(1)) ||
      json_object_set_new(j, "model", json_string(b->model)) ||
      json_object_set_new(j, "attribute", json_string(b->attribute)) ||
      json_object_set_new(j, "step", json_integer(b->step)) ||
      json_object_set_new(j, "timestep", json_real(b->timestep)) ||
      (b->solver && json_object_set(j, "solver", b->solver)) ||
      (b->mid && json_object_set_new(j, "mid", geometry_to_json(b->mid)))) {
    json_decref(j);
    return NULL;
  }
  return j;
}

int boundary_save(const boundary *b, const char *path, err *e) {
  json_t *j = boundary_to_json(b);
  if (!j)
    return err_set(e, ERR_NOMEM, "out of memory");
  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int rc = json_dump_file(j, tmp, JSON_COMPACT | JSON_REAL_PRECISION(9));
  json_decref(j);
  if (rc != 0 || rename(tmp, path) != 0) {
    remove(tmp);
    return err_set(e, ERR_IO, "%s: cannot write the boundary file", path);
  }
  return ERR_OK;
}

static int get_num(const json_t *j, const char *key, int required, double *out, err *e) {
  const json_t *v = json_object_get(j, key);
  if (!v) {
    if (required)
      return err_set(e, ERR_FORMAT, "missing key '%s'", key);
    return ERR_OK;
  }
  if (!json_is_number(v) || !isfinite(json_number_value(v)))
    return err_set(e, ERR_FORMAT, "key '%s' must be a finite number", key);
  *out = json_number_value(v);
  return ERR_OK;
}

static int get_str(const json_t *j, const char *key, char *out, size_t n, err *e) {
  const json_t *v = json_object_get(j, key);
  if (!v || json_is_null(v))
    return ERR_OK;
  if (!json_is_string(v) || json_string_length(v) >= n)
    return err_set(e, ERR_FORMAT, "key '%s' must be a string of under %zu bytes", key, n);
  snprintf(out, n, "%s", json_string_value(v));
  return ERR_OK;
}

static int geometry_from_json(const json_t *j, boundary *b, err *e) {
  const json_t *sh = json_object_get(j, "shape");
  json_int_t dims[3];
  if (!json_is_array(sh) || json_array_size(sh) != 3)
    return err_set(e, ERR_FORMAT, "key 'shape' must be [C, H, W]");
  for (int k = 0; k < 3; k++) {
    const json_t *x = json_array_get(sh, k);
    if (!json_is_integer(x) || json_integer_value(x) < 1 ||
        json_integer_value(x) > BOUNDARY_MAX_DIM)
      return err_set(e, ERR_FORMAT, "key 'shape' must hold positive integers");
    dims[k] = json_integer_value(x);
  }
  if (dims[0] * dims[1] * dims[2] > BOUNDARY_MAX_DIM)
    return err_set(e, ERR_FORMAT, "shape too large");
  b->c = (int)dims[0];
  b->h = (int)dims[1];
  b->w = (int)dims[2];
  b->dim = b->c * b->h * b->w;
  const json_t *nv = json_object_get(j, "normal");
  if (!json_is_array(nv) || (int)json_array_size(nv) != b->dim)
    return err_set(e, ERR_FORMAT, "key 'normal' must be an array of %d numbers", b->dim);
  double norm = 0;
  if (!(b->normal = malloc((size_t)b->dim * sizeof *b->normal)))
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int k = 0; k < b->dim; k++) {
    const json_t *x = json_array_get(nv, k);
    /* a double beyond float's range would become infinite, and the unit normal NaN */
    if (!json_is_number(x) || !(fabs(json_number_value(x)) <= FLT_MAX))
      return err_set(e, ERR_FORMAT, "normal[%d] is not a finite number (float32)", k);
    b->normal[k] = (float)json_number_value(x);
    norm += (double)b->normal[k] * b->normal[k];
  }
  norm = sqrt(norm);
  if (!(norm > 0))
    return err_set(e, ERR_FORMAT, "the normal is zero");
  for (int k = 0; k < b->dim; k++) /* rounding in the file: make it unit again */
    b->normal[k] = (float)(b->normal[k] / norm);
  /* Latents' distances are O(sqrt(dim)); far larger values come from a broken file, and moving
   * a latent that far overflows float. */
  const struct {
    const char *key;
    double *v;
    int required;
  } nums[] = {{"offset", &b->offset, 1},
              {"scale", &b->scale, 0},
              {"mean_positive", &b->mean_pos, 0},
              {"mean_negative", &b->mean_neg, 0},
              {"train_accuracy", &b->train_accuracy, 0},
              {"test_accuracy", &b->test_accuracy, 0},
              {"radius", &b->radius, 0}};
  for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
    int rc = get_num(j, nums[i].key, nums[i].required, nums[i].v, e);
    if (rc)
      return rc;
    if (fabs(*nums[i].v) > BOUNDARY_MAX_VALUE)
      return err_set(e, ERR_FORMAT, "key '%s': %g is outside [-%g, %g]", nums[i].key, *nums[i].v,
                     BOUNDARY_MAX_VALUE, BOUNDARY_MAX_VALUE);
  }
  if (b->scale < 0)
    return err_set(e, ERR_FORMAT, "key 'scale' must not be negative");
  return ERR_OK;
}

int boundary_from_json(const json_t *j, boundary *b, err *e) {
  memset(b, 0, sizeof *b);
  if (!json_is_object(j))
    return err_set(e, ERR_FORMAT, "boundary: expected a JSON object");
  const json_t *f = json_object_get(j, "format");
  if (!json_is_string(f) || strcmp(json_string_value(f), BOUNDARY_FORMAT) != 0)
    return err_set(e, ERR_FORMAT, "boundary: key 'format' must be \"%s\"", BOUNDARY_FORMAT);
  const json_t *v = json_object_get(j, "version");
  if (!json_is_integer(v) || json_integer_value(v) != 1)
    return err_set(e, ERR_UNSUPPORTED, "boundary: key 'version' must be 1");
  int rc = geometry_from_json(j, b, e);
  double step = -1;
  if (rc != ERR_OK) {
    err_prefix(e, "boundary");
    goto fail;
  }
  if ((rc = get_num(j, "step", 1, &step, e)) || (rc = get_num(j, "timestep", 0, &b->timestep, e)) ||
      (rc = get_str(j, "model", b->model, sizeof b->model, e)) ||
      (rc = get_str(j, "attribute", b->attribute, sizeof b->attribute, e))) {
    err_prefix(e, "boundary");
    goto fail;
  }
  if (step < 0 || step != floor(step) || step > 1e6) {
    rc = err_set(e, ERR_FORMAT, "boundary: key 'step' must be a non-negative integer");
    goto fail;
  }
  b->step = (int)step;
  const json_t *mv = json_object_get(j, "mid");
  if (mv && !json_is_null(mv)) {
    if (!json_is_object(mv)) {
      rc = err_set(e, ERR_FORMAT, "boundary: key 'mid' must be an object");
      goto fail;
    }
    if (!(b->mid = calloc(1, sizeof *b->mid))) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
      goto fail;
    }
    if ((rc = geometry_from_json(mv, b->mid, e)) != ERR_OK) {
      err_prefix(e, "boundary: mid");
      goto fail;
    }
    b->mid->step = b->step;
    b->mid->timestep = b->timestep;
  }
  const json_t *sv = json_object_get(j, "solver");
  if (sv && !json_is_null(sv)) {
    const json_t *st = json_object_get(sv, "steps");
    if (!json_is_object(sv) || !json_is_string(json_object_get(sv, "name")) ||
        !json_is_integer(st) || json_integer_value(st) < 1 || json_integer_value(st) > 100000) {
      rc = err_set(e, ERR_FORMAT,
                   "boundary: key 'solver' must be {\"name\": ..., \"steps\": N, ...}");
      goto fail;
    }
    if (b->step >= json_integer_value(st)) {
      rc = err_set(e, ERR_FORMAT, "boundary: step %d is not one of the solver's %lld steps",
                   b->step, (long long)json_integer_value(st));
      goto fail;
    }
    b->solver = json_deep_copy(sv);
  }
  return ERR_OK;
fail:
  boundary_free(b);
  return rc;
}

int boundary_load(const char *path, boundary *b, err *e) {
  memset(b, 0, sizeof *b);
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j)
    return err_set(e, ERR_FORMAT, "%s:%d: invalid JSON: %s", path, je.line, je.text);
  int rc = boundary_from_json(j, b, e);
  json_decref(j);
  if (rc != ERR_OK)
    err_prefix(e, "%s", path);
  return rc;
}

/* ---- mixing step ---- */

int boundary_mixing_step(const float *x0, int n, int dim, const float *abar, int n_steps,
                         double eps, double *kl, int *step, err *e) {
  if (n < 2 || dim < 1 || n_steps < 1)
    return err_set(e, ERR_INVALID, "mixing step: needs at least 2 images and 1 step");
  if (!isfinite(eps) || eps <= 0)
    return err_set(e, ERR_INVALID, "mixing step: eps %g must be positive", eps);
  double *m = calloc((size_t)dim, sizeof *m), *v = calloc((size_t)dim, sizeof *v);
  if (!m || !v) {
    free(m);
    free(v);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  for (int i = 0; i < n; i++)
    for (int k = 0; k < dim; k++)
      m[k] += x0[(size_t)i * dim + k];
  for (int k = 0; k < dim; k++)
    m[k] /= n;
  for (int i = 0; i < n; i++)
    for (int k = 0; k < dim; k++) {
      const double dv = x0[(size_t)i * dim + k] - m[k];
      v[k] += dv * dv;
    }
  int best = 0, close = 1;
  for (int s = 0; s < n_steps; s++) {
    const double a = abar[s];
    double acc = 0;
    for (int k = 0; k < dim; k++) {
      const double var = a * v[k] / (n - 1) + 1 - a;
      acc += 0.5 * (var + a * m[k] * m[k] - 1 - log(var));
    }
    kl[s] = acc / dim;
    close = close && kl[s] <= eps; /* the first departure counts, not a later dip */
    if (close)
      best = s;
  }
  *step = best;
  free(m);
  free(v);
  return ERR_OK;
}
