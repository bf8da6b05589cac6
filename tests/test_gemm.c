/* The GEMM kernel: correct against a double-precision product, and every
 * element bit-identical however rows and columns are split between calls
 * (what makes an image's result independent of its batch). */
#include <math.h>

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

Suite *test_suite(void) {
  Suite *s = suite_create("gemm");
  TCase *tc = tcase_create("gemm");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, shapes);
  suite_add_tcase(s, tc);
  return s;
}
