/* `denoised serve`: configuration, start-up order (store, models, workers, listener), signal
 * handling on the main thread (SIGHUP reload, SIGTERM/SIGINT graceful stop) and exit codes. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "model.h"
#include "server.h"

static const char serve_help[] =
    "usage: denoised serve [--config FILE] [--listen HOST:PORT] [--state-dir DIR]\n"
    "                      [--model NAME=DIR ...] [--workers N] [--KEY VALUE ...]\n"
    "\n"
    "Serves the HTTP API (see openapi.yaml). With no flags: the default model as 'default' on\n"
    "127.0.0.1:8080, jobs kept in ./denoised-state.\n"
    "  --config FILE        JSON config file (also DENOISED_CONFIG); see config/denoised.json\n"
    "  --listen HOST:PORT   address to listen on (port 0: any free port, logged at start)\n"
    "  --state-dir DIR      where jobs and images persist\n"
    "  --model NAME=DIR     serve the model folder DIR as NAME (repeatable)\n"
    "  --workers N          jobs computed at once; workers x threads_per_job <= cpu_budget\n"
    "  --cors-origin ORIGIN allow a web origin (repeatable)\n"
    "  --KEY VALUE          any config key, dashes or underscores ('denoised config keys')\n"
    "Precedence: flags over DENOISED_* environment over the file over the defaults.\n"
    "API keys: api_keys_file (lines 'NAME KEY [scopes]') and/or DENOISED_API_KEYS.\n"
    "Signals: SIGTERM/SIGINT stop gracefully; SIGHUP reopens the log and reloads models and keys.\n"
    "Exit codes: 0 stopped, 1 failure, 2 usage/config, 3 listen, 4 state directory, 5 model,\n"
    "            6 shutdown timed out (jobs stay queued on disk).\n";

typedef struct serve_args {
  const char *config_file;
  int argc;
  char **argv;
} serve_args;

/* defaults < file < environment < flags */
static int build_config(const serve_args *a, config *c, err *e) {
  config_defaults(c);
  const char *file = a->config_file ? a->config_file : getenv("DENOISED_CONFIG");
  int rc;
  if (file && *file && (rc = config_load_file(c, file, e)))
    return rc;
  if ((rc = config_apply_env(c, NULL, e)))
    return rc;
  int models_from_flags = 0;
  for (int i = 1; i < a->argc; i++) {
    const char *arg = a->argv[i];
    if (strncmp(arg, "--", 2) != 0)
      return err_set(e, ERR_INVALID, "unexpected argument '%s'", arg);
    char name[128];
    const char *value, *eq = strchr(arg, '=');
    if (eq) {
      snprintf(name, sizeof name, "%.*s", (int)(eq - arg - 2), arg + 2);
      value = eq + 1; /* split at the first '=': --model=NAME=DIR works too */
    } else {
      snprintf(name, sizeof name, "%s", arg + 2);
      if (i + 1 >= a->argc)
        return err_set(e, ERR_INVALID, "--%s needs a value", name);
      value = a->argv[++i];
    }
    if (strcmp(name, "config") == 0)
      continue;
    if (strcmp(name, "model") == 0 && !models_from_flags) {
      c->nmodels = 0; /* --model flags replace the configured list */
      models_from_flags = 1;
    }
    if ((rc = config_set_flag(c, name, value, e)))
      return rc;
  }
  return config_finalize(c, e);
}

static int parse_serve_args(int argc, char **argv, serve_args *a) {
  a->argc = argc;
  a->argv = argv;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(serve_help, stdout);
      return -1;
    }
    if (strcmp(argv[i], "--config") == 0) {
      if (i + 1 >= argc) {
        fprintf(stderr, "denoised serve: --config needs a file\n");
        return SERVER_EXIT_USAGE;
      }
      a->config_file = argv[i + 1];
    } else if (strncmp(argv[i], "--config=", 9) == 0) {
      a->config_file = argv[i] + 9;
    }
  }
  return 0;
}

static const char check_help[] =
    "usage: denoised config check FILE\n"
    "\n"
    "Validates FILE as 'denoised serve --config FILE' would start with it: the file, DENOISED_*\n"
    "environment overrides, the API keys (api_keys_file, DENOISED_API_KEYS) and every model\n"
    "(loaded). Prints the effective configuration as JSON; exit 0, or 2 with the reason.\n";

int server_config_check(int argc, char **argv) {
  if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
    fputs(check_help, stdout);
    return 0;
  }
  if (argc != 2 || argv[1][0] == '-') {
    fputs(check_help, stderr);
    return SERVER_EXIT_USAGE;
  }
  serve_args a = {.config_file = argv[1], .argc = 1, .argv = argv};
  static config c; /* large: off the stack */
  err e = {0};
  auth keys = {0};
  int rc = build_config(&a, &c, &e) ||
           auth_load(c.api_keys_file, getenv("DENOISED_API_KEYS"), &keys, &e);
  auth_free(&keys);
  for (int i = 0; !rc && i < c.nmodels; i++) {
    struct stat st;
    model *m = NULL;
    if (stat(c.models[i].path, &st) != 0 || !S_ISDIR(st.st_mode))
      rc = err_set(&e, ERR_INVALID, "models.%s: '%s' is not a directory", c.models[i].name,
                   c.models[i].path);
    else if ((rc = model_load(c.models[i].path, &m, &e)) != ERR_OK ||
             (c.models[i].precision[0] && (rc = model_set_precision(m, MODEL_BF16, &e)) != ERR_OK))
      err_prefix(&e, "models.%s", c.models[i].name);
    model_free(m);
  }
  if (rc) {
    fprintf(stderr, "denoised config: %s\n", e.msg);
    return SERVER_EXIT_USAGE;
  }
  json_t *j = config_to_json(&c);
  char *text = j ? json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
  json_decref(j);
  if (text)
    puts(text);
  free(text);
  return text ? 0 : 1;
}

static int load_models(queue *q, const config *c, err *e) {
  queue_model_conf list[CONFIG_MAX_MODELS];
  for (int i = 0; i < c->nmodels; i++)
    list[i] = (queue_model_conf){c->models[i].name, c->models[i].path, c->models[i].precision};
  return queue_set_models(q, list, c->nmodels, e);
}

static void reload(srv *s, const serve_args *a) {
  err e = {0};
  if (log_reopen(&e))
    log_event(LOG_ERROR, "reopening the log failed", "error", e.msg, LOG_END);
  config c;
  if (build_config(a, &c, &e)) {
    log_event(LOG_ERROR, "reload: configuration invalid, keeping the old one", "error", e.msg,
              LOG_END);
    return;
  }
  if (load_models(s->q, &c, &e)) {
    log_event(LOG_ERROR, "reload: model list not changed", "error", e.msg, LOG_END);
    return;
  }
  char n[16];
  snprintf(n, sizeof n, "%d", c.nmodels);
  auth keys;
  if (auth_load(c.api_keys_file, getenv("DENOISED_API_KEYS"), &keys, &e)) {
    log_event(LOG_ERROR, "reload incomplete: models reread, API keys not changed", "models", n,
              "error", e.msg, LOG_END);
    return;
  }
  if (s->api.auth != (keys.n > 0)) {
    log_event(LOG_ERROR,
              "reload incomplete: models reread; turning API keys on or off needs a restart, "
              "keys not changed",
              "models", n, LOG_END);
    auth_free(&keys);
    return;
  }
  pthread_rwlock_wrlock(&s->auth_lock);
  auth old = s->keys;
  s->keys = keys;
  pthread_rwlock_unlock(&s->auth_lock);
  auth_free(&old);
  log_event(LOG_INFO, "reloaded: log reopened, models and API keys reread", "models", n, LOG_END);
}

/* The Redis password: redis_password_file's first line, else DENOISED_REDIS_PASSWORD, else none
 * (""). Never logged. */
static int redis_password(const config *c, char *pw, size_t n, err *e) {
  pw[0] = 0;
  if (!*c->redis_password_file) {
    const char *env = getenv("DENOISED_REDIS_PASSWORD");
    snprintf(pw, n, "%s", env ? env : "");
    return ERR_OK;
  }
  FILE *f = fopen(c->redis_password_file, "r");
  if (!f)
    return err_set(e, ERR_IO, "redis_password_file %s: %s", c->redis_password_file,
                   strerror(errno));
  if (!fgets(pw, (int)n, f))
    pw[0] = 0;
  fclose(f);
  pw[strcspn(pw, "\r\n")] = 0;
  return ERR_OK;
}

/* The queue over the state directory or Redis, with the configured models loaded; 0 or an exit
 * code. */
static int start_queue(srv *s, err *e) {
  char pw[512];
  if (redis_password(&s->cfg, pw, sizeof pw, e)) {
    log_event(LOG_ERROR, "Redis password unreadable", "error", e->msg, LOG_END);
    return SERVER_EXIT_STATE;
  }
  queue_opts qo = {.state_dir = s->cfg.state_dir,
                   .redis_url = s->cfg.redis_url,
                   .redis_password = pw,
                   .redis_prefix = s->cfg.redis_prefix,
                   .lease_ms = s->cfg.lease_seconds * 1000,
                   .workers = s->cfg.workers,
                   .threads_per_job = s->cfg.threads_per_job,
                   .queue_max = s->cfg.queue_max,
                   .batch_max_images = s->cfg.batch_max_images,
                   .max_jobs_per_key = s->cfg.max_jobs_per_key,
                   .result_ttl = s->cfg.result_ttl,
                   .retained_budget = (size_t)s->cfg.retained_budget_mb << 20,
                   .max_attempts = s->cfg.max_attempts,
                   .max_job_bytes = (size_t)s->cfg.max_job_bytes,
                   .progress_interval_ms = s->cfg.progress_interval_ms,
                   .constant_time_eval_ms = s->cfg.constant_time_eval_ms,
                   .constant_time_max_nfe = s->cfg.constant_time_max_nfe,
                   .url_prefix = "/v1/jobs/",
                   .max_job_seconds = s->cfg.max_job_seconds,
                   .max_owner_cost = s->cfg.max_key_cost,
                   .log = log_queue_cb};
  const int rc = queue_new(&qo, &s->q, e);
  memset(pw, 0, sizeof pw);
  if (rc) {
    log_event(LOG_ERROR, *s->cfg.redis_url ? "Redis unusable" : "state directory unusable", "error",
              e->msg, LOG_END);
    return SERVER_EXIT_STATE;
  }
  if (load_models(s->q, &s->cfg, e)) {
    log_event(LOG_ERROR, "loading models failed", "error", e->msg, LOG_END);
    return SERVER_EXIT_MODEL;
  }
  return 0;
}

static void init_api(srv *s) {
  s->api = (api_ctx){.q = s->q,
                     .default_model = s->cfg.default_model,
                     .max_batch = s->cfg.max_batch,
                     .max_steps = s->cfg.max_steps,
                     .max_image_size = s->cfg.max_image_size,
                     .queue_max = s->cfg.queue_max,
                     .workers = s->cfg.workers,
                     .threads_per_job = s->cfg.threads_per_job,
                     .batch_max_images = s->cfg.batch_max_images,
                     .max_body_bytes = s->cfg.max_body_bytes,
                     .result_ttl = s->cfg.result_ttl,
                     .auth = s->keys.n > 0,
                     .max_job_cost = s->cfg.max_job_cost,
                     .max_varying_nfe = s->cfg.constant_time_max_nfe};
}

static void log_listening(const srv *s) {
  char host[256], url[300], w[16], t[16], nm[16], keys[16];
  int port;
  err e = {0};
  config_listen_split(s->cfg.listen, host, sizeof host, &port, &e);
  snprintf(url, sizeof url, strchr(host, ':') ? "http://[%s]:%d" : "http://%s:%d", host, s->port);
  snprintf(w, sizeof w, "%d", s->cfg.workers);
  snprintf(t, sizeof t, "%d", s->cfg.threads_per_job);
  snprintf(nm, sizeof nm, "%d", s->cfg.nmodels);
  snprintf(keys, sizeof keys, "%d", s->keys.n);
  log_event(LOG_INFO, "listening", "url", url, "workers", w, "threads_per_job", t, "models", nm,
            "default_model", s->cfg.default_model, *s->cfg.redis_url ? "redis" : "state_dir",
            *s->cfg.redis_url ? s->cfg.redis_url : s->cfg.state_dir, "api_keys", keys, LOG_END);
}

/* Serves until SIGTERM or SIGINT (SIGHUP reloads meanwhile), then stops gracefully: running
 * jobs stop at a step boundary and stay queued on disk. Returns an exit code, or does not return
 * when the workers outlast shutdown_timeout. */
static int serve_until_signal(srv *s, const serve_args *a, const sigset_t *set) {
  for (;;) {
    int sig = 0;
    if (sigwait(set, &sig) != 0)
      continue;
    if (sig == SIGHUP) {
      reload(s, a);
      continue;
    }
    log_event(LOG_INFO, "stopping", "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT", LOG_END);
    break;
  }
  atomic_store(&s->stopping, 1);
  http_quiesce(s);
  if (queue_stop(s->q, s->cfg.shutdown_timeout * 1000) != 0) {
    log_event(LOG_ERROR, "shutdown timed out: workers still computing; their jobs stay queued",
              LOG_END);
    log_close();
    _exit(SERVER_EXIT_SHUTDOWN_TIMEOUT); /* workers still use the models: no cleanup */
  }
  http_stop(s);
  log_event(LOG_INFO, "stopped", LOG_END);
  return SERVER_EXIT_OK;
}

/* Large buffers (request bodies of up to max_body_bytes, their parsed JSON strings, decoded
 * images and noise) get their own mappings, returned to the system when freed. glibc's default
 * threshold is dynamic: once a freed mmapped chunk was larger, it rises to that size (up to
 * 32 MiB), so every later body came from the arenas of libmicrohttpd's per-connection threads
 * and stayed there, fragmented: bench/memory.sh measured 85 MB after 200 finished 5.2 MB
 * img2img submissions against 24 MB idle, and 28 MB with this fixed 1 MiB threshold (which also
 * turns the dynamic adjustment off). Capping the arenas (M_ARENA_MAX 2) on its own left 65 MB,
 * and added nothing measurable to this, so the arena count is left alone. */
static void tune_malloc(void) {
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
}

static pthread_t serve_main_thread;

/* Threads started before main blocked the signals (OpenBLAS starts its pool from a library
 * constructor) still accept them, and while the main thread is busy (a SIGHUP reload) the
 * kernel hands a SIGTERM to one of them: with the default action that killed the daemon
 * without a graceful stop (a test sending SIGTERM right after "reloaded" saw exit 143). This
 * handler passes such a delivery on to the main thread, which blocks it until its sigwait. */
static void forward_to_main(int sig) {
  int saved = errno;
  pthread_kill(serve_main_thread, sig);
  errno = saved;
}

static void route_signals_to_main(sigset_t *set) {
  sigemptyset(set);
  sigaddset(set, SIGTERM);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGHUP);
  serve_main_thread = pthread_self();
  pthread_sigmask(SIG_BLOCK, set, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = forward_to_main;
  sigfillset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

int server_main(int argc, char **argv) {
  serve_args a = {0};
  int prc = parse_serve_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  static srv s; /* one daemon per process; static keeps it off the stack of main */
  memset(&s, 0, sizeof s);
  s.listen_fd = -1;
  err e = {0};
  if (build_config(&a, &s.cfg, &e)) {
    fprintf(stderr, "denoised serve: %s\nRun 'denoised serve --help' for usage.\n", e.msg);
    return SERVER_EXIT_USAGE;
  }
  if (log_open(s.cfg.log_file, s.cfg.log_level, &e)) {
    fprintf(stderr, "denoised serve: %s\n", e.msg);
    return SERVER_EXIT_USAGE;
  }
  /* signals go to the main thread's sigwait: block them before our threads start */
  sigset_t set;
  route_signals_to_main(&set);
  pthread_rwlock_init(&s.auth_lock, NULL);
  if (auth_load(s.cfg.api_keys_file, getenv("DENOISED_API_KEYS"), &s.keys, &e)) {
    log_event(LOG_ERROR, "API keys", "error", e.msg, LOG_END);
    return SERVER_EXIT_USAGE;
  }
  int status = start_queue(&s, &e);
  if (status)
    goto out;
  /* after recovery, which reads every record whole (5 MB each with large inputs): with its own
   * mapping per record, 200 of them took a restart 0.97 s instead of 0.24 s (page faults on
   * fresh mappings); the setting is global, so connection threads started later follow it */
  tune_malloc();
  init_api(&s);
  status = SERVER_EXIT_FAILURE;
  if (queue_start(s.q, &e)) {
    log_event(LOG_ERROR, "starting workers failed", "error", e.msg, LOG_END);
    goto out;
  }
  if (http_start(&s, &e)) {
    log_event(LOG_ERROR, "listening failed", "error", e.msg, LOG_END);
    status = SERVER_EXIT_LISTEN;
    queue_stop(s.q, s.cfg.shutdown_timeout * 1000);
    goto out;
  }
  log_listening(&s);
  status = serve_until_signal(&s, &a, &set);
out:
  http_stop(&s);
  queue_free(s.q);
  auth_free(&s.keys);
  pthread_rwlock_destroy(&s.auth_lock);
  log_close();
  return status;
}
