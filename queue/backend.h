/* The queue's second seam beside store.h (internal to queue/): what several daemons sharing one
 * queue must agree on, apart from durable records. Two things:
 *   - the runnable jobs in submission order, taken by claims that carry a lease: a holder
 *     renews its lease while it runs the job, completes it when done or releases it back, and
 *     a lease that runs out (its node died) puts the job back where it was;
 *   - each job's event log, readable after a sequence number by any node, so that a client's
 *     event stream (SSE with Last-Event-ID) resumes wherever it reconnects.
 * Jobs are named by id only: another node never sees this process's pointers. Two backends:
 * in memory (backend_mem.c, one process) and Redis (backend_redis.c, sorted sets and Lua
 * scripts); tests/test_backend_contract.c runs the same checks against both. Every operation is
 * thread-safe on its own; the queue calls them with its lock held, so a backend never calls back
 * into the queue. */
#ifndef DENOISED_QUEUE_BACKEND_H
#define DENOISED_QUEUE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "queue.h"

enum {
  QBACKEND_GONE = -130,   /* not queued (claimed by another, removed, unknown), or lease lost */
  QBACKEND_EXISTS = -131, /* pushed while already queued or claimed */
  QBACKEND_ORDER = -132,  /* an event's seq is not above the last one of its job */
};

#define QBACKEND_TYPE_SIZE 16 /* an event type, NUL included ("progress", "done", ...) */

typedef struct qbackend qbackend;

typedef char qbackend_id[QUEUE_ID_SIZE];

/* One event as read back: the reader owns data (qbackend_events_free). */
typedef struct qbackend_event {
  uint64_t seq;
  char type[QBACKEND_TYPE_SIZE];
  char *data;
  int lasting; /* kept until the log is dropped; the others may be trimmed */
} qbackend_event;

/* Called once per live node by nodes: its id and its advertisement's text. */
typedef void (*qbackend_node_fn)(void *user, const char *node, const char *text, size_t len);

typedef struct qbackend_ops {
  /* ---- runnable jobs, first pushed first claimed ---- */
  /* Appends id (QBACKEND_EXISTS if it is queued or claimed already). */
  int (*push)(qbackend *b, const char *id, err *e);
  /* Takes a queued id out for good (a cancel): 1 if it was queued, 0 otherwise. A claimed job
   * is not affected: its holder finishes it. */
  int (*remove)(qbackend *b, const char *id);
  /* Jobs queued, claimed ones not counted. */
  int (*count)(qbackend *b);
  /* id's place in the queue from 1, or 0 when it is not queued. */
  int (*position)(qbackend *b, const char *id);
  /* Up to max queued ids from place `from` (0 = the head) in order; returns how many. A view:
   * by the time the caller claims one, another node may have taken it. */
  int (*peek)(qbackend *b, int from, int max, qbackend_id *ids);
  /* Takes queued job id with a lease of lease_ms (> 0) and a fencing token that no other claim
   * of any job ever gets; QBACKEND_GONE if id is not queued (another holder won it). */
  int (*claim)(qbackend *b, const char *id, int lease_ms, uint64_t *token, err *e);
  /* Extends the claim to lease_ms from now; QBACKEND_GONE if token no longer holds id (the lease
   * ran out and the job went back, maybe to another holder). */
  int (*renew)(qbackend *b, const char *id, uint64_t token, int lease_ms, err *e);
  /* Ends the claim: the job has left the queue for good (its final state is the record's
   * business). QBACKEND_GONE as renew. */
  int (*complete)(qbackend *b, const char *id, uint64_t token, err *e);
  /* Ends the claim and puts the job back at its place (first push order): it runs again, here
   * or elsewhere. QBACKEND_GONE as renew. */
  int (*release)(qbackend *b, const char *id, uint64_t token, err *e);
  /* Puts back every job whose lease has run out, as release does, and returns up to max of
   * their ids (all are put back even beyond max); the count put back. */
  int (*reclaim)(qbackend *b, int max, qbackend_id *ids);

  /* Asks the holder of id's claim to stop it (a cancel that reached another node): 1 if id is
   * claimed, 0 if not. The request stands until a claim of id completes: a job released or
   * whose lease ran out carries it to its next holder. */
  int (*cancel_request)(qbackend *b, const char *id);
  /* Whether a stop of id's current claim was asked for. */
  int (*cancel_requested)(qbackend *b, const char *id);

  /* ---- per-owner load (shared backends only; NULL otherwise: the queue counts its own) ---- */
  /* Counts id, of cost, against owner (an API key's name) while it is queued or claimed. */
  int (*owner_add)(qbackend *b, const char *owner, const char *id, double cost, err *e);
  /* The owner's queued or claimed jobs across every process sharing the backend, and their
   * cost (the limits max_jobs_per_key and max_key_cost). */
  int (*owner_load)(qbackend *b, const char *owner, int *jobs, double *cost, err *e);
  /* Stops counting id (its final state is written: its claim may end a little later). */
  void (*owner_drop)(qbackend *b, const char *owner, const char *id);

  /* ---- the group's nodes (shared backends only; NULL otherwise: one process is the group) ---- */
  /* Says that node (an id unique to one process) is alive and what it serves (text, JSON) for
   * ttl_ms from now; a node that stops saying it again is gone once that has run out. */
  int (*advertise)(qbackend *b, const char *node, const char *text, int ttl_ms, err *e);
  /* Takes node's word back at once (a clean stop). */
  void (*withdraw)(qbackend *b, const char *node);
  /* Every live node's last advertisement, handed to fn (dead nodes' are dropped). */
  int (*nodes)(qbackend *b, qbackend_node_fn fn, void *user, err *e);

  /* ---- per-job event logs ---- */
  /* Adds an event to id's log (created on first use). seq must be above the log's last
   * (QBACKEND_ORDER): gaps are allowed (numbers a lost run used). lasting events stay until
   * drop; the others are transient (progress): a backend keeps at least the newest few. */
  int (*append)(qbackend *b, const char *id, uint64_t seq, const char *type, const char *data,
                int lasting, err *e);
  /* The events of id with seq > after, in seq order (lasting only if lasting_only), in *evs
   * (NULL when none; free with qbackend_events_free). An unknown id has an empty log. */
  int (*read)(qbackend *b, const char *id, uint64_t after, int lasting_only, qbackend_event **evs,
              int *n, err *e);
  /* Drops id's transient events but the newest keep_transient (a finished job's progress is
   * superseded by its last event). */
  void (*trim)(qbackend *b, const char *id, int keep_transient);
  /* Forgets id's log (the job expired or was never accepted). */
  void (*drop)(qbackend *b, const char *id);
  /* Shared backends only (NULL otherwise): id's log goes by itself after ttl_s seconds, in case
   * no daemon that knows the job is left to drop it. */
  void (*expire)(qbackend *b, const char *id, int ttl_s);

  void (*free)(qbackend *b);
} qbackend_ops;

struct qbackend {
  const qbackend_ops *ops;
};

void qbackend_events_free(qbackend_event *evs, int n);

/* ---- the in-memory backend: one process, what the daemon uses today ---- */
typedef struct qbackend_mem_opts {
  int transient_max; /* transient events kept per job (the newest); 64 if 0 */
  /* Seconds on a monotonic clock for leases; CLOCK_MONOTONIC if NULL (tests move time). */
  double (*clock)(void *user);
  void *clock_user;
} qbackend_mem_opts;

/* o may be NULL for the defaults. */
int qbackend_mem_open(const qbackend_mem_opts *o, qbackend **out, err *e);

/* ---- the Redis backend: daemons that share one Redis server share one queue ---- */
typedef struct qbackend_redis_opts {
  const char *url;      /* redis://HOST[:PORT][/DB] or a unix socket path */
  const char *password; /* NULL: none (never part of url, never logged) */
  const char *prefix;   /* key prefix of this group of daemons; "denoised" if NULL */
  int transient_max;    /* transient events kept per job (the newest); 64 if 0 */
  int timeout_ms;       /* connect and command timeout; 5000 if 0 */
} qbackend_redis_opts;

/* Connects (a clear ERR_IO naming the URL when the server cannot be reached) and loads the
 * backend's scripts. Leases run on the server's clock. A connection that breaks later is
 * re-made on the next operation. */
int qbackend_redis_open(const qbackend_redis_opts *o, qbackend **out, err *e);
/* Splits a redis_url: host (or the socket path, with *port 0), port and database. */
int qbackend_redis_parse_url(const char *url, char *host, size_t hostn, int *port, int *db, err *e);

#endif
