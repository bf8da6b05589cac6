/* AdjointDPM's tasks on a frozen sampler (Pan et al. 2023, section 5), with gradients through
 * the whole sampling run from the discrete adjoint (solver/adjoint.h) and the engine's
 * classifier (model/classifier.h) as the metric:
 *   - concept from a metric: a new class-embedding row optimised so that the classifier's
 *     verdict (a character, an attribute, or several) holds on the images the sampler makes
 *     from it (concept_optimize), saved as a named embedding beside the model.
 * The verdict is a list of (head, class) targets; an image agrees when every head's arg-max is
 * its target. */
#ifndef DENOISED_ADJTASK_H
#define DENOISED_ADJTASK_H

#include <stdatomic.h>
#include <stdint.h>

#include "classifier.h"
#include "err.h"
#include "guidance.h"
#include "model.h"
#include "sampler.h"

#define ADJTASK_MAX_TARGETS 8
#define ADJTASK_MAX_BATCH 64

typedef struct adjtask_target {
  int head, cls; /* classifier head index and class of that head */
} adjtask_target;

/* Parses a comma-separated verdict: each item HEAD=LABEL, or a bare LABEL looked up in the
 * head "char" first, then in the one other head that has it (ERR_INVALID naming the item when
 * no head or several have it, or a head is named twice). At most ADJTASK_MAX_TARGETS. */
int adjtask_parse_targets(const classifier *c, const char *spec, adjtask_target *out, int *n,
                          err *e);

/* "char=K,italic=italic": the targets as adjtask_parse_targets reads them back (into buf). */
void adjtask_targets_str(const classifier *c, const adjtask_target *t, int n, char *buf,
                         size_t len);

/* How images are made: the solver, classifier-free guidance (NULL: none), CPU threads. */
typedef struct adjtask_gen {
  const sampler *s;
  const guidance *gd;
  int threads;
  const atomic_int *cancel; /* non-zero stops at the next evaluation (ERR_CANCELLED) */
} adjtask_gen;

/* The classifier's logits [n][n_logits] of n images made with labels[i] from the noises
 * rng_normal(seed, first + i, 0) (those of `denoised sample --seed seed`). */
int adjtask_generate_logits(const model *m, const adjtask_gen *g, const classifier *clf,
                            const int64_t *labels, int n, uint64_t seed, uint64_t first,
                            float *logits, err *e);

/* 1 when every target head's arg-max in one image's logits row is its class. */
int adjtask_verdict(const classifier *clf, const float *logits, const adjtask_target *t, int nt);

/* Agreement with the targets of n images of class `label` (adjtask_generate_logits' noises):
 * *agreed of n. */
int adjtask_agreement(const model *m, const adjtask_gen *g, const classifier *clf,
                      const adjtask_target *t, int nt, int64_t label, int n, uint64_t seed,
                      uint64_t first, int *agreed, err *e);

/* One optimisation step's report. */
typedef struct concept_progress {
  int step, total;
  double loss;  /* the step batch's mean margin loss, before the update */
  double agree; /* share of the step batch that agreed, before the update */
} concept_progress;

typedef struct concept_opts {
  adjtask_gen gen;
  const classifier *clf;
  const adjtask_target *targets;
  int n_targets;
  int64_t label; /* the class whose row (model_class_row) is optimised in place */
  int steps;     /* Adam steps, >= 1 */
  int batch;     /* fresh noises per step, 1..ADJTASK_MAX_BATCH */
  double lr;     /* Adam's step size at the start (cosine decay to lr / 10 at the end) */
  double margin; /* logit margin past which an image's loss is 0 (saturates), >= 0 */
  uint64_t seed; /* step k uses the noises rng_normal(seed, k * batch + b, 0) */
  void (*progress)(const concept_progress *p, void *user);
  void *progress_user;
} concept_opts;

/* Optimises the row of o->label: each step makes o->batch images from fresh noises, takes the
 * margin cross-entropy of every target head (per image and head: cross-entropy of the logits
 * with the target's lowered by the margin, 0 once the target leads every other class by the
 * margin), its gradient to the images by the classifier, to the row by the discrete adjoint
 * (the conditional pass of the guided evaluations), and one Adam step (no weight decay). The row is
 * left at the last step's value. ERR_CANCELLED, ERR_NUMERIC (a loss or gradient that is not
 * finite), ERR_INVALID for bad options, the solver's and the adjoint's errors. */
int concept_optimize(model *m, const concept_opts *o, err *e);

/* The mean of the rows of the model's own classes other than the null class (a neutral start
 * for a concept), into row[class_embed_dim]. ERR_UNSUPPORTED without class embeddings. */
int concept_mean_row(model *m, float *row, err *e);

#define ADJTASK_MAX_EPS 4

typedef struct audit_progress {
  int step, total; /* every sampling run of the audit counts one step */
  int misread;     /* images misread so far in the current attack */
} audit_progress;

typedef struct audit_opts {
  adjtask_gen gen;
  const classifier *clf;
  int head, target;  /* the verdict every image is expected to get */
  int64_t label;     /* the class every image is generated as */
  int batch;         /* images, 1..ADJTASK_MAX_BATCH */
  uint64_t seed;     /* image b starts from rng_normal(seed, b, 0) (`denoised sample --seed`) */
  const double *eps; /* box sizes, n_eps of them (1..ADJTASK_MAX_EPS), each in (0, 2] */
  int n_eps;
  int iters;  /* ascent steps per box (step 2.5 eps / iters) */
  int random; /* random corners per image and box */
  void (*progress)(const audit_progress *p, void *user);
  void *progress_user;
} audit_opts;

typedef struct audit_result {
  int clean;                        /* images read as the target without a perturbation */
  int adversarial[ADJTASK_MAX_EPS]; /* of those, misread with the attack's noise */
  int random[ADJTASK_MAX_EPS];      /* misreads over clean * random random corners */
  double seconds[ADJTASK_MAX_EPS];  /* each attack's wall time */
  float *noise;  /* if set: the last box's adversarial noises, batch * C * S * S */
  float *images; /* if set: the samples from them */
} audit_result;

/* AdjointDPM's security audit: for each box, projected sign-gradient ascent on
 * -log p(target | sample) over the noise (gradients through the whole run by the discrete
 * adjoint; images already misread are frozen), then random corners of the same box (+-eps in
 * every value, rng_normal(seed + 1, b, r + 1)'s signs). Errors as concept_optimize's. */
int audit_run(const model *m, const audit_opts *o, audit_result *r, err *e);

/* The model's classes a classifier head reads by name (class_labels matched against the head's
 * labels, the null class and named embeddings left out): classes[k] and the head's class
 * head_cls[k], at most max; *n of them (ERR_INVALID when none). */
int adjtask_class_map(const model *m, const classifier *clf, int head, int64_t *classes,
                      int *head_cls, int max, int *n, err *e);

typedef struct stylize_progress {
  int step, total;
  double loss;        /* the step batch's loss (style + keep_weight * keep), before the update */
  double style, keep; /* shares of the step batch with the style verdict / the class kept */
} stylize_progress;

typedef struct stylize_opts {
  adjtask_gen gen;
  const classifier *clf;
  const adjtask_target *targets; /* the style verdict */
  int n_targets;
  int keep_head;          /* the head that must go on reading each image's class */
  const int64_t *classes; /* the model classes trained on (adjtask_class_map) */
  const int *keep_cls;    /* the keep head's class of each */
  int n_classes;
  double keep_weight; /* weight of the keep head's margin loss, >= 0 */
  int steps, batch;   /* image i of step k has class classes[(k * batch + i) % n_classes] */
  double lr;          /* Adam's step size at the start (cosine decay to lr / 10) */
  double margin;
  uint64_t seed; /* step k uses the noises rng_normal(seed, k * batch + b, 0) */
  void (*progress)(const stylize_progress *p, void *user);
  void *progress_user;
} stylize_opts;

/* Writes the folder out (which must not exist) as a model the engine loads: m's weights (F32
 * diffusers names, meta pairs as the safetensors metadata), config.json and
 * scheduler_config.json (if there is one) copied from src_dir (a flat model folder), and, if
 * clf_dir is set, the classifier's config.json and model.safetensors as out/classifier/. ERR_IO
 * naming the path. */
int adjtask_save_model(const model *m, const char *src_dir, const char *clf_dir, const char *out,
                       const char *const *meta, int nmeta, err *e);

/* Fine-tunes every weight of m (then model_repack) toward the style: each step makes o->batch
 * images of the classes in turn from fresh noises, takes the margin loss of the style targets
 * plus keep_weight times that of the keep head at each image's class, its gradient to the
 * weights through the whole sampling run by the discrete adjoint (both passes of guided
 * evaluations), and one Adam step. Errors as concept_optimize's. */
int stylize_optimize(model *m, const stylize_opts *o, err *e);

#endif
