/* A Stable-Diffusion pipeline's VAE and text encoder (see latent.h), loaded from the diffusers
 * folder layout and driven as diffusers' StableDiffusionPipeline drives them: the prompt is
 * tokenized to model_max_length and encoded (clip skip through the final layer norm), latents
 * are divided by the VAE's scaling factor (plus its shift) before decoding. */
#include "latent.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clip.h"
#include "mem.h"
#include "pool.h"
#include "sd_single.h"
#include "vae.h"

#define LATENT_PATH_MAX 4096

struct latent_parts {
  latent_info info;
  vae *vae;
  clip_tokenizer *tok;
  clip_text_model *text;
};

/* The parts loaded, their shared facts taken and checked; frees p on failure. `source` names
 * the folder or file in errors. */
static int finish(latent_parts *p, const char *source, latent_parts **out, err *e) {
  const vae_info *vi = vae_get_info(p->vae);
  const clip_text_config *tc = clip_text_config_of(p->text);
  p->info = (latent_info){.factor = vi->factor,
                          .latent_channels = vi->latent_channels,
                          .image_channels = vi->out_channels,
                          .seq_len = clip_tokenizer_length(p->tok),
                          .text_dim = tc->hidden_size,
                          .text_layers = tc->layers,
                          .scaling_factor = vi->scaling_factor,
                          .shift_factor = vi->shift_factor};
  if (p->info.seq_len > tc->max_positions) {
    int rc = err_set(e, ERR_FORMAT,
                     "%s: the tokenizer's model_max_length %d exceeds the text encoder's %d "
                     "positions",
                     source, p->info.seq_len, tc->max_positions);
    latent_parts_free(p);
    return rc;
  }
  *out = p;
  return ERR_OK;
}

int latent_parts_assemble(const char *vae_dir, const char *tokenizer_dir, clip_text_model *text,
                          latent_parts **out, err *e) {
  *out = NULL;
  latent_parts *p = mem_calloc(1, sizeof *p);
  if (!p) {
    clip_text_free(text);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  p->text = text;
  int rc = vae_load(vae_dir, &p->vae, e);
  if (!rc)
    rc = clip_tokenizer_new(tokenizer_dir, &p->tok, e);
  if (rc) {
    latent_parts_free(p);
    return rc;
  }
  return finish(p, vae_dir, out, e);
}

int latent_parts_load(const char *dir, latent_parts **out, err *e) {
  *out = NULL;
  char path[LATENT_PATH_MAX], tok[LATENT_PATH_MAX];
  if (strlen(dir) > LATENT_PATH_MAX - 32)
    return err_set(e, ERR_INVALID, "model directory path is too long");
  clip_text_model *text = NULL;
  snprintf(path, sizeof path, "%s/text_encoder", dir);
  snprintf(tok, sizeof tok, "%s/tokenizer", dir);
  int rc = clip_text_new(path, &text, e);
  return rc ? rc : latent_parts_assemble(dir, tok, text, out, e);
}

int latent_parts_load_single(const sd_single *s, const char *source, const char *tokenizer_dir,
                             latent_parts **out, err *e) {
  *out = NULL;
  latent_parts *p = mem_calloc(1, sizeof *p);
  if (!p)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = vae_load_from(sd_single_config(s, SD_PART_VAE), sd_single_weights(s, SD_PART_VAE),
                         &p->vae, e);
  if (rc)
    err_prefix(e, "%s (VAE)", source);
  if (!rc)
    rc = clip_tokenizer_new_from(tokenizer_dir, sd_single_config(s, SD_PART_TOKENIZER), &p->tok, e);
  if (!rc)
    rc = clip_text_new_from(sd_single_config(s, SD_PART_TEXT_ENCODER),
                            sd_single_weights(s, SD_PART_TEXT_ENCODER), source, &p->text, e);
  if (rc) {
    latent_parts_free(p);
    return rc;
  }
  return finish(p, source, out, e);
}

void latent_parts_free(latent_parts *p) {
  if (!p)
    return;
  vae_free(p->vae);
  clip_tokenizer_free(p->tok);
  clip_text_free(p->text);
  free(p);
}

clip_text_model *latent_text_encoder(latent_parts *p) {
  return p->text;
}

const clip_tokenizer *latent_tokenizer(const latent_parts *p) {
  return p->tok;
}

const latent_info *latent_get_info(const latent_parts *p) {
  return &p->info;
}

int latent_encode_prompt(const latent_parts *p, const char *prompt, int clip_skip, float *states,
                         int *truncated, int threads, err *e) {
  const int len = p->info.seq_len;
  int64_t *ids = malloc((size_t)len * sizeof *ids);
  if (!ids)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = clip_tokenize(p->tok, prompt, strlen(prompt), ids, NULL, truncated, e);
  pool *pl = NULL;
  if (!rc && threads > 1 && !(pl = pool_new(threads)))
    rc = err_set(e, ERR_NOMEM, "out of threads");
  if (!rc)
    rc = clip_text_encode(p->text, ids, 1, len, clip_skip, states, pl, e);
  pool_free(pl);
  free(ids);
  return rc;
}

int latent_encode(const latent_parts *p, const float *images, int n, int h, int w, const float *eps,
                  float *z, int threads, err *e) {
  const size_t count = (size_t)n * p->info.latent_channels * h * w;
  float *std = eps ? malloc(count * sizeof *std) : NULL;
  if (eps && !std)
    return err_set(e, ERR_NOMEM, "out of memory for %d latents of %dx%d", n, h, w);
  const int f = p->info.factor;
  int rc = vae_encode(p->vae, images, n, h * f, w * f, z, std, threads, e);
  /* diffusers: scaling_factor * (latent_dist.sample(generator) - shift_factor) */
  for (size_t k = 0; rc == ERR_OK && k < count; k++)
    z[k] = (float)(((double)z[k] + (eps ? (double)std[k] * eps[k] : 0.0) - p->info.shift_factor) *
                   p->info.scaling_factor);
  free(std);
  return rc;
}

int latent_decode(const latent_parts *p, const float *z, int n, int h, int w, float *images,
                  int threads, err *e) {
  const size_t count = (size_t)n * p->info.latent_channels * h * w;
  float *raw = malloc(count * sizeof *raw);
  if (!raw)
    return err_set(e, ERR_NOMEM, "out of memory for %d latents of %dx%d", n, h, w);
  /* diffusers: vae.decode(latents / scaling_factor + shift_factor) */
  const double inv = 1.0 / p->info.scaling_factor;
  for (size_t k = 0; k < count; k++)
    raw[k] = (float)(z[k] * inv + p->info.shift_factor);
  int rc = vae_decode(p->vae, raw, n, h, w, VAE_TILE_AUTO, images, threads, e);
  free(raw);
  return rc;
}
