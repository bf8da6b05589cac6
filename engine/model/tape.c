/* The tape of engine/grad nodes the model-level backwards record a forward on (tape.h): node
 * emission, the layers every network shares (convolution, group norm, linear, attention,
 * resnet, the UNets' skip concatenation and time embedding), and the reverse sweep. */
#include "tape.h"

#include <stdlib.h>
#include <string.h>

#include "mem.h"

float *tape_pgrad(const tape *T, const float *data) {
  if (!T->pg || !data)
    return NULL;
  for (int i = 0; i < T->ps->nparams; i++)
    if (T->ps->params[i].data == data)
      return T->pg[i];
  return NULL;
}

int tape_new_act(tape *T, int c, int h, int w, tape_act *x) {
  const size_t count = (size_t)T->n * c * h * w;
  *x = (tape_act){arena_floats(T->a, count), arena_floats(T->a, count), c, h, w};
  if (!x->v || !x->d)
    return err_set(T->e, ERR_NOMEM, "out of memory for the %s's tape (batch %d)", T->what, T->n);
  memset(x->d, 0, count * sizeof *x->d);
  return ERR_OK;
}

grad_node tape_node(const tape *T, grad_op op, const tape_act *x) {
  return (grad_node){.op = op, .n = T->n, .c = x->c, .h = x->h, .w = x->w};
}

int tape_emit(tape *T, grad_node *nd, const tape_act *const *in, int nin, int oc, int oh, int ow,
              tape_act *out) {
  for (int i = 0; i < nin; i++) {
    nd->src[i] = in[i]->v;
    nd->dsrc[i] = in[i]->d;
  }
  int rc = tape_new_act(T, oc, oh, ow, out);
  if (rc)
    return rc;
  if (T->count == T->cap) {
    int cap = T->cap ? 2 * T->cap : 256;
    grad_node *g = mem_realloc(T->nodes, (size_t)cap * sizeof *g);
    if (!g)
      return err_set(T->e, ERR_NOMEM, "out of memory for the %s's tape", T->what);
    T->nodes = g;
    T->cap = cap;
  }
  nd->ddst = out->d;
  rc = grad_forward(nd, out->v, T->a, T->p, T->e);
  if (rc == ERR_OK)
    T->nodes[T->count++] = *nd;
  return rc;
}

int tape_conv(tape *T, const conv2d *c, const tape_act *x, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_CONV2D, x);
  nd.p.conv = c;
  nd.dsrc[1] = tape_pgrad(T, c->weight);
  nd.dsrc[2] = tape_pgrad(T, c->bias);
  int oh, ow;
  ops_conv2d_out_size(c, x->h, x->w, &oh, &ow);
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, c->cout, oh, ow, y);
}

int tape_norm(tape *T, const group_norm *g, const tape_act *x, int silu, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_GROUP_NORM, x);
  nd.p.gn.groups = g->groups;
  nd.p.gn.eps = g->eps;
  nd.p.gn.silu = silu;
  nd.src[1] = g->gamma;
  nd.src[2] = g->beta;
  nd.dsrc[1] = tape_pgrad(T, g->gamma);
  nd.dsrc[2] = tape_pgrad(T, g->beta);
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, x->c, x->h, x->w, y);
}

int tape_unary(tape *T, grad_op op, const tape_act *x, tape_act *y) {
  grad_node nd = tape_node(T, op, x);
  int oh = x->h, ow = x->w;
  if (op == GRAD_UPSAMPLE_NEAREST2X)
    oh *= 2, ow *= 2;
  else if (op == GRAD_AVGPOOL2X2)
    oh /= 2, ow /= 2;
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, x->c, oh, ow, y);
}

int tape_linear(tape *T, const linear *l, const tape_act *x, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_LINEAR, x);
  nd.p.linear.out = l->out;
  nd.src[1] = l->weight;
  nd.src[2] = l->bias;
  nd.dsrc[1] = tape_pgrad(T, l->weight);
  nd.dsrc[2] = tape_pgrad(T, l->bias);
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, l->out, 1, 1, y);
}

int tape_binary(tape *T, grad_node nd, const tape_act *a, const tape_act *b, int oc, tape_act *y) {
  const tape_act *in[] = {a, b};
  return tape_emit(T, &nd, in, 2, oc, a->h, a->w, y);
}

int tape_add(tape *T, const tape_act *a, const tape_act *b, float divisor, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_ADD, a);
  nd.p.add.divisor = divisor;
  return tape_binary(T, nd, a, b, a->c, y);
}

int tape_attn(tape *T, const attn_weights *aw, const tape_act *x, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_ATTENTION, x);
  nd.p.attn = aw;
  const float *w[10] = {aw->norm_gamma, aw->norm_beta, aw->wq, aw->bq, aw->wk,
                        aw->bk,         aw->wv,        aw->bv, aw->wo, aw->bo};
  for (int i = 0; i < 10; i++)
    nd.dsrc[1 + i] = tape_pgrad(T, w[i]);
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, x->c, x->h, x->w, y);
}

int tape_resnet(tape *T, const resnet *r, const tape_act *x, const tape_act *add, tape_act *y) {
  tape_act hn, xs = *x, hs, h1, tp, h2, h3, h4, sc;
  int rc = tape_norm(T, &r->norm1, x, 1, &hn);
  hs = hn;
  if (!rc && (r->up || r->down)) {
    grad_op op = r->up ? GRAD_UPSAMPLE_NEAREST2X : GRAD_AVGPOOL2X2;
    (void)((rc = tape_unary(T, op, x, &xs)) || (rc = tape_unary(T, op, &hn, &hs)));
  }
  if (rc || (rc = tape_conv(T, &r->conv1, &hs, &h1)))
    return rc;
  if (add) {
    tape_act sum;
    if ((rc = tape_add(T, &h1, add, 1.0f, &sum)))
      return rc;
    h1 = sum;
  }
  if (r->temb_proj.out == 0) { /* no time embedding (the VAE's resnets) */
    rc = tape_norm(T, &r->norm2, &h1, 1, &h3);
  } else if ((rc = tape_linear(T, &r->temb_proj, &T->temb, &tp)) == ERR_OK) {
    grad_node ss = tape_node(T, GRAD_SCALE_SHIFT, &h1);
    ss.p.ss.has_scale = r->scale_shift;
    if (!r->scale_shift) {
      (void)((rc = tape_binary(T, ss, &h1, &tp, r->cout, &h2)) ||
             (rc = tape_norm(T, &r->norm2, &h2, 1, &h3)));
    } else {
      tape_act h3p;
      (void)((rc = tape_norm(T, &r->norm2, &h1, 0, &h2)) ||
             (rc = tape_binary(T, ss, &h2, &tp, r->cout, &h3p)) ||
             (rc = tape_unary(T, GRAD_SILU, &h3p, &h3)));
    }
  }
  if (rc || (rc = tape_conv(T, &r->conv2, &h3, &h4)))
    return rc;
  sc = xs;
  if (r->has_shortcut && (rc = tape_conv(T, &r->shortcut, &xs, &sc)))
    return rc;
  return tape_add(T, &sc, &h4, r->out_scale, y);
}

int tape_concat(tape *T, const tape_act *a, const tape_act *b, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_CONCAT, a);
  nd.p.concat.cb = b->c;
  return tape_binary(T, nd, a, b, a->c + b->c, y);
}

int tape_time_embedding(tape *T, const tape_temb *s, const float *t, const int64_t *labels,
                        tape_act *t_act, tape_act *cls) {
  const int dim = s->l2->out;
  tape_act tproj, emb, sum;
  int rc = tape_new_act(T, 1, 1, 1, t_act);
  if (rc)
    return rc;
  memcpy(t_act->v, t, (size_t)T->n * sizeof *t);
  grad_node te = {.op = GRAD_TIMESTEP_EMBEDDING, .n = T->n, .c = s->ch0, .h = 1, .w = 1};
  te.p.temb.flip_sin_to_cos = s->flip_sin_to_cos;
  te.p.temb.freq_shift = s->freq_shift;
  const tape_act *in[] = {t_act};
  if ((rc = tape_emit(T, &te, in, 1, s->ch0, 1, 1, &tproj)))
    return rc;
  grad_node mlp = tape_node(T, GRAD_TIME_MLP, &tproj);
  mlp.p.mlp.hidden = s->l1->out;
  mlp.p.mlp.out = dim;
  const float *w[4] = {s->l1->weight, s->l1->bias, s->l2->weight, s->l2->bias};
  for (int i = 0; i < 4; i++) {
    mlp.src[1 + i] = w[i];
    mlp.dsrc[1 + i] = tape_pgrad(T, w[i]);
  }
  const tape_act *min[] = {&tproj};
  if ((rc = tape_emit(T, &mlp, min, 1, dim, 1, 1, &emb)))
    return rc;
  if (s->class_table) {
    grad_node ce = {.op = GRAD_CLASS_EMBEDDING, .n = T->n, .c = dim, .h = 1, .w = 1};
    ce.p.embed.labels = labels;
    ce.p.embed.classes = s->classes;
    ce.src[0] = s->class_table;
    ce.dsrc[0] = tape_pgrad(T, s->class_table);
    if ((rc = tape_emit(T, &ce, NULL, 0, dim, 1, 1, cls)) ||
        (rc = tape_add(T, &emb, cls, 1.0f, &sum)))
      return rc;
    emb = sum;
  }
  return tape_unary(T, GRAD_SILU, &emb, &T->temb);
}

int tape_seed(tape *T, const tape_act *out, const model_grad_call *g) {
  const size_t ocount = (size_t)T->n * out->c * out->h * out->w;
  int rc = ERR_OK;
  if (g->loss_grad)
    rc = g->loss_grad(out->v, out->d, g->loss_user, T->e);
  else
    memcpy(out->d, g->grad_out, ocount * sizeof(float));
  if (g->out)
    memcpy(g->out, out->v, ocount * sizeof(float));
  return rc;
}

int tape_backward(tape *T) {
  int rc = ERR_OK;
  for (int i = T->count - 1; i >= 0 && rc == ERR_OK; i--)
    rc = grad_backward(&T->nodes[i], T->a, T->p, T->e);
  return rc;
}

void tape_free(tape *T) {
  free(T->nodes);
  T->nodes = NULL;
  T->count = T->cap = 0;
}
