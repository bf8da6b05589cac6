/* engine/train/train: three training steps against PyTorch (tools/gen_train_fixtures.py: loss,
 * backward, min-SNR weights, clipping, AdamW at a cosine warm-up rate, EMA; the timesteps and
 * noise given), the learning-rate schedules, the data order, the fresh initialisation
 * (model_init), determinism over thread counts and the refusals. */
#include <math.h>

#include "npy.h"
#include "safetensors.h"
#include "testfx.h"
#include "testutil.h"
#include "train.h"

#define FX "train"

static train_config base_config(void) {
  train_config c = {.prediction = SCHED_PRED_EPSILON,
                    .lr_kind = TRAIN_LR_COSINE,
                    .lr = 2e-3,
                    .warmup = 1,
                    .total_steps = 3,
                    .adamw = {0.9, 0.999, 1e-8, 0.01},
                    .use_ema = 1,
                    .ema = {.decay = 0.9, .inv_gamma = 1, .power = 2.0 / 3.0},
                    .seed = 7,
                    .threads = 1};
  return c;
}

/* The worst per-tensor relative L2 of m's weights (or the trainer's EMA) against a file, and the
 * relative L2 of the whole update (final - initial) against torch's. Attention key biases are
 * left out: their gradient is zero in exact arithmetic (softmax ignores a shift shared by every
 * key), so both sides hold rounding noise there, which AdamW's normalisation turns into steps
 * of the full learning rate in arbitrary directions (up to 2e-4 rel L2 seen). */
static void compare_weights(model *m, trainer *t, const char *file, model *init, double *worst,
                            double *update) {
  char path[1024];
  st_file *st = NULL;
  err e = {0};
  ck_assert_msg(st_open(test_fx_path(path, sizeof path, FX "/%s", file), &st, &e) == 0, "%s",
                e.msg);
  double num = 0, den = 0;
  *worst = 0;
  for (int i = 0; i < model_param_count(m); i++) {
    const model_param *mp = model_param_at(m, i);
    if (strstr(mp->name, ".to_k.bias"))
      continue;
    const float *ours = t ? trainer_ema_at(t, i) : mp->data;
    const float *start = model_param_at(init, i)->data;
    float *want = malloc(mp->count * sizeof *want);
    ck_assert_msg(st_read_f32(st, mp->name, mp->ndim, mp->shape, want, &e) == 0, "%s", e.msg);
    double r = test_rel_l2(ours, want, mp->count);
    if (r > 1e-5)
      printf("  %s: rel L2 %.2e\n", mp->name, r);
    *worst = r > *worst ? r : *worst;
    for (size_t k = 0; k < mp->count; k++) {
      double d = ((double)ours[k] - start[k]) - ((double)want[k] - start[k]);
      num += d * d;
      den += ((double)want[k] - start[k]) * ((double)want[k] - start[k]);
    }
    free(want);
  }
  *update = sqrt(num / den);
  st_close(st);
}

static void run_case(const char *name, sched_prediction pred, double gamma, double clip,
                     int weights, int ema) {
  char path[1024], file[128];
  err e = {0};
  model *m = test_fx_model(FX "/model"), *init = test_fx_model(FX "/model");
  npy_array x0, noise;
  int64_t *labels, *ts, count;
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
  test_fx_read_f32(&x0, FX "/x0.npy");
  test_fx_read_f32(&noise, FX "/noise.npy");
  ck_assert_int_eq(npy_read_i64(test_fx_path(path, sizeof path, FX "/labels.npy"), &labels, &count,
                                &ndim, shape, &e),
                   0);
  ck_assert_int_eq(npy_read_i64(test_fx_path(path, sizeof path, FX "/timesteps.npy"), &ts, &count,
                                &ndim, shape, &e),
                   0);
  const int steps = (int)shape[0], b = (int)shape[1];
  const int c = (int)x0.shape[1], h = (int)x0.shape[2], w = (int)x0.shape[3];
  snprintf(file, sizeof file, "%s.losses.npy", name);
  npy_array want_loss;
  test_fx_read_f32(&want_loss, FX "/%s", file);
  sched_config sc;
  ck_assert_int_eq(sched_config_init(&sc, "DDPMScheduler", &e), 0);
  train_config cfg = base_config();
  cfg.prediction = pred, cfg.min_snr_gamma = gamma, cfg.clip_norm = clip;
  trainer *t = NULL;
  ck_assert_msg(trainer_new(m, &sc, &cfg, &t, &e) == 0, "%s", e.msg);
  for (int s = 0; s < steps; s++) {
    train_step_info info;
    ck_assert_msg(trainer_step_given(t, x0.data, labels + s * b, b, h, w, ts + s * b,
                                     noise.data + (size_t)s * b * c * h * w, &info, &e) == 0,
                  "%s", e.msg);
    double r = fabs(info.loss - want_loss.data[s]) / fabs(want_loss.data[s]);
    printf("%s step %d: loss %.7f torch %.7f (rel %.1e), |g| %.4f, lr %.2e\n", name, s + 1,
           info.loss, want_loss.data[s], r, info.grad_norm, info.lr);
    ck_assert_msg(r < 1e-4, "%s step %d: loss %.8g, torch %.8g", name, s + 1, info.loss,
                  want_loss.data[s]);
  }
  double worst, update;
  if (weights) {
    snprintf(file, sizeof file, "%s.final.safetensors", name);
    compare_weights(m, NULL, file, init, &worst, &update);
    printf("%s weights: worst tensor rel L2 %.2e, update rel L2 %.2e\n", name, worst, update);
    ck_assert_msg(worst < 1e-4 && update < 1e-4, "%s: weights %.3g, update %.3g", name, worst,
                  update);
  }
  if (ema) {
    snprintf(file, sizeof file, "%s.ema.safetensors", name);
    compare_weights(m, t, file, init, &worst, &update);
    printf("%s EMA: worst tensor rel L2 %.2e, update rel L2 %.2e\n", name, worst, update);
    ck_assert_msg(worst < 1e-4 && update < 1e-4, "%s EMA: %.3g, update %.3g", name, worst, update);
  }
  trainer_free(t);
  sched_config_free(&sc);
  npy_array_free(&x0), npy_array_free(&noise), npy_array_free(&want_loss);
  free(labels), free(ts);
  model_free(m), model_free(init);
}

START_TEST(eps_min_snr_clipped_matches_torch) {
  run_case("eps_minsnr", SCHED_PRED_EPSILON, 5.0, 0.05, 1, 1);
}
END_TEST

START_TEST(v_prediction_matches_torch) {
  run_case("v_plain", SCHED_PRED_V, 0.0, 1.0, 1, 0);
}
END_TEST

START_TEST(sample_min_snr_matches_torch) {
  run_case("sample_minsnr", SCHED_PRED_SAMPLE, 5.0, 0.0, 0, 0);
}
END_TEST

/* get_scheduler's values: LambdaLR at step k, warm-up from 0. */
START_TEST(lr_schedules) {
  ck_assert_double_eq(train_lr_at(TRAIN_LR_CONSTANT, 1e-3, 10, 100, 0), 1e-3);
  ck_assert_double_eq(train_lr_at(TRAIN_LR_CONSTANT_WARMUP, 1e-3, 10, 100, 0), 0.0);
  ck_assert_double_eq_tol(train_lr_at(TRAIN_LR_CONSTANT_WARMUP, 1e-3, 10, 100, 5), 5e-4, 1e-18);
  ck_assert_double_eq(train_lr_at(TRAIN_LR_CONSTANT_WARMUP, 1e-3, 10, 100, 50), 1e-3);
  ck_assert_double_eq(train_lr_at(TRAIN_LR_COSINE, 1e-3, 10, 100, 10), 1e-3);
  ck_assert_double_eq_tol(train_lr_at(TRAIN_LR_COSINE, 1e-3, 10, 100, 55), 5e-4, 1e-15);
  ck_assert_double_eq_tol(train_lr_at(TRAIN_LR_COSINE, 1e-3, 10, 100, 100), 0.0, 1e-18);
  ck_assert_double_eq_tol(train_lr_at(TRAIN_LR_COSINE, 1e-3, 0, 4, 1),
                          1e-3 * 0.5 * (1 + cos(M_PI / 4)), 1e-15);
  ck_assert_int_eq(train_lr_kind_from_name("cosine"), TRAIN_LR_COSINE);
  ck_assert_int_eq(train_lr_kind_from_name("linear"), -1);
}
END_TEST

/* Each epoch is a permutation; epochs differ; batches straddle epochs. */
START_TEST(data_order_is_epochs_of_permutations) {
  err e = {0};
  int64_t idx[7], seen[2][7] = {{0}};
  for (long step = 0; step < 2; step++) { /* 14 draws of 7 images: two epochs */
    ck_assert_int_eq(train_batch_indices(3, step, 7, 7, idx, &e), 0);
    for (int i = 0; i < 7; i++)
      seen[step][idx[i]]++;
  }
  for (int k = 0; k < 7; k++)
    ck_assert(seen[0][k] == 1 && seen[1][k] == 1);
  int64_t a[5], b[5], c[10];
  ck_assert_int_eq(train_batch_indices(3, 0, 10, 7, c, &e), 0); /* one epoch and 3 of the next */
  ck_assert_int_eq(train_batch_indices(3, 0, 5, 7, a, &e), 0);
  ck_assert_int_eq(train_batch_indices(3, 1, 5, 7, b, &e), 0);
  for (int i = 0; i < 5; i++)
    ck_assert(a[i] == c[i] && b[i] == c[5 + i]);
  ck_assert_int_eq(train_batch_indices(3, 0, 5, 0, a, &e), ERR_INVALID);
}
END_TEST

/* A fresh model: the fixture's shapes, norms at 1/0, zeroed last convolutions, bounded layers,
 * the same numbers for the same seed and different ones for another. */
START_TEST(init_from_config) {
  char path[1024];
  err e = {0};
  model *a = NULL, *b = NULL, *c = NULL, *ref = test_fx_model(FX "/model");
  test_fx_path(path, sizeof path, FX "/model/config.json");
  ck_assert_msg(model_init(path, 1, &a, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(model_init(path, 1, &b, &e), 0);
  ck_assert_int_eq(model_init(path, 2, &c, &e), 0);
  ck_assert_int_eq(model_param_count(a), model_param_count(ref));
  ck_assert_int_eq(model_get_info(a)->num_params, model_get_info(ref)->num_params);
  ck_assert_int_eq(model_get_info(a)->null_class, 4);
  int differ = 0;
  for (int i = 0; i < model_param_count(a); i++) {
    const model_param *p = model_param_at(a, i), *q = model_param_at(b, i),
                      *r = model_param_at(c, i);
    ck_assert_str_eq(p->name, model_param_at(ref, i)->name);
    ck_assert_int_eq(memcmp(p->data, q->data, p->count * sizeof(float)), 0);
    differ |= memcmp(p->data, r->data, p->count * sizeof(float)) != 0;
    if (strcmp(p->name, "conv_norm_out.weight") == 0 || strstr(p->name, ".norm1.weight"))
      ck_assert_float_eq(p->data[0], 1.0f);
    if (strstr(p->name, ".conv2.weight") || strstr(p->name, "conv_out.") ||
        strstr(p->name, "to_out.0.")) {
      float mx = 0;
      for (size_t k = 0; k < p->count; k++)
        mx = fmaxf(mx, fabsf(p->data[k]));
      ck_assert_msg(mx == 0.0f, "%s is not zero", p->name);
    }
    if (strcmp(p->name, "conv_in.weight") == 0) { /* fan_in 27: +-1/sqrt(27) */
      float mx = 0;
      for (size_t k = 0; k < p->count; k++)
        mx = fmaxf(mx, fabsf(p->data[k]));
      ck_assert(mx > 0.1f && mx <= 1.0f / sqrtf(27.0f));
    }
  }
  ck_assert(differ);
  model_free(a), model_free(b), model_free(c), model_free(ref);
  ck_assert_int_eq(model_init("/nonexistent/config.json", 1, &a, &e), ERR_IO);
  ck_assert_ptr_nonnull(strstr(e.msg, "/nonexistent/config.json"));
}
END_TEST

/* The same seed gives bit-identical weights on 1 and 2 threads (random draws included). */
START_TEST(deterministic_over_threads) {
  err e = {0};
  float *w[2] = {NULL, NULL};
  size_t total = 0;
  npy_array x0;
  test_fx_read_f32(&x0, FX "/x0.npy");
  for (int run = 0; run < 2; run++) {
    model *m = test_fx_model(FX "/model");
    sched_config sc;
    ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
    train_config cfg = base_config();
    cfg.threads = run + 1, cfg.null_dropout = 0.5, cfg.null_class = 4, cfg.clip_norm = 1;
    trainer *t = NULL;
    ck_assert_msg(trainer_new(m, &sc, &cfg, &t, &e) == 0, "%s", e.msg);
    const int64_t labels[2] = {1, 2};
    for (int s = 0; s < 3; s++)
      ck_assert_msg(trainer_step(t, x0.data, labels, 2, 8, 8, NULL, &e) == 0, "%s", e.msg);
    ck_assert_int_eq(trainer_steps(t), 3);
    total = 0;
    for (int i = 0; i < model_param_count(m); i++)
      total += model_param_at(m, i)->count;
    w[run] = malloc(total * sizeof(float));
    size_t off = 0;
    for (int i = 0; i < model_param_count(m); i++) {
      memcpy(w[run] + off, trainer_ema_at(t, i), model_param_at(m, i)->count * sizeof(float));
      off += model_param_at(m, i)->count;
    }
    trainer_free(t);
    sched_config_free(&sc);
    model_free(m);
  }
  ck_assert_int_eq(memcmp(w[0], w[1], total * sizeof(float)), 0);
  free(w[0]), free(w[1]);
  npy_array_free(&x0);
}
END_TEST

/* A batch of more images than any before but fewer values in all (smaller images) gets room for
 * each image's draws: the scratch once grew by values only (ASan saw the overflow). */
START_TEST(more_smaller_images_after_fewer_larger) {
  err e = {0};
  model *m = test_fx_model(FX "/model");
  sched_config sc;
  ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
  train_config cfg = base_config();
  trainer *t = NULL;
  ck_assert_msg(trainer_new(m, &sc, &cfg, &t, &e) == 0, "%s", e.msg);
  const int c = model_get_info(m)->in_channels;
  float *x = calloc((size_t)2 * c * 16 * 16, sizeof(float));
  const int64_t labels[6] = {0, 1, 2, 3, 0, 1};
  ck_assert_msg(trainer_step(t, x, labels, 2, 16, 16, NULL, &e) == 0, "%s", e.msg);
  train_step_info info;
  ck_assert_msg(trainer_step(t, x, labels, 6, 8, 8, &info, &e) == 0, "%s", e.msg);
  ck_assert(isfinite(info.loss));
  ck_assert_int_eq(trainer_steps(t), 2);
  free(x);
  trainer_free(t);
  sched_config_free(&sc);
  model_free(m);
}
END_TEST

START_TEST(refusals) {
  err e = {0};
  model *m = test_fx_model(FX "/model");
  sched_config sc;
  ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
  trainer *t = NULL;
  struct {
    train_config c;
    const char *needle;
  } bad[6];
  for (int i = 0; i < 6; i++)
    bad[i].c = base_config();
  bad[0].c.min_snr_gamma = -1, bad[0].needle = "min-SNR";
  bad[1].c.null_dropout = 1.5, bad[1].needle = "dropout";
  bad[2].c.clip_norm = NAN, bad[2].needle = "clipping";
  bad[3].c.total_steps = 0, bad[3].needle = "steps";
  bad[4].c.adamw.eps = 0, bad[4].needle = "eps";
  bad[5].c.null_dropout = 0.1, bad[5].c.null_class = 9, bad[5].needle = "class-conditional";
  for (int i = 0; i < 6; i++) {
    ck_assert_int_ne(trainer_new(m, &sc, &bad[i].c, &t, &e), 0);
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(e.msg, bad[i].needle), "%d: %s", i, e.msg);
  }
  train_config c = base_config();
  ck_assert_int_eq(trainer_new(m, &sc, &c, &t, &e), 0);
  float x[2 * 3 * 8 * 8] = {0}, z[2 * 3 * 8 * 8] = {0};
  const int64_t ts[2] = {0, 1000}, labels[2] = {0, 1};
  ck_assert_int_eq(trainer_step_given(t, x, labels, 2, 8, 8, ts, z, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "timestep 1000"));
  const int64_t bad_labels[2] = {0, 5}, ok_ts[2] = {0, 1};
  ck_assert_int_ne(trainer_step_given(t, x, bad_labels, 2, 8, 8, ok_ts, z, NULL, &e), 0);
  ck_assert_int_eq(trainer_steps(t), 0);
  trainer_free(t);
  sched_config_free(&sc);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("train");
  TCase *tc = tcase_create("train");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, eps_min_snr_clipped_matches_torch);
  tcase_add_test(tc, v_prediction_matches_torch);
  tcase_add_test(tc, sample_min_snr_matches_torch);
  tcase_add_test(tc, lr_schedules);
  tcase_add_test(tc, data_order_is_epochs_of_permutations);
  tcase_add_test(tc, init_from_config);
  tcase_add_test(tc, deterministic_over_threads);
  tcase_add_test(tc, more_smaller_images_after_fewer_larger);
  tcase_add_test(tc, refusals);
  suite_add_tcase(s, tc);
  return s;
}
