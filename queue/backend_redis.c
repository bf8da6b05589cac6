/* The Redis queue backend (backend.h): runnable jobs, claims and event logs that several daemons
 * share through one Redis server. Every operation is one Lua script, so it is atomic on the
 * server however many nodes race; leases are timed on the server's clock (TIME inside the
 * script), so nodes whose clocks disagree still agree on when a lease ran out.
 *
 * Why sorted sets and not a stream with a consumer group: the seam asks for a queue position,
 * a peek at the head, claiming a chosen job (a node takes only jobs for models it serves) and a
 * job put back at its first place, none of which a stream offers; XAUTOCLAIM's re-claim after a
 * timeout is what `reclaim` does here with a lease set scored by deadline.
 *
 * Keys, under the configured prefix P (one daemon group per prefix):
 *   P:q          zset  queued ids scored by first-push order
 *   P:order      hash  id -> first-push order, while the job is queued or claimed
 *   P:orderseq   int   the last order given
 *   P:leases     zset  claimed ids scored by lease deadline (server ms)
 *   P:tokens     hash  id -> the claim's fencing token
 *   P:tokenseq   int   the last token given (never reused: INCR on a key nothing deletes)
 *   P:evlast     hash  id -> the highest seq appended to id's log
 *   P:ev:ID      zset  id's events scored by seq, member "SEQ TYPE LASTING DATA"
 *   P:evt:ID     zset  the seqs of id's transient events (to trim them oldest first)
 *   P:own:OWNER  hash  id -> compute cost of the owner's (API key's) jobs, added at submission;
 *                      entries no longer queued or claimed are dropped when it is counted
 *   P:cancel     set   ids whose claim holder was asked to stop them (a cancel on another
 *                      daemon); kept when the claim is released or runs out, so the next
 *                      holder sees it, and dropped when a claim completes
 *   P:nodes      zset  live nodes (one per daemon process) scored by when their word runs out
 *   P:node:NODE  string what NODE serves (JSON), expiring then too */
#include "backend.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "redisconn.h"

enum {
  S_PUSH,
  S_REMOVE,
  S_CLAIM,
  S_RENEW,
  S_COMPLETE,
  S_RELEASE,
  S_RECLAIM,
  S_APPEND,
  S_TRIM,
  S_CANCEL,
  S_OWNER_LOAD,
  S_ADVERTISE,
  S_NODES,
  S_COUNT
};

typedef struct redis_backend {
  qbackend base;
  redisconn *c;
  char prefix[128];
  int transient_max;
  char sha[S_COUNT][41]; /* the scripts' SHA1s, by S_ index */
} redis_backend;

/* ---- scripts ---- */

/* The server's clock in milliseconds. */
#define LUA_NOW                                                                                    \
  "local tm = redis.call('TIME') local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) " \
  "/ 1000) "

/* A claim still held: token matches and the lease has not run out. */
#define LUA_HELD                                                                                   \
  "local function held(id, token, now) "                                                           \
  "  if redis.call('HGET', KEYS[2], id) ~= token then return false end "                           \
  "  local d = redis.call('ZSCORE', KEYS[1], id) "                                                 \
  "  return d ~= false and tonumber(d) > now "                                                     \
  "end "

/* The scripts; each backend loads them at open and runs them by SHA1 (EVALSHA), sending the
 * text again when a restarted server has forgotten it. */
static const char *const scripts[S_COUNT] = {
    /* KEYS q order orderseq; ARGV id -> 0, or -1 if queued or claimed */
    [S_PUSH] = "if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return -1 end "
               "local o = redis.call('INCR', KEYS[3]) "
               "redis.call('HSET', KEYS[2], ARGV[1], o) "
               "redis.call('ZADD', KEYS[1], o, ARGV[1]) return 0",
    /* KEYS q order; ARGV id -> 1 if it was queued */
    [S_REMOVE] = "if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then "
                 "redis.call('HDEL', KEYS[2], ARGV[1]) return 1 end return 0",
    /* KEYS q leases tokens tokenseq; ARGV id lease_ms -> token, or -1 if not queued */
    [S_CLAIM] = LUA_NOW "if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return -1 end "
                        "local t = redis.call('INCR', KEYS[4]) "
                        "redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1]) "
                        "redis.call('HSET', KEYS[3], ARGV[1], t) return t",
    /* KEYS leases tokens; ARGV id token lease_ms -> 0, or -1 if not held */
    [S_RENEW] = LUA_NOW LUA_HELD "if not held(ARGV[1], ARGV[2], now) then return -1 end "
                                 "redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1]) "
                                 "return 0",
    /* KEYS leases tokens order q cancel; ARGV id token -> 0, or -1 if not held */
    [S_COMPLETE] = LUA_NOW LUA_HELD "if not held(ARGV[1], ARGV[2], now) then return -1 end "
                                    "redis.call('ZREM', KEYS[1], ARGV[1]) "
                                    "redis.call('HDEL', KEYS[2], ARGV[1]) "
                                    "redis.call('HDEL', KEYS[3], ARGV[1]) "
                                    "redis.call('SREM', KEYS[5], ARGV[1]) return 0",
    /* KEYS leases tokens order q cancel; ARGV id token -> 0, or -1 if not held */
    [S_RELEASE] = LUA_NOW LUA_HELD "if not held(ARGV[1], ARGV[2], now) then return -1 end "
                                   "redis.call('ZREM', KEYS[1], ARGV[1]) "
                                   "redis.call('HDEL', KEYS[2], ARGV[1]) "
                                   "redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[3], "
                                   "ARGV[1]), ARGV[1]) "
                                   "return 0",
    /* KEYS leases tokens order q cancel -> the ids put back */
    /* (a claim without its first-push order, which only a hand edit makes, goes first
     * rather than making the script fail for every claim) */
    [S_RECLAIM] = LUA_NOW "local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now) "
                          "for _, id in ipairs(ids) do "
                          "  redis.call('ZREM', KEYS[1], id) redis.call('HDEL', KEYS[2], id) "
                          "  local o = redis.call('HGET', KEYS[3], id) "
                          "  if not o then o = '0' redis.call('HSET', KEYS[3], id, o) end "
                          "  redis.call('ZADD', KEYS[4], o, id) "
                          "end return ids",
    /* KEYS ev evt evlast; ARGV id seq type lasting data transient_max -> 0, or -1 if seq is
     * not above the log's last */
    [S_APPEND] = "local seq = tonumber(ARGV[2]) "
                 "if seq <= tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0') then "
                 "return -1 end "
                 "redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) "
                 "redis.call('ZADD', KEYS[1], seq, ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] "
                 ".. ' ' .. ARGV[5]) "
                 "if ARGV[4] == '0' then "
                 "  redis.call('ZADD', KEYS[2], seq, ARGV[2]) "
                 "  local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6]) "
                 "  if over > 0 then "
                 "    for _, s in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do "
                 "      redis.call('ZREMRANGEBYSCORE', KEYS[1], s, s) end "
                 "    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) "
                 "  end "
                 "end return 0",
    /* KEYS ev evt; ARGV keep -> 0 */
    [S_TRIM] = "local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1]) "
               "if over > 0 then "
               "  for _, s in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do "
               "    redis.call('ZREMRANGEBYSCORE', KEYS[1], s, s) end "
               "  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) "
               "end return 0",
    /* KEYS tokens cancel; ARGV id -> 1 if claimed (the request is recorded), else 0 */
    [S_CANCEL] = "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end "
                 "redis.call('SADD', KEYS[2], ARGV[1]) return 1",
    /* KEYS own q leases -> {jobs, "cost"} of the owner's queued or claimed jobs; the others
     * (finished, expired) leave the hash */
    [S_OWNER_LOAD] = "local n, c = 0, 0 local all = redis.call('HGETALL', KEYS[1]) "
                     "for i = 1, #all, 2 do "
                     "  if redis.call('ZSCORE', KEYS[2], all[i]) or "
                     "     redis.call('ZSCORE', KEYS[3], all[i]) then "
                     "    n = n + 1 c = c + tonumber(all[i + 1]) "
                     "  else redis.call('HDEL', KEYS[1], all[i]) end "
                     "end return {n, tostring(c)}",
    /* KEYS nodes node; ARGV node text ttl_ms -> 0 */
    [S_ADVERTISE] = LUA_NOW "redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) "
                            "redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1]) "
                            "return 0",
    /* KEYS nodes -> the live nodes (the others leave the set; their keys expired) */
    [S_NODES] = LUA_NOW "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) "
                        "return redis.call('ZRANGE', KEYS[1], 0, -1)",
};

/* ---- connection ---- */

static int reply_error(redisReply *r, const char *what, err *e) {
  const int rc = err_set(e, ERR_IO, "redis: %s: %s", what,
                         r && r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
  freeReplyObject(r);
  return rc;
}

/* The key P:name (P:name:id with an id). */
static const char *key(const redis_backend *b, char *buf, size_t n, const char *name,
                       const char *id) {
  snprintf(buf, n, "%s:%s%s%s", b->prefix, name, id ? ":" : "", id ? id : "");
  return buf;
}

/* Runs script s with nkeys keys then the arguments; the reply, or NULL with e set (a script
 * error is an ERR_IO naming what failed). */
static redisReply *rb_eval(redis_backend *b, int s, int nkeys, const char *const *keys, int nargs,
                           const char *const *args, err *e) {
  const char *argv[16];
  char nk[8];
  snprintf(nk, sizeof nk, "%d", nkeys);
  int argc = 0;
  argv[argc++] = "EVALSHA";
  argv[argc++] = b->sha[s];
  argv[argc++] = nk;
  for (int i = 0; i < nkeys; i++)
    argv[argc++] = keys[i];
  for (int i = 0; i < nargs; i++)
    argv[argc++] = args[i];
  redisReply *r = redisconn_argv(b->c, argc, argv, NULL, e);
  if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
    freeReplyObject(r); /* the server restarted and forgot the script: send it whole */
    argv[0] = "EVAL";
    argv[1] = scripts[s];
    r = redisconn_argv(b->c, argc, argv, NULL, e);
  }
  if (r && r->type == REDIS_REPLY_ERROR) {
    reply_error(r, "script", e);
    return NULL;
  }
  return r;
}

/* An integer script result, or INT64_MIN with e set. */
static long long rb_eval_int(redis_backend *b, int s, int nkeys, const char *const *keys, int nargs,
                             const char *const *args, err *e) {
  redisReply *r = rb_eval(b, s, nkeys, keys, nargs, args, e);
  if (!r)
    return INT64_MIN;
  if (r->type != REDIS_REPLY_INTEGER) {
    reply_error(r, "script", e);
    return INT64_MIN;
  }
  const long long v = r->integer;
  freeReplyObject(r);
  return v;
}

/* ---- runnable jobs ---- */

#define KEYBUF 256

static int rb_push(qbackend *qb, const char *id, err *e) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF];
  const char *keys[] = {key(b, k1, KEYBUF, "q", NULL), key(b, k2, KEYBUF, "order", NULL),
                        key(b, k3, KEYBUF, "orderseq", NULL)};
  const long long v = rb_eval_int(b, S_PUSH, 3, keys, 1, &id, e);
  if (v == INT64_MIN)
    return e->code ? e->code : ERR_IO;
  if (v < 0)
    return err_set(e, QBACKEND_EXISTS, "job %s is queued or running already", id);
  return ERR_OK;
}

static int rb_remove(qbackend *qb, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF];
  const char *keys[] = {key(b, k1, KEYBUF, "q", NULL), key(b, k2, KEYBUF, "order", NULL)};
  err e = {0};
  const long long v = rb_eval_int(b, S_REMOVE, 2, keys, 1, &id, &e);
  return v == 1;
}

/* A plain command with an integer reply; -1 when the server cannot answer. */
static long long rb_int(redis_backend *b, int argc, const char **argv) {
  err e = {0};
  redisReply *r = redisconn_argv(b->c, argc, argv, NULL, &e);
  const long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer
                      : r && r->type == REDIS_REPLY_NIL   ? -2
                                                          : -1;
  freeReplyObject(r);
  return v;
}

static int rb_count(qbackend *qb) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF];
  const char *argv[] = {"ZCARD", key(b, k, KEYBUF, "q", NULL)};
  const long long v = rb_int(b, 2, argv);
  return v > 0 ? (int)v : 0;
}

static int rb_position(qbackend *qb, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF];
  const char *argv[] = {"ZRANK", key(b, k, KEYBUF, "q", NULL), id};
  const long long v = rb_int(b, 3, argv);
  return v >= 0 ? (int)v + 1 : 0;
}

/* Copies the string elements of an array reply into ids, up to max; returns how many. */
static int copy_ids(const redisReply *r, int max, qbackend_id *ids) {
  int n = 0;
  for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements && n < max; i++) {
    const redisReply *el = r->element[i];
    if (el->type == REDIS_REPLY_STRING && el->len < QUEUE_ID_SIZE)
      memcpy(ids[n++], el->str, el->len + 1);
  }
  return n;
}

static int rb_peek(qbackend *qb, int from, int max, qbackend_id *ids) {
  redis_backend *b = (redis_backend *)qb;
  if (max <= 0 || from < 0)
    return 0;
  char k[KEYBUF], lo[24], hi[24];
  snprintf(lo, sizeof lo, "%d", from);
  snprintf(hi, sizeof hi, "%d", from + max - 1);
  const char *argv[] = {"ZRANGE", key(b, k, KEYBUF, "q", NULL), lo, hi};
  err e = {0};
  redisReply *r = redisconn_argv(b->c, 4, argv, NULL, &e);
  const int n = copy_ids(r, max, ids);
  freeReplyObject(r);
  return n;
}

static int rb_claim(qbackend *qb, const char *id, int lease_ms, uint64_t *token, err *e) {
  redis_backend *b = (redis_backend *)qb;
  if (lease_ms <= 0)
    return err_set(e, ERR_INVALID, "a lease must be positive (got %d ms)", lease_ms);
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF], k4[KEYBUF], lease[16];
  const char *keys[] = {key(b, k1, KEYBUF, "q", NULL), key(b, k2, KEYBUF, "leases", NULL),
                        key(b, k3, KEYBUF, "tokens", NULL), key(b, k4, KEYBUF, "tokenseq", NULL)};
  snprintf(lease, sizeof lease, "%d", lease_ms);
  const char *args[] = {id, lease};
  const long long v = rb_eval_int(b, S_CLAIM, 4, keys, 2, args, e);
  if (v == INT64_MIN)
    return e->code ? e->code : ERR_IO;
  if (v < 0)
    return err_set(e, QBACKEND_GONE, "job %s is not queued", id);
  *token = (uint64_t)v;
  return ERR_OK;
}

/* renew, complete and release: a script over the claim of id under token. */
static int rb_held_op(redis_backend *b, int s, const char *id, uint64_t token, int lease_ms,
                      err *e) {
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF], k4[KEYBUF], k5[KEYBUF], tok[24], lease[16];
  const char *keys[] = {key(b, k1, KEYBUF, "leases", NULL), key(b, k2, KEYBUF, "tokens", NULL),
                        key(b, k3, KEYBUF, "order", NULL), key(b, k4, KEYBUF, "q", NULL),
                        key(b, k5, KEYBUF, "cancel", NULL)};
  snprintf(tok, sizeof tok, "%" PRIu64, token);
  snprintf(lease, sizeof lease, "%d", lease_ms);
  const char *args[] = {id, tok, lease};
  const long long v = rb_eval_int(b, s, 5, keys, s == S_RENEW ? 3 : 2, args, e);
  if (v == INT64_MIN)
    return e->code ? e->code : ERR_IO;
  if (v < 0)
    return err_set(e, QBACKEND_GONE, "the claim on job %s is no longer held", id);
  return ERR_OK;
}

static int rb_renew(qbackend *qb, const char *id, uint64_t token, int lease_ms, err *e) {
  if (lease_ms <= 0)
    return err_set(e, ERR_INVALID, "a lease must be positive (got %d ms)", lease_ms);
  return rb_held_op((redis_backend *)qb, S_RENEW, id, token, lease_ms, e);
}

static int rb_complete(qbackend *qb, const char *id, uint64_t token, err *e) {
  return rb_held_op((redis_backend *)qb, S_COMPLETE, id, token, 0, e);
}

static int rb_release(qbackend *qb, const char *id, uint64_t token, err *e) {
  return rb_held_op((redis_backend *)qb, S_RELEASE, id, token, 0, e);
}

static int rb_reclaim(qbackend *qb, int max, qbackend_id *ids) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF], k4[KEYBUF], k5[KEYBUF];
  const char *keys[] = {key(b, k1, KEYBUF, "leases", NULL), key(b, k2, KEYBUF, "tokens", NULL),
                        key(b, k3, KEYBUF, "order", NULL), key(b, k4, KEYBUF, "q", NULL),
                        key(b, k5, KEYBUF, "cancel", NULL)};
  err e = {0};
  redisReply *r = rb_eval(b, S_RECLAIM, 5, keys, 0, NULL, &e);
  const int all = r && r->type == REDIS_REPLY_ARRAY ? (int)r->elements : 0;
  copy_ids(r, max, ids);
  freeReplyObject(r);
  return all;
}

static int rb_cancel_request(qbackend *qb, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF];
  const char *keys[] = {key(b, k1, KEYBUF, "tokens", NULL), key(b, k2, KEYBUF, "cancel", NULL)};
  err e = {0};
  return rb_eval_int(b, S_CANCEL, 2, keys, 1, &id, &e) == 1;
}

static int rb_cancel_requested(qbackend *qb, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF];
  const char *argv[] = {"SISMEMBER", key(b, k, KEYBUF, "cancel", NULL), id};
  err e = {0};
  redisReply *r = redisconn_argv(b->c, 3, argv, NULL, &e);
  const int asked = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
  freeReplyObject(r);
  return asked;
}

/* P:own:OWNER into k (KEYBUF bytes); NULL with e set (when given) if it does not fit. */
static const char *owner_key(const redis_backend *b, const char *owner, char *k, err *e) {
  if (strlen(b->prefix) + strlen(owner) + 8 < KEYBUF)
    return key(b, k, KEYBUF, "own", owner);
  if (e)
    err_set(e, ERR_INVALID, "API key name '%s' is too long to count in Redis", owner);
  return NULL;
}

static int rb_owner_add(qbackend *qb, const char *owner, const char *id, double cost, err *e) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF], c[32];
  if (!owner_key(b, owner, k, e))
    return e->code;
  snprintf(c, sizeof c, "%.17g", cost);
  const char *argv[] = {"HSET", k, id, c};
  redisReply *r = redisconn_argv(b->c, 4, argv, NULL, e);
  if (!r)
    return e->code ? e->code : ERR_IO;
  if (r->type == REDIS_REPLY_ERROR)
    return reply_error(r, "HSET", e);
  freeReplyObject(r);
  return ERR_OK;
}

static int rb_owner_load(qbackend *qb, const char *owner, int *jobs, double *cost, err *e) {
  redis_backend *b = (redis_backend *)qb;
  *jobs = 0;
  *cost = 0;
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF];
  if (!owner_key(b, owner, k1, e))
    return e->code;
  const char *keys[] = {k1, key(b, k2, KEYBUF, "q", NULL), key(b, k3, KEYBUF, "leases", NULL)};
  redisReply *r = rb_eval(b, S_OWNER_LOAD, 3, keys, 0, NULL, e);
  if (!r)
    return e->code ? e->code : ERR_IO;
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
      r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_STRING)
    return reply_error(r, "counting an owner's jobs", e);
  *jobs = (int)r->element[0]->integer;
  *cost = strtod(r->element[1]->str, NULL);
  freeReplyObject(r);
  return ERR_OK;
}

static void rb_owner_drop(qbackend *qb, const char *owner, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF];
  if (!owner_key(b, owner, k, NULL))
    return;
  const char *argv[] = {"HDEL", k, id};
  err e = {0};
  freeReplyObject(redisconn_argv(b->c, 3, argv, NULL, &e)); /* else dropped at the next count */
}

/* ---- the group's nodes ---- */

/* P:node:NODE into k (KEYBUF bytes); NULL if it does not fit. */
static const char *node_key(const redis_backend *b, const char *node, char *k) {
  return strlen(b->prefix) + strlen(node) + 8 < KEYBUF ? key(b, k, KEYBUF, "node", node) : NULL;
}

static int rb_advertise(qbackend *qb, const char *node, const char *text, int ttl_ms, err *e) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF], ttl[16];
  if (ttl_ms <= 0 || !node_key(b, node, k2))
    return err_set(e, ERR_INVALID, "node '%s' or its time to live (%d ms) is not usable", node,
                   ttl_ms);
  snprintf(ttl, sizeof ttl, "%d", ttl_ms);
  const char *keys[] = {key(b, k1, KEYBUF, "nodes", NULL), k2};
  const char *args[] = {node, text, ttl};
  const long long v = rb_eval_int(b, S_ADVERTISE, 2, keys, 3, args, e);
  return v == INT64_MIN ? (e->code ? e->code : ERR_IO) : ERR_OK;
}

static void rb_withdraw(qbackend *qb, const char *node) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF];
  if (!node_key(b, node, k2))
    return;
  const char *del[] = {"DEL", k2};
  const char *zrem[] = {"ZREM", key(b, k1, KEYBUF, "nodes", NULL), node};
  err e = {0};
  freeReplyObject(redisconn_argv(b->c, 2, del, NULL, &e)); /* else it runs out by itself */
  freeReplyObject(redisconn_argv(b->c, 3, zrem, NULL, &e));
}

static int rb_nodes(qbackend *qb, qbackend_node_fn fn, void *user, err *e) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF];
  const char *keys[] = {key(b, k, KEYBUF, "nodes", NULL)};
  redisReply *r = rb_eval(b, S_NODES, 1, keys, 0, NULL, e);
  if (!r)
    return e->code ? e->code : ERR_IO;
  if (r->type != REDIS_REPLY_ARRAY)
    return reply_error(r, "listing the nodes", e);
  /* their words in one MGET: one that ran out since is nil, and left out */
  const size_t n = r->elements;
  const char **argv = mem_calloc(n + 1, sizeof *argv);
  size_t *from = mem_calloc(n + 1, sizeof *from); /* argv[1 + i] is the key of element from[i] */
  char *keybuf = mem_malloc((n ? n : 1) * KEYBUF);
  int rc = argv && from && keybuf ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  size_t m = 0;
  for (size_t i = 0; rc == ERR_OK && i < n; i++) {
    char *k = keybuf + m * KEYBUF;
    if (r->element[i]->type == REDIS_REPLY_STRING && node_key(b, r->element[i]->str, k)) {
      argv[1 + m] = k;
      from[m++] = i;
    }
  }
  if (rc == ERR_OK && m > 0) {
    argv[0] = "MGET";
    redisReply *v = redisconn_argv(b->c, (int)m + 1, argv, NULL, e);
    if (!v)
      rc = e->code ? e->code : ERR_IO;
    else if (v->type != REDIS_REPLY_ARRAY || v->elements != m)
      rc = reply_error(v, "MGET of the nodes", e), v = NULL;
    for (size_t i = 0; v && i < m; i++)
      if (v->element[i]->type == REDIS_REPLY_STRING)
        fn(user, r->element[from[i]]->str, v->element[i]->str, v->element[i]->len);
    freeReplyObject(v);
  }
  free(from);
  free(argv);
  free(keybuf);
  freeReplyObject(r);
  return rc;
}

/* ---- event logs ---- */

static int rb_append(qbackend *qb, const char *id, uint64_t seq, const char *type, const char *data,
                     int lasting, err *e) {
  redis_backend *b = (redis_backend *)qb;
  if (!type[0] || strlen(type) >= QBACKEND_TYPE_SIZE || strchr(type, ' '))
    return err_set(e, ERR_INVALID, "event type '%s' is not one word", type);
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF], sq[24], tm[16];
  const char *keys[] = {key(b, k1, KEYBUF, "ev", id), key(b, k2, KEYBUF, "evt", id),
                        key(b, k3, KEYBUF, "evlast", NULL)};
  snprintf(sq, sizeof sq, "%" PRIu64, seq);
  snprintf(tm, sizeof tm, "%d", b->transient_max);
  const char *args[] = {id, sq, type, lasting ? "1" : "0", data, tm};
  const long long v = rb_eval_int(b, S_APPEND, 3, keys, 6, args, e);
  if (v == INT64_MIN)
    return e->code ? e->code : ERR_IO;
  if (v < 0)
    return err_set(e, QBACKEND_ORDER, "event %" PRIu64 " of job %s is not above the last", seq, id);
  return ERR_OK;
}

/* One member "SEQ TYPE LASTING DATA" into ev; 0 if it is not of that form. */
static int parse_event(const char *s, size_t len, qbackend_event *ev) {
  char *end;
  const unsigned long long seq = strtoull(s, &end, 10);
  const char *type = end + 1;
  const char *sp = *end == ' ' ? memchr(type, ' ', len - (size_t)(type - s)) : NULL;
  if (!sp || sp - type >= QBACKEND_TYPE_SIZE || sp + 3 > s + len || sp[2] != ' ')
    return 0;
  ev->seq = seq;
  memcpy(ev->type, type, (size_t)(sp - type));
  ev->type[sp - type] = 0;
  ev->lasting = sp[1] == '1';
  const char *data = sp + 3;
  const size_t n = len - (size_t)(data - s);
  ev->data = mem_malloc(n + 1);
  if (!ev->data)
    return 0;
  memcpy(ev->data, data, n);
  ev->data[n] = 0;
  return 1;
}

static int rb_read(qbackend *qb, const char *id, uint64_t after, int lasting_only,
                   qbackend_event **evs, int *n, err *e) {
  redis_backend *b = (redis_backend *)qb;
  *evs = NULL;
  *n = 0;
  char k[KEYBUF], lo[32];
  snprintf(lo, sizeof lo, "(%" PRIu64, after);
  const char *argv[] = {"ZRANGEBYSCORE", key(b, k, KEYBUF, "ev", id), lo, "+inf"};
  redisReply *r = redisconn_argv(b->c, 4, argv, NULL, e);
  if (!r)
    return e->code ? e->code : ERR_IO;
  if (r->type != REDIS_REPLY_ARRAY)
    return reply_error(r, "ZRANGEBYSCORE", e);
  qbackend_event *out = r->elements ? mem_calloc(r->elements, sizeof *out) : NULL;
  if (r->elements && !out) {
    freeReplyObject(r);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  int k2 = 0;
  for (size_t i = 0; i < r->elements; i++) {
    const redisReply *el = r->element[i];
    qbackend_event ev = {0};
    if (el->type != REDIS_REPLY_STRING || !parse_event(el->str, el->len, &ev)) {
      qbackend_events_free(out, k2);
      freeReplyObject(r);
      return err_set(e, ERR_IO, "redis: job %s has an event that is not ours", id);
    }
    if (lasting_only && !ev.lasting) {
      free(ev.data);
      continue;
    }
    out[k2++] = ev;
  }
  freeReplyObject(r);
  if (k2 == 0) {
    free(out);
    out = NULL;
  }
  *evs = out;
  *n = k2;
  return ERR_OK;
}

static void rb_trim(qbackend *qb, const char *id, int keep_transient) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF], keep[16];
  const char *keys[] = {key(b, k1, KEYBUF, "ev", id), key(b, k2, KEYBUF, "evt", id)};
  snprintf(keep, sizeof keep, "%d", keep_transient < 0 ? 0 : keep_transient);
  const char *args[] = {keep};
  err e = {0};
  freeReplyObject(rb_eval(b, S_TRIM, 2, keys, 1, args, &e));
}

static void rb_drop(qbackend *qb, const char *id) {
  redis_backend *b = (redis_backend *)qb;
  char k1[KEYBUF], k2[KEYBUF], k3[KEYBUF];
  const char *del[] = {"DEL", key(b, k1, KEYBUF, "ev", id), key(b, k2, KEYBUF, "evt", id)};
  const char *hdel[] = {"HDEL", key(b, k3, KEYBUF, "evlast", NULL), id};
  err e = {0};
  freeReplyObject(redisconn_argv(b->c, 3, del, NULL, &e));
  freeReplyObject(redisconn_argv(b->c, 3, hdel, NULL, &e));
}

static void rb_expire(qbackend *qb, const char *id, int ttl_s) {
  redis_backend *b = (redis_backend *)qb;
  char k[KEYBUF], ttl[16];
  snprintf(ttl, sizeof ttl, "%d", ttl_s);
  static const char *const names[] = {"ev", "evt"};
  for (int i = 0; i < 2; i++) {
    const char *argv[] = {"EXPIRE", key(b, k, KEYBUF, names[i], id), ttl};
    err e = {0};
    freeReplyObject(redisconn_argv(b->c, 3, argv, NULL, &e)); /* best effort, like drop */
  }
}

static void rb_free(qbackend *qb) {
  redis_backend *b = (redis_backend *)qb;
  if (!b)
    return;
  redisconn_free(b->c);
  free(b);
}

static const qbackend_ops redis_ops = {
    .push = rb_push,
    .remove = rb_remove,
    .count = rb_count,
    .position = rb_position,
    .peek = rb_peek,
    .claim = rb_claim,
    .renew = rb_renew,
    .complete = rb_complete,
    .release = rb_release,
    .reclaim = rb_reclaim,
    .cancel_request = rb_cancel_request,
    .cancel_requested = rb_cancel_requested,
    .owner_add = rb_owner_add,
    .owner_load = rb_owner_load,
    .owner_drop = rb_owner_drop,
    .advertise = rb_advertise,
    .withdraw = rb_withdraw,
    .nodes = rb_nodes,
    .append = rb_append,
    .read = rb_read,
    .trim = rb_trim,
    .drop = rb_drop,
    .expire = rb_expire,
    .free = rb_free,
};

/* ---- opening ---- */

int qbackend_redis_open(const qbackend_redis_opts *o, qbackend **out, err *e) {
  const char *prefix = o->prefix && *o->prefix ? o->prefix : "denoised";
  if (strlen(prefix) >= sizeof((redis_backend *)0)->prefix || strpbrk(prefix, " \t\r\n*?[]\\"))
    return err_set(e, ERR_INVALID,
                   "redis_prefix '%s' is too long or has blanks or pattern characters", prefix);
  redis_backend *b = mem_calloc(1, sizeof *b);
  if (!b)
    return err_set(e, ERR_NOMEM, "out of memory");
  b->base.ops = &redis_ops;
  b->transient_max = o->transient_max > 0 ? o->transient_max : 64;
  snprintf(b->prefix, sizeof b->prefix, "%s", prefix);
  int rc = redisconn_open(o->url, o->password, o->timeout_ms, &b->c, e);
  if (rc == ERR_OK) {
    char name[160];
    snprintf(name, sizeof name, "denoised:%s", prefix);
    rc = redisconn_set_name(b->c, name, e);
  }
  for (int s = 0; rc == ERR_OK && s < S_COUNT; s++) { /* load once, then EVALSHA */
    const char *argv[] = {"SCRIPT", "LOAD", scripts[s]};
    redisReply *r = redisconn_argv(b->c, 3, argv, NULL, e);
    if (!r)
      rc = ERR_IO;
    else if (r->type != REDIS_REPLY_STRING || r->len != 40)
      rc = reply_error(r, "SCRIPT LOAD", e), r = NULL;
    else
      memcpy(b->sha[s], r->str, 41);
    freeReplyObject(r);
  }
  if (rc != ERR_OK) {
    rb_free(&b->base);
    return rc;
  }
  *out = &b->base;
  return ERR_OK;
}
