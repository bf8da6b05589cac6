/* diffusers' exponential-integrator solvers on the sigma grid: DPMSolverMultistep/Singlestep,
 * UniPCMultistep and DEISMultistep, in float32 computed in torch's order (so diffusers' own float32
 * cancellation is reproduced, not fixed), each tensor expression element by element. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler_impl.h"

/* ---- the sigma grid, shared with sampler_karras.c ---- */

double np_linspace_at(double start, double stop, int n, int i) {
  if (n == 1)
    return start;
  if (i == n - 1)
    return stop;
  const double step = (stop - start) / (n - 1);
  return (double)i * step + start;
}

double sampler_sigma_interp(const sampler *s, double t) {
  if (!(t > 0))
    return sampler_sigma_of(s, 0);
  if (t >= s->T - 1)
    return sampler_sigma_of(s, s->T - 1);
  const int j = (int)floor(t);
  const double y0 = sampler_sigma_of(s, j);
  if (t == j)
    return y0;
  const double slope = ((double)sampler_sigma_of(s, j + 1) - y0) / 1.0;
  return slope * (t - j) + y0;
}

double sampler_sigma_to_t(const sampler *s, double sigma) {
  /* log_sigmas is np.log of a float32 array: float32 values */
  const double ls = log(sigma > 1e-10 ? sigma : 1e-10);
  /* the last k with log_sigmas[k] <= log(sigma) (they increase with k), else 0 */
  int low = 0;
  if (ls >= (double)logf(sampler_sigma_of(s, 0))) {
    int lo = 0, hi = s->T - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (ls >= (double)logf(sampler_sigma_of(s, mid)))
        lo = mid;
      else
        hi = mid - 1;
    }
    low = lo;
  }
  if (low > s->T - 2)
    low = s->T - 2;
  const float l0 = logf(sampler_sigma_of(s, low)), l1 = logf(sampler_sigma_of(s, low + 1));
  double w = ((double)l0 - ls) / (double)(l0 - l1);
  w = w < 0 ? 0 : w > 1 ? 1 : w;
  return (1 - w) * low + w * (low + 1);
}

void sampler_karras(double sigma_min, double sigma_max, int n, double *out) {
  const double rho = 7.0;
  const double min_inv = pow(sigma_min, 1 / rho), max_inv = pow(sigma_max, 1 / rho);
  for (int i = 0; i < n; i++)
    out[i] = pow(max_inv + np_linspace_at(0, 1, n, i) * (min_inv - max_inv), rho);
}

/* ---- float32 scalar helpers, as torch evaluates 0-d tensors ---- */

static void alpha_sigma(float sigma, float *alpha_t, float *sigma_t) {
  *alpha_t = 1.0f / sqrtf(sigma * sigma + 1.0f);
  *sigma_t = sigma * *alpha_t;
}

static float lambda_of(float alpha, float sigma) {
  return logf(alpha) - logf(sigma);
}

/* model_outputs[-1 - j] of a history of `order` outputs. */
static float *hist(step_ctx *c, int order, int j) {
  return c->st.ms.outputs[order - 1 - j];
}

/* Shifts the history and returns the buffer that becomes model_outputs[-1] (the oldest one's). */
static float *hist_push(step_ctx *c, int order) {
  float **out = c->st.ms.outputs;
  float *oldest = out[0];
  for (int k = 0; k + 1 < order; k++)
    out[k] = out[k + 1];
  out[order - 1] = oldest;
  return oldest;
}

/* The state buffers of the multistep family: the outputs first, then the solver's own. */
static void multistep_bind(const sampler *s, step_ctx *c, float *const *bufs) {
  (void)s;
  multistep_state *st = &c->st.ms;
  for (int k = 0; k < SAMPLER_MAX_ORDER; k++)
    st->outputs[k] = bufs[k];
  st->sample = st->last_sample = bufs[SAMPLER_MAX_ORDER];
  st->d2 = bufs[SAMPLER_MAX_ORDER + 1];
}

/* Timesteps of DPMSolverMultistep, UniPC and DEIS for `spacing` (their set_timesteps, which
 * differ from DDIM's: leading uses last // (n + 1), linspace has n + 1 points). The rare step
 * counts for which numpy's float arange gives trailing one value too many are cut to n. */
static void multistep_timesteps(const sched_config *cfg, int T, int last, int n, int64_t *ts) {
  switch (cfg->timestep_spacing) {
  case SCHED_SPACING_LINSPACE:
    for (int k = 0; k < n; k++)
      ts[k] = (int64_t)nearbyint(np_linspace_at(0, last - 1, n + 1, n - k));
    break;
  case SCHED_SPACING_LEADING: {
    const int64_t ratio = last / (n + 1);
    for (int k = 0; k < n; k++)
      ts[k] = (int64_t)(n - k) * ratio + cfg->steps_offset;
    break;
  }
  case SCHED_SPACING_TRAILING: {
    const double ratio = (double)T / n, delta = ((double)last + -ratio) - (double)last;
    for (int k = 0; k < n; k++)
      ts[k] = (int64_t)nearbyint(k == 0 ? (double)last : (double)last + k * delta) - 1;
    break;
  }
  }
}

/* The float32 sigmas of a multistep class: np.interp of the training sigmas at the timesteps,
 * Karras or Lu schedules; n + 1 values, the last one `last_sigma`. Fills ts for Karras/Lu. */
typedef enum { GRID_DPM, GRID_UNIPC, GRID_DEIS } grid_kind;

static int make_grid(sampler *s, grid_kind kind, int64_t *ts, err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n, T = s->T;
  s->n_sigmas = n + 1;
  s->sigmas = malloc((size_t)(n + 1) * sizeof *s->sigmas);
  double *sg = malloc((size_t)(n + 1) * sizeof *sg);
  if (!s->sigmas || !sg) {
    free(sg);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  const double train_min = sampler_sigma_of(s, 0), train_max = sampler_sigma_of(s, T - 1);
  const int round_t = cfg->beta_schedule != SCHED_BETA_SQUAREDCOS_CAP_V2 || kind != GRID_DPM;
  if (cfg->use_karras_sigmas) {
    double smin = train_min, smax = train_max;
    if (kind == GRID_UNIPC) { /* UniPC reads sigma_min / sigma_max from its config */
      if (!isnan(cfg->sigma_min))
        smin = cfg->sigma_min;
      if (!isnan(cfg->sigma_max))
        smax = cfg->sigma_max;
    }
    sampler_karras(smin, smax, n, sg);
    for (int k = 0; k < n; k++) {
      const double t = sampler_sigma_to_t(s, sg[k]);
      ts[k] = (int64_t)(round_t ? nearbyint(t) : t);
    }
  } else if (cfg->use_lu_lambdas) {
    const double lmin = logf((float)train_min), lmax = logf((float)train_max);
    for (int k = 0; k < n; k++) {
      sg[k] = exp(lmax + np_linspace_at(0, 1, n, k) * (lmin - lmax));
      const double t = sampler_sigma_to_t(s, sg[k]);
      ts[k] = (int64_t)(round_t ? nearbyint(t) : t);
    }
  } else {
    for (int k = 0; k < n; k++)
      sg[k] = sampler_sigma_interp(s, (double)ts[k]);
  }
  double last;
  if (kind == GRID_DEIS)
    last = cfg->use_karras_sigmas ? sg[n - 1] : train_min; /* DEIS repeats the last Karras sigma */
  else if (cfg->final_sigmas_type == SCHED_FINAL_ZERO)
    last = 0;
  else
    last = kind == GRID_UNIPC && cfg->use_karras_sigmas ? sg[n - 1] : train_min;
  sg[n] = last;
  for (int k = 0; k <= n; k++)
    s->sigmas[k] = (float)sg[k];
  s->ends_clean = last == 0;
  free(sg);
  return ERR_OK;
}

static int common_prepare(sampler *s, grid_kind kind, int clip, err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n, T = s->T;
  /* rescale_zero_terminal_snr: "close to 0 without being 0 so first sigma is not inf" */
  if (cfg->rescale_betas_zero_snr && kind != GRID_DEIS)
    s->abar[T - 1] = 0x1p-24f;
  int last = T;
  if (clip) {
    /* lambda_min_clipped: searchsorted(flip(lambda_t), value) counts the clipped tail */
    int clipped = 0;
    for (int k = 0; k < T; k++) {
      const float a = s->abar[k];
      if (lambda_of(sqrtf(a), sqrtf(1.0f - a)) < cfg->lambda_min_clipped)
        clipped++;
    }
    last = T - clipped;
    if (last < 2)
      return err_set(e, ERR_INVALID,
                     "scheduler config key 'lambda_min_clipped': %g clips the whole schedule",
                     cfg->lambda_min_clipped);
  }
  int rc = sampler_plan(s, n, 0, e);
  s->ts = malloc((size_t)n * sizeof *s->ts);
  if (rc != ERR_OK || !s->ts)
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  multistep_timesteps(cfg, T, last, n, s->ts);
  for (int k = 0; k < n; k++)
    if (s->ts[k] < 0 || s->ts[k] >= T)
      return err_set(e, ERR_INVALID,
                     "scheduler config key 'steps_offset': timestep %lld of %d steps is outside "
                     "[0, %d)",
                     (long long)s->ts[k], n, T);
  if ((rc = make_grid(s, kind, s->ts, e)) != ERR_OK)
    return rc;
  for (int k = 0; k < n; k++) {
    s->tm[k] = (double)s->ts[k];
    s->step_end[k] = 1;
  }
  return ERR_OK;
}

static int check_sigma_options(const sampler *s, err *e) {
  if (s->cfg.use_karras_sigmas && s->cfg.use_lu_lambdas)
    return err_set(e, ERR_INVALID,
                   "scheduler config keys 'use_karras_sigmas' and 'use_lu_lambdas' exclude each "
                   "other");
  return ERR_OK;
}

/* ---- DPMSolverMultistepScheduler ---- */

static int is_pp(sched_algorithm a) {
  return a == SCHED_ALGO_DPMSOLVER_PP || a == SCHED_ALGO_SDE_DPMSOLVER_PP;
}
static int is_sde(sched_algorithm a) {
  return a == SCHED_ALGO_SDE_DPMSOLVER || a == SCHED_ALGO_SDE_DPMSOLVER_PP;
}

/* diffusers maps other classes' values onto its own (a DEIS config drives DPM-Solver). */
static int dpm_common_checks(sampler *s, int singlestep, err *e) {
  sched_config *cfg = &s->cfg;
  if (cfg->algorithm_type == SCHED_ALGO_DEIS)
    cfg->algorithm_type = SCHED_ALGO_DPMSOLVER_PP;
  if (cfg->solver_type == SCHED_SOLVER_LOGRHO || cfg->solver_type == SCHED_SOLVER_BH1 ||
      cfg->solver_type == SCHED_SOLVER_BH2)
    cfg->solver_type = SCHED_SOLVER_MIDPOINT;
  if (cfg->solver_type != SCHED_SOLVER_MIDPOINT && cfg->solver_type != SCHED_SOLVER_HEUN)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'solver_type': '%s' is not one of %s's (midpoint, heun)",
                   sched_solver_type_name(cfg->solver_type), s->desc->class_name);
  if (singlestep && cfg->algorithm_type == SCHED_ALGO_SDE_DPMSOLVER)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'algorithm_type': DPMSolverSinglestepScheduler has no "
                   "'sde-dpmsolver' (dpmsolver, dpmsolver++ or sde-dpmsolver++)");
  if (!is_pp(cfg->algorithm_type) && cfg->final_sigmas_type == SCHED_FINAL_ZERO)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'final_sigmas_type': 'zero' needs algorithm_type "
                   "dpmsolver++ or sde-dpmsolver++; with '%s' use 'sigma_min'",
                   sched_algorithm_name(cfg->algorithm_type));
  if (!singlestep && cfg->algorithm_type == SCHED_ALGO_SDE_DPMSOLVER && cfg->solver_order == 3)
    return err_set(e, ERR_INVALID,
                   "scheduler config keys 'solver_order' 3 and 'algorithm_type' sde-dpmsolver: "
                   "diffusers has no third-order sde-dpmsolver update");
  if (singlestep && cfg->thresholding && cfg->algorithm_type == SCHED_ALGO_DPMSOLVER)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'thresholding' with algorithm_type dpmsolver fails in "
                   "diffusers' DPMSolverSinglestepScheduler; use dpmsolver++");
  return check_sigma_options(s, e);
}

static int dpm_multi_prepare(sampler *s, err *e) {
  const sched_config *cfg = &s->cfg;
  int rc = dpm_common_checks(s, 0, e);
  if (rc == ERR_OK)
    rc = common_prepare(s, GRID_DPM, 1, e);
  s->stochastic = is_sde(cfg->algorithm_type);
  /* Karras/Lu grids end on the training sigma_min, which sigma_min repeats: a zero-length last
   * step, harmless at order 1-2 but 0/0 in the third-order update (NaN in diffusers too) */
  const int n = s->n;
  const int last_low = cfg->euler_at_final || (cfg->lower_order_final && n < 15);
  if (rc == ERR_OK && cfg->solver_order == 3 && n >= 3 && !last_low &&
      s->sigmas[n - 1] == s->sigmas[n])
    rc = err_set(e, ERR_INVALID,
                 "scheduler config key 'final_sigmas_type': sigma_min repeats the last %s sigma, "
                 "and the third-order step over that zero interval is NaN (in diffusers too); use "
                 "final_sigmas_type zero, euler_at_final, or solver_order 2",
                 cfg->use_karras_sigmas ? "Karras" : "Lu");
  return rc;
}

/* The model output of one image as the data prediction x0 (thresholded when
 * the config asks), the way diffusers' convert_model_output does it. */
static void output_to_x0(const sched_config *cfg, float alpha_t, float sigma_t, const float *x,
                         const float *mo, size_t d, float *out, float *sel) {
  switch (cfg->prediction_type) {
  case SCHED_PRED_EPSILON:
    for (size_t k = 0; k < d; k++)
      out[k] = (x[k] - sigma_t * mo[k]) / alpha_t;
    break;
  case SCHED_PRED_SAMPLE: memcpy(out, mo, d * sizeof *out); break;
  case SCHED_PRED_V:
    for (size_t k = 0; k < d; k++)
      out[k] = alpha_t * x[k] - sigma_t * mo[k];
    break;
  }
  if (cfg->thresholding)
    sampler_threshold_diffusers(cfg, out, d, sel);
}

/* The model output of one image as the noise prediction eps (no thresholding). */
static void output_to_eps(const sched_config *cfg, float alpha_t, float sigma_t, const float *x,
                          const float *mo, size_t d, float *out) {
  switch (cfg->prediction_type) {
  case SCHED_PRED_EPSILON: memcpy(out, mo, d * sizeof *out); break;
  case SCHED_PRED_SAMPLE:
    for (size_t k = 0; k < d; k++)
      out[k] = (x[k] - alpha_t * mo[k]) / sigma_t;
    break;
  case SCHED_PRED_V:
    for (size_t k = 0; k < d; k++)
      out[k] = alpha_t * mo[k] + sigma_t * x[k];
    break;
  }
}

/* convert_model_output for one image: x0 for the ++ algorithms, eps otherwise. */
static void dpm_convert(const sched_config *cfg, float sigma, const float *x, const float *mo,
                        size_t d, float *out, float *sel) {
  float alpha_t, sigma_t;
  alpha_sigma(sigma, &alpha_t, &sigma_t);
  if (is_pp(cfg->algorithm_type)) {
    output_to_x0(cfg, alpha_t, sigma_t, x, mo, d, out, sel);
    return;
  }
  output_to_eps(cfg, alpha_t, sigma_t, x, mo, d, out);
  if (cfg->thresholding) {
    /* x0 from eps, thresholded, back to eps; `sel` is 2 d floats here */
    float *x0 = sel + d;
    for (size_t k = 0; k < d; k++)
      x0[k] = (x[k] - sigma_t * out[k]) / alpha_t;
    sampler_threshold_diffusers(cfg, x0, d, sel);
    for (size_t k = 0; k < d; k++)
      out[k] = (x[k] - alpha_t * x0[k]) / sigma_t;
  }
}

/* Converts the batch's model output into m (batch * d). */
static void convert_batch(const sampler *s, step_ctx *c, float sigma, float *m,
                          void (*conv)(const sched_config *, float, const float *, const float *,
                                       size_t, float *, float *)) {
  for (int b = 0; b < c->batch; b++) {
    const size_t off = (size_t)b * c->d;
    conv(&s->cfg, sigma, c->x + off, c->mo + off, c->d, m + off, c->sel);
  }
}

static int draw_noise(step_ctx *c, err *e) {
  for (int b = 0; b < c->batch; b++) {
    int rc = sampler_noise(c, b, c->noise + (size_t)b * c->d, e);
    if (rc != ERR_OK)
      return rc;
  }
  return ERR_OK;
}

/* dpm_solver_first_order_update (both schedulers): from sigma_s to sigma_t with model value m. */
static void dpm_first(sched_algorithm algo, float sig_t, float sig_s, const float *x,
                      const float *m, const float *z, size_t nd, float *out) {
  float alpha_t, sigma_t, alpha_s, sigma_s;
  alpha_sigma(sig_t, &alpha_t, &sigma_t);
  alpha_sigma(sig_s, &alpha_s, &sigma_s);
  const float h = lambda_of(alpha_t, sigma_t) - lambda_of(alpha_s, sigma_s);
  switch (algo) {
  case SCHED_ALGO_DPMSOLVER_PP: {
    const float c1 = sigma_t / sigma_s, c2 = alpha_t * (expf(-h) - 1.0f);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] - c2 * m[k];
    break;
  }
  case SCHED_ALGO_DPMSOLVER: {
    const float c1 = alpha_t / alpha_s, c2 = sigma_t * (expf(h) - 1.0f);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] - c2 * m[k];
    break;
  }
  case SCHED_ALGO_SDE_DPMSOLVER_PP: {
    const float e2 = expf(-2.0f * h);
    const float c1 = sigma_t / sigma_s * expf(-h), c2 = alpha_t * (1.0f - e2);
    const float c3 = sigma_t * sqrtf(1.0f - e2);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] + c2 * m[k] + c3 * z[k];
    break;
  }
  case SCHED_ALGO_SDE_DPMSOLVER: {
    const float c1 = alpha_t / alpha_s, c2 = 2.0f * (sigma_t * (expf(h) - 1.0f));
    const float c3 = sigma_t * sqrtf(expf(2.0f * h) - 1.0f);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] - c2 * m[k] + c3 * z[k];
    break;
  }
  default: break;
  }
}

/* The second-order update shared by multistep (x at s0, D0 = m0) and singlestep (x at s1,
 * D0 = m1): x_t = A x + B D0 + C D1 (+ noise), with D1 = (m0 - m1) / r0. */
static void dpm_second(sched_algorithm algo, sched_solver_type st, float alpha_t, float sigma_t,
                       float alpha_x, float sigma_x, float h, const float *x, const float *D0,
                       const float *D1, const float *z, size_t nd, float *out) {
  if (algo == SCHED_ALGO_DPMSOLVER_PP) {
    const float c1 = sigma_t / sigma_x, c2 = alpha_t * (expf(-h) - 1.0f);
    if (st == SCHED_SOLVER_MIDPOINT) {
      const float c3 = 0.5f * (alpha_t * (expf(-h) - 1.0f));
      for (size_t k = 0; k < nd; k++)
        out[k] = c1 * x[k] - c2 * D0[k] - c3 * D1[k];
    } else {
      const float c3 = alpha_t * ((expf(-h) - 1.0f) / h + 1.0f);
      for (size_t k = 0; k < nd; k++)
        out[k] = c1 * x[k] - c2 * D0[k] + c3 * D1[k];
    }
  } else if (algo == SCHED_ALGO_DPMSOLVER) {
    const float c1 = alpha_t / alpha_x, c2 = sigma_t * (expf(h) - 1.0f);
    const float c3 = st == SCHED_SOLVER_MIDPOINT ? 0.5f * (sigma_t * (expf(h) - 1.0f))
                                                 : sigma_t * ((expf(h) - 1.0f) / h - 1.0f);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] - c2 * D0[k] - c3 * D1[k];
  } else if (algo == SCHED_ALGO_SDE_DPMSOLVER_PP) {
    const float e2 = expf(-2.0f * h);
    const float c1 = sigma_t / sigma_x * expf(-h), c2 = alpha_t * (1.0f - e2);
    const float c3 = st == SCHED_SOLVER_MIDPOINT ? 0.5f * (alpha_t * (1.0f - e2))
                                                 : alpha_t * ((1.0f - e2) / (-2.0f * h) + 1.0f);
    const float c4 = sigma_t * sqrtf(1.0f - e2);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] + c2 * D0[k] + c3 * D1[k] + c4 * z[k];
  } else { /* sde-dpmsolver */
    const float c1 = alpha_t / alpha_x, c2 = 2.0f * (sigma_t * (expf(h) - 1.0f));
    const float c3 = st == SCHED_SOLVER_MIDPOINT ? sigma_t * (expf(h) - 1.0f)
                                                 : 2.0f * (sigma_t * ((expf(h) - 1.0f) / h - 1.0f));
    const float c4 = sigma_t * sqrtf(expf(2.0f * h) - 1.0f);
    for (size_t k = 0; k < nd; k++)
      out[k] = c1 * x[k] - c2 * D0[k] - c3 * D1[k] + c4 * z[k];
  }
}

static int dpm_multi_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  const int i = c->i, N = s->n, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  int *lon = &c->st.ms.lower_order_nums;
  const int lof = i == N - 1 && (cfg->euler_at_final || (cfg->lower_order_final && N < 15) ||
                                 cfg->final_sigmas_type == SCHED_FINAL_ZERO);
  const int los = i == N - 2 && cfg->lower_order_final && N < 15;
  float *m = hist_push(c, K);
  convert_batch(s, c, s->sigmas[i], m, dpm_convert);
  if (is_sde(cfg->algorithm_type)) {
    int rc = draw_noise(c, e);
    if (rc != ERR_OK)
      return rc;
  }
  float *out = c->tmp[0];
  const float *z = c->noise;
  if (K == 1 || *lon < 1 || lof) {
    dpm_first(cfg->algorithm_type, s->sigmas[i + 1], s->sigmas[i], c->x, m, z, nd, out);
  } else {
    float alpha_t, sigma_t, alpha_s0, sigma_s0, alpha_s1, sigma_s1;
    alpha_sigma(s->sigmas[i + 1], &alpha_t, &sigma_t);
    alpha_sigma(s->sigmas[i], &alpha_s0, &sigma_s0);
    alpha_sigma(s->sigmas[i - 1], &alpha_s1, &sigma_s1);
    const float lt = lambda_of(alpha_t, sigma_t), l0 = lambda_of(alpha_s0, sigma_s0);
    const float l1 = lambda_of(alpha_s1, sigma_s1);
    const float *m0 = hist(c, K, 0), *m1 = hist(c, K, 1);
    const float h = lt - l0, h0 = l0 - l1, r0 = h0 / h;
    float *D1 = c->tmp[1];
    if (K == 2 || *lon < 2 || los) {
      const float inv = 1.0f / r0;
      for (size_t k = 0; k < nd; k++)
        D1[k] = inv * (m0[k] - m1[k]);
      dpm_second(cfg->algorithm_type, cfg->solver_type, alpha_t, sigma_t, alpha_s0, sigma_s0, h,
                 c->x, m0, D1, z, nd, out);
    } else {
      float alpha_s2, sigma_s2;
      alpha_sigma(s->sigmas[i - 2], &alpha_s2, &sigma_s2);
      const float l2 = lambda_of(alpha_s2, sigma_s2), h1 = l1 - l2, r1 = h1 / h;
      const float *m2 = hist(c, K, 2);
      const float i0 = 1.0f / r0, i1 = 1.0f / r1, q = r0 / (r0 + r1), q2 = 1.0f / (r0 + r1);
      float *D2 = c->tmp[2];
      for (size_t k = 0; k < nd; k++) {
        const float d10 = i0 * (m0[k] - m1[k]), d11 = i1 * (m1[k] - m2[k]);
        D1[k] = d10 + q * (d10 - d11);
        D2[k] = q2 * (d10 - d11);
      }
      const float em = expf(-h), ep = expf(h);
      if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP) {
        const float a = sigma_t / sigma_s0, b = alpha_t * (em - 1.0f);
        const float cc = alpha_t * ((em - 1.0f) / h + 1.0f);
        const float dd = alpha_t * ((em - 1.0f + h) / (h * h) - 0.5f);
        for (size_t k = 0; k < nd; k++)
          out[k] = a * c->x[k] - b * m0[k] + cc * D1[k] - dd * D2[k];
      } else if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER) {
        const float a = alpha_t / alpha_s0, b = sigma_t * (ep - 1.0f);
        const float cc = sigma_t * ((ep - 1.0f) / h - 1.0f);
        const float dd = sigma_t * ((ep - 1.0f - h) / (h * h) - 0.5f);
        for (size_t k = 0; k < nd; k++)
          out[k] = a * c->x[k] - b * m0[k] - cc * D1[k] - dd * D2[k];
      } else { /* sde-dpmsolver++: diffusers' formula, kept as written (see README) */
        const float e2 = expf(-2.0f * h), h2 = 2.0f * h;
        const float a = sigma_t / sigma_s0 * em, b = alpha_t * (1.0f - e2);
        const float cc = alpha_t * ((1.0f - e2) / (-2.0f * h) + 1.0f);
        const float dd = alpha_t * ((1.0f - e2 - 2.0f * h) / (h2 * h2) - 0.5f);
        const float nz = sigma_t * sqrtf(1.0f - e2);
        for (size_t k = 0; k < nd; k++)
          out[k] = a * c->x[k] + b * m0[k] + cc * D1[k] + dd * D2[k] + nz * z[k];
      }
    }
  }
  if (*lon < K)
    (*lon)++;
  memcpy(c->x, out, nd * sizeof *out);
  return ERR_OK;
}

const solver_desc solver_dpm_multistep = {"dpm_multistep",
                                          "DPMSolverMultistepScheduler",
                                          25,
                                          dpm_multi_prepare,
                                          dpm_multi_step,
                                          NULL,
                                          3,
                                          0,
                                          multistep_bind};

/* ---- DPMSolverSinglestepScheduler ---- */

/* get_order_list(steps) */
static void singlestep_orders(const sched_config *cfg, int steps, int *o) {
  const int K = cfg->solver_order;
  int n = 0;
  if (cfg->lower_order_final) {
    if (K == 3) {
      const int reps = steps % 3 == 0 ? steps / 3 - 1 : steps / 3;
      for (int r = 0; r < reps; r++) {
        o[n++] = 1;
        o[n++] = 2;
        o[n++] = 3;
      }
      if (steps % 3 == 0) {
        o[n++] = 1;
        o[n++] = 2;
        o[n++] = 1;
      } else if (steps % 3 == 1) {
        o[n++] = 1;
      } else {
        o[n++] = 1;
        o[n++] = 2;
      }
    } else if (K == 2) {
      const int reps = steps % 2 == 0 ? steps / 2 - 1 : steps / 2;
      for (int r = 0; r < reps; r++) {
        o[n++] = 1;
        o[n++] = 2;
      }
      o[n++] = 1;
      if (steps % 2 == 0)
        o[n++] = 1;
    } else {
      for (; n < steps; n++)
        o[n] = 1;
    }
  } else {
    for (; n < steps; n++)
      o[n] = K == 3 ? 1 + n % 3 : K == 2 ? 1 + n % 2 : 1;
  }
  if (cfg->final_sigmas_type == SCHED_FINAL_ZERO)
    o[steps - 1] = 1;
}

static int dpm_single_prepare(sampler *s, err *e) {
  sched_config *cfg = &s->cfg;
  int rc = dpm_common_checks(s, 1, e);
  if (rc != ERR_OK)
    return rc;
  /* the singlestep class has no timestep_spacing: always linspace */
  cfg->timestep_spacing = SCHED_SPACING_LINSPACE;
  cfg->steps_offset = 0;
  cfg->rescale_betas_zero_snr = 0;
  cfg->use_lu_lambdas = 0;
  /* set_timesteps switches lower_order_final on where the orders would not fit */
  if (!cfg->lower_order_final &&
      (s->n % cfg->solver_order != 0 || cfg->final_sigmas_type == SCHED_FINAL_ZERO))
    cfg->lower_order_final = 1;
  if ((rc = common_prepare(s, GRID_DPM, 1, e)) != ERR_OK)
    return rc;
  s->orders = malloc((size_t)s->n * sizeof *s->orders);
  if (!s->orders)
    return err_set(e, ERR_NOMEM, "out of memory");
  singlestep_orders(cfg, s->n, s->orders);
  s->stochastic = is_sde(cfg->algorithm_type);
  return ERR_OK;
}

static int dpm_single_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  const int i = c->i, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  float *m = hist_push(c, K);
  convert_batch(s, c, s->sigmas[i], m, dpm_convert);
  int *filled = &c->st.ms.lower_order_nums; /* model_outputs that are not None */
  if (*filled < K)
    (*filled)++;
  if (is_sde(cfg->algorithm_type)) {
    int rc = draw_noise(c, e);
    if (rc != ERR_OK)
      return rc;
  }
  int order = s->orders[i];
  while (order > *filled)
    order--;
  float *sample = c->st.ms.sample;
  if (order == 1)
    memcpy(sample, c->x, nd * sizeof *sample);
  const float *z = c->noise;
  float *out = c->tmp[0];
  if (order == 1) {
    dpm_first(cfg->algorithm_type, s->sigmas[i + 1], s->sigmas[i], sample, m, z, nd, out);
  } else if (order == 2) {
    float alpha_t, sigma_t, alpha_s0, sigma_s0, alpha_s1, sigma_s1;
    alpha_sigma(s->sigmas[i + 1], &alpha_t, &sigma_t);
    alpha_sigma(s->sigmas[i], &alpha_s0, &sigma_s0);
    alpha_sigma(s->sigmas[i - 1], &alpha_s1, &sigma_s1);
    const float lt = lambda_of(alpha_t, sigma_t), l0 = lambda_of(alpha_s0, sigma_s0);
    const float l1 = lambda_of(alpha_s1, sigma_s1);
    const float h = lt - l1, h0 = l0 - l1, r0 = h0 / h, inv = 1.0f / r0;
    const float *m0 = hist(c, K, 0), *m1 = hist(c, K, 1);
    float *D1 = c->tmp[1];
    for (size_t k = 0; k < nd; k++)
      D1[k] = inv * (m0[k] - m1[k]);
    dpm_second(cfg->algorithm_type, cfg->solver_type, alpha_t, sigma_t, alpha_s1, sigma_s1, h,
               sample, m1, D1, z, nd, out);
  } else {
    float alpha_t, sigma_t, a0, s0, a1, s1, a2, s2;
    alpha_sigma(s->sigmas[i + 1], &alpha_t, &sigma_t);
    alpha_sigma(s->sigmas[i], &a0, &s0);
    alpha_sigma(s->sigmas[i - 1], &a1, &s1);
    alpha_sigma(s->sigmas[i - 2], &a2, &s2);
    const float lt = lambda_of(alpha_t, sigma_t), l0 = lambda_of(a0, s0), l1 = lambda_of(a1, s1);
    const float l2 = lambda_of(a2, s2);
    const float h = lt - l2, h0 = l0 - l2, h1 = l1 - l2, r0 = h0 / h, r1 = h1 / h;
    const float *m0 = hist(c, K, 0), *m1 = hist(c, K, 1), *m2 = hist(c, K, 2);
    const float i1 = 1.0f / r1, i0 = 1.0f / r0, rd = r0 - r1;
    float *D1_1 = c->tmp[1], *D1 = c->tmp[2], *D2 = c->st.ms.d2;
    for (size_t k = 0; k < nd; k++) {
      const float d10 = i1 * (m1[k] - m2[k]), d11 = i0 * (m0[k] - m2[k]);
      D1_1[k] = d11;
      D1[k] = (r0 * d10 - r1 * d11) / rd;
      D2[k] = 2.0f * (d11 - d10) / rd;
    }
    const int mid = cfg->solver_type == SCHED_SOLVER_MIDPOINT;
    const float em = expf(-h), ep = expf(h);
    if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP) {
      const float a = sigma_t / s2, b = alpha_t * (em - 1.0f);
      const float cc = alpha_t * ((em - 1.0f) / h + 1.0f);
      const float dd = alpha_t * ((em - 1.0f + h) / (h * h) - 0.5f);
      for (size_t k = 0; k < nd; k++)
        out[k] = mid ? a * sample[k] - b * m2[k] + cc * D1_1[k]
                     : a * sample[k] - b * m2[k] + cc * D1[k] - dd * D2[k];
    } else if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER) {
      const float a = alpha_t / a2, b = sigma_t * (ep - 1.0f);
      const float cc = sigma_t * ((ep - 1.0f) / h - 1.0f);
      const float dd = sigma_t * ((ep - 1.0f - h) / (h * h) - 0.5f);
      for (size_t k = 0; k < nd; k++)
        out[k] = mid ? a * sample[k] - b * m2[k] - cc * D1_1[k]
                     : a * sample[k] - b * m2[k] - cc * D1[k] - dd * D2[k];
    } else { /* sde-dpmsolver++ */
      const float e2 = expf(-2.0f * h), mh = -2.0f * h;
      const float a = sigma_t / s2 * em, b = alpha_t * (1.0f - e2);
      const float cc = alpha_t * ((1.0f - e2) / (-2.0f * h) + 1.0f);
      const float dd = alpha_t * ((1.0f - e2 + mh) / (mh * mh) - 0.5f);
      const float nz = sigma_t * sqrtf(1.0f - e2);
      for (size_t k = 0; k < nd; k++)
        out[k] = mid ? a * sample[k] + b * m2[k] + cc * D1_1[k] + nz * z[k]
                     : a * sample[k] + b * m2[k] + cc * D1[k] + dd * D2[k] + nz * z[k];
    }
  }
  memcpy(c->x, out, nd * sizeof *out);
  return ERR_OK;
}

const solver_desc solver_dpm_singlestep = {"dpm_singlestep",
                                           "DPMSolverSinglestepScheduler",
                                           25,
                                           dpm_single_prepare,
                                           dpm_single_step,
                                           NULL,
                                           5,
                                           0,
                                           multistep_bind};

/* ---- UniPCMultistepScheduler ---- */

static int unipc_prepare(sampler *s, err *e) {
  sched_config *cfg = &s->cfg;
  if (cfg->solver_type == SCHED_SOLVER_MIDPOINT || cfg->solver_type == SCHED_SOLVER_HEUN ||
      cfg->solver_type == SCHED_SOLVER_LOGRHO)
    cfg->solver_type = SCHED_SOLVER_BH2;
  if (cfg->solver_type != SCHED_SOLVER_BH1 && cfg->solver_type != SCHED_SOLVER_BH2)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'solver_type': '%s' is not one of UniPC's (bh1, bh2)",
                   sched_solver_type_name(cfg->solver_type));
  if (cfg->use_lu_lambdas)
    return err_set(e, ERR_INVALID, "scheduler config key 'use_lu_lambdas' is not a UniPC option");
  if (cfg->solver_type == SCHED_SOLVER_BH1 && cfg->final_sigmas_type == SCHED_FINAL_ZERO)
    return err_set(e, ERR_INVALID,
                   "scheduler config keys 'solver_type' bh1 and 'final_sigmas_type' zero: "
                   "diffusers' last UniPC step multiplies infinity by zero and returns NaN; use "
                   "bh2 or final_sigmas_type sigma_min");
  if (!cfg->predict_x0 && cfg->final_sigmas_type == SCHED_FINAL_ZERO)
    return err_set(e, ERR_INVALID,
                   "scheduler config keys 'predict_x0' false and 'final_sigmas_type' zero: the "
                   "noise-prediction step to sigma 0 is infinite times zero (NaN in diffusers); "
                   "use final_sigmas_type sigma_min");
  if (!cfg->lower_order_final && cfg->solver_order > 1 &&
      cfg->final_sigmas_type == SCHED_FINAL_ZERO && s->n > 1)
    return err_set(e, ERR_INVALID,
                   "scheduler config keys 'lower_order_final' false and 'final_sigmas_type' "
                   "zero: a multistep step to sigma 0 divides by an infinite step and returns "
                   "NaN in diffusers; keep lower_order_final");
  if (cfg->thresholding && !cfg->predict_x0)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'thresholding' needs predict_x0 true (UniPC thresholds "
                   "the data prediction)");
  return common_prepare(s, GRID_UNIPC, 0, e);
}

static void unipc_convert(const sched_config *cfg, float sigma, const float *x, const float *mo,
                          size_t d, float *out, float *sel) {
  float alpha_t, sigma_t;
  alpha_sigma(sigma, &alpha_t, &sigma_t);
  if (cfg->predict_x0)
    output_to_x0(cfg, alpha_t, sigma_t, x, mo, d, out, sel);
  else
    output_to_eps(cfg, alpha_t, sigma_t, x, mo, d, out);
}

/* Solves the small system R rho = b (n <= 3) in double; torch solves it in float32. */
static void solve_small(int n, double R[3][3], const double *b, double *x) {
  double A[3][4] = {{0}};
  for (int r = 0; r < n; r++) {
    for (int k = 0; k < n; k++)
      A[r][k] = R[r][k];
    A[r][n] = b[r];
  }
  for (int col = 0; col < n; col++) {
    int piv = col;
    for (int r = col + 1; r < n; r++)
      if (fabs(A[r][col]) > fabs(A[piv][col]))
        piv = r;
    for (int k = 0; k <= n; k++) {
      double t = A[col][k];
      A[col][k] = A[piv][k];
      A[piv][k] = t;
    }
    for (int r = col + 1; r < n; r++) {
      const double f = A[r][col] / A[col][col];
      for (int k = col; k <= n; k++)
        A[r][k] -= f * A[col][k];
    }
  }
  for (int r = n - 1; r >= 0; r--) {
    double v = A[r][n];
    for (int k = r + 1; k < n; k++)
      v -= A[r][k] * x[k];
    x[r] = v / A[r][r];
  }
}

/* The B(h) coefficients shared by UniP and UniC: h_phi_1, B_h and b[0..order). rks holds the
 * order - 1 ratios then 1. */
static void unipc_coeffs(const sched_config *cfg, float h, int order, const float *rks,
                         float *h_phi_1, float *B_h, float *b, double R[3][3]) {
  const float hh = cfg->predict_x0 ? -h : h;
  *h_phi_1 = expm1f(hh);
  float h_phi_k = *h_phi_1 / hh - 1.0f;
  int factorial = 1;
  *B_h = cfg->solver_type == SCHED_SOLVER_BH1 ? hh : expm1f(hh);
  for (int k = 1; k <= order; k++) {
    for (int j = 0; j < order; j++) /* torch.pow(rks, k - 1) */
      R[k - 1][j] = k == 1 ? 1.0 : k == 2 ? (double)rks[j] : (double)(rks[j] * rks[j]);
    b[k - 1] = h_phi_k * (float)factorial / *B_h;
    factorial *= k + 1;
    h_phi_k = h_phi_k / hh - (float)(1.0 / factorial);
  }
}

/* multistep_uni_p_bh_update from x (at sigmas[i]) to sigmas[i + 1]. */
static void unip(const sampler *s, step_ctx *c, int order, const float *x, float *out) {
  const sched_config *cfg = &s->cfg;
  const int i = c->i, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  float alpha_t, sigma_t, alpha_s0, sigma_s0;
  alpha_sigma(s->sigmas[i + 1], &alpha_t, &sigma_t);
  alpha_sigma(s->sigmas[i], &alpha_s0, &sigma_s0);
  const float l0 = lambda_of(alpha_s0, sigma_s0), h = lambda_of(alpha_t, sigma_t) - l0;
  float rks[3];
  for (int k = 1; k < order; k++) {
    float a, sg;
    alpha_sigma(s->sigmas[i - k], &a, &sg);
    rks[k - 1] = (lambda_of(a, sg) - l0) / h;
  }
  rks[order - 1] = 1.0f;
  float h_phi_1, B_h, b[3];
  double R[3][3];
  unipc_coeffs(cfg, h, order, rks, &h_phi_1, &B_h, b, R);
  float rhos[2] = {0, 0};
  if (order == 2) {
    rhos[0] = 0.5f;
  } else if (order == 3) {
    double bb[2] = {b[0], b[1]}, xr[2] = {0, 0};
    solve_small(2, R, bb, xr);
    rhos[0] = (float)xr[0];
    rhos[1] = (float)xr[1];
  }
  const float *m0 = hist(c, K, 0);
  const float c1 = cfg->predict_x0 ? sigma_t / sigma_s0 : alpha_t / alpha_s0;
  const float c2 = (cfg->predict_x0 ? alpha_t : sigma_t) * h_phi_1;
  const float c3 = (cfg->predict_x0 ? alpha_t : sigma_t) * B_h;
  for (size_t k = 0; k < nd; k++) {
    const float base = c1 * x[k] - c2 * m0[k];
    float res = 0;
    for (int j = 1; j < order; j++) {
      const float dj = (hist(c, K, j)[k] - m0[k]) / rks[j - 1];
      res = j == 1 ? rhos[0] * dj : res + rhos[j - 1] * dj;
    }
    out[k] = order > 1 ? base - c3 * res : base - c3 * 0.0f;
  }
}

/* multistep_uni_c_bh_update: corrects this_sample (at sigmas[i]) with this model output mt. */
static void unic(const sampler *s, step_ctx *c, int order, const float *last, float *x_t,
                 const float *mt) {
  const sched_config *cfg = &s->cfg;
  const int i = c->i, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  float alpha_t, sigma_t, alpha_s0, sigma_s0;
  alpha_sigma(s->sigmas[i], &alpha_t, &sigma_t);
  alpha_sigma(s->sigmas[i - 1], &alpha_s0, &sigma_s0);
  const float l0 = lambda_of(alpha_s0, sigma_s0), h = lambda_of(alpha_t, sigma_t) - l0;
  float rks[3];
  for (int k = 1; k < order; k++) {
    float a, sg;
    alpha_sigma(s->sigmas[i - (k + 1)], &a, &sg);
    rks[k - 1] = (lambda_of(a, sg) - l0) / h;
  }
  rks[order - 1] = 1.0f;
  float h_phi_1, B_h, b[3];
  double R[3][3];
  unipc_coeffs(cfg, h, order, rks, &h_phi_1, &B_h, b, R);
  float rhos[3];
  if (order == 1) {
    rhos[0] = 0.5f;
  } else {
    double bb[3] = {b[0], b[1], b[2]}, xr[3] = {0, 0, 0};
    solve_small(order, R, bb, xr);
    for (int j = 0; j < order; j++)
      rhos[j] = (float)xr[j];
  }
  /* the history has not been shifted yet: m0 is the previous step's converted output */
  const float *m0 = hist(c, K, 0);
  const float c1 = cfg->predict_x0 ? sigma_t / sigma_s0 : alpha_t / alpha_s0;
  const float c2 = (cfg->predict_x0 ? alpha_t : sigma_t) * h_phi_1;
  const float c3 = (cfg->predict_x0 ? alpha_t : sigma_t) * B_h;
  for (size_t k = 0; k < nd; k++) {
    const float base = c1 * last[k] - c2 * m0[k];
    float res = 0;
    for (int j = 1; j < order; j++) {
      const float dj = (hist(c, K, j)[k] - m0[k]) / rks[j - 1];
      res = j == 1 ? rhos[0] * dj : res + rhos[j - 1] * dj;
    }
    const float d1t = mt[k] - m0[k];
    const float corr = order > 1 ? res + rhos[order - 1] * d1t : rhos[0] * d1t;
    x_t[k] = base - c3 * corr;
  }
}

static int unipc_step(const sampler *s, step_ctx *c, err *e) {
  (void)e;
  const sched_config *cfg = &s->cfg;
  const int i = c->i, N = s->n, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  multistep_state *st = &c->st.ms;
  int *lon = &st->lower_order_nums, *this_order = &st->this_order, *has_last = &st->has_last;
  float *last = st->last_sample;
  int disabled = 0;
  for (int k = 0; k < cfg->n_disable_corrector; k++)
    disabled |= cfg->disable_corrector[k] == i - 1;
  /* convert with the sample the model saw (before the corrector) */
  float *mt = c->tmp[1];
  convert_batch(s, c, s->sigmas[i], mt, unipc_convert);
  if (i > 0 && !disabled && *has_last)
    unic(s, c, *this_order, last, c->x, mt);
  float *m = hist_push(c, K);
  memcpy(m, mt, nd * sizeof *m);
  int order = cfg->lower_order_final ? (K < N - i ? K : N - i) : K;
  *this_order = order < *lon + 1 ? order : *lon + 1;
  memcpy(last, c->x, nd * sizeof *last);
  *has_last = 1;
  unip(s, c, *this_order, last, c->tmp[0]);
  memcpy(c->x, c->tmp[0], nd * sizeof *c->x);
  if (*lon < K)
    (*lon)++;
  return ERR_OK;
}

const solver_desc solver_unipc = {
    "unipc", "UniPCMultistepScheduler", 25, unipc_prepare, unipc_step, NULL, 4, 0, multistep_bind};

/* ---- DEISMultistepScheduler ---- */

static int deis_prepare(sampler *s, err *e) {
  sched_config *cfg = &s->cfg;
  if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER || cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP)
    cfg->algorithm_type = SCHED_ALGO_DEIS;
  if (cfg->algorithm_type != SCHED_ALGO_DEIS)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'algorithm_type': DEISMultistepScheduler has only 'deis'");
  if (cfg->solver_type != SCHED_SOLVER_TAYLOR && cfg->solver_type != SCHED_SOLVER_DPMSOLVER)
    cfg->solver_type = SCHED_SOLVER_LOGRHO;
  if (cfg->solver_type != SCHED_SOLVER_LOGRHO)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'solver_type': DEISMultistepScheduler has only 'logrho'");
  if (cfg->use_lu_lambdas)
    return err_set(e, ERR_INVALID, "scheduler config key 'use_lu_lambdas' is not a DEIS option");
  cfg->rescale_betas_zero_snr = 0; /* not a DEIS key */
  return common_prepare(s, GRID_DEIS, 0, e);
}

/* DEIS converts every output to eps through x0, even eps itself (float32 round trip). */
static void deis_convert(const sched_config *cfg, float sigma, const float *x, const float *mo,
                         size_t d, float *out, float *sel) {
  float alpha_t, sigma_t;
  alpha_sigma(sigma, &alpha_t, &sigma_t);
  output_to_x0(cfg, alpha_t, sigma_t, x, mo, d, out, sel);
  for (size_t k = 0; k < d; k++)
    out[k] = (x[k] - alpha_t * out[k]) / sigma_t;
}

/* The log-rho integrals, in float32 like np.log of diffusers' 0-d tensors. */
static float ind2(float t, float b, float c) {
  const float lt = logf(t), lb = logf(b), lc = logf(c);
  return t * (-lc + lt - 1.0f) / (lb - lc);
}
static float ind3(float t, float b, float c, float d) {
  const float lt = logf(t), lb = logf(b), lc = logf(c), ld = logf(d);
  const float num = t * (lc * (ld - lt + 1.0f) - ld * lt + ld + lt * lt - 2.0f * lt + 2.0f);
  const float den = (lb - lc) * (lb - ld);
  return num / den;
}

static int deis_step(const sampler *s, step_ctx *c, err *e) {
  (void)e;
  const sched_config *cfg = &s->cfg;
  const int i = c->i, N = s->n, K = cfg->solver_order;
  const size_t nd = (size_t)c->batch * c->d;
  int *lon = &c->st.ms.lower_order_nums;
  const int lof = i == N - 1 && cfg->lower_order_final && N < 15;
  const int los = i == N - 2 && cfg->lower_order_final && N < 15;
  float *m = hist_push(c, K);
  convert_batch(s, c, s->sigmas[i], m, deis_convert);
  float *out = c->tmp[0];
  if (K == 1 || *lon < 1 || lof) {
    dpm_first(SCHED_ALGO_DPMSOLVER, s->sigmas[i + 1], s->sigmas[i], c->x, m, NULL, nd, out);
  } else {
    float alpha_t, sigma_t, a0, s0, a1, s1;
    alpha_sigma(s->sigmas[i + 1], &alpha_t, &sigma_t);
    alpha_sigma(s->sigmas[i], &a0, &s0);
    alpha_sigma(s->sigmas[i - 1], &a1, &s1);
    const float rt = sigma_t / alpha_t, r0 = s0 / a0, r1 = s1 / a1;
    const float *m0 = hist(c, K, 0), *m1 = hist(c, K, 1);
    if (K == 2 || *lon < 2 || los) {
      const float c1 = ind2(rt, r0, r1) - ind2(r0, r0, r1);
      const float c2 = ind2(rt, r1, r0) - ind2(r0, r1, r0);
      for (size_t k = 0; k < nd; k++)
        out[k] = alpha_t * (c->x[k] / a0 + c1 * m0[k] + c2 * m1[k]);
    } else {
      float a2, s2;
      alpha_sigma(s->sigmas[i - 2], &a2, &s2);
      const float r2 = s2 / a2;
      const float *m2 = hist(c, K, 2);
      const float c1 = ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2);
      const float c2 = ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0);
      const float c3 = ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1);
      for (size_t k = 0; k < nd; k++)
        out[k] = alpha_t * (c->x[k] / a0 + c1 * m0[k] + c2 * m1[k] + c3 * m2[k]);
    }
  }
  if (*lon < K)
    (*lon)++;
  memcpy(c->x, out, nd * sizeof *out);
  return ERR_OK;
}

const solver_desc solver_deis = {
    "deis", "DEISMultistepScheduler", 25, deis_prepare, deis_step, NULL, 3, 0, multistep_bind};
