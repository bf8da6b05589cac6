/* The UNet2DConditionModel's gradient: its forward recorded on the model room's tape (tape.h)
 * as cunet.c and transformer.c run it -- the resnets and time embedding UNet2DModel's backward
 * records too, plus the Transformer2DModel blocks (group norm, proj_in, layer norms,
 * self-attention, cross-attention to the text's hidden states, GEGLU feed-forward, proj_out,
 * residuals) -- then the tape's reverse sweep. The hidden states are one leaf read by every
 * cross-attention's key and value projections, so dL/d(encoder_hidden_states) collects each
 * block's share. */
#include <string.h>

#include "cunet_impl.h"
#include "tape.h"

static int t_layer_norm(tape *T, const layer_norm *ln, const tape_act *x, tape_act *y) {
  grad_node nd = tape_node(T, GRAD_LAYER_NORM, x);
  nd.p.ln.eps = ln->eps;
  nd.src[1] = ln->gamma;
  nd.src[2] = ln->beta;
  nd.dsrc[1] = tape_pgrad(T, ln->gamma);
  nd.dsrc[2] = tape_pgrad(T, ln->beta);
  const tape_act *in[] = {x};
  return tape_emit(T, &nd, in, 1, x->c, x->h, x->w, y);
}

/* y = res + attention of the tokens xq to kv (itself for self-attention), as
 * transformer.c's attention_forward adds it. Tokens keep their (h, w) shape: every projection
 * is a 1x1 convolution and the attention reads h * w positions. */
static int t_attention(tape *T, const tf_attention *a, const tape_act *xq, const tape_act *kv,
                       const tape_act *res, tape_act *y) {
  tape_act q, k, v, o, p;
  int rc;
  if ((rc = tape_conv(T, &a->q, xq, &q)) || (rc = tape_conv(T, &a->k, kv, &k)) ||
      (rc = tape_conv(T, &a->v, kv, &v)))
    return rc;
  grad_node nd = tape_node(T, GRAD_MHA, &q);
  nd.p.mha.heads = a->heads;
  nd.p.mha.lk = kv->h * kv->w;
  const tape_act *in[] = {&q, &k, &v};
  if ((rc = tape_emit(T, &nd, in, 3, a->dim, q.h, q.w, &o)) || (rc = tape_conv(T, &a->out, &o, &p)))
    return rc;
  return tape_add(T, res, &p, 1.0f, y);
}

/* A BasicTransformerBlock: norm1 + self-attention, norm2 + cross-attention, norm3 + GEGLU
 * feed-forward, each added back. */
static int t_block(tape *T, const tf_block *b, const tape_act *x, const tape_act *ctx,
                   tape_act *y) {
  tape_act a1, h1, a2, h2, a3, proj, gated, f;
  int rc;
  if ((rc = t_layer_norm(T, &b->norm1, x, &a1)) ||
      (rc = t_attention(T, &b->attn1, &a1, &a1, x, &h1)) ||
      (rc = t_layer_norm(T, &b->norm2, &h1, &a2)) ||
      (rc = t_attention(T, &b->attn2, &a2, ctx, &h1, &h2)) ||
      (rc = t_layer_norm(T, &b->norm3, &h2, &a3)) || (rc = tape_conv(T, &b->ff_in, &a3, &proj)))
    return rc;
  grad_node nd = tape_node(T, GRAD_GEGLU, &proj);
  const tape_act *in[] = {&proj};
  if ((rc = tape_emit(T, &nd, in, 1, b->ff_inner, proj.h, proj.w, &gated)) ||
      (rc = tape_conv(T, &b->ff_out, &gated, &f)))
    return rc;
  return tape_add(T, &h2, &f, 1.0f, y);
}

/* Transformer2DModel: group norm, proj_in, the blocks, proj_out, plus the input. */
static int t_transformer(tape *T, const transformer2d *t, const tape_act *x, const tape_act *ctx,
                         tape_act *y) {
  tape_act xn, h, po;
  int rc;
  if ((rc = tape_norm(T, &t->norm, x, 0, &xn)) || (rc = tape_conv(T, &t->proj_in, &xn, &h)))
    return rc;
  for (int i = 0; i < t->nblocks; i++) {
    tape_act nx;
    if ((rc = t_block(T, &t->blocks[i], &h, ctx, &nx)))
      return rc;
    h = nx;
  }
  if ((rc = tape_conv(T, &t->proj_out, &h, &po)))
    return rc;
  return tape_add(T, x, &po, 1.0f, y);
}

#define MAX_SKIPS (CUNET_MAX_LEVELS * CUNET_MAX_LAYERS + 1)

/* A resnet, then its level's transformer when the level has cross-attention. */
static int t_layer(tape *T, const cblock *b, int l, const tape_act *x, const tape_act *ctx,
                   tape_act *y) {
  tape_act r;
  int rc = tape_resnet(T, &b->res[l], x, NULL, b->has_xattn ? &r : y);
  if (rc || !b->has_xattn)
    return rc;
  return t_transformer(T, &b->tf[l], &r, ctx, y);
}

static int t_down(tape *T, const cunet *u, const tape_act *ctx, tape_act *cur, tape_act *skips,
                  int *nskips) {
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const cblock *b = &u->down[i];
    for (int l = 0; l < b->nlayers; l++) {
      tape_act nx;
      if ((rc = t_layer(T, b, l, cur, ctx, &nx)))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
    if (b->has_sample) {
      tape_act nx;
      if ((rc = tape_conv(T, &b->sample_conv, cur, &nx)))
        return rc;
      skips[(*nskips)++] = *cur = nx;
    }
  }
  return ERR_OK;
}

static int t_up(tape *T, const cunet *u, const tape_act *ctx, tape_act *cur, tape_act *skips,
                int *nskips) {
  int rc;
  for (int i = 0; i < u->nlevels; i++) {
    const cblock *b = &u->up[i];
    for (int l = 0; l < b->nlayers; l++) {
      tape_act cat, nx;
      if ((rc = tape_concat(T, cur, &skips[--*nskips], &cat)) ||
          (rc = t_layer(T, b, l, &cat, ctx, &nx)))
        return rc;
      *cur = nx;
    }
    if (b->has_sample) {
      tape_act upx;
      if ((rc = tape_unary(T, GRAD_UPSAMPLE_NEAREST2X, cur, &upx)) ||
          (rc = tape_conv(T, &b->sample_conv, &upx, cur)))
        return rc;
    }
  }
  return ERR_OK;
}

/* The network's leaves and output. */
typedef struct cleaves {
  tape_act xin, t, cls, ctx, out;
} cleaves;

static int t_forward(tape *T, const cunet *u, const model_call *c, cleaves *L) {
  const int d = u->shape.cross_dim;
  int rc;
  if ((rc = tape_new_act(T, u->shape.in_channels, c->h, c->w, &L->xin)) ||
      (rc = tape_new_act(T, d, c->seq_len, 1, &L->ctx)))
    return rc;
  for (size_t i = 0; i < (size_t)c->n * L->xin.c * c->h * c->w; i++)
    L->xin.v[i] = u->center_input ? 2.0f * c->x[i] - 1.0f : c->x[i];
  cunet_transpose(c->encoder_hidden_states, c->n, c->seq_len, d, L->ctx.v);
  const tape_temb temb = {.ch0 = u->ch0,
                          .flip_sin_to_cos = u->flip_sin_to_cos,
                          .freq_shift = u->freq_shift,
                          .l1 = &u->temb1,
                          .l2 = &u->temb2,
                          .class_table = u->class_table,
                          .classes = u->shape.num_classes};
  tape_act cur, skips[MAX_SKIPS];
  int nskips = 0;
  if ((rc = tape_time_embedding(T, &temb, c->t, c->labels, &L->t, &L->cls)) ||
      (rc = tape_conv(T, &u->conv_in, &L->xin, &cur)))
    return rc;
  skips[nskips++] = cur;
  if ((rc = t_down(T, u, &L->ctx, &cur, skips, &nskips)))
    return rc;
  if (u->has_mid) {
    tape_act a, b, m;
    if ((rc = tape_resnet(T, &u->mid_res[0], &cur, NULL, &a)) ||
        (rc = t_transformer(T, &u->mid_tf, &a, &L->ctx, &b)) ||
        (rc = tape_resnet(T, &u->mid_res[1], &b, NULL, &m)))
      return rc;
    cur = m;
  }
  tape_act normed;
  if ((rc = t_up(T, u, &L->ctx, &cur, skips, &nskips)) ||
      (rc = tape_norm(T, &u->norm_out, &cur, 1, &normed)))
    return rc;
  return tape_conv(T, &u->conv_out, &normed, &L->out);
}

int cunet_backward(const cunet *u, const model_call *c, const model_grad_call *g, float *const *pg,
                   err *e) {
  int rc = cunet_check_call(u, c, e);
  if (rc)
    return rc;
  workspace ws;
  blocks_spares *spares = (blocks_spares *)&u->spares; /* only the cache changes, locked */
  if ((rc = blocks_workspace_take(spares, c->threads, &ws, e)))
    return rc;
  tape T = {.ps = &u->ps,
            .n = c->n,
            .pg = pg,
            .what = "UNet2DConditionModel",
            .e = e,
            .a = ws.a,
            .p = ws.p};
  cleaves L = {0};
  if ((rc = t_forward(&T, u, c, &L)) || (rc = tape_seed(&T, &L.out, g)) || (rc = tape_backward(&T)))
    goto done;
  const size_t nx = (size_t)c->n * L.xin.c * c->h * c->w;
  const float f = u->center_input ? 2.0f : 1.0f;
  for (size_t i = 0; g->grad_x && i < nx; i++)
    g->grad_x[i] = f * L.xin.d[i];
  if (g->grad_t)
    memcpy(g->grad_t, L.t.d, (size_t)c->n * sizeof(float));
  if (g->grad_class && u->class_table)
    memcpy(g->grad_class, L.cls.d, (size_t)c->n * u->shape.temb_dim * sizeof(float));
  if (g->grad_encoder_hidden_states)
    cunet_transpose(L.ctx.d, c->n, u->shape.cross_dim, c->seq_len, g->grad_encoder_hidden_states);
done:
  tape_free(&T);
  blocks_workspace_give(spares, &ws);
  return rc;
}
