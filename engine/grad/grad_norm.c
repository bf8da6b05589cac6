/* Backward of ops_group_norm (affine, optionally fused with SiLU). The statistics are recomputed
 * as the forward computes them (double sums, then mean and 1/sqrt(var + eps) rounded to float),
 * so x-hat is the forward's. One task per (image, group) writes its part of dx and its own
 * per-image partial sums for gamma and beta; the partials are then added image by image, so no
 * sum is ever shared between threads. */
#include <math.h>
#include <string.h>

#include "grad_rules.h"

typedef struct gn_bwd {
  const grad_node *nd;
  double *dgamma, *dbeta; /* [n][c] partials */
} gn_bwd;

static void moments(const float *x, size_t cnt, double *mean, double *var) {
  double sum = 0;
  for (size_t i = 0; i < cnt; i++)
    sum += x[i];
  double m = sum / (double)cnt, sq = 0;
  for (size_t i = 0; i < cnt; i++)
    sq += (x[i] - m) * (x[i] - m);
  *mean = m;
  *var = sq / (double)cnt;
}

static void gn_task(void *ctx, int task, int worker) {
  (void)worker;
  const gn_bwd *j = ctx;
  const grad_node *nd = j->nd;
  int c = nd->c, hw = nd->h * nd->w, groups = nd->p.gn.groups, cpg = c / groups;
  int g = task % groups, img = task / groups;
  size_t off = ((size_t)img * c + (size_t)g * cpg) * hw, cnt = (size_t)cpg * hw;
  const float *x = nd->src[0] + off, *dy = nd->ddst + off;
  const float *gamma = nd->src[1], *beta = nd->src[2];
  double mean, var;
  moments(x, cnt, &mean, &var);
  float rstd = (float)(1.0 / sqrt(var + nd->p.gn.eps)), fmean = (float)mean;
  /* first pass: sums of dxhat and dxhat * xhat over the group, and gamma/beta partials */
  double s1 = 0, s2 = 0;
  for (int ci = 0; ci < cpg; ci++) {
    int ch = g * cpg + ci;
    float ga = gamma ? gamma[ch] : 1.0f, be = beta ? beta[ch] : 0.0f;
    double dg = 0, db = 0;
    for (int q = 0; q < hw; q++) {
      size_t i = (size_t)ci * hw + q;
      float xh = (x[i] - fmean) * rstd, gy = dy[i];
      if (nd->p.gn.silu)
        gy *= grad_dsilu(xh * ga + be);
      dg += (double)gy * xh;
      db += gy;
      s1 += (double)gy * ga;
      s2 += (double)gy * ga * xh;
    }
    j->dgamma[(size_t)img * c + ch] = dg;
    j->dbeta[(size_t)img * c + ch] = db;
  }
  float *dx = nd->dsrc[0];
  if (!dx)
    return;
  dx += off;
  float m1 = (float)(s1 / (double)cnt), m2 = (float)(s2 / (double)cnt);
  for (int ci = 0; ci < cpg; ci++) {
    int ch = g * cpg + ci;
    float ga = gamma ? gamma[ch] : 1.0f, be = beta ? beta[ch] : 0.0f;
    for (int q = 0; q < hw; q++) {
      size_t i = (size_t)ci * hw + q;
      float xh = (x[i] - fmean) * rstd, gy = dy[i];
      if (nd->p.gn.silu)
        gy *= grad_dsilu(xh * ga + be);
      dx[i] += rstd * (gy * ga - m1 - xh * m2);
    }
  }
}

int grad_group_norm_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  int n = nd->n, c = nd->c;
  arena_mark m = arena_get_mark(a);
  gn_bwd j = {nd, arena_alloc(a, sizeof(double) * n * c), arena_alloc(a, sizeof(double) * n * c)};
  if (!j.dgamma || !j.dbeta)
    return err_set(e, ERR_NOMEM, "out of memory for the gradient of a group norm");
  pool_run(p, n * nd->p.gn.groups, gn_task, &j);
  grad_norm_affine_add(nd, j.dgamma, j.dbeta, n, c);
  arena_release(a, m);
  return ERR_OK;
}

void grad_norm_affine_add(const grad_node *nd, const double *dgamma, const double *dbeta, int rows,
                          int c) {
  for (int ch = 0; ch < c; ch++) {
    double dg = 0, db = 0;
    for (int r = 0; r < rows; r++) {
      dg += dgamma[(size_t)r * c + ch];
      db += dbeta[(size_t)r * c + ch];
    }
    if (nd->dsrc[1])
      nd->dsrc[1][ch] += (float)dg;
    if (nd->dsrc[2])
      nd->dsrc[2][ch] += (float)db;
  }
}
