/* Concept from a metric (AdjointDPM section 5.1): a class-embedding row learned so that the
 * classifier's verdict holds on what the sampler makes from it. Every step draws fresh noises
 * (a fixed set would be fitted, not the concept), samples them with the very solver and guidance
 * the row will be used with, and moves the row by Adam along the gradient of a margin loss that
 * stops pulling on images already read right by a margin (so the easy images do not drown the
 * hard ones, and the loss cannot be lowered forever by inflating logits). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adjoint.h"
#include "adjtask.h"
#include "margin.h"
#include "optim.h"
#include "rng.h"

typedef struct concept_run {
  const concept_opts *o;
  model *m;
  int S, nl, dim;
  size_t d, nd;
  int64_t labels[ADJTASK_MAX_BATCH];
  float *noise, *x, *logits, *gl, *gx, *gc, *grad;
} concept_run;

/* One step: images from fresh noises, their loss, the row's gradient into r->grad. */
static int step_grad(concept_run *r, int step, concept_progress *p, err *e) {
  const concept_opts *o = r->o;
  for (int b = 0; b < o->batch; b++)
    rng_normal(o->seed, (uint64_t)step * (uint64_t)o->batch + (uint64_t)b, 0,
               r->noise + (size_t)b * r->d, r->d);
  const sampler_run_opts ro = {.batch = o->batch,
                               .init_noise = r->noise,
                               .labels = r->labels,
                               .guidance = o->gen.gd,
                               .cancel = o->gen.cancel,
                               .threads = o->gen.threads};
  int rc = sampler_run(o->gen.s, r->m, &ro, r->x, NULL, e);
  if (rc == ERR_OK)
    rc = classifier_run(o->clf, r->x, o->batch, r->S, r->S, r->logits, NULL, o->gen.threads, e);
  if (rc)
    return rc;
  int agreed = 0, pulling = 0;
  p->loss = 0;
  memset(r->gl, 0, (size_t)o->batch * r->nl * sizeof(float));
  for (int b = 0; b < o->batch; b++) {
    const float *z = r->logits + (size_t)b * r->nl;
    const double l = adjtask_margin_loss(o->clf, z, o->targets, o->n_targets, o->margin,
                                         1.0 / o->batch, r->gl + (size_t)b * r->nl);
    p->loss += l;
    agreed += adjtask_verdict(o->clf, z, o->targets, o->n_targets);
    pulling += l > 0;
  }
  p->agree = (double)agreed / o->batch;
  memset(r->grad, 0, (size_t)r->dim * sizeof(float));
  if (!isfinite(p->loss))
    return err_set(e, ERR_NUMERIC, "concept: the loss is not finite at step %d", step + 1);
  if (!pulling)
    return ERR_OK;
  rc = classifier_input_grad(o->clf, r->x, o->batch, r->S, r->S, r->gl, NULL, r->gx, o->gen.threads,
                             e);
  adjoint_opts ao = {.grad_class = r->gc};
  if (rc == ERR_OK)
    rc = adjtask_adjoint(&o->gen, r->m, o->batch, r->noise, r->labels, r->gx, &ao, e);
  for (int b = 0; rc == ERR_OK && b < o->batch; b++)
    for (int k = 0; k < r->dim; k++)
      r->grad[k] += r->gc[(size_t)b * r->dim + k];
  for (int k = 0; rc == ERR_OK && k < r->dim; k++)
    if (!isfinite(r->grad[k]))
      return err_set(e, ERR_NUMERIC, "concept: the row's gradient is not finite at step %d",
                     step + 1);
  return rc;
}

static int check_opts(const model *m, const concept_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes || !mi->class_embed_dim)
    return err_set(e, ERR_UNSUPPORTED,
                   "concept: the model has no class embeddings (a class-conditional UNet2DModel "
                   "is needed)");
  int rc = adjtask_check_classifier(m, o->clf, e);
  if (rc != ERR_OK)
    return rc;
  if (o->n_targets < 1 || o->n_targets > ADJTASK_MAX_TARGETS)
    return err_set(e, ERR_INVALID, "concept: 1 to %d targets", ADJTASK_MAX_TARGETS);
  if (o->steps < 1 || o->batch < 1 || o->batch > ADJTASK_MAX_BATCH)
    return err_set(e, ERR_INVALID, "concept: steps >= 1 and batch 1..%d", ADJTASK_MAX_BATCH);
  if (!(o->lr > 0 && o->lr <= 10) || !(o->margin >= 0 && o->margin <= 100))
    return err_set(e, ERR_INVALID, "concept: lr in (0, 10] and margin in [0, 100]");
  if (o->label < 0 || o->label >= mi->num_classes || o->label == mi->null_class)
    return err_set(e, ERR_INVALID, "concept: class %lld cannot hold the row", (long long)o->label);
  return adjoint_check_solver(o->gen.s, e);
}

int concept_optimize(model *m, const concept_opts *o, err *e) {
  int rc = check_opts(m, o, e);
  if (rc)
    return rc;
  const model_info *mi = model_get_info(m);
  concept_run r = {.o = o, .m = m, .S = mi->sample_size, .dim = mi->class_embed_dim};
  r.nl = classifier_get_info(o->clf)->n_logits;
  r.d = (size_t)mi->in_channels * r.S * r.S;
  r.nd = (size_t)o->batch * r.d;
  for (int b = 0; b < o->batch; b++)
    r.labels[b] = o->label;
  r.noise = malloc(r.nd * sizeof(float)), r.x = malloc(r.nd * sizeof(float));
  r.gx = malloc(r.nd * sizeof(float));
  r.logits = malloc((size_t)o->batch * r.nl * sizeof(float));
  r.gl = malloc((size_t)o->batch * r.nl * sizeof(float));
  r.gc = malloc((size_t)o->batch * r.dim * sizeof(float));
  r.grad = malloc((size_t)r.dim * sizeof(float));
  float *row = model_class_row(m, o->label);
  adamw *opt = NULL;
  const size_t count = (size_t)r.dim;
  if (!(r.noise && r.x && r.gx && r.logits && r.gl && r.gc && r.grad && row))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  const adamw_config ac = {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0};
  if (rc == ERR_OK)
    rc = adamw_new(&ac, 1, &count, &opt, e);
  for (int step = 0; rc == ERR_OK && step < o->steps; step++) {
    concept_progress p = {.step = step + 1, .total = o->steps};
    rc = step_grad(&r, step, &p, e);
    if (rc == ERR_OK)
      rc = adamw_step(opt, &row, (const float *const *)&r.grad, adjtask_lr(o->lr, step, o->steps),
                      e);
    if (rc == ERR_OK && o->progress)
      o->progress(&p, o->progress_user);
  }
  adamw_free(opt);
  free(r.noise), free(r.x), free(r.gx), free(r.logits), free(r.gl), free(r.gc), free(r.grad);
  return rc;
}

int concept_mean_row(model *m, float *row, err *e) {
  const model_info *mi = model_get_info(m);
  const int base = mi->num_classes - mi->num_embeddings;
  if (!mi->class_embed_dim || base < 2)
    return err_set(e, ERR_UNSUPPORTED, "the model has no class embeddings to average");
  memset(row, 0, (size_t)mi->class_embed_dim * sizeof(float));
  int n = 0;
  for (int c = 0; c < base; c++) {
    const float *r = c == mi->null_class ? NULL : model_class_row(m, c);
    for (int k = 0; r && k < mi->class_embed_dim; k++)
      row[k] += r[k];
    n += r != NULL;
  }
  for (int k = 0; k < mi->class_embed_dim; k++)
    row[k] /= (float)n;
  return ERR_OK;
}
