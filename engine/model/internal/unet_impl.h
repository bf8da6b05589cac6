/* The UNet2DModel's layers as unet.c builds them, shared with the model-level backward
 * (unet_grad.c) so both walk the very same structure. Private to the model room. */
#ifndef DENOISED_UNET_IMPL_H
#define DENOISED_UNET_IMPL_H

#include <pthread.h>

#include "arena.h"
#include "blocks.h"
#include "model.h"
#include "ops.h"
#include "pool.h"
#include "unet.h"

#define UNET_MAX_LEVELS 8
#define UNET_MAX_LAYERS 8

typedef enum { SAMPLE_NONE, SAMPLE_CONV, SAMPLE_RESNET } resample_kind;

typedef struct block {
  int nlayers, has_attn;
  resnet res[UNET_MAX_LAYERS];
  /* A down block guided by the structure guidance: 1 + the index of its guide_net (0: not
   * guided), and per resnet the 1x1 projection (F -> cout, no bias) of the guide's features
   * added to conv1's output (blocks_resnet_forward_add). */
  int guide;
  conv2d guide_proj[UNET_MAX_LAYERS];
  attn_weights attn[UNET_MAX_LAYERS];
  resample_kind sample;
  conv2d sample_conv;
  resnet sample_res;
} block;

/* Multiscale structure guidance (Ren et al., "Multiscale Structure Guided Diffusion for Image
 * Deblurring", ICCV 2023; our layout, config keys "_guide_scales" and "_guide_channels"): per
 * scale s, the conditioning image's grayscale average-pooled by 2^s goes through conv_in (1 -> F)
 * and a resnet without time embedding; the resnet's output is the guidance feature that enters
 * down_blocks.s, and conv_out (F -> 1) plus the pooled input is the auxiliary prediction of the
 * sharp image's grayscale at that scale, only computed for training (model_grad_call). */
typedef struct guide_net {
  int scale;
  conv2d conv_in, conv_out;
  resnet res;
} guide_net;

struct unet {
  unet_shape shape;
  int nlevels, temb_dim, ch0, center_input, flip_sin_to_cos;
  float freq_shift;
  conv2d conv_in, conv_out;
  linear temb1, temb2;
  float *class_table; /* [num_classes][temb_dim] */
  block down[UNET_MAX_LEVELS], up[UNET_MAX_LEVELS];
  resnet mid_res[2];
  attn_weights mid_attn;
  int mid_has_attn, has_mid;
  group_norm norm_out;
  guide_net guide[UNET_MAX_LEVELS];
  int nguide, guide_channels;
  blocks_params ps;     /* learned tensors in load order and packed layers */
  blocks_spares spares; /* workspaces of finished passes */
};

/* A workspace (arena and thread pool of `threads`) from the model's spares, or a new one; give
 * it back (reset) when done, so that repeated passes, forward or backward, fault in no fresh
 * pages and start no threads. The arena keeps the high-water mark of its uses (a training
 * step's tape) until the model is freed. */
int unet_workspace_take(const unet *u, int threads, workspace *ws, err *e);
void unet_workspace_give(const unet *u, workspace *ws);

/* ERR_INVALID naming what is wrong with a batch's shape, timesteps, labels or conditioning image
 * (required exactly when the UNet has cond_channels). */
int unet_check_input(const unet *u, int n, int h, int w, const float *t, const int64_t *labels,
                     const float *cond, err *e);

/* conv_in's input for n images of `plane` pixels: x and the conditioning image concatenated
 * along the channels, centred (2 v - 1) if the config says center_input_sample. */
void unet_input(const unet *u, const float *x, const float *cond, int n, size_t plane, float *xin);

/* out [n][1][h >> scale][w >> scale] = the grayscale (ITU-R 601 luma for c = 3, the channel
 * itself for c = 1) of img [n][c][h][w], averaged over 2^scale x 2^scale blocks: a guide
 * network's input (of the conditioning image) and its auxiliary target (of the sharp one). */
void unet_guide_input(const float *img, int c, int n, int h, int w, int scale, float *out);

/* The gradient of the tape in unet_grad.c; see model_backward. */
int unet_backward(const unet *u, const model_call *c, const model_grad_call *g, float *const *pg,
                  err *e);

/* Unpacks and packs every layer again from the params' data (model_repack). */
int unet_repack(unet *u, err *e);
/* Every convolution's packed weights to bf16 (ops_conv2d_to_bf16); ERR_UNSUPPORTED when the
 * CPU has no AVX512-BF16, ERR_NOMEM. */
int unet_to_bf16(unet *u, err *e);

#endif
