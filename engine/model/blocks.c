/* The model room's shared pieces (see internal/blocks.h): config getters, the tensor loader
 * and fresh initialisation, group norm / conv / linear / resnet / attention loading, the
 * workspace cache and the blocks' forward. Moved out of unet.c so that every network of the
 * room builds on the same code. */
#include "blocks.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mem.h"
#include "rng.h"

/* The generator stream of a fresh initialisation (rng.h: stream k of image i = tensor i). */
#define BLOCKS_INIT_STREAM 0x696e6974u

/* ---------- a network's folder ---------- */

static int is_file(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int is_dir(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int blocks_net_dir(const char *dir, const char *sub, char *net_dir, int *pipeline, err *e) {
  char p[BLOCKS_PATH_MAX];
  if (strlen(dir) > BLOCKS_PATH_MAX - 128)
    return err_set(e, ERR_INVALID, "model directory path is too long");
  if (!is_dir(dir))
    return err_set(e, ERR_IO, "model directory '%s' does not exist", dir);
  snprintf(p, sizeof p, "%s/model_index.json", dir);
  *pipeline = is_file(p);
  if (*pipeline) {
    snprintf(net_dir, BLOCKS_PATH_MAX, "%s/%s", dir, sub);
    if (!is_dir(net_dir))
      return err_set(e, ERR_FORMAT, "%s: pipeline layout without a '%s/' folder", dir, sub);
  } else {
    snprintf(net_dir, BLOCKS_PATH_MAX, "%s", dir);
  }
  snprintf(p, sizeof p, "%s/config.json", net_dir);
  if (!is_file(p))
    return err_set(e, ERR_FORMAT, "%s: no config.json (expected a diffusers model folder)",
                   net_dir);
  return ERR_OK;
}

json_t *blocks_read_json(const char *path, err *e) {
  struct stat sb;
  if (stat(path, &sb) != 0) {
    err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
    return NULL;
  }
  if (sb.st_size > BLOCKS_MAX_CONFIG_BYTES) {
    err_set(e, ERR_FORMAT, "%s: %lld bytes is too large for a config file", path,
            (long long)sb.st_size);
    return NULL;
  }
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j)
    err_set(e, ERR_FORMAT, "%s:%d: invalid JSON: %s", path, je.line, je.text);
  else if (!json_is_object(j)) {
    err_set(e, ERR_FORMAT, "%s: expected a JSON object", path);
    json_decref(j);
    j = NULL;
  }
  return j;
}

int blocks_open_weights(const char *net_dir, const char *file, st_file **st, char *path, err *e) {
  snprintf(path, BLOCKS_PATH_MAX, "%s/%s", net_dir, file);
  if (!is_file(path)) {
    char bin[BLOCKS_PATH_MAX];
    const char *dot = strrchr(file, '.');
    snprintf(bin, sizeof bin, "%s/%.*s.bin", net_dir, (int)(dot ? dot - file : (long)strlen(file)),
             file);
    if (is_file(bin))
      return err_set(e, ERR_UNSUPPORTED,
                     "%s: only a PyTorch .bin checkpoint; convert it with "
                     "tools/bin_to_safetensors.py %s %s",
                     net_dir, bin, path);
    return err_set(e, ERR_FORMAT, "%s: missing %s", net_dir, file);
  }
  return st_open(path, st, e);
}

/* ---------- config.json ---------- */

int blocks_get_int(const json_t *cfg, const char *key, int def, int min, int max, int *out,
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

int blocks_get_num(const json_t *cfg, const char *key, double def, double *out, err *e) {
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

int blocks_get_bool(const json_t *cfg, const char *key, int def, int *out, err *e) {
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
int blocks_get_choice(const json_t *cfg, const char *key, const char *def,
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

int blocks_get_list(const json_t *cfg, const char *key, const char *const *def, int ndef,
                    const char *const *allowed, int max, const char **out, int *n, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    for (int i = 0; i < ndef; i++)
      out[i] = def[i];
    *n = ndef;
    return ERR_OK;
  }
  if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > (size_t)max)
    return err_set(e, ERR_INVALID, "config key '%s' must be a list of 1 to %d block types", key,
                   max);
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

int blocks_check_keys(const json_t *cfg, const char *const *known, int nknown,
                      const char *class_name, err *e) {
  const char *key;
  const json_t *val;
  json_object_foreach((json_t *)cfg, key, val) {
    if (key[0] == '_' || json_is_null(val))
      continue;
    int ok = 0;
    for (int i = 0; i < nknown && !ok; i++)
      ok = strcmp(key, known[i]) == 0;
    if (!ok)
      return err_set(e, ERR_UNSUPPORTED, "config key '%s' is not supported by %s", key, class_name);
  }
  return ERR_OK;
}

/* ---------- learned tensors ---------- */

void blocks_param_release(model_param *mp) {
  if (mp->map)
    st_unmap(mp->map, mp->map_len);
  else
    free(mp->data);
  mp->data = NULL;
  mp->map = NULL;
  mp->map_len = 0;
}

void blocks_params_free(blocks_params *ps) {
  for (int i = 0; i < ps->nconvs; i++)
    ops_conv2d_unpack(ps->convs[i]);
  for (int i = 0; i < ps->nparams; i++) {
    blocks_param_release(&ps->params[i]);
    free((char *)ps->params[i].name);
  }
  free(ps->params);
  free(ps->convs);
  memset(ps, 0, sizeof *ps);
}

int blocks_params_repack(blocks_params *ps, err *e) {
  for (int i = 0; i < ps->nconvs; i++) {
    ops_conv2d_unpack(ps->convs[i]);
    if (ops_conv2d_pack(ps->convs[i]))
      return err_set(e, ERR_NOMEM, "out of memory packing layer %d of %d", i, ps->nconvs);
  }
  return ERR_OK;
}

int blocks_params_to_bf16(blocks_params *ps, err *e) {
  if (!gemm_bf16_available())
    return err_set(e, ERR_UNSUPPORTED,
                   "precision bf16 needs a CPU with AVX512-BF16 (VDPBF16PS), which this one lacks; "
                   "use precision fp32");
  for (int i = 0; i < ps->nconvs; i++)
    if (ops_conv2d_to_bf16(ps->convs[i]))
      return err_set(e, ERR_NOMEM, "out of memory converting layer %d of %d to bf16", i,
                     ps->nconvs);
  return ERR_OK;
}

int blocks_loader_begin(blocks_loader *ld, blocks_params *ps, const st_file *st, uint64_t seed,
                        err *e) {
  const int nfile = st ? st_count(st) : 0;
  *ld = (blocks_loader){ps, st, mem_calloc((size_t)nfile + 1, 1), e, seed, 1};
  if (!ld->used)
    return err_set(e, ERR_NOMEM, "out of memory");
  return ERR_OK;
}

int blocks_loader_end(blocks_loader *ld, int rc) {
  const int nfile = ld->st ? st_count(ld->st) : 0;
  for (int i = 0; !rc && i < nfile; i++)
    if (!ld->used[i])
      rc = err_set(ld->e, ERR_FORMAT,
                   "tensor '%s' is not used by the model that config.json describes",
                   st_info_at(ld->st, i)->name);
  free(ld->used);
  ld->used = NULL;
  return rc;
}

/* Registers a packed convolution for ops_conv2d_unpack in blocks_params_free. */
static int keep_conv(blocks_loader *ld, conv2d *c) {
  blocks_params *ps = ld->ps;
  if (ps->nconvs == ps->conv_cap) {
    int cap = ps->conv_cap ? 2 * ps->conv_cap : 64;
    conv2d **grown = realloc(ps->convs, (size_t)cap * sizeof *grown);
    if (!grown) {
      ops_conv2d_unpack(c);
      return err_set(ld->e, ERR_NOMEM, "out of memory registering a layer");
    }
    ps->convs = grown;
    ps->conv_cap = cap;
  }
  ps->convs[ps->nconvs++] = c;
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
static void init_tensor(blocks_loader *ld, const model_param *mp, int index) {
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
    rng_normal(ld->seed, (uint64_t)index, BLOCKS_INIT_STREAM, p, mp->count);
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
  rng_uniform(ld->seed, (uint64_t)index, BLOCKS_INIT_STREAM, p, mp->count);
  for (size_t i = 0; i < mp->count; i++)
    p[i] = (p[i] * 2.0f - 1.0f) * bound;
}

float *blocks_load_tensor(blocks_loader *ld, const char *name, int ndim, const int64_t *shape) {
  blocks_params *ps = ld->ps;
  if (ps->nparams == ps->cap) {
    int cap = ps->cap ? 2 * ps->cap : 128;
    model_param *grown = realloc(ps->params, (size_t)cap * sizeof *grown);
    if (!grown) {
      err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
      return NULL;
    }
    ps->params = grown;
    ps->cap = cap;
  }
  int64_t count = 1;
  for (int i = 0; i < ndim; i++)
    count *= shape[i];
  model_param *mp = &ps->params[ps->nparams];
  *mp = (model_param){.ndim = ndim, .count = (size_t)count};
  memcpy(mp->shape, shape, sizeof(int64_t) * (size_t)ndim);
  /* float32 weights stay in the file's pages (no copy to make or keep), others are converted */
  if (!ld->st || !st_map_f32(ld->st, name, ndim, shape, &mp->data, &mp->map, &mp->map_len))
    mp->data = mem_aligned(64, ((size_t)count * sizeof(float) + 63) & ~(size_t)63);
  if (!mp->data) {
    err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    return NULL;
  }
  ps->nparams++;
  float *p = mp->data;
  if (!(mp->name = mem_strdup(name))) {
    err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    return NULL;
  }
  if (!ld->st) {
    init_tensor(ld, mp, ps->nparams - 1);
  } else {
    if (!mp->map && st_read_f32(ld->st, name, ndim, shape, p, ld->e))
      return NULL;
    ld->used[st_index(ld->st, name)] = 1;
  }
  ps->count += count;
  return p;
}

int blocks_load_group_norm(blocks_loader *ld, const char *prefix, int groups, int channels,
                           double eps, group_norm *gn) {
  char name[256];
  if (channels % groups)
    return err_set(ld->e, ERR_INVALID, "%s: %d channels are not divisible into %d groups", prefix,
                   channels, groups);
  int64_t shape[1] = {channels};
  gn->groups = groups;
  gn->channels = channels;
  gn->eps = (float)eps;
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(gn->gamma = blocks_load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  snprintf(name, sizeof name, "%s.bias", prefix);
  if (!(gn->beta = blocks_load_tensor(ld, name, 1, shape)))
    return ld->e->code;
  return ERR_OK;
}

int blocks_load_conv(blocks_loader *ld, const char *prefix, int cin, int cout, int k, int stride,
                     int pad, int bias, conv2d *c) {
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
  if (!(c->weight = blocks_load_tensor(ld, name, 4, wshape)))
    return ld->e->code;
  c->weight_in_file = ld->ps->params[ld->ps->nparams - 1].map != NULL;
  if (bias) {
    int64_t bshape[1] = {cout};
    snprintf(name, sizeof name, "%s.bias", prefix);
    if (!(c->bias = blocks_load_tensor(ld, name, 1, bshape)))
      return ld->e->code;
  }
  /* Padding is final except for the (0,1,0,1) downsampler, which is not a
   * Winograd candidate (stride 2), so packing here is safe. */
  if (ops_conv2d_pack(c))
    return err_set(ld->e, ERR_NOMEM, "out of memory packing '%s'", prefix);
  return keep_conv(ld, c);
}

int blocks_load_token_linear(blocks_loader *ld, const char *prefix, int in, int out, int bias,
                             conv2d *c) {
  char name[256];
  const int64_t wshape[2] = {out, in}, bshape[1] = {out};
  *c = (conv2d){.cin = in, .cout = out, .k = 1, .stride = 1};
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(c->weight = blocks_load_tensor(ld, name, 2, wshape)))
    return ld->e->code;
  c->weight_in_file = ld->ps->params[ld->ps->nparams - 1].map != NULL;
  snprintf(name, sizeof name, "%s.bias", prefix);
  if (bias && !(c->bias = blocks_load_tensor(ld, name, 1, bshape)))
    return ld->e->code;
  if (ops_conv2d_pack(c))
    return err_set(ld->e, ERR_NOMEM, "out of memory packing '%s'", prefix);
  return keep_conv(ld, c);
}

/* A linear layer; `conv_ok` also accepts a [out, in, 1, 1] weight (old
 * checkpoints stored some projections as 1x1 convolutions). */
int blocks_load_linear(blocks_loader *ld, const char *wname, const char *bname, int in, int out,
                       float **w, float **b) {
  int64_t shape2[2] = {out, in}, shape4[4] = {out, in, 1, 1}, bshape[1] = {out};
  const st_tensor_info *info = ld->st ? st_find(ld->st, wname) : NULL;
  int four = info && info->ndim == 4;
  if (!(*w = blocks_load_tensor(ld, wname, four ? 4 : 2, four ? shape4 : shape2)))
    return ld->e->code;
  if (four) { /* gradients and checkpoints use the modern [out, in] */
    model_param *mp = &ld->ps->params[ld->ps->nparams - 1];
    mp->ndim = 2;
  }
  if (!(*b = blocks_load_tensor(ld, bname, 1, bshape)))
    return ld->e->code;
  return ERR_OK;
}

int blocks_load_resnet(blocks_loader *ld, const char *prefix, const resnet_spec *s, int cin,
                       int cout, resnet *r) {
  char name[256];
  int rc;
  *r = (resnet){.cin = cin,
                .cout = cout,
                .up = s->up,
                .down = s->down,
                .scale_shift = s->scale_shift,
                .out_scale = s->out_scale};
  snprintf(name, sizeof name, "%s.norm1", prefix);
  if ((rc = blocks_load_group_norm(ld, name, s->groups, cin, s->eps, &r->norm1)))
    return rc;
  snprintf(name, sizeof name, "%s.conv1", prefix);
  if ((rc = blocks_load_conv(ld, name, cin, cout, 3, 1, 1, 1, &r->conv1)))
    return rc;
  if (s->temb_dim) {
    int tout = s->scale_shift ? 2 * cout : cout;
    r->temb_proj = (linear){.in = s->temb_dim, .out = tout};
    char name2[256];
    snprintf(name, sizeof name, "%s.time_emb_proj.weight", prefix);
    snprintf(name2, sizeof name2, "%s.time_emb_proj.bias", prefix);
    if ((rc = blocks_load_linear(ld, name, name2, s->temb_dim, tout, &r->temb_proj.weight,
                                 &r->temb_proj.bias)))
      return rc;
  }
  snprintf(name, sizeof name, "%s.norm2", prefix);
  if ((rc = blocks_load_group_norm(ld, name, s->groups, cout, s->eps, &r->norm2)))
    return rc;
  snprintf(name, sizeof name, "%s.conv2", prefix);
  if ((rc = blocks_load_conv(ld, name, cout, cout, 3, 1, 1, 1, &r->conv2)))
    return rc;
  r->has_shortcut = cin != cout;
  if (r->has_shortcut) {
    snprintf(name, sizeof name, "%s.conv_shortcut", prefix);
    if ((rc = blocks_load_conv(ld, name, cin, cout, 1, 1, 0, 1, &r->shortcut)))
      return rc;
  }
  return ERR_OK;
}

/* Gives the weight and bias just loaded under a legacy attention name their modern names. */
static int rename_legacy(blocks_loader *ld, const char *prefix, const char *modern) {
  char name[256];
  for (int k = 0; k < 2; k++) {
    model_param *mp = &ld->ps->params[ld->ps->nparams - 2 + k];
    snprintf(name, sizeof name, "%s.%s.%s", prefix, modern, k ? "bias" : "weight");
    char *copy = mem_strdup(name);
    if (!copy)
      return err_set(ld->e, ERR_NOMEM, "out of memory loading '%s'", name);
    free((char *)mp->name);
    mp->name = copy;
  }
  return ERR_OK;
}

int blocks_load_attention(blocks_loader *ld, const char *prefix, int channels, int head_dim,
                          int groups, double eps, float rescale, attn_weights *a) {
  char name[256], wname[256], bname[256];
  int rc;
  if (channels % head_dim)
    return err_set(ld->e, ERR_UNSUPPORTED, "%s: attention_head_dim %d does not divide %d channels",
                   prefix, head_dim, channels);
  *a = (attn_weights){.channels = channels,
                      .heads = channels / head_dim,
                      .groups = groups,
                      .eps = (float)eps,
                      .rescale = rescale};
  if (groups > 0) {
    group_norm gn = {0};
    snprintf(name, sizeof name, "%s.group_norm", prefix);
    if ((rc = blocks_load_group_norm(ld, name, groups, channels, eps, &gn)))
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
    if ((rc = blocks_load_linear(ld, wname, bname, channels, channels, w[i], b[i])))
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

/* ---------- workspaces ---------- */

void blocks_spares_init(blocks_spares *s) {
  memset(s, 0, sizeof *s);
  pthread_mutex_init(&s->lock, NULL);
}

void blocks_spares_free(blocks_spares *s) {
  for (int i = 0; i < s->nspare; i++) {
    arena_free(s->spare[i].a);
    pool_free(s->spare[i].p);
  }
  s->nspare = 0;
  pthread_mutex_destroy(&s->lock);
}

int blocks_workspace_take(blocks_spares *s, int threads, workspace *out, err *e) {
  if (threads < 1)
    threads = 1;
  workspace ws = {NULL, NULL};
  pthread_mutex_lock(&s->lock);
  for (int i = 0; i < s->nspare; i++)
    if (pool_threads(s->spare[i].p) == threads || i == s->nspare - 1) {
      ws = s->spare[i];
      s->spare[i] = s->spare[--s->nspare];
      break;
    }
  pthread_mutex_unlock(&s->lock);
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

void blocks_workspace_give(blocks_spares *s, workspace *ws) {
  arena_reset(ws->a);
  pthread_mutex_lock(&s->lock);
  if (s->nspare < BLOCKS_MAX_SPARE) {
    s->spare[s->nspare++] = *ws;
    ws->a = NULL;
    ws->p = NULL;
  }
  pthread_mutex_unlock(&s->lock);
  arena_free(ws->a);
  pool_free(ws->p);
  ws->a = NULL;
  ws->p = NULL;
}

/* ---------- running ---------- */

float *blocks_act(blocks_run *f, int c, int h, int w) {
  return arena_floats(f->a, (size_t)f->n * c * h * w);
}

int blocks_conv(blocks_run *f, const conv2d *c, const float *x, int h, int w, float *y) {
  int oh, ow;
  ops_conv2d_out_size(c, h, w, &oh, &ow);
  f->flops += 2.0 * f->n * c->cout * oh * ow * (double)c->cin * c->k * c->k;
  return f->dry ? 0 : ops_conv2d(c, x, f->n, h, w, y, f->a, f->p);
}

void blocks_norm(blocks_run *f, const group_norm *g, const float *x, int hw, int silu, float *y) {
  if (!f->dry)
    ops_group_norm(x, f->n, g->channels, hw, g->groups, g->eps, g->gamma, g->beta, silu, y, f->p);
}

int blocks_time_embedding(blocks_run *f, const float *t, int ch0, int flip_sin_to_cos,
                          float freq_shift, const linear *l1, const linear *l2,
                          const float *class_table, const int64_t *labels) {
  const int n = f->n, dim = l2->out;
  float *tproj = arena_floats(f->a, (size_t)n * ch0), *hid = arena_floats(f->a, (size_t)n * dim);
  float *emb = arena_floats(f->a, (size_t)n * dim);
  if (!tproj || !hid || !emb)
    return -1;
  f->flops += 2.0 * n * (l1->in * l1->out + l2->in * l2->out);
  f->temb_act = hid;
  if (f->dry)
    return 0;
  ops_timestep_embedding(t, n, ch0, flip_sin_to_cos, freq_shift, tproj);
  ops_linear(tproj, n, l1->in, l1->out, l1->weight, l1->bias, hid);
  ops_silu(hid, (size_t)n * l1->out, hid);
  ops_linear(hid, n, l2->in, l2->out, l2->weight, l2->bias, emb);
  for (int i = 0; class_table && i < n; i++) {
    const float *row = class_table + (size_t)labels[i] * dim;
    for (int k = 0; k < dim; k++)
      emb[(size_t)i * dim + k] += row[k];
  }
  ops_silu(emb, (size_t)n * dim, hid);
  return 0;
}

void blocks_concat(blocks_run *f, const float *a, int ca, const float *b, int cb, int hw,
                   float *out) {
  for (int k = 0; !f->dry && k < f->n; k++) {
    memcpy(out + (size_t)k * (ca + cb) * hw, a + (size_t)k * ca * hw,
           (size_t)ca * hw * sizeof(float));
    memcpy(out + ((size_t)k * (ca + cb) + ca) * hw, b + (size_t)k * cb * hw,
           (size_t)cb * hw * sizeof(float));
  }
}

int blocks_resnet_forward(blocks_run *f, const resnet *r, const float *x, int h, int w, float *y) {
  return blocks_resnet_forward_add(f, r, x, h, w, NULL, y);
}

int blocks_resnet_forward_add(blocks_run *f, const resnet *r, const float *x, int h, int w,
                              const float *add, float *y) {
  int n = f->n, oh = h, ow = w;
  arena_mark m = arena_get_mark(f->a);
  float *hn = blocks_act(f, r->cin, h, w);
  if (!hn)
    return -1;
  blocks_norm(f, &r->norm1, x, h * w, 1, hn);
  const float *xs = x;
  if (r->up || r->down) {
    oh = r->up ? 2 * h : h / 2;
    ow = r->up ? 2 * w : w / 2;
    float *xr = blocks_act(f, r->cin, oh, ow), *hr = blocks_act(f, r->cin, oh, ow);
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
  const int temb = r->temb_proj.out > 0;
  float *h1 = blocks_act(f, r->cout, oh, ow);
  float *tp = temb ? arena_floats(f->a, (size_t)n * r->temb_proj.out) : NULL;
  if (!h1 || (temb && !tp) || blocks_conv(f, &r->conv1, hn, oh, ow, h1))
    return -1;
  if (add && !f->dry) /* beside conv1's output, before the time embedding (see blocks.h) */
    for (size_t i = 0; i < (size_t)n * r->cout * hw; i++)
      h1[i] += add[i];
  f->flops += 2.0 * n * r->temb_proj.in * r->temb_proj.out;
  if (!f->dry && !temb) {
    ops_group_norm(h1, n, r->cout, hw, r->norm2.groups, r->norm2.eps, r->norm2.gamma, r->norm2.beta,
                   1, h1, f->p);
  } else if (!f->dry) {
    ops_linear(f->temb_act, n, r->temb_proj.in, r->temb_proj.out, r->temb_proj.weight,
               r->temb_proj.bias, tp);
    ops_group_norm_temb(h1, n, r->cout, hw, r->norm2.groups, r->norm2.eps, r->norm2.gamma,
                        r->norm2.beta, r->scale_shift ? NULL : tp, r->scale_shift ? tp : NULL, 1,
                        h1, f->p);
  }
  if (blocks_conv(f, &r->conv2, h1, oh, ow, y))
    return -1;
  const float *sc = xs;
  if (r->has_shortcut) {
    float *s = blocks_act(f, r->cout, oh, ow);
    if (!s || blocks_conv(f, &r->shortcut, xs, oh, ow, s))
      return -1;
    sc = s;
  }
  if (!f->dry)
    ops_residual(sc, (size_t)n * r->cout * hw, r->out_scale, y, f->p);
  arena_release(f->a, m);
  return 0;
}

int blocks_attn_forward(blocks_run *f, const attn_weights *aw, float *x, int hw) {
  int c = aw->channels;
  double L = hw;
  f->flops += f->n * (4 * 2.0 * c * c * L + 2 * 2.0 * L * L * c);
  return f->dry ? 0 : ops_attention(aw, x, f->n, hw, x, f->a, f->p);
}
