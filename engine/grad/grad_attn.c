/* Backward of ops_attention (diffusers' AttnProcessor on a 4-D input: group norm, q/k/v as 1x1
 * convolutions, softmax(q^T k / sqrt(d)) per head, output projection, residual, rescale),
 * composed from the convolution and group-norm rules around the attention core. Everything is
 * recomputed from x; the scores are recomputed one block of query rows at a time, so the memory
 * is that of the forward. One task per (image, head) owns its rows of dq and all of its dk and
 * dv, summing the row blocks in order: the result does not depend on the thread count. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "grad_rules.h"

#define ATTN_ROWS 256 /* query rows per block of scores, as in the forward */

typedef struct attn_bwd {
  const float *q, *k, *v, *dout; /* [n][c][L] */
  float *o, *dq, *dk, *dv;       /* o: forward output of the core, written when dout is NULL */
  float *scores;                 /* per worker: 2 x rows x L */
  int c, L, heads, dh, rows;
  float scale;
} attn_bwd;

/* With dout == NULL: the forward core o = v P^T. Otherwise, with P = softmax(scale q^T k):
 * dv = dout P, dP = dout^T v, dS = P (dP - rowsum(dP P)), dq = scale k dS^T, dk = scale q dS. */
static void attn_task(void *ctx, int task, int worker) {
  attn_bwd *j = ctx;
  int head = task % j->heads, img = task / j->heads, L = j->L;
  size_t base = ((size_t)img * j->c + (size_t)head * j->dh) * L;
  float *s = j->scores + (size_t)worker * 2 * j->rows * L, *dp = s + (size_t)j->rows * L;
  for (int r0 = 0; r0 < L; r0 += j->rows) {
    int nr = r0 + j->rows < L ? j->rows : L - r0;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nr, L, j->dh, j->scale, j->q + base + r0,
                L, j->k + base, L, 0.0f, s, L);
    ops_softmax_rows(s, nr, L); /* as the forward computes it */
    if (!j->dout) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->dh, nr, L, 1.0f, j->v + base, L, s, L,
                  0.0f, j->o + base + r0, L);
      continue;
    }
    const float *dout = j->dout + base + r0;
    /* dv[d][l] += sum_r dout[d][r] P[r][l] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->dh, L, nr, 1.0f, dout, L, s, L, 1.0f,
                j->dv + base, L);
    /* dP[r][l] = sum_d dout[d][r] v[d][l] */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nr, L, j->dh, 1.0f, dout, L, j->v + base,
                L, 0.0f, dp, L);
    for (int r = 0; r < nr; r++) {
      float *pr = s + (size_t)r * L, *dr = dp + (size_t)r * L;
      double dot = 0;
      for (int l = 0; l < L; l++)
        dot += (double)pr[l] * dr[l];
      float fd = (float)dot;
      for (int l = 0; l < L; l++)
        dr[l] = pr[l] * (dr[l] - fd);
    }
    /* dq[d][r] = scale sum_l k[d][l] dS[r][l]; dk[d][l] += scale sum_r q[d][r] dS[r][l] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->dh, nr, L, j->scale, j->k + base, L, dp,
                L, 0.0f, j->dq + base + r0, L);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->dh, L, nr, j->scale, j->q + base + r0,
                L, dp, L, 1.0f, j->dk + base, L);
  }
}

static int conv_bwd(const conv2d *c, const float *x, int n, int L, const float *dy, float *dx,
                    float *dw, float *db, arena *a, pool *p, err *e) {
  grad_node cn = {.op = GRAD_CONV2D, .n = n, .c = c->cin, .h = L, .w = 1, .p.conv = c};
  cn.src[0] = x;
  cn.ddst = dy;
  cn.dsrc[0] = dx;
  cn.dsrc[1] = dw;
  cn.dsrc[2] = db;
  return grad_conv2d_backward(&cn, a, p, e);
}

int grad_attention_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  const attn_weights *aw = nd->p.attn;
  int n = nd->n, c = aw->channels, L = nd->h * nd->w, threads = pool_threads(p);
  size_t count = (size_t)n * c * L;
  arena_mark m = arena_get_mark(a);
  float *buf = arena_floats(a, count * 9);
  attn_bwd j = {.c = c, .L = L, .heads = aw->heads, .dh = c / aw->heads};
  j.rows = L < ATTN_ROWS ? L : ATTN_ROWS;
  j.scale = 1.0f / sqrtf((float)j.dh);
  j.scores = arena_floats(a, (size_t)2 * j.rows * L * threads);
  if (!buf || !j.scores)
    return err_set(e, ERR_NOMEM, "out of memory for the gradient of an attention block");
  float *xn = buf, *q = buf + count, *k = buf + 2 * count, *v = buf + 3 * count;
  float *o = buf + 4 * count, *dxn = buf + 5 * count, *dq = buf + 6 * count;
  float *dk = buf + 7 * count, *dv = buf + 8 * count;
  memset(dxn, 0, sizeof(float) * count * 4); /* dxn, dq, dk, dv accumulate */
  if (aw->groups > 0)
    ops_group_norm(nd->src[0], n, c, L, aw->groups, aw->eps, aw->norm_gamma, aw->norm_beta, 0, xn,
                   p);
  else
    memcpy(xn, nd->src[0], sizeof(float) * count);
  float *qkv[3] = {q, k, v};
  for (int i = 0; i < 3; i++)
    if (ops_conv2d(&aw->proj[i], xn, n, L, 1, qkv[i], a, p)) {
      arena_release(a, m);
      return err_set(e, ERR_NOMEM, "out of memory for the gradient of an attention block");
    }
  j.q = q;
  j.k = k;
  j.v = v;
  j.o = o;
  pool_run(p, n * aw->heads, attn_task, &j);
  /* y = (x + out(o)) / rescale: the residual and the output projection see ddst / rescale */
  float *dyr = dq; /* dq is not needed before the core's backward */
  for (size_t i = 0; i < count; i++)
    dyr[i] = nd->ddst[i] / aw->rescale;
  if (nd->dsrc[0])
    for (size_t i = 0; i < count; i++)
      nd->dsrc[0][i] += dyr[i];
  float *dout = dk; /* reused the same way; zeroed again below */
  memset(dout, 0, sizeof(float) * count);
  int rc = conv_bwd(&aw->proj[3], o, n, L, dyr, dout, nd->dsrc[9], nd->dsrc[10], a, p, e);
  if (rc) {
    arena_release(a, m);
    return rc;
  }
  memcpy(o, dout, sizeof(float) * count); /* o now holds d(core output) */
  memset(dq, 0, sizeof(float) * count * 2);
  j.dout = o;
  j.dq = dq;
  j.dk = dk;
  j.dv = dv;
  pool_run(p, n * aw->heads, attn_task, &j);
  float *dqkv[3] = {dq, dk, dv};
  for (int i = 0; i < 3 && !rc; i++)
    rc = conv_bwd(&aw->proj[i], xn, n, L, dqkv[i], dxn, nd->dsrc[3 + 2 * i], nd->dsrc[4 + 2 * i], a,
                  p, e);
  if (!rc && aw->groups > 0 && (nd->dsrc[0] || nd->dsrc[1] || nd->dsrc[2])) {
    grad_node gn = {.op = GRAD_GROUP_NORM, .n = n, .c = c, .h = L, .w = 1};
    gn.p.gn.groups = aw->groups;
    gn.p.gn.eps = aw->eps;
    gn.src[0] = nd->src[0];
    gn.src[1] = aw->norm_gamma;
    gn.src[2] = aw->norm_beta;
    gn.ddst = dxn;
    gn.dsrc[0] = nd->dsrc[0];
    gn.dsrc[1] = nd->dsrc[1];
    gn.dsrc[2] = nd->dsrc[2];
    rc = grad_group_norm_backward(&gn, a, p, e);
  } else if (!rc && aw->groups == 0 && nd->dsrc[0]) {
    for (size_t i = 0; i < count; i++)
      nd->dsrc[0][i] += dxn[i];
  }
  arena_release(a, m);
  return rc;
}
