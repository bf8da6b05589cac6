/* UNet2DConditionModel (Stable Diffusion 1.x/2.x): parity with diffusers on the committed
 * fixtures (and on extra fixture folders named by DENOISED_CUNET_FIXTURES), determinism across
 * threads and batching, the pipeline layout, the CLI's --encoder-hidden-states, and clear
 * refusals of what is not supported (SD-XL's added conditioning and the like). */
#include <jansson.h>
#include <math.h>
#include <unistd.h>

#include "model.h"
#include "npy.h"
#include "testutil.h"

static const char *const fixtures[] = {"sd1_small", "sd2_small"};

typedef struct fixture {
  npy_array x, t, ehs, ref;
} fixture;

static void fixture_read(const char *dir, fixture *fx) {
  const char *names[4] = {"input", "timesteps", "encoder_hidden_states", "output"};
  npy_array *arrs[4] = {&fx->x, &fx->t, &fx->ehs, &fx->ref};
  char path[1200];
  err e = {0};
  for (int i = 0; i < 4; i++) {
    snprintf(path, sizeof path, "%s/%s.npy", dir, names[i]);
    ck_assert_msg(npy_read_f32(path, arrs[i], &e) == 0, "%s", e.msg);
  }
}

static void fixture_free(fixture *fx) {
  npy_array_free(&fx->x);
  npy_array_free(&fx->t);
  npy_array_free(&fx->ehs);
  npy_array_free(&fx->ref);
}

/* The call of images [i0, i0 + n) of the fixture on `threads` threads. */
static model_call fixture_call(const fixture *fx, int i0, int n, int threads) {
  const int seq = (int)fx->ehs.shape[1], d = (int)fx->ehs.shape[2];
  const size_t per = (size_t)fx->x.count / fx->x.shape[0];
  return (model_call){.x = fx->x.data + per * i0,
                      .n = n,
                      .h = (int)fx->x.shape[2],
                      .w = (int)fx->x.shape[3],
                      .t = fx->t.data + i0,
                      .encoder_hidden_states = fx->ehs.data + (size_t)i0 * seq * d,
                      .seq_len = seq,
                      .threads = threads};
}

static double run_fixture(const char *dir) {
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s: %s", dir, e.msg);
  const model_info *mi = model_get_info(m);
  ck_assert_int_eq(mi->kind, MODEL_UNET2D_CONDITION);
  fixture fx;
  fixture_read(dir, &fx);
  ck_assert_int_eq(mi->cross_attention_dim, (int)fx.ehs.shape[2]);
  const int n = (int)fx.x.shape[0];
  float *out = malloc(sizeof(float) * (size_t)fx.ref.count);
  float *out1 = malloc(sizeof(float) * (size_t)fx.ref.count);
  model_call c = fixture_call(&fx, 0, n, 2);
  ck_assert_msg(model_run(m, &c, out, &e) == 0, "%s", e.msg);
  const double rel = test_rel_l2(out, fx.ref.data, (size_t)fx.ref.count);
  /* one thread gives the same bits, and so does the last image alone */
  c.threads = 1;
  ck_assert_int_eq(model_run(m, &c, out1, &e), 0);
  ck_assert(memcmp(out1, out, sizeof(float) * (size_t)fx.ref.count) == 0);
  const size_t per = (size_t)fx.ref.count / n;
  c = fixture_call(&fx, n - 1, 1, 2);
  ck_assert_int_eq(model_run(m, &c, out1, &e), 0);
  ck_assert(memcmp(out1, out + per * (n - 1), sizeof(float) * per) == 0);
  free(out);
  free(out1);
  fixture_free(&fx);
  model_free(m);
  return rel;
}

START_TEST(parity_with_diffusers) {
  char dir[1024], rel[256];
  for (size_t i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) {
    snprintf(rel, sizeof rel, "tests/fixtures/cunet/%s", fixtures[i]);
    test_src_path(dir, sizeof dir, rel);
    const double e = run_fixture(dir);
    printf("cunet parity %-10s rel L2 %.3g\n", fixtures[i], e);
    ck_assert_msg(e < 1e-4, "%s: relative L2 %g", fixtures[i], e);
  }
}
END_TEST

/* Extra fixture folders (tools/gen_cunet_fixtures.py with other seeds, batches and keys) listed
 * colon-separated in DENOISED_CUNET_FIXTURES. */
START_TEST(parity_extra_fixtures) {
  const char *list = getenv("DENOISED_CUNET_FIXTURES");
  if (!list || !*list)
    return;
  char *copy = strdup(list), *save = NULL;
  for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
    const double e = run_fixture(d);
    printf("cunet parity %s rel L2 %.3g\n", d, e);
    ck_assert_msg(e < 1e-4, "%s: relative L2 %g", d, e);
  }
  free(copy);
}
END_TEST

/* ---------- configs changed on a copy ---------- */

/* A copy of fixture `name` in a scratch folder whose config.json is the fixture's with `set`
 * (a JSON object) merged in and the keys of `del` (a JSON array, or NULL) removed. */
static const char *changed_model(char *dir, size_t n, const char *name, const char *set,
                                 const char *del) {
  char src[1024], path[1400], cmd[3000];
  snprintf(path, sizeof path, "tests/fixtures/cunet/%s", name);
  test_src_path(src, sizeof src, path);
  test_tmpdir(dir, n);
  snprintf(cmd, sizeof cmd, "ln -s %s/diffusion_pytorch_model.safetensors %s/", src, dir);
  ck_assert_int_eq(system(cmd), 0);
  snprintf(path, sizeof path, "%s/config.json", src);
  json_t *cfg = json_load_file(path, 0, NULL), *upd = json_loads(set, 0, NULL);
  ck_assert_ptr_nonnull(cfg);
  ck_assert_msg(upd != NULL, "bad test JSON %s", set);
  json_object_update(cfg, upd);
  json_t *dels = del ? json_loads(del, 0, NULL) : NULL;
  for (size_t i = 0; dels && i < json_array_size(dels); i++)
    json_object_del(cfg, json_string_value(json_array_get(dels, i)));
  snprintf(path, sizeof path, "%s/config.json", dir);
  ck_assert_int_eq(json_dump_file(cfg, path, 0), 0);
  json_decref(cfg);
  json_decref(upd);
  json_decref(dels);
  return dir;
}

static void expect_refusal(const char *name, const char *set, const char *needle) {
  char dir[256];
  changed_model(dir, sizeof dir, name, set, NULL);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) != 0, "%s: expected an error mentioning '%s'", set, needle);
  ck_assert_ptr_null(m);
  ck_assert_msg(strstr(e.msg, needle), "%s: error '%s' should mention '%s'", set, e.msg, needle);
}

START_TEST(unsupported_configs_are_refused_by_key) {
  /* SD-XL and other families' extras, each named */
  expect_refusal("sd1_small", "{\"addition_embed_type\": \"text_time\"}", "addition_embed_type");
  expect_refusal("sd1_small", "{\"addition_time_embed_dim\": 256}", "addition_time_embed_dim");
  expect_refusal("sd1_small", "{\"class_embed_type\": \"timestep\"}", "class_embed_type");
  expect_refusal("sd1_small", "{\"encoder_hid_dim\": 768}", "encoder_hid_dim");
  expect_refusal("sd1_small", "{\"only_cross_attention\": true}", "only_cross_attention");
  expect_refusal("sd1_small", "{\"only_cross_attention\": [false, true]}", "only_cross_attention");
  expect_refusal("sd1_small", "{\"attention_type\": \"gated\"}", "attention_type");
  expect_refusal("sd1_small", "{\"dual_cross_attention\": true}", "dual_cross_attention");
  expect_refusal("sd1_small", "{\"time_embedding_act_fn\": \"silu\"}", "time_embedding_act_fn");
  expect_refusal("sd1_small", "{\"mystery_knob\": 1}", "mystery_knob");
  expect_refusal("sd1_small", "{\"mid_block_type\": \"UNetMidBlock2DSimpleCrossAttn\"}",
                 "mid_block_type");
  expect_refusal("sd1_small",
                 "{\"down_block_types\": [\"SimpleCrossAttnDownBlock2D\", \"DownBlock2D\"]}",
                 "SimpleCrossAttnDownBlock2D");
  expect_refusal("sd1_small", "{\"norm_num_groups\": null}", "norm_num_groups");
  /* values that do not fit the network */
  expect_refusal("sd1_small", "{\"cross_attention_dim\": [32, 16]}", "cross_attention_dim");
  expect_refusal("sd1_small", "{\"attention_head_dim\": [8, 8, 8]}", "attention_head_dim");
  expect_refusal("sd1_small", "{\"attention_head_dim\": 5}", "heads");
  expect_refusal("sd1_small", "{\"conv_in_kernel\": 2}", "conv_in_kernel");
  /* a config that disagrees with the weights names the tensor */
  expect_refusal("sd1_small", "{\"use_linear_projection\": true}",
                 "down_blocks.0.attentions.0.proj_in.weight");
  expect_refusal("sd1_small", "{\"transformer_layers_per_block\": 2}",
                 "down_blocks.0.attentions.0.transformer_blocks.1.norm1.weight");
  expect_refusal("sd2_small", "{\"cross_attention_dim\": 32}", "attn2.to_k.weight");
}
END_TEST

/* num_attention_heads, when given, is the head count (attention_head_dim then unused): the same
 * network as the fixture's attention_head_dim, whose name diffusers reads as the head count. */
START_TEST(num_attention_heads_is_the_head_count) {
  char dir[1024], changed[256];
  test_src_path(dir, sizeof dir, "tests/fixtures/cunet/sd2_small");
  changed_model(changed, sizeof changed, "sd2_small",
                "{\"num_attention_heads\": [2, 4, 4], \"attention_head_dim\": 99}", NULL);
  model *m = NULL, *m2 = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  ck_assert_msg(model_load(changed, &m2, &e) == 0, "%s", e.msg);
  fixture fx;
  fixture_read(dir, &fx);
  float *a = malloc(sizeof(float) * (size_t)fx.ref.count);
  float *b = malloc(sizeof(float) * (size_t)fx.ref.count);
  const model_call c = fixture_call(&fx, 0, (int)fx.x.shape[0], 2);
  ck_assert_int_eq(model_run(m, &c, a, &e), 0);
  ck_assert_int_eq(model_run(m2, &c, b, &e), 0);
  ck_assert(memcmp(a, b, sizeof(float) * (size_t)fx.ref.count) == 0);
  /* and a different head count is a different network */
  model_free(m2);
  changed_model(changed, sizeof changed, "sd2_small", "{\"num_attention_heads\": [1, 2, 2]}", NULL);
  ck_assert_msg(model_load(changed, &m2, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(model_run(m2, &c, b, &e), 0);
  ck_assert(test_rel_l2(b, a, (size_t)fx.ref.count) > 1e-4);
  free(a);
  free(b);
  fixture_free(&fx);
  model_free(m);
  model_free(m2);
}
END_TEST

/* ---------- calls ---------- */

START_TEST(call_errors) {
  char dir[1024];
  test_src_path(dir, sizeof dir, "tests/fixtures/cunet/sd1_small");
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  fixture fx;
  fixture_read(dir, &fx);
  float *out = malloc(sizeof(float) * (size_t)fx.ref.count);
  /* without hidden states: refused, and model_eval (no conditioning) too */
  model_call c = fixture_call(&fx, 0, 1, 1);
  c.encoder_hidden_states = NULL;
  ck_assert_int_eq(model_run(m, &c, out, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "encoder hidden states"), "%s", e.msg);
  ck_assert_int_ne(model_eval(m, c.x, 1, c.h, c.w, c.t, NULL, out, 1, &e), 0);
  ck_assert_msg(strstr(e.msg, "encoder hidden states"), "%s", e.msg);
  c = fixture_call(&fx, 0, 1, 1);
  c.seq_len = 0;
  ck_assert_int_eq(model_run(m, &c, out, &e), ERR_INVALID);
  c = fixture_call(&fx, 0, 1, 1);
  c.h = c.w = 9; /* not a multiple of 2 for two levels */
  ck_assert_int_eq(model_run(m, &c, out, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "multiple of"), "%s", e.msg);
  float *bad = malloc(sizeof(float) * (size_t)fx.ehs.count);
  memcpy(bad, fx.ehs.data, sizeof(float) * (size_t)fx.ehs.count);
  bad[3] = NAN;
  c = fixture_call(&fx, 0, 1, 1);
  c.encoder_hidden_states = bad;
  ck_assert_int_eq(model_run(m, &c, out, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "finite"), "%s", e.msg);
  /* FLOPs and the h-space shape come from a dry pass */
  int shape[3];
  ck_assert_int_eq(model_mid_shape(m, 16, 16, shape, &e), 0);
  ck_assert_int_eq(shape[0], 32);
  ck_assert_int_eq(shape[1], 8);
  ck_assert(model_flops(m, 16, 16) > 0);
  ck_assert_int_gt(model_param_count(m), 0);
  free(bad);
  free(out);
  model_free(m);
  /* a model without text conditioning refuses hidden states rather than ignore them */
  test_src_path(dir, sizeof dir, "tests/fixtures/unet/cifar_small");
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  float x[3 * 16 * 16] = {0}, y[3 * 16 * 16], t = 5;
  c = (model_call){.x = x, .n = 1, .h = 16, .w = 16, .t = &t, .threads = 1};
  c.encoder_hidden_states = fx.ehs.data;
  c.seq_len = 1;
  ck_assert_int_eq(model_run(m, &c, y, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "encoder hidden states"), "%s", e.msg);
  model_free(m);
  fixture_free(&fx);
}
END_TEST

/* A Stable-Diffusion pipeline folder (model_index.json, unet/, scheduler/ with SD's own
 * PNDMScheduler config) loads its UNet2DConditionModel. */
START_TEST(pipeline_layout_loads) {
  char dir[256], src[1024], cmd[3000];
  test_tmpdir(dir, sizeof dir);
  test_src_path(src, sizeof src, "tests/fixtures/cunet/sd1_small");
  snprintf(cmd, sizeof cmd,
           "mkdir -p %s/unet %s/scheduler && cp %s/config.json "
           "%s/diffusion_pytorch_model.safetensors %s/unet/ && "
           "echo '{\"_class_name\": \"StableDiffusionPipeline\", \"unet\": [\"diffusers\", "
           "\"UNet2DConditionModel\"]}' > %s/model_index.json && "
           "echo '{\"_class_name\": \"PNDMScheduler\", \"beta_end\": 0.012, \"beta_schedule\": "
           "\"scaled_linear\", \"beta_start\": 0.00085, \"num_train_timesteps\": 1000, "
           "\"set_alpha_to_one\": false, \"skip_prk_steps\": true, \"steps_offset\": 1, "
           "\"trained_betas\": null, \"clip_sample\": false}' > "
           "%s/scheduler/scheduler_config.json",
           dir, dir, src, src, dir, dir, dir);
  ck_assert_int_eq(system(cmd), 0);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == 0, "%s", e.msg);
  const model_info *mi = model_get_info(m);
  ck_assert_int_eq(mi->kind, MODEL_UNET2D_CONDITION);
  ck_assert_str_eq(mi->class_name, "UNet2DConditionModel");
  ck_assert_int_eq(mi->cross_attention_dim, 32);
  ck_assert_int_eq(mi->in_channels, 4);
  ck_assert_int_eq(mi->sample_size, 16);
  ck_assert_ptr_nonnull(strstr(model_scheduler_config_path(m), "scheduler/scheduler_config.json"));
  model_free(m);
}
END_TEST

START_TEST(cli_forward_with_hidden_states) {
  char dir[1024], tmp[256], out[8192];
  test_src_path(dir, sizeof dir, "tests/fixtures/cunet/sd2_small");
  test_tmpdir(tmp, sizeof tmp);
  int rc = test_run_cli(out, sizeof out,
                        "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                        "--encoder-hidden-states %s/encoder_hidden_states.npy --out %s/o.npy",
                        dir, dir, dir, dir, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  npy_array got, ref;
  err e = {0};
  char path[1400];
  snprintf(path, sizeof path, "%s/o.npy", tmp);
  ck_assert_int_eq(npy_read_f32(path, &got, &e), 0);
  snprintf(path, sizeof path, "%s/output.npy", dir);
  ck_assert_int_eq(npy_read_f32(path, &ref, &e), 0);
  ck_assert_int_eq(got.count, ref.count);
  ck_assert(test_rel_l2(got.data, ref.data, (size_t)ref.count) < 1e-4);
  npy_array_free(&got);
  npy_array_free(&ref);
  /* without them: told what to give */
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy --out "
                    "%s/o.npy",
                    dir, dir, dir, tmp);
  ck_assert_int_ne(rc, 0);
  ck_assert_msg(strstr(out, "--encoder-hidden-states"), "%s", out);
  /* of the wrong width: the expected shape is named */
  rc = test_run_cli(out, sizeof out,
                    "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                    "--encoder-hidden-states %s/input.npy --out %s/o.npy",
                    dir, dir, dir, dir, tmp);
  ck_assert_int_ne(rc, 0);
  ck_assert_msg(strstr(out, "S, 24]"), "%s", out);
  rc = test_run_cli(out, sizeof out, "forward --help");
  ck_assert_int_eq(rc, 0);
  ck_assert_ptr_nonnull(strstr(out, "--encoder-hidden-states"));
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("cunet");
  TCase *tc = tcase_create("cunet");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, parity_with_diffusers);
  tcase_add_test(tc, parity_extra_fixtures);
  tcase_add_test(tc, unsupported_configs_are_refused_by_key);
  tcase_add_test(tc, num_attention_heads_is_the_head_count);
  tcase_add_test(tc, call_errors);
  tcase_add_test(tc, pipeline_layout_loads);
  tcase_add_test(tc, cli_forward_with_hidden_states);
  suite_add_tcase(s, tc);
  return s;
}
