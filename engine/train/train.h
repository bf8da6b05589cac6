/* One training step of a diffusion model, as diffusers' training examples take it: noise a batch
 * of clean images at per-image timesteps (DDPMScheduler.add_noise), regress the prediction
 * type's target (noise, the clean image, or get_velocity's v) with an MSE, optionally weighted by
 * min-SNR-gamma (training_utils.compute_snr and train_text_to_image.py's weights), drop labels to
 * the null class for classifier-free guidance, clip the gradient's global norm
 * (torch.nn.utils.clip_grad_norm_), take an AdamW step at the learning-rate schedule's value
 * (diffusers.optimization.get_scheduler) and update the EMA of the weights. Everything random
 * (data order, timesteps, noise, label dropout) comes from the seed and the step number through
 * the engine's counter-based generator, so a run is bit-identical on any thread count and a
 * resumed run continues exactly where it stopped. */
#ifndef DENOISED_TRAIN_H
#define DENOISED_TRAIN_H

#include <stdint.h>

#include "clip.h"
#include "dstudio.h"
#include "err.h"
#include "model.h"
#include "optim.h"
#include "schedule.h"

/* diffusers' get_scheduler names: "constant", "constant_with_warmup", "cosine" (with warm-up). */
typedef enum { TRAIN_LR_CONSTANT, TRAIN_LR_CONSTANT_WARMUP, TRAIN_LR_COSINE } train_lr_kind;

/* The kind a name means; -1 for an unknown name. */
int train_lr_kind_from_name(const char *name);
const char *train_lr_kind_name(train_lr_kind k);

/* The learning rate of optimizer step `step` (0 for the first) of `total`: LambdaLR's
 * lr * lambda(step) for get_constant_schedule, get_constant_schedule_with_warmup and
 * get_cosine_schedule_with_warmup (half a cosine, num_cycles 0.5). Note that with a warm-up
 * the first step's rate is 0, as in diffusers. */
double train_lr_at(train_lr_kind k, double lr, long warmup, long total, long step);

/* ERR_INVALID naming the bad one of the settings every trainer shares: a clipping norm >= 0,
 * a known schedule, lr >= 0, warm-up >= 0, total steps >= 1. */
int train_check_schedule(double clip_norm, train_lr_kind k, double lr, long warmup, long total,
                         err *e);

/* Text conditioning of a UNet2DConditionModel, as diffusers' train_text_to_image.py trains it:
 * the CLIP text encoder turns each image's caption (token ids) into the hidden states the UNet
 * attends to, and is trained with the UNet (its tensors follow the UNet's in the optimizer, the
 * gradient clipping, the EMA and the checkpoint; trainer_tensor) unless frozen. A caption becomes
 * the empty caption with probability dropout, so the model also learns the unconditional
 * prediction classifier-free guidance needs. */
typedef struct train_text {
  clip_text_model *encoder; /* the caller's; repacked after every step when trained */
  int frozen;
  int len;                  /* tokens per caption: the tokenizer's model_max_length */
  const int64_t *empty_ids; /* [len]: the empty caption's ids */
  double dropout;
  int clip_skip; /* 1: the last layer (clip_text_encode's convention) */
} train_text;

typedef struct train_config {
  sched_prediction prediction; /* epsilon, sample or v_prediction */
  double min_snr_gamma;        /* 0: off */
  double null_dropout;         /* probability that a label becomes null_class */
  int64_t null_class;          /* model_info.null_class */
  double clip_norm;            /* max global gradient norm; 0: no clipping */
  train_lr_kind lr_kind;
  double lr;
  long warmup, total_steps;
  adamw_config adamw;
  int use_ema;
  ema_config ema;
  uint64_t seed;
  int threads;
  /* The regression baseline of a restoration task instead of a diffusion model: the network
   * maps the degraded image (the step's cond) at t = 0 straight to the clean one (x0) with an
   * unweighted MSE; no noise, timesteps or prediction type. The model has no _cond_channels. */
  int regression;
  /* Multiscale structure guidance (model_info.guide_scales): the weight of the guide networks'
   * auxiliary loss (model_grad_call.guide_target: each regresses the sharp image's grayscale at
   * its scale), added to the denoising loss. 0: the guide networks learn from the denoising
   * loss alone. Must be 0 for a model without guidance. */
  double guide_weight;
  /* DomainStudio few-shot adaptation (dstudio.h): a frozen copy of the model being trained (same
   * architecture and, at the start, the same weights), evaluated on every step's noisy batch
   * beside it; the loss is then dstudio_loss with these weights on three distinct items drawn
   * from the seed (batches of at least 3), unweighted by timestep. NULL: the plain loss. */
  const model *source;
  dstudio_weights dstudio;
  /* Text conditioning; required exactly by text-conditional models, NULL otherwise. */
  const train_text *text;
} train_config;

/* What one step did: the loss it minimised (weighted as configured), the gradient's global norm
 * before clipping, and the learning rate it used. */
typedef struct train_step_info {
  double loss, grad_norm, lr;
  double guide_loss;   /* the structure-guidance part of loss (weighted); 0 without */
  dstudio_terms terms; /* DomainStudio's terms (total = loss); zero for the plain loss */
} train_step_info;

typedef struct trainer trainer;

/* A trainer of m (a UNet2DModel, or a UNet2DConditionModel with c->text; its model_params, and
 * the text encoder's weights when trained, are updated in place and repacked after every step)
 * on the schedule sc (its num_train_timesteps and alphas_cumprod). The EMA, if on,
 * starts as a copy of m's weights. ERR_INVALID naming the bad setting, ERR_NOMEM. */
int trainer_new(model *m, const sched_config *sc, const train_config *c, trainer **out, err *e);
void trainer_free(trainer *t);

/* One step on the batch x0 [n, C, H, W] (labels [n] or NULL for an unconditional model):
 * timesteps, noise and label dropout are drawn for step trainer_steps(t) from the seed. */
int trainer_step(trainer *t, const float *x0, const int64_t *labels, int n, int h, int w,
                 train_step_info *info, err *e);

/* trainer_step for an image-conditioned model (model_info.cond_channels): cond [n][cond_channels]
 * [H][W] goes with x0 into every evaluation; for a regression trainer cond [n, C, H, W] is the
 * network's input. NULL for other models. */
int trainer_step_cond(trainer *t, const float *x0, const float *cond, const int64_t *labels, int n,
                      int h, int w, train_step_info *info, err *e);

/* The same step with the timesteps [n] and noise [n, C, H, W] given and the labels taken as
 * they are (no dropout): for checks against other implementations. */
int trainer_step_given(trainer *t, const float *x0, const int64_t *labels, int n, int h, int w,
                       const int64_t *timesteps, const float *noise, train_step_info *info, err *e);

/* trainer_step for a text-conditional model: ids [n][text->len] are each image's caption,
 * dropped to the empty caption as configured (drawn from the seed like the noise). */
int trainer_step_text(trainer *t, const float *x0, const int64_t *ids, int n, int h, int w,
                      train_step_info *info, err *e);

/* The tensors the trainer updates, in optimizer order: the model's (model_param_at order), then
 * a trained text encoder's under "text_encoder/" + transformers' name. */
typedef struct train_tensor {
  const char *name;
  int ndim;
  int64_t shape[4];
  size_t count;
  float *data;
} train_tensor;
int trainer_tensor_count(const trainer *t);
/* Tensor i, or NULL out of range. */
const train_tensor *trainer_tensor(const trainer *t, int i);

/* Optimizer steps taken so far. */
long trainer_steps(const trainer *t);

/* The state a checkpoint holds besides the weights: tensor i (trainer_tensor order) of the EMA
 * (NULL when off) and AdamW's first (which 0) and second (1) moments. */
float *trainer_ema_at(trainer *t, int i);
float *trainer_moment_at(trainer *t, int which, int i);
/* Sets the step counter after a checkpoint's state was put back. */
void trainer_set_steps(trainer *t, long steps);

/* The images of batch `step` of size `batch` from a data set of n: epoch after epoch, each a
 * permutation of 0..n-1 drawn from the seed, so every image is seen once per epoch. idx gets
 * batch indices. ERR_INVALID when n is 0 or above 2^24, ERR_NOMEM. */
int train_batch_indices(uint64_t seed, long step, int batch, int64_t n, int64_t *idx, err *e);

#endif
