/* Text to image on a Stable-Diffusion pipeline folder (tests/fixtures/sd_pipeline/tiny, made by
 * tools/gen_sd_pipeline_fixture.py from the repo's UNet2DConditionModel, AutoencoderKL and CLIP
 * fixtures): `denoised sample --prompt` matches diffusers' own txt2img loop (DDIM, guidance 7.5,
 * float64 reference) on the same initial latents; the PNG carries A1111's prompt lines and
 * replays to the same pixels; what the model cannot take is refused with a usage error. */
#include <unistd.h>

#include "npy.h"
#include "testutil.h"

#define FIXTURE "tests/fixtures/sd_pipeline/tiny"

typedef struct scratch {
  char dir[64], model[512];
} scratch;

static void scratch_open(scratch *s) {
  ck_assert_ptr_nonnull(test_tmpdir(s->dir, sizeof s->dir));
  test_src_path(s->model, sizeof s->model, FIXTURE);
}

static void scratch_close(scratch *s) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", s->dir);
  ck_assert_int_eq(system(cmd), 0);
}

START_TEST(txt2img_matches_diffusers) {
  scratch s;
  scratch_open(&s);
  char out[8192];
  int st = test_run_cli(out, sizeof out,
                        "sample --model %s --prompt 'a photo of a cat' --noise %s/noise.npy "
                        "--scheduler ddim --steps 6 --guidance-scale 7.5 --out %s/x.npy --quiet",
                        s.model, s.model, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  char p[600];
  npy_array got, ref;
  err e = {0};
  snprintf(p, sizeof p, "%s/x.npy", s.dir);
  ck_assert_int_eq(npy_read_f32(p, &got, &e), ERR_OK);
  snprintf(p, sizeof p, "%s/images.npy", s.model);
  ck_assert_int_eq(npy_read_f32(p, &ref, &e), ERR_OK);
  ck_assert_int_eq(got.count, ref.count);
  const double rel = test_rel_l2(got.data, ref.data, (size_t)ref.count);
  printf("sd pipeline txt2img vs diffusers: relative L2 %.2e\n", rel);
  ck_assert_msg(rel < 1e-4, "relative L2 %g", rel);
  /* another prompt makes another picture */
  st = test_run_cli(out, sizeof out,
                    "sample --model %s --prompt 'a dog' --noise %s/noise.npy --scheduler ddim "
                    "--steps 6 --guidance-scale 7.5 --out %s/y.npy --quiet",
                    s.model, s.model, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  npy_array other;
  snprintf(p, sizeof p, "%s/y.npy", s.dir);
  ck_assert_int_eq(npy_read_f32(p, &other, &e), ERR_OK);
  ck_assert(test_rel_l2(other.data, ref.data, (size_t)ref.count) > 1e-3);
  npy_array_free(&got);
  npy_array_free(&ref);
  npy_array_free(&other);
  scratch_close(&s);
}
END_TEST

START_TEST(png_records_the_prompt_and_replays) {
  scratch s;
  scratch_open(&s);
  char out[8192];
  int st = test_run_cli(out, sizeof out,
                        "sample --model %s --prompt 'a photo of a cat' --negative-prompt blurry "
                        "--clip-skip 2 --seed 3 --scheduler dpm++2m --steps 5 -o %s/a.png --quiet",
                        s.model, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  char cmd[1400];
  snprintf(cmd, sizeof cmd, "grep -c 'Negative prompt: blurry' %s/a.png > /dev/null", s.dir);
  ck_assert_msg(system(cmd) == 0, "no A1111 negative-prompt line in the PNG");
  st = test_run_cli(out, sizeof out, "sample --replay %s/a.png --model %s -o %s/b.png --quiet",
                    s.dir, s.model, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(cmd, sizeof cmd, "cmp -s %s/a.png %s/b.png", s.dir, s.dir);
  ck_assert_msg(system(cmd) == 0, "the replay differs");
  scratch_close(&s);
}
END_TEST

START_TEST(refusals) {
  scratch s;
  scratch_open(&s);
  char out[8192];
  /* no prompt */
  int st = test_run_cli(out, sizeof out, "sample --model %s -o %s/a.png", s.model, s.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "--prompt"));
  /* a size that is not a multiple of the VAE's factor */
  st = test_run_cli(out, sizeof out, "sample --model %s --prompt cat --size 31 -o %s/a.png",
                    s.model, s.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "multiple"));
  /* invalid UTF-8 in the prompt */
  st =
      test_run_cli(out, sizeof out, "sample --model %s --prompt \"$(printf 'a\\377')\" -o %s/a.png",
                   s.model, s.dir);
  ck_assert_int_ne(st, 0);
  ck_assert_ptr_nonnull(strstr(out, "UTF-8"));
  /* a picture to edit must be there (img2img and inpainting: tests/test_sd_edit.c) */
  st = test_run_cli(out, sizeof out,
                    "sample --model %s --prompt cat --init-image %s/a.png -o %s/b.png", s.model,
                    s.dir, s.dir);
  ck_assert_int_ne(st, 0);
  ck_assert_ptr_nonnull(strstr(out, "a.png"));
  /* a prompt for a model that takes none */
  st = test_run_cli(out, sizeof out, "sample --prompt cat -o %s/a.png", s.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "takes no prompt"));
  scratch_close(&s);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("sd_pipeline");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 180);
  tcase_add_test(tc, txt2img_matches_diffusers);
  tcase_add_test(tc, png_records_the_prompt_and_replays);
  tcase_add_test(tc, refusals);
  suite_add_tcase(s, tc);
  return s;
}
