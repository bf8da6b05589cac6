/* A network's forward written as a tape of engine/grad nodes, for the model-level backwards
 * (unet_grad.c, vae_grad.c): each node's forward is the op the engine runs, so the tape's output
 * is the network's; the backward then runs the nodes' rules in reverse. Every activation stays
 * on the tape with a gradient buffer of its size, and a tensor read by several nodes (the time
 * embedding, skips, residual inputs) collects every contribution, because the rules accumulate.
 * Parameter gradients go straight into the caller's buffers, found by the parameter's address
 * among the network's blocks_params. Private to the model room. */
#ifndef DENOISED_TAPE_H
#define DENOISED_TAPE_H

#include "blocks.h"
#include "grad.h"

/* An activation on the tape: its values and the gradient collected for it (n images each). */
typedef struct tape_act {
  float *v, *d;
  int c, h, w;
} tape_act;

typedef struct tape {
  const blocks_params *ps; /* the network's learned tensors */
  const void *net;         /* the network whose backward records (its own walkers' use) */
  arena *a;
  pool *p;
  int n;
  float *const *pg; /* per parameter of ps, or NULL: no parameter gradients */
  grad_node *nodes;
  int count, cap;
  tape_act temb; /* silu(time embedding), read by every resnet's time projection; unset without */
  const char *what; /* the network, for out-of-memory messages */
  err *e;
} tape;

/* The gradient buffer of the parameter at `data`, or NULL when none is wanted. */
float *tape_pgrad(const tape *T, const float *data);
/* An activation of c x h x w per image with zeroed gradient (values uninitialised). */
int tape_new_act(tape *T, int c, int h, int w, tape_act *x);
/* A node of op on input x's shape. */
grad_node tape_node(const tape *T, grad_op op, const tape_act *x);
/* Runs nd forward into a new activation of oc x oh x ow per image and records it. in[i] feeds
 * slot i (values and gradient); slots beyond nin are the caller's (weights). */
int tape_emit(tape *T, grad_node *nd, const tape_act *const *in, int nin, int oc, int oh, int ow,
              tape_act *out);

int tape_conv(tape *T, const conv2d *c, const tape_act *x, tape_act *y);
int tape_norm(tape *T, const group_norm *g, const tape_act *x, int silu, tape_act *y);
/* The one-input ops whose output shape follows from the input's (SiLU, nearest 2x upsampling,
 * 2x2 average pool, ...). */
int tape_unary(tape *T, grad_op op, const tape_act *x, tape_act *y);
int tape_linear(tape *T, const linear *l, const tape_act *x, tape_act *y);
int tape_binary(tape *T, grad_node nd, const tape_act *a, const tape_act *b, int oc, tape_act *y);
int tape_add(tape *T, const tape_act *a, const tape_act *b, float divisor, tape_act *y);
int tape_attn(tape *T, const attn_weights *aw, const tape_act *x, tape_act *y);
/* ResnetBlock2D as blocks_resnet_forward runs it: norm1 + SiLU, optional resampling of both
 * branches, conv1 (plus `add`, e.g. a guidance projection, when not NULL), the time projection
 * of T->temb when the block has one (added, or scale-shift after norm2), SiLU, conv2, shortcut,
 * sum. */
int tape_resnet(tape *T, const resnet *r, const tape_act *x, const tape_act *add, tape_act *y);

/* a and b stacked along the channels (an up block's input and its skip connection). */
int tape_concat(tape *T, const tape_act *a, const tape_act *b, tape_act *y);

/* The time embedding as blocks_time_embedding computes it. */
typedef struct tape_temb {
  int ch0, flip_sin_to_cos;
  float freq_shift;
  const linear *l1, *l2;
  const float *class_table; /* [classes][l2->out], or NULL */
  int classes;
} tape_temb;

/* Timestep sinusoid, time MLP, class row, SiLU: T->temb. *t_act and *cls receive the
 * activations whose gradients are dL/dt and dL/d(class row) (cls untouched without a table). */
int tape_time_embedding(tape *T, const tape_temb *s, const float *t, const int64_t *labels,
                        tape_act *t_act, tape_act *cls);

/* Every node's backward, last to first. */
int tape_backward(tape *T);
/* A denoiser's output gradient seeded from g (grad_out, or loss_grad on the output) and the
 * output copied to g->out if asked; loss_grad's code. tape_backward then runs the sweep. */
int tape_seed(tape *T, const tape_act *out, const model_grad_call *g);
/* Frees the node list (the activations live in T->a). */
void tape_free(tape *T);

#endif
