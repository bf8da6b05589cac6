/* The edit block of a job: img2img and inpainting (SDEdit), DDIM and edit-friendly DDPM
 * inversions with their noise-space edits, and BoundaryDiffusion moves. Every picture, noise
 * map and boundary is decoded and checked here, so a bad one is a 400 naming the field. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adjtask.h"
#include "base64.h"
#include "boundary.h"
#include "edit.h"
#include "image.h"
#include "internal.h"
#include "npy.h"
#include "pipeline.h"

#define API_MAX_PNG_BYTES (4 << 20)     /* an input image or mask, decoded from base64 */
#define API_MAX_NOISE_BYTES (256 << 20) /* the noise maps an inversion job keeps */
#define API_MAX_SOURCE_GUIDANCE 50.0

/* A base64 PNG field (optionally a data: URL): its base64 text (malloc'ed, for the spec) and
 * its bytes. */
int api_get_png(const json_t *v, const char *field, char **b64, uint8_t **png, size_t *len,
                api_error *e) {
  if (!json_is_string(v))
    return api_fail(e, 400, "wrong_type", field, "%s: expected a base64 PNG, got %s", field,
                    sched_json_kind(v));
  const char *t = json_string_value(v);
  size_t n = json_string_length(v);
  if (strncmp(t, "data:", 5) == 0) {
    const char *comma = memchr(t, ',', n);
    if (!comma || comma - t < 12 || strncmp(comma - 7, ";base64", 7) != 0)
      return api_fail(e, 400, "invalid_field", field,
                      "%s: a data URL must be data:image/png;base64,...", field);
    n -= (size_t)(comma + 1 - t);
    t = comma + 1;
  }
  if (n == 0)
    return api_fail(e, 400, "invalid_field", field, "%s: the image is empty", field);
  if (n / 4 * 3 > API_MAX_PNG_BYTES)
    return api_fail(e, 400, "too_large", field,
                    "%s: the PNG is larger than this server's limit of %d bytes", field,
                    API_MAX_PNG_BYTES);
  if (base64_decode(t, n, png, len) != 0)
    return api_fail(e, 400, "invalid_field", field, "%s: not valid base64 (RFC 4648, padded)",
                    field);
  *b64 = strndup(t, n);
  if (!*b64) {
    free(*png);
    *png = NULL;
    return api_fail(e, 500, "internal", NULL, "out of memory");
  }
  return 0;
}

/* input_image (and mask) decoded at the job's size, once: out->input_image / out->mask keep the
 * base64 text (the record), out->decoded the floats the worker uses. */
static int check_pictures(const api_job_fields *f, const queue_model_desc *md, queue_spec *out,
                          api_error *e) {
  if (!f->input_image && !f->mask)
    return 0;
  const size_t plane = (size_t)out->height * out->width;
  queue_decoded *dec = queue_spec_decoded(out);
  if (!dec)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  int rc = 0;
  uint8_t *png = NULL;
  size_t len = 0;
  err qe = {0};
  if (f->input_image) {
    if ((rc = api_get_png(f->input_image, "input_image", &out->input_image, &png, &len, e)))
      goto done;
    /* a deblurring job's picture has the channels of the model's conditioning image; otherwise
     * the picture's own channels (a latent model's VAE encodes it: image_channels, 3) */
    const int c =
        out->edit == QUEUE_EDIT_DEBLUR && !md->regression ? md->cond_channels : md->image_channels;
    if (!(dec->image = malloc((size_t)(c > 3 ? c : 3) * plane * sizeof *dec->image))) {
      rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
      goto done;
    }
    if (image_from_png(png, len, "input_image", c, out->height, out->width, dec->image, &qe) !=
        ERR_OK) {
      rc = api_fail(e, 400, "invalid_field", "input_image", "%s", qe.msg);
      goto done;
    }
  }
  if (f->mask) {
    free(png);
    png = NULL;
    if ((rc = api_get_png(f->mask, "mask", &out->mask, &png, &len, e)))
      goto done;
    if (!(dec->mask = malloc(plane * sizeof *dec->mask))) {
      rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
      goto done;
    }
    if (image_mask_from_png(png, len, "mask", out->height, out->width, dec->mask, &qe) != ERR_OK) {
      rc = api_fail(e, 400, "invalid_field", "mask", "%s", qe.msg);
      goto done;
    }
  }
done:
  free(png);
  return rc;
}

int api_get_number(const json_t *obj, const char *key, const char *field, double lo, double hi,
                   double *out, int *present, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  *present = v != NULL;
  if (!v)
    return 0;
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", field, "%s: expected a number, got %s", field,
                    sched_json_kind(v));
  const double x = json_number_value(v);
  if (!(x >= lo && x <= hi))
    return api_fail(e, 400, "out_of_range", field, "%s: %g is out of range [%g, %g]", field, x, lo,
                    hi);
  *out = x;
  return 0;
}

/* An array of n numbers in [lo, hi] (whole numbers if integral). */
static int get_list(const json_t *obj, const char *key, const char *field, int n, double lo,
                    double hi, int integral, json_t **out, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  if (!v)
    return 0;
  if (!json_is_array(v) || (int)json_array_size(v) != n)
    return api_fail(e, 400, "wrong_type", field, "%s: expected an array of %d %s", field, n,
                    integral ? "integers" : "numbers");
  for (int i = 0; i < n; i++) {
    const json_t *x = json_array_get(v, (size_t)i);
    if (integral ? !json_is_integer(x) : !json_is_number(x))
      return api_fail(e, 400, "wrong_type", field, "%s[%d]: expected %s, got %s", field, i,
                      integral ? "an integer" : "a number", sched_json_kind(x));
    const double d = json_number_value(x);
    if (!(d >= lo && d <= hi))
      return api_fail(e, 400, "out_of_range", field, "%s[%d]: %g is out of range [%g, %g]", field,
                      i, d, lo, hi);
  }
  *out = json_deep_copy(v);
  return 0;
}

/* The defaults an earlier inversion job hands on with its noise (noise_from). */
typedef struct noise_source {
  int has_label, has_guidance;
  int64_t label;
  double guidance;
} noise_source;

/* edit.noise (base64 .npy) or edit.noise_from (a succeeded inversion job of the same owner):
 * checked against the shape this job's grid needs; the base64 text goes to args.noise. */
static int get_noise(const api_ctx *c, const json_t *ed, const char *owner, int kind,
                     const int64_t *shape, int ndim, json_t *args, noise_source *src,
                     queue_spec *out, api_error *e) {
  const json_t *nz = json_object_get(ed, "noise"), *from = json_object_get(ed, "noise_from");
  const char *field = nz ? "edit.noise" : "edit.noise_from";
  uint8_t *raw = NULL;
  size_t len = 0;
  char *b64 = NULL;
  int rc = 0;
  if (nz) {
    if (!json_is_string(nz))
      return api_fail(e, 400, "wrong_type", field, "%s: expected a base64 .npy, got %s", field,
                      sched_json_kind(nz));
    if (base64_decode(json_string_value(nz), json_string_length(nz), &raw, &len) != 0)
      return api_fail(e, 400, "invalid_field", field, "%s: not valid base64 (RFC 4648, padded)",
                      field);
  } else {
    if (!json_is_string(from))
      return api_fail(e, 400, "wrong_type", field, "%s: expected a job id, got %s", field,
                      sched_json_kind(from));
    const char *id = json_string_value(from);
    queue_job_view v;
    err qe = {0};
    if (queue_get(c->q, id, owner && *owner ? owner : NULL, &v, &qe) != ERR_OK)
      return api_fail(e, 400, "invalid_field", field, "%s: no job '%.40s'", field, id);
    const int same = v.spec.edit == kind;
    src->has_label = v.spec.has_label;
    src->label = v.spec.label;
    src->has_guidance = v.spec.has_guidance;
    src->guidance = v.spec.guidance_scale;
    queue_view_clear(&v);
    if (!same)
      return api_fail(e, 400, "invalid_field", field,
                      "%s: job '%.40s' is not an %s inversion of an input image", field, id,
                      queue_edit_name(kind));
    if (queue_noise(c->q, id, owner && *owner ? owner : NULL, &raw, &len, &qe) != ERR_OK)
      return api_fail(e, qe.code == QUEUE_NOT_READY ? 409 : 400,
                      qe.code == QUEUE_NOT_READY ? "not_ready" : "invalid_field", field, "%s: %s",
                      field, qe.msg);
  }
  npy_array a = {0};
  err qe = {0};
  if ((rc = npy_parse_f32_shaped(raw, len, field, shape, ndim, &a, &qe)) != ERR_OK) {
    rc = api_fail(e, 400, "invalid_field", field, "%s%s", qe.msg,
                  rc != ERR_SHAPE ? ""
                  : ndim == 5     ? " (batch_size, scheduler.steps + 1, the model's channels, "
                                    "height, width)"
                                  : " (batch_size, the model's channels, height, width)");
    goto done;
  }
  if (pipeline_check_noise(a.data, (size_t)a.count, field, &qe) != ERR_OK) {
    rc = api_fail(e, 400, "out_of_range", field, "%s", qe.msg);
    goto done;
  }
  b64 = nz ? NULL : base64_encode(raw, len);
  if (!nz && !b64) {
    rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
    goto done;
  }
  json_object_set_new(args, "noise", nz ? json_string(json_string_value(nz)) : json_string(b64));
  queue_decoded *dec = queue_spec_decoded(out);
  if (!dec) {
    rc = api_fail(e, 503, "out_of_memory", NULL, "out of memory");
    goto done;
  }
  /* the parsed maps go to the worker as they are: parsed once */
  dec->noise = a.data;
  dec->noise_ndim = a.ndim;
  memcpy(dec->noise_shape, a.shape, sizeof dec->noise_shape);
  a.data = NULL;
done:
  npy_array_free(&a);
  free(raw);
  free(b64);
  return rc;
}

/* The checks of an inversion's request before anything is decoded: its keys, DDIM's grid, one
 * source (an image or earlier noise) and the noise maps' size. */
static int invert_check(const api_job_fields *f, const queue_model_desc *md, const sampler *s,
                        int ddpm, const queue_spec *out, api_error *e) {
  const json_t *ed = f->edit;
  static const char *const ddim_keys[] = {
      "type", "source_class", "source_guidance", "shift", "noise", "noise_from", NULL};
  static const char *const ddpm_keys[] = {
      "type",       "source_class", "source_guidance", "shift",       "noise",
      "noise_from", "skip",         "colour",          "colour_from", NULL};
  int rc = api_check_keys(ed, "edit.", ddpm ? ddpm_keys : ddim_keys, e);
  if (rc)
    return rc;
  const char *cls = sampler_solver_class(out->solver);
  if (!cls || strcmp(cls, "DDIMScheduler") != 0)
    return api_fail(e, 400, "invalid_field", f->solver_field,
                    "%s: inversions run on DDIM's grid (scheduler ddim), not '%s'", f->solver_field,
                    out->solver);
  const int has_noise = json_object_get(ed, "noise") || json_object_get(ed, "noise_from");
  if (json_object_get(ed, "noise") && json_object_get(ed, "noise_from"))
    return api_fail(e, 400, "invalid_field", "edit.noise_from",
                    "edit.noise_from: give either edit.noise or edit.noise_from");
  if (!!f->input_image == has_noise)
    return api_fail(e, 400, f->input_image ? "invalid_field" : "missing_field", "input_image",
                    "input_image: an inversion takes either input_image (to invert) or "
                    "edit.noise / edit.noise_from (noise of an earlier inversion)");
  if (f->mask)
    return api_fail(e, 400, "invalid_field", "mask", "mask: goes with edit.type inpaint");
  const int n = sampler_num_steps(s), nmaps = ddpm ? n + 1 : 1;
  const double bytes = 4.0 * out->batch * nmaps * md->in_channels * out->height * out->width;
  if (bytes > API_MAX_NOISE_BYTES)
    return api_fail(e, 400, "out_of_range", "scheduler.steps",
                    "scheduler.steps: the noise maps of %d steps x %d images would take %.0f MB, "
                    "above this server's limit of %d MB",
                    n, out->batch, bytes / 1e6, API_MAX_NOISE_BYTES >> 20);
  return 0;
}

/* source_class and source_guidance (what the inversion ran with; an earlier inversion's by
 * default) into args. */
static int invert_source(const json_t *ed, const queue_model_desc *md, const noise_source *src,
                         json_t *args, api_error *e) {
  const json_t *sc = json_object_get(ed, "source_class");
  if (sc && md->num_classes <= 0)
    return api_fail(e, 400, "invalid_field", "edit.source_class",
                    "edit.source_class: model '%s' is not class-conditional", md->name);
  int64_t label = src->label;
  int rc, present;
  if (sc && (rc = api_parse_label(sc, md, "edit.source_class", &label, e)))
    return rc;
  if (sc || src->has_label)
    json_object_set_new(args, "source_class", json_integer(label));
  double g = src->guidance, lo = 0, hi = API_MAX_SOURCE_GUIDANCE;
  if ((rc = api_get_number(ed, "source_guidance", "edit.source_guidance", lo, hi, &g, &present, e)))
    return rc;
  if (present && md->num_classes <= 0)
    return api_fail(e, 400, "invalid_field", "edit.source_guidance",
                    "edit.source_guidance: model '%s' is not class-conditional", md->name);
  if (present || src->has_guidance)
    json_object_set_new(args, "source_guidance", json_real(g));
  return 0;
}

/* The noise-space edits (skip, shift, colour, colour_from) into args; n is the grid's steps. */
static int invert_edits(const json_t *ed, const queue_model_desc *md, const queue_spec *out, int n,
                        json_t *args, api_error *e) {
  long long skip = 0, from = 0;
  int rc, present;
  if ((rc = api_get_int(ed, "skip", "edit.skip", 0, n - 1, &skip, &present, e)))
    return rc;
  if (present)
    json_object_set_new(args, "skip", json_integer(skip));
  json_t *shift = NULL, *colour = NULL;
  const double size = out->height > out->width ? out->height : out->width;
  if ((rc = get_list(ed, "shift", "edit.shift", 2, -size, size, 1, &shift, e)))
    return rc;
  if (shift)
    json_object_set_new(args, "shift", shift);
  if ((rc = get_list(ed, "colour", "edit.colour", 3, -2, 2, 0, &colour, e)))
    return rc;
  if (colour) {
    if (md->in_channels != 1 && md->in_channels != 3) {
      json_decref(colour);
      return api_fail(e, 400, "invalid_field", "edit.colour",
                      "edit.colour: needs a 1- or 3-channel model, not %d", md->in_channels);
    }
    json_object_set_new(args, "colour", colour);
  }
  if ((rc = api_get_int(ed, "colour_from", "edit.colour_from", 0, n - 1, &from, &present, e)))
    return rc;
  if (present && !colour)
    return api_fail(e, 400, "invalid_field", "edit.colour_from",
                    "edit.colour_from: goes with edit.colour");
  if (present)
    json_object_set_new(args, "colour_from", json_integer(from));
  return 0;
}

/* invert_ddim / invert_ddpm: the image (input_image) or earlier noise (noise, noise_from), the
 * classes and guidance the inversion ran with, and the noise-space edits. */
static int parse_invert(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                        const sampler *s, const char *owner, int kind, queue_spec *out,
                        api_error *e) {
  const json_t *ed = f->edit;
  const int ddpm = kind == QUEUE_EDIT_INVERT_DDPM;
  int rc = invert_check(f, md, s, ddpm, out, e);
  if (rc)
    return rc;
  json_t *args = json_object();
  if (!args)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  noise_source src = {0};
  const int n = sampler_num_steps(s), nmaps = ddpm ? n + 1 : 1;
  const int64_t shape[5] = {out->batch, nmaps, md->in_channels, out->height, out->width};
  const int64_t shape4[4] = {out->batch, md->in_channels, out->height, out->width};
  const int has_noise = json_object_get(ed, "noise") || json_object_get(ed, "noise_from");
  if ((has_noise && (rc = get_noise(c, ed, owner, kind, ddpm ? shape : shape4, ddpm ? 5 : 4, args,
                                    &src, out, e))) ||
      (rc = invert_source(ed, md, &src, args, e)) || (rc = invert_edits(ed, md, out, n, args, e)) ||
      (rc = check_pictures(f, md, out, e)))
    goto done;
  out->edit = kind;
  out->strength = 1.0;
  out->edit_args = args;
  args = NULL;
done:
  json_decref(args);
  return rc;
}

/* boundary: a boundary file's object, the signed distance to move to (strength), the eta of
 * the steps after the move, the space to move in (x, h, both); an input image is DDIM-inverted
 * to the mixing step, without one the job's seed generates the images. */
static int parse_boundary(const api_job_fields *f, const queue_model_desc *md, queue_spec *out,
                          api_error *e) {
  static const char *const keys[] = {"type", "boundary", "strength", "eta", "space", NULL};
  const json_t *ed = f->edit;
  int rc = api_check_keys(ed, "edit.", keys, e), present;
  if (rc)
    return rc;
  if (f->solver || f->has_steps || f->options)
    return api_fail(e, 400, "invalid_field", "scheduler",
                    "scheduler: a boundary edit runs on the DDIM grid its boundary was fitted "
                    "on; drop the scheduler block");
  if (f->mask)
    return api_fail(e, 400, "invalid_field", "mask", "mask: goes with edit.type inpaint");
  if (out->height != md->sample_size || out->width != md->sample_size)
    return api_fail(e, 400, "invalid_field", "height",
                    "height: boundary edits run at the model's size %dx%d", md->sample_size,
                    md->sample_size);
  const json_t *bj = json_object_get(ed, "boundary");
  if (!bj)
    return api_fail(e, 400, "missing_field", "edit.boundary",
                    "edit.boundary: give the boundary ('denoised boundary fit' writes it)");
  boundary bd = {0};
  err qe = {0};
  if (boundary_from_json(bj, &bd, &qe) != ERR_OK)
    return api_fail(e, 400, "invalid_field", "edit.boundary", "edit.boundary: %s", qe.msg);
  const int dim = bd.dim,
            steps = bd.solver ? (int)json_integer_value(json_object_get(bd.solver, "steps")) : 0;
  const json_t *sv = json_object_get(ed, "space");
  edit_space space; /* absent: the boundary's default */
  int bad_space = sv && !json_is_string(sv);
  if (!bad_space && edit_space_parse(sv ? json_string_value(sv) : NULL, &bd, &space) != 0)
    bad_space = 1;
  const int has_mid = bd.mid != NULL;
  boundary_free(&bd);
  if (bad_space)
    return api_fail(e, 400, "invalid_field", "edit.space",
                    "edit.space: must be \"x\", \"h\" or \"both\"");
  if ((space & EDIT_SPACE_H) && !has_mid)
    return api_fail(e, 400, "invalid_field", "edit.space",
                    "edit.space: the boundary has no h-space part (\"mid\"); use \"x\"");
  if (!steps)
    return api_fail(e, 400, "invalid_field", "edit.boundary",
                    "edit.boundary: has no solver (the grid it was fitted on)");
  if (dim != md->in_channels * md->sample_size * md->sample_size)
    return api_fail(e, 400, "invalid_field", "edit.boundary",
                    "edit.boundary: a boundary for latents of %d values; model '%s' has %d", dim,
                    md->name, md->in_channels * md->sample_size * md->sample_size);
  double strength = 0, eta = 1;
  if ((rc = api_get_number(ed, "strength", "edit.strength", -1000, 1000, &strength, &present, e)))
    return rc;
  if (!present)
    return api_fail(e, 400, "missing_field", "edit.strength",
                    "edit.strength: give the signed distance to move to, in units of the "
                    "spread of the boundary's training latents (+: the positive side)");
  if ((rc = api_get_number(ed, "eta", "edit.eta", 0, 1, &eta, &present, e)))
    return rc;
  if ((rc = check_pictures(f, md, out, e)))
    return rc;
  out->edit_args =
      json_pack("{s:O, s:f, s:s}", "boundary", bj, "eta", eta, "space", edit_space_name(space));
  if (!out->edit_args)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  out->edit = QUEUE_EDIT_BOUNDARY;
  out->strength = strength;
  out->steps = steps;
  return 0;
}

/* A concept from a metric: target checked against the model's classifier, a free embedding
 * name, the optimiser's settings; class_label, if given, is the start row (else the mean). */
static int parse_concept(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                         queue_spec *out, api_error *e) {
  static const char *const keys[] = {"type", "target", "name",    "steps", "batch",
                                     "lr",   "margin", "replace", NULL};
  const json_t *ed = f->edit;
  int rc = api_check_keys(ed, "edit.", keys, e), present;
  if (rc)
    return rc;
  if (md->num_classes <= 0 || md->kind != MODEL_UNET2D)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: a concept is a class-embedding row, and model '%s' has no class "
                    "embeddings (a class-conditional UNet2DModel is needed)",
                    md->name);
  if (f->input_image || f->mask)
    return api_fail(e, 400, "invalid_field", f->input_image ? "input_image" : "mask",
                    "%s: a concept job takes no picture", f->input_image ? "input_image" : "mask");
  const json_t *tv = json_object_get(ed, "target"), *nv = json_object_get(ed, "name");
  if (!json_is_string(tv) || !json_is_string(nv))
    return api_fail(e, 400, "missing_field", tv && json_is_string(tv) ? "edit.name" : "edit.target",
                    "edit.target and edit.name: give the classifier's verdict (K, italic, "
                    "fg=red, ...) and the embedding's name");
  char target[512];
  err qe = {0};
  rc = queue_model_targets(c->q, md->name, json_string_value(tv), target, sizeof target, &qe);
  if (rc)
    return api_fail(e, 400, "invalid_field", "edit.target", "edit.target: %s", qe.msg);
  const char *name = json_string_value(nv);
  if (!model_embedding_name_ok(name))
    return api_fail(e, 400, "invalid_field", "edit.name",
                    "edit.name: use 1 to 64 letters, digits, '_', '-' or '.' (not only digits, not "
                    "starting with '.')");
  const json_t *rv = json_object_get(ed, "replace");
  if (rv && !json_is_boolean(rv))
    return api_fail(e, 400, "wrong_type", "edit.replace", "edit.replace: expected true or false");
  const int first_emb = md->num_classes - md->num_embeddings;
  size_t i;
  json_t *l;
  json_array_foreach(md->class_labels, i, l) {
    if (!json_is_string(l) || strcasecmp(json_string_value(l), name) != 0)
      continue;
    if ((int)i < first_emb || !json_is_true(rv))
      return api_fail(e, 409, "conflict", "edit.name",
                      "edit.name: model '%s' already has a %s named '%s'%s", md->name,
                      (int)i < first_emb ? "class" : "concept", name,
                      (int)i < first_emb ? "" : " (\"replace\": true replaces it)");
  }
  long long steps = 120, batch = 8;
  double lr = 0.15, margin = 2;
  if ((rc = api_get_int(ed, "steps", "edit.steps", 1, 2000, &steps, &present, e)) ||
      (rc = api_get_int(ed, "batch", "edit.batch", 1, 16, &batch, &present, e)) ||
      (rc = api_get_number(ed, "lr", "edit.lr", 1e-6, 10, &lr, &present, e)) ||
      (rc = api_get_number(ed, "margin", "edit.margin", 0, 100, &margin, &present, e)))
    return rc;
  out->edit_args = json_pack("{s:s, s:s, s:I, s:I, s:f, s:f, s:I}", "target", target, "name", name,
                             "steps", steps, "batch", batch, "lr", lr, "margin", margin, "init",
                             (json_int_t)(out->has_label ? out->label : -1));
  if (!out->edit_args)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  out->edit = QUEUE_EDIT_CONCEPT;
  return 0;
}

/* A security audit of the job's class: box sizes, ascent steps, random draws, the verdict
 * (default: the class's name in the head "char"). */
static int parse_audit(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                       queue_spec *out, api_error *e) {
  static const char *const keys[] = {"type", "eps", "iters", "random", "target", NULL};
  const json_t *ed = f->edit;
  int rc = api_check_keys(ed, "edit.", keys, e), present;
  if (rc)
    return rc;
  if (md->num_classes <= 0 || md->kind != MODEL_UNET2D || !out->has_label)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: an audit generates one class of a class-conditional UNet2DModel; "
                    "model '%s' has no class embeddings",
                    md->name);
  if (f->input_image || f->mask)
    return api_fail(e, 400, "invalid_field", f->input_image ? "input_image" : "mask",
                    "%s: an audit takes no picture", f->input_image ? "input_image" : "mask");
  if (out->batch > ADJTASK_MAX_BATCH || out->height != md->sample_size ||
      out->width != md->sample_size)
    return api_fail(e, 400, "invalid_field", "batch_size",
                    "batch_size: an audit takes at most %d images of the model's size",
                    ADJTASK_MAX_BATCH);
  json_t *eps = NULL;
  const json_t *ev = json_object_get(ed, "eps");
  const int neps = json_is_array(ev) ? (int)json_array_size(ev) : 2;
  if (neps < 1 || neps > ADJTASK_MAX_EPS)
    return api_fail(e, 400, "invalid_field", "edit.eps", "edit.eps: 1 to %d box sizes",
                    ADJTASK_MAX_EPS);
  if ((rc = get_list(ed, "eps", "edit.eps", neps, 1e-6, 2, 0, &eps, e)))
    return rc;
  long long iters = 10, random = 4;
  if ((rc = api_get_int(ed, "iters", "edit.iters", 1, 200, &iters, &present, e)) ||
      (rc = api_get_int(ed, "random", "edit.random", 1, 64, &random, &present, e))) {
    json_decref(eps);
    return rc;
  }
  const json_t *tv = json_object_get(ed, "target");
  const char *name = json_string_value(json_array_get(md->class_labels, (size_t)out->label));
  char want[160], target[512];
  snprintf(want, sizeof want, "%s", json_is_string(tv) ? json_string_value(tv) : name ? name : "");
  err qe = {0};
  if ((tv && !json_is_string(tv)) ||
      queue_model_targets(c->q, md->name, want, target, sizeof target, &qe) != ERR_OK ||
      strchr(target, ',')) {
    json_decref(eps);
    return api_fail(e, 400, "invalid_field", "edit.target",
                    "edit.target: %s (one verdict, HEAD=LABEL or LABEL; default: the class's "
                    "name)",
                    qe.msg[0] ? qe.msg : "expected a string");
  }
  out->edit_args =
      json_pack("{s:s, s:o, s:I, s:I}", "target", target, "eps",
                eps ? eps : json_pack("[f, f]", 0.05, 0.1), "iters", iters, "random", random);
  if (!out->edit_args)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  out->edit = QUEUE_EDIT_AUDIT;
  return 0;
}

/* Stylization: the style verdict and the head that keeps the class, checked against the
 * model's classifier; a new model name; the optimiser's settings. */
static int parse_stylize(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                         queue_spec *out, api_error *e) {
  static const char *const keys[] = {"type",  "target", "keep", "keep_weight", "name",
                                     "steps", "batch",  "lr",   "margin",      NULL};
  const json_t *ed = f->edit;
  int rc = api_check_keys(ed, "edit.", keys, e), present;
  if (rc)
    return rc;
  if (md->num_classes <= 0 || md->kind != MODEL_UNET2D || !md->classifier)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: stylize fine-tunes a class-conditional UNet2DModel with a "
                    "classifier; model '%s' has no class embeddings or no classifier",
                    md->name);
  if (f->input_image || f->mask)
    return api_fail(e, 400, "invalid_field", f->input_image ? "input_image" : "mask",
                    "%s: a stylize job takes no picture", f->input_image ? "input_image" : "mask");
  const json_t *tv = json_object_get(ed, "target"), *nv = json_object_get(ed, "name");
  const json_t *kv = json_object_get(ed, "keep");
  if (!json_is_string(tv) || !json_is_string(nv) || (kv && !json_is_string(kv)))
    return api_fail(e, 400, "missing_field", json_is_string(tv) ? "edit.name" : "edit.target",
                    "edit.target and edit.name: give the style (italic, bold, fg=red, ...) and "
                    "the new model's name (edit.keep: a head name)");
  char target[512], keep[80];
  err qe = {0};
  if (queue_model_targets(c->q, md->name, json_string_value(tv), target, sizeof target, &qe))
    return api_fail(e, 400, "invalid_field", "edit.target", "edit.target: %s", qe.msg);
  snprintf(keep, sizeof keep, "%s", kv ? json_string_value(kv) : "char");
  int known = 0;
  size_t i;
  json_t *h;
  json_array_foreach(json_object_get(md->classifier, "heads"), i, h) known |=
      strcmp(json_string_value(json_object_get(h, "name")), keep) == 0;
  if (!known)
    return api_fail(e, 400, "invalid_field", "edit.keep",
                    "edit.keep: the classifier has no head '%s'", keep);
  const size_t kl = strlen(keep);
  for (const char *p = target; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
    if (strncmp(p, keep, kl) == 0 && p[kl] == '=')
      return api_fail(e, 400, "invalid_field", "edit.target",
                      "edit.target: the style cannot be a verdict of the head '%s' that keeps "
                      "the class",
                      keep);
  const char *name = json_string_value(nv);
  if ((rc = api_new_model_name(c, name, "edit.name", e)))
    return rc;
  long long steps = 40, batch = 8;
  double lr = 2e-4, margin = 2, kw = 1;
  if ((rc = api_get_int(ed, "steps", "edit.steps", 1, 2000, &steps, &present, e)) ||
      (rc = api_get_int(ed, "batch", "edit.batch", 1, 16, &batch, &present, e)) ||
      (rc = api_get_number(ed, "lr", "edit.lr", 1e-9, 1, &lr, &present, e)) ||
      (rc = api_get_number(ed, "margin", "edit.margin", 0, 100, &margin, &present, e)) ||
      (rc = api_get_number(ed, "keep_weight", "edit.keep_weight", 0, 100, &kw, &present, e)))
    return rc;
  out->edit_args = json_pack("{s:s, s:s, s:f, s:s, s:I, s:I, s:f, s:f}", "target", target, "keep",
                             keep, "keep_weight", kw, "name", name, "steps", steps, "batch", batch,
                             "lr", lr, "margin", margin);
  if (!out->edit_args)
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  out->edit = QUEUE_EDIT_STYLIZE;
  return 0;
}

int api_new_model_name(const api_ctx *c, const char *name, const char *field, api_error *e) {
  queue_model_desc other;
  if (!sampler_data_name_ok(name) || strlen(name) >= QUEUE_NAME_SIZE)
    return api_fail(e, 400, "invalid_field", field,
                    "%s: 1 to %d characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
                    field, QUEUE_NAME_SIZE - 1);
  if (queue_model_get(c->q, -1, name, &other) == ERR_OK) {
    queue_model_desc_clear(&other);
    return api_fail(e, 409, "conflict", field, "%s: a model named '%s' is served", field, name);
  }
  return 0;
}

/* img2img / inpaint: strength in (0, 1] and the picture (and mask). */
static int parse_sdedit(const api_job_fields *f, const queue_model_desc *md, const sampler *s,
                        int kind, queue_spec *out, api_error *e) {
  static const char *const keys[] = {"type", "strength", NULL};
  int rc = api_check_keys(f->edit, "edit.", keys, e), present;
  if (rc)
    return rc;
  double strength = kind == QUEUE_EDIT_INPAINT ? 1.0 : 0.8; /* diffusers' pipeline defaults */
  if ((rc = api_get_number(f->edit, "strength", "edit.strength", -INFINITY, INFINITY, &strength,
                           &present, e)))
    return rc;
  if (!(strength > 0 && strength <= 1))
    return api_fail(e, 400, "out_of_range", "edit.strength",
                    "edit.strength: %g is out of range (0, 1]", strength);
  const char *tn = queue_edit_name(kind);
  if (!f->input_image)
    return api_fail(e, 400, "missing_field", "input_image",
                    "input_image: %s needs the picture (base64 PNG of the job's size)", tn);
  if (kind == QUEUE_EDIT_INPAINT && !f->mask)
    return api_fail(e, 400, "missing_field", "mask",
                    "mask: inpainting needs a mask (base64 PNG: white is generated, black kept)");
  if (kind != QUEUE_EDIT_INPAINT && f->mask)
    return api_fail(e, 400, "invalid_field", "mask", "mask: goes with edit.type inpaint");
  err qe = {0};
  if (sampler_check_img2img(s, strength, &qe) != ERR_OK) {
    const char *field = strstr(qe.msg, "strength") ? "edit.strength" : "scheduler.name";
    return api_fail(e, 400, "invalid_field", field, "%s: %s", field, qe.msg);
  }
  if ((rc = check_pictures(f, md, out, e)))
    return rc;
  out->edit = kind;
  out->strength = strength;
  return 0;
}

/* deblur: the blurry picture restored by a deblurring model (an image-conditioned DPM sampled
 * with any solver, or a regression model's one evaluation); nothing else to set. */
static int parse_deblur(const api_job_fields *f, const queue_model_desc *md, queue_spec *out,
                        api_error *e) {
  static const char *const keys[] = {"type", NULL};
  int rc = api_check_keys(f->edit, "edit.", keys, e);
  if (rc)
    return rc;
  if (!md->cond_channels && !md->regression)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: model '%s' cannot deblur (it is neither image-conditioned nor a "
                    "regression model); name a deblurring model",
                    md->name);
  if (!f->input_image)
    return api_fail(e, 400, "missing_field", "input_image",
                    "input_image: deblur needs the blurry picture (base64 PNG of the job's size)");
  if (f->mask)
    return api_fail(e, 400, "invalid_field", "mask", "mask: goes with edit.type inpaint");
  if (out->has_label || out->has_guidance || out->has_classifier)
    return api_fail(e, 400, "invalid_field", out->has_label ? "class_label" : "guidance",
                    "%s: deblurring takes no class or guidance",
                    out->has_label ? "class_label" : "guidance");
  out->edit = QUEUE_EDIT_DEBLUR; /* before the picture: it sets the channels decoded */
  return check_pictures(f, md, out, e);
}

int api_parse_edit(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                   const sampler *s, const char *owner, queue_spec *out, api_error *e) {
  const int deblurring = md->cond_channels || md->regression;
  const json_t *ty = f->edit ? json_object_get(f->edit, "type") : NULL;
  if (deblurring && !(json_is_string(ty) && strcmp(json_string_value(ty), "deblur") == 0))
    return api_fail(e, 400, f->edit ? "invalid_field" : "missing_field",
                    f->edit ? "edit.type" : "edit",
                    "%s: model '%s' is a deblurring model: it only restores pictures (edit "
                    "{\"type\": \"deblur\"} with input_image)",
                    f->edit ? "edit.type" : "edit", md->name);
  if (!f->edit) {
    if (f->input_image || f->mask)
      return api_fail(e, 400, "missing_field", "edit",
                      "edit: %s needs an edit block ({\"type\": \"img2img\"} or \"inpaint\")",
                      f->input_image ? "input_image" : "mask");
    return 0;
  }
  if (!json_is_object(f->edit))
    return api_fail(e, 400, "wrong_type", "edit", "edit: expected an object {type, ...}, got %s",
                    sched_json_kind(f->edit));
  if (!ty)
    return api_fail(e, 400, "missing_field", "edit.type",
                    "edit.type: give the kind of edit (img2img, inpaint, invert_ddim, "
                    "invert_ddpm, boundary, deblur, concept, audit, stylize or finetune)");
  if (!json_is_string(ty))
    return api_fail(e, 400, "wrong_type", "edit.type", "edit.type: expected a string, got %s",
                    sched_json_kind(ty));
  const int kind = queue_edit_from_name(json_string_value(ty));
  if (kind < 0)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: '%.40s' is not an edit (img2img, inpaint, invert_ddim, "
                    "invert_ddpm, boundary, deblur, concept, audit, stylize or finetune)",
                    json_string_value(ty));
  if (out->preview_every)
    return api_fail(e, 400, "invalid_field", "preview",
                    "preview: previews are not available for edit jobs");
  switch (kind) {
  case QUEUE_EDIT_IMG2IMG:
  case QUEUE_EDIT_INPAINT: return parse_sdedit(f, md, s, kind, out, e);
  case QUEUE_EDIT_BOUNDARY: return parse_boundary(f, md, out, e);
  case QUEUE_EDIT_DEBLUR: return parse_deblur(f, md, out, e);
  case QUEUE_EDIT_CONCEPT: return parse_concept(c, f, md, out, e);
  case QUEUE_EDIT_AUDIT: return parse_audit(c, f, md, out, e);
  case QUEUE_EDIT_STYLIZE: return parse_stylize(c, f, md, out, e);
  case QUEUE_EDIT_FINETUNE: return api_parse_finetune(c, f, md, out, e);
  default: return parse_invert(c, f, md, s, owner, kind, out, e);
  }
}
