/* The sampling loop and the solver family (diffusers' schedulers by class name or alias, and the
 * papers' own variants): a solver walks pure noise down to an image; the loop owns the model calls,
 * NFE counting, progress, cancellation and the random streams, solvers do the step arithmetic. */
#ifndef DENOISED_SAMPLER_H
#define DENOISED_SAMPLER_H

#include <jansson.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "guidance.h"
#include "model.h"
#include "schedule.h"

typedef struct sampler sampler;

/* The names sampler_new accepts besides the class names, for listings and help. */
int sampler_solver_count(void);
const char *sampler_solver_name(int i);
const char *sampler_solver_summary(int i);
/* The scheduler class a name or class name stands for ("dpm++2m" -> "DPMSolverMultistepScheduler";
 * "dpm-solver-fast" -> "DPM_Solver"), whose defaults the scheduler config is built with
 * (sched_config_init / sched_config_from_json); NULL if unknown. */
const char *sampler_solver_class(const char *name);
/* Default number of inference steps (diffusers' pipeline default), 0 if unknown. */
int sampler_solver_default_steps(const char *name);

/* A solver `name` for num_inference_steps steps (0: the solver's default) on the scheduler config
 * cfg, which is copied; the option values an alias stands for (dpm++3m: solver_order 3, ...)
 * replace cfg's. Invalid combinations are errors naming the keys. The result is read-only: one
 * sampler may serve any number of concurrent sampler_run calls. */
int sampler_new(const char *name, const sched_config *cfg, int num_inference_steps, sampler **out,
                err *e);

/* The one way requests (CLI, HTTP API) make a solver. spec is a JSON object:
 *   "name"    solver name or class name (default: model_config's "_class_name")
 *   "steps"   inference steps (default: the solver's diffusers default)
 *   "config"  a diffusers scheduler_config object layered on model_config: keys of other
 *             diffusers schedulers are ignored as from_config does, unknown keys are errors
 *   "options" scheduler config keys set explicitly: each must be one the solver reads, and
 *             may not contradict what the name stands for (dpm++2m with solver_order 3)
 * model_config is the model's scheduler_config.json object or NULL. Precedence, lowest first:
 * class defaults, the name's defaults, model_config, config, the name's fixed values, options. */
int sampler_new_from_json(const json_t *spec, const json_t *model_config, sampler **out, err *e);
void sampler_free(sampler *s);

const char *sampler_name(const sampler *s);
/* The solver data file the spec named ("data": DPM-Solver-v3 statistics, see README), or NULL. */
const char *sampler_data(const sampler *s);
/* The resolved scheduler config (new reference): the keys this solver reads, with
 * "_class_name"; sampler_new(name, config from it) rebuilds the same solver. */
json_t *sampler_config_json(const sampler *s);
const sched_config *sampler_config(const sampler *s);
int sampler_num_steps(const sampler *s);
/* Planned network evaluations per image for a whole run (PRK and Heun steps cost more than one,
 * singlestep and F-PNDM warm-ups too); 0 when data-dependent (dpm-solver-adaptive). */
int sampler_nfe(const sampler *s);
/* The timestep handed to the model at each planned evaluation, sampler_nfe values (fractional
 * for solvers on a sigma or lambda grid); NULL when data-dependent. */
const double *sampler_timesteps(const sampler *s);
/* Whether a run draws random noise after the initial x_T (DDPM, DDIM eta > 0, SDE, ancestral). */
int sampler_is_stochastic(const sampler *s);
/* 1 if the result is the clean end of the ODE (sigma 0, alpha_bar 1: the last step lands on the
 * model's x0 estimate), 0 if it stops at the first training timestep (alpha_bar[0]). */
int sampler_ends_clean(const sampler *s);

/* Called after every completed step: step counts 1..total, nfe the evaluations per image so far.
 * For a data-dependent solver total is 0 and step counts accepted steps. */
typedef void (*sampler_progress_fn)(int step, int total, int nfe, void *user);

/* Supplies the standard normal noise a stochastic step adds to one image: `image` is the rng
 * image index (first_image + position in the batch), `stream` is evaluation index + 1. The
 * default (NULL) is rng_normal(seed, image, stream, out, n); tests and inversion methods replace
 * it. */
typedef int (*sampler_noise_fn)(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                                err *e);

typedef struct sampler_run_opts {
  int batch;         /* images, >= 1 */
  int height, width; /* 0: the model's sample_size */
  uint64_t seed;
  uint64_t first_image;    /* rng image index of out[0], so a split batch reproduces */
  const float *init_noise; /* batch * C * H * W floats, or NULL: rng_normal(seed, image, 0) */
  const int64_t *labels;   /* one class per image, or NULL */
  /* The conditioning image of every evaluation, batch * cond_channels * H * W: required by an
   * image-conditioned model (model_info.cond_channels), refused otherwise. */
  const float *cond;
  /* Text-conditional models (model_info.cross_attention_dim > 0): the prompt's encoder hidden
   * states, one sequence [text_seq][cross_attention_dim] every image of the batch attends to. */
  const float *text_states;
  int text_seq;
  sampler_progress_fn progress;
  void *progress_user;
  sampler_noise_fn noise;
  void *noise_user;
  const atomic_int *cancel; /* checked before every evaluation; non-zero stops the run */
  int threads;              /* CPU threads for the model, >= 1 (0 means 1) */
  /* Classifier-free guidance of every evaluation (NULL: none); needs labels. */
  const guidance *guidance;
  /* Classifier guidance of every evaluation, after the classifier-free one (NULL: none):
   * guidance.h. Epsilon-predicting models and diffusers-style solvers only. */
  const classifier_guidance *classifier;
  /* Part of the schedule: steps [start_step, end_step) of sampler_num_steps (end_step 0: to
   * the end). With start_step > 0 (and no init_image) init_noise is required and is the state
   * at that step as the solver holds it (x_t at the step's level, VE-scaled for the Euler
   * family), not noise to scale. With end_step before the end, out receives the state there.
   * Multistep solvers start over at first order, as diffusers' do from a begin index. Not for
   * the papers' own loops (f-pndm, s-pndm, dpm-solver-fast/adaptive). */
  int start_step, end_step;
  /* img2img (SDEdit), batch * C * H * W values in [-1, 1]: the run starts at step
   * n - int(n * strength) (diffusers' get_timesteps) from the image noised to that step's level
   * with the initial noise (init_noise, else rng stream 0). strength in (0, 1]. */
  const float *init_image;
  double strength;
  /* Inpainting (with init_image): batch * H * W weights, 1 = generate, 0 = keep. After every
   * evaluation the kept part becomes init_image noised with the initial noise to the level of
   * the next evaluation (clean after the last): diffusers' inpainting pipeline for models
   * without mask channels, one fixed noise draw (no RePaint resampling). strength 1 starts
   * from pure noise, as there. */
  const float *mask;
  /* h-space edits (BoundaryDiffusion): the UNet's mid-block output to use instead of its own in
   * the run's first evaluation, guidance_passes * batch rows as guidance_eval_mid lays them out.
   * That evaluation must cover the whole batch (every solver's first step does). */
  const float *first_mid;
  /* If set, receives the state each evaluation of the run starts from (before any input
   * scaling), evaluation after evaluation: (evaluations run) * batch * C * H * W floats; what
   * the discrete adjoint (adjoint.h) keeps instead of the network's activations. diffusers-style
   * solvers only: the papers' own loops (solver_desc.run) leave it untouched. */
  float *states;
} sampler_run_opts;

/* Runs the whole chain; out receives batch * C * H * W floats (nominally in [-1, 1]) and *nfe
 * (if non-NULL) the network evaluations per image performed. One evaluation of the batch counts
 * as one NFE whatever its batch size (so a guided step that evaluates the conditional and the
 * unconditional pass as one batch of 2B counts once). Every image's result depends only on its
 * own noise, so a batch split into parts reproduces (dpm-solver-adaptive adapts per image; its
 * NFE is the most any image needed). A cancelled run returns ERR_CANCELLED with out holding the
 * last completed step's samples. */
int sampler_run(const sampler *s, const model *m, const sampler_run_opts *o, float *out, int *nfe,
                err *e);

/* What sampler_v3_stats_compute evaluates the model on. */
typedef struct sampler_v3_stats_opts {
  const float *x0; /* n * C * H * W data points in [-1, 1] */
  int n;           /* 2 <= n <= 64 */
  int K;           /* grid intervals */
  uint64_t seed;
  int threads;
  /* Class-conditional models: one class per data point (NULL for unconditional models), and
   * whether they are all one class (class_label, recorded: the statistics are that class's) or
   * spread over the classes (recorded as valid for any). */
  const int64_t *labels;
  int one_class;
  int64_t class_label;
  const guidance *guidance; /* classifier-free guidance of every evaluation, or NULL */
  sampler_progress_fn progress;
  void *progress_user;
} sampler_v3_stats_opts;

/* DPM-Solver-v3's empirical model statistics for model m, written as the statistics file
 * out_path (NAME.json + NAME.npy; README "DPM-Solver-v3"): l, s, b on a grid of K intervals
 * uniform in lambda over the range of s (a dpm-solver-v3 sampler: its schedule and prediction
 * type), from the n data points x0 noised with fresh noise of `seed` at every grid point. As the
 * authors' example script: l is the Hutchinson estimate of sigma diag(d eps / dx) (one Rademacher
 * probe per point), l' its central difference smoothed over +-5 grid points, s and b the
 * per-dimension least-squares fit of the lambda-derivative of f = (sigma eps - l x) / alpha along
 * the ODE; the Jacobian-vector products are central differences (step 5e-3). eps is the guided
 * model output when o->guidance is set (the statistics are per guidance scale). The header
 * (version 2) records what they were computed for: the model (class, size, channels, classes,
 * weights digest), the schedule's lambda range, the class and the guidance scale (1 for a
 * class-conditional model without guidance, null for an unconditional one), which
 * sampler_data_check holds runs to. 5 evaluations of the n points per grid point; progress gets
 * (done, total) over the 2 (K + 1) grid passes. */
int sampler_v3_stats_compute(const model *m, const sampler *s, const sampler_v3_stats_opts *o,
                             const char *out_path, err *e);

/* ---- DPM-OT (sampler_ot.c): the semi-discrete transport map from U[0, 1]^d to noised data
 * latents at step `step` of a solver, and `--scheduler dpm-ot`, which maps and then runs the
 * remaining steps ---- */
/* Fills out (count floats) with source batch `batch` of fit iteration `iteration`. */
typedef int (*sampler_ot_source_fn)(void *user, int iteration, int batch, float *out, size_t count,
                                    err *e);
typedef struct sampler_ot_fit_opts {
  int max_iter;  /* iterations */
  double lr;     /* the authors' 0.1 */
  int batch;     /* source points per batch; 10 N / batch batches per iteration */
  uint64_t seed; /* of the default source, U[0, 1]^d from rng_uniform(seed, iteration, batch) */
  sampler_ot_source_fn source; /* NULL: the default */
  void *source_user;
  sampler_progress_fn progress; /* (iteration, max_iter, 0) */
  void *progress_user;
} sampler_ot_fit_opts;
typedef struct sampler_ot_fit_report {
  int iterations, empty, doublings;
  double g_norm, lr;
  long long samples; /* source points per iteration at the end */
} sampler_ot_fit_report;
/* The authors' dual solve for the intercepts h (n, in: the start, usually 0; out: the result)
 * of u_h(x) = max_i <x, y_i> + h_i with equal target weights. */
int sampler_ot_fit(const float *targets, int n, size_t d, const sampler_ot_fit_opts *o, float *h,
                   sampler_ot_fit_report *rep, err *e);
/* idx[j] = argmax_i <x_j, y_i> + h_i (float32, first on ties) for m points x. */
int sampler_ot_assign(const float *targets, const float *h, int n, size_t d, const float *x, int m,
                      int *idx, err *e);
/* Writes the map: header (given fields kept; format, arrays, targets, shape added) at path
 * NAME.json, targets NAME.npy and h NAME.h.npy beside it. */
int sampler_ot_write(const char *path, json_t *header, const float *targets, const float *h, int n,
                     const int shape[3], err *e);
/* Whether solver s can carry a map at step `step` (deterministic, one evaluation per step, VP
 * latents), with the reason if not. */
int sampler_ot_solver_ok(const sampler *s, int step, err *e);
/* alpha_bar at the start of step `step` of s (the level the map's targets are noised to). */
double sampler_ot_abar(const sampler *s, int step);

/* ---- S^3-style search for a USF schedule (sampler_search.c) ---- */
typedef struct sampler_search_opts {
  int nfe, budget, population, ref_steps;
  /* the search noise: batch, seed (held-out noise: seed + 1), labels, guidance, threads */
  sampler_run_opts run;
  const char *state_path; /* every candidate tried, rewritten after each (resume reads it) */
  int resume;
  /* after each candidate: (tried, budget, its score, the best so far) */
  void (*progress)(int tried, int budget, double score, double best, void *user);
  void *progress_user;
} sampler_search_opts;
typedef struct sampler_search_result {
  json_t *schedule;           /* the best USF schedule (new reference) */
  double score;               /* its relative L2 error on the search noise */
  double heldout, heldout_2m; /* on held-out noise: it, and lambda-uniform DPM-Solver++(2M) */
  int tried;
} sampler_search_result;
int sampler_search(const model *m, const json_t *model_config, const sampler_search_opts *o,
                   sampler_search_result *res, err *e);

/* ---- solver data kept beside a model: MODEL/solver_data/NAME.json (+ its arrays) ---- */

#define SAMPLER_DATA_DIR "solver_data"
#define SAMPLER_DATA_NAME_MAX 64
/* Whether text names solver data rather than a file: no '/' and no ".json" ending. */
int sampler_data_is_name(const char *text);
/* A valid name: 1 to SAMPLER_DATA_NAME_MAX characters of [A-Za-z0-9._-], the first a letter or
 * digit (so no hidden file, no "..") and not ending in ".json". */
int sampler_data_name_ok(const char *name);
/* MODEL/solver_data/NAME.json for a name of the model in folder model_dir. ERR_INVALID for a bad
 * name (the rule above) or one the folder does not have; the message lists the names it has
 * and never the folder's path (it reaches HTTP clients). */
int sampler_data_path(const char *model_dir, const char *name, char *path, size_t n, err *e);
/* The solver data of the model in model_dir, sorted by name (new reference; an empty array
 * without the folder): per entry name, kind ("dpm-solver-v3-stats"), version, grid, shape,
 * data points, and what it was computed for (class_label and guidance_scale, null for "any" /
 * unguided; null both for a version 1 header, which records nothing). Files that are not solver
 * data headers are left out. */
json_t *sampler_data_list(const char *model_dir, err *e);
/* Holds a run on model m (guidance g or NULL, batch labels or NULL) to what the solver data of s
 * was computed for: the model (weights digest, else class, size, channels), the schedule's
 * lambda range, the class (every label that one, when recorded) and the guidance scale (and null
 * class). A version 1 header records nothing: it is taken on trust for unguided runs (only its
 * shape and lambda range are checked, at load and run) and refused for guided ones. ERR_OK
 * without data; else ERR_INVALID naming the file and both sides of the mismatch. */
int sampler_data_check(const sampler *s, const model *m, const guidance *g, const int64_t *labels,
                       int batch, err *e);

/* The first step a run with img2img strength `strength` performs (n - int(n * strength)); an
 * error if that leaves no step. */
int sampler_strength_start(const sampler *s, double strength, int *start_step, err *e);

/* Whether sampler_run would accept an init image (img2img or inpainting) at this strength:
 * the solver supports partial runs and the strength leaves a step. For request validation. */
int sampler_check_img2img(const sampler *s, double strength, err *e);

/* The state a solver holds at the input of step k (0 <= k <= sampler_num_steps; k = n is the
 * end): x = a * x0 + b * eps. VP solvers give (sqrt(abar), sqrt(1 - abar)), the Euler family
 * (1, sigma); the end is (1, 0) however the schedule ends. */
void sampler_step_level(const sampler *s, int k, float *a, float *b);

/* The training schedule: num_train_timesteps alphas_cumprod in float32, as the scheduler
 * class holds them. */
const float *sampler_alphas_cumprod(const sampler *s);
int sampler_train_timesteps(const sampler *s);

/* DDIM solvers only: step k of one image split as x_prev = mean + std * z (z the noise an
 * eta > 0 step draws), from x at the step's timestep and the (guided) model output mo, in the
 * float operations the sampler uses, so x_prev = mean + std * z computed by the caller is
 * bit-identical to the sampler's result for that z. scratch: 3 d floats. */
int sampler_ddim_split(const sampler *s, int k, const float *x, const float *mo, size_t d,
                       float *mean, float *std, float *scratch, err *e);

#endif
