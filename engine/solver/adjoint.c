/* The discrete adjoint (adjoint.h): each step of DDIM and DPM-Solver(++) multistep written as
 * coefficients of one linear form (the same float32 expressions the solvers evaluate), the
 * forward run through sampler_run keeping the state of every evaluation, then the reverse sweep
 * with one model_backward per evaluation whose upstream gradient is computed from that
 * evaluation's recomputed output (the clip mask needs it). */
#include "adjoint.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "ops.h"
#include "sampler_impl.h"

#define ADJ_ORDER SAMPLER_MAX_ORDER

/* One evaluation's step as the adjoint sees it:
 *   u = px x + pm mo                      the x0 estimate before the clip
 *   c = clamp(u, -cs, cs) * cscale        (clip) or u
 *   m = qx x + qc c + qm mo               the value the step keeps (x0, eps, or DDIM's mean)
 *   x_next = a x + b[0] m_i + b[1] m_{i-1} + b[2] m_{i-2} */
typedef struct lin_step {
  float px, pm;
  int clip;
  float cs, cscale;
  float qx, qc, qm;
  float a, b[ADJ_ORDER];
  int nb; /* how many of b are used */
} lin_step;

static int is_ddim(const sampler *s) {
  return strcmp(s->desc->name, "ddim") == 0;
}

int adjoint_check_solver(const sampler *s, err *e) {
  const sched_config *cfg = &s->cfg;
  if (!is_ddim(s) && s->desc != &solver_dpm_multistep)
    return err_set(e, ERR_UNSUPPORTED,
                   "the discrete adjoint differentiates ddim and dpm-solver(++) multistep "
                   "(DDIMScheduler, DPMSolverMultistepScheduler), not '%s'",
                   s->name);
  if (s->stochastic || (is_ddim(s) && cfg->eta != 0))
    return err_set(e, ERR_UNSUPPORTED,
                   "the discrete adjoint needs a deterministic solver: '%s' draws noise (eta or "
                   "an sde algorithm_type)",
                   s->name);
  if (cfg->thresholding && cfg->sample_max_value > 1.0)
    return err_set(e, ERR_UNSUPPORTED,
                   "scheduler config key 'sample_max_value' %g: dynamic thresholding (a scale "
                   "from the quantile of |x0|) is not differentiated; with 'thresholding' the "
                   "adjoint takes sample_max_value <= 1 (a fixed clip)",
                   cfg->sample_max_value);
  if (s->in_div || s->init_sigma != 1.0f || s->n_evals != s->n)
    return err_set(e, ERR_UNSUPPORTED, "'%s': not one evaluation per step", s->name);
  return ERR_OK;
}

/* ---- the linear form of each step ---- */

/* x0 = px x + pm mo for a prediction type at (alpha, sigma). */
static void x0_coefs(sched_prediction p, float alpha, float sigma, float *px, float *pm) {
  switch (p) {
  case SCHED_PRED_EPSILON: *px = 1.0f / alpha, *pm = -sigma / alpha; break;
  case SCHED_PRED_SAMPLE: *px = 0.0f, *pm = 1.0f; break;
  case SCHED_PRED_V: *px = alpha, *pm = -sigma; break;
  }
}

/* eps = ex x + em mo. */
static void eps_coefs(sched_prediction p, float alpha, float sigma, float *ex, float *em) {
  switch (p) {
  case SCHED_PRED_EPSILON: *ex = 0.0f, *em = 1.0f; break;
  case SCHED_PRED_SAMPLE: *ex = 1.0f / sigma, *em = -alpha / sigma; break;
  case SCHED_PRED_V: *ex = sigma, *em = alpha; break;
  }
}

/* The clip the solvers apply to x0: thresholding with sample_max_value <= 1 is
 * clamp(x0, -smv, smv) / smv (the quantile's scale clamped to [1, smv] is smv), clip_sample is
 * clamp(x0, -r, r) (DDIM only: the DPM solvers read thresholding alone). */
static void clip_coefs(const sched_config *cfg, int ddim, lin_step *L) {
  if (cfg->thresholding) {
    L->clip = 1;
    L->cs = (float)cfg->sample_max_value;
    L->cscale = 1.0f / L->cs;
  } else if (ddim && cfg->clip_sample) {
    L->clip = 1;
    L->cs = (float)cfg->clip_sample_range;
    L->cscale = 1.0f;
  }
}

/* ddim_mean with eta 0: mean = sqrt(a_prev) clip(x0) + sqrt(1 - a_prev) pred_epsilon. */
static void ddim_step_coefs(const sampler *s, int k, lin_step *L) {
  const sched_config *cfg = &s->cfg;
  const int64_t t = s->ts[k], pt = s->prev[k];
  const float final_abar = cfg->set_alpha_to_one ? 1.0f : s->abar[0];
  const float a_t = s->abar[t], a_prev = pt >= 0 ? s->abar[pt] : final_abar;
  const float sa = sqrtf(a_t), sb = sqrtf(1.0f - a_t);
  const float c_dir = sqrtf(1.0f - a_prev), c_x0 = sqrtf(a_prev);
  x0_coefs(cfg->prediction_type, sa, sb, &L->px, &L->pm);
  float ex = 0,
        em = 0; /* pred_epsilon from the raw output: (x - sa x0) / sb for sample prediction */
  eps_coefs(cfg->prediction_type, sa, sb, &ex, &em);
  clip_coefs(cfg, 1, L);
  L->qc = c_x0;
  L->qx = c_dir * ex;
  L->qm = c_dir * em;
  L->a = 0.0f;
  L->b[0] = 1.0f;
  L->nb = 1;
}

static void alpha_sigma(float sigma, float *alpha_t, float *sigma_t) {
  *alpha_t = 1.0f / sqrtf(sigma * sigma + 1.0f);
  *sigma_t = sigma * *alpha_t;
}

static float lambda_at(const sampler *s, int k, float *alpha, float *sigma) {
  alpha_sigma(s->sigmas[k], alpha, sigma);
  return logf(*alpha) - logf(*sigma);
}

/* eps at (alpha, sigma) from the model output, through the clipped x0 when the solver clips
 * (DDIM: clip_sample or thresholding; the DPM solvers: thresholding): x0 clipped, eps back from
 * it, as dpmsolver's convert_model_output does. */
static void eps_form_coefs(const sched_config *cfg, int ddim, float alpha, float sigma,
                           lin_step *L) {
  float ex = 0, em = 0;
  eps_coefs(cfg->prediction_type, alpha, sigma, &ex, &em);
  clip_coefs(cfg, ddim, L);
  if (!L->clip) {
    L->qx = ex, L->qm = em;
    return;
  }
  L->px = 1.0f / alpha - sigma * ex / alpha;
  L->pm = -sigma * em / alpha;
  L->qx = 1.0f / sigma;
  L->qc = -alpha / sigma;
}

/* convert_model_output: dpmsolver++ keeps the (thresholded) x0, dpmsolver eps (with
 * thresholding: x0 from eps, thresholded, back to eps). */
static void dpm_convert_coefs(const sampler *s, int k, lin_step *L) {
  const sched_config *cfg = &s->cfg;
  float alpha, sigma;
  alpha_sigma(s->sigmas[k], &alpha, &sigma);
  if (cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP) {
    x0_coefs(cfg->prediction_type, alpha, sigma, &L->px, &L->pm);
    clip_coefs(cfg, 0, L);
    L->qc = 1.0f;
    return;
  }
  eps_form_coefs(cfg, 0, alpha, sigma, L);
}

/* dpm_multi_step's branch at step k and its coefficients on x, m0, m1, m2. */
static void dpm_update_coefs(const sampler *s, int k, lin_step *L) {
  const sched_config *cfg = &s->cfg;
  const int N = s->n, K = cfg->solver_order, lon = k < K ? k : K;
  const int pp = cfg->algorithm_type == SCHED_ALGO_DPMSOLVER_PP;
  const int lof = k == N - 1 && (cfg->euler_at_final || (cfg->lower_order_final && N < 15) ||
                                 cfg->final_sigmas_type == SCHED_FINAL_ZERO);
  const int los = k == N - 2 && cfg->lower_order_final && N < 15;
  float alpha_t, sigma_t, alpha_s0, sigma_s0, alpha_s1, sigma_s1, alpha_s2, sigma_s2;
  const float lt = lambda_at(s, k + 1, &alpha_t, &sigma_t);
  const float l0 = lambda_at(s, k, &alpha_s0, &sigma_s0);
  const float h = lt - l0;
  /* the first-order part, shared by every order: x_t = a x - b m0 */
  L->a = pp ? sigma_t / sigma_s0 : alpha_t / alpha_s0;
  const float b = pp ? alpha_t * (expf(-h) - 1.0f) : sigma_t * (expf(h) - 1.0f);
  L->b[0] = -b;
  L->nb = 1;
  if (K == 1 || lon < 1 || lof)
    return;
  const float l1 = lambda_at(s, k - 1, &alpha_s1, &sigma_s1), r0 = (l0 - l1) / h;
  if (K == 2 || lon < 2 || los) {
    const float inv = 1.0f / r0; /* D1 = inv (m0 - m1), x_t = ... + c3 D1 */
    float c3;
    if (pp)
      c3 = cfg->solver_type == SCHED_SOLVER_MIDPOINT ? -(0.5f * (alpha_t * (expf(-h) - 1.0f)))
                                                     : alpha_t * ((expf(-h) - 1.0f) / h + 1.0f);
    else
      c3 = -(cfg->solver_type == SCHED_SOLVER_MIDPOINT ? 0.5f * (sigma_t * (expf(h) - 1.0f))
                                                       : sigma_t * ((expf(h) - 1.0f) / h - 1.0f));
    L->b[0] += c3 * inv;
    L->b[1] = -c3 * inv;
    L->nb = 2;
    return;
  }
  const float l2 = lambda_at(s, k - 2, &alpha_s2, &sigma_s2), r1 = (l1 - l2) / h;
  const float i0 = 1.0f / r0, i1 = 1.0f / r1, q = r0 / (r0 + r1), q2 = 1.0f / (r0 + r1);
  /* x_t = a x - b m0 + cc D1 - dd D2 (++), a x - b m0 - cc D1 - dd D2 (dpmsolver), with
   * D1 = (1 + q) d10 - q d11, D2 = q2 (d10 - d11), d10 = i0 (m0 - m1), d11 = i1 (m1 - m2) */
  const float em = expf(-h), ep = expf(h);
  const float cc = pp ? alpha_t * ((em - 1.0f) / h + 1.0f) : -(sigma_t * ((ep - 1.0f) / h - 1.0f));
  const float dd = pp ? alpha_t * ((em - 1.0f + h) / (h * h) - 0.5f)
                      : sigma_t * ((ep - 1.0f - h) / (h * h) - 0.5f);
  const float d1[3] = {(1 + q) * i0, -(1 + q) * i0 - q * i1, q * i1};
  const float d2[3] = {q2 * i0, -q2 * (i0 + i1), q2 * i1};
  for (int j = 0; j < 3; j++)
    L->b[j] += cc * d1[j] - dd * d2[j];
  L->nb = 3;
}

static void step_coefs(const sampler *s, int k, lin_step *L) {
  memset(L, 0, sizeof *L);
  if (is_ddim(s)) {
    ddim_step_coefs(s, k, L);
    return;
  }
  dpm_convert_coefs(s, k, L);
  dpm_update_coefs(s, k, L);
}

/* m of the linear form for one value: state x, (guided) model output mo. */
static float lin_m(const lin_step *L, float x, float mo) {
  const float u = L->px * x + L->pm * mo;
  const float c = L->clip ? fminf(fmaxf(u, -L->cs), L->cs) * L->cscale : u;
  return L->qx * x + L->qc * c + L->qm * mo;
}

/* ---- the reverse sweep ---- */

/* What the upstream-gradient callback of one evaluation needs and fills. */
typedef struct adj_eval {
  const lin_step *L;
  const float *x;    /* the evaluation's state, batch * d */
  const float *mbar; /* the complete cotangent of this evaluation's m */
  float *xbar;       /* the state's cotangent, accumulated */
  float *mval;       /* m recomputed, for the replay check */
  const float *unc;  /* guided: the unconditional pass's output, else NULL */
  float *mob;        /* guided: the guided output's cotangent, kept for the second pass */
  size_t nd;
  float scale; /* guidance scale */
} adj_eval;

/* Called with the (conditional) pass's output: the guided output as guidance_eval combines it,
 * m, and the cotangents: the state's directly, the model output's to this pass (all of it, or
 * g of it under guidance: d/dcond = g; the unconditional pass gets 1 - g afterwards). */
static int upstream(const float *out, float *grad_out, void *user, err *e) {
  (void)e;
  const adj_eval *v = user;
  const lin_step *L = v->L;
  for (size_t k = 0; k < v->nd; k++) {
    const float mo = v->unc ? v->unc[k] + v->scale * (out[k] - v->unc[k]) : out[k];
    const float x = v->x[k], u = L->px * x + L->pm * mo;
    const int inside = !L->clip || (u >= -L->cs && u <= L->cs);
    v->mval[k] = lin_m(L, x, mo);
    const float mb = v->mbar[k];
    const float ub = inside ? L->qc * mb * (L->clip ? L->cscale : 1.0f) : 0.0f;
    v->xbar[k] += L->qx * mb + L->px * ub;
    const float mob = L->qm * mb + L->pm * ub;
    if (v->unc) {
      v->mob[k] = mob;
      grad_out[k] = v->scale * mob;
    } else {
      grad_out[k] = mob;
    }
  }
  return ERR_OK;
}

/* The buffers of the sweep. */
typedef struct sweep {
  size_t nd, d;
  int guided; /* two passes */
  float *xbar, *xbar_next, *mbar[ADJ_ORDER], *mval[ADJ_ORDER];
  float *gx, *gcl, *tv, *unc, *mob;
  int64_t *lab, *null_lab;
} sweep;

static void sweep_free(sweep *w) {
  free(w->xbar), free(w->xbar_next), free(w->gx), free(w->gcl), free(w->tv), free(w->unc);
  free(w->mob), free(w->lab), free(w->null_lab);
  for (int j = 0; j < ADJ_ORDER; j++)
    free(w->mbar[j]), free(w->mval[j]);
}

static int sweep_new(sweep *w, const model *m, const adjoint_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  const size_t nb = (size_t)o->batch;
  w->xbar = mem_calloc(w->nd, sizeof(float));
  w->xbar_next = mem_malloc(w->nd * sizeof(float));
  w->gx = mem_malloc(w->nd * sizeof(float));
  w->tv = mem_malloc(nb * sizeof(float));
  w->lab = mem_malloc(nb * sizeof(int64_t));
  w->null_lab = mem_malloc(nb * sizeof(int64_t));
  int ok = w->xbar && w->xbar_next && w->gx && w->tv && w->lab && w->null_lab;
  if (w->guided) {
    w->unc = mem_malloc(w->nd * sizeof(float));
    w->mob = mem_malloc(w->nd * sizeof(float));
    ok = ok && w->unc && w->mob;
  }
  if (o->grad_class) {
    w->gcl = mem_malloc(nb * (size_t)mi->class_embed_dim * sizeof(float));
    ok = ok && w->gcl;
  }
  for (int j = 0; j < ADJ_ORDER; j++) {
    w->mbar[j] = mem_calloc(w->nd, sizeof(float));
    w->mval[j] = mem_calloc(w->nd, sizeof(float));
    ok = ok && w->mbar[j] && w->mval[j];
  }
  if (!ok)
    return err_set(e, ERR_NOMEM, "out of memory for the adjoint's buffers");
  /* the labels of the one pass (the images', or the null class for a scale-0 run), and the
   * null class of a guided run's second pass */
  const guidance *g = o->guidance;
  const int uncond_only = g && g->enabled && g->scale == 0.0;
  for (size_t b = 0; b < nb; b++) {
    w->lab[b] = o->labels ? (uncond_only ? g->null_label : o->labels[b]) : 0;
    w->null_lab[b] = g ? g->null_label : 0;
  }
  return ERR_OK;
}

/* Step k's state from its linear form against the state that ran: relative L2. mval[j] holds
 * m_{i+j} where i is the evaluation just processed. */
static double replay_one(const lin_step *L, int k, int i, const float *xk, const float *xk1,
                         float *const *mval, size_t nd) {
  double num = 0, den = 0;
  for (size_t q = 0; q < nd; q++) {
    float v = L->a * xk[q];
    for (int j = 0; j < L->nb; j++)
      v += L->b[j] * mval[k - j - i][q];
    num += ((double)v - xk1[q]) * ((double)v - xk1[q]);
    den += (double)xk1[q] * xk1[q];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* One backward evaluation at state x (evaluation i). Under guidance the passes run one after
 * the other, each with a tape of batch rows only (memory of one pass, not two): the
 * unconditional output first (a plain forward), then the conditional pass's backward, whose
 * callback forms the guided output and its cotangent, then the unconditional pass's backward
 * with 1 - g of that cotangent. Parameter gradients of both accumulate. */
static int back_eval(const sampler *s, const model *m, adjoint_opts *o, sweep *w, int i,
                     const float *x, const lin_step *L, err *e) {
  const model_info *mi = model_get_info(m);
  const int S = mi->sample_size;
  for (int b = 0; b < o->batch; b++)
    w->tv[b] = (float)s->tm[i];
  model_call c = {.x = x,
                  .n = o->batch,
                  .h = S,
                  .w = S,
                  .t = w->tv,
                  .labels = o->labels ? w->null_lab : NULL,
                  .threads = o->threads};
  int rc = w->guided ? model_run(m, &c, w->unc, e) : ERR_OK;
  adj_eval v = {.L = L,
                .x = x,
                .mbar = w->mbar[0],
                .xbar = w->xbar,
                .mval = w->mval[0],
                .unc = w->guided ? w->unc : NULL,
                .mob = w->mob,
                .nd = w->nd,
                .scale = o->guidance ? (float)o->guidance->scale : 1.0f};
  c.labels = o->labels ? w->lab : NULL;
  model_grad_call gc = {.loss_grad = upstream,
                        .loss_user = &v,
                        .grad_x = w->gx,
                        .grad_class = w->gcl,
                        .params = o->grad_params};
  if (rc == ERR_OK)
    rc = model_backward(m, &c, &gc, e);
  for (size_t k = 0; rc == ERR_OK && k < w->nd; k++)
    w->xbar[k] += w->gx[k];
  const int conditional = !(o->guidance && o->guidance->enabled && o->guidance->scale == 0.0);
  if (rc == ERR_OK && o->grad_class && conditional)
    for (size_t k = 0; k < (size_t)o->batch * mi->class_embed_dim; k++)
      o->grad_class[k] += w->gcl[k];
  if (rc == ERR_OK && w->guided) {
    for (size_t k = 0; k < w->nd; k++)
      w->mob[k] = (1.0f - v.scale) * w->mob[k];
    c.labels = w->null_lab;
    model_grad_call gu = {.grad_out = w->mob, .grad_x = w->gx, .params = o->grad_params};
    rc = model_backward(m, &c, &gu, e);
    for (size_t k = 0; rc == ERR_OK && k < w->nd; k++)
      w->xbar[k] += w->gx[k];
  }
  return rc == ERR_OK ? ERR_OK : err_prefix(e, "adjoint, evaluation %d of %d", i + 1, s->n_evals);
}

static int backward_sweep(const sampler *s, const model *m, adjoint_opts *o, const float *states,
                          const float *sample, const lin_step *Ls, sweep *w, err *e) {
  const int N = s->n_evals;
  memcpy(w->xbar, o->grad_output, w->nd * sizeof(float)); /* the cotangent of x_N */
  for (int i = N - 1; i >= 0; i--) {
    if (o->cancel && atomic_load(o->cancel))
      return err_set(e, ERR_CANCELLED, "cancelled in the adjoint's step %d of %d", N - i, N);
    const lin_step *L = &Ls[i];
    /* step i's share: m_{i-j} gets b[j] xbar_{i+1}, x_i gets a xbar_{i+1} */
    for (int j = 0; j < L->nb; j++)
      for (size_t k = 0; k < w->nd; k++)
        w->mbar[j][k] += L->b[j] * w->xbar[k];
    for (size_t k = 0; k < w->nd; k++)
      w->xbar_next[k] = L->a * w->xbar[k];
    float *t = w->xbar;
    w->xbar = w->xbar_next;
    w->xbar_next = t;
    const float *x = states + (size_t)i * w->nd;
    int rc = back_eval(s, m, o, w, i, x, L, e);
    if (rc != ERR_OK)
      return rc;
    /* steps whose every m is known now: those reaching back exactly to i */
    for (int k = i; k < N && k < i + ADJ_ORDER; k++)
      if (Ls[k].nb - 1 == k - i) {
        const float *xk1 = k + 1 < N ? states + (size_t)(k + 1) * w->nd : sample;
        double r = replay_one(&Ls[k], k, i, states + (size_t)k * w->nd, xk1, w->mval, w->nd);
        o->replay_err = r > o->replay_err ? r : o->replay_err;
      }
    /* shift the rings: index j is m_{i-1+j} / mbar of m_{i-1-j} from now on */
    float *mb0 = w->mbar[0], *mv_last = w->mval[ADJ_ORDER - 1];
    for (int j = 0; j + 1 < ADJ_ORDER; j++)
      w->mbar[j] = w->mbar[j + 1];
    w->mbar[ADJ_ORDER - 1] = mb0;
    memset(mb0, 0, w->nd * sizeof(float));
    for (int j = ADJ_ORDER - 1; j > 0; j--)
      w->mval[j] = w->mval[j - 1];
    w->mval[0] = mv_last;
    if (o->progress)
      o->progress(2 * N - i, 2 * N, 0, o->progress_user);
  }
  if (o->grad_noise)
    memcpy(o->grad_noise, w->xbar, w->nd * sizeof(float));
  return ERR_OK;
}

static int check_opts(const sampler *s, const model *m, const adjoint_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  int rc = adjoint_check_solver(s, e);
  if (rc != ERR_OK)
    return rc;
  if (model_param_count(m) < 1)
    return err_set(e, ERR_UNSUPPORTED,
                   "the adjoint differentiates a network with weights (UNet2DModel), not '%s'",
                   mi->class_name);
  if (mi->out_channels != mi->in_channels)
    return err_set(e, ERR_UNSUPPORTED,
                   "the adjoint needs a model whose output has its input's %d channels (this "
                   "one has %d: a learned variance)",
                   mi->in_channels, mi->out_channels);
  if (o->batch < 1 || !o->noise || !o->grad_output || o->threads < 1)
    return err_set(e, ERR_INVALID, "adjoint: batch, noise, grad_output and threads are required");
  if (o->grad_class && !mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "the class-embedding gradient needs a class-conditional model (this one has "
                   "no class embeddings)");
  const size_t nd = (size_t)o->batch * mi->in_channels * mi->sample_size * mi->sample_size;
  if (!ops_all_finite(o->grad_output, nd))
    return err_set(e, ERR_NUMERIC, "adjoint: non-finite values in the output gradient");
  return ERR_OK;
}

typedef struct fwd_progress {
  adjoint_opts *o;
  int total;
} fwd_progress;

static void on_forward(int step, int total, int nfe, void *user) {
  (void)total;
  const fwd_progress *p = user;
  p->o->progress(step, p->total, nfe, p->o->progress_user);
}

/* ---- the continuous adjoint ---- */

/* Grid point k of the ODE (0 <= k <= n): alpha and rho = sigma / alpha at the level of the
 * solver's evaluation k, k = n the level the solver ends at. */
static void ode_level(const sampler *s, int k, float *alpha, float *rho) {
  float sigma;
  if (!is_ddim(s)) {
    alpha_sigma(s->sigmas[k], alpha, &sigma);
    *rho = s->sigmas[k];
    return;
  }
  const float final_abar = s->cfg.set_alpha_to_one ? 1.0f : s->abar[0];
  const int64_t t = k < s->n ? s->ts[k] : s->prev[s->n - 1];
  const float abar = t >= 0 ? s->abar[t] : final_abar;
  *alpha = sqrtf(abar);
  *rho = sqrtf(1.0f - abar) / *alpha;
}

/* eps (clipped where the solver clips) at grid point k, as a linear form. */
static void ode_coefs(const sampler *s, int k, lin_step *L) {
  float alpha, rho;
  ode_level(s, k, &alpha, &rho);
  memset(L, 0, sizeof *L);
  eps_form_coefs(&s->cfg, is_ddim(s), alpha, rho * alpha, L);
}

/* The forward solve: n first-order steps y_{k+1} = y_k + (rho_{k+1} - rho_k) eps_k, written in
 * x (x_{k+1} = alpha_{k+1} / alpha_k x_k + alpha_{k+1} (rho_{k+1} - rho_k) eps_k, finite at a
 * clean end). x holds x_T on entry and the sample on return; last receives x_{n-1}. */
static int ode_forward(const sampler *s, const model *m, adjoint_opts *o, sweep *w, float *x,
                       float *last, err *e) {
  const model_info *mi = model_get_info(m);
  const int N = s->n, S = mi->sample_size;
  for (int k = 0; k < N; k++) {
    if (o->cancel && atomic_load(o->cancel))
      return err_set(e, ERR_CANCELLED, "cancelled in the ODE solve's step %d of %d", k + 1, N);
    for (int b = 0; b < o->batch; b++)
      w->tv[b] = (float)s->tm[k];
    const model_call c = {.x = x,
                          .n = o->batch,
                          .h = S,
                          .w = S,
                          .t = w->tv,
                          .labels = o->labels,
                          .threads = o->threads};
    float *mo = w->mval[0];
    int rc = guidance_eval(o->guidance, m, &c, mo, e);
    if (rc != ERR_OK)
      return err_prefix(e, "ODE solve, step %d of %d", k + 1, N);
    lin_step L;
    ode_coefs(s, k, &L);
    float a0, r0, a1, r1;
    ode_level(s, k, &a0, &r0);
    ode_level(s, k + 1, &a1, &r1);
    const float ca = a1 / a0, cm = a1 * (r1 - r0);
    if (k == N - 1)
      memcpy(last, x, w->nd * sizeof(float));
    for (size_t q = 0; q < w->nd; q++)
      x[q] = ca * x[q] + cm * lin_m(&L, x[q], mo[q]);
    if (o->progress)
      o->progress(k + 1, 2 * N, k + 1, o->progress_user);
  }
  return ERR_OK;
}

/* One backward evaluation at grid point k, state x: w->xbar = (d eps / dx)^T mbar with mbar in
 * w->mbar[0], eps(x) in w->mval[0]; the class and weight gradients get mbar's share. */
static int ode_vjp(const sampler *s, const model *m, adjoint_opts *o, sweep *w, int k,
                   const float *x, err *e) {
  lin_step L;
  ode_coefs(s, k, &L);
  memset(w->xbar, 0, w->nd * sizeof(float));
  return back_eval(s, m, o, w, k, x, &L, e);
}

/* The backward solve from the sample: the last step exactly at its kept start x_{n-1}, then
 * for k = n-2 .. 0 one step of the augmented system from rho_{k+1} to rho_k, evaluated where it
 * starts (x_{k+1}): a_y += h a_y d eps/dy, a_c and a_theta += h a_y d eps/d(c, theta),
 * y_k = y_{k+1} - h eps, h = rho_{k+1} - rho_k. ax holds dL/dx (the adjoint in x, a_y / alpha)
 * throughout; x the state, both batch * d. */
static int ode_backward(const sampler *s, const model *m, adjoint_opts *o, sweep *w, float *x,
                        float *ax, err *e) {
  const int N = s->n;
  float a0, r0, a1, r1;
  ode_level(s, N - 1, &a0, &r0);
  ode_level(s, N, &a1, &r1);
  for (size_t q = 0; q < w->nd; q++)
    w->mbar[0][q] = a1 * (r1 - r0) * ax[q];
  int rc = ode_vjp(s, m, o, w, N - 1, x, e);
  for (size_t q = 0; rc == ERR_OK && q < w->nd; q++)
    ax[q] = a1 / a0 * ax[q] + w->xbar[q];
  if (o->progress && rc == ERR_OK)
    o->progress(N + 1, 2 * N, 0, o->progress_user);
  for (int k = N - 2; rc == ERR_OK && k >= 0; k--) {
    if (o->cancel && atomic_load(o->cancel))
      return err_set(e, ERR_CANCELLED, "cancelled in the adjoint's step %d of %d", N - k, N);
    ode_level(s, k, &a0, &r0);
    ode_level(s, k + 1, &a1, &r1);
    const float h = r1 - r0;
    /* a_y = alpha_{k+1} ax; the VJP's cotangent is h a_y */
    for (size_t q = 0; q < w->nd; q++)
      w->mbar[0][q] = h * a1 * ax[q];
    rc = ode_vjp(s, m, o, w, k + 1, x, e);
    for (size_t q = 0; rc == ERR_OK && q < w->nd; q++) {
      const float ay = a1 * ax[q] + a1 * w->xbar[q];
      ax[q] = ay / a0;
      x[q] = a0 * (x[q] / a1 - h * w->mval[0][q]);
    }
    if (o->progress && rc == ERR_OK)
      o->progress(2 * N - k, 2 * N, 0, o->progress_user);
  }
  return rc;
}

static double rel_l2(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t q = 0; q < n; q++) {
    num += ((double)a[q] - b[q]) * ((double)a[q] - b[q]);
    den += (double)b[q] * b[q];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int continuous_run(const sampler *s, const model *m, adjoint_opts *o, sweep *w, err *e) {
  float *x = mem_malloc(w->nd * sizeof(float)), *last = mem_malloc(w->nd * sizeof(float));
  float *ax = mem_malloc(w->nd * sizeof(float));
  int rc = x && last && ax ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for the ODE's states");
  if (rc == ERR_OK) {
    memcpy(x, o->noise, w->nd * sizeof(float));
    rc = ode_forward(s, m, o, w, x, last, e);
  }
  if (rc == ERR_OK && o->sample)
    memcpy(o->sample, x, w->nd * sizeof(float));
  if (rc == ERR_OK) {
    memcpy(ax, o->grad_output, w->nd * sizeof(float));
    rc = ode_backward(s, m, o, w, last, ax, e);
  }
  if (rc == ERR_OK) {
    o->replay_err = rel_l2(last, o->noise, w->nd);
    if (o->grad_noise)
      memcpy(o->grad_noise, ax, w->nd * sizeof(float));
  }
  free(x), free(last), free(ax);
  return rc;
}

static int adjoint_continuous(const sampler *s, const model *m, adjoint_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  sweep w = {.d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size,
             .guided = guidance_passes(o->guidance) == 2};
  w.nd = (size_t)o->batch * w.d;
  if (o->grad_class)
    memset(o->grad_class, 0, (size_t)o->batch * mi->class_embed_dim * sizeof(float));
  int rc = sweep_new(&w, m, o, e);
  if (rc == ERR_OK)
    rc = continuous_run(s, m, o, &w, e);
  sweep_free(&w);
  return rc;
}

int adjoint_run(const sampler *s, const model *m, adjoint_opts *o, err *e) {
  o->replay_err = 0;
  int rc = check_opts(s, m, o, e);
  if (rc != ERR_OK)
    return rc;
  if (o->method == ADJOINT_CONTINUOUS)
    return adjoint_continuous(s, m, o, e);
  const model_info *mi = model_get_info(m);
  const int N = s->n_evals;
  sweep w = {.d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size,
             .guided = guidance_passes(o->guidance) == 2};
  w.nd = (size_t)o->batch * w.d;
  float *states = mem_malloc((size_t)N * w.nd * sizeof(float));
  float *sample = mem_malloc(w.nd * sizeof(float));
  lin_step *Ls = mem_calloc((size_t)N, sizeof *Ls);
  if (!states || !sample || !Ls)
    rc = err_set(e, ERR_NOMEM, "out of memory for %d states of a batch of %d", N, o->batch);
  fwd_progress fp = {o, 2 * N};
  const sampler_run_opts ro = {.batch = o->batch,
                               .init_noise = o->noise,
                               .labels = o->labels,
                               .guidance = o->guidance,
                               .threads = o->threads,
                               .cancel = o->cancel,
                               .progress = o->progress ? on_forward : NULL,
                               .progress_user = &fp,
                               .states = states};
  if (rc == ERR_OK)
    rc = sampler_run(s, m, &ro, sample, NULL, e);
  for (int k = 0; rc == ERR_OK && k < N; k++)
    step_coefs(s, k, &Ls[k]);
  if (rc == ERR_OK && o->grad_class)
    memset(o->grad_class, 0, (size_t)o->batch * mi->class_embed_dim * sizeof(float));
  if (rc == ERR_OK)
    rc = sweep_new(&w, m, o, e);
  if (rc == ERR_OK)
    rc = backward_sweep(s, m, o, states, sample, Ls, &w, e);
  if (rc == ERR_OK && o->sample)
    memcpy(o->sample, sample, w.nd * sizeof(float));
  sweep_free(&w);
  free(states);
  free(sample);
  free(Ls);
  return rc;
}
