/* Classifier-free guidance, img2img and inpainting in the sampling loop: parity with diffusers'
 * pipeline loops (tools/gen_guidance_fixtures.py), one batched evaluation per guided step,
 * DPM-Solver++ stability with dynamic thresholding at large scales, and bad inputs. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "guidance.h"
#include "model.h"
#include "npy.h"
#include "safetensors.h"
#include "sampler.h"
#include "testutil.h"

static model *load_gmm(const char *name) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s", name);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s: %s", name,
                e.msg);
  return m;
}

static sampler *make(const model *m, const char *solver, int steps, const char *options) {
  err e = {0};
  json_error_t je;
  json_t *mcfg = json_load_file(model_scheduler_config_path(m), 0, &je);
  ck_assert_ptr_nonnull(mcfg);
  json_t *spec = json_pack("{s:s, s:i}", "name", solver, "steps", steps);
  if (options)
    json_object_set_new(spec, "options", json_loads(options, 0, NULL));
  sampler *s = NULL;
  ck_assert_msg(sampler_new_from_json(spec, mcfg, &s, &e) == 0, "%s: %s", solver, e.msg);
  json_decref(spec);
  json_decref(mcfg);
  return s;
}

typedef struct stored_noise {
  const float *data; /* [evaluations][batch][d] */
  int evals, batch;
  size_t d;
} stored_noise;

static int noise_from_fixture(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                              err *e) {
  const stored_noise *s = user;
  if (stream < 1 || stream > (uint64_t)s->evals || image >= (uint64_t)s->batch || n != s->d)
    return err_set(e, ERR_INVALID, "no stored noise for image %llu stream %llu",
                   (unsigned long long)image, (unsigned long long)stream);
  memcpy(out, s->data + ((stream - 1) * s->batch + image) * s->d, n * sizeof *out);
  return ERR_OK;
}

static void read_case_npy(const char *name, const char *what, npy_array *a) {
  char rel[256], path[512];
  err e = {0};
  snprintf(rel, sizeof rel, "tests/fixtures/guidance/%s_%s.npy", name, what);
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), a, &e) == 0, "%s", e.msg);
}

START_TEST(matches_diffusers_pipelines) {
  char path[512];
  json_error_t je;
  json_t *root = json_load_file(
      test_src_path(path, sizeof path, "tests/fixtures/guidance/cases.json"), 0, &je);
  ck_assert_msg(root != NULL, "%s", je.text);
  const int batch = (int)json_integer_value(json_object_get(root, "batch"));
  size_t i;
  json_t *c;
  double worst = 0;
  json_array_foreach(json_object_get(root, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    model *m = load_gmm(json_string_value(json_object_get(c, "model")));
    char *opts = json_dumps(json_object_get(c, "options"), 0);
    sampler *s = make(m, json_string_value(json_object_get(c, "solver")),
                      (int)json_integer_value(json_object_get(c, "steps")), opts);
    free(opts);
    npy_array init, want, noise = {0}, image = {0}, mask = {0};
    read_case_npy(name, "init", &init);
    read_case_npy(name, "out", &want);
    const size_t d = (size_t)(init.count / batch);
    stored_noise sn = {0};
    if (json_is_true(json_object_get(c, "stochastic"))) {
      read_case_npy(name, "noise", &noise);
      sn = (stored_noise){noise.data, sampler_nfe(s), batch, d};
    }
    const json_t *js = json_object_get(c, "strength");
    if (json_is_number(js))
      read_case_npy(name, "image", &image);
    if (json_is_true(json_object_get(c, "mask")))
      read_case_npy(name, "mask", &mask);
    int64_t labels[8];
    for (int b = 0; b < batch; b++)
      labels[b] = json_integer_value(json_array_get(json_object_get(c, "labels"), b));
    guidance g = guidance_for(m, json_number_value(json_object_get(c, "guidance_scale")));
    sampler_run_opts o = {.batch = batch,
                          .init_noise = init.data,
                          .labels = labels,
                          .noise = noise.data ? noise_from_fixture : NULL,
                          .noise_user = &sn,
                          .threads = 1,
                          .guidance = &g,
                          .init_image = image.data,
                          .strength = json_is_number(js) ? json_number_value(js) : 0,
                          .mask = mask.data};
    float *out = malloc(sizeof(float) * init.count);
    int nfe = 0;
    err e = {0};
    ck_assert_msg(sampler_run(s, m, &o, out, &nfe, &e) == 0, "%s: %s", name, e.msg);
    const int evals = (int)json_integer_value(json_object_get(c, "evaluations"));
    ck_assert_msg(nfe == evals, "%s: %d NFE, diffusers made %d evaluations", name, nfe, evals);
    const double r = test_rel_l2(out, want.data, (size_t)want.count);
    fprintf(stderr, "  %-26s %-12s g=%-4g rel L2 vs diffusers %.3g\n", name,
            json_string_value(json_object_get(c, "solver")), g.scale, r);
    worst = fmax(worst, r);
    ck_assert_msg(r < 1e-4, "%s: rel L2 %g against diffusers", name, r);
    free(out);
    npy_array_free(&init);
    npy_array_free(&want);
    npy_array_free(&noise);
    npy_array_free(&image);
    npy_array_free(&mask);
    sampler_free(s);
    model_free(m);
  }
  fprintf(stderr, "guidance/img2img/inpainting vs diffusers: worst rel L2 %.3g\n", worst);
  json_decref(root);
}
END_TEST

/* A model wrapper is not needed to see the batching: the NFE count and the progress callback
 * report one evaluation per guided step, and the result equals the two-pass combination. */
static void count_progress(int step, int total, int nfe, void *user) {
  int *last = user;
  (void)total;
  last[0] = step;
  last[1] = nfe;
}

START_TEST(one_batched_evaluation_per_step) {
  model *m = load_gmm("cond4");
  sampler *s = make(m, "dpm++2m", 12, NULL);
  int64_t labels[3] = {0, 1, 2};
  guidance g = guidance_for(m, 4.0);
  int prog[2] = {0, 0};
  sampler_run_opts o = {.batch = 3,
                        .seed = 7,
                        .labels = labels,
                        .guidance = &g,
                        .progress = count_progress,
                        .progress_user = prog};
  float *out = malloc(sizeof(float) * 3 * 192);
  int nfe = 0;
  err e = {0};
  ck_assert_msg(sampler_run(s, m, &o, out, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(nfe, 12);
  ck_assert_int_eq(prog[0], 12);
  ck_assert_int_eq(prog[1], 12);
  /* the guided model output at one point, against two separate model calls */
  float x[192], t = 500, cond[192], unc[192], got[192];
  int64_t l = 1, nl = -1;
  for (int k = 0; k < 192; k++)
    x[k] = out[k];
  ck_assert(model_eval(m, x, 1, 8, 8, &t, &l, cond, 1, &e) == 0);
  ck_assert(model_eval(m, x, 1, 8, 8, &t, &nl, unc, 1, &e) == 0);
  const model_call one = {.x = x, .n = 1, .h = 8, .w = 8, .t = &t, .labels = &l, .threads = 1};
  ck_assert(guidance_eval(&g, m, &one, got, &e) == 0);
  for (int k = 0; k < 192; k++)
    ck_assert_float_eq(got[k], unc[k] + 4.0f * (cond[k] - unc[k]));
  /* g = 0 is the unconditional model, g = 1 the conditional one */
  guidance g0 = guidance_for(m, 0.0), g1 = guidance_for(m, 1.0);
  ck_assert(guidance_eval(&g0, m, &one, got, &e) == 0);
  ck_assert(memcmp(got, unc, sizeof got) == 0);
  ck_assert(guidance_eval(&g1, m, &one, got, &e) == 0);
  ck_assert(memcmp(got, cond, sizeof got) == 0);
  free(out);
  sampler_free(s);
  model_free(m);
}
END_TEST

/* cond4's four component means and their classes, read from its weights. */
typedef struct comps {
  float means[4][192];
  int64_t labels[4];
} comps;

static void load_comps(comps *c) {
  char path[512];
  test_src_path(path, sizeof path, "tests/fixtures/gmm/cond4/diffusion_pytorch_model.safetensors");
  st_file *f = NULL;
  err e = {0};
  const int64_t shape[4] = {4, 3, 8, 8};
  ck_assert_msg(st_open(path, &f, &e) == 0, "%s", e.msg);
  ck_assert(st_read_f32(f, "means", 4, shape, &c->means[0][0], &e) == 0);
  ck_assert(st_read_i64(f, "labels", c->labels, 4, &e) == 0);
  st_close(f);
}

/* The class of the component mean nearest to x. */
static int nearest_class(const comps *c, const float *x) {
  int best = 0;
  double bd = INFINITY;
  for (int k = 0; k < 4; k++) {
    double s = 0;
    for (int q = 0; q < 192; q++)
      s += ((double)x[q] - c->means[k][q]) * ((double)x[q] - c->means[k][q]);
    if (s < bd) {
      bd = s;
      best = (int)c->labels[k];
    }
  }
  return best;
}

/* DPM-Solver++(2M) with and without dynamic thresholding at g = 1, 3, 8 against converged
 * solutions of the same guided ODE (1000-step DDIM; thresholded: 500-step DPM-Solver++, as
 * thresholding changes the ODE): the error per step count, the range of the samples and the
 * fraction whose nearest mixture component is of the requested class. Printed as a table;
 * asserts finite, bounded, converging, on-class results. */
START_TEST(dpmpp_thresholding_stable_at_large_scales) {
  model *m = load_gmm("cond4");
  comps cm;
  load_comps(&cm);
  enum { B = 12, D = 192 };
  int64_t labels[B];
  for (int b = 0; b < B; b++)
    labels[b] = b % 3;
  const double scales[3] = {1, 3, 8};
  const int steps[3] = {10, 20, 40};
  /* trailing spacing: every grid starts at t = 999, so all runs solve the same ODE from the
   * same point (leading spacing starts DPM-Solver at 1000 - 1000 / n, far apart on cosine) */
  const char *variants[2] = {"{\"timestep_spacing\": \"trailing\"}",
                             "{\"timestep_spacing\": \"trailing\", \"thresholding\": true, "
                             "\"sample_max_value\": 1.0}"};
  float *ref = malloc(sizeof(float) * B * D), *out = malloc(sizeof(float) * B * D);
  fprintf(stderr,
          "DPM-Solver++(2M) vs the converged guided ODE (cond4, %d images, trailing):\n"
          "   g  thresholding  rel L2 @10    @20    @40  max|x|@20  on-class@20 (ref)\n",
          B);
  for (int si = 0; si < 3; si++) {
    guidance g = guidance_for(m, scales[si]);
    for (int v = 0; v < 2; v++) {
      sampler *r = v ? make(m, "dpm++2m", 500, variants[1])
                     : make(m, "ddim", 1000, "{\"timestep_spacing\": \"trailing\"}");
      sampler_run_opts o = {.batch = B, .seed = 11, .labels = labels, .guidance = &g};
      err e = {0};
      ck_assert_msg(sampler_run(r, m, &o, ref, NULL, &e) == 0, "%s", e.msg);
      sampler_free(r);
      int ref_on = 0;
      for (int b = 0; b < B; b++)
        ref_on += nearest_class(&cm, ref + b * D) == labels[b];
      double err_at[3], mx = 0;
      int on = 0;
      for (int k = 0; k < 3; k++) {
        sampler *s = make(m, "dpm++2m", steps[k], variants[v]);
        ck_assert_msg(sampler_run(s, m, &o, out, NULL, &e) == 0, "%s", e.msg);
        sampler_free(s);
        for (int q = 0; q < B * D; q++)
          ck_assert(isfinite(out[q]));
        err_at[k] = test_rel_l2(out, ref, B * D);
        if (steps[k] == 20) {
          for (int q = 0; q < B * D; q++)
            mx = fmax(mx, fabs(out[q]));
          for (int b = 0; b < B; b++)
            on += nearest_class(&cm, out + b * D) == labels[b];
        }
      }
      fprintf(stderr, "  %2g  %-12s  %9.3g %6.3g %6.3g  %9.3f  %5.2f (%4.2f)\n", scales[si],
              v ? "dynamic" : "off", err_at[0], err_at[1], err_at[2], mx, (double)on / B,
              (double)ref_on / B);
      ck_assert_msg(err_at[2] < err_at[0], "g=%g: no convergence with steps", scales[si]);
      /* thresholding is applied per step, so its limit is approached slowly; the ODE alone
       * converges at second order */
      ck_assert_msg(err_at[1] < (v ? 0.3 : 0.03), "g=%g: 20-step error %g", scales[si], err_at[1]);
      if (v == 1)
        ck_assert_msg(mx <= 1.0 + 1e-5, "thresholded samples reach %g", mx);
      ck_assert_msg(on >= ref_on - 1, "g=%g: %d of %d on class", scales[si], on, B);
    }
  }
  free(ref);
  free(out);
  model_free(m);
}
END_TEST

START_TEST(rejects_bad_inputs) {
  model *m = load_gmm("cond4");
  model *u = load_gmm("mix3");
  sampler *s = make(m, "ddim", 10, NULL);
  float *out = malloc(sizeof(float) * 2 * 192), img[2 * 192], mask[2 * 64];
  for (int k = 0; k < 2 * 192; k++)
    img[k] = 0.1f;
  for (int k = 0; k < 2 * 64; k++)
    mask[k] = 1;
  int64_t labels[2] = {0, 1};
  err e = {0};
  guidance g = guidance_for(m, 3.0);
  sampler_run_opts o = {.batch = 2, .seed = 1, .guidance = &g};
  /* guidance without labels */
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "guidance_scale"));
  o.labels = labels;
  g.scale = -1;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "guidance_scale"));
  g.scale = NAN;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  g.scale = 1e9;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  g.scale = 3;
  g.null_label = 3;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "null_class"));
  g.null_label = -1;
  /* guidance on an unconditional model */
  guidance gu = {.enabled = 1, .scale = 2, .null_label = -1};
  sampler *su = make(u, "ddim", 10, NULL);
  sampler_run_opts ou = {.batch = 2, .seed = 1, .guidance = &gu, .labels = labels};
  ck_assert_int_eq(sampler_run(su, u, &ou, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "class-conditional"));
  sampler_free(su);
  /* strength out of range, or leaving no step */
  const double bad[4] = {0, -0.5, 1.5, 0.05};
  o.init_image = img;
  for (int k = 0; k < 4; k++) {
    o.strength = bad[k];
    ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(e.msg, "strength"));
  }
  o.strength = NAN;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  /* a mask without an image; start_step with an image; a start without a state */
  o.strength = 0.5;
  o.init_image = NULL;
  o.mask = mask;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "mask"));
  o.mask = NULL;
  o.init_image = img;
  o.start_step = 3;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  o.init_image = NULL;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "init_noise"));
  o.start_step = 5;
  o.end_step = 5;
  o.init_noise = img;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  o.end_step = 11;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  o.start_step = -1;
  o.end_step = 0;
  ck_assert_int_eq(sampler_run(s, m, &o, out, NULL, &e), ERR_INVALID);
  sampler_free(s);
  /* the papers' own loops refuse partial runs; pndm refuses a start inside its warm-up */
  s = make(m, "dpm-solver-fast", 10, NULL);
  sampler_run_opts op = {
      .batch = 2, .seed = 1, .labels = labels, .init_image = img, .strength = 0.5};
  ck_assert_int_eq(sampler_run(s, m, &op, out, NULL, &e), ERR_UNSUPPORTED);
  sampler_free(s);
  s = make(m, "pndm", 10, NULL);
  ck_assert_int_eq(sampler_run(s, m, &op, out, NULL, &e), ERR_UNSUPPORTED);
  ck_assert_ptr_nonnull(strstr(e.msg, "plms"));
  sampler_free(s);
  free(out);
  model_free(m);
  model_free(u);
}
END_TEST

/* A run split at a step reproduces the whole run (DDIM has no state between steps), and the
 * state handed over is what sampler_step_level describes. */
START_TEST(split_runs_reproduce) {
  model *m = load_gmm("cond4");
  sampler *s = make(m, "ddim", 20, "{\"eta\": 1.0}");
  int64_t labels[2] = {2, 0};
  guidance g = guidance_for(m, 2.5);
  float whole[384], half[384], rest[384];
  sampler_run_opts o = {.batch = 2, .seed = 5, .labels = labels, .guidance = &g};
  err e = {0};
  ck_assert(sampler_run(s, m, &o, whole, NULL, &e) == 0);
  o.end_step = 8;
  int nfe = 0;
  ck_assert_msg(sampler_run(s, m, &o, half, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(nfe, 8);
  o.end_step = 0;
  o.start_step = 8;
  o.init_noise = half;
  ck_assert_msg(sampler_run(s, m, &o, rest, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(nfe, 12);
  ck_assert(memcmp(rest, whole, sizeof whole) == 0);
  float a, b;
  sampler_step_level(s, 20, &a, &b);
  ck_assert(a == 1 && b == 0);
  sampler_step_level(s, 0, &a, &b);
  ck_assert(b > 0.99f && a < 0.1f);
  sampler_free(s);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("guidance");
  TCase *tc = tcase_create("guidance");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, matches_diffusers_pipelines);
  tcase_add_test(tc, one_batched_evaluation_per_step);
  tcase_add_test(tc, dpmpp_thresholding_stable_at_large_scales);
  tcase_add_test(tc, rejects_bad_inputs);
  tcase_add_test(tc, split_runs_reproduce);
  suite_add_tcase(s, tc);
  return s;
}
