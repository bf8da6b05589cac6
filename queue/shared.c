/* What a daemon does when its store and backend are shared with other daemons (Redis): any of
 * them accepts a job, any idle one claims it, and each shows the jobs the others accepted or
 * ran. Jobs known to this process are copies: one it is not running is read again from the
 * store when a client asks about it, and queued jobs it has never seen are read when they reach
 * the head of the shared queue. Only the claim holder moves a job to a final state, so however
 * many daemons look at a job, its final event is written once. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

/* Whether j (lock held) may be out of date: another process may have moved it since. */
static int stale(const qjob *j) {
  return !j || (!j->pending && !j->batch && !j->final && !qstate_final(j->state));
}

/* Lock held: the progress of j, running on another daemon, from the newest progress event in
 * its log (the record says only that it runs). */
static void take_progress(queue *q, qjob *j) {
  qbackend_event *evs = NULL;
  int n = 0;
  err e = {0};
  if (q->be->ops->read(q->be, j->id, 0, 0, &evs, &n, &e) != ERR_OK)
    return;
  for (int i = n - 1; i >= 0; i--) {
    if (strcmp(evs[i].type, "progress") != 0)
      continue;
    json_t *d = json_loads(evs[i].data, 0, NULL);
    json_int_t step = 0, total = 0, nfe = 0;
    if (d && json_unpack(d, "{s:I, s:I, s:I}", "step", &step, "total", &total, "nfe", &nfe) == 0 &&
        step >= 0 && step <= 1000000 && total >= 0 && total <= 1000000 && nfe >= 0 &&
        nfe <= 10000000) {
      j->step = (int)step;
      j->total = (int)total;
      j->nfe = (int)nfe;
    }
    json_decref(d);
    break;
  }
  qbackend_events_free(evs, n);
}

/* The fields another process may have changed, from the fresh copy (lock held). */
static void take_fields(queue *q, qjob *j, const qjob *fresh) {
  j->state = fresh->state;
  j->started = fresh->started;
  j->finished = fresh->finished;
  j->images = fresh->images;
  j->files = fresh->files;
  j->total = fresh->total;
  j->attempts = fresh->attempts;
  snprintf(j->error, sizeof j->error, "%s", fresh->error);
  if (fresh->next_seq > j->next_seq)
    j->next_seq = fresh->next_seq;
  if (j->state == QUEUE_RUNNING)
    take_progress(q, j);
  if (qstate_final(j->state)) {
    qspec_release_inputs(&j->spec);
    pthread_cond_broadcast(&q->cv); /* waiters for its end */
  }
}

/* Whether this process's copy of id may be out of date, or it has none (unlocked). */
static int needs_read(queue *q, const char *id) {
  int pos;
  pthread_mutex_lock(&q->mu);
  const int need = stale(qjob_index(q, id, &pos) ? q->jobs[pos] : NULL);
  pthread_mutex_unlock(&q->mu);
  return need;
}

/* id's record as just read from the store (text NULL: none): the job is adopted, or this
 * process's copy takes the fields another may have changed (unlocked). */
static void take_record(queue *q, const char *id, const char *text, size_t len) {
  qjob *fresh = text ? qrecord_parse(q, id, text, len) : NULL;
  if (!fresh)
    return; /* no record (never accepted, expired): nothing to show */
  int pos;
  pthread_mutex_lock(&q->mu);
  qjob *j = qjob_index(q, id, &pos) ? q->jobs[pos] : NULL;
  if (!j) {
    if (qstate_final(fresh->state))
      qspec_release_inputs(&fresh->spec);
    if (fresh->state == QUEUE_RUNNING)
      take_progress(q, fresh);
    if (qjob_insert(q, fresh) == ERR_OK)
      fresh = NULL;
  } else if (stale(j)) {
    take_fields(q, j, fresh);
  }
  pthread_mutex_unlock(&q->mu);
  qjob_free(fresh);
}

void qshared_refresh(queue *q, const char *id) {
  if (!q->shared || !id || strlen(id) >= QUEUE_ID_SIZE || !needs_read(q, id))
    return;
  char *text = NULL;
  size_t len = 0;
  err e = {0};
  if (q->st->ops->get_job(q->st, id, &text, &len, &e) == ERR_OK)
    take_record(q, id, text, len);
  free(text);
}

void qshared_adopt(queue *q) {
  if (!q->shared)
    return;
  qbackend_id ids[32];
  const int n = q->be->ops->peek(q->be, 0, 32, ids);
  for (int i = 0; i < n; i++) {
    int pos;
    pthread_mutex_lock(&q->mu);
    const int known = qjob_index(q, ids[i], &pos);
    pthread_mutex_unlock(&q->mu);
    if (!known)
      qshared_refresh(q, ids[i]);
  }
}

typedef struct id_list {
  char (*ids)[QUEUE_ID_SIZE];
  int n, cap;
} id_list;

static void collect_id(void *user, const char *id) {
  id_list *l = user;
  if (strlen(id) >= QUEUE_ID_SIZE)
    return;
  if (l->n == l->cap) {
    const int cap = l->cap ? 2 * l->cap : 256;
    char(*ids)[QUEUE_ID_SIZE] = realloc(l->ids, (size_t)cap * sizeof *ids);
    if (!ids)
      return;
    l->ids = ids;
    l->cap = cap;
  }
  snprintf(l->ids[l->n++], QUEUE_ID_SIZE, "%s", id);
}

/* Whether id is known here, not pending, and passes a listing's filters (lock held). */
static int listed(queue *q, const char *id, const char *owner, int state) {
  int pos;
  const qjob *j = qjob_index(q, id, &pos) ? q->jobs[pos] : NULL;
  return j && !j->pending && (!owner || strcmp(owner, j->spec.owner) == 0) &&
         (state < 0 || (int)j->state == state);
}

static void take_read(void *user, const char *id, const char *json, size_t len) {
  take_record(user, id, json, len);
}

/* Records read in one round trip while a listing syncs (the store's get_jobs). */
#define LIST_CHUNK 32

void qshared_list_sync(queue *q, const char *owner, const char *before, int state, int limit) {
  if (!q->shared || !q->st->ops->list_ids || !q->st->ops->get_jobs)
    return;
  id_list l = {0};
  err e = {0};
  if (q->st->ops->list_ids(q->st, collect_id, &l, &e) == ERR_OK) {
    int matches = 0, reads = 0, i = l.n - 1;
    while (i >= 0 && matches <= limit && reads < QUEUE_LIST_READS) {
      /* the next ids, newest first: the ones known up to date count now, the others are read
       * in one round trip (a chunk at most) and count once read */
      const char *chunk[LIST_CHUNK];
      int n = 0;
      for (; i >= 0 && n < LIST_CHUNK && reads + n < QUEUE_LIST_READS && matches <= limit; i--) {
        if (before && strcmp(l.ids[i], before) >= 0)
          continue;
        if (needs_read(q, l.ids[i])) {
          chunk[n++] = l.ids[i];
          continue;
        }
        pthread_mutex_lock(&q->mu);
        matches += listed(q, l.ids[i], owner, state);
        pthread_mutex_unlock(&q->mu);
      }
      if (n > 0 && q->st->ops->get_jobs(q->st, n, chunk, take_read, q, &e) != ERR_OK)
        break;
      reads += n;
      pthread_mutex_lock(&q->mu);
      for (int k = 0; k < n; k++)
        matches += listed(q, chunk[k], owner, state);
      pthread_mutex_unlock(&q->mu);
    }
  }
  free(l.ids);
}

/* Lock held: j's event numbers continue after the last its shared log holds (other processes
 * may have appended since this copy was read). */
static void follow_log(queue *q, qjob *j) {
  qbackend_event *evs = NULL;
  int n = 0;
  err e = {0};
  if (q->be->ops->read(q->be, j->id, j->next_seq ? j->next_seq - 1 : 0, 0, &evs, &n, &e) ==
          ERR_OK &&
      n > 0 && evs[n - 1].seq >= j->next_seq)
    j->next_seq = evs[n - 1].seq + 1;
  qbackend_events_free(evs, n);
}

/* Lock held: j, claimed, ends here without running: the decision is kept in the job, the
 * retry tick writes its record and settles it, and the claim completes. */
static void end_unrun(queue *q, qjob *j, queue_state st, const char *why) {
  size_t len = 0;
  free(qjob_finish(q, j, st, why, &len));
  snprintf(j->store_error, sizeof j->store_error, "storing the final state");
  q->unsettled++;
  err e = {0};
  q->be->ops->complete(q->be, j->id, j->lease, &e);
  j->lease = 0;
  qlog(q, st == QUEUE_FAILED ? QUEUE_LOG_ERROR : QUEUE_LOG_INFO, j->id, "%s", why);
}

/* Lock held: whether j, just claimed, has already ended: its run finished and its record was
 * written, but Redis went away before the claim was completed, so the claim ran out and put it
 * back in the queue. Running it again would end it twice. */
static int ended_already(queue *q, qjob *j) {
  if (j->final || qstate_final(j->state))
    return 1;
  char *text = NULL;
  size_t len = 0;
  err e = {0};
  if (q->st->ops->get_job(q->st, j->id, &text, &len, &e) != ERR_OK)
    return 0;
  qjob *fresh = qrecord_parse(q, j->id, text, len);
  free(text);
  const int ended = fresh && qstate_final(fresh->state);
  if (ended)
    take_fields(q, j, fresh);
  qjob_free(fresh);
  return ended;
}

int qshared_claimed(queue *q, qjob *j) {
  if (!q->shared)
    return 1;
  if (ended_already(q, j)) {
    err e = {0};
    q->be->ops->complete(q->be, j->id, j->lease, &e);
    j->lease = 0;
    qlog(q, QUEUE_LOG_WARN, j->id,
         "back in the queue after it had ended (Redis was away); left so");
    return 0;
  }
  follow_log(q, j);
  if (q->be->ops->cancel_requested(q->be, j->id)) { /* asked while its claim changed hands */
    end_unrun(q, j, QUEUE_CANCELLED, "cancelled while queued");
    return 0;
  }
  if (j->state != QUEUE_RUNNING)
    return 1;
  /* its last run, here in an earlier life or on another daemon, died with its process: the
   * claim ran out and put it back */
  j->state = QUEUE_QUEUED;
  j->started = 0;
  j->images = 0;
  if (j->attempts < q->o.max_attempts) {
    qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", "restarted"), 1);
    return 1;
  }
  char why[128];
  snprintf(why, sizeof why, "crashed the worker %d times", j->attempts);
  end_unrun(q, j, QUEUE_FAILED, why);
  return 0;
}

int qshared_cancel_elsewhere(queue *q, qjob *j) {
  if (!q->shared || j->batch)
    return 0;
  if (q->be->ops->remove(q->be, j->id)) {
    j->state = QUEUE_QUEUED; /* taken out of the shared queue: cancelled here as queued */
    return 0;
  }
  /* claimed: its holder stops it; neither queued nor claimed: it is finishing (its final state
   * is the holder's to write), so nothing is to be done here */
  if (q->be->ops->cancel_request(q->be, j->id))
    qlog(q, QUEUE_LOG_INFO, j->id, "cancel handed to the daemon running it");
  return 1;
}

int qshared_cancels_asked(queue *q, qbackend_id *ids, int max) {
  int n = 0;
  if (!q->shared)
    return 0;
  for (int i = 0; i < q->nrunning; i++)
    for (int k = 0; k < q->running[i]->njobs && n < max; k++) {
      const qjob *j = q->running[i]->jobs[k];
      if (qjob_live(j) && q->be->ops->cancel_requested(q->be, j->id))
        snprintf(ids[n++], sizeof *ids, "%s", j->id);
    }
  return n;
}
