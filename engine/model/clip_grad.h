/* The gradient of the CLIP text encoder (engine/text's CLIPTextModel) with respect to its
 * weights and its token and position embeddings: what training a text-to-image model's text
 * encoder jointly with its UNet needs. */
#ifndef DENOISED_CLIP_GRAD_H
#define DENOISED_CLIP_GRAD_H

#include <stdint.h>

#include "clip.h"
#include "err.h"
#include "pool.h"

/* For L = sum(grad_hidden * clip_text_encode(m, ids, n, len, clip_skip)), grad_hidden
 * [n][len][hidden_size] as the encoder writes its output: ADDS dL/dweights to grad_params, a
 * buffer laid out as clip_text_weights' block (clip_text_tensor names its tensors). hidden, if
 * not NULL, receives the forward's output. The same inputs give the same bits on any thread
 * count. ERR_INVALID / ERR_SHAPE as clip_text_encode, ERR_NOMEM. */
int clip_text_backward(const clip_text_model *m, const int64_t *ids, int n, int len, int clip_skip,
                       const float *grad_hidden, float *grad_params, float *hidden, pool *p,
                       err *e);

#endif
