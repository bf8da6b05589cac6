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

#include "classifier.h"
#include "cli.h"
#include "image.h"
#include "meta.h"
#include "model.h"
#include "npy.h"
#include "rng.h"
#include "sampler.h"
#include "schedule.h"

#define MAX_OVERRIDES 64

static const char help[] =
    "usage: denoised sample [--model DIR] [--scheduler NAME] [--steps N]\n"
    "                       [--scheduler-config FILE.json] [--scheduler-opt KEY=VALUE ...]\n"
    "                       [--solver-data NAME|FILE]\n"
    "                       [--seed S | --noise NOISE.npy] [--batch B] [--class C]\n"
    "                       [--prompt P [--negative-prompt N] [--clip-skip K]]\n"
    "                       [--guidance-scale G] [--init-image IN.png [--strength S]\n"
    "                       [--mask MASK.png]] [--classifier DIR --classifier-target\n"
    "                       [HEAD=]CLASS [--classifier-scale S]] [--size S|WxH] [--threads T]\n"
    "                       [--precision fp32|bf16]\n"
    "                       [--quiet]\n"
    "                       (--out OUT.npy | -o OUT.png)\n"
    "       denoised sample --replay IMAGE.png [--model DIR] -o OUT.png\n"
    "\n"
    "Generates images by solving the reverse diffusion from Gaussian noise.\n"
    "  --model DIR             diffusers model folder (flat or pipeline layout); default:\n"
    "                          the default model (glyphs32, installed beside the binary)\n"
    "  --scheduler NAME        solver (default: the model's recommended one, config.json\n"
    "                          \"_recommended\", with its steps; else ddim): a diffusers class\n"
    "                          name such as\n"
    "                          DPMSolverMultistepScheduler, or ddpm, ddim, pndm, plms,\n"
    "                          dpm-solver, dpm-solver++, dpm++2m, dpm++3m, dpm++2m-karras,\n"
    "                          dpm++2m-sde, dpm++2m-sde-karras, dpm++2s, dpm++2s-sde, unipc,\n"
    "                          deis, euler, euler-a, heun, and the papers' variants f-pndm,\n"
    "                          s-pndm, dpm-solver-fast, dpm-solver-adaptive (DPM_Solver);\n"
    "                          dpm-solver-v3 (DPM-Solver-v3, --solver-data); usf (runs a\n"
    "                          USF solver schedule, --solver-data); dpm-ot (DPM-OT through\n"
    "                          a transport map from 'denoised ot fit', --solver-data)\n"
    "  --steps N               inference steps (default: the solver's diffusers default); for\n"
    "                          dpm-solver-fast the NFE budget\n"
    "  --scheduler-config F    JSON object of diffusers scheduler_config keys, layered on the\n"
    "                          model's scheduler_config.json (keys of other schedulers ignored)\n"
    "  --scheduler-opt K=V     one more key the solver reads (repeatable), e.g. eta=1,\n"
    "                          timestep_spacing=trailing, solver_order=3, use_karras_sigmas=true\n"
    "  --solver-data NAME|FILE the solver's data: for dpm-solver-v3 statistics (JSON header +\n"
    "                          .npy, README \"DPM-Solver-v3\"); a bare NAME (no '/', no .json)\n"
    "                          is the model's DIR/solver_data/NAME.json ('denoised info'\n"
    "                          lists them); without it flat statistics (l = 1, s = b = 0)\n"
    "                          For usf the schedule file (README \"USF\"), which fixes --steps\n"
    "                          For dpm-ot the map (README \"DPM-OT\"): its solver, steps\n"
    "  --seed S                seed (default: random, printed); image i of a batch uses noise\n"
    "                          stream i, so any image can be regenerated alone\n"
    "  --noise NOISE.npy       explicit initial noise [B, C, H, W] instead of the seed (with\n"
    "                          --init-image --seed may go along: it draws the rest)\n"
    "  --batch B               images (default 1)\n"
    "  --class C               class of class-conditional models: an index or a name of the\n"
    "                          model's _class_labels (the default glyph model: 0-9, A-Z);\n"
    "                          without it each image's class is drawn from the seed and its\n"
    "                          image index (printed, and recorded in the PNG)\n"
    "  --prompt P              text-to-image models (a Stable-Diffusion pipeline folder): the\n"
    "                          prompt every image follows\n"
    "  --negative-prompt N     what guidance steers away from (default: the empty prompt)\n"
    "  --clip-skip K           text encoder layer, counted as AUTOMATIC1111 does: 1 (default)\n"
    "                          the last, 2 the one before (through the final layer norm)\n"
    "  --guidance-scale G      classifier-free guidance: uncond + G (cond - uncond), both\n"
    "                          passes in one batched evaluation per step; G in [0, 100], 1 is\n"
    "                          the plain conditional model, 0 the unconditional one (the null\n"
    "                          class of the model's config.json \"_null_class\"); default:\n"
    "                          the model's recommended scale, else none\n"
    "  --init-image IN.png     img2img (SDEdit): start from IN (PNG or .npy [C, H, W] in\n"
    "                          [-1, 1], the model's size) noised to the level --strength picks\n"
    "  --strength S            share of the schedule that runs, (0, 1] (default 0.8; with\n"
    "                          --mask 1.0): the last int(S * steps) steps\n"
    "  --mask MASK.png         inpainting: white pixels are generated, black ones keep the\n"
    "                          init image (re-noised to every step's level; diffusers' pipeline\n"
    "                          for models without mask channels)\n"
    "                          Text-to-image models run both on latents: IN is VAE-encoded\n"
    "                          (a posterior sample drawn from the seed, as diffusers), the\n"
    "                          mask binarized at 0.5 and reduced to the latent size (nearest)\n"
    "  --classifier DIR        classifier guidance with an image classifier folder (e.g.\n"
    "                          models/glyph-classifier): every evaluation's eps becomes\n"
    "                          eps - S sigma/alpha grad log p(CLASS | clip(x0)) (README)\n"
    "  --classifier-target [HEAD=]CLASS  the class to steer to, of the classifier's first head\n"
    "                          or of HEAD (e.g. char=A, italic=italic, bg=white)\n"
    "  --classifier-scale S    S in [0, 100] (default 1)\n"
    "  --size S|WxH            image side: the model's sample_size (other sizes are refused:\n"
    "                          the model never learned them); needed only without one. Text-\n"
    "                          to-image models take any width and height (WxH) that are\n"
    "                          multiples of their latent factor\n"
    "  --threads T             CPU threads (default 2)\n"
    "  --precision P           fp32 (default, exact) or bf16 (AVX512-BF16 CPUs: convolutions\n"
    "                          in bfloat16 with float32 sums; not recorded in the PNG, so a\n"
    "                          --replay of such an image needs --precision bf16 again)\n"
    "  --out OUT.npy           write the raw samples [B, C, H, W] float32\n"
    "  -o OUT.png              write PNGs (OUT.png for one image, OUT-<i>.png for a batch);\n"
    "                          -o - writes the one PNG to standard output; an existing\n"
    "                          symlink, device or pipe is written through, never replaced\n"
    "  --replay IMAGE.png      regenerate the image from the metadata a PNG of ours carries\n"
    "                          (--model DIR for images from the daemon, which record a name);\n"
    "                          refused when the result differs from IMAGE.png's pixels\n"
    "  --quiet                 no progress bar\n";

typedef struct sample_args {
  const char *model_dir, *scheduler, *sched_file, *noise_path, *npy_out, *png_out, *replay;
  const char *init_image, *mask, *solver_data, *clf_dir, *clf_target;
  const char *prompt, *negative_prompt;
  long long clip_skip;
  double guidance, strength, clf_scale;
  int has_guidance, has_strength;
  const char *overrides[MAX_OVERRIDES];
  int noverrides;
  long long steps, seed, batch, label, size, width, threads, first_image; /* size: height */
  int has_seed, has_label, quiet;
  int draw_class;      /* class-conditional model, no --class: each image's drawn from its seed */
  const char *class_s; /* --class as given */
  model_precision precision;
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
  if (!meta ||
      json_unpack_ex(meta, &je, 0,
                     "{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:o, s?o, s?o, s?o, s?o, s?o, "
                     "s?s}",
                     "model", &model_dir, "scheduler", &solver, "steps", &steps, "seed", &seed,
                     "image_index", &index, "height", &h, "width", &w, "scheduler_config", &cfg,
                     "class_label", &label, "guidance_scale", &gs, "strength", &st, "init_image",
                     &init, "mask", &mask, "solver_data", &a->solver_data)) {
    json_decref(meta);
    return err_set(e, ERR_FORMAT, "%s: metadata '%s' is not a denoised request: %s", a->replay,
                   META_JSON_KEY, je.text);
  }
  if (json_object_get(meta, "classifier_guidance")) {
    json_decref(meta);
    return err_set(e, ERR_UNSUPPORTED,
                   "%s was made with classifier guidance, which --replay does not redo: run "
                   "the command again with the flags its metadata records",
                   a->replay);
  }
  const char *type = json_string_value(json_object_get(json_object_get(meta, "edit"), "type"));
  if (type && strcmp(type, "img2img") != 0 && strcmp(type, "inpaint") != 0) {
    err_set(e, ERR_INVALID, "%s records an edit (%s): replay it with 'denoised %s --replay'",
            a->replay, type, strcmp(type, "deblur") == 0 ? "deblur" : "edit");
    json_decref(meta);
    return e->code;
  }
  if (!a->model_dir) /* images from the daemon record a model name: --model gives its folder */
    a->model_dir = cli_model_from_record(model_dir);
  a->scheduler = solver;
  a->steps = steps;
  a->seed = seed;
  a->has_seed = 1;
  a->first_image = index;
  a->size = h;
  a->width = w;
  a->batch = 1;
  if (h < 1 || w < 1 || steps < 1 || seed < 0 || index < 0) {
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
  /* text-to-image: the prompts (alive as long as the record, which the caller keeps) */
  a->prompt = json_string_value(json_object_get(meta, "prompt"));
  a->negative_prompt = json_string_value(json_object_get(meta, "negative_prompt"));
  const json_t *skip = json_object_get(meta, "clip_skip");
  a->clip_skip = json_is_integer(skip) ? json_integer_value(skip) : 0;
  /* img2img and inpainting replay from the recorded files (or the ones given: a daemon job's
   * pictures are its own) */
  if (!a->init_image && json_is_string(init))
    a->init_image = json_string_value(init);
  if (!a->mask && json_is_string(mask))
    a->mask = json_string_value(mask);
  const char *job = json_string_value(json_object_get(meta, "job_id"));
  if (type && !a->init_image) {
    err_set(e, ERR_INVALID,
            "%s records %s%s%s, whose input picture is not named: pass it with "
            "--init-image",
            a->replay, type, job ? " of daemon job " : "", job ? job : "");
  } else if (type && strcmp(type, "inpaint") == 0 && !a->mask) {
    err_set(e, ERR_INVALID,
            "%s records inpainting%s%s, whose mask is not named: pass it with "
            "--mask",
            a->replay, job ? " of daemon job " : "", job ? job : "");
  } else if (!type && (a->init_image || a->mask)) {
    err_set(e, ERR_INVALID, "%s records no img2img or inpainting: drop --init-image and --mask",
            a->replay);
  }
  if (e->code) {
    json_decref(meta);
    return e->code;
  }
  if (a->init_image) {
    a->strength = json_is_number(st) ? json_number_value(st) : 0.8;
    a->has_strength = 1;
  }
  *meta_out = meta;
  return ERR_OK;
}

static const struct option sample_opts[] = {{"model", required_argument, 0, 'm'},
                                            {"scheduler", required_argument, 0, 's'},
                                            {"steps", required_argument, 0, 'n'},
                                            {"scheduler-config", required_argument, 0, 'c'},
                                            {"scheduler-opt", required_argument, 0, 'O'},
                                            {"solver-data", required_argument, 0, 'D'},
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
                                            {"classifier", required_argument, 0, 'K'},
                                            {"classifier-target", required_argument, 0, 'Y'},
                                            {"classifier-scale", required_argument, 0, 'k'},
                                            {"precision", required_argument, 0, 'p'},
                                            {"prompt", required_argument, 0, 'P'},
                                            {"negative-prompt", required_argument, 0, 'X'},
                                            {"clip-skip", required_argument, 0, 'C'},
                                            {"quiet", no_argument, 0, 'q'},
                                            {"help", no_argument, 0, 'h'},
                                            {0, 0, 0, 0}};

/* One option of getopt_long; returns 0 to go on, else what parse_args returns. */
static int sample_option(int c, const char *arg, sample_args *a) {
  const char *cmd = "sample";
  switch (c) {
  case 'm': a->model_dir = arg; break;
  case 's': a->scheduler = arg; break;
  case 'n':
    if (cli_parse_int("--steps", arg, 1, 100000, &a->steps))
      return 2;
    break;
  case 'c': a->sched_file = arg; break;
  case 'D': a->solver_data = arg; break;
  case 'O':
    if (a->noverrides == MAX_OVERRIDES)
      return cli_usage_error(cmd, "at most %d --scheduler-opt", MAX_OVERRIDES);
    a->overrides[a->noverrides++] = arg;
    break;
  case 'S':
    if (cli_parse_int("--seed", arg, -1, (1ll << 53) - 1, &a->seed))
      return 2;
    a->has_seed = a->seed >= 0;
    break;
  case 'N': a->noise_path = arg; break;
  case 'b':
    if (cli_parse_int("--batch", arg, 1, 1024, &a->batch))
      return 2;
    break;
  case 'l':
    a->class_s = arg; /* an index or a name: resolved once the model is loaded */
    a->has_label = 1;
    break;
  case 'g':
    if (cli_parse_double("--guidance-scale", arg, 0, GUIDANCE_MAX_SCALE, &a->guidance))
      return 2;
    a->has_guidance = 1;
    break;
  case 'I': a->init_image = arg; break;
  case 'T':
    if (cli_parse_double("--strength", arg, 0, 1, &a->strength))
      return 2;
    if (a->strength <= 0)
      return cli_usage_error(cmd, "--strength must be greater than 0");
    a->has_strength = 1;
    break;
  case 'M': a->mask = arg; break;
  case 'z':
    if (cli_parse_size("--size", arg, 4096, &a->width, &a->size))
      return 2;
    break;
  case 'j':
    if (cli_parse_int("--threads", arg, 1, 256, &a->threads))
      return 2;
    break;
  case 'p':
    if (cli_parse_precision(arg, &a->precision))
      return 2;
    break;
  case 'u': a->npy_out = arg; break;
  case 'o': a->png_out = arg; break;
  case 'r': a->replay = arg; break;
  case 'K': a->clf_dir = arg; break;
  case 'Y': a->clf_target = arg; break;
  case 'k':
    if (cli_parse_double("--classifier-scale", arg, 0, GUIDANCE_MAX_SCALE, &a->clf_scale))
      return 2;
    break;
  case 'P': a->prompt = arg; break;
  case 'X': a->negative_prompt = arg; break;
  case 'C':
    if (cli_parse_int("--clip-skip", arg, 1, 12, &a->clip_skip))
      return 2;
    break;
  case 'q': a->quiet = 1; break;
  case 'h': fputs(help, stdout); return -1;
  default: return cli_usage_error(cmd, "bad option");
  }
  return 0;
}

/* Flags that exclude or need each other, and the defaults that follow from them. */
static int check_args(sample_args *a) {
  const char *cmd = "sample";
  if (a->replay) {
    if (a->scheduler || a->sched_file || a->noverrides || a->solver_data || a->has_seed ||
        a->noise_path || a->has_label || a->steps || a->size || a->has_guidance ||
        a->has_strength || a->clf_dir || a->clf_target)
      return cli_usage_error(cmd, "--replay takes only --model, --init-image and --mask (the "
                                  "pictures the record does not name), -o/--out, --threads, "
                                  "--precision and --quiet");
  } else if (!a->model_dir) {
    a->model_dir = cli_default_model();
  }
  if (!a->npy_out && !a->png_out)
    return cli_usage_error(cmd, "give --out OUT.npy or -o OUT.png");
  /* with an init image the seed still draws what the noise does not: a latent model's VAE
   * posterior sample */
  if (a->noise_path && a->has_seed && !a->init_image)
    return cli_usage_error(cmd, "--seed and --noise exclude each other (but for --init-image)");
  if (a->has_strength && !a->init_image)
    return cli_usage_error(cmd, "--strength needs --init-image");
  if (a->mask && !a->init_image)
    return cli_usage_error(cmd, "--mask needs --init-image (the picture to inpaint)");
  if (!a->clf_dir != !a->clf_target)
    return cli_usage_error(cmd, "--classifier and --classifier-target go together");
  if (a->init_image && !a->has_strength)
    a->strength = a->mask ? 1.0 : 0.8; /* diffusers' pipeline defaults */
  return 0;
}

/* Returns 0 to go on, -1 after --help, else the exit status. */
static int parse_args(int argc, char **argv, sample_args *a) {
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, "m:s:n:c:O:S:N:b:l:g:I:T:M:z:j:u:o:r:K:Y:k:p:qh", sample_opts,
                          NULL)) != -1) {
    int rc = sample_option(c, optarg, a);
    if (rc)
      return rc;
  }
  if (optind < argc)
    return cli_usage_error("sample", "unexpected argument '%s'", argv[optind]);
  return check_args(a);
}

/* The flags of a text-to-image model: a prompt, a size of latents it can take, no class unless
 * the UNet also has class embeddings, no pixel-model edits. */
static int check_text_args(sample_args *a, const model_info *mi) {
  const char *cmd = "sample";
  const int f = mi->latent_factor;
  if (!a->prompt)
    return cli_usage_error(cmd, "this is a text-to-image model: give --prompt");
  if (a->size && (a->size % f || a->width % f))
    return cli_usage_error(cmd,
                           "--size %lldx%lld: width and height must be multiples of %d for "
                           "this model",
                           a->width, a->size, f);
  if (a->has_label && !mi->num_classes)
    return cli_usage_error(cmd, "this model is not class-conditional: drop --class");
  if (a->clf_dir)
    return cli_usage_error(cmd, "--classifier reads pixels; a text-to-image model samples "
                                "latents: drop it");
  return 0;
}

/* Class, guidance and size against the model: a usage error (status 2) names the flag. */
static int check_model_args(sample_args *a, const model *m) {
  const char *cmd = "sample";
  const model_info *mi = model_get_info(m);
  if (!a->size && mi->sample_size < 1)
    return cli_usage_error(cmd, "the model has no sample_size: pass --size");
  if (mi->latent_factor > 1) /* text to image: any multiple of the latent factor */
    return check_text_args(a, mi);
  if (a->prompt || a->negative_prompt || a->clip_skip)
    return cli_usage_error(cmd, "this model takes no prompt: drop --prompt, --negative-prompt "
                                "and --clip-skip");
  /* a size the model was not built for gives pictures it never learned (a 32-pixel model's
   * 64x64 is noise-like garbage); a replay makes what its record says */
  if (a->size && mi->sample_size > 0 &&
      (a->size != mi->sample_size || a->width != mi->sample_size) && !a->replay)
    return cli_usage_error(cmd, "--size %lldx%lld: this model makes %dx%d images (its sample_size)",
                           a->width, a->size, mi->sample_size, mi->sample_size);
  a->draw_class = mi->num_classes > 0 && !a->has_label;
  if (!mi->num_classes && a->has_label)
    return cli_usage_error(cmd, "this model is not class-conditional: drop --class");
  if (a->class_s && (a->label = model_class_from_name(m, a->class_s)) < 0)
    return cli_usage_error(cmd, "--class '%s' is not a class of this model (an index in [0, %d)%s)",
                           a->class_s, mi->num_classes,
                           mi->class_labels ? " or a name of _class_labels" : "");
  if (!a->class_s && a->has_label && (a->label < 0 || a->label >= mi->num_classes)) /* replay */
    return cli_usage_error(cmd, "class %lld out of range [0, %d)", a->label, mi->num_classes);
  if (a->has_guidance && !mi->num_classes)
    return cli_usage_error(cmd, "--guidance-scale needs a class-conditional model");
  return 0;
}

/* The files a run reads: init image and mask (one picture for the batch), explicit noise. */
typedef struct sample_inputs {
  float *image, *mask;
  npy_array noise;
  int64_t *labels;
  classifier *clf; /* --classifier, and its guidance of the run */
  int64_t *targets;
  classifier_guidance cg;
} sample_inputs;

/* --classifier DIR and --classifier-target [HEAD=]CLASS: the head (the first by default) and one
 * target per image. */
static int read_classifier(const sample_args *a, sample_inputs *in, err *e) {
  if (classifier_load(a->clf_dir, &in->clf, e))
    return err_prefix(e, "--classifier");
  const char *eq = strchr(a->clf_target, '='), *label = eq ? eq + 1 : a->clf_target;
  char head[72] = "";
  if (eq)
    snprintf(head, sizeof head, "%.*s", (int)(eq - a->clf_target < 71 ? eq - a->clf_target : 71),
             a->clf_target);
  const int h = eq ? classifier_head_index(in->clf, head) : 0;
  const classifier_info *ci = classifier_get_info(in->clf);
  if (h < 0)
    return err_set(e, ERR_INVALID,
                   "--classifier-target: '%s' is not a head of the classifier "
                   "(its first is '%s')",
                   head, ci->heads[0].name);
  const int t = classifier_class_index(in->clf, h, label);
  if (t < 0)
    return err_set(e, ERR_INVALID,
                   "--classifier-target: '%s' is not a class of head '%s' (an "
                   "index in [0, %d) or a name)",
                   label, ci->heads[h].name, ci->heads[h].classes);
  if (!(in->targets = malloc(sizeof *in->targets * (size_t)a->batch)))
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < a->batch; i++)
    in->targets[i] = t;
  in->cg = (classifier_guidance){
      .clf = in->clf, .head = h, .scale = a->clf_scale, .target = in->targets};
  return ERR_OK;
}

static int read_inputs(const sample_args *a, const model *m, int h, int w, uint64_t seed,
                       sample_inputs *in, err *e) {
  const model_info *mi = model_get_info(m);
  if (a->init_image &&
      (cli_read_image("--init-image", a->init_image, mi->image_channels, h, w, &in->image, e) ||
       (a->mask && cli_read_mask("--mask", a->mask, h, w, &in->mask, e))))
    return e->code;
  if (a->noise_path) {
    if (npy_read_f32(a->noise_path, &in->noise, e))
      return e->code;
    const npy_array *n = &in->noise;
    const int nh = h / mi->latent_factor, nw = w / mi->latent_factor; /* latents: latent noise */
    if (n->ndim != 4 || n->shape[0] != a->batch || n->shape[1] != mi->in_channels ||
        n->shape[2] != nh || n->shape[3] != nw)
      return err_set(e, ERR_SHAPE, "%s: expected shape [%lld, %d, %d, %d]", a->noise_path, a->batch,
                     mi->in_channels, nh, nw);
  }
  if (a->has_label || a->draw_class) {
    if (!(in->labels = malloc(sizeof *in->labels * (size_t)a->batch)))
      return err_set(e, ERR_NOMEM, "out of memory");
    for (int i = 0; i < a->batch; i++) /* drawn: the rule the daemon's A1111 route uses */
      in->labels[i] = a->has_label ? a->label
                                   : rng_class(seed, (uint64_t)a->first_image + (uint64_t)i,
                                               mi->num_classes, mi->null_class);
  }
  return a->clf_dir ? read_classifier(a, in, e) : ERR_OK;
}

static void sample_inputs_free(sample_inputs *in) {
  free(in->image);
  free(in->mask);
  npy_array_free(&in->noise);
  free(in->labels);
  free(in->targets);
  classifier_free(in->clf);
}

static int write_outputs(const sample_args *a, const model *m, const pipeline_request *r,
                         const pipeline_result *res, err *e) {
  const model_info *mi = model_get_info(m);
  if (a->npy_out) {
    int64_t shape[4] = {r->batch, mi->image_channels, res->height, res->width};
    if (npy_write_f32(a->npy_out, res->images, 4, shape, e))
      return e->code;
  }
  if (!a->png_out)
    return ERR_OK;
  json_t *extra = json_object();
  if (!extra)
    return err_set(e, ERR_NOMEM, "out of memory");
  if (a->init_image) /* replay reads them again */
    json_object_set_new(extra, "init_image", json_string(a->init_image));
  if (a->mask)
    json_object_set_new(extra, "mask", json_string(a->mask));
  int rc = cli_write_pngs(a->png_out, m, r, res, cli_model_record(a->model_dir), extra, -1, e);
  json_decref(extra);
  return rc;
}

/* The model's recommended settings (config.json "_recommended") for what the flags leave open,
 * said on stderr so that a run's settings are never a surprise. */
static void apply_recommended(sample_args *a, const model *m) {
  const model_info *mi = model_get_info(m);
  char said[160] = "";
  int n = 0;
  if (!a->scheduler && mi->rec_solver) {
    a->scheduler = mi->rec_solver;
    n += snprintf(said + n, sizeof said - (size_t)n, "%s", a->scheduler);
    if (!a->steps && mi->rec_steps > 0) {
      a->steps = mi->rec_steps;
      n += snprintf(said + n, sizeof said - (size_t)n, ", %d steps", mi->rec_steps);
    }
  }
  if (!a->has_guidance && mi->latent_factor > 1 && mi->rec_guidance < 0) {
    a->guidance = 7.5; /* StableDiffusionPipeline's default */
    a->has_guidance = 1;
    if (!a->quiet)
      fprintf(stderr, "denoised sample: guidance scale 7.5 (diffusers' default; "
                      "--guidance-scale overrides it)\n");
  }
  if (!a->has_guidance && (mi->num_classes > 0 || mi->latent_factor > 1) && mi->rec_guidance >= 0) {
    a->guidance = mi->rec_guidance;
    a->has_guidance = 1;
    n += snprintf(said + n, sizeof said - (size_t)n, "%sguidance scale %g", n ? ", " : "",
                  a->guidance);
  }
  if (n && !a->quiet)
    fprintf(stderr, "denoised sample: the model's recommended %s (flags override them)\n", said);
}

/* The pipeline's request for the parsed flags and read inputs (g: the guidance it points to). */
static pipeline_request sample_request(const sample_args *a, const sample_inputs *in,
                                       const pipeline_solver *solver, int h, int w, uint64_t seed,
                                       const guidance *g) {
  return (pipeline_request){.kind = PIPELINE_GENERATE,
                            .solver = *solver,
                            .batch = (int)a->batch,
                            .height = h,
                            .width = w,
                            .seed = seed,
                            .first_image = (uint64_t)a->first_image,
                            .labels = in->labels,
                            .prompt = a->prompt,
                            .negative_prompt = a->negative_prompt,
                            .clip_skip = (int)a->clip_skip,
                            .guidance = a->has_guidance ? g : NULL,
                            .classifier = in->clf ? &in->cg : NULL,
                            .image = in->image,
                            .images = 1,
                            .mask = in->mask,
                            .strength = a->strength,
                            .noise = a->noise_path ? in->noise.data : NULL};
}

/* A replay must make the very picture it was given: pixels that differ mean the file was
 * edited after it was made (or --model names other weights), and the output would be a wrong
 * image passed off as the original. */
static int same_as_replay(const sample_args *a, const model *m, const pipeline_result *res,
                          err *e) {
  const int ch = model_get_info(m)->image_channels, c = ch < 3 ? 1 : 3;
  const size_t n = (size_t)c * res->height * res->width;
  float *file = NULL;
  uint8_t *pa = malloc(n), *pb = malloc(n);
  int rc = pa && pb ? cli_read_image("--replay", a->replay, ch, res->height, res->width, &file, e)
                    : err_set(e, ERR_NOMEM, "out of memory");
  if (rc == ERR_OK) {
    image_to_u8(file, c, res->height, res->width, pa);
    image_to_u8(res->images, c, res->height, res->width, pb);
    size_t diff = 0;
    for (size_t i = 0; i < n; i++)
      diff += pa[i] != pb[i];
    if (diff)
      rc = err_set(e, ERR_INVALID,
                   "%s: %zu of %zu pixel values differ from what its metadata makes: the picture "
                   "was changed after it was made (or --model names other weights); nothing "
                   "written",
                   a->replay, diff, n);
  }
  free(file);
  free(pa);
  free(pb);
  return rc;
}

/* Says which classes were drawn, as the metadata records them. */
static void say_drawn(const sample_args *a, const model *m, const sample_inputs *in) {
  if (!a->draw_class || a->quiet)
    return;
  const model_info *mi = model_get_info(m);
  fprintf(stderr, "denoised sample: no --class: classes drawn from the seed:");
  for (int i = 0; i < a->batch; i++) {
    const int64_t k = in->labels[i];
    if (k < mi->n_class_labels)
      fprintf(stderr, " %s", mi->class_labels[k]);
    else
      fprintf(stderr, " %lld", (long long)k);
  }
  fputc('\n', stderr);
}

int cmd_sample(int argc, char **argv) {
  const char *cmd = "sample";
  sample_args a = {.scheduler = NULL, .batch = 1, .threads = 2, .clf_scale = 1.0};
  int prc = parse_args(argc, argv, &a);
  if (prc)
    return prc < 0 ? 0 : prc;
  err e = {0};
  json_t *replay_meta = NULL;
  model *m = NULL;
  int status = 1;
  cli_solver solver = {0};
  sample_inputs in = {0};
  pipeline_result res = {0};
  if (a.replay && load_replay(&a, &replay_meta, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (cli_load_model(cmd, a.model_dir, a.precision, &m))
    goto done;
  if (!replay_meta)
    apply_recommended(&a, m);
  const char *name = a.scheduler ? a.scheduler : "ddim";
  if (!sampler_solver_class(name)) {
    status = cli_usage_error(cmd, "unknown scheduler '%s' (see --help for the names)", name);
    goto done;
  }
  if (replay_meta) { /* the resolved config the image recorded, nothing on top */
    solver.s = (pipeline_solver){.name = name,
                                 .steps = (int)a.steps,
                                 .config = json_object_get(replay_meta, "scheduler_config"),
                                 .data = a.solver_data};
  } else if (cli_solver_from_flags(name, a.steps, a.sched_file, a.overrides, a.noverrides, &solver,
                                   &e)) {
    status = e.code == ERR_NOMEM || e.code == ERR_IO ? cli_fail(cmd, "%s", e.msg)
                                                     : cli_usage_error(cmd, "%s", e.msg);
    goto done;
  }
  if (!replay_meta)
    solver.s.data = a.solver_data;
  /* a flag's value out of its range is a usage error, as in the daemon's 400 */
  if (cli_solver_check(m, &solver, a.sched_file, &e)) {
    status = e.code == ERR_NOMEM || e.code == ERR_IO ? cli_fail(cmd, "%s", e.msg)
                                                     : cli_usage_error(cmd, "%s", e.msg);
    goto done;
  }
  if ((status = check_model_args(&a, m)) != 0)
    goto done;
  status = 1;
  const int side = model_get_info(m)->sample_size * model_get_info(m)->latent_factor;
  const int height = a.size ? (int)a.size : side, width = a.size ? (int)a.width : side;
  uint64_t seed = a.has_seed ? (uint64_t)a.seed : random_seed();
  if (!a.has_seed && (!a.noise_path || a.init_image) && !a.quiet)
    fprintf(stderr, "denoised sample: seed %llu\n", (unsigned long long)seed);
  if (read_inputs(&a, m, height, width, seed, &in, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  say_drawn(&a, m, &in);
  guidance g = guidance_for(m, a.guidance);
  const pipeline_request r = sample_request(&a, &in, &solver.s, height, width, seed, &g);
  cli_progress pr;
  cli_progress_init(&pr, a.quiet);
  pipeline_hooks hooks = {
      .progress = cli_on_pipeline_progress, .progress_user = &pr, .threads = (int)a.threads};
  int rc = pipeline_run(m, &r, &hooks, &res, &e);
  if (pr.tty && res.sampler && !sampler_nfe(res.sampler))
    fputc('\n', stderr);
  if (rc || (replay_meta && same_as_replay(&a, m, &res, &e)) ||
      write_outputs(&a, m, &r, &res, &e)) {
    cli_fail(cmd, "%s", e.msg);
    goto done;
  }
  if (!a.quiet)
    fprintf(stderr, "denoised sample: %lld image(s), %s, %d steps, %d NFE per image\n", a.batch,
            name, sampler_num_steps(res.sampler), res.nfe);
  status = 0;
done:
  pipeline_result_clear(&res);
  sample_inputs_free(&in);
  if (!replay_meta)
    cli_solver_clear(&solver);
  model_free(m);
  json_decref(replay_meta);
  return status;
}
