/* Helpers shared by the tests: where the source tree and CLI binary are, and
 * scratch directories. */
#ifndef DENOISED_TESTUTIL_H
#define DENOISED_TESTUTIL_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

Suite *test_suite(void);

/* Path under the source tree (DENOISED_SOURCE_DIR, set by ctest). */
static inline const char *test_src_path(char *buf, size_t n, const char *rel) {
  const char *root = getenv("DENOISED_SOURCE_DIR");
  snprintf(buf, n, "%s/%s", root ? root : DENOISED_SOURCE_DIR_DEFAULT, rel);
  return buf;
}

/* The denoised binary under test (DENOISED_BIN, set by ctest). */
static inline const char *test_bin(void) {
  const char *bin = getenv("DENOISED_BIN");
  return bin ? bin : DENOISED_BIN_DEFAULT;
}

/* A fresh scratch directory for this test; template must end in XXXXXX. */
static inline const char *test_tmpdir(char *buf, size_t n) {
  snprintf(buf, n, "/tmp/denoised-test-XXXXXX");
  return mkdtemp(buf);
}

/* Relative L2 error ||a - b|| / ||b||. */
static inline double test_rel_l2(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den > 0 ? __builtin_sqrt(num / den) : __builtin_sqrt(num);
}

#endif
