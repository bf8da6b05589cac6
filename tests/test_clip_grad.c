/* The CLIP text encoder's backward (engine/model/clip_grad.c) against PyTorch autograd
 * (tools/gen_clip_grad_fixtures.py: tiny random CLIPTextModels, quick_gelu with clip skip 1 and
 * gelu with clip skip 2, float64 torch): the forward and every weight's gradient within 1e-4
 * relative L2 (the bar), a layer skipped by clip skip gets exactly zero, 1 and 2 threads
 * give the same bits, and bad calls are refused. */
#include <math.h>

#include "clip.h"
#include "clip_grad.h"
#include "npy.h"
#include "pool.h"
#include "safetensors.h"
#include "testutil.h"

typedef struct fixture {
  clip_text_model *m;
  int64_t *ids;
  int n, len, clip_skip;
  float *g, *hidden;
} fixture;

static void load(const char *name, fixture *fx) {
  char dir[600], path[700];
  char rel[128];
  snprintf(rel, sizeof rel, "tests/fixtures/clip_grad/%s", name);
  test_src_path(dir, sizeof dir, rel);
  err e = {0};
  ck_assert_msg(clip_text_new(dir, &fx->m, &e) == ERR_OK, "%s", e.msg);
  int64_t count, shape[NPY_MAX_DIMS];
  int ndim;
  snprintf(path, sizeof path, "%s/ids.npy", dir);
  ck_assert_msg(npy_read_i64(path, &fx->ids, &count, &ndim, shape, &e) == ERR_OK, "%s", e.msg);
  ck_assert_int_eq(ndim, 2);
  fx->n = (int)shape[0], fx->len = (int)shape[1];
  npy_array a;
  snprintf(path, sizeof path, "%s/grad_output.npy", dir);
  ck_assert_msg(npy_read_f32(path, &a, &e) == ERR_OK, "%s", e.msg);
  fx->g = a.data;
  snprintf(path, sizeof path, "%s/hidden.npy", dir);
  ck_assert_msg(npy_read_f32(path, &a, &e) == ERR_OK, "%s", e.msg);
  fx->hidden = a.data;
  ck_assert_int_eq(a.count, (int64_t)fx->n * fx->len * clip_text_config_of(fx->m)->hidden_size);
  fx->clip_skip = strstr(name, "skip2") ? 2 : 1;
}

static void unload(fixture *fx) {
  clip_text_free(fx->m);
  free(fx->ids), free(fx->g), free(fx->hidden);
}

static float *backward(const fixture *fx, pool *p, float *hidden) {
  size_t total;
  clip_text_weights(fx->m, &total);
  float *gp = calloc(total, sizeof(float));
  err e = {0};
  ck_assert_msg(clip_text_backward(fx->m, fx->ids, fx->n, fx->len, fx->clip_skip, fx->g, gp, hidden,
                                   p, &e) == ERR_OK,
                "%s", e.msg);
  return gp;
}

START_TEST(gradients_match_pytorch_autograd) {
  static const char *const cases[] = {"quick_gelu", "gelu_skip2"};
  for (int ci = 0; ci < 2; ci++) {
    fixture fx;
    load(cases[ci], &fx);
    size_t nh = (size_t)fx.n * fx.len * clip_text_config_of(fx.m)->hidden_size;
    float *hidden = malloc(nh * sizeof(float));
    float *gp = backward(&fx, NULL, hidden);
    double fe = test_rel_l2(hidden, fx.hidden, nh);
    ck_assert_msg(fe < 1e-5, "%s: forward rel L2 %.3g", cases[ci], fe);
    char dir[600], path[700], rel[128];
    snprintf(rel, sizeof rel, "tests/fixtures/clip_grad/%s", cases[ci]);
    test_src_path(dir, sizeof dir, rel);
    snprintf(path, sizeof path, "%s/grad_params.safetensors", dir);
    st_file *f;
    err e = {0};
    ck_assert_msg(st_open(path, &f, &e) == ERR_OK, "%s", e.msg);
    double worst = 0;
    int tensors = 0, zeros = 0;
    size_t off, cnt;
    const char *name;
    for (int i = 0; (name = clip_text_tensor(fx.m, i, &off, &cnt)) != NULL; i++, tensors++) {
      char nm[160];
      snprintf(nm, sizeof nm, "%s", name);
      float *ref = malloc(cnt * sizeof(float));
      ck_assert_msg(st_read_f32(f, nm, 0, NULL, ref, &e) == ERR_OK, "%s", e.msg);
      double num = 0, den = 0;
      for (size_t k = 0; k < cnt; k++) {
        num += ((double)gp[off + k] - ref[k]) * ((double)gp[off + k] - ref[k]);
        den += (double)ref[k] * ref[k];
      }
      if (den == 0) { /* a layer clip skip leaves out: exactly no gradient */
        ck_assert_msg(num == 0, "%s: %s should have no gradient", cases[ci], nm);
        zeros++;
      } else {
        /* the key bias's gradient is zero by symmetry (softmax ignores a constant shift of a
         * row): torch's is 1e-17 noise and ours float noise, held to an absolute RMS */
        if (strstr(nm, "k_proj.bias")) {
          ck_assert_msg(den / (double)cnt < 1e-20, "%s: torch's %s is not ~0", cases[ci], nm);
          ck_assert_msg(sqrt(num / (double)cnt) < 1e-5, "%s: %s RMS %.3g, not ~0", cases[ci], nm,
                        sqrt(num / (double)cnt));
          free(ref);
          continue;
        }
        double r = sqrt(num / den);
        ck_assert_msg(r < 1e-4, "%s: gradient of %s rel L2 %.3g against torch", cases[ci], nm, r);
        worst = r > worst ? r : worst;
      }
      free(ref);
    }
    ck_assert_int_eq(tensors, st_count(f));
    ck_assert_int_eq(zeros, fx.clip_skip == 2 ? 16 : 0);
    printf("clip backward %-10s: fwd %.2e, worst of %d gradients %.2e (%d zero)\n", cases[ci], fe,
           tensors - zeros, worst, zeros);
    st_close(f);
    free(gp), free(hidden);
    unload(&fx);
  }
}
END_TEST

START_TEST(gradients_do_not_depend_on_threads) {
  fixture fx;
  load("quick_gelu", &fx);
  pool *p2 = pool_new(2);
  size_t total;
  clip_text_weights(fx.m, &total);
  float *g1 = backward(&fx, NULL, NULL), *g2 = backward(&fx, p2, NULL);
  ck_assert(memcmp(g1, g2, total * sizeof(float)) == 0);
  free(g1), free(g2);
  pool_free(p2);
  unload(&fx);
}
END_TEST

START_TEST(bad_calls_are_refused) {
  fixture fx;
  load("quick_gelu", &fx);
  size_t total;
  clip_text_weights(fx.m, &total);
  float *gp = calloc(total, sizeof(float));
  err e = {0};
  ck_assert_int_eq(clip_text_backward(fx.m, fx.ids, fx.n, fx.len, 1, NULL, gp, NULL, NULL, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "output gradient"));
  ck_assert_int_eq(clip_text_backward(fx.m, fx.ids, fx.n, fx.len, 9, fx.g, gp, NULL, NULL, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "clip skip"));
  fx.ids[3] = 999;
  ck_assert_int_eq(clip_text_backward(fx.m, fx.ids, fx.n, fx.len, 1, fx.g, gp, NULL, NULL, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "999"));
  free(gp);
  unload(&fx);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("clip_grad");
  TCase *tc = tcase_create("clip_grad");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, gradients_match_pytorch_autograd);
  tcase_add_test(tc, gradients_do_not_depend_on_threads);
  tcase_add_test(tc, bad_calls_are_refused);
  suite_add_tcase(s, tc);
  return s;
}
