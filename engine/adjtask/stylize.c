/* Stylization (AdjointDPM section 5.3): the model's weights fine-tuned toward a classifier's
 * attribute verdict (every glyph italic) while the character head goes on reading each image's
 * class, with the weights' gradient through the whole sampling run by the discrete adjoint.
 * Fresh noises every step and classes in turn, so the style is learned for the model, not for
 * a fixed set of images; the keep term is what stops the cheapest way to an attribute verdict
 * (one glyph that is italic whatever the class). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adjoint.h"
#include "adjtask.h"
#include "margin.h"
#include "optim.h"
#include "rng.h"
#include "safetensors.h"

int adjtask_class_map(const model *m, const classifier *clf, int head, int64_t *classes,
                      int *head_cls, int max, int *n, err *e) {
  const model_info *mi = model_get_info(m);
  const int base = mi->num_classes - mi->num_embeddings;
  *n = 0;
  for (int c = 0; c < base && c < mi->n_class_labels && *n < max; c++) {
    const int k = c == mi->null_class ? -1 : classifier_class_index(clf, head, mi->class_labels[c]);
    if (k >= 0)
      classes[*n] = c, head_cls[(*n)++] = k;
  }
  if (!*n)
    return err_set(e, ERR_INVALID,
                   "no class of the model is named like a class of the classifier's head '%s'",
                   classifier_get_info(clf)->heads[head].name);
  return ERR_OK;
}

typedef struct stylize_run {
  const stylize_opts *o;
  model *m;
  int S, nl, np;
  size_t d, nd;
  int64_t labels[ADJTASK_MAX_BATCH];
  adjtask_target keep[ADJTASK_MAX_BATCH];
  float *noise, *x, *logits, *gl, *gx;
  model_grads *g;
  float **params, **grads;
} stylize_run;

/* The step batch's images, loss, verdicts and (unless nothing pulls) the weights' gradient. */
static int step_grad(stylize_run *r, int step, stylize_progress *p, err *e) {
  const stylize_opts *o = r->o;
  for (int b = 0; b < o->batch; b++) {
    const int k = (int)(((uint64_t)step * (uint64_t)o->batch + (uint64_t)b) % o->n_classes);
    r->labels[b] = o->classes[k];
    r->keep[b] = (adjtask_target){.head = o->keep_head, .cls = o->keep_cls[k]};
    rng_normal(o->seed, (uint64_t)step * (uint64_t)o->batch + (uint64_t)b, 0,
               r->noise + (size_t)b * r->d, r->d);
  }
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
  memset(r->gl, 0, (size_t)o->batch * r->nl * sizeof(float));
  int style = 0, kept = 0, pulling = 0;
  p->loss = 0;
  for (int b = 0; b < o->batch; b++) {
    const float *z = r->logits + (size_t)b * r->nl;
    float *g = r->gl + (size_t)b * r->nl;
    const double ls =
        adjtask_margin_loss(o->clf, z, o->targets, o->n_targets, o->margin, 1.0 / o->batch, g);
    const double lk =
        adjtask_margin_loss(o->clf, z, &r->keep[b], 1, o->margin, o->keep_weight / o->batch, g);
    p->loss += ls + lk;
    pulling += ls + lk > 0;
    style += adjtask_verdict(o->clf, z, o->targets, o->n_targets);
    kept += adjtask_verdict(o->clf, z, &r->keep[b], 1);
  }
  p->style = (double)style / o->batch, p->keep = (double)kept / o->batch;
  model_grads_zero(r->g);
  if (!isfinite(p->loss))
    return err_set(e, ERR_NUMERIC, "stylize: the loss is not finite at step %d", step + 1);
  if (!pulling)
    return ERR_OK;
  rc = classifier_input_grad(o->clf, r->x, o->batch, r->S, r->S, r->gl, NULL, r->gx, o->gen.threads,
                             e);
  adjoint_opts ao = {.grad_params = r->g};
  if (rc == ERR_OK)
    rc = adjtask_adjoint(&o->gen, r->m, o->batch, r->noise, r->labels, r->gx, &ao, e);
  for (int i = 0; rc == ERR_OK && i < r->np; i++) {
    const size_t n = model_param_at(r->m, i)->count;
    for (size_t k = 0; k < n; k++)
      if (!isfinite(r->grads[i][k]))
        return err_set(e, ERR_NUMERIC, "stylize: the gradient of '%s' is not finite at step %d",
                       model_param_at(r->m, i)->name, step + 1);
  }
  return rc;
}

static int check_opts(const model *m, const stylize_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  if (mi->kind != MODEL_UNET2D || !model_param_count(m))
    return err_set(e, ERR_UNSUPPORTED, "stylize: only a UNet2DModel's weights are fine-tuned");
  int rc = adjtask_check_classifier(m, o->clf, e);
  if (rc != ERR_OK)
    return rc;
  const classifier_info *ci = classifier_get_info(o->clf);
  if (o->n_targets < 1 || o->n_targets > ADJTASK_MAX_TARGETS || o->n_classes < 1 ||
      o->keep_head < 0 || o->keep_head >= ci->n_heads)
    return err_set(e, ERR_INVALID, "stylize: 1 to %d style targets, classes and a keep head",
                   ADJTASK_MAX_TARGETS);
  for (int k = 0; k < o->n_targets; k++)
    if (o->targets[k].head == o->keep_head)
      return err_set(e, ERR_INVALID,
                     "stylize: the style cannot be a verdict of the head '%s' "
                     "that keeps the class",
                     ci->heads[o->keep_head].name);
  if (o->steps < 1 || o->batch < 1 || o->batch > ADJTASK_MAX_BATCH)
    return err_set(e, ERR_INVALID, "stylize: steps >= 1 and batch 1..%d", ADJTASK_MAX_BATCH);
  if (!(o->lr > 0 && o->lr <= 1) || !(o->margin >= 0 && o->margin <= 100) ||
      !(o->keep_weight >= 0 && o->keep_weight <= 100))
    return err_set(e, ERR_INVALID, "stylize: lr in (0, 1], margin and keep weight in [0, 100]");
  return adjoint_check_solver(o->gen.s, e);
}

int stylize_optimize(model *m, const stylize_opts *o, err *e) {
  int rc = check_opts(m, o, e);
  if (rc)
    return rc;
  const model_info *mi = model_get_info(m);
  stylize_run r = {.o = o, .m = m, .S = mi->sample_size, .np = model_param_count(m)};
  r.nl = classifier_get_info(o->clf)->n_logits;
  r.d = (size_t)mi->in_channels * r.S * r.S;
  r.nd = (size_t)o->batch * r.d;
  r.noise = malloc(r.nd * sizeof(float)), r.x = malloc(r.nd * sizeof(float));
  r.gx = malloc(r.nd * sizeof(float));
  r.logits = malloc((size_t)o->batch * r.nl * sizeof(float));
  r.gl = malloc((size_t)o->batch * r.nl * sizeof(float));
  r.params = calloc((size_t)r.np, sizeof *r.params);
  r.grads = calloc((size_t)r.np, sizeof *r.grads);
  size_t *counts = calloc((size_t)r.np, sizeof *counts);
  adamw *opt = NULL;
  if (!(r.noise && r.x && r.gx && r.logits && r.gl && r.params && r.grads && counts))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = model_grads_new(m, &r.g, e);
  for (int i = 0; rc == ERR_OK && i < r.np; i++) {
    r.params[i] = model_param_at(m, i)->data;
    counts[i] = model_param_at(m, i)->count;
    r.grads[i] = model_grads_at(r.g, i);
  }
  const adamw_config ac = {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0};
  if (rc == ERR_OK)
    rc = adamw_new(&ac, r.np, counts, &opt, e);
  for (int step = 0; rc == ERR_OK && step < o->steps; step++) {
    stylize_progress p = {.step = step + 1, .total = o->steps};
    rc = step_grad(&r, step, &p, e);
    if (rc == ERR_OK)
      rc = adamw_step(opt, r.params, (const float *const *)r.grads,
                      adjtask_lr(o->lr, step, o->steps), e);
    if (rc == ERR_OK)
      rc = model_repack(m, e);
    if (rc == ERR_OK && o->progress)
      o->progress(&p, o->progress_user);
  }
  adamw_free(opt);
  model_grads_free(r.g);
  free(counts), free(r.params), free(r.grads);
  free(r.noise), free(r.x), free(r.gx), free(r.logits), free(r.gl);
  return rc;
}

/* Copies the file from to to (small JSON and weight files). */
static int copy_file(const char *from, const char *to, err *e) {
  FILE *in = fopen(from, "rb");
  if (!in)
    return err_set(e, ERR_IO, "%s: %s", from, strerror(errno));
  FILE *out = fopen(to, "wb");
  if (!out) {
    fclose(in);
    return err_set(e, ERR_IO, "%s: %s", to, strerror(errno));
  }
  char buf[65536];
  size_t n;
  int bad = 0;
  while (!bad && (n = fread(buf, 1, sizeof buf, in)) > 0)
    bad = fwrite(buf, 1, n, out) != n;
  bad = bad || ferror(in);
  fclose(in);
  if (fclose(out) != 0 || bad)
    return err_set(e, ERR_IO, "copying %s to %s failed", from, to);
  return ERR_OK;
}

int adjtask_save_model(const model *m, const char *src_dir, const char *clf_dir, const char *out,
                       const char *const *meta, int nmeta, err *e) {
  char from[4200], to[4200];
  if (mkdir(out, 0777) != 0)
    return err_set(e, ERR_IO, "cannot create %s: %s", out, strerror(errno));
  snprintf(to, sizeof to, "%s/classifier", out);
  if (clf_dir && mkdir(to, 0777) != 0)
    return err_set(e, ERR_IO, "cannot create %s: %s", to, strerror(errno));
  const int np = model_param_count(m);
  st_out_tensor *t = calloc((size_t)np + 1, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < np; i++) {
    const model_param *mp = model_param_at(m, i);
    t[i] = (st_out_tensor){mp->name, mp->ndim, mp->shape, mp->data};
  }
  snprintf(to, sizeof to, "%s/diffusion_pytorch_model.safetensors", out);
  int rc = st_write_f32(to, t, np, meta, nmeta, e);
  free(t);
  const char *files[][2] = {{src_dir, "config.json"},
                            {src_dir, "scheduler_config.json"},
                            {clf_dir, "config.json"},
                            {clf_dir, "model.safetensors"}};
  for (int i = 0; rc == ERR_OK && i < (clf_dir ? 4 : 2); i++) {
    snprintf(from, sizeof from, "%s/%s", files[i][0], files[i][1]);
    snprintf(to, sizeof to, "%s/%s%s", out, i >= 2 ? "classifier/" : "", files[i][1]);
    if (i == 1 && access(from, F_OK) != 0)
      continue; /* a model without one runs on DDPM's defaults, and so will its copy */
    rc = copy_file(from, to, e);
  }
  return rc;
}
