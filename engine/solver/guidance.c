/* Classifier-free guidance (Ho & Salimans 2022) over model_run: one call of batch 2 n with the
 * images' labels and the null label, combined in float32 in diffusers' order
 * (uncond + g * (cond - uncond)), so results match its pipelines to rounding. */
#include "guidance.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

guidance guidance_for(const model *m, double scale) {
  guidance g = {.enabled = 1, .scale = scale, .null_label = model_get_info(m)->null_class};
  return g;
}

int guidance_check(const guidance *g, const model *m, err *e) {
  if (!g || !g->enabled)
    return ERR_OK;
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "guidance_scale: classifier-free guidance needs a class-conditional model");
  if (!isfinite(g->scale) || g->scale < 0 || g->scale > GUIDANCE_MAX_SCALE)
    return err_set(e, ERR_INVALID, "guidance_scale %g must be in [0, %g]", g->scale,
                   GUIDANCE_MAX_SCALE);
  const int64_t lo = mi->kind == MODEL_GAUSSIAN_MIXTURE ? INT64_MIN : 0;
  if (g->null_label < lo || g->null_label >= mi->num_classes)
    return err_set(e, ERR_INVALID, "null_class %lld is not a label of this model (%d classes)",
                   (long long)g->null_label, mi->num_classes);
  return ERR_OK;
}

int guidance_passes(const guidance *g) {
  return g && g->enabled && g->scale != 1.0 && g->scale != 0.0 ? 2 : 1;
}

static int guided_run(const guidance *g, const model *m, const model_call *c, float *out, err *e);

int guidance_eval(const guidance *g, const model *m, const model_call *c, float *out, err *e) {
  const int guided = g && g->enabled && g->scale != 1.0;
  int rc = guided ? guided_run(g, m, c, out, e) : model_run(m, c, out, e);
  if (rc != ERR_OK)
    return rc;
  const model_info *mi = model_get_info(m);
  if (!ops_all_finite(out, (size_t)c->n * mi->out_channels * c->h * c->w))
    return guided && g->scale != 0.0
               ? err_set(e, ERR_NUMERIC, "non-finite values in the guidance output (scale %g)",
                         g->scale)
               : err_set(e, ERR_NUMERIC, "non-finite values in the model output");
  return ERR_OK;
}

static int guided_run(const guidance *g, const model *m, const model_call *c, float *out, err *e) {
  if (!c->labels)
    return err_set(e, ERR_INVALID, "classifier-free guidance needs class labels");
  const model_info *mi = model_get_info(m);
  const int n = c->n;
  const size_t din = (size_t)mi->in_channels * c->h * c->w;
  const size_t dout = (size_t)mi->out_channels * c->h * c->w;
  const size_t nb = (size_t)n;
  /* g = 0 is the unconditional model: u + 0 (c - u) == u, so one pass gives the same floats */
  if (g->scale == 0.0) {
    int64_t *nl = malloc(nb * sizeof *nl);
    if (!nl)
      return err_set(e, ERR_NOMEM, "out of memory");
    for (size_t b = 0; b < nb; b++)
      nl[b] = g->null_label;
    model_call u = *c;
    u.labels = nl;
    int rc = model_run(m, &u, out, e);
    free(nl);
    return rc;
  }
  float *x2 = malloc(2 * nb * din * sizeof *x2), *o2 = malloc(2 * nb * dout * sizeof *o2);
  float *t2 = malloc(2 * nb * sizeof *t2);
  int64_t *l2 = malloc(2 * nb * sizeof *l2);
  /* the image conditioning stays in both passes: guidance is over the class only */
  const size_t dc = (size_t)mi->cond_channels * c->h * c->w;
  float *c2 = c->cond ? malloc(2 * nb * dc * sizeof *c2) : NULL;
  int rc = ERR_OK;
  if (!x2 || !o2 || !t2 || !l2 || (c->cond && !c2)) {
    rc = err_set(e, ERR_NOMEM, "out of memory for a guided batch of %d", n);
    goto done;
  }
  /* conditional rows first, then unconditional: the model's result per row does not depend on
   * the batch, so the order is free */
  memcpy(x2, c->x, nb * din * sizeof *x2);
  memcpy(x2 + nb * din, c->x, nb * din * sizeof *x2);
  if (c2) {
    memcpy(c2, c->cond, nb * dc * sizeof *c2);
    memcpy(c2 + nb * dc, c->cond, nb * dc * sizeof *c2);
  }
  for (size_t b = 0; b < nb; b++) {
    t2[b] = t2[nb + b] = c->t[b];
    l2[b] = c->labels[b];
    l2[nb + b] = g->null_label;
  }
  model_call both = *c;
  both.x = x2;
  both.n = 2 * n;
  both.t = t2;
  both.labels = l2;
  both.cond = c2;
  if ((rc = model_run(m, &both, o2, e)) != ERR_OK)
    goto done;
  if (!ops_all_finite(o2, 2 * nb * dout)) {
    rc = err_set(e, ERR_NUMERIC, "non-finite values in the model output");
    goto done;
  }
  const float s = (float)g->scale;
  const size_t dg = din < dout ? din : dout; /* the guided (prediction) part of each row */
  for (size_t b = 0; b < nb; b++) {
    const float *co = o2 + b * dout, *u = o2 + (nb + b) * dout;
    float *o = out + b * dout;
    for (size_t k = 0; k < dg; k++)
      o[k] = u[k] + s * (co[k] - u[k]);
    memcpy(o + dg, co + dg, (dout - dg) * sizeof *o);
  }
done:
  free(x2);
  free(o2);
  free(t2);
  free(l2);
  free(c2);
  return rc;
}

/* ---- classifier guidance ---- */

int classifier_guidance_check(const classifier_guidance *cg, const model *m, int h, int w,
                              int batch, err *e) {
  if (!cg)
    return ERR_OK;
  const model_info *mi = model_get_info(m);
  if (!cg->clf || !cg->target)
    return err_set(e, ERR_INVALID, "classifier guidance needs a classifier and targets");
  const classifier_info *ci = classifier_get_info(cg->clf);
  if (ci->in_channels != mi->in_channels || ci->sample_size != h || ci->sample_size != w)
    return err_set(e, ERR_INVALID,
                   "classifier: it reads %d-channel %dx%d images, the model makes %d-channel "
                   "%dx%d ones",
                   ci->in_channels, ci->sample_size, ci->sample_size, mi->in_channels, h, w);
  if (!isfinite(cg->scale) || cg->scale < 0 || cg->scale > GUIDANCE_MAX_SCALE)
    return err_set(e, ERR_INVALID, "classifier.scale %g must be in [0, %g]", cg->scale,
                   GUIDANCE_MAX_SCALE);
  if (cg->head < 0 || cg->head >= ci->n_heads)
    return err_set(e, ERR_INVALID, "classifier.head %d is not a head of the classifier", cg->head);
  const classifier_head *hd = &ci->heads[cg->head];
  for (int b = 0; b < batch; b++)
    if (cg->target[b] < 0 || cg->target[b] >= hd->classes)
      return err_set(e, ERR_INVALID, "classifier.target %lld is not a class of head '%s' (0..%d)",
                     (long long)cg->target[b], hd->name, hd->classes - 1);
  return ERR_OK;
}

int classifier_guidance_apply(const classifier_guidance *cg, const float *x, float *eps, int n,
                              int h, int w, const double *abar, int threads, err *e) {
  const size_t d = (size_t)classifier_get_info(cg->clf)->in_channels * h * w;
  float *x0 = malloc((size_t)n * d * sizeof *x0), *g = malloc((size_t)n * d * sizeof *g);
  int rc = x0 && g ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for classifier guidance");
  for (int b = 0; rc == ERR_OK && b < n; b++) {
    const float alpha = (float)sqrt(abar[b]), sigma = (float)sqrt(1.0 - abar[b]);
    for (size_t k = 0; k < d; k++) {
      const float v = (x[b * d + k] - sigma * eps[b * d + k]) / alpha;
      x0[b * d + k] = v;
    }
  }
  /* the classifier reads the clipped estimate; x0 keeps the unclipped one for the mask */
  float *c = rc == ERR_OK ? malloc((size_t)n * d * sizeof *c) : NULL;
  if (rc == ERR_OK && !c)
    rc = err_set(e, ERR_NOMEM, "out of memory for classifier guidance");
  for (size_t k = 0; rc == ERR_OK && k < (size_t)n * d; k++)
    c[k] = fminf(fmaxf(x0[k], -1.0f), 1.0f);
  if (rc == ERR_OK)
    rc = classifier_log_prob_grad(cg->clf, c, n, h, w, cg->head, cg->target, NULL, g, threads, e);
  for (int b = 0; rc == ERR_OK && b < n; b++) {
    const float alpha = (float)sqrt(abar[b]), sigma = (float)sqrt(1.0 - abar[b]);
    const float k_s = (float)cg->scale * sigma / alpha;
    for (size_t k = 0; k < d; k++)
      if (fabsf(x0[b * d + k]) <= 1.0f)
        eps[b * d + k] -= k_s * g[b * d + k];
  }
  free(x0);
  free(g);
  free(c);
  return rc == ERR_OK ? ERR_OK : err_prefix(e, "classifier guidance");
}
