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
#include "invert.h"
#include "npy.h"

#define INVERT_MAX_BATCH 4096

static const char help[] =
    "usage: denoised invert [--model DIR] --method ddim|ddpm --image IN.png --out NOISE.npy\n"
    "                       [--class C[,C...]] [--guidance-scale G] [--steps N]\n"
    "                       [--scheduler-config F.json] [--scheduler-opt KEY=VALUE ...]\n"
    "                       [--seed S] [--verify] [--threads T] [--quiet]\n"
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
    "  --guidance-scale G guidance of the inversion's model calls (the source prompt's cfg)\n"
    "  --steps N          DDIM grid steps (default 50 for ddim, 100 for ddpm)\n"
    "  --scheduler-config, --scheduler-opt   keys of the DDIM grid (as for sample)\n"
    "  --seed S           ddpm: the noise of the independent x_t draws (default 0)\n"
    "  --verify           sample back and print the reconstruction error\n"
    "  --threads T        CPU threads (default 2)\n";

typedef struct invert_args {
  const char *model_dir, *method, *image, *out, *sched_file, *classes;
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
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "invert";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:M:i:u:l:g:n:c:O:S:Vj:qh", opts, NULL)) != -1) {
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

int cmd_invert(int argc, char **argv) {
  const char *cmd = "invert";
  invert_args a = {.threads = 2};
  int prc = parse_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  const int ddpm = strcmp(a.method, "ddpm") == 0;
  err e = {0};
  model *m = NULL;
  sampler *s = NULL;
  float *x0 = NULL, *res = NULL, *back = NULL;
  int64_t *labels = NULL;
  json_t *side = NULL, *forced = NULL;
  char *side_path = NULL;
  int status = 1, batch = 0;
  if (model_load(a.model_dir, &m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  const int size = mi->sample_size, cin = mi->in_channels;
  if (cli_read_images("--image", a.image, cin, size, size, INVERT_MAX_BATCH, &batch, &x0, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (mi->num_classes && !a.classes) {
    status = cli_usage_error(cmd, "this model is class-conditional (%d classes): pass --class",
                             mi->num_classes);
    goto done;
  }
  if (!mi->num_classes && (a.classes || a.has_guidance)) {
    status = cli_usage_error(cmd, "this model is not class-conditional: drop --class and "
                                  "--guidance-scale");
    goto done;
  }
  if (a.classes) {
    labels = malloc(sizeof *labels * (size_t)batch);
    if (!labels || cli_parse_labels("--class", a.classes, batch, m, labels)) {
      status = 2;
      goto done;
    }
  }
  /* no clipping: a clipped step cannot be run backwards, nor a noiseless last one steered */
  forced = ddpm ? json_pack("{s:f, s:b, s:b, s:b}", "eta", 1.0, "set_alpha_to_one", 0,
                            "clip_sample", 0, "thresholding", 0)
                : json_pack("{s:b, s:b}", "clip_sample", 0, "thresholding", 0);
  if (cli_build_sampler(m, "ddim", a.steps ? a.steps : (ddpm ? 100 : 50), a.sched_file, a.overrides,
                        a.noverrides, forced, &s, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const int n = sampler_num_steps(s);
  const size_t d = (size_t)cin * size * size, per = ddpm ? (size_t)(n + 1) * d : d;
  res = malloc(sizeof(float) * per * (size_t)batch);
  if (!res) {
    cli_fail(cmd, "out of memory");
    goto done;
  }
  cli_progress pr;
  cli_progress_init(&pr, a.quiet);
  guidance g = guidance_for(m, a.guidance);
  invert_opts io = {.batch = batch,
                    .labels = labels,
                    .guidance = a.has_guidance ? &g : NULL,
                    .seed = (uint64_t)a.seed,
                    .progress = cli_on_progress,
                    .progress_user = &pr,
                    .threads = (int)a.threads};
  int nfe = 0;
  if ((ddpm ? invert_ddpm(s, m, &io, x0, res, &nfe, &e)
            : invert_ddim(s, m, &io, x0, 0, res, &nfe, &e)) != ERR_OK) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const int64_t shape5[5] = {batch, n + 1, cin, size, size}, shape4[4] = {batch, cin, size, size};
  if (npy_write_f32(a.out, res, ddpm ? 5 : 4, ddpm ? shape5 : shape4, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  json_t *jl = json_null();
  if (labels) {
    jl = json_array();
    for (int b = 0; b < batch; b++)
      json_array_append_new(jl, json_integer(labels[b]));
  }
  json_t *cfg = sampler_config_json(s);
  side = json_pack("{s:s, s:i, s:s, s:s, s:{s:s, s:i, s:o}, s:o, s:o, s:I, s:i}", "format",
                   "denoised-noise", "version", 1, "method", a.method, "model", a.model_dir,
                   "solver", "name", "ddim", "steps", n, "config", cfg, "class_labels", jl,
                   "guidance_scale", a.has_guidance ? json_real(a.guidance) : json_null(), "seed",
                   (json_int_t)a.seed, "batch", batch);
  side_path = sidecar_path(a.out);
  if (!side || !side_path ||
      json_dump_file(side, side_path, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17))) {
    cli_fail(cmd, "cannot write %s", side_path ? side_path : "the sidecar");
    goto done;
  }
  if (!a.quiet)
    fprintf(stderr, "denoised invert: %d image(s), %s, %d steps, %d NFE per image -> %s\n", batch,
            a.method, n, nfe, a.out);
  if (a.verify) {
    back = malloc(sizeof(float) * d * (size_t)batch);
    int rc;
    if (!back) {
      cli_fail(cmd, "out of memory");
      goto done;
    }
    if (ddpm) {
      rc = invert_ddpm_sample(s, m, &io, NULL, res, back, &nfe, &e);
    } else {
      sampler_run_opts r = {.batch = batch,
                            .init_noise = res,
                            .labels = labels,
                            .guidance = io.guidance,
                            .threads = (int)a.threads};
      rc = sampler_run(s, m, &r, back, &nfe, &e);
    }
    if (rc) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
    double mx = 0, num = 0, den = 0;
    for (size_t i = 0; i < d * (size_t)batch; i++) {
      const double df = (double)back[i] - x0[i];
      mx = fmax(mx, fabs(df));
      num += df * df;
      den += (double)x0[i] * x0[i];
    }
    printf("reconstruction: max abs error %.3g, rel L2 %.3g (%s, %d steps)\n", mx,
           den > 0 ? sqrt(num / den) : sqrt(num), a.method, n);
  }
  status = 0;
done:
  free(x0);
  free(res);
  free(back);
  free(labels);
  free(side_path);
  json_decref(side);
  json_decref(forced);
  sampler_free(s);
  model_free(m);
  return status;
}
