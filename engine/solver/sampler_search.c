/* S^3-style search for a USF solver schedule on a CPU budget (Liu et al. 2023; thu-nics/USF
 * @5b89ef5 search.py, evo_search.yml): an evolutionary search over the framework's per-step
 * decisions, each candidate scored by its relative L2 error against a many-step reference solve
 * from the same fixed noise (the paper scores by FID on 1000 samples, out of reach here), with
 * the final schedule also scored on held-out noise. Every candidate tried is kept in a state
 * file, so a search resumes where it stopped. */

/* The authors' rules, as in their search.py: parents chosen by rank (probability proportional
 * to rank, best highest), crossover with probability 0.5 (per step, each decision family from
 * either parent; timesteps from either), mutation with probability 0.3 per decision family:
 * timesteps jittered with sigma 0.03 (here in the unit interval that maps linearly onto the
 * schedule's lambda range), orders drawn from {1: .2, 2: .4, 3: .3, 4: .1} (capped by the
 * points a step has), prediction type (noise or data), corrector (none or pseudo) and the
 * linear relaxation coefficient of the first derivative (sigma 0.05). Deviations: v3-type steps,
 * skip-backs, the analytical first steps and UNet skip scaling are not searched (the first
 * step is the model's and no corrector runs after the last step, so NFE = steps); the
 * population is (mu + lambda): the best `population` candidates so far are the parents; there
 * is no learned predictor (every candidate is evaluated, they are cheap at this size). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "mem.h"
#include "rng.h"
#include "sampler_impl.h"

#define S_MAX_STEPS 32

typedef struct genome {
  int n;                     /* steps = NFE */
  double t[S_MAX_STEPS + 1]; /* 0 = t[0] < ... < t[n] = 1, lambda = lo + (hi - lo) t */
  int pred[S_MAX_STEPS];     /* 0 noise, 1 data */
  int order[S_MAX_STEPS];
  int corr[S_MAX_STEPS]; /* 0 none, 1 pseudo */
  double relax[S_MAX_STEPS];
  double score;
} genome;

/* A small deterministic generator (splitmix64) for the search's choices. */
static uint64_t next_u64(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static double unif(uint64_t *s) {
  return (double)(next_u64(s) >> 11) / 9007199254740992.0;
}
static double gauss(uint64_t *s) {
  const double u = unif(s) + 1e-300, v = unif(s);
  return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

static int max_order(int k) {
  return k + 1 < 4 ? k + 1 : 4; /* step k sees k + 1 points */
}

/* A multistep baseline: lambda-uniform, data prediction, orders 1, 2, ..., `order`. */
static void baseline(genome *g, int n, int order, int pred) {
  memset(g, 0, sizeof *g);
  g->n = n;
  for (int k = 0; k <= n; k++)
    g->t[k] = (double)k / n;
  for (int k = 0; k < n; k++) {
    g->pred[k] = pred;
    g->order[k] = order < max_order(k) ? order : max_order(k);
  }
}

static int cmp_dbl(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Keeps the timesteps strictly increasing inside (0, 1) with a minimum gap. */
static void fix_times(genome *g) {
  qsort(g->t + 1, (size_t)(g->n - 1), sizeof *g->t, cmp_dbl);
  const double gap = 0.2 / g->n;
  for (int k = 1; k < g->n; k++) {
    if (g->t[k] < g->t[k - 1] + gap)
      g->t[k] = g->t[k - 1] + gap;
  }
  for (int k = g->n - 1; k >= 1; k--)
    if (g->t[k] > g->t[k + 1] - gap)
      g->t[k] = g->t[k + 1] - gap;
}

static int draw_order(uint64_t *s, int k) {
  const double u = unif(s);
  const int o = u < 0.2 ? 1 : u < 0.6 ? 2 : u < 0.9 ? 3 : 4;
  return o < max_order(k) ? o : max_order(k);
}

static void mutate(genome *g, uint64_t *s) {
  if (unif(s) < 0.3) {
    for (int k = 1; k < g->n; k++)
      g->t[k] += 0.03 * gauss(s);
    fix_times(g);
  }
  const int fam_order = unif(s) < 0.3, fam_pred = unif(s) < 0.3, fam_corr = unif(s) < 0.3,
            fam_relax = unif(s) < 0.3;
  for (int k = 0; k < g->n; k++) {
    if (fam_order && unif(s) < 0.5)
      g->order[k] = draw_order(s, k);
    if (fam_pred && unif(s) < 0.5)
      g->pred[k] = !g->pred[k];
    if (fam_corr && unif(s) < 0.5 && k < g->n - 1)
      g->corr[k] = !g->corr[k];
    if (fam_relax && unif(s) < 0.5)
      g->relax[k] += 0.05 * gauss(s);
  }
}

static void crossover(genome *c, const genome *a, const genome *b, uint64_t *s) {
  *c = *a;
  if (unif(s) < 0.5)
    memcpy(c->t, b->t, sizeof c->t);
  for (int k = 0; k < c->n; k++) {
    if (unif(s) < 0.5)
      c->order[k] = b->order[k];
    if (unif(s) < 0.5)
      c->pred[k] = b->pred[k];
    if (unif(s) < 0.5)
      c->corr[k] = b->corr[k];
    if (unif(s) < 0.5)
      c->relax[k] = b->relax[k];
  }
}

/* The genome as a USF schedule (README "USF"). */
static json_t *to_schedule(const genome *g, double lo, double hi) {
  json_t *ts = json_array(), *steps = json_array();
  for (int k = 0; k <= g->n; k++)
    json_array_append_new(ts, json_real(lo + (hi - lo) * g->t[k]));
  for (int k = 0; k < g->n; k++) {
    json_t *st =
        json_pack("{s:s, s:i}", "prediction", g->pred[k] ? "data" : "noise", "order", g->order[k]);
    if (g->order[k] > 1 && g->relax[k] != 0) {
      json_t *dv = json_array();
      json_array_append_new(
          dv, json_pack("{s:s, s:f}", "relaxation", "linear", "coefficient", g->relax[k]));
      for (int i = 2; i < g->order[k]; i++)
        json_array_append_new(dv, json_object());
      json_object_set_new(st, "derivatives", dv);
    }
    /* the corrector from the step's start (-2 once the new point is in), one order up as far
     * as the k + 2 points allow */
    const int oc = g->order[k] + 1 < max_order(k + 1) ? g->order[k] + 1 : max_order(k + 1);
    if (g->corr[k] && k < g->n - 1)
      json_object_set_new(
          st, "corrector",
          json_pack("{s:s, s:i, s:i}", "type", "pseudo", "order", oc, "start_point", -2));
    json_array_append_new(steps, st);
  }
  return json_pack("{s:s, s:i, s:s, s:o, s:o}", "format", "denoised-usf-schedule", "version", 1,
                   "time", "lambda", "timesteps", ts, "steps", steps);
}

/* Reads a genome back from a schedule of the state file (written by to_schedule). */
static int from_schedule(const json_t *h, double lo, double hi, genome *g) {
  const json_t *ts = json_object_get(h, "timesteps"), *steps = json_object_get(h, "steps");
  memset(g, 0, sizeof *g);
  g->n = (int)json_array_size(steps);
  if (g->n < 1 || g->n > S_MAX_STEPS || json_array_size(ts) != (size_t)g->n + 1)
    return -1;
  for (int k = 0; k <= g->n; k++)
    g->t[k] = (json_number_value(json_array_get(ts, (size_t)k)) - lo) / (hi - lo);
  for (int k = 0; k < g->n; k++) {
    const json_t *st = json_array_get(steps, (size_t)k);
    const char *p = json_string_value(json_object_get(st, "prediction"));
    g->pred[k] = p && strcmp(p, "data") == 0;
    g->order[k] = (int)json_integer_value(json_object_get(st, "order"));
    g->corr[k] = json_object_get(st, "corrector") != NULL;
    g->relax[k] = json_number_value(
        json_object_get(json_array_get(json_object_get(st, "derivatives"), 0), "coefficient"));
    if (g->order[k] < 1 || g->order[k] > max_order(k))
      return -1;
  }
  return 0;
}

typedef struct sctx {
  const model *m;
  const json_t *cfg;
  const sampler_search_opts *o;
  const float *ref[2];          /* reference on the search noise and on the held-out noise */
  char tmp[4200];               /* the candidate's schedule file */
  double grid[S_MAX_STEPS + 1]; /* diffusers' 2M grid as unit times */
  size_t n;                     /* batch * d */
  float *x;
} sctx;

/* Runs schedule g on noise set `set` (0 search, 1 held-out) and scores it against the reference.
 * A schedule the executor refuses scores +inf. */
static int score(sctx *c, const genome *g, double lo, double hi, int set, double *out, err *e) {
  json_t *h = to_schedule(g, lo, hi);
  if (!h || json_dump_file(h, c->tmp, JSON_REAL_PRECISION(17)) != 0) {
    json_decref(h);
    return err_set(e, ERR_IO, "cannot write %s", c->tmp);
  }
  json_decref(h);
  json_t *spec = json_pack("{s:s, s:s}", "name", "usf", "data", c->tmp);
  sampler *s = NULL;
  err e2 = {0};
  int rc = sampler_new_from_json(spec, c->cfg, &s, &e2);
  json_decref(spec);
  *out = INFINITY;
  if (rc == ERR_OK) {
    sampler_run_opts ro = c->o->run;
    ro.seed = c->o->run.seed + (uint64_t)set;
    rc = sampler_run(s, c->m, &ro, c->x, NULL, &e2);
    if (rc == ERR_OK) {
      double num = 0, den = 0;
      for (size_t j = 0; j < c->n; j++) {
        const double dlt = (double)c->x[j] - c->ref[set][j];
        num += dlt * dlt;
        den += (double)c->ref[set][j] * c->ref[set][j];
      }
      *out = isfinite(num) ? sqrt(num / den) : INFINITY;
    }
  }
  sampler_free(s);
  /* a refused or diverging candidate is a bad score, not a failed search */
  return rc == ERR_NOMEM ? err_set(e, ERR_NOMEM, "%s", e2.msg) : ERR_OK;
}

static int by_score(const void *a, const void *b) {
  const double x = ((const genome *)a)->score, y = ((const genome *)b)->score;
  return (x > y) - (x < y);
}

/* A parent by rank: the i-th best of np with weight np - i. */
static const genome *pick(const genome *pop, int np, uint64_t *s) {
  const double total = np * (np + 1) / 2.0;
  double u = unif(s) * total;
  for (int i = 0; i < np; i++) {
    u -= np - i;
    if (u <= 0)
      return &pop[i];
  }
  return &pop[np - 1];
}

/* Appends a tried candidate to the state (the resumable record) and saves it. */
static int record(json_t *state, const genome *g, double lo, double hi, const char *path, err *e) {
  json_t *h = to_schedule(g, lo, hi);
  json_array_append_new(
      json_object_get(state, "tried"),
      json_pack("{s:o, s:f}", "schedule", h, "score", isfinite(g->score) ? g->score : 1e30));
  char tmp[4300];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  if (json_dump_file(state, tmp, JSON_REAL_PRECISION(17)) != 0 || rename(tmp, path) != 0)
    return err_set(e, ERR_IO, "cannot write the search state %s", path);
  return ERR_OK;
}

/* The reference of noise set `set`: ref_steps of DPM-Solver++(2M) (trailing grid). */
static int reference(sctx *c, int set, float *out, err *e) {
  json_t *spec = json_pack("{s:s, s:i, s:{s:s}}", "name", "dpm++2m", "steps", c->o->ref_steps,
                           "options", "timestep_spacing", "trailing");
  sampler *s = NULL;
  int rc = sampler_new_from_json(spec, c->cfg, &s, e);
  json_decref(spec);
  sampler_run_opts ro = c->o->run;
  ro.seed = c->o->run.seed + (uint64_t)set;
  if (rc == ERR_OK)
    rc = sampler_run(s, c->m, &ro, out, NULL, e);
  sampler_free(s);
  return rc;
}

/* The schedule's lambda range (a v3 solver's table: the same clipped range USF checks). */
static int lambda_range(const json_t *cfg, double *lo, double *hi, err *e) {
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm-solver-v3", "steps", 5);
  sampler *s = NULL;
  int rc = sampler_new_from_json(spec, cfg, &s, e);
  json_decref(spec);
  if (rc == ERR_OK) {
    /* a hair inside, so rounding never puts an end outside the range USF checks */
    const double a = s->lambdas[s->n_lambdas - 1], b = s->lambdas[0], m = 1e-9 * (b - a);
    *lo = a + m;
    *hi = b - m;
  }
  sampler_free(s);
  return rc;
}

/* The unit times of diffusers' DPM-Solver++(2M) grid of n steps (its timesteps' lambdas, the
 * last point at the schedule's end), which on thresholded models beats lambda-uniform points. */
static int diffusers_grid(const json_t *cfg, int n, double lo, double hi, double *t, err *e) {
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm++2m", "steps", n);
  sampler *s = NULL;
  int rc = sampler_new_from_json(spec, cfg, &s, e);
  json_decref(spec);
  for (int k = 0; rc == ERR_OK && k <= n; k++) {
    double lam = hi;
    if (k < n) {
      const double a = sampler_abar_at(s, sampler_timesteps(s)[k]);
      lam = 0.5 * log(a / (1 - a));
    }
    t[k] = fmin(fmax((lam - lo) / (hi - lo), 0), 1);
  }
  t[0] = 0;
  t[n] = 1;
  sampler_free(s);
  return rc;
}

/* The baselines, then the resumed candidates, then children until the budget is spent. */
static int evolve(sctx *c, genome *pop, int *np, json_t *state, double lo, double hi, uint64_t *rs,
                  err *e) {
  const sampler_search_opts *o = c->o;
  const int P = o->population;
  int tried = (int)json_array_size(json_object_get(state, "tried")), rc = ERR_OK;
  for (int it = tried; it < o->budget && rc == ERR_OK; it++) {
    genome g;
    if (it < 5) {
      /* DPM-Solver++ 1, 2M, 3M on lambda-uniform points, 2M and 3M on diffusers' grid */
      baseline(&g, o->nfe, it < 3 ? it + 1 : it - 1, 1);
      if (it >= 3) {
        memcpy(g.t, c->grid, sizeof g.t);
        fix_times(&g);
      }
    } else {
      const genome *a = pick(pop, *np, rs);
      if (unif(rs) < 0.5)
        crossover(&g, a, pick(pop, *np, rs), rs);
      else
        g = *a;
      mutate(&g, rs);
    }
    if ((rc = score(c, &g, lo, hi, 0, &g.score, e)) != ERR_OK ||
        (rc = record(state, &g, lo, hi, o->state_path, e)) != ERR_OK)
      break;
    if (*np < P) {
      pop[(*np)++] = g;
    } else if (g.score < pop[P - 1].score) {
      pop[P - 1] = g;
    }
    qsort(pop, (size_t)*np, sizeof *pop, by_score);
    if (o->progress)
      o->progress(it + 1, o->budget, g.score, pop[0].score, o->progress_user);
  }
  return rc;
}

/* Re-reads the candidates a previous run of the same search tried (the state must match). */
static int resume(const sctx *c, const json_t *state, genome *pop, int *np, double lo, double hi,
                  uint64_t *rs, err *e) {
  const json_t *tried = json_object_get(state, "tried");
  size_t i;
  const json_t *t;
  json_array_foreach(tried, i, t) {
    genome g;
    if (from_schedule(json_object_get(t, "schedule"), lo, hi, &g) != 0 || g.n != c->o->nfe)
      return err_set(e, ERR_INVALID, "search state %s: candidate %zu is not a schedule of %d steps",
                     c->o->state_path, i, c->o->nfe);
    g.score = json_number_value(json_object_get(t, "score"));
    g.score = g.score >= 1e30 ? INFINITY : g.score;
    if (*np < c->o->population)
      pop[(*np)++] = g;
    else if (g.score < pop[c->o->population - 1].score)
      pop[c->o->population - 1] = g;
    qsort(pop, (size_t)*np, sizeof *pop, by_score);
  }
  /* the continuation draws from a generator reseeded by the count tried: a resumed search keeps
   * every candidate, not the exact draws an uninterrupted one would have made */
  *rs ^= (uint64_t)json_array_size(tried) * 0x9E3779B97F4A7C15ull;
  return ERR_OK;
}

int sampler_search(const model *m, const json_t *model_config, const sampler_search_opts *o,
                   sampler_search_result *res, err *e) {
  if (o->nfe < 2 || o->nfe > S_MAX_STEPS)
    return err_set(e, ERR_INVALID, "search: NFE 2 to %d, not %d", S_MAX_STEPS, o->nfe);
  if (o->population < 2 || o->budget < 6)
    return err_set(e, ERR_INVALID, "search: a population of 2 or more and a budget of 6 or more");
  const model_info *mi = model_get_info(m);
  const size_t d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size;
  const size_t n = (size_t)o->run.batch * d;
  double lo = 0, hi = 0;
  int rc = lambda_range(model_config, &lo, &hi, e);
  if (rc != ERR_OK)
    return rc;
  sctx c = {.m = m, .cfg = model_config, .o = o, .n = n};
  float *buf = mem_malloc(3 * n * sizeof *buf);
  genome *pop = mem_calloc((size_t)o->population, sizeof *pop);
  json_t *state = NULL;
  if (!buf || !pop) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  c.x = buf;
  c.ref[0] = buf + n;
  c.ref[1] = buf + 2 * n;
  snprintf(c.tmp, sizeof c.tmp, "%s.candidate.json", o->state_path);
  if ((rc = diffusers_grid(model_config, o->nfe, lo, hi, c.grid, e)) != ERR_OK ||
      (rc = reference(&c, 0, buf + n, e)) != ERR_OK ||
      (rc = reference(&c, 1, buf + 2 * n, e)) != ERR_OK)
    goto done;
  uint64_t rs = o->run.seed * 0x2545F4914F6CDD1Dull + 1;
  int np = 0;
  state = o->resume ? json_load_file(o->state_path, 0, NULL) : NULL;
  if (o->resume && !state) {
    rc = err_set(e, ERR_INVALID, "search: --resume, but no readable state %s", o->state_path);
    goto done;
  }
  if (state && (rc = resume(&c, state, pop, &np, lo, hi, &rs, e)) != ERR_OK)
    goto done;
  if (!state)
    state = json_pack("{s:s, s:i, s:[]}", "format", "denoised-usf-search", "nfe", o->nfe, "tried");
  if ((rc = evolve(&c, pop, &np, state, lo, hi, &rs, e)) != ERR_OK)
    goto done;
  genome base;
  baseline(&base, o->nfe, 2, 1);
  res->score = pop[0].score;
  if ((rc = score(&c, &pop[0], lo, hi, 1, &res->heldout, e)) != ERR_OK ||
      (rc = score(&c, &base, lo, hi, 1, &res->heldout_2m, e)) != ERR_OK)
    goto done;
  res->schedule = to_schedule(&pop[0], lo, hi);
  res->tried = (int)json_array_size(json_object_get(state, "tried"));
done:
  unlink(c.tmp);
  json_decref(state);
  free(buf);
  free(pop);
  return rc;
}
