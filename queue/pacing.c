/* Constant-time mode (constant_time_eval_ms): a run is paced by a deployment budget per network
 * evaluation, waited out at each step boundary, so what a client sees of its timing (the
 * events, when they arrive, the finish) follows from the request alone, not from the model's
 * speed nor from the sample (DeepPeep). A solver whose evaluation count depends on the sample
 * reports evaluation slots up to constant_time_max_nfe and waits out the ones it did not need,
 * so every seed gives the same events at the same times. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <time.h>

int qpace_on(const qbatch *b) {
  return b->q->o.constant_time_eval_ms > 0;
}

static double budget(const qbatch *b) {
  return b->q->o.constant_time_eval_ms / 1000.0;
}

/* Waits until `nfe` evaluations' budget from the run's start has passed. A deadline already
 * gone (evaluations slower than their budget) is counted for the admin-only metrics; the
 * client is told nothing. */
static void wait_for(qbatch *b, int nfe) {
  const double until = b->t_start + nfe * budget(b);
  if (qclock_mono() > until + 0.001) {
    pthread_mutex_lock(&b->q->mu);
    b->q->pace_overruns++;
    pthread_mutex_unlock(&b->q->mu);
    return;
  }
  const struct timespec ts = {.tv_sec = (time_t)until,
                              .tv_nsec = (long)((until - floor(until)) * 1e9)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
    ;
}

/* Whether the report at evaluation count `at` is due: forced ones (first, last), then one per
 * progress_interval_ms of budgeted time, so which reports are sent follows from the counts. */
static int due(qbatch *b, int at, int force) {
  if (!force && (at - b->pace_emitted) * budget(b) * 1000.0 < b->q->o.progress_interval_ms)
    return 0;
  b->pace_emitted = at;
  return 1;
}

/* A data-dependent run's slots up to `upto`, each reported when due at its own deadline. */
static void slots(qbatch *b, int upto, qreport_fn emit) {
  const int cap = b->q->o.constant_time_max_nfe;
  for (int s = b->pace_slot + 1; s <= upto && !atomic_load(&b->cancel); s++) {
    b->pace_slot = s;
    if (!due(b, s, s == 1 || s == cap))
      continue;
    wait_for(b, s);
    const qreport r = {s, cap, s, floor(s * budget(b)), ceil((cap - s) * budget(b))};
    emit(b, &r, NULL);
  }
  if (!atomic_load(&b->cancel))
    wait_for(b, upto);
}

void qpace_step(qbatch *b, const pipeline_progress *p, qreport_fn emit, const char *preview) {
  if (p->total > 0) { /* a count fixed by the request: its steps, timed by the budget */
    wait_for(b, p->nfe);
    const double spent = p->nfe * budget(b);
    const qreport r = {p->step, p->total, p->nfe, floor(spent),
                       ceil(spent / p->step * (p->total - p->step))};
    if (due(b, p->nfe, p->step == 1 || p->step == p->total) || preview)
      emit(b, &r, preview);
    return;
  }
  /* previews come at the sample's own accepted steps: not sent */
  if (p->nfe > b->q->o.constant_time_max_nfe) {
    b->pace_over = 1; /* the job fails naming the limit; its events went on the budget's clock */
    atomic_store(&b->cancel, 1);
    return;
  }
  slots(b, p->nfe, emit);
}

int qpace_finish(qbatch *b, int nfe, qreport_fn emit) {
  if (b->pace_slot == 0) /* a count fixed by the request: its last step was the end */
    return 0;
  if (nfe > b->q->o.constant_time_max_nfe) { /* over between two reports */
    b->pace_over = 1;
    return -1;
  }
  slots(b, b->q->o.constant_time_max_nfe, emit); /* the slots it did not need */
  return 0;
}
