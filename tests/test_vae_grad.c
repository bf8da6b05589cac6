/* The AutoencoderKL's backward (vae_encode_backward, vae_decode_backward): forward and every
 * gradient against PyTorch autograd through diffusers' AutoencoderKL in float64
 * (tools/gen_vae_grad_fixtures.py, tests/fixtures/vae_grad), the tape's forward against the
 * engine's, 1 vs 2 threads bit-identical, the CLI's --grad-output, and refusals. */
#include <math.h>
#include <string.h>

#include "npy.h"
#include "safetensors.h"
#include "testfx.h"
#include "testutil.h"
#include "vae.h"

static const char *const fixtures[] = {"two_level", "three_level"};

#define FX "vae_grad"

static float **new_grads(const vae *v) {
  float **pg = calloc((size_t)vae_param_count(v), sizeof *pg);
  for (int i = 0; i < vae_param_count(v); i++)
    pg[i] = calloc(vae_param_at(v, i)->count, sizeof(float));
  return pg;
}

static void free_grads(const vae *v, float **pg) {
  for (int i = 0; i < vae_param_count(v); i++)
    free(pg[i]);
  free(pg);
}

/* One direction of a fixture: its input, upstream gradient, and our results. */
typedef struct run {
  npy_array in, g;
  float *out, *gin, **pg;
  size_t nout;
} run;

static void run_one(const vae *v, const char *fx, int encoder, int threads, run *r) {
  test_fx_read_f32(&r->in, FX "/%s/%s", fx, encoder ? "input.npy" : "latents.npy");
  test_fx_read_f32(&r->g, FX "/%s/%s", fx, encoder ? "grad_moments.npy" : "grad_decoded.npy");
  r->nout = (size_t)r->g.count;
  r->out = malloc(r->nout * sizeof(float));
  r->gin = malloc((size_t)r->in.count * sizeof(float));
  r->pg = new_grads(v);
  vae_grad_call gc = {
      .grad_out = r->g.data, .out = r->out, .grad_in = r->gin, .params = r->pg, .threads = threads};
  err e = {0};
  const int n = (int)r->in.shape[0], h = (int)r->in.shape[2], w = (int)r->in.shape[3];
  int rc = encoder ? vae_encode_backward(v, r->in.data, n, h, w, &gc, &e)
                   : vae_decode_backward(v, r->in.data, n, h, w, &gc, &e);
  ck_assert_msg(rc == ERR_OK, "%s: %s", fx, e.msg);
}

static void free_run(const vae *v, run *r) {
  npy_array_free(&r->in);
  npy_array_free(&r->g);
  free(r->out);
  free(r->gin);
  free_grads(v, r->pg);
}

/* Every parameter's gradient against the reference file; returns the worst rel L2. Tensors the
 * reference leaves at exactly zero (the other network's) must be zero here too; to_k.bias has a
 * zero gradient in exact arithmetic (softmax ignores a constant per query), so it is measured
 * against the size of the whole gradient. */
static double check_params(const vae *v, const char *fx, const char *file, float **pg,
                           const char **worst_name) {
  char path[512];
  test_fx_path(path, sizeof path, FX "/%s/%s", fx, file);
  st_file *st = NULL;
  err e = {0};
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(st), vae_param_count(v));
  double total = 0, worst = 0;
  for (int i = 0; i < vae_param_count(v); i++)
    for (size_t k = 0; k < vae_param_at(v, i)->count; k++)
      total += (double)pg[i][k] * pg[i][k];
  for (int i = 0; i < vae_param_count(v); i++) {
    const model_param *mp = vae_param_at(v, i);
    float *want = malloc(mp->count * sizeof(float));
    ck_assert_msg(st_read_f32(st, mp->name, mp->ndim, mp->shape, want, &e) == 0, "%s: %s", mp->name,
                  e.msg);
    double num = 0, den = 0;
    for (size_t k = 0; k < mp->count; k++) {
      double d = (double)pg[i][k] - want[k];
      num += d * d;
      den += (double)want[k] * want[k];
    }
    if (den == 0) {
      ck_assert_msg(num == 0, "%s %s: %s should have no gradient", fx, file, mp->name);
    } else if (strstr(mp->name, "to_k.bias")) {
      ck_assert_msg(sqrt(num) < 1e-6 * sqrt(total), "%s: %s is not zero", fx, mp->name);
    } else {
      double r = sqrt(num / den);
      ck_assert_msg(r < 1e-4, "%s %s: gradient of %s rel L2 %.3g", fx, file, mp->name, r);
      if (r > worst) {
        worst = r;
        *worst_name = mp->name;
      }
    }
    free(want);
  }
  st_close(st);
  return worst;
}

START_TEST(gradients_match_pytorch) {
  const char *fx = fixtures[_i];
  vae *v = test_fx_vae(FX "/%s", fx);
  for (int encoder = 1; encoder >= 0; encoder--) {
    run r;
    run_one(v, fx, encoder, 2, &r);
    npy_array want;
    test_fx_read_f32(&want, FX "/%s/%s", fx, encoder ? "moments.npy" : "decoded.npy");
    ck_assert_int_eq((int)want.count, (int)r.nout);
    const double fwd = test_rel_l2(r.out, want.data, r.nout);
    npy_array_free(&want);
    ck_assert_msg(fwd < 1e-5, "%s: forward rel L2 %.3g", fx, fwd);
    test_fx_read_f32(&want, FX "/%s/%s", fx, encoder ? "enc_grad_input.npy" : "dec_grad_input.npy");
    const double gin = test_rel_l2(r.gin, want.data, (size_t)want.count);
    npy_array_free(&want);
    ck_assert_msg(gin < 1e-4, "%s: input gradient rel L2 %.3g", fx, gin);
    const char *wn = "";
    const double worst = check_params(
        v, fx, encoder ? "enc_grad_params.safetensors" : "dec_grad_params.safetensors", r.pg, &wn);
    printf("vae grad %s %s vs torch autograd (float64): out %.2e, d input %.2e, worst of %d "
           "params %.2e (%s)\n",
           fx, encoder ? "encode" : "decode", fwd, gin, vae_param_count(v), worst, wn);
    free_run(v, &r);
  }
  vae_free(v);
}
END_TEST

/* The tape's forward is the engine's: vae_encode's mean and std, vae_decode's images. */
START_TEST(tape_forward_is_the_forward) {
  const char *fx = fixtures[_i];
  vae *v = test_fx_vae(FX "/%s", fx);
  run re, rd;
  run_one(v, fx, 1, 1, &re);
  run_one(v, fx, 0, 1, &rd);
  const int n = (int)re.in.shape[0], h = (int)re.in.shape[2], w = (int)re.in.shape[3];
  const size_t per = re.nout / (size_t)n / 2;
  float *mean = malloc(per * n * sizeof(float)), *std = malloc(per * n * sizeof(float));
  float *dec = malloc(rd.nout * sizeof(float));
  err e = {0};
  ck_assert_int_eq(vae_encode(v, re.in.data, n, h, w, mean, std, 1, &e), ERR_OK);
  ck_assert_int_eq(vae_decode(v, rd.in.data, (int)rd.in.shape[0], (int)rd.in.shape[2],
                              (int)rd.in.shape[3], VAE_TILE_OFF, dec, 1, &e),
                   ERR_OK);
  double dm = 0, dm2 = 0;
  for (size_t i = 0; i < per * n; i++) {
    const size_t img = i / per, k = i % per;
    dm = fmax(dm, fabs(mean[i] - re.out[2 * per * img + k]));
    dm2 = fmax(dm2, fabs(std[i] - expf(0.5f * re.out[2 * per * img + per + k])));
  }
  ck_assert_msg(dm < 1e-5 && dm2 < 1e-5, "%s: tape moments vs vae_encode: %g %g", fx, dm, dm2);
  ck_assert_msg(test_rel_l2(rd.out, dec, rd.nout) < 1e-6, "%s: tape decode vs vae_decode", fx);
  free(mean), free(std), free(dec);
  free_run(v, &re);
  free_run(v, &rd);
  vae_free(v);
}
END_TEST

START_TEST(gradients_do_not_depend_on_threads) {
  const char *fx = fixtures[_i];
  vae *v = test_fx_vae(FX "/%s", fx);
  for (int encoder = 0; encoder < 2; encoder++) {
    run a, b;
    run_one(v, fx, encoder, 1, &a);
    run_one(v, fx, encoder, 2, &b);
    ck_assert(memcmp(a.out, b.out, a.nout * sizeof(float)) == 0);
    ck_assert(memcmp(a.gin, b.gin, (size_t)a.in.count * sizeof(float)) == 0);
    for (int i = 0; i < vae_param_count(v); i++)
      ck_assert_msg(memcmp(a.pg[i], b.pg[i], vae_param_at(v, i)->count * sizeof(float)) == 0,
                    "%s: %s differs between 1 and 2 threads", fx, vae_param_at(v, i)->name);
    free_run(v, &a);
    free_run(v, &b);
  }
  vae_free(v);
}
END_TEST

/* The encoder's log-variance is clamped to [-30, 20]: its gradient vanishes outside. */
static int push_logvar(const float *out, float *g, void *user, err *e) {
  (void)e;
  const size_t *sz = user; /* per-image moments, images */
  for (size_t i = 0; i < sz[0] * sz[1]; i++)
    g[i] = i % sz[0] >= sz[0] / 2 ? 1.0f : 0.0f;
  (void)out;
  return ERR_OK;
}

START_TEST(clamped_logvar_has_no_gradient) {
  vae *v = test_fx_vae(FX "/"
                          "two_level");
  /* shift quant_conv's log-variance biases far above 20: every logvar clamps */
  const vae_info *vi = vae_get_info(v);
  float *bias = NULL;
  for (int i = 0; i < vae_param_count(v); i++)
    if (strcmp(vae_param_at(v, i)->name, "quant_conv.bias") == 0)
      bias = vae_param_at(v, i)->data;
  ck_assert_ptr_nonnull(bias);
  for (int c = vi->latent_channels; c < 2 * vi->latent_channels; c++)
    bias[c] += 1000.0f;
  err e = {0};
  ck_assert_int_eq(vae_repack(v, &e), ERR_OK);
  npy_array x;
  test_fx_read_f32(&x, FX "/two_level/input.npy");
  const int n = (int)x.shape[0], h = (int)x.shape[2], w = (int)x.shape[3];
  size_t sz[2] = {(size_t)2 * vi->latent_channels * (h / vi->factor) * (w / vi->factor), (size_t)n};
  float *gx = malloc((size_t)x.count * sizeof(float)), *mom = malloc(sz[0] * sz[1] * 4);
  vae_grad_call gc = {
      .loss_grad = push_logvar, .loss_user = sz, .out = mom, .grad_in = gx, .threads = 1};
  ck_assert_msg(vae_encode_backward(v, x.data, n, h, w, &gc, &e) == ERR_OK, "%s", e.msg);
  for (size_t i = 0; i < sz[0] * sz[1]; i++)
    if (i % sz[0] >= sz[0] / 2)
      ck_assert_float_eq(mom[i], 20.0f);
  for (int64_t i = 0; i < x.count; i++)
    ck_assert_float_eq(gx[i], 0.0f);
  free(gx), free(mom);
  npy_array_free(&x);
  vae_free(v);
}
END_TEST

START_TEST(backward_refuses_bad_calls) {
  vae *v = test_fx_vae(FX "/"
                          "two_level");
  float x[3 * 12 * 12] = {0}, g[64 * 64] = {0};
  err e = {0};
  vae_grad_call gc = {.grad_out = g, .threads = 1};
  ck_assert_int_eq(vae_encode_backward(v, x, 1, 11, 11, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "multiple of 2"));
  x[5] = NAN;
  ck_assert_int_eq(vae_decode_backward(v, x, 1, 4, 4, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "NaN"));
  x[5] = 0;
  gc.grad_out = NULL;
  ck_assert_int_eq(vae_decode_backward(v, x, 1, 4, 4, &gc, &e), ERR_INVALID);
  vae_free(v);
}
END_TEST

/* `vae encode|decode --grad-output` writes the same gradients as the fixtures' reference. */
START_TEST(cli_writes_gradients) {
  char dir[64], fxd[512], g[512], out[4096], path[600];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_fx_path(fxd, sizeof fxd, FX "/two_level");
  test_fx_path(g, sizeof g, FX "/two_level/grad_decoded.npy");
  int st = test_run_cli(out, sizeof out,
                        "vae decode --model %s --input %s/latents.npy --grad-output %s "
                        "--grad-input %s/gz.npy --grad-params %s/gp.safetensors --threads 1",
                        fxd, fxd, g, dir, dir);
  ck_assert_msg(st == 0, "%s", out);
  npy_array gz, want;
  err e = {0};
  snprintf(path, sizeof path, "%s/gz.npy", dir);
  ck_assert_int_eq(npy_read_f32(path, &gz, &e), ERR_OK);
  test_fx_read_f32(&want, FX "/two_level/dec_grad_input.npy");
  ck_assert_int_eq((int)gz.count, (int)want.count);
  ck_assert(test_rel_l2(gz.data, want.data, (size_t)gz.count) < 1e-4);
  npy_array_free(&gz);
  npy_array_free(&want);
  vae *v = test_fx_vae(FX "/"
                          "two_level");
  float **pg = new_grads(v);
  st_file *sf = NULL;
  snprintf(path, sizeof path, "%s/gp.safetensors", dir);
  ck_assert_int_eq(st_open(path, &sf, &e), ERR_OK);
  for (int i = 0; i < vae_param_count(v); i++) {
    const model_param *mp = vae_param_at(v, i);
    ck_assert_int_eq(st_read_f32(sf, mp->name, mp->ndim, mp->shape, pg[i], &e), ERR_OK);
  }
  st_close(sf);
  const char *wn = "";
  check_params(v, "two_level", "dec_grad_params.safetensors", pg, &wn);
  free_grads(v, pg);
  vae_free(v);
  /* the encoder's G may weight the mean alone */
  test_fx_path(g, sizeof g, FX "/two_level/latents.npy"); /* [2, 4, 8, 8]: the mean's shape */
  st = test_run_cli(out, sizeof out,
                    "vae encode --model %s --input %s/input.npy --grad-output %s "
                    "--grad-input %s/gx.npy",
                    fxd, fxd, g, dir);
  ck_assert_msg(st == 0, "%s", out);
  test_fx_path(g, sizeof g, FX "/two_level/grad_decoded.npy");
  st = test_run_cli(out, sizeof out,
                    "vae encode --model %s --input %s/input.npy --grad-output %s "
                    "--grad-input %s/gx.npy",
                    fxd, fxd, g, dir);
  ck_assert_int_eq(st, 1);
  ck_assert_msg(strstr(out, "--grad-output") && strstr(out, "expected [2, 8, 8, 8]"), "%s", out);
  st = test_run_cli(out, sizeof out, "vae decode --model %s --input %s/latents.npy --grad-input x",
                    fxd, fxd);
  ck_assert_int_eq(st, 2);
  ck_assert_msg(strstr(out, "need --grad-output"), "%s", out);
  snprintf(path, sizeof path, "rm -rf %s", dir);
  ck_assert_int_eq(system(path), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("vae_grad");
  TCase *tc = tcase_create("vae_grad");
  tcase_set_timeout(tc, 600);
  tcase_add_loop_test(tc, gradients_match_pytorch, 0, 2);
  tcase_add_loop_test(tc, tape_forward_is_the_forward, 0, 2);
  tcase_add_loop_test(tc, gradients_do_not_depend_on_threads, 0, 2);
  tcase_add_test(tc, clamped_logvar_has_no_gradient);
  tcase_add_test(tc, backward_refuses_bad_calls);
  tcase_add_test(tc, cli_writes_gradients);
  suite_add_tcase(s, tc);
  return s;
}
