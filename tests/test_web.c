/* What the daemon does for browsers (issue 20): the files built into it (web UI, /docs,
 * /openapi.yaml), the 204 that ends an EventSource after the final event, and the short-lived
 * URL tokens that let <img> and EventSource load a job's results under API keys. */
#include "../server/internal.h"
#include "testhttp.h"

#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

/* RFC 4231 test cases 1, 2 and 6 (a key longer than a block) */
START_TEST(hmac_sha256_vectors) {
  uint8_t key1[20], key6[131], mac[32];
  memset(key1, 0x0b, sizeof key1);
  memset(key6, 0xaa, sizeof key6);
  const struct {
    const uint8_t *key;
    size_t klen;
    const char *msg, *hex;
  } v[] = {
      {key1, 20, "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
      {(const uint8_t *)"Jefe", 4, "what do ya want for nothing?",
       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
      {key6, 131, "Test Using Larger Than Block-Size Key - Hash Key First",
       "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
  };
  for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
    token_hmac_sha256(v[i].key, v[i].klen, v[i].msg, strlen(v[i].msg), mac);
    char hex[65];
    for (int b = 0; b < 32; b++)
      snprintf(hex + 2 * b, 3, "%02x", mac[b]);
    ck_assert_str_eq(hex, v[i].hex);
  }
}
END_TEST

START_TEST(static_files_and_docs) {
  char st[512], spec[1024];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  http_resp r;
  /* the spec served is the file, byte for byte */
  ck_assert_int_eq(http_get(&d, "/openapi.yaml", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.ctype, "application/yaml"));
  size_t len = 0;
  uint8_t *file = read_file_all(test_src_path(spec, sizeof spec, "openapi.yaml"), &len);
  ck_assert_uint_eq(r.len, len);
  ck_assert_int_eq(memcmp(r.body, file, len), 0);
  free(file);
  http_free(&r);
  /* the pages, their scripts, and a policy that loads nothing from elsewhere */
  const char *pages[][2] = {{"/", "text/html"},
                            {"/docs", "text/html"},
                            {"/ui/app.js", "text/javascript"},
                            {"/ui/docs.js", "text/javascript"},
                            {"/ui/style.css", "text/css"},
                            {"/ui/vendor/js-yaml.min.js", "text/javascript"}};
  for (size_t i = 0; i < sizeof pages / sizeof *pages; i++) {
    ck_assert_msg(http_get(&d, pages[i][0], &r) == 200, "%s: %ld", pages[i][0], r.status);
    ck_assert_msg(strstr(r.ctype, pages[i][1]) != NULL, "%s: %s", pages[i][0], r.ctype);
    char csp[512];
    ck_assert_ptr_nonnull(http_header(&r, "Content-Security-Policy", csp, sizeof csp));
    ck_assert_ptr_nonnull(strstr(csp, "default-src 'self'"));
    http_free(&r);
  }
  ck_assert_int_eq(http_get(&d, "/docs", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "/ui/docs.js"));
  ck_assert_ptr_null(strstr(r.body, "http")); /* nothing from the network */
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "/ui/app.js"));
  ck_assert_ptr_null(strstr(r.body, "://"));
  http_free(&r);
  expect_error(&d, "GET", "/ui/nope.js", NULL, 404, "not_found", NULL);
  expect_error(&d, "POST", "/docs", "{}", 405, "method_not_allowed", NULL);
  daemon_stop(&d);
}
END_TEST

/* Reads the events of id with curl as an EventSource would reconnect: after Last-Event-ID. */
static long events_after(const daemon_proc *d, const char *id, const char *last, const char *q,
                         http_resp *r) {
  char path[256], hdr[64];
  snprintf(path, sizeof path, "/v1/jobs/%s/events%s", id, q ? q : "");
  snprintf(hdr, sizeof hdr, "Last-Event-ID: %s", last);
  const char *h[] = {hdr, NULL};
  return http_req(d, "GET", path, NULL, 0, last ? h : NULL, r);
}

START_TEST(event_stream_ends_with_204) {
  char st[512], id[64];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  http_resp r;
  ck_assert_int_eq(events_after(&d, id, NULL, NULL, &r), 200);
  const char *done = strstr(r.body, "event: done");
  ck_assert_ptr_nonnull(done);
  /* the id of the final event */
  const char *idl = done;
  while (idl > r.body && strncmp(idl, "id: ", 4) != 0)
    idl--;
  char last[32], before[32];
  snprintf(last, sizeof last, "%ld", strtol(idl + 4, NULL, 10));
  snprintf(before, sizeof before, "%ld", strtol(idl + 4, NULL, 10) - 1);
  http_free(&r);
  /* a reconnect after the final event: 204, which stops EventSource */
  ck_assert_int_eq(events_after(&d, id, last, NULL, &r), 204);
  ck_assert_uint_eq(r.len, 0);
  http_free(&r);
  char q[64];
  snprintf(q, sizeof q, "?last_event_id=%s", last);
  ck_assert_int_eq(events_after(&d, id, NULL, q, &r), 204);
  http_free(&r);
  /* one before it: the final event, then the end */
  ck_assert_int_eq(events_after(&d, id, before, NULL, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "event: done"));
  http_free(&r);
  /* a job still running streams on, whatever the id */
  char lid[64];
  submit_job(&d,
             "{\"class_label\": 1, \"seed\": 3, \"batch_size\": 4, \"scheduler\": {\"name\": "
             "\"ddpm\", \"steps\": 1000}}",
             lid, sizeof lid);
  wait_running(&d, lid, 60);
  sse_log part;
  test_sse_read(&d, lid, "1", 3, &part);
  ck_assert_ptr_nonnull(strstr(part.text, "id: 3"));
  free(part.text);
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", lid);
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* POST /v1/jobs/ID/token with hdrs; returns the token ("" for null) in tok. */
static long get_token(const daemon_proc *d, const char *id, const char *q, const char *const *hdrs,
                      char *tok, size_t n) {
  char path[256];
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s/token%s", id, q ? q : "");
  long st = http_req(d, "POST", path, "", 0, hdrs, &r);
  tok[0] = 0;
  if (st == 200) {
    json_t *j = http_json(&r);
    const char *t = json_string_value(json_object_get(j, "token"));
    snprintf(tok, n, "%s", t ? t : "");
    if (t) { /* the URLs it lists carry it */
      const char *ev = json_string_value(json_object_get(j, "events"));
      ck_assert_ptr_nonnull(ev);
      ck_assert_ptr_nonnull(strstr(ev, t));
    }
    json_decref(j);
  }
  http_free(&r);
  return st;
}

static long get_with(const daemon_proc *d, const char *id, const char *what, const char *tok,
                     http_resp *r) {
  char path[512];
  snprintf(path, sizeof path, "/v1/jobs/%s%s?token=%s", id, what, tok);
  return http_get(d, path, r);
}

START_TEST(url_tokens_are_scoped_and_expire) {
  char st[512], tmp[256], keys[512];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(keys, sizeof keys, "%s/web-keys", tmp);
  FILE *f = fopen(keys, "w");
  fprintf(f, "alice alice-key-0123456789abcdef\nbob bob-key-0123456789abcdef01\n"
             "ops ops-key-0123456789abcdef0 read,admin\n");
  fclose(f);
  chmod(keys, 0600);
  const char *alice[] = {"Authorization: Bearer alice-key-0123456789abcdef", NULL};
  const char *bob[] = {"Authorization: Bearer bob-key-0123456789abcdef01", NULL};
  const char *ops[] = {"Authorization: Bearer ops-key-0123456789abcdef0", NULL};
  daemon_proc d;
  const char *args[] = {"--api-keys-file", keys, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  char ids[2][64];
  for (int i = 0; i < 2; i++) {
    ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", SMALL_JOB, strlen(SMALL_JOB), alice, &r),
                     202);
    json_t *j = http_json(&r);
    snprintf(ids[i], sizeof ids[i], "%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    http_free(&r);
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s/events", ids[i]);
    ck_assert_int_eq(http_req(&d, "GET", path, NULL, 0, alice, &r), 200); /* until done */
    http_free(&r);
  }
  char tok[TOKEN_SIZE], tok2[TOKEN_SIZE], otok[TOKEN_SIZE];
  /* without a key no token; another key does not see the job; an admin does */
  ck_assert_int_eq(get_token(&d, ids[0], NULL, NULL, tok, sizeof tok), 401);
  ck_assert_int_eq(get_token(&d, ids[0], NULL, bob, tok, sizeof tok), 404);
  ck_assert_int_eq(get_token(&d, ids[0], NULL, ops, otok, sizeof otok), 200);
  ck_assert_int_eq(get_token(&d, ids[0], "?ttl=0", alice, tok, sizeof tok), 400);
  ck_assert_int_eq(get_token(&d, ids[0], "?ttl=3601", alice, tok, sizeof tok), 400);
  ck_assert_int_eq(get_token(&d, ids[0], "?ttl=2", alice, tok, sizeof tok), 200);
  ck_assert_int_eq(get_token(&d, ids[1], NULL, alice, tok2, sizeof tok2), 200);
  /* the token opens the job's image and events, and nothing else */
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", tok, &r), 200);
  ck_assert_str_eq(r.ctype, "image/png");
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", otok, &r), 200);
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[0], "/events", tok, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "event: done"));
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[1], "/images/0", tok, &r), 401); /* another job */
  ck_assert_ptr_nonnull(strstr(r.body, "not valid for this job"));
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[0], "", tok, &r), 401); /* the job's view */
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[0], "/noise.npy", tok, &r), 401);
  http_free(&r);
  char path[256];
  snprintf(path, sizeof path, "/v1/jobs?token=%s", tok);
  ck_assert_int_eq(http_get(&d, path, &r), 401);
  http_free(&r);
  /* tampered: another expiry, another MAC, garbage */
  char bad[TOKEN_SIZE + 8];
  snprintf(bad, sizeof bad, "9%s", tok);
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", bad, &r), 401);
  http_free(&r);
  snprintf(bad, sizeof bad, "%s", tok);
  char *last = bad + strlen(bad) - 1;
  *last = *last == '0' ? '1' : '0';
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", bad, &r), 401);
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", "12.zz", &r), 401);
  ck_assert_ptr_nonnull(strstr(r.body, "malformed"));
  http_free(&r);
  /* the API key itself is no token */
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", "alice-key-0123456789abcdef", &r), 401);
  http_free(&r);
  /* it expires */
  usleep(3200 * 1000);
  ck_assert_int_eq(get_with(&d, ids[0], "/images/0", tok, &r), 401);
  ck_assert_ptr_nonnull(strstr(r.body, "expired"));
  http_free(&r);
  ck_assert_int_eq(get_with(&d, ids[1], "/images/0", tok2, &r), 200); /* 600 s: still good */
  http_free(&r);
  daemon_stop(&d);
  /* no token is logged: the log has paths without their queries */
  ck_assert_int_eq(daemon_log_count(&d, tok2), 0);
  /* without keys, nothing needs one */
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  char id[64];
  submit_job(&d, SMALL_JOB, id, sizeof id);
  ck_assert_int_eq(get_token(&d, id, NULL, NULL, tok, sizeof tok), 200);
  ck_assert_str_eq(tok, "");
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("web");
  TCase *tc = tcase_create("web");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, hmac_sha256_vectors);
  tcase_add_test(tc, static_files_and_docs);
  tcase_add_test(tc, event_stream_ends_with_204);
  tcase_add_test(tc, url_tokens_are_scoped_and_expire);
  suite_add_tcase(s, tc);
  return s;
}
