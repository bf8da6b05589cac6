/* The UNet2DConditionModel's layers as cunet.c builds them, shared with its model-level
 * backward (cunet_grad.c) so both walk the very same structure. Private to the model room. */
#ifndef DENOISED_CUNET_IMPL_H
#define DENOISED_CUNET_IMPL_H

#include "cunet.h"
#include "transformer.h"

#define CUNET_MAX_LEVELS 8
#define CUNET_MAX_LAYERS 8
#define CUNET_MAX_SEQ 4096

typedef struct cblock {
  int nlayers, has_xattn, has_sample;
  resnet res[CUNET_MAX_LAYERS];
  transformer2d tf[CUNET_MAX_LAYERS];
  conv2d sample_conv;
} cblock;

struct cunet {
  cunet_shape shape;
  int nlevels, ch0, center_input, flip_sin_to_cos, has_mid;
  float freq_shift;
  conv2d conv_in, conv_out;
  linear temb1, temb2;
  float *class_table; /* [num_classes][temb_dim] */
  cblock down[CUNET_MAX_LEVELS], up[CUNET_MAX_LEVELS];
  resnet mid_res[2];
  transformer2d mid_tf;
  group_norm norm_out;
  blocks_params ps;
  blocks_spares spares;
};

/* ERR_INVALID naming what is wrong with a call's shape, timesteps, hidden states or labels. */
int cunet_check_call(const cunet *u, const model_call *c, err *e);

/* dst[i][k][r] = src[i][r][k] for n matrices of rows x cols: the hidden states [n][seq][cross]
 * as the transformers read them ([n][cross][seq]), and their gradient back. */
void cunet_transpose(const float *src, int n, int rows, int cols, float *dst);

/* The gradient of the tape in cunet_grad.c; see model_backward. pg: one buffer per parameter
 * in load order, or NULL. */
int cunet_backward(const cunet *u, const model_call *c, const model_grad_call *g, float *const *pg,
                   err *e);

#endif
