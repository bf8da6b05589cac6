/* Tests for the .npy reader/writer: round trips, every supported dtype and
 * header version, and a clear error (never a crash) for each kind of bad file. */
#include <math.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npy.h"
#include "testutil.h"

static char dir[64];
static char path[256];

static void setup(void) {
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
}

static void teardown(void) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  ck_assert_int_eq(system(cmd), 0);
}

static const char *file_path(const char *name) {
  snprintf(path, sizeof path, "%s/%s", dir, name);
  return path;
}

static void write_bytes(const char *p, const void *data, size_t len) {
  FILE *f = fopen(p, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(data, 1, len, f), len);
  ck_assert_int_eq(fclose(f), 0);
}

/* Builds an .npy file by hand: given major version, the dict text (padded to
 * 64-byte alignment with a final newline), then raw data bytes. */
static const char *make_npy(const char *name, int major, const char *dict, const void *data,
                            size_t len) {
  size_t pre = major == 1 ? 10 : 12, dl = strlen(dict);
  size_t hlen = dl + 1 + (64 - (pre + dl + 1) % 64) % 64;
  size_t total = pre + hlen + len;
  unsigned char *buf = malloc(total);
  ck_assert_ptr_nonnull(buf);
  memcpy(buf, "\x93NUMPY", 6);
  buf[6] = (unsigned char)major;
  buf[7] = 0;
  buf[8] = (unsigned char)hlen;
  buf[9] = (unsigned char)(hlen >> 8);
  if (major != 1)
    buf[10] = buf[11] = 0;
  memset(buf + pre, ' ', hlen);
  memcpy(buf + pre, dict, dl);
  buf[pre + hlen - 1] = '\n';
  if (len)
    memcpy(buf + pre + hlen, data, len);
  const char *p = file_path(name);
  write_bytes(p, buf, total);
  free(buf);
  return p;
}

/* Asserts reading fails with `code` and a message naming the file and containing `what`. */
static void expect_fail(const char *p, int code, const char *what) {
  npy_array a;
  err e = {0};
  int rc = npy_read_f32(p, &a, &e);
  ck_assert_msg(rc == code, "%s: rc %d, want %d (%s)", p, rc, code, e.msg);
  ck_assert_int_eq(e.code, code);
  ck_assert_ptr_null(a.data);
  ck_assert_msg(strstr(e.msg, p) != NULL, "message does not name the file: %s", e.msg);
  ck_assert_msg(strstr(e.msg, what) != NULL, "message lacks '%s': %s", what, e.msg);
  /* The int64 reader shares the validation. */
  static int64_t sentinel;
  int64_t *d = &sentinel;
  int64_t count = -1;
  err e2 = {0};
  ck_assert_int_eq(npy_read_i64(p, &d, &count, NULL, NULL, &e2), code);
  ck_assert_ptr_null(d);
}

static const float f6[6] = {0.0f, -1.5f, 3.25f, 1e-30f, -1e30f, 7.0f};

START_TEST(test_roundtrip) {
  float data[24];
  for (int i = 0; i < 24; i++)
    data[i] = (float)i * 0.37f - 3.0f;
  const int64_t shape[3] = {2, 3, 4};
  err e = {0};
  const char *p = file_path("a.npy");
  ck_assert_int_eq(npy_write_f32(p, data, 3, shape, &e), ERR_OK);
  npy_array a;
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_int_eq(a.ndim, 3);
  ck_assert_int_eq(a.shape[0], 2);
  ck_assert_int_eq(a.shape[1], 3);
  ck_assert_int_eq(a.shape[2], 4);
  ck_assert_int_eq(a.count, 24);
  ck_assert_mem_eq(a.data, data, sizeof data);
  npy_array_free(&a);
  ck_assert_ptr_null(a.data);
  npy_array_free(&a); /* idempotent */
  npy_array_free(NULL);

  /* No temporary file left behind. */
  char tmp[300];
  snprintf(tmp, sizeof tmp, "ls '%s' | grep -q tmp", dir);
  ck_assert_int_ne(system(tmp), 0);
}
END_TEST

/* The exact bytes numpy 1.x writes for np.save(f, np.zeros((2, 3), np.float32)). */
START_TEST(test_write_format) {
  float z[6] = {0};
  const int64_t shape[2] = {2, 3};
  err e = {0};
  const char *p = file_path("z.npy");
  ck_assert_int_eq(npy_write_f32(p, z, 2, shape, &e), ERR_OK);
  FILE *f = fopen(p, "rb");
  unsigned char buf[200];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  ck_assert_uint_eq(n, 128 + 24);
  ck_assert_mem_eq(buf, "\x93NUMPY\x01\x00\x76\x00", 10);
  const char *dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  ck_assert_mem_eq(buf + 10, dict, strlen(dict));
  for (size_t i = 10 + strlen(dict); i < 127; i++)
    ck_assert_int_eq(buf[i], ' ');
  ck_assert_int_eq(buf[127], '\n');

  /* 1-d shapes need the trailing comma, 0-d ones are (). */
  const int64_t one = 5;
  float five[5] = {1, 2, 3, 4, 5};
  ck_assert_int_eq(npy_write_f32(p, five, 1, &one, &e), ERR_OK);
  f = fopen(p, "rb");
  n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  buf[n < sizeof buf ? n : sizeof buf - 1] = '\0';
  ck_assert_ptr_nonnull(strstr((const char *)buf + 10, "'shape': (5,), }"));
  ck_assert_int_eq(npy_write_f32(p, five, 0, NULL, &e), ERR_OK);
  npy_array a;
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_int_eq(a.ndim, 0);
  ck_assert_int_eq(a.count, 1);
  ck_assert_float_eq(a.data[0], 1.0f);
  npy_array_free(&a);
}
END_TEST

START_TEST(test_empty_and_scalar) {
  err e = {0};
  npy_array a;
  const char *p = make_npy("empty.npy", 1,
                           "{'descr': '<f4', 'fortran_order': False, 'shape': "
                           "(0, 3), }",
                           NULL, 0);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_int_eq(a.count, 0);
  ck_assert_int_eq(a.ndim, 2);
  ck_assert_ptr_nonnull(a.data);
  npy_array_free(&a);
  float s = 2.5f;
  p = make_npy("scalar.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': ()}", &s, 4);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_int_eq(a.ndim, 0);
  ck_assert_int_eq(a.count, 1);
  ck_assert_float_eq(a.data[0], 2.5f);
  npy_array_free(&a);
}
END_TEST

START_TEST(test_dtypes) {
  err e = {0};
  npy_array a;
  const double d[3] = {1.0, -2.5, 1e300};
  const char *p = make_npy("f8.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
                           d, sizeof d);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_float_eq(a.data[0], 1.0f);
  ck_assert_float_eq(a.data[1], -2.5f);
  ck_assert(isinf(a.data[2]));
  npy_array_free(&a);

  const int32_t i4[4] = {0, -7, 16777217, INT32_MIN};
  p = make_npy("i4.npy", 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }", i4,
               sizeof i4);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_float_eq(a.data[1], -7.0f);
  ck_assert_float_eq(a.data[2], 16777216.0f); /* nearest float */
  npy_array_free(&a);
  int64_t *v;
  int64_t count;
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
  ck_assert_int_eq(npy_read_i64(p, &v, &count, &ndim, shape, &e), ERR_OK);
  ck_assert_int_eq(count, 4);
  ck_assert_int_eq(ndim, 2);
  ck_assert_int_eq(shape[0], 2);
  ck_assert_int_eq(v[2], 16777217);
  ck_assert_int_eq(v[3], INT32_MIN);
  free(v);

  const int64_t i8[3] = {INT64_MAX, INT64_MIN, 999};
  p = make_npy("i8.npy", 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", i8,
               sizeof i8);
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_OK);
  ck_assert_mem_eq(v, i8, sizeof i8);
  free(v);

  const unsigned char u1[3] = {0, 200, 255};
  p = make_npy("u1.npy", 1, "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", u1, 3);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_float_eq(a.data[1], 200.0f);
  ck_assert_float_eq(a.data[2], 255.0f);
  npy_array_free(&a);
  p = make_npy("i1.npy", 1, "{'descr': '|i1', 'fortran_order': False, 'shape': (3,), }", u1, 3);
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_OK);
  ck_assert_int_eq(v[1], -56);
  ck_assert_int_eq(v[2], -1);
  free(v);

  /* Integral floats read as int64; anything else is refused. */
  const float ts[3] = {999.0f, 0.0f, -4.0f};
  p = make_npy("ts.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", ts,
               sizeof ts);
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_OK);
  ck_assert_int_eq(v[0], 999);
  ck_assert_int_eq(v[2], -4);
  free(v);
  const float frac[2] = {1.0f, 1.5f};
  p = make_npy("frac.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", frac,
               sizeof frac);
  v = (int64_t *)&e;
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_FORMAT);
  ck_assert_ptr_null(v);
  ck_assert_ptr_nonnull(strstr(e.msg, "element 1"));
  const double big[1] = {0x1p63};
  p = make_npy("big.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", big,
               sizeof big);
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_FORMAT);
  const double nan[1] = {NAN};
  p = make_npy("nan.npy", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", nan,
               sizeof nan);
  ck_assert_int_eq(npy_read_i64(p, &v, &count, NULL, NULL, &e), ERR_FORMAT);
}
END_TEST

START_TEST(test_versions_and_syntax) {
  err e = {0};
  npy_array a;
  /* v2.0 and v3.0 have a 4-byte header length; dict spelling variants numpy accepts. */
  const char *p = make_npy("v2.npy", 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}",
                           f6, sizeof f6);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_mem_eq(a.data, f6, sizeof f6);
  npy_array_free(&a);
  p = make_npy("v3.npy", 3, "{\"shape\": (3, 2), \"fortran_order\": False, \"descr\": \"<f4\"}", f6,
               sizeof f6);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  ck_assert_int_eq(a.shape[0], 3);
  ck_assert_int_eq(a.shape[1], 2);
  npy_array_free(&a);
  p = make_npy("long.npy", 1, "{'descr':'<f4','fortran_order':False,'shape':(2L,3L,),}", f6,
               sizeof f6);
  ck_assert_int_eq(npy_read_f32(p, &a, &e), ERR_OK);
  npy_array_free(&a);
}
END_TEST

START_TEST(test_bad_files) {
  static const char good_dict[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }";
  const char *p;

  expect_fail(file_path("missing.npy"), ERR_IO, "cannot open");
  expect_fail(dir, ERR_IO, "not a regular file");

  p = file_path("empty.npy");
  write_bytes(p, "", 0);
  expect_fail(p, ERR_FORMAT, "bad magic");
  p = file_path("magic.npy");
  write_bytes(p, "\x93NUMPZ\x01\x00\x10\x00{}", 12);
  expect_fail(p, ERR_FORMAT, "bad magic");
  p = file_path("pre.npy");
  write_bytes(p, "\x93NUMPY\x01", 7);
  expect_fail(p, ERR_FORMAT, "preamble");
  p = file_path("pre2.npy");
  write_bytes(p, "\x93NUMPY\x02\x00\x10\x00", 10);
  expect_fail(p, ERR_FORMAT, "preamble");
  p = file_path("v9.npy");
  write_bytes(p, "\x93NUMPY\x09\x00\x10\x00{}", 12);
  expect_fail(p, ERR_UNSUPPORTED, "version 9.0");

  /* Header length pointing past the end of the file. */
  p = file_path("hdr.npy");
  write_bytes(p, "\x93NUMPY\x01\x00\x00\x10{'descr': '<f4'", 26);
  expect_fail(p, ERR_FORMAT, "past the end");
  p = file_path("hdr2.npy");
  write_bytes(p, "\x93NUMPY\x02\x00\xff\xff\xff\xff{", 13);
  expect_fail(p, ERR_FORMAT, "implausibly large");

  /* Truncated data and trailing junk. */
  p = make_npy("trunc.npy", 1, good_dict, f6, sizeof f6 - 1);
  expect_fail(p, ERR_FORMAT, "truncated file");
  p = make_npy("trunc2.npy", 1, good_dict, NULL, 0);
  expect_fail(p, ERR_FORMAT, "truncated file");
  float seven[7] = {0};
  p = make_npy("trail.npy", 1, good_dict, seven, sizeof seven);
  expect_fail(p, ERR_FORMAT, "trailing bytes");

  p = make_npy("be.npy", 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (6,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "big-endian");
  p = make_npy("fo.npy", 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "Fortran");
  p = make_npy("c8.npy", 1, "{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "'<c8' is not supported");
  p = make_npy("f2.npy", 1, "{'descr': '<f2', 'fortran_order': False, 'shape': (12,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "'<f2'");
  p = make_npy("obj.npy", 1, "{'descr': '|O', 'fortran_order': False, 'shape': (3,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "object");
  p = make_npy("rec.npy", 1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }",
               f6, sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "structured");

  p = make_npy("neg.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-6,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "negative");
  p = make_npy("ovf.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "overflows");
  p = make_npy("ovf2.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "overflows");
  /* Fits int64 but not in bytes: must not reach malloc. */
  p = make_npy("huge.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "too large");
  p = make_npy("huge2.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "truncated");
  p = make_npy("dims.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,6), }", f6,
               sizeof f6);
  expect_fail(p, ERR_UNSUPPORTED, "dimensions");

  static const char *garbage[] = {
      "",
      "garbage",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} x",
      "{'descr': '<f4' 'fortran_order': False, 'shape': (6,)}",
      "{'descr': '<f4', 'fortran_order': Fals, 'shape': (6,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': [6]}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6 2)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6.0,)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6,),,}",
      "{'descr': '<f\\x34', 'fortran_order': False, 'shape': (6,)}",
      "{descr: '<f4', 'fortran_order': False, 'shape': (6,)}",
      "{'descr': 4, 'fortran_order': False, 'shape': (6,)}",
  };
  for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; i++) {
    char name[32];
    snprintf(name, sizeof name, "garbage%zu.npy", i);
    p = make_npy(name, 1, garbage[i], f6, sizeof f6);
    expect_fail(p, ERR_FORMAT, "malformed");
  }
  p = make_npy("nottuple.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6)}", f6,
               sizeof f6);
  expect_fail(p, ERR_FORMAT, "not a tuple");
  p = make_npy("missing.npy", 1, "{'descr': '<f4', 'shape': (6,)}", f6, sizeof f6);
  expect_fail(p, ERR_FORMAT, "lacks 'fortran_order'");
  p = make_npy("extra.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x': 1}",
               f6, sizeof f6);
  expect_fail(p, ERR_FORMAT, "unexpected key 'x'");
  p = make_npy("dup.npy", 1,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), "
               "'descr': '<f4'}",
               f6, sizeof f6);
  expect_fail(p, ERR_FORMAT, "duplicate");

  /* A NUL inside the header. */
  p = make_npy("nul.npy", 1, good_dict, f6, sizeof f6);
  FILE *f = fopen(p, "r+b");
  ck_assert_ptr_nonnull(f);
  fseek(f, 20, SEEK_SET);
  fputc('\0', f);
  fclose(f);
  expect_fail(p, ERR_FORMAT, "NUL");
}
END_TEST

/* Every prefix of a valid file fails cleanly. */
START_TEST(test_every_truncation) {
  const int64_t shape[2] = {2, 3};
  err e = {0};
  const char *p = file_path("full.npy");
  ck_assert_int_eq(npy_write_f32(p, f6, 2, shape, &e), ERR_OK);
  FILE *f = fopen(p, "rb");
  unsigned char buf[256];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  ck_assert_uint_eq(n, 128 + 24);
  char cut[300];
  snprintf(cut, sizeof cut, "%s/cut.npy", dir);
  for (size_t len = 0; len < n; len++) {
    write_bytes(cut, buf, len);
    npy_array a;
    err e2 = {0};
    int rc = npy_read_f32(cut, &a, &e2);
    ck_assert_msg(rc == ERR_FORMAT, "length %zu: rc %d (%s)", len, rc, e2.msg);
    ck_assert_ptr_nonnull(strstr(e2.msg, cut));
  }
}
END_TEST

START_TEST(test_write_errors) {
  err e = {0};
  const int64_t shape[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  ck_assert_int_eq(npy_write_f32(file_path("x.npy"), f6, 9, shape, &e), ERR_INVALID);
  ck_assert_int_eq(npy_write_f32(file_path("x.npy"), f6, -1, shape, &e), ERR_INVALID);
  const int64_t neg[1] = {-1};
  ck_assert_int_eq(npy_write_f32(file_path("x.npy"), f6, 1, neg, &e), ERR_INVALID);
  const int64_t six[1] = {6};
  ck_assert_int_eq(npy_write_f32(file_path("x.npy"), NULL, 1, six, &e), ERR_INVALID);
  ck_assert_int_eq(npy_write_f32(NULL, f6, 1, six, &e), ERR_INVALID);
  ck_assert_int_eq(npy_write_f32(file_path("no/such/dir.npy"), f6, 1, six, &e), ERR_IO);
  ck_assert_ptr_nonnull(strstr(e.msg, "no/such/dir.npy"));
  ck_assert_int_eq(access(file_path("x.npy"), F_OK), -1);
  ck_assert_int_eq(npy_read_f32(NULL, NULL, &e), ERR_INVALID);
}
END_TEST

/* Uploads of a required shape: the right one parses, a wrong shape is ERR_SHAPE naming both,
 * a non-finite value and a corrupt header are the parser's errors, and nothing leaks. */
START_TEST(test_parse_shaped) {
  const float v[6] = {1, 2, 3, 4, 5, 6};
  const int64_t shape[2] = {2, 3}, other[2] = {3, 2};
  uint8_t *buf = NULL;
  size_t len = 0;
  err e = {0};
  ck_assert(npy_encode_f32(v, 2, shape, &buf, &len, &e) == 0);
  npy_array a = {0};
  ck_assert_msg(npy_parse_f32_shaped(buf, len, "maps", shape, 2, &a, &e) == 0, "%s", e.msg);
  ck_assert(a.count == 6 && a.data[5] == 6);
  npy_array_free(&a);
  ck_assert_int_eq(npy_parse_f32_shaped(buf, len, "maps", other, 2, &a, &e), ERR_SHAPE);
  ck_assert_str_eq(e.msg, "maps: shape [2, 3] where [3, 2] is needed");
  ck_assert_ptr_null(a.data);
  ck_assert_int_eq(npy_parse_f32_shaped(buf, len, "maps", shape, 1, &a, &e), ERR_SHAPE);
  free(buf);
  const float bad[2] = {1, NAN};
  const int64_t two[1] = {2};
  ck_assert(npy_encode_f32(bad, 1, two, &buf, &len, &e) == 0);
  ck_assert_int_eq(npy_parse_f32_shaped(buf, len, "maps", two, 1, &a, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "not finite"));
  ck_assert_ptr_null(a.data);
  ck_assert_int_ne(npy_parse_f32_shaped(buf, 20, "maps", two, 1, &a, &e), ERR_OK);
  free(buf);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("npy");
  TCase *tc = tcase_create("core");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_add_test(tc, test_roundtrip);
  tcase_add_test(tc, test_write_format);
  tcase_add_test(tc, test_empty_and_scalar);
  tcase_add_test(tc, test_dtypes);
  tcase_add_test(tc, test_versions_and_syntax);
  tcase_add_test(tc, test_bad_files);
  tcase_add_test(tc, test_every_truncation);
  tcase_add_test(tc, test_write_errors);
  tcase_add_test(tc, test_parse_shaped);
  suite_add_tcase(s, tc);
  return s;
}
