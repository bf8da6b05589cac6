/* Inversion (invert_ddim, invert_ddpm) and boundary jobs of the queue's workers (internal to
 * queue/): one job spec in, its images and noise out. */
#ifndef DENOISED_QUEUE_EDIT_JOB_H
#define DENOISED_QUEUE_EDIT_JOB_H

#include <jansson.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "guidance.h"
#include "model.h"
#include "queue.h"
#include "sampler.h"

/* How the steps of several phases (inversion, then sampling) map onto one progress count: the
 * worker reports base + step of total, nfe + the phase's own. */
typedef struct edit_job_phase {
  int base, total, nfe;
} edit_job_phase;

typedef struct edit_job {
  const model *m;
  const json_t *sched;      /* the model's scheduler_config.json, or NULL */
  const queue_spec *spec;   /* edit is QUEUE_EDIT_INVERT_DDIM, _INVERT_DDPM or _BOUNDARY */
  const float *image;       /* the decoded input image per batch image, or NULL */
  const int64_t *labels;    /* the job's class per batch image, or NULL */
  const guidance *guidance; /* the job's guidance, or NULL */
  sampler_progress_fn progress;
  void *progress_user;
  edit_job_phase *phase; /* updated between phases */
  const atomic_int *cancel;
  int threads;
} edit_job;

/* Runs the job into x (batch * C * H * W). *s receives the solver of the final sampling (for
 * the images' metadata; the caller frees it, also on error); an inversion of input_image
 * returns its noise as .npy bytes in *noise (malloc'ed, else NULL). */
int edit_job_run(const edit_job *j, sampler **s, float *x, uint8_t **noise, size_t *noise_len,
                 int *nfe, err *e);

#endif
