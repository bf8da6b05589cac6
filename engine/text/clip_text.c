/* CLIPTextModel (transformers' layout and semantics): token plus position embeddings, pre-norm
 * transformer layers with causal self-attention and a quick_gelu or gelu MLP, the final layer
 * norm, and clip skip. Activations are kept channel-major per prompt ([n][channels][tokens]) so
 * every projection is a 1x1 convolution on core's packed GEMM, whose sums have one fixed order
 * however the work is split; layer norms and attention run per (prompt, position / head) on
 * the caller's pool. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "clip.h"
#include "mem.h"
#include "ops.h"
#include "rng.h"
#include "safetensors.h"

typedef struct clip_layer {
  const float *ln1_g, *ln1_b, *ln2_g, *ln2_b;
  conv2d q, k, v, o, fc1, fc2;
} clip_layer;

struct clip_text_model {
  clip_text_config cfg;
  float *weights; /* every tensor, one block */
  const float *tok_emb, *pos_emb, *lnf_g, *lnf_b;
  clip_layer *layers;
};

const clip_text_config *clip_text_config_of(const clip_text_model *m) {
  return &m->cfg;
}

/* ---------- config.json ---------- */

static int cfg_int(const json_t *root, const char *key, int lo, int hi, int *out, const char *path,
                   err *e) {
  json_t *v = json_object_get(root, key);
  if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
    return err_set(e, ERR_FORMAT, "%s: \"%s\" must be an integer from %d to %d", path, key, lo, hi);
  *out = (int)json_integer_value(v);
  return 0;
}

static int check_architecture(const json_t *root, const char *path, err *e) {
  if (json_object_get(root, "text_config"))
    return err_set(e, ERR_UNSUPPORTED,
                   "%s is a whole CLIPModel's config; point at the text encoder's folder "
                   "(a CLIPTextModel config, as a pipeline's text_encoder/ holds)",
                   path);
  json_t *arch = json_object_get(root, "architectures");
  const char *a = json_string_value(json_array_get(arch, 0));
  if (a && strcmp(a, "CLIPTextModel") != 0 && strcmp(a, "CLIPTextModelWithProjection") != 0)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s: architecture \"%.60s\" is not a CLIP text model (CLIPTextModel or "
                   "CLIPTextModelWithProjection)",
                   path, a);
  return 0;
}

/* The config as transformers writes it; path names it in errors. */
static int parse_config(const json_t *root, const char *path, clip_text_config *c, err *e) {
  int rc = json_is_object(root) ? check_architecture(root, path, e)
                                : err_set(e, ERR_FORMAT, "%s: expected a JSON object", path);
  if (!rc)
    rc = cfg_int(root, "vocab_size", 1, 1 << 20, &c->vocab_size, path, e);
  if (!rc)
    rc = cfg_int(root, "hidden_size", 1, 8192, &c->hidden_size, path, e);
  if (!rc)
    rc = cfg_int(root, "intermediate_size", 1, 65536, &c->intermediate_size, path, e);
  if (!rc)
    rc = cfg_int(root, "num_hidden_layers", 1, 256, &c->layers, path, e);
  if (!rc)
    rc = cfg_int(root, "num_attention_heads", 1, 1024, &c->heads, path, e);
  if (!rc)
    rc = cfg_int(root, "max_position_embeddings", 1, 4096, &c->max_positions, path, e);
  if (!rc && c->hidden_size % c->heads)
    rc = err_set(e, ERR_FORMAT, "%s: hidden_size %d is not a multiple of num_attention_heads %d",
                 path, c->hidden_size, c->heads);
  const json_t *act_v = json_object_get(root, "hidden_act");
  const char *act = json_string_value(act_v);
  if (!rc) {
    if (act_v && !act)
      rc = err_set(e, ERR_FORMAT, "%s: hidden_act must be a string", path);
    else if (!act || strcmp(act, "quick_gelu") == 0)
      c->act = CLIP_ACT_QUICK_GELU; /* transformers' default */
    else if (strcmp(act, "gelu") == 0)
      c->act = CLIP_ACT_GELU;
    else
      rc = err_set(e, ERR_UNSUPPORTED, "%s: hidden_act \"%.40s\" (supported: quick_gelu, gelu)",
                   path, act);
  }
  json_t *eps = json_object_get(root, "layer_norm_eps");
  c->eps = eps ? (float)json_number_value(eps) : 1e-5f;
  if (!rc && (!(c->eps > 0) || c->eps > 1 || (eps && !json_is_number(eps))))
    rc = err_set(e, ERR_FORMAT, "%s: layer_norm_eps must be a number in (0, 1]", path);
  return rc;
}

/* ---------- weights ---------- */

typedef struct loader {
  const st_file *f; /* NULL: a fresh initialisation drawn from seed */
  const clip_text_config *c;
  uint64_t seed;
  int index; /* tensors taken so far: the generator stream of the next fresh one */
  float *next;
  const char *path;
  err *e;
  int rc;
} loader;

/* transformers' CLIPTextModel._init_weights (initializer_range 0.02, factor 1): embeddings
 * N(0, 0.02); q, k, v and fc2 N(0, d^-1/2 (2 layers)^-1/2), out_proj N(0, d^-1/2), fc1
 * N(0, (2 d)^-1/2); layer norms 1 and 0; biases 0 (transformers leaves nn.Linear's own there:
 * zero is the quieter start). The std of tensor `name`; 0 for zeros, -1 for ones. */
static double init_std(const clip_text_config *c, const char *name) {
  const double d = c->hidden_size, in_std = pow(d, -0.5) * pow(2.0 * c->layers, -0.5);
  if (strstr(name, "embedding"))
    return 0.02;
  if (strstr(name, "norm"))
    return strstr(name, ".weight") ? -1 : 0;
  if (!strstr(name, ".weight"))
    return 0;
  if (strstr(name, "out_proj"))
    return pow(d, -0.5);
  if (strstr(name, "fc1"))
    return pow(2.0 * d, -0.5);
  return in_std; /* q, k, v, fc2 */
}

static void init_tensor(loader *l, const char *name, float *dst, size_t count) {
  const double std = init_std(l->c, name);
  if (std > 0) {
    rng_normal(l->seed, (uint64_t)l->index, 0x636c6970u, dst, count);
    for (size_t i = 0; i < count; i++)
      dst[i] = (float)(dst[i] * std);
  } else
    for (size_t i = 0; i < count; i++)
      dst[i] = std < 0 ? 1.0f : 0.0f;
}

static const float *take(loader *l, const char *name, int64_t d0, int64_t d1) {
  if (l->rc)
    return NULL;
  if (!l->f) {
    float *dst = l->next;
    init_tensor(l, name, dst, (size_t)d0 * (size_t)(d1 ? d1 : 1));
    l->index++;
    l->next += d0 * (d1 ? d1 : 1);
    return dst;
  }
  int64_t shape[2] = {d0, d1};
  int ndim = d1 ? 2 : 1;
  float *dst = l->next;
  l->rc = st_read_f32(l->f, name, ndim, shape, dst, l->e);
  if (l->rc)
    err_prefix(l->e, "%s: ", l->path);
  l->next += d0 * (d1 ? d1 : 1);
  return dst;
}

static void take_linear(loader *l, const char *prefix, int out, int in, conv2d *c) {
  char name[256];
  snprintf(name, sizeof name, "%s.weight", prefix);
  const float *w = take(l, name, out, in);
  snprintf(name, sizeof name, "%s.bias", prefix);
  const float *b = take(l, name, out, 0);
  *c = (conv2d){.cin = in, .cout = out, .k = 1, .stride = 1, .weight = w, .bias = b};
  if (!l->rc && ops_conv2d_pack_direct(c))
    l->rc = err_set(l->e, ERR_NOMEM, "out of memory packing %s", prefix);
}

static size_t weight_floats(const clip_text_config *c) {
  size_t d = (size_t)c->hidden_size, i = (size_t)c->intermediate_size;
  size_t per_layer = 4 * (d * d + d) + 2 * (d * i) + i + d + 4 * d;
  return (size_t)c->vocab_size * d + (size_t)c->max_positions * d + 2 * d +
         (size_t)c->layers * per_layer;
}

static void load_layer(loader *l, const clip_text_config *c, int i, clip_layer *ly) {
  char p[160], name[200];
  int d = c->hidden_size;
  snprintf(p, sizeof p, "text_model.encoder.layers.%d", i);
  const char *norms[4] = {"layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight",
                          "layer_norm2.bias"};
  const float **dst[4] = {&ly->ln1_g, &ly->ln1_b, &ly->ln2_g, &ly->ln2_b};
  for (int k = 0; k < 4; k++) {
    snprintf(name, sizeof name, "%s.%s", p, norms[k]);
    *dst[k] = take(l, name, d, 0);
  }
  const char *proj[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
  conv2d *pc[4] = {&ly->q, &ly->k, &ly->v, &ly->o};
  for (int k = 0; k < 4; k++) {
    snprintf(name, sizeof name, "%s.self_attn.%s", p, proj[k]);
    take_linear(l, name, d, d, pc[k]);
  }
  snprintf(name, sizeof name, "%s.mlp.fc1", p);
  take_linear(l, name, c->intermediate_size, d, &ly->fc1);
  snprintf(name, sizeof name, "%s.mlp.fc2", p);
  take_linear(l, name, d, c->intermediate_size, &ly->fc2);
}

void clip_text_free(clip_text_model *m) {
  if (!m)
    return;
  if (m->layers)
    for (int i = 0; i < m->cfg.layers; i++) {
      conv2d *c[6] = {&m->layers[i].q, &m->layers[i].k,   &m->layers[i].v,
                      &m->layers[i].o, &m->layers[i].fc1, &m->layers[i].fc2};
      for (int k = 0; k < 6; k++)
        ops_conv2d_unpack(c[k]);
    }
  free(m->layers);
  free(m->weights);
  free(m);
}

/* The tensors of the weight block in the order the loader takes them: (name, floats) pairs. */
static int tensor_at(const clip_text_config *c, int i, char *name, size_t cap, size_t *count) {
  size_t d = (size_t)c->hidden_size, in = (size_t)c->intermediate_size;
  static const char *const head[4] = {"embeddings.token_embedding.weight",
                                      "embeddings.position_embedding.weight",
                                      "final_layer_norm.weight", "final_layer_norm.bias"};
  static const char *const per[16] = {"layer_norm1.weight",
                                      "layer_norm1.bias",
                                      "layer_norm2.weight",
                                      "layer_norm2.bias",
                                      "self_attn.q_proj.weight",
                                      "self_attn.q_proj.bias",
                                      "self_attn.k_proj.weight",
                                      "self_attn.k_proj.bias",
                                      "self_attn.v_proj.weight",
                                      "self_attn.v_proj.bias",
                                      "self_attn.out_proj.weight",
                                      "self_attn.out_proj.bias",
                                      "mlp.fc1.weight",
                                      "mlp.fc1.bias",
                                      "mlp.fc2.weight",
                                      "mlp.fc2.bias"};
  if (i < 0 || i >= 4 + 16 * c->layers)
    return 0;
  if (i < 4) {
    snprintf(name, cap, "text_model.%s", head[i]);
    const size_t sizes[4] = {(size_t)c->vocab_size * d, (size_t)c->max_positions * d, d, d};
    *count = sizes[i];
    return 1;
  }
  int k = (i - 4) % 16;
  snprintf(name, cap, "text_model.encoder.layers.%d.%s", (i - 4) / 16, per[k]);
  const size_t sizes[16] = {d,     d, d,     d, d * d,  d,  d * d,  d,
                            d * d, d, d * d, d, in * d, in, d * in, d};
  *count = sizes[k];
  return 1;
}

float *clip_text_weights(const clip_text_model *m, size_t *count) {
  *count = weight_floats(&m->cfg);
  return m->weights;
}

const char *clip_text_tensor(const clip_text_model *m, int i, size_t *offset, size_t *count) {
  static _Thread_local char name[160];
  size_t off = 0, cnt = 0;
  for (int k = 0; k <= i; k++) {
    off += cnt;
    if (!tensor_at(&m->cfg, k, name, sizeof name, &cnt))
      return NULL;
  }
  *offset = off;
  *count = cnt;
  return name;
}

/* The model of config with its tensors from weights, or (weights NULL) drawn from seed. */
static int build(const json_t *config, const st_file *weights, uint64_t seed, const char *source,
                 clip_text_model **out, err *e) {
  *out = NULL;
  ops_init();
  clip_text_model *m = mem_calloc(1, sizeof *m);
  if (!m)
    return err_set(e, ERR_NOMEM, "out of memory loading the text encoder");
  if (!source)
    source = "the text encoder";
  int rc = parse_config(config, source, &m->cfg, e);
  const clip_text_config *c = &m->cfg;
  if (!rc) {
    m->weights = mem_malloc(weight_floats(c) * sizeof(float));
    m->layers = mem_calloc((size_t)c->layers, sizeof *m->layers);
    if (!m->weights || !m->layers)
      rc = err_set(e, ERR_NOMEM, "out of memory loading the text encoder (%zu weights)",
                   weight_floats(c));
  }
  if (!rc) {
    loader l = {.f = weights, .c = c, .seed = seed, .next = m->weights, .path = source, .e = e};
    int d = c->hidden_size;
    m->tok_emb = take(&l, "text_model.embeddings.token_embedding.weight", c->vocab_size, d);
    m->pos_emb = take(&l, "text_model.embeddings.position_embedding.weight", c->max_positions, d);
    m->lnf_g = take(&l, "text_model.final_layer_norm.weight", d, 0);
    m->lnf_b = take(&l, "text_model.final_layer_norm.bias", d, 0);
    for (int i = 0; i < c->layers && !l.rc; i++)
      load_layer(&l, c, i, &m->layers[i]);
    rc = l.rc;
  }
  if (!rc && !ops_all_finite(m->weights, weight_floats(c)))
    rc = err_set(e, ERR_FORMAT, "%s: the weights hold NaN or infinity", source);
  if (rc) {
    clip_text_free(m);
    return rc;
  }
  *out = m;
  return 0;
}

int clip_text_new_from(const json_t *config, const st_file *weights, const char *source,
                       clip_text_model **out, err *e) {
  *out = NULL;
  if (!source)
    source = "the text encoder";
  clip_text_config c;
  if (!weights) { /* a bad config is named first */
    int rc = parse_config(config, source, &c, e);
    return rc ? rc : err_set(e, ERR_INVALID, "%s: no tensors given", source);
  }
  return build(config, weights, 0, source, out, e);
}

int clip_text_init(const json_t *config, uint64_t seed, clip_text_model **out, err *e) {
  return build(config, NULL, seed, "the text encoder's config", out, e);
}

/* Every projection of the model, for packing. */
static void each_projection(clip_text_model *m, conv2d **out) {
  for (int i = 0; i < m->cfg.layers; i++) {
    clip_layer *ly = &m->layers[i];
    conv2d *c[6] = {&ly->q, &ly->k, &ly->v, &ly->o, &ly->fc1, &ly->fc2};
    memcpy(out + 6 * i, c, sizeof c);
  }
}

int clip_text_repack(clip_text_model *m, err *e) {
  conv2d **c = mem_calloc((size_t)m->cfg.layers * 6, sizeof *c);
  if (!c)
    return err_set(e, ERR_NOMEM, "out of memory repacking the text encoder");
  each_projection(m, c);
  int rc = ERR_OK;
  for (int i = 0; i < m->cfg.layers * 6; i++) {
    ops_conv2d_unpack(c[i]);
    if (!rc && ops_conv2d_pack_direct(c[i]))
      rc = err_set(e, ERR_NOMEM, "out of memory repacking the text encoder");
  }
  free(c);
  return rc;
}

int clip_text_tensor_shape(const clip_text_model *m, int i, int64_t shape[2]) {
  size_t off, count;
  const char *name = clip_text_tensor(m, i, &off, &count);
  if (!name)
    return 0;
  const int64_t d = m->cfg.hidden_size;
  if (strstr(name, "embedding")) {
    shape[0] = (int64_t)count / d, shape[1] = d;
    return 2;
  }
  if (!strstr(name, "norm") && strstr(name, ".weight")) {
    shape[1] = strstr(name, "fc2") ? m->cfg.intermediate_size : d;
    shape[0] = (int64_t)count / shape[1];
    return 2;
  }
  shape[0] = (int64_t)count;
  return 1;
}

int clip_text_new(const char *dir, clip_text_model **out, err *e) {
  *out = NULL;
  char cfg_path[4096], path[4096];
  snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
  json_error_t je;
  json_t *root = json_load_file(cfg_path, 0, &je);
  if (!root)
    return err_set(e, ERR_FORMAT, "%s: %s", cfg_path, je.text);
  clip_text_config c;
  int rc = parse_config(root, cfg_path, &c, e); /* a bad config is named before the weights */
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  FILE *probe = fopen(path, "rb");
  if (probe)
    fclose(probe);
  else /* diffusers' half-precision variant name */
    snprintf(path, sizeof path, "%s/model.fp16.safetensors", dir);
  st_file *f = NULL;
  if (!rc)
    rc = st_open(path, &f, e);
  if (!rc)
    rc = clip_text_new_from(root, f, path, out, e);
  st_close(f);
  json_decref(root);
  return rc;
}

/* ---------- forward ---------- */

typedef struct fwd {
  const clip_text_model *m;
  int n, len, d, heads, dh;
  float *x, *h, *q, *k, *v, *o, *scores; /* [n][d][len]; scores per worker [len][len] */
  const float *gamma, *beta;
} fwd;

/* Layer norm over the channels of each (prompt, position), in double so the mean and variance
 * match PyTorch's float32 kernels to well within their rounding. h = LN(x). */
static void ln_task(void *ctx, int task, int worker) {
  (void)worker;
  fwd *f = ctx;
  int img = task / f->len, pos = task % f->len;
  size_t base = (size_t)img * f->d * f->len + (size_t)pos;
  const float *x = f->x + base;
  float *y = f->h + base;
  double mean = 0, var = 0;
  for (int c = 0; c < f->d; c++)
    mean += x[(size_t)c * f->len];
  mean /= f->d;
  for (int c = 0; c < f->d; c++) {
    double t = x[(size_t)c * f->len] - mean;
    var += t * t;
  }
  var /= f->d;
  double inv = 1.0 / sqrt(var + f->m->cfg.eps);
  for (int c = 0; c < f->d; c++)
    y[(size_t)c * f->len] =
        (float)((x[(size_t)c * f->len] - mean) * inv) * f->gamma[c] + f->beta[c];
}

/* Causal attention for one (prompt, head): position r attends to positions 0..r. */
static void attn_task(void *ctx, int task, int worker) {
  fwd *f = ctx;
  int img = task / f->heads, head = task % f->heads, L = f->len;
  size_t base = ((size_t)img * f->d + (size_t)head * f->dh) * L;
  float *s = f->scores + (size_t)worker * L * L;
  float scale = 1.0f / sqrtf((float)f->dh);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, L, L, f->dh, scale, f->q + base, L,
              f->k + base, L, 0.0f, s, L);
  for (int r = 0; r < L; r++) {
    float *row = s + (size_t)r * L, mx = row[0];
    for (int c = 1; c <= r; c++)
      mx = row[c] > mx ? row[c] : mx;
    float sum = 0;
    for (int c = 0; c <= r; c++) {
      row[c] = expf(row[c] - mx);
      sum += row[c];
    }
    float inv = 1.0f / sum;
    for (int c = 0; c <= r; c++)
      row[c] *= inv;
    for (int c = r + 1; c < L; c++)
      row[c] = 0.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, f->dh, L, L, 1.0f, f->v + base, L, s, L,
              0.0f, f->o + base, L);
}

static void activation(float *x, size_t count, clip_act act) {
  if (act == CLIP_ACT_GELU)
    for (size_t i = 0; i < count; i++)
      x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
  else
    for (size_t i = 0; i < count; i++)
      x[i] = x[i] / (1.0f + expf(-1.702f * x[i]));
}

static void layer_norm(fwd *f, const float *gamma, const float *beta, pool *p) {
  f->gamma = gamma;
  f->beta = beta;
  pool_run(p, f->n * f->len, ln_task, f);
}

/* x += attn(LN1(x)); x += fc2(act(fc1(LN2(x)))). */
static int run_layer(fwd *f, const clip_layer *ly, arena *a, pool *p) {
  size_t count = (size_t)f->n * f->d * f->len;
  layer_norm(f, ly->ln1_g, ly->ln1_b, p);
  if (ops_conv2d(&ly->q, f->h, f->n, f->len, 1, f->q, a, p) ||
      ops_conv2d(&ly->k, f->h, f->n, f->len, 1, f->k, a, p) ||
      ops_conv2d(&ly->v, f->h, f->n, f->len, 1, f->v, a, p))
    return -1;
  pool_run(p, f->n * f->heads, attn_task, f);
  if (ops_conv2d(&ly->o, f->o, f->n, f->len, 1, f->h, a, p))
    return -1;
  for (size_t i = 0; i < count; i++)
    f->x[i] += f->h[i];
  layer_norm(f, ly->ln2_g, ly->ln2_b, p);
  arena_mark mk = arena_get_mark(a);
  float *mid = arena_floats(a, (size_t)f->n * ly->fc1.cout * f->len);
  if (!mid || ops_conv2d(&ly->fc1, f->h, f->n, f->len, 1, mid, a, p))
    return -1;
  activation(mid, (size_t)f->n * ly->fc1.cout * f->len, f->m->cfg.act);
  if (ops_conv2d(&ly->fc2, mid, f->n, f->len, 1, f->h, a, p))
    return -1;
  for (size_t i = 0; i < count; i++)
    f->x[i] += f->h[i];
  arena_release(a, mk);
  return 0;
}

static int check_ids(const clip_text_model *m, const int64_t *ids, int n, int len, int clip_skip,
                     err *e) {
  const clip_text_config *c = &m->cfg;
  if (n < 1 || len < 1 || len > c->max_positions)
    return err_set(e, ERR_SHAPE, "token ids: %d prompts of %d tokens; the encoder takes 1 to %d", n,
                   len, c->max_positions);
  if (clip_skip < 1 || clip_skip > c->layers)
    return err_set(e, ERR_INVALID, "clip skip %d: must be from 1 (last layer) to %d", clip_skip,
                   c->layers);
  for (size_t i = 0; i < (size_t)n * len; i++)
    if (ids[i] < 0 || ids[i] >= c->vocab_size)
      return err_set(e, ERR_INVALID,
                     "token id %lld (prompt %zu, position %zu) is outside the "
                     "vocabulary of %d",
                     (long long)ids[i], i / len, i % len, c->vocab_size);
  return 0;
}

static int forward(const clip_text_model *m, fwd *f, const int64_t *ids, int clip_skip,
                   float *hidden, arena *a, pool *p) {
  int d = f->d, L = f->len;
  for (int i = 0; i < f->n; i++)
    for (int t = 0; t < L; t++) {
      const float *te = m->tok_emb + (size_t)ids[(size_t)i * L + t] * d;
      const float *pe = m->pos_emb + (size_t)t * d;
      for (int c = 0; c < d; c++)
        f->x[((size_t)i * d + c) * L + t] = te[c] + pe[c];
    }
  for (int l = 0; l < m->cfg.layers - (clip_skip - 1); l++)
    if (run_layer(f, &m->layers[l], a, p))
      return -1;
  layer_norm(f, m->lnf_g, m->lnf_b, p);
  for (int i = 0; i < f->n; i++)
    for (int t = 0; t < L; t++)
      for (int c = 0; c < d; c++)
        hidden[((size_t)i * L + t) * d + c] = f->h[((size_t)i * d + c) * L + t];
  return 0;
}

int clip_text_encode(const clip_text_model *m, const int64_t *ids, int n, int len, int clip_skip,
                     float *hidden, pool *p, err *e) {
  int rc = check_ids(m, ids, n, len, clip_skip, e);
  if (rc)
    return rc;
  fwd f = {.m = m, .n = n, .len = len, .d = m->cfg.hidden_size, .heads = m->cfg.heads};
  f.dh = f.d / f.heads;
  size_t count = (size_t)n * f.d * len;
  arena *a = arena_new(4u << 20);
  float *bufs[6] = {0};
  for (int i = 0; a && i < 6; i++)
    bufs[i] = arena_floats(a, count);
  f.scores = a ? arena_floats(a, (size_t)len * len * pool_threads(p)) : NULL;
  f.x = bufs[0], f.h = bufs[1], f.q = bufs[2], f.k = bufs[3], f.v = bufs[4], f.o = bufs[5];
  if (!f.scores || !bufs[5] || forward(m, &f, ids, clip_skip, hidden, a, p))
    rc = err_set(e, ERR_NOMEM, "out of memory encoding %d prompts", n);
  else if (!ops_all_finite(hidden, (size_t)n * len * f.d))
    rc = err_set(e, ERR_NUMERIC, "the text encoder's output holds NaN or infinity");
  arena_free(a);
  return rc;
}
