/* Backward of ops_conv2d for every shape the UNet uses (1x1, 3x3, stride 1 and 2, symmetric or
 * diffusers' (0,1,0,1) padding), on the engine's split-invariant GEMM (engine/core/gemm.h):
 *   dW += dY . col^T   A = dY (packed per image and pixel tile), B = im2col transposed;
 *   dX += col2im(W^T . dY)   A = W^T (packed once per call), B = dY as it lies in memory;
 *   db += sum of dY.
 * The forward may have run Winograd; its backward is the exact convolution's (the two agree to
 * float rounding), so no Winograd-domain rule is needed. Tasks split output channels (dW) or
 * input channels (dX) and never a sum, so the gradients do not depend on the thread count. */
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "grad_rules.h"

#define DW_TILE_BYTES (2u << 20) /* transposed im2col tile, about one L2's worth */
#define DW_ROWS 48               /* output channels per dW task (a multiple of the GEMM's 12) */
#define DW_COLS 256              /* weight columns per dW task */
#define DX_ROWS 96               /* im2col rows per dX task, rounded to whole input channels */

typedef struct conv_geom {
  const conv2d *c;
  int n, h, w, oh, ow, P, K, kk;
} conv_geom;

/* colt[p - p0][K] = the receptive field of output pixel p of one image, zero where padded. */
static void im2col_t(const conv_geom *g, const float *x, int p0, int p1, float *colt) {
  const conv2d *c = g->c;
  for (int p = p0; p < p1; p++) {
    int oy = p / g->ow, ox = p % g->ow;
    float *dst = colt + (size_t)(p - p0) * g->K;
    for (int ci = 0; ci < c->cin; ci++) {
      const float *xc = x + (size_t)ci * g->h * g->w;
      for (int ky = 0; ky < c->k; ky++) {
        int iy = oy * c->stride - c->pad_top + ky;
        for (int kx = 0; kx < c->k; kx++) {
          int ix = ox * c->stride - c->pad_left + kx;
          *dst++ = iy >= 0 && iy < g->h && ix >= 0 && ix < g->w ? xc[(size_t)iy * g->w + ix] : 0.0f;
        }
      }
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
  const gemm_packed *dy; /* cout x T */
  const float *colt;     /* T x K */
  float *dw, *scratch;
  size_t scratch_stride;
  int col_chunks;
} dw_job;

static void dw_task(void *ctx, int task, int worker) {
  dw_job *j = ctx;
  int K = j->g->K, cout = j->g->c->cout;
  int r0 = task / j->col_chunks * DW_ROWS, c0 = task % j->col_chunks * DW_COLS;
  int r1 = r0 + DW_ROWS < cout ? r0 + DW_ROWS : cout, c1 = c0 + DW_COLS < K ? c0 + DW_COLS : K;
  gemm_run(j->dy, r0, r1, j->colt + c0, K, c1 - c0, j->dw + (size_t)r0 * K + c0, K, 1,
           j->scratch + (size_t)worker * j->scratch_stride);
}

/* dW accumulates image by image and tile by tile, in that order, whatever the threads. */
static int conv_dweight(const conv_geom *g, const float *x, const float *dy, float *dw, arena *a,
                        pool *p, err *e) {
  const conv2d *c = g->c;
  int T = (int)(DW_TILE_BYTES / sizeof(float) / (size_t)g->K) / 256 * 256;
  if (T < 256)
    T = 256;
  if (T > g->P)
    T = g->P;
  int threads = pool_threads(p);
  dw_job j = {.g = g, .dw = dw, .col_chunks = (g->K + DW_COLS - 1) / DW_COLS};
  j.scratch_stride = gemm_scratch_floats(T, DW_COLS);
  arena_mark m = arena_get_mark(a);
  float *colt = arena_floats(a, (size_t)T * g->K), *tile = arena_floats(a, (size_t)c->cout * T);
  j.scratch = arena_floats(a, j.scratch_stride * threads);
  if (!colt || !tile || !j.scratch)
    return err_set(e, ERR_NOMEM, "out of memory for the weight gradient of a convolution");
  int ntasks = (c->cout + DW_ROWS - 1) / DW_ROWS * j.col_chunks;
  for (int img = 0; img < g->n; img++) {
    const float *xi = x + (size_t)img * c->cin * g->h * g->w;
    const float *dyi = dy + (size_t)img * c->cout * g->P;
    for (int p0 = 0; p0 < g->P; p0 += T) {
      int p1 = p0 + T < g->P ? p0 + T : g->P;
      for (int co = 0; co < c->cout; co++)
        memcpy(tile + (size_t)co * (p1 - p0), dyi + (size_t)co * g->P + p0,
               sizeof(float) * (p1 - p0));
      gemm_packed pk;
      if (gemm_pack_a(&pk, tile, c->cout, p1 - p0)) {
        arena_release(a, m);
        return err_set(e, ERR_NOMEM, "out of memory for the weight gradient of a convolution");
      }
      im2col_t(g, xi, p0, p1, colt);
      j.dy = &pk;
      j.colt = colt;
      pool_run(p, ntasks, dw_task, &j);
      gemm_packed_free(&pk);
    }
  }
  arena_release(a, m);
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
