/* The AUTOMATIC1111 route with requests shaped as real clients send them: the webuiapi Python
 * client's txt2img and img2img defaults (mix1009/sdwebuiapi, WebUIApi.txt2img / img2img) and
 * the payloads of A1111's API documentation, against the analytic model of the daemon tests.
 * Each mapped field is checked by pixels: the A1111 request makes the picture the native
 * request it stands for makes. */
#include <pthread.h>

#include "base64.h"
#include "image.h"
#include "testhttp.h"

/* webuiapi's txt2img payload with its defaults (prompt, seed, sizes and batch set per test). */
#define WEBUIAPI_TXT2IMG(PROMPT, SEED, BATCH)                                                      \
  "{\"enable_hr\": false, \"hr_scale\": 2, \"hr_upscaler\": \"Latent\", "                          \
  "\"hr_second_pass_steps\": 0, \"hr_resize_x\": 0, \"hr_resize_y\": 0, "                          \
  "\"denoising_strength\": 0.7, \"firstphase_width\": 0, \"firstphase_height\": 0, "               \
  "\"prompt\": \"" PROMPT "\", \"styles\": [], \"seed\": " SEED ", \"subseed\": -1, "              \
  "\"subseed_strength\": 0.0, \"seed_resize_from_h\": 0, \"seed_resize_from_w\": 0, "              \
  "\"batch_size\": " BATCH ", \"n_iter\": 1, \"steps\": 20, \"cfg_scale\": 7.0, \"width\": 512, "  \
  "\"height\": 512, \"restore_faces\": false, \"tiling\": false, \"do_not_save_samples\": false, " \
  "\"do_not_save_grid\": false, \"negative_prompt\": \"\", \"eta\": 1.0, \"s_churn\": 0, "         \
  "\"s_tmax\": 0, \"s_tmin\": 0, \"s_noise\": 1, \"override_settings\": {}, "                      \
  "\"override_settings_restore_afterwards\": true, \"sampler_name\": \"Euler a\", "                \
  "\"sampler_index\": \"Euler a\", \"script_name\": null, \"script_args\": [], "                   \
  "\"send_images\": true, \"save_images\": false, \"alwayson_scripts\": {}}"

/* A 400 whose error names field. */
static void expect_field(const daemon_proc *d, const char *path, const char *body,
                         const char *field) {
  http_resp r;
  http_req(d, "POST", path, body, strlen(body), NULL, &r);
  json_t *j = http_json(&r);
  const char *f = json_string_value(json_object_get(json_object_get(j, "error"), "field"));
  ck_assert_msg(r.status == 400 && f && strcmp(f, field) == 0, "%.200s: %ld %.500s, wanted %s",
                body, r.status, r.body, field);
  json_decref(j);
  http_free(&r);
}

static long sd_post(const daemon_proc *d, const char *path, const char *body, const char *token,
                    json_t **out) {
  char hdr[128];
  snprintf(hdr, sizeof hdr, "X-Client-Token: %s", token ? token : "t0");
  const char *hdrs[] = {hdr, NULL};
  http_resp r;
  long st = http_req(d, "POST", path, body, strlen(body), hdrs, &r);
  *out = http_json(&r);
  ck_assert_msg(*out, "%s: not JSON: %.300s", path, r.body);
  http_free(&r);
  return st;
}

/* The pixels of a base64 PNG (at most 64x64). */
static uint8_t *b64_pixels(const char *b64, int *h, int *w) {
  uint8_t *png = NULL, *px = NULL;
  size_t len = 0;
  ck_assert_int_eq(base64_decode(b64, strlen(b64), &png, &len), 0);
  err e;
  ck_assert_int_eq(image_png_decode(png, len, 64, 64, &px, h, w, &e), 0);
  free(png);
  return px;
}

static uint8_t *image_px(const json_t *resp, size_t i) {
  int h, w;
  const char *b64 = json_string_value(json_array_get(json_object_get(resp, "images"), i));
  ck_assert_ptr_nonnull(b64);
  uint8_t *px = b64_pixels(b64, &h, &w);
  ck_assert_int_eq(h, 32);
  ck_assert_int_eq(w, 32);
  return px;
}

/* The first picture of a native /v1/generate request. */
static uint8_t *native_px(const daemon_proc *d, const char *body) {
  http_resp r;
  ck_assert_msg(http_post(d, "/v1/generate", body, &r) == 200, "%s: %.300s", body, r.body);
  uint8_t *px = NULL;
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode((uint8_t *)r.body, r.len, 64, 64, &px, &h, &w, &e), 0);
  http_free(&r);
  return px;
}

static json_t *info_of(const json_t *resp) {
  json_t *info = json_loads(json_string_value(json_object_get(resp, "info")), 0, NULL);
  ck_assert_ptr_nonnull(info);
  return info;
}

static void same_px(const uint8_t *a, const uint8_t *b, const char *what) {
  ck_assert_msg(memcmp(a, b, 32 * 32 * 3) == 0, "%s: the pictures differ", what);
}

START_TEST(webuiapi_txt2img_defaults) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  json_t *j;
  /* eta 1.0 with "Euler a" (a sampler that reads no eta) and 512x512 on a 32-pixel model */
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img", WEBUIAPI_TXT2IMG("ring", "41", "2"), NULL, &j),
                   200);
  ck_assert_int_eq(json_array_size(json_object_get(j, "images")), 2);
  json_t *info = info_of(j);
  ck_assert_int_eq(json_integer_value(json_object_get(info, "seed")), 41);
  json_t *seeds = json_object_get(info, "all_seeds");
  ck_assert_int_eq(json_integer_value(json_array_get(seeds, 0)), 41);
  ck_assert_int_eq(json_integer_value(json_array_get(seeds, 1)), 42); /* consecutive, as theirs */
  ck_assert_int_eq(json_integer_value(json_object_get(info, "width")), 32); /* the model's size */
  ck_assert_str_eq(json_string_value(json_object_get(info, "sampler_name")), "Euler a");
  const char *it = json_string_value(json_array_get(json_object_get(info, "infotexts"), 1));
  ck_assert_msg(strncmp(it, "ring\nSteps: 20, Sampler: Euler a, Seed: 42,", 40) == 0, "%s", it);
  /* their keys */
  static const char *const keys[] = {"prompt",
                                     "all_prompts",
                                     "negative_prompt",
                                     "all_negative_prompts",
                                     "subseed",
                                     "all_subseeds",
                                     "cfg_scale",
                                     "steps",
                                     "batch_size",
                                     "restore_faces",
                                     "sd_model_name",
                                     "seed_resize_from_w",
                                     "denoising_strength",
                                     "extra_generation_params",
                                     "index_of_first_image",
                                     "styles",
                                     "job_timestamp",
                                     "clip_skip",
                                     "is_using_inpainting_conditioning",
                                     "version"};
  for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
    ck_assert_msg(json_object_get(info, keys[i]), "info has no '%s'", keys[i]);
  /* image 1 is seed 42's picture: the same request alone with that seed makes it */
  uint8_t *a = image_px(j, 1);
  json_t *j2;
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img", WEBUIAPI_TXT2IMG("ring", "42", "1"), NULL, &j2),
                   200);
  uint8_t *b = image_px(j2, 0);
  same_px(a, b, "seed 42 in a batch and alone");
  /* and the native request it maps onto */
  uint8_t *c = native_px(&d, "{\"class_label\": \"ring\", \"seed\": 42, \"guidance\": {\"scale\": "
                             "7}, \"scheduler\": {\"name\": \"euler-a\", \"steps\": 20}}");
  same_px(a, c, "txt2img and the native job");
  free(a);
  free(b);
  free(c);
  json_decref(info);
  json_decref(j);
  json_decref(j2);
  /* A1111's API documentation: {"prompt": ..., "steps": 5} */
  ck_assert_int_eq(
      sd_post(&d, "/sdapi/v1/txt2img", "{\"prompt\": \"disc\", \"steps\": 5}", NULL, &j), 200);
  ck_assert_int_eq(json_array_size(json_object_get(j, "images")), 1);
  json_decref(j);
  daemon_stop(&d);
}
END_TEST

START_TEST(scheduler_and_negative_prompt) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  json_t *j;
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img",
                           "{\"prompt\": \"ring\", \"negative_prompt\": \"disc\", \"seed\": 5, "
                           "\"steps\": 10, \"sampler_name\": \"DPM++ 2M\", \"scheduler\": "
                           "\"Karras\", \"cfg_scale\": 3}",
                           NULL, &j),
                   200);
  json_t *info = info_of(j);
  const char *it = json_string_value(json_array_get(json_object_get(info, "infotexts"), 0));
  ck_assert_msg(strstr(it, "ring\nNegative prompt: disc\nSteps: 10, Sampler: DPM++ 2M, "
                           "Schedule type: Karras, Seed: 5,"),
                "%s", it);
  ck_assert_str_eq(json_string_value(json_object_get(
                       json_object_get(info, "extra_generation_params"), "Schedule type")),
                   "Karras");
  uint8_t *a = image_px(j, 0);
  uint8_t *b =
      native_px(&d, "{\"class_label\": \"ring\", \"seed\": 5, \"guidance\": {\"scale\": 3, "
                    "\"null_class\": 0}, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": "
                    "10, \"options\": {\"use_karras_sigmas\": true}}}");
  same_px(a, b, "Karras and a negative prompt");
  uint8_t *c = native_px(&d, "{\"class_label\": \"ring\", \"seed\": 5, \"guidance\": {\"scale\": "
                             "3}, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": 10}}");
  ck_assert_msg(memcmp(a, c, 32 * 32 * 3) != 0, "the negative prompt and Karras changed nothing");
  free(a);
  free(b);
  free(c);
  json_decref(info);
  json_decref(j);
  /* what cannot be honoured is refused, naming their field */
  static const char *const bad[][2] = {
      {"{\"prompt\": \"ring\", \"negative_prompt\": \"blob\", \"cfg_scale\": 3}",
       "negative_prompt"},
      {"{\"prompt\": \"ring\", \"scheduler\": \"Beta\"}", "scheduler"},
      {"{\"prompt\": \"ring\", \"sampler_name\": \"Euler a\", \"scheduler\": \"Karras\"}",
       "scheduler"},
      {"{\"prompt\": \"ring\", \"enable_hr\": true}", "enable_hr"},
      {"{\"prompt\": \"ring\", \"restore_faces\": true}", "restore_faces"},
      {"{\"prompt\": \"ring\", \"styles\": [\"x\"]}", "styles"},
      {"{\"prompt\": \"ring\", \"width\": 99999}", "width"},
      {"{\"prompt\": \"ring\", \"sampler_name\": \"Euler\", \"s_churn\": 0.5}", "s_churn"},
      {"{\"prompt\": \"ring\", \"override_settings\": {\"sd_model_checkpoint\": \"nope\"}}",
       "override_settings.sd_model_checkpoint"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    expect_field(&d, "/sdapi/v1/txt2img", bad[i][0], bad[i][1]);
  /* what theirs ignores is ignored: churn on a sampler without it */
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img",
                           "{\"prompt\": \"ring\", \"steps\": 3, \"sampler_name\": \"DDIM\", "
                           "\"s_churn\": 0.5, \"s_noise\": 1.003}",
                           NULL, &j),
                   200);
  json_decref(j);
  daemon_stop(&d);
}
END_TEST

START_TEST(empty_prompt_draws_a_class) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  json_t *j;
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img", WEBUIAPI_TXT2IMG("", "77", "3"), NULL, &j),
                   200);
  json_t *info = info_of(j);
  json_t *prompts = json_object_get(info, "all_prompts");
  ck_assert_int_eq(json_array_size(prompts), 3);
  for (int i = 0; i < 3; i++) {
    const char *cls = json_string_value(json_array_get(prompts, (size_t)i));
    char body[256];
    snprintf(body, sizeof body,
             "{\"class_label\": \"%s\", \"seed\": %d, \"guidance\": {\"scale\": 7}, "
             "\"scheduler\": {\"name\": \"euler-a\", \"steps\": 20}}",
             cls, 77 + i);
    uint8_t *a = image_px(j, (size_t)i), *b = native_px(&d, body);
    same_px(a, b, "the drawn class");
    free(a);
    free(b);
  }
  json_decref(info);
  json_decref(j);
  daemon_stop(&d);
}
END_TEST

START_TEST(options_per_client) {
  char st[512], model[1024], m1[1100], m2[1100];
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(m1, sizeof m1, "default=%s", model);
  snprintf(m2, sizeof m2, "other=%s", model);
  const char *args[] = {"--model", m1, "--model", m2, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/sdapi/v1/options", &r), 200);
  json_t *j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(j, "sd_model_checkpoint")), "default");
  json_decref(j);
  http_free(&r);
  /* webuiapi's util_set_model: their title with a hash; unknown options are theirs only */
  const char *ta[] = {"X-Client-Token: tab-a", NULL};
  const char *set =
      "{\"sd_model_checkpoint\": \"other [0123abcd]\", \"CLIP_stop_at_last_layers\": 2}";
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/options", set, strlen(set), ta, &r), 200);
  ck_assert_str_eq(r.body, "null"); /* as theirs */
  http_free(&r);
  expect_field(&d, "/sdapi/v1/options", "{\"sd_model_checkpoint\": \"nope\"}",
               "sd_model_checkpoint");
  ck_assert_int_eq(http_req(&d, "GET", "/sdapi/v1/options", NULL, 0, ta, &r), 200);
  j = http_json(&r);
  ck_assert_str_eq(json_string_value(json_object_get(j, "sd_model_checkpoint")), "other");
  json_decref(j);
  http_free(&r);
  const char *body = "{\"prompt\": \"ring\", \"steps\": 3}";
  static const char *const want[][2] = {{"tab-a", "other"}, {"tab-b", "default"}};
  for (int i = 0; i < 2; i++) {
    ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img", body, want[i][0], &j), 200);
    json_t *info = info_of(j);
    ck_assert_str_eq(json_string_value(json_object_get(info, "sd_model_name")), want[i][1]);
    json_decref(info);
    json_decref(j);
  }
  daemon_stop(&d);
}
END_TEST

/* webuiapi's img2img payload with its defaults around a picture and a mask. */
static char *img2img_body(const char *init, const char *mask, int invert) {
  char *b = malloc(strlen(init) + (mask ? strlen(mask) : 0) + 2048);
  sprintf(
      b,
      "{\"init_images\": [\"data:image/png;base64,%s\"], \"resize_mode\": 0, "
      "\"denoising_strength\": 0.6, \"image_cfg_scale\": 1.5, %s%s%s \"mask_blur\": 4, "
      "\"inpainting_fill\": 0, \"inpaint_full_res\": true, \"inpaint_full_res_padding\": 0, "
      "\"inpainting_mask_invert\": %d, \"initial_noise_multiplier\": 1, \"prompt\": "
      "\"square\", \"styles\": [], \"seed\": 12, \"subseed\": -1, \"subseed_strength\": 0, "
      "\"seed_resize_from_h\": 0, \"seed_resize_from_w\": 0, \"sampler_name\": \"DDIM\", "
      "\"batch_size\": 1, \"n_iter\": 1, \"steps\": 20, \"cfg_scale\": 7.0, \"width\": 512, "
      "\"height\": 512, \"restore_faces\": false, \"tiling\": false, \"negative_prompt\": \"\", "
      "\"eta\": 1.0, \"s_churn\": 0, \"s_tmax\": 0, \"s_tmin\": 0, \"s_noise\": 1, "
      "\"override_settings\": {}, \"override_settings_restore_afterwards\": true, "
      "\"sampler_index\": \"DDIM\", \"include_init_images\": false, \"script_name\": null, "
      "\"script_args\": [], \"send_images\": true, \"save_images\": false, "
      "\"alwayson_scripts\": {}}",
      init, mask ? "\"mask\": \"data:image/png;base64," : "", mask ? mask : "", mask ? "\"," : "",
      invert);
  return b;
}

START_TEST(webuiapi_img2img_and_png_info) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  json_t *j;
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/txt2img",
                           "{\"prompt\": \"ring\", \"seed\": 3, \"steps\": 8, \"sampler_name\": "
                           "\"DDIM\", \"negative_prompt\": \"\"}",
                           NULL, &j),
                   200);
  char *init = strdup(json_string_value(json_array_get(json_object_get(j, "images"), 0)));
  json_decref(j);
  /* png-info reads it back: their parsed form */
  char *pi = malloc(strlen(init) + 64);
  sprintf(pi, "{\"image\": \"data:image/png;base64,%s\"}", init);
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/png-info", pi, NULL, &j), 200);
  json_t *p = json_object_get(j, "parameters");
  ck_assert_int_eq(json_integer_value(json_object_get(p, "Seed")), 3);
  ck_assert_int_eq(json_integer_value(json_object_get(p, "Steps")), 8);
  ck_assert_int_eq(json_integer_value(json_object_get(p, "Size-1")), 32);
  ck_assert_ptr_nonnull(json_object_get(json_object_get(j, "items"), "denoised"));
  ck_assert(strstr(json_string_value(json_object_get(j, "info")), "Seed: 3"));
  json_decref(j);
  free(pi);
  expect_field(&d, "/sdapi/v1/png-info", "{\"image\": \"aGVsbG8=\"}", "image");
  /* img2img: the native img2img job */
  char *body = img2img_body(init, NULL, 0);
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/img2img", body, NULL, &j), 200);
  free(body);
  uint8_t *a = image_px(j, 0);
  json_t *info = info_of(j);
  ck_assert(json_real_value(json_object_get(info, "denoising_strength")) == 0.6);
  json_decref(info);
  json_decref(j);
  char *native = malloc(strlen(init) + 512);
  sprintf(native,
          "{\"class_label\": \"square\", \"seed\": 12, \"guidance\": {\"scale\": 7}, "
          "\"scheduler\": {\"name\": \"ddim\", \"steps\": 20, \"options\": {\"eta\": 1.0}}, "
          "\"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", \"strength\": 0.6}}",
          init);
  uint8_t *b = native_px(&d, native);
  same_px(a, b, "img2img");
  free(a);
  free(b);
  /* inpainting with their inverted mask: white on the left inverted is white on the right */
  uint8_t *mpng;
  size_t mlen;
  char *left = mask_b64(32, 32, 16, &mpng, &mlen);
  free(mpng);
  char *right = NULL;
  {
    uint8_t *px = calloc(32 * 32 * 3, 1), *png;
    size_t len;
    for (int y = 0; y < 32; y++)
      memset(px + ((size_t)y * 32 + 16) * 3, 255, 16 * 3);
    err e;
    ck_assert_int_eq(image_png_encode(px, 3, 32, 32, NULL, 0, &png, &len, &e), 0);
    right = base64_encode(png, len);
    free(png);
    free(px);
  }
  body = img2img_body(init, left, 1);
  ck_assert_int_eq(sd_post(&d, "/sdapi/v1/img2img", body, NULL, &j), 200);
  free(body);
  a = image_px(j, 0);
  json_decref(j);
  char *native2 = malloc(strlen(init) + strlen(right) + 512);
  sprintf(native2,
          "{\"class_label\": \"square\", \"seed\": 12, \"guidance\": {\"scale\": 7}, "
          "\"scheduler\": {\"name\": \"ddim\", \"steps\": 20, \"options\": {\"eta\": 1.0}}, "
          "\"input_image\": \"%s\", \"mask\": \"%s\", \"edit\": {\"type\": \"inpaint\", "
          "\"strength\": 0.6}}",
          init, right);
  b = native_px(&d, native2);
  same_px(a, b, "inpainting with an inverted mask");
  free(a);
  free(b);
  /* refusals name their fields */
  expect_field(&d, "/sdapi/v1/img2img", "{\"prompt\": \"ring\"}", "init_images");
  body = malloc(2 * strlen(init) + 128);
  sprintf(body, "{\"prompt\": \"ring\", \"init_images\": [\"%s\", \"%s\"]}", init, init);
  expect_field(&d, "/sdapi/v1/img2img", body, "init_images");
  free(body);
  char *big = mask_b64(64, 64, 3, &mpng, &mlen);
  free(mpng);
  body = malloc(strlen(big) + 128);
  sprintf(body, "{\"prompt\": \"ring\", \"init_images\": [\"%s\"]}", big);
  expect_field(&d, "/sdapi/v1/img2img", body, "init_images[0]");
  free(body);
  free(big);
  free(left);
  free(right);
  free(native);
  free(native2);
  free(init);
  daemon_stop(&d);
}
END_TEST

typedef struct call_args {
  const daemon_proc *d;
  const char *body;
  long status;
  json_t *resp;
} call_args;

static void *call_main(void *arg) {
  call_args *a = arg;
  a->status = sd_post(a->d, "/sdapi/v1/txt2img", a->body, "tab-i", &a->resp);
  return NULL;
}

START_TEST(interrupt_returns_partial_images) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  call_args a = {&d,
                 "{\"prompt\": \"cross\", \"seed\": 8, \"steps\": 1000, \"batch_size\": 2, "
                 "\"sampler_name\": \"DDPM\", \"cfg_scale\": 2}",
                 0, NULL};
  pthread_t th;
  pthread_create(&th, NULL, call_main, &a);
  /* its progress shows the running job's preview (current_image, base64 PNG) */
  const char *ti[] = {"X-Client-Token: tab-i", NULL};
  json_t *pj = NULL;
  for (double t0 = th_now(); th_now() - t0 < 60;) {
    http_resp r;
    ck_assert_int_eq(http_req(&d, "GET", "/sdapi/v1/progress", NULL, 0, ti, &r), 200);
    pj = http_json(&r);
    http_free(&r);
    if (json_is_string(json_object_get(pj, "current_image")))
      break;
    json_decref(pj);
    pj = NULL;
    usleep(20000);
  }
  ck_assert_msg(pj, "no current_image while the job ran");
  {
    http_resp r2;
    ck_assert_int_eq(
        http_req(&d, "GET", "/sdapi/v1/progress?skip_current_image=true", NULL, 0, ti, &r2), 200);
    json_t *sk = http_json(&r2);
    ck_assert(json_is_null(json_object_get(sk, "current_image")));
    json_decref(sk);
    http_free(&r2);
  }
  int h, w;
  free(b64_pixels(json_string_value(json_object_get(pj, "current_image")), &h, &w));
  ck_assert_int_eq(h, 32);
  json_decref(pj);
  http_resp r;
  ck_assert_int_eq(http_req(&d, "POST", "/sdapi/v1/interrupt", "{}", 2, ti, &r), 200);
  http_free(&r);
  pthread_join(th, NULL);
  /* 200 with the picture as far as it got (the first image's estimate), not a 409 */
  ck_assert_msg(a.status == 200, "%ld", a.status);
  ck_assert_int_ge(json_array_size(json_object_get(a.resp, "images")), 1);
  free(image_px(a.resp, 0));
  json_decref(a.resp);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  Suite *s = suite_create("a1111");
  TCase *tc = tcase_create("a1111");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, webuiapi_txt2img_defaults);
  tcase_add_test(tc, scheduler_and_negative_prompt);
  tcase_add_test(tc, empty_prompt_draws_a_class);
  tcase_add_test(tc, options_per_client);
  tcase_add_test(tc, webuiapi_img2img_and_png_info);
  tcase_add_test(tc, interrupt_returns_partial_images);
  suite_add_tcase(s, tc);
  return s;
}
