/* The Redis store (store.h): job records, images and result files as Redis strings, so every
 * daemon of a group (one key prefix P) reads what any of them wrote.
 *   P:jobs            set     ids with a record (recovery lists these)
 *   P:job:ID          string  the record
 *   P:img:ID:N        string  image N (PNG bytes)
 *   P:file:ID:NAME    string  a result file (noise.npy)
 *   P:probe           string  readiness writes
 *   P:idem:N:OWNER:KEY string the job an idempotency key made (N: the owner's length, so no
 *                     owner and key pair reads as another), expiring with result_ttl
 * A record is indexed before it is written, so a crash between the two leaves an index entry
 * without a record (skipped and removed at listing), never a record recovery cannot find. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "queue.h"
#include "redisconn.h"
#include "store.h"

typedef struct redis_store {
  store base;
  redisconn *c;
  char prefix[128];
} redis_store;

#define KEYBUF 256

/* ERR_OK for a reply that is not an error; else ERR_IO naming what failed. Frees r. */
static int check(redis_store *s, redisReply *r, const char *what, err *e) {
  (void)s;
  if (!r)
    return e->code ? e->code : ERR_IO;
  int rc = ERR_OK;
  if (r->type == REDIS_REPLY_ERROR)
    rc = err_set(e, ERR_IO, "redis: %s: %s", what, r->str);
  freeReplyObject(r);
  return rc;
}

static int set_key(redis_store *s, const char *k, const void *data, size_t len, err *e) {
  const char *argv[] = {"SET", k, data};
  const size_t lens[] = {3, strlen(k), len};
  return check(s, redisconn_argv(s->c, 3, argv, lens, e), k, e);
}

/* A string key's value (NUL-terminated beyond len); ERR_IO "no such ..." when it is missing. */
static int get_key(redis_store *s, const char *k, uint8_t **out, size_t *len, err *e) {
  const char *argv[] = {"GET", k};
  redisReply *r = redisconn_argv(s->c, 2, argv, NULL, e);
  if (!r)
    return e->code ? e->code : ERR_IO;
  int rc = ERR_OK;
  if (r->type == REDIS_REPLY_NIL) {
    rc = err_set(e, ERR_IO, "redis: %s: no such key", k);
  } else if (r->type != REDIS_REPLY_STRING) {
    rc = err_set(e, ERR_IO, "redis: GET %s: %s", k, r->type == REDIS_REPLY_ERROR ? r->str : "?");
  } else if (!(*out = mem_malloc(r->len + 1))) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
  } else {
    memcpy(*out, r->str, r->len);
    (*out)[r->len] = 0;
    *len = r->len;
  }
  freeReplyObject(r);
  return rc;
}

static int rs_put_job(store *b, const char *id, const char *json, size_t len, err *e) {
  redis_store *s = (redis_store *)b;
  if (len > STORE_RECORD_MAX)
    return err_set(e, ERR_INVALID, "job record of %zu bytes exceeds the store's %zu", len,
                   STORE_RECORD_MAX);
  char idx[KEYBUF], k[KEYBUF];
  snprintf(idx, sizeof idx, "%s:jobs", s->prefix);
  snprintf(k, sizeof k, "%s:job:%s", s->prefix, id);
  const char *argv[] = {"SADD", idx, id};
  int rc = check(s, redisconn_argv(s->c, 3, argv, NULL, e), "SADD", e);
  return rc ? rc : set_key(s, k, json, len, e);
}

static int rs_put_image(store *b, const char *id, int n, const uint8_t *png, size_t len, err *e) {
  redis_store *s = (redis_store *)b;
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:img:%s:%d", s->prefix, id, n);
  return set_key(s, k, png, len, e);
}

static int rs_sync_images(store *b, err *e) {
  (void)b;
  (void)e;
  return ERR_OK; /* every SET was as durable as the server makes writes when it answered */
}

static int rs_get_image(store *b, const char *id, int n, uint8_t **png, size_t *len, err *e) {
  redis_store *s = (redis_store *)b;
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:img:%s:%d", s->prefix, id, n);
  return get_key(s, k, png, len, e);
}

static int rs_put_file(store *b, const char *id, const char *name, const uint8_t *data, size_t len,
                       err *e) {
  redis_store *s = (redis_store *)b;
  int rc = store_file_name_check(name, e);
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:file:%s:%s", s->prefix, id, name);
  return rc ? rc : set_key(s, k, data, len, e);
}

static int rs_get_file(store *b, const char *id, const char *name, uint8_t **data, size_t *len,
                       err *e) {
  redis_store *s = (redis_store *)b;
  int rc = store_file_name_check(name, e);
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:file:%s:%s", s->prefix, id, name);
  return rc ? rc : get_key(s, k, data, len, e);
}

/* `cmd KEY [arg]` (DEL, or EXPIRE with its seconds). */
static int key_command(redis_store *s, const char *cmd, const char *k, const char *arg, err *e) {
  const char *argv[] = {cmd, k, arg};
  return check(s, redisconn_argv(s->c, arg ? 3 : 2, argv, NULL, e), cmd, e);
}

/* key_command on each key of job id: its first nimages images, the named files, then its
 * record (last: a cut leaves the record, so the job stays findable and removable). */
static int each_job_key(redis_store *s, const char *id, int nimages, const char *const *files,
                        const char *cmd, const char *arg, err *e) {
  char k[KEYBUF];
  int rc = ERR_OK;
  for (int i = 0; i < nimages && rc == ERR_OK; i++) {
    snprintf(k, sizeof k, "%s:img:%s:%d", s->prefix, id, i);
    rc = key_command(s, cmd, k, arg, e);
  }
  for (int i = 0; files && files[i] && rc == ERR_OK; i++) {
    if (store_file_name_check(files[i], e) != ERR_OK)
      continue;
    snprintf(k, sizeof k, "%s:file:%s:%s", s->prefix, id, files[i]);
    rc = key_command(s, cmd, k, arg, e);
  }
  if (rc == ERR_OK) {
    snprintf(k, sizeof k, "%s:job:%s", s->prefix, id);
    rc = key_command(s, cmd, k, arg, e);
  }
  return rc;
}

static int rs_remove_job(store *b, const char *id, int nimages, const char *const *files, err *e) {
  redis_store *s = (redis_store *)b;
  int rc = each_job_key(s, id, nimages, files, "DEL", NULL, e);
  if (rc == ERR_OK) { /* the index entry after the record */
    char k[KEYBUF];
    snprintf(k, sizeof k, "%s:jobs", s->prefix);
    const char *argv[] = {"SREM", k, id};
    rc = check(s, redisconn_argv(s->c, 3, argv, NULL, e), "SREM", e);
  }
  return rc;
}

static int rs_expire_job(store *b, const char *id, int nimages, const char *const *files, int ttl_s,
                         err *e) {
  char ttl[16];
  snprintf(ttl, sizeof ttl, "%d", ttl_s);
  /* the index entry stays: listings drop entries whose record is gone */
  return each_job_key((redis_store *)b, id, nimages, files, "EXPIRE", ttl, e);
}

static int by_id(const void *a, const void *b) {
  const redisReply *x = *(redisReply *const *)a, *y = *(redisReply *const *)b;
  return strcmp(x->str, y->str);
}

/* The index of records (its name in idx) as a reply whose elements are the ids, sorted: ids
 * sort by creation time, the same order a directory listing gives after sorting. NULL with e
 * set when it cannot be read. */
static redisReply *sorted_index(redis_store *s, char *idx, size_t n, err *e) {
  snprintf(idx, n, "%s:jobs", s->prefix);
  const char *argv[] = {"SMEMBERS", idx};
  redisReply *r = redisconn_argv(s->c, 2, argv, NULL, e);
  if (!r) {
    if (!e->code)
      err_set(e, ERR_IO, "redis: SMEMBERS %s: no reply", idx);
    return NULL;
  }
  if (r->type != REDIS_REPLY_ARRAY) {
    err_set(e, ERR_IO, "redis: SMEMBERS %s: %s", idx,
            r->type == REDIS_REPLY_ERROR ? r->str : "not a set");
    freeReplyObject(r);
    return NULL;
  }
  if (r->elements > 1)
    qsort(r->element, r->elements, sizeof *r->element, by_id);
  return r;
}

static int rs_list_ids(store *b, store_id_fn fn, void *user, err *e) {
  redis_store *s = (redis_store *)b;
  char idx[KEYBUF];
  redisReply *r = sorted_index(s, idx, sizeof idx, e);
  if (!r)
    return e->code;
  for (size_t i = 0; i < r->elements; i++)
    if (r->element[i]->type == REDIS_REPLY_STRING && r->element[i]->len > 0 &&
        r->element[i]->len <= 100)
      fn(user, r->element[i]->str);
  freeReplyObject(r);
  return ERR_OK;
}

static int rs_list_jobs(store *b, store_job_fn fn, void *user, err *e) {
  redis_store *s = (redis_store *)b;
  char idx[KEYBUF];
  redisReply *r = sorted_index(s, idx, sizeof idx, e);
  if (!r)
    return e->code;
  for (size_t i = 0; i < r->elements; i++) {
    const redisReply *el = r->element[i];
    if (el->type != REDIS_REPLY_STRING || el->len == 0 || el->len > 100)
      continue;
    char k[KEYBUF];
    snprintf(k, sizeof k, "%s:job:%s", s->prefix, el->str);
    uint8_t *rec = NULL;
    size_t len = 0;
    err ge = {0};
    if (get_key(s, k, &rec, &len, &ge) == ERR_OK) {
      fn(user, el->str, (const char *)rec, len);
    } else if (strstr(ge.msg, "no such key")) { /* indexed, never written: a cut write */
      const char *srem[] = {"SREM", idx, el->str};
      freeReplyObject(redisconn_argv(s->c, 3, srem, NULL, &ge));
    } else {
      fn(user, el->str, NULL, 0); /* unreadable: the queue reports it */
    }
    free(rec);
  }
  freeReplyObject(r);
  return ERR_OK;
}

static int rs_get_job(store *b, const char *id, char **json, size_t *len, err *e) {
  redis_store *s = (redis_store *)b;
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:job:%s", s->prefix, id);
  return get_key(s, k, (uint8_t **)json, len, e);
}

typedef struct jobs_read {
  const char *const *ids;
  store_job_fn fn;
  void *user;
} jobs_read;

static void job_read(void *user, int i, redisReply *r) {
  const jobs_read *jr = user;
  if (r->type == REDIS_REPLY_STRING)
    jr->fn(jr->user, jr->ids[i], r->str, r->len);
  else
    jr->fn(jr->user, jr->ids[i], NULL, 0);
  freeReplyObject(r);
}

/* GETs pipelined, not one MGET: one record in memory at a time, however large. */
static int rs_get_jobs(store *b, int n, const char *const *ids, store_job_fn fn, void *user,
                       err *e) {
  redis_store *s = (redis_store *)b;
  if (n <= 0)
    return ERR_OK;
  const char **argv = mem_calloc(2 * (size_t)n, sizeof *argv);
  char *keys = mem_malloc((size_t)n * KEYBUF);
  int rc = ERR_OK;
  if (!argv || !keys) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
  } else {
    for (int i = 0; i < n; i++) {
      snprintf(keys + (size_t)i * KEYBUF, KEYBUF, "%s:job:%s", s->prefix, ids[i]);
      argv[2 * i] = "GET";
      argv[2 * i + 1] = keys + (size_t)i * KEYBUF;
    }
    jobs_read jr = {ids, fn, user};
    rc = redisconn_pipeline(s->c, n, 2, argv, job_read, &jr, e);
  }
  free(argv);
  free(keys);
  return rc;
}

static int rs_probe(store *b, err *e) {
  redis_store *s = (redis_store *)b;
  char k[KEYBUF];
  snprintf(k, sizeof k, "%s:probe", s->prefix);
  return set_key(s, k, "probe", 5, e); /* refused while the server cannot persist (MISCONF) */
}

/* P:idem:N:OWNER:KEY into k (kn bytes); 0 if it does not fit. */
static int idem_key(const redis_store *s, const char *owner, const char *key, char *k, size_t kn) {
  const int n = snprintf(k, kn, "%s:idem:%zu:%s:%s", s->prefix, strlen(owner), owner, key);
  return n > 0 && (size_t)n < kn;
}

static int rs_bind_key(store *b, const char *owner, const char *key, const char *id, int ttl_s,
                       char *other, err *e) {
  redis_store *s = (redis_store *)b;
  char k[1024], ttl[16];
  if (!idem_key(s, owner, key, k, sizeof k))
    return err_set(e, ERR_INVALID, "idempotency key too long");
  snprintf(ttl, sizeof ttl, "%d", ttl_s > 0 ? ttl_s : 1);
  for (int attempt = 0; attempt < 2; attempt++) { /* the binding may expire between the two */
    const char *set[] = {"SET", k, id, "NX", "EX", ttl};
    redisReply *r = redisconn_argv(s->c, 6, set, NULL, e);
    if (!r)
      return e->code ? e->code : ERR_IO;
    const int bound = r->type == REDIS_REPLY_STATUS;
    const int refused = r->type == REDIS_REPLY_ERROR;
    if (refused)
      err_set(e, ERR_IO, "redis: SET %s: %s", k, r->str);
    freeReplyObject(r);
    if (bound || refused)
      return bound ? 1 : ERR_IO;
    uint8_t *v = NULL;
    size_t len = 0;
    err ge = {0};
    if (get_key(s, k, &v, &len, &ge) == ERR_OK) {
      const int ok = len > 0 && len < QUEUE_ID_SIZE;
      if (ok)
        memcpy(other, v, len + 1);
      free(v);
      return ok ? 0 : err_set(e, ERR_IO, "redis: %s does not hold a job id", k);
    }
    if (ge.code != ERR_IO) /* away, or out of memory; ERR_IO: it expired meanwhile */
      return err_set(e, ge.code, "%s", ge.msg);
  }
  return err_set(e, ERR_IO, "redis: %s: bound and unbound in turn", k);
}

static void rs_unbind_key(store *b, const char *owner, const char *key, const char *id) {
  redis_store *s = (redis_store *)b;
  char k[1024];
  if (!idem_key(s, owner, key, k, sizeof k))
    return;
  const char *argv[] = {"EVAL",
                        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                        "return redis.call('DEL', KEYS[1]) end return 0",
                        "1", k, id};
  err e = {0};
  freeReplyObject(redisconn_argv(s->c, 5, argv, NULL, &e)); /* best effort: it expires anyway */
}

static void rs_free(store *b) {
  redis_store *s = (redis_store *)b;
  if (!s)
    return;
  redisconn_free(s->c);
  free(s);
}

static const store_ops redis_store_ops = {
    .put_job = rs_put_job,
    .put_image = rs_put_image,
    .sync_images = rs_sync_images,
    .get_image = rs_get_image,
    .put_file = rs_put_file,
    .get_file = rs_get_file,
    .remove_job = rs_remove_job,
    .expire_job = rs_expire_job,
    .list_jobs = rs_list_jobs,
    .list_ids = rs_list_ids,
    .get_job = rs_get_job,
    .get_jobs = rs_get_jobs,
    .bind_key = rs_bind_key,
    .unbind_key = rs_unbind_key,
    .probe = rs_probe,
    .free = rs_free,
};

int store_redis_open(const char *url, const char *password, const char *prefix, store **out,
                     err *e) {
  if (!prefix || !*prefix)
    prefix = "denoised";
  redis_store *s = mem_calloc(1, sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->base.ops = &redis_store_ops;
  snprintf(s->prefix, sizeof s->prefix, "%s", prefix);
  int rc = redisconn_open(url, password, 0, &s->c, e);
  if (rc == ERR_OK)
    rc = rs_probe(&s->base, e);
  if (rc != ERR_OK) {
    rs_free(&s->base);
    return rc;
  }
  *out = &s->base;
  return ERR_OK;
}
