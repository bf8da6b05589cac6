/* The parts of a latent text-to-image model (a Stable-Diffusion pipeline folder) beside its
 * UNet: the VAE that maps images to the latents the UNet denoises and back, and the CLIP
 * tokenizer and text encoder that turn prompts into the hidden states it attends to. The
 * pipeline room uses them around a sampling run; the model owns them (model_latent). */
#ifndef DENOISED_LATENT_H
#define DENOISED_LATENT_H

#include <stddef.h>

#include "err.h"

typedef struct latent_parts latent_parts;

typedef struct latent_info {
  int factor;          /* image pixels per latent pixel along a side (8 for SD) */
  int latent_channels; /* the VAE's, which must be the UNet's in_channels */
  int image_channels;
  int seq_len;     /* tokens per prompt (77) */
  int text_dim;    /* hidden size of the text encoder, the UNet's cross_attention_dim */
  int text_layers; /* the text encoder's transformer layers: clip skip runs from 1 to this */
  double scaling_factor, shift_factor;
} latent_info;

/* Loads dir's vae/, tokenizer/ and text_encoder/ (model_index.json names them). ERR_* naming
 * the folder and what is wrong. */
int latent_parts_load(const char *dir, latent_parts **out, err *e);
/* The same from a single-file checkpoint's VAE and text encoder (sd_single.h; the weights are
 * copied, s may be freed afterwards) with the vocabulary from tokenizer_dir (vocab.json,
 * merges.txt: the file has none) and the family's special tokens. source names the file. */
struct sd_single;
int latent_parts_load_single(const struct sd_single *s, const char *source,
                             const char *tokenizer_dir, latent_parts **out, err *e);
/* The parts from separate folders, for training a text-to-image model: the VAE of vae_dir (a
 * VAE folder or a pipeline folder), the tokenizer of tokenizer_dir, and `text`, a text encoder
 * the parts take over (freed with them, also on failure). */
struct clip_text_model;
struct clip_tokenizer;
int latent_parts_assemble(const char *vae_dir, const char *tokenizer_dir,
                          struct clip_text_model *text, latent_parts **out, err *e);
/* The text encoder (writable: a trainer updates its weights) and the tokenizer. */
struct clip_text_model *latent_text_encoder(latent_parts *p);
const struct clip_tokenizer *latent_tokenizer(const latent_parts *p);
void latent_parts_free(latent_parts *p);
const latent_info *latent_get_info(const latent_parts *p);

/* One prompt (UTF-8, len bytes; "" for the unconditional one) to hidden states
 * [seq_len][text_dim], clip_skip counted as AUTOMATIC1111 does (1: the last layer). *truncated
 * (may be NULL) tells whether tokens beyond the 75 the encoder sees were dropped. */
int latent_encode_prompt(const latent_parts *p, const char *prompt, int clip_skip, float *states,
                         int *truncated, int threads, err *e);

/* Images [n][image_channels][factor h][factor w] in [-1, 1] to latents as the UNet sees them
 * [n][latent_channels][h][w]: (posterior - shift_factor) * scaling_factor, where the posterior is
 * its mean when eps is NULL, else mean + std * eps (eps: n latents of standard normal noise, what
 * diffusers' latent_dist.sample(generator) draws). */
int latent_encode(const latent_parts *p, const float *images, int n, int h, int w, const float *eps,
                  float *z, int threads, err *e);

/* Latents as the UNet sees them (scaled) [n][latent_channels][h][w] to images
 * [n][image_channels][factor h][factor w] in about [-1, 1], unclamped. */
int latent_decode(const latent_parts *p, const float *z, int n, int h, int w, float *images,
                  int threads, err *e);

#endif
