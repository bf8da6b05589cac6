/* GaussianMixtureDenoiser: the analytic model whose exact eps-prediction the
 * tests use as ground truth. Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). */
#ifndef DENOISED_GMM_H
#define DENOISED_GMM_H

#include <jansson.h>
#include <stdint.h>

#include "err.h"

typedef struct gmm gmm;

/* Builds the model from its parsed config.json, the path of its safetensors
 * file and the training noise schedule (alphas_cumprod[0..T)). Copies what it
 * needs; the caller keeps ownership of its arguments. */
int gmm_load(const json_t *config, const char *weights_path, const double *alphas_cumprod,
             int num_train_timesteps, gmm **out, err *e);
void gmm_free(gmm *g);

int gmm_sample_size(const gmm *g);
int gmm_channels(const gmm *g);
int gmm_num_classes(const gmm *g); /* 0 when unconditional */
int64_t gmm_num_values(const gmm *g);

/* eps prediction for n images at (fractional) timesteps t; labels may be NULL.
 * With a label c only components labelled c take part. */
int gmm_eval(const gmm *g, const float *x, int n, const float *t, const int64_t *labels, float *out,
             err *e);

#endif
