/* The CLIP tokenizer and text encoder against OpenAI CLIP's reference (tools/gen_clip_fixtures.py):
 * token ids from the full released vocabulary and from a small one, hidden states of random
 * SD-1.x-like (quick_gelu, F32) and SD-2.x-like (gelu, F16, pad "!") encoders at the last layer
 * and clip skip 2, determinism across batching and threads, and the errors bad input gives. */
#include <jansson.h>

#include "clip.h"
#include "npy.h"
#include "sd_single.h"
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

static void write_text(const char *dir, const char *file, const char *text) {
  char path[256];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(text, f);
  fclose(f);
}

START_TEST(bad_tokenizer_files) {
  char dir[64], path[160];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  clip_tokenizer *t;
  err e = {0};
  ck_assert_int_ne(clip_tokenizer_new(dir, &t, &e), 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "vocab.json"));
  write_text(dir, "vocab.json",
             "{\"a\": 0, \"b\": 1, \"ab\": 2, \"<|startoftext|>\": 3, \"<|endoftext|>\": 4}");
  write_text(dir, "merges.txt", "#version: 0.2\na b\nonly-one-symbol\n");
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "merges.txt line 3"));
  write_text(dir, "merges.txt", "#version: 0.2\na b\n");
  write_text(dir, "special_tokens_map.json", "{\"pad_token\": \"<pad>\"}");
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "pad token \"<pad>\""));
  write_text(dir, "special_tokens_map.json", "{\"pad_token\": {\"content\": \"b\"}}");
  ck_assert_int_eq(clip_tokenizer_new(dir, &t, &e), 0);
  ck_assert_int_eq(clip_tokenizer_pad_id(t), 1);
  clip_tokenizer_free(t);
  write_text(dir, "tokenizer_config.json",
             "{\"model_max_length\": 1000000000000000019884624838656}");
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
    write_text(dir, "config.json", cases[i].json);
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
  root = json_load_file(cfg, 0, NULL);
  ck_assert_int_eq(clip_text_new_from(root, NULL, NULL, &m2, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "no tensors"));
  json_decref(root);
  json_decref(bad);
}
END_TEST

/* The clean-up against CLIP's own (real ftfy included) on every prompt of the full set, and the
 * documented deviation: no mojibake repair. */
START_TEST(clean_up_reference) {
  char path[512];
  json_t *clean =
      json_load_file(test_src_path(path, sizeof path, "tests/fixtures/clip/clean.json"), 0, NULL);
  ck_assert_ptr_nonnull(clean);
  json_t *ps = prompts("full"), *want = json_object_get(clean, "full");
  ck_assert_int_eq(json_array_size(ps), json_array_size(want));
  for (size_t i = 0; i < json_array_size(ps); i++) {
    const char *p = json_string_value(json_array_get(ps, i));
    char *out;
    err e = {0};
    ck_assert_int_eq(clip_clean_text(p, strlen(p), &out, &e), 0);
    ck_assert_str_eq(out, json_string_value(json_array_get(want, i)));
    free(out);
  }
  json_t *moji = json_object_get(clean, "mojibake");
  ck_assert_int_gt(json_array_size(moji), 0);
  for (size_t i = 0; i < json_array_size(moji); i++) {
    json_t *row = json_array_get(moji, i);
    const char *p = json_string_value(json_array_get(row, 0));
    char *out;
    err e = {0};
    ck_assert_int_eq(clip_clean_text(p, strlen(p), &out, &e), 0);
    ck_assert_str_ne(out, json_string_value(json_array_get(row, 1))); /* CLIP's */
    ck_assert_str_eq(out, json_string_value(json_array_get(row, 2)));
    free(out);
  }
  json_decref(ps);
  json_decref(clean);
}
END_TEST

/* The worst clean-up work a prompt can ask: entities escaped thousands of times over, which
 * ftfy undoes one level per round. Bounded and still right. */
START_TEST(deep_entities_are_bounded) {
  size_t n = CLIP_MAX_PROMPT_BYTES - 8;
  char *p = malloc(CLIP_MAX_PROMPT_BYTES + 1);
  memcpy(p, "&", 1);
  size_t len = 1;
  while (len + 4 <= n) {
    memcpy(p + len, "amp;", 4);
    len += 4;
  }
  char *out;
  err e = {0};
  double t0 = test_now_s();
  ck_assert_int_eq(clip_clean_text(p, len, &out, &e), 0);
  ck_assert_double_lt(test_now_s() - t0, 5.0);
  ck_assert_str_eq(out, "&");
  free(out);
  free(p);
}
END_TEST

/* `denoised encode-text` end to end: a pipeline folder, a text-encoder folder with --tokenizer,
 * the ids and hidden states it writes against the reference, and its errors. */
START_TEST(cli_encode_text) {
  char out[8192], dir[64], fx[512], ids_path[160], h_path[160];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_src_path(fx, sizeof fx, "tests/fixtures/clip");
  snprintf(ids_path, sizeof ids_path, "%s/ids.npy", dir);
  snprintf(h_path, sizeof h_path, "%s/h.npy", dir);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "encode-text --help"), 0);
  ck_assert_ptr_nonnull(strstr(out, "usage:"));
  /* prompts 0 and 1 of the model set (the second is empty), clip skip 2 */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/sd1 --prompt 'a photo of a cat' "
                                "--prompt '' --clip-skip 2 --out-ids %s --out %s",
                                fx, ids_path, h_path),
                   0);
  int64_t count, *want_ids = load_ids("tests/fixtures/clip/sd1/ids.npy", &count);
  int64_t *ids, shape[NPY_MAX_DIMS];
  int ndim;
  err e = {0};
  ck_assert_int_eq(npy_read_i64(ids_path, &ids, &count, &ndim, shape, &e), 0);
  ck_assert_int_eq(ndim, 2);
  ck_assert_int_eq(shape[0], 2);
  ck_assert_int_eq(memcmp(ids, want_ids, sizeof *ids * 2 * CTX), 0);
  npy_array h;
  ck_assert_int_eq(npy_read_f32(h_path, &h, &e), 0);
  float *want = load_f32("tests/fixtures/clip/sd1/hidden_skip2.npy", &count);
  ck_assert_int_eq(h.ndim, 3);
  ck_assert_int_eq(h.shape[1], CTX);
  ck_assert_double_lt(test_rel_l2(h.data, want, (size_t)h.count), 1e-4);
  npy_array_free(&h);
  free(want);
  free(ids);
  free(want_ids);
  /* a text-encoder folder and its tokenizer elsewhere (SD 2.x-like: pads with "!") */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/sd2/text_encoder --tokenizer "
                                "%s/sd2/tokenizer --prompt 'a photo of a cat' --out %s",
                                fx, fx, h_path),
                   0);
  ck_assert_int_eq(npy_read_f32(h_path, &h, &e), 0);
  want = load_f32("tests/fixtures/clip/sd2/hidden_last.npy", &count);
  ck_assert_double_lt(test_rel_l2(h.data, want, (size_t)h.count), 1e-4);
  npy_array_free(&h);
  free(want);
  /* errors: no tokenizer, clip skip past the layers, invalid UTF-8, missing flags */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/sd2/text_encoder --prompt x --out %s", fx,
                                h_path),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "--tokenizer"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/sd1 --prompt x --clip-skip 4 --out %s", fx,
                                h_path),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "clip skip 4"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/sd1 --prompt \"$(printf 'a\\377')\" "
                                "--out %s",
                                fx, h_path),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "--prompt 1: prompt is not valid UTF-8"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "encode-text --model %s/sd1 --out %s", fx, h_path),
                   2);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "encode-text --model %s/nothing --prompt x --out %s", fx, h_path),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "no such file or folder"));
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* The tensors of a checkpoint to write, owned. */
typedef struct ckpt {
  st_out_tensor t[1024];
  char names[1024][160];
  int64_t shapes[1024][4];
  float *data[1024];
  int n;
} ckpt;

static float *ckpt_add(ckpt *c, const char *name, int ndim, const int64_t *shape) {
  ck_assert_int_lt(c->n, 1024);
  int64_t count = 1;
  for (int d = 0; d < ndim; d++)
    count *= c->shapes[c->n][d] = shape[d];
  snprintf(c->names[c->n], sizeof c->names[0], "%s", name);
  c->data[c->n] = calloc((size_t)count, sizeof(float));
  c->t[c->n] = (st_out_tensor){c->names[c->n], ndim, c->shapes[c->n], c->data[c->n]};
  return c->data[c->n++];
}

/* Fixture tensor `from` (transformers' name, under text_model.) as OpenCLIP's `to`, or the
 * q, k and v projections fused into one (from: "...self_attn.%s_proj.weight"). */
static void ckpt_text(ckpt *c, const st_file *f, const char *from, const char *to) {
  char name[160];
  int fused = strstr(from, "%s") != NULL;
  snprintf(name, sizeof name, from, "q");
  const st_tensor_info *ti = st_find(f, name);
  ck_assert_msg(ti != NULL, "%s", name);
  int64_t shape[2] = {ti->shape[0] * (fused ? 3 : 1), ti->ndim > 1 ? ti->shape[1] : 0};
  float *dst = ckpt_add(c, to, ti->ndim, shape);
  const char *qkv[3] = {"q", "k", "v"};
  for (int k = 0; k < (fused ? 3 : 1); k++) {
    err e = {0};
    snprintf(name, sizeof name, from, qkv[k]);
    ck_assert_int_eq(st_read_f32(f, name, ti->ndim, ti->shape, dst + k * ti->count, &e), 0);
  }
}

/* An SD 2.x single-file checkpoint: the sd2 fixture encoder under OpenCLIP's names (q, k, v
 * fused), the UNet and VAE of tests/fixtures/sd_single/sd2.json (zeros: only their shapes
 * matter here) and the YAML beside it, in dir. */
static void write_sd2_checkpoint(const char *dir, const char *path) {
  char fpath[512];
  err e = {0};
  json_t *fx = json_load_file(
      test_src_path(fpath, sizeof fpath, "tests/fixtures/sd_single/sd2.json"), 0, NULL);
  ck_assert_ptr_nonnull(fx);
  ckpt *c = calloc(1, sizeof *c);
  const char *name;
  json_t *shape;
  json_object_foreach(json_object_get(fx, "original"), name, shape) {
    if (strncmp(name, "cond_stage_model.", 17) == 0)
      continue;
    int64_t s[4];
    for (size_t d = 0; d < json_array_size(shape); d++)
      s[d] = json_integer_value(json_array_get(shape, d));
    ckpt_add(c, name, (int)json_array_size(shape), s);
  }
  json_decref(fx);
  st_file *f;
  ck_assert_int_eq(st_open(test_src_path(fpath, sizeof fpath,
                                         "tests/fixtures/clip/sd2/text_encoder/model.safetensors"),
                           &f, &e),
                   0);
  const char *map[][2] = {
      {"embeddings.token_embedding.weight", "token_embedding.weight"},
      {"embeddings.position_embedding.weight", "positional_embedding"},
      {"final_layer_norm.weight", "ln_final.weight"},
      {"final_layer_norm.bias", "ln_final.bias"},
  };
  char from[160], to[160];
  for (int i = 0; i < 4; i++) {
    snprintf(from, sizeof from, "text_model.%s", map[i][0]);
    snprintf(to, sizeof to, "cond_stage_model.model.%s", map[i][1]);
    ckpt_text(c, f, from, to);
  }
  const char *layer[][2] = {
      {"layer_norm1.weight", "ln_1.weight"},
      {"layer_norm1.bias", "ln_1.bias"},
      {"layer_norm2.weight", "ln_2.weight"},
      {"layer_norm2.bias", "ln_2.bias"},
      {"self_attn.%s_proj.weight", "attn.in_proj_weight"},
      {"self_attn.%s_proj.bias", "attn.in_proj_bias"},
      {"self_attn.out_proj.weight", "attn.out_proj.weight"},
      {"self_attn.out_proj.bias", "attn.out_proj.bias"},
      {"mlp.fc1.weight", "mlp.c_fc.weight"},
      {"mlp.fc1.bias", "mlp.c_fc.bias"},
      {"mlp.fc2.weight", "mlp.c_proj.weight"},
      {"mlp.fc2.bias", "mlp.c_proj.bias"},
  };
  for (int l = 0; l < 3; l++)
    for (size_t i = 0; i < sizeof layer / sizeof layer[0]; i++) {
      snprintf(from, sizeof from, "text_model.encoder.layers.%d.%s", l, layer[i][0]);
      snprintf(to, sizeof to, "cond_stage_model.model.transformer.resblocks.%d.%s", l, layer[i][1]);
      ckpt_text(c, f, from, to);
    }
  st_close(f);
  ck_assert_msg(st_write_f32(path, c->t, c->n, NULL, 0, &e) == 0, "%s", e.msg);
  for (int i = 0; i < c->n; i++)
    free(c->data[i]);
  free(c);
  write_text(dir, "sd2.yaml", "model:\n  params:\n    parameterization: \"eps\"\n");
}

/* The SD 2.x checkpoint through engine/model's sd_single into the text room: the pad token of
 * the family (over the tokenizer folder's own), and hidden states as diffusers' converter
 * makes them (the penultimate layer is the output: the reference's clip-skip-2 states). */
START_TEST(single_file_checkpoint) {
  char dir[64], ck[160], tok[512], out[8192];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(ck, sizeof ck, "%s/sd2.safetensors", dir);
  write_sd2_checkpoint(dir, ck);
  err e = {0};
  sd_single *s;
  ck_assert_msg(sd_single_open(ck, &s, &e) == 0, "%s", e.msg);
  clip_tokenizer *t;
  test_src_path(tok, sizeof tok, "tests/fixtures/clip/sd1/tokenizer"); /* pads with the end */
  ck_assert_int_eq(clip_tokenizer_new_from(tok, sd_single_config(s, SD_PART_TOKENIZER), &t, &e), 0);
  /* sd_single takes SD's 64-wide heads (right for 768 and 1024 wide encoders); the fixture's
   * 32-wide one has 4 */
  json_t *cfg = json_deep_copy(sd_single_config(s, SD_PART_TEXT_ENCODER));
  ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_hidden_layers")), 2);
  json_object_set_new(cfg, "num_attention_heads", json_integer(4));
  clip_text_model *m;
  ck_assert_msg(clip_text_new_from(cfg, sd_single_weights(s, SD_PART_TEXT_ENCODER), ck, &m, &e) ==
                    0,
                "%s", e.msg);
  json_decref(cfg);
  sd_single_free(s);
  json_t *ps = prompts("model");
  int64_t count, *want_ids = load_ids("tests/fixtures/clip/sd2/ids.npy", &count);
  int n = (int)json_array_size(ps), d = clip_text_config_of(m)->hidden_size;
  int64_t *ids = malloc(sizeof *ids * (size_t)n * CTX);
  for (int i = 0; i < n; i++) {
    const char *p = json_string_value(json_array_get(ps, (size_t)i));
    ck_assert_int_eq(clip_tokenize(t, p, strlen(p), ids + (size_t)i * CTX, NULL, NULL, &e), 0);
  }
  ck_assert_int_eq(memcmp(ids, want_ids, sizeof *ids * (size_t)n * CTX), 0);
  float *h = malloc(sizeof(float) * (size_t)n * CTX * d);
  ck_assert_int_eq(clip_text_encode(m, ids, n, CTX, 1, h, NULL, &e), 0);
  float *want = load_f32("tests/fixtures/clip/sd2/hidden_skip2.npy", &count);
  for (int i = 0; i < n; i++)
    ck_assert_double_lt(
        test_rel_l2(h + (size_t)i * CTX * d, want + (size_t)i * CTX * d, (size_t)CTX * d), 1e-4);
  /* the command line wants the vocabulary of a single file from --tokenizer */
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "encode-text --model %s --prompt x --out %s/h.npy", ck, dir),
      2);
  ck_assert_ptr_nonnull(strstr(out, "--tokenizer"));
  free(want);
  free(h);
  free(ids);
  free(want_ids);
  json_decref(ps);
  clip_text_free(m);
  clip_tokenizer_free(t);
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
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
  tcase_add_test(tc, clean_up_reference);
  tcase_add_test(tc, deep_entities_are_bounded);
  tcase_add_test(tc, cli_encode_text);
  tcase_add_test(tc, single_file_checkpoint);
  suite_add_tcase(s, tc);
  return s;
}
