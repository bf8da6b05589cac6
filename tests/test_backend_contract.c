/* The queue backend's contract (queue/backend.h), written against the ops struct only, so every
 * backend runs the same checks: a factory per backend (the Redis one gives each test a fresh key
 * prefix and moves time by sleeping). Each test runs once per factory. What it pins down:
 * first pushed first claimed, a job claimed by one holder at a time, leases that renew and run
 * out (the job back at its place, the old token dead), event logs read after a sequence number
 * with gaps, trimming and dropping, and threads that claim concurrently never sharing a job.
 * ASan checks that freeing a backend with jobs, claims and logs in it leaks nothing. The Redis
 * backend runs on a scratch redis-server (testredis.h); without one installed it is skipped,
 * and the test says so. */
#include <pthread.h>

#include "backend.h"
#include "queue.h"
#include "redisconn.h"
#include "testredis.h"
#include "testutil.h"

/* ---- factories ---- */

typedef struct fixture {
  double now; /* the in-memory backend's clock, seconds */
} fixture;

typedef struct factory {
  const char *name;
  int (*open)(fixture *fx, qbackend **out, err *e);
  /* Moves the backend's clock on by ms (real backends sleep). */
  void (*advance)(fixture *fx, int ms);
} factory;

static double fixture_clock(void *user) {
  return ((const fixture *)user)->now;
}

static int mem_open(fixture *fx, qbackend **out, err *e) {
  fx->now = 1000;
  qbackend_mem_opts o = {.transient_max = 8, .clock = fixture_clock, .clock_user = fx};
  return qbackend_mem_open(&o, out, e);
}

static void mem_advance(fixture *fx, int ms) {
  fx->now += ms / 1000.0;
}

/* The Redis backend on a scratch server (testredis.h) shared by the tests; each test gets its
 * own key prefix, so it starts from an empty queue. Time moves by sleeping: leases run on the
 * server's clock. */
static test_redis redis;

static int redis_open(fixture *fx, qbackend **out, err *e) {
  static int opened;
  char prefix[64];
  (void)fx;
  snprintf(prefix, sizeof prefix, "test-%ld-%d", (long)getpid(), ++opened);
  qbackend_redis_opts o = {.url = redis.url, .prefix = prefix, .transient_max = 8};
  return qbackend_redis_open(&o, out, e);
}

static void redis_advance(fixture *fx, int ms) {
  (void)fx;
  usleep((useconds_t)ms * 1000);
}

static factory factories[2] = {{"mem", mem_open, mem_advance}};
static int nfactories = 1;

/* The backend of loop index i, empty. */
static qbackend *open_backend(int i, fixture *fx) {
  qbackend *b = NULL;
  err e = {0};
  ck_assert_msg(factories[i].open(fx, &b, &e) == ERR_OK, "%s: %s", factories[i].name, e.msg);
  return b;
}

static void push(qbackend *b, const char *id) {
  err e = {0};
  ck_assert_msg(b->ops->push(b, id, &e) == ERR_OK, "push %s: %s", id, e.msg);
}

static uint64_t claim(qbackend *b, const char *id, int lease_ms) {
  err e = {0};
  uint64_t t = 0;
  ck_assert_msg(b->ops->claim(b, id, lease_ms, &t, &e) == ERR_OK, "claim %s: %s", id, e.msg);
  return t;
}

/* The queued ids joined by spaces, head first. */
static const char *queued(qbackend *b, char *buf, size_t n) {
  qbackend_id ids[16];
  const int k = b->ops->peek(b, 0, 16, ids);
  buf[0] = 0;
  for (int i = 0; i < k; i++)
    snprintf(buf + strlen(buf), n - strlen(buf), "%s%s", i ? " " : "", ids[i]);
  return buf;
}

/* ---- runnable jobs ---- */

START_TEST(fifo_order_and_places) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  char buf[256];
  push(b, "a");
  push(b, "b");
  push(b, "c");
  err e = {0};
  ck_assert_int_eq(b->ops->push(b, "b", &e), QBACKEND_EXISTS);
  ck_assert_int_eq(b->ops->count(b), 3);
  ck_assert_str_eq(queued(b, buf, sizeof buf), "a b c");
  ck_assert_int_eq(b->ops->position(b, "a"), 1);
  ck_assert_int_eq(b->ops->position(b, "c"), 3);
  ck_assert_int_eq(b->ops->position(b, "zz"), 0);
  qbackend_id two[2];
  ck_assert_int_eq(b->ops->peek(b, 1, 2, two), 2);
  ck_assert_str_eq(two[0], "b");
  ck_assert_int_eq(b->ops->peek(b, 3, 2, two), 0);
  ck_assert_int_eq(b->ops->remove(b, "b"), 1); /* a cancel */
  ck_assert_int_eq(b->ops->remove(b, "b"), 0);
  ck_assert_int_eq(b->ops->position(b, "c"), 2);
  uint64_t t = claim(b, "a", 60000);
  ck_assert_int_eq(b->ops->remove(b, "a"), 0); /* claimed: the holder finishes it */
  ck_assert_int_eq(b->ops->count(b), 1);
  ck_assert_int_eq(b->ops->position(b, "a"), 0);
  ck_assert_int_eq(b->ops->push(b, "a", &e), QBACKEND_EXISTS);
  ck_assert_int_eq(b->ops->complete(b, "a", t, &e), ERR_OK);
  push(b, "d");
  ck_assert_str_eq(queued(b, buf, sizeof buf), "c d");
  b->ops->free(b);
}
END_TEST

START_TEST(a_job_has_one_holder) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  err e = {0};
  uint64_t t2 = 0;
  push(b, "a");
  push(b, "b");
  const uint64_t t1 = claim(b, "a", 60000);
  ck_assert_int_eq(b->ops->claim(b, "a", 60000, &t2, &e), QBACKEND_GONE);
  ck_assert_int_eq(b->ops->claim(b, "nobody", 60000, &t2, &e), QBACKEND_GONE);
  ck_assert_int_ne(b->ops->claim(b, "b", 0, &t2, &e), ERR_OK); /* a lease must be positive */
  t2 = claim(b, "b", 60000);
  ck_assert(t1 != t2);
  ck_assert_int_eq(b->ops->complete(b, "a", t2, &e), QBACKEND_GONE); /* b's token, not a's */
  ck_assert_int_eq(b->ops->renew(b, "a", t1, 60000, &e), ERR_OK);
  ck_assert_int_eq(b->ops->complete(b, "a", t1, &e), ERR_OK);
  ck_assert_int_eq(b->ops->complete(b, "a", t1, &e), QBACKEND_GONE);
  ck_assert_int_eq(b->ops->release(b, "a", t1, &e), QBACKEND_GONE);
  ck_assert_int_eq(b->ops->claim(b, "a", 60000, &t2, &e), QBACKEND_GONE); /* completed */
  ck_assert_int_eq(b->ops->count(b), 0);
  b->ops->free(b);
}
END_TEST

START_TEST(release_puts_a_job_back_at_its_place) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  char buf[256];
  err e = {0};
  push(b, "a");
  push(b, "b");
  push(b, "c");
  const uint64_t tb = claim(b, "b", 60000);
  const uint64_t ta = claim(b, "a", 60000);
  push(b, "d");
  ck_assert_int_eq(b->ops->release(b, "b", tb, &e), ERR_OK);
  ck_assert_str_eq(queued(b, buf, sizeof buf), "b c d");
  ck_assert_int_eq(b->ops->release(b, "a", ta, &e), ERR_OK);
  ck_assert_str_eq(queued(b, buf, sizeof buf), "a b c d");
  ck_assert_int_eq(b->ops->renew(b, "a", ta, 60000, &e), QBACKEND_GONE);
  const uint64_t again = claim(b, "a", 60000); /* runs again, under a new token */
  ck_assert(again != ta);
  b->ops->free(b);
}
END_TEST

START_TEST(leases_run_out_unless_renewed) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  char buf[256];
  err e = {0};
  qbackend_id back[4];
  push(b, "a");
  push(b, "b");
  const uint64_t t = claim(b, "a", 1000);
  factories[_i].advance(&fx, 600);
  ck_assert_int_eq(b->ops->reclaim(b, 4, back), 0);
  ck_assert_int_eq(b->ops->renew(b, "a", t, 1000, &e), ERR_OK); /* a heartbeat */
  factories[_i].advance(&fx, 600);
  ck_assert_int_eq(b->ops->reclaim(b, 4, back), 0); /* 1.2 s after the claim, 0.6 s after renew */
  ck_assert_int_eq(b->ops->position(b, "a"), 0);
  factories[_i].advance(&fx, 600); /* no heartbeat for 1.2 s: the holder is presumed dead */
  ck_assert_int_eq(b->ops->renew(b, "a", t, 1000, &e), QBACKEND_GONE);
  ck_assert_int_eq(b->ops->complete(b, "a", t, &e), QBACKEND_GONE);
  ck_assert_int_eq(b->ops->reclaim(b, 4, back), 1);
  ck_assert_str_eq(back[0], "a");
  ck_assert_int_eq(b->ops->reclaim(b, 4, back), 0);
  ck_assert_str_eq(queued(b, buf, sizeof buf), "a b"); /* back ahead of b, as first pushed */
  const uint64_t t2 = claim(b, "a", 1000);
  ck_assert(t2 != t);
  ck_assert_int_eq(b->ops->complete(b, "a", t, &e), QBACKEND_GONE); /* the old holder's */
  ck_assert_int_eq(b->ops->complete(b, "a", t2, &e), ERR_OK);
  factories[_i].advance(&fx, 5000);
  ck_assert_int_eq(b->ops->reclaim(b, 4, back), 0); /* completed jobs never come back */
  /* more expired than the caller asked to hear about: all go back all the same */
  push(b, "c");
  push(b, "d");
  claim(b, "b", 100);
  claim(b, "c", 100);
  claim(b, "d", 100);
  factories[_i].advance(&fx, 300);
  ck_assert_int_eq(b->ops->reclaim(b, 1, back), 3);
  ck_assert_int_eq(b->ops->count(b), 3);
  ck_assert_str_eq(queued(b, buf, sizeof buf), "b c d");
  b->ops->free(b);
}
END_TEST

/* A cancel that reaches a node other than the holder: recorded only for a claimed job, seen by
 * the holder and by the next one if the claim is given back, gone once a claim completes. */
START_TEST(cancel_requests_reach_the_holder) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  err e = {0};
  push(b, "a");
  push(b, "b");
  ck_assert_int_eq(b->ops->cancel_request(b, "a"), 0); /* queued: the caller removes it */
  ck_assert_int_eq(b->ops->cancel_request(b, "nobody"), 0);
  const uint64_t t = claim(b, "a", 60000);
  ck_assert_int_eq(b->ops->cancel_requested(b, "a"), 0);
  ck_assert_int_eq(b->ops->cancel_request(b, "a"), 1);
  ck_assert_int_eq(b->ops->cancel_requested(b, "a"), 1);
  ck_assert_int_eq(b->ops->cancel_requested(b, "b"), 0);
  ck_assert_int_eq(b->ops->release(b, "a", t, &e), ERR_OK);
  const uint64_t t2 = claim(b, "a", 60000); /* the next holder sees the request */
  ck_assert_int_eq(b->ops->cancel_requested(b, "a"), 1);
  ck_assert_int_eq(b->ops->complete(b, "a", t2, &e), ERR_OK);
  ck_assert_int_eq(b->ops->cancel_requested(b, "a"), 0); /* gone with the job */
  push(b, "a");                                          /* an id used again starts clean */
  claim(b, "a", 60000);
  ck_assert_int_eq(b->ops->cancel_requested(b, "a"), 0);
  b->ops->free(b);
}
END_TEST

/* ---- event logs ---- */

static void append(qbackend *b, const char *id, uint64_t seq, const char *type, int lasting) {
  char data[64];
  snprintf(data, sizeof data, "{\"seq\":%llu}", (unsigned long long)seq);
  err e = {0};
  ck_assert_msg(b->ops->append(b, id, seq, type, data, lasting, &e) == ERR_OK, "append %llu: %s",
                (unsigned long long)seq, e.msg);
}

/* The seqs of id's events after `after`, joined by spaces. */
static const char *seqs(qbackend *b, const char *id, uint64_t after, int lasting_only, char *buf,
                        size_t n) {
  qbackend_event *ev = NULL;
  int k = -1;
  err e = {0};
  ck_assert_int_eq(b->ops->read(b, id, after, lasting_only, &ev, &k, &e), ERR_OK);
  buf[0] = 0;
  for (int i = 0; i < k; i++) {
    char want[64];
    snprintf(want, sizeof want, "{\"seq\":%llu}", (unsigned long long)ev[i].seq);
    ck_assert_str_eq(ev[i].data, want); /* each event keeps its own data */
    snprintf(buf + strlen(buf), n - strlen(buf), "%s%llu", i ? " " : "",
             (unsigned long long)ev[i].seq);
  }
  ck_assert(k == 0 ? ev == NULL : ev != NULL);
  qbackend_events_free(ev, k);
  return buf;
}

START_TEST(event_log_reads_after_a_sequence_number) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  char buf[256];
  err e = {0};
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), ""); /* no log yet: empty */
  append(b, "j", 1, "queued", 1);
  append(b, "j", 2, "started", 1);
  append(b, "j", 3, "progress", 0);
  append(b, "k", 1, "queued", 1); /* logs are per job */
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "1 2 3");
  ck_assert_str_eq(seqs(b, "j", 2, 0, buf, sizeof buf), "3");
  ck_assert_str_eq(seqs(b, "j", 3, 0, buf, sizeof buf), "");
  ck_assert_str_eq(seqs(b, "j", 99, 0, buf, sizeof buf), "");
  ck_assert_str_eq(seqs(b, "k", 0, 0, buf, sizeof buf), "1");
  /* gaps: numbers a lost run used are skipped, and a reader between them gets what follows */
  append(b, "j", 40, "queued", 1);
  append(b, "j", 41, "progress", 0);
  ck_assert_str_eq(seqs(b, "j", 3, 0, buf, sizeof buf), "40 41");
  ck_assert_str_eq(seqs(b, "j", 17, 0, buf, sizeof buf), "40 41");
  ck_assert_str_eq(seqs(b, "j", 0, 1, buf, sizeof buf), "1 2 40");
  /* numbers only grow */
  ck_assert_int_eq(b->ops->append(b, "j", 41, "progress", "{}", 0, &e), QBACKEND_ORDER);
  ck_assert_int_eq(b->ops->append(b, "j", 7, "done", "{}", 1, &e), QBACKEND_ORDER);
  ck_assert_int_eq(b->ops->append(b, "n", 0, "queued", "{}", 1, &e), QBACKEND_ORDER);
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "1 2 3 40 41");
  qbackend_event *ev = NULL;
  int k = 0;
  ck_assert_int_eq(b->ops->read(b, "j", 40, 0, &ev, &k, &e), ERR_OK);
  ck_assert_int_eq(k, 1);
  ck_assert_str_eq(ev[0].type, "progress");
  ck_assert_int_eq(ev[0].lasting, 0);
  qbackend_events_free(ev, k);
  b->ops->free(b);
}
END_TEST

START_TEST(event_log_trims_transient_events_only) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  char buf[512];
  append(b, "j", 1, "queued", 1);
  append(b, "j", 2, "started", 1);
  for (uint64_t s = 3; s < 200; s++)
    append(b, "j", s, s % 50 == 0 ? "image" : "progress", s % 50 == 0);
  /* however few progress events a backend keeps, it keeps the newest and every lasting one */
  qbackend_event *ev = NULL;
  int k = 0;
  err e = {0};
  ck_assert_int_eq(b->ops->read(b, "j", 0, 0, &ev, &k, &e), ERR_OK);
  ck_assert_int_ge(k, 7);
  ck_assert_int_eq(ev[k - 1].seq, 199);
  int lasting = 0;
  for (int i = 0; i < k; i++) {
    lasting += ev[i].lasting;
    ck_assert(i == 0 || ev[i].seq > ev[i - 1].seq);
  }
  ck_assert_int_eq(lasting, 5);
  qbackend_events_free(ev, k);
  append(b, "j", 200, "done", 1);
  b->ops->trim(b, "j", 1); /* a finished job keeps its last progress event */
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "1 2 50 100 150 199 200");
  b->ops->trim(b, "j", 0);
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "1 2 50 100 150 200");
  ck_assert_str_eq(seqs(b, "j", 100, 0, buf, sizeof buf), "150 200");
  b->ops->trim(b, "nobody", 0); /* no log: nothing to do */
  b->ops->drop(b, "j");
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "");
  append(b, "j", 1, "queued", 1); /* a dropped log starts afresh */
  ck_assert_str_eq(seqs(b, "j", 0, 0, buf, sizeof buf), "1");
  b->ops->drop(b, "nobody");
  b->ops->free(b);
}
END_TEST

/* ---- concurrency ---- */

#define NCLAIMERS 8
#define NJOBS 2000

typedef struct claimer {
  qbackend *b;
  pthread_barrier_t *go;
  int got[NJOBS]; /* claims won, by job number */
  int claims, lost;
} claimer;

/* Takes jobs from the head as several daemons' workers would: peek, then race to claim. */
static void *claim_loop(void *arg) {
  claimer *c = arg;
  pthread_barrier_wait(c->go); /* all at once: the races are the point */
  for (;;) {
    qbackend_id ids[4];
    const int n = c->b->ops->peek(c->b, 0, 4, ids);
    if (n == 0)
      return NULL;
    for (int i = 0; i < n; i++) {
      uint64_t t;
      err e = {0};
      const int rc = c->b->ops->claim(c->b, ids[i], 60000, &t, &e);
      if (rc == QBACKEND_GONE) {
        c->lost++;
        continue;
      }
      if (rc != ERR_OK)
        return NULL;
      c->got[atoi(ids[i] + 1)]++;
      c->claims++;
      c->b->ops->append(c->b, ids[i], 1, "started", "{}", 1, &e);
      if (atoi(ids[i] + 1) % 3 == 0) /* some finish, some stay claimed until the end */
        c->b->ops->complete(c->b, ids[i], t, &e);
    }
  }
}

START_TEST(concurrent_claimers_never_share_a_job) {
  fixture fx;
  qbackend *b = open_backend(_i, &fx);
  for (int i = 0; i < NJOBS; i++) {
    char id[16];
    snprintf(id, sizeof id, "j%d", i);
    push(b, id);
  }
  static claimer c[NCLAIMERS];
  pthread_t th[NCLAIMERS];
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, NCLAIMERS);
  memset(c, 0, sizeof c);
  for (int i = 0; i < NCLAIMERS; i++) {
    c[i].b = b;
    c[i].go = &go;
    ck_assert_int_eq(pthread_create(&th[i], NULL, claim_loop, &c[i]), 0);
  }
  for (int i = 0; i < NCLAIMERS; i++)
    pthread_join(th[i], NULL);
  pthread_barrier_destroy(&go);
  int total = 0, lost = 0;
  for (int j = 0; j < NJOBS; j++) {
    int holders = 0;
    for (int i = 0; i < NCLAIMERS; i++)
      holders += c[i].got[j];
    ck_assert_msg(holders == 1, "job j%d claimed %d times", j, holders);
  }
  for (int i = 0; i < NCLAIMERS; i++) {
    total += c[i].claims;
    lost += c[i].lost;
  }
  ck_assert_int_eq(total, NJOBS);
  ck_assert_int_eq(b->ops->count(b), 0);
  fprintf(stderr, "%s: %d claims, %d lost races\n", factories[_i].name, total, lost);
  b->ops->free(b); /* claimed jobs and logs left in it: ASan checks they are freed */
}
END_TEST

static void stop_redis(void) {
  test_redis_stop(&redis);
}

/* ---- the Redis backend's own ---- */

START_TEST(redis_urls_and_refusals) {
  char host[64];
  int port, db;
  err e = {0};
  ck_assert_int_eq(
      redisconn_parse_url("redis://cache.local:6380/2", host, sizeof host, &port, &db, &e), ERR_OK);
  ck_assert_str_eq(host, "cache.local");
  ck_assert_int_eq(port, 6380);
  ck_assert_int_eq(db, 2);
  ck_assert_int_eq(redisconn_parse_url("redis://h", host, sizeof host, &port, &db, &e), ERR_OK);
  ck_assert_int_eq(port, 6379);
  ck_assert_int_eq(redisconn_parse_url("/run/redis.sock", host, sizeof host, &port, &db, &e),
                   ERR_OK);
  ck_assert_int_eq(port, 0);
  const char *bad[][2] = {
      {"http://h:1", "must be redis://"},   {"redis://:secret@h:1", "must not hold a password"},
      {"redis://h:0", "port must be in"},   {"redis://h:99999", "port must be in"},
      {"redis://h:12x", "port must be in"}, {"redis://h/db", "database must be a number"},
      {"redis://:1", "has no host"},        {"", "empty"}};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    memset(&e, 0, sizeof e);
    ck_assert_int_ne(redisconn_parse_url(bad[i][0], host, sizeof host, &port, &db, &e), ERR_OK);
    ck_assert_msg(strstr(e.msg, bad[i][1]), "'%s': '%s' lacks '%s'", bad[i][0], e.msg, bad[i][1]);
    ck_assert_msg(!strstr(e.msg, "secret"), "the password leaked: %s", e.msg);
  }
  /* nothing listens there: a clear error naming the URL */
  qbackend *b = NULL;
  qbackend_redis_opts o = {.url = "/nonexistent/redis.sock", .timeout_ms = 500};
  memset(&e, 0, sizeof e);
  ck_assert_int_eq(qbackend_redis_open(&o, &b, &e), ERR_IO);
  ck_assert_msg(strstr(e.msg, "cannot connect to /nonexistent/redis.sock"), "%s", e.msg);
  ck_assert_ptr_null(b);
}
END_TEST

/* A server restart (as after a crash, with the append-only file fsynced on every write): the
 * backend reconnects by itself, sends its scripts again (the restarted server forgot them), and
 * finds every queued job, claim and event where it was. */
START_TEST(redis_restart_keeps_the_queue) {
  fixture fx;
  qbackend *b = NULL;
  err e = {0};
  ck_assert_msg(redis_open(&fx, &b, &e) == ERR_OK, "%s", e.msg);
  char buf[256];
  push(b, "a");
  push(b, "b");
  push(b, "c");
  const uint64_t t = claim(b, "a", 60000);
  append(b, "a", 1, "queued", 1);
  append(b, "a", 2, "progress", 0);
  ck_assert_int_eq(test_redis_shutdown(&redis), 0);
  /* down: an error saying so (worth a retry), not a hang */
  ck_assert_int_eq(b->ops->push(b, "d", &e), QUEUE_UNAVAILABLE);
  ck_assert_msg(strstr(e.msg, "redis"), "%s", e.msg);
  ck_assert_int_eq(test_redis_launch(&redis), 0);
  push(b, "e");
  ck_assert_str_eq(queued(b, buf, sizeof buf), "b c e");
  ck_assert_str_eq(seqs(b, "a", 0, 0, buf, sizeof buf), "1 2");
  ck_assert_int_eq(b->ops->complete(b, "a", t, &e), ERR_OK);
  const uint64_t t2 = claim(b, "b", 60000);
  ck_assert(t2 > t); /* tokens survive too: a restart never hands out an old one */
  b->ops->free(b);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("backend_contract");
  TCase *tc = tcase_create("contract");
  if (!test_redis_installed()) {
    fprintf(stderr, "test_backend_contract: SKIPPING the Redis backend: redis-server is not "
                    "installed (scripts/install-deps.sh --redis)\n");
  } else if (test_redis_start(&redis) == 0) {
    signal(SIGPIPE, SIG_IGN); /* as the daemon does: a dropped connection is an error, not a kill */
    atexit(stop_redis);
    factories[nfactories++] = (factory){"redis", redis_open, redis_advance};
  } else {
    fprintf(stderr, "test_backend_contract: redis-server is installed but did not start\n");
    exit(1);
  }
  tcase_add_loop_test(tc, fifo_order_and_places, 0, nfactories);
  tcase_add_loop_test(tc, a_job_has_one_holder, 0, nfactories);
  tcase_add_loop_test(tc, release_puts_a_job_back_at_its_place, 0, nfactories);
  tcase_add_loop_test(tc, leases_run_out_unless_renewed, 0, nfactories);
  tcase_add_loop_test(tc, cancel_requests_reach_the_holder, 0, nfactories);
  tcase_add_loop_test(tc, event_log_reads_after_a_sequence_number, 0, nfactories);
  tcase_add_loop_test(tc, event_log_trims_transient_events_only, 0, nfactories);
  tcase_add_loop_test(tc, concurrent_claimers_never_share_a_job, 0, nfactories);
  suite_add_tcase(s, tc);
  TCase *rc = tcase_create("redis");
  tcase_add_test(rc, redis_urls_and_refusals);
  if (nfactories > 1)
    tcase_add_test(rc, redis_restart_keeps_the_queue);
  suite_add_tcase(s, rc);
  return s;
}
