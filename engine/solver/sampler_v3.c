/* DPM-Solver-v3 (Zheng et al., NeurIPS 2023) as the authors' code runs it
 * (thu-ml/DPM-Solver-v3 @ba16871, dpm_solver_v3.DPM_Solver_v3.sample): the multistep predictor of
 * orders 1-3 with the optional pseudo-order (divided-difference) derivatives, and the corrector
 * that redoes the last step with the fresh evaluation, all on the empirical model statistics
 * (l, s, b per dimension on a grid uniform in lambda), read from a statistics file of ours, or flat
 * (l = 1, s = b = 0, the authors' `degenerated`) without one. Arithmetic in double. */

/* Where this follows the code rather than the paper: step times are snapped to the statistics
 * grid and every integral (L, S, I, B, C and the E_k of the high-order terms) is the trapezoid
 * rule on that grid, as the code does; so flat statistics give DPM-Solver++ only up to O(dlambda^2)
 * quadrature error, not exactly. The corrector order is the last predictor order plus
 * corrector_pseudo and runs only above order 1, as in the code. Deviations on purpose: the
 * schedule is the engine's continuous one (sampler_paper.c: log sigma_VE interpolated between
 * training timesteps), and the snapped lambdas are used exactly (the code rounds step times to
 * float32). The SD copy's `half` option is not offered. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "mem.h"
#include "npy.h"
#include "rng.h"
#include "sampler_impl.h"

#define V3_FLAT_K 1200 /* the CIFAR statistics' grid, used for flat statistics */
#define V3_MAX_K 100000

void sampler_v3_free(v3_stats *st) {
  if (!st)
    return;
  free(st->lam);
  free(st->l);
  free(st->L);
  free(st->S);
  free(st->I);
  free(st->B);
  free(st->C);
  free(st);
}

/* The authors' weighted_cumsumexp_trapezoid: y_0 = 0, y_n = sum of trapezoids of w * e^a over the
 * grid, per dimension, with the exponent shifted by its maximum over the grid. */
static void cumsum_exp(const v3_stats *st, const double *a, const double *w, double *y) {
  const int K = st->K;
  for (size_t i = 0; i < st->dd; i++) {
    double amax = -INFINITY;
    for (int k = 0; k <= K; k++)
      amax = a && a[k * st->dd + i] > amax ? a[k * st->dd + i] : amax;
    if (!a)
      amax = 0;
    double acc = 0, prev = 0;
    for (int k = 0; k <= K; k++) {
      const size_t j = k * st->dd + i;
      const double v = (w ? w[j] : 1.0) * (a ? exp(a[j] - amax) : 1.0);
      if (k > 0)
        acc += 0.5 * (st->lam[k] - st->lam[k - 1]) * (v + prev);
      prev = v;
      y[j] = acc * exp(amax);
    }
  }
}

/* From l, s, b ((K + 1) * dd each, float): the tables of the update. */
static int v3_tables(v3_stats *st, const float *l, const float *s, const float *b, err *e) {
  const size_t n = (size_t)(st->K + 1) * st->dd;
  st->lam = mem_malloc((size_t)(st->K + 1) * sizeof *st->lam);
  double *tmp[4] = {mem_malloc(n * sizeof(double)), mem_malloc(n * sizeof(double)),
                    mem_malloc(n * sizeof(double)), mem_malloc(n * sizeof(double))};
  st->l = tmp[0];
  st->L = mem_malloc(n * sizeof(double));
  st->S = mem_malloc(n * sizeof(double));
  st->I = mem_malloc(n * sizeof(double));
  st->B = mem_malloc(n * sizeof(double));
  st->C = mem_malloc(n * sizeof(double));
  int rc = ERR_OK;
  if (!st->lam || !tmp[0] || !tmp[1] || !tmp[2] || !tmp[3] || !st->L || !st->S || !st->I ||
      !st->B || !st->C) {
    rc = err_set(e, ERR_NOMEM, "out of memory for the DPM-Solver-v3 statistics");
    goto done;
  }
  for (int k = 0; k <= st->K; k++)
    st->lam[k] = st->lam_T + (st->lam_0 - st->lam_T) * k / st->K;
  double *sv = tmp[1], *bv = tmp[2], *w = tmp[3];
  for (size_t j = 0; j < n; j++) {
    st->l[j] = l ? l[j] : 1.0;
    sv[j] = s ? s[j] : 0.0;
    bv[j] = b ? b[j] : 0.0;
  }
  cumsum_exp(st, NULL, st->l, st->L);
  cumsum_exp(st, NULL, sv, st->S);
  for (size_t j = 0; j < n; j++)
    w[j] = st->L[j] + st->S[j];
  cumsum_exp(st, w, NULL, st->I);
  for (size_t j = 0; j < n; j++)
    sv[j] = -st->S[j];
  cumsum_exp(st, sv, bv, st->B);
  cumsum_exp(st, w, st->B, st->C);
done:
  free(tmp[1]);
  free(tmp[2]);
  free(tmp[3]);
  return rc;
}

static int flat_stats(v3_stats **out, double lam_T, double lam_0, err *e) {
  v3_stats *st = mem_calloc(1, sizeof *st);
  if (!st)
    return err_set(e, ERR_NOMEM, "out of memory");
  st->K = V3_FLAT_K;
  st->dd = 1;
  st->lam_T = lam_T;
  st->lam_0 = lam_0;
  int rc = v3_tables(st, NULL, NULL, NULL, e);
  if (rc != ERR_OK) {
    sampler_v3_free(st);
    return rc;
  }
  *out = st;
  return ERR_OK;
}

static int json_num(const json_t *o, const char *key, const char *path, double *v, err *e) {
  const json_t *j = json_object_get(o, key);
  if (!json_is_number(j) || !isfinite(json_number_value(j)))
    return err_set(e, ERR_INVALID, "statistics file %s: '%s' must be a finite number", path, key);
  *v = json_number_value(j);
  return ERR_OK;
}

/* The statistics file: a JSON header {"format": "denoised-v3-stats", "version": 1,
 * "lambda_T": a, "lambda_0": b, "grid": K, "shape": [C, H, W], "arrays": "NAME.npy"} and a
 * float32 .npy of shape [3, K + 1, C, H, W] (l, s, b; the path relative to the header's folder). */
int sampler_v3_attach(sampler *s, const char *path, err *e) {
  json_error_t je;
  json_t *h = json_load_file(path, 0, &je);
  if (!h)
    return je.line > 0
               ? err_set(e, ERR_INVALID, "statistics file %s: %s (line %d)", path, je.text, je.line)
               : err_set(e, ERR_IO, "statistics file %s: %s", path, je.text);
  int rc = ERR_OK;
  npy_array a = {0};
  v3_stats *st = mem_calloc(1, sizeof *st);
  const json_t *fmt = json_object_get(h, "format"), *ver = json_object_get(h, "version");
  const json_t *grid = json_object_get(h, "grid"), *shape = json_object_get(h, "shape");
  const json_t *arr = json_object_get(h, "arrays");
  if (!st) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "denoised-v3-stats") != 0 ||
      !json_is_integer(ver) || json_integer_value(ver) < 1 || json_integer_value(ver) > 2) {
    rc = err_set(e, ERR_INVALID,
                 "statistics file %s: not a DPM-Solver-v3 statistics header (expected format "
                 "\"denoised-v3-stats\", version 1 or 2)",
                 path);
    goto done;
  }
  /* version 2 says what the statistics were computed for (sampler_data_check) */
  const json_t *cfor = json_object_get(h, "computed_for");
  if (json_integer_value(ver) == 2 && !json_is_object(cfor)) {
    rc = err_set(e, ERR_INVALID, "statistics file %s: a version 2 header needs 'computed_for'",
                 path);
    goto done;
  }
  if ((rc = json_num(h, "lambda_T", path, &st->lam_T, e)) != ERR_OK ||
      (rc = json_num(h, "lambda_0", path, &st->lam_0, e)) != ERR_OK)
    goto done;
  if (!(st->lam_T < st->lam_0)) {
    rc = err_set(e, ERR_INVALID, "statistics file %s: lambda_T %g must be below lambda_0 %g", path,
                 st->lam_T, st->lam_0);
    goto done;
  }
  if (!json_is_integer(grid) || json_integer_value(grid) < 1 ||
      json_integer_value(grid) > V3_MAX_K) {
    rc = err_set(e, ERR_INVALID, "statistics file %s: 'grid' must be an integer in [1, %d]", path,
                 V3_MAX_K);
    goto done;
  }
  st->K = (int)json_integer_value(grid);
  if (!json_is_array(shape) || json_array_size(shape) != 3) {
    rc = err_set(e, ERR_INVALID, "statistics file %s: 'shape' must be [C, H, W]", path);
    goto done;
  }
  st->dd = 1;
  for (int i = 0; i < 3; i++) {
    const json_t *v = json_array_get(shape, (size_t)i);
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 4096) {
      rc =
          err_set(e, ERR_INVALID, "statistics file %s: 'shape' entries must be in [1, 4096]", path);
      goto done;
    }
    st->shape[i] = (int)json_integer_value(v);
    st->dd *= (size_t)st->shape[i];
  }
  const char *name = json_is_string(arr) ? json_string_value(arr) : NULL;
  if (!name || !*name || strchr(name, '/') || strcmp(name, "..") == 0) {
    rc = err_set(e, ERR_INVALID,
                 "statistics file %s: 'arrays' must name a .npy file beside the header", path);
    goto done;
  }
  char npath[4096];
  const char *slash = strrchr(path, '/');
  const int dir = slash ? (int)(slash - path + 1) : 0;
  if (snprintf(npath, sizeof npath, "%.*s%s", dir, path, name) >= (int)sizeof npath) {
    rc = err_set(e, ERR_INVALID, "statistics file %s: path too long", path);
    goto done;
  }
  if ((rc = npy_read_f32(npath, &a, e)) != ERR_OK) {
    err_prefix(e, "statistics file %s", path);
    goto done;
  }
  const int64_t want[5] = {3, st->K + 1, st->shape[0], st->shape[1], st->shape[2]};
  int ok = a.ndim == 5;
  for (int i = 0; ok && i < 5; i++)
    ok = a.shape[i] == want[i];
  if (!ok) {
    rc = err_set(e, ERR_INVALID,
                 "statistics file %s: %s must have shape [3, %d, %d, %d, %d] (l, s, b on the "
                 "grid)",
                 path, name, st->K + 1, st->shape[0], st->shape[1], st->shape[2]);
    goto done;
  }
  if ((rc = npy_check_finite(&a, "DPM-Solver-v3 statistics", e)) != ERR_OK) {
    err_prefix(e, "statistics file %s", path);
    goto done;
  }
  const size_t n = (size_t)(st->K + 1) * st->dd;
  if ((rc = v3_tables(st, a.data, a.data + n, a.data + 2 * n, e)) != ERR_OK)
    goto done;
  sampler_v3_free(s->v3);
  s->v3 = st;
  st = NULL;
  json_decref(s->data_for);
  s->data_for = json_is_object(cfor) ? json_incref((json_t *)cfor) : NULL;
done:
  npy_array_free(&a);
  sampler_v3_free(st);
  json_decref(h);
  return rc;
}

/* ---- plan ---- */

static double lam_of_index(const v3_stats *st, int k) {
  return st->lam[k];
}

static int snap(const v3_stats *st, double lam) {
  const double k = round(st->K * (lam - st->lam_T) / (st->lam_0 - st->lam_T));
  return k < 0 ? 0 : k > st->K ? st->K : (int)k;
}

/* The step indexes on the statistics grid (get_time_steps then convert_to_indexes). */
static void plan_indexes(const sampler *s, int *idx) {
  const v3_stats *st = s->v3;
  const int N = s->n;
  const double uT = paper_u_of_lam(s, st->lam_T), u0 = paper_u_of_lam(s, st->lam_0);
  const double tT = paper_t_of(s, uT), t0 = paper_t_of(s, u0);
  for (int i = 0; i <= N; i++) {
    double lam;
    if (s->cfg.skip_type == SCHED_SKIP_LOGSNR) {
      lam = st->lam_T + (st->lam_0 - st->lam_T) * i / N;
    } else if (s->cfg.skip_type == SCHED_SKIP_TIME_UNIFORM) {
      lam = paper_lam_at(s, paper_u_of_t(s, tT + (t0 - tT) * i / N));
    } else {
      const double a = sqrt(tT), b = sqrt(t0), r = a + (b - a) * i / N;
      lam = paper_lam_at(s, paper_u_of_t(s, r * r));
    }
    idx[i] = snap(st, lam);
  }
}

static int v3_prepare(sampler *s, err *e) {
  int rc = paper_lam_table(s, e);
  if (rc != ERR_OK)
    return rc;
  const double lo = s->lambdas[s->n_lambdas - 1], hi = s->lambdas[0];
  if (!s->v3 && (rc = flat_stats(&s->v3, lo, hi, e)) != ERR_OK)
    return rc;
  const v3_stats *st = s->v3;
  const double tol = 1e-6 * (1 + fabs(lo) + fabs(hi));
  if (st->lam_T < lo - tol || st->lam_0 > hi + tol)
    return err_set(e, ERR_INVALID,
                   "DPM-Solver-v3 statistics cover lambda [%g, %g], outside the schedule's "
                   "[%g, %g] (lambda_min_clipped %g): computed for another schedule",
                   st->lam_T, st->lam_0, lo, hi, s->cfg.lambda_min_clipped);
  int *idx = mem_malloc((size_t)(s->n + 1) * sizeof *idx);
  if (!idx || (rc = sampler_plan(s, s->n, 0, e)) != ERR_OK) {
    free(idx);
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  }
  plan_indexes(s, idx);
  /* two steps on one grid point would divide by a zero lambda step: a grid too coarse for the
   * step count is refused rather than run into NaN */
  for (int k = 0; k < s->n; k++)
    if (idx[k + 1] <= idx[k]) {
      const int a = idx[k];
      free(idx);
      return err_set(e, ERR_INVALID,
                     "DPM-Solver-v3 statistics grid of %d intervals is too coarse for %d steps "
                     "(steps %d and %d land on grid point %d): compute them on a finer grid "
                     "or use fewer steps",
                     st->K, s->n, k, k + 1, a);
    }
  for (int k = 0; k < s->n; k++) {
    s->tm[k] = paper_u_of_lam(s, lam_of_index(st, idx[k]));
    s->step_end[k] = k > 0;
  }
  s->step_end[s->n - 1] = 1;
  free(idx);
  return ERR_OK;
}

/* ---- run ---- */

typedef struct v3_pt {
  double *x, *eps; /* nd each */
  int idx;
} v3_pt;

typedef struct vctx {
  const sampler *s;
  const v3_stats *st;
  run_ctx *r;
  size_t d, nd;
  double *g[4]; /* nd each: g_0..g_n, then the derivatives in place */
  float *sel;   /* d scratch for the thresholding quantile */
} vctx;

static double alpha_of(double lam) {
  return exp(-0.5 * log1p(exp(-2 * lam)));
}

/* Weights w[m][k] with the (m+1)-th derivative estimate = sum_k w[m][k] g_k, from the points
 * lambdas (n >= 1 beyond the start): compute_high_order_derivatives. */
static void deriv_weights(int n, const double *lam, int pseudo, double w[3][4]) {
  if (n < 1)
    return;
  if (pseudo) {
    /* Newton divided differences [g_0..g_m] as weights on g_0..g_m, times m! */
    double D[4][4] = {{0}}; /* D[j][k]: weight of g_k in the divided difference at j */
    double cur[4][4];
    for (int j = 0; j <= n; j++)
      for (int k = 0; k <= n; k++)
        cur[j][k] = j == k;
    double fact = 1;
    for (int m = 1; m <= n; m++) {
      for (int j = 0; j + m <= n; j++)
        for (int k = 0; k <= n; k++)
          D[j][k] = (cur[j][k] - cur[j + 1][k]) / (lam[j] - lam[j + m]);
      memcpy(cur, D, sizeof cur);
      fact *= m;
      for (int k = 0; k <= n; k++)
        w[m - 1][k] = cur[0][k] * fact;
    }
  } else {
    /* solve sum_m (lam_k - lam_0)^m c_m = g_k - g_0 (k = 1..n); g^(m) = m! c_m */
    double R[3][3], inv[3][3];
    for (int k = 0; k < n; k++)
      for (int m = 0; m < n; m++) {
        R[k][m] = pow(lam[k + 1] - lam[0], m + 1);
        inv[k][m] = k == m;
      }
    for (int col = 0; col < n; col++) { /* Gauss-Jordan with partial pivoting, n <= 3 */
      int piv = col;
      for (int r = col + 1; r < n; r++)
        piv = fabs(R[r][col]) > fabs(R[piv][col]) ? r : piv;
      for (int m = 0; m < n; m++) {
        double t = R[col][m];
        R[col][m] = R[piv][m];
        R[piv][m] = t;
        t = inv[col][m];
        inv[col][m] = inv[piv][m];
        inv[piv][m] = t;
      }
      const double pv = R[col][col];
      for (int m = 0; m < n; m++) {
        R[col][m] /= pv;
        inv[col][m] /= pv;
      }
      for (int r = 0; r < n; r++)
        if (r != col) {
          const double f = R[r][col];
          for (int m = 0; m < n; m++) {
            R[r][m] -= f * R[col][m];
            inv[r][m] -= f * inv[col][m];
          }
        }
    }
    double fact = 1;
    for (int m = 0; m < n; m++) {
      fact *= m + 1;
      for (int k = 0; k < n; k++) {
        w[m][k + 1] = inv[m][k] * fact;
        w[m][0] -= inv[m][k] * fact;
      }
    }
  }
}

/* One update from P[0] (the start, index i_s) with the points P[1..n] to grid index it:
 * multistep_predictor_update / multistep_corrector_update, the same formula. */
static void v3_update(const vctx *c, v3_pt *const *P, int order, int pseudo, int it, double *out) {
  const v3_stats *st = c->st;
  const size_t dd = st->dd, d = c->d;
  const int n = order - 1, is = P[0]->idx;
  double lam[4] = {0}, al[4] = {1, 1, 1, 1}, sg[4] = {0};
  for (int k = 0; k <= n; k++) {
    lam[k] = st->lam[P[k]->idx];
    al[k] = alpha_of(lam[k]);
    sg[k] = al[k] * exp(-lam[k]);
  }
  const double at = alpha_of(st->lam[it]);
  /* g_k = e^{S_s - S_k} f_k - e^{S_s} (B_k - B_s), f = (sigma eps - l x) / alpha */
  for (int k = 0; k <= n; k++) {
    const int ik = P[k]->idx;
    for (size_t j = 0; j < c->nd; j++) {
      const size_t p = dd == 1 ? 0 : j % d;
      const double f = (sg[k] * P[k]->eps[j] - st->l[ik * dd + p] * P[k]->x[j]) / al[k];
      c->g[k][j] = exp(st->S[is * dd + p] - st->S[ik * dd + p]) * f -
                   exp(st->S[is * dd + p]) * (st->B[ik * dd + p] - st->B[is * dd + p]);
    }
  }
  /* high-order derivatives: combination weights w[m][k] with g^(m+1) = sum_k w * (g_k - g_0) */
  double w[3][4] = {{0}};
  deriv_weights(n, lam, pseudo, w);
  /* E_m = trapezoid of e^{(L+S) - (L+S)_s} (lam - lam_s)^m / m! from i_s to i_t, per dimension */
  for (size_t p = 0; p < (dd == 1 ? 1 : d); p++) {
    double E[3] = {0};
    for (int m = 1; m <= n; m++) {
      double fm = 1;
      for (int q = 2; q <= m; q++)
        fm *= q;
      double acc = 0, prev = 0;
      const double a0 = st->L[is * dd + p] + st->S[is * dd + p];
      for (int k = is; k <= it; k++) {
        const double v =
            exp(st->L[k * dd + p] + st->S[k * dd + p] - a0) * pow(st->lam[k] - st->lam[is], m) / fm;
        if (k > is)
          acc += 0.5 * (st->lam[k] - st->lam[k - 1]) * (v + prev);
        prev = v;
      }
      E[m - 1] = acc;
    }
    const size_t ps = is * dd + p, pt = (size_t)it * dd + p;
    const double cx = at / al[0] * exp(st->L[ps] - st->L[pt]);
    const double c0 = at * exp(-st->L[pt] - st->S[ps]) * (st->I[pt] - st->I[ps]);
    const double cb =
        at * exp(-st->L[pt]) * (st->C[pt] - st->C[ps] - st->B[ps] * (st->I[pt] - st->I[ps]));
    const double ch = at * exp(st->L[ps] - st->L[pt]);
    for (size_t j = p; j < c->nd; j += dd == 1 ? 1 : d) {
      double v = cx * P[0]->x[j] - c0 * c->g[0][j] - cb;
      for (int m = 0; m < n; m++) {
        double gd = 0;
        for (int k = 0; k <= n; k++)
          gd += w[m][k] * c->g[k][j];
        v -= ch * E[m] * gd;
      }
      out[j] = v;
    }
  }
}

/* A deviation from the authors' code, which never thresholds: where the model's scheduler
 * config turns dynamic thresholding on (its `thresholding`, `dynamic_thresholding_ratio`,
 * `sample_max_value`, read as diffusers reads them), the data prediction x0 = (x - sigma eps) /
 * alpha of each image is thresholded as diffusers' _threshold_sample does and eps is recomputed
 * from it, so v3 integrates the same corrected ODE as the diffusers solvers on that model (on
 * glyphs32 without it every sample leaves [-1, 1] and v3 is 5x further from the reference than
 * DPM-Solver++(2M)). Images whose x0 is left as it was keep eps bit for bit. of is nd scratch. */
void sampler_threshold_eps(const sched_config *cfg, size_t d, size_t nd, const double *x,
                           double lam, float *of, float *sel, double *eps) {
  const double al = alpha_of(lam), sg = al * exp(-lam);
  for (size_t j = 0; j < nd; j++)
    of[j] = (float)((x[j] - sg * eps[j]) / al);
  for (size_t j0 = 0; j0 < nd; j0 += d) {
    const double sc = sampler_threshold_scale(cfg, of + j0, d, sel);
    for (size_t j = j0; j < j0 + d; j++) {
      const double x0 = (x[j] - sg * eps[j]) / al;
      const double xt = fmin(fmax(x0, -sc), sc) / sc;
      if (xt != x0)
        eps[j] = (x[j] - al * xt) / sg;
    }
  }
}

/* The model's noise prediction at grid index k for the whole batch, in double (thresholded where
 * the model's config asks, above). */
static int v3_eps(vctx *c, int step, const double *x, int k, float *xf, float *of, double *eps,
                  err *e) {
  const sampler *s = c->s;
  const double lam = c->st->lam[k], al = alpha_of(lam), sg = al * exp(-lam);
  const int B = sampler_run_batch(c->r);
  double u[1024];
  for (int b = 0; b < B; b++)
    u[b] = paper_u_of_lam(s, lam);
  for (size_t j = 0; j < c->nd; j++)
    xf[j] = (float)x[j];
  int rc = sampler_eval_rows(c->r, step, xf, B, NULL, u, of, e);
  if (rc != ERR_OK)
    return rc;
  for (size_t j = 0; j < c->nd; j++) {
    double o = of[j];
    if (s->cfg.prediction_type == SCHED_PRED_SAMPLE)
      o = (x[j] - al * o) / sg;
    else if (s->cfg.prediction_type == SCHED_PRED_V)
      o = al * o + sg * x[j];
    eps[j] = o;
  }
  if (s->cfg.thresholding)
    sampler_threshold_eps(&s->cfg, c->d, c->nd, x, lam, of, c->sel, eps);
  return ERR_OK;
}

static int v3_loop(vctx *c, float *x, double *mem, float *fbuf, int *idx, err *e) {
  const sampler *s = c->s;
  const v3_stats *st = c->st;
  const int N = s->n, order = s->cfg.solver_order;
  const size_t nd = c->nd;
  plan_indexes(s, idx);
  v3_pt pts[5], *ring[5]; /* the last 5 points, newest last */
  for (int k = 0; k < 5; k++) {
    pts[k].x = mem + (size_t)(2 * k) * nd;
    pts[k].eps = mem + (size_t)(2 * k + 1) * nd;
    ring[k] = &pts[k];
  }
  double *xd = mem + 10 * nd;
  for (int k = 0; k < 4; k++)
    c->g[k] = mem + (size_t)(11 + k) * nd;
  for (size_t j = 0; j < nd; j++)
    xd[j] = x[j];
  int np = 0, p_ord = 0, rc = ERR_OK;
  for (int step = 1; step <= N && rc == ERR_OK; step++) {
    if (np == 5) { /* rotate: the oldest buffer becomes the newest */
      v3_pt *old = ring[0];
      memmove(ring, ring + 1, 4 * sizeof *ring);
      ring[4] = old;
      np = 4;
    }
    v3_pt *cur = ring[np++];
    memcpy(cur->x, xd, nd * sizeof *xd);
    cur->idx = idx[step - 1];
    rc = v3_eps(c, step - 1, cur->x, cur->idx, fbuf, fbuf + nd, cur->eps, e);
    if (rc != ERR_OK)
      break;
    const int c_ord = p_ord + (s->cfg.corrector_pseudo ? 1 : 0);
    if (s->cfg.use_corrector && c_ord > 1) {
      /* points: start = -2, new = -1, then -3, -4 ... */
      v3_pt *P[4] = {ring[np - 2], ring[np - 1], NULL, NULL};
      for (int k = 2; k < c_ord; k++)
        P[k] = ring[np - 1 - k];
      v3_update(c, P, c_ord, s->cfg.corrector_pseudo, cur->idx, xd);
      /* keep N = sigma eps - l x: eps_new = (N_old + l x_new) / sigma */
      const double lam = st->lam[cur->idx], sg = alpha_of(lam) * exp(-lam);
      for (size_t j = 0; j < nd; j++) {
        const double l = st->l[(size_t)cur->idx * st->dd + (st->dd == 1 ? 0 : j % c->d)];
        const double Nold = sg * cur->eps[j] - l * cur->x[j];
        cur->x[j] = xd[j];
        cur->eps[j] = (Nold + l * xd[j]) / sg;
      }
    }
    p_ord = step < order ? step : order;
    if (s->cfg.lower_order_final && p_ord > N + 1 - step)
      p_ord = N + 1 - step;
    v3_pt *P[3] = {ring[np - 1], NULL, NULL};
    for (int k = 1; k < p_ord; k++)
      P[k] = ring[np - 1 - k];
    v3_update(c, P, p_ord, s->cfg.predictor_pseudo, idx[step], xd);
    for (size_t j = 0; j < nd; j++)
      x[j] = (float)xd[j];
    sampler_report(c->r, step, N);
  }
  return rc;
}

static int v3_run(const sampler *s, run_ctx *r, float *x, err *e) {
  const int B = sampler_run_batch(r);
  const size_t d = sampler_run_d(r), nd = (size_t)B * d;
  const v3_stats *st = s->v3;
  if (B > 1024)
    return err_set(e, ERR_UNSUPPORTED, "DPM-Solver-v3: at most 1024 images per batch");
  if (st->dd != 1 && st->dd != d)
    return err_set(e, ERR_INVALID,
                   "DPM-Solver-v3 statistics are for images of %d x %d x %d (C x H x W), the "
                   "run's have %zu values: computed for another model or size",
                   st->shape[0], st->shape[1], st->shape[2], d);
  double *mem = mem_malloc(15 * nd * sizeof *mem);
  float *fbuf = mem_malloc((2 * nd + d) * sizeof *fbuf);
  int *idx = mem_malloc((size_t)(s->n + 1) * sizeof *idx);
  int rc;
  if (!mem || !fbuf || !idx) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
  } else {
    vctx c = {.s = s, .st = st, .r = r, .d = d, .nd = nd, .sel = fbuf + 2 * nd};
    rc = v3_loop(&c, x, mem, fbuf, idx, e);
  }
  free(idx);
  free(mem);
  free(fbuf);
  return rc;
}

const solver_desc solver_dpm_v3 = {"dpm_v3", "DPM_Solver_v3", 10, v3_prepare, NULL, v3_run, 0, 0,
                                   NULL};

/* ---- computing the statistics (the authors' ScoreSDE example script, with finite differences
 * for the Jacobian-vector products) ---- */

/* The header's record of what the statistics are for (sampler_data_check reads it). */
static json_t *computed_for(const model *m, const sampler *s, const sampler_v3_stats_opts *o) {
  const model_info *mi = model_get_info(m);
  const guidance *g = o->guidance && o->guidance->enabled ? o->guidance : NULL;
  json_t *j = json_pack(
      "{s:{s:s, s:i, s:i, s:i, s:s}, s:{s:f, s:f}, s:o, s:o, s:i, s:I}", "model", "class_name",
      mi->class_name ? mi->class_name : "", "sample_size", mi->sample_size, "in_channels",
      mi->in_channels, "num_classes", mi->num_classes, "weights_digest", model_weights_digest(m),
      "schedule", "lambda_min", s->lambdas[s->n_lambdas - 1], "lambda_max", s->lambdas[0],
      "class_label", mi->num_classes && o->one_class ? json_integer(o->class_label) : json_null(),
      "guidance_scale", !mi->num_classes ? json_null() : json_real(g ? g->scale : 1.0),
      "data_points", o->n, "seed", (json_int_t)o->seed);
  if (j && g)
    json_object_set_new(j, "null_class", json_integer(g->null_label));
  /* thresholding changes the ODE the statistics describe (stats_eps): say which one */
  json_t *sch = j ? json_object_get(j, "schedule") : NULL;
  if (sch)
    json_object_set_new(sch, "thresholding",
                        s->cfg.thresholding
                            ? json_pack("{s:f, s:f}", "ratio", s->cfg.dynamic_thresholding_ratio,
                                        "sample_max_value", s->cfg.sample_max_value)
                            : json_false());
  return j;
}

/* Writes the header out_path (NAME.json) and NAME.npy beside it. */
static int v3_stats_write(const char *out_path, const float *lsb, int K, int C, int hw,
                          double lam_T, double lam_0, json_t *cfor, err *e) {
  const size_t len = strlen(out_path);
  if (len < 6 || strcmp(out_path + len - 5, ".json") != 0)
    return err_set(e, ERR_INVALID, "the statistics file name must end in .json, not '%s'",
                   out_path);
  char npath[4096];
  if (len >= sizeof npath)
    return err_set(e, ERR_INVALID, "statistics path too long");
  snprintf(npath, sizeof npath, "%.*s.npy", (int)(len - 5), out_path);
  const char *base = strrchr(npath, '/');
  base = base ? base + 1 : npath;
  const int64_t shape[5] = {3, K + 1, C, hw, hw};
  int rc = npy_write_f32(npath, lsb, 5, shape, e);
  if (rc != ERR_OK)
    return rc;
  json_t *h = json_pack("{s:s, s:i, s:f, s:f, s:i, s:[i,i,i], s:s, s:O}", "format",
                        "denoised-v3-stats", "version", 2, "lambda_T", lam_T, "lambda_0", lam_0,
                        "grid", K, "shape", C, hw, hw, "arrays", base, "computed_for", cfor);
  if (!h)
    return err_set(e, ERR_NOMEM, "out of memory");
  if (json_dump_file(h, out_path, JSON_INDENT(1) | JSON_REAL_PRECISION(17)) != 0)
    rc = err_set(e, ERR_IO, "cannot write %s", out_path);
  json_decref(h);
  return rc;
}

/* eps of n images at lambda (the guided model output converted by the prediction type), float
 * in/out. */
static int stats_eps(const model *m, const sampler *s, const sampler_v3_stats_opts *o,
                     const float *x, int hw, double lam, float *out, err *e) {
  float t[64];
  const int n = o->n;
  const float u = (float)paper_u_of_lam(s, lam);
  for (int b = 0; b < n; b++)
    t[b] = u;
  const model_call c = {.x = x,
                        .n = n,
                        .h = hw,
                        .w = hw,
                        .t = t,
                        .labels = o->labels,
                        .threads = o->threads > 0 ? o->threads : 1};
  int rc = guidance_eval(o->guidance, m, &c, out, e);
  if (rc != ERR_OK)
    return rc;
  const double al = alpha_of(lam), sg = al * exp(-lam);
  const size_t d = (size_t)model_get_info(m)->in_channels * hw * hw, nd = (size_t)n * d;
  for (size_t j = 0; j < nd; j++) {
    if (s->cfg.prediction_type == SCHED_PRED_SAMPLE)
      out[j] = (float)((x[j] - al * out[j]) / sg);
    else if (s->cfg.prediction_type == SCHED_PRED_V)
      out[j] = (float)(al * out[j] + sg * x[j]);
  }
  if (!s->cfg.thresholding)
    return ERR_OK;
  /* the statistics of the ODE the sampler solves: thresholded as it is (sampler_threshold_eps) */
  double *xd = mem_malloc(2 * nd * sizeof *xd);
  float *of = mem_malloc((nd + d) * sizeof *of);
  if (!xd || !of) {
    free(xd);
    free(of);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  for (size_t j = 0; j < nd; j++) {
    xd[j] = x[j];
    xd[nd + j] = out[j];
  }
  sampler_threshold_eps(&s->cfg, d, nd, xd, lam, of, of + nd, xd + nd);
  for (size_t j = 0; j < nd; j++)
    out[j] = (float)xd[nd + j];
  free(xd);
  free(of);
  return ERR_OK;
}

#define STATS_DELTA                                                                                \
  5e-3 /* finite-difference step, in x (and in lambda for the total derivative)                    \
        */

int sampler_v3_stats_compute(const model *m, const sampler *s, const sampler_v3_stats_opts *o,
                             const char *out_path, err *e) {
  const model_info *mi = model_get_info(m);
  const int hw = mi->sample_size, C = mi->in_channels, n = o->n, K = o->K;
  const size_t d = (size_t)C * hw * hw;
  const float *x0 = o->x0;
  const uint64_t seed = o->seed;
  if (!s || s->desc != &solver_dpm_v3)
    return err_set(e, ERR_INVALID, "statistics are computed for the dpm-solver-v3 solver");
  if (mi->out_channels != C) /* the evaluations below have room for the prediction only */
    return err_set(e, ERR_UNSUPPORTED,
                   "statistics for a model with a learned variance (%d output channels for %d "
                   "input channels) are not supported",
                   mi->out_channels, C);
  if (n < 2 || n > 64)
    return err_set(e, ERR_INVALID, "statistics need 2 to 64 data points, not %d", n);
  if (mi->num_classes && !o->labels)
    return err_set(e, ERR_INVALID,
                   "a class-conditional model's statistics need a class per data "
                   "point");
  if (o->guidance && guidance_check(o->guidance, m, e) != ERR_OK)
    return e ? e->code : ERR_INVALID;
  if (K < 2 || K > V3_MAX_K)
    return err_set(e, ERR_INVALID, "the statistics grid must have 2 to %d intervals", V3_MAX_K);
  const double lam_T = s->lambdas[s->n_lambdas - 1], lam_0 = s->lambdas[0];
  const size_t nd = (size_t)n * d, G = (size_t)(K + 1) * d;
  float *buf = mem_malloc((6 * nd) * sizeof *buf);
  float *out = mem_malloc(3 * G * sizeof *out); /* l, s, b */
  double *dl = mem_malloc(G * sizeof *dl), *tmp = mem_malloc((size_t)(K + 1) * sizeof *tmp);
  int rc = ERR_OK;
  if (!buf || !out || !dl || !tmp) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  float *x = buf, *z = buf + nd, *xp = buf + 2 * nd, *xm = buf + 3 * nd, *ep = buf + 4 * nd,
        *em = buf + 5 * nd;
  float *L = out, *Sv = out + G, *Bv = out + 2 * G;
  const int total = 2 * (K + 1);
  /* pass 1: l_k = mean over data of sigma v . (J_x eps v), v Rademacher (Hutchinson diagonal) */
  for (int k = 0; k <= K && rc == ERR_OK; k++) {
    const double lam = lam_T + (lam_0 - lam_T) * k / K, al = alpha_of(lam), sg = al * exp(-lam);
    for (int b = 0; b < n; b++) {
      rng_normal(seed, (uint64_t)b, (uint64_t)(2 * k + 1), z + b * d, d);
      rng_uniform(seed, (uint64_t)b, (uint64_t)(2 * k + 2), ep + b * d, d);
    }
    for (size_t j = 0; j < nd; j++) {
      x[j] = (float)(al * x0[j] + sg * z[j]);
      const float v = ep[j] < 0.5f ? -1.0f : 1.0f;
      xp[j] = (float)(x[j] + STATS_DELTA * v);
      xm[j] = (float)(x[j] - STATS_DELTA * v);
      em[j] = v;
    }
    float *v = em, *e1 = z, *e2 = ep;
    if ((rc = stats_eps(m, s, o, xp, hw, lam, e1, e)) != ERR_OK ||
        (rc = stats_eps(m, s, o, xm, hw, lam, e2, e)) != ERR_OK)
      break;
    for (size_t p = 0; p < d; p++) {
      double acc = 0;
      for (int b = 0; b < n; b++) {
        const size_t j = b * d + p;
        /* v_i (J v)_i, with the step as float32 rounding left it */
        acc += sg * v[j] * (e1[j] - e2[j]) / fabs((double)xp[j] - xm[j]);
      }
      L[(size_t)k * d + p] = (float)(acc / n);
    }
    if (o->progress)
      o->progress(k + 1, total, 2 * (k + 1), o->progress_user);
  }
  if (rc != ERR_OK)
    goto done;
  /* l' by central differences in lambda (one-sided at the ends), then a +-5-point moving mean */
  const double hl = (lam_0 - lam_T) / K;
  for (int k = 0; k <= K; k++)
    for (size_t p = 0; p < d; p++) {
      const int a = k > 0 ? k - 1 : 0, c = k < K ? k + 1 : K;
      dl[(size_t)k * d + p] = (L[(size_t)c * d + p] - L[(size_t)a * d + p]) / ((c - a) * hl);
    }
  for (size_t p = 0; p < d; p++) {
    for (int k = 0; k <= K; k++) {
      double acc = 0;
      int cnt = 0;
      for (int q = k - 5; q <= k + 5; q++)
        if (q >= 0 && q <= K) {
          acc += dl[(size_t)q * d + p];
          cnt++;
        }
      tmp[k] = acc / cnt;
    }
    for (int k = 0; k <= K; k++)
      dl[(size_t)k * d + p] = tmp[k];
  }
  /* pass 2: a = f = (sigma eps - l x) / alpha and its total lambda-derivative along the ODE,
   * bvec = e^-lam ((l - 1) eps + d eps/d lam) - l' x / alpha; s, b the least-squares fit */
  for (int k = 0; k <= K && rc == ERR_OK; k++) {
    const double lam = lam_T + (lam_0 - lam_T) * k / K, al = alpha_of(lam), sg = al * exp(-lam);
    for (int b = 0; b < n; b++)
      rng_normal(seed, (uint64_t)b, (uint64_t)(2 * (K + 1) + k + 1), z + b * d, d);
    for (size_t j = 0; j < nd; j++)
      x[j] = (float)(al * x0[j] + sg * z[j]);
    if ((rc = stats_eps(m, s, o, x, hw, lam, ep, e)) != ERR_OK)
      break;
    for (size_t j = 0; j < nd; j++) { /* dx/dlam = sigma^2 x - sigma eps */
      const double vx = sg * sg * x[j] - sg * ep[j];
      xp[j] = (float)(x[j] + STATS_DELTA * vx);
      xm[j] = (float)(x[j] - STATS_DELTA * vx);
    }
    if ((rc = stats_eps(m, s, o, xp, hw, lam + STATS_DELTA, em, e)) != ERR_OK ||
        (rc = stats_eps(m, s, o, xm, hw, lam - STATS_DELTA, z, e)) != ERR_OK)
      break;
    for (size_t p = 0; p < d; p++) {
      const double l = L[(size_t)k * d + p], lp = dl[(size_t)k * d + p];
      double sa = 0, sb = 0, saa = 0, sab = 0, sxx = 0;
      for (int b = 0; b < n; b++) {
        const size_t j = b * d + p;
        const double a = (sg * ep[j] - l * x[j]) / al;
        const double ed = (em[j] - z[j]) / (2 * STATS_DELTA);
        const double bv = exp(-lam) * ((l - 1) * ep[j] + ed) - lp * x[j] / al;
        sa += a;
        sb += bv;
        saa += a * a;
        sab += a * bv;
        sxx += (l * x[j] / al) * (l * x[j] / al);
      }
      const double ma = sa / n, mb = sb / n, var = saa / n - ma * ma, cov = sab / n - ma * mb;
      /* f constant over the data (an exactly linear model, where l removes all x-dependence)
       * up to the estimate's noise: no slope to fit, only the bias. The threshold is relative
       * to the part l x / alpha that l took out of f and to f itself. */
      const double sv = var > 1e-6 * (saa + sxx) / n + 1e-300 ? cov / var : 0;
      Sv[(size_t)k * d + p] = (float)sv;
      Bv[(size_t)k * d + p] = (float)(mb - sv * ma);
    }
    if (o->progress)
      o->progress(K + 2 + k, total, 2 * (K + 1) + 3 * (k + 1), o->progress_user);
  }
  for (size_t j = 0; rc == ERR_OK && j < 3 * G; j++)
    if (!isfinite(out[j]))
      rc = err_set(e, ERR_INVALID,
                   "the statistics came out non-finite (the model's output at some lambda); "
                   "nothing written");
  json_t *cfor = rc == ERR_OK ? computed_for(m, s, o) : NULL;
  if (rc == ERR_OK && !cfor)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = v3_stats_write(out_path, out, K, C, hw, lam_T, lam_0, cfor, e);
  json_decref(cfor);
done:
  free(buf);
  free(out);
  free(dl);
  free(tmp);
  return rc;
}
