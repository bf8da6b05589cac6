/* `denoised forward`: one network evaluation on .npy inputs (a text-conditional UNet's with the
 * encoder hidden states), writing the raw model output; the tool behind the parity tests
 * against diffusers. With --grad-output it also
 * runs the backward (model_backward) and writes the gradients of sum(G * output) asked for. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "model.h"
#include "npy.h"
#include "safetensors.h"

static const char help[] =
    "usage: denoised forward --model DIR --input X.npy --timesteps T.npy\n"
    "                        [--class-labels L.npy] [--encoder-hidden-states E.npy]\n"
    "                        [--out OUT.npy] [--threads N]\n"
    "                        [--precision fp32|bf16]\n"
    "                        [--grad-output G.npy [--grad-input GX.npy]\n"
    "                         [--grad-params GP.safetensors]\n"
    "                         [--grad-encoder-hidden-states GE.npy]]\n"
    "\n"
    "Runs one network evaluation and writes the raw model output.\n"
    "  --model DIR          diffusers model folder (flat or pipeline layout)\n"
    "  --input X.npy        float array [N, C, H, W]\n"
    "  --timesteps T.npy    N timesteps (or one, used for every image); may be fractional\n"
    "  --class-labels L.npy N integer class labels (class-conditional models)\n"
    "  --encoder-hidden-states E.npy  float array [N, S, D] (or [1, S, D] for every image):\n"
    "                       a text encoder's hidden states, required by a text-conditional\n"
    "                       UNet (UNet2DConditionModel, D its cross_attention_dim)\n"
    "  --out OUT.npy        output [N, out_channels, H, W] float32\n"
    "  --threads N          CPU threads (default 2)\n"
    "  --precision P        fp32 (default, exact) or bf16 (AVX512-BF16 CPUs: the convolutions\n"
    "                       multiply in bfloat16 with float32 sums)\n"
    "  --grad-output G.npy  G, shaped like the output: gradients of sum(G * output)\n"
    "  --grad-input GX.npy  d/d input, [N, C, H, W] float32\n"
    "  --grad-params GP.safetensors  d/d every parameter, under diffusers' names (F32)\n"
    "  --grad-encoder-hidden-states GE.npy  d/d the encoder hidden states, shaped as E.npy\n"
    "                       (summed over the images when E.npy holds one sequence for all)\n"
    "At least one of --out, --grad-input, --grad-params, --grad-encoder-hidden-states; only\n"
    "what is asked is written.\n";

typedef struct forward_args {
  const char *model_dir, *in_path, *t_path, *l_path, *e_path, *out_path;
  const char *g_path, *gx_path, *gp_path, *ge_path;
  long long threads;
  model_precision precision;
} forward_args;

static const struct option forward_opts[] = {
    {"model", required_argument, 0, 'm'},
    {"input", required_argument, 0, 'i'},
    {"timesteps", required_argument, 0, 't'},
    {"class-labels", required_argument, 0, 'l'},
    {"encoder-hidden-states", required_argument, 0, 'E'},
    {"out", required_argument, 0, 'o'},
    {"threads", required_argument, 0, 'j'},
    {"grad-output", required_argument, 0, 'G'},
    {"grad-input", required_argument, 0, 'X'},
    {"grad-params", required_argument, 0, 'P'},
    {"grad-encoder-hidden-states", required_argument, 0, 'H'},
    {"precision", required_argument, 0, 'p'},
    {"help", no_argument, 0, 'h'},
    {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, forward_args *a) {
  const char *cmd = "forward";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:i:t:l:E:o:j:hG:X:P:H:p:", forward_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 'i': a->in_path = optarg; break;
    case 't': a->t_path = optarg; break;
    case 'l': a->l_path = optarg; break;
    case 'E': a->e_path = optarg; break;
    case 'o': a->out_path = optarg; break;
    case 'G': a->g_path = optarg; break;
    case 'X': a->gx_path = optarg; break;
    case 'P': a->gp_path = optarg; break;
    case 'H': a->ge_path = optarg; break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'p':
      if (cli_parse_precision(optarg, &a->precision))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->model_dir || !a->in_path || !a->t_path)
    return cli_usage_error(cmd, "--model, --input and --timesteps are required");
  if ((a->gx_path || a->gp_path || a->ge_path) && !a->g_path)
    return cli_usage_error(cmd, "--grad-input, --grad-params and --grad-encoder-hidden-states "
                                "need --grad-output");
  if (a->ge_path && !a->e_path)
    return cli_usage_error(cmd, "--grad-encoder-hidden-states needs --encoder-hidden-states");
  if (!a->out_path && !a->gx_path && !a->gp_path && !a->ge_path)
    return cli_usage_error(cmd, "nothing to write: give --out, --grad-input, --grad-params or "
                                "--grad-encoder-hidden-states");
  return -1;
}

/* The evaluation's inputs: x [n, C, h, w], one timestep per image in tv (NULL when out of
 * memory), the labels (NULL without --class-labels) and the encoder hidden states, one
 * sequence per image in ev (NULL without --encoder-hidden-states). */
typedef struct forward_inputs {
  npy_array x, t, ehs;
  float *tv, *ev;
  int seq;
  int64_t *labels;
  int n, h, w;
} forward_inputs;

static void forward_inputs_free(forward_inputs *in) {
  free(in->tv);
  free(in->ev);
  npy_array_free(&in->ehs);
  free(in->labels);
  npy_array_free(&in->x);
  npy_array_free(&in->t);
}

/* --encoder-hidden-states: [n or 1, S, D] with D the model's width, as one sequence per image.
 * Returns 0, or 1 with the error printed. */
static int read_hidden_states(const char *path, const model_info *mi, forward_inputs *in) {
  err e = {0};
  if (!mi->cross_attention_dim)
    return cli_fail("forward", "%s: %s takes no encoder hidden states", path, mi->class_name);
  if (npy_read_f32(path, &in->ehs, &e))
    return cli_fail("forward", "%s", e.msg);
  const npy_array *a = &in->ehs;
  if (a->ndim != 3 || (a->shape[0] != in->n && a->shape[0] != 1) || a->shape[1] < 1 ||
      a->shape[1] > 4096 || a->shape[2] != mi->cross_attention_dim)
    return cli_fail("forward", "%s: expected shape [%d (or 1), S, %d] with S in 1..4096", path,
                    in->n, mi->cross_attention_dim);
  in->seq = (int)a->shape[1];
  const size_t per = (size_t)in->seq * mi->cross_attention_dim;
  if (!(in->ev = malloc(sizeof(float) * per * (size_t)in->n)))
    return cli_fail("forward", "out of memory");
  for (int i = 0; i < in->n; i++) /* one sequence stands for every image */
    memcpy(in->ev + per * i, a->data + (a->shape[0] == 1 ? 0 : per * i), sizeof(float) * per);
  return 0;
}

/* Returns 0, or 1 with the error printed. */
static int read_inputs(const forward_args *a, const model_info *mi, forward_inputs *in) {
  const char *cmd = "forward";
  err e = {0};
  if (npy_read_f32(a->in_path, &in->x, &e) || npy_read_f32(a->t_path, &in->t, &e))
    return cli_fail(cmd, "%s", e.msg);
  if (in->x.ndim != 4 || in->x.shape[1] != mi->in_channels)
    return cli_fail(cmd, "%s: expected shape [N, %d, H, W]", a->in_path, mi->in_channels);
  const int n = in->n = (int)in->x.shape[0];
  in->h = (int)in->x.shape[2];
  in->w = (int)in->x.shape[3];
  if (in->t.count != n && in->t.count != 1)
    return cli_fail(cmd, "%s: %lld timesteps for %d images", a->t_path, (long long)in->t.count, n);
  /* one timestep stands for every image */
  in->tv = malloc(sizeof(float) * (size_t)n);
  for (int i = 0; in->tv && i < n; i++)
    in->tv[i] = in->t.data[in->t.count == 1 ? 0 : i];
  if (a->l_path) {
    int64_t nlabels = 0, lshape[NPY_MAX_DIMS];
    int lnd;
    if (npy_read_i64(a->l_path, &in->labels, &nlabels, &lnd, lshape, &e))
      return cli_fail(cmd, "%s", e.msg);
    if (nlabels != n)
      return cli_fail(cmd, "%s: %lld labels for %d images", a->l_path, (long long)nlabels, n);
  }
  if (a->e_path)
    return read_hidden_states(a->e_path, mi, in);
  if (mi->cross_attention_dim)
    return cli_fail(cmd, "%s is text-conditional: give --encoder-hidden-states E.npy [N, S, %d]",
                    mi->class_name, mi->cross_attention_dim);
  return 0;
}

/* The call the inputs make. */
static model_call inputs_call(const forward_args *a, const forward_inputs *in) {
  return (model_call){.x = in->x.data,
                      .n = in->n,
                      .h = in->h,
                      .w = in->w,
                      .t = in->tv,
                      .labels = in->labels,
                      .encoder_hidden_states = in->ev,
                      .seq_len = in->seq,
                      .threads = (int)a->threads};
}

/* The evaluation and OUT.npy; returns 0, or 1 with the error printed. */
static int eval_and_write(const forward_args *a, model *m, const forward_inputs *in) {
  const char *cmd = "forward";
  const model_info *mi = model_get_info(m);
  err e = {0};
  float *out = malloc(sizeof(float) * (size_t)in->n * mi->out_channels * in->h * in->w);
  int status = 1;
  const model_call c = inputs_call(a, in);
  const int64_t oshape[4] = {in->n, mi->out_channels, in->h, in->w};
  if (!out || !in->tv)
    cli_fail(cmd, "out of memory");
  else if (model_run(m, &c, out, &e) || npy_write_f32(a->out_path, out, 4, oshape, &e))
    cli_fail(cmd, "%s", e.msg);
  else
    status = 0;
  free(out);
  return status;
}

/* GE.npy shaped as E.npy: the per-image gradients ge [n][S][D], summed over the images when
 * one sequence stood for all of them. */
static int write_grad_ehs(const char *path, const forward_inputs *in, float *ge, err *e) {
  const npy_array *a = &in->ehs;
  const size_t per = (size_t)in->seq * a->shape[2];
  for (int i = 1; a->shape[0] == 1 && i < in->n; i++)
    for (size_t k = 0; k < per; k++)
      ge[k] += ge[per * i + k];
  return npy_write_f32(path, ge, 3, a->shape, e);
}

/* Forward and backward, then whatever of OUT, GX, GP and GE was asked; 0, or 1 with the
 * error. */
static int grad_and_write(const forward_args *a, model *m, const forward_inputs *in) {
  const model_info *mi = model_get_info(m);
  err e = {0};
  npy_array g = {0};
  const size_t nout = (size_t)in->n * mi->out_channels * in->h * in->w;
  const int64_t oshape[4] = {in->n, mi->out_channels, in->h, in->w};
  const int64_t xshape[4] = {in->n, mi->in_channels, in->h, in->w};
  if (npy_read_f32(a->g_path, &g, &e))
    return cli_fail("forward", "%s", e.msg);
  if (g.ndim != 4 || memcmp(g.shape, oshape, sizeof oshape) != 0) {
    npy_array_free(&g);
    return cli_fail("forward", "%s: expected the output's shape [%d, %d, %d, %d]", a->g_path, in->n,
                    mi->out_channels, in->h, in->w);
  }
  model_grad_call gc = {.grad_out = g.data};
  float *out = a->out_path ? malloc(sizeof(float) * nout) : NULL;
  float *gx = a->gx_path ? malloc(sizeof(float) * (size_t)in->x.count) : NULL;
  float *ge = a->ge_path ? malloc(sizeof(float) * in->n * in->seq * mi->cross_attention_dim) : NULL;
  int rc = (a->out_path && !out) || (a->gx_path && !gx) || (a->ge_path && !ge) || !in->tv
               ? err_set(&e, ERR_NOMEM, "out of memory")
               : ERR_OK;
  if (!rc && a->gp_path)
    rc = model_grads_new(m, &gc.params, &e);
  gc.out = out;
  gc.grad_x = gx;
  gc.grad_encoder_hidden_states = ge;
  const model_call c = inputs_call(a, in);
  (void)(rc || (rc = model_backward(m, &c, &gc, &e)) ||
         (out && (rc = npy_write_f32(a->out_path, out, 4, oshape, &e))) ||
         (gx && (rc = npy_write_f32(a->gx_path, gx, 4, xshape, &e))) ||
         (gc.params && (rc = cli_write_param_grads(a->gp_path, m, gc.params, &e))) ||
         (ge && (rc = write_grad_ehs(a->ge_path, in, ge, &e))));
  model_grads_free(gc.params);
  free(out);
  free(gx);
  free(ge);
  npy_array_free(&g);
  return rc ? cli_fail("forward", "%s", e.msg) : 0;
}

int cmd_forward(int argc, char **argv) {
  forward_args a = {.threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  model *m = NULL;
  if (cli_load_model("forward", a.model_dir, a.precision, &m))
    return 1;
  forward_inputs in = {0};
  status = read_inputs(&a, model_get_info(m), &in);
  if (!status)
    status = a.g_path ? grad_and_write(&a, m, &in) : eval_and_write(&a, m, &in);
  forward_inputs_free(&in);
  model_free(m);
  return status;
}
