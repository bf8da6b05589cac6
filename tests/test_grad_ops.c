/* The grad room's harness, after ggml's test-backend-ops grad mode: for every op of the table,
 * several small random configurations; the engine's forward is compared with a double-precision
 * reference, and its backward (every input slot, weights included) with central finite
 * differences of sum(G * reference(x)) in double precision, by relative L2 error against a
 * threshold per op. A second test checks that 1 and 2 threads give bit-identical gradients, a
 * third that bad nodes are refused with the field named. DENOISED_GRAD_BENCH=1 also times the
 * convolution's backward against its forward. */
#include <float.h>
#include <math.h>
#include <time.h>

#include "arena.h"
#include <jansson.h>

#include "grad.h"
#include "npy.h"
#include "ops.h"
#include "pool.h"
#include "rng.h"
#include "testutil.h"

#define FD_SAMPLES 48 /* elements of a slot checked by finite differences (all if fewer) */
#define FD_STEP 1e-4

typedef struct opcase opcase;
typedef void (*ref_fn)(const opcase *oc, double *const *s, double *out);

struct opcase {
  const char *label;
  grad_node nd;
  int nslots;
  size_t size[GRAD_MAX_SRC], out_size;
  float *f[GRAD_MAX_SRC]; /* the inputs in float, owned */
  conv2d conv;
  attn_weights aw;
  int64_t labels[16];
  int64_t ids[64]; /* token embedding: [n][L] */
  ref_fn ref;
  double tol; /* relative L2 allowed for the forward and for each gradient */
};

/* ---------- double-precision references ---------- */

static void conv_d(const conv2d *c, const double *x, const double *wt, const double *bias, int n,
                   int h, int w, double *y) {
  int oh, ow;
  ops_conv2d_out_size(c, h, w, &oh, &ow);
  for (int b = 0; b < n; b++)
    for (int o = 0; o < c->cout; o++)
      for (int oy = 0; oy < oh; oy++)
        for (int ox = 0; ox < ow; ox++) {
          double acc = bias[o];
          for (int i = 0; i < c->cin; i++)
            for (int ky = 0; ky < c->k; ky++)
              for (int kx = 0; kx < c->k; kx++) {
                int iy = oy * c->stride - c->pad_top + ky, ix = ox * c->stride - c->pad_left + kx;
                if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                  acc += wt[((o * c->cin + i) * c->k + ky) * c->k + kx] *
                         x[((size_t)(b * c->cin + i) * h + iy) * w + ix];
              }
          y[((size_t)(b * c->cout + o) * oh + oy) * ow + ox] = acc;
        }
}

static void ref_conv(const opcase *oc, double *const *s, double *y) {
  conv_d(&oc->conv, s[0], s[1], s[2], oc->nd.n, oc->nd.h, oc->nd.w, y);
}

static double silu_d(double v) {
  return v / (1.0 + exp(-v));
}

static void gn_d(const double *x, int n, int c, int hw, int groups, double eps, const double *gamma,
                 const double *beta, int silu, double *y) {
  int cpg = c / groups;
  for (int b = 0; b < n; b++)
    for (int g = 0; g < groups; g++) {
      size_t off = ((size_t)b * c + (size_t)g * cpg) * hw, cnt = (size_t)cpg * hw;
      double m = 0, v = 0;
      for (size_t i = 0; i < cnt; i++)
        m += x[off + i];
      m /= (double)cnt;
      for (size_t i = 0; i < cnt; i++)
        v += (x[off + i] - m) * (x[off + i] - m);
      double rstd = 1.0 / sqrt(v / (double)cnt + eps);
      for (int ci = 0; ci < cpg; ci++)
        for (int q = 0; q < hw; q++) {
          size_t i = off + (size_t)ci * hw + q;
          double z = (x[i] - m) * rstd * gamma[g * cpg + ci] + beta[g * cpg + ci];
          y[i] = silu ? silu_d(z) : z;
        }
    }
}

static void ref_gn(const opcase *oc, double *const *s, double *y) {
  const grad_node *nd = &oc->nd;
  gn_d(s[0], nd->n, nd->c, nd->h * nd->w, nd->p.gn.groups, nd->p.gn.eps, s[1], s[2], nd->p.gn.silu,
       y);
}

static void ref_silu(const opcase *oc, double *const *s, double *y) {
  for (size_t i = 0; i < oc->out_size; i++)
    y[i] = silu_d(s[0][i]);
}

static void linear_d(const double *x, int n, int in, int out, const double *w, const double *b,
                     double *y) {
  for (int i = 0; i < n; i++)
    for (int o = 0; o < out; o++) {
      double acc = b ? b[o] : 0;
      for (int k = 0; k < in; k++)
        acc += w[(size_t)o * in + k] * x[(size_t)i * in + k];
      y[(size_t)i * out + o] = acc;
    }
}

static void ref_linear(const opcase *oc, double *const *s, double *y) {
  linear_d(s[0], oc->nd.n, oc->nd.c, oc->nd.p.linear.out, s[1], oc->nd.src[2] ? s[2] : NULL, y);
}

/* Per pixel l: out[o][l] = sum_i w[o][i] in[i][l] + b[o]: diffusers' to_q etc. on [c][L]. */
static void proj_d(const double *in, int c, int L, const double *w, const double *b, double *out) {
  for (int o = 0; o < c; o++)
    for (int l = 0; l < L; l++) {
      double acc = b[o];
      for (int i = 0; i < c; i++)
        acc += w[o * c + i] * in[(size_t)i * L + l];
      out[(size_t)o * L + l] = acc;
    }
}

static void ref_attn(const opcase *oc, double *const *s, double *y) {
  const attn_weights *aw = &oc->aw;
  int n = oc->nd.n, c = aw->channels, L = oc->nd.h * oc->nd.w, dh = c / aw->heads;
  size_t plane = (size_t)c * L;
  double *xn = malloc(sizeof(double) * plane * n), *q = malloc(sizeof(double) * plane);
  double *k = malloc(sizeof(double) * plane), *v = malloc(sizeof(double) * plane);
  double *o = malloc(sizeof(double) * plane), *pr = malloc(sizeof(double) * L);
  double *out = malloc(sizeof(double) * plane);
  if (aw->groups > 0)
    gn_d(s[0], n, c, L, aw->groups, aw->eps, s[1], s[2], 0, xn);
  else
    memcpy(xn, s[0], sizeof(double) * plane * n);
  for (int b = 0; b < n; b++) {
    const double *xb = xn + b * plane;
    proj_d(xb, c, L, s[3], s[4], q);
    proj_d(xb, c, L, s[5], s[6], k);
    proj_d(xb, c, L, s[7], s[8], v);
    for (int hd = 0; hd < aw->heads; hd++)
      for (int r = 0; r < L; r++) {
        double mx = -DBL_MAX, sum = 0;
        for (int l = 0; l < L; l++) {
          double acc = 0;
          for (int d = 0; d < dh; d++)
            acc += q[(size_t)(hd * dh + d) * L + r] * k[(size_t)(hd * dh + d) * L + l];
          pr[l] = acc / sqrt((double)dh);
          mx = pr[l] > mx ? pr[l] : mx;
        }
        for (int l = 0; l < L; l++)
          sum += pr[l] = exp(pr[l] - mx);
        for (int d = 0; d < dh; d++) {
          double acc = 0;
          for (int l = 0; l < L; l++)
            acc += pr[l] / sum * v[(size_t)(hd * dh + d) * L + l];
          o[(size_t)(hd * dh + d) * L + r] = acc;
        }
      }
    proj_d(o, c, L, s[9], s[10], out);
    for (size_t i = 0; i < plane; i++)
      y[b * plane + i] = (out[i] + s[0][b * plane + i]) / aw->rescale;
  }
  free(xn), free(q), free(k), free(v), free(o), free(pr), free(out);
}

static void ref_up(const opcase *oc, double *const *s, double *y) {
  int h = oc->nd.h, w = oc->nd.w;
  for (size_t pl = 0; pl < (size_t)oc->nd.n * oc->nd.c; pl++)
    for (int oy = 0; oy < 2 * h; oy++)
      for (int ox = 0; ox < 2 * w; ox++)
        y[(pl * 2 * h + oy) * 2 * w + ox] = s[0][(pl * h + oy / 2) * w + ox / 2];
}

static void ref_pool(const opcase *oc, double *const *s, double *y) {
  int h = oc->nd.h, w = oc->nd.w, oh = h / 2, ow = w / 2;
  for (size_t pl = 0; pl < (size_t)oc->nd.n * oc->nd.c; pl++)
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++) {
        const double *p = s[0] + (pl * h + 2 * oy) * w + 2 * ox;
        y[(pl * oh + oy) * ow + ox] = (p[0] + p[1] + p[w] + p[w + 1]) / 4;
      }
}

static void ref_relu(const opcase *oc, double *const *s, double *y) {
  for (size_t i = 0; i < oc->out_size; i++)
    y[i] = s[0][i] > 0 ? s[0][i] : 0;
}

static void ref_maxpool(const opcase *oc, double *const *s, double *y) {
  int h = oc->nd.h, w = oc->nd.w, oh = h / 2, ow = w / 2;
  for (size_t pl = 0; pl < (size_t)oc->nd.n * oc->nd.c; pl++)
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++) {
        const double *p = s[0] + (pl * h + 2 * oy) * w + 2 * ox;
        y[(pl * oh + oy) * ow + ox] = fmax(fmax(p[0], p[1]), fmax(p[w], p[w + 1]));
      }
}

static void ref_gap(const opcase *oc, double *const *s, double *y) {
  size_t hw = (size_t)oc->nd.h * oc->nd.w;
  for (size_t pl = 0; pl < (size_t)oc->nd.n * oc->nd.c; pl++) {
    y[pl] = 0;
    for (size_t k = 0; k < hw; k++)
      y[pl] += s[0][pl * hw + k] / (double)hw;
  }
}

/* The frequencies are constants of the op: taken in float as diffusers (and the engine) do. */
static void ref_temb(const opcase *oc, double *const *s, double *y) {
  int dim = oc->nd.c, half = dim / 2, flip = oc->nd.p.temb.flip_sin_to_cos;
  for (int i = 0; i < oc->nd.n; i++) {
    double *o = y + (size_t)i * dim;
    for (int k = 0; k < half; k++) {
      float expo = (float)-log(10000.0) * (float)k;
      expo = expo / ((float)half - oc->nd.p.temb.freq_shift);
      double arg = s[0][i] * (double)expf(expo);
      o[flip ? half + k : k] = sin(arg);
      o[flip ? k : half + k] = cos(arg);
    }
    if (dim % 2)
      o[dim - 1] = 0;
  }
}

static void ref_mlp(const opcase *oc, double *const *s, double *y) {
  int n = oc->nd.n, hid = oc->nd.p.mlp.hidden;
  double *h = malloc(sizeof(double) * n * hid);
  linear_d(s[0], n, oc->nd.c, hid, s[1], s[2], h);
  for (int i = 0; i < n * hid; i++)
    h[i] = silu_d(h[i]);
  linear_d(h, n, hid, oc->nd.p.mlp.out, s[3], s[4], y);
  free(h);
}

static void ref_embed(const opcase *oc, double *const *s, double *y) {
  for (int i = 0; i < oc->nd.n; i++)
    for (int k = 0; k < oc->nd.c; k++)
      y[(size_t)i * oc->nd.c + k] = s[0][(size_t)oc->labels[i] * oc->nd.c + k];
}

static void ref_concat(const opcase *oc, double *const *s, double *y) {
  size_t hw = (size_t)oc->nd.h * oc->nd.w, ca = oc->nd.c * hw, cb = oc->nd.p.concat.cb * hw;
  for (int i = 0; i < oc->nd.n; i++) {
    memcpy(y + i * (ca + cb), s[0] + i * ca, sizeof(double) * ca);
    memcpy(y + i * (ca + cb) + ca, s[1] + i * cb, sizeof(double) * cb);
  }
}

static void ref_ss(const opcase *oc, double *const *s, double *y) {
  int c = oc->nd.c, hw = oc->nd.h * oc->nd.w, sc = oc->nd.p.ss.has_scale;
  for (int i = 0; i < oc->nd.n; i++)
    for (int ch = 0; ch < c; ch++)
      for (int k = 0; k < hw; k++) {
        size_t at = ((size_t)i * c + ch) * hw + k;
        y[at] = sc ? s[0][at] * (1 + s[1][i * 2 * c + ch]) + s[1][i * 2 * c + c + ch]
                   : s[0][at] + s[1][i * c + ch];
      }
}

static void ref_add(const opcase *oc, double *const *s, double *y) {
  for (size_t i = 0; i < oc->out_size; i++)
    y[i] = (s[0][i] + s[1][i]) / oc->nd.p.add.divisor;
}

/* Layer norm over the channels of each position of [n][c][L]. */
static void ref_ln(const opcase *oc, double *const *s, double *y) {
  int c = oc->nd.c, L = oc->nd.h * oc->nd.w;
  for (int b = 0; b < oc->nd.n; b++)
    for (int t = 0; t < L; t++) {
      const double *x = s[0] + (size_t)b * c * L + t;
      double m = 0, v = 0;
      for (int ch = 0; ch < c; ch++)
        m += x[(size_t)ch * L] / c;
      for (int ch = 0; ch < c; ch++)
        v += (x[(size_t)ch * L] - m) * (x[(size_t)ch * L] - m) / c;
      for (int ch = 0; ch < c; ch++)
        y[(size_t)b * c * L + (size_t)ch * L + t] =
            (x[(size_t)ch * L] - m) / sqrt(v + oc->nd.p.ln.eps) * s[1][ch] + s[2][ch];
    }
}

static double gelu_d(double v) {
  return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
}

static void ref_gelu(const opcase *oc, double *const *s, double *y) {
  for (size_t i = 0; i < oc->out_size; i++)
    y[i] = gelu_d(s[0][i]);
}

static void ref_qgelu(const opcase *oc, double *const *s, double *y) {
  for (size_t i = 0; i < oc->out_size; i++)
    y[i] = s[0][i] / (1.0 + exp(-1.702 * s[0][i]));
}

static void ref_geglu(const opcase *oc, double *const *s, double *y) {
  size_t half = (size_t)oc->nd.c / 2 * oc->nd.h * oc->nd.w;
  for (int b = 0; b < oc->nd.n; b++)
    for (size_t k = 0; k < half; k++)
      y[b * half + k] = s[0][2 * half * b + k] * gelu_d(s[0][2 * half * b + half + k]);
}

/* softmax(q^T k / sqrt(d)) v per head; with the causal mask query r sees keys 0..r. */
static void ref_mha(const opcase *oc, double *const *s, double *y) {
  int c = oc->nd.c, lq = oc->nd.h * oc->nd.w, lk = oc->nd.p.mha.lk, heads = oc->nd.p.mha.heads;
  int dh = c / heads;
  double *pr = malloc(sizeof(double) * lk);
  for (int b = 0; b < oc->nd.n; b++)
    for (int hd = 0; hd < heads; hd++)
      for (int r = 0; r < lq; r++) {
        const double *q = s[0] + ((size_t)b * c + (size_t)hd * dh) * lq;
        const double *k = s[1] + ((size_t)b * c + (size_t)hd * dh) * lk;
        const double *v = s[2] + ((size_t)b * c + (size_t)hd * dh) * lk;
        int nl = oc->nd.p.mha.causal ? r + 1 : lk;
        double mx = -DBL_MAX, sum = 0;
        for (int l = 0; l < nl; l++) {
          double acc = 0;
          for (int d = 0; d < dh; d++)
            acc += q[(size_t)d * lq + r] * k[(size_t)d * lk + l];
          pr[l] = acc / sqrt((double)dh);
          mx = pr[l] > mx ? pr[l] : mx;
        }
        for (int l = 0; l < nl; l++)
          sum += pr[l] = exp(pr[l] - mx);
        for (int d = 0; d < dh; d++) {
          double acc = 0;
          for (int l = 0; l < nl; l++)
            acc += pr[l] / sum * v[(size_t)d * lk + l];
          y[((size_t)b * c + (size_t)hd * dh + d) * lq + r] = acc;
        }
      }
  free(pr);
}

static void ref_tok(const opcase *oc, double *const *s, double *y) {
  int d = oc->nd.c, L = oc->nd.h * oc->nd.w;
  for (int b = 0; b < oc->nd.n; b++)
    for (int t = 0; t < L; t++)
      for (int c = 0; c < d; c++)
        y[((size_t)b * d + c) * L + t] =
            s[0][(size_t)oc->ids[(size_t)b * L + t] * d + c] + s[1][(size_t)t * d + c];
}

/* ---------- building cases ---------- */

static uint64_t case_seed = 1;

static float *randn(size_t n, float scale) {
  float *p = malloc(n * sizeof *p + 4);
  rng_normal(7, case_seed++, 0, p, n);
  for (size_t i = 0; i < n; i++)
    p[i] *= scale;
  return p;
}

/* Sizes from the table's rule, random inputs, and the op's own structs wired to them. */
static void case_init(opcase *oc, const char *label, ref_fn ref, double tol) {
  const grad_rule *r = grad_rule_get(oc->nd.op);
  oc->label = label;
  oc->ref = ref;
  oc->tol = tol;
  oc->nslots = r->nsrc;
  if (oc->nd.op == GRAD_CONV2D) {
    int k = oc->conv.k;
    if (!oc->f[1])
      oc->f[1] =
          randn((size_t)oc->conv.cout * oc->conv.cin * k * k, 1.0f / sqrtf(oc->conv.cin * k));
    if (!oc->f[2])
      oc->f[2] = randn((size_t)oc->conv.cout, 0.5f);
    oc->conv.weight = oc->f[1];
    oc->conv.bias = oc->f[2];
    ck_assert_int_eq(ops_conv2d_pack(&oc->conv), 0);
    oc->nd.p.conv = &oc->conv;
  }
  if (oc->nd.op == GRAD_ATTENTION) {
    int c = oc->aw.channels;
    const float **slots[11] = {NULL,       &oc->aw.norm_gamma, &oc->aw.norm_beta, &oc->aw.wq,
                               &oc->aw.bq, &oc->aw.wk,         &oc->aw.bk,        &oc->aw.wv,
                               &oc->aw.bv, &oc->aw.wo,         &oc->aw.bo};
    for (int i = 1; i < 11; i++) {
      int vec = i <= 2 || i % 2 == 0, given = oc->f[i] != NULL;
      if (!given)
        oc->f[i] = randn(vec ? (size_t)c : (size_t)c * c, vec ? 0.5f : 1.0f / sqrtf(c));
      if (i == 1 && !given)
        for (int k = 0; k < c; k++)
          oc->f[1][k] += 1.0f;
      *slots[i] = oc->f[i];
    }
    if (oc->aw.groups == 0)
      oc->aw.norm_gamma = oc->aw.norm_beta = NULL;
    ck_assert_int_eq(ops_attention_pack(&oc->aw), 0);
    oc->nd.p.attn = &oc->aw;
  }
  if (oc->nd.op == GRAD_CLASS_EMBEDDING)
    oc->nd.p.embed.labels = oc->labels;
  if (oc->nd.op == GRAD_TOKEN_EMBEDDING)
    oc->nd.p.tok.ids = oc->ids;
  for (int i = 0; i < oc->nslots; i++) {
    oc->size[i] = grad_size(&oc->nd, i);
    ck_assert_msg(oc->size[i] > 0, "%s: slot %d has no size", label, i);
    if (!oc->f[i])
      oc->f[i] = randn(oc->size[i], oc->nd.op == GRAD_TIMESTEP_EMBEDDING ? 20.0f : 1.0f);
    if (oc->nd.op == GRAD_TIMESTEP_EMBEDDING)
      for (size_t k = 0; k < oc->size[i]; k++)
        oc->f[i][k] = fabsf(oc->f[i][k]);
    if (oc->nd.op != GRAD_CONV2D && oc->nd.op != GRAD_ATTENTION)
      oc->nd.src[i] = oc->f[i];
  }
  oc->nd.src[0] = oc->f[0];
  oc->out_size = grad_size(&oc->nd, -1);
  ck_assert_msg(oc->out_size > 0, "%s: no output size", label);
}

static void case_free(opcase *oc) {
  if (oc->nd.op == GRAD_CONV2D)
    ops_conv2d_unpack(&oc->conv);
  if (oc->nd.op == GRAD_ATTENTION)
    ops_attention_unpack(&oc->aw);
  for (int i = 0; i < GRAD_MAX_SRC; i++)
    free(oc->f[i]);
}

static opcase conv_case(int cin, int cout, int k, int stride, int pt, int pl, int pb, int pr, int n,
                        int h, int w) {
  opcase oc = {.nd = {.op = GRAD_CONV2D, .n = n, .c = cin, .h = h, .w = w}};
  oc.conv = (conv2d){.cin = cin,
                     .cout = cout,
                     .k = k,
                     .stride = stride,
                     .pad_top = pt,
                     .pad_left = pl,
                     .pad_bottom = pb,
                     .pad_right = pr};
  return oc;
}

static opcase attn_case(int c, int heads, int groups, float rescale, int n, int h, int w) {
  opcase oc = {.nd = {.op = GRAD_ATTENTION, .n = n, .c = c, .h = h, .w = w}};
  oc.aw = (attn_weights){
      .channels = c, .heads = heads, .groups = groups, .eps = 1e-5f, .rescale = rescale};
  return oc;
}

static opcase node_case(grad_op op, int n, int c, int h, int w) {
  return (opcase){.nd = {.op = op, .n = n, .c = c, .h = h, .w = w}};
}

static opcase mha_case(int n, int c, int heads, int lq, int lk, int causal) {
  opcase oc = node_case(GRAD_MHA, n, c, lq, 1);
  oc.nd.p.mha.heads = heads;
  oc.nd.p.mha.lk = lk;
  oc.nd.p.mha.causal = causal;
  return oc;
}

/* Token ids drawn from the case's seed, a few repeated so that table rows sum several tokens. */
static opcase tok_case(int n, int d, int L, int vocab, int positions) {
  opcase oc = node_case(GRAD_TOKEN_EMBEDDING, n, d, L, 1);
  oc.nd.p.tok.vocab = vocab;
  oc.nd.p.tok.positions = positions;
  for (int i = 0; i < n * L; i++)
    oc.ids[i] = (int64_t)((i * 7 + 3) % vocab);
  return oc;
}

/* Every configuration the harness runs; `covered` marks the ops of the table they reach. */
static int build_cases(opcase *cs) {
  int m = 0;
  /* convolutions: 3x3 and 1x1, stride 1 and 2, symmetric and diffusers' (0,1,0,1) padding, and
   * an 8x8 3x3 layer whose forward goes through Winograd */
  cs[m] = conv_case(3, 5, 3, 1, 1, 1, 1, 1, 2, 6, 5);
  case_init(&cs[m++], "conv 3x3 s1 pad1", ref_conv, 1e-5);
  cs[m] = conv_case(4, 6, 1, 1, 0, 0, 0, 0, 2, 5, 7);
  case_init(&cs[m++], "conv 1x1", ref_conv, 1e-5);
  cs[m] = conv_case(5, 4, 3, 2, 1, 1, 1, 1, 2, 7, 6);
  case_init(&cs[m++], "conv 3x3 s2 pad1", ref_conv, 1e-5);
  cs[m] = conv_case(4, 4, 3, 2, 0, 0, 1, 1, 2, 8, 8);
  case_init(&cs[m++], "conv 3x3 s2 pad(0,1,0,1)", ref_conv, 1e-5);
  cs[m] = conv_case(3, 4, 3, 1, 1, 0, 0, 1, 2, 5, 6);
  case_init(&cs[m++], "conv 3x3 s1 pad(t1,l0,b0,r1)", ref_conv, 1e-5);
  cs[m] = conv_case(16, 16, 3, 1, 1, 1, 1, 1, 1, 8, 8);
  case_init(&cs[m++], "conv 3x3 s1 8x8 (winograd fwd)", ref_conv, 1e-5);
  cs[m] = node_case(GRAD_GROUP_NORM, 2, 8, 5, 5);
  cs[m].nd.p.gn.groups = 4;
  cs[m].nd.p.gn.eps = 1e-5f;
  case_init(&cs[m++], "group_norm 4 groups", ref_gn, 1e-5);
  cs[m] = node_case(GRAD_GROUP_NORM, 2, 6, 4, 3);
  cs[m].nd.p.gn.groups = 3;
  cs[m].nd.p.gn.silu = 1;
  cs[m].nd.p.gn.eps = 1e-6f;
  case_init(&cs[m++], "group_norm+silu 3 groups", ref_gn, 1e-5);
  cs[m] = node_case(GRAD_GROUP_NORM, 1, 4, 3, 3);
  cs[m].nd.p.gn.groups = 1;
  cs[m].nd.p.gn.silu = 1;
  cs[m].nd.p.gn.eps = 1e-5f;
  case_init(&cs[m++], "group_norm+silu 1 group", ref_gn, 1e-5);
  cs[m] = node_case(GRAD_SILU, 2, 3, 4, 5);
  case_init(&cs[m++], "silu", ref_silu, 1e-5);
  cs[m] = node_case(GRAD_LINEAR, 3, 7, 1, 1);
  cs[m].nd.p.linear.out = 5;
  case_init(&cs[m++], "linear 7->5", ref_linear, 1e-5);
  cs[m] = node_case(GRAD_LINEAR, 2, 16, 1, 1);
  cs[m].nd.p.linear.out = 12;
  case_init(&cs[m++], "linear 16->12", ref_linear, 1e-5);
  cs[m] = attn_case(8, 2, 4, 1.0f, 2, 4, 4);
  case_init(&cs[m++], "attention 2 heads, gn", ref_attn, 5e-5);
  cs[m] = attn_case(6, 1, 0, 1.4142135f, 2, 3, 3);
  case_init(&cs[m++], "attention 1 head, no gn, rescale", ref_attn, 5e-5);
  cs[m] = attn_case(8, 4, 2, 1.0f, 1, 5, 4);
  case_init(&cs[m++], "attention 4 heads", ref_attn, 5e-5);
  cs[m] = node_case(GRAD_UPSAMPLE_NEAREST2X, 2, 3, 3, 4);
  case_init(&cs[m++], "upsample 2x", ref_up, 1e-5);
  cs[m] = node_case(GRAD_AVGPOOL2X2, 2, 3, 4, 6);
  case_init(&cs[m++], "avgpool 2x2", ref_pool, 1e-5);
  cs[m] = node_case(GRAD_AVGPOOL2X2, 1, 2, 5, 7);
  case_init(&cs[m++], "avgpool 2x2 odd", ref_pool, 1e-5);
  cs[m] = node_case(GRAD_TIMESTEP_EMBEDDING, 4, 8, 1, 1);
  cs[m].nd.p.temb.flip_sin_to_cos = 1;
  case_init(&cs[m++], "timestep embedding flip", ref_temb, 1e-5);
  cs[m] = node_case(GRAD_TIMESTEP_EMBEDDING, 3, 7, 1, 1);
  cs[m].nd.p.temb.freq_shift = 1.0f;
  case_init(&cs[m++], "timestep embedding odd, shift 1", ref_temb, 1e-5);
  cs[m] = node_case(GRAD_TIME_MLP, 3, 6, 1, 1);
  cs[m].nd.p.mlp.hidden = cs[m].nd.p.mlp.out = 10;
  case_init(&cs[m++], "time MLP 6->10->10", ref_mlp, 1e-5);
  cs[m] = node_case(GRAD_CLASS_EMBEDDING, 4, 6, 1, 1);
  cs[m].nd.p.embed.classes = 5;
  memcpy(cs[m].labels, (int64_t[]){1, 3, 1, 0}, 4 * sizeof(int64_t));
  case_init(&cs[m++], "class embedding", ref_embed, 1e-6);
  cs[m] = node_case(GRAD_CONCAT, 2, 3, 3, 3);
  cs[m].nd.p.concat.cb = 2;
  case_init(&cs[m++], "skip concat", ref_concat, 1e-6);
  cs[m] = node_case(GRAD_SCALE_SHIFT, 2, 4, 3, 3);
  case_init(&cs[m++], "time shift (default)", ref_ss, 1e-5);
  cs[m] = node_case(GRAD_SCALE_SHIFT, 2, 4, 3, 2);
  cs[m].nd.p.ss.has_scale = 1;
  case_init(&cs[m++], "scale_shift", ref_ss, 1e-5);
  cs[m] = node_case(GRAD_ADD, 2, 3, 2, 2);
  cs[m].nd.p.add.divisor = 1.0f;
  case_init(&cs[m++], "residual add", ref_add, 1e-5);
  cs[m] = node_case(GRAD_ADD, 1, 3, 2, 3);
  cs[m].nd.p.add.divisor = 0.7071f;
  case_init(&cs[m++], "residual add / scale", ref_add, 1e-5);
  cs[m] = node_case(GRAD_RELU, 2, 3, 4, 5);
  case_init(&cs[m++], "relu", ref_relu, 1e-6);
  cs[m] = node_case(GRAD_MAXPOOL2X2, 2, 3, 4, 6);
  case_init(&cs[m++], "maxpool 2x2", ref_maxpool, 1e-6);
  cs[m] = node_case(GRAD_MAXPOOL2X2, 1, 2, 5, 7);
  case_init(&cs[m++], "maxpool 2x2 odd", ref_maxpool, 1e-6);
  cs[m] = node_case(GRAD_GLOBAL_AVGPOOL, 2, 5, 4, 3);
  case_init(&cs[m++], "global avgpool", ref_gap, 1e-6);
  cs[m] = node_case(GRAD_LAYER_NORM, 2, 8, 5, 1);
  cs[m].nd.p.ln.eps = 1e-5f;
  case_init(&cs[m++], "layer_norm 8ch x 5 tokens", ref_ln, 1e-5);
  cs[m] = node_case(GRAD_LAYER_NORM, 1, 5, 3, 2);
  cs[m].nd.p.ln.eps = 1e-6f;
  case_init(&cs[m++], "layer_norm 5ch 3x2", ref_ln, 1e-5);
  cs[m] = node_case(GRAD_GELU, 2, 3, 4, 5);
  case_init(&cs[m++], "gelu", ref_gelu, 1e-5);
  cs[m] = node_case(GRAD_QUICK_GELU, 2, 3, 4, 5);
  case_init(&cs[m++], "quick_gelu", ref_qgelu, 1e-5);
  cs[m] = node_case(GRAD_GEGLU, 2, 6, 5, 1);
  case_init(&cs[m++], "geglu 3 inner x 5", ref_geglu, 1e-5);
  cs[m] = mha_case(2, 8, 2, 6, 6, 0);
  case_init(&cs[m++], "mha self 2 heads", ref_mha, 5e-5);
  cs[m] = mha_case(2, 8, 2, 9, 5, 0);
  case_init(&cs[m++], "mha cross 9 queries 5 keys", ref_mha, 5e-5);
  cs[m] = mha_case(2, 6, 3, 7, 7, 1);
  case_init(&cs[m++], "mha causal 3 heads", ref_mha, 5e-5);
  cs[m] = tok_case(2, 6, 5, 4, 7);
  case_init(&cs[m++], "token+position embedding", ref_tok, 1e-6);
  return m;
}

#define MAX_CASES 64

/* ---------- a ResnetBlock2D composed from the table ---------- */

#define RB_SLOTS 14

typedef struct rblock {
  int n, cin, cout, h, w, tdim, scale_shift;
  float out_scale;
  conv2d conv1, conv2, shortcut;
  float *f[RB_SLOTS]; /* x, temb, norm1 g/b, conv1 w/b, time_emb_proj w/b, norm2 g/b, conv2 w/b,
                         conv_shortcut w/b */
  size_t size[RB_SLOTS];
} rblock;

static const char *const rb_names[RB_SLOTS] = {"x",
                                               "temb",
                                               "norm1.weight",
                                               "norm1.bias",
                                               "conv1.weight",
                                               "conv1.bias",
                                               "time_emb_proj.weight",
                                               "time_emb_proj.bias",
                                               "norm2.weight",
                                               "norm2.bias",
                                               "conv2.weight",
                                               "conv2.bias",
                                               "conv_shortcut.weight",
                                               "conv_shortcut.bias"};

static void rb_init(rblock *b) {
  int tout = b->scale_shift ? 2 * b->cout : b->cout, hw = b->h * b->w;
  size_t sizes[RB_SLOTS] = {(size_t)b->n * b->cin * hw,
                            (size_t)b->n * b->tdim,
                            b->cin,
                            b->cin,
                            (size_t)b->cout * b->cin * 9,
                            b->cout,
                            (size_t)tout * b->tdim,
                            tout,
                            b->cout,
                            b->cout,
                            (size_t)b->cout * b->cout * 9,
                            b->cout,
                            b->cin != b->cout ? (size_t)b->cout * b->cin : 0,
                            b->cin != b->cout ? (size_t)b->cout : 0};
  float scales[RB_SLOTS] = {1,
                            1,
                            0.3f,
                            0.3f,
                            1.0f / sqrtf(9.0f * b->cin),
                            0.3f,
                            1.0f / sqrtf(b->tdim),
                            0.3f,
                            0.3f,
                            0.3f,
                            1.0f / sqrtf(9.0f * b->cout),
                            0.3f,
                            1.0f / sqrtf(b->cin),
                            0.3f};
  for (int i = 0; i < RB_SLOTS; i++) {
    b->size[i] = sizes[i];
    b->f[i] = sizes[i] ? randn(sizes[i], scales[i]) : NULL;
  }
  for (int i = 0; i < b->cin; i++)
    b->f[2][i] += 1.0f;
  for (int i = 0; i < b->cout; i++)
    b->f[8][i] += 1.0f;
  b->conv1 = (conv2d){.cin = b->cin,
                      .cout = b->cout,
                      .k = 3,
                      .stride = 1,
                      .pad_top = 1,
                      .pad_left = 1,
                      .pad_bottom = 1,
                      .pad_right = 1,
                      .weight = b->f[4],
                      .bias = b->f[5]};
  b->conv2 = b->conv1;
  b->conv2.cin = b->cout;
  b->conv2.weight = b->f[10];
  b->conv2.bias = b->f[11];
  b->shortcut = (conv2d){
      .cin = b->cin, .cout = b->cout, .k = 1, .stride = 1, .weight = b->f[12], .bias = b->f[13]};
  ck_assert_int_eq(ops_conv2d_pack(&b->conv1), 0);
  ck_assert_int_eq(ops_conv2d_pack(&b->conv2), 0);
  if (b->cin != b->cout)
    ck_assert_int_eq(ops_conv2d_pack(&b->shortcut), 0);
}

static void rb_free(rblock *b) {
  ops_conv2d_unpack(&b->conv1);
  ops_conv2d_unpack(&b->conv2);
  if (b->cin != b->cout)
    ops_conv2d_unpack(&b->shortcut);
  for (int i = 0; i < RB_SLOTS; i++)
    free(b->f[i]);
}

/* The block in double, as diffusers' ResnetBlock2D (and engine/model/unet.c) computes it. */
static void rb_ref(const rblock *b, double *const *s, double *y) {
  int n = b->n, hw = b->h * b->w, co = b->cout, tout = b->scale_shift ? 2 * co : co;
  size_t cnt = (size_t)n * co * hw;
  double *h0 = malloc(sizeof(double) * n * b->cin * hw), *h1 = malloc(sizeof(double) * cnt);
  double *tp = malloc(sizeof(double) * n * tout), *sc = malloc(sizeof(double) * cnt);
  gn_d(s[0], n, b->cin, hw, 2, 1e-5, s[2], s[3], 1, h0);
  conv_d(&b->conv1, h0, s[4], s[5], n, b->h, b->w, h1);
  linear_d(s[1], n, b->tdim, tout, s[6], s[7], tp);
  for (int i = 0; i < n; i++)
    for (int c = 0; c < co; c++)
      for (int k = 0; k < hw; k++) {
        size_t at = ((size_t)i * co + c) * hw + k;
        if (!b->scale_shift)
          h1[at] += tp[i * tout + c];
      }
  gn_d(h1, n, co, hw, 2, 1e-5, s[8], s[9], !b->scale_shift, h1);
  if (b->scale_shift)
    for (int i = 0; i < n; i++)
      for (int c = 0; c < co; c++)
        for (int k = 0; k < hw; k++) {
          size_t at = ((size_t)i * co + c) * hw + k;
          h1[at] = silu_d(h1[at] * (1 + tp[i * tout + c]) + tp[i * tout + co + c]);
        }
  conv_d(&b->conv2, h1, s[10], s[11], n, b->h, b->w, y);
  if (b->cin != b->cout)
    conv_d(&b->shortcut, s[0], s[12], s[13], n, b->h, b->w, sc);
  else
    memcpy(sc, s[0], sizeof(double) * cnt);
  for (size_t i = 0; i < cnt; i++)
    y[i] = (sc[i] + y[i]) / b->out_scale;
  free(h0), free(h1), free(tp), free(sc);
}

/* The block's nodes in forward order; activations in act[], their gradients in dact[]. */
enum { RB_H0, RB_H1, RB_TP, RB_H2, RB_H3, RB_H3P, RB_H4, RB_SC, RB_ACTS };

static int rb_nodes(const rblock *b, float **act, float **dact, float **d, const float *dy,
                    grad_node *nd) {
  int n = b->n, co = b->cout, m = 0;
  grad_node gn1 = {.op = GRAD_GROUP_NORM, .n = n, .c = b->cin, .h = b->h, .w = b->w};
  gn1.p.gn.groups = 2, gn1.p.gn.eps = 1e-5f, gn1.p.gn.silu = 1;
  gn1.src[0] = b->f[0], gn1.src[1] = b->f[2], gn1.src[2] = b->f[3];
  gn1.ddst = dact[RB_H0], gn1.dsrc[0] = d[0], gn1.dsrc[1] = d[2], gn1.dsrc[2] = d[3];
  nd[m++] = gn1;
  grad_node c1 = {.op = GRAD_CONV2D, .n = n, .c = b->cin, .h = b->h, .w = b->w};
  c1.p.conv = &b->conv1;
  c1.src[0] = act[RB_H0], c1.ddst = dact[RB_H1];
  c1.dsrc[0] = dact[RB_H0], c1.dsrc[1] = d[4], c1.dsrc[2] = d[5];
  nd[m++] = c1;
  grad_node tl = {.op = GRAD_LINEAR, .n = n, .c = b->tdim, .h = 1, .w = 1};
  tl.p.linear.out = b->scale_shift ? 2 * co : co;
  tl.src[0] = b->f[1], tl.src[1] = b->f[6], tl.src[2] = b->f[7], tl.ddst = dact[RB_TP];
  tl.dsrc[0] = d[1], tl.dsrc[1] = d[6], tl.dsrc[2] = d[7];
  nd[m++] = tl;
  grad_node ss = {.op = GRAD_SCALE_SHIFT, .n = n, .c = co, .h = b->h, .w = b->w};
  ss.p.ss.has_scale = b->scale_shift;
  ss.src[1] = act[RB_TP], ss.dsrc[1] = dact[RB_TP];
  grad_node gn2 = {.op = GRAD_GROUP_NORM, .n = n, .c = co, .h = b->h, .w = b->w};
  gn2.p.gn.groups = 2, gn2.p.gn.eps = 1e-5f, gn2.p.gn.silu = !b->scale_shift;
  gn2.src[1] = b->f[8], gn2.src[2] = b->f[9], gn2.dsrc[1] = d[8], gn2.dsrc[2] = d[9];
  if (!b->scale_shift) { /* h2 = h1 + tp; h3 = silu(gn2(h2)) */
    ss.src[0] = act[RB_H1], ss.ddst = dact[RB_H2], ss.dsrc[0] = dact[RB_H1];
    gn2.src[0] = act[RB_H2], gn2.ddst = dact[RB_H3], gn2.dsrc[0] = dact[RB_H2];
    nd[m++] = ss;
    nd[m++] = gn2;
  } else { /* h2 = gn2(h1); h3p = h2 * (1 + scale) + shift; h3 = silu(h3p) */
    gn2.src[0] = act[RB_H1], gn2.ddst = dact[RB_H2], gn2.dsrc[0] = dact[RB_H1];
    ss.src[0] = act[RB_H2], ss.ddst = dact[RB_H3P], ss.dsrc[0] = dact[RB_H2];
    grad_node si = {.op = GRAD_SILU, .n = n, .c = co, .h = b->h, .w = b->w};
    si.src[0] = act[RB_H3P], si.ddst = dact[RB_H3], si.dsrc[0] = dact[RB_H3P];
    nd[m++] = gn2;
    nd[m++] = ss;
    nd[m++] = si;
  }
  grad_node c2 = {.op = GRAD_CONV2D, .n = n, .c = co, .h = b->h, .w = b->w};
  c2.p.conv = &b->conv2;
  c2.src[0] = act[RB_H3], c2.ddst = dact[RB_H4];
  c2.dsrc[0] = dact[RB_H3], c2.dsrc[1] = d[10], c2.dsrc[2] = d[11];
  nd[m++] = c2;
  if (b->cin != b->cout) {
    grad_node sh = {.op = GRAD_CONV2D, .n = n, .c = b->cin, .h = b->h, .w = b->w};
    sh.p.conv = &b->shortcut;
    sh.src[0] = b->f[0], sh.ddst = dact[RB_SC];
    sh.dsrc[0] = d[0], sh.dsrc[1] = d[12], sh.dsrc[2] = d[13];
    nd[m++] = sh;
  }
  grad_node add = {.op = GRAD_ADD, .n = n, .c = co, .h = b->h, .w = b->w};
  add.p.add.divisor = b->out_scale;
  add.src[0] = b->cin != b->cout ? act[RB_SC] : b->f[0], add.src[1] = act[RB_H4], add.ddst = dy;
  add.dsrc[0] = b->cin != b->cout ? dact[RB_SC] : d[0], add.dsrc[1] = dact[RB_H4];
  nd[m++] = add;
  return m;
}

/* Which activation each node writes, in rb_nodes' order. */
static float *rb_out(const rblock *b, float **act, int i, int m, float *y) {
  static const int plain[] = {RB_H0, RB_H1, RB_TP, RB_H2, RB_H3, RB_H4, RB_SC};
  static const int shifted[] = {RB_H0, RB_H1, RB_TP, RB_H2, RB_H3P, RB_H3, RB_H4, RB_SC};
  if (i == m - 1)
    return y;
  return act[b->scale_shift ? shifted[i] : plain[i]];
}

/* ---------- the checks ---------- */

static double rel_l2_d(const double *a, const double *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* sum(g * y) for the double reference's output y of the inputs s (what the finite differences
 * differentiate), for one of the harness's cases (ctx) into its scratch y. */
typedef double (*fd_loss_fn)(const void *ctx, double *const *s);

/* Central differences of loss at up to max elements of s[slot] (all of them when it has that
 * few, else a fixed stride through it), against the analytic gradient an: their relative L2,
 * with a floor for gradients that vanish by symmetry (softmax makes the key bias irrelevant: its
 * gradient is float noise against an exact zero). s[slot] is left as it was. */
static double fd_rel_err(fd_loss_fn loss, const void *ctx, double *const *s, int slot, size_t size,
                         const float *an, size_t max) {
  const size_t cnt = size < max ? size : max;
  double num = 0, den = 0;
  /* cppcheck-suppress knownConditionTrueFalse ; sizes come from the cases, never 0 */
  for (size_t j = 0; j < cnt; j++) {
    size_t k = size <= max ? j : (j * 7919u + 13u) % size;
    double v = s[slot][k], hstep = FD_STEP * (fabs(v) > 1 ? fabs(v) : 1);
    s[slot][k] = v + hstep;
    double lp = loss(ctx, s);
    s[slot][k] = v - hstep;
    double lm = loss(ctx, s);
    s[slot][k] = v;
    double fd = (lp - lm) / (2 * hstep);
    num += (an[k] - fd) * (an[k] - fd);
    den += fd * fd;
  }
  return sqrt(num / fmax(den, 1e-2 * (double)cnt));
}

typedef struct case_loss {
  const opcase *oc;
  const float *g;
  double *y;
} case_loss;

static double loss_d(const void *ctx, double *const *s) {
  const case_loss *c = ctx;
  c->oc->ref(c->oc, s, c->y);
  double l = 0;
  for (size_t i = 0; i < c->oc->out_size; i++)
    l += c->g[i] * c->y[i];
  return l;
}

/* Runs the backward with dsrc pre-filled (the rules accumulate) and returns the increments. */
static float **run_backward(opcase *oc, const float *g, pool *p) {
  float **d = calloc(GRAD_MAX_SRC, sizeof *d), **pre = calloc(GRAD_MAX_SRC, sizeof *pre);
  for (int i = 0; i < oc->nslots; i++) {
    pre[i] = randn(oc->size[i], 0.1f);
    d[i] = malloc(oc->size[i] * sizeof(float));
    memcpy(d[i], pre[i], oc->size[i] * sizeof(float));
    oc->nd.dsrc[i] = d[i];
  }
  if (oc->nd.op == GRAD_ATTENTION && oc->aw.groups == 0)
    oc->nd.dsrc[1] = oc->nd.dsrc[2] = NULL;
  oc->nd.ddst = g;
  arena *a = arena_new(1 << 20);
  err e = {0};
  int rc = grad_backward(&oc->nd, a, p, &e);
  ck_assert_msg(rc == ERR_OK, "%s: backward failed: %s", oc->label, e.msg);
  arena_free(a);
  for (int i = 0; i < oc->nslots; i++) {
    for (size_t k = 0; k < oc->size[i]; k++)
      d[i][k] -= pre[i][k];
    free(pre[i]);
    oc->nd.dsrc[i] = NULL;
  }
  free(pre);
  return d;
}

static void free_grads(float **d) {
  for (int i = 0; i < GRAD_MAX_SRC; i++)
    free(d[i]);
  free(d);
}

/* Forward vs reference, then each slot's gradient vs central differences on up to FD_SAMPLES
 * of its elements. Returns the worst relative error seen (printed in the table). */
static double check_case(opcase *oc, double *fwd_err) {
  double *s[GRAD_MAX_SRC] = {0};
  for (int i = 0; i < oc->nslots; i++) {
    s[i] = malloc(oc->size[i] * sizeof(double));
    for (size_t k = 0; k < oc->size[i]; k++)
      s[i][k] = oc->f[i] ? oc->f[i][k] : 0;
  }
  double *yd = malloc(oc->out_size * sizeof(double));
  float *yf = malloc(oc->out_size * sizeof(float)), *g = randn(oc->out_size, 1.0f);
  arena *a = arena_new(1 << 20);
  err e = {0};
  ck_assert_msg(grad_forward(&oc->nd, yf, a, NULL, &e) == ERR_OK, "%s: %s", oc->label, e.msg);
  arena_free(a);
  oc->ref(oc, s, yd);
  double *yfd = malloc(oc->out_size * sizeof(double));
  for (size_t i = 0; i < oc->out_size; i++)
    yfd[i] = yf[i];
  *fwd_err = rel_l2_d(yfd, yd, oc->out_size);
  ck_assert_msg(*fwd_err <= oc->tol, "%s: forward rel L2 %.3g > %.3g", oc->label, *fwd_err,
                oc->tol);
  float **d = run_backward(oc, g, NULL);
  double worst = 0;
  for (int i = 0; i < oc->nslots; i++) {
    if (!oc->nd.src[i] && oc->nd.op != GRAD_CONV2D && oc->nd.op != GRAD_ATTENTION)
      continue;
    if (oc->nd.op == GRAD_ATTENTION && oc->aw.groups == 0 && (i == 1 || i == 2))
      continue;
    const case_loss cl = {oc, g, yd};
    double r = fd_rel_err(loss_d, &cl, s, i, oc->size[i], d[i], FD_SAMPLES);
    ck_assert_msg(r <= oc->tol, "%s: gradient of slot %d (%s) rel L2 %.3g > %.3g", oc->label, i,
                  grad_rule_get(oc->nd.op)->src_names[i], r, oc->tol);
    worst = r > worst ? r : worst;
  }
  free_grads(d);
  for (int i = 0; i < oc->nslots; i++)
    free(s[i]);
  free(yd), free(yf), free(yfd), free(g);
  return worst;
}

START_TEST(every_op_matches_reference_and_finite_differences) {
  static opcase cs[MAX_CASES];
  int m = build_cases(cs), covered[GRAD_OP_COUNT] = {0};
  printf("%-36s %-20s %10s %10s %8s\n", "case", "op", "fwd relL2", "grad relL2", "limit");
  for (int i = 0; i < m; i++) {
    double fe, ge = check_case(&cs[i], &fe);
    printf("%-36s %-20s %10.2e %10.2e %8.0e\n", cs[i].label, grad_rule_get(cs[i].nd.op)->name, fe,
           ge, cs[i].tol);
    covered[cs[i].nd.op] = 1;
    case_free(&cs[i]);
  }
  for (int op = 0; op < GRAD_OP_COUNT; op++)
    ck_assert_msg(covered[op], "op %s of the table has no case in the harness",
                  grad_rule_get(op)->name);
}
END_TEST

typedef struct rb_loss {
  const rblock *b;
  const float *g;
  double *y;
  size_t ycnt;
} rb_loss;

static double rb_loss_d(const void *ctx, double *const *s) {
  const rb_loss *c = ctx;
  rb_ref(c->b, s, c->y);
  double l = 0;
  for (size_t q = 0; q < c->ycnt; q++)
    l += c->g[q] * c->y[q];
  return l;
}

/* A ResnetBlock2D (default time embedding with a 1x1 shortcut, and scale-shift with the mid
 * block's output scale) composed from the table's rules, forward and backward, against the
 * block in double and central differences on every input and parameter. */
START_TEST(resnet_block_matches_finite_differences) {
  rblock cfgs[2] = {{.n = 2, .cin = 4, .cout = 6, .h = 5, .w = 4, .tdim = 5, .out_scale = 1.0f},
                    {.n = 2,
                     .cin = 6,
                     .cout = 6,
                     .h = 4,
                     .w = 4,
                     .tdim = 7,
                     .scale_shift = 1,
                     .out_scale = 0.7071f}};
  pool *p = pool_new(2);
  arena *a = arena_new(1 << 20);
  for (int ci = 0; ci < 2; ci++) {
    rblock *b = &cfgs[ci];
    rb_init(b);
    int hw = b->h * b->w, big = b->cin > b->cout ? b->cin : b->cout;
    size_t acnt = (size_t)b->n * big * hw + (size_t)b->n * 2 * b->cout,
           ycnt = b->size[0] / b->cin * b->cout;
    float *act[RB_ACTS], *dact[RB_ACTS], *d[RB_SLOTS] = {0};
    for (int i = 0; i < RB_ACTS; i++) {
      act[i] = calloc(acnt, sizeof(float));
      dact[i] = calloc(acnt, sizeof(float));
    }
    for (int i = 0; i < RB_SLOTS; i++)
      d[i] = b->size[i] ? calloc(b->size[i], sizeof(float)) : NULL;
    float *y = malloc(ycnt * sizeof(float)), *g = randn(ycnt, 1.0f);
    grad_node nd[10];
    int m = rb_nodes(b, act, dact, d, g, nd);
    err e = {0};
    for (int i = 0; i < m; i++)
      ck_assert_msg(grad_forward(&nd[i], rb_out(b, act, i, m, y), a, p, &e) == ERR_OK, "%s", e.msg);
    for (int i = m - 1; i >= 0; i--)
      ck_assert_msg(grad_backward(&nd[i], a, p, &e) == ERR_OK, "%s", e.msg);
    double *s[RB_SLOTS] = {0}, *yd = malloc(ycnt * sizeof(double)),
           *yfd = malloc(ycnt * sizeof(double));
    for (int i = 0; i < RB_SLOTS; i++) {
      s[i] = malloc((b->size[i] + 1) * sizeof(double));
      for (size_t k = 0; k < b->size[i]; k++)
        s[i][k] = b->f[i][k];
    }
    rb_ref(b, s, yd);
    for (size_t i = 0; i < ycnt; i++)
      yfd[i] = y[i];
    double fe = rel_l2_d(yfd, yd, ycnt), worst = 0;
    ck_assert_msg(fe < 1e-5, "resnet block %d: forward rel L2 %.3g", ci, fe);
    for (int i = 0; i < RB_SLOTS; i++) {
      if (!b->size[i]) /* no shortcut when cin == cout */
        continue;
      const rb_loss rl = {b, g, yd, ycnt};
      double r = fd_rel_err(rb_loss_d, &rl, s, i, b->size[i], d[i], 24);
      ck_assert_msg(r <= 2e-5, "resnet block %d: gradient of %s rel L2 %.3g", ci, rb_names[i], r);
      worst = r > worst ? r : worst;
    }
    printf("resnet block (%s, %d->%d): fwd rel L2 %.2e, worst grad rel L2 %.2e (limit 2e-05)\n",
           b->scale_shift ? "scale_shift" : "default", b->cin, b->cout, fe, worst);
    for (int i = 0; i < RB_ACTS; i++)
      free(act[i]), free(dact[i]);
    for (int i = 0; i < RB_SLOTS; i++)
      free(d[i]), free(s[i]);
    free(y), free(g), free(yd), free(yfd);
    rb_free(b);
  }
  arena_free(a);
  pool_free(p);
}
END_TEST

static float *load_npy(const char *dir, const char *name, const char *what, size_t want) {
  char path[700];
  snprintf(path, sizeof path, "%s/%s.%s.npy", dir, name, what);
  npy_array arr;
  err e = {0};
  ck_assert_msg(npy_read_f32(path, &arr, &e) == ERR_OK, "%s", e.msg);
  ck_assert_msg(want == 0 || (size_t)arr.count == want, "%s: %lld values, %zu expected", path,
                (long long)arr.count, want);
  return arr.data;
}

static int param_int(const json_t *cj, const char *key) {
  return (int)json_integer_value(json_object_get(json_object_get(cj, "params"), key));
}

static double param_num(const json_t *cj, const char *key) {
  return json_number_value(json_object_get(json_object_get(cj, "params"), key));
}

/* A fixture case as the harness's opcase: shapes and parameters from cases.json, inputs from
 * its .npy files. */
static void parity_case(opcase *oc, const json_t *cj, const char *dir) {
  const char *name = json_string_value(json_object_get(cj, "name"));
  const char *opname = json_string_value(json_object_get(cj, "op"));
  int op = 0;
  while (op < GRAD_OP_COUNT && strcmp(grad_rule_get(op)->name, opname) != 0)
    op++;
  ck_assert_msg(op < GRAD_OP_COUNT, "%s: unknown op %s", name, opname);
  int n = (int)json_integer_value(json_object_get(cj, "n")),
      c = (int)json_integer_value(json_object_get(cj, "c")),
      h = (int)json_integer_value(json_object_get(cj, "h")),
      w = (int)json_integer_value(json_object_get(cj, "w"));
  if (op == GRAD_CONV2D) {
    const json_t *pads = json_object_get(json_object_get(cj, "params"), "pads");
    int pd[4];
    for (int i = 0; i < 4; i++)
      pd[i] = (int)json_integer_value(json_array_get(pads, (size_t)i));
    *oc = conv_case(c, param_int(cj, "cout"), param_int(cj, "k"), param_int(cj, "stride"), pd[0],
                    pd[1], pd[2], pd[3], n, h, w);
  } else if (op == GRAD_ATTENTION) {
    *oc = attn_case(c, param_int(cj, "heads"), param_int(cj, "groups"),
                    (float)param_num(cj, "rescale"), n, h, w);
    oc->aw.eps = (float)param_num(cj, "eps");
  } else {
    *oc = node_case(op, n, c, h, w);
  }
  grad_node *nd = &oc->nd;
  switch (op) {
  case GRAD_GROUP_NORM:
    nd->p.gn.groups = param_int(cj, "groups");
    nd->p.gn.eps = (float)param_num(cj, "eps");
    nd->p.gn.silu = param_int(cj, "silu");
    break;
  case GRAD_LINEAR: nd->p.linear.out = param_int(cj, "out"); break;
  case GRAD_TIMESTEP_EMBEDDING:
    nd->p.temb.flip_sin_to_cos = param_int(cj, "flip_sin_to_cos");
    nd->p.temb.freq_shift = (float)param_num(cj, "freq_shift");
    break;
  case GRAD_TIME_MLP:
    nd->p.mlp.hidden = param_int(cj, "hidden");
    nd->p.mlp.out = param_int(cj, "out");
    break;
  case GRAD_CLASS_EMBEDDING: {
    nd->p.embed.classes = param_int(cj, "classes");
    float *lab = load_npy(dir, name, "labels", (size_t)n);
    for (int i = 0; i < n; i++)
      oc->labels[i] = (int64_t)lab[i];
    free(lab);
    break;
  }
  case GRAD_CONCAT: nd->p.concat.cb = param_int(cj, "cb"); break;
  case GRAD_SCALE_SHIFT: nd->p.ss.has_scale = param_int(cj, "has_scale"); break;
  case GRAD_ADD: nd->p.add.divisor = (float)param_num(cj, "divisor"); break;
  case GRAD_LAYER_NORM: nd->p.ln.eps = (float)param_num(cj, "eps"); break;
  case GRAD_MHA:
    nd->p.mha.heads = param_int(cj, "heads");
    nd->p.mha.lk = param_int(cj, "lk");
    nd->p.mha.causal = param_int(cj, "causal");
    break;
  case GRAD_TOKEN_EMBEDDING: {
    nd->p.tok.vocab = param_int(cj, "vocab");
    nd->p.tok.positions = param_int(cj, "positions");
    ck_assert_int_le(n * h * w, 64);
    float *ids = load_npy(dir, name, "labels", (size_t)n * h * w);
    for (int i = 0; i < n * h * w; i++)
      oc->ids[i] = (int64_t)ids[i];
    free(ids);
    break;
  }
  default: break;
  }
  int slots = (int)json_integer_value(json_object_get(cj, "slots"));
  ck_assert_int_eq(slots, grad_rule_get(op)->nsrc);
  for (int i = 0; i < slots; i++) {
    char what[16];
    snprintf(what, sizeof what, "in%d", i);
    oc->f[i] = load_npy(dir, name, what, 0);
  }
  /* the key bias's gradient is zero by symmetry; float noise on it sets attention's limit */
  case_init(oc, name, NULL, op == GRAD_ATTENTION || op == GRAD_MHA ? 5e-5 : 1e-5);
}

/* PyTorch autograd parity (tools/gen_grad_fixtures.py, torch.nn.functional composed as
 * diffusers' modules do, float64): outputs and every input's gradient within 1e-5 relative L2
 * (attention 5e-5). */
START_TEST(ops_match_pytorch_autograd) {
  char dir[512], path[600];
  test_src_path(dir, sizeof dir, "tests/fixtures/grad");
  snprintf(path, sizeof path, "%s/cases.json", dir);
  json_error_t je;
  json_t *root = json_load_file(path, 0, &je);
  ck_assert_msg(root != NULL, "%s: %s", path, je.text);
  const json_t *cases = json_object_get(root, "cases"), *cj;
  size_t ci;
  int covered[GRAD_OP_COUNT] = {0};
  json_array_foreach(cases, ci, cj) {
    static opcase oc;
    memset(&oc, 0, sizeof oc);
    parity_case(&oc, cj, dir);
    const char *name = oc.label;
    float *out = load_npy(dir, name, "out", oc.out_size),
          *g = load_npy(dir, name, "g", oc.out_size);
    float *y = malloc(oc.out_size * sizeof(float));
    arena *a = arena_new(1 << 20);
    err e = {0};
    ck_assert_msg(grad_forward(&oc.nd, y, a, NULL, &e) == ERR_OK, "%s: %s", name, e.msg);
    arena_free(a);
    double fe = test_rel_l2(y, out, oc.out_size), worst = 0;
    ck_assert_msg(fe <= 1e-5, "%s: output rel L2 %.3g against torch", name, fe);
    float **d = run_backward(&oc, g, NULL);
    for (int i = 0; i < oc.nslots; i++) {
      char what[16];
      snprintf(what, sizeof what, "d%d", i);
      float *ref = load_npy(dir, name, what, oc.size[i]);
      double num = 0, den = 0;
      for (size_t k = 0; k < oc.size[i]; k++) {
        num += ((double)d[i][k] - ref[k]) * ((double)d[i][k] - ref[k]);
        den += (double)ref[k] * ref[k];
      }
      double r = sqrt(num / fmax(den, 1e-2 * (double)oc.size[i]));
      ck_assert_msg(r <= oc.tol, "%s: gradient of slot %d (%s) rel L2 %.3g against torch", name, i,
                    grad_rule_get(oc.nd.op)->src_names[i], r);
      worst = r > worst ? r : worst;
      free(ref);
    }
    printf("torch parity %-24s fwd %.2e grad %.2e\n", name, fe, worst);
    covered[oc.nd.op] = 1;
    free_grads(d);
    free(out), free(g), free(y);
    case_free(&oc);
  }
  json_decref(root);
  for (int op = 0; op < GRAD_OP_COUNT; op++)
    ck_assert_msg(covered[op], "op %s has no PyTorch fixture", grad_rule_get(op)->name);
}
END_TEST

/* 1 and 2 threads give the same bits, on the small cases and on shapes big enough that the
 * convolution splits its weight gradient into several row, column and pixel tiles. */
START_TEST(gradients_do_not_depend_on_threads) {
  static opcase cs[MAX_CASES];
  int m = build_cases(cs);
  cs[m] = conv_case(64, 60, 3, 1, 1, 1, 1, 1, 2, 32, 32);
  case_init(&cs[m++], "conv 64->60 32x32", ref_conv, 0);
  cs[m] = conv_case(30, 52, 3, 2, 0, 0, 1, 1, 3, 16, 16);
  case_init(&cs[m++], "conv 30->52 s2 16x16", ref_conv, 0);
  cs[m] = attn_case(32, 4, 8, 1.0f, 2, 20, 20);
  case_init(&cs[m++], "attention 32ch 20x20", ref_attn, 0);
  cs[m] = mha_case(2, 32, 4, 300, 77, 0);
  case_init(&cs[m++], "cross-attention 300 queries 77 keys", ref_mha, 0);
  cs[m] = mha_case(3, 32, 4, 77, 77, 1);
  case_init(&cs[m++], "causal attention 77 tokens", ref_mha, 0);
  cs[m] = node_case(GRAD_LAYER_NORM, 2, 48, 150, 1);
  cs[m].nd.p.ln.eps = 1e-5f;
  case_init(&cs[m++], "layer_norm 48ch x 150 tokens", ref_ln, 0);
  pool *p2 = pool_new(2);
  ck_assert_ptr_nonnull(p2);
  for (int i = 0; i < m; i++) {
    float *g = randn(cs[i].out_size, 1.0f);
    case_seed = 1000;
    float **d1 = run_backward(&cs[i], g, NULL);
    case_seed = 1000;
    float **d2 = run_backward(&cs[i], g, p2);
    for (int s = 0; s < cs[i].nslots; s++)
      ck_assert_msg(memcmp(d1[s], d2[s], cs[i].size[s] * sizeof(float)) == 0,
                    "%s: slot %d differs between 1 and 2 threads", cs[i].label, s);
    free_grads(d1);
    free_grads(d2);
    free(g);
    case_free(&cs[i]);
  }
  pool_free(p2);
}
END_TEST

START_TEST(bad_nodes_name_the_field) {
  float x[64] = {0}, dx[64] = {0};
  arena *a = arena_new(1 << 16);
  err e = {0};
  grad_node nd = {.op = GRAD_GROUP_NORM, .n = 1, .c = 6, .h = 2, .w = 2};
  nd.p.gn.groups = 4;
  nd.p.gn.eps = 1e-5f;
  nd.src[0] = x;
  nd.ddst = x;
  nd.dsrc[0] = dx;
  ck_assert_int_eq(grad_backward(&nd, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "p.gn.groups"));
  nd.p.gn.groups = 3;
  nd.ddst = NULL;
  ck_assert_int_eq(grad_backward(&nd, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "ddst"));
  nd.ddst = x;
  nd.dsrc[5] = dx;
  ck_assert_int_eq(grad_backward(&nd, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "dsrc[5]"));
  nd.dsrc[5] = NULL;
  nd.dsrc[1] = dx; /* gamma's gradient without gamma */
  ck_assert_int_eq(grad_backward(&nd, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "need the gamma and beta"));
  grad_node ln = {.op = GRAD_LAYER_NORM, .n = 1, .c = 4, .h = 2, .w = 1};
  ln.src[0] = x;
  ck_assert_int_eq(grad_forward(&ln, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "p.ln.eps") != NULL, "%s", e.msg);
  ln.p.ln.eps = 1e-5f;
  ln.ddst = x;
  ln.dsrc[2] = dx;
  ck_assert_int_eq(grad_backward(&ln, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "need the gamma and beta"));
  int64_t labels[2] = {0, 9};
  grad_node em = {.op = GRAD_CLASS_EMBEDDING, .n = 2, .c = 4, .h = 1, .w = 1};
  em.p.embed.labels = labels;
  em.p.embed.classes = 3;
  em.src[0] = x;
  ck_assert_int_eq(grad_forward(&em, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "labels'[1]"));
  grad_node li = {.op = GRAD_LINEAR, .n = 2, .c = 4, .h = 1, .w = 1};
  li.p.linear.out = 3;
  li.src[0] = x;
  ck_assert_int_eq(grad_forward(&li, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "src[1]' (weight)"));
  grad_node cv = {.op = GRAD_CONV2D, .n = 1, .c = 2, .h = 4, .w = 4};
  cv.src[0] = x;
  ck_assert_int_eq(grad_forward(&cv, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "p.conv"));
  grad_node mh = {.op = GRAD_MHA, .n = 1, .c = 6, .h = 4, .w = 1};
  mh.p.mha.heads = 4;
  mh.p.mha.lk = 4;
  mh.src[0] = mh.src[1] = mh.src[2] = x;
  ck_assert_int_eq(grad_forward(&mh, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "p.mha.heads"));
  mh.p.mha.heads = 2;
  mh.p.mha.lk = 3;
  mh.p.mha.causal = 1;
  ck_assert_int_eq(grad_forward(&mh, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "p.mha.causal"));
  int64_t ids[4] = {0, 1, 2, 5};
  grad_node tk = {.op = GRAD_TOKEN_EMBEDDING, .n = 1, .c = 2, .h = 4, .w = 1};
  tk.p.tok.ids = ids;
  tk.p.tok.vocab = 3;
  tk.p.tok.positions = 4;
  tk.src[0] = tk.src[1] = x;
  ck_assert_int_eq(grad_forward(&tk, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "p.tok.ids'[3]") != NULL, "%s", e.msg);
  grad_node unknown = {.op = GRAD_OP_COUNT, .n = 1, .c = 1, .h = 1, .w = 1};
  ck_assert_int_eq(grad_forward(&unknown, dx, a, NULL, &e), ERR_INVALID);
  ck_assert_ptr_null(grad_rule_get(GRAD_OP_COUNT));
  arena_free(a);
}
END_TEST

/* Not a check: with DENOISED_GRAD_BENCH=1, the median time of a convolution's forward and of
 * its backward (input, weight and bias gradients) on layers of the UNets this engine runs. */
START_TEST(conv_backward_cost) {
  const char *on = getenv("DENOISED_GRAD_BENCH");
  if (!on || *on != '1')
    return;
  static const int shapes[][6] = {/* cin, cout, k, stride, n, size */
                                  {64, 64, 3, 1, 16, 16},
                                  {128, 128, 3, 1, 16, 16},
                                  {128, 128, 3, 1, 4, 32},
                                  {128, 128, 3, 2, 4, 32},
                                  {256, 128, 1, 1, 4, 32}};
  int threads = getenv("DENOISED_GRAD_THREADS") ? atoi(getenv("DENOISED_GRAD_THREADS")) : 2;
  pool *p = pool_new(threads);
  arena *a = arena_new(64 << 20);
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    const int *sh = shapes[si];
    int pad = sh[3] == 2 ? 0 : sh[2] / 2;
    opcase oc =
        conv_case(sh[0], sh[1], sh[2], sh[3], pad, pad, sh[2] / 2, sh[2] / 2, sh[4], sh[5], sh[5]);
    case_init(&oc, "bench", ref_conv, 0);
    float *y = malloc(oc.out_size * sizeof(float)), *g = randn(oc.out_size, 1.0f);
    float *dx = calloc(oc.size[0], sizeof(float)), *dw = calloc(oc.size[1], sizeof(float));
    float *db = calloc(oc.size[2], sizeof(float));
    oc.nd.ddst = g;
    double tf[5], tb[5], tx[5], tw[5];
    err e;
    for (int r = 0; r < 5; r++) {
      double t0 = test_now_s();
      grad_forward(&oc.nd, y, a, p, &e);
      double t1 = test_now_s();
      oc.nd.dsrc[0] = dx;
      oc.nd.dsrc[1] = dw;
      oc.nd.dsrc[2] = db;
      grad_backward(&oc.nd, a, p, &e);
      double t2 = test_now_s();
      oc.nd.dsrc[1] = oc.nd.dsrc[2] = NULL;
      grad_backward(&oc.nd, a, p, &e);
      double t3 = test_now_s();
      oc.nd.dsrc[0] = NULL;
      oc.nd.dsrc[1] = dw;
      grad_backward(&oc.nd, a, p, &e);
      double t4 = test_now_s();
      oc.nd.dsrc[1] = NULL;
      tf[r] = t1 - t0, tb[r] = t2 - t1, tx[r] = t3 - t2, tw[r] = t4 - t3;
    }
    double *all[4] = {tf, tb, tx, tw};
    for (int k = 0; k < 4; k++) /* median of 5 */
      for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
          if (all[k][j] < all[k][i]) {
            double t = all[k][i];
            all[k][i] = all[k][j];
            all[k][j] = t;
          }
    double flops = 2.0 * oc.out_size * sh[0] * sh[2] * sh[2];
    printf("conv %3d->%3d k%d s%d batch %2d %2dx%-2d (%d threads): fwd %7.2f ms (%5.1f GFLOP/s), "
           "bwd %7.2f ms = %.2fx fwd (dx %.2f ms, dW %.2f ms)\n",
           sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], sh[5], threads, tf[2] * 1e3,
           flops / tf[2] * 1e-9, tb[2] * 1e3, tb[2] / tf[2], tx[2] * 1e3, tw[2] * 1e3);
    free(y), free(g), free(dx), free(dw), free(db);
    case_free(&oc);
  }
  arena_free(a);
  pool_free(p);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("grad_ops");
  TCase *tc = tcase_create("grad_ops");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, every_op_matches_reference_and_finite_differences);
  tcase_add_test(tc, resnet_block_matches_finite_differences);
  tcase_add_test(tc, ops_match_pytorch_autograd);
  tcase_add_test(tc, gradients_do_not_depend_on_threads);
  tcase_add_test(tc, bad_nodes_name_the_field);
  tcase_add_test(tc, conv_backward_cost);
  suite_add_tcase(s, tc);
  return s;
}
