/* The daemon's configuration: one schema (names, types, defaults, ranges) read from a JSON file,
 * then DENOISED_* environment variables, then command-line flags, each layer over the last.
 * `denoised config check FILE` prints the effective result. */
#ifndef DENOISED_CONFIG_H
#define DENOISED_CONFIG_H

#include <jansson.h>

#include "err.h"

#define CONFIG_MAX_MODELS 32
#define CONFIG_MAX_ORIGINS 16
#define CONFIG_NAME_MAX 64
#define CONFIG_PATH_MAX 1024

/* The model served as `default` when nothing else is configured: one build-time setting
 * (cmake -DDENOISED_DEFAULT_MODEL=DIR) so that switching to the trained model is one line. */
#ifndef DENOISED_DEFAULT_MODEL
#define DENOISED_DEFAULT_MODEL "models/glyphs32"
#endif

/* The default model's folder: beside an installed binary (BINDIR/../share/denoised/models/NAME,
 * as `cmake --install` lays it out, NAME being the last component of DENOISED_DEFAULT_MODEL),
 * else the build-time DENOISED_DEFAULT_MODEL (the source tree). Computed once. */
const char *config_default_model_path(void);
/* Its NAME ("glyphs32"): what images record instead of a path of this machine. */
const char *config_default_model_name(void);
#define CONFIG_DEFAULT_MODEL_NAME "default"

typedef struct config_model {
  char name[CONFIG_NAME_MAX];
  char path[CONFIG_PATH_MAX];
  char precision[8]; /* "fp32" or "bf16" (model_set_precision); "" is fp32 */
} config_model;

typedef struct config {
  char listen[256]; /* HOST:PORT; port 0 picks a free one */
  char state_dir[CONFIG_PATH_MAX];
  config_model models[CONFIG_MAX_MODELS];
  int nmodels;
  char default_model[CONFIG_NAME_MAX]; /* used when a request names no model */
  /* default_model was set (file, environment or flag); else a model list without one named
   * "default" makes its first model the default (config_finalize) */
  int default_model_set;
  int cpu_budget;      /* 0: the CPUs online */
  int workers;         /* concurrent jobs (or batches); 0: min(2, cpu_budget) */
  int threads_per_job; /* 0: cpu_budget / workers */
  int queue_max;
  int batch_max_images;   /* images in a forward shared by jobs; 1 disables batching */
  int result_ttl;         /* seconds a finished job and its images are kept */
  int retained_budget_mb; /* memory finished jobs may take; past it the oldest expire early */
  int max_attempts;       /* runs of a job that crashed the daemon before it fails for good */
  int max_job_bytes;      /* largest job record (inputs included) accepted */
  int max_body_bytes;
  int max_batch;
  int max_steps;
  int max_image_size;
  int max_jobs_per_key; /* queued + running jobs per API key (no limit without keys) */
  int max_connections;
  int max_connections_per_ip;
  int max_connections_per_key; /* connections whose requests carry one API key */
  /* Long requests (event streams, synchronous /v1/generate and txt2img waits): at most
   * max_streams_per_client per API key and per client address, and at most max_connections -
   * connection_reserve in all, so the reserve always answers /healthz, /readyz and submissions. */
  int max_streams_per_client;
  int connection_reserve; /* 0 in a file: max_connections / 8, at least 2 */
  int header_timeout;     /* seconds from connect to complete request headers and body */
  int idle_timeout;       /* seconds a connection may sit silent */
  int shutdown_timeout;
  int generate_timeout; /* seconds POST /v1/generate and /sdapi/v1/txt2img wait */
  int max_job_seconds;  /* a run longer than this fails (0: none) */
  int max_job_cost;     /* megapixel-evaluations per job (0: none) */
  int max_key_cost;     /* megapixel-evaluations of one key's unfinished jobs (0: none) */
  int sse_heartbeat;
  int progress_interval_ms; /* at most one progress event per job per interval */
  /* DeepPeep (README, Security): without API keys, model internals and timing metrics are
   * served only when this is set; with keys, only to admin keys. */
  int expose_internals;
  /* Constant-time mode: each network evaluation takes this budget (0: off), and solvers whose
   * evaluation count depends on the sample are padded to constant_time_max_nfe. */
  int constant_time_eval_ms;
  int constant_time_max_nfe;
  char api_keys_file[CONFIG_PATH_MAX];
  /* Redis (empty url: the local state_dir): the queue, events, records and results of every
   * daemon with the same url and prefix; the password comes from redis_password_file or
   * DENOISED_REDIS_PASSWORD, never from this file or the url */
  char redis_url[CONFIG_PATH_MAX];
  char redis_prefix[128];
  char redis_password_file[CONFIG_PATH_MAX];
  int lease_seconds; /* a running job's claim lasts this long unless renewed (once a second) */
  char cors_origins[CONFIG_MAX_ORIGINS][256];
  int ncors;
  char log_level[16];
  char log_file[CONFIG_PATH_MAX]; /* empty: stderr */
} config;

/* Defaults: 127.0.0.1:8080, the default model as `default`, ./denoised-state. */
void config_defaults(config *c);

/* Layers a JSON object / a file onto c. Errors name the key ("workers: ..."). */
int config_apply_json(config *c, const json_t *obj, const char *origin, err *e);
int config_load_file(config *c, const char *path, err *e);

/* Layers the DENOISED_* variables of envp (NULL: environ). DENOISED_CONFIG and
 * DENOISED_API_KEYS are read by their users, other unknown names are left alone. */
int config_apply_env(config *c, char **envp, err *e);

/* One flag: name without the leading dashes ("workers", "state-dir", "model"), value as typed.
 * Returns ERR_UNSUPPORTED for a name that is not a config flag. */
int config_set_flag(config *c, const char *name, const char *value, err *e);

/* Cross-key checks and derived values (cpu_budget, threads_per_job). */
int config_finalize(config *c, err *e);

/* The effective configuration as JSON (new reference); secrets are never part of it. */
json_t *config_to_json(const config *c);

/* Splits "HOST:PORT" ("[::1]:8080" for IPv6). */
int config_listen_split(const char *listen, char *host, size_t hostlen, int *port, err *e);

/* `denoised config check FILE` / `denoised config defaults`; returns the exit status. */
int config_main(int argc, char **argv);

#endif
