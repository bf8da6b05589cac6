/* BoundaryDiffusion edits around the sampler: the latent of a generated or inverted image at the
 * mixing step of a DDIM grid, and the one-step move across a boundary followed by the rest of
 * the chain. Shared by the CLI (`denoised boundary fit`, `denoised edit`) and the daemon. */
#ifndef DENOISED_EDIT_H
#define DENOISED_EDIT_H

#include <jansson.h>
#include <stdatomic.h>
#include <stdint.h>

#include "boundary.h"
#include "err.h"
#include "guidance.h"
#include "model.h"
#include "sampler.h"

/* Where the latents come from, and how the chain is conditioned. */
typedef struct edit_src {
  int batch;
  const float *image;      /* batch images in [-1, 1] to DDIM-invert, or NULL: generate */
  const float *init_noise; /* generating: x_T (NULL: rng stream 0 of seed/first_image) */
  uint64_t seed, first_image;
  const int64_t *labels;    /* classes, or NULL */
  const guidance *guidance; /* or NULL */
  sampler_progress_fn progress;
  void *progress_user;
  const atomic_int *cancel;
  int threads;
  int height, width; /* of the latents the chain runs on (0: the model's sample_size) */
  /* Text-conditional models: the prompt's encoder hidden states [text_seq][cross_attention_dim]
   * every image attends to (guidance carries the unconditional ones), or NULL. */
  const float *text_states;
  int text_seq;
} edit_src;

/* The DDIM sampler of a boundary's grid: solver is {"name": "ddim", "steps": N, "config": {...}}
 * (the boundary file's "solver"), eta the value to run it with; x0 is clipped or thresholded as
 * the recorded config (else the model's scheduler config) says. */
int edit_grid_sampler(const json_t *solver, const json_t *model_config, double eta, sampler **out,
                      err *e);

/* The latents at the start of step `step` of DDIM grid s (run at eta 0): DDIM inversion of the
 * images, or the first `step` steps of sampling from x_T. out: batch * C * H * W. */
int edit_latent_at(const sampler *s, const model *m, int step, const edit_src *src, float *out,
                   int *nfe, err *e);

/* The UNet's mid-block outputs (h) of the evaluation at step `step` of grid s on the latents x
 * (src's batch, labels and guidance): guidance_passes * batch rows of the h shape, the
 * conditional rows first. */
int edit_mid_at(const sampler *s, const model *m, int step, const edit_src *src, const float *x,
                float *mid, err *e);

/* What a boundary edit moves: x_t, the bottleneck h (the boundary's "mid" part), or both as the
 * authors' release does. */
typedef enum { EDIT_SPACE_X = 1, EDIT_SPACE_H = 2, EDIT_SPACE_BOTH = 3 } edit_space;

/* "x", "h", "both"; NULL picks the default for b: both when it has an h part, else x. Returns
 * 0, or -1 for an unknown name. */
int edit_space_parse(const char *name, const boundary *b, edit_space *out);
const char *edit_space_name(edit_space s);

/* One BoundaryDiffusion edit: the latents at the boundary's step (edit_latent_at on `grid`, eta
 * 0); for h, their mid-block outputs (one more evaluation) moved to signed distance
 * strength * b->mid->scale and used instead of the network's own in the first evaluation of the
 * rest; for x, the latents moved to strength * b->scale (strength in units of the spread of the
 * training latents' distances: +-1 is a typical member of either side); then the rest of the
 * chain on `rest` (the same grid; the release runs it with eta = 1, its noise from seed and
 * first_image). latent (optional, batch * C * H * W) receives the unedited latent. */
int edit_boundary(const sampler *grid, const sampler *rest, const model *m, const boundary *b,
                  const edit_src *src, double strength, edit_space space, float *out, float *latent,
                  int *nfe, err *e);

#endif
