/* Where jobs and their images persist: a narrow interface (internal to queue/) with two
 * backends, a directory on the local disk (store_fs.c) and Redis (store_redis.c); the queue never
 * touches files itself. */
#ifndef DENOISED_QUEUE_STORE_H
#define DENOISED_QUEUE_STORE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct store store;

/* The largest job record a store writes and reads back: the queue refuses larger jobs before
 * their 202 (queue_opts.max_job_bytes, at most this less STORE_RECORD_HEADROOM), so nothing
 * accepted is ever unreadable at recovery. */
#define STORE_RECORD_MAX (((size_t)1 << 30) + ((size_t)1 << 20))
/* Room a record keeps for what a job adds after its submission (events, error text). */
#define STORE_RECORD_HEADROOM ((size_t)1 << 20)

/* Called once per stored job record by list_jobs. */
typedef void (*store_job_fn)(void *user, const char *id, const char *json, size_t len);
/* Called once per stored job id by list_ids. */
typedef void (*store_id_fn)(void *user, const char *id);

typedef struct store_ops {
  /* Durable when it returns: the record survives a crash (file fsync + directory fsync). */
  int (*put_job)(store *s, const char *id, const char *json, size_t len, err *e);
  /* Durable once sync_images returns, so a batch of images costs one directory sync. */
  int (*put_image)(store *s, const char *id, int n, const uint8_t *png, size_t len, err *e);
  int (*sync_images)(store *s, err *e);
  int (*get_image)(store *s, const char *id, int n, uint8_t **png, size_t *len, err *e);
  /* A job's other results by name ("noise.npy": [a-z0-9._-]), durable when it returns. */
  int (*put_file)(store *s, const char *id, const char *name, const uint8_t *data, size_t len,
                  err *e);
  int (*get_file)(store *s, const char *id, const char *name, uint8_t **data, size_t *len, err *e);
  /* Removes the record, its first nimages images and the named files (NULL-terminated list, or
   * NULL); missing pieces are not an error. */
  int (*remove_job)(store *s, const char *id, int nimages, const char *const *files, err *e);
  /* Shared stores only (NULL for the directory): the same pieces go by themselves after ttl_s
   * seconds, in case no daemon that knows the finished job is left to remove it. */
  int (*expire_job)(store *s, const char *id, int nimages, const char *const *files, int ttl_s,
                    err *e);
  int (*list_jobs)(store *s, store_job_fn fn, void *user, err *e);
  /* Shared stores only (NULL for the directory): every id with a record, oldest first, without
   * reading the records (listings on a daemon that may not know every job). */
  int (*list_ids)(store *s, store_id_fn fn, void *user, err *e);
  /* One job's record (NUL-terminated beyond *len; the caller frees it); ERR_IO when there is
   * none. Daemons sharing a store read the jobs other daemons accepted or ran this way. */
  int (*get_job)(store *s, const char *id, char **json, size_t *len, err *e);
  /* Shared stores only (NULL for the directory): the records of n ids in one round trip, each
   * handed to fn as it comes (json NULL for an id without a record or an unreadable one);
   * ERR_OK once every id was handed over, else an error code (the rest were not). */
  int (*get_jobs)(store *s, int n, const char *const *ids, store_job_fn fn, void *user, err *e);
  /* Stores shared by several daemons only (NULL for the directory): binds owner's idempotency
   * key to job id for ttl_s seconds unless it is bound already, so a client retrying on
   * another daemon gets the first job. 1: bound to id; 0: bound to another job, whose id is
   * put in other (QUEUE_ID_SIZE bytes); else an error code. */
  int (*bind_key)(store *s, const char *owner, const char *key, const char *id, int ttl_s,
                  char *other, err *e);
  /* Drops the binding if it still names id (the submission failed after binding). */
  void (*unbind_key)(store *s, const char *owner, const char *key, const char *id);
  /* Whether a small write is durable now (readiness; cheap enough to call every few seconds). */
  int (*probe)(store *s, err *e);
  void (*free)(store *s);
} store_ops;

struct store {
  const store_ops *ops;
};

/* Storage faults for tests (SQLite's test VFS idea): the directory backend's system calls pass
 * through these counters, and the fail_at-th call of a kind fails with errnum (EIO if 0); with
 * sticky set, every call from then on fails too, as on a disk that stays full, until fail_at is
 * set back to 0. The counters are atomics: tests arm and clear them while workers write. */
typedef enum {
  STORE_FAULT_WRITE,  /* creating a file or writing to it */
  STORE_FAULT_FSYNC,  /* syncing a file or a directory */
  STORE_FAULT_RENAME, /* moving a written file into place */
  STORE_FAULT_READ,   /* opening a file to read it or reading it */
  STORE_FAULT_KINDS
} store_fault_kind;

typedef struct store_fault {
  atomic_long calls[STORE_FAULT_KINDS];
  atomic_long fail_at[STORE_FAULT_KINDS]; /* 1-based; 0: never */
  atomic_int sticky, errnum;
  atomic_long injected; /* faults injected so far */
} store_fault;

/* "KIND:N[:sticky][:ENOSPC|EIO|EROFS]" (KIND write, fsync, rename or read) into f, as the
 * daemon's test-only DENOISED_FAULT_STORE variable spells it. */
int store_fault_parse(const char *text, store_fault *f, err *e);

/* Whether name is a result file name put_file accepts ([a-z0-9._-], not starting with a dot,
 * at most 64 bytes); every backend checks with this. */
int store_file_name_check(const char *name, err *e);

/* The directory backend: DIR/jobs/ID.json, DIR/images/ID-N.png and DIR/images/ID.NAME, created
 * if missing. fault is NULL except in tests (it must outlive the store).
 * Fails with a clear message when DIR cannot be created or written. */
int store_fs_open(const char *dir, store_fault *fault, store **out, err *e);

/* The Redis backend: records, images and files as keys under prefix (see store_redis.c), on
 * its own connection to url (redisconn.h). Each write is as durable as the server's
 * persistence makes it (AOF with appendfsync always: on disk when the reply comes). */
int store_redis_open(const char *url, const char *password, const char *prefix, store **out,
                     err *e);

#endif
