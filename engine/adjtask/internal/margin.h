/* What the adjoint tasks share (private to engine/adjtask): the loss, the step size, the
 * classifier check and the adjoint call. */
#ifndef DENOISED_ADJTASK_MARGIN_H
#define DENOISED_ADJTASK_MARGIN_H

#include "adjoint.h"
#include "adjtask.h"

/* Per target head of one image's logits z: cross-entropy of the logits with the target's
 * lowered by `margin`, 0 once the target leads every other class of its head by the margin
 * (the loss saturates). Returns the sum over the targets times `scale` and ADDS its gradient
 * with respect to z, times `scale`, to g (n_logits floats). */
double adjtask_margin_loss(const classifier *clf, const float *z, const adjtask_target *t, int nt,
                           double margin, double scale, float *g);

/* The step size of step `step` of `steps`: cosine decay from lr to lr / 10, big moves while the
 * images are far from the verdict, small ones once the batch-to-batch noise of the gradient is
 * what remains. */
double adjtask_lr(double lr, int step, int steps);

/* ERR_INVALID, naming both, unless the classifier reads the images the model makes (channels
 * and size). */
int adjtask_check_classifier(const model *m, const classifier *clf, err *e);

/* The gradients of sum(gout * samples) through a run of g's sampler (its guidance, threads and
 * cancel) from noise, batch images of class labels[b], by the discrete adjoint: into the
 * outputs the caller set in *ao (grad_noise, grad_class, grad_params); the inputs are set here. */
int adjtask_adjoint(const adjtask_gen *g, const model *m, int batch, const float *noise,
                    const int64_t *labels, const float *gout, adjoint_opts *ao, err *e);

#endif
