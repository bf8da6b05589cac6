/* The text-to-image side of `denoised train` (a UNet2DConditionModel): the frozen VAE, the
 * tokenizer and the text encoder it trains with, taken from their flags or the --init pipeline
 * folder and checked against the UNet before the first step, and the data's latents (the VAE
 * encoder's posterior mean, shifted and scaled as diffusers' train_text_to_image.py takes them).
 * diffusers encodes every batch at every step; the mean is a function of the image alone, so
 * encoding every image once before the first step (cli_train_latents_cache) gives the steps the
 * same values without the encoder's cost per step. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "clip.h"

#define TEXT_PATH_MAX 4400

/* The text encoder: --text-encoder DIR, a fresh one of --text-encoder-config F (drawn from
 * --seed), or --init's text_encoder/; its config.json into r->text_config. */
static int load_text_encoder(cli_train_run *r, clip_text_model **text, err *e) {
  const cli_train_opts *o = r->o;
  char dir[TEXT_PATH_MAX], path[TEXT_PATH_MAX + 16];
  if (o->text_encoder_config) {
    json_error_t je;
    r->text_config = json_load_file(o->text_encoder_config, JSON_REJECT_DUPLICATES, &je);
    if (!r->text_config)
      return err_set(e, ERR_FORMAT, "--text-encoder-config %s:%d: %s", o->text_encoder_config,
                     je.line, je.text);
    int rc = clip_text_init(r->text_config, (uint64_t)o->seed, text, e);
    return rc ? err_prefix(e, "--text-encoder-config %s", o->text_encoder_config) : ERR_OK;
  }
  if (!o->text_encoder && !o->init)
    return err_set(e, ERR_INVALID,
                   "a fresh UNet2DConditionModel needs its text encoder: "
                   "--text-encoder DIR or --text-encoder-config F");
  if (o->text_encoder)
    snprintf(dir, sizeof dir, "%s", o->text_encoder);
  else
    snprintf(dir, sizeof dir, "%s/text_encoder", o->init);
  snprintf(path, sizeof path, "%s/config.json", dir);
  json_error_t je;
  if (!(r->text_config = json_load_file(path, JSON_REJECT_DUPLICATES, &je)))
    return err_set(e, ERR_FORMAT, "%s:%d: %s", path, je.line, je.text);
  return clip_text_new(dir, text, e);
}

/* The folder a part comes from into buf: its flag's, else --init's (sub below it, or itself). */
static int part_dir(const cli_train_opts *o, const char *flag, const char *value, const char *sub,
                    char *buf, size_t n, err *e) {
  if (!value && !o->init)
    return err_set(e, ERR_INVALID, "a fresh UNet2DConditionModel needs %s DIR", flag);
  if (value)
    snprintf(buf, n, "%s", value);
  else
    snprintf(buf, n, "%s%s%s", o->init, sub ? "/" : "", sub ? sub : "");
  return ERR_OK;
}

int cli_train_text_setup(cli_train_run *r, train_config *tc, cli_train_want *want, err *e) {
  const cli_train_opts *o = r->o;
  const model_info *mi = model_get_info(r->m);
  if (!o->captions)
    return err_set(e, ERR_INVALID,
                   "the model is text-conditional (a UNet2DConditionModel): give --captions F, "
                   "one caption per image");
  clip_text_model *text = NULL;
  int rc;
  if ((rc = part_dir(o, "--vae", o->vae, NULL, r->vae_dir, sizeof r->vae_dir, e)) ||
      (rc = part_dir(o, "--tokenizer", o->tokenizer, "tokenizer", r->tokenizer_dir,
                     sizeof r->tokenizer_dir, e)) ||
      (rc = load_text_encoder(r, &text, e)))
    return rc;
  if (!rc)
    rc = latent_parts_assemble(r->vae_dir, r->tokenizer_dir, text, &r->lp, e);
  if (rc)
    return rc;
  const latent_info *li = latent_get_info(r->lp);
  if (li->latent_channels != mi->in_channels || mi->out_channels != mi->in_channels)
    return err_set(e, ERR_INVALID,
                   "the VAE %s makes latents of %d channels; the UNet takes %d and predicts %d",
                   r->vae_dir, li->latent_channels, mi->in_channels, mi->out_channels);
  if (!(r->empty_ids = malloc((size_t)li->seq_len * sizeof *r->empty_ids)))
    return err_set(e, ERR_NOMEM, "out of memory");
  if ((rc = clip_tokenize(latent_tokenizer(r->lp), "", 0, r->empty_ids, NULL, NULL, e)))
    return rc;
  r->text = (train_text){.encoder = latent_text_encoder(r->lp),
                         .frozen = o->freeze_text_encoder,
                         .len = li->seq_len,
                         .empty_ids = r->empty_ids,
                         .dropout = o->caption_dropout,
                         .clip_skip = (int)o->clip_skip};
  tc->text = &r->text;
  *want = (cli_train_want){li->image_channels, mi->sample_size * li->factor, li->factor};
  return ERR_OK;
}

int cli_train_latents(const cli_train_run *r, const float *images, int n, float *z, err *e) {
  const int f = latent_get_info(r->lp)->factor;
  return latent_encode(r->lp, images, n, r->d.h / f, r->d.w / f, NULL, z, (int)r->o->threads, e);
}

/* Images per encoder call when caching: the encoder's scratch stays small for any data size. */
#define CACHE_CHUNK 256

int cli_train_latents_cache(cli_train_run *r, err *e) {
  cli_train_data *d = &r->d;
  const latent_info *li = latent_get_info(r->lp);
  const int f = li->factor, zc = li->latent_channels;
  const size_t per = (size_t)d->c * d->h * d->w, zper = (size_t)zc * (d->h / f) * (d->w / f);
  float *z = malloc((size_t)d->n * zper * sizeof *z);
  if (!z)
    return err_set(e, ERR_NOMEM, "out of memory for the latents of %lld images", (long long)d->n);
  for (int64_t i = 0; i < d->n; i += CACHE_CHUNK) {
    const int k = (int)(d->n - i < CACHE_CHUNK ? d->n - i : CACHE_CHUNK);
    int rc = cli_train_latents(r, d->x + (size_t)i * per, k, z + (size_t)i * zper, e);
    if (rc) {
      free(z);
      return err_prefix(e, "encoding --data images %lld-%lld", (long long)i,
                        (long long)(i + k - 1));
    }
  }
  free(d->x);
  d->x = z;
  d->c = zc, d->h /= f, d->w /= f;
  d->latent = 1;
  return ERR_OK;
}
