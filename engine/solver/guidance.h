/* Classifier-free guidance: the conditional and the unconditional pass as one batched model call,
 * combined as uncond + g (cond - uncond) on the raw model output. Shared by the sampling loop and
 * the inversion methods, so a guided step costs one network evaluation wherever it runs. */
#ifndef DENOISED_GUIDANCE_H
#define DENOISED_GUIDANCE_H

#include <stdint.h>

#include "classifier.h"
#include "err.h"
#include "model.h"

#define GUIDANCE_MAX_SCALE 100.0

typedef struct guidance {
  int enabled;        /* 0: plain model calls */
  double scale;       /* g in [0, GUIDANCE_MAX_SCALE]; 1 is the conditional model alone */
  int64_t null_label; /* the "no class" label (model_info.null_class) */
  /* Text-conditional models: the unconditional pass's encoder hidden states (the empty or the
   * negative prompt's), one sequence [seq_len][cross_attention_dim] for every image. */
  const float *uncond_states;
  int seq_len;
} guidance;

/* Guidance of scale g with the model's own null class. */
guidance guidance_for(const model *m, double scale);

/* Checks g against m: a class-conditional model with a null label it accepts, or a
 * text-conditional one with unconditional hidden states; a finite scale in range. Errors name
 * the field ("guidance_scale", "null_class", "negative_prompt"). */
int guidance_check(const guidance *g, const model *m, err *e);

/* model_run under guidance g (NULL or disabled: plain model_run). Hooks see
 * guidance_passes(g) * n rows in the evaluated order (conditional rows first). Guided calls need
 * labels and evaluate 2 n images at once; g = 1 and g = 0 need only one pass (the conditional or
 * the unconditional one). Like diffusers' pipelines, whatever the model predicts (eps, x0 or v) is
 * guided; of a learned variance (out_channels = 2 in_channels) only the prediction half is, the
 * variance half is the conditional pass's. */
int guidance_eval(const guidance *g, const model *m, const model_call *c, float *out, err *e);
/* (It answers ERR_NUMERIC, "non-finite values in the model output" or "... in the guidance
 * output", when a value of the model's output or of the guided combination is NaN or infinite:
 * callers add where in the run that was.) */

/* Evaluations per row of a guided call: 2 (the conditional rows, then the unconditional ones,
 * in one batch of 2 n) or 1 (no guidance, g = 1 or g = 0). */
int guidance_passes(const guidance *g);

/* ---- classifier guidance ----
 * eps <- eps - s (sigma / alpha) mask * grad log p(target | clip(x0)) with x0 = (x - sigma eps) /
 * alpha the model's clean estimate at the evaluation's level abar = alpha^2 (sigma^2 = 1 - abar):
 * the DPM-Solver papers' eps - s sigma grad_x log p(y | x), with a classifier of clean images
 * (engine/model/classifier.h) read at x0 and grad_x log p(y | x0(x)) taken as
 * grad_x0 log p / alpha (x0's dependence on x through the network left out: no UNet backward per
 * step). mask is 1 where x0 is inside [-1, 1] (the clip's gradient). Epsilon-predicting models
 * only. */
typedef struct classifier_guidance {
  const classifier *clf;
  int head;              /* the classifier head the target belongs to */
  double scale;          /* s, in [0, GUIDANCE_MAX_SCALE] */
  const int64_t *target; /* one class of the head per image */
} classifier_guidance;

/* cg against a model run on h x w images: channels and size the classifier takes, a head, targets
 * of the batch in range, a finite scale in range. Errors name "classifier" fields. */
int classifier_guidance_check(const classifier_guidance *cg, const model *m, int h, int w,
                              int batch, err *e);

/* Applies cg to the n images of a batch evaluation (cg->target[i] is image i's): x the model
 * input, eps the (guided) model output, changed in place, abar[i] the level of image i. */
int classifier_guidance_apply(const classifier_guidance *cg, const float *x, float *eps, int n,
                              int h, int w, const double *abar, int threads, err *e);

#endif
