/* Backward of ops_attention (diffusers' AttnProcessor on a 4-D input: group norm, q/k/v as 1x1
 * convolutions, softmax(q^T k / sqrt(d)) per head, output projection, residual, rescale),
 * composed from the convolution and group-norm rules around the attention core. Everything is
 * recomputed from x; the scores are recomputed one block of query rows at a time, so the memory
 * is that of the forward. One task per (image, head) owns its rows of dq and all of its dk and
 * dv, summing the row blocks in order: the result does not depend on the thread count. The same
 * core, with queries and keys of different lengths and an optional causal mask, is the table's
 * multi-head attention (the transformers' self- and cross-attention, CLIP's causal one). */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "grad_rules.h"

#define ATTN_ROWS 256 /* query rows per block of scores, as in the forward */

typedef struct attn_bwd {
  const float *q, *k, *v, *dout; /* q, dout, o, dq [n][c][lq]; k, v, dk, dv [n][c][lk] */
  float *o, *dq, *dk, *dv;       /* o: forward output of the core, written when dout is NULL */
  float *scores;                 /* per worker: 2 x rows x lk */
  int c, lq, lk, heads, dh, rows, causal;
  float scale;
} attn_bwd;

/* With dout == NULL: the forward core o = v P^T. Otherwise, with P = softmax(scale q^T k):
 * dv = dout P, dP = dout^T v, dS = P (dP - rowsum(dP P)), dq = scale k dS^T, dk = scale q dS.
 * Under the causal mask P is zero past the diagonal, and so is dS. */
static void attn_task(void *ctx, int task, int worker) {
  attn_bwd *j = ctx;
  int head = task % j->heads, img = task / j->heads, lq = j->lq, lk = j->lk;
  size_t qb = ((size_t)img * j->c + (size_t)head * j->dh) * lq;
  size_t kb = ((size_t)img * j->c + (size_t)head * j->dh) * lk;
  float *s = j->scores + (size_t)worker * 2 * j->rows * lk, *dp = s + (size_t)j->rows * lk;
  for (int r0 = 0; r0 < lq; r0 += j->rows) {
    int nr = r0 + j->rows < lq ? j->rows : lq - r0;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nr, lk, j->dh, j->scale, j->q + qb + r0,
                lq, j->k + kb, lk, 0.0f, s, lk);
    if (!j->causal)
      ops_softmax_rows(s, nr, lk); /* as the forward computes it */
    else
      for (int r = 0; r < nr; r++) {
        ops_softmax_rows(s + (size_t)r * lk, 1, r0 + r + 1);
        memset(s + (size_t)r * lk + r0 + r + 1, 0, sizeof(float) * (size_t)(lk - r0 - r - 1));
      }
    if (!j->dout) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->dh, nr, lk, 1.0f, j->v + kb, lk, s,
                  lk, 0.0f, j->o + qb + r0, lq);
      continue;
    }
    const float *dout = j->dout + qb + r0;
    /* dv[d][l] += sum_r dout[d][r] P[r][l] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->dh, lk, nr, 1.0f, dout, lq, s, lk,
                1.0f, j->dv + kb, lk);
    /* dP[r][l] = sum_d dout[d][r] v[d][l] */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nr, lk, j->dh, 1.0f, dout, lq, j->v + kb,
                lk, 0.0f, dp, lk);
    for (int r = 0; r < nr; r++) {
      float *pr = s + (size_t)r * lk, *dr = dp + (size_t)r * lk;
      double dot = 0;
      for (int l = 0; l < lk; l++)
        dot += (double)pr[l] * dr[l];
      float fd = (float)dot;
      for (int l = 0; l < lk; l++)
        dr[l] = pr[l] * (dr[l] - fd);
    }
    /* dq[d][r] += scale sum_l k[d][l] dS[r][l]; dk[d][l] += scale sum_r q[d][r] dS[r][l] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->dh, nr, lk, j->scale, j->k + kb, lk, dp,
                lk, 1.0f, j->dq + qb + r0, lq);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->dh, lk, nr, j->scale, j->q + qb + r0,
                lq, dp, lk, 1.0f, j->dk + kb, lk);
  }
}

/* The core's job for n images of c channels in heads, lq queries and lk keys. */
static attn_bwd attn_job(int c, int heads, int lq, int lk, int causal) {
  attn_bwd j = {.c = c, .lq = lq, .lk = lk, .heads = heads, .dh = c / heads, .causal = causal};
  j.rows = lq < ATTN_ROWS ? lq : ATTN_ROWS;
  j.scale = 1.0f / sqrtf((float)j.dh);
  return j;
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
  attn_bwd j = attn_job(c, aw->heads, L, L, 0);
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
  memset(dq, 0, sizeof(float) * count * 3);
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

/* ---------- multi-head attention core (self, cross, causal) ---------- */

static int mha_scores(const grad_node *nd, attn_bwd *j, arena *a, pool *p, err *e) {
  *j = attn_job(nd->c, nd->p.mha.heads, nd->h * nd->w, nd->p.mha.lk, nd->p.mha.causal);
  j->q = nd->src[0];
  j->k = nd->src[1];
  j->v = nd->src[2];
  j->scores = arena_floats(a, (size_t)2 * j->rows * j->lk * pool_threads(p));
  if (!j->scores)
    return err_set(e, ERR_NOMEM, "out of memory for the scores of an attention");
  return ERR_OK;
}

/* Self- and cross-attention run the engine's ops_mha; the causal mask (CLIP) runs the core
 * above, whose softmax over each row's first r + 1 scores is the text encoder's. */
int grad_mha_forward(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  if (!nd->p.mha.causal) {
    if (ops_mha(nd->src[0], nd->src[1], nd->src[2], nd->n, nd->c, nd->p.mha.heads, nd->h * nd->w,
                nd->p.mha.lk, dst, a, p))
      return err_set(e, ERR_NOMEM, "out of memory in an attention");
    return ERR_OK;
  }
  arena_mark m = arena_get_mark(a);
  attn_bwd j;
  int rc = mha_scores(nd, &j, a, p, e);
  if (!rc) {
    j.o = dst;
    pool_run(p, nd->n * j.heads, attn_task, &j);
  }
  arena_release(a, m);
  return rc;
}

/* dq, dk, dv accumulate straight into the caller's gradients (each (image, head) task owns its
 * channels of all three); a slot not asked for gets zeroed scratch that nothing reads. */
int grad_mha_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  arena_mark m = arena_get_mark(a);
  attn_bwd j;
  int rc = mha_scores(nd, &j, a, p, e);
  if (rc)
    return rc;
  size_t nq = (size_t)nd->n * nd->c * j.lq, nk = (size_t)nd->n * nd->c * j.lk;
  float *scratch = arena_floats(a, nq + 2 * nk);
  if (!scratch) {
    arena_release(a, m);
    return err_set(e, ERR_NOMEM, "out of memory for the gradient of an attention");
  }
  memset(scratch, 0, sizeof(float) * (nq + 2 * nk));
  j.dout = nd->ddst;
  j.dq = nd->dsrc[0] ? nd->dsrc[0] : scratch;
  j.dk = nd->dsrc[1] ? nd->dsrc[1] : scratch + nq;
  j.dv = nd->dsrc[2] ? nd->dsrc[2] : scratch + nq + nk;
  pool_run(p, nd->n * j.heads, attn_task, &j);
  arena_release(a, m);
  return ERR_OK;
}
