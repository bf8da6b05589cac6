/* The UNet2DModel's gradient: the forward again, written as a tape of engine/grad nodes (each
 * node's forward is the op the engine runs, so the tape's output is unet_forward's), then the
 * nodes' backward rules in reverse order. Every activation is kept on the tape with a gradient
 * buffer of its size; a tensor read by several nodes (the time embedding, the skips, the
 * residual inputs) just collects every contribution, because the rules accumulate. Parameter
 * gradients go straight into the caller's buffers, found by the parameter's address. */
#include <math.h>
#include <string.h>

#include "grad.h"
#include "mem.h"
#include "unet_impl.h"

/* An activation on the tape: its values and the gradient collected for it. */
typedef struct act {
  float *v, *d;
  int c, h, w;
} act;

typedef struct tape {
  const unet *u;
  arena *a;
  pool *p;
  int n;
  float *const *pg; /* per parameter, or NULL: no parameter gradients */
  grad_node *nodes;
  int count, cap;
  act temb; /* silu(emb), read by every resnet's time projection */
  err *e;
} tape;

/* The gradient buffer of the parameter at `data`, or NULL when none is wanted. */
static float *pgrad(const tape *T, const float *data) {
  if (!T->pg || !data)
    return NULL;
  for (int i = 0; i < T->u->ps.nparams; i++)
    if (T->u->ps.params[i].data == data)
      return T->pg[i];
  return NULL;
}

static float *zeros(tape *T, size_t count) {
  float *p = arena_floats(T->a, count);
  if (p)
    memset(p, 0, count * sizeof *p);
  return p;
}

/* Runs nd forward into a new activation of oc x oh x ow per image and records it. in[i] feeds
 * slot i (values and gradient); slots beyond nin are the caller's (weights). */
static int emit(tape *T, grad_node *nd, const act *const *in, int nin, int oc, int oh, int ow,
                act *out) {
  for (int i = 0; i < nin; i++) {
    nd->src[i] = in[i]->v;
    nd->dsrc[i] = in[i]->d;
  }
  size_t count = (size_t)T->n * oc * oh * ow;
  *out = (act){arena_floats(T->a, count), zeros(T, count), oc, oh, ow};
  if (!out->v || !out->d)
    return err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape (batch %d)", T->n);
  if (T->count == T->cap) {
    int cap = T->cap ? 2 * T->cap : 256;
    grad_node *g = mem_realloc(T->nodes, (size_t)cap * sizeof *g);
    if (!g)
      return err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
    T->nodes = g;
    T->cap = cap;
  }
  nd->ddst = out->d;
  int rc = grad_forward(nd, out->v, T->a, T->p, T->e);
  if (rc == ERR_OK)
    T->nodes[T->count++] = *nd;
  return rc;
}

static grad_node node_of(const tape *T, grad_op op, const act *x) {
  return (grad_node){.op = op, .n = T->n, .c = x->c, .h = x->h, .w = x->w};
}

static int t_conv(tape *T, const conv2d *c, const act *x, act *y) {
  grad_node nd = node_of(T, GRAD_CONV2D, x);
  nd.p.conv = c;
  nd.dsrc[1] = pgrad(T, c->weight);
  nd.dsrc[2] = pgrad(T, c->bias);
  int oh, ow;
  ops_conv2d_out_size(c, x->h, x->w, &oh, &ow);
  const act *in[] = {x};
  return emit(T, &nd, in, 1, c->cout, oh, ow, y);
}

static int t_norm(tape *T, const group_norm *g, const act *x, int silu, act *y) {
  grad_node nd = node_of(T, GRAD_GROUP_NORM, x);
  nd.p.gn.groups = g->groups;
  nd.p.gn.eps = g->eps;
  nd.p.gn.silu = silu;
  nd.src[1] = g->gamma;
  nd.src[2] = g->beta;
  nd.dsrc[1] = pgrad(T, g->gamma);
  nd.dsrc[2] = pgrad(T, g->beta);
  const act *in[] = {x};
  return emit(T, &nd, in, 1, x->c, x->h, x->w, y);
}

/* The one-input ops whose output shape follows from the input's. */
static int t_unary(tape *T, grad_op op, const act *x, act *y) {
  grad_node nd = node_of(T, op, x);
  int oh = x->h, ow = x->w;
  if (op == GRAD_UPSAMPLE_NEAREST2X)
    oh *= 2, ow *= 2;
  else if (op == GRAD_AVGPOOL2X2)
    oh /= 2, ow /= 2;
  const act *in[] = {x};
  return emit(T, &nd, in, 1, x->c, oh, ow, y);
}

static int t_linear(tape *T, const linear *l, const act *x, act *y) {
  grad_node nd = node_of(T, GRAD_LINEAR, x);
  nd.p.linear.out = l->out;
  nd.src[1] = l->weight;
  nd.src[2] = l->bias;
  nd.dsrc[1] = pgrad(T, l->weight);
  nd.dsrc[2] = pgrad(T, l->bias);
  const act *in[] = {x};
  return emit(T, &nd, in, 1, l->out, 1, 1, y);
}

static int t_binary(tape *T, grad_node nd, const act *a, const act *b, int oc, act *y) {
  const act *in[] = {a, b};
  return emit(T, &nd, in, 2, oc, a->h, a->w, y);
}

static int t_add(tape *T, const act *a, const act *b, float divisor, act *y) {
  grad_node nd = node_of(T, GRAD_ADD, a);
  nd.p.add.divisor = divisor;
  return t_binary(T, nd, a, b, a->c, y);
}

static int t_attn(tape *T, const attn_weights *aw, const act *x, act *y) {
  grad_node nd = node_of(T, GRAD_ATTENTION, x);
  nd.p.attn = aw;
  const float *w[10] = {aw->norm_gamma, aw->norm_beta, aw->wq, aw->bq, aw->wk,
                        aw->bk,         aw->wv,        aw->bv, aw->wo, aw->bo};
  for (int i = 0; i < 10; i++)
    nd.dsrc[1 + i] = pgrad(T, w[i]);
  const act *in[] = {x};
  return emit(T, &nd, in, 1, x->c, x->h, x->w, y);
}

/* ResnetBlock2D as resnet_forward runs it: norm1 + SiLU, optional resampling of both branches,
 * conv1 (plus `add`, the guidance, when set), the time projection (added, or scale-shift after
 * norm2; none in a guide network's resnet), SiLU, conv2, shortcut, sum. */
static int t_resnet(tape *T, const resnet *r, const act *x, const act *add, act *y) {
  act hn, xs = *x, hs, h1, tp, h2, h3, h4, sc;
  int rc = t_norm(T, &r->norm1, x, 1, &hn);
  hs = hn;
  if (!rc && (r->up || r->down)) {
    grad_op op = r->up ? GRAD_UPSAMPLE_NEAREST2X : GRAD_AVGPOOL2X2;
    (void)((rc = t_unary(T, op, x, &xs)) || (rc = t_unary(T, op, &hn, &hs)));
  }
  if (rc || (rc = t_conv(T, &r->conv1, &hs, &h1)))
    return rc;
  if (add) {
    act sum;
    if ((rc = t_add(T, &h1, add, 1.0f, &sum)))
      return rc;
    h1 = sum;
  }
  if (!r->temb_proj.out) { /* norm2 + SiLU straight on conv1's output */
    rc = t_norm(T, &r->norm2, &h1, 1, &h3);
  } else if ((rc = t_linear(T, &r->temb_proj, &T->temb, &tp)) == ERR_OK) {
    grad_node ss = node_of(T, GRAD_SCALE_SHIFT, &h1);
    ss.p.ss.has_scale = r->scale_shift;
    if (!r->scale_shift) {
      (void)((rc = t_binary(T, ss, &h1, &tp, r->cout, &h2)) ||
             (rc = t_norm(T, &r->norm2, &h2, 1, &h3)));
    } else {
      act h3p;
      (void)((rc = t_norm(T, &r->norm2, &h1, 0, &h2)) ||
             (rc = t_binary(T, ss, &h2, &tp, r->cout, &h3p)) ||
             (rc = t_unary(T, GRAD_SILU, &h3p, &h3)));
    }
  }
  if (rc || (rc = t_conv(T, &r->conv2, &h3, &h4)))
    return rc;
  sc = xs;
  if (r->has_shortcut && (rc = t_conv(T, &r->shortcut, &xs, &sc)))
    return rc;
  return t_add(T, &sc, &h4, r->out_scale, y);
}

/* Timestep embedding, time MLP, class row, SiLU: T->temb. tin/cls receive the activations whose
 * gradients are dL/dt (via the embedding's input) and dL/d(class row). */
static int t_embedding(tape *T, const model_call *c, act *t_act, act *cls) {
  const unet *u = T->u;
  act tproj, emb, sum;
  *t_act = (act){(float *)c->t, zeros(T, (size_t)T->n), 1, 1, 1};
  if (!t_act->d)
    return err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
  grad_node te = {.op = GRAD_TIMESTEP_EMBEDDING, .n = T->n, .c = u->ch0, .h = 1, .w = 1};
  te.p.temb.flip_sin_to_cos = u->flip_sin_to_cos;
  te.p.temb.freq_shift = u->freq_shift;
  const act *in[] = {t_act};
  int rc = emit(T, &te, in, 1, u->ch0, 1, 1, &tproj);
  if (rc)
    return rc;
  grad_node mlp = node_of(T, GRAD_TIME_MLP, &tproj);
  mlp.p.mlp.hidden = u->temb1.out;
  mlp.p.mlp.out = u->temb2.out;
  const float *w[4] = {u->temb1.weight, u->temb1.bias, u->temb2.weight, u->temb2.bias};
  for (int i = 0; i < 4; i++) {
    mlp.src[1 + i] = w[i];
    mlp.dsrc[1 + i] = pgrad(T, w[i]);
  }
  const act *min[] = {&tproj};
  if ((rc = emit(T, &mlp, min, 1, u->temb_dim, 1, 1, &emb)))
    return rc;
  if (u->class_table) {
    grad_node ce = {.op = GRAD_CLASS_EMBEDDING, .n = T->n, .c = u->temb_dim, .h = 1, .w = 1};
    ce.p.embed.labels = c->labels;
    ce.p.embed.classes = u->shape.num_classes;
    ce.src[0] = u->class_table;
    ce.dsrc[0] = pgrad(T, u->class_table);
    if ((rc = emit(T, &ce, NULL, 0, u->temb_dim, 1, 1, cls)) ||
        (rc = t_add(T, &emb, cls, 1.0f, &sum)))
      return rc;
    emb = sum;
  }
  return t_unary(T, GRAD_SILU, &emb, &T->temb);
}

#define MAX_SKIPS (UNET_MAX_LEVELS * UNET_MAX_LAYERS + 1)

static int t_down(tape *T, const act *gfeat, act *cur, act *skips, int *nskips) {
  const unet *u = T->u;
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->down[i];
    for (int l = 0; l < b->nlayers; l++) {
      act nx, pj, *proj = NULL;
      if (b->guide && (rc = t_conv(T, &b->guide_proj[l], &gfeat[b->guide - 1], &pj)))
        return rc;
      if (b->guide)
        proj = &pj;
      if ((rc = t_resnet(T, &b->res[l], cur, proj, &nx)) ||
          (b->has_attn && (rc = t_attn(T, &b->attn[l], &nx, &nx))))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
    if (b->sample != SAMPLE_NONE) {
      act nx;
      if ((rc = b->sample == SAMPLE_CONV ? t_conv(T, &b->sample_conv, cur, &nx)
                                         : t_resnet(T, &b->sample_res, cur, NULL, &nx)))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
  }
  return ERR_OK;
}

static int t_up(tape *T, act *cur, act *skips, int *nskips) {
  const unet *u = T->u;
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->up[i];
    for (int l = 0; l < b->nlayers; l++) {
      const act *s = &skips[--*nskips];
      act cat, nx;
      grad_node nd = node_of(T, GRAD_CONCAT, cur);
      nd.p.concat.cb = s->c;
      if ((rc = t_binary(T, nd, cur, s, cur->c + s->c, &cat)) ||
          (rc = t_resnet(T, &b->res[l], &cat, NULL, &nx)) ||
          (b->has_attn && (rc = t_attn(T, &b->attn[l], &nx, &nx))))
        return rc;
      *cur = nx;
    }
    if (b->sample == SAMPLE_CONV) {
      act upx;
      if ((rc = t_unary(T, GRAD_UPSAMPLE_NEAREST2X, cur, &upx)) ||
          (rc = t_conv(T, &b->sample_conv, &upx, cur)))
        return rc;
    } else if (b->sample == SAMPLE_RESNET) {
      act nx;
      if ((rc = t_resnet(T, &b->sample_res, cur, NULL, &nx)))
        return rc;
      *cur = nx;
    }
  }
  return ERR_OK;
}

/* A constant of the tape (no gradient): n x c x h x w floats. */
static int t_const(tape *T, int c, int h, int w, act *a) {
  *a = (act){arena_floats(T->a, (size_t)T->n * c * h * w), NULL, c, h, w};
  return a->v ? ERR_OK : err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
}

/* The guide networks on the tape: their features (gfeat) and, when pred is set, their auxiliary
 * predictions of the sharp grayscale (conv_out of the features plus the pooled input). */
static int t_guides(tape *T, const model_call *c, act *gfeat, act *pred) {
  const unet *u = T->u;
  for (int g = 0; g < u->nguide; g++) {
    const guide_net *gn = &u->guide[g];
    act in, c1, head;
    int rc;
    if ((rc = t_const(T, 1, c->h >> gn->scale, c->w >> gn->scale, &in)))
      return rc;
    unet_guide_input(c->cond, u->shape.cond_channels, T->n, c->h, c->w, gn->scale, in.v);
    if ((rc = t_conv(T, &gn->conv_in, &in, &c1)) ||
        (rc = t_resnet(T, &gn->res, &c1, NULL, &gfeat[g])))
      return rc;
    if (pred && ((rc = t_conv(T, &gn->conv_out, &gfeat[g], &head)) ||
                 (rc = t_add(T, &head, &in, 1.0f, &pred[g]))))
      return rc;
  }
  return ERR_OK;
}

/* guide_weight * sum over scales of mean (pred - target)^2 into *loss, and its gradient into the
 * predictions' gradient buffers (before the backward pass reads them). */
static int guide_loss(tape *T, const model_call *c, const model_grad_call *g, const act *pred,
                      double *loss) {
  const unet *u = T->u;
  *loss = 0;
  for (int k = 0; k < u->nguide; k++) {
    const act *p = &pred[k];
    const size_t count = (size_t)T->n * p->h * p->w;
    float *target = arena_floats(T->a, count);
    if (!target)
      return err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
    unet_guide_input(g->guide_target, u->shape.in_channels - u->shape.cond_channels, T->n, c->h,
                     c->w, u->guide[k].scale, target);
    double sq = 0;
    const double scale = 2.0 * g->guide_weight / (double)count;
    for (size_t i = 0; i < count; i++) {
      const double d = (double)p->v[i] - target[i];
      sq += d * d;
      p->d[i] += (float)(scale * d);
    }
    *loss += g->guide_weight * sq / (double)count;
  }
  return isfinite(*loss) ? ERR_OK
                         : err_set(T->e, ERR_NUMERIC, "the structure-guidance loss is not finite");
}

/* The forward on the tape; *xin and *out are the network's first input and its output; pred
 * (or NULL) receives the guide networks' auxiliary predictions. */
static int t_forward(tape *T, const model_call *c, act *xin, act *t_act, act *cls, act *pred,
                     act *out) {
  const unet *u = T->u;
  size_t cnt = (size_t)T->n * u->shape.in_channels * c->h * c->w;
  *xin = (act){arena_floats(T->a, cnt), zeros(T, cnt), u->shape.in_channels, c->h, c->w};
  if (!xin->v || !xin->d)
    return err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
  unet_input(u, c->x, c->cond, T->n, (size_t)c->h * c->w, xin->v);
  act cur, skips[MAX_SKIPS], gfeat[UNET_MAX_LEVELS];
  int nskips = 0, rc;
  if ((rc = t_embedding(T, c, t_act, cls)) || (rc = t_guides(T, c, gfeat, pred)) ||
      (rc = t_conv(T, &u->conv_in, xin, &cur)))
    return rc;
  skips[nskips++] = cur;
  if ((rc = t_down(T, gfeat, &cur, skips, &nskips)))
    return rc;
  if (u->has_mid) {
    act a, b;
    if ((rc = t_resnet(T, &u->mid_res[0], &cur, NULL, &a)) ||
        (u->mid_has_attn && (rc = t_attn(T, &u->mid_attn, &a, &a))) ||
        (rc = t_resnet(T, &u->mid_res[1], &a, NULL, &b)))
      return rc;
    cur = b;
  }
  act normed;
  if ((rc = t_up(T, &cur, skips, &nskips)) || (rc = t_norm(T, &u->norm_out, &cur, 1, &normed)))
    return rc;
  return t_conv(T, &u->conv_out, &normed, out);
}

int unet_backward(const unet *u, const model_call *c, const model_grad_call *g, float *const *pg,
                  err *e) {
  int rc = unet_check_input(u, c->n, c->h, c->w, c->t, c->labels, c->cond, e);
  if (rc)
    return rc;
  workspace ws;
  if ((rc = unet_workspace_take(u, c->threads, &ws, e)))
    return rc;
  tape T = {.u = u, .n = c->n, .pg = pg, .e = e, .a = ws.a, .p = ws.p};
  act xin, t_act, cls = {0}, out, pred[UNET_MAX_LEVELS] = {{0}};
  double aux = 0;
  if ((rc = t_forward(&T, c, &xin, &t_act, &cls, g->guide_target ? pred : NULL, &out)))
    goto done;
  size_t ocount = (size_t)c->n * out.c * out.h * out.w;
  if (g->loss_grad)
    rc = g->loss_grad(out.v, out.d, g->loss_user, e);
  else
    memcpy(out.d, g->grad_out, ocount * sizeof(float));
  if (!rc && g->guide_target)
    rc = guide_loss(&T, c, g, pred, &aux);
  if (!rc && g->guide_loss)
    *g->guide_loss = aux;
  if (g->out)
    memcpy(g->out, out.v, ocount * sizeof(float));
  for (int i = T.count - 1; i >= 0 && rc == ERR_OK; i--) /* rc: loss_grad's */
    rc = grad_backward(&T.nodes[i], T.a, T.p, e);
  if (rc)
    goto done;
  if (g->grad_x) { /* the x channels of each image's conv_in input */
    const size_t plane = (size_t)xin.h * xin.w, d = (size_t)xin.c * plane;
    const size_t dx = (size_t)(xin.c - u->shape.cond_channels) * plane;
    const float f = u->center_input ? 2.0f : 1.0f;
    for (int k = 0; k < c->n; k++)
      for (size_t i = 0; i < dx; i++)
        g->grad_x[k * dx + i] = f * xin.d[k * d + i];
  }
  if (g->grad_t)
    memcpy(g->grad_t, t_act.d, (size_t)c->n * sizeof(float));
  if (g->grad_class && u->class_table)
    memcpy(g->grad_class, cls.d, (size_t)c->n * u->temb_dim * sizeof(float));
done:
  free(T.nodes);
  unet_workspace_give(u, &ws);
  return rc;
}
