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
#include "npy.h"

#define BOUNDARY_MAX_IMAGES 100000
#define BOUNDARY_MAX_LINE 4096

static const char help[] =
    "usage: denoised boundary fit [--model DIR] --labels FILE [--images X.npy] --out B.json\n"
    "                             [--step auto|K] [--eps E] [--steps N] [--class C]\n"
    "                             [--guidance-scale G] [--C C] [--test-fraction F]\n"
    "                             [--attribute NAME] [--batch B] [--threads T] [--quiet]\n"
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
    "  --batch B           images inverted at once (default 16)\n";

typedef struct fit_args {
  const char *model_dir, *labels, *images, *out, *attribute;
  long long steps, step, cls, batch, threads;
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
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "boundary fit";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:L:I:u:s:E:n:l:g:C:f:a:b:j:qh", opts, NULL)) != -1) {
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

/* Reads the label lines (and the images they name, or X.npy's). */
static int read_labels(const fit_args *a, const model *m, sample_set *set, err *e) {
  const model_info *mi = model_get_info(m);
  const int size = mi->sample_size, cin = mi->in_channels;
  const size_t d = (size_t)cin * size * size;
  npy_array all = {0};
  if (a->images) {
    if (npy_read_f32(a->images, &all, e))
      return err_prefix(e, "--images");
    if (all.ndim != 4 || all.shape[1] != cin || all.shape[2] != size || all.shape[3] != size ||
        all.shape[0] < 1 || all.shape[0] > BOUNDARY_MAX_IMAGES) {
      npy_array_free(&all);
      return err_set(e, ERR_INVALID, "--images %s: expected shape [N, %d, %d, %d]", a->images, cin,
                     size, size);
    }
  }
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
  int lineno = 0, rc = ERR_OK;
  while (rc == ERR_OK && fgets(line, sizeof line, f)) {
    lineno++;
    size_t len = strlen(line);
    if (len > BOUNDARY_MAX_LINE) {
      rc = err_set(e, ERR_INVALID, "--labels %s:%d: line too long", a->labels, lineno);
      break;
    }
    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' '))
      line[--len] = 0;
    char *p = line;
    while (*p == ' ' || *p == '\t')
      p++;
    if (!*p || *p == '#')
      continue;
    char *tok[4];
    int nt = 0;
    for (char *t = strtok(p, " \t"); t && nt < 4; t = strtok(NULL, " \t"))
      tok[nt++] = t;
    const int want_path = !a->images;
    if (nt < 1 + want_path || nt > 2 + want_path) {
      rc = err_set(e, ERR_INVALID, "--labels %s:%d: expected '%sLABEL [CLASS]'", a->labels, lineno,
                   want_path ? "PATH " : "");
      break;
    }
    const char *ls = tok[want_path], *cs = nt == 2 + want_path ? tok[1 + want_path] : NULL;
    if (strcmp(ls, "0") != 0 && strcmp(ls, "1") != 0) {
      rc = err_set(e, ERR_INVALID, "--labels %s:%d: label '%s' is not 0 or 1", a->labels, lineno,
                   ls);
      break;
    }
    int64_t cls = a->has_class ? a->cls : -1;
    if (cs) {
      const int64_t v = mi->num_classes ? model_class_from_name(m, cs) : -1;
      if (v < 0) {
        rc = err_set(e, ERR_INVALID, "--labels %s:%d: class '%s' is not a class of this model",
                     a->labels, lineno, cs);
        break;
      }
      cls = v;
    }
    if (mi->num_classes && cls < 0) {
      rc = err_set(e, ERR_INVALID,
                   "--labels %s:%d: no class (this model is class-conditional: add a CLASS "
                   "column or --class)",
                   a->labels, lineno);
      break;
    }
    if (mi->num_classes && cls >= mi->num_classes) {
      rc = err_set(e, ERR_INVALID, "--class %lld out of range [0, %d)", (long long)cls,
                   mi->num_classes);
      break;
    }
    if (set->n >= BOUNDARY_MAX_IMAGES) {
      rc = err_set(e, ERR_INVALID, "--labels: more than %d images", BOUNDARY_MAX_IMAGES);
      break;
    }
    if (a->images) {
      if (set->n >= all.shape[0]) {
        rc = err_set(e, ERR_INVALID, "--labels %s: more lines than the %lld images of %s",
                     a->labels, (long long)all.shape[0], a->images);
        break;
      }
      rc = set_push(set, d, all.data + (size_t)set->n * d, ls[0] - '0', cls, e);
    } else {
      char path[8300];
      if (tok[0][0] == '/')
        snprintf(path, sizeof path, "%s", tok[0]);
      else
        snprintf(path, sizeof path, "%s/%s", dir, tok[0]);
      float *x = NULL;
      rc = cli_read_image("--labels image", path, cin, size, size, &x, e);
      if (rc == ERR_OK)
        rc = set_push(set, d, x, ls[0] - '0', cls, e);
      free(x);
    }
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
  model *m = NULL;
  sampler *s = NULL;
  sample_set set = {0};
  float *lat = NULL, *abar = NULL, *hl = NULL, *hrows = NULL;
  double *kl = NULL;
  boundary b = {0};
  int status = 1;
  if (model_load(a.model_dir, &m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  if (!mi->num_classes && (a.has_class || a.has_guidance)) {
    status = cli_usage_error(cmd, "this model is not class-conditional: drop --class and "
                                  "--guidance-scale");
    goto done;
  }
  json_t *eta0 = json_pack("{s:f}", "eta", 0.0);
  const pipeline_solver ddim = {.name = "ddim", .steps = (int)a.steps, .options = eta0};
  int rc = pipeline_sampler(m, &ddim, &s, NULL, 0, &e);
  json_decref(eta0);
  if (!rc && a.class_s && (a.cls = model_class_from_name(m, a.class_s)) < 0) {
    status = cli_usage_error(cmd, "--class: '%s' is not a class of this model", a.class_s);
    goto done;
  }
  if (rc || read_labels(&a, m, &set, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const int n = sampler_num_steps(s), size = mi->sample_size;
  const size_t d = (size_t)mi->in_channels * size * size;
  guidance g = guidance_for(m, a.guidance);
  const guidance *gp = a.has_guidance ? &g : NULL;
  const int passes = guidance_passes(gp);
  /* the h-space boundary too when the model has a bottleneck (a UNet's mid block) */
  int hshape[3] = {0, 0, 0};
  err he = {0};
  const int with_h = model_mid_shape(m, size, size, hshape, &he) == ERR_OK;
  const size_t hd = (size_t)hshape[0] * hshape[1] * hshape[2];
  abar = malloc(sizeof *abar * (size_t)n);
  kl = malloc(sizeof *kl * (size_t)n);
  lat = malloc(sizeof *lat * d * (size_t)set.n);
  if (with_h) {
    hl = malloc(sizeof *hl * hd * (size_t)set.n);
    hrows = malloc(sizeof *hrows * hd * (size_t)a.batch * passes);
  }
  if (!abar || !kl || !lat || (with_h && (!hl || !hrows))) {
    cli_fail(cmd, "out of memory");
    goto done;
  }
  for (int k = 0; k < n; k++) {
    float al, be;
    sampler_step_level(s, k, &al, &be);
    abar[k] = al * al;
  }
  int step = (int)a.step;
  if (boundary_mixing_step(set.x, set.n, (int)d, abar, n, a.eps, kl, &step, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (!a.step_auto)
    step = (int)a.step;
  if (step >= n) {
    status = cli_usage_error(cmd, "--step %d: the grid has %d steps", step, n);
    goto done;
  }
  const double *ts = sampler_timesteps(s);
  if (!a.quiet) {
    fprintf(stderr, "KL(q_t || N(0, I)) per value along the %d-step grid:", n);
    for (int k = 0; k < n; k += (n + 9) / 10)
      fprintf(stderr, " t=%g:%.3g", ts[k], kl[k]);
    fprintf(stderr, "\nmixing step: %d (t = %g, KL %.4g)%s\n", step, ts[step], kl[step],
            a.step_auto ? " [auto]" : "");
  }
  /* latents: DDIM inversion to the mixing step, a batch of images at a time */
  cli_progress pr;
  cli_progress_init(&pr, a.quiet);
  for (int i0 = 0; i0 < set.n; i0 += (int)a.batch) {
    const int nb = set.n - i0 < a.batch ? set.n - i0 : (int)a.batch;
    edit_src src = {.batch = nb,
                    .image = set.x + (size_t)i0 * d,
                    .labels = mi->num_classes ? set.cls + i0 : NULL,
                    .guidance = gp,
                    .threads = (int)a.threads};
    if (edit_latent_at(s, m, step, &src, lat + (size_t)i0 * d, NULL, &e) ||
        (with_h && edit_mid_at(s, m, step, &src, lat + (size_t)i0 * d, hrows, &e))) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
    if (with_h) /* the conditional rows come first */
      memcpy(hl + (size_t)i0 * hd, hrows, sizeof *hl * hd * (size_t)nb);
    cli_on_progress(i0 + nb, set.n, 0, &pr);
  }
  boundary_fit_opts fo = {.C = a.C, .test_fraction = a.test_fraction};
  if (boundary_fit(lat, set.label, set.n, (int)d, &fo, &b, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (with_h) {
    if (!(b.mid = calloc(1, sizeof *b.mid)) ||
        boundary_fit(hl, set.label, set.n, (int)hd, &fo, b.mid, &e)) {
      cli_fail(cmd, "h-space: %s", b.mid ? e.msg : "out of memory");
      goto done;
    }
    b.mid->c = hshape[0];
    b.mid->h = hshape[1];
    b.mid->w = hshape[2];
  }
  b.c = mi->in_channels;
  b.h = b.w = size;
  b.step = step;
  b.timestep = ts[step];
  b.solver =
      json_pack("{s:s, s:i, s:o}", "name", "ddim", "steps", n, "config", sampler_config_json(s));
  snprintf(b.model, sizeof b.model, "%s", a.model_dir);
  snprintf(b.attribute, sizeof b.attribute, "%s", a.attribute ? a.attribute : "");
  if (boundary_save(&b, a.out, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  printf("boundary: %d images (%d train, %d test), step %d (t = %g), train accuracy %.3f, test "
         "accuracy %.3f, distance spread %.4g, class means %+.3g / %+.3g, radius %.3f -> %s\n",
         set.n, b.n_train, b.n_test, step, ts[step], b.train_accuracy, b.test_accuracy, b.scale,
         b.mean_neg / (b.scale > 0 ? b.scale : 1), b.mean_pos / (b.scale > 0 ? b.scale : 1),
         b.radius, a.out);
  if (b.mid)
    printf("h-space boundary (mid block %dx%dx%d): train accuracy %.3f, test accuracy %.3f, "
           "distance spread %.4g, class means %+.3g / %+.3g\n",
           b.mid->c, b.mid->h, b.mid->w, b.mid->train_accuracy, b.mid->test_accuracy, b.mid->scale,
           b.mid->mean_neg / (b.mid->scale > 0 ? b.mid->scale : 1),
           b.mid->mean_pos / (b.mid->scale > 0 ? b.mid->scale : 1));
  status = 0;
done:
  boundary_free(&b);
  free(set.x);
  free(set.label);
  free(set.cls);
  free(lat);
  free(hl);
  free(hrows);
  free(abar);
  free(kl);
  sampler_free(s);
  model_free(m);
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
