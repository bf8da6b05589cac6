/* edit.type "finetune" of POST /v1/jobs: few-shot fine-tuning of the job's model on the images
 * sent (DomainStudio or plain), the adapted model served under edit.name afterwards. Every
 * image is decoded against the model's size and channels and every label against its classes
 * here, so a bad request is a 400 naming the field and never a failed job. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dstudio.h"
#include "image.h"
#include "internal.h"

#define FT_MAX_IMAGES 64
#define FT_MAX_STEPS 20000
#define FT_MAX_BATCH 32

/* One {"image", "label"} item, checked; its copy (label as the class index) goes to out. */
static int parse_item(const json_t *it, int i, const queue_model_desc *md, float *x, json_t *out,
                      api_error *e) {
  static const char *const keys[] = {"image", "label", NULL};
  char field[64], prefix[64];
  snprintf(field, sizeof field, "edit.images[%d]", i);
  snprintf(prefix, sizeof prefix, "%s.", field);
  if (!json_is_object(it))
    return api_fail(e, 400, "wrong_type", field,
                    "%s: expected {\"image\": base64 PNG, \"label\": class}, got %s", field,
                    sched_json_kind(it));
  int rc = api_check_keys(it, prefix, keys, e);
  if (rc)
    return rc;
  snprintf(field, sizeof field, "edit.images[%d].image", i);
  char *b64 = NULL;
  uint8_t *png = NULL;
  size_t len = 0;
  if ((rc = api_get_png(json_object_get(it, "image"), field, &b64, &png, &len, e)))
    return rc;
  err ie = {0};
  int pc = 0, ph = 0, pw = 0;
  if (image_png_header(png, len, field, &pc, &ph, &pw, &ie) == ERR_OK && pc != md->in_channels)
    err_set(&ie, ERR_SHAPE, "%s: %d channel(s)", field, pc);
  if (ie.code ||
      image_from_png(png, len, field, md->in_channels, md->sample_size, md->sample_size, x, &ie))
    rc = api_fail(e, 400, "invalid_field", field, "%s (model '%s' takes %dx%d images, %d channels)",
                  ie.msg, md->name, md->sample_size, md->sample_size, md->in_channels);
  free(png);
  json_t *o = rc ? NULL : json_pack("{s:s}", "image", b64);
  free(b64);
  const json_t *lv = json_object_get(it, "label");
  snprintf(field, sizeof field, "edit.images[%d].label", i);
  int64_t label = 0;
  if (!rc && md->num_classes > 0 && (!lv || json_is_null(lv)))
    rc = api_fail(e, 400, "missing_field", field,
                  "%s: model '%s' is class-conditional: give each image's class", field, md->name);
  else if (!rc && md->num_classes <= 0 && lv && !json_is_null(lv))
    rc = api_fail(e, 400, "invalid_field", field, "%s: model '%s' has no classes", field, md->name);
  else if (!rc && md->num_classes > 0 && !(rc = api_parse_label(lv, md, field, &label, e)))
    json_object_set_new(o, "label", json_integer(label));
  if (!rc && (!o || json_array_append_new(out, o) != 0))
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  if (rc)
    json_decref(o);
  return rc;
}

/* The images: at least min (and at most FT_MAX_IMAGES) of them, into out. */
static int parse_images(const json_t *imgs, const queue_model_desc *md, int min, const char *why,
                        json_t *out, api_error *e) {
  if (!imgs)
    return api_fail(e, 400, "missing_field", "edit.images",
                    "edit.images: give the images to adapt to, [{\"image\": base64 PNG, "
                    "\"label\": class}]");
  if (!json_is_array(imgs))
    return api_fail(e, 400, "wrong_type", "edit.images", "edit.images: expected an array, got %s",
                    sched_json_kind(imgs));
  const int n = (int)json_array_size(imgs);
  if (n < min || n > FT_MAX_IMAGES)
    return api_fail(e, 400, "invalid_field", "edit.images",
                    "edit.images: %d image(s); give %d to %d%s", n, min, FT_MAX_IMAGES, why);
  float *x = malloc((size_t)md->in_channels * md->sample_size * md->sample_size * sizeof *x);
  if (!x)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  int rc = 0;
  for (int i = 0; !rc && i < n; i++)
    rc = parse_item(json_array_get(imgs, (size_t)i), i, md, x, out, e);
  free(x);
  return rc;
}

/* What the trainer can adapt: a UNet2DModel denoising images (no text, no conditioning image,
 * no regression), predicting as many channels as it reads. */
static int check_model(const queue_model_desc *md, api_error *e) {
  if (md->kind != MODEL_UNET2D || md->text_conditional || md->cond_channels || md->regression ||
      md->out_channels != md->in_channels)
    return api_fail(e, 400, "invalid_field", "model",
                    "model: '%s' cannot be fine-tuned here (finetune adapts a UNet2DModel that "
                    "denoises images and predicts as many channels as it reads)",
                    md->name);
  return 0;
}

/* The method and its settings into args. */
static int parse_settings(const json_t *ed, json_t *args, int *min_images, api_error *e) {
  const json_t *mv = json_object_get(ed, "method");
  if (!mv)
    return api_fail(e, 400, "missing_field", "edit.method",
                    "edit.method: give the method, domainstudio or plain");
  const char *method = json_is_string(mv) ? json_string_value(mv) : "";
  const int ds = strcmp(method, "domainstudio") == 0;
  if (!ds && strcmp(method, "plain") != 0)
    return api_fail(e, 400, "invalid_field", "edit.method",
                    "edit.method: '%.40s' is not a method (domainstudio or plain)", method);
  long long steps = 0, batch = DSTUDIO_RECIPE_BATCH;
  double lr = DSTUDIO_RECIPE_LR;
  double w[3] = {DSTUDIO_RECIPE_PAIR, DSTUDIO_RECIPE_HF_PAIR, DSTUDIO_RECIPE_HF_MSE};
  static const char *const wk[3] = {"pair_weight", "hf_pair_weight", "hf_mse_weight"};
  int present, rc;
  if ((rc = api_get_int(ed, "steps", "edit.steps", 1, FT_MAX_STEPS, &steps, &present, e)))
    return rc;
  if (!present)
    return api_fail(e, 400, "missing_field", "edit.steps",
                    "edit.steps: give the number of training steps");
  if ((rc =
           api_get_int(ed, "batch", "edit.batch", ds ? 3 : 1, FT_MAX_BATCH, &batch, &present, e)) ||
      (rc = api_get_number(ed, "lr", "edit.lr", 1e-12, 1, &lr, &present, e)))
    return rc;
  for (int k = 0; k < 3; k++) {
    char field[40];
    snprintf(field, sizeof field, "edit.%s", wk[k]);
    if ((rc = api_get_number(ed, wk[k], field, 0, 1e6, &w[k], &present, e)))
      return rc;
    if (present && !ds)
      return api_fail(e, 400, "invalid_field", field,
                      "%s: a weight of DomainStudio's losses (method domainstudio)", field);
  }
  *min_images = ds ? 3 : 1;
  if (json_object_set_new(args, "method", json_string(ds ? "domainstudio" : "plain")) ||
      json_object_set_new(args, "steps", json_integer(steps)) ||
      json_object_set_new(args, "batch", json_integer(batch)) ||
      json_object_set_new(args, "lr", json_real(lr)))
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  for (int k = 0; k < 3; k++)
    if (json_object_set_new(args, wk[k], json_real(ds ? w[k] : 0.0)))
      return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  return 0;
}

int api_parse_finetune(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                       queue_spec *out, api_error *e) {
  static const char *const keys[] = {"type",           "name",          "method", "images",
                                     "steps",          "batch",         "lr",     "pair_weight",
                                     "hf_pair_weight", "hf_mse_weight", NULL};
  const json_t *ed = f->edit;
  int rc = api_check_keys(ed, "edit.", keys, e), min_images = 1;
  if (rc || (rc = check_model(md, e)))
    return rc;
  if (f->input_image || f->mask)
    return api_fail(e, 400, "invalid_field", f->input_image ? "input_image" : "mask",
                    "%s: a finetune job takes its pictures in edit.images",
                    f->input_image ? "input_image" : "mask");
  const json_t *nv = json_object_get(ed, "name");
  if (!json_is_string(nv))
    return api_fail(e, 400, nv ? "wrong_type" : "missing_field", "edit.name",
                    "edit.name: give the adapted model's name (a string)");
  if ((rc = api_new_model_name(c, json_string_value(nv), "edit.name", e)))
    return rc;
  json_t *args = json_pack("{s:s}", "name", json_string_value(nv)), *imgs = json_array();
  if (!args || !imgs)
    rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  if (!rc)
    rc = parse_settings(ed, args, &min_images, e);
  if (!rc)
    rc = parse_images(json_object_get(ed, "images"), md, min_images,
                      min_images > 1 ? " (DomainStudio compares three distinct images; the "
                                       "authors use 10)"
                                     : "",
                      imgs, e);
  if (!rc && json_object_set(args, "images", imgs))
    rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  json_decref(imgs);
  if (rc) {
    json_decref(args);
    return rc;
  }
  out->edit_args = args;
  out->edit = QUEUE_EDIT_FINETUNE;
  return 0;
}
