/* The first steps a new user takes with the default model (issue 20.5): sample with no flags
 * (the model's recommended settings, a class drawn per image from the seed), -o - and outputs
 * that are not regular files, sizes and replays that cannot be honoured, the DPM-Solver
 * variants on the thresholded default model, and the daemon's configuration: the first --model
 * is the default, config-file model paths are relative to the file, config check refuses what
 * serve refuses, one log line per finished job. */
#include <sys/stat.h>

#include "image.h"
#include "meta.h"
#include "rng.h"
#include "testhttp.h"
#include "testutil.h"

/* The JSON record of a PNG. */
static json_t *record_of(const char *png) {
  char *text = NULL;
  err e;
  ck_assert_msg(image_png_read_text(png, META_JSON_KEY, &text, &e) == 0, "%s: %s", png, e.msg);
  json_t *j = json_loads(text, 0, NULL);
  free(text);
  ck_assert_ptr_nonnull(j);
  return j;
}

START_TEST(sample_without_flags_uses_the_model_card) {
  char out[8192], tmp[256], path[512], again[512];
  test_tmpdir(tmp, sizeof tmp);
  ck_assert_msg(test_run_cli(out, sizeof out, "sample --seed 5 --batch 3 -o %s/d.png", tmp) == 0,
                "%s", out);
  ck_assert_msg(strstr(out, "recommended dpm++2m, 20 steps, guidance scale 2"), "%s", out);
  ck_assert_msg(strstr(out, "classes drawn from the seed"), "%s", out);
  for (int i = 0; i < 3; i++) {
    snprintf(path, sizeof path, "%s/d-%d.png", tmp, i);
    json_t *j = record_of(path);
    ck_assert_str_eq(json_string_value(json_object_get(j, "scheduler")), "dpm++2m");
    ck_assert_int_eq(json_integer_value(json_object_get(j, "steps")), 20);
    ck_assert(json_real_value(json_object_get(j, "guidance_scale")) == 2.0);
    /* the class is drawn from (seed, image index), the null class (36) left out */
    ck_assert_int_eq(json_integer_value(json_object_get(j, "class_label")),
                     rng_class(5, (uint64_t)i, 37, 36));
    /* recorded by name, not a path of this machine */
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "glyphs32");
    json_decref(j);
  }
  /* denoised info shows what the card recommends */
  ck_assert_int_eq(test_run_cli(out, sizeof out, "info"), 0);
  ck_assert_msg(
      strstr(out, "recommended  {\"scheduler\":\"dpm++2m\",\"steps\":20,\"guidance_scale\":2"),
      "%s", out);
  /* the drawn classes are not all one */
  ck_assert(rng_class(5, 0, 37, 36) != rng_class(5, 1, 37, 36) ||
            rng_class(5, 1, 37, 36) != rng_class(5, 2, 37, 36));
  /* the record replays: the model found by its name */
  snprintf(path, sizeof path, "%s/d-2.png", tmp);
  snprintf(again, sizeof again, "%s/again.png", tmp);
  ck_assert_msg(test_run_cli(out, sizeof out, "sample --replay %s -o %s --quiet", path, again) == 0,
                "%s", out);
  ck_assert(test_files_equal(path, again));
  /* flags override the card */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --class A --scheduler ddim --steps 4 --guidance-scale 1 "
                                "--seed 1 -o %s/o.png --quiet",
                                tmp),
                   0);
  snprintf(path, sizeof path, "%s/o.png", tmp);
  json_t *j = record_of(path);
  ck_assert_str_eq(json_string_value(json_object_get(j, "scheduler")), "ddim");
  ck_assert_int_eq(json_integer_value(json_object_get(j, "steps")), 4);
  ck_assert_int_eq(json_integer_value(json_object_get(j, "class_label")), 10);
  json_decref(j);
}
END_TEST

START_TEST(outputs_sizes_and_replays) {
  char out[8192], tmp[256], a[512], b[512], cmd[2048];
  test_tmpdir(tmp, sizeof tmp);
  /* -o - is the PNG on standard output, the same bytes as the file */
  snprintf(cmd, sizeof cmd, "%s sample --class B --seed 2 -o - --quiet > %s/stdout.png", test_bin(),
           tmp);
  ck_assert_int_eq(system(cmd), 0);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --class B --seed 2 -o %s/file.png --quiet", tmp), 0);
  snprintf(a, sizeof a, "%s/stdout.png", tmp);
  snprintf(b, sizeof b, "%s/file.png", tmp);
  ck_assert_msg(test_files_equal(a, b), "-o - differs from -o FILE");
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --class B --batch 2 -o - --quiet"), 1);
  ck_assert_msg(strstr(out, "one PNG"), "%s", out);
  /* a symlink is written through, never replaced by a file */
  snprintf(a, sizeof a, "%s/target.png", tmp);
  snprintf(b, sizeof b, "%s/link.png", tmp);
  FILE *f = fopen(a, "w");
  fclose(f);
  ck_assert_int_eq(symlink(a, b), 0);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --class B --seed 2 -o %s --quiet", b), 0);
  struct stat st;
  ck_assert_int_eq(lstat(b, &st), 0);
  ck_assert_msg(S_ISLNK(st.st_mode), "the symlink was replaced");
  snprintf(b, sizeof b, "%s/file.png", tmp);
  ck_assert_msg(test_files_equal(a, b), "the symlink's target did not get the PNG");
  /* a size the model was not built for is refused, naming it */
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --class B --size 64 -o %s/big.png", tmp),
                   2);
  ck_assert_msg(strstr(out, "--size 64") && strstr(out, "32x32"), "%s", out);
  snprintf(a, sizeof a, "%s/big.png", tmp);
  ck_assert_int_ne(access(a, F_OK), 0);
  /* a replay of a picture changed after it was made is refused, nothing written */
  snprintf(a, sizeof a, "%s/file.png", tmp);
  char *params = NULL, *rec = NULL;
  uint8_t *px = NULL, *png = NULL;
  size_t len;
  int h, w;
  err e;
  uint8_t *bytes = read_file_all(a, &len);
  ck_assert_int_eq(image_png_decode(bytes, len, 64, 64, &px, &h, &w, &e), 0);
  free(bytes);
  ck_assert_int_eq(image_png_read_text(a, META_TEXT_KEY, &params, &e), 0);
  ck_assert_int_eq(image_png_read_text(a, META_JSON_KEY, &rec, &e), 0);
  px[0] ^= 0x40; /* one value of one pixel */
  image_text texts[2] = {{META_TEXT_KEY, params, 0}, {META_JSON_KEY, rec, 1}};
  ck_assert_int_eq(image_png_encode(px, 3, h, w, texts, 2, &png, &len, &e), 0);
  snprintf(b, sizeof b, "%s/edited.png", tmp);
  write_file(b, png, len);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --replay %s -o %s/r.png --quiet", b, tmp),
                   1);
  ck_assert_msg(strstr(out, "1 of 3072 pixel values differ"), "%s", out);
  snprintf(b, sizeof b, "%s/r.png", tmp);
  ck_assert_int_ne(access(b, F_OK), 0);
  free(params);
  free(rec);
  free(px);
  free(png);
}
END_TEST

START_TEST(dpm_solver_variants_on_the_default_model) {
  char out[8192], tmp[256], path[512];
  test_tmpdir(tmp, sizeof tmp);
  static const char *const solvers[] = {"dpm-solver-fast", "dpm-solver-adaptive"};
  for (int i = 0; i < 2; i++) {
    ck_assert_msg(test_run_cli(out, sizeof out,
                               "sample --class C --scheduler %s --steps 12 --seed 3 -o %s/%s.png "
                               "--quiet",
                               solvers[i], tmp, solvers[i]) == 0,
                  "%s: %s", solvers[i], out);
    snprintf(path, sizeof path, "%s/%s.png", tmp, solvers[i]);
    json_t *j = record_of(path);
    json_t *cfg = json_object_get(j, "scheduler_config");
    /* the model's thresholding runs on the data prediction, as the paper's code does */
    ck_assert(json_is_true(json_object_get(cfg, "thresholding")));
    ck_assert_str_eq(json_string_value(json_object_get(cfg, "algorithm_type")), "dpmsolver++");
    json_decref(j);
  }
  /* a request that names the noise-prediction algorithm still gets the clear refusal */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --class C --scheduler dpm-solver-fast --scheduler-opt "
                                "algorithm_type=dpmsolver -o %s/x.png --quiet",
                                tmp),
                   2);
  ck_assert_msg(strstr(out, "thresholding"), "%s", out);
}
END_TEST

START_TEST(daemon_configuration) {
  char out[16384], tmp[256], cfg[512], st[512], model[1024], arg[1100];
  test_tmpdir(tmp, sizeof tmp);
  /* config check --help, and a missing api_keys_file refused as serve refuses it */
  ck_assert_int_eq(test_run_cli(out, sizeof out, "config check --help"), 0);
  ck_assert_msg(strstr(out, "usage: denoised config check FILE"), "%s", out);
  snprintf(cfg, sizeof cfg, "%s/keys.json", tmp);
  FILE *f = fopen(cfg, "w");
  fprintf(f, "{\"api_keys_file\": \"%s/no-such-keys\"}", tmp);
  fclose(f);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "config check %s", cfg), 2);
  ck_assert_msg(strstr(out, "no-such-keys"), "%s", out);
  daemon_proc d;
  const char *kargs[] = {"--config", cfg, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), kargs), 2);
  /* model paths in a config file are relative to the file, from any working directory */
  char sub[300], rel[300];
  snprintf(sub, sizeof sub, "%s/etc", tmp);
  ck_assert_int_eq(mkdir(sub, 0755), 0);
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(rel, sizeof rel, "%s/shapes", tmp);
  ck_assert_int_eq(symlink(model, rel), 0);
  snprintf(cfg, sizeof cfg, "%s/denoised.json", sub);
  f = fopen(cfg, "w");
  fputs("{\"models\": {\"shapes\": \"../shapes\"}}", f);
  fclose(f);
  ck_assert_msg(test_run_cli(out, sizeof out, "config check %s", cfg) == 0, "%s", out);
  json_t *j = json_loads(out, 0, NULL);
  ck_assert_ptr_nonnull(j);
  ck_assert_str_eq(json_string_value(json_object_get(j, "default_model")), "shapes");
  json_decref(j);
  /* serve --model NAME=DIR: the first is the default, and a finished job is logged */
  snprintf(arg, sizeof arg, "mine=%s", model);
  const char *margs[] = {"--model", arg, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), margs), 0);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/v1/generate", "{\"class_label\": \"ring\", \"seed\": 2}", &r),
                   200);
  char id[64];
  ck_assert_ptr_nonnull(http_header(&r, "X-Job-Id", id, sizeof id));
  http_free(&r);
  char needle[128];
  snprintf(needle, sizeof needle, "job=%s", id);
  /* written once the final state is on disk, which may be just after the answer */
  for (double t0 = th_now(); th_now() - t0 < 10 && !daemon_log_count(&d, "job succeeded");)
    usleep(20000);
  ck_assert_int_gt(daemon_log_count(&d, "msg=\"job succeeded: 1 image(s), 50 steps, ran "), 0);
  ck_assert_int_gt(daemon_log_count(&d, needle), 1);
  daemon_stop(&d);
  const char *cargs[] = {"--config", cfg, NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), cargs), 0);
  ck_assert_int_eq(http_post(&d, "/v1/generate", "{\"class_label\": \"disc\"}", &r), 200);
  http_free(&r);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("rough_edges");
  TCase *tc = tcase_create("rough_edges");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, sample_without_flags_uses_the_model_card);
  tcase_add_test(tc, outputs_sizes_and_replays);
  tcase_add_test(tc, dpm_solver_variants_on_the_default_model);
  tcase_add_test(tc, daemon_configuration);
  suite_add_tcase(s, tc);
  return s;
}
