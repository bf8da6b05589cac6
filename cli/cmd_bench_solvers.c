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

int cmd_bench_solvers(int argc, char **argv) {
  const char *cmd = "bench solvers";
  const char *model_dir = NULL, *solver_list = NULL;
  int nfes[MAX_NFE] = {5, 10, 20, 50}, n_nfe = 4;
  long long batch = 4, seed = 0, label = 0, size = 0, ref_nfe = 1200, threads = 2;
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
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
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:n:s:b:S:c:z:r:j:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': model_dir = optarg; break;
    case 'n':
      if (parse_list_int(optarg, nfes, MAX_NFE, &n_nfe))
        return cli_usage_error(cmd, "--nfe expects a comma-separated list of positive integers");
      break;
    case 's': solver_list = optarg; break;
    case 'b':
      if (cli_parse_int("--batch", optarg, 1, 1024, &batch))
        return 2;
      break;
    case 'S':
      if (cli_parse_int("--seed", optarg, 0, (1ll << 53) - 1, &seed))
        return 2;
      break;
    case 'c':
      if (cli_parse_int("--class", optarg, 0, 1 << 20, &label))
        return 2;
      break;
    case 'z':
      if (cli_parse_int("--size", optarg, 1, 4096, &size))
        return 2;
      break;
    case 'r':
      if (cli_parse_int("--ref-nfe", optarg, 30, 100000, &ref_nfe))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!model_dir)
    return cli_usage_error(cmd, "--model is required");
  const char *names[MAX_SOLVERS];
  int n_solvers = 0;
  char *list_copy = NULL;
  if (solver_list) {
    list_copy = strdup(solver_list);
    char *save = NULL;
    for (char *t = strtok_r(list_copy, ",", &save); t && n_solvers < MAX_SOLVERS;
         t = strtok_r(NULL, ",", &save))
      names[n_solvers++] = t;
  } else {
    for (size_t i = 0; i < sizeof default_solvers / sizeof *default_solvers; i++)
      names[n_solvers++] = default_solvers[i];
  }
  for (int i = 0; i < n_solvers; i++)
    if (!sampler_solver_class(names[i])) {
      int st = cli_usage_error(cmd, "unknown solver '%s'", names[i]);
      free(list_copy);
      return st;
    }
  err e = {0};
  bench_ctx b = {.batch = (int)batch, .seed = (uint64_t)seed, .threads = (int)threads};
  int status = 1;
  float *ref_min = NULL, *ref_clean = NULL, *ref_half = NULL, *x = NULL;
  if (model_load(model_dir, &b.m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(b.m);
  b.h = b.w = size ? (int)size : mi->sample_size;
  if (b.h < 1) {
    cli_usage_error(cmd, "the model has no sample_size: pass --size");
    status = 2;
    goto done;
  }
  if (mi->num_classes) {
    b.labels = malloc((size_t)b.batch * sizeof *b.labels);
    for (int i = 0; b.labels && i < b.batch; i++)
      b.labels[i] = label;
  }
  b.count = (size_t)b.batch * mi->in_channels * b.h * b.w;
  ref_min = malloc(b.count * sizeof *ref_min);
  ref_clean = malloc(b.count * sizeof *ref_clean);
  ref_half = malloc(b.count * sizeof *ref_half);
  x = malloc(b.count * sizeof *x);
  if (!ref_min || !ref_clean || !ref_half || !x || (mi->num_classes && !b.labels)) {
    cli_fail(cmd, "out of memory");
    goto done;
  }
  fprintf(stderr, "bench solvers: reference solve (%lld NFE)...\n", ref_nfe);
  if (reference(&b, (int)ref_nfe, ref_min, &e) || reference(&b, (int)ref_nfe / 2, ref_half, &e) ||
      clean_estimate(&b, ref_min, ref_clean, &e)) {
    cli_fail(cmd, "reference: %s", e.msg);
    goto done;
  }
  printf("bench solvers: model %s, batch %d, seed %lld%s; reference DPM-Solver-3 (logSNR) with "
         "%lld NFE, its error ~%.1e (vs %lld NFE)\n",
         model_dir, b.batch, seed, mi->num_classes ? " (class-conditional)" : "", ref_nfe,
         rel_l2(ref_half, ref_min, b.count), ref_nfe / 2);
  printf("%-20s", "solver");
  for (int k = 0; k < n_nfe; k++) {
    char hdr[32];
    snprintf(hdr, sizeof hdr, "NFE %d", nfes[k]);
    printf(" %14s", hdr);
  }
  for (int k = 0; k + 1 < n_nfe; k++) {
    char hdr[32];
    snprintf(hdr, sizeof hdr, "p %d-%d", nfes[k], nfes[k + 1]);
    printf(" %9s", hdr);
  }
  printf("\n");
  for (int i = 0; i < n_solvers; i++) {
    double errs[MAX_NFE];
    int used[MAX_NFE];
    sampler *s = NULL;
    if (make(&b, names[i], 0, NULL, &s, &e)) {
      printf("%-20s %s\n", names[i], e.msg);
      continue;
    }
    const int stochastic = sampler_is_stochastic(s), adaptive = sampler_nfe(s) == 0;
    sampler_free(s);
    s = NULL;
    if (stochastic) {
      printf("%-20s (stochastic: skipped)\n", names[i]);
      continue;
    }
    printf("%-20s", names[i]);
    fflush(stdout);
    if (adaptive) { /* its NFE follows from rtol/atol, not from a budget */
      int nfe = 0;
      if (make(&b, names[i], 0, NULL, &s, &e) || run(&b, s, x, &nfe, &e)) {
        printf(" %s\n", e.msg);
      } else {
        const float *ref = sampler_ends_clean(s) ? ref_clean : ref_min;
        printf(" %.3e with %d NFE (rtol %g, atol %g)\n", rel_l2(x, ref, b.count), nfe,
               sampler_config(s)->rtol, sampler_config(s)->atol);
      }
      sampler_free(s);
      continue;
    }
    for (int k = 0; k < n_nfe; k++) {
      errs[k] = NAN;
      used[k] = 0;
      /* the most steps whose planned NFE fits the budget */
      int steps = nfes[k];
      for (; steps >= 1; steps--) {
        if (make(&b, names[i], steps, NULL, &s, NULL) == ERR_OK && sampler_nfe(s) <= nfes[k])
          break;
        sampler_free(s);
        s = NULL;
      }
      char cell[40] = "-";
      if (steps >= 1 && s) {
        int nfe = 0;
        if (run(&b, s, x, &nfe, &e) == ERR_OK) {
          errs[k] = rel_l2(x, sampler_ends_clean(s) ? ref_clean : ref_min, b.count);
          used[k] = nfe;
          if (nfe == nfes[k])
            snprintf(cell, sizeof cell, "%.3e", errs[k]);
          else
            snprintf(cell, sizeof cell, "%.3e(%d)", errs[k], nfe);
        } else {
          snprintf(cell, sizeof cell, "error");
        }
      }
      sampler_free(s);
      s = NULL;
      printf(" %14s", cell);
      fflush(stdout);
    }
    for (int k = 0; k + 1 < n_nfe; k++) {
      if (isfinite(errs[k]) && isfinite(errs[k + 1]) && errs[k + 1] > 0 && used[k + 1] > used[k])
        printf(" %9.2f", log(errs[k] / errs[k + 1]) / log((double)used[k + 1] / used[k]));
      else
        printf(" %9s", "-");
    }
    printf("\n");
  }
  status = 0;
done:
  free(list_copy);
  free(ref_min);
  free(ref_clean);
  free(ref_half);
  free(x);
  free(b.labels);
  model_free(b.m);
  return status;
}
