/* `denoised deblur`: restores a blurry picture with a deblurring model (issue 18) through the
 * pipeline's deblur job: an image-conditioned model samples the sharp image from noise with the
 * blurry one as its condition (any solver), a regression model maps it in one evaluation. The
 * picture may be larger than the training size: the UNet is fully convolutional. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "image.h"
#include "npy.h"

#define DEBLUR_MAX_SIDE 1024
#define DEBLUR_MAX_BYTES (64u << 20)
#define DEBLUR_MAX_BATCH 4096
/* the regression baseline, until an icDPM restores better (tools/deblur/models.md) */
#define DEBLUR_DEFAULT_MODEL "deblur-reg"

static const char help[] =
    "usage: denoised deblur [--model DIR] --image IN.png [--scheduler S] [--steps N] [--seed S]\n"
    "                       [--threads T] [--quiet] -o OUT.png\n"
    "       denoised deblur [--model DIR] --image IN.npy [solver flags] --out OUT.npy\n"
    "       denoised deblur --replay R.png [--model DIR] [--image IN.png] -o OUT.png\n"
    "\n"
    "Restores a blurry picture with a deblurring model: an image-conditioned UNet (config key\n"
    "_cond_channels; trained with 'denoised train --cond') samples the sharp picture from noise\n"
    "given the blurry one; a regression model ('denoised train --regression') maps it in one\n"
    "evaluation (the solver flags then only name the run).\n"
    "  --model DIR        the deblurring model folder (default: the shipped regression\n"
    "                     baseline, models/deblur-reg; models/deblur-icdpm is the icDPM,\n"
    "                     models/deblur-guided the icDPM with structure guidance)\n"
    "  --image IN.png     the blurry picture: RGB, any size up to 1024x1024 that the model's\n"
    "                     down-samplings divide (a multiple of 4 for the configs of\n"
    "                     tools/deblur)\n"
    "  --scheduler S      a solver (default: the model's recommendation, else ddim)\n"
    "  --steps N          solver steps (default: the model's recommendation, else the solver's)\n"
    "  --seed S           the starting noise (default 0)\n"
    "  --threads T        CPU threads (default 2)\n"
    "  -o OUT.png         the restored picture, with the run's metadata\n"
    "  --image IN.npy     a batch [B, C, S, S] in [-1, 1] at the model's size S (B <= 4096;\n"
    "                     image i on noise stream i of the seed), restored to --out OUT.npy\n"
    "  --replay R.png     redo the restoration a PNG of 'denoised deblur' or of a daemon deblur\n"
    "                     job records (model, solver, steps, seed, image index); a daemon job's\n"
    "                     input is not a file: pass it with --image (and its folder with "
    "--model)\n";

typedef struct deblur_args {
  const char *model_dir, *image, *out, *npy_out, *scheduler, *replay;
  long long steps, seed, threads;
  int quiet;
  /* --replay: the record (owned), its resolved scheduler config and image index */
  json_t *meta;
  const json_t *sched_config;
  long long image_index;
} deblur_args;

static int parse_args(int argc, char **argv, deblur_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"image", required_argument, 0, 'i'},
                                       {"scheduler", required_argument, 0, 'S'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"seed", required_argument, 0, 's'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"replay", required_argument, 0, 'r'},
                                       {"out", required_argument, 0, 'u'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'i': a->image = optarg; break;
    case 'o': a->out = optarg; break;
    case 'S': a->scheduler = optarg; break;
    case 'q': a->quiet = 1; break;
    case 'r': a->replay = optarg; break;
    case 'u': a->npy_out = optarg; break;
    case 'n':
      if (cli_parse_int("--steps", optarg, 1, 1000, &a->steps))
        return 2;
      break;
    case 's':
      if (cli_parse_int("--seed", optarg, 0, 9007199254740991LL, &a->seed))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error("deblur", "unknown option (see --help)");
    }
  }
  if (optind < argc)
    return cli_usage_error("deblur", "unexpected argument '%s'", argv[optind]);
  if (a->replay && (a->scheduler || a->steps || a->seed))
    return cli_usage_error("deblur", "--replay takes its solver, steps and seed from the record");
  if (a->replay)
    return a->out ? -1 : cli_usage_error("deblur", "-o is required");
  const size_t il = a->image ? strlen(a->image) : 0;
  const int npy = il > 4 && strcmp(a->image + il - 4, ".npy") == 0;
  if (a->image && (npy ? !a->npy_out || a->out : !a->out || a->npy_out))
    return cli_usage_error("deblur", npy ? "a .npy --image is restored to --out OUT.npy (not -o)"
                                         : "-o OUT.png is required (--out goes with a .npy "
                                           "batch)");
  if (!a->image)
    return cli_usage_error("deblur", "--image is required");
  return -1;
}

/* The shipped deblurring model, beside the default model (models/ in the source tree,
 * share/denoised/models when installed). */
static const char *default_deblur_model(char *buf, size_t n) {
  const char *d = cli_default_model(), *s = strrchr(d, '/');
  snprintf(buf, n, "%.*s%s", s ? (int)(s - d + 1) : 0, d, DEBLUR_DEFAULT_MODEL);
  return buf;
}

/* The blurry picture at its own size, c channels in [-1, 1]. */
static int read_blurry(const char *path, int c, float **x, int *h, int *w, err *e) {
  uint8_t *png = NULL, *px = NULL;
  size_t len;
  int rc = cli_read_file("--image", path, DEBLUR_MAX_BYTES, &png, &len, e);
  char field[600];
  snprintf(field, sizeof field, "--image %s", path);
  if (!rc && (rc = image_png_decode(png, len, DEBLUR_MAX_SIDE, DEBLUR_MAX_SIDE, &px, h, w, e)))
    err_prefix(e, "%s", field);
  free(px);
  if (!rc && !(*x = malloc((size_t)c * *h * *w * sizeof **x)))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc)
    rc = image_from_png(png, len, field, c, *h, *w, *x, e);
  free(png);
  return rc;
}

/* Fills a from the record of a deblurred PNG (pipeline_png): files given as flags stand in for
 * what it does not name (a daemon job's input and model folder). */
static int load_replay(deblur_args *a, err *e) {
  char *text = NULL;
  if (image_png_read_text(a->replay, META_JSON_KEY, &text, e))
    return e->code;
  a->meta = json_loads(text, 0, NULL);
  free(text);
  const json_t *m = a->meta;
  const char *type = json_string_value(json_object_get(json_object_get(m, "edit"), "type"));
  const json_t *idx = json_object_get(m, "image_index"), *seed = json_object_get(m, "seed");
  const json_t *steps = json_object_get(m, "steps");
  const char *solver = json_string_value(json_object_get(m, "scheduler"));
  const char *model = json_string_value(json_object_get(m, "model"));
  const char *job = json_string_value(json_object_get(m, "job_id"));
  if (!type || strcmp(type, "deblur") != 0)
    return err_set(e, ERR_INVALID, "%s: records %s, not a restoration (replay it with '%s')",
                   a->replay, type ? type : "a generation",
                   type ? "denoised edit --replay" : "denoised sample --replay");
  if (!json_is_integer(idx) || json_integer_value(idx) < 0 || !json_is_integer(seed) ||
      json_integer_value(seed) < 0 || !json_is_integer(steps) || json_integer_value(steps) < 1 ||
      !solver || !model)
    return err_set(e, ERR_FORMAT, "%s: metadata '%s' is not a record of a restoration", a->replay,
                   META_JSON_KEY);
  if (!a->image && !(a->image = json_string_value(json_object_get(m, "image"))))
    return err_set(e, ERR_INVALID,
                   "%s records a restoration%s%s, whose input picture is not named: pass it "
                   "with --image",
                   a->replay, job ? " of daemon job " : "", job ? job : "");
  if (!a->model_dir)
    a->model_dir = cli_model_from_record(model);
  a->scheduler = solver;
  a->steps = json_integer_value(steps);
  a->seed = json_integer_value(seed);
  a->image_index = json_integer_value(idx);
  a->sched_config = json_object_get(m, "scheduler_config");
  return ERR_OK;
}

static int run(const deblur_args *a, const model *m, err *e) {
  const model_info *mi = model_get_info(m);
  const int c = mi->regression ? mi->in_channels : mi->cond_channels;
  if (!c)
    return err_set(e, ERR_INVALID,
                   "%s is not a deblurring model (its config has neither _cond_channels nor "
                   "_regression)",
                   a->model_dir);
  const char *solver = a->scheduler ? a->scheduler : mi->rec_solver ? mi->rec_solver : "ddim";
  float *x = NULL;
  int h = 0, w = 0;
  cli_solver sv = {0};
  pipeline_result res = {0};
  json_t *extra = json_pack("{s:s}", "image", a->image); /* what a replay reads */
  int batch = 1, rc = ERR_OK;
  if (!extra)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  else if (a->npy_out) { /* a batch at the model's size */
    h = w = mi->sample_size;
    rc = cli_read_images("--image", a->image, c, h, w, DEBLUR_MAX_BATCH, &batch, &x, e);
  } else
    rc = read_blurry(a->image, c, &x, &h, &w, e);
  if (!rc && a->replay) /* the resolved config the image recorded, nothing on top */
    sv.s = (pipeline_solver){.name = solver, .steps = (int)a->steps, .config = a->sched_config};
  else if (!rc)
    rc = cli_solver_from_flags(solver, a->steps ? a->steps : mi->rec_steps, NULL, NULL, 0, &sv, e);
  cli_progress pr;
  cli_progress_init(&pr, a->quiet);
  const pipeline_request r = {.kind = PIPELINE_DEBLUR,
                              .solver = sv.s,
                              .batch = batch,
                              .height = h,
                              .width = w,
                              .seed = (uint64_t)a->seed,
                              .first_image = (uint64_t)a->image_index,
                              .image = x,
                              .images = batch};
  const pipeline_hooks hk = {
      .progress = cli_on_pipeline_progress, .progress_user = &pr, .threads = (int)a->threads};
  if (!rc)
    rc = pipeline_run(m, &r, &hk, &res, e);
  const int64_t shape[4] = {batch, mi->image_channels, h, w};
  if (!rc && a->npy_out)
    rc = npy_write_f32(a->npy_out, res.images, 4, shape, e);
  else if (!rc)
    rc = cli_write_pngs(a->out, m, &r, &res, cli_model_record(a->model_dir), extra, -1, e);
  if (!rc && !a->quiet)
    fprintf(stderr, "denoised deblur: %d %dx%d picture(s) restored with %s, %d NFE\n", batch, w, h,
            mi->regression ? "the regression model" : solver, res.nfe);
  pipeline_result_clear(&res);
  cli_solver_clear(&sv);
  json_decref(extra);
  free(x);
  return rc;
}

int cmd_deblur(int argc, char **argv) {
  deblur_args a = {.threads = 2};
  int prc = parse_args(argc, argv, &a);
  if (prc >= 0)
    return prc;
  model *m = NULL;
  err e = {0};
  if (a.replay && load_replay(&a, &e)) {
    json_decref(a.meta);
    return cli_fail("deblur", "%s", e.msg);
  }
  char dflt[4200];
  if (!a.model_dir)
    a.model_dir = default_deblur_model(dflt, sizeof dflt);
  if (model_load(a.model_dir, &m, &e)) {
    json_decref(a.meta);
    return cli_fail("deblur", "%s", e.msg);
  }
  const int rc = run(&a, m, &e);
  model_free(m);
  json_decref(a.meta);
  return rc ? cli_fail("deblur", "%s", e.msg) : 0;
}
