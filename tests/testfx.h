/* Fixture access shared by the tests that read tests/fixtures: a path under it, a float32 .npy
 * array and a model or VAE stored there (printf-style paths relative to tests/fixtures; a failure
 * fails the test, naming the path). */
#ifndef DENOISED_TESTFX_H
#define DENOISED_TESTFX_H

#include "model.h"
#include "npy.h"
#include "testutil.h"
#include "vae.h"

static inline const char *test_fx_vpath(char *buf, size_t n, const char *fmt, va_list ap) {
  char rel[512];
  vsnprintf(rel, sizeof rel, fmt, ap);
  char full[600];
  snprintf(full, sizeof full, "tests/fixtures/%s", rel);
  return test_src_path(buf, n, full);
}

static inline const char *test_fx_path(char *buf, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline const char *test_fx_path(char *buf, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  test_fx_vpath(buf, n, fmt, ap);
  va_end(ap);
  return buf;
}

static inline void test_fx_read_f32(npy_array *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static inline void test_fx_read_f32(npy_array *a, const char *fmt, ...) {
  char path[1024];
  err e = {0};
  va_list ap;
  va_start(ap, fmt);
  test_fx_vpath(path, sizeof path, fmt, ap);
  va_end(ap);
  ck_assert_msg(npy_read_f32(path, a, &e) == 0, "%s: %s", path, e.msg);
}

static inline model *test_fx_model(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline model *test_fx_model(const char *fmt, ...) {
  char path[1024];
  model *m = NULL;
  err e = {0};
  va_list ap;
  va_start(ap, fmt);
  test_fx_vpath(path, sizeof path, fmt, ap);
  va_end(ap);
  ck_assert_msg(model_load(path, &m, &e) == 0, "%s: %s", path, e.msg);
  return m;
}

static inline vae *test_fx_vae(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline vae *test_fx_vae(const char *fmt, ...) {
  char path[1024];
  vae *v = NULL;
  err e = {0};
  va_list ap;
  va_start(ap, fmt);
  test_fx_vpath(path, sizeof path, fmt, ap);
  va_end(ap);
  ck_assert_msg(vae_load(path, &v, &e) == 0, "%s: %s", path, e.msg);
  return v;
}

#endif
