/* Transformer2DModel with BasicTransformerBlocks (see transformer.h): loading under diffusers'
 * names and the forward on channel-major tokens. Like the other blocks, a dry run only counts
 * FLOPs along the same path. */
#include "transformer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

/* ---------- loading ---------- */

static int load_layer_norm(blocks_loader *ld, const char *prefix, int channels, layer_norm *ln) {
  char name[256];
  const int64_t shape[1] = {channels};
  *ln = (layer_norm){.channels = channels, .eps = 1e-5f}; /* nn.LayerNorm's default */
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(ln->gamma = blocks_load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  snprintf(name, sizeof name, "%s.bias", prefix);
  if (!(ln->beta = blocks_load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  return ERR_OK;
}

static int load_tf_attention(blocks_loader *ld, const char *prefix, int dim, int heads, int kv_dim,
                             tf_attention *a) {
  char name[256];
  *a = (tf_attention){.dim = dim, .heads = heads, .kv_dim = kv_dim};
  const char *const parts[4] = {"to_q", "to_k", "to_v", "to_out.0"};
  conv2d *const layers[4] = {&a->q, &a->k, &a->v, &a->out};
  for (int i = 0; i < 4; i++) {
    snprintf(name, sizeof name, "%s.%s", prefix, parts[i]);
    const int in = i == 1 || i == 2 ? kv_dim : dim;
    const int rc = blocks_load_token_linear(ld, name, in, dim, i == 3, layers[i]);
    if (rc)
      return rc;
  }
  return ERR_OK;
}

static int load_tf_block(blocks_loader *ld, const char *prefix, const transformer_spec *s, int dim,
                         tf_block *b) {
  char name[256];
  int rc;
  const int heads = s->heads;
  b->ff_inner = 4 * dim; /* FeedForward's mult */
  snprintf(name, sizeof name, "%s.norm1", prefix);
  if ((rc = load_layer_norm(ld, name, dim, &b->norm1)))
    return rc;
  snprintf(name, sizeof name, "%s.attn1", prefix);
  if ((rc = load_tf_attention(ld, name, dim, heads, dim, &b->attn1)))
    return rc;
  snprintf(name, sizeof name, "%s.norm2", prefix);
  if ((rc = load_layer_norm(ld, name, dim, &b->norm2)))
    return rc;
  snprintf(name, sizeof name, "%s.attn2", prefix);
  if ((rc = load_tf_attention(ld, name, dim, heads, s->cross_dim, &b->attn2)))
    return rc;
  snprintf(name, sizeof name, "%s.norm3", prefix);
  if ((rc = load_layer_norm(ld, name, dim, &b->norm3)))
    return rc;
  snprintf(name, sizeof name, "%s.ff.net.0.proj", prefix);
  if ((rc = blocks_load_token_linear(ld, name, dim, 2 * b->ff_inner, 1, &b->ff_in)))
    return rc;
  snprintf(name, sizeof name, "%s.ff.net.2", prefix);
  return blocks_load_token_linear(ld, name, b->ff_inner, dim, 1, &b->ff_out);
}

int transformer_load(blocks_loader *ld, const char *prefix, const transformer_spec *s, int channels,
                     transformer2d *t) {
  char name[256];
  int rc;
  if (s->heads < 1 || channels % s->heads)
    return err_set(ld->e, ERR_UNSUPPORTED, "%s: %d attention heads do not divide %d channels",
                   prefix, s->heads, channels);
  if (s->layers < 1)
    return err_set(ld->e, ERR_INVALID, "%s: transformer_layers_per_block must be at least 1",
                   prefix);
  *t = (transformer2d){.channels = channels, .inner = channels, .nblocks = s->layers};
  if (!(t->blocks = mem_calloc((size_t)s->layers, sizeof *t->blocks)))
    return err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", prefix);
  /* Transformer2DModel fixes this norm's eps at 1e-6, whatever norm_eps says */
  snprintf(name, sizeof name, "%s.norm", prefix);
  if ((rc = blocks_load_group_norm(ld, name, s->groups, channels, 1e-6, &t->norm)))
    return rc;
  snprintf(name, sizeof name, "%s.proj_in", prefix);
  rc = s->linear_proj ? blocks_load_token_linear(ld, name, channels, t->inner, 1, &t->proj_in)
                      : blocks_load_conv(ld, name, channels, t->inner, 1, 1, 0, 1, &t->proj_in);
  if (rc)
    return rc;
  for (int i = 0; i < s->layers; i++) {
    snprintf(name, sizeof name, "%s.transformer_blocks.%d", prefix, i);
    if ((rc = load_tf_block(ld, name, s, t->inner, &t->blocks[i])))
      return rc;
  }
  snprintf(name, sizeof name, "%s.proj_out", prefix);
  return s->linear_proj ? blocks_load_token_linear(ld, name, t->inner, channels, 1, &t->proj_out)
                        : blocks_load_conv(ld, name, t->inner, channels, 1, 1, 0, 1, &t->proj_out);
}

void transformer_free(transformer2d *t) {
  free(t->blocks);
  t->blocks = NULL;
}

/* ---------- forward ---------- */

/* Adds b to a (count floats each). */
static void add_into(float *a, const float *b, size_t count) {
  for (size_t i = 0; i < count; i++)
    a[i] += b[i];
}

static void run_layer_norm(blocks_run *f, const layer_norm *ln, const float *x, int L, float *y) {
  if (!f->dry)
    ops_layer_norm(x, f->n, ln->channels, L, ln->eps, ln->gamma, ln->beta, y, f->p);
}

/* acc (n x dim x lq) += attention of the tokens xq (n x dim x lq) to kv (n x kv_dim x lk). */
static int attention_forward(blocks_run *f, const tf_attention *a, const float *xq, int lq,
                             const float *kv, int lk, float *acc) {
  arena_mark m = arena_get_mark(f->a);
  float *q = blocks_act(f, a->dim, lq, 1), *k = blocks_act(f, a->dim, lk, 1);
  float *v = blocks_act(f, a->dim, lk, 1), *o = blocks_act(f, a->dim, lq, 1);
  if (!q || !k || !v || !o || blocks_conv(f, &a->q, xq, lq, 1, q) ||
      blocks_conv(f, &a->k, kv, lk, 1, k) || blocks_conv(f, &a->v, kv, lk, 1, v))
    return -1;
  f->flops += f->n * 2 * 2.0 * lq * lk * a->dim; /* q k^T and p v */
  if (!f->dry && ops_mha(q, k, v, f->n, a->dim, a->heads, lq, lk, o, f->a, f->p))
    return -1;
  if (blocks_conv(f, &a->out, o, lq, 1, q)) /* q is free again */
    return -1;
  if (!f->dry)
    add_into(acc, q, (size_t)f->n * a->dim * lq);
  arena_release(f->a, m);
  return 0;
}

static int block_forward(blocks_run *f, const tf_block *b, float *h, int dim, int L,
                         const float *ctx, int seq) {
  arena_mark m = arena_get_mark(f->a);
  float *a = blocks_act(f, dim, L, 1);
  if (!a)
    return -1;
  run_layer_norm(f, &b->norm1, h, L, a);
  if (attention_forward(f, &b->attn1, a, L, a, L, h))
    return -1;
  run_layer_norm(f, &b->norm2, h, L, a);
  if (attention_forward(f, &b->attn2, a, L, ctx, seq, h))
    return -1;
  run_layer_norm(f, &b->norm3, h, L, a);
  float *proj = blocks_act(f, 2 * b->ff_inner, L, 1), *gated = blocks_act(f, b->ff_inner, L, 1);
  if (!proj || !gated || blocks_conv(f, &b->ff_in, a, L, 1, proj))
    return -1;
  if (!f->dry)
    ops_geglu(proj, f->n, b->ff_inner, L, gated, f->p);
  if (blocks_conv(f, &b->ff_out, gated, L, 1, a))
    return -1;
  if (!f->dry)
    add_into(h, a, (size_t)f->n * dim * L);
  arena_release(f->a, m);
  return 0;
}

int transformer_forward(blocks_run *f, const transformer2d *t, float *x, int hw, const float *ctx,
                        int seq) {
  arena_mark m = arena_get_mark(f->a);
  float *xn = blocks_act(f, t->channels, hw, 1), *h = blocks_act(f, t->inner, hw, 1);
  if (!xn || !h)
    return -1;
  blocks_norm(f, &t->norm, x, hw, 0, xn);
  if (blocks_conv(f, &t->proj_in, xn, hw, 1, h))
    return -1;
  for (int i = 0; i < t->nblocks; i++)
    if (block_forward(f, &t->blocks[i], h, t->inner, hw, ctx, seq))
      return -1;
  if (blocks_conv(f, &t->proj_out, h, hw, 1, xn))
    return -1;
  if (!f->dry)
    add_into(x, xn, (size_t)f->n * t->channels * hw);
  arena_release(f->a, m);
  return 0;
}
