/* `denoised concept`: concept from a metric (AdjointDPM). Learns a new class-embedding row so
 * that the classifier's verdict holds on the images the sampler makes from it
 * (engine/adjtask), and saves it as MODEL/embeddings/NAME.safetensors, which every later load of
 * the model appends as the class NAME (`sample --class NAME`, daemon jobs' class_label). With
 * --eval it measures the row on held-out noises, beside a class of the model for comparison. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "adjtask.h"
#include "cli.h"
#include "safetensors.h"

static const char help[] =
    "usage: denoised concept [--model DIR] [--classifier DIR] --target SPEC --name NAME\n"
    "                        [--steps N] [--lr LR] [--batch B] [--margin M] [--init mean|CLASS]\n"
    "                        [--scheduler NAME] [--sampler-steps N] [--guidance-scale G]\n"
    "                        [--seed S] [--eval N [--eval-seed S] [--compare CLASS]]\n"
    "                        [--force] [--threads T] [--quiet]\n"
    "\n"
    "Optimises a new class-embedding row so that the classifier's verdict holds on the images\n"
    "generated from it: every step samples B fresh noises with the solver and guidance the row\n"
    "will be used with, takes a margin cross-entropy of the classifier's logits (0 for images\n"
    "already read right by the margin), its gradient to the row through the whole sampling run\n"
    "by the discrete adjoint, and one Adam step. Saves DIR/embeddings/NAME.safetensors: later\n"
    "runs take NAME as a class (sample --class NAME; daemon jobs' class_label).\n"
    "  --model DIR        class-conditional UNet2DModel (default: the default model)\n"
    "  --classifier DIR   the classifier (default: DIR/classifier)\n"
    "  --target SPEC      the verdict: items HEAD=LABEL or LABEL (looked up in the head 'char',\n"
    "                     then in the one head that has it), comma-separated: K, italic,\n"
    "                     K,italic, fg=red\n"
    "  --name NAME        the embedding's name (letters, digits, _ - .; not a class name)\n"
    "  --steps N          Adam steps, 1..10000 (default 120)\n"
    "  --lr LR            Adam's step size (default 0.15; cosine decay to a tenth)\n"
    "  --batch B          fresh noises per step, 1..64 (default 8)\n"
    "  --margin M         logit margin past which an image stops pulling (default 2)\n"
    "  --init I           start row: mean (of the model's classes, the default) or a class\n"
    "  --scheduler NAME   ddim or a DPMSolverMultistepScheduler name (default: the model's\n"
    "                     recommended, else dpm++2m)\n"
    "  --sampler-steps N  inference steps of the samples optimised (default 10)\n"
    "  --guidance-scale G classifier-free guidance (default: the model's recommended)\n"
    "  --seed S           step k draws the noises of 'denoised sample --seed S' images\n"
    "                     k*B .. k*B+B-1 (default 0)\n"
    "  --eval N           afterwards, the share of N images (same solver and guidance) the\n"
    "                     classifier agrees on, from held-out noises (default 0: none)\n"
    "  --eval-seed S      their seed (default 1000003; differs from --seed)\n"
    "  --compare CLASS    measure that class of the model on the same noises too\n"
    "  --force            replace an embedding of that name\n"
    "  --threads T        CPU threads (default 2)\n"
    "  --quiet            only the result lines\n";

typedef struct concept_args {
  cli_adj_flags f;
  const char *target, *name, *init, *compare;
  long long steps, batch, sampler_steps, eval, eval_seed;
  double lr, margin;
  int force;
} concept_args;

static const struct option opts[] = {CLI_ADJ_OPTIONS,
                                     {"target", required_argument, 0, 'T'},
                                     {"name", required_argument, 0, 'N'},
                                     {"steps", required_argument, 0, 'n'},
                                     {"lr", required_argument, 0, 'L'},
                                     {"batch", required_argument, 0, 'b'},
                                     {"margin", required_argument, 0, 'M'},
                                     {"init", required_argument, 0, 'i'},
                                     {"sampler-steps", required_argument, 0, 'k'},
                                     {"eval", required_argument, 0, 'E'},
                                     {"eval-seed", required_argument, 0, 'e'},
                                     {"compare", required_argument, 0, 'C'},
                                     {"force", no_argument, 0, 'f'},
                                     {"help", no_argument, 0, 'h'},
                                     {0, 0, 0, 0}};

static long long *int_flag(concept_args *a, int c, long long *lo, long long *hi,
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

static const char **text_flag(concept_args *a, int c) {
  switch (c) {
  case 'T': return &a->target;
  case 'N': return &a->name;
  case 'i': return &a->init;
  case 'C': return &a->compare;
  default: return NULL;
  }
}

static int parse_args(int argc, char **argv, concept_args *a) {
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
    } else if (c == 'L') {
      if (cli_parse_double("--lr", optarg, 1e-6, 10, &a->lr))
        return 2;
    } else if (c == 'M') {
      if (cli_parse_double("--margin", optarg, 0, 100, &a->margin))
        return 2;
    } else if (c == 'f') {
      a->force = 1;
    } else if (c == 'h') {
      fputs(help, stdout);
      return 0;
    } else {
      return cli_usage_error("concept", "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error("concept", "unexpected argument '%s'", argv[optind]);
  if (!a->target || !a->name)
    return cli_usage_error("concept", "--target and --name are required");
  if (!model_embedding_name_ok(a->name))
    return cli_usage_error("concept",
                           "--name '%s': use 1 to 64 letters, digits, '_', '-' or '.' (not only "
                           "digits, not starting with '.')",
                           a->name);
  if (!a->f.model_dir)
    a->f.model_dir = cli_default_model();
  return -1;
}

typedef struct concept_cli {
  const concept_args *a;
  model *m;
  sampler *s;
  classifier *clf;
  guidance gd;
  adjtask_target t[ADJTASK_MAX_TARGETS];
  int nt;
  int64_t label;
  float *row;
  char solver[64];
} concept_cli;

static int load_parts(concept_cli *cc, err *e) {
  const concept_args *a = cc->a;
  int rc = model_load(a->f.model_dir, &cc->m, e);
  if (rc)
    return rc;
  const model_info *mi = model_get_info(cc->m);
  if (!mi->num_classes || !mi->class_embed_dim || mi->kind != MODEL_UNET2D)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s: a concept is a class-embedding row, and this model has no class "
                   "embeddings (a class-conditional UNet2DModel is needed)",
                   a->f.model_dir);
  if ((rc = cli_adj_classifier(&a->f, &cc->clf, e)))
    return rc;
  if ((rc = adjtask_parse_targets(cc->clf, a->target, cc->t, &cc->nt, e)))
    return err_prefix(e, "--target");
  if ((rc = cli_adj_guidance(&a->f, cc->m, &cc->gd, e)))
    return rc;
  return cli_adj_solver(&a->f, cc->m, 1, a->sampler_steps, cc->solver, sizeof cc->solver, &cc->s,
                        e);
}

/* The working class: NAME appended with the start row (or, with --force, NAME's own class
 * taken over). */
static int working_class(concept_cli *cc, err *e) {
  const concept_args *a = cc->a;
  const model_info *mi = model_get_info(cc->m);
  if (!(cc->row = malloc((size_t)mi->class_embed_dim * sizeof(float))))
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc;
  if (!a->init || strcmp(a->init, "mean") == 0) {
    rc = concept_mean_row(cc->m, cc->row, e);
  } else {
    const int64_t k = model_class_from_name(cc->m, a->init);
    if (k < 0 || k == mi->null_class)
      return err_set(e, ERR_INVALID, "--init '%s': neither 'mean' nor a class of the model",
                     a->init);
    memcpy(cc->row, model_class_row(cc->m, k), (size_t)mi->class_embed_dim * sizeof(float));
    rc = ERR_OK;
  }
  const int64_t have = model_class_from_name(cc->m, a->name);
  const int64_t first_emb = mi->num_classes - mi->num_embeddings;
  if (rc == ERR_OK && have >= 0) {
    if (have < first_emb)
      return err_set(e, ERR_INVALID, "--name '%s': the model has a class of that name", a->name);
    if (!a->force)
      return err_set(e, ERR_INVALID,
                     "--name '%s': %s/embeddings/%s.safetensors exists (--force replaces it)",
                     a->name, a->f.model_dir, a->name);
    cc->label = have;
    memcpy(model_class_row(cc->m, have), cc->row, (size_t)mi->class_embed_dim * sizeof(float));
    return ERR_OK;
  }
  return rc ? rc : model_add_class(cc->m, a->name, cc->row, &cc->label, e);
}

static void on_step(const concept_progress *p, void *user) {
  const concept_args *a = user;
  if (!a->f.quiet)
    fprintf(stderr, "concept: step %d of %d: loss %.4f, batch agreed %.0f%%\n", p->step, p->total,
            p->loss, 100.0 * p->agree);
}

static int save(concept_cli *cc, double secs, err *e) {
  const concept_args *a = cc->a;
  const model_info *mi = model_get_info(cc->m);
  char dir[4096], path[4200], target[512], num[6][32];
  snprintf(dir, sizeof dir, "%s/" MODEL_EMBEDDINGS_DIR, a->f.model_dir);
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "cannot create %s: %s", dir, strerror(errno));
  snprintf(path, sizeof path, "%s/%s.safetensors", dir, a->name);
  adjtask_targets_str(cc->clf, cc->t, cc->nt, target, sizeof target);
  snprintf(num[0], sizeof num[0], "%lld", a->sampler_steps);
  snprintf(num[1], sizeof num[1], "%g", cc->gd.scale);
  snprintf(num[2], sizeof num[2], "%lld", a->steps);
  snprintf(num[3], sizeof num[3], "%lld", a->batch);
  snprintf(num[4], sizeof num[4], "%g", a->lr);
  snprintf(num[5], sizeof num[5], "%.1f", secs);
  const char *meta[] = {"format",
                        "denoised class embedding",
                        "target",
                        target,
                        "scheduler",
                        cc->solver,
                        "sampler_steps",
                        num[0],
                        "guidance_scale",
                        num[1],
                        "steps",
                        num[2],
                        "batch",
                        num[3],
                        "lr",
                        num[4],
                        "seconds",
                        num[5],
                        "model_weights",
                        model_weights_digest(cc->m)};
  const int64_t shape[1] = {mi->class_embed_dim};
  const st_out_tensor t = {.name = MODEL_EMBEDDING_TENSOR,
                           .ndim = 1,
                           .shape = shape,
                           .data = model_class_row(cc->m, cc->label)};
  int rc = st_write_f32(path, &t, 1, meta, (int)(sizeof meta / sizeof *meta) / 2, e);
  if (rc == ERR_OK)
    printf("saved %s (class '%s': %s)\n", path, a->name, target);
  return rc;
}

static int evaluate(concept_cli *cc, err *e) {
  const concept_args *a = cc->a;
  const adjtask_gen g = {.s = cc->s, .gd = &cc->gd, .threads = (int)a->f.threads};
  int agreed = 0;
  int rc = adjtask_agreement(cc->m, &g, cc->clf, cc->t, cc->nt, cc->label, (int)a->eval,
                             (uint64_t)a->eval_seed, 0, &agreed, e);
  if (rc)
    return rc;
  printf("held-out: %s agreed on %d of %lld (%.1f%%)\n", a->name, agreed, a->eval,
         100.0 * agreed / (double)a->eval);
  if (!a->compare)
    return ERR_OK;
  const int64_t k = model_class_from_name(cc->m, a->compare);
  if (k < 0)
    return err_set(e, ERR_INVALID, "--compare '%s': not a class of the model", a->compare);
  if ((rc = adjtask_agreement(cc->m, &g, cc->clf, cc->t, cc->nt, k, (int)a->eval,
                              (uint64_t)a->eval_seed, 0, &agreed, e)))
    return rc;
  printf("held-out: class %s agreed on %d of %lld (%.1f%%)\n", a->compare, agreed, a->eval,
         100.0 * agreed / (double)a->eval);
  return ERR_OK;
}

int cmd_concept(int argc, char **argv) {
  concept_args a = {.steps = 120,
                    .batch = 8,
                    .sampler_steps = 10,
                    .eval_seed = 1000003,
                    .f = {.threads = 2},
                    .lr = 0.15,
                    .margin = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  concept_cli cc = {.a = &a};
  int rc = load_parts(&cc, &e);
  if (rc == ERR_OK)
    rc = working_class(&cc, &e);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const concept_opts o = {.gen = {.s = cc.s, .gd = &cc.gd, .threads = (int)a.f.threads},
                          .clf = cc.clf,
                          .targets = cc.t,
                          .n_targets = cc.nt,
                          .label = cc.label,
                          .steps = (int)a.steps,
                          .batch = (int)a.batch,
                          .lr = a.lr,
                          .margin = a.margin,
                          .seed = (uint64_t)a.f.seed,
                          .progress = on_step,
                          .progress_user = &a};
  if (rc == ERR_OK)
    rc = concept_optimize(cc.m, &o, &e);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  if (rc == ERR_OK) {
    printf("optimised in %.1f s (%lld steps of %lld images, %s %lld steps, guidance %g)\n", secs,
           a.steps, a.batch, cc.solver, a.sampler_steps, cc.gd.scale);
    rc = save(&cc, secs, &e);
  }
  if (rc == ERR_OK && a.eval)
    rc = evaluate(&cc, &e);
  if (rc != ERR_OK)
    cli_fail("concept", "%s", e.msg);
  free(cc.row);
  sampler_free(cc.s);
  classifier_free(cc.clf);
  model_free(cc.m);
  return rc == ERR_OK ? 0 : 1;
}
