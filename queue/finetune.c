/* A fine-tuning job's training (QUEUE_EDIT_FINETUNE) on its pool thread: the images the API
 * checked decoded again, a private copy of the job's model trained by the engine's trainer with
 * the authors' recipe (DomainStudio with a second, frozen copy of the served folder as the
 * source, or plain fine-tuning), a progress event per step and the cancel looked at before
 * each, then the adapted model published under the job's name. A run stopped by a shutdown is
 * queued again and starts over: the result depends only on the request (seeded). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "image.h"
#include "mem.h"
#include "train.h"

/* The training images (n x c x h x w in [-1, 1]) and their labels (NULL: unconditional). */
typedef struct ft_data {
  int n, c, h, w;
  float *x;
  int64_t *labels;
} ft_data;

static void ft_data_free(ft_data *d) {
  free(d->x);
  free(d->labels);
}

static int ft_decode(const json_t *imgs, const model_info *mi, ft_data *d, err *e) {
  d->n = (int)json_array_size(imgs);
  d->c = mi->in_channels, d->h = d->w = mi->sample_size;
  const size_t per = (size_t)d->c * d->h * d->w;
  if (d->n < 1)
    return err_set(e, ERR_INVALID, "no images");
  d->x = mem_malloc((size_t)d->n * per * sizeof *d->x);
  d->labels = mi->num_classes ? mem_malloc((size_t)d->n * sizeof *d->labels) : NULL;
  if (!d->x || (mi->num_classes && !d->labels))
    return err_set(e, ERR_NOMEM, "out of memory for %d images", d->n);
  int rc = ERR_OK;
  for (int i = 0; rc == ERR_OK && i < d->n; i++) {
    const json_t *it = json_array_get(imgs, (size_t)i);
    const char *b64 = json_string_value(json_object_get(it, "image"));
    uint8_t *png = NULL;
    size_t len = 0;
    char field[64];
    snprintf(field, sizeof field, "edit.images[%d].image", i);
    rc = !b64 ? err_set(e, ERR_FORMAT, "%s: missing", field)
         : base64_decode(b64, strlen(b64), &png, &len) != 0
             ? err_set(e, ERR_FORMAT, "%s: not base64", field)
             : ERR_OK;
    if (rc == ERR_OK)
      rc = image_from_png(png, len, field, d->c, d->h, d->w, d->x + (size_t)i * per, e);
    free(png);
    if (d->labels)
      d->labels[i] = json_integer_value(json_object_get(it, "label"));
  }
  return rc;
}

/* The trainer of m with the job's method and settings (source: DomainStudio's frozen copy). */
static int ft_trainer(qbatch *b, model *m, const model *source, trainer **t, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  /* the model's training schedule; without a scheduler_config.json, DDPMScheduler's defaults
   * (as `denoised finetune` and the sampler take them) */
  const json_t *sj = model_scheduler_config(b->qm->m);
  sched_config sc;
  int rc =
      sj ? sched_config_from_json(sj, NULL, 0, &sc, e) : sched_config_init(&sc, "DDPMScheduler", e);
  if (rc)
    return err_prefix(e, "the model's scheduler config");
  const train_config tc = {.prediction = sc.prediction_type,
                           .lr_kind = TRAIN_LR_CONSTANT,
                           .lr = json_number_value(json_object_get(a, "lr")),
                           .total_steps = (long)json_integer_value(json_object_get(a, "steps")),
                           .adamw = {DSTUDIO_RECIPE_BETA1, DSTUDIO_RECIPE_BETA2, 1e-8, 0},
                           .seed = sp->seed,
                           .threads = b->q->o.threads_per_job,
                           .source = source,
                           .dstudio = {json_number_value(json_object_get(a, "pair_weight")),
                                       json_number_value(json_object_get(a, "hf_pair_weight")),
                                       json_number_value(json_object_get(a, "hf_mse_weight"))}};
  rc = trainer_new(m, &sc, &tc, t, e);
  sched_config_free(&sc);
  return rc;
}

/* The steps, each on a batch drawn from the seed (an epoch is a permutation of the images). */
static int ft_train(qbatch *b, trainer *t, const ft_data *d, err *e) {
  const queue_spec *sp = &b->jobs[0]->spec;
  const json_t *a = sp->edit_args;
  const int batch = (int)json_integer_value(json_object_get(a, "batch"));
  const long steps = (long)json_integer_value(json_object_get(a, "steps"));
  const size_t per = (size_t)d->c * d->h * d->w;
  float *x = mem_malloc((size_t)batch * per * sizeof *x);
  int64_t *idx = mem_malloc((size_t)batch * sizeof *idx);
  int64_t *lab = mem_malloc((size_t)batch * sizeof *lab);
  int rc = x && idx && lab ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for a batch");
  for (long s = 0; rc == ERR_OK && s < steps; s++) {
    if (atomic_load(&b->cancel)) {
      rc = err_set(e, ERR_CANCELLED, "cancelled at step %ld of %ld", s, steps);
      break;
    }
    if ((rc = train_batch_indices(sp->seed, s, batch, d->n, idx, e)))
      break;
    for (int i = 0; i < batch; i++) {
      memcpy(x + (size_t)i * per, d->x + (size_t)idx[i] * per, per * sizeof *x);
      lab[i] = d->labels ? d->labels[idx[i]] : 0;
    }
    train_step_info info;
    rc = trainer_step(t, x, d->labels ? lab : NULL, batch, d->h, d->w, &info, e);
    const pipeline_progress p = {.step = (int)(s + 1), .total = (int)steps};
    if (rc == ERR_OK)
      qworker_progress(&p, b);
  }
  free(x), free(idx), free(lab);
  return rc;
}

int qfinetune_run(qbatch *b, model **own, err *e) {
  const json_t *a = b->jobs[0]->spec.edit_args;
  const int ds = strcmp(json_string_value(json_object_get(a, "method")), "domainstudio") == 0;
  ft_data d = {0};
  model *source = NULL;
  trainer *t = NULL;
  /* the copies come from the folder: the served model may run at another precision */
  int rc = model_load(b->qm->path, own, e);
  if (rc == ERR_OK && ds)
    rc = model_load(b->qm->path, &source, e);
  if (rc == ERR_OK)
    rc = ft_decode(json_object_get(a, "images"), model_get_info(*own), &d, e);
  if (rc == ERR_OK)
    rc = ft_trainer(b, *own, source, &t, e);
  if (rc == ERR_OK)
    rc = ft_train(b, t, &d, e);
  trainer_free(t);
  model_free(source);
  ft_data_free(&d);
  if (rc == ERR_OK)
    rc = qmodel_publish(b->q, b->qm, *own, json_string_value(json_object_get(a, "name")),
                        b->jobs[0]->id, "denoised finetune job", e);
  return rc ? err_prefix(e, "finetune") : ERR_OK;
}
