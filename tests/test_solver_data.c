/* Solver data that lives with a model (issue 15.1): names and their files, `denoised stats --out
 * NAME` with --class/--guidance-scale and the header's record of what the statistics are for,
 * the refusals when a run is not that (other weights, shape, schedule, class, guidance scale; a
 * version 1 header under guidance), `denoised info`, PNG replay by name, and the daemon's
 * scheduler.data (names only, never paths; listed by GET /v1/models). Models are copies of the
 * conditional analytic model in a scratch folder, so their solver_data/ folders are the test's. */
#include <sys/stat.h>

#include "image.h"
#include "sampler.h"
#include "testhttp.h"

/* A copy of tests/fixtures/gmm/NAME as DIR/AS; returns its path in out. */
static const char *copy_model(const char *dir, const char *name, const char *as, char *out,
                              size_t n) {
  char rel[256], src[1024], cmd[3000];
  snprintf(rel, sizeof rel, "tests/fixtures/gmm/%s", name);
  test_src_path(src, sizeof src, rel);
  snprintf(out, n, "%s/%s", dir, as);
  snprintf(cmd, sizeof cmd, "cp -r %s %s", src, out);
  ck_assert_int_eq(system(cmd), 0);
  return out;
}

/* cond4 (3 classes) with statistics "g2" (class 1, guidance 2) and "any" (every class, no
 * guidance), computed by the command. */
static void model_with_stats(const char *dir, char *model, size_t n) {
  char out[8192];
  copy_model(dir, "cond4", "cond4", model, n);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "stats --model %s --class 1 --guidance-scale 2 --samples 16 --grid 60 "
                             "--quiet --out g2",
                             model) == 0,
                "%s", out);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "stats --model %s --samples 16 --grid 60 --quiet --out any",
                             model) == 0,
                "%s", out);
}

START_TEST(names_and_paths) {
  ck_assert(sampler_data_name_ok("g2"));
  ck_assert(sampler_data_name_ok("cfg-2.5_v3"));
  const char *bad[] = {
      "",    ".hidden", "..",
      "a/b", "-x",      "x.json",
      "a b", "é",       "12345678901234567890123456789012345678901234567890123456789012345"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    ck_assert_msg(!sampler_data_name_ok(bad[i]), "'%s' accepted", bad[i]);
  ck_assert(sampler_data_is_name("g2"));
  ck_assert(!sampler_data_is_name("dir/g2"));
  ck_assert(!sampler_data_is_name("g2.json"));
  char dir[64], model[512], path[1024];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  copy_model(dir, "cond4", "cond4", model, sizeof model);
  err e = {0};
  /* no folder: an empty listing, and a name says there is none */
  json_t *l = sampler_data_list(model, &e);
  ck_assert_int_eq(json_array_size(l), 0);
  json_decref(l);
  ck_assert_int_ne(sampler_data_path(model, "g2", path, sizeof path, &e), 0);
  ck_assert_msg(strstr(e.msg, "has none") && !strstr(e.msg, dir), "%s", e.msg);
  ck_assert_int_ne(sampler_data_path(model, "../x", path, sizeof path, &e), 0);
  ck_assert_msg(strstr(e.msg, "not a solver data name"), "%s", e.msg);
  char out[8192];
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "stats --model %s --class 1 --guidance-scale 2 --samples 16 --grid 60 "
                             "--quiet --out g2",
                             model) == 0,
                "%s", out);
  ck_assert_int_eq(sampler_data_path(model, "g2", path, sizeof path, &e), 0);
  ck_assert_ptr_nonnull(strstr(path, "/solver_data/g2.json"));
  ck_assert_int_ne(sampler_data_path(model, "g3", path, sizeof path, &e), 0);
  ck_assert_msg(strstr(e.msg, "it has: g2") && !strstr(e.msg, dir), "%s", e.msg);
  /* the listing: what it was computed for; a stray file is left out */
  snprintf(path, sizeof path, "%s/solver_data/notes.json", model);
  FILE *f = fopen(path, "w");
  fputs("{\"format\": \"other\"}", f);
  fclose(f);
  /* a USF schedule is listed with what the statistics it names were computed for */
  snprintf(path, sizeof path, "%s/solver_data/u5.json", model);
  f = fopen(path, "w");
  fputs("{\"format\": \"denoised-usf-schedule\", \"version\": 1, \"statistics\": \"g2.json\", "
        "\"steps\": [{}, {}]}",
        f);
  fclose(f);
  l = sampler_data_list(model, &e);
  ck_assert_int_eq(json_array_size(l), 2);
  json_t *u = json_array_get(l, 1);
  ck_assert_str_eq(json_string_value(json_object_get(u, "kind")), "usf-schedule");
  ck_assert_int_eq(json_integer_value(json_object_get(u, "steps")), 2);
  ck_assert_int_eq(json_integer_value(json_object_get(u, "class_label")), 1);
  json_t *it = json_array_get(l, 0);
  ck_assert_str_eq(json_string_value(json_object_get(it, "name")), "g2");
  ck_assert_str_eq(json_string_value(json_object_get(it, "kind")), "dpm-solver-v3-stats");
  ck_assert_int_eq(json_integer_value(json_object_get(it, "grid")), 60);
  ck_assert_int_eq(json_integer_value(json_object_get(it, "class_label")), 1);
  ck_assert(json_number_value(json_object_get(it, "guidance_scale")) == 2.0);
  json_decref(l);
  snprintf(out, sizeof out, "rm -rf %s", dir);
  ck_assert_int_eq(system(out), 0);
}
END_TEST

/* The model record, in-process: the data at path loads for the model in dir_a (cond4) and is
 * refused, naming both shapes, for the one in dir_b (mix3). */
static void check_model_record(const char *dir_a, const char *dir_b, const char *path) {
  model *mc = NULL, *mm = NULL;
  err e = {0};
  ck_assert_int_eq(model_load(dir_a, &mc, &e), 0);
  ck_assert_int_eq(model_load(dir_b, &mm, &e), 0);
  json_t *spec = json_pack("{s:s, s:i, s:s}", "name", "dpm-solver-v3", "steps", 5, "data", path);
  sampler *s = NULL;
  ck_assert_msg(sampler_new_from_json(spec, model_scheduler_config(mc), &s, &e) == 0, "%s", e.msg);
  const guidance g = guidance_for(mc, 2);
  const int64_t label = 1;
  ck_assert_msg(sampler_data_check(s, mc, &g, &label, 1, &e) == 0, "%s", e.msg);
  ck_assert_int_ne(sampler_data_check(s, mm, NULL, NULL, 1, &e), 0);
  ck_assert_msg(strstr(e.msg, "computed for a model of 3 channels at 8x8 with 3 classes, not this "
                              "one (3 channels at 8x8, 0 classes)"),
                "%s", e.msg);
  sampler_free(s);
  json_decref(spec);
  model_free(mc);
  model_free(mm);
}

/* The header records the model, the schedule, the class and the scale; a run that is not that
 * is refused naming both sides; the matching run works, by name and by path. */
START_TEST(runs_held_to_what_the_data_is_for) {
  char dir[64], model[512], other[512], out[8192], path[1024];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  model_with_stats(dir, model, sizeof model);
  snprintf(path, sizeof path, "%s/solver_data/g2.json", model);
  json_t *h = json_load_file(path, 0, NULL);
  json_t *cf = json_object_get(h, "computed_for");
  ck_assert_int_eq(json_integer_value(json_object_get(h, "version")), 2);
  ck_assert_int_eq(json_integer_value(json_object_get(cf, "class_label")), 1);
  ck_assert(json_number_value(json_object_get(cf, "guidance_scale")) == 2.0);
  ck_assert(json_is_false(json_object_get(json_object_get(cf, "schedule"), "thresholding")));
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(cf, "model"), "sample_size")),
                   8);
  ck_assert_ptr_nonnull(
      strstr(json_string_value(json_object_get(json_object_get(cf, "model"), "weights_digest")),
             "fnv1a64:"));
  json_decref(h);
  const char *run = "sample --model %s --scheduler dpm-solver-v3 --steps 5 --seed 3 --quiet "
                    "--out %s/x.npy --solver-data %s %s";
  char cmd[2048];
  static const struct {
    const char *data, *args, *want; /* want NULL: succeeds */
  } cases[] = {
      {"g2", "--class 1 --guidance-scale 2", NULL},
      {"any", "--class 2", NULL},
      {"g2", "--class 2 --guidance-scale 2", "computed for class 1"},
      {"g2", "--class 1 --guidance-scale 3", "computed at guidance scale 2, the run uses 3"},
      {"g2", "--class 1", "computed at guidance scale 2, the run uses 1"},
      {"any", "--class 1 --guidance-scale 2", "guidance scale 1, the run uses 2"},
      {"g2", "--class 1 --guidance-scale 2 --scheduler-opt lambda_min_clipped=-3", "schedule"},
      {"g2", "--class 1 --guidance-scale 2 --scheduler-opt thresholding=true",
       "computed without dynamic thresholding"},
      {"nope", "--class 1", "no solver data named 'nope' for this model (it has: any, g2)"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(cmd, sizeof cmd, run, model, dir, cases[i].data, cases[i].args);
    const int st = test_run_cli(out, sizeof out, "%s", cmd);
    if (!cases[i].want)
      ck_assert_msg(st == 0, "%s: %s", cmd, out);
    else
      ck_assert_msg(st != 0 && strstr(out, cases[i].want), "%s: %d, wanted '%s': %s", cmd, st,
                    cases[i].want, out);
  }
  /* by path, from another model: of the same shape but other weights (one float's low byte
   * changed), and of another shape */
  copy_model(dir, "cond4", "cond4b", other, sizeof other);
  snprintf(cmd, sizeof cmd, "%s/diffusion_pytorch_model.safetensors", other);
  FILE *f = fopen(cmd, "r+b");
  ck_assert_int_eq(fseek(f, -1, SEEK_END), 0);
  const int last = fgetc(f);
  ck_assert_int_eq(fseek(f, -1, SEEK_END), 0);
  fputc(last ^ 1, f);
  fclose(f);
  snprintf(cmd, sizeof cmd, run, other, dir, path, "--class 1 --guidance-scale 2");
  ck_assert_int_ne(test_run_cli(out, sizeof out, "%s", cmd), 0);
  ck_assert_msg(strstr(out, "computed for other weights"), "%s", out);
  copy_model(dir, "mix3", "mix3", other, sizeof other);
  snprintf(cmd, sizeof cmd, run, other, dir, path, "");
  ck_assert_int_ne(test_run_cli(out, sizeof out, "%s", cmd), 0);
  /* (mix3's schedule differs too, and that is found first, when the solver is made) */
  ck_assert_msg(strstr(out, "computed for another schedule"), "%s", out);
  check_model_record(model, other, path);
  /* a version 1 header records nothing: fine unguided, refused under guidance */
  h = json_load_file(path, 0, NULL);
  json_object_set_new(h, "version", json_integer(1));
  json_object_del(h, "computed_for");
  json_object_set_new(h, "arrays", json_string("g2.npy"));
  snprintf(cmd, sizeof cmd, "%s/solver_data/old.json", model);
  ck_assert_int_eq(json_dump_file(h, cmd, 0), 0);
  json_decref(h);
  snprintf(cmd, sizeof cmd, run, model, dir, "old", "--class 1");
  ck_assert_msg(test_run_cli(out, sizeof out, "%s", cmd) == 0, "%s", out);
  snprintf(cmd, sizeof cmd, run, model, dir, "old", "--class 1 --guidance-scale 2");
  ck_assert_int_ne(test_run_cli(out, sizeof out, "%s", cmd), 0);
  ck_assert_msg(strstr(out, "version 1") && strstr(out, "--guidance-scale 2"), "%s", out);
  /* the command's own refusals */
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "stats --model %s --class 1 --quiet --out x", other), 2);
  ck_assert_msg(strstr(out, "not class-conditional"), "%s", out);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "stats --model %s --quiet --out 'a b'", model), 2);
  ck_assert_msg(strstr(out, "neither a solver data name"), "%s", out);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "stats --model %s --class 9 --quiet --out x", model), 2);
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* `denoised info` lists the data; a PNG records the name and replays by it. */
START_TEST(info_and_replay) {
  char dir[64], model[512], out[8192], png[600], again[600];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  model_with_stats(dir, model, sizeof model);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "info --model %s", model), 0);
  ck_assert_msg(strstr(out, "solver data  2:") && strstr(out, "g2") &&
                    strstr(out, "class 1, guidance 2") && strstr(out, "any class, guidance 1"),
                "%s", out);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "info --model %s --json", model), 0);
  json_t *j = json_loads(out, 0, NULL);
  ck_assert_msg(j != NULL, "%s", out);
  ck_assert_int_eq(json_array_size(json_object_get(j, "solver_data")), 2);
  json_decref(j);
  snprintf(png, sizeof png, "%s/a.png", dir);
  snprintf(again, sizeof again, "%s/b.png", dir);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s --scheduler dpm-solver-v3 --steps 5 --seed 3 "
                             "--class 1 --guidance-scale 2 --solver-data g2 --quiet -o %s",
                             model, png) == 0,
                "%s", out);
  char *text = NULL;
  err e;
  ck_assert_int_eq(image_png_read_text(png, "parameters", &text, &e), 0);
  ck_assert_msg(strstr(text, "Solver data: g2"), "%s", text);
  free(text);
  ck_assert_int_eq(image_png_read_text(png, "denoised", &text, &e), 0);
  j = json_loads(text, 0, NULL);
  free(text);
  ck_assert_str_eq(json_string_value(json_object_get(j, "solver_data")), "g2");
  json_decref(j);
  ck_assert_msg(test_run_cli(out, sizeof out, "sample --replay %s --quiet -o %s", png, again) == 0,
                "%s", out);
  size_t la, lb;
  uint8_t *a = read_file_all(png, &la), *b = read_file_all(again, &lb);
  ck_assert_msg(la == lb && memcmp(a, b, la) == 0, "the replay differs");
  free(a);
  free(b);
  /* without its data the replay says so, naming it */
  snprintf(out, sizeof out, "rm %s/solver_data/g2.json", model);
  ck_assert_int_eq(system(out), 0);
  ck_assert_int_ne(test_run_cli(out, sizeof out, "sample --replay %s --quiet -o %s", png, again),
                   0);
  ck_assert_msg(strstr(out, "no solver data named 'g2'"), "%s", out);
  snprintf(out, sizeof out, "rm -rf %s", dir);
  ck_assert_int_eq(system(out), 0);
}
END_TEST

/* The job's record names the solver data `want`. */
static void expect_job_data(daemon_proc *d, const char *id, const char *want) {
  char url[128];
  http_resp r = {0};
  snprintf(url, sizeof url, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(d, url, &r), 200);
  json_t *j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(
                       json_object_get(json_object_get(j, "request"), "scheduler"), "data")),
                   want);
  json_decref(j);
  http_free(&r);
}

/* The daemon: listed by GET /v1/models, named by scheduler.data (never a path), refused with a
 * 400 naming the field when it does not fit the job, recorded in the PNG, which the CLI replays
 * to the same pixels. */
START_TEST(daemon_scheduler_data) {
  char dir[64], model[512], arg[600], st[512], id[64], url[256];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  model_with_stats(dir, model, sizeof model);
  snprintf(arg, sizeof arg, "default=%s", model);
  const char *args[] = {"--model", arg, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/models", &r), 200);
  ck_assert_msg(!strstr(r.body, dir), "a path in %s", r.body);
  json_t *j = http_json(&r);
  json_t *sd = json_object_get(json_array_get(json_object_get(j, "models"), 0), "solver_data");
  ck_assert_int_eq(json_array_size(sd), 2);
  ck_assert_str_eq(json_string_value(json_object_get(json_array_get(sd, 1), "name")), "g2");
  ck_assert(json_number_value(json_object_get(json_array_get(sd, 1), "guidance_scale")) == 2.0);
  ck_assert(json_is_null(json_object_get(json_array_get(sd, 0), "class_label")));
  json_decref(j);
  http_free(&r);
  const char *job = "{\"class_label\": 1, \"seed\": 3, \"guidance\": {\"scale\": 2}, "
                    "\"scheduler\": {\"name\": \"dpm-solver-v3\", \"steps\": 5, \"data\": \"g2\"}}";
  submit_job(&d, job, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  expect_job_data(&d, id, "g2");
  /* the image: metadata by name, and the CLI's replay with the model's folder is the same */
  snprintf(url, sizeof url, "/v1/jobs/%s/images/0", id);
  ck_assert_int_eq(http_get(&d, url, &r), 200);
  char png[600], cli[600], out[8192];
  snprintf(png, sizeof png, "%s/d.png", dir);
  snprintf(cli, sizeof cli, "%s/c.png", dir);
  write_file(png, (const uint8_t *)r.body, r.len);
  http_free(&r);
  char *text = NULL;
  err e;
  ck_assert_int_eq(image_png_read_text(png, "parameters", &text, &e), 0);
  ck_assert_msg(strstr(text, "Solver data: g2"), "%s", text);
  free(text);
  ck_assert_msg(test_run_cli(out, sizeof out, "sample --replay %s --model %s --quiet -o %s", png,
                             model, cli) == 0,
                "%s", out);
  uint8_t *a = NULL, *b = NULL;
  fetch_pixels(&d, id, 0, &a);
  int h, w;
  size_t len;
  uint8_t *bytes = read_file_all(cli, &len);
  ck_assert_int_eq(image_png_decode(bytes, len, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(memcmp(a, b, 8 * 8 * 3) == 0, "the daemon's image differs from the CLI replay");
  free(a);
  free(b);
  free(bytes);
  /* refusals: 400 naming scheduler.data, and no path in any message */
  static const char *const bad[] = {"\"data\": \"../../etc/passwd\"",
                                    "\"data\": \"/tmp/x.json\"",
                                    "\"data\": \"g2.json\"",
                                    "\"data\": 5",
                                    "\"data\": \"nope\"",
                                    "\"data\": \"any\""};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    char body[512];
    snprintf(body, sizeof body,
             "{\"class_label\": 1, \"guidance\": {\"scale\": 2}, \"scheduler\": {\"name\": "
             "\"dpm-solver-v3\", \"steps\": 5, %s}}",
             bad[i]);
    expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "scheduler.data");
    ck_assert_int_eq(http_post(&d, "/v1/jobs", body, &r), 400);
    ck_assert_msg(!strstr(r.body, dir) && !strstr(r.body, "solver_data/"), "%s", r.body);
    if (i == 4)
      ck_assert_msg(strstr(r.body, "it has: any, g2"), "%s", r.body);
    if (i == 5)
      ck_assert_msg(strstr(r.body, "guidance scale 1, the run uses 2"), "%s", r.body);
    http_free(&r);
  }
  expect_error(&d, "POST", "/v1/jobs",
               "{\"class_label\": 2, \"guidance\": {\"scale\": 2}, \"scheduler\": {\"name\": "
               "\"dpm-solver-v3\", \"data\": \"g2\"}}",
               400, "invalid_field", "scheduler.data");
  expect_error(&d, "POST", "/v1/jobs",
               "{\"class_label\": 1, \"scheduler\": {\"name\": \"ddim\", \"data\": \"any\"}}", 400,
               "invalid_field", "scheduler.data");
  /* the name is part of the job's record: after a restart the job still says it */
  daemon_stop(&d);
  ck_assert_int_eq(daemon_start(&d, st, args), 0);
  expect_job_data(&d, id, "g2");
  daemon_stop(&d);
  snprintf(out, sizeof out, "rm -rf %s", dir);
  ck_assert_int_eq(system(out), 0);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("solver_data");
  TCase *tc = tcase_create("solver_data");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, names_and_paths);
  tcase_add_test(tc, runs_held_to_what_the_data_is_for);
  tcase_add_test(tc, info_and_replay);
  tcase_add_test(tc, daemon_scheduler_data);
  suite_add_tcase(s, tc);
  return s;
}
