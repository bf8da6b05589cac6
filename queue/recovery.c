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

/* ---- recovery ---- */

void qrecovery_load_one(void *user, const char *id, const char *text, size_t len) {
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
    return;
  }
  snprintf(j->id, sizeof j->id, "%s", id);
  snprintf(j->error, sizeof j->error, "%s", error);
  j->state = (queue_state)queue_state_from_name(state);
  j->next_seq = (uint64_t)(next_seq > 0 ? next_seq : 1);
  j->t_mono_created = qclock_mono();
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
    j->life[j->nlife++] = (qevent){(uint64_t)seq, qevent_type(type), copy};
    if ((uint64_t)seq >= j->next_seq)
      j->next_seq = (uint64_t)seq + 1;
  }
  json_decref(r);
  if (qstate_final(j->state)) /* its record on disk keeps the inputs; views need none of them */
    qspec_release_inputs(&j->spec);
  if (!qstate_final(j->state)) {
    /* queued, or running when the process died: progress events of the lost run were never
     * written, so skip past every number they can have used, keeping ids unique for clients
     * that resume with Last-Event-ID */
    j->next_seq += 2 * (uint64_t)j->spec.steps + (uint64_t)j->spec.batch + 8;
    const int was_running = j->state == QUEUE_RUNNING || j->started > 0;
    j->state = QUEUE_QUEUED;
    j->started = 0;
    j->images = 0;
    if (j->attempts >= q->o.max_attempts) {
      /* every run so far ended with the process: fail it for good rather than loop */
      char why[128];
      snprintf(why, sizeof why, "crashed the worker %d times", j->attempts);
      size_t rec_len = 0;
      char *rec = qjob_finish(j, QUEUE_FAILED, why, &rec_len);
      qlog(q, QUEUE_LOG_ERROR, id, "recovery: %s; failed", why);
      if (qjob_insert(q, j) != ERR_OK) {
        free(rec);
        qjob_free(j);
        return;
      }
      qjob_settle_write(q, j, rec, rec_len);
      return;
    }
    qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", was_running ? "restarted" : "recovered"),
              1);
  }
  if (qjob_insert(q, j) != ERR_OK) {
    qjob_free(j);
    return;
  }
  /* (queued ones go to the FIFO after all are loaded, in id order) */
}
