/* Winograd F(4x4, 3x3) convolution for stride-1, pad-1 3x3 layers: 36
 * multiplies per 4x4 output tile instead of 144, as 36 GEMMs over channels.
 * Filters are transformed once at load; the GEMMs merge tiles of all images
 * (the GEMM kernel is split-invariant, so results do not depend on batching). */
#ifndef DENOISED_WINOGRAD_H
#define DENOISED_WINOGRAD_H

#include "arena.h"
#include "gemm.h"
#include "pool.h"

#define WINO_POINTS 36 /* 6 x 6 transform domain */

typedef struct wino_conv {
  int cin, cout;
  const float *bias;          /* [cout] or NULL */
  gemm_packed u[WINO_POINTS]; /* transformed filters, each cout x cin */
} wino_conv;

/* 1 when a conv of this shape is worth doing this way. */
int wino_applies(int k, int stride, int pad, int cin, int cout);

/* Transforms weight [cout][cin][3][3] (computed in double, rounded once).
 * Returns 0, or -1 when out of memory. */
int wino_prepare(wino_conv *w, const float *weight, const float *bias, int cin, int cout);
void wino_release(wino_conv *w);

/* y[n][cout][h][w] = conv3x3(x[n][cin][h][w]), padding 1. Returns 0, or -1
 * when the arena is out of memory. */
int wino_conv2d(const wino_conv *w, const float *x, int n, int h, int wd, float *y, arena *a,
                pool *p);

#endif
