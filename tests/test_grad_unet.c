/* The model-level backward (model_backward): a UNet2DModel's gradients w.r.t. its input, the
 * timesteps, the class-embedding rows and every parameter, checked against PyTorch autograd
 * through diffusers' UNet2DModel (tools/gen_grad_fixtures.py, tests/fixtures/grad/unet_*) and
 * against central finite differences of the engine's own forward on sampled coordinates; the
 * tape's forward against model_run; determinism over thread counts; refusals. */
#include <math.h>

#include "model.h"
#include "npy.h"
#include "safetensors.h"
#include "testutil.h"

static const char *const unet_fixtures[] = {"unet_classcond", "unet_scaleshift"};

static model *load_fixture(const char *name, char *dir, size_t n) {
  char rel[256];
  snprintf(rel, sizeof rel, "tests/fixtures/grad/%s", name);
  test_src_path(dir, n, rel);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s: %s", dir, e.msg);
  return m;
}

static float *read_npy(const char *dir, const char *name, size_t want) {
  char path[1200];
  snprintf(path, sizeof path, "%s/%s.npy", dir, name);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(path, &a, &e) == 0, "%s: %s", path, e.msg);
  ck_assert_msg((size_t)a.count == want, "%s: %lld values, want %zu", path, (long long)a.count,
                want);
  return a.data;
}

/* One fixture's inputs: x, t, labels, G; the sizes of the output and the input. */
typedef struct batch {
  model_call c;
  float *x, *t, *g;
  int64_t *labels;
  size_t nin, nout;
} batch;

static void read_batch(const model *m, const char *dir, batch *b) {
  const model_info *mi = model_get_info(m);
  char path[1200];
  memset(b, 0, sizeof *b);
  b->c.n = strstr(dir, "classcond") ? 3 : 2;
  b->c.h = b->c.w = 8;
  b->nin = (size_t)b->c.n * mi->in_channels * 64;
  b->nout = (size_t)b->c.n * mi->out_channels * 64;
  b->x = read_npy(dir, "input", b->nin);
  b->t = read_npy(dir, "timesteps", (size_t)b->c.n);
  b->g = read_npy(dir, "grad_output", b->nout);
  if (mi->num_classes) {
    int64_t count;
    int ndim;
    int64_t shape[8];
    err e = {0};
    snprintf(path, sizeof path, "%s/class_labels.npy", dir);
    ck_assert_msg(npy_read_i64(path, &b->labels, &count, &ndim, shape, &e) == 0, "%s", e.msg);
    ck_assert_int_eq(count, b->c.n);
  }
  b->c.x = b->x;
  b->c.t = b->t;
  b->c.labels = b->labels;
  b->c.threads = 2;
}

static void free_batch(batch *b) {
  free(b->x), free(b->t), free(b->g), free(b->labels);
}

/* Everything model_backward can give, freshly allocated. */
typedef struct grads {
  float *out, *dx, *dt, *dcls;
  model_grads *p;
} grads;

static void run_backward(const model *m, const batch *b, int threads, grads *g) {
  const model_info *mi = model_get_info(m);
  g->out = calloc(b->nout, sizeof(float));
  g->dx = calloc(b->nin, sizeof(float));
  g->dt = calloc((size_t)b->c.n, sizeof(float));
  g->dcls =
      mi->class_embed_dim ? calloc((size_t)b->c.n * mi->class_embed_dim, sizeof(float)) : NULL;
  err e = {0};
  ck_assert_int_eq(model_grads_new(m, &g->p, &e), 0);
  model_call c = b->c;
  c.threads = threads;
  model_grad_call gc = {.grad_out = b->g,
                        .out = g->out,
                        .grad_x = g->dx,
                        .grad_t = g->dt,
                        .grad_class = g->dcls,
                        .params = g->p};
  ck_assert_msg(model_backward(m, &c, &gc, &e) == 0, "model_backward: %s", e.msg);
}

/* A fixture's model, batch and gradients on `threads` threads. */
static model *setup(const char *name, int threads, batch *b, grads *g) {
  char dir[1024];
  model *m = load_fixture(name, dir, sizeof dir);
  read_batch(m, dir, b);
  run_backward(m, b, threads, g);
  return m;
}

static void free_grads(grads *g) {
  free(g->out), free(g->dx), free(g->dt), free(g->dcls);
  model_grads_free(g->p);
}

START_TEST(unet_gradients_match_pytorch) {
  const char *name = unet_fixtures[_i];
  char dir[1024], path[1200];
  batch b;
  grads g;
  model *m = setup(name, 2, &b, &g);
  const model_info *mi = model_get_info(m);
  snprintf(path, sizeof path, "tests/fixtures/grad/%s", name);
  test_src_path(dir, sizeof dir, path);
  float *ref = read_npy(dir, "output", b.nout);
  double fwd = test_rel_l2(g.out, ref, b.nout);
  free(ref);
  ck_assert_msg(fwd < 1e-5, "%s: forward rel L2 %.3g", name, fwd);
  ref = read_npy(dir, "grad_input", b.nin);
  double ex = test_rel_l2(g.dx, ref, b.nin), ec = 0, worst = 0;
  free(ref);
  ck_assert_msg(ex < 1e-4, "%s: dL/dx rel L2 %.3g", name, ex);
  if (mi->num_classes) {
    size_t nc = (size_t)b.c.n * mi->class_embed_dim;
    ref = read_npy(dir, "grad_class", nc);
    ec = test_rel_l2(g.dcls, ref, nc);
    free(ref);
    ck_assert_msg(ec < 1e-4, "%s: dL/d(class row) rel L2 %.3g", name, ec);
  }
  snprintf(path, sizeof path, "%s/grad_params.safetensors", dir);
  st_file *st = NULL;
  err e = {0};
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(st), model_param_count(m)); /* every parameter, no other */
  const char *worst_name = "";
  double ex_norm = 0; /* squared norm of the whole parameter gradient */
  for (int i = 0; i < model_param_count(m); i++)
    for (size_t k = 0; k < model_param_at(m, i)->count; k++)
      ex_norm += (double)model_grads_at(g.p, i)[k] * model_grads_at(g.p, i)[k];
  for (int i = 0; i < model_param_count(m); i++) {
    const model_param *mp = model_param_at(m, i);
    float *want = malloc(mp->count * sizeof(float));
    ck_assert_msg(st_read_f32(st, mp->name, mp->ndim, mp->shape, want, &e) == 0, "%s: %s", mp->name,
                  e.msg);
    /* to_k.bias has a zero gradient (softmax ignores a constant per query): torch's is round-off
     * of 1e-17, ours of 1e-9, so such a tensor is measured against the gradients' overall size */
    double num = 0, den = 0;
    for (size_t k = 0; k < mp->count; k++) {
      double d = (double)model_grads_at(g.p, i)[k] - want[k];
      num += d * d;
      den += (double)want[k] * want[k];
    }
    if (strstr(mp->name, "to_k.bias")) {
      ck_assert_msg(sqrt(num) < 1e-6 * sqrt(ex_norm), "%s: %s is not zero", name, mp->name);
      free(want);
      continue;
    }
    double r = sqrt(num / den);
    ck_assert_msg(r < 1e-4, "%s: gradient of %s rel L2 %.3g", name, mp->name, r);
    if (r > worst) {
      worst = r;
      worst_name = mp->name;
    }
    free(want);
  }
  printf("%s vs torch autograd (float64): out %.2e, dx %.2e, dclass %.2e, worst of %d params "
         "%.2e (%s)\n",
         name, fwd, ex, ec, model_param_count(m), worst, worst_name);
  st_close(st);
  free_grads(&g);
  free_batch(&b);
  model_free(m);
}
END_TEST

static double loss(const model *m, const batch *b, float *y) {
  err e = {0};
  ck_assert_msg(model_run(m, &b->c, y, &e) == 0, "%s", e.msg);
  double s = 0;
  for (size_t i = 0; i < b->nout; i++)
    s += (double)b->g[i] * y[i];
  return s;
}

/* (L(v + h) - L(v - h)) / 2h for one float v the forward reads; repack after weight changes. */
static double central(model *m, const batch *b, float *v, double h, int repack, float *y) {
  float keep = *v;
  err e = {0};
  *v = keep + (float)h;
  if (repack)
    ck_assert_int_eq(model_repack(m, &e), 0);
  double lp = loss(m, b, y);
  *v = keep - (float)h;
  if (repack)
    ck_assert_int_eq(model_repack(m, &e), 0);
  double lm = loss(m, b, y);
  *v = keep;
  if (repack)
    ck_assert_int_eq(model_repack(m, &e), 0);
  return (lp - lm) / (((double)(keep + (float)h) - (double)(keep - (float)h)));
}

/* Groups of sampled coordinates: x, t, class rows, parameters. */
enum { FD_X, FD_T, FD_CLASS, FD_PARAM, FD_GROUPS };

typedef struct fd_acc {
  double num[FD_GROUPS], den[FD_GROUPS];
  int count[FD_GROUPS];
} fd_acc;

static void fd_add(fd_acc *a, int grp, double fd, double an) {
  a->num[grp] += (fd - an) * (fd - an);
  a->den[grp] += fd * fd;
  a->count[grp]++;
}

START_TEST(unet_gradients_match_finite_differences) {
  const char *name = unet_fixtures[_i];
  batch b;
  grads g;
  model *m = setup(name, 1, &b, &g);
  const model_info *mi = model_get_info(m);
  float *y = malloc(b.nout * sizeof(float));
  fd_acc acc = {0};
  uint64_t s = 88172645463325252ull;
  for (int k = 0; k < 8; k++) { /* input pixels */
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    size_t i = s % b.nin;
    fd_add(&acc, FD_X, central(m, &b, &b.x[i], 1e-2, 0, y), g.dx[i]);
  }
  for (int i = 0; i < b.c.n; i++) /* timesteps */
    fd_add(&acc, FD_T, central(m, &b, &b.t[i], 5e-2, 0, y), g.dt[i]);
  /* The class rows: labels are distinct, so table row labels[i] is image i's row. */
  for (int k = 0; mi->num_classes && k < 8; k++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    int i = (int)(s % (uint64_t)b.c.n), j = (int)((s >> 20) % (uint64_t)mi->class_embed_dim);
    int tab = -1;
    for (int p = 0; p < model_param_count(m); p++)
      if (strcmp(model_param_at(m, p)->name, "class_embedding.weight") == 0)
        tab = p;
    ck_assert_int_ge(tab, 0);
    float *v = model_param_at(m, tab)->data + b.labels[i] * mi->class_embed_dim + j;
    fd_add(&acc, FD_CLASS, central(m, &b, v, 1e-2, 0, y),
           g.dcls[(size_t)i * mi->class_embed_dim + j]);
  }
  for (int p = 0; p < model_param_count(m); p++) { /* one coordinate of every tensor */
    const model_param *mp = model_param_at(m, p);
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    size_t i = s % mp->count;
    fd_add(&acc, FD_PARAM, central(m, &b, &mp->data[i], 1e-2, 1, y), model_grads_at(g.p, p)[i]);
  }
  static const char *const what[] = {"x", "t", "class rows", "params"};
  for (int k = 0; k < FD_GROUPS; k++) {
    if (!acc.count[k])
      continue;
    double r = sqrt(acc.num[k] / acc.den[k]);
    printf("%s: %d coordinates of %s: rel L2 to central differences %.2e\n", name, acc.count[k],
           what[k], r);
    ck_assert_msg(r < 1e-2, "%s: gradient of %s vs central differences: rel L2 %.3g", name, what[k],
                  r);
  }
  free(y);
  free_grads(&g);
  free_batch(&b);
  model_free(m);
}
END_TEST

START_TEST(tape_forward_is_the_forward) {
  batch b;
  grads g;
  model *m = setup(unet_fixtures[_i], 2, &b, &g);
  float *y = malloc(b.nout * sizeof(float));
  loss(m, &b, y);
  double r = test_rel_l2(g.out, y, b.nout);
  ck_assert_msg(r < 1e-6, "%s: tape forward vs model_run rel L2 %.3g", unet_fixtures[_i], r);
  free(y);
  free_grads(&g);
  free_batch(&b);
  model_free(m);
}
END_TEST

START_TEST(unet_gradients_do_not_depend_on_threads) {
  char dir[1024];
  model *m = load_fixture(unet_fixtures[_i], dir, sizeof dir);
  const model_info *mi = model_get_info(m);
  batch b;
  read_batch(m, dir, &b);
  grads g1, g3;
  run_backward(m, &b, 1, &g1);
  run_backward(m, &b, 3, &g3);
  ck_assert(memcmp(g1.dx, g3.dx, b.nin * sizeof(float)) == 0);
  ck_assert(memcmp(g1.dt, g3.dt, (size_t)b.c.n * sizeof(float)) == 0);
  if (mi->class_embed_dim)
    ck_assert(memcmp(g1.dcls, g3.dcls, (size_t)b.c.n * mi->class_embed_dim * sizeof(float)) == 0);
  for (int i = 0; i < model_param_count(m); i++)
    ck_assert_msg(memcmp(model_grads_at(g1.p, i), model_grads_at(g3.p, i),
                         model_param_at(m, i)->count * sizeof(float)) == 0,
                  "%s differs between 1 and 3 threads", model_param_at(m, i)->name);
  free_grads(&g1);
  free_grads(&g3);
  free_batch(&b);
  model_free(m);
}
END_TEST

/* Parameter gradients accumulate over calls; the others are written. */
START_TEST(parameter_gradients_accumulate) {
  batch b;
  grads g;
  model *m = setup("unet_scaleshift", 1, &b, &g);
  float *dx = malloc(b.nin * sizeof(float));
  memcpy(dx, g.dx, b.nin * sizeof(float));
  const model_param *mp = model_param_at(m, 0);
  float *once = malloc(mp->count * sizeof(float));
  memcpy(once, model_grads_at(g.p, 0), mp->count * sizeof(float));
  model_grad_call gc = {.grad_out = b.g, .grad_x = g.dx, .params = g.p};
  err e = {0};
  ck_assert_int_eq(model_backward(m, &b.c, &gc, &e), 0);
  ck_assert(memcmp(dx, g.dx, b.nin * sizeof(float)) == 0);
  for (size_t i = 0; i < mp->count; i++)
    ck_assert_float_eq(model_grads_at(g.p, 0)[i], once[i] + once[i]);
  model_grads_zero(g.p);
  for (size_t i = 0; i < mp->count; i++)
    ck_assert_float_eq(model_grads_at(g.p, 0)[i], 0.0f);
  free(dx), free(once);
  free_grads(&g);
  free_batch(&b);
  model_free(m);
}
END_TEST

START_TEST(backward_refuses_bad_calls) {
  char dir[1024], path[1024];
  model *m = load_fixture("unet_classcond", dir, sizeof dir);
  model *other = load_fixture("unet_scaleshift", dir, sizeof dir);
  batch b;
  read_batch(m, test_src_path(path, sizeof path, "tests/fixtures/grad/unet_classcond"), &b);
  err e = {0};
  model_grad_call gc = {.grad_out = b.g};
  model_call c = b.c;
  int64_t bad[3] = {0, 5, 1};
  c.labels = bad;
  ck_assert_int_eq(model_backward(m, &c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "class label 5"));
  c = b.c;
  float mid[3 * 8 * 4 * 4];
  c.hooks.mid_save = mid;
  ck_assert_int_eq(model_backward(m, &c, &gc, &e), ERR_UNSUPPORTED);
  ck_assert_ptr_nonnull(strstr(e.msg, "hooks"));
  model_grads *pg = NULL;
  ck_assert_int_eq(model_grads_new(other, &pg, &e), 0);
  gc.params = pg;
  ck_assert_int_eq(model_backward(m, &b.c, &gc, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "another model"));
  gc = (model_grad_call){0};
  ck_assert_int_eq(model_backward(m, &b.c, &gc, &e), ERR_INVALID);
  model_grads_free(pg);
  model *gmm = NULL;
  ck_assert_int_eq(model_load(test_src_path(path, sizeof path, "models/shapes-gmm"), &gmm, &e), 0);
  ck_assert_int_eq(model_param_count(gmm), 0);
  ck_assert_ptr_null(model_param_at(gmm, 0));
  ck_assert_int_eq(model_grads_new(gmm, &pg, &e), ERR_UNSUPPORTED);
  gc.grad_out = b.g;
  ck_assert_int_eq(model_backward(gmm, &b.c, &gc, &e), ERR_UNSUPPORTED);
  ck_assert_ptr_nonnull(strstr(e.msg, "GaussianMixtureDenoiser"));
  model_free(gmm);
  free_batch(&b);
  model_free(other);
  model_free(m);
}
END_TEST

/* Legacy attention names (query/key/value/proj_attn, as google/ddpm-* store them) are given
 * diffusers' modern names, so gradients and checkpoints always use to_q/to_k/to_v/to_out.0. */
START_TEST(parameters_carry_modern_names) {
  char dir[1024];
  model *m = load_fixture("unet_classcond", dir, sizeof dir);
  int attn = 0;
  int64_t total = 0;
  for (int i = 0; i < model_param_count(m); i++) {
    const model_param *mp = model_param_at(m, i);
    ck_assert_ptr_null(strstr(mp->name, "query"));
    ck_assert_ptr_null(strstr(mp->name, "proj_attn"));
    if (strstr(mp->name, "to_out.0.weight")) {
      attn++;
      ck_assert_int_eq(mp->ndim, 2);
    }
    total += (int64_t)mp->count;
  }
  ck_assert_int_gt(attn, 0);
  ck_assert_int_eq(total, model_get_info(m)->num_params);
  model_free(m);
}
END_TEST

/* The learned tensors written with st_write_f32 beside the config make a model folder that
 * model_load takes back and that computes the very same output (a checkpoint's round trip). */
START_TEST(params_written_as_safetensors_load_back) {
  char dir[1024], tmp[64], path[1200];
  model *m = load_fixture("unet_classcond", dir, sizeof dir);
  batch b;
  read_batch(m, dir, &b);
  int n = model_param_count(m);
  st_out_tensor *t = calloc((size_t)n, sizeof *t);
  for (int i = 0; i < n; i++) {
    const model_param *mp = model_param_at(m, i);
    t[i] = (st_out_tensor){mp->name, mp->ndim, mp->shape, mp->data};
  }
  test_tmpdir(tmp, sizeof tmp);
  snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", tmp);
  const char *meta[] = {"format", "pt"};
  err e = {0};
  ck_assert_msg(st_write_f32(path, t, n, meta, 1, &e) == 0, "%s", e.msg);
  free(t);
  char src[1200], dst[1200];
  snprintf(src, sizeof src, "%s/config.json", dir);
  snprintf(dst, sizeof dst, "%s/config.json", tmp);
  FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
  int ch;
  while ((ch = fgetc(in)) != EOF)
    fputc(ch, out);
  fclose(in);
  fclose(out);
  model *back = NULL;
  ck_assert_msg(model_load(tmp, &back, &e) == 0, "%s", e.msg);
  float *y1 = malloc(b.nout * sizeof(float)), *y2 = malloc(b.nout * sizeof(float));
  loss(m, &b, y1);
  loss(back, &b, y2);
  ck_assert(memcmp(y1, y2, b.nout * sizeof(float)) == 0);
  free(y1), free(y2);
  model_free(back);
  free_batch(&b);
  model_free(m);
}
END_TEST

/* denoised forward --grad-output: the CLI writes what model_backward gives (torch's gradients). */
START_TEST(cli_writes_gradients) {
  char dir[1024], tmp[64], out[4096];
  test_src_path(dir, sizeof dir, "tests/fixtures/grad/unet_classcond");
  test_tmpdir(tmp, sizeof tmp);
  int rc = test_run_cli(out, sizeof out,
                        "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                        "--class-labels %s/class_labels.npy --grad-output %s/grad_output.npy "
                        "--grad-input %s/gx.npy --grad-params %s/gp.safetensors",
                        dir, dir, dir, dir, dir, tmp, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  char path[1200];
  snprintf(path, sizeof path, "%s/gx.npy", tmp);
  npy_array gx;
  err e = {0};
  ck_assert_int_eq(npy_read_f32(path, &gx, &e), 0);
  float *want = read_npy(dir, "grad_input", (size_t)gx.count);
  ck_assert_double_lt(test_rel_l2(gx.data, want, (size_t)gx.count), 1e-4);
  free(want);
  npy_array_free(&gx);
  snprintf(path, sizeof path, "%s/gp.safetensors", tmp);
  st_file *st = NULL;
  ck_assert_msg(st_open(path, &st, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(st), 145);
  ck_assert_ptr_nonnull(st_find(st, "down_blocks.1.attentions.0.to_q.weight"));
  st_close(st);
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                    "--class-labels %s/class_labels.npy --grad-output %s/timesteps.npy "
                    "--grad-input %s/gx.npy",
                    dir, dir, dir, dir, dir, tmp);
  ck_assert_int_eq(rc, 1);
  ck_assert_msg(strstr(out, "expected the output's shape [3, 3, 8, 8]"), "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps "
                    "%s/timesteps.npy --grad-input %s/gx.npy",
                    dir, dir, dir, tmp);
  ck_assert_int_eq(rc, 2);
  ck_assert_ptr_nonnull(strstr(out, "need --grad-output"));
}
END_TEST

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Not a check: with DENOISED_GRAD_BENCH=1, the median forward (model_run) and forward + backward
 * (model_backward, every gradient) of the default model (glyphs32) at batch
 * DENOISED_GRAD_BATCH (8) on DENOISED_GRAD_THREADS (2) threads. */
START_TEST(unet_backward_cost) {
  const char *on = getenv("DENOISED_GRAD_BENCH");
  if (!on || *on != '1')
    return;
  char path[1024];
  const char *dir = getenv("DENOISED_GRAD_MODEL");
  if (!dir)
    dir = test_src_path(path, sizeof path, "models/glyphs32");
  int n = getenv("DENOISED_GRAD_BATCH") ? atoi(getenv("DENOISED_GRAD_BATCH")) : 8;
  int threads = getenv("DENOISED_GRAD_THREADS") ? atoi(getenv("DENOISED_GRAD_THREADS")) : 2;
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  const model_info *mi = model_get_info(m);
  int hw = mi->sample_size;
  size_t nin = (size_t)n * mi->in_channels * hw * hw, nout = (size_t)n * mi->out_channels * hw * hw;
  float *x = malloc(nin * sizeof(float)), *y = malloc(nout * sizeof(float));
  float *g = malloc(nout * sizeof(float)), *dx = malloc(nin * sizeof(float)), t[256];
  int64_t labels[256];
  for (size_t i = 0; i < nin; i++)
    x[i] = (float)((i * 7919 % 1000) / 500.0 - 1.0);
  for (size_t i = 0; i < nout; i++)
    g[i] = (float)((i * 104729 % 1000) / 500.0 - 1.0);
  for (int i = 0; i < n; i++) {
    t[i] = (float)(37 * i % 1000);
    labels[i] = mi->num_classes ? i % mi->num_classes : 0;
  }
  model_grads *pg = NULL;
  ck_assert_int_eq(model_grads_new(m, &pg, &e), 0);
  model_call c = {.x = x, .n = n, .h = hw, .w = hw, .t = t, .threads = threads};
  c.labels = mi->num_classes ? labels : NULL;
  model_grad_call gc = {.grad_out = g, .grad_x = dx, .params = pg};
  double tf[5], tb[5];
  for (int r = 0; r < 5; r++) {
    double t0 = test_now_s();
    ck_assert_int_eq(model_run(m, &c, y, &e), 0);
    double t1 = test_now_s();
    ck_assert_msg(model_backward(m, &c, &gc, &e) == 0, "%s", e.msg);
    tb[r] = test_now_s() - t1;
    tf[r] = t1 - t0;
  }
  qsort(tf, 5, sizeof *tf, cmp_double);
  qsort(tb, 5, sizeof *tb, cmp_double);
  printf("unet backward cost (%s, batch %d, %dx%d, %d threads): forward %.1f ms, forward + "
         "backward %.1f ms = %.2fx the forward\n",
         dir, n, hw, hw, threads, tf[2] * 1e3, tb[2] * 1e3, tb[2] / tf[2]);
  model_grads_free(pg);
  free(x), free(y), free(g), free(dx);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("grad_unet");
  TCase *tc = tcase_create("grad_unet");
  tcase_set_timeout(tc, 600);
  tcase_add_loop_test(tc, unet_gradients_match_pytorch, 0, 2);
  tcase_add_loop_test(tc, unet_gradients_match_finite_differences, 0, 2);
  tcase_add_loop_test(tc, tape_forward_is_the_forward, 0, 2);
  tcase_add_loop_test(tc, unet_gradients_do_not_depend_on_threads, 0, 2);
  tcase_add_test(tc, parameter_gradients_accumulate);
  tcase_add_test(tc, backward_refuses_bad_calls);
  tcase_add_test(tc, parameters_carry_modern_names);
  tcase_add_test(tc, params_written_as_safetensors_load_back);
  tcase_add_test(tc, cli_writes_gradients);
  tcase_add_test(tc, unet_backward_cost);
  suite_add_tcase(s, tc);
  return s;
}
