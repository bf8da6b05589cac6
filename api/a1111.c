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
#include "internal.h"
#include "meta.h"

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

/* Integer-valued field, absent when null (A1111 clients sometimes send 20.0). */
static int a_int(const json_t *obj, const char *key, long long lo, long long hi, long long *out,
                 int *present, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  *present = v && !json_is_null(v);
  return *present ? api_int_value(v, key, lo, hi, 1, out, e) : 0;
}

/* An error of the native request we built, told in the A1111 names the client sent: the field
 * and the message's leading "field:" alike. */
static void theirs(api_error *e, const char *sampler_field) {
  static const char *const map[][2] = {{"class_label", "prompt"},
                                       {"scheduler.steps", "steps"},
                                       {"scheduler.options.eta", "eta"},
                                       {"model", "override_settings.sd_model_checkpoint"}};
  const char *name = NULL;
  for (size_t i = 0; i < sizeof map / sizeof *map && !name; i++)
    if (strcmp(e->field, map[i][0]) == 0)
      name = map[i][1];
  if (strcmp(e->field, "scheduler.name") == 0)
    name = sampler_field;
  else if (strncmp(e->field, "guidance.", 9) == 0)
    name = "cfg_scale";
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

/* A txt2img body read in their names, before it becomes a native request. */
typedef struct txt2img_req {
  long long steps, seed, batch, n_iter, width, height;
  int has_steps, has_w, has_h;
  const char *solver, *sfield; /* ours; the field that named it, for errors */
  const char *model;           /* borrowed from the body */
  json_t *options;             /* scheduler options (owned) */
  json_t *label;               /* class_label from the prompt (owned), NULL for none */
  double cfg;
  int has_cfg;
} txt2img_req;

static int txt2img_numbers(const api_ctx *c, const json_t *j, txt2img_req *r, api_error *e) {
  int rc, present;
  r->seed = -1;
  r->batch = r->n_iter = 1;
  if ((rc = a_int(j, "steps", 1, c->max_steps, &r->steps, &r->has_steps, e)) ||
      (rc = a_int(j, "seed", -1, (1ll << 53) - 1, &r->seed, &present, e)) ||
      (rc = a_int(j, "batch_size", 1, c->max_batch, &r->batch, &present, e)) ||
      (rc = a_int(j, "n_iter", 1, c->max_batch, &r->n_iter, &present, e)) ||
      (rc = a_int(j, "width", 1, c->max_image_size, &r->width, &r->has_w, e)) ||
      (rc = a_int(j, "height", 1, c->max_image_size, &r->height, &r->has_h, e)))
    return rc;
  if (r->batch * r->n_iter > c->max_batch)
    return api_fail(e, 400, "out_of_range", "n_iter",
                    "n_iter: batch_size x n_iter = %lld images is above this server's limit of %d",
                    r->batch * r->n_iter, c->max_batch);
  return 0;
}

/* sampler_name, else sampler_index (older clients), through their names to ours */
static int txt2img_sampler(const json_t *j, txt2img_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "sampler_name");
  if (!v || json_is_null(v))
    v = json_object_get(j, "sampler_index");
  r->solver = "ddim";
  r->sfield = json_object_get(j, "sampler_name") ? "sampler_name" : "sampler_index";
  if (!v || json_is_null(v))
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

static int txt2img_eta(const json_t *j, txt2img_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "eta");
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", "eta", "eta: expected a number, got %s",
                    sched_json_kind(v));
  json_object_set(r->options, "eta", (json_t *)v);
  return 0;
}

/* The model (override_settings.sd_model_checkpoint names one of ours, as in their API) and the
 * prompt, which picks the class of a class-conditional model by name or index. Returns whether
 * the model is class-conditional. */
static int txt2img_model_label(const api_ctx *c, const json_t *j, txt2img_req *r) {
  const json_t *ov = json_object_get(j, "override_settings");
  const json_t *ck = json_is_object(ov) ? json_object_get(ov, "sd_model_checkpoint") : NULL;
  if (json_is_string(ck))
    r->model = json_string_value(ck);
  const json_t *v = json_object_get(j, "prompt");
  if (json_is_string(v) && json_string_length(v) > 0) {
    const char *p = json_string_value(v);
    unsigned long long idx;
    r->label =
        api_parse_uint(p, INT64_MAX, &idx) == 0 ? json_integer((json_int_t)idx) : json_string(p);
  }
  queue_model_desc md;
  int has_classes =
      queue_model_get(c->q, -1, r->model ? r->model : c->default_model, &md) == ERR_OK &&
      md.num_classes > 0;
  queue_model_desc_clear(&md);
  if (!has_classes && r->label) { /* a text prompt means nothing to an unconditional model */
    json_decref(r->label);
    r->label = NULL;
  }
  return has_classes;
}

/* cfg_scale is classifier-free guidance of a class-conditional model; their default (7) on an
 * unconditional model means nothing and is ignored, as a prompt is */
static int txt2img_cfg(const json_t *j, int has_classes, txt2img_req *r, api_error *e) {
  const json_t *v = json_object_get(j, "cfg_scale");
  if (!v || json_is_null(v))
    return 0;
  if (!json_is_number(v))
    return api_fail(e, 400, "wrong_type", "cfg_scale", "cfg_scale: expected a number, got %s",
                    sched_json_kind(v));
  r->cfg = json_number_value(v);
  if (has_classes && (r->cfg < 0 || r->cfg > 50))
    return api_fail(e, 400, "out_of_range", "cfg_scale", "cfg_scale: %g is out of range [0, 50]",
                    r->cfg);
  r->has_cfg = has_classes;
  return 0;
}

/* The native request with their fields mapped onto ours; takes the options and the label. */
static json_t *txt2img_native(txt2img_req *r) {
  json_t *native =
      json_pack("{s:I, s:{s:s, s:O}}", "batch_size", (json_int_t)(r->batch * r->n_iter),
                "scheduler", "name", r->solver, "options", r->options);
  if (r->model)
    json_object_set_new(native, "model", json_string(r->model));
  if (r->seed >= 0)
    json_object_set_new(native, "seed", json_integer(r->seed));
  if (r->has_steps)
    json_object_set_new(json_object_get(native, "scheduler"), "steps", json_integer(r->steps));
  if (r->has_w)
    json_object_set_new(native, "width", json_integer(r->width));
  if (r->has_h)
    json_object_set_new(native, "height", json_integer(r->height));
  if (r->label)
    json_object_set_new(native, "class_label", r->label);
  r->label = NULL;
  if (r->has_cfg)
    json_object_set_new(native, "guidance", json_pack("{s:f}", "scale", r->cfg));
  return native;
}

int api_parse_txt2img(const api_ctx *c, const char *body, size_t len, const char *owner,
                      queue_spec *out, api_error *e) {
  json_error_t je;
  json_t *j = len ? json_loadb(body, len, 0, &je) : json_object();
  if (!j)
    return api_fail(e, 400, "invalid_json", NULL, "invalid JSON at line %d, column %d: %s", je.line,
                    je.column, je.text);
  txt2img_req r = {0};
  int rc = 0;
  if (!json_is_object(j)) {
    rc = api_fail(e, 400, "invalid_json", NULL, "the body must be a JSON object");
    goto done;
  }
  r.options = json_object();
  if ((rc = txt2img_numbers(c, j, &r, e)) || (rc = txt2img_sampler(j, &r, e)) ||
      (rc = txt2img_eta(j, &r, e)) || (rc = txt2img_cfg(j, txt2img_model_label(c, j, &r), &r, e)))
    goto done;
  json_t *native = txt2img_native(&r);
  char *text = json_dumps(native, JSON_COMPACT);
  json_decref(native);
  if (!text) {
    rc = api_fail(e, 500, "internal", NULL, "out of memory");
    goto done;
  }
  rc = api_parse_job(c, text, strlen(text), owner, out, e);
  free(text);
  if (rc) /* name their fields, not ours */
    theirs(e, r.sfield);
done:
  json_decref(r.options);
  json_decref(r.label);
  json_decref(j);
  return rc;
}

json_t *api_txt2img_json(const queue_job_view *v, char **images_b64, int n, const char *body,
                         size_t len) {
  json_t *params = len ? json_loadb(body, len, 0, NULL) : NULL;
  if (!params)
    params = json_object();
  json_t *imgs = json_array(), *seeds = json_array(), *infos = json_array(), *idx = json_array();
  const queue_spec *s = &v->spec;
  for (int i = 0; i < n; i++) {
    json_array_append_new(imgs, json_string(images_b64[i]));
    json_array_append_new(seeds, json_integer((json_int_t)s->seed));
    json_array_append_new(idx, json_integer((json_int_t)(s->first_image + (uint64_t)i)));
    meta_image mm = {.model = s->model,
                     .solver = s->solver,
                     .steps = s->steps,
                     .seed = s->seed,
                     .image_index = s->first_image + (uint64_t)i,
                     .height = s->height,
                     .width = s->width,
                     .has_label = s->has_label,
                     .label = s->label,
                     .has_guidance = s->has_guidance,
                     .guidance_scale = s->guidance_scale};
    char text[1024];
    meta_infotext(&mm, text, sizeof text);
    json_array_append_new(infos, json_string(text));
  }
  time_t t = (time_t)v->created;
  struct tm tm;
  gmtime_r(&t, &tm);
  char stamp[32];
  strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S", &tm);
  json_t *info = json_pack(
      "{s:I, s:o, s:o, s:s, s:i, s:i, s:i, s:i, s:o, s:s, s:s, s:s}", "seed", (json_int_t)s->seed,
      "all_seeds", seeds, "image_indices", idx, "sampler_name", s->solver, "steps", s->steps,
      "width", s->width, "height", s->height, "batch_size", s->batch, "infotexts", infos,
      "job_timestamp", stamp, "job_id", v->id, "seed_note",
      "image i uses noise stream (seed, image_indices[i]); all_seeds repeats the job seed");
  if (s->has_label)
    json_object_set_new(info, "class_label", json_integer(s->label));
  char *info_s = json_dumps(info, JSON_COMPACT);
  json_decref(info);
  json_t *r = json_pack("{s:o, s:o, s:s}", "images", imgs, "parameters", params, "info",
                        info_s ? info_s : "{}");
  free(info_s);
  return r;
}

json_t *api_sd_progress_json(const queue_job_view *v, int have, int queued_total) {
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
  return json_pack("{s:f, s:f, s:{s:b, s:b, s:b, s:s, s:i, s:s, s:i, s:i, s:i}, s:n, s:n}",
                   "progress", progress, "eta_relative", eta, "state", "skipped", 0, "interrupted",
                   0, "stopping_generation", 0, "job", have ? v->id : "", "job_count",
                   queued_total + (have && v->state == QUEUE_RUNNING), "job_timestamp", stamp,
                   "job_no", 0, "sampling_step", have ? v->step : 0, "sampling_steps",
                   have ? (v->total ? v->total : v->spec.steps) : 0, "current_image", "textinfo");
}
