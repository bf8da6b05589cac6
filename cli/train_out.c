/* What `denoised train` writes: checkpoints (weights, EMA and AdamW moments in one safetensors
 * file named by its step, and state.json pointing at it, so a crash between the two leaves the
 * previous checkpoint whole), the loss log, and at the end the diffusers model folder with its
 * model card and a loss-curve PNG. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "clip.h"
#include "image.h"
#include "safetensors.h"

#define CKPT_FORMAT "denoised-train-checkpoint"
#define PATH_LEN 4400

/* JSON to a file through a temporary name and rename(). */
static int write_json(const char *path, const json_t *j, err *e) {
  char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  size_t n = strlen(s);
  s[n] = '\n'; /* the terminator becomes the final newline */
  int rc = image_file_write(path, (const uint8_t *)s, n + 1, e);
  free(s);
  return rc;
}

/* The weights, the EMA and the moments as "param/NAME", "ema/NAME", "adam_m/NAME",
 * "adam_v/NAME". */
static int write_state(cli_train_run *r, const char *path, err *e) {
  const int np = trainer_tensor_count(r->t), kinds = 4;
  st_out_tensor *t = calloc((size_t)np * kinds + 1, sizeof *t);
  char **names = calloc((size_t)np * kinds + 1, sizeof *names);
  int count = 0, rc = t && names ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  static const char *const prefix[] = {"param", "ema", "adam_m", "adam_v"};
  for (int k = 0; rc == ERR_OK && k < kinds; k++)
    for (int i = 0; rc == ERR_OK && i < np; i++) {
      const train_tensor *mp = trainer_tensor(r->t, i);
      const float *data = k == 0   ? mp->data
                          : k == 1 ? trainer_ema_at(r->t, i)
                                   : trainer_moment_at(r->t, k - 2, i);
      if (!data)
        continue; /* no EMA */
      size_t len = strlen(prefix[k]) + strlen(mp->name) + 2;
      if (!(names[count] = malloc(len))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        break;
      }
      snprintf(names[count], len, "%s/%s", prefix[k], mp->name);
      t[count] = (st_out_tensor){names[count], mp->ndim, mp->shape, data};
      count++;
    }
  if (rc == ERR_OK)
    rc = st_write_f32(path, t, count, NULL, 0, e);
  for (int i = 0; names && i < count; i++)
    free(names[i]);
  free(names);
  free(t);
  return rc;
}

int cli_train_checkpoint_save(cli_train_run *r, err *e) {
  char dir[PATH_LEN], path[PATH_LEN + 64], file[64], old[PATH_LEN + 64] = "";
  snprintf(dir, sizeof dir, "%s/checkpoint", r->o->out);
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "%s: %s", dir, strerror(errno));
  snprintf(path, sizeof path, "%s/state.json", dir);
  json_t *prev = json_load_file(path, 0, NULL);
  const char *pf = json_string_value(json_object_get(prev, "weights"));
  if (pf)
    snprintf(old, sizeof old, "%s/%s", dir, pf);
  json_decref(prev);
  const long step = trainer_steps(r->t);
  snprintf(file, sizeof file, "state-%09ld.safetensors", step);
  snprintf(path, sizeof path, "%s/%s", dir, file);
  int rc = write_state(r, path, e);
  json_t *st = rc ? NULL
                  : json_pack("{s:s, s:i, s:I, s:f, s:s, s:O}", "format", CKPT_FORMAT, "version", 1,
                              "step", (json_int_t)step, "wall_seconds", r->wall, "weights", file,
                              "recipe", r->recipe);
  if (!rc && !st)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  snprintf(path, sizeof path, "%s/state.json", dir);
  if (!rc)
    rc = write_json(path, st, e);
  json_decref(st);
  snprintf(path, sizeof path, "%s/%s", dir, file);
  if (!rc && old[0] && strcmp(old, path) != 0)
    unlink(old); /* the new checkpoint is whole: the old one can go */
  return rc;
}

/* The checkpoint's recipe must be this run's: the first differing setting is named. */
static int same_recipe(const json_t *have, const json_t *want, const char *path, err *e) {
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)want, key, v) {
    const json_t *h = json_object_get(have, key);
    if (!h || !json_equal(h, v)) {
      const size_t flags = JSON_ENCODE_ANY | JSON_REAL_PRECISION(10);
      char *a = h ? json_dumps(h, flags) : NULL, *b = json_dumps(v, flags);
      err_set(e, ERR_INVALID,
              "%s: the run was started with %s %s, not %s; --resume needs the "
              "same settings",
              path, key, a ? a : "(none)", b ? b : "?");
      free(a), free(b);
      return ERR_INVALID;
    }
  }
  return ERR_OK;
}

static int read_state(cli_train_run *r, const char *path, err *e) {
  st_file *st = NULL;
  int rc = st_open(path, &st, e);
  static const char *const prefix[] = {"param", "ema", "adam_m", "adam_v"};
  for (int k = 0; rc == ERR_OK && k < 4; k++)
    for (int i = 0; rc == ERR_OK && i < trainer_tensor_count(r->t); i++) {
      const train_tensor *mp = trainer_tensor(r->t, i);
      float *dst = k == 0   ? mp->data
                   : k == 1 ? trainer_ema_at(r->t, i)
                            : trainer_moment_at(r->t, k - 2, i);
      char name[ST_MAX_NAME + 16];
      snprintf(name, sizeof name, "%s/%s", prefix[k], mp->name);
      if (dst)
        rc = st_read_f32(st, name, mp->ndim, mp->shape, dst, e);
    }
  st_close(st);
  if (rc == ERR_OK)
    rc = model_repack(r->m, e);
  if (rc == ERR_OK && r->lp && !r->o->freeze_text_encoder)
    rc = clip_text_repack(latent_text_encoder(r->lp), e);
  return rc;
}

int cli_train_checkpoint_load(cli_train_run *r, err *e) {
  char path[PATH_LEN];
  snprintf(path, sizeof path, "%s/checkpoint/state.json", r->o->out);
  json_error_t je;
  json_t *s = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!s)
    return err_set(e, ERR_FORMAT, "%s:%d: %s", path, je.line, je.text);
  const json_t *step = json_object_get(s, "step"), *w = json_object_get(s, "weights");
  const json_t *wall = json_object_get(s, "wall_seconds");
  int rc = ERR_OK;
  if (!json_is_string(json_object_get(s, "format")) ||
      strcmp(json_string_value(json_object_get(s, "format")), CKPT_FORMAT) != 0)
    rc = err_set(e, ERR_FORMAT, "%s: key 'format' is not \"" CKPT_FORMAT "\"", path);
  else if (!json_is_integer(step) || json_integer_value(step) < 0 ||
           json_integer_value(step) > r->o->steps)
    rc =
        err_set(e, ERR_FORMAT, "%s: key 'step' must be an integer in [0, %lld]", path, r->o->steps);
  else if (!json_is_string(w) || strchr(json_string_value(w), '/'))
    rc = err_set(e, ERR_FORMAT, "%s: key 'weights' must name a file of the folder", path);
  else
    rc = same_recipe(json_object_get(s, "recipe"), r->recipe, path, e);
  if (rc == ERR_OK) {
    char wpath[PATH_LEN + 64];
    snprintf(wpath, sizeof wpath, "%s/checkpoint/%s", r->o->out, json_string_value(w));
    rc = read_state(r, wpath, e);
  }
  if (rc == ERR_OK) {
    trainer_set_steps(r->t, (long)json_integer_value(step));
    r->wall = json_is_number(wall) ? json_number_value(wall) : 0;
  }
  json_decref(s);
  return rc;
}

/* The step of a loss.jsonl line, or -1. */
static long line_step(const char *line) {
  long step;
  return sscanf(line, "{\"step\": %ld", &step) == 1 ? step : -1;
}

int cli_train_log_open(cli_train_run *r, long keep, err *e) {
  char path[PATH_LEN];
  snprintf(path, sizeof path, "%s/loss.jsonl", r->o->out);
  if (keep > 0) { /* a resumed run: the lines up to its checkpoint, no more */
    char tmp[PATH_LEN + 8], line[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *in = fopen(path, "r"), *out = fopen(tmp, "w");
    while (in && out && fgets(line, sizeof line, in)) {
      long s = line_step(line);
      if (s >= 1 && s <= keep)
        fputs(line, out);
    }
    if (in)
      fclose(in);
    if (!out || fclose(out) != 0 || rename(tmp, path) != 0)
      return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  }
  r->log = fopen(path, keep > 0 ? "a" : "w");
  if (!r->log)
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  return ERR_OK;
}

/* The losses of loss.jsonl in step order; *n of them, malloc'ed. */
static double *read_losses(const char *out, long *n) {
  char path[PATH_LEN], line[512];
  snprintf(path, sizeof path, "%s/loss.jsonl", out);
  FILE *f = fopen(path, "r");
  long cap = 1024, k = 0;
  double *v = malloc((size_t)cap * sizeof *v);
  while (f && v && fgets(line, sizeof line, f)) {
    const char *p = strstr(line, "\"loss\": ");
    if (p && k == cap) {
      double *nv = realloc(v, (size_t)(cap *= 2) * sizeof *v);
      if (!nv) {
        free(v);
        v = NULL;
        break;
      }
      v = nv;
    }
    if (p)
      v[k++] = strtod(p + 8, NULL);
  }
  if (f)
    fclose(f);
  *n = k;
  return v;
}

static void plot_line(uint8_t *px, int w, int h, double x0, double y0, double x1, double y1,
                      const uint8_t rgb[3]) {
  int steps = (int)(fabs(x1 - x0) > fabs(y1 - y0) ? fabs(x1 - x0) : fabs(y1 - y0)) + 1;
  for (int i = 0; i <= steps; i++) {
    int x = (int)lround(x0 + (x1 - x0) * i / steps), y = (int)lround(y0 + (y1 - y0) * i / steps);
    if (x >= 0 && x < w && y >= 0 && y < h)
      memcpy(px + ((size_t)y * w + x) * 3, rgb, 3);
  }
}

/* loss.png: every step's loss (light) and its moving average (dark) on a log scale, with a grey
 * line at every power of ten; the range is in the PNG's Description text. */
static int write_plot(const char *out, const double *loss, long n, err *e) {
  enum { W = 640, H = 320, M = 20 };
  uint8_t *px = malloc((size_t)W * H * 3);
  double *avg = malloc((size_t)(n + 1) * sizeof *avg);
  if (!px || !avg) {
    free(px), free(avg);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  memset(px, 255, (size_t)W * H * 3);
  double lo = INFINITY, hi = -INFINITY, sum = 0;
  const long win = n / 50 > 1 ? n / 50 : 1;
  for (long i = 0; i < n; i++) {
    sum += loss[i] - (i >= win ? loss[i - win] : 0);
    avg[i] = sum / (double)(i + 1 < win ? i + 1 : win);
    double l = log10(fmax(loss[i], 1e-12));
    lo = fmin(lo, l), hi = fmax(hi, l);
  }
  if (!(hi > lo))
    hi = lo + 1;
  const uint8_t grey[3] = {210, 210, 210}, light[3] = {170, 195, 235}, dark[3] = {20, 60, 160},
                black[3] = {0, 0, 0};
#define PX(i) (M + (W - 2.0 * M) * (double)(i) / (double)(n > 1 ? n - 1 : 1))
#define PY(l) (H - M - (H - 2.0 * M) * ((l)-lo) / (hi - lo))
  for (int d = (int)ceil(lo); d <= (int)floor(hi); d++)
    plot_line(px, W, H, M, PY(d), W - M, PY(d), grey);
  for (int pass = 0; pass < 2; pass++)
    for (long i = 1; i < n; i++) {
      const double *v = pass ? avg : loss;
      plot_line(px, W, H, PX(i - 1), PY(log10(fmax(v[i - 1], 1e-12))), PX(i),
                PY(log10(fmax(v[i], 1e-12))), pass ? dark : light);
    }
  plot_line(px, W, H, M, M, M, H - M, black);
  plot_line(px, W, H, M, H - M, W - M, H - M, black);
#undef PX
#undef PY
  char desc[256], path[PATH_LEN];
  snprintf(desc, sizeof desc,
           "training loss per step (light) and its %ld-step moving average (dark), steps 1 to "
           "%ld left to right, log scale from %.3g to %.3g, grey lines at powers of ten",
           win, n, pow(10, lo), pow(10, hi));
  const image_text t = {"Description", desc, 0};
  snprintf(path, sizeof path, "%s/loss.png", out);
  int rc = image_png_write(path, px, 3, H, W, &t, 1, e);
  free(px), free(avg);
  return rc;
}

/* The command line that reproduces the run, from the recipe (keys are the flags' names). */
static void recipe_command(const json_t *recipe, char *buf, size_t n) {
  size_t k = (size_t)snprintf(buf, n, "denoised train");
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)recipe, key, v) {
    if (json_is_null(v) || k >= n)
      continue;
    char flag[64], *val = json_dumps(v, JSON_ENCODE_ANY | JSON_REAL_PRECISION(10));
    snprintf(flag, sizeof flag, "%s", key);
    for (char *p = flag; *p; p++)
      *p = *p == '_' ? '-' : *p;
    const char *s = json_is_string(v) ? cli_train_shown_path(json_string_value(v)) : val;
    if (json_is_true(v)) /* a switch */
      k += (size_t)snprintf(buf + k, n - k, " --%s", flag);
    else
      k += (size_t)snprintf(buf + k, n - k, " --%s %s", flag, s ? s : "?");
    free(val);
  }
  if (k < n)
    snprintf(buf + k, n - k, " --out MODEL_DIR");
}

/* README.md: what was trained, on what, how, and how well. */
static int write_card(cli_train_run *r, const double *loss, long n, err *e) {
  const model_info *mi = model_get_info(r->m);
  const cli_train_opts *o = r->o;
  const long k = n / 10 > 100 ? 100 : (n / 10 > 1 ? n / 10 : 1);
  double last = 0, first = 0;
  for (long i = 0; i < k && i < n; i++)
    last += loss[n - 1 - i] / (double)k, first += loss[i] / (double)k;
  char path[PATH_LEN], cmd[8192], cond[320];
  recipe_command(r->recipe, cmd, sizeof cmd);
  const char *paths[] = {o->model_config, o->init, o->data, o->labels, o->cond, o->sched_file};
  int shortened = 0;
  for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
    shortened |= paths[i] && paths[i][0] == '/';
  if (o->regression)
    snprintf(cond, sizeof cond,
             "a regression network: it maps a degraded image, given as its input at t = 0, "
             "straight to the clean one");
  else if (mi->cond_channels)
    snprintf(cond, sizeof cond,
             "image-conditioned: its input is the noisy image with a %d-channel conditioning "
             "image concatenated%s",
             mi->cond_channels,
             mi->guide_scales ? ", with multiscale structure guidance (config keys _guide_scales, "
                                "_guide_channels)"
                              : "");
  else if (mi->num_classes)
    snprintf(cond, sizeof cond, "class-conditional (%d classes, null class %lld)", mi->num_classes,
             (long long)mi->null_class);
  else if (r->lp)
    snprintf(cond, sizeof cond,
             "text-conditional, on the latents of the frozen VAE in vae/, with the text encoder "
             "in text_encoder/ %s",
             o->freeze_text_encoder ? "(frozen)" : "trained jointly");
  else
    snprintf(cond, sizeof cond, "unconditional");
  snprintf(path, sizeof path, "%s/README.md", o->out);
  FILE *f = fopen(path, "w");
  if (!f)
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  fprintf(f,
          "# A %s trained by denoised\n\n"
          "A diffusers `%s` (%lld parameters, float32) trained with `denoised "
          "train`.\nIt is %s.\nThe weights are %s.\n\n## Recipe\n\n```\n%s\n```\n\n%s"
          "Prediction type `%s`; AdamW (eps 1e-8); learning-rate schedule "
          "`%s`;\nnoise schedule in `scheduler_config.json`. Settings as JSON: "
          "`checkpoint/state.json`.\n\n## Data\n\n%s\n\n## Result\n\n"
          "- %ld steps of batch %lld (%.2f epochs)\n"
          "- final loss %.6g (mean of the last %ld steps; the first %ld: %.6g)\n"
          "- wall time %.1f s on %lld threads\n"
          "- `loss.jsonl` (every step's loss, learning rate and gradient norm), `loss.png`\n",
          mi->class_name, mi->class_name, (long long)mi->num_params, cond,
          o->ema > 0 ? "the exponential moving average of training" : "those of the last step", cmd,
          shortened ? "Absolute paths are shown by their last two parts.\n" : "",
          json_string_value(json_object_get(r->recipe, "prediction_type")), o->lr_schedule,
          r->d.desc, n, o->batch, (double)n * (double)o->batch / (double)r->d.n, last, k, k, first,
          r->wall, o->threads);
  if (fclose(f) != 0)
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  return ERR_OK;
}

/* One tensor list as an F32 safetensors file with the run's metadata. */
static int write_tensors(const cli_train_run *r, const char *path, const st_out_tensor *t, int n,
                         err *e) {
  char step[32];
  snprintf(step, sizeof step, "%ld", trainer_steps(r->t));
  const char *meta[] = {"format", "pt", "step", step, "trained_by", "denoised train"};
  return st_write_f32(path, t, n, meta, 3, e);
}

/* text_encoder/: its config and weights (the EMA when on, as the UNet's), transformers' names. */
static int export_text_encoder(cli_train_run *r, const char *dir, err *e) {
  const clip_text_model *m = latent_text_encoder(r->lp);
  const int nmodel = model_param_count(r->m), trained = !r->o->freeze_text_encoder;
  size_t total, off, count;
  float *w = clip_text_weights(m, &total);
  int n = 0;
  while (clip_text_tensor(m, n, &off, &count))
    n++;
  st_out_tensor *t = calloc((size_t)n + 1, sizeof *t);
  int64_t(*shapes)[2] = calloc((size_t)n + 1, sizeof *shapes);
  char **names = calloc((size_t)n + 1, sizeof *names);
  int rc = t && shapes && names ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; !rc && i < n; i++) {
    const char *name = clip_text_tensor(m, i, &off, &count);
    const float *ema = trained ? trainer_ema_at(r->t, nmodel + i) : NULL;
    const int ndim = clip_text_tensor_shape(m, i, shapes[i]);
    if (!(names[i] = strdup(name)))
      rc = err_set(e, ERR_NOMEM, "out of memory");
    t[i] = (st_out_tensor){names[i], ndim, shapes[i], ema ? ema : w + off};
  }
  char path[PATH_LEN + 64];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  if (!rc)
    rc = write_tensors(r, path, t, n, e);
  json_t *cfg = json_deep_copy(r->text_config);
  if (!rc && !cfg)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc) {
    json_object_set_new(cfg, "architectures", json_pack("[s]", "CLIPTextModel"));
    if (!json_object_get(cfg, "model_type"))
      json_object_set_new(cfg, "model_type", json_string("clip_text_model"));
    snprintf(path, sizeof path, "%s/config.json", dir);
    rc = write_json(path, cfg, e);
  }
  json_decref(cfg);
  for (int i = 0; names && i < n; i++)
    free(names[i]);
  free(names), free(shapes), free(t);
  return rc;
}

/* Copies the files of `files` (NULL-terminated) from src to dst; a missing optional one (from
 * index `optional` on) is skipped. */
static int copy_files(const char *src, const char *dst, const char *const *files, int optional,
                      err *e) {
  int rc = ERR_OK;
  for (int i = 0; !rc && files[i]; i++) {
    char from[PATH_LEN + 64], to[PATH_LEN + 64];
    snprintf(from, sizeof from, "%s/%s", src, files[i]);
    snprintf(to, sizeof to, "%s/%s", dst, files[i]);
    if (i >= optional && access(from, R_OK) != 0)
      continue;
    rc = cli_copy_file(from, to, e);
  }
  return rc;
}

/* A pipeline's parts besides the UNet and scheduler: the text encoder, the tokenizer and the
 * frozen VAE copied, and model_index.json. */
static int export_text_parts(cli_train_run *r, err *e) {
  const char *out = r->o->out;
  char dir[PATH_LEN + 64], vae[PATH_LEN + 64];
  static const char *const tok[] = {"vocab.json", "merges.txt", "special_tokens_map.json",
                                    "tokenizer_config.json", NULL};
  static const char *const vae_files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                                          NULL};
  snprintf(dir, sizeof dir, "%s/text_encoder", out);
  int rc = export_text_encoder(r, dir, e);
  snprintf(dir, sizeof dir, "%s/tokenizer", out);
  if (!rc)
    rc = copy_files(r->tokenizer_dir, dir, tok, 2, e);
  snprintf(vae, sizeof vae, "%s/model_index.json", r->vae_dir);
  const int pipeline = access(vae, R_OK) == 0;
  snprintf(vae, sizeof vae, "%s%s", r->vae_dir, pipeline ? "/vae" : "");
  snprintf(dir, sizeof dir, "%s/vae", out);
  if (!rc)
    rc = copy_files(vae, dir, vae_files, 2, e);
  const char *sc = json_string_value(json_object_get(r->sched, "_class_name"));
  if (!rc)
    rc = cli_write_pipeline_index(out, sc ? sc : "DDPMScheduler", e);
  return rc;
}

/* The pipeline's folders, or nothing for a lone UNet. */
static int make_dirs(const cli_train_run *r, err *e) {
  static const char *const parts[] = {"unet", "scheduler", "text_encoder", "tokenizer", "vae"};
  for (int i = 0; r->lp && i < 5; i++) {
    char dir[PATH_LEN + 64];
    snprintf(dir, sizeof dir, "%s/%s", r->o->out, parts[i]);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
      return err_set(e, ERR_IO, "%s: %s", dir, strerror(errno));
  }
  return ERR_OK;
}

int cli_train_export(cli_train_run *r, err *e) {
  const char *out = r->o->out;
  char path[PATH_LEN + 64], unet[PATH_LEN + 16], sched[PATH_LEN + 16];
  snprintf(unet, sizeof unet, "%s%s", out, r->lp ? "/unet" : "");
  snprintf(sched, sizeof sched, "%s%s", out, r->lp ? "/scheduler" : "");
  const int np = model_param_count(r->m);
  st_out_tensor *t = calloc((size_t)np + 1, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < np; i++) {
    const model_param *mp = model_param_at(r->m, i);
    const float *ema = trainer_ema_at(r->t, i);
    t[i] = (st_out_tensor){mp->name, mp->ndim, mp->shape, ema ? ema : mp->data};
  }
  int rc = make_dirs(r, e);
  snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", unet);
  if (!rc)
    rc = write_tensors(r, path, t, np, e);
  free(t);
  snprintf(path, sizeof path, "%s/config.json", unet);
  if (!rc)
    rc = write_json(path, r->config, e);
  snprintf(path, sizeof path, "%s/scheduler_config.json", sched);
  if (!rc)
    rc = write_json(path, r->sched, e);
  if (!rc && r->lp)
    rc = export_text_parts(r, e);
  long n = 0;
  double *loss = rc ? NULL : read_losses(out, &n);
  if (!rc && !loss)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc && n > 0)
    rc = write_plot(out, loss, n, e);
  if (!rc)
    rc = write_card(r, loss, n, e);
  free(loss);
  return rc;
}
