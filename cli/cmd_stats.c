/* `denoised stats`: DPM-Solver-v3's empirical model statistics for a model (engine:
 * sampler_v3_stats_compute), from given data or, by default, the model's own 50-step
 * DPM-Solver++(2M) samples, written as a statistics file that `sample --scheduler dpm-solver-v3
 * --solver-data FILE` reads. */
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "npy.h"
#include "sampler.h"

static const char help[] =
    "usage: denoised stats [--model DIR] [--data X.npy] [--samples N] [--grid K] [--seed S]\n"
    "                      [--threads T] [--quiet] --out FILE.json\n"
    "\n"
    "Computes DPM-Solver-v3's empirical model statistics (l, s, b per pixel on a grid uniform\n"
    "in lambda over the model's schedule) and writes FILE.json + FILE.npy.\n"
    "  --model DIR    diffusers model folder (default: the built-in default model)\n"
    "  --data X.npy   data points [N, C, H, W] in [-1, 1] (default: N samples of the model,\n"
    "                 DPM-Solver++(2M) with 50 steps, unconditional)\n"
    "  --samples N    data points, 2..64 (default 16; with --data: its first N)\n"
    "  --grid K       grid intervals, 2..100000 (default 120)\n"
    "  --seed S       seed of the samples and of the noise at every grid point (default 0)\n"
    "  --threads T    CPU threads (default 2)\n"
    "  --quiet        no progress bar\n"
    "Cost: 5 N network evaluations per grid point (finite-difference Jacobian-vector products),\n"
    "plus 50 batched ones for the samples.\n";

typedef struct stats_args {
  const char *model_dir, *data, *out;
  long long samples, grid, seed, threads;
  int quiet;
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
  static const struct option opts[] = {
      {"model", required_argument, 0, 'm'},   {"data", required_argument, 0, 'd'},
      {"samples", required_argument, 0, 'n'}, {"grid", required_argument, 0, 'k'},
      {"seed", required_argument, 0, 's'},    {"threads", required_argument, 0, 'j'},
      {"out", required_argument, 0, 'o'},     {"quiet", no_argument, 0, 'q'},
      {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'd': a->data = optarg; break;
    case 'o': a->out = optarg; break;
    case 'q': a->quiet = 1; break;
    case 'h': fputs(help, stdout); return 0;
    default:
      if (int_flag(c, optarg, a) != 0)
        return 2;
    }
  }
  if (optind < argc)
    return cli_usage_error("stats", "unexpected argument '%s'", argv[optind]);
  if (!a->out)
    return cli_usage_error("stats", "--out FILE.json is required");
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  return -1;
}

/* The n data points: the first n of --data, or the model's own samples. */
static int data_points(const stats_args *a, const model *m, int n, float *x, err *e) {
  const model_info *mi = model_get_info(m);
  const size_t d = (size_t)mi->in_channels * mi->sample_size * mi->sample_size;
  if (a->data) {
    npy_array arr = {0};
    int rc = npy_read_f32(a->data, &arr, e);
    if (rc == ERR_OK &&
        (arr.ndim != 4 || arr.shape[1] != mi->in_channels || arr.shape[2] != mi->sample_size ||
         arr.shape[3] != mi->sample_size || arr.shape[0] < n))
      rc = err_set(e, ERR_INVALID, "%s: expected [N >= %d, %d, %d, %d] data points", a->data, n,
                   mi->in_channels, mi->sample_size, mi->sample_size);
    if (rc == ERR_OK)
      rc = npy_check_finite(&arr, a->data, e);
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
  sampler_run_opts o = {.batch = n, .seed = (uint64_t)a->seed, .threads = (int)a->threads};
  rc = sampler_run(s, m, &o, x, NULL, e);
  sampler_free(s);
  return rc;
}

int cmd_stats(int argc, char **argv) {
  stats_args a = {.samples = 16, .grid = 120, .threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  sampler *v3 = NULL;
  float *x = NULL;
  status = 1;
  if (model_load(a.model_dir, &m, &e)) {
    cli_fail("stats", "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  const int n = (int)a.samples;
  x = malloc((size_t)n * mi->in_channels * mi->sample_size * mi->sample_size * sizeof *x);
  json_t *spec = json_pack("{s:s, s:i}", "name", "dpm-solver-v3", "steps", 10);
  if (!x || !spec) {
    json_decref(spec);
    cli_fail("stats", "out of memory");
    goto done;
  }
  int rc = sampler_new_from_json(spec, model_scheduler_config(m), &v3, &e);
  json_decref(spec);
  cli_progress bar;
  cli_progress_init(&bar, a.quiet);
  if (rc == ERR_OK)
    rc = data_points(&a, m, n, x, &e);
  if (rc == ERR_OK)
    rc = sampler_v3_stats_compute(m, v3, x, n, (int)a.grid, (uint64_t)a.seed, (int)a.threads,
                                  cli_on_progress, &bar, a.out, &e);
  if (rc != ERR_OK)
    cli_fail("stats", "%s", e.msg);
  else
    status = 0;
done:
  free(x);
  sampler_free(v3);
  model_free(m);
  return status;
}
