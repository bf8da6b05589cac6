/* The JSON contract against hostile input: the strict number parser, UTF-8 in error messages,
 * range-checked integer fields (A1111 'steps: 2.13e58'), .npy headers that must be refused with
 * the field named, nullable fields, A1111 field names in messages, the null class, and a SIGHUP
 * whose key reload fails. */
#include "api.h"
#include "testhttp.h"

START_TEST(canonical_numbers_only) {
  struct {
    const char *text;
    unsigned long long max, want;
  } ok[] = {{"0", 5, 0},
            {"7", 7, 7},
            {"100", 100, 100},
            {"0", 0, 0},
            {"18446744073709551615", UINT64_MAX, UINT64_MAX}};
  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
    unsigned long long v = 12345;
    ck_assert_msg(api_parse_uint(ok[i].text, ok[i].max, &v) == 0, "'%s' refused", ok[i].text);
    ck_assert_uint_eq(v, ok[i].want);
  }
  struct {
    const char *text;
    unsigned long long max;
  } bad[] = {{"", 9},
             {"+1", 9},
             {"-1", 9},
             {" 1", 9},
             {"1 ", 9},
             {"\t1", 9},
             {"01", 9},
             {"00", 9},
             {"1a", 9},
             {"0x1", 9},
             {"1.0", 9},
             {"%00", 9},
             {"1e2", 999},
             {"101", 100},
             {"1", 0},
             {"5", 0},
             {"18446744073709551616", UINT64_MAX},
             {"99999999999999999999999", UINT64_MAX}};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    unsigned long long v = 12345;
    ck_assert_msg(api_parse_uint(bad[i].text, bad[i].max, &v) != 0, "'%s' accepted", bad[i].text);
    ck_assert_uint_eq(v, 12345);
  }
  ck_assert_int_ne(api_parse_uint(NULL, 9, &(unsigned long long){0}), 0);
}
END_TEST

/* Every ill-formed UTF-8 sequence in a message or field becomes '?' byte by byte, well-formed
 * text stays, and the error always encodes as JSON with its field. */
START_TEST(error_messages_are_utf8) {
  struct {
    const char *in, *out;
  } cases[] = {
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9d\x84\x9e", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9d\x84\x9e"},
      {"\xed\x9f\xbf \xee\x80\x80 \xf4\x8f\xbf\xbf", "\xed\x9f\xbf \xee\x80\x80 \xf4\x8f\xbf\xbf"},
      {"<f\xf5", "<f?"},              /* F5-FF never start a sequence */
      {"a\xf5\x80\x80\x80", "a????"}, /* not even with continuation bytes after it */
      {"\xf7\xbf\xbf\xbf", "????"},   /* what the old check let through */
      {"\xff\xfe", "??"},             /* */
      {"\xc0\x80", "??"},             /* overlong NUL */
      {"\xc1\xbf", "??"},             /* overlong 0x7f */
      {"\xe0\x80\x80", "???"},        /* overlong 3-byte */
      {"\xe0\x9f\xbf", "???"},        /* overlong 3-byte, top */
      {"\xf0\x80\x80\x80", "????"},   /* overlong 4-byte */
      {"\xf0\x8f\xbf\xbf", "????"},   /* overlong 4-byte, top */
      {"\xed\xa0\x80", "???"},        /* high surrogate */
      {"\xed\xbf\xbf", "???"},        /* low surrogate */
      {"\xf4\x90\x80\x80", "????"},   /* above U+10FFFF */
      {"x\xe2\x82", "x??"},           /* cut at the end */
      {"\xe2\x82y", "??y"},           /* cut in the middle */
      {"\xf0\x9d\x84", "???"},        /* 4-byte cut */
      {"\x80\xbf", "??"},             /* stray continuation bytes */
      {"\xc3", "?"},                  /* lone lead byte */
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    api_error e = {0};
    char field[64];
    snprintf(field, sizeof field, "edit.%s", cases[i].in);
    ck_assert_int_eq(api_fail(&e, 400, "invalid_field", field, "%s: %s", field, cases[i].in), 400);
    char want[256];
    snprintf(want, sizeof want, "edit.%s: %s", cases[i].out, cases[i].out);
    ck_assert_msg(strcmp(e.message, want) == 0, "case %zu: '%s', wanted '%s'", i, e.message, want);
    json_t *j = api_error_json(&e);
    ck_assert_msg(j != NULL, "case %zu: the error is not encodable", i);
    const char *f = json_string_value(json_object_get(json_object_get(j, "error"), "field"));
    ck_assert_msg(f && strncmp(f, "edit.", 5) == 0, "case %zu: no field", i);
    json_decref(j);
  }
  /* a message cut by its buffer in the middle of a character */
  char longer[600];
  memset(longer, 'a', sizeof longer);
  for (size_t k = 0; k + 3 < sizeof longer; k += 3)
    memcpy(longer + k, "\xe2\x82\xac", 3);
  longer[sizeof longer - 1] = 0;
  for (int shift = 0; shift < 3; shift++) {
    api_error e = {0};
    api_fail(&e, 400, "invalid_field", "f", "%.*s%s", shift, "xx", longer);
    json_t *j = api_error_json(&e);
    ck_assert_msg(j != NULL, "a message cut mid-character is not encodable (shift %d)", shift);
    json_decref(j);
  }
}
END_TEST

/* A .npy of float32 zeros with the header dict text as given (padded as numpy pads it). */
static char *npy_b64(const char *dict, size_t count) {
  size_t dl = strlen(dict), hl = (10 + dl + 1 + 63) / 64 * 64 - 10;
  size_t n = 10 + hl + count * 4;
  uint8_t *b = calloc(n, 1);
  memcpy(b, "\x93NUMPY\x01\x00", 8);
  b[8] = (uint8_t)(hl & 0xff);
  b[9] = (uint8_t)(hl >> 8);
  memset(b + 10, ' ', hl);
  memcpy(b + 10, dict, dl);
  b[10 + hl - 1] = '\n';
  char *s = base64_encode(b, n);
  free(b);
  return s;
}

#define NOISE_JOB                                                                                  \
  "{\"class_label\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": 4}, \"edit\": "             \
  "{\"type\": \"invert_ddpm\", \"noise\": \"%s\"}}"
#define NOISE_COUNT (5 * 3 * 32 * 32) /* (1, steps + 1, 3, 32, 32) */

/* A .npy header the parser must refuse is a 400 naming edit.noise, whatever byte is wrong. */
static void expect_noise_error(const daemon_proc *d, const char *dict, size_t count,
                               const char *says) {
  char *b64 = npy_b64(dict, count);
  size_t cap = strlen(b64) + 256;
  char *body = malloc(cap);
  snprintf(body, cap, NOISE_JOB, b64);
  http_resp r;
  http_req(d, "POST", "/v1/jobs", body, strlen(body), NULL, &r);
  ck_assert_msg(r.status == 400, "%s: status %ld: %s", dict, r.status, r.body);
  json_t *j = http_json(&r), *e = json_object_get(j, "error");
  const char *field = json_string_value(json_object_get(e, "field"));
  const char *msg = json_string_value(json_object_get(e, "message"));
  ck_assert_msg(field && strcmp(field, "edit.noise") == 0, "%s: field %s", dict, r.body);
  ck_assert_msg(!says || strstr(msg, says), "%s: message '%s' does not say '%s'", dict, msg, says);
  json_decref(j);
  http_free(&r);
  free(body);
  free(b64);
}

START_TEST(npy_headers_are_refused_by_field) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  const char *good = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }";
  char *b64 = npy_b64(good, NOISE_COUNT);
  char *body = malloc(strlen(b64) + 256);
  sprintf(body, NOISE_JOB, b64);
  http_resp r;
  http_post(&d, "/v1/jobs", body, &r);
  ck_assert_msg(r.status == 202, "the well-formed noise: %ld %s", r.status, r.body);
  http_free(&r);
  struct {
    const char *dict, *says;
  } cases[] = {
      {"{'descr': '<f5', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }", "'<f5'"},
      {"{'descr': '<f\xf5', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }", "<f\\xf5"},
      {"{'descr': '<\xed\xa0\x80', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }",
       "<\\xed\\xa0\\x80"},
      {"{'descr': '\xc0\x80', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }", "\\xc0"},
      {"{'d\xe0\x80\x80scr': '<f4', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }",
       "unexpected key"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 5, 3, 32, \xf0\x9f), }", NULL},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, -5, 3, 32, 32), }", "negative"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (15360), }", "not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 5, 3, 16, 64), }", "shape"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 999999), }",
       NULL},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 99999999999999999999), }",
       "overflows"},
      {"{'descr': '<f4', 'fortran_order': True, 'shape': (1, 5, 3, 32, 32), }", "Fortran"},
      {"{'descr': '>f4', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }", "big-endian"},
      {"{'descr': '|O', 'fortran_order': False, 'shape': (1, 5, 3, 32, 32), }", "pickles"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    expect_noise_error(&d, cases[i].dict, NOISE_COUNT, cases[i].says);
  /* any header byte replaced by a byte that cannot be there: a 400 naming the field each time */
  const unsigned char subs[] = {0xf5, 0xff, 0xc0, 0xed, 0x80};
  char dict[128];
  for (size_t pos = 0; pos < strlen(good); pos++)
    for (size_t k = 0; k < sizeof subs; k++) {
      snprintf(dict, sizeof dict, "%s", good);
      dict[pos] = (char)subs[k];
      expect_noise_error(&d, dict, NOISE_COUNT, NULL);
    }
  free(body);
  free(b64);
  daemon_stop(&d);
}
END_TEST

/* Numeric fields are range-checked before any conversion (the A1111 route takes 20.0 for 20). */
START_TEST(numbers_in_bodies_are_range_checked) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  const char *fields[] = {"steps", "seed", "batch_size", "n_iter", "width", "height"};
  const char *values[] = {"2.13e58", "-2.13e58", "1e19", "9.3e18", "-9.3e18", "1e300"};
  for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
    for (size_t k = 0; k < sizeof values / sizeof *values; k++) {
      char body[256];
      snprintf(body, sizeof body, "{\"prompt\": \"2\", \"%s\": %s}", fields[i], values[k]);
      expect_error(&d, "POST", "/sdapi/v1/txt2img", body, 400, "out_of_range", fields[i]);
    }
  http_resp r;
  http_post(&d, "/sdapi/v1/txt2img", "{\"prompt\": \"2\", \"steps\": 2.13e58}", &r);
  ck_assert_ptr_nonnull(strstr(r.body, "steps: 2.13e+58 is out of range [1, 1000]"));
  http_free(&r);
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"2\", \"steps\": 2.5}", 400,
               "wrong_type", "steps");
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/txt2img", "{\"prompt\": \"2\", \"steps\": 3.0}", &r),
                   200);
  http_free(&r);
  const char *native[] = {"{\"class_label\": 2, \"scheduler\": {\"steps\": 2.13e58}}",
                          "{\"class_label\": 2, \"seed\": 2.13e58}",
                          "{\"class_label\": 2, \"batch_size\": -2.13e58}",
                          "{\"class_label\": 2, \"first_image\": 1e300}"};
  const char *nfield[] = {"scheduler.steps", "seed", "batch_size", "first_image"};
  for (size_t i = 0; i < sizeof native / sizeof *native; i++)
    expect_error(&d, "POST", "/v1/jobs", native[i], 400, "wrong_type", nfield[i]);
  daemon_stop(&d);
}
END_TEST

/* model: null is the default model as other nullable fields are their defaults; A1111 errors
 * say their field names; the null class is not a class_label. */
START_TEST(small_inconsistencies) {
  char st[512], glyphs[1024], gm[1100], shapes[1024], sm[1100];
  test_src_path(glyphs, sizeof glyphs, "models/glyphs32");
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  snprintf(gm, sizeof gm, "glyphs=%s", glyphs);
  snprintf(sm, sizeof sm, "default=%s", shapes);
  daemon_proc d;
  const char *args[] = {"--model", sm, "--model", gm, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64];
  submit_job(&d, "{\"model\": null, \"class_label\": 2, \"scheduler\": {\"steps\": 3}}", id,
             sizeof id);
  http_resp r;
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_get(&d, path, &r);
  ck_assert_ptr_nonnull(strstr(r.body, "\"model\":\"default\""));
  http_free(&r);
  expect_error(&d, "POST", "/v1/jobs", "{\"model\": 3, \"class_label\": 2}", 400, "wrong_type",
               "model");
  /* glyphs32 names 36 classes; 36 is its null class */
  expect_error(&d, "POST", "/v1/jobs", "{\"model\": \"glyphs\", \"class_label\": 36}", 400,
               "out_of_range", "class_label");
  submit_job(&d, "{\"model\": \"glyphs\", \"class_label\": 35, \"scheduler\": {\"steps\": 2}}", id,
             sizeof id);
  submit_job(&d,
             "{\"model\": \"glyphs\", \"class_label\": 3, \"scheduler\": {\"steps\": 2}, "
             "\"guidance\": {\"scale\": 2, \"null_class\": 36}}",
             id, sizeof id);
  /* the A1111 route: errors name their fields, in the message too */
  struct {
    const char *body, *field;
  } a1111[] = {
      {"{\"prompt\": \"zzz\"}", "prompt"},
      {"{\"prompt\": \"36\", \"override_settings\": {\"sd_model_checkpoint\": \"glyphs\"}}",
       "prompt"},
      {"{\"prompt\": \"2\", \"eta\": -5}", "eta"},
      {"{\"prompt\": \"2\", \"override_settings\": {\"sd_model_checkpoint\": \"nope\"}}",
       "override_settings.sd_model_checkpoint"},
      {"{\"prompt\": \"2\", \"steps\": 0}", "steps"},
  };
  for (size_t i = 0; i < sizeof a1111 / sizeof *a1111; i++) {
    http_post(&d, "/sdapi/v1/txt2img", a1111[i].body, &r);
    ck_assert_msg(r.status == 400, "%s: %ld", a1111[i].body, r.status);
    json_t *j = http_json(&r), *e = json_object_get(j, "error");
    const char *f = json_string_value(json_object_get(e, "field"));
    const char *m = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(f && strcmp(f, a1111[i].field) == 0, "%s: %s", a1111[i].body, r.body);
    ck_assert_msg(
        strncmp(m, a1111[i].field, strlen(a1111[i].field)) == 0 && m[strlen(a1111[i].field)] == ':',
        "%s: the message does not start with '%s:': %s", a1111[i].body, a1111[i].field, m);
    json_decref(j);
    http_free(&r);
  }
  daemon_stop(&d);
}
END_TEST

/* A SIGHUP whose API keys cannot be read says so and does not claim to have reloaded them. */
START_TEST(failed_key_reload_is_reported) {
  char st[512], tmp[256], keys[300];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(keys, sizeof keys, "%s/keys", tmp);
  FILE *f = fopen(keys, "w");
  fprintf(f, "alice %s\n", "k-0123456789abcdef0123456789");
  fclose(f);
  daemon_proc d;
  const char *args[] = {"--api-keys-file", keys, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  f = fopen(keys, "w");
  fprintf(f, "alice %s bogus-scope\n", "k-0123456789abcdef0123456789");
  fclose(f);
  kill(d.pid, SIGHUP);
  for (double t0 = th_now(); th_now() - t0 < 10 && !daemon_log_count(&d, "API keys not changed");)
    usleep(20000);
  ck_assert_int_eq(daemon_log_count(&d, "API keys not changed"), 1);
  ck_assert_int_eq(daemon_log_count(&d, "unknown scope 'bogus-scope'"), 1);
  ck_assert_int_eq(daemon_log_count(&d, "msg=reloaded"), 0);
  ck_assert_int_eq(daemon_log_count(&d, "msg=\"reloaded"), 0);
  const char *hdr[] = {"Authorization: Bearer k-0123456789abcdef0123456789", NULL};
  http_resp r;
  ck_assert_int_eq(http_req(&d, "GET", "/v1/jobs", NULL, 0, hdr, &r), 200); /* the old keys */
  http_free(&r);
  f = fopen(keys, "w");
  fprintf(f, "alice %s read\n", "k-0123456789abcdef0123456789");
  fclose(f);
  kill(d.pid, SIGHUP);
  for (double t0 = th_now(); th_now() - t0 < 10 && !daemon_log_count(&d, "reloaded");)
    usleep(20000);
  ck_assert_int_eq(daemon_log_count(&d, "reloaded"), 1);
  daemon_stop(&d);
}
END_TEST

/* A SIGTERM that arrives while a SIGHUP reload runs still stops the daemon gracefully: the
 * main thread is not in sigwait then, and the kernel gave the signal to a library's thread
 * (OpenBLAS's pool), whose default action killed the process (exit 143). */
START_TEST(sigterm_during_reload_stops_gracefully) {
  char st[512];
  for (int round = 0; round < 3; round++) {
    daemon_proc d;
    ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
    kill(d.pid, SIGHUP);
    usleep(2000 * round);
    ck_assert_int_eq(daemon_signal_wait(&d, SIGTERM, 30), 0);
    ck_assert_int_eq(daemon_log_count(&d, "msg=stopped"), 1);
  }
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("api");
  TCase *tc = tcase_create("api");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, canonical_numbers_only);
  tcase_add_test(tc, error_messages_are_utf8);
  tcase_add_test(tc, npy_headers_are_refused_by_field);
  tcase_add_test(tc, numbers_in_bodies_are_range_checked);
  tcase_add_test(tc, small_inconsistencies);
  tcase_add_test(tc, failed_key_reload_is_reported);
  tcase_add_test(tc, sigterm_during_reload_stops_gracefully);
  suite_add_tcase(s, tc);
  return s;
}
