/* AutoencoderKL: parity with diffusers (tools/gen_vae_fixtures.py: encode mean/std, decode,
 * tiled decode, in float64) on the committed fixtures, determinism over threads, posterior
 * samples from the seed, the CLI, and clear refusals of bad input. */
#include <math.h>
#include <string.h>

#include "npy.h"
#include "testfx.h"
#include "testutil.h"
#include "vae.h"

static const char *const fixtures[] = {"two_level", "three_level", "groups32_f16"};

#define FX "vae"

START_TEST(parity_with_diffusers) {
  for (size_t f = 0; f < sizeof fixtures / sizeof *fixtures; f++) {
    const char *fx = fixtures[f];
    vae *v = test_fx_vae(FX "/%s", fx);
    const vae_info *vi = vae_get_info(v);
    npy_array x, mean, std, z, dec;
    test_fx_read_f32(&x, FX "/%s/%s", fx, "input.npy");
    test_fx_read_f32(&mean, FX "/%s/%s", fx, "mean.npy");
    test_fx_read_f32(&std, FX "/%s/%s", fx, "std.npy");
    test_fx_read_f32(&z, FX "/%s/%s", fx, "latents.npy");
    test_fx_read_f32(&dec, FX "/%s/%s", fx, "decoded.npy");
    const int n = (int)x.shape[0], h = (int)x.shape[2], w = (int)x.shape[3];
    float *m = malloc((size_t)mean.count * sizeof *m), *s = malloc((size_t)std.count * sizeof *s);
    float *d = malloc((size_t)dec.count * sizeof *d);
    err e = {0};
    ck_assert_msg(vae_encode(v, x.data, n, h, w, m, s, 2, &e) == ERR_OK, "%s", e.msg);
    const double em = test_rel_l2(m, mean.data, (size_t)mean.count);
    const double es = test_rel_l2(s, std.data, (size_t)std.count);
    ck_assert_msg(em < 1e-4 && es < 1e-4, "%s encode: mean %g, std %g", fx, em, es);
    const int zh = (int)z.shape[2], zw = (int)z.shape[3];
    ck_assert_int_eq(zh * vi->factor, (int)dec.shape[2]);
    ck_assert_msg(vae_decode(v, z.data, (int)z.shape[0], zh, zw, VAE_TILE_OFF, d, 2, &e) == ERR_OK,
                  "%s", e.msg);
    const double ed = test_rel_l2(d, dec.data, (size_t)dec.count);
    ck_assert_msg(ed < 1e-4, "%s decode: %g", fx, ed);
    printf("vae parity %s: mean %.2e std %.2e decode %.2e\n", fx, em, es, ed);
    /* one thread gives the same bits */
    float *d1 = malloc((size_t)dec.count * sizeof *d1);
    ck_assert_int_eq(vae_decode(v, z.data, (int)z.shape[0], zh, zw, VAE_TILE_OFF, d1, 1, &e),
                     ERR_OK);
    ck_assert(memcmp(d, d1, (size_t)dec.count * sizeof *d) == 0);
    free(d1);
    free(m);
    free(s);
    free(d);
    npy_array_free(&x);
    npy_array_free(&mean);
    npy_array_free(&std);
    npy_array_free(&z);
    npy_array_free(&dec);
    vae_free(v);
  }
}
END_TEST

START_TEST(tiled_decode_matches_diffusers) {
  vae *v = test_fx_vae(FX "/"
                          "two_level");
  npy_array z, dec;
  test_fx_read_f32(&z, FX "/two_level/latents_tiled.npy");
  test_fx_read_f32(&dec, FX "/two_level/decoded_tiled.npy");
  float *d = malloc((size_t)dec.count * sizeof *d);
  err e = {0};
  int used = 0;
  ck_assert_int_eq(vae_decode_tiling(v, (int)z.shape[2], (int)z.shape[3], 4, &used, &e), ERR_OK);
  ck_assert_int_eq(used, 4);
  ck_assert_msg(vae_decode(v, z.data, (int)z.shape[0], (int)z.shape[2], (int)z.shape[3], 4, d, 2,
                           &e) == ERR_OK,
                "%s", e.msg);
  const double ed = test_rel_l2(d, dec.data, (size_t)dec.count);
  ck_assert_msg(ed < 1e-4, "tiled decode: %g", ed);
  ck_assert_int_eq(vae_decode_tiling(v, 8, 8, 6, &used, &e), ERR_INVALID); /* not a multiple of 4 */
  free(d);
  npy_array_free(&z);
  npy_array_free(&dec);
  vae_free(v);
}
END_TEST

/* diffusers' tiled_encode: tiles of tile*factor pixels overlapping by a quarter, the moments
 * blended over a quarter latent tile (gen_vae_fixtures.py --tile). */
START_TEST(tiled_encode_matches_diffusers) {
  static const struct {
    const char *fx;
    int tile;
  } cases[] = {{"two_level", 4}, {"three_level", 8}};
  const char *fx = cases[_i].fx;
  const int tile = cases[_i].tile;
  vae *v = test_fx_vae(FX "/%s", fx);
  npy_array x, mean, std;
  test_fx_read_f32(&x, FX "/%s/%s", fx, "input_tiled.npy");
  test_fx_read_f32(&mean, FX "/%s/%s", fx, "mean_tiled.npy");
  test_fx_read_f32(&std, FX "/%s/%s", fx, "std_tiled.npy");
  const int h = (int)x.shape[2], w = (int)x.shape[3];
  float *m = malloc((size_t)mean.count * sizeof *m), *s = malloc((size_t)std.count * sizeof *s);
  err e = {0};
  int used = 0;
  ck_assert_int_eq(vae_encode_tiling(v, h, w, tile, &used, &e), ERR_OK);
  ck_assert_int_eq(used, tile);
  ck_assert_msg(vae_encode_tiled(v, x.data, 1, h, w, tile, m, s, 2, &e) == ERR_OK, "%s", e.msg);
  const double em = test_rel_l2(m, mean.data, (size_t)mean.count);
  const double es = test_rel_l2(s, std.data, (size_t)std.count);
  printf("tiled encode %s (%dx%d, tile %d): mean %.2e std %.2e\n", fx, h, w, tile, em, es);
  ck_assert_msg(em < 1e-4 && es < 1e-4, "%s tiled encode: mean %g, std %g", fx, em, es);
  /* whole, the result differs (the tiles do not see each other) */
  ck_assert_int_eq(vae_encode_tiled(v, x.data, 1, h, w, VAE_TILE_OFF, m, s, 2, &e), ERR_OK);
  ck_assert(test_rel_l2(m, mean.data, (size_t)mean.count) > 1e-3);
  ck_assert_int_eq(vae_encode_tiling(v, h, w, 6, &used, &e), ERR_INVALID);
  ck_assert_int_eq(vae_encode_tiling(v, h + 1, w, 4, &used, &e), ERR_INVALID);
  free(m), free(s);
  npy_array_free(&x);
  npy_array_free(&mean);
  npy_array_free(&std);
  vae_free(v);
}
END_TEST

START_TEST(samples_follow_the_seed) {
  const float mean[4] = {0, 1, 2, 3}, std[4] = {1, 1, 0.5f, 0};
  float a[4], b[4], c[4];
  vae_sample(mean, std, 2, 2, 7, a);
  vae_sample(mean, std, 2, 2, 7, b);
  vae_sample(mean, std, 2, 2, 8, c);
  ck_assert(memcmp(a, b, sizeof a) == 0);
  ck_assert(memcmp(a, c, sizeof a) != 0);
  ck_assert(a[3] == 3.0f); /* std 0: the mean */
}
END_TEST

START_TEST(bad_input_is_refused) {
  vae *v = test_fx_vae(FX "/"
                          "two_level");
  const vae_info *vi = vae_get_info(v);
  float x[3 * 6 * 6] = {0}, out[4 * 6 * 6];
  err e = {0};
  /* sides not multiples of the factor */
  if (vi->factor > 1) {
    ck_assert_int_eq(vae_encode(v, x, 1, 3, 3, out, NULL, 1, &e), ERR_INVALID);
  }
  x[5] = NAN;
  ck_assert_int_ne(vae_encode(v, x, 1, 4, 4, out, NULL, 1, &e), ERR_OK);
  float z[4 * 2 * 2] = {0};
  z[1] = INFINITY;
  float img[3 * 8 * 8];
  ck_assert_int_ne(vae_decode(v, z, 1, 2, 2, VAE_TILE_OFF, img, 1, &e), ERR_OK);
  vae_free(v);
  vae *none = NULL;
  ck_assert_int_ne(vae_load("/nonexistent-vae", &none, &e), ERR_OK);
  ck_assert_ptr_null(none);
}
END_TEST

START_TEST(cli_round_trip) {
  char dir[64], model[512], out[4096];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_fx_path(model, sizeof model, FX "/two_level");
  int st = test_run_cli(out, sizeof out,
                        "vae decode --model %s --input %s/latents.npy --out %s/d.npy --tile off",
                        model, model, dir);
  ck_assert_msg(st == 0, "%s", out);
  char p[256];
  snprintf(p, sizeof p, "%s/d.npy", dir);
  npy_array got, ref;
  err e = {0};
  ck_assert_int_eq(npy_read_f32(p, &got, &e), ERR_OK);
  test_fx_read_f32(&ref, FX "/two_level/decoded.npy");
  ck_assert(test_rel_l2(got.data, ref.data, (size_t)ref.count) < 1e-4);
  /* images as latents: a clear error naming the channels */
  st = test_run_cli(out, sizeof out, "vae decode --model %s --input %s/input.npy --out %s/x.npy",
                    model, model, dir);
  ck_assert_int_ne(st, 0);
  ck_assert_ptr_nonnull(strstr(out, "channels"));
  st = test_run_cli(out, sizeof out, "vae info --model %s", model);
  ck_assert_msg(st == 0 && strstr(out, "scaling"), "%s", out);
  npy_array_free(&got);
  npy_array_free(&ref);
  snprintf(p, sizeof p, "rm -rf %s", dir);
  ck_assert_int_eq(system(p), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("vae");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, parity_with_diffusers);
  tcase_add_test(tc, tiled_decode_matches_diffusers);
  tcase_add_loop_test(tc, tiled_encode_matches_diffusers, 0, 2);
  tcase_add_test(tc, samples_follow_the_seed);
  tcase_add_test(tc, bad_input_is_refused);
  tcase_add_test(tc, cli_round_trip);
  suite_add_tcase(s, tc);
  return s;
}
