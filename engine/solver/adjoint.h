/* The discrete adjoint of our own solvers (AdjointDPM's exact-gradient variant): for the sample
 * x_0 a deterministic solver produces from the noise x_T, the gradient of L = sum(G * x_0) with
 * respect to x_T, the class-embedding row each image is conditioned on, and the model's weights.
 *
 * Memory is one image per step, not the network's activations per step: the forward run keeps
 * only the state every evaluation starts from (sampler_run_opts.states), and the backward sweep
 * recomputes one evaluation at a time with model_backward (its tape lives for that evaluation
 * only), walking the steps in reverse. Each step of DDIM (eta 0) and DPM-Solver(++) multistep
 * (orders 1 to 3, midpoint or heun, dpmsolver or dpmsolver++) is linear in the state and the
 * model values it combines, after the x0 clipping (clip_sample, or thresholding whose
 * sample_max_value <= 1 makes it a fixed clip): the adjoint applies those coefficients'
 * transposes, the clip's mask (PyTorch's clamp gradient: 1 inside [-s, s] inclusive, 0 outside)
 * and, under classifier-free guidance uncond + g (cond - uncond), sends g times the model
 * output's cotangent to the conditional pass and (1 - g) times it to the unconditional one (one
 * batched backward of both).
 *
 * The continuous adjoint (AdjointDPM's own method, Pan et al. 2023) is the other way to the same
 * gradients: with y = x / alpha and rho = sigma / alpha the probability-flow ODE is
 * dy/drho = eps(alpha y, t(rho), c), the exponential integrator's linear part gone. It is solved
 * forward on the solver's time grid by its first-order step (DDIM's / DPM-Solver-1's update;
 * eps from the clipped x0 where the config clips), keeping only the state before the last step,
 * then the augmented system
 *   d/drho [y, a_y, a_c, a_theta] = [eps, -a_y d eps/dy, -a_y d eps/dc, -a_y d eps/dtheta]
 * is solved backward in rho with the same step from the sample, y reconstructed along the way
 * (nothing of the forward is stored). The last step (to sigma 0, where eps has no meaning) is
 * differentiated exactly from its kept start, as the authors' code differentiates its final
 * denoising. Its gradient is that of the ODE's solution, not of the image a solver produced:
 * the two agree as the steps grow (first order in the step). */
#ifndef DENOISED_ADJOINT_H
#define DENOISED_ADJOINT_H

#include <stdatomic.h>
#include <stdint.h>

#include "err.h"
#include "guidance.h"
#include "model.h"
#include "sampler.h"

typedef enum { ADJOINT_DISCRETE = 0, ADJOINT_CONTINUOUS = 1 } adjoint_method;

typedef struct adjoint_opts {
  adjoint_method method;
  int batch;                /* images, >= 1 */
  const float *noise;       /* x_T: batch * C * S * S (the model's sample size) */
  const int64_t *labels;    /* one class per image, or NULL (unconditional model) */
  const guidance *guidance; /* classifier-free guidance, or NULL */
  const float *grad_output; /* G: batch * C * S * S, finite */
  int threads;              /* >= 1 */
  /* Outputs; NULL ones are not computed. */
  float *sample;                /* x_0 as sampler_run gives it (continuous: the ODE solve's) */
  float *grad_noise;            /* dL/dx_T, batch * C * S * S */
  float *grad_class;            /* dL/d(class-embedding row of each image's label), batch * dim */
  model_grads *grad_params;     /* dL/d(weights), ADDED */
  sampler_progress_fn progress; /* forward steps, then backward steps (total 2 n) */
  void *progress_user;
  const atomic_int *cancel;
  /* Filled in: the largest relative L2 difference, over the steps, between the state the solver
   * produced and the state the adjoint's linear form of the step gives from the recomputed model
   * values (a check that the adjoint differentiates the very steps that ran; ~1e-7).
   * Continuous: the relative L2 between the noise and the state the backward solve ends at (how
   * far the reconstructed trajectory drifted from the forward one). */
  double replay_err;
} adjoint_opts;

/* ERR_OK if s is a solver the adjoint differentiates; else ERR_UNSUPPORTED naming the solver or
 * the config key (stochastic solvers, the papers' own loops, dynamic thresholding). */
int adjoint_check_solver(const sampler *s, err *e);

/* Runs the solver from o->noise, then the backward sweep. Errors: ERR_INVALID for bad options
 * (guidance without labels, a class gradient for an unconditional model), ERR_UNSUPPORTED for
 * the solver or a model without parameters, ERR_NUMERIC, ERR_NOMEM, ERR_CANCELLED. */
int adjoint_run(const sampler *s, const model *m, adjoint_opts *o, err *e);

#endif
