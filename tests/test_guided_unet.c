/* The icDPM with multiscale structure guidance (issue 18, the third deblurring model): its
 * forward, auxiliary guide loss and gradients against the PyTorch reference of
 * tools/deblur/cond_unet.py (GuidedUNet; fixtures by tools/deblur/gen_cond_fixtures.py),
 * central differences of the whole loss along guidance tensors, a training step that lowers the
 * guide loss, `denoised train` and `denoised deblur` with such a model, and the refusals of bad
 * guidance configs and of a guidance loss for a model without guidance. */
#include <math.h>
#include <string.h>

#include "model.h"
#include "npy.h"
#include "schedule.h"
#include "testfx.h"
#include "testutil.h"
#include "train.h"

#define GUIDE_WEIGHT 0.7f /* gen_cond_fixtures.py GUIDE_WEIGHT */

#define FX "guided_unet"

static int param_index(const model *m, const char *name) {
  for (int i = 0; i < model_param_count(m); i++)
    if (strcmp(model_param_at(m, i)->name, name) == 0)
      return i;
  ck_abort_msg("no parameter %s", name);
  return -1;
}

/* The fixture's inputs. */
typedef struct batch {
  npy_array x, c, sharp, t, g;
} batch;

static void read_batch(batch *b) {
  test_fx_read_f32(&b->x, FX "/input.npy"), test_fx_read_f32(&b->c, FX "/cond.npy"),
      test_fx_read_f32(&b->sharp, FX "/sharp.npy");
  test_fx_read_f32(&b->t, FX "/timesteps.npy"), test_fx_read_f32(&b->g, FX "/grad_out.npy");
}

static void free_batch(batch *b) {
  npy_array_free(&b->x), npy_array_free(&b->c), npy_array_free(&b->sharp);
  npy_array_free(&b->t), npy_array_free(&b->g);
}

static model_call call_of(const batch *b, int threads) {
  model_call c = {.x = b->x.data, .n = 2, .h = 16, .w = 16, .t = b->t.data, .threads = threads};
  c.cond = b->c.data;
  return c;
}

START_TEST(forward_matches_reference) {
  model *m = test_fx_model(FX);
  const model_info *mi = model_get_info(m);
  ck_assert_int_eq(mi->guide_scales, 2);
  ck_assert_int_eq(mi->cond_channels, 3);
  batch b;
  read_batch(&b);
  npy_array ref;
  test_fx_read_f32(&ref, FX "/output.npy");
  float *out = malloc(ref.count * sizeof *out);
  model_call call = call_of(&b, 2);
  err e = {0};
  ck_assert_msg(model_run(m, &call, out, &e) == 0, "%s", e.msg);
  const double rel = test_rel_l2(out, ref.data, ref.count);
  printf("guided unet forward rel L2 %.3g\n", rel);
  ck_assert_msg(rel < 1e-5, "relative L2 %g", rel);
  /* the guidance matters: without its projections into the encoder the output differs */
  float *plain = malloc(ref.count * sizeof *plain);
  for (int i = 0; i < model_param_count(m); i++)
    if (strstr(model_param_at(m, i)->name, ".guide_proj."))
      memset(model_param_at(m, i)->data, 0, model_param_at(m, i)->count * sizeof(float));
  ck_assert_int_eq(model_repack(m, &e), 0);
  ck_assert_int_eq(model_run(m, &call, plain, &e), 0);
  ck_assert(test_rel_l2(plain, out, ref.count) > 1e-3);
  free(plain);
  free(out);
  npy_array_free(&ref);
  free_batch(&b);
  model_free(m);
}
END_TEST

/* L = sum(G * out) + 0.7 * guide loss: the loss and the gradients of x, conv_in and every kind of
 * guidance tensor against PyTorch's autograd (float64). */
START_TEST(gradients_match_reference) {
  static const char *const names[] = {"conv_in.weight",
                                      "guide.1.conv_in.weight",
                                      "guide.1.resnet.conv2.weight",
                                      "guide.1.conv_out.weight",
                                      "guide.2.resnet.norm1.weight",
                                      "guide.2.conv_out.bias",
                                      "down_blocks.1.resnets.0.guide_proj.weight",
                                      "down_blocks.2.resnets.0.guide_proj.weight"};
  model *m = test_fx_model(FX);
  batch b;
  read_batch(&b);
  npy_array gx, aux_ref;
  test_fx_read_f32(&gx, FX "/grad_input.npy"), test_fx_read_f32(&aux_ref, FX "/guide_loss.npy");
  model_grads *pg = NULL;
  err e = {0};
  ck_assert_int_eq(model_grads_new(m, &pg, &e), 0);
  float *dx = malloc(b.x.count * sizeof *dx);
  double aux = -1;
  const model_call call = call_of(&b, 2);
  const model_grad_call gc = {.grad_out = b.g.data,
                              .grad_x = dx,
                              .params = pg,
                              .guide_target = b.sharp.data,
                              .guide_weight = GUIDE_WEIGHT,
                              .guide_loss = &aux};
  ck_assert_msg(model_backward(m, &call, &gc, &e) == 0, "%s", e.msg);
  const double rel_aux = fabs(aux - aux_ref.data[0]) / fabs(aux_ref.data[0]);
  const double rel_x = test_rel_l2(dx, gx.data, gx.count);
  printf("guided unet: guide loss %.6f (reference %.6f), grad x rel L2 %.3g\n", aux,
         aux_ref.data[0], rel_x);
  ck_assert_msg(rel_aux < 1e-5, "guide loss %g, reference %g", aux, aux_ref.data[0]);
  ck_assert_msg(rel_x < 1e-4, "grad x: relative L2 %g", rel_x);
  for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
    char file[128];
    snprintf(file, sizeof file, "grad_%s.npy", names[i]);
    for (char *p = file + 5; *p && strcmp(p, ".npy"); p++)
      *p = *p == '.' ? '_' : *p;
    npy_array ref;
    test_fx_read_f32(&ref, FX "/%s", file);
    const int k = param_index(m, names[i]);
    ck_assert_int_eq(ref.count, model_param_at(m, k)->count);
    const double r = test_rel_l2(model_grads_at(pg, k), ref.data, ref.count);
    printf("  %s rel L2 %.3g\n", names[i], r);
    ck_assert_msg(r < 1e-4, "%s: relative L2 %g", names[i], r);
    npy_array_free(&ref);
  }
  /* bit-identical on one thread */
  model_grads *one = NULL;
  ck_assert_int_eq(model_grads_new(m, &one, &e), 0);
  model_grad_call g1 = gc;
  const model_call c1 = call_of(&b, 1);
  g1.params = one;
  g1.grad_x = NULL;
  ck_assert_int_eq(model_backward(m, &c1, &g1, &e), 0);
  for (int i = 0; i < model_param_count(m); i++)
    ck_assert(memcmp(model_grads_at(one, i), model_grads_at(pg, i),
                     model_param_at(m, i)->count * sizeof(float)) == 0);
  model_grads_free(one);
  model_grads_free(pg);
  free(dx);
  npy_array_free(&gx), npy_array_free(&aux_ref);
  free_batch(&b);
  model_free(m);
}
END_TEST

/* L(theta) = sum(G * out) + 0.7 * guide loss, through model_backward's forward. */
static double total_loss(model *m, const batch *b, float *out) {
  err e = {0};
  double aux = 0;
  const model_call call = call_of(b, 2);
  const model_grad_call gc = {.grad_out = b->g.data,
                              .out = out,
                              .guide_target = b->sharp.data,
                              .guide_weight = GUIDE_WEIGHT,
                              .guide_loss = &aux};
  ck_assert_msg(model_backward(m, &call, &gc, &e) == 0, "%s", e.msg);
  double s = aux;
  for (int64_t i = 0; i < b->g.count; i++)
    s += (double)b->g.data[i] * out[i];
  return s;
}

/* Central differences of the whole loss along single guidance weights (the head, the guide's
 * resnet and a projection into the encoder) match the backward's gradient. */
START_TEST(finite_differences) {
  static const struct {
    const char *name;
    size_t index;
  } probes[] = {{"guide.2.conv_out.bias", 0},
                {"guide.1.resnet.conv1.weight", 37},
                {"down_blocks.2.resnets.0.guide_proj.weight", 11},
                {"guide.1.conv_in.bias", 3}};
  model *m = test_fx_model(FX);
  batch b;
  read_batch(&b);
  model_grads *pg = NULL;
  err e = {0};
  ck_assert_int_eq(model_grads_new(m, &pg, &e), 0);
  const model_call call = call_of(&b, 2);
  const model_grad_call gc = {.grad_out = b.g.data,
                              .params = pg,
                              .guide_target = b.sharp.data,
                              .guide_weight = GUIDE_WEIGHT};
  ck_assert_int_eq(model_backward(m, &call, &gc, &e), 0);
  float *out = malloc(b.g.count * sizeof *out);
  for (size_t i = 0; i < sizeof probes / sizeof *probes; i++) {
    const int k = param_index(m, probes[i].name);
    float *w = model_param_at(m, k)->data + probes[i].index;
    const float w0 = *w, h = 1e-2f;
    *w = w0 + h;
    ck_assert_int_eq(model_repack(m, &e), 0);
    const double up = total_loss(m, &b, out);
    *w = w0 - h;
    ck_assert_int_eq(model_repack(m, &e), 0);
    const double down = total_loss(m, &b, out);
    *w = w0;
    ck_assert_int_eq(model_repack(m, &e), 0);
    const double fd = (up - down) / (2.0 * h), an = model_grads_at(pg, k)[probes[i].index];
    printf("guided unet fd %s[%zu]: %.6g, backward %.6g\n", probes[i].name, probes[i].index, fd,
           an);
    ck_assert_msg(fabs(fd - an) <= 1e-2 * fabs(an) + 1e-3, "%s: fd %g, backward %g", probes[i].name,
                  fd, an);
  }
  free(out);
  model_grads_free(pg);
  free_batch(&b);
  model_free(m);
}
END_TEST

/* Training steps on one batch with the guidance loss: its part of the loss falls; without the
 * weight it is not computed. */
START_TEST(training_lowers_the_guide_loss) {
  batch b;
  read_batch(&b);
  sched_config sc;
  err e = {0};
  ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
  model *m = test_fx_model(FX);
  train_config tc = {.prediction = SCHED_PRED_V,
                     .lr_kind = TRAIN_LR_CONSTANT,
                     .lr = 2e-3,
                     .total_steps = 40,
                     .adamw = {0.9, 0.999, 1e-8, 0.0},
                     .seed = 3,
                     .threads = 2,
                     .guide_weight = 1.0};
  trainer *t = NULL;
  ck_assert_msg(trainer_new(m, &sc, &tc, &t, &e) == 0, "%s", e.msg);
  train_step_info info;
  double first = 0;
  for (int s = 0; s < 40; s++) {
    ck_assert_msg(trainer_step_cond(t, b.sharp.data, b.c.data, NULL, 2, 16, 16, &info, &e) == 0,
                  "%s", e.msg);
    ck_assert(info.guide_loss > 0 && info.loss > info.guide_loss);
    if (s == 0)
      first = info.guide_loss;
  }
  printf("guide loss %.5f -> %.5f in 40 steps\n", first, info.guide_loss);
  ck_assert_msg(info.guide_loss < 0.5 * first, "guide loss %g -> %g", first, info.guide_loss);
  trainer_free(t);
  tc.guide_weight = 0;
  ck_assert_int_eq(trainer_new(m, &sc, &tc, &t, &e), 0);
  ck_assert_int_eq(trainer_step_cond(t, b.sharp.data, b.c.data, NULL, 2, 16, 16, &info, &e), 0);
  ck_assert(info.guide_loss == 0);
  trainer_free(t);
  model_free(m);
  sched_config_free(&sc);
  free_batch(&b);
}
END_TEST

/* A config.json in a fresh folder: the guided fixture's with `extra` keys replacing its own. */
static int init_with(const char *extra, err *e) {
  char tmp[512], path[1024];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(path, sizeof path, "%s/config.json", tmp);
  FILE *f = fopen(path, "w");
  fprintf(f,
          "{\"_class_name\": \"UNet2DModel\", \"in_channels\": 6, \"out_channels\": 3, "
          "\"block_out_channels\": [8, 8, 8], \"norm_num_groups\": 4, \"layers_per_block\": 1, "
          "\"down_block_types\": [\"DownBlock2D\", \"DownBlock2D\", \"DownBlock2D\"], "
          "\"up_block_types\": [\"UpBlock2D\", \"UpBlock2D\", \"UpBlock2D\"], %s}",
          extra);
  fclose(f);
  model *m = NULL;
  int rc = model_init(path, 1, &m, e);
  model_free(m);
  return rc;
}

START_TEST(refusals) {
  static const struct {
    const char *config, *says;
  } bad[] = {
      {"\"_cond_channels\": 3, \"_guide_scales\": [3]", "_guide_scales'[0]"},
      {"\"_cond_channels\": 3, \"_guide_scales\": [2, 1]", "increasing"},
      {"\"_cond_channels\": 3, \"_guide_scales\": []", "list of 1 to 3"},
      {"\"_cond_channels\": 3, \"_guide_scales\": [1, 2, 0, 1]", "list of 1 to 3"},
      {"\"_cond_channels\": 3, \"_guide_scales\": 1", "list of 1 to 3"},
      {"\"_cond_channels\": 3, \"_guide_scales\": [1], \"_guide_channels\": 6",
       "divisible by norm_num_groups"},
      {"\"_cond_channels\": 3, \"_guide_channels\": 8", "without '_guide_scales'"},
      {"\"_cond_channels\": 2, \"_guide_scales\": [1]", "'_cond_channels' 1 or 3"},
      {"\"_guide_scales\": [1]", "'_cond_channels' 1 or 3"},
  };
  err e = {0};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    ck_assert_msg(init_with(bad[i].config, &e) == ERR_INVALID, "%s accepted", bad[i].config);
    ck_assert_msg(strstr(e.msg, bad[i].says), "%s: %s", bad[i].config, e.msg);
  }
  ck_assert_msg(init_with("\"_cond_channels\": 3, \"_guide_scales\": [0, 2]", &e) == 0, "%s",
                e.msg);
  /* a guidance target or weight for a model without guidance */
  char dir[1024];
  model *m = NULL;
  ck_assert_int_eq(model_load(test_src_path(dir, sizeof dir, "tests/fixtures/cond_unet"), &m, &e),
                   0);
  ck_assert_int_eq(model_get_info(m)->guide_scales, 0);
  batch b;
  read_batch(&b);
  const model_call call = call_of(&b, 1);
  const model_grad_call gc = {
      .grad_out = b.g.data, .guide_target = b.sharp.data, .guide_weight = 1};
  ck_assert_int_eq(model_backward(m, &call, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "without structure guidance"));
  sched_config sc;
  ck_assert_int_eq(sched_config_init(&sc, NULL, &e), 0);
  train_config tc = {.prediction = SCHED_PRED_V,
                     .lr_kind = TRAIN_LR_CONSTANT,
                     .total_steps = 1,
                     .adamw = {0.9, 0.999, 1e-8, 0.0},
                     .threads = 1,
                     .guide_weight = 1.0};
  trainer *t = NULL;
  ck_assert_int_eq(trainer_new(m, &sc, &tc, &t, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "without structure guidance"));
  model_free(m);
  m = test_fx_model(FX);
  tc.guide_weight = -1;
  ck_assert_int_eq(trainer_new(m, &sc, &tc, &t, &e), ERR_INVALID);
  model_free(m);
  sched_config_free(&sc);
  free_batch(&b);
}
END_TEST

static int has(const char *path, const char *text) {
  FILE *f = fopen(path, "r");
  if (!f)
    return 0;
  static char buf[1 << 16];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = 0;
  fclose(f);
  return strstr(buf, text) != NULL;
}

/* `denoised train` of a guided model (the guide loss logged, the weight in the recipe, a model
 * card that says what the model is and keeps absolute paths out), `denoised deblur` with it, and
 * --guide-weight refused for a model without guidance. */
START_TEST(train_and_deblur_cli) {
  char dir[1024], tmp[512], out[16384], path[1200];
  test_fx_path(dir, sizeof dir, FX "/");
  test_tmpdir(tmp, sizeof tmp);
  int st = test_run_cli(out, sizeof out,
                        "train --model-config %s/config.json --data %s/sharp.npy --cond "
                        "%s/cond.npy --steps 2 --batch 2 --guide-weight 0.5 --prediction-type "
                        "v_prediction --quiet --out %s/g",
                        dir, dir, dir, tmp);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(path, sizeof path, "%s/g/config.json", tmp);
  ck_assert(has(path, "\"_guide_scales\""));
  snprintf(path, sizeof path, "%s/g/loss.jsonl", tmp);
  ck_assert(has(path, "\"guide\": "));
  snprintf(path, sizeof path, "%s/g/README.md", tmp);
  ck_assert_msg(has(path, "--guide-weight 0.5"), "the model card's command lacks the weight");
  ck_assert_msg(has(path, "image-conditioned") && has(path, "structure guidance"),
                "the model card does not say what the model is");
  ck_assert_msg(!has(path, "unconditional"), "a guided icDPM called unconditional");
  ck_assert_msg(!has(path, dir), "the model card shows the data's absolute folder");
  ck_assert_msg(has(path, "guided_unet//sharp.npy: 2 images"), "the model card lacks the data");
  snprintf(path, sizeof path, "%s/g/sharp.npy", tmp);
  st = test_run_cli(out, sizeof out, "deblur --model %s/g --image %s/cond.npy --steps 2 --out %s",
                    tmp, dir, path);
  ck_assert_msg(st == 0, "%s", out);
  npy_array a = {0};
  err e = {0};
  ck_assert_int_eq(npy_read_f32(path, &a, &e), 0);
  ck_assert_int_eq(npy_check_finite(&a, "out", &e), 0);
  npy_array_free(&a);
  /* the default weight is recorded; an unguided model refuses the flag */
  st = test_run_cli(out, sizeof out,
                    "train --model-config %s/config.json --data %s/sharp.npy --cond %s/cond.npy "
                    "--steps 1 --batch 2 --quiet --out %s/d",
                    dir, dir, dir, tmp);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(path, sizeof path, "%s/d/README.md", tmp);
  ck_assert(has(path, "--guide-weight 1"));
  char plain[1024];
  test_src_path(plain, sizeof plain, "tests/fixtures/cond_unet");
  ck_assert_int_ne(test_run_cli(out, sizeof out,
                                "train --model-config %s/config.json --data %s/sharp.npy --cond "
                                "%s/cond.npy --steps 1 --batch 2 --guide-weight 1 --out %s/x",
                                plain, dir, dir, tmp),
                   0);
  ck_assert_msg(strstr(out, "--guide-weight") && strstr(out, "no structure guidance"), "%s", out);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("guided_unet");
  TCase *tc = tcase_create("guided_unet");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, forward_matches_reference);
  tcase_add_test(tc, gradients_match_reference);
  tcase_add_test(tc, finite_differences);
  tcase_add_test(tc, training_lowers_the_guide_loss);
  tcase_add_test(tc, refusals);
  tcase_add_test(tc, train_and_deblur_cli);
  suite_add_tcase(s, tc);
  return s;
}
