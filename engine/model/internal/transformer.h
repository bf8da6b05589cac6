/* diffusers' Transformer2DModel over a feature map, as Stable Diffusion's cross-attention blocks
 * use it: group norm, proj_in (1x1 convolution or linear), BasicTransformerBlocks (layer norm,
 * self-attention, layer norm, cross-attention on a text encoder's hidden states, layer norm,
 * GEGLU feed-forward, each added back), proj_out and the residual. Tokens stay channel-major
 * ([n][channels][positions], the activations' own layout), so every linear layer is a packed
 * 1x1 convolution on the engine's GEMM. Private to the model room. */
#ifndef DENOISED_TRANSFORMER_H
#define DENOISED_TRANSFORMER_H

#include "blocks.h"

typedef struct layer_norm {
  int channels;
  float eps;
  float *gamma, *beta;
} layer_norm;

/* diffusers' Attention: to_q, to_k, to_v without bias, to_out.0 with; keys and values come from
 * kv_dim-wide tokens (the query's own for self-attention). */
typedef struct tf_attention {
  int dim, heads, kv_dim;
  conv2d q, k, v, out;
} tf_attention;

typedef struct tf_block {
  layer_norm norm1, norm2, norm3;
  tf_attention attn1, attn2;
  int ff_inner;
  conv2d ff_in, ff_out; /* ff.net.0.proj (dim -> 2 ff_inner), ff.net.2 (ff_inner -> dim) */
} tf_block;

typedef struct transformer2d {
  int channels, inner, nblocks;
  group_norm norm;
  conv2d proj_in, proj_out;
  tf_block *blocks; /* owned: transformer_free */
} transformer2d;

typedef struct transformer_spec {
  int heads;       /* attention heads; head width is channels / heads, as diffusers computes */
  int groups;      /* of the group norm (norm_num_groups) */
  int layers;      /* BasicTransformerBlocks (transformer_layers_per_block) */
  int cross_dim;   /* width of the encoder hidden states (cross_attention_dim) */
  int linear_proj; /* use_linear_projection: proj_in/out stored as Linear, else 1x1 Conv2d */
} transformer_spec;

int transformer_load(blocks_loader *ld, const char *prefix, const transformer_spec *s, int channels,
                     transformer2d *t);
/* Frees what transformer_load allocated besides the learned tensors (the loader's). */
void transformer_free(transformer2d *t);

/* x (n x channels x hw) = transformer(x) in place, attending to ctx, the encoder hidden states
 * channel-major: [n][cross_dim][seq]. Nonzero when out of memory. */
int transformer_forward(blocks_run *f, const transformer2d *t, float *x, int hw, const float *ctx,
                        int seq);

#endif
