/* Input files and solver flags shared by `sample`, `invert`, `edit` and `boundary`: images and
 * masks (PNG under the model's size, or .npy), the progress bar, and the solver spec built from
 * --scheduler/--steps/--scheduler-config/--scheduler-opt. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "config.h"
#include "edit.h"
#include "image.h"
#include "npy.h"
#include "safetensors.h"
#include "schedule.h"

/* PNG inputs are small images; anything this large is not one of ours */
#define CLI_MAX_IMAGE_BYTES (64u << 20)

int cli_read_file(const char *flag, const char *path, size_t max_bytes, uint8_t **data, size_t *len,
                  err *e) {
  *data = NULL;
  *len = 0;
  FILE *f = fopen(path, "rb");
  if (!f)
    return err_set(e, ERR_IO, "%s %s: %s", flag, path, strerror(errno));
  struct stat sb;
  if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
    fclose(f);
    return err_set(e, ERR_IO, "%s %s: not a regular file", flag, path);
  }
  if ((size_t)sb.st_size > max_bytes) {
    fclose(f);
    return err_set(e, ERR_INVALID, "%s %s: %lld bytes, more than the %zu allowed", flag, path,
                   (long long)sb.st_size, max_bytes);
  }
  uint8_t *buf = malloc((size_t)sb.st_size + 1);
  if (!buf) {
    fclose(f);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  size_t got = fread(buf, 1, (size_t)sb.st_size, f);
  fclose(f);
  if (got != (size_t)sb.st_size) {
    free(buf);
    return err_set(e, ERR_IO, "%s %s: short read", flag, path);
  }
  *data = buf;
  *len = got;
  return ERR_OK;
}

static int is_npy(const char *path) {
  size_t n = strlen(path);
  return n > 4 && strcmp(path + n - 4, ".npy") == 0;
}

/* A PNG file as c x h x w floats (image_from_png), or with c 0 as an h x w mask
 * (image_mask_from_png); errors name the flag and the path. */
static int read_png(const char *flag, const char *path, int c, int h, int w, float **out, err *e) {
  uint8_t *png;
  size_t len;
  int rc = cli_read_file(flag, path, CLI_MAX_IMAGE_BYTES, &png, &len, e);
  if (rc != ERR_OK)
    return rc;
  float *x = malloc((size_t)(c ? c : 1) * h * w * sizeof *x);
  char field[600];
  snprintf(field, sizeof field, "%s %s", flag, path);
  if (!x)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  else
    rc = c ? image_from_png(png, len, field, c, h, w, x, e)
           : image_mask_from_png(png, len, field, h, w, x, e);
  free(png);
  if (rc != ERR_OK) {
    free(x);
    return rc;
  }
  *out = x;
  return ERR_OK;
}

/* A .npy of images [C, H, W] or [B, C, H, W], B in [1, max_batch], all finite; `single` says
 * in the error that one image is expected. */
static int read_npy_images(const char *flag, const char *path, int c, int h, int w, int max_batch,
                           int single, int *batch, float **out, err *e) {
  npy_array a;
  int rc = npy_read_f32(path, &a, e);
  if (rc != ERR_OK)
    return err_prefix(e, "%s", flag);
  const int lead = a.ndim == 4 ? 1 : 0;
  const int64_t b = lead ? a.shape[0] : 1;
  if ((a.ndim != 3 && a.ndim != 4) || b < 1 || b > max_batch || a.shape[lead] != c ||
      a.shape[lead + 1] != h || a.shape[lead + 2] != w) {
    npy_array_free(&a);
    if (single)
      return err_set(e, ERR_INVALID, "%s %s: expected shape [%d, %d, %d]", flag, path, c, h, w);
    return err_set(e, ERR_INVALID, "%s %s: expected shape [B, %d, %d, %d] with B in [1, %d]", flag,
                   path, c, h, w, max_batch);
  }
  char what[1200];
  snprintf(what, sizeof what, "%s %s", flag, path);
  if ((rc = npy_check_finite(&a, what, e)) != ERR_OK) {
    npy_array_free(&a);
    return rc;
  }
  *batch = (int)b;
  *out = a.data;
  return ERR_OK;
}

int cli_read_image(const char *flag, const char *path, int c, int h, int w, float **out, err *e) {
  *out = NULL;
  int batch;
  if (is_npy(path))
    return read_npy_images(flag, path, c, h, w, 1, 1, &batch, out, e);
  return read_png(flag, path, c, h, w, out, e);
}

int cli_read_images(const char *flag, const char *path, int c, int h, int w, int max_batch,
                    int *batch, float **out, err *e) {
  *out = NULL;
  *batch = 0;
  if (!is_npy(path)) {
    *batch = 1;
    return cli_read_image(flag, path, c, h, w, out, e);
  }
  return read_npy_images(flag, path, c, h, w, max_batch, 0, batch, out, e);
}

const char *cli_default_model(void) {
  return config_default_model_path();
}

const char *cli_model_record(const char *dir) {
  return strcmp(dir, cli_default_model()) == 0 ? config_default_model_name() : dir;
}

const char *cli_model_from_record(const char *rec) {
  return strcmp(rec, config_default_model_name()) == 0 ? cli_default_model() : rec;
}

int cli_parse_labels(const char *flag, const char *s, int batch, const model *m, int64_t *out) {
  const int k = model_get_info(m)->num_classes;
  const char *p = s;
  int n = 0;
  for (;;) {
    char one[72];
    const size_t len = strcspn(p, ",");
    snprintf(one, sizeof one, "%.*s", (int)(len < sizeof one - 1 ? len : sizeof one - 1), p);
    const int64_t v = len < sizeof one - 1 ? model_class_from_name(m, one) : -1;
    if (v < 0) {
      fprintf(stderr,
              "denoised: %s expects classes (indices in [0, %d) or class names) separated by "
              "commas, got '%s'\n",
              flag, k, s);
      return -1;
    }
    if (n == batch) {
      n++; /* one too many: counted for the message */
      break;
    }
    out[n++] = v;
    if (p[len] == 0)
      break;
    p += len + 1;
  }
  if (n == 1) {
    for (int i = 1; i < batch; i++)
      out[i] = out[0];
  } else if (n != batch) {
    fprintf(stderr, "denoised: %s gives %s%d classes for %d images (give one, or one each)\n", flag,
            n > batch ? "more than " : "", n > batch ? batch : n, batch);
    return -1;
  }
  return 0;
}

int cli_read_mask(const char *flag, const char *path, int h, int w, float **out, err *e) {
  *out = NULL;
  const size_t n = (size_t)h * w;
  if (is_npy(path)) {
    npy_array a;
    int rc = npy_read_f32(path, &a, e);
    if (rc != ERR_OK)
      return err_prefix(e, "%s", flag);
    if (a.ndim != 2 || a.shape[0] != h || a.shape[1] != w) {
      npy_array_free(&a);
      return err_set(e, ERR_INVALID, "%s %s: expected shape [%d, %d]", flag, path, h, w);
    }
    for (size_t i = 0; i < n; i++)
      if (!(a.data[i] >= 0 && a.data[i] <= 1)) {
        npy_array_free(&a);
        return err_set(e, ERR_INVALID, "%s %s: value %zu is not in [0, 1]", flag, path, i);
      }
    *out = a.data;
    return ERR_OK;
  }
  return read_png(flag, path, 0, h, w, out, e);
}

void cli_progress_init(cli_progress *p, int quiet) {
  p->tty = !quiet && isatty(STDERR_FILENO);
  p->start = time(NULL);
}

void cli_on_progress(int step, int total, int nfe, void *user) {
  cli_progress *p = user;
  if (!p->tty)
    return;
  if (!total) { /* an adaptive solver: the number of steps is not known in advance */
    fprintf(stderr, "\r%d steps accepted, %d NFE, %lds", step, nfe, (long)(time(NULL) - p->start));
    return;
  }
  int width = 30, done = step * width / total;
  fprintf(stderr, "\r[%.*s%*s] %d/%d steps, %d NFE, %lds", done, "##############################",
          width - done, "", step, total, nfe, (long)(time(NULL) - p->start));
  if (step == total)
    fputc('\n', stderr);
}

void cli_on_pipeline_progress(const pipeline_progress *p, void *user) {
  cli_on_progress(p->step, p->total, p->nfe, user);
}

int cli_solver_from_flags(const char *name, long long steps, const char *sched_file,
                          const char *const *overrides, int noverrides, cli_solver *out, err *e) {
  memset(out, 0, sizeof *out);
  out->s.name = name;
  out->s.steps = (int)steps;
  if (sched_file && !(out->config = sched_config_read_json(sched_file, e)))
    return e->code;
  if (noverrides && !(out->options = json_object()))
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < noverrides; i++) {
    const char *kv = overrides[i], *eq = strchr(kv, '=');
    if (!eq || eq == kv) {
      cli_solver_clear(out);
      return err_set(e, ERR_INVALID, "--scheduler-opt '%s': expected KEY=VALUE", kv);
    }
    char key[128];
    snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
    json_object_set_new(out->options, key, sched_value_from_text(eq + 1));
  }
  out->s.config = out->config;
  out->s.options = out->options;
  return ERR_OK;
}

void cli_solver_clear(cli_solver *s) {
  json_decref(s->config);
  json_decref(s->options);
  memset(s, 0, sizeof *s);
}

int cli_solver_make(const model *m, const cli_solver *s, const char *sched_file, sampler **out,
                    err *e) {
  char field[160] = "";
  *out = NULL;
  int rc = pipeline_sampler(m, &s->s, out, field, sizeof field, e);
  if (rc == ERR_OK || rc == ERR_NOMEM)
    return rc;
  if (strncmp(field, "scheduler.options.", 18) == 0)
    err_prefix(e, "--scheduler-opt %s", field + 18);
  else if (strcmp(field, "scheduler.config") == 0 && sched_file)
    err_prefix(e, "%s", sched_file);
  else if (strcmp(field, "scheduler.steps") == 0)
    err_prefix(e, "--steps");
  return rc;
}

int cli_solver_check(const model *m, const cli_solver *s, const char *sched_file, err *e) {
  sampler *one = NULL;
  int rc = cli_solver_make(m, s, sched_file, &one, e);
  sampler_free(one);
  return rc;
}

int cli_write_param_grads(const char *path, const model *m, const model_grads *g, err *e) {
  int n = model_param_count(m);
  st_out_tensor *t = calloc((size_t)n, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    const model_param *mp = model_param_at(m, i);
    t[i] = (st_out_tensor){mp->name, mp->ndim, mp->shape, model_grads_at(g, i)};
  }
  const char *meta[] = {"format", "pt"};
  int rc = st_write_f32(path, t, n, meta, 1, e);
  free(t);
  return rc;
}

int cli_write_out(const char *path, const uint8_t *data, size_t len, err *e) {
  int fd = -1;
  struct stat st;
  if (strcmp(path, "-") == 0) {
    if (isatty(STDOUT_FILENO))
      return err_set(e, ERR_INVALID, "-o -: standard output is a terminal: pipe or redirect it");
    fd = STDOUT_FILENO;
  } else if (lstat(path, &st) != 0 || S_ISREG(st.st_mode)) {
    return image_file_write(path, data, len, e); /* a new or regular file: replaced atomically */
  } else if (S_ISDIR(st.st_mode)) {
    return err_set(e, ERR_IO, "%s: is a directory", path);
  } else if ((fd = open(path, O_WRONLY | O_TRUNC | O_NOCTTY | O_CLOEXEC)) < 0) {
    /* a symlink, device or pipe (/dev/stdout) is written through, never replaced */
    return err_set(e, ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  }
  size_t off = 0;
  while (off < len) {
    const ssize_t n = write(fd, data + off, len - off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      const int err_no = errno;
      if (fd != STDOUT_FILENO)
        close(fd);
      return err_set(e, ERR_IO, "%s: write failed: %s", path, strerror(err_no));
    }
    off += (size_t)n;
  }
  if (fd != STDOUT_FILENO && close(fd) != 0)
    return err_set(e, ERR_IO, "%s: close failed: %s", path, strerror(errno));
  return ERR_OK;
}

int cli_write_pngs(const char *base, const model *m, const pipeline_request *r,
                   const pipeline_result *res, const char *model_name, const json_t *extra,
                   int only, err *e) {
  const model_info *mi = model_get_info(m);
  const size_t d = (size_t)mi->image_channels * res->height * res->width;
  if (only >= r->batch)
    return err_set(e, ERR_INVALID, "image %d is not in this run of %d", only, r->batch);
  if (strcmp(base, "-") == 0 && r->batch > 1 && only < 0)
    return err_set(e, ERR_INVALID, "-o -: standard output takes one PNG; this run made %d",
                   r->batch);
  int rc = ERR_OK;
  for (int i = only < 0 ? 0 : only; i < (only < 0 ? r->batch : only + 1) && rc == ERR_OK; i++) {
    char name[4200];
    const char *dot = strrchr(base, '.'), *slash = strrchr(base, '/');
    if (!dot || (slash && dot < slash))
      dot = base + strlen(base);
    if (r->batch == 1 || only >= 0)
      snprintf(name, sizeof name, "%s", base);
    else
      snprintf(name, sizeof name, "%.*s-%d%s", (int)(dot - base), base, i, dot);
    uint8_t *png = NULL;
    size_t len = 0;
    rc = pipeline_png(m, r, res->sampler, res->images + d * (size_t)i, i, model_name, extra, &png,
                      &len, e);
    if (rc == ERR_OK)
      rc = cli_write_out(name, png, len, e);
    free(png);
  }
  return rc;
}

int cli_parse_list(const char *flag, const char *s, int count, double lo, double hi, double *out) {
  const char *p = s;
  for (int i = 0; i < count; i++) {
    char *end;
    errno = 0;
    double v = strtod(p, &end);
    if (errno || end == p || !isfinite(v) || v < lo || v > hi ||
        (i + 1 < count ? *end != ',' : *end != 0)) {
      fprintf(stderr, "denoised: %s expects %d comma-separated numbers in [%g, %g], got '%s'\n",
              flag, count, lo, hi, s);
      return -1;
    }
    out[i] = v;
    p = end + 1;
  }
  return 0;
}

int cli_parse_num_flag(const char *cmd, const cli_num_flag *table, size_t n, int c, const char *arg,
                       void *opts) {
  for (size_t i = 0; i < n; i++) {
    if (table[i].c != c)
      continue;
    void *dst = (char *)opts + table[i].off;
    return table[i].is_int ? cli_parse_int(table[i].flag, arg, (long long)table[i].lo,
                                           (long long)table[i].hi, dst)
                           : cli_parse_double(table[i].flag, arg, table[i].lo, table[i].hi, dst);
  }
  return cli_usage_error(cmd, "unknown option") != 0;
}

int cli_copy_file(const char *from, const char *to, err *e) {
  size_t len = 0;
  FILE *f = fopen(from, "rb");
  if (!f)
    return err_set(e, ERR_IO, "%s: %s", from, strerror(errno));
  int rc = ERR_OK;
  char buf[65536];
  FILE *g = fopen(to, "wb");
  if (!g)
    rc = err_set(e, ERR_IO, "%s: %s", to, strerror(errno));
  while (!rc && (len = fread(buf, 1, sizeof buf, f)) > 0)
    if (fwrite(buf, 1, len, g) != len)
      rc = err_set(e, ERR_IO, "%s: write error", to);
  if (!rc && ferror(f))
    rc = err_set(e, ERR_IO, "%s: read error", from);
  if (g && fclose(g) && !rc)
    rc = err_set(e, ERR_IO, "%s: write error", to);
  fclose(f);
  return rc;
}

int cli_write_pipeline_index(const char *out, const char *scheduler_class, err *e) {
  json_t *j = json_pack("{s:s, s:s, s:[s,s], s:[s,s], s:[s,s], s:[s,s], s:[s,s]}", "_class_name",
                        "StableDiffusionPipeline", "_diffusers_version", "0.21.0", "unet",
                        "diffusers", "UNet2DConditionModel", "vae", "diffusers", "AutoencoderKL",
                        "text_encoder", "transformers", "CLIPTextModel", "tokenizer",
                        "transformers", "CLIPTokenizer", "scheduler", "diffusers", scheduler_class);
  if (!j)
    return err_set(e, ERR_NOMEM, "out of memory");
  char p[4200];
  snprintf(p, sizeof p, "%s/model_index.json", out);
  int rc = json_dump_file(j, p, JSON_INDENT(2) | JSON_SORT_KEYS)
               ? err_set(e, ERR_IO, "%s: cannot write", p)
               : ERR_OK;
  json_decref(j);
  return rc;
}
