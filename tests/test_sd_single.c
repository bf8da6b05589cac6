/* Single-file Stable-Diffusion checkpoints: for the SD 1.x- and 2.x-shaped name maps that
 * diffusers' own converter produced (tests/fixtures/sd_single, tools/gen_sd_single_fixtures.py),
 * a checkpoint of the original names and shapes is written here with known values, and
 * sd_single must show exactly diffusers' tensors in it (same names, shapes, values, q/k/v
 * split rows) and configs with diffusers' structural keys. Then the files it must refuse. */
#include <jansson.h>
#include <math.h>
#include <unistd.h>

#include "cunet.h"
#include "npy.h"
#include "sd_single.h"
#include "testutil.h"

/* The value at position i of original tensor t: distinct enough to catch a wrong tensor or
 * a wrong row block. */
static float value_at(int t, int64_t i) {
  return (float)((t * 7919 + i) % 100003) * 0.001f;
}

typedef struct synth {
  char dir[64], path[128];
  json_t *fx;
  /* For a checkpoint that samples: small weights (a smooth pattern in [-0.05, 0.05]) and the
   * token embedding widened to `vocab` rows (0: the fixture's). */
  int small;
  int64_t vocab;
} synth;

/* Writes fixture sdN's original tensors (all but those whose name contains `drop`, and one
 * extra tensor `extra` if set) as DIR/sdN.safetensors. */
static void synth_write(synth *s, int family, const char *drop, const char *extra) {
  char rel[64], fpath[512];
  snprintf(rel, sizeof rel, "tests/fixtures/sd_single/sd%d.json", family);
  json_error_t je;
  s->fx = json_load_file(test_src_path(fpath, sizeof fpath, rel), 0, &je);
  ck_assert_msg(s->fx, "%s: %s", fpath, je.text);
  ck_assert_ptr_nonnull(test_tmpdir(s->dir, sizeof s->dir));
  snprintf(s->path, sizeof s->path, "%s/sd%d.safetensors", s->dir, family);
  const json_t *orig = json_object_get(s->fx, "original");
  size_t n = json_object_size(orig) + 1, count = 0;
  st_out_tensor *t = calloc(n, sizeof *t);
  int64_t(*shapes)[4] = calloc(n, sizeof *shapes);
  const char *name;
  const json_t *shape;
  int index = 0;
  json_object_foreach((json_t *)orig, name, shape) {
    index++;
    if (drop && strstr(name, drop))
      continue;
    int64_t c = 1;
    for (size_t d = 0; d < json_array_size(shape); d++)
      c *= shapes[count][d] = json_integer_value(json_array_get(shape, d));
    if (s->vocab && strstr(name, "token_embedding.weight")) {
      c = c / shapes[count][0] * s->vocab;
      shapes[count][0] = s->vocab;
    }
    float *v = malloc((size_t)c * sizeof *v);
    for (int64_t i = 0; i < c; i++)
      v[i] = s->small ? 0.05f * sinf(0.37f * (float)(i % 1000) + (float)index) : value_at(index, i);
    t[count] = (st_out_tensor){name, (int)json_array_size(shape), shapes[count], v};
    count++;
  }
  static const int64_t one[1] = {1};
  static const float zero[1] = {0};
  if (extra)
    t[count++] = (st_out_tensor){extra, 1, one, zero};
  err e = {0};
  ck_assert_msg(st_write_f32(s->path, t, (int)count, NULL, 0, &e) == ERR_OK, "%s", e.msg);
  for (size_t i = 0; i < count; i++)
    if (t[i].data != zero)
      free((float *)t[i].data);
  free(t);
  free(shapes);
}

static void synth_clean(synth *s) {
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", s->dir);
  ck_assert_int_eq(system(cmd), 0);
  json_decref(s->fx);
}

/* Index (1-based, in the fixture's sorted order) of original tensor `name`. */
static int original_index(const json_t *orig, const char *name) {
  int index = 0;
  const char *k;
  const json_t *v;
  json_object_foreach((json_t *)orig, k, v) {
    index++;
    if (strcmp(k, name) == 0)
      return index;
  }
  return -1;
}

static void check_part(const sd_single *s, const json_t *fx, const char *part, sd_part which) {
  const json_t *orig = json_object_get(fx, "original");
  const json_t *list = json_object_get(json_object_get(fx, "parts"), part);
  const st_file *w = sd_single_weights(s, which);
  ck_assert_ptr_nonnull(w);
  ck_assert_msg(st_count(w) == (int)json_array_size(list), "%s: %d tensors, diffusers has %zu",
                part, st_count(w), json_array_size(list));
  size_t i;
  const json_t *row;
  json_array_foreach(list, i, row) {
    const char *dname = json_string_value(json_array_get(row, 0));
    const char *oname = json_string_value(json_array_get(row, 1));
    int64_t row0 = json_integer_value(json_array_get(row, 2));
    int64_t rows = json_integer_value(json_array_get(row, 3));
    const st_tensor_info *info = st_find(w, dname);
    ck_assert_msg(info, "%s: diffusers tensor '%s' (from '%s') is missing", part, dname, oname);
    const int t = original_index(orig, oname);
    ck_assert_int_gt(t, 0);
    const int64_t plane = rows ? info->count / rows : 0;
    float *v = malloc((size_t)info->count * sizeof *v);
    err e = {0};
    ck_assert_msg(st_read_f32(w, dname, 0, NULL, v, &e) == ERR_OK, "%s", e.msg);
    /* one assertion per tensor: Check reports every assertion through a pipe */
    int64_t k = 0;
    while (k < info->count && v[k] == value_at(t, row0 * plane + k))
      k++;
    ck_assert_msg(k == info->count, "%s: '%s'[%lld] is not '%s'[%lld]", part, dname, (long long)k,
                  oname, (long long)(row0 * plane + k));
    free(v);
  }
}

static void check_config(const sd_single *s, const json_t *fx, const char *part, sd_part which) {
  const json_t *want = json_object_get(json_object_get(fx, "config"), part);
  const json_t *got = sd_single_config(s, which);
  ck_assert_ptr_nonnull(got);
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)want, key, v) {
    char *a = json_dumps(v, JSON_ENCODE_ANY),
         *b = json_dumps(json_object_get(got, key), JSON_ENCODE_ANY);
    ck_assert_msg(b && strcmp(a, b) == 0, "%s config '%s': %s, diffusers has %s", part, key,
                  b ? b : "(absent)", a);
    free(a);
    free(b);
  }
}

static void check_family(int family) {
  synth sy = {0};
  synth_write(&sy, family, NULL, NULL);
  if (family == 2) { /* a 768-v model, as its YAML says */
    char yaml[160];
    snprintf(yaml, sizeof yaml, "%s/sd2.yaml", sy.dir);
    FILE *f = fopen(yaml, "w");
    fputs("model:\n  params:\n    parameterization: \"v\"\n", f);
    fclose(f);
  }
  sd_single *s = NULL;
  err e = {0};
  ck_assert_msg(sd_single_open(sy.path, &s, &e) == ERR_OK, "%s", e.msg);
  ck_assert_int_eq(sd_single_family(s), family);
  check_part(s, sy.fx, "unet", SD_PART_UNET);
  check_part(s, sy.fx, "vae", SD_PART_VAE);
  check_part(s, sy.fx, "text_encoder", SD_PART_TEXT_ENCODER);
  check_config(s, sy.fx, "unet", SD_PART_UNET);
  check_config(s, sy.fx, "vae", SD_PART_VAE);
  check_config(s, sy.fx, "text_encoder", SD_PART_TEXT_ENCODER);
  const json_t *sched = sd_single_config(s, SD_PART_SCHEDULER);
  const json_t *tok = sd_single_config(s, SD_PART_TOKENIZER);
  ck_assert_str_eq(json_string_value(json_object_get(sched, "prediction_type")),
                   family == 2 ? "v_prediction" : "epsilon");
  ck_assert_str_eq(json_string_value(json_object_get(tok, "pad_token")),
                   family == 2 ? "!" : "<|endoftext|>");
  ck_assert_int_eq(
      json_integer_value(json_object_get(sd_single_config(s, SD_PART_UNET), "sample_size")),
      family == 2 ? 96 : 64);
  ck_assert_ptr_null(sd_single_weights(s, SD_PART_SCHEDULER));
  /* The UNet part is one the UNet2DConditionModel loader takes as it is. */
  cunet *u = NULL;
  ck_assert_msg(cunet_load(sd_single_config(s, SD_PART_UNET), sd_single_weights(s, SD_PART_UNET),
                           &u, &e) == ERR_OK,
                "%s", e.msg);
  ck_assert_int_eq(cunet_get_shape(u)->cross_dim, family == 1 ? 64 : 128);
  cunet_free(u);
  sd_single_free(s);
  synth_clean(&sy);
}

START_TEST(sd1_is_seen_as_diffusers_sees_it) {
  check_family(1);
}
END_TEST

START_TEST(sd2_is_seen_as_diffusers_sees_it) {
  check_family(2);
}
END_TEST

/* Opens a variant of fixture `family` and expects an error mentioning `needle`. */
static void expect_refused(int family, const char *drop, const char *extra, int code,
                           const char *needle) {
  synth sy = {0};
  synth_write(&sy, family, drop, extra);
  sd_single *s = NULL;
  err e = {0};
  int rc = sd_single_open(sy.path, &s, &e);
  ck_assert_msg(rc == code, "expected code %d, got %d (%s)", code, rc, e.msg);
  ck_assert_ptr_null(s);
  ck_assert_msg(strstr(e.msg, needle), "'%s' should mention '%s'", e.msg, needle);
  synth_clean(&sy);
}

START_TEST(refuses_what_it_cannot_load) {
  /* SD 2.x without its YAML: the prediction type is unknown. */
  expect_refused(2, NULL, NULL, ERR_UNSUPPORTED, "sd2.yaml");
  expect_refused(1, NULL, "conditioner.embedders.1.model.token_embedding.weight", ERR_UNSUPPORTED,
                 "SD-XL");
  expect_refused(1, NULL, "model.diffusion_model.label_emb.0.0.weight", ERR_UNSUPPORTED,
                 "label embeddings");
  expect_refused(1, "cond_stage_model.", NULL, ERR_FORMAT, "no text encoder");
  expect_refused(1, "model.diffusion_model.", NULL, ERR_FORMAT, "not a Stable Diffusion");
  expect_refused(1, "first_stage_model.", NULL, ERR_FORMAT, "no VAE");
  expect_refused(1, "middle_block.1.", NULL, ERR_FORMAT, "mid block");
  expect_refused(1, NULL, "model.diffusion_model.output_blocks.3.7.weight", ERR_FORMAT,
                 "output_blocks.3.7.weight");
  expect_refused(1, NULL, "first_stage_model.encoder.mid.attn_1.zz.weight", ERR_FORMAT,
                 "mid.attn_1.zz");
  sd_single *s = NULL;
  err e = {0};
  ck_assert_int_eq(sd_single_open("/nonexistent/x.safetensors", &s, &e), ERR_IO);
}
END_TEST

START_TEST(views_check_their_rows) {
  synth sy = {0};
  synth_write(&sy, 1, NULL, NULL);
  st_file *f = NULL, *v = NULL;
  err e = {0};
  ck_assert_int_eq(st_open(sy.path, &f, &e), ERR_OK);
  const char *from = "model.diffusion_model.out.2.weight"; /* [4, 32, 3, 3] */
  st_alias ok[2] = {{"a", from, 1, 2}, {"b", from, 0, 0}};
  ck_assert_int_eq(st_view(f, ok, 2, &v, &e), ERR_OK);
  ck_assert_int_eq(st_find(v, "a")->shape[0], 2);
  ck_assert_int_eq(st_find(v, "a")->count, 2 * 32 * 9);
  ck_assert_int_eq(st_find(v, "b")->count, 4 * 32 * 9);
  st_close(v);
  st_alias beyond[1] = {{"a", from, 3, 2}};
  ck_assert_int_eq(st_view(f, beyond, 1, &v, &e), ERR_FORMAT);
  ck_assert_ptr_null(v);
  st_alias twice[2] = {{"a", from, 0, 0}, {"a", from, 0, 0}};
  ck_assert_int_eq(st_view(f, twice, 2, &v, &e), ERR_INVALID);
  st_alias missing[1] = {{"a", "nope", 0, 0}};
  ck_assert_int_eq(st_view(f, missing, 1, &v, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "nope"));
  st_close(f);
  synth_clean(&sy);
}
END_TEST

/* A single-file checkpoint with a tokenizer/ folder beside it samples as a pipeline, and
 * `denoised convert` writes the folder that samples the same bits. */
START_TEST(single_file_samples_as_its_converted_folder) {
  synth sy = {.small = 1, .vocab = 1514}; /* the vocabulary of the CLIP tokenizer fixture */
  synth_write(&sy, 1, NULL, NULL);
  char tok[256], cmd[1024], out[8192];
  snprintf(cmd, sizeof cmd, "cp -r %s %s/tokenizer",
           test_src_path(tok, sizeof tok, "tests/fixtures/clip/sd1/tokenizer"), sy.dir);
  ck_assert_int_eq(system(cmd), 0);
  const char *args = "--prompt 'a red letter' --seed 2 --scheduler ddim --steps 2 --size 64";
  int st = test_run_cli(out, sizeof out, "sample --model %s %s --out %s/a.npy --quiet", sy.path,
                        args, sy.dir);
  ck_assert_msg(st == 0, "%s", out);
  st = test_run_cli(out, sizeof out, "convert --model %s --out %s/pipe", sy.path, sy.dir);
  ck_assert_msg(st == 0, "%s", out);
  st = test_run_cli(out, sizeof out, "sample --model %s/pipe %s --out %s/b.npy --quiet", sy.dir,
                    args, sy.dir);
  ck_assert_msg(st == 0, "%s", out);
  char a[160], b[160];
  snprintf(a, sizeof a, "%s/a.npy", sy.dir);
  snprintf(b, sizeof b, "%s/b.npy", sy.dir);
  ck_assert_msg(test_files_equal(a, b), "the file and its converted folder sample differently");
  /* the images are pictures, not NaN or a constant */
  npy_array x;
  err e = {0};
  ck_assert_int_eq(npy_read_f32(a, &x, &e), ERR_OK);
  ck_assert_int_eq(x.count, 3 * 64 * 64);
  double lo = 1e9, hi = -1e9;
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < x.count; i++) {
    nonfinite += !isfinite(x.data[i]);
    lo = fmin(lo, x.data[i]);
    hi = fmax(hi, x.data[i]);
  }
  ck_assert_int_eq(nonfinite, 0);
  ck_assert(hi > lo);
  npy_array_free(&x);
  /* refusals: an existing --out, and a file without a tokenizer/ beside it */
  st = test_run_cli(out, sizeof out, "convert --model %s --out %s/pipe", sy.path, sy.dir);
  ck_assert_int_eq(st, 2);
  ck_assert_ptr_nonnull(strstr(out, "exists"));
  snprintf(cmd, sizeof cmd, "rm -rf %s/tokenizer", sy.dir);
  ck_assert_int_eq(system(cmd), 0);
  st = test_run_cli(out, sizeof out, "sample --model %s %s --out %s/c.npy", sy.path, args, sy.dir);
  ck_assert_int_ne(st, 0);
  ck_assert_msg(strstr(out, "tokenizer/ folder beside it"), "%s", out);
  synth_clean(&sy);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("sd_single");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, sd1_is_seen_as_diffusers_sees_it);
  tcase_add_test(tc, sd2_is_seen_as_diffusers_sees_it);
  tcase_add_test(tc, refuses_what_it_cannot_load);
  tcase_add_test(tc, views_check_their_rows);
  tcase_add_test(tc, single_file_samples_as_its_converted_folder);
  suite_add_tcase(s, tc);
  return s;
}
