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

#include "blocks.h"
#include "unet_impl.h"

/* ---------- config ---------- */

typedef struct unet_config {
  int sample_size, in_channels, out_channels, center_input, flip_sin_to_cos;
  int cond_channels; /* the trailing input channels that carry the conditioning image */
  /* multiscale structure guidance: the scales (down levels) guided, ascending, and the guide
   * networks' width */
  int nguide, guide_scales[UNET_MAX_LEVELS], guide_channels;
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

/* Our keys for multiscale structure guidance (Ren et al. 2023; see unet_impl.h):
 * "_guide_scales": [s, ...] (the down levels guided, each by a network on the conditioning
 * image's grayscale average-pooled by 2^s) and "_guide_channels" (their width, default 16). */
static int parse_guide(const json_t *cfg, unet_config *c, err *e) {
  const json_t *gs = json_object_get(cfg, "_guide_scales");
  int rc;
  if (!gs || json_is_null(gs))
    return json_object_get(cfg, "_guide_channels")
               ? err_set(e, ERR_INVALID, "config key '_guide_channels' without '_guide_scales'")
               : ERR_OK;
  if (!json_is_array(gs) || json_array_size(gs) < 1 || (int)json_array_size(gs) > c->nlevels)
    return err_set(e, ERR_INVALID,
                   "config key '_guide_scales' must be a list of 1 to %d down levels (this "
                   "UNet has %d)",
                   c->nlevels, c->nlevels);
  c->nguide = (int)json_array_size(gs);
  for (int i = 0; i < c->nguide; i++) {
    const json_t *v = json_array_get(gs, (size_t)i);
    const json_int_t s = json_is_integer(v) ? json_integer_value(v) : -1;
    if (s < 0 || s >= c->nlevels || (i && s <= c->guide_scales[i - 1]))
      return err_set(e, ERR_INVALID,
                     "config key '_guide_scales'[%d]: scales are increasing down levels in [0, "
                     "%d) (a scale s guides down_blocks.s at 1/2^s of the input size)",
                     i, c->nlevels);
    c->guide_scales[i] = (int)s;
  }
  if ((rc = blocks_get_int(cfg, "_guide_channels", 16, 1, 1024, &c->guide_channels, e)))
    return rc;
  const int cx = c->in_channels - c->cond_channels;
  if (!c->cond_channels || (c->cond_channels != 1 && c->cond_channels != 3) ||
      cx != c->cond_channels)
    return err_set(e, ERR_INVALID,
                   "config key '_guide_scales': structure guidance reads the grayscale of the "
                   "conditioning image and regresses the sharp image's: it needs '_cond_channels' "
                   "1 or 3, the same as the image denoised (here %d and %d)",
                   c->cond_channels, cx);
  if (c->guide_channels % c->norm_groups)
    return err_set(e, ERR_INVALID,
                   "config key '_guide_channels' (%d) must be divisible by norm_num_groups (%d): "
                   "the guide networks' resnets use the UNet's group norm",
                   c->guide_channels, c->norm_groups);
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
  if ((rc = blocks_check_keys(cfg, known_keys, (int)(sizeof known_keys / sizeof known_keys[0]),
                              "UNet2DModel", e)))
    return rc;
  const json_t *ss = json_object_get(cfg, "sample_size");
  if (json_is_array(ss)) {
    if (json_array_size(ss) != 2 || !json_is_integer(json_array_get(ss, 0)) ||
        json_integer_value(json_array_get(ss, 0)) != json_integer_value(json_array_get(ss, 1)))
      return err_set(e, ERR_UNSUPPORTED, "config key 'sample_size': only square sizes");
    c->sample_size = (int)json_integer_value(json_array_get(ss, 0));
    if (c->sample_size < 1 || c->sample_size > 4096)
      return err_set(e, ERR_INVALID, "config key 'sample_size' out of range");
  } else if ((rc = blocks_get_int(cfg, "sample_size", 0, 1, 4096, &c->sample_size, e))) {
    return rc;
  }
  if ((rc = blocks_get_int(cfg, "in_channels", 3, 1, 64, &c->in_channels, e)) ||
      (rc = blocks_get_int(cfg, "out_channels", 3, 1, 64, &c->out_channels, e)) ||
      (rc = blocks_get_bool(cfg, "center_input_sample", 0, &c->center_input, e)) ||
      (rc = blocks_get_choice(cfg, "time_embedding_type", "positional", positional, &tmp, e)) ||
      (rc = blocks_get_num(cfg, "freq_shift", 0, &c->freq_shift, e)) ||
      (rc = blocks_get_bool(cfg, "flip_sin_to_cos", 1, &c->flip_sin_to_cos, e)) ||
      (rc = blocks_get_list(cfg, "down_block_types", down_def, 4, down_allowed, UNET_MAX_LEVELS,
                            c->down_types, &ndown, e)) ||
      (rc = blocks_get_list(cfg, "up_block_types", up_def, 4, up_allowed, UNET_MAX_LEVELS,
                            c->up_types, &nup, e)) ||
      (rc = blocks_get_int(cfg, "layers_per_block", 2, 1, UNET_MAX_LAYERS - 1, &c->layers_per_block,
                           e)) ||
      (rc = blocks_get_num(cfg, "mid_block_scale_factor", 1, &c->mid_scale, e)) ||
      (rc = blocks_get_int(cfg, "downsample_padding", 1, 0, 1, &c->downsample_padding, e)) ||
      (rc = blocks_get_choice(cfg, "downsample_type", "conv", resample_allowed, &c->downsample_type,
                              e)) ||
      (rc = blocks_get_choice(cfg, "upsample_type", "conv", resample_allowed, &c->upsample_type,
                              e)) ||
      (rc = blocks_get_choice(cfg, "act_fn", "silu", silu, &tmp, e)) ||
      (rc = blocks_get_int(cfg, "norm_num_groups", 32, 1, 1 << 16, &c->norm_groups, e)) ||
      (rc = blocks_get_int(cfg, "attn_norm_num_groups", 0, 1, 1 << 16, &c->attn_norm_groups, e)) ||
      (rc = blocks_get_num(cfg, "norm_eps", 1e-5, &c->norm_eps, e)) ||
      (rc = blocks_get_choice(cfg, "resnet_time_scale_shift", "default", shifts, &tmp, e)))
    return rc;
  c->scale_shift = strcmp(tmp, "scale_shift") == 0;
  if ((rc = blocks_get_bool(cfg, "add_attention", 1, &c->add_attention, e)) ||
      (rc = blocks_get_int(cfg, "num_class_embeds", 0, 1, 1 << 20, &c->num_classes, e)))
    return rc;
  const json_t *mid = json_object_get(cfg, "mid_block_type");
  c->has_mid = 1;
  if (json_object_get(cfg, "mid_block_type") && json_is_null(mid))
    c->has_mid = 0;
  else if ((rc = blocks_get_choice(cfg, "mid_block_type", "UNetMidBlock2D", mids, &tmp, e)))
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
  else if ((rc = blocks_get_int(cfg, "attention_head_dim", 8, 1, 1 << 16, &c->attention_head_dim,
                                e)))
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
  /* Our key, not diffusers': an image-conditioned UNet is a UNet2DModel whose conv_in reads x
   * and the conditioning image concatenated, so diffusers loads the same file as is. */
  if ((rc = blocks_get_int(cfg, "_cond_channels", 0, 0, 64, &c->cond_channels, e)))
    return rc;
  if (c->cond_channels >= c->in_channels)
    return err_set(e, ERR_INVALID,
                   "config key '_cond_channels' (%d) must be below in_channels (%d): the first "
                   "in_channels - _cond_channels input channels are the image denoised",
                   c->cond_channels, c->in_channels);
  return parse_guide(cfg, c, e);
}

/* ---------- weights ---------- */
/* A resnet of this UNet: its norms and time-embedding mode come from the config. */
static int load_resnet(blocks_loader *ld, const unet_config *c, const char *prefix, int cin,
                       int cout, int temb_dim, float out_scale, int up, int down, resnet *r) {
  const resnet_spec spec = {.groups = c->norm_groups,
                            .eps = c->norm_eps,
                            .temb_dim = temb_dim,
                            .scale_shift = c->scale_shift,
                            .up = up,
                            .down = down,
                            .out_scale = out_scale};
  return blocks_load_resnet(ld, prefix, &spec, cin, cout, r);
}

/* The guide networks, after the UNet's own tensors: guide.{s}.conv_in (1 -> F), guide.{s}.resnet
 * (a ResnetBlock2D F -> F without time embedding), guide.{s}.conv_out (F -> 1). */
static int load_guides(blocks_loader *ld, unet *u, const unet_config *c) {
  char name[256];
  const int F = c->guide_channels;
  const resnet_spec spec = {.groups = c->norm_groups, .eps = c->norm_eps, .out_scale = 1.0f};
  u->nguide = c->nguide;
  u->guide_channels = F;
  for (int g = 0; g < c->nguide; g++) {
    guide_net *gn = &u->guide[g];
    int rc;
    gn->scale = c->guide_scales[g];
    snprintf(name, sizeof name, "guide.%d.conv_in", gn->scale);
    if ((rc = blocks_load_conv(ld, name, 1, F, 3, 1, 1, 1, &gn->conv_in)))
      return rc;
    snprintf(name, sizeof name, "guide.%d.resnet", gn->scale);
    if ((rc = blocks_load_resnet(ld, name, &spec, F, F, &gn->res)))
      return rc;
    snprintf(name, sizeof name, "guide.%d.conv_out", gn->scale);
    if ((rc = blocks_load_conv(ld, name, F, 1, 3, 1, 1, 1, &gn->conv_out)))
      return rc;
  }
  return ERR_OK;
}

static int load_weights(blocks_loader *ld, unet *u, const unet_config *c) {
  char name[256];
  int rc, temb = u->temb_dim;
  if ((rc = blocks_load_conv(ld, "conv_in", c->in_channels, c->channels[0], 3, 1, 1, 1,
                             &u->conv_in)))
    return rc;
  u->temb1 = (linear){.in = c->channels[0], .out = temb};
  u->temb2 = (linear){.in = temb, .out = temb};
  if ((rc = blocks_load_linear(ld, "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
                               c->channels[0], temb, &u->temb1.weight, &u->temb1.bias)) ||
      (rc = blocks_load_linear(ld, "time_embedding.linear_2.weight", "time_embedding.linear_2.bias",
                               temb, temb, &u->temb2.weight, &u->temb2.bias)))
    return rc;
  if (c->num_classes) {
    int64_t shape[2] = {c->num_classes, temb};
    if (!(u->class_table = blocks_load_tensor(ld, "class_embedding.weight", 2, shape)))
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
    for (int g = 0; g < c->nguide; g++)
      if (c->guide_scales[g] == i)
        b->guide = g + 1;
    for (int l = 0; l < b->nlayers; l++) {
      snprintf(name, sizeof name, "down_blocks.%d.resnets.%d", i, l);
      if ((rc = load_resnet(ld, c, name, l == 0 ? ch : out, out, temb, 1.0f, 0, 0, &b->res[l])))
        return rc;
      if (b->guide) {
        snprintf(name, sizeof name, "down_blocks.%d.resnets.%d.guide_proj", i, l);
        if ((rc =
                 blocks_load_conv(ld, name, c->guide_channels, out, 1, 1, 0, 0, &b->guide_proj[l])))
          return rc;
      }
      if (b->has_attn) {
        snprintf(name, sizeof name, "down_blocks.%d.attentions.%d", i, l);
        if ((rc = blocks_load_attention(ld, name, out, head, c->norm_groups, c->norm_eps, 1.0f,
                                        &b->attn[l])))
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
        if ((rc = blocks_load_conv(ld, cname, out, out, 3, 2, c->downsample_padding, 1,
                                   &b->sample_conv)))
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
      if ((rc = blocks_load_attention(ld, "mid_block.attentions.0", top, head, groups, c->norm_eps,
                                      s, &u->mid_attn)))
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
        if ((rc = blocks_load_attention(ld, name, out, head, c->norm_groups, c->norm_eps, 1.0f,
                                        &b->attn[l])))
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
        if ((rc = blocks_load_conv(ld, cname, out, out, 3, 1, 1, 1, &b->sample_conv)))
          return rc;
      }
    }
  }
  if ((rc = blocks_load_group_norm(ld, "conv_norm_out", c->norm_groups, c->channels[0], c->norm_eps,
                                   &u->norm_out)) ||
      (rc = blocks_load_conv(ld, "conv_out", c->channels[0], c->out_channels, 3, 1, 1, 1,
                             &u->conv_out)))
    return rc;
  return load_guides(ld, u, c);
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
  blocks_spares_init(&u->spares);
  u->nlevels = c.nlevels;
  u->ch0 = c.channels[0];
  u->temb_dim = 4 * c.channels[0];
  u->center_input = c.center_input;
  u->flip_sin_to_cos = c.flip_sin_to_cos;
  u->freq_shift = (float)c.freq_shift;
  u->shape = (unet_shape){.sample_size = c.sample_size,
                          .in_channels = c.in_channels,
                          .cond_channels = c.cond_channels,
                          .guide_scales = c.nguide,
                          .out_channels = c.out_channels,
                          .num_classes = c.num_classes};
  blocks_loader ld;
  rc = blocks_loader_begin(&ld, &u->ps, weights, seed, e);
  if (!rc)
    rc = blocks_loader_end(&ld, load_weights(&ld, u, &c));
  u->shape.num_params = u->ps.count;
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
  blocks_params_free(&u->ps);
  blocks_spares_free(&u->spares);
  free(u);
}

int unet_repack(unet *u, err *e) {
  return blocks_params_repack(&u->ps, e);
}

int unet_to_bf16(unet *u, err *e) {
  return blocks_params_to_bf16(&u->ps, e);
}

const unet_shape *unet_get_shape(const unet *u) {
  return &u->shape;
}

/* ---------- forward ---------- */

typedef struct fwd {
  blocks_run r;
  const unet *u;
  const unet_mid *mid; /* h-space access, or NULL */
  int mid_shape[3];    /* [C, H, W] of the mid-block output, set by the pass */
} fwd;

void unet_guide_input(const float *img, int c, int n, int h, int w, int scale, float *out) {
  const int k = 1 << scale, oh = h / k, ow = w / k;
  const size_t plane = (size_t)h * w;
  const float inv = 1.0f / (float)(k * k);
  for (int i = 0; i < n; i++) {
    const float *p = img + (size_t)i * c * plane;
    for (int y = 0; y < oh; y++)
      for (int x = 0; x < ow; x++) {
        float sum = 0;
        for (int dy = 0; dy < k; dy++)
          for (int dx = 0; dx < k; dx++) {
            const size_t o = (size_t)(y * k + dy) * w + (size_t)(x * k + dx);
            sum +=
                c == 3 ? 0.299f * p[o] + 0.587f * p[plane + o] + 0.114f * p[2 * plane + o] : p[o];
          }
        out[((size_t)i * oh + y) * ow + x] = sum * inv;
      }
  }
}

/* The guide networks' features ([n][F][h >> s][w >> s] per guide) of the conditioning image. */
static int guide_features(blocks_run *r, const unet *u, const float *cond, int h, int w,
                          float **feat) {
  for (int g = 0; g < u->nguide; g++) {
    const guide_net *gn = &u->guide[g];
    const int gh = h >> gn->scale, gw = w >> gn->scale;
    float *in = blocks_act(r, 1, gh, gw), *c1 = blocks_act(r, u->guide_channels, gh, gw);
    feat[g] = blocks_act(r, u->guide_channels, gh, gw);
    if (!in || !c1 || !feat[g])
      return -1;
    if (!r->dry)
      unet_guide_input(cond, u->shape.cond_channels, r->n, h, w, gn->scale, in);
    if (blocks_conv(r, &gn->conv_in, in, gh, gw, c1) ||
        blocks_resnet_forward(r, &gn->res, c1, gh, gw, feat[g]))
      return -1;
  }
  return 0;
}

/* Runs the network; in dry mode only shapes and FLOPs are computed. */
static int forward(fwd *f, const float *x, const float *cond, int h, int w, const float *t,
                   const int64_t *labels, float *out, err *e) {
  const unet *u = f->u;
  int n = f->r.n;
  float *xin = blocks_act(&f->r, u->shape.in_channels, h, w);
  if (!xin || blocks_time_embedding(&f->r, t, u->ch0, u->flip_sin_to_cos, u->freq_shift, &u->temb1,
                                    &u->temb2, u->class_table, labels))
    return err_set(e, ERR_NOMEM, "out of memory in UNet forward");
  if (!f->r.dry)
    unet_input(u, x, cond, n, (size_t)h * w, xin);

  typedef struct skip {
    float *p;
    int c, h, w;
  } skip;
  skip skips[UNET_MAX_LEVELS * UNET_MAX_LAYERS + 1];
  int nskips = 0, ch = u->ch0;
  float *gfeat[UNET_MAX_LEVELS] = {0};
  if (guide_features(&f->r, u, cond, h, w, gfeat))
    goto oom;
  float *cur = blocks_act(&f->r, ch, h, w);
  if (!cur || blocks_conv(&f->r, &u->conv_in, xin, h, w, cur))
    goto oom;
  skips[nskips++] = (skip){cur, ch, h, w};
  for (int i = 0; i < u->nlevels; i++) {
    const block *b = &u->down[i];
    for (int l = 0; l < b->nlayers; l++) {
      const resnet *r = &b->res[l];
      float *nx = blocks_act(&f->r, r->cout, h, w), *proj = NULL;
      if (!nx)
        goto oom;
      if (b->guide && (!(proj = blocks_act(&f->r, r->cout, h, w)) ||
                       blocks_conv(&f->r, &b->guide_proj[l], gfeat[b->guide - 1], h, w, proj)))
        goto oom;
      if (blocks_resnet_forward_add(&f->r, r, cur, h, w, proj, nx))
        goto oom;
      if (b->has_attn && blocks_attn_forward(&f->r, &b->attn[l], nx, h * w))
        goto oom;
      cur = nx;
      ch = r->cout;
      skips[nskips++] = (skip){cur, ch, h, w};
    }
    if (b->sample != SAMPLE_NONE) {
      int oh = b->sample == SAMPLE_CONV ? 0 : h / 2, ow = w / 2;
      if (b->sample == SAMPLE_CONV)
        ops_conv2d_out_size(&b->sample_conv, h, w, &oh, &ow);
      float *nx = blocks_act(&f->r, ch, oh, ow);
      if (!nx)
        goto oom;
      if (b->sample == SAMPLE_CONV ? blocks_conv(&f->r, &b->sample_conv, cur, h, w, nx)
                                   : blocks_resnet_forward(&f->r, &b->sample_res, cur, h, w, nx))
        goto oom;
      cur = nx;
      h = oh;
      w = ow;
      skips[nskips++] = (skip){cur, ch, h, w};
    }
  }
  if (u->has_mid) {
    float *nx = blocks_act(&f->r, ch, h, w);
    if (!nx || blocks_resnet_forward(&f->r, &u->mid_res[0], cur, h, w, nx))
      goto oom;
    if (u->mid_has_attn && blocks_attn_forward(&f->r, &u->mid_attn, nx, h * w))
      goto oom;
    float *ny = blocks_act(&f->r, ch, h, w);
    if (!ny || blocks_resnet_forward(&f->r, &u->mid_res[1], nx, h, w, ny))
      goto oom;
    f->mid_shape[0] = ch;
    f->mid_shape[1] = h;
    f->mid_shape[2] = w;
    if (f->mid && !f->r.dry) {
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
      float *cat = blocks_act(&f->r, ch + s.c, h, w), *nx = blocks_act(&f->r, r->cout, h, w);
      if (!cat || !nx)
        goto oom;
      blocks_concat(&f->r, cur, ch, s.p, s.c, h * w, cat);
      if (blocks_resnet_forward(&f->r, r, cat, h, w, nx))
        goto oom;
      if (b->has_attn && blocks_attn_forward(&f->r, &b->attn[l], nx, h * w))
        goto oom;
      cur = nx;
      ch = r->cout;
    }
    if (b->sample != SAMPLE_NONE) {
      float *nx = blocks_act(&f->r, ch, 2 * h, 2 * w);
      if (!nx)
        goto oom;
      if (b->sample == SAMPLE_CONV) {
        float *upx = blocks_act(&f->r, ch, 2 * h, 2 * w);
        if (!upx)
          goto oom;
        if (!f->r.dry)
          ops_upsample_nearest2x(cur, n, ch, h, w, upx);
        if (blocks_conv(&f->r, &b->sample_conv, upx, 2 * h, 2 * w, nx))
          goto oom;
      } else if (blocks_resnet_forward(&f->r, &b->sample_res, cur, h, w, nx)) {
        goto oom;
      }
      cur = nx;
      h *= 2;
      w *= 2;
    }
  }
  float *normed = blocks_act(&f->r, ch, h, w);
  if (!normed)
    goto oom;
  blocks_norm(&f->r, &u->norm_out, cur, h * w, 1, normed);
  if (blocks_conv(&f->r, &u->conv_out, normed, h, w, out))
    goto oom;
  return ERR_OK;
oom:
  return err_set(e, ERR_NOMEM, "out of memory in UNet forward (batch %d, %dx%d)", n, h, w);
}

void unet_input(const unet *u, const float *x, const float *cond, int n, size_t plane, float *xin) {
  const int cc = u->shape.cond_channels, cx = u->shape.in_channels - cc;
  const size_t dx = (size_t)cx * plane, dc = (size_t)cc * plane, d = dx + dc;
  for (int k = 0; k < n; k++) {
    memcpy(xin + k * d, x + k * dx, dx * sizeof *xin);
    if (cc)
      memcpy(xin + k * d + dx, cond + k * dc, dc * sizeof *xin);
  }
  if (u->center_input)
    for (size_t i = 0; i < (size_t)n * d; i++)
      xin[i] = 2.0f * xin[i] - 1.0f;
}

int unet_check_input(const unet *u, int n, int h, int w, const float *t, const int64_t *labels,
                     const float *cond, err *e) {
  int mult = 1 << (u->nlevels - 1);
  if (u->shape.cond_channels && !cond)
    return err_set(e, ERR_INVALID,
                   "this model is image-conditioned: a conditioning image of %d channels is "
                   "required",
                   u->shape.cond_channels);
  if (!u->shape.cond_channels && cond)
    return err_set(e, ERR_INVALID, "this model takes no conditioning image");
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
  return unet_forward_mid(u, x, NULL, n, h, w, t, labels, out, threads, NULL, e);
}

int unet_workspace_take(const unet *u, int threads, workspace *ws, err *e) {
  return blocks_workspace_take(&((unet *)u)->spares, threads, ws, e); /* cache only, locked */
}

void unet_workspace_give(const unet *u, workspace *ws) {
  blocks_workspace_give(&((unet *)u)->spares, ws);
}

int unet_forward_mid(const unet *u, const float *x, const float *cond, int n, int h, int w,
                     const float *t, const int64_t *labels, float *out, int threads,
                     const unet_mid *mid, err *e) {
  int rc = unet_check_input(u, n, h, w, t, labels, cond, e);
  if (rc)
    return rc;
  if (mid && !u->has_mid)
    return err_set(e, ERR_UNSUPPORTED, "this UNet has no mid block (h-space)");
  workspace ws;
  if ((rc = unet_workspace_take(u, threads, &ws, e)))
    return rc;
  fwd f = {.r = {.a = ws.a, .n = n, .p = ws.p}, .u = u, .mid = mid};
  rc = forward(&f, x, cond, h, w, t, labels, out, e);
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
  *f = (fwd){.r = {.a = a, .n = 1, .dry = 1}, .u = u};
  int rc = forward(f, NULL, NULL, h, w, NULL, NULL, NULL, e);
  arena_free(a);
  return rc;
}

double unet_flops(const unet *u, int h, int w) {
  err e;
  fwd f;
  return dry_run(u, h, w, &f, &e) ? 0 : f.r.flops;
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
