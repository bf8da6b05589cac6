/* Optimizer state for training: AdamW as torch.optim.AdamW computes it, and an exponential
 * moving average of the weights as diffusers' EMAModel keeps it. Both work on a list of float32
 * tensors (a model's model_params, in order), so they know nothing of the network. */
#ifndef DENOISED_OPTIM_H
#define DENOISED_OPTIM_H

#include <stddef.h>

#include "err.h"

typedef struct adamw_config {
  double beta1, beta2, eps, weight_decay; /* torch's defaults: 0.9, 0.999, 1e-8, 0.01 */
} adamw_config;

typedef struct adamw adamw;

/* State (first and second moments, zero) for ntensors tensors of counts[i] floats. ERR_INVALID
 * naming a bad hyper-parameter (betas in [0, 1), eps > 0, weight_decay >= 0), ERR_NOMEM. */
int adamw_new(const adamw_config *c, int ntensors, const size_t *counts, adamw **out, err *e);
void adamw_free(adamw *o);

/* One step at learning rate lr (the schedule's value for this step) on params[i] with
 * gradients grads[i], as torch.optim.AdamW (amsgrad off, maximize off): decoupled weight decay
 * p *= 1 - lr * wd, then the bias-corrected Adam update. ERR_INVALID for lr < 0 or not finite. */
int adamw_step(adamw *o, float *const *params, const float *const *grads, double lr, err *e);

/* Steps taken so far. */
long adamw_steps(const adamw *o);

/* The first (which 0) or second (1) moment of tensor i, NULL out of range: a checkpoint saves
 * and restores them (with adamw_set_steps) so that a resumed run continues bit for bit. */
float *adamw_moment(adamw *o, int which, int i);
void adamw_set_steps(adamw *o, long steps);

/* The gradient's global L2 norm (in double, tensor by tensor in order, so the same on any
 * thread count), then torch.nn.utils.clip_grad_norm_'s scaling by max_norm / (norm + 1e-6)
 * when that is below 1 (max_norm 0: no clipping). Returns the norm before clipping. */
double optim_clip_grad_norm(int ntensors, const size_t *counts, float *const *grads,
                            double max_norm);

typedef struct ema_config {
  double decay;           /* upper bound of the decay (diffusers' default 0.9999) */
  double min_decay;       /* lower bound (0) */
  long update_after_step; /* no averaging (decay 0: a copy) until this many steps (0) */
  int use_warmup; /* 1: decay 1 - (1 + step / inv_gamma)^-power; 0: (1 + step) / (10 + step) */
  double inv_gamma, power; /* (1, 2/3) */
} ema_config;

/* diffusers' EMAModel.get_decay for its optimization_step (counted from 1 at the first step). */
double ema_decay(const ema_config *c, long optimization_step);

/* One EMA update after optimizer step `optimization_step`: s -= (1 - decay) * (s - p) over
 * ntensors tensors of counts[i] floats. Returns the decay used. */
double ema_update(const ema_config *c, long optimization_step, int ntensors, const size_t *counts,
                  float *const *shadow, const float *const *params);

#endif
