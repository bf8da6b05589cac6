/* DeepPeep-aware serving (issue 13.7) end to end over HTTP: what a client can read about a
 * model's timing and internals. Times are whole seconds; internals need the admin scope;
 * constant-time mode gives every seed the same event sequence; batching never lets another
 * tenant's input change a job's run. */
#include "boundary.h"
#include "config.h"
#include "testhttp.h"

/* ---- event streams ---- */

/* The data objects of a stream's events, in order (new references in ev). */
static int parse_events(const char *text, json_t **ev, int max) {
  int n = 0;
  for (const char *l = text; l && *l && n < max;) {
    const char *nl = strchr(l, '\n');
    if (strncmp(l, "data: ", 6) == 0) {
      ev[n] = json_loadb(l + 6, (size_t)((nl ? nl : l + strlen(l)) - l - 6), 0, NULL);
      ck_assert_msg(ev[n] != NULL, "event data is not JSON: %.200s", l);
      n++;
    }
    l = nl ? nl + 1 : NULL;
  }
  return n;
}

static void free_events(json_t **ev, int n) {
  for (int i = 0; i < n; i++)
    json_decref(ev[i]);
}

/* An integer-valued JSON number (json_integer, or a real with no fraction would not do: the
 * contract says integer). */
static void assert_whole(const json_t *v, const char *what) {
  ck_assert_msg(json_is_integer(v), "%s is not a whole number of seconds", what);
  ck_assert_int_ge(json_integer_value(v), 0);
}

/* "2026-12-04T17:47:12Z": no fraction of a second. */
static void assert_whole_stamp(const json_t *v, const char *what) {
  const char *s = json_string_value(v);
  ck_assert_msg(s != NULL, "%s is not a string", what);
  ck_assert_msg(strlen(s) == 20 && s[19] == 'Z' && !strchr(s, '.'), "%s: '%s'", what, s);
}

#define SLOW_JOB                                                                                   \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                                          \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"

/* Every time a client reads is whole seconds: events (time, elapsed, eta), the job's
 * timestamps and timings, the A1111 progress. Without quantization elapsed carries
 * milliseconds (0.012 after a step) and the stamps end in .NNNZ. */
START_TEST(client_times_are_whole_seconds) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--progress-interval-ms", "0", "--workers", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64], path[256];
  submit_job(&d, SLOW_JOB, id, sizeof id);
  wait_running(&d, id, 30);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/progress", &r), 200);
  json_t *j = http_json(&r);
  const json_t *eta = json_object_get(j, "eta_relative");
  ck_assert_msg(json_is_number(eta) && json_number_value(eta) == floor(json_number_value(eta)),
                "eta_relative %s", r.body);
  json_decref(j);
  http_free(&r);
  wait_state(&d, id, "succeeded", 120);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  j = http_json(&r);
  assert_whole_stamp(json_object_get(j, "created_at"), "created_at");
  assert_whole_stamp(json_object_get(j, "started_at"), "started_at");
  assert_whole_stamp(json_object_get(j, "finished_at"), "finished_at");
  const json_t *t = json_object_get(j, "timings");
  assert_whole(json_object_get(t, "queued_seconds"), "queued_seconds");
  assert_whole(json_object_get(t, "run_seconds"), "run_seconds");
  assert_whole(json_object_get(t, "total_seconds"), "total_seconds");
  json_decref(j);
  http_free(&r);
  sse_log log;
  test_sse_read(&d, id, NULL, 0, &log);
  static json_t *ev[2048];
  int n = parse_events(log.text, ev, 2048), progress = 0;
  ck_assert_int_ge(n, 4);
  for (int i = 0; i < n; i++) {
    assert_whole(json_object_get(ev[i], "time"), "time");
    if (strcmp(json_string_value(json_object_get(ev[i], "type")), "progress") != 0)
      continue;
    progress++;
    assert_whole(json_object_get(ev[i], "elapsed"), "elapsed");
    assert_whole(json_object_get(ev[i], "eta"), "eta");
  }
  ck_assert_int_ge(progress, 1);
  free_events(ev, n);
  free(log.text);
  daemon_stop(&d);
}
END_TEST

/* ---- internals ---- */

#define OPS_KEY "ops-key-0123456789abcdef01"
#define ROOT_KEY "root-key-0123456789abcdef01"

/* GET path as key (NULL: none); the body (malloc'ed), failing unless 200. */
static char *get_as(const daemon_proc *d, const char *path, const char *key) {
  char auth[128];
  snprintf(auth, sizeof auth, "Authorization: Bearer %s", key ? key : "");
  const char *hdrs[] = {auth, NULL};
  http_resp r;
  http_req(d, "GET", path, NULL, 0, key ? hdrs : NULL, &r);
  ck_assert_msg(r.status == 200, "GET %s: %ld %s", path, r.status, r.body ? r.body : "");
  char *body = strdup(r.body);
  http_free(&r);
  return body;
}

/* What /v1/models and /metrics show as `key`: internals (the model's class, prediction type
 * and parameter count; the timing histograms) or only what a request needs. */
static void expect_internals(const daemon_proc *d, const char *key, int want) {
  char *body = get_as(d, "/v1/models", key);
  json_t *j = json_loads(body, 0, NULL);
  const json_t *m = json_array_get(json_object_get(j, "models"), 0);
  ck_assert_int_eq(json_integer_value(json_object_get(m, "num_classes")), 6);
  ck_assert_int_eq(json_integer_value(json_object_get(m, "sample_size")), 32);
  ck_assert_msg(!json_object_get(m, "num_params") == !want, "models as %s: %s", key, body);
  ck_assert_msg(!json_object_get(m, "kind") == !want, "models as %s: %s", key, body);
  ck_assert_msg(!json_object_get(m, "prediction_type") == !want, "models as %s: %s", key, body);
  json_decref(j);
  free(body);
  body = get_as(d, "/metrics", key);
  ck_assert_ptr_nonnull(strstr(body, "denoised_jobs_total{state=\"succeeded\"} 1"));
  const char *timing[] = {"denoised_step_seconds",       "denoised_job_seconds",
                          "denoised_queue_wait_seconds", "denoised_worker_busy_seconds_total",
                          "denoised_worker_utilisation", "denoised_constant_time_overruns_total"};
  for (int i = 0; i < 6; i++)
    ck_assert_msg(!strstr(body, timing[i]) == !want, "metrics as %s: %s %s", key ? key : "-",
                  timing[i], want ? "missing" : "shown");
  free(body);
}

/* Model internals and timing metrics reach admins only: without keys nobody unless
 * expose_internals is set; with keys an admin key, never a metrics or read key (even with
 * expose_internals). */
START_TEST(internals_need_admin) {
  char st[512], id[64];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  submit_job(&d,
             "{\"class_label\": 1, \"seed\": 1, \"scheduler\": {\"name\": \"ddim\", \"steps\": 5}}",
             id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  expect_internals(&d, NULL, 0);
  daemon_stop(&d);
  const char *open[] = {"--expose-internals", "true", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), open), 0);
  submit_job(&d,
             "{\"class_label\": 1, \"seed\": 1, \"scheduler\": {\"name\": \"ddim\", \"steps\": 5}}",
             id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  expect_internals(&d, NULL, 1);
  daemon_stop(&d);
  const char *env[] = {"DENOISED_API_KEYS=ops:" OPS_KEY ":read+submit+metrics,root:" ROOT_KEY
                       ":read+metrics+admin",
                       NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), open, env), 0);
  char auth[128];
  snprintf(auth, sizeof auth, "Authorization: Bearer %s", OPS_KEY);
  const char *hdrs[] = {auth, NULL};
  const char *body =
      "{\"class_label\": 1, \"seed\": 1, \"scheduler\": {\"name\": \"ddim\", \"steps\": 5}}";
  http_resp r;
  http_req(&d, "POST", "/v1/jobs", body, strlen(body), hdrs, &r);
  ck_assert_int_eq(r.status, 202);
  json_t *j = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  for (double t0 = th_now(); th_now() - t0 < 60; usleep(20000)) {
    char *v = get_as(&d, path, OPS_KEY);
    const int done = strstr(v, "\"succeeded\"") != NULL;
    free(v);
    if (done)
      break;
  }
  expect_internals(&d, OPS_KEY, 0);
  expect_internals(&d, ROOT_KEY, 1);
  daemon_stop(&d);
}
END_TEST

/* ---- constant-time mode ---- */

#define ADAPTIVE_JOB                                                                               \
  "{\"class_label\": 2, \"seed\": %d, \"scheduler\": {\"name\": \"dpm-solver-adaptive\"}}"
#define FIXED_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": %d, \"scheduler\": {\"name\": \"ddim\", \"steps\": 12}}"

/* A job's events as a client compares them across seeds: everything but the job id, the
 * absolute time and the image links (which hold the id), one line per event. */
static char *event_signature(const daemon_proc *d, const char *fmt, int seed, double *secs) {
  char body[256], id[64];
  snprintf(body, sizeof body, fmt, seed);
  const double t0 = th_now();
  submit_job(d, body, id, sizeof id);
  sse_log log;
  test_sse_read(d, id, NULL, 0, &log);
  *secs = th_now() - t0;
  static json_t *ev[512];
  const int n = parse_events(log.text, ev, 512);
  size_t cap = 64 + (size_t)n * 256, len = 0;
  char *sig = calloc(1, cap);
  for (int i = 0; i < n; i++) {
    json_object_del(ev[i], "job_id");
    json_object_del(ev[i], "time");
    json_object_del(ev[i], "url");
    char *line = json_dumps(ev[i], JSON_COMPACT | JSON_SORT_KEYS);
    len += (size_t)snprintf(sig + len, cap - len, "%s\n", line);
    free(line);
  }
  free_events(ev, n);
  free(log.text);
  return sig;
}

/* The evaluations a finished job reports (its view's progress.nfe). */
static int job_nfe(const daemon_proc *d, const char *fmt, int seed) {
  char body[256], id[64], path[128];
  snprintf(body, sizeof body, fmt, seed);
  submit_job(d, body, id, sizeof id);
  wait_state(d, id, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_resp r;
  http_get(d, path, &r);
  json_t *j = http_json(&r);
  const int nfe = (int)json_integer_value(json_object_get(json_object_get(j, "progress"), "nfe"));
  json_decref(j);
  http_free(&r);
  return nfe;
}

/* Seeds 1 and 5 need 24 and 33 evaluations of the adaptive solver (a client sees it without
 * constant-time mode); with it, both report and wait out 36 slots of 20 ms: identical events
 * (count, order, step/total/nfe, elapsed, eta) and no finish before 0.72 s. A fixed solver
 * (ddim) gives identical events too. Seed 23 needs 39 and fails naming the limit. */
START_TEST(constant_time_same_events_for_every_seed) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  const int free1 = job_nfe(&d, ADAPTIVE_JOB, 1), free5 = job_nfe(&d, ADAPTIVE_JOB, 5);
  ck_assert_msg(free1 != free5, "seeds 1 and 5 need %d and %d evaluations", free1, free5);
  daemon_stop(&d);
  const char *args[] = {"--constant-time-eval-ms",
                        "20",
                        "--constant-time-max-nfe",
                        "36",
                        "--expose-internals",
                        "true",
                        NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  const char *kinds[] = {ADAPTIVE_JOB, FIXED_JOB};
  for (int k = 0; k < 2; k++) {
    double s1, s5;
    char *a = event_signature(&d, kinds[k], 1, &s1), *b = event_signature(&d, kinds[k], 5, &s5);
    ck_assert_msg(strcmp(a, b) == 0, "seed 1:\n%s\nseed 5:\n%s", a, b);
    ck_assert_ptr_nonnull(strstr(a, "\"type\":\"done\""));
    if (k == 0) {
      ck_assert_ptr_nonnull(strstr(a, "\"nfe\":36,\"seq\""));
      ck_assert_msg(s1 >= 0.72 && s5 >= 0.72, "finished after %.3f and %.3f s", s1, s5);
    }
    free(a);
    free(b);
  }
  char id[64], body[256];
  snprintf(body, sizeof body, ADAPTIVE_JOB, 23);
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "failed", 60);
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_resp r;
  http_get(&d, path, &r);
  ck_assert_ptr_nonnull(strstr(r.body, "constant_time_max_nfe"));
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* ---- batching ---- */

/* The batched_with of a finished job's started event. */
static int started_batched_with(const daemon_proc *d, const char *id) {
  sse_log log;
  test_sse_read(d, id, NULL, 0, &log);
  static json_t *ev[512];
  const int n = parse_events(log.text, ev, 512);
  int with = -1;
  for (int i = 0; i < n; i++)
    if (strcmp(json_string_value(json_object_get(ev[i], "type")), "started") == 0)
      with = (int)json_integer_value(json_object_get(ev[i], "batched_with"));
  free_events(ev, n);
  free(log.text);
  return with;
}

/* Queues the jobs behind a running blocker on the one worker, then cancels the blocker, so
 * they are dispatched together (batched where allowed); ids in out. */
static void queue_together(const daemon_proc *d, const char *const *bodies, int n,
                           char (*out)[64]) {
  char blocker[64], path[128];
  submit_job(d, SLOW_JOB, blocker, sizeof blocker);
  wait_running(d, blocker, 30);
  for (int i = 0; i < n; i++)
    submit_job(d, bodies[i], out[i], sizeof out[i]);
  snprintf(path, sizeof path, "/v1/jobs/%s", blocker);
  http_resp r;
  http_req(d, "DELETE", path, NULL, 0, NULL, &r);
  http_free(&r);
  for (int i = 0; i < n; i++)
    wait_state(d, out[i], "succeeded", 60);
}

/* A job's run does not depend on another tenant's input: jobs share a forward only with
 * identical solver, steps, options, size and guidance (a 12-step and a 40-step job never do;
 * two 12-step jobs with other seeds and classes do), and never when the solver's evaluation
 * count depends on the sample: an adaptive job of seed 1 (24 evaluations) queued with one of
 * seed 5 (33) runs alone and reports 24, not the batch's 33. */
START_TEST(batching_ignores_other_tenants_inputs) {
  char st[512], ids[2][64];
  daemon_proc d;
  const char *args[] = {"--workers", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  const int alone = job_nfe(&d, ADAPTIVE_JOB, 1);
  const char *fixed[] = {
      "{\"class_label\": 1, \"seed\": 3, \"scheduler\": {\"name\": \"ddim\", \"steps\": 12}}",
      "{\"class_label\": 4, \"seed\": 9, \"scheduler\": {\"name\": \"ddim\", \"steps\": 12}}"};
  queue_together(&d, fixed, 2, ids);
  ck_assert_int_eq(started_batched_with(&d, ids[0]), 1);
  ck_assert_int_eq(started_batched_with(&d, ids[1]), 1);
  const char *steps[] = {
      "{\"class_label\": 1, \"seed\": 3, \"scheduler\": {\"name\": \"ddim\", \"steps\": 12}}",
      "{\"class_label\": 1, \"seed\": 3, \"scheduler\": {\"name\": \"ddim\", \"steps\": 40}}"};
  queue_together(&d, steps, 2, ids);
  ck_assert_int_eq(started_batched_with(&d, ids[0]), 0);
  ck_assert_int_eq(started_batched_with(&d, ids[1]), 0);
  char a1[256], a5[256];
  snprintf(a1, sizeof a1, ADAPTIVE_JOB, 1);
  snprintf(a5, sizeof a5, ADAPTIVE_JOB, 5);
  const char *adaptive[] = {a1, a5};
  queue_together(&d, adaptive, 2, ids);
  ck_assert_int_eq(started_batched_with(&d, ids[0]), 0);
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", ids[0]);
  http_resp r;
  http_get(&d, path, &r);
  json_t *j = http_json(&r);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "nfe")),
                   alone);
  json_decref(j);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* ---- errors ---- */

/* An h-space boundary fitted on another architecture fails the job, and the message says so
 * without the served model's mid-block shape (its channel count and resolution: the
 * architecture a client is not to learn). Before, it read "the model's mid block gives
 * 32x4x4". */
START_TEST(errors_carry_no_model_shapes) {
  char st[512], unet[1024], shapes[1024], a1[1100], a2[1100];
  test_src_path(unet, sizeof unet, "tests/fixtures/unet/classcond_small");
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  snprintf(a1, sizeof a1, "default=%s", shapes);
  snprintf(a2, sizeof a2, "small=%s", unet);
  const char *args[] = {"--model", a1, "--model", a2, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  boundary b = {.dim = 3 * 8 * 8, .c = 3, .h = 8, .w = 8, .scale = 1, .step = 4};
  boundary hb = {.dim = 16 * 2 * 2, .c = 16, .h = 2, .w = 2, .scale = 1};
  b.normal = calloc((size_t)b.dim, sizeof *b.normal);
  hb.normal = calloc((size_t)hb.dim, sizeof *hb.normal);
  b.normal[0] = 1;
  hb.normal[0] = 1;
  b.mid = &hb;
  b.solver = json_pack("{s:s, s:i}", "name", "ddim", "steps", 10);
  json_t *bj = boundary_to_json(&b);
  char *btext = json_dumps(bj, JSON_COMPACT);
  json_decref(bj);
  b.mid = NULL;
  free(hb.normal);
  boundary_free(&b);
  size_t cap = strlen(btext) + 512;
  char *body = malloc(cap), id[64], path[128];
  snprintf(body, cap,
           "{\"model\": \"small\", \"class_label\": 2, \"seed\": 5, \"edit\": {\"type\": "
           "\"boundary\", \"boundary\": %s, \"strength\": 3, \"space\": \"h\"}}",
           btext);
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "failed", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_resp r;
  http_get(&d, path, &r);
  json_t *j = http_json(&r);
  const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
  ck_assert_msg(msg && strstr(msg, "16x2x2") && strstr(msg, "mid block"), "%s", r.body);
  ck_assert_msg(!strstr(msg, "32x"), "the model's mid-block shape leaks: %s", msg);
  json_decref(j);
  http_free(&r);
  free(btext);
  free(body);
  daemon_stop(&d);
}
END_TEST

/* ---- config ---- */

static void expect_config_error(const char *json, const char *key) {
  config c;
  config_defaults(&c);
  err e = {0};
  json_t *j = json_loads(json, 0, NULL);
  ck_assert_int_ne(config_apply_json(&c, j, "test.json", &e), 0);
  ck_assert_msg(strstr(e.msg, key) != NULL, "%s: '%s' does not name %s", json, e.msg, key);
  json_decref(j);
}

/* The new keys are checked like the others: a bad value is an error naming the key. */
START_TEST(config_keys_are_checked) {
  expect_config_error("{\"expose_internals\": 1}", "expose_internals");
  expect_config_error("{\"expose_internals\": \"yes\"}", "expose_internals");
  expect_config_error("{\"constant_time_eval_ms\": -1}", "constant_time_eval_ms");
  expect_config_error("{\"constant_time_eval_ms\": 600001}", "constant_time_eval_ms");
  expect_config_error("{\"constant_time_max_nfe\": 0}", "constant_time_max_nfe");
  config c;
  config_defaults(&c);
  ck_assert_int_eq(c.expose_internals, 0);
  ck_assert_int_eq(c.constant_time_eval_ms, 0);
  err e = {0};
  ck_assert_int_ne(config_set_flag(&c, "expose-internals", "maybe", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "expose_internals"));
  ck_assert_int_eq(config_set_flag(&c, "expose-internals", "true", &e), 0);
  ck_assert_int_eq(config_set_flag(&c, "constant-time-eval-ms", "25", &e), 0);
  char *env[] = {"DENOISED_CONSTANT_TIME_MAX_NFE=64", NULL};
  ck_assert_int_eq(config_apply_env(&c, env, &e), 0);
  ck_assert_int_eq(c.expose_internals, 1);
  ck_assert_int_eq(c.constant_time_eval_ms, 25);
  ck_assert_int_eq(c.constant_time_max_nfe, 64);
  json_t *j = config_to_json(&c);
  ck_assert(json_is_true(json_object_get(j, "expose_internals")));
  json_decref(j);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("deeppeep");
  TCase *tc = tcase_create("serving");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, client_times_are_whole_seconds);
  tcase_add_test(tc, internals_need_admin);
  tcase_add_test(tc, config_keys_are_checked);
  tcase_add_test(tc, constant_time_same_events_for_every_seed);
  tcase_add_test(tc, batching_ignores_other_tenants_inputs);
  tcase_add_test(tc, errors_carry_no_model_shapes);
  suite_add_tcase(s, tc);
  return s;
}
