/* AUTOMATIC1111 compatibility: /sdapi/v1 request and response shapes and their sampler names
 * mapped onto ours. Their server ignores fields it does not know, so this does too; the fields
 * it uses are still checked and errors still name them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "api.h"
#include "base64.h"
#include "image.h"
#include "internal.h"
#include "meta.h"
#include "rng.h"

/* Their names (and k-diffusion aliases) -> candidates among ours, first existing one wins. The
 * solver family grows behind this table: names without an implementation are simply absent
 * from /sdapi/v1/samplers. */
typedef struct sampler_map {
  const char *a1111;
  const char *aliases[3];
  const char *ours[3];
} sampler_map;

static const sampler_map sampler_table[] = {
    {"DDIM", {"ddim", NULL}, {"ddim", NULL}},
    {"DDPM", {"ddpm", NULL}, {"ddpm", NULL}},
    {"Euler", {"k_euler", "euler", NULL}, {"euler", NULL}},
    {"Euler a", {"k_euler_a", "euler_ancestral", NULL}, {"euler-a", "euler_ancestral", NULL}},
    {"Heun", {"k_heun", "heun", NULL}, {"heun", NULL}},
    {"LMS", {"k_lms", "lms", NULL}, {"lms", NULL}},
    {"PLMS", {"plms", NULL}, {"plms", NULL}},
    {"DPM2", {"k_dpm_2", NULL}, {"kdpm2", "dpm2", NULL}},
    {"DPM2 a", {"k_dpm_2_a", NULL}, {"kdpm2-a", "dpm2-a", NULL}},
    {"DPM++ 2M", {"k_dpmpp_2m", NULL}, {"dpm++2m", NULL}},
    {"DPM++ 2M Karras", {"k_dpmpp_2m_ka", NULL}, {"dpm++2m-karras", NULL}},
    {"DPM++ 2M SDE", {"k_dpmpp_2m_sde", NULL}, {"dpm++2m-sde", NULL}},
    {"DPM++ 2M SDE Karras", {"k_dpmpp_2m_sde_ka", NULL}, {"dpm++2m-sde-karras", NULL}},
    {"DPM++ 3M", {"k_dpmpp_3m", NULL}, {"dpm++3m", NULL}},
    {"DPM++ SDE", {"k_dpmpp_sde", NULL}, {"dpm++2s-sde", NULL}},
    {"DPM++ 2S", {"k_dpmpp_2s", NULL}, {"dpm++2s", NULL}},
    {"DPM fast", {"k_dpm_fast", NULL}, {"dpm-solver-fast", NULL}},
    {"DPM adaptive", {"k_dpm_ad", NULL}, {"dpm-solver-adaptive", NULL}},
    {"UniPC", {"unipc", NULL}, {"unipc", NULL}},
    {"DEIS", {"deis", NULL}, {"deis", NULL}},
    {"LCM", {"lcm", NULL}, {"lcm", NULL}},
};

#define NMAP ((int)(sizeof sampler_table / sizeof *sampler_table))

static const char *ours_for(const sampler_map *m) {
  for (int k = 0; k < 3 && m->ours[k]; k++)
    if (sampler_solver_class(m->ours[k]))
      return m->ours[k];
  return NULL;
}

const char *api_a1111_solver(const char *name) {
  /* "DPM++ 2M Karras" style names carry the schedule after the solver in old releases */
  for (int i = 0; i < NMAP; i++) {
    const sampler_map *m = &sampler_table[i];
    int hit = strcasecmp(name, m->a1111) == 0;
    for (int k = 0; k < 3 && m->aliases[k] && !hit; k++)
      hit = strcasecmp(name, m->aliases[k]) == 0;
    if (hit)
      return ours_for(m);
  }
  return sampler_solver_class(name) ? name : NULL;
}

json_t *api_sd_samplers_json(void) {
  json_t *arr = json_array();
  for (int i = 0; i < NMAP; i++) {
    const sampler_map *m = &sampler_table[i];
    const char *ours = ours_for(m);
    if (!ours)
      continue;
    json_t *al = json_array();
    for (int k = 0; k < 3 && m->aliases[k]; k++)
      json_array_append_new(al, json_string(m->aliases[k]));
    json_array_append_new(arr, json_pack("{s:s, s:o, s:{s:s}}", "name", m->a1111, "aliases", al,
                                         "options", "denoised_solver", ours));
  }
  return arr;
}

/* Their name for one of our solvers (the first row that maps onto it), or ours. */
static const char *label_for(const char *ours) {
  for (int i = 0; i < NMAP; i++) {
    const char *o = ours_for(&sampler_table[i]);
    if (o && strcmp(o, ours) == 0)
      return sampler_table[i].a1111;
  }
  return ours;
}

json_t *api_sd_models_json(const api_ctx *c) {
  json_t *arr = json_array();
  for (int i = 0; i < queue_model_count(c->q); i++) {
    queue_model_desc d;
    if (queue_model_get(c->q, i, NULL, &d) != ERR_OK)
      continue;
    json_array_append_new(arr,
                          json_pack("{s:s, s:s, s:n, s:s, s:n, s:n}", "title", d.name, "model_name",
                                    d.name, "hash", "filename", d.name, "sha256", "config"));
    queue_model_desc_clear(&d);
  }
  return arr;
}

/* A1111's schedule types (their `scheduler` field) that one of our scheduler options gives;
 * "Automatic" is the solver's own. Others (Exponential, Beta, Align Your Steps, ...) are a 400
 * naming the field rather than a silently different schedule. */
typedef struct sched_type {
  const char *label, *alias, *key, *value; /* value: JSON text of the option */
} sched_type;

static const sched_type sched_types[] = {
    {"Automatic", "automatic", NULL, NULL},
    {"Karras", "karras", "use_karras_sigmas", "true"},
    /* SGM's uniform is diffusers' "trailing" spacing (its schedulers' documentation) */
    {"SGM Uniform", "sgm_uniform", "timestep_spacing", "\"trailing\""},
};

#define NSCHED ((int)(sizeof sched_types / sizeof *sched_types))

/* Integer-valued field, absent when null (A1111 clients sometimes send 20.0). */
static int a_int(const json_t *obj, const char *key, long long lo, long long hi, long long *out,
                 int *present, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  *present = v && !json_is_null(v);
  return *present ? api_int_value(v, key, lo, hi, 1, out, e) : 0;
}

/* A number field in [lo, hi], absent when null. */
static int a_num(const json_t *obj, const char *key, double lo, double hi, double *out,
                 int *present, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  *present = v && !json_is_null(v);
  if (!*present)
    return 0;
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", key, "%s: expected a number, got %s", key,
                    sched_json_kind(v));
  *out = json_number_value(v);
  if (!(*out >= lo && *out <= hi))
    return api_fail(e, 400, "out_of_range", key, "%s: %g is out of range [%g, %g]", key, *out, lo,
                    hi);
  return 0;
}

/* An error of the native request we built, told in the A1111 names the client sent: the field
 * and the message's leading "field:" alike. */
static void theirs(api_error *e, const char *sampler_field, int img2img) {
  static const char *const map[][2] = {{"class_label", "prompt"},
                                       {"scheduler.steps", "steps"},
                                       {"scheduler.options.eta", "eta"},
                                       {"guidance.null_class", "negative_prompt"},
                                       {"edit.strength", "denoising_strength"},
                                       {"clip_skip", "override_settings.CLIP_stop_at_last_layers"},
                                       {"mask", "mask"},
                                       {"model", "override_settings.sd_model_checkpoint"}};
  const char *name = NULL;
  for (size_t i = 0; i < sizeof map / sizeof *map && !name; i++)
    if (strcmp(e->field, map[i][0]) == 0)
      name = map[i][1];
  if (strcmp(e->field, "scheduler.name") == 0)
    name = sampler_field;
  else if (!name && strncmp(e->field, "scheduler.options.", 18) == 0)
    name = "scheduler"; /* an option their schedule type set */
  else if (strcmp(e->field, "guidance.scale") == 0)
    name = "cfg_scale";
  else if (strcmp(e->field, "input_image") == 0 && img2img)
    name = "init_images[0]";
  if (!name)
    return;
  const size_t n = strlen(e->field);
  if (strncmp(e->message, e->field, n) == 0 && e->message[n] == ':') {
    char rest[sizeof e->message];
    snprintf(rest, sizeof rest, "%s", e->message + n);
    snprintf(e->message, sizeof e->message, "%s%s", name, rest);
  }
  snprintf(e->field, sizeof e->field, "%s", name);
}

/* A txt2img or img2img body read in their names, before it becomes a native request. */
typedef struct sd_req {
  int img2img;
  long long steps, seed, batch, n_iter;
  int has_steps;
  const char *solver, *sfield; /* ours; the field that named it, for errors */
  const char *model;           /* borrowed from the body or the client's options */
  json_t *options;             /* scheduler options (owned) */
  json_t *label, *neg;         /* class_label and guidance's null class (owned), or NULL */
  queue_model_desc md;         /* the model's description, once known */
  /* a text-to-image model's prompts (borrowed from the body) and clip skip (0: not given) */
  const char *prompt, *neg_text;
  long long clip_skip;
  long long width, height; /* as sent (0: not), which a text-to-image model makes */
  double cfg, strength;
  int has_cfg, draw_class;
  const json_t *init, *mask;
  char *mask_b64; /* an inverted mask (owned) */
} sd_req;

/* Their generation options that change a picture in ways nothing here does: refused when set,
 * so that a client never gets a picture made without them as if with them. */
static int sd_unsupported(const json_t *j, api_error *e) {
  static const char *const flags[] = {"enable_hr", "restore_faces", "tiling"};
  for (size_t i = 0; i < sizeof flags / sizeof *flags; i++)
    if (json_is_true(json_object_get(j, flags[i])))
      return api_fail(e, 400, "invalid_field", flags[i],
                      "%s: not available here (pixel-space models, no upscalers or face "
                      "restoration): send false",
                      flags[i]);
  const json_t *v = json_object_get(j, "subseed_strength");
  if (json_is_number(v) && json_number_value(v) != 0)
    return api_fail(e, 400, "invalid_field", "subseed_strength",
                    "subseed_strength: variation seeds are not available here: send 0");
  v = json_object_get(j, "script_name");
  if (json_is_string(v) && json_string_length(v) > 0)
    return api_fail(e, 400, "invalid_field", "script_name",
                    "script_name: this server runs no scripts: send null");
  v = json_object_get(j, "styles");
  if (json_is_array(v) && json_array_size(v) > 0)
    return api_fail(e, 400, "invalid_field", "styles",
                    "styles: this server has no prompt styles: send []");
  v = json_object_get(j, "alwayson_scripts");
  if (json_is_object(v) && json_object_size(v) > 0)
    return api_fail(e, 400, "invalid_field", "alwayson_scripts",
                    "alwayson_scripts: this server runs no scripts: send {}");
  return 0;
}

static int sd_numbers(const api_ctx *c, const json_t *j, sd_req *r, api_error *e) {
  int rc, present;
  r->seed = -1;
  r->batch = r->n_iter = 1;
  if ((rc = a_int(j, "steps", 1, c->max_steps, &r->steps, &r->has_steps, e)) ||
      (rc = a_int(j, "seed", -1, (1ll << 53) - 1, &r->seed, &present, e)) ||
      (rc = a_int(j, "batch_size", 1, c->max_batch, &r->batch, &present, e)) ||
      (rc = a_int(j, "n_iter", 1, c->max_batch, &r->n_iter, &present, e)) ||
      /* checked, then the model's own size is made (README: A1111 route), except by a
       * text-to-image model (sd_native) */
      (rc = a_int(j, "width", 1, c->max_image_size, &r->width, &present, e)) ||
      (rc = a_int(j, "height", 1, c->max_image_size, &r->height, &present, e)) ||
      (rc = a_num(j, "denoising_strength", 0, 1, &r->strength, &present, e)))
    return rc;
  if (!present)
    r->strength = 0.75; /* their img2img default */
  if (r->batch * r->n_iter > c->max_batch)
    return api_fail(e, 400, "out_of_range", "n_iter",
                    "n_iter: batch_size x n_iter = %lld images is above this server's limit of %d",
                    r->batch * r->n_iter, c->max_batch);
  if (r->seed < 0) /* resolved here: image i is seed + i, as theirs */
    r->seed = (long long)api_random_seed();
  if (r->seed + r->batch * r->n_iter > (1ll << 53))
    r->seed -= r->batch * r->n_iter;
  return sd_unsupported(j, e);
}

/* sampler_name, else sampler_index (older clients), through their names to ours */
static int sd_sampler(const json_t *j, sd_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "sampler_name");
  if (!v || json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0))
    v = json_object_get(j, "sampler_index");
  r->solver = NULL; /* the model's recommendation or ddim (sd_read) */
  r->sfield = v == json_object_get(j, "sampler_name") ? "sampler_name" : "sampler_index";
  if (!v || json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0))
    return 0;
  if (!json_is_string(v))
    return api_fail(e, 400, "wrong_type", r->sfield, "%s: expected a sampler name, got %s",
                    r->sfield, sched_json_kind(v));
  r->solver = api_a1111_solver(json_string_value(v));
  if (!r->solver)
    return api_fail(e, 400, "invalid_field", r->sfield,
                    "%s: sampler '%s' is not available here (GET /sdapi/v1/samplers lists them)",
                    r->sfield, json_string_value(v));
  return 0;
}

/* Their schedule type, found by label or alias; NULL for none given; -1 for an unknown one. */
static int sd_sched_type(const json_t *j, const sched_type **out, api_error *e) {
  const json_t *v = json_object_get(j, "scheduler");
  *out = NULL;
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_string(v))
    return api_fail(e, 400, "wrong_type", "scheduler", "scheduler: expected a name, got %s",
                    sched_json_kind(v));
  for (int i = 0; i < NSCHED; i++)
    if (strcasecmp(json_string_value(v), sched_types[i].label) == 0 ||
        strcasecmp(json_string_value(v), sched_types[i].alias) == 0)
      *out = &sched_types[i];
  if (!*out)
    return api_fail(e, 400, "invalid_field", "scheduler",
                    "scheduler: schedule type '%.40s' is not available here (Automatic, Karras, "
                    "SGM Uniform)",
                    json_string_value(v));
  return 0;
}

/* The scheduler options their fields give: the schedule type as our option, and eta only for a
 * solver that reads it (theirs ignore it elsewhere: webuiapi sends eta 1.0 with "Euler a"). */
static int sd_options(const json_t *j, sd_req *r, api_error *e) {
  const char *solver = r->solver;
  const char *cls = sampler_solver_class(solver);
  const sched_type *st;
  int rc = sd_sched_type(j, &st, e);
  if (rc)
    return rc;
  if (st && st->key) {
    if (!cls || !sched_class_has_key(cls, st->key))
      return api_fail(e, 400, "invalid_field", "scheduler",
                      "scheduler: '%s' does not apply to sampler %s (only 'Automatic' does)",
                      st->label, label_for(solver));
    json_object_set_new(r->options, st->key, json_loads(st->value, JSON_DECODE_ANY, NULL));
  }
  const json_t *v = json_object_get(j, "eta");
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", "eta", "eta: expected a number, got %s",
                    sched_json_kind(v));
  if (cls && sched_class_has_key(cls, "eta"))
    json_object_set(r->options, "eta", (json_t *)v);
  return 0;
}

/* A prompt or negative prompt as a class of the model: an index, else a name (checked by the
 * native parser). */
static json_t *class_of(const char *p) {
  unsigned long long idx;
  return api_parse_uint(p, INT64_MAX, &idx) == 0 ? json_integer((json_int_t)idx) : json_string(p);
}

/* The model: override_settings.sd_model_checkpoint names one of ours, as in their API, else
 * the one this client chose with POST /sdapi/v1/options, else the default. Their titles may
 * carry " [hash]": cut. */
static int sd_model(const api_ctx *c, const json_t *j, const char *checkpoint, sd_req *r,
                    char *name, size_t n, api_error *e) {
  const json_t *ov = json_object_get(j, "override_settings");
  const json_t *ck = json_is_object(ov) ? json_object_get(ov, "sd_model_checkpoint") : NULL;
  const char *want = json_is_string(ck) ? json_string_value(ck) : checkpoint;
  if (!want)
    want = c->default_model;
  snprintf(name, n, "%s", want);
  char *br = strstr(name, " [");
  if (br)
    *br = 0;
  r->model = name;
  if (queue_model_get(c->q, -1, name, &r->md) == ERR_OK)
    return 0;
  return api_fail(e, 400, "invalid_field", "override_settings.sd_model_checkpoint",
                  "override_settings.sd_model_checkpoint: no model named '%.60s' (GET "
                  "/sdapi/v1/sd-models lists them)",
                  name);
}

int api_sd_clip_option(const json_t *v, int *out, api_error *e) {
  long long x;
  const int rc = api_int_value(v, "CLIP_stop_at_last_layers", 1, 12, 1, &x, e);
  if (!rc)
    *out = (int)x;
  return rc;
}

/* override_settings.CLIP_stop_at_last_layers, their clip skip (1: the last layer), else the
 * client's option (already in r), for a text-to-image model; range-checked against its text
 * encoder by the native parser. */
static int sd_clip_skip(const json_t *j, sd_req *r, api_error *e) {
  const json_t *ov = json_object_get(j, "override_settings");
  const json_t *v = json_is_object(ov) ? json_object_get(ov, "CLIP_stop_at_last_layers") : NULL;
  if (!v || json_is_null(v))
    return 0;
  return api_int_value(v, "override_settings.CLIP_stop_at_last_layers", 1, 1000, 1, &r->clip_skip,
                       e);
}

/* prompt and negative_prompt: on a text-to-image model they go to its text encoder; on a
 * class-conditional model the prompt names the class (none:
 * drawn from each image's seed) and the negative prompt the class guidance steers away from
 * (its null class); an unconditional model takes any prompt (it means nothing to it, as an
 * empty one) but refuses a negative prompt, which it cannot honour. */
static int sd_prompts(const json_t *j, sd_req *r, api_error *e) {
  const json_t *p = json_object_get(j, "prompt"), *np = json_object_get(j, "negative_prompt");
  if (p && !json_is_null(p) && !json_is_string(p))
    return api_fail(e, 400, "wrong_type", "prompt", "prompt: expected a string, got %s",
                    sched_json_kind(p));
  if (np && !json_is_null(np) && !json_is_string(np))
    return api_fail(e, 400, "wrong_type", "negative_prompt",
                    "negative_prompt: expected a string, got %s", sched_json_kind(np));
  if (r->md.text_conditional) { /* the text encoder reads them (checked by the native parser) */
    r->prompt = json_is_string(p) ? json_string_value(p) : "";
    r->neg_text = json_is_string(np) ? json_string_value(np) : "";
    return sd_clip_skip(j, r, e);
  }
  const int has_p = json_is_string(p) && json_string_length(p) > 0;
  const int has_np = json_is_string(np) && json_string_length(np) > 0;
  if (r->md.num_classes <= 0) {
    if (has_np)
      return api_fail(e, 400, "invalid_field", "negative_prompt",
                      "negative_prompt: model '%s' is unconditional: it has nothing to steer "
                      "away from; send an empty negative_prompt",
                      r->md.name);
    return 0;
  }
  if (has_p)
    r->label = class_of(json_string_value(p));
  else
    r->draw_class = 1;
  if (!has_np)
    return 0;
  json_t *neg = class_of(json_string_value(np));
  int64_t k;
  const int rc = api_parse_label(neg, &r->md, "negative_prompt", &k, e);
  json_decref(neg);
  if (!rc)
    r->neg = json_integer(k);
  return rc;
}

/* cfg_scale is classifier-free guidance of a class-conditional model; their default (7) on an
 * unconditional model means nothing and is ignored, as a prompt is */
static int sd_cfg(const json_t *j, sd_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "cfg_scale");
  if (!v || json_is_null(v)) {
    if (r->neg)
      return api_fail(e, 400, "missing_field", "cfg_scale",
                      "cfg_scale: a negative_prompt steers guidance: give a cfg_scale above 1");
    return 0;
  }
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", "cfg_scale", "cfg_scale: expected a number, got %s",
                    sched_json_kind(v));
  r->cfg = json_number_value(v);
  const int guided = r->md.num_classes > 0 || r->md.text_conditional;
  if (guided && (r->cfg < 0 || r->cfg > 50))
    return api_fail(e, 400, "out_of_range", "cfg_scale", "cfg_scale: %g is out of range [0, 50]",
                    r->cfg);
  r->has_cfg = guided;
  return 0;
}

/* inpainting_mask_invert: their mask with black and white swapped, as a new base64 PNG. */
static int invert_mask(const api_ctx *c, const json_t *mask, sd_req *r, api_error *e) {
  char *b64 = NULL;
  uint8_t *png = NULL, *px = NULL, *out = NULL;
  size_t len = 0, olen = 0;
  int h, w, rc = api_get_png(mask, "mask", &b64, &png, &len, e);
  free(b64);
  if (rc)
    return rc;
  err pe = {0};
  if (image_png_decode(png, len, c->max_image_size, c->max_image_size, &px, &h, &w, &pe) ==
      ERR_OK) {
    for (size_t i = 0; i < (size_t)h * w * 3; i++)
      px[i] = (uint8_t)(255 - px[i]);
    if (image_png_encode(px, 3, h, w, NULL, 0, &out, &olen, &pe) == ERR_OK)
      r->mask_b64 = base64_encode(out, olen);
  }
  free(png);
  free(px);
  free(out);
  if (pe.code)
    return api_fail(e, 400, "invalid_field", "mask", "mask: %s", pe.msg);
  return r->mask_b64 ? 0 : api_fail(e, 500, "internal", NULL, "out of memory");
}

/* img2img's picture, mask and strength. Their init_images may hold one picture per image; here
 * one picture serves the batch. mask_blur, inpainting_fill, inpaint_full_res(_padding) and
 * resize_mode are read by their pipeline only: ours keeps unmasked pixels as they are (their
 * fill "original") on the whole picture, which must be the model's size (README). */
static int sd_img2img(const api_ctx *c, const json_t *j, sd_req *r, api_error *e) {
  const json_t *ii = json_object_get(j, "init_images");
  if (!ii || json_is_null(ii) || (json_is_array(ii) && json_array_size(ii) == 0))
    return api_fail(e, 400, "missing_field", "init_images",
                    "init_images: give the picture to start from (a base64 PNG)");
  if (!json_is_array(ii))
    return api_fail(e, 400, "wrong_type", "init_images",
                    "init_images: expected an array of base64 PNGs, got %s", sched_json_kind(ii));
  if (json_array_size(ii) > 1)
    return api_fail(e, 400, "invalid_field", "init_images",
                    "init_images: one picture per request here (it serves the whole batch)");
  r->init = json_array_get(ii, 0);
  const json_t *m = json_object_get(j, "mask");
  r->mask = m && !json_is_null(m) ? m : NULL;
  long long inv = 0;
  int present, rc = a_int(j, "inpainting_mask_invert", 0, 1, &inv, &present, e);
  if (!rc && r->mask && inv)
    rc = invert_mask(c, r->mask, r, e);
  return rc;
}

/* The native request with their fields mapped onto ours: one image (the job of image 0). */
static json_t *sd_native(sd_req *r) {
  json_t *native =
      json_pack("{s:i, s:I, s:s, s:{s:O}}", "batch_size", 1, "seed", (json_int_t)r->seed, "model",
                r->model, "scheduler", "options", r->options);
  json_t *sched = json_object_get(native, "scheduler");
  json_object_set_new(sched, "name", json_string(r->solver));
  if (r->has_steps)
    json_object_set_new(sched, "steps", json_integer(r->steps));
  if (r->draw_class && !r->label) /* checked by the parser; each job's own is set after */
    r->label = json_integer(api_sd_draw(&r->md, (uint64_t)r->seed));
  if (r->label)
    json_object_set(native, "class_label", r->label);
  if (r->prompt) { /* a text-to-image model: its prompts, clip skip and the size asked for */
    json_object_set_new(native, "prompt", json_string(r->prompt));
    json_object_set_new(native, "negative_prompt", json_string(r->neg_text));
    if (r->clip_skip)
      json_object_set_new(native, "clip_skip", json_integer(r->clip_skip));
    if (r->width)
      json_object_set_new(native, "width", json_integer(r->width));
    if (r->height)
      json_object_set_new(native, "height", json_integer(r->height));
  }
  if (r->has_cfg) {
    json_t *g = json_pack("{s:f}", "scale", r->cfg);
    if (r->neg)
      json_object_set(g, "null_class", r->neg);
    json_object_set_new(native, "guidance", g);
  }
  if (r->img2img) {
    json_object_set(native, "input_image", (json_t *)r->init);
    if (r->mask)
      json_object_set_new(native, "mask",
                          r->mask_b64 ? json_string(r->mask_b64) : json_deep_copy(r->mask));
    json_object_set_new(
        native, "edit",
        json_pack("{s:s, s:f}", "type", r->mask ? "inpaint" : "img2img", "strength", r->strength));
  }
  return native;
}

int64_t api_sd_draw(const queue_model_desc *md, uint64_t seed) {
  return md->num_classes > 0 ? rng_class(seed, 0, md->num_classes, md->null_class) : 0;
}

static void sd_req_clear(sd_req *r) {
  json_decref(r->options);
  json_decref(r->label);
  json_decref(r->neg);
  free(r->mask_b64);
  queue_model_desc_clear(&r->md);
}

/* Their k-diffusion "churn" (s_churn, with s_tmin, s_tmax, s_noise) adds noise inside the
 * Euler, Heun and DPM2 steps; ours have none, so a non-zero s_churn for those samplers is
 * refused (theirs ignore it for the others, and so does this). Likewise img2img's
 * initial_noise_multiplier other than 1, which scales the starting noise. */
static int sd_churn(const json_t *j, const sd_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "s_churn");
  const int churns = strcmp(r->solver, "euler") == 0 || strcmp(r->solver, "heun") == 0 ||
                     strncmp(r->solver, "kdpm2", 5) == 0;
  if (churns && json_is_number(v) && json_number_value(v) != 0)
    return api_fail(e, 400, "invalid_field", "s_churn",
                    "s_churn: the %s sampler here adds no churn noise: send 0",
                    label_for(r->solver));
  v = json_object_get(j, "initial_noise_multiplier");
  if (r->img2img && json_is_number(v) && json_number_value(v) != 1)
    return api_fail(e, 400, "invalid_field", "initial_noise_multiplier",
                    "initial_noise_multiplier: the starting noise is not scaled here: send 1");
  return 0;
}

/* Their fields, read in order; the model first, since prompts mean classes of it. */
static int sd_read(const api_ctx *c, const json_t *j, const char *checkpoint, sd_req *r,
                   char *mname, size_t mlen, api_error *e) {
  int rc;
  if ((rc = sd_numbers(c, j, r, e)) || (rc = sd_sampler(j, r, e)) ||
      (rc = sd_model(c, j, checkpoint, r, mname, mlen, e)))
    return rc;
  if (!r->solver) { /* none named: the model's recommendation, its steps with it */
    r->solver =
        r->md.rec_solver[0] && api_a1111_solver(r->md.rec_solver) ? r->md.rec_solver : "ddim";
    if (!r->has_steps && r->md.rec_steps > 0 && r->solver == r->md.rec_solver) {
      r->steps = r->md.rec_steps;
      r->has_steps = 1;
    }
  }
  if ((rc = sd_churn(j, r, e)) || (rc = sd_options(j, r, e)) || (rc = sd_prompts(j, r, e)) ||
      (rc = sd_cfg(j, r, e)))
    return rc;
  return r->img2img ? sd_img2img(c, j, r, e) : 0;
}

int api_sd_parse(const api_ctx *c, int img2img, const char *body, size_t len, const char *owner,
                 const char *checkpoint, int clip_skip, api_sd_job *out, api_error *e) {
  memset(out, 0, sizeof *out);
  json_error_t je;
  json_t *j = len ? json_loadb(body, len, 0, &je) : json_object();
  if (!j)
    return api_fail(e, 400, "invalid_json", NULL, "invalid JSON at line %d, column %d: %s", je.line,
                    je.column, je.text);
  sd_req r = {.img2img = img2img, .options = json_object(), .clip_skip = clip_skip};
  char mname[QUEUE_NAME_SIZE];
  int rc = 0;
  if (!json_is_object(j)) {
    rc = api_fail(e, 400, "invalid_json", NULL, "the body must be a JSON object");
    goto done;
  }
  if ((rc = sd_read(c, j, checkpoint, &r, mname, sizeof mname, e)))
    goto done;
  json_t *native = sd_native(&r);
  char *text = native ? json_dumps(native, JSON_COMPACT) : NULL;
  json_decref(native);
  if (!text) {
    rc = api_fail(e, 500, "internal", NULL, "out of memory");
    goto done;
  }
  rc = api_parse_job(c, text, strlen(text), owner, &out->spec, e);
  free(text);
  if (rc) { /* name their fields, not ours */
    theirs(e, r.sfield, img2img);
    goto done;
  }
  out->count = (int)(r.batch * r.n_iter);
  out->draw_class = r.draw_class;
  /* previews feed current_image and an interrupt's partial images (none for edit jobs, nor
   * for a latent model, whose estimates would be latents) */
  if (!img2img && !r.md.text_conditional)
    out->spec.preview_every = out->spec.steps > 25 ? out->spec.steps / 25 : 1;
done:
  sd_req_clear(&r);
  json_decref(j);
  return rc;
}

int api_sd_job_at(const api_ctx *c, const api_sd_job *t, int i, queue_spec *out) {
  if (queue_spec_copy(out, &t->spec) != ERR_OK)
    return -1;
  out->seed = t->spec.seed + (uint64_t)i;
  if (t->draw_class) {
    queue_model_desc md;
    if (queue_model_get(c->q, -1, t->spec.model, &md) == ERR_OK) {
      out->label = api_sd_draw(&md, out->seed);
      queue_model_desc_clear(&md);
    }
  }
  return 0;
}

void api_sd_job_clear(api_sd_job *j) {
  queue_spec_clear(&j->spec);
}

/* The class's name for a prompt echo, else its index as text. */
static void class_text(const api_ctx *c, const queue_spec *s, char *buf, size_t n) {
  queue_model_desc md;
  buf[0] = 0;
  if (!s->has_label || queue_model_get(c->q, -1, s->model, &md) != ERR_OK)
    return;
  const json_t *name = json_array_get(md.class_labels, (size_t)s->label);
  if (json_is_string(name))
    snprintf(buf, n, "%s", json_string_value(name));
  else
    snprintf(buf, n, "%lld", (long long)s->label);
  queue_model_desc_clear(&md);
}

/* Their infotext: the prompt, "Negative prompt: ..." when one was given, the parameters line. */
static json_t *sd_infotext(const queue_spec *s, const char *prompt, const char *neg,
                           const char *sched) {
  meta_image mm = {.model = s->model,
                   .solver = s->solver,
                   .steps = s->steps,
                   .seed = s->seed,
                   .image_index = s->first_image,
                   .height = s->height,
                   .width = s->width,
                   .has_label = s->has_label,
                   .label = s->label,
                   .has_guidance = s->has_guidance,
                   .guidance_scale = s->guidance_scale,
                   .has_strength = s->edit == QUEUE_EDIT_IMG2IMG || s->edit == QUEUE_EDIT_INPAINT,
                   .strength = s->strength,
                   .sampler_label = label_for(s->solver),
                   .schedule_label = sched,
                   .clip_skip = s->clip_skip};
  char params[1024];
  meta_infotext(&mm, params, sizeof params);
  /* prompts run to CLIP_MAX_PROMPT_BYTES each: sized for them */
  const size_t n = strlen(prompt) + strlen(neg) + sizeof params + 32;
  char *text = malloc(n);
  if (!text)
    return NULL;
  snprintf(text, n, "%s%s%s%s%s", prompt, neg[0] ? "\nNegative prompt: " : "", neg,
           prompt[0] || neg[0] ? "\n" : "", params);
  json_t *out = json_string(text);
  free(text);
  return out;
}

/* The body's string field, "" when absent. */
static const char *body_str(const json_t *params, const char *key) {
  const char *v = json_string_value(json_object_get(params, key));
  return v ? v : "";
}

/* The schedule type their body named (its label), or NULL. */
static const char *body_sched(const json_t *params) {
  const sched_type *st = NULL;
  api_error e;
  return sd_sched_type(params, &st, &e) == 0 && st ? st->label : NULL;
}

/* info: their keys (processing.py's js()), our job ids added. */
static json_t *sd_info(const api_ctx *c, const queue_job_view *v, int n, const json_t *params) {
  const queue_spec *s0 = &v[0].spec;
  const char *prompt = body_str(params, "prompt"), *neg = body_str(params, "negative_prompt");
  const char *sched = body_sched(params);
  json_t *seeds = json_array(), *prompts = json_array(), *negs = json_array(),
         *infos = json_array(), *ids = json_array();
  for (int i = 0; i < n; i++) {
    char cls[128];
    class_text(c, &v[i].spec, cls, sizeof cls);
    const char *p = cls[0] ? cls : prompt;
    json_array_append_new(seeds, json_integer((json_int_t)v[i].spec.seed));
    json_array_append_new(prompts, json_string(p));
    json_array_append_new(negs, json_string(neg));
    json_array_append_new(infos, sd_infotext(&v[i].spec, p, neg, sched));
    json_array_append_new(ids, json_string(v[i].id));
  }
  time_t t = (time_t)v[0].created;
  struct tm tm;
  gmtime_r(&t, &tm);
  char stamp[32];
  strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S", &tm);
  const json_t *cfg = json_object_get(params, "cfg_scale");
  const json_t *bs = json_object_get(params, "batch_size");
  json_t *info = json_pack(
      "{s:s, s:o, s:s, s:o, s:I, s:o, s:I, s:o, s:f, s:i, s:i, s:s, s:f, s:i, s:I, s:b, s:n, s:s,"
      " s:n, s:n, s:n, s:i, s:i, s:i, s:o, s:[], s:s, s:i, s:b, s:s, s:o}",
      "prompt", prompt, "all_prompts", prompts, "negative_prompt", neg, "all_negative_prompts",
      negs, "seed", (json_int_t)s0->seed, "all_seeds", seeds, "subseed", (json_int_t)s0->seed,
      "all_subseeds", json_deep_copy(seeds), "subseed_strength", 0.0, "width", s0->width, "height",
      s0->height, "sampler_name", label_for(s0->solver), "cfg_scale",
      s0->has_guidance      ? s0->guidance_scale
      : json_is_number(cfg) ? json_number_value(cfg)
                            : 7.0,
      "steps", s0->steps, "batch_size",
      json_is_integer(bs) ? (json_int_t)json_integer_value(bs) : 1, "restore_faces", 0,
      "face_restoration_model", "sd_model_name", s0->model, "sd_model_hash", "sd_vae_name",
      "sd_vae_hash", "seed_resize_from_w", -1, "seed_resize_from_h", -1, "index_of_first_image", 0,
      "infotexts", infos, "styles", "job_timestamp", stamp, "clip_skip",
      s0->clip_skip > 1 ? s0->clip_skip : 1, "is_using_inpainting_conditioning", 0, "version",
      META_VERSION, "job_ids", ids);
  if (info && s0->edit)
    json_object_set_new(info, "denoising_strength", json_real(s0->strength));
  else if (info)
    json_object_set_new(info, "denoising_strength", json_null());
  if (info)
    json_object_set_new(info, "extra_generation_params",
                        sched ? json_pack("{s:s}", "Schedule type", sched) : json_object());
  return info;
}

json_t *api_sd_result_json(const api_ctx *c, const queue_job_view *views, int n, char **b64,
                           const char *body, size_t len) {
  json_t *params = len ? json_loadb(body, len, 0, NULL) : NULL;
  if (!json_is_object(params)) {
    json_decref(params);
    params = json_object();
  }
  json_t *imgs = json_array();
  for (int i = 0; i < n; i++)
    if (b64[i])
      json_array_append_new(imgs, json_string(b64[i]));
  json_t *info = n ? sd_info(c, views, n, params) : json_object();
  char *info_s = info ? json_dumps(info, JSON_COMPACT) : NULL;
  json_decref(info);
  if (json_is_false(json_object_get(params, "send_images")))
    json_array_clear(imgs);
  /* init_images go back only when asked for (include_init_images), as theirs */
  if (!json_is_true(json_object_get(params, "include_init_images")))
    json_object_del(params, "init_images");
  json_object_del(params, "mask");
  json_t *r = json_pack("{s:o, s:o, s:s}", "images", imgs, "parameters", params, "info",
                        info_s ? info_s : "{}");
  free(info_s);
  return r;
}

json_t *api_sd_progress_json(const queue_job_view *v, int have, int queued_total,
                             const char *current_image) {
  double progress = 0, eta = 0;
  char stamp[32] = "0";
  if (have && v->total > 0 && v->state == QUEUE_RUNNING) {
    progress = (double)v->step / v->total;
    /* whole seconds, rounded up, as the native progress events: no per-step times */
    const double elapsed = (double)time(NULL) - floor(v->started);
    if (v->step > 0 && elapsed > 0)
      eta = ceil(elapsed / v->step * (v->total - v->step));
  }
  if (have) {
    time_t t = (time_t)v->created;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S", &tm);
  }
  return json_pack("{s:f, s:f, s:{s:b, s:b, s:b, s:s, s:i, s:s, s:i, s:i, s:i}, s:o, s:n}",
                   "progress", progress, "eta_relative", eta, "state", "skipped", 0, "interrupted",
                   0, "stopping_generation", 0, "job", have ? v->id : "", "job_count",
                   queued_total + (have && v->state == QUEUE_RUNNING), "job_timestamp", stamp,
                   "job_no", 0, "sampling_step", have ? v->step : 0, "sampling_steps",
                   have ? (v->total ? v->total : v->spec.steps) : 0, "current_image",
                   current_image ? json_string(current_image) : json_null(), "textinfo");
}

/* "Key: value, Key: value" of an infotext's last line into their parsed form: numbers as
 * numbers, Size split into Size-1 and Size-2 (width, height). */
static void parse_params_line(const char *line, json_t *out) {
  char buf[1400];
  snprintf(buf, sizeof buf, "%s", line);
  char *save = NULL;
  for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
    while (*kv == ' ')
      kv++;
    char *colon = strstr(kv, ": ");
    if (!colon)
      continue;
    *colon = 0;
    const char *val = colon + 2;
    char *end;
    const double d = strtod(val, &end);
    int w, h;
    if (strcmp(kv, "Size") == 0 && sscanf(val, "%dx%d", &w, &h) == 2) {
      json_object_set_new(out, "Size-1", json_integer(w));
      json_object_set_new(out, "Size-2", json_integer(h));
    } else if (end != val && *end == 0) {
      json_object_set_new(out, kv,
                          d == (double)(long long)d && strchr(val, '.') == NULL
                              ? json_integer((json_int_t)d)
                              : json_real(d));
    } else {
      json_object_set_new(out, kv, json_string(val));
    }
  }
}

/* An infotext in their parsed form: Prompt, Negative prompt, then the parameters line. */
static json_t *parse_infotext(const char *text) {
  json_t *out = json_object();
  const char *last = strrchr(text, '\n');
  const char *params = last ? last + 1 : text;
  /* the prompt lines run to CLIP_MAX_PROMPT_BYTES each */
  char *prompt = last ? strndup(text, (size_t)(last - text)) : strdup("");
  if (!prompt) {
    json_decref(out);
    return NULL;
  }
  if (last) {
    static const char tag[] = "Negative prompt: ";
    char *np =
        strncmp(prompt, tag, sizeof tag - 1) == 0 ? prompt : strstr(prompt, "\nNegative prompt: ");
    if (np) {
      const size_t skip = np == prompt ? sizeof tag - 1 : sizeof tag;
      json_object_set_new(out, "Negative prompt", json_string(np + skip));
      *np = 0;
    }
  }
  json_object_set_new(out, "Prompt", json_string(prompt));
  free(prompt);
  parse_params_line(params, out);
  return out;
}

int api_sd_png_info(const api_ctx *c, const char *body, size_t len, json_t **out, api_error *e) {
  json_error_t je;
  json_t *j = len ? json_loadb(body, len, 0, &je) : NULL;
  if (!json_is_object(j)) {
    json_decref(j);
    return api_fail(e, 400, "invalid_json", NULL, "the body must be a JSON object {\"image\"}");
  }
  char *b64 = NULL, *info = NULL, *ours = NULL;
  uint8_t *png = NULL;
  size_t plen = 0;
  const json_t *img = json_object_get(j, "image");
  int rc = img ? api_get_png(img, "image", &b64, &png, &plen, e)
               : api_fail(e, 400, "missing_field", "image", "image: give a base64 PNG");
  err pe = {0};
  if (!rc && image_png_text_mem(png, plen, META_TEXT_KEY, c->max_image_size * 16, &info, &pe) &&
      pe.code != ERR_INVALID) /* no chunk: an empty answer, as theirs */
    rc = api_fail(e, 400, "invalid_field", "image", "image: %s", pe.msg);
  if (!rc) {
    err pe2 = {0};
    image_png_text_mem(png, plen, META_JSON_KEY, c->max_image_size * 16, &ours, &pe2);
    json_t *items = json_object();
    if (ours)
      json_object_set_new(items, META_JSON_KEY, json_string(ours));
    *out = json_pack("{s:s, s:o, s:o}", "info", info ? info : "", "items", items, "parameters",
                     info ? parse_infotext(info) : json_object());
  }
  free(b64);
  free(png);
  free(info);
  free(ours);
  json_decref(j);
  return rc;
}
