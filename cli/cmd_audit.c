/* `denoised audit`: AdjointDPM's security audit of a generator. Adversarial initial noise
 * within an L-infinity box around each image's noise, found by projected sign-gradient ascent
 * (PGD) on -log p(target | sample) with the gradient through the whole sampling run from the
 * discrete adjoint (engine/solver/adjoint.h), makes the engine's classifier misread the
 * generated glyph; the success rate is set against random perturbations of the same size (the
 * box's corners: +-eps in every value), so a high rate says the sampler has directions a
 * classifier-based check can be steered along, not that any noise of that size breaks it. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adjoint.h"
#include "classifier.h"
#include "cli.h"
#include "npy.h"
#include "rng.h"

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

#define AUDIT_MAX_EPS 4

typedef struct audit_args {
  const char *model_dir, *clf_dir, *class_s, *head, *target, *scheduler, *out_noise;
  long long seed, batch, iters, random, steps, threads;
  double eps[AUDIT_MAX_EPS], guidance;
  int n_eps, has_guidance, quiet;
} audit_args;

static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                     {"classifier", required_argument, 0, 'c'},
                                     {"class", required_argument, 0, 'l'},
                                     {"head", required_argument, 0, 'H'},
                                     {"target", required_argument, 0, 'T'},
                                     {"seed", required_argument, 0, 's'},
                                     {"batch", required_argument, 0, 'b'},
                                     {"eps", required_argument, 0, 'e'},
                                     {"iters", required_argument, 0, 'k'},
                                     {"random", required_argument, 0, 'r'},
                                     {"scheduler", required_argument, 0, 'S'},
                                     {"steps", required_argument, 0, 'n'},
                                     {"guidance-scale", required_argument, 0, 'g'},
                                     {"out-noise", required_argument, 0, 'o'},
                                     {"threads", required_argument, 0, 'j'},
                                     {"quiet", no_argument, 0, 'q'},
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
  case 's': *lo = 0, *hi = (1ll << 53) - 1, *name = "--seed"; return &a->seed;
  case 'b': *hi = 64, *name = "--batch"; return &a->batch;
  case 'k': *hi = 200, *name = "--iters"; return &a->iters;
  case 'r': *hi = 64, *name = "--random"; return &a->random;
  case 'n': *hi = 1000, *name = "--steps"; return &a->steps;
  case 'j': *hi = 256, *name = "--threads"; return &a->threads;
  default: return NULL;
  }
}

static const char **text_flag(audit_args *a, int c) {
  switch (c) {
  case 'm': return &a->model_dir;
  case 'c': return &a->clf_dir;
  case 'l': return &a->class_s;
  case 'H': return &a->head;
  case 'T': return &a->target;
  case 'S': return &a->scheduler;
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
    if (text) {
      *text = optarg;
    } else if ((iv = int_flag(a, c, &lo, &hi, &name))) {
      if (cli_parse_int(name, optarg, lo, hi, iv))
        return 2;
    } else if (c == 'e') {
      if (parse_eps(optarg, a))
        return 2;
    } else if (c == 'g') {
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
    } else if (c == 'q') {
      a->quiet = 1;
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
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  return -1;
}

/* What one audit works with: the model, the solver, the classifier and the run's buffers. */
typedef struct audit {
  const audit_args *a;
  model *m;
  sampler *s;
  classifier *clf;
  guidance gd;
  int head, target, batch, S, C;
  size_t d, nd;
  int64_t labels[64], targets[64];
  float *noise, *delta, *x, *g, *gz, *logits;
  int correct[64], fooled[64];
} audit;

static int load_classifier(audit *au, err *e) {
  const audit_args *a = au->a;
  char dir[4096];
  if (a->clf_dir)
    snprintf(dir, sizeof dir, "%s", a->clf_dir);
  else
    snprintf(dir, sizeof dir, "%s/classifier", a->model_dir);
  int rc = classifier_load(dir, &au->clf, e);
  if (rc != ERR_OK)
    return err_prefix(e, "--classifier");
  const classifier_info *ci = classifier_get_info(au->clf);
  if (ci->in_channels != au->C || ci->sample_size != au->S)
    return err_set(e, ERR_INVALID,
                   "the classifier reads %d x %d x %d images, the model makes %d x %d x %d",
                   ci->in_channels, ci->sample_size, ci->sample_size, au->C, au->S, au->S);
  const char *head = a->head ? a->head : "char";
  if ((au->head = classifier_head_index(au->clf, head)) < 0)
    return err_set(e, ERR_INVALID, "--head '%s': the classifier has no such head", head);
  const model_info *mi = model_get_info(au->m);
  const char *want = a->target                            ? a->target
                     : au->labels[0] < mi->n_class_labels ? mi->class_labels[au->labels[0]]
                                                          : a->class_s;
  if ((au->target = classifier_class_index(au->clf, au->head, want)) < 0)
    return err_set(e, ERR_INVALID, "%s '%s': not a class of the classifier's head '%s'",
                   a->target ? "--target" : "the class's name", want, head);
  for (int b = 0; b < au->batch; b++)
    au->targets[b] = au->target;
  return ERR_OK;
}

static int audit_open(audit *au, err *e) {
  const audit_args *a = au->a;
  int rc = model_load(a->model_dir, &au->m, e);
  if (rc != ERR_OK)
    return rc;
  const model_info *mi = model_get_info(au->m);
  if (!mi->num_classes)
    return err_set(e, ERR_INVALID,
                   "the audit needs a class-conditional model (this one has no "
                   "class embeddings)");
  au->batch = (int)a->batch, au->S = mi->sample_size, au->C = mi->in_channels;
  au->d = (size_t)au->C * au->S * au->S, au->nd = (size_t)au->batch * au->d;
  if (cli_parse_labels("--class", a->class_s, 1, au->m, au->labels))
    return err_set(e, ERR_INVALID, "bad --class");
  for (int b = 1; b < au->batch; b++)
    au->labels[b] = au->labels[0];
  const double g = a->has_guidance ? a->guidance : mi->rec_guidance >= 0 ? mi->rec_guidance : 1.0;
  au->gd = guidance_for(au->m, g);
  if ((rc = guidance_check(&au->gd, au->m, e)) != ERR_OK || (rc = load_classifier(au, e)) != ERR_OK)
    return rc;
  cli_solver cs = {0};
  rc = cli_solver_from_flags(a->scheduler ? a->scheduler : "dpm++2m", a->steps, NULL, NULL, 0, &cs,
                             e);
  if (rc == ERR_OK)
    rc = cli_solver_make(au->m, &cs, NULL, &au->s, e);
  cli_solver_clear(&cs);
  if (rc == ERR_OK)
    rc = adjoint_check_solver(au->s, e);
  au->noise = malloc(au->nd * sizeof(float)), au->delta = malloc(au->nd * sizeof(float));
  au->x = malloc(au->nd * sizeof(float)), au->g = malloc(au->nd * sizeof(float));
  au->gz = malloc(au->nd * sizeof(float));
  au->logits = malloc((size_t)au->batch * classifier_get_info(au->clf)->n_logits * sizeof(float));
  if (rc == ERR_OK && !(au->noise && au->delta && au->x && au->g && au->gz && au->logits))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int b = 0; rc == ERR_OK && b < au->batch; b++)
    rng_normal((uint64_t)a->seed, (uint64_t)b, 0, au->noise + (size_t)b * au->d, au->d);
  return rc;
}

static void audit_close(audit *au) {
  free(au->noise), free(au->delta), free(au->x), free(au->g), free(au->gz), free(au->logits);
  sampler_free(au->s);
  classifier_free(au->clf);
  model_free(au->m);
}

/* Samples noise + delta and reads each image: read[b] = 1 when the head's verdict is the
 * target. */
static int sample_and_read(audit *au, int *read, err *e) {
  for (size_t k = 0; k < au->nd; k++)
    au->g[k] = au->noise[k] + au->delta[k];
  const sampler_run_opts ro = {.batch = au->batch,
                               .init_noise = au->g,
                               .labels = au->labels,
                               .guidance = &au->gd,
                               .threads = (int)au->a->threads};
  int rc = sampler_run(au->s, au->m, &ro, au->x, NULL, e);
  if (rc == ERR_OK)
    rc = classifier_run(au->clf, au->x, au->batch, au->S, au->S, au->logits, NULL,
                        (int)au->a->threads, e);
  if (rc != ERR_OK)
    return rc;
  const classifier_info *ci = classifier_get_info(au->clf);
  const classifier_head *h = &ci->heads[au->head];
  for (int b = 0; b < au->batch; b++) {
    const float *l = au->logits + (size_t)b * ci->n_logits + h->offset;
    int best = 0;
    for (int k = 1; k < h->classes; k++)
      best = l[k] > l[best] ? k : best;
    read[b] = best == au->target;
  }
  return ERR_OK;
}

/* One ascent step: the gradient of -log p(target | sample) to the noise, by the adjoint, for
 * the images not fooled yet; delta moves by step along its sign, back into the box. */
static int ascent_step(audit *au, double eps, double step, err *e) {
  int rc = classifier_log_prob_grad(au->clf, au->x, au->batch, au->S, au->S, au->head, au->targets,
                                    NULL, au->gz, (int)au->a->threads, e);
  for (size_t k = 0; k < au->nd; k++)
    au->gz[k] = au->fooled[k / au->d] ? 0.0f : -au->gz[k];
  adjoint_opts o = {.batch = au->batch,
                    .noise = au->g,
                    .labels = au->labels,
                    .guidance = &au->gd,
                    .grad_output = au->gz,
                    .threads = (int)au->a->threads,
                    .grad_noise = au->gz};
  if (rc == ERR_OK)
    rc = adjoint_run(au->s, au->m, &o, e);
  for (size_t k = 0; rc == ERR_OK && k < au->nd; k++) {
    if (au->fooled[k / au->d])
      continue;
    const float v = au->delta[k] + (float)step * (au->gz[k] > 0   ? 1.0f
                                                  : au->gz[k] < 0 ? -1.0f
                                                                  : 0.0f);
    au->delta[k] = fminf(fmaxf(v, (float)-eps), (float)eps);
  }
  return rc;
}

/* The attack at one box size: returns in *succ the images read correctly without it and
 * misread with it. */
static int attack(audit *au, double eps, int *succ, err *e) {
  memset(au->delta, 0, au->nd * sizeof(float));
  memset(au->fooled, 0, sizeof au->fooled);
  int read[64], rc = ERR_OK;
  const double step = 2.5 * eps / (double)au->a->iters;
  for (int it = 0; rc == ERR_OK && it <= au->a->iters; it++) {
    rc = sample_and_read(au, read, e);
    int n = 0;
    for (int b = 0; rc == ERR_OK && b < au->batch; b++) {
      au->fooled[b] = au->fooled[b] || (au->correct[b] && !read[b]);
      n += au->fooled[b];
    }
    if (!au->a->quiet && rc == ERR_OK)
      fprintf(stderr, "audit: eps %g, step %d of %lld: %d misread\n", eps, it, au->a->iters, n);
    *succ = n;
    if (rc == ERR_OK && it < au->a->iters)
      rc = ascent_step(au, eps, step, e);
  }
  return rc;
}

/* Random corners of the box: misreads of correctly read images over R draws each. */
static int random_baseline(audit *au, double eps, int *succ, err *e) {
  int read[64], rc = ERR_OK;
  *succ = 0;
  for (long long r = 0; rc == ERR_OK && r < au->a->random; r++) {
    for (int b = 0; b < au->batch; b++)
      rng_normal((uint64_t)au->a->seed + 1, (uint64_t)b, (uint64_t)r + 1,
                 au->delta + (size_t)b * au->d, au->d);
    for (size_t k = 0; k < au->nd; k++)
      au->delta[k] = au->delta[k] >= 0 ? (float)eps : (float)-eps;
    rc = sample_and_read(au, read, e);
    for (int b = 0; rc == ERR_OK && b < au->batch; b++)
      *succ += au->correct[b] && !read[b];
  }
  return rc;
}

static int run(audit *au, err *e) {
  const audit_args *a = au->a;
  memset(au->delta, 0, au->nd * sizeof(float));
  int rc = sample_and_read(au, au->correct, e), nc = 0;
  for (int b = 0; b < au->batch; b++)
    nc += au->correct[b];
  if (rc == ERR_OK)
    printf("clean: %d of %d images read as the target\n", nc, au->batch);
  for (int i = 0; rc == ERR_OK && i < a->n_eps; i++) {
    int adv = 0, rnd = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = attack(au, a->eps[i], &adv, e);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (rc == ERR_OK && i == a->n_eps - 1 && a->out_noise) {
      for (size_t k = 0; k < au->nd; k++)
        au->g[k] = au->noise[k] + au->delta[k];
      const int64_t sh[4] = {au->batch, au->C, au->S, au->S};
      rc = npy_write_f32(a->out_noise, au->g, 4, sh, e);
    }
    if (rc == ERR_OK)
      rc = random_baseline(au, a->eps[i], &rnd, e);
    if (rc == ERR_OK)
      printf("eps %g: adversarial %d of %d (%.0f%%), random %d of %lld (%.0f%%); attack %.1f s\n",
             a->eps[i], adv, nc, nc ? 100.0 * adv / nc : 0.0, rnd, nc * a->random,
             nc ? 100.0 * rnd / ((double)nc * a->random) : 0.0, secs);
  }
  return rc;
}

int cmd_audit(int argc, char **argv) {
  audit_args a = {.batch = 8,
                  .iters = 10,
                  .random = 4,
                  .steps = 10,
                  .threads = 2,
                  .eps = {0.05, 0.1},
                  .n_eps = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  audit au = {.a = &a};
  int rc = audit_open(&au, &e);
  if (rc == ERR_OK)
    rc = run(&au, &e);
  if (rc != ERR_OK)
    cli_fail("audit", "%s", e.msg);
  audit_close(&au);
  return rc == ERR_OK ? 0 : 1;
}
