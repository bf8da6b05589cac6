/* The sampling loop and the solver family: every solver against diffusers' own scheduler loops on
 * the same noise (tools/gen_sampler_fixtures.py, tools/gen_solver_fixtures.py), the empirical
 * order of convergence of the deterministic ones on the analytic model, the stochastic ones
 * against the closed form of their chain on a Gaussian, seed reproducibility across batch
 * splits, NFE and progress accounting, cancellation, and errors for bad names, options and
 * combinations. */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>

#include "model.h"
#include "npy.h"
#include "rng.h"
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

static json_t *load_json(const char *path) {
  json_error_t je;
  json_t *j = json_load_file(path, 0, &je);
  ck_assert_msg(j != NULL, "%s: %s", path, je.text);
  return j;
}

/* One directory of tools/gen_solver_fixtures.py output: every case run through
 * sampler_new_from_json with the case's options, from the stored noise. Returns the worst rel L2.
 */
static double run_solver_fixtures(const char *dir, int verbose) {
  char path[1024];
  snprintf(path, sizeof path, "%s/cases.json", dir);
  json_t *root = load_json(path);
  const int batch = (int)json_integer_value(json_object_get(root, "batch"));
  const char *models = json_string_value(json_object_get(root, "models"));
  char mroot[768];
  if (models && models[0] == '/')
    snprintf(mroot, sizeof mroot, "%s", models);
  else
    test_src_path(mroot, sizeof mroot, models ? models : "tests/fixtures/gmm");
  size_t i;
  json_t *c;
  double worst = 0;
  json_array_foreach(json_object_get(root, "cases"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *mname = json_string_value(json_object_get(c, "model"));
    snprintf(path, sizeof path, "%s/%s", mroot, mname);
    model *m = NULL;
    err e = {0};
    ck_assert_msg(model_load(path, &m, &e) == 0, "%s: %s", path, e.msg);
    json_t *mcfg = load_json(model_scheduler_config_path(m));
    json_t *spec = json_pack("{s:O, s:O, s:O}", "name", json_object_get(c, "solver"), "steps",
                             json_object_get(c, "steps"), "options", json_object_get(c, "options"));
    sampler *s = NULL;
    ck_assert_msg(sampler_new_from_json(spec, mcfg, &s, &e) == 0, "%s: %s", name, e.msg);
    json_t *ts = json_object_get(c, "timesteps");
    const int ne = (int)json_array_size(ts);
    ck_assert_msg(sampler_nfe(s) == ne, "%s: %d evaluations planned, diffusers made %d", name,
                  sampler_nfe(s), ne);
    for (int k = 0; k < ne; k++) {
      const double want = json_number_value(json_array_get(ts, k)), got = sampler_timesteps(s)[k];
      ck_assert_msg(fabs(got - want) <= 1e-4 * fmax(1, fabs(want)),
                    "%s: timestep %d is %.6f, diffusers %.6f", name, k, got, want);
    }
    npy_array init, want, noise = {0};
    snprintf(path, sizeof path, "%s/%s_init.npy", dir, name);
    ck_assert_msg(npy_read_f32(path, &init, &e) == 0, "%s", e.msg);
    snprintf(path, sizeof path, "%s/%s_out.npy", dir, name);
    ck_assert_msg(npy_read_f32(path, &want, &e) == 0, "%s", e.msg);
    const size_t d = (size_t)(init.count / batch);
    stored_noise sn = {0};
    if (json_is_true(json_object_get(c, "stochastic"))) {
      snprintf(path, sizeof path, "%s/%s_noise.npy", dir, name);
      ck_assert_msg(npy_read_f32(path, &noise, &e) == 0, "%s", e.msg);
      sn = (stored_noise){noise.data, ne, batch, d};
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
    ck_assert_int_eq(nfe, ne);
    double r = test_rel_l2(out, want.data, (size_t)want.count);
    if (verbose)
      fprintf(stderr, "  %-34s %-28s rel L2 vs diffusers %.3g\n", name,
              json_string_value(json_object_get(c, "solver")), r);
    worst = fmax(worst, r);
    ck_assert_msg(r < 1e-4, "%s: rel L2 %g against diffusers", name, r);
    free(out);
    npy_array_free(&init);
    npy_array_free(&want);
    if (noise.data)
      npy_array_free(&noise);
    json_decref(spec);
    json_decref(mcfg);
    sampler_free(s);
    model_free(m);
  }
  json_decref(root);
  return worst;
}

START_TEST(solvers_match_diffusers) {
  char dir[512];
  double w = run_solver_fixtures(test_src_path(dir, sizeof dir, "tests/fixtures/solvers"), 1);
  fprintf(stderr, "solvers vs diffusers: worst rel L2 %.3g\n", w);
}
END_TEST

/* More fixture folders (other settings, other noise) listed colon-separated in
 * DENOISED_SOLVER_FIXTURES, made with tools/gen_solver_fixtures.py --out DIR. */
START_TEST(solvers_match_diffusers_extra) {
  const char *list = getenv("DENOISED_SOLVER_FIXTURES");
  if (!list || !*list)
    return;
  char *copy = strdup(list), *save = NULL;
  for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
    double w = run_solver_fixtures(d, 1);
    fprintf(stderr, "solvers vs diffusers (%s): worst rel L2 %.3g\n", d, w);
  }
  free(copy);
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
  atomic_int *cancel;
} progress_log;

static void on_progress(int step, int total, int nfe, void *user) {
  progress_log *p = user;
  ck_assert_int_eq(step, p->calls + 1);
  p->calls++;
  p->last_step = step;
  p->last_total = total;
  p->last_nfe = nfe;
  if (p->cancel_at && step == p->cancel_at)
    atomic_store(p->cancel, 1);
}

START_TEST(progress_and_cancel) {
  enum { DD = 192 };
  model *m = load_model("mix3");
  sched_config cfg;
  sampler *s = make_sampler(m, "ddim", NULL, 10, &cfg);
  float out[2 * DD];
  err e = {0};
  atomic_int cancel = 0;
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
  ck_assert_int_eq(sampler_new("eulerx", &cfg, 10, &s, &e), ERR_UNSUPPORTED);
  ck_assert_ptr_nonnull(strstr(e.msg, "unknown scheduler 'eulerx'"));
  ck_assert_ptr_nonnull(strstr(e.msg, "dpm++2m"));
  ck_assert_int_ne(sampler_new("ddim", &cfg, 1001, &s, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "num_inference_steps"));
  ck_assert_int_ne(sampler_new("ddim", &cfg, -1, &s, &e), 0);
  ck_assert_int_ge(sampler_solver_count(), 20);
  ck_assert_str_eq(sampler_solver_class("ddpm"), "DDPMScheduler");
  ck_assert_str_eq(sampler_solver_class("dpm++3m"), "DPMSolverMultistepScheduler");
  ck_assert_str_eq(sampler_solver_class("UniPCMultistepScheduler"), "UniPCMultistepScheduler");
  ck_assert_str_eq(sampler_solver_class("dpm-solver-fast"), "DPM_Solver");
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

/* ---- the JSON request -> solver function ---- */

/* sampler_new_from_json on mix3's scheduler config; returns the error code, message in e. */
static int from_json(const char *spec_text, sampler **out, err *e) {
  char path[512];
  json_t *mcfg =
      load_json(test_src_path(path, sizeof path, "tests/fixtures/gmm/mix3/scheduler_config.json"));
  json_error_t je;
  json_t *spec = json_loads(spec_text, 0, &je);
  ck_assert_msg(spec != NULL, "bad test JSON %s: %s", spec_text, je.text);
  *out = NULL;
  int rc = sampler_new_from_json(spec, mcfg, out, e);
  json_decref(spec);
  json_decref(mcfg);
  return rc;
}

#define END ((const char *)NULL)

/* The error for spec_text must contain every one of the END-terminated words. */
static void expect_error(const char *spec_text, ...) {
  sampler *s = NULL;
  err e = {0};
  int rc = from_json(spec_text, &s, &e);
  ck_assert_msg(rc != ERR_OK, "%s: accepted", spec_text);
  ck_assert_ptr_null(s);
  va_list ap;
  va_start(ap, spec_text);
  for (const char *w = va_arg(ap, const char *); w; w = va_arg(ap, const char *))
    ck_assert_msg(strstr(e.msg, w) != NULL, "%s: error '%s' does not mention '%s'", spec_text,
                  e.msg, w);
  va_end(ap);
}

START_TEST(json_spec_errors) {
  expect_error("{\"name\": \"dpm++9m\"}", "unknown scheduler 'dpm++9m'", END);
  expect_error("{\"name\": 3}", "'name'", END);
  expect_error("{\"name\": \"ddim\", \"steps\": 0}", "'steps'", END);
  expect_error("{\"name\": \"ddim\", \"steps\": 20, \"extra\": 1}", "unknown key 'extra'", END);
  expect_error("{\"name\": \"ddim\", \"options\": []}", "'options'", END);
  /* keys: unknown, not read by this solver, bad values */
  expect_error("{\"name\": \"ddim\", \"options\": {\"solver_ordr\": 2}}", "solver_ordr", END);
  expect_error("{\"name\": \"ddim\", \"options\": {\"solver_order\": 2}}", "solver_order", "ddim",
               END);
  expect_error("{\"name\": \"euler\", \"options\": {\"eta\": 0.5}}", "'eta'", END);
  expect_error("{\"name\": \"dpm++2m\", \"options\": {\"solver_order\": 4}}", "solver_order", END);
  expect_error("{\"name\": \"unipc\", \"options\": {\"solver_type\": \"rk4\"}}", "solver_type",
               "bh2", END);
  expect_error("{\"name\": \"DPMSolverMultistepScheduler\", \"options\": {\"algorithm_type\": 1}}",
               "algorithm_type", END);
  expect_error("{\"name\": \"heun\", \"options\": {\"clip_sample_range\": -1}}",
               "clip_sample_range", END);
  expect_error("{\"name\": \"ddim\", \"config\": {\"beta_schedul\": \"linear\"}}", "beta_schedul",
               END);
  /* what a name stands for cannot be contradicted */
  expect_error("{\"name\": \"dpm++2m\", \"options\": {\"solver_order\": 3}}", "solver_order",
               "contradicts", "dpm++2m", END);
  expect_error("{\"name\": \"plms\", \"options\": {\"skip_prk_steps\": false}}", "skip_prk_steps",
               END);
  /* features this engine does not implement */
  expect_error("{\"name\": \"euler\", \"options\": {\"use_beta_sigmas\": true}}", "use_beta_sigmas",
               "not supported", END);
  expect_error("{\"name\": \"unipc\", \"options\": {\"use_flow_sigmas\": true}}", "use_flow_sigmas",
               END);
  /* combinations */
  expect_error("{\"name\": \"DPMSolverMultistepScheduler\", \"options\": {\"algorithm_type\": "
               "\"dpmsolver\"}}",
               "final_sigmas_type", "sigma_min", END);
  expect_error("{\"name\": \"dpm++2m\", \"options\": {\"use_karras_sigmas\": true, "
               "\"use_lu_lambdas\": true}}",
               "use_lu_lambdas", END);
  expect_error("{\"name\": \"DPMSolverMultistepScheduler\", \"options\": {\"algorithm_type\": "
               "\"sde-dpmsolver\", \"solver_order\": 3, \"final_sigmas_type\": \"sigma_min\"}}",
               "solver_order", END);
  expect_error("{\"name\": \"dpm++3m\", \"steps\": 20, \"options\": {\"use_karras_sigmas\": true, "
               "\"final_sigmas_type\": \"sigma_min\"}}",
               "final_sigmas_type", END);
  expect_error("{\"name\": \"unipc\", \"options\": {\"solver_type\": \"bh1\"}}", "bh1", "zero",
               END);
  expect_error("{\"name\": \"unipc\", \"options\": {\"predict_x0\": false}}", "predict_x0", END);
  expect_error("{\"name\": \"unipc\", \"options\": {\"thresholding\": true, \"predict_x0\": false, "
               "\"final_sigmas_type\": \"sigma_min\"}}",
               "thresholding", END);
  expect_error("{\"name\": \"DPMSolverSinglestepScheduler\", \"options\": {\"algorithm_type\": "
               "\"sde-dpmsolver\", \"final_sigmas_type\": \"sigma_min\"}}",
               "sde-dpmsolver", END);
  expect_error("{\"name\": \"pndm\", \"steps\": 3}", "4 steps", END);
  expect_error("{\"name\": \"euler-a\", \"options\": {\"prediction_type\": \"sample\"}}",
               "prediction_type", END);
  expect_error("{\"name\": \"pndm\", \"options\": {\"prediction_type\": \"sample\"}}",
               "prediction_type", END);
  expect_error("{\"name\": \"dpm-solver-adaptive\", \"options\": {\"solver_order\": 1}}",
               "solver_order", END);
  expect_error("{\"name\": \"dpm-solver-fast\", \"options\": {\"thresholding\": true}}",
               "thresholding", "dpmsolver++", END);
  expect_error("{\"name\": \"DPM_Solver\", \"options\": {\"algorithm_type\": \"sde-dpmsolver++\"}}",
               "algorithm_type", END);
  expect_error("{\"name\": \"DPM_Solver\", \"options\": {\"method\": \"F-PNDM\"}}", "method", END);
  expect_error("{\"name\": \"f-pndm\", \"options\": {\"method\": \"adaptive\"}}", "method", END);
  expect_error("{\"name\": \"DPM_Solver\", \"steps\": 2, \"options\": {\"solver_order\": 3}}",
               "at least 3", END);
  expect_error("{\"name\": \"ddim\", \"steps\": 10, \"options\": {\"steps_offset\": 950}}",
               "steps_offset", END);

  /* and what is fine: the model's class from its config, config layers, aliases */
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(from_json("{}", &s, &e) == 0, "%s", e.msg); /* mix3's DDPMScheduler */
  ck_assert_str_eq(sampler_name(s), "DDPMScheduler");
  ck_assert_int_eq(sampler_num_steps(s), 1000);
  sampler_free(s);
  ck_assert_msg(from_json("{\"name\": \"dpm++2m\", \"steps\": 12, \"config\": {\"_class_name\": "
                          "\"DDIMScheduler\", \"clip_sample\": true, \"solver_order\": 3}, "
                          "\"options\": {\"use_karras_sigmas\": true, \"solver_order\": 2}}",
                          &s, &e) == 0,
                "%s", e.msg);
  /* the name fixes solver_order 2 over the config's 3; DDIM's clip_sample is ignored */
  ck_assert_int_eq(sampler_config(s)->solver_order, 2);
  ck_assert_int_eq(sampler_config(s)->use_karras_sigmas, 1);
  json_t *cj = sampler_config_json(s);
  ck_assert_ptr_null(json_object_get(cj, "clip_sample"));
  ck_assert_ptr_null(json_object_get(cj, "eta"));
  ck_assert_int_eq(json_integer_value(json_object_get(cj, "solver_order")), 2);
  ck_assert_str_eq(json_string_value(json_object_get(cj, "_class_name")),
                   "DPMSolverMultistepScheduler");
  json_decref(cj);
  sampler_free(s);
}
END_TEST

/* The recorded config rebuilds the same solver: sampler_config_json -> sched_config ->
 * sampler_new gives the same samples (what --replay and the daemon rely on). */
START_TEST(config_round_trip) {
  static const char *const specs[] = {
      "{\"name\": \"dpm++3m\", \"steps\": 9, \"options\": {\"use_karras_sigmas\": true}}",
      "{\"name\": \"unipc\", \"steps\": 8, \"options\": {\"disable_corrector\": [1], "
      "\"solver_order\": 3}}",
      "{\"name\": \"dpm-solver-fast\", \"steps\": 10}",
      "{\"name\": \"heun\", \"steps\": 5, \"options\": {\"timestep_spacing\": \"trailing\"}}",
      "{\"name\": \"f-pndm\", \"steps\": 6}"};
  model *m = load_model("mix3");
  for (size_t i = 0; i < sizeof specs / sizeof *specs; i++) {
    sampler *a = NULL, *b = NULL;
    err e = {0};
    ck_assert_msg(from_json(specs[i], &a, &e) == 0, "%s: %s", specs[i], e.msg);
    json_t *cj = sampler_config_json(a);
    sched_config cfg;
    ck_assert_msg(sched_config_from_json(cj, NULL, 1, &cfg, &e) == 0, "%s", e.msg);
    ck_assert_msg(sampler_new(sampler_name(a), &cfg, sampler_num_steps(a), &b, &e) == 0, "%s",
                  e.msg);
    float xa[2 * 192], xb[2 * 192];
    sampler_run_opts o = {.batch = 2, .seed = 5, .threads = 1};
    ck_assert_int_eq(sampler_run(a, m, &o, xa, NULL, &e), 0);
    ck_assert_int_eq(sampler_run(b, m, &o, xb, NULL, &e), 0);
    ck_assert_msg(memcmp(xa, xb, sizeof xa) == 0, "%s: replay differs", specs[i]);
    json_decref(cj);
    sched_config_free(&cfg);
    sampler_free(a);
    sampler_free(b);
  }
  model_free(m);
}
END_TEST

/* ---- convergence orders on the analytic model ---- */

/* mix3's mixture under a 100000-step schedule with the same alpha_bar curve: the DPM-family
 * classes round Karras/Lu timesteps to integers, which on a 1000-step schedule would put the
 * model at a noise level the solver does not assume; on this grid that error is negligible. */
static const char *fine_model(char *dir, size_t n) {
  char src[512], path[700];
  ck_assert_ptr_nonnull(test_tmpdir(dir, n));
  const char *files[2] = {"config.json", "diffusion_pytorch_model.safetensors"};
  for (int i = 0; i < 2; i++) {
    snprintf(path, sizeof path, "tests/fixtures/gmm/mix3/%s", files[i]);
    test_src_path(src, sizeof src, path);
    FILE *in = fopen(src, "rb");
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    FILE *out = fopen(path, "wb");
    ck_assert(in && out);
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, in)) > 0)
      ck_assert_int_eq(fwrite(buf, 1, k, out), k);
    fclose(in);
    fclose(out);
  }
  snprintf(path, sizeof path, "%s/scheduler_config.json", dir);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs("{\"_class_name\": \"DDPMScheduler\", \"beta_start\": 1e-06, \"beta_end\": 0.0002, "
        "\"beta_schedule\": \"linear\", \"num_train_timesteps\": 100000, \"clip_sample\": false}\n",
        f);
  fclose(f);
  return dir;
}

typedef struct order_env {
  model *m;
  json_t *mcfg;
  float ref_min[4 * 192], ref_clean[4 * 192];
} order_env;

enum { OB = 4 };

static int order_run(order_env *env, const char *name, int steps, const char *opts, float *out,
                     int *nfe, err *e) {
  json_t *spec = json_pack("{s:s, s:i}", "name", name, "steps", steps);
  if (opts)
    json_object_set_new(spec, "options", json_loads(opts, 0, NULL));
  sampler *s = NULL;
  int rc = sampler_new_from_json(spec, env->mcfg, &s, e);
  json_decref(spec);
  if (rc != ERR_OK)
    return rc;
  sampler_run_opts o = {.batch = OB, .seed = 3, .threads = 1};
  rc = sampler_run(s, env->m, &o, out, nfe, e);
  if (rc == ERR_OK)
    rc = sampler_ends_clean(s) ? 1 : 0;
  sampler_free(s);
  return rc;
}

static void order_env_init(order_env *env, const char *model_dir) {
  err e = {0};
  ck_assert_msg(model_load(model_dir, &env->m, &e) == 0, "%s", e.msg);
  env->mcfg = sched_config_read_json(model_scheduler_config_path(env->m), &e);
  ck_assert_ptr_nonnull(env->mcfg);
  /* the reference: DPM-Solver-3 (official code), 3000 NFE uniform in log-SNR, no clipping; the
   * clean end is its data prediction at the last training timestep */
  const char *ref = "{\"method\": \"singlestep_fixed\", \"solver_order\": 3, \"skip_type\": "
                    "\"logSNR\", \"lambda_min_clipped\": null}";
  const char *refc = "{\"method\": \"singlestep_fixed\", \"solver_order\": 3, \"skip_type\": "
                     "\"logSNR\", \"lambda_min_clipped\": null, \"denoise_to_zero\": true}";
  int nfe;
  ck_assert_msg(order_run(env, "DPM_Solver", 3000, ref, env->ref_min, &nfe, &e) == 0, "%s", e.msg);
  ck_assert_msg(order_run(env, "DPM_Solver", 3000, refc, env->ref_clean, &nfe, &e) == 1, "%s",
                e.msg);
}

typedef struct order_case {
  const char *name, *opts;
  int steps[3];
  double p_min;    /* measured order between the last two runs must reach this */
  const char *why; /* what the order is and why */
} order_case;

static void check_orders(order_env *env, const order_case *cases, int n) {
  for (int i = 0; i < n; i++) {
    const order_case *c = &cases[i];
    double errs[3];
    int nfes[3];
    for (int k = 0; k < 3; k++) {
      float x[OB * 192];
      err e = {0};
      int clean = order_run(env, c->name, c->steps[k], c->opts, x, &nfes[k], &e);
      ck_assert_msg(clean >= 0, "%s %s: %s", c->name, c->opts ? c->opts : "", e.msg);
      errs[k] = test_rel_l2(x, clean ? env->ref_clean : env->ref_min, OB * 192);
    }
    const double p1 = log(errs[0] / errs[1]) / log((double)nfes[1] / nfes[0]);
    const double p2 = log(errs[1] / errs[2]) / log((double)nfes[2] / nfes[1]);
    fprintf(stderr, "  order %-16s %-62s NFE %3d/%3d/%3d err %.2e %.2e %.2e p %.2f %.2f (%s)\n",
            c->name, c->opts ? c->opts : "", nfes[0], nfes[1], nfes[2], errs[0], errs[1], errs[2],
            p1, p2, c->why);
    ck_assert_msg(errs[2] < errs[1] && errs[1] < errs[0], "%s: error does not fall with NFE",
                  c->name);
    ck_assert_msg(p2 >= c->p_min, "%s %s: empirical order %.2f, expected at least %.2f", c->name,
                  c->opts ? c->opts : "", p2, c->p_min);
  }
}

/* Solvers whose grids are uniform in time (DDIM and the PNDMs) on the 1000-step models, with
 * step counts dividing 1000 so that the grid starts at t = 999 and steps evenly. DDIM runs on the
 * single Gaussian: on the mixture, at these step counts one of the images still ends in another
 * component than the reference's, which no order shows. */
START_TEST(convergence_orders_time_grid) {
  static const order_case ddim[] = {
      {"ddim",
       "{\"timestep_spacing\": \"trailing\", \"set_alpha_to_one\": false}",
       {10, 20, 40},
       0.8,
       "1"},
      {"ddim", "{\"timestep_spacing\": \"trailing\"}", {10, 20, 40}, 0.8, "1, to sigma 0"},
  };
  static const order_case pndms[] = {
      {"pndm",
       "{\"timestep_spacing\": \"trailing\"}",
       {10, 20, 40},
       3.5,
       "pseudo RK4 then pseudo linear multistep: 4"},
      {"plms",
       "{\"timestep_spacing\": \"trailing\"}",
       {10, 20, 40},
       3.0,
       "4, with a pseudo improved Euler start"},
      {"f-pndm", "{\"timestep_spacing\": \"trailing\"}", {10, 20, 40}, 3.5, "4"},
      {"s-pndm", "{\"timestep_spacing\": \"trailing\"}", {10, 20, 40}, 1.6, "2"},
  };
  char path[512];
  order_env env;
  order_env_init(&env, test_src_path(path, sizeof path, "tests/fixtures/gmm/gauss1"));
  check_orders(&env, ddim, (int)(sizeof ddim / sizeof *ddim));
  json_decref(env.mcfg);
  model_free(env.m);
  order_env_init(&env, test_src_path(path, sizeof path, "tests/fixtures/gmm/mix3"));
  check_orders(&env, pndms, (int)(sizeof pndms / sizeof *pndms));
  json_decref(env.mcfg);
  model_free(env.m);
}
END_TEST

/* The sigma/lambda-grid solvers on grids that refine toward the data (Lu's uniform log-SNR,
 * Karras), where their orders show: the linspace default spends its last step on a jump from
 * t ~ T/n to the data that no order can shorten. */
START_TEST(convergence_orders_sigma_grid) {
  static const order_case cases[] = {
      {"dpm++2m", "{\"use_lu_lambdas\": true}", {16, 32, 64}, 1.6, "2"},
      {"dpm++3m",
       "{\"use_lu_lambdas\": true}",
       {16, 32, 64},
       1.6,
       "2, not 3: diffusers' (and the official) 3M halves the D2 term"},
      {"dpm-solver", "{\"use_lu_lambdas\": true}", {16, 32, 64}, 1.6, "2"},
      {"dpm++2s",
       "{\"use_karras_sigmas\": true, \"final_sigmas_type\": \"sigma_min\"}",
       {16, 32, 64},
       1.6,
       "2"},
      {"unipc",
       "{\"use_karras_sigmas\": true, \"final_sigmas_type\": \"sigma_min\"}",
       {16, 32, 64},
       2.5,
       "3: the corrector adds one"},
      {"unipc",
       "{\"use_karras_sigmas\": true, \"final_sigmas_type\": \"sigma_min\", \"solver_order\": 3}",
       {16, 32, 64},
       3.2,
       "4"},
      {"deis", "{\"use_karras_sigmas\": true}", {16, 32, 64}, 1.6, "2"},
      {"deis",
       "{\"use_karras_sigmas\": true, \"solver_order\": 3}",
       {16, 32, 64},
       1.0,
       "3 in theory; diffusers' float32 log-rho coefficients cancel"},
      {"euler", "{\"use_karras_sigmas\": true}", {16, 32, 64}, 0.9, "1"},
      {"heun", "{\"use_karras_sigmas\": true}", {16, 32, 64}, 1.8, "2"},
      {"dpm-solver-fast", "{\"lambda_min_clipped\": null}", {15, 30, 60}, 2.5, "3"},
      {"DPM_Solver",
       "{\"lambda_min_clipped\": null, \"skip_type\": \"logSNR\"}",
       {16, 32, 64},
       1.6,
       "multistep 2"},
      {"DPM_Solver",
       "{\"lambda_min_clipped\": null, \"skip_type\": \"logSNR\", \"method\": "
       "\"singlestep_fixed\", "
       "\"solver_order\": 2, \"solver_type\": \"taylor\"}",
       {16, 32, 64},
       1.6,
       "singlestep 2"},
  };
  order_env env;
  char dir[256];
  order_env_init(&env, fine_model(dir, sizeof dir));
  check_orders(&env, cases, (int)(sizeof cases / sizeof *cases));
  json_decref(env.mcfg);
  model_free(env.m);
}
END_TEST

/* The adaptive solver meets its tolerance with a data-dependent NFE that it reports, adapting each
 * image on its own (the same image alone or in a batch is bit-identical). */
START_TEST(adaptive_solver) {
  order_env env;
  char dir[256];
  order_env_init(&env, fine_model(dir, sizeof dir));
  for (int order = 2; order <= 3; order++) {
    char opts[160];
    snprintf(opts, sizeof opts,
             "{\"lambda_min_clipped\": null, \"solver_order\": %d, \"rtol\": 0.005, "
             "\"atol\": 0.0005}",
             order);
    float x[OB * 192];
    int nfe = 0;
    err e = {0};
    ck_assert_msg(order_run(&env, "dpm-solver-adaptive", 10, opts, x, &nfe, &e) == 0, "%s", e.msg);
    const double er = test_rel_l2(x, env.ref_min, OB * 192);
    fprintf(stderr, "  adaptive DPM-Solver-%d%d: %d NFE, rel L2 %.2e\n", order - 1, order, nfe, er);
    ck_assert_int_gt(nfe, 0);
    ck_assert_int_eq(nfe % order, 0);
    ck_assert_msg(er < 0.02, "adaptive order %d: error %g", order, er);
    /* tighter tolerance: more NFE, less error */
    snprintf(opts, sizeof opts,
             "{\"lambda_min_clipped\": null, \"solver_order\": %d, \"rtol\": 0.0005, "
             "\"atol\": 0.00005}",
             order);
    float y[OB * 192];
    int nfe2 = 0;
    ck_assert_int_eq(order_run(&env, "dpm-solver-adaptive", 10, opts, y, &nfe2, &e), 0);
    ck_assert_int_gt(nfe2, nfe);
    ck_assert(test_rel_l2(y, env.ref_min, OB * 192) < er);
  }
  /* image 2 alone equals image 2 of the batch */
  json_t *spec = json_pack("{s:s}", "name", "dpm-solver-adaptive");
  sampler *s = NULL;
  err e = {0};
  ck_assert_int_eq(sampler_new_from_json(spec, env.mcfg, &s, &e), 0);
  ck_assert_int_eq(sampler_nfe(s), 0);
  ck_assert_ptr_null(sampler_timesteps(s));
  float all[3 * 192], one[192];
  sampler_run_opts o = {.batch = 3, .seed = 11, .threads = 1};
  sampler_run_opts o1 = {.batch = 1, .seed = 11, .first_image = 2, .threads = 1};
  ck_assert_int_eq(sampler_run(s, env.m, &o, all, NULL, &e), 0);
  ck_assert_int_eq(sampler_run(s, env.m, &o1, one, NULL, &e), 0);
  ck_assert_int_eq(memcmp(one, all + 2 * 192, sizeof one), 0);
  sampler_free(s);
  json_decref(spec);
  json_decref(env.mcfg);
  model_free(env.m);
}
END_TEST

/* ---- stochastic solvers ---- */

typedef struct unit_noise {
  uint64_t stream; /* the one stream that gets ones; 0: none */
} unit_noise;

static int noise_unit(void *user, uint64_t image, uint64_t stream, float *out, size_t n, err *e) {
  (void)image;
  (void)e;
  const unit_noise *u = user;
  for (size_t i = 0; i < n; i++)
    out[i] = stream == u->stream ? 1.0f : 0.0f;
  return ERR_OK;
}

/* On a single Gaussian N(mu, s^2 I) every step is affine in x and in its noise, so the chain's
 * output is N(m, v I) with m the output from zero noise and v = A^2 + sum c_i^2, A and c_i read
 * off by switching on x_T or one step's noise. Many samples must have that mean and variance:
 * this checks the noise enters each step with the right scale and independence. */
START_TEST(stochastic_match_closed_form) {
  enum { B = 384, DD = 192 };
  static const struct {
    const char *name;
    int steps;
    const char *opts;
    double data_tol; /* relative distance of the chain's variance from the data's, 0: unchecked */
  } cases[] = {{"euler-a", 30, NULL, 0.4},
               {"dpm++2m-sde", 20, NULL, 0.08},
               {"dpm++2m-sde", 15, "{\"solver_type\": \"heun\"}", 0.12},
               {"dpm++2s-sde", 20, NULL, 0},
               {"ddim", 25, "{\"eta\": 1.0}", 0.4},
               {"ddpm", 40, "{\"variance_type\": \"fixed_large\"}", 0.2},
               {"DPMSolverMultistepScheduler", 20,
                "{\"algorithm_type\": \"sde-dpmsolver\", \"final_sigmas_type\": \"sigma_min\"}",
                0.4}}; /* +35% at 20 steps, +2% at 100, 0 at 400 */
  model *m = load_model("gauss1");
  char path[512];
  json_t *mcfg = load_json(
      test_src_path(path, sizeof path, "tests/fixtures/gmm/gauss1/scheduler_config.json"));
  float *x = malloc(sizeof(float) * B * DD);
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    json_t *spec = json_pack("{s:s, s:i}", "name", cases[i].name, "steps", cases[i].steps);
    if (cases[i].opts)
      json_object_set_new(spec, "options", json_loads(cases[i].opts, 0, NULL));
    sampler *s = NULL;
    err e = {0};
    ck_assert_msg(sampler_new_from_json(spec, mcfg, &s, &e) == 0, "%s", e.msg);
    ck_assert(sampler_is_stochastic(s));
    float zero[DD], ones[DD], mean[DD], y[DD];
    memset(zero, 0, sizeof zero);
    for (int k = 0; k < DD; k++)
      ones[k] = 1.0f;
    unit_noise un = {0};
    sampler_run_opts o = {
        .batch = 1, .init_noise = zero, .noise = noise_unit, .noise_user = &un, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o, mean, NULL, &e), 0);
    o.init_noise = ones;
    ck_assert_int_eq(sampler_run(s, m, &o, y, NULL, &e), 0);
    double var = 0;
    for (int k = 0; k < DD; k++)
      var += ((double)y[k] - mean[k]) * ((double)y[k] - mean[k]) / DD;
    o.init_noise = zero;
    for (int j = 1; j <= sampler_nfe(s); j++) {
      un.stream = (uint64_t)j;
      ck_assert_int_eq(sampler_run(s, m, &o, y, NULL, &e), 0);
      for (int k = 0; k < DD; k++)
        var += ((double)y[k] - mean[k]) * ((double)y[k] - mean[k]) / DD;
    }
    sampler_run_opts mc = {.batch = B, .seed = 4242, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &mc, x, NULL, &e), 0);
    double chi2 = 0, ss = 0;
    for (int k = 0; k < DD; k++) {
      double mk = 0;
      for (int b = 0; b < B; b++)
        mk += x[b * DD + k];
      mk /= B;
      chi2 += (mk - mean[k]) * (mk - mean[k]) / (var / B);
      for (int b = 0; b < B; b++)
        ss += (x[b * DD + k] - mk) * (x[b * DD + k] - mk);
    }
    const double v = ss / ((double)(B - 1) * DD);
    fprintf(stderr,
            "  %-28s %3d steps: chain variance %.4f (data 0.25), samples %.4f, chi2 of means %.0f "
            "(dof %d)\n",
            cases[i].name, cases[i].steps, var, v, chi2, DD);
    /* standard error of the pooled variance: sqrt(2 / (B DD)) = 0.5% */
    ck_assert_msg(fabs(v / var - 1) < 0.03, "%s: sample variance %g, chain %g", cases[i].name, v,
                  var);
    ck_assert_msg(chi2 < 300, "%s: sample means off, chi2 %g", cases[i].name, chi2);
    /* and the chain itself: close to the data for the sound solvers; diffusers' singlestep SDE
     * draws the intermediate and the final noise independently and loses variance */
    if (cases[i].data_tol > 0)
      ck_assert_msg(fabs(var / 0.25 - 1) < cases[i].data_tol, "%s: chain variance %g, data 0.25",
                    cases[i].name, var);
    sampler_free(s);
    json_decref(spec);
  }
  free(x);
  json_decref(mcfg);
  model_free(m);
}
END_TEST

/* The noise of image i depends on (seed, i) only, for every stochastic solver. */
START_TEST(stochastic_seed_reproducibility) {
  enum { DD = 192 };
  static const char *const specs[] = {
      "{\"name\": \"euler-a\", \"steps\": 12}", "{\"name\": \"dpm++2m-sde\", \"steps\": 10}",
      "{\"name\": \"dpm++2s-sde\", \"steps\": 10}",
      "{\"name\": \"ddim\", \"steps\": 10, \"options\": {\"eta\": 1}}"};
  model *m = load_model("mix3");
  for (size_t k = 0; k < sizeof specs / sizeof *specs; k++) {
    sampler *s = NULL;
    err e = {0};
    ck_assert_msg(from_json(specs[k], &s, &e) == 0, "%s", e.msg);
    float a[3 * DD], b[3 * DD], one[DD], other[3 * DD];
    sampler_run_opts o = {.batch = 3, .seed = 7, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o, a, NULL, &e), 0);
    ck_assert_int_eq(sampler_run(s, m, &o, b, NULL, &e), 0);
    ck_assert_int_eq(memcmp(a, b, sizeof a), 0);
    sampler_run_opts o1 = {.batch = 1, .seed = 7, .first_image = 2, .threads = 2};
    ck_assert_int_eq(sampler_run(s, m, &o1, one, NULL, &e), 0);
    ck_assert_msg(memcmp(one, a + 2 * DD, sizeof one) == 0, "%s: split batch differs", specs[k]);
    sampler_run_opts o2 = {.batch = 3, .seed = 8, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o2, other, NULL, &e), 0);
    ck_assert(memcmp(a, other, sizeof a) != 0);
    sampler_free(s);
  }
  model_free(m);
}
END_TEST

/* ---- NFE and progress accounting ---- */

START_TEST(nfe_and_progress) {
  static const struct {
    const char *spec;
    int nfe, steps; /* planned evaluations, progress steps */
  } cases[] = {
      {"{\"name\": \"heun\", \"steps\": 10}", 19, 10},
      {"{\"name\": \"pndm\", \"steps\": 10}", 19, 10},
      {"{\"name\": \"plms\", \"steps\": 10}", 11, 10},
      {"{\"name\": \"dpm++2s\", \"steps\": 10}", 10, 10},
      {"{\"name\": \"unipc\", \"steps\": 7}", 7, 7},
      {"{\"name\": \"f-pndm\", \"steps\": 10}", 19, 10},
      {"{\"name\": \"f-pndm\", \"steps\": 2}", 8, 2},
      {"{\"name\": \"s-pndm\", \"steps\": 10}", 11, 10},
      {"{\"name\": \"dpm-solver-fast\", \"steps\": 10}", 10, 4}, /* orders 3,3,3,1 */
      {"{\"name\": \"dpm-solver-fast\", \"steps\": 11}", 11, 4}, /* 3,3,3,2 */
      {"{\"name\": \"dpm-solver-fast\", \"steps\": 12}", 12, 5}, /* 3,3,3,2,1 */
      {"{\"name\": \"DPM_Solver\", \"steps\": 10, \"options\": {\"method\": \"singlestep\", "
       "\"solver_order\": 2}}",
       10, 5},
      {"{\"name\": \"DPM_Solver\", \"steps\": 9, \"options\": {\"method\": \"singlestep_fixed\", "
       "\"solver_order\": 2}}",
       8, 4},
      {"{\"name\": \"DPM_Solver\", \"steps\": 10, \"options\": {\"denoise_to_zero\": true}}", 11,
       10},
  };
  model *m = load_model("mix3");
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    sampler *s = NULL;
    err e = {0};
    ck_assert_msg(from_json(cases[i].spec, &s, &e) == 0, "%s: %s", cases[i].spec, e.msg);
    ck_assert_msg(sampler_nfe(s) == cases[i].nfe, "%s: plans %d NFE, expected %d", cases[i].spec,
                  sampler_nfe(s), cases[i].nfe);
    atomic_int cancel = 0;
    progress_log log = {.cancel = &cancel};
    float out[2 * 192];
    sampler_run_opts o = {.batch = 2,
                          .seed = 1,
                          .progress = on_progress,
                          .progress_user = &log,
                          .cancel = &cancel,
                          .threads = 1};
    int nfe = 0;
    ck_assert_int_eq(sampler_run(s, m, &o, out, &nfe, &e), 0);
    ck_assert_msg(nfe == cases[i].nfe, "%s: %d NFE, planned %d", cases[i].spec, nfe, cases[i].nfe);
    ck_assert_msg(log.calls == cases[i].steps && log.last_total == cases[i].steps,
                  "%s: %d progress calls of %d, expected %d", cases[i].spec, log.calls,
                  log.last_total, cases[i].steps);
    ck_assert_int_eq(log.last_nfe, nfe);
    /* cancellation in the middle stops the custom loops too */
    if (cases[i].steps > 2) {
      progress_log log2 = {.cancel = &cancel, .cancel_at = 2};
      o.progress_user = &log2;
      ck_assert_msg(sampler_run(s, m, &o, out, &nfe, &e) == ERR_CANCELLED, "%s: not cancelled",
                    cases[i].spec);
      ck_assert_int_lt(nfe, cases[i].nfe);
      cancel = 0;
    }
    sampler_free(s);
  }
  model_free(m);
}
END_TEST

/* The paper's dynamic thresholding (DPM-Solver++): s = max(percentile, thresholding_max_val),
 * unlike diffusers' clamp(percentile, 1, sample_max_value); on wide2 (values past 1) the
 * results stay in [-1, 1]-ish and differ from diffusers' rule. */
START_TEST(paper_thresholding) {
  model *m = load_model("wide2");
  char path[512];
  json_t *mcfg =
      load_json(test_src_path(path, sizeof path, "tests/fixtures/gmm/wide2/scheduler_config.json"));
  /* denoise_to_zero: the result is a thresholded data prediction itself */
  const char *specs[3] = {
      "{\"name\": \"DPM_Solver\", \"steps\": 12, \"options\": {\"skip_type\": \"logSNR\", "
      "\"denoise_to_zero\": true}}",
      "{\"name\": \"DPM_Solver\", \"steps\": 12, \"options\": {\"skip_type\": \"logSNR\", "
      "\"thresholding\": true, \"denoise_to_zero\": true}}",
      "{\"name\": \"DPM_Solver\", \"steps\": 12, \"options\": {\"skip_type\": \"logSNR\", "
      "\"thresholding\": true, \"thresholding_max_val\": 1.2, \"dynamic_thresholding_ratio\": "
      "0.9, \"denoise_to_zero\": true}}"};
  float out[3][2 * 192];
  double mx[3];
  for (int k = 0; k < 3; k++) {
    json_error_t je;
    json_t *spec = json_loads(specs[k], 0, &je);
    sampler *s = NULL;
    err e = {0};
    ck_assert_msg(sampler_new_from_json(spec, mcfg, &s, &e) == 0, "%s", e.msg);
    sampler_run_opts o = {.batch = 2, .seed = 2, .threads = 1};
    ck_assert_int_eq(sampler_run(s, m, &o, out[k], NULL, &e), 0);
    mx[k] = 0;
    for (int i = 0; i < 2 * 192; i++)
      mx[k] = fmax(mx[k], fabs(out[k][i]));
    sampler_free(s);
    json_decref(spec);
  }
  fprintf(stderr, "  thresholding: max |x| %.3f plain, %.3f paper (1.0), %.3f paper (1.2)\n", mx[0],
          mx[1], mx[2]);
  ck_assert(mx[0] > 1.3);
  ck_assert(mx[1] <= 1.0f + 1e-4);
  ck_assert(mx[2] <= 1.0f + 1e-4); /* values are divided by s after clamping to [-s, s] */
  ck_assert(memcmp(out[1], out[2], sizeof out[1]) != 0);
  json_decref(mcfg);
  model_free(m);
}
END_TEST

/* Issue 13.1: a run that goes non-finite stops with ERR_NUMERIC naming what and the step, never
 * returns NaN "images": the model's output (a UNet whose mid block is made NaN through the
 * h-space hook at the first evaluation of a run started at step 3), the solver state (a
 * stochastic step fed NaN noise), the starting noise (inf, or 3e38 scaled by Euler's sigma). */
static int nan_at_stream4(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                          err *e) {
  (void)user;
  (void)e;
  rng_normal(1, image, stream, out, n);
  if (stream == 4)
    out[n / 2] = NAN;
  return ERR_OK;
}

static void expect_numeric(const sampler *s, const model *m, const sampler_run_opts *o,
                           const char *needle) {
  const model_info *mi = model_get_info(m);
  size_t n = (size_t)o->batch * mi->in_channels * mi->sample_size * mi->sample_size;
  float *out = malloc(n * sizeof *out);
  err e = {0};
  ck_assert_int_eq(sampler_run(s, m, o, out, NULL, &e), ERR_NUMERIC);
  ck_assert_msg(strstr(e.msg, needle), "'%s' should say '%s'", e.msg, needle);
  free(out);
}

START_TEST(non_finite_runs_stop_naming_the_step) {
  char path[512];
  err e = {0};
  model *u = NULL;
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/unet/classcond_small"),
                           &u, &e) == 0,
                "%s", e.msg);
  const model_info *ui = model_get_info(u);
  const int hw = ui->sample_size;
  int shape[3];
  ck_assert_int_eq(model_mid_shape(u, hw, hw, shape, &e), 0);
  const size_t dx = (size_t)ui->in_channels * hw * hw, dh = (size_t)shape[0] * shape[1] * shape[2];
  float *x = malloc(dx * sizeof *x), *h = malloc(dh * sizeof *h);
  rng_normal(2, 0, 0, x, dx);
  for (size_t k = 0; k < dh; k++)
    h[k] = k == dh / 3 ? NAN : 0.5f;
  sched_config cfg;
  sampler *s = make_sampler(u, "ddim", NULL, 10, &cfg);
  const int64_t lab = 1;
  sampler_run_opts o = {
      .batch = 1, .labels = &lab, .threads = 1, .start_step = 2, .init_noise = x, .first_mid = h};
  expect_numeric(s, u, &o, "non-finite values in the model output at step 3 of 10 (t=");
  /* guided: the same, the guidance names itself only when its own combination overflows */
  guidance g = guidance_for(u, 3.0);
  o.guidance = &g;
  float *h2 = malloc(2 * dh * sizeof *h2);
  for (size_t k = 0; k < 2 * dh; k++)
    h2[k] = k == dh + 1 ? NAN : 0.5f;
  o.first_mid = h2;
  expect_numeric(s, u, &o, "model output at step 3 of 10");
  free(h2);
  sampler_free(s);
  sched_config_free(&cfg);
  /* the starting state: inf in x_T */
  s = make_sampler(u, "ddim", NULL, 10, &cfg);
  x[5] = INFINITY;
  sampler_run_opts o2 = {.batch = 1, .labels = &lab, .threads = 1, .init_noise = x};
  expect_numeric(s, u, &o2, "non-finite values in the starting noise at step 1 of 10");
  sampler_free(s);
  sched_config_free(&cfg);
  /* 3e38 is finite, but Euler scales x_T by its first sigma: inf */
  for (size_t k = 0; k < dx; k++)
    x[k] = 3e38f;
  s = make_sampler(u, "euler", NULL, 10, &cfg);
  expect_numeric(s, u, &o2, "starting noise at step 1 of 10");
  sampler_free(s);
  sched_config_free(&cfg);
  model_free(u);
  /* the solver state: DDPM adds NaN noise in its 4th step, the 5th evaluation sees it */
  model *m = load_model("cond4");
  s = make_sampler(m, "ddpm", NULL, 10, &cfg);
  sampler_run_opts o3 = {.batch = 1, .labels = &lab, .threads = 1, .noise = nan_at_stream4};
  expect_numeric(s, m, &o3, "non-finite values in the sampler state at step 5 of 10 (t=");
  sampler_free(s);
  sched_config_free(&cfg);
  /* a finite run still runs */
  s = make_sampler(m, "ddpm", NULL, 10, &cfg);
  o3.noise = NULL;
  float out[192];
  ck_assert_msg(sampler_run(s, m, &o3, out, NULL, &e) == 0, "%s", e.msg);
  sampler_free(s);
  sched_config_free(&cfg);
  model_free(m);
  free(x);
  free(h);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("sampler");
  TCase *tc = tcase_create("sampler");
  tcase_set_timeout(tc, 900);
  tcase_add_test(tc, matches_diffusers_loops);
  tcase_add_test(tc, solvers_match_diffusers);
  tcase_add_test(tc, solvers_match_diffusers_extra);
  tcase_add_test(tc, ddpm_samples_have_the_data_distribution);
  tcase_add_test(tc, seed_reproducibility);
  tcase_add_test(tc, progress_and_cancel);
  tcase_add_test(tc, errors);
  tcase_add_test(tc, json_spec_errors);
  tcase_add_test(tc, config_round_trip);
  tcase_add_test(tc, convergence_orders_time_grid);
  tcase_add_test(tc, convergence_orders_sigma_grid);
  tcase_add_test(tc, adaptive_solver);
  tcase_add_test(tc, stochastic_match_closed_form);
  tcase_add_test(tc, stochastic_seed_reproducibility);
  tcase_add_test(tc, nfe_and_progress);
  tcase_add_test(tc, paper_thresholding);
  tcase_add_test(tc, non_finite_runs_stop_naming_the_step);
  suite_add_tcase(s, tc);
  return s;
}
