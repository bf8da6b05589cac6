/* The glyph classifier: config.json's layer list read into convolutions (batch norm folded in),
 * pools and linear layers, run as a chain of engine/grad nodes whose forwards are the ops the
 * engine runs, and differentiated by the same nodes' backward rules in reverse (input gradient
 * only: the classifier is an instrument, not trained here). */
#include "classifier.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "arena.h"
#include "grad.h"
#include "mem.h"
#include "ops.h"
#include "pool.h"
#include "safetensors.h"

#define CLF_MAX_LAYERS 64
#define CLF_MAX_HEADS 32
#define CLF_MAX_CONFIG_BYTES (1 << 20)
#define CLF_PATH_MAX 4096

typedef enum { L_CONV_BN_RELU, L_MAX_POOL, L_GLOBAL_AVG_POOL, L_LINEAR_RELU } layer_type;

typedef struct layer {
  layer_type type;
  int cin, cout; /* channels (conv) or features (linear) */
  conv2d conv;   /* conv_bn_relu: the folded convolution, packed */
  float *w, *b;  /* owned: the folded conv weight and bias, or the linear's */
} layer;

struct classifier {
  classifier_info info;
  char class_name[64];
  layer layers[CLF_MAX_LAYERS];
  int nlayers;
  classifier_head heads[CLF_MAX_HEADS];
  float *head_w, *head_b; /* all heads stacked: [n_logits][features], [n_logits] */
  char *strings[CLF_MAX_HEADS * 2];
  char **labels[CLF_MAX_HEADS];
};

/* ---------- loading ---------- */

static const char *type_names[] = {"conv_bn_relu", "max_pool", "global_avg_pool", "linear_relu"};

static json_t *read_config(const char *path, err *e) {
  struct stat sb;
  if (stat(path, &sb) != 0)
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno)), NULL;
  if (sb.st_size > CLF_MAX_CONFIG_BYTES)
    return err_set(e, ERR_FORMAT, "%s: too large for a config file", path), NULL;
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j)
    return err_set(e, ERR_FORMAT, "%s:%d: invalid JSON: %s", path, je.line, je.text), NULL;
  if (!json_is_object(j)) {
    json_decref(j);
    return err_set(e, ERR_FORMAT, "%s: expected a JSON object", path), NULL;
  }
  return j;
}

/* A positive integer key of obj, at most max. */
static int get_int(const json_t *obj, const char *key, int max, const char *where, int *out,
                   err *e) {
  const json_t *v = json_object_get(obj, key);
  if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > max)
    return err_set(e, ERR_FORMAT, "%s: '%s' must be an integer in [1, %d]", where, key, max);
  *out = (int)json_integer_value(v);
  return ERR_OK;
}

/* Reads tensor name of the given shape into a new buffer. */
static float *read_tensor(const st_file *f, const char *name, int ndim, const int64_t *shape,
                          err *e) {
  size_t count = 1;
  for (int i = 0; i < ndim; i++)
    count *= (size_t)shape[i];
  float *p = mem_malloc(count * sizeof *p);
  if (!p)
    return err_set(e, ERR_NOMEM, "out of memory for %s", name), NULL;
  if (st_read_f32(f, name, ndim, shape, p, e) != ERR_OK) {
    free(p);
    return NULL;
  }
  return p;
}

/* Conv2d(3x3, padding 1, no bias) + BatchNorm2d in eval mode as one convolution:
 * w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps). */
static int load_conv_bn(layer *L, const st_file *f, const char *prefix, double eps, err *e) {
  char name[256];
  const int64_t wshape[4] = {L->cout, L->cin, 3, 3}, vshape[1] = {L->cout};
  static const char *bn[4] = {"weight", "bias", "running_mean", "running_var"};
  float *v[4] = {0};
  snprintf(name, sizeof name, "%s.0.weight", prefix);
  L->w = read_tensor(f, name, 4, wshape, e);
  int rc = L->w ? ERR_OK : e->code;
  for (int i = 0; i < 4 && rc == ERR_OK; i++) {
    snprintf(name, sizeof name, "%s.1.%s", prefix, bn[i]);
    if (!(v[i] = read_tensor(f, name, 1, vshape, e)))
      rc = e->code;
  }
  if (rc == ERR_OK && !(L->b = mem_malloc((size_t)L->cout * sizeof *L->b)))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int o = 0; rc == ERR_OK && o < L->cout; o++) {
    if (!(v[3][o] >= 0))
      rc = err_set(e, ERR_FORMAT, "tensor %s.1.running_var: negative or NaN variance", prefix);
    const double s = (double)v[0][o] / sqrt((double)v[3][o] + eps);
    for (int k = 0; k < L->cin * 9; k++)
      L->w[(size_t)o * L->cin * 9 + k] = (float)(L->w[(size_t)o * L->cin * 9 + k] * s);
    L->b[o] = (float)(v[1][o] - v[2][o] * s);
  }
  for (int i = 0; i < 4; i++)
    free(v[i]);
  if (rc != ERR_OK)
    return rc;
  L->conv = (conv2d){.cin = L->cin,
                     .cout = L->cout,
                     .k = 3,
                     .stride = 1,
                     .pad_top = 1,
                     .pad_left = 1,
                     .pad_bottom = 1,
                     .pad_right = 1,
                     .weight = L->w,
                     .bias = L->b};
  /* direct (im2col) convolutions: on flat backgrounds the max pools see exact ties, and only
   * position-independent rounding keeps them ties and the input gradient PyTorch's */
  if (ops_conv2d_pack_direct(&L->conv))
    return err_set(e, ERR_NOMEM, "out of memory packing %s", prefix);
  return ERR_OK;
}

static int load_linear(layer *L, const st_file *f, const char *prefix, err *e) {
  char name[256];
  const int64_t wshape[2] = {L->cout, L->cin}, bshape[1] = {L->cout};
  snprintf(name, sizeof name, "%s.weight", prefix);
  if (!(L->w = read_tensor(f, name, 2, wshape, e)))
    return e->code;
  snprintf(name, sizeof name, "%s.bias", prefix);
  if (!(L->b = read_tensor(f, name, 1, bshape, e)))
    return e->code;
  return ERR_OK;
}

/* The layer list: convolutions and pools on images, one global average pool, then linear
 * layers on vectors. *ch ends as the feature count. */
static int load_layers(classifier *c, const json_t *cfg, const st_file *f, const char *cpath,
                       int *ch, err *e) {
  const json_t *layers = json_object_get(cfg, "layers"), *lj;
  const json_t *epsj = json_object_get(cfg, "batch_norm_eps");
  if (!json_is_array(layers) || json_array_size(layers) < 1 ||
      json_array_size(layers) > CLF_MAX_LAYERS)
    return err_set(e, ERR_FORMAT, "%s: 'layers' must be an array of 1 to %d layers", cpath,
                   CLF_MAX_LAYERS);
  const double eps = json_is_number(epsj) ? json_number_value(epsj) : 1e-5;
  if (!(eps > 0) || !isfinite(eps))
    return err_set(e, ERR_FORMAT, "%s: 'batch_norm_eps' must be positive", cpath);
  int size = c->info.sample_size, pooled = 0, rc;
  size_t i;
  json_array_foreach(layers, i, lj) {
    char where[64];
    snprintf(where, sizeof where, "%s: layers[%zu]", cpath, i);
    const char *type = json_string_value(json_object_get(lj, "type"));
    const char *prefix = json_string_value(json_object_get(lj, "prefix"));
    int t = 0;
    while (type && t < 4 && strcmp(type, type_names[t]) != 0)
      t++;
    if (!type || t == 4)
      return err_set(e, ERR_UNSUPPORTED,
                     "%s: 'type' must be conv_bn_relu, max_pool, global_avg_pool or linear_relu",
                     where);
    layer *L = &c->layers[c->nlayers++];
    L->type = (layer_type)t;
    L->cin = *ch;
    if ((t == L_CONV_BN_RELU || t == L_LINEAR_RELU) && (!prefix || strlen(prefix) > 200))
      return err_set(e, ERR_FORMAT, "%s: 'prefix' (the tensors' name prefix) is missing", where);
    if ((t == L_LINEAR_RELU) != pooled)
      return err_set(e, ERR_UNSUPPORTED,
                     "%s: %s %s the global_avg_pool layer (images before it, vectors after)", where,
                     type, pooled ? "after" : "before");
    switch (L->type) {
    case L_CONV_BN_RELU:
      if ((rc = get_int(lj, "out_channels", 4096, where, &L->cout, e)) ||
          (rc = load_conv_bn(L, f, prefix, eps, e)))
        return rc;
      break;
    case L_MAX_POOL: {
      const json_t *sz = json_object_get(lj, "size");
      if (sz && (!json_is_integer(sz) || json_integer_value(sz) != 2))
        return err_set(e, ERR_UNSUPPORTED, "%s: 'size' must be 2", where);
      if (size < 2)
        return err_set(e, ERR_FORMAT, "%s: the image is %dx%d, too small to pool", where, size,
                       size);
      L->cout = L->cin;
      size /= 2;
      break;
    }
    case L_GLOBAL_AVG_POOL:
      L->cout = L->cin;
      pooled = 1;
      break;
    case L_LINEAR_RELU:
      if ((rc = get_int(lj, "out_features", 65536, where, &L->cout, e)) ||
          (rc = load_linear(L, f, prefix, e)))
        return rc;
      break;
    }
    *ch = L->cout;
  }
  if (!pooled)
    return err_set(e, ERR_UNSUPPORTED, "%s: 'layers' needs a global_avg_pool layer", cpath);
  return ERR_OK;
}

static char *keep(classifier *c, const char *s) {
  for (int i = 0; i < CLF_MAX_HEADS * 2; i++)
    if (!c->strings[i])
      return c->strings[i] = mem_strdup(s);
  return NULL;
}

static int load_head_labels(classifier *c, int h, const json_t *labels, const char *where, err *e) {
  classifier_head *hd = &c->heads[h];
  if (!labels)
    return ERR_OK;
  if (!json_is_array(labels) || json_array_size(labels) != (size_t)hd->classes)
    return err_set(e, ERR_FORMAT, "%s: 'labels' must list the %d classes' names", where,
                   hd->classes);
  if (!(c->labels[h] = mem_calloc((size_t)hd->classes, sizeof(char *))))
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int k = 0; k < hd->classes; k++) {
    const char *s = json_string_value(json_array_get(labels, (size_t)k));
    if (!s || !*s || strlen(s) > 64)
      return err_set(e, ERR_FORMAT, "%s: labels[%d] must be a name of 1 to 64 bytes", where, k);
    if (!(c->labels[h][k] = mem_strdup(s)))
      return err_set(e, ERR_NOMEM, "out of memory");
  }
  hd->labels = (const char *const *)c->labels[h];
  return ERR_OK;
}

/* Heads: one linear layer each on the features, stacked into one matrix. */
static int load_heads(classifier *c, const json_t *cfg, const st_file *f, const char *cpath,
                      err *e) {
  const json_t *heads = json_object_get(cfg, "heads"), *hj;
  if (!json_is_array(heads) || json_array_size(heads) < 1 || json_array_size(heads) > CLF_MAX_HEADS)
    return err_set(e, ERR_FORMAT, "%s: 'heads' must be an array of 1 to %d heads", cpath,
                   CLF_MAX_HEADS);
  const int F = c->info.features;
  size_t i;
  int total = 0, rc;
  json_array_foreach(heads, i, hj) {
    char where[64];
    snprintf(where, sizeof where, "%s: heads[%zu]", cpath, i);
    const char *name = json_string_value(json_object_get(hj, "name"));
    classifier_head *hd = &c->heads[i];
    if (!name || !*name || strlen(name) > 64 || strchr(name, '.'))
      return err_set(e, ERR_FORMAT, "%s: 'name' must be 1 to 64 bytes without '.'", where);
    for (size_t k = 0; k < i; k++)
      if (strcasecmp(c->heads[k].name, name) == 0)
        return err_set(e, ERR_FORMAT, "%s: head '%s' appears twice", where, name);
    if ((rc = get_int(hj, "classes", 100000, where, &hd->classes, e)) != ERR_OK)
      return rc;
    if (!(hd->name = keep(c, name)))
      return err_set(e, ERR_NOMEM, "out of memory");
    hd->offset = total;
    total += hd->classes;
    c->info.n_heads = (int)i + 1;
    if ((rc = load_head_labels(c, (int)i, json_object_get(hj, "labels"), where, e)) != ERR_OK)
      return rc;
  }
  c->info.n_logits = total;
  c->head_w = mem_malloc((size_t)total * F * sizeof(float));
  c->head_b = mem_malloc((size_t)total * sizeof(float));
  if (!c->head_w || !c->head_b)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int h = 0; h < c->info.n_heads; h++) {
    const classifier_head *hd = &c->heads[h];
    char name[128];
    const int64_t ws[2] = {hd->classes, F}, bs[1] = {hd->classes};
    snprintf(name, sizeof name, "heads.%s.weight", hd->name);
    if ((rc = st_read_f32(f, name, 2, ws, c->head_w + (size_t)hd->offset * F, e)) != ERR_OK)
      return rc;
    snprintf(name, sizeof name, "heads.%s.bias", hd->name);
    if ((rc = st_read_f32(f, name, 1, bs, c->head_b + hd->offset, e)) != ERR_OK)
      return rc;
  }
  return ERR_OK;
}

static int load_config(classifier *c, const json_t *cfg, const char *cpath, err *e) {
  const char *cls = json_string_value(json_object_get(cfg, "_class_name"));
  if (!cls || strcmp(cls, CLASSIFIER_CLASS_NAME) != 0)
    return err_set(e, ERR_UNSUPPORTED, "%s: '_class_name' is %s%s%s, not %s", cpath, cls ? "'" : "",
                   cls ? cls : "missing", cls ? "'" : "", CLASSIFIER_CLASS_NAME);
  snprintf(c->class_name, sizeof c->class_name, "%s", cls);
  c->info.class_name = c->class_name;
  int rc = get_int(cfg, "in_channels", 64, cpath, &c->info.in_channels, e);
  if (rc == ERR_OK)
    rc = get_int(cfg, "sample_size", 4096, cpath, &c->info.sample_size, e);
  return rc;
}

int classifier_load(const char *dir, classifier **out, err *e) {
  char cpath[CLF_PATH_MAX], wpath[CLF_PATH_MAX];
  *out = NULL;
  if (!dir || strlen(dir) > CLF_PATH_MAX - 32)
    return err_set(e, ERR_INVALID, "classifier directory path is missing or too long");
  snprintf(cpath, sizeof cpath, "%s/config.json", dir);
  snprintf(wpath, sizeof wpath, "%s/model.safetensors", dir);
  json_t *cfg = read_config(cpath, e);
  if (!cfg)
    return e->code;
  ops_init();
  classifier *c = mem_calloc(1, sizeof *c);
  st_file *f = NULL;
  int rc = c ? load_config(c, cfg, cpath, e) : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = st_open(wpath, &f, e);
  int ch = c ? c->info.in_channels : 0;
  if (rc == ERR_OK)
    rc = load_layers(c, cfg, f, cpath, &ch, e);
  if (rc == ERR_OK) {
    c->info.features = ch;
    rc = load_heads(c, cfg, f, cpath, e);
  }
  if (rc == ERR_OK) {
    int64_t np = 0;
    for (int i = 0; i < st_count(f); i++)
      if (st_info_at(f, i)->dtype != ST_I64)
        np += st_info_at(f, i)->count;
    c->info.num_params = np;
    c->info.heads = c->heads;
  }
  st_close(f);
  json_decref(cfg);
  if (rc != ERR_OK) {
    classifier_free(c);
    return rc;
  }
  *out = c;
  return ERR_OK;
}

void classifier_free(classifier *c) {
  if (!c)
    return;
  for (int i = 0; i < c->nlayers; i++) {
    if (c->layers[i].type == L_CONV_BN_RELU && c->layers[i].conv.weight)
      ops_conv2d_unpack(&c->layers[i].conv);
    free(c->layers[i].w);
    free(c->layers[i].b);
  }
  for (int h = 0; h < CLF_MAX_HEADS; h++) {
    if (c->labels[h])
      for (int k = 0; k < c->heads[h].classes; k++)
        free(c->labels[h][k]);
    free(c->labels[h]);
  }
  for (int i = 0; i < CLF_MAX_HEADS * 2; i++)
    free(c->strings[i]);
  free(c->head_w);
  free(c->head_b);
  free(c);
}

const classifier_info *classifier_get_info(const classifier *c) {
  return &c->info;
}

int classifier_head_index(const classifier *c, const char *name) {
  for (int h = 0; name && h < c->info.n_heads; h++)
    if (strcasecmp(c->heads[h].name, name) == 0)
      return h;
  return -1;
}

int classifier_class_index(const classifier *c, int head, const char *label) {
  if (head < 0 || head >= c->info.n_heads || !label || !*label)
    return -1;
  const classifier_head *hd = &c->heads[head];
  for (int k = 0; hd->labels && k < hd->classes; k++)
    if (strcasecmp(hd->labels[k], label) == 0)
      return k;
  char *end;
  errno = 0;
  long v = strtol(label, &end, 10);
  if (errno || *end || end == label || v < 0 || v >= hd->classes)
    return -1;
  return (int)v;
}

/* ---------- evaluation: a chain of grad nodes ---------- */

#define CLF_MAX_NODES (2 * CLF_MAX_LAYERS + 1)

typedef struct chain {
  grad_node nd[CLF_MAX_NODES];
  float *v[CLF_MAX_NODES + 1]; /* v[0] the input, v[k + 1] node k's output */
  float *d[CLF_MAX_NODES + 1]; /* their gradients (backward only) */
  size_t size[CLF_MAX_NODES + 1];
  int count, features; /* features: index into v of the feature layer */
} chain;

static void push(chain *ch, grad_node nd) {
  ch->nd[ch->count++] = nd;
}

/* The nodes for n images: shapes follow the layers; every src is filled in by run_chain. */
static void build(const classifier *c, int n, chain *ch) {
  int cc = c->info.in_channels, h = c->info.sample_size, w = h;
  ch->count = 0;
  for (int i = 0; i < c->nlayers; i++) {
    const layer *L = &c->layers[i];
    grad_node nd = {.n = n, .c = cc, .h = h, .w = w};
    switch (L->type) {
    case L_CONV_BN_RELU:
      nd.op = GRAD_CONV2D;
      nd.p.conv = &L->conv;
      push(ch, nd);
      nd.op = GRAD_RELU;
      nd.c = L->cout;
      push(ch, nd);
      break;
    case L_MAX_POOL:
      nd.op = GRAD_MAXPOOL2X2;
      push(ch, nd);
      h /= 2;
      w /= 2;
      break;
    case L_GLOBAL_AVG_POOL:
      nd.op = GRAD_GLOBAL_AVGPOOL;
      push(ch, nd);
      h = w = 1;
      break;
    case L_LINEAR_RELU:
      nd.op = GRAD_LINEAR;
      nd.p.linear.out = L->cout;
      nd.src[1] = L->w;
      nd.src[2] = L->b;
      push(ch, nd);
      nd = (grad_node){.op = GRAD_RELU, .n = n, .c = L->cout, .h = 1, .w = 1};
      push(ch, nd);
      break;
    }
    cc = L->cout;
  }
  ch->features = ch->count;
  grad_node hd = {.op = GRAD_LINEAR, .n = n, .c = cc, .h = 1, .w = 1};
  hd.p.linear.out = c->info.n_logits;
  hd.src[1] = c->head_w;
  hd.src[2] = c->head_b;
  push(ch, hd);
}

static int check_call(const classifier *c, const float *x, int n, int h, int w, int threads,
                      err *e) {
  const classifier_info *in = &c->info;
  if (!x || n < 1 || n > 4096)
    return err_set(e, ERR_INVALID, "classifier: batch %d must be in [1, 4096] with an input", n);
  if (h != in->sample_size || w != in->sample_size)
    return err_set(e, ERR_SHAPE, "classifier: images are %dx%d, this classifier takes %dx%d", h, w,
                   in->sample_size, in->sample_size);
  if (threads < 1)
    return err_set(e, ERR_INVALID, "classifier: threads %d must be >= 1", threads);
  if (!ops_all_finite(x, (size_t)n * in->in_channels * h * w))
    return err_set(e, ERR_NUMERIC, "classifier: non-finite values in the input images");
  return ERR_OK;
}

/* Forward (and, with grad_logits, backward into grad_x) of the whole chain. */
static int run_chain(const classifier *c, const float *x, int n, const float *grad_logits,
                     float *logits, float *features, float *grad_x, int threads, err *e) {
  chain *ch = mem_calloc(1, sizeof *ch);
  arena *a = arena_new((size_t)4 << 20);
  pool *p = threads > 1 ? pool_new(threads) : NULL;
  int rc = ch && a && (threads == 1 || p) ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK) {
    build(c, n, ch);
    ch->v[0] = (float *)x; /* read only: no node writes its source */
  }
  const size_t nx = (size_t)n * c->info.in_channels * c->info.sample_size * c->info.sample_size;
  for (int k = 0; rc == ERR_OK && k < ch->count; k++) {
    grad_node *nd = &ch->nd[k];
    nd->src[0] = ch->v[k];
    ch->size[k + 1] = grad_size(nd, -1);
    if (!(ch->v[k + 1] = arena_floats(a, ch->size[k + 1])))
      rc = err_set(e, ERR_NOMEM, "out of memory for the classifier's activations");
    else
      rc = grad_forward(nd, ch->v[k + 1], a, p, e);
  }
  if (rc == ERR_OK && logits)
    memcpy(logits, ch->v[ch->count], (size_t)n * c->info.n_logits * sizeof *logits);
  if (rc == ERR_OK && features)
    memcpy(features, ch->v[ch->features], (size_t)n * c->info.features * sizeof *features);
  if (rc == ERR_OK && grad_logits) {
    memset(grad_x, 0, nx * sizeof *grad_x);
    ch->d[0] = grad_x;
    ch->d[ch->count] = (float *)grad_logits; /* read only: ddst of the last node */
    for (int k = 1; rc == ERR_OK && k < ch->count; k++) {
      if (!(ch->d[k] = arena_floats(a, ch->size[k])))
        rc = err_set(e, ERR_NOMEM, "out of memory for the classifier's gradients");
      else
        memset(ch->d[k], 0, ch->size[k] * sizeof(float));
    }
    for (int k = ch->count - 1; rc == ERR_OK && k >= 0; k--) {
      ch->nd[k].ddst = ch->d[k + 1];
      ch->nd[k].dsrc[0] = ch->d[k];
      rc = grad_backward(&ch->nd[k], a, p, e);
    }
  }
  free(ch);
  arena_free(a);
  pool_free(p);
  return rc;
}

int classifier_run(const classifier *c, const float *x, int n, int h, int w, float *logits,
                   float *features, int threads, err *e) {
  int rc = check_call(c, x, n, h, w, threads, e);
  if (rc == ERR_OK)
    rc = run_chain(c, x, n, NULL, logits, features, NULL, threads, e);
  return rc;
}

int classifier_input_grad(const classifier *c, const float *x, int n, int h, int w,
                          const float *grad_logits, float *logits, float *grad_x, int threads,
                          err *e) {
  int rc = check_call(c, x, n, h, w, threads, e);
  if (rc == ERR_OK && (!grad_logits || !grad_x))
    rc = err_set(e, ERR_INVALID, "classifier: the input gradient needs grad_logits and grad_x");
  if (rc == ERR_OK)
    rc = run_chain(c, x, n, grad_logits, logits, NULL, grad_x, threads, e);
  return rc;
}

/* The gradient of log_softmax(z)[t] is onehot(t) - softmax(z); the forward's logits are needed
 * first, so this runs the chain twice (the classifier is small beside the UNet). */
int classifier_log_prob_grad(const classifier *c, const float *x, int n, int h, int w, int head,
                             const int64_t *target, float *logp, float *grad_x, int threads,
                             err *e) {
  int rc = check_call(c, x, n, h, w, threads, e);
  if (rc != ERR_OK)
    return rc;
  if (head < 0 || head >= c->info.n_heads || !target || !grad_x)
    return err_set(e, ERR_INVALID, "classifier: head %d out of range, or no target/grad_x", head);
  const classifier_head *hd = &c->heads[head];
  for (int i = 0; i < n; i++)
    if (target[i] < 0 || target[i] >= hd->classes)
      return err_set(e, ERR_INVALID,
                     "classifier: target %lld of image %d is not a class of head "
                     "'%s' (0..%d)",
                     (long long)target[i], i, hd->name, hd->classes - 1);
  const size_t nl = (size_t)n * c->info.n_logits;
  float *z = mem_malloc(nl * sizeof *z), *g = mem_calloc(nl, sizeof *g);
  rc = z && g ? run_chain(c, x, n, NULL, z, NULL, NULL, threads, e)
              : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; rc == ERR_OK && i < n; i++) {
    const float *zi = z + (size_t)i * c->info.n_logits + hd->offset;
    float *gi = g + (size_t)i * c->info.n_logits + hd->offset;
    double mx = zi[0];
    for (int k = 1; k < hd->classes; k++)
      mx = zi[k] > mx ? zi[k] : mx;
    double s = exp(zi[0] - mx); /* > 0: the sum below is at least the max's exp(0) = 1 */
    for (int k = 1; k < hd->classes; k++)
      s += exp(zi[k] - mx);
    const double lse = mx + log(s);
    for (int k = 0; k < hd->classes; k++)
      gi[k] = (float)((k == target[i]) - exp(zi[k] - lse));
    if (logp)
      logp[i] = (float)(zi[target[i]] - lse);
  }
  if (rc == ERR_OK)
    rc = run_chain(c, x, n, g, NULL, NULL, grad_x, threads, e);
  free(z);
  free(g);
  return rc;
}
