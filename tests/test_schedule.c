/* Scheduler config and training schedule against values dumped from diffusers
 * (tools/gen_sched_fixtures.py): bit-exact betas/alphas_cumprod, set_timesteps for every
 * spacing, from_config defaults, and errors that name the offending key. */
#include <glob.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <unistd.h>

#include "npy.h"
#include "schedule.h"
#include "testutil.h"

static json_t *load_cases(void) {
  char path[512];
  json_error_t je;
  json_t *root =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/sched/cases.json"), 0, &je);
  ck_assert_msg(root != NULL, "cannot read %s: %s", path, je.text);
  return root;
}

static void load_npy(const char *name, const char *suffix, npy_array *a) {
  char rel[256], path[512];
  err e = {0};
  snprintf(rel, sizeof rel, "tests/fixtures/sched/%s_%s.npy", name, suffix);
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), a, &e) == ERR_OK, "%s", e.msg);
}

START_TEST(beta_schedules_match_diffusers) {
  json_t *root = load_cases();
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(root, "schedules"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *cls = json_string_value(json_object_get(c, "scheduler"));
    int exact = json_is_true(json_object_get(c, "exact"));
    sched_config cfg;
    err e = {0};
    ck_assert_msg(sched_config_from_json(json_object_get(c, "config"), cls, 1, &cfg, &e) == 0,
                  "%s: %s", name, e.msg);
    npy_array betas, abar;
    load_npy(name, "betas", &betas);
    load_npy(name, "alphas_cumprod", &abar);
    const int n = cfg.num_train_timesteps;
    ck_assert_int_eq(betas.count, n);
    float *b = malloc(sizeof(float) * n), *a = malloc(sizeof(float) * n);
    double *a64 = malloc(sizeof(double) * n);
    ck_assert_int_eq(sched_betas(&cfg, b, &e), 0);
    ck_assert_int_eq(sched_alphas_cumprod(&cfg, a, &e), 0);
    ck_assert_int_eq(sched_alphas_cumprod_f64(&cfg, a64, &e), 0);
    int diff_b = 0, diff_a = 0;
    double worst = 0;
    for (int k = 0; k < n; k++) {
      diff_b += b[k] != betas.data[k];
      diff_a += a[k] != abar.data[k];
      double rel = fabs((double)a[k] - abar.data[k]) / fmax(fabs((double)abar.data[k]), 1e-30);
      worst = fmax(worst, rel);
      ck_assert(a64[k] == (double)a[k]);
    }
    if (exact) {
      ck_assert_msg(diff_b == 0 && diff_a == 0, "%s: %d betas and %d alphas_cumprod differ", name,
                    diff_b, diff_a);
    } else {
      ck_assert_msg(worst < 1e-6, "%s: alphas_cumprod max rel error %g", name, worst);
    }
    free(b);
    free(a);
    free(a64);
    npy_array_free(&betas);
    npy_array_free(&abar);
    sched_config_free(&cfg);
  }
  json_decref(root);
}
END_TEST

START_TEST(timesteps_match_diffusers) {
  json_t *root = load_cases();
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(root, "timesteps"), i, c) {
    const char *cls = json_string_value(json_object_get(c, "scheduler"));
    int n = (int)json_integer_value(json_object_get(c, "steps"));
    json_t *ref = json_object_get(c, "timesteps");
    sched_config cfg;
    err e = {0};
    ck_assert_msg(sched_config_from_json(json_object_get(c, "config"), cls, 1, &cfg, &e) == 0, "%s",
                  e.msg);
    int64_t *ts = malloc(sizeof(int64_t) * n);
    ck_assert_msg(sched_timesteps(&cfg, n, ts, &e) == 0, "case %zu: %s", i, e.msg);
    /* numpy's arange gives diffusers n + 1 trailing timesteps for some n, the last being -1;
     * the engine keeps the n real ones */
    ck_assert_int_ge(json_array_size(ref), (size_t)n);
    for (int k = 0; k < n; k++)
      ck_assert_msg(ts[k] == json_integer_value(json_array_get(ref, k)),
                    "case %zu (%s, %s, n=%d): timestep %d is %lld, diffusers %lld", i, cls,
                    sched_spacing_name(cfg.timestep_spacing), n, k, (long long)ts[k],
                    (long long)json_integer_value(json_array_get(ref, k)));
    for (int k = 0; k < n; k++)
      ck_assert(ts[k] >= 0 && ts[k] < cfg.num_train_timesteps);
    free(ts);
    sched_config_free(&cfg);
  }
  json_decref(root);
}
END_TEST

/* A scheduler built from another scheduler's config takes the target's defaults for missing
 * keys and the file's values for the rest, like diffusers' from_config. */
START_TEST(from_config_matches_diffusers) {
  json_t *root = load_cases();
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(root, "from_config"), i, c) {
    const char *cls = json_string_value(json_object_get(c, "scheduler"));
    sched_config cfg;
    err e = {0};
    ck_assert_msg(sched_config_from_json(json_object_get(c, "source"), cls, 0, &cfg, &e) == 0, "%s",
                  e.msg);
    json_t *mine = sched_config_to_json(&cfg);
    const char *key;
    json_t *want;
    json_object_foreach(json_object_get(c, "expect"), key, want) {
      json_t *got = json_object_get(mine, key);
      ck_assert_msg(got != NULL, "%s: key %s missing", cls, key);
      int same = json_is_number(want) ? json_number_value(want) == json_number_value(got)
                                      : json_equal(want, got);
      ck_assert_msg(same, "%s from %s: key %s is %s, diffusers %s", cls,
                    json_string_value(json_object_get(json_object_get(c, "source"), "_class_name")),
                    key, json_dumps(got, JSON_ENCODE_ANY), json_dumps(want, JSON_ENCODE_ANY));
    }
    json_decref(mine);
    sched_config_free(&cfg);
  }
  json_decref(root);
}
END_TEST

START_TEST(scheduler_defaults) {
  sched_config c;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&c, "ddim", &e), 0);
  ck_assert_str_eq(c.scheduler, "DDIMScheduler");
  ck_assert_int_eq(c.set_alpha_to_one, 1);
  ck_assert_int_eq(c.clip_sample, 1);
  ck_assert_int_eq(c.timestep_spacing, SCHED_SPACING_LEADING);
  ck_assert_int_eq(sched_config_init(&c, "DDPMScheduler", &e), 0);
  ck_assert_int_eq(c.set_alpha_to_one, 0);
  ck_assert_int_eq(c.variance_type, SCHED_VAR_FIXED_SMALL);
  ck_assert_int_eq(sched_config_init(&c, "DPMSolverMultistepScheduler", &e), 0);
  ck_assert_int_eq(c.timestep_spacing, SCHED_SPACING_LINSPACE);
  ck_assert_int_eq(c.clip_sample, 0);
  ck_assert_int_eq(sched_config_init(&c, "HeunDiscreteScheduler", &e), 0);
  ck_assert(c.beta_start == 0.00085 && c.beta_end == 0.012);
  ck_assert_int_ne(sched_config_init(&c, "NoSuchScheduler", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "NoSuchScheduler"));
  /* with no name the file's _class_name picks the defaults */
  json_t *o = json_pack("{s:s}", "_class_name", "DDIMScheduler");
  ck_assert_int_eq(sched_config_from_json(o, NULL, 0, &c, &e), 0);
  ck_assert_int_eq(c.set_alpha_to_one, 1);
  sched_config_free(&c);
  json_decref(o);
}
END_TEST

static void expect_bad(const char *json, int strict, const char *needle) {
  json_error_t je;
  json_t *o = json_loads(json, 0, &je);
  ck_assert_msg(o != NULL, "bad test json %s", json);
  sched_config c;
  err e = {0};
  int rc = sched_config_from_json(o, "ddim", strict, &c, &e);
  ck_assert_msg(rc != 0, "expected an error for %s", json);
  ck_assert_msg(strstr(e.msg, needle) != NULL, "error for %s is '%s', should name '%s'", json,
                e.msg, needle);
  json_decref(o);
}

START_TEST(bad_values_name_the_key) {
  expect_bad("{\"beta_schedule\": \"cubic\"}", 0, "beta_schedule");
  expect_bad("{\"beta_schedule\": 3}", 0, "beta_schedule");
  expect_bad("{\"num_train_timesteps\": -5}", 0, "num_train_timesteps");
  expect_bad("{\"num_train_timesteps\": 10.5}", 0, "num_train_timesteps");
  expect_bad("{\"num_train_timesteps\": \"1000\"}", 0, "num_train_timesteps");
  expect_bad("{\"beta_start\": \"small\"}", 0, "beta_start");
  expect_bad("{\"beta_end\": 1.5}", 0, "beta_end");
  expect_bad("{\"prediction_type\": \"flow_prediction\"}", 0, "prediction_type");
  expect_bad("{\"timestep_spacing\": \"uniform\"}", 0, "timestep_spacing");
  expect_bad("{\"clip_sample\": \"yes\"}", 0, "clip_sample");
  expect_bad("{\"clip_sample_range\": 0}", 0, "clip_sample_range");
  expect_bad("{\"variance_type\": \"huge\"}", 0, "variance_type");
  expect_bad("{\"trained_betas\": [0.1, -0.2]}", 0, "trained_betas");
  expect_bad("{\"trained_betas\": {\"a\": 1}}", 0, "trained_betas");
  expect_bad("{\"trained_betas\": [0.1, 0.2], \"num_train_timesteps\": 1000}", 0,
             "num_train_timesteps");
  expect_bad("{\"steps_offset\": 1000}", 0, "steps_offset");
  expect_bad("{\"eta\": -1}", 0, "eta");
  expect_bad("{\"dynamic_thresholding_ratio\": 2}", 0, "dynamic_thresholding_ratio");
  expect_bad("{\"rescale_betas_zero_snr\": \"no\"}", 0, "rescale_betas_zero_snr");
  /* unknown keys: an error only for user input */
  expect_bad("{\"frobnicate\": 1}", 1, "frobnicate");
  expect_bad("{\"frobnicate\": null}", 1, "frobnicate");
  const char *ok[] = {"{\"frobnicate\": 1}", "{\"solver_order\": 2, \"skip_prk_steps\": true}",
                      "{\"_diffusers_version\": \"0.1.1\", \"_anything\": [1]}",
                      "{\"variance_type\": null, \"trained_betas\": null}"};
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    json_t *o = json_loads(ok[i], 0, NULL);
    sched_config c;
    err e = {0};
    int strict = i > 0;
    ck_assert_msg(sched_config_from_json(o, "ddim", strict, &c, &e) == 0, "%s: %s", ok[i], e.msg);
    sched_config_free(&c);
    json_decref(o);
  }
}
END_TEST

START_TEST(failed_apply_leaves_config_unchanged) {
  sched_config c;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&c, "ddim", &e), 0);
  json_t *o = json_loads("{\"beta_end\": 0.03, \"timestep_spacing\": \"bogus\"}", 0, NULL);
  ck_assert_int_ne(sched_config_apply_json(&c, o, 1, &e), 0);
  ck_assert(c.beta_end == 0.02);
  json_decref(o);
  sched_config_free(&c);
}
END_TEST

START_TEST(text_overrides) {
  sched_config c;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&c, "ddim", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "beta_schedule=scaled_linear", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "beta_start=0.00085", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "clip_sample=False", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "set_alpha_to_one=false", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "thresholding=True", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "steps_offset=1", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "timestep_spacing=trailing", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "prediction_type=v_prediction", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "trained_betas=None", &e), 0);
  ck_assert_int_eq(sched_config_set(&c, "eta", "0.5", &e), 0);
  ck_assert_int_eq(c.beta_schedule, SCHED_BETA_SCALED_LINEAR);
  ck_assert(c.beta_start == 0.00085);
  ck_assert_int_eq(c.clip_sample, 0);
  ck_assert_int_eq(c.set_alpha_to_one, 0);
  ck_assert_int_eq(c.thresholding, 1);
  ck_assert_int_eq(c.steps_offset, 1);
  ck_assert_int_eq(c.timestep_spacing, SCHED_SPACING_TRAILING);
  ck_assert_int_eq(c.prediction_type, SCHED_PRED_V);
  ck_assert(c.eta == 0.5);
  ck_assert_int_eq(sched_config_set_override(&c, "trained_betas=[0.1, 0.2, 0.3]", &e), 0);
  ck_assert_int_eq(c.num_train_timesteps, 3);
  ck_assert_int_ne(sched_config_set_override(&c, "num_train_timesteps=10", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "num_train_timesteps"));
  ck_assert_int_eq(sched_config_set_override(&c, "trained_betas=null", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&c, "num_train_timesteps=10", &e), 0);

  ck_assert_int_ne(sched_config_set_override(&c, "beta_end=abc", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "beta_end"));
  ck_assert_int_ne(sched_config_set_override(&c, "no_equals_sign", &e), 0);
  ck_assert_int_ne(sched_config_set_override(&c, "=3", &e), 0);
  ck_assert_int_ne(sched_config_set_override(&c, "bogus_key=3", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "bogus_key"));
  sched_config_free(&c);
}
END_TEST

START_TEST(legacy_predict_epsilon) {
  sched_config c;
  err e = {0};
  json_t *o = json_loads("{\"predict_epsilon\": false}", 0, NULL);
  ck_assert_int_eq(sched_config_from_json(o, "ddpm", 0, &c, &e), 0);
  ck_assert_int_eq(c.prediction_type, SCHED_PRED_SAMPLE);
  sched_config_free(&c);
  json_decref(o);
  o = json_loads("{\"prediction_type\": \"v_prediction\", \"predict_epsilon\": false}", 0, NULL);
  ck_assert_int_eq(sched_config_from_json(o, "ddpm", 0, &c, &e), 0);
  ck_assert_int_eq(c.prediction_type, SCHED_PRED_V);
  sched_config_free(&c);
  json_decref(o);
}
END_TEST

/* JSON null keeps a default, but clears a flag: diffusers tests flags for truthiness. */
START_TEST(null_values) {
  sched_config c;
  err e = {0};
  json_t *o = json_loads("{\"clip_sample\": null, \"set_alpha_to_one\": null, "
                         "\"variance_type\": null, \"timestep_spacing\": null}",
                         0, NULL);
  ck_assert_int_eq(sched_config_from_json(o, "ddim", 1, &c, &e), 0);
  ck_assert_int_eq(c.clip_sample, 0);
  ck_assert_int_eq(c.set_alpha_to_one, 0);
  ck_assert_int_eq(c.variance_type, SCHED_VAR_FIXED_SMALL);
  ck_assert_int_eq(c.timestep_spacing, SCHED_SPACING_LEADING);
  sched_config_free(&c);
  json_decref(o);
}
END_TEST

/* Issue 13.1: every numeric key a request can set has a range that keeps runs finite, and the
 * error names the key and the range; every diffusers default and every config shipped in
 * models/ and tests/fixtures lies inside. */
static void expect_range(const char *json, const char *key, const char *range) {
  json_t *o = json_loads(json, 0, NULL);
  sched_config c;
  err e = {0};
  ck_assert_msg(sched_config_from_json(o, "ddim", 1, &c, &e) != 0, "%s was accepted", json);
  char want[64];
  snprintf(want, sizeof want, "'%s'", key);
  ck_assert_msg(strstr(e.msg, want) && strstr(e.msg, range), "%s: '%s' should name %s and %s", json,
                e.msg, want, range);
  json_decref(o);
}

START_TEST(ranges_keep_runs_finite) {
  expect_range("{\"eta\": 1e6}", "eta", "[0, 1]");
  expect_range("{\"eta\": 1.0001}", "eta", "[0, 1]");
  expect_range("{\"beta_start\": 1.0, \"beta_end\": 1.0}", "beta_start", "(0, 1)");
  expect_range("{\"beta_end\": 1.0}", "beta_end", "(0, 1)");
  expect_range("{\"beta_start\": 0}", "beta_start", "(0, 1)");
  expect_range("{\"sample_max_value\": 1e30}", "sample_max_value", "(0, 1000000]");
  expect_range("{\"clip_sample_range\": -1}", "clip_sample_range", "(0, 1000000]");
  expect_range("{\"dynamic_thresholding_ratio\": 1.5}", "dynamic_thresholding_ratio", "[0, 1]");
  expect_range("{\"sigma_max\": 1e30}", "sigma_max", "(0, 1000000]");
  expect_range("{\"sigma_min\": 0}", "sigma_min", "(0, 1000000]");
  expect_range("{\"lambda_min_clipped\": -1e30}", "lambda_min_clipped", "[-1000, 1000]");
  expect_range("{\"thresholding_max_val\": 0}", "thresholding_max_val", "(0, 1000000]");
  expect_range("{\"solver_order\": 4}", "solver_order", "[1, 3]");
  expect_range("{\"sigma_min\": 5, \"sigma_max\": 2}", "sigma_min", "below sigma_max");
  char r[64];
  ck_assert(sched_key_range("eta", r, sizeof r) && strcmp(r, "[0, 1]") == 0);
  ck_assert(!sched_key_range("beta_schedule", r, sizeof r));
  /* in range key by key, yet no signal left: alpha_bar underflows (linear 0.5 .. 0.9) */
  json_t *o = json_loads("{\"beta_start\": 0.5, \"beta_end\": 0.9}", 0, NULL);
  sched_config c;
  err e = {0};
  ck_assert_int_eq(sched_config_from_json(o, "ddim", 1, &c, &e), 0);
  float ab[1000];
  ck_assert_int_ne(sched_alphas_cumprod(&c, ab, &e), 0);
  ck_assert_msg(strstr(e.msg, "alphas_cumprod[") && strstr(e.msg, "beta_end"), "%s", e.msg);
  sched_config_free(&c);
  json_decref(o);
  /* the edges that stay: zero-SNR ends on 0 by design, cosine near 2e-9 */
  o = json_loads("{\"rescale_betas_zero_snr\": true, \"beta_schedule\": \"squaredcos_cap_v2\"}", 0,
                 NULL);
  ck_assert_int_eq(sched_config_from_json(o, "ddim", 1, &c, &e), 0);
  ck_assert_msg(sched_alphas_cumprod(&c, ab, &e) == 0, "%s", e.msg);
  sched_config_free(&c);
  json_decref(o);
  /* every class's defaults pass their own ranges (a round trip through its keys) */
  static const char *const classes[] = {"DDPMScheduler",
                                        "DDIMScheduler",
                                        "PNDMScheduler",
                                        "DPMSolverMultistepScheduler",
                                        "DPMSolverSinglestepScheduler",
                                        "UniPCMultistepScheduler",
                                        "DEISMultistepScheduler",
                                        "EulerDiscreteScheduler",
                                        "EulerAncestralDiscreteScheduler",
                                        "HeunDiscreteScheduler",
                                        "DPM_Solver",
                                        "PNDM_Official"};
  for (size_t i = 0; i < sizeof classes / sizeof *classes; i++) {
    ck_assert_int_eq(sched_config_init(&c, classes[i], &e), 0);
    json_t *j = sched_config_to_json_for(&c, classes[i]);
    sched_config d;
    ck_assert_msg(sched_config_from_json(j, classes[i], 1, &d, &e) == 0, "%s: %s", classes[i],
                  e.msg);
    ck_assert_msg(sched_alphas_cumprod(&d, ab, &e) == 0, "%s: %s", classes[i], e.msg);
    sched_config_free(&d);
    sched_config_free(&c);
    json_decref(j);
  }
  /* every scheduler_config.json shipped */
  static const char *const patterns[] = {"models/*/scheduler_config.json",
                                         "tests/fixtures/*/*/scheduler_config.json",
                                         "tests/fixtures/*/scheduler_config.json"};
  int files = 0;
  for (size_t p = 0; p < sizeof patterns / sizeof *patterns; p++) {
    char pat[512];
    glob_t g;
    if (glob(test_src_path(pat, sizeof pat, patterns[p]), 0, NULL, &g) != 0)
      continue;
    for (size_t k = 0; k < g.gl_pathc; k++, files++) {
      ck_assert_msg(sched_config_load_file(g.gl_pathv[k], NULL, 0, &c, &e) == 0, "%s: %s",
                    g.gl_pathv[k], e.msg);
      float *t = malloc((size_t)c.num_train_timesteps * sizeof *t);
      ck_assert_msg(sched_alphas_cumprod(&c, t, &e) == 0, "%s: %s", g.gl_pathv[k], e.msg);
      free(t);
      sched_config_free(&c);
    }
    globfree(&g);
  }
  ck_assert_int_ge(files, 10);
}
END_TEST

START_TEST(files_and_ranges) {
  char path[512];
  sched_config c;
  err e = {0};
  ck_assert_int_eq(
      sched_config_load_file(
          test_src_path(path, sizeof path, "tests/fixtures/gmm/mix3/scheduler_config.json"), "ddim",
          0, &c, &e),
      0);
  ck_assert_str_eq(c.scheduler, "DDIMScheduler");
  ck_assert_int_eq(c.set_alpha_to_one, 1);
  int64_t ts[1000];
  ck_assert_int_ne(sched_timesteps(&c, 0, ts, &e), 0);
  ck_assert_int_ne(sched_timesteps(&c, 1001, ts, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "num_inference_steps"));
  ck_assert_int_eq(sched_config_set(&c, "steps_offset", "1", &e), 0);
  ck_assert_int_ne(sched_timesteps(&c, 1000, ts, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "steps_offset"));
  ck_assert_int_eq(sched_config_set(&c, "timestep_spacing", "\"trailing\"", &e), 0);
  ck_assert_int_eq(sched_timesteps(&c, 61, ts, &e), 0);
  ck_assert_int_eq(ts[0], 999);
  ck_assert_int_ge(ts[60], 0);
  /* a zero beta would divide by zero in every solver: refused as the key is set */
  ck_assert_int_ne(sched_config_set(&c, "beta_start", "0", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "'beta_start'"));
  sched_config_free(&c);
  ck_assert_int_ne(sched_config_load_file("/nonexistent/scheduler_config.json", NULL, 0, &c, &e),
                   0);
  ck_assert_int_eq(e.code, ERR_FORMAT);
}
END_TEST

/* diffusers writes -Infinity, Infinity and NaN, which are not JSON: outside strings they read as
 * null. NaN is one byte shorter than null; replacing it in place wrote past it (found by
 * tests/fuzz/fuzz_scheduler_config.c: tests/fuzz/regressions/scheduler_config). */
START_TEST(nonfinite_words_read_as_null) {
  char dir[64], path[128], src[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/scheduler_config.json", dir);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs("{\"eta\": NaN, \"lambda_min_clipped\": -Infinity, \"sigma_max\": Infinity,\n"
        " \"note\": \"NaN, \\\"Infinity\\\" stay text\", \"last\":NaN}",
        f);
  ck_assert_int_eq(fclose(f), 0);
  err e = {0};
  json_t *j = sched_config_read_json(path, &e);
  ck_assert_msg(j != NULL, "%s", e.msg);
  ck_assert(json_is_null(json_object_get(j, "eta")));
  ck_assert(json_is_null(json_object_get(j, "lambda_min_clipped")));
  ck_assert(json_is_null(json_object_get(j, "sigma_max")));
  ck_assert(json_is_null(json_object_get(j, "last")));
  ck_assert_str_eq(json_string_value(json_object_get(j, "note")), "NaN, \"Infinity\" stay text");
  json_decref(j);
  /* the fuzzer's input, a NaN outside any string in broken JSON: refused as bad JSON */
  sched_config c;
  ck_assert_int_eq(
      sched_config_load_file(
          test_src_path(src, sizeof src, "tests/fuzz/regressions/scheduler_config/nan-overwrites"),
          NULL, 0, &c, &e),
      ERR_FORMAT);
  unlink(path);
  rmdir(dir);
}
END_TEST

START_TEST(json_round_trip) {
  sched_config a, b;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&a, "ddim", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&a, "beta_schedule=squaredcos_cap_v2", &e), 0);
  ck_assert_int_eq(sched_config_set_override(&a, "thresholding=true", &e), 0);
  json_t *j = sched_config_to_json(&a);
  ck_assert_int_eq(sched_config_from_json(j, NULL, 1, &b, &e), 0);
  ck_assert_str_eq(b.scheduler, "DDIMScheduler");
  ck_assert_int_eq(b.beta_schedule, SCHED_BETA_SQUAREDCOS_CAP_V2);
  ck_assert_int_eq(b.thresholding, 1);
  float x[1000], y[1000];
  ck_assert_int_eq(sched_alphas_cumprod(&a, x, &e), 0);
  ck_assert_int_eq(sched_alphas_cumprod(&b, y, &e), 0);
  ck_assert_int_eq(memcmp(x, y, sizeof x), 0);
  sched_config c;
  ck_assert_int_eq(sched_config_copy(&c, &b, &e), 0);
  sched_config_free(&c);
  json_decref(j);
  sched_config_free(&a);
  sched_config_free(&b);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("schedule");
  TCase *tc = tcase_create("schedule");
  tcase_add_test(tc, beta_schedules_match_diffusers);
  tcase_add_test(tc, timesteps_match_diffusers);
  tcase_add_test(tc, from_config_matches_diffusers);
  tcase_add_test(tc, scheduler_defaults);
  tcase_add_test(tc, bad_values_name_the_key);
  tcase_add_test(tc, failed_apply_leaves_config_unchanged);
  tcase_add_test(tc, text_overrides);
  tcase_add_test(tc, legacy_predict_epsilon);
  tcase_add_test(tc, null_values);
  tcase_add_test(tc, files_and_ranges);
  tcase_add_test(tc, ranges_keep_runs_finite);
  tcase_add_test(tc, json_round_trip);
  tcase_add_test(tc, nonfinite_words_read_as_null);
  suite_add_tcase(s, tc);
  return s;
}
