/* `denoised train vae` (engine/train/vae_train.c): a short training of a tiny AutoencoderKL on
 * synthetic images lowers the loss, the folder it writes loads back (config.json's
 * scaling_factor is 1 / the latents' std, recomputed here), the weights do not depend on the
 * thread count, and bad settings are refused before training. */
#include <math.h>
#include <string.h>

#include <jansson.h>

#include "npy.h"
#include "testutil.h"
#include "vae.h"
#include "vae_train.h"

#define N_IMG 24
#define SIDE 8

static const char config[] =
    "{\"_class_name\": \"AutoencoderKL\", \"block_out_channels\": [8, 8], "
    "\"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"], "
    "\"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"], \"layers_per_block\": 1, "
    "\"norm_num_groups\": 4, \"latent_channels\": 2, \"sample_size\": 8}";

/* Coloured bars and blocks: something a tiny VAE can learn in a few dozen steps. */
static void write_data(const char *dir) {
  static float x[N_IMG * 3 * SIDE * SIDE];
  for (int i = 0; i < N_IMG; i++)
    for (int c = 0; c < 3; c++)
      for (int y = 0; y < SIDE; y++)
        for (int k = 0; k < SIDE; k++) {
          const int on = i % 2 ? (y + i) % 4 < 2 : (k + i) % 3 == 0;
          x[((i * 3 + c) * SIDE + y) * SIDE + k] = on ? 0.8f - 0.3f * c : -0.6f + 0.1f * (i % 5);
        }
  char path[600];
  const int64_t shape[4] = {N_IMG, 3, SIDE, SIDE};
  err e = {0};
  snprintf(path, sizeof path, "%s/x.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, x, 4, shape, &e), ERR_OK);
  snprintf(path, sizeof path, "%s/config.json", dir);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(config, f);
  fclose(f);
}

static void train(const char *dir, const char *out, int threads) {
  char buf[8192];
  int st = test_run_cli(buf, sizeof buf,
                        "train vae --model-config %s/config.json --data %s/x.npy --steps 40 "
                        "--batch 6 --lr 3e-3 --lr-schedule constant --recon mse --kl-weight 1e-4 "
                        "--scale-images 16 --threads %d --out %s/%s --quiet",
                        dir, dir, threads, dir, out);
  ck_assert_msg(st == 0, "%s", buf);
}

static double mean_loss(const char *path, int from, int to) {
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  char line[512];
  double s = 0;
  int n = 0, k = 0;
  while (fgets(line, sizeof line, f)) {
    k++;
    if (k < from || k > to)
      continue;
    json_error_t je;
    json_t *j = json_loads(line, 0, &je);
    ck_assert_ptr_nonnull(j);
    s += json_real_value(json_object_get(j, "loss"));
    n++;
    json_decref(j);
  }
  fclose(f);
  ck_assert_int_eq(n, to - from + 1);
  return s / n;
}

START_TEST(training_lowers_the_loss_and_round_trips) {
  char dir[64], path[600];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  write_data(dir);
  train(dir, "a", 2);
  snprintf(path, sizeof path, "%s/a/loss.jsonl", dir);
  const double first = mean_loss(path, 1, 5), last = mean_loss(path, 36, 40);
  printf("train vae: loss %.4g (steps 1-5) -> %.4g (steps 36-40)\n", first, last);
  ck_assert_msg(last < 0.5 * first, "loss %g -> %g", first, last);
  /* the folder loads, and its scaling factor is 1 / std of the latents of the first images */
  snprintf(path, sizeof path, "%s/a", dir);
  vae *v = NULL;
  err e = {0};
  ck_assert_msg(vae_load(path, &v, &e) == ERR_OK, "%s", e.msg);
  npy_array x;
  snprintf(path, sizeof path, "%s/x.npy", dir);
  ck_assert_int_eq(npy_read_f32(path, &x, &e), ERR_OK);
  double sd = 0;
  ck_assert_int_eq(vae_latent_std(v, x.data, 16, SIDE, SIDE, 0, 1, &sd, &e), ERR_OK);
  const double sf = vae_get_info(v)->scaling_factor;
  ck_assert_msg(fabs(sf * sd - 1.0) < 1e-6, "scaling_factor %g, 1/std %g", sf, 1.0 / sd);
  float *mean = malloc(sizeof(float) * N_IMG * 2 * 4 * 4), *rec = malloc(x.count * sizeof(float));
  ck_assert_int_eq(vae_encode(v, x.data, N_IMG, SIDE, SIDE, mean, NULL, 1, &e), ERR_OK);
  ck_assert_int_eq(vae_decode(v, mean, N_IMG, 4, 4, VAE_TILE_OFF, rec, 1, &e), ERR_OK);
  const double err_rec = test_rel_l2(rec, x.data, (size_t)x.count);
  printf("train vae: reconstruction rel L2 %.3f\n", err_rec);
  ck_assert(err_rec < 1.0);
  free(mean), free(rec);
  npy_array_free(&x);
  vae_free(v);
  /* the same weights on one thread */
  train(dir, "b", 1);
  char pa[700], pb[700];
  snprintf(pa, sizeof pa, "%s/a/diffusion_pytorch_model.safetensors", dir);
  snprintf(pb, sizeof pb, "%s/b/diffusion_pytorch_model.safetensors", dir);
  ck_assert(test_files_equal(pa, pb));
  snprintf(path, sizeof path, "rm -rf %s", dir);
  ck_assert_int_eq(system(path), 0);
}
END_TEST

START_TEST(bad_settings_are_refused) {
  char dir[64], buf[8192];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  write_data(dir);
  int st = test_run_cli(buf, sizeof buf,
                        "train vae --model-config %s/config.json --data %s/x.npy --steps 2 "
                        "--batch 2 --recon lpips --out %s/o",
                        dir, dir, dir);
  ck_assert_int_eq(st, 2);
  ck_assert_msg(strstr(buf, "--recon 'lpips'"), "%s", buf);
  st = test_run_cli(buf, sizeof buf, "train vae --data %s/x.npy --steps 2 --batch 2 --out %s/o",
                    dir, dir);
  ck_assert_int_eq(st, 2);
  ck_assert_msg(strstr(buf, "--model-config"), "%s", buf);
  st = test_run_cli(buf, sizeof buf,
                    "train vae --model-config %s/config.json --data %s/config.json --steps 2 "
                    "--batch 2 --out %s/o",
                    dir, dir, dir);
  ck_assert_int_eq(st, 1);
  ck_assert_msg(strstr(buf, "config.json"), "%s", buf);
  vae_train_config c = {.recon = VAE_RECON_L1,
                        .kl_weight = -1,
                        .lr = 1e-3,
                        .total_steps = 1,
                        .adamw = {0.5, 0.9, 1e-8, 0},
                        .threads = 1};
  json_error_t je;
  json_t *cfg = json_loads(config, 0, &je);
  vae *v = NULL;
  vae_trainer *t = NULL;
  err e = {0};
  ck_assert_int_eq(vae_init(cfg, 1, &v, &e), ERR_OK);
  ck_assert_int_eq(vae_trainer_new(v, &c, &t, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "KL weight"));
  vae_free(v);
  json_decref(cfg);
  snprintf(buf, sizeof buf, "rm -rf %s", dir);
  ck_assert_int_eq(system(buf), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("train_vae");
  TCase *tc = tcase_create("train_vae");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, training_lowers_the_loss_and_round_trips);
  tcase_add_test(tc, bad_settings_are_refused);
  suite_add_tcase(s, tc);
  return s;
}
