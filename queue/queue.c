/* The job queue's public API (queue.h): creation and shutdown, submissions, views, cancel,
 * waiting, events, stats; the concerns behind it live in spec.c, jobs.c, models.c, worker.c,
 * loop.c and recovery.c. One mutex guards all state: HTTP
 * threads need synchronous answers (202 with a position, 409 on cancel), and every critical
 * section is short; disk writes and compute always happen with the lock released. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "mem.h"

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

const char *qevent_type(const char *name) {
  for (size_t i = 0; i < sizeof event_types / sizeof *event_types; i++)
    if (strcmp(event_types[i], name) == 0)
      return event_types[i];
  return "message";
}

int qstate_final(queue_state s) {
  return s == QUEUE_SUCCEEDED || s == QUEUE_FAILED || s == QUEUE_CANCELLED;
}

double qclock_real(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double qclock_mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void qlog(queue *q, queue_log_level level, const char *id, const char *fmt, ...) {
  if (!q->o.log)
    return;
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  q->o.log(q->o.log_user, level, id, msg);
}

void qhist_observe(queue_hist *h, double v) {
  int i = 0;
  while (i < QUEUE_HIST_BUCKETS && v > h->bounds[i])
    i++;
  h->counts[i]++;
  h->sum += v;
  h->count++;
}

/* Zero and out-of-range options replaced by their defaults and bounds. */
static void opts_defaults(queue_opts *o) {
  if (o->workers < 1)
    o->workers = 1;
  if (o->threads_per_job < 1)
    o->threads_per_job = 1;
  if (o->batch_max_images < 1)
    o->batch_max_images = 1;
  if (o->probe_every_ms == 0)
    o->probe_every_ms = 10000;
  if (o->max_attempts < 1)
    o->max_attempts = 2;
  if (o->lease_ms <= 0)
    o->lease_ms = 60000;
  if (o->max_job_bytes == 0)
    o->max_job_bytes = (size_t)64 << 20;
  if (o->max_job_bytes > STORE_RECORD_MAX - STORE_RECORD_HEADROOM)
    o->max_job_bytes = STORE_RECORD_MAX - STORE_RECORD_HEADROOM;
}

/* The test-only fault hooks from the environment, unset in production; *fault the storage
 * faults to inject (tests/test_faults.c sets o->store_fault; daemon tests use the variable,
 * e.g. "write:40:sticky:ENOSPC" for a disk that fills up). */
static int fault_hooks(queue *q, store_fault **fault, err *e) {
  /* a job with this seed aborts the process in the worker, as a poison job would
   * (tests/test_durability.c crash_loop_is_broken) */
  const char *crash = getenv("DENOISED_FAULT_CRASH_SEED");
  q->fault_crash_seed = crash ? strtoull(crash, NULL, 10) : 0;
  /* killed between a job's record write and its 202 (idempotent retries) */
  q->fault_kill_after_record = getenv("DENOISED_FAULT_KILL_AFTER_RECORD") != NULL;
  /* killed between writing a made model's folder and registering it (idempotent publish,
   * tests/test_server_finetune.c publish_survives_a_crash) */
  q->fault_kill_before_register = getenv("DENOISED_FAULT_KILL_BEFORE_REGISTER") != NULL;
  /* a job whose stochastic steps draw a NaN (tests/test_server_edit.c poison jobs) */
  const char *nan_seed = getenv("DENOISED_FAULT_NAN_SEED");
  q->fault_nan_seed = nan_seed ? strtoull(nan_seed, NULL, 10) : 0;
  /* the worker pool refuses the Nth batch (tests/test_durability.c pool_refusal_fails_jobs) */
  const char *refuse = getenv("DENOISED_FAULT_POOL_REFUSES");
  q->fault_pool_refuses = refuse ? atoi(refuse) : 0;
  *fault = q->o.store_fault;
  const char *fenv = getenv("DENOISED_FAULT_STORE");
  if (*fault || !fenv || !*fenv)
    return ERR_OK;
  *fault = &q->env_fault;
  return store_fault_parse(fenv, &q->env_fault, e);
}

/* The queue's backend and store: in memory and state_dir, or both on the configured Redis. */
static int open_backends(queue *q, store_fault *fault, err *e) {
  const queue_opts *o = &q->o;
  int rc;
  if (o->redis_url && *o->redis_url) {
    qbackend_redis_opts ro = {.url = o->redis_url,
                              .password = o->redis_password,
                              .prefix = o->redis_prefix,
                              .transient_max = RING};
    rc = qbackend_redis_open(&ro, &q->be, e);
    if (!rc)
      rc = store_redis_open(o->redis_url, o->redis_password, o->redis_prefix, &q->st, e);
    q->shared = 1;
  } else {
    rc = qbackend_mem_open(&(qbackend_mem_opts){.transient_max = RING}, &q->be, e);
    if (!rc)
      rc = store_fs_open(q->state_dir, fault, &q->st, e);
  }
  q->o.redis_password = NULL; /* read once: not kept where a dump would show it */
  return rc;
}

int queue_new(const queue_opts *o, queue **out, err *e) {
  queue *q = mem_calloc(1, sizeof *q);
  if (!q)
    return err_set(e, ERR_NOMEM, "out of memory");
  q->o = *o;
  snprintf(q->state_dir, sizeof q->state_dir, "%s", o->state_dir);
  snprintf(q->url_prefix, sizeof q->url_prefix, "%s", o->url_prefix ? o->url_prefix : "");
  q->o.state_dir = q->state_dir;
  q->o.url_prefix = q->url_prefix;
  opts_defaults(&q->o);
  store_fault *fault = NULL;
  int rc = fault_hooks(q, &fault, e);
  if (rc) {
    free(q);
    return rc;
  }
  q->store_ok = 1;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->cv, NULL);
  q->step_h.bounds = step_bounds;
  q->job_h.bounds = q->wait_h.bounds = job_bounds;
  q->t0 = qclock_mono();
  rc = open_backends(q, fault, e);
  if (!rc)
    rc = qrecovery_run(q, e);
  if (rc) {
    queue_free(q);
    return rc;
  }
  *out = q;
  return ERR_OK;
}

void queue_free(queue *q) {
  if (!q)
    return;
  if (q->started && queue_stop(q, 60000) != 0)
    return; /* workers still hold it: leaking beats a use after free */
  for (int i = 0; i < q->njobs; i++)
    qjob_free(q->jobs[i]);
  free(q->jobs);
  free(q->running);
  for (int i = 0; i < q->nmodels; i++)
    qmodel_unref(q->models[i]);
  free(q->models);
  json_decref(q->registered);
  if (q->st)
    q->st->ops->free(q->st);
  if (q->be)
    q->be->ops->free(q->be);
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  free(q);
}

/* ---- requests ---- */

static int count_active(queue *q, const char *owner, double *cost) {
  int n = 0;
  *cost = 0;
  for (int i = 0; i < q->njobs; i++) {
    const qjob *j = q->jobs[i];
    if (!qstate_final(j->state) && strcmp(j->spec.owner, owner) == 0) {
      n++;
      *cost += j->spec.cost;
    }
  }
  return n;
}

/* The owner's unfinished jobs and their cost (lock held). Daemons sharing a backend count the
 * whole group's there (queued or claimed), plus their own pending ones: their own copies of
 * jobs others ran may be out of date, and jobs others accepted may be unknown here. */
static int owner_load(queue *q, const char *owner, double *cost) {
  int jobs = 0;
  err e = {0};
  if (!owner[0] || !q->shared || !q->be->ops->owner_load ||
      q->be->ops->owner_load(q->be, owner, &jobs, cost, &e) != ERR_OK) {
    if (e.code)
      qlog(q, QUEUE_LOG_WARN, NULL, "counting the jobs of '%s' in the group: %s", owner, e.msg);
    return count_active(q, owner, cost);
  }
  for (int i = 0; i < q->njobs; i++)
    if (q->jobs[i]->pending && strcmp(q->jobs[i]->spec.owner, owner) == 0) {
      jobs++;
      *cost += q->jobs[i]->spec.cost;
    }
  return jobs;
}

/* The job an earlier submission with spec's idempotency key made (lock held), or NULL. A
 * linear scan: retained jobs are bounded by queue_max and result_ttl. */
static qjob *find_by_key(queue *q, const queue_spec *spec) {
  for (int i = q->njobs - 1; i >= 0; i--) {
    qjob *j = q->jobs[i];
    if (j->spec.idem_key[0] && strcmp(j->spec.idem_key, spec->idem_key) == 0 &&
        strcmp(j->spec.owner, spec->owner) == 0)
      return j;
  }
  return NULL;
}

/* A submission repeated with its idempotency key (lock held, released): the first job. */
static int replay(queue *q, qjob *first, queue_spec *spec, queue_job_view *out, err *e) {
  char id[QUEUE_ID_SIZE];
  snprintf(id, sizeof id, "%s", first->id);
  if (first->spec.idem_hash != spec->idem_hash) {
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_KEY_REUSED,
                   "Idempotency-Key '%s' was used with a different request (job %s)",
                   spec->idem_key, id);
  }
  if (first->pending) {
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_KEY_BUSY,
                   "the first request with Idempotency-Key '%s' is still being accepted; retry",
                   spec->idem_key);
  }
  if (out) {
    qjob_view(q, first, out);
    out->replayed = 1;
  }
  pthread_mutex_unlock(&q->mu);
  queue_spec_clear(spec);
  memset(spec, 0, sizeof *spec);
  return ERR_OK;
}

/* Idempotent replays (lock held): ERR_OK with *handled set when spec repeats an earlier
 * submission's key (the lock is then released, as replay does), else nothing happens. */
static int replay_if_repeated(queue *q, queue_spec *spec, queue_job_view *out, int *handled,
                              err *e) {
  qjob *first = spec->idem_key[0] ? find_by_key(q, spec) : NULL;
  *handled = first != NULL;
  return first ? replay(q, first, spec, out, e) : ERR_OK;
}

/* The admission limits (lock held): queue length, jobs and compute per owner. */
static int check_limits(queue *q, const queue_spec *spec, err *e) {
  if (q->stopping)
    return err_set(e, QUEUE_STOPPING, "the server is shutting down");
  if (qjob_nqueued(q) + q->npending >= q->o.queue_max) {
    q->rejected_full++;
    return err_set(e, QUEUE_FULL, "the queue is full (%d jobs waiting)", q->o.queue_max);
  }
  /* without API keys there is one anonymous owner: queue_max is the only bound then */
  double held = 0;
  const int active = owner_load(q, spec->owner, &held);
  if (spec->owner[0] && active >= q->o.max_jobs_per_key) {
    q->rejected_limit++;
    return err_set(e, QUEUE_LIMIT, "at most %d unfinished jobs per API key", q->o.max_jobs_per_key);
  }
  if (q->o.max_owner_cost > 0 && held + spec->cost > q->o.max_owner_cost) {
    q->rejected_limit++;
    return err_set(e, QUEUE_LIMIT,
                   "this job's compute (%.0f megapixel-evaluations) with your unfinished jobs' "
                   "(%.0f) exceeds the %.0f a client may hold (max_key_cost)",
                   spec->cost, held, q->o.max_owner_cost);
  }
  return ERR_OK;
}

/* Frees a job that was never accepted: its spec's inputs are still the caller's. */
static void discard_unaccepted(queue *q, qjob *j) {
  j->spec.options = j->spec.edit_args = NULL;
  j->spec.input_image = j->spec.mask = NULL;
  j->spec.decoded = NULL;
  qjob_discard(q, j);
}

/* Makes j a pending job of spec with its first record in *rec (lock held): in the index but
 * invisible until the record is durable. On failure j is freed. */
static int add_pending(queue *q, qjob *j, const queue_spec *spec, char **rec, size_t *len, err *e) {
  qjob_make_id(q, j->id);
  j->spec = *spec;
  j->state = QUEUE_QUEUED;
  j->pending = 1;
  q->npending++;
  j->created = qclock_real();
  j->t_mono_created = qclock_mono();
  j->next_seq = 1;
  qjob_emit(q, j, "queued", json_pack("{s:i}", "position", qjob_nqueued(q) + 1), 1);
  err re = {0};
  *rec = qjob_record(q, j, len, &re);
  int rc = ERR_OK;
  if (!*rec && re.code == QUEUE_UNAVAILABLE)
    rc = err_set(e, QUEUE_UNAVAILABLE, "%s", re.msg);
  else if (*rec && *len > q->o.max_job_bytes)
    rc = err_set(e, QUEUE_TOO_LARGE,
                 "the job with its inputs takes %zu bytes; at most %zu are accepted "
                 "(max_job_bytes)",
                 *len, q->o.max_job_bytes);
  else if (!*rec || qjob_insert(q, j) != ERR_OK)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc) {
    q->npending--;
    free(*rec);
    *rec = NULL;
    discard_unaccepted(q, j);
  }
  return rc;
}

/* A pending job that will not be accepted leaves the index and is freed (lock held). */
static void drop_pending(queue *q, qjob *j) {
  int pos;
  q->npending--;
  if (qjob_index(q, j->id, &pos))
    qjob_remove_at(q, pos);
  discard_unaccepted(q, j);
}

/* The pending job's record written (lock not held on entry, held on return): durable before
 * the 202, so a crash after this point cannot lose the job. On failure j is gone. */
static int write_pending(queue *q, qjob *j, char *rec, size_t len, err *e) {
  int rc = q->st->ops->put_job(q->st, j->id, rec, len, e);
  free(rec);
  pthread_mutex_lock(&q->mu);
  if (rc != ERR_NOMEM && rc != ERR_INVALID)
    qstore_note(q, rc, e ? e->msg : "");
  if (rc)
    drop_pending(q, j);
  else
    q->npending--;
  return rc;
}

/* On a shared store (lock not held): binds spec's idempotency key to the pending j before its
 * record is written, so a client retrying on another daemon gets one job, not two. When an
 * earlier job holds the key, j is dropped (rec freed) and *handled set: the answer is that
 * job's replay, or busy while its record is still being written elsewhere. */
static int bind_shared_key(queue *q, qjob *j, char *rec, queue_spec *spec, queue_job_view *out,
                           int *handled, err *e) {
  *handled = 0;
  if (!q->st->ops->bind_key || !spec->idem_key[0])
    return ERR_OK;
  char other[QUEUE_ID_SIZE] = "";
  const int rc =
      q->st->ops->bind_key(q->st, spec->owner, spec->idem_key, j->id, q->o.result_ttl, other, e);
  if (rc == 1)
    return ERR_OK;
  free(rec);
  pthread_mutex_lock(&q->mu);
  drop_pending(q, j);
  pthread_mutex_unlock(&q->mu);
  *handled = 1;
  if (rc < 0)
    return rc;
  qshared_refresh(q, other);
  pthread_mutex_lock(&q->mu);
  qjob *first = qjob_find(q, other, NULL);
  if (first)
    return replay(q, first, spec, out, e); /* unlocks */
  pthread_mutex_unlock(&q->mu);
  return err_set(e, QUEUE_KEY_BUSY,
                 "the first request with Idempotency-Key '%s' is still being accepted; retry",
                 spec->idem_key);
}

int queue_submit(queue *q, queue_spec *spec, queue_job_view *out, err *e) {
  int handled = 0;
  pthread_mutex_lock(&q->mu);
  /* before any limit: a retry of an accepted job is never refused for load */
  int rc = replay_if_repeated(q, spec, out, &handled, e);
  if (handled)
    return rc;
  pthread_mutex_unlock(&q->mu);
  qjob *j = mem_calloc(1, sizeof *j);
  if (!j)
    return err_set(e, ERR_NOMEM, "out of memory");
  pthread_mutex_lock(&q->mu);
  rc = replay_if_repeated(q, spec, out, &handled, e); /* raced in meanwhile */
  if (handled) {
    free(j);
    return rc;
  }
  size_t len = 0;
  char *rec = NULL;
  if ((rc = check_limits(q, spec, e)))
    free(j);
  else
    rc = add_pending(q, j, spec, &rec, &len, e);
  pthread_mutex_unlock(&q->mu);
  if (rc)
    return rc;
  rc = bind_shared_key(q, j, rec, spec, out, &handled, e);
  if (handled)
    return rc;
  char id[QUEUE_ID_SIZE];
  snprintf(id, sizeof id, "%s", j->id);
  if ((rc = write_pending(q, j, rec, len, e))) {
    pthread_mutex_unlock(&q->mu);
    if (spec->idem_key[0] && q->st->ops->unbind_key)
      q->st->ops->unbind_key(q->st, spec->owner, spec->idem_key, id);
    return rc;
  }
  if (q->fault_kill_after_record) /* tests only: the process dies before the 202 */
    raise(SIGKILL);
  j->pending = 0;
  qjob_enqueue(q, j); /* on disk, so accepted: a refused push is retried */
  err oe = {0};
  if (spec->owner[0] && q->shared && q->be->ops->owner_add &&
      q->be->ops->owner_add(q->be, spec->owner, j->id, spec->cost, &oe) != ERR_OK)
    qlog(q, QUEUE_LOG_WARN, j->id, "counting it against its API key: %s", oe.msg);
  q->submitted++;
  memset(spec, 0, sizeof *spec);
  if (out)
    qjob_view(q, j, out);
  pthread_mutex_unlock(&q->mu);
  qloop_wake(q);
  return ERR_OK;
}

int queue_get(queue *q, const char *id, const char *owner, queue_job_view *out, err *e) {
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  qjob *j = qjob_find(q, id, owner);
  if (j)
    qjob_view(q, j, out);
  pthread_mutex_unlock(&q->mu);
  return j ? ERR_OK : err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
}

int queue_list(queue *q, const char *owner, const char *before, int state, int limit,
               queue_job_view *out, int *n, int *more) {
  *n = 0;
  *more = 0;
  qshared_list_sync(q, owner, before, state, limit);
  pthread_mutex_lock(&q->mu);
  int start = q->njobs - 1;
  if (before) {
    int pos;
    qjob_index(q, before, &pos);
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
    qjob_view(q, j, &out[(*n)++]);
  }
  pthread_mutex_unlock(&q->mu);
  return ERR_OK;
}

int queue_cancel(queue *q, const char *id, const char *owner, queue_job_view *out, err *e) {
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  qjob *j = qjob_find(q, id, owner);
  if (!j) {
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  }
  if (qstate_final(j->state) || j->final) {
    if (out)
      qjob_view(q, j, out);
    const char *st = j->final ? "finishing" : queue_state_name(j->state);
    pthread_mutex_unlock(&q->mu);
    return err_set(e, QUEUE_CONFLICT, "job '%s' is already %s", id, st);
  }
  if (qshared_cancel_elsewhere(q, j)) { /* the daemon running it stops it at its next tick */
    if (out)
      qjob_view(q, j, out);
    pthread_mutex_unlock(&q->mu);
    return ERR_OK;
  }
  const int was_running = j->state == QUEUE_RUNNING;
  if (!was_running && !q->shared) /* shared: qshared_cancel_elsewhere took it out */
    qjob_unqueue(q, j);
  size_t len;
  char *rec = qjob_finish(q, j, QUEUE_CANCELLED,
                          was_running ? "cancelled while running" : "cancelled while queued", &len);
  if (was_running && j->batch) {
    int live = 0;
    for (int i = 0; i < j->batch->njobs; i++)
      live += qjob_live(j->batch->jobs[i]);
    if (!live) /* the batch serves nobody now: stop it at the next step boundary */
      atomic_store(&j->batch->cancel, 1);
  }
  pthread_mutex_unlock(&q->mu);
  qlog(q, QUEUE_LOG_INFO, id, "cancelled (%s)", was_running ? "running" : "queued");
  qjob_settle_write(q, j, rec, len);
  if (out) { /* as stored: cancelled, or as it was with store_error when the write failed */
    pthread_mutex_lock(&q->mu);
    qjob *now = qjob_find(q, id, owner);
    if (now)
      qjob_view(q, now, out);
    pthread_mutex_unlock(&q->mu);
    if (!now)
      return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  }
  return ERR_OK;
}

int queue_cancel_running(queue *q, const char *owner, const char *client) {
  char ids[64][QUEUE_ID_SIZE];
  int n = 0;
  pthread_mutex_lock(&q->mu);
  for (int i = 0; i < q->nrunning && n < 64; i++)
    for (int k = 0; k < q->running[i]->njobs && n < 64; k++) {
      qjob *j = q->running[i]->jobs[k];
      if (qjob_live(j) && (!owner || strcmp(owner, j->spec.owner) == 0) &&
          (!client || strcmp(client, j->spec.client) == 0))
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
  int found = 0, n = 0;
  pthread_mutex_lock(&q->mu);
  qjob **queued = qjob_queued(q, &n);
  *queued_total = 0;
  for (int i = 0; i < n; i++)
    *queued_total += !owner || strcmp(owner, queued[i]->spec.owner) == 0;
  for (int i = 0; i < q->nrunning && !found; i++)
    for (int k = 0; k < q->running[i]->njobs && !found; k++) {
      qjob *j = q->running[i]->jobs[k];
      if (j->state == QUEUE_RUNNING && (!owner || strcmp(owner, j->spec.owner) == 0)) {
        qjob_view(q, j, out);
        found = 1;
      }
    }
  for (int i = 0; i < n && !found; i++)
    if (!owner || strcmp(owner, queued[i]->spec.owner) == 0) {
      qjob_view(q, queued[i], out);
      found = 1;
    }
  pthread_mutex_unlock(&q->mu);
  free(queued);
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

/* Whether an event type ends a job's log. */
static int final_event(const char *type) {
  return strcmp(type, "done") == 0 || strcmp(type, "failed") == 0 || strcmp(type, "cancelled") == 0;
}

/* Lock held: waits for news of job id until *dl; 1 once *dl has passed. A process sharing its
 * queue is not woken by what other daemons do, so it looks again every 200 ms. */
static int shared_wait(queue *q, const char *id, const struct timespec *dl) {
  if (!q->shared)
    return pthread_cond_timedwait(&q->cv, &q->mu, dl) == ETIMEDOUT;
  struct timespec soon;
  deadline_in(&soon, 200);
  const int last =
      soon.tv_sec > dl->tv_sec || (soon.tv_sec == dl->tv_sec && soon.tv_nsec >= dl->tv_nsec);
  pthread_cond_timedwait(&q->cv, &q->mu, last ? dl : &soon);
  pthread_mutex_unlock(&q->mu);
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  return last;
}

/* Events of j after `after` from its log, in seq order (lock held). */
static int collect(queue *q, const qjob *j, uint64_t after, queue_event **evs, int *n, err *e) {
  qbackend_event *got = NULL;
  int k = 0;
  int rc = q->be->ops->read(q->be, j->id, after, 0, &got, &k, e);
  queue_event *out = rc || !k ? NULL : mem_calloc((size_t)k, sizeof *out);
  if (!rc && k && !out)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; out && i < k; i++) {
    out[i].seq = got[i].seq;
    out[i].type = qevent_type(got[i].type);
    out[i].data = got[i].data; /* moved */
    got[i].data = NULL;
  }
  qbackend_events_free(got, k);
  *evs = out;
  *n = out ? k : 0;
  return rc;
}

int queue_events(queue *q, const char *id, const char *owner, uint64_t after, int timeout_ms,
                 queue_event **evs, int *n, int *done, err *e) {
  *evs = NULL;
  *n = 0;
  *done = 0;
  struct timespec dl;
  deadline_in(&dl, timeout_ms);
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    qjob *j = qjob_find(q, id, owner);
    if (!j) {
      pthread_mutex_unlock(&q->mu);
      return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
    /* a job another daemon runs adds to its log without telling this process: read the log */
    const int elsewhere = q->shared && !j->batch;
    const int rc = elsewhere || j->next_seq - 1 > after ? collect(q, j, after, evs, n, e) : ERR_OK;
    if (rc) {
      pthread_mutex_unlock(&q->mu);
      return rc;
    }
    /* done once the terminal event is among those delivered */
    if (elsewhere
            ? *n > 0 && final_event((*evs)[*n - 1].type)
            : qstate_final(j->state) && (*n > 0 ? (*evs)[*n - 1].seq : after) >= j->next_seq - 1)
      *done = 1;
    if (q->stopping && !*n)
      *done = 1;
    if (*n || *done)
      break;
    if (shared_wait(q, id, &dl))
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
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    qjob *j = qjob_find(q, id, NULL);
    if (!j) {
      pthread_mutex_unlock(&q->mu);
      return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
    if (qstate_final(j->state) || q->stopping || shared_wait(q, id, &dl)) {
      j = qjob_find(q, id, NULL);
      if (j)
        qjob_view(q, j, out);
      pthread_mutex_unlock(&q->mu);
      return j ? ERR_OK : err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
    }
  }
}

int queue_image(queue *q, const char *id, const char *owner, int n, uint8_t **png, size_t *len,
                err *e) {
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  qjob *j = qjob_find(q, id, owner);
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

/* A stored file of a succeeded job that has one (has(spec)); what names it in messages. */
static int job_file(queue *q, const char *id, const char *owner, int (*has)(const queue_spec *),
                    const char *file, const char *none, const char *what, uint8_t **data,
                    size_t *len, err *e) {
  qshared_refresh(q, id);
  pthread_mutex_lock(&q->mu);
  qjob *j = qjob_find(q, id, owner);
  const int there = j && has(&j->spec);
  queue_state st = j ? j->state : QUEUE_FAILED;
  pthread_mutex_unlock(&q->mu);
  if (!j)
    return err_set(e, QUEUE_NOT_FOUND, "no job '%s'", id);
  if (!there)
    return err_set(e, QUEUE_NOT_FOUND, "job '%s' is not %s", id, none);
  if (st != QUEUE_SUCCEEDED)
    return err_set(e, QUEUE_NOT_READY, "the %s of job '%s' is not ready (job %s)", what, id,
                   queue_state_name(st));
  return q->st->ops->get_file(q->st, id, file, data, len, e);
}

int queue_noise(queue *q, const char *id, const char *owner, uint8_t **npy, size_t *len, err *e) {
  return job_file(q, id, owner, qspec_has_noise, QUEUE_NOISE_FILE,
                  "an inversion of an input image or an audit: it has no noise", "noise", npy, len,
                  e);
}

static int is_audit(const queue_spec *s) {
  return s->edit == QUEUE_EDIT_AUDIT;
}

int queue_report(queue *q, const char *id, const char *owner, uint8_t **json, size_t *len, err *e) {
  return job_file(q, id, owner, is_audit, QUEUE_REPORT_FILE, "an audit: it has no report", "report",
                  json, len, e);
}

void queue_get_stats(queue *q, queue_stats *s) {
  memset(s, 0, sizeof *s);
  pthread_mutex_lock(&q->mu);
  s->queued = qjob_nqueued(q);
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
  const double t = qclock_mono();
  for (int i = 0; i < q->nrunning; i++)
    s->busy_seconds += t - q->running[i]->t_start;
  s->uptime = t - q->t0;
  s->models = q->nmodels;
  s->stopping = q->stopping;
  s->step_seconds = q->step_h;
  s->job_seconds = q->job_h;
  s->wait_seconds = q->wait_h;
  s->pace_overruns = q->pace_overruns;
  s->retained_bytes = q->retained_bytes;
  s->expired_early = q->expired_early;
  pthread_mutex_unlock(&q->mu);
}

int queue_ready(queue *q, char *why, size_t whylen) {
  pthread_mutex_lock(&q->mu);
  int ok = 0;
  if (q->stopping)
    snprintf(why, whylen, "shutting down");
  else if (!q->nmodels)
    snprintf(why, whylen, "no model loaded");
  else if (qjob_nqueued(q) >= q->o.queue_max)
    snprintf(why, whylen, "queue full");
  else if (!q->started)
    snprintf(why, whylen, "not started");
  else if (!q->store_ok)
    snprintf(why, whylen, "storage failing: %s", q->store_why);
  else
    ok = 1;
  pthread_mutex_unlock(&q->mu);
  return ok;
}
