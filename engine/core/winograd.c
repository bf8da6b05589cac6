/* Winograd F(4x4, 3x3) (Lavin & Gray 2015, interpolation points 0, +-1, +-2,
 * inf). Tiles of all images are processed in blocks sized to stay in cache:
 * input transform -> 36 GEMMs -> output transform, each stage split over
 * the threads. The FLOP saving is 4x on interior tiles. */
#include "winograd.h"

#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "pool.h"

#define WINO_V_BYTES (4u << 20) /* transformed input block kept near L2/L3 size */
#define WINO_CHAN_CHUNK 8

int wino_applies(int k, int stride, int pad, int cin, int cout) {
  return k == 3 && stride == 1 && pad == 1 && cin >= 16 && cout >= 16;
}

int wino_prepare(wino_conv *w, const float *weight, const float *bias, int cin, int cout) {
  static const double G[6][3] = {{1.0 / 4, 0, 0},
                                 {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                 {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                 {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                 {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                 {0, 0, 1}};
  memset(w, 0, sizeof *w);
  w->cin = cin;
  w->cout = cout;
  w->bias = bias;
  float *u = mem_malloc(sizeof(float) * WINO_POINTS * (size_t)cout * cin);
  if (!u)
    return -1;
  for (int co = 0; co < cout; co++)
    for (int ci = 0; ci < cin; ci++) {
      const float *g = weight + ((size_t)co * cin + ci) * 9;
      double tmp[6][3];
      for (int i = 0; i < 6; i++)
        for (int j = 0; j < 3; j++)
          tmp[i][j] = G[i][0] * g[0 * 3 + j] + G[i][1] * g[1 * 3 + j] + G[i][2] * g[2 * 3 + j];
      for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++) {
          double v = tmp[i][0] * G[j][0] + tmp[i][1] * G[j][1] + tmp[i][2] * G[j][2];
          u[((size_t)(i * 6 + j) * cout + co) * cin + ci] = (float)v;
        }
    }
  int rc = 0;
  for (int p = 0; p < WINO_POINTS && !rc; p++)
    rc = gemm_pack_a(&w->u[p], u + (size_t)p * cout * cin, cout, cin);
  /* The OpenBLAS fallback multiplies the row-major copy; the packed kernels
   * do not need it, so it is dropped to save memory. */
  if (rc || strcmp(gemm_kernel_name(), "openblas") != 0) {
    for (int p = 0; p < WINO_POINTS; p++)
      w->u[p].rowmajor = NULL;
    free(u);
  } else {
    w->u[0].rowmajor = u; /* u[0] owns the block: see wino_release */
  }
  if (rc)
    wino_release(w);
  return rc;
}

void wino_release(wino_conv *w) {
  free((void *)w->u[0].rowmajor);
  for (int p = 0; p < WINO_POINTS; p++) {
    w->u[p].rowmajor = NULL;
    gemm_packed_free(&w->u[p]);
  }
}

#define WINO_LANES 16 /* tiles transformed together: one cache line per point */

/* The transforms are plain loops over lanes; these clones let the compiler
 * use 16-wide vectors where the CPU has them (same arithmetic, no FMA
 * contraction under -std=c11, so every clone gives identical results). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WINO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WINO_CLONES
#endif

/* B^T d on 6 rows of WINO_LANES lanes each (row stride s): t rows of stride ts. */
static inline void bt6(const float *d, int s, float *t, int ts) {
  for (int l = 0; l < WINO_LANES; l++) {
    float d0 = d[l], d1 = d[s + l], d2 = d[2 * s + l], d3 = d[3 * s + l], d4 = d[4 * s + l],
          d5 = d[5 * s + l];
    t[l] = 4 * d0 - 5 * d2 + d4;
    t[ts + l] = -4 * d1 - 4 * d2 + d3 + d4;
    t[2 * ts + l] = 4 * d1 - 4 * d2 - d3 + d4;
    t[3 * ts + l] = -2 * d1 - d2 + 2 * d3 + d4;
    t[4 * ts + l] = 2 * d1 - d2 - 2 * d3 + d4;
    t[5 * ts + l] = 4 * d1 - 5 * d3 + d5;
  }
}

/* A^T m on 6 rows of WINO_LANES lanes: the 4 output rows. */
static inline void at6(const float *m, int s, float *o, int os) {
  for (int l = 0; l < WINO_LANES; l++) {
    float m0 = m[l], m1 = m[s + l], m2 = m[2 * s + l], m3 = m[3 * s + l], m4 = m[4 * s + l],
          m5 = m[5 * s + l];
    float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
    o[l] = m0 + a + c;
    o[os + l] = b + 2 * d;
    o[2 * os + l] = a + 4 * c;
    o[3 * os + l] = b + 8 * d + m5;
  }
}

typedef struct wino_job {
  const wino_conv *w;
  const float *x;
  float *y;
  int h, wd, th, tw; /* image size; tiles per image: th x tw */
  int ph, pw;        /* padded input planes: (4 th + 2) x (4 tw + 2) */
  float *xp;         /* zero-bordered copy of x, so tiles need no bounds checks */
  int t0, nt, ld;    /* this block: global tiles [t0, t0 + nt), V/M row length */
  float *v, *m, *scratch;
  size_t scratch_stride;
  int col_splits;
} wino_job;

/* Lanes are laid out [point][lane]: 36 rows of WINO_LANES floats. */
#define L WINO_LANES

static void pad_task(void *ctx, int plane, int worker) {
  (void)worker;
  wino_job *j = ctx;
  const float *src = j->x + (size_t)plane * j->h * j->wd;
  float *dst = j->xp + (size_t)plane * j->ph * j->pw;
  memset(dst, 0, sizeof(float) * j->pw);
  for (int y = 0; y < j->ph - 1; y++) {
    float *row = dst + (size_t)(y + 1) * j->pw;
    if (y < j->h) {
      row[0] = 0;
      memcpy(row + 1, src + (size_t)y * j->wd, sizeof(float) * j->wd);
      memset(row + 1 + j->wd, 0, sizeof(float) * (j->pw - 1 - j->wd));
    } else {
      memset(row, 0, sizeof(float) * j->pw);
    }
  }
}

/* Offsets of the first element of up to L tiles starting at global tile g:
 * into the padded input (channel 0) and into the output (channel 0). */
static void tile_offsets(const wino_job *j, int g, int lanes, int cin_or_cout, int padded,
                         size_t *off) {
  int per_image = j->th * j->tw;
  for (int l = 0; l < L; l++) {
    int gg = g + (l < lanes ? l : 0), img = gg / per_image, r = gg % per_image;
    int ty = r / j->tw, tx = r % j->tw;
    off[l] = padded ? ((size_t)img * cin_or_cout * j->ph + (size_t)ty * 4) * j->pw + (size_t)tx * 4
                    : ((size_t)img * cin_or_cout * j->h + (size_t)ty * 4) * j->wd + (size_t)tx * 4;
  }
}

WINO_CLONES static void input_task(void *ctx, int task, int worker) {
  (void)worker;
  wino_job *j = ctx;
  int c0 = task * WINO_CHAN_CHUNK, c1 = c0 + WINO_CHAN_CHUNK;
  if (c1 > j->w->cin)
    c1 = j->w->cin;
  size_t pplane = (size_t)j->ph * j->pw, vstride = (size_t)j->w->cin * j->ld;
  float d[36 * L], tmp[36 * L], v[36 * L];
  size_t off[L];
  for (int t0 = 0; t0 < j->nt; t0 += L) {
    int lanes = j->nt - t0 < L ? j->nt - t0 : L;
    tile_offsets(j, j->t0 + t0, lanes, j->w->cin, 1, off);
    for (int ci = c0; ci < c1; ci++) {
      const float *src = j->xp + (size_t)ci * pplane;
      for (int i = 0; i < 6; i++)
        for (int k = 0; k < 6; k++)
          for (int l = 0; l < L; l++)
            d[(6 * i + k) * L + l] = src[off[l] + (size_t)i * j->pw + k];
      for (int k = 0; k < 6; k++) /* columns: tmp = B^T d */
        bt6(d + k * L, 6 * L, tmp + k * L, 6 * L);
      for (int i = 0; i < 6; i++) /* rows: v = tmp B */
        bt6(tmp + 6 * i * L, L, v + 6 * i * L, L);
      float *dst = j->v + (size_t)ci * j->ld + t0;
      if (lanes == L) {
        for (int p = 0; p < 36; p++)
          for (int l = 0; l < L; l++)
            dst[p * vstride + l] = v[p * L + l];
      } else { /* as in output_task: no variable-length copy */
        for (int p = 0; p < 36; p++)
          for (int l = 0; l < L; l++)
            if (l < lanes)
              dst[p * vstride + l] = v[p * L + l];
      }
    }
  }
}

static void gemm_task(void *ctx, int task, int worker) {
  wino_job *j = ctx;
  int p = task / j->col_splits, part = task % j->col_splits;
  int per = (j->nt + j->col_splits - 1) / j->col_splits;
  int c0 = part * per, c1 = c0 + per < j->nt ? c0 + per : j->nt;
  if (c0 >= c1)
    return;
  const wino_conv *w = j->w;
  gemm_run(&w->u[p], 0, w->cout, j->v + (size_t)p * w->cin * j->ld + c0, j->ld, c1 - c0,
           j->m + (size_t)p * w->cout * j->ld + c0, j->ld, 0,
           j->scratch + worker * j->scratch_stride);
}

WINO_CLONES static void output_task(void *ctx, int task, int worker) {
  (void)worker;
  wino_job *j = ctx;
  const wino_conv *w = j->w;
  int c0 = task * WINO_CHAN_CHUNK, c1 = c0 + WINO_CHAN_CHUNK;
  if (c1 > w->cout)
    c1 = w->cout;
  size_t plane = (size_t)j->h * j->wd, mstride = (size_t)w->cout * j->ld;
  int exact = j->h % 4 == 0 && j->wd % 4 == 0; /* no tile crosses the border */
  int per_image = j->th * j->tw;
  float m[36 * L], tmp[24 * L], o[16 * L];
  size_t off[L];
  for (int t0 = 0; t0 < j->nt; t0 += L) {
    int lanes = j->nt - t0 < L ? j->nt - t0 : L;
    tile_offsets(j, j->t0 + t0, lanes, w->cout, 0, off);
    for (int co = c0; co < c1; co++) {
      float bias = w->bias ? w->bias[co] : 0.0f;
      const float *src = j->m + (size_t)co * j->ld + t0;
      if (lanes == L) { /* fixed length: a variable-length copy compiles to a slow rep movs */
        for (int p = 0; p < 36; p++)
          for (int l = 0; l < L; l++)
            m[p * L + l] = src[p * mstride + l];
      } else {
        for (int p = 0; p < 36; p++)
          for (int l = 0; l < L; l++)
            m[p * L + l] = l < lanes ? src[p * mstride + l] : 0.0f;
      }
      for (int k = 0; k < 6; k++) /* columns: tmp (4x6) = A^T m */
        at6(m + k * L, 6 * L, tmp + k * L, 6 * L);
      for (int i = 0; i < 4; i++) /* rows: o (4x4) = tmp A */
        at6(tmp + 6 * i * L, L, o + 4 * i * L, L);
      float *dst = j->y + (size_t)co * plane;
      if (exact && lanes == L) {
        for (int i = 0; i < 4; i++)
          for (int k = 0; k < 4; k++)
            for (int l = 0; l < L; l++)
              dst[off[l] + (size_t)i * j->wd + k] = o[(4 * i + k) * L + l] + bias;
        continue;
      }
      for (int l = 0; l < lanes; l++) {
        int r = (j->t0 + t0 + l) % per_image;
        int y0 = (r / j->tw) * 4, x0 = (r % j->tw) * 4;
        int rows = j->h - y0 < 4 ? j->h - y0 : 4, cols = j->wd - x0 < 4 ? j->wd - x0 : 4;
        for (int i = 0; i < rows; i++)
          for (int k = 0; k < cols; k++)
            dst[off[l] + (size_t)i * j->wd + k] = o[(4 * i + k) * L + l] + bias;
      }
    }
  }
}

#undef L

int wino_conv2d(const wino_conv *w, const float *x, int n, int h, int wd, float *y, arena *a,
                pool *p) {
  int threads = pool_threads(p);
  wino_job j = {.w = w, .x = x, .y = y, .h = h, .wd = wd};
  j.th = (h + 3) / 4;
  j.tw = (wd + 3) / 4;
  int total = n * j.th * j.tw;
  int block = (int)(WINO_V_BYTES / (sizeof(float) * WINO_POINTS * (size_t)w->cin));
  block = block < 32 ? 32 : block / 32 * 32;
  if (block > total)
    block = total;
  j.ld = block;
  arena_mark mark = arena_get_mark(a);
  j.v = arena_floats(a, (size_t)WINO_POINTS * w->cin * block);
  j.m = arena_floats(a, (size_t)WINO_POINTS * w->cout * block);
  j.scratch_stride = gemm_scratch_floats(w->cin, block);
  j.scratch = arena_floats(a, j.scratch_stride * threads);
  j.ph = 4 * j.th + 2;
  j.pw = 4 * j.tw + 2;
  j.xp = arena_floats(a, (size_t)n * w->cin * j.ph * j.pw);
  if (!j.v || !j.m || !j.scratch || !j.xp)
    return -1;
  pool_run(p, n * w->cin, pad_task, &j);
  for (j.t0 = 0; j.t0 < total; j.t0 += block) {
    j.nt = total - j.t0 < block ? total - j.t0 : block;
    /* 36 GEMMs usually feed the threads; narrow blocks split columns too */
    j.col_splits = j.nt >= 64 ? 2 : 1;
    pool_run(p, (w->cin + WINO_CHAN_CHUNK - 1) / WINO_CHAN_CHUNK, input_task, &j);
    pool_run(p, WINO_POINTS * j.col_splits, gemm_task, &j);
    pool_run(p, (w->cout + WINO_CHAN_CHUNK - 1) / WINO_CHAN_CHUNK, output_task, &j);
  }
  arena_release(a, mark);
  return 0;
}
