/* AutoencoderKL (see vae.h): config.json with diffusers' defaults, the encoder and decoder
 * built from the model room's blocks under diffusers' tensor names, the posterior, and tiled
 * decoding that reproduces diffusers' tiled_decode (blend order and weights included). */
#include "vae.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#include "mem.h"
#include "ops.h"
#include "rng.h"
#include "safetensors.h"
#include "vae_impl.h"

/* ---------- config ---------- */

typedef struct vae_config {
  int in_channels, out_channels, latent_channels, nlevels, layers, groups, sample_size;
  int channels[VAE_MAX_LEVELS];
  int use_quant, use_post_quant, mid_attention;
  double scaling, shift;
} vae_config;

static const char *const known_keys[] = {"in_channels",
                                         "out_channels",
                                         "down_block_types",
                                         "up_block_types",
                                         "block_out_channels",
                                         "layers_per_block",
                                         "act_fn",
                                         "latent_channels",
                                         "norm_num_groups",
                                         "sample_size",
                                         "scaling_factor",
                                         "shift_factor",
                                         "force_upcast",
                                         "use_quant_conv",
                                         "use_post_quant_conv",
                                         "mid_block_add_attention",
                                         "latents_mean",
                                         "latents_std"};

static int parse_channels(const json_t *cfg, vae_config *c, err *e) {
  const json_t *boc = json_object_get(cfg, "block_out_channels");
  if (!boc || json_is_null(boc)) {
    c->nlevels = 1;
    c->channels[0] = 64;
    return ERR_OK;
  }
  if (!json_is_array(boc) || json_array_size(boc) == 0 || json_array_size(boc) > VAE_MAX_LEVELS)
    return err_set(e, ERR_INVALID, "config key 'block_out_channels' must be a list of 1 to %d",
                   VAE_MAX_LEVELS);
  c->nlevels = (int)json_array_size(boc);
  for (int i = 0; i < c->nlevels; i++) {
    const json_t *v = json_array_get(boc, (size_t)i);
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 65536)
      return err_set(e, ERR_INVALID,
                     "config key 'block_out_channels'[%d] must be an integer in [1, 65536]", i);
    c->channels[i] = (int)json_integer_value(v);
  }
  return ERR_OK;
}

/* sample_size: an integer or [h, w] (newer configs); diffusers' tiling reads the first. */
static int parse_sample_size(const json_t *cfg, vae_config *c, err *e) {
  const json_t *ss = json_object_get(cfg, "sample_size");
  if (json_is_array(ss)) {
    const json_t *v = json_array_get(ss, 0);
    if (json_array_size(ss) != 2 || !json_is_integer(v) || json_integer_value(v) < 1 ||
        json_integer_value(v) > 65536)
      return err_set(e, ERR_INVALID, "config key 'sample_size' must be an integer or [h, w]");
    c->sample_size = (int)json_integer_value(v);
    return ERR_OK;
  }
  return blocks_get_int(cfg, "sample_size", 32, 1, 65536, &c->sample_size, e);
}

/* The pipeline would have to de-normalise latents per channel with these; refuse rather than
 * hand it latents on the wrong scale. */
static int refuse_latent_stats(const json_t *cfg, err *e) {
  static const char *const keys[] = {"latents_mean", "latents_std"};
  for (int i = 0; i < 2; i++) {
    const json_t *v = json_object_get(cfg, keys[i]);
    if (v && !json_is_null(v))
      return err_set(e, ERR_UNSUPPORTED,
                     "config key '%s': per-channel latent statistics are not supported", keys[i]);
  }
  return ERR_OK;
}

static int parse_config(const json_t *cfg, vae_config *c, err *e) {
  static const char *const down_allowed[] = {"DownEncoderBlock2D", NULL};
  static const char *const up_allowed[] = {"UpDecoderBlock2D", NULL};
  static const char *const silu[] = {"silu", "swish", NULL};
  const char *types[VAE_MAX_LEVELS], *tmp;
  int rc, ndown = 0, nup = 0, upcast;
  memset(c, 0, sizeof *c);
  if ((rc = blocks_check_keys(cfg, known_keys, (int)(sizeof known_keys / sizeof known_keys[0]),
                              "AutoencoderKL", e)) ||
      (rc = refuse_latent_stats(cfg, e)) ||
      (rc = blocks_get_int(cfg, "in_channels", 3, 1, 64, &c->in_channels, e)) ||
      (rc = blocks_get_int(cfg, "out_channels", 3, 1, 64, &c->out_channels, e)) ||
      (rc = blocks_get_int(cfg, "latent_channels", 4, 1, 256, &c->latent_channels, e)) ||
      (rc = blocks_get_list(cfg, "down_block_types", down_allowed, 1, down_allowed, VAE_MAX_LEVELS,
                            types, &ndown, e)) ||
      (rc = blocks_get_list(cfg, "up_block_types", up_allowed, 1, up_allowed, VAE_MAX_LEVELS, types,
                            &nup, e)) ||
      (rc = parse_channels(cfg, c, e)) ||
      (rc = blocks_get_int(cfg, "layers_per_block", 1, 1, VAE_MAX_LAYERS - 1, &c->layers, e)) ||
      (rc = blocks_get_choice(cfg, "act_fn", "silu", silu, &tmp, e)) ||
      (rc = blocks_get_int(cfg, "norm_num_groups", 32, 1, 65536, &c->groups, e)) ||
      (rc = parse_sample_size(cfg, c, e)) ||
      (rc = blocks_get_num(cfg, "scaling_factor", 0.18215, &c->scaling, e)) ||
      (rc = blocks_get_num(cfg, "shift_factor", 0, &c->shift, e)) ||
      (rc = blocks_get_bool(cfg, "force_upcast", 1, &upcast, e)) ||
      (rc = blocks_get_bool(cfg, "use_quant_conv", 1, &c->use_quant, e)) ||
      (rc = blocks_get_bool(cfg, "use_post_quant_conv", 1, &c->use_post_quant, e)) ||
      (rc = blocks_get_bool(cfg, "mid_block_add_attention", 1, &c->mid_attention, e)))
    return rc;
  if (ndown != c->nlevels || nup != c->nlevels)
    return err_set(e, ERR_INVALID,
                   "config: down_block_types (%d), up_block_types (%d) and block_out_channels "
                   "(%d) must have the same length",
                   ndown, nup, c->nlevels);
  if (c->scaling == 0)
    return err_set(e, ERR_INVALID, "config key 'scaling_factor' must not be 0");
  for (int i = 0; i < c->nlevels; i++)
    if (c->channels[i] % c->groups)
      return err_set(e, ERR_INVALID,
                     "config: block_out_channels[%d] = %d is not divisible into norm_num_groups "
                     "= %d groups",
                     i, c->channels[i], c->groups);
  return ERR_OK;
}

/* ---------- weights ---------- */

static int load_mid(blocks_loader *ld, const vae_config *c, const char *coder_name, coder *k) {
  const int top = c->channels[c->nlevels - 1];
  const resnet_spec rs = {.groups = c->groups, .eps = VAE_EPS, .out_scale = 1.0f};
  char name[128];
  int rc;
  snprintf(name, sizeof name, "%s.mid_block.resnets.0", coder_name);
  if ((rc = blocks_load_resnet(ld, name, &rs, top, top, &k->mid_res[0])))
    return rc;
  k->mid_has_attn = c->mid_attention;
  /* one head as wide as the block (attention_head_dim = channels in diffusers' Encoder) */
  snprintf(name, sizeof name, "%s.mid_block.attentions.0", coder_name);
  if (c->mid_attention &&
      (rc = blocks_load_attention(ld, name, top, top, c->groups, VAE_EPS, 1.0f, &k->mid_attn)))
    return rc;
  snprintf(name, sizeof name, "%s.mid_block.resnets.1", coder_name);
  return blocks_load_resnet(ld, name, &rs, top, top, &k->mid_res[1]);
}

static int load_encoder(blocks_loader *ld, const vae_config *c, coder *k) {
  const resnet_spec rs = {.groups = c->groups, .eps = VAE_EPS, .out_scale = 1.0f};
  char name[128];
  int rc, ch = c->channels[0];
  *k = (coder){.nlevels = c->nlevels, .encoder = 1};
  if ((rc = blocks_load_conv(ld, "encoder.conv_in", c->in_channels, ch, 3, 1, 1, 1, &k->conv_in)))
    return rc;
  for (int i = 0; i < c->nlevels; i++) {
    vae_block *b = &k->blocks[i];
    const int out = c->channels[i];
    b->nlayers = c->layers;
    for (int l = 0; l < b->nlayers; l++) {
      snprintf(name, sizeof name, "encoder.down_blocks.%d.resnets.%d", i, l);
      if ((rc = blocks_load_resnet(ld, name, &rs, l == 0 ? ch : out, out, &b->res[l])))
        return rc;
    }
    ch = out;
    b->has_sample = i < c->nlevels - 1;
    if (b->has_sample) {
      snprintf(name, sizeof name, "encoder.down_blocks.%d.downsamplers.0.conv", i);
      if ((rc = blocks_load_conv(ld, name, out, out, 3, 2, 0, 1, &b->sample)))
        return rc;
      /* diffusers pads (0,1,0,1) before its padding-0 downsampler; a stride-2 layer is packed
       * for the plain GEMM, which reads the padding at run time, so setting it now is safe */
      b->sample.pad_bottom = b->sample.pad_right = 1;
    }
  }
  if ((rc = load_mid(ld, c, "encoder", k)) ||
      (rc = blocks_load_group_norm(ld, "encoder.conv_norm_out", c->groups, ch, VAE_EPS,
                                   &k->norm_out)))
    return rc;
  return blocks_load_conv(ld, "encoder.conv_out", ch, 2 * c->latent_channels, 3, 1, 1, 1,
                          &k->conv_out);
}

static int load_decoder(blocks_loader *ld, const vae_config *c, coder *k) {
  const resnet_spec rs = {.groups = c->groups, .eps = VAE_EPS, .out_scale = 1.0f};
  char name[128];
  int rc, ch = c->channels[c->nlevels - 1];
  *k = (coder){.nlevels = c->nlevels};
  if ((rc = blocks_load_conv(ld, "decoder.conv_in", c->latent_channels, ch, 3, 1, 1, 1,
                             &k->conv_in)) ||
      (rc = load_mid(ld, c, "decoder", k)))
    return rc;
  for (int i = 0; i < c->nlevels; i++) {
    vae_block *b = &k->blocks[i];
    const int out = c->channels[c->nlevels - 1 - i];
    b->nlayers = c->layers + 1;
    for (int l = 0; l < b->nlayers; l++) {
      snprintf(name, sizeof name, "decoder.up_blocks.%d.resnets.%d", i, l);
      if ((rc = blocks_load_resnet(ld, name, &rs, l == 0 ? ch : out, out, &b->res[l])))
        return rc;
    }
    ch = out;
    b->has_sample = i < c->nlevels - 1;
    snprintf(name, sizeof name, "decoder.up_blocks.%d.upsamplers.0.conv", i);
    if (b->has_sample && (rc = blocks_load_conv(ld, name, out, out, 3, 1, 1, 1, &b->sample)))
      return rc;
  }
  if ((rc = blocks_load_group_norm(ld, "decoder.conv_norm_out", c->groups, ch, VAE_EPS,
                                   &k->norm_out)))
    return rc;
  return blocks_load_conv(ld, "decoder.conv_out", ch, c->out_channels, 3, 1, 1, 1, &k->conv_out);
}

static int load_weights(blocks_loader *ld, const vae_config *c, vae *v) {
  const int lat = c->latent_channels;
  int rc;
  v->has_quant = c->use_quant;
  v->has_post_quant = c->use_post_quant;
  if ((rc = load_encoder(ld, c, &v->enc)) ||
      (v->has_quant &&
       (rc = blocks_load_conv(ld, "quant_conv", 2 * lat, 2 * lat, 1, 1, 0, 1, &v->quant))) ||
      (v->has_post_quant &&
       (rc = blocks_load_conv(ld, "post_quant_conv", lat, lat, 1, 1, 0, 1, &v->post_quant))))
    return rc;
  return load_decoder(ld, c, &v->dec);
}

static void set_info(vae *v, const vae_config *c) {
  const int factor = 1 << (c->nlevels - 1);
  int tile = c->sample_size / factor / 4 * 4;
  v->info = (vae_info){.in_channels = c->in_channels,
                       .out_channels = c->out_channels,
                       .latent_channels = c->latent_channels,
                       .factor = factor,
                       .sample_size = c->sample_size,
                       .tile = tile < 4 ? 4 : tile,
                       .scaling_factor = c->scaling,
                       .shift_factor = c->shift,
                       .num_params = v->ps.count};
}

static int build(const json_t *cfg, const st_file *st, uint64_t seed, vae **out, err *e) {
  vae_config c;
  int rc = parse_config(cfg, &c, e);
  if (rc)
    return rc;
  vae *v = mem_calloc(1, sizeof *v);
  if (!v)
    return err_set(e, ERR_NOMEM, "out of memory");
  blocks_spares_init(&v->spares);
  blocks_loader ld;
  rc = blocks_loader_begin(&ld, &v->ps, st, seed, e);
  if (!rc)
    rc = blocks_loader_end(&ld, load_weights(&ld, &c, v));
  if (rc) {
    vae_free(v);
    return rc;
  }
  set_info(v, &c);
  *out = v;
  return ERR_OK;
}

int vae_load(const char *dir, vae **out, err *e) {
  char net_dir[BLOCKS_PATH_MAX], path[BLOCKS_PATH_MAX + 16];
  int pipeline = 0;
  *out = NULL;
  ops_init();
  int rc = blocks_net_dir(dir, "vae", net_dir, &pipeline, e);
  if (rc)
    return rc;
  snprintf(path, sizeof path, "%s/config.json", net_dir);
  json_t *cfg = blocks_read_json(path, e);
  if (!cfg)
    return e ? e->code : ERR_FORMAT;
  const json_t *cls = json_object_get(cfg, "_class_name");
  if (cls && (!json_is_string(cls) || strcmp(json_string_value(cls), "AutoencoderKL") != 0)) {
    rc =
        err_set(e, ERR_UNSUPPORTED, "%s: _class_name %s%s%s is not an AutoencoderKL", path,
                json_is_string(cls) ? "\"" : "", json_is_string(cls) ? json_string_value(cls) : "?",
                json_is_string(cls) ? "\"" : "");
    json_decref(cfg);
    return rc;
  }
  st_file *st = NULL;
  rc = blocks_open_weights(net_dir, "diffusion_pytorch_model.safetensors", &st, path, e);
  if (!rc) {
    rc = build(cfg, st, 0, out, e);
    if (rc)
      err_prefix(e, "%s", path);
  }
  st_close(st);
  json_decref(cfg);
  return rc;
}

int vae_load_from(const json_t *config, const st_file *weights, vae **out, err *e) {
  *out = NULL;
  ops_init();
  return build(config, weights, 0, out, e);
}

int vae_init(const json_t *config, uint64_t seed, vae **out, err *e) {
  *out = NULL;
  ops_init();
  return build(config, NULL, seed, out, e);
}

int vae_param_count(const vae *v) {
  return v->ps.nparams;
}

const model_param *vae_param_at(const vae *v, int i) {
  return i >= 0 && i < v->ps.nparams ? &v->ps.params[i] : NULL;
}

int vae_repack(vae *v, err *e) {
  return blocks_params_repack(&v->ps, e);
}

void vae_free(vae *v) {
  if (!v)
    return;
  blocks_params_free(&v->ps);
  blocks_spares_free(&v->spares);
  free(v);
}

const vae_info *vae_get_info(const vae *v) {
  return &v->info;
}

/* ---------- forward ---------- */

static int mid_forward(blocks_run *f, const coder *k, float **cur, int ch, int h, int w) {
  float *a = blocks_act(f, ch, h, w), *b = blocks_act(f, ch, h, w);
  if (!a || !b || blocks_resnet_forward(f, &k->mid_res[0], *cur, h, w, a) ||
      (k->mid_has_attn && blocks_attn_forward(f, &k->mid_attn, a, h * w)) ||
      blocks_resnet_forward(f, &k->mid_res[1], a, h, w, b))
    return -1;
  *cur = b;
  return 0;
}

/* One resnet chain of a block and its resampler; *cur, *ch, *h, *w follow the activation. */
static int block_forward(blocks_run *f, const coder *k, const vae_block *b, float **cur, int *ch,
                         int *h, int *w) {
  for (int l = 0; l < b->nlayers; l++) {
    float *nx = blocks_act(f, b->res[l].cout, *h, *w);
    if (!nx || blocks_resnet_forward(f, &b->res[l], *cur, *h, *w, nx))
      return -1;
    *cur = nx;
    *ch = b->res[l].cout;
  }
  if (!b->has_sample)
    return 0;
  int oh = 2 * *h, ow = 2 * *w;
  const float *src = *cur;
  if (k->encoder) {
    ops_conv2d_out_size(&b->sample, *h, *w, &oh, &ow);
  } else {
    float *up = blocks_act(f, *ch, oh, ow);
    if (!up)
      return -1;
    if (!f->dry)
      ops_upsample_nearest2x(*cur, f->n, *ch, *h, *w, up);
    src = up;
  }
  float *nx = blocks_act(f, *ch, oh, ow);
  if (!nx || blocks_conv(f, &b->sample, src, k->encoder ? *h : oh, k->encoder ? *w : ow, nx))
    return -1;
  *cur = nx;
  *h = oh;
  *w = ow;
  return 0;
}

/* The encoder or the decoder on x (cin x h x w) into out; *oh, *ow receive out's size. */
static int coder_forward(blocks_run *f, const coder *k, const float *x, int h, int w, float *out,
                         int *oh, int *ow) {
  int ch = k->conv_in.cout;
  float *cur = blocks_act(f, ch, h, w);
  if (!cur || blocks_conv(f, &k->conv_in, x, h, w, cur))
    return -1;
  if (!k->encoder && mid_forward(f, k, &cur, ch, h, w))
    return -1;
  for (int i = 0; i < k->nlevels; i++)
    if (block_forward(f, k, &k->blocks[i], &cur, &ch, &h, &w))
      return -1;
  if (k->encoder && mid_forward(f, k, &cur, ch, h, w))
    return -1;
  float *normed = blocks_act(f, ch, h, w);
  if (!normed)
    return -1;
  blocks_norm(f, &k->norm_out, cur, h * w, 1, normed);
  *oh = h;
  *ow = w;
  return blocks_conv(f, &k->conv_out, normed, h, w, out);
}

/* Encoder and quant_conv: moments [n][2 * latent][h/f][w/f]. */
static int encode_moments(blocks_run *f, const vae *v, const float *x, int h, int w,
                          float *moments) {
  const int c2 = 2 * v->info.latent_channels;
  int oh, ow;
  float *e = v->has_quant ? blocks_act(f, c2, h / v->info.factor, w / v->info.factor) : moments;
  if (!e || coder_forward(f, &v->enc, x, h, w, e, &oh, &ow))
    return -1;
  return v->has_quant ? blocks_conv(f, &v->quant, e, oh, ow, moments) : 0;
}

/* post_quant_conv and decoder: out [n][out_channels][f*h][f*w]. */
static int decode_whole(blocks_run *f, const vae *v, const float *z, int h, int w, float *out) {
  int oh, ow;
  const float *zin = z;
  if (v->has_post_quant) {
    float *zq = blocks_act(f, v->info.latent_channels, h, w);
    if (!zq || blocks_conv(f, &v->post_quant, z, h, w, zq))
      return -1;
    zin = zq;
  }
  return coder_forward(f, &v->dec, zin, h, w, out, &oh, &ow);
}

int vae_check_size(int n, int h, int w, int multiple, const char *what, err *e) {
  if (n < 1 || h < 1 || w < 1 || h > 65536 || w > 65536)
    return err_set(e, ERR_INVALID, "bad %s shape: batch %d, %dx%d", what, n, h, w);
  if (h % multiple || w % multiple)
    return err_set(e, ERR_INVALID,
                   "%s size %dx%d is not a multiple of %d, this VAE's downsampling factor", what, h,
                   w, multiple);
  return ERR_OK;
}

/* Forward declaration: the tiles live below with the decoder's. */
static int encode_image(blocks_run *f, const vae *v, const float *x, int h, int w, int tile,
                        float *mom, err *e);

int vae_encode_tiled(const vae *v, const float *x, int n, int h, int w, int tile, float *mean,
                     float *std, int threads, err *e) {
  const int lat = v->info.latent_channels, f = v->info.factor;
  int used = 0, rc = vae_check_size(n, h, w, f, "image", e);
  if (rc || (rc = vae_encode_tiling(v, h, w, tile, &used, e)))
    return rc;
  const size_t in_per = (size_t)v->info.in_channels * h * w, hw = (size_t)(h / f) * (w / f);
  if (!ops_all_finite(x, in_per * n))
    return err_set(e, ERR_INVALID, "the images to encode hold NaN or infinite values");
  workspace ws;
  if ((rc = blocks_workspace_take(&((vae *)v)->spares, threads, &ws, e)))
    return rc;
  /* one image at a time: the working memory is one image's (or tile's) whatever the batch */
  for (int i = 0; i < n && !rc; i++) {
    blocks_run run = {.a = ws.a, .p = ws.p, .n = 1};
    arena_mark m = arena_get_mark(ws.a);
    float *mom = arena_floats(ws.a, 2 * lat * hw);
    if (!mom)
      rc = err_set(e, ERR_NOMEM, "out of memory encoding a %dx%d image", h, w);
    else
      rc = encode_image(&run, v, x + in_per * i, h, w, used, mom, e);
    const size_t lo = (size_t)i * lat * hw;
    if (!rc && mean)
      memcpy(mean + lo, mom, sizeof(float) * lat * hw);
    for (size_t k = 0; !rc && std && k < lat * hw; k++) {
      const float lv = mom[lat * hw + k];
      std[lo + k] = expf(0.5f * (lv < -30.0f ? -30.0f : lv > 20.0f ? 20.0f : lv));
    }
    arena_release(ws.a, m);
  }
  blocks_workspace_give(&((vae *)v)->spares, &ws);
  return rc;
}

int vae_encode(const vae *v, const float *x, int n, int h, int w, float *mean, float *std,
               int threads, err *e) {
  return vae_encode_tiled(v, x, n, h, w, VAE_TILE_AUTO, mean, std, threads, e);
}

void vae_sample(const float *mean, const float *std, int n, size_t per_image, uint64_t seed,
                float *out) {
  float buf[1024];
  for (int i = 0; i < n; i++)
    for (size_t k0 = 0; k0 < per_image; k0 += 1024) {
      const size_t cnt = per_image - k0 < 1024 ? per_image - k0 : 1024;
      rng_normal_at(seed, (uint64_t)i, VAE_SAMPLE_STREAM, k0, buf, cnt);
      const size_t at = (size_t)i * per_image + k0;
      for (size_t k = 0; k < cnt; k++)
        out[at + k] = mean[at + k] + std[at + k] * buf[k];
    }
}

/* ---------- tiles ---------- */

/* The working memory of a whole pass over one image of an h x w latent (encoder: its
 * factor*h x factor*w image): a dry pass's arena. 0 when even that cannot be reserved. */
static size_t whole_bytes(const vae *v, int encoder, int h, int w) {
  arena *a = arena_new((size_t)64 << 20);
  if (!a)
    return 0;
  blocks_run run = {.a = a, .n = 1, .dry = 1};
  const int f = v->info.factor;
  float *out = encoder ? blocks_act(&run, 2 * v->info.latent_channels, h, w)
                       : blocks_act(&run, v->info.out_channels, h * f, w * f);
  const int rc = !out      ? -1
                 : encoder ? encode_moments(&run, v, NULL, h * f, w * f, NULL)
                           : decode_whole(&run, v, NULL, h, w, NULL);
  const size_t bytes = rc == 0 ? arena_capacity(a) : 0;
  arena_free(a);
  return bytes;
}

/* The tile (latent pixels, 0: whole) a pass over an h x w latent uses for `tile`. */
static int choose_tiling(const vae *v, int encoder, int h, int w, int tile, int *used, err *e) {
  if (tile != VAE_TILE_AUTO && tile != VAE_TILE_OFF && (tile < 4 || tile % 4 || tile > 4096))
    return err_set(e, ERR_INVALID, "tile size %d is not a positive multiple of 4 up to 4096", tile);
  if (tile == VAE_TILE_AUTO) {
    const size_t bytes = whole_bytes(v, encoder, h, w);
    tile = bytes && bytes <= VAE_AUTO_TILE_BYTES ? VAE_TILE_OFF : v->info.tile;
  }
  /* an image within one tile is run whole, as diffusers does */
  *used = tile == VAE_TILE_OFF || (h <= tile && w <= tile) ? 0 : tile;
  return ERR_OK;
}

int vae_decode_tiling(const vae *v, int h, int w, int tile, int *used, err *e) {
  int rc = vae_check_size(1, h, w, 1, "latent", e);
  return rc ? rc : choose_tiling(v, 0, h, w, tile, used, e);
}

int vae_encode_tiling(const vae *v, int h, int w, int tile, int *used, err *e) {
  const int f = v->info.factor;
  int rc = vae_check_size(1, h, w, f, "image", e);
  return rc ? rc : choose_tiling(v, 1, h / f, w / f, tile, used, e);
}

/* One tile being blended: its decoded pixels [cout][th][tw]. */
typedef struct tile_img {
  float *px;
  int th, tw;
} tile_img;

/* diffusers' blend_v: the first e rows of b fade in from the last e rows of a (the tile above,
 * already blended), e = min(a rows, b rows, extent). */
static void blend_v(const tile_img *a, tile_img *b, int c, int extent) {
  int e = extent < a->th ? extent : a->th;
  e = e < b->th ? e : b->th;
  for (int ch = 0; ch < c; ch++)
    for (int y = 0; y < e; y++) {
      const float wb = (float)((double)y / e), wa = (float)(1.0 - (double)y / e);
      const float *ar = a->px + ((size_t)ch * a->th + a->th - e + y) * a->tw;
      float *br = b->px + ((size_t)ch * b->th + y) * b->tw;
      for (int x = 0; x < b->tw; x++)
        br[x] = ar[x] * wa + br[x] * wb;
    }
}

/* diffusers' blend_h: the same across the first e columns, from the tile on the left. */
static void blend_h(const tile_img *a, tile_img *b, int c, int extent) {
  int e = extent < a->tw ? extent : a->tw;
  e = e < b->tw ? e : b->tw;
  for (int ch = 0; ch < c; ch++)
    for (int y = 0; y < b->th; y++) {
      const float *ar = a->px + ((size_t)ch * a->th + y) * a->tw + a->tw - e;
      float *br = b->px + ((size_t)ch * b->th + y) * b->tw;
      for (int x = 0; x < e; x++)
        br[x] = ar[x] * (float)(1.0 - (double)x / e) + br[x] * (float)((double)x / e);
    }
}

/* One direction in tiles, as diffusers' tiled_encode and tiled_decode cut them: input tiles of
 * in_tile pixels every `step`, each giving an output tile mul/div times its size; neighbours
 * blended over `extent` output pixels and each tile cut at `limit`. */
typedef struct tiling {
  int encoder;       /* image tiles to moments, else latent tiles to images */
  int cin, cout;     /* channels */
  int in_tile, step; /* input pixels */
  int mul, div;      /* output size = input size * mul / div */
  int extent, limit; /* output pixels */
} tiling;

/* The tiling of a tile of `tile` latent pixels: tile_latent_min_size = tile and
 * tile_sample_min_size = tile * factor, overlap factor 1/4. */
static tiling tiling_of(const vae *v, int encoder, int tile) {
  const int f = v->info.factor, lat = v->info.latent_channels;
  if (encoder)
    return (tiling){.encoder = 1,
                    .cin = v->info.in_channels,
                    .cout = 2 * lat,
                    .in_tile = tile * f,
                    .step = tile * f - tile * f / 4,
                    .mul = 1,
                    .div = f,
                    .extent = tile / 4,
                    .limit = tile - tile / 4};
  return (tiling){.cin = lat,
                  .cout = v->info.out_channels,
                  .in_tile = tile,
                  .step = tile - tile / 4,
                  .mul = f,
                  .div = 1,
                  .extent = tile * f / 4,
                  .limit = tile * f - tile * f / 4};
}

/* Runs the input tile at (i, j), at most in_tile square, of one image x (cin x h x w) into t. */
static int run_tile(blocks_run *f, const vae *v, const tiling *tl, const float *x, int h, int w,
                    int i, int j, tile_img *t) {
  const int lh = h - i < tl->in_tile ? h - i : tl->in_tile;
  const int lw = w - j < tl->in_tile ? w - j : tl->in_tile;
  arena_mark m = arena_get_mark(f->a);
  float *xt = arena_floats(f->a, (size_t)tl->cin * lh * lw);
  if (!xt)
    return -1;
  for (int c = 0; c < tl->cin; c++)
    for (int y = 0; y < lh; y++)
      memcpy(xt + ((size_t)c * lh + y) * lw, x + ((size_t)c * h + i + y) * w + j,
             sizeof(float) * (size_t)lw);
  t->th = lh * tl->mul / tl->div;
  t->tw = lw * tl->mul / tl->div;
  const int rc =
      tl->encoder ? encode_moments(f, v, xt, lh, lw, t->px) : decode_whole(f, v, xt, lh, lw, t->px);
  arena_release(f->a, m);
  return rc;
}

/* One image in tiles, a row of tiles at a time: the row above is kept for blending, so the
 * memory is two rows of output tiles besides the output. */
static int run_tiled(blocks_run *f, const vae *v, const tiling *tl, const float *x, int h, int w,
                     float *out, err *e) {
  const int c = tl->cout, ncols = (w + tl->step - 1) / tl->step;
  const int W = w * tl->mul / tl->div, H = h * tl->mul / tl->div;
  const int out_tile = tl->in_tile * tl->mul / tl->div;
  const size_t tile_px = (size_t)c * out_tile * out_tile;
  tile_img *rows = calloc((size_t)2 * ncols, sizeof *rows);
  float *store = rows ? mem_aligned(64, sizeof(float) * tile_px * 2 * (size_t)ncols) : NULL;
  int rc = rows && store ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for tiles");
  for (int r = 0, i = 0; !rc && i < h; i += tl->step, r++) {
    tile_img *cur = rows + (size_t)(r % 2) * ncols, *above = rows + (size_t)((r + 1) % 2) * ncols;
    for (int k = 0, j = 0; !rc && j < w; j += tl->step, k++) {
      cur[k].px = store + tile_px * ((size_t)(r % 2) * ncols + k);
      if (run_tile(f, v, tl, x, h, w, i, j, &cur[k]))
        rc = err_set(e, ERR_NOMEM, "out of memory for a tile of %d pixels", tl->in_tile);
    }
    for (int k = 0, j = 0; !rc && j < w; j += tl->step, k++) {
      if (r > 0)
        blend_v(&above[k], &cur[k], c, tl->extent);
      if (k > 0)
        blend_h(&cur[k - 1], &cur[k], c, tl->extent);
      const int y0 = i * tl->mul / tl->div, x0 = j * tl->mul / tl->div;
      const int rh = cur[k].th < tl->limit ? cur[k].th : tl->limit,
                cw = cur[k].tw < tl->limit ? cur[k].tw : tl->limit;
      for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < rh && y0 + y < H; y++)
          memcpy(out + ((size_t)ch * H + y0 + y) * W + x0,
                 cur[k].px + ((size_t)ch * cur[k].th + y) * cur[k].tw,
                 sizeof(float) * (size_t)(x0 + cw <= W ? cw : W - x0));
    }
  }
  free(store);
  free(rows);
  return rc;
}

static int encode_image(blocks_run *f, const vae *v, const float *x, int h, int w, int tile,
                        float *mom, err *e) {
  if (tile) {
    const tiling tl = tiling_of(v, 1, tile);
    return run_tiled(f, v, &tl, x, h, w, mom, e);
  }
  if (encode_moments(f, v, x, h, w, mom))
    return err_set(e, ERR_NOMEM, "out of memory encoding a %dx%d image (try tiles: --tile)", h, w);
  return ERR_OK;
}

int vae_decode(const vae *v, const float *z, int n, int h, int w, int tile, float *out, int threads,
               err *e) {
  int used = 0, rc = vae_check_size(n, h, w, 1, "latent", e);
  if (rc || (rc = vae_decode_tiling(v, h, w, tile, &used, e)))
    return rc;
  const size_t z_per = (size_t)v->info.latent_channels * h * w;
  const size_t out_per = (size_t)v->info.out_channels * h * w * v->info.factor * v->info.factor;
  if (!ops_all_finite(z, z_per * n))
    return err_set(e, ERR_INVALID, "the latents to decode hold NaN or infinite values");
  workspace ws;
  if ((rc = blocks_workspace_take(&((vae *)v)->spares, threads, &ws, e)))
    return rc;
  for (int i = 0; i < n && !rc; i++) {
    blocks_run run = {.a = ws.a, .p = ws.p, .n = 1};
    const tiling tl = tiling_of(v, 0, used);
    if (used)
      rc = run_tiled(&run, v, &tl, z + z_per * i, h, w, out + out_per * i, e);
    else if (decode_whole(&run, v, z + z_per * i, h, w, out + out_per * i))
      rc = err_set(e, ERR_NOMEM, "out of memory decoding a %dx%d latent (try tiles: --tile)", h, w);
    arena_reset(ws.a);
  }
  blocks_workspace_give(&((vae *)v)->spares, &ws);
  return rc;
}

/* ---------- FLOPs ---------- */

static double dry_flops(const vae *v, int h, int w, int decode) {
  arena *a = arena_new((size_t)64 << 20);
  if (!a)
    return 0;
  blocks_run run = {.a = a, .n = 1, .dry = 1};
  const int f = v->info.factor;
  int rc = decode ? decode_whole(&run, v, NULL, h, w, NULL)
                  : encode_moments(&run, v, NULL, h * f, w * f, NULL);
  arena_free(a);
  return rc ? 0 : run.flops;
}

double vae_decode_flops(const vae *v, int h, int w) {
  return dry_flops(v, h, w, 1);
}

double vae_encode_flops(const vae *v, int h, int w) {
  return dry_flops(v, h, w, 0);
}
