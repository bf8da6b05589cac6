/* The AutoencoderKL training step (vae_train.h): one encoder backward whose upstream gradient
 * comes from a callback that samples the latents, runs the decoder's backward on them with the
 * reconstruction loss, and adds the KL term, so each network runs forward and backward once. */
#include "vae_train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "rng.h"

/* Generator stream of the posterior noise (image = step * batch + i), the same addressing as
 * the diffusion trainer's streams (train.c). */
#define STREAM_POSTERIOR 0x76746e01u

struct vae_trainer {
  vae *v;
  vae_train_config c;
  int np;
  size_t *counts;
  float **params, **grads;
  adamw *opt;
  long steps;
};

void vae_trainer_free(vae_trainer *t) {
  if (!t)
    return;
  for (int i = 0; t->grads && i < t->np; i++)
    free(t->grads[i]);
  free(t->grads);
  free(t->params);
  free(t->counts);
  adamw_free(t->opt);
  free(t);
}

static int check_config(const vae_train_config *c, err *e) {
  if (c->recon != VAE_RECON_L1 && c->recon != VAE_RECON_MSE)
    return err_set(e, ERR_INVALID, "unknown reconstruction loss");
  if (!(c->kl_weight >= 0) || !isfinite(c->kl_weight))
    return err_set(e, ERR_INVALID, "the KL weight must be >= 0");
  if (c->threads < 1)
    return err_set(e, ERR_INVALID, "threads must be >= 1");
  return train_check_schedule(c->clip_norm, c->lr_kind, c->lr, c->warmup, c->total_steps, e);
}

int vae_trainer_new(vae *v, const vae_train_config *c, vae_trainer **out, err *e) {
  *out = NULL;
  int rc = check_config(c, e);
  if (rc)
    return rc;
  vae_trainer *t = mem_calloc(1, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  t->v = v;
  t->c = *c;
  t->np = vae_param_count(v);
  t->counts = mem_calloc((size_t)t->np + 1, sizeof *t->counts);
  t->params = mem_calloc((size_t)t->np + 1, sizeof *t->params);
  t->grads = mem_calloc((size_t)t->np + 1, sizeof *t->grads);
  int ok = t->counts && t->params && t->grads;
  for (int i = 0; ok && i < t->np; i++) {
    const model_param *mp = vae_param_at(v, i);
    t->counts[i] = mp->count;
    t->params[i] = mp->data;
    ok = (t->grads[i] = mem_calloc(mp->count, sizeof(float))) != NULL;
  }
  if (!ok)
    rc = err_set(e, ERR_NOMEM, "out of memory for the VAE's gradients");
  else
    rc = adamw_new(&c->adamw, t->np, t->counts, &t->opt, e);
  if (rc) {
    vae_trainer_free(t);
    return rc;
  }
  *out = t;
  return ERR_OK;
}

long vae_trainer_steps(const vae_trainer *t) {
  return t->steps;
}

/* What the encoder's loss callback needs and what it reports. */
typedef struct step_ctx {
  vae_trainer *t;
  const float *x;
  int n, h, w, lh, lw;
  float *z, *noise, *dz;
  double rec_sum, kl_sum;
} step_ctx;

/* The decoder's upstream gradient: d/d x_rec of the reconstruction term, summed over the
 * batch and divided by n. */
static int rec_grad(const float *out, float *g, void *user, err *e) {
  (void)e;
  step_ctx *s = user;
  const vae_info *vi = vae_get_info(s->t->v);
  const size_t count = (size_t)s->n * vi->out_channels * s->h * s->w;
  const float inv_n = 1.0f / (float)s->n;
  double sum = 0;
  for (size_t i = 0; i < count; i++) {
    const float d = out[i] - s->x[i];
    if (s->t->c.recon == VAE_RECON_L1) {
      sum += fabsf(d);
      g[i] = d > 0 ? inv_n : d < 0 ? -inv_n : 0.0f;
    } else {
      sum += (double)d * d;
      g[i] = 2.0f * d * inv_n;
    }
  }
  s->rec_sum = sum;
  return ERR_OK;
}

/* The encoder's upstream gradient from the moments (mean, clamped logvar): sample z, run the
 * decoder's backward on it, then chain dL/dz through z = mean + exp(logvar / 2) noise and add
 * the KL term's gradient. */
static int moments_grad(const float *mom, float *g, void *user, err *e) {
  step_ctx *s = user;
  vae_trainer *t = s->t;
  const vae_info *vi = vae_get_info(t->v);
  const size_t per = (size_t)vi->latent_channels * s->lh * s->lw;
  const uint64_t first = (uint64_t)t->steps * (uint64_t)s->n;
  for (int i = 0; i < s->n; i++) {
    rng_normal(t->c.seed, first + (uint64_t)i, STREAM_POSTERIOR, s->noise + per * i, per);
    for (size_t k = 0; k < per; k++) {
      const float m = mom[2 * per * i + k], lv = mom[2 * per * i + per + k];
      s->z[per * i + k] = m + expf(0.5f * lv) * s->noise[per * i + k];
    }
  }
  vae_grad_call dg = {.loss_grad = rec_grad,
                      .loss_user = s,
                      .grad_in = s->dz,
                      .params = t->grads,
                      .threads = t->c.threads};
  int rc = vae_decode_backward(t->v, s->z, s->n, s->lh, s->lw, &dg, e);
  if (rc)
    return rc;
  const float kw = (float)(t->c.kl_weight / s->n);
  double kl = 0;
  for (int i = 0; i < s->n; i++)
    for (size_t k = 0; k < per; k++) {
      const float m = mom[2 * per * i + k], lv = mom[2 * per * i + per + k];
      const float sd = expf(0.5f * lv), var = sd * sd, dz = s->dz[per * i + k];
      kl += 0.5 * ((double)m * m + var - 1.0 - lv);
      g[2 * per * i + k] = dz + kw * m;
      g[2 * per * i + per + k] = dz * s->noise[per * i + k] * 0.5f * sd + kw * 0.5f * (var - 1.0f);
    }
  s->kl_sum = kl;
  return ERR_OK;
}

int vae_trainer_step(vae_trainer *t, const float *x, int n, int h, int w, vae_step_info *info,
                     err *e) {
  const vae_info *vi = vae_get_info(t->v);
  if (n < 1 || h < vi->factor || w < vi->factor || h % vi->factor || w % vi->factor)
    return err_set(e, ERR_INVALID, "VAE training step: %d images of %dx%d (sides multiples of %d)",
                   n, h, w, vi->factor);
  step_ctx s = {.t = t, .x = x, .n = n, .h = h, .w = w, .lh = h / vi->factor, .lw = w / vi->factor};
  const size_t lat = (size_t)n * vi->latent_channels * s.lh * s.lw;
  s.z = mem_malloc(lat * sizeof(float));
  s.noise = mem_malloc(lat * sizeof(float));
  s.dz = mem_malloc(lat * sizeof(float));
  int rc = s.z && s.noise && s.dz ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; !rc && i < t->np; i++)
    memset(t->grads[i], 0, t->counts[i] * sizeof(float));
  vae_grad_call eg = {
      .loss_grad = moments_grad, .loss_user = &s, .params = t->grads, .threads = t->c.threads};
  if (!rc && (rc = vae_encode_backward(t->v, x, n, h, w, &eg, e)))
    err_append(e, " at training step %ld", t->steps + 1);
  double norm = 0, lr = 0;
  if (!rc) {
    norm = optim_clip_grad_norm(t->np, t->counts, t->grads, t->c.clip_norm);
    if (!isfinite(norm))
      rc = err_set(e, ERR_NUMERIC, "the gradient is not finite at training step %ld", t->steps + 1);
  }
  if (!rc) {
    lr = train_lr_at(t->c.lr_kind, t->c.lr, t->c.warmup, t->c.total_steps, t->steps);
    (void)((rc = adamw_step(t->opt, t->params, (const float *const *)t->grads, lr, e)) ||
           (rc = vae_repack(t->v, e)));
  }
  if (!rc) {
    t->steps++;
    const size_t px = (size_t)n * vi->out_channels * h * w;
    if (info)
      *info = (vae_step_info){.loss = (s.rec_sum + t->c.kl_weight * s.kl_sum) / n,
                              .rec = s.rec_sum / (double)px,
                              .kl = s.kl_sum / n,
                              .grad_norm = norm,
                              .lr = lr};
  }
  free(s.z), free(s.noise), free(s.dz);
  return rc;
}

int vae_latent_std(const vae *v, const float *x, int n, int h, int w, uint64_t seed, int threads,
                   double *std, err *e) {
  const vae_info *vi = vae_get_info(v);
  const size_t count = (size_t)n * vi->latent_channels * (h / vi->factor) * (w / vi->factor);
  float *mean = mem_malloc(count * sizeof(float)), *sd = mem_malloc(count * sizeof(float));
  int rc = mean && sd ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (!rc && n > 0 && (rc = vae_encode(v, x, n, h, w, mean, sd, threads, e)) == ERR_OK) {
    vae_sample(mean, sd, n, count / (size_t)n, seed, mean);
    double sum = 0, sq = 0;
    for (size_t k = 0; k < count; k++) {
      sum += mean[k];
      sq += (double)mean[k] * mean[k];
    }
    const double mu = sum / (double)count;
    /* torch.std: the unbiased estimate */
    *std = sqrt((sq - (double)count * mu * mu) / (count > 1 ? (double)count - 1 : 1.0));
  }
  free(mean), free(sd);
  return rc;
}
