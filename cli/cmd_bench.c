/* `denoised bench unet`: times network evaluations on random inputs and
 * reports ms per forward, effective GFLOP/s and peak RSS; `denoised bench train` times
 * training steps the same way. The side-by-side comparisons with PyTorch live in bench/unet
 * and bench/train, which call these. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cli.h"
#include "gemm.h"
#include "guidance.h"
#include "model.h"
#include "rng.h"
#include "schedule.h"
#include "train.h"

static const char help[] =
    "usage: denoised bench unet --model DIR [--batch B] [--threads T] [--size S]\n"
    "                           [--iters N] [--warmup W] [--guidance-scale G]\n"
    "                           [--precision fp32|bf16]\n"
    "       denoised bench train --model DIR [--batch B] [--threads T] [--iters N] [--warmup W]\n"
    "       denoised bench solvers --model DIR [--nfe 5,10,20,50] ...  (solver accuracy; --help)\n"
    "\n"
    "unet: times one network evaluation (median of N) on Gaussian noise (a text-conditional\n"
    "      UNet's with 77 Gaussian encoder hidden states per image).\n"
    "train: times one training step (forward, backward to every parameter, AdamW at lr 1e-4;\n"
    "       the model's own schedule, epsilon loss) on random images, labels and timesteps.\n"
    "  --batch B    images per forward (default 1)\n"
    "  --threads T  CPU threads (default 2)\n"
    "  --size S     image side (default: the model's sample_size)\n"
    "  --iters N    timed runs (default 5); --warmup W untimed runs first (default 2:\n"
    "               the first pass sizes the scratch memory, the second touches it)\n"
    "  --guidance-scale G  time one classifier-free-guided evaluation, as a sampling step makes\n"
    "               it: the conditional and unconditional passes as one forward of 2 B images\n"
    "  --precision P  fp32 (default) or bf16 (unet only; AVX512-BF16 CPUs)\n";

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Peak resident memory of this process. ru_maxrss would also count a
 * parent's peak when we were started from a big process (e.g. a Python
 * benchmark driver), so the kernel's VmHWM is read instead. */
static double peak_rss_mb(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  double kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0)
      kb = strtod(line + 6, NULL);
  if (f)
    fclose(f);
  if (kb == 0) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    kb = (double)ru.ru_maxrss;
  }
  return kb / 1024.0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

typedef struct unet_args {
  const char *model_dir;
  long long batch, threads, size, iters, warmup;
  double gscale;
  int guided; /* --guidance-scale given */
  model_precision precision;
} unet_args;

static const struct option unet_opts[] = {{"model", required_argument, 0, 'm'},
                                          {"batch", required_argument, 0, 'b'},
                                          {"threads", required_argument, 0, 'j'},
                                          {"size", required_argument, 0, 's'},
                                          {"iters", required_argument, 0, 'n'},
                                          {"warmup", required_argument, 0, 'w'},
                                          {"guidance-scale", required_argument, 0, 'g'},
                                          {"precision", required_argument, 0, 'p'},
                                          {"help", no_argument, 0, 'h'},
                                          {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_unet_args(int argc, char **argv, unet_args *a) {
  const char *cmd = "bench";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:b:j:s:n:w:g:p:h", unet_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'b':
      if (cli_parse_int("--batch", optarg, 1, 4096, &a->batch))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 's':
      if (cli_parse_int("--size", optarg, 1, 4096, &a->size))
        return 2;
      break;
    case 'n':
      if (cli_parse_int("--iters", optarg, 1, 10000, &a->iters))
        return 2;
      break;
    case 'w':
      if (cli_parse_int("--warmup", optarg, 0, 10000, &a->warmup))
        return 2;
      break;
    case 'g':
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->gscale))
        return 2;
      a->guided = 1;
      break;
    case 'p':
      if (cli_parse_precision(optarg, &a->precision))
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

/* One evaluation's inputs (Gaussian noise at t = 500, class 0, and for a text-conditional UNet
 * 77 Gaussian encoder hidden states per image, CLIP's context length), its output and the
 * timings. */
#define BENCH_SEQ 77
typedef struct unet_bufs {
  float *x, *out, *t, *ehs;
  int64_t *labels;
  double *times;
} unet_bufs;

static void unet_bufs_free(unet_bufs *b) {
  free(b->x);
  free(b->ehs);
  free(b->out);
  free(b->t);
  free(b->labels);
  free(b->times);
}

/* n images of side s; -1 when out of memory. */
static int unet_inputs(const model_info *mi, int s, int n, long long iters, unet_bufs *b) {
  size_t per = (size_t)mi->in_channels * s * s;
  b->x = malloc(sizeof(float) * per * n);
  b->out = malloc(sizeof(float) * (size_t)mi->out_channels * s * s * n);
  b->t = malloc(sizeof(float) * n);
  b->labels = calloc((size_t)n, sizeof *b->labels);
  b->times = malloc(sizeof(double) * (size_t)iters);
  const size_t ne = (size_t)n * BENCH_SEQ * mi->cross_attention_dim;
  if (ne && !(b->ehs = malloc(sizeof(float) * ne)))
    return -1;
  if (!b->x || !b->out || !b->t || !b->labels || !b->times)
    return -1;
  if (ne)
    rng_normal(0, 0, 1, b->ehs, ne);
  for (int i = 0; i < n; i++) {
    rng_normal(0, (uint64_t)i, 0, b->x + per * i, per);
    b->t[i] = 500.0f;
  }
  return 0;
}

/* --warmup untimed evaluations, then --iters timed ones into b->times, sorted. */
static int time_evals(const unet_args *a, const model *m, int s, int n, unet_bufs *b,
                      const guidance *g, err *e) {
  const int64_t *lab = model_get_info(m)->num_classes ? b->labels : NULL;
  for (long long i = 0; i < a->warmup + a->iters; i++) {
    double t0 = now_ms();
    const model_call call = {.x = b->x,
                             .n = n,
                             .h = s,
                             .w = s,
                             .t = b->t,
                             .labels = lab,
                             .encoder_hidden_states = b->ehs,
                             .seq_len = b->ehs ? BENCH_SEQ : 0,
                             .threads = (int)a->threads};
    int rc = guidance_eval(a->guided ? g : NULL, m, &call, b->out, e);
    if (rc != ERR_OK)
      return rc;
    if (i >= a->warmup)
      b->times[i - a->warmup] = now_ms() - t0;
  }
  qsort(b->times, (size_t)a->iters, sizeof *b->times, cmp_double);
  return ERR_OK;
}

static void print_unet_report(const unet_args *a, const model *m, int s, int n, const double *times,
                              double load_ms) {
  /* a guided evaluation (g other than 0 and 1) is one forward of twice the batch */
  const int fwd = a->guided && a->gscale != 0 && a->gscale != 1 ? 2 * n : n;
  double med = times[a->iters / 2], flops = model_flops(m, s, s) * fwd;
  printf("bench unet: batch=%d threads=%lld size=%d ms_per_forward=%.3f ms_per_image=%.3f "
         "gflops=%.1f peak_rss_mb=%.1f kernel=%s load_ms=%.1f precision=%s",
         n, a->threads, s, med, med / n, flops / (med * 1e6), peak_rss_mb(), gemm_kernel_name(),
         load_ms, a->precision == MODEL_BF16 ? "bf16" : "fp32");
  if (a->guided)
    printf(" guidance=%g forwards_per_step=1 images_per_forward=%d", a->gscale, fwd);
  putchar('\n');
}

static int bench_unet(int argc, char **argv) {
  const char *cmd = "bench";
  unet_args a = {.batch = 1, .threads = 2, .iters = 5, .warmup = 2, .gscale = 1};
  int status = parse_unet_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  model *m = NULL;
  const double t_load = now_ms();
  if (cli_load_model(cmd, a.model_dir, a.precision, &m))
    return 1;
  const double load_ms = now_ms() - t_load;
  const model_info *mi = model_get_info(m);
  const int s = a.size ? (int)a.size : mi->sample_size, n = (int)a.batch;
  if (a.guided && mi->cross_attention_dim) {
    model_free(m);
    return cli_usage_error(cmd, "--guidance-scale is for class-conditional models; time a "
                                "text-conditional one's guided step as --batch 2");
  }
  if (s < 1) {
    model_free(m);
    return cli_usage_error(cmd, "the model has no sample_size: pass --size");
  }
  unet_bufs b = {0};
  status = 1;
  if (unet_inputs(mi, s, n, a.iters, &b)) {
    cli_fail(cmd, "out of memory");
  } else {
    guidance g = guidance_for(m, a.gscale);
    if ((a.guided && guidance_check(&g, m, &e)) || time_evals(&a, m, s, n, &b, &g, &e)) {
      cli_fail(cmd, "%s", e.msg);
    } else {
      print_unet_report(&a, m, s, n, b.times, load_ms);
      status = 0;
    }
  }
  unet_bufs_free(&b);
  model_free(m);
  return status;
}

/* --warmup untimed then --iters timed training steps of m at batch n into times, sorted. */
static int time_train_steps(const unet_args *a, model *m, int n, double *times, err *e) {
  const model_info *mi = model_get_info(m);
  const json_t *own = model_scheduler_config(m);
  sched_config sc;
  int rc = own ? sched_config_from_json(own, NULL, 0, &sc, e) : sched_config_init(&sc, NULL, e);
  if (rc)
    return rc;
  const train_config tc = {.prediction = SCHED_PRED_EPSILON,
                           .null_class = mi->null_class,
                           .lr_kind = TRAIN_LR_CONSTANT,
                           .lr = 1e-4,
                           .total_steps = (long)(a->warmup + a->iters),
                           .adamw = {0.9, 0.999, 1e-8, 0.01},
                           .seed = 1,
                           .threads = (int)a->threads};
  trainer *t = NULL;
  rc = trainer_new(m, &sc, &tc, &t, e);
  sched_config_free(&sc);
  const int s = mi->sample_size;
  const size_t per = (size_t)mi->in_channels * s * s;
  float *x0 = malloc(sizeof(float) * per * n);
  int64_t *labels = calloc((size_t)n, sizeof *labels);
  if (!rc && (!x0 || !labels))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; !rc && i < n; i++) {
    rng_uniform(1, (uint64_t)i, 0, x0 + per * i, per);
    for (size_t k = 0; k < per; k++)
      x0[per * i + k] = 2 * x0[per * i + k] - 1;
    labels[i] = mi->num_classes ? i % mi->num_classes : 0;
  }
  for (long long i = 0; !rc && i < a->warmup + a->iters; i++) {
    const double t0 = now_ms();
    train_step_info info;
    rc = trainer_step(t, x0, mi->num_classes ? labels : NULL, n, s, s, &info, e);
    if (i >= a->warmup)
      times[i - a->warmup] = now_ms() - t0;
  }
  if (!rc)
    qsort(times, (size_t)a->iters, sizeof *times, cmp_double);
  free(x0);
  free(labels);
  trainer_free(t);
  return rc;
}

static int bench_train(int argc, char **argv) {
  const char *cmd = "bench train";
  unet_args a = {.batch = 16, .threads = 2, .iters = 5, .warmup = 2, .gscale = 1};
  int status = parse_unet_args(argc, argv, &a);
  if (status >= 0)
    return status;
  if (a.size || a.guided || a.precision != MODEL_FP32)
    return cli_usage_error(cmd, "--size, --guidance-scale and --precision are for 'bench unet'");
  err e = {0};
  model *m = NULL;
  if (model_load(a.model_dir, &m, &e))
    return cli_fail(cmd, "%s", e.msg);
  const int n = (int)a.batch;
  double *times = malloc(sizeof(double) * (size_t)a.iters);
  status = 1;
  if (!times) {
    cli_fail(cmd, "out of memory");
  } else if (time_train_steps(&a, m, n, times, &e)) {
    cli_fail(cmd, "%s", e.msg);
  } else {
    const double med = times[a.iters / 2];
    printf("bench train: batch=%d threads=%lld size=%d ms_per_step=%.3f ms_per_image=%.3f "
           "min_ms=%.3f peak_rss_mb=%.1f kernel=%s\n",
           n, a.threads, model_get_info(m)->sample_size, med, med / n, times[0], peak_rss_mb(),
           gemm_kernel_name());
    status = 0;
  }
  free(times);
  model_free(m);
  return status;
}

int cmd_bench(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    fputs(help, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "solvers") == 0)
    return cmd_bench_solvers(argc - 1, argv + 1);
  if (strcmp(argv[1], "train") == 0)
    return bench_train(argc - 1, argv + 1);
  if (strcmp(argv[1], "unet") != 0)
    return cli_usage_error("bench", "unknown benchmark '%s' (available: unet, train, solvers)",
                           argv[1]);
  return bench_unet(argc - 1, argv + 1);
}
