/* `denoised train` of a text-to-image model (UNet2DConditionModel + CLIP text encoder on a
 * frozen VAE's latents), end to end with the tiny pipeline fixture's VAE, tokenizer and text
 * encoder (tests/fixtures/sd_pipeline/tiny): a fresh small UNet and text encoder learn two
 * captioned flat colours (16x16 images, 8x8 latents) and the folder written is a pipeline that
 * `denoised sample --prompt` takes; --init fine-tunes the whole fixture pipeline, whose text
 * encoder then changes (or is kept, frozen); bad captions or settings are refused before
 * anything is written. */
#include <sys/stat.h>

#include "model.h"
#include "npy.h"
#include "safetensors.h"
#include "testutil.h"

#define N_IMAGES 8

static char dir[256], tiny[1024];
static char out[16384];

/* Flat red and blue images of side `side` into dir/name, captioned so in c.txt. */
static void flat_images(const char *name, int side) {
  const int plane = side * side;
  float *x = malloc(sizeof(float) * N_IMAGES * 3 * plane);
  for (int i = 0; i < N_IMAGES; i++)
    for (int c = 0; c < 3; c++)
      for (int k = 0; k < plane; k++)
        x[(i * 3 + c) * plane + k] = (i % 2 ? c == 2 : c == 0) ? 0.8f : -0.6f;
  char path[512];
  err e = {0};
  const int64_t shape[4] = {N_IMAGES, 3, side, side};
  snprintf(path, sizeof path, "%s/%s", dir, name);
  ck_assert_int_eq(npy_write_f32(path, x, 4, shape, &e), 0);
  free(x);
}

static void setup(void) {
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_src_path(tiny, sizeof tiny, "tests/fixtures/sd_pipeline/tiny");
  flat_images("x.npy", 16);   /* the small UNet's 8x8 latents */
  flat_images("x32.npy", 32); /* the fixture pipeline's 16x16 */
  char path[512];
  snprintf(path, sizeof path, "%s/c.txt", dir);
  FILE *f = fopen(path, "w");
  for (int i = 0; i < N_IMAGES; i++)
    fprintf(f, "%s\n", i % 2 ? "a blue square" : "a red square");
  fclose(f);
  snprintf(path, sizeof path, "%s/unet.json", dir);
  f = fopen(path, "w");
  fputs("{\"_class_name\": \"UNet2DConditionModel\", \"sample_size\": 8, \"in_channels\": 4, "
        "\"out_channels\": 4, \"block_out_channels\": [8, 16], \"layers_per_block\": 1, "
        "\"norm_num_groups\": 4, \"down_block_types\": [\"CrossAttnDownBlock2D\", "
        "\"DownBlock2D\"], \"up_block_types\": [\"UpBlock2D\", \"CrossAttnUpBlock2D\"], "
        "\"attention_head_dim\": 2, \"cross_attention_dim\": 32}\n",
        f);
  fclose(f);
}

static void teardown(void) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}

/* Mean loss of steps [a, b] of a loss.jsonl. */
static double mean_loss(const char *path, long a, long b) {
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  char line[512];
  double sum = 0, loss;
  long n = 0, step;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "{\"step\": %ld, \"loss\": %lf", &step, &loss) == 2 && step >= a && step <= b)
      sum += loss, n++;
  fclose(f);
  ck_assert_int_eq(n, b - a + 1);
  return sum / n;
}

/* Tensor `name` of the safetensors file `path` (count floats, malloc'ed). */
static float *tensor(const char *path, const char *name, size_t *count) {
  st_file *st = NULL;
  err e = {0};
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  const st_tensor_info *ti = st_find(st, name);
  ck_assert_msg(ti != NULL, "%s: no %s", path, name);
  *count = 1;
  for (int i = 0; i < ti->ndim; i++)
    *count *= (size_t)ti->shape[i];
  float *v = malloc(*count * sizeof *v);
  ck_assert_msg(st_read_f32(st, name, ti->ndim, ti->shape, v, &e) == 0, "%s", e.msg);
  st_close(st);
  return v;
}

/* Whether OUT's text encoder kept the fixture's token embedding. */
static int text_encoder_kept(const char *outdir) {
  char a[1200], b[1200];
  const char *name = "text_model.embeddings.token_embedding.weight";
  snprintf(a, sizeof a, "%s/text_encoder/model.safetensors", tiny);
  snprintf(b, sizeof b, "%s/text_encoder/model.safetensors", outdir);
  size_t na, nb;
  float *va = tensor(a, name, &na), *vb = tensor(b, name, &nb);
  ck_assert_uint_eq(na, nb);
  int same = memcmp(va, vb, na * sizeof *va) == 0;
  free(va), free(vb);
  return same;
}

/* The fresh model's flags: the small UNet, a fresh text encoder, the fixture's VAE and
 * tokenizer. */
static int train_fresh(const char *extra) {
  return test_run_cli(out, sizeof out,
                      "train --model-config %s/unet.json --text-encoder-config "
                      "%s/text_encoder/config.json --tokenizer %s/tokenizer --vae %s/vae --data "
                      "%s/x.npy --captions %s/c.txt --batch 4 --seed 1 --quiet %s",
                      dir, tiny, tiny, tiny, dir, dir, extra);
}

START_TEST(loss_falls_and_pipeline_samples) {
  char path[600], extra[600];
  snprintf(extra, sizeof extra,
           "--steps 50 --lr 3e-3 --warmup 5 --caption-dropout 0.2 --ema 0.99 --out %s/m", dir);
  int rc = train_fresh(extra);
  ck_assert_msg(rc == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "trained 50 steps"));
  snprintf(path, sizeof path, "%s/m/loss.jsonl", dir);
  const double first = mean_loss(path, 1, 10), last = mean_loss(path, 41, 50);
  printf("text-to-image loss: first 10 steps %.4f, last 10 %.4f\n", first, last);
  ck_assert_msg(last < 0.75 * first, "loss %.4f -> %.4f", first, last);
  static const char *const files[] = {"model_index.json",
                                      "unet/config.json",
                                      "unet/diffusion_pytorch_model.safetensors",
                                      "text_encoder/config.json",
                                      "text_encoder/model.safetensors",
                                      "tokenizer/vocab.json",
                                      "tokenizer/merges.txt",
                                      "tokenizer/tokenizer_config.json",
                                      "vae/config.json",
                                      "vae/diffusion_pytorch_model.safetensors",
                                      "scheduler/scheduler_config.json",
                                      "README.md",
                                      "loss.png",
                                      "checkpoint/state.json"};
  struct stat sb;
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(path, sizeof path, "%s/m/%s", dir, files[i]);
    ck_assert_msg(stat(path, &sb) == 0 && sb.st_size > 0, "%s missing", path);
  }
  snprintf(path, sizeof path, "%s/m", dir);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(path, &m, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(model_get_info(m)->cross_attention_dim, 32);
  ck_assert_ptr_nonnull(model_latent(m));
  model_free(m);
  rc = test_run_cli(out, sizeof out,
                    "sample --model %s/m --prompt \"a blue square\" --steps 4 --quiet --out "
                    "%s/s.npy",
                    dir, dir);
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(path, sizeof path, "%s/s.npy", dir);
  npy_array a;
  ck_assert_int_eq(npy_read_f32(path, &a, &e), 0);
  ck_assert_int_eq(a.shape[1], 3);
  ck_assert_int_eq(a.shape[2], 16);
  npy_array_free(&a);
}
END_TEST

/* --init takes every part from a pipeline and trains its text encoder; a frozen one is written
 * back unchanged. */
START_TEST(init_and_frozen) {
  char path[600];
  int rc = test_run_cli(out, sizeof out,
                        "train --init %s --data %s/x32.npy --captions %s/c.txt --steps 2 "
                        "--batch 2 --lr 1e-2 --quiet --out %s/ft",
                        tiny, dir, dir, dir);
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(path, sizeof path, "%s/ft", dir);
  ck_assert(!text_encoder_kept(path));
  rc = test_run_cli(out, sizeof out,
                    "train --init %s --vae %s --data %s/x32.npy --captions %s/c.txt "
                    "--freeze-text-encoder --steps 2 --batch 2 --lr 1e-2 --quiet --out "
                    "%s/frozen",
                    tiny, tiny, dir, dir, dir);
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(path, sizeof path, "%s/frozen", dir);
  ck_assert(text_encoder_kept(path));
}
END_TEST

/* Whether files a and b hold the same bytes. */
static int same_file(const char *a, const char *b) {
  FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
  ck_assert_msg(fa && fb, "%s or %s missing", a, b);
  int ca, cb, same = 1;
  do {
    ca = fgetc(fa), cb = fgetc(fb);
    same = ca == cb;
  } while (same && ca != EOF);
  fclose(fa), fclose(fb);
  return same;
}

/* The latents cached before the first step (the default) train exactly as encoding every step's
 * batch (--encode-every-step, diffusers' way): same losses, same weights, bit for bit. The images
 * are all different and the batch (3) divides neither the data (8) nor the cache's chunk, so an
 * encoder whose result depended on the batch it sits in would show. */
START_TEST(cached_latents_train_as_per_step_encoding) {
  float *x = malloc(sizeof(float) * N_IMAGES * 3 * 16 * 16);
  uint32_t s = 12345;
  for (int i = 0; i < N_IMAGES * 3 * 16 * 16; i++) {
    s = s * 1664525u + 1013904223u;
    x[i] = (float)(s >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
  }
  char path[600], a[700], b[700], extra[700];
  err e = {0};
  const int64_t shape[4] = {N_IMAGES, 3, 16, 16};
  snprintf(path, sizeof path, "%s/xr.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, x, 4, shape, &e), 0);
  free(x);
  for (int every = 0; every < 2; every++) {
    snprintf(extra, sizeof extra, "--steps 4 --lr 1e-3 --caption-dropout 0.3 --out %s/%s %s", dir,
             every ? "every" : "cached", every ? "--encode-every-step" : "");
    int rc = test_run_cli(out, sizeof out,
                          "train --model-config %s/unet.json --text-encoder-config "
                          "%s/text_encoder/config.json --tokenizer %s/tokenizer --vae %s/vae "
                          "--data %s/xr.npy --captions %s/c.txt --batch 3 --seed 2 --quiet %s",
                          dir, tiny, tiny, tiny, dir, dir, extra);
    ck_assert_msg(rc == 0, "%s", out);
  }
  static const char *const files[] = {"loss.jsonl", "unet/diffusion_pytorch_model.safetensors",
                                      "text_encoder/model.safetensors"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(a, sizeof a, "%s/cached/%s", dir, files[i]);
    snprintf(b, sizeof b, "%s/every/%s", dir, files[i]);
    ck_assert_msg(same_file(a, b), "%s differs between cached and per-step latents", files[i]);
  }
  /* the flag goes with text-to-image training only */
  char cfg[1024];
  test_src_path(cfg, sizeof cfg, "tests/fixtures/train/model/config.json");
  int rc = test_run_cli(out, sizeof out,
                        "train --model-config %s --data %s/x.npy --encode-every-step --steps 2 "
                        "--batch 2 --out %s/bad",
                        cfg, dir, dir);
  ck_assert_int_eq(rc, 2);
  ck_assert_msg(strstr(out, "--encode-every-step go with --captions"), "%s", out);
}
END_TEST

START_TEST(refusals) {
  char path[600];
  struct stat sb;
  /* one caption short */
  snprintf(path, sizeof path, "%s/short.txt", dir);
  FILE *f = fopen(path, "w");
  for (int i = 0; i < N_IMAGES - 1; i++)
    fputs("a red square\n", f);
  fclose(f);
  int rc = test_run_cli(out, sizeof out,
                        "train --init %s --data %s/x32.npy --captions %s --steps 2 --batch 2 "
                        "--quiet --out %s/bad",
                        tiny, dir, path, dir);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "7 captions for 8 images"), "%s", out);
  /* a text-conditional model without captions */
  rc = test_run_cli(out, sizeof out,
                    "train --init %s --data %s/x32.npy --steps 2 --batch 2 --quiet --out %s/bad",
                    tiny, dir, dir);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "--captions"), "%s", out);
  /* a fresh UNet without its VAE */
  rc = test_run_cli(out, sizeof out,
                    "train --model-config %s/unet.json --text-encoder %s/text_encoder --data "
                    "%s/x.npy --captions %s/c.txt --steps 2 --batch 2 --quiet --out %s/bad",
                    dir, tiny, dir, dir, dir);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "--vae"), "%s", out);
  /* images of the latents' size, not the VAE's */
  rc = test_run_cli(out, sizeof out,
                    "train --init %s --data %s/x.npy --captions %s/c.txt --steps 2 --batch 2 "
                    "--quiet --out %s/bad",
                    tiny, dir, dir, dir);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "the model takes 32x32"), "%s", out);
  /* captions for a model without text conditioning */
  char cfg[1024];
  test_src_path(cfg, sizeof cfg, "tests/fixtures/train/model/config.json");
  rc = test_run_cli(out, sizeof out,
                    "train --model-config %s --data %s/x.npy --captions %s/c.txt --steps 2 "
                    "--batch 2 --quiet --out %s/bad",
                    cfg, dir, dir, dir);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "not text-conditional"), "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "train --model-config %s --data %s/x.npy --caption-dropout 0.1 --steps 2 "
                    "--batch 2 --out %s/bad",
                    cfg, dir, dir);
  ck_assert_int_eq(rc, 2);
  snprintf(path, sizeof path, "%s/bad", dir);
  ck_assert_int_ne(stat(path, &sb), 0); /* nothing written */
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("train_text");
  TCase *tc = tcase_create("train_text");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 900);
  tcase_add_test(tc, loss_falls_and_pipeline_samples);
  tcase_add_test(tc, init_and_frozen);
  tcase_add_test(tc, cached_latents_train_as_per_step_encoding);
  tcase_add_test(tc, refusals);
  suite_add_tcase(s, tc);
  return s;
}
