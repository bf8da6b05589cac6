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
  int rc = ERR_OK;
  if (!x2 || !o2 || !t2 || !l2) {
    rc = err_set(e, ERR_NOMEM, "out of memory for a guided batch of %d", n);
    goto done;
  }
  /* conditional rows first, then unconditional: the model's result per row does not depend on
   * the batch, so the order is free */
  memcpy(x2, c->x, nb * din * sizeof *x2);
  memcpy(x2 + nb * din, c->x, nb * din * sizeof *x2);
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
  return rc;
}
