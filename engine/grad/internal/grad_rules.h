/* The backward rules that live in their own files, for the table in grad.c (and for rules that
 * compose others: attention runs the convolution and group-norm rules). Private to the room. */
#ifndef DENOISED_GRAD_RULES_H
#define DENOISED_GRAD_RULES_H

#include <math.h>

#include "grad.h"

int grad_conv2d_backward(const grad_node *nd, arena *a, pool *p, err *e);
int grad_group_norm_backward(const grad_node *nd, arena *a, pool *p, err *e);
int grad_attention_backward(const grad_node *nd, arena *a, pool *p, err *e);
int grad_mha_forward(const grad_node *nd, float *dst, arena *a, pool *p, err *e);
int grad_mha_backward(const grad_node *nd, arena *a, pool *p, err *e);
int grad_layer_norm_backward(const grad_node *nd, arena *a, pool *p, err *e);
/* A norm's weight and bias gradients: the per-task partial sums dgamma, dbeta [rows][c] added
 * row by row in order (so the result does not depend on the thread count), then into the node's
 * dsrc[1] and dsrc[2] where those are set. */
void grad_norm_affine_add(const grad_node *nd, const double *dgamma, const double *dbeta, int rows,
                          int c);

/* d silu(z) / dz, as the backward of every fused or separate SiLU computes it. */
static inline float grad_dsilu(float z) {
  float s = 1.0f / (1.0f + expf(-z));
  return s * (1.0f + z * (1.0f - s));
}

#endif
