/* The CLIP text encoder's backward, as unet_grad.c does the UNet's: the forward written as a
 * tape of engine/grad nodes (token + position embedding, then per layer layer_norm1, the q/k/v
 * projections as 1x1 convolutions on the channel-major [n][d][len] sequence, causal multi-head
 * attention, out_proj, the residual add, layer_norm2, fc1, quick_gelu or gelu, fc2, the residual
 * add; the final layer norm), run forward keeping every activation, then each node's backward
 * rule in reverse order. Rules accumulate, so a tensor read twice (the residual stream) collects
 * both gradients; parameter gradients go straight into the caller's block at the tensor's
 * offset. */
#include "clip_grad.h"

#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "grad.h"
#include "mem.h"
#include "ops.h"

typedef struct ctape {
  grad_node *nd;
  float **out; /* each node's output buffer */
  int m, cap;
  float **bufs; /* every allocation, freed at the end */
  int nbufs, bufcap;
  conv2d *convs;
  int nconv;
} ctape;

static float *buf(ctape *t, size_t count) {
  if (t->nbufs == t->bufcap)
    return NULL;
  float *b = mem_calloc(count ? count : 1, sizeof(float));
  if (b)
    t->bufs[t->nbufs++] = b;
  return b;
}

/* A node on the tape with a fresh output and output-gradient buffer of count floats. */
static grad_node *push(ctape *t, grad_op op, int n, int c, int len, size_t count, float **out,
                       float **dout) {
  if (t->m == t->cap)
    return NULL;
  *out = buf(t, count);
  *dout = buf(t, count);
  if (!*out || !*dout)
    return NULL;
  grad_node *nd = &t->nd[t->m];
  memset(nd, 0, sizeof *nd);
  nd->op = op;
  nd->n = n;
  nd->c = c;
  nd->h = len;
  nd->w = 1;
  nd->ddst = *dout;
  t->out[t->m++] = *out;
  return nd;
}

/* Tensor i of the weight block: its values and its gradient in grad_params. */
static const float *w_at(const clip_text_model *m, int i, float *gp, float **g) {
  size_t off, cnt, total;
  const float *w = clip_text_weights(m, &total);
  clip_text_tensor(m, i, &off, &cnt);
  *g = gp + off;
  return w + off;
}

/* A 1x1 projection node: y = W x + b over the channels of every position. */
static int proj(ctape *t, const clip_text_model *m, int wi, float *gp, int n, int cin, int cout,
                int len, const float *x, float *dx, float **y, float **dy) {
  float *gw, *gb;
  const float *w = w_at(m, wi, gp, &gw), *b = w_at(m, wi + 1, gp, &gb);
  conv2d *c = &t->convs[t->nconv];
  *c = (conv2d){.cin = cin, .cout = cout, .k = 1, .stride = 1, .weight = w, .bias = b};
  if (ops_conv2d_pack(c))
    return -1;
  t->nconv++;
  grad_node *nd = push(t, GRAD_CONV2D, n, cin, len, (size_t)n * cout * len, y, dy);
  if (!nd)
    return -1;
  nd->p.conv = c;
  nd->src[0] = x;
  nd->dsrc[0] = dx;
  nd->dsrc[1] = gw;
  nd->dsrc[2] = gb;
  return 0;
}

static int norm(ctape *t, const clip_text_model *m, int wi, float *gp, int n, int d, int len,
                float eps, const float *x, float *dx, float **y, float **dy) {
  float *gg, *gb;
  grad_node *nd = push(t, GRAD_LAYER_NORM, n, d, len, (size_t)n * d * len, y, dy);
  if (!nd)
    return -1;
  nd->p.ln.eps = eps;
  nd->src[0] = x;
  nd->src[1] = w_at(m, wi, gp, &gg);
  nd->src[2] = w_at(m, wi + 1, gp, &gb);
  nd->dsrc[0] = dx;
  nd->dsrc[1] = gg;
  nd->dsrc[2] = gb;
  return 0;
}

static int add(ctape *t, int n, int d, int len, const float *a, float *da, const float *b,
               float *db, float **y, float **dy) {
  grad_node *nd = push(t, GRAD_ADD, n, d, len, (size_t)n * d * len, y, dy);
  if (!nd)
    return -1;
  nd->p.add.divisor = 1.0f;
  nd->src[0] = a;
  nd->src[1] = b;
  nd->dsrc[0] = da;
  nd->dsrc[1] = db;
  return 0;
}

/* Builds the tape; *top / *dtop receive the final layer norm's output and its gradient. */
static int build(ctape *t, const clip_text_model *m, const int64_t *ids, int n, int len, int nl,
                 float *gp, float **top, float **dtop) {
  const clip_text_config *c = clip_text_config_of(m);
  int d = c->hidden_size, in = c->intermediate_size;
  float *x, *dx, *gt, *gpos;
  grad_node *em = push(t, GRAD_TOKEN_EMBEDDING, n, d, len, (size_t)n * d * len, &x, &dx);
  if (!em)
    return -1;
  em->p.tok.ids = ids;
  em->p.tok.vocab = c->vocab_size;
  em->p.tok.positions = c->max_positions;
  em->src[0] = w_at(m, 0, gp, &gt);
  em->src[1] = w_at(m, 1, gp, &gpos);
  em->dsrc[0] = gt;
  em->dsrc[1] = gpos;
  for (int l = 0; l < nl; l++) {
    int b = 4 + 16 * l;
    float *h1, *dh1, *q, *dq, *k, *dk, *v, *dv, *o, *dO, *a, *da, *xm, *dxm, *h2, *dh2;
    float *f1, *df1, *g, *dg, *f2, *df2;
    if (norm(t, m, b, gp, n, d, len, c->eps, x, dx, &h1, &dh1) ||
        proj(t, m, b + 4, gp, n, d, d, len, h1, dh1, &q, &dq) ||
        proj(t, m, b + 6, gp, n, d, d, len, h1, dh1, &k, &dk) ||
        proj(t, m, b + 8, gp, n, d, d, len, h1, dh1, &v, &dv))
      return -1;
    grad_node *at = push(t, GRAD_MHA, n, d, len, (size_t)n * d * len, &o, &dO);
    if (!at)
      return -1;
    at->p.mha.heads = c->heads;
    at->p.mha.lk = len;
    at->p.mha.causal = 1;
    at->src[0] = q, at->src[1] = k, at->src[2] = v;
    at->dsrc[0] = dq, at->dsrc[1] = dk, at->dsrc[2] = dv;
    if (proj(t, m, b + 10, gp, n, d, d, len, o, dO, &a, &da) ||
        add(t, n, d, len, x, dx, a, da, &xm, &dxm) ||
        norm(t, m, b + 2, gp, n, d, len, c->eps, xm, dxm, &h2, &dh2) ||
        proj(t, m, b + 12, gp, n, d, in, len, h2, dh2, &f1, &df1))
      return -1;
    grad_node *act = push(t, c->act == CLIP_ACT_GELU ? GRAD_GELU : GRAD_QUICK_GELU, n, in, len,
                          (size_t)n * in * len, &g, &dg);
    if (!act)
      return -1;
    act->src[0] = f1;
    act->dsrc[0] = df1;
    if (proj(t, m, b + 14, gp, n, in, d, len, g, dg, &f2, &df2) ||
        add(t, n, d, len, xm, dxm, f2, df2, &x, &dx))
      return -1;
  }
  return norm(t, m, 2, gp, n, d, len, c->eps, x, dx, top, dtop);
}

int clip_text_backward(const clip_text_model *m, const int64_t *ids, int n, int len, int clip_skip,
                       const float *grad_hidden, float *grad_params, float *hidden, pool *p,
                       err *e) {
  const clip_text_config *c = clip_text_config_of(m);
  int d = c->hidden_size;
  if (!grad_hidden || !grad_params)
    return err_set(e, ERR_INVALID, "text encoder backward: %s is missing",
                   grad_hidden ? "the parameter gradient buffer" : "the output gradient");
  /* the engine's own forward validates the ids and clip skip (and gives the caller its output) */
  float *out = hidden ? hidden : mem_malloc(sizeof(float) * n * len * d + 4);
  if (!out)
    return err_set(e, ERR_NOMEM, "out of memory for the text encoder's output");
  int rc = clip_text_encode(m, ids, n, len, clip_skip, out, p, e);
  if (out != hidden)
    free(out);
  if (rc)
    return rc;
  int nl = c->layers - (clip_skip - 1);
  ctape t = {.cap = 2 + 12 * nl, .bufcap = 2 * (2 + 12 * nl)};
  t.nd = mem_calloc((size_t)t.cap, sizeof *t.nd);
  t.out = mem_calloc((size_t)t.cap, sizeof *t.out);
  t.bufs = mem_calloc((size_t)t.bufcap, sizeof *t.bufs);
  t.convs = mem_calloc((size_t)6 * nl + 1, sizeof *t.convs);
  arena *a = arena_new(4u << 20);
  float *top = NULL, *dtop = NULL;
  if (!t.nd || !t.out || !t.bufs || !t.convs || !a ||
      build(&t, m, ids, n, len, nl, grad_params, &top, &dtop))
    rc = err_set(e, ERR_NOMEM, "out of memory for the text encoder's gradient");
  for (int i = 0; !rc && i < t.m; i++)
    rc = grad_forward(&t.nd[i], t.out[i], a, p, e);
  if (!rc) /* [n][len][d] -> channel-major */
    for (int i = 0; i < n; i++)
      for (int q = 0; q < len; q++)
        for (int ch = 0; ch < d; ch++)
          dtop[((size_t)i * d + ch) * len + q] = grad_hidden[((size_t)i * len + q) * d + ch];
  for (int i = t.m - 1; !rc && i >= 0; i--)
    rc = grad_backward(&t.nd[i], a, p, e);
  for (int i = 0; i < t.nconv; i++)
    ops_conv2d_unpack(&t.convs[i]);
  for (int i = 0; i < t.nbufs; i++)
    free(t.bufs[i]);
  free(t.nd), free(t.out), free(t.bufs), free(t.convs);
  arena_free(a);
  return rc;
}
