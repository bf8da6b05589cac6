/* `denoised train`: trains a UNet2DModel (a fresh one from a config.json, or a model folder to
 * fine-tune) on a .npy of images or an imagefolder with the engine's training step
 * (engine/train/train.h), with checkpoints to resume from, a loss log, and a diffusers model
 * folder at the end (train_out.c). The data and every setting are checked before the first
 * step (train_data.c). */
#include <getopt.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "schedule.h"

static const char help[] =
    "usage: denoised train (--model-config UNET_CONFIG.json | --init MODEL_DIR)\n"
    "                      --data (X.npy [--labels L.npy] | IMAGE_FOLDER) --steps N --batch B\n"
    "                      [--cond C.npy [--regression]] [options] --out MODEL_DIR\n"
    "       denoised train (--model-config UNET_CONFIG.json | --init PIPELINE_DIR)\n"
    "                      --data IMAGES --captions CAPTIONS.txt [--vae DIR]\n"
    "                      [--text-encoder DIR | --text-encoder-config F] [--tokenizer DIR]\n"
    "                      --steps N --batch B [options] --out PIPELINE_DIR\n"
    "       denoised train vae ...   (an AutoencoderKL: 'denoised train vae --help')\n"
    "\n"
    "Trains a UNet2DModel as diffusers' training examples do and writes a diffusers model\n"
    "folder (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json, README.md)\n"
    "with loss.jsonl, loss.png and checkpoint/ (weights, EMA, optimizer state). A\n"
    "UNet2DConditionModel is trained as a text-to-image model (train_text_to_image.py): on the\n"
    "latents of a frozen VAE (its encoder's mean times scaling_factor), with a CLIP text encoder\n"
    "trained jointly (unless frozen); it writes a pipeline folder (model_index.json, unet/,\n"
    "text_encoder/, tokenizer/, vae/, scheduler/) that 'denoised sample --prompt' loads.\n"
    "  --model-config F   a UNet2DModel or UNet2DConditionModel config.json: a fresh model\n"
    "                     (initialised from --seed)\n"
    "  --init DIR         a model or pipeline folder to fine-tune (its scheduler config is kept)\n"
    "  --data X.npy       images [N, C, H, W] in [-1, 1], with --labels L.npy [N] (integers)\n"
    "                     for a class-conditional model\n"
    "  --data FOLDER      PNG files (the model's size and channels) and, for a class-conditional\n"
    "                     model, metadata.jsonl: {\"file_name\": \"a.png\", \"label\": 3 or "
    "\"A\"}\n"
    "  --cond C.npy       conditioning images [N, C', H, W] in [-1, 1], one per --data image,\n"
    "                     for an image-conditioned model (config key \"_cond_channels\": C');\n"
    "                     e.g. the blurry copies of sharp --data images\n"
    "  --regression       train the restoration baseline instead: the model maps each --cond\n"
    "                     image (at t = 0) to its --data image, plain MSE, no noise\n"
    "  --guide-weight W   for a model with structure guidance (config key \"_guide_scales\"):\n"
    "                     the weight of its guide networks' loss, the MSE of their prediction\n"
    "                     of the --data image's grayscale at each scale (default 1)\n"
    "  --captions F       text-to-image: one caption per line, one per --data image (images of\n"
    "                     the VAE's channels and the UNet's sample_size times its factor)\n"
    "  --vae DIR          the frozen VAE (a VAE or pipeline folder; default: --init's)\n"
    "  --text-encoder DIR a CLIPTextModel folder to start from (default: --init's)\n"
    "  --text-encoder-config F  a CLIPTextModel config.json: a fresh text encoder (from --seed)\n"
    "  --tokenizer DIR    its CLIP tokenizer (vocab.json, merges.txt; default: --init's)\n"
    "  --freeze-text-encoder  train the UNet alone\n"
    "  --caption-dropout P  replace a caption by the empty one with probability P (for\n"
    "                     classifier-free guidance; default 0)\n"
    "  --clip-skip N      condition on the text encoder's layer N from the end (default 1)\n"
    "  --encode-every-step  run the VAE encoder on every step's batch instead of encoding the\n"
    "                     data once before the first step (same result, slower; for checking)\n"
    "  --steps N          optimizer steps (required); --batch B images per step (required)\n"
    "  --lr LR            peak learning rate (default 1e-4)\n"
    "  --lr-schedule S    constant, constant_with_warmup or cosine (default cosine)\n"
    "  --warmup N         warm-up steps from 0 (default 0)\n"
    "  --clip G           clip the gradient's global norm at G (default 1; 0: off)\n"
    "  --ema DECAY        keep an EMA of the weights (decay at most DECAY) and write it as\n"
    "                     the model (default 0: off)\n"
    "  --ema-warmup P     EMA decay 1 - (1 + step)^-P (default 0.75);\n"
    "                     0: (1 + step) / (10 + step)\n"
    "  --weight-decay W   AdamW's decoupled weight decay (default 1e-6)\n"
    "  --adam-betas B1,B2 AdamW's betas (default 0.95,0.999)\n"
    "  --prediction-type T  epsilon, v_prediction or sample (default: the scheduler config's)\n"
    "  --min-snr-gamma G  min-SNR-gamma loss weights (default 0: off)\n"
    "  --null-class-dropout P  replace a label by the null class with probability P (for\n"
    "                     classifier-free guidance; default 0)\n"
    "  --scheduler-config F  the training noise schedule (default: --init's, else DDPM's)\n"
    "  --seed S           data order, timesteps, noise, dropout and a fresh init (default 0)\n"
    "  --threads T        CPU threads (default 2; the result does not depend on it)\n"
    "  --checkpoint-every K  write checkpoint/ every K steps (default 500) and at the end\n"
    "  --stop-after K     stop after step K with a checkpoint, as if interrupted\n"
    "                     (SIGINT or SIGTERM also stop after the current step with one)\n"
    "  --resume           continue the run in --out from its checkpoint (same settings)\n"
    "  --quiet            no progress on stderr\n";

enum {
  O_MODEL_CONFIG = 256,
  O_INIT,
  O_LABELS,
  O_LR_SCHED,
  O_PRED,
  O_SCHED,
  O_RESUME,
  O_QUIET,
  O_BETAS,
  O_COND,
  O_REGRESSION,
  O_CAPTIONS,
  O_VAE,
  O_TEXT_ENCODER,
  O_TEXT_CONFIG,
  O_TOKENIZER,
  O_FREEZE_TEXT,
  O_ENCODE_EVERY
};

/* Numeric flags by option code: one table, one range check each. */
static const cli_num_flag num_flags[] = {
    {'n', "--steps", 1, 1, 1e9, offsetof(cli_train_opts, steps)},
    {'b', "--batch", 1, 1, 4096, offsetof(cli_train_opts, batch)},
    {'w', "--warmup", 1, 0, 1e9, offsetof(cli_train_opts, warmup)},
    {'s', "--seed", 1, 0, 9007199254740991.0, offsetof(cli_train_opts, seed)},
    {'j', "--threads", 1, 1, 256, offsetof(cli_train_opts, threads)},
    {'k', "--checkpoint-every", 1, 1, 1e9, offsetof(cli_train_opts, ckpt_every)},
    {'S', "--stop-after", 1, 1, 1e9, offsetof(cli_train_opts, stop_after)},
    {'l', "--lr", 0, 0, 1, offsetof(cli_train_opts, lr)},
    {'c', "--clip", 0, 0, 1e6, offsetof(cli_train_opts, clip)},
    {'e', "--ema", 0, 0, 1, offsetof(cli_train_opts, ema)},
    {'g', "--min-snr-gamma", 0, 0, 1e6, offsetof(cli_train_opts, min_snr)},
    {'p', "--null-class-dropout", 0, 0, 1, offsetof(cli_train_opts, dropout)},
    {'W', "--weight-decay", 0, 0, 1, offsetof(cli_train_opts, weight_decay)},
    {'P', "--ema-warmup", 0, 0, 10, offsetof(cli_train_opts, ema_power)},
    {'G', "--guide-weight", 0, 0, 1e6, offsetof(cli_train_opts, guide_weight)},
    {'D', "--caption-dropout", 0, 0, 1, offsetof(cli_train_opts, caption_dropout)},
    {'K', "--clip-skip", 1, 1, 64, offsetof(cli_train_opts, clip_skip)}};

static int num_flag(int c, const char *arg, cli_train_opts *o) {
  return cli_parse_num_flag("train", num_flags, sizeof num_flags / sizeof num_flags[0], c, arg, o);
}

/* The flags that need another flag or exclude one. */
static int check_args(int argc, char **argv, const cli_train_opts *o) {
  if (optind < argc)
    return cli_usage_error("train", "unexpected argument '%s'", argv[optind]);
  if (!o->model_config == !o->init)
    return cli_usage_error("train", "give one of --model-config UNET_CONFIG.json or --init DIR");
  if (!o->data || !o->out || !o->steps || !o->batch)
    return cli_usage_error("train", "--data, --steps, --batch and --out are required");
  if (train_lr_kind_from_name(o->lr_schedule) < 0)
    return cli_usage_error("train", "--lr-schedule '%s': constant, constant_with_warmup or cosine",
                           o->lr_schedule);
  if (o->prediction && strcmp(o->prediction, "epsilon") && strcmp(o->prediction, "v_prediction") &&
      strcmp(o->prediction, "sample"))
    return cli_usage_error("train", "--prediction-type '%s': epsilon, v_prediction or sample",
                           o->prediction);
  if (o->stop_after && o->stop_after >= o->steps)
    return cli_usage_error("train", "--stop-after must be below --steps");
  if (o->regression && !o->cond)
    return cli_usage_error("train", "--regression needs --cond (the images the model reads)");
  if (o->cond && o->labels)
    return cli_usage_error("train", "--cond and --labels: class labels are not supported with "
                                    "conditioning images");
  if (o->text_encoder && o->text_encoder_config)
    return cli_usage_error("train", "give one of --text-encoder DIR or --text-encoder-config F");
  if (!o->captions && (o->vae || o->text_encoder || o->text_encoder_config || o->tokenizer ||
                       o->freeze_text_encoder || o->caption_dropout > 0 || o->encode_every_step))
    return cli_usage_error("train", "--vae, --text-encoder(-config), --tokenizer, "
                                    "--freeze-text-encoder, --caption-dropout and "
                                    "--encode-every-step go with --captions (a text-to-image "
                                    "model)");
  if (o->captions && (o->labels || o->cond))
    return cli_usage_error("train", "--captions: no --labels or --cond with text conditioning");
  return -1;
}

static int parse_args(int argc, char **argv, cli_train_opts *o) {
  static const struct option opts[] = {{"model-config", required_argument, 0, O_MODEL_CONFIG},
                                       {"init", required_argument, 0, O_INIT},
                                       {"data", required_argument, 0, 'd'},
                                       {"labels", required_argument, 0, O_LABELS},
                                       {"out", required_argument, 0, 'o'},
                                       {"lr-schedule", required_argument, 0, O_LR_SCHED},
                                       {"prediction-type", required_argument, 0, O_PRED},
                                       {"scheduler-config", required_argument, 0, O_SCHED},
                                       {"resume", no_argument, 0, O_RESUME},
                                       {"quiet", no_argument, 0, O_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"warmup", required_argument, 0, 'w'},
                                       {"seed", required_argument, 0, 's'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"checkpoint-every", required_argument, 0, 'k'},
                                       {"stop-after", required_argument, 0, 'S'},
                                       {"lr", required_argument, 0, 'l'},
                                       {"clip", required_argument, 0, 'c'},
                                       {"ema", required_argument, 0, 'e'},
                                       {"min-snr-gamma", required_argument, 0, 'g'},
                                       {"null-class-dropout", required_argument, 0, 'p'},
                                       {"weight-decay", required_argument, 0, 'W'},
                                       {"ema-warmup", required_argument, 0, 'P'},
                                       {"adam-betas", required_argument, 0, O_BETAS},
                                       {"cond", required_argument, 0, O_COND},
                                       {"regression", no_argument, 0, O_REGRESSION},
                                       {"guide-weight", required_argument, 0, 'G'},
                                       {"captions", required_argument, 0, O_CAPTIONS},
                                       {"vae", required_argument, 0, O_VAE},
                                       {"text-encoder", required_argument, 0, O_TEXT_ENCODER},
                                       {"text-encoder-config", required_argument, 0, O_TEXT_CONFIG},
                                       {"tokenizer", required_argument, 0, O_TOKENIZER},
                                       {"freeze-text-encoder", no_argument, 0, O_FREEZE_TEXT},
                                       {"caption-dropout", required_argument, 0, 'D'},
                                       {"clip-skip", required_argument, 0, 'K'},
                                       {"encode-every-step", no_argument, 0, O_ENCODE_EVERY},
                                       {0, 0, 0, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    switch (c) {
    case O_MODEL_CONFIG: o->model_config = optarg; break;
    case O_INIT: o->init = optarg; break;
    case 'd': o->data = optarg; break;
    case O_LABELS: o->labels = optarg; break;
    case 'o': o->out = optarg; break;
    case O_LR_SCHED: o->lr_schedule = optarg; break;
    case O_PRED: o->prediction = optarg; break;
    case O_SCHED: o->sched_file = optarg; break;
    case O_RESUME: o->resume = 1; break;
    case O_QUIET: o->quiet = 1; break;
    case O_COND: o->cond = optarg; break;
    case O_REGRESSION: o->regression = 1; break;
    case O_CAPTIONS: o->captions = optarg; break;
    case O_VAE: o->vae = optarg; break;
    case O_TEXT_ENCODER: o->text_encoder = optarg; break;
    case O_TEXT_CONFIG: o->text_encoder_config = optarg; break;
    case O_TOKENIZER: o->tokenizer = optarg; break;
    case O_FREEZE_TEXT: o->freeze_text_encoder = 1; break;
    case O_ENCODE_EVERY: o->encode_every_step = 1; break;
    case O_BETAS:
      if (cli_parse_list("--adam-betas", optarg, 2, 0, 0.999999, o->betas) != 0)
        return 2;
      break;
    case 'h': fputs(help, stdout); return 0;
    default:
      if (num_flag(c, optarg, o) != 0)
        return 2;
    }
  }
  return check_args(argc, argv, o);
}

/* The config.json of --init (flat or pipeline layout) or --model-config, as JSON. */
static json_t *read_config(const cli_train_opts *o, err *e) {
  char path[4200];
  struct stat sb;
  if (o->model_config)
    snprintf(path, sizeof path, "%s", o->model_config);
  else {
    snprintf(path, sizeof path, "%s/unet/config.json", o->init);
    if (stat(path, &sb) != 0)
      snprintf(path, sizeof path, "%s/config.json", o->init);
  }
  json_error_t je;
  json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!j)
    err_set(e, ERR_FORMAT, "%s:%d: %s", path, je.line, je.text);
  return j;
}

/* The schedule's JSON (--scheduler-config, --init's, else DDPMScheduler's defaults) with the
 * trained prediction type, parsed into sc. */
static int read_schedule(cli_train_run *r, sched_config *sc, err *e) {
  const cli_train_opts *o = r->o;
  const json_t *own = o->init ? model_scheduler_config(r->m) : NULL;
  int rc = ERR_OK;
  if (o->sched_file)
    r->sched = sched_config_read_json(o->sched_file, e);
  else if (own)
    r->sched = json_deep_copy(own);
  else if ((rc = sched_config_init(sc, "DDPMScheduler", e)) == ERR_OK) {
    r->sched = sched_config_to_json_for(sc, "DDPMScheduler");
    json_object_set_new(r->sched, "_class_name", json_string("DDPMScheduler"));
    sched_config_free(sc);
  }
  if (rc || !r->sched)
    return rc ? rc : e->code ? e->code : err_set(e, ERR_NOMEM, "out of memory");
  if (o->prediction)
    json_object_set_new(r->sched, "prediction_type", json_string(o->prediction));
  rc = sched_config_from_json(r->sched, NULL, 0, sc, e);
  if (rc)
    err_prefix(e, "%s", o->sched_file ? o->sched_file : "the scheduler config");
  return rc;
}

/* The settings every run has (recipe). */
static json_t *recipe_base(const cli_train_opts *o, const sched_config *sc) {
  char betas[64];
  snprintf(betas, sizeof betas, "%.10g,%.10g", o->betas[0], o->betas[1]);
  return json_pack("{s:s?, s:s?, s:s, s:s?, s:s?, s:I, s:I, s:f, s:s, s:I, s:f, s:f, s:f, s:f, "
                   "s:s, s:s, s:f, s:f, s:I}",
                   "model_config", o->model_config, "init", o->init, "data", o->data, "labels",
                   o->labels, "scheduler_config", o->sched_file, "steps", (json_int_t)o->steps,
                   "batch", (json_int_t)o->batch, "lr", o->lr, "lr_schedule", o->lr_schedule,
                   "warmup", (json_int_t)o->warmup, "clip", o->clip, "ema", o->ema, "ema_warmup",
                   o->ema_power, "weight_decay", o->weight_decay, "adam_betas", betas,
                   "prediction_type", sched_prediction_name(sc->prediction_type), "min_snr_gamma",
                   o->min_snr, "null_class_dropout", o->dropout, "seed", (json_int_t)o->seed);
}

/* Every setting that changes the result, for state.json, the model card and --resume (the
 * conditioning and guidance keys only when used, so earlier runs' checkpoints still match). */
static json_t *make_recipe(const cli_train_opts *o, const sched_config *sc, double guide_weight) {
  json_t *j = recipe_base(o, sc);
  if (j && o->cond)
    json_object_set_new(j, "cond", json_string(o->cond));
  if (j && o->regression)
    json_object_set_new(j, "regression", json_true());
  if (j && guide_weight >= 0)
    json_object_set_new(j, "guide_weight", json_real(guide_weight));
  if (j && o->captions) {
    json_object_set_new(j, "captions", json_string(o->captions));
    json_object_set_new(j, "caption_dropout", json_real(o->caption_dropout));
    json_object_set_new(j, "clip_skip", json_integer(o->clip_skip));
    const char *keys[] = {"vae", "text_encoder", "text_encoder_config", "tokenizer"};
    const char *vals[] = {o->vae, o->text_encoder, o->text_encoder_config, o->tokenizer};
    for (int i = 0; i < 4; i++)
      if (vals[i])
        json_object_set_new(j, keys[i], json_string(vals[i]));
    if (o->freeze_text_encoder)
      json_object_set_new(j, "freeze_text_encoder", json_true());
  }
  if (j && o->method) {
    json_object_set_new(j, "method", json_string(o->method));
    if (strcmp(o->method, "domainstudio") == 0) {
      json_object_set_new(j, "pair_weight", json_real(o->dstudio.pair));
      json_object_set_new(j, "hf_pair_weight", json_real(o->dstudio.hf_pair));
      json_object_set_new(j, "hf_mse_weight", json_real(o->dstudio.hf_mse));
    }
  }
  return j;
}

/* Model, schedule, data and trainer, every check done before the first step. */
static int setup(cli_train_run *r, err *e) {
  const cli_train_opts *o = r->o;
  int rc = o->init ? model_load(o->init, &r->m, e)
                   : model_init(o->model_config, (uint64_t)o->seed, &r->m, e);
  if (rc)
    return rc;
  if (!(r->config = read_config(o, e)))
    return e->code;
  sched_config sc;
  if ((rc = read_schedule(r, &sc, e)))
    return rc;
  const model_info *mi = model_get_info(r->m);
  if (o->guide_weight >= 0 && !mi->guide_scales) {
    sched_config_free(&sc);
    return err_set(e, ERR_INVALID,
                   "--guide-weight: the model has no structure guidance (config key "
                   "\"_guide_scales\")");
  }
  /* a guided model's default weight; -1 keeps the recipe of unguided runs as it was */
  const double gw = mi->guide_scales ? (o->guide_weight >= 0 ? o->guide_weight : 1.0) : -1;
  train_config tc = {.prediction = sc.prediction_type,
                     .min_snr_gamma = o->min_snr,
                     .null_dropout = o->dropout,
                     .null_class = mi->null_class,
                     .clip_norm = o->clip,
                     .lr_kind = (train_lr_kind)train_lr_kind_from_name(o->lr_schedule),
                     .lr = o->lr,
                     .warmup = (long)o->warmup,
                     .total_steps = (long)o->steps,
                     .adamw = {o->betas[0], o->betas[1], 1e-8, o->weight_decay},
                     .use_ema = o->ema > 0,
                     .ema = {.decay = o->ema,
                             .use_warmup = o->ema_power > 0,
                             .inv_gamma = 1,
                             .power = o->ema_power},
                     .seed = (uint64_t)o->seed,
                     .threads = (int)o->threads,
                     .regression = o->regression,
                     .guide_weight = gw > 0 ? gw : 0};
  cli_train_want want = {mi->in_channels, mi->sample_size, 1};
  if (mi->cross_attention_dim && (rc = cli_train_text_setup(r, &tc, &want, e))) {
    sched_config_free(&sc);
    return rc;
  }
  if (!mi->cross_attention_dim && o->captions) {
    sched_config_free(&sc);
    return err_set(e, ERR_INVALID,
                   "--captions %s: the model is not text-conditional (give a "
                   "UNet2DConditionModel)",
                   o->captions);
  }
  if (o->method && strcmp(o->method, "domainstudio") == 0) {
    /* the frozen source: a second copy of the same folder */
    if ((rc = model_load(o->init, &r->source, e))) {
      sched_config_free(&sc);
      return rc;
    }
    tc.source = r->source;
    tc.dstudio = o->dstudio;
  }
  r->recipe = make_recipe(o, &sc, gw);
  if (!r->recipe)
    rc = err_set(e, ERR_NOMEM, "out of memory");
  /* finetune: whether the method can adapt the model at all before its images are read */
  if (!rc && o->method && (rc = trainer_new(r->m, &sc, &tc, &r->t, e)) != 0)
    err_prefix(e, "--method %s cannot adapt %s", o->method, o->init);
  if (!rc)
    rc = cli_train_data_load(o->data, o->labels, r->m, &want, o->dropout > 0, &r->d, e);
  if (!rc && r->lp)
    rc = cli_train_captions_load(o->captions, latent_tokenizer(r->lp), &r->d, e);
  if (!rc && r->lp && !o->encode_every_step)
    rc = cli_train_latents_cache(r, e);
  if (!rc && o->cond)
    rc = cli_train_cond_load(o->cond, r->m, o->regression, &r->d, e);
  if (!rc && r->source && r->d.n < 3)
    rc = err_set(e, ERR_INVALID,
                 "--images %s: %lld image(s); DomainStudio compares three distinct images per "
                 "step: give at least 3 (the authors use 10)",
                 o->data, (long long)r->d.n);
  if (!rc && !r->t)
    rc = trainer_new(r->m, &sc, &tc, &r->t, e);
  if (!rc && o->regression)
    /* the exported folder says what it is, for `denoised deblur` */
    json_object_set_new(r->config, "_regression", json_true());
  sched_config_free(&sc);
  return rc;
}

/* Set by SIGINT/SIGTERM: the loop finishes its step, writes a checkpoint and stops. */
static volatile sig_atomic_t interrupted;

static void on_signal(int sig) {
  interrupted = sig;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Progress on stderr: a bar redrawn in place on a terminal, else a line every tenth. */
static void progress(const cli_train_opts *o, long done, long first, long total, double loss,
                     double elapsed) {
  static int tty = -1;
  if (o->quiet)
    return;
  if (tty < 0)
    tty = isatty(STDERR_FILENO);
  const double rate = elapsed > 0 ? (double)(done - first) / elapsed : 0;
  const long eta = rate > 0 ? (long)((double)(total - done) / rate + 0.5) : 0;
  const long tenth = total / 10 > 0 ? total / 10 : 1;
  if (!tty && done % tenth && done != total)
    return;
  const int width = 30, bar = (int)(done * width / total);
  fprintf(stderr, "%s[%.*s%*s] %ld/%ld steps, loss %.4f, %.2f steps/s, ETA %ldm%02lds%s",
          tty ? "\r" : "", bar, "##############################", width - bar, "", done, total,
          loss, rate, eta / 60, eta % 60, tty && done != total ? "" : "\n");
}

/* A gathered batch: images, conditioning images, labels, captions, and a text-to-image model's
 * latents. */
typedef struct batch {
  float *x, *cond, *z;
  int64_t *lab, *ids;
} batch;

static void batch_free(batch *bt) {
  free(bt->x), free(bt->cond), free(bt->z), free(bt->lab), free(bt->ids);
}

static int batch_new(const cli_train_run *r, int b, batch *bt, err *e) {
  const size_t per = (size_t)r->d.c * r->d.h * r->d.w, pc = (size_t)r->d.cc * r->d.h * r->d.w;
  const int encode = r->lp && !r->d.latent, f = encode ? latent_get_info(r->lp)->factor : 1;
  const size_t zper = (size_t)model_get_info(r->m)->in_channels * (r->d.h / f) * (r->d.w / f);
  *bt = (batch){malloc((size_t)b * per * sizeof(float)),
                r->d.cond ? malloc((size_t)b * pc * sizeof(float)) : NULL,
                encode ? malloc((size_t)b * zper * sizeof(float)) : NULL,
                malloc((size_t)b * sizeof(int64_t)),
                r->d.ids ? malloc((size_t)b * r->d.len * sizeof(int64_t)) : NULL};
  if (!bt->x || !bt->lab || (r->d.cond && !bt->cond) || (encode && !bt->z) ||
      (r->d.ids && !bt->ids))
    return err_set(e, ERR_NOMEM, "out of memory for a batch");
  return ERR_OK;
}

/* Batch `idx` of the data into bt. */
static void gather(const cli_train_run *r, const int64_t *idx, int b, batch *bt) {
  const size_t per = (size_t)r->d.c * r->d.h * r->d.w, pc = (size_t)r->d.cc * r->d.h * r->d.w;
  const size_t len = (size_t)r->d.len;
  for (int i = 0; i < b; i++) {
    memcpy(bt->x + (size_t)i * per, r->d.x + (size_t)idx[i] * per, per * sizeof *bt->x);
    if (r->d.labels)
      bt->lab[i] = r->d.labels[idx[i]];
    if (bt->cond)
      memcpy(bt->cond + (size_t)i * pc, r->d.cond + (size_t)idx[i] * pc, pc * sizeof *bt->cond);
    if (bt->ids)
      memcpy(bt->ids + i * len, r->d.ids + (size_t)idx[i] * len, len * sizeof *bt->ids);
  }
}

/* One step on the gathered batch: a text-to-image model's on its images' latents (the cached
 * ones, or encoded now with --encode-every-step). */
static int batch_step(cli_train_run *r, batch *bt, int b, train_step_info *info, err *e) {
  if (!r->lp)
    return trainer_step_cond(r->t, bt->x, bt->cond, r->d.labels ? bt->lab : NULL, b, r->d.h, r->d.w,
                             info, e);
  if (r->d.latent)
    return trainer_step_text(r->t, bt->x, bt->ids, b, r->d.h, r->d.w, info, e);
  const int f = latent_get_info(r->lp)->factor;
  int rc = cli_train_latents(r, bt->x, b, bt->z, e);
  return rc ? rc : trainer_step_text(r->t, bt->z, bt->ids, b, r->d.h / f, r->d.w / f, info, e);
}

/* Steps [first, stop) with a log line each and checkpoints as asked. */
static int train_loop(cli_train_run *r, long first, long stop, err *e) {
  const cli_train_opts *o = r->o;
  const int b = (int)o->batch;
  int64_t *idx = malloc((size_t)b * sizeof *idx);
  batch bt;
  int rc = batch_new(r, b, &bt, e);
  if (!rc && !idx)
    rc = err_set(e, ERR_NOMEM, "out of memory for a batch");
  const double t0 = now_s(), wall0 = r->wall;
  double smooth = 0;
  for (long step = first; rc == ERR_OK && step < stop; step++) {
    if ((rc = train_batch_indices((uint64_t)o->seed, step, b, r->d.n, idx, e)))
      break;
    gather(r, idx, b, &bt);
    train_step_info info;
    if ((rc = batch_step(r, &bt, b, &info, e)))
      break;
    if (r->source)
      fprintf(r->log,
              "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"mse\": %.9g, "
              "\"pair\": %.9g, \"hf_pair\": %.9g, \"hf_mse\": %.9g}\n",
              step + 1, info.loss, info.lr, info.grad_norm, info.terms.mse, info.terms.pair,
              info.terms.hf_pair, info.terms.hf_mse);
    else if (model_get_info(r->m)->guide_scales)
      fprintf(
          r->log,
          "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"guide\": %.9g}\n",
          step + 1, info.loss, info.lr, info.grad_norm, info.guide_loss);
    else
      fprintf(r->log, "{\"step\": %ld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g}\n",
              step + 1, info.loss, info.lr, info.grad_norm);
    fflush(r->log);
    smooth = step == first ? info.loss : 0.9 * smooth + 0.1 * info.loss;
    r->wall = wall0 + (now_s() - t0);
    progress(o, step + 1, first, (long)o->steps, smooth, now_s() - t0);
    if ((step + 1) % o->ckpt_every == 0 && step + 1 < stop && !interrupted)
      rc = cli_train_checkpoint_save(r, e);
    if (interrupted)
      break; /* run() writes the checkpoint */
  }
  batch_free(&bt);
  free(idx);
  return rc;
}

static int run(cli_train_run *r, err *e) {
  const cli_train_opts *o = r->o;
  char path[4200];
  struct stat sb;
  snprintf(path, sizeof path, "%s/checkpoint/state.json", o->out);
  const int have = stat(path, &sb) == 0;
  if (have && !o->resume)
    return err_set(e, ERR_INVALID,
                   "%s holds a training run already (checkpoint/): add --resume "
                   "to continue it, or choose another --out",
                   o->out);
  if (!have && o->resume)
    return err_set(e, ERR_INVALID, "--resume: %s has no checkpoint", path);
  int rc = setup(r, e); /* every check before anything is written */
  if (!rc && mkdir(o->out, 0777) != 0 && (stat(o->out, &sb) != 0 || !S_ISDIR(sb.st_mode)))
    rc = err_set(e, ERR_IO, "--out %s: cannot create the folder", o->out);
  if (!rc && o->resume)
    rc = cli_train_checkpoint_load(r, e);
  if (!rc)
    rc = cli_train_log_open(r, trainer_steps(r->t), e);
  const long stop = (long)(o->stop_after ? o->stop_after : o->steps);
  if (!rc && trainer_steps(r->t) < stop) {
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    rc = train_loop(r, trainer_steps(r->t), stop, e);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
  }
  if (!rc)
    rc = cli_train_checkpoint_save(r, e);
  if (!rc && trainer_steps(r->t) == o->steps)
    rc = cli_train_export(r, e);
  return rc;
}

/* One run of the options (train or finetune, cmd names it in messages) and its exit status. */
static int execute(const char *cmd, cli_train_opts *o) {
  cli_train_run r = {.o = o};
  err e = {0};
  int status = 0;
  int rc = run(&r, &e);
  char *flag = o->method ? strstr(e.msg, "--data ") : NULL;
  if (rc && flag) /* finetune calls the data folder --images */
    status = cli_fail(cmd, "%.*s--images %s", (int)(flag - e.msg), e.msg, flag + 7);
  else if (rc)
    status = cli_fail(cmd, "%s", e.msg);
  else if (interrupted)
    fprintf(stderr,
            "%sdenoised %s: interrupted after step %ld of %lld (checkpoint written); "
            "continue with --resume\n",
            isatty(STDERR_FILENO) ? "\n" : "", cmd, trainer_steps(r.t), o->steps);
  else if (o->stop_after)
    printf("stopped after step %ld of %lld (%.1f s); continue with --resume\n", trainer_steps(r.t),
           o->steps, r.wall);
  else
    printf("%s %lld steps of batch %lld in %.1f s; wrote %s\n",
           o->method ? "fine-tuned" : "trained", o->steps, o->batch, r.wall, o->out);
  status = rc ? status : interrupted ? 128 + interrupted : 0;
  if (r.log)
    fclose(r.log);
  trainer_free(r.t);
  cli_train_data_free(&r.d);
  model_free(r.m);
  model_free(r.source);
  latent_parts_free(r.lp);
  free(r.empty_ids);
  json_decref(r.config), json_decref(r.sched), json_decref(r.recipe), json_decref(r.text_config);
  return status;
}

int cmd_train(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "vae") == 0)
    return cmd_train_vae(argc - 1, argv + 1);
  cli_train_opts o = {.lr = 1e-4,
                      .guide_weight = -1,
                      .lr_schedule = "cosine",
                      .clip = 1,
                      .weight_decay = 1e-6,
                      .ema_power = 0.75,
                      .betas = {0.95, 0.999},
                      .threads = 2,
                      .ckpt_every = 500,
                      .clip_skip = 1};
  int status = parse_args(argc, argv, &o);
  if (status >= 0)
    return status;
  return execute("train", &o);
}

static const char finetune_help[] =
    "usage: denoised finetune --init MODEL_DIR --images DIR --method domainstudio|plain\n"
    "                         --steps N [options] --out NEW_MODEL_DIR\n"
    "\n"
    "Adapts a UNet2DModel to a few images (the authors use 10) and writes a diffusers model "
    "folder\n"
    "that 'denoised sample --model' loads (with loss.jsonl, loss.png, README.md, checkpoint/).\n"
    "  domainstudio  DomainStudio (Zhu et al.): the denoising loss plus relative-distance\n"
    "                preservation against a frozen copy of --init (pairwise similarity\n"
    "                distributions of three batch items, KL), its Haar high-frequency version,\n"
    "                and a high-frequency MSE to the images, weighted as the authors' recipe\n"
    "  plain         the denoising loss alone (plain fine-tuning), same settings otherwise\n"
    "  --images DIR       PNG files of the model's size and channels; for a class-conditional\n"
    "                     model, metadata.jsonl: {\"file_name\": \"a.png\", \"label\": \"A\" or "
    "10}\n"
    "  --steps N          optimizer steps (required)\n"
    "  --batch B          images per step (default 3, the authors' per-GPU batch; >= 3 for\n"
    "                     domainstudio)\n"
    "  --lr LR            constant learning rate (default 1e-4, the authors')\n"
    "  --pair-weight W    relative-distance weight (default 4)\n"
    "  --hf-pair-weight W high-frequency relative-distance weight (default 4)\n"
    "  --hf-mse-weight W  high-frequency MSE weight (default 1; the authors' code drops both hf\n"
    "                     terms for a model without learned variance: 0 and 0 reproduce that)\n"
    "  --seed S           data order, timesteps, noise and the three items (default 0)\n"
    "  --threads T        CPU threads (default 2; the result does not depend on it)\n"
    "  --quiet            no progress on stderr\n"
    "Adam without weight decay, no gradient clipping, no EMA, as the authors' TrainLoop.\n";

enum { O_FT_IMAGES = 300, O_FT_METHOD, O_FT_PAIR, O_FT_HF_PAIR, O_FT_HF_MSE };

static int finetune_args(int argc, char **argv, cli_train_opts *o) {
  static const struct option opts[] = {{"init", required_argument, 0, O_INIT},
                                       {"images", required_argument, 0, O_FT_IMAGES},
                                       {"method", required_argument, 0, O_FT_METHOD},
                                       {"out", required_argument, 0, 'o'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"seed", required_argument, 0, 's'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"lr", required_argument, 0, 'l'},
                                       {"pair-weight", required_argument, 0, O_FT_PAIR},
                                       {"hf-pair-weight", required_argument, 0, O_FT_HF_PAIR},
                                       {"hf-mse-weight", required_argument, 0, O_FT_HF_MSE},
                                       {"quiet", no_argument, 0, O_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
    double *w = c == O_FT_PAIR      ? &o->dstudio.pair
                : c == O_FT_HF_PAIR ? &o->dstudio.hf_pair
                : c == O_FT_HF_MSE  ? &o->dstudio.hf_mse
                                    : NULL;
    if (w) {
      if (cli_parse_double(c == O_FT_PAIR      ? "--pair-weight"
                           : c == O_FT_HF_PAIR ? "--hf-pair-weight"
                                               : "--hf-mse-weight",
                           optarg, 0, 1e6, w) != 0)
        return 2;
      continue;
    }
    switch (c) {
    case O_INIT: o->init = optarg; break;
    case O_FT_IMAGES: o->data = optarg; break;
    case O_FT_METHOD: o->method = optarg; break;
    case 'o': o->out = optarg; break;
    case O_QUIET: o->quiet = 1; break;
    case 'h': fputs(finetune_help, stdout); return 0;
    case 'n':
    case 'b':
    case 's':
    case 'j':
    case 'l':
      if (num_flag(c, optarg, o) != 0)
        return 2;
      break;
    default: return cli_usage_error("finetune", "unknown option (see --help)");
    }
  }
  if (optind < argc)
    return cli_usage_error("finetune", "unexpected argument '%s'", argv[optind]);
  if (!o->init || !o->data || !o->method || !o->steps || !o->out)
    return cli_usage_error("finetune",
                           "--init, --images, --method, --steps and --out are required");
  if (strcmp(o->method, "domainstudio") != 0 && strcmp(o->method, "plain") != 0)
    return cli_usage_error("finetune", "--method '%s': domainstudio or plain", o->method);
  if (strcmp(o->method, "domainstudio") == 0 && o->batch < 3)
    return cli_usage_error("finetune",
                           "--batch %lld: DomainStudio compares three distinct images of a batch "
                           "(--batch 3 or more)",
                           o->batch);
  return -1;
}

int cmd_finetune(int argc, char **argv) {
  /* the authors' recipe: Adam at a constant 1e-4, batch 3, no weight decay, clipping or EMA */
  cli_train_opts o = {
      .lr = DSTUDIO_RECIPE_LR,
      .guide_weight = -1,
      .lr_schedule = "constant",
      .batch = DSTUDIO_RECIPE_BATCH,
      .betas = {DSTUDIO_RECIPE_BETA1, DSTUDIO_RECIPE_BETA2},
      .threads = 2,
      .dstudio = {DSTUDIO_RECIPE_PAIR, DSTUDIO_RECIPE_HF_PAIR, DSTUDIO_RECIPE_HF_MSE}};
  int status = finetune_args(argc, argv, &o);
  if (status >= 0)
    return status;
  o.ckpt_every = o.steps;
  return execute("finetune", &o);
}
