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
#include "meta.h"
#include "rng.h"

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
  if (!tm || nfe >= sampler_nfe(b->s)) { /* qstate_final (or data-dependent): x is the image */
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
  const double t = qclock_mono(), dt = t - b->t_last;
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
  qhist_observe(&q->step_h, dt);
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
    qjob_emit(q, j, "progress", d, 0);
  }
  if (!live || q->stopping)
    atomic_store(&b->cancel, 1);
  pthread_mutex_unlock(&q->mu);
  free(preview);
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
      char *rec = j->state == QUEUE_RUNNING ? qjob_finish(q, j, QUEUE_FAILED, e.msg, &rl) : NULL;
      pthread_mutex_unlock(&q->mu);
      qlog(q, QUEUE_LOG_ERROR, j->id, "%s", e.msg);
      if (rec)
        qjob_persist(q, j->id, rec, rl);
      json_decref(extra);
      return;
    }
    j->files = i + 1;
    if (j->state == QUEUE_RUNNING && i < j->spec.batch - 1) {
      /* the last image's event waits for the directory sync above */
      j->images = i + 1;
      char url[256];
      snprintf(url, sizeof url, "%s%s/images/%d", q->url_prefix, j->id, i);
      qjob_emit(q, j, "image",
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
    qjob_emit(q, j, "image",
              json_pack("{s:i, s:s, s:I}", "index", i, "url", url, "image_index",
                        (json_int_t)(j->spec.first_image + (uint64_t)i)),
              1);
    q->images_generated += (uint64_t)j->images;
    rec = qjob_finish(q, j, QUEUE_SUCCEEDED, NULL, &rl);
  }
  pthread_mutex_unlock(&q->mu);
  if (rec)
    qjob_persist(q, j->id, rec, rl);
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

/* Before any compute: each job's record with its attempts count goes to the store, so a run that
 * kills the process is counted at the next start (recovery fails the job after max_attempts). */
static void persist_attempts(qbatch *b) {
  queue *q = b->q;
  char *recs[b->njobs];
  size_t lens[b->njobs];
  pthread_mutex_lock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    recs[i] = qjob_record(b->jobs[i], &lens[i]);
  pthread_mutex_unlock(&q->mu);
  for (int i = 0; i < b->njobs; i++)
    if (recs[i])
      qjob_persist(q, b->jobs[i]->id, recs[i], lens[i]);
  for (int i = 0; i < b->njobs; i++)
    if (q->fault_crash_seed && b->jobs[i]->spec.seed == q->fault_crash_seed)
      abort();
}

void qworker_run(uv_work_t *w) {
  qbatch *b = w->data;
  queue *q = b->q;
  qjob *head = b->jobs[0];
  persist_attempts(b);
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
      edit_job_kind ? ERR_OK : qmodel_sampler(b->qm, &head->spec, &b->s, field, sizeof field, &e);
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
    b->t_start = b->t_last = qclock_mono();
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
    int failed[b->njobs];
    pthread_mutex_lock(&q->mu);
    for (int i = 0; i < b->njobs; i++) {
      qjob *j = b->jobs[i];
      recs[i] = NULL;
      failed[i] = 0;
      if (j->state != QUEUE_RUNNING)
        continue;
      if (rc == ERR_CANCELLED && q->stopping) {
        /* shutdown: the store still says queued, so it runs again after a restart */
        j->state = QUEUE_QUEUED;
        j->step = j->nfe = 0;
        j->attempts--; /* stopped, not crashed: this run does not count */
        qjob_emit(q, j, "queued", json_pack("{s:s}", "reason", "shutdown"), 1);
        recs[i] = qjob_record(j, &lens[i]);
      } else {
        recs[i] = qjob_finish(q, j, QUEUE_FAILED, e.msg, &lens[i]);
        failed[i] = 1;
      }
    }
    pthread_mutex_unlock(&q->mu);
    for (int i = 0; i < b->njobs; i++)
      if (recs[i]) {
        if (failed[i])
          qlog(q, QUEUE_LOG_WARN, b->jobs[i]->id, "failed: %s", e.msg);
        qjob_persist(q, b->jobs[i]->id, recs[i], lens[i]);
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
