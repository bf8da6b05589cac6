/* engine/train/optim: AdamW against torch.optim.AdamW (tools/gen_optim_fixtures.py, steps with
 * changing learning rate and gradients), its refusals, and the EMA's decay schedule and update
 * as diffusers' EMAModel defines them. */
#include <math.h>

#include "npy.h"
#include "optim.h"
#include "testutil.h"

static npy_array read_fx(const char *name) {
  char rel[256], path[1024];
  snprintf(rel, sizeof rel, "tests/fixtures/optim/%s.npy", name);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &a, &e) == 0, "%s", e.msg);
  return a;
}

START_TEST(adamw_matches_torch) {
  npy_array p[2], fin[2], g[2], lr = read_fx("lr");
  size_t counts[2];
  for (int i = 0; i < 2; i++) {
    char name[32];
    snprintf(name, sizeof name, "p%d.init", i);
    p[i] = read_fx(name);
    snprintf(name, sizeof name, "p%d.final", i);
    fin[i] = read_fx(name);
    snprintf(name, sizeof name, "g%d", i);
    g[i] = read_fx(name);
    counts[i] = (size_t)p[i].count;
  }
  /* the learning rates as torch used them (float64; npy_read_f32 rounds, so recompute) */
  int steps = (int)lr.count;
  adamw_config c = {.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05};
  adamw *o = NULL;
  err e = {0};
  ck_assert_int_eq(adamw_new(&c, 2, counts, &o, &e), 0);
  for (int s = 0; s < steps; s++) {
    float *params[2] = {p[0].data, p[1].data};
    const float *grads[2] = {g[0].data + s * counts[0], g[1].data + s * counts[1]};
    ck_assert_int_eq(adamw_step(o, params, grads, 1e-2 * (1 + s) / steps, &e), 0);
  }
  ck_assert_int_eq(adamw_steps(o), steps);
  for (int i = 0; i < 2; i++) {
    double r = test_rel_l2(p[i].data, fin[i].data, counts[i]);
    printf("adamw tensor %d after %d steps: rel L2 to torch %.2e\n", i, steps, r);
    ck_assert_msg(r < 1e-6, "tensor %d: rel L2 %.3g", i, r);
    npy_array_free(&p[i]), npy_array_free(&fin[i]), npy_array_free(&g[i]);
  }
  npy_array_free(&lr);
  adamw_free(o);
}
END_TEST

START_TEST(adamw_refuses_bad_settings) {
  size_t counts[1] = {4};
  adamw *o = NULL;
  err e = {0};
  adamw_config bad[] = {{1.0, 0.999, 1e-8, 0},
                        {0.9, -0.1, 1e-8, 0},
                        {0.9, 0.999, 0, 0},
                        {0.9, 0.999, 1e-8, -1},
                        {0.9, 0.999, NAN, 0}};
  const char *needle[] = {"betas", "betas", "eps", "weight_decay", "eps"};
  for (int i = 0; i < 5; i++) {
    ck_assert_int_eq(adamw_new(&bad[i], 1, counts, &o, &e), ERR_INVALID);
    ck_assert_ptr_null(o);
    ck_assert_ptr_nonnull(strstr(e.msg, needle[i]));
  }
  adamw_config c = {0.9, 0.999, 1e-8, 0.01};
  ck_assert_int_eq(adamw_new(&c, 1, counts, &o, &e), 0);
  float p[4] = {1, 2, 3, 4}, g[4] = {0};
  float *ps[1] = {p};
  const float *gs[1] = {g};
  ck_assert_int_eq(adamw_step(o, ps, gs, -1e-3, &e), ERR_INVALID);
  ck_assert_int_eq(adamw_step(o, ps, gs, INFINITY, &e), ERR_INVALID);
  ck_assert_int_eq(adamw_steps(o), 0);
  adamw_free(o);
}
END_TEST

/* EMAModel.get_decay: 0 until update_after_step + 1, then (1 + s) / (10 + s) or the warm-up
 * 1 - (1 + s / inv_gamma)^-power, clamped to [min_decay, decay]. */
START_TEST(ema_decay_schedule) {
  ema_config c = {.decay = 0.9999, .inv_gamma = 1, .power = 2.0 / 3.0};
  ck_assert_double_eq(ema_decay(&c, 1), 0.0);
  ck_assert_double_eq_tol(ema_decay(&c, 2), 2.0 / 11.0, 1e-15);
  ck_assert_double_eq_tol(ema_decay(&c, 101), 101.0 / 110.0, 1e-15);
  ck_assert_double_eq(ema_decay(&c, 1000000), 0.9999);
  c.use_warmup = 1;
  ck_assert_double_eq_tol(ema_decay(&c, 2), 1.0 - pow(2.0, -2.0 / 3.0), 1e-15);
  c.min_decay = 0.5;
  ck_assert_double_eq(ema_decay(&c, 2), 0.5);
  c.update_after_step = 5;
  ck_assert_double_eq(ema_decay(&c, 6), 0.0); /* a plain copy until then */
  ck_assert_double_eq(ema_decay(&c, 7), 0.5); /* step 1: 0.37, raised to min_decay */
  ck_assert_double_eq_tol(ema_decay(&c, 8), 1.0 - pow(3.0, -2.0 / 3.0), 1e-15);
  /* the update: s -= (1 - d) (s - p) */
  ema_config d = {.decay = 0.9999, .inv_gamma = 1, .power = 2.0 / 3.0};
  float s[2] = {1, -3}, p[2] = {0, 1};
  float *sh[1] = {s};
  const float *ps[1] = {p};
  size_t counts[1] = {2};
  ck_assert_double_eq(ema_update(&d, 1, 1, counts, sh, ps), 0.0);
  ck_assert_float_eq(s[0], 0.0f); /* decay 0: the shadow becomes the weights */
  ck_assert_float_eq(s[1], 1.0f);
  s[0] = 1, s[1] = -3;
  ema_update(&d, 2, 1, counts, sh, ps);
  ck_assert_float_eq_tol(s[0], 2.0f / 11.0f, 1e-7f);
  ck_assert_float_eq_tol(s[1], 1.0f - 4.0f * 2.0f / 11.0f, 1e-6f);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("optim");
  TCase *tc = tcase_create("optim");
  tcase_add_test(tc, adamw_matches_torch);
  tcase_add_test(tc, adamw_refuses_bad_settings);
  tcase_add_test(tc, ema_decay_schedule);
  suite_add_tcase(s, tc);
  return s;
}
