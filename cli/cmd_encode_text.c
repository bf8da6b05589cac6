/* `denoised encode-text`: prompts through CLIP's tokenizer and text encoder (engine/text) to
 * the hidden states a Stable-Diffusion UNet cross-attends to, from a pipeline folder, a
 * text-encoder folder or a single-file checkpoint; the tool behind the text-encoder parity
 * checks. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "clip.h"
#include "npy.h"
#include "sd_single.h"

static const char help[] =
    "usage: denoised encode-text --model DIR [--tokenizer DIR] --prompt TEXT [--prompt TEXT ...]\n"
    "                            [--clip-skip N] [--out-ids IDS.npy] --out HIDDEN.npy\n"
    "                            [--threads N]\n"
    "\n"
    "Encodes prompts with a CLIP text encoder (CLIPTextModel) and its tokenizer.\n"
    "  --model DIR         a pipeline folder (text_encoder/ and tokenizer/), a text-encoder\n"
    "                      folder (config.json + model.safetensors; needs --tokenizer), or a\n"
    "                      single-file Stable-Diffusion checkpoint (.safetensors; needs\n"
    "                      --tokenizer for the vocabulary, which such files do not hold)\n"
    "  --tokenizer DIR     vocab.json + merges.txt (+ tokenizer_config.json,\n"
    "                      special_tokens_map.json); default: the pipeline's tokenizer/\n"
    "  --prompt TEXT       a prompt (UTF-8); repeat for a batch (at most 256); \"\" is the\n"
    "                      empty prompt. Longer than 75 tokens: truncated, said on stderr\n"
    "  --clip-skip N       1 (default): the last layer; N: the output N - 1 layers earlier,\n"
    "                      through the final layer norm (AUTOMATIC1111's count; diffusers'\n"
    "                      clip_skip is N - 1)\n"
    "  --out HIDDEN.npy    float32 [prompts, 77, hidden_size]\n"
    "  --out-ids IDS.npy   the token ids, int64 [prompts, 77]\n"
    "  --threads N         CPU threads (default 2)\n";

#define MAX_PROMPTS 256

typedef struct encode_args {
  const char *model, *tokenizer, *out, *out_ids;
  const char *prompts[MAX_PROMPTS];
  int nprompts;
  long long clip_skip, threads;
} encode_args;

static const struct option encode_opts[] = {{"model", required_argument, 0, 'm'},
                                            {"tokenizer", required_argument, 0, 'k'},
                                            {"prompt", required_argument, 0, 'p'},
                                            {"clip-skip", required_argument, 0, 's'},
                                            {"out", required_argument, 0, 'o'},
                                            {"out-ids", required_argument, 0, 'I'},
                                            {"threads", required_argument, 0, 'j'},
                                            {"help", no_argument, 0, 'h'},
                                            {0, 0, 0, 0}};

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, encode_args *a) {
  const char *cmd = "encode-text";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:k:p:s:o:I:j:h", encode_opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model = optarg; break;
    case 'k': a->tokenizer = optarg; break;
    case 'o': a->out = optarg; break;
    case 'I': a->out_ids = optarg; break;
    case 'p':
      if (a->nprompts == MAX_PROMPTS)
        return cli_usage_error(cmd, "more than %d --prompt", MAX_PROMPTS);
      a->prompts[a->nprompts++] = optarg;
      break;
    case 's':
      if (cli_parse_int("--clip-skip", optarg, 1, 1000, &a->clip_skip))
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
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!a->model || !a->out || a->nprompts == 0)
    return cli_usage_error(cmd, "--model, --prompt and --out are required");
  return -1;
}

static int is_dir(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The tokenizer and the encoder from --model / --tokenizer; 0, or 1 with the error printed. */
static int load(const encode_args *a, clip_tokenizer **tok, clip_text_model **m) {
  const char *cmd = "encode-text";
  err e = {0};
  char te[4096], td[4096];
  const char *tok_dir = a->tokenizer;
  struct stat st;
  if (stat(a->model, &st) != 0)
    return cli_fail(cmd, "--model %s: no such file or folder", a->model);
  if (S_ISREG(st.st_mode)) { /* a single-file checkpoint */
    if (!tok_dir)
      return cli_usage_error(cmd,
                             "--model %s is a single file, which holds no vocabulary: "
                             "give --tokenizer DIR (vocab.json + merges.txt)",
                             a->model);
    sd_single *s = NULL;
    int rc = sd_single_open(a->model, &s, &e) ||
             clip_tokenizer_new_from(tok_dir, sd_single_config(s, SD_PART_TOKENIZER), tok, &e) ||
             clip_text_new_from(sd_single_config(s, SD_PART_TEXT_ENCODER),
                                sd_single_weights(s, SD_PART_TEXT_ENCODER), a->model, m, &e);
    sd_single_free(s);
    return rc ? cli_fail(cmd, "%s", e.msg) : 0;
  }
  snprintf(te, sizeof te, "%s/text_encoder", a->model);
  snprintf(td, sizeof td, "%s/tokenizer", a->model);
  int pipeline = is_dir(te);
  if (!tok_dir && !(pipeline && is_dir(td)))
    return cli_usage_error(cmd, "%s has no tokenizer/ folder: give --tokenizer DIR", a->model);
  if (!tok_dir)
    tok_dir = td;
  if (clip_tokenizer_new(tok_dir, tok, &e) || clip_text_new(pipeline ? te : a->model, m, &e))
    return cli_fail(cmd, "%s", e.msg);
  return 0;
}

/* Every prompt's ids into ids[n][len]; 0, or 1 with the error printed. */
static int tokenize_all(const encode_args *a, const clip_tokenizer *tok, int64_t *ids) {
  const int len = clip_tokenizer_length(tok);
  for (int i = 0; i < a->nprompts; i++) {
    err e = {0};
    int kept, truncated;
    const char *p = a->prompts[i];
    if (clip_tokenize(tok, p, strlen(p), ids + (size_t)i * len, &kept, &truncated, &e))
      return cli_fail("encode-text", "--prompt %d: %s", i + 1, e.msg);
    if (truncated)
      fprintf(stderr,
              "denoised encode-text: prompt %d is longer than %d tokens; the rest is "
              "dropped (as CLIP and diffusers do)\n",
              i + 1, kept);
  }
  return 0;
}

/* ids as an int64 .npy, through npy_write_i64. */
static int write_outputs(const encode_args *a, const int64_t *ids, const float *hidden, int len,
                         int d) {
  err e = {0};
  const int64_t ishape[2] = {a->nprompts, len}, hshape[3] = {a->nprompts, len, d};
  if ((a->out_ids && npy_write_i64(a->out_ids, ids, 2, ishape, &e)) ||
      npy_write_f32(a->out, hidden, 3, hshape, &e))
    return cli_fail("encode-text", "%s", e.msg);
  return 0;
}

int cmd_encode_text(int argc, char **argv) {
  encode_args a = {.clip_skip = 1, .threads = 2};
  int status = parse_args(argc, argv, &a);
  if (status >= 0)
    return status;
  clip_tokenizer *tok = NULL;
  clip_text_model *m = NULL;
  status = load(&a, &tok, &m);
  const int len = tok ? clip_tokenizer_length(tok) : 0;
  const int d = m ? clip_text_config_of(m)->hidden_size : 0;
  int64_t *ids = status ? NULL : malloc(sizeof *ids * (size_t)a.nprompts * len);
  float *hidden = ids ? malloc(sizeof *hidden * (size_t)a.nprompts * len * d) : NULL;
  if (!status && !hidden)
    status = cli_fail("encode-text", "out of memory");
  if (!status)
    status = tokenize_all(&a, tok, ids);
  if (!status) {
    err e = {0};
    pool *p = pool_new((int)a.threads);
    if (clip_text_encode(m, ids, a.nprompts, len, (int)a.clip_skip, hidden, p, &e))
      status = cli_fail("encode-text", "%s", e.msg);
    pool_free(p);
  }
  if (!status)
    status = write_outputs(&a, ids, hidden, len, d);
  free(ids);
  free(hidden);
  clip_tokenizer_free(tok);
  clip_text_free(m);
  return status;
}
