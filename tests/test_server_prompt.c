/* Prompts in the daemon: a Stable-Diffusion pipeline folder (tests/fixtures/sd_pipeline/tiny)
 * served beside the analytic default model. A prompt job runs to completion through the same
 * pipeline entry as `denoised sample --prompt` (the same pixels), its PNG carries A1111's prompt
 * lines and replays with the CLI; every bad field is a 400 naming it; /v1/models says which
 * model takes prompts and what sizes; the A1111 route sends prompts to the text encoder (a
 * webuiapi-shaped txt2img makes the native job's pictures) and lists the pipeline; a queued
 * prompt job survives kill -9 with its prompts. */
#include "testhttp.h"

#define FIXTURE "tests/fixtures/sd_pipeline/tiny"
#define LONG_JOB                                                                                   \
  "{\"model\": \"default\", \"class_label\": 0, \"seed\": 5, \"batch_size\": 8, "                  \
  "\"scheduler\": {\"name\": \"ddpm\", \"steps\": 1000}}"
#define CAT_JOB                                                                                    \
  "{\"model\": \"sd\", \"prompt\": \"a photo of a cat\", \"negative_prompt\": \"blurry\", "        \
  "\"clip_skip\": 2, \"seed\": 3, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 5}}"

/* The daemon's arguments: the default model and the pipeline as "sd" (paths kept static), then
 * up to four more (NULL ends them). */
static const char *const *prompt_args4(const char *a, const char *b, const char *c,
                                       const char *dd) {
  static char def[1100], sd[1100];
  static const char *args[10];
  char p[1024];
  snprintf(def, sizeof def, "default=%s", test_src_path(p, sizeof p, "models/shapes-gmm"));
  snprintf(sd, sizeof sd, "sd=%s", test_src_path(p, sizeof p, FIXTURE));
  int n = 0;
  args[n++] = "--model";
  args[n++] = def;
  args[n++] = "--model";
  args[n++] = sd;
  const char *more[] = {a, b, c, dd};
  for (int i = 0; i < 4 && more[i]; i++)
    args[n++] = more[i];
  args[n] = NULL;
  return args;
}

static const char *const *prompt_args(const char *a, const char *b) {
  return prompt_args4(a, b, NULL, NULL);
}

/* The pixels of PNG bytes (at most 64x64) and their size. */
static uint8_t *png_pixels(const void *png, size_t len, int *h, int *w) {
  uint8_t *px = NULL;
  err e = {0};
  ck_assert_msg(image_png_decode(png, len, 64, 64, &px, h, w, &e) == 0, "%s", e.msg);
  return px;
}

START_TEST(prompt_job_runs_as_the_cli_does) {
  char st[512], dir[256], path[700], fix[1024], out[8192];
  test_tmpdir(dir, sizeof dir);
  test_src_path(fix, sizeof fix, FIXTURE);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), prompt_args(NULL, NULL)), 0);
  char id[64];
  submit_job(&d, CAT_JOB, id, sizeof id);
  wait_state(&d, id, "succeeded", 120);
  size_t len;
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  char *view = get_body(&d, path, &len);
  json_t *j = json_loads(view, 0, NULL);
  free(view);
  json_t *req = json_object_get(j, "request");
  ck_assert_str_eq(json_string_value(json_object_get(req, "prompt")), "a photo of a cat");
  ck_assert_str_eq(json_string_value(json_object_get(req, "negative_prompt")), "blurry");
  ck_assert_int_eq(json_integer_value(json_object_get(req, "clip_skip")), 2);
  ck_assert_int_eq(json_integer_value(json_object_get(req, "width")), 32); /* 16 latents x 2 */
  /* StableDiffusionPipeline's guidance when none is given; no null class on a text model */
  json_t *g = json_object_get(req, "guidance");
  ck_assert(json_number_value(json_object_get(g, "scale")) == 7.5);
  ck_assert_ptr_null(json_object_get(g, "null_class"));
  json_decref(j);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  char *png = get_body(&d, path, &len);
  daemon_stop(&d);
  char file[700];
  snprintf(file, sizeof file, "%s/job.png", dir);
  write_file(file, (const uint8_t *)png, len);
  /* A1111's infotext: the prompt, its Negative prompt line, then the settings with clip skip */
  char *info = NULL;
  err e = {0};
  ck_assert_int_eq(image_png_read_text(file, "parameters", &info, &e), 0);
  ck_assert_msg(strncmp(info, "a photo of a cat\nNegative prompt: blurry\nSteps: 5, ", 51) == 0,
                "%s", info);
  ck_assert_ptr_nonnull(strstr(info, ", CFG scale: 7.5, Clip skip: 2"));
  free(info);
  /* the CLI with the same settings makes the same pixels, and replays the job's PNG */
  int st_cli =
      test_run_cli(out, sizeof out,
                   "sample --model %s --prompt 'a photo of a cat' --negative-prompt blurry "
                   "--clip-skip 2 --seed 3 --scheduler dpm++2m --steps 5 "
                   "--guidance-scale 7.5 -o %s/cli.png --quiet",
                   fix, dir);
  ck_assert_msg(st_cli == 0, "%s", out);
  snprintf(path, sizeof path, "%s/cli.png", dir);
  size_t clen;
  uint8_t *cli = read_file_all(path, &clen);
  int h, w, h2, w2;
  uint8_t *a = png_pixels(png, len, &h, &w), *b = png_pixels(cli, clen, &h2, &w2);
  ck_assert(h == 32 && w == 32 && h2 == 32 && w2 == 32);
  ck_assert_msg(memcmp(a, b, 32 * 32 * 3) == 0, "the daemon's job and the CLI differ");
  st_cli = test_run_cli(out, sizeof out, "sample --replay %s --model %s -o %s/replay.png --quiet",
                        file, fix, dir);
  ck_assert_msg(st_cli == 0, "replay of the job's PNG: %s", out);
  free(a);
  free(b);
  free(cli);
  free(png);
}
END_TEST

START_TEST(models_say_which_take_prompts) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), prompt_args(NULL, NULL)), 0);
  size_t len;
  char *body = get_body(&d, "/v1/models", &len);
  json_t *j = json_loads(body, 0, NULL);
  free(body);
  json_t *models = json_object_get(j, "models");
  ck_assert_int_eq(json_array_size(models), 2);
  for (size_t i = 0; i < 2; i++) {
    json_t *m = json_array_get(models, i);
    const int sd = strcmp(json_string_value(json_object_get(m, "name")), "sd") == 0;
    ck_assert_int_eq(json_is_true(json_object_get(m, "text_conditional")), sd);
    ck_assert_int_eq(json_integer_value(json_object_get(m, "latent_factor")), sd ? 2 : 1);
    ck_assert_int_eq(json_integer_value(json_object_get(m, "sample_size")), 32);
    json_t *sizes = json_object_get(m, "sizes");
    ck_assert_int_eq(json_integer_value(json_object_get(sizes, "default")), 32);
    if (sd) {
      ck_assert_int_eq(json_integer_value(json_object_get(sizes, "multiple_of")), 16);
      ck_assert_int_eq(json_integer_value(json_object_get(m, "channels")), 3);
      json_t *te = json_object_get(m, "text_encoder");
      ck_assert_int_eq(json_integer_value(json_object_get(te, "layers")), 3);
      ck_assert_int_eq(json_integer_value(json_object_get(te, "tokens")), 77);
    } else {
      ck_assert(json_is_null(json_object_get(sizes, "multiple_of"))); /* its own size only */
      ck_assert_ptr_null(json_object_get(m, "text_encoder"));
    }
  }
  json_decref(j);
  daemon_stop(&d);
}
END_TEST

START_TEST(bad_fields_are_named) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), prompt_args(NULL, NULL)), 0);
  static const struct {
    const char *body, *code, *field;
  } cases[] = {
      {"{\"model\": \"sd\"}", "missing_field", "prompt"},
      {"{\"model\": \"sd\", \"prompt\": 7}", "wrong_type", "prompt"},
      {"{\"model\": \"sd\", \"prompt\": \"a\\u0000b\"}", "invalid_json", NULL}, /* JSON parser */
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"negative_prompt\": [\"x\"]}", "wrong_type",
       "negative_prompt"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"clip_skip\": 4}", "out_of_range", "clip_skip"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"clip_skip\": 0}", "out_of_range", "clip_skip"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"clip_skip\": \"2\"}", "wrong_type", "clip_skip"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"class_label\": 1}", "invalid_field",
       "class_label"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"width\": 40}", "invalid_field", "width"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"height\": 24}", "invalid_field", "height"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"guidance\": {\"scale\": 5, \"null_class\": 0}}",
       "invalid_field", "guidance.null_class"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"guidance\": {\"scale\": 51}}", "out_of_range",
       "guidance.scale"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"preview\": {\"every\": 2}}", "invalid_field",
       "preview"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"edit\": {\"type\": \"invert_ddim\"}}",
       "invalid_field", "edit.type"},
      {"{\"model\": \"sd\", \"prompt\": \"cat\", \"edit\": {\"type\": \"img2img\", \"strength\": "
       "0.5}}",
       "missing_field", "input_image"},
      {"{\"model\": \"default\", \"class_label\": 1, \"prompt\": \"cat\"}", "invalid_field",
       "prompt"},
      {"{\"model\": \"default\", \"class_label\": 1, \"negative_prompt\": \"\"}", "invalid_field",
       "negative_prompt"},
      {"{\"model\": \"default\", \"class_label\": 1, \"clip_skip\": 2}", "invalid_field",
       "clip_skip"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
    expect_error(&d, "POST", "/v1/jobs", cases[i].body, 400, cases[i].code, cases[i].field);
  /* a prompt over CLIP's 16 KiB bound */
  const size_t n = 16385;
  char *body = malloc(n + 64);
  int k = sprintf(body, "{\"model\": \"sd\", \"prompt\": \"");
  memset(body + k, 'a', n);
  strcpy(body + k + n, "\"}");
  expect_error(&d, "POST", "/v1/jobs", body, 400, "out_of_range", "prompt");
  free(body);
  daemon_stop(&d);
}
END_TEST

/* webuiapi's txt2img payload with its defaults, the prompts, seed, steps and a size the tiny
 * pipeline makes quickly set here; the model and clip skip through override_settings. */
#define WEBUIAPI_TXT2IMG                                                                           \
  "{\"enable_hr\": false, \"hr_scale\": 2, \"hr_upscaler\": \"Latent\", "                          \
  "\"hr_second_pass_steps\": 0, \"hr_resize_x\": 0, \"hr_resize_y\": 0, "                          \
  "\"denoising_strength\": 0.7, \"firstphase_width\": 0, \"firstphase_height\": 0, "               \
  "\"prompt\": \"a photo of a cat\", \"styles\": [], \"seed\": 3, \"subseed\": -1, "               \
  "\"subseed_strength\": 0.0, \"seed_resize_from_h\": 0, \"seed_resize_from_w\": 0, "              \
  "\"batch_size\": 2, \"n_iter\": 1, \"steps\": 5, \"cfg_scale\": 7.0, \"width\": 32, "            \
  "\"height\": 32, \"restore_faces\": false, \"tiling\": false, \"do_not_save_samples\": false, "  \
  "\"do_not_save_grid\": false, \"negative_prompt\": \"blurry\", \"eta\": 1.0, \"s_churn\": 0, "   \
  "\"s_tmax\": 0, \"s_tmin\": 0, \"s_noise\": 1, \"override_settings\": "                          \
  "{\"sd_model_checkpoint\": "                                                                     \
  "\"sd\", \"CLIP_stop_at_last_layers\": 2}, \"override_settings_restore_afterwards\": true, "     \
  "\"sampler_name\": \"DPM++ 2M\", \"sampler_index\": \"DPM++ 2M\", \"script_name\": null, "       \
  "\"script_args\": [], \"send_images\": true, \"save_images\": false, \"alwayson_scripts\": {}}"

START_TEST(a1111_prompts_reach_the_text_encoder) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), prompt_args(NULL, NULL)), 0);
  http_resp r;
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/txt2img", WEBUIAPI_TXT2IMG, &r), 200);
  json_t *j = http_json(&r);
  http_free(&r);
  json_t *images = json_object_get(j, "images");
  ck_assert_int_eq(json_array_size(images), 2);
  json_t *info = json_loads(json_string_value(json_object_get(j, "info")), 0, NULL);
  ck_assert_ptr_nonnull(info);
  ck_assert_str_eq(json_string_value(json_object_get(info, "prompt")), "a photo of a cat");
  ck_assert_str_eq(json_string_value(json_object_get(info, "negative_prompt")), "blurry");
  ck_assert_int_eq(json_integer_value(json_object_get(info, "clip_skip")), 2);
  const char *it = json_string_value(json_array_get(json_object_get(info, "infotexts"), 1));
  static const char head[] =
      "a photo of a cat\nNegative prompt: blurry\nSteps: 5, Sampler: DPM++ 2M, Seed: 4,";
  ck_assert_msg(strncmp(it, head, sizeof head - 1) == 0, "%s", it);
  ck_assert_ptr_nonnull(strstr(it, "Clip skip: 2"));
  /* image 1 (seed 4) is the native job's picture with the same settings */
  char id[64], path[128];
  submit_job(
      &d,
      "{\"model\": \"sd\", \"prompt\": \"a photo of a cat\", \"negative_prompt\": \"blurry\", "
      "\"clip_skip\": 2, \"seed\": 4, \"guidance\": {\"scale\": 7}, "
      "\"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 5}}",
      id, sizeof id);
  wait_state(&d, id, "succeeded", 120);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  size_t len, blen;
  char *png = get_body(&d, path, &len);
  const char *b64 = json_string_value(json_array_get(images, 1));
  uint8_t *raw = NULL;
  ck_assert_int_eq(base64_decode(b64, strlen(b64), &raw, &blen), 0);
  int h, w, h2, w2;
  uint8_t *a = png_pixels(png, len, &h, &w), *b = png_pixels(raw, blen, &h2, &w2);
  ck_assert(h == h2 && w == w2 && h == 32);
  ck_assert_msg(memcmp(a, b, (size_t)h * w * 3) == 0, "the A1111 picture differs from the job's");
  free(a);
  free(b);
  free(raw);
  free(png);
  json_decref(info);
  json_decref(j);
  /* their refusals, in their names */
  expect_error(&d, "POST", "/sdapi/v1/txt2img",
               "{\"prompt\": \"cat\", \"override_settings\": {\"sd_model_checkpoint\": \"sd\", "
               "\"CLIP_stop_at_last_layers\": 5}}",
               400, "out_of_range", "override_settings.CLIP_stop_at_last_layers");
  expect_error(&d, "POST", "/sdapi/v1/txt2img",
               "{\"prompt\": \"cat\", \"width\": 56, \"override_settings\": "
               "{\"sd_model_checkpoint\": \"sd\"}}",
               400, "invalid_field", "width");
  expect_error(&d, "POST", "/sdapi/v1/img2img",
               "{\"prompt\": \"cat\", \"init_images\": [\"x\"], \"override_settings\": "
               "{\"sd_model_checkpoint\": \"sd\"}}",
               400, "invalid_field", "init_images[0]");
  expect_error(&d, "POST", "/sdapi/v1/options", "{\"CLIP_stop_at_last_layers\": 13}", 400,
               "out_of_range", "CLIP_stop_at_last_layers");
  /* their options: this client's model and clip skip, kept for its later requests */
  ck_assert_int_eq(http_post(&d, "/sdapi/v1/options",
                             "{\"sd_model_checkpoint\": \"sd\", \"CLIP_stop_at_last_layers\": 3}",
                             &r),
                   200);
  http_free(&r);
  ck_assert_int_eq(
      http_post(&d, "/sdapi/v1/txt2img", "{\"prompt\": \"cat\", \"steps\": 2, \"seed\": 1}", &r),
      200);
  j = http_json(&r);
  http_free(&r);
  info = json_loads(json_string_value(json_object_get(j, "info")), 0, NULL);
  ck_assert_int_eq(json_integer_value(json_object_get(info, "clip_skip")), 3);
  ck_assert_str_eq(json_string_value(json_object_get(info, "sd_model_name")), "sd");
  json_decref(info);
  json_decref(j);
  /* sd-models lists the pipeline, by the title its requests name */
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/sd-models", &r), 200);
  j = http_json(&r);
  http_free(&r);
  int found = 0;
  for (size_t i = 0; i < json_array_size(j); i++)
    found |= strcmp(json_string_value(json_object_get(json_array_get(j, i), "title")), "sd") == 0;
  ck_assert_msg(found, "/sdapi/v1/sd-models does not list the pipeline");
  json_decref(j);
  daemon_stop(&d);
}
END_TEST

START_TEST(queued_prompt_job_survives_kill9) {
  char st[512], path[128], id[64];
  daemon_proc d;
  const char *const *args = prompt_args("--workers", "1");
  queued_job_survives_kill9(&d, th_state_dir(st, sizeof st), args, LONG_JOB, CAT_JOB, id,
                            sizeof id);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  size_t len;
  char *view = get_body(&d, path, &len);
  json_t *j = json_loads(view, 0, NULL);
  free(view);
  json_t *req = json_object_get(j, "request");
  ck_assert_str_eq(json_string_value(json_object_get(req, "prompt")), "a photo of a cat");
  ck_assert_str_eq(json_string_value(json_object_get(req, "negative_prompt")), "blurry");
  ck_assert_int_eq(json_integer_value(json_object_get(req, "clip_skip")), 2);
  json_decref(j);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  char *png = get_body(&d, path, &len);
  daemon_stop(&d);
  /* the same job on a fresh daemon makes the same picture */
  char st2[512];
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st2, sizeof st2), prompt_args(NULL, NULL)), 0);
  char fresh[64];
  submit_job(&d, CAT_JOB, fresh, sizeof fresh);
  wait_state(&d, fresh, "succeeded", 120);
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", fresh);
  size_t flen;
  char *again = get_body(&d, path, &flen);
  daemon_stop(&d);
  int h, w;
  uint8_t *a = png_pixels(png, len, &h, &w), *b = png_pixels(again, flen, &h, &w);
  ck_assert_msg(memcmp(a, b, (size_t)h * w * 3) == 0, "the recovered job made another picture");
  free(a);
  free(b);
  free(png);
  free(again);
}
END_TEST

/* Prompt jobs of one prompt pile up behind a long job and share one forward (noise in latents,
 * images in pixels); each image is the one its job makes alone. */
START_TEST(batched_prompt_jobs_equal_alone) {
  char st[512], path[128];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st),
                                prompt_args4("--workers", "1", "--batch-max-images", "16")),
                   0);
  char blocker[64], ids[3][64], body[512];
  submit_job(&d, LONG_JOB, blocker, sizeof blocker);
  wait_running(&d, blocker, 60);
  for (int k = 0; k < 3; k++) {
    snprintf(body, sizeof body,
             "{\"model\": \"sd\", \"prompt\": \"a photo of a cat\", \"seed\": %d, "
             "\"batch_size\": %d, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 4}}",
             10 + k, 1 + k % 2);
    submit_job(&d, body, ids[k], sizeof ids[k]);
  }
  snprintf(path, sizeof path, "/v1/jobs/%s", blocker);
  http_resp r;
  ck_assert_int_eq(http_req(&d, "DELETE", path, NULL, 0, NULL, &r), 200);
  http_free(&r);
  for (int k = 0; k < 3; k++)
    wait_state(&d, ids[k], "succeeded", 120);
  http_get(&d, "/metrics", &r);
  const char *bj = strstr(r.body, "\ndenoised_batched_jobs_total ");
  ck_assert_ptr_nonnull(bj);
  ck_assert_msg(atoi(bj + strlen("\ndenoised_batched_jobs_total ")) >= 2,
                "the prompt jobs were not batched: %.60s", bj);
  http_free(&r);
  for (int k = 0; k < 3; k++) {
    char alone[64];
    snprintf(body, sizeof body,
             "{\"model\": \"sd\", \"prompt\": \"a photo of a cat\", \"seed\": %d, "
             "\"batch_size\": %d, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 4}}",
             10 + k, 1 + k % 2);
    submit_job(&d, body, alone, sizeof alone);
    wait_state(&d, alone, "succeeded", 120);
    for (int i = 0; i < 1 + k % 2; i++) {
      uint8_t *a, *b;
      fetch_pixels(&d, ids[k], i, &a);
      fetch_pixels(&d, alone, i, &b);
      ck_assert_msg(memcmp(a, b, 32 * 32 * 3) == 0, "job %d image %d: batched and alone differ", k,
                    i);
      free(a);
      free(b);
    }
  }
  daemon_stop(&d);
}
END_TEST

/* img2img and inpainting of a picture on the pipeline (the engine's latent edits: the picture
 * VAE-encoded, the mask reduced to latents): the daemon's job makes the CLI's pixels, natively
 * and through the A1111 route. */
START_TEST(latent_edits_run_as_the_cli_does) {
  char st[512], dir[256], fix[1024], out[8192], file[700], mfile[700];
  test_tmpdir(dir, sizeof dir);
  test_src_path(fix, sizeof fix, FIXTURE);
  uint8_t px[32 * 32 * 3], *png = NULL, *mpng = NULL;
  for (size_t i = 0; i < sizeof px; i++)
    px[i] = (uint8_t)((i / 3) % 32 < 16 ? 220 : (i * 13) % 180);
  size_t plen = 0, mlen = 0;
  err e = {0};
  ck_assert_int_eq(image_png_encode(px, 3, 32, 32, NULL, 0, &png, &plen, &e), 0);
  char *b64 = base64_encode(png, plen), *mb64 = mask_b64(32, 32, 16, &mpng, &mlen);
  snprintf(file, sizeof file, "%s/in.png", dir);
  snprintf(mfile, sizeof mfile, "%s/mask.png", dir);
  write_file(file, png, plen);
  write_file(mfile, mpng, mlen);
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), prompt_args(NULL, NULL)), 0);
  char *body = malloc(2 * strlen(b64) + 2 * strlen(mb64) + 1024);
  for (int inpaint = 0; inpaint < 2; inpaint++) {
    sprintf(body,
            "{\"model\": \"sd\", \"prompt\": \"a dog\", \"seed\": 5, \"scheduler\": {\"name\": "
            "\"ddim\", \"steps\": 6}, \"input_image\": \"%s\", %s%s%s\"edit\": {\"type\": "
            "\"%s\", \"strength\": 0.6}}",
            b64, inpaint ? "\"mask\": \"" : "", inpaint ? mb64 : "", inpaint ? "\", " : "",
            inpaint ? "inpaint" : "img2img");
    char id[64];
    submit_job(&d, body, id, sizeof id);
    wait_state(&d, id, "succeeded", 120);
    uint8_t *job;
    fetch_pixels(&d, id, 0, &job);
    int st_cli = test_run_cli(out, sizeof out,
                              "sample --model %s --prompt 'a dog' --seed 5 --scheduler ddim "
                              "--steps 6 --guidance-scale 7.5 --init-image %s --strength 0.6 %s%s "
                              "-o %s/cli.png --quiet",
                              fix, file, inpaint ? "--mask " : "", inpaint ? mfile : "", dir);
    ck_assert_msg(st_cli == 0, "%s", out);
    char cpath[700];
    snprintf(cpath, sizeof cpath, "%s/cli.png", dir);
    size_t clen;
    uint8_t *cli = read_file_all(cpath, &clen);
    int h, w;
    uint8_t *cpx = png_pixels(cli, clen, &h, &w);
    ck_assert_msg(memcmp(job, cpx, 32 * 32 * 3) == 0, "%s: the daemon's job and the CLI differ",
                  inpaint ? "inpaint" : "img2img");
    if (!inpaint) { /* the A1111 route's img2img is the same job */
      sprintf(body,
              "{\"prompt\": \"a dog\", \"seed\": 5, \"steps\": 6, \"sampler_name\": \"DDIM\", "
              "\"cfg_scale\": 7.5, \"denoising_strength\": 0.6, \"init_images\": [\"%s\"], "
              "\"override_settings\": {\"sd_model_checkpoint\": \"sd\"}}",
              b64);
      http_resp r;
      ck_assert_int_eq(http_post(&d, "/sdapi/v1/img2img", body, &r), 200);
      json_t *j = http_json(&r);
      http_free(&r);
      const char *img = json_string_value(json_array_get(json_object_get(j, "images"), 0));
      uint8_t *raw = NULL;
      size_t rlen = 0;
      ck_assert_int_eq(base64_decode(img, strlen(img), &raw, &rlen), 0);
      uint8_t *apx = png_pixels(raw, rlen, &h, &w);
      ck_assert_msg(memcmp(job, apx, 32 * 32 * 3) == 0, "A1111 img2img differs from the job");
      free(apx);
      free(raw);
      json_decref(j);
    }
    free(cpx);
    free(cli);
    free(job);
  }
  daemon_stop(&d);
  free(body);
  free(b64);
  free(mb64);
  free(png);
  free(mpng);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("server_prompt");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, prompt_job_runs_as_the_cli_does);
  tcase_add_test(tc, models_say_which_take_prompts);
  tcase_add_test(tc, bad_fields_are_named);
  tcase_add_test(tc, a1111_prompts_reach_the_text_encoder);
  tcase_add_test(tc, queued_prompt_job_survives_kill9);
  tcase_add_test(tc, batched_prompt_jobs_equal_alone);
  tcase_add_test(tc, latent_edits_run_as_the_cli_does);
  suite_add_tcase(s, tc);
  return s;
}
