/* Pseudo numerical methods: diffusers' PNDMScheduler (Runge-Kutta warm-up then PLMS, or Stable
 * Diffusion's skip_prk_steps PLMS) and the PNDM paper's own F-PNDM and S-PNDM as in the official
 * runner/method.py, which step on fractional midpoints with the transfer formula. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler_impl.h"

/* ---- PNDMScheduler ---- */

/* The ascending _timesteps of set_timesteps. */
static void pndm_base_timesteps(const sampler *s, int64_t *t) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n, T = s->T;
  switch (cfg->timestep_spacing) {
  case SCHED_SPACING_LINSPACE:
    for (int k = 0; k < n; k++)
      t[k] = (int64_t)nearbyint(np_linspace_at(0, T - 1, n, k));
    break;
  case SCHED_SPACING_LEADING:
    for (int k = 0; k < n; k++)
      t[k] = (int64_t)k * (T / n) + cfg->steps_offset;
    break;
  case SCHED_SPACING_TRAILING: {
    const double ratio = (double)T / n, delta = ((double)T + -ratio) - (double)T;
    for (int k = 0; k < n; k++)
      t[n - 1 - k] = (int64_t)nearbyint(k == 0 ? (double)T : (double)T + k * delta) - 1;
    break;
  }
  }
}

static int pndm_prepare(sampler *s, err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n, T = s->T;
  if (cfg->prediction_type == SCHED_PRED_SAMPLE)
    return err_set(e, ERR_UNSUPPORTED,
                   "scheduler config key 'prediction_type': PNDMScheduler takes epsilon or "
                   "v_prediction, not 'sample'");
  if (!cfg->skip_prk_steps && n < 4)
    return err_set(e, ERR_INVALID,
                   "PNDMScheduler's Runge-Kutta warm-up needs at least 4 steps (got %d); use "
                   "skip_prk_steps or more steps",
                   n);
  int64_t *base = malloc((size_t)n * sizeof *base);
  const int ne = cfg->skip_prk_steps ? (n >= 2 ? n + 1 : 1) : n + 9;
  int rc = base ? sampler_plan(s, ne, 0, e) : err_set(e, ERR_NOMEM, "out of memory");
  s->ts = malloc((size_t)ne * sizeof *s->ts);
  if (rc == ERR_OK && !s->ts)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc != ERR_OK) {
    free(base);
    return rc;
  }
  pndm_base_timesteps(s, base);
  int k = 0;
  if (cfg->skip_prk_steps) {
    /* concatenate(_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:])[::-1] */
    s->ts[k++] = base[n - 1];
    if (n >= 2)
      s->ts[k++] = base[n - 2];
    for (int j = n - 2; j >= 0; j--)
      s->ts[k++] = base[j];
  } else {
    const int64_t r2 = T / n / 2;
    int64_t rep[8], x[12];
    for (int j = 0; j < 4; j++) {
      rep[2 * j] = base[n - 4 + j];
      rep[2 * j + 1] = base[n - 4 + j] + r2;
    }
    /* prk_timesteps[:-1].repeat(2)[1:-1][::-1] */
    for (int j = 0; j < 12; j++)
      x[j] = rep[(j + 1) / 2];
    for (int j = 11; j >= 0; j--)
      s->ts[k++] = x[j];
    for (int j = n - 4; j >= 0; j--)
      s->ts[k++] = base[j];
  }
  free(base);
  s->ends_clean = cfg->set_alpha_to_one;
  for (int j = 0; j < ne; j++) {
    if (s->ts[j] < 0 || s->ts[j] >= T)
      return err_set(e, ERR_INVALID,
                     "scheduler config key 'steps_offset': timestep %lld of %d steps is outside "
                     "[0, %d)",
                     (long long)s->ts[j], n, T);
    s->tm[j] = (double)s->ts[j];
    if (cfg->skip_prk_steps)
      s->step_end[j] = j > 0 || ne == 1;
    else
      s->step_end[j] = j >= 12 || j % 4 == 3;
  }
  return ERR_OK;
}

/* _get_prev_sample: the PNDM transfer in float32, converting v-predictions with `sample`. */
static int pndm_prev(const sampler *s, step_ctx *c, const float *sample, int64_t t, int64_t pt,
                     const float *mo, float *out, err *e) {
  const sched_config *cfg = &s->cfg;
  const size_t nd = (size_t)c->batch * c->d;
  if (t < 0 || t >= s->T || pt >= s->T)
    return err_set(e, ERR_INVALID, "PNDM: timestep %lld outside the schedule", (long long)t);
  const float a_t = s->abar[t];
  const float a_prev = pt >= 0 ? s->abar[pt] : cfg->set_alpha_to_one ? 1.0f : s->abar[0];
  const float b_t = 1.0f - a_t, b_prev = 1.0f - a_prev;
  const float sc = sqrtf(a_prev / a_t);
  const float den = a_t * sqrtf(b_prev) + sqrtf(a_t * b_t * a_prev);
  const float da = a_prev - a_t, sa = sqrtf(a_t), sb = sqrtf(b_t);
  for (size_t k = 0; k < nd; k++) {
    const float m = cfg->prediction_type == SCHED_PRED_V ? sa * mo[k] + sb * sample[k] : mo[k];
    out[k] = sc * sample[k] - da * m / den;
  }
  return ERR_OK;
}

/* ets[-1 - back] */
static float *ets_at(step_ctx *c, int back) {
  return c->st.pndm.ets[c->st.pndm.n_ets - 1 - back];
}

static void ets_append(step_ctx *c, const float *m, size_t nd) {
  pndm_state *st = &c->st.pndm;
  if (st->n_ets == 4) { /* ets[-3:] then append: reuse the oldest buffer */
    float *old = st->ets[0];
    for (int k = 0; k < 3; k++)
      st->ets[k] = st->ets[k + 1];
    st->ets[3] = old;
    st->n_ets = 3;
  }
  memcpy(st->ets[st->n_ets], m, nd * sizeof *m);
  st->n_ets++;
}

static void pndm_bind(const sampler *s, step_ctx *c, float *const *bufs) {
  (void)s;
  pndm_state *st = &c->st.pndm;
  for (int k = 0; k < 4; k++)
    st->ets[k] = bufs[k];
  st->cur_model_output = bufs[4];
  st->cur_sample = bufs[5];
}

static int pndm_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  const size_t nd = (size_t)c->batch * c->d;
  /* j is diffusers' self.counter, which restarts with a later start (img2img) */
  const int j = c->i - c->i0, T = s->T, n = s->n;
  const int64_t tj = s->ts[c->i];
  float *cur = c->st.pndm.cur_model_output, *cur_sample = c->st.pndm.cur_sample;
  float *m = c->tmp[0], *out = c->tmp[1];
  const float *mo = c->mo;
  if (!cfg->skip_prk_steps && j < 12) {
    const int64_t diff = j % 2 ? 0 : T / n / 2;
    const int64_t pt = tj - diff, t = s->ts[c->i0 + j / 4 * 4];
    const int jm = j % 4;
    const float *use = mo;
    if (jm == 0) {
      for (size_t k = 0; k < nd; k++)
        cur[k] = (1.0f / 6.0f) * mo[k];
      ets_append(c, mo, nd);
      memcpy(cur_sample, c->x, nd * sizeof *cur_sample);
    } else if (jm == 1 || jm == 2) {
      for (size_t k = 0; k < nd; k++)
        cur[k] = cur[k] + (float)(1.0 / 3.0) * mo[k];
    } else {
      for (size_t k = 0; k < nd; k++)
        m[k] = cur[k] + (float)(1.0 / 6.0) * mo[k];
      use = m;
    }
    int rc = pndm_prev(s, c, cur_sample, t, pt, use, out, e);
    if (rc != ERR_OK)
      return rc;
    memcpy(c->x, out, nd * sizeof *out);
    return ERR_OK;
  }
  /* step_plms */
  const int64_t ratio = T / n;
  int64_t pt = tj - ratio, t = tj;
  if (j != 1) {
    ets_append(c, mo, nd);
  } else {
    pt = tj;
    t = tj + ratio;
  }
  const float *sample = c->x;
  const int len = c->st.pndm.n_ets;
  if (len == 1 && j == 0) {
    memcpy(m, mo, nd * sizeof *m);
    memcpy(cur_sample, c->x, nd * sizeof *cur_sample);
  } else if (len == 1 && j == 1) {
    const float *e1 = ets_at(c, 0);
    for (size_t k = 0; k < nd; k++)
      m[k] = (mo[k] + e1[k]) / 2.0f;
    sample = cur_sample;
  } else if (len == 2) {
    const float *a = ets_at(c, 0), *b = ets_at(c, 1);
    for (size_t k = 0; k < nd; k++)
      m[k] = (3.0f * a[k] - b[k]) / 2.0f;
  } else if (len == 3) {
    const float *a = ets_at(c, 0), *b = ets_at(c, 1), *d = ets_at(c, 2);
    for (size_t k = 0; k < nd; k++)
      m[k] = (23.0f * a[k] - 16.0f * b[k] + 5.0f * d[k]) / 12.0f;
  } else {
    const float *a = ets_at(c, 0), *b = ets_at(c, 1), *d = ets_at(c, 2), *f = ets_at(c, 3);
    const float w = (float)(1.0 / 24.0);
    for (size_t k = 0; k < nd; k++)
      m[k] = w * (55.0f * a[k] - 59.0f * b[k] + 37.0f * d[k] - 9.0f * f[k]);
  }
  int rc = pndm_prev(s, c, sample, t, pt, m, out, e);
  if (rc != ERR_OK)
    return rc;
  memcpy(c->x, out, nd * sizeof *out);
  return ERR_OK;
}

const solver_desc solver_pndm = {"pndm", "PNDMScheduler", 50, pndm_prepare, pndm_step, NULL, 6,
                                 0,      pndm_bind};

/* ---- the paper's F-PNDM / S-PNDM (official runner/method.py) ----
 * Deviations, on purpose: alpha_bar is read at the model's own timestep (the official code reads
 * alphas_cump[t + 1], one index late), the last step lands on set_alpha_to_one's value, fractional
 * midpoints use the engine's continuous schedule, and the step grid is diffusers' timestep_spacing
 * (leading: range(0, T, T // n) with exactly n steps). */

static double final_abar(const sampler *s) {
  return s->cfg.set_alpha_to_one ? 1.0 : s->abar[0];
}

static double abar_label(const sampler *s, double t) {
  return t < 0 ? final_abar(s) : sampler_abar_at(s, t);
}

static int pndm_official_prepare(sampler *s, err *e) {
  const sched_config *cfg = &s->cfg;
  const int n = s->n;
  if (cfg->method != SCHED_METHOD_F_PNDM && cfg->method != SCHED_METHOD_S_PNDM)
    return err_set(e, ERR_INVALID, "scheduler config key 'method': '%s' is not F-PNDM or S-PNDM",
                   sched_method_name(cfg->method));
  s->ts = malloc((size_t)n * sizeof *s->ts);
  if (!s->ts)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = sched_timesteps(cfg, n, s->ts, e);
  if (rc != ERR_OK)
    return rc;
  s->ends_clean = cfg->set_alpha_to_one;
  const int fpndm = cfg->method == SCHED_METHOD_F_PNDM;
  const int ne = fpndm ? (n < 3 ? 4 * n : 12 + n - 3) : n + 1;
  if ((rc = sampler_plan(s, ne, 0, e)) != ERR_OK)
    return rc;
  int j = 0;
  for (int k = 0; k < n; k++) {
    const double t = (double)s->ts[k], tn = k + 1 < n ? (double)s->ts[k + 1] : -1.0;
    const int warm = fpndm ? k < 3 : k == 0;
    if (warm && fpndm) {
      const double mid = (t + tn) / 2;
      s->tm[j++] = t;
      s->tm[j++] = mid;
      s->tm[j++] = mid;
      s->tm[j++] = tn;
    } else if (warm) {
      s->tm[j++] = t;
      s->tm[j++] = tn;
    } else {
      s->tm[j++] = t;
    }
    s->step_end[j - 1] = 1;
  }
  return ERR_OK;
}

/* The model output at label t as eps, per image. */
static void to_eps(const sampler *s, double t, const float *x, float *mo, size_t nd) {
  const double a = abar_label(s, t), sa = sqrt(a), sb = sqrt(1 - a);
  switch (s->cfg.prediction_type) {
  case SCHED_PRED_EPSILON: break;
  case SCHED_PRED_SAMPLE:
    for (size_t k = 0; k < nd; k++)
      mo[k] = (float)((x[k] - sa * mo[k]) / sb);
    break;
  case SCHED_PRED_V:
    for (size_t k = 0; k < nd; k++)
      mo[k] = (float)(sa * mo[k] + sb * x[k]);
    break;
  }
}

/* transfer(x, t, t_next, e): the DDIM map written to avoid cancellation when the alphas are
 * close: x + (a' - a) (x / (sqrt a (sqrt a + sqrt a')) - e / (sqrt a (sqrt((1-a')a) +
 * sqrt((1-a)a')))). */
static void transfer(const sampler *s, const float *x, double t, double tn, const float *ep,
                     size_t nd, float *out) {
  const double a = abar_label(s, t), an = abar_label(s, tn), sa = sqrt(a), san = sqrt(an);
  const double c1 = (an - a) / (sa * (sa + san));
  const double c2 = (an - a) / (sa * (sqrt((1 - an) * a) + sqrt((1 - a) * an)));
  for (size_t k = 0; k < nd; k++)
    out[k] = (float)(x[k] + (c1 * x[k] - c2 * ep[k]));
}

static int eps_at(run_ctx *r, int step, const sampler *s, const float *x, double t, float *out,
                  err *e) {
  const int B = sampler_run_batch(r);
  double tv[1024];
  const double *tp = tv;
  double *heap = NULL;
  if (B > 1024) {
    heap = malloc((size_t)B * sizeof *heap);
    if (!heap)
      return err_set(e, ERR_NOMEM, "out of memory");
    tp = heap;
  }
  for (int b = 0; b < B; b++)
    (heap ? heap : tv)[b] = t;
  int rc = sampler_eval_rows(r, step, x, B, NULL, tp, out, e);
  free(heap);
  if (rc == ERR_OK)
    to_eps(s, t, x, out, (size_t)B * sampler_run_d(r));
  return rc;
}

static int pndm_official_run(const sampler *s, run_ctx *r, float *x, err *e) {
  const size_t nd = (size_t)sampler_run_batch(r) * sampler_run_d(r);
  const int n = s->n, fpndm = s->cfg.method == SCHED_METHOD_F_PNDM;
  float *mem = malloc(8 * nd * sizeof *mem);
  if (!mem)
    return err_set(e, ERR_NOMEM, "out of memory");
  float *ets[4] = {mem, mem + nd, mem + 2 * nd, mem + 3 * nd};
  float *ep = mem + 4 * nd, *xt = mem + 5 * nd, *e2 = mem + 6 * nd, *e3 = mem + 7 * nd;
  int nets = 0, rc = ERR_OK;
  for (int k = 0; k < n && rc == ERR_OK; k++) {
    const double t = (double)s->ts[k], tn = k + 1 < n ? (double)s->ts[k + 1] : -1.0;
    /* the newest estimate goes to the oldest buffer */
    float *slot = ets[0];
    if (nets == 4) {
      memmove(ets, ets + 1, 3 * sizeof *ets);
      ets[3] = slot;
      nets = 3;
    }
    float *e1 = ets[nets];
    if ((rc = eps_at(r, k, s, x, t, e1, e)) != ERR_OK)
      break;
    nets++;
    const int warm = fpndm ? nets <= 3 : nets == 1;
    if (warm && fpndm) { /* runge_kutta */
      const double mid = (t + tn) / 2;
      transfer(s, x, t, mid, e1, nd, xt);
      if ((rc = eps_at(r, k, s, xt, mid, e2, e)) != ERR_OK)
        break;
      transfer(s, x, t, mid, e2, nd, xt);
      if ((rc = eps_at(r, k, s, xt, mid, e3, e)) != ERR_OK)
        break;
      transfer(s, x, t, tn, e3, nd, xt);
      if ((rc = eps_at(r, k, s, xt, tn, ep, e)) != ERR_OK)
        break;
      for (size_t i = 0; i < nd; i++)
        ep[i] = (float)((1.0 / 6) * ((double)e1[i] + 2.0 * e2[i] + 2.0 * e3[i] + ep[i]));
    } else if (warm) { /* improved_eular */
      transfer(s, x, t, tn, e1, nd, xt);
      if ((rc = eps_at(r, k, s, xt, tn, e2, e)) != ERR_OK)
        break;
      for (size_t i = 0; i < nd; i++)
        ep[i] = (float)(((double)e1[i] + e2[i]) / 2);
    } else if (fpndm) {
      const float *a = ets[nets - 1], *b = ets[nets - 2], *c = ets[nets - 3], *d = ets[nets - 4];
      for (size_t i = 0; i < nd; i++)
        ep[i] = (float)((1.0 / 24) * (55.0 * a[i] - 59.0 * b[i] + 37.0 * c[i] - 9.0 * d[i]));
    } else {
      const float *a = ets[nets - 1], *b = ets[nets - 2];
      for (size_t i = 0; i < nd; i++)
        ep[i] = (float)(0.5 * (3.0 * a[i] - b[i]));
    }
    transfer(s, x, t, tn, ep, nd, x);
    sampler_report(r, k + 1, n);
  }
  free(mem);
  return rc;
}

const solver_desc solver_pndm_official = {"pndm_official",
                                          "PNDM_Official",
                                          50,
                                          pndm_official_prepare,
                                          NULL,
                                          pndm_official_run,
                                          0,
                                          0,
                                          NULL};
