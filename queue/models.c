/* The model registry (loaded models with reference counts, replaced while jobs run) and the
 * solver spec of a job turned into a sampler for its model. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ---- models ---- */

void qmodel_unref(qmodel *m) {
  if (m && --m->refs == 0) {
    model_free(m->m);
    json_decref(m->labels);
    json_decref(m->sched);
    free(m);
  }
}

qmodel *qmodel_find(queue *q, const char *name) {
  for (int i = 0; i < q->nmodels; i++)
    if (strcmp(q->models[i]->name, name) == 0)
      return q->models[i];
  return NULL;
}

int queue_set_models(queue *q, const queue_model_conf *models, int n, err *e) {
  qmodel **list = calloc((size_t)(n > 0 ? n : 1), sizeof *list);
  if (!list)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = ERR_OK, got = 0;
  for (int i = 0; i < n && !rc; i++) {
    pthread_mutex_lock(&q->mu);
    qmodel *old = qmodel_find(q, models[i].name);
    if (old && strcmp(old->path, models[i].path) == 0) { /* same folder: keep the loaded copy */
      old->refs++;
      list[got++] = old;
      pthread_mutex_unlock(&q->mu);
      continue;
    }
    pthread_mutex_unlock(&q->mu);
    qmodel *m = calloc(1, sizeof *m);
    if (!m) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
      break;
    }
    snprintf(m->name, sizeof m->name, "%s", models[i].name);
    snprintf(m->path, sizeof m->path, "%s", models[i].path);
    m->refs = 1;
    if ((rc = model_load(m->path, &m->m, e)) != ERR_OK) {
      err_prefix(e, "model '%s' (%s)", m->name, m->path);
      free(m);
      break;
    }
    const model_info *mi = model_get_info(m->m);
    if (mi->class_labels) { /* as JSON, for listings and class names in requests */
      m->labels = json_array();
      for (int k = 0; m->labels && k < mi->n_class_labels; k++)
        json_array_append_new(m->labels, json_string(mi->class_labels[k]));
    }
    const char *sp = model_scheduler_config_path(m->m);
    json_error_t je;
    if (sp && !(m->sched = json_load_file(sp, 0, &je))) {
      rc = err_set(e, ERR_FORMAT, "model '%s': %s:%d: %s", m->name, sp, je.line, je.text);
      qmodel_unref(m);
      break;
    }
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
  return rc;
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
  out->null_class = mi->null_class;
  out->num_params = mi->num_params;
  out->class_labels = m->labels ? json_incref(m->labels) : NULL;
  pthread_mutex_unlock(&q->mu);
  return ERR_OK;
}

void queue_model_desc_clear(queue_model_desc *d) {
  json_decref(d->class_labels);
  d->class_labels = NULL;
}

/* ---- samplers ---- */

static void setfield(char *field, size_t n, const char *fmt, const char *arg) {
  if (field && n)
    snprintf(field, n, fmt, arg);
}

static int try_spec(const qmodel *qm, const queue_spec *s, const char *only_key, sampler **out,
                    err *e) {
  json_t *spec = json_pack("{s:s, s:i}", "name", s->solver, "steps", s->steps);
  if (!spec)
    return err_set(e, ERR_NOMEM, "out of memory");
  if (only_key)
    json_object_set_new(spec, "options",
                        json_pack("{s:O}", only_key, json_object_get(s->options, only_key)));
  else if (s->options)
    json_object_set(spec, "options", s->options);
  int rc = sampler_new_from_json(spec, qm->sched, out, e);
  json_decref(spec);
  return rc;
}

/* The one place a job's scheduler block becomes a solver: the engine's sampler_new_from_json
 * with {name, steps, options} over the model's scheduler_config.json. When it refuses, the
 * options are tried one by one to name the key at fault. */
int qmodel_sampler(const qmodel *qm, const queue_spec *s, sampler **out, char *field, size_t fl,
                   err *e) {
  if (!sampler_solver_class(s->solver)) {
    setfield(field, fl, "%s", "scheduler.name");
    return err_set(e, ERR_INVALID, "unknown solver '%s'", s->solver);
  }
  int rc = try_spec(qm, s, NULL, out, e);
  if (rc == ERR_OK) {
    const model_info *mi = model_get_info(qm->m);
    const sched_config *cfg = sampler_config(*out);
    const char *pred = sched_prediction_name(cfg->prediction_type); /* a static string */
    if (mi->prediction_type && strcmp(mi->prediction_type, pred) != 0) {
      sampler_free(*out);
      *out = NULL;
      setfield(field, fl, "%s", "scheduler.options.prediction_type");
      return err_set(e, ERR_INVALID, "the model predicts '%s', not '%s'", mi->prediction_type,
                     pred);
    }
    return ERR_OK;
  }
  if (rc == ERR_NOMEM)
    return rc;
  const char *key;
  json_t *v;
  json_object_foreach(s->options, key, v) {
    sampler *one = NULL;
    err e1 = {0};
    if (try_spec(qm, s, key, &one, &e1) != ERR_OK) {
      setfield(field, fl, "scheduler.options.%s", key);
      *e = e1;
      return e1.code;
    }
    sampler_free(one);
  }
  queue_spec bare = *s;
  bare.options = NULL;
  sampler *one = NULL;
  err e1 = {0};
  if (try_spec(qm, &bare, NULL, &one, &e1) != ERR_OK) {
    setfield(field, fl, "%s", strstr(e1.msg, "steps") ? "scheduler.steps" : "scheduler");
    *e = e1;
    return e1.code;
  }
  sampler_free(one);
  setfield(field, fl, "%s", "scheduler.options"); /* keys fine alone, not together */
  return rc;
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
  int rc = qmodel_sampler(m, s, out, field, fieldlen, e);
  pthread_mutex_lock(&q->mu);
  qmodel_unref(m);
  pthread_mutex_unlock(&q->mu);
  return rc;
}
