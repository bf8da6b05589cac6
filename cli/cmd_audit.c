/* `denoised audit`: AdjointDPM's security audit of a generator (engine/adjtask's audit_run):
 * adversarial initial noise within an L-infinity box that makes the engine's classifier misread
 * the generated glyph, against random perturbations of the same size. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adjtask.h"
#include "cli.h"
#include "npy.h"

static const char help[] =
    "usage: denoised audit [--model DIR] [--classifier DIR] --class C [--head NAME]\n"
    "                      [--target LABEL] [--seed S] [--batch B] [--eps E[,E...]]\n"
    "                      [--iters K] [--random R] [--scheduler NAME] [--steps N]\n"
    "                      [--guidance-scale G] [--out-noise OUT.npy] [--threads T] [--quiet]\n"
    "\n"
    "Searches, for each of B initial noises, a perturbation inside the box |delta| <= eps\n"
    "(every value) that makes the classifier misread the generated image (projected\n"
    "sign-gradient ascent on -log p(target | sample), gradients through the whole sampling\n"
    "run by the discrete adjoint), and prints the share of the images read correctly without\n"
    "it that are misread with it, against R random perturbations of the same size (+-eps in\n"
    "every value).\n"
    "  --model DIR        class-conditional diffusers UNet2DModel (default: the default model)\n"
    "  --classifier DIR   the classifier (default: DIR/classifier)\n"
    "  --class C          the class every image is generated as (index or name)\n"
    "  --head NAME        the classifier head read (default: char)\n"
    "  --target LABEL     the verdict expected of that head (default: the class's name)\n"
    "  --seed S           image b starts from the noise 'denoised sample --seed S' draws for\n"
    "                     it (default 0)\n"
    "  --batch B          images, 1..64 (default 8)\n"
    "  --eps E,...        box sizes in (0, 2], at most 4 (default 0.05,0.1)\n"
    "  --iters K          ascent steps per box, 1..200 (default 10; step 2.5 eps / K)\n"
    "  --random R         random perturbations per image, 1..64 (default 4)\n"
    "  --scheduler NAME   ddim or a DPMSolverMultistepScheduler name (default dpm++2m)\n"
    "  --steps N          inference steps (default 10)\n"
    "  --guidance-scale G classifier-free guidance (default: the model's recommended)\n"
    "  --out-noise OUT    the adversarial noises of the last box, [B, C, S, S]\n"
    "  --threads T        CPU threads (default 2)\n"
    "  --quiet            only the result lines\n";

#define AUDIT_MAX_EPS ADJTASK_MAX_EPS

typedef struct audit_args {
  cli_adj_flags f;
  const char *class_s, *head, *target, *out_noise;
  long long batch, iters, random, steps;
  double eps[AUDIT_MAX_EPS];
  int n_eps;
} audit_args;

static const struct option opts[] = {CLI_ADJ_OPTIONS,
                                     {"class", required_argument, 0, 'l'},
                                     {"head", required_argument, 0, 'H'},
                                     {"target", required_argument, 0, 'T'},
                                     {"batch", required_argument, 0, 'b'},
                                     {"eps", required_argument, 0, 'e'},
                                     {"iters", required_argument, 0, 'k'},
                                     {"random", required_argument, 0, 'r'},
                                     {"steps", required_argument, 0, 'n'},
                                     {"out-noise", required_argument, 0, 'o'},
                                     {"help", no_argument, 0, 'h'},
                                     {0, 0, 0, 0}};

static int parse_eps(const char *s, audit_args *a) {
  a->n_eps = 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", s);
  for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    if (a->n_eps == AUDIT_MAX_EPS)
      return cli_usage_error("audit", "--eps: at most %d box sizes", AUDIT_MAX_EPS);
    if (cli_parse_double("--eps", tok, 1e-6, 2.0, &a->eps[a->n_eps++]))
      return 2;
  }
  return a->n_eps ? 0 : cli_usage_error("audit", "--eps: give box sizes such as 0.05,0.1");
}

/* The integer flags, by option letter: where, and their range. */
static long long *int_flag(audit_args *a, int c, long long *lo, long long *hi, const char **name) {
  *lo = 1;
  switch (c) {
  case 'b': *hi = 64, *name = "--batch"; return &a->batch;
  case 'k': *hi = 200, *name = "--iters"; return &a->iters;
  case 'r': *hi = 64, *name = "--random"; return &a->random;
  case 'n': *hi = 1000, *name = "--steps"; return &a->steps;
  default: return NULL;
  }
}

static const char **text_flag(audit_args *a, int c) {
  switch (c) {
  case 'l': return &a->class_s;
  case 'H': return &a->head;
  case 'T': return &a->target;
  case 'o': return &a->out_noise;
  default: return NULL;
  }
}

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, audit_args *a) {
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
    long long lo, hi, *iv;
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
    } else if (c == 'e') {
      if (parse_eps(optarg, a))
        return 2;
    } else if (c == 'h') {
      fputs(help, stdout);
      return 0;
    } else {
      return cli_usage_error("audit", "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error("audit", "unexpected argument '%s'", argv[optind]);
  if (!a->class_s)
    return cli_usage_error("audit", "--class is required");
  if (!a->f.model_dir)
    a->f.model_dir = cli_default_model();
  return -1;
}

/* The classifier, the head read and the target class (audit_run checks the image sizes). */
static int load_classifier(const audit_args *a, model *m, const int64_t *labels, classifier **clf,
                           audit_opts *o, err *e) {
  int rc = cli_adj_classifier(&a->f, clf, e);
  if (rc != ERR_OK)
    return rc;
  const model_info *mi = model_get_info(m);
  const char *head = a->head ? a->head : "char";
  if ((o->head = classifier_head_index(*clf, head)) < 0)
    return err_set(e, ERR_INVALID, "--head '%s': the classifier has no such head", head);
  const char *want = a->target                        ? a->target
                     : labels[0] < mi->n_class_labels ? mi->class_labels[labels[0]]
                                                      : a->class_s;
  if ((o->target = classifier_class_index(*clf, o->head, want)) < 0)
    return err_set(e, ERR_INVALID, "%s '%s': not a class of the classifier's head '%s'",
                   a->target ? "--target" : "the class's name", want, head);
  return ERR_OK;
}

/* What one audit works with: the model, the solver, the classifier, guidance. */
typedef struct audit_cli {
  model *m;
  sampler *s;
  classifier *clf;
  guidance gd;
  int64_t labels[64];
} audit_cli;

static int audit_open(const audit_args *a, audit_cli *au, audit_opts *o, err *e) {
  int rc = model_load(a->f.model_dir, &au->m, e);
  if (rc != ERR_OK)
    return rc;
  const model_info *mi = model_get_info(au->m);
  if (!mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "the audit needs a class-conditional model (this one has no "
                   "class embeddings)");
  if (cli_parse_labels("--class", a->class_s, 1, au->m, au->labels))
    return err_set(e, ERR_INVALID, "bad --class");
  if ((rc = cli_adj_guidance(&a->f, au->m, &au->gd, e)) != ERR_OK ||
      (rc = load_classifier(a, au->m, au->labels, &au->clf, o, e)) != ERR_OK)
    return rc;
  rc = cli_adj_solver(&a->f, au->m, 0, a->steps, NULL, 0, &au->s, e);
  o->gen = (adjtask_gen){.s = au->s, .gd = &au->gd, .threads = (int)a->f.threads};
  o->clf = au->clf;
  o->label = au->labels[0];
  return rc;
}

static void on_progress(const audit_progress *p, void *user) {
  if (!*(const int *)user)
    fprintf(stderr, "audit: run %d of %d: %d misread\n", p->step, p->total, p->misread);
}

static int run(const audit_args *a, audit_cli *au, audit_opts *o, err *e) {
  const model_info *mi = model_get_info(au->m);
  const size_t nd = (size_t)a->batch * mi->in_channels * mi->sample_size * mi->sample_size;
  audit_result res = {0};
  if (a->out_noise && !(res.noise = malloc(nd * sizeof(float))))
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = audit_run(au->m, o, &res, e);
  if (rc == ERR_OK)
    printf("clean: %d of %lld images read as the target\n", res.clean, a->batch);
  const int nc = res.clean;
  for (int i = 0; rc == ERR_OK && i < a->n_eps; i++)
    printf("eps %g: adversarial %d of %d (%.0f%%), random %d of %lld (%.0f%%); attack %.1f s\n",
           a->eps[i], res.adversarial[i], nc, nc ? 100.0 * res.adversarial[i] / nc : 0.0,
           res.random[i], nc * a->random,
           nc ? 100.0 * res.random[i] / ((double)nc * a->random) : 0.0, res.seconds[i]);
  if (rc == ERR_OK && a->out_noise) {
    const int64_t sh[4] = {a->batch, mi->in_channels, mi->sample_size, mi->sample_size};
    rc = npy_write_f32(a->out_noise, res.noise, 4, sh, e);
  }
  free(res.noise);
  return rc;
}

int cmd_audit(int argc, char **argv) {
  audit_args a = {.batch = 8,
                  .iters = 10,
                  .random = 4,
                  .steps = 10,
                  .f = {.threads = 2},
                  .eps = {0.05, 0.1},
                  .n_eps = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  audit_cli au = {0};
  audit_opts o = {.batch = (int)a.batch,
                  .seed = (uint64_t)a.f.seed,
                  .eps = a.eps,
                  .n_eps = a.n_eps,
                  .iters = (int)a.iters,
                  .random = (int)a.random,
                  .progress = on_progress,
                  .progress_user = &a.f.quiet};
  int rc = audit_open(&a, &au, &o, &e);
  if (rc == ERR_OK)
    rc = run(&a, &au, &o, &e);
  if (rc != ERR_OK)
    cli_fail("audit", "%s", e.msg);
  sampler_free(au.s);
  classifier_free(au.clf);
  model_free(au.m);
  return rc == ERR_OK ? 0 : 1;
}
