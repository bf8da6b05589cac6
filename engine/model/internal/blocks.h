/* The pieces every network of the model room is built from, under diffusers' tensor names:
 * config.json getters, a loader that reads (or freshly initialises) each learned tensor and
 * records it in load order, group norm, convolution, linear, the resnet and attention blocks,
 * and a run context that evaluates them (or, dry, only counts their FLOPs). UNet2DModel,
 * AutoencoderKL and UNet2DConditionModel share them, so a block means the same thing in each.
 * Private to the model room. */
#ifndef DENOISED_BLOCKS_H
#define DENOISED_BLOCKS_H

#include <jansson.h>
#include <pthread.h>
#include <stdint.h>

#include "arena.h"
#include "err.h"
#include "model.h"
#include "ops.h"
#include "pool.h"
#include "safetensors.h"

/* ---------- a network's folder ---------- */

#define BLOCKS_PATH_MAX 4096
#define BLOCKS_MAX_CONFIG_BYTES (1 << 20)

/* The folder of one network of `dir` into net_dir (BLOCKS_PATH_MAX bytes): dir itself, or
 * dir/<sub> when dir is a diffusers pipeline (holds model_index.json; *pipeline says which).
 * The folder must hold config.json. ERR_IO / ERR_FORMAT / ERR_INVALID naming the folder. */
int blocks_net_dir(const char *dir, const char *sub, char *net_dir, int *pipeline, err *e);
/* A config file's JSON object (duplicate keys refused, at most BLOCKS_MAX_CONFIG_BYTES), or
 * NULL with e set. */
json_t *blocks_read_json(const char *path, err *e);
/* Opens the safetensors checkpoint net_dir/<file>, its path into path (BLOCKS_PATH_MAX bytes);
 * a PyTorch .bin in its place gets the conversion command in the error. */
int blocks_open_weights(const char *net_dir, const char *file, st_file **st, char *path, err *e);

/* ---------- config.json ---------- */

/* Each leaves *out at `def` when the key is absent or null, else checks the value. */
int blocks_get_int(const json_t *cfg, const char *key, int def, int min, int max, int *out, err *e);
int blocks_get_num(const json_t *cfg, const char *key, double def, double *out, err *e);
int blocks_get_bool(const json_t *cfg, const char *key, int def, int *out, err *e);
/* A string that must be one of `allowed` (NULL-terminated); *out points into `allowed`. */
int blocks_get_choice(const json_t *cfg, const char *key, const char *def,
                      const char *const *allowed, const char **out, err *e);
/* A list of 1 to `max` names, each one of `allowed` ("UNetRes" prefixes dropped, as diffusers
 * does); *n is its length. */
int blocks_get_list(const json_t *cfg, const char *key, const char *const *def, int ndef,
                    const char *const *allowed, int max, const char **out, int *n, err *e);
/* ERR_UNSUPPORTED naming the first key that is neither in `known` nor private ("_..."). */
int blocks_check_keys(const json_t *cfg, const char *const *known, int nknown,
                      const char *class_name, err *e);

/* ---------- learned tensors ---------- */

/* The learned tensors of one network in load order (names and data owned) and its packed
 * layers (unpacked by blocks_params_free). */
typedef struct blocks_params {
  model_param *params;
  int nparams, cap;
  conv2d **convs;
  int nconvs, conv_cap;
  int64_t count; /* learned values */
} blocks_params;

void blocks_params_free(blocks_params *ps);
/* Frees a param's data: its file mapping (st_map_f32) or its allocation. */
void blocks_param_release(model_param *mp);
/* Unpacks and packs every layer again from the params' data (after an optimizer step). */
int blocks_params_repack(blocks_params *ps, err *e);
/* Every packed layer to bf16 (ops_conv2d_to_bf16): ERR_UNSUPPORTED when the CPU has no
 * AVX512-BF16, ERR_NOMEM. */
int blocks_params_to_bf16(blocks_params *ps, err *e);

/* Reads tensors from a checkpoint, or (st NULL) draws a fresh training initialisation from
 * seed: PyTorch's default for Conv2d and Linear, norms 1 and 0, a class embedding N(0, 1), and
 * zeros for the last convolution of every resnet, every attention output and conv_out, so each
 * block starts as the identity (the DDPM trick that steadies early training). The numbers come
 * from the engine's counter-based generator (tensor i is stream i of the seed), so they differ
 * from torch's but not between runs or machines. */
typedef struct blocks_loader {
  blocks_params *ps;
  const st_file *st;
  unsigned char *used; /* per tensor of the file: has a layer claimed it */
  err *e;
  uint64_t seed;
  int64_t fan_in; /* of the last weight initialised, for the bias that follows it */
} blocks_loader;

int blocks_loader_begin(blocks_loader *ld, blocks_params *ps, const st_file *st, uint64_t seed,
                        err *e);
/* Ends loading: with rc == ERR_OK, a tensor of the file no layer claimed is an ERR_FORMAT
 * (the config and the weights disagree; refuse to guess). Returns the final code. */
int blocks_loader_end(blocks_loader *ld, int rc);

typedef struct group_norm {
  int groups, channels;
  float eps;
  float *gamma, *beta;
} group_norm;

typedef struct linear {
  int in, out;
  float *weight, *bias;
} linear;

/* A ResnetBlock2D: norm1, SiLU, conv1, the time projection (none when temb_dim is 0, as in
 * the VAE), norm2, SiLU, conv2, a 1x1 shortcut when the widths differ; up/down resample both
 * paths (nearest 2x or average pool) after norm1, as diffusers' resnet up/downsamplers do. */
typedef struct resnet {
  int cin, cout, up, down, scale_shift;
  float out_scale;
  group_norm norm1, norm2;
  conv2d conv1, conv2, shortcut;
  int has_shortcut;
  linear temb_proj;
} resnet;

typedef struct resnet_spec {
  int groups;
  double eps;
  int temb_dim; /* 0: no time embedding */
  int scale_shift, up, down;
  float out_scale;
} resnet_spec;

float *blocks_load_tensor(blocks_loader *ld, const char *name, int ndim, const int64_t *shape);
int blocks_load_group_norm(blocks_loader *ld, const char *prefix, int groups, int channels,
                           double eps, group_norm *gn);
/* A k x k convolution with symmetric padding `pad`, packed for the forward. */
int blocks_load_conv(blocks_loader *ld, const char *prefix, int cin, int cout, int k, int stride,
                     int pad, int bias, conv2d *c);
/* A linear layer; a [out, in, 1, 1] weight (old checkpoints' 1x1 convolutions) is accepted. */
int blocks_load_linear(blocks_loader *ld, const char *wname, const char *bname, int in, int out,
                       float **w, float **b);
/* A Linear layer (weight [out, in], bias optional) applied to channel-major tokens
 * ([n][in][positions], the activations' layout): the same product as a 1x1 convolution, so it
 * is packed as one and run with blocks_conv on (positions x 1) inputs. */
int blocks_load_token_linear(blocks_loader *ld, const char *prefix, int in, int out, int bias,
                             conv2d *c);
int blocks_load_resnet(blocks_loader *ld, const char *prefix, const resnet_spec *s, int cin,
                       int cout, resnet *r);
/* Single-sequence self-attention over the pixels with an optional group norm (groups 0: none),
 * heads of head_dim, the residual added and divided by rescale; legacy names (query, key,
 * value, proj_attn) are read and given their modern names. */
int blocks_load_attention(blocks_loader *ld, const char *prefix, int channels, int head_dim,
                          int groups, double eps, float rescale, attn_weights *a);

/* ---------- workspaces ---------- */

typedef struct workspace {
  arena *a;
  pool *p;
} workspace;

#define BLOCKS_MAX_SPARE 8

/* Workspaces (arena + thread pool) of finished passes, reused so that steady-state sampling
 * touches no fresh pages and starts no threads; one per concurrent caller. */
typedef struct blocks_spares {
  pthread_mutex_t lock;
  workspace spare[BLOCKS_MAX_SPARE];
  int nspare;
} blocks_spares;

void blocks_spares_init(blocks_spares *s);
void blocks_spares_free(blocks_spares *s);
/* A workspace with a pool of `threads` from the spares, or a new one; give it back (reset)
 * when done. The arena keeps the high-water mark of its uses until the spares are freed. */
int blocks_workspace_take(blocks_spares *s, int threads, workspace *ws, err *e);
void blocks_workspace_give(blocks_spares *s, workspace *ws);

/* ---------- running ---------- */

/* One pass over n images; dry passes compute shapes and FLOPs only (x and y may be NULL). */
typedef struct blocks_run {
  arena *a;
  pool *p;
  int n, dry;
  double flops;
  const float *temb_act; /* silu(time embedding), [n][temb_dim], read by every resnet */
} blocks_run;

/* n x c x h x w floats from the run's arena, or NULL. */
float *blocks_act(blocks_run *f, int c, int h, int w);
int blocks_conv(blocks_run *f, const conv2d *c, const float *x, int h, int w, float *y);
void blocks_norm(blocks_run *f, const group_norm *g, const float *x, int hw, int silu, float *y);
/* The time embedding every resnet reads: diffusers' Timesteps sinusoid (ch0 wide) of t, then
 * linear_1, SiLU, linear_2, plus each image's row of class_table (NULL: none), then SiLU, into
 * f->temb_act ([n][l2->out], from the arena). Nonzero when out of memory. */
int blocks_time_embedding(blocks_run *f, const float *t, int ch0, int flip_sin_to_cos,
                          float freq_shift, const linear *l1, const linear *l2,
                          const float *class_table, const int64_t *labels);
/* out (n x (ca + cb) x hw) = a (n x ca x hw) and b (n x cb x hw) stacked along the channels:
 * an up block's input and its skip connection. */
void blocks_concat(blocks_run *f, const float *a, int ca, const float *b, int cb, int hw,
                   float *out);
/* y (n x cout x h' x w') = the resnet of x; nonzero when out of memory. */
int blocks_resnet_forward(blocks_run *f, const resnet *r, const float *x, int h, int w, float *y);
/* The same with `add` (n x cout x h' x w', or NULL) added to conv1's output before the time
 * embedding: a second input of the block, the sum conv1(h) + add being what a convolution of h
 * and that input concatenated gives (multiscale structure guidance, unet.c). */
int blocks_resnet_forward_add(blocks_run *f, const resnet *r, const float *x, int h, int w,
                              const float *add, float *y);
/* x = attention(x) in place. */
int blocks_attn_forward(blocks_run *f, const attn_weights *aw, float *x, int hw);

#endif
