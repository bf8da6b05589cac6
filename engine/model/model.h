/* The denoising network behind one interface: a UNet2DModel checkpoint or the
 * analytic GaussianMixtureDenoiser, loaded from a diffusers-layout directory.
 * A loaded model is read-only, so any number of threads may evaluate it. */
#ifndef DENOISED_MODEL_H
#define DENOISED_MODEL_H

#include <jansson.h>
#include <stdint.h>

#include "err.h"

typedef struct model model;

typedef enum { MODEL_UNET2D, MODEL_GAUSSIAN_MIXTURE } model_kind;

typedef struct model_info {
  model_kind kind;
  const char *class_name; /* "_class_name" from config.json */
  int sample_size;        /* H == W of the images it was built for */
  int in_channels;
  int out_channels;
  int num_classes; /* 0 when not class-conditional */
  /* The label classifier-free guidance uses for "no class": config.json "_null_class", else
   * num_classes - 1 for a class-conditional UNet (the convention of models trained with label
   * dropout) and -1 for the GaussianMixtureDenoiser, whose negative labels mean the whole
   * mixture. Unused when num_classes is 0. */
  int64_t null_class;
  int64_t num_params; /* learned parameters (UNet) or stored values */
  /* prediction_type declared by the model's own config.json, or NULL. */
  const char *prediction_type;
  /* Names of classes 0 .. n_class_labels - 1 from config.json "_class_labels" (optional, at
   * most num_classes), or NULL. */
  const char *const *class_labels;
  int n_class_labels;
} model_info;

/* Loads `dir`: flat (config.json + diffusion_pytorch_model.safetensors) or
 * pipeline layout (model_index.json + unet/). Returns ERR_OK and *out. */
int model_load(const char *dir, model **out, err *e);
void model_free(model *m);
const model_info *model_get_info(const model *m);

/* The class a label names: an index ("3") or one of class_labels (case-insensitive); -1 if
 * neither. */
int64_t model_class_from_name(const model *m, const char *name);

/* Path of the scheduler_config.json that belongs with the model, or NULL. */
const char *model_scheduler_config_path(const model *m);
/* That file's JSON object as read at load (borrowed, lives as long as m), or NULL. Every solver
 * of a run with this model starts from it. */
const json_t *model_scheduler_config(const model *m);

/* Hooks into one evaluation (NULL fields: none). mid_save receives the mid-block output (h) of
 * every image; mid_replace is used by the decoder instead of the network's own. Both hold
 * n * C * H * W floats (model_mid_shape). Models without a mid block refuse hooks
 * (ERR_UNSUPPORTED). */
typedef struct model_hooks {
  float *mid_save;
  const float *mid_replace;
} model_hooks;

/* One network evaluation on a batch of n images (NCHW float32, in_channels x h x w each; h and w
 * may differ from sample_size for UNets). t holds one (possibly fractional) timestep per image;
 * labels one class per image or NULL. `threads` is the number of CPU threads this call may use
 * (>= 1). Later conditioning (text, images) joins here, so callers above the model room pass
 * one struct instead of growing argument lists. */
typedef struct model_call {
  const float *x;
  int n, h, w;
  const float *t;
  const int64_t *labels;
  model_hooks hooks;
  int threads;
} model_call;

/* Runs c; out receives n * out_channels * h * w floats. Thread-safe. */
int model_run(const model *m, const model_call *c, float *out, err *e);

/* model_run without hooks, for callers with plain arrays. */
int model_eval(const model *m, const float *x, int n, int h, int w, const float *t,
               const int64_t *labels, float *out, int threads, err *e);

/* [C, H, W] of the mid-block output for h x w images; ERR_UNSUPPORTED without one. */
int model_mid_shape(const model *m, int h, int w, int shape[3], err *e);

/* Approximate multiply-add FLOPs (x2) of one forward on one h x w image. */
double model_flops(const model *m, int h, int w);

#endif
