/* The sampling loop: DDIM and DDPM against diffusers' own scheduler loops on the same noise
 * (tools/gen_sampler_fixtures.py), DDPM samples of a single Gaussian having its mean and
 * variance, seed reproducibility across batch splits, progress, cancellation and errors. */
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "model.h"
#include "npy.h"
#include "safetensors.h"
#include "sampler.h"
#include "schedule.h"
#include "testutil.h"

static model *load_model(const char *name) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s", name);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s: %s", name,
                e.msg);
  return m;
}

/* The model's own scheduler_config.json with the solver's defaults, plus strict overrides. */
static void model_config(const model *m, const char *solver, const json_t *overrides,
                         sched_config *cfg) {
  err e = {0};
  const char *p = model_scheduler_config_path(m);
  ck_assert_ptr_nonnull(p);
  ck_assert_msg(sched_config_load_file(p, sampler_solver_class(solver), 0, cfg, &e) == 0, "%s",
                e.msg);
  if (overrides)
    ck_assert_msg(sched_config_apply_json(cfg, overrides, 1, &e) == 0, "%s", e.msg);
}

static void read_npy(const char *case_name, const char *what, npy_array *a) {
  char rel[256], path[512];
  err e = {0};
  snprintf(rel, sizeof rel, "tests/fixtures/sampler/%s_%s.npy", case_name, what);
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), a, &e) == 0, "%s", e.msg);
}

typedef struct stored_noise {
  const float *data; /* [steps][batch][d] */
  int steps, batch;
  size_t d;
} stored_noise;

static int noise_from_fixture(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                              err *e) {
  const stored_noise *s = user;
  if (stream < 1 || stream > (uint64_t)s->steps || image >= (uint64_t)s->batch || n != s->d)
    return err_set(e, ERR_INVALID, "no stored noise for image %llu stream %llu",
                   (unsigned long long)image, (unsigned long long)stream);
  memcpy(out, s->data + ((stream - 1) * s->batch + image) * s->d, n * sizeof *out);
  return ERR_OK;
}

START_TEST(matches_diffusers_loops) {
  char path[512];
  json_t *root = json_load_file(
      test_src_path(path, sizeof path, "tests/fixtures/sampler/cases.json"), 0, NULL);
  ck_assert_ptr_nonnull(root);
  const int batch = (int)json_integer_value(json_object_get(root, "batch"));
  size_t i;
  json_t *c;
  double worst = 0;
  json_array_foreach(json_object_get(root, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *solver = json_string_value(json_object_get(c, "solver"));
    const int steps = (int)json_integer_value(json_object_get(c, "steps"));
    model *m = load_model(json_string_value(json_object_get(c, "model")));
    sched_config cfg;
    model_config(m, solver, json_object_get(c, "overrides"), &cfg);
    sampler *s = NULL;
    err e = {0};
    ck_assert_msg(sampler_new(solver, &cfg, steps, &s, &e) == 0, "%s: %s", name, e.msg);
    ck_assert_int_eq(sampler_num_steps(s), steps);
    ck_assert_int_eq(sampler_nfe(s), steps);
    json_t *ts = json_object_get(c, "timesteps");
    for (int k = 0; k < steps; k++)
      ck_assert_int_eq(sampler_timesteps(s)[k], json_integer_value(json_array_get(ts, k)));

    npy_array init, want, noise = {0};
    read_npy(name, "init", &init);
    read_npy(name, "out", &want);
    const size_t d = (size_t)(init.count / batch);
    stored_noise sn = {0};
    if (json_is_true(json_object_get(c, "stochastic"))) {
      read_npy(name, "noise", &noise);
      sn = (stored_noise){noise.data, steps, batch, d};
    }
    int64_t labels[8];
    json_t *lj = json_object_get(c, "labels");
    for (int b = 0; json_is_array(lj) && b < batch; b++)
      labels[b] = json_integer_value(json_array_get(lj, b));
    sampler_run_opts o = {.batch = batch,
                          .init_noise = init.data,
                          .labels = json_is_array(lj) ? labels : NULL,
                          .noise = noise.data ? noise_from_fixture : NULL,
                          .noise_user = &sn,
                          .threads = 1};
    float *out = malloc(sizeof(float) * init.count);
    int nfe = 0;
    ck_assert_msg(sampler_run(s, m, &o, out, &nfe, &e) == 0, "%s: %s", name, e.msg);
    ck_assert_int_eq(nfe, steps);
    double r = test_rel_l2(out, want.data, (size_t)want.count);
    fprintf(stderr, "  %-30s rel L2 vs diffusers %.3g\n", name, r);
    worst = fmax(worst, r);
    ck_assert_msg(r < 1e-5, "%s: rel L2 %g against diffusers", name, r);
    free(out);
    npy_array_free(&init);
    npy_array_free(&want);
    if (noise.data)
      npy_array_free(&noise);
    sampler_free(s);
    sched_config_free(&cfg);
    model_free(m);
  }
  fprintf(stderr, "sampler vs diffusers: worst rel L2 %.3g\n", worst);
  json_decref(root);
}
END_TEST

/* Samples of N(mu, 0.25 I) through 1000 DDPM steps with the exact denoiser. fixed_large keeps
 * the chain's variance within 0.3% of the data's (fixed_small loses 1.5% at 1000 steps). */
START_TEST(ddpm_samples_have_the_data_distribution) {
  enum { B = 256, DD = 192 };
  model *m = load_model("gauss1");
  json_t *ov = json_pack("{s:s}", "variance_type", "fixed_large");
  sched_config cfg;
  model_config(m, "ddpm", ov, &cfg);
  ck_assert_int_eq(cfg.clip_sample, 0);
  sampler *s = NULL;
  err e = {0};
  ck_assert_int_eq(sampler_new("ddpm", &cfg, 0, &s, &e), 0);
  ck_assert_int_eq(sampler_num_steps(s), 1000);
  float *x = malloc(sizeof(float) * B * DD);
  sampler_run_opts o = {.batch = B, .seed = 20240611, .threads = 1};
  ck_assert_msg(sampler_run(s, m, &o, x, NULL, &e) == 0, "%s", e.msg);

  char path[512];
  float mu[DD];
  st_file *f;
  ck_assert_int_eq(
      st_open(test_src_path(path, sizeof path,
                            "tests/fixtures/gmm/gauss1/diffusion_pytorch_model.safetensors"),
              &f, &e),
      0);
  ck_assert_int_eq(st_read_f32(f, "means", 0, NULL, mu, &e), 0);
  st_close(f);

  /* per-pixel sample means against mu: sum of squared z-scores is chi-square with DD degrees
   * of freedom (mean 192, sd 19.6); the pooled variance against 0.25 (standard error 0.6%) */
  double chi2 = 0, ss = 0;
  for (int i = 0; i < DD; i++) {
    double m_i = 0;
    for (int b = 0; b < B; b++)
      m_i += x[b * DD + i];
    m_i /= B;
    chi2 += (m_i - mu[i]) * (m_i - mu[i]) / (0.25 / B);
    for (int b = 0; b < B; b++)
      ss += (x[b * DD + i] - m_i) * (x[b * DD + i] - m_i);
  }
  const double var = ss / ((double)(B - 1) * DD);
  fprintf(stderr, "ddpm gauss1: chi2 of means %.1f (dof %d), variance %.4f (data 0.25)\n", chi2, DD,
          var);
  ck_assert_msg(chi2 < 300, "sample means are off: chi2 %g for %d dof", chi2, DD);
  ck_assert_msg(fabs(var / 0.25 - 1) < 0.03, "sample variance %g, data variance 0.25", var);
  free(x);
  sampler_free(s);
  sched_config_free(&cfg);
  json_decref(ov);
  model_free(m);
}
END_TEST

static sampler *make_sampler(const model *m, const char *solver, const char *overrides, int steps,
                             sched_config *cfg) {
  json_t *ov = overrides ? json_loads(overrides, 0, NULL) : NULL;
  model_config(m, solver, ov, cfg);
  json_decref(ov);
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(sampler_new(solver, cfg, steps, &s, &e) == 0, "%s", e.msg);
  return s;
}

/* The noise of image i depends on (seed, i) only: the same seed gives the same images, and
 * image 2 alone (first_image 2) is image 2 of the batch. */
START_TEST(seed_reproducibility) {
  enum { DD = 192 };
  model *m = load_model("mix3");
  const char *solvers[2] = {"ddpm", "ddim"};
  const char *ovs[2] = {NULL, "{\"eta\": 0.5}"};
  for (int k = 0; k < 2; k++) {
    sched_config cfg;
    sampler *s = make_sampler(m, solvers[k], ovs[k], 20, &cfg);
    float a[3 * DD], b[3 * DD], one[DD], other[3 * DD];
    err e = {0};
    sampler_run_opts o = {.batch = 3, .seed = 7, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o, a, NULL, &e), 0);
    ck_assert_int_eq(sampler_run(s, m, &o, b, NULL, &e), 0);
    ck_assert_int_eq(memcmp(a, b, sizeof a), 0);
    sampler_run_opts o1 = {.batch = 1, .seed = 7, .first_image = 2, .threads = 2};
    ck_assert_int_eq(sampler_run(s, m, &o1, one, NULL, &e), 0);
    ck_assert_int_eq(memcmp(one, a + 2 * DD, sizeof one), 0);
    sampler_run_opts o2 = {.batch = 3, .seed = 8, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o2, other, NULL, &e), 0);
    ck_assert(memcmp(a, other, sizeof a) != 0);
    ck_assert(memcmp(a, a + DD, DD * sizeof(float)) != 0);
    sampler_free(s);
    sched_config_free(&cfg);
  }
  model_free(m);
}
END_TEST

typedef struct progress_log {
  int calls, last_step, last_total, last_nfe, cancel_at;
  volatile int *cancel;
} progress_log;

static void on_progress(int step, int total, int nfe, void *user) {
  progress_log *p = user;
  ck_assert_int_eq(step, p->calls + 1);
  p->calls++;
  p->last_step = step;
  p->last_total = total;
  p->last_nfe = nfe;
  if (p->cancel_at && step == p->cancel_at)
    *p->cancel = 1;
}

START_TEST(progress_and_cancel) {
  enum { DD = 192 };
  model *m = load_model("mix3");
  sched_config cfg;
  sampler *s = make_sampler(m, "ddim", NULL, 10, &cfg);
  float out[2 * DD];
  err e = {0};
  volatile int cancel = 0;
  progress_log log = {.cancel = &cancel};
  sampler_run_opts o = {.batch = 2,
                        .seed = 1,
                        .progress = on_progress,
                        .progress_user = &log,
                        .cancel = &cancel,
                        .threads = 1};
  int nfe = -1;
  ck_assert_int_eq(sampler_run(s, m, &o, out, &nfe, &e), 0);
  ck_assert_int_eq(log.calls, 10);
  ck_assert_int_eq(log.last_total, 10);
  ck_assert_int_eq(log.last_nfe, 10);
  ck_assert_int_eq(nfe, 10);

  progress_log log2 = {.cancel = &cancel, .cancel_at = 3};
  o.progress_user = &log2;
  ck_assert_int_eq(sampler_run(s, m, &o, out, &nfe, &e), ERR_CANCELLED);
  ck_assert_int_eq(e.code, ERR_CANCELLED);
  ck_assert_int_eq(log2.calls, 3);
  ck_assert_int_eq(nfe, 3);
  /* already cancelled: no evaluation at all */
  ck_assert_int_eq(sampler_run(s, m, &o, out, &nfe, &e), ERR_CANCELLED);
  ck_assert_int_eq(nfe, 0);
  sampler_free(s);
  sched_config_free(&cfg);
  model_free(m);
}
END_TEST

START_TEST(errors) {
  enum { DD = 192 };
  model *m = load_model("mix3");
  sched_config cfg;
  model_config(m, "ddim", NULL, &cfg);
  sampler *s = NULL;
  err e = {0};
  ck_assert_int_eq(sampler_new("euler", &cfg, 10, &s, &e), ERR_UNSUPPORTED);
  ck_assert_ptr_nonnull(strstr(e.msg, "euler"));
  ck_assert_ptr_nonnull(strstr(e.msg, "ddim"));
  ck_assert_int_ne(sampler_new("ddim", &cfg, 1001, &s, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "num_inference_steps"));
  ck_assert_int_ne(sampler_new("ddim", &cfg, -1, &s, &e), 0);
  ck_assert_int_eq(sampler_solver_count(), 2);
  ck_assert_str_eq(sampler_solver_class("ddpm"), "DDPMScheduler");
  ck_assert_ptr_null(sampler_solver_class("nope"));
  ck_assert_int_eq(sampler_solver_default_steps("ddim"), 50);
  ck_assert_int_eq(sampler_new("ddim", &cfg, 0, &s, &e), 0);
  ck_assert_int_eq(sampler_num_steps(s), 50);
  ck_assert_str_eq(sampler_name(s), "ddim");
  float out[DD];
  sampler_run_opts o = {.batch = 0, .threads = 1};
  ck_assert_int_ne(sampler_run(s, m, &o, out, NULL, &e), 0);
  sampler_free(s);
  sched_config_free(&cfg);

  /* a learned variance needs a model that outputs one */
  s = make_sampler(m, "ddpm", "{\"variance_type\": \"learned_range\"}", 10, &cfg);
  o.batch = 1;
  ck_assert_int_ne(sampler_run(s, m, &o, out, NULL, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "variance_type"));
  sampler_free(s);
  sched_config_free(&cfg);
  model_free(m);

  /* a model error stops the run and says at which step */
  m = load_model("cond4");
  s = make_sampler(m, "ddim", NULL, 10, &cfg);
  const int64_t bad = 7;
  sampler_run_opts ol = {.batch = 1, .labels = &bad, .threads = 1};
  int nfe = -1;
  ck_assert_int_ne(sampler_run(s, m, &ol, out, &nfe, &e), 0);
  ck_assert_int_eq(nfe, 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "step 1"));
  sampler_free(s);
  sched_config_free(&cfg);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("sampler");
  TCase *tc = tcase_create("sampler");
  tcase_add_test(tc, matches_diffusers_loops);
  tcase_add_test(tc, ddpm_samples_have_the_data_distribution);
  tcase_add_test(tc, seed_reproducibility);
  tcase_add_test(tc, progress_and_cancel);
  tcase_add_test(tc, errors);
  suite_add_tcase(s, tc);
  return s;
}
