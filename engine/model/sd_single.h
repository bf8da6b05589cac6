/* A single-file Stable-Diffusion checkpoint (the original CompVis/Stability key layout that
 * AUTOMATIC1111 and ComfyUI users keep as one .safetensors) seen as the diffusers pipeline
 * folders it converts to: for the UNet, the VAE and the text encoder, a config.json inferred
 * from the tensors' shapes and the tensors under diffusers' (transformers') names, following
 * diffusers' convert_from_ckpt.py; plus the scheduler and tokenizer settings of the family.
 * Nothing is copied: the parts are views of the mapped file. */
#ifndef DENOISED_SD_SINGLE_H
#define DENOISED_SD_SINGLE_H

#include <jansson.h>

#include "err.h"
#include "safetensors.h"

typedef struct sd_single sd_single;

typedef enum {
  SD_PART_UNET,
  SD_PART_VAE,
  SD_PART_TEXT_ENCODER,
  SD_PART_SCHEDULER, /* scheduler_config.json; no tensors */
  SD_PART_TOKENIZER, /* tokenizer_config.json (pad token, length); the vocabulary is not in
                      * the file and comes from elsewhere */
  SD_NPARTS
} sd_part;

/* Opens `path`. Stable Diffusion 1.x (CLIP ViT-L text encoder) and 2.x (OpenCLIP ViT-H) are
 * recognised from their keys; 2.x needs the inference YAML beside the file as A1111 expects
 * (NAME.yaml: "parameterization: v" marks the 768-v models), since the prediction type is not
 * in the weights. ERR_FORMAT / ERR_UNSUPPORTED naming what is missing or not supported (SD-XL,
 * inpainting UNets with 9 input channels are fine; unCLIP and SD-XL are refused). */
int sd_single_open(const char *path, sd_single **out, err *e);
void sd_single_free(sd_single *s);

/* 1 or 2. */
int sd_single_family(const sd_single *s);
/* The part's config (borrowed; lives as long as s). */
const json_t *sd_single_config(const sd_single *s, sd_part part);
/* The part's tensors under diffusers' names (borrowed), NULL for the scheduler and tokenizer. */
const st_file *sd_single_weights(const sd_single *s, sd_part part);

#endif
