/* Solver data that lives with a model (MODEL/solver_data/NAME.json and its arrays): names and
 * their files, the listing front ends show, and the check that a run is one the data was
 * computed for (model, schedule, class, guidance scale), so a mismatch is an error rather than a
 * silently wrong image. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sampler_impl.h"

#define MAX_LISTED 256 /* entries a listing reads; a folder is a model's, not a store */

static int ends_with_json(const char *s) {
  const size_t n = strlen(s);
  return n >= 5 && strcmp(s + n - 5, ".json") == 0;
}

int sampler_data_is_name(const char *text) {
  return text && !strchr(text, '/') && !ends_with_json(text);
}

int sampler_data_name_ok(const char *name) {
  const size_t n = name ? strlen(name) : 0;
  if (n < 1 || n > SAMPLER_DATA_NAME_MAX || ends_with_json(name))
    return 0;
  for (size_t i = 0; i < n; i++) {
    const char c = name[i];
    const int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
      return 0;
  }
  return 1;
}

/* "a, b, c" of the names in list (at most n bytes). */
static void name_list(const json_t *list, char *buf, size_t n) {
  size_t i, off = 0;
  json_t *it;
  buf[0] = 0;
  json_array_foreach(list, i, it) {
    const char *name = json_string_value(json_object_get(it, "name"));
    if (off < n)
      off += (size_t)snprintf(buf + off, n - off, "%s%s", i ? ", " : "", name);
  }
}

int sampler_data_path(const char *model_dir, const char *name, char *path, size_t n, err *e) {
  if (!sampler_data_name_ok(name))
    return err_set(e, ERR_INVALID,
                   "'%.80s' is not a solver data name (1 to %d characters of A-Z a-z 0-9 . _ -, "
                   "starting with a letter or digit, no path, no .json)",
                   name ? name : "", SAMPLER_DATA_NAME_MAX);
  if ((size_t)snprintf(path, n, "%s/%s/%s.json", model_dir, SAMPLER_DATA_DIR, name) >= n)
    return err_set(e, ERR_INVALID, "model folder path too long");
  struct stat sb;
  if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode))
    return ERR_OK;
  json_t *list = sampler_data_list(model_dir, NULL);
  char names[1024];
  name_list(list, names, sizeof names);
  json_decref(list);
  return err_set(e, ERR_INVALID, "no solver data named '%s' for this model (%s%s)", name,
                 names[0] ? "it has: " : "it has none; compute some with 'denoised stats --out ",
                 names[0] ? names : "NAME'");
}

/* v or JSON null (a borrowed reference either way, for "O" packing). */
static json_t *or_null(const json_t *v, int ok) {
  return ok ? (json_t *)v : json_null();
}

/* One listing entry from a header, or NULL when the file is not solver data: v3 statistics, or
 * a USF schedule (with what the statistics it names beside it were computed for). */
static json_t *list_entry(const char *name, const char *path) {
  json_t *h = json_load_file(path, 0, NULL), *stats = NULL;
  const char *fmt = json_string_value(json_object_get(h, "format"));
  const int usf = fmt && strcmp(fmt, "denoised-usf-schedule") == 0;
  const int ot = fmt && strcmp(fmt, "denoised-ot-map") == 0;
  if (!fmt || (!usf && !ot && strcmp(fmt, "denoised-v3-stats") != 0)) {
    json_decref(h);
    return NULL;
  }
  const char *sn = json_string_value(json_object_get(h, "statistics"));
  if (usf && sn && !strchr(sn, '/')) {
    char sp[4400];
    const char *slash = strrchr(path, '/');
    snprintf(sp, sizeof sp, "%.*s%s", slash ? (int)(slash - path + 1) : 0, path, sn);
    stats = json_load_file(sp, 0, NULL);
  }
  const json_t *cf = json_object_get(usf ? stats : h, "computed_for");
  const json_t *cl = json_object_get(cf, "class_label"),
               *gs = json_object_get(cf, "guidance_scale");
  const json_t *dp = json_object_get(cf, "data_points"), *v = json_object_get(h, "version");
  const json_t *grid = json_object_get(h, "grid"), *shape = json_object_get(h, "shape");
  json_t *out =
      json_pack("{s:s, s:s, s:O, s:O, s:O, s:O, s:O, s:O}", "name", name, "kind",
                usf  ? "usf-schedule"
                : ot ? "dpm-ot-map"
                     : "dpm-solver-v3-stats",
                "version", or_null(v, json_is_integer(v)), "grid",
                or_null(grid, json_is_integer(grid)), "shape", or_null(shape, json_is_array(shape)),
                "class_label", or_null(cl, json_is_integer(cl)), "guidance_scale",
                or_null(gs, json_is_number(gs)), "data_points", or_null(dp, json_is_integer(dp)));
  if (out && usf)
    json_object_set_new(out, "steps",
                        json_integer((json_int_t)json_array_size(json_object_get(h, "steps"))));
  if (out && ot) {
    json_object_set(out, "steps", json_object_get(json_object_get(h, "solver"), "steps"));
    json_object_set(out, "step", json_object_get(h, "step"));
    json_object_set(out, "targets", json_object_get(h, "targets"));
  }
  json_decref(stats);
  json_decref(h);
  return out;
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

json_t *sampler_data_list(const char *model_dir, err *e) {
  char dir[4096];
  json_t *arr = json_array();
  if (!arr) {
    err_set(e, ERR_NOMEM, "out of memory");
    return NULL;
  }
  if ((size_t)snprintf(dir, sizeof dir, "%s/%s", model_dir, SAMPLER_DATA_DIR) >= sizeof dir)
    return arr;
  DIR *d = opendir(dir);
  if (!d)
    return arr; /* no folder: no data */
  char *names[MAX_LISTED] = {0};
  int n = 0;
  const struct dirent *de;
  while (n < MAX_LISTED && (de = readdir(d)) != NULL) {
    const size_t len = strlen(de->d_name);
    if (!ends_with_json(de->d_name) || len - 5 > SAMPLER_DATA_NAME_MAX)
      continue;
    char stem[SAMPLER_DATA_NAME_MAX + 1];
    snprintf(stem, sizeof stem, "%.*s", (int)(len - 5), de->d_name);
    if (sampler_data_name_ok(stem) && (names[n] = strdup(stem)) != NULL)
      n++;
  }
  closedir(d);
  qsort(names, (size_t)n, sizeof *names, by_name);
  for (int i = 0; i < n; i++) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s.json", dir, names[i]);
    json_t *it = list_entry(names[i], path);
    if (it)
      json_array_append_new(arr, it);
    free(names[i]);
  }
  return arr;
}

/* ---- the check ---- */

static int same(double a, double b) {
  return fabs(a - b) <= 1e-6 * (1 + fabs(a) + fabs(b));
}

static int check_model(const sampler *s, const json_t *rec, const model *m, err *e) {
  const model_info *mi = model_get_info(m);
  const char *dig = json_string_value(json_object_get(rec, "weights_digest"));
  const int size = (int)json_integer_value(json_object_get(rec, "sample_size"));
  const int ch = (int)json_integer_value(json_object_get(rec, "in_channels"));
  const int nc = (int)json_integer_value(json_object_get(rec, "num_classes"));
  if (size != mi->sample_size || ch != mi->in_channels || nc != mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed for a model of %d channels at %dx%d with %d "
                   "classes, not this one (%d channels at %dx%d, %d classes): recompute with "
                   "'denoised stats'",
                   s->data, ch, size, size, nc, mi->in_channels, mi->sample_size, mi->sample_size,
                   mi->num_classes);
  if (!dig || !*dig || strcmp(dig, model_weights_digest(m)) != 0)
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed for other weights (digest %s, this model's "
                   "%s): statistics are per checkpoint; recompute with 'denoised stats'",
                   s->data, dig ? dig : "missing", model_weights_digest(m));
  return ERR_OK;
}

static int check_schedule(const sampler *s, const json_t *rec, err *e) {
  const double lo = json_number_value(json_object_get(rec, "lambda_min"));
  const double hi = json_number_value(json_object_get(rec, "lambda_max"));
  if (!s->lambdas || s->n_lambdas < 1)
    return ERR_OK; /* not a lambda-grid solver: nothing the record could disagree with */
  const double slo = s->lambdas[s->n_lambdas - 1], shi = s->lambdas[0];
  if (!same(lo, slo) || !same(hi, shi))
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed for a schedule with lambda in [%g, %g], the "
                   "run's is [%g, %g]: another noise schedule (or lambda_min_clipped); recompute "
                   "with 'denoised stats'",
                   s->data, lo, hi, slo, shi);
  /* files written before v3 thresholded lack the key: they describe the plain ODE and are
   * accepted either way, as they were */
  const json_t *th = json_object_get(rec, "thresholding");
  if (!th)
    return ERR_OK;
  const int rec_on = json_is_object(th), run_on = s->cfg.thresholding != 0;
  const double r = json_number_value(json_object_get(th, "ratio"));
  const double mv = json_number_value(json_object_get(th, "sample_max_value"));
  if (rec_on != run_on || (run_on && (!same(r, s->cfg.dynamic_thresholding_ratio) ||
                                      !same(mv, s->cfg.sample_max_value))))
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed %s dynamic thresholding (ratio %g, "
                   "sample_max_value %g), the run %s (ratio %g, sample_max_value %g): thresholding "
                   "changes the ODE they describe; recompute with 'denoised stats' under the run's "
                   "scheduler options",
                   s->data, rec_on ? "with" : "without", r, mv, run_on ? "has it" : "has none",
                   s->cfg.dynamic_thresholding_ratio, s->cfg.sample_max_value);
  return ERR_OK;
}

/* The class and the guidance scale of the run against the record's. */
static int check_guidance(const sampler *s, const json_t *rec, const model *m, const guidance *g,
                          const int64_t *labels, int batch, err *e) {
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes)
    return ERR_OK; /* nothing to guide; the model check matched num_classes */
  const json_t *cl = json_object_get(rec, "class_label");
  for (int b = 0; json_is_integer(cl) && b < batch; b++)
    if (!labels || labels[b] != json_integer_value(cl))
      return err_set(e, ERR_INVALID,
                     "statistics file %s was computed for class %lld, the run asks for class "
                     "%lld: use statistics of that class or of all classes",
                     s->data, (long long)json_integer_value(cl),
                     labels ? (long long)labels[b] : -1);
  const double want = json_number_value(json_object_get(rec, "guidance_scale"));
  const double have = g && g->enabled ? g->scale : 1.0;
  if (!same(want, have))
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed at guidance scale %g, the run uses %g: "
                   "statistics are per guidance scale; compute them with 'denoised stats "
                   "--guidance-scale %g'",
                   s->data, want, have, have);
  const json_t *nc = json_object_get(rec, "null_class");
  if (g && g->enabled && g->scale != 1.0 && json_is_integer(nc) &&
      json_integer_value(nc) != g->null_label)
    return err_set(e, ERR_INVALID,
                   "statistics file %s was computed with null class %lld, the run uses %lld",
                   s->data, (long long)json_integer_value(nc), (long long)g->null_label);
  return ERR_OK;
}

/* A DPM-OT map: the model, class and scale its targets came from, and the noise level. */
static int check_ot(const sampler *s, const model *m, const guidance *g, const int64_t *labels,
                    int batch, err *e) {
  const json_t *rec = s->data_for;
  int rc = check_model(s, json_object_get(rec, "model"), m, e);
  if (rc == ERR_OK)
    rc = check_guidance(s, rec, m, g, labels, batch, e);
  const double want = json_number_value(json_object_get(s->ot_header, "alpha_bar"));
  const double have = sampler_ot_abar(s, s->ot->step);
  if (rc == ERR_OK && !same(want, have))
    rc = err_set(e, ERR_INVALID,
                 "transport map %s holds latents at alpha_bar %g, the run's step %d is at %g: "
                 "another noise schedule; refit with 'denoised ot fit'",
                 s->data, want, s->ot->step, have);
  return rc;
}

int sampler_data_check(const sampler *s, const model *m, const guidance *g, const int64_t *labels,
                       int batch, err *e) {
  if (s->ot)
    return check_ot(s, m, g, labels, batch, e);
  /* statistics from a file: v3's own data, or those a USF schedule names (flat ones are built
   * for the run and fit any) */
  if (!s->data || !s->v3 || (s->desc != &solver_dpm_v3 && s->desc != &solver_usf))
    return ERR_OK;
  const json_t *rec = s->data_for;
  if (!rec) /* version 1: trusted where it cannot be wrong by guidance */
    return g && g->enabled && g->scale != 1.0
               ? err_set(e, ERR_INVALID,
                         "statistics file %s (version 1) does not say which guidance scale it "
                         "was computed for, and statistics depend on it: recompute with "
                         "'denoised stats --guidance-scale %g'",
                         s->data, g->scale)
               : ERR_OK;
  int rc = check_model(s, json_object_get(rec, "model"), m, e);
  if (rc == ERR_OK)
    rc = check_schedule(s, json_object_get(rec, "schedule"), e);
  if (rc == ERR_OK)
    rc = check_guidance(s, rec, m, g, labels, batch, e);
  return rc;
}
