/* Recovery at start: every record in the store becomes a job again; jobs that were running when
 * the process died are queued again (their partial images are discarded). */
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

/* ---- recovery ---- */

/* Strings longer than this (input pictures, noise maps in base64) are what make a record large. */
#define BIG_STRING 4096

/* The record with its big strings emptied, to parse at the speed of memchr: a finished job needs
 * none of them (its views carry no inputs), and parsing a gigabyte of base64 took a restart 23 s.
 * NULL out of memory. */
static char *skeleton(const char *text, size_t len, size_t *out_len) {
  char *out = mem_malloc(len + 1);
  size_t o = 0;
  for (size_t i = 0; out && i < len;) {
    const char *q = memchr(text + i, '"', len - i);
    const size_t open = q ? (size_t)(q - text) : len;
    memcpy(out + o, text + i, open - i);
    o += open - i;
    if (!q)
      break;
    size_t end = open + 1; /* the closing quote: the first one after an even run of '\\' */
    for (;;) {
      const char *c = memchr(text + end, '"', len - end);
      if (!c) {
        end = len;
        break;
      }
      end = (size_t)(c - text);
      size_t bs = 0;
      while (end - bs > open + 1 && text[end - bs - 1] == '\\')
        bs++;
      if (bs % 2 == 0)
        break;
      end++;
    }
    if (end >= len) { /* unterminated: kept as it is, for the parser to report */
      memcpy(out + o, text + open, len - open);
      o += len - open;
      break;
    }
    const size_t n = end - open - 1;
    const size_t keep = n > BIG_STRING ? 0 : n;
    out[o++] = '"';
    memcpy(out + o, text + open + 1, keep);
    o += keep;
    out[o++] = '"';
    i = end + 1;
  }
  *out_len = o;
  return out;
}

/* The record parsed: for a finished job from its skeleton, else in full. */
static json_t *load_record(const char *text, size_t len, json_error_t *je) {
  size_t sn = 0;
  char *sk = len > 4 * BIG_STRING ? skeleton(text, len, &sn) : NULL;
  json_t *r = sk ? json_loadb(sk, sn, 0, je) : NULL;
  free(sk);
  const json_t *st = json_object_get(r, "state");
  if (r && json_is_string(st) && queue_state_from_name(json_string_value(st)) >= 0 &&
      qstate_final((queue_state)queue_state_from_name(json_string_value(st))))
    return r;
  json_decref(r);
  return json_loadb(text, len, 0, je);
}

/* The record's lifecycle events back into the job's log, in order (the backend refuses
 * anything out of order: a damaged record loses those events, not the job). */
static void load_events(queue *q, qjob *j, const json_t *events) {
  size_t i;
  json_t *ev;
  if (q->shared) { /* the log lives beside the record: continue its numbering, never replay */
    qbackend_event *evs = NULL;
    int n = 0;
    err e = {0};
    if (q->be->ops->read(q->be, j->id, 0, 0, &evs, &n, &e) == ERR_OK && n > 0 &&
        evs[n - 1].seq >= j->next_seq)
      j->next_seq = evs[n - 1].seq + 1;
    qbackend_events_free(evs, n);
    return;
  }
  json_array_foreach(events, i, ev) {
    json_int_t seq;
    const char *type, *data;
    if (json_unpack(ev, "{s:I, s:s, s:s}", "seq", &seq, "type", &type, "data", &data) != 0 ||
        seq <= 0)
      continue;
    err e = {0};
    if (q->be->ops->append(q->be, j->id, (uint64_t)seq, qevent_type(type), data, 1, &e))
      qlog(q, QUEUE_LOG_WARN, j->id, "recovery: event %lld dropped: %s", (long long)seq, e.msg);
    if ((uint64_t)seq >= j->next_seq)
      j->next_seq = (uint64_t)seq + 1;
  }
}

/* The job a record describes (internal.h); at recovery an unreadable record is left in place
 * for a person to look at. */
qjob *qrecord_parse(queue *q, const char *id, const char *text, size_t len) {
  json_error_t je;
  json_t *r = load_record(text, len, &je);
  qjob *j = mem_calloc(1, sizeof *j);
  err e = {0};
  const char *state = NULL, *error = "";
  json_t *spec = NULL, *events = NULL;
  json_int_t next_seq = 1;
  if (!r || !j ||
      json_unpack_ex(r, &je, 0, "{s:o, s:s, s:F, s?F, s?F, s?i, s?i, s?i, s?i, s?s, s?I, s?o}",
                     "spec", &spec, "state", &state, "created", &j->created, "started", &j->started,
                     "finished", &j->finished, "images", &j->images, "files", &j->files, "total",
                     &j->total, "attempts", &j->attempts, "error", &error, "next_seq", &next_seq,
                     "events", &events) ||
      queue_spec_from_json(spec, &j->spec, &e) || queue_state_from_name(state) < 0 ||
      strlen(id) >= QUEUE_ID_SIZE) {
    qlog(q, QUEUE_LOG_ERROR, id, "recovery: unreadable job record (%s); left in place",
         e.msg[0] ? e.msg : je.text);
    json_decref(r);
    if (j)
      queue_spec_clear(&j->spec);
    free(j);
    return NULL;
  }
  snprintf(j->id, sizeof j->id, "%s", id);
  snprintf(j->error, sizeof j->error, "%s", error);
  j->state = (queue_state)queue_state_from_name(state);
  j->next_seq = (uint64_t)(next_seq > 0 ? next_seq : 1);
  j->t_mono_created = qclock_mono();
  load_events(q, j, events);
  json_decref(r);
  return j;
}

/* An unfinished job (queued, or running when the process died) made queued again, or failed
 * for good after max_attempts runs that each ended with the process; 1 if it was failed (and
 * is in the index then). */
static int requeue_or_fail(queue *q, qjob *j) {
  /* progress events of the lost run were never written, so skip past every number they can
   * have used, keeping ids unique for clients that resume with Last-Event-ID */
  j->next_seq += 2 * (uint64_t)j->spec.steps + (uint64_t)j->spec.batch + 8;
  const int was_running = j->state == QUEUE_RUNNING || j->started > 0;
  j->state = QUEUE_QUEUED;
  j->started = 0;
  j->images = 0;
  if (j->attempts < q->o.max_attempts) {
    qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", was_running ? "restarted" : "recovered"),
              1);
    return 0;
  }
  char why[128];
  snprintf(why, sizeof why, "crashed the worker %d times", j->attempts);
  size_t rec_len = 0;
  char *rec = qjob_finish(q, j, QUEUE_FAILED, why, &rec_len);
  qlog(q, QUEUE_LOG_ERROR, j->id, "recovery: %s; failed", why);
  if (qjob_insert(q, j) != ERR_OK) {
    free(rec);
    qjob_discard(q, j);
    return 1;
  }
  qjob_settle_write(q, j, rec, rec_len);
  return 1;
}

static void load_one(void *user, const char *id, const char *text, size_t len) {
  queue *q = user;
  if (!text) {
    qlog(q, QUEUE_LOG_ERROR, id, "recovery: cannot read the job file; left in place");
    return;
  }
  qjob *j = qrecord_parse(q, id, text, len);
  if (!j)
    return;
  if (qstate_final(j->state)) /* its record on disk keeps the inputs; views need none of them */
    qspec_release_inputs(&j->spec);
  else if (q->shared)
    ; /* the shared queue holds it, or a claim that another daemon holds or that runs out and
       * puts it back: whoever claims it then reruns it (qshared_claimed) */
  else if (requeue_or_fail(q, j))
    return;
  /* queued ones go to the backend's queue once all are loaded (qrecovery_run) */
  if (qjob_insert(q, j) != ERR_OK)
    qjob_discard(q, j);
}

int qrecovery_run(queue *q, err *e) {
  int rc = q->st->ops->list_jobs(q->st, load_one, q, e);
  if (rc)
    return rc;
  int requeued = 0; /* in id order: submission order */
  for (int i = 0; i < q->njobs; i++)
    if (q->jobs[i]->state == QUEUE_QUEUED) {
      qjob_enqueue(q, q->jobs[i]);
      requeued++;
    }
  if (q->njobs)
    qlog(q, QUEUE_LOG_INFO, NULL, "recovered %d jobs (%d queued again) from %s", q->njobs, requeued,
         q->shared ? "Redis" : q->state_dir);
  return ERR_OK;
}
