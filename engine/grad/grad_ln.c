/* Backward of ops_layer_norm over the channels of each position of a channel-major [n][c][L]
 * sequence (the transformers' norm1/norm2/norm3, CLIP's layer_norm1/2 and final_layer_norm).
 * The statistics are recomputed as the forward computes them (double sums, then mean and
 * 1/sqrt(var + eps) rounded to float), so x-hat is the forward's. One task per (image, block of
 * positions) writes its positions of dx and its own partial sums for gamma and beta; the partials
 * are added task by task afterwards, so the sums do not depend on the thread count. */
#include <math.h>
#include <string.h>

#include "grad_rules.h"

#define LN_BLOCK 64 /* positions per task */

typedef struct ln_bwd {
  const grad_node *nd;
  int L, nblocks;
  double *dgamma, *dbeta; /* [tasks][c] partials */
} ln_bwd;

static void ln_task(void *ctx, int task, int worker) {
  (void)worker;
  const ln_bwd *j = ctx;
  const grad_node *nd = j->nd;
  int c = nd->c, L = j->L, img = task / j->nblocks, l0 = task % j->nblocks * LN_BLOCK;
  int nt = L - l0 < LN_BLOCK ? L - l0 : LN_BLOCK;
  size_t base = (size_t)img * c * L + (size_t)l0;
  const float *x = nd->src[0] + base, *dy = nd->ddst + base;
  const float *gamma = nd->src[1];
  double *dg = j->dgamma + (size_t)task * c, *db = j->dbeta + (size_t)task * c;
  for (int t = 0; t < nt; t++) {
    double mean = 0, var = 0;
    for (int ch = 0; ch < c; ch++)
      mean += x[(size_t)ch * L + t];
    mean /= c;
    for (int ch = 0; ch < c; ch++) {
      double d = x[(size_t)ch * L + t] - mean;
      var += d * d;
    }
    float fm = (float)mean, rstd = (float)(1.0 / sqrt(var / c + nd->p.ln.eps));
    double s1 = 0, s2 = 0;
    for (int ch = 0; ch < c; ch++) {
      size_t i = (size_t)ch * L + t;
      float xh = (x[i] - fm) * rstd, gy = dy[i] * (gamma ? gamma[ch] : 1.0f);
      dg[ch] += (double)dy[i] * xh;
      db[ch] += dy[i];
      s1 += gy;
      s2 += (double)gy * xh;
    }
    if (!nd->dsrc[0])
      continue;
    float m1 = (float)(s1 / c), m2 = (float)(s2 / c);
    float *dx = nd->dsrc[0] + base;
    for (int ch = 0; ch < c; ch++) {
      size_t i = (size_t)ch * L + t;
      float xh = (x[i] - fm) * rstd, gy = dy[i] * (gamma ? gamma[ch] : 1.0f);
      dx[i] += rstd * (gy - m1 - xh * m2);
    }
  }
}

int grad_layer_norm_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  int c = nd->c, L = nd->h * nd->w, nblocks = (L + LN_BLOCK - 1) / LN_BLOCK;
  int tasks = nd->n * nblocks;
  arena_mark m = arena_get_mark(a);
  ln_bwd j = {nd, L, nblocks, arena_alloc(a, sizeof(double) * tasks * c),
              arena_alloc(a, sizeof(double) * tasks * c)};
  if (!j.dgamma || !j.dbeta)
    return err_set(e, ERR_NOMEM, "out of memory for the gradient of a layer norm");
  memset(j.dgamma, 0, sizeof(double) * tasks * c);
  memset(j.dbeta, 0, sizeof(double) * tasks * c);
  pool_run(p, tasks, ln_task, &j);
  grad_norm_affine_add(nd, j.dgamma, j.dbeta, tasks, c);
  arena_release(a, m);
  return ERR_OK;
}
