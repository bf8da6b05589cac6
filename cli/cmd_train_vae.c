/* `denoised train vae`: trains an AutoencoderKL (a fresh one from a config.json, or a VAE
 * folder to continue) on images with the engine's VAE training step (engine/train/
 * vae_train.h), and writes a diffusers AutoencoderKL folder that `denoised vae` and diffusers
 * load: config.json with scaling_factor = 1 / std of the latents (LDM's rule), the weights, and
 * loss.jsonl. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli.h"
#include "vae_train.h"

static const char help[] =
    "usage: denoised train vae (--model-config VAE_CONFIG.json | --init VAE_DIR)\n"
    "                          --data (X.npy | IMAGE_FOLDER) --steps N --batch B [options]\n"
    "                          --out VAE_DIR\n"
    "\n"
    "Trains a diffusers AutoencoderKL as latent diffusion's KL autoencoders are trained, without\n"
    "their perceptual (LPIPS) and GAN terms: the reconstruction of a posterior sample plus a\n"
    "weighted KL to N(0, 1), loss = sum |x - decode(z)| / B + kl_weight * KL / B. Writes\n"
    "config.json (scaling_factor = 1 / std of the latents of the first --scale-images images,\n"
    "as LDM sets it), diffusion_pytorch_model.safetensors and loss.jsonl into VAE_DIR.\n"
    "  --model-config F   an AutoencoderKL config.json: a fresh model (initialised from --seed)\n"
    "  --init DIR         a VAE folder to continue training\n"
    "  --data X.npy       images [N, C, H, W] in [-1, 1] (square; sides multiples of the VAE's\n"
    "                     factor); --data FOLDER: PNG files of one size\n"
    "  --steps N, --batch B   optimizer steps and images per step (required)\n"
    "  --recon l1|mse     reconstruction term (default l1, LDM's)\n"
    "  --kl-weight W      weight of the KL term (default 1e-6, LDM's KL autoencoders')\n"
    "  --lr LR            peak learning rate (default 4e-4)\n"
    "  --lr-schedule S    constant, constant_with_warmup or cosine (default cosine)\n"
    "  --warmup N         warm-up steps (default 0)\n"
    "  --clip G           clip the gradient's global norm at G (default 0: off)\n"
    "  --adam-betas B1,B2 (default 0.5,0.9, LDM's autoencoder optimizer)\n"
    "  --weight-decay W   AdamW's decoupled weight decay (default 0)\n"
    "  --scale-images K   images whose latents set scaling_factor (default 1024)\n"
    "  --checkpoint-every K  write the folder every K steps too (default 500)\n"
    "  --seed S           data order, posterior noise and a fresh init (default 0)\n"
    "  --threads T        CPU threads (default 2; the result does not depend on it)\n"
    "  --quiet            no progress on stderr\n";

typedef struct vae_train_opts {
  const char *model_config, *init, *data, *out, *lr_schedule, *recon;
  long long steps, batch, warmup, seed, threads, scale_images, ckpt_every;
  double lr, kl_weight, clip, weight_decay, betas[2];
  int quiet;
} vae_train_opts;

enum { O_MODEL_CONFIG = 256, O_INIT, O_LR_SCHED, O_RECON, O_KL, O_BETAS, O_SCALE, O_QUIET };

/* Numeric flags by option code (cli_parse_num_flag's table). */
static const cli_num_flag num_flags[] = {
    {'n', "--steps", 1, 1, 1e9, offsetof(vae_train_opts, steps)},
    {'b', "--batch", 1, 1, 4096, offsetof(vae_train_opts, batch)},
    {'w', "--warmup", 1, 0, 1e9, offsetof(vae_train_opts, warmup)},
    {'s', "--seed", 1, 0, 9007199254740991.0, offsetof(vae_train_opts, seed)},
    {'j', "--threads", 1, 1, 256, offsetof(vae_train_opts, threads)},
    {'k', "--checkpoint-every", 1, 1, 1e9, offsetof(vae_train_opts, ckpt_every)},
    {O_SCALE, "--scale-images", 1, 1, 1 << 20, offsetof(vae_train_opts, scale_images)},
    {'l', "--lr", 0, 0, 1, offsetof(vae_train_opts, lr)},
    {O_KL, "--kl-weight", 0, 0, 1e6, offsetof(vae_train_opts, kl_weight)},
    {'c', "--clip", 0, 0, 1e9, offsetof(vae_train_opts, clip)},
    {'W', "--weight-decay", 0, 0, 1, offsetof(vae_train_opts, weight_decay)}};

static int parse_num(int c, const char *arg, vae_train_opts *o) {
  if (c == O_BETAS)
    return cli_parse_list("--adam-betas", arg, 2, 0, 0.999999, o->betas);
  return cli_parse_num_flag("train vae", num_flags, sizeof num_flags / sizeof num_flags[0], c, arg,
                            o);
}

/* Returns -1 to go on, else the exit status (0 after --help). */
static int parse_args(int argc, char **argv, vae_train_opts *o) {
  static const struct option opts[] = {{"model-config", required_argument, 0, O_MODEL_CONFIG},
                                       {"init", required_argument, 0, O_INIT},
                                       {"data", required_argument, 0, 'd'},
                                       {"out", required_argument, 0, 'o'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"lr", required_argument, 0, 'l'},
                                       {"lr-schedule", required_argument, 0, O_LR_SCHED},
                                       {"warmup", required_argument, 0, 'w'},
                                       {"recon", required_argument, 0, O_RECON},
                                       {"kl-weight", required_argument, 0, O_KL},
                                       {"clip", required_argument, 0, 'c'},
                                       {"adam-betas", required_argument, 0, O_BETAS},
                                       {"weight-decay", required_argument, 0, 'W'},
                                       {"scale-images", required_argument, 0, O_SCALE},
                                       {"checkpoint-every", required_argument, 0, 'k'},
                                       {"seed", required_argument, 0, 's'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"quiet", no_argument, 0, O_QUIET},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "train vae";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "d:o:n:b:l:w:c:W:k:s:j:h", opts, NULL)) != -1) {
    switch (c) {
    case O_MODEL_CONFIG: o->model_config = optarg; break;
    case O_INIT: o->init = optarg; break;
    case 'd': o->data = optarg; break;
    case 'o': o->out = optarg; break;
    case O_LR_SCHED: o->lr_schedule = optarg; break;
    case O_RECON: o->recon = optarg; break;
    case O_QUIET: o->quiet = 1; break;
    case 'h': fputs(help, stdout); return 0;
    case '?': return 2;
    default:
      if (parse_num(c, optarg, o))
        return 2;
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (!o->model_config == !o->init)
    return cli_usage_error(cmd, "give one of --model-config VAE_CONFIG.json or --init VAE_DIR");
  if (!o->data || !o->out || !o->steps || !o->batch)
    return cli_usage_error(cmd, "--data, --steps, --batch and --out are required");
  if (train_lr_kind_from_name(o->lr_schedule) < 0)
    return cli_usage_error(cmd, "--lr-schedule '%s': constant, constant_with_warmup or cosine",
                           o->lr_schedule);
  if (strcmp(o->recon, "l1") != 0 && strcmp(o->recon, "mse") != 0)
    return cli_usage_error(cmd, "--recon '%s': l1 or mse", o->recon);
  return -1;
}

/* The config to train from and to write (with scaling_factor replaced): --model-config's, or
 * --init's config.json (a VAE folder, or a pipeline's vae/). */
static json_t *read_config(const vae_train_opts *o, err *e) {
  char path[4200];
  if (o->model_config) {
    snprintf(path, sizeof path, "%s", o->model_config);
  } else {
    struct stat sb;
    snprintf(path, sizeof path, "%s/vae/config.json", o->init);
    if (stat(path, &sb) != 0)
      snprintf(path, sizeof path, "%s/config.json", o->init);
  }
  json_error_t je;
  json_t *cfg = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!cfg || !json_is_object(cfg)) {
    err_set(e, ERR_FORMAT, "%s: %s", path, cfg ? "not a JSON object" : je.text);
    json_decref(cfg);
    return NULL;
  }
  const json_t *cls = json_object_get(cfg, "_class_name");
  if (cls && (!json_is_string(cls) || strcmp(json_string_value(cls), "AutoencoderKL") != 0)) {
    err_set(e, ERR_UNSUPPORTED, "%s: _class_name is not \"AutoencoderKL\"", path);
    json_decref(cfg);
    return NULL;
  }
  json_object_set_new(cfg, "_class_name", json_string("AutoencoderKL"));
  if (!json_object_get(cfg, "_diffusers_version"))
    json_object_set_new(cfg, "_diffusers_version", json_string("0.21.0"));
  return cfg;
}

typedef struct vae_run {
  const vae_train_opts *o;
  vae *v;
  vae_trainer *t;
  cli_train_data d;
  json_t *config;
  FILE *log;
  double wall;
} vae_run;

/* OUT/config.json (scaling_factor from the latents of the first images) and the weights. */
static int write_folder(vae_run *r, err *e) {
  const int k = (int)(r->d.n < r->o->scale_images ? r->d.n : r->o->scale_images);
  double sd = 0;
  int rc = vae_latent_std(r->v, r->d.x, k, r->d.h, r->d.w, (uint64_t)r->o->seed, (int)r->o->threads,
                          &sd, e);
  if (rc)
    return rc;
  if (!(sd > 0) || !isfinite(sd))
    return err_set(e, ERR_NUMERIC, "the latents' standard deviation is %g", sd);
  json_object_set_new(r->config, "scaling_factor", json_real(1.0 / sd));
  char path[4200], tmp[4300];
  snprintf(path, sizeof path, "%s/config.json", r->o->out);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  if (json_dump_file(r->config, tmp, JSON_INDENT(2) | JSON_SORT_KEYS) != 0 ||
      rename(tmp, path) != 0)
    return err_set(e, ERR_IO, "%s: cannot write", path);
  snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", r->o->out);
  return cli_vae_write(path, r->v, NULL, e);
}

static int setup(vae_run *r, err *e) {
  const vae_train_opts *o = r->o;
  int rc;
  if (!(r->config = read_config(o, e)))
    return e->code;
  rc = o->init ? vae_load(o->init, &r->v, e) : vae_init(r->config, (uint64_t)o->seed, &r->v, e);
  if (rc)
    return err_prefix(e, "%s", o->init ? o->init : o->model_config);
  const vae_info *vi = vae_get_info(r->v);
  if ((rc = cli_train_images_load(o->data, vi->in_channels, &r->d, e)))
    return rc;
  if (r->d.h % vi->factor)
    return err_set(e, ERR_SHAPE, "--data %s: %dx%d images, not multiples of the VAE's factor %d",
                   o->data, r->d.h, r->d.w, vi->factor);
  const vae_train_config c = {.recon = strcmp(o->recon, "mse") == 0 ? VAE_RECON_MSE : VAE_RECON_L1,
                              .kl_weight = o->kl_weight,
                              .lr_kind = (train_lr_kind)train_lr_kind_from_name(o->lr_schedule),
                              .lr = o->lr,
                              .warmup = o->warmup,
                              .total_steps = o->steps,
                              .adamw = {o->betas[0], o->betas[1], 1e-8, o->weight_decay},
                              .clip_norm = o->clip,
                              .seed = (uint64_t)o->seed,
                              .threads = (int)o->threads};
  if ((rc = vae_trainer_new(r->v, &c, &r->t, e)))
    return rc;
  if (mkdir(o->out, 0777) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "--out %s: %s", o->out, strerror(errno));
  char path[4200];
  snprintf(path, sizeof path, "%s/loss.jsonl", o->out);
  if (!(r->log = fopen(path, "w")))
    return err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
  return ERR_OK;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int train_loop(vae_run *r, err *e) {
  const vae_train_opts *o = r->o;
  const size_t per = (size_t)r->d.c * r->d.h * r->d.w;
  float *batch = malloc(per * (size_t)o->batch * sizeof(float));
  int64_t *idx = malloc((size_t)o->batch * sizeof *idx);
  int rc = batch && idx ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory for a batch");
  const double t0 = now_s();
  for (long step = 0; !rc && step < o->steps; step++) {
    if ((rc = train_batch_indices((uint64_t)o->seed, step, (int)o->batch, r->d.n, idx, e)))
      break;
    for (long long i = 0; i < o->batch; i++)
      memcpy(batch + per * i, r->d.x + per * idx[i], per * sizeof(float));
    vae_step_info in;
    if ((rc = vae_trainer_step(r->t, batch, (int)o->batch, r->d.h, r->d.w, &in, e)))
      break;
    r->wall = now_s() - t0;
    fprintf(r->log,
            "{\"step\": %ld, \"loss\": %.9g, \"rec\": %.9g, \"kl\": %.9g, \"grad_norm\": %.6g, "
            "\"lr\": %.6g, \"wall\": %.3f}\n",
            step + 1, in.loss, in.rec, in.kl, in.grad_norm, in.lr, r->wall);
    fflush(r->log);
    const double rate = (step + 1) / (r->wall > 0 ? r->wall : 1e-9);
    if (!o->quiet && ((step + 1) % 10 == 0 || step == 0 || step + 1 == o->steps))
      fprintf(stderr,
              "step %ld/%lld loss %.4g rec(%s) %.4f kl %.4g |g| %.3g lr %.3g %.2f steps/s "
              "ETA %.0f s\n",
              step + 1, o->steps, in.loss, o->recon, in.rec, in.kl, in.grad_norm, in.lr, rate,
              (o->steps - step - 1) / rate);
    if ((step + 1) % o->ckpt_every == 0 && step + 1 < o->steps)
      rc = write_folder(r, e);
  }
  free(batch), free(idx);
  return rc ? rc : write_folder(r, e);
}

int cmd_train_vae(int argc, char **argv) {
  vae_train_opts o = {.lr = 4e-4,
                      .lr_schedule = "cosine",
                      .recon = "l1",
                      .kl_weight = 1e-6,
                      .betas = {0.5, 0.9},
                      .threads = 2,
                      .scale_images = 1024,
                      .ckpt_every = 500};
  int status = parse_args(argc, argv, &o);
  if (status >= 0)
    return status;
  vae_run r = {.o = &o};
  err e = {0};
  int rc = setup(&r, &e);
  if (!rc)
    rc = train_loop(&r, &e);
  if (!rc && !o.quiet)
    fprintf(stderr, "wrote %s (%lld steps, %.1f s, scaling_factor %.6g)\n", o.out, o.steps, r.wall,
            json_real_value(json_object_get(r.config, "scaling_factor")));
  if (r.log)
    fclose(r.log);
  cli_train_data_free(&r.d);
  vae_trainer_free(r.t);
  vae_free(r.v);
  json_decref(r.config);
  return rc ? cli_fail("train vae", "%s", e.msg) : 0;
}
