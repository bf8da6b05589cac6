/* The training noise schedule and the scheduler configuration every solver shares: diffusers'
 * scheduler_config.json keys with each diffusers scheduler's defaults, and the beta and
 * alpha_bar tables computed bit for bit the way diffusers computes them (torch float32 on CPU). */
#ifndef DENOISED_SCHEDULE_H
#define DENOISED_SCHEDULE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef enum {
  SCHED_BETA_LINEAR,
  SCHED_BETA_SCALED_LINEAR,
  SCHED_BETA_SQUAREDCOS_CAP_V2,
  SCHED_BETA_SIGMOID, /* DDPMScheduler only in diffusers */
} sched_beta_schedule;

typedef enum { SCHED_PRED_EPSILON, SCHED_PRED_SAMPLE, SCHED_PRED_V } sched_prediction;

typedef enum {
  SCHED_SPACING_LEADING,
  SCHED_SPACING_TRAILING,
  SCHED_SPACING_LINSPACE
} sched_spacing;

typedef enum {
  SCHED_VAR_FIXED_SMALL,
  SCHED_VAR_FIXED_SMALL_LOG,
  SCHED_VAR_FIXED_LARGE,
  SCHED_VAR_FIXED_LARGE_LOG,
  SCHED_VAR_LEARNED,
  SCHED_VAR_LEARNED_RANGE,
} sched_variance;

/* DPM-Solver family: diffusers' algorithm_type, plus DEISMultistepScheduler's own. */
typedef enum {
  SCHED_ALGO_DPMSOLVER,
  SCHED_ALGO_DPMSOLVER_PP,
  SCHED_ALGO_SDE_DPMSOLVER,
  SCHED_ALGO_SDE_DPMSOLVER_PP,
  SCHED_ALGO_DEIS,
} sched_algorithm;

/* solver_type: midpoint/heun (DPM-Solver), logrho (DEIS), bh1/bh2 (UniPC), and the official
 * DPM-Solver code's names dpmsolver/taylor (the DPM_Solver paper variants). */
typedef enum {
  SCHED_SOLVER_MIDPOINT,
  SCHED_SOLVER_HEUN,
  SCHED_SOLVER_LOGRHO,
  SCHED_SOLVER_BH1,
  SCHED_SOLVER_BH2,
  SCHED_SOLVER_DPMSOLVER,
  SCHED_SOLVER_TAYLOR,
} sched_solver_type;

typedef enum { SCHED_FINAL_ZERO, SCHED_FINAL_SIGMA_MIN } sched_final_sigmas;

/* The official DPM-Solver code's skip_type: how the time steps are spaced. */
typedef enum { SCHED_SKIP_TIME_UNIFORM, SCHED_SKIP_LOGSNR, SCHED_SKIP_TIME_QUADRATIC } sched_skip;

/* `method` of the paper variants: DPM_Solver's sample(method=...) and PNDM's --method. */
typedef enum {
  SCHED_METHOD_MULTISTEP,
  SCHED_METHOD_SINGLESTEP,
  SCHED_METHOD_SINGLESTEP_FIXED,
  SCHED_METHOD_ADAPTIVE,
  SCHED_METHOD_F_PNDM,
  SCHED_METHOD_S_PNDM,
} sched_method;

#define SCHED_NAME_MAX 64
#define SCHED_MAX_DISABLE_CORRECTOR 64

typedef struct sched_config {
  char scheduler[SCHED_NAME_MAX]; /* diffusers class whose defaults this config started from */
  int num_train_timesteps;
  double beta_start, beta_end;
  sched_beta_schedule beta_schedule;
  float *trained_betas; /* NULL or num_train_timesteps values; owned, see sched_config_free */
  int rescale_betas_zero_snr;
  sched_prediction prediction_type;
  sched_spacing timestep_spacing;
  int steps_offset;
  int set_alpha_to_one;
  int clip_sample;
  double clip_sample_range;
  int thresholding;
  double dynamic_thresholding_ratio;
  double sample_max_value;
  sched_variance variance_type;
  double eta; /* a step() argument in diffusers, kept here so requests set it like a key */
  /* multistep / singlestep solvers (DPMSolver*, UniPC, DEIS) */
  int solver_order;
  sched_algorithm algorithm_type;
  sched_solver_type solver_type;
  int lower_order_final;
  int euler_at_final;
  int use_karras_sigmas;
  int use_lu_lambdas;
  sched_final_sigmas final_sigmas_type;
  double lambda_min_clipped;   /* -INFINITY: no clipping (JSON null) */
  double sigma_min, sigma_max; /* Karras range override (UniPC, Euler); NAN: None */
  int predict_x0;              /* UniPC */
  int n_disable_corrector;     /* UniPC: steps whose corrector is skipped */
  int disable_corrector[SCHED_MAX_DISABLE_CORRECTOR];
  int skip_prk_steps; /* PNDM */
  /* the paper variants (official DPM-Solver and PNDM code), engine keys */
  sched_method method;
  sched_skip skip_type;
  int denoise_to_zero;
  double rtol, atol, h_init, theta, t_err; /* DPM-Solver-12/23 step size control */
  double thresholding_max_val;             /* the paper's dynamic thresholding floor */
  /* DPM-Solver-v3 (the authors' sample() arguments) */
  int use_corrector, predictor_pseudo, corrector_pseudo;
} sched_config;

/* Fills cfg with the defaults of scheduler `name`: a diffusers class name ("DDIMScheduler"), one
 * of the engine's paper-variant classes ("DPM_Solver", "PNDM_Official") or a short name ("ddim",
 * "ddpm", "pndm"); NULL means DDPMScheduler. Overwrites cfg without freeing it:
 * sched_config_free a config that may hold trained_betas first. */
int sched_config_init(sched_config *cfg, const char *name, err *e);
void sched_config_free(sched_config *cfg);
int sched_config_copy(sched_config *dst, const sched_config *src, err *e);

/* sched_config_init(name) then sched_config_apply_json(obj). With name NULL the object's
 * "_class_name" picks the defaults. `strict` is for input typed by a user: keys that no diffusers
 * scheduler has are then an error; from a model's file they are ignored, as diffusers does. */
int sched_config_from_json(const json_t *obj, const char *name, int strict, sched_config *out,
                           err *e);
int sched_config_load_file(const char *path, const char *name, int strict, sched_config *out,
                           err *e);
/* A scheduler_config.json as a JSON object (new reference, NULL on error), reading Python's
 * -Infinity/Infinity/NaN (which diffusers writes, e.g. lambda_min_clipped) as null. */
json_t *sched_config_read_json(const char *path, err *e);

/* Layers the keys of obj onto cfg. Keys starting with '_' are bookkeeping and skipped; keys of
 * other diffusers schedulers are accepted (a DDPM config drives DDIM) and those this engine
 * does not model are ignored. Every value of a modelled key is validated, errors name the key.
 * On error cfg is left unchanged. */
int sched_config_apply_json(sched_config *cfg, const json_t *obj, int strict, err *e);

/* One strict override from text, "KEY=VALUE" or key and value apart. The value is read as JSON
 * when it parses (1e-4, true, null, [..]), as Python's True/False/None, else as a string. */
int sched_config_set(sched_config *cfg, const char *key, const char *value, err *e);
/* That reading of a VALUE text as a JSON value (new reference; NULL only when out of memory). */
json_t *sched_value_from_text(const char *value);
int sched_config_set_override(sched_config *cfg, const char *key_equals_value, err *e);

/* The range a numeric key accepts ("(0, 1)", "[0, 1]": an open end excludes its bound) into
 * buf; 0 if key has no range (not numeric, or not a key). Values outside are refused with the
 * key and the range in the message. */
int sched_key_range(const char *key, char *buf, size_t n);

/* The smallest alpha_bar a schedule may reach (sigma 1e15) before its last step (a zero-SNR
 * rescale ends on 0): sched_alphas_cumprod refuses schedules that fall below. */
#define SCHED_MIN_ALPHA_BAR 1e-30

/* Cross-key checks (trained_betas length against num_train_timesteps, ...). */
int sched_config_validate(const sched_config *cfg, err *e);

/* The config as a diffusers-style JSON object (new reference), e.g. for image metadata: every
 * modelled key. sched_config_to_json_for gives only the keys `class_name` reads. */
json_t *sched_config_to_json(const sched_config *cfg);
json_t *sched_config_to_json_for(const sched_config *cfg, const char *class_name);

/* Whether scheduler class `class_name` (as for sched_config_init) has config key `key`: the
 * arguments of the diffusers class's __init__ in current diffusers, plus eta for DDIM. */
int sched_class_has_key(const char *class_name, const char *key);
/* Whether any scheduler class (diffusers' or the engine's) has config key `key`. */
int sched_key_is_known(const char *key);
/* Keys this engine accepts only at diffusers' default (use_flow_sigmas, use_beta_sigmas, ...):
 * an error naming the key if obj sets one that class_name reads to anything else. */
int sched_check_unsupported(const json_t *obj, const char *class_name, err *e);

/* "an object", "a string", ... as every "expected X, got Y" message in the project names a JSON
 * value; the API's messages use it too, so that both layers word a type the same way. */
const char *sched_json_kind(const json_t *v);

const char *sched_prediction_name(sched_prediction p);
const char *sched_spacing_name(sched_spacing s);
const char *sched_variance_name(sched_variance v);
const char *sched_beta_schedule_name(sched_beta_schedule b);
const char *sched_algorithm_name(sched_algorithm a);
const char *sched_solver_type_name(sched_solver_type t);
const char *sched_final_sigmas_name(sched_final_sigmas f);
const char *sched_skip_name(sched_skip s);
const char *sched_method_name(sched_method m);

/* The training schedule, num_train_timesteps values each, as diffusers' float32 tensors:
 * betas, then alphas_cumprod (cumprod of 1 - beta, accumulated in double by torch and rounded
 * to float at every step). The _f64 variant returns those same float values widened. */
int sched_betas(const sched_config *cfg, float *betas, err *e);
int sched_alphas_cumprod(const sched_config *cfg, float *out, err *e);
int sched_alphas_cumprod_f64(const sched_config *cfg, double *out, err *e);

/* diffusers' set_timesteps(n) for the config's timestep_spacing and steps_offset: n descending
 * training timesteps into out[0..n). */
int sched_timesteps(const sched_config *cfg, int num_inference_steps, int64_t *out, err *e);

#endif
