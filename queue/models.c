/* The model registry (loaded models with reference counts, replaced while jobs run) and the
 * solver spec of a job turned into a sampler for its model. */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adjtask.h"
#include "mem.h"

/* ---- models ---- */

/* The classifier in MODEL/classifier/, kept loaded (concept jobs' verdicts), and its heads and
 * classes for requests to name (both NULL without the folder; an error if it is there but does
 * not load). */
static int classifier_desc(const char *model_path, classifier **clf, json_t **out, err *e) {
  char dir[1100], cfg[1200];
  snprintf(dir, sizeof dir, "%s/classifier", model_path);
  snprintf(cfg, sizeof cfg, "%s/config.json", dir);
  *out = NULL;
  *clf = NULL;
  if (access(cfg, F_OK) != 0)
    return ERR_OK;
  classifier *c;
  int rc = classifier_load(dir, &c, e);
  if (rc != ERR_OK)
    return err_prefix(e, "its classifier");
  const classifier_info *ci = classifier_get_info(c);
  json_t *heads = json_array();
  for (int h = 0; heads && h < ci->n_heads; h++) {
    json_t *labels = json_array();
    for (int k = 0; labels && k < ci->heads[h].classes; k++) {
      char idx[16];
      snprintf(idx, sizeof idx, "%d", k);
      json_array_append_new(labels,
                            json_string(ci->heads[h].labels ? ci->heads[h].labels[k] : idx));
    }
    json_array_append_new(heads, json_pack("{s:s, s:i, s:o}", "name", ci->heads[h].name, "classes",
                                           ci->heads[h].classes, "labels", labels));
  }
  *out = json_pack("{s:s, s:o}", "class_name", ci->class_name, "heads", heads);
  if (!*out) {
    classifier_free(c);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  *clf = c;
  return ERR_OK;
}

void qmodel_unref(qmodel *m) {
  if (m && --m->refs == 0) {
    model_free(m->m);
    classifier_free(m->clf);
    json_decref(m->labels);
    json_decref(m->classifier);
    free(m);
  }
}

qmodel *qmodel_find(queue *q, const char *name) {
  for (int i = 0; i < q->nmodels; i++)
    if (strcmp(q->models[i]->name, name) == 0)
      return q->models[i];
  return NULL;
}

/* A registry entry for the folder at path (one reference), or an error naming the model. */
static int qmodel_open(const char *name, const char *path, const char *prec, qmodel **out, err *e) {
  qmodel *m = mem_calloc(1, sizeof *m);
  if (!m)
    return err_set(e, ERR_NOMEM, "out of memory");
  snprintf(m->name, sizeof m->name, "%s", name);
  snprintf(m->path, sizeof m->path, "%s", path);
  snprintf(m->precision, sizeof m->precision, "%s", prec);
  m->refs = 1;
  model_precision mp = MODEL_FP32;
  int rc = model_load(m->path, &m->m, e);
  if (rc == ERR_OK && *prec &&
      ((rc = model_precision_parse(prec, &mp, e)) != ERR_OK ||
       (rc = model_set_precision(m->m, mp, e)) != ERR_OK))
    rc = rc ? rc : ERR_INVALID;
  if (rc == ERR_OK)
    rc = classifier_desc(m->path, &m->clf, &m->classifier, e);
  const model_info *mi = rc == ERR_OK ? model_get_info(m->m) : NULL;
  if (mi && mi->class_labels) { /* as JSON, for listings and class names in requests */
    m->labels = json_array();
    for (int k = 0; m->labels && k < mi->n_class_labels; k++)
      json_array_append_new(m->labels, json_string(mi->class_labels[k]));
  }
  if (rc != ERR_OK) {
    err_prefix(e, "model '%s' (%s)", m->name, m->path);
    m->refs = 1;
    qmodel_unref(m);
    return rc;
  }
  *out = m;
  return ERR_OK;
}

int qmodel_reload(queue *q, const char *name, err *e) {
  pthread_mutex_lock(&q->mu);
  qmodel *old = qmodel_find(q, name);
  char path[sizeof old->path], prec[sizeof old->precision];
  if (old)
    snprintf(path, sizeof path, "%s", old->path), snprintf(prec, sizeof prec, "%s", old->precision);
  pthread_mutex_unlock(&q->mu);
  if (!old)
    return err_set(e, QUEUE_NOT_FOUND, "model '%s' is no longer served", name);
  qmodel *m = NULL;
  int rc = qmodel_open(name, path, prec, &m, e);
  if (rc)
    return rc;
  pthread_mutex_lock(&q->mu);
  for (int i = 0; i < q->nmodels; i++)
    if (strcmp(q->models[i]->name, name) == 0 && strcmp(q->models[i]->path, path) == 0) {
      qmodel_unref(q->models[i]); /* running batches hold their own reference */
      q->models[i] = m;
      m = NULL;
      break;
    }
  pthread_mutex_unlock(&q->mu);
  qmodel_unref(m); /* the list changed meanwhile: this copy is not needed */
  return ERR_OK;
}

int queue_model_targets(queue *q, const char *model, const char *spec, char *canon, size_t n,
                        err *e) {
  pthread_mutex_lock(&q->mu);
  qmodel *m = qmodel_find(q, model);
  if (m)
    m->refs++;
  pthread_mutex_unlock(&q->mu);
  if (!m)
    return err_set(e, QUEUE_NOT_FOUND, "unknown model '%s'", model);
  adjtask_target t[ADJTASK_MAX_TARGETS];
  int nt = 0;
  int rc = m->clf ? adjtask_parse_targets(m->clf, spec, t, &nt, e)
                  : err_set(e, ERR_UNSUPPORTED, "model '%s' has no classifier (MODEL/classifier/)",
                            model);
  if (rc == ERR_OK)
    adjtask_targets_str(m->clf, t, nt, canon, n);
  pthread_mutex_lock(&q->mu);
  qmodel_unref(m);
  pthread_mutex_unlock(&q->mu);
  return rc;
}

static void registry_path(const queue *q, char *buf, size_t n) {
  snprintf(buf, n, "%s/" QUEUE_REGISTERED_FILE, q->state_dir);
}

/* The configured models, then the registered ones not configured (*nreg of them, last). */
static queue_model_conf *with_registered(queue *q, const queue_model_conf *models, int n,
                                         int *total, err *e) {
  if (!q->registered) {
    char path[1100];
    registry_path(q, path, sizeof path);
    q->registered = access(path, F_OK) == 0 ? json_load_file(path, 0, NULL) : json_object();
    if (!json_is_object(q->registered)) {
      json_decref(q->registered);
      q->registered = json_object();
      qlog(q, QUEUE_LOG_WARN, NULL, "%s is not a JSON object: no registered models", path);
    }
  }
  queue_model_conf *all = mem_calloc((size_t)n + json_object_size(q->registered) + 1, sizeof *all);
  if (!all) {
    err_set(e, ERR_NOMEM, "out of memory");
    return NULL;
  }
  memcpy(all, models, (size_t)n * sizeof *all);
  *total = n;
  const char *name;
  json_t *v;
  json_object_foreach(q->registered, name, v) {
    int taken = !json_is_string(v);
    for (int i = 0; i < n; i++)
      taken |= strcmp(models[i].name, name) == 0;
    if (!taken)
      all[(*total)++] = (queue_model_conf){.name = name, .path = json_string_value(v)};
  }
  return all;
}

int queue_set_models(queue *q, const queue_model_conf *conf, int nconf, err *e) {
  int n = 0;
  queue_model_conf *models = with_registered(q, conf, nconf, &n, e);
  if (!models)
    return e->code;
  qmodel **list = mem_calloc((size_t)(n > 0 ? n : 1), sizeof *list);
  if (!list) {
    free(models);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  int rc = ERR_OK, got = 0;
  for (int i = 0; i < n && !rc; i++) {
    pthread_mutex_lock(&q->mu);
    qmodel *old = qmodel_find(q, models[i].name);
    const char *prec =
        models[i].precision && strcmp(models[i].precision, "fp32") != 0 ? models[i].precision : "";
    /* same folder and precision: keep the loaded copy */
    if (old && strcmp(old->path, models[i].path) == 0 && strcmp(old->precision, prec) == 0) {
      old->refs++;
      list[got++] = old;
      pthread_mutex_unlock(&q->mu);
      continue;
    }
    pthread_mutex_unlock(&q->mu);
    qmodel *m = NULL;
    if ((rc = qmodel_open(models[i].name, models[i].path, prec, &m, e)) != ERR_OK && i >= nconf) {
      qlog(q, QUEUE_LOG_WARN, NULL, "registered %s: left out", e->msg);
      rc = ERR_OK; /* a registered model that no longer loads does not stop the others */
      continue;
    }
    if (rc != ERR_OK)
      break;
    list[got++] = m;
  }
  pthread_mutex_lock(&q->mu);
  qmodel **drop = list;
  int ndrop = got;
  if (!rc) {
    drop = q->models;
    ndrop = q->nmodels;
    q->models = list;
    q->nmodels = got;
  }
  for (int i = 0; i < ndrop; i++)
    qmodel_unref(drop[i]); /* running batches hold their own reference */
  pthread_mutex_unlock(&q->mu);
  free(drop);
  free(models);
  return rc;
}

int queue_register_model(queue *q, const char *name, const char *path, err *e) {
  qmodel *m = NULL;
  int rc = qmodel_open(name, path, "", &m, e);
  if (rc)
    return rc;
  pthread_mutex_lock(&q->mu);
  qmodel **grown = qmodel_find(q, name) || !q->registered
                       ? NULL
                       : mem_realloc(q->models, ((size_t)q->nmodels + 1) * sizeof *grown);
  if (grown) {
    q->models = grown;
    q->models[q->nmodels++] = m;
    m = NULL;
    json_object_set_new(q->registered, name, json_string(path));
  } else {
    rc = qmodel_find(q, name) ? err_set(e, QUEUE_CONFLICT, "a model named '%s' is served", name)
                              : err_set(e, ERR_NOMEM, "out of memory");
  }
  char file[1100], tmp[1200];
  registry_path(q, file, sizeof file);
  snprintf(tmp, sizeof tmp, "%s.tmp", file);
  if (rc == ERR_OK &&
      (json_dump_file(q->registered, tmp, JSON_INDENT(2)) != 0 || rename(tmp, file) != 0))
    rc = err_set(e, ERR_IO, "cannot write %s", file);
  pthread_mutex_unlock(&q->mu);
  qmodel_unref(m);
  return rc;
}

/* Removes path and, for a folder, everything under it (symbolic links themselves, not what
 * they point to); a missing path is no error. depth bounds the recursion (a made model's folder
 * is two levels deep). */
static int rm_tree(const char *path, int depth, err *e) {
  struct stat sb;
  if (lstat(path, &sb) != 0)
    return errno == ENOENT ? ERR_OK
                           : err_set(e, ERR_IO, "cannot stat %s: %s", path, strerror(errno));
  if (S_ISDIR(sb.st_mode)) {
    DIR *d = depth > 0 ? opendir(path) : NULL;
    if (!d)
      return err_set(e, ERR_IO, "cannot remove %s: %s", path,
                     depth > 0 ? strerror(errno) : "nested too deep");
    int rc = ERR_OK;
    for (struct dirent *de; rc == ERR_OK && (de = readdir(d));) {
      if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
        continue;
      char sub[2048];
      snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
      rc = rm_tree(sub, depth - 1, e);
    }
    closedir(d);
    if (rc != ERR_OK)
      return rc;
  }
  if (remove(path) != 0)
    return err_set(e, ERR_IO, "cannot remove %s: %s", path, strerror(errno));
  return ERR_OK;
}

/* Whether the registry already maps name to the folder out. */
static int registered_as(queue *q, const char *name, const char *out) {
  pthread_mutex_lock(&q->mu);
  const char *have = q->registered ? json_string_value(json_object_get(q->registered, name)) : NULL;
  const int same = have && strcmp(have, out) == 0 && qmodel_find(q, name);
  pthread_mutex_unlock(&q->mu);
  return same;
}

/* A job that runs again after the daemon died (the same job id, the same folder) may find its
 * earlier run's work on disk: so the folder is written under OUT.partial and renamed into
 * place whole, a leftover .partial or finished folder that was never registered is replaced,
 * and one already registered under the name is taken as done. */
int qmodel_publish(queue *q, const qmodel *src, const model *m, const char *name,
                   const char *job_id, const char *trained_by, err *e) {
  char dir[1200], out[1400], part[1500], cdir[1100];
  snprintf(dir, sizeof dir, "%s/models", q->state_dir);
  snprintf(out, sizeof out, "%s/%s-%s", dir, name, job_id);
  snprintf(part, sizeof part, "%s.partial", out);
  snprintf(cdir, sizeof cdir, "%s/classifier", src->path);
  if (registered_as(q, name, out))
    return ERR_OK;
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "cannot create %s: %s", dir, strerror(errno));
  int rc = rm_tree(part, 4, e);
  if (rc == ERR_OK) {
    const char *meta[] = {"format", "pt", "trained_by", trained_by, "job", job_id};
    rc = adjtask_save_model(m, src->path, src->clf ? cdir : NULL, part, meta, 3, e);
  }
  if (rc == ERR_OK)
    rc = rm_tree(out, 4, e);
  if (rc == ERR_OK && rename(part, out) != 0)
    rc = err_set(e, ERR_IO, "cannot rename %s to %s: %s", part, out, strerror(errno));
  if (rc != ERR_OK)
    return rc;
  if (q->fault_kill_before_register) /* tests only: the process dies with the folder written */
    abort();
  return queue_register_model(q, name, out, e);
}

int queue_model_count(queue *q) {
  pthread_mutex_lock(&q->mu);
  int n = q->nmodels;
  pthread_mutex_unlock(&q->mu);
  return n;
}

int queue_model_get(queue *q, int index, const char *name, queue_model_desc *out) {
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&q->mu);
  qmodel *m = name                               ? qmodel_find(q, name)
              : index >= 0 && index < q->nmodels ? q->models[index]
                                                 : NULL;
  if (!m || !m->m) {
    pthread_mutex_unlock(&q->mu);
    return QUEUE_NOT_FOUND;
  }
  const model_info *mi = model_get_info(m->m);
  snprintf(out->name, sizeof out->name, "%s", m->name);
  snprintf(out->class_name, sizeof out->class_name, "%s", mi->class_name ? mi->class_name : "");
  snprintf(out->prediction_type, sizeof out->prediction_type, "%s",
           mi->prediction_type ? mi->prediction_type : "");
  out->kind = mi->kind;
  out->sample_size = mi->sample_size;
  out->in_channels = mi->in_channels;
  out->out_channels = mi->out_channels;
  out->num_classes = mi->num_classes;
  out->cond_channels = mi->cond_channels;
  out->regression = mi->regression;
  out->num_embeddings = mi->num_embeddings;
  out->null_class = mi->null_class;
  out->num_params = mi->num_params;
  out->latent_factor = mi->latent_factor > 0 ? mi->latent_factor : 1;
  out->image_channels = mi->image_channels > 0 ? mi->image_channels : mi->in_channels;
  const latent_parts *lp = model_latent(m->m);
  if (lp) {
    const latent_info *li = latent_get_info(lp);
    out->text_conditional = 1;
    out->text_layers = li->text_layers;
    out->text_tokens = li->seq_len;
  }
  out->class_labels = m->labels ? json_incref(m->labels) : NULL;
  out->classifier = m->classifier ? json_incref(m->classifier) : NULL;
  snprintf(out->rec_solver, sizeof out->rec_solver, "%s", mi->rec_solver ? mi->rec_solver : "");
  out->rec_steps = mi->rec_steps;
  out->rec_guidance = mi->rec_guidance;
  char path[sizeof m->path];
  snprintf(path, sizeof path, "%s", m->path);
  pthread_mutex_unlock(&q->mu);
  out->solver_data = sampler_data_list(path, NULL); /* files: outside the lock */
  return ERR_OK;
}

void queue_model_desc_clear(queue_model_desc *d) {
  json_decref(d->class_labels);
  json_decref(d->solver_data);
  json_decref(d->classifier);
  d->class_labels = NULL;
  d->solver_data = NULL;
  d->classifier = NULL;
}

/* ---- samplers ---- */

static void setfield(char *field, size_t n, const char *fmt, const char *arg) {
  if (field && n)
    snprintf(field, n, fmt, arg);
}

int queue_make_sampler(queue *q, const queue_spec *s, sampler **out, char *field, size_t fieldlen,
                       err *e) {
  pthread_mutex_lock(&q->mu);
  qmodel *m = qmodel_find(q, s->model);
  if (m)
    m->refs++;
  pthread_mutex_unlock(&q->mu);
  if (!m) {
    setfield(field, fieldlen, "%s", "model");
    return err_set(e, QUEUE_NOT_FOUND, "unknown model '%s'", s->model);
  }
  const pipeline_solver ps = {.name = s->solver,
                              .steps = s->steps,
                              .options = s->options,
                              .data = s->data[0] ? s->data : NULL};
  int rc = pipeline_sampler(m->m, &ps, out, field, fieldlen, e);
  if (rc == ERR_OK && ps.data) { /* the job's class and guidance against the data's */
    const guidance g = {
        .enabled = s->has_guidance, .scale = s->guidance_scale, .null_label = s->null_class};
    if ((rc = pipeline_check_data(m->m, &ps, *out, &g, s->has_label ? &s->label : NULL, 1, e)) !=
        ERR_OK) {
      setfield(field, fieldlen, "%s", "scheduler.data");
      sampler_free(*out);
      *out = NULL;
    }
  }
  pthread_mutex_lock(&q->mu);
  qmodel_unref(m);
  pthread_mutex_unlock(&q->mu);
  return rc;
}
