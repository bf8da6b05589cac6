/* The sampling loop: a solver (DDPM, DDIM, ...) built from a name and a scheduler config walks
 * pure noise down to an image, asking the model for one evaluation per step. The loop owns the
 * model calls, progress, cancellation and the random streams; solvers only do step arithmetic. */
#ifndef DENOISED_SAMPLER_H
#define DENOISED_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"
#include "schedule.h"

typedef struct sampler sampler;

/* Built-in solver names, for listings and validation messages. */
int sampler_solver_count(void);
const char *sampler_solver_name(int i);
/* The diffusers class a solver mirrors ("DDIMScheduler"), whose defaults the scheduler config
 * should be built with (sched_config_init / sched_config_from_json); NULL if unknown. */
const char *sampler_solver_class(const char *solver);
/* Default number of inference steps (diffusers' pipeline default), 0 if unknown. */
int sampler_solver_default_steps(const char *solver);

/* A solver `name` for num_inference_steps steps (0: the solver's default) on the training
 * schedule of cfg, which is copied. The result is read-only: one sampler may serve any number
 * of concurrent sampler_run calls. */
int sampler_new(const char *name, const sched_config *cfg, int num_inference_steps, sampler **out,
                err *e);
void sampler_free(sampler *s);

const char *sampler_name(const sampler *s);
int sampler_num_steps(const sampler *s);
/* The timestep handed to the model at each step, num_steps values (integral for DDPM/DDIM;
 * solvers on a sigma grid may give fractional ones). */
const double *sampler_timesteps(const sampler *s);
/* Network evaluations one image costs for a whole run. */
int sampler_nfe(const sampler *s);

/* Called after every step: step counts 1..total, nfe the evaluations per image so far. */
typedef void (*sampler_progress_fn)(int step, int total, int nfe, void *user);

/* Supplies the standard normal noise a stochastic step adds to one image: `image` is the rng
 * image index (first_image + position in the batch), `stream` is step index + 1. The default
 * (NULL) is rng_normal(seed, image, stream, out, n); tests and inversion methods replace it. */
typedef int (*sampler_noise_fn)(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                                err *e);

typedef struct sampler_run_opts {
  int batch;         /* images, >= 1 */
  int height, width; /* 0: the model's sample_size */
  uint64_t seed;
  uint64_t first_image;    /* rng image index of out[0], so a split batch reproduces */
  const float *init_noise; /* batch * C * H * W floats, or NULL: rng_normal(seed, image, 0) */
  const int64_t *labels;   /* one class per image, or NULL */
  sampler_progress_fn progress;
  void *progress_user;
  sampler_noise_fn noise;
  void *noise_user;
  volatile int *cancel; /* checked before every evaluation; non-zero stops the run */
  int threads;          /* CPU threads for the model, >= 1 (0 means 1) */
} sampler_run_opts;

/* Runs the whole chain; out receives batch * C * H * W floats (nominally in [-1, 1]) and *nfe
 * (if non-NULL) the evaluations per image performed. A cancelled run returns ERR_CANCELLED with
 * out holding the last completed step's samples. */
int sampler_run(const sampler *s, const model *m, const sampler_run_opts *o, float *out, int *nfe,
                err *e);

#endif
