/* Helpers shared by the tests: where the source tree and CLI binary are, and
 * scratch directories. */
#ifndef DENOISED_TESTUTIL_H
#define DENOISED_TESTUTIL_H

#include <check.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <zlib.h>

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

/* Seconds on the monotonic clock, for the timings some tests print. */
static inline double test_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
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

/* A w x h all-black RGB PNG whose one zlib stream goes on past the scanlines with `segments` x
 * 16 MiB of compressed zeros (about 16 KB each), then ends properly (adler32 included): what a
 * decoder that inflates trailing data pays for. Built with full flushes, so one segment's bytes
 * are repeated rather than deflating gigabytes here. */
static inline void test_put_chunk(uint8_t **png, size_t *len, const char *type, const uint8_t *d,
                                  size_t n) {
  uint8_t *p = realloc(*png, *len + n + 12);
  ck_assert_ptr_nonnull(p);
  uint8_t *c = p + *len;
  for (int k = 0; k < 4; k++)
    c[k] = (uint8_t)(n >> (24 - 8 * k));
  memcpy(c + 4, type, 4);
  if (n)
    memcpy(c + 8, d, n);
  const uLong crc = crc32(crc32(0, (const Bytef *)type, 4), d ? d : (const Bytef *)"", (uInt)n);
  for (int k = 0; k < 4; k++)
    c[8 + n + (size_t)k] = (uint8_t)(crc >> (24 - 8 * k));
  *png = p;
  *len += n + 12;
}

static inline uint8_t *test_trailing_png(uint32_t w, uint32_t h, int segments, size_t *len) {
  const size_t raw = (size_t)h * (1 + 3 * (size_t)w), seg_in = (size_t)16 << 20;
  uint8_t *zeros = calloc(seg_in > raw ? seg_in : raw, 1);
  const size_t cap = raw + 65536;
  uint8_t *head = malloc(cap), *seg = malloc(cap);
  z_stream z = {0};
  ck_assert_int_eq(deflateInit(&z, 9), Z_OK);
  z.next_in = zeros;
  z.avail_in = (uInt)raw;
  z.next_out = head;
  z.avail_out = (uInt)cap;
  ck_assert_int_eq(deflate(&z, Z_FULL_FLUSH), Z_OK);
  const size_t head_n = cap - z.avail_out;
  z.next_in = zeros;
  z.avail_in = (uInt)seg_in;
  z.next_out = seg;
  z.avail_out = (uInt)cap;
  ck_assert_int_eq(deflate(&z, Z_FULL_FLUSH), Z_OK);
  ck_assert_uint_eq(z.avail_in, 0);
  const size_t seg_n = cap - z.avail_out;
  deflateEnd(&z);
  uLong adler = adler32(1, zeros, (uInt)raw);
  const uLong seg_adler = adler32(1, zeros, (uInt)seg_in);
  size_t zn = head_n + (size_t)segments * seg_n + 6;
  uint8_t *zs = malloc(zn), *o = zs;
  memcpy(o, head, head_n);
  o += head_n;
  for (int i = 0; i < segments; i++, o += seg_n) {
    memcpy(o, seg, seg_n);
    adler = adler32_combine(adler, seg_adler, (z_off_t)seg_in);
  }
  *o++ = 0x03; /* an empty final block with fixed codes */
  *o++ = 0x00;
  for (int k = 0; k < 4; k++)
    *o++ = (uint8_t)(adler >> (24 - 8 * k));
  uint8_t ihdr[13] = {0};
  for (int k = 0; k < 4; k++) {
    ihdr[k] = (uint8_t)(w >> (24 - 8 * k));
    ihdr[4 + k] = (uint8_t)(h >> (24 - 8 * k));
  }
  ihdr[8] = 8; /* 8-bit RGB, not interlaced */
  ihdr[9] = 2;
  uint8_t *png = malloc(8);
  memcpy(png, "\x89PNG\r\n\x1a\n", 8);
  *len = 8;
  test_put_chunk(&png, len, "IHDR", ihdr, 13);
  for (size_t at = 0; at < zn; at += 1 << 20) /* IDATs of 1 MiB, as encoders split them */
    test_put_chunk(&png, len, "IDAT", zs + at, zn - at < (1 << 20) ? zn - at : 1 << 20);
  test_put_chunk(&png, len, "IEND", NULL, 0);
  free(zeros);
  free(head);
  free(seg);
  free(zs);
  return png;
}

/* CPU seconds (user + system) this process has used. */
static inline double test_cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

#endif
