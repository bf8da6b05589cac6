/* The HTTP front end on libmicrohttpd: a thread per connection (an event stream or a synchronous
 * /v1/generate may block its own thread, never a worker), routing, auth, body and time limits,
 * CORS, and Server-Sent Events fed from the queue's per-job event log. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base64.h"
#include "internal.h"

#define JOBS_PREFIX "/v1/jobs/"
#define MAX_LIST 100

/* A connection as the reaper sees it: slow clients must not hold a thread forever. Between
 * requests a connection may sit idle for idle_timeout; once a request line has arrived, the
 * headers and body must follow within header_timeout. */
typedef enum { CONN_IDLE, CONN_REQUEST, CONN_RESPONDING } conn_phase;

typedef struct conn_track {
  struct conn_track *next, *prev;
  int fd;
  conn_phase phase;
  double since;                /* monotonic start of the current phase */
  char owner[QUEUE_NAME_SIZE]; /* the API key of its last request, for max_connections_per_key */
} conn_track;

/* A long request (an event stream, a synchronous wait) as the per-client limits count it. */
typedef struct stream_slot {
  struct stream_slot *next, *prev;
  char addr[INET6_ADDRSTRLEN];
  char owner[QUEUE_NAME_SIZE];
} stream_slot;

typedef struct req {
  char id[32];
  char method[16];
  char path[256];
  double t0;
  char *body;
  size_t len, cap;
  int too_big;
  int status;
  int close; /* the request's framing is unusable: answer, then close the connection */
  int authed;
  char owner[QUEUE_NAME_SIZE]; /* the key's name; "" without auth */
  char addr[INET6_ADDRSTRLEN]; /* the client's address */
  int scopes;
  const char *why; /* why a URL token was refused, for the 401 */
  conn_track *ct;
  char job[QUEUE_ID_SIZE]; /* for the log line */
} req;

static double mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- responses ---- */

static const char *header(struct MHD_Connection *c, const char *name) {
  return MHD_lookup_connection_value(c, MHD_HEADER_KIND, name);
}

static const char *cors_origin(srv *s, struct MHD_Connection *c) {
  const char *o = header(c, "Origin");
  if (!o)
    return NULL;
  for (int i = 0; i < s->cfg.ncors; i++)
    if (strcmp(s->cfg.cors_origins[i], "*") == 0 || strcmp(s->cfg.cors_origins[i], o) == 0)
      return o;
  return NULL;
}

static enum MHD_Result queue_resp(srv *s, struct MHD_Connection *c, req *r, int status,
                                  struct MHD_Response *resp, const char *ctype) {
  if (!resp)
    return MHD_NO;
  if (ctype)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
  MHD_add_response_header(resp, "X-Request-Id", r->id);
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
  const char *origin = cors_origin(s, c);
  if (origin) {
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", origin);
    MHD_add_response_header(resp, "Vary", "Origin");
    MHD_add_response_header(resp, "Access-Control-Expose-Headers",
                            "Location, Retry-After, X-Request-Id, X-Job-Id, X-Seed");
  }
  if (atomic_load(&s->stopping) || r->close)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
  r->status = status;
  enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
  MHD_destroy_response(resp);
  return ret;
}

static enum MHD_Result send_text(srv *s, struct MHD_Connection *c, req *r, int status, char *text,
                                 size_t len, const char *ctype) {
  struct MHD_Response *resp = MHD_create_response_from_buffer(
      len, text, text ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
  return queue_resp(s, c, r, status, resp, ctype);
}

static enum MHD_Result send_json_h(srv *s, struct MHD_Connection *c, req *r, int status, json_t *j,
                                   const char *hname, const char *hval) {
  char *text = j ? json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(10)) : NULL;
  json_decref(j);
  if (!text) {
    text =
        strdup("{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\",\"field\":null}}");
    status = 500;
    if (!text)
      return MHD_NO;
  }
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
  if (resp && hname)
    MHD_add_response_header(resp, hname, hval);
  return queue_resp(s, c, r, status, resp, "application/json");
}

static enum MHD_Result send_json(srv *s, struct MHD_Connection *c, req *r, int status, json_t *j) {
  return send_json_h(s, c, r, status, j, NULL, NULL);
}

static enum MHD_Result send_error(srv *s, struct MHD_Connection *c, req *r, const api_error *e) {
  char *text = NULL;
  json_t *j = api_error_json(e);
  text = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  if (!text) /* out of memory: still an answer with the status */
    text = strdup("{\"error\":{\"code\":\"internal\",\"message\":\"the error could not be "
                  "encoded\",\"field\":null}}");
  if (!text)
    return MHD_NO;
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
  if (!resp)
    return MHD_NO;
  if (e->retry_after > 0) {
    char ra[16];
    snprintf(ra, sizeof ra, "%d", e->retry_after);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
  }
  if (e->status == 401)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"denoised\"");
  if (e->status == 401 || e->status == 403)
    atomic_fetch_add(&s->auth_failures, 1);
  if (r->status == 0 && log_enabled(LOG_DEBUG))
    log_event(LOG_DEBUG, "request refused", "req", r->id, "code", e->code, "detail", e->message,
              LOG_END);
  return queue_resp(s, c, r, e->status, resp, "application/json");
}

static enum MHD_Result fail(srv *s, struct MHD_Connection *c, req *r, int status, const char *code,
                            const char *field, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static enum MHD_Result fail(srv *s, struct MHD_Connection *c, req *r, int status, const char *code,
                            const char *field, const char *fmt, ...) {
  api_error e = {0};
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  api_fail(&e, status, code, field, "%s", msg);
  if (status == 503 || status == 429)
    e.retry_after = status == 503 ? 10 : 5;
  return send_error(s, c, r, &e);
}

static enum MHD_Result method_not_allowed(srv *s, struct MHD_Connection *c, req *r,
                                          const char *allow) {
  api_error e = {0};
  api_fail(&e, 405, "method_not_allowed", NULL, "%s is not allowed on %s (allowed: %s)", r->method,
           r->path, allow);
  json_t *j = api_error_json(&e);
  return send_json_h(s, c, r, 405, j, MHD_HTTP_HEADER_ALLOW, allow);
}

/* ---- auth ---- */

/* Checks the scope a route needs; returns 0 to go on. Healthz, readyz and CORS preflights never
 * get here. */
static int authorize(srv *s, struct MHD_Connection *c, req *r, int scope, enum MHD_Result *ret) {
  if (!r->authed) {
    if (r->why)
      *ret = fail(s, c, r, 401, "unauthorized", "token", "%s", r->why);
    else
      *ret = fail(s, c, r, 401, "unauthorized", NULL,
                  "an API key is required: send 'Authorization: Bearer KEY'");
    return -1;
  }
  if ((r->scopes & scope) != scope) {
    *ret = fail(s, c, r, 403, "forbidden", NULL, "the key '%s' lacks the '%s' permission", r->owner,
                auth_scope_name(scope));
    return -1;
  }
  return 0;
}

/* Who a request comes from, without API keys: its X-Client-Token (1-48 visible ASCII
 * characters; a browser tab or script names itself) or else its peer address. Jobs remember it
 * so that an interrupt, which names no job, stops only the caller's own. */
static void client_identity(struct MHD_Connection *c, const req *r, char *out, size_t n) {
  const char *t = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Client-Token");
  size_t len = t ? strlen(t) : 0;
  int ok = len > 0 && len <= 48;
  for (size_t i = 0; ok && i < len; i++)
    ok = t[i] > 0x20 && t[i] < 0x7f;
  if (ok)
    snprintf(out, n, "token:%s", t);
  else /* the address the request started with (client_address) */
    snprintf(out, n, "addr:%s", r->addr);
}

/* Whose jobs a request sees: admins and the auth-less server see all. */
static const char *owner_filter(srv *s, const req *r) {
  if (!s->api.auth || (r->scopes & SCOPE_ADMIN))
    return NULL;
  return r->owner;
}

/* Whether r may see what fingerprints a model (DeepPeep): its internals and the metrics that
 * time it. Admin keys may; without keys every request has every scope, so only when the
 * operator set expose_internals. */
static int internals_allowed(const srv *s, const req *r) {
  return (r->scopes & SCOPE_ADMIN) && (s->api.auth || s->cfg.expose_internals);
}

/* ---- per-client limits on long requests ---- */

/* Takes a stream slot for r, or answers why not in *ret: 429 when this key or address has its
 * max_streams_per_client, 503 when streams hold every connection but the reserve (which keeps
 * /healthz, /readyz and submissions answering). */
static stream_slot *stream_acquire(srv *s, struct MHD_Connection *c, req *r, enum MHD_Result *ret) {
  const int cap = s->cfg.max_connections - s->cfg.connection_reserve;
  const int per = s->cfg.max_streams_per_client;
  int total = 0, by_addr = 0, by_key = 0;
  stream_slot *slot = calloc(1, sizeof *slot);
  pthread_mutex_lock(&s->conn_mu);
  for (const stream_slot *t = s->streams; t; t = t->next) {
    total++;
    by_addr += strcmp(t->addr, r->addr) == 0;
    by_key += r->owner[0] && strcmp(t->owner, r->owner) == 0;
  }
  const int ok = slot && total < cap && by_addr < per && by_key < per;
  if (ok) {
    snprintf(slot->addr, sizeof slot->addr, "%s", r->addr);
    snprintf(slot->owner, sizeof slot->owner, "%s", r->owner);
    slot->next = s->streams;
    if (s->streams)
      s->streams->prev = slot;
    s->streams = slot;
  }
  pthread_mutex_unlock(&s->conn_mu);
  if (ok)
    return slot;
  if (!slot)
    *ret = fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
  else if (total >= cap)
    *ret = fail(s, c, r, 503, "streams_full", NULL,
                "the server has %d event streams and synchronous waits open, all it allows "
                "(max_connections %d less connection_reserve %d); retry later",
                total, s->cfg.max_connections, s->cfg.connection_reserve);
  else if (by_key >= per)
    *ret = fail(s, c, r, 429, "too_many_streams", NULL,
                "the key '%s' has %d event streams and synchronous waits open, its limit "
                "(max_streams_per_client); close one first",
                r->owner, by_key);
  else
    *ret = fail(s, c, r, 429, "too_many_streams", NULL,
                "client address %s has %d event streams and synchronous waits open, its limit "
                "(max_streams_per_client); close one first",
                r->addr, by_addr);
  free(slot);
  return NULL;
}

static void stream_release(srv *s, stream_slot *slot) {
  if (!slot)
    return;
  pthread_mutex_lock(&s->conn_mu);
  if (slot->prev)
    slot->prev->next = slot->next;
  else
    s->streams = slot->next;
  if (slot->next)
    slot->next->prev = slot->prev;
  pthread_mutex_unlock(&s->conn_mu);
  free(slot);
}

/* Counts this connection against its API key; returns 0 to go on, else the 429 is in *ret and
 * the connection closes after it. */
static int key_connections(srv *s, struct MHD_Connection *c, req *r, enum MHD_Result *ret) {
  if (!s->api.auth || !r->authed || !r->ct)
    return 0;
  int n = 0;
  pthread_mutex_lock(&s->conn_mu);
  snprintf(r->ct->owner, sizeof r->ct->owner, "%s", r->owner);
  for (const conn_track *t = s->conns; t; t = t->next)
    n += strcmp(t->owner, r->owner) == 0;
  pthread_mutex_unlock(&s->conn_mu);
  if (n <= s->cfg.max_connections_per_key)
    return 0;
  r->close = 1;
  *ret = fail(s, c, r, 429, "too_many_connections", NULL,
              "the key '%s' has %d connections open, above its limit of %d "
              "(max_connections_per_key)",
              r->owner, n, s->cfg.max_connections_per_key);
  return -1;
}

/* ---- SSE ---- */

typedef struct sse {
  srv *s;
  stream_slot *slot;
  char id[QUEUE_ID_SIZE];
  char owner[QUEUE_NAME_SIZE];
  int all;
  uint64_t last;
  char *buf;
  size_t len, off, cap;
  int done;
} sse;

static int sse_append(sse *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sse_append(sse *x, const char *fmt, ...) {
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(x->buf + x->len, x->cap - x->len, fmt, ap);
    va_end(ap);
    if (w < 0)
      return -1;
    if ((size_t)w < x->cap - x->len) {
      x->len += (size_t)w;
      return 0;
    }
    size_t cap = x->cap * 2 + (size_t)w + 1;
    char *nb = realloc(x->buf, cap);
    if (!nb)
      return -1;
    x->buf = nb;
    x->cap = cap;
  }
}

static ssize_t sse_read(void *cls, uint64_t pos, char *out, size_t max) {
  (void)pos;
  sse *x = cls;
  srv *s = x->s;
  while (x->off >= x->len) {
    if (x->done)
      return MHD_CONTENT_READER_END_OF_STREAM;
    x->off = x->len = 0;
    if (atomic_load(&s->stopping)) {
      x->done = 1;
      continue;
    }
    queue_event *evs = NULL;
    int n = 0, done = 0;
    err e = {0};
    if (queue_events(s->q, x->id, x->all ? NULL : x->owner, x->last, s->cfg.sse_heartbeat * 1000,
                     &evs, &n, &done, &e) != ERR_OK) {
      x->done = 1; /* the job expired under us */
      continue;
    }
    for (int i = 0; i < n; i++) {
      if (sse_append(x, "id: %llu\nevent: %s\ndata: %s\n\n", (unsigned long long)evs[i].seq,
                     evs[i].type, evs[i].data)) {
        queue_events_free(evs, n);
        return MHD_CONTENT_READER_END_WITH_ERROR;
      }
      x->last = evs[i].seq;
    }
    queue_events_free(evs, n);
    if (!n && !done && sse_append(x, ": keep-alive\n\n"))
      return MHD_CONTENT_READER_END_WITH_ERROR;
    x->done = done;
  }
  size_t k = x->len - x->off < max ? x->len - x->off : max;
  memcpy(out, x->buf + x->off, k);
  x->off += k;
  return (ssize_t)k;
}

static void sse_free(void *cls) {
  sse *x = cls;
  atomic_fetch_sub(&x->s->sse_streams, 1);
  stream_release(x->s, x->slot);
  free(x->buf);
  free(x);
}

static enum MHD_Result serve_events(srv *s, struct MHD_Connection *c, req *r, const char *id) {
  const char *owner = owner_filter(s, r);
  queue_job_view v;
  err e = {0};
  if (queue_get(s->q, id, owner, &v, &e) != ERR_OK)
    return fail(s, c, r, 404, "not_found", NULL, "no job '%s'", id);
  const int final =
      v.state == QUEUE_SUCCEEDED || v.state == QUEUE_FAILED || v.state == QUEUE_CANCELLED;
  const uint64_t last_seq = v.last_seq;
  queue_view_clear(&v);
  const char *last = header(c, "Last-Event-ID");
  if (!last)
    last = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "last_event_id");
  unsigned long long after = 0;
  if (last && *last && api_parse_uint(last, UINT64_MAX, &after))
    return fail(s, c, r, 400, "invalid_field", "Last-Event-ID",
                "Last-Event-ID: expected the decimal id of an event (no sign, blank or leading "
                "zero), got '%.40s'",
                last);
  /* A browser's EventSource reconnects after every end of stream, forever; 204 is what stops
   * it. So a client that has had the final event gets 204 No Content. */
  if (final && after >= last_seq)
    return queue_resp(s, c, r, 204,
                      MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT), NULL);
  enum MHD_Result ret;
  stream_slot *slot = stream_acquire(s, c, r, &ret);
  if (!slot)
    return ret;
  sse *x = calloc(1, sizeof *x);
  if (!x || !(x->buf = malloc(4096))) {
    free(x);
    stream_release(s, slot);
    return fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
  }
  x->slot = slot;
  x->cap = 4096;
  x->s = s;
  snprintf(x->id, sizeof x->id, "%s", id);
  snprintf(x->owner, sizeof x->owner, "%s", r->owner);
  x->all = owner == NULL;
  x->last = after;
  /* reconnect delay for EventSource; resumption then goes by Last-Event-ID */
  sse_append(x, "retry: 2000\n\n");
  atomic_fetch_add(&s->sse_streams, 1);
  struct MHD_Response *resp =
      MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_read, x, sse_free);
  if (!resp) {
    sse_free(x);
    return MHD_NO;
  }
  MHD_add_response_header(resp, "X-Accel-Buffering", "no");
  return queue_resp(s, c, r, 200, resp, "text/event-stream");
}

/* ---- routes ---- */

static int valid_id(const char *id, size_t n) {
  if (n == 0 || n >= QUEUE_ID_SIZE)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f')))
      return 0;
  return 1;
}

/* A job's result file (fetched by the caller with rc/e), or the queue's error as JSON. */
static enum MHD_Result serve_result(srv *s, struct MHD_Connection *c, req *r, const char *id,
                                    int rc, const err *e, uint8_t *data, size_t len,
                                    const char *ctype, const char *disposition) {
  if (rc != ERR_OK) {
    api_error ae = {0};
    api_fail_queue(&ae, e);
    if (e->code == ERR_IO)
      api_fail(&ae, 500, "storage_error", NULL, "%s", e->msg);
    return send_error(s, c, r, &ae);
  }
  struct MHD_Response *resp = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
  if (resp) {
    MHD_add_response_header(resp, "Content-Disposition", disposition);
    MHD_add_response_header(resp, "X-Job-Id", id);
  }
  return queue_resp(s, c, r, 200, resp, ctype);
}

static enum MHD_Result serve_png(srv *s, struct MHD_Connection *c, req *r, const char *id, int n,
                                 const char *owner) {
  uint8_t *png = NULL;
  size_t len = 0;
  err e = {0};
  int rc = queue_image(s->q, id, owner, n, &png, &len, &e);
  char disp[96];
  snprintf(disp, sizeof disp, "inline; filename=\"%s-%d.png\"", id, n);
  return serve_result(s, c, r, id, rc, &e, png, len, "image/png", disp);
}

/* An inversion job's noise (.npy), to send back with a later job or to inspect with numpy. */
static enum MHD_Result serve_noise(srv *s, struct MHD_Connection *c, req *r, const char *id,
                                   const char *owner) {
  uint8_t *npy = NULL;
  size_t len = 0;
  err e = {0};
  int rc = queue_noise(s->q, id, owner, &npy, &len, &e);
  char disp[96];
  snprintf(disp, sizeof disp, "attachment; filename=\"%s-noise.npy\"", id);
  return serve_result(s, c, r, id, rc, &e, npy, len, "application/octet-stream", disp);
}

/* An audit job's report (JSON). */
static enum MHD_Result serve_report(srv *s, struct MHD_Connection *c, req *r, const char *id,
                                    const char *owner) {
  uint8_t *json = NULL;
  size_t len = 0;
  err e = {0};
  int rc = queue_report(s->q, id, owner, &json, &len, &e);
  char disp[96];
  snprintf(disp, sizeof disp, "inline; filename=\"%s-report.json\"", id);
  return serve_result(s, c, r, id, rc, &e, json, len, "application/json", disp);
}

/* The query parameter name as a number in [1, max] into *out (left as is when absent); returns
 * 0, or -1 with the 400 naming it in *ret. */
static int query_uint(srv *s, struct MHD_Connection *c, req *r, const char *name, int max,
                      unsigned long long *out, enum MHD_Result *ret) {
  const char *v = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, name);
  if (v && api_parse_uint(v, UINT64_MAX, out)) {
    *ret = fail(s, c, r, 400, "invalid_field", name,
                "%s: expected a decimal integer in [1, %d] (no sign, blank or leading zero), "
                "got '%.20s'",
                name, max, v);
    return -1;
  }
  if (*out < 1 || *out > (unsigned long long)max) {
    *ret = fail(s, c, r, 400, "out_of_range", name, "%s: %llu is out of range [1, %d]", name, *out,
                max);
    return -1;
  }
  return 0;
}

/* POST /v1/jobs/{id}/token[?ttl=SECONDS]: a URL token for the job's images and event stream
 * (server/token.c), signed with the caller's key, and the URLs that carry it. Without API keys
 * nothing needs one: token is null and the URLs are plain. */
static enum MHD_Result post_token(srv *s, struct MHD_Connection *c, req *r, const char *id,
                                  const char *owner) {
  unsigned long long ttl = 600;
  enum MHD_Result ret;
  if (query_uint(s, c, r, "ttl", TOKEN_MAX_TTL, &ttl, &ret))
    return ret;
  queue_job_view v;
  err e = {0};
  if (queue_get(s->q, id, owner, &v, &e) != ERR_OK)
    return fail(s, c, r, 404, "not_found", NULL, "no job '%s'", id);
  const int images = v.images;
  queue_view_clear(&v);
  const long long expires = (long long)time(NULL) + (long long)ttl;
  char tok[TOKEN_SIZE] = "", q[TOKEN_SIZE + 8] = "", url[256];
  if (s->api.auth) {
    pthread_rwlock_rdlock(&s->auth_lock);
    for (int i = 0; i < s->keys.n; i++)
      if (strcmp(s->keys.keys[i].name, r->owner) == 0)
        token_make(&s->keys.keys[i], id, expires, tok, sizeof tok);
    pthread_rwlock_unlock(&s->auth_lock);
    if (!tok[0]) /* the key was reloaded away between the check and here */
      return fail(s, c, r, 401, "unauthorized", NULL, "the key '%s' is no longer configured",
                  r->owner);
    snprintf(q, sizeof q, "?token=%s", tok);
  }
  json_t *imgs = json_array();
  for (int i = 0; i < images; i++) {
    snprintf(url, sizeof url, JOBS_PREFIX "%s/images/%d%s", id, i, q);
    json_array_append_new(imgs, json_string(url));
  }
  snprintf(url, sizeof url, JOBS_PREFIX "%s/events%s", id, q);
  char when[32];
  const time_t t = (time_t)expires;
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return send_json(s, c, r, 200,
                   json_pack("{s:s, s:o, s:I, s:s, s:s, s:o}", "job_id", id, "token",
                             tok[0] ? json_string(tok) : json_null(), "expires_in", (json_int_t)ttl,
                             "expires_at", when, "events", url, "images", imgs));
}

/* Hands the spec to the queue; on failure the error is already answered (*ret). */
static int submit(srv *s, struct MHD_Connection *c, req *r, queue_spec *spec, queue_job_view *v,
                  int part, enum MHD_Result *ret) {
  err e = {0};
  api_error ke = {0};
  if (api_idempotency(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Idempotency-Key"), r->body,
                      r->len, spec, &ke)) {
    queue_spec_clear(spec);
    *ret = send_error(s, c, r, &ke);
    return -1;
  }
  if (part > 0 && spec->idem_key[0]) { /* the parts of one A1111 request: a key each */
    const size_t n = strlen(spec->idem_key);
    snprintf(spec->idem_key + (n < QUEUE_KEY_SIZE - 8 ? n : QUEUE_KEY_SIZE - 8), 8, "/%d", part);
  }
  client_identity(c, r, spec->client, sizeof spec->client);
  if (queue_submit(s->q, spec, v, &e) != ERR_OK) {
    queue_spec_clear(spec);
    api_error ae = {0};
    api_fail_queue(&ae, &e);
    if (ae.status >= 500)
      log_event(LOG_ERROR, "submission failed", "req", r->id, "error", e.msg, LOG_END);
    *ret = send_error(s, c, r, &ae);
    return -1;
  }
  snprintf(r->job, sizeof r->job, "%s", v->id);
  return 0;
}

static enum MHD_Result post_job(srv *s, struct MHD_Connection *c, req *r) {
  queue_spec spec;
  api_error ae = {0};
  if (api_parse_job(&s->api, r->body, r->len, r->owner, &spec, &ae))
    return send_error(s, c, r, &ae);
  queue_job_view v;
  enum MHD_Result ret;
  if (submit(s, c, r, &spec, &v, 0, &ret))
    return ret;
  char loc[128];
  snprintf(loc, sizeof loc, JOBS_PREFIX "%s", v.id);
  json_t *j = api_job_json(&v, JOBS_PREFIX);
  const int replayed = v.replayed;
  queue_view_clear(&v);
  log_event(LOG_INFO, replayed ? "job replayed (Idempotency-Key)" : "job accepted", "req", r->id,
            "job", r->job, LOG_END);
  /* a retry gets the first job, 200: nothing new was accepted */
  return send_json_h(s, c, r, replayed ? 200 : 202, j, MHD_HTTP_HEADER_LOCATION, loc);
}

/* Submits and waits: the connection thread blocks, the workers do not. */
static int run_sync(srv *s, struct MHD_Connection *c, req *r, queue_spec *spec,
                    queue_job_view *done, enum MHD_Result *ret) {
  stream_slot *slot = stream_acquire(s, c, r, ret); /* the wait holds a connection as a stream */
  queue_job_view v;
  if (!slot || submit(s, c, r, spec, &v, 0, ret)) {
    if (!slot)
      queue_spec_clear(spec);
    stream_release(s, slot);
    return -1;
  }
  queue_view_clear(&v);
  log_event(LOG_INFO, "job accepted (synchronous)", "req", r->id, "job", r->job, LOG_END);
  err e = {0};
  const int rc = queue_wait(s->q, r->job, s->cfg.generate_timeout * 1000, done, &e);
  stream_release(s, slot);
  if (rc != ERR_OK) {
    *ret = fail(s, c, r, 500, "internal", NULL, "%s", e.msg);
    return -1;
  }
  if (done->state == QUEUE_SUCCEEDED)
    return 0;
  char loc[128];
  snprintf(loc, sizeof loc, JOBS_PREFIX "%s", r->job);
  api_error fe = {0};
  if (done->state == QUEUE_FAILED)
    api_fail(&fe, 500, "job_failed", NULL, "job %s failed: %s", r->job, done->error);
  else if (done->state == QUEUE_CANCELLED)
    api_fail(&fe, 409, "cancelled", NULL, "job %s was cancelled", r->job);
  else if (atomic_load(&s->stopping))
    api_fail(&fe, 503, "unavailable", NULL,
             "the server is stopping; job %s stays queued and runs after the restart (%s)", r->job,
             loc);
  else
    api_fail(&fe, 504, "timeout", NULL, "job %s did not finish within %d s; it goes on: follow %s",
             r->job, s->cfg.generate_timeout, loc);
  queue_view_clear(done);
  *ret = send_error(s, c, r, &fe);
  return -1;
}

static enum MHD_Result post_generate(srv *s, struct MHD_Connection *c, req *r) {
  queue_spec spec;
  api_error ae = {0};
  if (api_parse_job(&s->api, r->body, r->len, r->owner, &spec, &ae))
    return send_error(s, c, r, &ae);
  queue_job_view v;
  enum MHD_Result ret;
  if (run_sync(s, c, r, &spec, &v, &ret))
    return ret;
  uint8_t *png = NULL;
  size_t len = 0;
  err e = {0};
  if (queue_image(s->q, v.id, NULL, 0, &png, &len, &e) != ERR_OK) {
    queue_view_clear(&v);
    return fail(s, c, r, 500, "storage_error", NULL, "%s", e.msg);
  }
  char seed[32];
  snprintf(seed, sizeof seed, "%llu", (unsigned long long)v.spec.seed);
  struct MHD_Response *resp = MHD_create_response_from_buffer(len, png, MHD_RESPMEM_MUST_FREE);
  if (resp) {
    char loc[128];
    snprintf(loc, sizeof loc, JOBS_PREFIX "%s", v.id);
    MHD_add_response_header(resp, "X-Job-Id", v.id);
    MHD_add_response_header(resp, "X-Seed", seed);
    MHD_add_response_header(resp, "Content-Location", loc);
  }
  queue_view_clear(&v);
  return queue_resp(s, c, r, 200, resp, "image/png");
}

/* ---- AUTOMATIC1111 /sdapi/v1 ---- */

/* The key a client's A1111 options are kept under: API key name and client identity. */
static void sd_client(struct MHD_Connection *c, const req *r, char *out, size_t n) {
  char client[QUEUE_NAME_SIZE];
  client_identity(c, r, client, sizeof client);
  snprintf(out, n, "%s|%s", r->owner, client);
}

/* The model this client chose, copied into model ("" if none), and its clip skip (0: none);
 * 0 if the client chose nothing. */
static int sd_choice_get(srv *s, const char *client, char *model, size_t n, int *clip_skip) {
  int found = 0;
  model[0] = 0;
  *clip_skip = 0;
  pthread_mutex_lock(&s->conn_mu);
  for (int i = 0; i < SD_CHOICES && !found; i++)
    if (strcmp(s->sd_choices[i].client, client) == 0) {
      snprintf(model, n, "%s", s->sd_choices[i].model);
      *clip_skip = s->sd_choices[i].clip_skip;
      found = 1;
    }
  pthread_mutex_unlock(&s->conn_mu);
  return found;
}

/* Keeps a client's choice: model "" and clip_skip 0 leave what it chose before. */
static void sd_choice_set(srv *s, const char *client, const char *model, int clip_skip) {
  pthread_mutex_lock(&s->conn_mu);
  int at = -1;
  for (int i = 0; i < SD_CHOICES && at < 0; i++)
    if (strcmp(s->sd_choices[i].client, client) == 0)
      at = i;
  if (at < 0) {
    at = s->sd_next;
    s->sd_next = (s->sd_next + 1) % SD_CHOICES;
  }
  if (strcmp(s->sd_choices[at].client, client) != 0) { /* a new slot: nothing chosen yet */
    s->sd_choices[at].model[0] = 0;
    s->sd_choices[at].clip_skip = 0;
  }
  snprintf(s->sd_choices[at].client, sizeof s->sd_choices[at].client, "%s", client);
  if (model[0])
    snprintf(s->sd_choices[at].model, sizeof s->sd_choices[at].model, "%s", model);
  if (clip_skip)
    s->sd_choices[at].clip_skip = clip_skip;
  pthread_mutex_unlock(&s->conn_mu);
}

static enum MHD_Result get_sd_options(srv *s, struct MHD_Connection *c, req *r) {
  char client[2 * QUEUE_NAME_SIZE + 2], model[QUEUE_NAME_SIZE];
  int skip;
  sd_client(c, r, client, sizeof client);
  if (!sd_choice_get(s, client, model, sizeof model, &skip) || !model[0])
    snprintf(model, sizeof model, "%s", s->api.default_model);
  return send_json(s, c, r, 200,
                   json_pack("{s:s, s:n, s:s, s:i, s:i}", "sd_model_checkpoint", model,
                             "sd_checkpoint_hash", "samples_format", "png",
                             "show_progress_every_n_steps", 1, "CLIP_stop_at_last_layers",
                             skip ? skip : 1));
}

/* Their options: sd_model_checkpoint (a model of ours) and CLIP_stop_at_last_layers (their
 * clip skip, 1 to 12; text-to-image models take it, up to their text encoder's layers) are
 * kept, for this client only; the others configure their UI and server, none of which exists
 * here, and are ignored. */
static enum MHD_Result post_sd_options(srv *s, struct MHD_Connection *c, req *r) {
  json_t *j = r->len ? json_loadb(r->body, r->len, 0, NULL) : NULL;
  if (!json_is_object(j)) {
    json_decref(j);
    return fail(s, c, r, 400, "invalid_json", NULL, "the body must be a JSON object of options");
  }
  const json_t *ck = json_object_get(j, "sd_model_checkpoint");
  char model[QUEUE_NAME_SIZE] = "";
  const json_t *skip = json_object_get(j, "CLIP_stop_at_last_layers");
  int clip_skip = 0;
  api_error ae = {0};
  if (skip && !json_is_null(skip) && api_sd_clip_option(skip, &clip_skip, &ae)) {
    json_decref(j);
    return send_error(s, c, r, &ae);
  }
  if (ck && !json_is_string(ck)) {
    json_decref(j);
    return fail(s, c, r, 400, "wrong_type", "sd_model_checkpoint",
                "sd_model_checkpoint: expected a model name");
  }
  if (ck) {
    snprintf(model, sizeof model, "%s", json_string_value(ck));
    char *br = strstr(model, " ["); /* their titles carry " [hash]" */
    if (br)
      *br = 0;
  }
  json_decref(j);
  queue_model_desc md;
  if (model[0] && queue_model_get(s->q, -1, model, &md) != ERR_OK)
    return fail(s, c, r, 400, "invalid_field", "sd_model_checkpoint",
                "sd_model_checkpoint: no model named '%s' (GET /sdapi/v1/sd-models lists them)",
                model);
  if (model[0])
    queue_model_desc_clear(&md);
  if (model[0] || clip_skip) {
    char client[2 * QUEUE_NAME_SIZE + 2];
    sd_client(c, r, client, sizeof client);
    sd_choice_set(s, client, model, clip_skip);
  }
  return send_json(s, c, r, 200, json_null());
}

/* The newest preview of a job (base64 PNG, malloc'ed, the data URL's prefix cut), or NULL. */
static char *last_preview(srv *s, const char *id, const char *owner) {
  queue_event *evs = NULL;
  int n = 0, done = 0;
  err e = {0};
  char *out = NULL;
  if (queue_events(s->q, id, owner, 0, 0, &evs, &n, &done, &e) != ERR_OK)
    return NULL;
  for (int i = n - 1; i >= 0 && !out; i--) {
    if (strcmp(evs[i].type, "progress") != 0 || !strstr(evs[i].data, "\"preview\""))
      continue;
    json_t *d = json_loads(evs[i].data, 0, NULL);
    const char *p = json_string_value(json_object_get(d, "preview"));
    const char *comma = p ? strchr(p, ',') : NULL;
    if (comma)
      out = strdup(comma + 1);
    json_decref(d);
  }
  queue_events_free(evs, n);
  return out;
}

/* Submits the n jobs of an A1111 request; views[i] gets job i, *ret the answer on failure
 * (jobs already submitted are cancelled). Job i > 0 keeps an Idempotency-Key apart with "/i". */
static int sd_submit(srv *s, struct MHD_Connection *c, req *r, api_sd_job *t, queue_job_view *views,
                     enum MHD_Result *ret) {
  for (int i = 0; i < t->count; i++) {
    queue_spec spec;
    if (api_sd_job_at(&s->api, t, i, &spec)) {
      *ret = fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
    } else if (submit(s, c, r, &spec, &views[i], i, ret) == 0) {
      continue;
    }
    for (int k = 0; k < i; k++) {
      err ce = {0};
      queue_cancel(s->q, views[k].id, NULL, NULL, &ce);
      queue_view_clear(&views[k]);
    }
    return -1;
  }
  return 0;
}
/* Waits for the n jobs in turn (one deadline for all); an interrupted (cancelled) one stops
 * the rest, as their interrupt stops the whole request. Returns -1 with *ret answered on a
 * failure or timeout. */
static int sd_wait(srv *s, struct MHD_Connection *c, req *r, queue_job_view *views, int n,
                   enum MHD_Result *ret) {
  const double deadline = mono() + s->cfg.generate_timeout;
  int stopped = 0;
  for (int i = 0; i < n; i++) {
    err e = {0};
    if (stopped) {
      queue_cancel(s->q, views[i].id, NULL, NULL, &e);
      memset(&e, 0, sizeof e);
    }
    char id[QUEUE_ID_SIZE];
    snprintf(id, sizeof id, "%s", views[i].id);
    queue_view_clear(&views[i]);
    const int left = (int)((deadline - mono()) * 1000);
    if (queue_wait(s->q, id, left > 0 ? left : 0, &views[i], &e) != ERR_OK) {
      *ret = fail(s, c, r, 500, "internal", NULL, "%s", e.msg);
      return -1;
    }
    stopped |= views[i].state == QUEUE_CANCELLED;
    if (views[i].state == QUEUE_FAILED) {
      *ret = fail(s, c, r, 500, "job_failed", NULL, "job %s failed: %s", id, views[i].error);
      return -1;
    }
    if (views[i].state != QUEUE_SUCCEEDED && views[i].state != QUEUE_CANCELLED) {
      *ret =
          atomic_load(&s->stopping)
              ? fail(s, c, r, 503, "unavailable", NULL,
                     "the server is stopping; job %s stays queued and runs after the restart", id)
              : fail(s, c, r, 504, "timeout", NULL,
                     "job %s did not finish within %d s; it goes on: follow " JOBS_PREFIX "%s", id,
                     s->cfg.generate_timeout, id);
      return -1;
    }
  }
  return 0;
}

/* Job i's picture as base64: the image of a finished job, the newest preview (the model's
 * estimate of the clean picture at the step it stopped) of an interrupted one, else NULL. */
static char *sd_picture(srv *s, const queue_job_view *v) {
  if (v->state != QUEUE_SUCCEEDED)
    return last_preview(s, v->id, NULL);
  uint8_t *png = NULL;
  size_t len = 0;
  err e = {0};
  char *b64 =
      queue_image(s->q, v->id, NULL, 0, &png, &len, &e) == ERR_OK ? base64_encode(png, len) : NULL;
  free(png);
  return b64;
}

/* POST /sdapi/v1/txt2img and /sdapi/v1/img2img: submit, wait, answer their JSON. */
static enum MHD_Result post_sd(srv *s, struct MHD_Connection *c, req *r) {
  const int img2img = strcmp(r->path, "/sdapi/v1/img2img") == 0;
  char client[2 * QUEUE_NAME_SIZE + 2], model[QUEUE_NAME_SIZE];
  int skip;
  sd_client(c, r, client, sizeof client);
  sd_choice_get(s, client, model, sizeof model, &skip);
  api_sd_job t;
  api_error ae = {0};
  if (api_sd_parse(&s->api, img2img, r->body, r->len, r->owner, model[0] ? model : NULL, skip, &t,
                   &ae))
    return send_error(s, c, r, &ae);
  enum MHD_Result ret;
  queue_job_view *views = calloc(t.count > 0 ? (size_t)t.count : 1, sizeof *views);
  stream_slot *slot = views ? stream_acquire(s, c, r, &ret) : NULL;
  if (!views)
    ret = fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
  int n = 0;
  if (slot && sd_submit(s, c, r, &t, views, &ret) == 0) {
    n = t.count;
    log_event(LOG_INFO, "a1111 jobs accepted (synchronous)", "req", r->id, "job", views[0].id,
              LOG_END);
    if (sd_wait(s, c, r, views, n, &ret) == 0) {
      char **b64 = calloc(n > 0 ? (size_t)n : 1, sizeof *b64);
      for (int i = 0; b64 && i < n; i++)
        b64[i] = sd_picture(s, &views[i]);
      json_t *j = b64 ? api_sd_result_json(&s->api, views, n, b64, r->body, r->len) : NULL;
      for (int i = 0; b64 && i < n; i++)
        free(b64[i]);
      free(b64);
      ret = j ? send_json(s, c, r, 200, j)
              : fail(s, c, r, 500, "storage_error", NULL, "reading the images back failed");
    }
  }
  stream_release(s, slot);
  for (int i = 0; i < n; i++)
    queue_view_clear(&views[i]);
  free(views);
  api_sd_job_clear(&t);
  return ret;
}

static enum MHD_Result post_png_info(srv *s, struct MHD_Connection *c, req *r) {
  json_t *j = NULL;
  api_error ae = {0};
  if (api_sd_png_info(&s->api, r->body, r->len, &j, &ae))
    return send_error(s, c, r, &ae);
  return send_json(s, c, r, 200, j);
}

static enum MHD_Result get_job_list(srv *s, struct MHD_Connection *c, req *r) {
  const char *cursor = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "cursor");
  const char *st = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "state");
  unsigned long long limit = 20;
  enum MHD_Result ret;
  if (query_uint(s, c, r, "limit", MAX_LIST, &limit, &ret))
    return ret;
  if (cursor && !valid_id(cursor, strlen(cursor)))
    return fail(s, c, r, 400, "invalid_field", "cursor",
                "cursor: not a cursor from a previous page ('%.40s')", cursor);
  int state = -1;
  if (st && (state = queue_state_from_name(st)) < 0)
    return fail(s, c, r, 400, "invalid_field", "state",
                "state: '%.20s' is not one of queued, running, succeeded, failed, cancelled", st);
  queue_job_view *views = calloc((size_t)limit, sizeof *views);
  if (!views)
    return fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
  int n = 0, more = 0;
  queue_list(s->q, owner_filter(s, r), cursor, state, (int)limit, views, &n, &more);
  json_t *arr = json_array();
  for (int i = 0; i < n; i++) {
    json_array_append_new(arr, api_job_json(&views[i], JOBS_PREFIX));
    queue_view_clear(&views[i]);
  }
  json_t *j = json_pack("{s:o, s:o}", "jobs", arr, "next_cursor",
                        more && n ? json_string(views[n - 1].id) : json_null());
  free(views);
  return send_json(s, c, r, 200, j);
}

static enum MHD_Result route_job(srv *s, struct MHD_Connection *c, req *r, const char *rest) {
  enum MHD_Result ret;
  const char *slash = strchr(rest, '/');
  size_t idlen = slash ? (size_t)(slash - rest) : strlen(rest);
  if (!valid_id(rest, idlen))
    return fail(s, c, r, 404, "not_found", NULL, "no job '%.*s'", (int)(idlen > 40 ? 40 : idlen),
                rest);
  char id[QUEUE_ID_SIZE];
  snprintf(id, sizeof id, "%.*s", (int)idlen, rest);
  snprintf(r->job, sizeof r->job, "%s", id);
  const char *owner = owner_filter(s, r);
  const int get = strcmp(r->method, "GET") == 0;
  if (!slash) {
    if (get) {
      if (authorize(s, c, r, SCOPE_READ, &ret))
        return ret;
      queue_job_view v;
      err e = {0};
      if (queue_get(s->q, id, owner, &v, &e) != ERR_OK)
        return fail(s, c, r, 404, "not_found", NULL, "no job '%s'", id);
      json_t *j = api_job_json(&v, JOBS_PREFIX);
      queue_view_clear(&v);
      return send_json(s, c, r, 200, j);
    }
    if (strcmp(r->method, "DELETE") == 0) {
      if (authorize(s, c, r, SCOPE_CANCEL, &ret))
        return ret;
      queue_job_view v;
      memset(&v, 0, sizeof v);
      err e = {0};
      int rc = queue_cancel(s->q, id, owner, &v, &e);
      if (rc == QUEUE_CONFLICT) {
        api_error ae = {0};
        api_fail_queue(&ae, &e);
        queue_view_clear(&v);
        return send_error(s, c, r, &ae);
      }
      if (rc != ERR_OK)
        return fail(s, c, r, 404, "not_found", NULL, "no job '%s'", id);
      json_t *j = api_job_json(&v, JOBS_PREFIX);
      queue_view_clear(&v);
      return send_json(s, c, r, 200, j);
    }
    return method_not_allowed(s, c, r, "GET, DELETE");
  }
  if (strcmp(slash, "/events") == 0) {
    if (!get)
      return method_not_allowed(s, c, r, "GET");
    if (authorize(s, c, r, SCOPE_READ, &ret))
      return ret;
    return serve_events(s, c, r, id);
  }
  if (strcmp(slash, "/token") == 0) {
    if (strcmp(r->method, "POST") != 0)
      return method_not_allowed(s, c, r, "POST");
    if (authorize(s, c, r, SCOPE_READ, &ret))
      return ret;
    return post_token(s, c, r, id, owner);
  }
  if (strcmp(slash, "/noise.npy") == 0) {
    if (!get)
      return method_not_allowed(s, c, r, "GET");
    if (authorize(s, c, r, SCOPE_READ, &ret))
      return ret;
    return serve_noise(s, c, r, id, owner);
  }
  if (strcmp(slash, "/report.json") == 0) {
    if (!get)
      return method_not_allowed(s, c, r, "GET");
    if (authorize(s, c, r, SCOPE_READ, &ret))
      return ret;
    return serve_report(s, c, r, id, owner);
  }
  if (strncmp(slash, "/images/", 8) == 0) {
    if (!get)
      return method_not_allowed(s, c, r, "GET");
    if (authorize(s, c, r, SCOPE_READ, &ret))
      return ret;
    const char *ns = slash + 8;
    unsigned long long n;
    if (api_parse_uint(ns, UINT64_MAX, &n))
      return fail(s, c, r, 400, "invalid_field", "n",
                  "n: the image index is a decimal integer (no sign, blank, escape or leading "
                  "zero), got '%.20s'",
                  ns);
    if (n > 1 << 20)
      return fail(s, c, r, 404, "not_found", NULL, "no image %llu", n);
    return serve_png(s, c, r, id, (int)n, owner);
  }
  return fail(s, c, r, 404, "not_found", NULL, "no such resource");
}

static enum MHD_Result get_healthz(srv *s, struct MHD_Connection *c, req *r) {
  return send_json(s, c, r, 200, json_pack("{s:s}", "status", "ok"));
}

static enum MHD_Result get_readyz(srv *s, struct MHD_Connection *c, req *r) {
  char why[128] = "";
  int ok = !atomic_load(&s->stopping) && queue_ready(s->q, why, sizeof why);
  if (atomic_load(&s->stopping))
    snprintf(why, sizeof why, "shutting down");
  return send_json(s, c, r, ok ? 200 : 503,
                   ok ? json_pack("{s:b}", "ready", 1)
                      : json_pack("{s:b, s:s}", "ready", 0, "reason", why));
}

static enum MHD_Result get_metrics(srv *s, struct MHD_Connection *c, req *r) {
  enum MHD_Result ret;
  if (s->api.auth && authorize(s, c, r, SCOPE_METRICS, &ret))
    return ret;
  queue_stats qs;
  queue_get_stats(s->q, &qs);
  api_http_stats hs = {{0}, 0, 0, 0, 0};
  for (int i = 0; i < 6; i++)
    hs.requests[i] = atomic_load(&s->requests[i]);
  hs.connections = atomic_load(&s->connections);
  hs.open_connections = atomic_load(&s->open_connections);
  hs.sse_streams = atomic_load(&s->sse_streams);
  hs.auth_failures = atomic_load(&s->auth_failures);
  char *text = api_metrics_text(&qs, &hs, internals_allowed(s, r));
  if (!text)
    return fail(s, c, r, 503, "out_of_memory", NULL, "out of memory");
  return send_text(s, c, r, 200, text, strlen(text), "text/plain; version=0.0.4; charset=utf-8");
}

/* the read-only descriptions: models, capabilities, and A1111's samplers and models */
static enum MHD_Result get_listing(srv *s, struct MHD_Connection *c, req *r) {
  const char *p = r->path;
  json_t *j = strcmp(p, "/v1/models") == 0 ? api_models_json(&s->api, internals_allowed(s, r))
              : strcmp(p, "/v1/capabilities") == 0   ? api_capabilities_json(&s->api)
              : strcmp(p, "/sdapi/v1/samplers") == 0 ? api_sd_samplers_json()
                                                     : api_sd_models_json(&s->api);
  return send_json(s, c, r, 200, j);
}

static enum MHD_Result get_sd_progress(srv *s, struct MHD_Connection *c, req *r) {
  queue_job_view v;
  memset(&v, 0, sizeof v);
  int queued = 0, have = queue_current(s->q, owner_filter(s, r), &v, &queued);
  /* their skip_current_image=true: the client does not want the picture */
  const char *skip = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "skip_current_image");
  const int want = !(skip && strcasecmp(skip, "true") == 0);
  char *preview = want && have && v.state == QUEUE_RUNNING ? last_preview(s, v.id, NULL) : NULL;
  json_t *j = api_sd_progress_json(&v, have, have && v.state == QUEUE_QUEUED ? queued - 1 : queued,
                                   preview);
  free(preview);
  if (have)
    queue_view_clear(&v);
  return send_json(s, c, r, 200, j);
}

static enum MHD_Result post_interrupt(srv *s, struct MHD_Connection *c, req *r) {
  /* without API keys every client is the same owner: only the caller's own jobs stop */
  char client[QUEUE_NAME_SIZE];
  client_identity(c, r, client, sizeof client);
  int n = queue_cancel_running(s->q, owner_filter(s, r), s->api.auth ? NULL : client);
  char nb[16];
  snprintf(nb, sizeof nb, "%d", n);
  log_event(LOG_INFO, "interrupt", "req", r->id, "cancelled", nb, LOG_END);
  return send_json(s, c, r, 200, json_object());
}

/* The web UI, /docs and /openapi.yaml (server/static.c): public, as the page that asks for a key
 * must load without one. The policy lets them load nothing from elsewhere and run no inline
 * script; previews are data: URLs, uploads and downloads blob: ones. */
static enum MHD_Result serve_static(srv *s, struct MHD_Connection *c, req *r,
                                    const static_file *f) {
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(f->len, (void *)f->data, MHD_RESPMEM_PERSISTENT);
  if (resp) {
    MHD_add_response_header(resp, "Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data: blob:; "
                            "connect-src 'self'; style-src 'self'; script-src 'self'; "
                            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'");
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
  }
  return queue_resp(s, c, r, 200, resp, f->ctype);
}

/* The fixed routes: one row per path and method. GET rows answer HEAD too; scope 0 checks no
 * key (or, for /metrics, only when keys are configured); `always` rows answer while the server
 * stops, so that probes see it stopping. Paths under JOBS_PREFIX go to route_job. */
enum { M_GET, M_POST };
typedef enum MHD_Result (*route_fn)(srv *s, struct MHD_Connection *c, req *r);
typedef struct route_row {
  const char *path;
  int method, scope, always;
  route_fn fn;
  const char *allow; /* the Allow header of a 405 on this path */
} route_row;

static const route_row routes[] = {
    {"/healthz", M_GET, 0, 1, get_healthz, "GET"},
    {"/readyz", M_GET, 0, 1, get_readyz, "GET"},
    {"/metrics", M_GET, 0, 0, get_metrics, "GET"},
    {"/v1/models", M_GET, SCOPE_READ, 0, get_listing, "GET"},
    {"/v1/capabilities", M_GET, SCOPE_READ, 0, get_listing, "GET"},
    {"/sdapi/v1/samplers", M_GET, SCOPE_READ, 0, get_listing, "GET"},
    {"/sdapi/v1/sd-models", M_GET, SCOPE_READ, 0, get_listing, "GET"},
    {"/v1/jobs", M_POST, SCOPE_SUBMIT, 0, post_job, "GET, POST"},
    {"/v1/jobs", M_GET, SCOPE_READ, 0, get_job_list, "GET, POST"},
    {"/v1/jobs/", M_POST, SCOPE_SUBMIT, 0, post_job, "GET, POST"},
    {"/v1/jobs/", M_GET, SCOPE_READ, 0, get_job_list, "GET, POST"},
    {"/v1/generate", M_POST, SCOPE_SUBMIT, 0, post_generate, "POST"},
    {"/sdapi/v1/txt2img", M_POST, SCOPE_SUBMIT, 0, post_sd, "POST"},
    {"/sdapi/v1/img2img", M_POST, SCOPE_SUBMIT, 0, post_sd, "POST"},
    {"/sdapi/v1/png-info", M_POST, SCOPE_READ, 0, post_png_info, "POST"},
    {"/sdapi/v1/options", M_GET, SCOPE_READ, 0, get_sd_options, "GET, POST"},
    {"/sdapi/v1/options", M_POST, SCOPE_SUBMIT, 0, post_sd_options, "GET, POST"},
    {"/sdapi/v1/progress", M_GET, SCOPE_READ, 0, get_sd_progress, "GET"},
    {"/sdapi/v1/interrupt", M_POST, SCOPE_CANCEL, 0, post_interrupt, "POST"},
};

static enum MHD_Result route(srv *s, struct MHD_Connection *c, req *r) {
  const char *p = r->path, *m = r->method;
  const int get = strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0;
  const int post = strcmp(m, "POST") == 0;
  const route_row *at = NULL, *hit = NULL;
  for (size_t i = 0; i < sizeof routes / sizeof *routes && !hit; i++)
    if (strcmp(p, routes[i].path) == 0) {
      at = at ? at : &routes[i];
      if ((routes[i].method == M_GET && get) || (routes[i].method == M_POST && post))
        hit = &routes[i];
    }
  if (!(at && at->always) && atomic_load(&s->stopping))
    return fail(s, c, r, 503, "unavailable", NULL, "the server is shutting down");
  if (!at) {
    const static_file *f = static_find(p);
    if (f)
      return get ? serve_static(s, c, r, f) : method_not_allowed(s, c, r, "GET");
    if (strncmp(p, JOBS_PREFIX, strlen(JOBS_PREFIX)) == 0)
      return route_job(s, c, r, p + strlen(JOBS_PREFIX));
    return fail(s, c, r, 404, "not_found", NULL, "no route %s %.100s", m, p);
  }
  if (!hit)
    return method_not_allowed(s, c, r, at->allow);
  enum MHD_Result ret;
  if (hit->scope && authorize(s, c, r, hit->scope, &ret))
    return ret;
  return hit->fn(s, c, r);
}

/* ---- the libmicrohttpd callbacks ---- */

static enum MHD_Result preflight(srv *s, struct MHD_Connection *c, req *r) {
  struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
  if (!resp)
    return MHD_NO;
  if (cors_origin(s, c)) {
    MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS");
    MHD_add_response_header(
        resp, "Access-Control-Allow-Headers",
        "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-Client-Token, "
        "X-Request-Id");
    MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
  }
  return queue_resp(s, c, r, 204, resp, NULL);
}

static void client_address(struct MHD_Connection *c, char *out, size_t n) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
  const struct sockaddr *sa = ci ? ci->client_addr : NULL;
  const void *a =
      !sa                         ? NULL
      : sa->sa_family == AF_INET  ? (const void *)&((const struct sockaddr_in *)sa)->sin_addr
      : sa->sa_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                                  : NULL;
  if (!a || !inet_ntop(sa->sa_family, a, out, (socklen_t)n))
    snprintf(out, n, "unknown");
}

static void request_id(srv *s, struct MHD_Connection *c, char *out, size_t n) {
  const char *in = header(c, "X-Request-Id");
  if (in) { /* keep a caller's id when it is harmless to log */
    size_t len = strlen(in);
    int ok = len > 0 && len < n && len <= 64;
    for (size_t i = 0; ok && i < len; i++)
      ok = (in[i] >= '0' && in[i] <= '9') || (in[i] >= 'a' && in[i] <= 'z') ||
           (in[i] >= 'A' && in[i] <= 'Z') || in[i] == '-' || in[i] == '_' || in[i] == '.';
    if (ok) {
      snprintf(out, n, "%s", in);
      return;
    }
  }
  snprintf(out, n, "r%llu", (unsigned long long)atomic_fetch_add(&s->req_counter, 1));
}

/* How the body is framed, from every header line (libmicrohttpd would use the first of two). */
typedef struct framing {
  int n_length, n_encoding;
  const char *length, *encoding;
} framing;

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value) {
  (void)kind;
  framing *f = cls;
  if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
    f->n_length++;
    f->length = value;
  } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
    f->n_encoding++;
    f->encoding = value;
  }
  return MHD_YES;
}

/* Refuses a body whose length two parties could read differently (two Content-Length headers,
 * Content-Length with Transfer-Encoding, a length that is not plain digits): behind a proxy
 * that is how requests are smuggled. Such a connection is closed after the answer. Returns 0 to
 * go on. */
static int check_framing(srv *s, struct MHD_Connection *c, req *r, enum MHD_Result *ret) {
  framing f = {0};
  MHD_get_connection_values(c, MHD_HEADER_KIND, count_framing, &f);
  unsigned long long len = 0;
  r->close = 1;
  if (f.n_length > 1)
    *ret = fail(s, c, r, 400, "invalid_header", "Content-Length",
                "Content-Length: sent %d times; send it once", f.n_length);
  else if (f.n_length && f.n_encoding)
    *ret = fail(s, c, r, 400, "invalid_header", "Transfer-Encoding",
                "Transfer-Encoding: not with Content-Length; send one of them");
  else if (f.n_encoding > 1 || (f.n_encoding && strcasecmp(f.encoding, "chunked") != 0))
    *ret = fail(s, c, r, 400, "invalid_header", "Transfer-Encoding",
                "Transfer-Encoding: only a single 'chunked' is supported");
  else if (f.n_length && api_parse_uint(f.length, UINT64_MAX, &len))
    *ret = fail(s, c, r, 400, "invalid_header", "Content-Length",
                "Content-Length: expected a decimal byte count (no sign, blank or leading zero), "
                "got '%.40s'",
                f.length);
  else if (len > (unsigned long long)s->cfg.max_body_bytes)
    *ret = fail(s, c, r, 413, "payload_too_large", NULL,
                "the body is larger than this server's limit of %d bytes", s->cfg.max_body_bytes);
  else
    return r->close = 0;
  return -1;
}

/* The job a URL token may open: "/v1/jobs/ID/events" and "/v1/jobs/ID/images/N" only. Copies ID
 * into job; 0 if the path is not one of them. */
static int token_route(const char *url, char job[QUEUE_ID_SIZE]) {
  if (strncmp(url, JOBS_PREFIX, strlen(JOBS_PREFIX)) != 0)
    return 0;
  const char *id = url + strlen(JOBS_PREFIX), *slash = strchr(id, '/');
  if (!slash || !valid_id(id, (size_t)(slash - id)) ||
      (strcmp(slash, "/events") != 0 && strncmp(slash, "/images/", 8) != 0))
    return 0;
  snprintf(job, QUEUE_ID_SIZE, "%.*s", (int)(slash - id), id);
  return 1;
}

/* Who sends r: the key of its Authorization header; else, on an event stream, the key as
 * ?access_token= (EventSource cannot send headers); else, on a job's images and events, a URL
 * token of that job (?token=, server/token.c), which grants reading it only. The logged path
 * never includes the query. Without keys every request holds every scope. */
static void authenticate(srv *s, struct MHD_Connection *c, req *r, const char *url) {
  if (!s->api.auth) {
    r->authed = 1;
    r->scopes = 31;
    return;
  }
  const char *authz = header(c, MHD_HTTP_HEADER_AUTHORIZATION);
  char bearer[300], job[QUEUE_ID_SIZE];
  const size_t plen = strlen(url);
  const char *tok = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "access_token");
  const char *utok = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "token");
  if (!authz && tok && plen > 7 && strcmp(url + plen - 7, "/events") == 0 && strlen(tok) < 256) {
    snprintf(bearer, sizeof bearer, "Bearer %s", tok);
    authz = bearer;
  }
  pthread_rwlock_rdlock(&s->auth_lock);
  const auth_key *k = auth_check(&s->keys, authz);
  int scopes = k ? k->scopes : 0;
  if (!authz && utok && strcmp(r->method, "GET") == 0 && token_route(url, job)) {
    k = token_check(&s->keys, job, utok, &r->why);
    scopes = k ? k->scopes & (SCOPE_READ | SCOPE_ADMIN) : 0;
  }
  if (k) {
    r->authed = 1;
    r->scopes = scopes;
    snprintf(r->owner, sizeof r->owner, "%s", k->name);
  }
  pthread_rwlock_unlock(&s->auth_lock);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls) {
  (void)version;
  srv *s = cls;
  req *r = *con_cls;
  if (!r) {
    r = calloc(1, sizeof *r);
    if (!r)
      return MHD_NO;
    *con_cls = r;
    r->t0 = mono();
    request_id(s, c, r->id, sizeof r->id);
    snprintf(r->method, sizeof r->method, "%s", method);
    snprintf(r->path, sizeof r->path, "%s", url);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    r->ct = ci ? (conn_track *)ci->socket_context : NULL;
    client_address(c, r->addr, sizeof r->addr);
    if (strlen(url) >= sizeof r->path)
      return fail(s, c, r, 414, "uri_too_long", NULL, "the URL is longer than %zu bytes",
                  sizeof r->path - 1);
    enum MHD_Result ret;
    if (check_framing(s, c, r, &ret))
      return ret;
    if (strcmp(method, "OPTIONS") == 0)
      return preflight(s, c, r);
    authenticate(s, c, r, url);
    if (strcmp(url, "/healthz") != 0 && strcmp(url, "/readyz") != 0 &&
        key_connections(s, c, r, &ret))
      return ret;
    return MHD_YES;
  }
  if (*upload_size) {
    if (!r->too_big && r->len + *upload_size > (size_t)s->cfg.max_body_bytes) {
      r->too_big = 1;
      free(r->body);
      r->body = NULL;
      r->len = r->cap = 0;
    }
    if (!r->too_big) {
      if (r->len + *upload_size + 1 > r->cap) {
        size_t cap = (r->len + *upload_size + 1) * 2;
        if (cap > (size_t)s->cfg.max_body_bytes + 1)
          cap = (size_t)s->cfg.max_body_bytes + 1;
        char *nb = realloc(r->body, cap);
        if (!nb)
          return MHD_NO;
        r->body = nb;
        r->cap = cap;
      }
      memcpy(r->body + r->len, upload_data, *upload_size);
      r->len += *upload_size;
      r->body[r->len] = 0;
    }
    *upload_size = 0;
    if (mono() - r->t0 > s->cfg.header_timeout)
      return MHD_NO; /* a body trickling in slower than the limit: drop the connection */
    return MHD_YES;
  }
  if (r->ct) {
    pthread_mutex_lock(&s->conn_mu);
    r->ct->phase = CONN_RESPONDING;
    pthread_mutex_unlock(&s->conn_mu);
  }
  if (r->too_big)
    return fail(s, c, r, 413, "payload_too_large", NULL,
                "the body is larger than this server's limit of %d bytes", s->cfg.max_body_bytes);
  return route(s, c, r);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)c;
  srv *s = cls;
  req *r = *con_cls;
  if (!r)
    return;
  if (r->status >= 100 && r->status < 600)
    atomic_fetch_add(&s->requests[r->status / 100], 1);
  if (r->ct) {
    pthread_mutex_lock(&s->conn_mu);
    r->ct->phase = CONN_IDLE;
    r->ct->since = mono();
    pthread_mutex_unlock(&s->conn_mu);
  }
  const int quiet = strcmp(r->path, "/healthz") == 0 || strcmp(r->path, "/readyz") == 0 ||
                    strcmp(r->path, "/metrics") == 0;
  log_level lvl = r->status >= 500 ? LOG_WARN : quiet ? LOG_DEBUG : LOG_INFO;
  if (log_enabled(lvl)) {
    char st[16], ms[32];
    snprintf(st, sizeof st, "%d", r->status);
    snprintf(ms, sizeof ms, "%.2f", (mono() - r->t0) * 1000.0);
    log_event(lvl, toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "request" : "request aborted",
              "req", r->id, "method", r->method, "path", r->path, "status", st, "ms", ms, "key",
              r->owner, "job", r->job, LOG_END);
  }
  free(r->body);
  free(r);
  *con_cls = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
  srv *s = cls;
  if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
    conn_track *t = calloc(1, sizeof *t);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    atomic_fetch_add(&s->connections, 1);
    atomic_fetch_add(&s->open_connections, 1);
    *socket_context = t;
    if (!t)
      return;
    t->fd = ci ? ci->connect_fd : -1;
    t->phase = CONN_IDLE;
    t->since = mono();
    pthread_mutex_lock(&s->conn_mu);
    t->next = s->conns;
    if (s->conns)
      s->conns->prev = t;
    s->conns = t;
    pthread_mutex_unlock(&s->conn_mu);
  } else {
    conn_track *t = *socket_context;
    atomic_fetch_sub(&s->open_connections, 1);
    if (!t)
      return;
    pthread_mutex_lock(&s->conn_mu);
    if (t->prev)
      t->prev->next = t->next;
    else
      s->conns = t->next;
    if (t->next)
      t->next->prev = t->prev;
    pthread_mutex_unlock(&s->conn_mu);
    free(t);
    *socket_context = NULL;
  }
}

/* A request line has arrived (libmicrohttpd calls this before it reads the headers): from now
 * on header_timeout counts, not idle_timeout. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c) {
  (void)uri;
  srv *s = cls;
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
  conn_track *t = ci ? ci->socket_context : NULL;
  if (t) {
    pthread_mutex_lock(&s->conn_mu);
    t->phase = CONN_REQUEST;
    t->since = mono();
    pthread_mutex_unlock(&s->conn_mu);
  }
  return NULL;
}

static int hex_digit(char ch) {
  return ch >= '0' && ch <= '9'   ? ch - '0'
         : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
         : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                  : -1;
}

/* Paths and query values are decoded as usual (%HH), except %00: a NUL would end the string
 * early and make "5%00" read as "5". Left as text it keeps the value non-canonical, so every
 * parser refuses it. */
static size_t unescape(void *cls, struct MHD_Connection *c, char *text) {
  (void)cls;
  (void)c;
  char *w = text;
  for (const char *p = text; *p;) {
    const int hi = p[0] == '%' ? hex_digit(p[1]) : -1, lo = hi >= 0 ? hex_digit(p[2]) : -1;
    if (lo >= 0 && (hi | lo)) {
      *w++ = (char)(hi * 16 + lo);
      p += 3;
    } else {
      *w++ = *p++;
    }
  }
  *w = 0;
  return (size_t)(w - text);
}

/* Closes connections idle for longer than idle_timeout (or for a second, while open connections
 * reach into connection_reserve), and those that take longer than header_timeout to deliver a
 * request (headers and body): libmicrohttpd's own timeout only sees silence, not a client that
 * trickles bytes. */
static void *reaper_main(void *arg) {
  srv *s = arg;
  while (!atomic_load(&s->reaper_stop)) {
    usleep(250000);
    const double now = mono();
    /* connections into the reserve: idle ones go first, so new requests find a slot */
    long excess = (long)atomic_load(&s->open_connections) -
                  (s->cfg.max_connections - s->cfg.connection_reserve);
    pthread_mutex_lock(&s->conn_mu);
    for (conn_track *t = s->conns; t; t = t->next) {
      const double age = now - t->since;
      const int shed = t->phase == CONN_IDLE && excess > 0 && age > 1;
      if (t->phase != CONN_RESPONDING && t->fd >= 0 &&
          (shed || age > (t->phase == CONN_IDLE ? s->cfg.idle_timeout : s->cfg.header_timeout))) {
        shutdown(t->fd, SHUT_RDWR); /* libmicrohttpd sees the socket fail and closes it */
        t->fd = -1;
        excess--;
      }
    }
    pthread_mutex_unlock(&s->conn_mu);
  }
  return NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
  (void)cls;
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  size_t n = strlen(msg);
  while (n && msg[n - 1] == '\n')
    msg[--n] = 0;
  log_event(LOG_DEBUG, msg, "component", "libmicrohttpd", LOG_END);
}

static int bind_listen(srv *s, err *e) {
  char host[256];
  int port;
  int rc = config_listen_split(s->cfg.listen, host, sizeof host, &port, e);
  if (rc)
    return rc;
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char ps[16];
  snprintf(ps, sizeof ps, "%d", port);
  int g = getaddrinfo(host, ps, &hints, &res);
  if (g != 0)
    return err_set(e, ERR_INVALID, "listen %s: %s", s->cfg.listen, gai_strerror(g));
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
    int en = errno;
    if (fd >= 0)
      close(fd);
    freeaddrinfo(res);
    return err_set(e, ERR_IO, "cannot listen on %s: %s", s->cfg.listen, strerror(en));
  }
  freeaddrinfo(res);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &sl);
  s->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                     : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  s->listen_fd = fd;
  return ERR_OK;
}

int http_start(srv *s, err *e) {
  int rc = bind_listen(s, e);
  if (rc)
    return rc;
  pthread_mutex_init(&s->conn_mu, NULL);
  s->mhd = MHD_start_daemon(
      MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC |
          MHD_USE_ERROR_LOG,
      0, NULL, NULL, on_request, s, MHD_OPTION_LISTEN_SOCKET, s->listen_fd,
      MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->cfg.max_connections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)s->cfg.max_connections_per_ip,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)s->cfg.idle_timeout,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024, MHD_OPTION_THREAD_STACK_SIZE,
      (size_t)1 << 20, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION,
      on_connection, s, MHD_OPTION_URI_LOG_CALLBACK, on_uri, s, MHD_OPTION_UNESCAPE_CALLBACK,
      unescape, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_END);
  if (!s->mhd) {
    close(s->listen_fd);
    s->listen_fd = -1;
    return err_set(e, ERR_IO, "libmicrohttpd failed to start on %s", s->cfg.listen);
  }
  if (pthread_create(&s->reaper, NULL, reaper_main, s) == 0)
    s->reaper_running = 1;
  return ERR_OK;
}

void http_quiesce(srv *s) {
  if (!s->mhd)
    return;
  MHD_socket fd = MHD_quiesce_daemon(s->mhd);
  if (fd != MHD_INVALID_SOCKET)
    close(fd);
  s->listen_fd = -1;
}

void http_stop(srv *s) {
  if (s->reaper_running) {
    atomic_store(&s->reaper_stop, 1);
    pthread_join(s->reaper, NULL);
    s->reaper_running = 0;
  }
  if (s->mhd) {
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
  }
  if (s->listen_fd >= 0)
    close(s->listen_fd);
  s->listen_fd = -1;
}
