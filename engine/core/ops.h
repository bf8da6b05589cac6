/* Tensor core: the float32 NCHW operations a UNet needs, on cblas_sgemm.
 * Every op takes explicit shapes and writes into caller-provided memory;
 * scratch comes from an arena, parallelism from a caller-owned pool (NULL:
 * single-threaded). */
#ifndef DENOISED_OPS_H
#define DENOISED_OPS_H

#include <stddef.h>

#include "arena.h"
#include "gemm.h"
#include "pool.h"
#include "winograd.h"

/* Makes BLAS single-threaded so that the pool alone sets the parallelism.
 * Called by model_load; idempotent and thread-safe. */
void ops_init(void);

typedef struct conv2d {
  int cin, cout, k, stride;
  int pad_top, pad_left, pad_bottom, pad_right;
  const float *weight; /* [cout][cin][k][k] */
  const float *bias;   /* [cout] or NULL */
  gemm_packed packed;  /* weight in the GEMM kernel's layout, built on first use */
  wino_conv *wino;     /* Winograd form, built on first use by an image large enough */
  int forms;           /* OPS_FORM_* bits ops_conv2d_pack allowed (0: not packed) */
  int built;           /* OPS_FORM_* bits built so far (atomic: forwards may share a layer) */
  int bf16;            /* built forms are rounded to bf16 (ops_conv2d_to_bf16) */
  int weight_in_file;  /* weight is a file mapping (st_map_f32): built forms let its pages go */
} conv2d;

#define OPS_FORM_GEMM 1 /* im2col GEMM panels */
#define OPS_FORM_WINO 2 /* Winograd F(4x4,3x3) transformed filters */

/* Readies c->weight for ops_conv2d: the Winograd form for 3x3 stride-1 pad-1 layers (unless
 * DENOISED_NO_WINOGRAD=1) and the im2col GEMM form. Each form is built the first time a forward
 * needs it (Winograd for images of 64 pixels and more, im2col below), so a layer holds only the
 * forms its image sizes use: a model whose small levels never see Winograd keeps no 4x larger
 * transformed copy there, and its large levels no GEMM copy. The bits are those of building at
 * load. Unpack frees what was built. */
int ops_conv2d_pack(conv2d *c);
/* The im2col GEMM form only: every output pixel is then summed in the same order, so equal input
 * patches give bit-equal outputs (a max pool's ties stay ties, as in PyTorch; Winograd's
 * position-dependent rounding breaks them and moves a max pool's gradient). */
int ops_conv2d_pack_direct(conv2d *c);
void ops_conv2d_unpack(conv2d *c);
/* Whether ops_conv2d_pack or ops_conv2d_pack_direct readied c. */
int ops_conv2d_packed(const conv2d *c);
/* Rounds a packed convolution's weights (im2col and Winograd forms, those built now and later) to
 * bf16 for the gemm_packed_to_bf16 products. Returns 0, or -1 when out of memory or the CPU lacks
 * bf16 (a layer already converted stays so; ops_conv2d_unpack frees either kind). */
int ops_conv2d_to_bf16(conv2d *c);

/* Output size of conv c on an h x w input. */
void ops_conv2d_out_size(const conv2d *c, int h, int w, int *oh, int *ow);

/* y[n][cout][oh][ow] = conv(x[n][cin][h][w]). Returns 0, or -1 when the arena
 * is out of memory. */
int ops_conv2d(const conv2d *c, const float *x, int n, int h, int w, float *y, arena *a, pool *p);

/* Group norm over (c/groups channels x hw) per image, affine, then optional
 * SiLU. In-place (y == x) is allowed. */
void ops_group_norm(const float *x, int n, int c, int hw, int groups, float eps, const float *gamma,
                    const float *beta, int silu, float *y, pool *p);

/* ops_group_norm with a ResnetBlock2D's time embedding folded in: add ([n][c], or NULL) is added
 * to x before the norm (the default time-embedding mode), and mod ([n][2c], or NULL) turns the
 * normed h into h * (1 + mod[i][ch]) + mod[i][c + ch] before the SiLU ("scale_shift"). The same
 * arithmetic as the separate passes, in one parallel pass per group. In place is allowed. */
void ops_group_norm_temb(const float *x, int n, int c, int hw, int groups, float eps,
                         const float *gamma, const float *beta, const float *add, const float *mod,
                         int silu, float *y, pool *p);

/* y = (a + y) / scale over count floats: a residual connection's output, split over the pool. */
void ops_residual(const float *a, size_t count, float scale, float *y, pool *p);

/* y[n][out] = x[n][in] * W^T + b, W stored [out][in] as in PyTorch. */
void ops_linear(const float *x, int n, int in, int out, const float *weight, const float *bias,
                float *y);

void ops_silu(const float *x, size_t count, float *y);

/* Whether every value is finite (no NaN, no infinity): one cheap pass, for the checks that stop
 * a run the moment it goes non-finite. */
int ops_all_finite(const float *x, size_t count);

/* Nearest-neighbour 2x upsampling: [n][c][h][w] -> [n][c][2h][2w]. */
void ops_upsample_nearest2x(const float *x, int n, int c, int h, int w, float *y);

/* 2x2 average pool, stride 2 (floors odd sizes like PyTorch). */
void ops_avgpool2x2(const float *x, int n, int c, int h, int w, float *y);

/* Sinusoidal timestep embedding as diffusers' get_timestep_embedding:
 * out[n][dim], frequencies exp(-ln(10000) i / (dim/2 - freq_shift)). */
void ops_timestep_embedding(const float *t, int n, int dim, int flip_sin_to_cos, float freq_shift,
                            float *out);

typedef struct attn_weights {
  int channels, heads;
  int groups; /* group norm before q/k/v; 0 for none */
  float eps;
  const float *norm_gamma, *norm_beta;
  const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo; /* [c][c], [c] */
  float rescale;  /* output divided by this after the residual add */
  conv2d proj[4]; /* q, k, v, out as packed 1x1 convolutions: ops_attention_pack */
} attn_weights;

/* Builds the packed projections from wq..bo (once, at load). */
int ops_attention_pack(attn_weights *aw);
void ops_attention_unpack(attn_weights *aw);

/* Softmax of each of nr rows of L scores, in place: the attention's probabilities, computed
 * the same way by the forward and by the backward's recomputation (engine/grad). */
void ops_softmax_rows(float *s, int nr, int L);

/* Multi-head scaled dot-product attention on channel-major tensors: queries q [n][c][lq], keys
 * and values k, v [n][c][lk], output o [n][c][lq]; head h owns channels [h*c/heads, (h+1)*c/heads)
 * and scores are scaled by 1/sqrt(c/heads). Self-attention has lq == lk and k from the same
 * tokens; cross-attention takes k and v from another sequence (a text encoder's). Returns 0, or
 * -1 when the arena is out of memory. */
int ops_mha(const float *q, const float *k, const float *v, int n, int c, int heads, int lq, int lk,
            float *o, arena *a, pool *p);

/* Layer norm over the c channels of every position of a channel-major [n][c][L] tensor (a
 * token sequence kept in the layout the 1x1-convolution GEMMs want), then gamma and beta per
 * channel (either may be NULL). In-place (y == x) is allowed. */
void ops_layer_norm(const float *x, int n, int c, int L, float eps, const float *gamma,
                    const float *beta, float *y, pool *p);

/* GEGLU on a channel-major [n][2*inner][L] projection: y[n][inner][L] = a * gelu(g), a its first
 * inner channels and g the rest, with the exact (erf) GELU that torch uses by default. */
void ops_geglu(const float *x, int n, int inner, int L, float *y, pool *p);

/* Spatial self-attention with diffusers' semantics (AttnProcessor on a 4-D
 * input with residual_connection): y = (x + attn(norm(x))) / rescale. */
int ops_attention(const attn_weights *aw, const float *x, int n, int hw, float *y, arena *a,
                  pool *p);

#endif
