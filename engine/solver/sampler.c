/* The sampling loop, the solver names, the JSON request -> solver function, and DDPM / DDIM (the
 * other solvers: sampler_dpm.c, sampler_karras.c, sampler_pndm.c, sampler_paper.c). Steps run in
 * float32 in torch's order, so a run lands within rounding of diffusers' on the same noise. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "ops.h"
#include "rng.h"
#include "sampler_impl.h"

#define SAMPLER_CLF_MAX_BATCH 256

struct run_ctx {
  const sampler *s;
  const model *m;
  const sampler_run_opts *o;
  int h, w, batch;
  size_t d;
  size_t dout;     /* model output values per image (2 d for a learned variance) */
  float *tv;       /* batch timesteps */
  int64_t *labels; /* batch labels for row subsets */
  float *cond;     /* batch conditioning images for row subsets, or NULL */
  size_t dc;       /* conditioning values per image */
  float *states;   /* text_states repeated for every image of the batch, or NULL */
  float *full;     /* batch * dout scratch for sampler_eval_rows, custom loops only */
  int nfe;
};

/* ---- evaluation, progress, noise ---- */

/* A run stops the moment a value goes non-finite, naming what and where: the evaluation's
 * input (the starting noise, or the solver's state), its timesteps, the model's or the guided
 * output (guidance_eval). One pass over each per evaluation. */
static int check_input(const run_ctx *r, int step, const float *x, int n, double t, err *e) {
  const char *what = !ops_all_finite(r->tv, (size_t)n)     ? "timesteps"
                     : ops_all_finite(x, (size_t)n * r->d) ? NULL
                     : r->nfe == 0                         ? "starting noise"
                                                           : "sampler state";
  if (!what)
    return ERR_OK;
  return err_set(e, ERR_NUMERIC, "non-finite values in the %s at step %d of %d (t=%g)", what,
                 step + 1, r->s->n, t);
}

static int eval_common(run_ctx *r, int step, const float *x, int n, const int64_t *labels,
                       const float *cond, double t_for_msg, float *out, err *e) {
  const sampler_run_opts *o = r->o;
  const int total = r->s->n;
  if (o->cancel && atomic_load(o->cancel))
    return err_set(e, ERR_CANCELLED, "cancelled in step %d of %d", step + 1, total);
  int rc = check_input(r, step, x, n, t_for_msg, e);
  if (rc != ERR_OK)
    return rc;
  const int hooked = o->first_mid && r->nfe == 0;
  if (hooked && n != r->batch)
    return err_set(e, ERR_INVALID, "step %d: a mid-block replacement needs the whole batch",
                   step + 1);
  const model_call c = {.x = x,
                        .n = n,
                        .h = r->h,
                        .w = r->w,
                        .t = r->tv,
                        .labels = labels,
                        .encoder_hidden_states = r->states,
                        .seq_len = r->states ? o->text_seq : 0,
                        .hooks = {.mid_replace = hooked ? o->first_mid : NULL},
                        .threads = o->threads > 0 ? o->threads : 1,
                        .cond = cond};
  rc = guidance_eval(o->guidance, r->m, &c, out, e);
  if (rc == ERR_OK && o->classifier) {
    double abar[SAMPLER_CLF_MAX_BATCH];
    for (int b = 0; b < n; b++)
      abar[b] = sampler_abar_at(r->s, r->tv[b]);
    rc = classifier_guidance_apply(o->classifier, x, out, n, r->h, r->w, abar, c.threads, e);
  }
  if (rc == ERR_NUMERIC)
    return err_append(e, " at step %d of %d (t=%g)", step + 1, total, t_for_msg);
  if (rc != ERR_OK)
    return err_prefix(e, "step %d (t=%g)", step + 1, t_for_msg);
  r->nfe++;
  return ERR_OK;
}

int sampler_eval_all(run_ctx *r, int step, const float *x, double t, float *out, err *e) {
  for (int b = 0; b < r->batch; b++)
    r->tv[b] = (float)t;
  return eval_common(r, step, x, r->batch, r->o->labels, r->o->cond, t, out, e);
}

int sampler_eval_rows(run_ctx *r, int step, const float *x, int n, const int *rows, const double *t,
                      float *out, err *e) {
  for (int k = 0; k < n; k++) {
    r->tv[k] = (float)t[k];
    if (r->o->labels)
      r->labels[k] = r->o->labels[rows ? rows[k] : k];
    if (r->o->cond && rows) /* every row keeps its own image */
      memcpy(r->cond + k * r->dc, r->o->cond + (size_t)rows[k] * r->dc, r->dc * sizeof(float));
  }
  const float *cond = r->o->cond && rows ? r->cond : r->o->cond;
  float *dst = r->dout == r->d ? out : r->full;
  int rc = eval_common(r, step, x, n, r->o->labels ? r->labels : NULL, cond, t[0], dst, e);
  if (rc == ERR_OK && dst != out) /* keep the prediction, drop a learned variance */
    for (int k = 0; k < n; k++)
      memcpy(out + (size_t)k * r->d, dst + (size_t)k * r->dout, r->d * sizeof *out);
  return rc;
}

int sampler_run_batch(const run_ctx *r) {
  return r->batch;
}
size_t sampler_run_d(const run_ctx *r) {
  return r->d;
}
int sampler_run_nfe(const run_ctx *r) {
  return r->nfe;
}

void sampler_report(run_ctx *r, int step, int total) {
  if (r->o->progress)
    r->o->progress(step, total, r->nfe, r->o->progress_user);
}

int sampler_noise(const step_ctx *c, int b, float *out, err *e) {
  const sampler_run_opts *o = c->o;
  uint64_t image = o->first_image + (uint64_t)b, stream = (uint64_t)c->i + 1;
  if (o->noise)
    return o->noise(o->noise_user, image, stream, out, c->d, e);
  rng_normal(o->seed, image, stream, out, c->d);
  return ERR_OK;
}

/* ---- pieces shared by the solvers ---- */

static int cmp_float(const void *pa, const void *pb) {
  float a = *(const float *)pa, b = *(const float *)pb;
  return (a > b) - (a < b);
}

/* torch.quantile(|x0|, ratio) of one image with torch's float32 linear interpolation. */
static float abs_quantile(const sched_config *cfg, const float *x0, size_t d, float *sel) {
  for (size_t i = 0; i < d; i++)
    sel[i] = fabsf(x0[i]);
  const float rank = (float)cfg->dynamic_thresholding_ratio * (float)(d - 1);
  size_t below = (size_t)rank, above = (size_t)ceilf(rank);
  if (above > d - 1)
    above = d - 1;
  qsort(sel, d, sizeof *sel, cmp_float);
  const float lo = sel[below], hi = sel[above];
  const float w = rank - (float)below;
  return fabsf(w) < 0.5f ? lo + w * (hi - lo) : hi - (hi - lo) * (1.0f - w);
}

float sampler_threshold_scale(const sched_config *cfg, const float *x0, size_t d, float *sel) {
  const float s = fmaxf(abs_quantile(cfg, x0, d, sel), 1.0f);
  return fminf(s, (float)cfg->sample_max_value);
}

void sampler_threshold_diffusers(const sched_config *cfg, float *x0, size_t d, float *sel) {
  const float s = sampler_threshold_scale(cfg, x0, d, sel);
  for (size_t i = 0; i < d; i++)
    x0[i] = fminf(fmaxf(x0[i], -s), s) / s;
}

void sampler_threshold_paper(const sched_config *cfg, float *x0, size_t d, float *sel) {
  float s = abs_quantile(cfg, x0, d, sel);
  s = fmaxf(s, (float)cfg->thresholding_max_val);
  for (size_t i = 0; i < d; i++)
    x0[i] = fminf(fmaxf(x0[i], -s), s) / s;
}

static void clip_or_threshold(const sched_config *cfg, float *x0, size_t d, float *sel) {
  if (cfg->thresholding) {
    sampler_threshold_diffusers(cfg, x0, d, sel);
  } else if (cfg->clip_sample) {
    const float r = (float)cfg->clip_sample_range;
    for (size_t i = 0; i < d; i++)
      x0[i] = fminf(fmaxf(x0[i], -r), r);
  }
}

float sampler_sigma_of(const sampler *s, int t) {
  const float a = s->abar[t];
  return sqrtf((1.0f - a) / a);
}

static double log_sigma_ve(double abar) {
  return 0.5 * (log1p(-abar) - log(abar));
}

double sampler_abar_at(const sampler *s, double t) {
  const int last = s->T - 1;
  if (!(t > 0)) /* NaN too: never cast to int below */
    return s->abar[0];
  if (t >= last)
    return s->abar[last];
  const int lo = (int)floor(t);
  const double w = t - lo;
  if (w == 0)
    return s->abar[lo];
  const double ls = (1 - w) * log_sigma_ve(s->abar[lo]) + w * log_sigma_ve(s->abar[lo + 1]);
  if (isinf(ls))
    return 0.0;
  return 1 / (1 + exp(2 * ls));
}

int sampler_plan(sampler *s, int n_evals, int with_in_div, err *e) {
  s->n_evals = n_evals;
  s->tm = calloc((size_t)(n_evals > 0 ? n_evals : 1), sizeof *s->tm);
  s->step_end = calloc((size_t)(n_evals > 0 ? n_evals : 1), 1);
  s->in_div = with_in_div ? calloc((size_t)(n_evals > 0 ? n_evals : 1), sizeof *s->in_div) : NULL;
  if (!s->tm || !s->step_end || (with_in_div && !s->in_div))
    return err_set(e, ERR_NOMEM, "out of memory");
  return ERR_OK;
}

/* pred_original_sample from the model output, as DDPM and DDIM compute it. */
static void predict_x0(sched_prediction p, float a_t, const float *x, const float *mo, size_t d,
                       float *x0) {
  const float sa = sqrtf(a_t), sb = sqrtf(1.0f - a_t);
  switch (p) {
  case SCHED_PRED_EPSILON:
    for (size_t i = 0; i < d; i++)
      x0[i] = (x[i] - sb * mo[i]) / sa;
    break;
  case SCHED_PRED_SAMPLE: memcpy(x0, mo, d * sizeof *x0); break;
  case SCHED_PRED_V:
    for (size_t i = 0; i < d; i++)
      x0[i] = sa * x[i] - sb * mo[i];
    break;
  }
}

/* ---- DDPM (DDPMScheduler.step) ---- */

/* Current diffusers: the chain goes to the next timestep of the schedule. (0.21 used
 * t - T / n, which only differs for trailing/linspace spacing; its last step was -1 too.) */
static int ddpm_prepare(sampler *s, err *e) {
  int rc = sampler_plan(s, s->n, 0, e);
  s->ts = malloc((size_t)s->n * sizeof *s->ts);
  s->prev = malloc((size_t)s->n * sizeof *s->prev);
  if (rc != ERR_OK || !s->ts || !s->prev)
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  if ((rc = sched_timesteps(&s->cfg, s->n, s->ts, e)) != ERR_OK)
    return rc;
  for (int i = 0; i < s->n; i++) {
    s->tm[i] = (double)s->ts[i];
    s->prev[i] = i + 1 < s->n ? s->ts[i + 1] : -1;
    s->step_end[i] = 1;
  }
  s->stochastic = 1;
  s->ends_clean = 1;
  return ERR_OK;
}

static int ddpm_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  const int64_t t = s->ts[c->i], pt = s->prev[c->i];
  const float a_t = s->abar[t], a_prev = pt >= 0 ? s->abar[pt] : 1.0f;
  const float beta_t = 1.0f - a_t, beta_prev = 1.0f - a_prev;
  const float cur_alpha = a_t / a_prev, cur_beta = 1.0f - cur_alpha;
  const float c_x0 = sqrtf(a_prev) * cur_beta / beta_t;
  const float c_x = sqrtf(cur_alpha) * beta_prev / beta_t;
  /* _get_variance: the posterior variance, floored as diffusers does */
  float var = (1.0f - a_prev) / (1.0f - a_t) * cur_beta;
  var = fmaxf(var, 1e-20f);
  float std = 0;
  switch (cfg->variance_type) {
  case SCHED_VAR_FIXED_SMALL: std = sqrtf(var); break;
  case SCHED_VAR_FIXED_SMALL_LOG: std = expf(0.5f * logf(var)); break;
  case SCHED_VAR_FIXED_LARGE: std = sqrtf(cur_beta); break;
  case SCHED_VAR_FIXED_LARGE_LOG:
    /* diffusers takes sqrt(log(beta)) here and gets NaN; the intent (and the original DDPM
     * code) is a log-variance of log(beta), i.e. the fixed_large std */
    std = expf(0.5f * logf(cur_beta));
    break;
  default: /* learned, learned_range: per element below */ break;
  }
  const float min_log = logf(var), max_log = logf(cur_beta);
  for (int b = 0; b < c->batch; b++) {
    float *x = c->x + (size_t)b * c->d;
    const float *mo = c->mo + (size_t)b * c->mo_stride;
    const float *pv = mo + c->d; /* only read for learned variances (mo_stride == 2 d) */
    predict_x0(cfg->prediction_type, a_t, x, mo, c->d, c->x0);
    clip_or_threshold(cfg, c->x0, c->d, c->sel);
    for (size_t i = 0; i < c->d; i++)
      x[i] = c_x0 * c->x0[i] + c_x * x[i];
    if (t <= 0)
      continue;
    int rc = sampler_noise(c, b, c->noise, e);
    if (rc != ERR_OK)
      return rc;
    if (cfg->variance_type == SCHED_VAR_LEARNED) {
      for (size_t i = 0; i < c->d; i++)
        x[i] = x[i] + sqrtf(pv[i]) * c->noise[i];
    } else if (cfg->variance_type == SCHED_VAR_LEARNED_RANGE) {
      for (size_t i = 0; i < c->d; i++) {
        float frac = (pv[i] + 1.0f) / 2.0f;
        float lv = frac * max_log + (1.0f - frac) * min_log;
        x[i] = x[i] + expf(0.5f * lv) * c->noise[i];
      }
    } else {
      for (size_t i = 0; i < c->d; i++)
        x[i] = x[i] + std * c->noise[i];
    }
  }
  return ERR_OK;
}

/* ---- DDIM (DDIMScheduler.step, use_clipped_model_output false) ---- */

/* diffusers' DDIM goes to t - T / n whatever the spacing, even where that is not the next
 * timestep of the schedule (trailing with T % n != 0); kept for parity. */
static int ddim_prepare(sampler *s, err *e) {
  int rc = sampler_plan(s, s->n, 0, e);
  s->ts = malloc((size_t)s->n * sizeof *s->ts);
  s->prev = malloc((size_t)s->n * sizeof *s->prev);
  if (rc != ERR_OK || !s->ts || !s->prev)
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  if ((rc = sched_timesteps(&s->cfg, s->n, s->ts, e)) != ERR_OK)
    return rc;
  const int64_t ratio = s->T / s->n;
  for (int i = 0; i < s->n; i++) {
    s->tm[i] = (double)s->ts[i];
    s->prev[i] = s->ts[i] - ratio;
    s->step_end[i] = 1;
  }
  s->stochastic = s->cfg.eta > 0;
  s->ends_clean = s->cfg.set_alpha_to_one;
  return ERR_OK;
}

/* The deterministic part of DDIM step k for one image (into mean, which may alias x) and the
 * std of the noise it adds. x0 and pe are d scratch each, sel the thresholding scratch. */
static void ddim_mean(const sampler *s, int k, const float *x, const float *mo, size_t d,
                      float *mean, float *std_out, float *x0, float *pe, float *sel) {
  const sched_config *cfg = &s->cfg;
  const int64_t t = s->ts[k], pt = s->prev[k];
  const float final_abar = cfg->set_alpha_to_one ? 1.0f : s->abar[0];
  const float a_t = s->abar[t], a_prev = pt >= 0 ? s->abar[pt] : final_abar;
  const float beta_t = 1.0f - a_t;
  const float sa = sqrtf(a_t), sb = sqrtf(beta_t);
  const float var = (1.0f - a_prev) / beta_t * (1.0f - a_t / a_prev);
  const float std = (float)cfg->eta * sqrtf(var);
  /* 1 - a_prev - std^2 = (1 - a_prev) a_t (1 / a_prev - 1) / (1 - a_t) >= 0 for eta <= 1, but
   * float rounding can take it just below zero (eta 1 from a_t near 0: one trailing step);
   * there diffusers' (.) ** 0.5 gives NaN, zero is the value */
  const float dir2 = 1.0f - a_prev - std * std;
  const float c_dir = sqrtf(dir2 > 0.0f ? dir2 : 0.0f);
  const float c_x0 = sqrtf(a_prev);
  predict_x0(cfg->prediction_type, a_t, x, mo, d, x0);
  /* pred_epsilon is taken before clipping, from the raw output */
  for (size_t i = 0; i < d; i++) {
    if (cfg->prediction_type == SCHED_PRED_EPSILON)
      pe[i] = mo[i];
    else if (cfg->prediction_type == SCHED_PRED_SAMPLE)
      pe[i] = (x[i] - sa * x0[i]) / sb;
    else
      pe[i] = sa * mo[i] + sb * x[i];
  }
  clip_or_threshold(cfg, x0, d, sel);
  for (size_t i = 0; i < d; i++)
    mean[i] = c_x0 * x0[i] + c_dir * pe[i];
  *std_out = std;
}

static int ddim_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  for (int b = 0; b < c->batch; b++) {
    float *x = c->x + (size_t)b * c->d;
    const float *mo = c->mo + (size_t)b * c->mo_stride;
    float *pe = c->noise + (size_t)b * c->d, std;
    ddim_mean(s, c->i, x, mo, c->d, x, &std, c->x0, pe, c->sel);
    if (cfg->eta > 0) {
      int rc = sampler_noise(c, b, pe, e);
      if (rc != ERR_OK)
        return rc;
      for (size_t i = 0; i < c->d; i++)
        x[i] = x[i] + std * pe[i];
    }
  }
  return ERR_OK;
}

static const solver_desc solver_ddpm = {
    "ddpm", "DDPMScheduler", 1000, ddpm_prepare, ddpm_step, NULL, 0, 1, NULL};
static const solver_desc solver_ddim = {
    "ddim", "DDIMScheduler", 50, ddim_prepare, ddim_step, NULL, 0, 0, NULL};

/* ---- names ---- */

/* What users type. `fixed` holds the option values the name stands for (an explicit option
 * that contradicts them is an error); `defaults` sits below the model's config. */
typedef struct solver_name {
  const char *name;
  const solver_desc *desc;
  const char *fixed, *defaults;
  const char *summary;
} solver_name;

static const solver_name names[] = {
    {"ddpm", &solver_ddpm, NULL, NULL, "DDPM ancestral sampling (stochastic)"},
    {"ddim", &solver_ddim, NULL, NULL, "DDIM; eta > 0 makes it stochastic"},
    {"pndm", &solver_pndm, NULL, NULL,
     "PNDMScheduler: Runge-Kutta warm-up then linear multistep (skip_prk_steps for PLMS)"},
    {"plms", &solver_pndm, "{\"skip_prk_steps\": true}", NULL,
     "PNDMScheduler with skip_prk_steps (Stable Diffusion's PLMS)"},
    {"dpm-solver", &solver_dpm_multistep,
     "{\"algorithm_type\": \"dpmsolver\", \"final_sigmas_type\": \"sigma_min\"}", NULL,
     "DPMSolverMultistepScheduler with the noise-prediction DPM-Solver"},
    {"dpm-solver++", &solver_dpm_multistep, "{\"algorithm_type\": \"dpmsolver++\"}", NULL,
     "DPMSolverMultistepScheduler, DPM-Solver++ (solver_order 2 by default)"},
    {"dpm++2m", &solver_dpm_multistep, "{\"algorithm_type\": \"dpmsolver++\", \"solver_order\": 2}",
     NULL, "DPM-Solver++(2M)"},
    {"dpm++3m", &solver_dpm_multistep, "{\"algorithm_type\": \"dpmsolver++\", \"solver_order\": 3}",
     NULL, "DPM-Solver++(3M)"},
    {"dpm++2m-karras", &solver_dpm_multistep,
     "{\"algorithm_type\": \"dpmsolver++\", \"solver_order\": 2, \"use_karras_sigmas\": true}",
     NULL, "DPM-Solver++(2M) on Karras sigmas"},
    {"dpm++2m-sde", &solver_dpm_multistep,
     "{\"algorithm_type\": \"sde-dpmsolver++\", \"solver_order\": 2}", NULL,
     "SDE-DPM-Solver++(2M) (stochastic)"},
    {"dpm++2m-sde-karras", &solver_dpm_multistep,
     "{\"algorithm_type\": \"sde-dpmsolver++\", \"solver_order\": 2, \"use_karras_sigmas\": true}",
     NULL, "SDE-DPM-Solver++(2M) on Karras sigmas (stochastic)"},
    {"dpm++2s", &solver_dpm_singlestep,
     "{\"algorithm_type\": \"dpmsolver++\", \"solver_order\": 2}", NULL,
     "DPMSolverSinglestepScheduler, DPM-Solver++(2S)"},
    {"dpm++2s-sde", &solver_dpm_singlestep,
     "{\"algorithm_type\": \"sde-dpmsolver++\", \"solver_order\": 2}", NULL,
     "DPMSolverSinglestepScheduler with sde-dpmsolver++ (stochastic)"},
    {"unipc", &solver_unipc, NULL, NULL, "UniPC (bh2 predictor-corrector)"},
    {"deis", &solver_deis, NULL, NULL, "DEIS (log-rho multistep)"},
    {"euler", &solver_euler, NULL, NULL, "Euler on the sigma grid (k-diffusion style)"},
    {"euler-a", &solver_euler_a, NULL, NULL, "Euler ancestral (stochastic)"},
    {"heun", &solver_heun, NULL, NULL, "Heun's second-order method (2 NFE per step)"},
    {"f-pndm", &solver_pndm_official, "{\"method\": \"F-PNDM\"}", NULL,
     "the PNDM paper's F-PNDM: pseudo-RK4 warm-up, then 4th-order pseudo linear multistep"},
    {"s-pndm", &solver_pndm_official, "{\"method\": \"S-PNDM\"}", NULL,
     "the PNDM paper's S-PNDM: pseudo improved Euler warm-up, then 2nd-order multistep"},
    {"dpm-solver-fast", &solver_dpm_official, "{\"method\": \"singlestep\"}",
     "{\"solver_order\": 3, \"algorithm_type\": \"dpmsolver\", \"skip_type\": \"logSNR\"}",
     "DPM-Solver-fast (official code): singlestep orders 3,..,3,2,1 spending exactly the NFE"},
    {"dpm-solver-adaptive", &solver_dpm_official, "{\"method\": \"adaptive\"}",
     "{\"solver_order\": 3, \"algorithm_type\": \"dpmsolver\"}",
     "DPM-Solver-12/23 (official code): adaptive step size under rtol/atol; steps is ignored"},
    {"dpm-solver-v3", &solver_dpm_v3, NULL, "{\"skip_type\": \"logSNR\"}",
     "DPM-Solver-v3 (authors' code): multistep predictor-corrector on the model's statistics "
     "(spec \"data\": a statistics file; flat statistics without one)"},
    {"usf", &solver_usf, NULL, NULL,
     "USF (S^3 paper's unified sampling framework): runs a per-step solver schedule (spec "
     "\"data\": the schedule file)"},
    {"dpm-ot", &solver_dpm_ot, NULL, NULL,
     "DPM-OT (authors' transport map): maps U[0,1]^d to data latents at a step, then runs the "
     "map's solver for the remaining steps (spec \"data\": the map, 'denoised ot fit')"},
};
#define NNAMES ((int)(sizeof names / sizeof names[0]))

static const solver_desc *const impls[] = {
    &solver_ddpm,           &solver_ddim,  &solver_pndm,          &solver_dpm_multistep,
    &solver_dpm_singlestep, &solver_unipc, &solver_deis,          &solver_euler,
    &solver_euler_a,        &solver_heun,  &solver_pndm_official, &solver_dpm_official,
    &solver_dpm_v3,         &solver_usf,   &solver_dpm_ot,
};
#define NIMPLS ((int)(sizeof impls / sizeof impls[0]))

/* A name or a class name; *alias is the names[] entry or NULL for a class name. */
static const solver_desc *resolve(const char *name, const solver_name **alias) {
  *alias = NULL;
  if (!name)
    return NULL;
  for (int i = 0; i < NNAMES; i++)
    if (strcmp(names[i].name, name) == 0) {
      *alias = &names[i];
      return names[i].desc;
    }
  for (int i = 0; i < NIMPLS; i++)
    if (strcmp(impls[i]->class_name, name) == 0)
      return impls[i];
  return NULL;
}

int sampler_solver_count(void) {
  return NNAMES;
}
const char *sampler_solver_name(int i) {
  return i >= 0 && i < NNAMES ? names[i].name : NULL;
}
const char *sampler_solver_summary(int i) {
  return i >= 0 && i < NNAMES ? names[i].summary : NULL;
}
const char *sampler_solver_class(const char *name) {
  const solver_name *a;
  const solver_desc *d = resolve(name, &a);
  return d ? d->class_name : NULL;
}
int sampler_solver_default_steps(const char *name) {
  const solver_name *a;
  const solver_desc *d = resolve(name, &a);
  return d ? d->default_steps : 0;
}

static int unknown_name(const char *name, err *e) {
  char list[400] = "";
  for (int i = 0; i < NNAMES; i++) {
    size_t len = strlen(list);
    snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", names[i].name);
  }
  return err_set(e, ERR_UNSUPPORTED,
                 "unknown scheduler '%s' (one of: %s; or a diffusers class name such as "
                 "DPMSolverMultistepScheduler)",
                 name ? name : "", list);
}

/* ---- construction ---- */

void sampler_free(sampler *s) {
  if (!s)
    return;
  sched_config_free(&s->cfg);
  free(s->abar);
  free(s->tm);
  free(s->in_div);
  free(s->step_end);
  free(s->ts);
  free(s->prev);
  free(s->sigmas);
  free(s->orders);
  free(s->lambdas);
  sampler_v3_free(s->v3);
  sampler_usf_free(s->usf);
  free(s->data);
  json_decref(s->data_for);
  sampler_ot_free(s->ot);
  json_decref(s->ot_header);
  free(s);
}

static int apply_text(sched_config *cfg, const char *json_text, err *e) {
  if (!json_text)
    return ERR_OK;
  json_t *o = json_loads(json_text, 0, NULL);
  if (!o)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = sched_config_apply_json(cfg, o, 1, e);
  json_decref(o);
  return rc;
}

/* data: the solver's data file (DPM-Solver-v3 statistics), or NULL */
static int build(const solver_desc *d, const char *name, const sched_config *cfg, int steps,
                 const char *data, sampler **out, err *e) {
  sampler *s = calloc(1, sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->desc = d;
  snprintf(s->name, sizeof s->name, "%s", name);
  int rc = sched_config_copy(&s->cfg, cfg, e);
  if (rc != ERR_OK) {
    free(s);
    return rc;
  }
  /* the class decides which keys exist; a config built for another class keeps its name */
  snprintf(s->cfg.scheduler, sizeof s->cfg.scheduler, "%s", d->class_name);
  const int T = cfg->num_train_timesteps;
  s->T = T;
  s->init_sigma = 1.0f;
  /* default_steps 0: the solver data decides (USF's schedule), prepare() sets s->n */
  if (steps == 0 && d->default_steps > 0)
    steps = d->default_steps < T ? d->default_steps : T;
  s->n = steps;
  /* DPM_Solver's steps are an NFE budget on a continuous schedule, not training timesteps */
  const int max_steps = d == &solver_dpm_official ? 100000 : T;
  if ((steps < 1 && d->default_steps > 0) || steps < 0 || steps > max_steps) {
    rc = err_set(e, ERR_INVALID, "num_inference_steps %d must be in [1, %d]", steps, max_steps);
    goto fail;
  }
  s->abar = malloc((size_t)T * sizeof *s->abar);
  if (!s->abar) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto fail;
  }
  if (data && d != &solver_dpm_v3 && d != &solver_usf) {
    rc = err_set(e, ERR_INVALID, "solver spec key 'data': %s takes no solver data", name);
    goto fail;
  }
  if ((rc = sched_config_validate(&s->cfg, e)) != ERR_OK ||
      (rc = sched_alphas_cumprod(&s->cfg, s->abar, e)) != ERR_OK ||
      (data && !(s->data = mem_strdup(data)) && (rc = err_set(e, ERR_NOMEM, "out of memory"))) ||
      (data && d == &solver_dpm_v3 && (rc = sampler_v3_attach(s, data, e)) != ERR_OK) ||
      (data && d == &solver_usf && (rc = sampler_usf_attach(s, data, e)) != ERR_OK) ||
      (rc = d->prepare(s, e)) != ERR_OK)
    goto fail;
  s->stochastic |= d->stochastic_always;
  *out = s;
  return ERR_OK;
fail:
  sampler_free(s);
  return rc;
}

int sampler_new(const char *name, const sched_config *cfg, int num_inference_steps, sampler **out,
                err *e) {
  const solver_name *alias;
  const solver_desc *d = resolve(name, &alias);
  if (!d)
    return unknown_name(name, e);
  sched_config c;
  int rc = sched_config_copy(&c, cfg, e);
  if (rc != ERR_OK)
    return rc;
  if (alias && (rc = apply_text(&c, alias->fixed, e)) != ERR_OK) {
    sched_config_free(&c);
    return rc;
  }
  rc = build(d, name, &c, num_inference_steps, NULL, out, e);
  sched_config_free(&c);
  return rc;
}

/* The keys of obj that class `cls` has (diffusers' from_config drops the rest); legacy
 * predict_epsilon goes with prediction_type. Keys no scheduler has are an error if `strict`. */
static json_t *class_subset(const json_t *obj, const char *cls, int strict, const char *what,
                            err *e) {
  json_t *o = json_object();
  if (!o) {
    err_set(e, ERR_NOMEM, "out of memory");
    return NULL;
  }
  if (!obj)
    return o;
  if (!json_is_object(obj)) {
    json_decref(o);
    err_set(e, ERR_INVALID, "%s: expected a JSON object", what);
    return NULL;
  }
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    if (key[0] == '_')
      continue;
    if (sched_class_has_key(cls, key) ||
        (strcmp(key, "predict_epsilon") == 0 && sched_class_has_key(cls, "prediction_type"))) {
      json_object_set(o, key, v);
      continue;
    }
    if (strict && !sched_key_is_known(key)) {
      json_decref(o);
      err_set(e, ERR_INVALID, "%s: unknown scheduler config key '%s'", what, key);
      return NULL;
    }
  }
  return o;
}

static int apply_layer(sched_config *cfg, const json_t *layer, const char *what, err *e) {
  if (!layer || json_object_size(layer) == 0)
    return ERR_OK;
  int rc = sched_config_apply_json(cfg, layer, 1, e);
  if (rc != ERR_OK)
    err_prefix(e, "%s", what);
  return rc;
}

/* DPM-OT: the map names its solver and steps; a spec may repeat the steps, nothing else. */
static int ot_from_json(const json_t *spec, const char *data, const json_t *model_config,
                        sampler **out, err *e) {
  if (!data)
    return err_set(e, ERR_INVALID,
                   "dpm-ot samples through a transport map: give it as 'data' "
                   "('denoised ot fit' makes one)");
  const json_t *opts = json_object_get(spec, "options");
  if (json_object_size(opts) > 0)
    return err_set(e, ERR_INVALID, "dpm-ot takes no scheduler options (its map fixes the solver)");
  int rc = sampler_ot_new(data, model_config, out, e);
  const json_t *js = json_object_get(spec, "steps");
  if (rc == ERR_OK && json_is_integer(js) && json_integer_value(js) != (*out)->n) {
    rc = err_set(e, ERR_INVALID,
                 "solver spec key 'steps': the transport map %s is for %d steps, not %lld", data,
                 (*out)->n, (long long)json_integer_value(js));
    sampler_free(*out);
    *out = NULL;
  }
  return rc;
}

/* The official DPM-Solver code applies the paper's dynamic thresholding to the data prediction,
 * i.e. to DPM-Solver++ only. A model whose own scheduler config turns thresholding on (the
 * default glyph model's DDPMScheduler does) gets dpm-solver-fast and dpm-solver-adaptive as
 * DPM-Solver++ rather than a refusal, unless the request chose the algorithm itself. */
static int prefer_data_prediction(const solver_desc *d, sched_config *cfg, const json_t *lc,
                                  const json_t *opts, err *e) {
  if (d != &solver_dpm_official || !cfg->thresholding ||
      cfg->algorithm_type != SCHED_ALGO_DPMSOLVER || json_object_get(lc, "algorithm_type") ||
      json_object_get(opts, "algorithm_type"))
    return ERR_OK;
  return apply_text(cfg, "{\"algorithm_type\": \"dpmsolver++\"}", e);
}

int sampler_new_from_json(const json_t *spec, const json_t *model_config, sampler **out, err *e) {
  if (!json_is_object(spec))
    return err_set(e, ERR_INVALID, "solver spec: expected a JSON object");
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)spec, key, v) {
    if (strcmp(key, "name") && strcmp(key, "steps") && strcmp(key, "config") &&
        strcmp(key, "options") && strcmp(key, "data"))
      return err_set(e, ERR_INVALID,
                     "solver spec: unknown key '%s' (expected name, steps, config, options, data)",
                     key);
  }
  const json_t *jd = json_object_get(spec, "data");
  if (jd && !json_is_null(jd) && !json_is_string(jd))
    return err_set(e, ERR_INVALID, "solver spec key 'data': expected a file path");
  const char *data = jd && json_is_string(jd) ? json_string_value(jd) : NULL;
  const json_t *jn = json_object_get(spec, "name");
  const char *name = NULL;
  if (jn && !json_is_null(jn)) {
    if (!json_is_string(jn))
      return err_set(e, ERR_INVALID, "solver spec key 'name': expected a string");
    name = json_string_value(jn);
  } else if (model_config && json_is_string(json_object_get(model_config, "_class_name"))) {
    name = json_string_value(json_object_get(model_config, "_class_name"));
  } else {
    return err_set(e, ERR_INVALID, "solver spec: no 'name' and no model scheduler class");
  }
  if (strcmp(name, "dpm-ot") == 0)
    return ot_from_json(spec, data, model_config, out, e);
  const solver_name *alias;
  const solver_desc *d = resolve(name, &alias);
  if (!d)
    return unknown_name(name, e);
  const char *cls = d->class_name;
  int steps = 0;
  const json_t *js = json_object_get(spec, "steps");
  if (js && !json_is_null(js)) {
    if (!json_is_integer(js) || json_integer_value(js) < 1 || json_integer_value(js) > 1000000)
      return err_set(e, ERR_INVALID, "solver spec key 'steps': expected a positive integer");
    steps = (int)json_integer_value(js);
  }
  const json_t *opts = json_object_get(spec, "options");
  if (opts && !json_is_null(opts) && !json_is_object(opts))
    return err_set(e, ERR_INVALID, "solver spec key 'options': expected a JSON object");
  /* explicit options: every key must be one this solver reads, and agree with the name */
  json_t *fixed = alias && alias->fixed ? json_loads(alias->fixed, 0, NULL) : NULL;
  json_object_foreach((json_t *)opts, key, v) {
    if (key[0] == '_')
      continue;
    if (!sched_class_has_key(cls, key)) {
      json_decref(fixed);
      if (!sched_key_is_known(key))
        return err_set(e, ERR_INVALID, "unknown scheduler config key '%s'", key);
      return err_set(e, ERR_INVALID,
                     "scheduler option '%s' does not apply to %s (%s has no such key)", key, name,
                     cls);
    }
    const json_t *fv = fixed ? json_object_get(fixed, key) : NULL;
    if (fv) {
      sched_config a, b;
      sched_config_init(&a, cls, NULL);
      sched_config_init(&b, cls, NULL);
      json_t *oa = json_pack("{s:O}", key, fv), *ob = json_pack("{s:O}", key, v);
      int ra = sched_config_apply_json(&a, oa, 1, NULL), rb = sched_config_apply_json(&b, ob, 1, e);
      json_t *ja = sched_config_to_json(&a), *jb = sched_config_to_json(&b);
      int same = ra == ERR_OK && rb == ERR_OK && json_equal(ja, jb);
      json_decref(oa);
      json_decref(ob);
      json_decref(ja);
      json_decref(jb);
      sched_config_free(&a);
      sched_config_free(&b);
      if (rb != ERR_OK) {
        json_decref(fixed);
        return rb;
      }
      if (!same) {
        char *want = json_dumps(fv, JSON_ENCODE_ANY);
        int rc = err_set(e, ERR_INVALID,
                         "scheduler option '%s' contradicts '%s', which means %s = %s; use the "
                         "class %s to choose it freely",
                         key, name, key, want ? want : "?", cls);
        free(want);
        json_decref(fixed);
        return rc;
      }
    }
  }
  json_decref(fixed);
  const json_t *conf = json_object_get(spec, "config");
  if (conf && json_is_null(conf))
    conf = NULL;
  json_t *lm = class_subset(model_config, cls, 0, "model scheduler config", e);
  json_t *lc = lm ? class_subset(conf, cls, 1, "solver spec config", e) : NULL;
  int rc = lc ? ERR_OK : (e ? e->code : ERR_INVALID);
  sched_config cfg;
  int have = 0;
  if (rc == ERR_OK && (rc = sched_check_unsupported(lm, cls, e)) != ERR_OK)
    err_prefix(e, "model scheduler config");
  if (rc == ERR_OK && (rc = sched_check_unsupported(lc, cls, e)) != ERR_OK)
    err_prefix(e, "solver spec config");
  if (rc == ERR_OK && (rc = sched_check_unsupported(opts, cls, e)) != ERR_OK)
    err_prefix(e, "solver spec options");
  if (rc == ERR_OK && (rc = sched_config_init(&cfg, cls, e)) == ERR_OK) {
    have = 1;
    if ((rc = apply_text(&cfg, alias ? alias->defaults : NULL, e)) == ERR_OK &&
        (rc = apply_layer(&cfg, lm, "model scheduler config", e)) == ERR_OK &&
        (rc = prefer_data_prediction(d, &cfg, lc, opts, e)) == ERR_OK &&
        (rc = apply_layer(&cfg, lc, "solver spec config", e)) == ERR_OK &&
        (rc = apply_text(&cfg, alias ? alias->fixed : NULL, e)) == ERR_OK &&
        (rc = apply_layer(&cfg, opts, "solver spec options", e)) == ERR_OK)
      rc = build(d, name, &cfg, steps, data, out, e);
  }
  if (have)
    sched_config_free(&cfg);
  json_decref(lm);
  json_decref(lc);
  return rc;
}

const char *sampler_name(const sampler *s) {
  return s->name;
}
const char *sampler_data(const sampler *s) {
  return s->data;
}
json_t *sampler_config_json(const sampler *s) {
  return sched_config_to_json_for(&s->cfg, s->desc->class_name);
}
const sched_config *sampler_config(const sampler *s) {
  return &s->cfg;
}
int sampler_num_steps(const sampler *s) {
  return s->n;
}
const double *sampler_timesteps(const sampler *s) {
  return s->n_evals ? s->tm : NULL;
}
int sampler_nfe(const sampler *s) {
  /* DPM-OT: the map replaces the steps before its own */
  return s->ot ? s->n_evals - s->ot->step : s->n_evals;
}
int sampler_is_stochastic(const sampler *s) {
  return s->stochastic;
}
int sampler_ends_clean(const sampler *s) {
  return s->ends_clean;
}

/* ---- the loop ---- */

static int plan_part(const sampler *s, const sampler_run_opts *o, int *start, int *end, int **first,
                     err *e);
static void noise_to_level(const sampler *s, int i, const float *x0, const float *nz, size_t n,
                           float *out);
static void blend_known(const sampler *s, int i, const sampler_run_opts *o, const float *nz,
                        size_t plane, size_t d, float *known, float *x);

/* Classifier guidance reads eps at the evaluation's level: an epsilon model, whole-batch
 * evaluations (diffusers-style solvers), at most SAMPLER_CLF_MAX_BATCH images. */
static int check_classifier(const sampler *s, const model *m, const sampler_run_opts *o, int h,
                            int w, err *e) {
  const model_info *mi = model_get_info(m);
  if (s->cfg.prediction_type != SCHED_PRED_EPSILON || mi->out_channels != mi->in_channels)
    return err_set(e, ERR_UNSUPPORTED,
                   "classifier guidance needs an epsilon-predicting model without a learned "
                   "variance (this run: prediction_type '%s', %d output channels)",
                   sched_prediction_name(s->cfg.prediction_type), mi->out_channels);
  if (s->desc->run)
    return err_set(e, ERR_UNSUPPORTED,
                   "classifier guidance: %s runs the paper's own loop; use one of diffusers' "
                   "solvers",
                   s->name);
  if (o->batch > SAMPLER_CLF_MAX_BATCH)
    return err_set(e, ERR_INVALID, "classifier guidance: batch %d is above %d", o->batch,
                   SAMPLER_CLF_MAX_BATCH);
  return classifier_guidance_check(o->classifier, m, h, w, o->batch, e);
}

/* DPM-OT: the map gives each image's state at the map's step, the solver runs from there. */
static int ot_run(const sampler *s, const model *m, const sampler_run_opts *o, size_t d, float *out,
                  int *nfe, err *e) {
  if (o->init_image || o->mask || o->init_noise || o->end_step)
    return err_set(e, ERR_INVALID,
                   "dpm-ot starts from its transport map: no initial noise, "
                   "init image, mask or partial run");
  float *x = malloc((size_t)o->batch * d * sizeof *x);
  if (!x)
    return err_set(e, ERR_NOMEM, "out of memory for a batch of %d", o->batch);
  int rc = sampler_ot_start(s, o, d, x, e);
  sampler_run_opts oo = *o;
  oo.start_step = s->ot->step;
  oo.init_noise = x;
  if (rc == ERR_OK)
    rc = sampler_run(s, m, &oo, out, nfe, e);
  free(x);
  return rc;
}

int sampler_run(const sampler *s, const model *m, const sampler_run_opts *o, float *out, int *nfe,
                err *e) {
  if (nfe)
    *nfe = 0;
  const model_info *info = model_get_info(m);
  const int h = o->height ? o->height : info->sample_size;
  const int w = o->width ? o->width : info->sample_size;
  const int cin = info->in_channels, cout = info->out_channels;
  if (o->batch < 1 || h < 1 || w < 1)
    return err_set(e, ERR_INVALID, "sampler: batch %d and size %dx%d must be positive", o->batch, h,
                   w);
  if (cout != cin && cout != 2 * cin)
    return err_set(e, ERR_UNSUPPORTED,
                   "sampler: model has %d output channels for %d input channels (expected "
                   "equal, or double for a learned variance)",
                   cout, cin);
  const sched_config *cfg = &s->cfg;
  if ((cfg->variance_type == SCHED_VAR_LEARNED || cfg->variance_type == SCHED_VAR_LEARNED_RANGE) &&
      s->desc == &solver_ddpm && cout != 2 * cin)
    return err_set(e, ERR_INVALID,
                   "sampler: variance_type '%s' needs a model with 2 x %d output channels, "
                   "this one has %d",
                   sched_variance_name(cfg->variance_type), cin, cout);
  if (info->prediction_type &&
      strcmp(info->prediction_type, sched_prediction_name(cfg->prediction_type)) != 0)
    return err_set(e, ERR_INVALID,
                   "sampler: the model predicts '%s' but the scheduler config says "
                   "prediction_type '%s'",
                   info->prediction_type, sched_prediction_name(cfg->prediction_type));
  int rc = guidance_check(o->guidance, m, e);
  if (rc != ERR_OK)
    return rc;
  if (o->classifier && (rc = check_classifier(s, m, o, h, w, e)) != ERR_OK)
    return rc;
  const size_t tdim = (size_t)info->cross_attention_dim;
  if (!tdim != !o->text_states || (o->text_states && o->text_seq < 1))
    return err_set(e, ERR_INVALID,
                   tdim ? "sampler: this text-conditional model needs a prompt's hidden states"
                        : "sampler: this model takes no text conditioning");
  if (tdim && s->ot)
    return err_set(e, ERR_UNSUPPORTED, "sampler: dpm-ot is not built for text-conditional models");
  if (o->guidance && o->guidance->enabled && !o->labels && !o->text_states)
    return err_set(e, ERR_INVALID, "guidance_scale: classifier-free guidance needs class labels");
  if (!info->cond_channels != !o->cond)
    return err_set(e, ERR_INVALID,
                   info->cond_channels ? "sampler: the model is image-conditioned: a conditioning "
                                         "image is required"
                                       : "sampler: the model takes no conditioning image");
  if (s->ot && !o->start_step)
    return ot_run(s, m, o, (size_t)cin * h * w, out, nfe, e);
  int start = 0, end = s->n;
  int *first = NULL;
  const int partial = o->start_step || o->end_step || o->init_image || o->mask;
  if (partial && (rc = plan_part(s, o, &start, &end, &first, e)) != ERR_OK)
    return rc;
  const size_t d = (size_t)cin * h * w, dout = (size_t)cout * h * w;
  const size_t nb = (size_t)o->batch, nd = nb * d;
  const int nbuf = s->desc->nbuf;
  float *mo = malloc(nb * dout * sizeof *mo);
  /* x0 (d), sel (2 d), noise (nd), xin (nd), tmp[3] (3 nd), state buffers (nbuf nd) */
  float *scratch = calloc(3 * d + (5 + (size_t)nbuf) * nd, sizeof *scratch);
  float *tv = malloc(nb * sizeof *tv);
  int64_t *lab = malloc(nb * sizeof *lab);
  const size_t dc = (size_t)info->cond_channels * h * w;
  float *cbuf = o->cond ? malloc(nb * dc * sizeof *cbuf) : NULL;
  /* img2img/inpainting: the initial noise, which also re-noises the kept region */
  float *nz = o->init_image ? malloc(nd * sizeof *nz) : NULL;
  run_ctx run = {.s = s,
                 .m = m,
                 .o = o,
                 .h = h,
                 .w = w,
                 .batch = o->batch,
                 .d = d,
                 .dout = dout,
                 .tv = tv,
                 .labels = lab,
                 .cond = cbuf,
                 .dc = dc,
                 .full = mo};
  const size_t per_text = tdim * (size_t)o->text_seq;
  if (tdim && (run.states = malloc(nb * per_text * sizeof *run.states)))
    for (size_t b = 0; b < nb; b++)
      memcpy(run.states + b * per_text, o->text_states, per_text * sizeof *run.states);
  if (!mo || !scratch || !tv || !lab || (o->init_image && !nz) || (tdim && !run.states) ||
      (o->cond && !cbuf)) {
    rc = err_set(e, ERR_NOMEM, "out of memory for a batch of %d", o->batch);
    goto done;
  }
  const int e0 = first ? first[start] : 0, e1 = first ? first[end] : s->n_evals;
  if (o->init_image) {
    for (size_t b = 0; b < nb; b++) {
      if (o->init_noise)
        memcpy(nz + b * d, o->init_noise + b * d, d * sizeof *nz);
      else
        rng_normal(o->seed, o->first_image + b, 0, nz + b * d, d);
    }
    if (o->mask && o->strength >= 1.0) { /* diffusers: pure noise at full strength */
      for (size_t k = 0; k < nd; k++)
        out[k] = nz[k] * s->init_sigma;
    } else {
      noise_to_level(s, e0, o->init_image, nz, nd, out);
    }
  } else if (start > 0) {
    memcpy(out, o->init_noise, nd * sizeof *out);
  } else {
    for (size_t b = 0; b < nb; b++) {
      if (o->init_noise)
        memcpy(out + b * d, o->init_noise + b * d, d * sizeof *out);
      else
        rng_normal(o->seed, o->first_image + b, 0, out + b * d, d);
    }
    if (s->init_sigma != 1.0f)
      for (size_t k = 0; k < nd; k++)
        out[k] = out[k] * s->init_sigma;
  }
  if (s->desc->run) {
    rc = s->desc->run(s, &run, out, e);
    goto check;
  }
  step_ctx c = {.batch = o->batch,
                .d = d,
                .x = out,
                .mo = mo,
                .mo_stride = s->desc == &solver_ddpm ? dout : d,
                .x0 = scratch,
                .sel = scratch + d,
                .noise = scratch + 3 * d,
                .o = o,
                .run = &run,
                .i0 = e0};
  float *xin = c.noise + nd;
  for (int k = 0; k < 3; k++)
    c.tmp[k] = xin + (size_t)(k + 1) * nd;
  float *bufs[SAMPLER_MAX_BUF] = {0};
  for (int k = 0; k < nbuf; k++)
    bufs[k] = c.tmp[2] + (size_t)(k + 1) * nd;
  if (s->desc->bind)
    s->desc->bind(s, &c, bufs);
  int done_steps = 0;
  for (int i = e0; i < e1 && rc == ERR_OK; i++) {
    c.i = i;
    if (o->states)
      memcpy(o->states + (size_t)(i - e0) * nd, out, nd * sizeof *out);
    const float *in = out;
    if (s->in_div) {
      const float div = s->in_div[i];
      for (size_t k = 0; k < nd; k++)
        xin[k] = out[k] / div;
      in = xin;
    }
    if ((rc = sampler_eval_all(&run, start + done_steps, in, s->tm[i], mo, e)) != ERR_OK)
      break;
    if (c.mo_stride == d && dout != d) /* a learned variance only DDPM uses */
      for (size_t b = 1; b < nb; b++)
        memmove(mo + b * d, mo + b * dout, d * sizeof *mo);
    if ((rc = s->desc->step(s, &c, e)) != ERR_OK)
      break;
    if (o->mask)
      blend_known(s, i + 1, o, nz, (size_t)h * w, d, c.tmp[0], out);
    if (s->step_end[i])
      sampler_report(&run, ++done_steps, end - start);
  }
check: /* the last step's arithmetic comes after the last evaluation */
  if (rc == ERR_OK && !ops_all_finite(out, nd))
    rc = err_set(e, ERR_NUMERIC, "non-finite values in the sampler state after step %d of %d",
                 s->desc->run ? s->n : end, s->n);
done:
  if (nfe)
    *nfe = run.nfe;
  free(mo);
  free(scratch);
  free(tv);
  free(lab);
  free(cbuf);
  free(run.states);
  free(nz);
  free(first);
  return rc;
}

/* ---- partial runs, img2img, inpainting ---- */

/* first[k]: the first evaluation of step k, k = 0..n (first[n] = n_evals). */
static int step_firsts(const sampler *s, int **out, err *e) {
  int *first = malloc((size_t)(s->n + 1) * sizeof *first);
  if (!first)
    return err_set(e, ERR_NOMEM, "out of memory");
  int k = 0;
  first[0] = 0;
  for (int i = 0; i < s->n_evals && k < s->n; i++)
    if (s->step_end[i])
      first[++k] = i + 1;
  if (k != s->n || first[k] != s->n_evals) {
    free(first);
    return err_set(e, ERR_UNSUPPORTED, "%s: its evaluations do not split into %d steps", s->name,
                   s->n);
  }
  *out = first;
  return ERR_OK;
}

/* Checks the partial-run options and resolves [start, end) in steps. */
static int plan_part(const sampler *s, const sampler_run_opts *o, int *start, int *end, int **first,
                     err *e) {
  if (s->desc->run || !s->n_evals)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s runs the paper's own loop: start/end steps, img2img and inpainting need "
                   "one of diffusers' solvers",
                   s->name);
  if (o->mask && !o->init_image)
    return err_set(e, ERR_INVALID, "mask: inpainting needs an init image");
  if (o->init_image && o->start_step)
    return err_set(e, ERR_INVALID,
                   "start_step: an init image starts where strength says; give one, not both");
  int rc;
  *start = o->start_step;
  *end = o->end_step ? o->end_step : s->n;
  if (o->init_image && (rc = sampler_strength_start(s, o->strength, start, e)) != ERR_OK)
    return rc;
  if (*start < 0 || *end > s->n || *start >= *end)
    return err_set(e, ERR_INVALID, "steps [%d, %d) are not a part of the %d steps", *start, *end,
                   s->n);
  if (*start > 0 && !o->init_image && !o->init_noise)
    return err_set(e, ERR_INVALID, "start_step %d needs the state there (init_noise)", *start);
  if (*start > 0 && s->desc == &solver_pndm && !s->cfg.skip_prk_steps)
    return err_set(e, ERR_UNSUPPORTED,
                   "pndm cannot start inside its Runge-Kutta warm-up: use plms "
                   "(skip_prk_steps) for img2img or a later start");
  return step_firsts(s, first, e);
}

int sampler_strength_start(const sampler *s, double strength, int *start_step, err *e) {
  if (!isfinite(strength) || strength <= 0 || strength > 1)
    return err_set(e, ERR_INVALID, "strength %g must be in (0, 1]", strength);
  /* diffusers' get_timesteps: int() truncation of the product */
  int init = (int)((double)s->n * strength);
  if (init > s->n)
    init = s->n;
  if (init < 1)
    return err_set(e, ERR_INVALID, "strength %g leaves no step of %d (it needs at least 1/%d = %g)",
                   strength, s->n, s->n, 1.0 / s->n);
  *start_step = s->n - init;
  return ERR_OK;
}

int sampler_check_img2img(const sampler *s, double strength, err *e) {
  static const float dummy = 0.0f; /* plan_part only looks at whether there is an image */
  sampler_run_opts o = {.batch = 1, .init_image = &dummy, .strength = strength};
  int start = 0, end = 0, *first = NULL;
  int rc = plan_part(s, &o, &start, &end, &first, e);
  free(first);
  return rc;
}

/* The state's level at the input of evaluation i (i = n_evals: the clean end), in the float32
 * arithmetic of the scheduler's add_noise. */
static void eval_level(const sampler *s, int i, float *a, float *b) {
  if (i >= s->n_evals) {
    *a = 1.0f;
    *b = 0.0f;
  } else if (s->in_div) { /* Euler family: x0 + sigma * noise */
    *a = 1.0f;
    *b = s->sigmas[i];
  } else if (s->sigmas) { /* DPM-Solver, UniPC, DEIS: _sigma_to_alpha_sigma_t */
    const float sg = s->sigmas[i], al = 1.0f / sqrtf(sg * sg + 1.0f);
    *a = al;
    *b = sg * al;
  } else {
    const float ab = s->abar[(int64_t)s->tm[i]];
    *a = sqrtf(ab);
    *b = sqrtf(1.0f - ab);
  }
}

static void noise_to_level(const sampler *s, int i, const float *x0, const float *nz, size_t n,
                           float *out) {
  float a, b;
  eval_level(s, i, &a, &b);
  for (size_t k = 0; k < n; k++)
    out[k] = a * x0[k] + b * nz[k];
}

/* latents = (1 - mask) * init_latents_proper + mask * latents, per image with its own mask */
static void blend_known(const sampler *s, int i, const sampler_run_opts *o, const float *nz,
                        size_t plane, size_t d, float *known, float *x) {
  const size_t nd = (size_t)o->batch * d;
  noise_to_level(s, i, o->init_image, nz, nd, known);
  for (int b = 0; b < o->batch; b++) {
    const float *mb = o->mask + (size_t)b * plane;
    for (size_t k = 0; k < d; k++) {
      const size_t idx = (size_t)b * d + k;
      const float mk = mb[k % plane];
      x[idx] = (1.0f - mk) * known[idx] + mk * x[idx];
    }
  }
}

void sampler_step_level(const sampler *s, int k, float *a, float *b) {
  int i = s->n_evals;
  if (k < s->n) {
    int steps = 0;
    i = 0;
    for (int j = 0; j < s->n_evals && steps < k; j++)
      if (s->step_end[j] && ++steps == k)
        i = j + 1;
  }
  eval_level(s, i, a, b);
}

const float *sampler_alphas_cumprod(const sampler *s) {
  return s->abar;
}
int sampler_train_timesteps(const sampler *s) {
  return s->T;
}

int sampler_ddim_split(const sampler *s, int k, const float *x, const float *mo, size_t d,
                       float *mean, float *std, float *scratch, err *e) {
  if (s->desc != &solver_ddim)
    return err_set(e, ERR_INVALID, "%s is not DDIM: the noise-map split needs DDIMScheduler",
                   s->name);
  if (k < 0 || k >= s->n)
    return err_set(e, ERR_INVALID, "DDIM step %d outside [0, %d)", k, s->n);
  ddim_mean(s, k, x, mo, d, mean, std, scratch, scratch + d, scratch + 2 * d);
  return ERR_OK;
}
