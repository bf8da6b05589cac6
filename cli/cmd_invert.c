/* `denoised invert`: images into a model's noise space, as .npy plus a JSON sidecar saying how
 * (method, grid, classes, guidance, seed) so that `denoised edit` and `denoised sample --noise`
 * can take them back: DDIM inversion (x_T) or edit-friendly DDPM noise maps (x_T and one map
 * per step). */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "image.h"
#include "invert.h"
#include "latent.h"
#include "npy.h"

#define INVERT_MAX_BATCH 4096

static const char help[] =
    "usage: denoised invert [--model DIR] --method ddim|ddpm --image IN.png --out NOISE.npy\n"
    "                       [--class C[,C...]] [--guidance-scale G] [--steps N]\n"
    "                       [--scheduler-config F.json] [--scheduler-opt KEY=VALUE ...]\n"
    "                       [--seed S] [--verify] [--threads T] [--quiet]\n"
    "       denoised invert --model PIPELINE --prompt SOURCE [--negative-prompt N]\n"
    "                       [--clip-skip K] [--size S|WxH] --method ddim|ddpm --image IN.png\n"
    "                       --out NOISE.npy [--guidance-scale G] ...\n"
    "\n"
    "Inverts images into the model's noise space.\n"
    "  --method ddim      deterministic DDIM inversion: NOISE.npy is x_T [B, C, H, W];\n"
    "                     'denoised sample --noise NOISE.npy --scheduler ddim --steps N\n"
    "                     --scheduler-opt clip_sample=false' (same class) brings the images\n"
    "                     back up to the inversion error (inversion never clips)\n"
    "  --method ddpm      edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023):\n"
    "                     NOISE.npy is [B, N + 1, C, H, W], x_T then one noise map per step;\n"
    "                     DDPM sampling with them reproduces the images exactly, and\n"
    "                     'denoised edit --noise NOISE.npy' edits them\n"
    "  --image IN         a PNG of the model's size, or .npy [C, H, W] / [B, C, H, W] in [-1, 1]\n"
    "  --out NOISE.npy    the result; NOISE.json beside it records how it was made\n"
    "  --class C[,C...]   the images' classes (class-conditional models): one, or one each\n"
    "  --guidance-scale G guidance of the inversion's model calls (the source prompt's cfg;\n"
    "                     text-to-image models: default 3.5, the edit-friendly paper's)\n"
    "  --prompt SOURCE    text-to-image models (a Stable-Diffusion pipeline folder): the prompt\n"
    "                     that describes IN; IN is VAE-encoded (the posterior mean) and the\n"
    "                     latents are inverted, so NOISE.npy holds latents\n"
    "  --negative-prompt N, --clip-skip K   as for sample\n"
    "  --size S|WxH       text-to-image models: the picture's size (default the model's)\n"
    "  --steps N          DDIM grid steps (default 50 for ddim, 100 for ddpm)\n"
    "  --scheduler-config, --scheduler-opt   keys of the DDIM grid (as for sample)\n"
    "  --seed S           ddpm: the noise of the independent x_t draws (default 0)\n"
    "  --verify           sample back and print the reconstruction error\n"
    "  --threads T        CPU threads (default 2)\n";

typedef struct invert_args {
  const char *model_dir, *method, *image, *out, *sched_file, *classes;
  const char *prompt, *negative_prompt;
  long long clip_skip, width, height;
  const char *overrides[CLI_MAX_OVERRIDES];
  int noverrides, verify, quiet, has_guidance;
  long long steps, seed, threads;
  double guidance;
} invert_args;

static int parse_args(int argc, char **argv, invert_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"method", required_argument, 0, 'M'},
                                       {"image", required_argument, 0, 'i'},
                                       {"out", required_argument, 0, 'u'},
                                       {"class", required_argument, 0, 'l'},
                                       {"guidance-scale", required_argument, 0, 'g'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"scheduler-config", required_argument, 0, 'c'},
                                       {"scheduler-opt", required_argument, 0, 'O'},
                                       {"seed", required_argument, 0, 'S'},
                                       {"verify", no_argument, 0, 'V'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"prompt", required_argument, 0, 'P'},
                                       {"negative-prompt", required_argument, 0, 'X'},
                                       {"clip-skip", required_argument, 0, 'K'},
                                       {"size", required_argument, 0, 'z'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "invert";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:M:i:u:l:g:n:c:O:S:Vj:qhP:X:K:z:", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'M': a->method = optarg; break;
    case 'i': a->image = optarg; break;
    case 'u': a->out = optarg; break;
    case 'l': a->classes = optarg; break;
    case 'g':
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
      break;
    case 'n':
      if (cli_parse_int("--steps", optarg, 1, 100000, &a->steps))
        return 2;
      break;
    case 'c': a->sched_file = optarg; break;
    case 'O':
      if (a->noverrides == CLI_MAX_OVERRIDES)
        return cli_usage_error(cmd, "at most %d --scheduler-opt", CLI_MAX_OVERRIDES);
      a->overrides[a->noverrides++] = optarg;
      break;
    case 'S':
      if (cli_parse_int("--seed", optarg, 0, (1ll << 53) - 1, &a->seed))
        return 2;
      break;
    case 'V': a->verify = 1; break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'q': a->quiet = 1; break;
    case 'P': a->prompt = optarg; break;
    case 'X': a->negative_prompt = optarg; break;
    case 'K':
      if (cli_parse_int("--clip-skip", optarg, 1, 12, &a->clip_skip))
        return 2;
      break;
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
  if (!a->image || !a->out || !a->method)
    return cli_usage_error(cmd, "--method, --image and --out are required");
  if (strcmp(a->method, "ddim") != 0 && strcmp(a->method, "ddpm") != 0)
    return cli_usage_error(cmd, "--method must be ddim or ddpm, not '%s'", a->method);
  size_t n = strlen(a->out);
  if (n < 5 || strcmp(a->out + n - 4, ".npy") != 0)
    return cli_usage_error(cmd, "--out must name a .npy file");
  return 0;
}

/* OUT.npy -> OUT.json */
static char *sidecar_path(const char *npy) {
  size_t n = strlen(npy);
  char *p = malloc(n + 2);
  if (p)
    snprintf(p, n + 2, "%.*s.json", (int)(n - 4), npy);
  return p;
}

/* NOISE.json: how the noise was made, for `denoised edit --noise` and `sample --noise`. */
static int write_sidecar(const invert_args *a, const pipeline_request *r, const sampler *s,
                         err *e) {
  json_t *jl = json_null();
  if (r->labels) {
    jl = json_array();
    for (int b = 0; b < r->batch; b++)
      json_array_append_new(jl, json_integer(r->labels[b]));
  }
  json_t *side = json_pack(
      "{s:s, s:i, s:s, s:s, s:{s:s, s:i, s:o}, s:o, s:o, s:I, s:i}", "format", "denoised-noise",
      "version", 1, "method", a->method, "model", a->model_dir, "solver", "name", "ddim", "steps",
      sampler_num_steps(s), "config", sampler_config_json(s), "class_labels", jl, "guidance_scale",
      r->invert.source_guidance ? json_real(r->invert.source_guidance->scale) : json_null(), "seed",
      (json_int_t)a->seed, "batch", r->batch);
  if (side && a->prompt) /* text models: the source prompt and the picture's size */
    json_object_update_new(side, json_pack("{s:s, s:s?, s:i, s:i, s:i}", "prompt", a->prompt,
                                           "negative_prompt", a->negative_prompt, "clip_skip",
                                           r->clip_skip ? r->clip_skip : 1, "height", r->height,
                                           "width", r->width));
  char *path = sidecar_path(a->out);
  int rc = ERR_OK;
  if (!side || !path ||
      json_dump_file(side, path, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17)))
    rc = err_set(e, ERR_IO, "cannot write %s", path ? path : "the sidecar");
  free(path);
  json_decref(side);
  return rc;
}

/* Samples the noise back (the inversion's own grid, classes and guidance) and prints how far
 * the result is from the input. */
/* The error of pictures a against b (n values): max abs and relative L2 */
static void picture_error(const float *a, const float *b, size_t n, double *mx, double *rel) {
  double num = 0, den = 0;
  *mx = 0;
  for (size_t i = 0; i < n; i++) {
    const double df = (double)a[i] - b[i];
    *mx = isnan(df) || fabs(df) > *mx ? fabs(df) : *mx;
    num += df * df;
    den += (double)b[i] * b[i];
  }
  *rel = den > 0 ? sqrt(num / den) : sqrt(num);
}

/* A latent model's pictures as its VAE gives them back (decode of the posterior mean): what an
 * exact inversion of the latents reconstructs. */
static int vae_round_trip(const model *m, const float *x0, int batch, int h, int w, float **out,
                          err *e) {
  const latent_parts *lp = model_latent(m);
  const latent_info *li = latent_get_info(lp);
  const int f = li->factor;
  float *z = malloc(sizeof *z * (size_t)batch * li->latent_channels * (h / f) * (w / f));
  *out = malloc(sizeof **out * (size_t)batch * li->image_channels * h * w);
  int rc = !z || !*out ? err_set(e, ERR_NOMEM, "out of memory") : ERR_OK;
  if (!rc)
    rc = latent_encode(lp, x0, batch, h / f, w / f, NULL, z, 2, e);
  if (!rc)
    rc = latent_decode(lp, z, batch, h / f, w / f, *out, 2, e);
  free(z);
  return rc;
}

/* Samples the noise back (the inversion's own grid, prompt or classes and guidance) and prints
 * how far the result is from the input (a latent model's: from the VAE's round trip of it,
 * which exact inversion gives back, and the VAE's own error beside). */
static int verify(const invert_args *a, const model *m, const pipeline_request *r,
                  const pipeline_result *inv, const float *x0, err *e) {
  npy_array noise = {0};
  pipeline_result back = {0};
  pipeline_request rb = *r;
  rb.invert.invert_only = 0;
  rb.guidance = r->invert.source_guidance;
  float *trip = NULL;
  int rc = npy_parse_f32(inv->noise, inv->noise_len, a->out, &noise, e);
  if (rc == ERR_OK) {
    rb.noise = noise.data;
    rc = pipeline_run(m, &rb, NULL, &back, e);
  }
  if (rc == ERR_OK && model_latent(m))
    rc = vae_round_trip(m, x0, r->batch, back.height, back.width, &trip, e);
  if (rc == ERR_OK) {
    const size_t d = (size_t)model_get_info(m)->image_channels * back.height * back.width;
    double mx, rel, vmx, vrel;
    picture_error(back.images, trip ? trip : x0, d * (size_t)r->batch, &mx, &rel);
    printf("reconstruction: max abs error %.3g, rel L2 %.3g (%s, %d steps%s)\n", mx, rel, a->method,
           sampler_num_steps(back.sampler),
           trip ? ", against the VAE's round trip of the input" : "");
    if (trip) {
      picture_error(trip, x0, d * (size_t)r->batch, &vmx, &vrel);
      printf("the VAE's round trip itself: max abs error %.3g, rel L2 %.3g\n", vmx, vrel);
    }
  }
  free(trip);
  npy_array_free(&noise);
  pipeline_result_clear(&back);
  return rc;
}

/* The flags against the model: a prompt for a text-to-image model (whose guidance defaults to
 * the edit-friendly paper's cfg_src), classes for a class-conditional one. Returns 0 to go on,
 * else the exit status. */
static int check_model_flags(invert_args *a, const model_info *mi) {
  const char *cmd = "invert";
  const int text = mi->latent_factor > 1;
  if (text && !a->prompt)
    return cli_usage_error(cmd, "this is a text-to-image model: give --prompt (the source "
                                "prompt, what the picture shows)");
  if (!text && (a->prompt || a->negative_prompt || a->clip_skip || a->height))
    return cli_usage_error(cmd, "this model takes no prompt: drop --prompt, --negative-prompt, "
                                "--clip-skip and --size");
  if (mi->num_classes && !a->classes)
    return cli_usage_error(cmd, "this model is class-conditional (%d classes): pass --class",
                           mi->num_classes);
  if (!mi->num_classes && (a->classes || (a->has_guidance && !text)))
    return cli_usage_error(cmd, "this model is not class-conditional: drop --class and "
                                "--guidance-scale");
  if (text && !a->has_guidance) {
    a->guidance = 3.5;
    a->has_guidance = 1;
    if (!a->quiet)
      fprintf(stderr, "denoised invert: guidance scale 3.5 (the edit-friendly paper's for the "
                      "source prompt; --guidance-scale overrides it)\n");
  }
  return 0;
}

int cmd_invert(int argc, char **argv) {
  const char *cmd = "invert";
  invert_args a = {.threads = 2};
  int prc = parse_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  const int ddpm = strcmp(a.method, "ddpm") == 0;
  err e = {0};
  model *m = NULL;
  float *x0 = NULL;
  int64_t *labels = NULL;
  cli_solver solver = {0};
  pipeline_result res = {0};
  int status = 1, batch = 0;
  if (model_load(a.model_dir, &m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  const int text = mi->latent_factor > 1, side = mi->sample_size * mi->latent_factor;
  const int height = a.height ? (int)a.height : side, width = a.height ? (int)a.width : side;
  if ((status = check_model_flags(&a, mi)) != 0)
    goto done;
  status = 1;
  if (cli_read_images("--image", a.image, mi->image_channels, height, width, INVERT_MAX_BATCH,
                      &batch, &x0, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (a.classes) {
    labels = malloc(sizeof *labels * (size_t)batch);
    if (!labels || cli_parse_labels("--class", a.classes, batch, m, labels)) {
      status = 2;
      goto done;
    }
  }
  /* the pipeline's inversion grid: DDIM, never clipping (see pipeline.h) */
  if (cli_solver_from_flags("ddim", a.steps, a.sched_file, a.overrides, a.noverrides, &solver,
                            &e) ||
      cli_solver_check(m, &solver, a.sched_file, &e)) {
    status = e.code == ERR_NOMEM || e.code == ERR_IO ? cli_fail(cmd, "%s", e.msg)
                                                     : cli_usage_error(cmd, "%s", e.msg);
    goto done;
  }
  guidance g = guidance_for(m, a.guidance);
  pipeline_request r = {
      .kind = ddpm ? PIPELINE_INVERT_DDPM : PIPELINE_INVERT_DDIM,
      .solver = solver.s,
      .batch = batch,
      .height = text ? height : 0,
      .width = text ? width : 0,
      .seed = (uint64_t)a.seed,
      .labels = labels,
      .prompt = a.prompt,
      .negative_prompt = a.negative_prompt,
      .clip_skip = (int)a.clip_skip,
      .image = x0,
      .images = batch,
      .invert = {.source_guidance = a.has_guidance ? &g : NULL, .invert_only = 1}};
  cli_progress pr;
  cli_progress_init(&pr, a.quiet);
  pipeline_hooks hooks = {
      .progress = cli_on_pipeline_progress, .progress_user = &pr, .threads = (int)a.threads};
  if (pipeline_run(m, &r, &hooks, &res, &e) ||
      image_file_write(a.out, res.noise, res.noise_len, &e) ||
      write_sidecar(&a, &r, res.sampler, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (!a.quiet)
    fprintf(stderr, "denoised invert: %d image(s), %s, %d steps, %d NFE per image -> %s\n", batch,
            a.method, sampler_num_steps(res.sampler), res.nfe, a.out);
  if (a.verify && verify(&a, m, &r, &res, x0, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  status = 0;
done:
  free(x0);
  free(labels);
  cli_solver_clear(&solver);
  pipeline_result_clear(&res);
  model_free(m);
  return status;
}
