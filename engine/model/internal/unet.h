/* UNet2DModel as diffusers defines it, built from config.json and loaded from
 * safetensors under diffusers' tensor names (legacy attention names accepted). */
#ifndef DENOISED_UNET_H
#define DENOISED_UNET_H

#include <jansson.h>
#include <stdint.h>

#include "err.h"
#include "safetensors.h"

typedef struct unet unet;

typedef struct unet_shape {
  int sample_size;               /* 0 when the config leaves it null */
  int in_channels, out_channels; /* of conv_in and conv_out */
  int cond_channels;             /* in_channels' trailing conditioning-image channels */
  int guide_scales;              /* structure-guidance scales (unet_impl.h), 0: none */
  int num_classes;
  int64_t num_params;
} unet_shape;

int unet_load(const json_t *config, const st_file *weights, unet **out, err *e);
/* The network of `config` with a fresh training initialisation drawn from seed (see
 * init_tensor in unet.c). */
int unet_init(const json_t *config, uint64_t seed, unet **out, err *e);
void unet_free(unet *u);
const unet_shape *unet_get_shape(const unet *u);

/* Raw model output for n images of h x w; see model_eval. */
int unet_forward(const unet *u, const float *x, int n, int h, int w, const float *t,
                 const int64_t *labels, float *out, int threads, err *e);

/* The network's bottleneck, its "h-space" (Kwon et al. 2023; BoundaryDiffusion edits there):
 * the mid-block output of every image. save (if set) receives it; replace (if set) is used by
 * the decoder instead of the network's own. Both hold n * C * H * W floats (unet_mid_shape). */
typedef struct unet_mid {
  float *save;
  const float *replace;
} unet_mid;

/* [C, H, W] of the mid-block output for h x w inputs; ERR_UNSUPPORTED without a mid block. */
int unet_mid_shape(const unet *u, int h, int w, int shape[3], err *e);

/* unet_forward with the conditioning image ([n][cond_channels][h][w], NULL without) and access
 * to the mid-block output (mid may be NULL). */
int unet_forward_mid(const unet *u, const float *x, const float *cond, int n, int h, int w,
                     const float *t, const int64_t *labels, float *out, int threads,
                     const unet_mid *mid, err *e);

/* FLOPs (2 x multiply-adds of convolutions, linears and attention matmuls). */
double unet_flops(const unet *u, int h, int w);

#endif
