/* GaussianMixtureDenoiser: eps against closed forms (a single Gaussian, a class that owns one
 * component), against the numpy reference at integer and fractional timesteps
 * (tools/gen_sampler_fixtures.py), and the errors malformed model files must give. */
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "gmm.h"
#include "npy.h"
#include "rng.h"
#include "safetensors.h"
#include "schedule.h"
#include "testutil.h"

#define D 192 /* 3 x 8 x 8, every fixture model */

/* alphas_cumprod of a model directory's scheduler_config.json. */
static double *model_abar(const char *dir, int *n) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "%s/scheduler_config.json", dir);
  sched_config c;
  err e = {0};
  ck_assert_msg(sched_config_load_file(test_src_path(path, sizeof path, rel), NULL, 0, &c, &e) == 0,
                "%s", e.msg);
  double *a = malloc(sizeof(double) * c.num_train_timesteps);
  ck_assert_int_eq(sched_alphas_cumprod_f64(&c, a, &e), 0);
  *n = c.num_train_timesteps;
  sched_config_free(&c);
  return a;
}

static gmm *load_fixture(const char *name) {
  char dir[128], rel[256], path[512];
  snprintf(dir, sizeof dir, "tests/fixtures/gmm/%s", name);
  snprintf(rel, sizeof rel, "%s/config.json", dir);
  json_t *cfg = json_load_file(test_src_path(path, sizeof path, rel), 0, NULL);
  ck_assert_ptr_nonnull(cfg);
  int n;
  double *abar = model_abar(dir, &n);
  snprintf(rel, sizeof rel, "%s/diffusion_pytorch_model.safetensors", dir);
  gmm *g = NULL;
  err e = {0};
  ck_assert_msg(gmm_load(cfg, test_src_path(path, sizeof path, rel), abar, n, &g, &e) == 0, "%s",
                e.msg);
  free(abar);
  json_decref(cfg);
  return g;
}

static void read_fixture_tensor(const char *model, const char *name, int64_t count, float *dst) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s/diffusion_pytorch_model.safetensors", model);
  st_file *f;
  err e = {0};
  ck_assert_int_eq(st_open(test_src_path(path, sizeof path, rel), &f, &e), 0);
  const st_tensor_info *ti = st_find(f, name);
  ck_assert_ptr_nonnull(ti);
  ck_assert_int_eq(ti->count, count);
  ck_assert_int_eq(st_read_f32(f, name, 0, NULL, dst, &e), 0);
  st_close(f);
}

/* For one Gaussian N(mu, s^2 I): E[x0|x] = mu + (a s^2 / v)(x - a mu) with v = a^2 s^2 + o^2,
 * so eps = (x - a E[x0|x]) / o simplifies to o (x - a mu) / v. */
static void single_gaussian_eps(const float *x, const float *mu, double s, double abar,
                                double *eps) {
  const double a = sqrt(abar), o = sqrt(1 - abar), v = a * a * s * s + o * o;
  for (int i = 0; i < D; i++)
    eps[i] = o * (x[i] - a * mu[i]) / v;
}

static double rel_err(const float *got, const double *want, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; i++) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return sqrt(num / den);
}

START_TEST(single_gaussian_closed_form) {
  gmm *g = load_fixture("gauss1");
  ck_assert_int_eq(gmm_sample_size(g), 8);
  ck_assert_int_eq(gmm_channels(g), 3);
  ck_assert_int_eq(gmm_num_classes(g), 0);
  ck_assert_int_eq(gmm_num_values(g), D + 2);
  float mu[D], x[4 * D], out[4 * D];
  read_fixture_tensor("gauss1", "means", D, mu);
  int n;
  double *abar = model_abar("tests/fixtures/gmm/gauss1", &n);
  const float ts[4] = {0, 10, 500, 999};
  rng_normal(1, 0, 0, x, 4 * D);
  for (int b = 0; b < 4; b++)
    for (int i = 0; i < D; i++)
      x[b * D + i] = (float)(sqrt(abar[(int)ts[b]]) * mu[i]) +
                     (float)sqrt(1 - abar[(int)ts[b]]) * x[b * D + i];
  err e = {0};
  ck_assert_int_eq(gmm_eval(g, x, 4, ts, NULL, out, &e), 0);
  for (int b = 0; b < 4; b++) {
    double want[D];
    single_gaussian_eps(x + b * D, mu, 0.5, abar[(int)ts[b]], want);
    double r = rel_err(out + b * D, want, D);
    ck_assert_msg(r < 1e-6, "t=%g: rel error %g", ts[b], r);
  }
  /* out-of-range timesteps clamp to the ends of the schedule */
  const float tc[2] = {-3.0f, 5000.0f}, te[2] = {0.0f, 999.0f};
  float oc[2 * D], oe[2 * D];
  ck_assert_int_eq(gmm_eval(g, x, 2, tc, NULL, oc, &e), 0);
  ck_assert_int_eq(gmm_eval(g, x, 2, te, NULL, oe, &e), 0);
  ck_assert_int_eq(memcmp(oc, oe, sizeof oc), 0);
  const float tn[1] = {NAN};
  ck_assert_int_ne(gmm_eval(g, x, 1, tn, NULL, oc, &e), 0);
  free(abar);
  gmm_free(g);
}
END_TEST

/* In cond4 classes 0 and 2 own one component each, so with those labels the mixture is a
 * single Gaussian again; class 1 has two; -1 or no labels mean the whole mixture. */
START_TEST(class_labels_select_components) {
  gmm *g = load_fixture("cond4");
  ck_assert_int_eq(gmm_num_classes(g), 3);
  float means[4 * D], stds[4], x[D], out[D], all[D], unc[D];
  read_fixture_tensor("cond4", "means", 4 * D, means);
  read_fixture_tensor("cond4", "stds", 4, stds);
  int n;
  double *abar = model_abar("tests/fixtures/gmm/cond4", &n);
  rng_normal(2, 0, 0, x, D);
  const float t[1] = {300};
  err e = {0};
  const int64_t cls[2] = {0, 2}, comp[2] = {0, 3};
  for (int k = 0; k < 2; k++) {
    ck_assert_int_eq(gmm_eval(g, x, 1, t, &cls[k], out, &e), 0);
    double want[D];
    single_gaussian_eps(x, means + comp[k] * D, stds[comp[k]], abar[300], want);
    double r = rel_err(out, want, D);
    ck_assert_msg(r < 1e-6, "class %lld: rel error %g", (long long)cls[k], r);
  }
  const int64_t minus1 = -1, one = 1, three = 3;
  ck_assert_int_eq(gmm_eval(g, x, 1, t, NULL, all, &e), 0);
  ck_assert_int_eq(gmm_eval(g, x, 1, t, &minus1, unc, &e), 0);
  ck_assert_int_eq(memcmp(all, unc, sizeof all), 0);
  ck_assert_int_eq(gmm_eval(g, x, 1, t, &one, out, &e), 0);
  ck_assert(memcmp(all, out, sizeof all) != 0);
  ck_assert_int_ne(gmm_eval(g, x, 1, t, &three, out, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "label"));
  free(abar);
  gmm_free(g);
}
END_TEST

/* The numpy reference: integer timesteps, and fractional ones that diffusers' _sigma_to_t
 * produced from chosen sigmas (so this checks the inverse map), for eps, v and x0 outputs. */
START_TEST(matches_reference_at_fractional_timesteps) {
  char path[512];
  json_t *root = json_load_file(
      test_src_path(path, sizeof path, "tests/fixtures/sampler/cases.json"), 0, NULL);
  ck_assert_ptr_nonnull(root);
  npy_array xs, outs;
  err e = {0};
  ck_assert_int_eq(
      npy_read_f32(test_src_path(path, sizeof path, "tests/fixtures/sampler/gmm_eval_x.npy"), &xs,
                   &e),
      0);
  ck_assert_int_eq(
      npy_read_f32(test_src_path(path, sizeof path, "tests/fixtures/sampler/gmm_eval_out.npy"),
                   &outs, &e),
      0);
  json_t *cases = json_object_get(root, "gmm_eval");
  ck_assert_int_eq(xs.count, (int64_t)json_array_size(cases) * D);
  size_t i;
  json_t *c;
  double worst = 0;
  json_array_foreach(cases, i, c) {
    gmm *g = load_fixture(json_string_value(json_object_get(c, "model")));
    const float t = (float)json_number_value(json_object_get(c, "t"));
    json_t *lj = json_object_get(c, "label");
    int64_t label = lj ? json_integer_value(lj) : 0;
    float out[D];
    ck_assert_int_eq(gmm_eval(g, xs.data + i * D, 1, &t, lj ? &label : NULL, out, &e), 0);
    double r = test_rel_l2(out, outs.data + i * D, D);
    worst = fmax(worst, r);
    ck_assert_msg(r < 1e-5, "case %zu (%s, t=%g): rel L2 %g", i,
                  json_string_value(json_object_get(c, "model")), t, r);
    gmm_free(g);
  }
  fprintf(stderr, "gmm vs numpy reference: worst rel L2 %.3g over %zu cases\n", worst,
          json_array_size(cases));
  npy_array_free(&xs);
  npy_array_free(&outs);
  json_decref(root);
}
END_TEST

/* ---- malformed models ---- */

typedef struct tensor_spec {
  const char *name, *dtype;
  int ndim;
  int64_t shape[4];
  const void *data;
} tensor_spec;

static size_t dtype_size(const char *dt) {
  return strcmp(dt, "I64") == 0 ? 8 : 4;
}

static void write_safetensors(const char *path, const tensor_spec *t, int n) {
  char header[4096] = "{";
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    int64_t count = 1;
    char shape[128] = "";
    for (int k = 0; k < t[i].ndim; k++) {
      count *= t[i].shape[k];
      size_t len = strlen(shape);
      snprintf(shape + len, sizeof shape - len, "%s%lld", k ? "," : "", (long long)t[i].shape[k]);
    }
    size_t bytes = (size_t)count * dtype_size(t[i].dtype);
    size_t len = strlen(header);
    snprintf(header + len, sizeof header - len,
             "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[%zu,%zu]}", i ? "," : "",
             t[i].name, t[i].dtype, shape, off, off + bytes);
    off += bytes;
  }
  strcat(header, "}");
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  uint64_t hl = strlen(header);
  for (int i = 0; i < 8; i++)
    fputc((int)((hl >> (8 * i)) & 0xff), f);
  fputs(header, f);
  for (int i = 0; i < n; i++) {
    int64_t count = 1;
    for (int k = 0; k < t[i].ndim; k++)
      count *= t[i].shape[k];
    fwrite(t[i].data, dtype_size(t[i].dtype), (size_t)count, f);
  }
  fclose(f);
}

static float g_means[2 * D], g_logw[2] = {0.0f, 0.5f}, g_stds[2] = {0.3f, 0.4f};
static int64_t g_labels[2] = {0, 1};

/* A valid two-component conditional model, then one change: `field` replaced by `repl`
 * (NULL drops the tensor). */
static int try_load(const char *config, const char *drop, const tensor_spec *repl, err *e) {
  static char dir[64];
  if (!dir[0])
    test_tmpdir(dir, sizeof dir);
  tensor_spec t[4] = {
      {"means", "F32", 4, {2, 3, 8, 8}, g_means},
      {"log_weights", "F32", 1, {2}, g_logw},
      {"stds", "F32", 1, {2}, g_stds},
      {"labels", "I64", 1, {2}, g_labels},
  };
  tensor_spec use[4];
  int n = 0;
  for (int i = 0; i < 4; i++) {
    if (drop && strcmp(t[i].name, drop) == 0)
      continue;
    use[n++] = repl && strcmp(repl->name, t[i].name) == 0 ? *repl : t[i];
  }
  char path[128];
  snprintf(path, sizeof path, "%s/m.safetensors", dir);
  write_safetensors(path, use, n);
  json_t *cfg = json_loads(config, 0, NULL);
  ck_assert_ptr_nonnull(cfg);
  double abar[10];
  for (int i = 0; i < 10; i++)
    abar[i] = 1.0 - 0.09 * (i + 1);
  gmm *g = NULL;
  int rc = gmm_load(cfg, path, abar, 10, &g, e);
  if (rc == 0)
    ck_assert_ptr_nonnull(g);
  else
    ck_assert_ptr_null(g);
  gmm_free(g);
  json_decref(cfg);
  return rc;
}

#define GOOD_CFG                                                                                   \
  "{\"_class_name\":\"GaussianMixtureDenoiser\",\"sample_size\":8,\"in_channels\":3,"              \
  "\"num_class_embeds\":2,\"prediction_type\":\"epsilon\"}"

static void expect_load_error(const char *config, const char *drop, const tensor_spec *repl,
                              const char *needle) {
  err e = {0};
  ck_assert_msg(try_load(config, drop, repl, &e) != 0, "expected an error mentioning %s", needle);
  ck_assert_msg(strstr(e.msg, needle) != NULL, "error '%s' should mention '%s'", e.msg, needle);
}

START_TEST(malformed_models) {
  for (int i = 0; i < 2 * D; i++)
    g_means[i] = (float)(i % 7) * 0.1f;
  err e = {0};
  ck_assert_msg(try_load(GOOD_CFG, NULL, NULL, &e) == 0, "%s", e.msg);

  expect_load_error(GOOD_CFG, "stds", NULL, "stds");
  expect_load_error(GOOD_CFG, "means", NULL, "means");
  expect_load_error(GOOD_CFG, "log_weights", NULL, "log_weights");
  expect_load_error(GOOD_CFG, "labels", NULL, "labels");
  tensor_spec wrong_shape = {"means", "F32", 4, {2, 3, 8, 7}, g_means};
  expect_load_error(GOOD_CFG, NULL, &wrong_shape, "means");
  tensor_spec wrong_k = {"means", "F32", 4, {1, 3, 8, 8}, g_means};
  expect_load_error(GOOD_CFG, NULL, &wrong_k, "means");
  tensor_spec lw2d = {"log_weights", "F32", 2, {1, 2}, g_logw};
  expect_load_error(GOOD_CFG, NULL, &lw2d, "log_weights");
  static float neg[2] = {0.3f, -0.1f}, zero[2] = {0.3f, 0.0f}, nan_w[2] = {0.0f, NAN};
  tensor_spec negstd = {"stds", "F32", 1, {2}, neg};
  expect_load_error(GOOD_CFG, NULL, &negstd, "stds");
  tensor_spec zerostd = {"stds", "F32", 1, {2}, zero};
  expect_load_error(GOOD_CFG, NULL, &zerostd, "stds");
  tensor_spec nanw = {"log_weights", "F32", 1, {2}, nan_w};
  expect_load_error(GOOD_CFG, NULL, &nanw, "log_weights");
  static int64_t badlab[2] = {0, 2};
  tensor_spec labels_oob = {"labels", "I64", 1, {2}, badlab};
  expect_load_error(GOOD_CFG, NULL, &labels_oob, "labels");

  expect_load_error("{\"in_channels\":3,\"num_class_embeds\":2}", NULL, NULL, "sample_size");
  expect_load_error("{\"sample_size\":8,\"in_channels\":0,\"num_class_embeds\":2}", NULL, NULL,
                    "in_channels");
  expect_load_error("{\"sample_size\":\"8\",\"in_channels\":3,\"num_class_embeds\":2}", NULL, NULL,
                    "sample_size");
  expect_load_error("{\"sample_size\":8,\"in_channels\":3,\"num_class_embeds\":2,"
                    "\"prediction_type\":\"flow\"}",
                    NULL, NULL, "prediction_type");
  expect_load_error("{\"sample_size\":8,\"in_channels\":3,\"num_class_embeds\":0}", NULL, NULL,
                    "num_class_embeds");
  expect_load_error("{\"sample_size\":8,\"in_channels\":3}", NULL, NULL, "labels");
  expect_load_error("{\"_class_name\":\"UNet2DModel\",\"sample_size\":8,\"in_channels\":3,"
                    "\"num_class_embeds\":2}",
                    NULL, NULL, "_class_name");
  expect_load_error("{\"sample_size\":8,\"in_channels\":4,\"num_class_embeds\":2}", NULL, NULL,
                    "means");

  /* unconditional: the same file without labels loads */
  ck_assert_msg(try_load("{\"sample_size\":8,\"in_channels\":3}", "labels", NULL, &e) == 0, "%s",
                e.msg);

  /* a schedule with alpha_bar = 1 has no noise to predict */
  json_t *cfg = json_loads(GOOD_CFG, 0, NULL);
  double abar[2] = {1.0, 0.5};
  gmm *g = NULL;
  ck_assert_int_ne(gmm_load(cfg, "/nonexistent", abar, 2, &g, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "alphas_cumprod"));
  json_decref(cfg);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("gmm");
  TCase *tc = tcase_create("gmm");
  tcase_add_test(tc, single_gaussian_closed_form);
  tcase_add_test(tc, class_labels_select_components);
  tcase_add_test(tc, matches_reference_at_fractional_timesteps);
  tcase_add_test(tc, malformed_models);
  suite_add_tcase(s, tc);
  return s;
}
