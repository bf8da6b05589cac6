/* The security audit (AdjointDPM section 5.2): adversarial initial noise within an L-infinity
 * box around each image's noise, found by projected sign-gradient ascent (PGD) on
 * -log p(target | sample) with the gradient through the whole sampling run from the discrete
 * adjoint, makes the classifier misread the generated image; the success rate is set against
 * random perturbations of the same size (the box's corners: +-eps in every value), so a high
 * rate says the sampler has directions a classifier-based check can be steered along, not that
 * any noise of that size breaks it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adjoint.h"
#include "adjtask.h"
#include "margin.h"
#include "rng.h"

typedef struct audit_run_t {
  const audit_opts *o;
  const model *m;
  int S, nl, step, total;
  size_t d, nd;
  int64_t labels[ADJTASK_MAX_BATCH], targets[ADJTASK_MAX_BATCH];
  float *noise, *delta, *x, *g, *gz, *logits;
  int correct[ADJTASK_MAX_BATCH], fooled[ADJTASK_MAX_BATCH];
} audit_run_t;

static void report(audit_run_t *r, int misread) {
  const audit_progress p = {.step = ++r->step, .total = r->total, .misread = misread};
  if (r->o->progress)
    r->o->progress(&p, r->o->progress_user);
}

/* Samples noise + delta and reads each image: read[b] = 1 when the head's verdict is the
 * target. */
static int sample_and_read(audit_run_t *r, int *read, err *e) {
  const audit_opts *o = r->o;
  for (size_t k = 0; k < r->nd; k++)
    r->g[k] = r->noise[k] + r->delta[k];
  const sampler_run_opts ro = {.batch = o->batch,
                               .init_noise = r->g,
                               .labels = r->labels,
                               .guidance = o->gen.gd,
                               .cancel = o->gen.cancel,
                               .threads = o->gen.threads};
  int rc = sampler_run(o->gen.s, r->m, &ro, r->x, NULL, e);
  if (rc == ERR_OK)
    rc = classifier_run(o->clf, r->x, o->batch, r->S, r->S, r->logits, NULL, o->gen.threads, e);
  const adjtask_target t = {.head = o->head, .cls = o->target};
  for (int b = 0; rc == ERR_OK && b < o->batch; b++)
    read[b] = adjtask_verdict(o->clf, r->logits + (size_t)b * r->nl, &t, 1);
  return rc;
}

/* One ascent step: the gradient of -log p(target | sample) to the noise, by the adjoint, for
 * the images not fooled yet; delta moves by step along its sign, back into the box. */
static int ascent_step(audit_run_t *r, double eps, double step, err *e) {
  const audit_opts *o = r->o;
  int rc = classifier_log_prob_grad(o->clf, r->x, o->batch, r->S, r->S, o->head, r->targets, NULL,
                                    r->gz, o->gen.threads, e);
  for (size_t k = 0; k < r->nd; k++)
    r->gz[k] = r->fooled[k / r->d] ? 0.0f : -r->gz[k];
  adjoint_opts ao = {.grad_noise = r->gz};
  if (rc == ERR_OK)
    rc = adjtask_adjoint(&o->gen, r->m, o->batch, r->g, r->labels, r->gz, &ao, e);
  for (size_t k = 0; rc == ERR_OK && k < r->nd; k++) {
    if (r->fooled[k / r->d])
      continue;
    const float v = r->delta[k] + (float)step * (r->gz[k] > 0 ? 1.0f : r->gz[k] < 0 ? -1.0f : 0.0f);
    r->delta[k] = fminf(fmaxf(v, (float)-eps), (float)eps);
  }
  return rc;
}

/* The attack at one box size: *succ the images read correctly without it, misread with it. */
static int attack(audit_run_t *r, double eps, int *succ, err *e) {
  const audit_opts *o = r->o;
  memset(r->delta, 0, r->nd * sizeof(float));
  memset(r->fooled, 0, sizeof r->fooled);
  int read[ADJTASK_MAX_BATCH], rc = ERR_OK;
  const double step = 2.5 * eps / (double)o->iters;
  for (int it = 0; rc == ERR_OK && it <= o->iters; it++) {
    rc = sample_and_read(r, read, e);
    int n = 0;
    for (int b = 0; rc == ERR_OK && b < o->batch; b++) {
      r->fooled[b] = r->fooled[b] || (r->correct[b] && !read[b]);
      n += r->fooled[b];
    }
    if (rc == ERR_OK)
      report(r, n);
    *succ = n;
    if (rc == ERR_OK && it < o->iters)
      rc = ascent_step(r, eps, step, e);
  }
  return rc;
}

/* Random corners of the box: misreads of correctly read images over R draws each. */
static int random_baseline(audit_run_t *r, double eps, int *succ, err *e) {
  const audit_opts *o = r->o;
  int read[ADJTASK_MAX_BATCH], rc = ERR_OK;
  *succ = 0;
  for (int k = 0; rc == ERR_OK && k < o->random; k++) {
    for (int b = 0; b < o->batch; b++)
      rng_normal(o->seed + 1, (uint64_t)b, (uint64_t)k + 1, r->delta + (size_t)b * r->d, r->d);
    for (size_t i = 0; i < r->nd; i++)
      r->delta[i] = r->delta[i] >= 0 ? (float)eps : (float)-eps;
    rc = sample_and_read(r, read, e);
    for (int b = 0; rc == ERR_OK && b < o->batch; b++)
      *succ += r->correct[b] && !read[b];
    if (rc == ERR_OK)
      report(r, *succ);
  }
  return rc;
}

static int check_opts(const model *m, const audit_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "the audit needs a class-conditional model (this one has no class embeddings)");
  int rc = adjtask_check_classifier(m, o->clf, e);
  if (rc != ERR_OK)
    return rc;
  const classifier_info *ci = classifier_get_info(o->clf);
  if (o->head < 0 || o->head >= ci->n_heads || o->target < 0 ||
      o->target >= ci->heads[o->head].classes)
    return err_set(e, ERR_INVALID, "audit: no such head or target class");
  if (o->batch < 1 || o->batch > ADJTASK_MAX_BATCH || o->n_eps < 1 || o->n_eps > ADJTASK_MAX_EPS ||
      o->iters < 1 || o->random < 1)
    return err_set(e, ERR_INVALID, "audit: batch 1..%d, 1 to %d box sizes, iters and random >= 1",
                   ADJTASK_MAX_BATCH, ADJTASK_MAX_EPS);
  for (int i = 0; i < o->n_eps; i++)
    if (!(o->eps[i] > 0 && o->eps[i] <= 2))
      return err_set(e, ERR_INVALID, "audit: box size %g is not in (0, 2]", o->eps[i]);
  return adjoint_check_solver(o->gen.s, e);
}

static int run(audit_run_t *r, audit_result *res, err *e) {
  const audit_opts *o = r->o;
  memset(r->delta, 0, r->nd * sizeof(float));
  int rc = sample_and_read(r, r->correct, e);
  res->clean = 0;
  for (int b = 0; b < o->batch; b++)
    res->clean += r->correct[b];
  if (rc == ERR_OK)
    report(r, 0);
  for (int i = 0; rc == ERR_OK && i < o->n_eps; i++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = attack(r, o->eps[i], &res->adversarial[i], e);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    res->seconds[i] = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (rc == ERR_OK && i == o->n_eps - 1) {
      for (size_t k = 0; k < r->nd; k++)
        r->g[k] = r->noise[k] + r->delta[k];
      if (res->noise)
        memcpy(res->noise, r->g, r->nd * sizeof(float));
      if (res->images)
        memcpy(res->images, r->x, r->nd * sizeof(float)); /* the last ascent step's samples */
    }
    if (rc == ERR_OK)
      rc = random_baseline(r, o->eps[i], &res->random[i], e);
  }
  return rc;
}

int audit_run(const model *m, const audit_opts *o, audit_result *res, err *e) {
  int rc = check_opts(m, o, e);
  if (rc)
    return rc;
  const model_info *mi = model_get_info(m);
  audit_run_t r = {.o = o, .m = m, .S = mi->sample_size};
  r.nl = classifier_get_info(o->clf)->n_logits;
  r.d = (size_t)mi->in_channels * r.S * r.S;
  r.nd = (size_t)o->batch * r.d;
  r.total = 1 + o->n_eps * (o->iters + 1 + o->random);
  for (int b = 0; b < o->batch; b++)
    r.labels[b] = o->label, r.targets[b] = o->target;
  r.noise = malloc(r.nd * sizeof(float)), r.delta = malloc(r.nd * sizeof(float));
  r.x = malloc(r.nd * sizeof(float)), r.g = malloc(r.nd * sizeof(float));
  r.gz = malloc(r.nd * sizeof(float));
  r.logits = malloc((size_t)o->batch * r.nl * sizeof(float));
  if (!(r.noise && r.delta && r.x && r.g && r.gz && r.logits))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int b = 0; rc == ERR_OK && b < o->batch; b++)
    rng_normal(o->seed, (uint64_t)b, 0, r.noise + (size_t)b * r.d, r.d);
  if (rc == ERR_OK)
    rc = run(&r, res, e);
  free(r.noise), free(r.delta), free(r.x), free(r.g), free(r.gz), free(r.logits);
  return rc;
}
