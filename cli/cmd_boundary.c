/* `denoised boundary fit`: a BoundaryDiffusion semantic boundary from labelled images: the
 * mixing step of the model's DDIM grid (chosen automatically or given), the images' latents
 * there by DDIM inversion and (for a UNet) their bottleneck h, a linear SVM in each space, and
 * the boundary file `denoised edit --boundary` reads. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "boundary.h"
#include "cli.h"
#include "edit.h"
#include "latent.h"
#include "npy.h"

#define BOUNDARY_MAX_IMAGES 100000
#define BOUNDARY_MAX_LINE 4096

static const char help[] =
    "usage: denoised boundary fit [--model DIR] --labels FILE [--images X.npy] --out B.json\n"
    "                             [--step auto|K] [--eps E] [--steps N] [--class C]\n"
    "                             [--guidance-scale G] [--C C] [--test-fraction F]\n"
    "                             [--attribute NAME] [--batch B] [--threads T] [--quiet]\n"
    "                             [--prompt P [--negative-prompt N] [--size S|WxH]]\n"
    "\n"
    "Fits a semantic boundary (BoundaryDiffusion, Zhu et al. 2023) in the x_t space of the\n"
    "model's DDIM grid at the mixing step and, for a UNet, one in its h-space (the mid-block\n"
    "output of the model call there), as the authors' release does.\n"
    "  --labels FILE       one image per line: 'PATH LABEL [CLASS]' (PATH a PNG or .npy\n"
    "                      [C, H, W], relative to FILE's folder; LABEL 0 or 1; CLASS, a\n"
    "                      name or an index, for class-conditional models), '#' comments;\n"
    "                      or with --images, one\n"
    "                      'LABEL [CLASS]' line per image of X.npy [N, C, H, W] in [-1, 1]\n"
    "  --out B.json        the boundary file\n"
    "  --step auto|K       the mixing step on the grid (default auto: the last step whose\n"
    "                      latents are still --eps close to N(0, I), estimated from the\n"
    "                      images' statistics)\n"
    "  --eps E             KL per value for --step auto (default 0.01)\n"
    "  --steps N           DDIM grid steps (default 50)\n"
    "  --class C           class (name or index) of lines without one\n"
    "  --guidance-scale G  guidance of the inversion's model calls\n"
    "  --C C               SVM cost (default 1, sklearn's)\n"
    "  --test-fraction F   held out to report accuracy, in [0, 0.9] (default 0.2)\n"
    "  --attribute NAME    what label 1 means (recorded)\n"
    "  --batch B           images inverted at once (default 16)\n"
    "  --prompt P          text-to-image models (a Stable-Diffusion pipeline folder): the\n"
    "                      prompt of the inversion's model calls; the pictures (PNGs or\n"
    "                      .npy of --size, default the model's) are VAE-encoded (the\n"
    "                      posterior mean) and the boundary lives in latent space; edit with\n"
    "                      the same prompt and guidance\n"
    "  --negative-prompt N the unconditional prompt of --guidance-scale\n";

typedef struct fit_args {
  const char *model_dir, *labels, *images, *out, *attribute;
  const char *prompt, *negative_prompt;
  long long steps, step, cls, batch, threads, width, height;
  const char *class_s;
  double eps, C, test_fraction, guidance;
  int has_class, has_guidance, quiet, step_auto;
} fit_args;

static int parse_args(int argc, char **argv, fit_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"labels", required_argument, 0, 'L'},
                                       {"images", required_argument, 0, 'I'},
                                       {"out", required_argument, 0, 'u'},
                                       {"step", required_argument, 0, 's'},
                                       {"eps", required_argument, 0, 'E'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"class", required_argument, 0, 'l'},
                                       {"guidance-scale", required_argument, 0, 'g'},
                                       {"C", required_argument, 0, 'C'},
                                       {"test-fraction", required_argument, 0, 'f'},
                                       {"attribute", required_argument, 0, 'a'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"prompt", required_argument, 0, 'P'},
                                       {"negative-prompt", required_argument, 0, 'X'},
                                       {"size", required_argument, 0, 'z'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "boundary fit";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:L:I:u:s:E:n:l:g:C:f:a:b:j:qhP:X:z:", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'L': a->labels = optarg; break;
    case 'I': a->images = optarg; break;
    case 'u': a->out = optarg; break;
    case 's':
      if (strcmp(optarg, "auto") == 0) {
        a->step_auto = 1;
      } else {
        if (cli_parse_int("--step", optarg, 0, 100000, &a->step))
          return 2;
        a->step_auto = 0;
      }
      break;
    case 'E':
      if (cli_parse_double("--eps", optarg, 1e-9, 10, &a->eps))
        return 2;
      break;
    case 'n':
      if (cli_parse_int("--steps", optarg, 2, 100000, &a->steps))
        return 2;
      break;
    case 'l':
      a->class_s = optarg; /* a name or an index, resolved against the model */
      a->has_class = 1;
      break;
    case 'g':
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
      break;
    case 'C':
      if (cli_parse_double("--C", optarg, 1e-9, 1e9, &a->C))
        return 2;
      break;
    case 'f':
      if (cli_parse_double("--test-fraction", optarg, 0, 0.9, &a->test_fraction))
        return 2;
      break;
    case 'a':
      if (strlen(optarg) >= 64)
        return cli_usage_error(cmd, "--attribute: at most 63 characters");
      a->attribute = optarg;
      break;
    case 'b':
      if (cli_parse_int("--batch", optarg, 1, 1024, &a->batch))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'q': a->quiet = 1; break;
    case 'P': a->prompt = optarg; break;
    case 'X': a->negative_prompt = optarg; break;
    case 'z':
      if (cli_parse_size("--size", optarg, 4096, &a->width, &a->height))
        return 2;
      break;
    case 'h': fputs(help, stdout); return -1;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  if (!a->labels || !a->out)
    return cli_usage_error(cmd, "--labels and --out are required");
  return 0;
}

typedef struct sample_set {
  int n, cap;
  float *x; /* n * d */
  int *label;
  int64_t *cls;
} sample_set;

static int set_push(sample_set *s, size_t d, const float *x, int label, int64_t cls, err *e) {
  if (s->n == s->cap) {
    int cap = s->cap ? 2 * s->cap : 64;
    float *nx = realloc(s->x, (size_t)cap * d * sizeof *nx);
    if (nx)
      s->x = nx;
    int *nl = realloc(s->label, (size_t)cap * sizeof *nl);
    if (nl)
      s->label = nl;
    int64_t *nc = realloc(s->cls, (size_t)cap * sizeof *nc);
    if (nc)
      s->cls = nc;
    if (!nx || !nl || !nc)
      return err_set(e, ERR_NOMEM, "out of memory");
    s->cap = cap;
  }
  memcpy(s->x + (size_t)s->n * d, x, d * sizeof *x);
  s->label[s->n] = label;
  s->cls[s->n] = cls;
  s->n++;
  return ERR_OK;
}

/* One label line's fields. */
typedef struct label_line {
  const char *path; /* NULL with --images */
  int label;        /* -1: a blank line or a comment */
  int64_t cls;      /* -1: none */
} label_line;

/* The pictures' channels and size: the model's sample_size, or for a text-to-image model
 * --size (default its sample_size times the VAE's factor) in image channels. */
static void image_dims(const fit_args *a, const model_info *mi, int *c, int *h, int *w) {
  const int side = mi->sample_size * mi->latent_factor;
  *c = mi->latent_factor > 1 ? mi->image_channels : mi->in_channels;
  *h = a->height ? (int)a->height : side;
  *w = a->height ? (int)a->width : side;
}

/* X.npy of --images, checked against the pictures' shape; nothing without --images. */
static int read_label_images(const fit_args *a, const model_info *mi, npy_array *all, err *e) {
  int cin, h, w;
  image_dims(a, mi, &cin, &h, &w);
  if (!a->images)
    return ERR_OK;
  if (npy_read_f32(a->images, all, e))
    return err_prefix(e, "--images");
  if (all->ndim != 4 || all->shape[1] != cin || all->shape[2] != h || all->shape[3] != w ||
      all->shape[0] < 1 || all->shape[0] > BOUNDARY_MAX_IMAGES) {
    npy_array_free(all);
    return err_set(e, ERR_INVALID, "--images %s: expected shape [N, %d, %d, %d]", a->images, cin, h,
                   w);
  }
  return ERR_OK;
}

/* The class of a line: its CLASS column, else --class; checked against the model. */
static int label_line_class(const fit_args *a, const model *m, const char *cs, int lineno,
                            int64_t *out, err *e) {
  const model_info *mi = model_get_info(m);
  int64_t cls = a->has_class ? a->cls : -1;
  if (cs) {
    const int64_t v = mi->num_classes ? model_class_from_name(m, cs) : -1;
    if (v < 0)
      return err_set(e, ERR_INVALID, "--labels %s:%d: class '%s' is not a class of this model",
                     a->labels, lineno, cs);
    cls = v;
  }
  if (mi->num_classes && cls < 0)
    return err_set(e, ERR_INVALID,
                   "--labels %s:%d: no class (this model is class-conditional: add a CLASS "
                   "column or --class)",
                   a->labels, lineno);
  if (mi->num_classes && cls >= mi->num_classes)
    return err_set(e, ERR_INVALID, "--class %lld out of range [0, %d)", (long long)cls,
                   mi->num_classes);
  *out = cls;
  return ERR_OK;
}

/* Splits line `lineno` in place into its fields. */
static int parse_label_line(const fit_args *a, const model *m, char *line, int lineno,
                            label_line *out, err *e) {
  out->label = -1;
  size_t len = strlen(line);
  if (len > BOUNDARY_MAX_LINE)
    return err_set(e, ERR_INVALID, "--labels %s:%d: line too long", a->labels, lineno);
  while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' '))
    line[--len] = 0;
  char *p = line;
  while (*p == ' ' || *p == '\t')
    p++;
  if (!*p || *p == '#')
    return ERR_OK;
  char *tok[4];
  int nt = 0;
  for (char *t = strtok(p, " \t"); t && nt < 4; t = strtok(NULL, " \t"))
    tok[nt++] = t;
  const int want_path = !a->images;
  if (nt < 1 + want_path || nt > 2 + want_path)
    return err_set(e, ERR_INVALID, "--labels %s:%d: expected '%sLABEL [CLASS]'", a->labels, lineno,
                   want_path ? "PATH " : "");
  const char *ls = tok[want_path], *cs = nt == 2 + want_path ? tok[1 + want_path] : NULL;
  if (strcmp(ls, "0") != 0 && strcmp(ls, "1") != 0)
    return err_set(e, ERR_INVALID, "--labels %s:%d: label '%s' is not 0 or 1", a->labels, lineno,
                   ls);
  int rc = label_line_class(a, m, cs, lineno, &out->cls, e);
  if (rc == ERR_OK) {
    out->path = want_path ? tok[0] : NULL;
    out->label = ls[0] - '0';
  }
  return rc;
}

/* The image of a line into the set: the next one of X.npy, or the file it names (relative to
 * dir, the labels file's folder). */
static int push_label_image(const fit_args *a, const model *m, const npy_array *all,
                            const char *dir, const label_line *l, sample_set *set, err *e) {
  int cin, ih, iw;
  image_dims(a, model_get_info(m), &cin, &ih, &iw);
  const size_t d = (size_t)cin * ih * iw;
  if (set->n >= BOUNDARY_MAX_IMAGES)
    return err_set(e, ERR_INVALID, "--labels: more than %d images", BOUNDARY_MAX_IMAGES);
  if (a->images) {
    if (set->n >= all->shape[0])
      return err_set(e, ERR_INVALID, "--labels %s: more lines than the %lld images of %s",
                     a->labels, (long long)all->shape[0], a->images);
    return set_push(set, d, all->data + (size_t)set->n * d, l->label, l->cls, e);
  }
  char path[8300];
  if (l->path[0] == '/')
    snprintf(path, sizeof path, "%s", l->path);
  else
    snprintf(path, sizeof path, "%s/%s", dir, l->path);
  float *x = NULL;
  int rc = cli_read_image("--labels image", path, cin, ih, iw, &x, e);
  if (rc == ERR_OK)
    rc = set_push(set, d, x, l->label, l->cls, e);
  free(x);
  return rc;
}

/* Reads the label lines (and the images they name, or X.npy's). */
static int read_labels(const fit_args *a, const model *m, sample_set *set, err *e) {
  npy_array all = {0};
  int rc = read_label_images(a, model_get_info(m), &all, e);
  if (rc != ERR_OK)
    return rc;
  FILE *f = fopen(a->labels, "r");
  if (!f) {
    npy_array_free(&all);
    return err_set(e, ERR_IO, "--labels %s: %s", a->labels, strerror(errno));
  }
  char dir[4096] = ".";
  const char *slash = strrchr(a->labels, '/');
  if (slash)
    snprintf(dir, sizeof dir, "%.*s", (int)(slash - a->labels), a->labels);
  char line[BOUNDARY_MAX_LINE + 2];
  int lineno = 0;
  while (rc == ERR_OK && fgets(line, sizeof line, f)) {
    label_line l = {.path = NULL, .label = -1, .cls = -1};
    rc = parse_label_line(a, m, line, ++lineno, &l, e);
    if (rc == ERR_OK && l.label >= 0)
      rc = push_label_image(a, m, &all, dir, &l, set, e);
  }
  if (rc == ERR_OK && ferror(f))
    rc = err_set(e, ERR_IO, "--labels %s: read error", a->labels);
  fclose(f);
  if (rc == ERR_OK && a->images && set->n != all.shape[0])
    rc = err_set(e, ERR_INVALID, "--labels %s: %d lines for the %lld images of %s", a->labels,
                 set->n, (long long)all.shape[0], a->images);
  if (rc == ERR_OK && set->n < 4)
    rc = err_set(e, ERR_INVALID, "--labels: %d images are too few to fit a boundary", set->n);
  npy_array_free(&all);
  return rc;
}

/* What a fit works on: the model, its DDIM grid, the labelled images, their latents at the
 * mixing step and (with_h) their bottleneck h there. */
typedef struct fit_ctx {
  model *m;
  sampler *s;
  sample_set set;
  int n, lh, lw, step; /* grid steps, latent size, mixing step */
  size_t d, hd;        /* values of a latent, of an h */
  int with_h, hshape[3];
  guidance g;
  const guidance *gp;   /* &g with --guidance-scale, else NULL */
  float *cond, *uncond; /* text models: the prompt's and the negative prompt's states */
  int seq;
  float *lat, *abar, *hl, *hrows;
  double *kl;
} fit_ctx;

static void fit_ctx_free(fit_ctx *c) {
  free(c->set.x);
  free(c->set.label);
  free(c->set.cls);
  free(c->lat);
  free(c->hl);
  free(c->hrows);
  free(c->abar);
  free(c->kl);
  free(c->cond);
  free(c->uncond);
  sampler_free(c->s);
  model_free(c->m);
}

/* The phases of a fit below return 0 to go on, else the exit status (the error printed). */

/* A text-to-image model's fit runs on latents: the pictures VAE-encoded (the posterior mean,
 * as inversions take them) a batch at a time, and the prompts encoded once. */
static int fit_encode(const fit_args *a, fit_ctx *c, err *e) {
  const latent_parts *lp = model_latent(c->m);
  const latent_info *li = latent_get_info(lp);
  int ic, ih, iw;
  image_dims(a, model_get_info(c->m), &ic, &ih, &iw);
  const int f = li->factor;
  const size_t di = (size_t)ic * ih * iw, dl = (size_t)li->latent_channels * (ih / f) * (iw / f);
  const size_t per = (size_t)li->seq_len * li->text_dim;
  float *z = malloc(sizeof *z * dl * (size_t)c->set.n);
  c->cond = malloc(sizeof *c->cond * per);
  c->uncond = malloc(sizeof *c->uncond * per);
  c->seq = li->seq_len;
  int rc = !z || !c->cond || !c->uncond ? err_set(e, ERR_NOMEM, "out of memory") : ERR_OK;
  const int threads = (int)a->threads;
  if (!rc && (rc = latent_encode_prompt(lp, a->prompt, 1, c->cond, NULL, threads, e)))
    err_prefix(e, "--prompt");
  if (!rc && (rc = latent_encode_prompt(lp, a->negative_prompt ? a->negative_prompt : "", 1,
                                        c->uncond, NULL, threads, e)))
    err_prefix(e, "--negative-prompt");
  for (int i0 = 0; !rc && i0 < c->set.n; i0 += (int)a->batch) {
    const int nb = c->set.n - i0 < a->batch ? c->set.n - i0 : (int)a->batch;
    rc = latent_encode(lp, c->set.x + (size_t)i0 * di, nb, ih / f, iw / f, NULL,
                       z + (size_t)i0 * dl, threads, e);
  }
  if (rc) {
    free(z);
    return rc;
  }
  free(c->set.x);
  c->set.x = z;
  return ERR_OK;
}

/* The model, its DDIM grid (eta 0: the inversion is deterministic), --class and the labels. */
static int fit_load(const char *cmd, fit_args *a, fit_ctx *c, err *e) {
  if (model_load(a->model_dir, &c->m, e))
    return cli_fail(cmd, "%s", e->msg);
  const model_info *mi = model_get_info(c->m);
  const int text = mi->latent_factor > 1;
  if (!mi->num_classes && (a->has_class || (a->has_guidance && !text)))
    return cli_usage_error(cmd, "this model is not class-conditional: drop --class and "
                                "--guidance-scale");
  if (text && !a->prompt)
    return cli_usage_error(cmd, "this is a text-to-image model: give --prompt");
  if (!text && (a->prompt || a->negative_prompt || a->height))
    return cli_usage_error(cmd, "this model takes no prompt: drop --prompt, --negative-prompt "
                                "and --size");
  if (text && (a->height % mi->latent_factor || a->width % mi->latent_factor))
    return cli_usage_error(cmd, "--size: width and height must be multiples of %d",
                           mi->latent_factor);
  json_t *eta0 = json_pack("{s:f}", "eta", 0.0);
  const pipeline_solver ddim = {.name = "ddim", .steps = (int)a->steps, .options = eta0};
  int rc = pipeline_sampler(c->m, &ddim, &c->s, NULL, 0, e);
  json_decref(eta0);
  if (!rc && a->class_s && (a->cls = model_class_from_name(c->m, a->class_s)) < 0)
    return cli_usage_error(cmd, "--class: '%s' is not a class of this model", a->class_s);
  if (rc || read_labels(a, c->m, &c->set, e) || (text && fit_encode(a, c, e)))
    return cli_fail(cmd, "%s", e->msg);
  return 0;
}

static int fit_alloc(const char *cmd, const fit_args *a, fit_ctx *c) {
  const model_info *mi = model_get_info(c->m);
  int ic, ih, iw;
  image_dims(a, mi, &ic, &ih, &iw);
  c->n = sampler_num_steps(c->s);
  c->lh = ih / mi->latent_factor;
  c->lw = iw / mi->latent_factor;
  c->d = (size_t)mi->in_channels * c->lh * c->lw;
  c->g = guidance_for(c->m, a->guidance);
  c->g.uncond_states = c->uncond;
  c->g.seq_len = c->seq;
  c->gp = a->has_guidance ? &c->g : NULL;
  const int passes = guidance_passes(c->gp);
  /* the h-space boundary too when the model has a bottleneck (a UNet's mid block) */
  err he = {0};
  c->with_h = model_mid_shape(c->m, c->lh, c->lw, c->hshape, &he) == ERR_OK;
  c->hd = (size_t)c->hshape[0] * c->hshape[1] * c->hshape[2];
  c->abar = malloc(sizeof *c->abar * (size_t)c->n);
  c->kl = malloc(sizeof *c->kl * (size_t)c->n);
  c->lat = malloc(sizeof *c->lat * c->d * (size_t)c->set.n);
  if (c->with_h) {
    c->hl = malloc(sizeof *c->hl * c->hd * (size_t)c->set.n);
    c->hrows = malloc(sizeof *c->hrows * c->hd * (size_t)a->batch * passes);
  }
  if (!c->abar || !c->kl || !c->lat || (c->with_h && (!c->hl || !c->hrows)))
    return cli_fail(cmd, "out of memory");
  return 0;
}

/* The mixing step: --step K, or with --step auto the one the images' statistics pick; the KL
 * along the grid is shown either way. */
static int fit_choose_step(const char *cmd, const fit_args *a, fit_ctx *c, err *e) {
  for (int k = 0; k < c->n; k++) {
    float al, be;
    sampler_step_level(c->s, k, &al, &be);
    c->abar[k] = al * al;
  }
  int step = (int)a->step;
  if (boundary_mixing_step(c->set.x, c->set.n, (int)c->d, c->abar, c->n, a->eps, c->kl, &step, e))
    return cli_fail(cmd, "%s", e->msg);
  if (!a->step_auto)
    step = (int)a->step;
  if (step >= c->n)
    return cli_usage_error(cmd, "--step %d: the grid has %d steps", step, c->n);
  c->step = step;
  const double *ts = sampler_timesteps(c->s);
  if (!a->quiet) {
    fprintf(stderr, "KL(q_t || N(0, I)) per value along the %d-step grid:", c->n);
    for (int k = 0; k < c->n; k += (c->n + 9) / 10)
      fprintf(stderr, " t=%g:%.3g", ts[k], c->kl[k]);
    fprintf(stderr, "\nmixing step: %d (t = %g, KL %.4g)%s\n", step, ts[step], c->kl[step],
            a->step_auto ? " [auto]" : "");
  }
  return 0;
}

/* latents: DDIM inversion to the mixing step, a batch of images at a time */
static int fit_invert(const char *cmd, const fit_args *a, fit_ctx *c, err *e) {
  const model_info *mi = model_get_info(c->m);
  cli_progress pr;
  cli_progress_init(&pr, a->quiet);
  for (int i0 = 0; i0 < c->set.n; i0 += (int)a->batch) {
    const int nb = c->set.n - i0 < a->batch ? c->set.n - i0 : (int)a->batch;
    edit_src src = {.batch = nb,
                    .image = c->set.x + (size_t)i0 * c->d,
                    .labels = mi->num_classes ? c->set.cls + i0 : NULL,
                    .guidance = c->gp,
                    .threads = (int)a->threads,
                    .height = c->lh,
                    .width = c->lw,
                    .text_states = c->cond,
                    .text_seq = c->seq};
    float *lat = c->lat + (size_t)i0 * c->d;
    if (edit_latent_at(c->s, c->m, c->step, &src, lat, NULL, e) ||
        (c->with_h && edit_mid_at(c->s, c->m, c->step, &src, lat, c->hrows, e)))
      return cli_fail(cmd, "%s", e->msg);
    if (c->with_h) /* the conditional rows come first */
      memcpy(c->hl + (size_t)i0 * c->hd, c->hrows, sizeof *c->hl * c->hd * (size_t)nb);
    cli_on_progress(i0 + nb, c->set.n, 0, &pr);
  }
  return 0;
}

/* The SVMs, and the boundary file with what `edit --boundary` needs to redo the grid. */
static int fit_save(const char *cmd, const fit_args *a, const fit_ctx *c, boundary *b, err *e) {
  boundary_fit_opts fo = {.C = a->C, .test_fraction = a->test_fraction};
  if (boundary_fit(c->lat, c->set.label, c->set.n, (int)c->d, &fo, b, e))
    return cli_fail(cmd, "%s", e->msg);
  if (c->with_h) {
    if (!(b->mid = calloc(1, sizeof *b->mid)) ||
        boundary_fit(c->hl, c->set.label, c->set.n, (int)c->hd, &fo, b->mid, e))
      return cli_fail(cmd, "h-space: %s", b->mid ? e->msg : "out of memory");
    b->mid->c = c->hshape[0];
    b->mid->h = c->hshape[1];
    b->mid->w = c->hshape[2];
  }
  b->c = model_get_info(c->m)->in_channels;
  b->h = c->lh;
  b->w = c->lw;
  b->step = c->step;
  b->timestep = sampler_timesteps(c->s)[c->step];
  b->solver = json_pack("{s:s, s:i, s:o}", "name", "ddim", "steps", c->n, "config",
                        sampler_config_json(c->s));
  snprintf(b->model, sizeof b->model, "%s", a->model_dir);
  snprintf(b->attribute, sizeof b->attribute, "%s", a->attribute ? a->attribute : "");
  if (boundary_save(b, a->out, e))
    return cli_fail(cmd, "%s", e->msg);
  return 0;
}

static void print_fit_report(const fit_args *a, const fit_ctx *c, const boundary *b) {
  const double t = sampler_timesteps(c->s)[c->step];
  printf("boundary: %d images (%d train, %d test), step %d (t = %g), train accuracy %.3f, test "
         "accuracy %.3f, distance spread %.4g, class means %+.3g / %+.3g, radius %.3f -> %s\n",
         c->set.n, b->n_train, b->n_test, c->step, t, b->train_accuracy, b->test_accuracy, b->scale,
         b->mean_neg / (b->scale > 0 ? b->scale : 1), b->mean_pos / (b->scale > 0 ? b->scale : 1),
         b->radius, a->out);
  if (b->mid)
    printf("h-space boundary (mid block %dx%dx%d): train accuracy %.3f, test accuracy %.3f, "
           "distance spread %.4g, class means %+.3g / %+.3g\n",
           b->mid->c, b->mid->h, b->mid->w, b->mid->train_accuracy, b->mid->test_accuracy,
           b->mid->scale, b->mid->mean_neg / (b->mid->scale > 0 ? b->mid->scale : 1),
           b->mid->mean_pos / (b->mid->scale > 0 ? b->mid->scale : 1));
}

static int boundary_fit_main(int argc, char **argv) {
  const char *cmd = "boundary fit";
  fit_args a = {.steps = 50,
                .eps = 0.01,
                .C = 1,
                .test_fraction = 0.2,
                .batch = 16,
                .threads = 2,
                .step_auto = 1};
  int prc = parse_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  err e = {0};
  fit_ctx c = {0};
  boundary b = {0};
  int status = fit_load(cmd, &a, &c, &e);
  if (!status)
    status = fit_alloc(cmd, &a, &c);
  if (!status)
    status = fit_choose_step(cmd, &a, &c, &e);
  if (!status)
    status = fit_invert(cmd, &a, &c, &e);
  if (!status)
    status = fit_save(cmd, &a, &c, &b, &e);
  if (!status)
    print_fit_report(&a, &c, &b);
  boundary_free(&b);
  fit_ctx_free(&c);
  return status;
}

int cmd_boundary(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "fit") == 0)
    return boundary_fit_main(argc - 1, argv + 1);
  if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
    fputs(help, stdout);
    return 0;
  }
  return cli_usage_error("boundary", "expected 'denoised boundary fit ...'");
}
