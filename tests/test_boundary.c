/* BoundaryDiffusion on the analytic mixture: the linear SVM, the automatic mixing step, fitting
 * at that step from generated latents, one-step edits across the boundary (generated and
 * inverted images), the boundary file and its validation. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "boundary.h"
#include "edit.h"
#include "guidance.h"
#include "model.h"
#include "rng.h"
#include "safetensors.h"
#include "sampler.h"
#include "testutil.h"

enum { D = 192 };

static model *load_gmm(const char *name) {
  char rel[256], path[512];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s", name);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s: %s", name,
                e.msg);
  return m;
}

/* mix3's component means, to label samples by their nearest component */
static void load_means(float means[3][D]) {
  char path[512];
  test_src_path(path, sizeof path, "tests/fixtures/gmm/mix3/diffusion_pytorch_model.safetensors");
  st_file *f = NULL;
  err e = {0};
  const int64_t shape[4] = {3, 3, 8, 8};
  ck_assert(st_open(path, &f, &e) == 0);
  ck_assert(st_read_f32(f, "means", 4, shape, &means[0][0], &e) == 0);
  st_close(f);
}

static int nearest(float means[3][D], const float *x) {
  int best = 0;
  double bd = INFINITY;
  for (int k = 0; k < 3; k++) {
    double s = 0;
    for (int q = 0; q < D; q++)
      s += ((double)x[q] - means[k][q]) * ((double)x[q] - means[k][q]);
    if (s < bd) {
      bd = s;
      best = k;
    }
  }
  return best;
}

START_TEST(svm_separates_and_generalises) {
  /* two Gaussian clouds 5 apart along a random direction in 64 dims */
  enum { N = 200, K = 64 };
  float *x = malloc(sizeof(float) * N * K), dir[K];
  int y[N];
  rng_normal(1, 0, 1, dir, K);
  double nd = 0;
  for (int k = 0; k < K; k++)
    nd += dir[k] * dir[k];
  for (int k = 0; k < K; k++)
    dir[k] = (float)(dir[k] / sqrt(nd));
  for (int i = 0; i < N; i++) {
    rng_normal(2, (uint64_t)i, 0, x + i * K, K);
    y[i] = i % 2;
    for (int k = 0; k < K; k++)
      x[i * K + k] += (y[i] ? 2.5f : -2.5f) * dir[k] + 0.5f;
  }
  boundary b;
  err e = {0};
  boundary_fit_opts o = {.C = 1, .test_fraction = 0.25};
  ck_assert_msg(boundary_fit(x, y, N, K, &o, &b, &e) == 0, "%s", e.msg);
  double cosang = 0;
  for (int k = 0; k < K; k++)
    cosang += b.normal[k] * dir[k];
  fprintf(stderr, "SVM: train %.3f test %.3f (n %d/%d), cos(normal, truth) %.3f, offset %.3f\n",
          b.train_accuracy, b.test_accuracy, b.n_train, b.n_test, cosang, b.offset);
  ck_assert(b.train_accuracy > 0.97 && b.test_accuracy > 0.9);
  ck_assert(cosang > 0.8);
  ck_assert(b.mean_pos > 0 && b.mean_neg < 0 && b.scale > 0);
  /* a move puts a latent exactly at the asked distance */
  float z[K];
  memcpy(z, x, sizeof z);
  boundary_move(&b, z, 1, 2.5);
  ck_assert(fabs(boundary_distance(&b, z) - 2.5) < 1e-4);
  /* bad inputs */
  int bad[4] = {0, 1, 2, 0};
  boundary c;
  ck_assert_int_eq(boundary_fit(x, bad, 4, K, &o, &c, &e), ERR_INVALID);
  int one[N];
  for (int i = 0; i < N; i++)
    one[i] = 1;
  ck_assert_int_eq(boundary_fit(x, one, N, K, &o, &c, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "both labels"));
  o.test_fraction = 2;
  ck_assert_int_eq(boundary_fit(x, y, N, K, &o, &c, &e), ERR_INVALID);
  o.test_fraction = 0;
  x[5] = NAN;
  ck_assert_int_eq(boundary_fit(x, y, N, K, &o, &c, &e), ERR_INVALID);
  boundary_free(&b);
  free(x);
}
END_TEST

START_TEST(mixing_step_profile) {
  /* data far from N(0, I) departs early in the generation, data like it late */
  enum { N = 50, K = 16, S = 20 };
  float x[N * K], abar[S], y[N * K];
  double kl[S], kl2[S];
  for (int s = 0; s < S; s++)
    abar[s] = (float)(0.001 + 0.998 * s / (S - 1));
  for (int i = 0; i < N * K; i++) {
    x[i] = (i % K < 8 ? 0.9f : -0.9f) + 0.05f * (float)((i * 7919) % 11 - 5) / 5;
    y[i] = 0.1f * (float)((i * 104729) % 21 - 10) / 10;
  }
  int st = -1, st2 = -1;
  err e = {0};
  ck_assert(boundary_mixing_step(x, N, K, abar, S, 0.01, kl, &st, &e) == 0);
  ck_assert(boundary_mixing_step(y, N, K, abar, S, 0.01, kl2, &st2, &e) == 0);
  for (int s = 1; s < S; s++)
    ck_assert(kl[s] >= kl[s - 1]);
  ck_assert(kl[st] <= 0.01 && (st == S - 1 || kl[st + 1] > 0.01));
  ck_assert_int_lt(st, st2);
  ck_assert_int_eq(boundary_mixing_step(x, 1, K, abar, S, 0.01, kl, &st, &e), ERR_INVALID);
  ck_assert_int_eq(boundary_mixing_step(x, N, K, abar, S, 0, kl, &st, &e), ERR_INVALID);
}
END_TEST

/* The whole method on mix3 (three components; the "attribute" is membership of component 1):
 * latents at the mixing step of a 40-step DDIM grid from generated samples, boundary fit, then
 * edits of new samples and of inverted images. */
START_TEST(edits_cross_the_boundary) {
  model *m = load_gmm("mix3");
  float means[3][D];
  load_means(means);
  json_error_t je;
  json_t *mcfg = json_load_file(model_scheduler_config_path(m), 0, &je);
  json_t *solver =
      json_pack("{s:s, s:i, s:{s:b}}", "name", "ddim", "steps", 40, "config", "clip_sample", 0);
  sampler *grid = NULL, *rest = NULL, *rest0 = NULL;
  err e = {0};
  ck_assert_msg(edit_grid_sampler(solver, mcfg, 0.0, &grid, &e) == 0, "%s", e.msg);
  ck_assert(edit_grid_sampler(solver, mcfg, 1.0, &rest, &e) == 0);
  ck_assert(edit_grid_sampler(solver, mcfg, 0.0, &rest0, &e) == 0);
  enum { N = 160, T = 24 };
  float *x0 = malloc(sizeof(float) * N * D), *lat = malloc(sizeof(float) * N * D);
  /* generated samples and their mixing-step statistics */
  sampler_run_opts r = {.batch = N, .seed = 100};
  ck_assert(sampler_run(grid, m, &r, x0, NULL, &e) == 0);
  double kl[40];
  float abar[40];
  for (int k = 0; k < 40; k++) {
    float a, b;
    sampler_step_level(grid, k, &a, &b);
    abar[k] = a * a;
  }
  int step = -1;
  ck_assert(boundary_mixing_step(x0, N, D, abar, 40, 0.01, kl, &step, &e) == 0);
  fprintf(stderr, "mix3 mixing step (eps 0.01): step %d of 40 (t = %g), KL %.4f there, %.4f next\n",
          step, sampler_timesteps(grid)[step], kl[step], step < 39 ? kl[step + 1] : 0.0);
  ck_assert(step > 0 && step < 39);
  edit_src src = {.batch = N, .seed = 100};
  int nfe = 0;
  ck_assert(edit_latent_at(grid, m, step, &src, lat, &nfe, &e) == 0);
  ck_assert_int_eq(nfe, step);
  int *y = malloc(sizeof(int) * N), pos = 0;
  for (int i = 0; i < N; i++)
    pos += y[i] = nearest(means, x0 + i * D) == 1;
  boundary b;
  boundary_fit_opts fo = {.C = 1, .test_fraction = 0.25};
  ck_assert_msg(boundary_fit(lat, y, N, D, &fo, &b, &e) == 0, "%s", e.msg);
  b.c = 3;
  b.h = b.w = 8;
  b.step = step;
  b.timestep = sampler_timesteps(grid)[step];
  b.solver = json_incref(solver);
  snprintf(b.model, sizeof b.model, "mix3");
  snprintf(b.attribute, sizeof b.attribute, "component 1");
  fprintf(stderr,
          "boundary at step %d: %d positives of %d, train %.3f test %.3f, scale %.2f, "
          "radius %.3f\n",
          step, pos, N, b.train_accuracy, b.test_accuracy, b.scale, b.radius);
  ck_assert(b.test_accuracy >= 0.7); /* the component is not decided yet at t_m */
  /* edits of new samples: negatives pushed to +s scale, positives to -s */
  float *out = malloc(sizeof(float) * T * D), *orig = malloc(sizeof(float) * T * D);
  edit_src es = {.batch = T, .seed = 777};
  sampler_run_opts ro = {.batch = T, .seed = 777};
  ck_assert(sampler_run(grid, m, &ro, orig, NULL, &e) == 0);
  const double strengths[3] = {1.5, 3, 5};
  for (int si = 0; si < 3; si++) {
    int flipped = 0, n_neg = 0, n_pos = 0, flipped_pos = 0;
    ck_assert(edit_boundary(grid, rest, m, &b, &es, strengths[si], EDIT_SPACE_X, out, NULL, &nfe,
                            &e) == 0);
    ck_assert_int_eq(nfe, 40);
    for (int i = 0; i < T; i++)
      if (nearest(means, orig + i * D) != 1) {
        n_neg++;
        flipped += nearest(means, out + i * D) == 1;
      }
    ck_assert(edit_boundary(grid, rest, m, &b, &es, -strengths[si], EDIT_SPACE_X, out, NULL, NULL,
                            &e) == 0);
    for (int i = 0; i < T; i++)
      if (nearest(means, orig + i * D) == 1) {
        n_pos++;
        flipped_pos += nearest(means, out + i * D) != 1;
      }
    fprintf(stderr,
            "edits at strength %g: %d/%d negatives became component 1, %d/%d positives left it\n",
            strengths[si], flipped, n_neg, flipped_pos, n_pos);
    if (si == 2)
      ck_assert(flipped >= 0.8 * n_neg && flipped_pos >= 0.8 * n_pos);
  }
  /* an inverted image: strength 0 on the deterministic rest reproduces about what went in */
  edit_src ei = {.batch = T, .image = orig, .seed = 5};
  float *lat2 = malloc(sizeof(float) * T * D);
  ck_assert(edit_latent_at(grid, m, step, &ei, lat2, &nfe, &e) == 0);
  ck_assert_int_eq(nfe, 40 - step);
  double dmean = 0;
  for (int i = 0; i < T; i++)
    dmean += boundary_distance(&b, lat2 + i * D) / T;
  ck_assert(edit_boundary(grid, rest0, m, &b, &ei, dmean / b.scale, EDIT_SPACE_X, out, NULL, NULL,
                          &e) == 0);
  fprintf(stderr, "inverted images through the edit path at their mean distance: rel L2 %.3f\n",
          test_rel_l2(out, orig, T * D));
  /* the file round trip */
  char dir[64], path[128];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/b.json", dir);
  ck_assert(boundary_save(&b, path, &e) == 0);
  boundary c;
  ck_assert_msg(boundary_load(path, &c, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(c.dim, D);
  ck_assert_int_eq(c.step, step);
  ck_assert(fabs(c.offset - b.offset) < 1e-6 && fabs(c.scale - b.scale) < 1e-6);
  for (int k = 0; k < D; k++)
    ck_assert(fabs(c.normal[k] - b.normal[k]) < 1e-6);
  ck_assert_str_eq(c.attribute, "component 1");
  ck_assert(json_equal(c.solver, solver));
  boundary_free(&c);
  unlink(path);
  rmdir(dir);
  /* bad edits */
  ck_assert_int_eq(edit_boundary(grid, rest, m, &b, &es, NAN, EDIT_SPACE_X, out, NULL, NULL, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "strength"));
  b.dim = 10;
  ck_assert_int_eq(edit_boundary(grid, rest, m, &b, &es, 1, EDIT_SPACE_X, out, NULL, NULL, &e),
                   ERR_INVALID);
  b.dim = D;
  ck_assert_int_eq(edit_latent_at(grid, m, 40, &es, out, NULL, &e), ERR_INVALID);
  json_t *bad = json_pack("{s:s, s:i}", "name", "dpm++2m", "steps", 40);
  sampler *sb = NULL;
  ck_assert_int_eq(edit_grid_sampler(bad, mcfg, 1, &sb, &e), ERR_INVALID);
  ck_assert_int_eq(edit_grid_sampler(solver, mcfg, 2, &sb, &e), ERR_INVALID);
  json_decref(bad);
  boundary_free(&b);
  free(x0);
  free(lat);
  free(lat2);
  free(y);
  free(out);
  free(orig);
  sampler_free(grid);
  sampler_free(rest);
  sampler_free(rest0);
  json_decref(solver);
  json_decref(mcfg);
  model_free(m);
}
END_TEST

/* Progress of an edit: one count over all its phases, one step at a time. */
typedef struct seen {
  int calls, last, total, nfe, ok;
} seen;

static void on_progress(int step, int total, int nfe, void *u) {
  seen *s = u;
  s->ok = s->ok && step == s->last + 1 && (s->calls == 0 || total == s->total) && nfe >= s->nfe;
  s->calls++;
  s->last = step;
  s->total = total;
  s->nfe = nfe;
}

/* The h-space path on a small class-conditional UNet: the mid-block hook, its rows under
 * guidance, and edits that move h: a zero move reproduces the unedited chain bit for bit (so the
 * substituted rows are the network's own, in the right order), a real move changes the result,
 * and a boundary without an h part or of another shape is refused. */
START_TEST(h_space_edits) {
  char path[512];
  model *m = NULL, *gm = load_gmm("mix3");
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/unet/classcond_small"),
                           &m, &e) == 0,
                "%s", e.msg);
  int shape[3];
  ck_assert_msg(model_mid_shape(m, 8, 8, shape, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(shape[0], 32); /* the last block's channels at 8 / 2 */
  ck_assert_int_eq(shape[1], 4);
  ck_assert_int_eq(shape[2], 4);
  ck_assert_int_eq(model_mid_shape(gm, 8, 8, shape, &e), ERR_UNSUPPORTED);
  enum { B = 3, DX = 3 * 8 * 8, DH = 32 * 4 * 4 };
  float x[B * DX], o1[B * DX], o2[B * DX], h1[2 * B * DH], h2[2 * B * DH], t[B] = {500, 500, 500};
  int64_t lab[B] = {1, 4, 7};
  rng_normal(5, 0, 0, x, B * DX);
  /* save, then replace with what was saved: the same floats; a changed h changes them */
  model_call save = {.x = x, .n = B, .h = 8, .w = 8, .t = t, .labels = lab, .threads = 1};
  save.hooks.mid_save = h1;
  ck_assert(model_run(m, &save, o1, &e) == 0);
  model_call swap = save;
  swap.hooks = (model_hooks){.mid_save = h2, .mid_replace = h1};
  ck_assert(model_run(m, &swap, o2, &e) == 0);
  ck_assert(memcmp(o1, o2, sizeof o1) == 0 && memcmp(h1, h2, B * DH * sizeof *h1) == 0);
  for (int k = 0; k < B * DH; k++)
    h2[k] = h1[k] + 0.5f;
  swap.hooks = (model_hooks){.mid_replace = h2};
  ck_assert(model_run(m, &swap, o2, &e) == 0);
  ck_assert(memcmp(o1, o2, sizeof o1) != 0);
  ck_assert_int_eq(model_run(gm, &save, o2, &e), ERR_UNSUPPORTED);
  /* guided: 2 B rows, the conditional ones first */
  guidance g = guidance_for(m, 3.0);
  ck_assert_int_eq(guidance_passes(&g), 2);
  ck_assert_int_eq(guidance_passes(NULL), 1);
  save.hooks.mid_save = h2;
  ck_assert(guidance_eval(&g, m, &save, o2, &e) == 0);
  ck_assert(memcmp(h1, h2, B * DH * sizeof *h1) == 0);
  ck_assert(memcmp(h1, h2 + B * DH, B * DH * sizeof *h1) != 0);

  /* edits on a 10-step grid at step 4 */
  json_error_t je;
  json_t *mcfg = json_load_file(model_scheduler_config_path(m), 0, &je);
  json_t *solver = json_pack("{s:s, s:i}", "name", "ddim", "steps", 10);
  sampler *grid = NULL, *rest = NULL;
  ck_assert_msg(edit_grid_sampler(solver, mcfg, 0.0, &grid, &e) == 0, "%s", e.msg);
  ck_assert(edit_grid_sampler(solver, mcfg, 1.0, &rest, &e) == 0);
  boundary b = {.dim = DX, .c = 3, .h = 8, .w = 8, .scale = 1, .step = 4};
  b.normal = calloc(DX, sizeof *b.normal);
  b.normal[0] = 1;
  boundary hb = {.dim = DH, .c = 32, .h = 4, .w = 4, .scale = 1};
  hb.normal = calloc(DH, sizeof *hb.normal);
  for (int k = 0; k < DH; k++)
    hb.normal[k] = (k % 3 ? 1.0f : -1.0f) / sqrtf(DH);
  float lat[DX], plain[DX], edited[DX], hrow[2 * DH];
  for (int gi = 0; gi < 2; gi++) {
    edit_src src = {.batch = 1, .seed = 21, .labels = lab, .guidance = gi ? &g : NULL};
    ck_assert(edit_latent_at(grid, m, b.step, &src, lat, NULL, &e) == 0);
    ck_assert(edit_mid_at(grid, m, b.step, &src, lat, hrow, &e) == 0);
    sampler_run_opts r = {.batch = 1,
                          .seed = 21,
                          .init_noise = lat,
                          .start_step = b.step,
                          .labels = lab,
                          .guidance = src.guidance};
    ck_assert(sampler_run(rest, m, &r, plain, NULL, &e) == 0);
    /* offset so that h already sits at the target distance 1: nothing moves */
    hb.offset = 0;
    hb.offset = 1 - boundary_distance(&hb, hrow);
    b.mid = &hb;
    int nfe = 0;
    seen pr = {.ok = 1};
    src.progress = on_progress;
    src.progress_user = &pr;
    ck_assert_msg(edit_boundary(grid, rest, m, &b, &src, 1, EDIT_SPACE_H, edited, NULL, &nfe, &e) ==
                      0,
                  "%s", e.msg);
    ck_assert_int_eq(nfe, 11); /* 4 to reach the step, 1 for h, 6 to finish */
    ck_assert_msg(pr.ok && pr.calls == 11 && pr.last == 11 && pr.total == 11 && pr.nfe == 11,
                  "progress: %d calls, last %d of %d, nfe %d", pr.calls, pr.last, pr.total, pr.nfe);
    src.progress = NULL;
    double dmax = 0;
    for (int k = 0; k < DX; k++)
      dmax = fmax(dmax, fabs(edited[k] - plain[k]));
    ck_assert_msg(dmax < 1e-5, "guided %d: zero h move changed the result by %g", gi, dmax);
    ck_assert(edit_boundary(grid, rest, m, &b, &src, 30, EDIT_SPACE_H, edited, NULL, NULL, &e) ==
              0);
    dmax = 0;
    for (int k = 0; k < DX; k++)
      dmax = fmax(dmax, fabs(edited[k] - plain[k]));
    ck_assert_msg(dmax > 1e-4, "guided %d: an h move changed nothing (%g)", gi, dmax);
    fprintf(stderr, "h-space edit (guided %d): moving h by 29 spreads changes x0 by %.3g\n", gi,
            dmax);
  }
  /* refused: no h part, a wrong h shape, an unknown space, a model without a mid block */
  b.mid = NULL;
  edit_src src = {.batch = 1, .seed = 21, .labels = lab};
  ck_assert_int_eq(
      edit_boundary(grid, rest, m, &b, &src, 1, EDIT_SPACE_BOTH, edited, NULL, NULL, &e),
      ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "no h-space part"));
  edit_space sp;
  ck_assert_int_eq(edit_space_parse(NULL, &b, &sp), 0);
  ck_assert_int_eq(sp, EDIT_SPACE_X);
  b.mid = &hb;
  ck_assert_int_eq(edit_space_parse(NULL, &b, &sp), 0);
  ck_assert_int_eq(sp, EDIT_SPACE_BOTH);
  ck_assert_int_eq(edit_space_parse("z", &b, &sp), -1);
  ck_assert_int_eq(edit_boundary(grid, rest, m, &b, &src, 1, (edit_space)7, edited, NULL, NULL, &e),
                   ERR_INVALID);
  hb.c = 16;
  ck_assert_int_eq(edit_boundary(grid, rest, m, &b, &src, 1, EDIT_SPACE_H, edited, NULL, NULL, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "mid block"));
  hb.c = 32;
  /* the file keeps the h part */
  char dir[64];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/h.json", dir);
  b.solver = solver;
  ck_assert(boundary_save(&b, path, &e) == 0);
  boundary c;
  ck_assert_msg(boundary_load(path, &c, &e) == 0, "%s", e.msg);
  ck_assert_ptr_nonnull(c.mid);
  ck_assert_int_eq(c.mid->dim, DH);
  ck_assert(fabs(c.mid->offset - hb.offset) < 1e-6);
  for (int k = 0; k < DH; k++)
    ck_assert(fabs(c.mid->normal[k] - hb.normal[k]) < 1e-6);
  boundary_free(&c);
  unlink(path);
  rmdir(dir);
  free(b.normal);
  free(hb.normal);
  sampler_free(grid);
  sampler_free(rest);
  json_decref(solver);
  json_decref(mcfg);
  model_free(m);
  model_free(gm);
}
END_TEST

/* Corrupt and truncated boundary files are errors naming what is wrong, never crashes. */
START_TEST(rejects_bad_files) {
  char dir[64], path[128];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/b.json", dir);
  static const char *const bad[] = {
      "",
      "{",
      "[]",
      "{\"format\": \"x\"}",
      "{\"format\": \"denoised-boundary\", \"version\": 2}",
      "{\"format\": \"denoised-boundary\", \"version\": 1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], \"normal\": [1]}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 0], \"normal\": []}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [0, 0], \"offset\": 0, \"step\": 0}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, \"a\"], \"offset\": 0, \"step\": 0}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"step\": 0}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": -1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1.5}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 5, \"solver\": {\"name\": \"ddim\", "
      "\"steps\": 5}}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"solver\": 3}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [100000, 100000, 100000], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"scale\": -1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"model\": 7}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"mid\": 3}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"mid\": {}}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"mid\": {\"shape\": [2, 1, 1], "
      "\"normal\": [0, 0], \"offset\": 0}}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"mid\": {\"shape\": [2, 1, 1], "
      "\"normal\": [1, 0, 0], \"offset\": 0}}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"mid\": {\"shape\": [2, 1, 1], "
      "\"normal\": [1, 0]}}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, -4e38], \"offset\": 0, \"step\": 1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 1e300, \"step\": 1}",
      "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
      "\"normal\": [1, 0], \"offset\": 0, \"step\": 1, \"radius\": -2e6}",
  };
  /* found by tests/fuzz/fuzz_boundary.c: 1e306 is a finite double but no float; the mid normal
   * came out NaN (tests/fuzz/regressions/boundary) */
  char src[512];
  boundary fz;
  err fe = {0};
  ck_assert_int_ne(
      boundary_load(test_src_path(src, sizeof src, "tests/fuzz/regressions/boundary/normal-1e306"),
                    &fz, &fe),
      0);
  ck_assert_msg(strstr(fe.msg, "mid") && strstr(fe.msg, "normal[3]"), "%s", fe.msg);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    FILE *f = fopen(path, "w");
    fputs(bad[i], f);
    fclose(f);
    boundary b;
    err e = {0};
    ck_assert_msg(boundary_load(path, &b, &e) != 0, "case %zu accepted", i);
    ck_assert(e.msg[0]);
  }
  /* a good one, truncated at every length */
  const char *good = "{\"format\": \"denoised-boundary\", \"version\": 1, \"shape\": [1, 1, 2], "
                     "\"normal\": [3, 4], \"offset\": 0.5, \"step\": 1}";
  FILE *f = fopen(path, "w");
  fputs(good, f);
  fclose(f);
  boundary b;
  err e = {0};
  ck_assert_msg(boundary_load(path, &b, &e) == 0, "%s", e.msg);
  ck_assert(fabs(b.normal[0] - 0.6f) < 1e-6 && fabs(b.normal[1] - 0.8f) < 1e-6);
  boundary_free(&b);
  for (size_t len = 0; len < strlen(good); len += 3) {
    f = fopen(path, "w");
    fwrite(good, 1, len, f);
    fclose(f);
    ck_assert(boundary_load(path, &b, &e) != 0);
  }
  ck_assert(boundary_load("/nonexistent/b.json", &b, &e) != 0);
  unlink(path);
  rmdir(dir);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("boundary");
  TCase *tc = tcase_create("boundary");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, svm_separates_and_generalises);
  tcase_add_test(tc, mixing_step_profile);
  tcase_add_test(tc, edits_cross_the_boundary);
  tcase_add_test(tc, h_space_edits);
  tcase_add_test(tc, rejects_bad_files);
  suite_add_tcase(s, tc);
  return s;
}
