/* DomainStudio's loss terms and their gradient (dstudio.h), in double: the clean estimates of
 * both models, the Haar high-frequency map and its adjoint, the pairwise-similarity KL and the
 * chain back to the adapted model's output. */
#include "dstudio.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

/* torch.nn.CosineSimilarity's eps: each norm is clamped from below by it. */
#define DSTUDIO_COS_EPS 1e-8

/* hf of one c x h x w image (double in, double out), per channel over 2 x 2 blocks. */
static void haar_hf(const double *x, int c, int h, int w, double *out) {
  const int ho = h / 2, wo = w / 2;
  for (int ch = 0; ch < c; ch++) {
    const double *xc = x + (size_t)ch * h * w;
    double *oc = out + (size_t)ch * ho * wo;
    for (int i = 0; i < ho; i++)
      for (int j = 0; j < wo; j++) {
        const double *r0 = xc + (size_t)(2 * i) * w + 2 * j, *r1 = r0 + w;
        oc[(size_t)i * wo + j] = 0.5 * (3.0 * r1[1] - r0[0] - r0[1] - r1[0]);
      }
  }
}

/* The adjoint of haar_hf: adds the transpose of g (c x ho x wo) into gx (c x h x w). */
static void haar_hf_adjoint(const double *g, int c, int h, int w, double *gx) {
  const int ho = h / 2, wo = w / 2;
  for (int ch = 0; ch < c; ch++) {
    double *xc = gx + (size_t)ch * h * w;
    const double *gc = g + (size_t)ch * ho * wo;
    for (int i = 0; i < ho; i++)
      for (int j = 0; j < wo; j++) {
        const double v = 0.5 * gc[(size_t)i * wo + j];
        double *r0 = xc + (size_t)(2 * i) * w + 2 * j, *r1 = r0 + w;
        r0[0] -= v, r0[1] -= v, r1[0] -= v, r1[1] += 3.0 * v;
      }
  }
}

void dstudio_hf(const float *x, int n, int c, int h, int w, float *out) {
  const int ho = h / 2, wo = w / 2;
  for (int b = 0; b < n; b++)
    for (int ch = 0; ch < c; ch++) {
      const float *xc = x + ((size_t)b * c + ch) * h * w;
      float *oc = out + ((size_t)b * c + ch) * ho * wo;
      for (int i = 0; i < ho; i++)
        for (int j = 0; j < wo; j++) {
          const float *r0 = xc + (size_t)(2 * i) * w + 2 * j, *r1 = r0 + w;
          oc[(size_t)i * wo + j] =
              (float)(0.5 * (3.0 * (double)r1[1] - (double)r0[0] - (double)r0[1] - (double)r1[0]));
        }
    }
}

void dstudio_pick(const float u[3], int n, int idx[3]) {
  /* item k is uniform among the n - k not taken yet: an index into them, moved past the taken
   * ones in increasing order */
  for (int k = 0; k < 3; k++) {
    int j = (int)(u[k] * (float)(n - k));
    if (j >= n - k)
      j = n - k - 1;
    int taken[2] = {k > 0 ? idx[0] : n, k > 1 ? idx[1] : n};
    if (taken[1] < taken[0]) {
      const int tmp = taken[0];
      taken[0] = taken[1], taken[1] = tmp;
    }
    for (int m = 0; m < 2; m++)
      if (j >= taken[m])
        j++;
    idx[k] = j;
  }
}

/* Cosine similarities of the three vectors v[0..2] of len values, torch's way (each norm
 * clamped at DSTUDIO_COS_EPS), with the norms kept for the gradient. */
static void cos3(const double *const v[3], size_t len, double cs[3][3], double nrm[3]) {
  double dot[3][3];
  for (int i = 0; i < 3; i++)
    for (int j = i; j < 3; j++) {
      double s = 0;
      for (size_t k = 0; k < len; k++)
        s += v[i][k] * v[j][k];
      dot[i][j] = dot[j][i] = s;
    }
  for (int i = 0; i < 3; i++) {
    const double nv = sqrt(dot[i][i]);
    nrm[i] = nv > DSTUDIO_COS_EPS ? nv : DSTUDIO_COS_EPS;
  }
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      cs[i][j] = dot[i][j] / (nrm[i] * nrm[j]);
}

/* Per anchor i, the softmax over the other two (increasing order) of the similarities. */
static void softmax_rows(const double cs[3][3], double p[3][3], double logp[3][3]) {
  for (int i = 0; i < 3; i++) {
    double mx = -INFINITY;
    for (int j = 0; j < 3; j++)
      if (j != i && cs[i][j] > mx)
        mx = cs[i][j];
    double s = 0;
    for (int j = 0; j < 3; j++)
      if (j != i)
        s += exp(cs[i][j] - mx);
    const double lse = mx + log(s);
    for (int j = 0; j < 3; j++)
      if (j != i) {
        logp[i][j] = cs[i][j] - lse;
        p[i][j] = exp(logp[i][j]);
      }
  }
}

/* KLDivLoss(log softmax(ada), softmax(sou)) with 'mean' over the 3 x 2 entries, and (ga not
 * NULL) its gradient with respect to each ada vector added into ga[i]. */
static double pair_kl(const double *const a[3], const double *const s[3], size_t len,
                      double *const ga[3]) {
  double ca[3][3], cs[3][3], na[3], ns[3], q[3][3], logq[3][3], p[3][3], logp[3][3];
  cos3(a, len, ca, na);
  cos3(s, len, cs, ns);
  softmax_rows(ca, q, logq);
  softmax_rows(cs, p, logp);
  double kl = 0, g[3][3] = {{0}};
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      if (j != i) {
        kl += p[i][j] * (logp[i][j] - logq[i][j]);
        /* d/d cos_ada[i][j] of (1/6) sum p (log p - log q), log q = cos - lse(row) */
        g[i][j] = (q[i][j] - p[i][j]) / 6.0;
      }
  if (ga)
    for (int i = 0; i < 3; i++)
      for (int j = 0; j < 3; j++) {
        if (j == i)
          continue;
        /* cos(a_i, a_j) appears as entry [i][j] and [j][i]: d cos / d a_i =
         * a_j / (|a_i| |a_j|) - cos a_i / |a_i|^2 */
        const double gij = g[i][j] + g[j][i];
        const double f1 = gij / (na[i] * na[j]), f2 = gij * ca[i][j] / (na[i] * na[i]);
        for (size_t k = 0; k < len; k++)
          ga[i][k] += f1 * a[j][k] - f2 * a[i][k];
      }
  return kl / 6.0;
}

static int check_batch(const dstudio_batch *b, const dstudio_weights *w, err *e) {
  if (b->n < 3)
    return err_set(e, ERR_INVALID,
                   "DomainStudio: the pairwise terms need a batch of at least 3 images, got %d",
                   b->n);
  if (b->c < 1 || b->h < 2 || b->w < 2)
    return err_set(e, ERR_INVALID, "DomainStudio: images of %dx%dx%d (at least 1x2x2)", b->c, b->h,
                   b->w);
  for (int k = 0; k < 3; k++)
    if (b->idx[k] < 0 || b->idx[k] >= b->n || b->idx[k] == b->idx[(k + 1) % 3])
      return err_set(
          e, ERR_INVALID,
          "DomainStudio: items %d, %d, %d are not three distinct images of a batch of %d",
          b->idx[0], b->idx[1], b->idx[2], b->n);
  if (!(w->pair >= 0 && w->hf_pair >= 0 && w->hf_mse >= 0) ||
      !isfinite(w->pair + w->hf_pair + w->hf_mse))
    return err_set(e, ERR_INVALID, "DomainStudio: loss weights must be finite and >= 0");
  return ERR_OK;
}

typedef struct ds_scratch {
  double *x0a, *x0s, *x0t, *gx0; /* n * per (x0s: 3 * per) */
  double *hfa, *hft, *hfs, *ghf; /* n * per_hf (hfs: 3 * per_hf) */
} ds_scratch;

static void scratch_free(ds_scratch *s) {
  free(s->x0a), free(s->x0s), free(s->x0t), free(s->gx0);
  free(s->hfa), free(s->hft), free(s->hfs), free(s->ghf);
}

static int scratch_new(ds_scratch *s, size_t n, size_t per, size_t phf, err *e) {
  memset(s, 0, sizeof *s);
  s->x0a = mem_malloc(n * per * sizeof(double));
  s->x0s = mem_malloc(3 * per * sizeof(double));
  s->x0t = mem_malloc(n * per * sizeof(double));
  s->gx0 = mem_calloc(n * per, sizeof(double));
  s->hfa = mem_malloc(n * phf * sizeof(double) + 1);
  s->hft = mem_malloc(n * phf * sizeof(double) + 1);
  s->hfs = mem_malloc(3 * phf * sizeof(double) + 1);
  s->ghf = mem_calloc(n * phf + 1, sizeof(double));
  if (!s->x0a || !s->x0s || !s->x0t || !s->gx0 || !s->hfa || !s->hft || !s->hfs || !s->ghf) {
    scratch_free(s);
    return err_set(e, ERR_NOMEM, "out of memory for DomainStudio's loss");
  }
  return ERR_OK;
}

/* x0 = cx x_t + co y of image i into out (double). */
static void clean_estimate(const dstudio_batch *b, int i, const float *y, size_t per, double *out) {
  const float *xt = b->x_t + (size_t)i * per, *yi = y + (size_t)i * per;
  for (size_t k = 0; k < per; k++)
    out[k] = b->cx[i] * (double)xt[k] + b->co[i] * (double)yi[k];
}

int dstudio_loss(const dstudio_batch *b, const float *out_ada, const dstudio_weights *w,
                 dstudio_terms *terms, float *grad, err *e) {
  int rc = check_batch(b, w, e);
  if (rc)
    return rc;
  const int n = b->n, ho = b->h / 2, wo = b->w / 2;
  const size_t per = (size_t)b->c * b->h * b->w, phf = (size_t)b->c * ho * wo;
  ds_scratch s;
  if ((rc = scratch_new(&s, (size_t)n, per, phf, e)))
    return rc;
  dstudio_terms t = {0};
  /* the denoising loss, its gradient straight onto the output */
  const double gm = 2.0 / ((double)n * (double)per);
  for (int i = 0; i < n; i++) {
    const float *o = out_ada + (size_t)i * per, *y = b->target + (size_t)i * per;
    double sq = 0;
    for (size_t k = 0; k < per; k++) {
      const double d = (double)o[k] - (double)y[k];
      sq += d * d;
      if (grad)
        grad[(size_t)i * per + k] = (float)(gm * d);
    }
    t.mse += sq / (double)per / n;
  }
  for (int i = 0; i < n; i++) {
    clean_estimate(b, i, out_ada, per, s.x0a + (size_t)i * per);
    clean_estimate(b, i, b->target, per, s.x0t + (size_t)i * per);
    haar_hf(s.x0a + (size_t)i * per, b->c, b->h, b->w, s.hfa + (size_t)i * phf);
    haar_hf(s.x0t + (size_t)i * per, b->c, b->h, b->w, s.hft + (size_t)i * phf);
  }
  /* high-frequency MSE to the target's x0 */
  const double gh = w->hf_mse * 2.0 / ((double)n * (double)phf);
  double hsum = 0;
  for (size_t k = 0; k < (size_t)n * phf; k++) {
    const double d = s.hfa[k] - s.hft[k];
    hsum += d * d;
    s.ghf[k] = gh * d;
  }
  t.hf_mse = w->hf_mse * hsum / ((double)n * (double)phf);
  /* the pairwise terms on x0 and on hf(x0) of the three items */
  const double *va[3], *vs[3], *ha[3], *hs[3];
  double *gva[3], *gha[3];
  for (int k = 0; k < 3; k++) {
    const int i = b->idx[k];
    clean_estimate(b, i, b->out_sou, per, s.x0s + (size_t)k * per);
    haar_hf(s.x0s + (size_t)k * per, b->c, b->h, b->w, s.hfs + (size_t)k * phf);
    va[k] = s.x0a + (size_t)i * per, vs[k] = s.x0s + (size_t)k * per;
    ha[k] = s.hfa + (size_t)i * phf, hs[k] = s.hfs + (size_t)k * phf;
    gva[k] = s.gx0 + (size_t)i * per;
    gha[k] = s.ghf + (size_t)i * phf;
  }
  /* pair_kl adds its unweighted gradient: scale the hf-pair part by staging it */
  double *tmp = mem_calloc(3 * phf + 1, sizeof(double));
  double *pa = mem_calloc(3 * per, sizeof(double));
  if (!tmp || !pa) {
    free(tmp), free(pa);
    scratch_free(&s);
    return err_set(e, ERR_NOMEM, "out of memory for DomainStudio's loss");
  }
  double *gt[3] = {tmp, tmp + phf, tmp + 2 * phf}, *gp[3] = {pa, pa + per, pa + 2 * per};
  t.pair = w->pair * pair_kl(va, vs, per, gp);
  t.hf_pair = w->hf_pair * pair_kl(ha, hs, phf, gt);
  for (int k = 0; k < 3; k++) {
    for (size_t j = 0; j < per; j++)
      gva[k][j] += w->pair * gp[k][j];
    for (size_t j = 0; j < phf; j++)
      gha[k][j] += w->hf_pair * gt[k][j];
  }
  free(tmp), free(pa);
  t.total = t.mse + t.pair + t.hf_pair + t.hf_mse;
  if (grad)
    for (int i = 0; i < n; i++) {
      double *gx = s.gx0 + (size_t)i * per;
      haar_hf_adjoint(s.ghf + (size_t)i * phf, b->c, b->h, b->w, gx);
      float *g = grad + (size_t)i * per;
      for (size_t k = 0; k < per; k++)
        g[k] = (float)((double)g[k] + b->co[i] * gx[k]);
    }
  scratch_free(&s);
  if (!isfinite(t.total))
    return err_set(e, ERR_NUMERIC,
                   "DomainStudio's loss is not finite (mse %g, pair %g, hf pair %g, hf mse %g)",
                   t.mse, t.pair, t.hf_pair, t.hf_mse);
  if (terms)
    *terms = t;
  return ERR_OK;
}
