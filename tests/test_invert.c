/* DDIM inversion (reconstruction error per step count) and the edit-friendly DDPM noise space
 * (exact reconstruction at every step count, T_skip, class change, shift and colour edits, bad
 * inputs) on the analytic GaussianMixtureDenoiser models. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "invert.h"
#include "model.h"
#include "rng.h"
#include "sampler.h"
#include "testutil.h"

enum { D = 192, H = 8 };

static model *load_gmm(const char *name) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s", name);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s: %s", name,
                e.msg);
  return m;
}

static json_t *model_sched(const model *m) {
  json_error_t je;
  json_t *j = json_load_file(model_scheduler_config_path(m), 0, &je);
  ck_assert_msg(j != NULL, "%s", je.text);
  return j;
}

static sampler *make(const model *m, const char *solver, int steps, const char *options) {
  err e = {0};
  json_t *mcfg = model_sched(m);
  json_t *spec = json_pack("{s:s, s:i}", "name", solver, "steps", steps);
  if (options)
    json_object_set_new(spec, "options", json_loads(options, 0, NULL));
  sampler *s = NULL;
  ck_assert_msg(sampler_new_from_json(spec, mcfg, &s, &e) == 0, "%s: %s", solver, e.msg);
  json_decref(spec);
  json_decref(mcfg);
  return s;
}

static sampler *ef_sampler(const model *m, int steps, const char *config) {
  json_t *mcfg = model_sched(m), *c = config ? json_loads(config, 0, NULL) : NULL;
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(invert_ddpm_sampler(mcfg, c, steps, &s, &e) == 0, "%s", e.msg);
  json_decref(mcfg);
  json_decref(c);
  return s;
}

/* Images of the model's own distribution: 50-step DDIM samples. */
static void generate(const model *m, const int64_t *labels, int batch, uint64_t seed, float *out) {
  sampler *s = make(m, "ddim", 50, NULL);
  sampler_run_opts o = {.batch = batch, .seed = seed, .labels = labels};
  err e = {0};
  ck_assert_msg(sampler_run(s, m, &o, out, NULL, &e) == 0, "%s", e.msg);
  sampler_free(s);
}

/* "Real" images: clipped noise around smooth patterns, not the model's own samples. */
static void real_images(int batch, float *out) {
  rng_uniform(99, 0, 0, out, (size_t)batch * D);
  for (int b = 0; b < batch; b++)
    for (int q = 0; q < D; q++) {
      const int ch = q / 64, y = (q % 64) / 8, x = q % 8;
      const float v = 0.6f * sinf(0.7f * x + ch) * cosf(0.5f * y) + 0.4f * (out[b * D + q] - 0.5f);
      out[b * D + q] = fminf(fmaxf(v, -1), 1);
    }
}

/* NaN counts as the largest error (fmax alone would skip it: a NaN image passed as exact) */
static double max_abs(const float *a, const float *b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) {
    const double d = fabs((double)a[i] - b[i]);
    m = d <= m ? m : isnan(d) ? INFINITY : d;
  }
  return m;
}

/* Edit-friendly inversion reproduces the image to rounding with every step count, on every
 * kind of model output, with and without guidance. */
START_TEST(ddpm_inversion_reconstructs_exactly) {
  static const struct {
    const char *model, *config;
    double g;
  } cases[] = {{"cond4", NULL, 3.0},
               {"cond4", "{\"timestep_spacing\": \"trailing\"}", 1.0},
               {"cond4_v", NULL, 2.0},
               {"cond4_sample", "{\"timestep_spacing\": \"linspace\"}", 0.0},
               {"mix3", NULL, 0.0},
               {"mix3_v", "{\"timestep_spacing\": \"trailing\", \"clip_sample\": false}", 0.0}};
  const int steps[] = {1, 2, 3, 7, 10, 50, 100, 333, 1000};
  enum { B = 3 };
  float x0[B * D], out[B * D];
  real_images(B, x0);
  int64_t labels[B] = {0, 1, 2};
  double worst = 0;
  fprintf(stderr, "edit-friendly DDPM inversion, max |x - x0| after sampling with the maps:\n");
  for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
    model *m = load_gmm(cases[ci].model);
    const int cond = model_get_info(m)->num_classes > 0;
    guidance g = guidance_for(m, cases[ci].g);
    fprintf(stderr, "  %-12s %-40s g=%g:", cases[ci].model,
            cases[ci].config ? cases[ci].config : "(model config)", cases[ci].g);
    for (size_t si = 0; si < sizeof steps / sizeof steps[0]; si++) {
      sampler *s = ef_sampler(m, steps[si], cases[ci].config);
      const int n = sampler_num_steps(s);
      float *maps = malloc(sizeof(float) * B * (n + 1) * D);
      invert_opts o = {.batch = B,
                       .labels = cond ? labels : NULL,
                       .guidance = cond && cases[ci].g != 1 ? &g : NULL,
                       .seed = 3,
                       .threads = 1};
      err e = {0};
      int nfe = 0;
      ck_assert_msg(invert_ddpm(s, m, &o, x0, maps, &nfe, &e) == 0, "%s", e.msg);
      ck_assert_int_eq(nfe, n);
      ck_assert_msg(invert_ddpm_sample(s, m, &o, NULL, maps, out, &nfe, &e) == 0, "%s", e.msg);
      ck_assert_int_eq(nfe, n);
      const double err_max = max_abs(out, x0, B * D);
      fprintf(stderr, " %d:%.1e", n, err_max);
      worst = fmax(worst, err_max);
      ck_assert_msg(err_max < 1e-4, "%s, %d steps: max error %g", cases[ci].model, n, err_max);
      free(maps);
      sampler_free(s);
    }
    fprintf(stderr, "\n");
    model_free(m);
  }
  fprintf(stderr, "edit-friendly reconstruction: worst max abs error %.2e\n", worst);
}
END_TEST

/* T_skip with the source labels gives back the chain exactly; with another class it changes
 * the class; the maps are reproducible from the seed. */
START_TEST(ddpm_edits_class_and_skip) {
  model *m = load_gmm("cond4");
  enum { B = 6, N = 50 };
  sampler *s = ef_sampler(m, N, NULL);
  int64_t src[B], tgt[B];
  for (int b = 0; b < B; b++) {
    src[b] = 0;
    tgt[b] = 2;
  }
  float x0[B * D], out[B * D], rec[B * D];
  generate(m, src, B, 21, x0);
  float *maps = malloc(sizeof(float) * B * (N + 1) * D);
  float *maps2 = malloc(sizeof(float) * B * (N + 1) * D);
  guidance gs = guidance_for(m, 1.0), gt = guidance_for(m, 4.0);
  invert_opts o = {.batch = B, .labels = src, .guidance = &gs, .seed = 8};
  err e = {0};
  ck_assert(invert_ddpm(s, m, &o, x0, maps, NULL, &e) == 0);
  ck_assert(invert_ddpm(s, m, &o, x0, maps2, NULL, &e) == 0);
  ck_assert(memcmp(maps, maps2, sizeof(float) * B * (N + 1) * D) == 0);
  ck_assert(invert_ddpm_sample(s, m, &o, NULL, maps, rec, NULL, &e) == 0);
  /* skip with the source class: the same chain, bit for bit */
  invert_sample_opts so = {.skip = 20, .src_labels = src, .src_guidance = &gs};
  int nfe = 0;
  ck_assert(invert_ddpm_sample(s, m, &o, &so, maps, out, &nfe, &e) == 0);
  ck_assert_int_eq(nfe, N);
  ck_assert(memcmp(out, rec, sizeof out) == 0);
  /* class change: target class with guidance, for a few skips */
  fprintf(stderr,
          "class change 0 -> 2 (cond4, %d steps, g_tar 4): skip, changed, rel L2 to "
          "source\n",
          N);
  invert_opts ot = o;
  ot.labels = tgt;
  ot.guidance = &gt;
  for (int skip = 0; skip <= 30; skip += 10) {
    so.skip = skip;
    ck_assert(invert_ddpm_sample(s, m, &ot, &so, maps, out, NULL, &e) == 0);
    /* which class: the class-conditional eps at a low noise level explains x best */
    int changed = 0;
    for (int b = 0; b < B; b++) {
      float t = 20, eps[D];
      double best = INFINITY;
      int cls = -1;
      for (int c = 0; c < 3; c++) {
        int64_t l = c;
        ck_assert(model_eval(m, out + b * D, 1, H, H, &t, &l, eps, 1, &e) == 0);
        double s2 = 0;
        for (int q = 0; q < D; q++)
          s2 += (double)eps[q] * eps[q];
        if (s2 < best) {
          best = s2;
          cls = c;
        }
      }
      changed += cls == 2;
    }
    const double dist = test_rel_l2(out, x0, B * D);
    fprintf(stderr, "  skip %2d: %d/%d class 2, rel L2 %.3f\n", skip, changed, B, dist);
    if (skip <= 10)
      ck_assert_msg(changed >= B - 1, "skip %d: only %d of %d changed class", skip, changed, B);
  }
  free(maps);
  free(maps2);
  sampler_free(s);
  model_free(m);
}
END_TEST

START_TEST(ddpm_map_edits) {
  /* shift: a pure translation of every map, wrapping */
  float maps[2 * 3 * 2 * 4 * 4];
  for (int i = 0; i < 2 * 3 * 2 * 16; i++)
    maps[i] = (float)i;
  invert_maps_shift(maps, 2, 3, 2, 4, 4, 1, -1);
  for (int p = 0; p < 12; p++)
    for (int y = 0; y < 4; y++)
      for (int x = 0; x < 4; x++) {
        const int sy = (y + 1) % 4, sx = (x + 3) % 4;
        ck_assert_float_eq(maps[p * 16 + y * 4 + x], (float)(p * 16 + sy * 4 + sx));
      }
  /* colour: +0.3 on channel 0 over the last 10 of 50 steps moves that channel's mean */
  model *m = load_gmm("mix3");
  enum { B = 4, N = 50 };
  sampler *s = ef_sampler(m, N, "{\"clip_sample\": false}");
  float x0[B * D], out[B * D];
  real_images(B, x0);
  float *em = malloc(sizeof(float) * B * (N + 1) * D);
  invert_opts o = {.batch = B, .seed = 4};
  err e = {0};
  ck_assert(invert_ddpm(s, m, &o, x0, em, NULL, &e) == 0);
  const float delta[3] = {0.3f, 0, 0};
  ck_assert(invert_maps_colour(s, em, B, 3, H, H, delta, N - 10, &e) == 0);
  ck_assert(invert_ddpm_sample(s, m, &o, NULL, em, out, NULL, &e) == 0);
  double dm[3] = {0, 0, 0};
  for (int b = 0; b < B; b++)
    for (int q = 0; q < D; q++)
      dm[q / 64] += ((double)out[b * D + q] - x0[b * D + q]) / (B * 64);
  fprintf(stderr, "colour edit +0.3 R over the last 10 steps: mean change R %.3f G %.3f B %.3f\n",
          dm[0], dm[1], dm[2]);
  ck_assert(dm[0] > 0.15 && dm[0] < 0.45);
  ck_assert(fabs(dm[1]) < 0.05 && fabs(dm[2]) < 0.05);
  ck_assert_int_eq(invert_maps_colour(s, em, B, 3, H, H, delta, N, &e), ERR_INVALID);
  free(em);
  sampler_free(s);
  model_free(m);
}
END_TEST

/* DDIM inversion: the image back from x_T by DDIM sampling, per step count; partial inversion
 * to an intermediate step and back. The table goes to stderr. */
START_TEST(ddim_inversion_error_table) {
  enum { B = 4 };
  const int steps[] = {5, 10, 20, 50, 100, 200, 500, 1000};
  static const char *models[] = {"cond4", "mix3"};
  fprintf(stderr, "DDIM inversion then DDIM sampling (eta 0), error vs the input:\n"
                  "  model  images     steps: max|err| (rel L2)\n");
  for (int mi = 0; mi < 2; mi++) {
    model *m = load_gmm(models[mi]);
    const int cond = model_get_info(m)->num_classes > 0;
    int64_t labels[B] = {0, 1, 2, 1};
    for (int kind = 0; kind < 2; kind++) {
      float x0[B * D], xt[B * D], out[B * D];
      if (kind == 0)
        generate(m, cond ? labels : NULL, B, 5, x0);
      else
        real_images(B, x0);
      fprintf(stderr, "  %-6s %-9s", models[mi], kind ? "off-model" : "samples");
      double prev = INFINITY;
      for (size_t si = 0; si < sizeof steps / sizeof steps[0]; si++) {
        sampler *s = make(m, "ddim", steps[si], "{\"clip_sample\": false}");
        invert_opts o = {.batch = B, .labels = cond ? labels : NULL};
        sampler_run_opts r = {.batch = B, .labels = cond ? labels : NULL, .init_noise = xt};
        err e = {0};
        int nfe = 0;
        ck_assert_msg(invert_ddim(s, m, &o, x0, 0, xt, &nfe, &e) == 0, "%s", e.msg);
        ck_assert_int_eq(nfe, steps[si]);
        ck_assert(sampler_run(s, m, &r, out, NULL, &e) == 0);
        const double mx = max_abs(out, x0, B * D), rl = test_rel_l2(out, x0, B * D);
        fprintf(stderr, " %d:%.1e(%.1e)", steps[si], mx, rl);
        if (kind == 0 && steps[si] >= 50)
          ck_assert_msg(rl < prev * 1.5 + 1e-6, "%d steps: error grew to %g", steps[si], rl);
        prev = rl;
        sampler_free(s);
      }
      fprintf(stderr, "\n");
    }
    /* partial: to step 30 of 50 and back */
    float x0[B * D], xt[B * D], out[B * D];
    generate(m, cond ? labels : NULL, B, 6, x0);
    sampler *s = make(m, "ddim", 50, "{\"clip_sample\": false}");
    invert_opts o = {.batch = B, .labels = cond ? labels : NULL};
    err e = {0};
    int nfe = 0;
    ck_assert(invert_ddim(s, m, &o, x0, 30, xt, &nfe, &e) == 0);
    ck_assert_int_eq(nfe, 20);
    sampler_run_opts r = {
        .batch = B, .labels = cond ? labels : NULL, .init_noise = xt, .start_step = 30};
    ck_assert(sampler_run(s, m, &r, out, &nfe, &e) == 0);
    ck_assert_int_eq(nfe, 20);
    ck_assert_msg(test_rel_l2(out, x0, B * D) < 0.1, "partial inversion: %g",
                  test_rel_l2(out, x0, B * D));
    sampler_free(s);
    model_free(m);
  }
}
END_TEST

START_TEST(rejects_bad_inputs) {
  model *m = load_gmm("cond4");
  float x0[D], out[D], maps[11 * D];
  real_images(1, x0);
  int64_t l = 0;
  err e = {0};
  invert_opts o = {.batch = 1, .labels = &l};
  /* not DDIM */
  sampler *s = make(m, "dpm++2m", 10, NULL);
  ck_assert_int_eq(invert_ddim(s, m, &o, x0, 0, out, NULL, &e), ERR_INVALID);
  ck_assert_int_eq(invert_ddpm(s, m, &o, x0, maps, NULL, &e), ERR_INVALID);
  sampler_free(s);
  /* DDIM without noise: eta 0, or a last step that lands on alpha_bar 1 */
  s = make(m, "ddim", 10, NULL);
  ck_assert_int_eq(invert_ddpm(s, m, &o, x0, maps, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "noise"));
  ck_assert_int_eq(invert_ddim(s, m, &o, x0, 10, out, NULL, &e), ERR_INVALID);
  ck_assert_int_eq(invert_ddim(s, m, &o, x0, -1, out, NULL, &e), ERR_INVALID);
  ck_assert_int_eq(invert_ddpm_sample(s, m, &o, NULL, maps, out, NULL, &e), ERR_INVALID);
  sampler_free(s);
  s = make(m, "ddim", 10, "{\"eta\": 1.0, \"set_alpha_to_one\": true}");
  ck_assert_int_eq(invert_ddpm(s, m, &o, x0, maps, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "set_alpha_to_one"));
  sampler_free(s);
  s = make(m, "ddim", 10, "{\"eta\": 1.0, \"set_alpha_to_one\": false, \"clip_sample\": true}");
  ck_assert_int_eq(invert_ddpm(s, m, &o, x0, maps, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "clip_sample"));
  sampler_free(s);
  s = ef_sampler(m, 10, NULL);
  /* labels missing for a class-conditional model, guidance without labels, bad skip */
  invert_opts nl = {.batch = 1};
  ck_assert_int_eq(invert_ddpm(s, m, &nl, x0, maps, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "labels"));
  ck_assert_int_eq(invert_ddim(s, m, &nl, x0, 0, out, NULL, &e), ERR_INVALID);
  ck_assert(invert_ddpm(s, m, &o, x0, maps, NULL, &e) == 0);
  invert_sample_opts so = {.skip = 10, .src_labels = &l};
  ck_assert_int_eq(invert_ddpm_sample(s, m, &o, &so, maps, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "skip"));
  so.skip = -1;
  ck_assert_int_eq(invert_ddpm_sample(s, m, &o, &so, maps, out, NULL, &e), ERR_INVALID);
  invert_opts zb = {.batch = 0, .labels = &l};
  ck_assert_int_eq(invert_ddpm(s, m, &zb, x0, maps, NULL, &e), ERR_INVALID);
  sampler_free(s);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("invert");
  TCase *tc = tcase_create("invert");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, ddpm_inversion_reconstructs_exactly);
  tcase_add_test(tc, ddpm_edits_class_and_skip);
  tcase_add_test(tc, ddpm_map_edits);
  tcase_add_test(tc, ddim_inversion_error_table);
  tcase_add_test(tc, rejects_bad_inputs);
  suite_add_tcase(s, tc);
  return s;
}
