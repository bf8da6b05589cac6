/* Single-file Stable-Diffusion checkpoints (see sd_single.h): every tensor of the original
 * layout is renamed to diffusers' name by the rules of diffusers' convert_from_ckpt.py (and
 * its inverse, scripts/convert_diffusers_to_original_stable_diffusion.py), and each part's
 * config is inferred from shapes where the weights tell (widths, depths, attention placement,
 * projection kind, cross-attention width) and from the family where they do not (head layout,
 * norm groups, the VAE's scaling factor, the training schedule). */
#include "sd_single.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

#define UNET_PREFIX "model.diffusion_model."
#define VAE_PREFIX "first_stage_model."
#define CLIP_PREFIX "cond_stage_model.transformer."
#define OPENCLIP_PREFIX "cond_stage_model.model."
#define SD_MAX_LEVELS 8

typedef struct alias_list {
  st_alias *a;
  int n, cap;
} alias_list;

struct sd_single {
  st_file *file;
  int family;
  json_t *config[SD_NPARTS];
  st_file *weights[SD_NPARTS];
};

/* The facts about one UNet the renaming needs. */
typedef struct unet_layout {
  int levels, layers; /* layers: resnets per down block */
} unet_layout;

static void alias_list_free(alias_list *l) {
  for (int i = 0; i < l->n; i++) {
    free((char *)l->a[i].name);
    free((char *)l->a[i].from);
  }
  free(l->a);
  memset(l, 0, sizeof *l);
}

/* Adds `from` seen as `name` (rows [row0, row0 + rows), 0: all); names are copied. */
static int alias_add(alias_list *l, const char *name, const char *from, int64_t row0, int64_t rows,
                     err *e) {
  if (l->n == l->cap) {
    int cap = l->cap ? 2 * l->cap : 256;
    st_alias *grown = realloc(l->a, (size_t)cap * sizeof *grown);
    if (!grown)
      return err_set(e, ERR_NOMEM, "out of memory");
    l->a = grown;
    l->cap = cap;
  }
  st_alias *a = &l->a[l->n];
  *a = (st_alias){mem_strdup(name), mem_strdup(from), row0, rows};
  if (!a->name || !a->from) {
    free((char *)a->name);
    free((char *)a->from);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  l->n++;
  return ERR_OK;
}

static int starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The tensor that fmt and its indices name, or NULL. */
__attribute__((format(printf, 2, 3))) static const st_tensor_info *tensor(const sd_single *s,
                                                                          const char *fmt, ...) {
  char name[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(name, sizeof name, fmt, ap);
  va_end(ap);
  return st_find(s->file, name);
}

/* Replaces the first `from` in buf (of size n) by `to`; 0 when absent. */
static int replace(char *buf, size_t n, const char *from, const char *to) {
  char *p = strstr(buf, from);
  if (!p)
    return 0;
  char rest[512];
  snprintf(rest, sizeof rest, "%s", p + strlen(from));
  snprintf(p, n - (size_t)(p - buf), "%s%s", to, rest);
  return 1;
}

/* ---------- UNet ---------- */

/* A ResnetBlock's original module names to diffusers'. */
static void resnet_names(char *buf, size_t n) {
  static const char *const map[][2] = {
      {"in_layers.0.", "norm1."},          {"in_layers.2.", "conv1."},
      {"out_layers.0.", "norm2."},         {"out_layers.3.", "conv2."},
      {"emb_layers.1.", "time_emb_proj."}, {"skip_connection.", "conv_shortcut."}};
  for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
    if (replace(buf, n, map[i][0], map[i][1]))
      return;
}

/* diffusers' name of UNet tensor `rest` (after the prefix), or ERR_FORMAT. */
static int unet_name(const unet_layout *u, const char *rest, char *out, size_t n, err *e) {
  static const char *const fixed[][2] = {{"time_embed.0.", "time_embedding.linear_1."},
                                         {"time_embed.2.", "time_embedding.linear_2."},
                                         {"input_blocks.0.0.", "conv_in."},
                                         {"out.0.", "conv_norm_out."},
                                         {"out.2.", "conv_out."},
                                         {"middle_block.0.", "mid_block.resnets.0."},
                                         {"middle_block.1.", "mid_block.attentions.0."},
                                         {"middle_block.2.", "mid_block.resnets.1."}};
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
    if (starts_with(rest, fixed[i][0])) {
      snprintf(out, n, "%s%s", fixed[i][1], rest + strlen(fixed[i][0]));
      if (starts_with(out, "mid_block.resnets."))
        resnet_names(out, n);
      return ERR_OK;
    }
  int k, c, used = 0;
  const int per = u->layers + 1;
  if (sscanf(rest, "input_blocks.%d.%d.%n", &k, &c, &used) == 2 && used && k >= 1 &&
      k < u->levels * per) {
    const int i = (k - 1) / per, j = (k - 1) % per;
    const char *tail = rest + used;
    if (j == u->layers && c == 0 && starts_with(tail, "op."))
      snprintf(out, n, "down_blocks.%d.downsamplers.0.conv.%s", i, tail + 3);
    else if (j < u->layers && c == 0)
      snprintf(out, n, "down_blocks.%d.resnets.%d.%s", i, j, tail);
    else if (j < u->layers && c == 1)
      snprintf(out, n, "down_blocks.%d.attentions.%d.%s", i, j, tail);
    else
      return err_set(e, ERR_FORMAT, "unexpected UNet tensor '%s'", rest);
    if (c == 0 && j < u->layers)
      resnet_names(out, n);
    return ERR_OK;
  }
  if (sscanf(rest, "output_blocks.%d.%d.%n", &k, &c, &used) == 2 && used && k >= 0 &&
      k < u->levels * per) {
    const int i = k / per, j = k % per;
    const char *tail = rest + used;
    if (c == 0)
      snprintf(out, n, "up_blocks.%d.resnets.%d.%s", i, j, tail);
    else if ((c == 1 || c == 2) && starts_with(tail, "conv."))
      snprintf(out, n, "up_blocks.%d.upsamplers.0.%s", i, tail);
    else if (c == 1)
      snprintf(out, n, "up_blocks.%d.attentions.%d.%s", i, j, tail);
    else
      return err_set(e, ERR_FORMAT, "unexpected UNet tensor '%s'", rest);
    if (c == 0)
      resnet_names(out, n);
    return ERR_OK;
  }
  return err_set(e, ERR_FORMAT, "unexpected UNet tensor '%s' (not Stable Diffusion 1.x/2.x)", rest);
}

/* Levels and resnets per level, from the positions of the downsamplers. */
static int unet_layout_infer(const sd_single *s, unet_layout *u, err *e) {
  int maxk = 0, k, used;
  for (int i = 0; i < st_count(s->file); i++) {
    const char *name = st_info_at(s->file, i)->name;
    if (starts_with(name, UNET_PREFIX "input_blocks.") &&
        sscanf(name, UNET_PREFIX "input_blocks.%d.%n", &k, &used) == 1 && k > maxk)
      maxk = k;
  }
  u->layers = 0;
  for (k = 1; k <= maxk && !u->layers; k++)
    if (tensor(s, UNET_PREFIX "input_blocks.%d.0.op.weight", k))
      u->layers = k - 1;
  if (!u->layers)
    u->layers = maxk; /* one level: no downsampler */
  if (u->layers < 1 || (maxk + 1) % (u->layers + 1))
    return err_set(e, ERR_FORMAT,
                   "UNet input_blocks 1..%d do not form levels of resnets and downsamplers", maxk);
  u->levels = (maxk + 1) / (u->layers + 1);
  if (u->levels > SD_MAX_LEVELS)
    return err_set(e, ERR_UNSUPPORTED, "UNet has %d levels (at most %d)", u->levels, SD_MAX_LEVELS);
  return ERR_OK;
}

static json_t *int_list(const int *v, int n) {
  json_t *a = json_array();
  for (int i = 0; a && i < n; i++)
    json_array_append_new(a, json_integer(v[i]));
  return a;
}

static json_t *name_list(const char *const *v, int n) {
  json_t *a = json_array();
  for (int i = 0; a && i < n; i++)
    json_array_append_new(a, json_string(v[i]));
  return a;
}

static int unet_config(sd_single *s, const unet_layout *u, int sample, err *e) {
  const st_tensor_info *cin = tensor(s, UNET_PREFIX "input_blocks.0.0.weight");
  const st_tensor_info *cout = tensor(s, UNET_PREFIX "out.2.weight");
  const st_tensor_info *mid = tensor(s, UNET_PREFIX "middle_block.1.proj_in.weight");
  const st_tensor_info *k2 =
      tensor(s, UNET_PREFIX "middle_block.1.transformer_blocks.0.attn2.to_k.weight");
  if (!cin || cin->ndim != 4 || !cout || cout->ndim != 4 || !mid || !k2 || k2->ndim != 2)
    return err_set(e, ERR_FORMAT,
                   "the UNet lacks conv_in, conv_out or the cross-attention mid block of "
                   "Stable Diffusion 1.x/2.x");
  int channels[SD_MAX_LEVELS], heads[SD_MAX_LEVELS], depth = 0;
  const char *down[SD_MAX_LEVELS], *up[SD_MAX_LEVELS];
  const int per = u->layers + 1;
  for (int i = 0; i < u->levels; i++) {
    const st_tensor_info *w =
        tensor(s, UNET_PREFIX "input_blocks.%d.0.out_layers.3.weight", 1 + i * per);
    if (!w || w->ndim != 4)
      return err_set(e, ERR_FORMAT, "the UNet has no resnet at input_blocks.%d", 1 + i * per);
    channels[i] = (int)w->shape[0];
    heads[i] = channels[i] >= 64 ? channels[i] / 64 : 1; /* the real ones: 320 and up */
    down[i] = tensor(s, UNET_PREFIX "input_blocks.%d.1.proj_in.weight", 1 + i * per)
                  ? "CrossAttnDownBlock2D"
                  : "DownBlock2D";
    up[i] = tensor(s, UNET_PREFIX "output_blocks.%d.1.proj_in.weight", i * per)
                ? "CrossAttnUpBlock2D"
                : "UpBlock2D";
  }
  while (tensor(s, UNET_PREFIX "middle_block.1.transformer_blocks.%d.norm1.weight", depth))
    depth++;
  json_t *c = json_object();
  if (!c)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->config[SD_PART_UNET] = c;
  json_object_set_new(c, "_class_name", json_string("UNet2DConditionModel"));
  json_object_set_new(c, "sample_size", json_integer(sample));
  json_object_set_new(c, "in_channels", json_integer(cin->shape[1]));
  json_object_set_new(c, "out_channels", json_integer(cout->shape[0]));
  json_object_set_new(c, "down_block_types", name_list(down, u->levels));
  json_object_set_new(c, "up_block_types", name_list(up, u->levels));
  json_object_set_new(c, "mid_block_type", json_string("UNetMidBlock2DCrossAttn"));
  json_object_set_new(c, "block_out_channels", int_list(channels, u->levels));
  json_object_set_new(c, "layers_per_block", json_integer(u->layers));
  json_object_set_new(c, "cross_attention_dim", json_integer(k2->shape[1]));
  /* The heads are not in the weights: SD 1.x has 8 per block (diffusers keeps that count in
   * attention_head_dim, a historical misnomer), SD 2.x 64 channels per head. */
  json_object_set_new(c, "attention_head_dim",
                      s->family == 1 ? json_integer(8) : int_list(heads, u->levels));
  json_object_set_new(c, "use_linear_projection", json_boolean(mid->ndim == 2));
  json_object_set_new(c, "transformer_layers_per_block", json_integer(depth));
  json_object_set_new(c, "norm_num_groups", json_integer(32));
  json_object_set_new(c, "norm_eps", json_real(1e-5));
  json_object_set_new(c, "flip_sin_to_cos", json_true());
  json_object_set_new(c, "freq_shift", json_integer(0));
  json_object_set_new(c, "act_fn", json_string("silu"));
  json_object_set_new(c, "downsample_padding", json_integer(1));
  return ERR_OK;
}

static int unet_part(sd_single *s, int sample, alias_list *l, err *e) {
  if (tensor(s, UNET_PREFIX "label_emb.0.0.weight"))
    return err_set(e, ERR_UNSUPPORTED,
                   "this checkpoint's UNet has label embeddings (SD-XL or unCLIP): only Stable "
                   "Diffusion 1.x and 2.x are supported");
  unet_layout u = {0, 0};
  int rc = unet_layout_infer(s, &u, e);
  if (rc || (rc = unet_config(s, &u, sample, e)))
    return rc;
  char name[512];
  for (int i = 0; i < st_count(s->file); i++) {
    const char *from = st_info_at(s->file, i)->name;
    if (!starts_with(from, UNET_PREFIX))
      continue;
    if ((rc = unet_name(&u, from + strlen(UNET_PREFIX), name, sizeof name, e)) ||
        (rc = alias_add(l, name, from, 0, 0, e)))
      return rc;
  }
  return ERR_OK;
}

/* ---------- VAE ---------- */

static int vae_name(int levels, const char *rest, char *out, size_t n, err *e) {
  static const char *const attn[][2] = {{"norm.", "group_norm."},
                                        {"q.", "to_q."},
                                        {"k.", "to_k."},
                                        {"v.", "to_v."},
                                        {"proj_out.", "to_out.0."}};
  const char *side = starts_with(rest, "encoder.") ? "encoder." : "decoder.";
  int i, j, used = 0;
  snprintf(out, n, "%s", rest);
  if (!starts_with(rest, "encoder.") && !starts_with(rest, "decoder."))
    return ERR_OK; /* quant_conv, post_quant_conv */
  const char *r = rest + strlen(side);
  if (starts_with(r, "norm_out.")) {
    snprintf(out, n, "%sconv_norm_out.%s", side, r + strlen("norm_out."));
  } else if (sscanf(r, "down.%d.block.%d.%n", &i, &j, &used) == 2 && used) {
    snprintf(out, n, "%sdown_blocks.%d.resnets.%d.%s", side, i, j, r + used);
  } else if (sscanf(r, "down.%d.downsample.%n", &i, &used) == 1 && used) {
    snprintf(out, n, "%sdown_blocks.%d.downsamplers.0.%s", side, i, r + used);
  } else if (sscanf(r, "up.%d.block.%d.%n", &i, &j, &used) == 2 && used && i < levels) {
    snprintf(out, n, "%sup_blocks.%d.resnets.%d.%s", side, levels - 1 - i, j, r + used);
  } else if (sscanf(r, "up.%d.upsample.%n", &i, &used) == 1 && used && i < levels) {
    snprintf(out, n, "%sup_blocks.%d.upsamplers.0.%s", side, levels - 1 - i, r + used);
  } else if (sscanf(r, "mid.block_%d.%n", &i, &used) == 1 && used && (i == 1 || i == 2)) {
    snprintf(out, n, "%smid_block.resnets.%d.%s", side, i - 1, r + used);
  } else if (starts_with(r, "mid.attn_1.")) {
    const char *t = r + strlen("mid.attn_1.");
    size_t a = 0;
    while (a < sizeof attn / sizeof attn[0] && !starts_with(t, attn[a][0]))
      a++;
    if (a == sizeof attn / sizeof attn[0])
      return err_set(e, ERR_FORMAT, "unexpected VAE tensor '%s'", rest);
    snprintf(out, n, "%smid_block.attentions.0.%s%s", side, attn[a][1], t + strlen(attn[a][0]));
    return ERR_OK;
  } else if (!starts_with(r, "conv_in.") && !starts_with(r, "conv_out.")) {
    return err_set(e, ERR_FORMAT, "unexpected VAE tensor '%s'", rest);
  }
  replace(out, n, ".nin_shortcut.", ".conv_shortcut.");
  return ERR_OK;
}

static int vae_part(sd_single *s, int image_size, alias_list *l, err *e) {
  const st_tensor_info *cin = tensor(s, VAE_PREFIX "encoder.conv_in.weight");
  const st_tensor_info *cout = tensor(s, VAE_PREFIX "decoder.conv_out.weight");
  const st_tensor_info *pq = tensor(s, VAE_PREFIX "post_quant_conv.weight");
  if (!cin || cin->ndim != 4 || !cout || cout->ndim != 4 || !pq || pq->ndim != 4)
    return err_set(e, ERR_FORMAT, "the checkpoint has no VAE (first_stage_model.*) tensors");
  int levels = 0, layers = 0, channels[SD_MAX_LEVELS];
  const char *down[SD_MAX_LEVELS], *up[SD_MAX_LEVELS];
  while (levels < SD_MAX_LEVELS &&
         tensor(s, VAE_PREFIX "encoder.down.%d.block.0.conv2.weight", levels)) {
    channels[levels] =
        (int)tensor(s, VAE_PREFIX "encoder.down.%d.block.0.conv2.weight", levels)->shape[0];
    down[levels] = "DownEncoderBlock2D";
    up[levels] = "UpDecoderBlock2D";
    levels++;
  }
  while (tensor(s, VAE_PREFIX "encoder.down.0.block.%d.conv1.weight", layers))
    layers++;
  if (!levels || !layers)
    return err_set(e, ERR_FORMAT, "the VAE's encoder has no down blocks");
  json_t *c = json_object();
  if (!c)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->config[SD_PART_VAE] = c;
  json_object_set_new(c, "_class_name", json_string("AutoencoderKL"));
  json_object_set_new(c, "in_channels", json_integer(cin->shape[1]));
  json_object_set_new(c, "out_channels", json_integer(cout->shape[0]));
  json_object_set_new(c, "down_block_types", name_list(down, levels));
  json_object_set_new(c, "up_block_types", name_list(up, levels));
  json_object_set_new(c, "block_out_channels", int_list(channels, levels));
  json_object_set_new(c, "layers_per_block", json_integer(layers));
  json_object_set_new(c, "latent_channels", json_integer(pq->shape[0]));
  json_object_set_new(c, "norm_num_groups", json_integer(32));
  json_object_set_new(c, "act_fn", json_string("silu"));
  json_object_set_new(c, "sample_size", json_integer(image_size));
  json_object_set_new(c, "scaling_factor", json_real(0.18215));
  char name[512];
  int rc;
  for (int i = 0; i < st_count(s->file); i++) {
    const char *from = st_info_at(s->file, i)->name;
    if (!starts_with(from, VAE_PREFIX))
      continue;
    if ((rc = vae_name(levels, from + strlen(VAE_PREFIX), name, sizeof name, e)) ||
        (rc = alias_add(l, name, from, 0, 0, e)))
      return rc;
  }
  return ERR_OK;
}

/* ---------- text encoder ---------- */

/* SD 1.x: transformers' CLIPTextModel already, under a prefix (and, in old checkpoints,
 * without "text_model."). */
static int clip_names(sd_single *s, alias_list *l, err *e) {
  char name[512];
  int rc;
  for (int i = 0; i < st_count(s->file); i++) {
    const char *from = st_info_at(s->file, i)->name;
    if (!starts_with(from, CLIP_PREFIX))
      continue;
    const char *rest = from + strlen(CLIP_PREFIX);
    snprintf(name, sizeof name, "%s%s", starts_with(rest, "text_model.") ? "" : "text_model.",
             rest);
    if (strcmp(name, "text_model.embeddings.position_ids") == 0)
      continue; /* a buffer, not a weight */
    if ((rc = alias_add(l, name, from, 0, 0, e)))
      return rc;
  }
  return ERR_OK;
}

/* SD 2.x: OpenCLIP's names, q/k/v fused; the last layer is dropped as diffusers does, since
 * SD 2.x reads the penultimate layer (through the final layer norm). */
static int openclip_names(sd_single *s, int layers, int width, alias_list *l, err *e) {
  static const char *const map[][2] = {{"ln_1.", "layer_norm1."},
                                       {"ln_2.", "layer_norm2."},
                                       {"attn.out_proj.", "self_attn.out_proj."},
                                       {"mlp.c_fc.", "mlp.fc1."},
                                       {"mlp.c_proj.", "mlp.fc2."}};
  static const char *const qkv[] = {"q_proj", "k_proj", "v_proj"};
  char name[512];
  int rc, n, used;
  for (int i = 0; i < st_count(s->file); i++) {
    const char *from = st_info_at(s->file, i)->name;
    if (!starts_with(from, OPENCLIP_PREFIX))
      continue;
    const char *rest = from + strlen(OPENCLIP_PREFIX);
    name[0] = 0;
    if (strcmp(rest, "token_embedding.weight") == 0) {
      snprintf(name, sizeof name, "text_model.embeddings.token_embedding.weight");
    } else if (strcmp(rest, "positional_embedding") == 0) {
      snprintf(name, sizeof name, "text_model.embeddings.position_embedding.weight");
    } else if (starts_with(rest, "ln_final.")) {
      snprintf(name, sizeof name, "text_model.final_layer_norm.%s", rest + strlen("ln_final."));
    } else if (sscanf(rest, "transformer.resblocks.%d.%n", &n, &used) == 1 && used) {
      if (n >= layers)
        continue;
      const char *t = rest + used;
      int bias = strcmp(t, "attn.in_proj_bias") == 0;
      if (bias || strcmp(t, "attn.in_proj_weight") == 0) {
        for (int k = 0; k < 3; k++) {
          snprintf(name, sizeof name, "text_model.encoder.layers.%d.self_attn.%s.%s", n, qkv[k],
                   bias ? "bias" : "weight");
          if ((rc = alias_add(l, name, from, (int64_t)k * width, width, e)))
            return rc;
        }
        continue;
      }
      for (size_t m = 0; m < sizeof map / sizeof map[0] && !name[0]; m++)
        if (starts_with(t, map[m][0]))
          snprintf(name, sizeof name, "text_model.encoder.layers.%d.%s%s", n, map[m][1],
                   t + strlen(map[m][0]));
      if (!name[0])
        return err_set(e, ERR_FORMAT, "unexpected text encoder tensor '%s'", from);
    } else {
      continue; /* text_projection, logit_scale, attn_mask, any visual tower: unused */
    }
    if ((rc = alias_add(l, name, from, 0, 0, e)))
      return rc;
  }
  return ERR_OK;
}

static int text_part(sd_single *s, alias_list *l, err *e) {
  const char *tok = s->family == 1 ? "%stext_model.embeddings.token_embedding.weight"
                                   : "%stoken_embedding.weight";
  char name[256];
  snprintf(name, sizeof name, tok, s->family == 1 ? CLIP_PREFIX : OPENCLIP_PREFIX);
  const st_tensor_info *emb = st_find(s->file, name);
  if (!emb && s->family == 1)
    emb = st_find(s->file, CLIP_PREFIX "embeddings.token_embedding.weight");
  int layers = 0;
  const char *fc1 = s->family == 1 ? CLIP_PREFIX "text_model.encoder.layers.%d.mlp.fc1.weight"
                                   : OPENCLIP_PREFIX "transformer.resblocks.%d.mlp.c_fc.weight";
  while (tensor(s, fc1, layers))
    layers++;
  if (!layers && s->family == 1) {
    fc1 = CLIP_PREFIX "encoder.layers.%d.mlp.fc1.weight";
    while (tensor(s, fc1, layers))
      layers++;
  }
  const st_tensor_info *ff = layers ? tensor(s, fc1, 0) : NULL;
  snprintf(name, sizeof name, "%s",
           s->family == 1 ? CLIP_PREFIX "text_model.embeddings.position_embedding.weight"
                          : OPENCLIP_PREFIX "positional_embedding");
  const st_tensor_info *pos = st_find(s->file, name);
  if (!pos && s->family == 1)
    pos = st_find(s->file, CLIP_PREFIX "embeddings.position_embedding.weight");
  if (!emb || emb->ndim != 2 || !ff || ff->ndim != 2 || !pos || pos->ndim != 2 ||
      (s->family == 2 && layers < 2))
    return err_set(e, ERR_FORMAT, "the text encoder's embeddings or layers are missing");
  const int width = (int)emb->shape[1];
  if (s->family == 2)
    layers--; /* the penultimate layer is the output */
  json_t *c = json_object();
  if (!c)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->config[SD_PART_TEXT_ENCODER] = c;
  json_object_set_new(c, "architectures", json_pack("[s]", "CLIPTextModel"));
  json_object_set_new(c, "model_type", json_string("clip_text_model"));
  json_object_set_new(c, "vocab_size", json_integer(emb->shape[0]));
  json_object_set_new(c, "hidden_size", json_integer(width));
  json_object_set_new(c, "intermediate_size", json_integer(ff->shape[0]));
  json_object_set_new(c, "num_hidden_layers", json_integer(layers));
  json_object_set_new(c, "num_attention_heads", json_integer(width / 64 ? width / 64 : 1));
  json_object_set_new(c, "max_position_embeddings", json_integer(pos->shape[0]));
  json_object_set_new(c, "hidden_act", json_string(s->family == 1 ? "quick_gelu" : "gelu"));
  json_object_set_new(c, "layer_norm_eps", json_real(1e-5));
  json_object_set_new(c, "projection_dim", json_integer(s->family == 1 ? 768 : 512));
  return s->family == 1 ? clip_names(s, l, e) : openclip_names(s, layers, width, l, e);
}

/* ---------- scheduler, tokenizer, family ---------- */

/* The A1111-style YAML beside the checkpoint (NAME.yaml for NAME.safetensors) into yaml. */
static void yaml_path(const char *path, char *yaml, size_t n) {
  const char *dot = strrchr(path, '.'), *slash = strrchr(path, '/');
  int stem = (int)(dot && (!slash || dot > slash) ? dot - path : (long)strlen(path));
  snprintf(yaml, n, "%.*s.yaml", stem, path);
}

/* *found: the YAML exists; *v_pred: its "parameterization:" is "v" (else "eps" or absent). */
static void read_parameterization(const char *yaml, int *found, int *v_pred) {
  *found = *v_pred = 0;
  FILE *f = fopen(yaml, "r");
  if (!f)
    return;
  *found = 1;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    const char *p = strstr(line, "parameterization:");
    if (!p)
      continue;
    p += strlen("parameterization:");
    while (*p == ' ' || *p == '"' || *p == '\'')
      p++;
    *v_pred = *p == 'v';
  }
  fclose(f);
}

static int schedule_parts(sd_single *s, const char *path, int *sample, err *e) {
  char yaml[4096];
  int found, v_pred;
  yaml_path(path, yaml, sizeof yaml);
  read_parameterization(yaml, &found, &v_pred);
  if (s->family == 2 && !found)
    return err_set(e, ERR_UNSUPPORTED,
                   "a Stable Diffusion 2.x checkpoint: its prediction type is not in the "
                   "weights; put its inference YAML beside it as %s (v2-inference-v.yaml for "
                   "768-v models, v2-inference.yaml for 512-base), as AUTOMATIC1111 expects",
                   yaml);
  *sample = v_pred && s->family == 2 ? 96 : 64;
  json_t *c = json_pack("{s:s, s:i, s:f, s:f, s:s, s:b, s:b, s:i, s:b, s:s, s:s}", "_class_name",
                        "PNDMScheduler", "num_train_timesteps", 1000, "beta_start", 0.00085,
                        "beta_end", 0.012, "beta_schedule", "scaled_linear", "set_alpha_to_one", 0,
                        "skip_prk_steps", 1, "steps_offset", 1, "clip_sample", 0, "prediction_type",
                        v_pred ? "v_prediction" : "epsilon", "timestep_spacing", "leading");
  json_t *t = json_pack("{s:s, s:s, s:s, s:i, s:b}", "bos_token", "<|startoftext|>", "eos_token",
                        "<|endoftext|>", "pad_token", s->family == 1 ? "<|endoftext|>" : "!",
                        "model_max_length", 77, "do_lower_case", 1);
  s->config[SD_PART_SCHEDULER] = c;
  s->config[SD_PART_TOKENIZER] = t;
  if (!c || !t)
    return err_set(e, ERR_NOMEM, "out of memory");
  return ERR_OK;
}

static int detect_family(sd_single *s, err *e) {
  if (!st_find(s->file, UNET_PREFIX "input_blocks.0.0.weight"))
    return err_set(e, ERR_FORMAT,
                   "not a Stable Diffusion checkpoint in the original layout (no "
                   "model.diffusion_model.* tensors); diffusers folders are loaded as folders");
  if (st_find(s->file, "conditioner.embedders.0.transformer.text_model.embeddings."
                       "token_embedding.weight") ||
      st_find(s->file, "conditioner.embedders.1.model.token_embedding.weight"))
    return err_set(e, ERR_UNSUPPORTED,
                   "an SD-XL checkpoint: only Stable Diffusion 1.x and 2.x "
                   "are supported");
  if (st_find(s->file, CLIP_PREFIX "text_model.embeddings.token_embedding.weight") ||
      st_find(s->file, CLIP_PREFIX "embeddings.token_embedding.weight"))
    s->family = 1;
  else if (st_find(s->file, OPENCLIP_PREFIX "token_embedding.weight"))
    s->family = 2;
  else
    return err_set(e, ERR_FORMAT, "the checkpoint has no text encoder (cond_stage_model.*)");
  return ERR_OK;
}

/* ---------- public ---------- */

static int build(sd_single *s, const char *path, err *e) {
  alias_list lists[3] = {{0}};
  const sd_part parts[3] = {SD_PART_UNET, SD_PART_VAE, SD_PART_TEXT_ENCODER};
  int sample = 64;
  int rc = detect_family(s, e);
  if (!rc)
    rc = schedule_parts(s, path, &sample, e);
  if (!rc)
    rc = unet_part(s, sample, &lists[0], e);
  if (!rc)
    rc = vae_part(s, sample * 8, &lists[1], e);
  if (!rc)
    rc = text_part(s, &lists[2], e);
  for (int i = 0; i < 3; i++) {
    if (!rc)
      rc = st_view(s->file, lists[i].a, lists[i].n, &s->weights[parts[i]], e);
    alias_list_free(&lists[i]);
  }
  return rc;
}

int sd_single_open(const char *path, sd_single **out, err *e) {
  *out = NULL;
  sd_single *s = mem_calloc(1, sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = st_open(path, &s->file, e);
  if (!rc && (rc = build(s, path, e)))
    err_prefix(e, "%s", path);
  if (rc) {
    sd_single_free(s);
    return rc;
  }
  *out = s;
  return ERR_OK;
}

void sd_single_free(sd_single *s) {
  if (!s)
    return;
  for (int i = 0; i < SD_NPARTS; i++) {
    json_decref(s->config[i]);
    st_close(s->weights[i]);
  }
  st_close(s->file);
  free(s);
}

int sd_single_family(const sd_single *s) {
  return s->family;
}

const json_t *sd_single_config(const sd_single *s, sd_part part) {
  return part >= 0 && part < SD_NPARTS ? s->config[part] : NULL;
}

const st_file *sd_single_weights(const sd_single *s, sd_part part) {
  return part >= 0 && part < SD_NPARTS ? s->weights[part] : NULL;
}
