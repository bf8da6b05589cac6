/* Internal to the sampler module (sampler*.c): the solver interface and the helpers the solver
 * files share. Nothing outside engine/sampler*.c includes this. */
#ifndef DENOISED_SAMPLER_IMPL_H
#define DENOISED_SAMPLER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "sampler.h"

typedef struct run_ctx run_ctx;

#define SAMPLER_MAX_BUF 8
#define SAMPLER_MAX_ORDER 3

/* The per-run state of the step() solvers, one typed struct per family. It is zeroed per run and
 * its arrays are solver_desc.nbuf buffers of batch * d floats that solver_desc.bind hands out. */

/* DPMSolverMultistep, DPMSolverSinglestep, UniPC, DEIS. */
typedef struct multistep_state {
  float *outputs[SAMPLER_MAX_ORDER]; /* diffusers' model_outputs, oldest first (solver_order) */
  int lower_order_nums; /* steps so far, up to the order (singlestep: outputs that are not None) */
  float *sample;        /* singlestep: self.sample, x at the start of the segment */
  float *d2;            /* singlestep, third order: the second difference */
  float *last_sample;   /* UniPC: x before the predictor, which the next corrector starts from */
  int has_last;         /* UniPC: last_sample is set */
  int this_order;       /* UniPC: the order of the last predictor */
} multistep_state;

/* PNDMScheduler. */
typedef struct pndm_state {
  float *ets[4]; /* the last model outputs, oldest first; n_ets of them */
  int n_ets;
  float *cur_model_output, *cur_sample; /* the Runge-Kutta warm-up's running sum and its x */
} pndm_state;

/* HeunDiscreteScheduler. */
typedef struct heun_state {
  int second; /* the next evaluation is the second of a step (diffusers: not state_in_first_order)
               */
  float *prev_derivative, *prev_sample;
} heun_state;

/* What one step of a diffusers-style solver sees: the whole batch after the model evaluation
 * number i, scratch space and the per-run state. */
typedef struct step_ctx {
  int i; /* evaluation index, 0 .. n_evals-1 */
  int batch;
  size_t d;         /* values per image */
  float *x;         /* batch * d, updated in place */
  const float *mo;  /* model output, mo_stride values per image */
  size_t mo_stride; /* d, except for DDPM with a learned variance (2 d) */
  float *x0;        /* d scratch (DDPM/DDIM) */
  float *noise;     /* batch * d scratch */
  float *sel;       /* d scratch for the thresholding quantile */
  float *tmp[3];    /* batch * d scratch each */
  union {
    multistep_state ms;
    pndm_state pndm;
    heun_state heun;
  } st; /* the solver's state, zeroed per run */
  const sampler_run_opts *o;
  run_ctx *run;
  int i0; /* the run's first evaluation (a later start restarts counters such as PNDM's) */
} step_ctx;

typedef struct solver_desc {
  const char *name;       /* implementation id */
  const char *class_name; /* scheduler class whose keys it reads */
  int default_steps;
  /* Validates the config for this solver and fills the plan (n_evals, tm, step_end, ...). */
  int (*prepare)(sampler *s, err *e);
  /* diffusers-style: called after each planned evaluation, like Scheduler.step() */
  int (*step)(const sampler *s, step_ctx *c, err *e);
  /* or a loop of its own (the official-code variants): x holds x_T on entry */
  int (*run)(const sampler *s, run_ctx *r, float *x, err *e);
  int nbuf; /* state buffers of batch * d floats for step() */
  int stochastic_always;
  /* Hands the nbuf zeroed buffers to the fields of step_ctx.st, once per run; NULL if none. */
  void (*bind)(const sampler *s, step_ctx *c, float *const *bufs);
} solver_desc;

struct sampler {
  const solver_desc *desc;
  char name[SCHED_NAME_MAX];
  sched_config cfg;
  int T;                   /* num_train_timesteps */
  float *abar;             /* alphas_cumprod as the class holds it (float32) */
  int n;                   /* num_inference_steps */
  int n_evals;             /* planned evaluations; 0 when data-dependent */
  double *tm;              /* n_evals model timesteps */
  float *in_div;           /* n_evals divisors of the model input, or NULL */
  unsigned char *step_end; /* n_evals: a user-visible step ends with this evaluation */
  float init_sigma;        /* x_T = noise * init_sigma (Euler family), else 1 */
  int stochastic;
  int ends_clean; /* the last step lands on sigma 0 (alpha_bar 1), not on alpha_bar[0] */
  /* solver data, owned */
  int64_t *ts, *prev; /* integer timesteps (DDPM/DDIM/PNDM) */
  float *sigmas;      /* sigma grid (n_sigmas) */
  int n_sigmas;
  int *orders;     /* per-evaluation orders (singlestep) */
  double *lambdas; /* DPM_Solver: lambda at the training timesteps, clipped (n_lambdas) */
  int n_lambdas;
  struct v3_stats *v3;      /* DPM-Solver-v3: the empirical model statistics, owned */
  char *data;               /* the statistics file's path as given, owned, or NULL */
  struct usf_schedule *usf; /* USF: the solver schedule, owned */
  /* What the data was computed for (the statistics header's "computed_for": model, schedule,
   * class, guidance), owned; NULL for a version 1 header, which records nothing. */
  json_t *data_for;
  struct ot_map *ot; /* DPM-OT: the transport map, owned (the solver is the map's inner one) */
  json_t *ot_header; /* its header, owned */
};

/* ---- sampler_paper.c: the official DPM-Solver code's continuous schedule, labels u in
 * [0, n_lambdas - 1] (the training timesteps, the tail below lambda_min_clipped dropped) ---- */
int paper_lam_table(sampler *s, err *e); /* fills s->lambdas */
double paper_lam_at(const sampler *s, double u);
double paper_u_of_lam(const sampler *s, double lam);
double paper_t_of(const sampler *s, double u); /* the official continuous time (u + 1) / Tc */
double paper_u_of_t(const sampler *s, double t);

/* ---- sampler_v3.c ---- */
/* The statistics and the prefix integrals of the update (also read by sampler_usf.c's v3-type
 * steps). */
typedef struct v3_stats {
  int K;               /* grid intervals: K + 1 points */
  size_t dd;           /* values per grid point: C*H*W, or 1 for flat statistics */
  int shape[3];        /* C, H, W (0 for flat) */
  double lam_T, lam_0; /* grid ends, lam_T < lam_0 */
  double *lam;         /* K + 1 */
  /* (K + 1) * dd each: l, and the prefix integrals from lam_T */
  double *l, *L, *S, *I, *B, *C;
} v3_stats;
/* Dynamic thresholding of the data prediction for v3 and USF (a deviation from both authors'
 * codes, where the model's config asks): x0 = (x - sigma eps) / alpha of each image (d values
 * of nd) at lambda thresholded as diffusers does, eps recomputed where x0 changed. of: nd float
 * scratch, sel: d. */
void sampler_threshold_eps(const sched_config *cfg, size_t d, size_t nd, const double *x,
                           double lam, float *of, float *sel, double *eps);
/* Loads a statistics file (sampler.h: the "data" of a v3 solver spec) into s->v3. */
int sampler_v3_attach(sampler *s, const char *path, err *e);
void sampler_v3_free(struct v3_stats *st);

/* ---- sampler_usf.c ---- */
/* Loads a USF solver schedule (the "data" of a usf solver spec; README) into s->usf, and the
 * DPM-Solver-v3 statistics it names into s->v3. */
int sampler_usf_attach(sampler *s, const char *path, err *e);

/* ---- sampler_ot.c: DPM-OT ---- */
typedef struct ot_map {
  int n, step;    /* targets; the inner solver's step they are latents of */
  int shape[3];   /* C, H, W */
  size_t d;       /* C * H * W */
  float *targets; /* n * d */
  float *h;       /* n: the Brenier potential's intercepts */
} ot_map;
void sampler_ot_free(struct ot_map *m);
/* The solver the map at path names, with the map attached. */
int sampler_ot_new(const char *path, const json_t *model_config, sampler **out, err *e);
/* The start of a DPM-OT run: each image's source point mapped to its target (x: batch * d). */
int sampler_ot_start(const sampler *s, const sampler_run_opts *o, size_t d, float *x, err *e);
void sampler_usf_free(struct usf_schedule *u);

/* ---- sampler.c ---- */
/* Model evaluation of the whole batch at one timestep, counted and cancellable. */
int sampler_eval_all(run_ctx *r, int step, const float *x, double t, float *out, err *e);
/* Evaluation of n images of the batch (rows[k] is the batch index of x's k-th image, or rows
 * NULL for the first n, t[k] its timestep); counts one NFE. out gets n * d values: the model's
 * prediction without a learned-variance half. For custom loops (solver_desc.run) only. */
int sampler_eval_rows(run_ctx *r, int step, const float *x, int n, const int *rows, const double *t,
                      float *out, err *e);
int sampler_run_batch(const run_ctx *r);
size_t sampler_run_d(const run_ctx *r);
int sampler_run_nfe(const run_ctx *r);
void sampler_report(run_ctx *r, int step, int total);
/* The standard normal noise of image b for evaluation index i (stream i + 1). */
int sampler_noise(const step_ctx *c, int b, float *out, err *e);

/* The scale s of diffusers' _threshold_sample for one image (x0 unchanged; sel d scratch). */
float sampler_threshold_scale(const sched_config *cfg, const float *x0, size_t d, float *sel);
/* diffusers' _threshold_sample on one image: s = quantile(|x0|, ratio), clamped to
 * [1, sample_max_value]. */
void sampler_threshold_diffusers(const sched_config *cfg, float *x0, size_t d, float *sel);
/* The official DPM-Solver code's: s = max(quantile(|x0|, ratio), thresholding_max_val). */
void sampler_threshold_paper(const sched_config *cfg, float *x0, size_t d, float *sel);

/* Allocation helpers for prepare(): set s->n_evals and allocate tm/step_end (zeroed). */
int sampler_plan(sampler *s, int n_evals, int with_in_div, err *e);

/* alpha_bar at a possibly fractional timestep, the way diffusers' fractional timesteps are read
 * (log sigma interpolated linearly between integer timesteps, the inverse of _sigma_to_t; the
 * GaussianMixtureDenoiser reads them the same way). The paper variants solve the ODE of this
 * continuous schedule, so every fractional timestep they pass means what they assume. */
double sampler_abar_at(const sampler *s, double t);

/* The training sigmas sqrt((1 - abar) / abar) in float32 as torch computes them. */
float sampler_sigma_of(const sampler *s, int t);

/* Solvers of the other files. */
extern const solver_desc solver_pndm, solver_dpm_multistep, solver_dpm_singlestep, solver_unipc,
    solver_deis, solver_euler, solver_euler_a, solver_heun, solver_pndm_official,
    solver_dpm_official, solver_dpm_v3, solver_usf, solver_dpm_ot;

/* Shared by the sigma-grid solvers (sampler_dpm.c, sampler_karras.c). */
/* numpy's linspace(start, stop, n)[i] */
double np_linspace_at(double start, double stop, int n, int i);
/* diffusers' _sigma_to_t against the float32 training sigmas. */
double sampler_sigma_to_t(const sampler *s, double sigma);
/* _convert_to_karras: n sigmas from sigma_max down to sigma_min (rho 7), float64. */
void sampler_karras(double sigma_min, double sigma_max, int n, double *out);
/* np.interp(t, arange(T), sigmas) of the float32 training sigmas. */
double sampler_sigma_interp(const sampler *s, double t);

#endif
