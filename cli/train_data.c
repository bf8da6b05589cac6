/* The training data of `denoised train`: a .npy of images [N, C, H, W] in [-1, 1] with an
 * optional .npy of labels, or a folder in Hugging Face's imagefolder convention (PNG files, and
 * optionally metadata.jsonl with "file_name" and "label"). Everything is read and checked
 * against the model before training starts; every error names the file (and line or key). */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "clip.h"
#include "image.h"
#include "npy.h"

#define TRAIN_MAX_IMAGES (1 << 24) /* train_batch_indices' limit */
#define TRAIN_MAX_PNG_BYTES (64u << 20)
#define TRAIN_MAX_META_LINE 65536

void cli_train_data_free(cli_train_data *d) {
  free(d->x);
  free(d->labels);
  free(d->cond);
  free(d->ids);
  memset(d, 0, sizeof *d);
}

/* The size every image must have: the model's (a config without a sample_size: H = W of the
 * first image). */
static int check_size(const cli_train_want *want, const char *what, int c, int h, int w, err *e) {
  if (c != want->c)
    return err_set(e, ERR_SHAPE, "%s: %d channels, the model takes %d", what, c, want->c);
  if (want->size && want->factor == 1 && (h != want->size || w != want->size))
    return err_set(e, ERR_SHAPE, "%s: %dx%d images, the model's sample_size is %d", what, h, w,
                   want->size);
  if (want->size && (h != want->size || w != want->size))
    return err_set(e, ERR_SHAPE,
                   "%s: %dx%d images, the model takes %dx%d (its sample_size %d times the VAE's "
                   "factor %d)",
                   what, h, w, want->size, want->size, want->size / want->factor, want->factor);
  if (h != w || h < 1)
    return err_set(e, ERR_SHAPE, "%s: %dx%d images, expected square ones", what, h, w);
  return ERR_OK;
}

/* A label for the model: in [0, num_classes), and not the null class when labels are dropped
 * to it (then the null class would mean two things). */
static int check_label(const model_info *mi, int dropout, int64_t v, const char *where, err *e) {
  if (v < 0 || v >= mi->num_classes)
    return err_set(e, ERR_INVALID, "%s: label %lld outside [0, %d)", where, (long long)v,
                   mi->num_classes);
  if (dropout && v == mi->null_class)
    return err_set(e, ERR_INVALID,
                   "%s: label %lld is the null class, which --null-class-dropout uses for 'no "
                   "class'",
                   where, (long long)v);
  return ERR_OK;
}

static int load_labels(const char *path, const model_info *mi, int dropout, cli_train_data *d,
                       err *e) {
  int64_t count, shape[NPY_MAX_DIMS];
  int ndim;
  int rc = npy_read_i64(path, &d->labels, &count, &ndim, shape, e);
  if (rc)
    return err_prefix(e, "--labels");
  if (ndim != 1 || count != d->n)
    return err_set(e, ERR_SHAPE, "--labels %s: %lld labels of %d dimensions, expected [%lld]", path,
                   (long long)count, ndim, (long long)d->n);
  for (int64_t i = 0; i < count; i++) {
    char where[1200];
    snprintf(where, sizeof where, "--labels %s [%lld]", path, (long long)i);
    if ((rc = check_label(mi, dropout, d->labels[i], where, e)))
      return rc;
  }
  return ERR_OK;
}

/* Images are finite and in [-1, 1]; the first value that is not is named. */
static int check_values(const npy_array *a, const char *what, err *e) {
  int rc = npy_check_finite(a, what, e);
  for (int64_t i = 0; !rc && i < a->count; i++)
    if (a->data[i] < -1.0f || a->data[i] > 1.0f)
      rc = err_set(e, ERR_INVALID, "%s: value %lld is %g; images must be in [-1, 1]", what,
                   (long long)i, a->data[i]);
  return rc;
}

static int load_npy(const char *path, const cli_train_want *want, cli_train_data *d, err *e) {
  npy_array a = {0};
  char what[1100];
  snprintf(what, sizeof what, "--data %s", path);
  int rc = npy_read_f32(path, &a, e);
  if (rc)
    return err_prefix(e, "--data");
  if (a.ndim != 4 || a.shape[0] < 1 || a.shape[0] > TRAIN_MAX_IMAGES)
    rc = err_set(e, ERR_SHAPE, "%s: expected images [N, C, H, W] with 1 <= N <= %d", what,
                 TRAIN_MAX_IMAGES);
  if (!rc)
    rc = check_size(want, what, (int)a.shape[1], (int)a.shape[2], (int)a.shape[3], e);
  if (!rc)
    rc = check_values(&a, what, e);
  if (rc) {
    npy_array_free(&a);
    return rc;
  }
  d->n = a.shape[0], d->c = (int)a.shape[1], d->h = (int)a.shape[2], d->w = (int)a.shape[3];
  d->x = a.data;
  snprintf(d->desc, sizeof d->desc, "%s: %lld images %dx%dx%d", cli_train_shown_path(path),
           (long long)d->n, d->c, d->h, d->w);
  return ERR_OK;
}

int cli_train_cond_load(const char *path, const model *m, int regression, cli_train_data *d,
                        err *e) {
  const model_info *mi = model_get_info(m);
  const int want = regression ? mi->in_channels : mi->cond_channels;
  if (!want)
    return err_set(e, ERR_INVALID,
                   "--cond %s: the model takes no conditioning image (a config with "
                   "\"_cond_channels\", or --regression)",
                   path);
  npy_array a = {0};
  char what[1100];
  snprintf(what, sizeof what, "--cond %s", path);
  int rc = npy_read_f32(path, &a, e);
  if (rc)
    return err_prefix(e, "--cond");
  if (a.ndim != 4 || a.shape[0] != d->n || a.shape[1] != want || a.shape[2] != d->h ||
      a.shape[3] != d->w)
    rc = err_set(e, ERR_SHAPE, "%s: expected images [%lld, %d, %d, %d] (one per --data image)",
                 what, (long long)d->n, want, d->h, d->w);
  if (!rc)
    rc = check_values(&a, what, e);
  if (rc) {
    npy_array_free(&a);
    return rc;
  }
  d->cond = a.data;
  d->cc = want;
  size_t k = strlen(d->desc);
  snprintf(d->desc + k, sizeof d->desc - k, ", conditioned on %s", cli_train_shown_path(path));
  return ERR_OK;
}

static int has_png_suffix(const char *name) {
  size_t n = strlen(name);
  return n > 4 && strcasecmp(name + n - 4, ".png") == 0;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The PNG files of a folder, sorted by name (the data set's order). */
static int list_pngs(const char *dir, char ***names, int64_t *count, err *e) {
  DIR *dp = opendir(dir);
  if (!dp)
    return err_set(e, ERR_IO, "--data %s: %s", dir, strerror(errno));
  int64_t n = 0, cap = 0;
  char **v = NULL;
  int rc = ERR_OK;
  struct dirent *de;
  while (rc == ERR_OK && (de = readdir(dp)) != NULL) {
    if (!has_png_suffix(de->d_name))
      continue;
    if (n == TRAIN_MAX_IMAGES)
      rc = err_set(e, ERR_INVALID, "--data %s: more than %d images", dir, TRAIN_MAX_IMAGES);
    else if (n == cap) {
      cap = cap ? 2 * cap : 256;
      char **nv = realloc(v, (size_t)cap * sizeof *v);
      if (!nv)
        rc = err_set(e, ERR_NOMEM, "out of memory");
      else
        v = nv;
    }
    if (rc == ERR_OK && !(v[n++] = strdup(de->d_name)))
      rc = err_set(e, ERR_NOMEM, "out of memory");
  }
  closedir(dp);
  if (rc == ERR_OK && n == 0)
    rc = err_set(e, ERR_INVALID, "--data %s: no .png files", dir);
  if (rc) {
    for (int64_t i = 0; i < n; i++)
      free(v[i]);
    free(v);
    return rc;
  }
  qsort(v, (size_t)n, sizeof *v, cmp_names);
  *names = v;
  *count = n;
  return ERR_OK;
}

/* Reads and checks every PNG of the folder into d->x (sorted by name). */
static int load_pngs(const char *dir, char **names, const cli_train_want *want, cli_train_data *d,
                     err *e) {
  int rc = ERR_OK, c0 = 0;
  char first[1200] = "";
  for (int64_t i = 0; rc == ERR_OK && i < d->n; i++) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    uint8_t *png = NULL;
    size_t len;
    int c = 0, h = 0, w = 0;
    rc = cli_read_file("--data", path, TRAIN_MAX_PNG_BYTES, &png, &len, e);
    if (!rc)
      rc = image_png_header(png, len, path, &c, &h, &w, e);
    if (!rc && i == 0) {
      c0 = c;
      snprintf(first, sizeof first, "%s", path);
      if ((rc = check_size(want, path, c, h, w, e)) == ERR_OK) {
        d->c = c, d->h = h, d->w = w;
        size_t count = (size_t)d->n * c * h * w;
        if (!(d->x = malloc(count * sizeof *d->x)))
          rc = err_set(e, ERR_NOMEM, "out of memory for %lld images", (long long)d->n);
      }
    } else if (!rc && c != c0) {
      rc = err_set(e, ERR_SHAPE, "--data %s: mixed channel counts: %s has %d, %s has %d", dir,
                   first, c0, path, c);
    } else if (!rc && (h != d->h || w != d->w)) {
      rc = err_set(e, ERR_SHAPE, "%s: %dx%d, but %s is %dx%d", path, h, w, first, d->h, d->w);
    }
    if (!rc)
      rc = image_from_png(png, len, path, d->c, d->h, d->w, d->x + (size_t)i * d->c * d->h * d->w,
                          e);
    free(png);
  }
  return rc;
}

/* One metadata.jsonl line: {"file_name": ..., "label": int or class name}; its label goes to
 * the image of that name. seen[] refuses a file named twice. */
static int meta_line(const char *line, const char *where, char **names, int64_t n, const model *m,
                     int dropout, unsigned char *seen, cli_train_data *d, err *e) {
  json_error_t je;
  json_t *o = json_loads(line, JSON_REJECT_DUPLICATES, &je);
  const json_t *fn = json_object_get(o, "file_name"), *lb = json_object_get(o, "label");
  int rc = ERR_OK;
  if (!json_is_object(o))
    rc = err_set(e, ERR_FORMAT, "%s: not a JSON object", where);
  else if (!json_is_string(fn))
    rc = err_set(e, ERR_FORMAT, "%s: key 'file_name' must be a string", where);
  if (rc) {
    json_decref(o);
    return rc;
  }
  const char *name = json_string_value(fn), *key = name;
  char **hit = bsearch(&key, names, (size_t)n, sizeof *names, cmp_names);
  const model_info *mi = model_get_info(m);
  int64_t v = -1;
  if (!hit)
    rc = err_set(e, ERR_INVALID, "%s: file_name '%s' is not a .png of the folder", where, name);
  else if (seen[hit - names]++)
    rc = err_set(e, ERR_INVALID, "%s: file_name '%s' is listed twice", where, name);
  else if (json_is_integer(lb))
    v = json_integer_value(lb);
  else if (json_is_string(lb) && (v = model_class_from_name(m, json_string_value(lb))) < 0)
    rc = err_set(e, ERR_INVALID, "%s: key 'label': '%s' is no class of the model", where,
                 json_string_value(lb));
  else if (!json_is_string(lb))
    rc = err_set(e, ERR_FORMAT, "%s: key 'label' must be an integer or a class name", where);
  if (!rc)
    rc = check_label(mi, dropout, v, where, e);
  if (!rc)
    d->labels[hit - names] = v;
  json_decref(o);
  return rc;
}

/* metadata.jsonl beside the images: every image of a class-conditional model needs a label. */
static int load_meta(const char *dir, char **names, const model *m, int dropout, cli_train_data *d,
                     err *e) {
  char path[1200];
  snprintf(path, sizeof path, "%s/metadata.jsonl", dir);
  const model_info *mi = model_get_info(m);
  FILE *f = fopen(path, "r");
  if (!f) {
    if (errno != ENOENT)
      return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
    if (mi->num_classes)
      return err_set(e, ERR_INVALID,
                     "--data %s: the model is class-conditional, but there is no "
                     "metadata.jsonl with a label per image",
                     dir);
    return ERR_OK;
  }
  if (!mi->num_classes) {
    fclose(f);
    return err_set(e, ERR_INVALID, "%s: labels given, but the model is not class-conditional",
                   path);
  }
  unsigned char *seen = calloc((size_t)d->n, 1);
  char *line = malloc(TRAIN_MAX_META_LINE);
  d->labels = malloc((size_t)d->n * sizeof *d->labels);
  int rc = seen && line && d->labels ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (long no = 1; rc == ERR_OK && fgets(line, TRAIN_MAX_META_LINE, f); no++) {
    char where[1300];
    snprintf(where, sizeof where, "%s:%ld", path, no);
    if (!strchr(line, '\n') && !feof(f))
      rc = err_set(e, ERR_FORMAT, "%s: line longer than %d bytes", where, TRAIN_MAX_META_LINE);
    else if (line[strspn(line, " \t\r\n")] != 0)
      rc = meta_line(line, where, names, d->n, m, dropout, seen, d, e);
  }
  for (int64_t i = 0; rc == ERR_OK && i < d->n; i++)
    if (!seen[i])
      rc = err_set(e, ERR_INVALID, "%s: no label for %s", path, names[i]);
  fclose(f);
  free(seen);
  free(line);
  return rc;
}

static int load_folder(const char *dir, const model *m, const cli_train_want *want, int dropout,
                       cli_train_data *d, err *e) {
  char **names = NULL;
  int rc = list_pngs(dir, &names, &d->n, e);
  if (rc)
    return rc;
  rc = load_meta(dir, names, m, dropout, d, e);
  if (!rc)
    rc = load_pngs(dir, names, want, d, e);
  for (int64_t i = 0; i < d->n; i++)
    free(names[i]);
  free(names);
  if (!rc)
    snprintf(d->desc, sizeof d->desc, "%s: %lld PNG images %dx%dx%d%s", cli_train_shown_path(dir),
             (long long)d->n, d->c, d->h, d->w,
             d->labels ? " with labels from metadata.jsonl" : "");
  return rc;
}

const char *cli_train_shown_path(const char *path) {
  if (!path || path[0] != '/')
    return path;
  const char *end = path + strlen(path), *p = end;
  while (p > path && p[-1] == '/') /* a trailing slash */
    p--;
  for (int parts = 0; p > path; p--)
    if (p[-1] == '/' && p < end && *p != '/' && ++parts == 2) /* "a//b" is a/b */
      break;
  return *p ? p : path;
}

int cli_train_images_load(const char *data, int channels, cli_train_data *d, err *e) {
  memset(d, 0, sizeof *d);
  const cli_train_want want = {channels, 0, 1}; /* any square size */
  struct stat sb;
  if (stat(data, &sb) != 0)
    return err_set(e, ERR_IO, "--data %s: %s", data, strerror(errno));
  int rc;
  if (S_ISDIR(sb.st_mode)) {
    char **names = NULL;
    if ((rc = list_pngs(data, &names, &d->n, e)) == ERR_OK)
      rc = load_pngs(data, names, &want, d, e);
    for (int64_t i = 0; names && i < d->n; i++)
      free(names[i]);
    free(names);
    if (!rc)
      snprintf(d->desc, sizeof d->desc, "%s: %lld PNG images %dx%dx%d", cli_train_shown_path(data),
               (long long)d->n, d->c, d->h, d->w);
  } else {
    rc = load_npy(data, &want, d, e);
  }
  if (rc)
    cli_train_data_free(d);
  return rc;
}

int cli_train_data_load(const char *data, const char *labels, const model *m,
                        const cli_train_want *want, int dropout, cli_train_data *d, err *e) {
  memset(d, 0, sizeof *d);
  const model_info *mi = model_get_info(m);
  struct stat sb;
  int rc;
  if (stat(data, &sb) != 0)
    return err_set(e, ERR_IO, "--data %s: %s", data, strerror(errno));
  if (S_ISDIR(sb.st_mode)) {
    rc = labels ? err_set(e, ERR_INVALID,
                          "--labels is for a .npy; a folder's labels come from "
                          "its metadata.jsonl")
                : load_folder(data, m, want, dropout, d, e);
  } else {
    rc = load_npy(data, want, d, e);
    if (!rc && labels && !mi->num_classes)
      rc = err_set(e, ERR_INVALID, "--labels %s: the model is not class-conditional", labels);
    else if (!rc && !labels && mi->num_classes)
      rc = err_set(e, ERR_INVALID,
                   "the model is class-conditional (%d classes): --labels "
                   "L.npy is needed",
                   mi->num_classes);
    else if (!rc && labels)
      rc = load_labels(labels, mi, dropout, d, e);
    if (!rc && labels) {
      size_t k = strlen(d->desc);
      snprintf(d->desc + k, sizeof d->desc - k, ", labels %s", cli_train_shown_path(labels));
    }
  }
  if (rc)
    cli_train_data_free(d);
  return rc;
}

/* One caption line (without its newline) into ids; where names the line in errors. */
static int caption_line(const clip_tokenizer *tok, const char *line, size_t len, const char *where,
                        int64_t *ids, err *e) {
  int truncated = 0;
  int rc = clip_tokenize(tok, line, len, ids, NULL, &truncated, e);
  if (rc)
    return err_prefix(e, "%s", where);
  if (truncated)
    return err_set(e, ERR_INVALID, "%s: the caption is longer than the tokenizer's %d tokens",
                   where, clip_tokenizer_length(tok));
  return ERR_OK;
}

int cli_train_captions_load(const char *path, const clip_tokenizer *tok, cli_train_data *d,
                            err *e) {
  FILE *f = fopen(path, "r");
  if (!f)
    return err_set(e, ERR_IO, "--captions %s: %s", path, strerror(errno));
  const int len = clip_tokenizer_length(tok);
  char *line = malloc(TRAIN_MAX_META_LINE);
  d->len = len;
  d->ids = malloc((size_t)d->n * len * sizeof *d->ids);
  int rc = line && d->ids ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for the captions");
  int64_t k = 0;
  for (; rc == ERR_OK && fgets(line, TRAIN_MAX_META_LINE, f); k++) {
    char where[1300];
    snprintf(where, sizeof where, "--captions %s:%lld", path, (long long)k + 1);
    size_t n = strcspn(line, "\r\n");
    if (!strchr(line, '\n') && !feof(f))
      rc = err_set(e, ERR_FORMAT, "%s: line longer than %d bytes", where, TRAIN_MAX_META_LINE);
    else if (k >= d->n)
      rc = err_set(e, ERR_INVALID, "--captions %s: more than the %lld captions of the %lld images",
                   path, (long long)d->n, (long long)d->n);
    else
      rc = caption_line(tok, line, n, where, d->ids + k * len, e);
  }
  fclose(f);
  free(line);
  if (rc == ERR_OK && k != d->n)
    rc = err_set(e, ERR_INVALID, "--captions %s: %lld captions for %lld images (one per line)",
                 path, (long long)k, (long long)d->n);
  if (rc == ERR_OK) {
    size_t used = strlen(d->desc);
    snprintf(d->desc + used, sizeof d->desc - used, ", captions %s", path);
  }
  return rc;
}
