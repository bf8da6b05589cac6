/* Training an AutoencoderKL (vae.h) as latent diffusion's first stage is trained (LDM's
 * LPIPSWithDiscriminator with its perceptual and adversarial terms off, the learned output
 * log-variance fixed at 0): encode a batch, draw latents from the posterior by the
 * reparameterisation z = mean + std * noise, decode, and minimise
 *   loss = sum |x - decode(z)| / n  (or the squared error)  +  kl_weight * KL / n,
 *   KL = 0.5 sum(mean^2 + var - 1 - logvar)   (DiagonalGaussianDistribution.kl()),
 * sums over every pixel or latent of the batch's n images, with AdamW at a learning-rate schedule
 * (train.h) and optional gradient clipping. The data order and the noise come from the seed
 * and the step number, so a run is bit-identical on any thread count. The perceptual (LPIPS)
 * and GAN terms LDM adds for sharp natural images are not implemented. */
#ifndef DENOISED_VAE_TRAIN_H
#define DENOISED_VAE_TRAIN_H

#include <stdint.h>

#include "err.h"
#include "optim.h"
#include "train.h"
#include "vae.h"

typedef enum { VAE_RECON_L1, VAE_RECON_MSE } vae_recon;

typedef struct vae_train_config {
  vae_recon recon;
  double kl_weight; /* LDM's KL-regularised autoencoders use 1e-6 */
  train_lr_kind lr_kind;
  double lr;
  long warmup, total_steps;
  adamw_config adamw;
  double clip_norm; /* 0: off */
  uint64_t seed;
  int threads;
} vae_train_config;

/* One step: the loss minimised, its reconstruction term as a mean per pixel value (L1 or
 * squared), the KL per image, the gradient's norm before clipping, the learning rate. */
typedef struct vae_step_info {
  double loss, rec, kl, grad_norm, lr;
} vae_step_info;

typedef struct vae_trainer vae_trainer;

/* A trainer of v (its parameters updated in place, v repacked after every step). ERR_INVALID
 * naming a bad setting, ERR_NOMEM. */
int vae_trainer_new(vae *v, const vae_train_config *c, vae_trainer **out, err *e);
void vae_trainer_free(vae_trainer *t);
/* One step on the images x [n][in_channels][h][w] in [-1, 1]; the posterior noise of step
 * vae_trainer_steps(t) is drawn from the seed. */
int vae_trainer_step(vae_trainer *t, const float *x, int n, int h, int w, vae_step_info *info,
                     err *e);
long vae_trainer_steps(const vae_trainer *t);

/* The standard deviation of posterior samples (mean + std * noise, noise from seed) of the n
 * images x over every latent value: LDM's scale_factor is 1 / this (so the diffusion model sees
 * latents of unit variance). Encoded `batch` images at a time. */
int vae_latent_std(const vae *v, const float *x, int n, int h, int w, uint64_t seed, int threads,
                   double *std, err *e);

#endif
