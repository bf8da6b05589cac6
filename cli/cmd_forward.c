/* `denoised forward`: one network evaluation on .npy inputs, writing the raw
 * model output; the tool behind the parity tests against diffusers. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "model.h"
#include "npy.h"

static const char help[] =
    "usage: denoised forward --model DIR --input X.npy --timesteps T.npy\n"
    "                        [--class-labels L.npy] --out OUT.npy [--threads N]\n"
    "\n"
    "Runs one network evaluation and writes the raw model output.\n"
    "  --model DIR          diffusers model folder (flat or pipeline layout)\n"
    "  --input X.npy        float array [N, C, H, W]\n"
    "  --timesteps T.npy    N timesteps (or one, used for every image); may be fractional\n"
    "  --class-labels L.npy N integer class labels (class-conditional models)\n"
    "  --out OUT.npy        output [N, out_channels, H, W] float32\n"
    "  --threads N          CPU threads (default 2)\n";

int cmd_forward(int argc, char **argv) {
  const char *cmd = "forward", *model_dir = NULL, *in_path = NULL, *t_path = NULL;
  const char *l_path = NULL, *out_path = NULL;
  long long threads = 2;
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"input", required_argument, 0, 'i'},
                                       {"timesteps", required_argument, 0, 't'},
                                       {"class-labels", required_argument, 0, 'l'},
                                       {"out", required_argument, 0, 'o'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:i:t:l:o:j:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': model_dir = optarg; break;
    case 'i': in_path = optarg; break;
    case 't': t_path = optarg; break;
    case 'l': l_path = optarg; break;
    case 'o': out_path = optarg; break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!model_dir || !in_path || !t_path || !out_path)
    return cli_usage_error(cmd, "--model, --input, --timesteps and --out are required");

  err e = {0};
  model *m = NULL;
  npy_array x = {0}, t = {0};
  int64_t *labels = NULL, nlabels = 0, lshape[NPY_MAX_DIMS];
  float *out = NULL, *tv = NULL;
  int status = 1, lnd;
  if (model_load(model_dir, &m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  if (npy_read_f32(in_path, &x, &e) || npy_read_f32(t_path, &t, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (x.ndim != 4 || x.shape[1] != mi->in_channels) {
    cli_fail(cmd, "%s: expected shape [N, %d, H, W]", in_path, mi->in_channels);
    goto done;
  }
  int n = (int)x.shape[0], h = (int)x.shape[2], w = (int)x.shape[3];
  if (t.count != n && t.count != 1) {
    cli_fail(cmd, "%s: %lld timesteps for %d images", t_path, (long long)t.count, n);
    goto done;
  }
  tv = malloc(sizeof(float) * (size_t)n);
  for (int i = 0; tv && i < n; i++)
    tv[i] = t.data[t.count == 1 ? 0 : i];
  if (l_path) {
    if (npy_read_i64(l_path, &labels, &nlabels, &lnd, lshape, &e)) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
    if (nlabels != n) {
      cli_fail(cmd, "%s: %lld labels for %d images", l_path, (long long)nlabels, n);
      goto done;
    }
  }
  size_t count = (size_t)n * mi->out_channels * h * w;
  out = malloc(sizeof(float) * count);
  if (!out || !tv) {
    cli_fail(cmd, "out of memory");
    goto done;
  }
  if (model_eval(m, x.data, n, h, w, tv, labels, out, (int)threads, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  int64_t oshape[4] = {n, mi->out_channels, h, w};
  if (npy_write_f32(out_path, out, 4, oshape, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  status = 0;
done:
  free(out);
  free(tv);
  free(labels);
  npy_array_free(&x);
  npy_array_free(&t);
  model_free(m);
  return status;
}
