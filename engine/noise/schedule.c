/* Scheduler configuration (diffusers' scheduler_config.json semantics) and the training noise
 * schedule. The float32 tables reproduce torch 1.13's CPU kernels exactly, because a one-ulp
 * difference in alpha_bar shows up as a mismatch against diffusers in every later step. */
#include "schedule.h"

#include "sched_keys.h"

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
    /* the DPM-Solver-v3 authors' sampler (dpm_solver_v3.DPM_Solver_v3) */
    {"DPM_Solver_v3", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    /* the USF executor (thu-nics/USF uni_sampler): every decision is in its schedule file */
    {"USF", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
    /* DPM-OT: its map names the solver it hands over to; no keys of its own */
    {"DPM_OT", NULL, LIN, SCHED_SPACING_LINSPACE, 0, 0, DPMPP, MID, 1, MS},
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
    "use_corrector",
    "predictor_pseudo",
    "corrector_pseudo",
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
/* v3 reads the model's dynamic thresholding keys as diffusers does (a deviation from the authors'
 * code, which has none: sampler_v3.c sampler_threshold_eps says why) */
static const char *const keys_dpm_v3[] = {"solver_order",
                                          "skip_type",
                                          "lower_order_final",
                                          "use_corrector",
                                          "predictor_pseudo",
                                          "corrector_pseudo",
                                          "lambda_min_clipped",
                                          "thresholding",
                                          "dynamic_thresholding_ratio",
                                          "sample_max_value",
                                          NULL};
static const char *const keys_usf[] = {"lambda_min_clipped", "thresholding",
                                       "dynamic_thresholding_ratio", "sample_max_value", NULL};
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
    {"DPM_Solver_v3", keys_dpm_v3},
    {"USF", keys_usf},
    {"DPM_OT", keys_none},
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

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

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
  sched_keys_defaults(cfg);
  /* the class's own defaults */
  cfg->beta_start = d->beta_start;
  cfg->beta_end = d->beta_end;
  cfg->beta_schedule = d->beta_schedule;
  cfg->timestep_spacing = d->spacing;
  cfg->set_alpha_to_one = d->set_alpha_to_one;
  cfg->clip_sample = d->clip_sample;
  cfg->algorithm_type = d->algorithm;
  cfg->solver_type = d->solver_type;
  cfg->lower_order_final = d->lower_order_final;
  cfg->method = d->method;
  /* the official code's numerical_clip_alpha; null (-inf) switches it off */
  if (strcmp(d->class_name, "DPM_Solver") == 0 || strcmp(d->class_name, "DPM_Solver_v3") == 0 ||
      strcmp(d->class_name, "USF") == 0)
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
                   obj ? sched_json_kind(obj) : "nothing");
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
    rc = sched_keys_apply(&tmp, key, v, &handled, e);
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
    if (lv && (rc = sched_keys_apply(&tmp, late[i], lv, &handled, e)) != ERR_OK)
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
