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

/* Asks for job id's event stream from address src with an optional key; returns the status,
 * and in *fd the open connection of a stream (200) or -1. code gets the error code otherwise. */
static long open_stream(const daemon_proc *d, const char *src, const char *key, const char *id,
                        int *fd, char *code, size_t cn) {
  char req[512], out[8192];
  snprintf(req, sizeof req, "GET /v1/jobs/%s/events HTTP/1.1\r\nHost: x\r\n%s%s%s\r\n", id,
           key ? "Authorization: Bearer " : "", key ? key : "", key ? "\r\n" : "");
  *fd = raw_connect_from(d, src);
  raw_send(*fd, req);
  long st = raw_response(*fd, 10, out, sizeof out);
  code[0] = 0;
  if (st != 200) {
    ck_assert_msg(st > 0, "no answer to a stream request from %s", src);
    char field[128];
    raw_error(out, field, sizeof field, code, cn);
    if (st == 429 || st == 503)
      ck_assert_msg(strstr(out, "Retry-After: "), "%ld without Retry-After: %s", st, out);
    close(*fd);
    *fd = -1;
  }
  return st;
}

static void expect_stream(const daemon_proc *d, const char *src, const char *key, const char *id,
                          long status, const char *want_code, int *fd) {
  char code[64];
  long st = open_stream(d, src, key, id, fd, code, sizeof code);
  ck_assert_msg(st == status && (!want_code || strcmp(code, want_code) == 0),
                "stream from %s (%s): %ld %s, wanted %ld %s", src, key ? key : "no key", st, code,
                status, want_code ? want_code : "");
}

/* /healthz, /readyz and a submission answer, from a client with no stream open. */
static void short_requests_answer(const daemon_proc *d, const char *src, const char *key) {
  char out[16384], req[512];
  const char *auth = key ? "Authorization: Bearer " : "", *k = key ? key : "",
             *eol = key ? "\r\n" : "";
  ck_assert_int_eq(
      raw_request_from(d, src, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof out), 200);
  ck_assert_int_eq(
      raw_request_from(d, src, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", out, sizeof out), 200);
  snprintf(req, sizeof req,
           "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n%s%s%sContent-Length: %zu\r\n\r\n%s", auth, k, eol,
           strlen(SMALL_JOB), SMALL_JOB);
  long st = raw_request_from(d, src, req, out, sizeof out);
  ck_assert_msg(st == 202, "a submission at the stream cap: %ld %s", st, out);
}

/* A gauge or counter of /metrics (a daemon without keys). */
static double metric(const daemon_proc *d, const char *name) {
  http_resp r;
  ck_assert_int_eq(http_get(d, "/metrics", &r), 200);
  char pat[128];
  snprintf(pat, sizeof pat, "\n%s ", name);
  const char *p = strstr(r.body, pat);
  ck_assert_msg(p != NULL, "no metric %s", name);
  double v = atof(p + strlen(pat));
  http_free(&r);
  return v;
}

/* About two seconds of compute each in a release build, on one worker */
#define BLOCKER                                                                                    \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 16, "                                         \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define NBLOCK 12

/* Jobs that keep the one worker busy for a while (so the job after them stays queued and its
 * event stream open), submitted with key (NULL: none); ids in ids. */
static void block_worker(const daemon_proc *d, const char *key, char ids[NBLOCK][64]) {
  char auth[128];
  snprintf(auth, sizeof auth, "Authorization: Bearer %s", key ? key : "");
  const char *hdrs[] = {auth, NULL};
  for (int i = 0; i < NBLOCK; i++) {
    http_resp r;
    http_req(d, "POST", "/v1/jobs", BLOCKER, strlen(BLOCKER), key ? hdrs : NULL, &r);
    ck_assert_msg(r.status == 202, "blocker: %ld %s", r.status, r.body);
    json_t *j = http_json(&r);
    snprintf(ids[i], 64, "%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    http_free(&r);
  }
}

static void unblock_worker(const daemon_proc *d, const char *key, char ids[NBLOCK][64]) {
  char auth[128];
  snprintf(auth, sizeof auth, "Authorization: Bearer %s", key ? key : "");
  const char *hdrs[] = {auth, NULL};
  for (int i = NBLOCK - 1; i >= 0; i--) {
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s", ids[i]);
    http_resp r;
    http_req(d, "DELETE", path, NULL, 0, key ? hdrs : NULL, &r);
    http_free(&r);
  }
}

/* Without keys: streams per address, then all of them up to max_connections less the reserve,
 * and the reserve still answers; idle connections give way when connections run short. */
START_TEST(streams_are_limited_per_address) {
  char st[512], id[64], code[64];
  daemon_proc d;
  const char *args[] = {"--max-streams-per-client",
                        "2",
                        "--max-connections",
                        "16",
                        "--connection-reserve",
                        "8",
                        "--workers",
                        "1",
                        "--threads-per-job",
                        "1",
                        "--sse-heartbeat",
                        "1",
                        NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char blockers[NBLOCK][64];
  block_worker(&d, NULL, blockers);
  submit_job(&d, SMALL_JOB, id, sizeof id);
  int fds[8], extra;
  expect_stream(&d, "127.0.0.1", NULL, id, 200, NULL, &fds[0]);
  expect_stream(&d, "127.0.0.1", NULL, id, 200, NULL, &fds[1]);
  expect_stream(&d, "127.0.0.1", NULL, id, 429, "too_many_streams", &extra);
  /* a synchronous wait holds a connection as a stream does */
  expect_error(&d, "POST", "/v1/generate", SMALL_JOB, 429, "too_many_streams", NULL);
  const char *others[] = {"127.0.0.2", "127.0.0.3", "127.0.0.4"};
  for (int i = 0; i < 3; i++)
    for (int k = 0; k < 2; k++)
      expect_stream(&d, others[i], NULL, id, 200, NULL, &fds[2 + 2 * i + k]);
  expect_stream(&d, "127.0.0.5", NULL, id, 503, "streams_full", &extra);
  short_requests_answer(&d, "127.0.0.5", NULL);
  short_requests_answer(&d, "127.0.0.1", NULL);
  /* a closed stream gives its slot back (once the server writes to it: a heartbeat) */
  close(fds[0]);
  long got = 0;
  for (double t0 = th_now(); th_now() - t0 < 10 && got != 200; usleep(50000))
    got = open_stream(&d, "127.0.0.5", NULL, id, &fds[0], code, sizeof code);
  ck_assert_msg(got == 200, "a freed stream slot was not reused: %ld %s", got, code);
  for (int i = 0; i < 8; i++)
    close(fds[i]);
  double open = 99;
  for (double t0 = th_now(); th_now() - t0 < 20 && open > 1; usleep(50000))
    open = metric(&d, "denoised_http_open_connections");
  ck_assert_msg(open <= 1, "%.0f connections still open after their clients left", open);
  /* idle keep-alive connections reaching into the reserve are closed after a second */
  int idle[12], closed = 0;
  char out[4096];
  for (int i = 0; i < 12; i++) {
    idle[i] = raw_connect_from(&d, "127.0.0.6");
    raw_send(idle[i], "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    ck_assert_int_eq(raw_response(idle[i], 10, out, sizeof out), 200);
  }
  for (int i = 0; i < 12; i++)
    closed += raw_closed_within(idle[i], i == 0 ? 2.5 : 0.1);
  ck_assert_msg(closed >= 4, "%d of 12 idle connections closed with 8 free", closed);
  short_requests_answer(&d, "127.0.0.7", NULL);
  for (int i = 0; i < 12; i++)
    close(idle[i]);
  wait_state(&d, id, "queued", 1); /* it was queued all along: the streams stayed open */
  unblock_worker(&d, NULL, blockers);
  daemon_stop(&d);
}
END_TEST

#define KEY_A "k-alice-0123456789abcdef"
#define KEY_B "k-bob-0123456789abcdef01"

/* With keys: a key's streams across addresses, an address's across keys, and a key's
 * connections. */
START_TEST(streams_are_limited_per_key) {
  char st[512], id[64], out[8192];
  daemon_proc d;
  const char *args[] = {"--max-streams-per-client",
                        "2",
                        "--max-connections-per-key",
                        "4",
                        "--workers",
                        "1",
                        "--threads-per-job",
                        "1",
                        NULL};
  const char *env[] = {"DENOISED_API_KEYS=alice:" KEY_A ",bob:" KEY_B, NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  char blockers[NBLOCK][64];
  block_worker(&d, KEY_A, blockers);
  char req[512];
  snprintf(req, sizeof req,
           "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " KEY_A
           "\r\nContent-Length: %zu\r\n\r\n%s",
           strlen(SMALL_JOB), SMALL_JOB);
  ck_assert_int_eq(raw_request(&d, req, out, sizeof out), 202);
  json_t *j = json_loads(strstr(out, "\r\n\r\n") + 4, 0, NULL);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  int a1, a2, b1, x;
  expect_stream(&d, "127.0.0.1", KEY_A, id, 200, NULL, &a1);
  expect_stream(&d, "127.0.0.2", KEY_A, id, 200, NULL, &a2);
  expect_stream(&d, "127.0.0.3", KEY_A, id, 429, "too_many_streams", &x); /* the key's limit */
  /* bob sees only his own jobs: his stream follows a job of his */
  snprintf(req, sizeof req,
           "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " KEY_B
           "\r\nContent-Length: %zu\r\n\r\n%s",
           strlen(SMALL_JOB), SMALL_JOB);
  ck_assert_int_eq(raw_request(&d, req, out, sizeof out), 202);
  j = json_loads(strstr(out, "\r\n\r\n") + 4, 0, NULL);
  char bid[64];
  snprintf(bid, sizeof bid, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  expect_stream(&d, "127.0.0.1", KEY_B, bid, 200, NULL, &b1);
  expect_stream(&d, "127.0.0.1", KEY_B, bid, 429, "too_many_streams", &x); /* the address's */
  short_requests_answer(&d, "127.0.0.9", KEY_B);
  /* alice's connections: two streams, two keep-alive ones, then no more */
  int k1 = raw_connect_from(&d, "127.0.0.4"), k2 = raw_connect_from(&d, "127.0.0.5");
  const char *list = "GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " KEY_A "\r\n\r\n";
  raw_send(k1, list);
  ck_assert_int_eq(raw_response(k1, 10, out, sizeof out), 200);
  raw_send(k2, list);
  ck_assert_int_eq(raw_response(k2, 10, out, sizeof out), 200);
  int k3 = raw_connect_from(&d, "127.0.0.6");
  raw_send(k3, list);
  ck_assert_int_eq(raw_response(k3, 10, out, sizeof out), 429);
  ck_assert_ptr_nonnull(strstr(out, "too_many_connections"));
  ck_assert_msg(raw_closed_within(k3, 3), "a connection over the key's limit stayed open");
  close(k3);
  ck_assert_int_eq(
      raw_request_from(&d, "127.0.0.6",
                       "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " KEY_A
                       "\r\n\r\n",
                       out, sizeof out),
      200);
  close(k1);
  close(k2);
  close(a1);
  close(a2);
  close(b1);
  unblock_worker(&d, KEY_A, blockers);
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
  tcase_add_test(tc, streams_are_limited_per_address);
  tcase_add_test(tc, streams_are_limited_per_key);
  suite_add_tcase(s, tc);
  return s;
}
