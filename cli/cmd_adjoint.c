/* `denoised adjoint`: gradients through a whole sampling run (engine/solver/adjoint.h): of
 * L = sum(G * sample) with respect to the initial noise, the class-embedding rows and the
 * weights, by the discrete adjoint of the solver at one stored image per step, or by the
 * continuous adjoint of the probability-flow ODE (AdjointDPM) on the solver's time grid. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adjoint.h"
#include "cli.h"
#include "npy.h"
#include "rng.h"

static const char help[] =
    "usage: denoised adjoint [--model DIR] --noise XT.npy|--seed S [--batch B]\n"
    "                        --scheduler NAME --steps N\n"
    "                        [--scheduler-config F] [--class C] [--guidance-scale G]\n"
    "                        --grad-output G.npy [--grad-noise OUT.npy]\n"
    "                        [--grad-class-embedding OUT.npy] [--grad-params OUT.safetensors]\n"
    "                        [--sample OUT.npy] [--method discrete|continuous] [--threads T]\n"
    "                        [--quiet]\n"
    "\n"
    "Samples from the noise XT with the solver, then writes the gradients of\n"
    "L = sum(G * sample) asked for, by the discrete adjoint of the solver (the exact gradient of\n"
    "the sample it produced; memory: one image per step, the network recomputed step by step)\n"
    "or by the continuous adjoint (AdjointDPM: the probability-flow ODE in y = x / alpha,\n"
    "rho = sigma / alpha solved by the first-order exponential integrator on the solver's time\n"
    "grid, then its adjoint ODE backward from the sample; memory: a few images, whatever N).\n"
    "  --model DIR        diffusers UNet2DModel folder (default: the built-in default model)\n"
    "  --noise XT.npy     the initial noise [B, C, S, S] (or [C, S, S]) at the model's size\n"
    "  --seed S           or the noise 'denoised sample --seed S' draws (images 0..B-1), so\n"
    "                     --sample gives that command's images\n"
    "  --batch B          images with --seed, 1..64 (default 1)\n"
    "  --scheduler NAME   ddim, or a DPMSolverMultistepScheduler name (dpm++2m, dpm++1,\n"
    "                     dpm++3m, dpm-solver-2m, ...): deterministic settings only\n"
    "  --steps N          inference steps\n"
    "  --scheduler-config F  scheduler_config keys over the model's (a JSON file)\n"
    "  --class C          the class of every image (or C1,C2,... one per image): an index or a\n"
    "                     name; required for a class-conditional model\n"
    "  --guidance-scale G classifier-free guidance uncond + G (cond - uncond); the gradient\n"
    "                     goes G to the conditional pass and 1 - G to the unconditional one\n"
    "  --grad-output G    [B, C, S, S], the sample's cotangent\n"
    "  --grad-noise OUT   dL/dXT, [B, C, S, S]\n"
    "  --grad-class-embedding OUT  dL/d(the class-embedding row each image adds to the time\n"
    "                     embedding), [B, class embedding size]\n"
    "  --grad-params OUT  dL/d(every weight), under diffusers' names (F32 safetensors)\n"
    "  --sample OUT       the sample itself, [B, C, S, S]\n"
    "  --method M         discrete (default): the gradient of the solver's own image;\n"
    "                     continuous: the gradient of the ODE's solution (the sample is that\n"
    "                     solve's), which the discrete one approaches as N grows\n"
    "  --threads T        CPU threads (default 2)\n"
    "  --quiet            no progress bar\n"
    "At least one of --grad-noise, --grad-class-embedding, --grad-params.\n";

typedef struct adjoint_args {
  const char *model_dir, *noise, *scheduler, *sched_file, *class_s, *g_path;
  const char *gn_path, *gc_path, *gp_path, *sample_path;
  long long steps, threads, seed, batch;
  int has_seed;
  double guidance;
  int has_guidance, quiet;
  adjoint_method method;
} adjoint_args;

static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                     {"noise", required_argument, 0, 'x'},
                                     {"scheduler", required_argument, 0, 'S'},
                                     {"steps", required_argument, 0, 'n'},
                                     {"scheduler-config", required_argument, 0, 'C'},
                                     {"class", required_argument, 0, 'l'},
                                     {"guidance-scale", required_argument, 0, 'g'},
                                     {"grad-output", required_argument, 0, 'G'},
                                     {"grad-noise", required_argument, 0, 'N'},
                                     {"grad-class-embedding", required_argument, 0, 'E'},
                                     {"grad-params", required_argument, 0, 'P'},
                                     {"sample", required_argument, 0, 'o'},
                                     {"method", required_argument, 0, 'M'},
                                     {"threads", required_argument, 0, 'j'},
                                     {"seed", required_argument, 0, 's'},
                                     {"batch", required_argument, 0, 'b'},
                                     {"quiet", no_argument, 0, 'q'},
                                     {"help", no_argument, 0, 'h'},
                                     {0, 0, 0, 0}};

/* The flags that take a path or a name, by option letter. */
static const char **text_flag(adjoint_args *a, int c) {
  switch (c) {
  case 'm': return &a->model_dir;
  case 'x': return &a->noise;
  case 'S': return &a->scheduler;
  case 'C': return &a->sched_file;
  case 'l': return &a->class_s;
  case 'G': return &a->g_path;
  case 'N': return &a->gn_path;
  case 'E': return &a->gc_path;
  case 'P': return &a->gp_path;
  case 'o': return &a->sample_path;
  default: return NULL;
  }
}

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, adjoint_args *a) {
  const char *cmd = "adjoint";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
    const char **text = text_flag(a, c);
    if (text) {
      *text = optarg;
    } else if (c == 'n') {
      if (cli_parse_int("--steps", optarg, 1, 1000, &a->steps))
        return 2;
    } else if (c == 'j') {
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
    } else if (c == 's') {
      if (cli_parse_int("--seed", optarg, 0, (1ll << 53) - 1, &a->seed))
        return 2;
      a->has_seed = 1;
    } else if (c == 'b') {
      if (cli_parse_int("--batch", optarg, 1, 64, &a->batch))
        return 2;
    } else if (c == 'g') {
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
    } else if (c == 'M') {
      if (strcmp(optarg, "discrete") != 0 && strcmp(optarg, "continuous") != 0)
        return cli_usage_error(cmd, "--method '%s': discrete or continuous", optarg);
      a->method = optarg[0] == 'c' ? ADJOINT_CONTINUOUS : ADJOINT_DISCRETE;
    } else if (c == 'q') {
      a->quiet = 1;
    } else if (c == 'h') {
      fputs(help, stdout);
      return 0;
    } else {
      return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->noise == !a->has_seed)
    return cli_usage_error(cmd, "give the initial noise as --noise XT.npy or --seed S (one)");
  if (a->batch && a->noise)
    return cli_usage_error(cmd, "--batch goes with --seed (--noise has its own batch)");
  if (!a->scheduler || !a->steps || !a->g_path)
    return cli_usage_error(cmd, "--scheduler, --steps and --grad-output are required");
  if (!a->gn_path && !a->gc_path && !a->gp_path)
    return cli_usage_error(cmd, "nothing to compute: give --grad-noise, --grad-class-embedding "
                                "or --grad-params");
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  return -1;
}

/* An [B, C, S, S] (or [C, S, S]) .npy of finite values at the model's size, B in [1, 64]. */
static int read_batch(const char *flag, const char *path, const model_info *mi, int want,
                      npy_array *arr, err *e) {
  int rc = npy_read_f32(path, arr, e);
  if (rc == ERR_OK)
    rc = npy_check_finite(arr, flag, e);
  if (rc != ERR_OK)
    return err_prefix(e, "%s", flag);
  const int S = mi->sample_size, three = arr->ndim == 3;
  const int64_t b = three ? 1 : arr->shape[0];
  const int64_t *sh = arr->shape + (three ? 0 : 1);
  if ((arr->ndim != 4 && !three) || sh[0] != mi->in_channels || sh[1] != S || sh[2] != S || b < 1 ||
      b > 64 || (want && b != want))
    return err_set(e, ERR_SHAPE, "%s %s: shape must be [%s, %d, %d, %d]%s", flag, path,
                   want ? "B" : "B <= 64", mi->in_channels, S, S,
                   want ? " with B the noise's batch" : "");
  return ERR_OK;
}

/* The noise `denoised sample --seed S` starts image b from (rng stream 0), as an array. */
static int seeded_noise(const adjoint_args *a, const model_info *mi, npy_array *arr, err *e) {
  const int b = a->batch ? (int)a->batch : 1, S = mi->sample_size;
  const size_t d = (size_t)mi->in_channels * S * S;
  memset(arr, 0, sizeof *arr);
  if (!(arr->data = malloc((size_t)b * d * sizeof(float))))
    return err_set(e, ERR_NOMEM, "out of memory");
  arr->ndim = 4;
  arr->shape[0] = b, arr->shape[1] = mi->in_channels, arr->shape[2] = S, arr->shape[3] = S;
  arr->count = (int64_t)(b * d);
  for (int i = 0; i < b; i++)
    rng_normal((uint64_t)a->seed, (uint64_t)i, 0, arr->data + (size_t)i * d, d);
  return ERR_OK;
}

/* The run's inputs, checked against the model and each other. */
typedef struct adjoint_inputs {
  npy_array noise, g;
  int batch;
  int64_t labels[64];
  guidance gd;
} adjoint_inputs;

static int read_inputs(const adjoint_args *a, const model *m, adjoint_inputs *in, err *e) {
  const model_info *mi = model_get_info(m);
  int rc = a->noise ? read_batch("--noise", a->noise, mi, 0, &in->noise, e)
                    : seeded_noise(a, mi, &in->noise, e);
  in->batch = rc == ERR_OK ? (int)(in->noise.ndim == 3 ? 1 : in->noise.shape[0]) : 0;
  if (rc == ERR_OK)
    rc = read_batch("--grad-output", a->g_path, mi, in->batch, &in->g, e);
  if (rc != ERR_OK)
    return rc;
  if (!mi->num_classes && (a->class_s || a->has_guidance || a->gc_path))
    return err_set(e, ERR_INVALID,
                   "this model is not class-conditional (no class embeddings): drop --class, "
                   "--guidance-scale and --grad-class-embedding");
  if (mi->num_classes && !a->class_s)
    return err_set(e, ERR_INVALID, "--class is required: the model is class-conditional");
  if (mi->num_classes && cli_parse_labels("--class", a->class_s, in->batch, m, in->labels))
    return err_set(e, ERR_INVALID, "bad --class");
  in->gd = guidance_for(m, a->guidance);
  return a->has_guidance ? guidance_check(&in->gd, m, e) : ERR_OK;
}

static int write_outputs(const adjoint_args *a, const model *m, const adjoint_opts *o, err *e) {
  const model_info *mi = model_get_info(m);
  const int S = mi->sample_size;
  const int64_t xs[4] = {o->batch, mi->in_channels, S, S}, cs[2] = {o->batch, mi->class_embed_dim};
  int rc = ERR_OK;
  (void)((a->gn_path && (rc = npy_write_f32(a->gn_path, o->grad_noise, 4, xs, e))) ||
         (a->gc_path && (rc = npy_write_f32(a->gc_path, o->grad_class, 2, cs, e))) ||
         (a->gp_path && (rc = cli_write_param_grads(a->gp_path, m, o->grad_params, e))) ||
         (a->sample_path && (rc = npy_write_f32(a->sample_path, o->sample, 4, xs, e))));
  return rc;
}

static int run(const adjoint_args *a, model *m, const sampler *s, adjoint_inputs *in, err *e) {
  const model_info *mi = model_get_info(m);
  const size_t nd = (size_t)in->batch * mi->in_channels * mi->sample_size * mi->sample_size;
  cli_progress bar;
  cli_progress_init(&bar, a->quiet);
  adjoint_opts o = {.method = a->method,
                    .batch = in->batch,
                    .noise = in->noise.data,
                    .labels = mi->num_classes ? in->labels : NULL,
                    .guidance = a->has_guidance ? &in->gd : NULL,
                    .grad_output = in->g.data,
                    .threads = (int)a->threads,
                    .progress = cli_on_progress,
                    .progress_user = &bar};
  o.sample = malloc(nd * sizeof(float));
  o.grad_noise = malloc(nd * sizeof(float));
  o.grad_class =
      a->gc_path ? malloc((size_t)in->batch * mi->class_embed_dim * sizeof(float)) : NULL;
  int rc = o.sample && o.grad_noise && (!a->gc_path || o.grad_class)
               ? ERR_OK
               : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK && a->gp_path)
    rc = model_grads_new(m, &o.grad_params, e);
  if (rc == ERR_OK)
    rc = adjoint_run(s, m, &o, e);
  if (rc == ERR_OK)
    rc = write_outputs(a, m, &o, e);
  if (rc == ERR_OK && !a->quiet)
    fprintf(stderr, "adjoint: %d steps of %s (%s), batch %d; %s %.1e\n", sampler_num_steps(s),
            sampler_name(s), a->method ? "continuous" : "discrete", in->batch,
            a->method ? "reconstruction of the noise off by" : "replay check", o.replay_err);
  model_grads_free(o.grad_params);
  free(o.sample);
  free(o.grad_noise);
  free(o.grad_class);
  return rc;
}

int cmd_adjoint(int argc, char **argv) {
  adjoint_args a = {.threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  sampler *s = NULL;
  cli_solver cs = {0};
  adjoint_inputs in = {0};
  int rc = model_load(a.model_dir, &m, &e);
  if (rc == ERR_OK)
    rc = read_inputs(&a, m, &in, &e);
  if (rc == ERR_OK)
    rc = cli_solver_from_flags(a.scheduler, a.steps, a.sched_file, NULL, 0, &cs, &e);
  if (rc == ERR_OK)
    rc = cli_solver_make(m, &cs, a.sched_file, &s, &e);
  if (rc == ERR_OK)
    rc = adjoint_check_solver(s, &e);
  if (rc == ERR_OK)
    rc = run(&a, m, s, &in, &e);
  if (rc != ERR_OK)
    cli_fail("adjoint", "%s", e.msg);
  sampler_free(s);
  cli_solver_clear(&cs);
  npy_array_free(&in.noise);
  npy_array_free(&in.g);
  model_free(m);
  return rc == ERR_OK ? 0 : 1;
}
