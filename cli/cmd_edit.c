/* `denoised edit`: edits through a model's noise space. With --noise, the maps of `denoised
 * invert` sampled again under another class, from a later step (T_skip), shifted or with a
 * colour offset; with --boundary, a BoundaryDiffusion move of a generated or inverted image
 * across a semantic boundary at its mixing step. */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "boundary.h"
#include "cli.h"
#include "edit.h"
#include "image.h"
#include "invert.h"
#include "meta.h"
#include "npy.h"

#define EDIT_MAX_BATCH 4096

static const char help[] =
    "usage: denoised edit [--model DIR] --noise NOISE.npy [--class C[,C...]]\n"
    "                     [--guidance-scale G] [--skip K] [--shift DX,DY] [--colour R,G,B\n"
    "                     [--colour-from K]] (-o OUT.png | --out OUT.npy) [--threads T]\n"
    "                     [--prompt TARGET [--source-prompt SOURCE] [--negative-prompt N]]\n"
    "       denoised edit [--model DIR] --boundary B.json --strength S\n"
    "                     (--image IN.png | --seed S [--batch N]) [--class C[,C...]]\n"
    "                     [--guidance-scale G] [--eta E] [--space x|h|both]\n"
    "                     [--prompt P [--negative-prompt N]]\n"
    "                     (-o OUT.png | --out OUT.npy)\n"
    "       denoised edit --replay IMAGE.png [--model DIR] (-o OUT.png | --out OUT.npy)\n"
    "\n"
    "Noise-space edits (--noise, from 'denoised invert'; NOISE.json must be beside it):\n"
    "  --class C          sample with these classes instead of the inverted ones\n"
    "  --guidance-scale G guidance of the edited run (default: the inversion's)\n"
    "  --skip K           ddpm maps: start at step K (T_skip): the first K steps rerun the\n"
    "                     inversion's chain, so larger K keeps more of the input\n"
    "  --shift DX,DY      translate x_T and every map by whole pixels (wrapping around)\n"
    "  --colour R,G,B     ddpm maps: add this offset (in [-1, 1] image units) through the maps\n"
    "                     of the steps from --colour-from (default: the last quarter) on\n"
    "  --prompt TARGET    text-to-image models: sample the (latent) maps with this prompt\n"
    "                     (default: the inversion's); the paper's text-based edit is\n"
    "                     --prompt TARGET --skip K with ddpm maps\n"
    "  --source-prompt S  the prompt of the first --skip steps (default: the inversion's,\n"
    "                     which gives its chain back exactly)\n"
    "  --negative-prompt N  the unconditional prompt (default: the inversion's)\n"
    "  (text models: --guidance-scale defaults to 15, the paper's cfg_tar; --shift moves by\n"
    "  whole latents, multiples of the VAE's factor in pixels; --colour does not apply)\n"
    "Boundary edits (BoundaryDiffusion, Zhu et al. 2023):\n"
    "  --boundary B.json  from 'denoised boundary fit'\n"
    "  --strength S       target signed distance from the boundary at the mixing step, in units\n"
    "                     of the spread of the training latents (+: the positive label)\n"
    "  --image IN         edit this image (PNG or .npy [C, H, W] / [B, C, H, W]); it is\n"
    "                     DDIM-inverted to the mixing step\n"
    "  --seed S --batch N edit N generated images (default 1)\n"
    "  --eta E            eta of the steps after the edit (default 1, as the release)\n"
    "  --space x|h|both   move x_t, the UNet's bottleneck h (its mid-block output, used in\n"
    "                     the first step after the mixing step), or both as the authors'\n"
    "                     release (default: both when the file has an h part, else x)\n"
    "Output: -o OUT.png (OUT-<i>.png for several) or --out OUT.npy [B, C, H, W].\n"
    "  --replay IMAGE.png redo the edit a PNG of 'denoised edit' records (its noise or boundary\n"
    "                     file and input must still be where they were): that one image\n";

typedef struct edit_args {
  const char *model_dir, *noise, *boundary, *image, *classes, *png_out, *npy_out, *replay;
  const char *shift_s, *colour_s, *space;
  const char *prompt, *source_prompt, *negative_prompt;
  double guidance, strength, eta, colour[3];
  long long skip, seed, batch, threads, colour_from;
  int has_guidance, has_strength, has_seed, has_skip, has_colour_from, quiet;
  int shift[2];
  /* --replay: the record's image (rng index and place in its run's batch), else only = -1 */
  long long only, batch_index;
  int inverted;    /* a boundary edit of an input picture */
  json_t *meta;    /* the record the strings above point into */
  char labels[32]; /* its class when it names no --class list (daemon records) */
  const char *job; /* the daemon job that made it, or NULL */
} edit_args;

/* What a replay lacks: the file the record does not name (a daemon job's inputs are its own). */
static int replay_missing(const edit_args *a, const char *what, const char *flag) {
  if (a->job)
    return cli_fail("edit",
                    "%s: made by daemon job %s, whose %s is not a file here: pass it with %s%s",
                    a->replay, a->job, what, flag,
                    strcmp(flag, "--noise") == 0 ? " (GET /v1/jobs/ID/noise.npy)" : "");
  return cli_fail("edit", "%s: the record names no %s: pass it with %s", a->replay, what, flag);
}

static void replay_noise_args(edit_args *a, const json_t *ed) {
  const json_t *sh = json_object_get(ed, "shift"), *co = json_object_get(ed, "colour");
  const json_t *cf = json_object_get(ed, "colour_from");
  a->skip = json_integer_value(json_object_get(ed, "skip"));
  a->has_skip = a->skip > 0;
  if (json_array_size(sh) == 2) {
    a->shift[0] = (int)json_integer_value(json_array_get(sh, 0));
    a->shift[1] = (int)json_integer_value(json_array_get(sh, 1));
    a->shift_s = "replay";
  }
  for (int c = 0; json_array_size(co) == 3 && c < 3; c++) {
    a->colour[c] = json_number_value(json_array_get(co, c));
    a->colour_s = "replay";
  }
  a->colour_from = json_integer_value(cf);
  a->has_colour_from = json_is_integer(cf);
}

static void replay_boundary_args(edit_args *a, const json_t *ed) {
  const json_t *eta = json_object_get(ed, "eta");
  a->strength = json_number_value(json_object_get(ed, "strength"));
  a->has_strength = 1;
  a->eta = json_is_number(eta) ? json_number_value(eta) : 1.0;
  a->space = json_string_value(json_object_get(ed, "space"));
  a->inverted = json_is_true(json_object_get(ed, "inverted"));
}

/* Fills the arguments from the record a PNG of `denoised edit` or of a daemon edit job carries
 * (pipeline_png; the CLI adds its files as extra keys). Files given as flags (--noise,
 * --boundary, --image) stand in for what the record does not name. Exit status on failure. */
static int load_replay(edit_args *a) {
  const char *cmd = "edit";
  char *text = NULL;
  err e = {0};
  if (image_png_read_text(a->replay, META_JSON_KEY, &text, &e))
    return cli_fail(cmd, "%s", e.msg);
  json_t *m = json_loads(text, 0, NULL);
  free(text);
  a->meta = m;
  const json_t *ed = json_object_get(m, "edit"), *gs = json_object_get(m, "guidance_scale");
  const char *type = json_string_value(json_object_get(ed, "type"));
  const json_t *idx = json_object_get(m, "image_index"), *seed = json_object_get(m, "seed");
  const json_t *bi = json_object_get(m, "batch_index"), *lab = json_object_get(m, "class_label");
  if (!type || !json_is_integer(idx) || json_integer_value(idx) < 0 || !json_is_integer(seed) ||
      json_integer_value(seed) < 0 || (bi && (!json_is_integer(bi) || json_integer_value(bi) < 0)))
    return cli_fail(cmd, "%s: metadata '%s' is not a record of an edit", a->replay, META_JSON_KEY);
  a->only = json_integer_value(idx);
  a->batch_index = bi ? json_integer_value(bi) : a->only;
  a->job = json_string_value(json_object_get(m, "job_id"));
  if (!a->model_dir)
    a->model_dir = json_string_value(json_object_get(m, "model"));
  if (a->model_dir)
    a->model_dir = cli_model_from_record(a->model_dir);
  a->classes = json_string_value(json_object_get(m, "classes"));
  if (!a->classes && json_is_integer(lab)) { /* a daemon job: one class for its images */
    snprintf(a->labels, sizeof a->labels, "%lld", (long long)json_integer_value(lab));
    a->classes = a->labels;
  }
  if (json_is_number(gs)) {
    a->guidance = json_number_value(gs);
    a->has_guidance = 1;
  }
  /* text models: the prompts the record names (alive as long as the record) */
  a->prompt = json_string_value(json_object_get(m, "prompt"));
  a->negative_prompt = json_string_value(json_object_get(m, "negative_prompt"));
  a->source_prompt = json_string_value(json_object_get(ed, "source_prompt"));
  if (strncmp(type, "invert_", 7) == 0) {
    replay_noise_args(a, ed);
    if (!a->noise && !(a->noise = json_string_value(json_object_get(m, "noise"))))
      return replay_missing(a, "noise", "--noise");
  } else if (strcmp(type, "boundary") == 0) {
    replay_boundary_args(a, ed);
    if (!a->boundary && !(a->boundary = json_string_value(json_object_get(m, "boundary"))))
      return replay_missing(a, "boundary", "--boundary");
    if (!a->image)
      a->image = json_string_value(json_object_get(m, "image"));
    if (a->inverted && !a->image)
      return replay_missing(a, "input picture", "--image");
    if (!a->image) { /* generated: that one image of the seed's streams */
      a->seed = json_integer_value(seed);
      a->has_seed = 1;
    }
  } else {
    return cli_fail(cmd,
                    "%s: records %s, not a noise or boundary edit (replay it with "
                    "'denoised %s --replay')",
                    a->replay, type, strcmp(type, "deblur") == 0 ? "deblur" : "sample");
  }
  return 0;
}

static const struct option edit_opts[] = {{"model", required_argument, 0, 'm'},
                                          {"noise", required_argument, 0, 'N'},
                                          {"boundary", required_argument, 0, 'B'},
                                          {"strength", required_argument, 0, 'T'},
                                          {"image", required_argument, 0, 'i'},
                                          {"seed", required_argument, 0, 'S'},
                                          {"batch", required_argument, 0, 'b'},
                                          {"class", required_argument, 0, 'l'},
                                          {"guidance-scale", required_argument, 0, 'g'},
                                          {"skip", required_argument, 0, 'k'},
                                          {"shift", required_argument, 0, 'x'},
                                          {"colour", required_argument, 0, 'C'},
                                          {"color", required_argument, 0, 'C'},
                                          {"colour-from", required_argument, 0, 'F'},
                                          {"eta", required_argument, 0, 'e'},
                                          {"space", required_argument, 0, 'H'},
                                          {"replay", required_argument, 0, 'r'},
                                          {"out", required_argument, 0, 'u'},
                                          {"threads", required_argument, 0, 'j'},
                                          {"quiet", no_argument, 0, 'q'},
                                          {"prompt", required_argument, 0, 'P'},
                                          {"source-prompt", required_argument, 0, 'R'},
                                          {"negative-prompt", required_argument, 0, 'X'},
                                          {"help", no_argument, 0, 'h'},
                                          {0, 0, 0, 0}};

/* --shift DX,DY: whole pixels, as the maps are moved by rolling them */
static int parse_shift(const char *arg, edit_args *a) {
  double v[2];
  if (cli_parse_list("--shift", arg, 2, -4096, 4096, v))
    return 2;
  if (v[0] != floor(v[0]) || v[1] != floor(v[1]))
    return cli_usage_error("edit", "--shift takes whole pixels, got '%s'", arg);
  a->shift[0] = (int)v[0];
  a->shift[1] = (int)v[1];
  a->shift_s = arg;
  return 0;
}

/* One option of getopt_long; returns 0 to go on, else what parse_args returns. */
static int edit_option(int c, const char *arg, edit_args *a) {
  switch (c) {
  case 'm': a->model_dir = arg; break;
  case 'N': a->noise = arg; break;
  case 'B': a->boundary = arg; break;
  case 'T':
    if (cli_parse_double("--strength", arg, -1000, 1000, &a->strength))
      return 2;
    a->has_strength = 1;
    break;
  case 'i': a->image = arg; break;
  case 'S':
    if (cli_parse_int("--seed", arg, 0, (1ll << 53) - 1, &a->seed))
      return 2;
    a->has_seed = 1;
    break;
  case 'b': return cli_parse_int("--batch", arg, 1, EDIT_MAX_BATCH, &a->batch) ? 2 : 0;
  case 'l': a->classes = arg; break;
  case 'g':
    if (cli_parse_double("--guidance-scale", arg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
      return 2;
    a->has_guidance = 1;
    break;
  case 'k':
    if (cli_parse_int("--skip", arg, 0, 100000, &a->skip))
      return 2;
    a->has_skip = 1;
    break;
  case 'x': return parse_shift(arg, a);
  case 'C':
    if (cli_parse_list("--colour", arg, 3, -2, 2, a->colour))
      return 2;
    a->colour_s = arg;
    break;
  case 'F':
    if (cli_parse_int("--colour-from", arg, 0, 100000, &a->colour_from))
      return 2;
    a->has_colour_from = 1;
    break;
  case 'e': return cli_parse_double("--eta", arg, 0, 1, &a->eta) ? 2 : 0;
  case 'H':
    if (edit_space_parse(arg, NULL, &(edit_space){0}))
      return cli_usage_error("edit", "--space: '%s' is not x, h or both", arg);
    a->space = arg;
    break;
  case 'r': a->replay = arg; break;
  case 'u': a->npy_out = arg; break;
  case 'o': a->png_out = arg; break;
  case 'j': return cli_parse_int("--threads", arg, 1, 256, &a->threads) ? 2 : 0;
  case 'q': a->quiet = 1; break;
  case 'P': a->prompt = arg; break;
  case 'R': a->source_prompt = arg; break;
  case 'X': a->negative_prompt = arg; break;
  case 'h': fputs(help, stdout); return -1;
  default: return cli_usage_error("edit", "bad option");
  }
  return 0;
}

/* The flags of the two kinds of edit exclude each other's. */
static int check_args(edit_args *a) {
  const char *cmd = "edit";
  if (!!a->noise == !!a->boundary)
    return cli_usage_error(cmd, "give either --noise (noise-space edits) or --boundary");
  if (a->noise) {
    if (a->has_strength || a->image || a->has_seed || a->batch || a->space)
      return cli_usage_error(cmd,
                             "--strength, --image, --seed, --batch and --space go with --boundary");
    if (a->has_colour_from && !a->colour_s)
      return cli_usage_error(cmd, "--colour-from needs --colour");
  } else {
    if (a->has_skip || a->shift_s || a->colour_s || a->has_colour_from)
      return cli_usage_error(cmd, "--skip, --shift and --colour go with --noise");
    if (a->source_prompt)
      return cli_usage_error(cmd, "--source-prompt goes with --noise");
    if (!a->has_strength)
      return cli_usage_error(cmd, "--boundary needs --strength");
    if (!!a->image == !!a->has_seed)
      return cli_usage_error(cmd, "--boundary needs either --image or --seed");
    if (a->image && a->batch)
      return cli_usage_error(cmd, "--batch goes with --seed (an --image .npy sets its own)");
  }
  if (!a->batch)
    a->batch = 1;
  return 0;
}

/* Returns 0 to go on, -1 after --help, else the exit status. */
static int parse_args(int argc, char **argv, edit_args *a) {
  const char *cmd = "edit";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:N:B:T:i:S:b:l:g:k:x:C:F:e:H:r:u:o:j:qhP:R:X:", edit_opts,
                          NULL)) != -1) {
    int rc = edit_option(c, optarg, a);
    if (rc)
      return rc;
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->png_out && !a->npy_out)
    return cli_usage_error(cmd, "give -o OUT.png or --out OUT.npy");
  if (a->replay) {
    if (a->classes || a->has_strength || a->has_seed || a->batch || a->has_guidance ||
        a->has_skip || a->shift_s || a->colour_s || a->has_colour_from || a->space || a->prompt ||
        a->source_prompt || a->negative_prompt)
      return cli_usage_error(cmd, "--replay takes only --model, the files the record does not "
                                  "name (--noise, --boundary, --image), -o/--out, --threads and "
                                  "--quiet");
    int rc = load_replay(a);
    if (rc)
      return rc;
  }
  if (!a->model_dir)
    a->model_dir = cli_default_model();
  return check_args(a);
}

static int write_outputs(const edit_args *a, const model *m, const pipeline_request *r,
                         const pipeline_result *res, const json_t *extra, err *e) {
  if (a->npy_out) {
    const int64_t shape[4] = {r->batch, model_get_info(m)->image_channels, res->height, res->width};
    int rc = npy_write_f32(a->npy_out, res->images, 4, shape, e);
    if (rc != ERR_OK)
      return rc;
  }
  /* a replay writes the record's image: alone in its run, or at its place in the batch */
  const int only = a->only < 0 ? -1 : r->batch == 1 ? 0 : (int)a->batch_index;
  return a->png_out
             ? cli_write_pngs(a->png_out, m, r, res, cli_model_record(a->model_dir), extra, only, e)
             : ERR_OK;
}

/* pipeline_run, then the outputs: every image, or on --replay the recorded one */
static int run_and_write(const edit_args *a, const model *m, const pipeline_request *r,
                         const pipeline_hooks *h, pipeline_result *res, err *e) {
  json_t *extra = json_object();
  if (!extra)
    return err_set(e, ERR_NOMEM, "out of memory");
  /* the files and flags a replay needs beside the request */
  if (a->noise)
    json_object_set_new(extra, "noise", json_string(a->noise));
  if (a->boundary)
    json_object_set_new(extra, "boundary", json_string(a->boundary));
  if (a->image)
    json_object_set_new(extra, "image", json_string(a->image));
  if (a->classes)
    json_object_set_new(extra, "classes", json_string(a->classes));
  int rc = pipeline_run(m, r, h, res, e);
  if (rc == ERR_OK)
    rc = write_outputs(a, m, r, res, extra, e);
  json_decref(extra);
  return rc;
}

/* NOISE.npy's sidecar NOISE.json, as `denoised invert` writes it */
static json_t *read_sidecar(const char *npy, err *e) {
  size_t n = strlen(npy);
  if (n < 5 || strcmp(npy + n - 4, ".npy") != 0) {
    err_set(e, ERR_INVALID, "--noise must name a .npy file");
    return NULL;
  }
  char path[4200];
  snprintf(path, sizeof path, "%.*s.json", (int)(n - 4), npy);
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j) {
    err_set(e, ERR_FORMAT, "%s: %s (the sidecar 'denoised invert' writes)", path, je.text);
    return NULL;
  }
  const json_t *f = json_object_get(j, "format"), *mth = json_object_get(j, "method");
  const json_t *sv = json_object_get(j, "solver"), *bt = json_object_get(j, "batch");
  const json_t *gs = json_object_get(j, "guidance_scale");
  if (!json_is_string(f) || strcmp(json_string_value(f), "denoised-noise") != 0 ||
      !json_is_string(mth) ||
      (strcmp(json_string_value(mth), "ddim") && strcmp(json_string_value(mth), "ddpm")) ||
      !json_is_object(sv) || !json_is_integer(json_object_get(sv, "steps")) ||
      json_integer_value(json_object_get(sv, "steps")) < 1 || !json_is_integer(bt) ||
      json_integer_value(bt) < 1 || json_integer_value(bt) > EDIT_MAX_BATCH ||
      (gs && !json_is_null(gs) &&
       (!json_is_number(gs) || !(json_number_value(gs) >= 0) ||
        json_number_value(gs) > GUIDANCE_MAX_SCALE))) {
    err_set(e, ERR_FORMAT,
            "%s: not a denoised-noise sidecar (format, method, solver.steps, batch, "
            "guidance_scale)",
            path);
    json_decref(j);
    return NULL;
  }
  return j;
}

/* A daemon record stands in for the sidecar its job never wrote: the inversion's grid, classes
 * and guidance; the batch is the noise file's. */
static json_t *sidecar_from_record(const json_t *rec, int64_t batch) {
  const json_t *ed = json_object_get(rec, "edit"), *lab = json_object_get(rec, "class_label");
  const json_t *src = json_object_get(ed, "source_class"),
               *sg = json_object_get(ed, "source_guidance");
  json_t *labels = json_null();
  if (json_is_integer(lab)) {
    labels = json_array();
    for (int64_t b = 0; b < batch; b++)
      json_array_append_new(labels, json_integer(json_integer_value(src ? src : lab)));
  }
  json_t *side = json_pack(
      "{s:s, s:s, s:{s:s, s:O, s:O}, s:o, s:O?, s:I}", "format", "denoised-noise", "method",
      json_string_value(json_object_get(ed, "type")) + 7, "solver", "name", "ddim", "steps",
      json_object_get(rec, "steps"), "config", json_object_get(rec, "scheduler_config"),
      "class_labels", labels, "guidance_scale", sg, "batch", (json_int_t)batch);
  const json_t *prompt = json_object_get(rec, "prompt"), *cs = json_object_get(rec, "clip_skip");
  const json_t *sp = json_object_get(ed, "source_prompt");
  if (side && json_is_string(prompt)) /* a text model's: the inversion's prompt and size */
    json_object_update_new(
        side, json_pack("{s:O, s:O?, s:I, s:O, s:O}", "prompt", sp ? sp : prompt, "negative_prompt",
                        json_object_get(rec, "negative_prompt"), "clip_skip",
                        (json_int_t)(json_is_integer(cs) ? json_integer_value(cs) : 1), "height",
                        json_object_get(rec, "height"), "width", json_object_get(rec, "width")));
  return side;
}

/* What the sidecar of the maps says (or the daemon record standing in for it). */
typedef struct noise_side {
  json_t *json;
  int ddpm, n, batch; /* DDPM maps (else DDIM x_T), steps of their grid, images */
  /* text models: the inversion's prompts, clip skip and picture size (else NULL, 0) */
  const char *prompt, *negative_prompt;
  int clip_skip, height, width;
} noise_side;

/* The steps below return 0 to go on, else the exit status (the error printed). */

static int noise_load(const edit_args *a, npy_array *maps, noise_side *s, err *e) {
  if (npy_read_f32(a->noise, maps, e))
    return cli_fail("edit", "%s", e->msg);
  s->json = a->meta && !json_object_get(a->meta, "noise")
                ? sidecar_from_record(a->meta, maps->ndim ? maps->shape[0] : 0)
                : read_sidecar(a->noise, e);
  if (!s->json)
    return cli_fail("edit", "%s", e->msg);
  s->ddpm = strcmp(json_string_value(json_object_get(s->json, "method")), "ddpm") == 0;
  s->n = (int)json_integer_value(json_object_get(json_object_get(s->json, "solver"), "steps"));
  s->batch = (int)json_integer_value(json_object_get(s->json, "batch"));
  s->prompt = json_string_value(json_object_get(s->json, "prompt"));
  s->negative_prompt = json_string_value(json_object_get(s->json, "negative_prompt"));
  s->clip_skip = (int)json_integer_value(json_object_get(s->json, "clip_skip"));
  s->height = (int)json_integer_value(json_object_get(s->json, "height"));
  s->width = (int)json_integer_value(json_object_get(s->json, "width"));
  return 0;
}

/* The maps against their sidecar and the model, and the flags that need DDPM maps or name
 * their steps. */
static int noise_check(const edit_args *a, const model_info *mi, const npy_array *maps,
                       const noise_side *s, err *e) {
  const char *cmd = "edit";
  const int f = mi->latent_factor, cin = mi->in_channels, batch = s->batch;
  if (f > 1 && (!s->prompt || s->height < f || s->width < f || s->height % f || s->width % f ||
                s->clip_skip < 1 || s->clip_skip > 12))
    return cli_fail(cmd,
                    "%s: its sidecar has no prompt, clip_skip and size of a text-to-image "
                    "inversion (made by 'denoised invert --prompt')",
                    a->noise);
  if (f == 1 && (s->prompt || a->prompt || a->source_prompt || a->negative_prompt))
    return cli_usage_error(cmd, "this model takes no prompt (and its maps were made without)");
  const int hh = f > 1 ? s->height / f : mi->sample_size, ww = f > 1 ? s->width / f : hh;
  if (!s->ddpm && (a->has_skip || a->colour_s))
    return cli_usage_error(cmd, "--skip and --colour need ddpm noise maps (this is %s x_T)",
                           json_string_value(json_object_get(s->json, "method")));
  const int64_t want5[5] = {batch, s->n + 1, cin, hh, ww}, want4[4] = {batch, cin, hh, ww};
  if (batch < 1 || maps->ndim != (s->ddpm ? 5 : 4) ||
      memcmp(maps->shape, s->ddpm ? want5 : want4, sizeof(int64_t) * (s->ddpm ? 5 : 4)) != 0)
    return cli_fail(
        cmd, "%s: shape does not match its sidecar and the model (expected [%d, %s%d, %d, %d])",
        a->noise, batch, s->ddpm ? "steps + 1, " : "", cin, hh, ww);
  if (npy_check_finite(maps, a->noise, e))
    return cli_fail(cmd, "%s", e->msg);
  if (a->has_skip && a->skip >= s->n)
    return cli_usage_error(cmd, "--skip %lld: the maps have %d steps", a->skip, s->n);
  if (a->has_colour_from && a->colour_from >= s->n)
    return cli_usage_error(cmd, "--colour-from %lld: the maps have %d steps", a->colour_from, s->n);
  return 0;
}

/* The classes the maps were made with (*src) and those to sample with (*tgt: --class, else the
 * same); both stay NULL for a model without classes. */
static int noise_labels(const edit_args *a, const model *m, const noise_side *s, int64_t **src,
                        int64_t **tgt) {
  const char *cmd = "edit";
  const model_info *mi = model_get_info(m);
  const json_t *jl = json_object_get(s->json, "class_labels");
  if (!mi->num_classes) {
    if (json_is_array(jl))
      return cli_fail(cmd, "%s: made with class labels, but this model is not class-conditional",
                      a->noise);
    if (a->classes || (a->has_guidance && mi->latent_factor <= 1))
      return cli_usage_error(cmd, "this model is not class-conditional: drop --class%s",
                             mi->latent_factor > 1 ? "" : " and --guidance-scale");
    return 0;
  }
  *src = malloc(sizeof **src * (size_t)s->batch);
  *tgt = malloc(sizeof **tgt * (size_t)s->batch);
  if (!*src || !*tgt || !json_is_array(jl) || (int)json_array_size(jl) != s->batch)
    return cli_fail(cmd, "%s: the sidecar has no class_labels for this class-conditional model",
                    a->noise);
  for (int b = 0; b < s->batch; b++) {
    const json_t *v = json_array_get(jl, b);
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) >= mi->num_classes)
      return cli_fail(cmd, "%s: class_labels[%d] is not a class of this model", a->noise, b);
    (*src)[b] = (*tgt)[b] = json_integer_value(v);
  }
  if (a->classes && cli_parse_labels("--class", a->classes, s->batch, m, *tgt))
    return 2;
  return 0;
}

/* The maps sampled again on the grid they were made on (DDIM with the recorded, resolved
 * config) under the edit, and the outputs written. */
static int noise_run(const edit_args *a, model *m, const npy_array *maps, const noise_side *s,
                     int64_t *src, int64_t *tgt, err *e) {
  const int text = model_get_info(m)->latent_factor > 1;
  const int classes = model_get_info(m)->num_classes != 0 || text;
  const json_t *jg = json_object_get(s->json, "guidance_scale");
  cli_progress pr;
  cli_progress_init(&pr, a->quiet);
  const double g_src = json_is_number(jg) ? json_number_value(jg) : 1.0;
  /* text models: the edit-friendly paper's cfg_tar unless given */
  const double g_tgt = a->has_guidance ? a->guidance : text ? 15.0 : g_src;
  if (text && !a->has_guidance && !a->quiet)
    fprintf(stderr, "denoised edit: guidance scale 15 (the edit-friendly paper's for the target "
                    "prompt; --guidance-scale overrides it)\n");
  guidance gs = guidance_for(m, g_src), gt = guidance_for(m, g_tgt);
  const int guided_src = classes && json_is_number(jg);
  const int guided_tgt = classes && (a->has_guidance || json_is_number(jg) || text);
  const json_t *grid = json_object_get(json_object_get(s->json, "solver"), "config");
  pipeline_request r = {
      .kind = s->ddpm ? PIPELINE_INVERT_DDPM : PIPELINE_INVERT_DDIM,
      .solver = {.name = "ddim", .steps = s->n, .config = grid},
      .batch = s->batch,
      .height = text ? s->height : 0,
      .width = text ? s->width : 0,
      .labels = tgt,
      .prompt = a->prompt ? a->prompt : s->prompt,
      .negative_prompt = a->negative_prompt ? a->negative_prompt : s->negative_prompt,
      .clip_skip = s->clip_skip,
      .guidance = guided_tgt ? &gt : NULL,
      .noise = maps->data,
      .noise_shape = maps->shape,
      .noise_ndim = maps->ndim,
      .invert = {.source_labels = src,
                 .source_guidance = guided_src ? &gs : NULL,
                 .source_prompt = a->source_prompt ? a->source_prompt : s->prompt,
                 .skip = (int)a->skip,
                 .edit = {.dx = a->shift[0],
                          .dy = a->shift[1],
                          .has_colour = a->colour_s != NULL,
                          .colour = {(float)a->colour[0], (float)a->colour[1], (float)a->colour[2]},
                          .colour_from = a->has_colour_from ? (int)a->colour_from : -1},
                 .maps_config = grid}};
  pipeline_hooks hooks = {
      .progress = cli_on_pipeline_progress, .progress_user = &pr, .threads = (int)a->threads};
  pipeline_result res = {0};
  int status = 0;
  if (run_and_write(a, m, &r, &hooks, &res, e))
    status = cli_fail("edit", "%s: %s", a->noise, e->msg);
  else if (!a->quiet)
    fprintf(stderr, "denoised edit: %d image(s), %d NFE per image\n", s->batch, res.nfe);
  pipeline_result_clear(&res);
  return status;
}

static int edit_noise(const edit_args *a, model *m, err *e) {
  npy_array maps = {0};
  noise_side side = {0};
  int64_t *src = NULL, *tgt = NULL;
  int status = noise_load(a, &maps, &side, e);
  if (!status)
    status = noise_check(a, model_get_info(m), &maps, &side, e);
  if (!status)
    status = noise_labels(a, m, &side, &src, &tgt);
  if (!status)
    status = noise_run(a, m, &maps, &side, src, tgt, e);
  npy_array_free(&maps);
  free(src);
  free(tgt);
  json_decref(side.json);
  return status;
}

static int edit_with_boundary(const edit_args *a, model *m, err *e) {
  const char *cmd = "edit";
  const model_info *mi = model_get_info(m);
  const int f = mi->latent_factor, text = f > 1, cin = mi->in_channels;
  boundary b = {0};
  pipeline_result res = {0};
  float *img = NULL;
  int64_t *labels = NULL;
  int status = 1, batch = (int)a->batch;
  if (boundary_load(a->boundary, &b, e)) {
    cli_fail(cmd, "%s", e->msg);
    goto done;
  }
  /* a text model's boundary says its latents' size (the pictures' is f times it) */
  const int lh = text ? b.h : mi->sample_size, lw = text ? b.w : mi->sample_size;
  if (b.dim != cin * lh * lw) {
    cli_fail(cmd, "%s: a boundary for latents of %d values; this model's have %d", a->boundary,
             b.dim, cin * lh * lw);
    goto done;
  }
  if (!!text != !!a->prompt || (!text && a->negative_prompt)) {
    status = cli_usage_error(cmd, text ? "this is a text-to-image model: give --prompt (the "
                                         "boundary fit's)"
                                       : "this model takes no prompt");
    goto done;
  }
  if (a->image && cli_read_images("--image", a->image, text ? mi->image_channels : cin, lh * f,
                                  lw * f, EDIT_MAX_BATCH, &batch, &img, e)) {
    cli_fail(cmd, "%s", e->msg);
    goto done;
  }
  if (mi->num_classes && !a->classes) {
    status = cli_usage_error(cmd, "this model is class-conditional: pass --class");
    goto done;
  }
  if (!mi->num_classes && (a->classes || (a->has_guidance && !text))) {
    status = cli_usage_error(cmd, "this model is not class-conditional: drop --class and "
                                  "--guidance-scale");
    goto done;
  }
  if (a->classes) {
    labels = malloc(sizeof *labels * (size_t)batch);
    if (!labels || cli_parse_labels("--class", a->classes, batch, m, labels)) {
      status = 2;
      goto done;
    }
  }
  cli_progress pr;
  cli_progress_init(&pr, a->quiet);
  guidance g = guidance_for(m, a->guidance);
  edit_space space;
  edit_space_parse(a->space, &b, &space); /* the name was checked with the options */
  pipeline_request r = {
      .kind = PIPELINE_BOUNDARY,
      .batch = batch,
      .height = text ? lh * f : 0,
      .width = text ? lw * f : 0,
      .prompt = a->prompt,
      .negative_prompt = a->negative_prompt,
      .seed = (uint64_t)a->seed,
      .first_image = a->only >= 0 && batch == 1 ? (uint64_t)a->only : 0,
      .labels = labels,
      .guidance = a->has_guidance ? &g : NULL,
      .image = img,
      .images = img ? batch : 0,
      .bound = {.boundary = &b, .strength = a->strength, .space = space, .eta = a->eta}};
  pipeline_hooks hooks = {
      .progress = cli_on_pipeline_progress, .progress_user = &pr, .threads = (int)a->threads};
  if (run_and_write(a, m, &r, &hooks, &res, e)) {
    cli_fail(cmd, "%s: %s", a->boundary, e->msg);
    goto done;
  }
  const int nfe = res.nfe;
  if (!a->quiet)
    fprintf(stderr,
            "denoised edit: %d image(s) moved to %g spreads (%s) at step %d, %d NFE per image\n",
            batch, a->strength, edit_space_name(space), b.step, nfe);
  status = 0;
done:
  boundary_free(&b);
  pipeline_result_clear(&res);
  free(img);
  free(labels);
  return status;
}

int cmd_edit(int argc, char **argv) {
  edit_args a = {.threads = 2, .eta = 1.0, .only = -1};
  int prc = parse_args(argc, argv, &a);
  if (prc) {
    json_decref(a.meta);
    return prc < 0 ? 0 : prc;
  }
  err e = {0};
  model *m = NULL;
  if (model_load(a.model_dir, &m, &e)) {
    json_decref(a.meta);
    return cli_fail("edit", "%s", e.msg);
  }
  int status = a.noise ? edit_noise(&a, m, &e) : edit_with_boundary(&a, m, &e);
  model_free(m);
  json_decref(a.meta);
  return status;
}
