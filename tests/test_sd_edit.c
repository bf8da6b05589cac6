/* Edit jobs on a Stable-Diffusion pipeline folder (tests/fixtures/sd_pipeline/tiny), on a
 * non-square picture (32 x 48 pixels, 16 x 24 latents): img2img and inpainting against
 * diffusers' own StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline loops
 * (tests/fixtures/sd_pipeline/edit, tools/gen_sd_edit_fixture.py, float64 reference, the same
 * posterior noise); edit-friendly DDPM inversion through the VAE gives its latents back exactly
 * with the source prompt, and the paper's text edit (target prompt, T_skip) changes the picture
 * the more the fewer steps it skips; what latent models cannot do is refused. */
#include <math.h>
#include <unistd.h>

#include "invert.h"
#include "latent.h"
#include "model.h"
#include "npy.h"
#include "pipeline.h"
#include "testutil.h"

#define PIPE "tests/fixtures/sd_pipeline/tiny"
#define EDIT "tests/fixtures/sd_pipeline/edit"
#define H 32
#define W 48

typedef struct scratch {
  char dir[64], model[512], fx[512];
} scratch;

static void scratch_open(scratch *s) {
  ck_assert_ptr_nonnull(test_tmpdir(s->dir, sizeof s->dir));
  test_src_path(s->model, sizeof s->model, PIPE);
  test_src_path(s->fx, sizeof s->fx, EDIT);
}

static void scratch_close(scratch *s) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", s->dir);
  ck_assert_int_eq(system(cmd), 0);
}

static void read_npy(const char *dir, const char *name, npy_array *a) {
  char p[700];
  err e = {0};
  snprintf(p, sizeof p, "%s/%s", dir, name);
  ck_assert_msg(npy_read_f32(p, a, &e) == ERR_OK, "%s", e.msg);
}

/* `sample` with the fixture's init image, noise and seed (and flags), against ref.npy */
static double run_against(scratch *s, const char *flags, const char *ref, const char *label) {
  char out[8192];
  int st = test_run_cli(out, sizeof out,
                        "sample --model %s --prompt 'a photo of a cat' --init-image %s/image.npy "
                        "--seed 11 --noise %s/noise.npy --scheduler ddim --steps 6 "
                        "--guidance-scale 7.5 --size %dx%d %s --out %s/x.npy --quiet",
                        s->model, s->fx, s->fx, W, H, flags, s->dir);
  ck_assert_msg(st == 0, "%s", out);
  npy_array got, want;
  read_npy(s->dir, "x.npy", &got);
  read_npy(s->fx, ref, &want);
  ck_assert_int_eq(got.ndim, 4);
  ck_assert_int_eq(got.shape[2], H);
  ck_assert_int_eq(got.shape[3], W);
  ck_assert_int_eq(got.count, want.count);
  const double rel = test_rel_l2(got.data, want.data, (size_t)want.count);
  printf("sd %s vs diffusers: relative L2 %.2e\n", label, rel);
  npy_array_free(&got);
  npy_array_free(&want);
  return rel;
}

START_TEST(img2img_matches_diffusers) {
  scratch s;
  scratch_open(&s);
  double rel = run_against(&s, "--strength 0.6", "img2img.npy", "img2img (strength 0.6)");
  ck_assert_msg(rel < 1e-4, "relative L2 %g", rel);
  /* the posterior sample is drawn from the seed: another seed, another start */
  char out[8192];
  int st = test_run_cli(out, sizeof out,
                        "sample --model %s --prompt 'a photo of a cat' --init-image %s/image.npy "
                        "--seed 12 --noise %s/noise.npy --scheduler ddim --steps 6 "
                        "--guidance-scale 7.5 --size %dx%d --strength 0.6 --out %s/y.npy --quiet",
                        s.model, s.fx, s.fx, W, H, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  npy_array other, want;
  read_npy(s.dir, "y.npy", &other);
  read_npy(s.fx, "img2img.npy", &want);
  ck_assert(test_rel_l2(other.data, want.data, (size_t)want.count) > 1e-3);
  npy_array_free(&other);
  npy_array_free(&want);
  scratch_close(&s);
}
END_TEST

START_TEST(inpaint_matches_diffusers) {
  scratch s;
  scratch_open(&s);
  char flags[700];
  snprintf(flags, sizeof flags, "--mask %s/mask.npy --strength 0.75", s.fx);
  double rel = run_against(&s, flags, "inpaint.npy", "inpaint (strength 0.75)");
  ck_assert_msg(rel < 1e-4, "relative L2 %g", rel);
  snprintf(flags, sizeof flags, "--mask %s/mask.npy", s.fx); /* strength 1: pure noise */
  rel = run_against(&s, flags, "inpaint_full.npy", "inpaint (strength 1)");
  ck_assert_msg(rel < 1e-4, "relative L2 %g", rel);
  scratch_close(&s);
}
END_TEST

/* The pipeline entry the daemon calls: an edit-friendly inversion of the encoded picture with
 * the source prompt, sampled back with it, gives the posterior mean's latents back (checked
 * through the decoder, which is deterministic: the same latents decode to the same floats). */
START_TEST(ddpm_inversion_reconstructs_latents) {
  char dir[512];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(dir, sizeof dir, PIPE), &m, &e) == ERR_OK, "%s", e.msg);
  const latent_parts *lp = model_latent(m);
  ck_assert_ptr_nonnull(lp);
  const latent_info *li = latent_get_info(lp);
  char fx[512];
  npy_array img;
  read_npy(test_src_path(fx, sizeof fx, EDIT), "image.npy", &img);
  const int f = li->factor;
  const size_t nz = (size_t)li->latent_channels * (H / f) * (W / f);
  float *z0 = malloc(nz * sizeof *z0), *ref = malloc((size_t)3 * H * W * sizeof *ref);
  ck_assert_int_eq(latent_encode(lp, img.data, 1, H / f, W / f, NULL, z0, 1, &e), ERR_OK);
  ck_assert_int_eq(latent_decode(lp, z0, 1, H / f, W / f, ref, 1, &e), ERR_OK);
  guidance g = guidance_for(m, 3.5);
  pipeline_request r = {.kind = PIPELINE_INVERT_DDPM,
                        .solver = {.name = "ddim", .steps = 8},
                        .batch = 1,
                        .height = H,
                        .width = W,
                        .seed = 4,
                        .prompt = "a photo of a cat",
                        .image = img.data,
                        .images = 1,
                        .invert = {.source_guidance = &g, .invert_only = 1}};
  pipeline_result inv = {0}, back = {0}, edit = {0};
  ck_assert_msg(pipeline_run(m, &r, NULL, &inv, &e) == ERR_OK, "%s", e.msg);
  npy_array maps;
  ck_assert_int_eq(npy_parse_f32(inv.noise, inv.noise_len, "maps", &maps, &e), ERR_OK);
  ck_assert_int_eq(maps.ndim, 5);
  ck_assert_int_eq(maps.shape[2], li->latent_channels);
  ck_assert_int_eq(maps.shape[3], H / f);
  ck_assert_int_eq(maps.shape[4], W / f);
  /* back with the source prompt (a daemon job: prompt = target, source_prompt = the source) */
  pipeline_request rb = r;
  rb.image = NULL;
  rb.images = 0;
  rb.noise = maps.data;
  rb.prompt = "a dog";
  rb.guidance = &g;
  rb.invert.source_prompt = "a photo of a cat";
  rb.invert.invert_only = 0;
  rb.invert.skip = 7; /* all steps but the last with the source prompt */
  ck_assert_msg(pipeline_run(m, &rb, NULL, &back, &e) == ERR_OK, "%s", e.msg);
  rb.prompt = "a photo of a cat";
  rb.invert.skip = 0;
  pipeline_result same = {0};
  ck_assert_msg(pipeline_run(m, &rb, NULL, &same, &e) == ERR_OK, "%s", e.msg);
  const size_t n = (size_t)3 * H * W;
  double mx = 0;
  for (size_t i = 0; i < n; i++)
    mx = fmax(mx, fabs((double)same.images[i] - ref[i]));
  printf("sd ddpm inversion (source prompt, guidance 3.5, 8 steps): max abs error %.2e against "
         "the decoded posterior mean; with the target prompt on the last step %.2e\n",
         mx, test_rel_l2(back.images, ref, n));
  ck_assert_msg(mx < 1e-5, "reconstruction max abs error %g", mx);
  /* the latents themselves, through the edit room with the prompt's states: the chain ends on
   * the posterior mean to float rounding */
  const size_t per = (size_t)li->seq_len * li->text_dim;
  float *cond = malloc(per * sizeof *cond), *uncond = malloc(per * sizeof *uncond);
  float *zmaps = malloc(9 * nz * sizeof *zmaps), *zback = malloc(nz * sizeof *zback);
  ck_assert_int_eq(latent_encode_prompt(lp, "a photo of a cat", 1, cond, NULL, 1, &e), ERR_OK);
  ck_assert_int_eq(latent_encode_prompt(lp, "", 1, uncond, NULL, 1, &e), ERR_OK);
  guidance gt = g;
  gt.uncond_states = uncond;
  gt.seq_len = li->seq_len;
  sampler *sm = NULL;
  ck_assert_int_eq(invert_ddpm_sampler(model_scheduler_config(m), NULL, 8, &sm, &e), ERR_OK);
  invert_opts io = {.batch = 1,
                    .height = H / f,
                    .width = W / f,
                    .guidance = &gt,
                    .text_states = cond,
                    .text_seq = li->seq_len,
                    .seed = 4};
  ck_assert_msg(invert_ddpm(sm, m, &io, z0, zmaps, NULL, &e) == ERR_OK, "%s", e.msg);
  invert_sample_opts so = {.src_text_states = cond, .src_guidance = &gt};
  ck_assert_msg(invert_ddpm_sample(sm, m, &io, &so, zmaps, zback, NULL, &e) == ERR_OK, "%s", e.msg);
  double zmx = 0, zabs = 0;
  for (size_t i = 0; i < nz; i++) {
    zmx = fmax(zmx, fabs((double)zback[i] - z0[i]));
    zabs = fmax(zabs, fabs((double)z0[i]));
  }
  printf("sd ddpm inversion latents: max abs error %.2e (latents up to %.2f)\n", zmx, zabs);
  ck_assert_msg(zmx < 1e-6 * fmax(1.0, zabs), "latent max abs error %g", zmx);
  sampler_free(sm);
  free(cond);
  free(uncond);
  free(zmaps);
  free(zback);
  /* the target prompt from the start changes the picture */
  rb.prompt = "a dog";
  ck_assert_msg(pipeline_run(m, &rb, NULL, &edit, &e) == ERR_OK, "%s", e.msg);
  ck_assert(test_rel_l2(edit.images, ref, n) > 1e-2);
  npy_array_free(&maps);
  npy_array_free(&img);
  pipeline_result_clear(&inv);
  pipeline_result_clear(&back);
  pipeline_result_clear(&same);
  pipeline_result_clear(&edit);
  free(z0);
  free(ref);
  model_free(m);
}
END_TEST

static double rel_files(const char *dir, const char *a, const char *b) {
  npy_array x, y;
  read_npy(dir, a, &x);
  read_npy(dir, b, &y);
  ck_assert_int_eq(x.count, y.count);
  const double r = test_rel_l2(x.data, y.data, (size_t)y.count);
  npy_array_free(&x);
  npy_array_free(&y);
  return r;
}

/* `edit --replay DIR/NAME -o DIR/again.png` writes the very same PNG */
static void replays_the_same(const char *dir, const char *name) {
  char out[8192], a[700], b[700];
  int st =
      test_run_cli(out, sizeof out, "edit --replay %s/%s -o %s/again.png --quiet", dir, name, dir);
  ck_assert_msg(st == 0, "%s", out);
  snprintf(a, sizeof a, "%s/%s", dir, name);
  snprintf(b, sizeof b, "%s/again.png", dir);
  ck_assert(test_files_equal(a, b));
}

/* The CLI: invert --prompt (verify prints the reconstruction against the VAE's round trip),
 * edit --prompt with T_skip; a larger skip keeps more of the input; replays. */
START_TEST(cli_text_edit) {
  scratch s;
  scratch_open(&s);
  char out[8192];
  int st = test_run_cli(out, sizeof out,
                        "invert --model %s --prompt 'a photo of a cat' --method ddpm --image "
                        "%s/image.npy --size %dx%d --steps 6 --out %s/n.npy --verify --quiet",
                        s.model, s.fx, W, H, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  const char *rec = strstr(out, "rel L2 ");
  ck_assert_ptr_nonnull(rec);
  ck_assert_msg(atof(rec + 7) < 1e-4, "%s", out);
  st = test_run_cli(out, sizeof out,
                    "edit --model %s --noise %s/n.npy --guidance-scale 3.5 --out %s/rec.npy "
                    "--quiet",
                    s.model, s.dir, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  const int skips[2] = {0, 4};
  for (int k = 0; k < 2; k++) {
    st = test_run_cli(out, sizeof out,
                      "edit --model %s --noise %s/n.npy --prompt 'a dog' --skip %d "
                      "--out %s/dog%d.npy -o %s/dog%d.png --quiet",
                      s.model, s.dir, skips[k], s.dir, k, s.dir, k);
    ck_assert_msg(st == 0, "%s", out);
  }
  const double d0 = rel_files(s.dir, "dog0.npy", "rec.npy");
  const double d4 = rel_files(s.dir, "dog1.npy", "rec.npy");
  printf("sd text edit: change against the reconstruction %.3f at skip 0, %.3f at skip 4 of 6\n",
         d0, d4);
  ck_assert(d0 > 1e-2);
  ck_assert(d4 > 1e-4 && d4 < d0);
  replays_the_same(s.dir, "dog1.png");
  /* a shift by whole latents runs; half a latent, a colour offset are refused */
  st = test_run_cli(out, sizeof out,
                    "edit --model %s --noise %s/n.npy --shift 4,-2 --out %s/s.npy --quiet", s.model,
                    s.dir, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  st = test_run_cli(out, sizeof out,
                    "edit --model %s --noise %s/n.npy --shift 3,0 --out %s/s.npy --quiet", s.model,
                    s.dir, s.dir);
  ck_assert_int_ne(st, 0);
  ck_assert_ptr_nonnull(strstr(out, "whole latents"));
  st = test_run_cli(out, sizeof out,
                    "edit --model %s --noise %s/n.npy --colour 0.2,0,0 --out %s/s.npy --quiet",
                    s.model, s.dir, s.dir);
  ck_assert_int_ne(st, 0);
  ck_assert_ptr_nonnull(strstr(out, "latents"));
  scratch_close(&s);
}
END_TEST

/* BoundaryDiffusion on latents: a boundary fitted on encoded pictures (x_t and the UNet's
 * h-space at the mixing step, non-square), an inverted picture moved across it; the move changes
 * the picture and the PNG replays. Labelled pictures: the fixture's picture and its negative. */
START_TEST(boundary_on_latents) {
  scratch s;
  scratch_open(&s);
  npy_array img;
  read_npy(s.fx, "image.npy", &img);
  const size_t d = (size_t)3 * H * W;
  float *x = malloc(8 * d * sizeof *x);
  for (int i = 0; i < 8; i++)
    for (size_t k = 0; k < d; k++) /* +-0.8 picture plus a small deterministic ripple */
      x[i * d + k] = (i % 2 ? 0.8f : -0.8f) * img.data[k] + 0.05f * sinf((float)(k * (i + 3)));
  char p[700], out[8192];
  err e = {0};
  const int64_t shape[4] = {8, 3, H, W}, one[4] = {1, 3, H, W};
  snprintf(p, sizeof p, "%s/x.npy", s.dir);
  ck_assert_int_eq(npy_write_f32(p, x, 4, shape, &e), ERR_OK);
  snprintf(p, sizeof p, "%s/one.npy", s.dir);
  ck_assert_int_eq(npy_write_f32(p, x + d, 4, one, &e), ERR_OK);
  snprintf(p, sizeof p, "%s/labels.txt", s.dir);
  FILE *f = fopen(p, "w");
  ck_assert_ptr_nonnull(f);
  for (int i = 0; i < 8; i++)
    fprintf(f, "%d\n", i % 2);
  fclose(f);
  int st = test_run_cli(out, sizeof out,
                        "boundary fit --model %s --prompt 'a photo of a cat' --guidance-scale 3 "
                        "--images %s/x.npy --labels %s/labels.txt --size %dx%d --steps 6 --step 2 "
                        "--out %s/b.json --quiet",
                        s.model, s.dir, s.dir, W, H, s.dir);
  ck_assert_msg(st == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "h-space boundary"));
  const double strengths[2] = {0, 3};
  for (int k = 0; k < 2; k++) {
    st = test_run_cli(out, sizeof out,
                      "edit --model %s --boundary %s/b.json --strength %g --image %s/one.npy "
                      "--prompt 'a photo of a cat' --guidance-scale 3 --out %s/e%d.npy -o "
                      "%s/e%d.png --quiet",
                      s.model, s.dir, strengths[k], s.dir, s.dir, k, s.dir, k);
    ck_assert_msg(st == 0, "%s", out);
  }
  const double moved = rel_files(s.dir, "e1.npy", "e0.npy");
  printf("sd boundary edit: strength 3 changes the picture by %.3f (relative L2)\n", moved);
  ck_assert(moved > 1e-2);
  replays_the_same(s.dir, "e1.png");
  /* without the prompt it is refused */
  st = test_run_cli(out, sizeof out,
                    "edit --model %s --boundary %s/b.json --strength 1 --seed 1 -o %s/n.png",
                    s.model, s.dir, s.dir);
  ck_assert_int_eq(st, 2);
  free(x);
  npy_array_free(&img);
  scratch_close(&s);
}
END_TEST

START_TEST(refusals) {
  scratch s;
  scratch_open(&s);
  char out[8192];
  /* a mask of another size than the picture */
  int st = test_run_cli(out, sizeof out,
                        "sample --model %s --prompt cat --init-image %s/image.npy --mask "
                        "%s/mask.npy --size 32 -o %s/a.png --quiet",
                        s.model, s.fx, s.fx, s.dir);
  ck_assert_int_ne(st, 0);
  /* a size that is not a multiple of the VAE's factor */
  st = test_run_cli(out, sizeof out, "sample --model %s --prompt cat --size 48x31 -o %s/a.png",
                    s.model, s.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "multiple"));
  /* an inversion without the source prompt */
  st = test_run_cli(out, sizeof out,
                    "invert --model %s --method ddim --image %s/image.npy --size 48x32 --out "
                    "%s/n.npy",
                    s.model, s.fx, s.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "--prompt"));
  /* classifier guidance reads pixels */
  st = test_run_cli(out, sizeof out,
                    "sample --model %s --prompt cat --classifier x --classifier-target 1 -o "
                    "%s/a.png",
                    s.model, s.dir);
  ck_assert_int_eq(st, 2);
  scratch_close(&s);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("sd_edit");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, img2img_matches_diffusers);
  tcase_add_test(tc, inpaint_matches_diffusers);
  tcase_add_test(tc, ddpm_inversion_reconstructs_latents);
  tcase_add_test(tc, cli_text_edit);
  tcase_add_test(tc, boundary_on_latents);
  tcase_add_test(tc, refusals);
  suite_add_tcase(s, tc);
  return s;
}
