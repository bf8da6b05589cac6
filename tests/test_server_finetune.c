/* Few-shot fine-tuning through the daemon (edit.type finetune, issue 17 item 4): a short
 * DomainStudio run and a plain one on the tiny training fixture register their models, which
 * later jobs sample and a restart serves again; the progress counts the training steps; a
 * running one is cancelled and registers nothing; bad fields are 400s (409 for a taken name)
 * naming the field. A daemon killed while it publishes a model (the test-only fault hook aborts
 * between writing the folder and registering it) runs the job again after a restart and
 * registers the model; a job over the server's budget is refused naming its fields. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testhttp.h"

#include <sys/stat.h>

/* A base64 PNG of c x size x size, different for each i. */
static char *shot_b64(int i, int c, int size) {
  uint8_t px[3 * 16 * 16], *png = NULL;
  size_t len = 0;
  for (int k = 0; k < c * size * size; k++)
    px[k] = (uint8_t)((k * (7 + i)) % 251);
  err e = {0};
  ck_assert_msg(image_png_encode(px, c, size, size, NULL, 0, &png, &len, &e) == 0, "%s", e.msg);
  char *b = base64_encode(png, len);
  free(png);
  return b;
}

/* A finetune job body: n shots of c x size x size (labels 0.. when label), the edit's other
 * fields in extra. */
static char *ft_job(const char *model, int n, int c, int size, int label, const char *extra) {
  json_t *imgs = json_array();
  for (int i = 0; i < n; i++) {
    char *b = shot_b64(i, c, size);
    json_t *it = json_pack("{s:s}", "image", b);
    if (label)
      json_object_set_new(it, "label", json_integer(i % 4));
    json_array_append_new(imgs, it);
    free(b);
  }
  char edit[512];
  snprintf(edit, sizeof edit, "{\"type\": \"finetune\"%s}", extra);
  json_t *ed = json_loads(edit, 0, NULL);
  ck_assert_ptr_nonnull(ed);
  json_object_set_new(ed, "images", imgs);
  json_t *j =
      json_pack("{s:s, s:i, s:i, s:i, s:{s:s, s:i}, s:o}", "model", model, "seed", 5, "batch_size",
                1, "class_label", 1, "scheduler", "name", "ddim", "steps", 2, "edit", ed);
  char *s = json_dumps(j, 0);
  json_decref(j);
  return s;
}

/* A sample of class 2 from the model (seed 1): its PNG, malloc'ed. */
static char *sample_from(const daemon_proc *d, const char *model, size_t *len) {
  char body[256], id[64], path[128];
  snprintf(body, sizeof body,
           "{\"model\": \"%s\", \"class_label\": 2, \"seed\": 1, \"scheduler\": {\"name\": "
           "\"ddim\", \"steps\": 2}}",
           model);
  submit_job(d, body, id, sizeof id);
  wait_state(d, id, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  char *png = malloc(r.len);
  memcpy(png, r.body, r.len);
  *len = r.len;
  http_free(&r);
  return png;
}

/* Whether two PNGs hold the same pixels (their metadata names their jobs). */
static int same_pixels(const char *a, size_t na, const char *b, size_t nb) {
  uint8_t *pa = NULL, *pb = NULL;
  int ha, wa, hb, wb;
  err e = {0};
  ck_assert_int_eq(image_png_decode((const uint8_t *)a, na, 64, 64, &pa, &ha, &wa, &e), 0);
  ck_assert_int_eq(image_png_decode((const uint8_t *)b, nb, 64, 64, &pb, &hb, &wb, &e), 0);
  const int same = ha == hb && wa == wb && memcmp(pa, pb, (size_t)ha * wa * 3) == 0;
  free(pa), free(pb);
  return same;
}

/* A refusal: the body (freed) answered with status, code and field. */
static void refused(const daemon_proc *d, char *body, long status, const char *code,
                    const char *field) {
  expect_error(d, "POST", "/v1/jobs", body, status, code, field);
  free(body);
}

START_TEST(finetune_jobs) {
  char st[512], tm[1200], um[1200], src[1024], path[256];
  snprintf(tm, sizeof tm, "tiny=%s", test_src_path(src, sizeof src, "tests/fixtures/train/model"));
  snprintf(um, sizeof um, "gmm=%s", test_src_path(src, sizeof src, "models/shapes-gmm"));
  const char *args[] = {"--model", tm, "--model", um, "--workers", "1", NULL};
  th_state_dir(st, sizeof st);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, st, args), 0);

  /* DomainStudio, then plain fine-tuning */
  char id[64], *body = ft_job("tiny", 4, 3, 8, 1,
                              ", \"name\": \"tiny-ds\", \"method\": \"domainstudio\", "
                              "\"steps\": 3, \"lr\": 0.01");
  submit_job(&d, body, id, sizeof id);
  free(body);
  wait_state(&d, id, "succeeded", 120);
  ck_assert(th_serves_model(&d, "tiny-ds"));
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r), *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "finetune");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "method")), "domainstudio");
  ck_assert_int_eq(json_integer_value(json_object_get(ed, "images")), 4); /* their count */
  ck_assert_int_eq(json_array_size(json_object_get(j, "images")), 1);
  json_decref(j);
  http_free(&r);
  /* the adapted model draws another picture than its source from the same noise */
  size_t n0, n1;
  char *p0 = sample_from(&d, "tiny", &n0), *p1 = sample_from(&d, "tiny-ds", &n1);
  ck_assert(!same_pixels(p0, n0, p1, n1));
  free(p0);
  body = ft_job("tiny", 1, 3, 8, 1,
                ", \"name\": \"tiny-plain\", \"method\": \"plain\", "
                "\"steps\": 2, \"batch\": 1");
  submit_job(&d, body, id, sizeof id);
  free(body);
  wait_state(&d, id, "succeeded", 120);
  free(sample_from(&d, "tiny-plain", &n0));

  /* cancelled while it trains: its progress counts the training steps; nothing registered */
  body = ft_job("tiny", 3, 3, 8, 1,
                ", \"name\": \"tiny-long\", \"method\": \"domainstudio\", \"steps\": 20000");
  submit_job(&d, body, id, sizeof id);
  free(body);
  wait_running(&d, id, 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  j = http_json(&r);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "total")),
                   20000);
  json_decref(j);
  http_free(&r);
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  http_free(&r);
  wait_state(&d, id, "cancelled", 60);
  ck_assert(!th_serves_model(&d, "tiny-long"));

  /* refusals at submission, each naming its field */
  const char *ds = ", \"name\": \"x2\", \"method\": \"domainstudio\", \"steps\": 2";
  refused(&d, ft_job("tiny", 2, 3, 8, 1, ds), 400, "invalid_field", "edit.images");
  refused(&d, ft_job("tiny", 3, 3, 16, 1, ds), 400, "invalid_field", "edit.images[0].image");
  refused(&d, ft_job("tiny", 3, 1, 8, 1, ds), 400, "invalid_field", "edit.images[0].image");
  refused(&d, ft_job("tiny", 3, 3, 8, 0, ds), 400, "missing_field", "edit.images[0].label");
  refused(&d, ft_job("gmm", 3, 3, 8, 1, ds), 400, "invalid_field", "model");
  refused(&d,
          ft_job("tiny", 3, 3, 8, 1,
                 ", \"name\": \"tiny-ds\", \"method\": \"domainstudio\", \"steps\": 2"),
          409, "conflict", "edit.name");
  refused(&d,
          ft_job("tiny", 3, 3, 8, 1,
                 ", \"name\": \"../x\", \"method\": \"domainstudio\", \"steps\": 2"),
          400, "invalid_field", "edit.name");
  refused(&d, ft_job("tiny", 3, 3, 8, 1, ", \"name\": \"x2\", \"steps\": 2"), 400, "missing_field",
          "edit.method");
  refused(&d, ft_job("tiny", 3, 3, 8, 1, ", \"name\": \"x2\", \"method\": \"nope\", \"steps\": 2"),
          400, "invalid_field", "edit.method");
  refused(&d, ft_job("tiny", 3, 3, 8, 1, ", \"name\": \"x2\", \"method\": \"plain\""), 400,
          "missing_field", "edit.steps");
  refused(&d,
          ft_job("tiny", 3, 3, 8, 1,
                 ", \"name\": \"x2\", \"method\": \"domainstudio\", \"steps\": 2, \"batch\": 2"),
          400, "out_of_range", "edit.batch");
  refused(&d,
          ft_job("tiny", 3, 3, 8, 1,
                 ", \"name\": \"x2\", \"method\": \"plain\", \"steps\": 2, \"pair_weight\": 1"),
          400, "invalid_field", "edit.pair_weight");
  daemon_stop(&d);

  /* a restart serves the models made */
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  ck_assert(th_serves_model(&d, "tiny-ds"));
  ck_assert(th_serves_model(&d, "tiny-plain"));
  p0 = sample_from(&d, "tiny-ds", &n0); /* the same model: the same picture */
  ck_assert(same_pixels(p0, n0, p1, n1));
  free(p0), free(p1);
  daemon_stop(&d);
}
END_TEST

/* Whether path exists. */
static int exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* Submits a short DomainStudio job naming `name` to a daemon that dies publishing it (the
 * fault hook aborts after the folder is written, before it is registered): the job's id into
 * id, the folder's path into dir. */
static void crash_publishing(const char *st, const char *const *args, const char *name, char *id,
                             size_t n, char *dir, size_t dn) {
  const char *env[] = {"DENOISED_FAULT_KILL_BEFORE_REGISTER=1", NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start_env(&d, st, args, env), 0);
  char extra[128];
  snprintf(extra, sizeof extra, ", \"name\": \"%s\", \"method\": \"domainstudio\", \"steps\": 2",
           name);
  char *body = ft_job("tiny", 3, 3, 8, 1, extra);
  submit_job(&d, body, id, n);
  free(body);
  ck_assert_int_eq(daemon_wait_exit(&d, 120), 128 + SIGABRT);
  snprintf(dir, dn, "%s/models/%s-%s/config.json", st, name, id);
  ck_assert_msg(exists(dir), "%s", dir); /* written whole, not registered */
  snprintf(dir, dn, "%s/models/%s-%s", st, name, id);
}

START_TEST(publish_survives_a_crash) {
  char st[512], tm[1200], src[1024], id[64], dir[1024], path[1200];
  snprintf(tm, sizeof tm, "tiny=%s", test_src_path(src, sizeof src, "tests/fixtures/train/model"));
  const char *args[] = {"--model", tm, "--workers", "1", "--max-job-cost", "1", NULL};
  th_state_dir(st, sizeof st);

  /* died before registering, with a half-written .partial of an earlier try beside it: the
   * run after the restart writes the model again and registers it */
  crash_publishing(st, args, "tiny-crash", id, sizeof id, dir, sizeof dir);
  snprintf(path, sizeof path, "%s.partial", dir);
  ck_assert_int_eq(mkdir(path, 0777), 0);
  snprintf(path, sizeof path, "%s.partial/config.json", dir);
  write_file(path, (const uint8_t *)"{", 1);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  wait_state(&d, id, "succeeded", 120);
  ck_assert(th_serves_model(&d, "tiny-crash"));
  snprintf(path, sizeof path, "%s.partial", dir);
  ck_assert_msg(!exists(path), "%s left behind", path);
  size_t n0;
  free(sample_from(&d, "tiny-crash", &n0));

  /* over the budget (max_job_cost 1): the refusal names the fields to lower */
  char *body = ft_job("tiny", 3, 3, 8, 1,
                      ", \"name\": \"tiny-big\", \"method\": \"domainstudio\", \"steps\": "
                      "20000");
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/jobs", body, &r), 400);
  free(body);
  ck_assert_msg(strstr(r.body, "over_budget") && strstr(r.body, "edit.steps 20000") &&
                    strstr(r.body, "edit.batch 3") && strstr(r.body, "max_job_cost") &&
                    !strstr(r.body, "network evaluations"),
                "%s", r.body);
  http_free(&r);
  daemon_stop(&d);

  /* died after registering (the registry written, as a crash between it and the job's final
   * record leaves it): the run after the restart takes the registered model as published */
  crash_publishing(st, args, "tiny-crash2", id, sizeof id, dir, sizeof dir);
  snprintf(path, sizeof path, "%s/registered_models.json", st);
  json_t *reg = json_load_file(path, 0, NULL);
  ck_assert_ptr_nonnull(reg);
  json_object_set_new(reg, "tiny-crash2", json_string(dir));
  ck_assert_int_eq(json_dump_file(reg, path, 0), 0);
  json_decref(reg);
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  ck_assert(th_serves_model(&d, "tiny-crash2"));
  wait_state(&d, id, "succeeded", 120);
  ck_assert(th_serves_model(&d, "tiny-crash2"));
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("server_finetune");
  TCase *tc = tcase_create("server_finetune");
  tcase_add_test(tc, finetune_jobs);
  tcase_add_test(tc, publish_survives_a_crash);
  suite_add_tcase(s, tc);
  return s;
}
