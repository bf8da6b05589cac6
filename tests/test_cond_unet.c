/* The image-conditioned UNet (issue 18: the icDPM's network, x and the blurry image
 * concatenated before conv_in): forward and gradients against the PyTorch reference of
 * tools/deblur/cond_unet.py (fixtures by tools/deblur/gen_cond_fixtures.py), the conditioning
 * image through the samplers (every row its own), the training step with it and the regression
 * baseline's objective, and the refusals when it is missing or not wanted. */
#include <math.h>
#include <string.h>

#include "image.h"
#include "model.h"
#include "npy.h"
#include "sampler.h"
#include "schedule.h"
#include "testfx.h"
#include "testutil.h"
#include "train.h"

#define FX "cond_unet"

START_TEST(forward_matches_reference) {
  model *m = test_fx_model(FX);
  const model_info *mi = model_get_info(m);
  ck_assert_int_eq(mi->in_channels, 3);
  ck_assert_int_eq(mi->cond_channels, 3);
  npy_array x, c, t, ref;
  test_fx_read_f32(&x, FX "/input.npy"), test_fx_read_f32(&c, FX "/cond.npy"),
      test_fx_read_f32(&t, FX "/timesteps.npy");
  test_fx_read_f32(&ref, FX "/output.npy");
  float *out = malloc(ref.count * sizeof *out), *one = malloc(ref.count * sizeof *one);
  model_call call = {.x = x.data, .n = 2, .h = 16, .w = 16, .t = t.data, .threads = 2};
  call.cond = c.data;
  err e = {0};
  ck_assert_msg(model_run(m, &call, out, &e) == 0, "%s", e.msg);
  const double rel = test_rel_l2(out, ref.data, ref.count);
  printf("cond unet forward rel L2 %.3g\n", rel);
  ck_assert_msg(rel < 1e-5, "relative L2 %g", rel);
  /* the second image alone, with its own conditioning image, is bit-identical */
  const size_t d = ref.count / 2;
  call = (model_call){.x = x.data + d, .n = 1, .h = 16, .w = 16, .t = t.data + 1, .threads = 1};
  call.cond = c.data + d;
  ck_assert_int_eq(model_run(m, &call, one, &e), 0);
  ck_assert(memcmp(one, out + d, d * sizeof *one) == 0);
  /* the conditioning image matters */
  call.cond = c.data;
  ck_assert_int_eq(model_run(m, &call, one, &e), 0);
  ck_assert(test_rel_l2(one, out + d, d) > 1e-3);
  free(out), free(one);
  npy_array_free(&x), npy_array_free(&c), npy_array_free(&t), npy_array_free(&ref);
  model_free(m);
}
END_TEST

static int param_index(const model *m, const char *name) {
  for (int i = 0; i < model_param_count(m); i++)
    if (strcmp(model_param_at(m, i)->name, name) == 0)
      return i;
  ck_abort_msg("no parameter %s", name);
  return -1;
}

START_TEST(gradients_match_reference) {
  model *m = test_fx_model(FX);
  npy_array x, c, t, g, gx, gin, gout;
  test_fx_read_f32(&x, FX "/input.npy"), test_fx_read_f32(&c, FX "/cond.npy"),
      test_fx_read_f32(&t, FX "/timesteps.npy");
  test_fx_read_f32(&g, FX "/grad_out.npy"), test_fx_read_f32(&gx, FX "/grad_input.npy");
  test_fx_read_f32(&gin, FX "/grad_conv_in.npy"), test_fx_read_f32(&gout, FX "/grad_conv_out.npy");
  model_grads *pg = NULL;
  err e = {0};
  ck_assert_int_eq(model_grads_new(m, &pg, &e), 0);
  float *dx = malloc(x.count * sizeof *dx);
  model_call call = {.x = x.data, .n = 2, .h = 16, .w = 16, .t = t.data, .threads = 2};
  call.cond = c.data;
  const model_grad_call gc = {.grad_out = g.data, .grad_x = dx, .params = pg};
  ck_assert_msg(model_backward(m, &call, &gc, &e) == 0, "%s", e.msg);
  const float *din = model_grads_at(pg, param_index(m, "conv_in.weight"));
  const float *dout = model_grads_at(pg, param_index(m, "conv_out.weight"));
  const double r[3] = {test_rel_l2(dx, gx.data, gx.count), test_rel_l2(din, gin.data, gin.count),
                       test_rel_l2(dout, gout.data, gout.count)};
  printf("cond unet grads rel L2: x %.3g conv_in %.3g conv_out %.3g\n", r[0], r[1], r[2]);
  for (int i = 0; i < 3; i++)
    ck_assert_msg(r[i] < 1e-4, "gradient %d: relative L2 %g", i, r[i]);
  model_grads_free(pg);
  free(dx);
  npy_array_free(&x), npy_array_free(&c), npy_array_free(&t), npy_array_free(&g);
  npy_array_free(&gx), npy_array_free(&gin), npy_array_free(&gout);
  model_free(m);
}
END_TEST

START_TEST(refusals) {
  model *m = test_fx_model(FX);
  float x[3 * 16 * 16] = {0}, t = 10, out[3 * 16 * 16];
  err e = {0};
  ck_assert_int_eq(model_eval(m, x, 1, 16, 16, &t, NULL, out, 1, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "image-conditioned"));
  model_grads *pg = NULL;
  ck_assert_int_eq(model_grads_new(m, &pg, &e), 0);
  const model_call call = {.x = x, .n = 1, .h = 16, .w = 16, .t = &t, .threads = 1};
  const model_grad_call gc = {.grad_out = x, .params = pg};
  ck_assert_int_eq(model_backward(m, &call, &gc, &e), ERR_INVALID);
  model_grads_free(pg);
  model_free(m);
  /* a plain UNet refuses a conditioning image */
  char dir[1024];
  ck_assert_int_eq(
      model_load(test_src_path(dir, sizeof dir, "tests/fixtures/unet/cifar_small"), &m, &e), 0);
  model_call c2 = {.x = x, .n = 1, .h = 16, .w = 16, .t = &t, .threads = 1};
  c2.cond = x;
  ck_assert_int_eq(model_run(m, &c2, out, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "no conditioning image"));
  model_free(m);
  /* _cond_channels must leave channels for x */
  char tmp[512], path[1024];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(path, sizeof path, "%s/config.json", tmp);
  FILE *f = fopen(path, "w");
  fputs("{\"_class_name\": \"UNet2DModel\", \"in_channels\": 3, \"_cond_channels\": 3, "
        "\"block_out_channels\": [8, 8], \"norm_num_groups\": 4, \"down_block_types\": "
        "[\"DownBlock2D\", \"DownBlock2D\"], \"up_block_types\": [\"UpBlock2D\", \"UpBlock2D\"]}",
        f);
  fclose(f);
  ck_assert_int_eq(model_init(path, 1, &m, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "_cond_channels"));
}
END_TEST

/* A batch of two through DDIM gives each image what a run of that image alone gives: the
 * solver hands every evaluation the right rows of the conditioning image. */
START_TEST(sampler_passes_the_condition) {
  model *m = test_fx_model(FX);
  npy_array c;
  test_fx_read_f32(&c, FX "/cond.npy");
  sched_config cfg;
  err e = {0};
  ck_assert_int_eq(sched_config_from_json(model_scheduler_config(m), "DDIMScheduler", 0, &cfg, &e),
                   0);
  sampler *s = NULL;
  ck_assert_msg(sampler_new("ddim", &cfg, 4, &s, &e) == 0, "%s", e.msg);
  const size_t d = 3 * 16 * 16;
  float both[2 * 3 * 16 * 16], one[3 * 16 * 16];
  sampler_run_opts o = {.batch = 2, .seed = 5, .threads = 2, .cond = c.data};
  ck_assert_msg(sampler_run(s, m, &o, both, NULL, &e) == 0, "%s", e.msg);
  o = (sampler_run_opts){.batch = 1, .seed = 5, .first_image = 1, .threads = 1, .cond = c.data + d};
  ck_assert_msg(sampler_run(s, m, &o, one, NULL, &e) == 0, "%s", e.msg);
  ck_assert(memcmp(one, both + d, sizeof one) == 0);
  o.cond = NULL;
  ck_assert_int_eq(sampler_run(s, m, &o, one, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "conditioning image"));
  sampler_free(s);
  sched_config_free(&cfg);
  npy_array_free(&c);
  model_free(m);
}
END_TEST

static train_config config(int regression) {
  train_config c = {.prediction = SCHED_PRED_EPSILON,
                    .lr_kind = TRAIN_LR_CONSTANT,
                    .lr = 1e-3,
                    .total_steps = 30,
                    .adamw = {0.9, 0.999, 1e-8, 0.0},
                    .seed = 3,
                    .threads = 2,
                    .regression = regression};
  return c;
}

/* Steps on one batch: the icDPM's loss takes the conditioning image; the regression baseline
 * learns to map the blurry image to the sharp one (its loss falls). */
START_TEST(training_steps) {
  npy_array x, c;
  test_fx_read_f32(&x, FX "/input.npy"), test_fx_read_f32(&c, FX "/cond.npy");
  for (int64_t i = 0; i < x.count; i++) /* a clean image in [-1, 1] */
    x.data[i] = tanhf(x.data[i]);
  sched_config sc;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
  model *m = test_fx_model(FX);
  trainer *t = NULL;
  train_config tc = config(0);
  ck_assert_msg(trainer_new(m, &sc, &tc, &t, &e) == 0, "%s", e.msg);
  train_step_info info;
  ck_assert_int_eq(trainer_step(t, x.data, NULL, 2, 16, 16, &info, &e), ERR_INVALID);
  ck_assert_msg(trainer_step_cond(t, x.data, c.data, NULL, 2, 16, 16, &info, &e) == 0, "%s", e.msg);
  ck_assert(isfinite(info.loss) && info.loss > 0);
  trainer_free(t);
  tc = config(1);
  ck_assert_int_eq(trainer_new(m, &sc, &tc, &t, &e), ERR_INVALID); /* it has _cond_channels */
  model_free(m);
  char dir[1024];
  ck_assert_int_eq(
      model_load(test_src_path(dir, sizeof dir, "tests/fixtures/unet/cifar_small"), &m, &e), 0);
  ck_assert_msg(trainer_new(m, &sc, &tc, &t, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(trainer_step(t, x.data, NULL, 2, 16, 16, &info, &e), ERR_INVALID);
  double first = 0;
  for (int s = 0; s < 30; s++) {
    ck_assert_msg(trainer_step_cond(t, x.data, c.data, NULL, 2, 16, 16, &info, &e) == 0, "%s",
                  e.msg);
    if (s == 0)
      first = info.loss;
  }
  printf("regression loss %.4f -> %.4f in 30 steps\n", first, info.loss);
  ck_assert_msg(info.loss < 0.5 * first, "loss %g -> %g", first, info.loss);
  trainer_free(t);
  model_free(m);
  sched_config_free(&sc);
  npy_array_free(&x), npy_array_free(&c);
}
END_TEST

static int has(const char *path, const char *text) {
  FILE *f = fopen(path, "r");
  if (!f)
    return 0;
  char buf[8192];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = 0;
  fclose(f);
  return strstr(buf, text) != NULL;
}

/* `denoised train --cond` (and --regression) end to end, and its refusals. */
START_TEST(train_cli) {
  char dir[1024], plain[1024], tmp[512], out[16384], path[1200];
  test_fx_path(dir, sizeof dir, FX "/");
  test_src_path(plain, sizeof plain, "tests/fixtures/unet/cifar_small/config.json");
  test_tmpdir(tmp, sizeof tmp);
  int st = test_run_cli(out, sizeof out,
                        "train --model-config %s/config.json --data %s/cond.npy --cond "
                        "%s/cond.npy --steps 2 --batch 2 --quiet --out %s/ic",
                        dir, dir, dir, tmp);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(path, sizeof path, "%s/ic/config.json", tmp);
  ck_assert(has(path, "\"_cond_channels\": 3"));
  snprintf(path, sizeof path, "%s/ic/README.md", tmp);
  ck_assert_msg(has(path, "--cond "), "the model card's command lacks --cond");
  st = test_run_cli(out, sizeof out,
                    "train --model-config %s --data %s/cond.npy --cond %s/cond.npy --regression "
                    "--steps 2 --batch 2 --quiet --out %s/reg",
                    plain, dir, dir, tmp);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(path, sizeof path, "%s/reg/config.json", tmp);
  ck_assert(has(path, "\"_regression\": true"));
  snprintf(path, sizeof path, "%s/reg/README.md", tmp);
  ck_assert(has(path, " --regression"));
  /* refusals: name the flag and what is wrong */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "train --model-config %s/config.json --data %s/cond.npy --steps 2 "
                                "--batch 2 --regression --out %s/x",
                                dir, dir, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "--regression needs --cond"));
  ck_assert_int_ne(test_run_cli(out, sizeof out,
                                "train --model-config %s/config.json --data %s/cond.npy --cond "
                                "%s/input.npy --steps 2 --batch 2 --out %s/x",
                                dir, dir, dir, tmp),
                   0);
  ck_assert_msg(strstr(out, "--cond") && strstr(out, "[-1, 1]"), "%s", out);
  ck_assert_int_ne(test_run_cli(out, sizeof out,
                                "train --model-config %s --data %s/cond.npy --cond %s/cond.npy "
                                "--steps 2 --batch 2 --out %s/x",
                                plain, dir, dir, tmp),
                   0);
  ck_assert_msg(strstr(out, "takes no conditioning image"), "%s", out);
  ck_assert_int_ne(test_run_cli(out, sizeof out,
                                "train --model-config %s/config.json --data %s/cond.npy --steps 2 "
                                "--batch 2 --out %s/x",
                                dir, dir, tmp),
                   0);
  ck_assert_msg(strstr(out, "image-conditioned"), "%s", out);
}
END_TEST

/* A w x h RGB PNG of a smooth pattern at path. */
static void write_png(const char *path, int c, int h, int w) {
  uint8_t *px = malloc((size_t)c * h * w);
  for (int i = 0; i < c * h * w; i++)
    px[i] = (uint8_t)(i * 7 % 251);
  err e = {0};
  ck_assert_msg(image_png_write(path, px, c, h, w, NULL, 0, &e) == 0, "%s", e.msg);
  free(px);
}

/* `denoised deblur` on a picture larger than the training size, with the image-conditioned
 * fixture and with a regression model, and its refusals. */
START_TEST(deblur_cli) {
  char dir[1024], plain[1024], tmp[512], out[16384], in[1200], res[1200], path[1200];
  test_fx_path(dir, sizeof dir, FX "/");
  test_src_path(plain, sizeof plain, "tests/fixtures/unet/cifar_small");
  test_tmpdir(tmp, sizeof tmp);
  snprintf(in, sizeof in, "%s/blurry.png", tmp);
  write_png(in, 3, 24, 40);
  snprintf(res, sizeof res, "%s/sharp.png", tmp);
  int st = test_run_cli(out, sizeof out, "deblur --model %s --image %s --steps 3 --quiet -o %s",
                        dir, in, res);
  ck_assert_msg(st == 0, "%s", out);
  uint8_t *png = NULL, *px = NULL;
  size_t len;
  int h, w;
  err e = {0};
  FILE *f = fopen(res, "rb");
  ck_assert_ptr_nonnull(f);
  png = malloc(1 << 20);
  len = fread(png, 1, 1 << 20, f);
  fclose(f);
  ck_assert_int_eq(image_png_decode(png, len, 4096, 4096, &px, &h, &w, &e), 0);
  ck_assert(h == 24 && w == 40);
  free(png), free(px);
  ck_assert(test_run_cli(out, sizeof out, "deblur --model %s --image %s -o %s", plain, in, res));
  ck_assert_msg(strstr(out, "not a deblurring model"), "%s", out);
  write_png(in, 1, 24, 40); /* grey: taken as RGB like every input image */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "deblur --model %s --image %s --quiet --steps 2 -o %s", dir, in,
                                res),
                   0);
  write_png(in, 3, 23, 40);
  ck_assert(test_run_cli(out, sizeof out, "deblur --model %s --image %s -o %s", dir, in, res));
  ck_assert_msg(strstr(out, "multiple of 2"), "%s", out);
  snprintf(path, sizeof path, "%s/bad.png", tmp);
  f = fopen(path, "w");
  fputs("not a png", f);
  fclose(f);
  ck_assert(test_run_cli(out, sizeof out, "deblur --model %s --image %s -o %s", dir, path, res));
  ck_assert_msg(strstr(out, "--image"), "%s", out);
  /* without --model: the shipped model (models/deblur-reg) */
  write_png(in, 3, 32, 32);
  st = test_run_cli(out, sizeof out, "deblur --image %s --steps 2 --quiet -o %s", in, res);
  ck_assert_msg(st == 0, "%s", out);
  /* a .npy batch at the model's size, restored to --out; each row on its own noise stream */
  snprintf(path, sizeof path, "%s/sharp.npy", tmp);
  st = test_run_cli(out, sizeof out,
                    "deblur --model %s --image %s/cond.npy --steps 2 --quiet --out %s", dir, dir,
                    path);
  ck_assert_msg(st == 0, "%s", out);
  npy_array a = {0};
  ck_assert_int_eq(npy_read_f32(path, &a, &e), 0);
  ck_assert(a.ndim == 4 && a.shape[0] == 2 && a.shape[1] == 3 && a.shape[2] == 16 &&
            a.shape[3] == 16);
  ck_assert_int_eq(npy_check_finite(&a, "out", &e), 0);
  ck_assert(memcmp(a.data, a.data + 3 * 16 * 16, 3 * 16 * 16 * sizeof *a.data) != 0);
  npy_array_free(&a);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "deblur --model %s --image %s/cond.npy -o %s", dir, dir, res),
      2);
  ck_assert_msg(strstr(out, "--out OUT.npy"), "%s", out);
  /* a regression model: one evaluation */
  st = test_run_cli(out, sizeof out,
                    "train --model-config %s/config.json --data %s/cond.npy --cond %s/cond.npy "
                    "--regression --steps 1 --batch 2 --quiet --out %s/reg",
                    plain, dir, dir, tmp);
  ck_assert_msg(st == 0, "%s", out);
  write_png(in, 3, 16, 32);
  st = test_run_cli(out, sizeof out, "deblur --model %s/reg --image %s -o %s", tmp, in, res);
  ck_assert_msg(st == 0 && strstr(out, "1 NFE"), "%s", out);
}
END_TEST

/* Mean PSNR (dB, images in [-1, 1]) of n images of d values against the sharp ones. */
static double mean_psnr(const float *a, const float *sharp, int n, size_t d) {
  double sum = 0;
  for (int k = 0; k < n; k++) {
    double se = 0;
    for (size_t i = 0; i < d; i++) {
      const double v = a[k * d + i] < -1 ? -1 : a[k * d + i] > 1 ? 1 : a[k * d + i];
      se += (v - sharp[k * d + i]) * (v - sharp[k * d + i]);
    }
    sum += 10.0 * log10(4.0 / (se / (double)d));
  }
  return sum / n;
}

/* The shipped deblurring models on eight in-domain pairs of make_pairs.py
 * (tests/fixtures/deblur_pairs), through 'denoised deblur' as a user runs it: the regression
 * baseline comes closer to the sharp images than the blurry input (PSNR), the icDPMs (guided
 * or not), whose samples trade PSNR for sharp strokes (bench/deblur_eval.py measures their
 * character accuracy), stay within 5 dB of the input. The first icDPM shipped failed this by 12 dB:
 * an epsilon-prediction model whose x0 blows up at high noise (tools/deblur/x0_by_noise.py). */
START_TEST(shipped_models_restore) {
  static const char *const models[] = {"models/deblur-icdpm", "models/deblur-reg",
                                       "models/deblur-guided"};
  static const double margin[] = {-5.0, 0.5, -5.0}; /* dB over the blurry input's PSNR */
  char sharp_p[1024], blurry_p[1024], dir[1024], tmp[512], path[1200], out[16384];
  test_src_path(sharp_p, sizeof sharp_p, "tests/fixtures/deblur_pairs/sharp.npy");
  test_src_path(blurry_p, sizeof blurry_p, "tests/fixtures/deblur_pairs/blurry.npy");
  test_tmpdir(tmp, sizeof tmp);
  snprintf(path, sizeof path, "%s/restored.npy", tmp);
  npy_array sharp = {0}, blurry = {0};
  err e = {0};
  ck_assert_int_eq(npy_read_f32(sharp_p, &sharp, &e), 0);
  ck_assert_int_eq(npy_read_f32(blurry_p, &blurry, &e), 0);
  const int n = (int)sharp.shape[0];
  const size_t d = (size_t)(sharp.count / n);
  const double base = mean_psnr(blurry.data, sharp.data, n, d);
  for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
    test_src_path(dir, sizeof dir, models[i]);
    int st = test_run_cli(out, sizeof out,
                          "deblur --model %s --image %s --steps 20 --threads 2 --quiet --out %s",
                          dir, blurry_p, path);
    ck_assert_msg(st == 0, "%s: %s", models[i], out);
    npy_array r = {0};
    ck_assert_int_eq(npy_read_f32(path, &r, &e), 0);
    ck_assert(r.count == sharp.count);
    const double psnr = mean_psnr(r.data, sharp.data, n, d);
    ck_assert_msg(psnr > base + margin[i], "%s: %.2f dB, the blurry input %.2f dB", models[i], psnr,
                  base);
    npy_array_free(&r);
  }
  npy_array_free(&sharp);
  npy_array_free(&blurry);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("cond_unet");
  TCase *tc = tcase_create("cond_unet");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, forward_matches_reference);
  tcase_add_test(tc, gradients_match_reference);
  tcase_add_test(tc, refusals);
  tcase_add_test(tc, sampler_passes_the_condition);
  tcase_add_test(tc, training_steps);
  tcase_add_test(tc, train_cli);
  tcase_add_test(tc, deblur_cli);
  tcase_add_test(tc, shipped_models_restore);
  suite_add_tcase(s, tc);
  return s;
}
