/* Model directory loading and dispatch: finds config.json and the weights in
 * either diffusers layout, then builds a UNet2DModel or the analytic
 * GaussianMixtureDenoiser behind the common model interface. */
#include "model.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "blocks.h"
#include "cunet_impl.h"
#include "gmm.h"
#include "latent.h"
#include "mem.h"
#include "ops.h"
#include "safetensors.h"
#include "schedule.h"
#include "sd_single.h"
#include "unet.h"
#include "unet_impl.h"

#define MODEL_PATH_MAX BLOCKS_PATH_MAX

struct model {
  model_info info;
  char class_name[64];
  char prediction_type[32];
  char sched_path[MODEL_PATH_MAX];
  char dir[MODEL_PATH_MAX]; /* the folder as given to model_load */
  char digest[32];          /* of the weights file: model_weights_digest fills it on first use */
  char weights_path[MODEL_PATH_MAX + 40]; /* the file it digests */
  int has_sched;
  json_t *sched_json; /* scheduler_config.json as read, or NULL */
  unet *unet;
  cunet *cunet;
  latent_parts *latent; /* a text-to-image pipeline's VAE and text encoder, or NULL */
  gmm *gmm;
  char **labels; /* info.class_labels */
  char rec_solver[64];
};

static int is_file(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Finds the network's own folder and its scheduler config in either layout. */
static int resolve_layout(const char *dir, char *net_dir, char *sched_path, err *e) {
  int pipeline = 0;
  int rc = blocks_net_dir(dir, "unet", net_dir, &pipeline, e);
  if (rc)
    return rc;
  snprintf(sched_path, MODEL_PATH_MAX,
           pipeline ? "%s/scheduler/scheduler_config.json" : "%s/scheduler_config.json", dir);
  return ERR_OK;
}

/* 64-bit FNV-1a over the file's 8-byte little-endian words (a shorter tail byte by byte), then
 * its length: an identity tag for files computed from the model (solver data), not a defence
 * against forgery; word-wise because a byte-wise pass over a large checkpoint costs a visible
 * part of the load. */
static int weights_digest(const char *path, char *out, size_t n, err *e) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  const uint64_t prime = 0x100000001b3ull;
  uint64_t h = 0xcbf29ce484222325ull, len = 0;
  unsigned char buf[16384];
  size_t got;
  while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
    size_t i = 0;
    for (; i + 8 <= got; i += 8) {
      uint64_t w = 0;
      for (int k = 7; k >= 0; k--)
        w = (w << 8) | buf[i + (size_t)k];
      h = (h ^ w) * prime;
    }
    for (; i < got; i++)
      h = (h ^ buf[i]) * prime;
    len += got;
  }
  const int bad = ferror(f);
  fclose(f);
  if (bad)
    return err_set(e, ERR_IO, "%s: read error", path);
  h = (h ^ len) * prime;
  snprintf(out, n, "fnv1a64:%016llx", (unsigned long long)h);
  return ERR_OK;
}

static int load_gmm(model *m, const json_t *cfg, const char *weights, err *e) {
  if (!m->has_sched)
    return err_set(e, ERR_FORMAT,
                   "GaussianMixtureDenoiser needs the scheduler_config.json beside it (%s)",
                   m->sched_path);
  sched_config sc;
  int rc = sched_config_load_file(m->sched_path, NULL, 0, &sc, e);
  if (rc)
    return rc;
  double *ac = mem_malloc(sizeof(double) * (size_t)sc.num_train_timesteps);
  if (!ac) {
    sched_config_free(&sc);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  rc = sched_alphas_cumprod_f64(&sc, ac, e);
  if (!rc)
    rc = gmm_load(cfg, weights, ac, sc.num_train_timesteps, &m->gmm, e);
  free(ac);
  sched_config_free(&sc);
  if (rc)
    return rc;
  m->info.kind = MODEL_GAUSSIAN_MIXTURE;
  m->info.sample_size = gmm_sample_size(m->gmm);
  m->info.in_channels = m->info.out_channels = gmm_channels(m->gmm);
  m->info.num_classes = gmm_num_classes(m->gmm);
  m->info.num_params = gmm_num_values(m->gmm);
  return ERR_OK;
}

static void set_unet_info(model *m) {
  const unet_shape *s = unet_get_shape(m->unet);
  m->info.kind = MODEL_UNET2D;
  m->info.sample_size = s->sample_size;
  m->info.in_channels = s->in_channels - s->cond_channels;
  m->info.cond_channels = s->cond_channels;
  m->info.guide_scales = s->guide_scales;
  m->info.out_channels = s->out_channels;
  m->info.num_classes = s->num_classes;
  m->info.num_params = s->num_params;
  m->info.class_embed_dim = s->num_classes ? m->unet->temb_dim : 0;
}

static void set_cunet_info(model *m) {
  const cunet_shape *s = cunet_get_shape(m->cunet);
  m->info.kind = MODEL_UNET2D_CONDITION;
  m->info.sample_size = s->sample_size;
  m->info.in_channels = s->in_channels;
  m->info.out_channels = s->out_channels;
  m->info.num_classes = s->num_classes;
  m->info.num_params = s->num_params;
  m->info.class_embed_dim = s->num_classes ? s->temb_dim : 0;
  m->info.cross_attention_dim = s->cross_dim;
}

/* A UNet2DModel, or (conditional) a UNet2DConditionModel, from net_dir's weights. */
static int load_unet(model *m, const json_t *cfg, const char *net_dir, int conditional, err *e) {
  char path[MODEL_PATH_MAX];
  st_file *st = NULL;
  int rc = blocks_open_weights(net_dir, "diffusion_pytorch_model.safetensors", &st, path, e);
  if (rc)
    return rc;
  rc = conditional ? cunet_load(cfg, st, &m->cunet, e) : unet_load(cfg, st, &m->unet, e);
  if (rc)
    err_prefix(e, "%s", path);
  st_close(st); /* weights were copied (and converted) into the model */
  if (rc)
    return rc;
  if (conditional)
    set_cunet_info(m);
  else
    set_unet_info(m);
  return ERR_OK;
}

/* Which label means "unconditional" for classifier-free guidance (see model_info.null_class). */
static int read_null_class(model *m, const json_t *cfg, const char *cfg_path, err *e) {
  const int k = m->info.num_classes, gmm = m->info.kind == MODEL_GAUSSIAN_MIXTURE;
  m->info.null_class = gmm ? -1 : k - 1;
  const json_t *v = json_object_get(cfg, "_null_class");
  if (!v || json_is_null(v))
    return ERR_OK;
  const json_int_t lo = gmm ? -1 : 0;
  if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) >= k)
    return err_set(e, ERR_FORMAT, "%s: key '_null_class' must be an integer in [%lld, %d)",
                   cfg_path, (long long)lo, k);
  m->info.null_class = json_integer_value(v);
  return ERR_OK;
}

/* "_class_labels": names of the classes, for requests and listings ("A", "bold", ...). */
static int read_class_labels(model *m, const json_t *cfg, const char *cfg_path, err *e) {
  const json_t *v = json_object_get(cfg, "_class_labels");
  if (!v || json_is_null(v))
    return ERR_OK;
  const int n = json_is_array(v) ? (int)json_array_size(v) : -1;
  if (n < 0 || n > m->info.num_classes)
    return err_set(e, ERR_FORMAT, "%s: key '_class_labels' must be an array of at most %d names",
                   cfg_path, m->info.num_classes);
  m->labels = mem_calloc((size_t)n + 1, sizeof *m->labels); /* NULL-terminated */
  if (!m->labels)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    const json_t *s = json_array_get(v, (size_t)i);
    if (!json_is_string(s) || json_string_length(s) == 0 || json_string_length(s) > 64)
      return err_set(e, ERR_FORMAT, "%s: _class_labels[%d] must be a name of 1 to 64 bytes",
                     cfg_path, i);
    if (!(m->labels[i] = mem_strdup(json_string_value(s))))
      return err_set(e, ERR_NOMEM, "out of memory");
  }
  m->info.class_labels = (const char *const *)m->labels;
  m->info.n_class_labels = n;
  return ERR_OK;
}

/* "_regression": a restoration regression network (model_info.regression). */
static int read_regression(model *m, const json_t *cfg, const char *cfg_path, err *e) {
  const json_t *v = json_object_get(cfg, "_regression");
  if (!v || json_is_null(v))
    return ERR_OK;
  if (!json_is_boolean(v))
    return err_set(e, ERR_FORMAT, "%s: key '_regression' must be true or false", cfg_path);
  if (json_is_true(v) && (!m->unet || m->info.cond_channels))
    return err_set(e, ERR_FORMAT,
                   "%s: '_regression' is for a UNet2DModel without _cond_channels (it reads the "
                   "degraded image as its input)",
                   cfg_path);
  m->info.regression = json_is_true(v);
  return ERR_OK;
}

/* "_recommended": the author's settings (model_info.rec_*); every key optional, each checked. */
static int read_recommended(model *m, const json_t *cfg, const char *cfg_path, err *e) {
  m->info.rec_guidance = -1;
  const json_t *v = json_object_get(cfg, "_recommended");
  if (!v || json_is_null(v))
    return ERR_OK;
  if (!json_is_object(v))
    return err_set(e, ERR_FORMAT,
                   "%s: key '_recommended' must be an object {scheduler, steps, guidance_scale}",
                   cfg_path);
  const char *k;
  const json_t *x;
  json_object_foreach((json_t *)v, k, x) {
    if (strcmp(k, "scheduler") == 0 && json_is_string(x) && json_string_length(x) > 0 &&
        json_string_length(x) < sizeof m->rec_solver) {
      snprintf(m->rec_solver, sizeof m->rec_solver, "%s", json_string_value(x));
      m->info.rec_solver = m->rec_solver;
    } else if (strcmp(k, "steps") == 0 && json_is_integer(x) && json_integer_value(x) >= 1 &&
               json_integer_value(x) <= 1000) {
      m->info.rec_steps = (int)json_integer_value(x);
    } else if (strcmp(k, "guidance_scale") == 0 && json_is_number(x) && m->info.num_classes > 0 &&
               json_number_value(x) >= 0 && json_number_value(x) <= 50) {
      m->info.rec_guidance = json_number_value(x);
    } else {
      return err_set(e, ERR_FORMAT,
                     "%s: _recommended.%s: expected scheduler (a solver name), steps (1-1000) or "
                     "guidance_scale (0-50, class-conditional models only)",
                     cfg_path, k);
    }
  }
  return ERR_OK;
}

/* ---------- named class embeddings ---------- */

int model_embedding_name_ok(const char *name) {
  const size_t n = name ? strlen(name) : 0;
  if (n < 1 || n > 64 || name[0] == '.')
    return 0;
  int digits = 1;
  for (size_t i = 0; i < n; i++) {
    const char c = name[i];
    const int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!alnum && c != '_' && c != '-' && c != '.')
      return 0;
    digits = digits && c >= '0' && c <= '9';
  }
  return !digits;
}

/* Room for the names of k + 1 classes (plus the NULL end): the classes before k without a name
 * get their index, so that the name of class k (the caller's to set) sits at its label. */
static int grow_labels(model *m, int k, err *e) {
  char **l = mem_realloc(m->labels, ((size_t)k + 2) * sizeof *l);
  if (!l)
    return err_set(e, ERR_NOMEM, "out of memory");
  m->labels = l;
  for (int i = m->info.n_class_labels; i < k; i++) {
    char idx[24];
    snprintf(idx, sizeof idx, "%d", i);
    if (!(l[i] = mem_strdup(idx))) {
      m->info.n_class_labels = i;
      l[i] = NULL;
      return err_set(e, ERR_NOMEM, "out of memory");
    }
  }
  l[k] = l[k + 1] = NULL;
  m->info.class_labels = (const char *const *)l;
  m->info.n_class_labels = k;
  return ERR_OK;
}

int model_add_class(model *m, const char *name, const float *row, int64_t *label, err *e) {
  if (!m->unet || !m->unet->class_table)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s has no class embeddings: only a class-conditional UNet2DModel takes a "
                   "named class embedding",
                   m->info.class_name);
  if (!model_embedding_name_ok(name))
    return err_set(e, ERR_INVALID,
                   "embedding name '%s': use 1 to 64 letters, digits, '_', '-' or '.' (not only "
                   "digits, not starting with '.')",
                   name ? name : "");
  if (model_class_from_name(m, name) >= 0)
    return err_set(e, ERR_INVALID,
                   "embedding name '%s': the model already has a class of that name", name);
  unet *u = m->unet;
  const size_t dim = (size_t)u->temb_dim;
  for (size_t i = 0; i < dim; i++)
    if (!isfinite(row[i]))
      return err_set(e, ERR_INVALID, "embedding '%s': value %zu is not finite", name, i);
  const int k = u->shape.num_classes;
  float *table = mem_aligned(64, (((size_t)k + 1) * dim * sizeof(float) + 63) & ~(size_t)63);
  if (!table)
    return err_set(e, ERR_NOMEM, "out of memory");
  memcpy(table, u->class_table, (size_t)k * dim * sizeof(float));
  memcpy(table + (size_t)k * dim, row, dim * sizeof(float));
  int rc = grow_labels(m, k, e);
  if (rc == ERR_OK && !(m->labels[k] = mem_strdup(name)))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    m->info.n_class_labels = k + 1;
  if (rc) {
    free(table);
    return rc;
  }
  /* The learned tensor keeps its count (the first k0 rows): saving or training the model sees
   * the table it was loaded with. */
  for (int i = 0; i < u->ps.nparams; i++)
    if (u->ps.params[i].data == u->class_table) {
      blocks_param_release(&u->ps.params[i]); /* the loaded table: a file mapping or its copy */
      u->ps.params[i].data = table;
    }
  u->class_table = table;
  u->shape.num_classes = k + 1;
  m->info.num_classes = k + 1;
  m->info.num_embeddings++;
  *label = k;
  return ERR_OK;
}

float *model_class_row(model *m, int64_t label) {
  if (!m->unet || !m->unet->class_table || label < 0 || label >= m->info.num_classes)
    return NULL;
  return m->unet->class_table + (size_t)label * (size_t)m->unet->temb_dim;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int load_embedding(model *m, const char *path, const char *name, err *e) {
  st_file *f = NULL;
  int rc = st_open(path, &f, e);
  const int64_t dim = m->info.class_embed_dim;
  float *row = mem_malloc((size_t)dim * sizeof(float));
  if (rc == ERR_OK && !row)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = st_read_f32(f, MODEL_EMBEDDING_TENSOR, 1, &dim, row, e);
  if (rc == ERR_OK)
    rc = model_add_class(m, name, row, &(int64_t){0}, e);
  free(row);
  st_close(f);
  return rc ? err_prefix(e, "%s", path) : ERR_OK;
}

/* Every MODEL_EMBEDDINGS_DIR/NAME.safetensors beside the model, in name order. */
static int load_embeddings(model *m, err *e) {
  char dir[MODEL_PATH_MAX + 16];
  snprintf(dir, sizeof dir, "%s/" MODEL_EMBEDDINGS_DIR, m->dir);
  DIR *d = opendir(dir);
  if (!d)
    return ERR_OK;
  char **names = NULL;
  int n = 0, cap = 0, rc = ERR_OK;
  const char *ext = ".safetensors";
  for (struct dirent *de; rc == ERR_OK && (de = readdir(d));) {
    const size_t len = strlen(de->d_name), el = strlen(ext);
    if (de->d_name[0] == '.' || len <= el || strcmp(de->d_name + len - el, ext) != 0)
      continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 16;
      char **g = mem_realloc(names, (size_t)cap * sizeof *g);
      if (!g) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        break;
      }
      names = g;
    }
    if (!(names[n] = mem_strdup(de->d_name)))
      rc = err_set(e, ERR_NOMEM, "out of memory");
    else
      names[n++][len - el] = 0;
  }
  closedir(d);
  if (n && (!m->unet || !m->info.num_classes) && rc == ERR_OK)
    rc = err_set(e, ERR_UNSUPPORTED,
                 "%s: class embeddings beside a model without class embeddings (%s)", dir,
                 m->info.class_name);
  if (rc == ERR_OK && n)
    qsort(names, (size_t)n, sizeof *names, cmp_names);
  for (int i = 0; i < n; i++) {
    char path[MODEL_PATH_MAX + 96];
    snprintf(path, sizeof path, "%s/%s%s", dir, names[i], ext);
    if (rc == ERR_OK)
      rc = load_embedding(m, path, names[i], e);
    free(names[i]);
  }
  free(names);
  return rc;
}

int64_t model_class_from_name(const model *m, const char *name) {
  const int k = m->info.num_classes;
  char *end;
  long long v = strtoll(name, &end, 10);
  if (*name && *end == 0 && end != name)
    return v >= 0 && v < k ? v : -1;
  for (int i = 0; i < m->info.n_class_labels; i++)
    if (strcasecmp(m->info.class_labels[i], name) == 0)
      return i;
  return -1;
}

/* The VAE and text encoder loaded beside the UNet must fit it. */
static int fit_latent(model *m, const char *source, err *e) {
  const latent_info *li = latent_get_info(m->latent);
  if (li->latent_channels != m->info.in_channels || li->text_dim != m->info.cross_attention_dim)
    return err_set(e, ERR_FORMAT,
                   "%s: the VAE's %d latent channels and the text encoder's width %d do not fit "
                   "the UNet's %d input channels and cross_attention_dim %d",
                   source, li->latent_channels, li->text_dim, m->info.in_channels,
                   m->info.cross_attention_dim);
  m->info.latent_factor = li->factor;
  m->info.image_channels = li->image_channels;
  return ERR_OK;
}

/* A pipeline folder with a UNet2DConditionModel, a VAE and a text encoder is a text-to-image
 * model: its parts are loaded beside the UNet and must fit it. Anything else makes images
 * directly (latent_factor 1). */
static int load_latent(model *m, const char *dir, err *e) {
  char p[MODEL_PATH_MAX + 32];
  m->info.latent_factor = 1;
  m->info.image_channels = m->info.in_channels;
  snprintf(p, sizeof p, "%s/model_index.json", dir);
  if (m->info.kind != MODEL_UNET2D_CONDITION || !is_file(p))
    return ERR_OK;
  snprintf(p, sizeof p, "%s/vae/config.json", dir);
  if (!is_file(p))
    return ERR_OK; /* a UNet on its own: forward only */
  int rc = latent_parts_load(dir, &m->latent, e);
  return rc ? rc : fit_latent(m, dir, e);
}

/* The class and prediction type a config.json declares (sched: the scheduler config beside it,
 * or NULL); returns the class name. */
static const char *read_names(model *m, const json_t *cfg, const json_t *sched) {
  const json_t *cls = json_object_get(cfg, "_class_name");
  const char *name = json_is_string(cls) ? json_string_value(cls) : "UNet2DModel";
  snprintf(m->class_name, sizeof m->class_name, "%s", name);
  m->info.class_name = m->class_name;
  const json_t *pt = json_object_get(cfg, "prediction_type");
  /* UNet2DModel configs do not say what they predict: diffusers' pipelines take the scheduler
   * config's prediction_type (what 'denoised train --prediction-type' writes there), and
   * epsilon without one. */
  if (!json_is_string(pt) && sched)
    pt = json_object_get(sched, "prediction_type");
  snprintf(m->prediction_type, sizeof m->prediction_type, "%s",
           json_is_string(pt) ? json_string_value(pt) : "epsilon");
  m->info.prediction_type = m->prediction_type;
  return name;
}

/* A single-file Stable-Diffusion checkpoint (sd_single.h) is the pipeline folder it converts
 * to. The file holds no vocabulary: the tokenizer/ folder beside it gives one (SD 1.x and 2.x
 * share CLIP's BPE vocabulary; the family sets the pad token). */
static int load_single(model *m, const char *path, err *e) {
  char tok[MODEL_PATH_MAX + 16];
  const char *slash = strrchr(path, '/');
  if (slash)
    snprintf(tok, sizeof tok, "%.*s/tokenizer", (int)(slash - path), path);
  else
    snprintf(tok, sizeof tok, "tokenizer");
  struct stat sb;
  if (stat(tok, &sb) != 0 || !S_ISDIR(sb.st_mode))
    return err_set(e, ERR_FORMAT,
                   "%s: a single-file checkpoint carries no tokenizer vocabulary: put a "
                   "tokenizer/ folder beside it (%s), e.g. the tokenizer/ of any diffusers "
                   "Stable Diffusion pipeline (vocab.json and merges.txt)",
                   path, tok);
  sd_single *s = NULL;
  int rc = sd_single_open(path, &s, e);
  if (rc)
    return rc;
  const json_t *cfg = sd_single_config(s, SD_PART_UNET);
  read_names(m, cfg, NULL);
  rc = cunet_load(cfg, sd_single_weights(s, SD_PART_UNET), &m->cunet, e);
  if (rc)
    err_prefix(e, "%s (UNet)", path);
  if (!rc) {
    set_cunet_info(m);
    m->sched_json = json_deep_copy(sd_single_config(s, SD_PART_SCHEDULER));
    if (!m->sched_json)
      rc = err_set(e, ERR_NOMEM, "out of memory");
  }
  if (!rc)
    rc = latent_parts_load_single(s, path, tok, &m->latent, e);
  sd_single_free(s);
  if (!rc)
    rc = fit_latent(m, path, e);
  if (!rc)
    snprintf(m->weights_path, sizeof m->weights_path, "%s", path);
  m->info.rec_guidance = -1;
  return rc;
}

int model_load(const char *dir, model **out, err *e) {
  *out = NULL;
  ops_init();
  if (is_file(dir)) {
    model *m = mem_calloc(1, sizeof *m);
    if (!m)
      return err_set(e, ERR_NOMEM, "out of memory");
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    int rc = load_single(m, dir, e);
    if (rc) {
      model_free(m);
      return rc;
    }
    *out = m;
    return ERR_OK;
  }
  char net_dir[MODEL_PATH_MAX], cfg_path[MODEL_PATH_MAX + 16];
  model *m = mem_calloc(1, sizeof *m);
  if (!m)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = resolve_layout(dir, net_dir, m->sched_path, e);
  if (rc) {
    free(m);
    return rc;
  }
  snprintf(m->dir, sizeof m->dir, "%s", dir);
  m->has_sched = is_file(m->sched_path);
  if (m->has_sched && !(m->sched_json = sched_config_read_json(m->sched_path, e))) {
    free(m);
    return e ? e->code : ERR_FORMAT;
  }
  snprintf(cfg_path, sizeof cfg_path, "%s/config.json", net_dir);
  json_t *cfg = blocks_read_json(cfg_path, e);
  if (!cfg) {
    model_free(m);
    return e ? e->code : ERR_FORMAT;
  }
  const char *name = read_names(m, cfg, m->sched_json);
  if (strcmp(name, "UNet2DModel") == 0) {
    rc = load_unet(m, cfg, net_dir, 0, e);
  } else if (strcmp(name, "UNet2DConditionModel") == 0) {
    rc = load_unet(m, cfg, net_dir, 1, e);
  } else if (strcmp(name, "GaussianMixtureDenoiser") == 0) {
    char weights[MODEL_PATH_MAX + 40];
    snprintf(weights, sizeof weights, "%s/diffusion_pytorch_model.safetensors", net_dir);
    rc = load_gmm(m, cfg, weights, e);
    if (rc)
      err_prefix(e, "%s", net_dir);
  } else {
    rc = err_set(e, ERR_UNSUPPORTED,
                 "%s: _class_name \"%s\" is not supported (UNet2DModel, UNet2DConditionModel or "
                 "GaussianMixtureDenoiser)",
                 cfg_path, name);
  }
  if (rc == ERR_OK) {
    snprintf(m->weights_path, sizeof m->weights_path, "%s/diffusion_pytorch_model.safetensors",
             net_dir);
  }
  if (rc == ERR_OK)
    rc = read_null_class(m, cfg, cfg_path, e);
  if (rc == ERR_OK)
    rc = read_class_labels(m, cfg, cfg_path, e);
  if (rc == ERR_OK)
    rc = read_recommended(m, cfg, cfg_path, e);
  if (rc == ERR_OK)
    rc = read_regression(m, cfg, cfg_path, e);
  if (rc == ERR_OK)
    rc = load_embeddings(m, e);
  if (rc == ERR_OK)
    rc = load_latent(m, dir, e);
  json_decref(cfg);
  if (rc) {
    model_free(m);
    return rc;
  }
  *out = m;
  return ERR_OK;
}

int model_init(const char *config_path, uint64_t seed, model **out, err *e) {
  *out = NULL;
  ops_init();
  json_t *cfg = blocks_read_json(config_path, e);
  if (!cfg)
    return e ? e->code : ERR_FORMAT;
  model *m = mem_calloc(1, sizeof *m);
  if (!m) {
    json_decref(cfg);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  const char *name = read_names(m, cfg, NULL);
  int rc = ERR_OK;
  if (strcmp(name, "UNet2DConditionModel") == 0) {
    if ((rc = cunet_init(cfg, seed, &m->cunet, e)) == ERR_OK)
      set_cunet_info(m);
  } else if (strcmp(name, "UNet2DModel") != 0)
    rc = err_set(e, ERR_UNSUPPORTED,
                 "key '_class_name': \"%s\" cannot be initialised (only UNet2DModel and "
                 "UNet2DConditionModel)",
                 name);
  else if ((rc = unet_init(cfg, seed, &m->unet, e)) == ERR_OK)
    set_unet_info(m);
  m->info.latent_factor = 1;
  m->info.image_channels = m->info.in_channels;
  if (rc == ERR_OK)
    rc = read_null_class(m, cfg, config_path, e);
  if (rc == ERR_OK)
    rc = read_class_labels(m, cfg, config_path, e);
  if (rc == ERR_OK)
    rc = read_recommended(m, cfg, config_path, e);
  json_decref(cfg);
  if (rc) {
    if (e && strncmp(e->msg, config_path, strlen(config_path)) != 0)
      err_prefix(e, "%s", config_path);
    model_free(m);
    return rc;
  }
  *out = m;
  return ERR_OK;
}

void model_free(model *m) {
  if (!m)
    return;
  unet_free(m->unet);
  cunet_free(m->cunet);
  latent_parts_free(m->latent);
  gmm_free(m->gmm);
  for (int i = 0; m->labels && m->labels[i]; i++)
    free(m->labels[i]);
  free(m->labels);
  json_decref(m->sched_json);
  free(m);
}

const latent_parts *model_latent(const model *m) {
  return m->latent;
}

const model_info *model_get_info(const model *m) {
  return &m->info;
}

const char *model_dir(const model *m) {
  return m->dir;
}

/* Serialises the first digest of each model (concurrent jobs of a daemon may ask at once). */
static pthread_mutex_t digest_lock = PTHREAD_MUTEX_INITIALIZER;

/* Taken on first use, not at load: hashing the whole file was most of a load's CPU time, and only
 * info, solver data, OT fits, v3 statistics and concepts read it. The digest is a cache behind a
 * const model, filled once under digest_lock. */
const char *model_weights_digest(const model *m) {
  model *mm = (model *)m;
  pthread_mutex_lock(&digest_lock);
  if (!mm->digest[0] && mm->weights_path[0]) {
    err e = {0};
    if (weights_digest(mm->weights_path, mm->digest, sizeof mm->digest, &e))
      mm->digest[0] = '\0'; /* unreadable now: the empty string, which matches no record */
  }
  pthread_mutex_unlock(&digest_lock);
  return mm->digest;
}

const char *model_scheduler_config_path(const model *m) {
  return m->has_sched ? m->sched_path : NULL;
}

const json_t *model_scheduler_config(const model *m) {
  return m->sched_json;
}

int model_eval(const model *m, const float *x, int n, int h, int w, const float *t,
               const int64_t *labels, float *out, int threads, err *e) {
  const model_call c = {
      .x = x, .n = n, .h = h, .w = w, .t = t, .labels = labels, .threads = threads};
  return model_run(m, &c, out, e);
}

int model_mid_shape(const model *m, int h, int w, int shape[3], err *e) {
  if (m->cunet)
    return cunet_mid_shape(m->cunet, h, w, shape, e);
  if (!m->unet)
    return err_set(e, ERR_UNSUPPORTED, "%s has no mid block (h-space)", m->info.class_name);
  return unet_mid_shape(m->unet, h, w, shape, e);
}

int model_run(const model *m, const model_call *c, float *out, err *e) {
  if (c->n < 1 || !c->x || !c->t || !out)
    return err_set(e, ERR_INVALID, "model_run: empty batch or missing buffers");
  if (c->cond && !m->info.cond_channels)
    return err_set(e, ERR_INVALID, "%s takes no conditioning image", m->info.class_name);
  if (m->cunet)
    return cunet_forward(m->cunet, c, out, e);
  if (c->encoder_hidden_states)
    return err_set(e, ERR_INVALID, "%s takes no encoder hidden states (no text conditioning)",
                   m->info.class_name);
  const int hooked = c->hooks.mid_save || c->hooks.mid_replace;
  if (m->unet) {
    const unet_mid mid = {.save = c->hooks.mid_save, .replace = c->hooks.mid_replace};
    return unet_forward_mid(m->unet, c->x, c->cond, c->n, c->h, c->w, c->t, c->labels, out,
                            c->threads, hooked ? &mid : NULL, e);
  }
  if (hooked)
    return err_set(e, ERR_UNSUPPORTED, "%s has no mid block (h-space)", m->info.class_name);
  if (c->h != m->info.sample_size || c->w != m->info.sample_size)
    return err_set(e, ERR_INVALID, "GaussianMixtureDenoiser is %dx%d; got %dx%d",
                   m->info.sample_size, m->info.sample_size, c->h, c->w);
  return gmm_eval(m->gmm, c->x, c->n, c->t, c->labels, out, e);
}

double model_flops(const model *m, int h, int w) {
  if (m->cunet)
    return cunet_flops(m->cunet, h, w, 77);
  return m->unet ? unet_flops(m->unet, h, w) : 0.0;
}

/* ---------- learned tensors and gradients ---------- */

struct model_grads {
  int count;
  size_t *sizes;
  float **g;
};

/* The learned tensors of whichever UNet m is, or NULL. */
static blocks_params *params_of(const model *m) {
  return m->unet ? &m->unet->ps : m->cunet ? cunet_params(m->cunet) : NULL;
}

int model_param_count(const model *m) {
  const blocks_params *ps = params_of(m);
  return ps ? ps->nparams : 0;
}

const model_param *model_param_at(const model *m, int i) {
  return i >= 0 && i < model_param_count(m) ? &params_of(m)->params[i] : NULL;
}

int model_precision_parse(const char *s, model_precision *out, err *e) {
  if (s && strcmp(s, "fp32") == 0)
    *out = MODEL_FP32;
  else if (s && strcmp(s, "bf16") == 0)
    *out = MODEL_BF16;
  else
    return err_set(e, ERR_INVALID, "precision '%s' is not one of fp32, bf16", s ? s : "(null)");
  return ERR_OK;
}

int model_set_precision(model *m, model_precision p, err *e) {
  if (p == MODEL_FP32)
    return ERR_OK;
  if (m->cunet)
    return blocks_params_to_bf16(cunet_params(m->cunet), e);
  if (!m->unet)
    return err_set(e, ERR_UNSUPPORTED, "precision bf16 applies to UNet models, not %s",
                   m->info.class_name);
  return unet_to_bf16(m->unet, e);
}

int model_repack(model *m, err *e) {
  if (m->cunet)
    return blocks_params_repack(cunet_params(m->cunet), e);
  if (!m->unet)
    return err_set(e, ERR_UNSUPPORTED, "%s has no learned tensors", m->info.class_name);
  return unet_repack(m->unet, e);
}

void model_grads_free(model_grads *g) {
  if (!g)
    return;
  for (int i = 0; g->g && i < g->count; i++)
    free(g->g[i]);
  free(g->g);
  free(g->sizes);
  free(g);
}

int model_grads_new(const model *m, model_grads **out, err *e) {
  *out = NULL;
  int n = model_param_count(m);
  if (n == 0)
    return err_set(e, ERR_UNSUPPORTED, "%s has no learned tensors", m->info.class_name);
  model_grads *g = mem_calloc(1, sizeof *g);
  if (!g)
    return err_set(e, ERR_NOMEM, "out of memory");
  g->g = mem_calloc((size_t)n, sizeof *g->g);
  g->sizes = mem_calloc((size_t)n, sizeof *g->sizes);
  if (!g->g || !g->sizes) {
    model_grads_free(g);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  g->count = n;
  for (int i = 0; i < n; i++) {
    g->sizes[i] = model_param_at(m, i)->count;
    if (!(g->g[i] = mem_calloc(g->sizes[i], sizeof(float)))) {
      model_grads_free(g);
      return err_set(e, ERR_NOMEM, "out of memory for the gradient of '%s'",
                     model_param_at(m, i)->name);
    }
  }
  *out = g;
  return ERR_OK;
}

float *model_grads_at(const model_grads *g, int i) {
  return i >= 0 && i < g->count ? g->g[i] : NULL;
}

void model_grads_zero(model_grads *g) {
  for (int i = 0; i < g->count; i++)
    memset(g->g[i], 0, g->sizes[i] * sizeof(float));
}

int model_backward(const model *m, const model_call *c, const model_grad_call *g, err *e) {
  const blocks_params *ps = params_of(m);
  if (!ps)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s has no gradient (only UNet2DModel and UNet2DConditionModel do)",
                   m->info.class_name);
  if (c->n < 1 || !c->x || !c->t || !g || (!g->grad_out && !g->loss_grad))
    return err_set(e, ERR_INVALID, "model_backward: empty batch or missing buffers");
  if (c->hooks.mid_save || c->hooks.mid_replace)
    return err_set(e, ERR_UNSUPPORTED, "model_backward takes no h-space hooks");
  if (c->encoder_hidden_states && !m->cunet)
    return err_set(e, ERR_INVALID, "%s takes no encoder hidden states (no text conditioning)",
                   m->info.class_name);
  if (g->params && g->params->count != ps->nparams)
    return err_set(e, ERR_INVALID, "model_backward: gradients made for another model");
  if (g->guide_target && !m->info.guide_scales)
    return err_set(e, ERR_INVALID,
                   "model_backward: an auxiliary guidance target for a model without structure "
                   "guidance (config key _guide_scales)");
  if (g->guide_target && !(g->guide_weight >= 0 && isfinite(g->guide_weight)))
    return err_set(e, ERR_INVALID, "model_backward: the guidance loss weight must be >= 0");
  const int64_t first_embedding = m->info.num_classes - m->info.num_embeddings;
  for (int i = 0; g->params && c->labels && i < c->n; i++)
    if (c->labels[i] >= first_embedding && c->labels[i] < m->info.num_classes)
      return err_set(e, ERR_UNSUPPORTED,
                     "model_backward: no weight gradients through the named class embedding "
                     "'%s' (it is not a learned tensor of the model)",
                     m->info.class_labels[c->labels[i]]);
  float *const *pg = g->params ? g->params->g : NULL;
  return m->cunet ? cunet_backward(m->cunet, c, g, pg, e) : unet_backward(m->unet, c, g, pg, e);
}
