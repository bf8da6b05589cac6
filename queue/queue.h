/* Jobs: a bounded queue of validated job specs, scheduled onto a libuv worker pool (compatible
 * jobs batched into one forward), cancellable, persisted in a store before they are accepted,
 * with a per-job event log (sequence numbers) that progress streams read and resume from.
 * Every function is thread-safe; none blocks on compute except the *_wait ones. */
#ifndef DENOISED_QUEUE_H
#define DENOISED_QUEUE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"
#include "sampler.h"
#include "schedule.h"

/* Error codes beyond err.h's, in err.code. */
enum {
  QUEUE_FULL = -100,        /* queue_max jobs are waiting */
  QUEUE_LIMIT = -101,       /* this API key has max_jobs_per_key unfinished jobs */
  QUEUE_NOT_FOUND = -102,   /* no such job (or not the caller's) */
  QUEUE_CONFLICT = -103,    /* the job is finished: nothing to cancel */
  QUEUE_STOPPING = -104,    /* shutting down: no new jobs */
  QUEUE_NOT_READY = -105,   /* the image is not produced (yet) */
  QUEUE_TOO_LARGE = -106,   /* the job's record (inputs included) exceeds max_job_bytes */
  QUEUE_KEY_REUSED = -107,  /* the idempotency key names a job of a different request */
  QUEUE_KEY_BUSY = -108,    /* the idempotency key's first submission is still being stored */
  QUEUE_UNAVAILABLE = -109, /* the shared store (Redis) cannot be reached now: try again later */
};

#define QUEUE_ID_SIZE 32
#define QUEUE_NAME_SIZE 64
#define QUEUE_KEY_SIZE 256 /* an idempotency key, NUL included */

typedef enum {
  QUEUE_QUEUED,
  QUEUE_RUNNING,
  QUEUE_SUCCEEDED,
  QUEUE_FAILED,
  QUEUE_CANCELLED
} queue_state;

const char *queue_state_name(queue_state s);
int queue_state_from_name(const char *name); /* -1 if unknown */

/* A validated job. Guidance and edit blocks of later issues become more members here; the
 * batching key (queue_spec_compatible) must then take them into account. */
typedef struct queue_spec {
  char model[QUEUE_NAME_SIZE];
  char solver[QUEUE_NAME_SIZE];
  int steps;
  json_t *options; /* scheduler options object (diffusers scheduler_config keys); owned */
  /* The solver data the job names (scheduler.data: a name of the model's solver_data folder,
   * never a path), "" for none. */
  char data[SAMPLER_DATA_NAME_MAX + 1];
  int batch;
  uint64_t seed;
  uint64_t first_image; /* rng image index of image 0: image i uses noise stream first_image+i */
  int has_label;
  int64_t label;
  /* Text-to-image models (queue_model_desc.text_conditional): the prompt every image follows
   * and the negative prompt guidance steers away from (UTF-8, owned; NULL: none, the empty
   * prompt), and clip skip as AUTOMATIC1111 counts it (0: the last layer). */
  char *prompt, *negative_prompt;
  int clip_skip;
  int height, width; /* of the image, in pixels (a latent model samples 1/latent_factor of it) */
  int preview_every; /* steps between x0 previews in progress events; 0: none */
  char owner[QUEUE_NAME_SIZE]; /* API key name, "" without auth */
  /* Classifier-free guidance (class-conditional models): scale and the null label, resolved
   * (the model's own unless the request names one). */
  int has_guidance;
  double guidance_scale;
  int64_t null_class;
  /* Classifier guidance (guidance.h) with the model's classifier (MODEL/classifier/), resolved
   * at submission: scale, head and target class indices. Such jobs are never batched. */
  int has_classifier;
  double clf_scale;
  int clf_head;
  int64_t clf_target;
  /* Editing: img2img (SDEdit) or inpainting of input_image (base64 PNG of height x width, owned,
   * checked at submission) at strength in (0, 1]; inpainting's mask (base64 PNG, owned: white
   * is generated, black kept). Edit jobs are never batched with others. */
  int edit; /* QUEUE_EDIT_* */
  double strength;
  char *input_image, *mask;
  /* Inversions (invert_ddim, invert_ddpm: input_image, or noise maps, -> images and noise.npy)
   * and boundary moves (strength is the signed distance; no input_image: generated images):
   * the rest of the edit block as the API validated it (owned): source_class, source_guidance,
   * skip, shift [dx, dy], colour [r, g, b], colour_from, noise (base64 .npy), boundary (the
   * boundary file's object), eta. */
  json_t *edit_args;
  /* The client's Idempotency-Key ("" for none) and a hash of the request it came with: another
   * submission of the same owner with the same key gets the first job back (queue_submit). */
  char idem_key[QUEUE_KEY_SIZE];
  uint64_t idem_hash;
  /* Who submitted it, as far as the server can tell without API keys (a client token or the
   * peer address): an interrupt without a job id reaches only that client's jobs. */
  char client[QUEUE_NAME_SIZE];
  /* The inputs as the API decoded them at submission (owned; never copied, never stored), so
   * a worker does not decode the base64 a second time; NULL after a restart (decoded again from
   * the record) and once the job is finished. */
  struct queue_decoded *decoded;
  /* Its compute estimate in megapixel-evaluations (images x network evaluations x H x W / 1e6,
   * guidance counting twice), set by the API; budgets are checked against it. */
  double cost;
  /* Its solver's evaluation count depends on the sample (dpm-solver-adaptive), set by the API:
   * such a job shares no forward, or another tenant's input would set its run's length. */
  int nfe_varies;
} queue_spec;

/* An edit job's decoded inputs: input_image (the model's channels x height x width, in [-1, 1]),
 * mask (height x width, 1 generated, 0 kept) and noise maps (edit.noise, checked finite), each
 * malloc'ed or NULL. */
typedef struct queue_decoded {
  float *image, *mask, *noise;
  int noise_ndim;
  int64_t noise_shape[8];
} queue_decoded;
/* The spec's decoded inputs, created empty when missing; NULL out of memory. */
queue_decoded *queue_spec_decoded(queue_spec *s);

enum {
  QUEUE_EDIT_NONE,
  QUEUE_EDIT_IMG2IMG,
  QUEUE_EDIT_INPAINT,
  QUEUE_EDIT_INVERT_DDIM,
  QUEUE_EDIT_INVERT_DDPM,
  QUEUE_EDIT_BOUNDARY,
  QUEUE_EDIT_DEBLUR, /* input_image restored by a deblurring model (no strength, no edit_args) */
  /* Concept from a metric (engine/adjtask): edit_args {target (canonical HEAD=LABEL,...), name,
   * steps, batch, lr, margin, init (a class index or -1 for the mean row)}; the worker learns
   * the row on its own copy of the model, saves MODEL/embeddings/NAME.safetensors, reloads the
   * model so later jobs take NAME, and the job's images are samples of NAME. */
  QUEUE_EDIT_CONCEPT,
  /* Security audit (engine/adjtask audit_run) of the job's class_label: edit_args {target
   * (canonical HEAD=LABEL), eps [..], iters, random}; the images are the samples of the last
   * box's adversarial noises (QUEUE_NOISE_FILE), the report is QUEUE_REPORT_FILE. */
  QUEUE_EDIT_AUDIT,
  /* Stylization (engine/adjtask stylize_optimize): edit_args {target (canonical), keep (a head
   * name), keep_weight, name, steps, batch, lr, margin}; the worker fine-tunes its own copy of
   * the model, writes STATE_DIR/models/NAME-JOBID and registers it as model NAME
   * (queue_register_model); the job's images are samples of class_label from it. */
  QUEUE_EDIT_STYLIZE,
  /* Few-shot fine-tuning (engine/train, DomainStudio or plain): edit_args {name, method
   * ("domainstudio" or "plain"), steps, lr, batch, pair_weight, hf_pair_weight, hf_mse_weight,
   * images: [{image: base64 PNG of the model's size, label: a class index, for a
   * class-conditional model}]} as the API checked them; the worker trains its own copy of the
   * model (the served model's folder, loaded again, is DomainStudio's frozen source), writes it
   * to STATE_DIR/models/NAME-JOBID and registers it as model NAME (qmodel_publish, as a
   * stylization); the job's images are samples of class_label from it. */
  QUEUE_EDIT_FINETUNE
};
/* An inversion job's noise: DDIM x_T [batch, C, H, W] or the edit-friendly maps
 * [batch, steps + 1, C, H, W], as .npy. */
#define QUEUE_NOISE_FILE "noise.npy"
/* An audit job's report: {clean, batch, boxes: [{eps, adversarial, random, random_draws,
 * seconds}]} as JSON. */
#define QUEUE_REPORT_FILE "report.json"
/* Its name for edit ("img2img", ..., "boundary"; NULL for none); queue_edit_from_name returns -1
 * if unknown. */
const char *queue_edit_name(int edit);
int queue_edit_from_name(const char *name);

void queue_spec_clear(queue_spec *s);
int queue_spec_copy(queue_spec *dst, const queue_spec *src);
json_t *queue_spec_to_json(const queue_spec *s);
int queue_spec_from_json(const json_t *j, queue_spec *s, err *e);
/* Same model, solver, steps, size, scheduler options, solver data and guidance, and an evaluation
 * count that does not depend on the sample: one forward serves both, and each job's run (steps,
 * evaluations, events) is the one it gets alone, whatever the other's seed or classes. */
int queue_spec_compatible(const queue_spec *a, const queue_spec *b);

typedef enum { QUEUE_LOG_DEBUG, QUEUE_LOG_INFO, QUEUE_LOG_WARN, QUEUE_LOG_ERROR } queue_log_level;
typedef void (*queue_log_fn)(void *user, queue_log_level level, const char *job_id,
                             const char *msg);

typedef struct queue_opts {
  const char *state_dir;
  /* A Redis server to keep the queue, event logs, records and results in instead of memory and
   * state_dir (NULL or "": the local ones): redis://HOST[:PORT][/DB] or a unix socket path.
   * Read when the queue opens; the password is not kept. */
  const char *redis_url, *redis_password, *redis_prefix;
  /* How long a running job's claim lasts without this process renewing it (once a second):
   * after a crash, the job runs again once this has passed (ms; 0: 60 s). */
  int lease_ms;
  int workers;          /* jobs or batches computed at once */
  int threads_per_job;  /* compute threads each of them uses */
  int queue_max;        /* queued jobs */
  int batch_max_images; /* 1: no batching */
  int max_jobs_per_key;
  int result_ttl; /* seconds */
  /* Bytes of memory the finished jobs kept may take, as estimated (their records without
   * inputs, three times, plus the job itself); past it the oldest finished ones expire before
   * result_ttl, images and records included (0: no limit). */
  size_t retained_budget;
  /* A job whose run killed the process is run again after a restart, at most this many runs in
   * all (0: 2); then it fails with "crashed the worker N times", so one poison request cannot
   * make a crash loop. */
  int max_attempts;
  /* Largest job record (spec with its inputs: images, masks, noise) accepted; 0: 64 MiB; at most
   * 1 GiB. Checked before the 202 so an accepted job is always readable at recovery. */
  size_t max_job_bytes;
  int progress_interval_ms; /* least time between progress events of a job */
  /* Constant-time mode (0: off): every network evaluation of a run takes this long, waited out
   * at each step boundary, so a client's view of a run's timing follows from its request;
   * solvers whose evaluation count depends on the sample report and wait out
   * constant_time_max_nfe evaluations (a run that needs more fails). */
  int constant_time_eval_ms, constant_time_max_nfe;
  /* A run (job or batch) longer than this fails its jobs at the next step boundary, with the
   * limit named (0: no limit). */
  int max_job_seconds;
  /* The most compute (queue_spec.cost) an owner's unfinished jobs may hold together (0: no
   * limit); more is QUEUE_LIMIT. */
  double max_owner_cost;
  const char *url_prefix; /* "/v1/jobs/": image links in events */
  queue_log_fn log;
  void *log_user;
  /* Tests only (store.h): faults injected under the store; NULL in production. */
  struct store_fault *store_fault;
  /* How often the store is probed for readiness while healthy (ms; 0: 10 s, <0: never); while
   * failing it is probed, and failed final states rewritten, every retry_ms (0: 1 s). */
  int probe_every_ms, retry_ms;
} queue_opts;

typedef struct queue queue;

/* Opens the store and recovers its jobs: finished ones as they were, queued and running ones
 * queued again (same spec, same seed). Nothing runs before queue_start. */
int queue_new(const queue_opts *o, queue **out, err *e);
void queue_free(queue *q);

typedef struct queue_model_conf {
  const char *name, *path;
  const char *precision; /* "fp32", "bf16" (model_set_precision), or NULL/"" for fp32 */
} queue_model_conf;

/* Loads the list (mmapped weights, shared read-only by all workers). A model already loaded
 * from the same path is kept; one that disappears stays alive until its running jobs end, and
 * queued jobs naming it fail. On error nothing changes. */
int queue_set_models(queue *q, const queue_model_conf *models, int n, err *e);

/* Models a job made (a stylized model) are registered: served under name from then on, and
 * listed in STATE_DIR/QUEUE_REGISTERED_FILE so that every later queue_set_models (a restart, a
 * reload) serves them again after the configured ones (a configured model of the same name
 * wins; one that no longer loads is left out with a warning). QUEUE_CONFLICT if name is served
 * already. */
#define QUEUE_REGISTERED_FILE "registered_models.json"
int queue_register_model(queue *q, const char *name, const char *path, err *e);

/* A classifier verdict for the model's classifier (engine/adjtask's syntax: HEAD=LABEL or
 * LABEL items), checked and written back in canonical form into canon; ERR_INVALID naming the
 * item, ERR_UNSUPPORTED when the model has no classifier, QUEUE_NOT_FOUND for no such model. */
int queue_model_targets(queue *q, const char *model, const char *spec, char *canon, size_t n,
                        err *e);

typedef struct queue_model_desc {
  char name[QUEUE_NAME_SIZE];
  char class_name[QUEUE_NAME_SIZE];
  char prediction_type[16];
  model_kind kind;
  int sample_size, in_channels, out_channels, num_classes;
  /* a deblurring model: the channels of its conditioning image (model_info.cond_channels), or
   * set regression (model_info.regression: it maps the input image in one evaluation) */
  int cond_channels, regression;
  int num_embeddings; /* named class embeddings: the last classes (model_info.num_embeddings) */
  int64_t null_class; /* classifier-free guidance's "no class" label (model_info.null_class) */
  int64_t num_params;
  /* Text-to-image pipelines (model_latent): they take prompts; image pixels per latent pixel
   * (1 for models that make images directly: then sample_size is in pixels, otherwise in
   * latents); the channels of the images they make; the text encoder's layers (clip skip's
   * range) and tokens per prompt. */
  int text_conditional, latent_factor, image_channels, text_layers, text_tokens;
  json_t *class_labels; /* array of names or NULL; a reference the caller decrefs */
  json_t *solver_data;  /* sampler_data_list of its folder (names, never paths), or NULL */
  /* Its classifier (MODEL/classifier/, classifier.h) as {"class_name", "heads": [{"name",
   * "classes", "labels"}]}, or NULL without one; a reference the caller decrefs. */
  json_t *classifier;
  /* model_info's recommended settings: "" / 0 / < 0 when not given */
  char rec_solver[QUEUE_NAME_SIZE];
  int rec_steps;
  double rec_guidance;
} queue_model_desc;

int queue_model_count(queue *q);
/* By index (name NULL) or by name; QUEUE_NOT_FOUND if absent. */
int queue_model_get(queue *q, int index, const char *name, queue_model_desc *out);
void queue_model_desc_clear(queue_model_desc *d);

/* Builds the solver exactly as a worker will (sampler_new_from_json with the spec's name, steps,
 * options and solver data over the model's scheduler_config.json), and holds the spec's class and
 * guidance to what the solver data was computed for. On error `field` names the offending part:
 * "scheduler.name", "scheduler.steps", "scheduler.data", "scheduler.options.KEY",
 * "scheduler.options". */
int queue_make_sampler(queue *q, const queue_spec *s, sampler **out, char *field, size_t fieldlen,
                       err *e);

/* Starts the event loop and the workers. */
int queue_start(queue *q, err *e);
/* Stops taking jobs, stops running ones at the next step boundary (they stay queued on disk and
 * run again after a restart) and waits up to timeout_ms. Returns 0 if everything stopped. */
int queue_stop(queue *q, int timeout_ms);

typedef struct queue_job_view {
  char id[QUEUE_ID_SIZE];
  queue_state state;
  int position; /* queued: 1 = next to run */
  int step, total, nfe;
  double created, started, finished; /* unix seconds, 0 when not reached */
  int images;                        /* images ready */
  int batched_with;                  /* other jobs sharing its forward, while running */
  char error[512];
  /* Set while the job's final state is decided but could not be written yet (the store is
   * failing): the state shown is the one before, and the write is retried. */
  char store_error[256];
  uint64_t last_seq;
  int replayed; /* queue_submit: an earlier job with the same idempotency key */
  /* A copy without the large inputs (listings copy no images under the lock): input_image and
   * mask are "" when the job has them, edit_args' noise is true and its boundary keeps only
   * attribute, step and model; queue_view_clear frees it. */
  queue_spec spec;
} queue_job_view;

void queue_view_clear(queue_job_view *v);

/* Accepts a job: on disk (durable) before it returns. The spec is moved into the queue on
 * success (left empty) and untouched on failure. A spec with an idempotency key that an
 * earlier job of the same owner holds is not queued again: out is that job, with replayed set
 * (QUEUE_KEY_REUSED if the requests differ, QUEUE_KEY_BUSY while the first is being stored).
 * Keys are remembered as long as their job (result_ttl), across restarts. */
int queue_submit(queue *q, queue_spec *spec, queue_job_view *out, err *e);

/* owner NULL sees every job; otherwise only jobs with that owner exist. */
int queue_get(queue *q, const char *id, const char *owner, queue_job_view *out, err *e);

/* Newest first; `before` (a job id, or NULL) pages on, state -1 for all. *n views filled, *more
 * says whether a next page exists. */
int queue_list(queue *q, const char *owner, const char *before, int state, int limit,
               queue_job_view *out, int *n, int *more);

/* Cancels: a queued job leaves the queue, a running one stops at the next step boundary.
 * QUEUE_CONFLICT for a finished job. */
int queue_cancel(queue *q, const char *id, const char *owner, queue_job_view *out, err *e);
/* Cancels every running job of owner and client (NULL: any); returns how many. */
int queue_cancel_running(queue *q, const char *owner, const char *client);

/* The first running job of owner (or the head of its queue); 1 if there is one. */
int queue_current(queue *q, const char *owner, queue_job_view *out, int *queued_total);

typedef struct queue_event {
  uint64_t seq;
  const char *type; /* static string */
  char *data;       /* JSON object text, with job_id, seq and type */
} queue_event;

/* Events of job id with seq > after, waiting up to timeout_ms for one to arrive. *done is set
 * when the job is finished and nothing more will come (or the queue is stopping). */
int queue_events(queue *q, const char *id, const char *owner, uint64_t after, int timeout_ms,
                 queue_event **evs, int *n, int *done, err *e);
void queue_events_free(queue_event *evs, int n);

/* Waits until the job is finished (or timeout_ms); returns its view. */
int queue_wait(queue *q, const char *id, int timeout_ms, queue_job_view *out, err *e);

/* The noise an inversion job extracted (QUEUE_NOISE_FILE); QUEUE_NOT_FOUND for other jobs,
 * QUEUE_NOT_READY before the job succeeded. */
int queue_noise(queue *q, const char *id, const char *owner, uint8_t **npy, size_t *len, err *e);

/* An audit job's report (QUEUE_REPORT_FILE); QUEUE_NOT_FOUND for other jobs, QUEUE_NOT_READY
 * before the job succeeded. */
int queue_report(queue *q, const char *id, const char *owner, uint8_t **json, size_t *len, err *e);

/* Image n of a succeeded job, PNG with its metadata; QUEUE_NOT_READY before it exists. */
int queue_image(queue *q, const char *id, const char *owner, int n, uint8_t **png, size_t *len,
                err *e);

#define QUEUE_HIST_BUCKETS 14

typedef struct queue_hist {
  const double *bounds; /* QUEUE_HIST_BUCKETS upper bounds, +Inf implied */
  uint64_t counts[QUEUE_HIST_BUCKETS + 1];
  double sum;
  uint64_t count;
} queue_hist;

typedef struct queue_stats {
  int queued, running;
  uint64_t submitted, succeeded, failed, cancelled, rejected_full, rejected_limit;
  uint64_t images_generated, batches, batched_jobs;
  int workers, busy_workers, threads_per_job;
  double busy_seconds; /* summed over workers */
  double uptime;
  int models, stopping;
  queue_hist step_seconds, job_seconds, wait_seconds;
  uint64_t pace_overruns; /* constant-time mode: step boundaries reached after their budget */
  /* The finished jobs' estimated memory at the last expiry pass, and how many finished jobs
   * retained_budget expired before result_ttl. */
  uint64_t retained_bytes, expired_early;
} queue_stats;

void queue_get_stats(queue *q, queue_stats *out);

/* Models loaded, not stopping, not full. */
int queue_ready(queue *q, char *why, size_t whylen);

#endif
