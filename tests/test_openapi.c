/* openapi.yaml against a real OpenAPI 3.1 validator from npm (tools/openapi, installed by
 * scripts/install-deps.sh --openapi), and real daemon responses against its schemas. Skipped
 * only when npm itself is missing. */
#include "base64.h"
#include "image.h"
#include "testhttp.h"

#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

/* 1: ready; 0: npm missing (skip); fails the test when npm is there but the modules are not. */
static int tools_ready(char *script, size_t n) {
  if (system("command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1") != 0) {
    fprintf(stderr, "test_openapi: SKIPPED: npm/node not installed\n");
    return 0;
  }
  char mods[1024];
  test_src_path(mods, sizeof mods, "tools/openapi/node_modules/@apidevtools/swagger-parser");
  ck_assert_msg(access(mods, F_OK) == 0,
                "npm is installed but the validator is not: run scripts/install-deps.sh --openapi");
  test_src_path(script, n, "tools/openapi/check.mjs");
  return 1;
}

static int run_check(const char *script, const char *spec, const char *responses, char *out,
                     size_t n) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd, "node %s %s %s 2>&1", script, spec, responses ? responses : "");
  FILE *p = popen(cmd, "r");
  size_t k = fread(out, 1, n - 1, p);
  out[k] = 0;
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

START_TEST(spec_is_valid_openapi_31) {
  char script[1024], spec[1024], out[8192], tmp[256], bad[512];
  if (!tools_ready(script, sizeof script))
    return;
  test_src_path(spec, sizeof spec, "openapi.yaml");
  ck_assert_msg(run_check(script, spec, NULL, out, sizeof out) == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "valid OpenAPI 3.1"));
  /* and the validator is not a rubber stamp */
  test_tmpdir(tmp, sizeof tmp);
  snprintf(bad, sizeof bad, "%s/bad.yaml", tmp);
  FILE *in = fopen(spec, "r"), *o = fopen(bad, "w");
  char line[1024];
  while (fgets(line, sizeof line, in)) {
    fputs(line, o);
    if (strstr(line, "operationId: healthz"))
      fputs("      bogusField: 1\n", o);
  }
  fclose(in);
  fclose(o);
  ck_assert_int_ne(run_check(script, bad, NULL, out, sizeof out), 0);
}
END_TEST

static FILE *rec;

/* One request, recorded for the schema check. */
static long call(const daemon_proc *d, const char *method, const char *path, const char *body,
                 const char *const *hdrs, http_resp *r) {
  http_req(d, method, path, body, body ? strlen(body) : 0, hdrs, r);
  json_t *h = json_object();
  const char *names[] = {"Location", "Retry-After", "WWW-Authenticate"};
  char v[512];
  for (int i = 0; i < 3; i++)
    if (http_header(r, names[i], v, sizeof v))
      json_object_set_new(h, names[i], json_string(v));
  /* JSON, metrics, event streams; not images or .npy */
  int text = strncmp(r->ctype, "image/", 6) != 0 && strstr(r->ctype, "octet-stream") == NULL;
  json_t *j = json_pack("{s:s, s:s, s:i, s:s, s:o, s:s}", "method", method, "path", path, "status",
                        (int)r->status, "content_type", r->ctype, "headers", h, "body",
                        text && r->body ? r->body : "");
  char *s = json_dumps(j, JSON_COMPACT);
  fprintf(rec, "%s\n", s);
  free(s);
  json_decref(j);
  return r->status;
}

START_TEST(responses_match_the_spec) {
  char script[1024], spec[1024], out[65536], tmp[256], file[512], st[512];
  if (!tools_ready(script, sizeof script))
    return;
  test_src_path(spec, sizeof spec, "openapi.yaml");
  test_tmpdir(tmp, sizeof tmp);
  snprintf(file, sizeof file, "%s/responses.jsonl", tmp);
  rec = fopen(file, "w");
  daemon_proc d;
  const char *args[] = {"--workers", "1", "--queue-max", "2", "--max-body-bytes", "2048", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  const char *gets[] = {"/healthz",
                        "/readyz",
                        "/metrics",
                        "/v1/models",
                        "/v1/capabilities",
                        "/v1/jobs",
                        "/v1/jobs?limit=1",
                        "/sdapi/v1/samplers",
                        "/sdapi/v1/sd-models",
                        "/sdapi/v1/progress",
                        "/sdapi/v1/options",
                        "/v1/jobs?limit=500",
                        "/v1/jobs?limit=%205",
                        "/v1/jobs/0123456789abcdef01234567",
                        "/docs",
                        "/openapi.yaml",
                        "/ui/docs.js",
                        "/ui/nope.js"};
  for (size_t i = 0; i < sizeof gets / sizeof *gets; i++) {
    call(&d, "GET", gets[i], NULL, NULL, &r);
    http_free(&r);
  }
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs", SMALL_JOB, NULL, &r), 202);
  json_t *j = http_json(&r);
  char id[64], path[256];
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
  json_decref(j);
  http_free(&r);
  wait_state(&d, id, "succeeded", 60);
  const char *fmts[] = {
      "/v1/jobs/%s",        "/v1/jobs/%s/images/0",     "/v1/jobs/%s/images/5",
      "/v1/jobs/%s/events", "/v1/jobs/%s/images/%%2B0", "/v1/jobs/%s/events?last_event_id=01"};
  for (int i = 0; i < 6; i++) {
    snprintf(path, sizeof path, fmts[i], id);
    call(&d, "GET", path, NULL, NULL, &r);
    http_free(&r);
  }
  /* a URL token (null without keys), and an EventSource's reconnect after the final event */
  snprintf(path, sizeof path, "/v1/jobs/%s/token?ttl=60", id);
  ck_assert_int_eq(call(&d, "POST", path, "", NULL, &r), 200);
  http_free(&r);
  snprintf(path, sizeof path, "/v1/jobs/%s/events?last_event_id=999999", id);
  ck_assert_int_eq(call(&d, "GET", path, NULL, NULL, &r), 204);
  http_free(&r);
  char pid[64];
  submit_job(&d,
             "{\"class_label\": 4, \"seed\": 8, \"scheduler\": {\"name\": \"ddim\", \"steps\": "
             "10}, \"preview\": {\"every\": 5}}",
             pid, sizeof pid);
  wait_state(&d, pid, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/events", pid);
  call(&d, "GET", path, NULL, NULL, &r);
  ck_assert_ptr_nonnull(strstr(r.body, "\"preview\":\"data:image/png;base64,"));
  http_free(&r);
  /* guidance and an img2img edit, as the job views show them */
  {
    uint8_t px[32 * 32 * 3], *png = NULL;
    for (size_t i = 0; i < sizeof px; i++)
      px[i] = (uint8_t)(i % 96 < 48 ? 200 : 40);
    size_t plen = 0;
    err e;
    ck_assert_int_eq(image_png_encode(px, 3, 32, 32, NULL, 0, &png, &plen, &e), 0);
    char *b64 = base64_encode(png, plen);
    char body[2048], eid[64];
    snprintf(body, sizeof body,
             "{\"class_label\": 2, \"seed\": 9, \"scheduler\": {\"name\": \"ddim\", "
             "\"steps\": 10}, \"guidance\": {\"scale\": 2}, \"input_image\": \"%s\", "
             "\"edit\": {\"type\": \"img2img\", \"strength\": 0.5}}",
             b64);
    ck_assert_int_eq(call(&d, "POST", "/v1/jobs", body, NULL, &r), 202);
    json_t *ej = http_json(&r);
    snprintf(eid, sizeof eid, "%s", json_string_value(json_object_get(ej, "id")));
    json_decref(ej);
    http_free(&r);
    wait_state(&d, eid, "succeeded", 60);
    snprintf(path, sizeof path, "/v1/jobs/%s", eid);
    call(&d, "GET", path, NULL, NULL, &r);
    ck_assert_ptr_nonnull(strstr(r.body, "\"edit\":{"));
    ck_assert_ptr_nonnull(strstr(r.body, "\"guidance\":{"));
    http_free(&r);
    ck_assert_int_eq(call(&d, "POST", "/v1/jobs",
                          "{\"class_label\": 1, \"edit\": {\"type\": \"img2img\"}, "
                          "\"input_image\": \"iVBORw0KGgo=\"}",
                          NULL, &r),
                     400);
    http_free(&r);
    /* an inversion: its view with the noise link, the noise itself, and a class change */
    snprintf(body, sizeof body,
             "{\"class_label\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": 8}, "
             "\"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\"}}",
             b64);
    ck_assert_int_eq(call(&d, "POST", "/v1/jobs", body, NULL, &r), 202);
    ej = http_json(&r);
    snprintf(eid, sizeof eid, "%s", json_string_value(json_object_get(ej, "id")));
    json_decref(ej);
    http_free(&r);
    wait_state(&d, eid, "succeeded", 60);
    snprintf(path, sizeof path, "/v1/jobs/%s", eid);
    call(&d, "GET", path, NULL, NULL, &r);
    ck_assert_ptr_nonnull(strstr(r.body, "/noise.npy\""));
    http_free(&r);
    snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", eid);
    ck_assert_int_eq(call(&d, "GET", path, NULL, NULL, &r), 200);
    http_free(&r);
    snprintf(body, sizeof body,
             "{\"class_label\": 3, \"scheduler\": {\"name\": \"ddim\", \"steps\": 8}, "
             "\"edit\": {\"type\": \"invert_ddpm\", \"noise_from\": \"%s\", \"skip\": 2}}",
             eid);
    ck_assert_int_eq(call(&d, "POST", "/v1/jobs", body, NULL, &r), 202);
    ej = http_json(&r);
    snprintf(eid, sizeof eid, "%s", json_string_value(json_object_get(ej, "id")));
    json_decref(ej);
    http_free(&r);
    wait_state(&d, eid, "succeeded", 60);
    snprintf(path, sizeof path, "/v1/jobs/%s", eid);
    call(&d, "GET", path, NULL, NULL, &r);
    http_free(&r);
    snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", eid);
    ck_assert_int_eq(call(&d, "GET", path, NULL, NULL, &r), 404);
    http_free(&r);
    free(b64);
    free(png);
  }
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(call(&d, "DELETE", path, NULL, NULL, &r), 409);
  http_free(&r);
  const char *bodies[] = {"{\"class_label\": 1, \"nope\": 1}", "{bad json",
                          "{\"class_label\": 1, \"scheduler\": {\"options\": {\"eta\": -1}}}"};
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(call(&d, "POST", "/v1/jobs", bodies[i], NULL, &r), 400);
    http_free(&r);
  }
  char big[4096];
  memset(big, ' ', sizeof big - 1);
  big[sizeof big - 1] = 0;
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs", big, NULL, &r), 413);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/v1/generate", SMALL_JOB, NULL, &r), 200);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/sdapi/v1/txt2img",
                        "{\"prompt\": \"disc\", \"steps\": 5, \"sampler_name\": \"DDIM\"}", NULL,
                        &r),
                   200);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/sdapi/v1/interrupt", "{}", NULL, &r), 200);
  http_free(&r);
  ck_assert_int_eq(
      call(&d, "POST", "/sdapi/v1/options", "{\"sd_model_checkpoint\": \"default\"}", NULL, &r),
      200);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/sdapi/v1/png-info", "{\"image\": \"aGVsbG8=\"}", NULL, &r),
                   400);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/sdapi/v1/img2img", "{\"prompt\": \"disc\"}", NULL, &r), 400);
  http_free(&r);
  /* 429: one running, two queued */
  const char *longjob = "{\"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "
                        "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}";
  char ids[3][64];
  for (int i = 0; i < 3; i++) {
    submit_job(&d, longjob, ids[i], sizeof ids[i]);
    if (i == 0)
      wait_running(&d, ids[0], 60);
  }
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs", longjob, NULL, &r), 429);
  http_free(&r);
  call(&d, "GET", "/readyz", NULL, NULL, &r);
  http_free(&r);
  call(&d, "GET", "/sdapi/v1/progress", NULL, NULL, &r);
  http_free(&r);
  for (int i = 0; i < 3; i++) {
    snprintf(path, sizeof path, "/v1/jobs/%s", ids[i]);
    ck_assert_int_eq(call(&d, "DELETE", path, NULL, NULL, &r), 200);
    http_free(&r);
  }
  daemon_stop(&d);
  /* and with keys: 401, 403 */
  char keys[512];
  snprintf(keys, sizeof keys, "%s/keys", tmp);
  FILE *f = fopen(keys, "w");
  fprintf(f, "reader reader-key-0123456789abcdef read\n");
  fclose(f);
  chmod(keys, 0600);
  const char *kargs[] = {"--api-keys-file", keys, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), kargs), 0);
  ck_assert_int_eq(call(&d, "GET", "/v1/jobs", NULL, NULL, &r), 401);
  http_free(&r);
  const char *reader[] = {"Authorization: Bearer reader-key-0123456789abcdef", NULL};
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs", SMALL_JOB, reader, &r), 403);
  http_free(&r);
  ck_assert_int_eq(
      call(&d, "GET", "/v1/jobs/0123456789abcdef01234567/images/0?token=1.00", NULL, NULL, &r),
      401);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs/0123456789abcdef01234567/token", "", reader, &r),
                   404);
  http_free(&r);
  daemon_stop(&d);
  /* a text-to-image pipeline beside it: its model entry, a prompt job's view, A1111 prompts */
  char m1[1100], m2[1100], p1[1024];
  snprintf(m1, sizeof m1, "default=%s", test_src_path(p1, sizeof p1, "models/shapes-gmm"));
  snprintf(m2, sizeof m2, "sd=%s", test_src_path(p1, sizeof p1, "tests/fixtures/sd_pipeline/tiny"));
  const char *sargs[] = {"--model", m1, "--model", m2, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), sargs), 0);
  call(&d, "GET", "/v1/models", NULL, NULL, &r);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs",
                        "{\"model\": \"sd\", \"prompt\": \"a cat\", \"negative_prompt\": "
                        "\"blurry\", \"clip_skip\": 2, \"scheduler\": {\"name\": \"ddim\", "
                        "\"steps\": 3}}",
                        NULL, &r),
                   202);
  json_t *tj = http_json(&r);
  snprintf(id, sizeof id, "%s", json_string_value(json_object_get(tj, "id")));
  json_decref(tj);
  http_free(&r);
  wait_state(&d, id, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  call(&d, "GET", path, NULL, NULL, &r);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/v1/jobs",
                        "{\"model\": \"sd\", \"prompt\": \"a\", "
                        "\"clip_skip\": 9}",
                        NULL, &r),
                   400);
  http_free(&r);
  ck_assert_int_eq(
      call(&d, "POST", "/sdapi/v1/options", "{\"CLIP_stop_at_last_layers\": 2}", NULL, &r), 200);
  http_free(&r);
  call(&d, "GET", "/sdapi/v1/options", NULL, NULL, &r);
  http_free(&r);
  ck_assert_int_eq(call(&d, "POST", "/sdapi/v1/txt2img",
                        "{\"prompt\": \"a cat\", \"negative_prompt\": \"blurry\", \"steps\": 3, "
                        "\"override_settings\": {\"sd_model_checkpoint\": \"sd\"}}",
                        NULL, &r),
                   200);
  http_free(&r);
  daemon_stop(&d);
  fclose(rec);
  ck_assert_msg(run_check(script, spec, file, out, sizeof out) == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "0 failures"));
  /* a response off the spec is caught */
  snprintf(path, sizeof path, "%s/off.jsonl", tmp);
  f = fopen(path, "w");
  fprintf(
      f, "{\"method\":\"GET\",\"path\":\"/v1/models\",\"status\":200,\"content_type\":"
         "\"application/json\",\"headers\":{},\"body\":\"{\\\"models\\\":[{\\\"name\\\":1}]}\"}\n");
  fclose(f);
  ck_assert_int_ne(run_check(script, spec, path, out, sizeof out), 0);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("openapi");
  TCase *tc = tcase_create("openapi");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, spec_is_valid_openapi_31);
  tcase_add_test(tc, responses_match_the_spec);
  suite_add_tcase(s, tc);
  return s;
}
