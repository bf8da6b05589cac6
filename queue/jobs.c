/* Jobs in memory: the id-ordered index, ids, views and final states; the FIFO of queued jobs
 * and the per-job event logs (lifecycle events kept, progress trimmed) through the backend. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "mem.h"

/* ---- jobs and events ---- */

static void free_unpublished(qjob *j) {
  while (j->unpublished) {
    qunpublished *u = j->unpublished;
    j->unpublished = u->next;
    free(u->text);
    free(u);
  }
}

void qjob_free(qjob *j) {
  if (!j)
    return;
  if (j->final)
    free(j->final->event);
  free_unpublished(j);
  queue_spec_clear(&j->spec);
  free(j);
}

void qjob_discard(queue *q, qjob *j) {
  if (j)
    q->be->ops->drop(q->be, j->id);
  qjob_free(j);
}

/* An event's text: data (stolen) with job_id, seq, type and time added. The time is whole unix
 * seconds: finer stamps on successive events would give clients per-step times. */
static char *event_text(const qjob *j, uint64_t seq, const char *type, json_t *data) {
  if (!data)
    data = json_object();
  json_object_set_new(data, "job_id", json_string(j->id));
  json_object_set_new(data, "seq", json_integer((json_int_t)seq));
  json_object_set_new(data, "type", json_string(type));
  json_object_set_new(data, "time", json_integer((json_int_t)floor(qclock_real())));
  char *text = json_dumps(data, JSON_COMPACT);
  json_decref(data);
  return text;
}

/* Appends j's refused lifecycle events (lock held) until one is refused again; 1 when none is
 * left. One the log already holds (its reply was lost) counts as taken. */
static int publish(queue *q, qjob *j) {
  while (j->unpublished) {
    qunpublished *u = j->unpublished;
    err e = {0};
    const int rc = q->be->ops->append(q->be, j->id, u->seq, u->type, u->text, 1, &e);
    if (rc != ERR_OK && rc != QBACKEND_ORDER)
      return 0;
    j->unpublished = u->next;
    free(u->text);
    free(u);
  }
  return 1;
}

/* Keeps a refused lifecycle event (its text stolen) after j's others (lock held). */
static void keep_unpublished(queue *q, qjob *j, uint64_t seq, const char *type, char *text) {
  qunpublished *u = mem_calloc(1, sizeof *u);
  if (!u) {
    qlog(q, QUEUE_LOG_ERROR, j->id, "event %llu lost: out of memory", (unsigned long long)seq);
    free(text);
    return;
  }
  u->seq = seq;
  snprintf(u->type, sizeof u->type, "%s", type);
  u->text = text;
  qunpublished **at = &j->unpublished;
  while (*at)
    at = &(*at)->next;
  *at = u;
  q->unpublished = 1;
}

/* Appends an event's text (stolen) to the job's log (lock held) and wakes its readers. A
 * lifecycle event the backend refuses (Redis away) is kept and appended later, in order;
 * a progress event is dropped (the next one supersedes it). */
static void push_event(queue *q, qjob *j, uint64_t seq, const char *type, char *text,
                       int lifecycle) {
  err e = {0};
  int rc = publish(q, j) ? q->be->ops->append(q->be, j->id, seq, type, text, lifecycle, &e)
                         : QUEUE_UNAVAILABLE;
  if (rc == QUEUE_UNAVAILABLE && !e.code)
    err_set(&e, rc, "earlier events are still waiting for the backend");
  if (rc != ERR_OK && (q->store_ok || rc != QUEUE_UNAVAILABLE)) /* once per outage */
    qlog(q, QUEUE_LOG_ERROR, j->id, "event %llu %s: %s", (unsigned long long)seq,
         lifecycle && rc == QUEUE_UNAVAILABLE ? "kept to send again" : "lost", e.msg);
  if (rc == QUEUE_UNAVAILABLE)
    qstore_note(q, rc, e.msg);
  if (rc == QUEUE_UNAVAILABLE && lifecycle)
    keep_unpublished(q, j, seq, type, text);
  else
    free(text);
  pthread_cond_broadcast(&q->cv);
}

void qjob_publish_unpublished(queue *q) {
  if (!q->unpublished)
    return;
  for (int i = 0; i < q->njobs; i++)
    if (q->jobs[i]->unpublished && !publish(q, q->jobs[i]))
      return; /* still away: the next tick (one refusal per tick, each may wait a timeout) */
  q->unpublished = 0;
  pthread_cond_broadcast(&q->cv);
}

/* Appends an event (lock held). data is stolen; job_id, seq, type and time are added. */
void qjob_emit(queue *q, qjob *j, const char *type, json_t *data, int lifecycle) {
  uint64_t seq = j->next_seq++;
  char *text = event_text(j, seq, type, data);
  if (text)
    push_event(q, j, seq, type, text, lifecycle);
}

static const char *final_event_type(queue_state st) {
  return st == QUEUE_SUCCEEDED ? "done" : st == QUEUE_FAILED ? "failed" : "cancelled";
}

/* The job's lifecycle events as the record keeps them (lock held); NULL out of memory. */
static json_t *record_events(queue *q, const qjob *j, err *e) {
  qbackend_event *evs = NULL;
  int n = 0;
  err local = {0};
  if (q->be->ops->read(q->be, j->id, 0, 1, &evs, &n, e ? e : &local) != ERR_OK)
    return NULL;
  json_t *ev = json_array();
  for (int i = 0; ev && i < n; i++)
    json_array_append_new(ev, json_pack("{s:I, s:s, s:s}", "seq", (json_int_t)evs[i].seq, "type",
                                        evs[i].type, "data", evs[i].data));
  qbackend_events_free(evs, n);
  return ev;
}

/* The record the store keeps (lock held): with a decided final state, the job as it will be. */
char *qjob_record(queue *q, const qjob *j, size_t *len, err *e) {
  const qfinal *f = j->final;
  json_t *ev = record_events(q, j, e);
  *len = 0;
  if (!ev)
    return NULL;
  if (f)
    json_array_append_new(ev, json_pack("{s:I, s:s, s:s}", "seq", (json_int_t)j->next_seq, "type",
                                        final_event_type(f->state), "data", f->event));
  json_t *r = json_pack(
      "{s:s, s:o, s:s, s:f, s:f, s:f, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:I, s:o}", "id", j->id,
      "spec", queue_spec_to_json(&j->spec), "state", queue_state_name(f ? f->state : j->state),
      "created", j->created, "started", j->started, "finished", f ? f->time : j->finished, "step",
      j->step, "total", j->total, "nfe", j->nfe, "images", j->images, "files", j->files, "attempts",
      j->attempts, "error", f ? f->why : j->error, "next_seq",
      (json_int_t)(j->next_seq + (f != NULL)), "events", ev);
  char *text = r ? json_dumps(r, JSON_COMPACT) : NULL;
  json_decref(r);
  *len = text ? strlen(text) : 0;
  return text;
}

void qstore_note(queue *q, int rc, const char *why) {
  q->store_ok = rc == ERR_OK;
  if (rc)
    snprintf(q->store_why, sizeof q->store_why, "%s", why);
}

int qjob_persist(queue *q, const char *id, char *text, size_t len) {
  err e = {0};
  int rc = text ? q->st->ops->put_job(q->st, id, text, len, &e)
                : err_set(&e, ERR_NOMEM, "out of memory");
  if (rc) {
    qlog(q, QUEUE_LOG_ERROR, id, "persisting the job failed: %s", e.msg);
    if (rc != ERR_NOMEM) {
      pthread_mutex_lock(&q->mu);
      qstore_note(q, rc, e.msg);
      pthread_mutex_unlock(&q->mu);
    }
  }
  free(text);
  return rc;
}

int qjob_index(queue *q, const char *id, int *pos) {
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

qjob *qjob_find(queue *q, const char *id, const char *owner) {
  int pos;
  if (!id || !qjob_index(q, id, &pos))
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
  qjob **p = mem_realloc(*arr, (size_t)grown * sizeof *p);
  if (!p)
    return ERR_NOMEM;
  *arr = p;
  *cap = grown;
  return ERR_OK;
}

int qjob_insert(queue *q, qjob *j) {
  if (reserve_one(&q->jobs, q->njobs, &q->capjobs))
    return ERR_NOMEM;
  int pos;
  qjob_index(q, j->id, &pos);
  memmove(q->jobs + pos + 1, q->jobs + pos, (size_t)(q->njobs - pos) * sizeof *q->jobs);
  q->jobs[pos] = j;
  q->njobs++;
  return ERR_OK;
}

void qjob_remove_at(queue *q, int pos) {
  memmove(q->jobs + pos, q->jobs + pos + 1, (size_t)(q->njobs - pos - 1) * sizeof *q->jobs);
  q->njobs--;
}

/* A job queued on disk stays accepted when the backend refuses it (out of memory, a backend
 * out of reach): it is marked and the retry timer pushes it again (qjob_push_unpushed). */
int qjob_enqueue(queue *q, qjob *j) {
  err e = {0};
  int rc = q->be->ops->push(q->be, j->id, &e);
  if (rc == QBACKEND_EXISTS && q->shared)
    rc = ERR_OK; /* queued already, or claimed by our past life: its lease runs out */
  if (rc && !j->unpushed) {
    qlog(q, QUEUE_LOG_ERROR, j->id, "queueing failed: %s; will retry", e.msg);
    j->unpushed = 1;
    q->unpushed++;
  } else if (!rc && j->unpushed) {
    j->unpushed = 0;
    q->unpushed--;
  }
  return rc;
}

void qjob_push_unpushed(queue *q) {
  for (int i = 0; q->unpushed > 0 && i < q->njobs; i++) {
    qjob *j = q->jobs[i];
    if (!j->unpushed)
      continue;
    if (j->state == QUEUE_QUEUED && !j->final) {
      if (qjob_enqueue(q, j) != ERR_OK)
        return; /* still refused: the next tick */
    } else {    /* cancelled meanwhile */
      j->unpushed = 0;
      q->unpushed--;
    }
  }
}

void qjob_unqueue(queue *q, const qjob *j) {
  q->be->ops->remove(q->be, j->id);
}

int qjob_nqueued(queue *q) {
  return q->be->ops->count(q->be);
}

qjob **qjob_queued(queue *q, int *n) {
  *n = 0;
  const int max = q->be->ops->count(q->be);
  qbackend_id *ids = max ? mem_malloc((size_t)max * sizeof *ids) : NULL;
  qjob **out = ids ? mem_malloc((size_t)max * sizeof *out) : NULL;
  const int got = out ? q->be->ops->peek(q->be, 0, max, ids) : 0;
  for (int i = 0; i < got; i++) {
    qjob *j = qjob_find(q, ids[i], NULL);
    if (j)
      out[(*n)++] = j;
  }
  free(ids);
  if (!*n) {
    free(out);
    return NULL;
  }
  return out;
}

void qjob_view(queue *q, const qjob *j, queue_job_view *v) {
  memset(v, 0, sizeof *v);
  snprintf(v->id, sizeof v->id, "%s", j->id);
  v->state = j->state;
  snprintf(v->store_error, sizeof v->store_error, "%s", j->store_error);
  v->position = j->state == QUEUE_QUEUED ? q->be->ops->position(q->be, j->id) : 0;
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
  qspec_copy_light(&v->spec, &j->spec);
}

void queue_view_clear(queue_job_view *v) {
  queue_spec_clear(&v->spec);
}

/* Time-ordered ids: listing by id is listing by submission, and a cursor is just an id. */
void qjob_make_id(queue *q, char *out) {
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

int qjob_live(const qjob *j) {
  return j->state == QUEUE_RUNNING && !j->final;
}

/* Lock held. The decision is kept in the job itself (no allocation can lose it); the final
 * event and the record may fail to build for want of memory, and then the write is retried like
 * a refused one. The record goes to the store by the caller (qjob_settle_write), unlocked. */
char *qjob_finish(queue *q, qjob *j, queue_state st, const char *why, size_t *len) {
  *len = 0;
  if (!j->final) {
    qfinal *f = &j->final_slot;
    memset(f, 0, sizeof *f);
    f->state = st;
    f->time = qclock_real();
    snprintf(f->why, sizeof f->why, "%s", why ? why : "");
    j->final = f;
  }
  qfinal *f = j->final;
  f->writing = 1;
  if (!f->event) {
    json_t *d = json_object();
    if (f->state == QUEUE_SUCCEEDED)
      json_object_set_new(d, "images", json_integer(j->images));
    else
      json_object_set_new(d, f->state == QUEUE_FAILED ? "error" : "reason", json_string(f->why));
    f->event = d ? event_text(j, j->next_seq, final_event_type(f->state), d) : NULL;
    if (!f->event)
      return NULL;
  }
  return qjob_record(q, j, len, NULL);
}

/* Lock held: the decided final state, now on disk, becomes what readers see. */
static void settle(queue *q, qjob *j) {
  qfinal *f = j->final;
  j->state = f->state;
  j->finished = f->time;
  snprintf(j->error, sizeof j->error, "%s", f->why);
  j->store_error[0] = 0;
  if (f->state == QUEUE_SUCCEEDED) {
    q->succeeded++;
    qhist_observe(&q->job_h, qclock_mono() - j->t_mono_created);
  } else if (f->state == QUEUE_FAILED) {
    q->failed++;
  } else {
    q->cancelled++;
  }
  uint64_t seq = j->next_seq++;
  push_event(q, j, seq, final_event_type(f->state), f->event, 1);
  f->event = NULL;
  j->final = NULL;
  /* a finished job keeps its lifecycle and its last progress event: the others are superseded
   * (each carries the absolute step), and a retained job should cost little memory */
  q->be->ops->trim(q->be, j->id, 1);
  if (!j->batch) /* else when the batch is over (after_work_cb): the worker may still read them */
    qspec_release_inputs(&j->spec);
}

/* Shared stores: a settled job's keys go by themselves in Redis somewhat after result_ttl (the
 * daemons that know it remove it at result_ttl, checking every quarter of it), so the results
 * of a job no daemon knows any more (all that did are gone) do not stay for good. */
static void expire_later(queue *q, const char *id, int files, int noise) {
  if (!q->st->ops->expire_job)
    return;
  const int ttl = q->o.result_ttl + q->o.result_ttl / 4 + 1;
  static const char *const noise_file[] = {QUEUE_NOISE_FILE, NULL};
  err e = {0};
  if (q->st->ops->expire_job(q->st, id, files, noise ? noise_file : NULL, ttl, &e))
    qlog(q, QUEUE_LOG_WARN, id, "setting its expiry: %s", e.msg);
  if (q->be->ops->expire)
    q->be->ops->expire(q->be, id, ttl);
}

int qjob_settle_write(queue *q, qjob *j, char *text, size_t len) {
  err e = {0};
  char id[QUEUE_ID_SIZE], owner[sizeof j->spec.owner];
  pthread_mutex_lock(&q->mu);
  snprintf(id, sizeof id, "%s", j->id);
  snprintf(owner, sizeof owner, "%s", j->spec.owner);
  const int files = j->files, noise = qspec_has_noise(&j->spec);
  pthread_mutex_unlock(&q->mu);
  /* before the record says it ended: a client that reads that may submit again at once (the
   * other way round it could be refused for a job it saw end) */
  if (owner[0] && q->shared && q->be->ops->owner_drop)
    q->be->ops->owner_drop(q->be, owner, id);
  int rc = text ? q->st->ops->put_job(q->st, id, text, len, &e)
                : err_set(&e, ERR_NOMEM, "out of memory");
  free(text);
  if (rc == ERR_OK) /* before anyone sees it ended: a process dying after that leaves no orphan */
    expire_later(q, id, files, noise);
  pthread_mutex_lock(&q->mu);
  if (!j->final) { /* nothing decided (cannot happen): nothing to settle */
    pthread_mutex_unlock(&q->mu);
    return ERR_OK;
  }
  j->final->writing = 0;
  const int was_unsettled = j->store_error[0] != 0;
  char done[160] = ""; /* one line per finished job, for whoever reads the log */
  if (rc == ERR_OK) {
    const double ran = j->started > 0 ? j->final->time - j->started : 0;
    snprintf(done, sizeof done, "job %s: %d image(s), %d steps, ran %.2f s",
             queue_state_name(j->final->state), j->images, j->step, ran > 0 ? ran : 0);
    settle(q, j);
    q->unsettled -= was_unsettled;
    qstore_note(q, ERR_OK, NULL);
  } else {
    snprintf(j->store_error, sizeof j->store_error, "storing the final state failed (%s); retrying",
             e.msg);
    q->unsettled += !was_unsettled;
    if (rc != ERR_NOMEM)
      qstore_note(q, rc, e.msg);
  }
  pthread_mutex_unlock(&q->mu);
  if (rc)
    qlog(q, QUEUE_LOG_ERROR, id, "storing the final state failed: %s; will retry", e.msg);
  else if (done[0])
    qlog(q, QUEUE_LOG_INFO, id, "%s", done);
  return rc;
}
