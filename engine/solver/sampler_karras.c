/* diffusers' k-diffusion style solvers on the VE sigma grid (Euler, Euler ancestral, Heun): the
 * sample lives in VE scaling (x_T = noise * init_noise_sigma), the model sees x / sqrt(sigma^2 + 1)
 * at fractional timesteps; float32 arithmetic in diffusers' order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler_impl.h"

/* Euler-family set_timesteps: float32 timesteps (fractional for linspace). */
static int euler_timesteps(const sampler *s, float *ts, err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n, T = s->T;
  switch (cfg->timestep_spacing) {
  case SCHED_SPACING_LINSPACE:
    for (int k = 0; k < n; k++)
      ts[k] = (float)np_linspace_at(0, T - 1, n, n - 1 - k);
    break;
  case SCHED_SPACING_LEADING: {
    const int ratio = T / n;
    for (int k = 0; k < n; k++)
      ts[k] = (float)((n - 1 - k) * ratio) + (float)cfg->steps_offset;
    break;
  }
  case SCHED_SPACING_TRAILING: {
    const double ratio = (double)T / n, delta = ((double)T + -ratio) - (double)T;
    for (int k = 0; k < n; k++)
      ts[k] = (float)nearbyint(k == 0 ? (double)T : (double)T + k * delta) - 1.0f;
    break;
  }
  }
  for (int k = 0; k < n; k++)
    if (ts[k] < 0 || ts[k] > T - 1)
      return err_set(e, ERR_INVALID,
                     "scheduler config key 'steps_offset': timestep %g of %d steps is outside "
                     "[0, %d]",
                     (double)ts[k], n, T - 1);
  return ERR_OK;
}

/* Timesteps and n + 1 float32 sigmas (last one `last`), Karras if asked. */
static int euler_grid(sampler *s, int karras, int use_cfg_range, double last, float *ts, double *sg,
                      err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n;
  int rc = euler_timesteps(s, ts, e);
  if (rc != ERR_OK)
    return rc;
  for (int k = 0; k < n; k++)
    sg[k] = sampler_sigma_interp(s, (double)ts[k]);
  if (karras) {
    double smin = sg[n - 1], smax = sg[0];
    if (use_cfg_range && !isnan(cfg->sigma_min))
      smin = cfg->sigma_min;
    if (use_cfg_range && !isnan(cfg->sigma_max))
      smax = cfg->sigma_max;
    sampler_karras(smin, smax, n, sg);
    for (int k = 0; k < n; k++)
      ts[k] = (float)sampler_sigma_to_t(s, sg[k]);
  }
  sg[n] = last;
  return ERR_OK;
}

/* init_noise_sigma: the largest sigma, as sqrt(sigma^2 + 1) for leading spacing. */
static float init_sigma(const sched_config *cfg, const float *sigmas, int n) {
  float mx = sigmas[0];
  for (int k = 1; k < n; k++)
    mx = sigmas[k] > mx ? sigmas[k] : mx;
  if (cfg->timestep_spacing == SCHED_SPACING_LEADING)
    return sqrtf(mx * mx + 1.0f);
  return mx;
}

static int fill_plan(sampler *s, const float *ts, const double *sg, err *e) {
  const int n = s->n;
  int rc = sampler_plan(s, n, 1, e);
  s->n_sigmas = n + 1;
  s->sigmas = malloc((size_t)(n + 1) * sizeof *s->sigmas);
  if (rc != ERR_OK || !s->sigmas)
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  for (int k = 0; k <= n; k++)
    s->sigmas[k] = (float)sg[k];
  for (int k = 0; k < n; k++) {
    s->tm[k] = (double)ts[k];
    s->in_div[k] = sqrtf(s->sigmas[k] * s->sigmas[k] + 1.0f);
    s->step_end[k] = 1;
  }
  s->init_sigma = init_sigma(&s->cfg, s->sigmas, n + 1);
  s->ends_clean = s->sigmas[n] == 0;
  return ERR_OK;
}

static int with_grid(sampler *s, int karras, int use_cfg_range, double last, err *e) {
  float *ts = malloc((size_t)s->n * sizeof *ts);
  double *sg = malloc((size_t)(s->n + 1) * sizeof *sg);
  int rc = ts && sg ? euler_grid(s, karras, use_cfg_range, last, ts, sg, e)
                    : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = fill_plan(s, ts, sg, e);
  free(ts);
  free(sg);
  return rc;
}

/* pred_original_sample of the Euler family for sigma `si`, whole batch. */
static void euler_x0(sched_prediction p, float si, const float *x, const float *mo, size_t nd,
                     float *x0) {
  switch (p) {
  case SCHED_PRED_EPSILON:
    for (size_t k = 0; k < nd; k++)
      x0[k] = x[k] - si * mo[k];
    break;
  case SCHED_PRED_V: {
    const float c1 = -si / sqrtf(si * si + 1.0f), c2 = si * si + 1.0f;
    for (size_t k = 0; k < nd; k++)
      x0[k] = mo[k] * c1 + x[k] / c2;
    break;
  }
  case SCHED_PRED_SAMPLE: memcpy(x0, mo, nd * sizeof *x0); break;
  }
}

/* ---- EulerDiscreteScheduler (s_churn 0: deterministic) ---- */

static int euler_prepare(sampler *s, err *e) {
  if (s->cfg.rescale_betas_zero_snr)
    s->abar[s->T - 1] = 0x1p-24f;
  const double last = s->cfg.final_sigmas_type == SCHED_FINAL_ZERO ? 0.0 : sampler_sigma_of(s, 0);
  return with_grid(s, s->cfg.use_karras_sigmas, 1, last, e);
}

static int euler_step(const sampler *s, step_ctx *c, err *e) {
  (void)e;
  const size_t nd = (size_t)c->batch * c->d;
  const float sigma = s->sigmas[c->i], sigma_hat = sigma * (0.0f + 1.0f);
  float *x0 = c->tmp[0];
  euler_x0(s->cfg.prediction_type, sigma_hat, c->x, c->mo, nd, x0); /* sigma_hat == sigma */
  const float dt = s->sigmas[c->i + 1] - sigma_hat;
  for (size_t k = 0; k < nd; k++) {
    const float der = (c->x[k] - x0[k]) / sigma_hat;
    c->x[k] = c->x[k] + der * dt;
  }
  return ERR_OK;
}

const solver_desc solver_euler = {
    "euler", "EulerDiscreteScheduler", 50, euler_prepare, euler_step, NULL, 0, 0, NULL};

/* ---- EulerAncestralDiscreteScheduler ---- */

static int euler_a_prepare(sampler *s, err *e) {
  if (s->cfg.prediction_type == SCHED_PRED_SAMPLE)
    return err_set(e, ERR_UNSUPPORTED,
                   "scheduler config key 'prediction_type': EulerAncestralDiscreteScheduler does "
                   "not implement 'sample'");
  if (s->cfg.rescale_betas_zero_snr)
    s->abar[s->T - 1] = 0x1p-24f;
  s->stochastic = 1;
  return with_grid(s, 0, 0, 0.0, e);
}

static int euler_a_step(const sampler *s, step_ctx *c, err *e) {
  const size_t nd = (size_t)c->batch * c->d;
  const float sigma = s->sigmas[c->i];
  float *x0 = c->tmp[0];
  euler_x0(s->cfg.prediction_type, sigma, c->x, c->mo, nd, x0);
  const float sf = s->sigmas[c->i], st = s->sigmas[c->i + 1];
  const float su = sqrtf(st * st * (sf * sf - st * st) / (sf * sf));
  const float sd = sqrtf(st * st - su * su);
  const float dt = sd - sigma;
  for (size_t k = 0; k < nd; k++) {
    const float der = (c->x[k] - x0[k]) / sigma;
    c->x[k] = c->x[k] + der * dt;
  }
  for (int b = 0; b < c->batch; b++) {
    float *z = c->noise + (size_t)b * c->d;
    int rc = sampler_noise(c, b, z, e);
    if (rc != ERR_OK)
      return rc;
    float *x = c->x + (size_t)b * c->d;
    for (size_t k = 0; k < c->d; k++)
      x[k] = x[k] + z[k] * su;
  }
  return ERR_OK;
}

const solver_desc solver_euler_a = {
    "euler_a", "EulerAncestralDiscreteScheduler", 50, euler_a_prepare, euler_a_step, NULL, 0, 1,
    NULL};

/* ---- HeunDiscreteScheduler ---- */

/* sigmas [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0] and timesteps [t0, t1, t1, ..., t_{n-1},
 * t_{n-1}]: 2n - 1 evaluations, the last an Euler step to 0. */
static int heun_prepare(sampler *s, err *e) {
  const int n = s->n, ne = 2 * n - 1;
  float *ts = malloc((size_t)n * sizeof *ts);
  double *sg = malloc((size_t)(n + 1) * sizeof *sg);
  int rc = ts && sg ? euler_grid(s, s->cfg.use_karras_sigmas, 0, 0.0, ts, sg, e)
                    : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = sampler_plan(s, ne, 1, e);
  s->n_sigmas = ne + 1;
  s->sigmas = malloc((size_t)(ne + 1) * sizeof *s->sigmas);
  if (rc == ERR_OK && !s->sigmas)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK) {
    s->sigmas[0] = (float)sg[0];
    s->tm[0] = ts[0];
    for (int k = 1; k < n; k++) {
      s->sigmas[2 * k - 1] = s->sigmas[2 * k] = (float)sg[k];
      s->tm[2 * k - 1] = s->tm[2 * k] = ts[k];
    }
    s->sigmas[ne] = 0.0f;
    for (int j = 0; j < ne; j++) {
      s->in_div[j] = sqrtf(s->sigmas[j] * s->sigmas[j] + 1.0f);
      s->step_end[j] = j % 2 == 1 || j == ne - 1;
    }
    s->init_sigma = init_sigma(&s->cfg, s->sigmas, ne + 1);
    s->ends_clean = 1;
  }
  free(ts);
  free(sg);
  return rc;
}

static void heun_bind(const sampler *s, step_ctx *c, float *const *bufs) {
  (void)s;
  c->st.heun.prev_derivative = bufs[0];
  c->st.heun.prev_sample = bufs[1];
}

static int heun_step(const sampler *s, step_ctx *c, err *e) {
  (void)e;
  const sched_config *cfg = &s->cfg;
  const size_t nd = (size_t)c->batch * c->d;
  heun_state *st = &c->st.heun;
  const int j = c->i, first = !st->second;
  const float sigma = first ? s->sigmas[j] : s->sigmas[j - 1];
  const float sigma_next = first ? s->sigmas[j + 1] : s->sigmas[j];
  const float sigma_hat = sigma * (0.0f + 1.0f);
  float *x0 = c->tmp[0], *prev_der = st->prev_derivative, *prev_x = st->prev_sample;
  euler_x0(cfg->prediction_type, first ? sigma_hat : sigma_next, c->x, c->mo, nd, x0);
  if (cfg->clip_sample) {
    const float r = (float)cfg->clip_sample_range;
    for (size_t k = 0; k < nd; k++)
      x0[k] = fminf(fmaxf(x0[k], -r), r);
  }
  if (first) {
    const float dt = sigma_next - sigma_hat;
    for (size_t k = 0; k < nd; k++) {
      const float der = (c->x[k] - x0[k]) / sigma_hat;
      prev_der[k] = der;
      prev_x[k] = c->x[k];
      c->x[k] = c->x[k] + der * dt;
    }
    st->second = 1;
  } else {
    const float dt = s->sigmas[j] - s->sigmas[j - 1] * (0.0f + 1.0f);
    for (size_t k = 0; k < nd; k++) {
      float der = (c->x[k] - x0[k]) / sigma_next;
      der = (prev_der[k] + der) / 2.0f;
      c->x[k] = prev_x[k] + der * dt;
    }
    st->second = 0;
  }
  return ERR_OK;
}

const solver_desc solver_heun = {
    "heun", "HeunDiscreteScheduler", 50, heun_prepare, heun_step, NULL, 2, 0, heun_bind};
