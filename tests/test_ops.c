/* Tensor-core ops against naive double-precision references: convolutions of
 * every shape the UNet uses (1x1, 3x3, stride 2, asymmetric padding), group
 * norm, attention, resampling, embeddings, and the arena. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "arena.h"
#include "ops.h"
#include "rng.h"
#include "testutil.h"

static float *randn(size_t n, uint64_t stream) {
  float *p = malloc(n * sizeof *p);
  rng_normal(42, 0, stream, p, n);
  return p;
}

static void naive_conv(const conv2d *c, const float *x, int n, int h, int w, double *y) {
  int oh, ow;
  ops_conv2d_out_size(c, h, w, &oh, &ow);
  for (int b = 0; b < n; b++)
    for (int o = 0; o < c->cout; o++)
      for (int oy = 0; oy < oh; oy++)
        for (int ox = 0; ox < ow; ox++) {
          double s = c->bias ? c->bias[o] : 0;
          for (int i = 0; i < c->cin; i++)
            for (int ky = 0; ky < c->k; ky++)
              for (int kx = 0; kx < c->k; kx++) {
                int iy = oy * c->stride - c->pad_top + ky, ix = ox * c->stride - c->pad_left + kx;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w)
                  continue;
                s += (double)c->weight[((o * c->cin + i) * c->k + ky) * c->k + kx] *
                     x[((size_t)(b * c->cin + i) * h + iy) * w + ix];
              }
          y[((size_t)(b * c->cout + o) * oh + oy) * ow + ox] = s;
        }
}

static double rel_err_d(const float *a, const double *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

static void check_conv(int cin, int cout, int k, int stride, int pt, int pl, int pb, int pr, int n,
                       int h, int w, int threads) {
  conv2d c = {.cin = cin,
              .cout = cout,
              .k = k,
              .stride = stride,
              .pad_top = pt,
              .pad_left = pl,
              .pad_bottom = pb,
              .pad_right = pr};
  float *wt = randn((size_t)cout * cin * k * k, 1), *b = randn((size_t)cout, 2);
  float *x = randn((size_t)n * cin * h * w, 3);
  c.weight = wt;
  c.bias = b;
  ck_assert_int_eq(ops_conv2d_pack(&c), 0);
  int oh, ow;
  ops_conv2d_out_size(&c, h, w, &oh, &ow);
  size_t cnt = (size_t)n * cout * oh * ow;
  float *y = malloc(cnt * sizeof *y);
  double *ref = malloc(cnt * sizeof *ref);
  arena *a = arena_new(1 << 20);
  pool *p = pool_new(threads);
  ck_assert_int_eq(ops_conv2d(&c, x, n, h, w, y, a, p), 0);
  pool_free(p);
  naive_conv(&c, x, n, h, w, ref);
  double err = rel_err_d(y, ref, cnt);
  /* Winograd F(4x4,3x3) trades a little float accuracy for 4x fewer multiplies
   * (about 2e-6 per layer measured; UNet parity stays near 5e-6). */
  double tol = c.wino ? 1e-5 : 1e-6;
  ck_assert_msg(err < tol, "conv %dx%d s%d cin %d cout %d%s: rel err %g", k, k, stride, cin, cout,
                c.wino ? " (winograd)" : "", err);
  arena_free(a);
  ops_conv2d_unpack(&c);
  free(wt);
  free(b);
  free(x);
  free(y);
  free(ref);
}

START_TEST(conv_shapes) {
  check_conv(3, 8, 3, 1, 1, 1, 1, 1, 2, 9, 7, 1);      /* conv_in-like, odd sizes */
  check_conv(16, 8, 1, 1, 0, 0, 0, 0, 2, 5, 5, 2);     /* 1x1 shortcut, direct path */
  check_conv(8, 8, 3, 2, 1, 1, 1, 1, 1, 8, 8, 2);      /* stride-2 downsample, padding 1 */
  check_conv(8, 8, 3, 2, 0, 0, 1, 1, 3, 8, 8, 2);      /* diffusers' (0,1,0,1) pad, padding 0 */
  check_conv(4, 64, 3, 1, 1, 1, 1, 1, 1, 2, 2, 2);     /* tiny image: channel split */
  check_conv(128, 16, 3, 1, 1, 1, 1, 1, 1, 48, 48, 2); /* Winograd, several blocks */
  check_conv(16, 24, 3, 1, 1, 1, 1, 1, 3, 5, 7, 2);    /* Winograd, ragged edge tiles */
  check_conv(32, 32, 3, 1, 1, 1, 1, 1, 16, 4, 4, 2);   /* Winograd, one tile per image */
  check_conv(8, 8, 3, 1, 1, 1, 1, 1, 1, 80, 80, 2);    /* im2col, several row tiles */
}
END_TEST

START_TEST(group_norm_matches_reference) {
  int n = 2, c = 8, hw = 10, groups = 4;
  float *x = randn((size_t)n * c * hw, 4), *g = randn(c, 5), *b = randn(c, 6);
  for (int i = 0; i < n * c * hw; i++)
    x[i] = x[i] * 3 + 100; /* large mean: a one-pass variance would lose digits */
  float *y = malloc(sizeof(float) * n * c * hw), *ys = malloc(sizeof(float) * n * c * hw);
  pool *pl = pool_new(2);
  ops_group_norm(x, n, c, hw, groups, 1e-6f, g, b, 0, y, pl);
  pool_free(pl);
  ops_group_norm(x, n, c, hw, groups, 1e-6f, g, b, 1, ys, NULL);
  int cpg = c / groups;
  for (int bi = 0; bi < n; bi++)
    for (int gi = 0; gi < groups; gi++) {
      double mean = 0, var = 0;
      const float *p = x + ((size_t)bi * c + gi * cpg) * hw;
      for (int i = 0; i < cpg * hw; i++)
        mean += p[i];
      mean /= cpg * hw;
      for (int i = 0; i < cpg * hw; i++)
        var += (p[i] - mean) * (p[i] - mean);
      var /= cpg * hw;
      for (int i = 0; i < cpg * hw; i++) {
        int ch = gi * cpg + i / hw;
        double ref = (p[i] - mean) / sqrt(var + 1e-6) * g[ch] + b[ch];
        size_t at = ((size_t)bi * c + gi * cpg) * hw + i;
        ck_assert_double_eq_tol(y[at], ref, 1e-4);
        ck_assert_double_eq_tol(ys[at], ref / (1 + exp(-ref)), 1e-4);
      }
    }
  free(x);
  free(g);
  free(b);
  free(y);
  free(ys);
}
END_TEST

/* Attention written out per element, in the token-major form of diffusers. */
static void naive_attention(const attn_weights *aw, const float *x, int n, int hw, double *y) {
  int c = aw->channels, dh = c / aw->heads;
  float *xn = malloc(sizeof(float) * n * c * hw);
  ops_group_norm(x, n, c, hw, aw->groups, aw->eps, aw->norm_gamma, aw->norm_beta, 0, xn, NULL);
  double *q = malloc(sizeof(double) * hw * c), *k = malloc(sizeof(double) * hw * c);
  double *v = malloc(sizeof(double) * hw * c), *o = malloc(sizeof(double) * hw * c);
  double *p = malloc(sizeof(double) * hw);
  for (int b = 0; b < n; b++) {
    const float *xb = xn + (size_t)b * c * hw;
    for (int l = 0; l < hw; l++)
      for (int j = 0; j < c; j++) {
        double sq = aw->bq[j], sk = aw->bk[j], sv = aw->bv[j];
        for (int i = 0; i < c; i++) {
          double xi = xb[(size_t)i * hw + l];
          sq += aw->wq[j * c + i] * xi;
          sk += aw->wk[j * c + i] * xi;
          sv += aw->wv[j * c + i] * xi;
        }
        q[l * c + j] = sq;
        k[l * c + j] = sk;
        v[l * c + j] = sv;
      }
    for (int h = 0; h < aw->heads; h++)
      for (int l = 0; l < hw; l++) {
        double mx = -1e300, sum = 0;
        for (int m = 0; m < hw; m++) {
          double s = 0;
          for (int d = 0; d < dh; d++)
            s += q[l * c + h * dh + d] * k[m * c + h * dh + d];
          p[m] = s / sqrt(dh);
          mx = p[m] > mx ? p[m] : mx;
        }
        for (int m = 0; m < hw; m++)
          sum += (p[m] = exp(p[m] - mx));
        for (int d = 0; d < dh; d++) {
          double s = 0;
          for (int m = 0; m < hw; m++)
            s += p[m] / sum * v[m * c + h * dh + d];
          o[l * c + h * dh + d] = s;
        }
      }
    for (int l = 0; l < hw; l++)
      for (int j = 0; j < c; j++) {
        double s = aw->bo[j];
        for (int i = 0; i < c; i++)
          s += aw->wo[j * c + i] * o[l * c + i];
        size_t at = ((size_t)b * c + j) * hw + l;
        y[at] = (s + x[at]) / aw->rescale;
      }
  }
  free(xn);
  free(q);
  free(k);
  free(v);
  free(o);
  free(p);
}

/* The fused time-embedding norm gives the separate passes' bits: add folded in before the norm,
 * and with mod (scale_shift) the normed h * (1 + scale) + shift before a SiLU (the separate pass
 * here uses ops_silu, the same SiLU); on 2 threads as on 1. The residual is (a + y) / scale. */
START_TEST(group_norm_temb_matches_passes) {
  const int n = 2, c = 8, hw = 37, groups = 4;
  const size_t count = (size_t)n * c * hw;
  float *x = randn(count, 7), *g = randn(c, 8), *b = randn(c, 9), *add = randn((size_t)n * c, 10);
  float *mod = randn((size_t)n * 2 * c, 11);
  float *want = malloc(sizeof(float) * count), *got = malloc(sizeof(float) * count);
  pool *pl = pool_new(2);
  for (int mode = 0; mode < 2; mode++) {
    for (int i = 0; i < n; i++)
      for (int ch = 0; ch < c; ch++)
        for (int p = 0; p < hw; p++) {
          size_t at = ((size_t)i * c + ch) * hw + p;
          want[at] = mode ? x[at] : x[at] + add[(size_t)i * c + ch];
        }
    ops_group_norm(want, n, c, hw, groups, 1e-5f, g, b, !mode, want, NULL);
    if (mode) {
      for (int i = 0; i < n; i++)
        for (int ch = 0; ch < c; ch++)
          for (int p = 0; p < hw; p++) {
            size_t at = ((size_t)i * c + ch) * hw + p;
            want[at] =
                want[at] * (1.0f + mod[(size_t)i * 2 * c + ch]) + mod[(size_t)i * 2 * c + c + ch];
          }
      ops_silu(want, count, want);
    }
    for (int threads = 1; threads <= 2; threads++) {
      memcpy(got, x, sizeof(float) * count);
      ops_group_norm_temb(got, n, c, hw, groups, 1e-5f, g, b, mode ? NULL : add, mode ? mod : NULL,
                          1, got, threads == 2 ? pl : NULL);
      ck_assert_msg(memcmp(got, want, sizeof(float) * count) == 0,
                    "fused group norm (%s, %d threads) differs from the separate passes",
                    mode ? "scale_shift" : "add", threads);
    }
  }
  memcpy(got, x, sizeof(float) * count);
  ops_residual(add, (size_t)n * c, 0.5f, got, pl);
  for (int i = 0; i < n * c; i++)
    ck_assert_float_eq(got[i], (add[i] + x[i]) / 0.5f);
  pool_free(pl);
  free(x);
  free(g);
  free(b);
  free(add);
  free(mod);
  free(want);
  free(got);
}
END_TEST

START_TEST(attention_matches_reference) {
  int c = 16, n = 2, hw = 300; /* 300 tokens: more than one query-row chunk */
  for (int heads = 1; heads <= 4; heads *= 4) {
    float *w[8];
    for (int i = 0; i < 8; i++)
      w[i] = randn((size_t)c * c, 10 + i);
    for (int i = 0; i < 8; i++)
      for (int j = 0; j < c * c; j++)
        w[i][j] *= 0.25f;
    float *g = randn(c, 20), *b = randn(c, 21);
    attn_weights aw = {.channels = c,
                       .heads = heads,
                       .groups = 4,
                       .eps = 1e-6f,
                       .norm_gamma = g,
                       .norm_beta = b,
                       .wq = w[0],
                       .bq = w[1],
                       .wk = w[2],
                       .bk = w[3],
                       .wv = w[4],
                       .bv = w[5],
                       .wo = w[6],
                       .bo = w[7],
                       .rescale = 2.0f};
    ck_assert_int_eq(ops_attention_pack(&aw), 0);
    float *x = randn((size_t)n * c * hw, 22), *y = malloc(sizeof(float) * n * c * hw);
    double *ref = malloc(sizeof(double) * n * c * hw);
    arena *a = arena_new(1 << 20);
    pool *p = pool_new(2);
    ck_assert_int_eq(ops_attention(&aw, x, n, hw, y, a, p), 0);
    pool_free(p);
    naive_attention(&aw, x, n, hw, ref);
    double err = rel_err_d(y, ref, (size_t)n * c * hw);
    ck_assert_msg(err < 1e-5, "attention heads %d: rel err %g", heads, err);
    arena_free(a);
    ops_attention_unpack(&aw);
    for (int i = 0; i < 8; i++)
      free(w[i]);
    free(g);
    free(b);
    free(x);
    free(y);
    free(ref);
  }
}
END_TEST

START_TEST(resampling) {
  float x[2 * 3 * 4];
  for (int i = 0; i < 24; i++)
    x[i] = (float)i;
  float up[2 * 6 * 8], down[2 * 1 * 2];
  ops_upsample_nearest2x(x, 1, 2, 3, 4, up);
  for (int c = 0; c < 2; c++)
    for (int y = 0; y < 6; y++)
      for (int xx = 0; xx < 8; xx++)
        ck_assert_float_eq(up[(c * 6 + y) * 8 + xx], x[(c * 3 + y / 2) * 4 + xx / 2]);
  ops_avgpool2x2(x, 1, 2, 3, 4, down); /* odd height floors to 1 row */
  ck_assert_float_eq(down[0], (0 + 1 + 4 + 5) / 4.0f);
  ck_assert_float_eq(down[1], (2 + 3 + 6 + 7) / 4.0f);
  ck_assert_float_eq(down[2], (12 + 13 + 16 + 17) / 4.0f);
}
END_TEST

START_TEST(timestep_embedding) {
  float t[2] = {0.0f, 999.0f}, e[2 * 8], f[2 * 8];
  ops_timestep_embedding(t, 2, 8, 0, 1.0f, e);
  ops_timestep_embedding(t, 2, 8, 1, 1.0f, f);
  for (int k = 0; k < 4; k++) {
    double freq = exp(-log(10000.0) * k / (4 - 1.0));
    ck_assert_double_eq_tol(e[k], 0.0, 1e-7); /* sin(0) first without flip */
    ck_assert_double_eq_tol(e[4 + k], 1.0, 1e-7);
    ck_assert_double_eq_tol(e[8 + k], sin(999.0 * freq), 2e-4);
    ck_assert_double_eq_tol(e[12 + k], cos(999.0 * freq), 2e-4);
    ck_assert_float_eq(f[8 + k], e[12 + k]); /* flip puts cos first */
    ck_assert_float_eq(f[12 + k], e[8 + k]);
  }
}
END_TEST

START_TEST(linear_and_silu) {
  float x[2 * 3] = {1, 2, 3, -1, 0, 1}, w[2 * 3] = {1, 0, -1, 0.5f, 0.5f, 0.5f}, b[2] = {1, -1};
  float y[4];
  ops_linear(x, 2, 3, 2, w, b, y);
  ck_assert_float_eq_tol(y[0], 1 + (1 - 3), 1e-6);
  ck_assert_float_eq_tol(y[1], -1 + 3, 1e-6);
  ck_assert_float_eq_tol(y[2], 1 + (-1 - 1), 1e-6);
  ck_assert_float_eq_tol(y[3], -1 + 0, 1e-6);
  float s[3] = {0, 10, -10}, o[3];
  ops_silu(s, 3, o);
  ck_assert_float_eq_tol(o[0], 0, 1e-7);
  ck_assert_float_eq_tol(o[1], 10 / (1 + exp(-10)), 1e-5);
  ck_assert_float_eq_tol(o[2], -10 / (1 + exp(10)), 1e-7);
}
END_TEST

/* The vectorized exp under SiLU is defined for every input and agrees with libm's expf at the
 * edges: NaN stays NaN, infinities and huge values neither wrap nor stop at exp(+-88) (the
 * ASan+UBSan build aborts on a NaN or out-of-range float-to-int conversion). ctest runs this in
 * every CPU tier (test_ops, test_ops_avx2, test_ops_openblas). */
START_TEST(silu_is_defined_for_every_input) {
  const float v[] = {NAN,    -NAN,    INFINITY, -INFINITY, 1e30f,   -1e30f,   88.7f,
                     -88.7f, 87.5f,   -87.5f,   88.0f,     -88.0f,  100.0f,   -100.0f,
                     104.5f, -104.5f, 1000.0f,  -1000.0f,  FLT_MAX, -FLT_MAX, 0.0f,
                     -0.0f,  1.0f,    -1.0f,    20.0f,     -20.0f,  FLT_MIN,  -FLT_MIN,
                     1e-40f, -1e-40f, 3e38f,    -3e38f,    86.0f,   -86.0f,   -103.0f,
                     103.0f, -87.33f, 87.33f,   -50.0f,    50.0f,   0.5f,     -0.5f};
  enum { N = sizeof v / sizeof *v, REP = 37 }; /* REP: lengths that hit every vector tail */
  float x[N * REP], y[N * REP];
  for (int k = 0; k < N * REP; k++)
    x[k] = v[(k * 7) % N];
  ops_silu(x, N * REP, y);
  for (int k = 0; k < N * REP; k++) {
    const float ref = x[k] / (1.0f + expf(-x[k]));
    if (isnan(ref)) {
      ck_assert_msg(isnan(y[k]), "silu(%g) = %g, libm gives NaN", x[k], y[k]);
      continue;
    }
    ck_assert_msg(!isnan(y[k]) &&
                      (isinf(ref) ? y[k] == ref : fabsf(y[k] - ref) <= 1e-6f * fabsf(ref)),
                  "silu(%g) = %.9g, libm gives %.9g", x[k], y[k], ref);
  }
  /* the same exp inside group norm + SiLU: a huge gamma drives it to +-1e30, NaN spreads */
  float g[8], gamma[2] = {1e30f, -1e30f}, gy[8];
  for (int k = 0; k < 8; k++)
    g[k] = (float)(k % 4) - 1.5f;
  ops_group_norm(g, 1, 2, 4, 2, 1e-5f, gamma, NULL, 1, gy, NULL);
  for (int k = 0; k < 8; k++) {
    const float pre = (g[k] / sqrtf(1.25f + 1e-5f)) * gamma[k / 4];
    const float ref = pre / (1.0f + expf(-pre));
    ck_assert_msg(fabsf(gy[k] - ref) <= 1e-5f * fabsf(ref) + 1e-30f, "gn silu %d: %g vs %g", k,
                  gy[k], ref);
  }
  g[3] = NAN;
  ops_group_norm(g, 1, 2, 4, 2, 1e-5f, NULL, NULL, 1, gy, NULL);
  for (int k = 0; k < 4; k++)
    ck_assert_msg(isnan(gy[k]), "group with a NaN: value %d is %g", k, gy[k]);
  for (int k = 4; k < 8; k++)
    ck_assert_msg(isfinite(gy[k]), "group without a NaN: value %d is %g", k, gy[k]);
}
END_TEST

/* Cross-attention shapes (queries and keys of different lengths) against attention written out
 * per element, one head at a time. */
START_TEST(mha_cross_matches_reference) {
  const int n = 2, c = 12, heads = 3, lq = 270, lk = 7, dh = c / heads;
  float *q = randn((size_t)n * c * lq, 30), *k = randn((size_t)n * c * lk, 31);
  float *v = randn((size_t)n * c * lk, 32), *o = malloc(sizeof(float) * n * c * lq);
  double *ref = malloc(sizeof(double) * n * c * lq), p[7];
  for (int b = 0; b < n; b++)
    for (int h = 0; h < heads; h++)
      for (int r = 0; r < lq; r++) {
        double mx = -1e300, sum = 0;
        for (int l = 0; l < lk; l++) {
          double s = 0;
          for (int d = 0; d < dh; d++)
            s += (double)q[((size_t)b * c + h * dh + d) * lq + r] *
                 k[((size_t)b * c + h * dh + d) * lk + l];
          p[l] = s / sqrt(dh);
          mx = p[l] > mx ? p[l] : mx;
        }
        for (int l = 0; l < lk; l++)
          sum += (p[l] = exp(p[l] - mx));
        for (int d = 0; d < dh; d++) {
          double s = 0;
          for (int l = 0; l < lk; l++)
            s += p[l] / sum * v[((size_t)b * c + h * dh + d) * lk + l];
          ref[((size_t)b * c + h * dh + d) * lq + r] = s;
        }
      }
  arena *a = arena_new(1 << 20);
  pool *pl = pool_new(2);
  ck_assert_int_eq(ops_mha(q, k, v, n, c, heads, lq, lk, o, a, pl), 0);
  double err = rel_err_d(o, ref, (size_t)n * c * lq);
  ck_assert_msg(err < 1e-6, "cross-attention rel err %g", err);
  pool_free(pl);
  arena_free(a);
  free(q);
  free(k);
  free(v);
  free(o);
  free(ref);
}
END_TEST

/* Layer norm over channels per position, and GEGLU, against their definitions. */
START_TEST(layer_norm_and_geglu) {
  const int n = 2, c = 20, L = 150, inner = c / 2; /* 150 positions: several blocks */
  float *x = randn((size_t)n * c * L, 40), *g = randn(c, 41), *b = randn(c, 42);
  for (size_t i = 0; i < (size_t)n * c * L; i++)
    x[i] = 3.0f + 2.0f * x[i]; /* an offset the mean must remove */
  float *y = malloc(sizeof(float) * n * c * L);
  pool *pl = pool_new(2);
  ops_layer_norm(x, n, c, L, 1e-5f, g, b, y, pl);
  double num = 0, den = 0;
  for (int i = 0; i < n; i++)
    for (int t = 0; t < L; t++) {
      double mean = 0, var = 0;
      for (int ch = 0; ch < c; ch++)
        mean += x[((size_t)i * c + ch) * L + t];
      mean /= c;
      for (int ch = 0; ch < c; ch++) {
        double d = x[((size_t)i * c + ch) * L + t] - mean;
        var += d * d;
      }
      var /= c;
      for (int ch = 0; ch < c; ch++) {
        size_t at = ((size_t)i * c + ch) * L + t;
        double ref = (x[at] - mean) / sqrt(var + 1e-5) * g[ch] + b[ch];
        num += (y[at] - ref) * (y[at] - ref);
        den += ref * ref;
      }
    }
  ck_assert_msg(sqrt(num / den) < 1e-6, "layer norm rel err %g", sqrt(num / den));
  /* GEGLU: channels [0, inner) times gelu of channels [inner, 2 inner) */
  ops_geglu(x, n, inner, L, y, pl);
  for (int i = 0; i < n; i++)
    for (int ch = 0; ch < inner; ch++)
      for (int t = 0; t < L; t++) {
        double a = x[((size_t)i * c + ch) * L + t], gt = x[((size_t)i * c + inner + ch) * L + t];
        double ref = a * 0.5 * gt * (1 + erf(gt / sqrt(2.0)));
        ck_assert_double_eq_tol(y[((size_t)i * inner + ch) * L + t], ref, 1e-5 * (1 + fabs(ref)));
      }
  pool_free(pl);
  free(x);
  free(g);
  free(b);
  free(y);
}
END_TEST

START_TEST(arena_marks) {
  arena *a = arena_new(1 << 20);
  char *p = arena_alloc(a, 100);
  ck_assert_ptr_nonnull(p);
  ck_assert_int_eq((uintptr_t)p % 64, 0);
  arena_mark m = arena_get_mark(a);
  char *q = arena_alloc(a, 3 << 20); /* larger than a chunk */
  ck_assert_ptr_nonnull(q);
  q[(3 << 20) - 1] = 1;
  arena_release(a, m);
  char *r = arena_alloc(a, 64);
  ck_assert_ptr_eq(r, p + 128); /* released space is handed out again */
  size_t cap = arena_capacity(a);
  arena_release(a, m);
  ck_assert_ptr_nonnull(arena_alloc(a, 3 << 20));
  ck_assert_uint_eq(arena_capacity(a), cap); /* the big chunk was reused */
  arena_free(a);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("ops");
  TCase *tc = tcase_create("ops");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, conv_shapes);
  tcase_add_test(tc, group_norm_matches_reference);
  tcase_add_test(tc, group_norm_temb_matches_passes);
  tcase_add_test(tc, attention_matches_reference);
  tcase_add_test(tc, resampling);
  tcase_add_test(tc, timestep_embedding);
  tcase_add_test(tc, linear_and_silu);
  tcase_add_test(tc, silu_is_defined_for_every_input);
  tcase_add_test(tc, mha_cross_matches_reference);
  tcase_add_test(tc, layer_norm_and_geglu);
  tcase_add_test(tc, arena_marks);
  suite_add_tcase(s, tc);
  return s;
}
