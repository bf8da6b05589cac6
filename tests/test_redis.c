/* The daemon on Redis (redis_url): the queue, event logs, job records and images live in a
 * scratch redis-server (testredis.h), so a daemon killed with SIGKILL and started again, even
 * with an empty state directory, finds every finished image and runs the job it was running
 * again once that job's claim has run out; a Redis that cannot be reached, or that refuses the
 * password, or whose prefix another live daemon holds, stops the start with a clear error and
 * exit code 4. Skipped, saying so, where
 * redis-server is not installed. */
#include "testhttp.h"
#include "testredis.h"

#define LONG_JOB                                                                                   \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                                          \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

static test_redis redis;

static char *get_body(const daemon_proc *d, const char *path, size_t *len) {
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  *len = r.len;
  return r.body;
}

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
  const char *args[] = {"--redis-url",
                        redis.url,
                        "--redis-prefix",
                        "kill9",
                        "--lease-seconds",
                        "2",
                        "--workers",
                        "1",
                        "--batch-max-images",
                        "1",
                        NULL};
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

/* Until the queue reads jobs other daemons accepted, a prefix serves one live daemon: a second
 * is refused at start, and free again as soon as the first is gone (even killed). */
START_TEST(one_daemon_per_prefix) {
  char st[512], st2[512];
  daemon_proc a, b;
  const char *args[] = {"--redis-url", redis.url, "--redis-prefix", "solo", NULL};
  ck_assert_int_eq(daemon_start(&a, th_state_dir(st, sizeof st), args), 0);
  ck_assert_int_eq(daemon_start(&b, th_state_dir(st2, sizeof st2), args), 4);
  ck_assert(log_has(&b, "redis_prefix 'solo' is in use by another daemon"));
  const char *other[] = {"--redis-url", redis.url, "--redis-prefix", "solo2", NULL};
  ck_assert_int_eq(daemon_start(&b, st2, other), 0); /* another prefix is another queue */
  daemon_stop(&b);
  ck_assert_int_eq(daemon_signal_wait(&a, SIGKILL, 10), 128 + SIGKILL);
  ck_assert_int_eq(daemon_start(&b, st2, args), 0);
  daemon_stop(&b);
}
END_TEST

static void stop_redis(void) {
  test_redis_stop(&redis);
}

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
    tcase_add_test(tc, one_daemon_per_prefix);
  } else {
    fprintf(stderr, "test_redis: redis-server is installed but did not start\n");
    exit(1);
  }
  suite_add_tcase(s, tc);
  return s;
}
