/* DomainStudio's few-shot adaptation losses (Zhu et al., IJCV; the authors' code,
 * bbzhu-jy16/DomainStudio guided_diffusion/gaussian_diffusion.py: training_fewshot_losses and
 * get_wave), computed from the outputs of the adapted model and of a frozen copy of the source
 * model on the same noisy batch, with the gradient with respect to the adapted model's output:
 *  - mse: the usual denoising loss, mean over the batch of mean((target - out)^2);
 *  - pair: relative-distance preservation. Three distinct batch items; each model's predicted
 *    x0 of each is compared by cosine similarity to the other two (in increasing batch order),
 *    a softmax over those two per anchor, and torch's KLDivLoss(log p_ada, p_sou) with its
 *    default 'mean' reduction: (1/6) sum p_sou (log p_sou - log p_ada), i.e. KL(p_sou || p_ada)
 *    averaged over the 3 x 2 entries;
 *  - hf_pair: the same on hf(x0) = LH + HL + HH of a one-level Haar transform (2 x 2 blocks,
 *    stride 2, entries +-1/2: hf = (3d - a - b - c) / 2 for the block [[a, b], [c, d]], per
 *    channel; an odd last row or column is dropped, as the unpadded convolution drops it);
 *  - hf_mse: mean over the batch of mean((hf(x0_ada) - hf(x0_target))^2), x0_target being the
 *    x0 the target implies (for epsilon prediction the clean image, up to rounding).
 * Every term is weighted as the authors' recipe weights it (pair 4, hf_pair 4, hf_mse 1 with
 * mse 1). The code drops the two hf terms for a model without learned variance; a weight of 0
 * reproduces that. Arithmetic in double. */
#ifndef DENOISED_DSTUDIO_H
#define DENOISED_DSTUDIO_H

#include <stddef.h>

#include "err.h"

typedef struct dstudio_weights {
  double pair, hf_pair, hf_mse;
} dstudio_weights;

/* The unconditional recipe of the authors' README (MODEL_FLAGS). */
#define DSTUDIO_RECIPE_PAIR 4.0
#define DSTUDIO_RECIPE_HF_PAIR 4.0
#define DSTUDIO_RECIPE_HF_MSE 1.0
/* and its optimisation (the authors' TrainLoop, for plain fine-tuning too): Adam at a constant
 * learning rate, betas (0.9, 0.999), no weight decay, gradient clipping or EMA, batch 3 */
#define DSTUDIO_RECIPE_LR 1e-4
#define DSTUDIO_RECIPE_BATCH 3
#define DSTUDIO_RECIPE_BETA1 0.9
#define DSTUDIO_RECIPE_BETA2 0.999

/* One noisy batch of n images of c x h x w (h, w >= 2) as both models saw it. An output out
 * means the clean estimate x0 = cx[i] * x_t + co[i] * out for image i (epsilon prediction:
 * 1 / sqrt(alpha_bar), -sqrt(1 / alpha_bar - 1); sample: 0, 1; v: sqrt(alpha_bar),
 * -sqrt(1 - alpha_bar)). idx: the three distinct items of the pairwise terms. */
typedef struct dstudio_batch {
  int n, c, h, w;
  const float *x_t, *target, *out_sou; /* n * c * h * w each */
  const double *cx, *co;               /* n each */
  int idx[3];
} dstudio_batch;

/* The weighted terms and their sum. */
typedef struct dstudio_terms {
  double mse, pair, hf_pair, hf_mse, total;
} dstudio_terms;

/* The loss of the adapted model's output out_ada (n * c * h * w); grad (same size, or NULL)
 * receives d total / d out_ada. ERR_INVALID naming a bad batch (n < 3, idx not three distinct
 * items of it, h or w < 2, a negative or non-finite weight), ERR_NOMEM, ERR_NUMERIC when a term
 * is not finite. */
int dstudio_loss(const dstudio_batch *b, const float *out_ada, const dstudio_weights *w,
                 dstudio_terms *terms, float *grad, err *e);

/* hf(x) of n images of c x h x w into out (n * c * (h / 2) * (w / 2)). */
void dstudio_hf(const float *x, int n, int c, int h, int w, float *out);

/* Three distinct items of a batch of n >= 3, uniformly (np.random.choice(n, 3, replace=False)
 * in the authors' code), from u, three uniforms in [0, 1): a partial Fisher-Yates shuffle. The
 * pairwise terms do not depend on the order of the three. */
void dstudio_pick(const float u[3], int n, int idx[3]);

#endif
