/* The classifier verdicts the adjoint tasks aim at: parsing "K,italic" or "fg=red" into (head,
 * class) targets and measuring how often generated images agree with them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "adjtask.h"
#include "margin.h"

/* One item: HEAD=LABEL, or LABEL in "char" first, else in the only other head that has it. */
static int parse_item(const classifier *c, const char *item, adjtask_target *t, err *e) {
  const char *eq = strchr(item, '=');
  if (eq) {
    char head[64];
    snprintf(head, sizeof head, "%.*s", (int)(eq - item), item);
    if ((t->head = classifier_head_index(c, head)) < 0)
      return err_set(e, ERR_INVALID, "target '%s': the classifier has no head '%s'", item, head);
    if ((t->cls = classifier_class_index(c, t->head, eq + 1)) < 0)
      return err_set(e, ERR_INVALID, "target '%s': '%s' is not a class of the head '%s'", item,
                     eq + 1, head);
    return ERR_OK;
  }
  const int ch = classifier_head_index(c, "char");
  if (ch >= 0 && (t->cls = classifier_class_index(c, ch, item)) >= 0) {
    t->head = ch;
    return ERR_OK;
  }
  const classifier_info *ci = classifier_get_info(c);
  int found = 0;
  for (int h = 0; h < ci->n_heads; h++) {
    const int k = h == ch || !ci->heads[h].labels ? -1 : classifier_class_index(c, h, item);
    if (k >= 0 && found++ == 0)
      *t = (adjtask_target){.head = h, .cls = k};
    else if (k >= 0)
      return err_set(e, ERR_INVALID,
                     "target '%s': several heads have that class ('%s', '%s'): write HEAD=%s", item,
                     ci->heads[t->head].name, ci->heads[h].name, item);
  }
  if (!found)
    return err_set(e, ERR_INVALID, "target '%s': no head of the classifier has that class", item);
  return ERR_OK;
}

int adjtask_parse_targets(const classifier *c, const char *spec, adjtask_target *out, int *n,
                          err *e) {
  *n = 0;
  if (!spec || !*spec)
    return err_set(e, ERR_INVALID, "target: give a class such as K, italic or fg=red");
  const char *p = spec;
  for (;;) {
    const size_t len = strcspn(p, ",");
    char item[160];
    if (len == 0 || len >= sizeof item)
      return err_set(e, ERR_INVALID, "target '%s': empty or too long item", spec);
    snprintf(item, sizeof item, "%.*s", (int)len, p);
    if (*n == ADJTASK_MAX_TARGETS)
      return err_set(e, ERR_INVALID, "target '%s': at most %d items", spec, ADJTASK_MAX_TARGETS);
    int rc = parse_item(c, item, &out[*n], e);
    if (rc)
      return rc;
    for (int i = 0; i < *n; i++)
      if (out[i].head == out[*n].head)
        return err_set(e, ERR_INVALID, "target '%s': the head '%s' is named twice", spec,
                       classifier_get_info(c)->heads[out[i].head].name);
    (*n)++;
    if (!p[len])
      return ERR_OK;
    p += len + 1;
  }
}

void adjtask_targets_str(const classifier *c, const adjtask_target *t, int n, char *buf,
                         size_t len) {
  const classifier_info *ci = classifier_get_info(c);
  size_t at = 0;
  buf[0] = 0;
  for (int i = 0; i < n && at < len; i++) {
    const classifier_head *h = &ci->heads[t[i].head];
    char cls[24];
    snprintf(cls, sizeof cls, "%d", t[i].cls);
    const int w = snprintf(buf + at, len - at, "%s%s=%s", i ? "," : "", h->name,
                           h->labels ? h->labels[t[i].cls] : cls);
    at += w > 0 ? (size_t)w : 0;
  }
}

int adjtask_verdict(const classifier *clf, const float *logits, const adjtask_target *t, int nt) {
  const classifier_info *ci = classifier_get_info(clf);
  int ok = 1;
  for (int k = 0; k < nt; k++) {
    const classifier_head *h = &ci->heads[t[k].head];
    const float *l = logits + h->offset;
    int best = 0;
    for (int c = 1; c < h->classes; c++)
      best = l[c] > l[best] ? c : best;
    ok = ok && best == t[k].cls;
  }
  return ok;
}

int adjtask_generate_logits(const model *m, const adjtask_gen *g, const classifier *clf,
                            const int64_t *labels, int n, uint64_t seed, uint64_t first,
                            float *logits, err *e) {
  const model_info *mi = model_get_info(m);
  const classifier_info *ci = classifier_get_info(clf);
  const int S = mi->sample_size, chunk = 16;
  const size_t d = (size_t)mi->in_channels * S * S;
  float *x = malloc((size_t)chunk * d * sizeof(float));
  int rc = x ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int at = 0; rc == ERR_OK && at < n; at += chunk) {
    const int b = n - at < chunk ? n - at : chunk;
    const sampler_run_opts ro = {.batch = b,
                                 .seed = seed,
                                 .first_image = first + (uint64_t)at,
                                 .labels = labels + at,
                                 .guidance = g->gd,
                                 .cancel = g->cancel,
                                 .threads = g->threads};
    rc = sampler_run(g->s, m, &ro, x, NULL, e);
    if (rc == ERR_OK)
      rc = classifier_run(clf, x, b, S, S, logits + (size_t)at * ci->n_logits, NULL, g->threads, e);
  }
  free(x);
  return rc;
}

int adjtask_agreement(const model *m, const adjtask_gen *g, const classifier *clf,
                      const adjtask_target *t, int nt, int64_t label, int n, uint64_t seed,
                      uint64_t first, int *agreed, err *e) {
  *agreed = 0;
  const int nl = classifier_get_info(clf)->n_logits;
  float *logits = malloc((size_t)n * nl * sizeof(float));
  int64_t *labels = malloc((size_t)n * sizeof *labels);
  int rc = logits && labels ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; rc == ERR_OK && i < n; i++)
    labels[i] = label;
  if (rc == ERR_OK)
    rc = adjtask_generate_logits(m, g, clf, labels, n, seed, first, logits, e);
  for (int i = 0; rc == ERR_OK && i < n; i++)
    *agreed += adjtask_verdict(clf, logits + (size_t)i * nl, t, nt);
  free(logits);
  free(labels);
  return rc;
}

double adjtask_margin_loss(const classifier *clf, const float *z, const adjtask_target *t, int nt,
                           double margin, double scale, float *g) {
  const classifier_info *ci = classifier_get_info(clf);
  double loss = 0;
  for (int k = 0; k < nt; k++) {
    const classifier_head *h = &ci->heads[t[k].head];
    const float *l = z + h->offset;
    const int c0 = t[k].cls;
    double other = -INFINITY, mx = -INFINITY, sum = 0;
    for (int c = 0; c < h->classes; c++)
      other = c != c0 && l[c] > other ? l[c] : other;
    if (l[c0] - other >= margin)
      continue; /* saturated */
    for (int c = 0; c < h->classes; c++)
      mx = fmax(mx, l[c] - (c == c0 ? margin : 0.0));
    for (int c = 0; c < h->classes; c++)
      sum += exp(l[c] - (c == c0 ? margin : 0.0) - mx);
    loss += mx + log(sum) - (l[c0] - margin);
    for (int c = 0; c < h->classes; c++) {
      const double p = exp(l[c] - (c == c0 ? margin : 0.0) - mx) / sum;
      g[h->offset + c] += (float)(scale * (p - (c == c0)));
    }
  }
  return scale * loss;
}

double adjtask_lr(double lr, int step, int steps) {
  return lr * (0.1 + 0.45 * (1 + cos(M_PI * step / steps)));
}

int adjtask_check_classifier(const model *m, const classifier *clf, err *e) {
  const model_info *mi = model_get_info(m);
  const classifier_info *ci = classifier_get_info(clf);
  if (ci->in_channels != mi->in_channels || ci->sample_size != mi->sample_size)
    return err_set(e, ERR_INVALID,
                   "the classifier reads %d x %d x %d images, the model makes %d x %d x %d",
                   ci->in_channels, ci->sample_size, ci->sample_size, mi->in_channels,
                   mi->sample_size, mi->sample_size);
  return ERR_OK;
}

int adjtask_adjoint(const adjtask_gen *g, const model *m, int batch, const float *noise,
                    const int64_t *labels, const float *gout, adjoint_opts *ao, err *e) {
  ao->batch = batch;
  ao->noise = noise;
  ao->labels = labels;
  ao->guidance = g->gd;
  ao->grad_output = gout;
  ao->threads = g->threads;
  ao->cancel = g->cancel;
  return adjoint_run(g->s, m, ao, e);
}
