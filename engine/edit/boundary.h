/* BoundaryDiffusion (Zhu et al., NeurIPS 2023): a semantic boundary is a hyperplane fitted by a
 * linear SVM to labelled latents at the "mixing step" t_m of a DDIM grid, in x_t and (as the
 * authors' release does) in the UNet's bottleneck h, the mid-block output; an edit moves a
 * trajectory's x_{t_m} and h in one step to a chosen signed distance from them and lets the
 * remaining steps render the change. This module holds the boundary (fit, file, apply) and the
 * search of the mixing step; edit.h drives the sampler around it. */
#ifndef DENOISED_BOUNDARY_H
#define DENOISED_BOUNDARY_H

#include <jansson.h>
#include <stdint.h>

#include "err.h"

#define BOUNDARY_FORMAT "denoised-boundary"
#define BOUNDARY_MAX_DIM (1 << 24)
/* Largest |offset|, scale, mean distance or radius a file may give. */
#define BOUNDARY_MAX_VALUE 1e6

typedef struct boundary {
  int dim;                              /* values per latent (C * H * W) */
  int c, h, w;                          /* latent shape */
  float *normal;                        /* dim, unit length, pointing to the positive label */
  double offset;                        /* signed distance of x: <normal, x> + offset */
  double scale;                         /* spread (std) of the training latents' signed distances */
  double mean_pos, mean_neg;            /* mean signed distance of each class's training latents */
  double train_accuracy, test_accuracy; /* test: -1 without a held-out split */
  int n_train, n_test;
  double radius; /* mean |x| / sqrt(dim) of the training latents (1 on the Gaussian shell) */
  int step;      /* the mixing step: index into the grid of `solver` */
  double timestep;
  json_t *solver;     /* the grid: {"name", "steps", "config"} (owned reference), or NULL */
  char model[512];    /* the model it belongs to (folder or configured name) */
  char attribute[64]; /* what the positive label means, optional */
  /* The h-space boundary at the same step: shape, normal, offset and statistics of the mid-block
   * outputs (no model, solver or step of its own), or NULL for an x-space-only boundary. */
  struct boundary *mid;
} boundary;

typedef struct boundary_fit_opts {
  double C;             /* SVM cost, > 0 (sklearn's SVC default 1) */
  double test_fraction; /* held-out share in [0, 0.9]: every k-th sample goes to the test set */
  int max_epochs;       /* coordinate-descent passes (0: 1000) */
} boundary_fit_opts;

/* Fits a linear SVM (L2-regularised hinge loss, dual coordinate descent of Hsieh et al. 2008,
 * unpenalised-like bias via a constant feature) to n latents of `dim` values with labels 0/1;
 * both classes must occur in the training split. Fills the geometry and statistics of b (not
 * step, solver, model, attribute); free with boundary_free. */
int boundary_fit(const float *latents, const int *labels, int n, int dim,
                 const boundary_fit_opts *o, boundary *b, err *e);

/* Signed distance of one latent from the boundary. */
double boundary_distance(const boundary *b, const float *x);

/* Moves each of n latents along the normal to signed distance `target` (the paper's
 * x' = x + (d - <n, x>) n, with the intercept kept so that 0 is the boundary itself). */
void boundary_move(const boundary *b, float *x, int n, double target);

void boundary_free(boundary *b);

/* The file: one JSON object (format, version, model, attribute, solver, step, timestep, shape,
 * normal, offset, scale, statistics, and "mid": the h-space boundary's shape, normal, offset and
 * statistics). Reading validates every field and the normals' lengths. */
int boundary_save(const boundary *b, const char *path, err *e);
int boundary_load(const char *path, boundary *b, err *e);
json_t *boundary_to_json(const boundary *b);
int boundary_from_json(const json_t *j, boundary *b, err *e);

/* The automatic mixing step ([derived]; the released code takes t_0 from the command line):
 * the forward chain's distance from its stationary N(0, I), estimated per value as the KL
 * divergence of a diagonal Gaussian fitted to n images x0 (batch * dim) noised to alpha_bar,
 * KL(t) = mean_i 0.5 (a v_i + 1 - a + a m_i^2 - 1 - ln(a v_i + 1 - a)). Fills kl[k] for the
 * n_steps levels abar[k] (in the grid's order, noisiest first) and returns the mixing step: the
 * last step whose latent is still eps-close to N(0, I), i.e. where semantics start to form. */
int boundary_mixing_step(const float *x0, int n, int dim, const float *abar, int n_steps,
                         double eps, double *kl, int *step, err *e);

#endif
