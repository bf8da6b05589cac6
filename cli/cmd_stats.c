/* `denoised stats`: DPM-Solver-v3's empirical model statistics for a model (engine:
 * sampler_v3_stats_compute), from given data or, by default, the model's own 50-step
 * DPM-Solver++(2M) samples, for one class or all and one guidance scale, written as a statistics
 * file beside the model (--out NAME: MODEL/solver_data/NAME.json) or anywhere (--out FILE.json),
 * which `sample --scheduler dpm-solver-v3 --solver-data NAME|FILE` reads. */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "npy.h"
#include "sampler.h"

static const char help[] =
    "usage: denoised stats [--model DIR] [--class C] [--guidance-scale G] [--data X.npy]\n"
    "                      [--samples N] [--grid K] [--seed S] [--threads T] [--quiet]\n"
    "                      [--no-thresholding]\n"
    "                      --out NAME|FILE.json\n"
    "\n"
    "Computes DPM-Solver-v3's empirical model statistics (l, s, b per pixel on a grid uniform\n"
    "in lambda over the model's schedule) and writes them with a header recording what they\n"
    "are for (the model's weights digest, the schedule, the class and the guidance scale).\n"
    "  --model DIR    diffusers model folder (default: the built-in default model)\n"
    "  --out NAME     the model's solver data NAME: DIR/solver_data/NAME.json + NAME.npy\n"
    "                 (NAME: letters, digits, . _ -), which 'sample --solver-data NAME' and\n"
    "                 the daemon's scheduler.data find; or FILE.json (+ FILE.npy) anywhere\n"
    "  --class C      class-conditional models: statistics of class C (an index or a name);\n"
    "                 without it the data points cycle through every class and the\n"
    "                 statistics serve any class\n"
    "  --guidance-scale G  classifier-free guidance of every evaluation (default: none, the\n"
    "                 conditional model, i.e. scale 1); statistics are per scale, and a run\n"
    "                 with another scale refuses them\n"
    "  --data X.npy   data points [N, C, H, W] in [-1, 1] (default: N samples of the model,\n"
    "                 DPM-Solver++(2M) with 50 steps, with the class(es) and guidance above)\n"
    "  --samples N    data points, 2..64 (default 16; with --data: its first N)\n"
    "  --grid K       grid intervals, 2..100000 (default 120)\n"
    "  --seed S       seed of the samples and of the noise at every grid point (default 0)\n"
    "  --threads T    CPU threads (default 2)\n"
    "  --quiet        no progress bar\n"
    "  --no-thresholding  statistics of the plain ODE where the model's scheduler config\n"
    "                 turns dynamic thresholding on (by default they are of the thresholded\n"
    "                 one v3 then solves; runs must match, for 'sample --scheduler-opt\n"
    "                 thresholding=false')\n"
    "Cost: 5 N network evaluations per grid point (finite-difference Jacobian-vector products;\n"
    "twice the images with guidance), plus 50 batched ones for the samples.\n";

typedef struct stats_args {
  const char *model_dir, *data, *out, *class_s;
  long long samples, grid, seed, threads;
  double guidance;
  int has_guidance, quiet, no_thresholding;
} stats_args;

/* The integer flags, by option letter: one table, one range check. */
static const struct {
  int c;
  const char *flag;
  long long lo, hi;
  size_t off;
} int_flags[] = {{'n', "--samples", 2, 64, offsetof(stats_args, samples)},
                 {'k', "--grid", 2, 100000, offsetof(stats_args, grid)},
                 {'s', "--seed", 0, (1ll << 53) - 1, offsetof(stats_args, seed)},
                 {'j', "--threads", 1, 256, offsetof(stats_args, threads)}};

/* 0, or non-zero after printing the usage error (an unknown option included). */
static int int_flag(int c, const char *arg, stats_args *a) {
  for (size_t i = 0; i < sizeof int_flags / sizeof int_flags[0]; i++)
    if (int_flags[i].c == c)
      return cli_parse_int(int_flags[i].flag, arg, int_flags[i].lo, int_flags[i].hi,
                           (long long *)((char *)a + int_flags[i].off));
  return cli_usage_error("stats", "unknown option") != 0;
}

static int parse_args(int argc, char **argv, stats_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"data", required_argument, 0, 'd'},
                                       {"samples", required_argument, 0, 'n'},
                                       {"grid", required_argument, 0, 'k'},
                                       {"seed", required_argument, 0, 's'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"out", required_argument, 0, 'o'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"class", required_argument, 0, 'l'},
                                       {"guidance-scale", required_argument, 0, 'g'},
                                       {"no-thresholding", no_argument, 0, 't'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'd': a->data = optarg; break;
    case 'o': a->out = optarg; break;
    case 'q': a->quiet = 1; break;
    case 't': a->no_thresholding = 1; break;
    case 'l': a->class_s = optarg; break;
    case 'g':
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
      break;
    case 'h': fputs(help, stdout); return 0;
    default:
      if (int_flag(c, optarg, a) != 0)
        return 2;
    }
  }
  if (optind < argc)
    return cli_usage_error("stats", "unexpected argument '%s'", argv[optind]);
  if (!a->out)
    return cli_usage_error("stats", "--out NAME or --out FILE.json is required");
  if (sampler_data_is_name(a->out) && !sampler_data_name_ok(a->out))
    return cli_usage_error("stats",
                           "--out '%s' is neither a solver data name (letters, digits, . _ -, "
                           "starting with a letter or digit) nor a FILE.json",
                           a->out);
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  return -1;
}

int cli_data_condition(const char *cmd, const char *class_s, int has_guidance, double scale,
                       const model *m, int n, cli_data_cond *c) {
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes)
    return class_s || has_guidance
               ? cli_usage_error(cmd, "this model is not class-conditional: drop --class "
                                      "and --guidance-scale")
               : 0;
  if (class_s && (c->class_label = model_class_from_name(m, class_s)) < 0)
    return cli_usage_error(cmd, "--class '%s' is not a class of this model (%d classes)", class_s,
                           mi->num_classes);
  c->one_class = class_s != NULL;
  if (!(c->labels = malloc((size_t)n * sizeof *c->labels)))
    return cli_fail(cmd, "out of memory");
  int64_t next = 0;
  for (int b = 0; b < n; b++) {
    if (!c->one_class && next == mi->null_class)
      next = (next + 1) % mi->num_classes;
    c->labels[b] = c->one_class ? c->class_label : next;
    next = (next + 1) % mi->num_classes;
  }
  c->g = guidance_for(m, scale);
  c->guided = has_guidance;
  return 0;
}

int cli_data_points(const char *data, long long seed, int threads, const model *m,
                    const cli_data_cond *c, int n, float *x, err *e) {
  const model_info *mi = model_get_info(m);
  const size_t d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size;
  if (data) {
    npy_array arr = {0};
    int rc = npy_read_f32(data, &arr, e);
    if (rc == ERR_OK &&
        (arr.ndim != 4 || arr.shape[1] != mi->in_channels || arr.shape[2] != mi->sample_size ||
         arr.shape[3] != mi->sample_size || arr.shape[0] < n))
      rc = err_set(e, ERR_INVALID, "%s: expected [N >= %d, %d, %d, %d] data points", data, n,
                   mi->in_channels, mi->sample_size, mi->sample_size);
    if (rc == ERR_OK)
      rc = npy_check_finite(&arr, data, e);
    if (rc == ERR_OK)
      memcpy(x, arr.data, (size_t)n * d * sizeof *x);
    npy_array_free(&arr);
    return rc;
  }
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm++2m", "steps", 50);
  sampler *s = NULL;
  int rc = spec ? sampler_new_from_json(spec, model_scheduler_config(m), &s, e)
                : err_set(e, ERR_NOMEM, "out of memory");
  json_decref(spec);
  if (rc != ERR_OK)
    return rc;
  sampler_run_opts o = {.batch = n,
                        .seed = (uint64_t)seed,
                        .threads = threads,
                        .labels = c->labels,
                        .guidance = c->guided ? &c->g : NULL};
  rc = sampler_run(s, m, &o, x, NULL, e);
  sampler_free(s);
  return rc;
}

int cli_data_out_path(const char *model_dir, const char *out, char *path, size_t n, err *e) {
  if (!sampler_data_is_name(out)) {
    snprintf(path, n, "%s", out);
    return ERR_OK;
  }
  if ((size_t)snprintf(path, n, "%s/%s", model_dir, SAMPLER_DATA_DIR) >= n)
    return err_set(e, ERR_INVALID, "model folder path too long");
  if (mkdir(path, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "cannot make %s: %s", path, strerror(errno));
  snprintf(path + strlen(path), n - strlen(path), "/%s.json", out);
  return ERR_OK;
}

/* Computes and writes; 0 or an exit status. */
static int stats_run(const stats_args *a, const model *m, const sampler *v3, err *e) {
  const model_info *mi = model_get_info(m);
  const int n = (int)a->samples;
  cli_data_cond c = {0};
  int status = cli_data_condition("stats", a->class_s, a->has_guidance, a->guidance, m, n, &c);
  float *x = malloc((size_t)n * mi->in_channels * mi->sample_size * mi->sample_size * sizeof *x);
  if (!status && !x)
    status = cli_fail("stats", "out of memory");
  if (!status) {
    char path[4200];
    cli_progress bar;
    cli_progress_init(&bar, a->quiet);
    const sampler_v3_stats_opts o = {.n = n,
                                     .x0 = x,
                                     .K = (int)a->grid,
                                     .seed = (uint64_t)a->seed,
                                     .threads = (int)a->threads,
                                     .labels = c.labels,
                                     .one_class = c.one_class,
                                     .class_label = c.class_label,
                                     .guidance = c.guided ? &c.g : NULL,
                                     .progress = cli_on_progress,
                                     .progress_user = &bar};
    int rc = cli_data_out_path(a->model_dir, a->out, path, sizeof path, e);
    if (rc == ERR_OK)
      rc = cli_data_points(a->data, a->seed, (int)a->threads, m, &c, n, x, e);
    if (rc == ERR_OK)
      rc = sampler_v3_stats_compute(m, v3, &o, path, e);
    status = rc == ERR_OK ? 0 : cli_fail("stats", "%s", e->msg);
    if (!status && !a->quiet)
      fprintf(stderr, "denoised stats: wrote %s\n", path);
  }
  free(x);
  free(c.labels);
  return status;
}

int cmd_stats(int argc, char **argv) {
  stats_args a = {.samples = 16, .grid = 120, .threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  sampler *v3 = NULL;
  status = 1;
  /* the model's thresholding (if its config asks) is part of the ODE the statistics describe */
  json_t *spec = a.no_thresholding ? json_pack("{s:s, s:i, s:{s:b}}", "name", "dpm-solver-v3",
                                               "steps", 10, "options", "thresholding", 0)
                                   : json_pack("{s:s, s:i}", "name", "dpm-solver-v3", "steps", 10);
  if (!spec)
    cli_fail("stats", "out of memory");
  else if (model_load(a.model_dir, &m, &e) ||
           sampler_new_from_json(spec, model_scheduler_config(m), &v3, &e))
    cli_fail("stats", "%s", e.msg);
  else
    status = stats_run(&a, m, v3, &e);
  json_decref(spec);
  sampler_free(v3);
  model_free(m);
  return status;
}

int cli_data_getopt(const char *cmd, int argc, char **argv, const struct option *opts,
                    const char *help, int (*set)(int c, const char *arg, void *a), void *a) {
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    if (c == 'h') {
      fputs(help, stdout);
      return 0;
    }
    if (set(c, optarg, a) != 0)
      return 2;
  }
  return optind < argc ? cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]) : -1;
}

int cli_data_out_ok(const char *cmd, const char *out) {
  if (sampler_data_is_name(out) && !sampler_data_name_ok(out))
    return cli_usage_error(cmd,
                           "--out '%s' is neither a solver data name (letters, digits, . _ -, "
                           "starting with a letter or digit) nor a FILE.json",
                           out);
  return -1;
}

int cli_data_flag(const char *cmd, cli_data_flags *f, const cli_int_flag *tab, size_t ntab,
                  void *args, int c, const char *arg, int unknown_ok) {
  for (size_t i = 0; i < ntab; i++)
    if (tab[i].c == c)
      return cli_parse_int(tab[i].flag, arg, tab[i].lo, tab[i].hi,
                           (long long *)((char *)args + tab[i].off));
  switch (c) {
  case 'm': f->model_dir = arg; return 0;
  case 'o': f->out = arg; return 0;
  case 'l': f->class_s = arg; return 0;
  case 'q': f->quiet = 1; return 0;
  case 'g':
    f->has_guidance = 1;
    return cli_parse_double("--guidance-scale", arg, 0, GUIDANCE_MAX_SCALE, &f->guidance);
  default: return unknown_ok ? 1 : cli_usage_error(cmd, "unknown option") != 0;
  }
}
