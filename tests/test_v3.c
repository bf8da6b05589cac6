/* DPM-Solver-v3: the sampler against the authors' own code on the exact mixture model with
 * non-flat statistics (tools/gen_v3_fixtures.py), the reduction of flat statistics to
 * DPM-Solver++ (order 1, and order 2 = the 2M "heun"/taylor form, up to the statistics grid's
 * trapezoid error), and the statistics file's validation. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "npy.h"
#include "sampler.h"
#include "testutil.h"

static model *load_mix3(void) {
  char path[512];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/gmm/mix3"), &m, &e) ==
                    0,
                "%s", e.msg);
  return m;
}

/* Runs spec on m from init (batch images), into out. */
static void run_spec(const model *m, json_t *spec, int batch, const float *init, float *out) {
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(sampler_new_from_json(spec, model_scheduler_config(m), &s, &e) == 0, "%s", e.msg);
  sampler_run_opts o = {.batch = batch, .init_noise = init, .threads = 1};
  int nfe = 0;
  ck_assert_msg(sampler_run(s, m, &o, out, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(nfe, sampler_num_steps(s));
  sampler_free(s);
}

/* Runs specs a and b from init (B images) and returns their relative L2 distance; frees both. */
static double v3_distance(const model *m, json_t *sa, json_t *sb, int B, const float *init,
                          size_t n) {
  float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
  run_spec(m, sa, B, init, a);
  run_spec(m, sb, B, init, b);
  const double r = test_rel_l2(a, b, n);
  json_decref(sa);
  json_decref(sb);
  free(a);
  free(b);
  return r;
}

START_TEST(matches_authors_code) {
  char path[512], stats[512];
  json_error_t je;
  json_t *cases =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/v3/cases.json"), 0, &je);
  ck_assert_msg(cases != NULL, "%s", je.text);
  test_src_path(stats, sizeof stats, "tests/fixtures/v3/stats.json");
  model *m = load_mix3();
  const int batch = (int)json_integer_value(json_object_get(cases, "batch"));
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(cases, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    char rel[256];
    npy_array init = {0}, want = {0};
    err e = {0};
    snprintf(rel, sizeof rel, "tests/fixtures/v3/%s_init.npy", name);
    ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &init, &e) == 0, "%s", e.msg);
    snprintf(rel, sizeof rel, "tests/fixtures/v3/%s_out.npy", name);
    ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &want, &e) == 0, "%s", e.msg);
    json_t *spec = json_pack("{s:s, s:O, s:O, s:s}", "name", "dpm-solver-v3", "steps",
                             json_object_get(c, "steps"), "options", json_object_get(c, "options"),
                             "data", stats);
    float *out = malloc(want.count * sizeof *out);
    run_spec(m, spec, batch, init.data, out);
    const double rel_err = test_rel_l2(out, want.data, want.count);
    if (getenv("DENOISED_V3_VERBOSE"))
      fprintf(stderr, "%s: %.3g\n", name, rel_err);
    ck_assert_msg(rel_err < 1e-5, "%s: relative L2 %g against the authors' sampler", name, rel_err);
    free(out);
    json_decref(spec);
    npy_array_free(&init);
    npy_array_free(&want);
  }
  model_free(m);
  json_decref(cases);
}
END_TEST

/* Flat statistics (no file): order 1 is DPM-Solver++(1), order 2 without the corrector is the
 * 2M update in its "heun" (taylor) form, both on the same logSNR grid of the engine's continuous
 * schedule (DPM_Solver multistep), up to the trapezoid error of the 1200-interval grid. The
 * midpoint form differs by O(h^2) per step, which the last check sees. */
START_TEST(flat_statistics_reduce_to_dpmpp) {
  model *m = load_mix3();
  const int B = 2;
  const size_t n = (size_t)B * 3 * 8 * 8;
  float *init = malloc(n * sizeof *init);
  for (size_t i = 0; i < n; i++)
    init[i] = (float)sin(0.37 * (double)i + 1.0) * 1.3f;
  const char *forms[] = {"heun", "midpoint"};
  for (int order = 1; order <= 2; order++)
    for (int f = 0; f < 2; f++) {
      json_t *v3 = json_pack("{s:s, s:i, s:{s:i, s:b}}", "name", "dpm-solver-v3", "steps", 8,
                             "options", "solver_order", order, "use_corrector", 0);
      json_t *pp =
          json_pack("{s:s, s:i, s:{s:s, s:s, s:s, s:s, s:i}}", "name", "DPM_Solver", "steps", 8,
                    "options", "method", "multistep", "algorithm_type", "dpmsolver++",
                    "solver_type", forms[f], "skip_type", "logSNR", "solver_order", order);
      const double r = v3_distance(m, v3, pp, B, init, n);
      if (order == 2 && f == 1)
        ck_assert_msg(r > 1e-3, "v3 order 2 should differ from the midpoint 2M (%g)", r);
      else
        ck_assert_msg(r < 3e-5, "order %d (%s): relative L2 %g against DPM-Solver++", order,
                      forms[f], r);
    }
  free(init);
  model_free(m);
}
END_TEST

/* Dynamic thresholding where the config asks (a deviation from the authors' code): flat order-1
 * v3 with diffusers' rule (sample_max_value large, so s = max(quantile, 1)) is DPM_Solver's
 * thresholded DPM-Solver++(1) with thresholding_max_val 1 (the same s), up to the grid's
 * trapezoid error; without thresholding v3 is far from it, so the check sees the clipping. Order 2
 * (the Heun-form 2M) likewise. */
START_TEST(thresholding_as_dpmpp) {
  char path[512];
  model *m = NULL;
  err e = {0};
  /* wide2: component means up to 1.6, so x0 leaves [-1, 1] and is clipped */
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/gmm/wide2"), &m, &e) ==
                    0,
                "%s", e.msg);
  const int B = 2;
  const size_t n = (size_t)B * 3 * 8 * 8;
  float *init = malloc(n * sizeof *init);
  for (size_t i = 0; i < n; i++)
    init[i] = (float)sin(0.37 * (double)i + 1.0) * 1.3f;
  for (int k = 0; k < 3; k++) {
    const int on = k < 2, order = k == 1 ? 2 : 1;
    json_t *v3 =
        json_pack("{s:s, s:i, s:{s:i, s:b, s:b, s:f, s:f}}", "name", "dpm-solver-v3", "steps", 8,
                  "options", "solver_order", order, "use_corrector", 0, "thresholding", on,
                  "dynamic_thresholding_ratio", 0.6, "sample_max_value", 1e5);
    json_t *pp = json_pack("{s:s, s:i, s:{s:s, s:s, s:s, s:s, s:i, s:b, s:f, s:f}}", "name",
                           "DPM_Solver", "steps", 8, "options", "method", "multistep",
                           "algorithm_type", "dpmsolver++", "solver_type", "heun", "skip_type",
                           "logSNR", "solver_order", order, "thresholding", 1,
                           "dynamic_thresholding_ratio", 0.6, "thresholding_max_val", 1.0);
    const double r = v3_distance(m, v3, pp, B, init, n);
    if (getenv("DENOISED_V3_VERBOSE"))
      fprintf(stderr, "thresholding %d, order %d: %.3g\n", on, order, r);
    if (on)
      ck_assert_msg(r < 3e-5, "thresholded v3 order %d: relative L2 %g against DPM-Solver++", order,
                    r);
    else
      ck_assert_msg(r > 1e-2, "the check does not see thresholding (%g)", r);
  }
  free(init);
  model_free(m);
}
END_TEST

/* Writes a header with `header` (a JSON text with %s for the arrays file) and an arrays file of
 * `shape` filled with `fill`; returns the header path. */
static const char *write_stats(const char *dir, const char *header, int ndim, const int64_t *shape,
                               float fill, char *path, size_t plen) {
  size_t count = 1;
  for (int i = 0; i < ndim; i++)
    count *= (size_t)shape[i];
  float *v = malloc(count * sizeof *v);
  for (size_t i = 0; i < count; i++)
    v[i] = i == count / 2 ? fill : 0.5f;
  char np[512];
  snprintf(np, sizeof np, "%s/a.npy", dir);
  err e = {0};
  ck_assert_msg(npy_write_f32(np, v, ndim, shape, &e) == 0, "%s", e.msg);
  free(v);
  snprintf(path, plen, "%s/s.json", dir);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(header, f);
  fclose(f);
  return path;
}

static void expect_error(const model *m, const char *stats, const char *needle) {
  json_t *spec = json_pack("{s:s, s:i, s:s}", "name", "dpm-solver-v3", "steps", 5, "data", stats);
  sampler *s = NULL;
  err e = {0};
  int rc = sampler_new_from_json(spec, model_scheduler_config(m), &s, &e);
  if (rc == 0) { /* shape errors surface when the run knows the image size */
    float x[192], out[192];
    for (int i = 0; i < 192; i++)
      x[i] = 0.1f;
    sampler_run_opts o = {.batch = 1, .init_noise = x, .threads = 1};
    rc = sampler_run(s, m, &o, out, NULL, &e);
    sampler_free(s);
  }
  ck_assert_msg(rc != 0, "expected an error containing '%s'", needle);
  ck_assert_msg(strstr(e.msg, needle) != NULL, "error '%s' lacks '%s'", e.msg, needle);
  json_decref(spec);
}

/* A statistics header with these fields (grid of 12 intervals, shape [C, 8, 8]). */
static const char *header(char *buf, size_t n, double lam_T, double lam_0, int c,
                          const char *arrays) {
  snprintf(buf, n,
           "{\"format\": \"denoised-v3-stats\", \"version\": 1, \"lambda_T\": %g, "
           "\"lambda_0\": %g, \"grid\": 12, \"shape\": [%d, 8, 8], \"arrays\": \"%s\"}",
           lam_T, lam_0, c, arrays);
  return buf;
}

START_TEST(statistics_file_validated) {
  char h[400];
  model *m = load_mix3();
  char dir[64], path[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  char good[400];
  header(good, sizeof good, -4, 4, 3, "a.npy");
  const int64_t ok[5] = {3, 13, 3, 8, 8}, bad[5] = {3, 12, 3, 8, 8}, other[5] = {3, 13, 1, 8, 8};
  /* a valid file runs */
  write_stats(dir, good, 5, ok, 0.5f, path, sizeof path);
  json_t *spec = json_pack("{s:s, s:i, s:s}", "name", "dpm-solver-v3", "steps", 4, "data", path);
  float x[192], out[192];
  for (int i = 0; i < 192; i++)
    x[i] = 0.1f;
  run_spec(m, spec, 1, x, out);
  json_decref(spec);
  write_stats(dir, good, 5, bad, 0.5f, path, sizeof path);
  expect_error(m, path, "must have shape [3, 13, 3, 8, 8]");
  write_stats(dir, good, 5, ok, NAN, path, sizeof path);
  expect_error(m, path, "is not finite");
  /* more steps than the grid has points apart: two steps would share a lambda */
  snprintf(h, sizeof h,
           "{\"format\": \"denoised-v3-stats\", \"version\": 1, \"lambda_T\": -4, "
           "\"lambda_0\": 4, \"grid\": 3, \"shape\": [3, 8, 8], \"arrays\": \"a.npy\"}");
  const int64_t coarse[5] = {3, 4, 3, 8, 8};
  write_stats(dir, h, 5, coarse, 0.5f, path, sizeof path);
  expect_error(m, path, "grid of 3 intervals is too coarse for 5 steps");
  write_stats(dir, header(h, sizeof h, -4, 4, 1, "a.npy"), 5, other, 0.5f, path, sizeof path);
  expect_error(m, path, "computed for another model or size");
  write_stats(dir, header(h, sizeof h, -9, 4, 3, "a.npy"), 5, ok, 0.5f, path, sizeof path);
  expect_error(m, path, "outside the schedule's");
  write_stats(dir, header(h, sizeof h, 4, -4, 3, "a.npy"), 5, ok, 0.5f, path, sizeof path);
  expect_error(m, path, "must be below lambda_0");
  write_stats(dir, "{\"format\": \"npz\"}", 5, ok, 0.5f, path, sizeof path);
  expect_error(m, path, "not a DPM-Solver-v3 statistics header");
  write_stats(dir, header(h, sizeof h, -4, 4, 3, "../a.npy"), 5, ok, 0.5f, path, sizeof path);
  expect_error(m, path, "beside the header");
  expect_error(m, "/nonexistent/stats.json", "statistics file /nonexistent/stats.json");
  /* another solver takes no data */
  json_t *dd = json_pack("{s:s, s:i, s:s}", "name", "dpm++2m", "steps", 5, "data", path);
  sampler *s = NULL;
  err e = {0};
  ck_assert_int_ne(sampler_new_from_json(dd, model_scheduler_config(m), &s, &e), 0);
  ck_assert_msg(strstr(e.msg, "takes no solver data") != NULL, "%s", e.msg);
  json_decref(dd);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
  model_free(m);
}
END_TEST

/* Statistics of the single Gaussian N(mu, 0.25 I) (tests/fixtures/gmm/gauss1), whose noise
 * prediction is linear in x: l is exactly sigma^2 / (alpha^2 s^2 + sigma^2) (the Jacobian is that
 * diagonal, so the Hutchinson probe and the finite difference are exact up to rounding), f has no
 * x-dependence left (s = 0), and first-order v3 on these statistics is exact up to the estimate
 * of b and the grid's quadrature: at 3 steps it is far closer to a 1000-step DPM-Solver++
 * reference than flat statistics. */
START_TEST(computed_statistics_exact_on_a_gaussian) {
  char path[512], dir[64], out[600], npath[600];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/gmm/gauss1"), &m, &e) ==
                    0,
                "%s", e.msg);
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(out, sizeof out, "%s/g.json", dir);
  snprintf(npath, sizeof npath, "%s/g.npy", dir);
  enum { N = 8, D = 192, K = 400 };
  float x0[N * D];
  for (int i = 0; i < N * D; i++)
    x0[i] = 0.3f + 0.5f * (float)sin(1.7 * i);
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm-solver-v3", "steps", 10);
  sampler *s = NULL;
  ck_assert_msg(sampler_new_from_json(spec, model_scheduler_config(m), &s, &e) == 0, "%s", e.msg);
  const sampler_v3_stats_opts so = {.x0 = x0, .n = N, .K = K, .seed = 1, .threads = 1};
  ck_assert_msg(sampler_v3_stats_compute(m, s, &so, out, &e) == 0, "%s", e.msg);
  sampler_free(s);
  json_decref(spec);
  json_t *h = json_load_file(out, 0, NULL);
  ck_assert_ptr_nonnull(h);
  const double lT = json_real_value(json_object_get(h, "lambda_T"));
  const double l0 = json_real_value(json_object_get(h, "lambda_0"));
  json_decref(h);
  npy_array a = {0};
  ck_assert_msg(npy_read_f32(npath, &a, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(a.count, 3 * (K + 1) * D);
  double lerr = 0, smax = 0;
  for (int k = 0; k <= K; k++) {
    const double lam = lT + (l0 - lT) * k / K, al2 = 1 / (1 + exp(-2 * lam)), sg2 = 1 - al2;
    const double want = sg2 / (al2 * 0.25 + sg2);
    for (int p = 0; p < D; p++) {
      lerr = fmax(lerr, fabs(a.data[k * D + p] - want));
      smax = fmax(smax, fabs(a.data[(K + 1) * D + k * D + p]));
    }
  }
  npy_array_free(&a);
  ck_assert_msg(lerr < 1e-4, "l differs from the Gaussian's exact diagonal by %g", lerr);
  ck_assert_msg(smax == 0, "s should be 0 where f has no x-dependence (max |s| %g)", smax);
  /* first-order v3 at 3 steps: computed against flat statistics */
  float init[2 * D], ref[2 * D], got[2 * D], flat[2 * D];
  for (int i = 0; i < 2 * D; i++)
    init[i] = (float)cos(0.9 * i + 0.2);
  json_t *r = json_pack("{s:s, s:i, s:{s:s, s:s, s:s, s:i}}", "name", "DPM_Solver", "steps", 1000,
                        "options", "method", "multistep", "algorithm_type", "dpmsolver++",
                        "skip_type", "logSNR", "solver_order", 3);
  json_t *v = json_pack("{s:s, s:i, s:s, s:{s:i, s:b}}", "name", "dpm-solver-v3", "steps", 3,
                        "data", out, "options", "solver_order", 1, "use_corrector", 0);
  json_t *f = json_pack("{s:s, s:i, s:{s:i, s:b}}", "name", "dpm-solver-v3", "steps", 3, "options",
                        "solver_order", 1, "use_corrector", 0);
  run_spec(m, r, 2, init, ref);
  run_spec(m, v, 2, init, got);
  run_spec(m, f, 2, init, flat);
  const double eg = test_rel_l2(got, ref, 2 * D), ef = test_rel_l2(flat, ref, 2 * D);
  ck_assert_msg(eg < 1e-2 && ef > 0.1, "3 steps: computed statistics %g, flat %g", eg, ef);
  json_decref(r);
  json_decref(v);
  json_decref(f);
  /* bad inputs */
  ck_assert_int_ne(sampler_v3_stats_compute(m, NULL, &so, out, &e), 0);
  char cmd[700];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
  model_free(m);
}
END_TEST

/* The command: writes a file the sampler reads; refuses a bad --data and a name without .json. */
START_TEST(stats_command) {
  char dir[64], outb[8192], model[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  ck_assert_int_eq(test_run_cli(outb, sizeof outb,
                                "stats --model %s --samples 4 --grid 20 --quiet --out %s/m.json",
                                model, dir),
                   0);
  ck_assert_int_eq(test_run_cli(outb, sizeof outb,
                                "sample --model %s --scheduler dpm-solver-v3 --solver-data "
                                "%s/m.json --steps 5 --seed 1 --quiet --out %s/x.npy",
                                model, dir, dir),
                   0);
  ck_assert_int_eq(
      test_run_cli(outb, sizeof outb, "stats --model %s --quiet --out %s/m.txt", model, dir), 1);
  ck_assert_msg(strstr(outb, "must end in .json") != NULL, "%s", outb);
  ck_assert_int_eq(test_run_cli(outb, sizeof outb,
                                "stats --model %s --data %s/x.npy --quiet --out %s/n.json", model,
                                dir, dir),
                   1);
  ck_assert_msg(strstr(outb, "data points") != NULL, "%s", outb);
  char cmd[200];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("v3");
  TCase *tc = tcase_create("v3");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, matches_authors_code);
  tcase_add_test(tc, flat_statistics_reduce_to_dpmpp);
  tcase_add_test(tc, thresholding_as_dpmpp);
  tcase_add_test(tc, statistics_file_validated);
  tcase_add_test(tc, computed_statistics_exact_on_a_gaussian);
  tcase_add_test(tc, stats_command);
  suite_add_tcase(s, tc);
  return s;
}
