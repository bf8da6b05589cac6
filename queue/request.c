/* A job spec as the pipeline's typed request: the inputs the API decoded at submission (after a
 * restart, the spec's base64 inputs decoded here, once; the pipeline replicates them over the
 * batch), and the edit arguments the API validated read into
 * typed fields. The spec keeps its JSON form because it is what the store persists. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "image.h"
#include "mem.h"
#include "npy.h"

static int arg_int(const json_t *a, const char *key, int dflt) {
  const json_t *v = json_object_get(a, key);
  return json_is_integer(v) ? (int)json_integer_value(v) : dflt;
}

static int decode_png(const char *b64, const char *field, int is_mask, int c, int h, int w,
                      float **out, err *e) {
  uint8_t *png = NULL;
  size_t len = 0;
  if (!b64 || base64_decode(b64, strlen(b64), &png, &len) != 0)
    return err_set(e, ERR_FORMAT, "%s: not base64", field);
  float *x = mem_malloc((size_t)(is_mask ? 1 : c) * h * w * sizeof *x);
  int rc = !x        ? err_set(e, ERR_NOMEM, "out of memory")
           : is_mask ? image_mask_from_png(png, len, field, h, w, x, e)
                     : image_from_png(png, len, field, c, h, w, x, e);
  free(png);
  if (rc)
    free(x);
  else
    *out = x;
  return rc;
}

/* Noise maps sent with the job (base64 .npy); the pipeline checks their shape. */
static int decode_noise(const char *b64, qrequest *q, err *e) {
  uint8_t *raw = NULL;
  size_t len = 0;
  if (base64_decode(b64, strlen(b64), &raw, &len) != 0)
    return err_set(e, ERR_FORMAT, "edit.noise: not base64");
  int rc = npy_parse_f32(raw, len, "edit.noise", &q->noise, e);
  free(raw);
  if (!rc)
    rc = npy_check_finite(&q->noise, "edit.noise", e);
  if (rc)
    return rc;
  q->r.noise = q->noise.data;
  q->r.noise_shape = q->noise.shape;
  q->r.noise_ndim = q->noise.ndim;
  return ERR_OK;
}

static int invert_args(const queue_spec *sp, const model *m, qrequest *q, err *e) {
  const json_t *a = sp->edit_args;
  if (q->r.labels) {
    if (!(q->src_labels = mem_malloc(sizeof *q->src_labels * (size_t)sp->batch)))
      return err_set(e, ERR_NOMEM, "out of memory");
    for (int b = 0; b < sp->batch; b++)
      q->src_labels[b] = arg_int(a, "source_class", (int)q->r.labels[b]);
    q->r.invert.source_labels = q->src_labels;
  }
  const json_t *sg = json_object_get(a, "source_guidance");
  if (json_is_number(sg)) {
    q->gsrc = guidance_for(m, json_number_value(sg));
    q->gsrc.null_label = sp->null_class;
    q->r.invert.source_guidance = &q->gsrc;
  }
  const json_t *sh = json_object_get(a, "shift"), *co = json_object_get(a, "colour");
  q->r.invert.skip = arg_int(a, "skip", 0);
  q->r.invert.edit = (invert_edit){.dx = (int)json_integer_value(json_array_get(sh, 0)),
                                   .dy = (int)json_integer_value(json_array_get(sh, 1)),
                                   .has_colour = json_is_array(co),
                                   .colour_from = arg_int(a, "colour_from", -1)};
  for (int c = 0; c < 3 && json_is_array(co); c++)
    q->r.invert.edit.colour[c] = (float)json_number_value(json_array_get(co, c));
  const json_t *nz = json_object_get(a, "noise");
  if (json_is_string(nz) && sp->decoded && sp->decoded->noise) {
    q->r.noise = sp->decoded->noise;
    q->r.noise_shape = sp->decoded->noise_shape;
    q->r.noise_ndim = sp->decoded->noise_ndim;
    return ERR_OK;
  }
  if (json_is_string(nz))
    return decode_noise(json_string_value(nz), q, e);
  if (!q->r.image)
    return err_set(e, ERR_FORMAT, "an inversion needs input_image or edit.noise");
  return ERR_OK;
}

static int boundary_args(const queue_spec *sp, qrequest *q, err *e) {
  const json_t *a = sp->edit_args;
  int rc = boundary_from_json(json_object_get(a, "boundary"), &q->bd, e);
  if (rc)
    return rc;
  q->has_bd = 1;
  const json_t *sv = json_object_get(a, "space"), *eta = json_object_get(a, "eta");
  if (edit_space_parse(json_is_string(sv) ? json_string_value(sv) : NULL, &q->bd,
                       &q->r.bound.space))
    return err_set(e, ERR_INVALID, "edit.space: must be x, h or both");
  q->r.bound.boundary = &q->bd;
  q->r.bound.strength = sp->strength;
  q->r.bound.eta = json_is_number(eta) ? json_number_value(eta) : 1.0;
  return ERR_OK;
}

int qrequest_from_spec(const model *m, const queue_spec *sp, qrequest *q, err *e) {
  memset(q, 0, sizeof *q);
  const model_info *mi = model_get_info(m);
  static const pipeline_kind kinds[] = {[QUEUE_EDIT_NONE] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_IMG2IMG] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_INPAINT] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_INVERT_DDIM] = PIPELINE_INVERT_DDIM,
                                        [QUEUE_EDIT_INVERT_DDPM] = PIPELINE_INVERT_DDPM,
                                        [QUEUE_EDIT_BOUNDARY] = PIPELINE_BOUNDARY,
                                        [QUEUE_EDIT_DEBLUR] = PIPELINE_DEBLUR,
                                        [QUEUE_EDIT_CONCEPT] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_AUDIT] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_STYLIZE] = PIPELINE_GENERATE,
                                        [QUEUE_EDIT_FINETUNE] = PIPELINE_GENERATE};
  if (sp->edit < 0 || sp->edit > QUEUE_EDIT_FINETUNE)
    return err_set(e, ERR_FORMAT, "unknown edit kind %d", sp->edit);
  q->r = (pipeline_request){.kind = kinds[sp->edit],
                            .solver = {.name = sp->solver,
                                       .steps = sp->steps,
                                       .options = sp->options,
                                       .data = sp->data[0] ? sp->data : NULL},
                            .batch = sp->batch,
                            .height = sp->height,
                            .width = sp->width,
                            .seed = sp->seed,
                            .first_image = sp->first_image,
                            .images = 1,
                            .strength = sp->strength,
                            .prompt = sp->prompt,
                            .negative_prompt = sp->negative_prompt,
                            .clip_skip = sp->clip_skip};
  if (sp->has_label) {
    if (!(q->labels = mem_malloc(sizeof *q->labels * (size_t)sp->batch)))
      return err_set(e, ERR_NOMEM, "out of memory");
    for (int b = 0; b < sp->batch; b++)
      q->labels[b] = sp->label;
    q->r.labels = q->labels;
  }
  if (sp->has_guidance) {
    q->g = guidance_for(m, sp->guidance_scale);
    q->g.null_label = sp->null_class;
    q->r.guidance = &q->g;
  }
  if (sp->has_classifier) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/classifier", model_dir(m));
    int rc = classifier_load(dir, &q->clf, e);
    if (rc != ERR_OK)
      return err_prefix(e, "guidance.classifier");
    if (!(q->targets = mem_malloc(sizeof *q->targets * (size_t)sp->batch)))
      return err_set(e, ERR_NOMEM, "out of memory");
    for (int b = 0; b < sp->batch; b++)
      q->targets[b] = sp->clf_target;
    q->cg = (classifier_guidance){
        .clf = q->clf, .head = sp->clf_head, .scale = sp->clf_scale, .target = q->targets};
    q->r.classifier = &q->cg;
  }
  /* decoded at submission, or (after a restart) decoded here, once */
  const queue_decoded *dec = sp->decoded;
  int rc = ERR_OK;
  /* a deblurring job's picture has the channels of the model's conditioning image */
  const int ci =
      sp->edit == QUEUE_EDIT_DEBLUR && !mi->regression ? mi->cond_channels : mi->image_channels;
  if (sp->input_image && !(dec && dec->image))
    rc = decode_png(sp->input_image, "input_image", 0, ci, sp->height, sp->width, &q->image, e);
  if (!rc && sp->edit == QUEUE_EDIT_INPAINT && !(dec && dec->mask))
    rc = decode_png(sp->mask, "mask", 1, mi->in_channels, sp->height, sp->width, &q->mask, e);
  q->r.image = q->image ? q->image : dec ? dec->image : NULL;
  q->r.mask = q->mask ? q->mask : dec ? dec->mask : NULL;
  if (!rc && sp->edit >= QUEUE_EDIT_INVERT_DDIM && sp->edit <= QUEUE_EDIT_BOUNDARY &&
      !json_is_object(sp->edit_args))
    rc = err_set(e, ERR_FORMAT, "the job's edit arguments are missing");
  if (!rc && (sp->edit == QUEUE_EDIT_INVERT_DDIM || sp->edit == QUEUE_EDIT_INVERT_DDPM))
    rc = invert_args(sp, m, q, e);
  if (!rc && sp->edit == QUEUE_EDIT_BOUNDARY)
    rc = boundary_args(sp, q, e);
  return rc;
}

void qrequest_free(qrequest *q) {
  free(q->labels);
  free(q->src_labels);
  free(q->targets);
  classifier_free(q->clf);
  free(q->image);
  free(q->mask);
  npy_array_free(&q->noise);
  if (q->has_bd)
    boundary_free(&q->bd);
  memset(q, 0, sizeof *q);
}
