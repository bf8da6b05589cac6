/* `denoised ot fit`: DPM-OT's transport map for a model (sampler_ot.c): data points (given or the
 * model's own samples) noised to a step of a solver, the authors' dual solve for the potential,
 * and a near-duplication report of the expressway's samples against the data. Writes the map
 * that `sample --scheduler dpm-ot --solver-data NAME|FILE` reads. */
#include <getopt.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "rng.h"

static const char help[] =
    "usage: denoised ot fit [--model DIR] [--class C] [--guidance-scale G] [--data X.npy]\n"
    "                       [--samples N] [--solver NAME] [--steps N] [--step K]\n"
    "                       [--iterations I] [--batch B] [--seed S] [--threads T] [--quiet]\n"
    "                       --out NAME|FILE.json\n"
    "\n"
    "Fits DPM-OT's semi-discrete optimal-transport map from U[0, 1]^d to the data latents at\n"
    "step K of a solver (the data noised to that step's level), as the authors' code does\n"
    "(Adam-like dual steps on the Brenier potential's intercepts, histograms of 10 N source\n"
    "points). `sample --scheduler dpm-ot --solver-data NAME` then maps and runs the remaining\n"
    "steps (NFE = steps - K). Prints how close the map's samples come to the data points.\n"
    "  --model DIR    diffusers model folder (default: the built-in default model)\n"
    "  --out NAME     the model's solver data NAME (DIR/solver_data/NAME.json + .npy, .h.npy)\n"
    "                 or FILE.json anywhere\n"
    "  --class C, --guidance-scale G  the data's class and guidance (as for 'stats')\n"
    "  --data X.npy   data points [N, C, H, W] in [-1, 1] (default: N of the model's samples,\n"
    "                 DPM-Solver++(2M) with 50 steps)\n"
    "  --samples N    data points = transport targets, 2..4096 (default 256)\n"
    "  --solver NAME  the solver of the remaining steps (default dpm++2m; deterministic, one\n"
    "                 evaluation per step)\n"
    "  --steps N      its steps (default 10), --step K the map's step, 1..N-1 (default 5)\n"
    "  --iterations I dual steps, at most (default 300; the authors' stop: gradient norm below\n"
    "                 8e-4 with no empty cell)\n"
    "  --batch B      source points per histogram batch (default 256)\n"
    "  --seed S       seed of the samples, the noise and the source points (default 0)\n"
    "  --threads T    CPU threads for the model (default 2), --quiet no progress bar\n";

typedef struct ot_args {
  cli_data_flags f;
  const char *data, *solver;
  long long samples, steps, step, iterations, batch, seed, threads;
} ot_args;

static const cli_int_flag int_flags[] = {
    {'n', "--samples", 2, 4096, offsetof(ot_args, samples)},
    {'N', "--steps", 2, 1000, offsetof(ot_args, steps)},
    {'K', "--step", 1, 999, offsetof(ot_args, step)},
    {'I', "--iterations", 1, 100000, offsetof(ot_args, iterations)},
    {'b', "--batch", 1, 65536, offsetof(ot_args, batch)},
    {'s', "--seed", 0, (1ll << 53) - 1, offsetof(ot_args, seed)},
    {'j', "--threads", 1, 256, offsetof(ot_args, threads)}};

static int set_flag(int c, const char *arg, void *user) {
  ot_args *a = user;
  const int rc =
      cli_data_flag("ot fit", &a->f, int_flags, sizeof int_flags / sizeof *int_flags, a, c, arg, 1);
  if (rc != 1)
    return rc;
  if (c == 'd')
    a->data = arg;
  else if (c == 'S')
    a->solver = arg;
  else
    return cli_usage_error("ot fit", "unknown option") != 0;
  return 0;
}

static int parse_args(int argc, char **argv, ot_args *a) {
  static const struct option opts[] = {
      {"model", required_argument, 0, 'm'},   {"data", required_argument, 0, 'd'},
      {"samples", required_argument, 0, 'n'}, {"steps", required_argument, 0, 'N'},
      {"step", required_argument, 0, 'K'},    {"iterations", required_argument, 0, 'I'},
      {"batch", required_argument, 0, 'b'},   {"seed", required_argument, 0, 's'},
      {"threads", required_argument, 0, 'j'}, {"out", required_argument, 0, 'o'},
      {"class", required_argument, 0, 'l'},   {"guidance-scale", required_argument, 0, 'g'},
      {"solver", required_argument, 0, 'S'},  {"quiet", no_argument, 0, 'q'},
      {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
  const int st = cli_data_getopt("ot fit", argc, argv, opts, help, set_flag, a);
  if (st >= 0)
    return st;
  if (!a->f.out)
    return cli_usage_error("ot fit", "--out NAME or --out FILE.json is required");
  if (cli_data_out_ok("ot fit", a->f.out) >= 0)
    return 2;
  if (a->step >= a->steps)
    return cli_usage_error("ot fit", "--step %lld must be below --steps %lld", a->step, a->steps);
  if (!a->f.model_dir)
    a->f.model_dir = cli_default_model();
  return -1;
}

/* The targets: data x0 noised to alpha_bar with the seed's stream 1 of each point. */
static void noise_targets(const float *x0, int n, size_t d, double abar, uint64_t seed, float *y) {
  const double a = sqrt(abar), s = sqrt(1 - abar);
  for (int i = 0; i < n; i++) {
    float *yi = y + (size_t)i * d;
    rng_normal(seed, (uint64_t)i, 1, yi, d);
    for (size_t k = 0; k < d; k++)
      yi[k] = (float)(a * x0[(size_t)i * d + k] + s * yi[k]);
  }
}

static double nn_dist(const float *x, const float *set, int n, size_t d, int skip) {
  double best = INFINITY;
  for (int i = 0; i < n; i++) {
    if (i == skip)
      continue;
    double acc = 0;
    for (size_t k = 0; k < d; k++) {
      const double t = (double)x[k] - set[(size_t)i * d + k];
      acc += t * t;
    }
    best = acc < best ? acc : best;
  }
  return sqrt(best);
}

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Near-duplication: the median nearest-neighbour distance of M expressway samples to the data
 * points, against that of the data points among themselves (the disclosure). */
static int disclose(const ot_args *a, const model *m, const cli_data_cond *c, const char *path,
                    const float *x0, int n, size_t d, json_t *hdr, err *e) {
  enum { M = 16 };
  json_t *spec = json_pack("{s:s, s:s}", "name", "dpm-ot", "data", path);
  sampler *s = NULL;
  int rc = sampler_new_from_json(spec, model_scheduler_config(m), &s, e);
  json_decref(spec);
  float *x = malloc((size_t)M * d * sizeof *x);
  int64_t lab[M];
  for (int b = 0; b < M; b++)
    lab[b] = c->labels ? c->labels[b % n] : 0;
  sampler_run_opts o = {.batch = M,
                        .seed = (uint64_t)a->seed + 1000,
                        .threads = (int)a->threads,
                        .labels = c->labels ? lab : NULL,
                        .guidance = c->guided ? &c->g : NULL};
  if (rc == ERR_OK && !x)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = sampler_run(s, m, &o, x, NULL, e);
  if (rc == ERR_OK) {
    double ds[M] = {0}, dd[64] = {0};
    const int nd = n < 64 ? n : 64;
    for (int b = 0; b < M; b++)
      ds[b] = nn_dist(x + (size_t)b * d, x0, n, d, -1);
    for (int i = 0; i < nd; i++)
      dd[i] = nn_dist(x0 + (size_t)i * d, x0, n, d, i);
    qsort(ds, M, sizeof *ds, cmp_double);
    qsort(dd, (size_t)nd, sizeof *dd, cmp_double);
    json_object_set_new(hdr, "nearest_neighbour",
                        json_pack("{s:i, s:f, s:f, s:f}", "samples", M, "median", ds[M / 2], "min",
                                  ds[0], "data_median", dd[nd / 2]));
    printf("ot fit: near-duplication: %d expressway samples' nearest data point at median L2 "
           "%.3f (min %.3f); the data points' own nearest neighbours at median %.3f\n",
           M, ds[M / 2], ds[0], dd[nd / 2]);
  }
  sampler_free(s);
  free(x);
  return rc;
}

/* The header's record: model, class, guidance (as the statistics record them), the solver. */
static json_t *header_for(const ot_args *a, const model *m, const cli_data_cond *c,
                          const sampler *s, double abar, double secs,
                          const sampler_ot_fit_report *r) {
  const model_info *mi = model_get_info(m);
  json_t *cf = json_pack(
      "{s:{s:s, s:i, s:i, s:i, s:s}, s:o, s:o, s:i, s:I}", "model", "class_name",
      mi->class_name ? mi->class_name : "", "sample_size", mi->sample_size, "in_channels",
      mi->in_channels, "num_classes", mi->num_classes, "weights_digest", model_weights_digest(m),
      "class_label", mi->num_classes && c->one_class ? json_integer(c->class_label) : json_null(),
      "guidance_scale", !mi->num_classes ? json_null() : json_real(c->guided ? c->g.scale : 1.0),
      "data_points", (int)a->samples, "seed", (json_int_t)a->seed);
  if (cf && c->guided)
    json_object_set_new(cf, "null_class", json_integer(c->g.null_label));
  return json_pack("{s:{s:s, s:i}, s:i, s:f, s:f, s:o, s:{s:i, s:f, s:i, s:i, s:f, s:I, s:f}}",
                   "solver", "name", a->solver, "steps", sampler_num_steps(s), "step", (int)a->step,
                   "timestep", sampler_timesteps(s)[a->step], "alpha_bar", abar, "computed_for", cf,
                   "fit", "iterations", r->iterations, "g_norm", r->g_norm, "empty_cells", r->empty,
                   "doublings", r->doublings, "lr", r->lr, "source_points", r->samples, "seconds",
                   secs);
}

static void on_iter(int it, int total, int nfe, void *user) {
  (void)nfe;
  cli_on_progress(it, total, 0, user);
}

static int fit(const ot_args *a, const model *m, const sampler *s, cli_data_cond *c, err *e) {
  const model_info *mi = model_get_info(m);
  const int n = (int)a->samples, shape[3] = {mi->in_channels, mi->sample_size, mi->sample_size};
  const size_t d = (size_t)shape[0] * shape[1] * shape[2];
  float *x0 = malloc((size_t)n * d * sizeof *x0), *y = malloc((size_t)n * d * sizeof *y);
  float *h = calloc((size_t)n, sizeof *h);
  char path[4200];
  int rc = x0 && y && h ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = cli_data_out_path(a->f.model_dir, a->f.out, path, sizeof path, e);
  if (rc == ERR_OK)
    rc = cli_data_points(a->data, a->seed, (int)a->threads, m, c, n, x0, e);
  const double abar = sampler_ot_abar(s, (int)a->step);
  cli_progress bar;
  cli_progress_init(&bar, a->f.quiet);
  const sampler_ot_fit_opts o = {.max_iter = (int)a->iterations,
                                 .lr = 0.1,
                                 .batch = (int)a->batch,
                                 .seed = (uint64_t)a->seed,
                                 .progress = on_iter,
                                 .progress_user = &bar};
  sampler_ot_fit_report r = {0};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  if (rc == ERR_OK) {
    noise_targets(x0, n, d, abar, (uint64_t)a->seed, y);
    /* a deviation from the authors' start (h = 0, or a saved h): h_i = -E<x, y_i> = -sum(y_i)/2
     * for x ~ U[0, 1]^d, centred, so every cell starts with the same mean score; from 0 the
     * differences of sum(y_i) (tens at d = 1024) take the lr-0.1 steps thousands of iterations */
    double mean = 0;
    for (int i = 0; i < n; i++) {
      double acc = 0;
      for (size_t k = 0; k < d; k++)
        acc += y[(size_t)i * d + k];
      h[i] = (float)(-0.5 * acc);
      mean += h[i];
    }
    for (int i = 0; i < n; i++)
      h[i] -= (float)(mean / n);
    rc = sampler_ot_fit(y, n, d, &o, h, &r, e);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  json_t *hdr =
      rc == ERR_OK
          ? header_for(a, m, c, s, abar,
                       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9,
                       &r)
          : NULL;
  if (rc == ERR_OK && !hdr)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = sampler_ot_write(path, hdr, y, h, n, shape, e);
  if (rc == ERR_OK) {
    printf("ot fit: %d targets at step %lld of %s x %lld (alpha_bar %.4f): %d iterations, "
           "gradient norm %.2e, %d empty cells, %lld source points per iteration\n",
           n, a->step, a->solver, a->steps, abar, r.iterations, r.g_norm, r.empty, r.samples);
    rc = disclose(a, m, c, path, x0, n, d, hdr, e);
  }
  if (rc == ERR_OK && json_dump_file(hdr, path, JSON_INDENT(1) | JSON_SORT_KEYS) != 0)
    rc = err_set(e, ERR_IO, "cannot write %s", path);
  if (rc == ERR_OK && !a->f.quiet)
    fprintf(stderr, "denoised ot fit: wrote %s\n", path);
  json_decref(hdr);
  free(x0);
  free(y);
  free(h);
  return rc;
}

int cmd_ot(int argc, char **argv) {
  /* argv[0] is "ot" */
  if (argc < 2 || strcmp(argv[1], "fit") != 0) {
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
      fputs(help, stdout);
      return 0;
    }
    return cli_usage_error("ot", "expected 'ot fit' (see 'denoised ot fit --help')");
  }
  ot_args a = {.samples = 256,
               .steps = 10,
               .step = 5,
               .iterations = 300,
               .batch = 256,
               .threads = 2,
               .solver = "dpm++2m"};
  int status = parse_args(argc - 1, argv + 1, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  sampler *s = NULL;
  cli_data_cond c = {0};
  json_t *spec = json_pack("{s:s, s:I}", "name", a.solver, "steps", (json_int_t)a.steps);
  if (!spec || model_load(a.f.model_dir, &m, &e) ||
      sampler_new_from_json(spec, model_scheduler_config(m), &s, &e) ||
      sampler_ot_solver_ok(s, (int)a.step, &e)) {
    status = cli_fail("ot fit", "%s", spec ? e.msg : "out of memory");
  } else if ((status = cli_data_condition("ot fit", a.f.class_s, a.f.has_guidance, a.f.guidance, m,
                                          (int)a.samples, &c)) == 0) {
    status = fit(&a, m, s, &c, &e) == ERR_OK ? 0 : cli_fail("ot fit", "%s", e.msg);
  }
  json_decref(spec);
  free(c.labels);
  sampler_free(s);
  model_free(m);
  return status;
}
