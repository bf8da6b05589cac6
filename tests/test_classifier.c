/* engine/model/classifier: the exported glyph classifier and a differently shaped one against
 * PyTorch autograd (tools/gen_classifier_fixtures.py, float64): logits, features, the input
 * gradient of sum(G * logits) and classifier guidance's log p(target | x) and its gradient,
 * each below 1e-4 relative L2; the same bits on 1 and 2 threads; the refusals of bad folders
 * and bad calls. */
#include <math.h>
#include <sys/stat.h>

#include "classifier.h"
#include "guidance.h"
#include "npy.h"
#include "sampler.h"
#include "testutil.h"

static float *fx(const char *dir, const char *name, size_t want) {
  char path[1200];
  snprintf(path, sizeof path, "%s/%s.npy", dir, name);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(path, &a, &e) == ERR_OK, "%s", e.msg);
  ck_assert_msg(want == 0 || (size_t)a.count == want, "%s: %lld values, %zu expected", path,
                (long long)a.count, want);
  return a.data;
}

static void check_case(const char *model_rel, const char *case_rel) {
  char mdir[1024], cdir[1024];
  test_src_path(mdir, sizeof mdir, model_rel);
  test_src_path(cdir, sizeof cdir, case_rel);
  classifier *c;
  err e = {0};
  ck_assert_msg(classifier_load(mdir, &c, &e) == ERR_OK, "%s", e.msg);
  const classifier_info *in = classifier_get_info(c);
  const int S = in->sample_size;
  const size_t per = (size_t)in->in_channels * S * S;
  char path[1200];
  snprintf(path, sizeof path, "%s/x.npy", cdir);
  npy_array x;
  ck_assert_msg(npy_read_f32(path, &x, &e) == ERR_OK, "%s", e.msg);
  const int n = (int)(x.count / (int64_t)per);
  const size_t nl = (size_t)n * in->n_logits;
  float *ref_logits = fx(cdir, "logits", nl), *ref_feat = fx(cdir, "features", 0);
  float *g = fx(cdir, "grad_logits", nl), *ref_gx = fx(cdir, "grad_x", x.count);
  float *ref_logp = fx(cdir, "logp", (size_t)n), *ref_glp = fx(cdir, "grad_logp", x.count);
  int64_t *target, cnt, shape[NPY_MAX_DIMS];
  int nd;
  snprintf(path, sizeof path, "%s/target.npy", cdir);
  ck_assert_msg(npy_read_i64(path, &target, &cnt, &nd, shape, &e) == ERR_OK, "%s", e.msg);
  float *logits = malloc(nl * sizeof(float)), *feat = malloc((size_t)n * in->features * 4);
  float *gx = malloc(x.count * sizeof(float)), *gx2 = malloc(x.count * sizeof(float));
  float *logp = malloc((size_t)n * sizeof(float));
  ck_assert_msg(classifier_run(c, x.data, n, S, S, logits, feat, 2, &e) == ERR_OK, "%s", e.msg);
  double r[5];
  r[0] = test_rel_l2(logits, ref_logits, nl);
  r[1] = test_rel_l2(feat, ref_feat, (size_t)n * in->features);
  ck_assert_msg(classifier_input_grad(c, x.data, n, S, S, g, NULL, gx, 2, &e) == ERR_OK, "%s",
                e.msg);
  r[2] = test_rel_l2(gx, ref_gx, (size_t)x.count);
  ck_assert_msg(classifier_input_grad(c, x.data, n, S, S, g, NULL, gx2, 1, &e) == ERR_OK, "%s",
                e.msg);
  ck_assert_msg(memcmp(gx, gx2, (size_t)x.count * sizeof(float)) == 0,
                "input gradient differs between 1 and 2 threads");
  ck_assert_msg(classifier_log_prob_grad(c, x.data, n, S, S, 0, target, logp, gx, 1, &e) == ERR_OK,
                "%s", e.msg);
  r[3] = test_rel_l2(logp, ref_logp, (size_t)n);
  r[4] = test_rel_l2(gx, ref_glp, (size_t)x.count);
  static const char *what[5] = {"logits", "features", "grad_x", "logp", "grad_logp"};
  printf("%-28s", case_rel);
  for (int i = 0; i < 5; i++) {
    printf(" %s %.2e", what[i], r[i]);
    ck_assert_msg(r[i] < 1e-4, "%s: %s rel L2 %.3g against PyTorch", case_rel, what[i], r[i]);
  }
  printf("\n");
  free(x.data), free(ref_logits), free(ref_feat), free(g), free(ref_gx), free(ref_logp);
  free(ref_glp), free(target), free(logits), free(feat), free(gx), free(gx2), free(logp);
  classifier_free(c);
}

START_TEST(glyph_classifier_matches_pytorch) {
  check_case("models/glyph-classifier", "tests/fixtures/classifier/glyph");
}
END_TEST

START_TEST(other_shape_matches_pytorch) {
  check_case("tests/fixtures/classifier/tiny", "tests/fixtures/classifier/tiny");
}
END_TEST

START_TEST(heads_and_labels) {
  char dir[1024];
  classifier *c;
  err e = {0};
  ck_assert_msg(
      classifier_load(test_src_path(dir, sizeof dir, "models/glyph-classifier"), &c, &e) == ERR_OK,
      "%s", e.msg);
  const classifier_info *in = classifier_get_info(c);
  ck_assert_str_eq(in->class_name, "GlyphClassifier");
  ck_assert_int_eq(in->n_heads, 6);
  ck_assert_int_eq(in->n_logits, 36 + 2 + 2 + 3 + 10 + 10);
  ck_assert_int_eq(in->features, 128);
  ck_assert_int_eq(classifier_head_index(c, "Italic"), 2);
  ck_assert_int_eq(classifier_head_index(c, "nope"), -1);
  ck_assert_int_eq(classifier_class_index(c, 0, "a"), 10);
  ck_assert_int_eq(classifier_class_index(c, 0, "35"), 35);
  ck_assert_int_eq(classifier_class_index(c, 0, "36"), -1);
  ck_assert_int_eq(classifier_class_index(c, 3, "mono"), 2);
  ck_assert_int_eq(in->heads[3].offset, 40);
  /* bad calls */
  float x[3 * 32 * 32] = {0}, out[63], gx[3 * 32 * 32];
  ck_assert_int_eq(classifier_run(c, x, 1, 16, 16, out, NULL, 1, &e), ERR_SHAPE);
  ck_assert_msg(strstr(e.msg, "32x32"), "%s", e.msg);
  x[5] = NAN;
  ck_assert_int_eq(classifier_run(c, x, 1, 32, 32, out, NULL, 1, &e), ERR_NUMERIC);
  x[5] = 0;
  const int64_t bad = 36;
  ck_assert_int_eq(classifier_log_prob_grad(c, x, 1, 32, 32, 0, &bad, NULL, gx, 1, &e),
                   ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "'char'"), "%s", e.msg);
  classifier_free(c);
}
END_TEST

/* A copy of the tiny folder with config.json replaced by `cfg`. */
static int load_with(const char *tmp, const char *cfg, err *e) {
  char src[1024], cmd[3000], path[1100];
  test_src_path(src, sizeof src, "tests/fixtures/classifier/tiny");
  snprintf(cmd, sizeof cmd, "cp %s/model.safetensors %s/", src, tmp);
  ck_assert_int_eq(system(cmd), 0);
  snprintf(path, sizeof path, "%s/config.json", tmp);
  FILE *f = fopen(path, "w");
  fputs(cfg, f);
  fclose(f);
  classifier *c = NULL;
  int rc = classifier_load(tmp, &c, e);
  classifier_free(c);
  return rc;
}

START_TEST(bad_folders_are_refused) {
  char tmp[64];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  err e = {0};
  classifier *c = NULL;
  ck_assert_int_eq(classifier_load("/nonexistent/clf", &c, &e), ERR_IO);
  const char *head = "{\"_class_name\": \"GlyphClassifier\", \"in_channels\": 1, "
                     "\"sample_size\": 16, \"heads\": [{\"name\": \"shape\", \"classes\": 5}],";
  struct {
    const char *cfg, *needle;
    int code;
  } cases[] = {
      {"{\"_class_name\": \"UNet2DModel\"}", "not GlyphClassifier", ERR_UNSUPPORTED},
      {"[1]", "JSON object", ERR_FORMAT},
      {"{\"_class_name\": \"GlyphClassifier\", \"in_channels\": 0}", "in_channels", ERR_FORMAT},
      {"%s \"layers\": [{\"type\": \"dropout\"}]}", "'type'", ERR_UNSUPPORTED},
      {"%s \"layers\": [{\"type\": \"conv_bn_relu\", \"prefix\": \"body.0\", \"out_channels\": "
       "5}]}",
       "body.0.0.weight", ERR_SHAPE},
      {"%s \"layers\": [{\"type\": \"conv_bn_relu\", \"prefix\": \"nope\", \"out_channels\": 4}]}",
       "nope.0.weight", ERR_FORMAT},
      {"%s \"layers\": [{\"type\": \"conv_bn_relu\", \"prefix\": \"body.0\", \"out_channels\": "
       "4}]}",
       "global_avg_pool", ERR_UNSUPPORTED},
      {"%s \"layers\": [{\"type\": \"global_avg_pool\"}, {\"type\": \"max_pool\"}]}", "after",
       ERR_UNSUPPORTED},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char cfg[1024];
    snprintf(cfg, sizeof cfg, cases[i].cfg, head);
    int rc = load_with(tmp, cfg, &e);
    ck_assert_msg(rc != ERR_OK && strstr(e.msg, cases[i].needle),
                  "case %zu: rc %d, message '%s' lacks '%s'", i, rc, e.msg, cases[i].needle);
    if (cases[i].code != ERR_SHAPE) /* a tensor's wrong shape: the safetensors reader's code */
      ck_assert_msg(rc == cases[i].code, "case %zu: rc %d, expected %d", i, rc, cases[i].code);
  }
  /* the real config loads from the copy */
  char src[1024], cmd[3000];
  test_src_path(src, sizeof src, "tests/fixtures/classifier/tiny");
  snprintf(cmd, sizeof cmd, "cp %s/config.json %s/ && rm -r %s", src, tmp, tmp);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* `denoised classify` writes the engine's logits and input gradient, and refuses bad inputs. */
START_TEST(cli_classify) {
  char tmp[64], mdir[1024], cdir[1024], out[4096], path[1200];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  test_src_path(mdir, sizeof mdir, "tests/fixtures/classifier/tiny");
  test_src_path(cdir, sizeof cdir, "tests/fixtures/classifier/tiny");
  int rc = test_run_cli(out, sizeof out,
                        "classify --classifier %s --images %s/x.npy --logits %s/l.npy "
                        "--grad-logits %s/grad_logits.npy --grad-input %s/gx.npy --threads 1",
                        mdir, cdir, tmp, cdir, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  ck_assert_msg(strstr(out, "image 2: shape=shape"), "%s", out);
  float *l = NULL, *ref = fx(cdir, "logits", 0), *gx, *rgx = fx(cdir, "grad_x", 0);
  snprintf(path, sizeof path, "%s", tmp);
  l = fx(path, "l", 3 * 10);
  gx = fx(path, "gx", 3 * 16 * 16);
  ck_assert_double_lt(test_rel_l2(l, ref, 30), 1e-4);
  ck_assert_double_lt(test_rel_l2(gx, rgx, 3 * 256), 1e-4);
  free(l), free(ref), free(gx), free(rgx);
  rc = test_run_cli(out, sizeof out,
                    "classify --classifier %s --images %s/x.npy --grad-logits %s/x.npy "
                    "--grad-input %s/gx.npy",
                    mdir, cdir, cdir, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "shape must be [3, 10]"), "%s", out);
  rc = test_run_cli(out, sizeof out, "classify --classifier %s --images %s/grad_x.npy", mdir, cdir);
  ck_assert_msg(rc == 0, "%s", out);
  rc = test_run_cli(out, sizeof out, "classify --classifier %s --images %s/logits.npy", mdir, cdir);
  ck_assert_msg(rc == 1 && strstr(out, "--images"), "%s", out);
  snprintf(path, sizeof path, "rm -r %s", tmp);
  ck_assert_int_eq(system(path), 0);
}
END_TEST

/* Share of the images in x (n of the glyph model) the classifier reads as class t of head h. */
static int verdicts(const classifier *c, const float *x, int n, int h, int t) {
  const classifier_info *in = classifier_get_info(c);
  float *z = malloc((size_t)n * in->n_logits * sizeof *z);
  err e = {0};
  ck_assert_msg(classifier_run(c, x, n, 32, 32, z, NULL, 1, &e) == ERR_OK, "%s", e.msg);
  int hits = 0;
  for (int i = 0; i < n; i++) {
    const float *zi = z + (size_t)i * in->n_logits + in->heads[h].offset;
    int best = 0;
    for (int k = 1; k < in->heads[h].classes; k++)
      best = zi[k] > zi[best] ? k : best;
    hits += best == t;
  }
  free(z);
  return hits;
}

/* Classifier guidance toward italic on the default model's guided A: more italic verdicts than
 * the same seeds without it, the character kept; and its refusals. */
START_TEST(classifier_guidance_steers) {
  char mdir[1024], cdir[1024];
  err e = {0};
  model *m;
  classifier *c;
  ck_assert_int_eq(model_load(test_src_path(mdir, sizeof mdir, "models/glyphs32"), &m, &e), 0);
  ck_assert_int_eq(
      classifier_load(test_src_path(cdir, sizeof cdir, "models/glyph-classifier"), &c, &e), 0);
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm++2m", "steps", 12);
  sampler *s;
  ck_assert_msg(sampler_new_from_json(spec, model_scheduler_config(m), &s, &e) == 0, "%s", e.msg);
  enum { N = 8 };
  int64_t labels[N], target[N];
  const int italic = classifier_head_index(c, "italic"),
            yes = classifier_class_index(c, italic, "italic");
  for (int i = 0; i < N; i++)
    labels[i] = model_class_from_name(m, "A"), target[i] = yes;
  guidance g = guidance_for(m, 2.0);
  classifier_guidance cg = {.clf = c, .head = italic, .scale = 3.0, .target = target};
  float *plain = malloc(N * 3 * 32 * 32 * sizeof(float)), *steered = malloc(N * 3 * 32 * 32 * 4);
  sampler_run_opts o = {.batch = N, .seed = 4, .labels = labels, .guidance = &g, .threads = 2};
  ck_assert_msg(sampler_run(s, m, &o, plain, NULL, &e) == 0, "%s", e.msg);
  o.classifier = &cg;
  ck_assert_msg(sampler_run(s, m, &o, steered, NULL, &e) == 0, "%s", e.msg);
  const int before = verdicts(c, plain, N, italic, yes),
            after = verdicts(c, steered, N, italic, yes);
  const int chars = verdicts(c, steered, N, 0, (int)labels[0]);
  printf("classifier guidance italic (scale 3): %d/%d italic before, %d/%d after, %d/%d still A\n",
         before, N, after, N, chars, N);
  ck_assert_int_gt(after, before);
  ck_assert_int_ge(after, N - 1);
  ck_assert_int_ge(chars, N - 1);
  /* refusals: a target out of range, a classifier of another size, a v-prediction run */
  target[3] = 2;
  ck_assert_int_eq(sampler_run(s, m, &o, steered, NULL, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "classifier.target"), "%s", e.msg);
  target[3] = yes;
  classifier *tiny;
  ck_assert_int_eq(
      classifier_load(test_src_path(cdir, sizeof cdir, "tests/fixtures/classifier/tiny"), &tiny,
                      &e),
      0);
  cg.clf = tiny;
  cg.head = 0;
  ck_assert_int_eq(sampler_run(s, m, &o, steered, NULL, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "16x16"), "%s", e.msg);
  cg.clf = c;
  cg.head = italic;
  classifier_free(tiny);
  json_t *vspec = json_pack("{s:s, s:i, s:{s:s}}", "name", "ddim", "steps", 2, "options",
                            "prediction_type", "v_prediction");
  sampler *vs;
  ck_assert_msg(sampler_new_from_json(vspec, NULL, &vs, &e) == 0, "%s", e.msg);
  ck_assert_int_ne(sampler_run(vs, m, &o, steered, NULL, &e), ERR_OK);
  sampler_free(vs);
  json_decref(vspec);
  free(plain), free(steered);
  sampler_free(s);
  json_decref(spec);
  classifier_free(c);
  model_free(m);
}
END_TEST

/* `denoised sample --classifier`: flags checked, the run recorded in the PNG, --replay refused. */
START_TEST(cli_sample_classifier) {
  char tmp[64], cdir[1024], out[4096];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  test_src_path(cdir, sizeof cdir, "models/glyph-classifier");
  int rc = test_run_cli(out, sizeof out,
                        "sample --class B --steps 4 --seed 1 --classifier %s --classifier-target "
                        "bg=white --classifier-scale 2 -o %s/b.png --quiet",
                        cdir, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  rc = test_run_cli(out, sizeof out, "sample --replay %s/b.png -o %s/c.png", tmp, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "classifier guidance"), "%s", out);
  rc = test_run_cli(out, sizeof out, "sample --class B --steps 2 --classifier %s -o %s/x.png", cdir,
                    tmp);
  ck_assert_msg(rc == 2 && strstr(out, "go together"), "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "sample --class B --steps 2 --classifier %s --classifier-target slant=1 -o "
                    "%s/x.png",
                    cdir, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "'slant' is not a head"), "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "sample --class B --steps 2 --classifier %s --classifier-target char=? -o "
                    "%s/x.png",
                    cdir, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "not a class of head 'char'"), "%s", out);
  char cmd[200];
  snprintf(cmd, sizeof cmd, "rm -r %s", tmp);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("classifier");
  TCase *tc = tcase_create("classifier");
  tcase_add_test(tc, glyph_classifier_matches_pytorch);
  tcase_add_test(tc, other_shape_matches_pytorch);
  tcase_add_test(tc, heads_and_labels);
  tcase_add_test(tc, bad_folders_are_refused);
  tcase_add_test(tc, cli_classify);
  tcase_add_test(tc, classifier_guidance_steers);
  tcase_add_test(tc, cli_sample_classifier);
  suite_add_tcase(s, tc);
  return s;
}
