/* Shared pieces of the `denoised` command line: strict number parsing and the
 * subcommand entry points. Each subcommand prints its own --help. */
#ifndef DENOISED_CLI_H
#define DENOISED_CLI_H

#include <jansson.h>
#include <stdint.h>
#include <time.h>

#include "classifier.h"
#include "err.h"
#include "latent.h"
#include "model.h"
#include "pipeline.h"
#include "sampler.h"
#include "train.h"
#include "vae.h"

/* Parse a whole string as an integer in [min, max]; on failure print an error
 * naming `flag` to stderr and return -1. */
int cli_parse_int(const char *flag, const char *s, long long min, long long max, long long *out);
int cli_parse_double(const char *flag, const char *s, double min, double max, double *out);
/* --size S (a square) or WxH (width first, as A1111 writes sizes), each side in [1, max]. */
int cli_parse_size(const char *flag, const char *s, long long max, long long *width,
                   long long *height);
/* --precision fp32|bf16 (model_precision_parse); -1 with the message printed. */
int cli_parse_precision(const char *s, model_precision *out);
/* model_load, then model_set_precision; 0, or 1 with the error printed for cmd. */
int cli_load_model(const char *cmd, const char *dir, model_precision p, model **out);

/* Prints "denoised <cmd>: <msg>" to stderr; returns exit status 1 (2 for usage). */
int cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- shared by the generation and editing commands (cli_io.c) ---- */

#define CLI_MAX_OVERRIDES 64

/* A whole file into memory, refused past max_bytes; *data malloc'ed. flag names the option. */
int cli_read_file(const char *flag, const char *path, size_t max_bytes, uint8_t **data, size_t *len,
                  err *e);
/* An input image for a model of c channels sampling h x w: a PNG (decoded under that size) or a
 * .npy [C, H, W] / [1, C, H, W] of finite values. *out: malloc'ed c * h * w floats in [-1, 1]. */
int cli_read_image(const char *flag, const char *path, int c, int h, int w, float **out, err *e);
/* Like cli_read_image, but a .npy may also hold a batch [B, C, H, W] (B <= max_batch). */
int cli_read_images(const char *flag, const char *path, int c, int h, int w, int max_batch,
                    int *batch, float **out, err *e);
/* "C" or "C1,C2,..." (one per image) into batch labels in [0, num_classes); prints an error
 * naming flag. */
int cli_parse_labels(const char *flag, const char *s, int batch, const model *m, int64_t *out);

/* The model folder commands use without --model: the default model, beside an installed binary
 * or in the source tree (config_default_model_path). */
const char *cli_default_model(void);
/* What an image records for a model folder: the default model by its name ("glyphs32"), never
 * a path of this machine; other folders as given. */
const char *cli_model_record(const char *dir);
/* A recorded model back to a folder: the default model's name is its folder here. */
const char *cli_model_from_record(const char *rec);
/* An inpainting mask (white: generate, black: keep): a PNG, or a .npy [H, W] of values in
 * [0, 1]. *out: malloc'ed h * w floats. */
int cli_read_mask(const char *flag, const char *path, int h, int w, float **out, err *e);

/* The progress bar the commands draw on a terminal's stderr. */
typedef struct cli_progress {
  int tty;
  time_t start;
} cli_progress;
void cli_progress_init(cli_progress *p, int quiet);
void cli_on_progress(int step, int total, int nfe, void *user);

/* pipeline_progress to the bar (progress_user: a cli_progress). */
void cli_on_pipeline_progress(const pipeline_progress *p, void *user);

/* The solver flags as the pipeline's solver: name, steps (0: the default), a
 * --scheduler-config file read into config (or NULL) and KEY=VALUE --scheduler-opt into
 * options. Owns its JSON: cli_solver_clear. */
typedef struct cli_solver {
  pipeline_solver s;
  json_t *config, *options;
} cli_solver;
int cli_solver_from_flags(const char *name, long long steps, const char *sched_file,
                          const char *const *overrides, int noverrides, cli_solver *out, err *e);
void cli_solver_clear(cli_solver *s);
/* pipeline_sampler with its errors in the words of the flags (--scheduler, --steps,
 * --scheduler-opt KEY, the config file). */
int cli_solver_check(const model *m, const cli_solver *s, const char *sched_file, err *e);
/* The same, keeping the sampler (*out, sampler_free) on success. */
int cli_solver_make(const model *m, const cli_solver *s, const char *sched_file, sampler **out,
                    err *e);
/* Parameter gradients (one buffer per model_param) as an F32 safetensors file under the
 * parameters' diffusers names. */
int cli_write_param_grads(const char *path, const model *m, const model_grads *g, err *e);
/* Copies a file (ERR_IO naming the path). */
int cli_copy_file(const char *from, const char *to, err *e);
/* OUT/model_index.json of a Stable-Diffusion pipeline folder (unet/, vae/, text_encoder/,
 * tokenizer/, scheduler/), naming each part's class as diffusers' loader expects. */
int cli_write_pipeline_index(const char *out, const char *scheduler_class, err *e);

/* Bytes to an output path: "-" is standard output (refused when it is a terminal); a new or
 * regular file is replaced atomically (image_file_write); anything else that exists (a symlink,
 * /dev/stdout, a pipe) is opened and written through, never replaced; a directory is an error. */
int cli_write_out(const char *path, const uint8_t *data, size_t len, err *e);

/* The images of a finished run as PNGs with their metadata: base for one image, base-<i>.png
 * (before the extension) for a batch; only >= 0 writes that image alone, to base (a replay).
 * model_name is what --replay loads. */
int cli_write_pngs(const char *base, const model *m, const pipeline_request *r,
                   const pipeline_result *res, const char *model_name, const json_t *extra,
                   int only, err *e);

/* "a,b[,c]" into n doubles (n = count) each in [lo, hi]; prints an error naming flag. */
int cli_parse_list(const char *flag, const char *s, int count, double lo, double hi, double *out);

/* A numeric flag by option code: its name, integer or not, range, and the offset in a command's
 * options struct of the long long or double it sets. One table per command, one range check. */
typedef struct cli_num_flag {
  int c;
  const char *flag;
  int is_int;
  double lo, hi;
  size_t off;
} cli_num_flag;

/* Parses arg for option code c per table[0..n) into opts; an unknown code is a usage error of
 * cmd. 0 on success, else nonzero with the error printed. */
int cli_parse_num_flag(const char *cmd, const cli_num_flag *table, size_t n, int c, const char *arg,
                       void *opts);

/* ---- `denoised train` (cmd_train.c, train_data.c, train_out.c) ---- */

/* The training images in memory, checked against the model. */
typedef struct cli_train_data {
  int64_t n;
  int c, h, w;
  float *x;        /* n * c * h * w values in [-1, 1] */
  int64_t *labels; /* n labels, or NULL (unconditional model) */
  float *cond;     /* n * cc * h * w conditioning images in [-1, 1] (--cond), or NULL */
  int cc;
  int64_t *ids; /* n captions of len token ids (--captions), or NULL */
  int len;
  /* x holds a text-to-image run's latents [n][c][h][w] (cli_train_latents_cache: the images
   * encoded once), no longer the images */
  int latent;
  char desc[1400]; /* what they are, for the model card */
} cli_train_data;
/* A path as the model card shows it: an absolute one by its last two parts (the folder it was
 * trained from is of no use to a reader, and may be a temporary one), others as given. */
const char *cli_train_shown_path(const char *path);
/* The images the data must hold: channels and (0: any) square size, the model's sample_size
 * times factor (a latent model's VAE factor; 1 for a model of images). */
typedef struct cli_train_want {
  int c, size, factor;
} cli_train_want;
/* --data (a .npy [N, C, H, W], or an imagefolder: PNGs + metadata.jsonl) of images shaped as
 * `want`, and --labels (a .npy [N] for the .npy); dropout: labels will be dropped to the null
 * class, which they may then not use. Errors name the file, line or key. */
int cli_train_data_load(const char *data, const char *labels, const model *m,
                        const cli_train_want *want, int dropout, cli_train_data *d, err *e);
/* --captions: a UTF-8 text file of one caption per line, one per --data image (a .npy's order,
 * a folder's sorted names), tokenized into d->ids. */
struct clip_tokenizer;
int cli_train_captions_load(const char *path, const struct clip_tokenizer *tok, cli_train_data *d,
                            err *e);
void cli_train_data_free(cli_train_data *d);
/* --data for a network without labels (an AutoencoderKL): square images with `channels`
 * channels, any size, from a .npy or a folder of PNGs (metadata.jsonl ignored). */
int cli_train_images_load(const char *data, int channels, cli_train_data *d, err *e);
/* --cond: a .npy [N, C, H, W] of conditioning images in [-1, 1], one per image of d, with the
 * model's cond_channels (for a regression model: its in_channels, the images it reads). */
int cli_train_cond_load(const char *path, const model *m, int regression, cli_train_data *d,
                        err *e);

/* The flags of `denoised train`. */
typedef struct cli_train_opts {
  const char *model_config, *init, *data, *labels, *out, *sched_file, *lr_schedule, *prediction;
  const char *cond;    /* --cond: conditioning (degraded) images */
  int regression;      /* --regression: the restoration baseline */
  double guide_weight; /* --guide-weight: structure guidance's auxiliary loss; < 0: default */
  long long steps, batch, warmup, seed, threads, ckpt_every, stop_after;
  double lr, clip, ema, ema_power, min_snr, dropout, weight_decay, betas[2];
  int resume, quiet;
  /* `denoised finetune`: "domainstudio" (a frozen copy of --init as the source, these loss
   * weights) or "plain"; NULL for `denoised train`. */
  const char *method;
  dstudio_weights dstudio;
  /* A text-to-image model (UNet2DConditionModel): captions, the frozen VAE whose latents it
   * learns, the text encoder (a folder, or a config for a fresh one) and its tokenizer. */
  const char *captions, *vae, *text_encoder, *text_encoder_config, *tokenizer;
  double caption_dropout;
  long long clip_skip;
  int freeze_text_encoder;
  int encode_every_step; /* --encode-every-step: no latent cache (same result, for checking) */
} cli_train_opts;

/* One training run: what it trains, on what, and what it has written. */
typedef struct cli_train_run {
  const cli_train_opts *o;
  model *m;
  model *source; /* DomainStudio's frozen source, or NULL */
  /* A text-to-image model's VAE, tokenizer and text encoder (the trainer's), NULL otherwise;
   * the folders they came from, the text encoder's config.json, the empty caption */
  latent_parts *lp;
  char vae_dir[4400], tokenizer_dir[4400];
  json_t *text_config;
  train_text text;
  int64_t *empty_ids;
  trainer *t;
  cli_train_data d;
  json_t *config, *sched; /* config.json and scheduler_config.json to write */
  json_t *recipe;         /* every setting that changes the result */
  double wall;            /* seconds spent training, over every resumed part */
  FILE *log;              /* OUT/loss.jsonl */
} cli_train_run;

/* A text-to-image run's VAE, tokenizer and text encoder (from the flags or --init), checked
 * against the UNet: sets tc->text and the images the data must hold. */
int cli_train_text_setup(cli_train_run *r, train_config *tc, cli_train_want *want, err *e);
/* The latents of n images of the data's size, as the UNet learns them. */
int cli_train_latents(const cli_train_run *r, const float *images, int n, float *z, err *e);
/* Replaces the data's images by their latents (cli_train_latents of every image, once), so a
 * step no longer runs the frozen encoder on its batch: the latent is the posterior mean, a
 * function of the image alone, so every step sees the same values as when it encoded its own
 * batch. Sets r->d.latent. */
int cli_train_latents_cache(cli_train_run *r, err *e);

/* OUT/checkpoint/: weights, EMA and AdamW moments (one safetensors file) and state.json (step,
 * recipe, wall time). Load refuses a checkpoint of another recipe, naming the setting. */
int cli_train_checkpoint_save(cli_train_run *r, err *e);
int cli_train_checkpoint_load(cli_train_run *r, err *e);
/* OUT/loss.jsonl, keeping the lines of the first `keep` steps (a resumed run's). */
int cli_train_log_open(cli_train_run *r, long keep, err *e);
/* The diffusers folder in OUT: config.json, diffusion_pytorch_model.safetensors (the EMA when
 * on), scheduler_config.json, README.md (the model card) and loss.png from loss.jsonl. */
int cli_train_export(cli_train_run *r, err *e);

int cmd_train(int argc, char **argv);
/* `denoised train vae` (cmd_train_vae.c): trains an AutoencoderKL. */
int cmd_train_vae(int argc, char **argv);
/* `denoised finetune` (cmd_train.c): few-shot adaptation of a model folder, DomainStudio or
 * plain, with the authors' recipe as defaults. */
int cmd_finetune(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_vae(int argc, char **argv);
/* A safetensors file (F32) of every parameter of v under its diffusers name: data[i] for
 * tensor i (gradients), or the weights themselves when data is NULL (cmd_vae.c). */
int cli_vae_write(const char *path, const vae *v, float *const *data, err *e);
int cmd_convert(int argc, char **argv);
int cmd_classify(int argc, char **argv);
int cmd_encode_text(int argc, char **argv);
int cmd_adjoint(int argc, char **argv);
int cmd_audit(int argc, char **argv);
int cmd_concept(int argc, char **argv);
int cmd_stylize(int argc, char **argv);
int cmd_sample(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_bench_solvers(int argc, char **argv);
int cmd_invert(int argc, char **argv);
int cmd_edit(int argc, char **argv);
int cmd_boundary(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_deblur(int argc, char **argv);
int cmd_ot(int argc, char **argv);
int cmd_search(int argc, char **argv);

/* ---- data points for solver data computed from a model (cmd_stats.c; stats and ot fit) ---- */
/* What the data points are: the class of each and the guidance. */
typedef struct cli_data_cond {
  int64_t *labels; /* n, or NULL for an unconditional model; owned */
  int one_class;
  int64_t class_label;
  guidance g;
  int guided;
} cli_data_cond;
/* --class and --guidance-scale against the model: one class for every data point, or the
 * classes in turn (the null class left out: nobody samples it); status 2 on a usage error. */
int cli_data_condition(const char *cmd, const char *class_s, int has_guidance, double scale,
                       const model *m, int n, cli_data_cond *c);
/* The n data points: the first n of the .npy `data`, or (data NULL) the model's own 50-step
 * DPM-Solver++(2M) samples of the same classes and guidance. */
int cli_data_points(const char *data, long long seed, int threads, const model *m,
                    const cli_data_cond *c, int n, float *x, err *e);
/* The getopt loop of those commands ("o:h" plus opts; set handles every other option, non-zero
 * after printing a usage error): 0 after --help, 2 on a usage error, -1 to go on. */
struct option;
int cli_data_getopt(const char *cmd, int argc, char **argv, const struct option *opts,
                    const char *help, int (*set)(int c, const char *arg, void *a), void *a);
/* The flags those commands share: --model, --out, --class, --guidance-scale, --quiet. */
typedef struct cli_data_flags {
  const char *model_dir, *out, *class_s;
  double guidance;
  int has_guidance, quiet;
} cli_data_flags;
/* An integer flag of a command's table: option letter, name, range, offset in its args. */
typedef struct cli_int_flag {
  int c;
  const char *flag;
  long long lo, hi;
  size_t off;
} cli_int_flag;
/* Sets option c: one of the shared flags (f), one of the table's (into args), else a usage
 * error for an unknown option; 0 or non-zero after printing the error; 1 for "not mine" when
 * c is none of them and unknown_ok is set. */
int cli_data_flag(const char *cmd, cli_data_flags *f, const cli_int_flag *tab, size_t ntab,
                  void *args, int c, const char *arg, int unknown_ok);
/* -1 when --out is a valid solver data name or a file, else 2 after the usage error. */
int cli_data_out_ok(const char *cmd, const char *out);
/* --out as a file: a name becomes MODEL/solver_data/NAME.json, the folder made if missing. */
int cli_data_out_path(const char *model_dir, const char *out, char *path, size_t n, err *e);
int cmd_info(int argc, char **argv);

/* ---- shared by concept, stylize and audit (adjtask_args.c) ---- */

/* The flags those commands share: --model, --classifier, --scheduler, --guidance-scale, --seed,
 * --threads, --quiet; their getopt_long entries are CLI_ADJ_OPTIONS. */
typedef struct cli_adj_flags {
  const char *model_dir, *clf_dir, *scheduler;
  long long seed, threads;
  double guidance;
  int has_guidance, quiet;
} cli_adj_flags;
/* clang-format off */
#define CLI_ADJ_OPTIONS                                                                            \
  {"model", required_argument, 0, 'm'}, {"classifier", required_argument, 0, 'c'},                \
  {"scheduler", required_argument, 0, 'S'}, {"guidance-scale", required_argument, 0, 'g'},        \
  {"seed", required_argument, 0, 's'}, {"threads", required_argument, 0, 'j'},                    \
  {"quiet", no_argument, 0, 'q'}
/* clang-format on */
/* Sets option c when it is one of them: 1, or 2 after printing a bad value's error; 0 when c is
 * not one of them. */
int cli_adj_flag(cli_adj_flags *f, int c, const char *arg);
/* The classifier's folder: --classifier, else MODEL/classifier. */
void cli_adj_classifier_dir(const cli_adj_flags *f, char *dir, size_t n);
/* The classifier loaded from it (errors prefixed --classifier). */
int cli_adj_classifier(const cli_adj_flags *f, classifier **clf, err *e);
/* --guidance-scale, else the model's recommended scale, else 1, checked against the model. */
int cli_adj_guidance(const cli_adj_flags *f, const model *m, guidance *gd, err *e);
/* The solver: --scheduler, else (when rec) the model's recommended one, else dpm++2m, with
 * steps inference steps; its name into name (if set). */
int cli_adj_solver(const cli_adj_flags *f, const model *m, int rec, long long steps, char *name,
                   size_t n, sampler **s, err *e);

#endif
