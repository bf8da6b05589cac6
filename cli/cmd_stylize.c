/* `denoised stylize`: stylization (AdjointDPM). Fine-tunes a class-conditional model's weights
 * so that a classifier's attribute verdict (every glyph italic) holds on what it generates
 * while the character head goes on reading each class (engine/adjtask), and writes the result
 * as a new model folder; with --eval it measures the style's rate and the class recognition
 * before and after on the same held-out noises. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "adjtask.h"
#include "cli.h"

static const char help[] =
    "usage: denoised stylize [--model DIR] [--classifier DIR] --target SPEC --out NEW_DIR\n"
    "                        [--keep HEAD] [--keep-weight W] [--steps N] [--lr LR] [--batch B]\n"
    "                        [--margin M] [--scheduler NAME] [--sampler-steps N]\n"
    "                        [--guidance-scale G] [--seed S] [--eval N [--eval-seed S]]\n"
    "                        [--threads T] [--quiet]\n"
    "\n"
    "Fine-tunes every weight so that the classifier's verdict SPEC (an attribute: italic,\n"
    "bold, fg=red, ...) holds on the images of every class while the head --keep goes on\n"
    "reading each image's class: each step samples B fresh noises of the classes in turn with\n"
    "the solver and guidance given, takes the margin cross-entropy of the style plus W times\n"
    "that of the class, its gradient to the weights through the whole sampling run by the\n"
    "discrete adjoint, and one Adam step. Writes NEW_DIR (config, weights, scheduler config,\n"
    "the classifier) for --model.\n"
    "  --model DIR        class-conditional UNet2DModel (default: the default model)\n"
    "  --classifier DIR   the classifier (default: DIR/classifier)\n"
    "  --target SPEC      the style: HEAD=LABEL or LABEL items, comma-separated\n"
    "  --out NEW_DIR      the new model folder (must not exist)\n"
    "  --keep HEAD        the head that must keep reading the class (default char)\n"
    "  --keep-weight W    weight of its loss (default 1)\n"
    "  --steps N          Adam steps, 1..10000 (default 40)\n"
    "  --lr LR            Adam's step size (default 2e-4; cosine decay to a tenth)\n"
    "  --batch B          images per step, 1..64 (default 8)\n"
    "  --margin M         logit margin past which an image stops pulling (default 2)\n"
    "  --scheduler NAME   ddim or a DPMSolverMultistepScheduler name (default: the model's\n"
    "                     recommended, else dpm++2m)\n"
    "  --sampler-steps N  inference steps (default 10)\n"
    "  --guidance-scale G classifier-free guidance (default: the model's recommended)\n"
    "  --seed S           step k draws the noises of images k*B .. k*B+B-1 (default 0)\n"
    "  --eval N           before and after: style and class rates on N images (classes in\n"
    "                     turn) from held-out noises (default 0: none)\n"
    "  --eval-seed S      their seed (default 1000003)\n"
    "  --threads T        CPU threads (default 2)\n"
    "  --quiet            only the result lines\n";

typedef struct stylize_args {
  cli_adj_flags f;
  const char *target, *out, *keep;
  long long steps, batch, sampler_steps, eval, eval_seed;
  double lr, margin, keep_weight;
} stylize_args;

static const struct option opts[] = {CLI_ADJ_OPTIONS,
                                     {"target", required_argument, 0, 'T'},
                                     {"out", required_argument, 0, 'o'},
                                     {"keep", required_argument, 0, 'K'},
                                     {"keep-weight", required_argument, 0, 'W'},
                                     {"steps", required_argument, 0, 'n'},
                                     {"lr", required_argument, 0, 'L'},
                                     {"batch", required_argument, 0, 'b'},
                                     {"margin", required_argument, 0, 'M'},
                                     {"sampler-steps", required_argument, 0, 'k'},
                                     {"eval", required_argument, 0, 'E'},
                                     {"eval-seed", required_argument, 0, 'e'},
                                     {"help", no_argument, 0, 'h'},
                                     {0, 0, 0, 0}};

static long long *int_flag(stylize_args *a, int c, long long *lo, long long *hi,
                           const char **name) {
  *lo = 1;
  switch (c) {
  case 'n': *hi = 10000, *name = "--steps"; return &a->steps;
  case 'b': *hi = ADJTASK_MAX_BATCH, *name = "--batch"; return &a->batch;
  case 'k': *hi = 1000, *name = "--sampler-steps"; return &a->sampler_steps;
  case 'E': *lo = 0, *hi = 100000, *name = "--eval"; return &a->eval;
  case 'e': *lo = 0, *hi = (1ll << 53) - 1, *name = "--eval-seed"; return &a->eval_seed;
  default: return NULL;
  }
}

static double *real_flag(stylize_args *a, int c, double *lo, double *hi, const char **name) {
  switch (c) {
  case 'L': *lo = 1e-9, *hi = 1, *name = "--lr"; return &a->lr;
  case 'M': *lo = 0, *hi = 100, *name = "--margin"; return &a->margin;
  case 'W': *lo = 0, *hi = 100, *name = "--keep-weight"; return &a->keep_weight;
  default: return NULL;
  }
}

static const char **text_flag(stylize_args *a, int c) {
  switch (c) {
  case 'T': return &a->target;
  case 'o': return &a->out;
  case 'K': return &a->keep;
  default: return NULL;
  }
}

static int parse_args(int argc, char **argv, stylize_args *a) {
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
    long long lo, hi, *iv;
    double dlo, dhi, *dv;
    const char *name, **text = text_flag(a, c);
    const int shared = cli_adj_flag(&a->f, c, optarg);
    if (shared) {
      if (shared == 2)
        return 2;
    } else if (text) {
      *text = optarg;
    } else if ((iv = int_flag(a, c, &lo, &hi, &name))) {
      if (cli_parse_int(name, optarg, lo, hi, iv))
        return 2;
    } else if ((dv = real_flag(a, c, &dlo, &dhi, &name))) {
      if (cli_parse_double(name, optarg, dlo, dhi, dv))
        return 2;
    } else if (c == 'h') {
      fputs(help, stdout);
      return 0;
    } else {
      return cli_usage_error("stylize", "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error("stylize", "unexpected argument '%s'", argv[optind]);
  if (!a->target || !a->out)
    return cli_usage_error("stylize", "--target and --out are required");
  if (!a->f.model_dir)
    a->f.model_dir = cli_default_model();
  return -1;
}

#define STYLIZE_MAX_CLASSES 1024

typedef struct stylize_cli {
  const stylize_args *a;
  model *m;
  sampler *s;
  classifier *clf;
  guidance gd;
  adjtask_target t[ADJTASK_MAX_TARGETS];
  int nt, keep_head, n_classes;
  int64_t classes[STYLIZE_MAX_CLASSES];
  int keep_cls[STYLIZE_MAX_CLASSES];
  char solver[64];
} stylize_cli;

static int load_parts(stylize_cli *sc, err *e) {
  const stylize_args *a = sc->a;
  struct stat sb;
  if (stat(a->out, &sb) == 0)
    return err_set(e, ERR_INVALID, "--out %s exists (give a new folder)", a->out);
  int rc = model_load(a->f.model_dir, &sc->m, e);
  if (rc)
    return rc;
  const model_info *mi = model_get_info(sc->m);
  if (mi->kind != MODEL_UNET2D || !mi->num_classes)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s: stylize fine-tunes a class-conditional UNet2DModel, and this model has no "
                   "class embeddings",
                   a->f.model_dir);
  if ((rc = cli_adj_classifier(&a->f, &sc->clf, e)))
    return rc;
  if ((rc = adjtask_parse_targets(sc->clf, a->target, sc->t, &sc->nt, e)))
    return err_prefix(e, "--target");
  const char *keep = a->keep ? a->keep : "char";
  if ((sc->keep_head = classifier_head_index(sc->clf, keep)) < 0)
    return err_set(e, ERR_INVALID, "--keep '%s': the classifier has no such head", keep);
  if ((rc = adjtask_class_map(sc->m, sc->clf, sc->keep_head, sc->classes, sc->keep_cls,
                              STYLIZE_MAX_CLASSES, &sc->n_classes, e)))
    return err_prefix(e, "--keep");
  if ((rc = cli_adj_guidance(&a->f, sc->m, &sc->gd, e)))
    return rc;
  return cli_adj_solver(&a->f, sc->m, 1, a->sampler_steps, sc->solver, sizeof sc->solver, &sc->s,
                        e);
}

/* Style and class rates on --eval images of the classes in turn. */
static int evaluate(stylize_cli *sc, const char *when, err *e) {
  const stylize_args *a = sc->a;
  const int n = (int)a->eval, nl = classifier_get_info(sc->clf)->n_logits;
  float *logits = malloc((size_t)n * nl * sizeof(float));
  int64_t *labels = malloc((size_t)n * sizeof *labels);
  int rc = logits && labels ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; rc == ERR_OK && i < n; i++)
    labels[i] = sc->classes[i % sc->n_classes];
  const adjtask_gen g = {.s = sc->s, .gd = &sc->gd, .threads = (int)a->f.threads};
  if (rc == ERR_OK)
    rc = adjtask_generate_logits(sc->m, &g, sc->clf, labels, n, (uint64_t)a->eval_seed, 0, logits,
                                 e);
  int style = 0, kept = 0;
  for (int i = 0; rc == ERR_OK && i < n; i++) {
    const adjtask_target k = {.head = sc->keep_head, .cls = sc->keep_cls[i % sc->n_classes]};
    style += adjtask_verdict(sc->clf, logits + (size_t)i * nl, sc->t, sc->nt);
    kept += adjtask_verdict(sc->clf, logits + (size_t)i * nl, &k, 1);
  }
  if (rc == ERR_OK)
    printf("%s: style %d of %d (%.1f%%), class read %d of %d (%.1f%%)\n", when, style, n,
           100.0 * style / n, kept, n, 100.0 * kept / n);
  free(logits);
  free(labels);
  return rc;
}

/* NEW_DIR: the fine-tuned weights, the model's config and scheduler config, the classifier. */
static int save(stylize_cli *sc, err *e) {
  const stylize_args *a = sc->a;
  char cdir[4096];
  cli_adj_classifier_dir(&a->f, cdir, sizeof cdir);
  const char *meta[] = {"format", "pt", "trained_by", "denoised stylize", "target", a->target};
  int rc = adjtask_save_model(sc->m, a->f.model_dir, cdir, a->out, meta, 3, e);
  if (rc == ERR_OK)
    printf("saved %s\n", a->out);
  return rc;
}

static void on_step(const stylize_progress *p, void *user) {
  const stylize_args *a = user;
  if (!a->f.quiet)
    fprintf(stderr, "stylize: step %d of %d: loss %.4f, style %.0f%%, class read %.0f%%\n", p->step,
            p->total, p->loss, 100.0 * p->style, 100.0 * p->keep);
}

static int run(stylize_cli *sc, err *e) {
  const stylize_args *a = sc->a;
  int rc = a->eval ? evaluate(sc, "before", e) : ERR_OK;
  const stylize_opts o = {.gen = {.s = sc->s, .gd = &sc->gd, .threads = (int)a->f.threads},
                          .clf = sc->clf,
                          .targets = sc->t,
                          .n_targets = sc->nt,
                          .keep_head = sc->keep_head,
                          .classes = sc->classes,
                          .keep_cls = sc->keep_cls,
                          .n_classes = sc->n_classes,
                          .keep_weight = a->keep_weight,
                          .steps = (int)a->steps,
                          .batch = (int)a->batch,
                          .lr = a->lr,
                          .margin = a->margin,
                          .seed = (uint64_t)a->f.seed,
                          .progress = on_step,
                          .progress_user = (void *)a};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  if (rc == ERR_OK)
    rc = stylize_optimize(sc->m, &o, e);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (rc == ERR_OK) {
    printf("fine-tuned in %.1f s (%lld steps of %lld images, %s %lld steps, guidance %g)\n",
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec), a->steps,
           a->batch, sc->solver, a->sampler_steps, sc->gd.scale);
    rc = save(sc, e);
  }
  if (rc == ERR_OK && a->eval)
    rc = evaluate(sc, "after", e);
  return rc;
}

int cmd_stylize(int argc, char **argv) {
  stylize_args a = {.steps = 40,
                    .batch = 8,
                    .sampler_steps = 10,
                    .eval_seed = 1000003,
                    .f = {.threads = 2},
                    .lr = 2e-4,
                    .margin = 2,
                    .keep_weight = 1};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  stylize_cli sc = {.a = &a};
  int rc = load_parts(&sc, &e);
  if (rc == ERR_OK)
    rc = run(&sc, &e);
  if (rc != ERR_OK)
    cli_fail("stylize", "%s", e.msg);
  sampler_free(sc.s);
  classifier_free(sc.clf);
  model_free(sc.m);
  return rc == ERR_OK ? 0 : 1;
}
