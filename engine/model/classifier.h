/* An image classifier in the engine: the glyph classifier (tools/glyphs/train_classifier.py's
 * GlyphNet, exported by tools/export_classifier.py as config.json with "_class_name"
 * "GlyphClassifier" + model.safetensors), evaluated and differentiated with respect to its input
 * by engine/grad's op table, so losses on generated images, classifier guidance and evaluation
 * need no PyTorch. The network is a list of layers from config.json ("layers": conv_bn_relu,
 * max_pool, global_avg_pool, linear_relu) and one linear head per attribute ("heads": char, bold,
 * ...); batch norm runs in eval mode and is folded into its convolution at load. A loaded
 * classifier is read-only: any number of threads may evaluate it. */
#ifndef DENOISED_CLASSIFIER_H
#define DENOISED_CLASSIFIER_H

#include <stdint.h>

#include "err.h"

#define CLASSIFIER_CLASS_NAME "GlyphClassifier"

typedef struct classifier classifier;

/* One output head: its logits are [offset, offset + classes) of a row of all heads' logits. */
typedef struct classifier_head {
  const char *name;
  int classes;
  int offset;
  const char *const *labels; /* classes names, or NULL */
} classifier_head;

typedef struct classifier_info {
  const char *class_name;
  int in_channels, sample_size; /* inputs are [n][in_channels][sample_size]^2, in [-1, 1] */
  int features;                 /* values of the feature layer the heads read */
  int n_heads, n_logits;        /* n_logits: the sum of the heads' classes */
  const classifier_head *heads;
  int64_t num_params;
} classifier_info;

/* Loads the folder dir (config.json + model.safetensors). ERR_IO, ERR_FORMAT, ERR_INVALID and
 * ERR_UNSUPPORTED name the file and the key or tensor. */
int classifier_load(const char *dir, classifier **out, err *e);
void classifier_free(classifier *c);
const classifier_info *classifier_get_info(const classifier *c);

/* The head named `name` (case-insensitive), or -1. */
int classifier_head_index(const classifier *c, const char *name);
/* The class of head `head` that `label` names: an index ("3") or one of its labels
 * (case-insensitive); -1 if neither. */
int classifier_class_index(const classifier *c, int head, const char *label);

/* logits [n][n_logits] (heads in order) and, if non-NULL, features [n][features] for n images of
 * h x w (must be the sample size). threads >= 1. */
int classifier_run(const classifier *c, const float *x, int n, int h, int w, float *logits,
                   float *features, int threads, err *e);

/* grad_x [n][in_channels][h][w] = d sum(grad_logits * logits(x)) / dx (written, not added);
 * logits, if non-NULL, receives the forward's logits. */
int classifier_input_grad(const classifier *c, const float *x, int n, int h, int w,
                          const float *grad_logits, float *logits, float *grad_x, int threads,
                          err *e);

/* Classifier guidance's term: log p(target[i] | x_i) under head `head` (log-softmax of its
 * logits) into logp[n] (if non-NULL) and its gradient with respect to x into grad_x. */
int classifier_log_prob_grad(const classifier *c, const float *x, int n, int h, int w, int head,
                             const int64_t *target, float *logp, float *grad_x, int threads,
                             err *e);

#endif
