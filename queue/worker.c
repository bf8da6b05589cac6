/* One batch on a libuv pool thread: inputs decoded, the sampler or an edit run (a concept job
 * first learns its row), progress and previews fed back under the lock, images and noise
 * written to the store. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "adjtask.h"
#include "base64.h"
#include "edit.h"
#include "image.h"
#include "mem.h"
#include "rng.h"
#include "safetensors.h"

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

void qworker_progress(const pipeline_progress *p, void *user) {
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

/* ---- the classifier-driven jobs (concept, audit, stylize) ---- */

/* What they share, from the job's edit: the verdict (edit.target, on the served model's
 * classifier), the solver (*s, freed by the caller) and how images are made, and for the
 * optimising ones (concept, stylize) the Adam run's edit.steps, batch, lr and margin. */
typedef struct adj_setup {
  adjtask_target t[ADJTASK_MAX_TARGETS];
  int nt;
  sampler *s;
  adjtask_gen gen;
  int steps, batch;
  double lr, margin;
} adj_setup;

static int adj_setup_make(qbatch *b, const qrequest *req, adj_setup *u, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  memset(u, 0, sizeof *u);
  u->steps = (int)json_integer_value(json_object_get(a, "steps"));
  u->batch = (int)json_integer_value(json_object_get(a, "batch"));
  u->lr = json_number_value(json_object_get(a, "lr"));
  u->margin = json_number_value(json_object_get(a, "margin"));
  int rc = b->qm->clf ? ERR_OK : err_set(e, ERR_UNSUPPORTED, "the model's classifier is gone");
  if (rc == ERR_OK)
    rc = adjtask_parse_targets(b->qm->clf, json_string_value(json_object_get(a, "target")), u->t,
                               &u->nt, e);
  if (rc == ERR_OK)
    rc = queue_make_sampler(b->q, sp, &u->s, NULL, 0, e);
  u->gen = (adjtask_gen){
      .s = u->s, .gd = req->r.guidance, .threads = b->q->o.threads_per_job, .cancel = &b->cancel};
  return rc;
}

/* ---- concept jobs ---- */

static void concept_progress_cb(const concept_progress *p, void *user) {
  const pipeline_progress pp = {.step = p->step, .total = p->total};
  qworker_progress(&pp, user);
}

/* The row NAME on the worker's own copy of the model (the registry's is shared read-only):
 * NAME appended (or, after a restart, taken over) with the start row, in *label. */
static int concept_class(model *own, const json_t *a, int64_t *label, err *e) {
  const model_info *mi = model_get_info(own);
  const char *name = json_string_value(json_object_get(a, "name"));
  const int64_t init = json_integer_value(json_object_get(a, "init"));
  float *row = mem_malloc((size_t)mi->class_embed_dim * sizeof(float));
  if (!row)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = ERR_OK;
  if (init >= 0 && model_class_row(own, init))
    memcpy(row, model_class_row(own, init), (size_t)mi->class_embed_dim * sizeof(float));
  else
    rc = concept_mean_row(own, row, e);
  const int64_t have = name ? model_class_from_name(own, name) : -1;
  if (rc == ERR_OK && have >= mi->num_classes - mi->num_embeddings) {
    memcpy(model_class_row(own, have), row, (size_t)mi->class_embed_dim * sizeof(float));
    *label = have;
  } else if (rc == ERR_OK) {
    rc = model_add_class(own, name, row, label, e);
  }
  free(row);
  return rc;
}

static int concept_save(const qbatch *b, model *own, const json_t *a, int64_t label, err *e) {
  const model_info *mi = model_get_info(own);
  char dir[1100], path[1200];
  snprintf(dir, sizeof dir, "%s/" MODEL_EMBEDDINGS_DIR, b->qm->path);
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "cannot create %s: %s", dir, strerror(errno));
  snprintf(path, sizeof path, "%s/%s.safetensors", dir,
           json_string_value(json_object_get(a, "name")));
  const int64_t dim = mi->class_embed_dim;
  const char *meta[] = {"format", "denoised class embedding",
                        "target", json_string_value(json_object_get(a, "target")),
                        "job",    b->jobs[0]->id};
  const st_out_tensor t = {.name = MODEL_EMBEDDING_TENSOR,
                           .ndim = 1,
                           .shape = &dim,
                           .data = model_class_row(own, label)};
  return st_write_f32(path, &t, 1, meta, 3, e);
}

/* Learns the concept on a copy of the model (*own, which the job's images then come from, all
 * of class NAME), saves it beside the model and reloads the registry's copy so later jobs take
 * NAME. */
static int run_concept(qbatch *b, qrequest *req, model **own, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  int64_t label = -1;
  adj_setup u;
  memset(&u, 0, sizeof u);
  int rc = model_load(b->qm->path, own, e);
  if (rc == ERR_OK)
    rc = adj_setup_make(b, req, &u, e);
  if (rc == ERR_OK)
    rc = concept_class(*own, a, &label, e);
  const concept_opts o = {.gen = u.gen,
                          .clf = b->qm->clf,
                          .targets = u.t,
                          .n_targets = u.nt,
                          .label = label,
                          .steps = u.steps,
                          .batch = u.batch,
                          .lr = u.lr,
                          .margin = u.margin,
                          .seed = sp->seed,
                          .progress = concept_progress_cb,
                          .progress_user = b};
  if (rc == ERR_OK)
    rc = concept_optimize(*own, &o, e);
  sampler_free(u.s);
  if (rc == ERR_OK)
    rc = concept_save(b, *own, a, label, e);
  if (rc == ERR_OK)
    rc = qmodel_reload(b->q, sp->model, e);
  if (rc == ERR_OK && !req->labels && !(req->labels = mem_malloc(sizeof *req->labels * sp->batch)))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; rc == ERR_OK && i < sp->batch; i++)
    req->labels[i] = label;
  req->r.labels = req->labels;
  return rc ? err_prefix(e, "concept") : ERR_OK;
}

/* ---- audit jobs ---- */

static void audit_progress_cb(const audit_progress *p, void *user) {
  const pipeline_progress pp = {.step = p->step, .total = p->total};
  qworker_progress(&pp, user);
}

/* The report as JSON text into the store, beside the adversarial noise. */
static int audit_store(qbatch *b, const json_t *a, const audit_result *res, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const model_info *mi = model_get_info(b->qm->m);
  const json_t *eps = json_object_get(a, "eps");
  json_t *boxes = json_array();
  for (size_t i = 0; boxes && i < json_array_size(eps) && i < ADJTASK_MAX_EPS; i++)
    json_array_append_new(
        boxes,
        json_pack("{s:f, s:i, s:i, s:I, s:f}", "eps", json_number_value(json_array_get(eps, i)),
                  "adversarial", res->adversarial[i], "random", res->random[i], "random_draws",
                  (json_int_t)res->clean * json_integer_value(json_object_get(a, "random")),
                  "seconds", res->seconds[i]));
  json_t *rep = json_pack("{s:s, s:I, s:i, s:i, s:O, s:o}", "target",
                          json_string_value(json_object_get(a, "target")), "class_label",
                          (json_int_t)sp->label, "batch", sp->batch, "clean", res->clean, "iters",
                          json_object_get(a, "iters"), "boxes", boxes);
  char *text = rep ? json_dumps(rep, JSON_COMPACT) : NULL;
  json_decref(rep);
  int rc = text ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = b->q->st->ops->put_file(b->q->st, b->jobs[0]->id, QUEUE_REPORT_FILE, (uint8_t *)text,
                                 strlen(text), e);
  free(text);
  const int64_t sh[4] = {sp->batch, mi->in_channels, sp->height, sp->width};
  uint8_t *npy = NULL;
  size_t len = 0;
  if (rc == ERR_OK)
    rc = npy_encode_f32(res->noise, 4, sh, &npy, &len, e);
  if (rc == ERR_OK)
    rc = b->q->st->ops->put_file(b->q->st, b->jobs[0]->id, QUEUE_NOISE_FILE, npy, len, e);
  free(npy);
  return rc;
}

/* The audit of the job's class with the served model (read-only); res->images are the job's
 * images. */
static int run_audit(qbatch *b, qrequest *req, audit_result *res, size_t d, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  const size_t nd = (size_t)sp->batch * d;
  double eps[ADJTASK_MAX_EPS];
  const json_t *ev = json_object_get(a, "eps");
  const int neps = (int)json_array_size(ev);
  for (int i = 0; i < neps && i < ADJTASK_MAX_EPS; i++)
    eps[i] = json_number_value(json_array_get(ev, (size_t)i));
  adj_setup u;
  memset(&u, 0, sizeof u);
  res->noise = mem_malloc(nd * sizeof(float));
  res->images = mem_malloc(nd * sizeof(float));
  int rc = res->noise && res->images ? adj_setup_make(b, req, &u, e)
                                     : err_set(e, ERR_NOMEM, "out of memory");
  const audit_opts o = {.gen = u.gen,
                        .clf = b->qm->clf,
                        .head = u.t[0].head,
                        .target = u.t[0].cls,
                        .label = sp->label,
                        .batch = sp->batch,
                        .seed = sp->seed,
                        .eps = eps,
                        .n_eps = neps,
                        .iters = (int)json_integer_value(json_object_get(a, "iters")),
                        .random = (int)json_integer_value(json_object_get(a, "random")),
                        .progress = audit_progress_cb,
                        .progress_user = b};
  if (rc == ERR_OK)
    rc = audit_run(b->qm->m, &o, res, e);
  b->s = u.s; /* the images' metadata names the solver */
  if (rc == ERR_OK)
    rc = audit_store(b, a, res, e);
  return rc ? err_prefix(e, "audit") : ERR_OK;
}

/* ---- stylize jobs ---- */

static void stylize_progress_cb(const stylize_progress *p, void *user) {
  const pipeline_progress pp = {.step = p->step, .total = p->total};
  qworker_progress(&pp, user);
}

#define STYLIZE_MAX_CLASSES 1024

/* Fine-tunes a copy of the model (*own, which the job's images then come from), writes it to
 * STATE_DIR/models/NAME-JOBID and registers it as model NAME. */
static int run_stylize(qbatch *b, qrequest *req, model **own, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  const classifier *clf = b->qm->clf;
  int n = 0, *keep_cls = mem_malloc(STYLIZE_MAX_CLASSES * sizeof *keep_cls);
  int64_t *classes = mem_malloc(STYLIZE_MAX_CLASSES * sizeof *classes);
  adj_setup u;
  memset(&u, 0, sizeof u);
  int rc = classes && keep_cls ? model_load(b->qm->path, own, e)
                               : err_set(e, ERR_NOMEM, "out of memory");
  const int keep =
      clf ? classifier_head_index(clf, json_string_value(json_object_get(a, "keep"))) : -1;
  if (rc == ERR_OK && keep < 0)
    rc = err_set(e, ERR_UNSUPPORTED, "the model's classifier or its head is gone");
  if (rc == ERR_OK)
    rc = adj_setup_make(b, req, &u, e);
  if (rc == ERR_OK)
    rc = adjtask_class_map(*own, clf, keep, classes, keep_cls, STYLIZE_MAX_CLASSES, &n, e);
  const stylize_opts o = {.gen = u.gen,
                          .clf = clf,
                          .targets = u.t,
                          .n_targets = u.nt,
                          .keep_head = keep,
                          .classes = classes,
                          .keep_cls = keep_cls,
                          .n_classes = n,
                          .keep_weight = json_number_value(json_object_get(a, "keep_weight")),
                          .steps = u.steps,
                          .batch = u.batch,
                          .lr = u.lr,
                          .margin = u.margin,
                          .seed = sp->seed,
                          .progress = stylize_progress_cb,
                          .progress_user = b};
  if (rc == ERR_OK)
    rc = stylize_optimize(*own, &o, e);
  sampler_free(u.s);
  free(classes), free(keep_cls);
  if (rc == ERR_OK)
    rc = qmodel_publish(b->q, b->qm, *own, json_string_value(json_object_get(a, "name")),
                        b->jobs[0]->id, "denoised stylize job", e);
  return rc ? err_prefix(e, "stylize") : ERR_OK;
}

/* The pipeline run with the queue's progress, cancel and noise hooks; an inversion's noise
 * goes to the store with the head job. */
static int run_batch(qbatch *b, const model *m, qrequest *req, pipeline_result *res, err *e) {
  queue *q = b->q;
  const qjob *head = b->jobs[0];
  pipeline_hooks hooks = {.progress = qworker_progress,
                          .progress_user = b,
                          .preview_every = head->spec.preview_every,
                          .cancel = &b->cancel,
                          .threads = q->o.threads_per_job,
                          .noise = b->njobs > 1 ? batch_noise : NULL,
                          .noise_user = b};
  if (b->njobs == 1 && q->fault_nan_seed && head->spec.seed == q->fault_nan_seed)
    hooks.noise = fault_nan_noise;
  int rc = pipeline_run(m, &req->r, &hooks, res, e);
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
  model *own = NULL; /* a concept's, stylization's or fine-tuning's copy of the model */
  b->t_start = b->t_last = qclock_mono();
  audit_result ar = {0};
  if (!rc && head->spec.edit == QUEUE_EDIT_CONCEPT)
    rc = run_concept(b, &req, &own, &e);
  if (!rc && head->spec.edit == QUEUE_EDIT_STYLIZE)
    rc = run_stylize(b, &req, &own, &e);
  if (!rc && head->spec.edit == QUEUE_EDIT_FINETUNE)
    rc = qfinetune_run(b, &own, &e);
  if (!rc && head->spec.edit == QUEUE_EDIT_AUDIT)
    rc = run_audit(b, &req, &ar, d_image, &e); /* pixel models only: noise and image agree */
  else if (!rc)
    rc = run_batch(b, own ? own : b->qm->m, &req, &res, &e);
  if (rc == ERR_OK) {
    for (int i = 0, base = 0; i < b->njobs; base += b->jobs[i]->spec.batch, i++)
      write_results(b, base, b->jobs[i], &req.r, ar.images ? ar.images : res.images, d_image);
  } else {
    fail_batch(b, rc, &e);
  }
  batch_arrays_free(&arrays);
  qrequest_free(&req);
  pipeline_result_clear(&res);
  model_free(own);
  free(ar.noise);
  free(ar.images);
}
