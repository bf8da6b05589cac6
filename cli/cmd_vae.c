/* `denoised vae encode|decode`: an AutoencoderKL on .npy arrays, raw (no scaling factor), the
 * tool behind the VAE's parity checks against diffusers and a way to look at latents. With
 * --grad-output it also runs the backward (vae_encode_backward / vae_decode_backward) and writes
 * the gradients of sum(G * output) asked for, as `denoised forward` does for UNets. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "npy.h"
#include "ops.h"
#include "safetensors.h"
#include "vae.h"

static const char help[] =
    "usage: denoised vae encode --model DIR --input X.npy --out MEAN.npy [--std STD.npy]\n"
    "                           [--sample Z.npy --seed S] [--tile N|auto|off] [GRADIENTS]\n"
    "                           [--threads N]\n"
    "       denoised vae decode --model DIR --input Z.npy --out X.npy [--tile N|auto|off]\n"
    "                           [GRADIENTS] [--threads N]\n"
    "       denoised vae info --model DIR\n"
    "\n"
    "Runs a diffusers AutoencoderKL (Stable Diffusion's VAE) on raw arrays: no scaling factor\n"
    "is applied (a diffusion model's latents are (z - shift_factor) * scaling_factor; 'vae info'\n"
    "prints both).\n"
    "  --model DIR      a VAE folder (config.json + diffusion_pytorch_model.safetensors) or a\n"
    "                   pipeline folder (model_index.json + vae/)\n"
    "  --input X.npy    encode: images [N, C, H, W] (H, W multiples of the VAE's factor, 8 for\n"
    "                   Stable Diffusion), values in [-1, 1]; decode: latents [N, 4, h, w]\n"
    "  --out OUT.npy    encode: the posterior mean [N, 4, H/8, W/8]; decode: images\n"
    "                   [N, C, 8h, 8w], float32, not clamped\n"
    "  --std STD.npy    encode: the posterior's standard deviation, exp(logvar / 2)\n"
    "  --sample Z.npy   encode: a posterior sample mean + std * noise, the noise drawn from\n"
    "  --seed S         the engine's generator (the same for a seed on any machine)\n"
    "  --tile N         tiles of N latent pixels (a multiple of 4; encode: N*factor pixels),\n"
    "                   overlapping by a quarter tile and blended as diffusers' tiled_decode /\n"
    "                   tiled_encode; 'off' runs whole; 'auto' (default) tiles only when a\n"
    "                   whole pass would need more than 2 GiB of working memory, with the\n"
    "                   VAE's own tile (sample_size/8)\n"
    "  --threads N      CPU threads (default 2)\n"
    "GRADIENTS: --grad-output G.npy [--grad-input GX.npy] [--grad-params GP.safetensors]\n"
    "  the gradients of L = sum(G * output) (the backward runs the whole batch at once, untiled):\n"
    "  decode: G shaped like the images; encode: G [N, 2*latent, h, w] weights the posterior's\n"
    "  mean (first half of the channels) and log-variance (second half, clamped to [-30, 20] as\n"
    "  diffusers' posterior.logvar), or G [N, latent, h, w] the mean alone\n"
    "  --grad-input GX.npy   dL/d(--input), float32\n"
    "  --grad-params GP.safetensors  dL/d(every parameter), diffusers' names, F32\n"
    "  With --grad-output, --out is optional; at least one output must be asked for.\n";

typedef struct vae_args {
  const char *op, *model_dir, *in_path, *out_path, *std_path, *sample_path;
  const char *g_path, *gx_path, *gp_path;
  long long threads, seed, tile;
  int has_seed;
} vae_args;

static const struct option vae_opts[] = {{"model", required_argument, 0, 'm'},
                                         {"input", required_argument, 0, 'i'},
                                         {"out", required_argument, 0, 'o'},
                                         {"std", required_argument, 0, 'S'},
                                         {"sample", required_argument, 0, 'z'},
                                         {"seed", required_argument, 0, 's'},
                                         {"tile", required_argument, 0, 'T'},
                                         {"threads", required_argument, 0, 'j'},
                                         {"grad-output", required_argument, 0, 'G'},
                                         {"grad-input", required_argument, 0, 'X'},
                                         {"grad-params", required_argument, 0, 'P'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};

static int parse_tile(const char *s, long long *out) {
  if (strcmp(s, "auto") == 0)
    *out = VAE_TILE_AUTO;
  else if (strcmp(s, "off") == 0)
    *out = VAE_TILE_OFF;
  else if (cli_parse_int("--tile", s, 4, 4096, out))
    return -1;
  else if (*out % 4)
    return cli_usage_error("vae", "--tile %lld is not a multiple of 4", *out), -1;
  return 0;
}

/* The operation's own rules: which flags go with which operation. */
static int check_args(const vae_args *a) {
  const char *cmd = "vae";
  int enc = strcmp(a->op, "encode") == 0, dec = strcmp(a->op, "decode") == 0;
  if (!enc && !dec && strcmp(a->op, "info") != 0)
    return cli_usage_error(cmd, "unknown operation '%s' (encode, decode or info)", a->op);
  if (!a->model_dir)
    return cli_usage_error(cmd, "--model is required");
  if ((enc || dec) && !a->in_path)
    return cli_usage_error(cmd, "%s needs --input", a->op);
  if ((a->gx_path || a->gp_path) && !a->g_path)
    return cli_usage_error(cmd, "--grad-input and --grad-params need --grad-output");
  if ((enc || dec) && !a->g_path && !a->out_path)
    return cli_usage_error(cmd,
                           "%s needs --out (or --grad-output with --grad-input or "
                           "--grad-params)",
                           a->op);
  if (a->g_path && !enc && !dec)
    return cli_usage_error(cmd, "--grad-output is an option of 'vae encode' and 'vae decode'");
  if (a->g_path && !a->out_path && !a->gx_path && !a->gp_path && !a->std_path && !a->sample_path)
    return cli_usage_error(cmd, "nothing to write: give --out, --grad-input or --grad-params");
  if (!enc && (a->std_path || a->sample_path || a->has_seed))
    return cli_usage_error(cmd, "--std, --sample and --seed are options of 'vae encode'");
  if (!dec && !enc && a->tile != VAE_TILE_AUTO)
    return cli_usage_error(cmd, "--tile is an option of 'vae encode' and 'vae decode'");
  if (a->g_path && a->tile != VAE_TILE_AUTO)
    return cli_usage_error(cmd, "--tile and --grad-output: the backward runs whole");
  if (!a->sample_path != !a->has_seed)
    return cli_usage_error(cmd, "--sample and --seed go together");
  return -1;
}

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, vae_args *a) {
  const char *cmd = "vae";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:i:o:S:z:s:T:j:G:X:P:h", vae_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'i': a->in_path = optarg; break;
    case 'o': a->out_path = optarg; break;
    case 'S': a->std_path = optarg; break;
    case 'z': a->sample_path = optarg; break;
    case 'G': a->g_path = optarg; break;
    case 'X': a->gx_path = optarg; break;
    case 'P': a->gp_path = optarg; break;
    case 's':
      if (cli_parse_int("--seed", optarg, 0, INT64_MAX, &a->seed))
        return 2;
      a->has_seed = 1;
      break;
    case 'T':
      if (parse_tile(optarg, &a->tile))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind >= argc)
    return cli_usage_error(cmd, "which operation: encode, decode or info?");
  a->op = argv[optind++];
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  return check_args(a);
}

/* The input array as [N, C, H, W] with C = channels; 0, or 1 with the error printed. */
static int read_input(const char *path, int channels, const char *what, npy_array *x) {
  err e = {0};
  if (npy_read_f32(path, x, &e))
    return cli_fail("vae", "%s", e.msg);
  if (x->ndim != 4 || x->shape[0] < 1 || x->shape[2] < 1 || x->shape[3] < 1)
    return cli_fail("vae", "%s: expected %s [N, %d, H, W], got %d dimensions", path, what, channels,
                    x->ndim);
  if (x->shape[1] != channels)
    return cli_fail("vae", "%s: %lld channels, but this VAE's %s have %d", path,
                    (long long)x->shape[1], what, channels);
  if (x->shape[0] > 4096 || x->shape[2] > 65536 || x->shape[3] > 65536)
    return cli_fail("vae", "%s: shape too large", path);
  return 0;
}

int cli_vae_write(const char *path, const vae *v, float *const *data, err *e) {
  const int n = vae_param_count(v);
  st_out_tensor *t = calloc((size_t)n, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    const model_param *mp = vae_param_at(v, i);
    t[i] = (st_out_tensor){mp->name, mp->ndim, mp->shape, data ? data[i] : mp->data};
  }
  const char *meta[] = {"format", "pt"};
  int rc = st_write_f32(path, t, n, meta, 1, e);
  free(t);
  return rc;
}

/* Zeroed gradient buffers for every parameter of v, or NULL (e set); free with free_params. */
static float **new_params(const vae *v, err *e) {
  const int n = vae_param_count(v);
  float **pg = calloc((size_t)n, sizeof *pg);
  for (int i = 0; pg && i < n; i++)
    if (!(pg[i] = calloc(vae_param_at(v, i)->count, sizeof(float)))) {
      for (int k = 0; k < i; k++)
        free(pg[k]);
      free(pg);
      pg = NULL;
    }
  if (!pg)
    err_set(e, ERR_NOMEM, "out of memory for the parameter gradients");
  return pg;
}

static void free_params(const vae *v, float **pg) {
  for (int i = 0; pg && i < vae_param_count(v); i++)
    free(pg[i]);
  free(pg);
}

/* --grad-output: G shaped like `shape` (or, encoding, like the mean alone: zeros for the
 * log-variance), the backward, and the gradients asked for. out gets the forward's output. */
static int run_backward(const vae_args *a, const vae *v, const npy_array *x, int encoder,
                        const int64_t *shape, float *out, err *e) {
  npy_array g = {0};
  const int n = (int)x->shape[0], h = (int)x->shape[2], w = (int)x->shape[3];
  const size_t per = (size_t)(shape[1] * shape[2] * shape[3]);
  int rc = npy_read_f32(a->g_path, &g, e);
  if (rc)
    return err_prefix(e, "--grad-output");
  const int mean_only = encoder && g.ndim == 4 && g.shape[1] == shape[1] / 2;
  if (g.ndim != 4 || g.shape[0] != shape[0] || (g.shape[1] != shape[1] && !mean_only) ||
      g.shape[2] != shape[2] || g.shape[3] != shape[3])
    rc = err_set(e, ERR_SHAPE, "--grad-output %s: expected [%lld, %lld, %lld, %lld]%s", a->g_path,
                 (long long)shape[0], (long long)shape[1], (long long)shape[2], (long long)shape[3],
                 encoder ? " (mean and log-variance) or the mean's shape" : "");
  else if (!ops_all_finite(g.data, (size_t)g.count))
    rc = err_set(e, ERR_INVALID, "--grad-output %s holds NaN or infinite values", a->g_path);
  float *gfull = NULL, *gx = NULL, **pg = NULL;
  if (!rc && mean_only && !(gfull = calloc(per * n, sizeof(float))))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; !rc && mean_only && i < n; i++)
    memcpy(gfull + per * i, g.data + per / 2 * i, per / 2 * sizeof(float));
  const size_t in_count = (size_t)x->count;
  if (!rc && a->gx_path && !(gx = malloc(in_count * sizeof(float))))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc && a->gp_path && !(pg = new_params(v, e)))
    rc = ERR_NOMEM;
  vae_grad_call gc = {.grad_out = gfull ? gfull : g.data,
                      .out = out,
                      .grad_in = gx,
                      .params = pg,
                      .threads = (int)a->threads};
  if (!rc)
    rc = encoder ? vae_encode_backward(v, x->data, n, h, w, &gc, e)
                 : vae_decode_backward(v, x->data, n, h, w, &gc, e);
  if (!rc && gx)
    rc = npy_write_f32(a->gx_path, gx, 4, x->shape, e);
  if (!rc && pg)
    rc = cli_vae_write(a->gp_path, v, pg, e);
  free_params(v, pg);
  free(gx);
  free(gfull);
  npy_array_free(&g);
  return rc;
}

static int run_encode(const vae_args *a, const vae *v) {
  const vae_info *vi = vae_get_info(v);
  npy_array x = {0};
  if (read_input(a->in_path, vi->in_channels, "images", &x))
    return 1;
  const int n = (int)x.shape[0], h = (int)x.shape[2], w = (int)x.shape[3];
  const int64_t shape[4] = {n, vi->latent_channels, h / vi->factor, w / vi->factor};
  const int64_t mshape[4] = {n, 2 * shape[1], shape[2], shape[3]};
  const size_t per = (size_t)shape[1] * shape[2] * shape[3], count = per * n;
  float *mean = malloc(sizeof(float) * count), *std = malloc(sizeof(float) * count);
  float *mom = a->g_path ? malloc(sizeof(float) * 2 * count) : NULL;
  err e = {0};
  int rc = !mean || !std || (a->g_path && !mom) ? err_set(&e, ERR_NOMEM, "out of memory") : ERR_OK;
  if (!rc && a->g_path) {
    rc = run_backward(a, v, &x, 1, mshape, mom, &e);
    for (size_t i = 0; !rc && i < count; i++) { /* the moments' halves, as vae_encode gives them */
      const size_t img = i / per, k = i % per;
      mean[i] = mom[2 * per * img + k];
      std[i] = expf(0.5f * mom[2 * per * img + per + k]);
    }
  } else if (!rc) {
    rc = vae_encode_tiled(v, x.data, n, h, w, (int)a->tile, mean, std, (int)a->threads, &e);
  }
  (void)(rc || (a->out_path && (rc = npy_write_f32(a->out_path, mean, 4, shape, &e))) ||
         (a->std_path && (rc = npy_write_f32(a->std_path, std, 4, shape, &e))));
  if (!rc && a->sample_path) {
    vae_sample(mean, std, n, per, (uint64_t)a->seed, mean);
    rc = npy_write_f32(a->sample_path, mean, 4, shape, &e);
  }
  free(mom);
  free(mean);
  free(std);
  npy_array_free(&x);
  return rc ? cli_fail("vae", "%s", e.msg) : 0;
}

static int run_decode(const vae_args *a, const vae *v) {
  const vae_info *vi = vae_get_info(v);
  npy_array z = {0};
  if (read_input(a->in_path, vi->latent_channels, "latents", &z))
    return 1;
  const int n = (int)z.shape[0], h = (int)z.shape[2], w = (int)z.shape[3];
  const int64_t shape[4] = {n, vi->out_channels, (int64_t)h * vi->factor, (int64_t)w * vi->factor};
  err e = {0};
  float *out = malloc(sizeof(float) * (size_t)(shape[0] * shape[1] * shape[2] * shape[3]));
  int rc = !out ? err_set(&e, ERR_NOMEM, "out of memory for a %lldx%lld decode",
                          (long long)shape[2], (long long)shape[3])
                : ERR_OK;
  if (!rc)
    rc = a->g_path ? run_backward(a, v, &z, 0, shape, out, &e)
                   : vae_decode(v, z.data, n, h, w, (int)a->tile, out, (int)a->threads, &e);
  if (!rc && a->out_path)
    rc = npy_write_f32(a->out_path, out, 4, shape, &e);
  free(out);
  npy_array_free(&z);
  return rc ? cli_fail("vae", "%s", e.msg) : 0;
}

static int run_info(const vae *v) {
  const vae_info *vi = vae_get_info(v);
  printf("class AutoencoderKL\nin_channels %d\nout_channels %d\nlatent_channels %d\nfactor %d\n"
         "sample_size %d\ntile %d\nscaling_factor %.9g\nshift_factor %.9g\nparameters %lld\n",
         vi->in_channels, vi->out_channels, vi->latent_channels, vi->factor, vi->sample_size,
         vi->tile, vi->scaling_factor, vi->shift_factor, (long long)vi->num_params);
  return 0;
}

int cmd_vae(int argc, char **argv) {
  vae_args a = {.threads = 2, .tile = VAE_TILE_AUTO};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  vae *v = NULL;
  if (vae_load(a.model_dir, &v, &e))
    return cli_fail("vae", "%s", e.msg);
  if (strcmp(a.op, "encode") == 0)
    status = run_encode(&a, v);
  else if (strcmp(a.op, "decode") == 0)
    status = run_decode(&a, v);
  else
    status = run_info(v);
  vae_free(v);
  return status;
}
