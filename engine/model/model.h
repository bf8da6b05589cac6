/* The denoising network behind one interface: a UNet2DModel or UNet2DConditionModel (Stable
 * Diffusion 1.x/2.x) checkpoint or the analytic GaussianMixtureDenoiser, loaded from a
 * diffusers-layout directory.
 * A loaded model is read-only, so any number of threads may evaluate it. */
#ifndef DENOISED_MODEL_H
#define DENOISED_MODEL_H

#include <jansson.h>
#include <stdint.h>

#include "err.h"

typedef struct model model;

typedef enum { MODEL_UNET2D, MODEL_GAUSSIAN_MIXTURE, MODEL_UNET2D_CONDITION } model_kind;

typedef struct model_info {
  model_kind kind;
  const char *class_name; /* "_class_name" from config.json */
  int sample_size;        /* H == W of the images it was built for */
  int in_channels;        /* of the image denoised (x), conditioning channels not counted */
  int out_channels;
  /* Channels of the conditioning image an image-conditioned UNet takes beside x (config.json
   * "_cond_channels": its conv_in reads in_channels + cond_channels, the image concatenated
   * after x); 0 for other models. */
  int cond_channels;
  /* Scales of multiscale structure guidance (config.json "_guide_scales", our layout; see
   * engine/model/internal/unet_impl.h): small networks that read the conditioning image's
   * grayscale at 1/2^s of its size and feed the encoder; 0 for an unguided model. Such a model
   * takes the auxiliary loss of model_grad_call.guide_target in training. */
  int guide_scales;
  /* config.json "_regression": true (written by `denoised train --regression`): a restoration
   * network that maps a degraded image at t = 0 to the clean one, not a denoiser. */
  int regression;
  int num_classes; /* 0 when not class-conditional */
  /* The label classifier-free guidance uses for "no class": config.json "_null_class", else
   * num_classes - 1 for a class-conditional UNet (the convention of models trained with label
   * dropout) and -1 for the GaussianMixtureDenoiser, whose negative labels mean the whole
   * mixture. Unused when num_classes is 0. */
  int64_t null_class;
  int64_t num_params; /* learned parameters (UNet) or stored values */
  /* Length of the embedding row a class label adds to the time embedding (model_backward's
   * grad_class is [n][class_embed_dim]); 0 when not class-conditional. */
  int class_embed_dim;
  /* Width of the encoder hidden states a text-conditional UNet (UNet2DConditionModel) attends
   * to, which every model_call to it must then carry; 0 for models without text conditioning. */
  int cross_attention_dim;
  /* Text-to-image pipelines (model_latent): image pixels per latent pixel along a side (8 for
   * Stable Diffusion) and the channels of the images the VAE decodes; 1 and in_channels for
   * models that make images directly. sample_size is the UNet's, in latents. */
  int latent_factor, image_channels;
  /* prediction_type declared by the model's own config.json, or NULL. */
  const char *prediction_type;
  /* Names of classes 0 .. n_class_labels - 1 from config.json "_class_labels" (optional, at
   * most num_classes), or NULL. */
  const char *const *class_labels;
  int n_class_labels;
  /* Named class embeddings (textual-inversion style rows, model_add_class): the last
   * num_embeddings classes, [num_classes - num_embeddings, num_classes), each named in
   * class_labels (classes before them without a name of their own are named by their index
   * there). 0 for a model without any. */
  int num_embeddings;
  /* The settings its author recommends, config.json "_recommended": {"scheduler": NAME,
   * "steps": N, "guidance_scale": G} (each optional), which the CLI, the daemon and the A1111
   * route use when a request gives none. rec_solver is NULL, rec_steps 0 and rec_guidance < 0
   * when not given; the solver name is checked by its users (the solver room is above this). */
  const char *rec_solver;
  int rec_steps;
  double rec_guidance;
} model_info;

/* Loads `dir`: flat (config.json + diffusion_pytorch_model.safetensors) or
 * pipeline layout (model_index.json + unet/), or a single-file Stable-Diffusion checkpoint
 * (.safetensors in the original key layout, sd_single.h) with a tokenizer/ folder beside it.
 * Returns ERR_OK and *out. */
int model_load(const char *dir, model **out, err *e);
/* A UNet2DModel or UNet2DConditionModel built from the config.json at config_path with a fresh
 * training initialisation drawn from seed (PyTorch's default layer init, the identity trick of
 * zeroed last convolutions; see blocks.h). No scheduler config.
 * ERR_FORMAT/ERR_INVALID/ERR_UNSUPPORTED naming the file and key. */
int model_init(const char *config_path, uint64_t seed, model **out, err *e);
void model_free(model *m);
const model_info *model_get_info(const model *m);
/* The VAE and text encoder of a text-to-image pipeline folder (latent.h), or NULL. */
struct latent_parts;
const struct latent_parts *model_latent(const model *m);

/* The class a label names: an index ("3") or one of class_labels (case-insensitive); -1 if
 * neither. */
int64_t model_class_from_name(const model *m, const char *name);

/* ---------- named class embeddings ---------- */

/* The folder, beside a model, of its named class embeddings: NAME.safetensors each, holding one
 * F32 tensor MODEL_EMBEDDING_TENSOR of class_embed_dim values (written by `denoised concept`).
 * model_load appends every one of them (in name order) as a class of that name, the way A1111
 * loads its embeddings/ folder at start; a file that is not such a row fails the load, naming
 * it. */
#define MODEL_EMBEDDINGS_DIR "embeddings"
#define MODEL_EMBEDDING_TENSOR "class_embedding"

/* 1 if name may name an embedding: 1 to 64 bytes of letters, digits, '_', '-' and '.', not
 * starting with '.', not all digits (an index). */
int model_embedding_name_ok(const char *name);

/* Appends a class named `name` whose embedding row is row[class_embed_dim], returning its label
 * in *label (UNet2DModel with class embeddings only: ERR_UNSUPPORTED otherwise; ERR_INVALID for
 * a bad or taken name or a row that is not finite). The null class and the learned table are
 * unchanged (the row is not a parameter: model_param_at's class table keeps its count, and
 * model_backward refuses parameter gradients of images with such a label). Not thread-safe:
 * before the model is shared, or with no evaluation running. */
int model_add_class(model *m, const char *name, const float *row, int64_t *label, err *e);

/* The embedding row of class `label`, class_embed_dim floats, writable (an optimizer's working
 * row: no evaluation may run while it changes), or NULL (no class table, out of range). */
float *model_class_row(model *m, int64_t label);

/* The folder the model was loaded from, as given to model_load (solver data lives in its
 * solver_data/ subfolder: sampler.h). */
const char *model_dir(const model *m);
/* "fnv1a64:<16 hex digits>": a digest of the weights file (64-bit FNV-1a over its bytes as
 * little-endian 8-byte words, then its length), taken on the first call (not at load: hashing the
 * file cost most of a load) and kept; "" when the file can no longer be read then. What files
 * computed from the model (DPM-Solver-v3 statistics) record to be checked against it later.
 * Thread-safe. */
const char *model_weights_digest(const model *m);

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
  /* Text conditioning: one sequence of seq_len vectors of model_info.cross_attention_dim per
   * image, [n][seq_len][cross_attention_dim] (a text encoder's last hidden states). Required by
   * models with cross_attention_dim > 0, refused by the others; NULL otherwise. */
  const float *encoder_hidden_states;
  int seq_len;
  model_hooks hooks;
  int threads;
  /* Image conditioning: [n][cond_channels][h][w], concatenated to x along the channels before
   * the first convolution (an image-conditioned DPM's blurry input). Required by models with
   * model_info.cond_channels > 0, refused by the others; NULL otherwise. */
  const float *cond;
} model_call;

/* Runs c; out receives n * out_channels * h * w floats. Thread-safe. */
int model_run(const model *m, const model_call *c, float *out, err *e);

/* model_run without hooks or text conditioning, for callers with plain arrays. */
int model_eval(const model *m, const float *x, int n, int h, int w, const float *t,
               const int64_t *labels, float *out, int threads, err *e);

/* [C, H, W] of the mid-block output for h x w images; ERR_UNSUPPORTED without one. */
int model_mid_shape(const model *m, int h, int w, int shape[3], err *e);

/* ---------- learned tensors and gradients (UNet2DModel, UNet2DConditionModel) ---------- */

/* One learned tensor, under diffusers' name (attention in the modern to_q/to_k/to_v/to_out.0
 * naming whatever the file used) and shape. data is the trainable float32 copy the model was
 * built from; after changing it call model_repack before the next evaluation. */
typedef struct model_param {
  const char *name;
  int ndim;
  int64_t shape[4];
  size_t count;
  float *data;
  void *map;      /* the loader's: data's file mapping (st_map_f32), or NULL when data is owned */
  size_t map_len; /* ... and its length */
} model_param;

/* Learned tensors in a fixed order (the loader's); 0 for models without any (the GMM). */
int model_param_count(const model *m);
/* Tensor i, or NULL out of range. The pointer lives as long as m. */
const model_param *model_param_at(const model *m, int i);
/* Re-derives the packed (GEMM and Winograd) forms of every layer from the params' data, after
 * an optimizer step or a load. No other thread may evaluate m meanwhile. ERR_NOMEM. */
int model_repack(model *m, err *e);

/* Arithmetic of the network's convolutions and attention projections: fp32 (the default and
 * the exact mode, the one the parity tests hold to) or bf16 (weights and activations rounded
 * to bfloat16 inside the GEMMs, products summed in float32; about 3 significant digits).
 * model_precision_parse takes "fp32" or "bf16" (ERR_INVALID naming the value otherwise). */
typedef enum model_precision { MODEL_FP32 = 0, MODEL_BF16 = 1 } model_precision;
int model_precision_parse(const char *s, model_precision *out, err *e);
/* Switches a loaded model to p (once, before evaluating; fp32 -> bf16 only, as the float
 * weights are dropped). ERR_UNSUPPORTED for bf16 on a CPU without AVX512-BF16 or on a model
 * that is not a UNet. A model_repack (training) returns it to fp32. */
int model_set_precision(model *m, model_precision p, err *e);

/* Gradient buffers, one per model_param in the same order and of the same size. */
typedef struct model_grads model_grads;
int model_grads_new(const model *m, model_grads **out, err *e);
void model_grads_free(model_grads *g);
/* Buffer of tensor i (model_param_at(m, i)->count floats), or NULL out of range. */
float *model_grads_at(const model_grads *g, int i);
void model_grads_zero(model_grads *g);

/* What model_backward computes, for L = sum(grad_out * model(x, t, labels, encoder hidden
 * states)). NULL fields are
 * not computed. grad_x [n][in_channels][h][w] (of x alone: the conditioning image is a constant
 * here), grad_t [n] and grad_class [n][class_embed_dim] (the gradient of the class-embedding row
 * each image adds: the conditioning input) are written; parameter gradients are ADDED to params
 * (model_grads_zero to start over), so several batches accumulate. out, if set, receives the
 * forward output. */
typedef struct model_grad_call {
  const float *grad_out; /* n * out_channels * h * w; required unless loss_grad is set */
  /* Instead of grad_out: called with the forward's output to write the upstream gradient into
   * grad_out (both n * out_channels * h * w), for a loss whose gradient depends on the output.
   * A non-zero return (with e set) stops the call. */
  int (*loss_grad)(const float *out, float *grad_out, void *user, err *e);
  void *loss_user;
  float *out;
  float *grad_x;
  float *grad_t;
  float *grad_class;
  /* [n][seq_len][cross_attention_dim]: the gradient of the text conditioning (text-conditional
   * models only; ignored by the others). Written. */
  float *grad_encoder_hidden_states;
  model_grads *params;
  /* Structure guidance's auxiliary loss (models with guide_scales only; NULL: none): the sharp
   * image [n][in_channels][h][w] whose grayscale, average-pooled by 2^s, each guide network's
   * head regresses. guide_weight * sum over scales of the mean squared error is added to L
   * (its gradient reaches the guide networks only) and written to *guide_loss if set. */
  const float *guide_target;
  float guide_weight;
  double *guide_loss;
} model_grad_call;

/* Forward with a tape, then backward. Memory policy: every activation of the forward is kept
 * (about twice the forward's peak, plus a gradient buffer per activation) and nothing is
 * recomputed but what the rules of engine/grad recompute inside one op. Deterministic: the same
 * inputs give bit-identical gradients on any thread count. Hooks are refused (ERR_UNSUPPORTED),
 * as is a model without parameters. Thread-safe against other evaluations of m. */
int model_backward(const model *m, const model_call *c, const model_grad_call *g, err *e);

/* Approximate multiply-add FLOPs (x2) of one forward on one h x w image (a text-conditional
 * UNet's attending to 77 tokens, CLIP's context length). */
double model_flops(const model *m, int h, int w);

#endif
