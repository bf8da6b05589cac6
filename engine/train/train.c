/* The training step (train.h): the noising, target and loss weights in diffusers' float32
 * arithmetic, the loss's gradient fed to model_backward as the network's upstream gradient,
 * then clipping, AdamW, the repack of the model and the EMA. */
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "clip_grad.h"
#include "mem.h"
#include "pool.h"
#include "rng.h"

/* Generator streams (rng.h) of the random draws; image = the global index of the sample
 * (step * batch + i), or the epoch for the data order. Uniform and normal draws at one address
 * share raw words, hence a stream each. */
#define STREAM_TIMESTEP 0x74726e01u
#define STREAM_NOISE 0x74726e02u
#define STREAM_DROPOUT 0x74726e03u
#define STREAM_ORDER 0x74726e04u
#define STREAM_PAIRS 0x74726e05u

struct trainer {
  model *m;
  train_config c;
  train_text text; /* c.text's copy (c.text points here) */
  int T;           /* num_train_timesteps */
  float *ac;       /* alphas_cumprod [T] */
  int np;          /* tensors trained: the model's, then a trained text encoder's */
  int nmodel;      /* model_param_count */
  train_tensor *tensors;
  size_t *counts; /* per tensor */
  float **params; /* their data pointers */
  float **ema;    /* shadow weights, or NULL */
  float **gp;     /* gradient buffers */
  model_grads *grads;
  float *text_grad;  /* the trained text encoder's gradient, laid out as its weight block */
  pool *text_pool;   /* the text encoder's threads */
  int64_t *ids;      /* a batch's captions after dropout */
  float *ehs, *gehs; /* their hidden states and the UNet's gradient for them */
  adamw *opt;
  long steps;
  /* per-batch scratch, grown as needed: cap values per buffer, cap_n images per per-image one */
  size_t cap, cap_n;
  float *noisy, *target, *tf, *w;
  int64_t *lab;
  float *noise_buf;
  int64_t *ts_buf;
  /* DomainStudio: the source model's output and each image's x0 coefficients */
  float *out_sou;
  double *cx, *co;
};

static const char *const lr_names[] = {"constant", "constant_with_warmup", "cosine"};

int train_lr_kind_from_name(const char *name) {
  for (int i = 0; i < 3; i++)
    if (strcmp(name, lr_names[i]) == 0)
      return i;
  return -1;
}

const char *train_lr_kind_name(train_lr_kind k) {
  return (unsigned)k < 3 ? lr_names[k] : "?";
}

double train_lr_at(train_lr_kind k, double lr, long warmup, long total, long step) {
  if (k == TRAIN_LR_CONSTANT)
    return lr;
  if (step < warmup)
    return lr * (double)step / (double)(warmup > 1 ? warmup : 1);
  if (k == TRAIN_LR_CONSTANT_WARMUP)
    return lr;
  long span = total - warmup > 1 ? total - warmup : 1;
  double progress = (double)(step - warmup) / (double)span;
  double f = 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress)); /* num_cycles 0.5 */
  return lr * (f > 0 ? f : 0);
}

int train_check_schedule(double clip_norm, train_lr_kind k, double lr, long warmup, long total,
                         err *e) {
  if (!(clip_norm >= 0) || !isfinite(clip_norm))
    return err_set(e, ERR_INVALID, "gradient clipping norm must be >= 0 (0: off)");
  if ((unsigned)k > TRAIN_LR_COSINE)
    return err_set(e, ERR_INVALID, "unknown learning-rate schedule");
  if (!(lr >= 0) || !isfinite(lr) || warmup < 0 || total < 1)
    return err_set(e, ERR_INVALID, "learning rate, warm-up and steps must be >= 0, >= 0, >= 1");
  return ERR_OK;
}

void trainer_free(trainer *t) {
  if (!t)
    return;
  for (int i = 0; t->ema && i < t->np; i++)
    free(t->ema[i]);
  free(t->ema);
  free(t->counts);
  free(t->params);
  free(t->gp);
  for (int i = t->nmodel; t->tensors && i < t->np; i++)
    free((char *)t->tensors[i].name);
  free(t->tensors);
  free(t->text_grad);
  pool_free(t->text_pool);
  free(t->ids), free(t->ehs), free(t->gehs);
  free(t->ac);
  model_grads_free(t->grads);
  adamw_free(t->opt);
  free(t->noisy), free(t->target), free(t->tf), free(t->w), free(t->lab);
  free(t->noise_buf), free(t->ts_buf);
  free(t->out_sou), free(t->cx), free(t->co);
  free(t);
}

/* The text conditioning fits the model: a text encoder exactly for a text-conditional UNet, of
 * its cross-attention width, with a valid dropout and caption length. */
static int check_text(const model_info *mi, const train_config *c, err *e) {
  const train_text *x = c->text;
  if (!mi->cross_attention_dim != !x)
    return err_set(e, ERR_INVALID,
                   x ? "a text encoder was given for a model without text conditioning"
                     : "the model is text-conditional: training needs a text encoder and "
                       "captions");
  if (!x)
    return ERR_OK;
  const clip_text_config *tc = x->encoder ? clip_text_config_of(x->encoder) : NULL;
  if (!tc || !x->empty_ids)
    return err_set(e, ERR_INVALID, "text conditioning without a text encoder or empty caption");
  if (tc->hidden_size != mi->cross_attention_dim)
    return err_set(e, ERR_INVALID,
                   "the text encoder's hidden_size %d is not the UNet's cross_attention_dim %d",
                   tc->hidden_size, mi->cross_attention_dim);
  if (x->len < 1 || x->len > tc->max_positions)
    return err_set(e, ERR_INVALID, "captions of %d tokens: the text encoder takes 1 to %d", x->len,
                   tc->max_positions);
  if (x->clip_skip < 1 || x->clip_skip > tc->layers)
    return err_set(e, ERR_INVALID, "clip skip %d: the text encoder has %d layers", x->clip_skip,
                   tc->layers);
  if (!(x->dropout >= 0 && x->dropout <= 1))
    return err_set(e, ERR_INVALID, "caption dropout must be in [0, 1]");
  if (c->regression || c->source)
    return err_set(e, ERR_UNSUPPORTED,
                   "text conditioning trains a denoiser: not with regression or DomainStudio");
  return ERR_OK;
}

static int check_config(const model_info *mi, const train_config *c, err *e) {
  if (mi->kind != MODEL_UNET2D && mi->kind != MODEL_UNET2D_CONDITION)
    return err_set(e, ERR_UNSUPPORTED,
                   "only a UNet2DModel or a UNet2DConditionModel can be trained");
  int rc = check_text(mi, c, e);
  if (rc)
    return rc;
  if (mi->out_channels != mi->in_channels)
    return err_set(e, ERR_UNSUPPORTED,
                   "the model predicts %d channels of %d-channel images (learned variance is "
                   "not trained here)",
                   mi->out_channels, mi->in_channels);
  if (c->regression && mi->cond_channels)
    return err_set(e, ERR_INVALID,
                   "a regression model reads the degraded image as its input: give it a config "
                   "without _cond_channels");
  if (!(c->min_snr_gamma >= 0) || !isfinite(c->min_snr_gamma))
    return err_set(e, ERR_INVALID, "min-SNR gamma must be >= 0 (0: off)");
  if (!(c->null_dropout >= 0 && c->null_dropout <= 1))
    return err_set(e, ERR_INVALID, "null-class dropout must be in [0, 1]");
  if (c->null_dropout > 0 &&
      (mi->num_classes == 0 || c->null_class < 0 || c->null_class >= mi->num_classes))
    return err_set(e, ERR_INVALID, "null-class dropout needs a class-conditional model");
  if ((rc = train_check_schedule(c->clip_norm, c->lr_kind, c->lr, c->warmup, c->total_steps, e)))
    return rc;
  if (c->use_ema && !(c->ema.decay >= 0 && c->ema.decay <= 1))
    return err_set(e, ERR_INVALID, "EMA decay must be in [0, 1]");
  if (!(c->guide_weight >= 0) || !isfinite(c->guide_weight))
    return err_set(e, ERR_INVALID, "the structure-guidance loss weight must be >= 0");
  if (c->guide_weight > 0 && !mi->guide_scales)
    return err_set(e, ERR_INVALID,
                   "a structure-guidance loss weight for a model without structure guidance "
                   "(config key _guide_scales)");
  return ERR_OK;
}

/* DomainStudio's source: the same network as the model trained (every tensor's name and
 * shape), and a loss the method defines. */
static int check_source(const model *m, const train_config *c, err *e) {
  const model *s = c->source;
  const dstudio_weights *w = &c->dstudio;
  if (c->regression || model_get_info(m)->cond_channels)
    return err_set(e, ERR_UNSUPPORTED,
                   "DomainStudio adapts a denoiser of images: not an image-conditioned or "
                   "regression model");
  if (c->min_snr_gamma > 0)
    return err_set(e, ERR_INVALID, "DomainStudio's denoising loss is unweighted: no min-SNR gamma");
  if (!(w->pair >= 0 && w->hf_pair >= 0 && w->hf_mse >= 0) ||
      !isfinite(w->pair + w->hf_pair + w->hf_mse))
    return err_set(e, ERR_INVALID, "DomainStudio: loss weights must be finite and >= 0");
  const int np = model_param_count(m);
  if (model_get_info(s)->kind != MODEL_UNET2D || model_param_count(s) != np)
    return err_set(e, ERR_INVALID,
                   "DomainStudio: the source model is not the network being adapted (%d tensors, "
                   "the model has %d)",
                   model_param_count(s), np);
  for (int i = 0; i < np; i++) {
    const model_param *a = model_param_at(m, i), *b = model_param_at(s, i);
    if (strcmp(a->name, b->name) != 0 || a->count != b->count || a->ndim != b->ndim ||
        memcmp(a->shape, b->shape, sizeof a->shape) != 0)
      return err_set(e, ERR_INVALID,
                     "DomainStudio: the source model's tensor %s differs from the model's %s",
                     b->name, a->name);
  }
  return ERR_OK;
}

/* The trained text encoder's tensors after the model's, their gradients in one block. */
static int add_text_tensors(trainer *t, err *e) {
  clip_text_model *m = t->text.encoder;
  size_t total, off, count;
  float *w = clip_text_weights(m, &total);
  if (!(t->text_grad = mem_calloc(total + 1, sizeof(float))))
    return err_set(e, ERR_NOMEM, "out of memory for the text encoder's gradient");
  for (int i = t->nmodel; i < t->np; i++) {
    const int k = i - t->nmodel;
    const char *name = clip_text_tensor(m, k, &off, &count);
    train_tensor *tt = &t->tensors[i];
    size_t len = strlen(name) + sizeof "text_encoder/";
    char *full = mem_malloc(len);
    if (!full)
      return err_set(e, ERR_NOMEM, "out of memory");
    snprintf(full, len, "text_encoder/%s", name);
    *tt = (train_tensor){.name = full, .count = count, .data = w + off};
    tt->ndim = clip_text_tensor_shape(m, k, tt->shape);
    t->gp[i] = t->text_grad + off;
  }
  return ERR_OK;
}

/* Every tensor trained: the model's, then a trained text encoder's. */
static int list_tensors(trainer *t, err *e) {
  const int text = t->c.text && !t->c.text->frozen;
  size_t off, count;
  t->nmodel = model_param_count(t->m);
  t->np = t->nmodel;
  if (text) {
    while (clip_text_tensor(t->text.encoder, t->np - t->nmodel, &off, &count))
      t->np++;
  }
  t->counts = mem_calloc((size_t)t->np + 1, sizeof *t->counts);
  t->params = mem_calloc((size_t)t->np + 1, sizeof *t->params);
  t->gp = mem_calloc((size_t)t->np + 1, sizeof *t->gp);
  t->tensors = mem_calloc((size_t)t->np + 1, sizeof *t->tensors);
  if (!t->counts || !t->params || !t->gp || !t->tensors)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < t->nmodel; i++) {
    const model_param *p = model_param_at(t->m, i);
    t->tensors[i] =
        (train_tensor){.name = p->name, .ndim = p->ndim, .count = p->count, .data = p->data};
    memcpy(t->tensors[i].shape, p->shape, sizeof p->shape);
    t->gp[i] = model_grads_at(t->grads, i);
  }
  int rc = text ? add_text_tensors(t, e) : ERR_OK;
  for (int i = 0; i < t->np; i++) {
    t->counts[i] = t->tensors[i].count;
    t->params[i] = t->tensors[i].data;
  }
  if (!rc && t->c.text && !(t->text_pool = pool_new(t->c.threads > 0 ? t->c.threads : 1)))
    rc = err_set(e, ERR_NOMEM, "out of threads for the text encoder");
  return rc;
}

static int new_ema(trainer *t, err *e) {
  int ok = (t->ema = mem_calloc((size_t)t->np + 1, sizeof *t->ema)) != NULL;
  for (int i = 0; ok && i < t->np; i++) {
    ok = (t->ema[i] = mem_malloc(t->counts[i] * sizeof(float) + 1)) != NULL;
    if (ok)
      memcpy(t->ema[i], t->params[i], t->counts[i] * sizeof(float));
  }
  return ok ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for the EMA weights");
}

int trainer_new(model *m, const sched_config *sc, const train_config *c, trainer **out, err *e) {
  *out = NULL;
  const model_info *mi = model_get_info(m);
  int rc = check_config(mi, c, e);
  if (!rc && c->source)
    rc = check_source(m, c, e);
  if (rc)
    return rc;
  trainer *t = mem_calloc(1, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  t->m = m;
  t->c = *c;
  if (c->text) {
    t->text = *c->text;
    t->c.text = &t->text;
  }
  t->T = sc->num_train_timesteps;
  t->ac = mem_malloc(sizeof(float) * (size_t)t->T);
  if (!t->ac)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc && !(rc = sched_alphas_cumprod(sc, t->ac, e)) &&
      !(rc = model_grads_new(m, &t->grads, e)) && !(rc = list_tensors(t, e)) &&
      !(rc = adamw_new(&c->adamw, t->np, t->counts, &t->opt, e)) && c->use_ema)
    rc = new_ema(t, e);
  if (rc) {
    trainer_free(t);
    return rc;
  }
  *out = t;
  return ERR_OK;
}

int trainer_tensor_count(const trainer *t) {
  return t->np;
}

const train_tensor *trainer_tensor(const trainer *t, int i) {
  return i >= 0 && i < t->np ? &t->tensors[i] : NULL;
}

long trainer_steps(const trainer *t) {
  return t->steps;
}

float *trainer_ema_at(trainer *t, int i) {
  return t->ema && i >= 0 && i < t->np ? t->ema[i] : NULL;
}

float *trainer_moment_at(trainer *t, int which, int i) {
  return adamw_moment(t->opt, which, i);
}

void trainer_set_steps(trainer *t, long steps) {
  t->steps = steps;
  adamw_set_steps(t->opt, steps);
}

static int grow(trainer *t, int n, size_t per_image, err *e) {
  size_t need = (size_t)n * per_image;
  /* both counts: a later batch of more but smaller images needs more per-image room only */
  if (need <= t->cap && (size_t)n <= t->cap_n)
    return ERR_OK;
  size_t cap = need > (size_t)n ? need : (size_t)n;
  free(t->noisy), free(t->target), free(t->tf), free(t->w), free(t->lab);
  free(t->noise_buf), free(t->ts_buf);
  free(t->out_sou), free(t->cx), free(t->co);
  t->out_sou = NULL;
  t->cx = t->co = NULL;
  if (t->c.source) {
    t->out_sou = mem_malloc(cap * sizeof(float));
    t->cx = mem_malloc((size_t)n * sizeof(double));
    t->co = mem_malloc((size_t)n * sizeof(double));
    if (!t->out_sou || !t->cx || !t->co)
      return err_set(e, ERR_NOMEM, "out of memory for a batch of %d", n);
  }
  t->noisy = mem_malloc(cap * sizeof(float));
  t->target = mem_malloc(cap * sizeof(float));
  t->noise_buf = mem_malloc(cap * sizeof(float));
  t->tf = mem_malloc((size_t)n * sizeof(float));
  t->w = mem_malloc((size_t)n * sizeof(float));
  t->lab = mem_malloc((size_t)n * sizeof(int64_t));
  t->ts_buf = mem_malloc((size_t)n * sizeof(int64_t));
  t->cap = t->cap_n = 0;
  if (!t->noisy || !t->target || !t->noise_buf || !t->tf || !t->w || !t->lab || !t->ts_buf)
    return err_set(e, ERR_NOMEM, "out of memory for a batch of %d", n);
  if (t->c.text) {
    const size_t len = (size_t)t->text.len, d = (size_t)model_get_info(t->m)->cross_attention_dim;
    free(t->ids), free(t->ehs), free(t->gehs);
    t->ids = mem_malloc((size_t)n * len * sizeof *t->ids);
    t->ehs = mem_malloc((size_t)n * len * d * sizeof(float));
    t->gehs = mem_malloc((size_t)n * len * d * sizeof(float));
    if (!t->ids || !t->ehs || !t->gehs)
      return err_set(e, ERR_NOMEM, "out of memory for the captions of a batch of %d", n);
  }
  t->cap = cap;
  t->cap_n = (size_t)n;
  return ERR_OK;
}

/* The loss weight of one image (train_text_to_image.py's min-SNR weights on compute_snr, in
 * float32): epsilon min(snr, g) / snr, v min(snr, g) / (snr + 1), sample min(snr, g). Without
 * gamma, epsilon and v are unweighted and sample takes train_unconditional.py's
 * alpha_bar / (1 - alpha_bar), which is the same as regressing the noise. */
static float loss_weight(const trainer *t, float ac) {
  const float alpha = sqrtf(ac), sigma = sqrtf(1.0f - ac);
  const float r = alpha / sigma, snr = r * r;
  if (t->c.min_snr_gamma <= 0)
    return t->c.prediction == SCHED_PRED_SAMPLE ? ac / (1.0f - ac) : 1.0f;
  const float g = (float)t->c.min_snr_gamma, base = snr < g ? snr : g;
  if (t->c.prediction == SCHED_PRED_EPSILON)
    return base / snr;
  if (t->c.prediction == SCHED_PRED_V)
    return base / (snr + 1.0f);
  return base;
}

typedef struct loss_ctx {
  const trainer *t;
  int n;
  size_t per; /* values per image */
  double loss;
  const dstudio_batch *ds; /* DomainStudio's batch, or NULL */
  dstudio_terms terms;
} loss_ctx;

/* DomainStudio's loss (dstudio_loss) on the adapted model's output. */
static int dstudio_loss_grad(const float *out, float *grad, void *user, err *e) {
  loss_ctx *L = user;
  int rc = dstudio_loss(L->ds, out, &L->t->c.dstudio, &L->terms, grad, e);
  L->loss = L->terms.total;
  return rc;
}

/* x0 = cx x_t + co out for the prediction type, in double from the float32 alpha_bar (the
 * authors' _predict_xstart_from_eps for epsilon). */
static void x0_coefficients(const trainer *t, int n, const int64_t *ts) {
  for (int i = 0; i < n; i++) {
    const double ac = t->ac[ts[i]];
    if (t->c.prediction == SCHED_PRED_EPSILON)
      t->cx[i] = sqrt(1.0 / ac), t->co[i] = -sqrt(1.0 / ac - 1.0);
    else if (t->c.prediction == SCHED_PRED_SAMPLE)
      t->cx[i] = 0.0, t->co[i] = 1.0;
    else
      t->cx[i] = sqrt(ac), t->co[i] = -sqrt(1.0 - ac);
  }
}

/* mean_i(w_i * mean_j (out - target)^2) and its gradient 2 w_i (out - target) / (n * per). */
static int loss_grad(const float *out, float *grad, void *user, err *e) {
  loss_ctx *L = user;
  const trainer *t = L->t;
  double total = 0;
  const double scale = 2.0 / ((double)L->n * (double)L->per);
  for (int i = 0; i < L->n; i++) {
    const float *o = out + (size_t)i * L->per, *y = t->target + (size_t)i * L->per;
    float *g = grad + (size_t)i * L->per;
    double sq = 0;
    for (size_t j = 0; j < L->per; j++) {
      double d = (double)o[j] - y[j];
      sq += d * d;
      g[j] = (float)(scale * t->w[i] * d);
    }
    total += t->w[i] * (sq / (double)L->per);
  }
  L->loss = total / L->n;
  if (!isfinite(L->loss))
    return err_set(e, ERR_NUMERIC, "the loss is not finite");
  return ERR_OK;
}

/* The global norm, then clip_grad_norm_'s scaling (optim.h); the buffers are the model's. */
static double clip_grads(trainer *t) {
  return optim_clip_grad_norm(t->np, t->counts, (float *const *)t->gp, t->c.clip_norm);
}

/* x_t, the target and the weight of every image (DDPMScheduler.add_noise and get_velocity in
 * float32: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise, sqrt(alpha_bar) noise -
 * sqrt(1 - alpha_bar) x0). */
static void noise_batch(trainer *t, const float *x0, int n, size_t per, const int64_t *ts,
                        const float *noise) {
  for (int i = 0; i < n; i++) {
    const float ac = t->ac[ts[i]], sa = sqrtf(ac), s1 = sqrtf(1.0f - ac);
    const float *x = x0 + (size_t)i * per, *z = noise + (size_t)i * per;
    float *xt = t->noisy + (size_t)i * per, *y = t->target + (size_t)i * per;
    for (size_t j = 0; j < per; j++) {
      const float a = sa * x[j], b = s1 * z[j];
      xt[j] = a + b;
      if (t->c.prediction == SCHED_PRED_EPSILON)
        y[j] = z[j];
      else if (t->c.prediction == SCHED_PRED_SAMPLE)
        y[j] = x[j];
      else {
        const float v1 = sa * z[j], v2 = s1 * x[j];
        y[j] = v1 - v2;
      }
    }
    t->tf[i] = (float)ts[i];
    t->w[i] = loss_weight(t, ac);
  }
}

/* The regression baseline's batch: the degraded image in at t = 0, the clean one as the target,
 * every image weighted 1 (plain MSE; no noise). */
static void regression_batch(trainer *t, const float *x0, int n, size_t per) {
  memcpy(t->target, x0, (size_t)n * per * sizeof(float));
  for (int i = 0; i < n; i++)
    t->tf[i] = 0.0f, t->w[i] = 1.0f;
}

static int check_cond(const trainer *t, const model_info *mi, const float *cond, err *e) {
  if (t->c.regression && !cond)
    return err_set(e, ERR_INVALID, "training step: a regression model needs the degraded images");
  if (!t->c.regression && !mi->cond_channels != !cond)
    return err_set(e, ERR_INVALID,
                   mi->cond_channels
                       ? "training step: the model is image-conditioned: conditioning images "
                         "are required"
                       : "training step: the model takes no conditioning images");
  return ERR_OK;
}

/* The batch's hidden states from its captions t->ids (t->ehs), as the UNet reads them. */
static int encode_captions(trainer *t, int n, err *e) {
  const train_text *x = &t->text;
  return clip_text_encode(x->encoder, t->ids, n, x->len, x->clip_skip, t->ehs, t->text_pool, e);
}

/* The text encoder's share of the gradient: the UNet's gradient for the hidden states pulled
 * back through the encoder into t->text_grad. */
static int text_backward(trainer *t, int n, err *e) {
  const train_text *x = &t->text;
  size_t total;
  clip_text_weights(x->encoder, &total);
  memset(t->text_grad, 0, total * sizeof(float));
  return clip_text_backward(x->encoder, t->ids, n, x->len, x->clip_skip, t->gehs, t->text_grad,
                            NULL, t->text_pool, e);
}

static int step_given(trainer *t, const float *x0, const float *cond, const int64_t *labels, int n,
                      int h, int w, const int64_t *timesteps, const float *noise,
                      train_step_info *info, err *e) {
  const model_info *mi = model_get_info(t->m);
  if (n < 1 || h < 1 || w < 1 || !x0 || !timesteps || !noise)
    return err_set(e, ERR_INVALID, "training step: empty batch");
  if (t->c.source && n < 3)
    return err_set(e, ERR_INVALID,
                   "training step: DomainStudio's pairwise terms need batches of at least 3 "
                   "images, got %d",
                   n);
  int rc = check_cond(t, mi, cond, e);
  if (rc)
    return rc;
  const size_t per = (size_t)mi->in_channels * h * w;
  for (int i = 0; i < n; i++)
    if (timesteps[i] < 0 || timesteps[i] >= t->T)
      return err_set(e, ERR_INVALID, "training step: timestep %lld outside [0, %d)",
                     (long long)timesteps[i], t->T);
  if ((rc = grow(t, n, per, e)))
    return rc;
  if (t->c.regression)
    regression_batch(t, x0, n, per);
  else
    noise_batch(t, x0, n, per, timesteps, noise);
  model_grads_zero(t->grads);
  if (t->c.text && (rc = encode_captions(t, n, e)))
    return rc;
  const model_call call = {.x = t->c.regression ? cond : t->noisy,
                           .n = n,
                           .h = h,
                           .w = w,
                           .t = t->tf,
                           .labels = labels,
                           .threads = t->c.threads,
                           .cond = t->c.regression ? NULL : cond,
                           .encoder_hidden_states = t->c.text ? t->ehs : NULL,
                           .seq_len = t->c.text ? t->text.len : 0};
  loss_ctx L = {.t = t, .n = n, .per = per};
  dstudio_batch ds;
  if (t->c.source) {
    /* the frozen source on the same noisy batch, then the three items of the pairwise terms */
    if ((rc = model_run(t->c.source, &call, t->out_sou, e)))
      return err_prefix(e, "the DomainStudio source model");
    x0_coefficients(t, n, timesteps);
    ds = (dstudio_batch){.n = n,
                         .c = mi->in_channels,
                         .h = h,
                         .w = w,
                         .x_t = t->noisy,
                         .target = t->target,
                         .out_sou = t->out_sou,
                         .cx = t->cx,
                         .co = t->co};
    float u[3];
    rng_uniform(t->c.seed, (uint64_t)t->steps, STREAM_PAIRS, u, 3);
    dstudio_pick(u, n, ds.idx);
    L.ds = &ds;
  }
  double aux = 0;
  const int guided = t->c.guide_weight > 0 && !t->c.regression; /* the sharp x0 is the target */
  const model_grad_call g = {.loss_grad = t->c.source ? dstudio_loss_grad : loss_grad,
                             .loss_user = &L,
                             .params = t->grads,
                             .guide_target = guided ? x0 : NULL,
                             .guide_weight = (float)t->c.guide_weight,
                             .guide_loss = &aux,
                             .grad_encoder_hidden_states = t->text_grad ? t->gehs : NULL};
  if ((rc = model_backward(t->m, &call, &g, e)) || (t->text_grad && (rc = text_backward(t, n, e))))
    return err_append(e, " at training step %ld", t->steps + 1);
  const double norm = clip_grads(t);
  if (!isfinite(norm))
    return err_set(e, ERR_NUMERIC, "the gradient is not finite at training step %ld", t->steps + 1);
  const double lr = train_lr_at(t->c.lr_kind, t->c.lr, t->c.warmup, t->c.total_steps, t->steps);
  if ((rc = adamw_step(t->opt, t->params, (const float *const *)t->gp, lr, e)) ||
      (rc = model_repack(t->m, e)) || (t->text_grad && (rc = clip_text_repack(t->text.encoder, e))))
    return rc;
  t->steps++;
  if (t->ema)
    ema_update(&t->c.ema, t->steps, t->np, t->counts, t->ema, (const float *const *)t->params);
  if (info)
    *info = (train_step_info){
        .loss = L.loss + aux, .grad_norm = norm, .lr = lr, .guide_loss = aux, .terms = L.terms};
  return ERR_OK;
}

int trainer_step_given(trainer *t, const float *x0, const int64_t *labels, int n, int h, int w,
                       const int64_t *timesteps, const float *noise, train_step_info *info,
                       err *e) {
  if (t->c.text)
    return err_set(e, ERR_UNSUPPORTED, "training step: given draws take no captions");
  return step_given(t, x0, NULL, labels, n, h, w, timesteps, noise, info, e);
}

int trainer_step(trainer *t, const float *x0, const int64_t *labels, int n, int h, int w,
                 train_step_info *info, err *e) {
  return trainer_step_cond(t, x0, NULL, labels, n, h, w, info, e);
}

/* Step `steps`'s random draws for n images: timesteps, noise, and the dropout of labels (into
 * t->lab) or captions (into t->ids). */
static void draw(trainer *t, int n, size_t per, const int64_t *labels, const int64_t *ids) {
  const uint64_t seed = t->c.seed, first = (uint64_t)t->steps * (uint64_t)n;
  const size_t len = t->c.text ? (size_t)t->text.len : 0;
  for (int i = 0; i < n; i++) {
    float u;
    rng_uniform(seed, first + (uint64_t)i, STREAM_TIMESTEP, &u, 1);
    int64_t ts = (int64_t)(u * (float)t->T); /* torch.randint(0, T): u < 1 keeps it below T */
    t->ts_buf[i] = ts < t->T ? ts : t->T - 1;
    rng_normal(seed, first + (uint64_t)i, STREAM_NOISE, t->noise_buf + (size_t)i * per, per);
    if (labels || ids)
      rng_uniform(seed, first + (uint64_t)i, STREAM_DROPOUT, &u, 1);
    if (labels)
      t->lab[i] = u < t->c.null_dropout ? t->c.null_class : labels[i];
    if (ids)
      memcpy(t->ids + i * len, u < t->text.dropout ? t->text.empty_ids : ids + i * len,
             len * sizeof *ids);
  }
}

int trainer_step_cond(trainer *t, const float *x0, const float *cond, const int64_t *labels, int n,
                      int h, int w, train_step_info *info, err *e) {
  const model_info *mi = model_get_info(t->m);
  if (n < 1 || h < 1 || w < 1)
    return err_set(e, ERR_INVALID, "training step: empty batch");
  if (t->c.text)
    return err_set(e, ERR_INVALID, "training step: the model is text-conditional: give captions");
  const size_t per = (size_t)mi->in_channels * h * w;
  int rc = grow(t, n, per, e);
  if (rc)
    return rc;
  draw(t, n, per, labels, NULL);
  return step_given(t, x0, cond, labels ? t->lab : NULL, n, h, w, t->ts_buf, t->noise_buf, info, e);
}

int trainer_step_text(trainer *t, const float *x0, const int64_t *ids, int n, int h, int w,
                      train_step_info *info, err *e) {
  const model_info *mi = model_get_info(t->m);
  if (n < 1 || h < 1 || w < 1 || !ids)
    return err_set(e, ERR_INVALID, "training step: empty batch or no captions");
  if (!t->c.text)
    return err_set(e, ERR_INVALID, "training step: the model takes no captions");
  const size_t per = (size_t)mi->in_channels * h * w;
  int rc = grow(t, n, per, e);
  if (rc)
    return rc;
  draw(t, n, per, NULL, ids);
  return step_given(t, x0, NULL, NULL, n, h, w, t->ts_buf, t->noise_buf, info, e);
}

/* Permutation of 0..n-1 for one epoch: Fisher-Yates on uniform draws of stream STREAM_ORDER. */
static void epoch_order(uint64_t seed, uint64_t epoch, int64_t n, int64_t *perm, float *u) {
  rng_uniform(seed, epoch, STREAM_ORDER, u, (size_t)n);
  for (int64_t i = 0; i < n; i++)
    perm[i] = i;
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t j = (int64_t)(u[i] * (float)(i + 1));
    if (j > i)
      j = i;
    int64_t tmp = perm[i];
    perm[i] = perm[j];
    perm[j] = tmp;
  }
}

int train_batch_indices(uint64_t seed, long step, int batch, int64_t n, int64_t *idx, err *e) {
  if (n < 1 || n > (1 << 24) || batch < 1 || step < 0)
    return err_set(e, ERR_INVALID, "data order: %lld images (1 to 2^24), batch %d", (long long)n,
                   batch);
  int64_t *perm = mem_malloc((size_t)n * sizeof *perm);
  float *u = mem_malloc((size_t)n * sizeof *u);
  if (!perm || !u) {
    free(perm), free(u);
    return err_set(e, ERR_NOMEM, "out of memory for the data order");
  }
  uint64_t have = UINT64_MAX;
  for (int i = 0; i < batch; i++) {
    const uint64_t j = (uint64_t)step * (uint64_t)batch + (uint64_t)i;
    const uint64_t epoch = j / (uint64_t)n;
    if (epoch != have) {
      epoch_order(seed, epoch, n, perm, u);
      have = epoch;
    }
    idx[i] = perm[j % (uint64_t)n];
  }
  free(perm), free(u);
  return ERR_OK;
}
