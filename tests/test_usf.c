/* USF: the schedule executor against the authors' uni_sampler on the exact mixture model
 * (tools/gen_usf_fixtures.py, decision sets covering every option), its reduction to the official
 * DPM-Solver(++) multistep on a UNet with guidance and on other prediction types, the paper-style
 * implicit corrector's extra evaluations, the schedule file's validation, and tools/usf_convert.py
 * on decisions saved as the authors ship them. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "guidance.h"
#include "model.h"
#include "npy.h"
#include "sampler.h"
#include "testutil.h"

static model *load(const char *rel) {
  char path[512];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s", e.msg);
  return m;
}

/* Runs spec on m from init into out; returns the NFE (checked against the plan). */
static int run_spec(const model *m, json_t *spec, const sampler_run_opts *base, float *out) {
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(sampler_new_from_json(spec, model_scheduler_config(m), &s, &e) == 0, "%s", e.msg);
  int nfe = 0;
  ck_assert_msg(sampler_run(s, m, base, out, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(nfe, sampler_nfe(s));
  sampler_free(s);
  return nfe;
}

static json_t *usf_spec(const char *path) {
  return json_pack("{s:s, s:s}", "name", "usf", "data", path);
}

START_TEST(matches_authors_code) {
  char path[512];
  json_error_t je;
  json_t *cases =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/usf/cases.json"), 0, &je);
  ck_assert_msg(cases != NULL, "%s", je.text);
  model *m = load("tests/fixtures/gmm/mix3");
  const int batch = (int)json_integer_value(json_object_get(cases, "batch"));
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(cases, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    char rel[256], sched[512];
    npy_array init = {0}, want = {0};
    err e = {0};
    snprintf(rel, sizeof rel, "tests/fixtures/usf/%s_init.npy", name);
    ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &init, &e) == 0, "%s", e.msg);
    snprintf(rel, sizeof rel, "tests/fixtures/usf/%s_out.npy", name);
    ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &want, &e) == 0, "%s", e.msg);
    snprintf(rel, sizeof rel, "tests/fixtures/usf/%s.json", name);
    json_t *spec = usf_spec(test_src_path(sched, sizeof sched, rel));
    float *out = malloc(want.count * sizeof *out);
    sampler_run_opts o = {.batch = batch, .init_noise = init.data, .threads = 1};
    const int nfe = run_spec(m, spec, &o, out);
    ck_assert_int_eq(nfe, json_integer_value(json_object_get(c, "nfe")));
    const double rel_err = test_rel_l2(out, want.data, want.count);
    if (getenv("DENOISED_USF_VERBOSE"))
      fprintf(stderr, "%s: %.3g (%d NFE)\n", name, rel_err, nfe);
    ck_assert_msg(rel_err < 1e-5, "%s: relative L2 %g against the authors' uni_sampler", name,
                  rel_err);
    free(out);
    json_decref(spec);
    npy_array_free(&init);
    npy_array_free(&want);
  }
  model_free(m);
  json_decref(cases);
}
END_TEST

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(text, f);
  fclose(f);
}

/* Writes a USF schedule at the times of the official DPM_Solver multistep run `dpm` (the labels
 * of its evaluations and the final label 0, as the engine's continuous time t = (u + 1) / n,
 * where n - 1 is the first label of a time_uniform run), every step of `pred` prediction at
 * order 2 (1 first) with the default derivative estimate. */
static void schedule_like(const model *m, json_t *dpm, const char *pred, const char *path) {
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(sampler_new_from_json(dpm, model_scheduler_config(m), &s, &e) == 0, "%s", e.msg);
  json_t *tu = json_pack("{s:s, s:i, s:{s:s, s:s}}", "name", "DPM_Solver", "steps", 2, "options",
                         "method", "multistep", "skip_type", "time_uniform");
  sampler *su = NULL;
  ck_assert_msg(sampler_new_from_json(tu, model_scheduler_config(m), &su, &e) == 0, "%s", e.msg);
  const double n = sampler_timesteps(su)[0] + 1;
  const int N = sampler_num_steps(s);
  json_t *ts = json_array(), *steps = json_array();
  for (int k = 0; k <= N; k++) {
    json_array_append_new(ts, json_real(((k < N ? sampler_timesteps(s)[k] : 0) + 1) / n));
    if (k < N)
      json_array_append_new(steps, json_pack("{s:s, s:i}", "prediction", pred, "order", k ? 2 : 1));
  }
  json_t *h = json_pack("{s:s, s:i, s:s, s:o, s:o}", "format", "denoised-usf-schedule", "version",
                        1, "time", "t", "timesteps", ts, "steps", steps);
  ck_assert_int_eq(json_dump_file(h, path, JSON_REAL_PRECISION(17)), 0);
  json_decref(h);
  json_decref(tu);
  sampler_free(s);
  sampler_free(su);
}

/* Data (noise) prediction at order 2 from the previous point is the official DPM-Solver++
 * (DPM-Solver) 2M in its Taylor ("heun") form: on the same times the two agree, on a
 * class-conditional UNet under classifier-free guidance and on the mixture model predicting v or
 * x0; and with dynamic thresholding where the config asks (a deviation from the authors' code,
 * as for v3), on wide2, whose x0 leaves [-1, 1], against the official code's thresholding with
 * the same scale (diffusers' rule with a large sample_max_value is max(quantile, 1)). */
START_TEST(reduces_to_multistep_dpm_solver) {
  static const struct {
    const char *model, *algo, *pred;
    double scale;
    int thr;
  } cases[] = {
      {"tests/fixtures/unet/classcond_small", "dpmsolver++", "data", 3.0, 0},
      {"tests/fixtures/unet/classcond_small", "dpmsolver", "noise", 2.0, 0},
      {"tests/fixtures/gmm/mix3_v", "dpmsolver++", "data", 0, 0},
      {"tests/fixtures/gmm/mix3_sample", "dpmsolver", "noise", 0, 0},
      {"tests/fixtures/gmm/wide2", "dpmsolver++", "data", 0, 1},
  };
  char dir[64], path[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/s.json", dir);
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    model *m = load(cases[c].model);
    const model_info *mi = model_get_info(m);
    const int B = 2;
    const size_t n = (size_t)B * mi->in_channels * mi->sample_size * mi->sample_size;
    float *init = malloc(n * sizeof *init), *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++)
      init[i] = (float)sin(0.37 * (double)i + 1.0) * 1.3f;
    int64_t labels[2] = {1, 0};
    guidance g = guidance_for(m, cases[c].scale);
    sampler_run_opts o = {.batch = B, .init_noise = init, .threads = 1};
    if (cases[c].scale > 0) {
      o.labels = labels;
      o.guidance = &g;
    }
    json_t *dpm =
        json_pack("{s:s, s:i, s:{s:s, s:s, s:s, s:s, s:i, s:b}}", "name", "DPM_Solver", "steps", 6,
                  "options", "method", "multistep", "algorithm_type", cases[c].algo, "solver_type",
                  "heun", "skip_type", "logSNR", "solver_order", 2, "lower_order_final", 0);
    schedule_like(m, dpm, cases[c].pred, path);
    json_t *spec = usf_spec(path);
    if (cases[c].thr) {
      json_object_set_new(spec, "options",
                          json_pack("{s:b, s:f, s:f}", "thresholding", 1,
                                    "dynamic_thresholding_ratio", 0.6, "sample_max_value", 1e5));
      json_t *t = json_pack("{s:b, s:f, s:f}", "thresholding", 1, "dynamic_thresholding_ratio", 0.6,
                            "thresholding_max_val", 1.0);
      json_object_update(json_object_get(dpm, "options"), t);
      json_decref(t);
      /* control: unthresholded, USF is far from the thresholded run */
      json_t *plain = usf_spec(path);
      ck_assert_int_eq(run_spec(m, plain, &o, a), run_spec(m, dpm, &o, b));
      ck_assert_msg(test_rel_l2(a, b, n) > 1e-2, "thresholding not seen (%g)",
                    test_rel_l2(a, b, n));
      json_decref(plain);
    }
    ck_assert_int_eq(run_spec(m, spec, &o, a), run_spec(m, dpm, &o, b));
    const double r = test_rel_l2(a, b, n);
    ck_assert_msg(r < 1e-5, "%s %s: relative L2 %g against DPM_Solver multistep", cases[c].model,
                  cases[c].pred, r);
    json_decref(dpm);
    json_decref(spec);
    free(init);
    free(a);
    free(b);
    model_free(m);
  }
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* A schedule of 4 data-prediction steps whose steps 1-3 have a corrector of `type` (of orders
 * 2, 3, 2 from the point before the new one). */
static const char *corr_schedule(char *buf, size_t n, const char *type) {
  char c[3][128];
  for (int k = 0; k < 3; k++)
    snprintf(c[k], sizeof c[k],
             strcmp(type, "none") == 0 ? "{\"type\": \"none\"}"
                                       : "{\"type\": \"%s\", \"order\": %d, \"start_point\": -2}",
             type, k == 1 ? 3 : 2);
  snprintf(buf, n,
           "{\"format\": \"denoised-usf-schedule\", \"version\": 1, \"time\": \"lambda\", "
           "\"timesteps\": [-3, -1.5, 0, 1.5, 3], \"steps\": ["
           "{\"prediction\": \"data\", \"order\": 1},"
           "{\"prediction\": \"data\", \"order\": 2, \"corrector\": %s},"
           "{\"prediction\": \"data\", \"order\": 2, \"corrector\": %s},"
           "{\"prediction\": \"data\", \"order\": 2, \"corrector\": %s}]}",
           c[0], c[1], c[2]);
  return buf;
}

/* "pseudo" keeps the evaluation at the predicted point (the authors' code for every corrector);
 * "implicit" evaluates again at the corrected point (the paper), except after the last step:
 * two more evaluations here, and a different result. Both correct towards the same solution:
 * closer to a 200-step solve than without a corrector. */
START_TEST(implicit_corrector_evaluates_again) {
  char dir[64], path[512], text[2048];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/c.json", dir);
  model *m = load("tests/fixtures/gmm/mix3");
  enum { B = 2, N = B * 192 };
  float init[N], none[N] = {0}, pseudo[N] = {0}, impl[N] = {0}, ref[N] = {0};
  for (int i = 0; i < N; i++)
    init[i] = (float)cos(0.91 * i) * 1.1f;
  sampler_run_opts o = {.batch = B, .init_noise = init, .threads = 1};
  const char *types[] = {"none", "pseudo", "implicit"};
  float *outs[] = {none, pseudo, impl};
  int nfe[3];
  for (int k = 0; k < 3; k++) {
    write_text(path, corr_schedule(text, sizeof text, types[k]));
    json_t *spec = usf_spec(path);
    nfe[k] = run_spec(m, spec, &o, outs[k]);
    json_decref(spec);
  }
  ck_assert_int_eq(nfe[0], 4);
  ck_assert_int_eq(nfe[1], 5); /* the last step's corrector needs its evaluation */
  ck_assert_int_eq(nfe[2], 7);
  ck_assert_msg(test_rel_l2(pseudo, impl, N) > 1e-4, "implicit = pseudo");
  /* the converged solution of the same ODE span: 200 data-prediction steps of order 3 */
  json_t *ts = json_array(), *steps = json_array();
  for (int k = 0; k <= 200; k++) {
    json_array_append_new(ts, json_real(-3 + 6.0 * k / 200));
    if (k < 200)
      json_array_append_new(
          steps, json_pack("{s:s, s:i}", "prediction", "data", "order", k < 2 ? k + 1 : 3));
  }
  json_t *h = json_pack("{s:s, s:i, s:s, s:o, s:o}", "format", "denoised-usf-schedule", "version",
                        1, "time", "lambda", "timesteps", ts, "steps", steps);
  json_dump_file(h, path, JSON_REAL_PRECISION(17));
  json_decref(h);
  json_t *spec = usf_spec(path);
  run_spec(m, spec, &o, ref);
  json_decref(spec);
  const double en = test_rel_l2(none, ref, N), ep = test_rel_l2(pseudo, ref, N),
               ei = test_rel_l2(impl, ref, N);
  ck_assert_msg(ep < en && ei < en, "errors: none %g, pseudo %g, implicit %g", en, ep, ei);
  model_free(m);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* Builds the sampler (and runs it when that succeeds, for errors only a run can see); the error
 * must contain needle. */
static void expect_error(const model *m, const char *path, const char *text, json_t *extra,
                         const char *needle) {
  write_text(path, text);
  json_t *spec = usf_spec(path);
  if (extra)
    json_object_update(spec, extra);
  sampler *s = NULL;
  err e = {0};
  int rc = sampler_new_from_json(spec, model_scheduler_config(m), &s, &e);
  if (rc == 0) {
    float x[192], out[192];
    for (int i = 0; i < 192; i++)
      x[i] = 0.1f;
    sampler_run_opts o = {.batch = 1, .init_noise = x, .threads = 1};
    rc = sampler_run(s, m, &o, out, NULL, &e);
    sampler_free(s);
  }
  ck_assert_msg(rc != 0, "expected an error containing '%s' for %s", needle, text);
  ck_assert_msg(strstr(e.msg, needle) != NULL, "error '%s' lacks '%s'", e.msg, needle);
  json_decref(spec);
}

#define HEAD "{\"format\": \"denoised-usf-schedule\", \"version\": 1, "
#define TS3 "\"time\": \"lambda\", \"timesteps\": [-2, 0, 1, 2], "
#define S1 "{\"prediction\": \"data\", \"order\": 1}"

START_TEST(schedule_validated) {
  static const struct {
    const char *text, *needle;
  } cases[] = {
      {"{\"fmt\": \"x\"}", "top level: unknown key 'fmt'"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"steps\": [" S1 "], \"v\": 1}",
       "top level: unknown key 'v'"},
      {"{\"format\": \"denoised-usf-schedule\", \"version\": 2, \"time\": \"t\"}",
       "not a USF schedule"},
      {HEAD "\"timesteps\": [0, 1], \"steps\": [" S1 "]}", "'time' is required"},
      {HEAD "\"time\": \"sigma\", \"timesteps\": [0, 1], \"steps\": [" S1 "]}",
       "time: expected one of \"lambda\", \"t\""},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1, 2], \"steps\": [" S1 "]}",
       "timesteps: expected 2 values"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, \"1\"], \"steps\": [" S1 "]}",
       "timesteps[1]: expected a finite number"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"steps\": []}", "steps: expected"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"x0\", \"order\": 1}]}",
       "steps[2].prediction: expected one of"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"order\": 1}]}",
       "steps[2]: 'prediction' is required"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 5}]}",
       "steps[2].order: expected an integer in [1, 4]"},
      {HEAD TS3 "\"steps\": [" S1 ", {\"prediction\": \"data\", \"order\": 1, \"start_point\": "
                "-3}, " S1 "]}",
       "steps[1].start_point: expected an integer in [-2, -1]"},
      {HEAD TS3 "\"steps\": [{\"prediction\": \"data\", \"order\": 2}, " S1 "," S1 "]}",
       "steps[0].derivatives[0]: derivative 1 needs 1 earlier points"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"estimate\": 1, \"points\": [-1]}]}]}",
       "steps[2].derivatives[0].points[0]: expected an offset in [-3, -1] other than the start"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"estimate\": 2, \"points\": [-2, -2]}]}]}",
       "points[1]: -2 appears twice"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"estimate\": 3}]}]}",
       "steps[2].derivatives[0].estimate: expected an integer in [1, 2]"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 3, "
                "\"derivatives\": [{}, {\"relaxation\": \"linear\"}]}]}",
       "steps[2].derivatives[1]: only the first derivative can be relaxed"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"relaxation\": \"linear\", \"coefficient\": 1e3}]}]}",
       "derivatives[0].coefficient: expected a finite number in [-100, 100]"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"relaxation\": \"unipc-bh1\", \"coefficient\": 1}]}]}",
       "'coefficient' goes with relaxation \"linear\" only"},
      {HEAD TS3 "\"steps\": [" S1 "," S1 ", {\"prediction\": \"data\", \"order\": 2, "
                "\"derivatives\": [{\"relaxation\": \"cubic\"}]}]}",
       "derivatives[0].relaxation: expected one of"},
      {HEAD TS3 "\"steps\": [" S1 ", {\"prediction\": \"data\", \"order\": 1, \"corrector\": "
                "{\"type\": \"pseudo\", \"order\": 2, \"start_point\": -1}}, " S1 "]}",
       "steps[1].corrector.start_point: expected an integer in [-3, -2]"},
      {HEAD TS3 "\"steps\": [" S1 ", {\"prediction\": \"data\", \"order\": 1, \"corrector\": "
                "{\"type\": \"pseudo\", \"start_point\": -2}}, " S1 "]}",
       "steps[1].corrector: 'order' is required"},
      {HEAD TS3 "\"steps\": [" S1 ", {\"prediction\": \"data\", \"order\": 1, \"corrector\": "
                "{\"type\": \"later\"}}, " S1 "]}",
       "steps[1].corrector.type: expected one of \"none\", \"pseudo\", \"implicit\""},
      {HEAD TS3 "\"steps\": [" S1 ", {\"prediction\": \"data\", \"order\": 1, \"corrector\": "
                "{\"type\": \"none\", \"order\": 2}}, " S1 "]}",
       "takes no other keys"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1, 1, 2], \"steps\": [" S1 "," S1 "," S1 "]}",
       "timesteps[2]: lambda must increase"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [-20, 1], \"steps\": [" S1 "]}",
       "timesteps[0] = -20 is outside the model schedule's lambda range"},
      {HEAD "\"time\": \"t\", \"timesteps\": [1.5, 0.5], \"steps\": [" S1 "]}",
       "timesteps[0] = 1.5 is outside the model schedule's t range"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"steps\": [{\"prediction\": \"v3\", "
            "\"order\": 1}]}",
       "v3-type steps need DPM-Solver-v3 statistics"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"statistics\": \"../s.json\", "
            "\"steps\": [" S1 "]}",
       "statistics: expected the name of a DPM-Solver-v3 statistics file beside the schedule"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"statistics\": \"none.json\", "
            "\"steps\": [" S1 "]}",
       "statistics file"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"first_step\": \"average_x0\", "
            "\"steps\": [" S1 "]}",
       "average_x0: is given exactly when first_step is \"average_x0\""},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"first_step\": \"average_x0\", "
            "\"average_x0\": [1, 2], \"steps\": [" S1 "]}",
       "average_x0 has 2 values, the run's images 192"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"skip_coefficients\": [1, 0.9], "
            "\"steps\": [" S1 "]}",
       "skip connections is not supported"},
      {HEAD "\"time\": \"lambda\", \"timesteps\": [0, 1], \"time\": \"t\", \"steps\": [" S1 "]}",
       "duplicate object key"},
      {"[1, 2", "USF schedule"},
  };
  char dir[64], path[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/u.json", dir);
  model *m = load("tests/fixtures/gmm/mix3");
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    expect_error(m, path, cases[i].text, NULL, cases[i].needle);
  /* the schedule fixes the steps; a contradicting count is an error, the same count is fine */
  const char *ok = HEAD TS3 "\"steps\": [" S1 "," S1 "," S1 "]}";
  json_t *x = json_pack("{s:i}", "steps", 4);
  expect_error(m, path, ok, x, "the USF schedule has 3 steps; steps 4 contradicts it");
  json_decref(x);
  json_t *spec = json_pack("{s:s, s:s, s:i}", "name", "usf", "data", path, "steps", 3);
  float in[192], out[192];
  for (int i = 0; i < 192; i++)
    in[i] = 0.2f;
  sampler_run_opts o = {.batch = 1, .init_noise = in, .threads = 1};
  ck_assert_int_eq(run_spec(m, spec, &o, out), 3);
  json_decref(spec);
  /* no schedule at all */
  spec = json_pack("{s:s}", "name", "usf");
  sampler *s = NULL;
  err e = {0};
  ck_assert_int_ne(sampler_new_from_json(spec, model_scheduler_config(m), &s, &e), 0);
  ck_assert_msg(strstr(e.msg, "usf needs a solver schedule") != NULL, "%s", e.msg);
  json_decref(spec);
  model_free(m);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* The command line: `sample --scheduler usf --solver-data FILE` reports the schedule's NFE. */
START_TEST(cli_runs_a_schedule) {
  char out[8192], model[1024], sched[1024], tmp[256];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  test_src_path(sched, sizeof sched, "tests/fixtures/usf/order4_lastcorr.json");
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s --scheduler usf --solver-data %s --seed 4 --batch "
                             "2 --out %s/x.npy",
                             model, sched, tmp) == 0,
                "%s", out);
  ck_assert_msg(strstr(out, "6 steps, 7 NFE") != NULL, "%s", out);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s --scheduler usf --steps 5 --solver-data %s --out "
                             "%s/x.npy",
                             model, sched, tmp) != 0,
                "%s", out);
  ck_assert_msg(strstr(out, "steps 5 contradicts it") != NULL, "%s", out);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* Runs a shell command, its output (stdout and stderr) into out; returns the exit status. */
static int run_sh(char *out, size_t n, const char *cmd) {
  char full[4096];
  snprintf(full, sizeof full, "%s 2>&1", cmd);
  FILE *p = popen(full, "r");
  ck_assert_ptr_nonnull(p);
  size_t k = fread(out, 1, n - 1, p);
  out[k] = 0;
  const int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* tools/usf_convert.py on the decisions of the fixture cases saved as the authors ship schedules
 * (torch.save; one as the latent-diffusion files, [decisions, score] with numpy scalars; one with
 * their "implicit" corrector): each converted schedule reproduces the authors' output, so the
 * converter and the executor agree with uni_sampler end to end. A .pth whose pickle would call
 * os.system is refused, naming the global, and nothing runs. */
START_TEST(converter_reproduces_cases) {
  if (system("command -v python3 >/dev/null 2>&1") != 0) {
    fprintf(stderr, "test_usf: converter SKIPPED: python3 not installed\n");
    return;
  }
  char tool[512], fix[512], dir[64], cmd[4096], out[4096], path[600];
  test_src_path(tool, sizeof tool, "tools/usf_convert.py");
  test_src_path(fix, sizeof fix, "tests/fixtures/usf");
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(cmd, sizeof cmd, "cp %s/stats.json %s/stats.npy %s/", fix, fix, dir);
  ck_assert_int_eq(system(cmd), 0);
  snprintf(path, sizeof path, "%s/cases.json", fix);
  json_t *cases = json_load_file(path, 0, NULL);
  ck_assert_ptr_nonnull(cases);
  model *m = load("tests/fixtures/gmm/mix3");
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(cases, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    snprintf(cmd, sizeof cmd,
             "python3 %s %s/%s.pth --time edm --statistics stats.json --average-x0 "
             "%s/average_x0.pth -o %s/%s.json",
             tool, fix, name, fix, dir, name);
    ck_assert_msg(run_sh(out, sizeof out, cmd) == 0, "%s: %s", name, out);
    npy_array init = {0}, want = {0};
    err e = {0};
    snprintf(path, sizeof path, "%s/%s_init.npy", fix, name);
    ck_assert_msg(npy_read_f32(path, &init, &e) == 0, "%s", e.msg);
    snprintf(path, sizeof path, "%s/%s_out.npy", fix, name);
    ck_assert_msg(npy_read_f32(path, &want, &e) == 0, "%s", e.msg);
    snprintf(path, sizeof path, "%s/%s.json", dir, name);
    json_t *spec = usf_spec(path);
    float *x = malloc(want.count * sizeof *x);
    sampler_run_opts o = {.batch = 2, .init_noise = init.data, .threads = 1};
    run_spec(m, spec, &o, x);
    const double r = test_rel_l2(x, want.data, want.count);
    ck_assert_msg(r < 1e-5, "%s converted: relative L2 %g against the authors' uni_sampler", name,
                  r);
    free(x);
    json_decref(spec);
    npy_array_free(&init);
    npy_array_free(&want);
  }
  snprintf(cmd, sizeof cmd, "python3 %s %s/refused.pth -o %s/r.json", tool, fix, dir);
  ck_assert_int_eq(run_sh(out, sizeof out, cmd), 1);
  ck_assert_msg(strstr(out, "global os.system at byte 2 is not one a schedule needs") != NULL, "%s",
                out);
  snprintf(path, sizeof path, "%s/r.json", dir);
  ck_assert_int_ne(access(path, F_OK), 0);
  model_free(m);
  json_decref(cases);
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("usf");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, matches_authors_code);
  tcase_add_test(tc, reduces_to_multistep_dpm_solver);
  tcase_add_test(tc, implicit_corrector_evaluates_again);
  tcase_add_test(tc, schedule_validated);
  tcase_add_test(tc, cli_runs_a_schedule);
  tcase_add_test(tc, converter_reproduces_cases);
  suite_add_tcase(s, tc);
  return s;
}
