/* Inversion of images into a model's noise space, and the edits it enables: deterministic DDIM
 * inversion (the probability-flow ODE run backwards), and the edit-friendly DDPM noise space of
 * Huberman-Spiegelglas, Kulikov & Michaeli (CVPR 2024), whose noise maps make DDPM sampling
 * reproduce the image exactly and carry class changes, shifts and colour edits. */
#ifndef DENOISED_INVERT_H
#define DENOISED_INVERT_H

#include <jansson.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "guidance.h"
#include "model.h"
#include "sampler.h"

/* Random streams of the edit-friendly x_t draws: stream INVERT_STREAM + k for step k, apart
 * from the sampler's (0 for x_T, evaluation index + 1 for step noise). */
#define INVERT_STREAM 0x40000000u

typedef struct invert_opts {
  int batch;
  int height, width;        /* 0: the model's sample_size */
  const int64_t *labels;    /* the images' classes, or NULL */
  const guidance *guidance; /* guidance of the inversion's model calls, or NULL */
  /* Text-conditional models: the prompt's encoder hidden states [text_seq][cross_attention_dim]
   * every image attends to (the guidance's uncond_states are the unconditional ones), or NULL. */
  const float *text_states;
  int text_seq;
  uint64_t seed;        /* edit-friendly: the independent noise of every x_t */
  uint64_t first_image; /* rng image index of the first image */
  sampler_progress_fn progress;
  void *progress_user;
  const atomic_int *cancel;
  int threads;
} invert_opts;

/* DDIM inversion of images x0 (batch * C * H * W in [-1, 1]) with the grid of DDIM sampler s,
 * run backwards to the state at the start of step `stop_step` (0: x_T): the input a DDIM run
 * with start_step = stop_step takes to bring the images back. Each step evaluates the model at
 * the higher timestep on the lower state, as diffusers' DDIMInverseScheduler does, but never
 * clips x0 whatever clip_sample says (a clipped step cannot be run backwards; sample back with
 * clip_sample false too). out: batch * C * H * W; *nfe the evaluations per image. */
int invert_ddim(const sampler *s, const model *m, const invert_opts *o, const float *x0,
                int stop_step, float *out, int *nfe, err *e);

/* The sampler edit-friendly inversion runs on: DDIM with eta = 1 (DDPM's posterior noise),
 * set_alpha_to_one false (the chain ends at alpha_bar[0], where the image is), and clip_sample
 * and thresholding false (a last step from t = 0 adds no noise, so it must leave x0 as it is;
 * the authors' Stable Diffusion scheduler does not clip either). model_config is the model's
 * scheduler config (or NULL), config a further layer of scheduler keys (or NULL), steps 0 for
 * DDIM's default. */
int invert_ddpm_sampler(const json_t *model_config, const json_t *config, int steps, sampler **out,
                        err *e);

/* Edit-friendly inversion: with n = sampler_num_steps(s) (a DDIM sampler with eta > 0, e.g.
 * from invert_ddpm_sampler), draws every x_t of the grid independently from q(x_t | x0), then
 * solves z_t from consecutive x_t the way the sampler steps, each x_{t-1} recomputed from its z
 * so that sampling reproduces the chain bit for bit; the chain ends on x0 itself. Every step
 * must add noise, except a last one from t = 0 to alpha_bar[0], which is the identity (x0 is
 * then its input). maps: batch * (n + 1) * C * H * W, per image x_T then the noise of steps
 * 0 .. n-1. */
int invert_ddpm(const sampler *s, const model *m, const invert_opts *o, const float *x0,
                float *maps, int *nfe, err *e);

/* DDPM sampling with noise maps from invert_ddpm (possibly edited): reproduces the inverted
 * images with the inversion's labels and guidance, and makes the edits with others. skip
 * (T_skip) > 0 runs the first skip steps with src_labels/src_guidance (the inversion's, which
 * gives back its chain exactly) and the rest with o->labels/o->guidance; o's seed and
 * first_image are not used. With a text model the source prompt (so->src_text_states) takes the
 * place of the source labels and o->text_states of the labels. */
typedef struct invert_sample_opts {
  int skip;
  const int64_t *src_labels;
  const guidance *src_guidance;
  const float *src_text_states; /* the source prompt's states (text models), or NULL */
} invert_sample_opts;
int invert_ddpm_sample(const sampler *s, const model *m, const invert_opts *o,
                       const invert_sample_opts *so, const float *maps, float *out, int *nfe,
                       err *e);

/* The edits of a further run from noise maps: the maps are edit-friendly DDPM maps (ddpm: n + 1
 * per image) or a DDIM x_T; shift by (dx, dy) pixels; colour offset (in [-1, 1] image units,
 * RGB; luma for 1-channel models) through the maps of the steps from colour_from (-1: the last
 * quarter) on. */
typedef struct invert_edit {
  int ddpm;
  int dx, dy;
  int has_colour;
  float colour[3];
  int colour_from;
} invert_edit;

/* Applies ed to maps (in place) and samples: invert_ddpm_sample for ddpm maps (so->skip, the
 * source labels and guidance), else a run of s from x_T = maps with o's labels and guidance.
 * The one path of `denoised edit --noise` and of the daemon's inversion jobs. */
int invert_edit_sample(const sampler *s, const model *m, const invert_opts *o,
                       const invert_sample_opts *so, const invert_edit *ed, float *maps, float *out,
                       int *nfe, err *e);

/* Translates every map of every image by (dx, dy) pixels (x to the right, y down), wrapping
 * around the borders so the maps keep their statistics. */
void invert_maps_shift(float *maps, int batch, int nmaps, int c, int h, int w, int dx, int dy);

/* Colour edit in the noise space ([derived]; the paper shows the effect without a recipe):
 * adds delta[ch] / (K sigma_k) to channel ch of the noise maps of the last K = n - from steps,
 * so each adds delta / K to the chain where the step adds it and the model carries the change
 * through the remaining steps. s must be the sampler the maps belong to. */
int invert_maps_colour(const sampler *s, float *maps, int batch, int c, int h, int w,
                       const float *delta, int from, err *e);

#endif
