/* What the files of server/ share with each other (not part of the module's interface):
 * the daemon state, logging, API keys and the HTTP front end. */
#ifndef DENOISED_SERVER_INTERNAL_H
#define DENOISED_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "config.h"
#include "queue.h"

/* ---- log.c: one line per event, logfmt, to stderr or a file ---- */

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

int log_open(const char *path, const char *level, err *e);
int log_reopen(err *e);
void log_close(void);
int log_enabled(log_level l);
/* fields: alternating key, value strings ending with LOG_END (values quoted when needed) */
#define LOG_END ((const char *)0)
void log_event(log_level l, const char *msg, ...) __attribute__((sentinel));
void log_queue_cb(void *user, queue_log_level level, const char *job_id, const char *msg);

/* ---- auth.c: API keys with scopes, constant-time checks ---- */

enum {
  SCOPE_READ = 1,
  SCOPE_SUBMIT = 2,
  SCOPE_CANCEL = 4,
  SCOPE_METRICS = 8,
  SCOPE_ADMIN = 16, /* sees every owner's jobs */
  SCOPE_DEFAULT = SCOPE_READ | SCOPE_SUBMIT | SCOPE_CANCEL | SCOPE_METRICS,
};

typedef struct auth_key {
  char name[QUEUE_NAME_SIZE];
  char key[256];
  size_t len;
  int scopes;
} auth_key;

typedef struct auth {
  auth_key *keys;
  int n;
} auth;

/* Keys from a file (lines "NAME KEY [scope,scope]") and DENOISED_API_KEYS ("KEY" or
 * "NAME:KEY[:scope+scope]", comma separated). Both empty: auth is off. */
int auth_load(const char *file, const char *env, auth *out, err *e);
void auth_free(auth *a);
/* The key matching an Authorization header value ("Bearer K", or Basic with K as password),
 * compared in constant time against every key; NULL if none. */
const auth_key *auth_check(const auth *a, const char *header);
const char *auth_scope_name(int scope);

/* ---- token.c: short-lived URL tokens for <img> and EventSource (no key in a URL) ---- */

#define TOKEN_MAX_TTL 3600 /* seconds a URL token may live */
#define TOKEN_SIZE 64      /* "EXPIRY.MAC" with its NUL */

void token_hmac_sha256(const void *key, size_t klen, const void *msg, size_t mlen, uint8_t out[32]);
/* "EXPIRY.MAC" for job, signed with key k, valid until expires (unix seconds). */
void token_make(const auth_key *k, const char *job, long long expires, char *out, size_t n);
/* The key whose token for job this is, if it has not expired; NULL with the reason in *why. */
const auth_key *token_check(const auth *a, const char *job, const char *token, const char **why);

/* ---- static.c: the web UI, /docs and /openapi.yaml, built into the binary ---- */

typedef struct static_file {
  const char *path;  /* the URL path: "/", "/docs", "/ui/app.js", "/openapi.yaml" */
  const char *ctype; /* its Content-Type */
  const unsigned char *data;
  size_t len;
} static_file;

/* the table CMake generates from server/ui/ and openapi.yaml (server/embed.cmake) */
extern const static_file static_files[];
extern const int static_nfiles;
/* The file served at path, or NULL. */
const static_file *static_find(const char *path);

/* ---- http.c ---- */

#define SD_CHOICES 64

typedef struct srv {
  config cfg;
  queue *q;
  api_ctx api;
  struct MHD_Daemon *mhd;
  int listen_fd, port;
  pthread_rwlock_t auth_lock;
  auth keys;
  atomic_int stopping;
  atomic_ullong requests[6];
  atomic_ullong connections, open_connections, sse_streams, auth_failures, req_counter;
  pthread_mutex_t conn_mu; /* guards conns and streams */
  struct conn_track *conns;
  struct stream_slot *streams; /* event streams and synchronous waits open now */
  /* The model and clip skip each client chose with POST /sdapi/v1/options
   * (sd_model_checkpoint, CLIP_stop_at_last_layers), under conn_mu; the oldest choice gives way
   * past SD_CHOICES clients. */
  struct sd_choice {
    char client[2 * QUEUE_NAME_SIZE + 2]; /* owner and client identity */
    char model[QUEUE_NAME_SIZE];          /* "": not chosen */
    int clip_skip;                        /* 0: not chosen */
  } sd_choices[SD_CHOICES];
  int sd_next;
  pthread_t reaper;
  int reaper_running;
  atomic_int reaper_stop;
} srv;

int http_start(srv *s, err *e); /* binds (fails with the errno text) and starts serving */
void http_quiesce(srv *s);      /* stops accepting */
void http_stop(srv *s);         /* closes every connection */

#endif
