/* The GEMM kernel: correct against a double-precision product, and every
 * element bit-identical however rows and columns are split between calls
 * (what makes an image's result independent of its batch). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "rng.h"
#include "testutil.h"

static void check_shape(int m, int k, int n) {
  float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n);
  float *c = malloc(sizeof(float) * m * n), *c2 = malloc(sizeof(float) * m * n);
  rng_normal(1, 0, 0, a, (size_t)m * k);
  rng_normal(1, 1, 0, b, (size_t)k * n);
  gemm_packed p;
  ck_assert_int_eq(gemm_pack_a(&p, a, m, k), 0);
  float *scratch = malloc(sizeof(float) * gemm_scratch_floats(k, n));
  gemm_run(&p, 0, m, b, n, n, c, n, 0, scratch);
  double num = 0, den = 0;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double ref = 0;
      for (int q = 0; q < k; q++)
        ref += (double)a[i * k + q] * b[q * n + j];
      num += (c[i * n + j] - ref) * (c[i * n + j] - ref);
      den += ref * ref;
    }
  ck_assert_msg(sqrt(num / den) < 1e-6, "gemm %dx%dx%d: rel err %g", m, k, n, sqrt(num / den));
  if (strcmp(gemm_kernel_name(), "openblas") != 0) {
    /* rows split at a kernel boundary, columns split anywhere */
    int rb = gemm_row_block(), rs = m > rb ? rb : 0, cs = n > 3 ? 3 : 0;
    gemm_run(&p, 0, rs, b, n, cs, c2, n, 0, scratch);
    gemm_run(&p, 0, rs, b + cs, n, n - cs, c2 + cs, n, 0, scratch);
    gemm_run(&p, rs, m, b, n, cs, c2 + (size_t)rs * n, n, 0, scratch);
    gemm_run(&p, rs, m, b + cs, n, n - cs, c2 + (size_t)rs * n + cs, n, 0, scratch);
    ck_assert_msg(memcmp(c, c2, sizeof(float) * m * n) == 0, "split changed bits at %dx%dx%d", m, k,
                  n);
  }
  /* accumulate adds onto C */
  memcpy(c2, c, sizeof(float) * m * n);
  gemm_run(&p, 0, m, b, n, n, c, n, 1, scratch);
  for (int i = 0; i < m * n; i++)
    ck_assert_float_eq_tol(c[i], 2 * c2[i], 1e-3 + 1e-5 * fabsf(c2[i]));
  gemm_packed_free(&p);
  free(a);
  free(b);
  free(c);
  free(c2);
  free(scratch);
}

START_TEST(shapes) {
  check_shape(1, 1, 1);
  check_shape(13, 7, 5);
  check_shape(24, 300, 33); /* two k-blocks, ragged columns */
  check_shape(64, 1152, 16);
  check_shape(37, 513, 100);
}
END_TEST

/* Every element is the documented sum: k-blocks of 256 from the first, each a chain of fmaf from
 * zero, added to C in turn (or stored first when not accumulating), whichever kernel and loop
 * order the shape gets (narrow products of 1-8 columns are vectorised along rows, up to 64
 * columns pack B whole, wider ones go block by block). Rows start at a kernel boundary and ldb,
 * ldc are wider than n, as in the convolutions; columns past n must stay untouched. */
static void check_order(int m, int k, int n, int accumulate) {
  const int ldb = n + 3, ldc = n + 5, rb = gemm_row_block();
  float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * ldb);
  float *c = malloc(sizeof(float) * m * ldc), *c0 = malloc(sizeof(float) * m * ldc);
  rng_normal(2, 0, 0, a, (size_t)m * k);
  rng_normal(2, 1, 0, b, (size_t)k * ldb);
  rng_normal(2, 2, 0, c0, (size_t)m * ldc);
  memcpy(c, c0, sizeof(float) * m * ldc);
  gemm_packed p;
  ck_assert_int_eq(gemm_pack_a(&p, a, m, k), 0);
  float *scratch = malloc(sizeof(float) * gemm_scratch_floats(k, n));
  const int rs = m > 2 * rb ? rb : 0;
  gemm_run(&p, 0, rs, b, ldb, n, c, ldc, accumulate, scratch);
  gemm_run(&p, rs, m, b, ldb, n, c + (size_t)rs * ldc, ldc, accumulate, scratch);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < ldc; j++) {
      float want = c0[(size_t)i * ldc + j];
      for (int k0 = 0; j < n && k0 < k; k0 += 256) {
        float s = 0;
        for (int q = k0; q < k && q < k0 + 256; q++)
          s = fmaf(a[(size_t)i * k + q], b[(size_t)q * ldb + j], s);
        want = k0 == 0 && !accumulate ? s : want + s;
      }
      ck_assert_msg(memcmp(&want, &c[(size_t)i * ldc + j], sizeof want) == 0,
                    "gemm %dx%dx%d (accumulate %d): C[%d][%d] %.9g, not the documented sum %.9g", m,
                    k, n, accumulate, i, j, c[(size_t)i * ldc + j], want);
    }
  gemm_packed_free(&p);
  free(a);
  free(b);
  free(c);
  free(c0);
  free(scratch);
}

START_TEST(order) {
  if (strcmp(gemm_kernel_name(), "openblas") == 0)
    return; /* OpenBLAS sums in its own order */
  static const int ms[] = {1, 13, 37, 64}, ks[] = {3, 256, 600},
                   ns[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64, 65};
  for (int acc = 0; acc < 2; acc++)
    for (int mi = 0; mi < 4; mi++)
      for (int ki = 0; ki < 3; ki++)
        for (int ni = 0; ni < (int)(sizeof ns / sizeof ns[0]); ni++)
          check_order(ms[mi], ks[ki], ns[ni], acc);
}
END_TEST

/* The test's own float -> bf16 -> float, round to nearest even (finite inputs). */
static double bf16_round(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u = (u + 0x7fffu + (u >> 16 & 1)) & 0xffff0000u;
  float r;
  memcpy(&r, &u, sizeof r);
  return r;
}

/* The bf16 product: each element equals the sum of the bf16-rounded inputs' exact products up to
 * float32 accumulation (k 2^-23 of sum|a'||b'|), so is within (2^-7 + 2^-16 + k 2^-23)
 * sum|a||b| of the exact product (bf16 keeps 8 significant bits: each rounding is at most 2^-8
 * relative); it is not the
 * float32 result, and splits do not change its bits. */
static void check_bf16(int m, int k, int n) {
  float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n);
  float *c = malloc(sizeof(float) * m * n), *c2 = malloc(sizeof(float) * m * n);
  float *c32 = malloc(sizeof(float) * m * n);
  rng_normal(2, 0, 0, a, (size_t)m * k);
  rng_normal(2, 1, 0, b, (size_t)k * n);
  float *scratch = malloc(sizeof(float) * gemm_scratch_floats(k, n));
  gemm_packed p;
  ck_assert_int_eq(gemm_pack_a(&p, a, m, k), 0);
  gemm_run(&p, 0, m, b, n, n, c32, n, 0, scratch);
  ck_assert_int_eq(gemm_packed_to_bf16(&p), 0);
  ck_assert_ptr_null(p.data);
  gemm_run(&p, 0, m, b, n, n, c, n, 0, scratch);
  int differs = 0;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double exact = 0, rounded = 0, mag = 0, mag_r = 0;
      for (int q = 0; q < k; q++) {
        double x = a[i * k + q], y = b[q * n + j], xr = bf16_round(a[i * k + q]);
        double yr = bf16_round(b[q * n + j]);
        exact += x * y;
        rounded += xr * yr;
        mag += fabs(x * y);
        mag_r += fabs(xr * yr);
      }
      double got = c[i * n + j], acc = k * 0x1p-23;
      ck_assert_msg(fabs(got - rounded) <= acc * mag_r + 1e-30,
                    "bf16 %dx%dx%d [%d,%d]: %g vs bf16 inputs' %g", m, k, n, i, j, got, rounded);
      ck_assert_msg(fabs(got - exact) <= (0x1p-7 + 0x1p-16 + acc) * mag,
                    "bf16 %dx%dx%d [%d,%d]: %g vs exact %g", m, k, n, i, j, got, exact);
      differs |= c[i * n + j] != c32[i * n + j];
    }
  ck_assert_msg(differs, "bf16 %dx%dx%d gave the float32 result", m, k, n);
  int rb = gemm_row_block(), rs = m > rb ? rb : 0, cs = n > 3 ? 3 : 0;
  gemm_run(&p, 0, rs, b, n, cs, c2, n, 0, scratch);
  gemm_run(&p, 0, rs, b + cs, n, n - cs, c2 + cs, n, 0, scratch);
  gemm_run(&p, rs, m, b, n, cs, c2 + (size_t)rs * n, n, 0, scratch);
  gemm_run(&p, rs, m, b + cs, n, n - cs, c2 + (size_t)rs * n + cs, n, 0, scratch);
  ck_assert_msg(memcmp(c, c2, sizeof(float) * m * n) == 0, "bf16 split changed bits");
  gemm_packed_free(&p);
  free(a);
  free(b);
  free(c);
  free(c2);
  free(c32);
  free(scratch);
}

START_TEST(bf16) {
  const char *off = getenv("DENOISED_NO_BF16");
  if (off && *off && *off != '0') {
    /* the pretended-absent CPU feature: refused, the float32 pack left as it was */
    float a[6] = {1, 2, 3, 4, 5, 6};
    gemm_packed p;
    ck_assert_int_eq(gemm_pack_a(&p, a, 2, 3), 0);
    float *data = p.data;
    ck_assert_int_eq(gemm_bf16_available(), 0);
    ck_assert_int_eq(gemm_packed_to_bf16(&p), -1);
    ck_assert_ptr_eq(p.data, data);
    ck_assert_ptr_null(p.bf16);
    gemm_packed_free(&p);
    return;
  }
  if (!gemm_bf16_available())
    return; /* no AVX512-BF16 here: the refusal is tested by test_gemm_nobf16 */
  check_bf16(1, 1, 1);
  check_bf16(13, 7, 5);     /* odd k: the last pair padded */
  check_bf16(24, 300, 33);  /* two k-blocks, the second odd-sized; ragged columns */
  check_bf16(37, 513, 100); /* three k-blocks, odd k */
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("gemm");
  TCase *tc = tcase_create("gemm");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, shapes);
  tcase_add_test(tc, order);
  tcase_add_test(tc, bf16);
  suite_add_tcase(s, tc);
  return s;
}
