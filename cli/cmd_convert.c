/* `denoised convert`: a single-file Stable-Diffusion checkpoint (the original key layout that
 * AUTOMATIC1111 and ComfyUI users keep) written out as the diffusers pipeline folder it is
 * seen as (engine/model/sd_single.h), so that diffusers and every folder-taking tool read it.
 * The tensors are written as float32; the vocabulary, which the file lacks, is copied from a
 * tokenizer folder. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "safetensors.h"
#include "sd_single.h"

static const char help[] =
    "usage: denoised convert --model CHECKPOINT.safetensors [--tokenizer DIR] --out DIR\n"
    "\n"
    "Writes a single-file Stable-Diffusion 1.x/2.x checkpoint as a diffusers pipeline folder\n"
    "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; weights as\n"
    "float32), the layout every other command and diffusers itself load.\n"
    "  --model FILE      the checkpoint (SD 2.x needs its inference YAML beside it, as in\n"
    "                    AUTOMATIC1111: NAME.yaml)\n"
    "  --tokenizer DIR   vocab.json + merges.txt to copy (the file holds no vocabulary);\n"
    "                    default: the tokenizer/ folder beside the checkpoint\n"
    "  --out DIR         the folder to create; it must not exist\n";

typedef struct convert_args {
  const char *model, *tokenizer, *out;
} convert_args;

static const struct option convert_opts[] = {{"model", required_argument, 0, 'm'},
                                             {"tokenizer", required_argument, 0, 'k'},
                                             {"out", required_argument, 0, 'o'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, convert_args *a) {
  const char *cmd = "convert";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:k:o:h", convert_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model = optarg; break;
    case 'k': a->tokenizer = optarg; break;
    case 'o': a->out = optarg; break;
    case 'h': fputs(help, stdout); return 0;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->model || !a->out)
    return cli_usage_error(cmd, "--model and --out are required");
  return -1;
}

/* Every tensor of view `w` as float32 into path; ERR_* with e set. */
static int write_part(const st_file *w, const char *path, err *e) {
  const int n = st_count(w);
  st_out_tensor *t = calloc((size_t)n, sizeof *t);
  float **data = calloc((size_t)n, sizeof *data);
  int rc = t && data ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < n && !rc; i++) {
    const st_tensor_info *ti = st_info_at(w, i);
    data[i] = malloc((size_t)(ti->count ? ti->count : 1) * sizeof(float));
    if (!data[i])
      rc = err_set(e, ERR_NOMEM, "out of memory for %s", ti->name);
    else
      rc = st_read_f32(w, ti->name, ti->ndim, ti->shape, data[i], e);
    t[i] = (st_out_tensor){ti->name, ti->ndim, ti->shape, data[i]};
  }
  if (!rc)
    rc = st_write_f32(path, t, n, NULL, 0, e);
  for (int i = 0; data && i < n; i++)
    free(data[i]);
  free(data);
  free(t);
  return rc;
}

static int write_json(const json_t *j, const char *path, err *e) {
  if (json_dump_file(j, path, JSON_INDENT(2) | JSON_SORT_KEYS))
    return err_set(e, ERR_IO, "%s: cannot write", path);
  return ERR_OK;
}

static const char *const part_dirs[] = {"unet", "vae", "text_encoder", "scheduler", "tokenizer"};

/* The folder's files, part by part. */
static int write_folder(const sd_single *s, const char *tok, const char *out, err *e) {
  char p[4200], q[4200];
  for (int i = 0; i < 5; i++) {
    snprintf(p, sizeof p, "%s/%s", out, part_dirs[i]);
    if (mkdir(p, 0755) != 0)
      return err_set(e, ERR_IO, "%s: %s", p, strerror(errno));
  }
  static const char *const weights[] = {"diffusion_pytorch_model.safetensors",
                                        "diffusion_pytorch_model.safetensors", "model.safetensors"};
  static const char *const configs[] = {"config.json", "config.json", "config.json",
                                        "scheduler_config.json", "tokenizer_config.json"};
  int rc = ERR_OK;
  for (int i = 0; i < SD_NPARTS && !rc; i++) {
    snprintf(p, sizeof p, "%s/%s/%s", out, part_dirs[i], configs[i]);
    rc = write_json(sd_single_config(s, (sd_part)i), p, e);
    if (!rc && i < 3) {
      snprintf(p, sizeof p, "%s/%s/%s", out, part_dirs[i], weights[i]);
      fprintf(stderr, "denoised convert: writing %s\n", p);
      rc = write_part(sd_single_weights(s, (sd_part)i), p, e);
    }
  }
  static const char *const vocab[] = {"vocab.json", "merges.txt"};
  for (int i = 0; i < 2 && !rc; i++) {
    snprintf(p, sizeof p, "%s/%s", tok, vocab[i]);
    snprintf(q, sizeof q, "%s/tokenizer/%s", out, vocab[i]);
    rc = cli_copy_file(p, q, e);
  }
  return rc;
}

/* model_index.json with the checkpoint's scheduler. */
static int write_index(const sd_single *s, const char *out, err *e) {
  const json_t *sc = json_object_get(sd_single_config(s, SD_PART_SCHEDULER), "_class_name");
  return cli_write_pipeline_index(out, json_is_string(sc) ? json_string_value(sc) : "PNDMScheduler",
                                  e);
}

int cmd_convert(int argc, char **argv) {
  const char *cmd = "convert";
  convert_args a = {0};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  char tok[4200];
  if (a.tokenizer) {
    snprintf(tok, sizeof tok, "%s", a.tokenizer);
  } else {
    const char *slash = strrchr(a.model, '/');
    snprintf(tok, sizeof tok, "%.*s%stokenizer", slash ? (int)(slash - a.model) : 0, a.model,
             slash ? "/" : "");
  }
  struct stat sb;
  if (stat(a.model, &sb) != 0)
    return cli_usage_error(cmd, "--model %s: %s", a.model, strerror(errno));
  if (!S_ISREG(sb.st_mode))
    return cli_usage_error(cmd, "--model %s: not a file (a single-file .safetensors checkpoint)",
                           a.model);
  if (stat(tok, &sb) != 0 || !S_ISDIR(sb.st_mode))
    return cli_usage_error(cmd,
                           "no tokenizer folder %s: the checkpoint holds no vocabulary; give "
                           "--tokenizer DIR (vocab.json + merges.txt)",
                           tok);
  if (stat(a.out, &sb) == 0)
    return cli_usage_error(cmd, "--out %s exists; give a new folder", a.out);
  if (strlen(a.out) > 4000)
    return cli_usage_error(cmd, "--out: path too long");
  err e = {0};
  sd_single *s = NULL;
  if (sd_single_open(a.model, &s, &e))
    return cli_fail(cmd, "%s", e.msg);
  if (mkdir(a.out, 0755) != 0) {
    sd_single_free(s);
    return cli_fail(cmd, "--out %s: %s", a.out, strerror(errno));
  }
  int rc = write_folder(s, tok, a.out, &e);
  if (!rc)
    rc = write_index(s, a.out, &e);
  const int family = sd_single_family(s);
  sd_single_free(s);
  if (rc)
    return cli_fail(cmd, "%s (the folder %s is incomplete: remove it)", e.msg, a.out);
  fprintf(stderr, "denoised convert: wrote %s (a Stable Diffusion %d.x pipeline)\n", a.out, family);
  return 0;
}
