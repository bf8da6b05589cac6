/* safetensors reader: dtype conversion and every malformed-file case we can
 * think of must give an error naming the problem, never a crash. */
#include <math.h>
#include <stdint.h>
#include <unistd.h>

#include "safetensors.h"
#include "testutil.h"

/* Writes an 8-byte length, the header text and `data` to a temp file. */
static const char *write_st(char *path, const char *header, const void *data, size_t len,
                            long long claimed_header_len) {
  static char dir[64];
  if (!dir[0])
    test_tmpdir(dir, sizeof dir);
  static int counter;
  sprintf(path, "%s/f%d.safetensors", dir, counter++);
  FILE *f = fopen(path, "wb");
  uint64_t n = claimed_header_len >= 0 ? (uint64_t)claimed_header_len : strlen(header);
  for (int i = 0; i < 8; i++)
    fputc((int)((n >> (8 * i)) & 0xff), f);
  fputs(header, f);
  if (len)
    fwrite(data, 1, len, f);
  fclose(f);
  return path;
}

static void expect_open_error(const char *header, const void *data, size_t len, long long claim,
                              const char *needle) {
  char path[256];
  write_st(path, header, data, len, claim);
  st_file *f = NULL;
  err e = {0};
  int rc = st_open(path, &f, &e);
  ck_assert_msg(rc != 0, "expected an error for header %s", header);
  ck_assert_ptr_null(f);
  ck_assert_msg(strstr(e.msg, needle), "error '%s' should mention '%s'", e.msg, needle);
}

START_TEST(reads_and_converts) {
  /* 1.0 and -2.0 in F32, F16 (0x3c00, 0xc000) and BF16 (0x3f80, 0xc000). */
  unsigned char data[8 + 4 + 4 + 16];
  float f32[2] = {1.0f, -2.0f};
  uint16_t f16[2] = {0x3c00, 0xc000}, bf16[2] = {0x3f80, 0xc000};
  int64_t i64[2] = {7, -3};
  memcpy(data, f32, 8);
  memcpy(data + 8, f16, 4);
  memcpy(data + 12, bf16, 4);
  memcpy(data + 16, i64, 16);
  char path[256];
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[8,12]},"
           "\"c\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[12,16]},"
           "\"d\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[16,32]},"
           "\"__metadata__\":{\"format\":\"pt\"}}",
           data, sizeof data, -1);
  st_file *f;
  err e = {0};
  ck_assert_int_eq(st_open(path, &f, &e), 0);
  ck_assert_int_eq(st_count(f), 4);
  float out[2];
  int64_t shape1[1] = {2}, shape2[2] = {1, 2};
  ck_assert_int_eq(st_read_f32(f, "a", 1, shape1, out, &e), 0);
  ck_assert_float_eq(out[1], -2.0f);
  ck_assert_int_eq(st_read_f32(f, "b", 2, shape2, out, &e), 0);
  ck_assert_float_eq(out[0], 1.0f);
  ck_assert_float_eq(out[1], -2.0f);
  ck_assert_int_eq(st_read_f32(f, "c", 1, shape1, out, &e), 0);
  ck_assert_float_eq(out[0], 1.0f);
  ck_assert_float_eq(out[1], -2.0f);
  int64_t iv[2];
  ck_assert_int_eq(st_read_i64(f, "d", iv, 2, &e), 0);
  ck_assert_int_eq(iv[1], -3);
  /* wrong shape, missing name and wrong dtype are errors that name the tensor */
  ck_assert_int_ne(st_read_f32(f, "b", 1, shape1, out, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "'b' has shape [1,2], expected [2]"));
  ck_assert_int_ne(st_read_f32(f, "zz", 1, shape1, out, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "missing tensor 'zz'"));
  ck_assert_int_ne(st_read_f32(f, "d", 1, shape1, out, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "dtype I64"));
  ck_assert_int_ne(st_read_i64(f, "a", iv, 2, &e), 0);
  st_close(f);
}
END_TEST

START_TEST(half_precision_edge_values) {
  /* subnormal 2^-24, infinity, negative zero, largest half 65504 */
  uint16_t h[4] = {0x0001, 0x7c00, 0x8000, 0x7bff};
  char path[256];
  write_st(path, "{\"h\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", h, 8, -1);
  st_file *f;
  err e = {0};
  ck_assert_int_eq(st_open(path, &f, &e), 0);
  float out[4];
  ck_assert_int_eq(st_read_f32(f, "h", 0, NULL, out, &e), 0);
  ck_assert_float_eq(out[0], 5.9604644775390625e-08f);
  ck_assert(isinf(out[1]));
  ck_assert(signbit(out[2]) && out[2] == 0.0f);
  ck_assert_float_eq(out[3], 65504.0f);
  st_close(f);
}
END_TEST

START_TEST(malformed_files) {
  char zeros[64] = {0};
  expect_open_error("{}", zeros, 0, 1000, "overruns");          /* header overrun */
  expect_open_error("{\"a\":", zeros, 0, -1, "not valid JSON"); /* truncated JSON */
  expect_open_error("[1,2]", zeros, 0, -1, "not a JSON object");
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", zeros, 8,
                    -1, "truncated"); /* data cut short */
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", zeros, 16,
                    -1, "16 bytes for 3"); /* size mismatch */
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", zeros, 4,
                    -1, "shape[0]");
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", zeros, 8,
                    -1, "bad data_offsets");
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", zeros, 8, -1, "data_offsets");
  expect_open_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                    "\"data_offsets\":[0,8]}}",
                    zeros, 8, -1, "too large");
  expect_open_error("{\"a\":1}", zeros, 0, -1, "not an object");
  /* a file shorter than the 8-byte length prefix */
  char path[256];
  write_st(path, "", NULL, 0, 0);
  FILE *fp = fopen(path, "wb");
  fputs("abc", fp);
  fclose(fp);
  st_file *f = NULL;
  err e = {0};
  ck_assert_int_ne(st_open(path, &f, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "too short"));
  ck_assert_int_ne(st_open("/nonexistent/x.safetensors", &f, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "No such file"));
}
END_TEST

START_TEST(unknown_dtype_is_reported_on_read) {
  char zeros[8] = {0}, path[256];
  write_st(path, "{\"q\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", zeros, 8, -1);
  st_file *f;
  err e = {0};
  ck_assert_int_eq(st_open(path, &f, &e), 0);
  float out[8];
  ck_assert_int_ne(st_read_f32(f, "q", 0, NULL, out, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "'q'"));
  st_close(f);
}
END_TEST

/* The writer: what it writes, the reader reads back exactly (order, shapes, metadata, empty and
 * scalar tensors). */
START_TEST(writer_round_trip) {
  char dir[64], path[128];
  test_tmpdir(dir, sizeof dir);
  snprintf(path, sizeof path, "%s/w.safetensors", dir);
  float a[6] = {1.5f, -2, 3e-38f, INFINITY, -0.0f, 7}, b[1] = {42}, c[2] = {5, 6};
  int64_t sa[2] = {2, 3}, sz[3] = {4, 0, 2}, sc[1] = {2};
  st_out_tensor t[] = {{"down_blocks.0.weight", 2, sa, a},
                       {"scalar", 0, NULL, b},
                       {"empty", 3, sz, NULL},
                       {"z.bias", 1, sc, c}};
  const char *meta[] = {"format", "pt", "step", "12"};
  err e = {0};
  ck_assert_msg(st_write_f32(path, t, 4, meta, 2, &e) == 0, "%s", e.msg);
  st_file *f = NULL;
  ck_assert_msg(st_open(path, &f, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(st_count(f), 4);
  const st_tensor_info *in = st_find(f, "down_blocks.0.weight");
  ck_assert_int_eq(in->ndim, 2);
  ck_assert_int_eq(in->shape[1], 3);
  float out[6];
  ck_assert_int_eq(st_read_f32(f, "down_blocks.0.weight", 2, sa, out, &e), 0);
  ck_assert(memcmp(out, a, sizeof a) == 0);
  ck_assert_int_eq(st_read_f32(f, "scalar", 0, NULL, out, &e), 0);
  ck_assert_float_eq(out[0], 42);
  ck_assert_int_eq(st_find(f, "empty")->count, 0);
  ck_assert_int_eq(st_find(f, "empty")->shape[0], 4);
  ck_assert_int_eq(st_read_f32(f, "z.bias", 1, sc, out, &e), 0);
  ck_assert_float_eq(out[1], 6);
  st_close(f);
  /* the header is 8-byte aligned and space-padded, as the format recommends */
  FILE *fp = fopen(path, "rb");
  unsigned char len8[8];
  ck_assert_int_eq(fread(len8, 1, 8, fp), 8);
  fclose(fp);
  ck_assert_int_eq(len8[0] % 8, 0);
  ck_assert_int_eq(st_write_f32(path, NULL, 0, NULL, 0, &e), 0); /* an empty file is valid */
  ck_assert_int_eq(st_open(path, &f, &e), 0);
  ck_assert_int_eq(st_count(f), 0);
  st_close(f);
}
END_TEST

static void expect_write_error(const st_out_tensor *t, int n, const char *const *meta, int nmeta,
                               const char *needle) {
  char dir[64], path[128];
  test_tmpdir(dir, sizeof dir);
  snprintf(path, sizeof path, "%s/bad.safetensors", dir);
  err e = {0};
  ck_assert_int_ne(st_write_f32(path, t, n, meta, nmeta, &e), 0);
  ck_assert_msg(strstr(e.msg, needle), "error '%s' should mention '%s'", e.msg, needle);
  ck_assert_int_ne(access(path, F_OK), 0); /* nothing written */
}

/* Names and shapes are checked before anything is written. */
START_TEST(writer_refuses_bad_tensors) {
  float v[4] = {0};
  int64_t s1[1] = {4}, neg[1] = {-1}, huge[2] = {INT64_MAX / 8, 1024};
  char long_name[ST_MAX_NAME + 2];
  memset(long_name, 'a', sizeof long_name - 1);
  long_name[sizeof long_name - 1] = 0;
  const char *bad_names[] = {"", "a\"b", "new\nline", "__metadata__", long_name, "\x7f", NULL};
  for (int i = 0; i < 7; i++) {
    st_out_tensor t = {bad_names[i], 1, s1, v};
    expect_write_error(&t, 1, NULL, 0, "printable ASCII");
  }
  st_out_tensor dup[2] = {{"w", 1, s1, v}, {"w", 1, s1, v}};
  expect_write_error(dup, 2, NULL, 0, "named twice");
  st_out_tensor t = {"w", 1, neg, v};
  expect_write_error(&t, 1, NULL, 0, "shape[0]");
  t = (st_out_tensor){"w", 2, huge, v};
  expect_write_error(&t, 1, NULL, 0, "too large");
  t = (st_out_tensor){"w", ST_MAX_DIMS + 1, s1, v};
  expect_write_error(&t, 1, NULL, 0, "ndim");
  t = (st_out_tensor){"w", 1, s1, NULL};
  expect_write_error(&t, 1, NULL, 0, "no data");
  t = (st_out_tensor){"w", 1, s1, v};
  const char *meta[] = {"k", "v", "k", "w"}, *badmeta[] = {"k", "\"quoted\""};
  expect_write_error(&t, 1, meta, 2, "twice");
  expect_write_error(&t, 1, badmeta, 1, "metadata value 0");
  err e = {0};
  ck_assert_int_eq(st_write_f32("/nonexistent-dir/x.safetensors", &t, 1, NULL, 0, &e), ERR_IO);
  ck_assert_ptr_nonnull(strstr(e.msg, "/nonexistent-dir"));
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("safetensors");
  TCase *tc = tcase_create("safetensors");
  tcase_add_test(tc, reads_and_converts);
  tcase_add_test(tc, half_precision_edge_values);
  tcase_add_test(tc, malformed_files);
  tcase_add_test(tc, unknown_dtype_is_reported_on_read);
  tcase_add_test(tc, writer_round_trip);
  tcase_add_test(tc, writer_refuses_bad_tensors);
  suite_add_tcase(s, tc);
  return s;
}
