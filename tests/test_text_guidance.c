/* Text conditioning in the solvers: classifier-free guidance of a UNet2DConditionModel is one
 * batched call of [prompt, unconditional prompt] combined as uncond + g (cond - uncond), exactly
 * what two separate calls give; a sampler run passes the prompt's hidden states to every
 * evaluation; and what is missing or mismatched is refused. On the small SD-1.x-like fixture of
 * tests/fixtures/cunet. */
#include <jansson.h>
#include <math.h>
#include <string.h>

#include "guidance.h"
#include "model.h"
#include "npy.h"
#include "ops.h"
#include "sampler.h"
#include "testutil.h"

typedef struct text_case {
  model *m;
  npy_array x, ehs;
  int n, h, w, seq, dim;
  float *cond, *uncond; /* one sequence each */
} text_case;

static void case_open(text_case *tc) {
  char path[512];
  err e = {0};
  test_src_path(path, sizeof path, "tests/fixtures/cunet/sd1_small");
  ck_assert_msg(model_load(path, &tc->m, &e) == ERR_OK, "%s", e.msg);
  char f[600];
  snprintf(f, sizeof f, "%s/input.npy", path);
  ck_assert_int_eq(npy_read_f32(f, &tc->x, &e), ERR_OK);
  snprintf(f, sizeof f, "%s/encoder_hidden_states.npy", path);
  ck_assert_int_eq(npy_read_f32(f, &tc->ehs, &e), ERR_OK);
  tc->n = (int)tc->x.shape[0];
  tc->h = (int)tc->x.shape[2];
  tc->w = (int)tc->x.shape[3];
  tc->seq = (int)tc->ehs.shape[1];
  tc->dim = (int)tc->ehs.shape[2];
  ck_assert_int_ge(tc->ehs.shape[0], 2);
  tc->cond = tc->ehs.data;                               /* image 0's states: the prompt */
  tc->uncond = tc->ehs.data + (size_t)tc->seq * tc->dim; /* image 1's: the empty prompt */
}

static void case_close(text_case *tc) {
  model_free(tc->m);
  npy_array_free(&tc->x);
  npy_array_free(&tc->ehs);
}

/* n copies of one sequence. */
static float *repeat(const float *row, int n, size_t per) {
  float *s = malloc((size_t)n * per * sizeof *s);
  for (int b = 0; b < n; b++)
    memcpy(s + (size_t)b * per, row, per * sizeof *s);
  return s;
}

START_TEST(guided_call_is_two_calls_combined) {
  text_case tc;
  case_open(&tc);
  const int n = tc.n;
  const size_t per = (size_t)tc.seq * tc.dim, d = (size_t)4 * tc.h * tc.w;
  float t[16];
  for (int b = 0; b < n; b++)
    t[b] = 100.0f + 250.0f * (float)b;
  float *cs = repeat(tc.cond, n, per), *us = repeat(tc.uncond, n, per);
  float *oc = malloc((size_t)n * d * sizeof *oc), *ou = malloc((size_t)n * d * sizeof *ou);
  float *og = malloc((size_t)n * d * sizeof *og);
  model_call c = {
      .x = tc.x.data, .n = n, .h = tc.h, .w = tc.w, .t = t, .seq_len = tc.seq, .threads = 2};
  err e = {0};
  c.encoder_hidden_states = cs;
  ck_assert_int_eq(model_run(tc.m, &c, oc, &e), ERR_OK);
  c.encoder_hidden_states = us;
  ck_assert_int_eq(model_run(tc.m, &c, ou, &e), ERR_OK);
  c.encoder_hidden_states = cs;
  const float s = 5.5f;
  guidance g = {.enabled = 1, .scale = s, .uncond_states = tc.uncond, .seq_len = tc.seq};
  ck_assert_msg(guidance_check(&g, tc.m, &e) == ERR_OK, "%s", e.msg);
  ck_assert_msg(guidance_eval(&g, tc.m, &c, og, &e) == ERR_OK, "%s", e.msg);
  double diff = 0, ref = 0;
  for (size_t k = 0; k < (size_t)n * d; k++) {
    const float want = ou[k] + s * (oc[k] - ou[k]);
    diff = fmax(diff, fabs(og[k] - want));
    ref = fmax(ref, fabs(want));
  }
  ck_assert_msg(diff <= 1e-6 * ref, "guided output differs from the combination by %g", diff);
  /* g = 0 is the unconditional model, g = 1 the conditional one */
  g.scale = 0;
  ck_assert_int_eq(guidance_eval(&g, tc.m, &c, og, &e), ERR_OK);
  ck_assert(memcmp(og, ou, (size_t)n * d * sizeof *og) == 0);
  g.scale = 1;
  ck_assert_int_eq(guidance_eval(&g, tc.m, &c, og, &e), ERR_OK);
  ck_assert(memcmp(og, oc, (size_t)n * d * sizeof *og) == 0);
  /* refusals: no unconditional states, or a different length */
  guidance none = {.enabled = 1, .scale = 3};
  ck_assert_int_eq(guidance_check(&none, tc.m, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "negative_prompt"));
  guidance shorter = g;
  shorter.scale = 3;
  shorter.seq_len = tc.seq - 1;
  ck_assert_int_eq(guidance_eval(&shorter, tc.m, &c, og, &e), ERR_INVALID);
  free(cs);
  free(us);
  free(oc);
  free(ou);
  free(og);
  case_close(&tc);
}
END_TEST

static sampler *make_ddim(int steps) {
  json_t *cfg = json_pack("{s:s, s:i, s:f, s:f, s:s, s:b, s:i, s:b}", "_class_name",
                          "DDIMScheduler", "num_train_timesteps", 1000, "beta_start", 0.00085,
                          "beta_end", 0.012, "beta_schedule", "scaled_linear", "clip_sample", 0,
                          "steps_offset", 1, "set_alpha_to_one", 0);
  json_t *spec = json_pack("{s:s, s:i}", "name", "ddim", "steps", steps);
  sampler *s = NULL;
  err e = {0};
  ck_assert_msg(sampler_new_from_json(spec, cfg, &s, &e) == ERR_OK, "%s", e.msg);
  json_decref(spec);
  json_decref(cfg);
  return s;
}

START_TEST(sampling_attends_to_the_prompt) {
  text_case tc;
  case_open(&tc);
  sampler *s = make_ddim(4);
  const size_t d = (size_t)4 * tc.h * tc.w;
  float *a = malloc(2 * d * sizeof *a), *b = malloc(2 * d * sizeof *b);
  guidance g = {.enabled = 1, .scale = 4, .uncond_states = tc.uncond, .seq_len = tc.seq};
  sampler_run_opts o = {.batch = 2,
                        .height = tc.h,
                        .width = tc.w,
                        .seed = 3,
                        .threads = 2,
                        .text_states = tc.cond,
                        .text_seq = tc.seq,
                        .guidance = &g};
  err e = {0};
  ck_assert_msg(sampler_run(s, tc.m, &o, a, NULL, &e) == ERR_OK, "%s", e.msg);
  ck_assert(ops_all_finite(a, 2 * d));
  /* the same run again is bit-identical; another prompt changes the result */
  ck_assert_int_eq(sampler_run(s, tc.m, &o, b, NULL, &e), ERR_OK);
  ck_assert(memcmp(a, b, 2 * d * sizeof *a) == 0);
  o.text_states = tc.uncond;
  ck_assert_int_eq(sampler_run(s, tc.m, &o, b, NULL, &e), ERR_OK);
  ck_assert(test_rel_l2(b, a, 2 * d) > 1e-3);
  /* a text model without states, and states for a model that takes none, are refused */
  o.text_states = NULL;
  ck_assert_int_eq(sampler_run(s, tc.m, &o, b, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "hidden states"));
  free(a);
  free(b);
  sampler_free(s);
  case_close(&tc);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("text_guidance");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, guided_call_is_two_calls_combined);
  tcase_add_test(tc, sampling_attends_to_the_prompt);
  suite_add_tcase(s, tc);
  return s;
}
