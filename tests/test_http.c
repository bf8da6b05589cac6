/* The daemon's HTTP layer against a hostile client, over raw sockets: how a body is framed
 * (Content-Length, Transfer-Encoding), canonical numbers in paths, queries and headers, and how
 * long idle keep-alive connections live. */
#include "testhttp.h"

#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

/* A raw request answered with status and the error {code, field}. */
static void raw_expect(const daemon_proc *d, const char *text, long status, const char *code,
                       const char *field) {
  char out[16384], f[128], c[64];
  long st = raw_request(d, text, out, sizeof out);
  ck_assert_msg(st == status, "%.200s: status %ld, wanted %ld: %.600s", text, st, status, out);
  raw_error(out, f, sizeof f, c, sizeof c);
  ck_assert_msg(strcmp(c, code) == 0 && strcmp(f, field) == 0,
                "%.200s: code %s field '%s', wanted %s '%s'", text, c, f, code, field);
}

/* Two lengths, or a length and a chunked encoding, are two readings of one body: 400, and the
 * connection is closed so nothing after the headers is read as a request. */
START_TEST(framing_is_unambiguous) {
  char st[512], out[16384];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  const char *body = "{\"class_label\": 2, \"seed\": 1}";
  struct {
    const char *headers, *field;
  } bad[] = {
      {"Content-Length: 29\r\nContent-Length: 40\r\n", "Content-Length"},
      {"Content-Length: 29\r\nContent-Length: 29\r\n", "Content-Length"},
      {"Content-Length: 29\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding"},
      {"Transfer-Encoding: chunked\r\nContent-Length: 29\r\n", "Transfer-Encoding"},
      {"Transfer-Encoding: gzip\r\n", "Transfer-Encoding"},
      {"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding"},
      {"Content-Length: 029\r\n", "Content-Length"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    char req[1024];
    snprintf(req, sizeof req, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n%s\r\n%s", bad[i].headers,
             body);
    int fd = raw_connect(&d);
    raw_send(fd, req);
    long status = raw_response(fd, 10, out, sizeof out);
    ck_assert_msg(status == 400, "%s: status %ld: %s", bad[i].headers, status, out);
    char f[128], c[64];
    raw_error(out, f, sizeof f, c, sizeof c);
    ck_assert_msg(strcmp(f, bad[i].field) == 0 && strcmp(c, "invalid_header") == 0,
                  "%s: field '%s' code %s", bad[i].headers, f, c);
    ck_assert_msg(raw_closed_within(fd, 3), "%s: the connection stayed open", bad[i].headers);
    close(fd);
  }
  /* nothing of them was accepted, and one length is still fine, keep-alive included */
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/jobs", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"jobs\":[]"));
  http_free(&r);
  int fd = raw_connect(&d);
  for (int k = 0; k < 2; k++) {
    char req[512];
    snprintf(req, sizeof req, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    raw_send(fd, req);
    ck_assert_int_eq(raw_response(fd, 10, out, sizeof out), 202);
  }
  raw_send(fd, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               "1d\r\n{\"class_label\": 2, \"seed\": 1}\r\n0\r\n\r\n");
  ck_assert_int_eq(raw_response(fd, 10, out, sizeof out), 202);
  close(fd);
  daemon_stop(&d);
}
END_TEST

/* Numbers in paths, queries and headers are plain decimal digits or refused: no sign, blank,
 * NUL, leading zero, escaped or not. */
START_TEST(numbers_are_canonical) {
  char st[512], out[16384], id[64], req[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  const char *images[] = {"%2B0", "+0", "00",  "%200",   "0%20", "0%00",
                          "%000", "-0", "0x0", "%30%30", "0.0"};
  for (size_t i = 0; i < sizeof images / sizeof *images; i++) {
    snprintf(req, sizeof req, "GET /v1/jobs/%s/images/%s HTTP/1.1\r\nHost: x\r\n\r\n", id,
             images[i]);
    raw_expect(&d, req, 400, "invalid_field", "n");
  }
  snprintf(req, sizeof req, "GET /v1/jobs/%s/images/0 HTTP/1.1\r\nHost: x\r\n\r\n", id);
  ck_assert_int_eq(raw_request(&d, req, out, sizeof out), 200);
  snprintf(req, sizeof req, "GET /v1/jobs/%s/images/%%30 HTTP/1.1\r\nHost: x\r\n\r\n", id);
  ck_assert_int_eq(raw_request(&d, req, out, sizeof out), 200); /* %30 is "0" itself */
  snprintf(req, sizeof req, "GET /v1/jobs/%s/images/7 HTTP/1.1\r\nHost: x\r\n\r\n", id);
  raw_expect(&d, req, 404, "not_found", "");
  const char *limits[] = {"%205",
                          "5%20",
                          "+5",
                          "%2B5",
                          "05",
                          "5%00",
                          "-5",
                          "5.0",
                          "",
                          "%09"
                          "5"};
  for (size_t i = 0; i < sizeof limits / sizeof *limits; i++) {
    snprintf(req, sizeof req, "GET /v1/jobs?limit=%s HTTP/1.1\r\nHost: x\r\n\r\n", limits[i]);
    raw_expect(&d, req, 400, "invalid_field", "limit");
  }
  raw_expect(&d, "GET /v1/jobs?limit=101 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "out_of_range",
             "limit");
  ck_assert_int_eq(
      raw_request(&d, "GET /v1/jobs?limit=5 HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof out), 200);
  const char *ids[] = {"+1", "01", "1 2", "0x1"};
  for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) {
    snprintf(req, sizeof req,
             "GET /v1/jobs/%s/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %s\r\n\r\n", id, ids[i]);
    raw_expect(&d, req, 400, "invalid_field", "Last-Event-ID");
  }
  snprintf(req, sizeof req,
           "GET /v1/jobs/%s/events?last_event_id=1%%00 HTTP/1.1\r\nHost: x\r\n\r\n", id);
  raw_expect(&d, req, 400, "invalid_field", "Last-Event-ID");
  /* an A1111 prompt is a class index only when it is one in the same canonical form */
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/txt2img", "{\"prompt\": \"2\", \"steps\": 2}", &r),
                   200);
  http_free(&r);
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"+2\", \"steps\": 2}", 400,
               "invalid_field", "prompt");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \" 2\", \"steps\": 2}", 400,
               "invalid_field", "prompt");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"02\", \"steps\": 2}", 400,
               "invalid_field", "prompt");
  daemon_stop(&d);
}
END_TEST

/* An idle keep-alive connection lives idle_timeout, however short header_timeout is (that one
 * bounds a request in progress), and is closed once it has passed. */
START_TEST(idle_timeout_is_kept) {
  char st[512], out[8192];
  daemon_proc d;
  const char *args[] = {
      "--idle-timeout", "3", "--header-timeout", "1", "--sse-heartbeat", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  int fd = raw_connect(&d);
  const char *get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
  raw_send(fd, get);
  ck_assert_int_eq(raw_response(fd, 5, out, sizeof out), 200);
  ck_assert_msg(!raw_closed_within(fd, 2), "an idle connection was closed after 2 s of 3");
  raw_send(fd, get);
  ck_assert_int_eq(raw_response(fd, 5, out, sizeof out), 200);
  double t0 = th_now();
  ck_assert_msg(raw_closed_within(fd, 6), "an idle connection outlived idle_timeout");
  double idle = th_now() - t0;
  ck_assert_msg(idle > 2.5 && idle < 4.5, "closed after %.2f s idle, wanted about 3", idle);
  close(fd);
  /* a request in progress still has header_timeout only */
  fd = raw_connect(&d);
  raw_send(fd, "GET /healthz HTTP/1.1\r\nHost: x\r\n");
  t0 = th_now();
  ck_assert(raw_closed_within(fd, 4));
  ck_assert_msg(th_now() - t0 < 2.2, "a half-sent request lived %.2f s", th_now() - t0);
  close(fd);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("http");
  TCase *tc = tcase_create("http");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, framing_is_unambiguous);
  tcase_add_test(tc, numbers_are_canonical);
  tcase_add_test(tc, idle_timeout_is_kept);
  suite_add_tcase(s, tc);
  return s;
}
