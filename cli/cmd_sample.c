/* `denoised sample`: generate images with a model and a solver, writing .npy
 * or PNGs whose metadata (A1111 "parameters" text plus the full resolved
 * request as JSON) is enough to regenerate any one image with --replay. */
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "image.h"
#include "meta.h"
#include "model.h"
#include "npy.h"
#include "sampler.h"
#include "schedule.h"

#define MAX_OVERRIDES 64

static const char help[] =
    "usage: denoised sample [--model DIR] [--scheduler NAME] [--steps N]\n"
    "                       [--scheduler-config FILE.json] [--scheduler-opt KEY=VALUE ...]\n"
    "                       [--seed S | --noise NOISE.npy] [--batch B] [--class C]\n"
    "                       [--guidance-scale G] [--init-image IN.png [--strength S]\n"
    "                       [--mask MASK.png]] [--size S] [--threads T] [--quiet]\n"
    "                       (--out OUT.npy | -o OUT.png)\n"
    "       denoised sample --replay IMAGE.png [--model DIR] -o OUT.png\n"
    "\n"
    "Generates images by solving the reverse diffusion from Gaussian noise.\n"
    "  --model DIR             diffusers model folder (flat or pipeline layout); default:\n"
    "                          the built-in default model (" DENOISED_DEFAULT_MODEL ")\n"
    "  --scheduler NAME        solver (default ddim): a diffusers class name such as\n"
    "                          DPMSolverMultistepScheduler, or ddpm, ddim, pndm, plms,\n"
    "                          dpm-solver, dpm-solver++, dpm++2m, dpm++3m, dpm++2m-karras,\n"
    "                          dpm++2m-sde, dpm++2m-sde-karras, dpm++2s, dpm++2s-sde, unipc,\n"
    "                          deis, euler, euler-a, heun, and the papers' variants f-pndm,\n"
    "                          s-pndm, dpm-solver-fast, dpm-solver-adaptive (DPM_Solver)\n"
    "  --steps N               inference steps (default: the solver's diffusers default); for\n"
    "                          dpm-solver-fast the NFE budget\n"
    "  --scheduler-config F    JSON object of diffusers scheduler_config keys, layered on the\n"
    "                          model's scheduler_config.json (keys of other schedulers ignored)\n"
    "  --scheduler-opt K=V     one more key the solver reads (repeatable), e.g. eta=1,\n"
    "                          timestep_spacing=trailing, solver_order=3, use_karras_sigmas=true\n"
    "  --seed S                seed (default: random, printed); image i of a batch uses noise\n"
    "                          stream i, so any image can be regenerated alone\n"
    "  --noise NOISE.npy       explicit initial noise [B, C, H, W] instead of the seed\n"
    "  --batch B               images (default 1)\n"
    "  --class C               class of class-conditional models: an index or a name of the\n"
    "                          model's _class_labels (the default glyph model: 0-9, A-Z)\n"
    "  --guidance-scale G      classifier-free guidance: uncond + G (cond - uncond), both\n"
    "                          passes in one batched evaluation per step; G in [0, 100], 1 is\n"
    "                          the plain conditional model, 0 the unconditional one (the null\n"
    "                          class of the model's config.json \"_null_class\")\n"
    "  --init-image IN.png     img2img (SDEdit): start from IN (PNG or .npy [C, H, W] in\n"
    "                          [-1, 1], the model's size) noised to the level --strength picks\n"
    "  --strength S            share of the schedule that runs, (0, 1] (default 0.8; with\n"
    "                          --mask 1.0): the last int(S * steps) steps\n"
    "  --mask MASK.png         inpainting: white pixels are generated, black ones keep the\n"
    "                          init image (re-noised to every step's level; diffusers' pipeline\n"
    "                          for models without mask channels)\n"
    "  --size S                image side (default: the model's sample_size)\n"
    "  --threads T             CPU threads (default 2)\n"
    "  --out OUT.npy           write the raw samples [B, C, H, W] float32\n"
    "  -o OUT.png              write PNGs (OUT.png for one image, OUT-<i>.png for a batch)\n"
    "  --replay IMAGE.png      regenerate the image from the metadata a PNG of ours carries\n"
    "                          (--model DIR for images from the daemon, which record a name)\n"
    "  --quiet                 no progress bar\n";

typedef struct sample_args {
  const char *model_dir, *scheduler, *sched_file, *noise_path, *npy_out, *png_out, *replay;
  const char *init_image, *mask;
  double guidance, strength;
  int has_guidance, has_strength;
  const char *overrides[MAX_OVERRIDES];
  int noverrides;
  long long steps, seed, batch, label, size, threads, first_image;
  int has_seed, has_label, quiet;
  const char *class_s; /* --class as given */
} sample_args;

static uint64_t random_seed(void) {
  uint64_t s = 0;
  int fd = open("/dev/urandom", O_RDONLY);
  if (fd >= 0) {
    if (read(fd, &s, sizeof s) != (ssize_t)sizeof s)
      s = 0;
    close(fd);
  }
  if (!s)
    s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
  /* JSON and A1111 clients carry seeds as doubles or signed ints: keep 53 bits */
  return s & ((1ull << 53) - 1);
}

/* The request as the engine's solver spec: the model's scheduler_config.json, then the user's
 * file ("config"), then KEY=VALUE ("options"); on --replay the config the image recorded. */
static int build_sampler(const sample_args *a, const model *m, const char *solver,
                         const json_t *recorded, sampler **out, err *e) {
  json_t *spec = json_pack("{s:s}", "name", solver), *mcfg = NULL;
  const char *path = model_scheduler_config_path(m);
  int rc = spec ? ERR_OK : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK && path && !(mcfg = sched_config_read_json(path, e)))
    rc = e->code;
  if (rc == ERR_OK && a->steps)
    json_object_set_new(spec, "steps", json_integer(a->steps));
  if (rc == ERR_OK && recorded) {
    json_object_set(spec, "config", (json_t *)recorded);
  } else if (rc == ERR_OK && a->sched_file) {
    json_t *j = sched_config_read_json(a->sched_file, e);
    if (!j)
      rc = e->code;
    else
      json_object_set_new(spec, "config", j);
  }
  if (rc == ERR_OK && !recorded && a->noverrides) {
    json_t *opts = json_object();
    json_object_set_new(spec, "options", opts);
    for (int i = 0; i < a->noverrides && rc == ERR_OK; i++) {
      const char *kv = a->overrides[i], *eq = strchr(kv, '=');
      if (!eq || eq == kv) {
        rc = err_set(e, ERR_INVALID, "--scheduler-opt '%s': expected KEY=VALUE", kv);
        break;
      }
      char key[128];
      snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
      json_object_set_new(opts, key, sched_value_from_text(eq + 1));
    }
  }
  if (rc == ERR_OK)
    rc = sampler_new_from_json(spec, mcfg, out, e);
  if (rc != ERR_OK && a->sched_file && !recorded && strstr(e->msg, "solver spec config"))
    err_prefix(e, "%s", a->sched_file);
  json_decref(spec);
  json_decref(mcfg);
  return rc;
}

static char *png_name(const char *base, int i, int batch) {
  size_t n = strlen(base) + 32;
  char *out = malloc(n);
  if (!out)
    return NULL;
  if (batch == 1) {
    snprintf(out, n, "%s", base);
    return out;
  }
  const char *dot = strrchr(base, '.'), *slash = strrchr(base, '/');
  if (!dot || (slash && dot < slash))
    dot = base + strlen(base);
  snprintf(out, n, "%.*s-%d%s", (int)(dot - base), base, i, dot);
  return out;
}

static int write_pngs(const sample_args *a, const model *m, const sched_config *cfg,
                      const char *solver, int steps, uint64_t seed, const float *x, int h, int w,
                      err *e) {
  const model_info *mi = model_get_info(m);
  /* samples live in the input space: a learned-variance model outputs 2C */
  int c = mi->in_channels < 3 ? 1 : 3;
  size_t plane = (size_t)h * w, per = (size_t)mi->in_channels * plane;
  uint8_t *px = malloc(plane * 3);
  if (!px)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = ERR_OK;
  for (int i = 0; i < (int)a->batch && !rc; i++) {
    image_to_u8(x + per * i, c, h, w, px);
    json_t *extra = json_object();
    if (extra && a->init_image)
      json_object_set_new(extra, "init_image", json_string(a->init_image));
    if (extra && a->mask)
      json_object_set_new(extra, "mask", json_string(a->mask));
    meta_image mm = {.model = a->model_dir,
                     .solver = solver,
                     .steps = steps,
                     .seed = seed,
                     .image_index = (uint64_t)(a->first_image + i),
                     .height = h,
                     .width = w,
                     .cfg = cfg,
                     .has_label = a->has_label,
                     .label = a->label,
                     .has_guidance = a->has_guidance,
                     .guidance_scale = a->guidance,
                     .has_strength = a->init_image != NULL,
                     .strength = a->strength,
                     .extra = extra};
    json_t *meta = meta_json(&mm);
    char *meta_s = meta ? json_dumps(meta, JSON_COMPACT | JSON_SORT_KEYS) : NULL, info[1024];
    meta_infotext(&mm, info, sizeof info);
    char *name = png_name(a->png_out, i, (int)a->batch);
    if (!name || !meta_s) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
    } else {
      image_text texts[2] = {{META_TEXT_KEY, info, 0}, {META_JSON_KEY, meta_s, 1}};
      rc = image_png_write(name, px, c, h, w, texts, 2, e);
    }
    free(name);
    free(meta_s);
    json_decref(meta);
    json_decref(extra);
  }
  free(px);
  return rc;
}

/* Fills the arguments from the JSON a PNG of ours carries. */
static int load_replay(sample_args *a, json_t **meta_out, err *e) {
  char *text = NULL;
  int rc = image_png_read_text(a->replay, META_JSON_KEY, &text, e);
  if (rc)
    return rc;
  json_error_t je;
  json_t *meta = json_loads(text, 0, &je);
  free(text);
  const char *model_dir, *solver;
  json_int_t steps, seed, index, h, w;
  json_t *cfg = NULL, *label = NULL, *gs = NULL, *st = NULL, *init = NULL, *mask = NULL;
  if (!meta || json_unpack_ex(meta, &je, 0,
                              "{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:o, s?o, s?o, s?o, s?o, s?o}",
                              "model", &model_dir, "scheduler", &solver, "steps", &steps, "seed",
                              &seed, "image_index", &index, "height", &h, "width", &w,
                              "scheduler_config", &cfg, "class_label", &label, "guidance_scale",
                              &gs, "strength", &st, "init_image", &init, "mask", &mask)) {
    json_decref(meta);
    return err_set(e, ERR_FORMAT, "%s: metadata '%s' is not a denoised request: %s", a->replay,
                   META_JSON_KEY, je.text);
  }
  if (!a->model_dir) /* images from the daemon record a model name: --model gives its folder */
    a->model_dir = model_dir;
  a->scheduler = solver;
  a->steps = steps;
  a->seed = seed;
  a->has_seed = 1;
  a->first_image = index;
  a->size = h;
  a->batch = 1;
  if (h != w || h < 1 || steps < 1 || seed < 0 || index < 0) {
    json_decref(meta);
    return err_set(e, ERR_FORMAT, "%s: metadata has out-of-range values", a->replay);
  }
  if (label && json_is_integer(label)) {
    a->label = json_integer_value(label);
    a->has_label = 1;
  }
  if (gs && json_is_number(gs)) {
    a->guidance = json_number_value(gs);
    a->has_guidance = 1;
  }
  /* img2img and inpainting replay from the recorded files, when they are still there */
  if (json_is_string(init)) {
    a->init_image = json_string_value(init);
    a->strength = json_is_number(st) ? json_number_value(st) : 0.8;
    a->has_strength = 1;
  }
  if (json_is_string(mask))
    a->mask = json_string_value(mask);
  *meta_out = meta;
  return ERR_OK;
}

static int parse_args(int argc, char **argv, sample_args *a) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"scheduler", required_argument, 0, 's'},
                                       {"steps", required_argument, 0, 'n'},
                                       {"scheduler-config", required_argument, 0, 'c'},
                                       {"scheduler-opt", required_argument, 0, 'O'},
                                       {"seed", required_argument, 0, 'S'},
                                       {"noise", required_argument, 0, 'N'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"class", required_argument, 0, 'l'},
                                       {"guidance-scale", required_argument, 0, 'g'},
                                       {"init-image", required_argument, 0, 'I'},
                                       {"strength", required_argument, 0, 'T'},
                                       {"mask", required_argument, 0, 'M'},
                                       {"size", required_argument, 0, 'z'},
                                       {"threads", required_argument, 0, 'j'},
                                       {"out", required_argument, 0, 'u'},
                                       {"replay", required_argument, 0, 'r'},
                                       {"quiet", no_argument, 0, 'q'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *cmd = "sample";
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:s:n:c:O:S:N:b:l:g:I:T:M:z:j:u:o:r:qh", opts, NULL)) !=
         -1) {
    switch (c) {
    case 'm': a->model_dir = optarg; break;
    case 's': a->scheduler = optarg; break;
    case 'n':
      if (cli_parse_int("--steps", optarg, 1, 100000, &a->steps))
        return 2;
      break;
    case 'c': a->sched_file = optarg; break;
    case 'O':
      if (a->noverrides == MAX_OVERRIDES)
        return cli_usage_error(cmd, "at most %d --scheduler-opt", MAX_OVERRIDES);
      a->overrides[a->noverrides++] = optarg;
      break;
    case 'S':
      if (cli_parse_int("--seed", optarg, -1, (1ll << 53) - 1, &a->seed))
        return 2;
      a->has_seed = a->seed >= 0;
      break;
    case 'N': a->noise_path = optarg; break;
    case 'b':
      if (cli_parse_int("--batch", optarg, 1, 1024, &a->batch))
        return 2;
      break;
    case 'l':
      a->class_s = optarg; /* an index or a name: resolved once the model is loaded */
      a->has_label = 1;
      break;
    case 'g':
      if (cli_parse_double("--guidance-scale", optarg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
        return 2;
      a->has_guidance = 1;
      break;
    case 'I': a->init_image = optarg; break;
    case 'T':
      if (cli_parse_double("--strength", optarg, 0, 1, &a->strength))
        return 2;
      if (a->strength <= 0)
        return cli_usage_error(cmd, "--strength must be greater than 0");
      a->has_strength = 1;
      break;
    case 'M': a->mask = optarg; break;
    case 'z':
      if (cli_parse_int("--size", optarg, 1, 4096, &a->size))
        return 2;
      break;
    case 'j':
      if (cli_parse_int("--threads", optarg, 1, 256, &a->threads))
        return 2;
      break;
    case 'u': a->npy_out = optarg; break;
    case 'o': a->png_out = optarg; break;
    case 'r': a->replay = optarg; break;
    case 'q': a->quiet = 1; break;
    case 'h': fputs(help, stdout); return -1;
    default: return cli_usage_error(cmd, "bad option");
    }
  }
  if (optind < argc)
    return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
  if (a->replay) {
    if (a->scheduler || a->sched_file || a->noverrides || a->has_seed || a->noise_path ||
        a->has_label || a->steps || a->size || a->has_guidance || a->init_image || a->mask ||
        a->has_strength)
      return cli_usage_error(cmd, "--replay takes only --model, -o/--out, --threads and --quiet");
  } else if (!a->model_dir) {
    a->model_dir = cli_default_model();
  }
  if (!a->npy_out && !a->png_out)
    return cli_usage_error(cmd, "give --out OUT.npy or -o OUT.png");
  if (a->noise_path && a->has_seed)
    return cli_usage_error(cmd, "--seed and --noise exclude each other");
  if (a->has_strength && !a->init_image)
    return cli_usage_error(cmd, "--strength needs --init-image");
  if (a->mask && !a->init_image)
    return cli_usage_error(cmd, "--mask needs --init-image (the picture to inpaint)");
  if (a->init_image && !a->has_strength)
    a->strength = a->mask ? 1.0 : 0.8; /* diffusers' pipeline defaults */
  return 0;
}

int cmd_sample(int argc, char **argv) {
  const char *cmd = "sample";
  sample_args a = {.scheduler = NULL, .batch = 1, .threads = 2};
  int prc = parse_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  err e = {0};
  json_t *replay_meta = NULL;
  model *m = NULL;
  sampler *s = NULL;
  int status = 1;
  npy_array noise = {0};
  float *out = NULL, *init_px = NULL, *mask_px = NULL, *init_b = NULL, *mask_b = NULL;
  if (a.replay && load_replay(&a, &replay_meta, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const char *solver = a.scheduler ? a.scheduler : "ddim";
  if (!sampler_solver_class(solver)) {
    cli_usage_error(cmd, "unknown scheduler '%s' (see --help for the names)", solver);
    status = 2;
    goto done;
  }
  if (model_load(a.model_dir, &m, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const model_info *mi = model_get_info(m);
  json_t *recorded = replay_meta ? json_object_get(replay_meta, "scheduler_config") : NULL;
  if (build_sampler(&a, m, solver, recorded, &s, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  const sched_config *cfg = sampler_config(s);
  int size = a.size ? (int)a.size : mi->sample_size;
  if (size < 1) {
    cli_usage_error(cmd, "the model has no sample_size: pass --size");
    status = 2;
    goto done;
  }
  if (mi->num_classes && !a.has_label) {
    cli_usage_error(cmd, "this model is class-conditional (%d classes): pass --class",
                    mi->num_classes);
    status = 2;
    goto done;
  }
  if (!mi->num_classes && a.has_label) {
    cli_usage_error(cmd, "this model is not class-conditional: drop --class");
    status = 2;
    goto done;
  }
  if (a.class_s && (a.label = model_class_from_name(m, a.class_s)) < 0) {
    cli_usage_error(cmd, "--class '%s' is not a class of this model (an index in [0, %d)%s)",
                    a.class_s, mi->num_classes,
                    mi->class_labels ? " or a name of _class_labels" : "");
    status = 2;
    goto done;
  }
  if (!a.class_s && a.has_label && (a.label < 0 || a.label >= mi->num_classes)) { /* --replay */
    cli_usage_error(cmd, "class %lld out of range [0, %d)", a.label, mi->num_classes);
    status = 2;
    goto done;
  }
  if (a.has_guidance && !mi->num_classes) {
    cli_usage_error(cmd, "--guidance-scale needs a class-conditional model");
    status = 2;
    goto done;
  }
  if (a.init_image) {
    if (cli_read_image("--init-image", a.init_image, mi->in_channels, size, size, &init_px, &e) ||
        (a.mask && cli_read_mask("--mask", a.mask, size, size, &mask_px, &e))) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
    const size_t d = (size_t)mi->in_channels * size * size, plane = (size_t)size * size;
    init_b = malloc(sizeof(float) * d * (size_t)a.batch);
    mask_b = a.mask ? malloc(sizeof(float) * plane * (size_t)a.batch) : NULL;
    if (!init_b || (a.mask && !mask_b)) {
      cli_fail(cmd, "out of memory");
      goto done;
    }
    for (long long b = 0; b < a.batch; b++) { /* one picture, every image its own noise */
      memcpy(init_b + d * (size_t)b, init_px, d * sizeof *init_b);
      if (mask_b)
        memcpy(mask_b + plane * (size_t)b, mask_px, plane * sizeof *mask_b);
    }
  }
  if (a.noise_path) {
    if (npy_read_f32(a.noise_path, &noise, &e)) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
    if (noise.ndim != 4 || noise.shape[0] != a.batch || noise.shape[1] != mi->in_channels ||
        noise.shape[2] != size || noise.shape[3] != size) {
      cli_fail(cmd, "%s: expected shape [%lld, %d, %d, %d]", a.noise_path, a.batch, mi->in_channels,
               size, size);
      goto done;
    }
  }
  uint64_t seed = a.has_seed ? (uint64_t)a.seed : random_seed();
  if (!a.has_seed && !a.noise_path && !a.quiet)
    fprintf(stderr, "denoised sample: seed %llu\n", (unsigned long long)seed);
  int64_t *labels = NULL;
  if (a.has_label) {
    labels = malloc(sizeof *labels * (size_t)a.batch);
    for (int i = 0; labels && i < a.batch; i++)
      labels[i] = a.label;
  }
  size_t count = (size_t)a.batch * mi->in_channels * size * size;
  out = malloc(sizeof(float) * count);
  if (!out || (a.has_label && !labels)) {
    free(labels);
    cli_fail(cmd, "out of memory");
    goto done;
  }
  cli_progress pr;
  cli_progress_init(&pr, a.quiet);
  guidance g = guidance_for(m, a.guidance);
  sampler_run_opts o = {.batch = (int)a.batch,
                        .height = size,
                        .width = size,
                        .seed = seed,
                        .first_image = (uint64_t)a.first_image,
                        .init_noise = a.noise_path ? noise.data : NULL,
                        .labels = labels,
                        .progress = cli_on_progress,
                        .progress_user = &pr,
                        .threads = (int)a.threads,
                        .guidance = a.has_guidance ? &g : NULL,
                        .init_image = init_b,
                        .strength = a.strength,
                        .mask = mask_b};
  int nfe = 0, rc = sampler_run(s, m, &o, out, &nfe, &e);
  if (pr.tty && !sampler_nfe(s))
    fputc('\n', stderr);
  free(labels);
  if (rc) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (a.npy_out) {
    int64_t shape[4] = {a.batch, mi->in_channels, size, size};
    if (npy_write_f32(a.npy_out, out, 4, shape, &e)) {
      cli_fail(cmd, "%s", e.msg);
      goto done;
    }
  }
  if (a.png_out &&
      write_pngs(&a, m, cfg, solver, sampler_num_steps(s), seed, out, size, size, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (!a.quiet)
    fprintf(stderr, "denoised sample: %lld image(s), %s, %d steps, %d NFE per image\n", a.batch,
            solver, sampler_num_steps(s), nfe);
  status = 0;
done:
  free(out);
  free(init_px);
  free(mask_px);
  free(init_b);
  free(mask_b);
  npy_array_free(&noise);
  sampler_free(s);
  model_free(m);
  json_decref(replay_meta);
  return status;
}
