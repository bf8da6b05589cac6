/* The one job runner (pipeline.h): a typed request to a sampler, inputs replicated over the
 * batch, each kind run through the engine's rooms below, and one progress count (with previews)
 * over all of a run's phases. */
#include "pipeline.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "mem.h"
#include "npy.h"
#include "rng.h"
#include "schedule.h"
#include "vae.h"

#define PREVIEW_MAX 64 /* preview side in pixels */

/* ---- solver spec to sampler ---- */

static void set_field(char *field, size_t n, const char *fmt, const char *arg) {
  if (field && n)
    snprintf(field, n, fmt, arg);
}

/* The file of the request's solver data: a bare name is the model's (DIR/solver_data), else a
 * path as given. */
static int data_file(const char *dir, const pipeline_solver *s, char *path, size_t n, err *e) {
  if (!sampler_data_is_name(s->data)) {
    snprintf(path, n, "%s", s->data);
    return ERR_OK;
  }
  if (!dir)
    return err_set(e, ERR_INVALID, "solver data '%s': the model's folder is not here", s->data);
  return sampler_data_path(dir, s->data, path, n, e);
}

/* A message about the file of a named solver data speaks of the name: clients name data, never
 * paths, and must not learn where the server keeps it. */
static void name_not_path(err *e, const char *dir, const pipeline_solver *s) {
  char path[4200], msg[sizeof e->msg], *at;
  if (!e || !s->data || !sampler_data_is_name(s->data) ||
      data_file(dir, s, path, sizeof path, NULL) != ERR_OK)
    return;
  while ((at = strstr(e->msg, path)) != NULL) {
    const int lead = strncmp(e->msg, "statistics file ", 16) == 0 && at == e->msg + 16 ? 16 : 0;
    snprintf(msg, sizeof msg, "%.*ssolver data '%s'%s", (int)(at - e->msg) - lead, e->msg, s->data,
             at + strlen(path));
    memcpy(e->msg, msg, sizeof msg);
  }
}

/* {name, steps, config, options} with only one of the options (only_key), all, or none */
static int try_solver(const pipeline_sched_source *m, const pipeline_solver *s,
                      const char *only_key, int no_opts, sampler **out, err *e) {
  char data[4200];
  int rc = s->data ? data_file(m->dir, s, data, sizeof data, e) : ERR_OK;
  json_t *spec = rc == ERR_OK ? json_pack("{s:s}", "name", s->name) : NULL;
  if (!spec)
    return rc != ERR_OK ? rc : err_set(e, ERR_NOMEM, "out of memory");
  if (s->steps)
    json_object_set_new(spec, "steps", json_integer(s->steps));
  if (s->config)
    json_object_set(spec, "config", (json_t *)s->config);
  if (s->data)
    json_object_set_new(spec, "data", json_string(data));
  if (only_key)
    json_object_set_new(spec, "options",
                        json_pack("{s:O}", only_key, json_object_get(s->options, only_key)));
  else if (s->options && !no_opts)
    json_object_set(spec, "options", (json_t *)s->options);
  rc = sampler_new_from_json(spec, m->config, out, e);
  json_decref(spec);
  if (rc != ERR_OK)
    name_not_path(e, m->dir, s);
  return rc;
}

int pipeline_check_data(const model *m, const pipeline_solver *ps, const sampler *s,
                        const guidance *g, const int64_t *labels, int batch, err *e) {
  int rc = sampler_data_check(s, m, g, labels, batch, e);
  if (rc != ERR_OK)
    name_not_path(e, model_dir(m), ps);
  return rc;
}

int pipeline_sampler(const model *m, const pipeline_solver *s, sampler **out, char *field,
                     size_t fieldlen, err *e) {
  const pipeline_sched_source src = {.config = model_scheduler_config(m),
                                     .prediction_type = model_get_info(m)->prediction_type,
                                     .dir = model_dir(m)};
  return pipeline_sampler_from(&src, s, out, field, fieldlen, e);
}

int pipeline_sampler_from(const pipeline_sched_source *m, const pipeline_solver *s, sampler **out,
                          char *field, size_t fieldlen, err *e) {
  *out = NULL;
  if (!s->name || !sampler_solver_class(s->name)) {
    set_field(field, fieldlen, "%s", "scheduler.name");
    return err_set(e, ERR_INVALID, "unknown scheduler '%s'", s->name ? s->name : "");
  }
  int rc = try_solver(m, s, NULL, 0, out, e);
  if (rc == ERR_OK) {
    const char *pred = sched_prediction_name(sampler_config(*out)->prediction_type);
    if (m->prediction_type && *m->prediction_type && strcmp(m->prediction_type, pred) != 0) {
      sampler_free(*out);
      *out = NULL;
      set_field(field, fieldlen, "%s", "scheduler.options.prediction_type");
      return err_set(e, ERR_INVALID, "the model predicts '%s', not '%s'", m->prediction_type, pred);
    }
    return ERR_OK;
  }
  if (rc == ERR_NOMEM)
    return rc;
  /* the data names itself: it is not found, takes no such solver, or is not for this model */
  if (s->data && e &&
      (strstr(e->msg, "solver data") || strstr(e->msg, "statistics") ||
       strstr(e->msg, "USF schedule"))) {
    set_field(field, fieldlen, "%s", "scheduler.data");
    return rc;
  }
  /* name the part at fault: each option alone, then the spec without options */
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)s->options, key, v) {
    sampler *one = NULL;
    err e1 = {0};
    if (try_solver(m, s, key, 0, &one, &e1) != ERR_OK) {
      set_field(field, fieldlen, "scheduler.options.%s", key);
      if (e)
        *e = e1;
      return e1.code;
    }
    sampler_free(one);
  }
  sampler *one = NULL;
  err e1 = {0};
  if (try_solver(m, s, NULL, 1, &one, &e1) != ERR_OK) {
    set_field(field, fieldlen, "%s",
              strstr(e1.msg, "steps") ? "scheduler.steps"
              : s->config             ? "scheduler.config"
                                      : "scheduler");
    if (e)
      *e = e1;
    return e1.code;
  }
  sampler_free(one);
  set_field(field, fieldlen, "%s", "scheduler.options"); /* keys fine alone, not together */
  return rc;
}

/* The grid inversions run on: DDIM over the request's config and options, never clipping (a
 * clipped step cannot be run backwards); edit-friendly maps add eta 1 and end at alpha_bar[0]
 * (set_alpha_to_one false) so the chain ends on the image itself. */
static int inversion_sampler(const model *m, const pipeline_request *r, sampler **out, char *field,
                             size_t fieldlen, err *e) {
  const int ddpm = r->kind == PIPELINE_INVERT_DDPM;
  json_t *opts = r->solver.options ? json_deep_copy(r->solver.options) : json_object();
  if (!opts)
    return err_set(e, ERR_NOMEM, "out of memory");
  json_object_set_new(opts, "clip_sample", json_false());
  json_object_set_new(opts, "thresholding", json_false());
  if (ddpm) {
    json_object_set_new(opts, "eta", json_real(1.0));
    json_object_set_new(opts, "set_alpha_to_one", json_false());
  }
  const json_t *config =
      r->noise && r->invert.maps_config ? r->invert.maps_config : r->solver.config;
  pipeline_solver s = {.name = "ddim",
                       .steps = r->solver.steps ? r->solver.steps
                                : ddpm          ? 100
                                                : 50,
                       .config = config,
                       .options = opts};
  int rc = pipeline_sampler(m, &s, out, field, fieldlen, e);
  json_decref(opts);
  return rc;
}

/* ---- progress over phases, previews ---- */

typedef struct run_ctx {
  const model *m;
  const pipeline_request *r;
  const pipeline_hooks *h;
  int base, total, nfe_base; /* this phase's place in the whole count (total 0: as reported) */
  const sampler *s;          /* the sampling phase's solver (previews), or NULL */
  const float *x;            /* the samples being denoised (previews read image 0) */
  const float *cond;         /* image 0's conditioning image, or NULL */
  int height, width;         /* of what the solver runs on: latents on a latent model */
  /* Text models: the prompt's and the source prompt's hidden states (one sequence each), and
   * the guidance of both with their unconditional states; else NULL and the request's. */
  const float *text, *src_text;
  int seq;
  const guidance *g, *src_g;
  int factor; /* image pixels per sampled pixel (shifts are given in image pixels) */
} run_ctx;

/* Whether the solver holds its state VE-scaled (x / sqrt(alpha_bar)): the Euler family. */
static int sigma_space(const sampler *s) {
  static const char *const classes[] = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                        "HeunDiscreteScheduler",  "LMSDiscreteScheduler",
                                        "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                        "DPMSolverSDEScheduler",  "EDMEulerScheduler"};
  const char *cls = sampler_solver_class(sampler_name(s));
  for (size_t i = 0; cls && i < sizeof classes / sizeof *classes; i++)
    if (strcmp(cls, classes[i]) == 0)
      return 1;
  return 0;
}

/* The PNG of a small picture of image 0's predicted x0 after `nfe` evaluations of the sampling
 * phase: one more evaluation at the timestep the solver evaluates next, converted as the
 * solver's prediction type says (the engine's x0 stays private to the solver). */
static int preview_png(run_ctx *c, int nfe, uint8_t **png, size_t *len) {
  const model_info *mi = model_get_info(c->m);
  const int ch = mi->in_channels, h = c->height, w = c->width;
  const size_t d = (size_t)ch * h * w;
  const sched_config *cfg = sampler_config(c->s);
  const double *tm = sampler_timesteps(c->s);
  float *x0 = mem_malloc(d * sizeof *x0),
        *mo = mem_malloc((size_t)mi->out_channels * h * w * sizeof *mo);
  int rc = -1;
  if (!x0 || !mo)
    goto done;
  if (!tm || nfe >= sampler_nfe(c->s)) { /* finished (or data-dependent): x is the image */
    memcpy(x0, c->x, d * sizeof *x0);
  } else {
    const int T = sampler_train_timesteps(c->s);
    const float *ab = sampler_alphas_cumprod(c->s);
    const double t = tm[nfe];
    const double tf = floor(t); /* clamped before the int conversion */
    const int ti = !(tf > 0) ? 0 : tf >= T - 1 ? T - 2 : (int)tf;
    const double fr = t - ti < 0 ? 0 : t - ti > 1 ? 1 : t - ti;
    const float a = (float)((1 - fr) * ab[ti] + fr * ab[ti + 1]);
    const float sa = sqrtf(a), sb = sqrtf(1.0f - a);
    const int ve = sigma_space(c->s);
    for (size_t i = 0; i < d; i++) /* to VP space */
      x0[i] = ve ? c->x[i] * sa : c->x[i];
    float tv = (float)t;
    err e;
    const model_call call = {.x = x0,
                             .n = 1,
                             .h = h,
                             .w = w,
                             .t = &tv,
                             .labels = c->r->labels,
                             .threads = c->h->threads > 0 ? c->h->threads : 1,
                             .cond = c->cond};
    if (model_run(c->m, &call, mo, &e))
      goto done;
    for (size_t i = 0; i < d; i++) {
      const float xv = x0[i];
      switch (cfg->prediction_type) {
      case SCHED_PRED_EPSILON: x0[i] = (xv - sb * mo[i]) / sa; break;
      case SCHED_PRED_SAMPLE: x0[i] = mo[i]; break;
      case SCHED_PRED_V: x0[i] = sa * xv - sb * mo[i]; break;
      }
    }
  }
  int f = 1;
  while (h / f > PREVIEW_MAX || w / f > PREVIEW_MAX)
    f++;
  const int ph = h / f, pw = w / f, pc = ch < 3 ? 1 : 3;
  float *small = mem_calloc((size_t)pc * ph * pw, sizeof *small);
  uint8_t *px = mem_malloc((size_t)ph * pw * 3);
  if (small && px) {
    for (int k = 0; k < pc; k++)
      for (int y = 0; y < ph * f; y++)
        for (int xx = 0; xx < pw * f; xx++)
          small[((size_t)k * ph + y / f) * pw + xx / f] +=
              x0[((size_t)k * h + y) * w + xx] / (float)(f * f);
    image_to_u8(small, pc, ph, pw, px);
    err e;
    rc = image_png_encode(px, pc, ph, pw, NULL, 0, png, len, &e);
  }
  free(small);
  free(px);
done:
  free(x0);
  free(mo);
  return rc;
}

static void on_progress(int step, int total, int nfe, void *user) {
  run_ctx *c = user;
  const pipeline_hooks *h = c->h;
  if (!h->progress)
    return;
  pipeline_progress p = {.step = step, .total = total, .nfe = c->nfe_base + nfe};
  if (c->total) {
    p.step = c->base + step < c->total ? c->base + step : c->total;
    p.total = c->total;
  }
  uint8_t *png = NULL;
  size_t len = 0;
  if (c->s && !c->text && h->preview_every &&
      (p.step % h->preview_every == 0 || p.step == p.total) &&
      preview_png(c, nfe, &png, &len) == ERR_OK) {
    p.preview = png;
    p.preview_len = len;
  }
  h->progress(&p, h->progress_user);
  free(png);
}

/* ---- inputs ---- */

/* count pictures of n floats each as batch of them: one repeated, or one each */
static float *replicate(const float *src, int count, size_t n, int batch, err *e) {
  if (count != 1 && count != batch) {
    err_set(e, ERR_INVALID, "%d input pictures for a batch of %d", count, batch);
    return NULL;
  }
  float *out = mem_malloc(sizeof *out * n * (size_t)batch);
  if (!out) {
    err_set(e, ERR_NOMEM, "out of memory for %d input pictures", batch);
    return NULL;
  }
  for (int b = 0; b < batch; b++)
    memcpy(out + n * (size_t)b, src + (count == 1 ? 0 : n * (size_t)b), n * sizeof *out);
  return out;
}

int pipeline_check_noise(const float *noise, size_t count, const char *field, err *e) {
  for (size_t i = 0; i < count; i++)
    if (!(fabsf(noise[i]) <= (float)PIPELINE_NOISE_MAX))
      return err_set(e, ERR_INVALID,
                     "%s: value %zu is %g; noise must be finite and within +-%g (it is standard "
                     "normal, and larger values overflow float32 during sampling)",
                     field, i, (double)noise[i], PIPELINE_NOISE_MAX);
  return ERR_OK;
}

/* ---- kinds ---- */

/* The options every sampling phase of a request shares: its batch, size, noise, progress,
 * cancellation and threads. */
static sampler_run_opts sampling_opts(run_ctx *c, const pipeline_result *out) {
  const pipeline_request *r = c->r;
  const pipeline_hooks *h = c->h;
  return (sampler_run_opts){.batch = r->batch,
                            .height = out->height,
                            .width = out->width,
                            .seed = r->seed,
                            .first_image = r->first_image,
                            .progress = on_progress,
                            .progress_user = c,
                            .noise = h->noise,
                            .noise_user = h->noise_user,
                            .cancel = h->cancel,
                            .threads = h->threads};
}

/* The sampling of a generate job with out->sampler into dst (c's size: latents on a latent
 * model): from the request's noise, or from image noised to the strength's step (img2img) and
 * kept outside mask (inpainting), with c's text states and guidance. */
static int sample_generate(run_ctx *c, const float *image, const float *mask, float *dst,
                           pipeline_result *out, err *e) {
  const pipeline_request *r = c->r;
  c->s = out->sampler;
  sampler_run_opts o = sampling_opts(c, out);
  o.height = c->height;
  o.width = c->width;
  o.init_noise = r->noise;
  o.labels = r->labels;
  o.text_states = c->text;
  o.text_seq = c->seq;
  o.guidance = c->g;
  o.classifier = r->classifier;
  o.init_image = image;
  o.strength = r->strength;
  o.mask = mask;
  return sampler_run(out->sampler, c->m, &o, dst, &out->nfe, e);
}

static int run_generate(run_ctx *c, float *image, float *mask, pipeline_result *out, err *e) {
  const pipeline_request *r = c->r;
  const model_info *mi = model_get_info(c->m);
  const size_t nd = (size_t)r->batch * mi->in_channels * out->height * out->width;
  int rc = r->noise ? pipeline_check_noise(r->noise, nd, "edit.noise", e) : ERR_OK;
  if (!rc)
    rc = pipeline_sampler(c->m, &r->solver, &out->sampler, NULL, 0, e);
  if (!rc)
    rc = pipeline_check_data(c->m, &r->solver, out->sampler, r->guidance, r->labels, r->batch, e);
  return rc ? rc : sample_generate(c, image, mask, out->images, out, e);
}

/* Restoration: the image-conditioned model samples from noise with the degraded image as its
 * condition in every evaluation (any solver); a regression model is one evaluation at t = 0,
 * for which the solver only names the run in the metadata. */
static int run_deblur(run_ctx *c, const float *image, pipeline_result *out, err *e) {
  const pipeline_request *r = c->r;
  const pipeline_hooks *h = c->h;
  const model_info *mi = model_get_info(c->m);
  if (!image)
    return err_set(e, ERR_INVALID, "deblurring needs an input image");
  if (!mi->cond_channels && !mi->regression)
    return err_set(e, ERR_INVALID,
                   "the model is neither image-conditioned (_cond_channels) nor a regression "
                   "model (_regression): it cannot deblur");
  if (r->labels || r->guidance || r->noise)
    return err_set(e, ERR_INVALID, "deblurring takes no class, guidance or noise");
  int rc = pipeline_sampler(c->m, &r->solver, &out->sampler, NULL, 0, e);
  if (rc)
    return rc;
  if (mi->regression) {
    float *t = mem_calloc((size_t)r->batch, sizeof *t);
    const model_call call = {.x = image,
                             .n = r->batch,
                             .h = out->height,
                             .w = out->width,
                             .t = t,
                             .threads = h->threads > 0 ? h->threads : 1};
    rc = t ? model_run(c->m, &call, out->images, e) : err_set(e, ERR_NOMEM, "out of memory");
    free(t);
    out->nfe = 1;
    return rc;
  }
  c->s = out->sampler;
  c->cond = image;
  sampler_run_opts o = sampling_opts(c, out);
  o.cond = image;
  return sampler_run(out->sampler, c->m, &o, out->images, &out->nfe, e);
}

/* Inversion of image (latents on a latent model) and the sampling of the edit into xs (c's
 * size). */
static int run_inversion(run_ctx *c, const float *image, float *xs, pipeline_result *out, err *e) {
  const pipeline_request *r = c->r;
  const pipeline_hooks *h = c->h;
  const model_info *mi = model_get_info(c->m);
  const int ddpm = r->kind == PIPELINE_INVERT_DDPM, batch = r->batch;
  const size_t d = (size_t)mi->in_channels * c->height * c->width;
  int rc = inversion_sampler(c->m, r, &out->sampler, NULL, 0, e);
  if (rc)
    return rc;
  const sampler *s = out->sampler;
  const int n = sampler_num_steps(s), nmaps = ddpm ? n + 1 : 1;
  const int64_t shape5[5] = {batch, nmaps, mi->in_channels, c->height, c->width};
  const int64_t shape4[4] = {batch, mi->in_channels, c->height, c->width};
  const int64_t *src_labels = r->invert.source_labels ? r->invert.source_labels : r->labels;
  invert_opts io = {.batch = batch,
                    .height = c->height,
                    .width = c->width,
                    .labels = src_labels,
                    .guidance = c->src_g,
                    .text_states = c->src_text,
                    .text_seq = c->seq,
                    .seed = r->seed,
                    .first_image = r->first_image,
                    .progress = on_progress,
                    .progress_user = c,
                    .cancel = h->cancel,
                    .threads = h->threads};
  if (r->noise && r->noise_shape &&
      (r->noise_ndim != (ddpm ? 5 : 4) ||
       memcmp(r->noise_shape, ddpm ? shape5 : shape4, sizeof *shape4 * (ddpm ? 5 : 4)) != 0))
    return ddpm ? err_set(e, ERR_SHAPE,
                          "edit.noise: expected shape [%d, %d, %d, %d, %d] (batch_size, "
                          "scheduler.steps + 1, the model's channels, height, width)",
                          batch, n + 1, mi->in_channels, c->height, c->width)
                : err_set(e, ERR_SHAPE,
                          "edit.noise: expected shape [%d, %d, %d, %d] (batch_size, the "
                          "model's channels, height, width)",
                          batch, mi->in_channels, c->height, c->width);
  float *maps = NULL;
  const size_t nm = d * (size_t)batch * (size_t)nmaps;
  if (r->noise && (rc = pipeline_check_noise(r->noise, nm, "edit.noise", e)) != ERR_OK)
    return rc;
  if (!(maps = mem_malloc(sizeof *maps * nm)))
    return err_set(e, ERR_NOMEM, "out of memory for the noise maps");
  if (r->noise) {
    memcpy(maps, r->noise, sizeof *maps * nm);
    c->total = n;
  } else {
    c->total = r->invert.invert_only ? n : 2 * n;
    rc = ddpm ? invert_ddpm(s, c->m, &io, image, maps, &out->nfe, e)
              : invert_ddim(s, c->m, &io, image, 0, maps, &out->nfe, e);
    if (!rc)
      rc = npy_encode_f32(maps, ddpm ? 5 : 4, ddpm ? shape5 : shape4, &out->noise, &out->noise_len,
                          e);
    c->base = n;
    c->nfe_base = out->nfe;
  }
  if (!rc && !r->invert.invert_only) {
    c->s = s;
    c->x = xs;
    invert_edit ed = r->invert.edit;
    ed.ddpm = ddpm;
    ed.dx /= c->factor;
    ed.dy /= c->factor;
    invert_sample_opts so = {.skip = r->invert.skip,
                             .src_labels = src_labels,
                             .src_guidance = io.guidance,
                             .src_text_states = c->src_text};
    io.labels = r->labels;
    io.guidance = c->g;
    io.text_states = c->text;
    int part = 0;
    rc = invert_edit_sample(s, c->m, &io, &so, &ed, maps, xs, &part, e);
    out->nfe += part;
  }
  free(maps);
  return rc;
}

/* A boundary edit of image (latents on a latent model) or of the seed's chain into xs. */
static int run_boundary(run_ctx *c, const float *image, float *xs, pipeline_result *out, err *e) {
  const pipeline_request *r = c->r;
  const pipeline_hooks *h = c->h;
  const boundary *b = r->bound.boundary;
  const model_info *mi = model_get_info(c->m);
  if (!b)
    return err_set(e, ERR_INVALID, "edit.boundary: missing");
  if (b->dim != mi->in_channels * c->height * c->width)
    return err_set(e, ERR_INVALID,
                   "edit.boundary: a boundary for latents of %d values; this model's have %d",
                   b->dim, mi->in_channels * c->height * c->width);
  if (r->noise && pipeline_check_noise(r->noise, (size_t)r->batch * b->dim, "edit.noise", e))
    return e->code;
  sampler *grid = NULL;
  const json_t *mcfg = model_scheduler_config(c->m);
  int rc = edit_grid_sampler(b->solver, mcfg, 0.0, &grid, e);
  if (!rc)
    rc = edit_grid_sampler(b->solver, mcfg, r->bound.eta, &out->sampler, e);
  if (!rc) {
    edit_src src = {.batch = r->batch,
                    .image = image,
                    .init_noise = r->noise,
                    .seed = r->seed,
                    .first_image = r->first_image,
                    .labels = r->labels,
                    .guidance = c->g,
                    .progress = on_progress,
                    .progress_user = c,
                    .cancel = h->cancel,
                    .threads = h->threads,
                    .height = c->height,
                    .width = c->width,
                    .text_states = c->text,
                    .text_seq = c->seq};
    rc = edit_boundary(grid, out->sampler, c->m, b, &src, r->bound.strength, r->bound.space, xs,
                       NULL, &out->nfe, e);
  }
  sampler_free(grid);
  return rc;
}

/* The mask of inpainting at the latent size, as diffusers' StableDiffusionInpaintPipeline makes
 * it: binarized at 0.5 (its mask processor), then interpolate(mode="nearest") to the latent size,
 * which for a whole factor f picks pixel (f y, f x). */
static void latent_mask(const float *mask, int batch, int h, int w, int f, float *out) {
  const int lh = h / f, lw = w / f;
  for (int b = 0; b < batch; b++)
    for (int y = 0; y < lh; y++)
      for (int x = 0; x < lw; x++)
        out[((size_t)b * lh + y) * lw + x] =
            mask[((size_t)b * h + (size_t)y * f) * w + (size_t)x * f] >= 0.5f ? 1.0f : 0.0f;
}

/* The standard normal noise of posterior samples: each image's own stream VAE_SAMPLE_STREAM,
 * through the batch's noise hook when there is one (a batch of requests). */
static int posterior_noise(const run_ctx *c, size_t per, float *eps, err *e) {
  const pipeline_request *r = c->r;
  for (int b = 0; b < r->batch; b++) {
    float *eb = eps + (size_t)b * per;
    if (c->h->noise) {
      int rc = c->h->noise(c->h->noise_user, r->first_image + (uint64_t)b, VAE_SAMPLE_STREAM, eb,
                           per, e);
      if (rc)
        return rc;
    } else {
      rng_normal(r->seed, r->first_image + (uint64_t)b, VAE_SAMPLE_STREAM, eb, per);
    }
  }
  return ERR_OK;
}

/* img2img and inpainting on latents, as diffusers' StableDiffusionImg2ImgPipeline and
 * StableDiffusionInpaintPipeline (a UNet without mask channels) run them: the sampler starts
 * from the encoded image noised to the strength's step and keeps the masked-out latents of the
 * re-noised original after every step. */
static int latent_generate(run_ctx *c, const float *z0, const float *lmask, float *z,
                           pipeline_result *out, err *e) {
  int rc = pipeline_sampler(c->m, &c->r->solver, &out->sampler, NULL, 0, e);
  return rc ? rc : sample_generate(c, z0, lmask, z, out, e);
}

/* Every kind but deblurring on a latent text-to-image model, as diffusers' Stable Diffusion
 * pipelines: the prompts encoded once (the prompt, the negative or empty one, and for
 * inversions the source prompt), guidance as one batched call with the unconditional states,
 * input pictures VAE-encoded, the kind run on latents, the VAE decoding the result. */
static int run_latent(run_ctx *c, const float *image, const float *mask, pipeline_result *out,
                      err *e) {
  const pipeline_request *r = c->r;
  const pipeline_hooks *h = c->h;
  const latent_parts *lp = model_latent(c->m);
  const latent_info *li = latent_get_info(lp);
  const model_info *mi = model_get_info(c->m);
  if (r->kind == PIPELINE_DEBLUR || r->classifier)
    return err_set(e, ERR_UNSUPPORTED, "text-to-image models do not take %s",
                   r->classifier ? "classifier guidance (the classifier reads pixels, the "
                                   "sampler runs on latents)"
                                 : "deblurring jobs (no image-conditioned latent model)");
  const int f = li->factor, lh = out->height / f, lw = out->width / f;
  if (out->height % f || out->width % f || lh < 1 || lw < 1)
    return err_set(e, ERR_INVALID, "size %dx%d: width and height must be multiples of %d",
                   out->width, out->height, f);
  if (r->clip_skip < 0 || r->clip_skip > 12)
    return err_set(e, ERR_INVALID, "clip_skip %d must be in [1, 12]", r->clip_skip);
  const invert_edit *ed = &r->invert.edit;
  const int inversion = r->kind == PIPELINE_INVERT_DDIM || r->kind == PIPELINE_INVERT_DDPM;
  if (inversion && ed->has_colour)
    return err_set(e, ERR_INVALID,
                   "edit.colour: colour edits add RGB offsets to the noise maps; "
                   "a text-to-image model's maps are latents");
  if (inversion && (ed->dx % f || ed->dy % f))
    return err_set(e, ERR_INVALID,
                   "edit.shift: %d,%d pixels; a latent model shifts by whole latents, multiples "
                   "of %d pixels",
                   ed->dx, ed->dy, f);
  const size_t per = (size_t)li->seq_len * li->text_dim;
  const size_t dz = (size_t)mi->in_channels * lh * lw, nz = (size_t)r->batch * dz;
  const int src_own = inversion && r->invert.source_prompt;
  float *cond = mem_malloc(per * sizeof *cond), *uncond = mem_malloc(per * sizeof *uncond);
  float *src = src_own ? mem_malloc(per * sizeof *src) : NULL;
  float *z = mem_malloc(nz * sizeof *z), *z0 = NULL, *lmask = NULL;
  int rc =
      !cond || !uncond || !z || (src_own && !src) ? err_set(e, ERR_NOMEM, "out of memory") : ERR_OK;
  const int skip = r->clip_skip ? r->clip_skip : 1, threads = h->threads > 0 ? h->threads : 1;
  if (!rc &&
      (rc = latent_encode_prompt(lp, r->prompt ? r->prompt : "", skip, cond, NULL, threads, e)))
    err_prefix(e, "prompt");
  if (!rc && (rc = latent_encode_prompt(lp, r->negative_prompt ? r->negative_prompt : "", skip,
                                        uncond, NULL, threads, e)))
    err_prefix(e, "negative_prompt");
  if (!rc && src_own &&
      (rc = latent_encode_prompt(lp, r->invert.source_prompt, skip, src, NULL, threads, e)))
    err_prefix(e, "source_prompt");
  if (!rc && r->noise && r->kind == PIPELINE_GENERATE)
    rc = pipeline_check_noise(r->noise, nz, "edit.noise", e);
  /* the input picture to latents: a posterior sample for img2img and inpainting (diffusers'
   * latent_dist.sample), the mean where an edit starts by inverting the picture */
  if (!rc && image && r->kind != PIPELINE_DEBLUR) {
    const int sample = r->kind == PIPELINE_GENERATE;
    float *eps = sample ? mem_malloc(nz * sizeof *eps) : NULL;
    if (!(z0 = mem_malloc(nz * sizeof *z0)) || (sample && !eps))
      rc = err_set(e, ERR_NOMEM, "out of memory for %d latents", r->batch);
    if (!rc && sample)
      rc = posterior_noise(c, dz, eps, e);
    if (!rc && (rc = latent_encode(lp, image, r->batch, lh, lw, eps, z0, threads, e)))
      err_prefix(e, "image");
    free(eps);
  }
  if (!rc && mask) {
    if (!(lmask = mem_malloc((size_t)r->batch * lh * lw * sizeof *lmask)))
      rc = err_set(e, ERR_NOMEM, "out of memory");
    else
      latent_mask(mask, r->batch, out->height, out->width, f, lmask);
  }
  guidance g = {0}, gs = {0};
  if (r->guidance && r->guidance->enabled) {
    g = *r->guidance;
    g.uncond_states = uncond;
    g.seq_len = li->seq_len;
  }
  if (r->invert.source_guidance && r->invert.source_guidance->enabled) {
    gs = *r->invert.source_guidance;
    gs.uncond_states = uncond;
    gs.seq_len = li->seq_len;
  }
  c->text = cond;
  c->src_text = src_own ? src : cond;
  c->seq = li->seq_len;
  c->g = g.enabled ? &g : NULL;
  c->src_g = gs.enabled ? &gs : NULL;
  c->height = lh;
  c->width = lw;
  c->factor = f;
  if (!rc && c->g)
    rc = guidance_check(c->g, c->m, e);
  if (!rc && c->src_g && (rc = guidance_check(c->src_g, c->m, e)))
    err_prefix(e, "source guidance");
  if (!rc) {
    switch (r->kind) {
    case PIPELINE_GENERATE: rc = latent_generate(c, z0, lmask, z, out, e); break;
    case PIPELINE_INVERT_DDIM:
    case PIPELINE_INVERT_DDPM:
      rc = !z0 && !r->noise
               ? err_set(e, ERR_INVALID, "an inversion needs an input image or its noise")
               : run_inversion(c, z0, z, out, e);
      break;
    case PIPELINE_BOUNDARY: rc = run_boundary(c, z0, z, out, e); break;
    default: rc = err_set(e, ERR_INVALID, "unknown job kind %d", (int)r->kind);
    }
  }
  if (!rc && !(inversion && r->invert.invert_only))
    rc = latent_decode(lp, z, r->batch, lh, lw, out->images, threads, e);
  free(cond);
  free(uncond);
  free(src);
  free(z);
  free(z0);
  free(lmask);
  return rc;
}

/* ---- metadata ---- */

static const char *const kind_names[] = {NULL, "invert_ddim", "invert_ddpm", "boundary", "deblur"};

json_t *pipeline_edit_json(const pipeline_request *r, int i) {
  if (r->kind == PIPELINE_GENERATE && !r->image)
    return NULL;
  const char *type =
      r->kind == PIPELINE_GENERATE ? (r->mask ? "inpaint" : "img2img") : kind_names[r->kind];
  json_t *j = json_pack("{s:s}", "type", type);
  if (!j)
    return NULL;
  const invert_edit *ed = &r->invert.edit;
  switch (r->kind) {
  case PIPELINE_GENERATE: json_object_set_new(j, "strength", json_real(r->strength)); break;
  case PIPELINE_INVERT_DDIM:
  case PIPELINE_INVERT_DDPM:
    if (r->invert.source_labels)
      json_object_set_new(j, "source_class", json_integer(r->invert.source_labels[i]));
    if (r->invert.source_guidance)
      json_object_set_new(j, "source_guidance", json_real(r->invert.source_guidance->scale));
    if (r->invert.source_prompt)
      json_object_set_new(j, "source_prompt", json_string(r->invert.source_prompt));
    if (r->invert.skip)
      json_object_set_new(j, "skip", json_integer(r->invert.skip));
    if (ed->dx || ed->dy)
      json_object_set_new(j, "shift", json_pack("[i, i]", ed->dx, ed->dy));
    if (ed->has_colour)
      json_object_set_new(j, "colour",
                          json_pack("[f, f, f]", ed->colour[0], ed->colour[1], ed->colour[2]));
    if (ed->has_colour && ed->colour_from >= 0)
      json_object_set_new(j, "colour_from", json_integer(ed->colour_from));
    break;
  case PIPELINE_BOUNDARY:
    json_object_set_new(j, "strength", json_real(r->bound.strength));
    json_object_set_new(j, "space", json_string(edit_space_name(r->bound.space)));
    json_object_set_new(j, "eta", json_real(r->bound.eta));
    if (r->bound.boundary)
      json_object_set_new(j, "step", json_integer(r->bound.boundary->step));
    if (r->image) /* an input picture, inverted to the step (else generated from the seed) */
      json_object_set_new(j, "inverted", json_true());
    break;
  case PIPELINE_DEBLUR: break;
  }
  return j;
}

int pipeline_png(const model *m, const pipeline_request *r, const sampler *s, const float *chw,
                 int i, const char *model_name, const json_t *extra, uint8_t **png, size_t *len,
                 err *e) {
  const model_info *mi = model_get_info(m);
  json_t *edit = pipeline_edit_json(r, i);
  json_t *more = NULL; /* extra, and classifier guidance (which --replay refuses to redo) */
  if (r->classifier) {
    const classifier_info *ci = classifier_get_info(r->classifier->clf);
    const classifier_head *hd = &ci->heads[r->classifier->head];
    const int64_t t = r->classifier->target[i];
    char idx[24];
    snprintf(idx, sizeof idx, "%lld", (long long)t);
    more = extra ? json_deep_copy(extra) : json_object();
    json_object_set_new(more, "classifier_guidance",
                        json_pack("{s:s, s:s, s:f}", "head", hd->name, "target",
                                  hd->labels ? hd->labels[t] : idx, "scale", r->classifier->scale));
  }
  meta_image mm = {.model = model_name,
                   .solver = r->kind == PIPELINE_GENERATE ? r->solver.name : sampler_name(s),
                   .steps = sampler_num_steps(s),
                   .seed = r->seed,
                   .image_index = r->first_image + (uint64_t)i,
                   .height = r->height ? r->height : mi->sample_size * mi->latent_factor,
                   .width = r->width ? r->width : mi->sample_size * mi->latent_factor,
                   .cfg = sampler_config(s),
                   /* as the request named it: a name is found again beside the model */
                   .solver_data = r->kind == PIPELINE_GENERATE && r->solver.data ? r->solver.data
                                                                                 : sampler_data(s),
                   .has_label = r->labels != NULL,
                   .label = r->labels ? r->labels[i] : 0,
                   .has_guidance = r->guidance && r->guidance->enabled,
                   .guidance_scale = r->guidance ? r->guidance->scale : 0,
                   .has_strength = r->kind == PIPELINE_GENERATE && r->image,
                   .strength = r->strength,
                   .edit = edit,
                   .extra = more ? more : extra,
                   .prompt = r->prompt,
                   .negative_prompt = r->negative_prompt,
                   .clip_skip = r->clip_skip};
  int rc = meta_png_encode(&mm, chw, mi->image_channels, png, len, e);
  json_decref(edit);
  json_decref(more);
  return rc;
}

/* ---- the runner ---- */

void pipeline_result_clear(pipeline_result *r) {
  free(r->images);
  sampler_free(r->sampler);
  free(r->noise);
  memset(r, 0, sizeof *r);
}

int pipeline_run(const model *m, const pipeline_request *r, const pipeline_hooks *h,
                 pipeline_result *out, err *e) {
  memset(out, 0, sizeof *out);
  const pipeline_hooks none = {0};
  h = h ? h : &none;
  const model_info *mi = model_get_info(m);
  const latent_parts *lp = model_latent(m);
  out->height = r->height ? r->height : mi->sample_size * mi->latent_factor;
  out->width = r->width ? r->width : mi->sample_size * mi->latent_factor;
  if (r->batch < 1 || out->height < 1 || out->width < 1)
    return err_set(e, ERR_INVALID, "batch and size must be at least 1");
  const int channels = mi->image_channels;
  const size_t d = (size_t)channels * out->height * out->width;
  const size_t plane = (size_t)out->height * out->width;
  if (r->guidance && !lp && guidance_check(r->guidance, m, e)) /* latent: once it has the prompts */
    return e->code;
  if (r->classifier && r->kind != PIPELINE_GENERATE)
    return err_set(e, ERR_UNSUPPORTED,
                   "classifier guidance applies to generation, img2img and inpainting, not to "
                   "inversions or boundary edits");
  float *image = NULL, *mask = NULL;
  int rc = ERR_OK;
  const int ci = lp                           ? mi->image_channels /* pictures to encode */
                 : r->kind != PIPELINE_DEBLUR ? mi->in_channels
                 : mi->regression             ? mi->in_channels
                                              : mi->cond_channels;
  if (r->image && !(image = replicate(r->image, r->images, (size_t)ci * plane, r->batch, e)))
    return e->code;
  if (r->mask && !(mask = replicate(r->mask, r->images, plane, r->batch, e))) {
    free(image);
    return e->code;
  }
  if (!(out->images = mem_calloc(d * (size_t)r->batch, sizeof *out->images))) {
    rc = err_set(e, ERR_NOMEM, "out of memory for %d images", r->batch);
    goto done;
  }
  run_ctx c = {.m = m,
               .r = r,
               .h = h,
               .x = out->images,
               .height = out->height,
               .width = out->width,
               .g = r->guidance,
               .src_g = r->invert.source_guidance,
               .factor = 1};
  if (lp) {
    rc = run_latent(&c, image, mask, out, e);
    goto done;
  }
  switch (r->kind) {
  case PIPELINE_GENERATE: rc = run_generate(&c, image, mask, out, e); break;
  case PIPELINE_INVERT_DDIM:
  case PIPELINE_INVERT_DDPM:
    rc = !image && !r->noise
             ? err_set(e, ERR_INVALID, "an inversion needs an input image or its noise")
             : run_inversion(&c, image, out->images, out, e);
    break;
  case PIPELINE_BOUNDARY: rc = run_boundary(&c, image, out->images, out, e); break;
  case PIPELINE_DEBLUR: rc = run_deblur(&c, image, out, e); break;
  default: rc = err_set(e, ERR_INVALID, "unknown job kind %d", (int)r->kind);
  }
done:
  free(image);
  free(mask);
  if (rc && rc != ERR_CANCELLED)
    pipeline_result_clear(out);
  return rc;
}
