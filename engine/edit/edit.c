/* BoundaryDiffusion's mixing trajectory (boundarydiffusion.py, edit_image_boundary and
 * unconditional, re-derived): latent at t_m by DDIM (eta 0) inversion or sampling, one move
 * along the x_t ("z") normal and one along the bottleneck ("h") normal, the moved h standing in
 * for the UNet's own in the first evaluation after t_m, the remaining steps with the release's
 * eta = 1 by default. */
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
  /* Clipping and thresholding as the grid was recorded (else as the model's scheduler config
   * says): the release's models need none, but a model trained to be sampled with x0 clipped
   * (glyphs32) drifts off its images without it. DDIM inversion never clips either way. */
  json_t *spec = json_pack("{s:s, s:O, s:{s:f}}", "name", "ddim", "steps",
                           json_object_get(solver, "steps"), "options", "eta", eta);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  const json_t *cfg = json_object_get(solver, "config");
  if (cfg && !json_is_null(cfg)) {
    json_t *c = json_deep_copy(cfg); /* resolved: its eta gives way to the option */
    json_object_del(c, "eta");
    json_object_set_new(spec, "config", c);
  }
  int rc = sampler_new_from_json(spec, model_config, out, e);
  json_decref(spec);
  return rc;
}

/* The latents' size: src's, else the model's sample_size. */
static void src_size(const model *m, const edit_src *src, int *h, int *w) {
  const int size = model_get_info(m)->sample_size;
  *h = src->height ? src->height : size;
  *w = src->width ? src->width : size;
}

int edit_latent_at(const sampler *s, const model *m, int step, const edit_src *src, float *out,
                   int *nfe, err *e) {
  const int n = sampler_num_steps(s);
  int h, w;
  src_size(m, src, &h, &w);
  if (step < 0 || step >= n)
    return err_set(e, ERR_INVALID, "mixing step %d outside the grid's %d steps", step, n);
  if (src->image) {
    invert_opts io = {.batch = src->batch,
                      .height = h,
                      .width = w,
                      .text_states = src->text_states,
                      .text_seq = src->text_seq,
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
    const size_t d = (size_t)model_get_info(m)->in_channels * h * w;
    for (int b = 0; b < src->batch; b++) {
      if (src->init_noise)
        memcpy(out + (size_t)b * d, src->init_noise + (size_t)b * d, d * sizeof *out);
      else
        rng_normal(src->seed, src->first_image + (uint64_t)b, 0, out + (size_t)b * d, d);
    }
    return ERR_OK;
  }
  sampler_run_opts r = {.batch = src->batch,
                        .height = h,
                        .width = w,
                        .seed = src->seed,
                        .first_image = src->first_image,
                        .init_noise = src->init_noise,
                        .labels = src->labels,
                        .guidance = src->guidance,
                        .text_states = src->text_states,
                        .text_seq = src->text_seq,
                        .progress = src->progress,
                        .progress_user = src->progress_user,
                        .cancel = src->cancel,
                        .threads = src->threads,
                        .end_step = step};
  return sampler_run(s, m, &r, out, nfe, e);
}

int edit_mid_at(const sampler *s, const model *m, int step, const edit_src *src, const float *x,
                float *mid, err *e) {
  const model_info *mi = model_get_info(m);
  const int n = sampler_num_steps(s);
  int h, w;
  src_size(m, src, &h, &w);
  if (step < 0 || step >= n)
    return err_set(e, ERR_INVALID, "mixing step %d outside the grid's %d steps", step, n);
  const size_t dout = (size_t)mi->out_channels * h * w;
  const size_t per = src->text_states ? (size_t)src->text_seq * mi->cross_attention_dim : 0;
  float *out = malloc((size_t)src->batch * dout * sizeof *out);
  float *tv = malloc((size_t)src->batch * sizeof *tv);
  float *states = per ? malloc((size_t)src->batch * per * sizeof *states) : NULL;
  int rc = ERR_OK;
  if (!out || !tv || (per && !states)) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  for (int b = 0; b < src->batch; b++) {
    tv[b] = (float)sampler_timesteps(s)[step];
    if (per)
      memcpy(states + (size_t)b * per, src->text_states, per * sizeof *states);
  }
  const model_call c = {.x = x,
                        .n = src->batch,
                        .h = h,
                        .w = w,
                        .t = tv,
                        .labels = src->labels,
                        .encoder_hidden_states = states,
                        .seq_len = per ? src->text_seq : 0,
                        .hooks = {.mid_save = mid},
                        .threads = src->threads > 0 ? src->threads : 1};
  rc = guidance_eval(src->guidance, m, &c, out, e);
done:
  free(out);
  free(tv);
  free(states);
  return rc;
}

int edit_space_parse(const char *name, const boundary *b, edit_space *out) {
  if (!name)
    *out = b && b->mid ? EDIT_SPACE_BOTH : EDIT_SPACE_X;
  else if (!strcmp(name, "x"))
    *out = EDIT_SPACE_X;
  else if (!strcmp(name, "h"))
    *out = EDIT_SPACE_H;
  else if (!strcmp(name, "both"))
    *out = EDIT_SPACE_BOTH;
  else
    return -1;
  return 0;
}

const char *edit_space_name(edit_space s) {
  return s == EDIT_SPACE_X ? "x" : s == EDIT_SPACE_H ? "h" : "both";
}

/* Moves the h rows of every pass to the target distance, each image by the step its first
 * (conditional) row needs, so the passes keep their difference: guidance acts as before. */
static void move_mid(const boundary *hb, float *mid, int batch, int passes, double target) {
  for (int i = 0; i < batch; i++) {
    const double step = target - boundary_distance(hb, mid + (size_t)i * hb->dim);
    for (int p = 0; p < passes; p++) {
      float *row = mid + ((size_t)p * batch + i) * hb->dim;
      for (int k = 0; k < hb->dim; k++)
        row[k] = (float)(row[k] + step * hb->normal[k]);
    }
  }
}

static int check_mid(const model *m, const boundary *hb, int h, int w, err *e) {
  int shape[3];
  int rc = model_mid_shape(m, h, w, shape, e);
  if (rc != ERR_OK)
    return err_prefix(e, "h-space edit");
  /* the model's own shape stays out: the daemon hands this message to clients, and a mid
   * block's channels and size are the architecture they are not to learn (DeepPeep) */
  if (shape[0] != hb->c || shape[1] != hb->h || shape[2] != hb->w)
    return err_set(e, ERR_INVALID,
                   "the boundary's h-space is %dx%dx%d, not this model's mid block: fit the "
                   "boundary on this model",
                   hb->c, hb->h, hb->w);
  return ERR_OK;
}

/* One progress count over an edit's phases (latent, h, the rest), each of which counts from 1. */
typedef struct phased {
  sampler_progress_fn fn;
  void *user;
  int done, total, nfe;
} phased;

static void phased_report(int step, int total, int nfe, void *u) {
  const phased *p = u;
  (void)total;
  p->fn(p->done + step, p->total, p->nfe + nfe, p->user);
}

int edit_boundary(const sampler *grid, const sampler *rest, const model *m, const boundary *b,
                  const edit_src *src, double strength, edit_space space, float *out, float *latent,
                  int *nfe, err *e) {
  int dummy = 0, part = 0;
  nfe = nfe ? nfe : &dummy;
  *nfe = 0;
  const model_info *mi = model_get_info(m);
  int h, w;
  src_size(m, src, &h, &w);
  const size_t d = (size_t)mi->in_channels * h * w;
  if ((size_t)b->dim != d)
    return err_set(e, ERR_INVALID, "boundary has %d values per latent, the model %zu", b->dim, d);
  if (!isfinite(strength) || fabs(strength) > 1000)
    return err_set(e, ERR_INVALID, "strength %g must be a finite number in [-1000, 1000]",
                   strength);
  if (space < EDIT_SPACE_X || space > EDIT_SPACE_BOTH)
    return err_set(e, ERR_INVALID, "edit space %d is not x, h or both", (int)space);
  int rc;
  if ((space & EDIT_SPACE_H) && !b->mid)
    return err_set(e, ERR_INVALID, "the boundary has no h-space part: edit x only, or refit it");
  if ((space & EDIT_SPACE_H) && (rc = check_mid(m, b->mid, h, w, e)) != ERR_OK)
    return rc;
  if (sampler_num_steps(rest) != sampler_num_steps(grid))
    return err_set(e, ERR_INVALID, "the edit's solver has %d steps, the boundary's grid %d",
                   sampler_num_steps(rest), sampler_num_steps(grid));
  if (src->batch < 1)
    return err_set(e, ERR_INVALID, "batch %d must be positive", src->batch);
  const size_t nd = (size_t)src->batch * d;
  const int passes = guidance_passes(src->guidance), n = sampler_num_steps(grid);
  const int latent_steps = src->image ? n - b->step : b->step;
  phased ph = {src->progress, src->progress_user, 0,
               latent_steps + !!(space & EDIT_SPACE_H) + n - b->step, 0};
  edit_src ps = *src;
  if (src->progress) {
    ps.progress = phased_report;
    ps.progress_user = &ph;
  }
  float *x = malloc(nd * sizeof *x), *mid = NULL;
  if (!x)
    return err_set(e, ERR_NOMEM, "out of memory");
  rc = edit_latent_at(grid, m, b->step, &ps, x, &part, e);
  *nfe += part;
  ph.done += latent_steps;
  ph.nfe = *nfe;
  if (rc == ERR_OK && (space & EDIT_SPACE_H)) {
    /* h of the unmoved latent, as the release takes it from the unedited chain */
    if (!(mid = malloc((size_t)passes * src->batch * b->mid->dim * sizeof *mid)))
      rc = err_set(e, ERR_NOMEM, "out of memory for the h-space edit");
    else if ((rc = edit_mid_at(grid, m, b->step, src, x, mid, e)) == ERR_OK) {
      ++*nfe;
      move_mid(b->mid, mid, src->batch, passes, strength * b->mid->scale);
      ph.nfe = *nfe;
      if (src->progress)
        phased_report(1, 1, 0, &ph);
      ph.done++;
    }
  }
  if (rc == ERR_OK) {
    if (latent)
      memcpy(latent, x, nd * sizeof *x);
    if (space & EDIT_SPACE_X)
      boundary_move(b, x, src->batch, strength * b->scale);
    sampler_run_opts r = {.batch = src->batch,
                          .height = h,
                          .width = w,
                          .seed = src->seed,
                          .first_image = src->first_image,
                          .init_noise = x,
                          .start_step = b->step,
                          .labels = src->labels,
                          .guidance = src->guidance,
                          .text_states = src->text_states,
                          .text_seq = src->text_seq,
                          .progress = ps.progress,
                          .progress_user = ps.progress_user,
                          .cancel = src->cancel,
                          .threads = src->threads,
                          .first_mid = mid};
    rc = sampler_run(rest, m, &r, out, &part, e);
    *nfe += part;
  }
  free(x);
  free(mid);
  return rc;
}
