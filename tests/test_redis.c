/* The daemon on Redis (redis_url): the queue, event logs, job records and images live in a
 * scratch redis-server (testredis.h), so a daemon killed with SIGKILL and started again, even
 * with an empty state directory, finds every finished image and runs the job it was running
 * again once that job's claim has run out; a Redis that cannot be reached, or that refuses the
 * password, stops the start with a clear error and exit code 4; three daemons on one queue
 * share its work, survive one of them being killed and cancel across daemons. Skipped, saying so,
 * where redis-server is not installed. */
#include "testhttp.h"
#include "testredis.h"

#define LONG_JOB                                                                                   \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                                          \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

static test_redis redis;

/* One worker that takes one image at a time, claims of two seconds: jobs run one by one, and a
 * killed daemon's job runs again soon. */
static const char *const ONE_WORKER[] = {"--lease-seconds",    "2", "--workers", "1",
                                         "--batch-max-images", "1", NULL};

/* Whether the daemon's log holds needle. */
static int log_has(const daemon_proc *d, const char *needle) {
  static char text[1 << 20];
  FILE *f = fopen(d->log, "r");
  const size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
  if (f)
    fclose(f);
  text[n] = 0;
  return strstr(text, needle) != NULL;
}

START_TEST(kill9_on_redis_loses_nothing) {
  char st[512], st2[512], path[128];
  daemon_proc d;
  const char *argv[16], **args = test_redis_args(&redis, "kill9", ONE_WORKER, argv, 16);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char done[64], running[64], queued[64];
  submit_job(&d, SMALL_JOB, done, sizeof done);
  wait_state(&d, done, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", done);
  size_t done_len;
  char *done_png = get_body(&d, path, &done_len);
  submit_job(&d, LONG_JOB, running, sizeof running);
  submit_job(&d, SMALL_JOB, queued, sizeof queued);
  wait_running(&d, running, 60);
  ck_assert_int_eq(daemon_signal_wait(&d, SIGKILL, 10), 128 + SIGKILL);
  /* another, empty state directory: everything must come from Redis */
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st2, sizeof st2), args), 0);
  ck_assert(log_has(&d, "redis="));
  char state[32];
  job_state(&d, done, state, sizeof state, NULL);
  ck_assert_str_eq(state, "succeeded");
  size_t len;
  char *png = get_body(&d, path, &len);
  ck_assert(len == done_len && memcmp(png, done_png, len) == 0);
  free(png);
  free(done_png);
  /* the dead process's claim runs out after the lease, then the job runs here */
  wait_state(&d, running, "succeeded", 120);
  wait_state(&d, queued, "succeeded", 60);
  ck_assert(log_has(&d, "its claim ran out"));
  char epath[128];
  snprintf(epath, sizeof epath, "/v1/jobs/%s/events", running);
  char *events = get_body(&d, epath, &len);
  long last = 0;
  int n = 0, done_events = 0;
  for (const char *p = strstr(events, "id: "); p; p = strstr(p + 1, "\nid: ")) {
    const long id = atol(p[0] == '\n' ? p + 5 : p + 4);
    ck_assert_int_gt(id, last); /* numbers continue the log that outlived the process */
    last = id;
    n++;
  }
  for (const char *p = strstr(events, "event: done"); p; p = strstr(p + 1, "event: done"))
    done_events++;
  ck_assert_int_ge(n, 5);
  ck_assert_int_eq(done_events, 1);
  ck_assert_ptr_nonnull(strstr(events, "\"reason\":\"restarted\""));
  free(events);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/7", running);
  free(get_body(&d, path, &len));
  daemon_stop(&d);
}
END_TEST

START_TEST(redis_password_and_refusals) {
  char st[512];
  daemon_proc d;
  redisContext *c = redisConnectUnix(redis.url);
  ck_assert(c && !c->err);
  freeReplyObject(redisCommand(c, "CONFIG SET requirepass s3cret-pw"));
  /* no password, then a wrong one: exit 4, the reason named, the password never shown */
  const char *args[] = {"--redis-url", redis.url, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 4);
  ck_assert(log_has(&d, "Redis unusable"));
  const char *wrong[] = {"DENOISED_REDIS_PASSWORD=not-it", NULL};
  ck_assert_int_eq(daemon_start_env(&d, st, args, wrong), 4);
  ck_assert(log_has(&d, "refused the password"));
  ck_assert(!log_has(&d, "not-it"));
  /* the right one, from the environment and from a file */
  const char *right[] = {"DENOISED_REDIS_PASSWORD=s3cret-pw", NULL};
  ck_assert_int_eq(daemon_start_env(&d, st, args, right), 0);
  ck_assert(!log_has(&d, "s3cret-pw"));
  char id[64];
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  daemon_stop(&d);
  char pwfile[600], tmp[256];
  snprintf(pwfile, sizeof pwfile, "%s/redis-password", test_tmpdir(tmp, sizeof tmp));
  FILE *f = fopen(pwfile, "w");
  ck_assert_ptr_nonnull(f);
  fputs("s3cret-pw\n", f);
  fclose(f);
  const char *from_file[] = {"--redis-url", redis.url, "--redis-password-file", pwfile, NULL};
  ck_assert_int_eq(daemon_start(&d, st, from_file), 0);
  daemon_stop(&d);
  redisReply *r = redisCommand(c, "AUTH s3cret-pw");
  freeReplyObject(r);
  freeReplyObject(redisCommand(c, "CONFIG SET requirepass %s", ""));
  redisFree(c);
}
END_TEST

START_TEST(unreachable_redis_stops_the_start) {
  char st[512], out[8192];
  daemon_proc d;
  const char *args[] = {"--redis-url", "/nonexistent/redis.sock", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 4);
  ck_assert(log_has(&d, "Redis unusable"));
  ck_assert(log_has(&d, "cannot connect to /nonexistent/redis.sock"));
  const char *pw_in_url[] = {"--redis-url", "redis://:hunter2@127.0.0.1:6379", NULL};
  ck_assert_int_eq(daemon_start(&d, st, pw_in_url), 4);
  ck_assert(log_has(&d, "must not hold a password"));
  ck_assert(!log_has(&d, "hunter2"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "serve --redis-prefix 'a b'"), 2);
  ck_assert_ptr_nonnull(strstr(out, "redis_prefix"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "serve --lease-seconds 1"), 2);
  ck_assert_ptr_nonnull(strstr(out, "lease_seconds"));
}
END_TEST

/* The state of job id as daemon d sees it. */
static const char *state_of(const daemon_proc *d, const char *id, char *st, size_t n) {
  job_state(d, id, st, n, NULL);
  return st;
}

/* The number of events of a type in id's stream as daemon d serves it (the whole log: the
 * stream ends with the job). */
static int count_events(const daemon_proc *d, const char *id, const char *type, char **text) {
  char path[128], needle[64];
  snprintf(path, sizeof path, "/v1/jobs/%s/events", id);
  snprintf(needle, sizeof needle, "event: %s\n", type);
  size_t len;
  char *ev = get_body(d, path, &len);
  int n = 0;
  for (const char *p = strstr(ev, needle); p; p = strstr(p + 1, needle))
    n++;
  if (text)
    *text = ev;
  else
    free(ev);
  return n;
}

/* A small job: seed i, class i % 3. */
static void small_job(char *body, size_t n, int i) {
  snprintf(body, n,
           "{\"class_label\": %d, \"seed\": %d, \"scheduler\": {\"name\": \"ddim\", "
           "\"steps\": 10}}",
           i % 3, i);
}

#define NSMALL 97 /* with the long ones, the 100 jobs the issue asks for */
#define NEARLY 9  /* small jobs queued before the kill; the others come after it */
#define NLONG 3

/* Three daemons on one queue: any accepts, any runs, each shows every job; one killed mid-job
 * loses nothing (its job runs again elsewhere once its claim ran out), no job ends twice,
 * every image is the same from every daemon, a stream from a daemon that did not run the job
 * shows all of it, and a cancel sent to one daemon stops the job another runs. */
START_TEST(three_daemons_share_one_queue) {
  char st[3][512], s[32];
  daemon_proc d[3];
  const char *argv[16], **args = test_redis_args(&redis, "trio", ONE_WORKER, argv, 16);
  for (int i = 0; i < 3; i++)
    ck_assert_int_eq(daemon_start(&d[i], th_state_dir(st[i], sizeof st[i]), args), 0);
  char longs[NLONG][64], smalls[NSMALL][64], body[256];
  for (int i = 0; i < NLONG; i++) /* one long job per daemon's worker */
    submit_job(&d[i], LONG_JOB, longs[i], sizeof longs[i]);
  for (int i = 0; i < NEARLY; i++) {
    small_job(body, sizeof body, 100 + i);
    submit_job(&d[i % 3], body, smalls[i], sizeof smalls[i]);
  }
  /* every daemon sees every job, whoever accepted it */
  for (int i = 0; i < NEARLY; i++)
    ck_assert_str_ne(state_of(&d[(i + 1) % 3], smalls[i], s, sizeof s), "");
  /* all three long jobs running: one per daemon; kill daemon 1 in the middle of its */
  for (double t0 = th_now();; usleep(20000)) {
    int running = 0;
    for (int i = 0; i < NLONG; i++)
      running += strcmp(state_of(&d[0], longs[i], s, sizeof s), "running") == 0;
    if (running == NLONG)
      break;
    ck_assert_msg(th_now() - t0 < 60, "the long jobs did not all start");
  }
  ck_assert_int_eq(daemon_signal_wait(&d[1], SIGKILL, 10), 128 + SIGKILL);
  for (int i = NEARLY; i < NSMALL; i++) { /* the survivors take the rest */
    small_job(body, sizeof body, 100 + i);
    submit_job(&d[i % 2 ? 2 : 0], body, smalls[i], sizeof smalls[i]);
  }
  for (int i = 0; i < NLONG; i++)
    wait_state(&d[2], longs[i], "succeeded", 180);
  for (int i = 0; i < NSMALL; i++)
    wait_state(&d[0], smalls[i], "succeeded", 120);
  int restarted = 0;
  for (int i = 0; i < NLONG + NSMALL; i++) {
    const char *id = i < NLONG ? longs[i] : smalls[i - NLONG];
    char *text = NULL;
    ck_assert_int_eq(count_events(&d[2], id, "done", &text), 1); /* ended once */
    ck_assert_int_eq(count_events(&d[0], id, "failed", NULL), 0);
    ck_assert_ptr_nonnull(strstr(text, "event: started"));
    ck_assert_ptr_nonnull(strstr(text, "event: image"));
    restarted += strstr(text, "\"reason\":\"restarted\"") != NULL;
    free(text);
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
    size_t la, lc;
    char *a = get_body(&d[0], path, &la), *c = get_body(&d[2], path, &lc);
    ck_assert(la == lc && memcmp(a, c, la) == 0); /* the same picture from every daemon */
    free(a);
    free(c);
  }
  ck_assert_int_eq(restarted, 1); /* daemon 1's long job, and only it, ran again */
  /* a cancel sent to daemon 2 for a job that daemon 0 or 2 runs */
  char victim[64];
  /* four times LONG_JOB's work (twice the images, guided): the cancel reaches the daemon running
   * it at that daemon's next one-second tick, and must find it still running */
  submit_job(&d[0],
             "{\"class_label\": 0, \"seed\": 6, \"batch_size\": 16, \"guidance\": {\"scale\": 3}, "
             "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}",
             victim, sizeof victim);
  for (double t0 = th_now(); strcmp(state_of(&d[2], victim, s, sizeof s), "running") != 0;
       usleep(20000))
    ck_assert_msg(th_now() - t0 < 60, "the job to cancel did not start");
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", victim);
  http_resp r;
  ck_assert_int_lt(http_req(&d[2], "DELETE", path, NULL, 0, NULL, &r), 300);
  http_free(&r);
  wait_state(&d[0], victim, "cancelled", 60);
  ck_assert_int_eq(count_events(&d[2], victim, "cancelled", NULL), 1);
  ck_assert_int_eq(count_events(&d[0], victim, "done", NULL), 0);
  daemon_stop(&d[0]);
  daemon_stop(&d[2]);
}
END_TEST

/* Waits until /readyz answers want (200 or 503); fails after timeout_s. */
static void wait_ready(const daemon_proc *d, long want, double timeout_s) {
  for (double t0 = th_now();; usleep(50000)) {
    http_resp r;
    const long st = http_get(d, "/readyz", &r);
    http_free(&r);
    if (st == want)
      return;
    ck_assert_msg(th_now() - t0 < timeout_s, "/readyz answered %ld, not %ld", st, want);
  }
}

/* Redis goes away while a job runs and comes back with its append-only file: meanwhile the
 * daemon is not ready and refuses submissions with 503 and Retry-After (nothing is accepted
 * that could not be stored); once Redis is back it is ready again by itself, the job that was
 * running finishes (once: one done event), and what finished before is still there. */
START_TEST(redis_lost_while_running) {
  char st[512], path[128];
  daemon_proc d;
  const char *argv[16], **args = test_redis_args(&redis, "lost", ONE_WORKER, argv, 16);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char before[64], running[64], after[64];
  submit_job(&d, SMALL_JOB, before, sizeof before);
  wait_state(&d, before, "succeeded", 60);
  /* twice LONG_JOB's images: it must still run when Redis is gone (~0.1 s after this) */
  submit_job(&d,
             "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 16, "
             "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}",
             running, sizeof running);
  wait_running(&d, running, 60);
  ck_assert_int_eq(test_redis_shutdown(&redis), 0);
  wait_ready(&d, 503, 15);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", SMALL_JOB, &r), 503);
  char retry[16], code[64] = "";
  ck_assert_ptr_nonnull(http_header(&r, "Retry-After", retry, sizeof retry));
  json_t *err = http_json(&r);
  snprintf(code, sizeof code, "%s",
           json_string_value(json_object_get(json_object_get(err, "error"), "code")));
  json_decref(err);
  http_free(&r);
  ck_assert_str_eq(code, "store_unavailable");
  /* its images cannot be written: queued again, not failed */
  for (double t0 = th_now(); !log_has(&d, "queued again"); usleep(50000))
    ck_assert_msg(th_now() - t0 < 120, "the running job was not queued again");
  ck_assert_int_eq(test_redis_launch(&redis), 0);
  wait_ready(&d, 200, 30);
  wait_state(&d, running, "succeeded", 180);
  char *text = NULL;
  ck_assert_int_eq(count_events(&d, running, "done", &text), 1);
  /* the event that said why it was queued again, refused while Redis was away, was kept and
   * sent once it was back: the log tells the whole story */
  ck_assert_msg(strstr(text, "\"reason\":\"store_unavailable\""), "%s", text);
  free(text);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/15", running);
  size_t len;
  free(get_body(&d, path, &len));
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", before);
  free(get_body(&d, path, &len));
  submit_job(&d, SMALL_JOB, after, sizeof after);
  wait_state(&d, after, "succeeded", 60);
  daemon_stop(&d);
}
END_TEST

/* A job that ended while its claim could not be completed (Redis went away in between) comes
 * back into the queue when the claim runs out; the daemon that claims it again must see that
 * it has ended and leave it so: one done event, not a second run. Made here by hand: a claim
 * with a token nobody holds and a lease already run out, as Redis would keep it. */
START_TEST(ended_job_back_in_queue_is_not_rerun) {
  char st[512];
  daemon_proc d;
  const char *const lease[] = {"--lease-seconds", "2", NULL};
  const char *argv[8], **args = test_redis_args(&redis, "phantom", lease, argv, 8);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char ended[64], next[64];
  submit_job(&d, SMALL_JOB, ended, sizeof ended);
  wait_state(&d, ended, "succeeded", 60);
  redisContext *c = redisConnectUnix(redis.url);
  ck_assert(c && !c->err);
  for (double t0 = th_now();; usleep(20000)) { /* "succeeded" comes before the claim completes */
    redisReply *h = redisCommand(c, "HEXISTS phantom:tokens %s", ended);
    const int held = h && h->type == REDIS_REPLY_INTEGER && h->integer == 1;
    freeReplyObject(h);
    if (!held)
      break;
    ck_assert_msg(th_now() - t0 < 30, "the finished job's claim was not completed");
  }
  freeReplyObject(redisCommand(c, "HSET phantom:order %s 1", ended));
  freeReplyObject(redisCommand(c, "HSET phantom:tokens %s 999999", ended));
  freeReplyObject(redisCommand(c, "ZADD phantom:leases 0 %s", ended));
  redisFree(c);
  for (double t0 = th_now(); !log_has(&d, "back in the queue after it had ended"); usleep(50000))
    ck_assert_msg(th_now() - t0 < 30, "the ended job's claim was not taken again (%s)", d.log);
  char s[32];
  ck_assert_str_eq(state_of(&d, ended, s, sizeof s), "succeeded");
  ck_assert_int_eq(count_events(&d, ended, "done", NULL), 1);
  ck_assert_int_eq(count_events(&d, ended, "started", NULL), 1);
  submit_job(&d, SMALL_JOB, next, sizeof next); /* and the queue goes on */
  wait_state(&d, next, "succeeded", 60);
  daemon_stop(&d);
}
END_TEST

/* Redis restarted from its append-only file while two daemons work through a queue: no job
 * accepted (202) is lost, each ends once, every image is the same from both daemons; while
 * Redis is away submissions are refused with 503, not accepted and then lost. */
START_TEST(redis_restart_under_load_loses_nothing) {
  char st[2][512];
  daemon_proc d[2];
  const char *argv[16], **args = test_redis_args(&redis, "reload", ONE_WORKER, argv, 16);
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(daemon_start(&d[i], th_state_dir(st[i], sizeof st[i]), args), 0);
  enum { BEFORE = 24, AFTER = 8 };
  char ids[BEFORE + AFTER][64], body[256];
  for (int i = 0; i < BEFORE + AFTER; i++) {
    if (i == BEFORE) { /* mid-queue: Redis goes away and comes back */
      ck_assert_int_eq(test_redis_shutdown(&redis), 0);
      http_resp r;
      ck_assert_int_eq(http_post(&d[0], "/v1/jobs", SMALL_JOB, &r), 503);
      http_free(&r);
      ck_assert_int_eq(test_redis_launch(&redis), 0);
      wait_ready(&d[0], 200, 30);
      wait_ready(&d[1], 200, 30);
    }
    small_job(body, sizeof body, 300 + i);
    submit_job(&d[i % 2], body, ids[i], sizeof ids[i]);
  }
  for (int i = 0; i < BEFORE + AFTER; i++)
    wait_state(&d[(i + 1) % 2], ids[i], "succeeded", 180);
  for (int i = 0; i < BEFORE + AFTER; i++) {
    ck_assert_int_eq(count_events(&d[i % 2], ids[i], "done", NULL), 1);
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s/images/0", ids[i]);
    size_t la, lb;
    char *a = get_body(&d[0], path, &la), *b = get_body(&d[1], path, &lb);
    ck_assert(la == lb && memcmp(a, b, la) == 0);
    free(a);
    free(b);
  }
  daemon_stop(&d[0]);
  daemon_stop(&d[1]);
}
END_TEST

static void job_id_of(const http_resp *r, char *id, size_t n) {
  json_t *j = http_json(r);
  snprintf(id, n, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
}

/* An Idempotency-Key is shared by the daemons of a group: a client retrying on another daemon
 * (its first answer lost, or a 503 while Redis was away) gets the first job, not a second one;
 * the same key with another request is refused on any daemon; keys of different clients or
 * values are independent. */
START_TEST(idempotency_keys_across_daemons) {
  char st[2][512];
  daemon_proc d[2];
  const char *argv[8], **args = test_redis_args(&redis, "idem", NULL, argv, 8);
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(daemon_start(&d[i], th_state_dir(st[i], sizeof st[i]), args), 0);
  http_resp r;
  char first[64], again[64], other[64];
  ck_assert_int_eq(http_post_keyed(&d[0], "order-7", SMALL_JOB, &r), 202);
  job_id_of(&r, first, sizeof first);
  http_free(&r);
  ck_assert_int_eq(http_post_keyed(&d[1], "order-7", SMALL_JOB, &r), 200); /* the other daemon */
  job_id_of(&r, again, sizeof again);
  http_free(&r);
  ck_assert_str_eq(again, first);
  ck_assert_int_eq(http_post_keyed(&d[1], "order-7", LONG_JOB, &r), 422);
  ck_assert_ptr_nonnull(strstr(r.body, first));
  http_free(&r);
  ck_assert_int_eq(http_post_keyed(&d[1], "order-8", SMALL_JOB, &r), 202);
  job_id_of(&r, other, sizeof other);
  http_free(&r);
  ck_assert_str_ne(other, first);
  wait_state(&d[0], first, "succeeded", 60);
  ck_assert_int_eq(http_post_keyed(&d[1], "order-7", SMALL_JOB, &r), 200); /* finished: the same */
  job_id_of(&r, again, sizeof again);
  http_free(&r);
  ck_assert_str_eq(again, first);
  ck_assert_int_eq(count_events(&d[1], first, "done", NULL), 1);
  daemon_stop(&d[0]);
  daemon_stop(&d[1]);
}
END_TEST

/* A listing on any daemon of a group shows the group's jobs as they are: jobs another daemon
 * accepted and ran (this one may never have seen them, or seen them queued) are listed with
 * their final state. */
START_TEST(listings_show_the_whole_group) {
  char st[2][512], body[256];
  daemon_proc d[2];
  const char *argv[8], **args = test_redis_args(&redis, "list", NULL, argv, 8);
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(daemon_start(&d[i], th_state_dir(st[i], sizeof st[i]), args), 0);
  enum { N = 6 };
  char ids[N][64];
  for (int i = 0; i < N; i++) {
    small_job(body, sizeof body, 500 + i);
    submit_job(&d[0], body, ids[i], sizeof ids[i]);
  }
  for (int i = 0; i < N; i++)
    wait_state(&d[0], ids[i], "succeeded", 60);
  http_resp r;
  ck_assert_int_eq(http_get(&d[1], "/v1/jobs?state=succeeded&limit=100", &r), 200);
  for (int i = 0; i < N; i++)
    ck_assert_msg(strstr(r.body, ids[i]), "job %d missing from the other daemon's listing: %s", i,
                  r.body);
  http_free(&r);
  ck_assert_int_eq(http_get(&d[1], "/v1/jobs?limit=2", &r), 200); /* newest first, paged */
  ck_assert_ptr_nonnull(strstr(r.body, ids[N - 1]));
  ck_assert_ptr_null(strstr(r.body, ids[0]));
  http_free(&r);
  daemon_stop(&d[0]);
  daemon_stop(&d[1]);
}
END_TEST

/* How many of the keys of job id under prefix p (record, image 0, event log) Redis still has. */
static int job_keys_left(const char *p, const char *id) {
  redisContext *c = redisConnectUnix(redis.url);
  ck_assert(c && !c->err);
  redisReply *r = redisCommand(c, "EXISTS %s:job:%s %s:img:%s:0 %s:ev:%s", p, id, p, id, p, id);
  const int n = r && r->type == REDIS_REPLY_INTEGER ? (int)r->integer : -1;
  freeReplyObject(r);
  redisFree(c);
  return n;
}

/* A finished job whose daemons are all gone does not keep its results in Redis for good: the
 * keys expire by themselves somewhat after result_ttl. */
START_TEST(orphaned_results_expire_in_redis) {
  char st[512], id[64];
  daemon_proc d;
  const char *const ttl[] = {"--result-ttl", "4", NULL};
  const char *argv[8], **args = test_redis_args(&redis, "orphan", ttl, argv, 8);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  ck_assert_int_eq(daemon_signal_wait(&d, SIGKILL, 10), 128 + SIGKILL); /* nobody expires it */
  ck_assert_int_eq(job_keys_left("orphan", id), 3);
  for (double t0 = th_now(); job_keys_left("orphan", id) > 0; usleep(200000))
    ck_assert_msg(th_now() - t0 < 30, "the orphaned job's keys did not expire");
}
END_TEST

static long post_as(const daemon_proc *d, const char *key, const char *body, http_resp *r) {
  char h[200];
  snprintf(h, sizeof h, "Authorization: Bearer %s", key);
  const char *hdrs[] = {h, NULL};
  return http_req(d, "POST", "/v1/jobs", body, strlen(body), hdrs, r);
}

/* max_jobs_per_key holds for the group, not per daemon: a client cannot get N times its share
 * by spreading its jobs over N daemons, and jobs another daemon finished stop counting (this
 * daemon's copies of them may say queued). */
START_TEST(per_key_limits_hold_across_daemons) {
  char st[2][512], tmp[256], keys[300];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(keys, sizeof keys, "%s/keys", tmp);
  FILE *f = fopen(keys, "w");
  fprintf(f, "alice k-alice-0123456789abcdef01\nbob k-bob-0123456789abcdef0123\n");
  fclose(f);
  daemon_proc d[2];
  const char *const limits[] = {
      "--api-keys-file", keys, "--max-jobs-per-key", "2", "--workers", "1", NULL};
  const char *argv[16], **args = test_redis_args(&redis, "perkey", limits, argv, 16);
  for (int i = 0; i < 2; i++)
    ck_assert_int_eq(daemon_start(&d[i], th_state_dir(st[i], sizeof st[i]), args), 0);
  static const char long_job[] = "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 16, "
                                 "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}";
  http_resp r;
  char ids[2][64];
  for (int i = 0; i < 2; i++) {
    ck_assert_int_eq(post_as(&d[0], "k-alice-0123456789abcdef01", long_job, &r), 202);
    job_id_of(&r, ids[i], sizeof ids[i]);
    http_free(&r);
  }
  ck_assert_int_eq(post_as(&d[1], "k-alice-0123456789abcdef01", SMALL_JOB, &r), 429);
  ck_assert_ptr_nonnull(strstr(r.body, "too_many_jobs"));
  http_free(&r);
  ck_assert_int_eq(post_as(&d[1], "k-bob-0123456789abcdef0123", SMALL_JOB, &r), 202); /* alone */
  http_free(&r);
  const char *auth[] = {"Authorization: Bearer k-alice-0123456789abcdef01", NULL};
  for (int i = 0; i < 2; i++) {
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s", ids[i]);
    for (double t0 = th_now();; usleep(50000)) {
      ck_assert_int_eq(http_req(&d[0], "GET", path, NULL, 0, auth, &r), 200);
      const int done = strstr(r.body, "\"succeeded\"") != NULL;
      http_free(&r);
      if (done)
        break;
      ck_assert_msg(th_now() - t0 < 120, "alice's job %d did not finish", i);
    }
  }
  for (int i = 0; i < 2; i++) { /* finished: room again, on either daemon */
    ck_assert_int_eq(post_as(&d[i], "k-alice-0123456789abcdef01", SMALL_JOB, &r), 202);
    http_free(&r);
  }
  daemon_stop(&d[0]);
  daemon_stop(&d[1]);
}
END_TEST

static void stop_redis(void) {
  test_redis_stop(&redis);
}

/* A queued text-to-image job's prompts live in its Redis record: a daemon killed with SIGKILL
 * and started again with an empty state directory runs it with them. */
START_TEST(prompt_job_survives_on_redis) {
  char st[512], st2[512], path[128], m1[1100], m2[1100], p[1024];
  snprintf(m1, sizeof m1, "default=%s", test_src_path(p, sizeof p, "models/shapes-gmm"));
  snprintf(m2, sizeof m2, "sd=%s", test_src_path(p, sizeof p, "tests/fixtures/sd_pipeline/tiny"));
  const char *const models[] = {"--lease-seconds", "2", "--workers", "1", "--model", m1,
                                "--model",         m2,  NULL};
  const char *argv[16], **args = test_redis_args(&redis, "prompt", models, argv, 16);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char blocker[64], id[64];
  submit_job(&d, LONG_JOB, blocker, sizeof blocker);
  wait_running(&d, blocker, 60);
  submit_job(&d,
             "{\"model\": \"sd\", \"prompt\": \"a photo of a cat\", \"negative_prompt\": "
             "\"blurry\", \"clip_skip\": 2, \"seed\": 3, \"scheduler\": {\"name\": \"ddim\", "
             "\"steps\": 4}}",
             id, sizeof id);
  ck_assert_int_eq(daemon_signal_wait(&d, SIGKILL, 10), 128 + SIGKILL);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st2, sizeof st2), args), 0);
  snprintf(path, sizeof path, "/v1/jobs/%s", blocker);
  http_resp r;
  http_req(&d, "DELETE", path, NULL, 0, NULL, &r);
  http_free(&r);
  wait_state(&d, id, "succeeded", 120);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  size_t len;
  char *view = get_body(&d, path, &len);
  ck_assert_ptr_nonnull(strstr(view, "\"prompt\":\"a photo of a cat\""));
  ck_assert_ptr_nonnull(strstr(view, "\"negative_prompt\":\"blurry\""));
  ck_assert_ptr_nonnull(strstr(view, "\"clip_skip\":2"));
  free(view);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  char *png = get_body(&d, path, &len);
  char *info = NULL;
  err e = {0};
  ck_assert_int_eq(image_png_text_mem((uint8_t *)png, len, "parameters", 64, &info, &e), 0);
  ck_assert_msg(strncmp(info, "a photo of a cat\nNegative prompt: blurry\n", 40) == 0, "%s", info);
  free(info);
  free(png);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("redis");
  TCase *tc = tcase_create("redis");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, unreachable_redis_stops_the_start);
  if (!test_redis_installed()) {
    fprintf(stderr, "test_redis: SKIPPING the daemon on Redis: redis-server is not installed "
                    "(scripts/install-deps.sh --redis)\n");
  } else if (test_redis_start(&redis) == 0) {
    atexit(stop_redis);
    tcase_add_test(tc, kill9_on_redis_loses_nothing);
    tcase_add_test(tc, redis_password_and_refusals);
    tcase_add_test(tc, three_daemons_share_one_queue);
    tcase_add_test(tc, redis_lost_while_running);
    tcase_add_test(tc, ended_job_back_in_queue_is_not_rerun);
    tcase_add_test(tc, redis_restart_under_load_loses_nothing);
    tcase_add_test(tc, idempotency_keys_across_daemons);
    tcase_add_test(tc, listings_show_the_whole_group);
    tcase_add_test(tc, orphaned_results_expire_in_redis);
    tcase_add_test(tc, per_key_limits_hold_across_daemons);
    tcase_add_test(tc, prompt_job_survives_on_redis);
  } else {
    fprintf(stderr, "test_redis: redis-server is installed but did not start\n");
    exit(1);
  }
  suite_add_tcase(s, tc);
  return s;
}
