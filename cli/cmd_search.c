/* `denoised search`: an S^3-style evolutionary search for a USF solver schedule of a model at a
 * given NFE (sampler_search.c), scored against a many-step reference on fixed noise, with the
 * best schedule's error on held-out noise; writes the schedule `--scheduler usf --solver-data`
 * runs. */
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

static const char help[] =
    "usage: denoised search [--model DIR] --nfe N [--class C] [--guidance-scale G]\n"
    "                       [--budget CANDIDATES] [--population P] [--batch B] [--seed S]\n"
    "                       [--ref-steps R] [--threads T] [--resume] [--quiet]\n"
    "                       --out NAME|FILE.json\n"
    "\n"
    "Searches a USF solver schedule of N steps (NFE N) by the S^3 paper's mutation and\n"
    "crossover rules, each candidate scored by its relative L2 error against an R-step\n"
    "DPM-Solver++(2M) solve from the same B noise images; prints the best so far after each\n"
    "candidate, then the best schedule's error on held-out noise next to DPM-Solver++(2M).\n"
    "Every candidate tried is kept in OUT.search.json; --resume continues from it.\n"
    "  --budget C     candidates to evaluate (default 100; the first 5 are DPM-Solver++ 1/2M/3M\n"
    "                 on lambda-uniform points and 2M/3M on diffusers' 2M grid)\n"
    "  --population P parents kept (default 8), --batch B images per score (default 4)\n"
    "  --ref-steps R  the reference's steps (default 200), --seed S the noise (default 0;\n"
    "                 held-out: S + 1)\n";

typedef struct search_args {
  cli_data_flags f;
  long long nfe, budget, population, batch, seed, ref_steps, threads;
  int resume;
} search_args;

static const cli_int_flag int_flags[] = {
    {'n', "--nfe", 2, 32, offsetof(search_args, nfe)},
    {'b', "--budget", 6, 100000, offsetof(search_args, budget)},
    {'p', "--population", 2, 1000, offsetof(search_args, population)},
    {'B', "--batch", 1, 64, offsetof(search_args, batch)},
    {'s', "--seed", 0, (1ll << 53) - 1, offsetof(search_args, seed)},
    {'r', "--ref-steps", 20, 1000, offsetof(search_args, ref_steps)},
    {'j', "--threads", 1, 256, offsetof(search_args, threads)}};

static int set_flag(int c, const char *arg, void *user) {
  search_args *a = user;
  const int rc =
      cli_data_flag("search", &a->f, int_flags, sizeof int_flags / sizeof *int_flags, a, c, arg, 1);
  if (rc != 1)
    return rc;
  if (c != 'R')
    return cli_usage_error("search", "unknown option") != 0;
  a->resume = 1;
  return 0;
}

static int parse_args(int argc, char **argv, search_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"nfe", required_argument, 0, 'n'},
                                       {"budget", required_argument, 0, 'b'},
                                       {"population", required_argument, 0, 'p'},
                                       {"batch", required_argument, 0, 'B'},
                                       {"seed", required_argument, 0, 's'},
                                       {"ref-steps", required_argument, 0, 'r'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"out", required_argument, 0, 'o'},
                                       {"class", required_argument, 0, 'l'},
                                       {"guidance-scale", required_argument, 0, 'g'},
                                       {"resume", no_argument, 0, 'R'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const int st = cli_data_getopt("search", argc, argv, opts, help, set_flag, a);
  if (st >= 0)
    return st;
  if (!a->f.out || !a->nfe)
    return cli_usage_error("search", "--nfe N and --out NAME|FILE.json are required");
  if (cli_data_out_ok("search", a->f.out) >= 0)
    return 2;
  if (!a->f.model_dir)
    a->f.model_dir = cli_default_model();
  return -1;
}

static void on_candidate(int tried, int budget, double score, double best, void *user) {
  const search_args *a = user;
  if (!a->f.quiet)
    fprintf(stderr, "\rsearch: candidate %d/%d: %.4f, best %.4f   ", tried, budget, score, best);
}

static int run(const search_args *a, const model *m, const cli_data_cond *c, err *e) {
  char path[4200], state[4300];
  int rc = cli_data_out_path(a->f.model_dir, a->f.out, path, sizeof path, e);
  if (rc != ERR_OK)
    return rc;
  snprintf(state, sizeof state, "%.*s.search.json", (int)(strlen(path) - 5), path);
  sampler_search_opts o = {.nfe = (int)a->nfe,
                           .budget = (int)a->budget,
                           .population = (int)a->population,
                           .ref_steps = (int)a->ref_steps,
                           .run = {.batch = (int)a->batch,
                                   .seed = (uint64_t)a->seed,
                                   .threads = (int)a->threads,
                                   .labels = c->labels,
                                   .guidance = c->guided ? &c->g : NULL},
                           .state_path = state,
                           .resume = a->resume,
                           .progress = on_candidate,
                           .progress_user = (void *)a};
  sampler_search_result r = {0};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  rc = sampler_search(m, model_scheduler_config(m), &o, &r, e);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (rc == ERR_OK) {
    const double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    /* the schedule file stays a plain schedule (strict keys); the result joins the state */
    json_t *st = json_load_file(state, 0, NULL);
    if (st)
      json_object_set_new(st, "result",
                          json_pack("{s:i, s:f, s:f, s:f, s:i, s:I, s:i, s:f}", "candidates",
                                    r.tried, "score", r.score, "heldout", r.heldout,
                                    "heldout_dpmpp_2m", r.heldout_2m, "ref_steps",
                                    (int)a->ref_steps, "seed", (json_int_t)a->seed, "batch",
                                    (int)a->batch, "seconds", secs));
    if (json_dump_file(r.schedule, path, JSON_INDENT(1) | JSON_REAL_PRECISION(17)) != 0 ||
        (st && json_dump_file(st, state, JSON_REAL_PRECISION(17)) != 0))
      rc = err_set(e, ERR_IO, "cannot write %s", path);
    else
      printf("%ssearch: NFE %lld, %d candidates in %.0f s: best %.4f on the search noise; "
             "held-out %.4f (DPM-Solver++(2M) %.4f); wrote %s\n",
             a->f.quiet ? "" : "\n", a->nfe, r.tried, secs, r.score, r.heldout, r.heldout_2m, path);
    json_decref(st);
  }
  json_decref(r.schedule);
  return rc;
}

int cmd_search(int argc, char **argv) {
  search_args a = {.budget = 100, .population = 8, .batch = 4, .ref_steps = 200, .threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  cli_data_cond c = {0};
  if (model_load(a.f.model_dir, &m, &e)) {
    status = cli_fail("search", "%s", e.msg);
  } else if ((status = cli_data_condition("search", a.f.class_s, a.f.has_guidance, a.f.guidance, m,
                                          (int)a.batch, &c)) == 0) {
    status = run(&a, m, &c, &e) == ERR_OK ? 0 : cli_fail("search", "%s", e.msg);
  }
  free(c.labels);
  model_free(m);
  return status;
}
