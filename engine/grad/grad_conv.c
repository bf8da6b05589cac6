/* Backward of ops_conv2d for every shape the UNet uses (1x1, 3x3, stride 1 and 2, symmetric or
 * diffusers' (0,1,0,1) padding), on the engine's split-invariant GEMM (engine/core/gemm.h):
 *   dW^T += col . dY^T   A = im2col rows (unfolded and packed by each task), B = dY transposed;
 *   dX += col2im(W^T . dY)   A = W^T (packed once per call), B = dY as it lies in memory;
 *   db += sum of dY.
 * The forward may have run Winograd; its backward is the exact convolution's (the two agree to
 * float rounding), so no Winograd-domain rule is needed. Tasks split im2col rows (dW) or input
 * channels (dX) and never a sum, so the gradients do not depend on the thread count. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "grad_rules.h"

#define DW_TILE 4096 /* output pixels per dW GEMM (a multiple of the GEMM's k-block) */
#define DW_ROWS 48   /* im2col rows per dW task */
#define DX_ROWS 96   /* im2col rows per dX task, rounded to whole input channels */

typedef struct conv_geom {
  const conv2d *c;
  int n, h, w, oh, ow, P, K, kk;
} conv_geom;

/* im2col rows [r0, r1) (row = (ci, ky, kx)) for output pixels [p0, p1) of one image, into
 * col[r - r0][p - p0] (row stride ld): the forward's layout, built row by row. */
static void im2col_rows(const conv_geom *g, const float *x, int r0, int r1, int p0, int p1,
                        float *col, int ld) {
  const conv2d *c = g->c;
  for (int r = r0; r < r1; r++) {
    int ci = r / g->kk, ky = r % g->kk / c->k, kx = r % c->k;
    const float *xc = x + (size_t)ci * g->h * g->w;
    float *dst = col + (size_t)(r - r0) * ld;
    for (int p = p0; p < p1;) {
      int oy = p / g->ow, ox0 = p % g->ow, ox1 = g->ow < ox0 + (p1 - p) ? g->ow : ox0 + (p1 - p);
      int iy = oy * c->stride - c->pad_top + ky;
      float *d = dst + (p - p0);
      if (iy < 0 || iy >= g->h) {
        memset(d, 0, sizeof(float) * (ox1 - ox0));
      } else {
        const float *src = xc + (size_t)iy * g->w;
        for (int ox = ox0; ox < ox1; ox++) {
          int ix = ox * c->stride - c->pad_left + kx;
          d[ox - ox0] = ix >= 0 && ix < g->w ? src[ix] : 0.0f;
        }
      }
      p += ox1 - ox0;
    }
  }
}

/* dx[ci] += the im2col rows of channels [ci0, ci1) folded back onto the image. */
static void col2im_add(const conv_geom *g, const float *dcol, int ci0, int ci1, float *dx) {
  const conv2d *c = g->c;
  for (int ci = ci0; ci < ci1; ci++) {
    float *dc = dx + (size_t)ci * g->h * g->w;
    for (int ky = 0; ky < c->k; ky++)
      for (int kx = 0; kx < c->k; kx++) {
        const float *row = dcol + ((size_t)(ci - ci0) * g->kk + ky * c->k + kx) * g->P;
        for (int oy = 0; oy < g->oh; oy++) {
          int iy = oy * c->stride - c->pad_top + ky;
          if (iy < 0 || iy >= g->h)
            continue;
          for (int ox = 0; ox < g->ow; ox++) {
            int ix = ox * c->stride - c->pad_left + kx;
            if (ix >= 0 && ix < g->w)
              dc[(size_t)iy * g->w + ix] += row[(size_t)oy * g->ow + ox];
          }
        }
      }
  }
}

typedef struct dw_job {
  const conv_geom *g;
  const float *x;   /* all images */
  const float *dyt; /* the tile's dY transposed, T x cout */
  size_t q0, q1;    /* the tile: output pixels of all images, image-major */
  float *dwt;       /* K x cout, accumulated over images and tiles */
  float *col, *gs;  /* per worker */
  size_t col_stride, gs_stride;
  atomic_int failed;
} dw_job;

/* Rows [r0, r1) of dW^T += col[r0..r1) . dY^T: each task unfolds and packs its own rows. */
static void dw_task(void *ctx, int task, int worker) {
  dw_job *j = ctx;
  const conv_geom *g = j->g;
  int K = g->K, cout = g->c->cout, T = (int)(j->q1 - j->q0);
  int r0 = task * DW_ROWS, r1 = r0 + DW_ROWS < K ? r0 + DW_ROWS : K;
  float *col = j->col + (size_t)worker * j->col_stride;
  for (size_t img = j->q0 / g->P; img * g->P < j->q1; img++) {
    size_t lo = img * g->P > j->q0 ? img * g->P : j->q0;
    size_t hi = (img + 1) * g->P < j->q1 ? (img + 1) * g->P : j->q1;
    im2col_rows(g, j->x + img * g->c->cin * g->h * g->w, r0, r1, (int)(lo - img * g->P),
                (int)(hi - img * g->P), col + (lo - j->q0), T);
  }
  gemm_packed pk;
  if (gemm_pack_a(&pk, col, r1 - r0, T)) {
    atomic_store(&j->failed, 1);
    return;
  }
  gemm_run(&pk, 0, r1 - r0, j->dyt, cout, cout, j->dwt + (size_t)r0 * cout, cout, 1,
           j->gs + (size_t)worker * j->gs_stride);
  gemm_packed_free(&pk);
}

/* dW^T = sum over tiles of the batch's output pixels (image-major, so small images share a
 * tile), in order, of col . dY^T: the transposed operand is dY (cout rows), not the 9x larger
 * im2col; added to dW once at the end. */
static int conv_dweight(const conv_geom *g, const float *x, const float *dy, float *dw, arena *a,
                        pool *p, err *e) {
  const conv2d *c = g->c;
  size_t total = (size_t)g->n * g->P;
  int T = total < DW_TILE ? (int)total : DW_TILE, threads = pool_threads(p);
  dw_job j = {.g = g, .x = x, .col_stride = (size_t)DW_ROWS * T};
  atomic_init(&j.failed, 0);
  j.gs_stride = gemm_scratch_floats(T, c->cout);
  arena_mark m = arena_get_mark(a);
  float *dyt = arena_floats(a, (size_t)T * c->cout);
  j.dwt = arena_floats(a, (size_t)g->K * c->cout);
  j.col = arena_floats(a, j.col_stride * threads);
  j.gs = arena_floats(a, j.gs_stride * threads);
  if (!dyt || !j.dwt || !j.col || !j.gs)
    return err_set(e, ERR_NOMEM, "out of memory for the weight gradient of a convolution");
  memset(j.dwt, 0, sizeof(float) * g->K * c->cout);
  j.dyt = dyt;
  int ntasks = (g->K + DW_ROWS - 1) / DW_ROWS;
  for (j.q0 = 0; j.q0 < total && !atomic_load(&j.failed); j.q0 += T) {
    j.q1 = j.q0 + T < total ? j.q0 + T : total;
    for (size_t q = j.q0; q < j.q1; q++) {
      const float *src = dy + q / g->P * c->cout * g->P + q % g->P;
      float *dst = dyt + (q - j.q0) * c->cout;
      for (int co = 0; co < c->cout; co++)
        dst[co] = src[(size_t)co * g->P];
    }
    pool_run(p, ntasks, dw_task, &j);
  }
  if (!atomic_load(&j.failed))
    for (int co = 0; co < c->cout; co++)
      for (int k = 0; k < g->K; k++)
        dw[(size_t)co * g->K + k] += j.dwt[(size_t)k * c->cout + co];
  arena_release(a, m);
  if (atomic_load(&j.failed))
    return err_set(e, ERR_NOMEM, "out of memory for the weight gradient of a convolution");
  return ERR_OK;
}

typedef struct dx_job {
  const conv_geom *g;
  const gemm_packed *wt; /* K x cout */
  const float *dy;
  float *dx, *dcol, *gs;
  size_t dcol_stride, gs_stride;
  int cpc, chunks; /* input channels per task, tasks per image */
} dx_job;

static void dx_task(void *ctx, int task, int worker) {
  dx_job *j = ctx;
  const conv_geom *g = j->g;
  int img = task / j->chunks, ci0 = task % j->chunks * j->cpc;
  int ci1 = ci0 + j->cpc < g->c->cin ? ci0 + j->cpc : g->c->cin;
  float *dcol = j->dcol + (size_t)worker * j->dcol_stride;
  gemm_run(j->wt, ci0 * g->kk, ci1 * g->kk, j->dy + (size_t)img * g->c->cout * g->P, g->P, g->P,
           dcol, g->P, 0, j->gs + (size_t)worker * j->gs_stride);
  col2im_add(g, dcol, ci0, ci1, j->dx + (size_t)img * g->c->cin * g->h * g->w);
}

static int conv_dinput(const conv_geom *g, const float *dy, float *dx, arena *a, pool *p, err *e) {
  const conv2d *c = g->c;
  int threads = pool_threads(p), rb = gemm_row_block();
  /* a task's first im2col row must start a GEMM row block: channels in multiples of m0 */
  int m0 = 1;
  while (m0 * g->kk % rb)
    m0++;
  dx_job j = {.g = g, .dy = dy, .dx = dx};
  j.cpc = DX_ROWS / (m0 * g->kk) * m0;
  if (j.cpc < m0)
    j.cpc = m0;
  j.chunks = (c->cin + j.cpc - 1) / j.cpc;
  j.dcol_stride = (size_t)j.cpc * g->kk * g->P;
  j.gs_stride = gemm_scratch_floats(c->cout, g->P);
  arena_mark m = arena_get_mark(a);
  float *wt = arena_floats(a, (size_t)g->K * c->cout);
  j.dcol = arena_floats(a, j.dcol_stride * threads);
  j.gs = arena_floats(a, j.gs_stride * threads);
  if (!wt || !j.dcol || !j.gs)
    return err_set(e, ERR_NOMEM, "out of memory for the input gradient of a convolution");
  for (int co = 0; co < c->cout; co++)
    for (int k = 0; k < g->K; k++)
      wt[(size_t)k * c->cout + co] = c->weight[(size_t)co * g->K + k];
  gemm_packed pk;
  if (gemm_pack_a(&pk, wt, g->K, c->cout)) {
    arena_release(a, m);
    return err_set(e, ERR_NOMEM, "out of memory for the input gradient of a convolution");
  }
  j.wt = &pk;
  pool_run(p, g->n * j.chunks, dx_task, &j);
  gemm_packed_free(&pk);
  arena_release(a, m);
  return ERR_OK;
}

int grad_conv2d_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  const conv2d *c = nd->p.conv;
  conv_geom g = {.c = c, .n = nd->n, .h = nd->h, .w = nd->w, .kk = c->k * c->k};
  ops_conv2d_out_size(c, g.h, g.w, &g.oh, &g.ow);
  g.P = g.oh * g.ow;
  g.K = c->cin * g.kk;
  const float *dy = nd->ddst;
  if (nd->dsrc[2])
    for (int co = 0; co < c->cout; co++) {
      double s = 0;
      for (int img = 0; img < g.n; img++) {
        const float *row = dy + ((size_t)img * c->cout + co) * g.P;
        for (int q = 0; q < g.P; q++)
          s += row[q];
      }
      nd->dsrc[2][co] += (float)s;
    }
  int rc = ERR_OK;
  if (nd->dsrc[1])
    rc = conv_dweight(&g, nd->src[0], dy, nd->dsrc[1], a, p, e);
  if (!rc && nd->dsrc[0])
    rc = conv_dinput(&g, dy, nd->dsrc[0], a, p, e);
  return rc;
}
