/* Config schema and its three sources. Every scalar key is one row of a table, so the file, the
 * environment and the flags accept exactly the same names with the same checks and messages. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

typedef enum { KEY_INT, KEY_STR, KEY_BOOL } key_type;

typedef struct key_desc {
  const char *name;
  key_type type;
  size_t off;
  size_t size; /* string capacity */
  long min, max;
  const char *help;
} key_desc;

#define INT_KEY(n, lo, hi, h)                                                                      \
  { #n, KEY_INT, offsetof(config, n), 0, lo, hi, h }
#define STR_KEY(n, h)                                                                              \
  { #n, KEY_STR, offsetof(config, n), sizeof(((config *)0)->n), 0, 0, h }
#define BOOL_KEY(n, h)                                                                             \
  { #n, KEY_BOOL, offsetof(config, n), 0, 0, 1, h }

static const key_desc keys[] = {
    STR_KEY(listen, "HOST:PORT to listen on"),
    STR_KEY(state_dir, "directory for jobs and results"),
    STR_KEY(default_model, "model name used when a request names none"),
    INT_KEY(cpu_budget, 0, 1024, "CPU threads all workers may use together (0: CPUs online)"),
    INT_KEY(workers, 0, 256, "jobs (or batches) computed at once (0: min(2, cpu_budget))"),
    INT_KEY(threads_per_job, 0, 1024, "compute threads per worker (0: cpu_budget / workers)"),
    INT_KEY(queue_max, 1, 1000000, "queued jobs before 429"),
    INT_KEY(batch_max_images, 1, 1024, "images in a forward shared by jobs (1: no batching)"),
    INT_KEY(result_ttl, 1, 365 * 86400, "seconds finished jobs and images are kept"),
    INT_KEY(retained_budget_mb, 0, 1 << 20,
            "MB of memory finished jobs kept may take (estimated); past it the oldest expire "
            "before result_ttl (0: no limit)"),
    INT_KEY(max_attempts, 1, 100, "runs of a job that killed the daemon before it fails"),
    INT_KEY(max_job_bytes, 65536, 1 << 30, "largest stored job, inputs included (else 413)"),
    INT_KEY(max_body_bytes, 256, 64 << 20, "largest request body"),
    INT_KEY(max_batch, 1, 1024, "largest batch_size"),
    INT_KEY(max_steps, 1, 100000, "most steps per job"),
    INT_KEY(max_image_size, 8, 4096, "largest width or height"),
    INT_KEY(max_jobs_per_key, 1, 1000000, "queued + running jobs per API key (with keys)"),
    INT_KEY(max_connections, 4, 65536, "open connections"),
    INT_KEY(max_connections_per_ip, 1, 65536, "open connections per client address"),
    INT_KEY(max_connections_per_key, 1, 65536, "open connections per API key (with keys)"),
    INT_KEY(max_streams_per_client, 1, 65536,
            "event streams and synchronous waits per API key and per client address"),
    INT_KEY(connection_reserve, 0, 65536,
            "connections streams never take, for health checks and submissions (0: auto)"),
    INT_KEY(header_timeout, 1, 3600, "seconds to receive a whole request"),
    INT_KEY(idle_timeout, 1, 86400, "seconds a silent connection is kept"),
    INT_KEY(shutdown_timeout, 1, 3600, "seconds SIGTERM waits for running jobs"),
    INT_KEY(generate_timeout, 1, 86400, "seconds a synchronous request waits"),
    INT_KEY(max_job_seconds, 0, 30 * 86400, "seconds a job may run before it fails (0: none)"),
    INT_KEY(max_job_cost, 0, 1000000000,
            "megapixel-evaluations a job may need: images x evaluations x pixels (0: none)"),
    INT_KEY(max_key_cost, 0, 1000000000,
            "megapixel-evaluations one API key's unfinished jobs may hold (all clients together "
            "without keys; 0: none)"),
    INT_KEY(sse_heartbeat, 1, 3600, "seconds between SSE keep-alive comments"),
    INT_KEY(progress_interval_ms, 0, 60000, "least time between two progress events of a job"),
    BOOL_KEY(expose_internals,
             "without API keys, serve model internals and timing metrics to every client (with "
             "keys only admin keys see them, whatever this says)"),
    INT_KEY(constant_time_eval_ms, 0, 600000,
            "constant-time mode: each network evaluation padded to this many ms (0: off)"),
    INT_KEY(constant_time_max_nfe, 1, 100000,
            "evaluations per image a data-dependent solver (dpm-solver-adaptive) may make: "
            "its cost counts this many, a run needing more fails; constant-time mode pads to it"),
    STR_KEY(api_keys_file, "file of API keys (empty: no auth unless DENOISED_API_KEYS)"),
    STR_KEY(redis_url, "redis://HOST[:PORT][/DB] or a socket path: share the queue (empty: local)"),
    STR_KEY(redis_prefix, "key prefix of the daemons that share one queue on Redis"),
    STR_KEY(redis_password_file, "file holding the Redis password (else DENOISED_REDIS_PASSWORD)"),
    INT_KEY(lease_seconds, 2, 3600, "seconds before a dead daemon's running job runs again"),
    STR_KEY(log_level, "debug, info, warn or error"),
    STR_KEY(log_file, "log file (empty: stderr); reopened on SIGHUP"),
};

#define NKEYS ((int)(sizeof keys / sizeof keys[0]))

static char default_path[CONFIG_PATH_MAX];
static pthread_once_t default_once = PTHREAD_ONCE_INIT;

static void find_default_model(void) {
  snprintf(default_path, sizeof default_path, "%s", DENOISED_DEFAULT_MODEL);
  char exe[CONFIG_PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0)
    return;
  exe[n] = 0;
  char *slash = strrchr(exe, '/');
  if (!slash)
    return;
  *slash = 0;
  char beside[CONFIG_PATH_MAX + 64];
  struct stat st;
  snprintf(beside, sizeof beside, "%s/../share/denoised/models/%s", exe,
           config_default_model_name());
  char *real = stat(beside, &st) == 0 && S_ISDIR(st.st_mode) ? realpath(beside, NULL) : NULL;
  if (real && strlen(real) < sizeof default_path)
    snprintf(default_path, sizeof default_path, "%s", real);
  free(real);
}

const char *config_default_model_path(void) {
  pthread_once(&default_once, find_default_model);
  return default_path;
}

const char *config_default_model_name(void) {
  const char *p = DENOISED_DEFAULT_MODEL, *s = strrchr(p, '/');
  return s && s[1] ? s + 1 : p;
}

void config_defaults(config *c) {
  memset(c, 0, sizeof *c);
  snprintf(c->listen, sizeof c->listen, "127.0.0.1:8080");
  snprintf(c->state_dir, sizeof c->state_dir, "denoised-state");
  snprintf(c->models[0].name, sizeof c->models[0].name, "%s", CONFIG_DEFAULT_MODEL_NAME);
  snprintf(c->models[0].path, sizeof c->models[0].path, "%s", config_default_model_path());
  c->nmodels = 1;
  snprintf(c->default_model, sizeof c->default_model, "%s", CONFIG_DEFAULT_MODEL_NAME);
  c->queue_max = 256;
  c->batch_max_images = 16;
  c->result_ttl = 86400;
  c->retained_budget_mb = 256;
  c->lease_seconds = 60;
  snprintf(c->redis_prefix, sizeof c->redis_prefix, "denoised");
  c->max_attempts = 2;
  c->max_job_bytes = 64 << 20;
  c->max_body_bytes = 4 << 20; /* a 100-step noise upload of the default model is ~1.7 MB */
  c->max_batch = 16;
  c->max_steps = 1000;
  c->max_image_size = 512;
  c->max_jobs_per_key = 64;
  c->max_connections = 256;
  c->max_connections_per_ip = 64;
  c->max_connections_per_key = 64;
  c->max_streams_per_client = 16;
  c->header_timeout = 10;
  c->idle_timeout = 60;
  c->shutdown_timeout = 30;
  c->generate_timeout = 300;
  c->max_job_seconds = 3600;
  c->max_job_cost = 2000; /* 16 guided 32x32 images of 60 steps: 63; 4 of 50 at 256x256: 1311 */
  c->max_key_cost = 20000;
  c->sse_heartbeat = 15;
  c->progress_interval_ms = 100;
  c->constant_time_max_nfe = 200;
  snprintf(c->log_level, sizeof c->log_level, "info");
}

static const key_desc *find_key(const char *name) {
  for (int i = 0; i < NKEYS; i++)
    if (strcmp(keys[i].name, name) == 0)
      return &keys[i];
  return NULL;
}

static int set_int(config *c, const key_desc *k, long long v, const char *origin, err *e) {
  if (v < k->min || v > k->max)
    return err_set(e, ERR_INVALID, "%s: key '%s': %lld is out of range [%ld, %ld]", origin, k->name,
                   v, k->min, k->max);
  *(int *)((char *)c + k->off) = (int)v;
  return ERR_OK;
}

static int set_str(config *c, const key_desc *k, const char *v, const char *origin, err *e) {
  if (strlen(v) >= k->size)
    return err_set(e, ERR_INVALID, "%s: key '%s': longer than %zu characters", origin, k->name,
                   k->size - 1);
  snprintf((char *)c + k->off, k->size, "%s", v);
  if (strcmp(k->name, "default_model") == 0)
    c->default_model_set = 1;
  return ERR_OK;
}

/* A model name is what clients send, never a path: keep it to a safe alphabet. */
static int valid_model_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n >= CONFIG_NAME_MAX)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (!isalnum((unsigned char)s[i]) && !strchr("-_.", s[i]))
      return 0;
  return s[0] != '.';
}

static int add_model(config *c, const char *name, const char *path, const char *origin, err *e) {
  if (!valid_model_name(name))
    return err_set(e, ERR_INVALID,
                   "%s: key 'models': name '%s' must be 1-63 letters, digits, '-', '_' or '.'",
                   origin, name);
  if (!*path || strlen(path) >= CONFIG_PATH_MAX)
    return err_set(e, ERR_INVALID, "%s: key 'models.%s': the path must be 1-%d characters", origin,
                   name, CONFIG_PATH_MAX - 1);
  for (int i = 0; i < c->nmodels; i++)
    if (strcmp(c->models[i].name, name) == 0) {
      snprintf(c->models[i].path, sizeof c->models[i].path, "%s", path);
      c->models[i].precision[0] = 0;
      return ERR_OK;
    }
  if (c->nmodels == CONFIG_MAX_MODELS)
    return err_set(e, ERR_INVALID, "%s: key 'models': at most %d models", origin,
                   CONFIG_MAX_MODELS);
  snprintf(c->models[c->nmodels].name, CONFIG_NAME_MAX, "%s", name);
  snprintf(c->models[c->nmodels].path, CONFIG_PATH_MAX, "%s", path);
  c->models[c->nmodels].precision[0] = 0;
  c->nmodels++;
  return ERR_OK;
}

/* One entry of "models": "DIR", or {"path": "DIR", "precision": "fp32"|"bf16"}. */
static int add_model_json(config *c, const char *name, const json_t *v, const char *origin,
                          err *e) {
  if (json_is_string(v))
    return add_model(c, name, json_string_value(v), origin, e);
  const json_t *path = json_object_get(v, "path"), *prec = json_object_get(v, "precision");
  if (!json_is_object(v) || !json_is_string(path))
    return err_set(e, ERR_INVALID,
                   "%s: key 'models.%s': expected a directory path string or an object "
                   "{\"path\": DIR, \"precision\": \"fp32\"|\"bf16\"}",
                   origin, name);
  const char *key;
  const json_t *x;
  json_object_foreach((json_t *)v, key, x) {
    if (strcmp(key, "path") != 0 && strcmp(key, "precision") != 0)
      return err_set(e, ERR_INVALID, "%s: key 'models.%s.%s': unknown (path, precision)", origin,
                     name, key);
  }
  const char *p = prec ? json_string_value(prec) : "fp32";
  if (!p || (strcmp(p, "fp32") != 0 && strcmp(p, "bf16") != 0))
    return err_set(e, ERR_INVALID, "%s: key 'models.%s.precision': expected \"fp32\" or \"bf16\"",
                   origin, name);
  int rc = add_model(c, name, json_string_value(path), origin, e);
  for (int i = 0; !rc && i < c->nmodels; i++)
    if (strcmp(c->models[i].name, name) == 0)
      snprintf(c->models[i].precision, sizeof c->models[i].precision, "%s",
               strcmp(p, "bf16") == 0 ? p : "");
  return rc;
}

static int add_origin(config *c, const char *o, const char *origin, err *e) {
  if (!*o || strlen(o) >= sizeof c->cors_origins[0])
    return err_set(e, ERR_INVALID, "%s: key 'cors_origins': origin must be 1-255 characters",
                   origin);
  if (strcmp(o, "*") != 0 && strncmp(o, "http://", 7) != 0 && strncmp(o, "https://", 8) != 0)
    return err_set(e, ERR_INVALID,
                   "%s: key 'cors_origins': '%s' is not an origin (scheme://host[:port] or *)",
                   origin, o);
  if (c->ncors == CONFIG_MAX_ORIGINS)
    return err_set(e, ERR_INVALID, "%s: key 'cors_origins': at most %d origins", origin,
                   CONFIG_MAX_ORIGINS);
  snprintf(c->cors_origins[c->ncors++], sizeof c->cors_origins[0], "%s", o);
  return ERR_OK;
}

/* "name=dir,name=dir" (env) */
static int parse_models_list(config *c, const char *s, const char *origin, err *e) {
  c->nmodels = 0;
  char buf[8192];
  if (strlen(s) >= sizeof buf)
    return err_set(e, ERR_INVALID, "%s: too long", origin);
  snprintf(buf, sizeof buf, "%s", s);
  char *save = NULL;
  for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(tok, '=');
    if (!eq)
      return err_set(e, ERR_INVALID, "%s: '%s' is not NAME=DIR", origin, tok);
    *eq = 0;
    int rc = add_model(c, tok, eq + 1, origin, e);
    if (rc)
      return rc;
  }
  return ERR_OK;
}

static int parse_origins_list(config *c, const char *s, const char *origin, err *e) {
  c->ncors = 0;
  char buf[4096];
  if (strlen(s) >= sizeof buf)
    return err_set(e, ERR_INVALID, "%s: too long", origin);
  snprintf(buf, sizeof buf, "%s", s);
  char *save = NULL;
  for (char *tok = strtok_r(buf, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
    int rc = add_origin(c, tok, origin, e);
    if (rc)
      return rc;
  }
  return ERR_OK;
}

int config_apply_json(config *c, const json_t *obj, const char *origin, err *e) {
  if (!json_is_object(obj))
    return err_set(e, ERR_INVALID, "%s: expected a JSON object", origin);
  config tmp = *c; /* all or nothing */
  const char *name;
  json_t *v;
  json_object_foreach((json_t *)obj, name, v) {
    int rc = ERR_OK;
    if (strcmp(name, "models") == 0) {
      if (!json_is_object(v))
        return err_set(e, ERR_INVALID, "%s: key 'models': expected an object {\"name\": \"dir\"}",
                       origin);
      tmp.nmodels = 0;
      const char *mn;
      json_t *mp;
      json_object_foreach(v, mn, mp) {
        if ((rc = add_model_json(&tmp, mn, mp, origin, e)))
          return rc;
      }
      continue;
    }
    if (strcmp(name, "cors_origins") == 0) {
      if (!json_is_array(v))
        return err_set(e, ERR_INVALID, "%s: key 'cors_origins': expected an array of strings",
                       origin);
      tmp.ncors = 0;
      size_t i;
      json_t *o;
      json_array_foreach(v, i, o) {
        if (!json_is_string(o))
          return err_set(e, ERR_INVALID, "%s: key 'cors_origins[%zu]': expected a string", origin,
                         i);
        if ((rc = add_origin(&tmp, json_string_value(o), origin, e)))
          return rc;
      }
      continue;
    }
    if (strcmp(name, "api_keys") == 0)
      return err_set(e, ERR_INVALID,
                     "%s: key 'api_keys': keys do not belong in the config file; use "
                     "api_keys_file or DENOISED_API_KEYS",
                     origin);
    if (name[0] == '_' || strcmp(name, "$schema") == 0)
      continue; /* comments */
    const key_desc *k = find_key(name);
    if (!k)
      return err_set(e, ERR_INVALID, "%s: unknown key '%s'", origin, name);
    if (k->type == KEY_INT) {
      if (!json_is_integer(v))
        return err_set(e, ERR_INVALID, "%s: key '%s': expected an integer", origin, name);
      rc = set_int(&tmp, k, json_integer_value(v), origin, e);
    } else if (k->type == KEY_BOOL) {
      if (!json_is_boolean(v))
        return err_set(e, ERR_INVALID, "%s: key '%s': expected true or false", origin, name);
      rc = set_int(&tmp, k, json_is_true(v), origin, e);
    } else {
      if (!json_is_string(v))
        return err_set(e, ERR_INVALID, "%s: key '%s': expected a string", origin, name);
      rc = set_str(&tmp, k, json_string_value(v), origin, e);
    }
    if (rc)
      return rc;
  }
  *c = tmp;
  return ERR_OK;
}

/* A config file's relative model paths name folders beside the file, wherever the daemon
 * starts (as an include path would): joined with the file's directory. */
static int resolve_models(config *c, const char *file, err *e) {
  const char *slash = strrchr(file, '/');
  if (!slash)
    return ERR_OK; /* the file is in the working directory: paths already resolve there */
  const int dlen = (int)(slash - file);
  for (int i = 0; i < c->nmodels; i++) {
    char *p = c->models[i].path;
    if (p[0] == '/')
      continue;
    char joined[CONFIG_PATH_MAX];
    if (snprintf(joined, sizeof joined, "%.*s/%s", dlen, file, p) >= (int)sizeof joined)
      return err_set(e, ERR_INVALID, "%s: key 'models.%s': the path beside the file is too long",
                     file, c->models[i].name);
    snprintf(p, CONFIG_PATH_MAX, "%s", joined);
  }
  return ERR_OK;
}

int config_load_file(config *c, const char *path, err *e) {
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j) {
    if (je.line < 1)
      return err_set(e, ERR_IO, "%s: %s", path, je.text);
    return err_set(e, ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
  }
  int rc = config_apply_json(c, j, path, e);
  if (rc == ERR_OK && json_object_get(j, "models"))
    rc = resolve_models(c, path, e);
  json_decref(j);
  return rc;
}

static int parse_int_text(const char *s, long long *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end)
    return -1;
  *out = v;
  return 0;
}

static int set_text(config *c, const key_desc *k, const char *value, const char *origin, err *e) {
  if (k->type == KEY_STR)
    return set_str(c, k, value, origin, e);
  if (k->type == KEY_BOOL) {
    const int t = strcmp(value, "true") == 0 || strcmp(value, "1") == 0;
    if (!t && strcmp(value, "false") != 0 && strcmp(value, "0") != 0)
      return err_set(e, ERR_INVALID, "%s: key '%s': expected true or false, got '%s'", origin,
                     k->name, value);
    return set_int(c, k, t, origin, e);
  }
  long long v;
  if (parse_int_text(value, &v))
    return err_set(e, ERR_INVALID, "%s: key '%s': expected an integer, got '%s'", origin, k->name,
                   value);
  return set_int(c, k, v, origin, e);
}

int config_apply_env(config *c, char **envp, err *e) {
  if (!envp)
    envp = environ;
  config tmp = *c;
  for (char **p = envp; *p; p++) {
    if (strncmp(*p, "DENOISED_", 9) != 0)
      continue;
    const char *eq = strchr(*p, '=');
    if (!eq)
      continue;
    char name[128], origin[160];
    size_t n = (size_t)(eq - (*p + 9));
    if (n == 0 || n >= sizeof name)
      continue;
    for (size_t i = 0; i < n; i++)
      name[i] = (char)tolower((unsigned char)(*p)[9 + i]);
    name[n] = 0;
    snprintf(origin, sizeof origin, "environment DENOISED_%.*s", (int)n, *p + 9);
    const char *value = eq + 1;
    int rc = ERR_OK;
    if (strcmp(name, "models") == 0)
      rc = parse_models_list(&tmp, value, origin, e);
    else if (strcmp(name, "cors_origins") == 0)
      rc = parse_origins_list(&tmp, value, origin, e);
    else if (find_key(name))
      rc = set_text(&tmp, find_key(name), value, origin, e);
    /* other DENOISED_* names (DENOISED_CONFIG, DENOISED_API_KEYS, build and test switches)
     * belong to someone else */
    if (rc)
      return rc;
  }
  *c = tmp;
  return ERR_OK;
}

int config_set_flag(config *c, const char *name, const char *value, err *e) {
  char key[128], origin[160];
  size_t n = strlen(name);
  if (n >= sizeof key)
    return err_set(e, ERR_UNSUPPORTED, "unknown option '--%s'", name);
  for (size_t i = 0; i <= n; i++)
    key[i] = name[i] == '-' ? '_' : name[i];
  snprintf(origin, sizeof origin, "--%s", name);
  if (strcmp(key, "model") == 0) {
    const char *eq = strchr(value, '=');
    if (!eq)
      return err_set(e, ERR_INVALID, "--model: expected NAME=DIR, got '%s'", value);
    char mname[CONFIG_NAME_MAX];
    if ((size_t)(eq - value) >= sizeof mname)
      return err_set(e, ERR_INVALID, "--model: name too long");
    snprintf(mname, sizeof mname, "%.*s", (int)(eq - value), value);
    return add_model(c, mname, eq + 1, origin, e);
  }
  if (strcmp(key, "cors_origin") == 0)
    return add_origin(c, value, origin, e);
  const key_desc *k = find_key(key);
  if (!k)
    return err_set(e, ERR_UNSUPPORTED, "unknown option '--%s'", name);
  return set_text(c, k, value, origin, e);
}

int config_listen_split(const char *listen, char *host, size_t hostlen, int *port, err *e) {
  const char *colon;
  const char *hs = listen, *he;
  if (listen[0] == '[') {
    he = strchr(listen, ']');
    if (!he || he[1] != ':')
      return err_set(e, ERR_INVALID, "listen: '%s' is not [IPV6]:PORT", listen);
    hs = listen + 1;
    colon = he + 1;
  } else {
    colon = strrchr(listen, ':');
    if (!colon)
      return err_set(e, ERR_INVALID, "listen: '%s' is not HOST:PORT", listen);
    he = colon;
  }
  if ((size_t)(he - hs) >= hostlen || he == hs)
    return err_set(e, ERR_INVALID, "listen: bad host in '%s'", listen);
  snprintf(host, hostlen, "%.*s", (int)(he - hs), hs);
  long long p;
  if (parse_int_text(colon + 1, &p) || p < 0 || p > 65535)
    return err_set(e, ERR_INVALID, "listen: bad port in '%s' (0-65535)", listen);
  *port = (int)p;
  return ERR_OK;
}

int config_finalize(config *c, err *e) {
  char host[256];
  int port, rc = config_listen_split(c->listen, host, sizeof host, &port, e);
  if (rc)
    return rc;
  if (!*c->state_dir)
    return err_set(e, ERR_INVALID, "state_dir: must not be empty");
  if (c->nmodels == 0)
    return err_set(e, ERR_INVALID, "models: at least one model is needed");
  if (!*c->redis_prefix || strpbrk(c->redis_prefix, " \t\r\n*?[]\\"))
    return err_set(e, ERR_INVALID,
                   "redis_prefix: '%s' must be non-empty, without blanks or * ? [ ] \\",
                   c->redis_prefix);
  int found = 0;
  for (int i = 0; i < c->nmodels; i++)
    found |= strcmp(c->models[i].name, c->default_model) == 0;
  if (!found && !c->default_model_set) { /* serve --model a=DIR: a is the default */
    snprintf(c->default_model, sizeof c->default_model, "%s", c->models[0].name);
    found = 1;
  }
  if (!found)
    return err_set(e, ERR_INVALID, "default_model: '%s' is not one of the configured models",
                   c->default_model);
  if (c->cpu_budget == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    c->cpu_budget = n > 0 ? (int)n : 1;
  }
  if (c->workers == 0)
    c->workers = c->cpu_budget < 2 ? c->cpu_budget : 2;
  if (c->workers > c->cpu_budget)
    return err_set(e, ERR_INVALID, "workers: %d workers exceed cpu_budget %d", c->workers,
                   c->cpu_budget);
  if (c->threads_per_job == 0)
    c->threads_per_job = c->cpu_budget / c->workers;
  if ((long)c->workers * c->threads_per_job > c->cpu_budget)
    return err_set(e, ERR_INVALID,
                   "threads_per_job: workers %d x threads_per_job %d exceed cpu_budget %d",
                   c->workers, c->threads_per_job, c->cpu_budget);
  static const char *levels[] = {"debug", "info", "warn", "error"};
  int ok = 0;
  for (int i = 0; i < 4; i++)
    ok |= strcmp(c->log_level, levels[i]) == 0;
  if (!ok)
    return err_set(e, ERR_INVALID, "log_level: '%s' is not one of debug, info, warn, error",
                   c->log_level);
  if (c->connection_reserve == 0) /* auto: an eighth, at least 2 */
    c->connection_reserve = c->max_connections / 8 > 2 ? c->max_connections / 8 : 2;
  if (c->connection_reserve >= c->max_connections)
    return err_set(e, ERR_INVALID,
                   "connection_reserve: %d must be below max_connections %d (streams need some)",
                   c->connection_reserve, c->max_connections);
  if (c->sse_heartbeat >= c->idle_timeout)
    return err_set(e, ERR_INVALID,
                   "sse_heartbeat: %d s must be shorter than idle_timeout %d s, or event streams "
                   "are cut",
                   c->sse_heartbeat, c->idle_timeout);
  return ERR_OK;
}

json_t *config_to_json(const config *c) {
  json_t *j = json_object();
  for (int i = 0; i < NKEYS; i++) {
    const key_desc *k = &keys[i];
    const char *p = (const char *)c + k->off;
    json_object_set_new(j, k->name,
                        k->type == KEY_INT    ? json_integer(*(const int *)p)
                        : k->type == KEY_BOOL ? json_boolean(*(const int *)p)
                                              : json_string(p));
  }
  json_t *m = json_object();
  for (int i = 0; i < c->nmodels; i++)
    json_object_set_new(m, c->models[i].name,
                        c->models[i].precision[0]
                            ? json_pack("{s:s, s:s}", "path", c->models[i].path, "precision",
                                        c->models[i].precision)
                            : json_string(c->models[i].path));
  json_object_set_new(j, "models", m);
  json_t *o = json_array();
  for (int i = 0; i < c->ncors; i++)
    json_array_append_new(o, json_string(c->cors_origins[i]));
  json_object_set_new(j, "cors_origins", o);
  return j;
}

static const char config_usage[] =
    "usage: denoised config check FILE   validate FILE (with DENOISED_* overrides applied) and\n"
    "                                    print the effective configuration as JSON\n"
    "       denoised config defaults     print the built-in defaults\n"
    "       denoised config keys         list every key with its range\n";

static int print_json(const json_t *j) {
  char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
  if (!s)
    return 1;
  puts(s);
  free(s);
  return 0;
}

int config_main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    fputs(config_usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  config c;
  config_defaults(&c);
  if (strcmp(argv[1], "defaults") == 0 && argc == 2) {
    json_t *j = config_to_json(&c);
    int rc = print_json(j);
    json_decref(j);
    return rc;
  }
  if (strcmp(argv[1], "keys") == 0 && argc == 2) {
    for (int i = 0; i < NKEYS; i++) {
      if (keys[i].type == KEY_INT)
        printf("%-24s integer in [%ld, %ld]: %s\n", keys[i].name, keys[i].min, keys[i].max,
               keys[i].help);
      else if (keys[i].type == KEY_BOOL)
        printf("%-24s true or false: %s\n", keys[i].name, keys[i].help);
      else
        printf("%-24s string: %s\n", keys[i].name, keys[i].help);
    }
    printf("%-24s object {\"NAME\": \"DIR\" or {\"path\": \"DIR\", \"precision\": \"bf16\"}}: "
           "models served, by name (precision fp32, the default, or bf16 on AVX512-BF16 CPUs)\n",
           "models");
    printf("%-24s array of origins allowed by CORS (\"*\" for any)\n", "cors_origins");
    return 0;
  }
  /* "check" is server_config_check: it validates what serve does, API keys and models
   * included, which are above this room */
  fputs(config_usage, stderr);
  return 2;
}
