/* Sampling loop and the DDPM / DDIM solvers. The step arithmetic runs in float32 in the order
 * torch runs diffusers' DDPMScheduler.step and DDIMScheduler.step, so that a run on the same
 * noise lands within rounding of diffusers' output rather than merely near it. */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"

typedef struct run_ctx run_ctx;

/* What one step of a solver sees: the whole batch, the model output at the step's timestep,
 * scratch space, and (through run) per-run state and more evaluations. */
typedef struct step_ctx {
  int i; /* step index */
  int batch;
  size_t d;         /* values per image */
  float *x;         /* batch * d, updated in place */
  const float *mo;  /* model output, mo_stride values per image */
  size_t mo_stride; /* d, or 2 d when the model also predicts a variance */
  float *x0;        /* d scratch */
  float *noise;     /* d scratch */
  float *sel;       /* d scratch for the thresholding quantile */
  const sampler_run_opts *o;
  run_ctx *run;
} step_ctx;

/* A solver. The loop evaluates the model at tm[i] before step i; a solver that needs more
 * evaluations per step (Heun, singlestep DPM-Solver) calls sampler_eval, so that NFE counting
 * and cancellation stay in one place. Multistep solvers keep their history in c->run->state. */
typedef struct solver_desc {
  const char *name;
  const char *class_name;
  int default_steps;
  /* Fills s->tm (model timesteps) and s->prev (where each step goes) after s->ts is set. */
  void (*prepare)(sampler *s);
  int (*step)(const sampler *s, step_ctx *c, err *e);
  /* Optional: bytes of per-run state for `batch` images of d values. */
  size_t (*state_size)(const sampler *s, int batch, size_t d);
  /* Optional: evaluations per image for a whole run; NULL means one per step. */
  int (*nfe)(const sampler *s);
} solver_desc;

struct sampler {
  const solver_desc *desc;
  sched_config cfg;
  int num_train_timesteps;
  float *abar; /* alphas_cumprod, float32 as diffusers holds it */
  int n;
  int64_t *ts;   /* the schedule's training timesteps (sched_timesteps) */
  double *tm;    /* timestep handed to the model at each step */
  int64_t *prev; /* -1: past the end of the chain */
};

struct run_ctx {
  const sampler *s;
  const model *m;
  const sampler_run_opts *o;
  int h, w;
  float *tv;   /* batch timesteps */
  void *state; /* solver_desc.state_size bytes, zeroed at the start of a run */
  int nfe;
};

/* One more network evaluation on the batch at timestep t, counted and cancellable. */
static int sampler_eval(step_ctx *c, const float *x, double t, float *out, err *e) {
  run_ctx *r = c->run;
  const sampler_run_opts *o = r->o;
  if (o->cancel && *o->cancel)
    return err_set(e, ERR_CANCELLED, "cancelled in step %d of %d", c->i + 1, r->s->n);
  for (int b = 0; b < c->batch; b++)
    r->tv[b] = (float)t;
  int rc = model_eval(r->m, x, c->batch, r->h, r->w, r->tv, o->labels, out,
                      o->threads > 0 ? o->threads : 1, e);
  if (rc != ERR_OK)
    return err_prefix(e, "step %d (t=%g)", c->i + 1, t);
  r->nfe++;
  return ERR_OK;
}

/* ---- pieces shared by the solvers ---- */

static int step_noise(const step_ctx *c, int b, float *out, err *e) {
  const sampler_run_opts *o = c->o;
  uint64_t image = o->first_image + (uint64_t)b, stream = (uint64_t)c->i + 1;
  if (o->noise)
    return o->noise(o->noise_user, image, stream, out, c->d, e);
  rng_normal(o->seed, image, stream, out, c->d);
  return ERR_OK;
}

static int cmp_float(const void *pa, const void *pb) {
  float a = *(const float *)pa, b = *(const float *)pb;
  return (a > b) - (a < b);
}

/* diffusers' _threshold_sample on one image: s = quantile(|x0|, ratio) with torch.quantile's
 * float32 linear interpolation, clamped to [1, sample_max_value]; x0 = clamp(x0, -s, s) / s. */
static void threshold_image(const sched_config *cfg, float *x0, size_t d, float *sel) {
  for (size_t i = 0; i < d; i++)
    sel[i] = fabsf(x0[i]);
  const float rank = (float)cfg->dynamic_thresholding_ratio * (float)(d - 1);
  size_t below = (size_t)rank, above = (size_t)ceilf(rank);
  if (above > d - 1)
    above = d - 1;
  qsort(sel, d, sizeof *sel, cmp_float);
  const float lo = sel[below], hi = sel[above];
  const float w = rank - (float)below;
  float s = fabsf(w) < 0.5f ? lo + w * (hi - lo) : hi - (hi - lo) * (1.0f - w);
  s = fmaxf(s, 1.0f);
  s = fminf(s, (float)cfg->sample_max_value);
  for (size_t i = 0; i < d; i++)
    x0[i] = fminf(fmaxf(x0[i], -s), s) / s;
}

static void clip_or_threshold(const sched_config *cfg, float *x0, size_t d, float *sel) {
  if (cfg->thresholding) {
    threshold_image(cfg, x0, d, sel);
  } else if (cfg->clip_sample) {
    const float r = (float)cfg->clip_sample_range;
    for (size_t i = 0; i < d; i++)
      x0[i] = fminf(fmaxf(x0[i], -r), r);
  }
}

/* pred_original_sample from the model output, as both diffusers schedulers compute it. */
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
static void ddpm_prepare(sampler *s) {
  for (int i = 0; i < s->n; i++) {
    s->tm[i] = (double)s->ts[i];
    s->prev[i] = i + 1 < s->n ? s->ts[i + 1] : -1;
  }
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
    int rc = step_noise(c, b, c->noise, e);
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
static void ddim_prepare(sampler *s) {
  const int64_t ratio = s->num_train_timesteps / s->n;
  for (int i = 0; i < s->n; i++) {
    s->tm[i] = (double)s->ts[i];
    s->prev[i] = s->ts[i] - ratio;
  }
}

static int ddim_step(const sampler *s, step_ctx *c, err *e) {
  const sched_config *cfg = &s->cfg;
  const int64_t t = s->ts[c->i], pt = s->prev[c->i];
  const float final_abar = cfg->set_alpha_to_one ? 1.0f : s->abar[0];
  const float a_t = s->abar[t], a_prev = pt >= 0 ? s->abar[pt] : final_abar;
  const float beta_t = 1.0f - a_t;
  const float sa = sqrtf(a_t), sb = sqrtf(beta_t);
  const float var = (1.0f - a_prev) / beta_t * (1.0f - a_t / a_prev);
  const float std = (float)cfg->eta * sqrtf(var);
  const float c_dir = sqrtf(1.0f - a_prev - std * std);
  const float c_x0 = sqrtf(a_prev);
  for (int b = 0; b < c->batch; b++) {
    float *x = c->x + (size_t)b * c->d;
    const float *mo = c->mo + (size_t)b * c->mo_stride;
    float *x0 = c->x0;
    predict_x0(cfg->prediction_type, a_t, x, mo, c->d, x0);
    /* pred_epsilon is taken before clipping, from the raw output */
    for (size_t i = 0; i < c->d; i++) {
      float pe;
      if (cfg->prediction_type == SCHED_PRED_EPSILON)
        pe = mo[i];
      else if (cfg->prediction_type == SCHED_PRED_SAMPLE)
        pe = (x[i] - sa * x0[i]) / sb;
      else
        pe = sa * mo[i] + sb * x[i];
      c->noise[i] = pe; /* reuse as the pred_epsilon buffer until the noise is drawn */
    }
    clip_or_threshold(cfg, x0, c->d, c->sel);
    for (size_t i = 0; i < c->d; i++)
      x[i] = c_x0 * x0[i] + c_dir * c->noise[i];
    if (cfg->eta > 0) {
      int rc = step_noise(c, b, c->noise, e);
      if (rc != ERR_OK)
        return rc;
      for (size_t i = 0; i < c->d; i++)
        x[i] = x[i] + std * c->noise[i];
    }
  }
  return ERR_OK;
}

static const solver_desc solvers[] = {
    {"ddpm", "DDPMScheduler", 1000, ddpm_prepare, ddpm_step, NULL, NULL},
    {"ddim", "DDIMScheduler", 50, ddim_prepare, ddim_step, NULL, NULL},
};

#define NSOLVERS ((int)(sizeof solvers / sizeof solvers[0]))

static const solver_desc *find_solver(const char *name) {
  for (int i = 0; name && i < NSOLVERS; i++)
    if (strcmp(solvers[i].name, name) == 0)
      return &solvers[i];
  return NULL;
}

int sampler_solver_count(void) {
  return NSOLVERS;
}
const char *sampler_solver_name(int i) {
  return i >= 0 && i < NSOLVERS ? solvers[i].name : NULL;
}
const char *sampler_solver_class(const char *solver) {
  const solver_desc *d = find_solver(solver);
  return d ? d->class_name : NULL;
}
int sampler_solver_default_steps(const char *solver) {
  const solver_desc *d = find_solver(solver);
  return d ? d->default_steps : 0;
}

void sampler_free(sampler *s) {
  if (!s)
    return;
  sched_config_free(&s->cfg);
  free(s->abar);
  free(s->ts);
  free(s->tm);
  free(s->prev);
  free(s);
}

int sampler_new(const char *name, const sched_config *cfg, int num_inference_steps, sampler **out,
                err *e) {
  const solver_desc *d = find_solver(name);
  if (!d) {
    char list[128] = "";
    for (int i = 0; i < NSOLVERS; i++) {
      size_t len = strlen(list);
      snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", solvers[i].name);
    }
    return err_set(e, ERR_UNSUPPORTED, "unknown sampler '%s' (one of: %s)", name ? name : "", list);
  }
  sampler *s = calloc(1, sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->desc = d;
  int rc = sched_config_copy(&s->cfg, cfg, e);
  if (rc != ERR_OK) {
    free(s);
    return rc;
  }
  const int T = cfg->num_train_timesteps;
  s->num_train_timesteps = T;
  if (num_inference_steps == 0)
    num_inference_steps = d->default_steps < T ? d->default_steps : T;
  s->n = num_inference_steps;
  if (num_inference_steps < 1 || num_inference_steps > T) {
    rc = err_set(e, ERR_INVALID, "num_inference_steps %d must be in [1, %d]", num_inference_steps,
                 T);
    goto fail;
  }
  s->abar = malloc((size_t)T * sizeof *s->abar);
  s->ts = malloc((size_t)s->n * sizeof *s->ts);
  s->tm = malloc((size_t)s->n * sizeof *s->tm);
  s->prev = malloc((size_t)s->n * sizeof *s->prev);
  if (!s->abar || !s->ts || !s->tm || !s->prev) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto fail;
  }
  if ((rc = sched_alphas_cumprod(&s->cfg, s->abar, e)) != ERR_OK ||
      (rc = sched_timesteps(&s->cfg, s->n, s->ts, e)) != ERR_OK)
    goto fail;
  d->prepare(s);
  *out = s;
  return ERR_OK;
fail:
  sampler_free(s);
  return rc;
}

const char *sampler_name(const sampler *s) {
  return s->desc->name;
}
int sampler_num_steps(const sampler *s) {
  return s->n;
}
const double *sampler_timesteps(const sampler *s) {
  return s->tm;
}
int sampler_nfe(const sampler *s) {
  return s->desc->nfe ? s->desc->nfe(s) : s->n;
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
      s->desc->step == ddpm_step && cout != 2 * cin)
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
  const size_t d = (size_t)cin * h * w, dout = (size_t)cout * h * w;
  const size_t nb = (size_t)o->batch;
  const size_t state_bytes = s->desc->state_size ? s->desc->state_size(s, o->batch, d) : 0;
  float *mo = malloc(nb * dout * sizeof *mo);
  float *scratch = malloc(3 * d * sizeof *scratch);
  float *tv = malloc(nb * sizeof *tv);
  run_ctx run = {.s = s, .m = m, .o = o, .h = h, .w = w, .tv = tv};
  run.state = state_bytes ? calloc(1, state_bytes) : NULL;
  if (!mo || !scratch || !tv || (state_bytes && !run.state)) {
    free(mo);
    free(scratch);
    free(tv);
    free(run.state);
    return err_set(e, ERR_NOMEM, "out of memory for a batch of %d", o->batch);
  }
  for (size_t b = 0; b < nb; b++) {
    if (o->init_noise)
      memcpy(out + b * d, o->init_noise + b * d, d * sizeof *out);
    else
      rng_normal(o->seed, o->first_image + b, 0, out + b * d, d);
  }
  step_ctx c = {.batch = o->batch,
                .d = d,
                .x = out,
                .mo = mo,
                .mo_stride = dout,
                .x0 = scratch,
                .noise = scratch + d,
                .sel = scratch + 2 * d,
                .o = o,
                .run = &run};
  int rc = ERR_OK;
  for (int i = 0; i < s->n && rc == ERR_OK; i++) {
    c.i = i;
    if ((rc = sampler_eval(&c, out, s->tm[i], mo, e)) != ERR_OK ||
        (rc = s->desc->step(s, &c, e)) != ERR_OK)
      break;
    if (o->progress)
      o->progress(i + 1, s->n, run.nfe, o->progress_user);
  }
  if (nfe)
    *nfe = run.nfe;
  free(mo);
  free(scratch);
  free(tv);
  free(run.state);
  return rc;
}
