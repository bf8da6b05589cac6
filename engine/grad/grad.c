/* The table of backward rules, the checks every node passes before a rule runs, and the rules
 * small enough to sit beside it (element-wise ops, resampling, pooling, embeddings,
 * concatenation, scale-shift, residual add). The forwards of the ops the UNet writes inline
 * (engine/model/ unet.c: the time-embedding add and scale-shift, class rows, skip concatenation,
 * residuals) repeat its arithmetic exactly, so a backward composed from this table differentiates
 * what the engine runs. */
#include "grad.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "grad_rules.h"

static size_t numel(const grad_node *nd) {
  return (size_t)nd->n * nd->c * nd->h * nd->w;
}

/* ---------- checks ---------- */

static const char *op_name(const grad_node *nd);

/* The checks take backward = -1 for a size query, 0 before a forward, 1 before a backward. */

static int bad(const grad_node *nd, err *e, const char *field, const char *why) {
  return err_set(e, ERR_INVALID, "grad node (%s): '%s' %s", op_name(nd), field, why);
}

/* Rules on vectors ([n][c]) take h = w = 1. */
static int check_vector(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->h != 1 || nd->w != 1)
    return bad(nd, e, "h", "and 'w' must be 1 for an op on [n][c] vectors");
  return ERR_OK;
}

static int check_none(const grad_node *nd, int backward, err *e) {
  (void)nd;
  (void)backward;
  (void)e;
  return ERR_OK;
}

static int check_conv(const grad_node *nd, int backward, err *e) {
  const conv2d *c = nd->p.conv;
  if (!c)
    return bad(nd, e, "p.conv", "is missing");
  if (c->cin != nd->c)
    return bad(nd, e, "c", "differs from the convolution's input channels");
  if (c->cout < 1 || c->k < 1 || c->stride < 1 || c->pad_top < 0 || c->pad_left < 0 ||
      c->pad_bottom < 0 || c->pad_right < 0 || !c->weight)
    return bad(nd, e, "p.conv", "needs cout, k, stride >= 1, pads >= 0 and a weight");
  int oh, ow;
  ops_conv2d_out_size(c, nd->h, nd->w, &oh, &ow);
  if (oh < 1 || ow < 1)
    return bad(nd, e, "h", "and 'w' are smaller than the kernel");
  if (backward == 0 && !ops_conv2d_packed(c))
    return bad(nd, e, "p.conv", "is not packed (ops_conv2d_pack)");
  if (backward > 0 && nd->dsrc[2] && !c->bias)
    return bad(nd, e, "dsrc[2]", "asks for the gradient of a bias the convolution lacks");
  return ERR_OK;
}

/* A norm's epsilon (named by field) and, before a backward, the gamma and beta whose
 * gradients dsrc[1] and dsrc[2] ask for: what group and layer norms check alike. */
static int check_norm(const grad_node *nd, int backward, float eps, const char *field, err *e) {
  if (!(eps > 0) || !isfinite(eps))
    return bad(nd, e, field, "must be positive and finite");
  if (backward > 0 && ((nd->dsrc[1] && !nd->src[1]) || (nd->dsrc[2] && !nd->src[2])))
    return bad(nd, e, "dsrc[1]", "and 'dsrc[2]' need the gamma and beta they differentiate");
  return ERR_OK;
}

static int check_gn(const grad_node *nd, int backward, err *e) {
  if (nd->p.gn.groups < 1 || nd->c % nd->p.gn.groups)
    return bad(nd, e, "p.gn.groups", "must be positive and divide the channels");
  return check_norm(nd, backward, nd->p.gn.eps, "p.gn.eps", e);
}

static int check_linear(const grad_node *nd, int backward, err *e) {
  if (nd->p.linear.out < 1)
    return bad(nd, e, "p.linear.out", "must be positive");
  if (backward > 0 && nd->dsrc[2] && !nd->src[2])
    return bad(nd, e, "dsrc[2]", "asks for the gradient of a missing bias");
  return check_vector(nd, backward, e);
}

static int check_attn(const grad_node *nd, int backward, err *e) {
  const attn_weights *aw = nd->p.attn;
  if (!aw)
    return bad(nd, e, "p.attn", "is missing");
  if (aw->channels != nd->c || aw->heads < 1 || nd->c % aw->heads)
    return bad(nd, e, "p.attn", "must have c channels in heads that divide them");
  if (aw->rescale == 0 || !isfinite(aw->rescale))
    return bad(nd, e, "p.attn.rescale", "must be finite and non-zero");
  for (int i = 0; i < 4; i++)
    if (!aw->proj[i].weight || !aw->proj[i].bias || !ops_conv2d_packed(&aw->proj[i]))
      return bad(nd, e, "p.attn", "is not packed (ops_attention_pack)");
  if (aw->groups > 0 && (nd->c % aw->groups || !aw->norm_gamma || !aw->norm_beta))
    return bad(nd, e, "p.attn.groups", "must divide the channels, with gamma and beta");
  if (backward > 0 && aw->groups <= 0 && (nd->dsrc[1] || nd->dsrc[2]))
    return bad(nd, e, "dsrc[1]", "asks for a group norm the block does not have");
  return ERR_OK;
}

static int check_pool(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->h < 2 || nd->w < 2)
    return bad(nd, e, "h", "and 'w' must be at least 2 to pool");
  return ERR_OK;
}

static int check_temb(const grad_node *nd, int backward, err *e) {
  if (nd->c < 2 || (float)(nd->c / 2) == nd->p.temb.freq_shift)
    return bad(nd, e, "c", "must be at least 2 and differ from 2 * freq_shift");
  return check_vector(nd, backward, e);
}

static int check_mlp(const grad_node *nd, int backward, err *e) {
  if (nd->p.mlp.hidden < 1 || nd->p.mlp.out < 1)
    return bad(nd, e, "p.mlp", "needs positive hidden and out sizes");
  return check_vector(nd, backward, e);
}

static int check_embed(const grad_node *nd, int backward, err *e) {
  if (!nd->p.embed.labels || nd->p.embed.classes < 1)
    return bad(nd, e, "p.embed", "needs labels and a positive class count");
  for (int i = 0; i < nd->n; i++)
    if (nd->p.embed.labels[i] < 0 || nd->p.embed.labels[i] >= nd->p.embed.classes)
      return err_set(e, ERR_INVALID, "grad node (%s): 'p.embed.labels'[%d] = %lld out of [0, %d)",
                     op_name(nd), i, (long long)nd->p.embed.labels[i], nd->p.embed.classes);
  return check_vector(nd, backward, e);
}

static int check_concat(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->p.concat.cb < 1)
    return bad(nd, e, "p.concat.cb", "must be positive");
  return ERR_OK;
}

static int check_add(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->p.add.divisor == 0 || !isfinite(nd->p.add.divisor))
    return bad(nd, e, "p.add.divisor", "must be finite and non-zero");
  return ERR_OK;
}

static int check_ln(const grad_node *nd, int backward, err *e) {
  return check_norm(nd, backward, nd->p.ln.eps, "p.ln.eps", e);
}

static int check_geglu(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->c % 2)
    return bad(nd, e, "c", "must be even: the projection's halves are the value and the gate");
  return ERR_OK;
}

static int check_mha(const grad_node *nd, int backward, err *e) {
  (void)backward;
  if (nd->p.mha.heads < 1 || nd->c % nd->p.mha.heads)
    return bad(nd, e, "p.mha.heads", "must be positive and divide the channels");
  if (nd->p.mha.lk < 1)
    return bad(nd, e, "p.mha.lk", "must be positive");
  if (nd->p.mha.causal && nd->p.mha.lk != nd->h * nd->w)
    return bad(nd, e, "p.mha.causal", "needs as many keys as queries (p.mha.lk == h * w)");
  return ERR_OK;
}

static int check_tok(const grad_node *nd, int backward, err *e) {
  (void)backward;
  int L = nd->h * nd->w;
  if (!nd->p.tok.ids || nd->p.tok.vocab < 1)
    return bad(nd, e, "p.tok", "needs ids and a positive vocabulary size");
  if (nd->p.tok.positions < L)
    return bad(nd, e, "p.tok.positions", "is smaller than the sequence length h * w");
  for (size_t i = 0; i < (size_t)nd->n * L; i++)
    if (nd->p.tok.ids[i] < 0 || nd->p.tok.ids[i] >= nd->p.tok.vocab)
      return err_set(e, ERR_INVALID, "grad node (%s): 'p.tok.ids'[%zu] = %lld out of [0, %d)",
                     op_name(nd), i, (long long)nd->p.tok.ids[i], nd->p.tok.vocab);
  return ERR_OK;
}

/* ---------- sizes ---------- */

static size_t size_same(const grad_node *nd, int slot) {
  (void)slot;
  return numel(nd);
}

static size_t size_conv(const grad_node *nd, int slot) {
  const conv2d *c = nd->p.conv;
  int oh, ow;
  ops_conv2d_out_size(c, nd->h, nd->w, &oh, &ow);
  const size_t sizes[] = {(size_t)nd->n * c->cout * oh * ow, numel(nd),
                          (size_t)c->cout * c->cin * c->k * c->k, (size_t)c->cout};
  return sizes[slot + 1];
}

/* A norm over channels (group or layer norm): x and y alike, gamma and beta one per channel. */
static size_t size_norm(const grad_node *nd, int slot) {
  return slot >= 1 ? (size_t)nd->c : numel(nd);
}

static size_t size_linear(const grad_node *nd, int slot) {
  size_t out = (size_t)nd->p.linear.out;
  const size_t sizes[] = {nd->n * out, numel(nd), out * nd->c, out};
  return sizes[slot + 1];
}

static size_t size_attn(const grad_node *nd, int slot) {
  if (slot < 1)
    return numel(nd);
  return slot <= 2 || slot % 2 == 0 ? (size_t)nd->c : (size_t)nd->c * nd->c;
}

static size_t size_up(const grad_node *nd, int slot) {
  return slot < 0 ? 4 * numel(nd) : numel(nd);
}

static size_t size_pool(const grad_node *nd, int slot) {
  return slot < 0 ? (size_t)nd->n * nd->c * (nd->h / 2) * (nd->w / 2) : numel(nd);
}

static size_t size_temb(const grad_node *nd, int slot) {
  return slot < 0 ? numel(nd) : (size_t)nd->n;
}

static size_t size_mlp(const grad_node *nd, int slot) {
  size_t hid = (size_t)nd->p.mlp.hidden, out = (size_t)nd->p.mlp.out;
  const size_t sizes[] = {nd->n * out, numel(nd), hid * nd->c, hid, out * hid, out};
  return sizes[slot + 1];
}

static size_t size_embed(const grad_node *nd, int slot) {
  return slot < 0 ? numel(nd) : (size_t)nd->p.embed.classes * nd->c;
}

static size_t size_concat(const grad_node *nd, int slot) {
  size_t hw = (size_t)nd->h * nd->w, cb = (size_t)nd->p.concat.cb;
  const size_t sizes[] = {nd->n * (nd->c + cb) * hw, numel(nd), nd->n * cb * hw};
  return sizes[slot + 1];
}

static size_t size_ss(const grad_node *nd, int slot) {
  return slot == 1 ? (size_t)nd->n * nd->c * (nd->p.ss.has_scale ? 2 : 1) : numel(nd);
}

static size_t size_gap(const grad_node *nd, int slot) {
  return slot < 0 ? (size_t)nd->n * nd->c : numel(nd);
}

static size_t size_geglu(const grad_node *nd, int slot) {
  return slot < 0 ? numel(nd) / 2 : numel(nd);
}

static size_t size_mha(const grad_node *nd, int slot) {
  return slot >= 1 ? (size_t)nd->n * nd->c * nd->p.mha.lk : numel(nd);
}

static size_t size_tok(const grad_node *nd, int slot) {
  const size_t sizes[] = {numel(nd), (size_t)nd->p.tok.vocab * nd->c,
                          (size_t)nd->p.tok.positions * nd->c};
  return sizes[slot + 1];
}

/* ---------- forwards ---------- */

static int fwd_conv(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  if (ops_conv2d(nd->p.conv, nd->src[0], nd->n, nd->h, nd->w, dst, a, p))
    return err_set(e, ERR_NOMEM, "out of memory in a convolution");
  return ERR_OK;
}

static int fwd_gn(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)e;
  ops_group_norm(nd->src[0], nd->n, nd->c, nd->h * nd->w, nd->p.gn.groups, nd->p.gn.eps, nd->src[1],
                 nd->src[2], nd->p.gn.silu, dst, p);
  return ERR_OK;
}

static int fwd_silu(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  ops_silu(nd->src[0], numel(nd), dst);
  return ERR_OK;
}

static int fwd_linear(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  ops_linear(nd->src[0], nd->n, nd->c, nd->p.linear.out, nd->src[1], nd->src[2], dst);
  return ERR_OK;
}

static int fwd_attn(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  if (ops_attention(nd->p.attn, nd->src[0], nd->n, nd->h * nd->w, dst, a, p))
    return err_set(e, ERR_NOMEM, "out of memory in an attention block");
  return ERR_OK;
}

static int fwd_up(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  ops_upsample_nearest2x(nd->src[0], nd->n, nd->c, nd->h, nd->w, dst);
  return ERR_OK;
}

static int fwd_pool(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  ops_avgpool2x2(nd->src[0], nd->n, nd->c, nd->h, nd->w, dst);
  return ERR_OK;
}

static int fwd_temb(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  ops_timestep_embedding(nd->src[0], nd->n, nd->c, nd->p.temb.flip_sin_to_cos,
                         nd->p.temb.freq_shift, dst);
  return ERR_OK;
}

static int fwd_mlp(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)p;
  arena_mark m = arena_get_mark(a);
  int n = nd->n, hid = nd->p.mlp.hidden;
  float *h = arena_floats(a, (size_t)n * hid);
  if (!h)
    return err_set(e, ERR_NOMEM, "out of memory in a time-embedding MLP");
  ops_linear(nd->src[0], n, nd->c, hid, nd->src[1], nd->src[2], h);
  ops_silu(h, (size_t)n * hid, h);
  ops_linear(h, n, hid, nd->p.mlp.out, nd->src[3], nd->src[4], dst);
  arena_release(a, m);
  return ERR_OK;
}

static int fwd_embed(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  for (int i = 0; i < nd->n; i++)
    memcpy(dst + (size_t)i * nd->c, nd->src[0] + (size_t)nd->p.embed.labels[i] * nd->c,
           sizeof(float) * nd->c);
  return ERR_OK;
}

static int fwd_concat(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t hw = (size_t)nd->h * nd->w, ca = (size_t)nd->c * hw, cb = (size_t)nd->p.concat.cb * hw;
  for (int i = 0; i < nd->n; i++) {
    memcpy(dst + i * (ca + cb), nd->src[0] + i * ca, sizeof(float) * ca);
    memcpy(dst + i * (ca + cb) + ca, nd->src[1] + i * cb, sizeof(float) * cb);
  }
  return ERR_OK;
}

/* The resnet's use of its time projection: x + emb (default) or x * (1 + scale) + shift. */
static int fwd_ss(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int c = nd->c, hw = nd->h * nd->w, s = nd->p.ss.has_scale;
  for (int i = 0; i < nd->n; i++)
    for (int ch = 0; ch < c; ch++) {
      size_t off = ((size_t)i * c + ch) * hw;
      const float *x = nd->src[0] + off;
      float *y = dst + off;
      if (s) {
        float sc = nd->src[1][(size_t)i * 2 * c + ch], sh = nd->src[1][(size_t)i * 2 * c + c + ch];
        for (int k = 0; k < hw; k++)
          y[k] = x[k] * (1.0f + sc) + sh;
      } else {
        float v = nd->src[1][(size_t)i * c + ch];
        for (int k = 0; k < hw; k++)
          y[k] = x[k] + v;
      }
    }
  return ERR_OK;
}

static int fwd_add(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  for (size_t i = 0; i < count; i++)
    dst[i] = (nd->src[0][i] + nd->src[1][i]) / nd->p.add.divisor;
  return ERR_OK;
}

static int fwd_relu(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  for (size_t i = 0; i < count; i++)
    dst[i] = nd->src[0][i] > 0.0f ? nd->src[0][i] : 0.0f;
  return ERR_OK;
}

/* The window's first maximum in row-major order wins, as PyTorch's CPU kernel picks it (which
 * element of a tie gets the gradient). */
static size_t maxpool_arg(const float *x, int w, int oy, int ox) {
  size_t best = (size_t)(2 * oy) * w + 2 * ox;
  for (int dy = 0; dy < 2; dy++)
    for (int dx = 0; dx < 2; dx++) {
      size_t k = (size_t)(2 * oy + dy) * w + 2 * ox + dx;
      if (x[k] > x[best] || isnan(x[k]))
        best = k;
    }
  return best;
}

static int fwd_maxpool(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int h = nd->h, w = nd->w, oh = h / 2, ow = w / 2;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    const float *x = nd->src[0] + plane * h * w;
    float *y = dst + plane * oh * ow;
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++)
        y[(size_t)oy * ow + ox] = x[maxpool_arg(x, w, oy, ox)];
  }
  return ERR_OK;
}

/* Sums in double, then one division: within a rounding of PyTorch's adaptive_avg_pool2d(1). */
static int fwd_gap(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t hw = (size_t)nd->h * nd->w;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    double s = 0;
    for (size_t k = 0; k < hw; k++)
      s += nd->src[0][plane * hw + k];
    dst[plane] = (float)(s / (double)hw);
  }
  return ERR_OK;
}

static int fwd_ln(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)e;
  ops_layer_norm(nd->src[0], nd->n, nd->c, nd->h * nd->w, nd->p.ln.eps, nd->src[1], nd->src[2], dst,
                 p);
  return ERR_OK;
}

/* The exact GELU as torch's default and the CLIP text encoder's "gelu" compute it. */
static float gelu(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

static float dgelu(float x) {
  return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
         x * 0.39894228040143268f * expf(-0.5f * x * x);
}

static int fwd_gelu(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  for (size_t i = 0; i < count; i++)
    dst[i] = gelu(nd->src[0][i]);
  return ERR_OK;
}

/* CLIP's quick_gelu, x sigmoid(1.702 x), written as engine/text/clip_text.c computes it. */
static int fwd_qgelu(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  for (size_t i = 0; i < count; i++)
    dst[i] = nd->src[0][i] / (1.0f + expf(-1.702f * nd->src[0][i]));
  return ERR_OK;
}

static int fwd_geglu(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)e;
  ops_geglu(nd->src[0], nd->n, nd->c / 2, nd->h * nd->w, dst, p);
  return ERR_OK;
}

/* Token row plus position row, channel-major, as engine/text/clip_text.c embeds a prompt. */
static int fwd_tok(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int d = nd->c, L = nd->h * nd->w;
  for (int i = 0; i < nd->n; i++)
    for (int t = 0; t < L; t++) {
      const float *te = nd->src[0] + (size_t)nd->p.tok.ids[(size_t)i * L + t] * d;
      const float *pe = nd->src[1] + (size_t)t * d;
      for (int c = 0; c < d; c++)
        dst[((size_t)i * d + c) * L + t] = te[c] + pe[c];
    }
  return ERR_OK;
}

/* ---------- backwards ---------- */

/* The backward of an elementwise activation y = f(x): dx += dy f'(x). */
static void bwd_pointwise(const grad_node *nd, float (*deriv)(float)) {
  size_t count = numel(nd);
  if (nd->dsrc[0])
    for (size_t i = 0; i < count; i++)
      nd->dsrc[0][i] += nd->ddst[i] * deriv(nd->src[0][i]);
}

static int bwd_gelu(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  bwd_pointwise(nd, dgelu);
  return ERR_OK;
}

/* d/dx of x sigmoid(1.702 x). */
static float dqgelu(float x) {
  float s = 1.0f / (1.0f + expf(-1.702f * x));
  return s + 1.702f * x * s * (1.0f - s);
}

static int bwd_qgelu(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  bwd_pointwise(nd, dqgelu);
  return ERR_OK;
}

/* y = a gelu(g): da = dy gelu(g), dg = dy a gelu'(g). */
static int bwd_geglu(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t half = (size_t)nd->c / 2 * nd->h * nd->w;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (int i = 0; i < nd->n; i++) {
    const float *xa = nd->src[0] + 2 * half * i, *xg = xa + half, *dy = nd->ddst + half * i;
    float *da = nd->dsrc[0] + 2 * half * i, *dg = da + half;
    for (size_t k = 0; k < half; k++) {
      da[k] += dy[k] * gelu(xg[k]);
      dg[k] += dy[k] * xa[k] * dgelu(xg[k]);
    }
  }
  return ERR_OK;
}

/* Rows of both tables receive their tokens' gradients in (prompt, position) order. */
static int bwd_tok(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int d = nd->c, L = nd->h * nd->w;
  for (int i = 0; i < nd->n; i++)
    for (int t = 0; t < L; t++) {
      float *dt = nd->dsrc[0] ? nd->dsrc[0] + (size_t)nd->p.tok.ids[(size_t)i * L + t] * d : NULL;
      float *dp = nd->dsrc[1] ? nd->dsrc[1] + (size_t)t * d : NULL;
      for (int c = 0; c < d; c++) {
        float g = nd->ddst[((size_t)i * d + c) * L + t];
        if (dt)
          dt[c] += g;
        if (dp)
          dp[c] += g;
      }
    }
  return ERR_OK;
}

/* PyTorch's threshold_backward: no gradient where the input is <= 0. */
static int bwd_relu(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  if (nd->dsrc[0])
    for (size_t i = 0; i < count; i++)
      if (nd->src[0][i] > 0.0f)
        nd->dsrc[0][i] += nd->ddst[i];
  return ERR_OK;
}

static int bwd_maxpool(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int h = nd->h, w = nd->w, oh = h / 2, ow = w / 2;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    const float *x = nd->src[0] + plane * h * w, *dy = nd->ddst + plane * oh * ow;
    float *dx = nd->dsrc[0] + plane * h * w;
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++)
        dx[maxpool_arg(x, w, oy, ox)] += dy[(size_t)oy * ow + ox];
  }
  return ERR_OK;
}

static int bwd_gap(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t hw = (size_t)nd->h * nd->w;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    const float g = nd->ddst[plane] / (float)hw;
    for (size_t k = 0; k < hw; k++)
      nd->dsrc[0][plane * hw + k] += g;
  }
  return ERR_OK;
}

static int bwd_silu(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  bwd_pointwise(nd, grad_dsilu);
  return ERR_OK;
}

/* Rows are visited in order, each by one single-threaded BLAS call (ops_init), so the weight
 * gradient sums the batch in a fixed order. */
static int bwd_linear(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int in = nd->c, out = nd->p.linear.out;
  for (int i = 0; i < nd->n; i++) {
    const float *dy = nd->ddst + (size_t)i * out, *x = nd->src[0] + (size_t)i * in;
    if (nd->dsrc[0])
      cblas_sgemv(CblasRowMajor, CblasTrans, out, in, 1.0f, nd->src[1], in, dy, 1, 1.0f,
                  nd->dsrc[0] + (size_t)i * in, 1);
    if (nd->dsrc[1])
      cblas_sger(CblasRowMajor, out, in, 1.0f, dy, 1, x, 1, nd->dsrc[1], in);
    if (nd->dsrc[2])
      for (int o = 0; o < out; o++)
        nd->dsrc[2][o] += dy[o];
  }
  return ERR_OK;
}

static int bwd_up(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int h = nd->h, w = nd->w;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    const float *dy = nd->ddst + plane * 4 * h * w;
    float *dx = nd->dsrc[0] + plane * h * w;
    for (int iy = 0; iy < h; iy++) {
      const float *r0 = dy + (size_t)(2 * iy) * 2 * w, *r1 = r0 + 2 * w;
      for (int ix = 0; ix < w; ix++)
        dx[(size_t)iy * w + ix] += (r0[2 * ix] + r0[2 * ix + 1]) + (r1[2 * ix] + r1[2 * ix + 1]);
    }
  }
  return ERR_OK;
}

static int bwd_pool(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int h = nd->h, w = nd->w, oh = h / 2, ow = w / 2;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (size_t plane = 0; plane < (size_t)nd->n * nd->c; plane++) {
    const float *dy = nd->ddst + plane * oh * ow;
    float *dx = nd->dsrc[0] + plane * h * w;
    for (int oy = 0; oy < oh; oy++)
      for (int ox = 0; ox < ow; ox++) {
        float g = dy[(size_t)oy * ow + ox] * 0.25f, *q = dx + (size_t)(2 * oy) * w + 2 * ox;
        q[0] += g;
        q[1] += g;
        q[w] += g;
        q[w + 1] += g;
      }
  }
  return ERR_OK;
}

/* d/dt of sin(t f) and cos(t f), with f computed in float exactly as the forward does. */
static int bwd_temb(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int dim = nd->c, half = dim / 2, flip = nd->p.temb.flip_sin_to_cos;
  const float neg_log_period = (float)-log(10000.0);
  if (!nd->dsrc[0])
    return ERR_OK;
  for (int i = 0; i < nd->n; i++) {
    const float *dy = nd->ddst + (size_t)i * dim;
    double dt = 0;
    for (int k = 0; k < half; k++) {
      float expo = neg_log_period * (float)k;
      expo = expo / ((float)half - nd->p.temb.freq_shift);
      float f = expf(expo), arg = nd->src[0][i] * f;
      float ds = dy[flip ? half + k : k], dc = dy[flip ? k : half + k];
      dt += (double)f * ((double)ds * cos(arg) - (double)dc * sin(arg));
    }
    nd->dsrc[0][i] += (float)dt;
  }
  return ERR_OK;
}

/* linear_2(silu(linear_1(e))), differentiated by the linear and SiLU rules in turn. */
static int bwd_mlp(const grad_node *nd, arena *a, pool *p, err *e) {
  int n = nd->n, hid = nd->p.mlp.hidden, rc;
  arena_mark m = arena_get_mark(a);
  float *h = arena_floats(a, (size_t)n * hid), *s = arena_floats(a, (size_t)n * hid);
  float *ds = arena_floats(a, (size_t)n * hid), *dh = arena_floats(a, (size_t)n * hid);
  if (!h || !s || !ds || !dh)
    return err_set(e, ERR_NOMEM, "out of memory for the gradient of a time-embedding MLP");
  memset(ds, 0, sizeof(float) * n * hid);
  memset(dh, 0, sizeof(float) * n * hid);
  ops_linear(nd->src[0], n, nd->c, hid, nd->src[1], nd->src[2], h);
  ops_silu(h, (size_t)n * hid, s);
  grad_node l2 = {.op = GRAD_LINEAR, .n = n, .c = hid, .h = 1, .w = 1};
  l2.p.linear.out = nd->p.mlp.out;
  l2.src[0] = s;
  l2.src[1] = nd->src[3];
  l2.src[2] = nd->src[4];
  l2.ddst = nd->ddst;
  l2.dsrc[0] = ds;
  l2.dsrc[1] = nd->dsrc[3];
  l2.dsrc[2] = nd->dsrc[4];
  grad_node act = {.op = GRAD_SILU, .n = n, .c = hid, .h = 1, .w = 1};
  act.src[0] = h;
  act.ddst = ds;
  act.dsrc[0] = dh;
  grad_node l1 = {.op = GRAD_LINEAR, .n = n, .c = nd->c, .h = 1, .w = 1};
  l1.p.linear.out = hid;
  l1.src[0] = nd->src[0];
  l1.src[1] = nd->src[1];
  l1.src[2] = nd->src[2];
  l1.ddst = dh;
  l1.dsrc[0] = nd->dsrc[0];
  l1.dsrc[1] = nd->dsrc[1];
  l1.dsrc[2] = nd->dsrc[2];
  (void)((rc = grad_backward(&l2, a, p, e)) || (rc = grad_backward(&act, a, p, e)) ||
         (rc = grad_backward(&l1, a, p, e)));
  arena_release(a, m);
  return rc;
}

/* Rows of the table receive their samples' gradients in batch order. */
static int bwd_embed(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  if (!nd->dsrc[0])
    return ERR_OK;
  for (int i = 0; i < nd->n; i++) {
    float *row = nd->dsrc[0] + (size_t)nd->p.embed.labels[i] * nd->c;
    const float *dy = nd->ddst + (size_t)i * nd->c;
    for (int k = 0; k < nd->c; k++)
      row[k] += dy[k];
  }
  return ERR_OK;
}

static int bwd_concat(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t hw = (size_t)nd->h * nd->w, ca = (size_t)nd->c * hw, cb = (size_t)nd->p.concat.cb * hw;
  for (int i = 0; i < nd->n; i++) {
    const float *dy = nd->ddst + i * (ca + cb);
    if (nd->dsrc[0])
      for (size_t k = 0; k < ca; k++)
        nd->dsrc[0][i * ca + k] += dy[k];
    if (nd->dsrc[1])
      for (size_t k = 0; k < cb; k++)
        nd->dsrc[1][i * cb + k] += dy[ca + k];
  }
  return ERR_OK;
}

static int bwd_ss(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  int c = nd->c, hw = nd->h * nd->w, s = nd->p.ss.has_scale;
  for (int i = 0; i < nd->n; i++)
    for (int ch = 0; ch < c; ch++) {
      size_t off = ((size_t)i * c + ch) * hw;
      const float *x = nd->src[0] + off, *dy = nd->ddst + off;
      float sc = s ? nd->src[1][(size_t)i * 2 * c + ch] : 0.0f;
      double dsc = 0, dsh = 0;
      for (int k = 0; k < hw; k++) {
        dsc += (double)dy[k] * x[k];
        dsh += dy[k];
      }
      if (nd->dsrc[0])
        for (int k = 0; k < hw; k++)
          nd->dsrc[0][off + k] += dy[k] * (1.0f + sc);
      if (nd->dsrc[1] && s) {
        nd->dsrc[1][(size_t)i * 2 * c + ch] += (float)dsc;
        nd->dsrc[1][(size_t)i * 2 * c + c + ch] += (float)dsh;
      } else if (nd->dsrc[1]) {
        nd->dsrc[1][(size_t)i * c + ch] += (float)dsh;
      }
    }
  return ERR_OK;
}

static int bwd_add(const grad_node *nd, arena *a, pool *p, err *e) {
  (void)a;
  (void)p;
  (void)e;
  size_t count = numel(nd);
  for (int s = 0; s < 2; s++)
    if (nd->dsrc[s])
      for (size_t i = 0; i < count; i++)
        nd->dsrc[s][i] += nd->ddst[i] / nd->p.add.divisor;
  return ERR_OK;
}

/* ---------- the table ---------- */

static const grad_rule rules[GRAD_OP_COUNT] = {
    [GRAD_CONV2D] = {"conv2d",
                     3,
                     {"x", "weight", "bias"},
                     1u,
                     check_conv,
                     size_conv,
                     fwd_conv,
                     grad_conv2d_backward},
    [GRAD_GROUP_NORM] = {"group_norm",
                         3,
                         {"x", "weight", "bias"},
                         1u,
                         check_gn,
                         size_norm,
                         fwd_gn,
                         grad_group_norm_backward},
    [GRAD_SILU] = {"silu", 1, {"x"}, 1u, check_none, size_same, fwd_silu, bwd_silu},
    [GRAD_LINEAR] = {"linear",
                     3,
                     {"x", "weight", "bias"},
                     3u,
                     check_linear,
                     size_linear,
                     fwd_linear,
                     bwd_linear},
    [GRAD_ATTENTION] = {"attention",
                        11,
                        {"x", "group_norm.weight", "group_norm.bias", "to_q.weight", "to_q.bias",
                         "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "to_out.0.weight",
                         "to_out.0.bias"},
                        1u,
                        check_attn,
                        size_attn,
                        fwd_attn,
                        grad_attention_backward},
    [GRAD_UPSAMPLE_NEAREST2X] =
        {"upsample_nearest2x", 1, {"x"}, 1u, check_none, size_up, fwd_up, bwd_up},
    [GRAD_AVGPOOL2X2] = {"avgpool2x2", 1, {"x"}, 1u, check_pool, size_pool, fwd_pool, bwd_pool},
    [GRAD_TIMESTEP_EMBEDDING] =
        {"timestep_embedding", 1, {"timesteps"}, 1u, check_temb, size_temb, fwd_temb, bwd_temb},
    [GRAD_TIME_MLP] = {"time_mlp",
                       5,
                       {"x", "linear_1.weight", "linear_1.bias", "linear_2.weight",
                        "linear_2.bias"},
                       31u,
                       check_mlp,
                       size_mlp,
                       fwd_mlp,
                       bwd_mlp},
    [GRAD_CLASS_EMBEDDING] =
        {"class_embedding", 1, {"weight"}, 1u, check_embed, size_embed, fwd_embed, bwd_embed},
    [GRAD_CONCAT] =
        {"concat", 2, {"a", "b"}, 3u, check_concat, size_concat, fwd_concat, bwd_concat},
    [GRAD_SCALE_SHIFT] = {"scale_shift", 2, {"x", "emb"}, 3u, check_none, size_ss, fwd_ss, bwd_ss},
    [GRAD_ADD] = {"add", 2, {"a", "b"}, 3u, check_add, size_same, fwd_add, bwd_add},
    [GRAD_RELU] = {"relu", 1, {"x"}, 1u, check_none, size_same, fwd_relu, bwd_relu},
    [GRAD_MAXPOOL2X2] =
        {"maxpool2x2", 1, {"x"}, 1u, check_pool, size_pool, fwd_maxpool, bwd_maxpool},
    [GRAD_GLOBAL_AVGPOOL] =
        {"global_avgpool", 1, {"x"}, 1u, check_none, size_gap, fwd_gap, bwd_gap},
    [GRAD_LAYER_NORM] = {"layer_norm",
                         3,
                         {"x", "weight", "bias"},
                         1u,
                         check_ln,
                         size_norm,
                         fwd_ln,
                         grad_layer_norm_backward},
    [GRAD_GELU] = {"gelu", 1, {"x"}, 1u, check_none, size_same, fwd_gelu, bwd_gelu},
    [GRAD_QUICK_GELU] = {"quick_gelu", 1, {"x"}, 1u, check_none, size_same, fwd_qgelu, bwd_qgelu},
    [GRAD_GEGLU] = {"geglu", 1, {"x"}, 1u, check_geglu, size_geglu, fwd_geglu, bwd_geglu},
    [GRAD_MHA] = {"mha",
                  3,
                  {"query", "key", "value"},
                  7u,
                  check_mha,
                  size_mha,
                  grad_mha_forward,
                  grad_mha_backward},
    [GRAD_TOKEN_EMBEDDING] = {"token_embedding",
                              2,
                              {"token_embedding.weight", "position_embedding.weight"},
                              3u,
                              check_tok,
                              size_tok,
                              fwd_tok,
                              bwd_tok},
};

const grad_rule *grad_rule_get(grad_op op) {
  return (int)op >= 0 && op < GRAD_OP_COUNT ? &rules[op] : NULL;
}

static const char *op_name(const grad_node *nd) {
  const grad_rule *r = grad_rule_get(nd->op);
  return r ? r->name : "?";
}

static int check(const grad_node *nd, int backward, err *e) {
  const grad_rule *r = nd ? grad_rule_get(nd->op) : NULL;
  if (!r)
    return err_set(e, ERR_INVALID, "grad node: 'op' is not a known op");
  if (nd->n < 1 || nd->c < 1 || nd->h < 1 || nd->w < 1)
    return bad(nd, e, "n", "'c', 'h' and 'w' must all be positive");
  if ((double)nd->n * nd->c * nd->h * nd->w > (double)(1u << 31))
    return bad(nd, e, "n", "times c, h and w exceeds 2^31 elements");
  for (int i = 0; backward >= 0 && i < r->nsrc; i++)
    if ((r->required >> i & 1u) && !nd->src[i])
      return err_set(e, ERR_INVALID, "grad node (%s): 'src[%d]' (%s) is missing", r->name, i,
                     r->src_names[i]);
  if (backward > 0 && !nd->ddst)
    return bad(nd, e, "ddst", "is missing");
  for (int i = r->nsrc; backward > 0 && i < GRAD_MAX_SRC; i++)
    if (nd->dsrc[i])
      return err_set(e, ERR_INVALID, "grad node (%s): 'dsrc[%d]' is beyond its %d inputs", r->name,
                     i, r->nsrc);
  return r->check(nd, backward, e);
}

size_t grad_size(const grad_node *nd, int slot) {
  err e;
  const grad_rule *r = nd ? grad_rule_get(nd->op) : NULL;
  if (!r || slot < -1 || slot >= r->nsrc || check(nd, -1, &e))
    return 0;
  return r->size(nd, slot);
}

int grad_forward(const grad_node *nd, float *dst, arena *a, pool *p, err *e) {
  int rc = check(nd, 0, e);
  if (rc)
    return rc;
  if (!dst || !a)
    return bad(nd, e, dst ? "a" : "dst", "is missing");
  ops_init();
  return grad_rule_get(nd->op)->forward(nd, dst, a, p, e);
}

int grad_backward(const grad_node *nd, arena *a, pool *p, err *e) {
  int rc = check(nd, 1, e);
  if (rc)
    return rc;
  if (!a)
    return bad(nd, e, "a", "is missing");
  ops_init();
  return grad_rule_get(nd->op)->backward(nd, a, p, e);
}
