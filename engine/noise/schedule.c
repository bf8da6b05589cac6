/* Scheduler configuration (diffusers' scheduler_config.json semantics) and the training noise
 * schedule. The float32 tables reproduce torch 1.13's CPU kernels exactly, because a one-ulp
 * difference in alpha_bar shows up as a mismatch against diffusers in every later step. */
#include "schedule.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Defaults that differ between diffusers schedulers; everything else is shared. */
typedef struct sched_defaults {
  const char *class_name;
  const char *alias; /* the engine's short solver name, or NULL */
  double beta_start, beta_end;
  sched_beta_schedule beta_schedule;
  sched_spacing spacing;
  int set_alpha_to_one;
  int clip_sample; /* 0 also where the class has no clip_sample key: it never clips */
  sched_algorithm algorithm;
  sched_solver_type solver_type;
  int lower_order_final;
  sched_method method;
} sched_defaults;

#define LIN 1e-4, 0.02, SCHED_BETA_LINEAR
#define DPMPP SCHED_ALGO_DPMSOLVER_PP
#define MID SCHED_SOLVER_MIDPOINT
#define MS SCHED_METHOD_MULTISTEP
static const sched_defaults sched_table[] = {
    {"DDPMScheduler", "ddpm", LIN, SCHED_SPACING_LEADING, 0, 1, DPMPP, MID, 1, MS},
    {"DDIMScheduler", "ddim", LIN, SCHED_SPACING_LEADING, 1, 1, DPMPP, MID, 1, MS},
    {"PNDMScheduler", "pndm", LIN, SCHED_SPACING_LEADING, 0, 0, DPMPP, MID, 1, MS},
    {"DPMSolverMultistepScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    /* singlestep: lower_order_final defaults to False */
    {"DPMSolverSinglestepScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 0, MS},
    {"UniPCMultistepScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, SCHED_SOLVER_BH2, 1,
     MS},
    {"DEISMultistepScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, SCHED_ALGO_DEIS,
     SCHED_SOLVER_LOGRHO, 1, MS},
    {"EulerDiscreteScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    {"EulerAncestralDiscreteScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    {"LMSDiscreteScheduler", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    {"HeunDiscreteScheduler", NULL, 0.00085, 0.012, SCHED_BETA_LINEAR, SCHED_SPACING_LINSPACE, 0, 0,
     DPMPP, MID, 1, MS},
    {"KDPM2DiscreteScheduler", NULL, 0.00085, 0.012, SCHED_BETA_LINEAR, SCHED_SPACING_LINSPACE, 0,
     0, DPMPP, MID, 1, MS},
    {"KDPM2AncestralDiscreteScheduler", NULL, 0.00085, 0.012, SCHED_BETA_LINEAR,
     SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    /* the official DPM-Solver code (dpm_solver_pytorch.DPM_Solver.sample defaults) */
    {"DPM_Solver", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, SCHED_SOLVER_DPMSOLVER, 1, MS},
    /* the official PNDM code (runner/method.py), F-PNDM by default */
    {"PNDM_Official", NULL, LIN, SCHED_SPACING_LEADING, 0, 0, DPMPP, MID, 1, SCHED_METHOD_F_PNDM},
};
#undef LIN
#undef DPMPP
#undef MID
#undef MS

/* Every __init__ argument of a diffusers scheduler class (releases 0.21 to current main), plus
 * keys that older releases wrote into hub configs. A model's config may carry any of them. */
static const char *const sched_known_keys[] = {
    "algorithm_type",
    "alpha_cum_end",
    "alpha_cum_start",
    "base_image_seq_len",
    "base_shift",
    "beta_end",
    "beta_max",
    "beta_min",
    "beta_schedule",
    "beta_start",
    "block_length",
    "clip_denoised",
    "clip_sample",
    "clip_sample_range",
    "correct_steps",
    "corrector_k",
    "corrector_order",
    "corrector_selection",
    "corrector_selection_tau",
    "corrector_steps",
    "disable_corrector",
    "dtype",
    "dynamic_thresholding_ratio",
    "editing_threshold",
    "entropy_bound",
    "eta",
    "euler_at_final",
    "final_sigmas_type",
    "flow_shift",
    "gamma",
    "gamma_cum_end",
    "gamma_cum_start",
    "interpolation_type",
    "invert_sigmas",
    "lambda_min_clipped",
    "lower_order_final",
    "mask_token_id",
    "masking_schedule",
    "max_image_seq_len",
    "max_shift",
    "minimal_topk",
    "noise_sampler_seed",
    "num_inference_steps",
    "num_train_timesteps",
    "num_vec_classes",
    "original_inference_steps",
    "predict_x0",
    "prediction_type",
    "predictor_order",
    "rescale_betas_zero_snr",
    "rho",
    "s",
    "s_churn",
    "s_max",
    "s_min",
    "s_noise",
    "sample_max_value",
    "sampling_eps",
    "scale_factors",
    "scaler",
    "scheduler_type",
    "set_alpha_to_one",
    "shift",
    "shift_terminal",
    "sigma_data",
    "sigma_max",
    "sigma_min",
    "sigma_schedule",
    "skip_prk_steps",
    "snr",
    "snr_shift_scale",
    "solver_order",
    "solver_p",
    "solver_type",
    "stage_range",
    "stages",
    "steps_offset",
    "stochastic_sampling",
    "t_max",
    "t_min",
    "tau_func",
    "threshold",
    "thresholding",
    "time_shift_type",
    "timestep_scaling",
    "timestep_spacing",
    "timestep_type",
    "trained_betas",
    "upscale_mode",
    "use_beta_sigmas",
    "use_dynamic_shifting",
    "use_exponential_sigmas",
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_lu_lambdas",
    "variance_type",
    /* the engine's paper-variant solvers (official DPM-Solver and PNDM code) */
    "atol",
    "denoise_to_zero",
    "h_init",
    "method",
    "rtol",
    "skip_type",
    "t_err",
    "theta",
    "thresholding_max_val",
    /* legacy (diffusers <= 0.12) */
    "predict_epsilon",
    "tensor_format",
};

/* The keys each class reads beyond the six all have (num_train_timesteps, beta_start,
 * beta_end, beta_schedule, trained_betas, prediction_type): the arguments of its __init__ in
 * current diffusers. eta is a DDIM step() argument the engine takes as a key. */
static const char *const common_keys[] = {
    "num_train_timesteps", "beta_start",      "beta_end", "beta_schedule",
    "trained_betas",       "prediction_type", NULL};
#define THRESH "thresholding", "dynamic_thresholding_ratio", "sample_max_value"
#define SIGMAS "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"
#define FLOW "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type"
static const char *const keys_ddpm[] = {
    "variance_type",    "clip_sample",  "clip_sample_range",      THRESH,
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", NULL};
static const char *const keys_ddim[] = {
    "clip_sample",      "set_alpha_to_one",       "steps_offset", THRESH, "clip_sample_range",
    "timestep_spacing", "rescale_betas_zero_snr", "eta",          NULL};
static const char *const keys_pndm[] = {"skip_prk_steps", "set_alpha_to_one", "timestep_spacing",
                                        "steps_offset", NULL};
static const char *const keys_dpm_multi[] = {"solver_order",
                                             THRESH,
                                             "algorithm_type",
                                             "solver_type",
                                             "lower_order_final",
                                             "euler_at_final",
                                             SIGMAS,
                                             "use_lu_lambdas",
                                             FLOW,
                                             "final_sigmas_type",
                                             "lambda_min_clipped",
                                             "variance_type",
                                             "timestep_spacing",
                                             "steps_offset",
                                             "rescale_betas_zero_snr",
                                             NULL};
static const char *const keys_dpm_single[] = {"solver_order",
                                              THRESH,
                                              "algorithm_type",
                                              "solver_type",
                                              "lower_order_final",
                                              SIGMAS,
                                              FLOW,
                                              "final_sigmas_type",
                                              "lambda_min_clipped",
                                              "variance_type",
                                              NULL};
static const char *const keys_unipc[] = {"solver_order",
                                         THRESH,
                                         "predict_x0",
                                         "solver_type",
                                         "lower_order_final",
                                         "disable_corrector",
                                         "solver_p",
                                         SIGMAS,
                                         FLOW,
                                         "timestep_spacing",
                                         "steps_offset",
                                         "final_sigmas_type",
                                         "rescale_betas_zero_snr",
                                         "sigma_min",
                                         "sigma_max",
                                         "shift_terminal",
                                         NULL};
static const char *const keys_deis[] = {
    "solver_order", THRESH, "algorithm_type",   "solver_type",  "lower_order_final",
    SIGMAS,         FLOW,   "timestep_spacing", "steps_offset", NULL};
static const char *const keys_euler[] = {"interpolation_type", SIGMAS,
                                         "sigma_min",          "sigma_max",
                                         "timestep_spacing",   "timestep_type",
                                         "steps_offset",       "rescale_betas_zero_snr",
                                         "final_sigmas_type",  NULL};
static const char *const keys_euler_a[] = {"timestep_spacing", "steps_offset",
                                           "rescale_betas_zero_snr", NULL};
static const char *const keys_heun[] = {
    SIGMAS, "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset", NULL};
static const char *const keys_dpm_official[] = {"solver_order",
                                                "algorithm_type",
                                                "solver_type",
                                                "method",
                                                "skip_type",
                                                "lower_order_final",
                                                "denoise_to_zero",
                                                "thresholding",
                                                "dynamic_thresholding_ratio",
                                                "thresholding_max_val",
                                                "rtol",
                                                "atol",
                                                "h_init",
                                                "theta",
                                                "t_err",
                                                "lambda_min_clipped",
                                                NULL};
static const char *const keys_pndm_official[] = {"method", "timestep_spacing", "steps_offset",
                                                 "set_alpha_to_one", NULL};
static const char *const keys_none[] = {NULL};
#undef THRESH
#undef SIGMAS
#undef FLOW

static const struct {
  const char *class_name;
  const char *const *keys;
} class_keys[] = {
    {"DDPMScheduler", keys_ddpm},
    {"DDIMScheduler", keys_ddim},
    {"PNDMScheduler", keys_pndm},
    {"DPMSolverMultistepScheduler", keys_dpm_multi},
    {"DPMSolverSinglestepScheduler", keys_dpm_single},
    {"UniPCMultistepScheduler", keys_unipc},
    {"DEISMultistepScheduler", keys_deis},
    {"EulerDiscreteScheduler", keys_euler},
    {"EulerAncestralDiscreteScheduler", keys_euler_a},
    {"HeunDiscreteScheduler", keys_heun},
    {"DPM_Solver", keys_dpm_official},
    {"PNDM_Official", keys_pndm_official},
};

/* Keys whose diffusers features this engine does not implement: only the default (or null) is
 * accepted where the class reads them. Text is the default as JSON. */
static const struct {
  const char *key, *json_default;
} default_only_keys[] = {
    {"use_exponential_sigmas", "false"},
    {"use_beta_sigmas", "false"},
    {"use_flow_sigmas", "false"},
    {"use_dynamic_shifting", "false"},
    {"time_shift_type", "\"exponential\""},
    {"solver_p", "null"},
    {"shift_terminal", "null"},
    {"interpolation_type", "\"linear\""},
    {"timestep_type", "\"discrete\""},
};

/* Guards against configs that would make the tables absurdly large. */
#define SCHED_MAX_TRAIN_TIMESTEPS 1000000

static const char *const beta_names[] = {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"};
static const char *const pred_names[] = {"epsilon", "sample", "v_prediction"};
static const char *const spacing_names[] = {"leading", "trailing", "linspace"};
static const char *const variance_names[] = {"fixed_small",     "fixed_small_log", "fixed_large",
                                             "fixed_large_log", "learned",         "learned_range"};
static const char *const algorithm_names[] = {"dpmsolver", "dpmsolver++", "sde-dpmsolver",
                                              "sde-dpmsolver++", "deis"};
static const char *const solver_type_names[] = {"midpoint", "heun",      "logrho", "bh1",
                                                "bh2",      "dpmsolver", "taylor"};
static const char *const final_sigmas_names[] = {"zero", "sigma_min"};
static const char *const skip_names[] = {"time_uniform", "logSNR", "time_quadratic"};
static const char *const method_names[] = {"multistep", "singlestep", "singlestep_fixed",
                                           "adaptive",  "F-PNDM",     "S-PNDM"};

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

const char *sched_prediction_name(sched_prediction p) {
  return (int)p >= 0 && (int)p < COUNT(pred_names) ? pred_names[p] : "?";
}
const char *sched_spacing_name(sched_spacing s) {
  return (int)s >= 0 && (int)s < COUNT(spacing_names) ? spacing_names[s] : "?";
}
const char *sched_variance_name(sched_variance v) {
  return (int)v >= 0 && (int)v < COUNT(variance_names) ? variance_names[v] : "?";
}
const char *sched_beta_schedule_name(sched_beta_schedule b) {
  return (int)b >= 0 && (int)b < COUNT(beta_names) ? beta_names[b] : "?";
}

const char *sched_algorithm_name(sched_algorithm a) {
  return (int)a >= 0 && (int)a < COUNT(algorithm_names) ? algorithm_names[a] : "?";
}
const char *sched_solver_type_name(sched_solver_type t) {
  return (int)t >= 0 && (int)t < COUNT(solver_type_names) ? solver_type_names[t] : "?";
}
const char *sched_final_sigmas_name(sched_final_sigmas f) {
  return (int)f >= 0 && (int)f < COUNT(final_sigmas_names) ? final_sigmas_names[f] : "?";
}
const char *sched_skip_name(sched_skip k) {
  return (int)k >= 0 && (int)k < COUNT(skip_names) ? skip_names[k] : "?";
}
const char *sched_method_name(sched_method m) {
  return (int)m >= 0 && (int)m < COUNT(method_names) ? method_names[m] : "?";
}

static const sched_defaults *sched_find(const char *name) {
  for (int i = 0; i < COUNT(sched_table); i++)
    if (strcmp(sched_table[i].class_name, name) == 0 ||
        (sched_table[i].alias && strcmp(sched_table[i].alias, name) == 0))
      return &sched_table[i];
  return NULL;
}

static int sched_is_known_key(const char *key) {
  for (int i = 0; i < COUNT(sched_known_keys); i++)
    if (strcmp(sched_known_keys[i], key) == 0)
      return 1;
  return 0;
}

static const char *const *class_key_list(const char *class_name) {
  for (int i = 0; i < COUNT(class_keys); i++)
    if (strcmp(class_keys[i].class_name, class_name) == 0)
      return class_keys[i].keys;
  return keys_none;
}

int sched_key_is_known(const char *key) {
  return key && sched_is_known_key(key);
}

int sched_class_has_key(const char *class_name, const char *key) {
  const sched_defaults *d = sched_find(class_name);
  if (!d || !key)
    return 0;
  for (int i = 0; common_keys[i]; i++)
    if (strcmp(common_keys[i], key) == 0)
      return 1;
  const char *const *k = class_key_list(d->class_name);
  for (int i = 0; k[i]; i++)
    if (strcmp(k[i], key) == 0)
      return 1;
  return 0;
}

int sched_check_unsupported(const json_t *obj, const char *class_name, err *e) {
  for (int i = 0; obj && i < COUNT(default_only_keys); i++) {
    const json_t *v = json_object_get(obj, default_only_keys[i].key);
    if (!v || json_is_null(v) || !sched_class_has_key(class_name, default_only_keys[i].key))
      continue;
    json_t *def = json_loads(default_only_keys[i].json_default, JSON_DECODE_ANY, NULL);
    int same = def && json_equal(def, (json_t *)v);
    json_decref(def);
    if (!same) {
      char *got = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
      int rc = err_set(e, ERR_UNSUPPORTED,
                       "scheduler config key '%s': %s is not supported by this engine (only %s)",
                       default_only_keys[i].key, got ? got : "this value",
                       default_only_keys[i].json_default);
      free(got);
      return rc;
    }
  }
  return ERR_OK;
}

int sched_config_init(sched_config *cfg, const char *name, err *e) {
  const sched_defaults *d = sched_find(name ? name : "DDPMScheduler");
  if (!d)
    return err_set(e, ERR_UNSUPPORTED, "unknown scheduler '%s'", name);
  memset(cfg, 0, sizeof *cfg);
  snprintf(cfg->scheduler, sizeof cfg->scheduler, "%s", d->class_name);
  cfg->num_train_timesteps = 1000;
  cfg->beta_start = d->beta_start;
  cfg->beta_end = d->beta_end;
  cfg->beta_schedule = d->beta_schedule;
  cfg->trained_betas = NULL;
  cfg->rescale_betas_zero_snr = 0;
  cfg->prediction_type = SCHED_PRED_EPSILON;
  cfg->timestep_spacing = d->spacing;
  cfg->steps_offset = 0;
  cfg->set_alpha_to_one = d->set_alpha_to_one;
  cfg->clip_sample = d->clip_sample;
  cfg->clip_sample_range = 1.0;
  cfg->thresholding = 0;
  cfg->dynamic_thresholding_ratio = 0.995;
  cfg->sample_max_value = 1.0;
  cfg->variance_type = SCHED_VAR_FIXED_SMALL;
  cfg->eta = 0.0;
  cfg->solver_order = 2;
  cfg->algorithm_type = d->algorithm;
  cfg->solver_type = d->solver_type;
  cfg->lower_order_final = d->lower_order_final;
  cfg->euler_at_final = 0;
  cfg->use_karras_sigmas = 0;
  cfg->use_lu_lambdas = 0;
  cfg->final_sigmas_type = SCHED_FINAL_ZERO;
  cfg->lambda_min_clipped = -INFINITY;
  cfg->sigma_min = NAN;
  cfg->sigma_max = NAN;
  cfg->predict_x0 = 1;
  cfg->n_disable_corrector = 0;
  cfg->skip_prk_steps = 0;
  cfg->method = d->method;
  cfg->skip_type = SCHED_SKIP_TIME_UNIFORM;
  cfg->denoise_to_zero = 0;
  cfg->rtol = 0.05;
  cfg->atol = 0.0078;
  cfg->h_init = 0.05;
  cfg->theta = 0.9;
  cfg->t_err = 1e-5;
  cfg->thresholding_max_val = 1.0;
  /* the official code's numerical_clip_alpha; null (-inf) switches it off */
  if (strcmp(d->class_name, "DPM_Solver") == 0)
    cfg->lambda_min_clipped = -5.1;
  return ERR_OK;
}

void sched_config_free(sched_config *cfg) {
  if (!cfg)
    return;
  free(cfg->trained_betas);
  cfg->trained_betas = NULL;
}

int sched_config_copy(sched_config *dst, const sched_config *src, err *e) {
  float *tb = NULL;
  if (src->trained_betas) {
    size_t n = (size_t)src->num_train_timesteps;
    tb = malloc(n * sizeof *tb);
    if (!tb)
      return err_set(e, ERR_NOMEM, "out of memory copying trained_betas");
    memcpy(tb, src->trained_betas, n * sizeof *tb);
  }
  *dst = *src;
  dst->trained_betas = tb;
  return ERR_OK;
}

/* ---- value parsing: each helper names the key in its message ---- */

static const char *json_kind(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  default: return "null";
  }
}

static int get_int(const char *key, const json_t *v, long long lo, long long hi, int *out, err *e) {
  long long x;
  if (json_is_integer(v)) {
    x = json_integer_value(v);
  } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 1e15) {
    x = (long long)json_real_value(v); /* 1000.0 from a Python float is still 1000 */
  } else {
    return err_set(e, ERR_INVALID, "scheduler config key '%s': expected an integer, got %s", key,
                   json_kind(v));
  }
  if (x < lo || x > hi)
    return err_set(e, ERR_INVALID, "scheduler config key '%s': %lld is out of range [%lld, %lld]",
                   key, x, lo, hi);
  *out = (int)x;
  return ERR_OK;
}

static int get_bool(const char *key, const json_t *v, int *out, err *e) {
  if (json_is_boolean(v)) {
    *out = json_is_true(v);
    return ERR_OK;
  }
  if (json_is_integer(v) && (json_integer_value(v) == 0 || json_integer_value(v) == 1)) {
    *out = (int)json_integer_value(v);
    return ERR_OK;
  }
  return err_set(e, ERR_INVALID, "scheduler config key '%s': expected true or false, got %s", key,
                 json_kind(v));
}

static int get_enum(const char *key, const json_t *v, const char *const *names, int n, int *out,
                    err *e) {
  if (json_is_string(v)) {
    for (int i = 0; i < n; i++)
      if (strcmp(json_string_value(v), names[i]) == 0) {
        *out = i;
        return ERR_OK;
      }
  }
  char list[256] = "";
  for (int i = 0; i < n; i++) {
    size_t len = strlen(list);
    snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", names[i]);
  }
  if (json_is_string(v))
    return err_set(e, ERR_UNSUPPORTED,
                   "scheduler config key '%s': unsupported value '%s' (one of: %s)", key,
                   json_string_value(v), list);
  return err_set(e, ERR_INVALID,
                 "scheduler config key '%s': expected a string (one of: %s), got %s", key, list,
                 json_kind(v));
}

static int get_int_list(const char *key, const json_t *v, int *out, int max, int *n, err *e) {
  if (!json_is_array(v))
    return err_set(e, ERR_INVALID,
                   "scheduler config key '%s': expected a list of step indices, got %s", key,
                   json_kind(v));
  if (json_array_size(v) > (size_t)max)
    return err_set(e, ERR_INVALID, "scheduler config key '%s': at most %d entries", key, max);
  int tmp[SCHED_MAX_DISABLE_CORRECTOR] = {0};
  for (size_t i = 0; i < json_array_size(v); i++) {
    int rc = get_int(key, json_array_get(v, i), 0, SCHED_MAX_TRAIN_TIMESTEPS, &tmp[i], e);
    if (rc != ERR_OK)
      return rc;
  }
  *n = (int)json_array_size(v);
  memcpy(out, tmp, (size_t)*n * sizeof *out);
  return ERR_OK;
}

static int get_trained_betas(const json_t *v, sched_config *cfg, err *e) {
  if (!json_is_array(v))
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'trained_betas': expected an array of numbers, got %s",
                   json_kind(v));
  size_t n = json_array_size(v);
  if (n < 1 || n > SCHED_MAX_TRAIN_TIMESTEPS)
    return err_set(e, ERR_INVALID, "scheduler config key 'trained_betas': %zu values", n);
  float *tb = malloc(n * sizeof *tb);
  if (!tb)
    return err_set(e, ERR_NOMEM, "out of memory reading trained_betas");
  for (size_t i = 0; i < n; i++) {
    const json_t *x = json_array_get(v, i);
    /* torch.tensor(list, dtype=float32) rounds each Python float once */
    double d = json_is_number(x) ? json_number_value(x) : NAN;
    if (!isfinite(d) || !((float)d > 0.0f) || (float)d > 1.0f) {
      free(tb);
      return err_set(e, ERR_INVALID,
                     "scheduler config key 'trained_betas': value %zu must be a number in (0, 1]",
                     i);
    }
    tb[i] = (float)d;
  }
  free(cfg->trained_betas);
  cfg->trained_betas = tb;
  /* diffusers sizes its tables by the array, so the array decides the length */
  cfg->num_train_timesteps = (int)n;
  return ERR_OK;
}

/* ---- the numeric keys a request can set, with their ranges ----
 * One row per key: the values every solver stays finite with. They hold diffusers' defaults and
 * every config in models/ and tests/fixtures with room to spare; what lies outside would make a
 * run non-finite (eta above 1 takes the square root of a negative variance in DDIM, a beta of 1
 * empties alpha_bar) or means nothing. An open end excludes its bound: "(0, 1)". */
typedef struct sched_range {
  const char *key;
  size_t offset; /* of the double or int field in sched_config */
  int is_int;
  double lo, hi;
  unsigned char lo_open, hi_open;
} sched_range;

#define REAL(k, lo, hi, lo_open, hi_open)                                                          \
  { #k, offsetof(sched_config, k), 0, lo, hi, lo_open, hi_open }
#define INT(k, lo, hi)                                                                             \
  { #k, offsetof(sched_config, k), 1, lo, hi, 0, 0 }
static const sched_range sched_ranges[] = {
    INT(num_train_timesteps, 1, SCHED_MAX_TRAIN_TIMESTEPS),
    REAL(beta_start, 0.0, 1.0, 1, 1),
    REAL(beta_end, 0.0, 1.0, 1, 1),
    INT(steps_offset, 0, SCHED_MAX_TRAIN_TIMESTEPS),
    REAL(clip_sample_range, 0.0, 1e6, 1, 0),
    REAL(dynamic_thresholding_ratio, 0.0, 1.0, 0, 0),
    REAL(sample_max_value, 0.0, 1e6, 1, 0),
    REAL(eta, 0.0, 1.0, 0, 0),
    INT(solver_order, 1, 3),
    REAL(lambda_min_clipped, -1e3, 1e3, 0, 0),
    REAL(sigma_min, 0.0, 1e6, 1, 0),
    REAL(sigma_max, 0.0, 1e6, 1, 0),
    REAL(rtol, 0.0, 1e3, 0, 0),
    REAL(atol, 0.0, 1e3, 0, 0),
    REAL(h_init, 1e-6, 100.0, 0, 0),
    REAL(theta, 1e-3, 1.0, 0, 0),
    REAL(t_err, 1e-12, 1.0, 0, 0),
    REAL(thresholding_max_val, 0.0, 1e6, 1, 0),
};
#undef REAL
#undef INT

static const sched_range *range_of(const char *key) {
  for (int i = 0; i < COUNT(sched_ranges); i++)
    if (strcmp(sched_ranges[i].key, key) == 0)
      return &sched_ranges[i];
  return NULL;
}

int sched_key_range(const char *key, char *buf, size_t n) {
  const sched_range *r = range_of(key);
  if (!r)
    return 0;
  snprintf(buf, n, "%c%.15g, %.15g%c", r->lo_open ? '(' : '[', r->lo, r->hi,
           r->hi_open ? ')' : ']');
  return 1;
}

/* v into the field r names, or an error with the key and its range. */
static int get_ranged(const sched_range *r, const json_t *v, sched_config *cfg, err *e) {
  double x;
  if (r->is_int) {
    int iv = 0;
    int rc = get_int(r->key, v, (long long)r->lo, (long long)r->hi, &iv, e);
    if (rc == ERR_OK)
      memcpy((char *)cfg + r->offset, &iv, sizeof iv);
    return rc;
  }
  if (!json_is_number(v))
    return err_set(e, ERR_INVALID, "scheduler config key '%s': expected a number, got %s", r->key,
                   json_kind(v));
  x = json_number_value(v);
  if (!isfinite(x) || (r->lo_open ? x <= r->lo : x < r->lo) ||
      (r->hi_open ? x >= r->hi : x > r->hi)) {
    char range[96];
    sched_key_range(r->key, range, sizeof range);
    return err_set(e, ERR_INVALID, "scheduler config key '%s': %g is out of range %s", r->key, x,
                   range);
  }
  memcpy((char *)cfg + r->offset, &x, sizeof x);
  return ERR_OK;
}

/* Applies one modelled key; returns 1 through *handled when the key is one of ours. A JSON null
 * keeps the default (None mostly selects it in diffusers), except that it clears a flag. */
static int apply_key(sched_config *cfg, const char *key, const json_t *v, int *handled, err *e) {
  int rc = ERR_OK, iv = 0;
  *handled = 1;
  if (json_is_null(v)) {
    if (strcmp(key, "trained_betas") == 0) {
      free(cfg->trained_betas);
      cfg->trained_betas = NULL;
    }
    /* None is falsy where diffusers tests a flag ("elif self.config.clip_sample:") */
    int *flag = strcmp(key, "clip_sample") == 0              ? &cfg->clip_sample
                : strcmp(key, "set_alpha_to_one") == 0       ? &cfg->set_alpha_to_one
                : strcmp(key, "thresholding") == 0           ? &cfg->thresholding
                : strcmp(key, "rescale_betas_zero_snr") == 0 ? &cfg->rescale_betas_zero_snr
                : strcmp(key, "lower_order_final") == 0      ? &cfg->lower_order_final
                : strcmp(key, "euler_at_final") == 0         ? &cfg->euler_at_final
                : strcmp(key, "use_karras_sigmas") == 0      ? &cfg->use_karras_sigmas
                : strcmp(key, "use_lu_lambdas") == 0         ? &cfg->use_lu_lambdas
                : strcmp(key, "predict_x0") == 0             ? &cfg->predict_x0
                : strcmp(key, "skip_prk_steps") == 0         ? &cfg->skip_prk_steps
                : strcmp(key, "denoise_to_zero") == 0        ? &cfg->denoise_to_zero
                                                             : NULL;
    if (flag)
      *flag = 0;
    /* None means "no bound" for these, and -inf is what JSON cannot spell */
    if (strcmp(key, "lambda_min_clipped") == 0)
      cfg->lambda_min_clipped = -INFINITY;
    else if (strcmp(key, "sigma_min") == 0)
      cfg->sigma_min = NAN;
    else if (strcmp(key, "sigma_max") == 0)
      cfg->sigma_max = NAN;
    else if (strcmp(key, "disable_corrector") == 0)
      cfg->n_disable_corrector = 0;
    *handled = sched_is_known_key(key) ? 1 : 0;
    return ERR_OK;
  }
  const sched_range *range = range_of(key);
  if (range) {
    rc = get_ranged(range, v, cfg, e);
  } else if (strcmp(key, "beta_schedule") == 0) {
    rc = get_enum(key, v, beta_names, COUNT(beta_names), &iv, e);
    if (rc == ERR_OK)
      cfg->beta_schedule = (sched_beta_schedule)iv;
  } else if (strcmp(key, "trained_betas") == 0) {
    rc = get_trained_betas(v, cfg, e);
  } else if (strcmp(key, "rescale_betas_zero_snr") == 0) {
    rc = get_bool(key, v, &cfg->rescale_betas_zero_snr, e);
  } else if (strcmp(key, "prediction_type") == 0) {
    rc = get_enum(key, v, pred_names, COUNT(pred_names), &iv, e);
    if (rc == ERR_OK)
      cfg->prediction_type = (sched_prediction)iv;
  } else if (strcmp(key, "predict_epsilon") == 0) {
    /* diffusers <= 0.12 spelled prediction_type this way; an explicit prediction_type in the
     * same object wins (see sched_config_apply_json) */
    rc = get_bool(key, v, &iv, e);
    if (rc == ERR_OK)
      cfg->prediction_type = iv ? SCHED_PRED_EPSILON : SCHED_PRED_SAMPLE;
  } else if (strcmp(key, "timestep_spacing") == 0) {
    rc = get_enum(key, v, spacing_names, COUNT(spacing_names), &iv, e);
    if (rc == ERR_OK)
      cfg->timestep_spacing = (sched_spacing)iv;
  } else if (strcmp(key, "set_alpha_to_one") == 0) {
    rc = get_bool(key, v, &cfg->set_alpha_to_one, e);
  } else if (strcmp(key, "clip_sample") == 0) {
    rc = get_bool(key, v, &cfg->clip_sample, e);
  } else if (strcmp(key, "thresholding") == 0) {
    rc = get_bool(key, v, &cfg->thresholding, e);
  } else if (strcmp(key, "variance_type") == 0) {
    rc = get_enum(key, v, variance_names, COUNT(variance_names), &iv, e);
    if (rc == ERR_OK)
      cfg->variance_type = (sched_variance)iv;
  } else if (strcmp(key, "algorithm_type") == 0) {
    rc = get_enum(key, v, algorithm_names, COUNT(algorithm_names), &iv, e);
    if (rc == ERR_OK)
      cfg->algorithm_type = (sched_algorithm)iv;
  } else if (strcmp(key, "solver_type") == 0) {
    rc = get_enum(key, v, solver_type_names, COUNT(solver_type_names), &iv, e);
    if (rc == ERR_OK)
      cfg->solver_type = (sched_solver_type)iv;
  } else if (strcmp(key, "final_sigmas_type") == 0) {
    rc = get_enum(key, v, final_sigmas_names, COUNT(final_sigmas_names), &iv, e);
    if (rc == ERR_OK)
      cfg->final_sigmas_type = (sched_final_sigmas)iv;
  } else if (strcmp(key, "skip_type") == 0) {
    rc = get_enum(key, v, skip_names, COUNT(skip_names), &iv, e);
    if (rc == ERR_OK)
      cfg->skip_type = (sched_skip)iv;
  } else if (strcmp(key, "method") == 0) {
    rc = get_enum(key, v, method_names, COUNT(method_names), &iv, e);
    if (rc == ERR_OK)
      cfg->method = (sched_method)iv;
  } else if (strcmp(key, "lower_order_final") == 0) {
    rc = get_bool(key, v, &cfg->lower_order_final, e);
  } else if (strcmp(key, "euler_at_final") == 0) {
    rc = get_bool(key, v, &cfg->euler_at_final, e);
  } else if (strcmp(key, "use_karras_sigmas") == 0) {
    rc = get_bool(key, v, &cfg->use_karras_sigmas, e);
  } else if (strcmp(key, "use_lu_lambdas") == 0) {
    rc = get_bool(key, v, &cfg->use_lu_lambdas, e);
  } else if (strcmp(key, "predict_x0") == 0) {
    rc = get_bool(key, v, &cfg->predict_x0, e);
  } else if (strcmp(key, "skip_prk_steps") == 0) {
    rc = get_bool(key, v, &cfg->skip_prk_steps, e);
  } else if (strcmp(key, "denoise_to_zero") == 0) {
    rc = get_bool(key, v, &cfg->denoise_to_zero, e);
  } else if (strcmp(key, "disable_corrector") == 0) {
    rc = get_int_list(key, v, cfg->disable_corrector, SCHED_MAX_DISABLE_CORRECTOR,
                      &cfg->n_disable_corrector, e);
  } else {
    *handled = 0;
  }
  return rc;
}

int sched_config_validate(const sched_config *cfg, err *e) {
  if (cfg->num_train_timesteps < 1 || cfg->num_train_timesteps > SCHED_MAX_TRAIN_TIMESTEPS)
    return err_set(e, ERR_INVALID, "scheduler config key 'num_train_timesteps': %d is out of range",
                   cfg->num_train_timesteps);
  if (cfg->sigma_min >= cfg->sigma_max) /* both set (NaN is None) and in the wrong order */
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'sigma_min': %g must be below sigma_max (%g)",
                   cfg->sigma_min, cfg->sigma_max);
  if (cfg->steps_offset >= cfg->num_train_timesteps)
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'steps_offset': %d must be below num_train_timesteps (%d)",
                   cfg->steps_offset, cfg->num_train_timesteps);
  return ERR_OK;
}

int sched_config_apply_json(sched_config *cfg, const json_t *obj, int strict, err *e) {
  if (!json_is_object(obj))
    return err_set(e, ERR_INVALID, "scheduler config: expected a JSON object, got %s",
                   obj ? json_kind(obj) : "nothing");
  sched_config tmp;
  int rc = sched_config_copy(&tmp, cfg, e);
  if (rc != ERR_OK)
    return rc;
  const char *key;
  json_t *v;
  int tb_given = 0;
  json_object_foreach((json_t *)obj, key, v) {
    if (key[0] == '_')
      continue;
    /* prediction_type is applied after the loop so that it beats legacy predict_epsilon */
    if (strcmp(key, "prediction_type") == 0 || strcmp(key, "num_train_timesteps") == 0)
      continue;
    int handled = 0;
    rc = apply_key(&tmp, key, v, &handled, e);
    if (rc != ERR_OK)
      goto fail;
    if (strcmp(key, "trained_betas") == 0 && !json_is_null(v))
      tb_given = 1;
    if (!handled && strict && !sched_is_known_key(key)) {
      rc = err_set(e, ERR_INVALID, "unknown scheduler config key '%s'", key);
      goto fail;
    }
  }
  static const char *const late[] = {"prediction_type", "num_train_timesteps"};
  for (int i = 0; i < COUNT(late); i++) {
    const json_t *lv = json_object_get(obj, late[i]);
    int handled;
    if (lv && (rc = apply_key(&tmp, late[i], lv, &handled, e)) != ERR_OK)
      goto fail;
  }
  if (tmp.trained_betas) {
    /* trained_betas fixes the table length; a num_train_timesteps that disagrees with it (in the
     * same object, or later on top of it) is a conflict diffusers would crash on */
    const json_t *nt = json_object_get(obj, "num_train_timesteps");
    const json_t *tb = json_object_get(obj, "trained_betas");
    size_t len = tb_given ? json_array_size(tb) : 0;
    if (nt && !json_is_null(nt) && tb_given && (size_t)tmp.num_train_timesteps != len) {
      rc = err_set(e, ERR_INVALID,
                   "scheduler config key 'num_train_timesteps': %d disagrees with the %zu "
                   "trained_betas",
                   tmp.num_train_timesteps, len);
      goto fail;
    }
    if (!tb_given && tmp.num_train_timesteps != cfg->num_train_timesteps) {
      rc = err_set(e, ERR_INVALID,
                   "scheduler config key 'num_train_timesteps': cannot change it to %d while "
                   "%d trained_betas are set",
                   tmp.num_train_timesteps, cfg->num_train_timesteps);
      goto fail;
    }
  }
  if ((rc = sched_config_validate(&tmp, e)) != ERR_OK)
    goto fail;
  sched_config_free(cfg);
  *cfg = tmp;
  return ERR_OK;
fail:
  sched_config_free(&tmp);
  return rc;
}

int sched_config_from_json(const json_t *obj, const char *name, int strict, sched_config *out,
                           err *e) {
  if (!json_is_object(obj))
    return err_set(e, ERR_INVALID, "scheduler config: expected a JSON object");
  if (!name) {
    const json_t *cn = json_object_get(obj, "_class_name");
    if (json_is_string(cn) && sched_find(json_string_value(cn)))
      name = json_string_value(cn);
  }
  int rc = sched_config_init(out, name, e);
  if (rc != ERR_OK)
    return rc;
  rc = sched_config_apply_json(out, obj, strict, e);
  if (rc != ERR_OK)
    sched_config_free(out);
  return rc;
}

/* Python's json module writes float('-inf') as -Infinity (DPMSolverMultistepScheduler's
 * lambda_min_clipped default), which is not JSON; outside strings, -Infinity, Infinity and NaN
 * become null, which every key that can hold them reads as its default. NaN is shorter than
 * null, so the text is copied, not rewritten in place: a malloc'ed copy of len bytes of text,
 * *outlen long, or NULL when out of memory. */
static char *json_nonfinite_to_null(const char *text, size_t len, size_t *outlen) {
  static const char *const words[] = {"-Infinity", "Infinity", "NaN"};
  char *out = malloc(len + len / 3 + 2); /* every 3 bytes may become 4 */
  if (!out)
    return NULL;
  size_t o = 0;
  int in_str = 0;
  for (size_t i = 0; i < len; i++) {
    if (in_str || text[i] == '"') {
      if (in_str && text[i] == '\\' && i + 1 < len)
        out[o++] = text[i++];
      else
        in_str = in_str ? text[i] != '"' : 1;
      out[o++] = text[i];
      continue;
    }
    int w = 0;
    size_t n = 0;
    for (; w < 3; w++)
      if (len - i >= (n = strlen(words[w])) && memcmp(text + i, words[w], n) == 0)
        break;
    if (w == 3) {
      out[o++] = text[i];
      continue;
    }
    memcpy(out + o, "null", 4);
    o += 4;
    i += n - 1;
  }
  out[o] = '\0';
  *outlen = o;
  return out;
}

static json_t *load_json_lenient(const char *path, err *e) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    err_set(e, ERR_FORMAT, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  char *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len + 4096 + 1 > cap) {
      cap = cap ? 2 * cap : 8192;
      char *nb = cap <= (size_t)1 << 28 ? realloc(buf, cap) : NULL;
      if (!nb) {
        free(buf);
        fclose(f);
        err_set(e, ERR_FORMAT, "%s: too large or out of memory", path);
        return NULL;
      }
      buf = nb;
    }
    size_t got = fread(buf + len, 1, 4096, f);
    len += got;
    if (got < 4096)
      break;
  }
  int failed = ferror(f);
  fclose(f);
  if (failed) {
    free(buf);
    err_set(e, ERR_IO, "%s: read error", path);
    return NULL;
  }
  size_t clean_len = 0;
  char *clean = json_nonfinite_to_null(buf, len, &clean_len);
  free(buf);
  if (!clean) {
    err_set(e, ERR_NOMEM, "%s: out of memory", path);
    return NULL;
  }
  json_error_t je;
  json_t *obj = json_loadb(clean, clean_len, 0, &je);
  free(clean);
  if (!obj)
    err_set(e, ERR_FORMAT, "%s:%d: %s", path, je.line, je.text);
  return obj;
}

json_t *sched_config_read_json(const char *path, err *e) {
  json_t *obj = load_json_lenient(path, e);
  if (obj && !json_is_object(obj)) {
    json_decref(obj);
    err_set(e, ERR_FORMAT, "%s: expected a JSON object", path);
    return NULL;
  }
  return obj;
}

int sched_config_load_file(const char *path, const char *name, int strict, sched_config *out,
                           err *e) {
  json_t *obj = load_json_lenient(path, e);
  if (!obj)
    return e ? e->code : ERR_FORMAT;
  int rc = sched_config_from_json(obj, name, strict, out, e);
  json_decref(obj);
  if (rc != ERR_OK)
    err_prefix(e, "%s", path);
  return rc;
}

json_t *sched_value_from_text(const char *value) {
  json_t *v = json_loads(value, JSON_DECODE_ANY, NULL);
  if (!v) {
    if (strcmp(value, "True") == 0)
      v = json_true();
    else if (strcmp(value, "False") == 0)
      v = json_false();
    else if (strcmp(value, "None") == 0)
      v = json_null();
    else
      v = json_string(value);
  }
  return v;
}

int sched_config_set(sched_config *cfg, const char *key, const char *value, err *e) {
  if (!key || !*key)
    return err_set(e, ERR_INVALID, "scheduler override: empty key");
  json_t *v = sched_value_from_text(value);
  json_t *obj = json_object();
  if (!v || !obj || json_object_set_new(obj, key, v) != 0) {
    json_decref(obj);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  int rc = sched_config_apply_json(cfg, obj, 1, e);
  json_decref(obj);
  return rc;
}

int sched_config_set_override(sched_config *cfg, const char *kv, err *e) {
  const char *eq = strchr(kv, '=');
  if (!eq || eq == kv)
    return err_set(e, ERR_INVALID, "scheduler override '%s': expected KEY=VALUE", kv);
  char key[128];
  size_t n = (size_t)(eq - kv);
  if (n >= sizeof key)
    return err_set(e, ERR_INVALID, "scheduler override: key too long");
  memcpy(key, kv, n);
  key[n] = '\0';
  return sched_config_set(cfg, key, eq + 1, e);
}

json_t *sched_config_to_json(const sched_config *cfg) {
  json_t *o = json_object();
  if (!o)
    return NULL;
  json_object_set_new(o, "_class_name", json_string(cfg->scheduler));
  json_object_set_new(o, "num_train_timesteps", json_integer(cfg->num_train_timesteps));
  json_object_set_new(o, "beta_start", json_real(cfg->beta_start));
  json_object_set_new(o, "beta_end", json_real(cfg->beta_end));
  json_object_set_new(o, "beta_schedule",
                      json_string(sched_beta_schedule_name(cfg->beta_schedule)));
  if (cfg->trained_betas) {
    json_t *a = json_array();
    for (int i = 0; a && i < cfg->num_train_timesteps; i++)
      json_array_append_new(a, json_real(cfg->trained_betas[i]));
    json_object_set_new(o, "trained_betas", a);
  } else {
    json_object_set_new(o, "trained_betas", json_null());
  }
  json_object_set_new(o, "rescale_betas_zero_snr", json_boolean(cfg->rescale_betas_zero_snr));
  json_object_set_new(o, "prediction_type",
                      json_string(sched_prediction_name(cfg->prediction_type)));
  json_object_set_new(o, "timestep_spacing",
                      json_string(sched_spacing_name(cfg->timestep_spacing)));
  json_object_set_new(o, "steps_offset", json_integer(cfg->steps_offset));
  json_object_set_new(o, "set_alpha_to_one", json_boolean(cfg->set_alpha_to_one));
  json_object_set_new(o, "clip_sample", json_boolean(cfg->clip_sample));
  json_object_set_new(o, "clip_sample_range", json_real(cfg->clip_sample_range));
  json_object_set_new(o, "thresholding", json_boolean(cfg->thresholding));
  json_object_set_new(o, "dynamic_thresholding_ratio", json_real(cfg->dynamic_thresholding_ratio));
  json_object_set_new(o, "sample_max_value", json_real(cfg->sample_max_value));
  json_object_set_new(o, "variance_type", json_string(sched_variance_name(cfg->variance_type)));
  json_object_set_new(o, "eta", json_real(cfg->eta));
  json_object_set_new(o, "solver_order", json_integer(cfg->solver_order));
  json_object_set_new(o, "algorithm_type", json_string(sched_algorithm_name(cfg->algorithm_type)));
  json_object_set_new(o, "solver_type", json_string(sched_solver_type_name(cfg->solver_type)));
  json_object_set_new(o, "lower_order_final", json_boolean(cfg->lower_order_final));
  json_object_set_new(o, "euler_at_final", json_boolean(cfg->euler_at_final));
  json_object_set_new(o, "use_karras_sigmas", json_boolean(cfg->use_karras_sigmas));
  json_object_set_new(o, "use_lu_lambdas", json_boolean(cfg->use_lu_lambdas));
  json_object_set_new(o, "final_sigmas_type",
                      json_string(sched_final_sigmas_name(cfg->final_sigmas_type)));
  json_object_set_new(o, "lambda_min_clipped",
                      isfinite(cfg->lambda_min_clipped) ? json_real(cfg->lambda_min_clipped)
                                                        : json_null());
  json_object_set_new(o, "sigma_min",
                      isnan(cfg->sigma_min) ? json_null() : json_real(cfg->sigma_min));
  json_object_set_new(o, "sigma_max",
                      isnan(cfg->sigma_max) ? json_null() : json_real(cfg->sigma_max));
  json_object_set_new(o, "predict_x0", json_boolean(cfg->predict_x0));
  json_t *dc = json_array();
  for (int i = 0; dc && i < cfg->n_disable_corrector; i++)
    json_array_append_new(dc, json_integer(cfg->disable_corrector[i]));
  json_object_set_new(o, "disable_corrector", dc);
  json_object_set_new(o, "skip_prk_steps", json_boolean(cfg->skip_prk_steps));
  json_object_set_new(o, "method", json_string(sched_method_name(cfg->method)));
  json_object_set_new(o, "skip_type", json_string(sched_skip_name(cfg->skip_type)));
  json_object_set_new(o, "denoise_to_zero", json_boolean(cfg->denoise_to_zero));
  json_object_set_new(o, "rtol", json_real(cfg->rtol));
  json_object_set_new(o, "atol", json_real(cfg->atol));
  json_object_set_new(o, "h_init", json_real(cfg->h_init));
  json_object_set_new(o, "theta", json_real(cfg->theta));
  json_object_set_new(o, "t_err", json_real(cfg->t_err));
  json_object_set_new(o, "thresholding_max_val", json_real(cfg->thresholding_max_val));
  return o;
}

json_t *sched_config_to_json_for(const sched_config *cfg, const char *class_name) {
  json_t *all = sched_config_to_json(cfg);
  json_t *o = json_object();
  if (!all || !o) {
    json_decref(all);
    json_decref(o);
    return NULL;
  }
  const char *key;
  json_t *v;
  json_object_foreach(all, key, v) {
    if (key[0] == '_' || sched_class_has_key(class_name, key))
      json_object_set(o, key, v);
  }
  json_decref(all);
  return o;
}

/* ---- the tables ---- */

/* torch.linspace(start, end, n, dtype=float32) on CPU: the scalar path fuses start + step * i
 * into one fma, the AVX2 path builds 8-wide ramps base + j * step unfused, 16 values per
 * iteration, and the tail goes through the scalar path again. */
static void torch_linspace_f32(double start_d, double end_d, int n, float *out) {
  const float start = (float)start_d, end = (float)end_d;
  if (n == 1) {
    out[0] = start;
    return;
  }
  const float step = (end - start) / (float)(n - 1);
  const int halfway = n / 2;
  int idx = 0;
  for (; idx + 16 <= n; idx += 16) {
    for (int v = idx; v < idx + 16; v += 8) {
      float base = v < halfway ? fmaf(step, (float)v, start) : fmaf(-step, (float)(n - v - 1), end);
      for (int j = 0; j < 8; j++)
        out[v + j] = base + (float)j * step;
    }
  }
  for (; idx < n; idx++)
    out[idx] =
        idx < halfway ? fmaf(step, (float)idx, start) : fmaf(-step, (float)(n - idx - 1), end);
}

/* diffusers' betas_for_alpha_bar(cosine): Python doubles, then one rounding to float32. */
static double cos_alpha_bar(double t) {
  return pow(cos((t + 0.008) / 1.008 * 3.141592653589793 / 2), 2.0);
}

/* cumprod(1 - betas): torch accumulates a float32 cumprod in double, rounding each output. */
static void cumprod_alphas(const float *betas, int n, float *out) {
  double acc = 1.0;
  for (int i = 0; i < n; i++) {
    acc *= (double)(1.0f - betas[i]);
    out[i] = (float)acc;
  }
}

/* diffusers' rescale_zero_terminal_snr, in torch's float32 operation order. */
static int rescale_zero_snr(float *betas, int n, err *e) {
  float *s = malloc((size_t)n * sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  cumprod_alphas(betas, n, s);
  for (int i = 0; i < n; i++)
    s[i] = sqrtf(s[i]);
  float s0 = s[0], sT = s[n - 1];
  if (!(s0 - sT > 0.0f)) {
    free(s);
    return err_set(e, ERR_INVALID,
                   "scheduler config key 'rescale_betas_zero_snr': schedule has no SNR range");
  }
  float scale = s0 / (s0 - sT);
  for (int i = 0; i < n; i++) {
    s[i] -= sT;
    s[i] *= scale;
    s[i] = s[i] * s[i];
  }
  /* alphas = [abar0, abar[1:] / abar[:-1]], betas = 1 - alphas */
  for (int i = n - 1; i >= 1; i--)
    betas[i] = 1.0f - s[i] / s[i - 1];
  betas[0] = 1.0f - s[0];
  free(s);
  return ERR_OK;
}

int sched_betas(const sched_config *cfg, float *betas, err *e) {
  int rc = sched_config_validate(cfg, e);
  if (rc != ERR_OK)
    return rc;
  const int n = cfg->num_train_timesteps;
  if (cfg->trained_betas) {
    memcpy(betas, cfg->trained_betas, (size_t)n * sizeof *betas);
  } else {
    switch (cfg->beta_schedule) {
    case SCHED_BETA_LINEAR: torch_linspace_f32(cfg->beta_start, cfg->beta_end, n, betas); break;
    case SCHED_BETA_SCALED_LINEAR:
      torch_linspace_f32(pow(cfg->beta_start, 0.5), pow(cfg->beta_end, 0.5), n, betas);
      for (int i = 0; i < n; i++)
        betas[i] = betas[i] * betas[i];
      break;
    case SCHED_BETA_SQUAREDCOS_CAP_V2:
      for (int i = 0; i < n; i++) {
        double t1 = (double)i / n, t2 = (double)(i + 1) / n;
        double b = 1 - cos_alpha_bar(t2) / cos_alpha_bar(t1);
        betas[i] = (float)(b < 0.999 ? b : 0.999);
      }
      break;
    case SCHED_BETA_SIGMOID: {
      /* sigmoid(linspace(-6, 6)) * (end - start) + start; torch's vectorised exp may differ
       * from libm's expf by an ulp, so this one is not bit-exact */
      const float scale = (float)(cfg->beta_end - cfg->beta_start), off = (float)cfg->beta_start;
      torch_linspace_f32(-6.0, 6.0, n, betas);
      for (int i = 0; i < n; i++)
        betas[i] = 1.0f / (1.0f + expf(-betas[i])) * scale + off;
      break;
    }
    default: return err_set(e, ERR_INVALID, "scheduler config key 'beta_schedule': invalid value");
    }
  }
  if (cfg->rescale_betas_zero_snr && (rc = rescale_zero_snr(betas, n, e)) != ERR_OK)
    return rc;
  for (int i = 0; i < n; i++) {
    if (!(betas[i] > 0.0f && betas[i] <= 1.0f))
      return err_set(e, ERR_INVALID,
                     "scheduler config: beta[%d] = %g is outside (0, 1]; check beta_start, "
                     "beta_end, beta_schedule and trained_betas",
                     i, (double)betas[i]);
  }
  return ERR_OK;
}

int sched_alphas_cumprod(const sched_config *cfg, float *out, err *e) {
  const int n = cfg->num_train_timesteps;
  float *betas = malloc((size_t)(n > 0 ? n : 1) * sizeof *betas);
  if (!betas)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = sched_betas(cfg, betas, e);
  if (rc == ERR_OK)
    cumprod_alphas(betas, n, out);
  free(betas);
  /* Below the floor sigma = sqrt((1 - abar) / abar) squared leaves float range and x0 = (x - sigma
   * eps) / sqrt(abar) is noise times 1e15: no solver returns a finite image. Legitimate
   * schedules stay far above (cosine ends near 2e-9, 4000 linear steps near 4e-18); the zero-SNR
   * rescale ends on 0 by design and the solvers treat that step. */
  const int last = cfg->rescale_betas_zero_snr ? n - 1 : n;
  for (int i = 0; rc == ERR_OK && i < last; i++)
    if (!(out[i] >= SCHED_MIN_ALPHA_BAR))
      rc = err_set(e, ERR_INVALID,
                   "scheduler config: alphas_cumprod[%d] = %g is below %g, the schedule leaves no "
                   "signal there (sigma above 1e15); lower beta_start, beta_end or "
                   "num_train_timesteps (%s schedule, beta_start %g, beta_end %g, %d steps)",
                   i, (double)out[i], SCHED_MIN_ALPHA_BAR,
                   cfg->trained_betas ? "trained_betas"
                                      : sched_beta_schedule_name(cfg->beta_schedule),
                   cfg->beta_start, cfg->beta_end, n);
  return rc;
}

int sched_alphas_cumprod_f64(const sched_config *cfg, double *out, err *e) {
  const int n = cfg->num_train_timesteps;
  float *a = malloc((size_t)(n > 0 ? n : 1) * sizeof *a);
  if (!a)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = sched_alphas_cumprod(cfg, a, e);
  if (rc == ERR_OK)
    for (int i = 0; i < n; i++)
      out[i] = a[i];
  free(a);
  return rc;
}

int sched_timesteps(const sched_config *cfg, int num_inference_steps, int64_t *out, err *e) {
  const int T = cfg->num_train_timesteps, n = num_inference_steps;
  int rc = sched_config_validate(cfg, e);
  if (rc != ERR_OK)
    return rc;
  if (n < 1 || n > T)
    return err_set(e, ERR_INVALID,
                   "num_inference_steps %d must be in [1, %d] (num_train_timesteps)", n, T);
  switch (cfg->timestep_spacing) {
  case SCHED_SPACING_LINSPACE: {
    /* np.linspace(0, T - 1, n).round()[::-1]: i * step, the endpoint stored exactly, and
     * round-half-even */
    double step = n > 1 ? (double)(T - 1) / (n - 1) : 0.0;
    for (int i = 0; i < n; i++) {
      double y = (n > 1 && i == n - 1) ? (double)(T - 1) : (double)i * step;
      out[n - 1 - i] = (int64_t)nearbyint(y);
    }
    break;
  }
  case SCHED_SPACING_LEADING: {
    int64_t ratio = T / n;
    for (int i = 0; i < n; i++) {
      out[i] = (int64_t)(n - 1 - i) * ratio + cfg->steps_offset;
      if (out[i] > T - 1)
        return err_set(e, ERR_INVALID,
                       "scheduler config key 'steps_offset': %d pushes timestep %lld past %d",
                       cfg->steps_offset, (long long)out[i], T - 1);
    }
    break;
  }
  case SCHED_SPACING_TRAILING: {
    /* np.round(np.arange(T, 0, -T / n)) - 1. numpy fills a float arange as start + i * delta
     * with delta = (start + step) - start. For some n (61 of 1000, ...) numpy's length rounds up
     * to n + 1 and diffusers gets a stray -1 timestep; only the first n are kept here. */
    double ratio = (double)T / n;
    double second = (double)T + -ratio;
    double delta = second - (double)T;
    for (int i = 0; i < n; i++) {
      double y = i == 0 ? (double)T : i == 1 ? second : (double)T + i * delta;
      out[i] = (int64_t)nearbyint(y) - 1;
    }
    break;
  }
  default: return err_set(e, ERR_INVALID, "scheduler config key 'timestep_spacing': invalid value");
  }
  return ERR_OK;
}
