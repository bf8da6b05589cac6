/* UNet2DModel: config parsing with diffusers' defaults, weight loading under
 * diffusers' parameter names, and the forward pass. The forward can also run
 * "dry" (no arithmetic) to count FLOPs along exactly the same path. */
#include "unet.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "mem.h"
#include "ops.h"
#include "rng.h"

#include "unet_impl.h"

/* The generator stream of a fresh initialisation (rng.h: stream k of image i = tensor i). */
#define UNET_INIT_STREAM 0x696e6974u

/* ---------- config ---------- */

typedef struct unet_config {
  int sample_size, in_channels, out_channels, center_input, flip_sin_to_cos;
  double freq_shift;
  int nlevels;
  const char *down_types[UNET_MAX_LEVELS], *up_types[UNET_MAX_LEVELS];
  int channels[UNET_MAX_LEVELS];
  int layers_per_block;
  double mid_scale;
  int downsample_padding;
  const char *downsample_type, *upsample_type;
  int attention_head_dim; /* 0 = one head per block */
  int norm_groups, attn_norm_groups;
  double norm_eps;
  int scale_shift, add_attention, has_mid;
  int num_classes;
} unet_config;

static const char *const known_keys[] = {"sample_size",
                                         "in_channels",
                                         "out_channels",
                                         "center_input_sample",
                                         "time_embedding_type",
                                         "freq_shift",
                                         "flip_sin_to_cos",
                                         "down_block_types",
                                         "up_block_types",
                                         "block_out_channels",
                                         "layers_per_block",
                                         "mid_block_scale_factor",
                                         "downsample_padding",
                                         "downsample_type",
                                         "upsample_type",
                                         "dropout",
                                         "act_fn",
                                         "attention_head_dim",
                                         "norm_num_groups",
                                         "attn_norm_num_groups",
                                         "norm_eps",
                                         "resnet_time_scale_shift",
                                         "add_attention",
                                         "class_embed_type",
                                         "num_class_embeds",
                                         "num_train_timesteps",
                                         "mid_block_type",
                                         "time_embedding_dim",
                                         "prediction_type"};

static int get_int(const json_t *cfg, const char *key, int def, int min, int max, int *out,
                   err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return ERR_OK;
  }
  if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
    return err_set(e, ERR_INVALID, "config key '%s' must be an integer in [%d, %d]", key, min, max);
  *out = (int)json_integer_value(v);
  return ERR_OK;
}

static int get_num(const json_t *cfg, const char *key, double def, double *out, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return ERR_OK;
  }
  if (!json_is_number(v) || !isfinite(json_number_value(v)))
    return err_set(e, ERR_INVALID, "config key '%s' must be a finite number", key);
  *out = json_number_value(v);
  return ERR_OK;
}

static int get_bool(const json_t *cfg, const char *key, int def, int *out, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return ERR_OK;
  }
  if (!json_is_boolean(v))
    return err_set(e, ERR_INVALID, "config key '%s' must be true or false", key);
  *out = json_is_true(v);
  return ERR_OK;
}

/* A string key that must be one of `allowed` (NULL-terminated). */
static int get_choice(const json_t *cfg, const char *key, const char *def,
                      const char *const *allowed, const char **out, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    *out = def;
    return ERR_OK;
  }
  if (!json_is_string(v))
    return err_set(e, ERR_INVALID, "config key '%s' must be a string", key);
  for (int i = 0; allowed[i]; i++)
    if (strcmp(json_string_value(v), allowed[i]) == 0) {
      *out = allowed[i];
      return ERR_OK;
    }
  return err_set(e, ERR_UNSUPPORTED, "config key '%s': unsupported value \"%s\"", key,
                 json_string_value(v));
}

static int get_list(const json_t *cfg, const char *key, const char *const *def, int ndef,
                    const char *const *allowed, const char **out, int *n, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    for (int i = 0; i < ndef; i++)
      out[i] = def[i];
    *n = ndef;
    return ERR_OK;
  }
  if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > UNET_MAX_LEVELS)
    return err_set(e, ERR_INVALID, "config key '%s' must be a list of 1 to %d block types", key,
                   UNET_MAX_LEVELS);
  *n = (int)json_array_size(v);
  for (int i = 0; i < *n; i++) {
    const json_t *s = json_array_get(v, (size_t)i);
    if (!json_is_string(s))
      return err_set(e, ERR_INVALID, "config key '%s'[%d] must be a string", key, i);
    const char *name = json_string_value(s);
    if (strncmp(name, "UNetRes", 7) == 0) /* diffusers strips this prefix too */
      name += 7;
    out[i] = NULL;
    for (int k = 0; allowed[k]; k++)
      if (strcmp(name, allowed[k]) == 0)
        out[i] = allowed[k];
    if (!out[i])
      return err_set(e, ERR_UNSUPPORTED, "config key '%s'[%d]: unsupported block type \"%s\"", key,
                     i, json_string_value(s));
  }
  return ERR_OK;
}

static int parse_config(const json_t *cfg, unet_config *c, err *e) {
  static const char *const down_allowed[] = {"DownBlock2D", "AttnDownBlock2D", NULL};
  static const char *const up_allowed[] = {"UpBlock2D", "AttnUpBlock2D", NULL};
  static const char *const down_def[] = {"DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D"};
  static const char *const up_def[] = {"AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                       "UpBlock2D"};
  static const char *const resample_allowed[] = {"conv", "resnet", NULL};
  static const char *const positional[] = {"positional", NULL};
  static const char *const silu[] = {"silu", "swish", NULL};
  static const char *const shifts[] = {"default", "scale_shift", NULL};
  static const char *const mids[] = {"UNetMidBlock2D", NULL};
  const char *tmp;
  int rc, ndown = 0, nup = 0;
  memset(c, 0, sizeof *c);
  if (!json_is_object(cfg))
    return err_set(e, ERR_FORMAT, "config is not a JSON object");
  const char *key;
  const json_t *val;
  json_object_foreach((json_t *)cfg, key, val) {
    if (key[0] == '_' || json_is_null(val))
      continue;
    int known = 0;
    for (size_t i = 0; i < sizeof known_keys / sizeof known_keys[0]; i++)
      known |= strcmp(key, known_keys[i]) == 0;
    if (!known)
      return err_set(e, ERR_UNSUPPORTED, "config key '%s' is not supported by UNet2DModel", key);
  }
  const json_t *ss = json_object_get(cfg, "sample_size");
  if (json_is_array(ss)) {
    if (json_array_size(ss) != 2 || !json_is_integer(json_array_get(ss, 0)) ||
        json_integer_value(json_array_get(ss, 0)) != json_integer_value(json_array_get(ss, 1)))
      return err_set(e, ERR_UNSUPPORTED, "config key 'sample_size': only square sizes");
    c->sample_size = (int)json_integer_value(json_array_get(ss, 0));
    if (c->sample_size < 1 || c->sample_size > 4096)
      return err_set(e, ERR_INVALID, "config key 'sample_size' out of range");
  } else if ((rc = get_int(cfg, "sample_size", 0, 1, 4096, &c->sample_size, e))) {
    return rc;
  }
  if ((rc = get_int(cfg, "in_channels", 3, 1, 64, &c->in_channels, e)) ||
      (rc = get_int(cfg, "out_channels", 3, 1, 64, &c->out_channels, e)) ||
      (rc = get_bool(cfg, "center_input_sample", 0, &c->center_input, e)) ||
      (rc = get_choice(cfg, "time_embedding_type", "positional", positional, &tmp, e)) ||
      (rc = get_num(cfg, "freq_shift", 0, &c->freq_shift, e)) ||
      (rc = get_bool(cfg, "flip_sin_to_cos", 1, &c->flip_sin_to_cos, e)) ||
      (rc = get_list(cfg, "down_block_types", down_def, 4, down_allowed, c->down_types, &ndown,
                     e)) ||
      (rc = get_list(cfg, "up_block_types", up_def, 4, up_allowed, c->up_types, &nup, e)) ||
      (rc = get_int(cfg, "layers_per_block", 2, 1, UNET_MAX_LAYERS - 1, &c->layers_per_block, e)) ||
      (rc = get_num(cfg, "mid_block_scale_factor", 1, &c->mid_scale, e)) ||
      (rc = get_int(cfg, "downsample_padding", 1, 0, 1, &c->downsample_padding, e)) ||
      (rc = get_choice(cfg, "downsample_type", "conv", resample_allowed, &c->downsample_type, e)) ||
      (rc = get_choice(cfg, "upsample_type", "conv", resample_allowed, &c->upsample_type, e)) ||
      (rc = get_choice(cfg, "act_fn", "silu", silu, &tmp, e)) ||
      (rc = get_int(cfg, "norm_num_groups", 32, 1, 1 << 16, &c->norm_groups, e)) ||
      (rc = get_int(cfg, "attn_norm_num_groups", 0, 1, 1 << 16, &c->attn_norm_groups, e)) ||
      (rc = get_num(cfg, "norm_eps", 1e-5, &c->norm_eps, e)) ||
      (rc = get_choice(cfg, "resnet_time_scale_shift", "default", shifts, &tmp, e)))
    return rc;
  c->scale_shift = strcmp(tmp, "scale_shift") == 0;
  if ((rc = get_bool(cfg, "add_attention", 1, &c->add_attention, e)) ||
      (rc = get_int(cfg, "num_class_embeds", 0, 1, 1 << 20, &c->num_classes, e)))
    return rc;
  const json_t *mid = json_object_get(cfg, "mid_block_type");
  c->has_mid = 1;
  if (json_object_get(cfg, "mid_block_type") && json_is_null(mid))
    c->has_mid = 0;
  else if ((rc = get_choice(cfg, "mid_block_type", "UNetMidBlock2D", mids, &tmp, e)))
    return rc;
  const json_t *cet = json_object_get(cfg, "class_embed_type");
  if (cet && !json_is_null(cet))
    return err_set(e, ERR_UNSUPPORTED,
                   "config key 'class_embed_type': only null (an embedding table from "
                   "num_class_embeds) is supported");
  const json_t *ahd = json_object_get(cfg, "attention_head_dim");
  if (!ahd)
    c->attention_head_dim = 8;
  else if (json_is_null(ahd))
    c->attention_head_dim = 0;
  else if ((rc = get_int(cfg, "attention_head_dim", 8, 1, 1 << 16, &c->attention_head_dim, e)))
    return rc;
  const json_t *boc = json_object_get(cfg, "block_out_channels");
  static const int boc_def[] = {224, 448, 672, 896};
  if (!boc || json_is_null(boc)) {
    c->nlevels = 4;
    memcpy(c->channels, boc_def, sizeof boc_def);
  } else {
    if (!json_is_array(boc) || json_array_size(boc) == 0 || json_array_size(boc) > UNET_MAX_LEVELS)
      return err_set(e, ERR_INVALID, "config key 'block_out_channels' must be a list of 1 to %d",
                     UNET_MAX_LEVELS);
    c->nlevels = (int)json_array_size(boc);
    for (int i = 0; i < c->nlevels; i++) {
      const json_t *v = json_array_get(boc, (size_t)i);
      if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 65536)
        return err_set(e, ERR_INVALID,
                       "config key 'block_out_channels'[%d] must be a positive "
                       "integer",
                       i);
      c->channels[i] = (int)json_integer_value(v);
    }
  }
  if (ndown != c->nlevels || nup != c->nlevels)
    return err_set(e, ERR_INVALID,
                   "config: down_block_types (%d), up_block_types (%d) and block_out_channels "
                   "(%d) must have the same length",
                   ndown, nup, c->nlevels);
  if (c->norm_eps <= 0)
    return err_set(e, ERR_INVALID, "config key 'norm_eps' must be positive");
  return ERR_OK;
}

/* ---------- weights ---------- */

typedef struct loader {
  unet *u;
  const st_file *st;   /* NULL: a fresh initialisation instead of a file (unet_init) */
  unsigned char *used; /* per tensor of the file: has a layer claimed it */
  err *e;
  uint64_t seed;
  int64_t fan_in; /* of the last weight initialised, for the bias that follows it */
} loader;

/* Registers a packed convolution for ops_conv2d_unpack in unet_free. */
static int keep_conv(loader *ld, conv2d *c) {
  if (ld->u->nconvs == UNET_MAX_PARAMS) {
    ops_conv2d_unpack(c);
    return err_set(ld->e, ERR_UNSUPPORTED, "model has more than %d layers", UNET_MAX_PARAMS);
  }
  ld->u->convs[ld->u->nconvs++] = c;
  return ERR_OK;
}

/* Whether `name` ends in `suffix`. */
static int ends_with(const char *name, const char *suffix) {
  size_t n = strlen(name), k = strlen(suffix);
  return n >= k && strcmp(name + n - k, suffix) == 0;
}

/* A fresh training initialisation, as tools/torch_unet.py init_weights (the glyph trainer's):
 * PyTorch's default for Conv2d and Linear (weight and bias uniform in +-1/sqrt(fan_in), what
 * diffusers' UNet2DModel() gets), GroupNorm 1 and 0, the class embedding N(0, 1); the last
 * convolution of every resnet, every attention output projection and conv_out start at zero,
 * so each block starts as the identity (the DDPM trick that steadies early training). The
 * numbers come from the engine's counter-based generator (tensor i is stream i of the seed), so
 * they differ from torch's but not between runs or machines. */
static void init_tensor(loader *ld, const model_param *mp, int index) {
  float *p = mp->data;
  const char *name = mp->name;
  const char *dot = strrchr(name, '.'), *mod = dot;
  while (mod > name && mod[-1] != '.')
    mod--;
  int is_weight = strcmp(dot, ".weight") == 0;
  if (mp->ndim == 1 && strstr(mod, "norm")) {
    for (size_t i = 0; i < mp->count; i++)
      p[i] = is_weight ? 1.0f : 0.0f;
    return;
  }
  if (strcmp(name, "class_embedding.weight") == 0) {
    rng_normal(ld->seed, (uint64_t)index, UNET_INIT_STREAM, p, mp->count);
    return;
  }
  if (mp->ndim >= 2) {
    ld->fan_in = 1;
    for (int d = 1; d < mp->ndim; d++)
      ld->fan_in *= mp->shape[d];
  }
  char module[256];
  snprintf(module, sizeof module, "%.*s", (int)(dot - name), name);
  if (ends_with(module, ".conv2") || ends_with(module, ".to_out.0") ||
      strcmp(module, "conv_out") == 0) {
    memset(p, 0, mp->count * sizeof *p);
    return;
  }
  const float bound = (float)(1.0 / sqrt((double)(ld->fan_in > 0 ? ld->fan_in : 1)));
  rng_uniform(ld->seed, (uint64_t)index, UNET_INIT_STREAM, p, mp->count);
  for (size_t i = 0; i < mp->count; i++)
    p[i] = (p[i] * 2.0f - 1.0f) * bound;
}

static float *load_tensor(loader *ld, const char *name, int ndim, const int64_t *shape) {
  if (ld->u->nparams == UNET_MAX_PARAMS) {
    err_set(ld->e, ERR_UNSUPPORTED, "model has more than %d tensors", UNET_MAX_PARAMS);
    return NULL;
  }
  int64_t count = 1;
  for (int i = 0; i < ndim; i++)
    count *= shape[i];
  float *p = mem_aligned(64, ((size_t)count * sizeof(float) + 63) & ~(size_t)63);
  if (!p) {
    err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    return NULL;
  }
  model_param *mp = &ld->u->params[ld->u->nparams++];
  *mp = (model_param){.ndim = ndim, .count = (size_t)count, .data = p};
  memcpy(mp->shape, shape, sizeof(int64_t) * (size_t)ndim);
  if (!(mp->name = mem_strdup(name))) {
    err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    return NULL;
  }
  if (!ld->st) {
    init_tensor(ld, mp, ld->u->nparams - 1);
  } else {
    if (st_read_f32(ld->st, name, ndim, shape, p, ld->e))
      return NULL;
    ld->used[st_index(ld->st, name)] = 1;
  }
  ld->u->shape.num_params += count;
  return p;
}

static int load_group_norm(loader *ld, const char *prefix, int groups, int channels, double eps,
                           group_norm *gn) {
  char name[256];
  if (channels % groups)
    return err_set(ld->e, ERR_INVALID, "%s: %d channels are not divisible into %d groups", prefix,
                   channels, groups);
  int64_t shape[1] = {channels};
  gn->groups = groups;
  gn->channels = channels;
  gn->eps = (float)eps;
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(gn->gamma = load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  snprintf(name, sizeof name, "%s.bias", prefix);
  if (!(gn->beta = load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  return ERR_OK;
}

static int load_conv(loader *ld, const char *prefix, int cin, int cout, int k, int stride, int pad,
                     int bias, conv2d *c) {
  char name[256];
  int64_t wshape[4] = {cout, cin, k, k};
  *c = (conv2d){.cin = cin,
                .cout = cout,
                .k = k,
                .stride = stride,
                .pad_top = pad,
                .pad_left = pad,
                .pad_bottom = pad,
                .pad_right = pad};
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(c->weight = load_tensor(ld, name, 4, wshape)))
    return ld->e->code;
  if (bias) {
    int64_t bshape[1] = {cout};
    snprintf(name, sizeof name, "%s.bias", prefix);
    if (!(c->bias = load_tensor(ld, name, 1, bshape)))
      return ld->e->code;
  }
  /* Padding is final except for the (0,1,0,1) downsampler, which is not a
   * Winograd candidate (stride 2), so packing here is safe. */
  if (ops_conv2d_pack(c))
    return err_set(ld->e, ERR_NOMEM, "out of memory packing '%s'", prefix);
  return keep_conv(ld, c);
}

/* A linear layer; `conv_ok` also accepts a [out, in, 1, 1] weight (old
 * checkpoints stored some projections as 1x1 convolutions). */
static int load_linear(loader *ld, const char *wname, const char *bname, int in, int out, float **w,
                       float **b) {
  int64_t shape2[2] = {out, in}, shape4[4] = {out, in, 1, 1}, bshape[1] = {out};
  const st_tensor_info *info = ld->st ? st_find(ld->st, wname) : NULL;
  int four = info && info->ndim == 4;
  if (!(*w = load_tensor(ld, wname, four ? 4 : 2, four ? shape4 : shape2)))
    return ld->e->code;
  if (four) { /* gradients and checkpoints use the modern [out, in] */
    model_param *mp = &ld->u->params[ld->u->nparams - 1];
    mp->ndim = 2;
  }
  if (!(*b = load_tensor(ld, bname, 1, bshape)))
    return ld->e->code;
  return ERR_OK;
}

static int load_resnet(loader *ld, const unet_config *c, const char *prefix, int cin, int cout,
                       int temb_dim, float out_scale, int up, int down, resnet *r) {
  char name[256], name2[256];
  int rc;
  *r = (resnet){.cin = cin,
                .cout = cout,
                .up = up,
                .down = down,
                .scale_shift = c->scale_shift,
                .out_scale = out_scale};
  snprintf(name, sizeof name, "%s.norm1", prefix);
  if ((rc = load_group_norm(ld, name, c->norm_groups, cin, c->norm_eps, &r->norm1)))
    return rc;
  snprintf(name, sizeof name, "%s.conv1", prefix);
  if ((rc = load_conv(ld, name, cin, cout, 3, 1, 1, 1, &r->conv1)))
    return rc;
  int tout = c->scale_shift ? 2 * cout : cout;
  r->temb_proj = (linear){.in = temb_dim, .out = tout};
  snprintf(name, sizeof name, "%s.time_emb_proj.weight", prefix);
  snprintf(name2, sizeof name2, "%s.time_emb_proj.bias", prefix);
  if ((rc = load_linear(ld, name, name2, temb_dim, tout, &r->temb_proj.weight, &r->temb_proj.bias)))
    return rc;
  snprintf(name, sizeof name, "%s.norm2", prefix);
  if ((rc = load_group_norm(ld, name, c->norm_groups, cout, c->norm_eps, &r->norm2)))
    return rc;
  snprintf(name, sizeof name, "%s.conv2", prefix);
  if ((rc = load_conv(ld, name, cout, cout, 3, 1, 1, 1, &r->conv2)))
    return rc;
  r->has_shortcut = cin != cout;
  if (r->has_shortcut) {
    snprintf(name, sizeof name, "%s.conv_shortcut", prefix);
    if ((rc = load_conv(ld, name, cin, cout, 1, 1, 0, 1, &r->shortcut)))
      return rc;
  }
  return ERR_OK;
}

/* Gives the weight and bias just loaded under a legacy attention name their modern names. */
static int rename_legacy(loader *ld, const char *prefix, const char *modern) {
  char name[256];
  for (int k = 0; k < 2; k++) {
    model_param *mp = &ld->u->params[ld->u->nparams - 2 + k];
    snprintf(name, sizeof name, "%s.%s.%s", prefix, modern, k ? "bias" : "weight");
    char *copy = mem_strdup(name);
    if (!copy)
      return err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    free((char *)mp->name);
    mp->name = copy;
  }
  return ERR_OK;
}

static int load_attention(loader *ld, const unet_config *c, const char *prefix, int channels,
                          int head_dim, int groups, float rescale, attn_weights *a) {
  char name[256], wname[256], bname[256];
  int rc;
  if (channels % head_dim)
    return err_set(ld->e, ERR_UNSUPPORTED, "%s: attention_head_dim %d does not divide %d channels",
                   prefix, head_dim, channels);
  *a = (attn_weights){.channels = channels,
                      .heads = channels / head_dim,
                      .groups = groups,
                      .eps = (float)c->norm_eps,
                      .rescale = rescale};
  if (groups > 0) {
    group_norm gn = {0};
    snprintf(name, sizeof name, "%s.group_norm", prefix);
    if ((rc = load_group_norm(ld, name, groups, channels, c->norm_eps, &gn)))
      return rc;
    a->norm_gamma = gn.gamma;
    a->norm_beta = gn.beta;
  }
  /* Checkpoints saved before diffusers 0.13 (all google/ddpm-*) use the old names. */
  snprintf(name, sizeof name, "%s.to_q.weight", prefix);
  int legacy = ld->st && !st_find(ld->st, name);
  static const char *const modern[] = {"to_q", "to_k", "to_v", "to_out.0"};
  static const char *const old[] = {"query", "key", "value", "proj_attn"};
  float **w[4] = {(float **)&a->wq, (float **)&a->wk, (float **)&a->wv, (float **)&a->wo};
  float **b[4] = {(float **)&a->bq, (float **)&a->bk, (float **)&a->bv, (float **)&a->bo};
  for (int i = 0; i < 4; i++) {
    const char *nm = legacy ? old[i] : modern[i];
    snprintf(wname, sizeof wname, "%s.%s.weight", prefix, nm);
    snprintf(bname, sizeof bname, "%s.%s.bias", prefix, nm);
    if (legacy && !st_find(ld->st, wname)) {
      snprintf(name, sizeof name, "%s.%s.weight", prefix, modern[i]);
      return err_set(ld->e, ERR_FORMAT, "missing tensor '%s' (or legacy '%s')", name, wname);
    }
    if ((rc = load_linear(ld, wname, bname, channels, channels, w[i], b[i])))
      return rc;
    if (legacy && (rc = rename_legacy(ld, prefix, modern[i])))
      return rc;
  }
  if (ops_attention_pack(a))
    return err_set(ld->e, ERR_NOMEM, "out of memory packing '%s'", prefix);
  for (int i = 0; i < 4; i++)
    if ((rc = keep_conv(ld, &a->proj[i])))
      return rc;
  return ERR_OK;
}

static int load_weights(loader *ld, const unet_config *c) {
  unet *u = ld->u;
  char name[256];
  int rc, temb = u->temb_dim;
  if ((rc = load_conv(ld, "conv_in", c->in_channels, c->channels[0], 3, 1, 1, 1, &u->conv_in)))
    return rc;
  u->temb1 = (linear){.in = c->channels[0], .out = temb};
  u->temb2 = (linear){.in = temb, .out = temb};
  if ((rc = load_linear(ld, "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
                        c->channels[0], temb, &u->temb1.weight, &u->temb1.bias)) ||
      (rc = load_linear(ld, "time_embedding.linear_2.weight", "time_embedding.linear_2.bias", temb,
                        temb, &u->temb2.weight, &u->temb2.bias)))
    return rc;
  if (c->num_classes) {
    int64_t shape[2] = {c->num_classes, temb};
    if (!(u->class_table = load_tensor(ld, "class_embedding.weight", 2, shape)))
      return ld->e->code;
  }
  /* Channel counts of the skip connections, in push order, so the up path
   * knows each resnet's input width exactly as diffusers computes it. */
  int skips[UNET_MAX_LEVELS * UNET_MAX_LAYERS + 1], nskips = 0;
  skips[nskips++] = c->channels[0];
  int ch = c->channels[0];
  for (int i = 0; i < c->nlevels; i++) {
    block *b = &u->down[i];
    int out = c->channels[i], last = i == c->nlevels - 1;
    int head = c->attention_head_dim ? c->attention_head_dim : out;
    b->nlayers = c->layers_per_block;
    b->has_attn = strcmp(c->down_types[i], "AttnDownBlock2D") == 0;
    for (int l = 0; l < b->nlayers; l++) {
      snprintf(name, sizeof name, "down_blocks.%d.resnets.%d", i, l);
      if ((rc = load_resnet(ld, c, name, l == 0 ? ch : out, out, temb, 1.0f, 0, 0, &b->res[l])))
        return rc;
      if (b->has_attn) {
        snprintf(name, sizeof name, "down_blocks.%d.attentions.%d", i, l);
        if ((rc = load_attention(ld, c, name, out, head, c->norm_groups, 1.0f, &b->attn[l])))
          return rc;
      }
      skips[nskips++] = out;
    }
    ch = out;
    if (!last) {
      snprintf(name, sizeof name, "down_blocks.%d.downsamplers.0", i);
      if (b->has_attn && strcmp(c->downsample_type, "resnet") == 0) {
        b->sample = SAMPLE_RESNET;
        if ((rc = load_resnet(ld, c, name, out, out, temb, 1.0f, 0, 1, &b->sample_res)))
          return rc;
      } else {
        b->sample = SAMPLE_CONV;
        char cname[280];
        snprintf(cname, sizeof cname, "%s.conv", name);
        if ((rc = load_conv(ld, cname, out, out, 3, 2, c->downsample_padding, 1, &b->sample_conv)))
          return rc;
        if (c->downsample_padding == 0) /* diffusers pads (0,1,0,1) before a pad-0 conv */
          b->sample_conv.pad_bottom = b->sample_conv.pad_right = 1;
      }
      skips[nskips++] = out;
    }
  }
  int top = c->channels[c->nlevels - 1];
  u->has_mid = c->has_mid;
  if (c->has_mid) {
    int head = c->attention_head_dim ? c->attention_head_dim : top;
    float s = (float)c->mid_scale;
    if ((rc = load_resnet(ld, c, "mid_block.resnets.0", top, top, temb, s, 0, 0, &u->mid_res[0])))
      return rc;
    u->mid_has_attn = c->add_attention;
    if (c->add_attention) {
      int groups =
          c->attn_norm_groups ? c->attn_norm_groups : (c->scale_shift ? 0 : c->norm_groups);
      if ((rc =
               load_attention(ld, c, "mid_block.attentions.0", top, head, groups, s, &u->mid_attn)))
        return rc;
    }
    if ((rc = load_resnet(ld, c, "mid_block.resnets.1", top, top, temb, s, 0, 0, &u->mid_res[1])))
      return rc;
  }
  ch = top;
  for (int i = 0; i < c->nlevels; i++) {
    block *b = &u->up[i];
    int out = c->channels[c->nlevels - 1 - i], last = i == c->nlevels - 1;
    int head = c->attention_head_dim ? c->attention_head_dim : out;
    b->nlayers = c->layers_per_block + 1;
    b->has_attn = strcmp(c->up_types[i], "AttnUpBlock2D") == 0;
    for (int l = 0; l < b->nlayers; l++) {
      int skip = skips[--nskips];
      snprintf(name, sizeof name, "up_blocks.%d.resnets.%d", i, l);
      if ((rc = load_resnet(ld, c, name, ch + skip, out, temb, 1.0f, 0, 0, &b->res[l])))
        return rc;
      if (b->has_attn) {
        snprintf(name, sizeof name, "up_blocks.%d.attentions.%d", i, l);
        if ((rc = load_attention(ld, c, name, out, head, c->norm_groups, 1.0f, &b->attn[l])))
          return rc;
      }
      ch = out;
    }
    if (!last) {
      snprintf(name, sizeof name, "up_blocks.%d.upsamplers.0", i);
      if (b->has_attn && strcmp(c->upsample_type, "resnet") == 0) {
        b->sample = SAMPLE_RESNET;
        if ((rc = load_resnet(ld, c, name, out, out, temb, 1.0f, 1, 0, &b->sample_res)))
          return rc;
      } else {
        b->sample = SAMPLE_CONV;
        char cname[280];
        snprintf(cname, sizeof cname, "%s.conv", name);
        if ((rc = load_conv(ld, cname, out, out, 3, 1, 1, 1, &b->sample_conv)))
          return rc;
      }
    }
  }
  if ((rc = load_group_norm(ld, "conv_norm_out", c->norm_groups, c->channels[0], c->norm_eps,
                            &u->norm_out)) ||
      (rc = load_conv(ld, "conv_out", c->channels[0], c->out_channels, 3, 1, 1, 1, &u->conv_out)))
    return rc;
  return ERR_OK;
}

/* Builds the network of `config` with weights from the file, or (weights NULL) freshly
 * initialised from seed. */
static int build(const json_t *config, const st_file *weights, uint64_t seed, unet **out, err *e) {
  *out = NULL;
  unet_config c;
  int rc = parse_config(config, &c, e);
  if (rc)
    return rc;
  unet *u = mem_calloc(1, sizeof *u);
  if (!u)
    return err_set(e, ERR_NOMEM, "out of memory");
  pthread_mutex_init(&u->lock, NULL);
  u->nlevels = c.nlevels;
  u->ch0 = c.channels[0];
  u->temb_dim = 4 * c.channels[0];
  u->center_input = c.center_input;
  u->flip_sin_to_cos = c.flip_sin_to_cos;
  u->freq_shift = (float)c.freq_shift;
  u->shape = (unet_shape){.sample_size = c.sample_size,
                          .in_channels = c.in_channels,
                          .out_channels = c.out_channels,
                          .num_classes = c.num_classes};
  const int nfile = weights ? st_count(weights) : 0;
  loader ld = {u, weights, mem_calloc((size_t)nfile + 1, 1), e, seed, 1};
  if (!ld.used) {
    unet_free(u);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  rc = load_weights(&ld, &c);
  /* A tensor no layer claimed means the config and the weights disagree
   * (say, attention blocks the config does not declare): refuse to guess. */
  for (int i = 0; !rc && i < nfile; i++)
    if (!ld.used[i])
      rc = err_set(e, ERR_FORMAT, "tensor '%s' is not used by the model that config.json describes",
                   st_info_at(weights, i)->name);
  free(ld.used);
  if (rc) {
    unet_free(u);
    return rc;
  }
  *out = u;
  return ERR_OK;
}

int unet_load(const json_t *config, const st_file *weights, unet **out, err *e) {
  return build(config, weights, 0, out, e);
}

int unet_init(const json_t *config, uint64_t seed, unet **out, err *e) {
  return build(config, NULL, seed, out, e);
}

void unet_free(unet *u) {
  if (!u)
    return;
  for (int i = 0; i < u->nconvs; i++)
    ops_conv2d_unpack(u->convs[i]);
  for (int i = 0; i < u->nparams; i++) {
    free(u->params[i].data);
    free((char *)u->params[i].name);
  }
  for (int i = 0; i < u->nspare; i++) {
    arena_free(u->spare[i].a);
    pool_free(u->spare[i].p);
  }
  pthread_mutex_destroy(&u->lock);
  free(u);
}

int unet_repack(unet *u, err *e) {
  for (int i = 0; i < u->nconvs; i++) {
    ops_conv2d_unpack(u->convs[i]);
    if (ops_conv2d_pack(u->convs[i]))
      return err_set(e, ERR_NOMEM, "out of memory packing layer %d of %d", i, u->nconvs);
  }
  return ERR_OK;
}

const unet_shape *unet_get_shape(const unet *u) {
  return &u->shape;
}

/* ---------- forward ---------- */

typedef struct fwd {
  const unet *u;
  arena *a;
  int n, dry;
  pool *p;
  double flops;
  const float *temb_act; /* silu(emb), [n][temb_dim], shared by every resnet */
  const unet_mid *mid;   /* h-space access, or NULL */
  int mid_shape[3];      /* [C, H, W] of the mid-block output, set by the pass */
} fwd;

static float *alloc_act(fwd *f, int c, int h, int w) {
  return arena_floats(f->a, (size_t)f->n * c * h * w);
}

static int run_conv(fwd *f, const conv2d *c, const float *x, int h, int w, float *y) {
  int oh, ow;
  ops_conv2d_out_size(c, h, w, &oh, &ow);
  f->flops += 2.0 * f->n * c->cout * oh * ow * (double)c->cin * c->k * c->k;
  return f->dry ? 0 : ops_conv2d(c, x, f->n, h, w, y, f->a, f->p);
}

static void run_norm(fwd *f, const group_norm *g, const float *x, int hw, int silu, float *y) {
  if (!f->dry)
    ops_group_norm(x, f->n, g->channels, hw, g->groups, g->eps, g->gamma, g->beta, silu, y, f->p);
}

static int resnet_forward(fwd *f, const resnet *r, const float *x, int h, int w, float *y) {
  int n = f->n, oh = h, ow = w;
  arena_mark m = arena_get_mark(f->a);
  float *hn = alloc_act(f, r->cin, h, w);
  if (!hn)
    return -1;
  run_norm(f, &r->norm1, x, h * w, 1, hn);
  const float *xs = x;
  if (r->up || r->down) {
    oh = r->up ? 2 * h : h / 2;
    ow = r->up ? 2 * w : w / 2;
    float *xr = alloc_act(f, r->cin, oh, ow), *hr = alloc_act(f, r->cin, oh, ow);
    if (!xr || !hr)
      return -1;
    if (!f->dry) {
      if (r->up) {
        ops_upsample_nearest2x(x, n, r->cin, h, w, xr);
        ops_upsample_nearest2x(hn, n, r->cin, h, w, hr);
      } else {
        ops_avgpool2x2(x, n, r->cin, h, w, xr);
        ops_avgpool2x2(hn, n, r->cin, h, w, hr);
      }
    }
    xs = xr;
    hn = hr;
  }
  int hw = oh * ow;
  float *h1 = alloc_act(f, r->cout, oh, ow), *tp = arena_floats(f->a, (size_t)n * r->temb_proj.out);
  if (!h1 || !tp || run_conv(f, &r->conv1, hn, oh, ow, h1))
    return -1;
  f->flops += 2.0 * n * r->temb_proj.in * r->temb_proj.out;
  if (!f->dry) {
    ops_linear(f->temb_act, n, r->temb_proj.in, r->temb_proj.out, r->temb_proj.weight,
               r->temb_proj.bias, tp);
    if (!r->scale_shift) {
      for (int i = 0; i < n; i++)
        for (int c = 0; c < r->cout; c++) {
          float *p = h1 + ((size_t)i * r->cout + c) * hw, v = tp[(size_t)i * r->cout + c];
          for (int k = 0; k < hw; k++)
            p[k] += v;
        }
      ops_group_norm(h1, n, r->cout, hw, r->norm2.groups, r->norm2.eps, r->norm2.gamma,
                     r->norm2.beta, 1, h1, f->p);
    } else {
      ops_group_norm(h1, n, r->cout, hw, r->norm2.groups, r->norm2.eps, r->norm2.gamma,
                     r->norm2.beta, 0, h1, f->p);
      for (int i = 0; i < n; i++)
        for (int c = 0; c < r->cout; c++) {
          float *p = h1 + ((size_t)i * r->cout + c) * hw;
          float sc = tp[(size_t)i * 2 * r->cout + c],
                sh = tp[(size_t)i * 2 * r->cout + r->cout + c];
          for (int k = 0; k < hw; k++) {
            float v = p[k] * (1.0f + sc) + sh;
            p[k] = v / (1.0f + expf(-v));
          }
        }
    }
  }
  if (run_conv(f, &r->conv2, h1, oh, ow, y))
    return -1;
  const float *sc = xs;
  if (r->has_shortcut) {
    float *s = alloc_act(f, r->cout, oh, ow);
    if (!s || run_conv(f, &r->shortcut, xs, oh, ow, s))
      return -1;
    sc = s;
  }
  if (!f->dry) {
    size_t count = (size_t)n * r->cout * hw;
    for (size_t i = 0; i < count; i++)
      y[i] = (sc[i] + y[i]) / r->out_scale;
  }
  arena_release(f->a, m);
  return 0;
}

static int attn_forward(fwd *f, const attn_weights *aw, float *x, int hw) {
  int c = aw->channels;
  double L = hw;
  f->flops += f->n * (4 * 2.0 * c * c * L + 2 * 2.0 * L * L * c);
  return f->dry ? 0 : ops_attention(aw, x, f->n, hw, x, f->a, f->p);
}

/* Runs the network; in dry mode only shapes and FLOPs are computed. */
static int forward(fwd *f, const float *x, int h, int w, const float *t, const int64_t *labels,
                   float *out, err *e) {
  const unet *u = f->u;
  int n = f->n;
  float *emb = arena_floats(f->a, (size_t)n * u->temb_dim);
  float *tproj = arena_floats(f->a, (size_t)n * u->ch0);
  float *hid = arena_floats(f->a, (size_t)n * u->temb_dim);
  float *xin = alloc_act(f, u->shape.in_channels, h, w);
  if (!emb || !tproj || !hid || !xin)
    return err_set(e, ERR_NOMEM, "out of memory in UNet forward");
  f->flops += 2.0 * n * (u->temb1.in * u->temb1.out + u->temb2.in * u->temb2.out);
  if (!f->dry) {
    ops_timestep_embedding(t, n, u->ch0, u->flip_sin_to_cos, u->freq_shift, tproj);
    ops_linear(tproj, n, u->temb1.in, u->temb1.out, u->temb1.weight, u->temb1.bias, hid);
    ops_silu(hid, (size_t)n * u->temb_dim, hid);
    ops_linear(hid, n, u->temb2.in, u->temb2.out, u->temb2.weight, u->temb2.bias, emb);
    if (u->class_table)
      for (int i = 0; i < n; i++) {
        const float *row = u->class_table + (size_t)labels[i] * u->temb_dim;
        for (int k = 0; k < u->temb_dim; k++)
          emb[(size_t)i * u->temb_dim + k] += row[k];
      }
    ops_silu(emb, (size_t)n * u->temb_dim, hid);
    size_t cnt = (size_t)n * u->shape.in_channels * h * w;
    for (size_t i = 0; i < cnt; i++)
      xin[i] = u->center_input ? 2.0f * x[i] - 1.0f : x[i];
  }
  f->temb_act = hid;

  typedef struct skip {
    float *p;
    int c, h, w;
  } skip;
  skip skips[UNET_MAX_LEVELS * UNET_MAX_LAYERS + 1];
  int nskips = 0, ch = u->ch0;
  float *cur = alloc_act(f, ch, h, w);
  if (!cur || run_conv(f, &u->conv_in, xin, h, w, cur))
    goto oom;
  skips[nskips++] = (skip){cur, ch, h, w};
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->down[i];
    for (int l = 0; l < b->nlayers; l++) {
      const resnet *r = &b->res[l];
      float *nx = alloc_act(f, r->cout, h, w);
      if (!nx || resnet_forward(f, r, cur, h, w, nx))
        goto oom;
      if (b->has_attn && attn_forward(f, &b->attn[l], nx, h * w))
        goto oom;
      cur = nx;
      ch = r->cout;
      skips[nskips++] = (skip){cur, ch, h, w};
    }
    if (b->sample != SAMPLE_NONE) {
      int oh = b->sample == SAMPLE_CONV ? 0 : h / 2, ow = w / 2;
      if (b->sample == SAMPLE_CONV)
        ops_conv2d_out_size(&b->sample_conv, h, w, &oh, &ow);
      float *nx = alloc_act(f, ch, oh, ow);
      if (!nx)
        goto oom;
      if (b->sample == SAMPLE_CONV ? run_conv(f, &b->sample_conv, cur, h, w, nx)
                                   : resnet_forward(f, &b->sample_res, cur, h, w, nx))
        goto oom;
      cur = nx;
      h = oh;
      w = ow;
      skips[nskips++] = (skip){cur, ch, h, w};
    }
  }
  if (u->has_mid) {
    float *nx = alloc_act(f, ch, h, w);
    if (!nx || resnet_forward(f, &u->mid_res[0], cur, h, w, nx))
      goto oom;
    if (u->mid_has_attn && attn_forward(f, &u->mid_attn, nx, h * w))
      goto oom;
    float *ny = alloc_act(f, ch, h, w);
    if (!ny || resnet_forward(f, &u->mid_res[1], nx, h, w, ny))
      goto oom;
    f->mid_shape[0] = ch;
    f->mid_shape[1] = h;
    f->mid_shape[2] = w;
    if (f->mid && !f->dry) {
      const size_t cnt = (size_t)n * ch * h * w;
      if (f->mid->save)
        memcpy(f->mid->save, ny, cnt * sizeof *ny);
      if (f->mid->replace)
        memcpy(ny, f->mid->replace, cnt * sizeof *ny);
    }
    cur = ny;
  }
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->up[i];
    for (int l = 0; l < b->nlayers; l++) {
      const resnet *r = &b->res[l];
      skip s = skips[--nskips];
      if (s.h != h || s.w != w)
        return err_set(e, ERR_INVALID,
                       "input size %dx%d does not survive %d down/up samplings: use a multiple "
                       "of %d",
                       h, w, u->nlevels - 1, 1 << (u->nlevels - 1));
      float *cat = alloc_act(f, ch + s.c, h, w), *nx = alloc_act(f, r->cout, h, w);
      if (!cat || !nx)
        goto oom;
      if (!f->dry)
        for (int k = 0; k < n; k++) {
          size_t plane = (size_t)h * w;
          memcpy(cat + (size_t)k * (ch + s.c) * plane, cur + (size_t)k * ch * plane,
                 (size_t)ch * plane * sizeof(float));
          memcpy(cat + ((size_t)k * (ch + s.c) + ch) * plane, s.p + (size_t)k * s.c * plane,
                 (size_t)s.c * plane * sizeof(float));
        }
      if (resnet_forward(f, r, cat, h, w, nx))
        goto oom;
      if (b->has_attn && attn_forward(f, &b->attn[l], nx, h * w))
        goto oom;
      cur = nx;
      ch = r->cout;
    }
    if (b->sample != SAMPLE_NONE) {
      float *nx = alloc_act(f, ch, 2 * h, 2 * w);
      if (!nx)
        goto oom;
      if (b->sample == SAMPLE_CONV) {
        float *upx = alloc_act(f, ch, 2 * h, 2 * w);
        if (!upx)
          goto oom;
        if (!f->dry)
          ops_upsample_nearest2x(cur, n, ch, h, w, upx);
        if (run_conv(f, &b->sample_conv, upx, 2 * h, 2 * w, nx))
          goto oom;
      } else if (resnet_forward(f, &b->sample_res, cur, h, w, nx)) {
        goto oom;
      }
      cur = nx;
      h *= 2;
      w *= 2;
    }
  }
  float *normed = alloc_act(f, ch, h, w);
  if (!normed)
    goto oom;
  run_norm(f, &u->norm_out, cur, h * w, 1, normed);
  if (run_conv(f, &u->conv_out, normed, h, w, out))
    goto oom;
  return ERR_OK;
oom:
  return err_set(e, ERR_NOMEM, "out of memory in UNet forward (batch %d, %dx%d)", n, h, w);
}

int unet_check_input(const unet *u, int n, int h, int w, const float *t, const int64_t *labels,
                     err *e) {
  int mult = 1 << (u->nlevels - 1);
  if (n < 1 || h < 1 || w < 1 || h > 4096 || w > 4096)
    return err_set(e, ERR_INVALID, "bad input shape: batch %d, %dx%d", n, h, w);
  if (h % mult || w % mult)
    return err_set(e, ERR_INVALID,
                   "input size %dx%d must be a multiple of %d for this model's %d levels", h, w,
                   mult, u->nlevels);
  if (t)
    for (int i = 0; i < n; i++)
      if (!isfinite(t[i]))
        return err_set(e, ERR_INVALID, "timestep %d is not finite", i);
  if (u->shape.num_classes) {
    if (!labels)
      return err_set(e, ERR_INVALID, "this model is class-conditional: class labels are required");
    for (int i = 0; i < n; i++)
      if (labels[i] < 0 || labels[i] >= u->shape.num_classes)
        return err_set(e, ERR_INVALID, "class label %lld out of range [0, %d)",
                       (long long)labels[i], u->shape.num_classes);
  }
  return ERR_OK;
}

int unet_forward(const unet *u, const float *x, int n, int h, int w, const float *t,
                 const int64_t *labels, float *out, int threads, err *e) {
  return unet_forward_mid(u, x, n, h, w, t, labels, out, threads, NULL, e);
}

int unet_workspace_take(const unet *u, int threads, workspace *out, err *e) {
  unet *mu = (unet *)u; /* only the workspace cache changes, under its lock */
  if (threads < 1)
    threads = 1;
  workspace ws = {NULL, NULL};
  pthread_mutex_lock(&mu->lock);
  for (int i = 0; i < mu->nspare; i++)
    if (pool_threads(mu->spare[i].p) == threads || i == mu->nspare - 1) {
      ws = mu->spare[i];
      mu->spare[i] = mu->spare[--mu->nspare];
      break;
    }
  pthread_mutex_unlock(&mu->lock);
  if (ws.p && pool_threads(ws.p) != threads) {
    pool_free(ws.p);
    ws.p = NULL;
  }
  if (!ws.a)
    ws.a = arena_new((size_t)64 << 20);
  if (!ws.p && threads > 1)
    ws.p = pool_new(threads);
  if (!ws.a || (threads > 1 && !ws.p)) {
    arena_free(ws.a);
    pool_free(ws.p);
    return err_set(e, ERR_NOMEM, "out of memory (or threads) for a pass of the network");
  }
  *out = ws;
  return ERR_OK;
}

void unet_workspace_give(const unet *u, workspace *ws) {
  unet *mu = (unet *)u;
  arena_reset(ws->a);
  pthread_mutex_lock(&mu->lock);
  if (mu->nspare < UNET_MAX_SPARE) {
    mu->spare[mu->nspare++] = *ws;
    ws->a = NULL;
    ws->p = NULL;
  }
  pthread_mutex_unlock(&mu->lock);
  arena_free(ws->a);
  pool_free(ws->p);
  ws->a = NULL;
  ws->p = NULL;
}

int unet_forward_mid(const unet *u, const float *x, int n, int h, int w, const float *t,
                     const int64_t *labels, float *out, int threads, const unet_mid *mid, err *e) {
  int rc = unet_check_input(u, n, h, w, t, labels, e);
  if (rc)
    return rc;
  if (mid && !u->has_mid)
    return err_set(e, ERR_UNSUPPORTED, "this UNet has no mid block (h-space)");
  workspace ws;
  if ((rc = unet_workspace_take(u, threads, &ws, e)))
    return rc;
  fwd f = {.u = u, .a = ws.a, .n = n, .p = ws.p, .mid = mid};
  rc = forward(&f, x, h, w, t, labels, out, e);
  unet_workspace_give(u, &ws);
  return rc;
}

/* A dry pass (shapes and FLOPs only) of one h x w image. */
static int dry_run(const unet *u, int h, int w, fwd *f, err *e) {
  int mult = 1 << (u->nlevels - 1);
  if (h < 1 || w < 1 || h > 4096 || w > 4096 || h % mult || w % mult)
    return err_set(e, ERR_INVALID, "input size %dx%d must be a multiple of %d up to 4096", h, w,
                   mult);
  arena *a = arena_new((size_t)64 << 20);
  if (!a)
    return err_set(e, ERR_NOMEM, "out of memory");
  *f = (fwd){.u = u, .a = a, .n = 1, .p = NULL, .dry = 1};
  int rc = forward(f, NULL, h, w, NULL, NULL, NULL, e);
  arena_free(a);
  return rc;
}

double unet_flops(const unet *u, int h, int w) {
  err e;
  fwd f;
  return dry_run(u, h, w, &f, &e) ? 0 : f.flops;
}

int unet_mid_shape(const unet *u, int h, int w, int shape[3], err *e) {
  if (!u->has_mid)
    return err_set(e, ERR_UNSUPPORTED, "this UNet has no mid block (h-space)");
  fwd f;
  int rc = dry_run(u, h, w, &f, e);
  if (rc == ERR_OK)
    memcpy(shape, f.mid_shape, sizeof f.mid_shape);
  return rc;
}
