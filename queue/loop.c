/* The scheduler thread: a libuv loop that forms batches from the queued jobs, claims them from
 * the backend, dispatches them onto the worker pool, finishes them (their claims completed or
 * released), renews the claims of running jobs, and expires old results. */
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

static void dispatch(queue *q);
static void expire(queue *q);

/* The run of j is over (lock held): a job put back by a shutdown goes back to its place in the
 * queue, any other leaves it for good. */
static void end_claim(queue *q, qjob *j) {
  err e = {0};
  const int rc = j->state == QUEUE_QUEUED ? q->be->ops->release(q->be, j->id, j->lease, &e)
                                          : q->be->ops->complete(q->be, j->id, j->lease, &e);
  if (rc)
    qlog(q, QUEUE_LOG_WARN, j->id, "ending its claim: %s", e.msg);
  j->lease = 0;
}

static void after_work_cb(uv_work_t *w, int status) {
  (void)status;
  qbatch *b = w->data;
  queue *q = b->q;
  pthread_mutex_lock(&q->mu);
  q->busy--;
  q->busy_seconds += qclock_mono() - b->t_start;
  for (int i = 0; i < b->njobs; i++) {
    b->jobs[i]->batch = NULL;
    end_claim(q, b->jobs[i]);
    if (qstate_final(b->jobs[i]->state) && !b->jobs[i]->final) /* settled, on disk */
      qspec_release_inputs(&b->jobs[i]->spec);
  }
  for (int i = 0; i < q->nrunning; i++)
    if (q->running[i] == b) {
      q->running[i] = q->running[--q->nrunning];
      break;
    }
  qmodel_unref(b->qm);
  pthread_cond_broadcast(&q->cv);
  pthread_mutex_unlock(&q->mu);
  sampler_free(b->s);
  free(b->jobs);
  free(b);
  uv_async_send(&q->wake);
  if (q->o.retained_budget) /* what finished may be past the budget now */
    expire(q);
}

/* Fails a queued job whose model is gone (lock held, released meanwhile). */
static void fail_unserved(queue *q, qjob *head) {
  qjob_unqueue(q, head);
  size_t len;
  char *rec = qjob_finish(q, head, QUEUE_FAILED, "the model is no longer configured", &len);
  pthread_mutex_unlock(&q->mu);
  qjob_settle_write(q, head, rec, len);
  pthread_mutex_lock(&q->mu);
}

/* The jobs that run with queued[0] (lock held): the queued ones it can share its forward with,
 * in queue order, up to batch_max_images, each claimed from the backend (a job another holder
 * took meanwhile is left out). Returns how many are in jobs. */
static int claim_batch(queue *q, qjob **queued, int n, qjob **jobs, int *nimg) {
  int k = 0;
  *nimg = 0;
  for (int i = 0; i < n && k < 1024; i++) {
    qjob *j = queued[i];
    if (i > 0 && (q->o.batch_max_images <= 1 || *nimg + j->spec.batch > q->o.batch_max_images ||
                  !queue_spec_compatible(&queued[0]->spec, &j->spec)))
      continue;
    err e = {0};
    if (q->be->ops->claim(q->be, j->id, q->o.lease_ms, &j->lease, &e) != ERR_OK) {
      if (i == 0)
        return 0;
      continue;
    }
    if (!qshared_claimed(q, j)) { /* crashed too often: failed instead */
      if (i == 0)
        return 0;
      continue;
    }
    jobs[k++] = j;
    *nimg += j->spec.batch;
  }
  return k;
}

/* Marks the claimed jobs of b running (lock held). */
static void start_jobs(queue *q, qbatch *b) {
  const double t = qclock_real(), tm = qclock_mono();
  for (int i = 0; i < b->njobs; i++) {
    qjob *j = b->jobs[i];
    j->state = QUEUE_RUNNING;
    j->batch = b;
    j->started = t;
    j->attempts++;
    j->t_mono_started = tm;
    j->last_progress = 0;
    qhist_observe(&q->wait_h, tm - j->t_mono_created);
    qjob_emit(q, j, "started", json_pack("{s:i}", "batched_with", b->njobs - 1), 1);
  }
  q->batches++;
  if (b->njobs > 1)
    q->batched_jobs += (uint64_t)b->njobs;
  b->t_start = tm;
}

/* The worker pool refused b (lock held, released meanwhile): its jobs, marked running, would
 * stay so for good. They fail with the reason (a persistent refusal fails each job once instead
 * of spinning on it), and the batch ends as a finished one does. */
static void refuse_batch(queue *q, qbatch *b, int uvrc) {
  char why[256];
  snprintf(why, sizeof why, "the worker pool refused the job (%s); submit it again",
           uv_strerror(uvrc));
  qlog(q, QUEUE_LOG_ERROR, NULL, "uv_queue_work failed: %s", uv_strerror(uvrc));
  char *recs[b->njobs];
  size_t lens[b->njobs];
  for (int i = 0; i < b->njobs; i++)
    recs[i] = qjob_finish(q, b->jobs[i], QUEUE_FAILED, why, &lens[i]);
  pthread_mutex_unlock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    qjob_settle_write(q, b->jobs[i], recs[i], lens[i]);
  after_work_cb(&b->work, uvrc); /* busy, running, claims and the batch itself */
  pthread_mutex_lock(&q->mu);
}

/* Forms one batch from the queue's head and hands it to the pool (lock held); 0 when there
 * was nothing to start. */
static int dispatch_one(queue *q) {
  int n = 0;
  qjob **queued = qjob_queued(q, &n);
  if (q->shared) { /* the shared queue holds other daemons' models' jobs too: theirs to run */
    int k = 0;
    for (int i = 0; i < n; i++) {
      const qmodel *m = qmodel_find(q, queued[i]->spec.model);
      if (m && m->m)
        queued[k++] = queued[i];
    }
    n = k;
  }
  if (!n) {
    free(queued);
    return 0;
  }
  qmodel *qm = qmodel_find(q, queued[0]->spec.model);
  if (!qm || !qm->m) {
    fail_unserved(q, queued[0]);
    free(queued);
    return 1;
  }
  qbatch *b = mem_calloc(1, sizeof *b);
  qjob **jobs = mem_malloc(sizeof *jobs * (size_t)(n < 1024 ? n : 1024));
  qbatch **run = mem_realloc(q->running, sizeof *run * (size_t)(q->nrunning + 1));
  if (run)
    q->running = run;
  if (!b || !jobs || !run || !(b->njobs = claim_batch(q, queued, n, jobs, &b->nimg))) {
    if (!b || !jobs || !run)
      qlog(q, QUEUE_LOG_ERROR, NULL, "out of memory scheduling a job; retrying");
    free(b);
    free(jobs);
    free(queued);
    return 0;
  }
  free(queued);
  b->q = q;
  b->qm = qm;
  qm->refs++;
  b->jobs = jobs;
  start_jobs(q, b);
  q->running[q->nrunning++] = b;
  q->busy++;
  b->work.data = b;
  const int refused = q->fault_pool_refuses > 0 && --q->fault_pool_refuses == 0;
  const int uvrc =
      refused ? UV_EINVAL : uv_queue_work(&q->loop, &b->work, qworker_run, after_work_cb);
  if (uvrc != 0)
    refuse_batch(q, b, uvrc);
  return 1;
}

/* Loop thread, lock held. */
static void dispatch(queue *q) {
  while (!q->stopping && q->busy < q->o.workers && dispatch_one(q))
    ;
}

/* What a finished job keeps in memory, estimated once (lock held): the job itself and its
 * record without inputs (the spec and the lifecycle events, which the job and the event log
 * hold as JSON objects and text), counted three times for jansson's and the allocator's
 * overhead: 1000 one-image jobs grew the daemon's RSS by 5.3 MB where twice the record
 * estimated 4.3 MB. */
static size_t retained_bytes(queue *q, qjob *j) {
  if (!j->retained) {
    size_t len = 0;
    free(qjob_record(q, j, &len, NULL));
    j->retained = sizeof *j + 3 * len;
  }
  return j->retained;
}

/* The index of the finished job to expire (lock held), or -1: one past result_ttl, else, while
 * the finished jobs' estimated memory is over retained_budget, the one that finished first. */
static int expiring(queue *q, double cutoff) {
  uint64_t total = 0;
  int oldest = -1;
  for (int i = 0; i < q->njobs; i++) {
    qjob *j = q->jobs[i];
    if (!qstate_final(j->state) || j->batch) /* a batch's jobs keep inputs until it is over */
      continue;
    if (j->finished > 0 && j->finished < cutoff)
      return i;
    if (oldest < 0 || j->finished < q->jobs[oldest]->finished)
      oldest = i;
    total += retained_bytes(q, j);
  }
  q->retained_bytes = total;
  if (!q->o.retained_budget || total <= q->o.retained_budget || oldest < 0)
    return -1;
  q->expired_early++;
  q->retained_bytes -= q->jobs[oldest]->retained;
  return oldest;
}

/* Removes finished jobs past result_ttl, then the oldest ones while over retained_budget,
 * records and files included. Loop thread. */
static void expire(queue *q) {
  const double cutoff = qclock_real() - q->o.result_ttl;
  for (;;) {
    char id[QUEUE_ID_SIZE];
    int files = 0, found = 0, noise = 0;
    pthread_mutex_lock(&q->mu);
    const int i = expiring(q, cutoff);
    if (i >= 0) {
      qjob *j = q->jobs[i];
      snprintf(id, sizeof id, "%s", j->id);
      files = j->files;
      noise = qspec_has_noise(&j->spec);
      qjob_remove_at(q, i);
      qjob_discard(q, j);
      found = 1;
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

/* A job whose decided final state the store refused (lock held), or NULL. */
static qjob *next_unsettled(queue *q) {
  for (int i = 0; i < q->njobs; i++) {
    qjob *j = q->jobs[i];
    if (j->final && !j->final->writing && j->store_error[0])
      return j;
  }
  return NULL;
}

/* Loop thread, lock held: the heartbeat of this process's claims, so that they run out only when
 * it is gone. A claim found lost is logged: the job may run elsewhere too (at least once). */
static void renew_claims(queue *q) {
  for (int i = 0; i < q->nrunning; i++)
    for (int k = 0; k < q->running[i]->njobs; k++) {
      qjob *j = q->running[i]->jobs[k];
      err e = {0};
      if (j->lease && q->be->ops->renew(q->be, j->id, j->lease, q->o.lease_ms, &e) != ERR_OK)
        qlog(q, QUEUE_LOG_WARN, j->id, "renewing its claim: %s", e.msg);
    }
}

/* Loop thread, lock held: claims whose holder stopped renewing them (a process that died) are
 * put back in the queue, where any node may claim them. */
static void reclaim_expired(queue *q) {
  qbackend_id ids[8];
  const int n = q->be->ops->reclaim(q->be, 8, ids);
  for (int i = 0; i < n && i < 8; i++)
    qlog(q, QUEUE_LOG_WARN, ids[i],
         "its claim ran out (the process running it died, or lost Redis); queued again");
  if (n > 8)
    qlog(q, QUEUE_LOG_WARN, NULL, "%d claims ran out; queued again", n);
}

/* Loop thread: probes a failing store (and a healthy one now and then) so that readiness
 * recovers by itself, pushes jobs the backend refused, dispatches again (a dispatch that failed,
 * out of memory or on a claim the backend refused, left its jobs queued), and rewrites final states
 * the store refused, oldest first, until one fails again. */
static void retry_cb(uv_timer_t *t) {
  queue *q = t->data;
  qshared_adopt(q);
  pthread_mutex_lock(&q->mu);
  renew_claims(q);
  qbackend_id cancels[16];
  const int ncancels = qshared_cancels_asked(q, cancels, 16);
  if (q->shared) /* one process's own claims never run out while its loop renews them */
    reclaim_expired(q);
  qjob_push_unpushed(q);
  qjob_publish_unpublished(q);
  dispatch(q);
  const double now = qclock_mono();
  const int probe = !q->store_ok || (q->o.probe_every_ms > 0 &&
                                     (now - q->last_probe) * 1000 >= q->o.probe_every_ms);
  pthread_mutex_unlock(&q->mu);
  for (int i = 0; i < ncancels; i++) { /* asked on another daemon */
    err e = {0};
    queue_cancel(q, cancels[i], NULL, NULL, &e);
  }
  if (probe) {
    err e = {0};
    int rc = q->st->ops->probe(q->st, &e);
    pthread_mutex_lock(&q->mu);
    q->last_probe = now;
    if (rc != ERR_NOMEM)
      qstore_note(q, rc, e.msg);
    pthread_mutex_unlock(&q->mu);
  }
  for (;;) {
    pthread_mutex_lock(&q->mu);
    qjob *j = q->store_ok ? next_unsettled(q) : NULL;
    size_t len = 0;
    char *rec = j ? qjob_finish(q, j, j->final->state, NULL, &len) : NULL;
    pthread_mutex_unlock(&q->mu);
    if (!j || qjob_settle_write(q, j, rec, len) != ERR_OK)
      return; /* the next tick tries again */
  }
}

/* Wakes the loop thread from any thread. libuv aborts the process when the
 * wake-up handle is already closed, so the send happens under the lock that
 * wake_cb takes to mark it closing: a request racing a shutdown is safe. */
void qloop_wake(queue *q) {
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
    q->closing = 1; /* under the lock: qloop_wake() sends nothing from now on */
    pthread_mutex_unlock(&q->mu);
    uv_close((uv_handle_t *)&q->wake, on_close);
    uv_close((uv_handle_t *)&q->expiry, on_close);
    uv_close((uv_handle_t *)&q->retry, on_close);
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
  q->last_probe = qclock_mono(); /* the store was probed when it opened */
  uv_timer_init(&q->loop, &q->retry);
  q->retry.data = q;
  const uint64_t retry = q->o.retry_ms > 0 ? (uint64_t)q->o.retry_ms : 1000;
  uv_timer_start(&q->retry, retry_cb, retry, retry);
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
  qloop_wake(q);
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
