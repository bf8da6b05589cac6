/* AdjointDPM's tasks through the daemon. Concept jobs (edit.type concept): a short run learns
 * the row, saves it beside the model, and later jobs take it by name; progress counts the
 * optimisation's steps; a running one is cancelled; every bad field is a clear 400 or 409 at
 * submission. Audit jobs (edit.type audit): the report equals the CLI's, noise and images are
 * stored, bad fields are 400s. Stylize jobs register the model they make, which later jobs
 * and a restart serve. */
#include <sys/stat.h>
#include <unistd.h>

#include "testhttp.h"

/* A folder that is the default model (its files linked), so the job writes its embeddings/
 * there and not beside the repository's model. */
static void glyph_copy(char *dir, size_t n) {
  char src[1024], dst[1200], rel[256];
  ck_assert_ptr_nonnull(test_tmpdir(dir, n));
  const char *files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                         "scheduler_config.json", "classifier"};
  for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
    snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
    snprintf(rel, sizeof rel, "models/glyphs32/%s", files[i]);
    char *real = realpath(test_src_path(src, sizeof src, rel), NULL);
    ck_assert_int_eq(symlink(real, dst), 0);
    free(real);
  }
}

#define CONCEPT_JOB(extra)                                                                         \
  "{\"model\": \"glyphs\", \"seed\": 3, \"batch_size\": 2, \"scheduler\": {\"name\": "             \
  "\"dpm++2m\", \"steps\": 2}, \"edit\": {\"type\": \"concept\", \"target\": \"K\", " extra "}}"

static int has_label(const daemon_proc *d, const char *model, const char *name) {
  http_resp r;
  ck_assert_int_eq(http_get(d, "/v1/models", &r), 200);
  json_t *j = http_json(&r), *m;
  size_t i, k;
  int found = 0;
  json_array_foreach(json_object_get(j, "models"), i, m) {
    if (strcmp(json_string_value(json_object_get(m, "name")), model) != 0)
      continue;
    json_t *l;
    json_array_foreach(json_object_get(m, "class_labels"), k, l) found |=
        json_is_string(l) && strcmp(json_string_value(l), name) == 0;
  }
  json_decref(j);
  http_free(&r);
  return found;
}

START_TEST(concept_jobs) {
  char st[512], dir[64], gm[300], um[1200], src[1024], path[1300];
  glyph_copy(dir, sizeof dir);
  snprintf(gm, sizeof gm, "glyphs=%s", dir);
  snprintf(um, sizeof um, "gmm=%s", test_src_path(src, sizeof src, "models/shapes-gmm"));
  const char *args[] = {"--model", gm, "--model", um, "--workers", "1", NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  ck_assert(!has_label(&d, "glyphs", "myK"));

  char id[64];
  submit_job(&d, CONCEPT_JOB("\"name\": \"myK\", \"steps\": 3, \"batch\": 2"), id, sizeof id);
  wait_state(&d, id, "succeeded", 300);
  snprintf(path, sizeof path, "%s/embeddings/myK.safetensors", dir);
  ck_assert_msg(access(path, F_OK) == 0, "no %s", path);
  ck_assert(has_label(&d, "glyphs", "myK"));
  /* the echo and the images */
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r), *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "concept");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "target")), "char=K");
  ck_assert_int_eq(json_array_size(json_object_get(j, "images")), 2);
  json_decref(j);
  http_free(&r);
  /* a later job takes it by name */
  char id2[64];
  submit_job(&d,
             "{\"model\": \"glyphs\", \"class_label\": \"myK\", \"seed\": 1, \"scheduler\": "
             "{\"name\": \"ddim\", \"steps\": 2}}",
             id2, sizeof id2);
  wait_state(&d, id2, "succeeded", 60);

  /* refusals at submission */
  expect_error(&d, "POST", "/v1/jobs", CONCEPT_JOB("\"name\": \"myK\""), 409, "conflict",
               "edit.name");
  expect_error(&d, "POST", "/v1/jobs", CONCEPT_JOB("\"name\": \"K\""), 409, "conflict",
               "edit.name");
  expect_error(&d, "POST", "/v1/jobs", CONCEPT_JOB("\"name\": \"12\""), 400, "invalid_field",
               "edit.name");
  expect_error(&d, "POST", "/v1/jobs", CONCEPT_JOB("\"name\": \"zz\", \"lr\": 0"), 400,
               "out_of_range", "edit.lr");
  expect_error(&d, "POST", "/v1/jobs", CONCEPT_JOB("\"name\": \"zz\", \"nope\": 1"), 400,
               "unknown_field", "edit.nope");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"glyphs\", \"edit\": {\"type\": \"concept\", \"target\": \"nope\", "
               "\"name\": \"zz\"}}",
               400, "invalid_field", "edit.target");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"glyphs\", \"edit\": {\"type\": \"concept\", \"name\": \"zz\"}}", 400,
               "missing_field", "edit.target");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"gmm\", \"edit\": {\"type\": \"concept\", \"target\": \"K\", "
               "\"name\": \"zz\"}}",
               400, "invalid_field", "edit.type");

  /* cancelled while it optimises: stops at the next evaluation, nothing saved */
  submit_job(&d, CONCEPT_JOB("\"name\": \"long\", \"steps\": 2000, \"batch\": 4"), id, sizeof id);
  wait_running(&d, id, 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  /* its progress counts the optimisation's steps */
  long total = 0;
  for (double t0 = th_now(); total != 2000 && th_now() - t0 < 60; usleep(50000)) {
    ck_assert_int_eq(http_get(&d, path, &r), 200);
    j = http_json(&r);
    json_t *p = json_object_get(j, "progress");
    total = json_integer_value(json_object_get(p, "step")) > 0
                ? (long)json_integer_value(json_object_get(p, "total"))
                : 0;
    json_decref(j);
    http_free(&r);
  }
  ck_assert_int_eq(total, 2000);
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  http_free(&r);
  wait_state(&d, id, "cancelled", 60);
  snprintf(path, sizeof path, "%s/embeddings/long.safetensors", dir);
  ck_assert_int_ne(access(path, F_OK), 0);
  daemon_stop(&d);
}
END_TEST

#define AUDIT_JOB(edit)                                                                            \
  "{\"model\": \"glyphs\", \"class_label\": \"A\", \"seed\": 0, \"batch_size\": 2, "               \
  "\"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 3}, \"edit\": {\"type\": \"audit\"" edit "}}"

/* An audit job's report equals `denoised audit` with the same settings; its noise and images
 * are there; bad fields are 400s. */
START_TEST(audit_jobs) {
  char st[512], gm[1200], um[1200], src[1024], path[256];
  snprintf(gm, sizeof gm, "glyphs=%s", test_src_path(src, sizeof src, "models/glyphs32"));
  snprintf(um, sizeof um, "gmm=%s", test_src_path(src, sizeof src, "models/shapes-gmm"));
  const char *args[] = {"--model", gm, "--model", um, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  char id[64];
  submit_job(&d, AUDIT_JOB(", \"eps\": [0.1], \"iters\": 1, \"random\": 1"), id, sizeof id);
  wait_state(&d, id, "succeeded", 300);
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s/report.json", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *rep = http_json(&r);
  http_free(&r);
  const json_t *box = json_array_get(json_object_get(rep, "boxes"), 0);
  ck_assert_msg(box && json_number_value(json_object_get(box, "eps")) == 0.1, "no box");
  char want[256], out[8192];
  int rc = test_run_cli(out, sizeof out,
                        "audit --model %s --class A --batch 2 --iters 1 --eps 0.1 --random 1 "
                        "--steps 3 --quiet",
                        test_src_path(src, sizeof src, "models/glyphs32"));
  ck_assert_msg(rc == 0, "%s", out);
  snprintf(want, sizeof want, "clean: %lld of 2 ",
           (long long)json_integer_value(json_object_get(rep, "clean")));
  ck_assert_msg(strstr(out, want), "report %s; CLI: %s", want, out);
  snprintf(want, sizeof want, "eps 0.1: adversarial %lld of %lld ",
           (long long)json_integer_value(json_object_get(box, "adversarial")),
           (long long)json_integer_value(json_object_get(rep, "clean")));
  ck_assert_msg(strstr(out, want), "report %s; CLI: %s", want, out);
  json_decref(rep);
  snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  http_free(&r);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/1", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  http_free(&r);
  /* a plain job has no report */
  char plain[64];
  submit_job(&d,
             "{\"model\": \"glyphs\", \"class_label\": 1, \"scheduler\": {\"name\": \"ddim\", "
             "\"steps\": 2}}",
             plain, sizeof plain);
  wait_state(&d, plain, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/report.json", plain);
  expect_error(&d, "GET", path, NULL, 404, "not_found", NULL);

  expect_error(&d, "POST", "/v1/jobs", AUDIT_JOB(", \"eps\": [3]"), 400, "out_of_range",
               "edit.eps");
  expect_error(&d, "POST", "/v1/jobs", AUDIT_JOB(", \"eps\": []"), 400, "invalid_field",
               "edit.eps");
  expect_error(&d, "POST", "/v1/jobs", AUDIT_JOB(", \"iters\": 0"), 400, "out_of_range",
               "edit.iters");
  expect_error(&d, "POST", "/v1/jobs", AUDIT_JOB(", \"target\": \"nope\""), 400, "invalid_field",
               "edit.target");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"gmm\", \"class_label\": 0, \"edit\": {\"type\": \"audit\"}}", 400,
               "invalid_field", "edit.type");
  daemon_stop(&d);
}
END_TEST

#define STYLIZE_JOB(edit)                                                                          \
  "{\"model\": \"glyphs\", \"class_label\": \"B\", \"seed\": 2, \"batch_size\": 1, "               \
  "\"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 2}, \"edit\": {\"type\": \"stylize\"" edit    \
  "}}"

/* A stylize job registers its model under the name given: later jobs use it, it survives a
 * restart; bad fields are 400s, a taken name 409. */
START_TEST(stylize_jobs) {
  char st[512], gm[1200], um[1200], src[1024];
  snprintf(gm, sizeof gm, "glyphs=%s", test_src_path(src, sizeof src, "models/glyphs32"));
  snprintf(um, sizeof um, "gmm=%s", test_src_path(src, sizeof src, "models/shapes-gmm"));
  const char *args[] = {"--model", gm, "--model", um, NULL};
  th_state_dir(st, sizeof st);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  char id[64];
  submit_job(
      &d,
      STYLIZE_JOB(", \"target\": \"italic\", \"name\": \"glyphs-it\", \"steps\": 1, \"batch\": 2"),
      id, sizeof id);
  wait_state(&d, id, "succeeded", 300);
  ck_assert(th_serves_model(&d, "glyphs-it"));
  char id2[64];
  submit_job(&d,
             "{\"model\": \"glyphs-it\", \"class_label\": \"K\", \"scheduler\": {\"name\": "
             "\"ddim\", \"steps\": 2}}",
             id2, sizeof id2);
  wait_state(&d, id2, "succeeded", 60);
  expect_error(&d, "POST", "/v1/jobs",
               STYLIZE_JOB(", \"target\": \"italic\", \"name\": \"glyphs-it\""), 409, "conflict",
               "edit.name");
  expect_error(&d, "POST", "/v1/jobs", STYLIZE_JOB(", \"target\": \"K\", \"name\": \"x2\""), 400,
               "invalid_field", "edit.target");
  expect_error(&d, "POST", "/v1/jobs",
               STYLIZE_JOB(", \"target\": \"italic\", \"keep\": \"nope\", \"name\": \"x2\""), 400,
               "invalid_field", "edit.keep");
  expect_error(&d, "POST", "/v1/jobs", STYLIZE_JOB(", \"target\": \"nope\", \"name\": \"x2\""), 400,
               "invalid_field", "edit.target");
  expect_error(&d, "POST", "/v1/jobs", STYLIZE_JOB(", \"target\": \"italic\", \"name\": \"../x\""),
               400, "invalid_field", "edit.name");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"model\": \"gmm\", \"class_label\": 0, \"edit\": {\"type\": \"stylize\", "
               "\"target\": \"italic\", \"name\": \"x2\"}}",
               400, "invalid_field", "edit.type");
  daemon_stop(&d);
  /* a restart serves it again */
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  ck_assert(th_serves_model(&d, "glyphs-it"));
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("server_concept");
  TCase *tc = tcase_create("server_concept");
  tcase_add_test(tc, concept_jobs);
  tcase_add_test(tc, audit_jobs);
  tcase_add_test(tc, stylize_jobs);
  suite_add_tcase(s, tc);
  return s;
}
