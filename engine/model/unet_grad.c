/* The UNet2DModel's gradient: the forward again, written on a tape of engine/grad nodes
 * (tape.h; each node's forward is the op the engine runs, so the tape's output is
 * unet_forward's), then the nodes' backward rules in reverse order. */
#include <math.h>
#include <string.h>

#include "tape.h"
#include "unet_impl.h"

#define MAX_SKIPS (UNET_MAX_LEVELS * UNET_MAX_LAYERS + 1)

static int t_down(tape *T, const tape_act *gfeat, tape_act *cur, tape_act *skips, int *nskips) {
  const unet *u = T->net;
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->down[i];
    for (int l = 0; l < b->nlayers; l++) {
      tape_act nx, pj, *proj = NULL;
      if (b->guide && (rc = tape_conv(T, &b->guide_proj[l], &gfeat[b->guide - 1], &pj)))
        return rc;
      if (b->guide)
        proj = &pj;
      if ((rc = tape_resnet(T, &b->res[l], cur, proj, &nx)) ||
          (b->has_attn && (rc = tape_attn(T, &b->attn[l], &nx, &nx))))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
    if (b->sample != SAMPLE_NONE) {
      tape_act nx;
      if ((rc = b->sample == SAMPLE_CONV ? tape_conv(T, &b->sample_conv, cur, &nx)
                                         : tape_resnet(T, &b->sample_res, cur, NULL, &nx)))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
  }
  return ERR_OK;
}

static int t_up(tape *T, tape_act *cur, tape_act *skips, int *nskips) {
  const unet *u = T->net;
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->up[i];
    for (int l = 0; l < b->nlayers; l++) {
      tape_act cat, nx;
      if ((rc = tape_concat(T, cur, &skips[--*nskips], &cat)) ||
          (rc = tape_resnet(T, &b->res[l], &cat, NULL, &nx)) ||
          (b->has_attn && (rc = tape_attn(T, &b->attn[l], &nx, &nx))))
        return rc;
      *cur = nx;
    }
    if (b->sample == SAMPLE_CONV) {
      tape_act upx;
      if ((rc = tape_unary(T, GRAD_UPSAMPLE_NEAREST2X, cur, &upx)) ||
          (rc = tape_conv(T, &b->sample_conv, &upx, cur)))
        return rc;
    } else if (b->sample == SAMPLE_RESNET) {
      tape_act nx;
      if ((rc = tape_resnet(T, &b->sample_res, cur, NULL, &nx)))
        return rc;
      *cur = nx;
    }
  }
  return ERR_OK;
}

/* A constant of the tape (no gradient): n x c x h x w floats. */
static int t_const(tape *T, int c, int h, int w, tape_act *a) {
  *a = (tape_act){arena_floats(T->a, (size_t)T->n * c * h * w), NULL, c, h, w};
  return a->v ? ERR_OK : err_set(T->e, ERR_NOMEM, "out of memory for the UNet's tape");
}

/* The guide networks on the tape: their features (gfeat) and, when pred is set, their auxiliary
 * predictions of the sharp grayscale (conv_out of the features plus the pooled input). */
static int t_guides(tape *T, const model_call *c, tape_act *gfeat, tape_act *pred) {
  const unet *u = T->net;
  for (int g = 0; g < u->nguide; g++) {
    const guide_net *gn = &u->guide[g];
    tape_act in, c1, head;
    int rc;
    if ((rc = t_const(T, 1, c->h >> gn->scale, c->w >> gn->scale, &in)))
      return rc;
    unet_guide_input(c->cond, u->shape.cond_channels, T->n, c->h, c->w, gn->scale, in.v);
    if ((rc = tape_conv(T, &gn->conv_in, &in, &c1)) ||
        (rc = tape_resnet(T, &gn->res, &c1, NULL, &gfeat[g])))
      return rc;
    if (pred && ((rc = tape_conv(T, &gn->conv_out, &gfeat[g], &head)) ||
                 (rc = tape_add(T, &head, &in, 1.0f, &pred[g]))))
      return rc;
  }
  return ERR_OK;
}

/* guide_weight * sum over scales of mean (pred - target)^2 into *loss, and its gradient into the
 * predictions' gradient buffers (before the backward pass reads them). */
static int guide_loss(tape *T, const model_call *c, const model_grad_call *g, const tape_act *pred,
                      double *loss) {
  const unet *u = T->net;
  *loss = 0;
  for (int k = 0; k < u->nguide; k++) {
    const tape_act *p = &pred[k];
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
static int t_forward(tape *T, const model_call *c, tape_act *xin, tape_act *t_act, tape_act *cls,
                     tape_act *pred, tape_act *out) {
  const unet *u = T->net;
  int rc = tape_new_act(T, u->shape.in_channels, c->h, c->w, xin);
  if (rc)
    return rc;
  unet_input(u, c->x, c->cond, T->n, (size_t)c->h * c->w, xin->v);
  const tape_temb temb = {.ch0 = u->ch0,
                          .flip_sin_to_cos = u->flip_sin_to_cos,
                          .freq_shift = u->freq_shift,
                          .l1 = &u->temb1,
                          .l2 = &u->temb2,
                          .class_table = u->class_table,
                          .classes = u->shape.num_classes};
  tape_act cur, skips[MAX_SKIPS], gfeat[UNET_MAX_LEVELS];
  int nskips = 0;
  if ((rc = tape_time_embedding(T, &temb, c->t, c->labels, t_act, cls)) ||
      (rc = t_guides(T, c, gfeat, pred)) || (rc = tape_conv(T, &u->conv_in, xin, &cur)))
    return rc;
  skips[nskips++] = cur;
  if ((rc = t_down(T, gfeat, &cur, skips, &nskips)))
    return rc;
  if (u->has_mid) {
    tape_act a, b;
    if ((rc = tape_resnet(T, &u->mid_res[0], &cur, NULL, &a)) ||
        (u->mid_has_attn && (rc = tape_attn(T, &u->mid_attn, &a, &a))) ||
        (rc = tape_resnet(T, &u->mid_res[1], &a, NULL, &b)))
      return rc;
    cur = b;
  }
  tape_act normed;
  if ((rc = t_up(T, &cur, skips, &nskips)) || (rc = tape_norm(T, &u->norm_out, &cur, 1, &normed)))
    return rc;
  return tape_conv(T, &u->conv_out, &normed, out);
}

int unet_backward(const unet *u, const model_call *c, const model_grad_call *g, float *const *pg,
                  err *e) {
  int rc = unet_check_input(u, c->n, c->h, c->w, c->t, c->labels, c->cond, e);
  if (rc)
    return rc;
  workspace ws;
  if ((rc = unet_workspace_take(u, c->threads, &ws, e)))
    return rc;
  tape T = {
      .ps = &u->ps, .net = u, .n = c->n, .pg = pg, .what = "UNet", .e = e, .a = ws.a, .p = ws.p};
  tape_act xin, t_act, cls = {0}, out, pred[UNET_MAX_LEVELS] = {{0}};
  double aux = 0;
  if ((rc = t_forward(&T, c, &xin, &t_act, &cls, g->guide_target ? pred : NULL, &out)))
    goto done;
  rc = tape_seed(&T, &out, g);
  if (!rc && g->guide_target)
    rc = guide_loss(&T, c, g, pred, &aux);
  if (!rc && g->guide_loss)
    *g->guide_loss = aux;
  if (rc || (rc = tape_backward(&T))) /* rc: loss_grad's or guide_loss's */
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
  tape_free(&T);
  unet_workspace_give(u, &ws);
  return rc;
}
