/* The official DPM-Solver code's sampler (dpm_solver_pytorch.DPM_Solver.sample): DPM-Solver-fast
 * for an NFE budget, singlestep_fixed, multistep and the adaptive DPM-Solver-12/23, with its skip
 * types, dynamic thresholding and lambda < -5.1 clip. Arithmetic in double, stored in float32. */

/* Deviations from the official code, on purpose: its discrete schedule interpolates log(alpha)
 * between training timesteps, this one log(sigma_VE) (diffusers' convention, the one the model
 * sees for fractional timesteps), so the solved ODE and the model agree; the model label is the
 * timestep index itself (the official 1000 * (t - 1/N) differs when N != 1000 or after the
 * lambda < -5.1 clip); and the adaptive solver adapts each image on its own (the official code
 * takes the worst image of the batch), so results do not depend on the batch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler_impl.h"

/* ---- the continuous schedule: labels u in [0, Tc - 1] ---- */

/* lambda at the training timesteps, the tail below lambda_min_clipped dropped like the official
 * numerical_clip_alpha (-5.1); an infinite lambda (zero terminal SNR) always ends the table */
int paper_lam_table(sampler *s, err *e) {
  s->lambdas = malloc((size_t)s->T * sizeof *s->lambdas);
  if (!s->lambdas)
    return err_set(e, ERR_NOMEM, "out of memory");
  int tc = 0;
  for (int k = 0; k < s->T; k++) {
    const double a = s->abar[k];
    const double lam = -0.5 * (log1p(-a) - log(a));
    if (!isfinite(lam) || lam < s->cfg.lambda_min_clipped)
      break;
    s->lambdas[tc++] = lam;
  }
  s->n_lambdas = tc;
  if (tc < 2)
    return err_set(e, ERR_INVALID, "DPM_Solver: the noise schedule has no usable range");
  return ERR_OK;
}

double paper_lam_at(const sampler *s, double u) {
  const double *L = s->lambdas;
  const int last = s->n_lambdas - 1;
  if (!(u > 0)) /* NaN too: never cast to int below */
    return L[0];
  if (u >= last)
    return L[last];
  const int lo = (int)floor(u);
  const double w = u - lo;
  return w == 0 ? L[lo] : (1 - w) * L[lo] + w * L[lo + 1];
}

double paper_u_of_lam(const sampler *s, double lam) {
  const double *L = s->lambdas;
  const int last = s->n_lambdas - 1;
  if (lam >= L[0])
    return 0;
  if (lam <= L[last])
    return last;
  int lo = 0, hi = last; /* L decreasing: L[lo] > lam >= L[hi] */
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (L[mid] > lam)
      lo = mid;
    else
      hi = mid;
  }
  return lo + (L[lo] - lam) / (L[lo] - L[hi]);
}

typedef struct coef {
  double lam, log_alpha, alpha, sigma;
} coef;

static coef coef_at(const sampler *s, double u) {
  coef c;
  c.lam = paper_lam_at(s, u);
  c.log_alpha = -0.5 * log1p(exp(-2 * c.lam));
  c.alpha = exp(c.log_alpha);
  c.sigma = exp(c.log_alpha - c.lam);
  return c;
}

/* official continuous time t = (u + 1) / Tc */
double paper_t_of(const sampler *s, double u) {
  return (u + 1) / s->n_lambdas;
}
double paper_u_of_t(const sampler *s, double t) {
  return t * s->n_lambdas - 1;
}

/* get_time_steps(skip_type, t_T, t_0, N) as labels, N + 1 values */
static void time_steps(const sampler *s, double uT, double u0, int N, double *out) {
  const double tT = paper_t_of(s, uT), t0 = paper_t_of(s, u0);
  switch (s->cfg.skip_type) {
  case SCHED_SKIP_LOGSNR: {
    const double lT = paper_lam_at(s, uT), l0 = paper_lam_at(s, u0);
    for (int i = 0; i <= N; i++)
      out[i] = i == 0 ? uT : i == N ? u0 : paper_u_of_lam(s, lT + (l0 - lT) * i / N);
    break;
  }
  case SCHED_SKIP_TIME_UNIFORM:
    for (int i = 0; i <= N; i++)
      out[i] = paper_u_of_t(s, tT + (t0 - tT) * i / N);
    break;
  case SCHED_SKIP_TIME_QUADRATIC: {
    const double a = sqrt(tT), b = sqrt(t0);
    for (int i = 0; i <= N; i++) {
      const double r = a + (b - a) * i / N;
      out[i] = paper_u_of_t(s, r * r);
    }
    break;
  }
  }
  out[0] = uT;
  out[N] = u0;
}

/* get_orders_and_timesteps_for_singlestep_solver / singlestep_fixed: K steps, their orders and
 * K + 1 outer labels. Returns K. */
static int singlestep_plan(const sampler *s, int *orders, double *outer) {
  const int steps = s->n, order = s->cfg.solver_order;
  const double uT = s->n_lambdas - 1, u0 = 0;
  int K = 0;
  if (s->cfg.method == SCHED_METHOD_SINGLESTEP_FIXED) {
    K = steps / order;
    for (int k = 0; k < K; k++)
      orders[k] = order;
    time_steps(s, uT, u0, K, outer);
    return K;
  }
  if (order == 3) {
    const int k3 = steps / 3 + 1;
    for (int k = 0; k < (steps % 3 == 0 ? k3 - 2 : k3 - 1); k++)
      orders[K++] = 3;
    if (steps % 3 == 0) {
      orders[K++] = 2;
      orders[K++] = 1;
    } else if (steps % 3 == 1) {
      orders[K++] = 1;
    } else {
      orders[K++] = 2;
    }
  } else if (order == 2) {
    for (int k = 0; k < steps / 2; k++)
      orders[K++] = 2;
    if (steps % 2)
      orders[K++] = 1;
  } else {
    for (int k = 0; k < steps; k++)
      orders[K++] = 1;
  }
  if (s->cfg.skip_type == SCHED_SKIP_LOGSNR) {
    time_steps(s, uT, u0, K, outer);
  } else {
    double *all = malloc((size_t)(steps + 1) * sizeof *all);
    if (!all)
      return -1;
    time_steps(s, uT, u0, steps, all);
    int at = 0;
    outer[0] = all[0];
    for (int k = 0; k < K; k++) {
      at += orders[k];
      outer[k + 1] = all[at];
    }
    free(all);
  }
  return K;
}

/* r1, r2 of one singlestep segment: its inner points spaced by the skip type */
static void inner_r(const sampler *s, double us, double ut, int order, double *r1, double *r2) {
  double in[4];
  *r1 = 0.5;
  *r2 = 2.0 / 3.0;
  if (order < 2)
    return;
  time_steps(s, us, ut, order, in);
  const double l0 = paper_lam_at(s, in[0]), h = paper_lam_at(s, in[order]) - l0;
  *r1 = (paper_lam_at(s, in[1]) - l0) / h;
  if (order == 3)
    *r2 = (paper_lam_at(s, in[2]) - l0) / h;
}

/* ---- prepare ---- */

static int dpm_official_prepare(sampler *s, err *e) {
  sched_config *cfg = &s->cfg;
  if (cfg->algorithm_type != SCHED_ALGO_DPMSOLVER && cfg->algorithm_type != SCHED_ALGO_DPMSOLVER_PP)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'algorithm_type': DPM_Solver takes dpmsolver or "
                   "dpmsolver++, not '%s'",
                   sched_algorithm_name(cfg->algorithm_type));
  if (cfg->solver_type == SCHED_SOLVER_MIDPOINT)
    cfg->solver_type = SCHED_SOLVER_DPMSOLVER;
  else if (cfg->solver_type == SCHED_SOLVER_HEUN)
    cfg->solver_type = SCHED_SOLVER_TAYLOR;
  if (cfg->solver_type != SCHED_SOLVER_DPMSOLVER && cfg->solver_type != SCHED_SOLVER_TAYLOR)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'solver_type': DPM_Solver takes dpmsolver or taylor");
  if (cfg->method == SCHED_METHOD_F_PNDM || cfg->method == SCHED_METHOD_S_PNDM)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'method': DPM_Solver takes multistep, singlestep, "
                   "singlestep_fixed or adaptive");
  if (cfg->thresholding && cfg->algorithm_type != SCHED_ALGO_DPMSOLVER_PP)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'thresholding': dynamic thresholding corrects the data "
                   "prediction, so it needs algorithm_type dpmsolver++ (as in the paper)");
  const int K = cfg->solver_order, n = s->n;
  if (cfg->method == SCHED_METHOD_ADAPTIVE && K < 2)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'solver_order': the adaptive solver is DPM-Solver-12 "
                   "(order 2) or -23 (order 3), not order %d",
                   K);
  if (cfg->method == SCHED_METHOD_MULTISTEP && n < K)
    return err_set(e, ERR_INVALID, "DPM_Solver multistep of order %d needs at least %d steps", K,
                   K);
  if (cfg->method == SCHED_METHOD_SINGLESTEP_FIXED && n < K)
    return err_set(e, ERR_INVALID,
                   "DPM_Solver singlestep_fixed of order %d needs at least %d steps (NFE)", K, K);
  int rc = paper_lam_table(s, e);
  if (rc != ERR_OK)
    return rc;
  const int dz = cfg->denoise_to_zero;
  s->ends_clean = dz;
  if (cfg->method == SCHED_METHOD_ADAPTIVE)
    return ERR_OK; /* data-dependent: no plan */
  if (cfg->method == SCHED_METHOD_MULTISTEP) {
    double *g = malloc((size_t)(n + 1) * sizeof *g);
    if (!g || (rc = sampler_plan(s, n + dz, 0, e)) != ERR_OK) {
      free(g);
      return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
    }
    time_steps(s, s->n_lambdas - 1, 0, n, g);
    for (int k = 0; k < n; k++) {
      s->tm[k] = g[k];
      s->step_end[k] = k > 0;
    }
    free(g);
  } else {
    int *orders = malloc((size_t)(n + 1) * sizeof *orders);
    double *outer = malloc((size_t)(n + 2) * sizeof *outer);
    int steps = orders && outer ? singlestep_plan(s, orders, outer) : -1;
    int ne = 0;
    for (int k = 0; k < steps; k++)
      ne += orders[k];
    if (steps < 0 || (rc = sampler_plan(s, ne + dz, 0, e)) != ERR_OK) {
      free(orders);
      free(outer);
      return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
    }
    int j = 0;
    for (int k = 0; k < steps; k++) {
      double r1, r2;
      inner_r(s, outer[k], outer[k + 1], orders[k], &r1, &r2);
      const double ls = paper_lam_at(s, outer[k]), h = paper_lam_at(s, outer[k + 1]) - ls;
      s->tm[j++] = outer[k];
      if (orders[k] >= 2)
        s->tm[j++] = paper_u_of_lam(s, ls + r1 * h);
      if (orders[k] == 3)
        s->tm[j++] = paper_u_of_lam(s, ls + r2 * h);
      s->step_end[j - 1] = 1;
    }
    free(orders);
    free(outer);
  }
  if (dz)
    s->tm[s->n_evals - 1] = 0;
  if (s->n_evals > 0)
    s->step_end[s->n_evals - 1] = 1;
  return ERR_OK;
}

/* ---- model_fn ---- */

typedef struct pctx {
  const sampler *s;
  run_ctx *r;
  int step;
  size_t d;
  int n;           /* rows in this call */
  const int *rows; /* their batch indices, NULL: all */
  float *sel;      /* 2 d scratch for thresholding */
  int defer_last;  /* denoise_to_zero follows: report the last step after it */
  int last_step, last_total;
} pctx;

static void report(pctx *c, int step, int total) {
  c->last_step = step;
  c->last_total = total;
  if (!(c->defer_last && step == total))
    sampler_report(c->r, step, total);
}

/* model_fn(x, u) for n rows with per-row labels: noise prediction (dpmsolver) or data
 * prediction (dpmsolver++, with the paper's thresholding). */
static int model_fn(pctx *c, const float *x, const double *u, float *out, err *e) {
  int rc = sampler_eval_rows(c->r, c->step, x, c->n, c->rows, u, out, e);
  if (rc != ERR_OK)
    return rc;
  const sched_config *cfg = &c->s->cfg;
  for (int b = 0; b < c->n; b++) {
    const coef k = coef_at(c->s, u[b]);
    const float *xb = x + (size_t)b * c->d;
    float *o = out + (size_t)b * c->d;
    for (size_t i = 0; i < c->d; i++) { /* to noise first, as model_wrapper does */
      double eps = o[i];
      if (cfg->prediction_type == SCHED_PRED_SAMPLE)
        eps = (xb[i] - k.alpha * o[i]) / k.sigma;
      else if (cfg->prediction_type == SCHED_PRED_V)
        eps = k.alpha * o[i] + k.sigma * xb[i];
      o[i] =
          (float)(cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP ? (xb[i] - k.sigma * eps) / k.alpha
                                                                 : eps);
    }
    if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP && cfg->thresholding)
      sampler_threshold_paper(cfg, o, c->d, c->sel);
  }
  return ERR_OK;
}

/* ---- the updates, per row with its own (s, t) ---- */

typedef struct bufs {
  float *ms, *ms1, *ms2, *xs; /* n * d each */
} bufs;

/* singlestep_dpm_solver_update of `order` from us[b] to ut[b]; ms (and ms1 if have_ms1) already
 * hold model values when have_ms. r1/r2 as the official defaults or the segment's. */
static int single_update(pctx *c, const float *x, const double *us, const double *ut, int order,
                         double r1, double r2, int have_ms, int have_ms1, bufs *B, float *out,
                         err *e) {
  const sched_config *cfg = &c->s->cfg;
  const int pp = cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP;
  const int taylor = cfg->solver_type == SCHED_SOLVER_TAYLOR;
  const size_t d = c->d;
  const int n = c->n;
  double u1[1024], u2[1024];
  if (n > 1024)
    return err_set(e, ERR_UNSUPPORTED, "DPM_Solver: at most 1024 images per batch");
  int rc;
  if (!have_ms && (rc = model_fn(c, x, us, B->ms, e)) != ERR_OK)
    return rc;
  if (order == 1) {
    for (int b = 0; b < n; b++) {
      const coef ks = coef_at(c->s, us[b]), kt = coef_at(c->s, ut[b]);
      const double h = kt.lam - ks.lam;
      const double cx = pp ? kt.sigma / ks.sigma : exp(kt.log_alpha - ks.log_alpha);
      const double cm = pp ? kt.alpha * expm1(-h) : kt.sigma * expm1(h);
      const size_t off = (size_t)b * d;
      for (size_t i = 0; i < d; i++)
        out[off + i] = (float)(cx * x[off + i] - cm * B->ms[off + i]);
    }
    return ERR_OK;
  }
  /* intermediate points */
  for (int b = 0; b < n; b++) {
    const coef ks = coef_at(c->s, us[b]), kt = coef_at(c->s, ut[b]);
    const double h = kt.lam - ks.lam;
    u1[b] = paper_u_of_lam(c->s, ks.lam + r1 * h);
    u2[b] = paper_u_of_lam(c->s, ks.lam + r2 * h);
    if (have_ms1)
      continue;
    const coef k1 = coef_at(c->s, u1[b]);
    const double cx = pp ? k1.sigma / ks.sigma : exp(k1.log_alpha - ks.log_alpha);
    const double cm = pp ? k1.alpha * expm1(-r1 * h) : k1.sigma * expm1(r1 * h);
    const size_t off = (size_t)b * d;
    for (size_t i = 0; i < d; i++)
      B->xs[off + i] = (float)(cx * x[off + i] - cm * B->ms[off + i]);
  }
  if (!have_ms1 && (rc = model_fn(c, B->xs, u1, B->ms1, e)) != ERR_OK)
    return rc;
  if (order == 3) {
    for (int b = 0; b < n; b++) {
      const coef ks = coef_at(c->s, us[b]), kt = coef_at(c->s, ut[b]), k2 = coef_at(c->s, u2[b]);
      const double h = kt.lam - ks.lam;
      const double cx = pp ? k2.sigma / ks.sigma : exp(k2.log_alpha - ks.log_alpha);
      const double p12 = pp ? expm1(-r2 * h) : expm1(r2 * h);
      const double p22 = pp ? p12 / (r2 * h) + 1 : p12 / (r2 * h) - 1;
      const double cm = (pp ? k2.alpha : k2.sigma) * p12;
      const double cd = (pp ? 1 : -1) * r2 / r1 * (pp ? k2.alpha : k2.sigma) * p22;
      const size_t off = (size_t)b * d;
      for (size_t i = 0; i < d; i++)
        B->xs[off + i] = (float)(cx * x[off + i] - cm * B->ms[off + i] +
                                 cd * ((double)B->ms1[off + i] - B->ms[off + i]));
    }
    if ((rc = model_fn(c, B->xs, u2, B->ms2, e)) != ERR_OK)
      return rc;
  }
  for (int b = 0; b < n; b++) {
    const coef ks = coef_at(c->s, us[b]), kt = coef_at(c->s, ut[b]);
    const double h = kt.lam - ks.lam;
    const double cx = pp ? kt.sigma / ks.sigma : exp(kt.log_alpha - ks.log_alpha);
    const double sg = pp ? 1 : -1, scale = pp ? kt.alpha : kt.sigma;
    const double p1 = pp ? expm1(-h) : expm1(h);
    const double p2 = pp ? p1 / h + 1 : p1 / h - 1, p3 = p2 / h - 0.5;
    const size_t off = (size_t)b * d;
    for (size_t i = 0; i < d; i++) {
      const double xv = x[off + i], m0 = B->ms[off + i], m1 = B->ms1[off + i];
      double v = cx * xv - scale * p1 * m0;
      if (order == 2) {
        v += taylor ? sg * (1 / r1) * scale * p2 * (m1 - m0) : -(0.5 / r1) * scale * p1 * (m1 - m0);
      } else {
        const double m2 = B->ms2[off + i];
        if (!taylor) {
          v += sg * (1 / r2) * scale * p2 * (m2 - m0);
        } else {
          const double d10 = (m1 - m0) / r1, d11 = (m2 - m0) / r2;
          const double D1 = (r2 * d10 - r1 * d11) / (r2 - r1), D2 = 2 * (d11 - d10) / (r2 - r1);
          v += sg * scale * p2 * D1 - scale * p3 * D2;
        }
      }
      out[off + i] = (float)v;
    }
  }
  return ERR_OK;
}

/* multistep_dpm_solver_update of `order` to label ut with the history (oldest first). */
static void multi_update(const pctx *c, const float *x, float *const *m, const double *up,
                         int nprev, double ut, int order, float *out) {
  const sched_config *cfg = &c->s->cfg;
  const int pp = cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP;
  const int taylor = cfg->solver_type == SCHED_SOLVER_TAYLOR;
  const size_t nd = (size_t)c->n * c->d;
  const coef k0 = coef_at(c->s, up[nprev - 1]), kt = coef_at(c->s, ut);
  const double h = kt.lam - k0.lam;
  const double cx = pp ? kt.sigma / k0.sigma : exp(kt.log_alpha - k0.log_alpha);
  const double scale = pp ? kt.alpha : kt.sigma, sg = pp ? 1 : -1;
  const double p1 = pp ? expm1(-h) : expm1(h), p2 = pp ? p1 / h + 1 : p1 / h - 1;
  const double p3 = p2 / h - 0.5;
  const float *m0 = m[nprev - 1];
  if (order == 1) {
    for (size_t i = 0; i < nd; i++)
      out[i] = (float)(cx * x[i] - scale * p1 * m0[i]);
    return;
  }
  const coef k1 = coef_at(c->s, up[nprev - 2]);
  const double r0 = (k0.lam - k1.lam) / h;
  const float *m1 = m[nprev - 2];
  if (order == 2) {
    for (size_t i = 0; i < nd; i++) {
      const double D = ((double)m0[i] - m1[i]) / r0;
      double v = cx * x[i] - scale * p1 * m0[i];
      v += taylor ? sg * scale * p2 * D : -0.5 * scale * p1 * D;
      out[i] = (float)v;
    }
    return;
  }
  const coef k2 = coef_at(c->s, up[nprev - 3]);
  const double r1 = (k1.lam - k2.lam) / h;
  const float *m2 = m[nprev - 3];
  for (size_t i = 0; i < nd; i++) {
    const double d10 = ((double)m0[i] - m1[i]) / r0, d11 = ((double)m1[i] - m2[i]) / r1;
    const double D1 = d10 + r0 / (r0 + r1) * (d10 - d11), D2 = (d10 - d11) / (r0 + r1);
    out[i] = (float)(cx * x[i] - scale * p1 * m0[i] + sg * scale * p2 * D1 - scale * p3 * D2);
  }
}

/* ---- the loops ---- */

static int run_multistep(pctx *c, float *x, float *mem, err *e) {
  const sampler *s = c->s;
  const int N = s->n, K = s->cfg.solver_order;
  const size_t nd = (size_t)c->n * c->d;
  double *g = malloc((size_t)(N + 1) * sizeof *g), up[3], uv[1024];
  if (!g)
    return err_set(e, ERR_NOMEM, "out of memory");
  time_steps(s, s->n_lambdas - 1, 0, N, g);
  float *m[3] = {mem, mem + nd, mem + 2 * nd}, *out = mem + 3 * nd;
  for (int b = 0; b < c->n; b++)
    uv[b] = g[0];
  int rc = model_fn(c, x, uv, m[0], e), np = 1;
  up[0] = g[0];
  for (int step = 1; step <= N && rc == ERR_OK; step++) {
    c->step = step;
    int order = step < K ? step : K;
    if (step >= K && s->cfg.lower_order_final && N < 10)
      order = K < N + 1 - step ? K : N + 1 - step;
    multi_update(c, x, m, up, np, g[step], order, out);
    memcpy(x, out, nd * sizeof *x);
    if (np == K) { /* drop the oldest, reuse its buffer */
      float *old = m[0];
      for (int k = 0; k + 1 < K; k++) {
        m[k] = m[k + 1];
        up[k] = up[k + 1];
      }
      m[K - 1] = old;
      np = K - 1;
    }
    up[np] = g[step];
    if (step < N) {
      for (int b = 0; b < c->n; b++)
        uv[b] = g[step];
      rc = model_fn(c, x, uv, m[np], e);
    }
    np++;
    report(c, step, N);
  }
  free(g);
  return rc;
}

static int run_singlestep(pctx *c, float *x, float *mem, err *e) {
  const sampler *s = c->s;
  const size_t nd = (size_t)c->n * c->d;
  int *orders = malloc((size_t)(s->n + 1) * sizeof *orders);
  double *outer = malloc((size_t)(s->n + 2) * sizeof *outer), us[1024], ut[1024];
  int K = orders && outer ? singlestep_plan(s, orders, outer) : -1, rc = ERR_OK;
  if (K < 0)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  bufs B = {mem, mem + nd, mem + 2 * nd, mem + 3 * nd};
  float *out = mem + 4 * nd;
  for (int k = 0; k < K && rc == ERR_OK; k++) {
    c->step = k;
    double r1, r2;
    inner_r(s, outer[k], outer[k + 1], orders[k], &r1, &r2);
    for (int b = 0; b < c->n; b++) {
      us[b] = outer[k];
      ut[b] = outer[k + 1];
    }
    rc = single_update(c, x, us, ut, orders[k], r1, r2, 0, 0, &B, out, e);
    if (rc == ERR_OK)
      memcpy(x, out, nd * sizeof *x);
    report(c, k + 1, K);
  }
  free(orders);
  free(outer);
  return rc;
}

/* dpm_solver_adaptive, each image with its own step size. */
static int run_adaptive(pctx *c, float *x, float *mem, err *e) {
  const sampler *s = c->s;
  const sched_config *cfg = &s->cfg;
  const int B = c->n, order = cfg->solver_order;
  const size_t d = c->d, nd = (size_t)B * d;
  double *st = malloc((size_t)B * 6 * sizeof *st);
  int *rows = malloc((size_t)B * sizeof *rows), *accepted = calloc((size_t)B, sizeof *accepted);
  if (!st || !rows || !accepted) {
    free(st);
    free(rows);
    free(accepted);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  double *su = st, *h = st + B, *ls = st + 3 * B, *us = st + 4 * B, *ut_a = st + 5 * B;
  float *xp = mem, *xa = mem + nd, *xl = mem + 2 * nd, *xh = mem + 3 * nd;
  bufs Bf = {mem + 4 * nd, mem + 5 * nd, mem + 6 * nd, mem + 7 * nd};
  const double l0 = paper_lam_at(s, 0), r1 = order == 2 ? 0.5 : 1.0 / 3.0, r2 = 2.0 / 3.0;
  memcpy(xp, x, nd * sizeof *x);
  for (int b = 0; b < B; b++) {
    su[b] = s->n_lambdas - 1;
    ls[b] = paper_lam_at(s, su[b]);
    h[b] = cfg->h_init;
  }
  int rc = ERR_OK, rounds = 0;
  for (;;) {
    int n = 0;
    for (int b = 0; b < B; b++)
      if (fabs(paper_t_of(s, su[b]) - paper_t_of(s, 0)) > cfg->t_err)
        rows[n++] = b;
    if (n == 0)
      break;
    if (++rounds > 100000) {
      rc = err_set(e, ERR_INVALID, "DPM_Solver adaptive: no convergence (rtol %g, atol %g)",
                   cfg->rtol, cfg->atol);
      break;
    }
    /* gather the active images */
    for (int k = 0; k < n; k++) {
      memcpy(xa + (size_t)k * d, x + (size_t)rows[k] * d, d * sizeof *x);
      us[k] = su[rows[k]];
      ut_a[k] = paper_u_of_lam(s, ls[rows[k]] + h[rows[k]]);
    }
    pctx cc = *c;
    cc.n = n;
    cc.rows = rows;
    cc.step = rounds - 1;
    /* lower: order - 1 with r1; higher: order, reusing the lower one's model values */
    rc = single_update(&cc, xa, us, ut_a, order - 1, r1, r2, 0, 0, &Bf, xl, e);
    if (rc == ERR_OK)
      rc = single_update(&cc, xa, us, ut_a, order, r1, r2, 1, order == 3, &Bf, xh, e);
    if (rc != ERR_OK)
      break;
    for (int k = 0; k < n; k++) {
      const int b = rows[k];
      const float *lo = xl + (size_t)k * d, *hi = xh + (size_t)k * d, *pv = xp + (size_t)b * d;
      double acc = 0;
      for (size_t i = 0; i < d; i++) {
        const double m = fmax(fabs((double)lo[i]), fabs((double)pv[i]));
        const double delta = fmax(cfg->atol, cfg->rtol * m);
        const double q = ((double)hi[i] - lo[i]) / delta;
        acc += q * q;
      }
      const double E = sqrt(acc / (double)d);
      if (E <= 1) {
        memcpy(x + (size_t)b * d, hi, d * sizeof *x);
        memcpy(xp + (size_t)b * d, lo, d * sizeof *x);
        su[b] = ut_a[k];
        ls[b] = paper_lam_at(s, su[b]);
        accepted[b]++;
      }
      const double hn = cfg->theta * h[b] * pow(E, -1.0 / order);
      h[b] = fmin(hn, l0 - ls[b]);
    }
    int most = 0;
    for (int b = 0; b < B; b++)
      most = accepted[b] > most ? accepted[b] : most;
    report(c, most, 0);
  }
  free(st);
  free(rows);
  free(accepted);
  return rc;
}

static int dpm_official_run(const sampler *s, run_ctx *r, float *x, err *e) {
  const int B = sampler_run_batch(r);
  const size_t d = sampler_run_d(r), nd = (size_t)B * d;
  if (B > 1024)
    return err_set(e, ERR_UNSUPPORTED, "DPM_Solver: at most 1024 images per batch");
  float *mem = malloc((8 * nd + 2 * d) * sizeof *mem);
  if (!mem)
    return err_set(e, ERR_NOMEM, "out of memory");
  pctx c = {.s = s,
            .r = r,
            .d = d,
            .n = B,
            .rows = NULL,
            .sel = mem + 8 * nd,
            .defer_last = s->cfg.denoise_to_zero};
  int rc;
  switch (s->cfg.method) {
  case SCHED_METHOD_MULTISTEP: rc = run_multistep(&c, x, mem, e); break;
  case SCHED_METHOD_ADAPTIVE: rc = run_adaptive(&c, x, mem, e); break;
  default: rc = run_singlestep(&c, x, mem, e); break;
  }
  if (rc == ERR_OK && s->cfg.denoise_to_zero) {
    /* denoise_to_zero_fn: the data prediction at t_0 */
    double u0[1024];
    for (int b = 0; b < B; b++)
      u0[b] = 0;
    sched_config pp = s->cfg;
    pp.algorithm_type = SCHED_ALGO_DPMSOLVER_PP;
    sampler tmp = *s;
    tmp.cfg = pp;
    c.s = &tmp;
    c.step = s->n;
    rc = model_fn(&c, x, u0, mem, e);
    if (rc == ERR_OK) {
      memcpy(x, mem, nd * sizeof *x);
      sampler_report(r, c.last_step, c.last_total);
    }
  }
  free(mem);
  return rc;
}

const solver_desc solver_dpm_official = {
    "dpm_official", "DPM_Solver", 20, dpm_official_prepare, NULL, dpm_official_run, 0, 0, NULL};
