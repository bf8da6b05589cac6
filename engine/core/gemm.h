/* Single-precision matrix multiply for the ops: C = A * B (+ C), row-major.
 * Each element of C is accumulated over k in one fixed order whatever the
 * matrix sizes, blocking or thread count, so an image's result never depends
 * on what it was batched with. AVX-512 or AVX2 kernels; OpenBLAS otherwise. */
#ifndef DENOISED_GEMM_H
#define DENOISED_GEMM_H

#include <stddef.h>

#include <stdint.h>

/* A, packed once (weights at load time) into the kernel's panel layout. */
typedef struct gemm_packed {
  int m, k;
  float *data;           /* owned, 64-byte aligned; NULL once converted to bf16 */
  const float *rowmajor; /* the unpacked source, for the fallback path */
  uint16_t *bf16;        /* owned: the bf16 panels after gemm_packed_to_bf16, else NULL */
} gemm_packed;

/* "avx512", "avx2" (both bit-identical across splits) or "openblas". Setting
 * DENOISED_NO_AVX512=1 / DENOISED_NO_AVX2=1 in the environment skips a tier. */
const char *gemm_kernel_name(void);

/* Packs a row-major m x k matrix (lda = k). Returns 0, or -1 when out of memory. */
int gemm_pack_a(gemm_packed *p, const float *a, int m, int k);
void gemm_packed_free(gemm_packed *p);

/* Whether this CPU multiplies bf16 (AVX512-BF16, VDPBF16PS); DENOISED_NO_BF16=1 in the
 * environment pretends it does not (to test the refusal). */
int gemm_bf16_available(void);
/* Rounds a packed A to bf16 (nearest even) in place of its float copy, halving its memory;
 * gemm_run then multiplies in bf16 with float32 accumulation: each product of two bf16 numbers
 * is exact, so an element of C is within (2^-7 + 2^-16 + k 2^-23) sum|a||b| of the exact
 * result (bf16 keeps 8 significant bits). Needs gemm_bf16_available(). Returns 0, or -1 when out of
 * memory or unavailable (then p is unchanged). */
int gemm_packed_to_bf16(gemm_packed *p);

/* Rows r0..r1 of C = A * B[k x n] (ldb) + (accumulate ? C : 0), where c
 * points at row r0 of C (ldc). r0 must be a multiple of gemm_row_block().
 * Single threaded; callers split the work. Scratch: gemm_scratch_floats(). */
void gemm_run(const gemm_packed *a, int r0, int r1, const float *b, int ldb, int n, float *c,
              int ldc, int accumulate, float *scratch);

size_t gemm_scratch_floats(int k, int n);
int gemm_row_block(void);

#endif
