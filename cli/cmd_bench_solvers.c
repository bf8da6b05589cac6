/* `denoised bench solvers`: the relative L2 error of each deterministic solver per NFE budget
 * against a many-step DPM-Solver-3 solve of the same ODE from the same noise, and the convergence
 * order between successive budgets. Works with any model. */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "model.h"
#include "sampler.h"
#include "schedule.h"

static const char help[] =
    "usage: denoised bench solvers --model DIR [--nfe 5,10,20,50] [--solvers a,b,...]\n"
    "                              [--batch N] [--seed S] [--class C] [--size S]\n"
    "                              [--ref-nfe N] [--threads T]\n"
    "\n"
    "Relative L2 error of each deterministic solver against a high-accuracy solve of the same\n"
    "ODE from the same noise, per NFE budget, and the empirical convergence order between\n"
    "successive budgets. Every solver starts from the same x_T at the last training timestep\n"
    "(leading grids are shifted there with steps_offset) and solves the plain ODE (clip_sample\n"
    "and thresholding off). Solvers ending at sigma 0 are compared with the model's clean\n"
    "estimate at the first training timestep of the reference. Stochastic solvers are skipped.\n"
    "  --nfe LIST       network evaluations per image (default 5,10,20,50); a solver that cannot\n"
    "                   spend exactly that many uses the largest count below, shown in brackets\n"
    "  --solvers LIST   solver names (default: every deterministic one)\n"
    "  --batch N        images (default 4), --seed S their noise (default 0)\n"
    "  --class C        class label for class-conditional models (default 0)\n"
    "  --ref-nfe N      evaluations of the reference solve (default 1200)\n"
    "  --threads T      CPU threads (default 2)\n";

static const char *const default_solvers[] = {
    "ddim",       "pndm",    "plms",    "f-pndm",  "s-pndm",
    "dpm-solver", "dpm++2m", "dpm++3m", "dpm++2s", "dpm-solver-fast",
    "unipc",      "deis",    "euler",   "heun",    "dpm-solver-adaptive"};
#define MAX_NFE 16
#define MAX_SOLVERS 64

typedef struct bench_ctx {
  model *m;
  int batch, h, w, threads;
  uint64_t seed;
  int64_t *labels;
  size_t count; /* floats of one run */
} bench_ctx;

static int parse_list_int(const char *s, int *out, int max, int *n) {
  *n = 0;
  while (*s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || v < 1 || v > 100000 || *n == max)
      return -1;
    out[(*n)++] = (int)v;
    s = *end == ',' ? end + 1 : end;
    if (*end && *end != ',')
      return -1;
  }
  return *n ? 0 : -1;
}

/* A sampler for `name` with `steps` (0: default), set up to solve the plain ODE from t = T - 1:
 * clipping and thresholding (a model config's clip_sample, say) are switched off, as they change
 * the ODE; where leading spacing would start below T - 1, steps_offset moves its evenly spaced
 * grid up to start there. diffusers' DDIM and PNDM step by T // n whatever the grid, and the
 * multistep PNDMs assume even steps, so for those only step counts dividing T give a grid that
 * starts at T - 1 and ends at the end; other counts are refused (ERR_UNSUPPORTED) and the
 * budget search takes the next smaller one. */
static int make(const bench_ctx *b, const char *name, int steps, json_t *extra, sampler **out,
                err *e) {
  pipeline_solver spec = {.name = name, .steps = steps > 0 ? steps : 0, .options = extra};
  int rc = pipeline_sampler(b->m, &spec, out, NULL, 0, e);
  if (rc != ERR_OK || extra)
    return rc;
  const sched_config *cfg = sampler_config(*out);
  const char *cls = sampler_solver_class(name);
  json_t *fix = json_object();
  if (cfg->clip_sample && sched_class_has_key(cls, "clip_sample"))
    json_object_set_new(fix, "clip_sample", json_false());
  if (cfg->thresholding && sched_class_has_key(cls, "thresholding"))
    json_object_set_new(fix, "thresholding", json_false());
  if (cfg->timestep_spacing == SCHED_SPACING_LEADING && sched_class_has_key(cls, "steps_offset")) {
    const int n = sampler_num_steps(*out), T = cfg->num_train_timesteps;
    if (T % n != 0 && (strcmp(cls, "DDIMScheduler") == 0 || strcmp(cls, "PNDMScheduler") == 0 ||
                       strcmp(cls, "PNDM_Official") == 0))
      rc = err_set(e, ERR_UNSUPPORTED, "%d steps do not divide %d", n, T);
    else if (sampler_timesteps(*out) && sampler_timesteps(*out)[0] < T - 1)
      json_object_set_new(
          fix, "steps_offset",
          json_integer(cfg->steps_offset + (T - 1) - (long long)sampler_timesteps(*out)[0]));
  }
  if (rc == ERR_OK && json_object_size(fix)) {
    sampler *t = NULL;
    spec.options = fix;
    rc = pipeline_sampler(b->m, &spec, &t, NULL, 0, e);
    if (rc == ERR_OK) {
      sampler_free(*out);
      *out = t;
    }
  }
  if (rc != ERR_OK) {
    sampler_free(*out);
    *out = NULL;
  }
  json_decref(fix);
  return rc;
}

static int run(const bench_ctx *b, const sampler *s, float *out, int *nfe, err *e) {
  sampler_run_opts o = {.batch = b->batch,
                        .height = b->h,
                        .width = b->w,
                        .seed = b->seed,
                        .labels = b->labels,
                        .threads = b->threads};
  return sampler_run(s, b->m, &o, out, nfe, e);
}

static double rel_l2(const float *a, const float *r, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    const double d = (double)a[i] - r[i];
    num += d * d;
    den += (double)r[i] * r[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The model's clean estimate x0 at the first training timestep: what a solver that ends at
 * sigma 0 takes as its last step from there. */
static int clean_estimate(const bench_ctx *b, const float *x, float *x0, err *e) {
  const model_info *mi = model_get_info(b->m);
  const size_t d = (size_t)mi->in_channels * b->h * b->w,
               dout = (size_t)mi->out_channels * b->h * b->w;
  sched_config cfg;
  const json_t *mcfg = model_scheduler_config(b->m);
  int rc = mcfg ? sched_config_from_json(mcfg, NULL, 0, &cfg, e) : sched_config_init(&cfg, NULL, e);
  if (rc != ERR_OK)
    return rc;
  float *ab = malloc((size_t)cfg.num_train_timesteps * sizeof *ab);
  float *mo = malloc((size_t)b->batch * dout * sizeof *mo);
  float *tv = calloc((size_t)b->batch, sizeof *tv);
  if (!ab || !mo || !tv)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = sched_alphas_cumprod(&cfg, ab, e);
  if (rc == ERR_OK)
    rc = model_eval(b->m, x, b->batch, b->h, b->w, tv, b->labels, mo, b->threads, e);
  if (rc == ERR_OK) {
    const double sa = sqrt((double)ab[0]), sb = sqrt(1.0 - ab[0]);
    const sched_prediction p =
        mi->prediction_type
            ? (strcmp(mi->prediction_type, "sample") == 0         ? SCHED_PRED_SAMPLE
               : strcmp(mi->prediction_type, "v_prediction") == 0 ? SCHED_PRED_V
                                                                  : SCHED_PRED_EPSILON)
            : cfg.prediction_type;
    for (int i = 0; i < b->batch; i++)
      for (size_t k = 0; k < d; k++) {
        const double xv = x[i * d + k], m = mo[i * dout + k];
        x0[i * d + k] = (float)(p == SCHED_PRED_EPSILON  ? (xv - sb * m) / sa
                                : p == SCHED_PRED_SAMPLE ? m
                                                         : sa * xv - sb * m);
      }
  }
  free(ab);
  free(mo);
  free(tv);
  sched_config_free(&cfg);
  return rc;
}

static int reference(const bench_ctx *b, int nfe, float *ref_min, err *e) {
  json_t *opts =
      json_pack("{s:s, s:i, s:s, s:s, s:n}", "method", "singlestep_fixed", "solver_order", 3,
                "skip_type", "logSNR", "algorithm_type", "dpmsolver++", "lambda_min_clipped");
  sampler *s = NULL;
  int rc = make(b, "DPM_Solver", nfe, opts, &s, e);
  json_decref(opts);
  if (rc == ERR_OK)
    rc = run(b, s, ref_min, NULL, e);
  sampler_free(s);
  return rc;
}

/* What the flags ask for. */
typedef struct bench_args {
  const char *model_dir, *solver_list;
  int nfes[MAX_NFE], n_nfe;
  long long batch, seed, label, size, ref_nfe, threads;
} bench_args;

/* The reference solves a solver's output is compared with (ref_half only estimates the
 * reference's own error), and room for that output. */
typedef struct bench_refs {
  float *min, *clean, *half, *x;
} bench_refs;

static const struct option long_opts[] = {{"model", required_argument, 0, 'm'},
                                          {"nfe", required_argument, 0, 'n'},
                                          {"solvers", required_argument, 0, 's'},
                                          {"batch", required_argument, 0, 'b'},
                                          {"seed", required_argument, 0, 'S'},
                                          {"class", required_argument, 0, 'c'},
                                          {"size", required_argument, 0, 'z'},
                                          {"ref-nfe", required_argument, 0, 'r'},
                                          {"threads", required_argument, 0, 'j'},
                                          {"help", no_argument, 0, 'h'},
                                          {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, const char *cmd, bench_args *a) {
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:n:s:b:S:c:z:r:j:h", long_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'n':
      if (parse_list_int(optarg, a->nfes, MAX_NFE, &a->n_nfe))
        return cli_usage_error(cmd, "--nfe expects a comma-separated list of positive integers");
      break;
    case 's': a->solver_list = optarg; break;
    case 'b':
      if (cli_parse_int("--batch", optarg, 1, 1024, &a->batch))
        return 2;
      break;
    case 'S':
      if (cli_parse_int("--seed", optarg, 0, (1ll << 53) - 1, &a->seed))
        return 2;
      break;
    case 'c':
      if (cli_parse_int("--class", optarg, 0, 1 << 20, &a->label))
        return 2;
      break;
    case 'z':
      if (cli_parse_int("--size", optarg, 1, 4096, &a->size))
        return 2;
      break;
    case 'r':
      if (cli_parse_int("--ref-nfe", optarg, 30, 100000, &a->ref_nfe))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->model_dir)
    return cli_usage_error(cmd, "--model is required");
  return -1;
}

/* --solvers split in place in *copy (malloc'ed, NULL without --solvers), or the default
 * list. Returns -1 to go on, else the exit status (with *copy freed). */
static int solver_names(const char *cmd, const char *list, const char **names, int *n,
                        char **copy) {
  *n = 0;
  if (list) {
    *copy = strdup(list);
    char *save = NULL;
    for (char *t = strtok_r(*copy, ",", &save); t && *n < MAX_SOLVERS;
         t = strtok_r(NULL, ",", &save))
      names[(*n)++] = t;
  } else {
    for (size_t i = 0; i < sizeof default_solvers / sizeof *default_solvers; i++)
      names[(*n)++] = default_solvers[i];
  }
  for (int i = 0; i < *n; i++)
    if (!sampler_solver_class(names[i])) {
      int st = cli_usage_error(cmd, "unknown solver '%s'", names[i]);
      free(*copy);
      *copy = NULL;
      return st;
    }
  return -1;
}

/* The model, the image size, the labels and the buffers. Returns -1 to go on, else the exit
 * status; what was allocated stays in b and r for the caller to free. */
static int bench_setup(const char *cmd, const bench_args *a, bench_ctx *b, bench_refs *r, err *e) {
  if (model_load(a->model_dir, &b->m, e)) {
    cli_fail(cmd, "%s", e->msg);
    return 1;
  }
  const model_info *mi = model_get_info(b->m);
  b->h = b->w = a->size ? (int)a->size : mi->sample_size;
  if (b->h < 1) {
    cli_usage_error(cmd, "the model has no sample_size: pass --size");
    return 2;
  }
  if (mi->num_classes) {
    b->labels = malloc((size_t)b->batch * sizeof *b->labels);
    for (int i = 0; b->labels && i < b->batch; i++)
      b->labels[i] = a->label;
  }
  b->count = (size_t)b->batch * mi->in_channels * b->h * b->w;
  r->min = malloc(b->count * sizeof *r->min);
  r->clean = malloc(b->count * sizeof *r->clean);
  r->half = malloc(b->count * sizeof *r->half);
  r->x = malloc(b->count * sizeof *r->x);
  if (!r->min || !r->clean || !r->half || !r->x || (mi->num_classes && !b->labels)) {
    cli_fail(cmd, "out of memory");
    return 1;
  }
  return -1;
}

/* The reference at --ref-nfe, its clean estimate, and the same solve at half the NFE whose
 * distance from it bounds the reference's own error. Returns -1 to go on, else 1. */
static int bench_reference(const char *cmd, const bench_args *a, const bench_ctx *b, bench_refs *r,
                           err *e) {
  fprintf(stderr, "bench solvers: reference solve (%lld NFE)...\n", a->ref_nfe);
  if (reference(b, (int)a->ref_nfe, r->min, e) || reference(b, (int)a->ref_nfe / 2, r->half, e) ||
      clean_estimate(b, r->min, r->clean, e)) {
    cli_fail(cmd, "reference: %s", e->msg);
    return 1;
  }
  return -1;
}

static void print_header(const bench_args *a, const bench_ctx *b, const bench_refs *r) {
  const model_info *mi = model_get_info(b->m);
  printf("bench solvers: model %s, batch %d, seed %lld%s; reference DPM-Solver-3 (logSNR) with "
         "%lld NFE, its error ~%.1e (vs %lld NFE)\n",
         a->model_dir, b->batch, a->seed, mi->num_classes ? " (class-conditional)" : "", a->ref_nfe,
         rel_l2(r->half, r->min, b->count), a->ref_nfe / 2);
  printf("%-20s", "solver");
  for (int k = 0; k < a->n_nfe; k++) {
    char hdr[32];
    snprintf(hdr, sizeof hdr, "NFE %d", a->nfes[k]);
    printf(" %14s", hdr);
  }
  for (int k = 0; k + 1 < a->n_nfe; k++) {
    char hdr[32];
    snprintf(hdr, sizeof hdr, "p %d-%d", a->nfes[k], a->nfes[k + 1]);
    printf(" %9s", hdr);
  }
  printf("\n");
}

/* What s's output is compared with: a solver ending at sigma 0 took the clean estimate's step. */
static const float *reference_for(const bench_refs *r, const sampler *s) {
  return sampler_ends_clean(s) ? r->clean : r->min;
}

/* The rest of an adaptive solver's row: its NFE follows from rtol/atol, not from a budget. */
static void bench_adaptive(const bench_ctx *b, const char *name, const bench_refs *r, err *e) {
  sampler *s = NULL;
  int nfe = 0;
  if (make(b, name, 0, NULL, &s, e) || run(b, s, r->x, &nfe, e)) {
    printf(" %s\n", e->msg);
  } else {
    printf(" %.3e with %d NFE (rtol %g, atol %g)\n", rel_l2(r->x, reference_for(r, s), b->count),
           nfe, sampler_config(s)->rtol, sampler_config(s)->atol);
  }
  sampler_free(s);
}

/* One cell: the error with the most steps whose planned NFE fits `budget` (NAN and 0 NFE
 * without one, or when the run fails). */
static void bench_budget(const bench_ctx *b, const char *name, int budget, const bench_refs *r,
                         double *error, int *used, err *e) {
  *error = NAN;
  *used = 0;
  sampler *s = NULL;
  int steps = budget;
  for (; steps >= 1; steps--) {
    if (make(b, name, steps, NULL, &s, NULL) == ERR_OK && sampler_nfe(s) <= budget)
      break;
    sampler_free(s);
    s = NULL;
  }
  char cell[40] = "-";
  if (steps >= 1 && s) {
    int nfe = 0;
    if (run(b, s, r->x, &nfe, e) == ERR_OK) {
      *error = rel_l2(r->x, reference_for(r, s), b->count);
      *used = nfe;
      if (nfe == budget)
        snprintf(cell, sizeof cell, "%.3e", *error);
      else
        snprintf(cell, sizeof cell, "%.3e(%d)", *error, nfe);
    } else {
      snprintf(cell, sizeof cell, "error");
    }
  }
  sampler_free(s);
  printf(" %14s", cell);
  fflush(stdout);
}

/* The empirical order between successive budgets, from the NFE actually spent. */
static void print_orders(const double *errs, const int *used, int n) {
  for (int k = 0; k + 1 < n; k++) {
    if (isfinite(errs[k]) && isfinite(errs[k + 1]) && errs[k + 1] > 0 && used[k + 1] > used[k])
      printf(" %9.2f", log(errs[k] / errs[k + 1]) / log((double)used[k + 1] / used[k]));
    else
      printf(" %9s", "-");
  }
  printf("\n");
}

/* One solver's row of the table. */
static void bench_solver(const bench_args *a, const bench_ctx *b, const char *name,
                         const bench_refs *r, err *e) {
  sampler *s = NULL;
  if (make(b, name, 0, NULL, &s, e)) {
    printf("%-20s %s\n", name, e->msg);
    return;
  }
  const int stochastic = sampler_is_stochastic(s), adaptive = sampler_nfe(s) == 0;
  sampler_free(s);
  if (stochastic) {
    printf("%-20s (stochastic: skipped)\n", name);
    return;
  }
  printf("%-20s", name);
  fflush(stdout);
  if (adaptive) {
    bench_adaptive(b, name, r, e);
    return;
  }
  double errs[MAX_NFE];
  int used[MAX_NFE];
  for (int k = 0; k < a->n_nfe; k++)
    bench_budget(b, name, a->nfes[k], r, &errs[k], &used[k], e);
  print_orders(errs, used, a->n_nfe);
}

int cmd_bench_solvers(int argc, char **argv) {
  const char *cmd = "bench solvers";
  bench_args a = {.nfes = {5, 10, 20, 50}, .n_nfe = 4, .batch = 4, .ref_nfe = 1200, .threads = 2};
  int status = parse_args(argc, argv, cmd, &a);
  if (status >= 0)
    return status;
  const char *names[MAX_SOLVERS];
  int n_solvers = 0;
  char *list_copy = NULL;
  status = solver_names(cmd, a.solver_list, names, &n_solvers, &list_copy);
  if (status >= 0)
    return status;
  err e = {0};
  bench_ctx b = {.batch = (int)a.batch, .seed = (uint64_t)a.seed, .threads = (int)a.threads};
  bench_refs r = {0};
  status = bench_setup(cmd, &a, &b, &r, &e);
  if (status < 0)
    status = bench_reference(cmd, &a, &b, &r, &e);
  if (status < 0) {
    print_header(&a, &b, &r);
    for (int i = 0; i < n_solvers; i++)
      bench_solver(&a, &b, names[i], &r, &e);
    status = 0;
  }
  free(list_copy);
  free(r.min);
  free(r.clean);
  free(r.half);
  free(r.x);
  free(b.labels);
  model_free(b.m);
  return status;
}
