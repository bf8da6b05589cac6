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
  if (mi->cross_attention_dim && (!g->uncond_states || g->seq_len < 1))
    return err_set(e, ERR_INVALID,
                   "negative_prompt: guidance of a text-conditional model needs the hidden "
                   "states of an unconditional (empty or negative) prompt");
  if (!mi->cross_attention_dim && !mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "guidance_scale: classifier-free guidance needs a class-conditional model");
  if (!isfinite(g->scale) || g->scale < 0 || g->scale > GUIDANCE_MAX_SCALE)
    return err_set(e, ERR_INVALID, "guidance_scale %g must be in [0, %g]", g->scale,
                   GUIDANCE_MAX_SCALE);
  if (mi->cross_attention_dim)
    return ERR_OK; /* labels, if the UNet also takes classes, are the caller's */
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

/* The unconditional rows' labels (the null label for every image; NULL without labels, caller
 * frees), after checking that the unconditional hidden states fit the call's. */
static int uncond_rows(const guidance *g, const model_call *c, int n, int64_t **labels, err *e) {
  *labels = NULL;
  if (c->labels && !(*labels = malloc((size_t)n * sizeof **labels)))
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int b = 0; c->labels && b < n; b++)
    (*labels)[b] = g->null_label;
  if (!c->encoder_hidden_states)
    return ERR_OK;
  if (!g->uncond_states || g->seq_len != c->seq_len)
    return err_set(e, ERR_INVALID,
                   "guidance: the unconditional prompt's hidden states (%d tokens) do not match "
                   "the prompt's (%d)",
                   g->seq_len, c->seq_len);
  return ERR_OK;
}

/* A batch's hidden states, then n copies of one unconditional sequence of `per` values. */
static float *stack_states(const float *first, int nfirst, const float *row, int n, size_t per) {
  float *s = malloc(((size_t)nfirst + (size_t)n) * per * sizeof *s);
  if (!s)
    return NULL;
  if (nfirst)
    memcpy(s, first, (size_t)nfirst * per * sizeof *s);
  for (int b = 0; b < n; b++)
    memcpy(s + ((size_t)nfirst + (size_t)b) * per, row, per * sizeof *s);
  return s;
}

static int guided_run(const guidance *g, const model *m, const model_call *c, float *out, err *e) {
  if (!c->labels && !c->encoder_hidden_states)
    return err_set(e, ERR_INVALID, "classifier-free guidance needs class labels or a prompt");
  const model_info *mi = model_get_info(m);
  const int n = c->n;
  const size_t din = (size_t)mi->in_channels * c->h * c->w;
  const size_t dout = (size_t)mi->out_channels * c->h * c->w;
  const size_t per = (size_t)c->seq_len * (size_t)mi->cross_attention_dim;
  const size_t nb = (size_t)n;
  int64_t *nl = NULL;
  float *ns = NULL;
  int rc = uncond_rows(g, c, n, &nl, e);
  if (rc != ERR_OK)
    return rc;
  /* g = 0 is the unconditional model: u + 0 (c - u) == u, so one pass gives the same floats */
  if (g->scale == 0.0) {
    model_call u = *c;
    u.labels = nl;
    if (c->encoder_hidden_states &&
        !(u.encoder_hidden_states = ns = stack_states(NULL, 0, g->uncond_states, n, per)))
      rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == ERR_OK)
      rc = model_run(m, &u, out, e);
    free(nl);
    free(ns);
    return rc;
  }
  float *x2 = malloc(2 * nb * din * sizeof *x2), *o2 = malloc(2 * nb * dout * sizeof *o2);
  float *t2 = malloc(2 * nb * sizeof *t2);
  int64_t *l2 = c->labels ? malloc(2 * nb * sizeof *l2) : NULL;
  /* the image conditioning stays in both passes: guidance is over the class only */
  const size_t dc = (size_t)mi->cond_channels * c->h * c->w;
  float *c2 = c->cond ? malloc(2 * nb * dc * sizeof *c2) : NULL;
  float *s2 = c->encoder_hidden_states
                  ? stack_states(c->encoder_hidden_states, n, g->uncond_states, n, per)
                  : NULL;
  if (!x2 || !o2 || !t2 || (c->labels && !l2) || (c->cond && !c2) ||
      (c->encoder_hidden_states && !s2)) {
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
    if (l2) {
      l2[b] = c->labels[b];
      l2[nb + b] = nl[b];
    }
  }
  model_call both = *c;
  both.x = x2;
  both.n = 2 * n;
  both.t = t2;
  both.labels = l2;
  both.cond = c2;
  both.encoder_hidden_states = s2;
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
  free(s2);
  free(nl);
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
