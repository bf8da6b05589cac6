/* The scheduler_config key schema: one row per key this engine models (its JSON name, type,
 * range or value names, default and the sched_config field it sets), as config/config.c does
 * for the daemon's config. Reading a key, writing the config back as JSON, the ranges the
 * errors and `sched_key_range` state and the defaults all come from the one table, so a key is
 * added in one place. Class-specific defaults and which class reads which key live beside the
 * classes in schedule.c. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched_keys.h"
#include "schedule.h"

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

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

/* Enum fields are written through their int representation by the table. */
_Static_assert(sizeof(sched_beta_schedule) == sizeof(int) &&
                   sizeof(sched_prediction) == sizeof(int) &&
                   sizeof(sched_spacing) == sizeof(int) && sizeof(sched_variance) == sizeof(int) &&
                   sizeof(sched_algorithm) == sizeof(int) &&
                   sizeof(sched_solver_type) == sizeof(int) &&
                   sizeof(sched_final_sigmas) == sizeof(int) && sizeof(sched_skip) == sizeof(int) &&
                   sizeof(sched_method) == sizeof(int),
               "scheduler enums are int-sized");

typedef enum {
  KEY_INT,    /* int field, range [lo, hi] */
  KEY_REAL,   /* double field, range with open or closed ends */
  KEY_BOOL,   /* int field, true/false (or 0/1); null is false, as diffusers tests flags */
  KEY_ENUM,   /* enum field, one of `names` */
  KEY_BETAS,  /* trained_betas: the owned float table, which also sets num_train_timesteps */
  KEY_STEPS,  /* disable_corrector: a list of step indices */
  KEY_LEGACY, /* predict_epsilon (diffusers <= 0.12): sets prediction_type, never written */
} key_type;

typedef struct sched_key {
  const char *name;
  size_t off; /* the sched_config field */
  key_type type;
  /* KEY_INT, KEY_REAL: the values every solver stays finite with. They hold diffusers' defaults
   * and every config in models/ and tests/fixtures with room to spare; what lies outside would
   * make a run non-finite (eta above 1 takes the square root of a negative variance in DDIM, a
   * beta of 1 empties alpha_bar) or means nothing. An open end excludes its bound: "(0, 1)". */
  double lo, hi;
  unsigned char lo_open, hi_open;
  unsigned char
      none_is_default;      /* KEY_REAL: null (None: "no bound") sets `def`, JSON has no -inf */
  const char *const *names; /* KEY_ENUM */
  int nnames;
  double def; /* the default every class starts from (an enum's index, a flag's 0 or 1) */
} sched_key;

#define F(k) #k, offsetof(sched_config, k)
#define INT(k, l, h, d)                                                                            \
  { F(k), .type = KEY_INT, .lo = l, .hi = h, .def = d }
#define REAL(k, l, h, lopen, hopen, d)                                                             \
  { F(k), .type = KEY_REAL, .lo = l, .hi = h, .lo_open = lopen, .hi_open = hopen, .def = d }
#define REAL_OR_NONE(k, l, h, lopen, hopen, d)                                                     \
  {                                                                                                \
    F(k), .type = KEY_REAL, .lo = l, .hi = h, .lo_open = lopen, .hi_open = hopen,                  \
          .none_is_default = 1, .def = d                                                           \
  }
#define BOOL(k, d)                                                                                 \
  { F(k), .type = KEY_BOOL, .def = d }
#define ENUM(k, list, d)                                                                           \
  { F(k), .type = KEY_ENUM, .names = list, .nnames = COUNT(list), .def = d }

/* In the order sched_config_to_json writes them. */
static const sched_key keys[] = {
    INT(num_train_timesteps, 1, SCHED_MAX_TRAIN_TIMESTEPS, 1000),
    REAL(beta_start, 0.0, 1.0, 1, 1, 1e-4),
    REAL(beta_end, 0.0, 1.0, 1, 1, 0.02),
    ENUM(beta_schedule, beta_names, SCHED_BETA_LINEAR),
    {F(trained_betas), .type = KEY_BETAS},
    BOOL(rescale_betas_zero_snr, 0),
    ENUM(prediction_type, pred_names, SCHED_PRED_EPSILON),
    {"predict_epsilon", offsetof(sched_config, prediction_type), .type = KEY_LEGACY},
    ENUM(timestep_spacing, spacing_names, SCHED_SPACING_LEADING),
    INT(steps_offset, 0, SCHED_MAX_TRAIN_TIMESTEPS, 0),
    BOOL(set_alpha_to_one, 0),
    BOOL(clip_sample, 0),
    REAL(clip_sample_range, 0.0, 1e6, 1, 0, 1.0),
    BOOL(thresholding, 0),
    REAL(dynamic_thresholding_ratio, 0.0, 1.0, 0, 0, 0.995),
    REAL(sample_max_value, 0.0, 1e6, 1, 0, 1.0),
    ENUM(variance_type, variance_names, SCHED_VAR_FIXED_SMALL),
    REAL(eta, 0.0, 1.0, 0, 0, 0.0),
    INT(solver_order, 1, 3, 2),
    ENUM(algorithm_type, algorithm_names, SCHED_ALGO_DPMSOLVER_PP),
    ENUM(solver_type, solver_type_names, SCHED_SOLVER_MIDPOINT),
    BOOL(lower_order_final, 1),
    BOOL(euler_at_final, 0),
    BOOL(use_karras_sigmas, 0),
    BOOL(use_lu_lambdas, 0),
    ENUM(final_sigmas_type, final_sigmas_names, SCHED_FINAL_ZERO),
    REAL_OR_NONE(lambda_min_clipped, -1e3, 1e3, 0, 0, -INFINITY),
    REAL_OR_NONE(sigma_min, 0.0, 1e6, 1, 0, NAN),
    REAL_OR_NONE(sigma_max, 0.0, 1e6, 1, 0, NAN),
    BOOL(predict_x0, 1),
    {F(disable_corrector), .type = KEY_STEPS},
    BOOL(skip_prk_steps, 0),
    ENUM(method, method_names, SCHED_METHOD_MULTISTEP),
    ENUM(skip_type, skip_names, SCHED_SKIP_TIME_UNIFORM),
    BOOL(denoise_to_zero, 0),
    BOOL(use_corrector, 1),
    BOOL(predictor_pseudo, 0),
    BOOL(corrector_pseudo, 0),
    REAL(rtol, 0.0, 1e3, 0, 0, 0.05),
    REAL(atol, 0.0, 1e3, 0, 0, 0.0078),
    REAL(h_init, 1e-6, 100.0, 0, 0, 0.05),
    REAL(theta, 1e-3, 1.0, 0, 0, 0.9),
    REAL(t_err, 1e-12, 1.0, 0, 0, 1e-5),
    REAL(thresholding_max_val, 0.0, 1e6, 1, 0, 1.0),
};
#undef F
#undef INT
#undef REAL
#undef REAL_OR_NONE
#undef BOOL
#undef ENUM

static const sched_key *find_key(const char *name) {
  for (int i = 0; i < COUNT(keys); i++)
    if (strcmp(keys[i].name, name) == 0)
      return &keys[i];
  return NULL;
}

static int *int_at(sched_config *cfg, const sched_key *k) {
  return (int *)(void *)((char *)cfg + k->off);
}
static double *real_at(sched_config *cfg, const sched_key *k) {
  return (double *)(void *)((char *)cfg + k->off);
}
static int int_of(const sched_config *cfg, const sched_key *k) {
  return *(const int *)(const void *)((const char *)cfg + k->off);
}
static double real_of(const sched_config *cfg, const sched_key *k) {
  return *(const double *)(const void *)((const char *)cfg + k->off);
}

void sched_keys_defaults(sched_config *cfg) {
  for (int i = 0; i < COUNT(keys); i++) {
    const sched_key *k = &keys[i];
    switch (k->type) {
    case KEY_INT:
    case KEY_BOOL:
    case KEY_ENUM: *int_at(cfg, k) = (int)k->def; break;
    case KEY_REAL: *real_at(cfg, k) = k->def; break;
    case KEY_BETAS: cfg->trained_betas = NULL; break;
    case KEY_STEPS: cfg->n_disable_corrector = 0; break;
    case KEY_LEGACY: break;
    }
  }
}

int sched_key_range(const char *key, char *buf, size_t n) {
  const sched_key *k = find_key(key);
  if (!k || (k->type != KEY_INT && k->type != KEY_REAL))
    return 0;
  snprintf(buf, n, "%c%.15g, %.15g%c", k->lo_open ? '(' : '[', k->lo, k->hi,
           k->hi_open ? ')' : ']');
  return 1;
}

/* ---- value parsing: each reader names the key in its message ---- */

const char *sched_json_kind(const json_t *v) {
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
                   sched_json_kind(v));
  }
  if (x < lo || x > hi)
    return err_set(e, ERR_INVALID, "scheduler config key '%s': %lld is out of range [%lld, %lld]",
                   key, x, lo, hi);
  *out = (int)x;
  return ERR_OK;
}

static int get_real(const sched_key *k, const json_t *v, double *out, err *e) {
  if (!json_is_number(v))
    return err_set(e, ERR_INVALID, "scheduler config key '%s': expected a number, got %s", k->name,
                   sched_json_kind(v));
  double x = json_number_value(v);
  if (!isfinite(x) || (k->lo_open ? x <= k->lo : x < k->lo) ||
      (k->hi_open ? x >= k->hi : x > k->hi)) {
    char range[96];
    sched_key_range(k->name, range, sizeof range);
    return err_set(e, ERR_INVALID, "scheduler config key '%s': %g is out of range %s", k->name, x,
                   range);
  }
  *out = x;
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
                 sched_json_kind(v));
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
                 sched_json_kind(v));
}

static int get_int_list(const char *key, const json_t *v, int *out, int max, int *n, err *e) {
  if (!json_is_array(v))
    return err_set(e, ERR_INVALID,
                   "scheduler config key '%s': expected a list of step indices, got %s", key,
                   sched_json_kind(v));
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
                   sched_json_kind(v));
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

/* JSON null: None is falsy where diffusers tests a flag ("elif self.config.clip_sample:"), means
 * "no bound" for lambda_min_clipped and the sigmas, and selects the default elsewhere. */
static void apply_null(sched_config *cfg, const sched_key *k) {
  switch (k->type) {
  case KEY_BOOL: *int_at(cfg, k) = 0; break;
  case KEY_REAL:
    if (k->none_is_default)
      *real_at(cfg, k) = k->def;
    break;
  case KEY_BETAS:
    free(cfg->trained_betas);
    cfg->trained_betas = NULL;
    break;
  case KEY_STEPS: cfg->n_disable_corrector = 0; break;
  case KEY_INT:
  case KEY_ENUM:
  case KEY_LEGACY: break;
  }
}

int sched_keys_apply(sched_config *cfg, const char *key, const json_t *v, int *handled, err *e) {
  const sched_key *k = find_key(key);
  *handled = k != NULL;
  if (!k)
    return ERR_OK;
  if (json_is_null(v)) {
    apply_null(cfg, k);
    return ERR_OK;
  }
  int rc = ERR_OK, iv = 0;
  double x = 0;
  switch (k->type) {
  case KEY_INT:
    if ((rc = get_int(k->name, v, (long long)k->lo, (long long)k->hi, &iv, e)) == ERR_OK)
      *int_at(cfg, k) = iv;
    break;
  case KEY_REAL:
    if ((rc = get_real(k, v, &x, e)) == ERR_OK)
      *real_at(cfg, k) = x;
    break;
  case KEY_BOOL:
    if ((rc = get_bool(k->name, v, &iv, e)) == ERR_OK)
      *int_at(cfg, k) = iv;
    break;
  case KEY_ENUM:
    if ((rc = get_enum(k->name, v, k->names, k->nnames, &iv, e)) == ERR_OK)
      *int_at(cfg, k) = iv;
    break;
  case KEY_BETAS: rc = get_trained_betas(v, cfg, e); break;
  case KEY_STEPS:
    rc = get_int_list(k->name, v, cfg->disable_corrector, SCHED_MAX_DISABLE_CORRECTOR,
                      &cfg->n_disable_corrector, e);
    break;
  case KEY_LEGACY: /* an explicit prediction_type in the same object wins (sched_config_apply_json)
                    */
    if ((rc = get_bool(k->name, v, &iv, e)) == ERR_OK)
      cfg->prediction_type = iv ? SCHED_PRED_EPSILON : SCHED_PRED_SAMPLE;
    break;
  }
  return rc;
}

static json_t *key_to_json(const sched_config *cfg, const sched_key *k) {
  switch (k->type) {
  case KEY_INT: return json_integer(int_of(cfg, k));
  case KEY_BOOL: return json_boolean(int_of(cfg, k));
  case KEY_ENUM: {
    const int iv = int_of(cfg, k);
    return json_string(iv >= 0 && iv < k->nnames ? k->names[iv] : "?");
  }
  case KEY_REAL: {
    const double x = real_of(cfg, k);
    return k->none_is_default && !isfinite(x) ? json_null() : json_real(x);
  }
  case KEY_BETAS: {
    if (!cfg->trained_betas)
      return json_null();
    json_t *a = json_array();
    for (int i = 0; a && i < cfg->num_train_timesteps; i++)
      json_array_append_new(a, json_real(cfg->trained_betas[i]));
    return a;
  }
  case KEY_STEPS: {
    json_t *a = json_array();
    for (int i = 0; a && i < cfg->n_disable_corrector; i++)
      json_array_append_new(a, json_integer(cfg->disable_corrector[i]));
    return a;
  }
  case KEY_LEGACY: break;
  }
  return NULL;
}

json_t *sched_config_to_json(const sched_config *cfg) {
  json_t *o = json_object();
  if (!o)
    return NULL;
  json_object_set_new(o, "_class_name", json_string(cfg->scheduler));
  for (int i = 0; i < COUNT(keys); i++)
    if (keys[i].type != KEY_LEGACY)
      json_object_set_new(o, keys[i].name, key_to_json(cfg, &keys[i]));
  return o;
}
