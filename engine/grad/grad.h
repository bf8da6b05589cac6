/* Backward rules (vector-Jacobian products) for the ops a UNet2DModel, the glyph classifier
 * (engine/model/classifier.h) and the transformers of UNet2DConditionModel and CLIP run (layer
 * norm, GELU/GEGLU/quick_gelu, self-, cross- and causal attention, token embeddings), in one
 * table indexed
 * by op, as ggml lays out its backward pass: each entry names the op's inputs and gives its
 * forward (the very code the engine runs, engine/core/ops.c or the UNet's inline arithmetic) and
 * its backward. The room knows nothing about models or training; a model-level backward composes
 * these rules, and a new op (layer norm, GELU, cross-attention) is one more enum value and table
 * row.
 *
 * Conventions shared by every rule:
 * - activations are float32 NCHW, as the forward ops take them;
 * - backward ACCUMULATES: dsrc[i] += (d dst / d src[i])^T ddst, so a tensor used twice (the time
 *   embedding feeds every resnet) just receives both contributions; a NULL dsrc[i] is not
 *   computed;
 * - the same inputs give bit-identical gradients on any number of threads: every element of a
 *   gradient is summed by one task in an order fixed by the shapes alone;
 * - activations the backward needs are recomputed from src (nothing is kept from the forward).
 */
#ifndef DENOISED_GRAD_H
#define DENOISED_GRAD_H

#include <stddef.h>
#include <stdint.h>

#include "arena.h"
#include "err.h"
#include "ops.h"
#include "pool.h"

#define GRAD_MAX_SRC 11

typedef enum grad_op {
  GRAD_CONV2D,             /* x; weight and bias from p.conv */
  GRAD_GROUP_NORM,         /* x, gamma, beta (optionally fused SiLU) */
  GRAD_SILU,               /* x */
  GRAD_LINEAR,             /* x [n][c], weight [out][c], bias [out] */
  GRAD_ATTENTION,          /* x [n][c][h*w]; weights from p.attn */
  GRAD_UPSAMPLE_NEAREST2X, /* x */
  GRAD_AVGPOOL2X2,         /* x */
  GRAD_TIMESTEP_EMBEDDING, /* t [n] -> [n][c] sinusoids */
  GRAD_TIME_MLP,           /* e [n][c], w1, b1, w2, b2: linear_2(silu(linear_1(e))) */
  GRAD_CLASS_EMBEDDING,    /* table [classes][c] -> rows [n][c] picked by labels */
  GRAD_CONCAT,             /* a [n][c][hw], b [n][p.concat.cb][hw] -> [n][c + cb][hw] */
  GRAD_SCALE_SHIFT,        /* x [n][c][hw], emb [n][c] (shift) or [n][2c] (scale, shift) */
  GRAD_ADD,                /* a, b -> (a + b) / p.add.divisor (residuals) */
  GRAD_RELU,               /* x (classifier) */
  GRAD_MAXPOOL2X2,         /* x: 2x2 max, stride 2, odd sizes floored (classifier) */
  GRAD_GLOBAL_AVGPOOL,     /* x [n][c][h][w] -> [n][c] means (classifier) */
  /* The transformers' ops (UNet2DConditionModel, CLIP), on channel-major token sequences
   * [n][c][L] with L = h * w, the layout engine/model/transformer.c and engine/text/ run: */
  GRAD_LAYER_NORM,      /* x, gamma, beta: over the c channels of each position */
  GRAD_GELU,            /* x: exact (erf) GELU */
  GRAD_QUICK_GELU,      /* x: x sigmoid(1.702 x), CLIP's activation */
  GRAD_GEGLU,           /* x [n][2 inner][L] -> a * gelu(g) [n][inner][L], c = 2 inner */
  GRAD_MHA,             /* q [n][c][L], k, v [n][c][p.mha.lk]: self-, cross- or causal attention */
  GRAD_TOKEN_EMBEDDING, /* token table [vocab][c], position table [positions][c] -> [n][c][L] */
  GRAD_OP_COUNT
} grad_op;

/* One application of an op: its shape, parameters, inputs, and the gradients wanted. */
typedef struct grad_node {
  grad_op op;
  int n, c, h, w; /* src[0]'s shape: NCHW, or [n][c] for the vector ops (h = w = 1) */
  union {
    const conv2d *conv; /* packed as the engine runs it; weight and bias are slots 1, 2 */
    struct {
      int groups, silu;
      float eps;
    } gn;
    struct {
      int out;
    } linear;
    const attn_weights *attn; /* slots 1..10: gamma, beta, wq, bq, wk, bk, wv, bv, wo, bo */
    struct {
      int flip_sin_to_cos;
      float freq_shift;
    } temb;
    struct {
      int hidden, out;
    } mlp;
    struct {
      const int64_t *labels; /* [n] */
      int classes;
    } embed;
    struct {
      int cb;
    } concat;
    struct {
      int has_scale;
    } ss;
    struct {
      float divisor;
    } add;
    struct {
      float eps;
    } ln;
    struct {
      int heads, lk; /* key/value length: L for self-attention, the text's for cross */
      int causal;    /* query r attends to keys 0..r (CLIP; needs lk == L) */
    } mha;
    struct {
      const int64_t *ids; /* [n][L] */
      int vocab, positions;
    } tok;
  } p;
  const float *src[GRAD_MAX_SRC]; /* forward inputs (CONV2D and ATTENTION: slot 0 only) */
  const float *ddst;              /* upstream gradient, shaped like the output */
  float *dsrc[GRAD_MAX_SRC];      /* accumulated gradients per slot, or NULL */
} grad_node;

typedef struct grad_rule {
  const char *name;
  int nsrc;                            /* slots, weights included */
  const char *src_names[GRAD_MAX_SRC]; /* diffusers' names where it has them */
  unsigned required;                   /* bit i: src[i] must be set */
  int (*check)(const grad_node *nd, int backward, err *e);
  size_t (*size)(const grad_node *nd, int slot); /* floats of a slot; -1 is the output */
  int (*forward)(const grad_node *nd, float *dst, arena *a, pool *p, err *e);
  int (*backward)(const grad_node *nd, arena *a, pool *p, err *e);
} grad_rule;

/* The table row of op, or NULL for a value outside the enum. */
const grad_rule *grad_rule_get(grad_op op);

/* Floats in slot `slot` of nd (-1: the output); 0 when nd is not valid. */
size_t grad_size(const grad_node *nd, int slot);

/* dst = op(src). ERR_INVALID naming the field for a bad node, ERR_NOMEM from the arena. */
int grad_forward(const grad_node *nd, float *dst, arena *a, pool *p, err *e);

/* dsrc[i] += VJP of ddst for every non-NULL dsrc[i]. a may not be NULL; p may. */
int grad_backward(const grad_node *nd, arena *a, pool *p, err *e);

#endif
