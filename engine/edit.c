/* BoundaryDiffusion's mixing trajectory (boundarydiffusion.py, edit_image_boundary and
 * unconditional, re-derived): latent at t_m by DDIM (eta 0) inversion or sampling, one move
 * along the boundary normal, the remaining steps with the release's eta = 1 by default. Only the
 * x_t ("z") space is edited: the bottleneck ("h") edit of the release needs a UNet hook the
 * engine does not have. */
#include "edit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "invert.h"
#include "rng.h"

int edit_grid_sampler(const json_t *solver, const json_t *model_config, double eta, sampler **out,
                      err *e) {
  if (!json_is_object(solver))
    return err_set(e, ERR_INVALID, "boundary: no solver grid recorded");
  const json_t *name = json_object_get(solver, "name");
  if (!json_is_string(name) || strcmp(json_string_value(name), "ddim") != 0)
    return err_set(e, ERR_INVALID, "boundary: its grid must be 'ddim'");
  if (!isfinite(eta) || eta < 0 || eta > 1)
    return err_set(e, ERR_INVALID, "eta %g must be in [0, 1]", eta);
  /* no clipping: the release's denoising_step has none, and DDIM inversion cannot undo it */
  json_t *spec = json_pack("{s:s, s:O, s:{s:f, s:b, s:b}}", "name", "ddim", "steps",
                           json_object_get(solver, "steps"), "options", "eta", eta, "clip_sample",
                           0, "thresholding", 0);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  const json_t *cfg = json_object_get(solver, "config");
  if (cfg && !json_is_null(cfg)) {
    /* the recorded config is resolved: drop what the options set */
    json_t *c = json_deep_copy(cfg);
    json_object_del(c, "eta");
    json_object_del(c, "clip_sample");
    json_object_del(c, "thresholding");
    json_object_set_new(spec, "config", c);
  }
  int rc = sampler_new_from_json(spec, model_config, out, e);
  json_decref(spec);
  return rc;
}

int edit_latent_at(const sampler *s, const model *m, int step, const edit_src *src, float *out,
                   int *nfe, err *e) {
  const int n = sampler_num_steps(s);
  if (step < 0 || step >= n)
    return err_set(e, ERR_INVALID, "mixing step %d outside the grid's %d steps", step, n);
  if (src->image) {
    invert_opts io = {.batch = src->batch,
                      .labels = src->labels,
                      .guidance = src->guidance,
                      .progress = src->progress,
                      .progress_user = src->progress_user,
                      .cancel = src->cancel,
                      .threads = src->threads};
    return invert_ddim(s, m, &io, src->image, step, out, nfe, e);
  }
  if (nfe)
    *nfe = 0;
  if (step == 0) { /* x_T itself */
    const size_t d = (size_t)model_get_info(m)->in_channels * model_get_info(m)->sample_size *
                     model_get_info(m)->sample_size;
    for (int b = 0; b < src->batch; b++) {
      if (src->init_noise)
        memcpy(out + (size_t)b * d, src->init_noise + (size_t)b * d, d * sizeof *out);
      else
        rng_normal(src->seed, src->first_image + (uint64_t)b, 0, out + (size_t)b * d, d);
    }
    return ERR_OK;
  }
  sampler_run_opts r = {.batch = src->batch,
                        .seed = src->seed,
                        .first_image = src->first_image,
                        .init_noise = src->init_noise,
                        .labels = src->labels,
                        .guidance = src->guidance,
                        .progress = src->progress,
                        .progress_user = src->progress_user,
                        .cancel = src->cancel,
                        .threads = src->threads,
                        .end_step = step};
  return sampler_run(s, m, &r, out, nfe, e);
}

int edit_boundary(const sampler *grid, const sampler *rest, const model *m, const boundary *b,
                  const edit_src *src, double strength, float *out, float *latent, int *nfe,
                  err *e) {
  int dummy = 0, part = 0;
  nfe = nfe ? nfe : &dummy;
  *nfe = 0;
  const model_info *mi = model_get_info(m);
  const size_t d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size;
  if ((size_t)b->dim != d)
    return err_set(e, ERR_INVALID, "boundary has %d values per latent, the model %zu", b->dim, d);
  if (!isfinite(strength) || fabs(strength) > 1000)
    return err_set(e, ERR_INVALID, "strength %g must be a finite number in [-1000, 1000]",
                   strength);
  if (sampler_num_steps(rest) != sampler_num_steps(grid))
    return err_set(e, ERR_INVALID, "the edit's solver has %d steps, the boundary's grid %d",
                   sampler_num_steps(rest), sampler_num_steps(grid));
  if (src->batch < 1)
    return err_set(e, ERR_INVALID, "batch %d must be positive", src->batch);
  const size_t nd = (size_t)src->batch * d;
  float *x = malloc(nd * sizeof *x);
  if (!x)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = edit_latent_at(grid, m, b->step, src, x, &part, e);
  *nfe += part;
  if (rc == ERR_OK) {
    if (latent)
      memcpy(latent, x, nd * sizeof *x);
    boundary_move(b, x, src->batch, strength * b->scale);
    sampler_run_opts r = {.batch = src->batch,
                          .seed = src->seed,
                          .first_image = src->first_image,
                          .init_noise = x,
                          .start_step = b->step,
                          .labels = src->labels,
                          .guidance = src->guidance,
                          .progress = src->progress,
                          .progress_user = src->progress_user,
                          .cancel = src->cancel,
                          .threads = src->threads};
    rc = sampler_run(rest, m, &r, out, &part, e);
    *nfe += part;
  }
  free(x);
  return rc;
}

/* ---- input images ---- */

static int decode_exact(const uint8_t *png, size_t len, const char *field, int h, int w,
                        uint8_t **px, err *e) {
  int ph = 0, pw = 0;
  int rc = image_png_decode(png, len, w, h, px, &ph, &pw, e);
  if (rc == ERR_INVALID && strstr(e->msg, "larger than"))
    return err_prefix(e, "%s: the model samples %dx%d", field, w, h);
  if (rc != ERR_OK)
    return err_prefix(e, "%s", field);
  if (ph != h || pw != w) {
    free(*px);
    *px = NULL;
    return err_set(e, ERR_INVALID, "%s: image is %dx%d, the model samples %dx%d", field, pw, ph, w,
                   h);
  }
  return ERR_OK;
}

/* PIL's convert("L"): L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded */
static uint8_t luma(const uint8_t *p) {
  return (uint8_t)((p[0] * 299u + p[1] * 587u + p[2] * 114u + 500u) / 1000u);
}

int edit_image_from_png(const uint8_t *png, size_t len, const char *field, int c, int h, int w,
                        float *out, err *e) {
  if (c != 1 && c != 3)
    return err_set(e, ERR_UNSUPPORTED, "%s: images for a %d-channel model are not supported", field,
                   c);
  uint8_t *px = NULL;
  int rc = decode_exact(png, len, field, h, w, &px, e);
  if (rc != ERR_OK)
    return rc;
  if (c == 1) {
    const size_t plane = (size_t)h * w;
    for (size_t i = 0; i < plane; i++)
      px[i] = luma(px + 3 * i); /* in place: i <= 3 i */
  }
  image_from_u8(px, c, h, w, out);
  free(px);
  return ERR_OK;
}

int edit_mask_from_png(const uint8_t *png, size_t len, const char *field, int h, int w, float *out,
                       err *e) {
  uint8_t *px = NULL;
  int rc = decode_exact(png, len, field, h, w, &px, e);
  if (rc != ERR_OK)
    return rc;
  for (size_t i = 0; i < (size_t)h * w; i++)
    out[i] = luma(px + 3 * i) >= 128 ? 1.0f : 0.0f;
  free(px);
  return ERR_OK;
}
