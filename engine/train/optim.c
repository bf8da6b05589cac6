/* AdamW and the EMA of weights, in the arithmetic order of torch.optim.AdamW's single-tensor
 * path and diffusers' EMAModel.step, so a fixture from either matches to float round-off. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

struct adamw {
  adamw_config c;
  int n;
  size_t *counts;
  float **m, **v;
  long steps;
};

void adamw_free(adamw *o) {
  if (!o)
    return;
  for (int i = 0; i < o->n; i++) {
    if (o->m)
      free(o->m[i]);
    if (o->v)
      free(o->v[i]);
  }
  free(o->m);
  free(o->v);
  free(o->counts);
  free(o);
}

int adamw_new(const adamw_config *c, int ntensors, const size_t *counts, adamw **out, err *e) {
  *out = NULL;
  if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
    return err_set(e, ERR_INVALID, "AdamW: betas must be in [0, 1)");
  if (!(c->eps > 0) || !isfinite(c->eps))
    return err_set(e, ERR_INVALID, "AdamW: eps must be positive");
  if (!(c->weight_decay >= 0) || !isfinite(c->weight_decay))
    return err_set(e, ERR_INVALID, "AdamW: weight_decay must be >= 0");
  if (ntensors < 0 || (ntensors > 0 && !counts))
    return err_set(e, ERR_INVALID, "AdamW: bad tensor list");
  adamw *o = mem_calloc(1, sizeof *o);
  if (!o)
    return err_set(e, ERR_NOMEM, "out of memory");
  o->c = *c;
  o->n = ntensors;
  o->counts = mem_calloc((size_t)ntensors + 1, sizeof *o->counts);
  o->m = mem_calloc((size_t)ntensors + 1, sizeof *o->m);
  o->v = mem_calloc((size_t)ntensors + 1, sizeof *o->v);
  int ok = o->counts && o->m && o->v;
  for (int i = 0; ok && i < ntensors; i++) {
    o->counts[i] = counts[i];
    o->m[i] = mem_calloc(counts[i] + 1, sizeof(float));
    o->v[i] = mem_calloc(counts[i] + 1, sizeof(float));
    ok = o->m[i] && o->v[i];
  }
  if (!ok) {
    adamw_free(o);
    return err_set(e, ERR_NOMEM, "out of memory for the optimizer's state");
  }
  *out = o;
  return ERR_OK;
}

int adamw_step(adamw *o, float *const *params, const float *const *grads, double lr, err *e) {
  if (!(lr >= 0) || !isfinite(lr))
    return err_set(e, ERR_INVALID, "AdamW: learning rate %g must be finite and >= 0", lr);
  o->steps++;
  /* torch computes these in double (Python floats) and applies them as float32 scalars */
  const double bc1 = 1.0 - pow(o->c.beta1, (double)o->steps);
  const double bc2 = 1.0 - pow(o->c.beta2, (double)o->steps);
  const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
  const float decay = (float)(1.0 - lr * o->c.weight_decay), eps = (float)o->c.eps;
  const float b1 = (float)o->c.beta1, b2 = (float)o->c.beta2;
  const float ob1 = (float)(1.0 - o->c.beta1), ob2 = (float)(1.0 - o->c.beta2);
  for (int i = 0; i < o->n; i++) {
    float *p = params[i], *m = o->m[i], *v = o->v[i];
    const float *g = grads[i];
    for (size_t k = 0; k < o->counts[i]; k++) {
      p[k] *= decay;
      m[k] = m[k] * b1 + g[k] * ob1; /* lerp_(grad, 1 - beta1) */
      v[k] = v[k] * b2 + g[k] * g[k] * ob2;
      float denom = sqrtf(v[k]) / bc2_sqrt + eps;
      p[k] -= step_size * (m[k] / denom);
    }
  }
  return ERR_OK;
}

long adamw_steps(const adamw *o) {
  return o->steps;
}

float *adamw_moment(adamw *o, int which, int i) {
  if (i < 0 || i >= o->n || (which != 0 && which != 1))
    return NULL;
  return which ? o->v[i] : o->m[i];
}

void adamw_set_steps(adamw *o, long steps) {
  o->steps = steps;
}

double ema_decay(const ema_config *c, long optimization_step) {
  double step = (double)(optimization_step - c->update_after_step - 1);
  if (step < 0)
    step = 0;
  if (step <= 0)
    return 0.0;
  double d = c->use_warmup ? 1.0 - pow(1.0 + step / c->inv_gamma, -c->power)
                           : (1.0 + step) / (10.0 + step);
  d = d < c->decay ? d : c->decay;
  return d > c->min_decay ? d : c->min_decay;
}

double ema_update(const ema_config *c, long optimization_step, int ntensors, const size_t *counts,
                  float *const *shadow, const float *const *params) {
  double d = ema_decay(c, optimization_step);
  const float one_minus = (float)(1.0 - d);
  for (int i = 0; i < ntensors; i++)
    for (size_t k = 0; k < counts[i]; k++)
      shadow[i][k] -= one_minus * (shadow[i][k] - params[i][k]);
  return d;
}

double optim_clip_grad_norm(int ntensors, const size_t *counts, float *const *grads,
                            double max_norm) {
  double sum = 0;
  for (int i = 0; i < ntensors; i++) {
    const float *g = grads[i];
    double s = 0;
    for (size_t k = 0; k < counts[i]; k++)
      s += (double)g[k] * g[k];
    sum += s;
  }
  const double norm = sqrt(sum);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
      const float f = (float)coef;
      for (int i = 0; i < ntensors; i++)
        for (size_t k = 0; k < counts[i]; k++)
          grads[i][k] *= f;
    }
  }
  return norm;
}
