/* DDIM inversion and the edit-friendly DDPM noise space (inbarhub/DDPM_inversion,
 * ddm_inversion/inversion_utils.py, re-derived): the x_t of the grid are drawn independently
 * from q(x_t | x0), z_t solved from consecutive ones through the sampler's own DDIM step, and
 * sampling with those z_t walks the same chain. Deviation from the authors' code, on purpose:
 * the last map is kept (they zero it), which is what makes reconstruction exact. */
#include "invert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "rng.h"

/* The evaluation context shared by both inversions. */
typedef struct inv_ctx {
  const model *m;
  const invert_opts *o;
  int h, w;
  size_t d;
  float *tv;
  float *states; /* o->text_states repeated for every image, or NULL */
} inv_ctx;

static void inv_ctx_clear(inv_ctx *c) {
  free(c->tv);
  free(c->states);
}

static int inv_setup(const sampler *s, const model *m, const invert_opts *o, inv_ctx *c, err *e) {
  const model_info *mi = model_get_info(m);
  if (strcmp(sampler_config(s)->scheduler, "DDIMScheduler") != 0)
    return err_set(e, ERR_INVALID, "inversion runs on DDIM's grid; '%s' is not DDIM",
                   sampler_name(s));
  if (o->batch < 1)
    return err_set(e, ERR_INVALID, "inversion: batch %d must be positive", o->batch);
  c->m = m;
  c->o = o;
  c->h = o->height ? o->height : mi->sample_size;
  c->w = o->width ? o->width : mi->sample_size;
  if (c->h < 1 || c->w < 1)
    return err_set(e, ERR_INVALID, "inversion: image size %dx%d", c->h, c->w);
  if (mi->out_channels != mi->in_channels)
    return err_set(e, ERR_UNSUPPORTED,
                   "inversion needs a model predicting as many channels as it reads (%d vs %d)",
                   mi->out_channels, mi->in_channels);
  if (mi->num_classes && !o->labels)
    return err_set(e, ERR_INVALID, "this model is class-conditional: the inversion needs labels");
  if (!mi->cross_attention_dim != !o->text_states || (o->text_states && o->text_seq < 1))
    return err_set(e, ERR_INVALID,
                   mi->cross_attention_dim
                       ? "this model is text-conditional: the inversion needs a prompt's states"
                       : "this model takes no text: the inversion takes no prompt");
  int rc = guidance_check(o->guidance, m, e);
  if (rc != ERR_OK)
    return rc;
  if (o->guidance && o->guidance->enabled && !o->labels && !o->text_states)
    return err_set(e, ERR_INVALID, "guidance_scale: classifier-free guidance needs class labels");
  c->d = (size_t)mi->in_channels * c->h * c->w;
  c->tv = malloc((size_t)o->batch * sizeof *c->tv);
  c->states = NULL;
  const size_t per = (size_t)o->text_seq * mi->cross_attention_dim;
  if (o->text_states && (c->states = malloc((size_t)o->batch * per * sizeof *c->states)))
    for (int b = 0; b < o->batch; b++)
      memcpy(c->states + (size_t)b * per, o->text_states, per * sizeof *c->states);
  if (!c->tv || (o->text_states && !c->states)) {
    inv_ctx_clear(c);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  return ERR_OK;
}

static int inv_eval(inv_ctx *c, const float *x, double t, float *out, int *nfe, int step, int total,
                    err *e) {
  const invert_opts *o = c->o;
  if (o->cancel && atomic_load(o->cancel))
    return err_set(e, ERR_CANCELLED, "cancelled in inversion step %d of %d", step + 1, total);
  for (int b = 0; b < o->batch; b++)
    c->tv[b] = (float)t;
  /* a run stops when it goes non-finite, saying where (as sampler_run does) */
  if (!isfinite(t) || !ops_all_finite(x, (size_t)o->batch * c->d))
    return err_set(e, ERR_NUMERIC, "non-finite values in the %s at inversion step %d of %d (t=%g)",
                   !isfinite(t) ? "timesteps" : "inverted state", step + 1, total, t);
  const model_call mc = {.x = x,
                         .n = o->batch,
                         .h = c->h,
                         .w = c->w,
                         .t = c->tv,
                         .labels = o->labels,
                         .encoder_hidden_states = c->states,
                         .seq_len = c->states ? o->text_seq : 0,
                         .threads = o->threads > 0 ? o->threads : 1};
  int rc = guidance_eval(o->guidance, c->m, &mc, out, e);
  if (rc == ERR_NUMERIC)
    return err_append(e, " at inversion step %d of %d (t=%g)", step + 1, total, t);
  if (rc != ERR_OK)
    return err_prefix(e, "inversion step %d (t=%g)", step + 1, t);
  (*nfe)++;
  if (o->progress)
    o->progress(step + 1, total, *nfe, o->progress_user);
  return ERR_OK;
}

/* ---- DDIM inversion (DDIMInverseScheduler.step) ---- */

int invert_ddim(const sampler *s, const model *m, const invert_opts *o, const float *x0,
                int stop_step, float *out, int *nfe, err *e) {
  int dummy = 0;
  nfe = nfe ? nfe : &dummy;
  *nfe = 0;
  const int n = sampler_num_steps(s);
  if (stop_step < 0 || stop_step >= n)
    return err_set(e, ERR_INVALID, "inversion: stop step %d outside [0, %d)", stop_step, n);
  inv_ctx c;
  int rc = inv_setup(s, m, o, &c, e);
  if (rc != ERR_OK)
    return rc;
  const sched_config *cfg = sampler_config(s);
  const float *abar = sampler_alphas_cumprod(s);
  const double *ts = sampler_timesteps(s);
  const int T = sampler_train_timesteps(s), ratio = T / n;
  const float initial = cfg->set_alpha_to_one ? 1.0f : abar[0];
  const size_t nd = (size_t)o->batch * c.d;
  float *mo = malloc(nd * sizeof *mo);
  if (!mo) {
    inv_ctx_clear(&c);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  memcpy(out, x0, nd * sizeof *out);
  for (int k = n - 1; k >= stop_step && rc == ERR_OK; k--) {
    const int t_next = (int)ts[k], t_cur = t_next - ratio;
    if ((rc = inv_eval(&c, out, ts[k], mo, nfe, n - 1 - k, n - stop_step, e)) != ERR_OK)
      break;
    const float a_t = t_cur >= 0 ? abar[t_cur] : initial, a_n = abar[t_next];
    const float sa = sqrtf(a_t), sb = sqrtf(1.0f - a_t);
    const float sn = sqrtf(a_n), sbn = sqrtf(1.0f - a_n);
    for (size_t i = 0; i < nd; i++) {
      float x0p, pe;
      switch (cfg->prediction_type) {
      case SCHED_PRED_EPSILON:
        x0p = (out[i] - sb * mo[i]) / sa;
        pe = mo[i];
        break;
      case SCHED_PRED_SAMPLE:
        x0p = mo[i];
        pe = (out[i] - sa * x0p) / sb;
        break;
      default: /* v */
        x0p = sa * out[i] - sb * mo[i];
        pe = sa * mo[i] + sb * out[i];
        break;
      }
      out[i] = sn * x0p + sbn * pe;
    }
  }
  if (rc == ERR_OK && !ops_all_finite(out, nd))
    rc = err_set(e, ERR_NUMERIC, "non-finite values in the inverted state after inversion step %d",
                 n - stop_step);
  free(mo);
  inv_ctx_clear(&c);
  return rc;
}

/* ---- edit-friendly DDPM inversion ---- */

int invert_ddpm_sampler(const json_t *model_config, const json_t *config, int steps, sampler **out,
                        err *e) {
  json_t *spec = json_pack("{s:s, s:{s:f, s:b, s:b, s:b}}", "name", "ddim", "options", "eta", 1.0,
                           "set_alpha_to_one", 0, "clip_sample", 0, "thresholding", 0);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  if (steps)
    json_object_set_new(spec, "steps", json_integer(steps));
  if (config)
    json_object_set(spec, "config", (json_t *)config);
  int rc = sampler_new_from_json(spec, model_config, out, e);
  json_decref(spec);
  return rc;
}

/* x_t of step k drawn from q(x_t | x0) with its own noise stream, for every image */
static void draw_xt(const sampler *s, const invert_opts *o, const float *x0, size_t d, int k,
                    float *out) {
  float a, b;
  sampler_step_level(s, k, &a, &b);
  for (int i = 0; i < o->batch; i++) {
    float *xb = out + (size_t)i * d;
    rng_normal(o->seed, o->first_image + (uint64_t)i, INVERT_STREAM + (uint64_t)k, xb, d);
    for (size_t q = 0; q < d; q++)
      xb[q] = a * x0[(size_t)i * d + q] + b * xb[q];
  }
}

int invert_ddpm(const sampler *s, const model *m, const invert_opts *o, const float *x0,
                float *maps, int *nfe, err *e) {
  int dummy = 0;
  nfe = nfe ? nfe : &dummy;
  *nfe = 0;
  inv_ctx c;
  int rc = inv_setup(s, m, o, &c, e);
  if (rc != ERR_OK)
    return rc;
  const int n = sampler_num_steps(s);
  const size_t d = c.d, nd = (size_t)o->batch * d, per = (size_t)(n + 1) * d;
  float *cur = malloc(nd * sizeof *cur), *nxt = malloc(nd * sizeof *nxt);
  float *mo = malloc(nd * sizeof *mo), *mean = malloc(d * sizeof *mean);
  float *scratch = malloc(3 * d * sizeof *scratch);
  if (!cur || !nxt || !mo || !mean || !scratch) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  /* The chain ends on x0. A grid whose last timestep is 0 ending at alpha_bar[0] (leading or
   * linspace spacing, set_alpha_to_one false) makes the last step the identity without noise:
   * then x0 is the input of that step and its map is 0. Any other noiseless step could not be
   * steered, so it is an error. */
  const double *ts = sampler_timesteps(s);
  const sched_config *cfg = sampler_config(s);
  const int last_identity = ts[n - 1] == 0 && !cfg->set_alpha_to_one;
  const int n_noisy = last_identity ? n - 1 : n;
  if (last_identity && (cfg->clip_sample || cfg->thresholding)) {
    rc = err_set(e, ERR_INVALID,
                 "the last step (t = 0) adds no noise and %s x0, so it cannot return the image: "
                 "set clip_sample and thresholding false (invert_ddpm_sampler does)",
                 cfg->clip_sample ? "clips" : "thresholds");
    goto done;
  }
  if (n_noisy == 0)
    memcpy(cur, x0, nd * sizeof *cur);
  else
    draw_xt(s, o, x0, d, 0, cur);
  for (int i = 0; i < o->batch; i++)
    memcpy(maps + (size_t)i * per, cur + (size_t)i * d, d * sizeof *maps);
  for (int k = 0; k < n && rc == ERR_OK; k++) {
    if ((rc = inv_eval(&c, cur, ts[k], mo, nfe, k, n, e)) != ERR_OK)
      break;
    if (k + 1 < n_noisy)
      draw_xt(s, o, x0, d, k + 1, nxt);
    else
      memcpy(nxt, x0, nd * sizeof *nxt);
    for (int i = 0; i < o->batch && rc == ERR_OK; i++) {
      float std, *xn = nxt + (size_t)i * d, *z = maps + (size_t)i * per + (size_t)(k + 1) * d;
      rc = sampler_ddim_split(s, k, cur + (size_t)i * d, mo + (size_t)i * d, d, mean, &std, scratch,
                              e);
      if (rc != ERR_OK)
        break;
      if (k >= n_noisy) { /* the identity: x0 in, x0 out to rounding */
        memset(z, 0, d * sizeof *z);
        memcpy(xn, mean, d * sizeof *xn);
        continue;
      }
      if (!(std > 0)) {
        rc = err_set(e, ERR_INVALID,
                     "step %d of %s adds no noise (eta 0, or set_alpha_to_one true): "
                     "edit-friendly inversion needs noise at every step but a last one from "
                     "t = 0",
                     k + 1, sampler_name(s));
        break;
      }
      for (size_t q = 0; q < d; q++) {
        z[q] = (xn[q] - mean[q]) / std;
        xn[q] = mean[q] + std * z[q]; /* what the sampler will compute from z */
      }
    }
    float *t = cur;
    cur = nxt;
    nxt = t;
  }
  /* a map z = (x_prev - mean) / std overflows when std is tiny against the gap */
  for (int i = 0; i < o->batch && rc == ERR_OK; i++)
    for (int k = 0; k <= n && rc == ERR_OK; k++)
      if (!ops_all_finite(maps + (size_t)i * per + (size_t)k * d, d))
        rc = err_set(e, ERR_NUMERIC,
                     "non-finite values in the noise map of inversion step %d of %d (image %d)", k,
                     n, i);
done:
  free(cur);
  free(nxt);
  free(mo);
  free(mean);
  free(scratch);
  inv_ctx_clear(&c);
  return rc;
}

/* ---- sampling with noise maps ---- */

typedef struct maps_src {
  const float *maps;
  int batch, n;
  size_t d;
} maps_src;

static int noise_from_maps(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                           err *e) {
  const maps_src *ms = user;
  if (image >= (uint64_t)ms->batch || stream < 1 || stream > (uint64_t)ms->n || n != ms->d)
    return err_set(e, ERR_INVALID, "no noise map for image %llu, step %llu",
                   (unsigned long long)image, (unsigned long long)stream);
  memcpy(out, ms->maps + ((size_t)image * (ms->n + 1) + stream) * ms->d, n * sizeof *out);
  return ERR_OK;
}

int invert_ddpm_sample(const sampler *s, const model *m, const invert_opts *o,
                       const invert_sample_opts *so, const float *maps, float *out, int *nfe,
                       err *e) {
  int dummy = 0;
  nfe = nfe ? nfe : &dummy;
  *nfe = 0;
  const model_info *mi = model_get_info(m);
  const int n = sampler_num_steps(s), skip = so ? so->skip : 0;
  const int h = o->height ? o->height : mi->sample_size, w = o->width ? o->width : mi->sample_size;
  if (strcmp(sampler_config(s)->scheduler, "DDIMScheduler") != 0 || !(sampler_config(s)->eta > 0))
    return err_set(e, ERR_INVALID, "noise maps are sampled with DDIM at eta > 0, not %s",
                   sampler_name(s));
  if (skip < 0 || skip >= n)
    return err_set(e, ERR_INVALID, "skip %d must be in [0, %d)", skip, n);
  if (o->batch < 1 || h < 1 || w < 1)
    return err_set(e, ERR_INVALID, "batch %d, size %dx%d", o->batch, h, w);
  const size_t d = (size_t)mi->in_channels * h * w, nd = (size_t)o->batch * d;
  maps_src ms = {maps, o->batch, n, d};
  float *x = malloc(nd * sizeof *x);
  if (!x)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < o->batch; i++)
    memcpy(x + (size_t)i * d, maps + (size_t)i * (n + 1) * d, d * sizeof *x);
  sampler_run_opts r = {.batch = o->batch,
                        .height = h,
                        .width = w,
                        .init_noise = x,
                        .progress = o->progress,
                        .progress_user = o->progress_user,
                        .noise = noise_from_maps,
                        .noise_user = &ms,
                        .cancel = o->cancel,
                        .threads = o->threads,
                        .text_seq = o->text_seq};
  int rc = ERR_OK, part = 0;
  if (skip > 0) {
    r.labels = so->src_labels;
    r.guidance = so->src_guidance;
    r.text_states = so->src_text_states;
    r.end_step = skip;
    rc = sampler_run(s, m, &r, out, &part, e);
    *nfe += part;
    if (rc == ERR_OK)
      memcpy(x, out, nd * sizeof *x);
    r.end_step = 0;
    r.start_step = skip;
  }
  if (rc == ERR_OK) {
    r.labels = o->labels;
    r.guidance = o->guidance;
    r.text_states = o->text_states;
    rc = sampler_run(s, m, &r, out, &part, e);
    *nfe += part;
  }
  free(x);
  return rc;
}

/* ---- edits of the maps ---- */

void invert_maps_shift(float *maps, int batch, int nmaps, int c, int h, int w, int dx, int dy) {
  const size_t plane = (size_t)h * w;
  float *tmp = malloc(plane * sizeof *tmp);
  if (!tmp)
    return;
  dx = ((dx % w) + w) % w;
  dy = ((dy % h) + h) % h;
  for (size_t p = 0; p < (size_t)batch * nmaps * c; p++) {
    float *pl = maps + p * plane;
    for (int y = 0; y < h; y++)
      for (int x = 0; x < w; x++)
        tmp[(size_t)((y + dy) % h) * w + (x + dx) % w] = pl[(size_t)y * w + x];
    memcpy(pl, tmp, plane * sizeof *pl);
  }
  free(tmp);
}

int invert_maps_colour(const sampler *s, float *maps, int batch, int c, int h, int w,
                       const float *delta, int from, err *e) {
  const int n = sampler_num_steps(s);
  if (from < 0 || from >= n)
    return err_set(e, ERR_INVALID, "colour edit: first step %d outside [0, %d)", from, n);
  const size_t plane = (size_t)h * w, d = (size_t)c * plane;
  float *std = malloc((size_t)n * sizeof *std);
  if (!std)
    return err_set(e, ERR_NOMEM, "out of memory");
  int noisy = 0;
  for (int k = from; k < n; k++) {
    float x = 0, mo = 0, mean, scratch[3];
    int rc = sampler_ddim_split(s, k, &x, &mo, 1, &mean, &std[k], scratch, e);
    if (rc != ERR_OK) {
      free(std);
      return rc;
    }
    noisy += std[k] > 0;
  }
  if (!noisy) {
    free(std);
    return err_set(e, ERR_INVALID, "colour edit: no step from %d on adds noise", from);
  }
  for (int k = from; k < n; k++) {
    if (!(std[k] > 0)) /* a noiseless step ignores its map */
      continue;
    for (int b = 0; b < batch; b++)
      for (int ch = 0; ch < c; ch++) {
        float *z = maps + ((size_t)b * (n + 1) + (size_t)(k + 1)) * d + (size_t)ch * plane;
        const float add = delta[ch] / ((float)noisy * std[k]);
        for (size_t q = 0; q < plane; q++)
          z[q] += add;
      }
  }
  free(std);
  return ERR_OK;
}

int invert_edit_sample(const sampler *s, const model *m, const invert_opts *o,
                       const invert_sample_opts *so, const invert_edit *ed, float *maps, float *out,
                       int *nfe, err *e) {
  const model_info *mi = model_get_info(m);
  const int c = mi->in_channels, n = sampler_num_steps(s);
  const int h = o->height ? o->height : mi->sample_size, w = o->width ? o->width : mi->sample_size;
  if (!ed->ddpm && (so->skip || ed->has_colour))
    return err_set(e, ERR_INVALID, "skip and colour edits need ddpm noise maps, not a DDIM x_T");
  if (so->skip < 0 || so->skip >= n)
    return err_set(e, ERR_INVALID, "skip %d: the maps have %d steps", so->skip, n);
  if (ed->dx || ed->dy)
    invert_maps_shift(maps, o->batch, ed->ddpm ? n + 1 : 1, c, h, w, ed->dx, ed->dy);
  if (ed->has_colour) {
    float delta[3] = {ed->colour[0], ed->colour[1], ed->colour[2]};
    if (c != 3 && c != 1)
      return err_set(e, ERR_INVALID, "colour edits need a 1- or 3-channel model, not %d", c);
    if (c == 1) /* gray: the luma of the offset */
      delta[0] = 0.299f * delta[0] + 0.587f * delta[1] + 0.114f * delta[2];
    const int from = ed->colour_from >= 0 ? ed->colour_from : n - (n + 3) / 4;
    int rc = invert_maps_colour(s, maps, o->batch, c, h, w, delta, from, e);
    if (rc)
      return rc;
  }
  if (ed->ddpm)
    return invert_ddpm_sample(s, m, o, so, maps, out, nfe, e);
  sampler_run_opts r = {.batch = o->batch,
                        .height = o->height,
                        .width = o->width,
                        .init_noise = maps,
                        .labels = o->labels,
                        .guidance = o->guidance,
                        .text_states = o->text_states,
                        .text_seq = o->text_seq,
                        .progress = o->progress,
                        .progress_user = o->progress_user,
                        .cancel = o->cancel,
                        .threads = o->threads};
  return sampler_run(s, m, &r, out, nfe, e);
}
