/* USF, the unified sampling framework of the S^3 paper (Liu et al., arXiv 2312.07243): runs a
 * solver schedule, a file holding every decision of every step (timestep, prediction type,
 * starting point, order, how each derivative is estimated and relaxed, corrector, first step),
 * with the semantics of the authors' executor (thu-nics/USF @5b89ef5, uni_sampler.sample and
 * update). The schedule is outside input: it is validated on load, each error naming the step and
 * the key, and nothing that reaches the arithmetic is left unchecked. Arithmetic in double. */

/* Where this follows the authors' code rather than the paper, and why (also in the README):
 * - the corrector redoes the step with the fresh evaluation but keeps that evaluation (no second
 *   network call): that is what the released code does for every corrector type, because its
 *   "implicit" test compares a dict with a string and never fires, and the released schedules
 *   were searched with that behaviour. Our type "pseudo" is that. Our type "implicit" is the
 *   paper's: after the correction the model is evaluated again at the corrected point (+1 NFE,
 *   except on the last step, where the code's intent also skips it). tools/usf_convert.py maps
 *   the authors' "implicit" to "pseudo", so a converted schedule runs as it was searched.
 * - v3-type steps round each point to the nearest statistics grid index for l and the prefix
 *   integrals, while alpha, sigma and the lambdas of the derivative estimates stay unsnapped.
 * - empirical relaxations of data-prediction steps use -h, linear ones +h, as the code does.
 * - the corrector's default points do not force the new point in (the code passes
 *   corrector=False); a default starting at -2 reaches it anyway.
 * Deviations: timesteps are lambdas (or the engine's continuous time t) on the engine's schedule;
 * a schedule that would make the code fail (a point that does not exist yet, too few points for
 * an estimate, the corrector starting at the new point) is refused at load instead; the authors'
 * skip_coefficients (UNet skip scaling) are refused unless all 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "mem.h"
#include "sampler_impl.h"

#define USF_MAX_ORDER 4 /* the framework's Taylor orders */
#define USF_MAX_EST 6   /* points in one derivative estimate */
#define USF_MAX_STEPS 1000
#define USF_MAX_COEF 100.0   /* |linear relaxation coefficient| */
#define USF_MAX_X0 1e4       /* |average_x0| values */
#define USF_MAX_BATCH 100000 /* labels per evaluation */
#define USF_MIN_DLAM 1e-5    /* the smallest lambda step */

enum { PRED_NOISE, PRED_DATA, PRED_V3 };
enum { RELAX_NONE, RELAX_LINEAR, RELAX_DPM2, RELAX_BH1, RELAX_BH2, RELAX_PEXP, RELAX_MEXP };
enum { CORR_NONE, CORR_PSEUDO, CORR_IMPLICIT };
enum { FIRST_MODEL, FIRST_ZERO_X0, FIRST_AVERAGE_X0 };

static const char *const pred_names[] = {"noise", "data", "v3", NULL};
static const char *const relax_names[] = {"none",      "linear", "dpmsolver-2", "unipc-bh1",
                                          "unipc-bh2", "0.5exp", "-0.5exp",     NULL};
static const char *const corr_names[] = {"none", "pseudo", "implicit", NULL};
static const char *const first_names[] = {"model", "zero_x0", "average_x0", NULL};

typedef struct usf_deriv {
  int n;                /* points of the estimate (the code's Difference_n) */
  int pts[USF_MAX_EST]; /* their offsets, -1 = newest */
  int relax;
  double coef; /* linear relaxation: the derivative times 1 + coef h */
} usf_deriv;

typedef struct usf_update {
  int order, start;
  usf_deriv der[USF_MAX_ORDER - 1]; /* derivative i + 1 */
} usf_update;

typedef struct usf_step {
  int pred, corr;
  usf_update p, c; /* predictor, corrector */
} usf_step;

typedef struct usf_schedule {
  int steps;
  int time_is_t; /* timesteps are the engine's continuous time t, else lambda */
  double *time;  /* steps + 1 values as given */
  double *lam;   /* steps + 1 lambdas (prepare) */
  usf_step *st;
  int first;
  float *avg; /* average_x0: n_avg values (1 or C*H*W) */
  size_t n_avg;
  int depth; /* the deepest point any update reads */
  int has_v3;
  int nfe;
} usf_schedule;

void sampler_usf_free(usf_schedule *u) {
  if (!u)
    return;
  free(u->time);
  free(u->lam);
  free(u->st);
  free(u->avg);
  free(u);
}

/* ---- loading ---- */

typedef struct pctx {
  const char *file;
  err *e;
} pctx;

static int bad(const pctx *p, const char *where, const char *fmt, const char *what) {
  return err_set(p->e, ERR_INVALID, "USF schedule %s: %s: %s%s", p->file, where, fmt, what);
}

static int check_keys(const pctx *p, const json_t *o, const char *where,
                      const char *const *allowed) {
  if (!json_is_object(o))
    return bad(p, where, "expected a JSON object", "");
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)o, key, v) {
    int ok = 0;
    for (int i = 0; allowed[i] && !ok; i++)
      ok = strcmp(allowed[i], key) == 0;
    if (!ok)
      return err_set(p->e, ERR_INVALID, "USF schedule %s: %s: unknown key '%s'", p->file, where,
                     key);
  }
  return ERR_OK;
}

/* An integer key in [lo, hi]; absent gives def, or is an error if required. */
static int get_int(const pctx *p, const json_t *o, const char *key, const char *where, int lo,
                   int hi, int required, int def, int *out) {
  const json_t *v = json_object_get(o, key);
  if (!v) {
    if (required)
      return err_set(p->e, ERR_INVALID, "USF schedule %s: %s: '%s' is required", p->file, where,
                     key);
    *out = def;
    return ERR_OK;
  }
  if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
    return err_set(p->e, ERR_INVALID, "USF schedule %s: %s.%s: expected an integer in [%d, %d]",
                   p->file, where, key, lo, hi);
  *out = (int)json_integer_value(v);
  return ERR_OK;
}

/* A string key from names (absent: def). */
static int get_enum(const pctx *p, const json_t *o, const char *key, const char *where,
                    const char *const *names, int def, int *out) {
  const json_t *v = json_object_get(o, key);
  *out = def;
  if (!v || json_is_null(v))
    return ERR_OK;
  for (int i = 0; json_is_string(v) && names[i]; i++)
    if (strcmp(names[i], json_string_value(v)) == 0) {
      *out = i;
      return ERR_OK;
    }
  char list[256] = "";
  for (int i = 0; names[i]; i++)
    snprintf(list + strlen(list), sizeof list - strlen(list), "%s\"%s\"", i ? ", " : "", names[i]);
  return err_set(p->e, ERR_INVALID, "USF schedule %s: %s.%s: expected one of %s", p->file, where,
                 key, list);
}

/* The code's default points for an estimate of n points around start (get_diff_derivative,
 * method "single"): the later points from start + 1 up to -1, then earlier ones from start - 1
 * down; avail points exist (-1 .. -avail). Returns 0 if there are not enough. */
static int default_points(int start, int n, int avail, int *pts) {
  int k = 0;
  for (int r = start + 1; r <= -1 && k < n; r++)
    pts[k++] = r;
  for (int l = start - 1; l >= -avail && k < n; l--)
    pts[k++] = l;
  return k == n;
}

static int parse_deriv(const pctx *p, const json_t *o, const char *where, int i, int order,
                       int start, int avail, usf_deriv *d) {
  static const char *const keys[] = {"estimate", "points", "relaxation", "coefficient", NULL};
  int rc;
  if ((rc = check_keys(p, o, where, keys)) != ERR_OK)
    return rc;
  const int hi = avail - 1 < USF_MAX_EST ? avail - 1 : USF_MAX_EST;
  if (hi < i)
    return err_set(p->e, ERR_INVALID,
                   "USF schedule %s: %s: derivative %d needs %d earlier points besides the start, "
                   "and only %d exist at this step",
                   p->file, where, i, i, avail - 1);
  /* the code's default estimate for every derivative: order - 1 points */
  if ((rc = get_int(p, o, "estimate", where, i, hi, 0, order - 1, &d->n)) != ERR_OK)
    return rc;
  const json_t *pts = json_object_get(o, "points");
  if (pts && !json_is_null(pts)) {
    if (!json_is_array(pts) || json_array_size(pts) != (size_t)d->n)
      return err_set(p->e, ERR_INVALID,
                     "USF schedule %s: %s.points: expected an array of %d point offsets (the "
                     "estimate)",
                     p->file, where, d->n);
    for (int k = 0; k < d->n; k++) {
      const json_t *v = json_array_get(pts, (size_t)k);
      const json_int_t q = json_is_integer(v) ? json_integer_value(v) : 0;
      if (!json_is_integer(v) || q < -avail || q > -1 || q == start)
        return err_set(p->e, ERR_INVALID,
                       "USF schedule %s: %s.points[%d]: expected an offset in [%d, -1] other "
                       "than the start point %d",
                       p->file, where, k, -avail, start);
      d->pts[k] = (int)q;
      for (int j = 0; j < k; j++)
        if (d->pts[j] == d->pts[k])
          return err_set(p->e, ERR_INVALID, "USF schedule %s: %s.points[%d]: %d appears twice",
                         p->file, where, k, d->pts[k]);
    }
  } else if (!default_points(start, d->n, avail, d->pts)) {
    return err_set(p->e, ERR_INVALID,
                   "USF schedule %s: %s: not enough points for an estimate of %d around %d",
                   p->file, where, d->n, start);
  }
  if ((rc = get_enum(p, o, "relaxation", where, relax_names, RELAX_NONE, &d->relax)) != ERR_OK)
    return rc;
  if (i > 1 && d->relax != RELAX_NONE)
    return bad(p, where, "only the first derivative can be relaxed", "");
  const json_t *c = json_object_get(o, "coefficient");
  d->coef = 0;
  if (c && d->relax != RELAX_LINEAR)
    return bad(p, where, "'coefficient' goes with relaxation \"linear\" only", "");
  if (c && (!json_is_number(c) || !isfinite(json_number_value(c)) ||
            fabs(json_number_value(c)) > USF_MAX_COEF))
    return err_set(p->e, ERR_INVALID,
                   "USF schedule %s: %s.coefficient: expected a finite number in [-%g, %g]",
                   p->file, where, USF_MAX_COEF, USF_MAX_COEF);
  if (c)
    d->coef = json_number_value(c);
  return ERR_OK;
}

/* A predictor (corr 0) or corrector (corr 1) update where avail points exist. */
static int parse_update(const pctx *p, const json_t *o, const char *where, int avail, int corr,
                        usf_update *u, int *depth) {
  int rc;
  /* a corrector starts before the new point (at it, h would be 0) */
  if ((rc = get_int(p, o, "order", where, 1, USF_MAX_ORDER, 1, 0, &u->order)) != ERR_OK ||
      (rc = get_int(p, o, "start_point", where, -avail, corr ? -2 : -1, corr, -1, &u->start)) !=
          ERR_OK)
    return rc;
  *depth = -u->start > *depth ? -u->start : *depth;
  const json_t *ds = json_object_get(o, "derivatives");
  if (ds && !json_is_null(ds) &&
      (!json_is_array(ds) || json_array_size(ds) != (size_t)(u->order - 1)))
    return err_set(p->e, ERR_INVALID,
                   "USF schedule %s: %s.derivatives: expected an array of %d (order - 1) objects",
                   p->file, where, u->order - 1);
  for (int i = 1; i < u->order; i++) {
    char w[160];
    snprintf(w, sizeof w, "%s.derivatives[%d]", where, i - 1);
    const json_t *d = ds && !json_is_null(ds) ? json_array_get(ds, (size_t)(i - 1)) : NULL;
    json_t *dflt = NULL;
    if (!d) /* the code's default: default points, no relaxation */
      d = dflt = json_object();
    if (!d)
      return err_set(p->e, ERR_NOMEM, "out of memory");
    rc = parse_deriv(p, d, w, i, u->order, u->start, avail, &u->der[i - 1]);
    json_decref(dflt);
    if (rc != ERR_OK)
      return rc;
    for (int k = 0; k < u->der[i - 1].n; k++)
      *depth = -u->der[i - 1].pts[k] > *depth ? -u->der[i - 1].pts[k] : *depth;
  }
  return ERR_OK;
}

static int parse_step(const pctx *p, const json_t *o, int k, usf_schedule *u) {
  static const char *const keys[] = {"prediction",  "order",     "start_point",
                                     "derivatives", "corrector", NULL};
  static const char *const ckeys[] = {"type", "order", "start_point", "derivatives", NULL};
  char w[64], cw[80];
  snprintf(w, sizeof w, "steps[%d]", k);
  usf_step *s = &u->st[k];
  int rc;
  if ((rc = check_keys(p, o, w, keys)) != ERR_OK ||
      (rc = get_enum(p, o, "prediction", w, pred_names, -1, &s->pred)) != ERR_OK)
    return rc;
  if (s->pred < 0)
    return bad(p, w, "'prediction' is required (\"noise\", \"data\" or \"v3\")", "");
  u->has_v3 |= s->pred == PRED_V3;
  /* before step k there are k + 1 points; its corrector also sees the new one */
  if ((rc = parse_update(p, o, w, k + 1, 0, &s->p, &u->depth)) != ERR_OK)
    return rc;
  const json_t *c = json_object_get(o, "corrector");
  s->corr = CORR_NONE;
  if (!c || json_is_null(c))
    return ERR_OK;
  snprintf(cw, sizeof cw, "%s.corrector", w);
  if ((rc = check_keys(p, c, cw, ckeys)) != ERR_OK ||
      (rc = get_enum(p, c, "type", cw, corr_names, -1, &s->corr)) != ERR_OK)
    return rc;
  if (s->corr < 0)
    return bad(p, cw, "'type' is required (\"none\", \"pseudo\" or \"implicit\")", "");
  if (s->corr == CORR_NONE) {
    if (json_object_size(c) != 1)
      return bad(p, cw, "a corrector of type \"none\" takes no other keys", "");
    return ERR_OK;
  }
  return parse_update(p, c, cw, k + 2, 1, &s->c, &u->depth);
}

static int parse_numbers(const pctx *p, const json_t *a, const char *key, double lim, double *out,
                         size_t n) {
  for (size_t i = 0; i < n; i++) {
    const json_t *v = json_array_get(a, i);
    if (!json_is_number(v) || !isfinite(json_number_value(v)) || fabs(json_number_value(v)) > lim)
      return err_set(p->e, ERR_INVALID,
                     "USF schedule %s: %s[%zu]: expected a finite number in [-%g, %g]", p->file,
                     key, i, lim, lim);
    out[i] = json_number_value(v);
  }
  return ERR_OK;
}

/* The v3 statistics a schedule names: a file beside it. */
static int attach_stats(sampler *s, const pctx *p, const json_t *h) {
  const json_t *sv = json_object_get(h, "statistics");
  if (!sv || json_is_null(sv))
    return ERR_OK;
  const char *name = json_is_string(sv) ? json_string_value(sv) : NULL;
  if (!name || !*name || strchr(name, '/') || strcmp(name, "..") == 0)
    return bad(p, "statistics",
               "expected the name of a DPM-Solver-v3 statistics file beside the "
               "schedule",
               "");
  char path[4096];
  const char *slash = strrchr(p->file, '/');
  const int dir = slash ? (int)(slash - p->file + 1) : 0;
  if (snprintf(path, sizeof path, "%.*s%s", dir, p->file, name) >= (int)sizeof path)
    return bad(p, "statistics", "path too long", "");
  int rc = sampler_v3_attach(s, path, p->e);
  if (rc != ERR_OK)
    err_prefix(p->e, "USF schedule %s", p->file);
  return rc;
}

static int parse_schedule(sampler *s, const pctx *p, const json_t *h, usf_schedule *u) {
  static const char *const keys[] = {"format",     "version",           "time",  "timesteps",
                                     "first_step", "average_x0",        "steps", "statistics",
                                     "source",     "skip_coefficients", NULL};
  int rc;
  if ((rc = check_keys(p, h, "top level", keys)) != ERR_OK)
    return rc;
  const json_t *fmt = json_object_get(h, "format"), *ver = json_object_get(h, "version");
  if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "denoised-usf-schedule") != 0 ||
      !json_is_integer(ver) || json_integer_value(ver) != 1)
    return bad(p, "top level",
               "not a USF schedule (expected format \"denoised-usf-schedule\", version 1)", "");
  static const char *const units[] = {"lambda", "t", NULL};
  if ((rc = get_enum(p, h, "time", "top level", units, -1, &u->time_is_t)) != ERR_OK)
    return rc;
  if (u->time_is_t < 0)
    return bad(p, "top level", "'time' is required (\"lambda\" or \"t\")", "");
  const json_t *steps = json_object_get(h, "steps"), *ts = json_object_get(h, "timesteps");
  if (!json_is_array(steps) || json_array_size(steps) < 1 || json_array_size(steps) > USF_MAX_STEPS)
    return err_set(p->e, ERR_INVALID, "USF schedule %s: steps: expected an array of 1 to %d steps",
                   p->file, USF_MAX_STEPS);
  u->steps = (int)json_array_size(steps);
  if (!json_is_array(ts) || json_array_size(ts) != (size_t)u->steps + 1)
    return err_set(p->e, ERR_INVALID,
                   "USF schedule %s: timesteps: expected %d values (the start and one per step)",
                   p->file, u->steps + 1);
  u->time = mem_malloc((size_t)(u->steps + 1) * sizeof *u->time);
  u->lam = mem_malloc((size_t)(u->steps + 1) * sizeof *u->lam);
  u->st = mem_calloc((size_t)u->steps, sizeof *u->st);
  if (!u->time || !u->lam || !u->st)
    return err_set(p->e, ERR_NOMEM, "out of memory");
  if ((rc = parse_numbers(p, ts, "timesteps", 1e6, u->time, (size_t)u->steps + 1)) != ERR_OK)
    return rc;
  u->depth = 1;
  for (int k = 0; k < u->steps; k++)
    if ((rc = parse_step(p, json_array_get(steps, (size_t)k), k, u)) != ERR_OK)
      return rc;
  if ((rc = get_enum(p, h, "first_step", "top level", first_names, FIRST_MODEL, &u->first)) !=
      ERR_OK)
    return rc;
  const json_t *avg = json_object_get(h, "average_x0");
  if ((u->first == FIRST_AVERAGE_X0) != (avg && !json_is_null(avg)))
    return bad(p, "average_x0", "is given exactly when first_step is \"average_x0\"", "");
  if (avg && !json_is_null(avg)) {
    if (!json_is_array(avg) || json_array_size(avg) < 1 || json_array_size(avg) > (1u << 26))
      return bad(p, "average_x0", "expected an array of C*H*W numbers (or one)", "");
    u->n_avg = json_array_size(avg);
    double *tmp = mem_malloc(u->n_avg * sizeof *tmp);
    u->avg = mem_malloc(u->n_avg * sizeof *u->avg);
    if (!tmp || !u->avg) {
      free(tmp);
      return err_set(p->e, ERR_NOMEM, "out of memory");
    }
    rc = parse_numbers(p, avg, "average_x0", USF_MAX_X0, tmp, u->n_avg);
    for (size_t i = 0; rc == ERR_OK && i < u->n_avg; i++)
      u->avg[i] = (float)tmp[i];
    free(tmp);
    if (rc != ERR_OK)
      return rc;
  }
  const json_t *sk = json_object_get(h, "skip_coefficients");
  if (sk && !json_is_null(sk) && !json_is_array(sk))
    return bad(p, "skip_coefficients", "expected an array of numbers", "");
  for (size_t i = 0; sk && i < json_array_size(sk); i++)
    if (json_number_value(json_array_get(sk, i)) != 1.0)
      return bad(p, "skip_coefficients",
                 "scaling the UNet's skip connections is not supported (only all 1)", "");
  if (u->has_v3 && !json_object_get(h, "statistics"))
    return bad(p, "statistics",
               "v3-type steps need DPM-Solver-v3 statistics (a file beside the schedule)", "");
  if ((rc = attach_stats(s, p, h)) != ERR_OK)
    return rc;
  /* evaluations: the first point (unless analytic), one per step but the last, the last only
   * for its corrector, one more per paper-style implicit corrector before the last */
  u->nfe = u->first == FIRST_MODEL;
  for (int k = 0; k < u->steps; k++)
    u->nfe += (k < u->steps - 1 || u->st[k].corr != CORR_NONE) +
              (k < u->steps - 1 && u->st[k].corr == CORR_IMPLICIT);
  return ERR_OK;
}

int sampler_usf_attach(sampler *s, const char *path, err *e) {
  json_error_t je;
  json_t *h = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!h)
    return je.line > 0
               ? err_set(e, ERR_INVALID, "USF schedule %s: %s (line %d)", path, je.text, je.line)
               : err_set(e, ERR_IO, "USF schedule %s: %s", path, je.text);
  usf_schedule *u = mem_calloc(1, sizeof *u);
  const pctx p = {path, e};
  int rc = u ? parse_schedule(s, &p, h, u) : err_set(e, ERR_NOMEM, "out of memory");
  json_decref(h);
  if (rc != ERR_OK) {
    sampler_usf_free(u);
    return rc;
  }
  sampler_usf_free(s->usf);
  s->usf = u;
  return ERR_OK;
}

/* ---- plan ---- */

static int usf_prepare(sampler *s, err *e) {
  usf_schedule *u = s->usf;
  if (!u)
    return err_set(e, ERR_INVALID,
                   "usf needs a solver schedule: --solver-data FILE (spec key 'data')");
  if (s->n != 0 && s->n != u->steps)
    return err_set(e, ERR_INVALID,
                   "the USF schedule has %d steps; steps %d contradicts it (leave steps out)",
                   u->steps, s->n);
  if (u->steps > s->T)
    return err_set(e, ERR_INVALID,
                   "the USF schedule has %d steps, more than the %d training "
                   "timesteps",
                   u->steps, s->T);
  s->n = u->steps;
  int rc = paper_lam_table(s, e);
  if (rc != ERR_OK)
    return rc;
  const double lo = s->lambdas[s->n_lambdas - 1], hi = s->lambdas[0];
  const double tmax = paper_t_of(s, s->n_lambdas - 1), tmin = paper_t_of(s, 0);
  for (int k = 0; k <= u->steps; k++) {
    const double v = u->time[k];
    if (u->time_is_t ? !(v >= tmin && v <= tmax) : !(v >= lo && v <= hi))
      return err_set(e, ERR_INVALID,
                     "USF schedule: timesteps[%d] = %g is outside the model schedule's %s range "
                     "[%g, %g]",
                     k, v, u->time_is_t ? "t" : "lambda", u->time_is_t ? tmin : lo,
                     u->time_is_t ? tmax : hi);
    u->lam[k] = u->time_is_t ? paper_lam_at(s, paper_u_of_t(s, v)) : v;
    /* a smaller step leaves the relaxations' e^h - 1 - h at rounding level (0/0) */
    if (k > 0 && !(u->lam[k] >= u->lam[k - 1] + USF_MIN_DLAM))
      return err_set(e, ERR_INVALID,
                     "USF schedule: timesteps[%d]: lambda must increase (t decrease) from step to "
                     "step by at least %g (%.17g after %.17g)",
                     k, USF_MIN_DLAM, u->lam[k], u->lam[k - 1]);
  }
  if (u->has_v3) {
    const v3_stats *st = s->v3;
    const double tol = 1e-6 * (1 + fabs(st->lam_T) + fabs(st->lam_0));
    if (u->lam[0] < st->lam_T - tol || u->lam[u->steps] > st->lam_0 + tol)
      return err_set(e, ERR_INVALID,
                     "USF schedule: the timesteps span lambda [%g, %g], outside the v3 "
                     "statistics' [%g, %g]",
                     u->lam[0], u->lam[u->steps], st->lam_T, st->lam_0);
  }
  if ((rc = sampler_plan(s, u->nfe, 0, e)) != ERR_OK)
    return rc;
  int j = 0;
  if (u->first == FIRST_MODEL)
    s->tm[j++] = paper_u_of_lam(s, u->lam[0]);
  for (int k = 0; k < u->steps; k++) {
    const int evals = (k < u->steps - 1 || u->st[k].corr != CORR_NONE) +
                      (k < u->steps - 1 && u->st[k].corr == CORR_IMPLICIT);
    for (int q = 0; q < evals; q++) {
      s->step_end[j] = 1;
      s->tm[j++] = paper_u_of_lam(s, u->lam[k + 1]);
    }
  }
  return ERR_OK;
}

/* ---- run ---- */

typedef struct upt {
  double *x, *eps, *x0, *f; /* nd each; f for v3-type steps only */
  double lam;
  int idx; /* v3: the nearest statistics grid index */
} upt;

typedef struct uctx {
  const sampler *s;
  const usf_schedule *u;
  const v3_stats *st;
  run_ctx *r;
  size_t d, nd;
  upt **ring; /* np points, newest last */
  int np, cap;
  float *xf, *of;
  float *sel;  /* d scratch for thresholding */
  double *lab; /* batch model labels */
} uctx;

static double log_alpha(double lam) {
  return -0.5 * log1p(exp(-2 * lam));
}

static double alpha_of(double lam) {
  return exp(log_alpha(lam));
}

static int grid_index(const v3_stats *st, double lam) {
  const double k = round(st->K * (lam - st->lam_T) / (st->lam_0 - st->lam_T));
  return k < 0 ? 0 : k > st->K ? st->K : (int)k;
}

/* The point at offset k (-1 = newest). */
static upt *at(const uctx *c, int k) {
  return c->ring[c->np + k];
}

/* Fills eps, x0 (and f) of P from its x: the model's (analytic = FIRST_*) prediction. */
static int fill_point(uctx *c, int step, upt *P, int first, err *e) {
  const sampler *s = c->s;
  const double al = alpha_of(P->lam), sg = al * exp(-P->lam);
  const size_t nd = c->nd, d = c->d;
  if (first == FIRST_MODEL) {
    const int B = sampler_run_batch(c->r);
    const double lab = paper_u_of_lam(s, P->lam);
    for (int b = 0; b < B; b++)
      c->lab[b] = lab;
    for (size_t j = 0; j < nd; j++)
      c->xf[j] = (float)P->x[j];
    int rc = sampler_eval_rows(c->r, step, c->xf, B, NULL, c->lab, c->of, e);
    if (rc != ERR_OK)
      return rc;
  }
  const usf_schedule *u = c->u;
  const int thr = first == FIRST_MODEL && s->cfg.thresholding;
  if (thr) {
    /* as v3 does where the model's config asks (sampler_threshold_eps); of is spent after */
    for (size_t j = 0; j < nd; j++) {
      double o = c->of[j];
      if (s->cfg.prediction_type == SCHED_PRED_SAMPLE)
        o = (P->x[j] - al * o) / sg;
      else if (s->cfg.prediction_type == SCHED_PRED_V)
        o = al * o + sg * P->x[j];
      P->eps[j] = o;
    }
    sampler_threshold_eps(&s->cfg, d, nd, P->x, P->lam, c->of, c->sel, P->eps);
  }
  for (size_t j = 0; j < nd; j++) {
    double o;
    if (thr) {
      o = P->eps[j];
    } else if (first == FIRST_ZERO_X0) {
      o = P->x[j]; /* the code's analytic first step: eps = x_T */
    } else if (first == FIRST_AVERAGE_X0) {
      const double a = u->avg[u->n_avg == 1 ? 0 : j % d];
      o = (P->x[j] - al * a) / sg;
    } else {
      o = c->of[j];
      if (s->cfg.prediction_type == SCHED_PRED_SAMPLE)
        o = (P->x[j] - al * o) / sg;
      else if (s->cfg.prediction_type == SCHED_PRED_V)
        o = al * o + sg * P->x[j];
    }
    P->eps[j] = o;
    P->x0[j] =
        first == FIRST_AVERAGE_X0 ? u->avg[u->n_avg == 1 ? 0 : j % d] : (P->x[j] - sg * o) / al;
    if (P->f) {
      const v3_stats *st = c->st;
      const double l = st->l[(size_t)P->idx * st->dd + (st->dd == 1 ? 0 : j % d)];
      P->f[j] = (sg * o - l * P->x[j]) / al;
    }
  }
  return ERR_OK;
}

/* Weights a with derivative i = sum_k a_k (M_k - M_start): sum_k a_k dh_k^j / j! = [j == i]
 * for j = 1..n (the code's Taylor system), by Gaussian elimination with partial pivoting. */
static void deriv_weights(const uctx *c, const usf_deriv *dv, int i, double lam_s, double *a) {
  const int n = dv->n;
  double M[USF_MAX_EST][USF_MAX_EST + 1];
  for (int j = 0; j < n; j++) {
    double fac = 1;
    for (int q = 2; q <= j + 1; q++)
      fac *= q;
    for (int k = 0; k < n; k++)
      M[j][k] = pow(at(c, dv->pts[k])->lam - lam_s, j + 1) / fac;
    M[j][n] = j + 1 == i;
  }
  for (int col = 0; col < n; col++) {
    int piv = col;
    for (int r = col + 1; r < n; r++)
      piv = fabs(M[r][col]) > fabs(M[piv][col]) ? r : piv;
    for (int m = 0; m <= n; m++) {
      const double t = M[col][m];
      M[col][m] = M[piv][m];
      M[piv][m] = t;
    }
    for (int r = col + 1; r < n; r++) {
      const double f = M[r][col] / M[col][col];
      for (int m = col; m <= n; m++)
        M[r][m] -= f * M[col][m];
    }
  }
  for (int r = n - 1; r >= 0; r--) {
    double v = M[r][n];
    for (int m = r + 1; m < n; m++)
      v -= M[r][m] * a[m];
    a[r] = v / M[r][r];
  }
}

/* relax_derivative: the factor on the first derivative; hr is -h for empirical relaxations of
 * data-prediction steps, as in the code. */
static double relax_factor(const usf_deriv *dv, double h, double hr) {
  const double em = expm1(hr);
  switch (dv->relax) {
  case RELAX_LINEAR: return 1 + dv->coef * h;
  case RELAX_DPM2:
  case RELAX_BH2: return 0.5 * hr * em / (em - hr);
  case RELAX_BH1: return 0.5 * hr * hr / (em - hr);
  case RELAX_PEXP: return 1 + 0.5 * em;
  case RELAX_MEXP: return 1 - 0.5 * em;
  default: return 1;
  }
}

/* The value of the step's model list at point P, element j: eps, x0, or v3's g relative to the
 * start point S (g = e^{S_s - S_k} f_k - e^{S_s} (B_k - B_s)). */
static double mval(const uctx *c, int pred, const upt *P, const upt *S, size_t j) {
  if (pred == PRED_NOISE)
    return P->eps[j];
  if (pred == PRED_DATA)
    return P->x0[j];
  const v3_stats *st = c->st;
  const size_t p = st->dd == 1 ? 0 : j % c->d, ps = (size_t)S->idx * st->dd + p,
               pk = (size_t)P->idx * st->dd + p;
  return exp(st->S[ps] - st->S[pk]) * P->f[j] - exp(st->S[ps]) * (st->B[pk] - st->B[ps]);
}

/* The trapezoid E_m = int e^{(L+S) - (L+S)_s} (lam - lam_s)^m / m! from grid index is to it,
 * dimension p (compute_exponential_coefficients_high_order). */
static double v3_E(const v3_stats *st, int is, int it, int m, size_t p) {
  double fm = 1, acc = 0, prev = 0;
  for (int q = 2; q <= m; q++)
    fm *= q;
  const double a0 = st->L[(size_t)is * st->dd + p] + st->S[(size_t)is * st->dd + p];
  for (int k = is; k <= it; k++) {
    const size_t q = (size_t)k * st->dd + p;
    const double v = exp(st->L[q] + st->S[q] - a0) * pow(st->lam[k] - st->lam[is], m) / fm;
    if (k > is)
      acc += 0.5 * (st->lam[k] - st->lam[k - 1]) * (v + prev);
    prev = v;
  }
  return acc;
}

/* One update (the code's `update`) from the points in the ring to lambda lt: out = x_t. */
static void apply(const uctx *c, const usf_update *up, int pred, double lt, double *out) {
  const upt *S = at(c, up->start);
  const double h = lt - S->lam;
  const double at_ = alpha_of(lt), st_ = at_ * exp(-lt), as = alpha_of(S->lam),
               ss = as * exp(-S->lam);
  const int n = up->order - 1;
  double w[USF_MAX_ORDER - 1][USF_MAX_EST], coef[USF_MAX_ORDER - 1];
  /* phi_1..phi_order of hh (h for noise, -h for data): phi_k = (phi_{k-1} - 1/(k-1)!) / hh */
  const double hh = pred == PRED_DATA ? -h : h;
  double phi[USF_MAX_ORDER + 1] = {0}, prev = exp(hh), fac = 1;
  for (int k = 0; k < up->order; k++) {
    fac *= k > 1 ? k : 1;
    phi[k] = (prev - 1 / fac) / hh;
    prev = phi[k];
  }
  for (int i = 1; i <= n; i++) {
    const usf_deriv *dv = &up->der[i - 1];
    deriv_weights(c, dv, i, S->lam, w[i - 1]);
    const double rf = i == 1 ? relax_factor(dv, h, pred == PRED_DATA ? -h : h) : 1;
    for (int k = 0; k < dv->n; k++)
      w[i - 1][k] *= rf;
    coef[i - 1] = pred == PRED_NOISE  ? -st_ * pow(h, i + 1) * phi[i]
                  : pred == PRED_DATA ? at_ * pow(h, i + 1) * phi[i]
                                      : 0;
  }
  const size_t nd = c->nd, d = c->d;
  const v3_stats *st = c->st;
  const int is = pred == PRED_V3 ? S->idx : 0, it = pred == PRED_V3 ? grid_index(st, lt) : 0;
  const size_t np = pred == PRED_V3 && st->dd != 1 ? d : 1;
  for (size_t p = 0; p < np; p++) {
    double cx, c0, cb = 0;
    if (pred == PRED_NOISE) {
      cx = exp(log_alpha(lt) - log_alpha(S->lam));
      c0 = -st_ * h * phi[0];
    } else if (pred == PRED_DATA) {
      cx = st_ / ss;
      c0 = at_ * h * phi[0];
    } else {
      const size_t ps = (size_t)is * st->dd + p, pt = (size_t)it * st->dd + p;
      cx = at_ / as * exp(st->L[ps] - st->L[pt]);
      c0 = -at_ * exp(-st->L[pt] - st->S[ps]) * (st->I[pt] - st->I[ps]);
      cb = -at_ * exp(-st->L[pt]) * (st->C[pt] - st->C[ps] - st->B[ps] * (st->I[pt] - st->I[ps]));
      for (int i = 1; i <= n; i++)
        coef[i - 1] = -at_ * exp(st->L[ps] - st->L[pt]) * v3_E(st, is, it, i, p);
    }
    for (size_t j = p; j < nd; j += np) {
      const double ms = mval(c, pred, S, S, j);
      double v = cx * S->x[j] + c0 * ms + cb;
      for (int i = 1; i <= n; i++) {
        const usf_deriv *dv = &up->der[i - 1];
        double dj = 0;
        for (int k = 0; k < dv->n; k++)
          dj += w[i - 1][k] * (mval(c, pred, at(c, dv->pts[k]), S, j) - ms);
        v += coef[i - 1] * dj;
      }
      out[j] = v;
    }
  }
}

/* Makes room for a new newest point and returns it (the oldest buffer is reused when full). */
static upt *push(uctx *c) {
  if (c->np == c->cap) {
    upt *old = c->ring[0];
    memmove(c->ring, c->ring + 1, (size_t)(c->cap - 1) * sizeof *c->ring);
    c->ring[c->cap - 1] = old;
    c->np--;
  }
  return c->ring[c->np++];
}

static int usf_loop(uctx *c, float *x, double *xd, err *e) {
  const usf_schedule *u = c->u;
  const size_t nd = c->nd;
  upt *P = push(c);
  P->lam = u->lam[0];
  P->idx = c->st ? grid_index(c->st, P->lam) : 0;
  for (size_t j = 0; j < nd; j++)
    P->x[j] = x[j];
  int rc = fill_point(c, 0, P, u->first, e);
  for (int k = 0; k < u->steps && rc == ERR_OK; k++) {
    const usf_step *s = &u->st[k];
    const double lt = u->lam[k + 1];
    apply(c, &s->p, s->pred, lt, xd);
    P = push(c);
    P->lam = lt;
    P->idx = c->st ? grid_index(c->st, lt) : 0;
    memcpy(P->x, xd, nd * sizeof *xd);
    if (s->corr != CORR_NONE || k < u->steps - 1)
      rc = fill_point(c, k, P, FIRST_MODEL, e);
    if (rc == ERR_OK && s->corr != CORR_NONE) {
      apply(c, &s->c, s->pred, lt, xd);
      memcpy(P->x, xd, nd * sizeof *xd);
      if (s->corr == CORR_IMPLICIT && k < u->steps - 1)
        rc = fill_point(c, k, P, FIRST_MODEL, e);
    }
    sampler_report(c->r, k + 1, u->steps);
  }
  for (size_t j = 0; rc == ERR_OK && j < nd; j++)
    x[j] = (float)at(c, -1)->x[j];
  return rc;
}

static int usf_run(const sampler *s, run_ctx *r, float *x, err *e) {
  const usf_schedule *u = s->usf;
  const int B = sampler_run_batch(r);
  const size_t d = sampler_run_d(r), nd = (size_t)B * d;
  const v3_stats *st = u->has_v3 ? s->v3 : NULL;
  if (B > USF_MAX_BATCH)
    return err_set(e, ERR_UNSUPPORTED, "USF: at most %d images per batch", USF_MAX_BATCH);
  if (st && st->dd != 1 && st->dd != d)
    return err_set(e, ERR_INVALID,
                   "the USF schedule's v3 statistics are for images of %d x %d x %d (C x H x W), "
                   "the run's have %zu values: computed for another model or size",
                   st->shape[0], st->shape[1], st->shape[2], d);
  if (u->first == FIRST_AVERAGE_X0 && u->n_avg != 1 && u->n_avg != d)
    return err_set(e, ERR_INVALID,
                   "the USF schedule's average_x0 has %zu values, the run's images %zu", u->n_avg,
                   d);
  const int cap = u->depth + 1, per = st ? 4 : 3;
  uctx c = {.s = s, .u = u, .st = st, .r = r, .d = d, .nd = nd, .cap = cap};
  upt *pts = mem_calloc((size_t)cap, sizeof *pts);
  c.ring = mem_calloc((size_t)cap, sizeof *c.ring);
  double *mem = mem_malloc(((size_t)cap * per + 1) * nd * sizeof *mem);
  c.xf = mem_malloc((2 * nd + d) * sizeof *c.xf);
  c.lab = mem_malloc((size_t)B * sizeof *c.lab);
  int rc;
  if (!pts || !c.ring || !mem || !c.xf || !c.lab) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
  } else {
    c.of = c.xf + nd;
    c.sel = c.of + nd;
    for (int k = 0; k < cap; k++) {
      double *b = mem + (size_t)k * per * nd;
      pts[k] = (upt){.x = b, .eps = b + nd, .x0 = b + 2 * nd, .f = st ? b + 3 * nd : NULL};
      c.ring[k] = &pts[k];
    }
    rc = usf_loop(&c, x, mem + (size_t)cap * per * nd, e);
  }
  free(pts);
  free(c.ring);
  free(mem);
  free(c.xf);
  free(c.lab);
  return rc;
}

const solver_desc solver_usf = {"usf", "USF", 0, usf_prepare, NULL, usf_run, 0, 0, NULL};
