/* The daemon's configuration in-process: defaults, the precedence file < environment < flags,
 * errors that name the key and the source, derived values, listen address parsing. */
#include "config.h"
#include "testutil.h"

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(text, f);
  fclose(f);
}

START_TEST(defaults_are_local_and_valid) {
  config c;
  config_defaults(&c);
  ck_assert_str_eq(c.listen, "127.0.0.1:8080");
  ck_assert_int_eq(c.nmodels, 1);
  ck_assert_str_eq(c.models[0].name, "default");
  ck_assert_str_eq(c.default_model, "default");
  err e = {0};
  ck_assert_int_eq(config_finalize(&c, &e), 0);
  ck_assert_int_ge(c.cpu_budget, 1);
  ck_assert_int_ge(c.threads_per_job, 1);
  ck_assert_int_le(c.workers * c.threads_per_job, c.cpu_budget);
  json_t *j = config_to_json(&c);
  ck_assert_str_eq(json_string_value(json_object_get(j, "listen")), "127.0.0.1:8080");
  ck_assert(json_is_object(json_object_get(j, "models")));
  json_decref(j);
}
END_TEST

START_TEST(file_env_flags_precedence) {
  char tmp[256], path[512];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(path, sizeof path, "%s/c.json", tmp);
  write_file(path, "{\"_comment\": \"x\", \"workers\": 2, \"queue_max\": 7, \"max_steps\": 50, "
                   "\"models\": {\"a\": \"/m/a\", \"b\": \"/m/b\"}, \"default_model\": \"a\", "
                   "\"cpu_budget\": 8}");
  config c;
  config_defaults(&c);
  err e = {0};
  ck_assert_int_eq(config_load_file(&c, path, &e), 0);
  ck_assert_int_eq(c.nmodels, 2); /* a file's model list replaces the default one */
  char *env[] = {"DENOISED_QUEUE_MAX=9",
                 "DENOISED_MAX_STEPS=60",
                 "DENOISED_MODELS=c=/m/c,d=/m/d",
                 "DENOISED_DEFAULT_MODEL=c",
                 "DENOISED_UNRELATED=1",
                 "PATH=/bin",
                 NULL};
  ck_assert_int_eq(config_apply_env(&c, env, &e), 0);
  ck_assert_int_eq(c.queue_max, 9);
  ck_assert_int_eq(c.nmodels, 2);
  ck_assert_str_eq(c.models[1].name, "d");
  ck_assert_int_eq(config_set_flag(&c, "max-steps", "70", &e), 0);
  ck_assert_int_eq(config_set_flag(&c, "model", "e=/m/e", &e), 0);
  ck_assert_int_eq(config_set_flag(&c, "cors-origin", "http://a.example:3000", &e), 0);
  ck_assert_int_eq(config_finalize(&c, &e), 0);
  ck_assert_int_eq(c.workers, 2);    /* file */
  ck_assert_int_eq(c.queue_max, 9);  /* env over file */
  ck_assert_int_eq(c.max_steps, 70); /* flag over env */
  ck_assert_int_eq(c.nmodels, 3);
  ck_assert_int_eq(c.threads_per_job, 4); /* cpu_budget / workers */
  ck_assert_int_eq(c.ncors, 1);
  ck_assert_int_eq(config_set_flag(&c, "no-such-flag", "1", &e), ERR_UNSUPPORTED);
}
END_TEST

START_TEST(errors_name_key_and_source) {
  config c;
  err e = {0};
  struct {
    const char *json, *needle;
  } cases[] = {
      {"{\"queue_max\": 0}", "key 'queue_max': 0 is out of range"},
      {"{\"queue_max\": 1.5}", "key 'queue_max': expected an integer"},
      {"{\"listen\": 8080}", "key 'listen': expected a string"},
      {"{\"models\": []}", "key 'models'"},
      {"{\"models\": {\"ok\": 3}}", "models.ok"},
      {"{\"models\": {\"a/b\": \"/x\"}}", "name 'a/b'"},
      {"{\"cors_origins\": \"*\"}", "cors_origins"},
      {"{\"cors_origins\": [\"*\", 1]}", "cors_origins[1]"},
      {"{\"nope\": 1}", "unknown key 'nope'"},
      {"{\"models\": {\"m\": {\"path\": \"/x\", \"precision\": \"fp16\"}}}", "models.m.precision"},
      {"{\"models\": {\"m\": {\"path\": \"/x\", \"threads\": 2}}}", "models.m.threads"},
      {"{\"models\": {\"m\": {\"precision\": \"bf16\"}}}", "models.m"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    config_defaults(&c);
    json_t *j = json_loads(cases[i].json, 0, NULL);
    ck_assert_int_ne(config_apply_json(&c, j, "test.json", &e), 0);
    ck_assert_msg(strstr(e.msg, cases[i].needle) && strstr(e.msg, "test.json"), "%s -> %s",
                  cases[i].json, e.msg);
    ck_assert_int_eq(c.queue_max, 256); /* all or nothing */
    json_decref(j);
  }
  config_defaults(&c);
  char *env[] = {"DENOISED_WORKERS=many", NULL};
  ck_assert_int_ne(config_apply_env(&c, env, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "environment DENOISED_WORKERS"));
  ck_assert_int_ne(config_set_flag(&c, "workers", "-1", &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "--workers"));
  ck_assert_int_ne(config_set_flag(&c, "model", "noequals", &e), 0);
  config_defaults(&c);
  c.workers = 3;
  c.cpu_budget = 2;
  ck_assert_int_ne(config_finalize(&c, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "workers"));
  config_defaults(&c);
  ck_assert_int_eq(config_set_flag(&c, "default-model", "missing", &e), 0);
  ck_assert_int_ne(config_finalize(&c, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "default_model"));
  /* a list without its default named: the first model is the default (serve --model a=DIR) */
  config_defaults(&c);
  c.nmodels = 0;
  ck_assert_int_eq(config_set_flag(&c, "model", "a=/x", &e), 0);
  ck_assert_int_eq(config_set_flag(&c, "model", "b=/y", &e), 0);
  ck_assert_int_eq(config_finalize(&c, &e), 0);
  ck_assert_str_eq(c.default_model, "a");
  config_defaults(&c);
  c.sse_heartbeat = 100;
  c.idle_timeout = 30;
  ck_assert_int_ne(config_finalize(&c, &e), 0);
  ck_assert_int_ne(config_load_file(&c, "/nonexistent/c.json", &e), 0);
}
END_TEST

/* A model given as {"path", "precision"}: bf16 is kept and written back in that form; fp32
 * (the default) goes back to the plain path. */
START_TEST(model_precision_entries) {
  config c;
  err e = {0};
  config_defaults(&c);
  json_t *j = json_loads("{\"models\": {\"a\": {\"path\": \"/x\", \"precision\": \"bf16\"}, "
                         "\"b\": {\"path\": \"/y\", \"precision\": \"fp32\"}, \"c\": \"/z\"}}",
                         0, NULL);
  ck_assert_msg(config_apply_json(&c, j, "t.json", &e) == 0, "%s", e.msg);
  json_decref(j);
  ck_assert_int_eq(c.nmodels, 3);
  ck_assert_str_eq(c.models[0].precision, "bf16");
  ck_assert_str_eq(c.models[1].precision, "");
  ck_assert_str_eq(c.models[2].precision, "");
  json_t *back = config_to_json(&c);
  json_t *m = json_object_get(back, "models");
  ck_assert_str_eq(json_string_value(json_object_get(json_object_get(m, "a"), "precision")),
                   "bf16");
  ck_assert_str_eq(json_string_value(json_object_get(m, "b")), "/y");
  config c2;
  config_defaults(&c2);
  ck_assert_int_eq(config_apply_json(&c2, back, "back", &e), 0);
  ck_assert_str_eq(c2.models[0].precision, "bf16");
  json_decref(back);
}
END_TEST

START_TEST(listen_addresses) {
  char host[64];
  int port;
  err e;
  ck_assert_int_eq(config_listen_split("127.0.0.1:8080", host, sizeof host, &port, &e), 0);
  ck_assert_str_eq(host, "127.0.0.1");
  ck_assert_int_eq(port, 8080);
  ck_assert_int_eq(config_listen_split("[::1]:0", host, sizeof host, &port, &e), 0);
  ck_assert_str_eq(host, "::1");
  ck_assert_int_eq(port, 0);
  ck_assert_int_ne(config_listen_split("localhost", host, sizeof host, &port, &e), 0);
  ck_assert_int_ne(config_listen_split("h:70000", host, sizeof host, &port, &e), 0);
  ck_assert_int_ne(config_listen_split(":80", host, sizeof host, &port, &e), 0);
  ck_assert_int_ne(config_listen_split("[::1]8080", host, sizeof host, &port, &e), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("config");
  TCase *tc = tcase_create("config");
  tcase_add_test(tc, defaults_are_local_and_valid);
  tcase_add_test(tc, file_env_flags_precedence);
  tcase_add_test(tc, errors_name_key_and_source);
  tcase_add_test(tc, listen_addresses);
  tcase_add_test(tc, model_precision_entries);
  suite_add_tcase(s, tc);
  return s;
}
