/* The AutoencoderKL's layers as vae.c builds them, shared with its backward (vae_grad.c) so
 * both walk the very same structure. Private to the model room. */
#ifndef DENOISED_VAE_IMPL_H
#define DENOISED_VAE_IMPL_H

#include "blocks.h"
#include "vae.h"

#define VAE_MAX_LEVELS 8
#define VAE_MAX_LAYERS 8
/* diffusers builds every VAE block with resnet_eps=1e-6, whatever the config says. */
#define VAE_EPS 1e-6

typedef struct vae_block {
  int nlayers, has_sample;
  resnet res[VAE_MAX_LAYERS];
  /* encoder: a stride-2 conv after (0,1,0,1) zero padding; decoder: a conv after nearest 2x */
  conv2d sample;
} vae_block;

/* Encoder or Decoder: conv_in, blocks (the decoder's mid block comes first), conv_norm_out,
 * SiLU, conv_out. */
typedef struct coder {
  int nlevels, encoder;
  conv2d conv_in, conv_out;
  vae_block blocks[VAE_MAX_LEVELS];
  resnet mid_res[2];
  attn_weights mid_attn;
  int mid_has_attn;
  group_norm norm_out;
} coder;

struct vae {
  vae_info info;
  coder enc, dec;
  conv2d quant, post_quant;
  int has_quant, has_post_quant;
  blocks_params ps;
  blocks_spares spares;
};

/* ERR_INVALID unless n images of h x w are a valid batch with sides multiples of `multiple`;
 * `what` names them ("image", "latent"). */
int vae_check_size(int n, int h, int w, int multiple, const char *what, err *e);

#endif
