/* The daemon end to end over HTTP on a loopback port: every endpoint and error path, event
 * streams (order, resume), cancellation, backpressure, auth, limits, CORS, the AUTOMATIC1111
 * routes, batching and concurrent clients. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>

#include "base64.h"
#include "image.h"
#include "testhttp.h"

/* About a second of compute in a release build: long enough to catch it running. */
#define LONG_JOB                                                                                   \
  "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                                          \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

START_TEST(service_endpoints) {
  char st[512];
  daemon_proc d;
  /* the timing metrics are internals (test_deeppeep): shown here on the operator's say-so */
  const char *args[] = {"--expose-internals", "true", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"ok\""));
  char hv[128];
  ck_assert_ptr_nonnull(http_header(&r, "X-Request-Id", hv, sizeof hv));
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/readyz", &r), 200);
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/v1/models", &r), 200);
  json_t *j = http_json(&r);
  json_t *m = json_array_get(json_object_get(j, "models"), 0);
  ck_assert_str_eq(json_string_value(json_object_get(m, "name")), "default");
  ck_assert_int_eq(json_integer_value(json_object_get(m, "num_classes")), 6);
  ck_assert_str_eq(json_string_value(json_array_get(json_object_get(m, "class_labels"), 2)),
                   "ring");
  ck_assert(json_is_true(json_object_get(m, "default")));
  json_decref(j);
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/v1/capabilities", &r), 200);
  j = http_json(&r);
  ck_assert_int_ge(json_array_size(json_object_get(j, "solvers")), 2);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "limits"), "max_batch")),
                   16);
  json_decref(j);
  http_free(&r);
  /* a job, then the counters move */
  char id[64];
  submit_job(&d, SMALL_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  ck_assert_int_eq(http_get(&d, "/metrics", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.ctype, "text/plain"));
  const char *want[] = {"denoised_queue_depth 0",
                        "denoised_jobs_total{state=\"succeeded\"} 1",
                        "denoised_images_generated_total 1",
                        "denoised_step_seconds_bucket{le=\"+Inf\"} 10",
                        "denoised_job_seconds_count 1",
                        "denoised_worker_utilisation",
                        "denoised_http_requests_total{code=\"2xx\"}"};
  for (int i = 0; i < 7; i++)
    ck_assert_msg(strstr(r.body, want[i]) != NULL, "metrics lack '%s':\n%s", want[i], r.body);
  http_free(&r);
  expect_error(&d, "GET", "/nope", NULL, 404, "not_found", NULL);
  expect_error(&d, "PUT", "/v1/jobs", NULL, 405, "method_not_allowed", NULL);
  http_req(&d, "PATCH", "/healthz", NULL, 0, NULL, &r);
  ck_assert_int_eq(r.status, 405);
  ck_assert_str_eq(http_header(&r, "Allow", hv, sizeof hv), "GET");
  http_free(&r);
  expect_error(&d, "GET", "/v1/jobs/0123456789abcdef01234567", NULL, 404, "not_found", NULL);
  expect_error(&d, "GET", "/v1/jobs/../../etc/passwd", NULL, 404, "not_found", NULL);
  daemon_stop(&d);
}
END_TEST

START_TEST(submit_fetch_and_list) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  http_resp r;
  http_post(&d, "/v1/jobs",
            "{\"class_label\": \"ring\", \"seed\": 1, \"batch_size\": 3, \"scheduler\": "
            "{\"name\": \"ddim\", \"steps\": 20, \"options\": {\"eta\": 0.5}}}",
            &r);
  ck_assert_int_eq(r.status, 202);
  char loc[256], id[64];
  ck_assert_ptr_nonnull(http_header(&r, "Location", loc, sizeof loc));
  json_t *j = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  char want[300];
  snprintf(want, sizeof want, "/v1/jobs/%s", id);
  ck_assert_str_eq(loc, want);
  ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "queued");
  ck_assert_int_eq(json_integer_value(json_object_get(j, "seed")), 1);
  ck_assert_int_eq(json_array_size(json_object_get(json_object_get(j, "links"), "images")), 3);
  json_decref(j);
  http_free(&r);
  wait_state(&d, id, "succeeded", 60);
  char path[256];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_get(&d, path, &r);
  j = http_json(&r);
  ck_assert_int_eq(json_array_size(json_object_get(j, "images")), 3);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "step")), 20);
  ck_assert(json_is_string(json_object_get(j, "finished_at")));
  ck_assert(json_is_number(json_object_get(json_object_get(j, "timings"), "run_seconds")));
  json_decref(j);
  http_free(&r);
  /* the PNG carries the metadata and is the image the CLI makes from the same request */
  snprintf(path, sizeof path, "/v1/jobs/%s/images/2", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  ck_assert_str_eq(r.ctype, "image/png");
  char tmp[256], png[300], cli[300], out[4096];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(png, sizeof png, "%s/api.png", tmp);
  FILE *f = fopen(png, "wb");
  fwrite(r.body, 1, r.len, f);
  fclose(f);
  char *meta = NULL;
  err e;
  ck_assert_int_eq(image_png_read_text(png, "denoised", &meta, &e), 0);
  json_t *mj = json_loads(meta, 0, NULL);
  ck_assert_int_eq(json_integer_value(json_object_get(mj, "image_index")), 2);
  ck_assert_str_eq(json_string_value(json_object_get(mj, "job_id")), id);
  ck_assert_str_eq(json_string_value(json_object_get(mj, "model")), "default");
  json_decref(mj);
  free(meta);
  ck_assert_int_eq(image_png_read_text(png, "parameters", &meta, &e), 0);
  ck_assert_ptr_nonnull(strstr(meta, "Steps: 20, Sampler: ddim, Seed: 1"));
  free(meta);
  /* `denoised sample --replay` regenerates it from the metadata alone */
  char model[1024], cmd[4096];
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(cli, sizeof cli, "%s/replayed.png", tmp);
  snprintf(cmd, sizeof cmd, "%s sample --replay %s --model %s -o %s --quiet 2>&1", test_bin(), png,
           model, cli);
  FILE *p = popen(cmd, "r");
  size_t n = fread(out, 1, sizeof out - 1, p);
  out[n] = 0;
  ck_assert_msg(pclose(p) == 0, "%s", out);
  uint8_t *a = NULL, *b = NULL;
  int h, w, h2, w2;
  ck_assert_int_eq(image_png_decode((uint8_t *)r.body, r.len, 64, 64, &a, &h, &w, &e), 0);
  FILE *g = fopen(cli, "rb");
  uint8_t buf[65536];
  size_t gl = fread(buf, 1, sizeof buf, g);
  fclose(g);
  ck_assert_int_eq(image_png_decode(buf, gl, 64, 64, &b, &h2, &w2, &e), 0);
  ck_assert(h == h2 && w == w2 && memcmp(a, b, (size_t)h * w * 3) == 0);
  free(a);
  free(b);
  http_free(&r);
  expect_error(&d, "GET", "/v1/jobs/0000/images/3", NULL, 404, "not_found", NULL);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/3", id);
  expect_error(&d, "GET", path, NULL, 404, "not_found", NULL);
  /* listing: newest first, paginated with a cursor */
  char ids[3][64];
  for (int i = 0; i < 3; i++)
    submit_job(&d, SMALL_JOB, ids[i], sizeof ids[i]);
  http_get(&d, "/v1/jobs?limit=2", &r);
  j = http_json(&r);
  ck_assert_int_eq(json_array_size(json_object_get(j, "jobs")), 2);
  ck_assert_str_eq(
      json_string_value(json_object_get(json_array_get(json_object_get(j, "jobs"), 0), "id")),
      ids[2]);
  const char *cursor = json_string_value(json_object_get(j, "next_cursor"));
  ck_assert_ptr_nonnull(cursor);
  snprintf(path, sizeof path, "/v1/jobs?limit=2&cursor=%s", cursor);
  json_t *j2;
  http_resp r2;
  http_get(&d, path, &r2);
  j2 = http_json(&r2);
  ck_assert_int_eq(json_array_size(json_object_get(j2, "jobs")), 2);
  ck_assert_str_eq(
      json_string_value(json_object_get(json_array_get(json_object_get(j2, "jobs"), 1), "id")), id);
  ck_assert(json_is_null(json_object_get(j2, "next_cursor")));
  json_decref(j);
  json_decref(j2);
  http_free(&r);
  http_free(&r2);
  http_get(&d, "/v1/jobs?state=cancelled", &r);
  j = http_json(&r);
  ck_assert_int_eq(json_array_size(json_object_get(j, "jobs")), 0);
  json_decref(j);
  http_free(&r);
  expect_error(&d, "GET", "/v1/jobs?limit=0", NULL, 400, "out_of_range", "limit");
  expect_error(&d, "GET", "/v1/jobs?state=done", NULL, 400, "invalid_field", "state");
  expect_error(&d, "GET", "/v1/jobs?cursor=xyz", NULL, 400, "invalid_field", "cursor");
  /* a seed of -1 is resolved and echoed; first_image regenerates one image of a batch */
  http_post(&d, "/v1/jobs", "{\"class_label\": 1, \"seed\": -1}", &r);
  j = http_json(&r);
  ck_assert(json_integer_value(json_object_get(j, "seed")) >= 0);
  json_decref(j);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

START_TEST(request_validation) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--max-body-bytes", "4096", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  struct {
    const char *body;
    long status;
    const char *code, *field;
  } cases[] = {
      {"{\"class_label\": 1, \"colour\": \"red\"}", 400, "unknown_field", "colour"},
      {"{\"class_label\": 1, \"batch_size\": \"4\"}", 400, "wrong_type", "batch_size"},
      {"{\"class_label\": 1, \"batch_size\": 0}", 400, "out_of_range", "batch_size"},
      {"{\"class_label\": 1, \"batch_size\": 17}", 400, "out_of_range", "batch_size"},
      {"{\"class_label\": 1, \"seed\": -2}", 400, "out_of_range", "seed"},
      {"{\"class_label\": 1, \"seed\": 1.5}", 400, "wrong_type", "seed"},
      {"{\"class_label\": 6}", 400, "out_of_range", "class_label"},
      {"{\"class_label\": \"triangle\"}", 400, "invalid_field", "class_label"},
      {"{\"seed\": 1}", 400, "missing_field", "class_label"},
      {"{\"class_label\": 1, \"model\": \"/etc\"}", 400, "invalid_field", "model"},
      {"{\"class_label\": 1, \"model\": 3}", 400, "wrong_type", "model"},
      {"{\"class_label\": 1, \"width\": 64}", 400, "invalid_field", "width"},
      {"{\"class_label\": 1, \"height\": 100000}", 400, "out_of_range", "height"},
      {"{\"class_label\": 1, \"scheduler\": {\"name\": \"warp\"}}", 400, "invalid_field",
       "scheduler.name"},
      {"{\"class_label\": 1, \"scheduler\": {\"steps\": 0}}", 400, "out_of_range",
       "scheduler.steps"},
      {"{\"class_label\": 1, \"scheduler\": {\"steps\": 5000}}", 400, "out_of_range",
       "scheduler.steps"},
      {"{\"class_label\": 1, \"scheduler\": {\"step\": 5}}", 400, "unknown_field",
       "scheduler.step"},
      {"{\"class_label\": 1, \"scheduler\": {\"options\": {\"eta\": \"x\"}}}", 400, "invalid_field",
       "scheduler.options.eta"},
      {"{\"class_label\": 1, \"scheduler\": {\"options\": {\"timestep_spacing\": \"odd\"}}}", 400,
       "invalid_field", "scheduler.options.timestep_spacing"},
      {"{\"class_label\": 1, \"scheduler\": {\"options\": {\"bogus_key\": 1}}}", 400,
       "invalid_field", "scheduler.options.bogus_key"},
      {"{\"class_label\": 1, \"scheduler\": {\"options\": {\"prediction_type\": "
       "\"v_prediction\"}}}",
       400, "invalid_field", "scheduler.options.prediction_type"},
      {"{\"class_label\": 1, \"scheduler\": {\"options\": [1]}}", 400, "wrong_type",
       "scheduler.options"},
      {"{\"class_label\": 1, \"scheduler\": 5}", 400, "wrong_type", "scheduler"},
      {"{\"class_label\": 1, \"preview\": {\"every\": 0}}", 400, "out_of_range", "preview.every"},
      {"{\"class_label\": 1, \"guidance\": 3}", 400, "wrong_type", "guidance"},
      {"{\"class_label\": 1, \"guidance\": {}}", 400, "missing_field", "guidance.scale"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": \"3\"}}", 400, "wrong_type",
       "guidance.scale"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": -0.5}}", 400, "out_of_range",
       "guidance.scale"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 51}}", 400, "out_of_range",
       "guidance.scale"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"thresholding\": \"yes\"}}", 400,
       "wrong_type", "guidance.thresholding"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"thresholding\": {\"ratio\": 2}}}", 400,
       "out_of_range", "guidance.thresholding.ratio"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"thresholding\": {\"cap\": 2}}}", 400,
       "unknown_field", "guidance.thresholding.cap"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"thresholding\": true}, "
       "\"scheduler\": {\"name\": \"dpm++2m\", \"options\": {\"thresholding\": false}}}",
       400, "invalid_field", "guidance.thresholding"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"thresholding\": true}, "
       "\"scheduler\": \"euler\"}",
       400, "invalid_field", "guidance.thresholding"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"null_class\": 6}}", 400, "out_of_range",
       "guidance.null_class"},
      {"{\"class_label\": 1, \"guidance\": {\"scale\": 3, \"null_class\": 1.5}}", 400, "wrong_type",
       "guidance.null_class"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"invert_ddim\"}}", 400, "missing_field",
       "input_image"},
      {"{\"class_label\": 1, \"first_image\": -1}", 400, "out_of_range", "first_image"},
      {"{\"class_label\": 1,}", 400, "invalid_json", NULL},
      {"{\"class_label\": 1, \"class_label\": 2}", 400, "invalid_json", NULL},
      {"[1, 2]", 400, "invalid_json", NULL},
      {"", 400, "invalid_json", NULL},
      {"{\"a\": 1} trailing", 400, "invalid_json", NULL},
      {"{\"class_label\": 1, \"seed\": 99999999999999999999999}", 400, "invalid_json", NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    expect_error(&d, "POST", "/v1/jobs", cases[i].body, cases[i].status, cases[i].code,
                 cases[i].field);
  /* bodies over the limit: announced, or sent chunked without a length */
  char *big = malloc(10000);
  memset(big, ' ', 9999);
  big[0] = '{';
  big[9998] = '}';
  big[9999] = 0;
  expect_error(&d, "POST", "/v1/jobs", big, 413, "payload_too_large", NULL);
  http_resp r;
  const char *chunked[] = {"Transfer-Encoding: chunked", NULL};
  http_req(&d, "POST", "/v1/jobs", big, strlen(big), chunked, &r);
  ck_assert_int_eq(r.status, 413);
  http_free(&r);
  free(big);
  /* deep nesting is refused by the parser, not by a crash */
  char *deep = malloc(3000);
  for (int i = 0; i < 1400; i++)
    deep[i] = '[';
  for (int i = 0; i < 1400; i++)
    deep[1400 + i] = ']';
  deep[2800] = 0;
  http_req(&d, "POST", "/v1/jobs", deep, strlen(deep), NULL, &r);
  ck_assert_int_eq(r.status, 400);
  http_free(&r);
  free(deep);
  /* binary junk */
  char junk[256];
  for (int i = 0; i < 256; i++)
    junk[i] = (char)(i * 37 + 11);
  http_req(&d, "POST", "/v1/jobs", junk, sizeof junk, NULL, &r);
  ck_assert_int_eq(r.status, 400);
  http_free(&r);
  /* still serving, nothing queued by any of it */
  ck_assert_int_eq(http_get(&d, "/v1/jobs", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"jobs\":[]"));
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* A daemon serving default=<src>/rel1 and name2=<src>/rel2. */
static void start_two_models(daemon_proc *d, const char *rel1, const char *name2,
                             const char *rel2) {
  char st[512], p1[1024], p2[1024], a1[1100], a2[1100];
  test_src_path(p1, sizeof p1, rel1);
  test_src_path(p2, sizeof p2, rel2);
  snprintf(a1, sizeof a1, "default=%s", p1);
  snprintf(a2, sizeof a2, "%s=%s", name2, p2);
  const char *args[] = {"--model", a1, "--model", a2, NULL};
  ck_assert_int_eq(daemon_start(d, th_state_dir(st, sizeof st), args), 0);
}

/* guidance.classifier: the default glyph model's classifier (models/glyphs32/classifier) steers
 * a job; the job echoes it, the PNG records it, GET /v1/models lists the heads; the refusals. */
START_TEST(classifier_guided_jobs) {
  daemon_proc d;
  start_two_models(&d, "models/glyphs32", "shapes", "models/shapes-gmm");
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/models", &r), 200);
  ck_assert_msg(strstr(r.body, "\"italic\"") && strstr(r.body, "\"classifier\""), "%s", r.body);
  http_free(&r);
  char cid[64], pid[64], path[256];
  const char *job = "{\"class_label\": \"A\", \"seed\": 4, \"scheduler\": {\"name\": \"dpm++2m\", "
                    "\"steps\": 6}, \"guidance\": {\"scale\": 2%s}}";
  char body[512];
  snprintf(body, sizeof body, job,
           ", \"classifier\": {\"scale\": 3, \"head\": \"italic\", \"target\": \"italic\"}");
  submit_job(&d, body, cid, sizeof cid);
  snprintf(body, sizeof body, job, "");
  submit_job(&d, body, pid, sizeof pid);
  wait_state(&d, cid, "succeeded", 60);
  wait_state(&d, pid, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", cid);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  json_t *cg =
      json_object_get(json_object_get(json_object_get(j, "request"), "guidance"), "classifier");
  ck_assert_msg(json_is_object(cg) && json_integer_value(json_object_get(cg, "head")) == 2 &&
                    json_integer_value(json_object_get(cg, "target")) == 1,
                "%s", r.body);
  json_decref(j);
  http_free(&r);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", cid);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  char tmp[256], png[512];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(png, sizeof png, "%s/c.png", tmp);
  FILE *f = fopen(png, "wb");
  fwrite(r.body, 1, r.len, f);
  fclose(f);
  http_free(&r);
  char *meta = NULL;
  err e;
  ck_assert_int_eq(image_png_read_text(png, "denoised", &meta, &e), 0);
  ck_assert_msg(strstr(meta, "\"classifier_guidance\"") && strstr(meta, "\"italic\""), "%s", meta);
  free(meta);
  uint8_t *pc, *pp;
  fetch_pixels(&d, cid, 0, &pc);
  fetch_pixels(&d, pid, 0, &pp);
  ck_assert_msg(memcmp(pc, pp, 32 * 32 * 3) != 0, "classifier guidance changed nothing");
  free(pc);
  free(pp);
  struct {
    const char *clf, *code, *field;
  } bad[] = {
      {"{\"scale\": 3, \"target\": \"A\", \"weight\": 1}", "unknown_field",
       "guidance.classifier.weight"},
      {"{\"scale\": 3}", "missing_field", "guidance.classifier.target"},
      {"{\"target\": \"A\"}", "missing_field", "guidance.classifier.scale"},
      {"{\"scale\": 101, \"target\": \"A\"}", "out_of_range", "guidance.classifier.scale"},
      {"{\"scale\": 1, \"head\": \"slant\", \"target\": 1}", "invalid_field",
       "guidance.classifier.head"},
      {"{\"scale\": 1, \"head\": \"bold\", \"target\": 2}", "invalid_field",
       "guidance.classifier.target"},
      {"3", "wrong_type", "guidance.classifier"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    snprintf(body, sizeof body,
             "{\"class_label\": \"A\", \"guidance\": {\"scale\": 2, \"classifier\": %s}}",
             bad[i].clf);
    expect_error(&d, "POST", "/v1/jobs", body, 400, bad[i].code, bad[i].field);
  }
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"shapes\", \"class_label\": 1, \"guidance\": {\"scale\": 2, "
               "\"classifier\": {\"scale\": 1, \"target\": 0}}}",
               400, "invalid_field", "guidance.classifier");
  snprintf(path, sizeof path, "rm -r %s", tmp);
  ck_assert_int_eq(system(path), 0);
  daemon_stop(&d);
}
END_TEST

/* ---- guidance and editing ---- */

/* Image n of job id: its PNG written to tmp/<name>.png, then `denoised sample --replay` of it
 * must give the same pixels. Returns the PNG's "denoised" metadata. */

static json_t *check_replay(const daemon_proc *d, const char *id, int n, const char *name,
                            const char *infotext) {
  char path[256], tmp[256], png[512], cli[512], cmd[4096], out[4096], model[1024];
  snprintf(path, sizeof path, "/v1/jobs/%s/images/%d", id, n);
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  test_tmpdir(tmp, sizeof tmp);
  snprintf(png, sizeof png, "%s/%s.png", tmp, name);
  FILE *f = fopen(png, "wb");
  fwrite(r.body, 1, r.len, f);
  fclose(f);
  char *meta = NULL;
  err e;
  ck_assert_int_eq(image_png_read_text(png, "denoised", &meta, &e), 0);
  json_t *mj = json_loads(meta, 0, NULL);
  free(meta);
  if (infotext) {
    ck_assert_int_eq(image_png_read_text(png, "parameters", &meta, &e), 0);
    ck_assert_msg(strstr(meta, infotext) != NULL, "%s lacks '%s'", meta, infotext);
    free(meta);
  }
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(cli, sizeof cli, "%s/%s-replayed.png", tmp, name);
  snprintf(cmd, sizeof cmd, "%s sample --replay %s --model %s -o %s --quiet 2>&1", test_bin(), png,
           model, cli);
  FILE *p = popen(cmd, "r");
  size_t k = fread(out, 1, sizeof out - 1, p);
  out[k] = 0;
  ck_assert_msg(pclose(p) == 0, "%s", out);
  uint8_t *a = NULL, *b = NULL;
  int h, w, h2, w2;
  ck_assert_int_eq(image_png_decode((uint8_t *)r.body, r.len, 64, 64, &a, &h, &w, &e), 0);
  size_t gl;
  uint8_t *buf = read_file_all(cli, &gl);
  ck_assert_int_eq(image_png_decode(buf, gl, 64, 64, &b, &h2, &w2, &e), 0);
  ck_assert_msg(h == h2 && w == w2 && memcmp(a, b, (size_t)h * w * 3) == 0,
                "%s: the daemon's image differs from the CLI replay", name);
  free(buf);
  free(a);
  free(b);
  http_free(&r);
  return mj;
}

START_TEST(guided_jobs) {
  daemon_proc d;
  start_two_models(&d, "models/shapes-gmm", "plain", "tests/fixtures/gmm/mix3");
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/capabilities", &r), 200);
  json_t *j = http_json(&r);
  ck_assert(json_is_true(json_object_get(json_object_get(j, "features"), "guidance")));
  json_decref(j);
  http_free(&r);
  /* guided and unguided, same seed: different images, each the CLI's */
  char gid[64], uid[64], path[256];
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 11, \"guidance\": {\"scale\": 4}, \"scheduler\": "
             "{\"name\": \"dpm++2m\", \"steps\": 12}}",
             gid, sizeof gid);
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 11, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": "
             "12}}",
             uid, sizeof uid);
  wait_state(&d, gid, "succeeded", 60);
  wait_state(&d, uid, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", gid);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  j = http_json(&r);
  json_t *g = json_object_get(json_object_get(j, "request"), "guidance");
  ck_assert_msg(json_is_object(g), "%s", r.body);
  ck_assert(json_number_value(json_object_get(g, "scale")) == 4.0);
  ck_assert_int_eq(json_integer_value(json_object_get(g, "null_class")), -1); /* the GMM's */
  json_decref(j);
  http_free(&r);
  json_t *mg = check_replay(&d, gid, 0, "guided", "CFG scale: 4");
  ck_assert(json_number_value(json_object_get(mg, "guidance_scale")) == 4.0);
  json_decref(mg);
  json_t *mu = check_replay(&d, uid, 0, "unguided", NULL);
  ck_assert_ptr_null(json_object_get(mu, "guidance_scale"));
  json_decref(mu);
  uint8_t *pg, *pu;
  fetch_pixels(&d, gid, 0, &pg);
  fetch_pixels(&d, uid, 0, &pu);
  ck_assert_msg(memcmp(pg, pu, 32 * 32 * 3) != 0, "guidance changed nothing");
  free(pg);
  free(pu);
  err e;
  /* /v1/generate takes the block too */
  ck_assert_int_eq(
      http_post(&d, "/v1/generate",
                "{\"class_label\": 1, \"seed\": 3, \"guidance\": {\"scale\": 2.5, "
                "\"null_class\": -1}, \"scheduler\": {\"name\": \"ddim\", \"steps\": 8}}",
                &r),
      200);
  ck_assert(r.len > 8 && memcmp(r.body, "\x89PNG", 4) == 0);
  http_free(&r);
  /* guidance.thresholding is the scheduler's dynamic thresholding: the same pixels as the
   * options, and shown in them */
  char tid[64], oid[64];
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 11, \"guidance\": {\"scale\": 8, \"thresholding\": "
             "{\"ratio\": 0.9}}, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 12}}",
             tid, sizeof tid);
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 11, \"guidance\": {\"scale\": 8}, \"scheduler\": "
             "{\"name\": \"dpm++2m\", \"steps\": 12, \"options\": {\"thresholding\": true, "
             "\"dynamic_thresholding_ratio\": 0.9}}}",
             oid, sizeof oid);
  wait_state(&d, tid, "succeeded", 60);
  wait_state(&d, oid, "succeeded", 60);
  fetch_pixels(&d, tid, 0, &pg);
  fetch_pixels(&d, oid, 0, &pu);
  ck_assert_msg(memcmp(pg, pu, 32 * 32 * 3) == 0, "guidance.thresholding differs from the options");
  free(pg);
  free(pu);
  snprintf(path, sizeof path, "/v1/jobs/%s", tid);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"thresholding\":true"));
  http_free(&r);
  /* only class-conditional models are guided */
  expect_error(&d, "POST", "/v1/jobs", "{\"model\": \"plain\", \"guidance\": {\"scale\": 3}}", 400,
               "invalid_field", "guidance.scale");
  /* A1111: cfg_scale guides a class-conditional model (and is ignored on an unconditional one) */
  ck_assert_int_eq(
      http_post(&d, "/sdapi/v1/txt2img",
                "{\"prompt\": \"ring\", \"steps\": 12, \"sampler_name\": \"DPM++ 2M\", "
                "\"cfg_scale\": 4, \"seed\": 11, \"width\": 32, \"height\": 32}",
                &r),
      200);
  j = http_json(&r);
  const char *b64 = json_string_value(json_array_get(json_object_get(j, "images"), 0));
  ck_assert_ptr_nonnull(b64);
  uint8_t *pngb = NULL, *pa = NULL;
  size_t pl = 0;
  ck_assert_int_eq(base64_decode(b64, strlen(b64), &pngb, &pl), 0);
  int h, w;
  ck_assert_int_eq(image_png_decode(pngb, pl, 64, 64, &pa, &h, &w, &e), 0);
  fetch_pixels(&d, gid, 0, &pg);
  ck_assert_msg(memcmp(pa, pg, 32 * 32 * 3) == 0, "txt2img cfg_scale 4 differs from guidance 4");
  ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(j, "info")), "CFG scale: 4"));
  free(pg);
  free(pa);
  free(pngb);
  json_decref(j);
  http_free(&r);
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"cfg_scale\": 80}", 400,
               "out_of_range", "cfg_scale");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"cfg_scale\": \"7\"}", 400,
               "wrong_type", "cfg_scale");
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/txt2img",
                             "{\"cfg_scale\": 7, \"steps\": 4, \"override_settings\": "
                             "{\"sd_model_checkpoint\": \"plain\"}}",
                             &r),
                   200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* A w x h RGB PNG: the left `white` columns white, the rest black (a mask), as base64. */

/* ---- SSE ---- */

typedef struct parsed_event {
  long id;
  char type[32];
  json_t *data;
} parsed_event;

static int parse_events(const char *text, parsed_event *ev, int max) {
  int n = 0;
  const char *p = text;
  while (p && *p && n < max) {
    const char *end = strstr(p, "\n\n");
    if (!end)
      break;
    long id = -1;
    char type[32] = "";
    json_t *data = NULL;
    for (const char *l = p; l < end;) {
      const char *nl = strchr(l, '\n');
      if (!nl || nl > end)
        nl = end;
      if (strncmp(l, "id: ", 4) == 0)
        id = atol(l + 4);
      else if (strncmp(l, "event: ", 7) == 0)
        snprintf(type, sizeof type, "%.*s", (int)(nl - l - 7), l + 7);
      else if (strncmp(l, "data: ", 6) == 0)
        data = json_loadb(l + 6, (size_t)(nl - l - 6), 0, NULL);
      l = nl + 1;
    }
    if (id >= 0) {
      ev[n].id = id;
      snprintf(ev[n].type, sizeof ev[n].type, "%s", type);
      ev[n].data = data;
      n++;
    } else {
      json_decref(data);
    }
    p = end + 2;
  }
  return n;
}

START_TEST(events_order_and_resume) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--progress-interval-ms", "0", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64];
  submit_job(&d,
             "{\"class_label\": 3, \"seed\": 11, \"batch_size\": 2, \"scheduler\": {\"name\": "
             "\"ddpm\", \"steps\": 200}, \"preview\": {\"every\": 50}}",
             id, sizeof id);
  sse_log all;
  test_sse_read(&d, id, NULL, 0, &all);
  ck_assert_ptr_nonnull(strstr(all.text, "retry: "));
  static parsed_event ev[1024];
  int n = parse_events(all.text, ev, 1024);
  ck_assert_int_ge(n, 6);
  ck_assert_str_eq(ev[0].type, "queued");
  ck_assert_str_eq(ev[n - 1].type, "done");
  int started = 0, images = 0, previews = 0, last_step = 0, progress = 0;
  for (int i = 0; i < n; i++) {
    ck_assert_msg(ev[i].data != NULL, "event %ld has no JSON data", ev[i].id);
    ck_assert_str_eq(json_string_value(json_object_get(ev[i].data, "job_id")), id);
    ck_assert_int_eq(json_integer_value(json_object_get(ev[i].data, "seq")), ev[i].id);
    ck_assert_str_eq(json_string_value(json_object_get(ev[i].data, "type")), ev[i].type);
    if (i)
      ck_assert_int_gt(ev[i].id, ev[i - 1].id);
    if (strcmp(ev[i].type, "started") == 0)
      started = i;
    if (strcmp(ev[i].type, "progress") == 0) {
      ck_assert_int_gt(i, started);
      int step = (int)json_integer_value(json_object_get(ev[i].data, "step"));
      ck_assert_int_gt(step, last_step);
      last_step = step;
      progress++;
      ck_assert_int_eq(json_integer_value(json_object_get(ev[i].data, "total")), 200);
      ck_assert(json_is_number(json_object_get(ev[i].data, "eta")));
      ck_assert(json_is_number(json_object_get(ev[i].data, "elapsed")));
      const char *pv = json_string_value(json_object_get(ev[i].data, "preview"));
      if (pv) {
        ck_assert(strncmp(pv, "data:image/png;base64,", 22) == 0);
        previews++;
      }
      /* steps only: nothing about layers or their timings */
      ck_assert_ptr_null(json_object_get(ev[i].data, "layers"));
    }
    if (strcmp(ev[i].type, "image") == 0) {
      ck_assert_int_gt(i, started);
      images++;
    }
  }
  ck_assert_int_gt(started, 0);
  ck_assert_int_eq(last_step, 200);
  ck_assert_int_eq(images, 2);
  ck_assert_int_ge(previews, 4);
  ck_assert_int_ge(progress, 4);
  /* resuming after any event gives exactly the events the full stream had after it (the
   * finished job keeps lifecycle events and its last progress) */
  char last[32];
  snprintf(last, sizeof last, "%ld", ev[1].id);
  sse_log rest;
  test_sse_read(&d, id, last, 0, &rest);
  static parsed_event ev2[1024];
  int n2 = parse_events(rest.text, ev2, 1024);
  ck_assert_int_ge(n2, 4);
  ck_assert_int_gt(ev2[0].id, ev[1].id);
  ck_assert_str_eq(ev2[n2 - 1].type, "done");
  int k = 0;
  for (int i = 2; i < n && k < n2; i++)
    if (ev[i].id == ev2[k].id) {
      ck_assert_str_eq(ev[i].type, ev2[k].type);
      k++;
    }
  ck_assert_int_eq(k, n2); /* every resumed event was in the original stream, in order */
  snprintf(last, sizeof last, "%ld", ev[n - 1].id);
  sse_log none;
  test_sse_read(&d, id, last, 0, &none);
  ck_assert_int_eq(parse_events(none.text, ev2 + 512, 16), 0);
  for (int i = 0; i < n; i++)
    json_decref(ev[i].data);
  for (int i = 0; i < n2; i++)
    json_decref(ev2[i].data);
  free(all.text);
  free(rest.text);
  free(none.text);
  /* a live resume: drop the stream mid-run, reconnect with the last id, lose nothing */
  submit_job(&d, LONG_JOB, id, sizeof id);
  sse_log part;
  test_sse_read(&d, id, NULL, 3, &part);
  n = parse_events(part.text, ev, 1024);
  ck_assert_int_ge(n, 3);
  snprintf(last, sizeof last, "%ld", ev[n - 1].id);
  test_sse_read(&d, id, last, 0, &rest);
  n2 = parse_events(rest.text, ev2, 1024);
  ck_assert_int_ge(n2, 2);
  ck_assert_int_eq(ev2[0].id, ev[n - 1].id + 1); /* the next one, nothing skipped */
  int imgs = 0;
  for (int i = 0; i < n2; i++) {
    if (i)
      ck_assert_int_gt(ev2[i].id, ev2[i - 1].id);
    imgs += strcmp(ev2[i].type, "image") == 0;
  }
  ck_assert_int_eq(imgs, 8);
  ck_assert_str_eq(ev2[n2 - 1].type, "done");
  for (int i = 0; i < n; i++)
    json_decref(ev[i].data);
  for (int i = 0; i < n2; i++)
    json_decref(ev2[i].data);
  free(part.text);
  free(rest.text);
  expect_error(&d, "GET", "/v1/jobs/0123456789abcdef01234567/events", NULL, 404, "not_found", NULL);
  http_resp r;
  const char *bad[] = {"Last-Event-ID: abc", NULL};
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s/events", id);
  http_req(&d, "GET", path, NULL, 0, bad, &r);
  ck_assert_int_eq(r.status, 400);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

START_TEST(cancel_queued_and_running) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--batch-max-images", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char a[64], b[64], path[128];
  submit_job(&d, LONG_JOB, a, sizeof a);
  submit_job(&d, LONG_JOB, b, sizeof b);
  /* b is first in line once a runs; asked before the worker has taken a, b is second */
  wait_running(&d, a, 60);
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s", b);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "queued");
  ck_assert_int_eq(json_integer_value(json_object_get(j, "position")), 1);
  json_decref(j);
  http_free(&r);
  /* queued: leaves the queue at once */
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "cancelled");
  json_decref(j);
  http_free(&r);
  /* running: stops at the next step boundary, the worker is free again soon */
  wait_running(&d, a, 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", a);
  double t0 = th_now();
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  http_free(&r);
  char c[64], state[32];
  int step = 0;
  submit_job(&d, SMALL_JOB, c, sizeof c);
  wait_state(&d, c, "succeeded", 30);
  ck_assert_msg(th_now() - t0 < 10, "the cancelled job kept its worker for %.1f s", th_now() - t0);
  job_state(&d, a, state, sizeof state, &step);
  ck_assert_str_eq(state, "cancelled");
  ck_assert_int_lt(step, 1000);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", a);
  expect_error(&d, "GET", path, NULL, 409, "not_ready", NULL);
  /* finished: 409 */
  snprintf(path, sizeof path, "/v1/jobs/%s", a);
  expect_error(&d, "DELETE", path, NULL, 409, "conflict", NULL);
  snprintf(path, sizeof path, "/v1/jobs/%s", c);
  expect_error(&d, "DELETE", path, NULL, 409, "conflict", NULL);
  expect_error(&d, "DELETE", "/v1/jobs/0123456789abcdef01234567", NULL, 404, "not_found", NULL);
  /* the cancelled events close their streams */
  sse_log s;
  test_sse_read(&d, b, NULL, 0, &s);
  ck_assert_ptr_nonnull(strstr(s.text, "event: cancelled"));
  free(s.text);
  daemon_stop(&d);
}
END_TEST

START_TEST(backpressure_429) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--queue-max", "2", "--batch-max-images", "1", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char ids[4][64];
  submit_job(&d, LONG_JOB, ids[0], sizeof ids[0]);
  wait_running(&d, ids[0], 60);
  submit_job(&d, LONG_JOB, ids[1], sizeof ids[1]);
  submit_job(&d, LONG_JOB, ids[2], sizeof ids[2]);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", LONG_JOB, &r), 429);
  char ra[32];
  ck_assert_ptr_nonnull(http_header(&r, "Retry-After", ra, sizeof ra));
  ck_assert_int_gt(atoi(ra), 0);
  ck_assert_ptr_nonnull(strstr(r.body, "queue_full"));
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/readyz", &r), 503);
  http_free(&r);
  /* the generate route refuses the same way rather than waiting */
  ck_assert_int_eq(http_post(&d, "/v1/generate", SMALL_JOB, &r), 429);
  http_free(&r);
  for (int i = 0; i < 3; i++) {
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s", ids[i]);
    http_req(&d, "DELETE", path, NULL, 0, NULL, &r);
    http_free(&r);
  }
  ck_assert_int_eq(http_get(&d, "/metrics", &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "denoised_jobs_rejected_total{reason=\"queue_full\"} 2"));
  ck_assert_ptr_nonnull(strstr(r.body, "\ndenoised_batched_jobs_total 0\n")); /* batching off */
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

START_TEST(auth_and_scopes) {
  char st[512], tmp[256], keyfile[300];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(keyfile, sizeof keyfile, "%s/keys", tmp);
  FILE *f = fopen(keyfile, "w");
  fprintf(f, "# name key scopes\nalice alice-key-0123456789abcdef\n"
             "reader reader-key-0123456789abcdef read\n"
             "ops ops-key-0123456789abcdef0 admin,read,cancel\n");
  fclose(f);
  chmod(keyfile, 0600);
  daemon_proc d;
  const char *args[] = {"--api-keys-file",
                        keyfile,
                        "--max-jobs-per-key",
                        "2",
                        "--workers",
                        "1",
                        "--batch-max-images",
                        "1",
                        NULL};
  const char *env[] = {"DENOISED_API_KEYS=bob:bob-key-0123456789abcdef01", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), args, env), 0);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  expect_error(&d, "GET", "/v1/models", NULL, 401, "unauthorized", NULL);
  http_get(&d, "/v1/jobs", &r);
  char hv[128];
  ck_assert_ptr_nonnull(http_header(&r, "WWW-Authenticate", hv, sizeof hv));
  http_free(&r);
  const char *wrong[] = {"Authorization: Bearer alice-key-0123456789abcdeX", NULL};
  ck_assert_int_eq(http_req(&d, "GET", "/v1/models", NULL, 0, wrong, &r), 401);
  http_free(&r);
  const char *alice[] = {"Authorization: Bearer alice-key-0123456789abcdef", NULL};
  const char *bob[] = {"Authorization: Bearer bob-key-0123456789abcdef01", NULL};
  const char *reader[] = {"Authorization: Bearer reader-key-0123456789abcdef", NULL};
  const char *ops[] = {"Authorization: Bearer ops-key-0123456789abcdef0", NULL};
  ck_assert_int_eq(http_req(&d, "GET", "/v1/models", NULL, 0, alice, &r), 200);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", LONG_JOB, strlen(LONG_JOB), reader, &r), 403);
  ck_assert_ptr_nonnull(strstr(r.body, "\"forbidden\""));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "GET", "/metrics", NULL, 0, reader, &r), 403);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", LONG_JOB, strlen(LONG_JOB), alice, &r), 202);
  json_t *j = http_json(&r);
  char id[64], path[128];
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  /* another key does not see alice's job; an admin does */
  ck_assert_int_eq(http_req(&d, "GET", path, NULL, 0, bob, &r), 404);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, bob, &r), 404);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "GET", "/v1/jobs", NULL, 0, bob, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"jobs\":[]"));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "GET", path, NULL, 0, ops, &r), 200);
  http_free(&r);
  /* EventSource cannot send headers: the key may come as ?access_token= on event streams */
  char epath[256];
  ck_assert_int_eq(http_get(&d, "/v1/models?access_token=alice-key-0123456789abcdef", &r), 401);
  http_free(&r);
  snprintf(epath, sizeof epath, "/v1/jobs/%s/events?access_token=wrong-key-0123456789abcdef", id);
  ck_assert_int_eq(http_get(&d, epath, &r), 401);
  http_free(&r);
  /* jobs per key */
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", LONG_JOB, strlen(LONG_JOB), alice, &r), 202);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", LONG_JOB, strlen(LONG_JOB), alice, &r), 429);
  ck_assert_ptr_nonnull(strstr(r.body, "too_many_jobs"));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", SMALL_JOB, strlen(SMALL_JOB), bob, &r), 202);
  http_free(&r);
  /* AUTOMATIC1111 clients send Basic auth: the key is the password */
  const char *basic[] = {"Authorization: Basic dXNlcjpib2Ita2V5LTAxMjM0NTY3ODlhYmNkZWYwMQ==", NULL};
  ck_assert_int_eq(http_req(&d, "GET", "/sdapi/v1/samplers", NULL, 0, basic, &r), 200);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, ops, &r), 200);
  http_free(&r);
  snprintf(epath, sizeof epath, "/v1/jobs/%s/events?access_token=alice-key-0123456789abcdef", id);
  ck_assert_int_eq(http_get(&d, epath, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "event: cancelled"));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/interrupt", "{}", 2, alice, &r), 200);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "GET", "/metrics", NULL, 0, alice, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "denoised_auth_failures_total"));
  http_free(&r);
  daemon_stop(&d);
  /* keys are never logged */
  ck_assert_int_eq(daemon_log_count(&d, "alice-key"), 0);
  ck_assert_int_eq(daemon_log_count(&d, "bob-key"), 0);
  ck_assert_int_gt(daemon_log_count(&d, "key=alice"), 0);
}
END_TEST

START_TEST(generate_and_a1111) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/generate", SMALL_JOB, &r), 200);
  ck_assert_str_eq(r.ctype, "image/png");
  ck_assert(r.len > 8 && memcmp(r.body, "\x89PNG", 4) == 0);
  char hv[64];
  ck_assert_str_eq(http_header(&r, "X-Seed", hv, sizeof hv), "7");
  ck_assert_ptr_nonnull(http_header(&r, "X-Job-Id", hv, sizeof hv));
  http_free(&r);
  expect_error(&d, "POST", "/v1/generate", "{\"class_label\": 9}", 400, "out_of_range",
               "class_label");
  expect_error(&d, "GET", "/v1/generate", NULL, 405, "method_not_allowed", NULL);
  /* txt2img: the prompt names the class, their sampler names map onto ours */
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/txt2img",
                             "{\"prompt\": \"ring\", \"negative_prompt\": \"\", \"steps\": 10, "
                             "\"sampler_name\": \"DDIM\", \"cfg_scale\": 7, \"seed\": 3, "
                             "\"batch_size\": 2, \"width\": 32, \"height\": 32, "
                             "\"restore_faces\": false}",
                             &r),
                   200);
  json_t *j = http_json(&r);
  json_t *imgs = json_object_get(j, "images");
  ck_assert_int_eq(json_array_size(imgs), 2);
  ck_assert(strncmp(json_string_value(json_array_get(imgs, 0)), "iVBORw0KGgo", 11) == 0);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "parameters"), "steps")),
                   10);
  json_t *info = json_loads(json_string_value(json_object_get(j, "info")), 0, NULL);
  ck_assert_ptr_nonnull(info);
  ck_assert_int_eq(json_integer_value(json_object_get(info, "seed")), 3);
  ck_assert_int_eq(json_array_size(json_object_get(info, "all_seeds")), 2);
  ck_assert_ptr_nonnull(
      strstr(json_string_value(json_array_get(json_object_get(info, "infotexts"), 1)), "Seed: 4"));
  json_decref(info);
  json_decref(j);
  http_free(&r);
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"sampler_name\": \"Foo\"}",
               400, "invalid_field", "sampler_name");
  /* A1111's default size on a 32-pixel model: the model's size is made (test_a1111) */
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"width\": 99999}", 400,
               "out_of_range", "width");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"blob\"}", 400, "invalid_field",
               "prompt");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"steps\": \"ten\"}", 400,
               "wrong_type", "steps");
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/samplers", &r), 200);
  j = http_json(&r);
  ck_assert(json_is_array(j));
  int found = 0;
  for (size_t i = 0; i < json_array_size(j); i++)
    found |= strcmp(json_string_value(json_object_get(json_array_get(j, i), "name")), "DDIM") == 0;
  ck_assert(found);
  json_decref(j);
  http_free(&r);
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/sd-models", &r), 200);
  http_free(&r);
  char id[64];
  submit_job(&d, LONG_JOB, id, sizeof id);
  wait_running(&d, id, 60);
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/progress", &r), 200);
  j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "state"), "job")), id);
  ck_assert(json_real_value(json_object_get(j, "progress")) > 0);
  json_decref(j);
  http_free(&r);
  /* without API keys an interrupt stops only the caller's own jobs: another client (token) or
   * the same address with a token of its own leaves this job running */
  const char *other[] = {"X-Client-Token: tab-2", NULL};
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/interrupt", "{}", 2, other, &r), 200);
  http_free(&r);
  char st2[32];
  job_state(&d, id, st2, sizeof st2, NULL);
  ck_assert_str_eq(st2, "running");
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/interrupt", "", &r), 200); /* same address */
  http_free(&r);
  wait_state(&d, id, "cancelled", 30);
  /* a job submitted with a client token: only that token interrupts it */
  const char *tab1[] = {"X-Client-Token: tab-1", NULL};
  ck_assert_int_eq(http_req(&d, "POST", "/v1/jobs", LONG_JOB, strlen(LONG_JOB), tab1, &r), 202);
  j = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  wait_running(&d, id, 60);
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/interrupt", "", &r), 200);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/interrupt", "{}", 2, other, &r), 200);
  http_free(&r);
  job_state(&d, id, st2, sizeof st2, NULL);
  ck_assert_str_eq(st2, "running");
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/interrupt", "{}", 2, tab1, &r), 200);
  http_free(&r);
  wait_state(&d, id, "cancelled", 30);
  daemon_stop(&d);
}
END_TEST

START_TEST(cors_allow_list) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--cors-origin", "http://app.example", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  char hv[256];
  const char *good[] = {"Origin: http://app.example", "Access-Control-Request-Method: POST", NULL};
  ck_assert_int_eq(http_req(&d, "OPTIONS", "/v1/jobs", NULL, 0, good, &r), 204);
  ck_assert_str_eq(http_header(&r, "Access-Control-Allow-Origin", hv, sizeof hv),
                   "http://app.example");
  ck_assert_ptr_nonnull(
      strstr(http_header(&r, "Access-Control-Allow-Headers", hv, sizeof hv), "Last-Event-ID"));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "GET", "/v1/models", NULL, 0, good, &r), 200);
  ck_assert_str_eq(http_header(&r, "Access-Control-Allow-Origin", hv, sizeof hv),
                   "http://app.example");
  http_free(&r);
  const char *bad[] = {"Origin: http://evil.example", NULL};
  ck_assert_int_eq(http_req(&d, "GET", "/v1/models", NULL, 0, bad, &r), 200);
  ck_assert_ptr_null(http_header(&r, "Access-Control-Allow-Origin", hv, sizeof hv));
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "OPTIONS", "/v1/jobs", NULL, 0, bad, &r), 204);
  ck_assert_ptr_null(http_header(&r, "Access-Control-Allow-Methods", hv, sizeof hv));
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* A client that sends half a request and then trickles: its connection is closed after
 * header_timeout, and the server keeps answering others meanwhile. */
START_TEST(slow_clients_are_cut) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--header-timeout", "1", "--max-connections-per-ip", "8", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)d.port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  const char *part = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
  ck_assert_int_eq(write(fd, part, strlen(part)), (ssize_t)strlen(part));
  double t0 = th_now();
  int closed = 0;
  while (th_now() - t0 < 8 && !closed) {
    if (write(fd, "X", 1) != 1) /* one byte at a time keeps the idle timeout from firing */
      closed = 1;
    char b[256];
    struct timeval tv = {0, 300000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t k = recv(fd, b, sizeof b, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
      closed = 1;
    http_resp r;
    ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
    http_free(&r);
  }
  close(fd);
  ck_assert_msg(closed, "a trickling client kept its connection");
  ck_assert_double_lt(th_now() - t0, 6);
  /* more than the per-address limit of connections: the extra ones are refused, no crash */
  int fds[12];
  for (int i = 0; i < 12; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    connect(fds[i], (struct sockaddr *)&sa, sizeof sa);
  }
  usleep(100000);
  for (int i = 0; i < 12; i++)
    close(fds[i]);
  http_resp r;
  usleep(100000);
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

/* ---- batching and concurrency ---- */

typedef struct client_arg {
  const daemon_proc *d;
  int idx, ok;
  char ids[5][64];
} client_arg;

static void *client_main(void *p) {
  client_arg *a = p;
  for (int k = 0; k < 5; k++) {
    char body[256];
    snprintf(body, sizeof body,
             "{\"class_label\": %d, \"seed\": %d, \"scheduler\": {\"name\": \"ddim\", \"steps\": "
             "25}}",
             (a->idx + k) % 6, 100 * a->idx + k);
    http_resp r;
    http_post(a->d, "/v1/jobs", body, &r);
    if (r.status != 202) {
      http_free(&r);
      return NULL;
    }
    json_t *j = json_loads(r.body, 0, NULL);
    snprintf(a->ids[k], sizeof a->ids[k], "%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
    http_free(&r);
  }
  a->ok = 1;
  return NULL;
}

START_TEST(concurrent_clients_and_batching) {
  char st[512];
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--batch-max-images", "16", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  /* a long job occupies the worker so the clients' jobs pile up and get batched */
  char blocker[64];
  submit_job(&d, LONG_JOB, blocker, sizeof blocker);
  wait_running(&d, blocker, 60);
  pthread_t th[8];
  static client_arg args_c[8];
  for (int i = 0; i < 8; i++) {
    args_c[i] = (client_arg){&d, i, 0, {{0}}};
    pthread_create(&th[i], NULL, client_main, &args_c[i]);
  }
  for (int i = 0; i < 8; i++)
    pthread_join(th[i], NULL);
  for (int i = 0; i < 8; i++)
    ck_assert_msg(args_c[i].ok, "client %d could not submit", i);
  char bpath[128];
  snprintf(bpath, sizeof bpath, "/v1/jobs/%s", blocker);
  http_resp rb;
  ck_assert_int_eq(http_req(&d, "DELETE", bpath, NULL, 0, NULL, &rb), 200); /* now they run */
  http_free(&rb);
  for (int i = 0; i < 8; i++)
    for (int k = 0; k < 5; k++) {
      wait_state(&d, args_c[i].ids[k], "succeeded", 120);
      for (int i2 = 0; i2 < 8; i2++) /* ids are unique */
        for (int k2 = 0; k2 < 5; k2++)
          ck_assert((i == i2 && k == k2) || strcmp(args_c[i].ids[k], args_c[i2].ids[k2]) != 0);
    }
  http_resp r;
  http_get(&d, "/metrics", &r);
  const char *bj = strstr(r.body, "\ndenoised_batched_jobs_total ");
  ck_assert_ptr_nonnull(bj);
  ck_assert_msg(atoi(bj + strlen("\ndenoised_batched_jobs_total ")) >= 16,
                "compatible queued jobs were not batched: %.60s", bj);
  http_free(&r);
  /* a batched image is the image the same request gives alone */
  uint8_t *batched[3], *alone[3];
  for (int k = 0; k < 3; k++)
    fetch_pixels(&d, args_c[k].ids[k], 0, &batched[k]);
  for (int k = 0; k < 3; k++) {
    char body[256], id[64];
    snprintf(body, sizeof body,
             "{\"class_label\": %d, \"seed\": %d, \"scheduler\": {\"name\": \"ddim\", \"steps\": "
             "25}}",
             (k + k) % 6, 100 * k + k);
    submit_job(&d, body, id, sizeof id);
    wait_state(&d, id, "succeeded", 60);
    fetch_pixels(&d, id, 0, &alone[k]);
    ck_assert_msg(memcmp(batched[k], alone[k], 32 * 32 * 3) == 0,
                  "image %d differs between batched and alone", k);
    free(batched[k]);
    free(alone[k]);
  }
  daemon_stop(&d);
}
END_TEST

/* Issue 13.1, poison jobs: requests that used to pass validation and make sampling non-finite
 * (a black PNG "succeeded", or an abort under UBSan) are refused before the 202 with the field
 * and its range. */
static void expect_range_error(const daemon_proc *d, const char *body, const char *field,
                               const char *range) {
  http_resp r;
  http_post(d, "/v1/jobs", body, &r);
  ck_assert_msg(r.status == 400, "%s: %ld %s", body, r.status, r.body ? r.body : "");
  json_t *j = http_json(&r), *e = json_object_get(j, "error");
  const char *f = json_string_value(json_object_get(e, "field"));
  const char *m = json_string_value(json_object_get(e, "message"));
  ck_assert_msg(f && strncmp(f, field, strlen(field)) == 0, "%s: field %s, wanted %s", body,
                f ? f : "null", field);
  ck_assert_msg(m && strstr(m, range), "%s: message '%s' lacks '%s'", body, m ? m : "", range);
  json_decref(j);
  http_free(&r);
}

START_TEST(poison_numerics_are_refused) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  expect_error(&d, "POST", "/v1/jobs",
               "{\"class_label\": 1, \"scheduler\": {\"name\": \"ddim\", \"options\": "
               "{\"eta\": 1e6}}}",
               400, "out_of_range", "scheduler.options.eta");
  expect_range_error(&d,
                     "{\"class_label\": 1, \"scheduler\": {\"name\": \"ddim\", \"options\": "
                     "{\"eta\": 1e6}}}",
                     "scheduler.options.eta", "[0, 1]");
  expect_range_error(&d,
                     "{\"class_label\": 1, \"scheduler\": {\"name\": \"ddim\", \"options\": "
                     "{\"beta_start\": 1.0, \"beta_end\": 1.0}}}",
                     "scheduler.options.beta_", "(0, 1)");
  /* each beta in range, together no signal left: refused naming the schedule */
  expect_range_error(&d,
                     "{\"class_label\": 1, \"scheduler\": {\"name\": \"euler\", \"options\": "
                     "{\"beta_start\": 0.5, \"beta_end\": 0.9}}}",
                     "scheduler.options", "alphas_cumprod");
  expect_range_error(&d,
                     "{\"class_label\": 1, \"scheduler\": {\"name\": \"dpm++2m\", \"options\": "
                     "{\"sample_max_value\": 1e30, \"thresholding\": true}}}",
                     "scheduler.options.sample_max_value", "(0, 1000000]");
  /* the A1111 route's eta too */
  http_resp r;
  http_post(&d, "/sdapi/v1/txt2img",
            "{\"prompt\": \"ring\", \"sampler_name\": \"DDIM\", \"steps\": 5, \"eta\": 1e6}", &r);
  ck_assert_msg(r.status == 400 || r.status == 422, "A1111 eta 1e6: %ld %s", r.status,
                r.body ? r.body : "");
  ck_assert_msg(r.body && strstr(r.body, "eta"), "%s", r.body ? r.body : "");
  http_free(&r);
  /* a number with no long long (the ASan build aborted on the cast: float-cast-overflow) */
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"steps\": 2.13e58}", 400,
               "out_of_range", "steps");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"seed\": -9.3e18}", 400,
               "out_of_range", "seed");
  expect_error(&d, "POST", "/sdapi/v1/txt2img", "{\"prompt\": \"ring\", \"steps\": 2.5}", 400,
               "wrong_type", "steps");
  /* in range still runs */
  char id[64];
  submit_job(&d,
             "{\"class_label\": 1, \"seed\": 3, \"scheduler\": {\"name\": \"ddim\", \"steps\": 5, "
             "\"options\": {\"eta\": 1.0}}}",
             id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  daemon_stop(&d);
}
END_TEST

/* Compute budgets: a job over max_job_cost is a 400 naming the limit before anything is
 * queued; unfinished jobs of one client over max_key_cost are a 429; a run longer than
 * max_job_seconds fails at a step boundary naming the limit, and the daemon goes on. */
START_TEST(compute_budgets) {
  char st[512], id[64], glyphs[1024], model_arg[1100];
  daemon_proc d;
  /* the glyph UNet as the default: its 1000 steps take seconds, the analytic model's ms */
  test_src_path(glyphs, sizeof glyphs, "models/glyphs32");
  snprintf(model_arg, sizeof model_arg, "default=%s", glyphs);
  const char *args[] = {"--workers",
                        "1",
                        "--max-job-cost",
                        "5",
                        "--max-key-cost",
                        "9",
                        "--max-job-seconds",
                        "1",
                        "--constant-time-max-nfe",
                        "400",
                        "--model",
                        model_arg,
                        NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  /* 8 images x 1000 evaluations x 32x32 = 8.2 megapixel-evaluations */
  expect_error(&d, "POST", "/v1/jobs", LONG_JOB, 400, "over_budget", NULL);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", LONG_JOB, &r), 400);
  ck_assert_ptr_nonnull(strstr(r.body, "max_job_cost"));
  ck_assert_ptr_nonnull(strstr(r.body, "1000 network evaluations"));
  http_free(&r);
  /* a data-dependent count is counted at its cap: 16 x 400 x 32x32 = 6.6 (it was 0) */
  const char *adaptive = "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 16, "
                         "\"scheduler\": {\"name\": \"dpm-solver-adaptive\", "
                         "\"options\": {\"thresholding\": false}}}";
  ck_assert_int_eq(http_post(&d, "/v1/jobs", adaptive, &r), 400);
  ck_assert_msg(strstr(r.body, "over_budget") && strstr(r.body, "400 network evaluations"), "%s",
                r.body);
  http_free(&r);
  /* 4 images x 1000 = 4.1 each: the first two fit under 9, the third does not */
  const char *mid = "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 4, \"guidance\": null, "
                    "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}";
  submit_job(&d, mid, id, sizeof id);
  char id2[64];
  submit_job(&d, mid, id2, sizeof id2);
  ck_assert_int_eq(http_post(&d, "/v1/jobs", mid, &r), 429);
  ck_assert_ptr_nonnull(strstr(r.body, "max_key_cost"));
  http_free(&r);
  /* 1000 DDPM steps of 4 images take longer than 1 s here: failed, naming the limit */
  wait_state(&d, id, "failed", 120);
  char path[128];
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  ck_assert_ptr_nonnull(strstr(r.body, "max_job_seconds"));
  http_free(&r);
  wait_state(&d, id2, "failed", 120);
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200); /* and the daemon goes on */
  http_free(&r);
  daemon_stop(&d);
  /* and the run is held to that cap, constant-time mode or not: past it, it fails naming it */
  const char *capped[] = {"--constant-time-max-nfe", "3", "--model", model_arg, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), capped), 0);
  submit_job(&d,
             "{\"class_label\": 0, \"seed\": 5, \"guidance\": null, \"scheduler\": {\"name\": "
             "\"dpm-solver-adaptive\", "
             "\"options\": {\"thresholding\": false}}}",
             id, sizeof id);
  wait_state(&d, id, "failed", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  ck_assert_msg(strstr(r.body, "constant_time_max_nfe"), "%s", r.body);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("server");
  TCase *tc = tcase_create("server");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, service_endpoints);
  tcase_add_test(tc, submit_fetch_and_list);
  tcase_add_test(tc, request_validation);
  tcase_add_test(tc, events_order_and_resume);
  tcase_add_test(tc, cancel_queued_and_running);
  tcase_add_test(tc, backpressure_429);
  tcase_add_test(tc, auth_and_scopes);
  tcase_add_test(tc, generate_and_a1111);
  tcase_add_test(tc, cors_allow_list);
  tcase_add_test(tc, slow_clients_are_cut);
  tcase_add_test(tc, concurrent_clients_and_batching);
  tcase_add_test(tc, guided_jobs);
  tcase_add_test(tc, classifier_guided_jobs);
  tcase_add_test(tc, poison_numerics_are_refused);
  tcase_add_test(tc, compute_budgets);
  suite_add_tcase(s, tc);
  return s;
}
