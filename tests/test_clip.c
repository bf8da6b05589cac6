/* The CLIP tokenizer and text encoder against OpenAI CLIP's reference (tools/gen_clip_fixtures.py):
 * token ids from the full released vocabulary and from a small one, hidden states of random
 * SD-1.x-like (quick_gelu, F32) and SD-2.x-like (gelu, F16, pad "!") encoders at the last layer
 * and clip skip 2, determinism across batching and threads, and the errors bad input gives. */
#include <jansson.h>

#include "clip.h"
#include "npy.h"
#include "testutil.h"

#define CTX 77

static json_t *prompts(const char *set) {
  char path[512];
  json_t *root =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/clip/prompts.json"), 0, NULL);
  ck_assert_ptr_nonnull(root);
  json_t *arr = json_incref(json_object_get(root, set));
  json_decref(root);
  ck_assert(json_is_array(arr));
  return arr;
}

static clip_tokenizer *load_tok(const char *rel) {
  char path[512];
  err e = {0};
  clip_tokenizer *t = NULL;
  ck_assert_msg(clip_tokenizer_new(test_src_path(path, sizeof path, rel), &t, &e) == 0, "%s",
                e.msg);
  return t;
}

static int64_t *load_ids(const char *rel, int64_t *count) {
  char path[512];
  err e = {0};
  int64_t *ids, shape[NPY_MAX_DIMS];
  int ndim;
  ck_assert_msg(
      npy_read_i64(test_src_path(path, sizeof path, rel), &ids, count, &ndim, shape, &e) == 0, "%s",
      e.msg);
  ck_assert_int_eq(ndim, 2);
  ck_assert_int_eq(shape[1], CTX);
  return ids;
}

/* Every prompt of the set tokenizes to the reference's ids. */
static void check_ids(const char *tok_dir, const char *ids_rel, const char *set) {
  clip_tokenizer *t = load_tok(tok_dir);
  ck_assert_int_eq(clip_tokenizer_length(t), CTX);
  json_t *ps = prompts(set);
  int64_t count, *want = load_ids(ids_rel, &count);
  ck_assert_int_eq(count, (int64_t)json_array_size(ps) * CTX);
  for (size_t i = 0; i < json_array_size(ps); i++) {
    const char *p = json_string_value(json_array_get(ps, i));
    int64_t got[CTX];
    err e = {0};
    ck_assert_msg(clip_tokenize(t, p, strlen(p), got, NULL, NULL, &e) == 0, "%s", e.msg);
    for (int k = 0; k < CTX; k++)
      ck_assert_msg(got[k] == want[i * CTX + k], "%s prompt %zu (%s) token %d: %lld, want %lld",
                    tok_dir, i, p, k, (long long)got[k], (long long)want[i * CTX + k]);
  }
  free(want);
  json_decref(ps);
  clip_tokenizer_free(t);
}

START_TEST(ids_full_vocabulary) {
  check_ids("tests/fixtures/clip/tok_full", "tests/fixtures/clip/tok_full/ids.npy", "full");
}
END_TEST

START_TEST(ids_small_vocabularies) {
  check_ids("tests/fixtures/clip/sd1/tokenizer", "tests/fixtures/clip/sd1/ids.npy", "model");
  check_ids("tests/fixtures/clip/sd2/tokenizer", "tests/fixtures/clip/sd2/ids.npy", "model");
}
END_TEST

START_TEST(truncation_and_padding) {
  clip_tokenizer *t = load_tok("tests/fixtures/clip/sd2/tokenizer");
  int64_t ids[CTX];
  int n, trunc;
  err e = {0};
  ck_assert_int_eq(clip_tokenize(t, "", 0, ids, &n, &trunc, &e), 0);
  ck_assert_int_eq(n, 0);
  ck_assert_int_eq(trunc, 0);
  ck_assert_int_eq(ids[2], clip_tokenizer_pad_id(t));
  ck_assert_int_eq(clip_tokenizer_pad_id(t), 0); /* "!" */
  /* the longest prompt accepted, one word: bounded work, 75 tokens kept, end token last */
  char *big = malloc(CLIP_MAX_PROMPT_BYTES);
  memset(big, 'q', CLIP_MAX_PROMPT_BYTES);
  double t0 = test_now_s();
  ck_assert_int_eq(clip_tokenize(t, big, CLIP_MAX_PROMPT_BYTES, ids, &n, &trunc, &e), 0);
  ck_assert_double_lt(test_now_s() - t0, 5.0);
  ck_assert_int_eq(n, CTX - 2);
  ck_assert_int_eq(trunc, 1);
  ck_assert_int_eq(ids[CTX - 1], ids[0] + 1); /* <|endoftext|> follows <|startoftext|> */
  ck_assert_int_eq(clip_tokenize(t, big, CLIP_MAX_PROMPT_BYTES + 1, ids, &n, &trunc, &e),
                   ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "bytes"));
  free(big);
  clip_tokenizer_free(t);
}
END_TEST

START_TEST(invalid_text) {
  clip_tokenizer *t = load_tok("tests/fixtures/clip/sd1/tokenizer");
  int64_t ids[CTX];
  const char *bad[] = {"caf\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\xff", "\x80"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    err e = {0};
    ck_assert_int_eq(clip_tokenize(t, bad[i], strlen(bad[i]), ids, NULL, NULL, &e), ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(e.msg, "UTF-8"));
  }
  err e = {0};
  ck_assert_int_eq(clip_tokenize(t, "a\0b", 3, ids, NULL, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "NUL"));
  clip_tokenizer_free(t);
}
END_TEST

START_TEST(clean_up) {
  const char *cases[][2] = {
      {"  Hello&amp;amp;   WORLD\t\n", "hello& world"},
      {"e\xcc\x81 \xef\xac\x81ne \xef\xbd\x86\xef\xbd\x95", "\xc3\xa9 fine fu"}, /* NFC, fi, ｆｕ */
      {"\xe2\x80\x9cit\xe2\x80\x99s\xe2\x80\x9d", "\"it's\""},
      {"\x1b[31mred\x1b[0m", "red"},
      {"&#0;&#x110000;&#65;&notit;", "\xef\xbf\xbd\xef\xbf\xbd"
                                     "a\xc2\xacit;"},
      {"\xc4\xb0", "i\xcc\x87"}, /* str.lower() of dotted capital I: two code points */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *out;
    err e = {0};
    ck_assert_int_eq(clip_clean_text(cases[i][0], strlen(cases[i][0]), &out, &e), 0);
    ck_assert_str_eq(out, cases[i][1]);
    free(out);
  }
}
END_TEST

START_TEST(bad_tokenizer_files) {
  char dir[64], path[160];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  clip_tokenizer *t;
  err e = {0};
  ck_assert_int_ne(clip_tokenizer_new(dir, &t, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "vocab.json"));
  snprintf(path, sizeof path, "%s/vocab.json", dir);
  FILE *f = fopen(path, "w");
  fputs("{\"a\": 0, \"b\": 1, \"ab\": 2, \"<|startoftext|>\": 3, \"<|endoftext|>\": 4}", f);
  fclose(f);
  snprintf(path, sizeof path, "%s/merges.txt", dir);
  f = fopen(path, "w");
  fputs("#version: 0.2\na b\nonly-one-symbol\n", f);
  fclose(f);
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "merges.txt line 3"));
  f = fopen(path, "w");
  fputs("#version: 0.2\na b\n", f);
  fclose(f);
  snprintf(path, sizeof path, "%s/special_tokens_map.json", dir);
  f = fopen(path, "w");
  fputs("{\"pad_token\": \"<pad>\"}", f);
  fclose(f);
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "pad token \"<pad>\""));
  f = fopen(path, "w");
  fputs("{\"pad_token\": {\"content\": \"b\"}}", f);
  fclose(f);
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), 0);
  ck_assert_int_eq(clip_tokenizer_pad_id(t), 1);
  clip_tokenizer_free(t);
  snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
  f = fopen(path, "w");
  fputs("{\"model_max_length\": 1000000000000000019884624838656}", f);
  fclose(f);
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "model_max_length"));
  const char *files[] = {"vocab.json", "merges.txt", "special_tokens_map.json",
                         "tokenizer_config.json"};
  for (int i = 0; i < 4; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    unlink(path);
  }
  rmdir(dir);
}
END_TEST

static float *load_f32(const char *rel, int64_t *count) {
  char path[512];
  err e = {0};
  npy_array a;
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &a, &e) == 0, "%s", e.msg);
  *count = a.count;
  return a.data;
}

/* Hidden states of a fixture encoder at clip skip 1 and 2 against the reference. */
static void check_hidden(const char *name) {
  char rel[256], path[512];
  err e = {0};
  clip_text_model *m;
  snprintf(rel, sizeof rel, "tests/fixtures/clip/%s/text_encoder", name);
  ck_assert_msg(clip_text_new(test_src_path(path, sizeof path, rel), &m, &e) == 0, "%s", e.msg);
  int d = clip_text_config_of(m)->hidden_size;
  int64_t count;
  snprintf(rel, sizeof rel, "tests/fixtures/clip/%s/ids.npy", name);
  int64_t *ids = load_ids(rel, &count);
  int n = (int)(count / CTX);
  float *got = malloc(sizeof(float) * count * d);
  pool *p = pool_new(2);
  const char *files[2] = {"hidden_last.npy", "hidden_skip2.npy"};
  for (int skip = 1; skip <= 2; skip++) {
    ck_assert_msg(clip_text_encode(m, ids, n, CTX, skip, got, p, &e) == 0, "%s", e.msg);
    snprintf(rel, sizeof rel, "tests/fixtures/clip/%s/%s", name, files[skip - 1]);
    int64_t wc;
    float *want = load_f32(rel, &wc);
    ck_assert_int_eq(wc, count * d);
    for (int i = 0; i < n; i++) {
      double r =
          test_rel_l2(got + (size_t)i * CTX * d, want + (size_t)i * CTX * d, (size_t)CTX * d);
      ck_assert_msg(r < 1e-4, "%s clip skip %d prompt %d: relative L2 %.3g", name, skip, i, r);
    }
    free(want);
  }
  /* one prompt alone, single-threaded, gives the bits it had in the batch on two threads */
  float *one = malloc(sizeof(float) * CTX * d);
  ck_assert_int_eq(clip_text_encode(m, ids + 3 * CTX, 1, CTX, 2, one, NULL, &e), 0);
  ck_assert_int_eq(memcmp(one, got + (size_t)3 * CTX * d, sizeof(float) * CTX * d), 0);
  free(one);
  pool_free(p);
  free(got);
  free(ids);
  clip_text_free(m);
}

START_TEST(hidden_sd1) {
  check_hidden("sd1");
}
END_TEST

START_TEST(hidden_sd2) {
  check_hidden("sd2");
}
END_TEST

START_TEST(encode_errors) {
  char path[512];
  err e = {0};
  clip_text_model *m;
  ck_assert_int_eq(
      clip_text_new(test_src_path(path, sizeof path, "tests/fixtures/clip/sd1/text_encoder"), &m,
                    &e),
      0);
  int d = clip_text_config_of(m)->hidden_size;
  int64_t ids[CTX] = {0};
  float *out = malloc(sizeof(float) * CTX * d);
  ck_assert_int_eq(clip_text_encode(m, ids, 1, CTX, 4, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "clip skip 4"));
  ck_assert_int_eq(clip_text_encode(m, ids, 1, CTX, 0, out, NULL, &e), ERR_INVALID);
  ck_assert_int_eq(clip_text_encode(m, ids, 1, CTX + 1, 1, out, NULL, &e), ERR_SHAPE);
  ids[5] = clip_text_config_of(m)->vocab_size;
  ck_assert_int_eq(clip_text_encode(m, ids, 1, CTX, 1, out, NULL, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "position 5"));
  ids[5] = -1;
  ck_assert_int_eq(clip_text_encode(m, ids, 1, CTX, 1, out, NULL, &e), ERR_INVALID);
  free(out);
  clip_text_free(m);
  /* a folder without the files, and a whole-CLIPModel config */
  ck_assert_int_ne(clip_text_new(test_src_path(path, sizeof path, "tests/fixtures/clip"), &m, &e),
                   0);
  ck_assert_ptr_nonnull(strstr(e.msg, "config.json"));
  char dir[64], cfg[160];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(cfg, sizeof cfg, "%s/config.json", dir);
#define SHAPE                                                                                      \
  "\"vocab_size\": 10, \"hidden_size\": 8, \"intermediate_size\": 16, "                            \
  "\"num_hidden_layers\": 1, \"max_position_embeddings\": 4, "
  const struct {
    const char *json, *needle;
    int code;
  } cases[] = {
      {"{\"text_config\": {}, \"vision_config\": {}}", "CLIPModel", ERR_UNSUPPORTED},
      {"{" SHAPE "\"num_attention_heads\": 2, \"hidden_act\": \"relu\"}", "relu", ERR_UNSUPPORTED},
      {"{" SHAPE "\"num_attention_heads\": 2, \"hidden_act\": 1}", "hidden_act", ERR_FORMAT},
      {"{" SHAPE "\"num_attention_heads\": 3}", "multiple", ERR_FORMAT},
      {"{" SHAPE "\"num_attention_heads\": 2}", "model.fp16.safetensors", ERR_IO},
  };
#undef SHAPE
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    FILE *f = fopen(cfg, "w");
    fputs(cases[i].json, f);
    fclose(f);
    ck_assert_int_eq(clip_text_new(dir, &m, &e), cases[i].code);
    ck_assert_msg(strstr(e.msg, cases[i].needle), "%s: %s", cases[i].json, e.msg);
  }
  unlink(cfg);
  rmdir(dir);
}
END_TEST

/* The loaders over parsed configs and an open tensor file (how a single-file checkpoint's
 * converted parts arrive): the same ids and bits as from the folders. */
START_TEST(from_config_objects) {
  char path[512];
  err e = {0};
  json_t *tok_cfg = json_pack("{s:s, s:i}", "pad_token", "!", "model_max_length", CTX);
  clip_tokenizer *a = load_tok("tests/fixtures/clip/sd2/tokenizer"), *b;
  ck_assert_int_eq(
      clip_tokenizer_new_from(test_src_path(path, sizeof path, "tests/fixtures/clip/sd1/tokenizer"),
                              tok_cfg, &b, &e),
      0);
  ck_assert_int_eq(clip_tokenizer_pad_id(b), clip_tokenizer_pad_id(a));
  int64_t ia[CTX], ib[CTX];
  const char *p = "a photo of a cat";
  ck_assert_int_eq(clip_tokenize(a, p, strlen(p), ia, NULL, NULL, &e), 0);
  ck_assert_int_eq(clip_tokenize(b, p, strlen(p), ib, NULL, NULL, &e), 0);
  ck_assert_int_eq(memcmp(ia, ib, sizeof ia), 0);
  clip_tokenizer_free(a);
  clip_tokenizer_free(b);
  json_decref(tok_cfg);

  clip_text_model *m1, *m2;
  test_src_path(path, sizeof path, "tests/fixtures/clip/sd2/text_encoder");
  ck_assert_int_eq(clip_text_new(path, &m1, &e), 0);
  char cfg[600], st[600];
  snprintf(cfg, sizeof cfg, "%s/config.json", path);
  snprintf(st, sizeof st, "%s/model.safetensors", path);
  json_t *root = json_load_file(cfg, 0, NULL);
  st_file *f;
  ck_assert_int_eq(st_open(st, &f, &e), 0);
  ck_assert_int_eq(clip_text_new_from(root, f, "sd2 view", &m2, &e), 0);
  st_close(f);
  json_decref(root);
  int d = clip_text_config_of(m1)->hidden_size;
  int64_t ids[CTX];
  for (int i = 0; i < CTX; i++)
    ids[i] = (i * 37) % clip_text_config_of(m1)->vocab_size;
  float *h1 = malloc(sizeof(float) * CTX * d), *h2 = malloc(sizeof(float) * CTX * d);
  ck_assert_int_eq(clip_text_encode(m1, ids, 1, CTX, 1, h1, NULL, &e), 0);
  ck_assert_int_eq(clip_text_encode(m2, ids, 1, CTX, 1, h2, NULL, &e), 0);
  ck_assert_int_eq(memcmp(h1, h2, sizeof(float) * CTX * d), 0);
  free(h1);
  free(h2);
  clip_text_free(m1);
  clip_text_free(m2);
  /* a config that is not an object names its source */
  json_t *bad = json_array();
  ck_assert_int_eq(clip_text_new_from(bad, NULL, "sd2 view", &m2, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "sd2 view"));
  json_decref(bad);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("clip");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, ids_full_vocabulary);
  tcase_add_test(tc, ids_small_vocabularies);
  tcase_add_test(tc, truncation_and_padding);
  tcase_add_test(tc, invalid_text);
  tcase_add_test(tc, clean_up);
  tcase_add_test(tc, bad_tokenizer_files);
  tcase_add_test(tc, hidden_sd1);
  tcase_add_test(tc, hidden_sd2);
  tcase_add_test(tc, encode_errors);
  tcase_add_test(tc, from_config_objects);
  suite_add_tcase(s, tc);
  return s;
}
