/* The daemon's inversion and boundary jobs: the engine's edit paths (invert.h, edit.h) driven
 * from a validated job spec. Kept apart from the queue's bookkeeping; the worker hands in the
 * decoded input image and gets images, the final solver and the noise to store. */
#include "edit_job.h"

#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "boundary.h"
#include "edit.h"
#include "invert.h"
#include "npy.h"

static int arg_int(const json_t *a, const char *key, int dflt) {
  const json_t *v = json_object_get(a, key);
  return json_is_integer(v) ? (int)json_integer_value(v) : dflt;
}

/* Noise maps sent with the job (base64 .npy), checked against the shape they must have. */
static int decode_noise(const char *b64, const int64_t *shape, int ndim, float **out, err *e) {
  uint8_t *raw = NULL;
  size_t len = 0;
  if (base64_decode(b64, strlen(b64), &raw, &len) != 0)
    return err_set(e, ERR_FORMAT, "edit.noise: not base64");
  npy_array a = {0};
  int rc = npy_parse_f32_shaped(raw, len, "edit.noise", shape, ndim, &a, e);
  free(raw);
  if (rc == ERR_SHAPE)
    rc = ERR_INVALID;
  *out = a.data;
  return rc;
}

/* The grid of an inversion: DDIM with the job's steps and options, never clipping (a clipped
 * step cannot be run backwards); edit-friendly maps add eta 1 and end at alpha_bar[0]. */
static int inversion_sampler(const json_t *sched, const queue_spec *sp, int ddpm, sampler **out,
                             err *e) {
  if (ddpm)
    return invert_ddpm_sampler(sched, sp->options, sp->steps, out, e);
  json_t *opt = sp->options ? json_deep_copy(sp->options) : json_object();
  json_t *spec = json_pack("{s:s, s:i, s:o}", "name", "ddim", "steps", sp->steps, "options", opt);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  json_object_set_new(opt, "clip_sample", json_false());
  json_object_set_new(opt, "thresholding", json_false());
  int rc = sampler_new_from_json(spec, sched, out, e);
  json_decref(spec);
  return rc;
}

static int run_inversion(const edit_job *j, sampler **s_out, float *x, uint8_t **noise,
                         size_t *noise_len, int *nfe, err *e) {
  const queue_spec *sp = j->spec;
  const json_t *a = sp->edit_args;
  const model_info *mi = model_get_info(j->m);
  const int ddpm = sp->edit == QUEUE_EDIT_INVERT_DDPM, batch = sp->batch;
  const size_t d = (size_t)mi->in_channels * sp->height * sp->width;
  sampler *s = NULL;
  int rc = inversion_sampler(j->sched, sp, ddpm, &s, e);
  if (rc)
    return rc;
  *s_out = s;
  const int n = sampler_num_steps(s), nmaps = ddpm ? n + 1 : 1;
  const int64_t shape[5] = {batch, nmaps, mi->in_channels, sp->height, sp->width};
  const int64_t shape4[4] = {batch, mi->in_channels, sp->height, sp->width};
  int64_t *src = NULL;
  if (j->labels) {
    src = malloc(sizeof *src * (size_t)batch);
    if (!src)
      return err_set(e, ERR_NOMEM, "out of memory");
    for (int b = 0; b < batch; b++)
      src[b] = arg_int(a, "source_class", (int)j->labels[b]);
  }
  const json_t *sg = json_object_get(a, "source_guidance");
  guidance gs = guidance_for(j->m, json_is_number(sg) ? json_number_value(sg) : 1.0);
  gs.null_label = j->guidance ? j->guidance->null_label : gs.null_label;
  invert_opts io = {.batch = batch,
                    .height = sp->height,
                    .width = sp->width,
                    .labels = src,
                    .guidance = json_is_number(sg) ? &gs : NULL,
                    .seed = sp->seed,
                    .first_image = sp->first_image,
                    .progress = j->progress,
                    .progress_user = j->progress_user,
                    .cancel = j->cancel,
                    .threads = j->threads};
  float *maps = NULL;
  const json_t *nz = json_object_get(a, "noise");
  *nfe = 0;
  if (json_is_string(nz)) {
    rc = decode_noise(json_string_value(nz), ddpm ? shape : shape4, ddpm ? 5 : 4, &maps, e);
    j->phase->total = n;
  } else {
    maps = malloc(sizeof *maps * d * (size_t)batch * (size_t)nmaps);
    rc = maps ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for the noise maps");
    j->phase->total = 2 * n;
    if (!rc)
      rc = ddpm ? invert_ddpm(s, j->m, &io, j->image, maps, nfe, e)
                : invert_ddim(s, j->m, &io, j->image, 0, maps, nfe, e);
    if (!rc)
      rc = ddpm ? npy_encode_f32(maps, 5, shape, noise, noise_len, e)
                : npy_encode_f32(maps, 4, shape4, noise, noise_len, e);
    j->phase->base = n;
    j->phase->nfe = *nfe;
  }
  if (!rc) {
    const json_t *sh = json_object_get(a, "shift"), *co = json_object_get(a, "colour");
    invert_edit ed = {.ddpm = ddpm,
                      .dx = (int)json_integer_value(json_array_get(sh, 0)),
                      .dy = (int)json_integer_value(json_array_get(sh, 1)),
                      .has_colour = json_is_array(co),
                      .colour_from = arg_int(a, "colour_from", -1)};
    for (int c = 0; c < 3 && ed.has_colour; c++)
      ed.colour[c] = (float)json_number_value(json_array_get(co, c));
    invert_sample_opts so = {
        .skip = arg_int(a, "skip", 0), .src_labels = src, .src_guidance = io.guidance};
    io.labels = j->labels;
    io.guidance = j->guidance;
    int part = 0;
    rc = invert_edit_sample(s, j->m, &io, &so, &ed, maps, x, &part, e);
    *nfe += part;
  }
  free(maps);
  free(src);
  return rc;
}

static int run_boundary(const edit_job *j, sampler **s_out, float *x, int *nfe, err *e) {
  const queue_spec *sp = j->spec;
  boundary bd = {0};
  sampler *grid = NULL;
  const json_t *eta = json_object_get(sp->edit_args, "eta");
  int rc = boundary_from_json(json_object_get(sp->edit_args, "boundary"), &bd, e);
  if (!rc)
    rc = edit_grid_sampler(bd.solver, j->sched, 0.0, &grid, e);
  if (!rc)
    rc = edit_grid_sampler(bd.solver, j->sched, json_is_number(eta) ? json_number_value(eta) : 1.0,
                           s_out, e);
  if (!rc) {
    edit_src src = {.batch = sp->batch,
                    .image = j->image,
                    .seed = sp->seed,
                    .first_image = sp->first_image,
                    .labels = j->labels,
                    .guidance = j->guidance,
                    .progress = j->progress,
                    .progress_user = j->progress_user,
                    .cancel = j->cancel,
                    .threads = j->threads};
    edit_space space;
    const json_t *sv = json_object_get(sp->edit_args, "space");
    if (edit_space_parse(json_is_string(sv) ? json_string_value(sv) : NULL, &bd, &space))
      rc = err_set(e, ERR_INVALID, "edit.space: must be x, h or both");
    else
      rc = edit_boundary(grid, *s_out, j->m, &bd, &src, sp->strength, space, x, NULL, nfe, e);
  }
  sampler_free(grid);
  boundary_free(&bd);
  return rc;
}

int edit_job_run(const edit_job *j, sampler **s, float *x, uint8_t **noise, size_t *noise_len,
                 int *nfe, err *e) {
  *s = NULL;
  *noise = NULL;
  *noise_len = 0;
  int dummy = 0;
  nfe = nfe ? nfe : &dummy;
  if (!json_is_object(j->spec->edit_args))
    return err_set(e, ERR_FORMAT, "the job's edit arguments are missing");
  if (j->spec->edit == QUEUE_EDIT_BOUNDARY)
    return run_boundary(j, s, x, nfe, e);
  if (!j->image && !json_is_string(json_object_get(j->spec->edit_args, "noise")))
    return err_set(e, ERR_FORMAT, "an inversion needs input_image or edit.noise");
  return run_inversion(j, s, x, noise, noise_len, nfe, e);
}
