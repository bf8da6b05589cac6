/* UNet2DConditionModel as diffusers defines it for the Stable-Diffusion 1.x and 2.x families:
 * the UNet2DModel's resnets and samplers with Transformer2DModel cross-attention blocks that
 * attend to a text encoder's hidden states. Built from config.json and loaded from safetensors
 * under diffusers' tensor names. Private to the model room. */
#ifndef DENOISED_CUNET_H
#define DENOISED_CUNET_H

#include <jansson.h>
#include <stdint.h>

#include "blocks.h"
#include "err.h"
#include "model.h"
#include "safetensors.h"

typedef struct cunet cunet;

typedef struct cunet_shape {
  int sample_size; /* 0 when the config leaves it null */
  int in_channels, out_channels;
  int num_classes;
  int cross_dim; /* width of the encoder hidden states */
  int temb_dim;
  int64_t num_params;
} cunet_shape;

int cunet_load(const json_t *config, const st_file *weights, cunet **out, err *e);
/* The network of config with a fresh training initialisation drawn from seed (blocks.h). */
int cunet_init(const json_t *config, uint64_t seed, cunet **out, err *e);
void cunet_free(cunet *u);
const cunet_shape *cunet_get_shape(const cunet *u);
/* Its learned tensors and packed layers (model_param_at, model_repack). */
blocks_params *cunet_params(cunet *u);

/* One evaluation of c (encoder_hidden_states required; hooks as model_run's); out receives
 * n * out_channels * h * w floats. Thread-safe. */
int cunet_forward(const cunet *u, const model_call *c, float *out, err *e);

/* [C, H, W] of the mid-block output for h x w inputs; ERR_UNSUPPORTED without a mid block. */
int cunet_mid_shape(const cunet *u, int h, int w, int shape[3], err *e);

/* FLOPs of one h x w image attending to seq tokens (2 x multiply-adds of convolutions, linear
 * layers and attention matmuls). */
double cunet_flops(const cunet *u, int h, int w, int seq);

#endif
