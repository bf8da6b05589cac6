/* The daemon's lifecycle: kill -9 loses nothing (finished results intact, queued jobs queued,
 * running jobs restart with the same seed and image), SIGTERM stops at a step boundary, SIGHUP
 * reloads models, results expire, disk trouble is a clear error, exit codes, config check. */
#include "base64.h"
#include "image.h"
#include "testhttp.h"

#define LONG_JOB                                                                                   \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                                          \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

START_TEST(kill9_loses_nothing) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--batch-max-images", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char done[64], running[64], queued[64], path[128];
  submit_job(&d, SMALL_JOB, done, sizeof done);
  wait_state(&d, done, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", done);
  size_t done_len;
  char *done_png = get_body(&d, path, &done_len);
  submit_job(&d, LONG_JOB, running, sizeof running);
  submit_job(&d, SMALL_JOB, queued, sizeof queued);
  wait_running(&d, running, 60);
  ck_assert_int_eq(daemon_signal_wait(&d, SIGKILL, 10), 128 + SIGKILL);
  /* restart on the same directory */
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  char state[32];
  job_state(&d, done, state, sizeof state, NULL);
  ck_assert_str_eq(state, "succeeded");
  size_t len;
  char *png = get_body(&d, path, &len);
  ck_assert(len == done_len && memcmp(png, done_png, len) == 0);
  free(png);
  free(done_png);
  job_state(&d, queued, state, sizeof state, NULL);
  ck_assert_msg(strcmp(state, "queued") == 0 || strcmp(state, "running") == 0 ||
                    strcmp(state, "succeeded") == 0,
                "queued job came back %s", state);
  wait_state(&d, running, "succeeded", 120);
  wait_state(&d, queued, "succeeded", 60);
  /* its event log survived with ids that only grow: the numbers the lost run used (progress
   * events are not persisted) are skipped, so a client resuming with an old id misses nothing */
  char epath[128];
  snprintf(epath, sizeof epath, "/v1/jobs/%s/events", running);
  size_t elen;
  char *events = get_body(&d, epath, &elen);
  long last = 0, skipped = 0;
  int n = 0, recovered = 0;
  for (const char *p = strstr(events, "id: "); p; p = strstr(p + 1, "\nid: ")) {
    long id = atol(p[0] == '\n' ? p + 5 : p + 4);
    ck_assert_int_gt(id, last);
    if (id - last > skipped)
      skipped = id - last;
    last = id;
    n++;
  }
  /* it was running when the process died (its record says so since the attempts count is
   * persisted before each run), so it comes back "restarted" */
  recovered = strstr(events, "\"reason\":\"restarted\"") != NULL;
  ck_assert_int_ge(n, 4);
  ck_assert(recovered);
  ck_assert_int_gt(skipped, 1000); /* 2 x steps + batch + 8 */
  free(events);
  /* the restarted job made the image the same request makes on a clean daemon */
  snprintf(path, sizeof path, "/v1/jobs/%s/images/7", running);
  char *restarted = get_body(&d, path, &len);
  daemon_stop(&d);
  char st2[512];
  daemon_proc d2;
  ck_assert_int_eq(daemon_start(&d2, th_state_dir(st2, sizeof st2), NULL), 0);
  char fresh[64];
  submit_job(&d2, LONG_JOB, fresh, sizeof fresh);
  wait_state(&d2, fresh, "succeeded", 120);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/7", fresh);
  size_t flen;
  char *again = get_body(&d2, path, &flen);
  uint8_t *a, *b;
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode((uint8_t *)restarted, len, 64, 64, &a, &h, &w, &e), 0);
  ck_assert_int_eq(image_png_decode((uint8_t *)again, flen, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(memcmp(a, b, 32 * 32 * 3) == 0, "restarted job made a different image");
  free(a);
  free(b);
  free(restarted);
  free(again);
  /* the events of the restarted job kept unique, increasing ids across the crash */
  daemon_stop(&d2);
}
END_TEST

/* A job whose run kills the process (the test-only fault hook aborts on its seed) runs again
 * after a restart, but only max_attempts times in all: then it fails with a clear error and the
 * daemon goes on with other work, instead of a crash loop from one request. */
START_TEST(crash_loop_is_broken) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  const char *env[] = {"DENOISED_FAULT_CRASH_SEED=4242", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  char poison[64];
  submit_job(&d,
             "{\"class_label\": 1, \"seed\": 4242, \"scheduler\": {\"name\": \"ddim\", "
             "\"steps\": 5}}",
             poison, sizeof poison);
  ck_assert_int_eq(daemon_wait_exit(&d, 30), 128 + SIGABRT);
  /* the second run: it may die before or after the daemon says it listens */
  int rc = daemon_start_env(&d, st, args, env);
  if (rc == 0)
    rc = daemon_wait_exit(&d, 30);
  ck_assert_int_eq(rc, 128 + SIGABRT);
  /* the third start: the job has had its two runs */
  ck_assert_int_eq(daemon_start_env(&d, st, args, env), 0);
  char state[32], path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", poison);
  size_t len;
  char *view = get_body(&d, path, &len);
  ck_assert_msg(strstr(view, "\"state\":\"failed\"") && strstr(view, "crashed the worker 2 times"),
                "%s", view);
  free(view);
  ck_assert_int_ge(daemon_log_count(&d, "crashed the worker 2 times"), 1);
  char ok[64];
  submit_job(&d, SMALL_JOB, ok, sizeof ok);
  wait_state(&d, ok, "succeeded", 60);
  daemon_stop(&d);
  /* and it stays failed */
  ck_assert_int_eq(daemon_start_env(&d, st, args, env), 0);
  job_state(&d, poison, state, sizeof state, NULL);
  ck_assert_str_eq(state, "failed");
  daemon_stop(&d);
}
END_TEST

/* A batch the worker pool refuses (the test-only hook refuses the first) does not leave its job
 * running for good: it fails naming the reason, durably, and the next job runs. */
START_TEST(pool_refusal_fails_jobs) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  const char *env[] = {"DENOISED_FAULT_POOL_REFUSES=1", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  char refused[64], ok[64], state[32], path[128];
  submit_job(&d, SMALL_JOB, refused, sizeof refused);
  wait_state(&d, refused, "failed", 30);
  snprintf(path, sizeof path, "/v1/jobs/%s", refused);
  size_t len;
  char *view = get_body(&d, path, &len);
  ck_assert_msg(strstr(view, "the worker pool refused the job"), "%s", view);
  free(view);
  submit_job(&d, SMALL_JOB, ok, sizeof ok);
  wait_state(&d, ok, "succeeded", 60);
  daemon_stop(&d);
  ck_assert_int_eq(daemon_start(&d, st, args), 0); /* and it stays failed */
  job_state(&d, refused, state, sizeof state, NULL);
  ck_assert_str_eq(state, "failed");
  daemon_stop(&d);
}
END_TEST

/* retained_budget_mb: once the finished jobs' estimated memory passes the budget, the oldest
 * expire before result_ttl (record and images gone, 404) and the newest stay; the metrics say
 * how much is retained and how many went early. */
START_TEST(retained_budget_expires_oldest) {
  char st[512], first[64], last[64], path[700];
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--retained-budget-mb", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  /* 16 images each: a record of a few KB, so about a hundred jobs pass 1 MB */
  const char *job = "{\"class_label\": 1, \"seed\": 9, \"batch_size\": 16, "
                    "\"scheduler\": {\"name\": \"ddim\", \"steps\": 4}}";
  submit_job(&d, job, first, sizeof first);
  wait_state(&d, first, "succeeded", 60);
  snprintf(path, sizeof path, "%s/images/%s-0.png", st, first);
  ck_assert_int_eq(access(path, F_OK), 0);
  http_resp r;
  int gone = 0;
  for (int k = 0; k < 400 && !gone; k++) {
    submit_job(&d, job, last, sizeof last);
    wait_state(&d, last, "succeeded", 60);
    snprintf(path, sizeof path, "/v1/jobs/%s", first);
    gone = http_get(&d, path, &r) == 404;
    http_free(&r);
  }
  ck_assert_msg(gone, "the first job was still kept after 400 more");
  snprintf(path, sizeof path, "%s/images/%s-0.png", st, first);
  ck_assert_int_ne(access(path, F_OK), 0); /* its images went with it */
  snprintf(path, sizeof path, "/v1/jobs/%s/images/15", last);
  ck_assert_int_eq(http_get(&d, path, &r), 200); /* the newest stay */
  http_free(&r);
  size_t len;
  char *m = get_body(&d, "/metrics", &len);
  const char *rb = strstr(m, "\ndenoised_retained_bytes "),
             *ee = strstr(m, "\ndenoised_expired_early_total ");
  ck_assert_msg(rb && ee, "%s", m);
  const long long retained = atoll(rb + strlen("\ndenoised_retained_bytes ")),
                  early = atoll(ee + strlen("\ndenoised_expired_early_total "));
  ck_assert_msg(retained > 512 * 1024 && retained <= 1024 * 1024, "retained %lld", retained);
  ck_assert_int_ge(early, 1);
  free(m);
  daemon_stop(&d);
}
END_TEST

/* No lost 202: a job that carries an earlier inversion's noise (edit.noise_from) holds it in
 * its record. Larger than max_job_bytes is a 413 naming the limit before any 202; the largest
 * accepted one survives kill -9 and runs after the restart. */
START_TEST(large_jobs_are_refused_or_recovered) {
  char st[512], path[256];
  daemon_proc d;
  const char *small[] = {"--max-job-bytes", "1048576", NULL};
  const char *large[] = {"--max-job-bytes", "2097152", "--workers", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), small), 0);
  char src[64], inv[64];
  submit_job(&d, SMALL_JOB, src, sizeof src);
  wait_state(&d, src, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", src);
  size_t len;
  char *png = get_body(&d, path, &len);
  char *img = base64_encode((uint8_t *)png, len);
  free(png);
  size_t cap = strlen(img) + 512;
  char *body = malloc(cap);
  /* 100 steps: 101 maps of the 32x32 RGB image, ~1.2 MB of floats, ~1.65 MB in base64 */
  snprintf(body, cap,
           "{\"class_label\": 2, \"seed\": 5, \"scheduler\": {\"name\": \"ddim\", \"steps\": "
           "100}, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\"}}",
           img);
  submit_job(&d, body, inv, sizeof inv);
  wait_state(&d, inv, "succeeded", 120);
  char *use = malloc(512);
  snprintf(use, 512,
           "{\"class_label\": 4, \"scheduler\": {\"name\": \"ddim\", \"steps\": 100}, "
           "\"edit\": {\"type\": \"invert_ddpm\", \"noise_from\": \"%s\", \"skip\": 3}}",
           inv);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", use, &r), 413);
  ck_assert_msg(strstr(r.body, "max_job_bytes") && strstr(r.body, "job_too_large"), "%s", r.body);
  http_free(&r);
  daemon_stop(&d);
  /* with room for it: accepted, killed at once, recovered after the restart */
  ck_assert_int_eq(daemon_start(&d, st, large), 0);
  char big[64];
  submit_job(&d, use, big, sizeof big);
  ck_assert_int_eq(daemon_signal_wait(&d, SIGKILL, 10), 128 + SIGKILL);
  ck_assert_int_eq(daemon_start(&d, st, large), 0);
  wait_state(&d, big, "succeeded", 120);
  daemon_stop(&d);
  free(use);
  free(body);
  free(img);
}
END_TEST

/* A queued guided inpainting job (its images travel in the stored spec) survives kill -9 and
 * makes the image the same request makes on a clean daemon. */
START_TEST(kill9_keeps_edit_jobs) {
  uint8_t px[32 * 32 * 3], *png;
  size_t plen;
  err e;
  for (size_t i = 0; i < sizeof px; i++)
    px[i] = (uint8_t)((i / 3) % 32 < 16 ? 255 : (i * 7) % 200);
  ck_assert_int_eq(image_png_encode(px, 3, 32, 32, NULL, 0, &png, &plen, &e), 0);
  char *b64 = base64_encode(png, plen);
  free(png);
  char *body = malloc(strlen(b64) * 2 + 512);
  sprintf(body,
          "{\"class_label\": 4, \"seed\": 6, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, "
          "\"guidance\": {\"scale\": 2}, \"input_image\": \"%s\", \"mask\": \"%s\", "
          "\"edit\": {\"type\": \"inpaint\", \"strength\": 0.9}}",
          b64, b64);
  char st[512], edit[64], path[128];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  queued_job_survives_kill9(&d, th_state_dir(st, sizeof st), args, LONG_JOB, body, edit,
                            sizeof edit);
  snprintf(path, sizeof path, "/v1/jobs/%s", edit);
  size_t len;
  char *view = get_body(&d, path, &len);
  ck_assert_ptr_nonnull(strstr(view, "\"type\":\"inpaint\""));
  ck_assert_ptr_nonnull(strstr(view, "\"guidance\":{"));
  free(view);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", edit);
  char *img = get_body(&d, path, &len);
  daemon_stop(&d);
  char st2[512];
  daemon_proc d2;
  ck_assert_int_eq(daemon_start(&d2, th_state_dir(st2, sizeof st2), NULL), 0);
  char fresh[64];
  submit_job(&d2, body, fresh, sizeof fresh);
  wait_state(&d2, fresh, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", fresh);
  size_t flen;
  char *again = get_body(&d2, path, &flen);
  daemon_stop(&d2);
  uint8_t *a, *b;
  int h, w;
  ck_assert_int_eq(image_png_decode((uint8_t *)img, len, 64, 64, &a, &h, &w, &e), 0);
  ck_assert_int_eq(image_png_decode((uint8_t *)again, flen, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(memcmp(a, b, 32 * 32 * 3) == 0, "the recovered edit job made a different image");
  free(a);
  free(b);
  free(img);
  free(again);
  free(body);
  free(b64);
}
END_TEST

START_TEST(sigterm_stops_at_step_boundary) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64];
  submit_job(&d, LONG_JOB, id, sizeof id);
  wait_running(&d, id, 60);
  double t0 = th_now();
  ck_assert_int_eq(daemon_signal_wait(&d, SIGTERM, 30), 0);
  ck_assert_double_lt(th_now() - t0, 10);
  ck_assert_int_eq(daemon_log_count(&d, "msg=stopped"), 1);
  /* the interrupted job is queued on disk and runs after the restart */
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  wait_state(&d, id, "succeeded", 120);
  daemon_stop(&d);
  ck_assert_int_eq(daemon_log_count(&d, "queued again"), 1);
}
END_TEST

START_TEST(sighup_reloads_models) {
  char st[512], tmp[256], cfg[300], model[1024], other[1024];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "models/shapes-gmm");
  test_src_path(other, sizeof other, "tests/fixtures/gmm/cond4");
  snprintf(cfg, sizeof cfg, "%s/denoised.json", tmp);
  FILE *f = fopen(cfg, "w");
  fprintf(f, "{\"models\": {\"default\": \"%s\"}, \"log_level\": \"debug\"}", model);
  fclose(f);
  daemon_proc d;
  const char *args[] = {"--config", cfg, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  http_get(&d, "/v1/models", &r);
  ck_assert_ptr_null(strstr(r.body, "\"small\""));
  http_free(&r);
  f = fopen(cfg, "w");
  fprintf(f, "{\"models\": {\"default\": \"%s\", \"small\": \"%s\"}}", model, other);
  fclose(f);
  kill(d.pid, SIGHUP);
  int seen = 0;
  for (double t0 = th_now(); th_now() - t0 < 10 && !seen; usleep(20000)) {
    http_get(&d, "/v1/models", &r);
    seen = strstr(r.body, "\"small\"") != NULL;
    http_free(&r);
  }
  ck_assert(seen);
  char id[64];
  submit_job(&d, "{\"model\": \"small\", \"class_label\": 1, \"scheduler\": {\"steps\": 5}}", id,
             sizeof id);
  wait_state(&d, id, "succeeded", 60);
  /* a broken config on reload keeps the old one */
  f = fopen(cfg, "w");
  fprintf(f, "{\"models\": {\"default\": \"/nonexistent\"}}");
  fclose(f);
  kill(d.pid, SIGHUP);
  for (double t0 = th_now(); th_now() - t0 < 10 && !daemon_log_count(&d, "model list not changed");)
    usleep(20000);
  ck_assert_int_eq(daemon_log_count(&d, "model list not changed"), 1);
  http_get(&d, "/v1/models", &r);
  ck_assert_ptr_nonnull(strstr(r.body, "\"small\""));
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* Log rotation: the file is moved away, SIGHUP makes the daemon write a new one. */
START_TEST(sighup_reopens_the_log) {
  char st[512], tmp[256], logf[300], moved[320];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(logf, sizeof logf, "%s/denoised.log", tmp);
  snprintf(moved, sizeof moved, "%s/denoised.log.1", tmp);
  daemon_proc d;
  const char *args[] = {"--log-file", logf, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  ck_assert_int_eq(rename(logf, moved), 0);
  kill(d.pid, SIGHUP);
  for (double t0 = th_now(); th_now() - t0 < 10 && access(logf, F_OK) != 0;)
    usleep(20000);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/models", &r), 200);
  http_free(&r);
  daemon_stop(&d);
  snprintf(d.log, sizeof d.log, "%s", logf);
  ck_assert_int_eq(daemon_log_count(&d, "msg=listening"), 0);
  ck_assert_int_eq(daemon_log_count(&d, "path=/v1/models"), 1);
  ck_assert_int_eq(daemon_log_count(&d, "msg=stopped"), 1);
  snprintf(d.log, sizeof d.log, "%s", moved);
  ck_assert_int_eq(daemon_log_count(&d, "msg=listening"), 1);
}
END_TEST

START_TEST(results_expire) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--result-ttl", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64], path[128], file[1024];
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  snprintf(file, sizeof file, "%s/images/%s-0.png", st, id);
  ck_assert_int_eq(access(file, F_OK), 0);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  int gone = 0;
  for (double t0 = th_now(); th_now() - t0 < 10 && !gone; usleep(100000)) {
    http_resp r;
    gone = http_get(&d, path, &r) == 404;
    http_free(&r);
  }
  ck_assert(gone);
  ck_assert_int_ne(access(file, F_OK), 0);
  snprintf(file, sizeof file, "%s/jobs/%s.json", st, id);
  ck_assert_int_ne(access(file, F_OK), 0);
  daemon_stop(&d);
}
END_TEST

START_TEST(disk_errors_are_clear) {
  char tmp[256], st[512], cmd[1200];
  test_tmpdir(tmp, sizeof tmp);
  /* a state directory that cannot be created: exit 4 with the reason */
  snprintf(st, sizeof st, "%s/file", tmp);
  FILE *f = fopen(st, "w");
  fclose(f);
  snprintf(st, sizeof st, "%s/file/state", tmp);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, st, NULL), 4);
  ck_assert_int_eq(daemon_log_count(&d, "state directory unusable"), 1);
  ck_assert_int_eq(daemon_log_count(&d, "Not a directory"), 1);
  /* two daemons on one directory: the second refuses */
  snprintf(st, sizeof st, "%s/state", tmp);
  ck_assert_int_eq(daemon_start(&d, st, NULL), 0);
  daemon_proc d2;
  char st2log[600];
  ck_assert_int_eq(daemon_start(&d2, st, NULL), 4);
  snprintf(st2log, sizeof st2log, "%s", d2.log);
  ck_assert_int_eq(daemon_log_count(&d2, "in use by another denoised"), 1);
  /* the directory disappears under a running daemon: submissions fail clearly, not silently,
   * and the daemon keeps serving */
  snprintf(cmd, sizeof cmd, "rm -rf %s/jobs", st);
  ck_assert_int_eq(system(cmd), 0);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", SMALL_JOB, &r), 500);
  ck_assert_ptr_nonnull(strstr(r.body, "storage_error"));
  ck_assert_ptr_nonnull(strstr(r.body, "jobs"));
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/v1/jobs", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"jobs\":[]")); /* nothing half-accepted */
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

static int run_cmd(char *out, size_t n, const char *fmt, ...);

static void expect_job_id(const http_resp *r, const char *id) {
  json_t *j = http_json(r);
  ck_assert_str_eq(json_string_value(json_object_get(j, "id")), id);
  json_decref(j);
}

/* Idempotency-Key: a retried POST returns the first job (200, same id), a different body under
 * the same key is a 422, malformed keys are 400; and a client whose connection died after the
 * record was written but before the 202 (the daemon killed there by a test-only hook) gets the
 * job it did submit when it retries after the restart: one job, not two. */
START_TEST(idempotent_submission) {
  char st[512], id[64];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  ck_assert_int_eq(http_post_keyed(&d, "order-1", SMALL_JOB, &r), 202);
  json_t *j = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  ck_assert_int_eq(http_post_keyed(&d, "order-1", SMALL_JOB, &r), 200);
  expect_job_id(&r, id);
  http_free(&r);
  ck_assert_int_eq(http_post_keyed(&d, "order-1", LONG_JOB, &r), 422);
  ck_assert_ptr_nonnull(strstr(r.body, "\"field\":\"Idempotency-Key\""));
  ck_assert_ptr_nonnull(strstr(r.body, id));
  http_free(&r);
  char long_key[300];
  memset(long_key, 'k', sizeof long_key - 1);
  long_key[sizeof long_key - 1] = 0;
  ck_assert_int_eq(http_post_keyed(&d, long_key, SMALL_JOB, &r), 400);
  ck_assert_ptr_nonnull(strstr(r.body, "Idempotency-Key"));
  http_free(&r);
  ck_assert_int_eq(http_post_keyed(&d, "caf\xc3\xa9", SMALL_JOB, &r), 400);
  http_free(&r);
  wait_state(&d, id, "succeeded", 60);
  ck_assert_int_eq(http_post_keyed(&d, "order-1", SMALL_JOB, &r),
                   200); /* finished: still the same */
  expect_job_id(&r, id);
  http_free(&r);
  daemon_stop(&d);

  /* killed between the record and the 202 */
  const char *env[] = {"DENOISED_FAULT_KILL_AFTER_RECORD=1", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  ck_assert_int_le(http_post_keyed(&d, "order-2", SMALL_JOB, &r), 0); /* no answer */
  http_free(&r);
  ck_assert_int_eq(daemon_wait_exit(&d, 30), 128 + SIGKILL);
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  ck_assert_int_eq(http_post_keyed(&d, "order-2", SMALL_JOB, &r), 200);
  j = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/v1/jobs", &r), 200);
  j = http_json(&r);
  ck_assert_int_eq(json_array_size(json_object_get(j, "jobs")), 1);
  json_decref(j);
  http_free(&r);
  wait_state(&d, id, "succeeded", 60);
  daemon_stop(&d);
}
END_TEST

/* Polls a job until it is finished or its final state waits on the store (store_error); returns
 * the job's JSON. */
static json_t *wait_settled(const daemon_proc *d, const char *id, double timeout_s) {
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  for (double t0 = th_now(); th_now() - t0 < timeout_s; usleep(20000)) {
    http_resp r;
    ck_assert_int_eq(http_get(d, path, &r), 200);
    json_t *j = http_json(&r);
    http_free(&r);
    const char *st = json_string_value(json_object_get(j, "state"));
    if (json_object_get(j, "store_error") || strcmp(st, "succeeded") == 0 ||
        strcmp(st, "failed") == 0 || strcmp(st, "cancelled") == 0)
      return j;
    json_decref(j);
  }
  ck_abort_msg("job %s neither finished nor waited on the store in %.0f s", id, timeout_s);
  return NULL;
}

/* Says whether a job's JSON tells the disk-full reason: a failure, or a final state waiting on
 * the store. */
static int tells_disk_full(const json_t *j) {
  const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
  const char *store = json_string_value(json_object_get(j, "store_error"));
  return (msg && strstr(msg, "No space left on device")) ||
         (store && strstr(store, "No space left on device"));
}

/* A disk that fills up, without root: the store's test-only fault hook makes every write from
 * the 15th on fail with ENOSPC (2 at start, then 8 per one-image job: record, attempts, image,
 * final record), i.e. while the second job writes its image. That job fails, but its final
 * state cannot be stored either: it shows its running state with store_error, never "failed"
 * (a restart would run it again). Submissions get 507, /readyz says the storage fails, /healthz
 * answers. After a restart with space the job runs again and succeeds; the first job's result
 * is intact. */
START_TEST(disk_fills_up_without_root) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  const char *env[] = {"DENOISED_FAULT_STORE=write:15:sticky:ENOSPC", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  char first[64], second[64], path[128];
  submit_job(&d, SMALL_JOB, first, sizeof first);
  wait_state(&d, first, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", first);
  size_t first_len;
  char *first_png = get_body(&d, path, &first_len);
  submit_job(&d, SMALL_JOB, second, sizeof second);
  json_t *j = wait_settled(&d, second, 60);
  ck_assert_msg(json_object_get(j, "store_error") && tells_disk_full(j),
                "the second job should wait on the full disk: %s",
                json_string_value(json_object_get(j, "state")));
  ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "running");
  json_decref(j);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", SMALL_JOB, &r), 507);
  ck_assert_ptr_nonnull(strstr(r.body, "No space left on device"));
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/readyz", &r), 503);
  ck_assert_ptr_nonnull(strstr(r.body, "storage failing"));
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  ck_assert_int_ge(daemon_log_count(&d, "storing the final state failed"), 1);
  daemon_signal_wait(&d, SIGTERM, 30);
  /* space again: the job nobody saw finish runs again; the finished one is as it was */
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  wait_state(&d, second, "succeeded", 60);
  size_t len;
  char *png = get_body(&d, path, &len);
  ck_assert(len == first_len && memcmp(png, first_png, len) == 0);
  free(png);
  free(first_png);
  ck_assert_int_eq(http_get(&d, "/readyz", &r), 200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* A full disk, for real: a 160 KiB tmpfs as the state directory (needs root, as CI has; other
 * machines skip; disk_fills_up_without_root covers the same without root). Images that do not
 * fit fail their job with the reason (or, when the failure cannot be stored either, leave it
 * waiting with store_error); a job record that does not fit is refused with 507, so no job is
 * ever accepted and then lost; /readyz says the storage fails. */
START_TEST(full_disk_is_clear) {
  char tmp[256], mnt[512], cmd[1200], out[4096];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(mnt, sizeof mnt, "%s/small", tmp);
  mkdir(mnt, 0755);
  if (run_cmd(out, sizeof out, "mount -t tmpfs -o size=160k tmpfs %s", mnt) != 0) {
    fprintf(stderr, "test_durability: cannot mount a tmpfs (not root?): full disk not tested\n");
    return;
  }
  char st[600];
  snprintf(st, sizeof st, "%s/state", mnt);
  daemon_proc d;
  const char *args[] = {"--max-batch", "16", NULL};
  int started = daemon_start(&d, st, args) == 0, job_failed = 0, refused = 0;
  for (int i = 0; started && i < 400 && !refused; i++) {
    http_resp r;
    long status =
        http_post(&d, "/v1/jobs",
                  "{\"class_label\": 1, \"batch_size\": 16, \"scheduler\": {\"steps\": 2}}", &r);
    if (status == 507) {
      refused = strstr(r.body, "No space left on device") != NULL &&
                strstr(r.body, "storage_error") != NULL;
    } else if (status == 202) {
      json_t *j = http_json(&r);
      char id[64];
      snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
      json_decref(j);
      json_t *settled = wait_settled(&d, id, 60);
      job_failed |= tells_disk_full(settled);
      json_decref(settled);
    }
    http_free(&r);
  }
  http_resp r;
  int healthy = started && http_get(&d, "/healthz", &r) == 200;
  if (started)
    http_free(&r);
  int unready = started && http_get(&d, "/readyz", &r) == 503;
  if (started)
    http_free(&r);
  if (started)
    daemon_signal_wait(&d, SIGTERM, 30);
  snprintf(cmd, sizeof cmd, "umount %s", mnt);
  ck_assert_int_eq(system(cmd), 0);
  ck_assert(started);
  ck_assert_msg(job_failed, "no job failed with the disk-full reason; see %s", d.log);
  ck_assert_msg(refused, "no submission was refused with 507; see %s", d.log);
  ck_assert(healthy);
  ck_assert_msg(unready, "/readyz said ready on a full disk");
}
END_TEST

static int run_cmd(char *out, size_t n, const char *fmt, ...) {
  char line[4096], cmd[4400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  snprintf(cmd, sizeof cmd, "%s 2>&1", line);
  FILE *p = popen(cmd, "r");
  size_t k = fread(out, 1, n - 1, p);
  out[k] = 0;
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

START_TEST(startup_errors_and_config_check) {
  char out[16384], cfg[1024], root[1024], tmp[256], path[512];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(root, sizeof root, ".");
  /* the example config is valid, and env overrides show in the effective config */
  test_src_path(cfg, sizeof cfg, "config/denoised.json");
  ck_assert_msg(run_cmd(out, sizeof out, "cd %s && DENOISED_WORKERS=1 %s config check %s", root,
                        test_bin(), cfg) == 0,
                "%s", out);
  json_t *j = json_loads(out, 0, NULL);
  ck_assert_ptr_nonnull(j);
  ck_assert_int_eq(json_integer_value(json_object_get(j, "workers")), 1);
  ck_assert_ptr_null(json_object_get(j, "api_keys"));
  json_decref(j);
  struct {
    const char *text, *needle;
  } bad[] = {
      {"{\"workers\": \"two\"}", "key 'workers': expected an integer"},
      {"{\"workers\": -1}", "key 'workers': -1 is out of range"},
      {"{\"wrokers\": 2}", "unknown key 'wrokers'"},
      {"{\"models\": {\"../x\": \"/tmp\"}}", "name '../x'"},
      {"{\"listen\": \"nohost\"}", "listen"},
      {"{\"workers\": 4, \"threads_per_job\": 4, \"cpu_budget\": 8}", "threads_per_job"},
      {"{\"cors_origins\": [\"app.example\"]}", "cors_origins"},
      {"{\"log_level\": \"loud\"}", "log_level"},
      {"{\"api_keys\": [\"k\"]}", "api_keys_file"},
      {"{\"models\": {\"default\": \"/nonexistent\"}}", "is not a directory"},
      {"{\"workers\": 1,}", "invalid JSON"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    snprintf(path, sizeof path, "%s/bad%zu.json", tmp, i);
    FILE *f = fopen(path, "w");
    fputs(bad[i].text, f);
    fclose(f);
    ck_assert_int_eq(run_cmd(out, sizeof out, "%s config check %s", test_bin(), path), 2);
    ck_assert_msg(strstr(out, bad[i].needle) != NULL, "%s: %s", bad[i].text, out);
  }
  ck_assert_int_eq(run_cmd(out, sizeof out, "%s config keys", test_bin()), 0);
  ck_assert_ptr_nonnull(strstr(out, "max_jobs_per_key"));
  ck_assert_int_eq(run_cmd(out, sizeof out, "%s config", test_bin()), 2);
  ck_assert_int_eq(run_cmd(out, sizeof out, "%s serve --help", test_bin()), 0);
  ck_assert_ptr_nonnull(strstr(out, "Exit codes"));
  /* serve: bad flags (2), a model that does not load (5), a port in use (3) */
  ck_assert_int_eq(run_cmd(out, sizeof out, "%s serve --workers abc", test_bin()), 2);
  ck_assert_ptr_nonnull(strstr(out, "workers"));
  ck_assert_int_eq(run_cmd(out, sizeof out, "%s serve --frobnicate 1", test_bin()), 2);
  char st[512];
  daemon_proc d;
  const char *badmodel[] = {"--model", "default=/nonexistent", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), badmodel), 5);
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  char listen[64];
  snprintf(listen, sizeof listen, "127.0.0.1:%d", d.port);
  snprintf(path, sizeof path, "%s/state2", tmp);
  ck_assert_int_eq(run_cmd(out, sizeof out,
                           "%s serve --listen %s --state-dir %s --model default=%s", test_bin(),
                           listen, path, cfg),
                   5); /* the model fails before the port is tried */
  char model[1024];
  test_src_path(model, sizeof model, "models/shapes-gmm");
  ck_assert_int_eq(run_cmd(out, sizeof out,
                           "%s serve --listen %s --state-dir %s --model default=%s", test_bin(),
                           listen, path, model),
                   3);
  ck_assert_ptr_nonnull(strstr(out, "Address already in use"));
  daemon_stop(&d);
}
END_TEST

/* The systemd unit passes systemd-analyze verify (with ExecStart pointing at the binary under
 * test, since /usr/local/bin/denoised is not installed here); skipped where systemd is absent.
 * The Dockerfile cannot be built here (no Docker engine): only its essentials are checked. */
START_TEST(deploy_files) {
  char unit[1024], tmp[256], copy[512], out[8192], line[2048];
  test_src_path(unit, sizeof unit, "deploy/denoised.service");
  if (system("command -v systemd-analyze >/dev/null 2>&1") == 0) {
    test_tmpdir(tmp, sizeof tmp);
    snprintf(copy, sizeof copy, "%s/denoised.service", tmp);
    FILE *in = fopen(unit, "r"), *o = fopen(copy, "w");
    ck_assert(in && o);
    while (fgets(line, sizeof line, in)) {
      char *p = strstr(line, "/usr/local/bin/denoised");
      if (p)
        fprintf(o, "%.*s%s%s", (int)(p - line), line, test_bin(),
                p + strlen("/usr/local/bin/denoised"));
      else
        fputs(line, o);
    }
    fclose(in);
    fclose(o);
    ck_assert_msg(run_cmd(out, sizeof out, "systemd-analyze verify %s", copy) == 0, "%s", out);
  } else {
    fprintf(stderr, "test_durability: systemd-analyze not installed: unit not verified\n");
  }
  char docker[1024];
  test_src_path(docker, sizeof docker, "deploy/Dockerfile");
  FILE *f = fopen(docker, "r");
  ck_assert_ptr_nonnull(f);
  int user = 0, health = 0, volume = 0, stages = 0;
  while (fgets(line, sizeof line, f)) {
    user |= strncmp(line, "USER denoised", 13) == 0;
    health |= strncmp(line, "HEALTHCHECK", 11) == 0;
    volume |= strncmp(line, "VOLUME", 6) == 0;
    stages += strncmp(line, "FROM debian:12", 14) == 0;
  }
  fclose(f);
  ck_assert(user && health && volume && stages == 2);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("durability");
  TCase *tc = tcase_create("durability");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, kill9_loses_nothing);
  tcase_add_test(tc, kill9_keeps_edit_jobs);
  tcase_add_test(tc, crash_loop_is_broken);
  tcase_add_test(tc, large_jobs_are_refused_or_recovered);
  tcase_add_test(tc, sigterm_stops_at_step_boundary);
  tcase_add_test(tc, sighup_reloads_models);
  tcase_add_test(tc, sighup_reopens_the_log);
  tcase_add_test(tc, results_expire);
  tcase_add_test(tc, disk_errors_are_clear);
  tcase_add_test(tc, full_disk_is_clear);
  tcase_add_test(tc, disk_fills_up_without_root);
  tcase_add_test(tc, idempotent_submission);
  tcase_add_test(tc, pool_refusal_fails_jobs);
  tcase_add_test(tc, retained_budget_expires_oldest);
  tcase_add_test(tc, startup_errors_and_config_check);
  tcase_add_test(tc, deploy_files);
  suite_add_tcase(s, tc);
  return s;
}
