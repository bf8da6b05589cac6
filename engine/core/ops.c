/* Tensor core implementation. Convolutions are im2col + sgemm over tiles of
 * output pixels; each task runs single-threaded sgemm so that our own split,
 * not OpenBLAS's, decides how the cores share a layer. */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gemm.h"
#include "mem.h"
#include "pool.h"

#define COL_TILE_BYTES (2u << 20) /* im2col tile kept near cache size */
#ifndef OPS_WINO_MIN_PIXELS
#define OPS_WINO_MIN_PIXELS 64 /* 8x8 and larger images use Winograd */
#endif
#define CONV_MIN_COLS 256 /* narrower GEMMs waste the 32-wide kernel */

static void blas_single_thread(void) {
  openblas_set_num_threads(1);
}

/* OpenBLAS would otherwise start its own threads inside every sgemm that our
 * tasks already run in parallel, and the two pools would fight for the cores. */
void ops_init(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, blas_single_thread);
}

void ops_conv2d_out_size(const conv2d *c, int h, int w, int *oh, int *ow) {
  *oh = (h + c->pad_top + c->pad_bottom - c->k) / c->stride + 1;
  *ow = (w + c->pad_left + c->pad_right - c->k) / c->stride + 1;
}

typedef struct conv_job {
  const conv2d *c;
  const float *x;
  float *y;
  int n, h, w, oh, ow, P, K;
  int group;  /* images per column block when images are small, else 1 */
  int tile;   /* output pixels per column block of one image (whole rows) */
  int ntiles; /* column blocks per image when group == 1 */
  int units;  /* column blocks in all */
  int row_chunks, rows_per_chunk;
  int cols;                     /* widest column block */
  float *col, *cbuf, *gscratch; /* per-worker scratch */
  size_t col_stride, cbuf_stride, gscratch_stride;
  int direct;
} conv_job;

/* Unfolds output rows [oy0, oy1) of one image into col[(ci, ky, kx)][ld]
 * from column 0. Stride-1 rows are one memcpy between zero margins. */
static void im2col_rows(const conv2d *c, const float *x, int h, int w, int ow, int oy0, int oy1,
                        float *col, int ld) {
  int k = c->k;
  for (int ci = 0; ci < c->cin; ci++) {
    const float *xc = x + (size_t)ci * h * w;
    for (int ky = 0; ky < k; ky++) {
      for (int kx = 0; kx < k; kx++) {
        float *dst = col + ((size_t)(ci * k + ky) * k + kx) * ld;
        int ix0 = kx - c->pad_left;
        int lo = ix0 < 0 ? -ix0 : 0, hi = w - ix0 < ow ? w - ix0 : ow;
        for (int oy = oy0; oy < oy1; oy++) {
          float *d = dst + (size_t)(oy - oy0) * ow;
          int iy = oy * c->stride - c->pad_top + ky;
          if (iy < 0 || iy >= h) {
            memset(d, 0, sizeof(float) * ow);
            continue;
          }
          const float *src = xc + (size_t)iy * w;
          if (c->stride == 1) {
            if (hi <= lo) {
              memset(d, 0, sizeof(float) * ow);
              continue;
            }
            memset(d, 0, sizeof(float) * lo);
            memcpy(d + lo, src + lo + ix0, sizeof(float) * (hi - lo));
            memset(d + hi, 0, sizeof(float) * (ow - hi));
          } else {
            for (int ox = 0; ox < ow; ox++) {
              int ix = ox * c->stride + ix0;
              d[ox] = ix >= 0 && ix < w ? src[ix] : 0.0f;
            }
          }
        }
      }
    }
  }
}

/* One column block x one chunk of output channels. Small images are laid
 * side by side into one wide B so the kernel sees enough columns; large ones
 * are cut into row tiles. Each output element is computed by the same
 * arithmetic either way (see gemm.h), so blocking never changes results. */
static void conv_task(void *ctx, int task, int worker) {
  conv_job *j = ctx;
  const conv2d *c = j->c;
  int unit = task / j->row_chunks, rc = task % j->row_chunks;
  int r0 = rc * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
  if (r1 > c->cout)
    r1 = c->cout;
  if (r0 >= r1)
    return;
  int P = j->P;
  size_t in_plane = (size_t)c->cin * j->h * j->w, out_plane = (size_t)c->cout * P;
  float *col = j->col + worker * j->col_stride;
  float *gs = j->gscratch + worker * j->gscratch_stride;
  if (j->group == 1) {
    int img = unit / j->ntiles, tile = unit % j->ntiles;
    int p0 = tile * j->tile, p1 = p0 + j->tile < P ? p0 + j->tile : P;
    const float *xi = j->x + (size_t)img * in_plane;
    float *yi = j->y + (size_t)img * out_plane;
    const float *b = xi + p0;
    int ldb = P;
    if (!j->direct) {
      im2col_rows(c, xi, j->h, j->w, j->ow, p0 / j->ow, p1 / j->ow, col, p1 - p0);
      b = col;
      ldb = p1 - p0;
    }
    gemm_run(&c->packed, r0, r1, b, ldb, p1 - p0, yi + (size_t)r0 * P + p0, P, 0, gs);
    if (c->bias) /* added last, as in the grouped path, so both round alike */
      for (int r = r0; r < r1; r++) {
        float bias = c->bias[r], *row = yi + (size_t)r * P + p0;
        for (int p = 0; p < p1 - p0; p++)
          row[p] += bias;
      }
    return;
  }
  int i0 = unit * j->group, i1 = i0 + j->group < j->n ? i0 + j->group : j->n;
  int ld = (i1 - i0) * P;
  for (int i = i0; i < i1; i++) {
    const float *xi = j->x + (size_t)i * in_plane;
    float *dst = col + (size_t)(i - i0) * P;
    if (j->direct) {
      for (int ci = 0; ci < c->cin; ci++)
        memcpy(dst + (size_t)ci * ld, xi + (size_t)ci * P, sizeof(float) * P);
    } else {
      im2col_rows(c, xi, j->h, j->w, j->ow, 0, j->oh, dst, ld);
    }
  }
  float *cb = j->cbuf + worker * j->cbuf_stride;
  gemm_run(&c->packed, r0, r1, col, ld, ld, cb, ld, 0, gs);
  for (int i = i0; i < i1; i++)
    for (int r = r0; r < r1; r++) {
      float bias = c->bias ? c->bias[r] : 0.0f;
      const float *src = cb + (size_t)(r - r0) * ld + (size_t)(i - i0) * P;
      float *dst = j->y + (size_t)i * out_plane + (size_t)r * P;
      for (int p = 0; p < P; p++)
        dst[p] = src[p] + bias;
    }
}

static int winograd_enabled(void) {
  static int cached = -1;
  if (cached < 0) {
    const char *off = getenv("DENOISED_NO_WINOGRAD");
    cached = !(off && *off && *off != '0');
  }
  return cached;
}

int ops_conv2d_pack(conv2d *c) {
  int symmetric =
      c->pad_top == c->pad_left && c->pad_top == c->pad_bottom && c->pad_top == c->pad_right;
  c->forms = OPS_FORM_GEMM;
  if (winograd_enabled() && symmetric && wino_applies(c->k, c->stride, c->pad_top, c->cin, c->cout))
    c->forms |= OPS_FORM_WINO;
  return 0;
}

int ops_conv2d_pack_direct(conv2d *c) {
  c->forms = OPS_FORM_GEMM;
  return 0;
}

void ops_conv2d_unpack(conv2d *c) {
  if (c->wino) {
    wino_release(c->wino);
    free(c->wino);
    c->wino = NULL;
  }
  gemm_packed_free(&c->packed);
  c->forms = c->built = c->bf16 = 0;
}

int ops_conv2d_packed(const conv2d *c) {
  return c->forms != 0;
}

/* Builds one form of a layer (and rounds it to bf16 if the layer is). */
static int build_form(conv2d *c, int form) {
  if (form == OPS_FORM_WINO) {
    wino_conv *w = mem_malloc(sizeof *w);
    if (!w || wino_prepare(w, c->weight, c->bias, c->cin, c->cout)) {
      free(w);
      return -1;
    }
    for (int p = 0; c->bf16 && p < WINO_POINTS; p++)
      if (w->u[p].data && gemm_packed_to_bf16(&w->u[p])) {
        wino_release(w);
        free(w);
        return -1;
      }
    c->wino = w;
    return 0;
  }
  if (gemm_pack_a(&c->packed, c->weight, c->cout, c->cin * c->k * c->k))
    return -1;
  if (c->bf16 && gemm_packed_to_bf16(&c->packed)) {
    gemm_packed_free(&c->packed);
    return -1;
  }
  return 0;
}

/* Hands a file-mapped weight's whole pages back to the kernel once a form is built from it:
 * they are clean copies of the file (an optimizer's writes make them private, and reclaiming
 * those keeps their data), so the weights stop counting twice in the process's memory and a
 * later reader (another form, a backward pass) faults them in again from the page cache. */
static void let_weight_pages_go(const conv2d *c) {
  const long page = sysconf(_SC_PAGESIZE);
  if (!c->weight_in_file || page <= 0)
    return;
  uintptr_t lo = (uintptr_t)c->weight, hi = lo + (uintptr_t)c->cout * c->cin * c->k * c->k * 4;
  lo = (lo + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
  hi = hi / (uintptr_t)page * (uintptr_t)page;
  if (hi > lo)
    madvise((void *)lo, hi - lo, MADV_PAGEOUT);
}

/* Serialises the building of forms; forwards that find a form built read it without the lock. */
static pthread_mutex_t form_lock = PTHREAD_MUTEX_INITIALIZER;

/* The form ready for use, built now if this is its first use. A layer's forms are mutable
 * state behind a const conv2d: they are a cache of c->weight, filled once under form_lock and
 * published with release order, so concurrent forwards over one model see them whole. */
static int ensure_form(const conv2d *cc, int form) {
  conv2d *c = (conv2d *)cc;
  if (__atomic_load_n(&c->built, __ATOMIC_ACQUIRE) & form)
    return 0;
  pthread_mutex_lock(&form_lock);
  int rc = 0;
  if (!(c->built & form)) {
    rc = build_form(c, form);
    if (!rc) {
      __atomic_store_n(&c->built, c->built | form, __ATOMIC_RELEASE);
      let_weight_pages_go(c);
    }
  }
  pthread_mutex_unlock(&form_lock);
  return rc;
}

int ops_conv2d_to_bf16(conv2d *c) {
  if (!gemm_bf16_available())
    return -1;
  c->bf16 = 1;
  if (c->packed.data && gemm_packed_to_bf16(&c->packed))
    return -1;
  for (int p = 0; c->wino && p < WINO_POINTS; p++)
    if (c->wino->u[p].data && gemm_packed_to_bf16(&c->wino->u[p]))
      return -1;
  return 0;
}

int ops_conv2d(const conv2d *c, const float *x, int n, int h, int w, float *y, arena *a, pool *p) {
  int threads = pool_threads(p);
  /* Winograd pays off only with enough tiles per GEMM: on small images its
   * 4x larger filters make the GEMMs memory-bound. The choice depends on
   * the image size alone, never on the batch, so an image gets the same
   * bits alone or batched. */
  if ((c->forms & OPS_FORM_WINO) && h * w >= OPS_WINO_MIN_PIXELS)
    return ensure_form(c, OPS_FORM_WINO) ? -1 : wino_conv2d(c->wino, x, n, h, w, y, a, p);
  if (ensure_form(c, OPS_FORM_GEMM))
    return -1;
  conv_job j = {.c = c, .x = x, .y = y, .n = n, .h = h, .w = w};
  ops_conv2d_out_size(c, h, w, &j.oh, &j.ow);
  j.P = j.oh * j.ow;
  j.K = c->cin * c->k * c->k;
  j.direct =
      c->k == 1 && c->stride == 1 && !c->pad_top && !c->pad_left && !c->pad_bottom && !c->pad_right;
  j.group = 1;
  if (j.P < CONV_MIN_COLS && n > 1) {
    j.group = (CONV_MIN_COLS + j.P - 1) / j.P;
    if (j.group > n)
      j.group = n;
  }
  if (j.group > 1) {
    j.units = (n + j.group - 1) / j.group;
    j.cols = j.group * j.P;
  } else {
    j.tile = j.P;
    if (!j.direct && (size_t)j.K * j.P * sizeof(float) > COL_TILE_BYTES) {
      int rows = (int)(COL_TILE_BYTES / sizeof(float) / (size_t)j.K / (size_t)j.ow);
      j.tile = (rows < 1 ? 1 : rows) * j.ow;
    }
    j.ntiles = (j.P + j.tile - 1) / j.tile;
    j.units = n * j.ntiles;
    j.cols = j.tile;
  }
  /* Few column blocks: split output channels as well, in whole kernel rows. */
  int rb = gemm_row_block();
  j.row_chunks = 1;
  if (j.units < 2 * threads) {
    j.row_chunks = (2 * threads + j.units - 1) / j.units;
    int max_chunks = (c->cout + 4 * rb - 1) / (4 * rb);
    if (j.row_chunks > max_chunks)
      j.row_chunks = max_chunks < 1 ? 1 : max_chunks;
  }
  j.rows_per_chunk = (c->cout + j.row_chunks - 1) / j.row_chunks;
  j.rows_per_chunk = (j.rows_per_chunk + rb - 1) / rb * rb;
  j.col_stride = (j.direct && j.group == 1) ? 0 : (size_t)j.K * j.cols;
  j.cbuf_stride = j.group > 1 ? (size_t)j.rows_per_chunk * j.cols : 0;
  j.gscratch_stride = gemm_scratch_floats(j.K, j.cols);
  arena_mark m = arena_get_mark(a);
  j.col = arena_floats(a, j.col_stride * threads + 16);
  j.cbuf = arena_floats(a, j.cbuf_stride * threads + 16);
  j.gscratch = arena_floats(a, j.gscratch_stride * threads);
  if (!j.col || !j.cbuf || !j.gscratch)
    return -1;
  pool_run(p, j.units * j.row_chunks, conv_task, &j);
  arena_release(a, m);
  return 0;
}

typedef struct gn_job {
  const float *x;
  float *y;
  int c, hw, groups, silu;
  float eps;
  const float *gamma, *beta;
  const float *add, *mod; /* ops_group_norm_temb's, or NULL */
} gn_job;

/* exp(x) in float, vectorizable: Cody-Waite range reduction and Cephes'
 * degree-6 polynomial (about 1 ulp), with rounding done by the 1.5*2^23
 * trick rather than a libm call so the loop compiles to plain vector ops.
 * Defined for every input, like expf: the argument is clamped before its
 * conversion to int (NaN or a value beyond int's range is undefined
 * behaviour there), NaN comes back as NaN, and 2^n is applied in two halves
 * so that results overflow to inf above ~88.72 and fade through the
 * subnormals to 0 below ~-87.3 instead of stopping at exp(+-88). In the
 * normal range both halves are exact, so results there are unchanged. */
static inline float exp_fast(float x) {
  /* NaN fails the first test and lands on a finite value */
  float xc = x >= -104.0f ? (x <= 89.0f ? x : 89.0f) : -104.0f;
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  /* n is in [-150, 128]: each half in [-75, 64] is a normal exponent */
  int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;
  uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof s1);
  memcpy(&s2, &b2, sizeof s2);
  float y = p * s1 * s2;
  return x == x ? y : x;
}

static inline float silu1(float v) {
  return v / (1.0f + exp_fast(-v));
}

/* The vector loops below are compiled once per CPU tier (AVX-512, AVX2, baseline) and picked at
 * run time by the tier the GEMM uses (gemm_kernel_name, which honours DENOISED_NO_AVX512 and
 * DENOISED_NO_AVX2), so the tests can run every version. Same arithmetic in each (no FMA
 * contraction under -std=c11): the vector width never changes results. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OPS_TIERS 1
#define OPS_BODY static inline __attribute__((always_inline))
#define OPS_TIERED(name, params, args)                                                             \
  __attribute__((target("avx512f"))) static void name##_avx512 params {                            \
    name##_body args;                                                                              \
  }                                                                                                \
  __attribute__((target("avx2"))) static void name##_avx2 params {                                 \
    name##_body args;                                                                              \
  }                                                                                                \
  static void name##_base params {                                                                 \
    name##_body args;                                                                              \
  }
#else
#define OPS_TIERS 0
#define OPS_BODY static inline
#define OPS_TIERED(name, params, args)                                                             \
  static void name##_base params {                                                                 \
    name##_body args;                                                                              \
  }
#endif

#if OPS_TIERS
/* 2: AVX-512, 1: AVX2, 0: baseline */
static int ops_tier(void) {
  static _Atomic int cached = -1;
  int t = cached;
  if (t < 0) {
    const char *k = gemm_kernel_name();
    t = strcmp(k, "avx512") == 0 ? 2 : strcmp(k, "avx2") == 0 ? 1 : 0;
    cached = t;
  }
  return t;
}

#define OPS_DISPATCH(name, args)                                                                   \
  switch (ops_tier()) {                                                                            \
  case 2: name##_avx512 args; break;                                                               \
  case 1: name##_avx2 args; break;                                                                 \
  default: name##_base args; break;                                                                \
  }
#else
#define OPS_DISPATCH(name, args) name##_base args;
#endif

/* Sum and squared deviation of a group in double, over 8 interleaved
 * partial sums: vectorizable, and a fixed order whatever the threads. */
OPS_BODY void group_moments(const float *x, size_t cnt, double *mean_out, double *var_out) {
  double acc[8] = {0};
  size_t i = 0;
  for (; i + 8 <= cnt; i += 8)
    for (int k = 0; k < 8; k++)
      acc[k] += x[i + k];
  double sum = 0;
  for (int k = 0; k < 8; k++)
    sum += acc[k];
  for (; i < cnt; i++)
    sum += x[i];
  double mean = sum / (double)cnt;
  double sq[8] = {0};
  for (i = 0; i + 8 <= cnt; i += 8)
    for (int k = 0; k < 8; k++) {
      double d = x[i + k] - mean;
      sq[k] += d * d;
    }
  double var = 0;
  for (int k = 0; k < 8; k++)
    var += sq[k];
  for (; i < cnt; i++)
    var += (x[i] - mean) * (x[i] - mean);
  *mean_out = mean;
  *var_out = var / (double)cnt;
}

OPS_BODY void gn_group_body(const gn_job *j, int task) {
  int cpg = j->c / j->groups, g = task % j->groups, img = task / j->groups;
  size_t off = ((size_t)img * j->c + (size_t)g * cpg) * j->hw, cnt = (size_t)cpg * j->hw;
  const float *x = j->x + off;
  float *y = j->y + off;
  if (j->add) { /* x + add goes to y first: the group is normalised there, as if added before */
    for (int ci = 0; ci < cpg; ci++) {
      const float v = j->add[(size_t)img * j->c + g * cpg + ci];
      const float *xc = x + (size_t)ci * j->hw;
      float *yc = y + (size_t)ci * j->hw;
      for (int p = 0; p < j->hw; p++)
        yc[p] = xc[p] + v;
    }
    x = y;
  }
  double mean, var;
  group_moments(x, cnt, &mean, &var);
  float rstd = (float)(1.0 / sqrt(var + j->eps)), fmean = (float)mean;
  for (int ci = 0; ci < cpg; ci++) {
    int ch = g * cpg + ci;
    float scale = rstd * (j->gamma ? j->gamma[ch] : 1.0f), shift = j->beta ? j->beta[ch] : 0.0f;
    const float *xc = x + (size_t)ci * j->hw;
    float *yc = y + (size_t)ci * j->hw;
    if (j->mod) {
      const float sc = 1.0f + j->mod[(size_t)img * 2 * j->c + ch],
                  sh = j->mod[(size_t)img * 2 * j->c + j->c + ch];
      if (j->silu) {
        for (int p = 0; p < j->hw; p++)
          yc[p] = silu1(((xc[p] - fmean) * scale + shift) * sc + sh);
      } else {
        for (int p = 0; p < j->hw; p++)
          yc[p] = ((xc[p] - fmean) * scale + shift) * sc + sh;
      }
    } else if (j->silu) {
      for (int p = 0; p < j->hw; p++)
        yc[p] = silu1((xc[p] - fmean) * scale + shift);
    } else {
      for (int p = 0; p < j->hw; p++)
        yc[p] = (xc[p] - fmean) * scale + shift;
    }
  }
}
OPS_TIERED(gn_group, (const gn_job *j, int task), (j, task))

static void gn_task(void *ctx, int task, int worker) {
  (void)worker;
  OPS_DISPATCH(gn_group, ((const gn_job *)ctx, task))
}

void ops_group_norm(const float *x, int n, int c, int hw, int groups, float eps, const float *gamma,
                    const float *beta, int silu, float *y, pool *p) {
  gn_job j = {x, y, c, hw, groups, silu, eps, gamma, beta, NULL, NULL};
  pool_run(p, n * groups, gn_task, &j);
}

void ops_group_norm_temb(const float *x, int n, int c, int hw, int groups, float eps,
                         const float *gamma, const float *beta, const float *add, const float *mod,
                         int silu, float *y, pool *p) {
  gn_job j = {x, y, c, hw, groups, silu, eps, gamma, beta, add, mod};
  pool_run(p, n * groups, gn_task, &j);
}

typedef struct residual_job {
  const float *a;
  float *y;
  size_t count;
  float scale;
} residual_job;

#define RESIDUAL_CHUNK 16384 /* floats per task */

static void residual_task(void *ctx, int task, int worker) {
  (void)worker;
  const residual_job *j = ctx;
  size_t i0 = (size_t)task * RESIDUAL_CHUNK, i1 = i0 + RESIDUAL_CHUNK;
  if (i1 > j->count)
    i1 = j->count;
  for (size_t i = i0; i < i1; i++)
    j->y[i] = (j->a[i] + j->y[i]) / j->scale;
}

void ops_residual(const float *a, size_t count, float scale, float *y, pool *p) {
  residual_job j = {a, y, count, scale};
  pool_run(p, (int)((count + RESIDUAL_CHUNK - 1) / RESIDUAL_CHUNK), residual_task, &j);
}

void ops_linear(const float *x, int n, int in, int out, const float *weight, const float *bias,
                float *y) {
  /* One matrix-vector product per row: a row's result must not depend on how
   * many rows are batched with it (see ops_conv2d). */
  for (int i = 0; i < n; i++) {
    float *yi = y + (size_t)i * out;
    for (int o = 0; o < out; o++)
      yi[o] = bias ? bias[o] : 0.0f;
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, weight, in, x + (size_t)i * in, 1, 1.0f,
                yi, 1);
  }
}

OPS_BODY void silu_body(const float *x, size_t count, float *y) {
  for (size_t i = 0; i < count; i++)
    y[i] = silu1(x[i]);
}
OPS_TIERED(silu, (const float *x, size_t count, float *y), (x, count, y))

void ops_silu(const float *x, size_t count, float *y) {
  OPS_DISPATCH(silu, (x, count, y))
}

int ops_all_finite(const float *x, size_t count) {
  /* the exponent bits, not isfinite(): a branch-free loop the compiler vectorizes */
  uint32_t bad = 0;
  for (size_t i = 0; i < count; i++) {
    uint32_t b;
    memcpy(&b, x + i, sizeof b);
    bad |= (b & 0x7f800000u) == 0x7f800000u;
  }
  return !bad;
}

void ops_upsample_nearest2x(const float *x, int n, int c, int h, int w, float *y) {
  for (size_t plane = 0; plane < (size_t)n * c; plane++) {
    const float *xp = x + plane * h * w;
    float *yp = y + plane * 4 * h * w;
    for (int iy = 0; iy < h; iy++) {
      float *r0 = yp + (size_t)(2 * iy) * 2 * w, *r1 = r0 + 2 * w;
      for (int ix = 0; ix < w; ix++) {
        float v = xp[(size_t)iy * w + ix];
        r0[2 * ix] = r0[2 * ix + 1] = v;
      }
      memcpy(r1, r0, sizeof(float) * 2 * w);
    }
  }
}

void ops_avgpool2x2(const float *x, int n, int c, int h, int w, float *y) {
  int oh = h / 2, ow = w / 2;
  for (size_t plane = 0; plane < (size_t)n * c; plane++) {
    const float *xp = x + plane * h * w;
    float *yp = y + plane * oh * ow;
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++) {
        const float *p = xp + (size_t)(2 * oy) * w + 2 * ox;
        yp[(size_t)oy * ow + ox] = (p[0] + p[1] + p[w] + p[w + 1]) * 0.25f;
      }
  }
}

void ops_timestep_embedding(const float *t, int n, int dim, int flip_sin_to_cos, float freq_shift,
                            float *out) {
  int half = dim / 2;
  /* float32 at every step, in diffusers' order, so large timesteps give the
   * same phase as PyTorch rather than a more exact but different one. */
  const float neg_log_period = (float)-log(10000.0);
  for (int i = 0; i < n; i++) {
    float *o = out + (size_t)i * dim;
    for (int k = 0; k < half; k++) {
      float expo = neg_log_period * (float)k;
      expo = expo / ((float)half - freq_shift);
      float arg = t[i] * expf(expo);
      float s = sinf(arg), co = cosf(arg);
      o[flip_sin_to_cos ? half + k : k] = s;
      o[flip_sin_to_cos ? k : half + k] = co;
    }
    if (dim % 2)
      o[dim - 1] = 0.0f;
  }
}

/* Per row: the max, then exp_fast (vectorized, where expf is a scalar call that dominated
 * large attentions), then a sum over 8 interleaved partial sums, so that every tier adds in
 * the same order. */
OPS_BODY void softmax_rows_body(float *s, int nr, int L) {
  for (int r = 0; r < nr; r++) {
    float *row = s + (size_t)r * L, mx = row[0];
    for (int l = 1; l < L; l++)
      mx = row[l] > mx ? row[l] : mx;
    for (int l = 0; l < L; l++)
      row[l] = exp_fast(row[l] - mx);
    float acc[8] = {0}, sum = 0;
    int l = 0;
    for (; l + 8 <= L; l += 8)
      for (int k = 0; k < 8; k++)
        acc[k] += row[l + k];
    for (int k = 0; k < 8; k++)
      sum += acc[k];
    for (; l < L; l++)
      sum += row[l];
    const float inv = 1.0f / sum;
    for (l = 0; l < L; l++)
      row[l] *= inv;
  }
}
OPS_TIERED(softmax_rows, (float *s, int nr, int L), (s, nr, L))

void ops_softmax_rows(float *s, int nr, int L) {
  OPS_DISPATCH(softmax_rows, (s, nr, L))
}

typedef struct attn_job {
  const float *q, *k, *v; /* [n][c][lq], [n][c][lk], [n][c][lk]: channel-major like activations */
  float *o;
  float *scores; /* per-worker [rows][lk] */
  int c, lq, lk, heads, dh, rows, nchunks;
  float scale;
} attn_job;

static void attn_task(void *ctx, int task, int worker) {
  attn_job *j = ctx;
  int chunk = task % j->nchunks, head = (task / j->nchunks) % j->heads;
  int img = task / j->nchunks / j->heads;
  int r0 = chunk * j->rows, r1 = r0 + j->rows < j->lq ? r0 + j->rows : j->lq, nr = r1 - r0;
  size_t qbase = ((size_t)img * j->c + (size_t)head * j->dh) * j->lq;
  size_t kbase = ((size_t)img * j->c + (size_t)head * j->dh) * j->lk;
  const int lk = j->lk;
  float *s = j->scores + (size_t)worker * j->rows * lk;
  /* scores[r][l] = scale * sum_d q[d][r] k[d][l] */
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nr, lk, j->dh, j->scale, j->q + qbase + r0,
              j->lq, j->k + kbase, lk, 0.0f, s, lk);
  ops_softmax_rows(s, nr, lk);
  /* o[d][r] = sum_l v[d][l] p[r][l] */
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->dh, nr, lk, 1.0f, j->v + kbase, lk, s, lk,
              0.0f, j->o + qbase + r0, j->lq);
}

int ops_mha(const float *q, const float *k, const float *v, int n, int c, int heads, int lq, int lk,
            float *o, arena *a, pool *p) {
  attn_job j = {.q = q, .k = k, .v = v, .o = o, .c = c, .lq = lq, .lk = lk, .heads = heads};
  j.dh = c / heads;
  j.scale = 1.0f / sqrtf((float)j.dh);
  j.rows = lq < 256 ? lq : 256;
  j.nchunks = (lq + j.rows - 1) / j.rows;
  arena_mark m = arena_get_mark(a);
  j.scores = arena_floats(a, (size_t)j.rows * lk * pool_threads(p));
  if (!j.scores)
    return -1;
  pool_run(p, n * heads * j.nchunks, attn_task, &j);
  arena_release(a, m);
  return 0;
}

typedef struct ln_job {
  const float *x;
  float *y;
  int c, L, nblocks;
  float eps;
  const float *gamma, *beta;
} ln_job;

#define LN_TOKENS 64 /* positions per task: one pass over the channels serves them all */

static void ln_task(void *ctx, int task, int worker) {
  (void)worker;
  const ln_job *j = ctx;
  int img = task / j->nblocks, l0 = task % j->nblocks * LN_TOKENS;
  int nt = j->L - l0 < LN_TOKENS ? j->L - l0 : LN_TOKENS;
  const size_t base = (size_t)img * j->c * j->L + (size_t)l0;
  double mean[LN_TOKENS] = {0}, var[LN_TOKENS] = {0};
  for (int ch = 0; ch < j->c; ch++) {
    const float *xc = j->x + base + (size_t)ch * j->L;
    for (int t = 0; t < nt; t++)
      mean[t] += xc[t];
  }
  for (int t = 0; t < nt; t++)
    mean[t] /= j->c;
  for (int ch = 0; ch < j->c; ch++) {
    const float *xc = j->x + base + (size_t)ch * j->L;
    for (int t = 0; t < nt; t++) {
      double d = xc[t] - mean[t];
      var[t] += d * d;
    }
  }
  float fm[LN_TOKENS], rstd[LN_TOKENS];
  for (int t = 0; t < nt; t++) {
    fm[t] = (float)mean[t];
    rstd[t] = (float)(1.0 / sqrt(var[t] / j->c + j->eps));
  }
  for (int ch = 0; ch < j->c; ch++) {
    const float *xc = j->x + base + (size_t)ch * j->L;
    float *yc = j->y + base + (size_t)ch * j->L;
    const float g = j->gamma ? j->gamma[ch] : 1.0f, b = j->beta ? j->beta[ch] : 0.0f;
    for (int t = 0; t < nt; t++)
      yc[t] = (xc[t] - fm[t]) * rstd[t] * g + b;
  }
}

void ops_layer_norm(const float *x, int n, int c, int L, float eps, const float *gamma,
                    const float *beta, float *y, pool *p) {
  ln_job j = {x, y, c, L, (L + LN_TOKENS - 1) / LN_TOKENS, eps, gamma, beta};
  pool_run(p, n * j.nblocks, ln_task, &j);
}

typedef struct geglu_job {
  const float *x;
  float *y;
  int inner, L;
} geglu_job;

static void geglu_task(void *ctx, int task, int worker) {
  (void)worker;
  const geglu_job *j = ctx;
  int img = task / j->inner, ch = task % j->inner;
  const float *a = j->x + ((size_t)img * 2 * j->inner + ch) * j->L;
  const float *g = a + (size_t)j->inner * j->L;
  float *y = j->y + ((size_t)img * j->inner + ch) * j->L;
  for (int t = 0; t < j->L; t++)
    y[t] = a[t] * (0.5f * g[t] * (1.0f + erff(g[t] * 0.70710678118654752f)));
}

void ops_geglu(const float *x, int n, int inner, int L, float *y, pool *p) {
  geglu_job j = {x, y, inner, L};
  pool_run(p, n * inner, geglu_task, &j);
}

int ops_attention_pack(attn_weights *aw) {
  const float *w[4] = {aw->wq, aw->wk, aw->wv, aw->wo}, *b[4] = {aw->bq, aw->bk, aw->bv, aw->bo};
  for (int i = 0; i < 4; i++) {
    aw->proj[i] = (conv2d){.cin = aw->channels,
                           .cout = aw->channels,
                           .k = 1,
                           .stride = 1,
                           .weight = w[i],
                           .bias = b[i]};
    if (ops_conv2d_pack(&aw->proj[i])) {
      while (i-- > 0)
        ops_conv2d_unpack(&aw->proj[i]);
      return -1;
    }
  }
  return 0;
}

void ops_attention_unpack(attn_weights *aw) {
  for (int i = 0; i < 4; i++)
    ops_conv2d_unpack(&aw->proj[i]);
}

int ops_attention(const attn_weights *aw, const float *x, int n, int hw, float *y, arena *a,
                  pool *p) {
  int c = aw->channels;
  size_t count = (size_t)n * c * hw;
  arena_mark m = arena_get_mark(a);
  float *xn = arena_floats(a, count), *q = arena_floats(a, count), *k = arena_floats(a, count);
  float *v = arena_floats(a, count), *o = arena_floats(a, count);
  if (!xn || !q || !k || !v || !o)
    return -1;
  if (aw->groups > 0)
    ops_group_norm(x, n, c, hw, aw->groups, aw->eps, aw->norm_gamma, aw->norm_beta, 0, xn, p);
  else
    memcpy(xn, x, count * sizeof(float));
  float *dst[3] = {q, k, v};
  for (int i = 0; i < 3; i++)
    if (ops_conv2d(&aw->proj[i], xn, n, hw, 1, dst[i], a, p))
      return -1;
  if (ops_mha(q, k, v, n, c, aw->heads, hw, hw, o, a, p))
    return -1;
  if (ops_conv2d(&aw->proj[3], o, n, hw, 1, xn, a, p))
    return -1;
  for (size_t i = 0; i < count; i++)
    y[i] = (xn[i] + x[i]) / aw->rescale;
  arena_release(a, m);
  return 0;
}
