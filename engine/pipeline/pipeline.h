/* One request in, images out: the single job runner of `denoised sample/invert/edit` and of the
 * daemon's workers (stable-diffusion.cpp's generate_image plays this part for its CLI and
 * server). It owns the solver spec to sampler step, the replication of one input picture over
 * the batch, every job kind, one progress count over all phases, the noise sidecar of
 * inversions and the PNG bytes with their metadata. Front ends keep what is theirs: flags,
 * files and messages (cli/); specs, states, events, batching and durability (queue/). A new
 * job kind is a new pipeline_kind here, not a branch in a front end. */
#ifndef DENOISED_PIPELINE_H
#define DENOISED_PIPELINE_H

#include <jansson.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "boundary.h"
#include "edit.h"
#include "err.h"
#include "guidance.h"
#include "invert.h"
#include "latent.h"
#include "meta.h"
#include "model.h"
#include "sampler.h"

typedef enum {
  PIPELINE_GENERATE,    /* from noise; img2img with an input image, inpainting with a mask */
  PIPELINE_INVERT_DDIM, /* DDIM inversion of the input (or given x_T), sampled with edits */
  PIPELINE_INVERT_DDPM, /* edit-friendly DDPM inversion (or given maps), sampled with edits */
  PIPELINE_BOUNDARY,    /* BoundaryDiffusion: an input or generated image moved across a
                         * boundary at its mixing step */
  PIPELINE_DEBLUR,      /* restoration of the input image (the degraded one): sampled from noise
                         * by an image-conditioned model (model_info.cond_channels) given it,
                         * or one evaluation at t = 0 of a regression model */
} pipeline_kind;

/* What a request says about the solver, in the words of the JSON API (`scheduler`). */
typedef struct pipeline_solver {
  const char *name;      /* a solver name or alias (sampler_solver_class) */
  int steps;             /* 0: the solver's default */
  const json_t *config;  /* scheduler_config keys over the model's (a user's file, or the
                          * resolved config a replayed image recorded), or NULL */
  const char *data;      /* the solver's data (DPM-Solver-v3 statistics): a file, or a bare
                          * name of the model's (MODEL/solver_data/NAME.json), or NULL */
  const json_t *options; /* further keys the solver reads (scheduler.options, --scheduler-opt),
                          * or NULL */
} pipeline_solver;

/* The one place a request's solver becomes a sampler: the model's scheduler_config.json, then
 * s->config, then s->options, and a prediction type the model does not make is refused. On
 * error `field` (if given) names the part at fault as the JSON API spells it: scheduler.name,
 * scheduler.steps, scheduler.config, scheduler.data, scheduler.options or
 * scheduler.options.KEY. */
int pipeline_sampler(const model *m, const pipeline_solver *s, sampler **out, char *field,
                     size_t fieldlen, err *e);

/* What pipeline_sampler reads of a model, so that a solver can be checked where the model is
 * not loaded (a daemon accepting a job another daemon of its group runs): its
 * scheduler_config.json (NULL: the solver's defaults), the prediction type it makes (NULL or "":
 * any) and its folder for named solver data (NULL: none can be named). */
typedef struct pipeline_sched_source {
  const json_t *config;
  const char *prediction_type;
  const char *dir;
} pipeline_sched_source;

/* pipeline_sampler over what src says of the model. */
int pipeline_sampler_from(const pipeline_sched_source *src, const pipeline_solver *s, sampler **out,
                          char *field, size_t fieldlen, err *e);

/* The run's class and guidance against what s's solver data was computed for
 * (sampler_data_check), in the words of the request (a named data by its name, never its
 * path). pipeline_run checks it; front ends call it to refuse a job before accepting it. */
int pipeline_check_data(const model *m, const pipeline_solver *ps, const sampler *s,
                        const guidance *g, const int64_t *labels, int batch, err *e);

/* Arguments of the inversion kinds' sampling run (edit-friendly edits of the paper). */
typedef struct pipeline_invert_args {
  const int64_t *source_labels;    /* the inversion's classes per image, or NULL: the labels */
  const guidance *source_guidance; /* the inversion's guidance, or NULL: none */
  const char *source_prompt;       /* text models: the inversion's prompt (the one the input
                                    * image shows), or NULL: the prompt; the edit samples with
                                    * the prompt after the first skip steps */
  int skip;                        /* T_skip of the DDPM maps */
  invert_edit edit;                /* shift and colour (edit.ddpm is set by the pipeline) */
  const json_t *maps_config;       /* given maps: the scheduler_config they were made with */
  int invert_only;                 /* stop after the inversion: result.noise, no images */
} pipeline_invert_args;

/* Arguments of a boundary edit. */
typedef struct pipeline_boundary_args {
  const boundary *boundary;
  double strength; /* signed target distance in spreads */
  edit_space space;
  double eta; /* of the steps after the mixing step (the release: 1) */
} pipeline_boundary_args;

typedef struct pipeline_request {
  pipeline_kind kind;
  pipeline_solver solver; /* GENERATE and inversions (their grid); boundaries use the file's */
  int batch;
  int height, width; /* 0: the model's sample_size */
  uint64_t seed, first_image;
  const int64_t *labels; /* one class per image, or NULL */
  /* Latent text-to-image models (model_latent): the prompt every image follows, the negative
   * prompt guidance steers away from (NULL: the empty prompt), clip skip (0 or 1: the last
   * layer). height/width are the image's (multiples of the VAE's factor, not necessarily
   * square); the sampler runs on latents 1/factor the size. Every kind but DEBLUR runs there:
   * input pictures are VAE-encoded (img2img and inpainting: a posterior sample, eps from
   * rng stream VAE_SAMPLE_STREAM of (seed, image) as diffusers' latent_dist.sample(generator);
   * inversions and boundary edits: the posterior mean, as the edit-friendly authors' code),
   * masks reduced to the latent size (binarized at 0.5, nearest, as diffusers), noise and
   * noise maps are latents, and the result is decoded. */
  const char *prompt, *negative_prompt;
  int clip_skip;
  const guidance *guidance; /* classifier-free guidance, or NULL */
  /* Classifier guidance (guidance.h) of generation, img2img and inpainting, or NULL. */
  const classifier_guidance *classifier;
  /* An input picture (C x H x W in [-1, 1]) per image, or one (images == 1) for the whole
   * batch; NULL for none. mask likewise (H x W, 1 = generate). DEBLUR: the degraded picture,
   * of the model's cond_channels (a regression model's in_channels). */
  const float *image;
  int images;
  const float *mask;
  double strength; /* img2img / inpainting: the share of the grid that runs */
  /* GENERATE: x_T per image (batch x C x H x W) instead of the seed's. Inversions: the given
   * noise (DDPM maps, batch x (steps + 1) x C x H x W, or a DDIM x_T) instead of inverting the
   * image. NULL for neither. */
  const float *noise;
  const int64_t *noise_shape; /* the noise's shape as given (checked against the kind's), or NULL */
  int noise_ndim;
  pipeline_invert_args invert;
  pipeline_boundary_args bound;
} pipeline_request;

/* Where a run is: one count over every phase (inversion, then sampling; latent, h, the rest).
 * total is 0 for data-dependent solvers. */
typedef struct pipeline_progress {
  int step, total, nfe;
  const uint8_t *preview; /* when due, a small PNG of image 0's predicted x0, else NULL */
  size_t preview_len;
} pipeline_progress;
typedef void (*pipeline_progress_fn)(const pipeline_progress *p, void *user);

/* How a front end follows and steers a run. */
typedef struct pipeline_hooks {
  pipeline_progress_fn progress;
  void *progress_user;
  int preview_every; /* steps between previews in sampling phases (and the last); 0: none */
  const atomic_int *cancel;
  int threads;
  /* A batch of several requests (the daemon's batching): per-image noise streams and x_T, so
   * every image equals the one it would be alone. NULL for a single request. */
  sampler_noise_fn noise;
  void *noise_user;
} pipeline_hooks;

typedef struct pipeline_result {
  float *images;    /* batch x C x H x W in [-1, 1] (not clamped), malloc'ed */
  sampler *sampler; /* the solver of the final sampling run, for metadata */
  uint8_t *noise;   /* an inversion's noise as .npy bytes, or NULL */
  size_t noise_len;
  int nfe; /* network evaluations per image, all phases */
  int height, width;
} pipeline_result;

void pipeline_result_clear(pipeline_result *r);

/* Given noise (x_T, or an inversion's maps) is standard normal or close to it; values beyond
 * +-PIPELINE_NOISE_MAX are not noise and overflow float32 within a few steps (a solver scales
 * x_T by up to sigma_max), so they are refused like NaN and infinity. */
#define PIPELINE_NOISE_MAX 1e4
/* ERR_INVALID naming `field` and the first value that is not finite or beyond the bound. */
int pipeline_check_noise(const float *noise, size_t count, const char *field, err *e);

/* Runs r on m. Checks what the model cannot do (sizes, guidance, the boundary's dimension) with
 * errors naming the request's part. out is cleared first and on error, except ERR_CANCELLED,
 * where out->images holds the last completed step's samples (the caller clears it). */
int pipeline_run(const model *m, const pipeline_request *r, const pipeline_hooks *h,
                 pipeline_result *out, err *e);

/* The edit block of image i of r as the JSON API spells it ({"type": "img2img" | "inpaint" |
 * "invert_ddim" | "invert_ddpm" | "boundary", and the kind's arguments}), or NULL for plain
 * generation; a new reference. */
json_t *pipeline_edit_json(const pipeline_request *r, int i);

/* Image i of a finished run of r (chw: its C x H x W floats) as PNG bytes with the metadata of
 * meta.h: r's seed, class, guidance and edit, the solver that ran (s), and the model as the front
 * end names it (a folder for the CLI, a configured name for the daemon); extra keys (or NULL)
 * join the JSON record. *png is malloc'ed. */
int pipeline_png(const model *m, const pipeline_request *r, const sampler *s, const float *chw,
                 int i, const char *model_name, const json_t *extra, uint8_t **png, size_t *len,
                 err *e);

#endif
