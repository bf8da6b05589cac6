/* sgemm with pre-packed A. The AVX-512 path is a 12x32 register-blocked
 * micro-kernel: every C element sums its k terms in one order (k-blocks of
 * GEMM_KC, each from zero, added to C in turn), so results are bit-identical
 * however M and N are split. An AVX2+FMA kernel does the same sums in the
 * same order; only CPUs with neither fall back to OpenBLAS, whose results
 * depend on the matrix shape. */
#include "gemm.h"

#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define GEMM_X86 1
#endif

#define GEMM_MR 12
#define GEMM_NR 32
#define GEMM_KC 256
/* Products at most this wide (the small images of batch-1 passes, Winograd's tile columns) pack
 * all of B at once, up to GEMM_NARROW_B_FLOATS (kept in L2), so that A, usually weights coming
 * cold from memory, streams through once front to back: see run_narrow. */
#define GEMM_NARROW_N 64
#define GEMM_NARROW_B_FLOATS (160u << 10)
/* How far ahead (floats of A) the AVX-512 kernels prefetch the panel they are reading: the
 * hardware prefetchers stop at page boundaries, and A's panels are read 48 bytes per step. */
#define GEMM_PREFETCH 768

int gemm_row_block(void) {
  return GEMM_MR;
}

#ifdef GEMM_X86
static int has_avx2(void) {
  static int cached = -1;
  if (cached < 0) {
    __builtin_cpu_init();
    cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const char *off = getenv("DENOISED_NO_AVX2");
    if (off && *off && *off != '0')
      cached = 0;
  }
  return cached;
}

static int has_avx512(void) {
  static int cached = -1;
  if (cached < 0) {
    __builtin_cpu_init();
    cached = __builtin_cpu_supports("avx512f") ? 1 : 0;
    const char *off = getenv("DENOISED_NO_AVX512");
    if (off && *off && *off != '0')
      cached = 0;
  }
  return cached;
}
#endif

int gemm_pack_a(gemm_packed *p, const float *a, int m, int k) {
  int panels = (m + GEMM_MR - 1) / GEMM_MR;
  size_t bytes = (size_t)panels * GEMM_MR * k * sizeof(float);
  p->m = m;
  p->k = k;
  p->rowmajor = a;
  p->bf16 = NULL;
  p->data = mem_aligned(64, (bytes + 63) & ~(size_t)63);
  if (!p->data)
    return -1;
  for (int pi = 0; pi < panels; pi++) {
    float *dst = p->data + (size_t)pi * GEMM_MR * k;
    for (int kk = 0; kk < k; kk++)
      for (int r = 0; r < GEMM_MR; r++) {
        int row = pi * GEMM_MR + r;
        dst[(size_t)kk * GEMM_MR + r] = row < m ? a[(size_t)row * k + kk] : 0.0f;
      }
  }
  return 0;
}

void gemm_packed_free(gemm_packed *p) {
  free(p->data);
  p->data = NULL;
  free(p->bf16);
  p->bf16 = NULL;
}

#ifdef GEMM_X86
static int has_bf16(void) {
  static int cached = -1;
  if (cached < 0) {
    __builtin_cpu_init();
    /* CPUID leaf 7 sub-leaf 1, EAX bit 5; the OS's saving of the ZMM state is part of the
     * avx512f check */
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d))
      a = 0;
    cached = has_avx512() && __builtin_cpu_supports("avx512bw") && (a >> 5 & 1);
    const char *off = getenv("DENOISED_NO_BF16");
    if (off && *off && *off != '0')
      cached = 0;
  }
  return cached;
}
#endif

int gemm_bf16_available(void) {
#ifdef GEMM_X86
  return has_bf16();
#else
  return 0;
#endif
}

#ifdef GEMM_X86
/* float -> bf16, round to nearest even (NaN stays a quiet NaN). */
static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return (uint16_t)(u >> 16 | 0x40);
  return (uint16_t)((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

/* bf16 panels: per panel of GEMM_MR rows, k pairs outermost, then the rows, then the two k of
 * the pair (VDPBF16PS multiplies adjacent pairs); an odd k is padded with a zero. */
int gemm_packed_to_bf16(gemm_packed *p) {
  if (!has_bf16() || !p->data)
    return -1;
  const int panels = (p->m + GEMM_MR - 1) / GEMM_MR, pairs = (p->k + 1) / 2;
  size_t n = (size_t)panels * pairs * GEMM_MR * 2;
  uint16_t *h = mem_aligned(64, (n * sizeof *h + 63) & ~(size_t)63);
  if (!h)
    return -1;
  for (int pi = 0; pi < panels; pi++) {
    const float *src = p->data + (size_t)pi * GEMM_MR * p->k;
    uint16_t *dst = h + (size_t)pi * pairs * GEMM_MR * 2;
    for (int kk = 0; kk < 2 * pairs; kk++)
      for (int r = 0; r < GEMM_MR; r++)
        dst[((size_t)(kk / 2) * GEMM_MR + r) * 2 + kk % 2] =
            kk < p->k ? to_bf16(src[(size_t)kk * GEMM_MR + r]) : 0;
  }
  free(p->data);
  p->data = NULL;
  p->bf16 = h;
  return 0;
}
#else
int gemm_packed_to_bf16(gemm_packed *p) {
  (void)p;
  return -1; /* no bf16 kernel off x86 */
}
#endif

/* Whether a product takes the narrow path (see run_narrow): B a few panels wide, packed whole. */
static int narrow_path(int k, int n) {
  return n <= GEMM_NARROW_N && (size_t)k * GEMM_NARROW_N <= GEMM_NARROW_B_FLOATS;
}

size_t gemm_scratch_floats(int k, int n) {
  size_t s = (size_t)GEMM_KC * GEMM_NR; /* one packed B panel */
  if (n > 0 && k > 0) {
    int w = n < GEMM_NARROW_N ? n : GEMM_NARROW_N;
    size_t whole = (size_t)k * ((w + GEMM_NR - 1) / GEMM_NR * GEMM_NR);
    if (narrow_path(k, w) && whole > s)
      s = whole; /* all of B's k rows, up to GEMM_NARROW_N columns */
  }
  return s + 16; /* plus alignment slack */
}

#ifdef GEMM_X86
/* Packs rows [k0, k0+kc) x columns [j0, j0+nr) of B into kc rows of 32,
 * zero-filling missing columns so the kernel never reads past B. */
__attribute__((target("avx512f"))) static void pack_b(const float *b, int ldb, int k0, int kc,
                                                      int j0, int nr, float *dst) {
  if (nr == GEMM_NR) {
    for (int kk = 0; kk < kc; kk++) {
      const float *src = b + (size_t)(k0 + kk) * ldb + j0;
      _mm512_store_ps(dst + kk * GEMM_NR, _mm512_loadu_ps(src));
      _mm512_store_ps(dst + kk * GEMM_NR + 16, _mm512_loadu_ps(src + 16));
    }
    return;
  }
  __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
  __mmask16 m1 = nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
  for (int kk = 0; kk < kc; kk++) {
    const float *src = b + (size_t)(k0 + kk) * ldb + j0;
    _mm512_store_ps(dst + kk * GEMM_NR, _mm512_maskz_loadu_ps(m0, src));
    _mm512_store_ps(dst + kk * GEMM_NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
  }
}

/* Writes (or with add, adds) the mr x nr corner of a 12x32 block of sums into C. */
__attribute__((target("avx512f"))) static inline void
store_12x32(__m512 acc[GEMM_MR][2], float *c, int ldc, int mr, int nr, int add) {
  __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
  __mmask16 m1 = nr <= 16 ? 0 : nr >= 32 ? 0xffff : (__mmask16)((1u << (nr - 16)) - 1);
  for (int r = 0; r < mr; r++) {
    float *row = c + (size_t)r * ldc;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (add) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), v1);
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

/* C[mr x nr] (+)= A panel (kc x 12, k-major) * B panel (kc x 32). */
__attribute__((target("avx512f"))) static void
kernel_12x32(int kc, const float *a, const float *b, float *c, int ldc, int mr, int nr, int add) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;
  __m512 c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;
  for (int kk = 0; kk < kc; kk++) {
    __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
    __m512 av;
    _mm_prefetch((const char *)(a + GEMM_PREFETCH), _MM_HINT_T0);
#define GEMM_ROW(r, x0, x1)                                                                        \
  av = _mm512_set1_ps(a[r]);                                                                       \
  x0 = _mm512_fmadd_ps(av, b0, x0);                                                                \
  x1 = _mm512_fmadd_ps(av, b1, x1);
    GEMM_ROW(0, c00, c01)
    GEMM_ROW(1, c10, c11)
    GEMM_ROW(2, c20, c21)
    GEMM_ROW(3, c30, c31)
    GEMM_ROW(4, c40, c41)
    GEMM_ROW(5, c50, c51)
    GEMM_ROW(6, c60, c61)
    GEMM_ROW(7, c70, c71)
    GEMM_ROW(8, c80, c81)
    GEMM_ROW(9, c90, c91)
    GEMM_ROW(10, ca0, ca1)
    GEMM_ROW(11, cb0, cb1)
#undef GEMM_ROW
    a += GEMM_MR;
    b += GEMM_NR;
  }
  __m512 acc[GEMM_MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51},
                            {c60, c61}, {c70, c71}, {c80, c81}, {c90, c91}, {ca0, ca1}, {cb0, cb1}};
  store_12x32(acc, c, ldc, mr, nr, add);
}

/* C[mr x nr] (+)= A panel (kc x 12) * the first 16 columns of a B panel (nr <= 16): half the
 * B loads and FMAs of kernel_12x32 when the other half would be padding. Same sums. */
__attribute__((target("avx512f"))) static void
kernel_12x16(int kc, const float *a, const float *b, float *c, int ldc, int mr, int nr, int add) {
  __m512 acc[GEMM_MR][2];
  for (int r = 0; r < GEMM_MR; r++)
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int kk = 0; kk < kc; kk++) {
    __m512 b0 = _mm512_load_ps(b);
    _mm_prefetch((const char *)(a + GEMM_PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int r = 0; r < GEMM_MR; r++)
      acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), b0, acc[r][0]);
    a += GEMM_MR;
    b += GEMM_NR;
  }
  store_12x32(acc, c, ldc, mr, nr, add);
}

/* Products with a handful of columns (nr <= 8, e.g. a batch-1 Winograd GEMM on an 8x8 image,
 * 4 tiles): vectorised along M instead, so no lanes are padding but the 4 unused of a 12-row
 * panel column. NP panels at once give NP * NC independent sums to hide the FMA latency. Each
 * lane computes acc = fma(A[i][k], B[k][j], acc) in k order, exactly kernel_12x32's sum. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
col_body(int kc, const float *a, size_t astride, int np, const float *b, float *c, int ldc,
         int mr_last, int add, const int NC, const int NP) {
  __m512 acc[4][8];
  const float *ap[4];
  __mmask16 am[4];
#pragma GCC unroll 4
  for (int p = 0; p < NP; p++) {
    ap[p] = a + (p < np ? p : 0) * astride;
    am[p] = p < np ? 0x0fff : 0;
#pragma GCC unroll 8
    for (int j = 0; j < NC; j++)
      acc[p][j] = _mm512_setzero_ps();
  }
  for (int kk = 0; kk < kc; kk++) {
    __m512 av[4];
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
      av[p] = _mm512_maskz_loadu_ps(am[p], ap[p] + (size_t)kk * GEMM_MR);
      _mm_prefetch((const char *)(ap[p] + (size_t)kk * GEMM_MR + GEMM_PREFETCH), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NC; j++) {
      __m512 bv = _mm512_set1_ps(b[(size_t)kk * GEMM_NR + j]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++)
        acc[p][j] = _mm512_fmadd_ps(av[p], bv, acc[p][j]);
    }
  }
  float tmp[8][16];
#pragma GCC unroll 4
  for (int p = 0; p < NP; p++) { /* constant indices keep acc in registers */
    if (p >= np)
      break;
#pragma GCC unroll 8
    for (int j = 0; j < NC; j++)
      _mm512_storeu_ps(tmp[j], acc[p][j]);
    int rows = p == np - 1 ? mr_last : GEMM_MR;
    for (int r = 0; r < rows; r++) {
      float *row = c + (size_t)(p * GEMM_MR + r) * ldc;
      for (int j = 0; j < NC; j++)
        row[j] = add ? row[j] + tmp[j][r] : tmp[j][r];
    }
  }
}

#define GEMM_COL_KERNEL(NC, NP)                                                                    \
  __attribute__((target("avx512f"))) static void kernel_col##NC(                                   \
      int kc, const float *a, size_t astride, int np, const float *b, float *c, int ldc,           \
      int mr_last, int add) {                                                                      \
    col_body(kc, a, astride, np, b, c, ldc, mr_last, add, NC, NP);                                 \
  }
GEMM_COL_KERNEL(1, 4)
GEMM_COL_KERNEL(2, 4)
GEMM_COL_KERNEL(3, 4)
GEMM_COL_KERNEL(4, 4)
GEMM_COL_KERNEL(5, 4)
GEMM_COL_KERNEL(6, 4)
GEMM_COL_KERNEL(7, 3)
GEMM_COL_KERNEL(8, 3)
#undef GEMM_COL_KERNEL

typedef void (*col_fn)(int kc, const float *a, size_t astride, int np, const float *b, float *c,
                       int ldc, int mr_last, int add);
static const col_fn col_kernels[9] = {NULL,        kernel_col1, kernel_col2,
                                      kernel_col3, kernel_col4, kernel_col5,
                                      kernel_col6, kernel_col7, kernel_col8};
static const int col_panels[9] = {0, 4, 4, 4, 4, 4, 4, 3, 3};

/* kernel_12x32, or kernel_12x16 when the block's columns fit in 16. */
__attribute__((target("avx512f"))) static void
block_avx512(int kc, const float *a, const float *b, float *c, int ldc, int mr, int nr, int add) {
  if (nr <= 16)
    kernel_12x16(kc, a, b, c, ldc, mr, nr, add);
  else
    kernel_12x32(kc, a, b, c, ldc, mr, nr, add);
}

/* AVX2 + FMA: the same 12x32 block done as 2 x 2 tiles of 6x16, with the
 * same per-element FMA sequence as the AVX-512 kernel, so results match it. */
__attribute__((target("avx2,fma"))) static void kernel_6x16_avx2(int kc, const float *a,
                                                                 const float *b, float *c, int ldc,
                                                                 int mr, int nr, int add) {
  __m256 acc[6][2];
  for (int r = 0; r < 6; r++)
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int kk = 0; kk < kc; kk++) {
    __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    for (int r = 0; r < 6; r++) {
      __m256 av = _mm256_broadcast_ss(a + r);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
    a += GEMM_MR;
    b += GEMM_NR;
  }
  float tmp[16];
  for (int r = 0; r < mr; r++) {
    float *row = c + (size_t)r * ldc;
    _mm256_storeu_ps(tmp, acc[r][0]);
    _mm256_storeu_ps(tmp + 8, acc[r][1]);
    for (int j = 0; j < nr; j++)
      row[j] = add ? row[j] + tmp[j] : tmp[j];
  }
}

static void pack_b_plain(const float *b, int ldb, int k0, int kc, int j0, int nr, float *dst) {
  for (int kk = 0; kk < kc; kk++) {
    const float *src = b + (size_t)(k0 + kk) * ldb + j0;
    float *d = dst + kk * GEMM_NR;
    for (int j = 0; j < GEMM_NR; j++)
      d[j] = j < nr ? src[j] : 0.0f;
  }
}

/* One 12x32 block of C from a packed A panel and a packed B panel. */
typedef void (*block_fn)(int kc, const float *a, const float *b, float *c, int ldc, int mr, int nr,
                         int add);
typedef void (*pack_fn)(const float *b, int ldb, int k0, int kc, int j0, int nr, float *dst);

__attribute__((target("avx2,fma"))) static void
block_avx2(int kc, const float *a, const float *b, float *c, int ldc, int mr, int nr, int add) {
  for (int half = 0; half < 2 && mr > 6 * half; half++)
    for (int q = 0; q < 2 && nr > 16 * q; q++) {
      int rows = mr - 6 * half, cols = nr - 16 * q;
      kernel_6x16_avx2(kc, a + 6 * half, b + 16 * q, c + (size_t)6 * half * ldc + 16 * q, ldc,
                       rows < 6 ? rows : 6, cols < 16 ? cols : 16, add);
    }
}

/* The blocking shared by both kernels: k-blocks outermost so each C element
 * sees its k terms in the same order whatever r0..r1 and n are. */
static void run_blocked(const gemm_packed *a, int r0, int r1, const float *b, int ldb, int n,
                        float *c, int ldc, int accumulate, float *scratch, pack_fn pack,
                        block_fn block) {
  int k = a->k;
  float *bp = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  for (int k0 = 0; k0 < k; k0 += GEMM_KC) {
    int kc = k - k0 < GEMM_KC ? k - k0 : GEMM_KC;
    int add = accumulate || k0 > 0;
    for (int j0 = 0; j0 < n; j0 += GEMM_NR) {
      int nr = n - j0 < GEMM_NR ? n - j0 : GEMM_NR;
      pack(b, ldb, k0, kc, j0, nr, bp);
      for (int i0 = r0; i0 < r1; i0 += GEMM_MR) {
        int mr = r1 - i0 < GEMM_MR ? r1 - i0 : GEMM_MR;
        const float *ap = a->data + (size_t)(i0 / GEMM_MR) * GEMM_MR * k + (size_t)k0 * GEMM_MR;
        block(kc, ap, bp, c + (size_t)(i0 - r0) * ldc + j0, ldc, mr, nr, add);
      }
    }
  }
}

/* The AVX-512 order for narrow products (narrow_path): B packed whole (every k, up to
 * GEMM_NARROW_N columns), then each A panel read once from its first k to its last, the panels
 * in turn, so A streams through memory in one sequential pass (its panels are contiguous). Each
 * C element still sums k-block by k-block from the first, as run_blocked does: same results. */
__attribute__((target("avx512f"))) static void run_narrow(const gemm_packed *a, int r0, int r1,
                                                          const float *b, int ldb, int n, float *c,
                                                          int ldc, int accumulate, float *scratch) {
  const int k = a->k, jpanels = (n + GEMM_NR - 1) / GEMM_NR;
  float *bp = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  for (int jp = 0; jp < jpanels; jp++) {
    int nr = n - jp * GEMM_NR < GEMM_NR ? n - jp * GEMM_NR : GEMM_NR;
    pack_b(b, ldb, 0, k, jp * GEMM_NR, nr, bp + (size_t)jp * k * GEMM_NR);
  }
  const size_t astride = (size_t)GEMM_MR * k;
  if (n <= 8) {
    const col_fn kern = col_kernels[n];
    const int group = col_panels[n] * GEMM_MR;
    for (int i0 = r0; i0 < r1; i0 += group) {
      int rows = r1 - i0 < group ? r1 - i0 : group, np = (rows + GEMM_MR - 1) / GEMM_MR;
      const float *ap = a->data + (size_t)(i0 / GEMM_MR) * astride;
      for (int k0 = 0; k0 < k; k0 += GEMM_KC) {
        int kc = k - k0 < GEMM_KC ? k - k0 : GEMM_KC;
        kern(kc, ap + (size_t)k0 * GEMM_MR, astride, np, bp + (size_t)k0 * GEMM_NR,
             c + (size_t)(i0 - r0) * ldc, ldc, rows - (np - 1) * GEMM_MR, accumulate || k0 > 0);
      }
    }
    return;
  }
  for (int i0 = r0; i0 < r1; i0 += GEMM_MR) {
    int mr = r1 - i0 < GEMM_MR ? r1 - i0 : GEMM_MR;
    const float *ap = a->data + (size_t)(i0 / GEMM_MR) * astride;
    for (int k0 = 0; k0 < k; k0 += GEMM_KC) {
      int kc = k - k0 < GEMM_KC ? k - k0 : GEMM_KC;
      for (int jp = 0; jp < jpanels; jp++) {
        int nr = n - jp * GEMM_NR < GEMM_NR ? n - jp * GEMM_NR : GEMM_NR;
        block_avx512(kc, ap + (size_t)k0 * GEMM_MR, bp + ((size_t)jp * k + k0) * GEMM_NR,
                     c + (size_t)(i0 - r0) * ldc + jp * GEMM_NR, ldc, mr, nr, accumulate || k0 > 0);
      }
    }
  }
}

/* Packs rows [k0, k0+kc) x columns [j0, j0+nr) of B as bf16 pairs: per pair of k, 32 columns
 * of (B[k][j], B[k+1][j]), zero past nr and past the last k. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void
pack_b_bf16(const float *b, int ldb, int k0, int kc, int j0, int nr, uint16_t *dst) {
  /* interleave the two converted rows: element 2j from row k, 2j+1 from row k+1 */
  static const int16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_loadu_si512(order);
  __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
  __mmask16 m1 = nr <= 16 ? 0 : nr >= 32 ? 0xffff : (__mmask16)((1u << (nr - 16)) - 1);
  for (int kk = 0; kk < kc; kk += 2) {
    const float *r0 = b + (size_t)(k0 + kk) * ldb + j0;
    const float *r1 = r0 + ldb;
    int second = kk + 1 < kc;
    for (int half = 0; half < 2; half++) {
      __mmask16 m = half ? m1 : m0;
      __m512 x0 = _mm512_maskz_loadu_ps(m, r0 + 16 * half);
      __m512 x1 = second ? _mm512_maskz_loadu_ps(m, r1 + 16 * half) : _mm512_setzero_ps();
      __m512i v = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
      _mm512_store_si512(dst + (size_t)kk / 2 * 64 + 32 * half, _mm512_permutexvar_epi16(idx, v));
    }
  }
}

/* C[mr x nr] (+)= A bf16 panel (pairs x 12 x 2) * B bf16 panel (pairs x 32 x 2), float sums. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void
kernel_bf16_12x32(int pairs, const uint16_t *a, const uint16_t *b, float *c, int ldc, int mr,
                  int nr, int add) {
  __m512 acc[GEMM_MR][2];
  for (int r = 0; r < GEMM_MR; r++)
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t *a32 = (const uint32_t *)(const void *)a;
  for (int kp = 0; kp < pairs; kp++) {
    __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 32);
    for (int r = 0; r < GEMM_MR; r++) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a32[r]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
    a32 += GEMM_MR;
    b += 64;
  }
  store_12x32(acc, c, ldc, mr, nr, add);
}

/* run_blocked's order over bf16 panels (GEMM_KC is even, so k-blocks start on a pair). */
static void run_blocked_bf16(const gemm_packed *a, int r0, int r1, const float *b, int ldb, int n,
                             float *c, int ldc, int accumulate, float *scratch) {
  const int k = a->k, pairs = (k + 1) / 2;
  uint16_t *bp = (uint16_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  for (int k0 = 0; k0 < k; k0 += GEMM_KC) {
    int kc = k - k0 < GEMM_KC ? k - k0 : GEMM_KC;
    int add = accumulate || k0 > 0;
    for (int j0 = 0; j0 < n; j0 += GEMM_NR) {
      int nr = n - j0 < GEMM_NR ? n - j0 : GEMM_NR;
      pack_b_bf16(b, ldb, k0, kc, j0, nr, bp);
      for (int i0 = r0; i0 < r1; i0 += GEMM_MR) {
        int mr = r1 - i0 < GEMM_MR ? r1 - i0 : GEMM_MR;
        const uint16_t *ap =
            a->bf16 + ((size_t)(i0 / GEMM_MR) * pairs + (size_t)k0 / 2) * GEMM_MR * 2;
        kernel_bf16_12x32((kc + 1) / 2, ap, bp, c + (size_t)(i0 - r0) * ldc + j0, ldc, mr, nr, add);
      }
    }
  }
}
#endif

const char *gemm_kernel_name(void) {
#ifdef GEMM_X86
  if (has_avx512())
    return "avx512";
  if (has_avx2())
    return "avx2";
#endif
  return "openblas";
}

void gemm_run(const gemm_packed *a, int r0, int r1, const float *b, int ldb, int n, float *c,
              int ldc, int accumulate, float *scratch) {
  if (r1 <= r0 || n <= 0)
    return;
#ifdef GEMM_X86
  if (a->bf16) {
    run_blocked_bf16(a, r0, r1, b, ldb, n, c, ldc, accumulate, scratch);
    return;
  }
  if (has_avx512()) {
    if (narrow_path(a->k, n))
      run_narrow(a, r0, r1, b, ldb, n, c, ldc, accumulate, scratch);
    else
      run_blocked(a, r0, r1, b, ldb, n, c, ldc, accumulate, scratch, pack_b, block_avx512);
    return;
  }
  if (has_avx2()) {
    run_blocked(a, r0, r1, b, ldb, n, c, ldc, accumulate, scratch, pack_b_plain, block_avx2);
    return;
  }
#endif
  (void)scratch;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, n, a->k, 1.0f,
              a->rowmajor + (size_t)r0 * a->k, a->k, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
}
