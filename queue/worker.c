/* One batch on a libuv pool thread: inputs decoded, the sampler or an edit run, progress and
 * previews fed back under the lock, images and noise written to the store. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "base64.h"
#include "edit.h"
#include "image.h"
#include "mem.h"
#include "rng.h"

/* ---- workers ---- */

static int batch_noise(void *user, uint64_t image, uint64_t stream, float *out, size_t n, err *e) {
  (void)e;
  const qbatch *b = user;
  rng_normal(b->img_seed[image], b->img_index[image], stream, out, n);
  return ERR_OK;
}

/* Test-only fault hook (DENOISED_FAULT_NAN_SEED): the noise of a stochastic step turns NaN at
 * the third evaluation, as a poison input would, so the tests see a run that goes non-finite
 * fail with the step named (tests/test_server_edit.c). */
static int fault_nan_noise(void *user, uint64_t image, uint64_t stream, float *out, size_t n,
                           err *e) {
  (void)e;
  const qbatch *b = user;
  rng_normal(b->jobs[0]->spec.seed, image, stream, out, n);
  if (stream == 3 && n)
    out[0] = NAN;
  return ERR_OK;
}

/* A progress event's data. Times are whole seconds (elapsed down, eta up): a step's time at
 * millisecond resolution fingerprints the model's size and the solver (DeepPeep). */
static json_t *progress_data(const qreport *r) {
  return json_pack("{s:i, s:i, s:i, s:I, s:I}", "step", r->step, "total", r->total, "nfe", r->nfe,
                   "elapsed", (json_int_t)floor(r->elapsed), "eta", (json_int_t)ceil(r->eta));
}

/* Constant-time mode's reports: every live job is told the same; with none left (cancelled)
 * the padding stops. */
static void report_paced(qbatch *b, const qreport *r, const char *preview) {
  queue *q = b->q;
  pthread_mutex_lock(&q->mu);
  int live = 0;
  for (int i = 0; i < b->njobs; i++) {
    qjob *j = b->jobs[i];
    if (!qjob_live(j))
      continue;
    live++;
    j->step = r->step;
    j->total = r->total;
    j->nfe = r->nfe;
    json_t *d = progress_data(r);
    if (preview && i == 0)
      json_object_set_new(d, "preview", json_string(preview));
    qjob_emit(q, j, "progress", d, 0);
  }
  if (!live || q->stopping)
    atomic_store(&b->cancel, 1);
  pthread_mutex_unlock(&q->mu);
}

/* The run as it goes: each job at most once per progress_interval_ms (lock held). */
static void report_timed(qbatch *b, const pipeline_progress *p, double t, const char *preview) {
  queue *q = b->q;
  for (int i = 0; i < b->njobs; i++) {
    qjob *j = b->jobs[i];
    if (!qjob_live(j))
      continue;
    j->step = p->step;
    j->total = p->total;
    j->nfe = p->nfe;
    const int due = p->step == 1 || p->step == p->total ||
                    (t - j->last_progress) * 1000.0 >= q->o.progress_interval_ms;
    if (!due && !(preview && i == 0))
      continue;
    j->last_progress = t;
    const double elapsed = t - j->t_mono_started;
    const qreport r = {p->step, p->total, p->nfe, elapsed,
                       p->step && p->total ? elapsed / p->step * (p->total - p->step) : 0.0};
    json_t *d = progress_data(&r);
    if (preview && i == 0)
      json_object_set_new(d, "preview", json_string(preview));
    qjob_emit(q, j, "progress", d, 0);
  }
}

/* The x0 preview as a data URL, or NULL. */
static char *preview_url(const pipeline_progress *p) {
  char *url = NULL;
  if (p->preview) {
    char *b64 = base64_encode(p->preview, p->preview_len);
    size_t n = b64 ? strlen(b64) + 32 : 0;
    if (b64 && (url = mem_malloc(n)))
      snprintf(url, n, "data:image/png;base64,%s", b64);
    free(b64);
  }
  return url;
}

/* Stops the run at this step boundary when no job wants it any more, the queue stops or the
 * run is over max_job_seconds (lock held). */
static void check_run(qbatch *b, double t) {
  queue *q = b->q;
  int live = 0;
  for (int i = 0; i < b->njobs; i++)
    live += qjob_live(b->jobs[i]);
  if (!live || q->stopping)
    atomic_store(&b->cancel, 1);
  if (q->o.max_job_seconds > 0 && t - b->t_start > q->o.max_job_seconds) {
    b->timed_out = 1; /* the run stops at this step boundary and its jobs fail */
    atomic_store(&b->cancel, 1);
  }
}

static void batch_progress(const pipeline_progress *p, void *user) {
  qbatch *b = user;
  queue *q = b->q;
  const double t = qclock_mono(), dt = t - b->t_last;
  char *preview = preview_url(p);
  pthread_mutex_lock(&q->mu);
  qhist_observe(&q->step_h, dt); /* the compute, before any padding */
  if (!qpace_on(b))
    report_timed(b, p, t, preview);
  if (!qpace_on(b) && p->total <= 0 && q->o.constant_time_max_nfe > 0 &&
      p->nfe > q->o.constant_time_max_nfe) {
    b->pace_over = 1; /* its cost was counted at the cap: a run past it fails naming it */
    atomic_store(&b->cancel, 1);
  }
  pthread_mutex_unlock(&q->mu);
  if (qpace_on(b))
    qpace_step(b, p, report_paced, preview);
  pthread_mutex_lock(&q->mu);
  b->t_last = qclock_mono();
  check_run(b, b->t_last);
  pthread_mutex_unlock(&q->mu);
  free(preview);
}

/* Announces image i of j (lock held). */
static void emit_image(queue *q, qjob *j, int i) {
  char url[256];
  snprintf(url, sizeof url, "%s%s/images/%d", q->url_prefix, j->id, i);
  qjob_emit(q, j, "image",
            json_pack("{s:i, s:s, s:I}", "index", i, "url", url, "image_index",
                      (json_int_t)(j->spec.first_image + (uint64_t)i)),
            1);
}

/* Image i of j as PNG with its metadata into the store; the last one syncs them all. */
static int store_image(qbatch *b, qjob *j, const pipeline_request *rj, const float *x, int i,
                       json_t *extra, err *e) {
  queue *q = b->q;
  uint8_t *png = NULL;
  size_t len = 0;
  /* where the image sits in the job's batch: a replay of an edit picks it from the job's
   * noise (the rng index alone does not say, when the job set first_image) */
  json_object_set_new(extra, "batch_index", json_integer(i));
  int rc = pipeline_png(b->qm->m, rj, b->s, x, i, j->spec.model, extra, &png, &len, e);
  if (!rc)
    rc = q->st->ops->put_image(q->st, j->id, i, png, len, e);
  if (!rc && i == j->spec.batch - 1)
    rc = q->st->ops->sync_images(q->st, e);
  free(png);
  return rc;
}

/* An image write failed (lock held on entry, released on return): the job fails with it, unless
 * the shared store is only away for now (Redis restarting): then the job is queued again here,
 * and runs again once the store is back and its claim, which could not be released, ran out. */
static void fail_image_unlock(queue *q, qjob *j, int i, int rc, err *e) {
  err_prefix(e, "writing image %d", i);
  if (rc != ERR_NOMEM)
    qstore_note(q, rc, e->msg);
  if (rc == QUEUE_UNAVAILABLE && qjob_live(j)) {
    j->state = QUEUE_QUEUED;
    j->step = j->nfe = 0;
    j->images = j->files = 0;
    qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", "store_unavailable"), 1);
    pthread_mutex_unlock(&q->mu);
    qlog(q, QUEUE_LOG_WARN, j->id, "%s; queued again", e->msg);
    return;
  }
  size_t rl = 0;
  const int live = qjob_live(j);
  char *rec = live ? qjob_finish(q, j, QUEUE_FAILED, e->msg, &rl) : NULL;
  pthread_mutex_unlock(&q->mu);
  qlog(q, QUEUE_LOG_ERROR, j->id, "%s", e->msg);
  if (live)
    qjob_settle_write(q, j, rec, rl);
}

/* Every image of j is durable: its last image event, then its success. */
static void succeed_job(queue *q, qjob *j) {
  pthread_mutex_lock(&q->mu);
  char *rec = NULL;
  size_t rl = 0;
  const int live = qjob_live(j);
  if (live) {
    j->images = j->spec.batch;
    emit_image(q, j, j->spec.batch - 1);
    q->images_generated += (uint64_t)j->images;
    rec = qjob_finish(q, j, QUEUE_SUCCEEDED, NULL, &rl);
  }
  pthread_mutex_unlock(&q->mu);
  if (live)
    qjob_settle_write(q, j, rec, rl);
}

/* Job j's images (from position base of the batch's x) stored one by one, each announced once
 * durable; stops when the job is no longer live (cancelled meanwhile). */
static void write_results(qbatch *b, int base, qjob *j, const pipeline_request *r, const float *x,
                          size_t d) {
  queue *q = b->q;
  json_t *extra = json_pack("{s:s}", "job_id", j->id);
  /* this job's part of the batch: its seed, images and classes */
  pipeline_request rj = *r;
  rj.seed = j->spec.seed;
  rj.first_image = j->spec.first_image;
  rj.batch = j->spec.batch;
  rj.labels = r->labels ? r->labels + base : NULL;
  for (int i = 0; i < j->spec.batch; i++) {
    pthread_mutex_lock(&q->mu);
    int live = qjob_live(j);
    pthread_mutex_unlock(&q->mu);
    if (!live)
      break;
    err e = {0};
    int rc = store_image(b, j, &rj, x + (size_t)(base + i) * d, i, extra, &e);
    pthread_mutex_lock(&q->mu);
    if (rc) {
      fail_image_unlock(q, j, i, rc, &e);
      json_decref(extra);
      return;
    }
    j->files = i + 1;
    if (qjob_live(j) && i < j->spec.batch - 1) { /* the last one waits for the sync */
      j->images = i + 1;
      emit_image(q, j, i);
    }
    pthread_mutex_unlock(&q->mu);
  }
  json_decref(extra);
  succeed_job(q, j);
}

/* Before any compute: each job's record with its attempts count goes to the store, so a run that
 * kills the process is counted at the next start (recovery fails the job after max_attempts). */
static void persist_attempts(qbatch *b) {
  queue *q = b->q;
  char *recs[b->njobs];
  size_t lens[b->njobs];
  pthread_mutex_lock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    recs[i] = qjob_record(q, b->jobs[i], &lens[i], NULL);
  pthread_mutex_unlock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    if (recs[i])
      qjob_persist(q, b->jobs[i]->id, recs[i], lens[i]);
  for (int i = 0; i < b->njobs; i++)
    if (q->fault_crash_seed && b->jobs[i]->spec.seed == q->fault_crash_seed)
      abort();
}

/* Per-image seeds, indices, labels and starting noise of a batch of several jobs. */
typedef struct batch_arrays {
  float *init;
  int64_t *labels;
  uint64_t *seeds, *index;
} batch_arrays;

static void batch_arrays_free(batch_arrays *a) {
  free(a->init);
  free(a->labels);
  free(a->seeds);
  free(a->index);
}

/* A batch of jobs: each position runs on its job's (seed, image) streams and label, so every
 * image equals the one it would be alone (edits are never batched). */
static int batch_inputs(qbatch *b, qrequest *req, size_t d, batch_arrays *a, err *e) {
  const qjob *head = b->jobs[0];
  a->seeds = mem_malloc((size_t)b->nimg * sizeof *a->seeds);
  a->index = mem_malloc((size_t)b->nimg * sizeof *a->index);
  a->labels = head->spec.has_label ? mem_malloc((size_t)b->nimg * sizeof *a->labels) : NULL;
  a->init = mem_malloc((size_t)b->nimg * d * sizeof *a->init);
  if (!a->seeds || !a->index || (head->spec.has_label && !a->labels) || !a->init)
    return err_set(e, ERR_NOMEM, "out of memory for %d images", b->nimg);
  for (int i = 0, k = 0; i < b->njobs; i++)
    for (int n = 0; n < b->jobs[i]->spec.batch; n++, k++) {
      a->seeds[k] = b->jobs[i]->spec.seed;
      a->index[k] = b->jobs[i]->spec.first_image + (uint64_t)n;
      if (a->labels)
        a->labels[k] = b->jobs[i]->spec.label;
      rng_normal(a->seeds[k], a->index[k], 0, a->init + (size_t)k * d, d);
    }
  req->r.batch = b->nimg;
  req->r.first_image = 0;
  req->r.noise = a->init;
  if (a->labels)
    req->r.labels = a->labels;
  b->img_seed = a->seeds;
  b->img_index = a->index;
  return ERR_OK;
}

/* The pipeline run with the queue's progress, cancel and noise hooks; an inversion's noise
 * goes to the store with the head job. */
static int run_batch(qbatch *b, qrequest *req, pipeline_result *res, err *e) {
  queue *q = b->q;
  const qjob *head = b->jobs[0];
  pipeline_hooks hooks = {.progress = batch_progress,
                          .progress_user = b,
                          .preview_every = head->spec.preview_every,
                          .cancel = &b->cancel,
                          .threads = q->o.threads_per_job,
                          .noise = b->njobs > 1 ? batch_noise : NULL,
                          .noise_user = b};
  if (b->njobs == 1 && q->fault_nan_seed && head->spec.seed == q->fault_nan_seed)
    hooks.noise = fault_nan_noise;
  b->t_start = b->t_last = qclock_mono();
  int rc = pipeline_run(b->qm->m, &req->r, &hooks, res, e);
  if (!rc && qpace_on(b) && qpace_finish(b, res->nfe, report_paced))
    rc = ERR_CANCELLED;
  b->s = res->sampler;
  res->sampler = NULL;
  if (!rc && res->noise)
    rc = q->st->ops->put_file(q->st, head->id, QUEUE_NOISE_FILE, res->noise, res->noise_len, e);
  return rc;
}

/* A run that did not finish: at shutdown its jobs go back to queued (the store still says so,
 * and they run again after a restart), otherwise they fail with the run's error. */
static void fail_batch(qbatch *b, int rc, err *e) {
  queue *q = b->q;
  char *recs[b->njobs];
  size_t lens[b->njobs];
  int failed[b->njobs];
  memset(failed, 0, sizeof failed); /* both loops cover every job; cppcheck cannot tell */
  pthread_mutex_lock(&q->mu);
  if (rc == ERR_CANCELLED && b->timed_out && !q->stopping)
    err_set(e, ERR_CANCELLED,
            "the job ran longer than this server's limit of %d s "
            "(max_job_seconds)",
            q->o.max_job_seconds);
  else if (rc == ERR_CANCELLED && b->pace_over && !q->stopping)
    err_set(e, ERR_CANCELLED,
            "the run needed more than this server's %d network evaluations "
            "(constant_time_max_nfe)",
            q->o.constant_time_max_nfe);
  for (int i = 0; i < b->njobs; i++) {
    qjob *j = b->jobs[i];
    recs[i] = NULL;
    failed[i] = 0;
    if (!qjob_live(j))
      continue;
    if (rc == ERR_CANCELLED && q->stopping) {
      j->state = QUEUE_QUEUED;
      j->step = j->nfe = 0;
      j->attempts--; /* stopped, not crashed: this run does not count */
      qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", "shutdown"), 1);
      recs[i] = qjob_record(q, j, &lens[i], NULL);
    } else {
      recs[i] = qjob_finish(q, j, QUEUE_FAILED, e->msg, &lens[i]);
      failed[i] = 1;
    }
  }
  pthread_mutex_unlock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    if (failed[i]) {
      qlog(q, QUEUE_LOG_WARN, b->jobs[i]->id, "failed: %s", e->msg);
      qjob_settle_write(q, b->jobs[i], recs[i], lens[i]);
    } else if (recs[i]) {
      qjob_persist(q, b->jobs[i]->id, recs[i], lens[i]);
    }
}

void qworker_run(uv_work_t *w) {
  qbatch *b = w->data;
  qjob *head = b->jobs[0];
  persist_attempts(b);
  const model_info *mi = model_get_info(b->qm->m);
  err e = {0};
  qrequest req;
  pipeline_result res = {0};
  batch_arrays arrays = {0};
  int rc = qrequest_from_spec(b->qm->m, &head->spec, &req, &e);
  b->h = head->spec.height;
  b->w = head->spec.width;
  /* a latent model's noise is latents, 1/latent_factor of the image along each side */
  const int f = mi->latent_factor > 0 ? mi->latent_factor : 1;
  const size_t d_noise = (size_t)mi->in_channels * (b->h / f) * (b->w / f);
  const size_t d_image = (size_t)mi->image_channels * b->h * b->w;
  if (!rc && b->njobs > 1)
    rc = batch_inputs(b, &req, d_noise, &arrays, &e);
  if (!rc)
    rc = run_batch(b, &req, &res, &e);
  if (rc == ERR_OK) {
    for (int i = 0, base = 0; i < b->njobs; base += b->jobs[i]->spec.batch, i++)
      write_results(b, base, b->jobs[i], &req.r, res.images, d_image);
  } else {
    fail_batch(b, rc, &e);
  }
  batch_arrays_free(&arrays);
  qrequest_free(&req);
  pipeline_result_clear(&res);
}
