/* Helpers for the daemon's integration tests: start the real `denoised serve` on a free
 * loopback port, talk HTTP to it with libcurl, stop or kill it. */
#ifndef DENOISED_TESTHTTP_H
#define DENOISED_TESTHTTP_H

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "image.h"
#include "testutil.h"

typedef struct daemon_proc {
  pid_t pid;
  int port;
  char log[512];
  char state[512];
} daemon_proc;

static inline double th_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Starts the daemon with `args` (NULL-terminated, after "serve") and extra environment
 * assignments ("K=V", NULL-terminated, may be NULL); waits until it listens. Returns 0 or the
 * exit status if it exited during start-up (port stays 0). */
static inline int daemon_start_env(daemon_proc *d, const char *state_dir, const char *const *args,
                                   const char *const *env) {
  static char logdir[256];
  static int nlog;
  if (!logdir[0])
    test_tmpdir(logdir, sizeof logdir);
  memset(d, 0, sizeof *d);
  snprintf(d->state, sizeof d->state, "%s", state_dir);
  snprintf(d->log, sizeof d->log, "%s/daemon-%d.log", logdir, ++nlog); /* one per start */
  char model[1024], model_arg[1100];
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(model_arg, sizeof model_arg, "default=%s", model);
  const char *argv[64];
  int n = 0;
  argv[n++] = test_bin();
  argv[n++] = "serve";
  argv[n++] = "--listen";
  argv[n++] = "127.0.0.1:0";
  argv[n++] = "--state-dir";
  argv[n++] = state_dir;
  int has_model = 0;
  for (int i = 0; args && args[i]; i++)
    has_model |= strcmp(args[i], "--model") == 0 || strcmp(args[i], "--config") == 0;
  if (!has_model) {
    argv[n++] = "--model";
    argv[n++] = model_arg;
  }
  for (int i = 0; args && args[i] && n < 62; i++)
    argv[n++] = args[i];
  argv[n] = NULL;
  char out_log[512];
  snprintf(out_log, sizeof out_log, "%s", d->log); /* stdout and stderr */
  for (int i = 0; args && args[i] && args[i + 1]; i++)
    if (strcmp(args[i], "--log-file") == 0) /* the log goes there: watch that file */
      snprintf(d->log, sizeof d->log, "%s", args[i + 1]);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed test must not leave a daemon behind */
    int fd = open(out_log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 2);
      dup2(fd, 1);
    }
    for (int i = 0; env && env[i]; i++)
      putenv((char *)env[i]);
    execv(argv[0], (char *const *)argv);
    _exit(127);
  }
  d->pid = pid;
  for (double t0 = th_now(); th_now() - t0 < 30;) {
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      d->pid = 0;
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    FILE *f = fopen(d->log, "r");
    char line[2048];
    while (f && fgets(line, sizeof line, f)) {
      /* a line still being written has no newline yet: read it again next time */
      if (!strstr(line, "msg=listening") || !strchr(line, '\n'))
        continue;
      const char *u = strstr(line, "url=http://127.0.0.1:");
      if (u)
        d->port = atoi(u + strlen("url=http://127.0.0.1:"));
    }
    if (f)
      fclose(f);
    if (d->port)
      return 0;
    usleep(20000);
  }
  char cmd[1100]; /* show what it said, for a failure that is hard to reproduce */
  snprintf(cmd, sizeof cmd, "echo '--- %s:' >&2; tail -c 2000 '%s' >&2", d->log, d->log);
  if (system(cmd) != 0)
    fprintf(stderr, "(no log)\n");
  ck_abort_msg("daemon %d did not start within 30 s; see %s", (int)pid, d->log);
  return -1;
}

static inline int daemon_start(daemon_proc *d, const char *state_dir, const char *const *args) {
  return daemon_start_env(d, state_dir, args, NULL);
}

/* Waits up to timeout_s for the daemon to exit (by itself, or after a signal): its status
 * (128+sig if killed), or -1 if it is still running. */
static inline int daemon_wait_exit(daemon_proc *d, double timeout_s) {
  for (double t0 = th_now(); d->pid && th_now() - t0 < timeout_s;) {
    int st;
    if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
      d->pid = 0;
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    usleep(10000);
  }
  return -1;
}

/* Sends sig and waits up to timeout_s; returns the exit status (128+sig if killed, -1 if it did
 * not exit, in which case it is killed). */
static inline int daemon_signal_wait(daemon_proc *d, int sig, double timeout_s) {
  if (!d->pid)
    return -1;
  kill(d->pid, sig);
  const int st = daemon_wait_exit(d, timeout_s);
  if (st < 0) {
    kill(d->pid, SIGKILL);
    waitpid(d->pid, NULL, 0);
    d->pid = 0;
  }
  return st;
}

static inline void daemon_stop(daemon_proc *d) {
  if (d->pid)
    ck_assert_int_eq(daemon_signal_wait(d, SIGTERM, 30), 0);
}

/* Counts lines of the daemon's log that contain needle. */
static inline int daemon_log_count(const daemon_proc *d, const char *needle) {
  FILE *f = fopen(d->log, "r");
  char line[4096];
  int n = 0;
  while (f && fgets(line, sizeof line, f))
    n += strstr(line, needle) != NULL;
  if (f)
    fclose(f);
  return n;
}

typedef struct http_resp {
  long status;
  char *body;
  size_t len;
  char headers[8192];
  size_t hlen;
  char ctype[128];
} http_resp;

static size_t th_write(char *p, size_t sz, size_t n, void *u) {
  http_resp *r = u;
  size_t k = sz * n;
  char *nb = realloc(r->body, r->len + k + 1);
  if (!nb)
    return 0;
  r->body = nb;
  memcpy(r->body + r->len, p, k);
  r->len += k;
  r->body[r->len] = 0;
  return k;
}

static size_t th_header(char *p, size_t sz, size_t n, void *u) {
  http_resp *r = u;
  size_t k = sz * n;
  if (r->hlen + k < sizeof r->headers) {
    memcpy(r->headers + r->hlen, p, k);
    r->hlen += k;
    r->headers[r->hlen] = 0;
  }
  return k;
}

/* The value of a response header (case-insensitive name), copied into out; NULL if absent. */
static inline const char *http_header(const http_resp *r, const char *name, char *out, size_t n) {
  size_t nl = strlen(name);
  for (const char *p = r->headers; *p;) {
    const char *eol = strstr(p, "\r\n");
    if (!eol)
      break;
    if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
      const char *v = p + nl + 1;
      while (*v == ' ')
        v++;
      snprintf(out, n, "%.*s", (int)(eol - v), v);
      return out;
    }
    p = eol + 2;
  }
  return NULL;
}

static inline void http_free(http_resp *r) {
  free(r->body);
  memset(r, 0, sizeof *r);
}

/* One request; hdrs is NULL-terminated ("Name: value"). body NULL: no body. */
static inline long http_req(const daemon_proc *d, const char *method, const char *path,
                            const char *body, size_t body_len, const char *const *hdrs,
                            http_resp *r) {
  memset(r, 0, sizeof *r);
  CURL *c = curl_easy_init();
  ck_assert_ptr_nonnull(c);
  char url[1024];
  snprintf(url, sizeof url, "http://127.0.0.1:%d%s", d->port, path);
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, th_write);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, th_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  if (strcmp(method, "HEAD") == 0)
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  struct curl_slist *hl = curl_slist_append(NULL, "Expect:");
  for (int i = 0; hdrs && hdrs[i]; i++)
    hl = curl_slist_append(hl, hdrs[i]);
  if (body) {
    hl = curl_slist_append(hl, "Content-Type: application/json");
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)body_len);
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
  CURLcode rc = curl_easy_perform(c);
  if (rc == CURLE_OK) {
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    char *ct = NULL;
    curl_easy_getinfo(c, CURLINFO_CONTENT_TYPE, &ct);
    if (ct)
      snprintf(r->ctype, sizeof r->ctype, "%s", ct);
  } else {
    r->status = -(long)rc;
  }
  curl_slist_free_all(hl);
  curl_easy_cleanup(c);
  return r->status;
}

static inline long http_get(const daemon_proc *d, const char *path, http_resp *r) {
  return http_req(d, "GET", path, NULL, 0, NULL, r);
}

static inline long http_post(const daemon_proc *d, const char *path, const char *json,
                             http_resp *r) {
  return http_req(d, "POST", path, json, strlen(json), NULL, r);
}

/* POST /v1/jobs with an Idempotency-Key header. */
static inline long http_post_keyed(const daemon_proc *d, const char *key, const char *json,
                                   http_resp *r) {
  char h[400];
  snprintf(h, sizeof h, "Idempotency-Key: %s", key);
  const char *hdrs[] = {h, NULL};
  return http_req(d, "POST", "/v1/jobs", json, strlen(json), hdrs, r);
}

/* The body parsed as JSON (new reference), failing the test if it is not. */
static inline json_t *http_json(const http_resp *r) {
  json_error_t je;
  json_t *j = r->body ? json_loads(r->body, 0, &je) : NULL;
  ck_assert_msg(j != NULL, "not JSON (status %ld): %s", r->status, r->body ? r->body : "");
  return j;
}

/* Submits a job, expects 202, returns its id in out. */
static inline void submit_job(const daemon_proc *d, const char *json, char *out, size_t n) {
  http_resp r;
  http_post(d, "/v1/jobs", json, &r);
  ck_assert_msg(r.status == 202, "submit %s: %ld %s", json, r.status, r.body ? r.body : "");
  json_t *j = http_json(&r);
  snprintf(out, n, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
}

/* The state of a job ("queued", ...), plus its step when step is non-NULL. */
static inline void job_state(const daemon_proc *d, const char *id, char *state, size_t n,
                             int *step) {
  char path[256];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_resp r;
  http_get(d, path, &r);
  ck_assert_msg(r.status == 200, "GET %s: %ld", path, r.status);
  json_t *j = http_json(&r);
  snprintf(state, n, "%s", json_string_value(json_object_get(j, "state")));
  if (step)
    *step = (int)json_integer_value(json_object_get(json_object_get(j, "progress"), "step"));
  json_decref(j);
  http_free(&r);
}

/* Polls until the job's state is `want` (or, for "finished", any final state) */
static inline void wait_state(const daemon_proc *d, const char *id, const char *want,
                              double timeout_s) {
  char st[32] = "";
  for (double t0 = th_now(); th_now() - t0 < timeout_s; usleep(20000)) {
    job_state(d, id, st, sizeof st, NULL);
    if (strcmp(st, want) == 0 || (strcmp(want, "finished") == 0 &&
                                  (strcmp(st, "succeeded") == 0 || strcmp(st, "failed") == 0 ||
                                   strcmp(st, "cancelled") == 0)))
      return;
  }
  ck_abort_msg("job %s: state '%s' after %.0f s, wanted '%s'", id, st, timeout_s, want);
}

/* Waits until the job runs and has done at least one step. */
static inline void wait_running(const daemon_proc *d, const char *id, double timeout_s) {
  char st[32] = "";
  int step = 0;
  for (double t0 = th_now(); th_now() - t0 < timeout_s; usleep(5000)) {
    job_state(d, id, st, sizeof st, &step);
    if (strcmp(st, "running") == 0 && step > 0)
      return;
    ck_assert_msg(strcmp(st, "queued") == 0 || strcmp(st, "running") == 0,
                  "job %s is %s before it could be seen running", id, st);
  }
  ck_abort_msg("job %s did not start", id);
}

/* GET path, which must answer 200 (the failure names the status, body and daemon log): the
 * body (the caller frees it) and its length. */
static inline char *get_body(const daemon_proc *d, const char *path, size_t *len) {
  http_resp r;
  ck_assert_msg(http_get(d, path, &r) == 200, "GET %s: %ld %.300s (%s)", path, r.status,
                r.body ? r.body : "", d->log);
  *len = r.len;
  return r.body;
}

/* A job (body) queued behind a running blocker (long_job) on a daemon started on state dir st
 * with args, which is killed (SIGKILL) before the job runs and started again: with the blocker
 * cancelled, the job must succeed. The daemon is left running; the job's id into id. */
static inline void queued_job_survives_kill9(daemon_proc *d, const char *st,
                                             const char *const *args, const char *long_job,
                                             const char *body, char *id, size_t n) {
  char blocker[64], path[128];
  ck_assert_int_eq(daemon_start(d, st, args), 0);
  submit_job(d, long_job, blocker, sizeof blocker);
  wait_running(d, blocker, 60);
  submit_job(d, body, id, n);
  ck_assert_int_eq(daemon_signal_wait(d, SIGKILL, 10), 128 + SIGKILL);
  ck_assert_int_eq(daemon_start(d, st, args), 0);
  snprintf(path, sizeof path, "/v1/jobs/%s", blocker);
  http_resp r;
  http_req(d, "DELETE", path, NULL, 0, NULL, &r);
  http_free(&r);
  wait_state(d, id, "succeeded", 120);
}

/* Whether GET /v1/models lists a model of that name. */
static inline int th_serves_model(const daemon_proc *d, const char *name) {
  http_resp r;
  ck_assert_int_eq(http_get(d, "/v1/models", &r), 200);
  json_t *j = http_json(&r), *m;
  size_t i;
  int found = 0;
  json_array_foreach(json_object_get(j, "models"), i, m) found |=
      strcmp(json_string_value(json_object_get(m, "name")), name) == 0;
  json_decref(j);
  http_free(&r);
  return found;
}

/* A scratch state directory path (not created). */
static inline const char *th_state_dir(char *buf, size_t n) {
  char tmp[256];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(buf, n, "%s/state", tmp);
  return buf;
}

/* ---- shared checks of the API tests (Check, the engine's PNG code) ---- */

/* A request answered with status and the error object {code, field}. */
static inline void expect_error(const daemon_proc *d, const char *method, const char *path,
                                const char *body, long status, const char *code,
                                const char *field) {
  http_resp r;
  http_req(d, method, path, body, body ? strlen(body) : 0, NULL, &r);
  /* bodies can carry whole images: messages show their start (Check's limit is 4 KiB) */
  ck_assert_msg(r.status == status, "%s %s %.300s: status %ld, wanted %ld: %.1000s", method, path,
                body ? body : "", r.status, status, r.body ? r.body : "");
  json_t *j = http_json(&r);
  json_t *e = json_object_get(j, "error");
  ck_assert_msg(json_is_object(e), "no error object: %s", r.body);
  ck_assert_msg(strcmp(json_string_value(json_object_get(e, "code")), code) == 0,
                "%.300s: code %s, wanted %s", body ? body : path,
                json_string_value(json_object_get(e, "code")), code);
  ck_assert(json_is_string(json_object_get(e, "message")));
  json_t *f = json_object_get(e, "field");
  if (field)
    ck_assert_msg(json_is_string(f) && strcmp(json_string_value(f), field) == 0,
                  "%.300s: field %s, wanted %s (%.1000s)", body ? body : path,
                  json_is_string(f) ? json_string_value(f) : "null", field, r.body);
  else
    ck_assert(json_is_null(f));
  json_decref(j);
  http_free(&r);
}

/* ---- raw sockets: requests libcurl would never send (two Content-Length headers, blanks in a
 * path), and a connection's life seen from the client ---- */

/* A connection from the loopback address src ("127.0.0.2": another client; NULL: any). */
static inline int raw_connect_from(const daemon_proc *d, const char *src) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ck_assert_int_ge(fd, 0);
  if (src) {
    struct sockaddr_in me = {0};
    me.sin_family = AF_INET;
    ck_assert_int_eq(inet_pton(AF_INET, src, &me.sin_addr), 1);
    ck_assert_msg(bind(fd, (struct sockaddr *)&me, sizeof me) == 0, "bind %s: %s", src,
                  strerror(errno));
  }
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)d->port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ck_assert_msg(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect: %s",
                strerror(errno));
  return fd;
}

static inline int raw_connect(const daemon_proc *d) {
  return raw_connect_from(d, NULL);
}

static inline void raw_send(int fd, const char *text) {
  size_t n = strlen(text);
  ck_assert_int_eq(send(fd, text, n, MSG_NOSIGNAL), (ssize_t)n);
}

/* Reads one response (headers and a Content-Length body; only the headers of any other) within
 * timeout_s into out. Returns its status, 0 if the server closed the connection first, -1 on a
 * timeout. */
static inline long raw_response(int fd, double timeout_s, char *out, size_t n) {
  size_t len = 0;
  out[0] = 0;
  const double t0 = th_now();
  for (;;) {
    const char *eoh = strstr(out, "\r\n\r\n");
    if (eoh) {
      const char *cl = strstr(out, "\r\nContent-Length:"); /* as the daemon spells it */
      size_t want = (size_t)(eoh + 4 - out) + (cl && cl < eoh ? strtoul(cl + 17, NULL, 10) : 0);
      if (len >= want || len + 1 >= n)
        return strncmp(out, "HTTP/1.", 7) == 0 ? strtol(out + 9, NULL, 10) : -1;
    }
    const double left = timeout_s - (th_now() - t0);
    if (left <= 0 || len + 1 >= n)
      return -1;
    struct timeval tv = {(time_t)left, (suseconds_t)((left - (double)(time_t)left) * 1e6) + 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t k = recv(fd, out + len, n - 1 - len, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
      return 0;
    if (k > 0) {
      len += (size_t)k;
      out[len] = 0;
    }
  }
}

/* 1 if the server closes the connection within timeout_s (what it still sends is skipped). */
static inline int raw_closed_within(int fd, double timeout_s) {
  const double t0 = th_now();
  while (th_now() - t0 < timeout_s) {
    char b[4096];
    struct timeval tv = {0, 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t k = recv(fd, b, sizeof b, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
      return 1;
  }
  return 0;
}

/* One request on a fresh connection from src (NULL: any): the status, the response in out. */
static inline long raw_request_from(const daemon_proc *d, const char *src, const char *text,
                                    char *out, size_t n) {
  int fd = raw_connect_from(d, src);
  raw_send(fd, text);
  long st = raw_response(fd, 30, out, n);
  close(fd);
  return st;
}

static inline long raw_request(const daemon_proc *d, const char *text, char *out, size_t n) {
  return raw_request_from(d, NULL, text, out, n);
}

/* The error object's field ("" for null) and code of a JSON error response in resp. */
static inline void raw_error(const char *resp, char *field, size_t fn, char *code, size_t cn) {
  const char *body = strstr(resp, "\r\n\r\n");
  ck_assert_ptr_nonnull(body);
  json_t *j = json_loads(body + 4, 0, NULL);
  ck_assert_msg(j != NULL, "not a JSON body: %s", resp);
  json_t *e = json_object_get(j, "error"), *f = json_object_get(e, "field");
  ck_assert_msg(json_is_object(e), "no error object: %s", resp);
  ck_assert(json_is_string(json_object_get(e, "message")));
  snprintf(field, fn, "%s", json_is_string(f) ? json_string_value(f) : "");
  snprintf(code, cn, "%s", json_string_value(json_object_get(e, "code")));
  json_decref(j);
}

static inline uint8_t *read_file_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  ck_assert_ptr_nonnull(f);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *b = malloc((size_t)n + 1);
  ck_assert_int_eq(fread(b, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  *len = (size_t)n;
  return b;
}

/* A base64 PNG, white in the first `white` columns: an inpainting mask. */
static inline char *mask_b64(int h, int w, int white, uint8_t **png, size_t *len) {
  uint8_t *px = calloc((size_t)h * w * 3, 1);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < white && x < w; x++)
      memset(px + ((size_t)y * w + x) * 3, 255, 3);
  err e;
  ck_assert_int_eq(image_png_encode(px, 3, h, w, NULL, 0, png, len, &e), 0);
  free(px);
  return base64_encode(*png, *len);
}

static inline void write_file(const char *path, const uint8_t *b, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  fwrite(b, 1, n, f);
  fclose(f);
}

/* The pixels of image n of a job (at most 64x64) and their size (hp, wp may be NULL). */
static inline void fetch_pixels_size(const daemon_proc *d, const char *id, int n, uint8_t **px,
                                     int *hp, int *wp) {
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s/images/%d", id, n);
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode((uint8_t *)r.body, r.len, 64, 64, px, &h, &w, &e), 0);
  http_free(&r);
  if (hp)
    *hp = h;
  if (wp)
    *wp = w;
}

static inline void fetch_pixels(const daemon_proc *d, const char *id, int n, uint8_t **px) {
  fetch_pixels_size(d, id, n, px, NULL, NULL);
}

/* ---- Server-Sent Events ---- */

typedef struct sse_log {
  char *text;
  size_t len;
  int stop_after_seq; /* abort the transfer once this id was seen (0: run to the end) */
} sse_log;

static inline size_t test_sse_write(char *p, size_t sz, size_t n, void *u) {
  sse_log *s = u;
  size_t k = sz * n;
  char *nb = realloc(s->text, s->len + k + 1);
  if (!nb)
    return 0;
  s->text = nb;
  memcpy(s->text + s->len, p, k);
  s->len += k;
  s->text[s->len] = 0;
  if (s->stop_after_seq) {
    char want[32];
    snprintf(want, sizeof want, "id: %d\n", s->stop_after_seq);
    const char *hit = strstr(s->text, want);
    if (hit && strstr(hit, "\n\n"))
      return 0; /* makes curl abort: a client that goes away mid-stream */
  }
  return k;
}

/* The event stream of job id, until its final event (the stream ends there) or, with
 * stop_after > 0, until event stop_after is complete; last_event_id resumes a stream. */
static inline void test_sse_read(const daemon_proc *d, const char *id, const char *last_event_id,
                                 int stop_after, sse_log *out) {
  memset(out, 0, sizeof *out);
  out->stop_after_seq = stop_after;
  CURL *c = curl_easy_init();
  char url[256];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/jobs/%s/events", d->port, id);
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, test_sse_write);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
  struct curl_slist *hl = curl_slist_append(NULL, "Accept: text/event-stream");
  if (last_event_id) {
    char hdr[64];
    snprintf(hdr, sizeof hdr, "Last-Event-ID: %s", last_event_id);
    hl = curl_slist_append(hl, hdr);
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
  curl_easy_perform(c);
  curl_slist_free_all(hl);
  curl_easy_cleanup(c);
}

#endif
