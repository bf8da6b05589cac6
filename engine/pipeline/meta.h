/* Reproducibility metadata of a generated image, shared by the CLI and the daemon: the
 * AUTOMATIC1111 infotext ("parameters" tEXt) and the full resolved request as JSON ("denoised"
 * iTXt), which is enough to regenerate that one image bit for bit. */
#ifndef DENOISED_META_H
#define DENOISED_META_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "schedule.h"

#define META_VERSION "denoised 0.1.0"
#define META_TEXT_KEY "parameters" /* A1111 infotext, tEXt */
#define META_JSON_KEY "denoised"   /* the resolved request, iTXt */

typedef struct meta_image {
  const char *model; /* what regenerates it: a model folder (CLI) or a configured name (daemon) */
  const char *solver;
  int steps;
  uint64_t seed;
  uint64_t image_index; /* rng image index: position in the batch plus first_image */
  int height, width;
  const sched_config *cfg;
  const char *solver_data; /* the solver's data file (JSON "solver_data"), or NULL */
  int has_label;
  int64_t label;
  int has_guidance; /* classifier-free guidance: A1111 "CFG scale", JSON "guidance_scale" */
  double guidance_scale;
  int has_strength; /* img2img / inpainting: A1111 "Denoising strength", JSON "strength" */
  double strength;
  const json_t *edit;  /* the edit block as the JSON API spells it ({"type": ...}), or NULL */
  const json_t *extra; /* more keys for the JSON (e.g. the job id), or NULL */
  /* The infotext in AUTOMATIC1111's names (their route): "Sampler: Euler a" instead of our
   * solver name, and "Schedule type: Karras" after it; NULL for ours and none. */
  const char *sampler_label, *schedule_label;
  /* Text-to-image: the prompt and negative prompt (NULL: none), clip skip (0: default). */
  const char *prompt, *negative_prompt;
  int clip_skip;
} meta_image;

/* The JSON record (new reference), keys as `denoised sample --replay` reads them. */
json_t *meta_json(const meta_image *m);

/* With a prompt, A1111's layout: the prompt, "Negative prompt: N" on its own line, then the
 * settings line; the settings line itself is "Steps: 50, Sampler: ddim, Seed: 1, Size: 32x32,
 * Model: NAME, ..., Version: ..." where NAME is the last path component of m->model; solver data
 * adds "Solver data: NAME" (a file: its last path component), an edit "Edit: TYPE". */
void meta_infotext(const meta_image *m, char *buf, size_t n);

/* One CHW float image (out_channels of the model: 1 or 3+, in [-1, 1]) as PNG bytes carrying
 * both text chunks; *png is malloc'ed. */
int meta_png_encode(const meta_image *m, const float *chw, int channels, uint8_t **png,
                    size_t *png_len, err *e);

#endif
