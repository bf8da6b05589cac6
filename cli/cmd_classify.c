/* `denoised classify`: the engine's image classifier (engine/model/classifier.h, e.g. the
 * exported glyph classifier in models/glyph-classifier) on PNGs or a .npy batch: each image's
 * verdict per head, the logits and features as .npy, and with --grad-logits the input gradient of
 * sum(G * logits), the way `denoised forward` gives the UNet's. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "classifier.h"
#include "cli.h"
#include "npy.h"

static const char help[] =
    "usage: denoised classify --classifier DIR --images X.npy|IMAGE.png [--logits OUT.npy]\n"
    "                         [--features OUT.npy] [--grad-logits G.npy --grad-input GX.npy]\n"
    "                         [--threads N] [--quiet]\n"
    "\n"
    "Runs an image classifier (a folder with config.json, _class_name GlyphClassifier, and\n"
    "model.safetensors: tools/export_classifier.py) and prints each image's most likely class\n"
    "per head with its probability.\n"
    "  --classifier DIR   the classifier folder (models/glyph-classifier)\n"
    "  --images PATH      a PNG, or a .npy [N, C, S, S] (or [C, S, S]) of values in [-1, 1]\n"
    "  --logits OUT.npy   every head's logits, [N, total classes], heads in config order\n"
    "  --features OUT.npy the feature layer the heads read, [N, features]\n"
    "  --grad-logits G    [N, total classes]: with --grad-input, d sum(G * logits) / d images\n"
    "  --grad-input GX    [N, C, S, S] float32\n"
    "  --threads N        CPU threads (default 2)\n"
    "  --quiet            print nothing\n";

typedef struct classify_args {
  const char *dir, *images, *logits, *features, *g_path, *gx_path;
  long long threads;
  int quiet;
} classify_args;

static const struct option opts[] = {{"classifier", required_argument, 0, 'c'},
                                     {"images", required_argument, 0, 'i'},
                                     {"logits", required_argument, 0, 'L'},
                                     {"features", required_argument, 0, 'F'},
                                     {"grad-logits", required_argument, 0, 'G'},
                                     {"grad-input", required_argument, 0, 'X'},
                                     {"threads", required_argument, 0, 'j'},
                                     {"quiet", no_argument, 0, 'q'},
                                     {"help", no_argument, 0, 'h'},
                                     {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, classify_args *a) {
  const char *cmd = "classify";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "c:i:L:F:G:X:j:qh", opts, NULL)) != -1) {
    switch (c) {
    case 'c': a->dir = optarg; break;
    case 'i': a->images = optarg; break;
    case 'L': a->logits = optarg; break;
    case 'F': a->features = optarg; break;
    case 'G': a->g_path = optarg; break;
    case 'X': a->gx_path = optarg; break;
    case 'q': a->quiet = 1; break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->dir || !a->images)
    return cli_usage_error(cmd, "--classifier and --images are required");
  if (!a->g_path != !a->gx_path)
    return cli_usage_error(cmd, "--grad-logits and --grad-input go together");
  return -1;
}

/* Each image's argmax per head with its softmax probability. */
static void print_verdicts(const classifier_info *in, const float *logits, int n) {
  for (int i = 0; i < n; i++) {
    printf("image %d:", i);
    for (int h = 0; h < in->n_heads; h++) {
      const classifier_head *hd = &in->heads[h];
      const float *z = logits + (size_t)i * in->n_logits + hd->offset;
      int best = 0;
      double s = 0;
      for (int k = 1; k < hd->classes; k++)
        best = z[k] > z[best] ? k : best;
      for (int k = 0; k < hd->classes; k++)
        s += exp((double)z[k] - z[best]);
      if (hd->labels)
        printf(" %s=%s (%.2f)", hd->name, hd->labels[best], 1.0 / s);
      else
        printf(" %s=%d (%.2f)", hd->name, best, 1.0 / s);
    }
    printf("\n");
  }
}

/* The input gradient of sum(G * logits) into GX; 0, or 1 with the error printed. */
static int write_grad(const classify_args *a, const classifier *c, const float *x, int n) {
  const classifier_info *in = classifier_get_info(c);
  const int S = in->sample_size;
  err e = {0};
  npy_array g = {0};
  if (npy_read_f32(a->g_path, &g, &e) || npy_check_finite(&g, "--grad-logits", &e))
    return npy_array_free(&g), cli_fail("classify", "%s", e.msg);
  if (g.ndim != 2 || g.shape[0] != n || g.shape[1] != in->n_logits) {
    npy_array_free(&g);
    return cli_fail("classify", "--grad-logits %s: shape must be [%d, %d] (images, logits)",
                    a->g_path, n, in->n_logits);
  }
  const size_t nx = (size_t)n * in->in_channels * S * S;
  float *gx = malloc(nx * sizeof *gx);
  const int64_t shape[4] = {n, in->in_channels, S, S};
  int rc = gx ? classifier_input_grad(c, x, n, S, S, g.data, NULL, gx, (int)a->threads, &e)
              : err_set(&e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK)
    rc = npy_write_f32(a->gx_path, gx, 4, shape, &e);
  free(gx);
  npy_array_free(&g);
  return rc ? cli_fail("classify", "%s", e.msg) : 0;
}

int cmd_classify(int argc, char **argv) {
  classify_args a = {.threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  err e = {0};
  classifier *c = NULL;
  if (classifier_load(a.dir, &c, &e))
    return cli_fail("classify", "%s", e.msg);
  const classifier_info *in = classifier_get_info(c);
  const int S = in->sample_size;
  float *x = NULL, *logits = NULL, *feat = NULL;
  int n = 0;
  status = 1;
  if (cli_read_images("--images", a.images, in->in_channels, S, S, 4096, &n, &x, &e)) {
    cli_fail("classify", "%s", e.msg);
    goto done;
  }
  logits = malloc((size_t)n * in->n_logits * sizeof *logits);
  feat = malloc((size_t)n * in->features * sizeof *feat);
  const int64_t lshape[2] = {n, in->n_logits}, fshape[2] = {n, in->features};
  if (!logits || !feat)
    err_set(&e, ERR_NOMEM, "out of memory");
  if (!logits || !feat || classifier_run(c, x, n, S, S, logits, feat, (int)a.threads, &e) ||
      (a.logits && npy_write_f32(a.logits, logits, 2, lshape, &e)) ||
      (a.features && npy_write_f32(a.features, feat, 2, fshape, &e))) {
    cli_fail("classify", "%s", e.msg);
    goto done;
  }
  if (!a.quiet)
    print_verdicts(in, logits, n);
  status = a.g_path ? write_grad(&a, c, x, n) : 0;
done:
  free(x);
  free(logits);
  free(feat);
  classifier_free(c);
  return status;
}
