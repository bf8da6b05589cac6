/* The model-level backward of UNet2DConditionModel (model_backward on a text-conditional UNet):
 * gradients w.r.t. the input, every parameter, the encoder hidden states and the class rows,
 * checked against PyTorch autograd through diffusers' own UNet2DConditionModel
 * (tools/gen_cunet_grad_fixtures.py: tests/fixtures/cunet_grad, or the folder
 * DENOISED_CUNET_GRAD_FIXTURES names for fixtures made with another seed), with both forms of
 * proj_in/proj_out; the same bits on 1 and 2 threads; the CLI's --grad-encoder-hidden-states;
 * refusals. */
#include <math.h>

#include "model.h"
#include "npy.h"
#include "safetensors.h"
#include "testutil.h"

static const char *const fixtures[] = {"conv_proj", "linear_proj"};

static const char *fixture_dir(const char *name, char *dir, size_t n) {
  const char *root = getenv("DENOISED_CUNET_GRAD_FIXTURES");
  char rel[256];
  if (root && *root) {
    snprintf(dir, n, "%s/%s", root, name);
    return dir;
  }
  snprintf(rel, sizeof rel, "tests/fixtures/cunet_grad/%s", name);
  return test_src_path(dir, n, rel);
}

static npy_array read_npy(const char *dir, const char *name) {
  char path[1200];
  snprintf(path, sizeof path, "%s/%s.npy", dir, name);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(path, &a, &e) == 0, "%s: %s", path, e.msg);
  return a;
}

/* One fixture: its model, inputs and upstream gradient. */
typedef struct fixture {
  char dir[1024];
  model *m;
  npy_array x, t, ehs, g;
  int64_t *labels;
  model_call c;
  size_t nin, nout, nehs;
} fixture;

static void fixture_load(const char *name, fixture *f) {
  memset(f, 0, sizeof *f);
  fixture_dir(name, f->dir, sizeof f->dir);
  err e = {0};
  ck_assert_msg(model_load(f->dir, &f->m, &e) == 0, "%s: %s", f->dir, e.msg);
  f->x = read_npy(f->dir, "input");
  f->t = read_npy(f->dir, "timesteps");
  f->ehs = read_npy(f->dir, "encoder_hidden_states");
  f->g = read_npy(f->dir, "grad_output");
  const int n = (int)f->x.shape[0];
  if (model_get_info(f->m)->num_classes) {
    char path[1200];
    int64_t count, shape[8];
    int ndim;
    snprintf(path, sizeof path, "%s/class_labels.npy", f->dir);
    ck_assert_msg(npy_read_i64(path, &f->labels, &count, &ndim, shape, &e) == 0, "%s", e.msg);
    ck_assert_int_eq(count, n);
  }
  f->c = (model_call){.x = f->x.data,
                      .n = n,
                      .h = (int)f->x.shape[2],
                      .w = (int)f->x.shape[3],
                      .t = f->t.data,
                      .labels = f->labels,
                      .encoder_hidden_states = f->ehs.data,
                      .seq_len = (int)f->ehs.shape[1],
                      .threads = 2};
  f->nin = (size_t)f->x.count;
  f->nout = (size_t)f->g.count;
  f->nehs = (size_t)f->ehs.count;
}

static void fixture_free(fixture *f) {
  npy_array_free(&f->x), npy_array_free(&f->t), npy_array_free(&f->ehs), npy_array_free(&f->g);
  free(f->labels);
  model_free(f->m);
}

typedef struct grads {
  float *out, *dx, *dehs, *dcls;
  model_grads *p;
} grads;

static void run_backward(const fixture *f, int threads, grads *g) {
  const model_info *mi = model_get_info(f->m);
  g->out = calloc(f->nout, sizeof(float));
  g->dx = calloc(f->nin, sizeof(float));
  g->dehs = calloc(f->nehs, sizeof(float));
  g->dcls = calloc((size_t)f->c.n * (mi->class_embed_dim + 1), sizeof(float));
  err e = {0};
  ck_assert_int_eq(model_grads_new(f->m, &g->p, &e), 0);
  model_call c = f->c;
  c.threads = threads;
  model_grad_call gc = {.grad_out = f->g.data,
                        .out = g->out,
                        .grad_x = g->dx,
                        .grad_encoder_hidden_states = g->dehs,
                        .grad_class = mi->class_embed_dim ? g->dcls : NULL,
                        .params = g->p};
  ck_assert_msg(model_backward(f->m, &c, &gc, &e) == 0, "model_backward: %s", e.msg);
}

static void free_grads(grads *g) {
  free(g->out), free(g->dx), free(g->dehs), free(g->dcls);
  model_grads_free(g->p);
}

/* Relative L2 of got against the fixture's array `name` (of n values). */
static double against(const char *dir, const char *name, const float *got, size_t n) {
  npy_array want = read_npy(dir, name);
  ck_assert_msg((size_t)want.count == n, "%s/%s: %lld values, want %zu", dir, name,
                (long long)want.count, n);
  double r = test_rel_l2(got, want.data, n);
  npy_array_free(&want);
  return r;
}

START_TEST(cunet_gradients_match_pytorch) {
  fixture f;
  grads g;
  fixture_load(fixtures[_i], &f);
  run_backward(&f, 2, &g);
  const model_info *mi = model_get_info(f.m);
  double fwd = against(f.dir, "output", g.out, f.nout);
  double ex = against(f.dir, "grad_input", g.dx, f.nin);
  double ee = against(f.dir, "grad_encoder_hidden_states", g.dehs, f.nehs);
  double ec = mi->class_embed_dim
                  ? against(f.dir, "grad_class", g.dcls, (size_t)f.c.n * mi->class_embed_dim)
                  : 0;
  ck_assert_msg(fwd < 1e-4, "%s: forward rel L2 %.3g", fixtures[_i], fwd);
  ck_assert_msg(ex < 1e-4, "%s: dL/dx rel L2 %.3g", fixtures[_i], ex);
  ck_assert_msg(ee < 1e-4, "%s: dL/d(encoder hidden states) rel L2 %.3g", fixtures[_i], ee);
  ck_assert_msg(ec < 1e-4, "%s: dL/d(class row) rel L2 %.3g", fixtures[_i], ec);
  char path[1200];
  snprintf(path, sizeof path, "%s/grad_params.safetensors", f.dir);
  st_file *st = NULL;
  err e = {0};
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(st), model_param_count(f.m)); /* every parameter, no other */
  double worst = 0;
  const char *worst_name = "";
  for (int i = 0; i < model_param_count(f.m); i++) {
    const model_param *mp = model_param_at(f.m, i);
    float *want = malloc(mp->count * sizeof(float));
    ck_assert_msg(st_read_f32(st, mp->name, mp->ndim, mp->shape, want, &e) == 0, "%s: %s", mp->name,
                  e.msg);
    double r = test_rel_l2(model_grads_at(g.p, i), want, mp->count);
    ck_assert_msg(r < 1e-4, "%s: gradient of %s rel L2 %.3g", fixtures[_i], mp->name, r);
    if (r > worst) {
      worst = r;
      worst_name = mp->name;
    }
    free(want);
  }
  printf("%s vs torch autograd (float64): out %.2e, dx %.2e, dehs %.2e, dclass %.2e, worst of %d "
         "params %.2e (%s)\n",
         fixtures[_i], fwd, ex, ee, ec, model_param_count(f.m), worst, worst_name);
  st_close(st);
  free_grads(&g);
  fixture_free(&f);
}
END_TEST

/* The tape's forward is the model's: model_run gives the same output. */
START_TEST(tape_forward_is_the_forward) {
  fixture f;
  grads g;
  fixture_load(fixtures[_i], &f);
  run_backward(&f, 2, &g);
  float *y = malloc(f.nout * sizeof(float));
  err e = {0};
  ck_assert_msg(model_run(f.m, &f.c, y, &e) == 0, "%s", e.msg);
  double r = test_rel_l2(g.out, y, f.nout);
  ck_assert_msg(r < 1e-6, "%s: tape forward vs model_run rel L2 %.3g", fixtures[_i], r);
  free(y);
  free_grads(&g);
  fixture_free(&f);
}
END_TEST

START_TEST(cunet_gradients_do_not_depend_on_threads) {
  fixture f;
  grads g1, g2;
  fixture_load(fixtures[_i], &f);
  run_backward(&f, 1, &g1);
  run_backward(&f, 2, &g2);
  const model_info *mi = model_get_info(f.m);
  ck_assert(memcmp(g1.dx, g2.dx, f.nin * sizeof(float)) == 0);
  ck_assert(memcmp(g1.dehs, g2.dehs, f.nehs * sizeof(float)) == 0);
  ck_assert(memcmp(g1.dcls, g2.dcls, (size_t)f.c.n * mi->class_embed_dim * sizeof(float)) == 0);
  for (int i = 0; i < model_param_count(f.m); i++)
    ck_assert_msg(memcmp(model_grads_at(g1.p, i), model_grads_at(g2.p, i),
                         model_param_at(f.m, i)->count * sizeof(float)) == 0,
                  "%s differs between 1 and 2 threads", model_param_at(f.m, i)->name);
  free_grads(&g1);
  free_grads(&g2);
  fixture_free(&f);
}
END_TEST

START_TEST(backward_refuses_bad_calls) {
  fixture f;
  fixture_load("conv_proj", &f);
  err e = {0};
  model_grad_call gc = {.grad_out = f.g.data};
  model_call c = f.c;
  c.encoder_hidden_states = NULL;
  ck_assert_int_eq(model_backward(f.m, &c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "encoder hidden states"));
  c = f.c;
  c.seq_len = 0;
  ck_assert_int_eq(model_backward(f.m, &c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "tokens"));
  c = f.c;
  float *bad = malloc(f.nehs * sizeof(float));
  memcpy(bad, f.ehs.data, f.nehs * sizeof(float));
  bad[3] = NAN;
  c.encoder_hidden_states = bad;
  ck_assert_int_eq(model_backward(f.m, &c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "not all finite"));
  free(bad);
  c = f.c;
  c.h = c.w = 5; /* not a multiple of 2 for two levels */
  ck_assert_int_eq(model_backward(f.m, &c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "multiple of 2"));
  fixture_free(&f);
}
END_TEST

/* denoised forward --encoder-hidden-states ... --grad-encoder-hidden-states: torch's gradients
 * through the CLI, summed over the images when one sequence stands for all. */
START_TEST(cli_writes_hidden_state_gradients) {
  char tmp[64], out[4096], path[1200];
  fixture f;
  fixture_load("conv_proj", &f);
  const char *d = f.dir;
  test_tmpdir(tmp, sizeof tmp);
  int rc = test_run_cli(out, sizeof out,
                        "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                        "--encoder-hidden-states %s/encoder_hidden_states.npy --grad-output "
                        "%s/grad_output.npy --grad-input %s/gx.npy --grad-params %s/gp.safetensors "
                        "--grad-encoder-hidden-states %s/ge.npy",
                        d, d, d, d, d, tmp, tmp, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(path, sizeof path, "%s/ge.npy", tmp);
  npy_array ge;
  err e = {0};
  ck_assert_int_eq(npy_read_f32(path, &ge, &e), 0);
  ck_assert_int_eq(ge.ndim, 3);
  ck_assert(memcmp(ge.shape, f.ehs.shape, 3 * sizeof(int64_t)) == 0);
  ck_assert_double_lt(against(d, "grad_encoder_hidden_states", ge.data, f.nehs), 1e-4);
  npy_array_free(&ge);
  snprintf(path, sizeof path, "%s/gx.npy", tmp);
  ck_assert_int_eq(npy_read_f32(path, &ge, &e), 0);
  ck_assert_double_lt(against(d, "grad_input", ge.data, f.nin), 1e-4);
  npy_array_free(&ge);
  snprintf(path, sizeof path, "%s/gp.safetensors", tmp);
  st_file *st = NULL;
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(st), model_param_count(f.m));
  ck_assert_ptr_nonnull(
      st_find(st, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"));
  st_close(st);
  /* one sequence for both images: its gradient is the sum of theirs */
  const int64_t one[3] = {1, f.ehs.shape[1], f.ehs.shape[2]};
  const size_t per = (size_t)one[1] * one[2];
  snprintf(path, sizeof path, "%s/e1.npy", tmp);
  ck_assert_int_eq(npy_write_f32(path, f.ehs.data, 3, one, &e), 0);
  float *two = malloc(f.nehs * sizeof(float));
  for (int i = 0; i < f.c.n; i++)
    memcpy(two + per * i, f.ehs.data, per * sizeof(float));
  model_call c = f.c;
  c.encoder_hidden_states = two;
  float *gtwo = calloc(f.nehs, sizeof(float));
  model_grad_call gc = {.grad_out = f.g.data, .grad_encoder_hidden_states = gtwo};
  ck_assert_msg(model_backward(f.m, &c, &gc, &e) == 0, "%s", e.msg);
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                    "--encoder-hidden-states %s/e1.npy --grad-output %s/grad_output.npy "
                    "--grad-encoder-hidden-states %s/ge1.npy",
                    d, d, d, tmp, d, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(path, sizeof path, "%s/ge1.npy", tmp);
  ck_assert_int_eq(npy_read_f32(path, &ge, &e), 0);
  ck_assert_int_eq(ge.shape[0], 1);
  for (size_t k = 0; k < per; k++)
    ck_assert_float_eq_tol(ge.data[k], gtwo[k] + gtwo[per + k], 1e-5);
  npy_array_free(&ge);
  free(two), free(gtwo);
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                    "--encoder-hidden-states %s/encoder_hidden_states.npy "
                    "--grad-encoder-hidden-states %s/ge.npy",
                    d, d, d, d, tmp);
  ck_assert_int_eq(rc, 2);
  ck_assert_msg(strstr(out, "need --grad-output"), "%s", out);
  fixture_free(&f);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("grad_cunet");
  TCase *tc = tcase_create("grad_cunet");
  tcase_set_timeout(tc, 600);
  tcase_add_loop_test(tc, cunet_gradients_match_pytorch, 0, 2);
  tcase_add_loop_test(tc, tape_forward_is_the_forward, 0, 2);
  tcase_add_loop_test(tc, cunet_gradients_do_not_depend_on_threads, 0, 2);
  tcase_add_test(tc, backward_refuses_bad_calls);
  tcase_add_test(tc, cli_writes_hidden_state_gradients);
  suite_add_tcase(s, tc);
  return s;
}
