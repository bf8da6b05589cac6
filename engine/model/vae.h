/* AutoencoderKL, the latent-diffusion VAE, exactly as diffusers defines it: built from a VAE
 * folder's config.json and loaded from diffusion_pytorch_model.safetensors under diffusers'
 * tensor names (the mid-block attention's legacy query/key/value/proj_attn too; F32, F16 or
 * BF16). Encoding gives the posterior's mean and standard deviation, decoding turns latents back
 * into images, whole or in overlapping tiles blended as diffusers' tiled_decode does. Latents
 * here are raw: the pipeline applies scaling_factor and shift_factor. A loaded VAE is
 * read-only, so any number of threads may use it. */
#ifndef DENOISED_VAE_H
#define DENOISED_VAE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "err.h"
#include "model.h"
#include "safetensors.h"

typedef struct vae vae;

typedef struct vae_info {
  int in_channels, out_channels; /* image channels */
  int latent_channels;
  /* Image pixels per latent pixel along each side, 2^(levels - 1): an image's sides must be
   * multiples of it to encode, a latent of h x w decodes to factor*h x factor*w. */
  int factor;
  int sample_size; /* config "sample_size" (image side the VAE was built for) */
  /* The latent tile of diffusers' tiled decode, sample_size / factor rounded down to a multiple
   * of 4 (at least 4): what automatic tiling uses. */
  int tile;
  /* Latents for the diffusion model are (z - shift_factor) * scaling_factor and go back as
   * z / scaling_factor + shift_factor (diffusers' defaults 0.18215 and 0). */
  double scaling_factor, shift_factor;
  int64_t num_params;
} vae_info;

/* Loads an AutoencoderKL from `dir`: a VAE folder (config.json with "_class_name"
 * "AutoencoderKL" and diffusion_pytorch_model.safetensors) or a pipeline folder
 * (model_index.json and vae/). ERR_IO / ERR_FORMAT / ERR_INVALID / ERR_UNSUPPORTED naming the
 * file and the key or tensor. */
int vae_load(const char *dir, vae **out, err *e);
/* The same from a parsed config and tensors under diffusers' names (a single-file checkpoint's
 * converted view, sd_single.h); the weights are copied, so they may be closed afterwards. */
int vae_load_from(const json_t *config, const st_file *weights, vae **out, err *e);
/* A fresh AutoencoderKL of `config` for training: the model room's initialisation drawn from
 * seed (blocks.h: PyTorch's default layer init, norms 1 and 0, each resnet's conv2 and the
 * attention's output projection zero). */
int vae_init(const json_t *config, uint64_t seed, vae **out, err *e);
void vae_free(vae *v);
const vae_info *vae_get_info(const vae *v);

/* Learned tensors in load order under diffusers' names (the mid-block attention's modern
 * to_q/to_k/to_v/to_out.0 names, whatever the file used); tensor i or NULL out of range. An
 * optimizer writes their data in place and then calls vae_repack (no pass may run meanwhile). */
int vae_param_count(const vae *v);
const model_param *vae_param_at(const vae *v, int i);
int vae_repack(vae *v, err *e);

/* Encodes n images x [n][in_channels][h][w] (h, w multiples of factor) into the posterior
 * diag-Gaussian: mean and std [n][latent_channels][h/factor][w/factor], either may be NULL;
 * std = exp(0.5 * clamp(logvar, -30, 20)) as diffusers. Refuses non-finite input. `threads` >= 1
 * CPU threads. Tiles as vae_encode_tiled with VAE_TILE_AUTO. */
int vae_encode(const vae *v, const float *x, int n, int h, int w, float *mean, float *std,
               int threads, err *e);
/* The same with `tile` as vae_decode takes it (VAE_TILE_AUTO, VAE_TILE_OFF, or a multiple of 4
 * latent pixels): in tiles, the image is cut into tiles of tile*factor pixels, each overlapping
 * the next by a quarter tile, and the tiles' moments (mean and log-variance) are blended
 * linearly over a quarter latent tile, as diffusers' tiled_encode does (to the float). */
int vae_encode_tiled(const vae *v, const float *x, int n, int h, int w, int tile, float *mean,
                     float *std, int threads, err *e);

/* The engine's generator stream of posterior samples (rng.h: image i of the batch, this stream),
 * so that a sample depends only on (seed, image) and never collides with a sampler's noise. */
#define VAE_SAMPLE_STREAM 0x7661656bu

/* A posterior sample: out = mean + std * N(0, 1), the noise of image i drawn from (seed, i,
 * VAE_SAMPLE_STREAM); each array holds n images of per_image values. out may alias mean. */
void vae_sample(const float *mean, const float *std, int n, size_t per_image, uint64_t seed,
                float *out);

/* How vae_decode (and vae_encode_tiled) tile. VAE_TILE_AUTO: whole when the pass's working
 * memory stays within VAE_AUTO_TILE_BYTES, else in tiles of vae_info.tile; VAE_TILE_OFF: always
 * whole; a positive multiple of 4: tiles of that many latent pixels. */
#define VAE_TILE_AUTO 0
#define VAE_TILE_OFF (-1)
#define VAE_AUTO_TILE_BYTES ((size_t)2 << 30)

/* Decodes n latents z [n][latent_channels][h][w] (post_quant_conv, then the decoder) into out
 * [n][out_channels][factor*h][factor*w]. In tiles, each tile of T latent pixels overlaps the
 * next by T/4 and the overlap is blended linearly (diffusers' tiled_decode, to the float), so
 * seams do not show and the working memory is that of one tile whatever the size. Refuses
 * non-finite latents. */
int vae_decode(const vae *v, const float *z, int n, int h, int w, int tile, float *out, int threads,
               err *e);

/* The tile size (latent pixels; 0: whole) vae_decode would use for an h x w latent with
 * `tile`, and vae_encode_tiled for an h x w image. ERR_INVALID for a bad tile or size. */
int vae_decode_tiling(const vae *v, int h, int w, int tile, int *used, err *e);
int vae_encode_tiling(const vae *v, int h, int w, int tile, int *used, err *e);

/* ---------- gradients (vae_grad.c) ---------- */

/* What a backward computes, for L = sum(grad_out * f(input)) where f is the decoder
 * (post_quant_conv and Decoder: images [n][out_channels][f h][f w] of latents) or the encoder
 * (Encoder and quant_conv: the posterior's moments [n][2 latent_channels][h/f][w/f], the mean's
 * channels then the log-variance's, clamped to [-30, 20] as diffusers' DiagonalGaussian-
 * Distribution.logvar, whose gradient is zero outside). NULL fields are not computed. */
typedef struct vae_grad_call {
  const float *grad_out; /* shaped like the output; required unless loss_grad is set */
  /* Instead of grad_out: called with the forward's output to write the upstream gradient (both
   * shaped like the output), for a loss whose gradient depends on it (a training step; it may
   * run another VAE pass, e.g. the decoder's backward inside the encoder's). */
  int (*loss_grad)(const float *out, float *grad_out, void *user, err *e);
  void *loss_user;
  float *out;           /* the forward's output */
  float *grad_in;       /* dL/d(latents) or dL/d(images), written */
  float *const *params; /* vae_param_count buffers, one per vae_param_at: gradients ADDED */
  int threads;          /* >= 1 */
} vae_grad_call;

/* Forward on a tape of engine/grad nodes (every activation kept: about twice a forward's peak
 * memory plus a gradient per activation, for the whole batch at once), then backward.
 * Deterministic: bit-identical on any thread count. ERR_INVALID for bad sizes or non-finite
 * input, ERR_NOMEM. Thread-safe against other passes of v. */
int vae_decode_backward(const vae *v, const float *z, int n, int h, int w, const vae_grad_call *g,
                        err *e);
int vae_encode_backward(const vae *v, const float *x, int n, int h, int w, const vae_grad_call *g,
                        err *e);

/* FLOPs (2 x multiply-adds) of one image's whole decode of an h x w latent, and of its encode
 * of a (factor*h) x (factor*w) image. */
double vae_decode_flops(const vae *v, int h, int w);
double vae_encode_flops(const vae *v, int h, int w);

#endif
