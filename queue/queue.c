/* The job queue: memory index + store, the libuv loop that schedules batches onto its worker
 * pool, the per-job event log, cancellation and recovery. One mutex guards all state: HTTP
 * threads need synchronous answers (202 with a position, 409 on cancel), and every critical
 * section is short; disk writes and compute always happen with the lock released. */
#include "queue.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <uv.h>

#include "base64.h"
#include "edit.h"
#include "edit_job.h"
#include "image.h"
#include "meta.h"
#include "rng.h"
#include "store.h"

#define RING 64        /* progress events kept per job; older ones are superseded anyway */
#define PREVIEW_MAX 64 /* preview side in pixels */
#define EXPIRY_EVERY_MS 60000

typedef struct qevent {
  uint64_t seq;
  const char *type;
  char *data;
} qevent;

typedef struct qmodel {
  char name[QUEUE_NAME_SIZE];
  char path[1024];
  model *m;
  json_t *labels;
  json_t *sched; /* its scheduler_config.json, or NULL */
  int refs;      /* the registry's own reference plus running batches */
} qmodel;

typedef struct qbatch qbatch;

typedef struct qjob {
  char id[QUEUE_ID_SIZE];
  queue_spec spec;
  queue_state state;
  int pending; /* being written to the store: invisible until committed */
  double created, started, finished, t_mono_created, t_mono_started;
  int step, total, nfe, images, files;
  char error[512];
  qevent *life; /* lifecycle events: never dropped */
  int nlife, caplife;
  qevent ring[RING]; /* progress events: the newest RING */
  int ring_head, ring_n;
  uint64_t next_seq;
  double last_progress;
  qbatch *batch;
} qjob;

struct qbatch {
  uv_work_t work;
  queue *q;
  qmodel *qm;
  qjob **jobs;
  int njobs, nimg;
  atomic_int cancel;
  float *x; /* the samples being denoised; previews read image 0 */
  sampler *s;
  const sched_config *cfg; /* the sampler's */
  float *abar;
  double t_start, t_last;
  int h, w;
  const int64_t *labels;
  const uint64_t *img_seed, *img_index;
  edit_job_phase phase; /* inversion jobs: their phases on one progress count */
};

struct queue {
  queue_opts o;
  char state_dir[1024], url_prefix[128];
  store *st;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  qjob **jobs; /* sorted by id (creation order) */
  int njobs, capjobs;
  qjob **queued; /* FIFO */
  int nqueued, capqueued;
  qbatch **running;
  int nrunning;
  qmodel **models;
  int nmodels;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t expiry;
  pthread_t thread;
  int started, stopping, loop_done;
  int closing; /* wake handle closed or closing: uv_async_send would abort */
  int busy;
  int npending; /* submissions being written to the store, counted against queue_max */
  uint64_t last_id_ms;
  uint32_t id_counter;
  double t0, busy_seconds;
  uint64_t submitted, succeeded, failed, cancelled, rejected_full, rejected_limit, images_generated,
      batches, batched_jobs;
  queue_hist step_h, job_h, wait_h;
};

static const double step_bounds[QUEUE_HIST_BUCKETS] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
static const double job_bounds[QUEUE_HIST_BUCKETS] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                      2.5,  5,     10,   30,  60,   300, 1800};

static const char *const state_names[] = {"queued", "running", "succeeded", "failed", "cancelled"};
static const char *const event_types[] = {"queued", "started", "progress",  "image",
                                          "done",   "failed",  "cancelled", "message"};

const char *queue_state_name(queue_state s) {
  return (unsigned)s < 5 ? state_names[s] : "unknown";
}

int queue_state_from_name(const char *name) {
  for (int i = 0; i < 5; i++)
    if (strcmp(state_names[i], name) == 0)
      return i;
  return -1;
}

static const char *event_type(const char *name) {
  for (size_t i = 0; i < sizeof event_types / sizeof *event_types; i++)
    if (strcmp(event_types[i], name) == 0)
      return event_types[i];
  return "message";
}

static int finished(queue_state s) {
  return s == QUEUE_SUCCEEDED || s == QUEUE_FAILED || s == QUEUE_CANCELLED;
}

static double now_real(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double now_mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void qlog(queue *q, queue_log_level level, const char *id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void qlog(queue *q, queue_log_level level, const char *id, const char *fmt, ...) {
  if (!q->o.log)
    return;
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  q->o.log(q->o.log_user, level, id, msg);
}

static void hist_observe(queue_hist *h, double v) {
  int i = 0;
  while (i < QUEUE_HIST_BUCKETS && v > h->bounds[i])
    i++;
  h->counts[i]++;
  h->sum += v;
  h->count++;
}

/* ---- specs ---- */

static const char *const edit_names[] = {NULL,          "img2img",     "inpaint",
                                         "invert_ddim", "invert_ddpm", "boundary"};

const char *queue_edit_name(int edit) {
  return edit > 0 && edit < (int)(sizeof edit_names / sizeof *edit_names) ? edit_names[edit] : NULL;
}

int queue_edit_from_name(const char *name) {
  for (int k = 1; k < (int)(sizeof edit_names / sizeof *edit_names); k++)
    if (strcmp(name, edit_names[k]) == 0)
      return k;
  return -1;
}

/* Inversions of an input image store the noise they found. */
static int has_noise(const queue_spec *s) {
  return (s->edit == QUEUE_EDIT_INVERT_DDIM || s->edit == QUEUE_EDIT_INVERT_DDPM) && s->input_image;
}

void queue_spec_clear(queue_spec *s) {
  json_decref(s->options);
  free(s->input_image);
  free(s->mask);
  json_decref(s->edit_args);
  memset(s, 0, sizeof *s);
}

int queue_spec_copy(queue_spec *dst, const queue_spec *src) {
  *dst = *src;
  dst->options = src->options ? json_deep_copy(src->options) : NULL;
  dst->input_image = src->input_image ? strdup(src->input_image) : NULL;
  dst->mask = src->mask ? strdup(src->mask) : NULL;
  dst->edit_args = src->edit_args ? json_deep_copy(src->edit_args) : NULL;
  return (src->options && !dst->options) || (src->input_image && !dst->input_image) ||
                 (src->mask && !dst->mask) || (src->edit_args && !dst->edit_args)
             ? ERR_NOMEM
             : ERR_OK;
}

int queue_spec_compatible(const queue_spec *a, const queue_spec *b) {
  return strcmp(a->model, b->model) == 0 && strcmp(a->solver, b->solver) == 0 &&
         a->steps == b->steps && a->height == b->height && a->width == b->width &&
         a->has_label == b->has_label && !a->preview_every && !b->preview_every && !a->edit &&
         !b->edit && a->has_guidance == b->has_guidance &&
         (!a->has_guidance ||
          (a->guidance_scale == b->guidance_scale && a->null_class == b->null_class)) &&
         json_equal(a->options ? a->options : json_null(), b->options ? b->options : json_null());
}

json_t *queue_spec_to_json(const queue_spec *s) {
  json_t *j = json_pack(
      "{s:s, s:s, s:i, s:O, s:i, s:I, s:I, s:i, s:i, s:i, s:s}", "model", s->model, "solver",
      s->solver, "steps", s->steps, "options", s->options ? s->options : json_null(), "batch",
      s->batch, "seed", (json_int_t)s->seed, "first_image", (json_int_t)s->first_image, "height",
      s->height, "width", s->width, "preview_every", s->preview_every, "owner", s->owner);
  if (j && s->has_label)
    json_object_set_new(j, "class_label", json_integer(s->label));
  if (j && s->has_guidance) {
    json_object_set_new(j, "guidance_scale", json_real(s->guidance_scale));
    json_object_set_new(j, "null_class", json_integer(s->null_class));
  }
  if (j && s->edit) {
    json_object_set_new(j, "edit", json_string(queue_edit_name(s->edit)));
    json_object_set_new(j, "strength", json_real(s->strength));
    if (s->input_image)
      json_object_set_new(j, "input_image", json_string(s->input_image));
    if (s->mask)
      json_object_set_new(j, "mask", json_string(s->mask));
    if (s->edit_args)
      json_object_set(j, "edit_args", s->edit_args);
  }
  return j;
}

int queue_spec_from_json(const json_t *j, queue_spec *s, err *e) {
  memset(s, 0, sizeof *s);
  const char *model, *solver, *owner;
  json_t *options = NULL, *label = NULL, *gscale = NULL, *gnull = NULL, *edit = NULL;
  json_t *strength = NULL, *input = NULL, *mask = NULL, *args = NULL;
  json_int_t seed, first;
  json_error_t je;
  if (json_unpack_ex((json_t *)j, &je, 0,
                     "{s:s, s:s, s:i, s:o, s:i, s:I, s:I, s:i, s:i, s:i, s:s, s?o, s?o, s?o, s?o, "
                     "s?o, s?o, s?o, s?o}",
                     "model", &model, "solver", &solver, "steps", &s->steps, "options", &options,
                     "batch", &s->batch, "seed", &seed, "first_image", &first, "height", &s->height,
                     "width", &s->width, "preview_every", &s->preview_every, "owner", &owner,
                     "class_label", &label, "guidance_scale", &gscale, "null_class", &gnull, "edit",
                     &edit, "strength", &strength, "input_image", &input, "mask", &mask,
                     "edit_args", &args))
    return err_set(e, ERR_FORMAT, "job spec: %s", je.text);
  if (strlen(model) >= sizeof s->model || strlen(solver) >= sizeof s->solver ||
      strlen(owner) >= sizeof s->owner || s->batch < 1 || s->steps < 1 || seed < 0 || first < 0)
    return err_set(e, ERR_FORMAT, "job spec: out-of-range values");
  snprintf(s->model, sizeof s->model, "%s", model);
  snprintf(s->solver, sizeof s->solver, "%s", solver);
  snprintf(s->owner, sizeof s->owner, "%s", owner);
  s->seed = (uint64_t)seed;
  s->first_image = (uint64_t)first;
  if (json_is_object(options))
    s->options = json_deep_copy(options);
  if (label && json_is_integer(label)) {
    s->has_label = 1;
    s->label = json_integer_value(label);
  }
  if (gscale && json_is_number(gscale)) {
    s->has_guidance = 1;
    s->guidance_scale = json_number_value(gscale);
    s->null_class = json_is_integer(gnull) ? json_integer_value(gnull) : -1;
  }
  if (edit) {
    int k = json_is_string(edit) ? queue_edit_from_name(json_string_value(edit)) : -1;
    const int needs_input = k == QUEUE_EDIT_IMG2IMG || k == QUEUE_EDIT_INPAINT;
    if (k <= 0 || !json_is_number(strength) || (input && !json_is_string(input)) ||
        (needs_input && !input) || (k == QUEUE_EDIT_INPAINT && !json_is_string(mask)) ||
        (needs_input ? args != NULL : !json_is_object(args))) {
      queue_spec_clear(s);
      return err_set(e, ERR_FORMAT, "job spec: a bad edit");
    }
    s->edit = k;
    s->strength = json_number_value(strength);
    s->input_image = input ? strdup(json_string_value(input)) : NULL;
    s->mask = json_is_string(mask) ? strdup(json_string_value(mask)) : NULL;
    s->edit_args = args ? json_deep_copy(args) : NULL;
    if ((input && !s->input_image) || (json_is_string(mask) && !s->mask) ||
        (args && !s->edit_args)) {
      queue_spec_clear(s);
      return err_set(e, ERR_NOMEM, "out of memory");
    }
  }
  return ERR_OK;
}

/* ---- jobs and events ---- */

static void job_free(qjob *j) {
  if (!j)
    return;
  for (int i = 0; i < j->nlife; i++)
    free(j->life[i].data);
  free(j->life);
  for (int i = 0; i < j->ring_n; i++)
    free(j->ring[(j->ring_head + i) % RING].data);
  queue_spec_clear(&j->spec);
  free(j);
}

/* Appends an event (lock held). data is stolen; job_id, seq, type and time are added. */
static void emit(queue *q, qjob *j, const char *type, json_t *data, int lifecycle) {
  if (!data)
    data = json_object();
  uint64_t seq = j->next_seq++;
  json_object_set_new(data, "job_id", json_string(j->id));
  json_object_set_new(data, "seq", json_integer((json_int_t)seq));
  json_object_set_new(data, "type", json_string(type));
  json_object_set_new(data, "time", json_real(now_real()));
  char *text = json_dumps(data, JSON_COMPACT | JSON_REAL_PRECISION(13)); /* ms of unix time */
  json_decref(data);
  if (!text)
    return;
  qevent ev = {seq, event_type(type), text};
  if (lifecycle) {
    if (j->nlife == j->caplife) {
      int cap = j->caplife ? 2 * j->caplife : 8;
      qevent *n = realloc(j->life, (size_t)cap * sizeof *n);
      if (!n) {
        free(text);
        return;
      }
      j->life = n;
      j->caplife = cap;
    }
    j->life[j->nlife++] = ev;
  } else {
    if (j->ring_n == RING) {
      free(j->ring[j->ring_head].data);
      j->ring[j->ring_head] = ev;
      j->ring_head = (j->ring_head + 1) % RING;
    } else {
      j->ring[(j->ring_head + j->ring_n++) % RING] = ev;
    }
  }
  pthread_cond_broadcast(&q->cv);
}

/* A finished job keeps its lifecycle and its last progress event: the others are superseded
 * (each carries the absolute step), and a retained job should cost little memory. */
static void drop_progress(qjob *j) {
  for (int i = 0; i + 1 < j->ring_n; i++)
    free(j->ring[(j->ring_head + i) % RING].data);
  if (j->ring_n > 1) {
    j->ring[0] = j->ring[(j->ring_head + j->ring_n - 1) % RING];
    j->ring_n = 1;
  }
  j->ring_head = 0;
}

/* The record the store keeps (lock held). */
static char *job_record(const qjob *j, size_t *len) {
  json_t *ev = json_array();
  for (int i = 0; i < j->nlife; i++)
    json_array_append_new(ev, json_pack("{s:I, s:s, s:s}", "seq", (json_int_t)j->life[i].seq,
                                        "type", j->life[i].type, "data", j->life[i].data));
  json_t *r =
      json_pack("{s:s, s:o, s:s, s:f, s:f, s:f, s:i, s:i, s:i, s:i, s:i, s:s, s:I, s:o}", "id",
                j->id, "spec", queue_spec_to_json(&j->spec), "state", queue_state_name(j->state),
                "created", j->created, "started", j->started, "finished", j->finished, "step",
                j->step, "total", j->total, "nfe", j->nfe, "images", j->images, "files", j->files,
                "error", j->error, "next_seq", (json_int_t)j->next_seq, "events", ev);
  char *text = r ? json_dumps(r, JSON_COMPACT) : NULL;
  json_decref(r);
  *len = text ? strlen(text) : 0;
  return text;
}

static int persist_text(queue *q, const char *id, char *text, size_t len) {
  err e = {0};
  int rc = text ? q->st->ops->put_job(q->st, id, text, len, &e)
                : err_set(&e, ERR_NOMEM, "out of memory");
  if (rc)
    qlog(q, QUEUE_LOG_ERROR, id, "persisting the job failed: %s", e.msg);
  free(text);
  return rc;
}

static int job_index(queue *q, const char *id, int *pos) {
  int lo = 0, hi = q->njobs;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    int c = strcmp(q->jobs[mid]->id, id);
    if (c == 0) {
      *pos = mid;
      return 1;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  *pos = lo;
  return 0;
}

static qjob *find_job(queue *q, const char *id, const char *owner) {
  int pos;
  if (!id || !job_index(q, id, &pos))
    return NULL;
  qjob *j = q->jobs[pos];
  if (j->pending || (owner && strcmp(owner, j->spec.owner) != 0))
    return NULL;
  return j;
}

/* Makes room for one more pointer in a job array that holds `n` of `*cap`. */
static int reserve_one(qjob ***arr, int n, int *cap) {
  if (n < *cap)
    return ERR_OK;
  int grown = *cap ? 2 * *cap : 64;
  qjob **p = realloc(*arr, (size_t)grown * sizeof *p);
  if (!p)
    return ERR_NOMEM;
  *arr = p;
  *cap = grown;
  return ERR_OK;
}

static int insert_job(queue *q, qjob *j) {
  if (reserve_one(&q->jobs, q->njobs, &q->capjobs))
    return ERR_NOMEM;
  int pos;
  job_index(q, j->id, &pos);
  memmove(q->jobs + pos + 1, q->jobs + pos, (size_t)(q->njobs - pos) * sizeof *q->jobs);
  q->jobs[pos] = j;
  q->njobs++;
  return ERR_OK;
}

static void remove_job_at(queue *q, int pos) {
  memmove(q->jobs + pos, q->jobs + pos + 1, (size_t)(q->njobs - pos - 1) * sizeof *q->jobs);
  q->njobs--;
}

static int push_queued(queue *q, qjob *j) {
  if (reserve_one(&q->queued, q->nqueued, &q->capqueued))
    return ERR_NOMEM;
  q->queued[q->nqueued++] = j;
  return ERR_OK;
}

static void unqueue(queue *q, const qjob *j) {
  for (int i = 0; i < q->nqueued; i++)
    if (q->queued[i] == j) {
      memmove(q->queued + i, q->queued + i + 1, (size_t)(q->nqueued - i - 1) * sizeof *q->queued);
      q->nqueued--;
      return;
    }
}

static int position_of(queue *q, const qjob *j) {
  for (int i = 0; i < q->nqueued; i++)
    if (q->queued[i] == j)
      return i + 1;
  return 0;
}

static void make_view(queue *q, const qjob *j, queue_job_view *v) {
  memset(v, 0, sizeof *v);
  snprintf(v->id, sizeof v->id, "%s", j->id);
  v->state = j->state;
  v->position = j->state == QUEUE_QUEUED ? position_of(q, j) : 0;
  v->step = j->step;
  v->total = j->total;
  v->nfe = j->nfe;
  v->created = j->created;
  v->started = j->started;
  v->finished = j->finished;
  v->images = j->images;
  v->batched_with = j->batch ? j->batch->njobs - 1 : 0;
  snprintf(v->error, sizeof v->error, "%s", j->error);
  v->last_seq = j->next_seq - 1;
  queue_spec_copy(&v->spec, &j->spec);
}

void queue_view_clear(queue_job_view *v) {
  queue_spec_clear(&v->spec);
}

/* Time-ordered ids: listing by id is listing by submission, and a cursor is just an id. */
static void make_id(queue *q, char *out) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
  if (ms <= q->last_id_ms) {
    ms = q->last_id_ms;
    q->id_counter++;
  } else {
    q->last_id_ms = ms;
    q->id_counter = 0;
  }
  uint32_t r = 0;
  if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
    r = (uint32_t)rand();
  snprintf(out, QUEUE_ID_SIZE, "%012llx%04x%08x", (unsigned long long)(ms & 0xffffffffffffull),
           q->id_counter & 0xffff, r);
}

/* ---- models ---- */

static void model_unref(qmodel *m) {
  if (m && --m->refs == 0) {
    model_free(m->m);
    json_decref(m->labels);
    json_decref(m->sched);
    free(m);
  }
}

static qmodel *find_model(queue *q, const char *name) {
  for (int i = 0; i < q->nmodels; i++)
    if (strcmp(q->models[i]->name, name) == 0)
      return q->models[i];
  return NULL;
}

int queue_set_models(queue *q, const queue_model_conf *models, int n, err *e) {
  qmodel **list = calloc((size_t)(n > 0 ? n : 1), sizeof *list);
  if (!list)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = ERR_OK, got = 0;
  for (int i = 0; i < n && !rc; i++) {
    pthread_mutex_lock(&q->mu);
    qmodel *old = find_model(q, models[i].name);
    if (old && strcmp(old->path, models[i].path) == 0) { /* same folder: keep the loaded copy */
      old->refs++;
      list[got++] = old;
      pthread_mutex_unlock(&q->mu);
      continue;
    }
    pthread_mutex_unlock(&q->mu);
    qmodel *m = calloc(1, sizeof *m);
    if (!m) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
      break;
    }
    snprintf(m->name, sizeof m->name, "%s", models[i].name);
    snprintf(m->path, sizeof m->path, "%s", models[i].path);
    m->refs = 1;
    if ((rc = model_load(m->path, &m->m, e)) != ERR_OK) {
      err_prefix(e, "model '%s' (%s)", m->name, m->path);
      free(m);
      break;
    }
    const model_info *mi = model_get_info(m->m);
    if (mi->class_labels) { /* as JSON, for listings and class names in requests */
      m->labels = json_array();
      for (int k = 0; m->labels && k < mi->n_class_labels; k++)
        json_array_append_new(m->labels, json_string(mi->class_labels[k]));
    }
    const char *sp = model_scheduler_config_path(m->m);
    json_error_t je;
    if (sp && !(m->sched = json_load_file(sp, 0, &je))) {
      rc = err_set(e, ERR_FORMAT, "model '%s': %s:%d: %s", m->name, sp, je.line, je.text);
      model_unref(m);
      break;
    }
    list[got++] = m;
  }
  pthread_mutex_lock(&q->mu);
  qmodel **drop = list;
  int ndrop = got;
  if (!rc) {
    drop = q->models;
    ndrop = q->nmodels;
    q->models = list;
    q->nmodels = got;
  }
  for (int i = 0; i < ndrop; i++)
    model_unref(drop[i]); /* running batches hold their own reference */
  pthread_mutex_unlock(&q->mu);
  free(drop);
  return rc;
}

int queue_model_count(queue *q) {
  pthread_mutex_lock(&q->mu);
  int n = q->nmodels;
  pthread_mutex_unlock(&q->mu);
  return n;
}

int queue_model_get(queue *q, int index, const char *name, queue_model_desc *out) {
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&q->mu);
  qmodel *m = name                               ? find_model(q, name)
              : index >= 0 && index < q->nmodels ? q->models[index]
                                                 : NULL;
  if (!m || !m->m) {
    pthread_mutex_unlock(&q->mu);
    return QUEUE_NOT_FOUND;
  }
  const model_info *mi = model_get_info(m->m);
  snprintf(out->name, sizeof out->name, "%s", m->name);
  snprintf(out->class_name, sizeof out->class_name, "%s", mi->class_name ? mi->class_name : "");
  snprintf(out->prediction_type, sizeof out->prediction_type, "%s",
           mi->prediction_type ? mi->prediction_type : "");
  out->kind = mi->kind;
  out->sample_size = mi->sample_size;
  out->in_channels = mi->in_channels;
  out->out_channels = mi->out_channels;
  out->num_classes = mi->num_classes;
  out->null_class = mi->null_class;
  out->num_params = mi->num_params;
  out->class_labels = m->labels ? json_incref(m->labels) : NULL;
  pthread_mutex_unlock(&q->mu);
  return ERR_OK;
}

void queue_model_desc_clear(queue_model_desc *d) {
  json_decref(d->class_labels);
  d->class_labels = NULL;
}

/* ---- samplers ---- */

static void setfield(char *field, size_t n, const char *fmt, const char *arg) {
  if (field && n)
    snprintf(field, n, fmt, arg);
}

static int try_spec(const qmodel *qm, const queue_spec *s, const char *only_key, sampler **out,
                    err *e) {
  json_t *spec = json_pack("{s:s, s:i}", "name", s->solver, "steps", s->steps);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  if (only_key)
    json_object_set_new(spec, "options",
                        json_pack("{s:O}", only_key, json_object_get(s->options, only_key)));
  else if (s->options)
    json_object_set(spec, "options", s->options);
  int rc = sampler_new_from_json(spec, qm->sched, out, e);
  json_decref(spec);
  return rc;
}

/* The one place a job's scheduler block becomes a solver: the engine's sampler_new_from_json
 * with {name, steps, options} over the model's scheduler_config.json. When it refuses, the
 * options are tried one by one to name the key at fault. */
static int build_sampler(const qmodel *qm, const queue_spec *s, sampler **out, char *field,
                         size_t fl, err *e) {
  if (!sampler_solver_class(s->solver)) {
    setfield(field, fl, "%s", "scheduler.name");
    return err_set(e, ERR_INVALID, "unknown solver '%s'", s->solver);
  }
  int rc = try_spec(qm, s, NULL, out, e);
  if (rc == ERR_OK) {
    const model_info *mi = model_get_info(qm->m);
    const sched_config *cfg = sampler_config(*out);
    const char *pred = sched_prediction_name(cfg->prediction_type); /* a static string */
    if (mi->prediction_type && strcmp(mi->prediction_type, pred) != 0) {
      sampler_free(*out);
      *out = NULL;
      setfield(field, fl, "%s", "scheduler.options.prediction_type");
      return err_set(e, ERR_INVALID, "the model predicts '%s', not '%s'", mi->prediction_type,
                     pred);
    }
    return ERR_OK;
  }
  if (rc == ERR_NOMEM)
    return rc;
  const char *key;
  json_t *v;
  json_object_foreach(s->options, key, v) {
    sampler *one = NULL;
    err e1 = {0};
    if (try_spec(qm, s, key, &one, &e1) != ERR_OK) {
      setfield(field, fl, "scheduler.options.%s", key);
      *e = e1;
      return e1.code;
    }
    sampler_free(one);
  }
  queue_spec bare = *s;
  bare.options = NULL;
  sampler *one = NULL;
  err e1 = {0};
  if (try_spec(qm, &bare, NULL, &one, &e1) != ERR_OK) {
    setfield(field, fl, "%s", strstr(e1.msg, "steps") ? "scheduler.steps" : "scheduler");
    *e = e1;
    return e1.code;
  }
  sampler_free(one);
  setfield(field, fl, "%s", "scheduler.options"); /* keys fine alone, not together */
  return rc;
}

int queue_make_sampler(queue *q, const queue_spec *s, sampler **out, char *field, size_t fieldlen,
                       err *e) {
  pthread_mutex_lock(&q->mu);
  qmodel *m = find_model(q, s->model);
  if (m)
    m->refs++;
  pthread_mutex_unlock(&q->mu);
  if (!m) {
    setfield(field, fieldlen, "%s", "model");
    return err_set(e, QUEUE_NOT_FOUND, "unknown model '%s'", s->model);
  }
  int rc = build_sampler(m, s, out, field, fieldlen, e);
  pthread_mutex_lock(&q->mu);
  model_unref(m);
  pthread_mutex_unlock(&q->mu);
  return rc;
}

/* ---- workers ---- */

static int batch_noise(void *user, uint64_t image, uint64_t stream, float *out, size_t n, err *e) {
  (void)e;
  const qbatch *b = user;
  rng_normal(b->img_seed[image], b->img_index[image], stream, out, n);
  return ERR_OK;
}

/* Solvers of the Euler family keep x in sigma space (x0 + sigma eps) rather than the VP space
 * (sqrt(abar) x0 + sqrt(1 - abar) eps) of DDPM/DDIM/DPM-Solver; the preview converts. */
static int sigma_space(const char *solver) {
  static const char *const classes[] = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                        "HeunDiscreteScheduler",  "LMSDiscreteScheduler",
                                        "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                        "DPMSolverSDEScheduler",  "EDMEulerScheduler"};
  const char *cls = sampler_solver_class(solver);
  for (size_t i = 0; cls && i < sizeof classes / sizeof *classes; i++)
    if (strcmp(cls, classes[i]) == 0)
      return 1;
  return 0;
}

/* A small PNG of image 0's predicted x0 after `nfe` evaluations: one more evaluation of one
 * image at the timestep the solver evaluates next (the engine keeps its own x0 private). */
static char *make_preview(qbatch *b, int nfe) {
  const model_info *mi = model_get_info(b->qm->m);
  const int c = mi->in_channels, h = b->h, w = b->w;
  const size_t d = (size_t)c * h * w;
  float *x0 = malloc(d * sizeof *x0);
  float *mo = malloc((size_t)mi->out_channels * h * w * sizeof *mo);
  char *url = NULL;
  const double *tm = sampler_timesteps(b->s);
  const int T = b->cfg->num_train_timesteps;
  if (!x0 || !mo)
    goto done;
  if (!b->abar) {
    b->abar = malloc((size_t)T * sizeof *b->abar);
    err e0;
    if (!b->abar || sched_alphas_cumprod(b->cfg, b->abar, &e0)) {
      free(b->abar);
      b->abar = NULL;
      goto done;
    }
  }
  const int sig = sigma_space(b->jobs[0]->spec.solver);
  if (!tm || nfe >= sampler_nfe(b->s)) { /* finished (or data-dependent): x is the image */
    memcpy(x0, b->x, d * sizeof *x0);
  } else {
    const double t = tm[nfe];
    int ti = (int)floor(t);
    ti = ti < 0 ? 0 : ti >= T - 1 ? T - 2 : ti;
    const double fr = t - ti < 0 ? 0 : t - ti > 1 ? 1 : t - ti;
    const float a = (float)((1 - fr) * b->abar[ti] + fr * b->abar[ti + 1]);
    const float sa = sqrtf(a), sb = sqrtf(1.0f - a);
    for (size_t i = 0; i < d; i++) /* to VP space */
      x0[i] = sig ? b->x[i] * sa : b->x[i];
    float tv = (float)t;
    err e;
    if (model_eval(b->qm->m, x0, 1, h, w, &tv, b->labels, mo, b->q->o.threads_per_job, &e))
      goto done;
    for (size_t i = 0; i < d; i++) {
      const float xv = x0[i];
      switch (b->cfg->prediction_type) {
      case SCHED_PRED_EPSILON: x0[i] = (xv - sb * mo[i]) / sa; break;
      case SCHED_PRED_SAMPLE: x0[i] = mo[i]; break;
      case SCHED_PRED_V: x0[i] = sa * xv - sb * mo[i]; break;
      }
    }
  }
  int f = 1;
  while (h / f > PREVIEW_MAX || w / f > PREVIEW_MAX)
    f++;
  const int ph = h / f, pw = w / f, pc = c < 3 ? 1 : 3;
  float *small = calloc((size_t)pc * ph * pw, sizeof *small);
  uint8_t *px = malloc((size_t)ph * pw * 3);
  uint8_t *png = NULL;
  size_t len = 0;
  if (small && px) {
    for (int ch = 0; ch < pc; ch++)
      for (int y = 0; y < ph * f; y++)
        for (int xx = 0; xx < pw * f; xx++)
          small[((size_t)ch * ph + y / f) * pw + xx / f] +=
              x0[((size_t)ch * h + y) * w + xx] / (float)(f * f);
    image_to_u8(small, pc, ph, pw, px);
    err e;
    if (image_png_encode(px, pc, ph, pw, NULL, 0, &png, &len, &e) == ERR_OK) {
      char *b64 = base64_encode(png, len);
      if (b64) {
        size_t n = strlen(b64) + 32;
        url = malloc(n);
        if (url)
          snprintf(url, n, "data:image/png;base64,%s", b64);
        free(b64);
      }
    }
  }
  free(png);
  free(px);
  free(small);
done:
  free(x0);
  free(mo);
  return url;
}

static void batch_progress(int step, int total, int nfe, void *user) {
  qbatch *b = user;
  queue *q = b->q;
  const double t = now_mono(), dt = t - b->t_last;
  b->t_last = t;
  qjob *head = b->jobs[0];
  char *preview = NULL;
  if (b->phase.total) {
    step = b->phase.base + step < b->phase.total ? b->phase.base + step : b->phase.total;
    total = b->phase.total;
    nfe += b->phase.nfe;
  }
  if (head->spec.preview_every && (step % head->spec.preview_every == 0 || step == total))
    preview = make_preview(b, nfe);
  pthread_mutex_lock(&q->mu);
  hist_observe(&q->step_h, dt);
  int live = 0;
  for (int i = 0; i < b->njobs; i++) {
    qjob *j = b->jobs[i];
    if (j->state != QUEUE_RUNNING)
      continue;
    live++;
    j->step = step;
    j->total = total;
    j->nfe = nfe;
    const int due =
        step == 1 || step == total || (t - j->last_progress) * 1000.0 >= q->o.progress_interval_ms;
    if (!due && !(preview && i == 0))
      continue;
    j->last_progress = t;
    const double elapsed = t - j->t_mono_started;
    const double eta = step && total ? elapsed / step * (total - step) : 0.0;
    json_t *d = json_pack("{s:i, s:i, s:i, s:f, s:f}", "step", step, "total", total, "nfe", nfe,
                          "elapsed", round(elapsed * 1000) / 1000, "eta", round(eta * 1000) / 1000);
    if (preview && i == 0)
      json_object_set_new(d, "preview", json_string(preview));
    emit(q, j, "progress", d, 0);
  }
  if (!live || q->stopping)
    atomic_store(&b->cancel, 1);
  pthread_mutex_unlock(&q->mu);
  free(preview);
}

/* Lock held. The job's final state goes to the store by the caller, unlocked. */
static char *finish_job(queue *q, qjob *j, queue_state st, const char *why, size_t *len) {
  j->state = st;
  j->finished = now_real();
  if (why)
    snprintf(j->error, sizeof j->error, "%s", why);
  json_t *d = json_object();
  if (st == QUEUE_SUCCEEDED) {
    q->succeeded++;
    json_object_set_new(d, "images", json_integer(j->images));
    hist_observe(&q->job_h, now_mono() - j->t_mono_created);
  } else if (st == QUEUE_FAILED) {
    q->failed++;
    json_object_set_new(d, "error", json_string(j->error));
  } else {
    q->cancelled++;
    json_object_set_new(d, "reason", json_string(j->error));
  }
  emit(q, j, st == QUEUE_SUCCEEDED ? "done" : st == QUEUE_FAILED ? "failed" : "cancelled", d, 1);
  drop_progress(j);
  return job_record(j, len);
}

static void write_results(qbatch *b, int base, qjob *j, const float *x, size_t d) {
  queue *q = b->q;
  json_t *extra = json_pack("{s:s}", "job_id", j->id);
  if (extra && j->spec.edit) /* the input image stays with the job: replay needs it as a file */
    json_object_set_new(extra, "edit", json_string(queue_edit_name(j->spec.edit)));
  for (int i = 0; i < j->spec.batch; i++) {
    pthread_mutex_lock(&q->mu);
    int live = j->state == QUEUE_RUNNING;
    pthread_mutex_unlock(&q->mu);
    if (!live)
      break;
    meta_image mm = {.model = j->spec.model,
                     .solver = j->spec.solver,
                     .steps = sampler_num_steps(b->s),
                     .seed = j->spec.seed,
                     .image_index = j->spec.first_image + (uint64_t)i,
                     .height = b->h,
                     .width = b->w,
                     .cfg = b->cfg,
                     .has_label = j->spec.has_label,
                     .label = j->spec.label,
                     .has_guidance = j->spec.has_guidance,
                     .guidance_scale = j->spec.guidance_scale,
                     .has_strength = j->spec.edit != QUEUE_EDIT_NONE,
                     .strength = j->spec.strength,
                     .extra = extra};
    uint8_t *png = NULL;
    size_t len = 0;
    err e = {0};
    const model_info *mi = model_get_info(b->qm->m);
    int rc = meta_png_encode(&mm, x + (size_t)(base + i) * d, mi->in_channels, &png, &len, &e);
    if (!rc)
      rc = q->st->ops->put_image(q->st, j->id, i, png, len, &e);
    if (!rc && i == j->spec.batch - 1)
      rc = q->st->ops->sync_images(q->st, &e);
    free(png);
    pthread_mutex_lock(&q->mu);
    if (rc) {
      err_prefix(&e, "writing image %d", i);
      size_t rl;
      char *rec = j->state == QUEUE_RUNNING ? finish_job(q, j, QUEUE_FAILED, e.msg, &rl) : NULL;
      pthread_mutex_unlock(&q->mu);
      qlog(q, QUEUE_LOG_ERROR, j->id, "%s", e.msg);
      if (rec)
        persist_text(q, j->id, rec, rl);
      json_decref(extra);
      return;
    }
    j->files = i + 1;
    if (j->state == QUEUE_RUNNING && i < j->spec.batch - 1) {
      /* the last image's event waits for the directory sync above */
      j->images = i + 1;
      char url[256];
      snprintf(url, sizeof url, "%s%s/images/%d", q->url_prefix, j->id, i);
      emit(q, j, "image",
           json_pack("{s:i, s:s, s:I}", "index", i, "url", url, "image_index",
                     (json_int_t)(j->spec.first_image + (uint64_t)i)),
           1);
    }
    pthread_mutex_unlock(&q->mu);
  }
  json_decref(extra);
  pthread_mutex_lock(&q->mu);
  char *rec = NULL;
  size_t rl = 0;
  if (j->state == QUEUE_RUNNING) {
    int i = j->spec.batch - 1;
    j->images = j->spec.batch;
    char url[256];
    snprintf(url, sizeof url, "%s%s/images/%d", q->url_prefix, j->id, i);
    emit(q, j, "image",
         json_pack("{s:i, s:s, s:I}", "index", i, "url", url, "image_index",
                   (json_int_t)(j->spec.first_image + (uint64_t)i)),
         1);
    q->images_generated += (uint64_t)j->images;
    rec = finish_job(q, j, QUEUE_SUCCEEDED, NULL, &rl);
  }
  pthread_mutex_unlock(&q->mu);
  if (rec)
    persist_text(q, j->id, rec, rl);
}

/* An edit job's base64 PNG (checked at submission) decoded: image (c channels) or mask, the
 * same picture for every image of the batch. */
static int decode_edit_png(const char *b64, const char *field, int is_mask, int c, int h, int w,
                           int batch, float **out, err *e) {
  uint8_t *png = NULL;
  size_t len = 0;
  if (!b64 || base64_decode(b64, strlen(b64), &png, &len) != 0)
    return err_set(e, ERR_FORMAT, "%s: not base64", field);
  const size_t d = (size_t)(is_mask ? 1 : c) * h * w;
  float *x = malloc(d * (size_t)batch * sizeof *x);
  int rc = !x        ? err_set(e, ERR_NOMEM, "out of memory")
           : is_mask ? image_mask_from_png(png, len, field, h, w, x, e)
                     : image_from_png(png, len, field, c, h, w, x, e);
  free(png);
  if (rc) {
    free(x);
    return rc;
  }
  for (int b = 1; b < batch; b++)
    memcpy(x + d * (size_t)b, x, d * sizeof *x);
  *out = x;
  return ERR_OK;
}

static void work_cb(uv_work_t *w) {
  qbatch *b = w->data;
  queue *q = b->q;
  qjob *head = b->jobs[0];
  const model_info *mi = model_get_info(b->qm->m);
  err e = {0};
  char field[128];
  float *init = NULL, *init_image = NULL, *mask = NULL;
  int64_t *labels = NULL;
  uint64_t *seeds = NULL, *index = NULL;
  uint8_t *noise = NULL;
  size_t noise_len = 0;
  const int edit_job_kind = head->spec.edit >= QUEUE_EDIT_INVERT_DDIM;
  int rc =
      edit_job_kind ? ERR_OK : build_sampler(b->qm, &head->spec, &b->s, field, sizeof field, &e);
  if (!rc && head->spec.input_image) /* edits are never batched: the head is the whole batch */
    rc = decode_edit_png(head->spec.input_image, "input_image", 0, mi->in_channels,
                         head->spec.height, head->spec.width, b->nimg, &init_image, &e);
  if (!rc && head->spec.edit == QUEUE_EDIT_INPAINT)
    rc = decode_edit_png(head->spec.mask, "mask", 1, mi->in_channels, head->spec.height,
                         head->spec.width, b->nimg, &mask, &e);
  if (rc == ERR_OK && b->s)
    b->cfg = sampler_config(b->s);
  b->h = head->spec.height;
  b->w = head->spec.width;
  const size_t d = (size_t)mi->in_channels * b->h * b->w;
  if (!rc) {
    b->x = malloc((size_t)b->nimg * d * sizeof *b->x);
    seeds = malloc((size_t)b->nimg * sizeof *seeds);
    index = malloc((size_t)b->nimg * sizeof *index);
    labels = head->spec.has_label ? malloc((size_t)b->nimg * sizeof *labels) : NULL;
    init = b->njobs > 1 ? malloc((size_t)b->nimg * d * sizeof *init) : NULL;
    if (!b->x || !seeds || !index || (head->spec.has_label && !labels) || (b->njobs > 1 && !init))
      rc = err_set(&e, ERR_NOMEM, "out of memory for %d images", b->nimg);
  }
  if (!rc) {
    int k = 0;
    for (int i = 0; i < b->njobs; i++)
      for (int n = 0; n < b->jobs[i]->spec.batch; n++, k++) {
        seeds[k] = b->jobs[i]->spec.seed;
        index[k] = b->jobs[i]->spec.first_image + (uint64_t)n;
        if (labels)
          labels[k] = b->jobs[i]->spec.label;
        if (init)
          rng_normal(seeds[k], index[k], 0, init + (size_t)k * d, d);
      }
    b->labels = labels;
    b->img_seed = seeds;
    b->img_index = index;
    guidance g = guidance_for(b->qm->m, head->spec.guidance_scale);
    g.null_label = head->spec.null_class;
    /* a single job runs on its own seed as the CLI would; a batch of jobs maps each position to
     * its job's (seed, image) so every image equals the one it would be alone */
    sampler_run_opts o = {.batch = b->nimg,
                          .height = b->h,
                          .width = b->w,
                          .seed = head->spec.seed,
                          .first_image = b->njobs > 1 ? 0 : head->spec.first_image,
                          .init_noise = init,
                          .labels = labels,
                          .progress = batch_progress,
                          .progress_user = b,
                          .noise = b->njobs > 1 ? batch_noise : NULL,
                          .noise_user = b,
                          .cancel = &b->cancel,
                          .threads = q->o.threads_per_job,
                          .guidance = head->spec.has_guidance ? &g : NULL,
                          .init_image = init_image,
                          .strength = head->spec.strength,
                          .mask = mask};
    b->t_start = b->t_last = now_mono();
    if (edit_job_kind) {
      edit_job ej = {.m = b->qm->m,
                     .sched = b->qm->sched,
                     .spec = &head->spec,
                     .image = init_image,
                     .labels = labels,
                     .guidance = o.guidance,
                     .progress = batch_progress,
                     .progress_user = b,
                     .phase = &b->phase,
                     .cancel = &b->cancel,
                     .threads = q->o.threads_per_job};
      rc = edit_job_run(&ej, &b->s, b->x, &noise, &noise_len, NULL, &e);
      if (b->s)
        b->cfg = sampler_config(b->s);
      if (!rc && noise)
        rc = q->st->ops->put_file(q->st, head->id, QUEUE_NOISE_FILE, noise, noise_len, &e);
    } else {
      rc = sampler_run(b->s, b->qm->m, &o, b->x, NULL, &e);
    }
  }
  if (rc == ERR_OK) {
    int base = 0;
    for (int i = 0; i < b->njobs; i++) {
      write_results(b, base, b->jobs[i], b->x, d);
      base += b->jobs[i]->spec.batch;
    }
  } else {
    char *recs[b->njobs];
    size_t lens[b->njobs];
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < b->njobs; i++) {
      qjob *j = b->jobs[i];
      recs[i] = NULL;
      if (j->state != QUEUE_RUNNING)
        continue;
      if (rc == ERR_CANCELLED && q->stopping) {
        /* shutdown: the store still says queued, so it runs again after a restart */
        j->state = QUEUE_QUEUED;
        j->step = j->nfe = 0;
        emit(q, j, "queued", json_pack("{s:s}", "reason", "shutdown"), 1);
      } else {
        recs[i] = finish_job(q, j, QUEUE_FAILED, e.msg, &lens[i]);
      }
    }
    pthread_mutex_unlock(&q->mu);
    for (int i = 0; i < b->njobs; i++)
      if (recs[i]) {
        qlog(q, QUEUE_LOG_WARN, b->jobs[i]->id, "failed: %s", e.msg);
        persist_text(q, b->jobs[i]->id, recs[i], lens[i]);
      }
  }
  free(init);
  free(init_image);
  free(mask);
  free(noise);
  free(labels);
  free(seeds);
  free(index);
}

static void dispatch(queue *q);

static void after_work_cb(uv_work_t *w, int status) {
  (void)status;
  qbatch *b = w->data;
  queue *q = b->q;
  pthread_mutex_lock(&q->mu);
  q->busy--;
  q->busy_seconds += now_mono() - b->t_start;
  for (int i = 0; i < b->njobs; i++) {
    b->jobs[i]->batch = NULL;
    if (b->jobs[i]->state == QUEUE_QUEUED) /* put back by a shutdown */
      push_queued(q, b->jobs[i]);
  }
  for (int i = 0; i < q->nrunning; i++)
    if (q->running[i] == b) {
      q->running[i] = q->running[--q->nrunning];
      break;
    }
  model_unref(b->qm);
  pthread_cond_broadcast(&q->cv);
  pthread_mutex_unlock(&q->mu);
  sampler_free(b->s);
  free(b->abar);
  free(b->x);
  free(b->jobs);
  free(b);
  uv_async_send(&q->wake);
}

/* Loop thread, lock held. */
static void dispatch(queue *q) {
  while (!q->stopping && q->busy < q->o.workers && q->nqueued > 0) {
    qjob *head = q->queued[0];
    qmodel *qm = find_model(q, head->spec.model);
    if (!qm || !qm->m) {
      unqueue(q, head);
      size_t len;
      char *rec = finish_job(q, head, QUEUE_FAILED, "the model is no longer configured", &len);
      char id[QUEUE_ID_SIZE];
      snprintf(id, sizeof id, "%s", head->id);
      pthread_mutex_unlock(&q->mu);
      persist_text(q, id, rec, len);
      pthread_mutex_lock(&q->mu);
      continue;
    }
    qbatch *b = calloc(1, sizeof *b);
    qjob **jobs = malloc(sizeof *jobs * (size_t)(q->nqueued < 1024 ? q->nqueued : 1024));
    qbatch **run = realloc(q->running, sizeof *run * (size_t)(q->nrunning + 1));
    if (run)
      q->running = run;
    if (!b || !jobs || !run) {
      free(b);
      free(jobs);
      qlog(q, QUEUE_LOG_ERROR, NULL, "out of memory scheduling a job");
      return;
    }
    b->q = q;
    b->qm = qm;
    qm->refs++;
    jobs[0] = head;
    b->njobs = 1;
    b->nimg = head->spec.batch;
    if (q->o.batch_max_images > 1)
      for (int i = 1; i < q->nqueued && b->njobs < 1024; i++) {
        qjob *j = q->queued[i];
        if (b->nimg + j->spec.batch <= q->o.batch_max_images &&
            queue_spec_compatible(&head->spec, &j->spec)) {
          jobs[b->njobs++] = j;
          b->nimg += j->spec.batch;
        }
      }
    b->jobs = jobs;
    const double t = now_real(), tm = now_mono();
    for (int i = 0; i < b->njobs; i++) {
      qjob *j = jobs[i];
      unqueue(q, j);
      j->state = QUEUE_RUNNING;
      j->batch = b;
      j->started = t;
      j->t_mono_started = tm;
      j->last_progress = 0;
      hist_observe(&q->wait_h, tm - j->t_mono_created);
      emit(q, j, "started", json_pack("{s:i}", "batched_with", b->njobs - 1), 1);
    }
    q->batches++;
    if (b->njobs > 1)
      q->batched_jobs += (uint64_t)b->njobs;
    q->running[q->nrunning++] = b;
    q->busy++;
    b->work.data = b;
    b->t_start = tm;
    if (uv_queue_work(&q->loop, &b->work, work_cb, after_work_cb) != 0) {
      qlog(q, QUEUE_LOG_ERROR, NULL, "uv_queue_work failed");
      q->busy--;
    }
  }
}

static void expire(queue *q) {
  const double cutoff = now_real() - q->o.result_ttl;
  for (;;) {
    char id[QUEUE_ID_SIZE];
    int files = 0, found = 0, noise = 0;
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < q->njobs; i++) {
      qjob *j = q->jobs[i];
      if (finished(j->state) && !j->batch && j->finished > 0 && j->finished < cutoff) {
        snprintf(id, sizeof id, "%s", j->id);
        files = j->files;
        noise = has_noise(&j->spec);
        remove_job_at(q, i);
        job_free(j);
        found = 1;
        break;
      }
    }
    pthread_mutex_unlock(&q->mu);
    if (!found)
      return;
    err e = {0};
    static const char *const noise_file[] = {QUEUE_NOISE_FILE, NULL};
    if (q->st->ops->remove_job(q->st, id, files, noise ? noise_file : NULL, &e))
      qlog(q, QUEUE_LOG_WARN, id, "expiring: %s", e.msg);
    else
      qlog(q, QUEUE_LOG_DEBUG, id, "expired");
  }
}

/* Wakes the loop thread from any thread. libuv aborts the process when the
 * wake-up handle is already closed, so the send happens under the lock that
 * wake_cb takes to mark it closing: a request racing a shutdown is safe. */
static void wake_loop(queue *q) {
  pthread_mutex_lock(&q->mu);
  if (q->started && !q->closing)
    uv_async_send(&q->wake);
  pthread_mutex_unlock(&q->mu);
}

static void on_close(uv_handle_t *h) {
  (void)h;
}

static void wake_cb(uv_async_t *a) {
  queue *q = a->data;
  pthread_mutex_lock(&q->mu);
  if (q->stopping && q->busy == 0) {
    q->closing = 1; /* under the lock: wake_loop() sends nothing from now on */
    pthread_mutex_unlock(&q->mu);
    uv_close((uv_handle_t *)&q->wake, on_close);
    uv_close((uv_handle_t *)&q->expiry, on_close);
    return;
  }
  dispatch(q);
  pthread_mutex_unlock(&q->mu);
}

static void expiry_cb(uv_timer_t *t) {
  expire(t->data);
}

static void *loop_main(void *arg) {
  queue *q = arg;
  uv_run(&q->loop, UV_RUN_DEFAULT);
  uv_loop_close(&q->loop);
  pthread_mutex_lock(&q->mu);
  q->loop_done = 1;
  pthread_cond_broadcast(&q->cv);
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

int queue_start(queue *q, err *e) {
  /* libuv sizes its pool from the environment on first use; the queue never runs more than
   * `workers` jobs at once, so this only has to be large enough */
  if (!getenv("UV_THREADPOOL_SIZE") || atoi(getenv("UV_THREADPOOL_SIZE")) < q->o.workers) {
    char n[16];
    snprintf(n, sizeof n, "%d", q->o.workers < 4 ? 4 : q->o.workers);
    setenv("UV_THREADPOOL_SIZE", n, 1);
  }
  if (uv_loop_init(&q->loop) != 0)
    return err_set(e, ERR_NOMEM, "cannot start the event loop");
  uv_async_init(&q->loop, &q->wake, wake_cb);
  q->wake.data = q;
  uv_timer_init(&q->loop, &q->expiry);
  q->expiry.data = q;
  uint64_t every = (uint64_t)q->o.result_ttl * 1000 / 4;
  if (every > EXPIRY_EVERY_MS)
    every = EXPIRY_EVERY_MS;
  if (every < 100)
    every = 100;
  uv_timer_start(&q->expiry, expiry_cb, every, every);
  if (pthread_create(&q->thread, NULL, loop_main, q) != 0)
    return err_set(e, ERR_NOMEM, "cannot start the queue thread");
  q->started = 1;
  uv_async_send(&q->wake);
  return ERR_OK;
}

int queue_stop(queue *q, int timeout_ms) {
  if (!q->started)
    return 0;
  pthread_mutex_lock(&q->mu);
  q->stopping = 1;
  for (int i = 0; i < q->nrunning; i++)
    atomic_store(&q->running[i]->cancel, 1);
  pthread_cond_broadcast(&q->cv);
  pthread_mutex_unlock(&q->mu);
  wake_loop(q);
  struct timespec dl;
  clock_gettime(CLOCK_REALTIME, &dl);
  dl.tv_sec += timeout_ms / 1000;
  dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
  if (dl.tv_nsec >= 1000000000) {
    dl.tv_sec++;
    dl.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&q->mu);
  while (!q->loop_done)
    if (pthread_cond_timedwait(&q->cv, &q->mu, &dl) == ETIMEDOUT)
      break;
  int done = q->loop_done;
  pthread_mutex_unlock(&q->mu);
  if (!done)
    return -1;
  pthread_join(q->thread, NULL);
  q->started = 0;
  return 0;
}

/* ---- recovery ---- */

static void recover_one(void *user, const char *id, const char *text, size_t len) {
  queue *q = user;
  if (!text) {
    qlog(q, QUEUE_LOG_ERROR, id, "recovery: cannot read the job file; left in place");
    return;
  }
  json_error_t je;
  json_t *r = json_loadb(text, len, 0, &je);
  qjob *j = calloc(1, sizeof *j);
  err e = {0};
  const char *state = NULL, *error = "";
  json_t *spec = NULL, *events = NULL;
  json_int_t next_seq = 1;
  if (!r || !j ||
      json_unpack_ex(r, &je, 0, "{s:o, s:s, s:F, s?F, s?F, s?i, s?i, s?i, s?s, s?I, s?o}", "spec",
                     &spec, "state", &state, "created", &j->created, "started", &j->started,
                     "finished", &j->finished, "images", &j->images, "files", &j->files, "total",
                     &j->total, "error", &error, "next_seq", &next_seq, "events", &events) ||
      queue_spec_from_json(spec, &j->spec, &e) || queue_state_from_name(state) < 0 ||
      strlen(id) >= QUEUE_ID_SIZE) {
    qlog(q, QUEUE_LOG_ERROR, id, "recovery: unreadable job record (%s); left in place",
         e.msg[0] ? e.msg : je.text);
    json_decref(r);
    if (j)
      queue_spec_clear(&j->spec);
    free(j);
    return;
  }
  snprintf(j->id, sizeof j->id, "%s", id);
  snprintf(j->error, sizeof j->error, "%s", error);
  j->state = (queue_state)queue_state_from_name(state);
  j->next_seq = (uint64_t)(next_seq > 0 ? next_seq : 1);
  j->t_mono_created = now_mono();
  size_t i;
  json_t *ev;
  json_array_foreach(events, i, ev) {
    json_int_t seq;
    const char *type, *data;
    if (json_unpack(ev, "{s:I, s:s, s:s}", "seq", &seq, "type", &type, "data", &data) != 0)
      continue;
    if (j->nlife == j->caplife) {
      int cap = j->caplife ? 2 * j->caplife : 8;
      qevent *n = realloc(j->life, (size_t)cap * sizeof *n);
      if (!n)
        break;
      j->life = n;
      j->caplife = cap;
    }
    char *copy = strdup(data);
    if (!copy)
      break;
    j->life[j->nlife++] = (qevent){(uint64_t)seq, event_type(type), copy};
    if ((uint64_t)seq >= j->next_seq)
      j->next_seq = (uint64_t)seq + 1;
  }
  json_decref(r);
  if (!finished(j->state)) {
    /* queued, or running when the process died: progress events of the lost run were never
     * written, so skip past every number they can have used, keeping ids unique for clients
     * that resume with Last-Event-ID */
    j->next_seq += 2 * (uint64_t)j->spec.steps + (uint64_t)j->spec.batch + 8;
    const int was_running = j->state == QUEUE_RUNNING || j->started > 0;
    j->state = QUEUE_QUEUED;
    j->started = 0;
    j->images = 0;
    emit(q, j, "queued", json_pack("{s:s}", "reason", was_running ? "restarted" : "recovered"), 1);
  }
  if (insert_job(q, j) != ERR_OK) {
    job_free(j);
    return;
  }
  /* (queued ones go to the FIFO after all are loaded, in id order) */
}

int queue_new(const queue_opts *o, queue **out, err *e) {
  queue *q = calloc(1, sizeof *q);
  if (!q)
    return err_set(e, ERR_NOMEM, "out of memory");
  q->o = *o;
  snprintf(q->state_dir, sizeof q->state_dir, "%s", o->state_dir);
  snprintf(q->url_prefix, sizeof q->url_prefix, "%s", o->url_prefix ? o->url_prefix : "");
  q->o.state_dir = q->state_dir;
  q->o.url_prefix = q->url_prefix;
  if (q->o.workers < 1)
    q->o.workers = 1;
  if (q->o.threads_per_job < 1)
    q->o.threads_per_job = 1;
  if (q->o.batch_max_images < 1)
    q->o.batch_max_images = 1;
  pthread_mutex_init(&q->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_cond_init(&q->cv, &ca);
  pthread_condattr_destroy(&ca);
  q->step_h.bounds = step_bounds;
  q->job_h.bounds = q->wait_h.bounds = job_bounds;
  q->t0 = now_mono();
  int rc = store_fs_open(q->state_dir, &q->st, e);
  if (rc) {
    queue_free(q);
    return rc;
  }
  if ((rc = q->st->ops->list_jobs(q->st, recover_one, q, e))) {
    queue_free(q);
    return rc;
  }
  int requeued = 0;
  for (int i = 0; i < q->njobs; i++)
    if (q->jobs[i]->state == QUEUE_QUEUED) {
      push_queued(q, q->jobs[i]);
      requeued++;
    }
  if (q->njobs)
    qlog(q, QUEUE_LOG_INFO, NULL, "recovered %d jobs (%d queued again) from %s", q->njobs, requeued,
         q->state_dir);
  *out = q;
  return ERR_OK;
}

void queue_free(queue *q) {
  if (!q)
    return;
  if (q->started && queue_stop(q, 60000) != 0)
    return; /* workers still hold it: leaking beats a use after free */
  for (int i = 0; i < q->njobs; i++)
    job_free(q->jobs[i]);
  free(q->jobs);
  free(q->queued);
  free(q->running);
  for (int i = 0; i < q->nmodels; i++)
    model_unref(q->models[i]);
  free(q->models);
  if (q->st)
    q->st->ops->free(q->st);
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  free(q);
}

/* ---- requests ---- */

static int count_active(queue *q, const char *owner) {
  int n = 0;
  for (int i = 0; i < q->njobs; i++) {
    const qjob *j = q->jobs[i];
    n += !finished(j->state) && strcmp(j->spec.owner, owner) == 0;
  }
  return n;
}

int queue_submit(queue *q, queue_spec *spec, queue_job_view *out, err *e) {
  qjob *j = calloc(1, sizeof *j);
  if (!j)
    return err_set(e, ERR_NOMEM, "out of memory");
  pthread_mutex_lock(&q->mu);
  if (q->stopping) {
    pthread_mutex_unlock(&q->mu);
    free(j);
    return err_set(e, QUEUE_STOPPING, "the server is shutting down");
  }
  if (q->nqueued + q->npending >= q->o.queue_max) {
    q->rejected_full++;
    pthread_mutex_unlock(&q->mu);
    free(j);
    return err_set(e, QUEUE_FULL, "the queue is full (%d jobs waiting)", q->o.queue_max);
  }
  /* without API keys there is one anonymous owner: queue_max is the only bound then */
  if (spec->owner[0] && count_active(q, spec->owner) >= q->o.max_jobs_per_key) {
    q->rejected_limit++;
    pthread_mutex_unlock(&q->mu);
    free(j);
    return err_set(e, QUEUE_LIMIT, "at most %d unfinished jobs per API key", q->o.max_jobs_per_key);
  }
  make_id(q, j->id);
  j->spec = *spec;
  j->state = QUEUE_QUEUED;
  j->pending = 1;
  q->npending++;
  j->created = now_real();
  j->t_mono_created = now_mono();
  j->next_seq = 1;
  emit(q, j, "queued", json_pack("{s:i}", "position", q->nqueued + 1), 1);
  size_t len;
  char *rec = job_record(j, &len);
  if (!rec || insert_job(q, j) != ERR_OK) {
    j->spec.options = j->spec.edit_args = NULL; /* still the caller's */
    j->spec.input_image = j->spec.mask = NULL;
    pthread_mutex_unlock(&q->mu);
    free(rec);
    job_free(j);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  pthread_mutex_unlock(&q->mu);
  /* durable before the 202: a crash after this point cannot lose the job */
  int rc = q->st->ops->put_job(q->st, j->id, rec, len, e);
  free(rec);
  pthread_mutex_lock(&q->mu);
  q->npending--;
  int pos;
  if (rc) {
    if (job_index(q, j->id, &pos))
      remove_job_at(q, pos);
    pthread_mutex_unlock(&q->mu);
    j->spec.options = j->spec.edit_args = NULL;
    j->spec.input_image = j->spec.mask = NULL;
    job_free(j);
    return rc;
  }
  j->pending = 0;
  if (push_queued(q, j) != ERR_OK) {
    pthread_mutex_unlock(&q->mu);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  q->submitted++;
  memset(spec, 0, sizeof *spec);
  if (out)
    make_view(q, j, out);
  pthread_mutex_unlock(&q->mu);
  wake_loop(q);
  return ERR_OK;
}

int queue_get(queue *q, const char *id, const char *owner, queue_job_view *out, err *e) {
  pthread_mutex_lock(&q->mu);
  qjob *j = find_job(q, id, owner);
  if (j)
    make_view(q, j, out);
  pthread_mutex_unlock(&q->mu);
  return j ? ERR_OK : err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
}

int queue_list(queue *q, const char *owner, const char *before, int state, int limit,
               queue_job_view *out, int *n, int *more) {
  *n = 0;
  *more = 0;
  pthread_mutex_lock(&q->mu);
  int start = q->njobs - 1;
  if (before) {
    int pos;
    job_index(q, before, &pos);
    start = pos - 1; /* ids sort by time: everything before the cursor is older */
  }
  for (int i = start; i >= 0; i--) {
    const qjob *j = q->jobs[i];
    if (j->pending || (owner && strcmp(owner, j->spec.owner) != 0) ||
        (state >= 0 && (int)j->state != state))
      continue;
    if (*n == limit) {
      *more = 1;
      break;
    }
    make_view(q, j, &out[(*n)++]);
  }
  pthread_mutex_unlock(&q->mu);
  return ERR_OK;
}

int queue_cancel(queue *q, const char *id, const char *owner, queue_job_view *out, err *e) {
  pthread_mutex_lock(&q->mu);
  qjob *j = find_job(q, id, owner);
  if (!j) {
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  }
  if (finished(j->state)) {
    if (out)
      make_view(q, j, out);
    queue_state st = j->state;
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_CONFLICT, "job '%s' is already %s", id, queue_state_name(st));
  }
  const int was_running = j->state == QUEUE_RUNNING;
  if (!was_running)
    unqueue(q, j);
  size_t len;
  char *rec = finish_job(q, j, QUEUE_CANCELLED,
                         was_running ? "cancelled while running" : "cancelled while queued", &len);
  if (was_running && j->batch) {
    int live = 0;
    for (int i = 0; i < j->batch->njobs; i++)
      live += j->batch->jobs[i]->state == QUEUE_RUNNING;
    if (!live) /* the batch serves nobody now: stop it at the next step boundary */
      atomic_store(&j->batch->cancel, 1);
  }
  if (out)
    make_view(q, j, out);
  pthread_mutex_unlock(&q->mu);
  qlog(q, QUEUE_LOG_INFO, id, "cancelled (%s)", was_running ? "running" : "queued");
  persist_text(q, id, rec, len);
  return ERR_OK;
}

int queue_cancel_running(queue *q, const char *owner) {
  char ids[64][QUEUE_ID_SIZE];
  int n = 0;
  pthread_mutex_lock(&q->mu);
  for (int i = 0; i < q->nrunning && n < 64; i++)
    for (int k = 0; k < q->running[i]->njobs && n < 64; k++) {
      qjob *j = q->running[i]->jobs[k];
      if (j->state == QUEUE_RUNNING && (!owner || strcmp(owner, j->spec.owner) == 0))
        snprintf(ids[n++], QUEUE_ID_SIZE, "%s", j->id);
    }
  pthread_mutex_unlock(&q->mu);
  int done = 0;
  for (int i = 0; i < n; i++) {
    err e;
    done += queue_cancel(q, ids[i], owner, NULL, &e) == ERR_OK;
  }
  return done;
}

int queue_current(queue *q, const char *owner, queue_job_view *out, int *queued_total) {
  int found = 0;
  pthread_mutex_lock(&q->mu);
  *queued_total = 0;
  for (int i = 0; i < q->nqueued; i++)
    *queued_total += !owner || strcmp(owner, q->queued[i]->spec.owner) == 0;
  for (int i = 0; i < q->nrunning && !found; i++)
    for (int k = 0; k < q->running[i]->njobs && !found; k++) {
      qjob *j = q->running[i]->jobs[k];
      if (j->state == QUEUE_RUNNING && (!owner || strcmp(owner, j->spec.owner) == 0)) {
        make_view(q, j, out);
        found = 1;
      }
    }
  for (int i = 0; i < q->nqueued && !found; i++)
    if (!owner || strcmp(owner, q->queued[i]->spec.owner) == 0) {
      make_view(q, q->queued[i], out);
      found = 1;
    }
  pthread_mutex_unlock(&q->mu);
  return found;
}

static void deadline_in(struct timespec *dl, int ms) {
  clock_gettime(CLOCK_REALTIME, dl);
  dl->tv_sec += ms / 1000;
  dl->tv_nsec += (long)(ms % 1000) * 1000000;
  if (dl->tv_nsec >= 1000000000) {
    dl->tv_sec++;
    dl->tv_nsec -= 1000000000;
  }
}

/* Events after `after` in seq order (lock held); returns the count. */
static int collect(const qjob *j, uint64_t after, queue_event *out, int max) {
  int n = 0, a = 0, r = 0;
  while (n < max) {
    const qevent *ea = NULL, *er = NULL;
    while (a < j->nlife && j->life[a].seq <= after)
      a++;
    while (r < j->ring_n && j->ring[(j->ring_head + r) % RING].seq <= after)
      r++;
    if (a < j->nlife)
      ea = &j->life[a];
    if (r < j->ring_n)
      er = &j->ring[(j->ring_head + r) % RING];
    const qevent *pick = ea && (!er || ea->seq < er->seq) ? ea : er;
    if (!pick)
      break;
    if (pick == ea)
      a++;
    else
      r++;
    out[n].seq = pick->seq;
    out[n].type = pick->type;
    out[n].data = strdup(pick->data);
    n++;
  }
  return n;
}

int queue_events(queue *q, const char *id, const char *owner, uint64_t after, int timeout_ms,
                 queue_event **evs, int *n, int *done, err *e) {
  *evs = NULL;
  *n = 0;
  *done = 0;
  struct timespec dl;
  deadline_in(&dl, timeout_ms);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    qjob *j = find_job(q, id, owner);
    if (!j) {
      pthread_mutex_unlock(&q->mu);
      return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
    const int max = j->nlife + j->ring_n;
    if (max > 0 && j->next_seq - 1 > after) {
      queue_event *out = calloc((size_t)max, sizeof *out);
      if (!out) {
        pthread_mutex_unlock(&q->mu);
        return err_set(e, ERR_NOMEM, "out of memory");
      }
      *n = collect(j, after, out, max);
      *evs = out;
    }
    /* done once the terminal event is among those delivered */
    if (finished(j->state) && (*n > 0 ? (*evs)[*n - 1].seq : after) >= j->next_seq - 1)
      *done = 1;
    if (q->stopping && !*n)
      *done = 1;
    if (*n || *done)
      break;
    if (pthread_cond_timedwait(&q->cv, &q->mu, &dl) == ETIMEDOUT)
      break;
  }
  pthread_mutex_unlock(&q->mu);
  return ERR_OK;
}

void queue_events_free(queue_event *evs, int n) {
  for (int i = 0; i < n; i++)
    free(evs[i].data);
  free(evs);
}

int queue_wait(queue *q, const char *id, int timeout_ms, queue_job_view *out, err *e) {
  struct timespec dl;
  deadline_in(&dl, timeout_ms);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    qjob *j = find_job(q, id, NULL);
    if (!j) {
      pthread_mutex_unlock(&q->mu);
      return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
    if (finished(j->state) || q->stopping ||
        pthread_cond_timedwait(&q->cv, &q->mu, &dl) == ETIMEDOUT) {
      j = find_job(q, id, NULL);
      if (j)
        make_view(q, j, out);
      pthread_mutex_unlock(&q->mu);
      return j ? ERR_OK : err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
  }
}

int queue_image(queue *q, const char *id, const char *owner, int n, uint8_t **png, size_t *len,
                err *e) {
  pthread_mutex_lock(&q->mu);
  qjob *j = find_job(q, id, owner);
  int batch = j ? j->spec.batch : 0, ready = j ? j->images : 0;
  queue_state st = j ? j->state : QUEUE_FAILED;
  pthread_mutex_unlock(&q->mu);
  if (!j)
    return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  if (n < 0 || n >= batch)
    return err_set(e, QUEUE_NOT_FOUND, "job '%s' has images 0..%d, not %d", id, batch - 1, n);
  if (n >= ready)
    return err_set(e, QUEUE_NOT_READY, "image %d of job '%s' is not ready (job %s)", n, id,
                   queue_state_name(st));
  return q->st->ops->get_image(q->st, id, n, png, len, e);
}

int queue_noise(queue *q, const char *id, const char *owner, uint8_t **npy, size_t *len, err *e) {
  pthread_mutex_lock(&q->mu);
  qjob *j = find_job(q, id, owner);
  const int noise = j && has_noise(&j->spec);
  queue_state st = j ? j->state : QUEUE_FAILED;
  pthread_mutex_unlock(&q->mu);
  if (!j)
    return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  if (!noise)
    return err_set(e, QUEUE_NOT_FOUND,
                   "job '%s' is not an inversion of an input image: it has no noise", id);
  if (st != QUEUE_SUCCEEDED)
    return err_set(e, QUEUE_NOT_READY, "the noise of job '%s' is not ready (job %s)", id,
                   queue_state_name(st));
  return q->st->ops->get_file(q->st, id, QUEUE_NOISE_FILE, npy, len, e);
}

void queue_get_stats(queue *q, queue_stats *s) {
  memset(s, 0, sizeof *s);
  pthread_mutex_lock(&q->mu);
  s->queued = q->nqueued;
  for (int i = 0; i < q->nrunning; i++)
    for (int k = 0; k < q->running[i]->njobs; k++)
      s->running += q->running[i]->jobs[k]->state == QUEUE_RUNNING;
  s->submitted = q->submitted;
  s->succeeded = q->succeeded;
  s->failed = q->failed;
  s->cancelled = q->cancelled;
  s->rejected_full = q->rejected_full;
  s->rejected_limit = q->rejected_limit;
  s->images_generated = q->images_generated;
  s->batches = q->batches;
  s->batched_jobs = q->batched_jobs;
  s->workers = q->o.workers;
  s->busy_workers = q->busy;
  s->threads_per_job = q->o.threads_per_job;
  s->busy_seconds = q->busy_seconds;
  const double t = now_mono();
  for (int i = 0; i < q->nrunning; i++)
    s->busy_seconds += t - q->running[i]->t_start;
  s->uptime = t - q->t0;
  s->models = q->nmodels;
  s->stopping = q->stopping;
  s->step_seconds = q->step_h;
  s->job_seconds = q->job_h;
  s->wait_seconds = q->wait_h;
  pthread_mutex_unlock(&q->mu);
}

int queue_ready(queue *q, char *why, size_t whylen) {
  pthread_mutex_lock(&q->mu);
  int ok = 0;
  if (q->stopping)
    snprintf(why, whylen, "shutting down");
  else if (!q->nmodels)
    snprintf(why, whylen, "no model loaded");
  else if (q->nqueued >= q->o.queue_max)
    snprintf(why, whylen, "queue full");
  else if (!q->started)
    snprintf(why, whylen, "not started");
  else
    ok = 1;
  pthread_mutex_unlock(&q->mu);
  return ok;
}
