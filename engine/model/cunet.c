/* UNet2DConditionModel (Stable Diffusion 1.x and 2.x): config parsing with diffusers' defaults
 * and its refusals, weight loading under diffusers' names, and the forward pass with encoder
 * hidden states. The forward can also run dry (no arithmetic) to count FLOPs and find shapes
 * along exactly the same path. */
#include "cunet_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "ops.h"
#include "transformer.h"

/* ---------- config ---------- */

typedef struct cunet_config {
  int sample_size, in_channels, out_channels, center_input, flip_sin_to_cos;
  double freq_shift, mid_scale, norm_eps;
  int nlevels;
  const char *down_types[CUNET_MAX_LEVELS], *up_types[CUNET_MAX_LEVELS];
  /* per level, in down-block order */
  int channels[CUNET_MAX_LEVELS], layers[CUNET_MAX_LEVELS], heads[CUNET_MAX_LEVELS];
  int tlayers[CUNET_MAX_LEVELS];
  int cross_dim, linear_proj, downsample_padding, norm_groups, scale_shift, has_mid;
  int num_classes, temb_dim, conv_in_k, conv_out_k;
} cunet_config;

static const char *const known_keys[] = {"sample_size",
                                         "in_channels",
                                         "out_channels",
                                         "center_input_sample",
                                         "flip_sin_to_cos",
                                         "freq_shift",
                                         "down_block_types",
                                         "mid_block_type",
                                         "up_block_types",
                                         "only_cross_attention",
                                         "block_out_channels",
                                         "layers_per_block",
                                         "downsample_padding",
                                         "mid_block_scale_factor",
                                         "dropout",
                                         "act_fn",
                                         "norm_num_groups",
                                         "norm_eps",
                                         "cross_attention_dim",
                                         "transformer_layers_per_block",
                                         "reverse_transformer_layers_per_block",
                                         "encoder_hid_dim",
                                         "encoder_hid_dim_type",
                                         "attention_head_dim",
                                         "num_attention_heads",
                                         "dual_cross_attention",
                                         "use_linear_projection",
                                         "class_embed_type",
                                         "addition_embed_type",
                                         "addition_time_embed_dim",
                                         "num_class_embeds",
                                         "upcast_attention",
                                         "resnet_time_scale_shift",
                                         "resnet_skip_time_act",
                                         "resnet_out_scale_factor",
                                         "time_embedding_type",
                                         "time_embedding_dim",
                                         "time_embedding_act_fn",
                                         "timestep_post_act",
                                         "time_cond_proj_dim",
                                         "conv_in_kernel",
                                         "conv_out_kernel",
                                         "projection_class_embeddings_input_dim",
                                         "attention_type",
                                         "class_embeddings_concat",
                                         "mid_block_only_cross_attention",
                                         "cross_attention_norm",
                                         "addition_embed_type_num_heads",
                                         "num_train_timesteps",
                                         "prediction_type"};

/* Keys whose every non-default value means a network we do not build (SD-XL's added
 * conditioning, Kandinsky's projections, GLIGEN, ...): absent, null, false or `ok` pass. */
static int refuse_set(const json_t *cfg, const char *key, const char *ok, const char *what,
                      err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v) || json_is_false(v) ||
      (ok && json_is_string(v) && strcmp(json_string_value(v), ok) == 0))
    return ERR_OK;
  if (json_is_array(v)) { /* a per-block list of false (only_cross_attention) */
    size_t i;
    const json_t *x;
    int all_false = 1;
    json_array_foreach(v, i, x) all_false &= json_is_false(x);
    if (all_false)
      return ERR_OK;
  }
  char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
  int rc = err_set(e, ERR_UNSUPPORTED,
                   "config key '%s' = %.60s: %s is not supported (Stable Diffusion 1.x and 2.x "
                   "UNets only)",
                   key, text ? text : "?", what);
  free(text);
  return rc;
}

/* An integer, or a list of one per level (down-block order) as diffusers accepts for its
 * per-block keys; null entries are refused. */
static int get_per_level(const json_t *cfg, const char *key, int def, int n, int min, int max,
                         int *out, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!json_is_array(v)) {
    int one, rc = blocks_get_int(cfg, key, def, min, max, &one, e);
    for (int i = 0; !rc && i < n; i++)
      out[i] = one;
    return rc;
  }
  if ((int)json_array_size(v) != n)
    return err_set(e, ERR_INVALID, "config key '%s' lists %d values for %d blocks", key,
                   (int)json_array_size(v), n);
  for (int i = 0; i < n; i++) {
    const json_t *x = json_array_get(v, (size_t)i);
    if (!json_is_integer(x) || json_integer_value(x) < min || json_integer_value(x) > max)
      return err_set(e, ERR_INVALID, "config key '%s'[%d] must be an integer in [%d, %d]", key, i,
                     min, max);
    out[i] = (int)json_integer_value(x);
  }
  return ERR_OK;
}

static int parse_sample_size(const json_t *cfg, int *out, err *e) {
  const json_t *ss = json_object_get(cfg, "sample_size");
  if (!json_is_array(ss))
    return blocks_get_int(cfg, "sample_size", 0, 1, 4096, out, e);
  if (json_array_size(ss) != 2 || !json_is_integer(json_array_get(ss, 0)) ||
      json_integer_value(json_array_get(ss, 0)) != json_integer_value(json_array_get(ss, 1)))
    return err_set(e, ERR_UNSUPPORTED, "config key 'sample_size': only square sizes");
  *out = (int)json_integer_value(json_array_get(ss, 0));
  if (*out < 1 || *out > 4096)
    return err_set(e, ERR_INVALID, "config key 'sample_size' out of range");
  return ERR_OK;
}

static int parse_refusals(const json_t *cfg, err *e) {
  int rc;
  (void)((rc = refuse_set(cfg, "addition_embed_type", NULL, "added conditioning (SD-XL)", e)) ||
         (rc = refuse_set(cfg, "addition_time_embed_dim", NULL, "added time ids (SD-XL)", e)) ||
         (rc = refuse_set(cfg, "class_embed_type", NULL,
                          "a class embedding other than num_class_embeds' table", e)) ||
         (rc = refuse_set(cfg, "projection_class_embeddings_input_dim", NULL,
                          "a projected class embedding", e)) ||
         (rc = refuse_set(cfg, "class_embeddings_concat", NULL, "concatenated class embeddings",
                          e)) ||
         (rc = refuse_set(cfg, "encoder_hid_dim", NULL, "an encoder projection", e)) ||
         (rc = refuse_set(cfg, "encoder_hid_dim_type", NULL, "an encoder projection", e)) ||
         (rc = refuse_set(cfg, "time_embedding_act_fn", NULL,
                          "an activation after the time "
                          "embedding",
                          e)) ||
         (rc = refuse_set(cfg, "timestep_post_act", NULL,
                          "a post-activation of the time "
                          "embedding",
                          e)) ||
         (rc = refuse_set(cfg, "time_cond_proj_dim", NULL, "a timestep condition projection", e)) ||
         (rc = refuse_set(cfg, "only_cross_attention", NULL, "cross-attention only blocks", e)) ||
         (rc = refuse_set(cfg, "mid_block_only_cross_attention", NULL,
                          "a cross-attention only mid block", e)) ||
         (rc = refuse_set(cfg, "dual_cross_attention", NULL, "dual cross-attention", e)) ||
         (rc = refuse_set(cfg, "attention_type", "default", "gated (GLIGEN) attention", e)) ||
         (rc = refuse_set(cfg, "reverse_transformer_layers_per_block", NULL,
                          "separate up-block transformer depths", e)));
  return rc;
}

/* Heads per level: diffusers' UNet2DConditionModel reads attention_head_dim as the number of
 * heads (a naming slip it keeps for compatibility) unless num_attention_heads is given. */
static int parse_heads(const json_t *cfg, cunet_config *c, err *e) {
  const json_t *nah = json_object_get(cfg, "num_attention_heads");
  const char *key = nah && !json_is_null(nah) ? "num_attention_heads" : "attention_head_dim";
  return get_per_level(cfg, key, 8, c->nlevels, 1, 1 << 16, c->heads, e);
}

/* cross_attention_dim: one width, or a per-block list of one width (one set of hidden states
 * feeds every block). */
static int parse_cross_dim(const json_t *cfg, cunet_config *c, err *e) {
  int dims[CUNET_MAX_LEVELS];
  int rc = get_per_level(cfg, "cross_attention_dim", 1280, c->nlevels, 1, 1 << 16, dims, e);
  for (int i = 1; !rc && i < c->nlevels; i++)
    if (dims[i] != dims[0])
      rc = err_set(e, ERR_UNSUPPORTED,
                   "config key 'cross_attention_dim': blocks of different widths (%d, %d) are "
                   "not supported",
                   dims[0], dims[i]);
  c->cross_dim = dims[0];
  return rc;
}

static int parse_block_types(const json_t *cfg, cunet_config *c, err *e) {
  static const char *const down_allowed[] = {"CrossAttnDownBlock2D", "DownBlock2D", NULL};
  static const char *const up_allowed[] = {"CrossAttnUpBlock2D", "UpBlock2D", NULL};
  static const char *const down_def[] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D"};
  static const char *const up_def[] = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D"};
  static const int boc_def[] = {320, 640, 1280, 1280};
  int ndown = 0, nup = 0, rc;
  if ((rc = blocks_get_list(cfg, "down_block_types", down_def, 4, down_allowed, CUNET_MAX_LEVELS,
                            c->down_types, &ndown, e)) ||
      (rc = blocks_get_list(cfg, "up_block_types", up_def, 4, up_allowed, CUNET_MAX_LEVELS,
                            c->up_types, &nup, e)))
    return rc;
  const json_t *boc = json_object_get(cfg, "block_out_channels");
  c->nlevels = json_is_array(boc) ? (int)json_array_size(boc) : 4;
  if (c->nlevels < 1 || c->nlevels > CUNET_MAX_LEVELS)
    return err_set(e, ERR_INVALID, "config key 'block_out_channels' must list 1 to %d widths",
                   CUNET_MAX_LEVELS);
  if (!boc || json_is_null(boc))
    memcpy(c->channels, boc_def, sizeof boc_def);
  else if ((rc = get_per_level(cfg, "block_out_channels", 0, c->nlevels, 1, 65536, c->channels, e)))
    return rc;
  if (ndown != c->nlevels || nup != c->nlevels)
    return err_set(e, ERR_INVALID,
                   "config: down_block_types (%d), up_block_types (%d) and block_out_channels "
                   "(%d) must have the same length",
                   ndown, nup, c->nlevels);
  return ERR_OK;
}

static int parse_config(const json_t *cfg, cunet_config *c, err *e) {
  static const char *const positional[] = {"positional", NULL};
  static const char *const silu[] = {"silu", "swish", NULL};
  static const char *const shifts[] = {"default", "scale_shift", NULL};
  static const char *const mids[] = {"UNetMidBlock2DCrossAttn", NULL};
  const char *tmp, *shift, *mid = NULL;
  int rc, upcast;
  memset(c, 0, sizeof *c);
  if (!json_is_object(cfg))
    return err_set(e, ERR_FORMAT, "config is not a JSON object");
  const json_t *ng = json_object_get(cfg, "norm_num_groups");
  if ((rc = blocks_check_keys(cfg, known_keys, (int)(sizeof known_keys / sizeof known_keys[0]),
                              "UNet2DConditionModel", e)) ||
      (rc = parse_refusals(cfg, e)) || (rc = parse_block_types(cfg, c, e)) ||
      (rc = parse_sample_size(cfg, &c->sample_size, e)) ||
      (rc = blocks_get_int(cfg, "in_channels", 4, 1, 64, &c->in_channels, e)) ||
      (rc = blocks_get_int(cfg, "out_channels", 4, 1, 64, &c->out_channels, e)) ||
      (rc = blocks_get_bool(cfg, "center_input_sample", 0, &c->center_input, e)) ||
      (rc = blocks_get_bool(cfg, "flip_sin_to_cos", 1, &c->flip_sin_to_cos, e)) ||
      (rc = blocks_get_num(cfg, "freq_shift", 0, &c->freq_shift, e)) ||
      (rc = blocks_get_choice(cfg, "time_embedding_type", "positional", positional, &tmp, e)) ||
      (rc = get_per_level(cfg, "layers_per_block", 2, c->nlevels, 1, CUNET_MAX_LAYERS - 1,
                          c->layers, e)) ||
      (rc = get_per_level(cfg, "transformer_layers_per_block", 1, c->nlevels, 1, 64, c->tlayers,
                          e)) ||
      (rc = blocks_get_int(cfg, "downsample_padding", 1, 0, 1, &c->downsample_padding, e)) ||
      (rc = blocks_get_num(cfg, "mid_block_scale_factor", 1, &c->mid_scale, e)) ||
      (rc = blocks_get_choice(cfg, "act_fn", "silu", silu, &tmp, e)) ||
      (rc = blocks_get_int(cfg, "norm_num_groups", 32, 1, 1 << 16, &c->norm_groups, e)) ||
      (rc = blocks_get_num(cfg, "norm_eps", 1e-5, &c->norm_eps, e)) ||
      (rc = blocks_get_bool(cfg, "use_linear_projection", 0, &c->linear_proj, e)) ||
      /* upcast_attention: q and k in float32 for half-precision models; ours always are */
      (rc = blocks_get_bool(cfg, "upcast_attention", 0, &upcast, e)) ||
      (rc = blocks_get_choice(cfg, "resnet_time_scale_shift", "default", shifts, &shift, e)) ||
      (rc = blocks_get_int(cfg, "num_class_embeds", 0, 1, 1 << 20, &c->num_classes, e)) ||
      (rc = blocks_get_int(cfg, "time_embedding_dim", 0, 1, 1 << 16, &c->temb_dim, e)) ||
      (rc = blocks_get_int(cfg, "conv_in_kernel", 3, 1, 7, &c->conv_in_k, e)) ||
      (rc = blocks_get_int(cfg, "conv_out_kernel", 3, 1, 7, &c->conv_out_k, e)) ||
      (rc = parse_heads(cfg, c, e)) || (rc = parse_cross_dim(cfg, c, e)))
    return rc;
  if (ng && json_is_null(ng))
    return err_set(e, ERR_UNSUPPORTED,
                   "config key 'norm_num_groups': null (no output norm) is "
                   "not supported");
  if (c->conv_in_k % 2 == 0 || c->conv_out_k % 2 == 0)
    return err_set(e, ERR_INVALID,
                   "config keys 'conv_in_kernel' and 'conv_out_kernel' must be odd");
  if (c->norm_eps <= 0)
    return err_set(e, ERR_INVALID, "config key 'norm_eps' must be positive");
  const json_t *mt = json_object_get(cfg, "mid_block_type");
  c->has_mid = !(mt && json_is_null(mt));
  if (c->has_mid &&
      (rc = blocks_get_choice(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn", mids, &mid, e)))
    return rc;
  c->scale_shift = strcmp(shift, "scale_shift") == 0;
  if (!c->temb_dim)
    c->temb_dim = 4 * c->channels[0];
  return ERR_OK;
}

/* ---------- weights ---------- */

static int load_level(blocks_loader *ld, const cunet_config *c, const char *kind, int i, int lvl,
                      int cin_first, const int *skips, int *nskips, cblock *b) {
  char name[256];
  int rc, ch = cin_first, up = kind[0] == 'u';
  const int out = c->channels[lvl];
  const resnet_spec rs = {.groups = c->norm_groups,
                          .eps = c->norm_eps,
                          .temb_dim = c->temb_dim,
                          .scale_shift = c->scale_shift,
                          .out_scale = 1.0f};
  const transformer_spec ts = {.heads = c->heads[lvl],
                               .groups = c->norm_groups,
                               .layers = c->tlayers[lvl],
                               .cross_dim = c->cross_dim,
                               .linear_proj = c->linear_proj};
  b->nlayers = c->layers[lvl] + up;
  b->has_xattn = strncmp(up ? c->up_types[i] : c->down_types[i], "CrossAttn", 9) == 0;
  b->has_sample = i < c->nlevels - 1;
  for (int l = 0; l < b->nlayers; l++) {
    snprintf(name, sizeof name, "%s_blocks.%d.resnets.%d", kind, i, l);
    const int cin = up ? ch + skips[--*nskips] : (l == 0 ? ch : out);
    if ((rc = blocks_load_resnet(ld, name, &rs, cin, out, &b->res[l])))
      return rc;
    if (b->has_xattn) {
      snprintf(name, sizeof name, "%s_blocks.%d.attentions.%d", kind, i, l);
      if ((rc = transformer_load(ld, name, &ts, out, &b->tf[l])))
        return rc;
    }
    ch = out;
  }
  if (!b->has_sample)
    return ERR_OK;
  snprintf(name, sizeof name, "%s_blocks.%d.%s.0.conv", kind, i,
           up ? "upsamplers" : "downsamplers");
  if (up)
    return blocks_load_conv(ld, name, out, out, 3, 1, 1, 1, &b->sample_conv);
  if ((rc = blocks_load_conv(ld, name, out, out, 3, 2, c->downsample_padding, 1, &b->sample_conv)))
    return rc;
  if (c->downsample_padding == 0) /* diffusers pads (0,1,0,1) before a pad-0 conv */
    b->sample_conv.pad_bottom = b->sample_conv.pad_right = 1;
  return ERR_OK;
}

static int load_mid(blocks_loader *ld, cunet *u, const cunet_config *c) {
  const int top = c->channels[c->nlevels - 1];
  const resnet_spec rs = {.groups = c->norm_groups,
                          .eps = c->norm_eps,
                          .temb_dim = c->temb_dim,
                          .scale_shift = c->scale_shift,
                          .out_scale = (float)c->mid_scale};
  const transformer_spec ts = {.heads = c->heads[c->nlevels - 1],
                               .groups = c->norm_groups,
                               .layers = c->tlayers[c->nlevels - 1],
                               .cross_dim = c->cross_dim,
                               .linear_proj = c->linear_proj};
  int rc;
  (void)((rc = blocks_load_resnet(ld, "mid_block.resnets.0", &rs, top, top, &u->mid_res[0])) ||
         (rc = transformer_load(ld, "mid_block.attentions.0", &ts, top, &u->mid_tf)) ||
         (rc = blocks_load_resnet(ld, "mid_block.resnets.1", &rs, top, top, &u->mid_res[1])));
  return rc;
}

static int load_weights(blocks_loader *ld, cunet *u, const cunet_config *c) {
  int rc, ch0 = c->channels[0], temb = c->temb_dim;
  if ((rc = blocks_load_conv(ld, "conv_in", c->in_channels, ch0, c->conv_in_k, 1,
                             (c->conv_in_k - 1) / 2, 1, &u->conv_in)))
    return rc;
  u->temb1 = (linear){.in = ch0, .out = temb};
  u->temb2 = (linear){.in = temb, .out = temb};
  if ((rc = blocks_load_linear(ld, "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
                               ch0, temb, &u->temb1.weight, &u->temb1.bias)) ||
      (rc = blocks_load_linear(ld, "time_embedding.linear_2.weight", "time_embedding.linear_2.bias",
                               temb, temb, &u->temb2.weight, &u->temb2.bias)))
    return rc;
  if (c->num_classes) {
    const int64_t shape[2] = {c->num_classes, temb};
    if (!(u->class_table = blocks_load_tensor(ld, "class_embedding.weight", 2, shape)))
      return ld->e->code;
  }
  /* Widths of the skip connections in push order, so the up path knows each resnet's input
   * width exactly as diffusers computes it. */
  int skips[CUNET_MAX_LEVELS * CUNET_MAX_LAYERS + 1], nskips = 0, ch = ch0;
  skips[nskips++] = ch0;
  for (int i = 0; i < c->nlevels; i++) {
    int none = 0;
    if ((rc = load_level(ld, c, "down", i, i, ch, skips, &none, &u->down[i])))
      return rc;
    ch = c->channels[i];
    for (int l = 0; l < u->down[i].nlayers + u->down[i].has_sample; l++)
      skips[nskips++] = ch;
  }
  if (c->has_mid && (rc = load_mid(ld, u, c)))
    return rc;
  for (int i = 0; i < c->nlevels; i++) {
    const int lvl = c->nlevels - 1 - i;
    if ((rc = load_level(ld, c, "up", i, lvl, ch, skips, &nskips, &u->up[i])))
      return rc;
    ch = c->channels[lvl];
  }
  (void)((rc = blocks_load_group_norm(ld, "conv_norm_out", c->norm_groups, ch0, c->norm_eps,
                                      &u->norm_out)) ||
         (rc = blocks_load_conv(ld, "conv_out", ch0, c->out_channels, c->conv_out_k, 1,
                                (c->conv_out_k - 1) / 2, 1, &u->conv_out)));
  return rc;
}

/* The network of config with its tensors from weights, or (weights NULL) a fresh training
 * initialisation drawn from seed (blocks.h). */
static int build(const json_t *config, const st_file *weights, uint64_t seed, cunet **out, err *e) {
  *out = NULL;
  cunet_config c;
  int rc = parse_config(config, &c, e);
  if (rc)
    return rc;
  cunet *u = mem_calloc(1, sizeof *u);
  if (!u)
    return err_set(e, ERR_NOMEM, "out of memory");
  blocks_spares_init(&u->spares);
  u->nlevels = c.nlevels;
  u->ch0 = c.channels[0];
  u->center_input = c.center_input;
  u->flip_sin_to_cos = c.flip_sin_to_cos;
  u->freq_shift = (float)c.freq_shift;
  u->has_mid = c.has_mid;
  u->shape = (cunet_shape){.sample_size = c.sample_size,
                           .in_channels = c.in_channels,
                           .out_channels = c.out_channels,
                           .num_classes = c.num_classes,
                           .cross_dim = c.cross_dim,
                           .temb_dim = c.temb_dim};
  blocks_loader ld;
  rc = blocks_loader_begin(&ld, &u->ps, weights, seed, e);
  if (!rc)
    rc = blocks_loader_end(&ld, load_weights(&ld, u, &c));
  if (rc) {
    cunet_free(u);
    return rc;
  }
  u->shape.num_params = u->ps.count;
  *out = u;
  return ERR_OK;
}

int cunet_load(const json_t *config, const st_file *weights, cunet **out, err *e) {
  return build(config, weights, 0, out, e);
}

int cunet_init(const json_t *config, uint64_t seed, cunet **out, err *e) {
  return build(config, NULL, seed, out, e);
}

void cunet_free(cunet *u) {
  if (!u)
    return;
  blocks_params_free(&u->ps); /* first: it unpacks layers that live in the transformers */
  for (int i = 0; i < CUNET_MAX_LEVELS; i++)
    for (int l = 0; l < CUNET_MAX_LAYERS; l++) {
      transformer_free(&u->down[i].tf[l]);
      transformer_free(&u->up[i].tf[l]);
    }
  transformer_free(&u->mid_tf);
  blocks_spares_free(&u->spares);
  free(u);
}

const cunet_shape *cunet_get_shape(const cunet *u) {
  return &u->shape;
}

blocks_params *cunet_params(cunet *u) {
  return &u->ps;
}

/* ---------- forward ---------- */

typedef struct cfwd {
  blocks_run r;
  const cunet *u;
  const float *ctx; /* encoder hidden states channel-major: [n][cross_dim][seq] */
  int seq;
  const model_hooks *hooks; /* or NULL */
  int mid_shape[3];         /* [C, H, W] of the mid-block output, set by the pass */
} cfwd;

typedef struct skip {
  float *p;
  int c;
} skip;

/* One level of the down path; pushes its outputs onto skips. */
static int down_level(cfwd *f, const cblock *b, float **cur, int *ch, int *h, int *w, skip *skips,
                      int *nskips) {
  for (int l = 0; l < b->nlayers; l++) {
    const resnet *r = &b->res[l];
    float *nx = blocks_act(&f->r, r->cout, *h, *w);
    if (!nx || blocks_resnet_forward(&f->r, r, *cur, *h, *w, nx) ||
        (b->has_xattn && transformer_forward(&f->r, &b->tf[l], nx, *h * *w, f->ctx, f->seq)))
      return -1;
    *cur = nx;
    *ch = r->cout;
    skips[(*nskips)++] = (skip){nx, *ch};
  }
  if (!b->has_sample)
    return 0;
  int oh, ow;
  ops_conv2d_out_size(&b->sample_conv, *h, *w, &oh, &ow);
  float *nx = blocks_act(&f->r, *ch, oh, ow);
  if (!nx || blocks_conv(&f->r, &b->sample_conv, *cur, *h, *w, nx))
    return -1;
  *cur = nx;
  *h = oh;
  *w = ow;
  skips[(*nskips)++] = (skip){nx, *ch};
  return 0;
}

/* One level of the up path, taking its skips back off the stack. */
static int up_level(cfwd *f, const cblock *b, float **cur, int *ch, int *h, int *w,
                    const skip *skips, int *nskips) {
  const int n = f->r.n;
  for (int l = 0; l < b->nlayers; l++) {
    const resnet *r = &b->res[l];
    const skip s = skips[--*nskips];
    float *cat = blocks_act(&f->r, *ch + s.c, *h, *w), *nx = blocks_act(&f->r, r->cout, *h, *w);
    if (!cat || !nx)
      return -1;
    blocks_concat(&f->r, *cur, *ch, s.p, s.c, *h * *w, cat);
    if (blocks_resnet_forward(&f->r, r, cat, *h, *w, nx) ||
        (b->has_xattn && transformer_forward(&f->r, &b->tf[l], nx, *h * *w, f->ctx, f->seq)))
      return -1;
    *cur = nx;
    *ch = r->cout;
  }
  if (!b->has_sample)
    return 0;
  float *upx = blocks_act(&f->r, *ch, 2 * *h, 2 * *w), *nx = blocks_act(&f->r, *ch, 2 * *h, 2 * *w);
  if (!upx || !nx)
    return -1;
  if (!f->r.dry)
    ops_upsample_nearest2x(*cur, n, *ch, *h, *w, upx);
  *h *= 2;
  *w *= 2;
  if (blocks_conv(&f->r, &b->sample_conv, upx, *h, *w, nx))
    return -1;
  *cur = nx;
  return 0;
}

static int mid_block(cfwd *f, float **cur, int ch, int h, int w) {
  const cunet *u = f->u;
  float *nx = blocks_act(&f->r, ch, h, w), *ny = blocks_act(&f->r, ch, h, w);
  if (!nx || !ny || blocks_resnet_forward(&f->r, &u->mid_res[0], *cur, h, w, nx) ||
      transformer_forward(&f->r, &u->mid_tf, nx, h * w, f->ctx, f->seq) ||
      blocks_resnet_forward(&f->r, &u->mid_res[1], nx, h, w, ny))
    return -1;
  f->mid_shape[0] = ch;
  f->mid_shape[1] = h;
  f->mid_shape[2] = w;
  const size_t cnt = (size_t)f->r.n * ch * h * w;
  if (f->hooks && !f->r.dry && f->hooks->mid_save)
    memcpy(f->hooks->mid_save, ny, cnt * sizeof *ny);
  if (f->hooks && !f->r.dry && f->hooks->mid_replace)
    memcpy(ny, f->hooks->mid_replace, cnt * sizeof *ny);
  *cur = ny;
  return 0;
}

/* Runs the network (dry: shapes and FLOPs only); x, t, labels as model_call's. */
static int forward(cfwd *f, const float *x, int h, int w, const float *t, const int64_t *labels,
                   float *out, err *e) {
  const cunet *u = f->u;
  const int n = f->r.n;
  skip skips[CUNET_MAX_LEVELS * CUNET_MAX_LAYERS + 1];
  int nskips = 0, ch = u->ch0;
  float *xin = blocks_act(&f->r, u->shape.in_channels, h, w), *cur = blocks_act(&f->r, ch, h, w);
  if (!xin || !cur ||
      blocks_time_embedding(&f->r, t, u->ch0, u->flip_sin_to_cos, u->freq_shift, &u->temb1,
                            &u->temb2, u->class_table, labels))
    goto oom;
  const size_t cnt = (size_t)n * u->shape.in_channels * h * w;
  for (size_t i = 0; !f->r.dry && i < cnt; i++)
    xin[i] = u->center_input ? 2.0f * x[i] - 1.0f : x[i];
  if (blocks_conv(&f->r, &u->conv_in, xin, h, w, cur))
    goto oom;
  skips[nskips++] = (skip){cur, ch};
  for (int i = 0; i < u->nlevels; i++)
    if (down_level(f, &u->down[i], &cur, &ch, &h, &w, skips, &nskips))
      goto oom;
  if (u->has_mid && mid_block(f, &cur, ch, h, w))
    goto oom;
  for (int i = 0; i < u->nlevels; i++)
    if (up_level(f, &u->up[i], &cur, &ch, &h, &w, skips, &nskips))
      goto oom;
  float *normed = blocks_act(&f->r, ch, h, w);
  if (!normed)
    goto oom;
  blocks_norm(&f->r, &u->norm_out, cur, h * w, 1, normed);
  if (blocks_conv(&f->r, &u->conv_out, normed, h, w, out))
    goto oom;
  return ERR_OK;
oom:
  return err_set(e, ERR_NOMEM, "out of memory in UNet2DConditionModel forward (batch %d)", n);
}

int cunet_check_call(const cunet *u, const model_call *c, err *e) {
  const int mult = 1 << (u->nlevels - 1);
  if (c->n < 1 || c->h < 1 || c->w < 1 || c->h > 4096 || c->w > 4096)
    return err_set(e, ERR_INVALID, "bad input shape: batch %d, %dx%d", c->n, c->h, c->w);
  if (c->h % mult || c->w % mult)
    return err_set(e, ERR_INVALID,
                   "input size %dx%d must be a multiple of %d for this model's %d levels", c->h,
                   c->w, mult, u->nlevels);
  for (int i = 0; i < c->n; i++)
    if (!isfinite(c->t[i]))
      return err_set(e, ERR_INVALID, "timestep %d is not finite", i);
  if (!c->encoder_hidden_states)
    return err_set(e, ERR_INVALID,
                   "this UNet2DConditionModel needs encoder hidden states [n][seq][%d] (a text "
                   "encoder's output)",
                   u->shape.cross_dim);
  if (c->seq_len < 1 || c->seq_len > CUNET_MAX_SEQ)
    return err_set(e, ERR_INVALID, "encoder hidden states of %d tokens (1 to %d)", c->seq_len,
                   CUNET_MAX_SEQ);
  if (!ops_all_finite(c->encoder_hidden_states, (size_t)c->n * c->seq_len * u->shape.cross_dim))
    return err_set(e, ERR_INVALID, "encoder hidden states are not all finite");
  if (u->shape.num_classes) {
    if (!c->labels)
      return err_set(e, ERR_INVALID, "this model is class-conditional: class labels are required");
    for (int i = 0; i < c->n; i++)
      if (c->labels[i] < 0 || c->labels[i] >= u->shape.num_classes)
        return err_set(e, ERR_INVALID, "class label %lld out of range [0, %d)",
                       (long long)c->labels[i], u->shape.num_classes);
  }
  return ERR_OK;
}

void cunet_transpose(const float *src, int n, int rows, int cols, float *dst) {
  for (int i = 0; i < n; i++)
    for (int r = 0; r < rows; r++)
      for (int k = 0; k < cols; k++)
        dst[((size_t)i * cols + k) * rows + r] = src[((size_t)i * rows + r) * cols + k];
}

int cunet_forward(const cunet *u, const model_call *c, float *out, err *e) {
  int rc = cunet_check_call(u, c, e);
  if (rc)
    return rc;
  const int hooked = c->hooks.mid_save || c->hooks.mid_replace;
  if (hooked && !u->has_mid)
    return err_set(e, ERR_UNSUPPORTED, "this UNet has no mid block (h-space)");
  workspace ws;
  blocks_spares *spares = (blocks_spares *)&u->spares; /* only the cache changes, locked */
  if ((rc = blocks_workspace_take(spares, c->threads, &ws, e)))
    return rc;
  cfwd f = {.r = {.a = ws.a, .p = ws.p, .n = c->n}, .u = u, .seq = c->seq_len};
  f.hooks = hooked ? &c->hooks : NULL;
  float *ctx = arena_floats(ws.a, (size_t)c->n * c->seq_len * u->shape.cross_dim);
  if (!ctx)
    rc = err_set(e, ERR_NOMEM, "out of memory in UNet2DConditionModel forward");
  else {
    cunet_transpose(c->encoder_hidden_states, c->n, c->seq_len, u->shape.cross_dim, ctx);
    f.ctx = ctx;
    rc = forward(&f, c->x, c->h, c->w, c->t, c->labels, out, e);
  }
  blocks_workspace_give(spares, &ws);
  return rc;
}

/* A dry pass (shapes and FLOPs only) of one h x w image attending to seq tokens. */
static int dry_run(const cunet *u, int h, int w, int seq, cfwd *f, err *e) {
  const int mult = 1 << (u->nlevels - 1);
  if (h < 1 || w < 1 || h > 4096 || w > 4096 || h % mult || w % mult)
    return err_set(e, ERR_INVALID, "input size %dx%d must be a multiple of %d up to 4096", h, w,
                   mult);
  arena *a = arena_new((size_t)64 << 20);
  if (!a)
    return err_set(e, ERR_NOMEM, "out of memory");
  *f = (cfwd){.r = {.a = a, .n = 1, .dry = 1}, .u = u, .seq = seq};
  int rc = forward(f, NULL, h, w, NULL, NULL, NULL, e);
  arena_free(a);
  return rc;
}

double cunet_flops(const cunet *u, int h, int w, int seq) {
  err e;
  cfwd f;
  return dry_run(u, h, w, seq, &f, &e) ? 0 : f.r.flops;
}

int cunet_mid_shape(const cunet *u, int h, int w, int shape[3], err *e) {
  if (!u->has_mid)
    return err_set(e, ERR_UNSUPPORTED, "this UNet has no mid block (h-space)");
  cfwd f;
  int rc = dry_run(u, h, w, 1, &f, e);
  if (rc == ERR_OK)
    memcpy(shape, f.mid_shape, sizeof f.mid_shape);
  return rc;
}
