/* `denoised`: the command-line front end of the engine. Dispatches to one
 * subcommand per file (cmd_*.c); the engine itself never prints or exits. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "config.h"
#include "server.h"

static const char usage[] =
    "usage: denoised <command> [options]\n"
    "\n"
    "Diffusion-model image generation on the CPU.\n"
    "\n"
    "commands:\n"
    "  sample    generate images with a model and a solver (PNG or .npy)\n"
    "  forward   run one network evaluation on inputs from .npy files\n"
    "  vae       encode images to latents or decode latents (AutoencoderKL)\n"
    "  classify  an image classifier's verdicts, logits and input gradient\n"
    "  adjoint   gradients through a sampling run (discrete or continuous adjoint)\n"
    "  audit     adversarial initial noise against a classifier, vs random noise\n"
    "  concept   learn a named class embedding from a classifier's verdict\n"
    "  stylize   fine-tune a model toward a classifier's attribute verdict\n"
    "  encode-text prompts to CLIP text-encoder hidden states (.npy)\n"
    "  convert   a single-file Stable-Diffusion checkpoint to a diffusers folder\n"
    "  invert    images to noise (DDIM, edit-friendly DDPM maps)\n"
    "  edit      edits in noise space, or across a semantic boundary\n"
    "  deblur    restore a blurry picture with a deblurring model\n"
    "  boundary  'boundary fit': a semantic boundary from labelled images\n"
    "  stats     DPM-Solver-v3 statistics of a model (--solver-data)\n"
    "  ot fit    DPM-OT transport map of a model (--scheduler dpm-ot)\n"
    "  search    S^3-style search for a USF schedule of a model\n"
    "  train     train a UNet2DModel on images (a diffusers folder)\n"
    "  finetune  adapt a model to a few images (DomainStudio or plain fine-tuning)\n"
    "  info      a model folder: its network and its solver data\n"
    "  bench     benchmarks (bench unet: ms per forward and GFLOP/s)\n"
    "  serve     the HTTP daemon (jobs, live progress, PNG delivery)\n"
    "  config    check a daemon config file, list its keys\n"
    "\n"
    "Run 'denoised <command> --help' for the options of a command.\n";

int cli_parse_int(const char *flag, const char *s, long long min, long long max, long long *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < min || v > max) {
    fprintf(stderr, "denoised: %s expects an integer in [%lld, %lld], got '%s'\n", flag, min, max,
            s);
    return -1;
  }
  *out = v;
  return 0;
}

int cli_parse_size(const char *flag, const char *s, long long max, long long *width,
                   long long *height) {
  char one[32];
  const char *x = strchr(s, 'x');
  if (!x)
    x = strchr(s, 'X');
  if (!x) {
    if (cli_parse_int(flag, s, 1, max, width))
      return -1;
    *height = *width;
    return 0;
  }
  snprintf(one, sizeof one, "%.*s", (int)(x - s < 31 ? x - s : 31), s);
  if (x - s >= 31 || cli_parse_int(flag, one, 1, max, width) ||
      cli_parse_int(flag, x + 1, 1, max, height))
    return -1;
  return 0;
}

int cli_parse_precision(const char *s, model_precision *out) {
  err e = {0};
  if (model_precision_parse(s, out, &e)) {
    fprintf(stderr, "denoised: --precision: %s\n", e.msg);
    return -1;
  }
  return 0;
}

int cli_load_model(const char *cmd, const char *dir, model_precision p, model **out) {
  err e = {0};
  *out = NULL;
  if (model_load(dir, out, &e) || model_set_precision(*out, p, &e)) {
    model_free(*out);
    *out = NULL;
    return cli_fail(cmd, "%s", e.msg);
  }
  return 0;
}

int cli_parse_double(const char *flag, const char *s, double min, double max, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !isfinite(v) || v < min || v > max) {
    fprintf(stderr, "denoised: %s expects a number in [%g, %g], got '%s'\n", flag, min, max, s);
    return -1;
  }
  *out = v;
  return 0;
}

static int vfail(const char *cmd, int status, const char *fmt, va_list ap) {
  fprintf(stderr, "denoised %s: ", cmd);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  if (status == 2)
    fprintf(stderr, "Run 'denoised %s --help' for usage.\n", cmd);
  return status;
}

int cli_fail(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = vfail(cmd, 1, fmt, ap);
  va_end(ap);
  return rc;
}

int cli_usage_error(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = vfail(cmd, 2, fmt, ap);
  va_end(ap);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fputs(usage, stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
    fputs(usage, stdout);
    return 0;
  }
  if (strcmp(cmd, "--version") == 0) {
    puts("denoised 0.1.0");
    return 0;
  }
  if (strcmp(cmd, "train") == 0)
    return cmd_train(argc - 1, argv + 1);
  if (strcmp(cmd, "finetune") == 0)
    return cmd_finetune(argc - 1, argv + 1);
  if (strcmp(cmd, "stats") == 0)
    return cmd_stats(argc - 1, argv + 1);
  if (strcmp(cmd, "ot") == 0)
    return cmd_ot(argc - 1, argv + 1);
  if (strcmp(cmd, "search") == 0)
    return cmd_search(argc - 1, argv + 1);
  if (strcmp(cmd, "info") == 0)
    return cmd_info(argc - 1, argv + 1);
  if (strcmp(cmd, "forward") == 0)
    return cmd_forward(argc - 1, argv + 1);
  if (strcmp(cmd, "vae") == 0)
    return cmd_vae(argc - 1, argv + 1);
  if (strcmp(cmd, "adjoint") == 0)
    return cmd_adjoint(argc - 1, argv + 1);
  if (strcmp(cmd, "classify") == 0)
    return cmd_classify(argc - 1, argv + 1);
  if (strcmp(cmd, "audit") == 0)
    return cmd_audit(argc - 1, argv + 1);
  if (strcmp(cmd, "concept") == 0)
    return cmd_concept(argc - 1, argv + 1);
  if (strcmp(cmd, "stylize") == 0)
    return cmd_stylize(argc - 1, argv + 1);
  if (strcmp(cmd, "convert") == 0)
    return cmd_convert(argc - 1, argv + 1);
  if (strcmp(cmd, "encode-text") == 0)
    return cmd_encode_text(argc - 1, argv + 1);
  if (strcmp(cmd, "sample") == 0)
    return cmd_sample(argc - 1, argv + 1);
  if (strcmp(cmd, "bench") == 0)
    return cmd_bench(argc - 1, argv + 1);
  if (strcmp(cmd, "invert") == 0)
    return cmd_invert(argc - 1, argv + 1);
  if (strcmp(cmd, "edit") == 0)
    return cmd_edit(argc - 1, argv + 1);
  if (strcmp(cmd, "deblur") == 0)
    return cmd_deblur(argc - 1, argv + 1);
  if (strcmp(cmd, "boundary") == 0)
    return cmd_boundary(argc - 1, argv + 1);
  if (strcmp(cmd, "serve") == 0)
    return server_main(argc - 1, argv + 1);
  if (strcmp(cmd, "config") == 0 && argc >= 3 && strcmp(argv[2], "check") == 0)
    return server_config_check(argc - 2, argv + 2); /* as serve checks it */
  if (strcmp(cmd, "config") == 0)
    return config_main(argc - 1, argv + 1);
  fprintf(stderr, "denoised: unknown command '%s'\n\n%s", cmd, usage);
  return 2;
}
