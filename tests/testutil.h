/* Helpers shared by the tests: where the source tree and CLI binary are, and
 * scratch directories. */
#ifndef DENOISED_TESTUTIL_H
#define DENOISED_TESTUTIL_H

#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

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

/* Runs the denoised binary with printf-style arguments, capturing stdout and
 * stderr into out; returns the exit status (-1 if it did not exit). */
static inline int test_run_cli(char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline int test_run_cli(char *out, size_t outlen, const char *fmt, ...) {
  char line[4096], cmd[4400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  snprintf(cmd, sizeof cmd, "%s %s 2>&1", test_bin(), line);
  FILE *p = popen(cmd, "r");
  ck_assert_ptr_nonnull(p);
  size_t n = fread(out, 1, outlen - 1, p);
  out[n] = 0;
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* 1 when two files have the same bytes. */
static inline int test_files_equal(const char *a, const char *b) {
  FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
  int eq = fa && fb;
  while (eq) {
    int ca = fgetc(fa), cb = fgetc(fb);
    eq = ca == cb;
    if (ca == EOF || cb == EOF)
      break;
  }
  if (fa)
    fclose(fa);
  if (fb)
    fclose(fb);
  return eq;
}

#endif
