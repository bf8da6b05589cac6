/* engine/train/dstudio: DomainStudio's loss terms against the authors' training_fewshot_losses
 * run by tools/gen_domainstudio_fixtures.py (values and autograd gradient), the Haar map against
 * their get_wave convolutions, every term's gradient by central finite differences, the choice
 * of the three items, the refusals, and a DomainStudio training step of the trainer (the
 * pairwise terms vanish while the adapted model still equals its source). */
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>

#include "dstudio.h"
#include "image.h"
#include "model.h"
#include "npy.h"
#include "schedule.h"
#include "testutil.h"
#include "train.h"

static npy_array read_fx(const char *name) {
  char rel[256], path[1024];
  snprintf(rel, sizeof rel, "tests/fixtures/dstudio/%s.npy", name);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &a, &e) == 0, "%s", e.msg);
  return a;
}

typedef struct fixture {
  npy_array x_t, noise, ada, sou, cx, co, grad, hf;
  double cxd[8], cod[8], terms[5], terms32[5];
  dstudio_batch b;
} fixture;

static void fixture_load(fixture *f) {
  f->x_t = read_fx("x_t"), f->noise = read_fx("noise"), f->ada = read_fx("out_ada");
  f->sou = read_fx("out_sou"), f->cx = read_fx("cx"), f->co = read_fx("co");
  f->grad = read_fx("grad"), f->hf = read_fx("hf");
  char path[1024];
  json_error_t je;
  json_t *meta =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/dstudio/meta.json"), 0, &je);
  ck_assert_ptr_nonnull(meta);
  const json_t *idx = json_object_get(meta, "idx"), *terms = json_object_get(meta, "terms");
  const json_t *t32 = json_object_get(meta, "terms_float32");
  ck_assert_int_eq(json_array_size(idx), 3);
  ck_assert_int_eq(json_array_size(terms), 5);
  ck_assert_int_eq(json_array_size(t32), 5);
  const int n = (int)f->x_t.shape[0];
  ck_assert_int_le(n, 8);
  for (int i = 0; i < n; i++)
    f->cxd[i] = f->cx.data[i], f->cod[i] = f->co.data[i];
  for (int k = 0; k < 5; k++)
    f->terms[k] = json_real_value(json_array_get(terms, (size_t)k)),
    f->terms32[k] = json_real_value(json_array_get(t32, (size_t)k));
  f->b = (dstudio_batch){.n = n,
                         .c = (int)f->x_t.shape[1],
                         .h = (int)f->x_t.shape[2],
                         .w = (int)f->x_t.shape[3],
                         .x_t = f->x_t.data,
                         .target = f->noise.data,
                         .out_sou = f->sou.data,
                         .cx = f->cxd,
                         .co = f->cod};
  for (int k = 0; k < 3; k++)
    f->b.idx[k] = (int)json_integer_value(json_array_get(idx, (size_t)k));
  json_decref(meta);
}

static void fixture_free(fixture *f) {
  npy_array *all[] = {&f->x_t, &f->noise, &f->ada, &f->sou, &f->cx, &f->co, &f->grad, &f->hf};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    npy_array_free(all[i]);
}

static const dstudio_weights recipe = {DSTUDIO_RECIPE_PAIR, DSTUDIO_RECIPE_HF_PAIR,
                                       DSTUDIO_RECIPE_HF_MSE};

START_TEST(terms_match_authors_code) {
  fixture f;
  fixture_load(&f);
  dstudio_terms t;
  err e = {0};
  float *g = malloc((size_t)f.ada.count * sizeof *g);
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, &recipe, &t, g, &e), 0);
  const double mine[5] = {t.mse, t.pair, t.hf_pair, t.hf_mse, t.total};
  const char *names[5] = {"mse", "pair (similarity)", "hf pair (similarity2)", "hf mse (mse2)",
                          "total"};
  for (int k = 0; k < 5; k++) {
    const double rel = fabs(mine[k] - f.terms[k]) / fabs(f.terms[k]);
    const double r32 = fabs(mine[k] - f.terms32[k]) / fabs(f.terms32[k]);
    printf("dstudio %-22s engine %.9g authors %.9g rel %.2e (their float32 run: %.2e)\n", names[k],
           mine[k], f.terms[k], rel, r32);
    ck_assert_msg(f.terms[k] > 0, "the fixture's %s is not positive", names[k]);
    ck_assert_msg(rel < 1e-6, "%s: rel %.3g", names[k], rel);
    /* their float32 rounding of the similarities moves the small KL terms by ~1e-5 */
    ck_assert_msg(r32 < 1e-4, "%s: rel %.3g to the float32 run", names[k], r32);
  }
  const double rg = test_rel_l2(g, f.grad.data, (size_t)f.grad.count);
  printf("dstudio gradient: rel L2 to autograd %.2e\n", rg);
  ck_assert_msg(rg < 1e-6, "gradient rel L2 %.3g", rg);
  free(g);
  fixture_free(&f);
}
END_TEST

START_TEST(hf_matches_get_wave) {
  fixture f;
  fixture_load(&f);
  float *hf = malloc((size_t)f.hf.count * sizeof *hf);
  dstudio_hf(f.x_t.data, f.b.n, f.b.c, f.b.h, f.b.w, hf);
  const double r = test_rel_l2(hf, f.hf.data, (size_t)f.hf.count);
  printf("dstudio hf: rel L2 to get_wave's LH + HL + HH %.2e\n", r);
  ck_assert_msg(r < 1e-6, "hf rel L2 %.3g", r);
  free(hf);
  fixture_free(&f);
}
END_TEST

/* Central differences of one weighted term (selected by weights with only it on, minus the
 * mse that is always there) at coordinates spread over the three items and the others. */
static void fd_check(const dstudio_weights *w, int which) {
  fixture f;
  fixture_load(&f);
  const size_t count = (size_t)f.ada.count;
  float *g = malloc(count * sizeof *g), *g0 = malloc(count * sizeof *g0);
  const dstudio_weights none = {0, 0, 0};
  err e = {0};
  dstudio_terms t;
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, w, &t, g, &e), 0);
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, &none, &t, g0, &e), 0);
  double worst = 0, scale = 0;
  for (size_t k = 0; k < count; k++)
    scale = fmax(scale, fabs((double)g[k] - g0[k]));
  ck_assert_msg(scale > 0, "term %d has no gradient", which);
  for (size_t k = 0; k < count; k += 37) {
    const float x = f.ada.data[k];
    double val[2], step[2];
    for (int s = 0; s < 2; s++) {
      f.ada.data[k] = x + (s ? -1e-2f : 1e-2f) * fmaxf(fabsf(x), 0.1f);
      step[s] = (double)f.ada.data[k] - x;
      dstudio_terms tt;
      ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, w, &tt, NULL, &e), 0);
      val[s] = which == 0 ? tt.pair : which == 1 ? tt.hf_pair : tt.hf_mse;
    }
    f.ada.data[k] = x;
    const double fd = (val[0] - val[1]) / (step[0] - step[1]);
    const double an = (double)g[k] - g0[k];
    worst = fmax(worst, fabs(fd - an) / scale);
  }
  printf("dstudio term %d: finite differences vs gradient, worst %.2e of the largest entry\n",
         which, worst);
  ck_assert_msg(worst < 1e-4, "term %d: %.3g", which, worst);
  free(g), free(g0);
  fixture_free(&f);
}

START_TEST(pair_gradient_by_differences) {
  const dstudio_weights w = {1, 0, 0};
  fd_check(&w, 0);
}
END_TEST

START_TEST(hf_pair_gradient_by_differences) {
  const dstudio_weights w = {0, 1, 0};
  fd_check(&w, 1);
}
END_TEST

START_TEST(hf_mse_gradient_by_differences) {
  const dstudio_weights w = {0, 0, 1};
  fd_check(&w, 2);
}
END_TEST

START_TEST(pick_is_three_distinct_items) {
  int seen[3][3][3] = {{{0}}};
  for (int a = 0; a < 6; a++)
    for (int b = 0; b < 6; b++)
      for (int c = 0; c < 6; c++) {
        const float u[3] = {a / 6.0f + 0.01f, b / 6.0f + 0.01f, c / 6.0f + 0.01f};
        int idx[3];
        dstudio_pick(u, 3, idx);
        for (int k = 0; k < 3; k++)
          ck_assert(idx[k] >= 0 && idx[k] < 3 && idx[k] != idx[(k + 1) % 3]);
        seen[idx[0]][idx[1]][idx[2]]++;
        dstudio_pick(u, 7, idx);
        for (int k = 0; k < 3; k++)
          ck_assert(idx[k] >= 0 && idx[k] < 7 && idx[k] != idx[(k + 1) % 3]);
      }
  /* all six orders of a batch of three, equally often */
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      for (int k = 0; k < 3; k++)
        if (i != j && j != k && i != k)
          ck_assert_int_eq(seen[i][j][k], 216 / 6);
  const float top[3] = {0.9999999f, 0.9999999f, 0.9999999f};
  int idx[3];
  dstudio_pick(top, 5, idx);
  ck_assert(idx[0] == 4 && idx[1] == 3 && idx[2] == 2);
}
END_TEST

START_TEST(refuses_bad_batches) {
  fixture f;
  fixture_load(&f);
  err e = {0};
  dstudio_terms t;
  dstudio_batch b = f.b;
  b.n = 2;
  ck_assert_int_eq(dstudio_loss(&b, f.ada.data, &recipe, &t, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "at least 3"));
  b = f.b;
  b.idx[2] = b.idx[0];
  ck_assert_int_eq(dstudio_loss(&b, f.ada.data, &recipe, &t, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "distinct"));
  b = f.b;
  b.idx[1] = b.n;
  ck_assert_int_eq(dstudio_loss(&b, f.ada.data, &recipe, &t, NULL, &e), ERR_INVALID);
  const dstudio_weights bad = {-1, 0, 0}, nan_w = {0, NAN, 0};
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, &bad, &t, NULL, &e), ERR_INVALID);
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, &nan_w, &t, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "weights"));
  f.ada.data[5] = NAN;
  ck_assert_int_eq(dstudio_loss(&f.b, f.ada.data, &recipe, &t, NULL, &e), ERR_NUMERIC);
  fixture_free(&f);
}
END_TEST

/* A DomainStudio step of the trainer on the tiny model of tests/fixtures/train: while the
 * adapted model equals its source the pairwise terms are exactly 0 and the denoising term is the
 * plain trainer's loss of the same draws; after a few steps they are not. */
START_TEST(trainer_step_domainstudio) {
  char path[1024];
  err e = {0};
  model *m = NULL, *src = NULL, *plain = NULL;
  const char *dir = test_src_path(path, sizeof path, "tests/fixtures/train/model");
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(model_load(dir, &src, &e), 0);
  ck_assert_int_eq(model_load(dir, &plain, &e), 0);
  sched_config sc;
  ck_assert_int_eq(sched_config_init(&sc, "DDPMScheduler", &e), 0);
  train_config c = {.prediction = SCHED_PRED_EPSILON,
                    .lr_kind = TRAIN_LR_CONSTANT,
                    .lr = 1e-2,
                    .total_steps = 4,
                    .adamw = {0.9, 0.999, 1e-8, 0},
                    .seed = 3,
                    .threads = 1};
  trainer *tp = NULL, *td = NULL;
  ck_assert_msg(trainer_new(plain, &sc, &c, &tp, &e) == 0, "%s", e.msg);
  c.source = src;
  c.dstudio = recipe;
  ck_assert_msg(trainer_new(m, &sc, &c, &td, &e) == 0, "%s", e.msg);
  enum { N = 4 };
  float x0[N * 3 * 8 * 8];
  const int64_t labels[N] = {0, 1, 2, 3};
  for (size_t i = 0; i < sizeof x0 / sizeof x0[0]; i++)
    x0[i] = (float)sin(0.37 * (double)i) * 0.9f;
  train_step_info a, b;
  ck_assert_int_eq(trainer_step(tp, x0, labels, N, 8, 8, &a, &e), 0);
  ck_assert_msg(trainer_step(td, x0, labels, N, 8, 8, &b, &e) == 0, "%s", e.msg);
  printf("dstudio step 1: mse %.6g (plain %.6g) pair %g hf pair %g hf mse %.6g\n", b.terms.mse,
         a.loss, b.terms.pair, b.terms.hf_pair, b.terms.hf_mse);
  ck_assert(b.terms.pair == 0 && b.terms.hf_pair == 0);
  ck_assert_msg(fabs(b.terms.mse - a.loss) <= 1e-6 * a.loss, "mse %.9g vs %.9g", b.terms.mse,
                a.loss);
  ck_assert(b.terms.hf_mse > 0 && b.loss == b.terms.total);
  for (int s = 0; s < 3; s++)
    ck_assert_int_eq(trainer_step(td, x0, labels, N, 8, 8, &b, &e), 0);
  printf("dstudio step 4: pair %g hf pair %g\n", b.terms.pair, b.terms.hf_pair);
  ck_assert(b.terms.pair > 0 && b.terms.hf_pair > 0);
  /* a batch of two has no three items */
  ck_assert_int_eq(trainer_step(td, x0, labels, 2, 8, 8, &b, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "at least 3"));
  trainer_free(tp), trainer_free(td);
  /* refusals at construction: a weighted loss, a source of another network */
  trainer *bad = NULL;
  c.min_snr_gamma = 5;
  ck_assert_int_eq(trainer_new(m, &sc, &c, &bad, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "min-SNR"));
  c.min_snr_gamma = 0;
  model *other = NULL;
  ck_assert_int_eq(model_load(test_src_path(path, sizeof path, "models/glyphs32"), &other, &e), 0);
  c.source = other;
  ck_assert_int_eq(trainer_new(m, &sc, &c, &bad, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "source model"));
  ck_assert_ptr_null(bad);
  sched_config_free(&sc);
  model_free(other), model_free(m), model_free(src), model_free(plain);
}
END_TEST

/* n PNGs of c x size x size (different pictures) with labels 0..n-1 in metadata.jsonl. */
static void write_shots(const char *dir, int n, int c, int size) {
  uint8_t px[3 * 40 * 40];
  char path[1200];
  snprintf(path, sizeof path, "%s/metadata.jsonl", dir);
  FILE *meta = fopen(path, "w");
  ck_assert_ptr_nonnull(meta);
  err e = {0};
  for (int i = 0; i < n; i++) {
    for (int k = 0; k < c * size * size; k++)
      px[k] = (uint8_t)((k * (7 + i)) % 251);
    snprintf(path, sizeof path, "%s/s%d.png", dir, i);
    ck_assert_msg(image_png_write(path, px, c, size, size, NULL, 0, &e) == 0, "%s", e.msg);
    fprintf(meta, "{\"file_name\": \"s%d.png\", \"label\": %d}\n", i, i % 4);
  }
  fclose(meta);
}

/* denoised finetune: both methods give a folder that sample loads; bad inputs are refused with
 * the problem named. */
START_TEST(finetune_cli) {
  char tmp[64], dir[128], out[256], log[8192], model[1024], gmm[1024];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  test_src_path(model, sizeof model, "tests/fixtures/train/model");
  test_src_path(gmm, sizeof gmm, "models/shapes-gmm");
  snprintf(dir, sizeof dir, "%s/shots", tmp);
  ck_assert_int_eq(mkdir(dir, 0777), 0);
  write_shots(dir, 4, 3, 8);
  const char *methods[2] = {"domainstudio", "plain"};
  for (int k = 0; k < 2; k++) {
    snprintf(out, sizeof out, "%s/%s", tmp, methods[k]);
    int st = test_run_cli(log, sizeof log,
                          "finetune --init %s --images %s --method %s --steps 3 --seed 1 --out %s",
                          model, dir, methods[k], out);
    ck_assert_msg(st == 0, "%s", log);
    ck_assert_ptr_nonnull(strstr(log, "fine-tuned 3 steps"));
    st = test_run_cli(log, sizeof log,
                      "sample --model %s --class 1 --steps 2 --seed 1 --out %s.png", out, out);
    ck_assert_msg(st == 0, "%s", log);
  }
  /* the DomainStudio log carries its terms */
  snprintf(out, sizeof out, "%s/domainstudio/loss.jsonl", tmp);
  FILE *f = fopen(out, "r");
  ck_assert_ptr_nonnull(f);
  ck_assert_int_gt((int)fread(log, 1, sizeof log - 1, f), 0);
  fclose(f);
  ck_assert_ptr_nonnull(strstr(log, "\"hf_pair\""));
  /* too few images, wrong size, wrong channels, a model it cannot adapt, a small batch */
  snprintf(out, sizeof out, "%s/bad", tmp);
  char few[128], big[128], grey[128];
  snprintf(few, sizeof few, "%s/few", tmp);
  snprintf(big, sizeof big, "%s/big", tmp);
  snprintf(grey, sizeof grey, "%s/grey", tmp);
  ck_assert_int_eq(mkdir(few, 0777) | mkdir(big, 0777) | mkdir(grey, 0777), 0);
  write_shots(few, 2, 3, 8);
  write_shots(big, 4, 3, 16);
  write_shots(grey, 4, 1, 8);
  const struct {
    const char *init, *images, *extra, *needle;
  } bad[] = {{model, few, "", "at least 3"},
             {model, big, "", "sample_size is 8"},
             {model, grey, "", "1 channels, the model takes 3"},
             {gmm, dir, "", "cannot adapt"},
             {model, dir, "--batch 2", "--batch 3 or more"},
             {model, dir, "--method nope", "domainstudio or plain"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int st =
        test_run_cli(log, sizeof log,
                     "finetune --init %s --images %s --method domainstudio --steps 2 %s --out %s",
                     bad[i].init, bad[i].images, bad[i].extra, out);
    ck_assert_msg(st != 0 && strstr(log, bad[i].needle), "case %zu: %s", i, log);
  }
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("dstudio");
  TCase *tc = tcase_create("dstudio");
  tcase_add_test(tc, terms_match_authors_code);
  tcase_add_test(tc, hf_matches_get_wave);
  tcase_add_test(tc, pair_gradient_by_differences);
  tcase_add_test(tc, hf_pair_gradient_by_differences);
  tcase_add_test(tc, hf_mse_gradient_by_differences);
  tcase_add_test(tc, pick_is_three_distinct_items);
  tcase_add_test(tc, refuses_bad_batches);
  tcase_add_test(tc, trainer_step_domainstudio);
  tcase_add_test(tc, finetune_cli);
  suite_add_tcase(s, tc);
  return s;
}
