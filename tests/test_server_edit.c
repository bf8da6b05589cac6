/* Editing through the daemon: img2img and inpainting jobs, DDIM and edit-friendly DDPM
 * inversions (noise.npy, noise sent back by upload or by job id, noise-space edits) and
 * BoundaryDiffusion moves, each equal to the CLI's result, and every bad edit field a 400. */
#include <math.h>

#include "base64.h"
#include "boundary.h"
#include "npy.h"
#include "testhttp.h"

#define SMALL_JOB                                                                                  \
  "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}}"

/* Image 0 of job id equals `denoised sample <flags> -o tmp/cli.png`. */
static void check_cli_equal(const daemon_proc *d, const char *id, const char *tmp,
                            const char *flags) {
  char model[1024], cmd[8192], cli[512], out[4096];
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(cli, sizeof cli, "%s/cli.png", tmp);
  snprintf(cmd, sizeof cmd, "%s sample --model %s %s -o %s --quiet 2>&1", test_bin(), model, flags,
           cli);
  FILE *p = popen(cmd, "r");
  size_t k = fread(out, 1, sizeof out - 1, p);
  out[k] = 0;
  ck_assert_msg(pclose(p) == 0, "%s: %s", cmd, out);
  uint8_t *a, *b;
  fetch_pixels(d, id, 0, &a);
  size_t gl;
  uint8_t *buf = read_file_all(cli, &gl);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode(buf, gl, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(h == 32 && w == 32 && memcmp(a, b, 32 * 32 * 3) == 0,
                "the daemon's image differs from `denoised sample %s`", flags);
  free(buf);
  free(a);
  free(b);
}

START_TEST(edit_jobs) {
  char st[512], tmp[256], path[600], flags[2048];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  test_tmpdir(tmp, sizeof tmp);
  /* the picture to edit: one of ours */
  char src[64];
  submit_job(&d, SMALL_JOB, src, sizeof src);
  wait_state(&d, src, "succeeded", 60);
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", src);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  char *img = base64_encode((uint8_t *)r.body, r.len);
  char in_png[512], mask_png[512];
  snprintf(in_png, sizeof in_png, "%s/in.png", tmp);
  write_file(in_png, (uint8_t *)r.body, r.len);
  uint8_t *good_png = malloc(r.len);
  size_t good_len = r.len;
  memcpy(good_png, r.body, r.len);
  http_free(&r);
  uint8_t *mpng;
  size_t mlen;
  char *mask = mask_b64(32, 32, 16, &mpng, &mlen);
  snprintf(mask_png, sizeof mask_png, "%s/mask.png", tmp);
  write_file(mask_png, mpng, mlen);
  free(mpng);
  size_t cap = strlen(img) * 2 + strlen(mask) + 1024;
  char *body = malloc(cap);
  /* img2img */
  snprintf(body, cap,
           "{\"class_label\": 3, \"seed\": 21, \"scheduler\": {\"name\": \"ddim\", \"steps\": 20}, "
           "\"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", \"strength\": 0.6}}",
           img);
  char id[64];
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  json_t *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "img2img");
  ck_assert(json_number_value(json_object_get(ed, "strength")) == 0.6);
  /* the last int(20 * 0.6) steps run */
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "step")), 12);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "total")),
                   12);
  json_decref(j);
  http_free(&r);
  snprintf(flags, sizeof flags,
           "--class 3 --seed 21 --scheduler ddim --steps 20 --init-image %s --strength 0.6",
           in_png);
  check_cli_equal(&d, id, tmp, flags);
  /* inpainting with guidance, the image as a data URL */
  snprintf(body, cap,
           "{\"class_label\": 1, \"seed\": 22, \"scheduler\": {\"name\": \"dpm++2m\", \"steps\": "
           "15}, \"guidance\": {\"scale\": 3}, \"input_image\": \"data:image/png;base64,%s\", "
           "\"mask\": \"%s\", \"edit\": {\"type\": \"inpaint\"}}",
           img, mask);
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  snprintf(flags, sizeof flags,
           "--class 1 --seed 22 --scheduler dpm++2m --steps 15 --guidance-scale 3 --init-image %s "
           "--mask %s",
           in_png, mask_png);
  check_cli_equal(&d, id, tmp, flags);
  /* the kept half is the input picture (inpainting keeps black pixels) */
  uint8_t *px, *in_px;
  fetch_pixels(&d, id, 0, &px);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode(good_png, good_len, 64, 64, &in_px, &h, &w, &e), 0);
  int off = 0;
  for (int y = 0; y < 32; y++)
    for (int x = 16; x < 32; x++)
      for (int c = 0; c < 3; c++) {
        int dv = (int)px[(y * 32 + x) * 3 + c] - (int)in_px[(y * 32 + x) * 3 + c];
        off += dv > 2 || dv < -2;
      }
  ck_assert_msg(off == 0, "%d kept pixel values moved", off);
  free(px);
  free(in_px);
  /* errors name the field */
  char *png16 = NULL, *png64 = NULL;
  {
    uint8_t *p16, *p64;
    size_t l16, l64;
    png16 = mask_b64(16, 16, 4, &p16, &l16);
    png64 = mask_b64(64, 64, 4, &p64, &l64);
    free(p16);
    free(p64);
  }
  char trunc[64];
  snprintf(trunc, sizeof trunc, "%.40s", img); /* a PNG cut after its signature and header */
  struct {
    const char *tmpl; /* %s: an image */
    const char *image;
    const char *code, *field;
  } cases[] = {
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", "@@@@",
       "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}",
       "aGVsbG8gd29ybGQ=", "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", trunc,
       "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", png16,
       "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", png64,
       "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", "",
       "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"data:text/plain,%s\", \"edit\": {\"type\": "
       "\"img2img\"}}",
       "x", "invalid_field", "input_image"},
      {"{\"class_label\": 1, \"input_image\": 5, \"edit\": {\"type\": \"img2img\"}}%s", "",
       "wrong_type", "input_image"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"img2img\"}}%s", "", "missing_field",
       "input_image"},
      {"{\"class_label\": 1, \"input_image\": \"%s\"}", img, "missing_field", "edit"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": \"img2img\"}", img, "wrong_type",
       "edit"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {}}", img, "missing_field",
       "edit.type"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"warp\"}}", img,
       "invalid_field", "edit.type"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"strength\": 0.5}}",
       img, "unknown_field", "edit.strength"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", "
       "\"strength\": 0}}",
       img, "out_of_range", "edit.strength"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", "
       "\"strength\": 1.5}}",
       img, "out_of_range", "edit.strength"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", "
       "\"strength\": \"high\"}}",
       img, "wrong_type", "edit.strength"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", "
       "\"strength\": 0.01}, \"scheduler\": {\"name\": \"ddim\", \"steps\": 20}}",
       img, "invalid_field", "edit.strength"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", "
       "\"bogus\": 1}}",
       img, "unknown_field", "edit.bogus"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}, "
       "\"scheduler\": {\"name\": \"f-pndm\", \"steps\": 20}}",
       img, "invalid_field", "scheduler.name"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}, "
       "\"preview\": {\"every\": 2}}",
       img, "invalid_field", "preview"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"inpaint\"}}", img,
       "missing_field", "mask"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"mask\": \"x\", \"edit\": {\"type\": "
       "\"img2img\"}}",
       img, "invalid_field", "mask"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"mask\": \"aGVsbG8=\", \"edit\": {\"type\": "
       "\"inpaint\"}}",
       img, "invalid_field", "mask"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(body, cap, cases[i].tmpl, cases[i].image);
    expect_error(&d, "POST", "/v1/jobs", body, 400, cases[i].code, cases[i].field);
  }
  /* a wrong-size mask */
  snprintf(body, cap,
           "{\"class_label\": 1, \"input_image\": \"%s\", \"mask\": \"%s\", \"edit\": {\"type\": "
           "\"inpaint\"}}",
           img, png16);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "mask");
  /* mangled PNGs: cut anywhere or with a byte flipped, each a 400 or a job, never a crash */
  unsigned rs = 12345;
  int accepted = 0;
  for (int k = 0; k < 60; k++) {
    uint8_t *m = malloc(good_len);
    memcpy(m, good_png, good_len);
    size_t n = good_len;
    rs = rs * 1103515245u + 12345u;
    if (k % 3 == 0)
      n = 1 + (rs >> 8) % (good_len - 1);
    else
      m[(rs >> 8) % good_len] ^= (uint8_t)(1 + (rs >> 20) % 255);
    char *b = base64_encode(m, n);
    snprintf(body, cap,
             "{\"class_label\": 1, \"seed\": 1, \"scheduler\": {\"name\": \"ddim\", \"steps\": 4}, "
             "\"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}",
             b);
    http_post(&d, "/v1/jobs", body, &r);
    ck_assert_msg(r.status == 400 || r.status == 202, "mangled PNG %d: status %ld: %s", k, r.status,
                  r.body);
    if (r.status == 400)
      ck_assert_ptr_nonnull(strstr(r.body, "\"field\":\"input_image\""));
    accepted += r.status == 202;
    http_free(&r);
    free(b);
    free(m);
  }
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  ck_assert_int_lt(accepted, 60);
  free(png16);
  free(png64);
  free(body);
  free(img);
  free(mask);
  free(good_png);
  daemon_stop(&d);
}
END_TEST

/* `denoised <args> --quiet` must succeed. */
#define run_cli(...)                                                                               \
  do {                                                                                             \
    char cli_out_[4096];                                                                           \
    int cli_rc_ = test_run_cli(cli_out_, sizeof cli_out_, __VA_ARGS__);                            \
    ck_assert_msg(cli_rc_ == 0, "denoised exited %d: %s", cli_rc_, cli_out_);                      \
  } while (0)

/* Image 0 of job id has the pixels of the PNG at path. */
static void check_same_png(const daemon_proc *d, const char *id, const char *path) {
  uint8_t *a, *b;
  int ha, wa;
  fetch_pixels_size(d, id, 0, &a, &ha, &wa);
  size_t len;
  uint8_t *buf = read_file_all(path, &len);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode(buf, len, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(h == ha && w == wa && memcmp(a, b, (size_t)h * w * 3) == 0,
                "job %s differs from the CLI's %s", id, path);
  free(buf);
  free(a);
  free(b);
}

/* Image n of job id, saved as a PNG, replays with `denoised SUB --replay IT --model M FLAGS`
 * (the files the record cannot name: the job's noise, boundary or input picture) to its pixels. */
static void check_job_replay(const daemon_proc *d, const char *id, int n, const char *tmp,
                             const char *sub, const char *flags) {
  char path[160], png[600], out[600], model[1024];
  snprintf(path, sizeof path, "/v1/jobs/%s/images/%d", id, n);
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  snprintf(png, sizeof png, "%s/job-%d.png", tmp, n);
  write_file(png, (uint8_t *)r.body, r.len);
  http_free(&r);
  test_src_path(model, sizeof model, "models/shapes-gmm");
  snprintf(out, sizeof out, "%s/job-%d-replayed.png", tmp, n);
  run_cli("%s --replay %s --model %s %s -o %s --quiet", sub, png, model, flags, out);
  uint8_t *a, *b;
  fetch_pixels(d, id, n, &a);
  size_t len;
  uint8_t *buf = read_file_all(out, &len);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode(buf, len, 64, 64, &b, &h, &w, &e), 0);
  ck_assert_msg(memcmp(a, b, (size_t)h * w * 3) == 0, "job %s image %d: the replay (%s %s) differs",
                id, n, sub, flags);
  free(buf);
  free(a);
  free(b);
}

/* The noise.npy of job id, parsed; its raw bytes in *raw (malloc'ed) when asked. */
static void fetch_noise(const daemon_proc *d, const char *id, npy_array *out, uint8_t **raw,
                        size_t *rawlen) {
  char path[160];
  snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", id);
  http_resp r;
  ck_assert_int_eq(http_get(d, path, &r), 200);
  err e;
  ck_assert_msg(npy_parse_f32(r.body, r.len, "noise.npy", out, &e) == 0, "%s", e.msg);
  if (raw) {
    *raw = malloc(r.len);
    memcpy(*raw, r.body, r.len);
    *rawlen = r.len;
  }
  http_free(&r);
}

static void check_same_floats(const npy_array *a, const char *path) {
  npy_array b;
  err e;
  ck_assert_msg(npy_read_f32(path, &b, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(a->ndim, b.ndim);
  ck_assert(memcmp(a->shape, b.shape, sizeof(int64_t) * (size_t)a->ndim) == 0);
  ck_assert_msg(memcmp(a->data, b.data, sizeof(float) * (size_t)a->count) == 0,
                "the daemon's noise differs from the CLI's %s", path);
  npy_array_free(&b);
}

/* Largest pixel difference of two jobs' image 0, or of a job and a PNG's bytes. */
static int max_pixel_diff(const uint8_t *a, const uint8_t *b, size_t n) {
  int m = 0;
  for (size_t i = 0; i < n; i++) {
    int dv = abs((int)a[i] - (int)b[i]);
    m = dv > m ? dv : m;
  }
  return m;
}

START_TEST(invert_jobs) {
  char st[512], tmp[256], path[600], model[1024];
  daemon_proc d;
  const char *args[] = {"--max-steps", "5000", NULL};
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "models/shapes-gmm");
  char src[64];
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddim\", \"steps\": "
             "10}}",
             src, sizeof src);
  wait_state(&d, src, "succeeded", 60);
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", src);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  char *img = base64_encode((uint8_t *)r.body, r.len);
  char in_png[512];
  snprintf(in_png, sizeof in_png, "%s/in.png", tmp);
  write_file(in_png, (uint8_t *)r.body, r.len);
  http_free(&r);
  uint8_t *in_px;
  fetch_pixels(&d, src, 0, &in_px);
  size_t cap = strlen(img) * 4 + (1 << 20);
  char *body = malloc(cap);

  /* edit-friendly inversion: noise.npy as the CLI's, the image itself back */
  snprintf(body, cap,
           "{\"class_label\": 2, \"seed\": 5, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, "
           "\"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\"}}",
           img);
  char inv[64];
  submit_job(&d, body, inv, sizeof inv);
  wait_state(&d, inv, "succeeded", 60);
  snprintf(path, sizeof path, "/v1/jobs/%s", inv);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  http_free(&r);
  const char *link = json_string_value(json_object_get(json_object_get(j, "links"), "noise"));
  ck_assert_msg(link && strstr(link, "/noise.npy"), "no noise link");
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "total")),
                   20);
  json_decref(j);
  npy_array maps;
  uint8_t *raw;
  size_t rawlen;
  fetch_noise(&d, inv, &maps, &raw, &rawlen);
  ck_assert_int_eq(maps.ndim, 5);
  ck_assert_int_eq(maps.shape[1], 11);
  char cli_npy[600], cli_png[600];
  snprintf(cli_npy, sizeof cli_npy, "%s/inv.npy", tmp);
  run_cli(
      "invert --model %s --method ddpm --image %s --class 2 --steps 10 --seed 5 --out %s --quiet",
      model, in_png, cli_npy);
  check_same_floats(&maps, cli_npy);
  npy_array_free(&maps);
  uint8_t *px;
  fetch_pixels(&d, inv, 0, &px);
  ck_assert_int_le(max_pixel_diff(px, in_px, 32 * 32 * 3), 1);
  free(px);

  /* a class change from the stored noise (by job id) and from an upload: both the CLI's */
  snprintf(body, cap,
           "{\"class_label\": 4, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, \"edit\": "
           "{\"type\": \"invert_ddpm\", \"noise_from\": \"%s\", \"skip\": 3, \"shift\": [2, -1]}}",
           inv);
  char by_id[64], by_upload[64];
  submit_job(&d, body, by_id, sizeof by_id);
  char *noise64 = base64_encode(raw, rawlen);
  snprintf(body, cap,
           "{\"class_label\": 4, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, \"edit\": "
           "{\"type\": \"invert_ddpm\", \"noise\": \"%s\", \"source_class\": 2, \"skip\": 3, "
           "\"shift\": [2, -1]}}",
           noise64);
  submit_job(&d, body, by_upload, sizeof by_upload);
  wait_state(&d, by_id, "succeeded", 60);
  wait_state(&d, by_upload, "succeeded", 60);
  snprintf(cli_png, sizeof cli_png, "%s/edit.png", tmp);
  run_cli("edit --model %s --noise %s --class 4 --skip 3 --shift 2,-1 -o %s --quiet", model,
          cli_npy, cli_png);
  check_same_png(&d, by_id, cli_png);
  check_same_png(&d, by_upload, cli_png);
  /* the edits replay from their PNGs given the noise the record cannot name as a file; without
   * it the error says what to pass */
  char inv_npy[600], flags[700], out[4096], rep[700];
  snprintf(inv_npy, sizeof inv_npy, "%s/inv-job.npy", tmp);
  write_file(inv_npy, raw, rawlen);
  snprintf(flags, sizeof flags, "--noise %s", inv_npy);
  check_job_replay(&d, by_id, 0, tmp, "edit", flags);
  check_job_replay(&d, by_upload, 0, tmp, "edit", flags);
  snprintf(rep, sizeof rep, "edit --replay %s/job-0.png --model %s -o %s/x.png", tmp, model, tmp);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "%s", rep), 1);
  ck_assert_msg(strstr(out, by_upload) && strstr(out, "--noise"), "%s", out);
  snprintf(rep, sizeof rep, "sample --replay %s/job-0.png --model %s -o %s/x.png", tmp, model, tmp);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "%s", rep), 1);
  ck_assert_msg(strstr(out, "edit --replay"), "%s", out);
  /* img2img: its input picture given */
  snprintf(body, cap,
           "{\"class_label\": 3, \"seed\": 4, \"batch_size\": 2, \"scheduler\": {\"name\": "
           "\"ddim\", \"steps\": 10}, \"input_image\": \"%s\", \"edit\": {\"type\": "
           "\"img2img\", \"strength\": 0.6}}",
           img);
  char i2i[64];
  submit_job(&d, body, i2i, sizeof i2i);
  wait_state(&d, i2i, "succeeded", 60);
  snprintf(flags, sizeof flags, "--init-image %s", in_png);
  check_job_replay(&d, i2i, 1, tmp, "sample", flags);
  snprintf(rep, sizeof rep, "sample --replay %s/job-1.png --model %s -o %s/x.png", tmp, model, tmp);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "%s", rep), 1);
  ck_assert_msg(strstr(out, i2i) && strstr(out, "--init-image"), "%s", out);
  snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", by_id); /* not an inversion of a picture */
  expect_error(&d, "GET", path, NULL, 404, "not_found", NULL);

  /* colour edit */
  snprintf(body, cap,
           "{\"class_label\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, \"edit\": "
           "{\"type\": \"invert_ddpm\", \"noise_from\": \"%s\", \"colour\": [0.3, -0.2, 0.1], "
           "\"colour_from\": 6}}",
           inv);
  char col[64];
  submit_job(&d, body, col, sizeof col);
  wait_state(&d, col, "succeeded", 60);
  run_cli("edit --model %s --noise %s --colour 0.3,-0.2,0.1 --colour-from 6 -o %s --quiet", model,
          cli_npy, cli_png);
  check_same_png(&d, col, cli_png);

  /* DDIM inversion: x_T as the CLI's; the round trip comes back close */
  snprintf(body, cap,
           "{\"class_label\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": 20}, "
           "\"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddim\"}}",
           img);
  char ddim[64];
  submit_job(&d, body, ddim, sizeof ddim);
  wait_state(&d, ddim, "succeeded", 60);
  fetch_noise(&d, ddim, &maps, NULL, NULL);
  ck_assert_int_eq(maps.ndim, 4);
  run_cli("invert --model %s --method ddim --image %s --class 2 --steps 20 --out %s --quiet", model,
          in_png, cli_npy);
  check_same_floats(&maps, cli_npy);
  npy_array_free(&maps);
  fetch_pixels(&d, ddim, 0, &px);
  ck_assert_int_le(max_pixel_diff(px, in_px, 32 * 32 * 3), 8);
  free(px);

  /* errors name the field */
  struct {
    const char *tmpl; /* %s: the picture, then the inversion job */
    const char *code, *field;
  } cases[] = {
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"scheduler\": \"dpm++2m\", \"edit\": "
       "{\"type\": \"invert_ddpm\"}}%.0s",
       "invalid_field", "scheduler"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddpm\"}}%.0s%.0s", "missing_field",
       "input_image"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"noise_from\": \"%s\"}}",
       "invalid_field", "input_image"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddpm\", \"noise\": \"@@@\"}}%.0s%.0s",
       "invalid_field", "edit.noise"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddpm\", \"noise\": \"%s\"}}%.0s",
       "invalid_field", "edit.noise"},
      {"{\"class_label\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": 12}, \"edit\": "
       "{\"type\": \"invert_ddpm\", \"noise_from\": \"%.0s%s\"}}",
       "invalid_field", "edit.noise_from"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddim\", \"noise_from\": "
       "\"%.0s%s\"}}",
       "invalid_field", "edit.noise_from"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddpm\", \"noise_from\": "
       "\"ffff\"}}%.0s%.0s",
       "invalid_field", "edit.noise_from"},
      {"{\"class_label\": 2, \"edit\": {\"type\": \"invert_ddpm\", \"noise_from\": 7}}%.0s%.0s",
       "wrong_type", "edit.noise_from"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"skip\": 50}}%.0s",
       "out_of_range", "edit.skip"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddim\", "
       "\"skip\": 2}}%.0s",
       "unknown_field", "edit.skip"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"colour_from\": 2}}%.0s",
       "invalid_field", "edit.colour_from"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"colour\": [1, 2]}}%.0s",
       "wrong_type", "edit.colour"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"colour\": [1, 2, 9]}}%.0s",
       "out_of_range", "edit.colour"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"shift\": [1.5, 2]}}%.0s",
       "wrong_type", "edit.shift"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"source_class\": 9}}%.0s",
       "out_of_range", "edit.source_class"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"edit\": {\"type\": \"invert_ddpm\", "
       "\"source_guidance\": -1}}%.0s",
       "out_of_range", "edit.source_guidance"},
      {"{\"class_label\": 2, \"input_image\": \"%s\", \"mask\": \"%s\", \"edit\": {\"type\": "
       "\"invert_ddim\"}}",
       "invalid_field", "mask"},
  };
  static const char cut_npy[] = "\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}"; /* header cut short */
  char *cut_npy64 = base64_encode((const uint8_t *)cut_npy, sizeof cut_npy - 1);
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    const char *a = strstr(cases[i].tmpl, "\"noise\": \"%s\"") ? cut_npy64 : img;
    snprintf(body, cap, cases[i].tmpl, a, i == 5 || i == 6 ? inv : i == 2 ? inv : src);
    expect_error(&d, "POST", "/v1/jobs", body, 400, cases[i].code, cases[i].field);
  }
  snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", src);
  expect_error(&d, "GET", path, NULL, 404, "not_found", NULL);
  expect_error(&d, "GET", "/v1/jobs/ffffffffffffffff/noise.npy", NULL, 404, "not_found", NULL);
  snprintf(path, sizeof path, "/v1/jobs/%s/noise.npy", inv);
  expect_error(&d, "POST", path, "{}", 405, "method_not_allowed", NULL);
  /* a corrupted upload: cut or flipped anywhere, a 400 or a job, never a crash */
  unsigned rs = 777;
  for (int k = 0; k < 40; k++) {
    uint8_t *m = malloc(rawlen);
    memcpy(m, raw, rawlen);
    size_t n = rawlen;
    rs = rs * 1103515245u + 12345u;
    if (k % 2 == 0)
      n = 1 + (rs >> 8) % (rawlen - 1);
    else
      m[(rs >> 8) % 128] ^= (uint8_t)(1 + (rs >> 20) % 255); /* in the header */
    char *b = base64_encode(m, n);
    snprintf(body, cap,
             "{\"class_label\": 4, \"scheduler\": {\"name\": \"ddim\", \"steps\": 10}, \"edit\": "
             "{\"type\": \"invert_ddpm\", \"noise\": \"%s\"}}",
             b);
    http_post(&d, "/v1/jobs", body, &r);
    ck_assert_msg(r.status == 400 || r.status == 202, "corrupt noise %d: status %ld", k, r.status);
    http_free(&r);
    free(b);
    free(m);
  }
  ck_assert_int_eq(http_get(&d, "/healthz", &r), 200);
  http_free(&r);
  free(cut_npy64);
  free(noise64);
  free(raw);
  free(in_px);
  free(body);
  free(img);
  daemon_stop(&d);
}
END_TEST

START_TEST(boundary_jobs) {
  char st[512], tmp[256], model[1024], bpath[600], cli_png[600], in_png[600], path[600];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "models/shapes-gmm");
  /* a boundary along the red channel at step 4 of a 10-step grid */
  boundary b = {.dim = 3 * 32 * 32,
                .c = 3,
                .h = 32,
                .w = 32,
                .scale = 2.0,
                .step = 4,
                .timestep = 600,
                .n_train = 2,
                .test_accuracy = -1,
                .radius = 1};
  b.normal = calloc((size_t)b.dim, sizeof *b.normal);
  for (int i = 0; i < 32 * 32; i++)
    b.normal[i] = 1.0f / 32;
  b.solver = json_pack("{s:s, s:i}", "name", "ddim", "steps", 10);
  snprintf(b.model, sizeof b.model, "%s", model);
  snprintf(b.attribute, sizeof b.attribute, "red");
  snprintf(bpath, sizeof bpath, "%s/red.json", tmp);
  err e;
  ck_assert_msg(boundary_save(&b, bpath, &e) == 0, "%s", e.msg);
  json_t *bj = boundary_to_json(&b);
  char *btext = json_dumps(bj, JSON_COMPACT);
  json_decref(bj);
  boundary_free(&b);
  size_t cap = strlen(btext) + (1 << 16);
  char *body = malloc(cap);
  /* generated images moved across it */
  snprintf(body, cap,
           "{\"class_label\": 1, \"seed\": 9, \"edit\": {\"type\": \"boundary\", \"boundary\": "
           "%s, \"strength\": 3}}",
           btext);
  char id[64];
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  snprintf(cli_png, sizeof cli_png, "%s/moved.png", tmp);
  run_cli("edit --model %s --boundary %s --strength 3 --seed 9 --class 1 -o %s --quiet", model,
          bpath, cli_png);
  check_same_png(&d, id, cli_png);
  char bflags[700];
  snprintf(bflags, sizeof bflags, "--boundary %s", bpath);
  check_job_replay(&d, id, 0, tmp, "edit", bflags);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  http_resp r;
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  http_free(&r);
  json_t *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(json_object_get(ed, "boundary"), "attribute")),
                   "red");
  ck_assert_int_eq(
      json_integer_value(
          json_object_get(json_object_get(j, "request"), "scheduler")
              ? json_object_get(json_object_get(json_object_get(j, "request"), "scheduler"),
                                "steps")
              : NULL),
      10);
  json_decref(j);
  /* an input picture, inverted to the mixing step */
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  char *img = base64_encode((uint8_t *)r.body, r.len);
  snprintf(in_png, sizeof in_png, "%s/moved-in.png", tmp);
  write_file(in_png, (uint8_t *)r.body, r.len);
  http_free(&r);
  cap += strlen(img);
  char *grown = realloc(body, cap);
  ck_assert_ptr_nonnull(grown);
  body = grown;
  snprintf(body, cap,
           "{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"boundary\", "
           "\"boundary\": %s, \"strength\": -2, \"eta\": 0}}",
           img, btext);
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  run_cli("edit --model %s --boundary %s --strength -2 --eta 0 --image %s --class 1 -o %s --quiet",
          model, bpath, in_png, cli_png);
  check_same_png(&d, id, cli_png);
  snprintf(bflags, sizeof bflags, "--boundary %s --image %s", bpath, in_png);
  check_job_replay(&d, id, 0, tmp, "edit", bflags);
  /* errors */
  struct {
    const char *tmpl; /* %s: the boundary */
    const char *code, *field;
  } cases[] = {
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": %s}}",
       "missing_field", "edit.strength"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"strength\": 1}}%.0s",
       "missing_field", "edit.boundary"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": {\"format\": "
       "\"x\"}, \"strength\": 1}}%.0s",
       "invalid_field", "edit.boundary"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": %s, \"strength\": "
       "1e9}}",
       "out_of_range", "edit.strength"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": %s, \"strength\": "
       "1, \"eta\": 2}}",
       "out_of_range", "edit.eta"},
      {"{\"class_label\": 1, \"scheduler\": \"ddim\", \"edit\": {\"type\": \"boundary\", "
       "\"boundary\": %s, \"strength\": 1}}",
       "invalid_field", "scheduler"},
      {"{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": %s, \"strength\": "
       "1, \"skip\": 1}}",
       "unknown_field", "edit.skip"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(body, cap, cases[i].tmpl, btext);
    expect_error(&d, "POST", "/v1/jobs", body, 400, cases[i].code, cases[i].field);
  }
  /* a boundary of another shape */
  char *wrong = strdup(btext);
  char *sh = strstr(wrong, "\"shape\": [3, 32, 32]");
  if (!sh)
    sh = strstr(wrong, "\"shape\":[3,32,32]");
  ck_assert_ptr_nonnull(sh);
  sh[strlen(sh[8] == ' ' ? "\"shape\": [" : "\"shape\":[")] = '1'; /* C = 1 */
  snprintf(body, cap,
           "{\"class_label\": 1, \"edit\": {\"type\": \"boundary\", \"boundary\": %s, "
           "\"strength\": 1}}",
           wrong);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "edit.boundary");
  free(wrong);
  free(img);
  free(btext);
  free(body);
  daemon_stop(&d);
}
END_TEST

/* h-space boundary edits on a UNet: the job moves x and h (or what edit.space names) and gives the
 * CLI's pixels; a space the boundary cannot serve is a 400 naming edit.space. */
START_TEST(boundary_h_jobs) {
  char st[512], tmp[256], unet[1024], shapes[1024], a1[1100], a2[1100], bpath[600], cli_png[600];
  test_src_path(unet, sizeof unet, "tests/fixtures/unet/classcond_small");
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  snprintf(a1, sizeof a1, "default=%s", shapes);
  snprintf(a2, sizeof a2, "small=%s", unet);
  const char *args[] = {"--model", a1, "--model", a2, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  test_tmpdir(tmp, sizeof tmp);
  boundary b = {.dim = 3 * 8 * 8, .c = 3, .h = 8, .w = 8, .scale = 1, .step = 4};
  boundary hb = {.dim = 32 * 4 * 4, .c = 32, .h = 4, .w = 4, .scale = 2, .offset = 0.5};
  b.normal = calloc((size_t)b.dim, sizeof *b.normal);
  hb.normal = calloc((size_t)hb.dim, sizeof *hb.normal);
  for (int i = 0; i < b.dim; i++)
    b.normal[i] = i < 64 ? 0.125f : 0;
  for (int i = 0; i < hb.dim; i++)
    hb.normal[i] = (i % 2 ? 1.0f : -1.0f) / sqrtf((float)hb.dim);
  b.mid = &hb;
  b.solver = json_pack("{s:s, s:i}", "name", "ddim", "steps", 10);
  snprintf(bpath, sizeof bpath, "%s/h.json", tmp);
  err e;
  ck_assert_msg(boundary_save(&b, bpath, &e) == 0, "%s", e.msg);
  json_t *bj = boundary_to_json(&b);
  char *btext = json_dumps(bj, JSON_COMPACT);
  json_decref(bj);
  b.mid = NULL;
  bj = boundary_to_json(&b); /* the same without its h part */
  char *xtext = json_dumps(bj, JSON_COMPACT);
  json_decref(bj);
  free(hb.normal);
  boundary_free(&b);
  size_t cap = strlen(btext) + (1 << 14);
  char *body = malloc(cap), id[64];
  static const char *const spaces[] = {NULL, "x", "h"};
  for (int k = 0; k < 3; k++) {
    char sp[32] = "";
    if (spaces[k])
      snprintf(sp, sizeof sp, ", \"space\": \"%s\"", spaces[k]);
    snprintf(body, cap,
             "{\"model\": \"small\", \"class_label\": 2, \"seed\": 5, \"edit\": {\"type\": "
             "\"boundary\", \"boundary\": %s, \"strength\": 3%s}}",
             btext, sp);
    submit_job(&d, body, id, sizeof id);
    wait_state(&d, id, "succeeded", 60);
    snprintf(cli_png, sizeof cli_png, "%s/h%d.png", tmp, k);
    run_cli("edit --model %s --boundary %s --strength 3 --seed 5 --class 2 %s%s -o %s --quiet",
            unet, bpath, spaces[k] ? "--space " : "", spaces[k] ? spaces[k] : "", cli_png);
    check_same_png(&d, id, cli_png);
  }
  snprintf(body, cap,
           "{\"model\": \"small\", \"class_label\": 2, \"edit\": {\"type\": \"boundary\", "
           "\"boundary\": %s, \"strength\": 3, \"space\": \"z\"}}",
           btext);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "edit.space");
  snprintf(body, cap,
           "{\"model\": \"small\", \"class_label\": 2, \"edit\": {\"type\": \"boundary\", "
           "\"boundary\": %s, \"strength\": 3, \"space\": 4}}",
           btext);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "edit.space");
  snprintf(body, cap,
           "{\"model\": \"small\", \"class_label\": 2, \"edit\": {\"type\": \"boundary\", "
           "\"boundary\": %s, \"strength\": 3, \"space\": \"h\"}}",
           xtext);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "edit.space");
  free(btext);
  free(xtext);
  free(body);
  daemon_stop(&d);
}
END_TEST

/* Issue 18: deblur jobs on an image-conditioned model equal `denoised deblur` with the same
 * flags (image 1 of a batch by its noise stream), replay from their PNG given the input, and
 * every bad request is a 400 naming the field. */
START_TEST(deblur_jobs) {
  char st[512], tmp[256], fix[1024], shapes[1024], a1[1100], a2[1100], in_png[600], cli_png[600];
  char job_png[600], out_png[600], path[160], id[64];
  test_src_path(fix, sizeof fix, "tests/fixtures/cond_unet");
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  snprintf(a1, sizeof a1, "default=%s", shapes);
  snprintf(a2, sizeof a2, "deblur=%s", fix);
  const char *args[] = {"--model", a1, "--model", a2, NULL};
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), args), 0);
  test_tmpdir(tmp, sizeof tmp);
  uint8_t *png;
  size_t len;
  char *img = mask_b64(16, 16, 5, &png, &len); /* the "blurry" picture, 16x16 as the model */
  snprintf(in_png, sizeof in_png, "%s/blurry.png", tmp);
  write_file(in_png, png, len);
  free(png);
  char *png32 = mask_b64(32, 32, 5, &png, &len);
  free(png);
  size_t cap = strlen(png32) + 2048;
  char *body = malloc(cap);
  snprintf(body, cap,
           "{\"model\": \"deblur\", \"seed\": 3, \"batch_size\": 2, \"scheduler\": {\"name\": "
           "\"dpm++2m\", \"steps\": 6}, \"input_image\": \"%s\", \"edit\": {\"type\": "
           "\"deblur\"}}",
           img);
  submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  http_resp r;
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  const json_t *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "deblur");
  ck_assert_ptr_null(json_object_get(ed, "strength")); /* a restoration has none */
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "progress"), "total")), 6);
  json_decref(j);
  http_free(&r);
  /* image 0 is the CLI's restoration with the same flags */
  snprintf(cli_png, sizeof cli_png, "%s/cli.png", tmp);
  run_cli("deblur --model %s --image %s --scheduler dpm++2m --steps 6 --seed 3 -o %s --quiet", fix,
          in_png, cli_png);
  check_same_png(&d, id, cli_png);
  /* image 1 replays from its PNG, given the input picture and the model's folder */
  snprintf(path, sizeof path, "/v1/jobs/%s/images/1", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  snprintf(job_png, sizeof job_png, "%s/job-1.png", tmp);
  write_file(job_png, (uint8_t *)r.body, r.len);
  http_free(&r);
  snprintf(out_png, sizeof out_png, "%s/replayed.png", tmp);
  run_cli("deblur --replay %s --model %s --image %s -o %s --quiet", job_png, fix, in_png, out_png);
  uint8_t *a, *b, *c0;
  fetch_pixels(&d, id, 1, &a);
  fetch_pixels(&d, id, 0, &c0);
  uint8_t *buf = read_file_all(out_png, &len);
  int h, w;
  err e;
  ck_assert_int_eq(image_png_decode(buf, len, 64, 64, &b, &h, &w, &e), 0);
  ck_assert(h == 16 && w == 16 && memcmp(a, b, 16 * 16 * 3) == 0);
  ck_assert_msg(memcmp(a, c0, 16 * 16 * 3) != 0, "the batch's images share their noise");
  free(buf);
  free(a);
  free(b);
  free(c0);
  /* without the input, the replay names what is missing and the job */
  char out[4096];
  ck_assert_int_ne(
      test_run_cli(out, sizeof out, "deblur --replay %s --model %s -o %s", job_png, fix, out_png),
      0);
  ck_assert_msg(strstr(out, "--image") && strstr(out, id), "%s", out);
  /* the other replays send it here */
  ck_assert_int_ne(
      test_run_cli(out, sizeof out, "edit --replay %s --model %s -o %s", job_png, fix, out_png), 0);
  ck_assert_msg(strstr(out, "deblur --replay"), "%s", out);
  char trunc[64];
  snprintf(trunc, sizeof trunc, "%.40s", img); /* a PNG cut after its signature and header */
  struct {
    const char *tmpl; /* %s: an image */
    const char *image;
    const char *code, *field;
  } cases[] = {
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}}", "@@@@",
       "invalid_field", "input_image"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}}",
       "aGVsbG8gd29ybGQ=", "invalid_field", "input_image"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}}", trunc,
       "invalid_field", "input_image"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}}", png32,
       "invalid_field", "input_image"}, /* 32x32 for a 16x16 job */
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}, "
       "\"height\": 24}",
       img, "invalid_field", "height"},
      {"{\"model\": \"deblur\", \"input_image\": 7, \"edit\": {\"type\": \"deblur\"}}%s", "",
       "wrong_type", "input_image"},
      {"{\"model\": \"deblur\", \"edit\": {\"type\": \"deblur\"}}%s", "", "missing_field",
       "input_image"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\", "
       "\"strength\": 0.5}}",
       img, "unknown_field", "edit.strength"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"mask\": \"x\", \"edit\": {\"type\": "
       "\"deblur\"}}",
       img, "invalid_field", "mask"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}, "
       "\"preview\": {\"every\": 2}}",
       img, "invalid_field", "preview"},
      /* a deblurring model only deblurs, and only it does */
      {"{\"model\": \"deblur\"%s}", "", "missing_field", "edit"},
      {"{\"model\": \"deblur\", \"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\"}}", img,
       "invalid_field", "edit.type"},
      {"{\"class_label\": 1, \"input_image\": \"%s\", \"edit\": {\"type\": \"deblur\"}}", img,
       "invalid_field", "edit.type"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(body, cap, cases[i].tmpl, cases[i].image);
    expect_error(&d, "POST", "/v1/jobs", body, 400, cases[i].code, cases[i].field);
  }
  free(img);
  free(png32);
  free(body);
  daemon_stop(&d);
}
END_TEST

/* Issue 13.1, poison jobs: uploaded noise near the float limit (3e38: finite, so the .npy checks
 * passed it, and the run answered a black PNG as "succeeded") is refused at submission naming the
 * field; a run that goes non-finite all the same fails naming the step, and the daemon goes on. */
static void poison_noise(const daemon_proc *d, const char *type, int ndim, const int64_t *shape,
                         float value) {
  size_t n = 1;
  for (int k = 0; k < ndim; k++)
    n *= (size_t)shape[k];
  float *v = malloc(n * sizeof *v);
  for (size_t k = 0; k < n; k++)
    v[k] = k % 2 ? value : -value;
  uint8_t *npy = NULL;
  size_t len = 0;
  err e = {0};
  ck_assert_msg(npy_encode_f32(v, ndim, shape, &npy, &len, &e) == 0, "%s", e.msg);
  char *b64 = base64_encode(npy, len);
  size_t cap = strlen(b64) + 512;
  char *body = malloc(cap);
  snprintf(body, cap,
           "{\"class_label\": 1, \"seed\": 2, \"scheduler\": {\"name\": \"ddim\", \"steps\": %d}, "
           "\"edit\": {\"type\": \"%s\", \"noise\": \"%s\"}}",
           ndim == 5 ? (int)shape[1] - 1 : 5, type, b64);
  expect_error(d, "POST", "/v1/jobs", body, 400, "out_of_range", "edit.noise");
  free(body);
  free(b64);
  free(npy);
  free(v);
}

START_TEST(poison_jobs_are_refused_or_fail) {
  char st[512];
  daemon_proc d;
  const char *env[] = {"DENOISED_FAULT_NAN_SEED=31337", NULL};
  ck_assert_int_eq(daemon_start_env(&d, th_state_dir(st, sizeof st), NULL, env), 0);
  const int64_t xt[4] = {1, 3, 32, 32}, maps[5] = {1, 6, 3, 32, 32};
  poison_noise(&d, "invert_ddim", 4, xt, 3e38f);
  poison_noise(&d, "invert_ddpm", 5, maps, 3e38f);
  poison_noise(&d, "invert_ddim", 4, xt, 2e4f);
  /* a run that goes non-finite (the test hook: NaN noise in DDPM's third step) fails, naming
   * the step where it shows, and leaves no image */
  char bad[64], path[128];
  submit_job(&d,
             "{\"class_label\": 2, \"seed\": 31337, \"scheduler\": {\"name\": \"ddpm\", \"steps\": "
             "10}}",
             bad, sizeof bad);
  wait_state(&d, bad, "finished", 60);
  for (int pass = 0; pass < 2; pass++) {
    snprintf(path, sizeof path, "/v1/jobs/%s", bad);
    http_resp g;
    http_get(&d, path, &g);
    json_t *j = http_json(&g);
    const char *state = json_string_value(json_object_get(j, "state"));
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    ck_assert_msg(state && strcmp(state, "failed") == 0, "%s", g.body);
    ck_assert_msg(msg && strstr(msg, "non-finite values in the sampler state at step 4 of 10"),
                  "%s", g.body);
    json_decref(j);
    http_free(&g);
    snprintf(path, sizeof path, "/v1/jobs/%s/images/0", bad);
    http_get(&d, path, &g);
    ck_assert_msg(g.status != 200, "a failed job serves an image");
    http_free(&g);
    /* still serving, and after a restart the job stays failed (it is not run again) */
    http_get(&d, "/healthz", &g);
    ck_assert_int_eq(g.status, 200);
    http_free(&g);
    char id[64];
    submit_job(
        &d, "{\"class_label\": 2, \"seed\": 7, \"scheduler\": {\"name\": \"ddpm\", \"steps\": 10}}",
        id, sizeof id);
    wait_state(&d, id, "succeeded", 60);
    ck_assert_msg((daemon_log_count(&d, "non-finite values") > 0) == (pass == 0),
                  "start %d: the poison job ran %s", pass + 1,
                  pass ? "again" : "without a log line");
    daemon_stop(&d);
    if (pass == 0)
      ck_assert_int_eq(daemon_start_env(&d, st, NULL, env), 0);
  }
}
END_TEST

/* CPU seconds (user + system) process pid has used, from /proc/PID/stat. */
static double proc_cpu_seconds(pid_t pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  const char *p = strrchr(buf, ')');
  ck_assert_ptr_nonnull(p);
  unsigned long long ut = 0, st = 0;
  /* after the name: state and 10 more fields, then utime and stime */
  ck_assert_int_eq(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st),
                   2);
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* issue 22: a 32x32 PNG with ~2 MB of compressed zeros behind its scanlines (2 GiB inflated)
 * cost 6.6 s of CPU at submission and again on the worker; now a 400 naming input_image, at the
 * cost of reading its chunk headers. */
START_TEST(trailing_data_png_is_refused) {
  char st[512];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  size_t len;
  uint8_t *png = test_trailing_png(32, 32, 128, &len);
  char *b64 = base64_encode(png, len);
  size_t cap = strlen(b64) + 512;
  char *body = malloc(cap);
  snprintf(body, cap,
           "{\"class_label\": 3, \"seed\": 21, \"scheduler\": {\"name\": \"ddim\", \"steps\": 20}, "
           "\"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", \"strength\": 0.6}}",
           b64);
  const double t0 = proc_cpu_seconds(d.pid);
  expect_error(&d, "POST", "/v1/jobs", body, 400, "invalid_field", "input_image");
  const double cpu = proc_cpu_seconds(d.pid) - t0;
  /* the daemon's whole request (body, JSON, base64) in CPU clock ticks: a generous bound */
  ck_assert_msg(cpu < 1.0, "%.2f s of CPU", cpu);
  printf("trailing data PNG of %zu bytes: 400 after %.2f s of daemon CPU\n", len, cpu);
  free(body);
  free(b64);
  free(png);
  daemon_stop(&d);
}
END_TEST

/* kB of field (VmRSS, VmHWM) in /proc/PID/status. */
static long proc_status_kb(pid_t pid, const char *field) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  long kb = -1;
  while (kb < 0 && fgets(line, sizeof line, f))
    if (strncmp(line, field, strlen(field)) == 0 && line[strlen(field)] == ':')
      kb = strtol(line + strlen(field) + 1, NULL, 10);
  fclose(f);
  ck_assert_int_ge(kb, 0);
  return kb;
}

/* A black 32x32 PNG of about `size` bytes: random bytes in a private ancillary chunk. */
static uint8_t *padded_png(size_t size, size_t *len) {
  uint8_t *png = test_trailing_png(32, 32, 0, len);
  const size_t iend = *len - 12;
  uint8_t *tail = malloc(12);
  memcpy(tail, png + iend, 12);
  *len = iend;
  uint8_t *junk = malloc(size);
  for (size_t i = 0; i < size; i++)
    junk[i] = (uint8_t)(i * 2654435761u >> 13);
  test_put_chunk(&png, len, "juNk", junk, size);
  png = realloc(png, *len + 12);
  memcpy(png + *len, tail, 12);
  *len += 12;
  free(junk);
  free(tail);
  return png;
}

/* issue 22.1: finished jobs kept their whole spec, base64 inputs included (200 img2img jobs of
 * 3.9 MB: +860 MB of RSS), and listings deep-copied them under the lock. Now a finished job
 * keeps what its views need, its record on disk keeps the inputs, and a restart reads them once
 * more only for jobs that still have to run. */
START_TEST(finished_jobs_release_inputs) {
  char st[512], path[128];
  daemon_proc d;
  ck_assert_int_eq(daemon_start(&d, th_state_dir(st, sizeof st), NULL), 0);
  size_t len;
  uint8_t *png = padded_png(1500000, &len);
  char *b64 = base64_encode(png, len);
  const size_t cap = strlen(b64) + 512;
  char *body = malloc(cap);
  snprintf(body, cap,
           "{\"class_label\": 3, \"seed\": 5, \"scheduler\": {\"name\": \"ddim\", \"steps\": 4}, "
           "\"input_image\": \"%s\", \"edit\": {\"type\": \"img2img\", \"strength\": 0.5}}",
           b64);
  char id[64];
  /* the first ones grow the allocator's arenas to their working size (a plateau) */
  for (int i = 0; i < 10; i++)
    submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 60);
  const long rss0 = proc_status_kb(d.pid, "VmRSS");
  enum { N = 20 };
  for (int i = 0; i < N; i++)
    submit_job(&d, body, id, sizeof id);
  wait_state(&d, id, "succeeded", 120);
  const long rss1 = proc_status_kb(d.pid, "VmRSS");
  /* the inputs are 20 x 2 MB of base64: kept, they are +40 MB */
  printf("%d finished img2img jobs with %zu-byte inputs: VmRSS %ld -> %ld kB\n", N, strlen(b64),
         rss0, rss1);
#ifdef __SANITIZE_ADDRESS__
  /* ASan's quarantine holds on to freed memory (256 MB): RSS says nothing about retention */
#else
  /* three quarters of what keeping them costs: queued jobs hold their inputs until they run, and
   * under a loaded machine more of them wait at once (15 MB was seen with ctest -j2) */
  ck_assert_msg(rss1 - rss0 < (long)(N * strlen(b64) / 1024 * 3 / 4), "VmRSS %ld -> %ld kB", rss0,
                rss1);
#endif
  /* the views echo what they did: the edit, no picture */
  http_resp r;
  ck_assert_int_eq(http_get(&d, "/v1/jobs?limit=100", &r), 200);
  ck_assert_msg(r.len < 200000, "a listing of %d jobs takes %zu bytes", N + 1, r.len);
  http_free(&r);
  snprintf(path, sizeof path, "/v1/jobs/%s", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  json_t *j = http_json(&r);
  json_t *ed = json_object_get(json_object_get(j, "request"), "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "img2img");
  ck_assert(json_is_false(json_object_get(ed, "mask")));
  json_decref(j);
  http_free(&r);
  /* the record still holds the input: after a restart the job is there, and its image */
  daemon_stop(&d);
  ck_assert_int_eq(daemon_start(&d, st, NULL), 0);
  snprintf(path, sizeof path, "%s/jobs/%s.json", st, id);
  size_t rec_len;
  char *rec = (char *)read_file_all(path, &rec_len);
  rec[rec_len] = 0;
  ck_assert_msg(strstr(rec, b64) != NULL, "the record lost its input_image");
  free(rec);
  char state[32];
  job_state(&d, id, state, sizeof state, NULL);
  ck_assert_str_eq(state, "succeeded");
  snprintf(path, sizeof path, "/v1/jobs/%s/images/0", id);
  ck_assert_int_eq(http_get(&d, path, &r), 200);
  http_free(&r);
  free(body);
  free(b64);
  free(png);
  daemon_stop(&d);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("server_edit");
  TCase *tc = tcase_create("server_edit");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, edit_jobs);
  tcase_add_test(tc, trailing_data_png_is_refused);
  tcase_add_test(tc, finished_jobs_release_inputs);
  tcase_add_test(tc, invert_jobs);
  tcase_add_test(tc, boundary_jobs);
  tcase_add_test(tc, boundary_h_jobs);
  tcase_add_test(tc, deblur_jobs);
  tcase_add_test(tc, poison_jobs_are_refused_or_fail);
  suite_add_tcase(s, tc);
  return s;
}
