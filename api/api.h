/* The JSON contract of the daemon: request bodies validated into job specs (every error names
 * the offending field), jobs and models as JSON, the error model, Prometheus text, and the
 * AUTOMATIC1111 compatibility mapping. No sockets here: the server hands in bytes. */
#ifndef DENOISED_API_H
#define DENOISED_API_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "queue.h"

typedef struct api_error {
  int status;        /* HTTP status */
  char code[32];     /* machine-readable: invalid_json, invalid_field, unknown_field, ... */
  char message[512]; /* for people */
  char field[128];   /* path of the bad field ("scheduler.options.eta"), or "" */
  int retry_after;   /* seconds, for 429/503; 0: none */
} api_error;

/* Fills e and returns e->status. */
int api_fail(api_error *e, int status, const char *code, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* {"error": {"code", "message", "field"}} (field null when empty). */
json_t *api_error_json(const api_error *e);
/* Maps a queue error (QUEUE_FULL, ERR_IO, ...) onto an HTTP error. */
int api_fail_queue(api_error *e, const err *qe);

/* A number from a URL path, a query or a header, in canonical decimal form only: "0", or a digit
 * 1-9 followed by digits, at most max. No sign, blank, leading zero or left-over escape
 * ("+0", " 5", "05", "5%00") is a number: a client or proxy that reads such text differently
 * must not see a different request. Returns 0, or -1 with *out untouched. */
int api_parse_uint(const char *s, unsigned long long max, unsigned long long *out);

/* An Idempotency-Key header (NULL: none) into spec, with a hash of the request body; 400
 * naming the header if it is empty, over 255 characters or not visible ASCII. */
int api_idempotency(const char *key, const char *body, size_t len, queue_spec *spec, api_error *e);

typedef struct api_ctx {
  queue *q;
  const char *default_model;
  int max_batch, max_steps, max_image_size;
  int queue_max, workers, threads_per_job, batch_max_images, max_body_bytes, result_ttl;
  int auth;            /* API keys are required */
  double max_job_cost; /* megapixel-evaluations a job may need (0: no limit) */
  /* evaluations per image a data-dependent solver (dpm-solver-adaptive) may make: its cost is
   * counted at this many, and the queue fails a run that needs more (constant_time_max_nfe) */
  int max_varying_nfe;
} api_ctx;

/* POST /v1/jobs (and /v1/generate) body -> spec. owner is the API key name ("" without auth). */
int api_parse_job(const api_ctx *c, const char *body, size_t len, const char *owner,
                  queue_spec *out, api_error *e);

/* Views. prefix is the jobs URL ("/v1/jobs/"). */
json_t *api_job_json(const queue_job_view *v, const char *prefix);
/* internals: the model's class, prediction type and parameter count, which fingerprint the
 * architecture (DeepPeep); for admins only (README, Security). */
json_t *api_models_json(const api_ctx *c, int internals);
json_t *api_capabilities_json(const api_ctx *c);

/* RFC 3339 UTC in whole seconds, or JSON null for 0. */
json_t *api_time_json(double unix_seconds);

/* ---- AUTOMATIC1111 /sdapi/v1 ---- */

/* Our solver for one of their sampler names ("Euler a", "DDIM", "k_euler_a", or ours), or NULL
 * when nothing here implements it. */
const char *api_a1111_solver(const char *name);
/* A txt2img or img2img body (img2img: init_images, mask, denoising_strength) read in their
 * names: unknown fields are ignored as their server does, the ones used are checked and errors
 * name them. Their batch_size x n_iter images become `count` one-image jobs, job i being spec
 * with seed + i (their all_seeds count up), each run as the native route would run it.
 * checkpoint: the model this client chose (POST /sdapi/v1/options), or NULL; clip_skip: its
 * CLIP_stop_at_last_layers there (0: none), which override_settings overrides. */
typedef struct api_sd_job {
  queue_spec spec; /* image 0's job */
  int count;
  int draw_class; /* no prompt on a class-conditional model: each job's class from its seed */
} api_sd_job;
/* Their option CLIP_stop_at_last_layers (POST /sdapi/v1/options): 1 to 12 as their slider, an
 * integral number; a 400 naming it otherwise. */
int api_sd_clip_option(const json_t *v, int *out, api_error *e);
int api_sd_parse(const api_ctx *c, int img2img, const char *body, size_t len, const char *owner,
                 const char *checkpoint, int clip_skip, api_sd_job *out, api_error *e);
/* Job i's spec (a copy: seed + i and, when drawn, its class); -1 out of memory. */
int api_sd_job_at(const api_ctx *c, const api_sd_job *j, int i, queue_spec *out);
void api_sd_job_clear(api_sd_job *j);
/* The class an image without one gets on a class-conditional model: drawn from its seed
 * (rng_choice at image 0), the null class left out. */
int64_t api_sd_draw(const queue_model_desc *md, uint64_t seed);
/* {images: [base64 PNG], parameters: <request echo>, info: "<JSON string>"} for the n jobs;
 * b64[i] NULL where job i has no picture (interrupted before its first preview). */
json_t *api_sd_result_json(const api_ctx *c, const queue_job_view *views, int n, char **b64,
                           const char *body, size_t len);
/* current_image: the newest preview of the running job (base64 PNG), or NULL. */
json_t *api_sd_progress_json(const queue_job_view *v, int have, int queued_total,
                             const char *current_image);
/* POST /sdapi/v1/png-info {image} -> {info, items, parameters}: the PNG's infotext, its other
 * text (our JSON record), and the infotext parsed as theirs does. */
int api_sd_png_info(const api_ctx *c, const char *body, size_t len, json_t **out, api_error *e);
json_t *api_sd_samplers_json(void);
json_t *api_sd_models_json(const api_ctx *c);

/* ---- metrics ---- */

typedef struct api_http_stats {
  uint64_t requests[6]; /* by status class: [1] 1xx ... [5] 5xx */
  uint64_t connections, open_connections, sse_streams, auth_failures;
} api_http_stats;

/* Prometheus text exposition (version 0.0.4), malloc'ed. internals adds what times the model
 * (step, job and wait histograms, busy time, constant-time overruns): admins only. */
char *api_metrics_text(const queue_stats *s, const api_http_stats *h, int internals);

#endif
