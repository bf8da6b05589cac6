/* Single-precision matrix multiply for the ops: C = A * B (+ C), row-major.
 * Each element of C is accumulated over k in one fixed order whatever the
 * matrix sizes, blocking or thread count, so an image's result never depends
 * on what it was batched with. AVX-512 or AVX2 kernels; OpenBLAS otherwise. */
#ifndef DENOISED_GEMM_H
#define DENOISED_GEMM_H

#include <stddef.h>

/* A, packed once (weights at load time) into the kernel's panel layout. */
typedef struct gemm_packed {
  int m, k;
  float *data;           /* owned, 64-byte aligned */
  const float *rowmajor; /* the unpacked source, for the fallback path */
} gemm_packed;

/* "avx512", "avx2" (both bit-identical across splits) or "openblas". Setting
 * DENOISED_NO_AVX512=1 / DENOISED_NO_AVX2=1 in the environment skips a tier. */
const char *gemm_kernel_name(void);

/* Packs a row-major m x k matrix (lda = k). Returns 0, or -1 when out of memory. */
int gemm_pack_a(gemm_packed *p, const float *a, int m, int k);
void gemm_packed_free(gemm_packed *p);

/* Rows r0..r1 of C = A * B[k x n] (ldb) + (accumulate ? C : 0), where c
 * points at row r0 of C (ldc). r0 must be a multiple of gemm_row_block().
 * Single threaded; callers split the work. Scratch: gemm_scratch_floats(). */
void gemm_run(const gemm_packed *a, int r0, int r1, const float *b, int ldb, int n, float *c,
              int ldc, int accumulate, float *scratch);

size_t gemm_scratch_floats(int k, int n);
int gemm_row_block(void);

#endif
