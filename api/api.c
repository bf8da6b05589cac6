/* Request validation and JSON views for the native /v1 API. A request is checked field by
 * field against the model it names, then its scheduler block is built by the queue exactly as a
 * worker will build it, so every error surfaces as a 400 naming the field, before the 202. */
#include "api.h"
#include "internal.h"

#include "base64.h"
#include "clip.h"
#include "edit.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#define MAX_SEED ((1ll << 53) - 1) /* JSON clients carry numbers as doubles */
#define MAX_FIRST_IMAGE (1ll << 31)

/* The length of the well-formed UTF-8 sequence at p, or 0: RFC 3629's table, so no C0/C1 or
 * other overlong form, no surrogate (ED A0-BF), nothing above U+10FFFF (F4 90+, F5-FF), no
 * stray continuation byte and no sequence cut short (a NUL is never a continuation byte, so
 * nothing is read past the end). */
static int utf8_sequence(const unsigned char *p) {
  const unsigned c = p[0];
  if (c < 0x80)
    return 1;
  if (c < 0xc2 || c > 0xf4)
    return 0;
  const int n = c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
  const unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
  const unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
  if (p[1] < lo || p[1] > hi)
    return 0;
  for (int i = 2; i < n; i++)
    if ((p[i] & 0xc0) != 0x80)
      return 0;
  return n;
}

/* Messages quote what clients sent (a .npy header, a key) and may be cut mid-character: JSON
 * strings must be UTF-8 or the error cannot be sent at all, so every byte that does not begin a
 * well-formed sequence becomes '?'. */
static void make_utf8(char *s) {
  for (unsigned char *p = (unsigned char *)s; *p;) {
    const int n = utf8_sequence(p);
    if (n)
      p += n;
    else
      *p++ = '?';
  }
}

int api_fail(api_error *e, int status, const char *code, const char *field, const char *fmt, ...) {
  e->status = status;
  snprintf(e->code, sizeof e->code, "%s", code);
  snprintf(e->field, sizeof e->field, "%s", field ? field : "");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  make_utf8(e->field);
  make_utf8(e->message);
  return status;
}

json_t *api_error_json(const api_error *e) {
  return json_pack("{s:{s:s, s:s, s:o}}", "error", "code", e->code, "message", e->message, "field",
                   e->field[0] ? json_string(e->field) : json_null());
}

int api_fail_queue(api_error *e, const err *qe) {
  switch (qe->code) {
  case QUEUE_FULL: e->retry_after = 5; return api_fail(e, 429, "queue_full", NULL, "%s", qe->msg);
  case QUEUE_LIMIT:
    e->retry_after = 5;
    return api_fail(e, 429, "too_many_jobs", NULL, "%s", qe->msg);
  case QUEUE_NOT_FOUND: return api_fail(e, 404, "not_found", NULL, "%s", qe->msg);
  case QUEUE_CONFLICT: return api_fail(e, 409, "conflict", NULL, "%s", qe->msg);
  case QUEUE_STOPPING:
    e->retry_after = 10;
    return api_fail(e, 503, "unavailable", NULL, "%s", qe->msg);
  case QUEUE_NOT_READY: return api_fail(e, 409, "not_ready", NULL, "%s", qe->msg);
  case QUEUE_TOO_LARGE: return api_fail(e, 413, "job_too_large", NULL, "%s", qe->msg);
  case QUEUE_KEY_REUSED:
    return api_fail(e, 422, "idempotency_key_reused", "Idempotency-Key", "%s", qe->msg);
  case QUEUE_KEY_BUSY:
    e->retry_after = 1;
    return api_fail(e, 409, "idempotency_key_busy", "Idempotency-Key", "%s", qe->msg);
  case QUEUE_UNAVAILABLE:
    e->retry_after = 5;
    return api_fail(e, 503, "store_unavailable", NULL, "the job could not be stored: %s", qe->msg);
  case ERR_IO:
    return api_fail(e, strstr(qe->msg, "No space left") ? 507 : 500, "storage_error", NULL,
                    "the job could not be stored: %s", qe->msg);
  case ERR_NOMEM: return api_fail(e, 503, "out_of_memory", NULL, "%s", qe->msg);
  default: return api_fail(e, 500, "internal", NULL, "%s", qe->msg);
  }
}

int api_idempotency(const char *key, const char *body, size_t len, queue_spec *spec, api_error *e) {
  if (!key)
    return 0;
  const size_t n = strlen(key);
  if (n == 0 || n >= sizeof spec->idem_key)
    return api_fail(e, 400, "invalid_header", "Idempotency-Key",
                    "Idempotency-Key: 1 to %zu characters", sizeof spec->idem_key - 1);
  for (size_t i = 0; i < n; i++)
    if (key[i] < 0x21 || key[i] > 0x7e)
      return api_fail(e, 400, "invalid_header", "Idempotency-Key",
                      "Idempotency-Key: visible ASCII characters only (byte %zu)", i);
  /* FNV-1a: tells a retry from a different request under the same key, not a security check
   * (a key is the client's own) */
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < len; i++)
    h = (h ^ (uint8_t)body[i]) * 0x100000001b3ull;
  memcpy(spec->idem_key, key, n + 1);
  spec->idem_hash = h;
  return 0;
}

int api_parse_uint(const char *s, unsigned long long max, unsigned long long *out) {
  if (!s || s[0] < '0' || s[0] > '9' || (s[0] == '0' && s[1]))
    return -1;
  unsigned long long v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9')
      return -1;
    const unsigned d = (unsigned)(*p - '0');
    if (d > max || v > (max - d) / 10) /* v * 10 + d > max, without overflow */
      return -1;
    v = v * 10 + d;
  }
  *out = v;
  return 0;
}

/* Whole seconds, like every time a client sees: milliseconds between started_at and
 * finished_at would time the model (DeepPeep). */
json_t *api_time_json(double t) {
  if (t <= 0)
    return json_null();
  time_t s = (time_t)t;
  struct tm tm;
  gmtime_r(&s, &tm);
  char buf[64];
  snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
           tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  return json_string(buf);
}

/* The whole seconds between two times as the views show them (each cut to the second), so a
 * duration says no more than the timestamps beside it. */
static json_t *seconds_between(double from, double to) {
  return json_integer((json_int_t)(floor(to) - floor(from)));
}

int api_int_value(const json_t *v, const char *field, long long lo, long long hi, int allow_real,
                  long long *out, api_error *e) {
  long long x;
  if (json_is_integer(v)) {
    x = json_integer_value(v);
  } else if (allow_real && json_is_real(v)) {
    const double d = json_real_value(v);
    /* the range first: converting a double outside long long is undefined behaviour */
    if (!(d >= (double)lo && d <= (double)hi && fabs(d) < 0x1p62))
      return api_fail(e, 400, "out_of_range", field, "%s: %g is out of range [%lld, %lld]", field,
                      d, lo, hi);
    if (d != floor(d))
      return api_fail(e, 400, "wrong_type", field, "%s: expected an integer, got %g", field, d);
    x = (long long)d;
  } else {
    return api_fail(e, 400, "wrong_type", field, "%s: expected an integer, got %s", field,
                    sched_json_kind(v));
  }
  if (x < lo || x > hi)
    return api_fail(e, 400, "out_of_range", field, "%s: %lld is out of range [%lld, %lld]", field,
                    x, lo, hi);
  *out = x;
  return 0;
}

/* An integer field in [lo, hi]; 0 with *out untouched when absent. */
int api_get_int(const json_t *obj, const char *key, const char *field, long long lo, long long hi,
                long long *out, int *present, api_error *e) {
  const json_t *v = json_object_get(obj, key);
  *present = v != NULL;
  if (!v)
    return 0;
  return api_int_value(v, field, lo, hi, 0, out, e);
}

static int parse_body(const char *body, size_t len, json_t **out, api_error *e) {
  json_error_t je;
  if (len == 0)
    return api_fail(e, 400, "invalid_json", NULL, "the request body is empty: send a JSON object");
  json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
  if (!j)
    return api_fail(e, 400, "invalid_json", NULL, "invalid JSON at line %d, column %d: %s", je.line,
                    je.column, je.text);
  if (!json_is_object(j)) {
    api_fail(e, 400, "invalid_json", NULL, "the body must be a JSON object, not %s",
             sched_json_kind(j));
    json_decref(j);
    return e->status;
  }
  *out = j;
  return 0;
}

uint64_t api_random_seed(void) {
  uint64_t s = 0;
  if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s)
    s = (uint64_t)time(NULL) * 2654435761u;
  return s & (uint64_t)MAX_SEED;
}

/* Any name the engine accepts: ours ("dpm++2m") or a diffusers class ("DDIMScheduler"). */
static const char *resolve_solver(const char *name) {
  return sampler_solver_class(name) ? name : NULL;
}

static void solver_list(char *buf, size_t n) {
  buf[0] = 0;
  for (int i = 0; i < sampler_solver_count(); i++) {
    size_t l = strlen(buf);
    snprintf(buf + l, n - l, "%s%s", i ? ", " : "", sampler_solver_name(i));
  }
}

/* class_label: an index, or one of the model's class names. */
int api_parse_label(const json_t *v, const queue_model_desc *md, const char *field, int64_t *out,
                    api_error *e) {
  if (json_is_integer(v)) {
    long long x = json_integer_value(v);
    if (x < 0 || x >= md->num_classes)
      return api_fail(e, 400, "out_of_range", field, "%s: %lld is out of range [0, %d)", field, x,
                      md->num_classes);
    *out = x;
    return 0;
  }
  if (json_is_string(v)) {
    const char *name = json_string_value(v);
    size_t i;
    json_t *l;
    json_array_foreach(md->class_labels, i, l) {
      if (json_is_string(l) && strcasecmp(json_string_value(l), name) == 0 &&
          (int)i < md->num_classes) {
        *out = (int64_t)i;
        return 0;
      }
    }
    char names[512] = "";
    json_array_foreach(md->class_labels, i, l) {
      size_t n = strlen(names);
      if (json_is_string(l))
        snprintf(names + n, sizeof names - n, "%s%s", i ? ", " : "", json_string_value(l));
    }
    return api_fail(e, 400, "invalid_field", field,
                    "%s: '%s' is not a class of model '%s' (classes: %s)", field, name, md->name,
                    names[0] ? names : "by index only");
  }
  return api_fail(e, 400, "wrong_type", field, "%s: expected a class index or name, got %s", field,
                  sched_json_kind(v));
}

/* The null class of a model that names its classes and not it (glyphs32's 36) is the
 * unconditional label guidance uses, not a picture anyone asked for. */
static int check_not_null_class(const queue_model_desc *md, int64_t label, api_error *e) {
  const size_t named = md->class_labels ? json_array_size(md->class_labels) : 0;
  if (md->null_class < 0 || label != md->null_class || !named || (size_t)label < named)
    return 0;
  return api_fail(e, 400, "out_of_range", "class_label",
                  "class_label: %lld is model '%s''s null class (the unconditional label of "
                  "classifier-free guidance), not a class: give one of [0, %zu)",
                  (long long)label, md->name, named);
}

int api_model_size(const queue_model_desc *md) {
  return md->sample_size * (md->latent_factor > 0 ? md->latent_factor : 1);
}

/* A latent model's UNet needs latents its down-samplings divide: multiples of 8 latents, as
 * Stable Diffusion's three; a pixel UNet its own size or a multiple of 32. */
int api_size_multiple(const queue_model_desc *md) {
  return md->latent_factor > 1 ? 8 * md->latent_factor : md->kind == MODEL_UNET2D ? 32 : 0;
}

/* Checks a size against what the model can produce. */
static int check_size(const api_ctx *c, const queue_model_desc *md, const char *field, int v,
                      api_error *e) {
  if (v < 1 || v > c->max_image_size)
    return api_fail(e, 400, "out_of_range", field, "%s: %d is out of range [1, %d]", field, v,
                    c->max_image_size);
  if (md->latent_factor > 1 && v % api_size_multiple(md) != 0)
    return api_fail(e, 400, "invalid_field", field,
                    "%s: %d must be a multiple of %d for model '%s' (8 latents of %d pixels)",
                    field, v, api_size_multiple(md), md->name, md->latent_factor);
  if (md->kind == MODEL_GAUSSIAN_MIXTURE && v != md->sample_size)
    return api_fail(e, 400, "invalid_field", field, "%s: model '%s' produces %dx%d images only",
                    field, md->name, md->sample_size, md->sample_size);
  if (md->kind == MODEL_UNET2D && v != md->sample_size && v % 32 != 0)
    return api_fail(e, 400, "invalid_field", field,
                    "%s: %d must be the model's size %d or a multiple of 32", field, v,
                    md->sample_size);
  return 0;
}

#define API_MAX_GUIDANCE 50.0

/* guidance: {"scale": number in [0, API_MAX_GUIDANCE], "null_class"?: int} for class-conditional
 * models; the null class defaults to the model's own. */
/* The index of `v` (a name of `names`, case-insensitive, or an integer index) in names, or -1. */
static int name_index(const json_t *names, const json_t *v) {
  const size_t n = json_array_size(names);
  if (json_is_integer(v))
    return json_integer_value(v) >= 0 && (size_t)json_integer_value(v) < n
               ? (int)json_integer_value(v)
               : -1;
  for (size_t i = 0; json_is_string(v) && i < n; i++) {
    const json_t *name = json_array_get(names, i);
    if (json_is_object(name))
      name = json_object_get(name, "name");
    if (strcasecmp(json_string_value(name), json_string_value(v)) == 0)
      return (int)i;
  }
  return -1;
}

/* guidance.classifier {scale, target, head}: classifier guidance with the model's classifier
 * (MODEL/classifier/), the head by name (default its first) and the target by name or index. */
static int parse_classifier(const json_t *g, const queue_model_desc *md, queue_spec *out,
                            api_error *e) {
  static const char *const keys[] = {"scale", "target", "head", NULL};
  int rc = json_is_object(g) ? api_check_keys(g, "guidance.classifier.", keys, e)
                             : api_fail(e, 400, "wrong_type", "guidance.classifier",
                                        "guidance.classifier: expected an object {scale, target, "
                                        "head}, got %s",
                                        sched_json_kind(g));
  if (rc)
    return rc;
  if (!md->classifier)
    return api_fail(e, 400, "invalid_field", "guidance.classifier",
                    "guidance.classifier: model '%s' has no classifier (a GlyphClassifier folder "
                    "in its classifier/ subfolder)",
                    md->name);
  if (strcmp(md->prediction_type[0] ? md->prediction_type : "epsilon", "epsilon") != 0)
    return api_fail(e, 400, "invalid_field", "guidance.classifier",
                    "guidance.classifier: model '%s' predicts '%s'; classifier guidance needs "
                    "an epsilon model",
                    md->name, md->prediction_type);
  const json_t *sc = json_object_get(g, "scale"), *hd = json_object_get(g, "head");
  const json_t *tg = json_object_get(g, "target");
  if (!json_is_number(sc) || !(json_number_value(sc) >= 0) ||
      json_number_value(sc) > API_MAX_GUIDANCE)
    return api_fail(e, 400, sc ? "out_of_range" : "missing_field", "guidance.classifier.scale",
                    "guidance.classifier.scale: a number in [0, %g]", API_MAX_GUIDANCE);
  const json_t *heads = json_object_get(md->classifier, "heads");
  const int h = hd ? name_index(heads, hd) : 0;
  if (h < 0)
    return api_fail(e, 400, "invalid_field", "guidance.classifier.head",
                    "guidance.classifier.head: not a head of model '%s''s classifier (GET "
                    "/v1/models lists them)",
                    md->name);
  const json_t *labels = json_object_get(json_array_get(heads, (size_t)h), "labels");
  const int t = tg ? name_index(labels, tg) : -1;
  if (t < 0)
    return api_fail(e, 400, tg ? "invalid_field" : "missing_field", "guidance.classifier.target",
                    "guidance.classifier.target: give a class of head '%s' (a name or an index "
                    "in [0, %zu))",
                    json_string_value(json_object_get(json_array_get(heads, (size_t)h), "name")),
                    json_array_size(labels));
  out->has_classifier = 1;
  out->clf_scale = json_number_value(sc);
  out->clf_head = h;
  out->clf_target = t;
  return 0;
}

static int parse_guidance(const json_t *g, const queue_model_desc *md, queue_spec *out,
                          api_error *e) {
  static const char *const keys[] = {"scale", "null_class", "thresholding", "classifier", NULL};
  if (!json_is_object(g))
    return api_fail(e, 400, "wrong_type", "guidance",
                    "guidance: expected an object {scale, null_class}, got %s", sched_json_kind(g));
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)g, key, v) {
    int ok = 0;
    for (int i = 0; keys[i]; i++)
      ok |= strcmp(keys[i], key) == 0;
    if (!ok) {
      char field[128];
      snprintf(field, sizeof field, "guidance.%s", key);
      return api_fail(e, 400, "unknown_field", field, "%s: unknown field", field);
    }
  }
  const json_t *sc = json_object_get(g, "scale");
  if (!sc)
    return api_fail(e, 400, "missing_field", "guidance.scale",
                    "guidance.scale: give the guidance scale (1: the conditional model alone)");
  if (!json_is_number(sc))
    return api_fail(e, 400, "wrong_type", "guidance.scale",
                    "guidance.scale: expected a number, got %s", sched_json_kind(sc));
  if (md->num_classes <= 0 && !md->text_conditional)
    return api_fail(e, 400, "invalid_field", "guidance.scale",
                    "guidance.scale: model '%s' is not class-conditional: classifier-free "
                    "guidance needs class labels",
                    md->name);
  const double x = json_number_value(sc);
  if (!isfinite(x) || x < 0 || x > API_MAX_GUIDANCE)
    return api_fail(e, 400, "out_of_range", "guidance.scale",
                    "guidance.scale: %g is out of range [0, %g]", x, API_MAX_GUIDANCE);
  out->null_class = md->null_class;
  const json_t *nc = json_object_get(g, "null_class");
  if (nc && md->text_conditional && md->num_classes <= 0)
    return api_fail(e, 400, "invalid_field", "guidance.null_class",
                    "guidance.null_class: model '%s' is text-to-image: guidance steers away "
                    "from negative_prompt, not a class",
                    md->name);
  if (nc) {
    if (!json_is_integer(nc))
      return api_fail(e, 400, "wrong_type", "guidance.null_class",
                      "guidance.null_class: expected an integer, got %s", sched_json_kind(nc));
    const long long lo = md->kind == MODEL_GAUSSIAN_MIXTURE ? -1 : 0;
    const long long n = json_integer_value(nc);
    if (n < lo || n >= md->num_classes)
      return api_fail(e, 400, "out_of_range", "guidance.null_class",
                      "guidance.null_class: %lld is out of range [%lld, %d)", n, lo,
                      md->num_classes);
    out->null_class = n;
  }
  out->has_guidance = 1;
  out->guidance_scale = x;
  const json_t *clf = json_object_get(g, "classifier");
  return clf && !json_is_null(clf) ? parse_classifier(clf, md, out, e) : 0;
}

/* guidance.thresholding: true (diffusers' dynamic thresholding, ratio 0.995, max 1) or
 * {ratio, max_value}: the scheduler options DPM-Solver++ and DDIM read, so large guidance
 * scales stay in range. The same keys in scheduler.options must agree. */
static int merge_thresholding(const json_t *g, json_t *options, api_error *e) {
  const json_t *th = g ? json_object_get(g, "thresholding") : NULL;
  if (!th || json_is_null(th))
    return 0;
  static const char *const keys[] = {"ratio", "max_value", NULL};
  json_t *want = json_object();
  int rc = 0;
  if (json_is_boolean(th)) {
    json_object_set_new(want, "thresholding", json_boolean(json_is_true(th)));
  } else if (json_is_object(th)) {
    if ((rc = api_check_keys(th, "guidance.thresholding.", keys, e)))
      goto done;
    json_object_set_new(want, "thresholding", json_true());
    const json_t *r = json_object_get(th, "ratio"), *m = json_object_get(th, "max_value");
    if (r && (!json_is_number(r) || !(json_number_value(r) > 0 && json_number_value(r) <= 1))) {
      rc = api_fail(e, 400, "out_of_range", "guidance.thresholding.ratio",
                    "guidance.thresholding.ratio: a quantile in (0, 1]");
      goto done;
    }
    if (m && (!json_is_number(m) || !(json_number_value(m) >= 1 && json_number_value(m) <= 100))) {
      rc = api_fail(e, 400, "out_of_range", "guidance.thresholding.max_value",
                    "guidance.thresholding.max_value: a number in [1, 100]");
      goto done;
    }
    if (r)
      json_object_set_new(want, "dynamic_thresholding_ratio", json_real(json_number_value(r)));
    if (m)
      json_object_set_new(want, "sample_max_value", json_real(json_number_value(m)));
  } else {
    rc = api_fail(e, 400, "wrong_type", "guidance.thresholding",
                  "guidance.thresholding: expected a boolean or {ratio, max_value}, got %s",
                  sched_json_kind(th));
    goto done;
  }
  const char *key;
  json_t *v;
  json_object_foreach(want, key, v) {
    const json_t *have = json_object_get(options, key);
    if (have && !json_equal(have, v) &&
        !(json_is_number(have) && json_is_number(v) &&
          json_number_value(have) == json_number_value(v))) {
      rc = api_fail(e, 400, "invalid_field", "guidance.thresholding",
                    "guidance.thresholding: disagrees with scheduler.options.%s", key);
      goto done;
    }
    json_object_set(options, key, v);
  }
done:
  json_decref(want);
  return rc;
}

/* The job's compute in megapixel-evaluations (an upper bound: img2img runs fewer steps, an
 * inversion runs its grid twice), against this server's per-job budget. A fine-tuning whose
 * training dominates is refused naming its own fields (edit.steps, edit.batch), the fields a
 * user lowers. */
static int check_cost(const api_ctx *c, queue_spec *out, int nfe, api_error *e) {
  const int inversion = out->edit == QUEUE_EDIT_INVERT_DDIM || out->edit == QUEUE_EDIT_INVERT_DDPM;
  /* a concept's or stylization's optimisation: per step, its batch sampled once and then through
   * the adjoint (about five more evaluations' work per evaluation), before the job's images */
  const json_t *ca =
      out->edit == QUEUE_EDIT_CONCEPT || out->edit == QUEUE_EDIT_STYLIZE ? out->edit_args : NULL;
  const json_t *aa = out->edit == QUEUE_EDIT_AUDIT ? out->edit_args : NULL;
  const double runs = /* an audit: per box, iters ascent steps (sample + adjoint) and random */
      aa ? 1.0 + (double)json_array_size(json_object_get(aa, "eps")) *
                     (7.0 * (double)json_integer_value(json_object_get(aa, "iters")) + 1.0 +
                      (double)json_integer_value(json_object_get(aa, "random")))
         : 1.0;
  const double optimised = ca ? 6.0 * (double)json_integer_value(json_object_get(ca, "steps")) *
                                    (double)json_integer_value(json_object_get(ca, "batch"))
                              : 0.0;
  /* a fine-tuning: per step, its batch through the network and back (about three evaluations)
   * and, for DomainStudio, through the frozen source */
  const json_t *fa = out->edit == QUEUE_EDIT_FINETUNE ? out->edit_args : NULL;
  const int passes =
      fa && strcmp(json_string_value(json_object_get(fa, "method")), "plain") != 0 ? 4 : 3;
  const double train = fa ? (double)json_integer_value(json_object_get(fa, "steps")) *
                                (double)json_integer_value(json_object_get(fa, "batch")) * passes
                          : 0.0;
  /* every network evaluation of a sampling run: twice with guidance, an inversion's twice */
  const double per_eval = (out->has_guidance ? 2 : 1) * (inversion ? 2 : 1);
  const double sampling = out->batch * runs * nfe * per_eval;
  const double optimisation = optimised * nfe * per_eval;
  out->cost = (sampling + optimisation + train) * out->height * out->width / 1e6;
  if (c->max_job_cost <= 0 || out->cost <= c->max_job_cost)
    return 0;
  if (fa && train >= sampling)
    return api_fail(
        e, 400, "over_budget", NULL,
        "this fine-tuning needs %.0f megapixel-evaluations: edit.steps %" JSON_INTEGER_FORMAT
        " x edit.batch %" JSON_INTEGER_FORMAT
        " training images, each through the network about %d times (edit.method "
        "'%s'), at %dx%d pixels; this server allows %.0f per job (max_job_cost): "
        "fewer edit.steps or a smaller edit.batch",
        out->cost, json_integer_value(json_object_get(fa, "steps")),
        json_integer_value(json_object_get(fa, "batch")), passes,
        json_string_value(json_object_get(fa, "method")), out->width, out->height, c->max_job_cost);
  return api_fail(e, 400, "over_budget", NULL,
                  "this job needs %.0f megapixel-evaluations (batch_size %d x %d network "
                  "evaluations%s x %dx%d pixels); this server allows %.0f per job "
                  "(max_job_cost): fewer images, steps or pixels",
                  out->cost, out->batch, nfe * (inversion ? 2 : 1),
                  out->has_guidance ? " x 2 for guidance" : "", out->width, out->height,
                  c->max_job_cost);
}

/* The model a job names, or the default; the error lists what is served. */
static int find_model(const api_ctx *c, const api_job_fields *f, queue_model_desc *md,
                      api_error *e) {
  const char *mname = f->model ? f->model : c->default_model;
  if (queue_model_get(c->q, -1, mname, md) == ERR_OK)
    return 0;
  char names[512] = "";
  for (int i = 0; i < queue_model_count(c->q); i++) {
    queue_model_desc d;
    if (queue_model_get(c->q, i, NULL, &d) == ERR_OK) {
      size_t n = strlen(names);
      snprintf(names + n, sizeof names - n, "%s%s", n ? ", " : "", d.name);
      queue_model_desc_clear(&d);
    }
  }
  return api_fail(e, 400, "invalid_field", "model", "model: no model named '%s' (available: %s)",
                  mname, names);
}

/* class_label: required by a class-conditional model (the error lists its classes), refused
 * by others. */
static int parse_class(const api_job_fields *f, const queue_model_desc *md, queue_spec *out,
                       api_error *e) {
  if (md->num_classes <= 0) {
    if (f->label && !json_is_null(f->label))
      return api_fail(e, 400, "invalid_field", "class_label",
                      md->text_conditional
                          ? "class_label: model '%s' is text-to-image: give a prompt, not a class"
                          : "class_label: model '%s' is not class-conditional",
                      md->name);
    return 0;
  }
  const char *et = json_string_value(json_object_get(f->edit, "type"));
  if (!f->label && et && strcmp(et, "concept") == 0)
    return 0; /* a concept starts from the mean row unless a class is given */
  if (!f->label) {
    char names[256] = "";
    size_t i;
    json_t *l;
    json_array_foreach(md->class_labels, i, l) {
      size_t n = strlen(names);
      if (json_is_string(l))
        snprintf(names + n, sizeof names - n, "%s%zu=%s", i ? ", " : "", i, json_string_value(l));
    }
    return api_fail(e, 400, "missing_field", "class_label",
                    "class_label: model '%s' is class-conditional, give a class (%s)", md->name,
                    names[0] ? names : "an index");
  }
  int rc = api_parse_label(f->label, md, "class_label", &out->label, e);
  if (!rc)
    rc = check_not_null_class(md, out->label, e);
  out->has_label = !rc;
  return rc;
}

/* The solver by name or alias and its steps (the solver's default when not given). */
static int parse_solver(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                        queue_spec *out, api_error *e) {
  /* none named: the model's recommendation (its steps with it), else ddim */
  const char *solver = resolve_solver(f->solver           ? f->solver
                                      : md->rec_solver[0] ? md->rec_solver
                                                          : "ddim");
  if (!solver && !f->solver)
    return api_fail(e, 500, "internal", "model",
                    "model '%s' recommends solver '%s', which this server does not have", md->name,
                    md->rec_solver);
  if (!solver) {
    char list[256];
    solver_list(list, sizeof list);
    return api_fail(e, 400, "invalid_field", f->solver_field,
                    "%s: unknown solver '%s' (one of: %s)", f->solver_field, f->solver, list);
  }
  snprintf(out->solver, sizeof out->solver, "%s", solver);
  out->steps = f->has_steps                      ? (int)f->steps
               : !f->solver && md->rec_steps > 0 ? md->rec_steps
                                                 : sampler_solver_default_steps(solver);
  if (out->steps > c->max_steps)
    return api_fail(e, 400, "out_of_range", "scheduler.steps",
                    "scheduler.steps: %s defaults to %d steps, above this server's limit of %d; "
                    "give steps",
                    solver, out->steps, c->max_steps);
  return 0;
}

/* The sampler the spec describes, built once to validate the scheduler block; a thresholding
 * the guidance block asked for is named there. */
static int make_sampler(const api_ctx *c, const api_job_fields *f, queue_spec *out, sampler **s,
                        api_error *e) {
  err qe = {0};
  char field[128] = "";
  if (queue_make_sampler(c->q, out, s, field, sizeof field, &qe) == ERR_OK)
    return 0;
  const json_t *th = f->guidance ? json_object_get(f->guidance, "thresholding") : NULL;
  if (th && strncmp(field, "scheduler.options.", 18) == 0 &&
      (strstr(field, "thresholding") || strstr(field, "sample_max_value")) &&
      !(f->options && json_object_get(f->options, field + 18)))
    snprintf(field, sizeof field, "guidance.thresholding");
  return api_fail(e, 400, strstr(qe.msg, "out of range") ? "out_of_range" : "invalid_field",
                  field[0] ? field : "scheduler", "%s: %s", field[0] ? field : "scheduler", qe.msg);
}

/* A prompt field: a string of at most CLIP_MAX_PROMPT_BYTES, copied into *out (bodies are read
 * without JSON_ALLOW_NUL: no "\u0000" reaches here, and strings are UTF-8 already). */
static int text_field(const json_t *v, const char *field, char **out, api_error *e) {
  if (!json_is_string(v))
    return api_fail(e, 400, "wrong_type", field, "%s: expected a string, got %s", field,
                    sched_json_kind(v));
  const size_t n = json_string_length(v);
  if (n > CLIP_MAX_PROMPT_BYTES)
    return api_fail(e, 400, "out_of_range", field, "%s: %zu bytes, over the limit of %d", field, n,
                    CLIP_MAX_PROMPT_BYTES);
  if (!(*out = strdup(json_string_value(v))))
    return api_fail(e, 503, "out_of_memory", NULL, "out of memory");
  return 0;
}

/* prompt, negative_prompt and clip_skip: a text-to-image model needs its prompt ("" for the
 * unconditional picture) and takes clip skip up to its text encoder's layers; other models
 * take none of them. Text models make no previews (they would show latents) and of the edits
 * img2img and inpainting only. */
static int parse_text(const api_job_fields *f, const queue_model_desc *md, queue_spec *out,
                      api_error *e) {
  if (!md->text_conditional) {
    const char *field = f->prompt            ? "prompt"
                        : f->negative_prompt ? "negative_prompt"
                        : f->clip_skip       ? "clip_skip"
                                             : NULL;
    if (!field)
      return 0;
    return api_fail(
        e, 400, "invalid_field", field, "%s: model '%s' takes no prompt (%s)", field, md->name,
        md->num_classes > 0 ? "it is class-conditional: give class_label" : "it is unconditional");
  }
  /* the engine edits latents by img2img and inpainting (the picture VAE-encoded); inversions
   * and boundary moves of latents are not offered here */
  const char *et = json_string_value(json_object_get(f->edit, "type"));
  if (et && strcmp(et, "img2img") != 0 && strcmp(et, "inpaint") != 0)
    return api_fail(e, 400, "invalid_field", "edit.type",
                    "edit.type: model '%s' is a latent text-to-image model: img2img and inpaint "
                    "only (no inversions or boundary edits of its latents here yet)",
                    md->name);
  if (f->preview)
    return api_fail(e, 400, "invalid_field", "preview",
                    "preview: model '%s' samples latents: it makes no previews", md->name);
  if (!f->prompt)
    return api_fail(e, 400, "missing_field", "prompt",
                    "prompt: model '%s' is text-to-image: give a prompt (\"\" for none)", md->name);
  int rc = text_field(f->prompt, "prompt", &out->prompt, e);
  if (!rc && f->negative_prompt)
    rc = text_field(f->negative_prompt, "negative_prompt", &out->negative_prompt, e);
  long long skip = 0;
  if (!rc && f->clip_skip &&
      !(rc = api_int_value(f->clip_skip, "clip_skip", 1, md->text_layers, 0, &skip, e)))
    out->clip_skip = (int)skip;
  return rc;
}

/* Sizes, seed, class, guidance and solver of a job (everything but the edit block). */
static int spec_basics(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                       const char *owner, queue_spec *out, api_error *e) {
  snprintf(out->model, sizeof out->model, "%s", md->name);
  snprintf(out->owner, sizeof out->owner, "%s", owner ? owner : "");
  out->batch = (int)f->batch;
  out->seed = f->has_seed && f->seed >= 0 ? (uint64_t)f->seed : api_random_seed();
  out->first_image = (uint64_t)f->first_image;
  out->height = f->has_height ? (int)f->height : api_model_size(md);
  out->width = f->has_width ? (int)f->width : api_model_size(md);
  out->preview_every = (int)f->preview;
  int rc;
  if ((rc = check_size(c, md, "height", out->height, e)) ||
      (rc = check_size(c, md, "width", out->width, e)) || (rc = parse_text(f, md, out, e)) ||
      (rc = parse_class(f, md, out, e)) ||
      (f->guidance && (rc = parse_guidance(f->guidance, md, out, e))) ||
      (rc = parse_solver(c, f, md, out, e)))
    return rc;
  if (md->text_conditional && strcmp(out->solver, "dpm-ot") == 0)
    return api_fail(e, 400, "invalid_field", f->solver_field,
                    "%s: dpm-ot is not built for text-to-image models", f->solver_field);
  /* no guidance block: the model's recommended scale, for generation, img2img and inpainting
   * (an inversion's guidance is part of the picture it inverts: never implied) */
  const char *et = json_string_value(json_object_get(f->edit, "type"));
  if (!f->guidance && !f->no_guidance && md->num_classes > 0 && md->rec_guidance >= 0 &&
      (!et || strcmp(et, "img2img") == 0 || strcmp(et, "inpaint") == 0 ||
       strcmp(et, "concept") == 0 || strcmp(et, "audit") == 0 || strcmp(et, "stylize") == 0)) {
    out->has_guidance = 1;
    out->guidance_scale = md->rec_guidance;
    out->null_class = md->null_class;
  }
  if (!f->guidance && !f->no_guidance && md->text_conditional && !out->has_guidance) {
    out->has_guidance = 1; /* the model's recommendation, else StableDiffusionPipeline's 7.5 */
    out->guidance_scale = md->rec_guidance >= 0 ? md->rec_guidance : 7.5;
    out->null_class = -1;
  }
  if (md->text_conditional && md->num_classes <= 0)
    out->null_class = -1; /* the negative prompt is its unconditional side */
  out->options = f->options ? json_deep_copy(f->options) : json_object();
  if (f->data)
    snprintf(out->data, sizeof out->data, "%s", f->data);
  return merge_thresholding(f->guidance, out->options, e);
}

/* Resolves model, sizes, seed and solver; builds the sampler once to validate the scheduler
 * block. Shared by /v1/jobs and /sdapi/v1/txt2img. */
static int finish_spec(const api_ctx *c, const api_job_fields *f, const char *owner,
                       queue_spec *out, api_error *e) {
  queue_model_desc md;
  memset(out, 0, sizeof *out);
  int rc = find_model(c, f, &md, e);
  if (rc)
    return rc;
  sampler *s = NULL;
  if (!(rc = spec_basics(c, f, &md, owner, out, e)) && !(rc = make_sampler(c, f, out, &s, e))) {
    out->steps = sampler_num_steps(s);
    rc = api_parse_edit(c, f, &md, s, owner, out, e);
    if (!rc)
      /* a data-dependent count (0) is counted at the cap the queue holds the run to: counted
       * as 0 it cost nothing against max_job_cost and max_key_cost */
      rc = check_cost(c, out, sampler_nfe(s) > 0 ? sampler_nfe(s) : c->max_varying_nfe, e);
    out->nfe_varies = sampler_nfe(s) == 0; /* never batched (queue_spec_compatible) */
    if (out->preview_every > out->steps)
      out->preview_every = out->steps;
  }
  sampler_free(s);
  if (rc)
    queue_spec_clear(out);
  queue_model_desc_clear(&md);
  return rc;
}

int api_check_keys(const json_t *obj, const char *prefix, const char *const *allowed,
                   api_error *e) {
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    int ok = 0;
    for (int i = 0; allowed[i]; i++)
      ok |= strcmp(allowed[i], key) == 0;
    if (ok)
      continue;
    char field[128];
    snprintf(field, sizeof field, "%s%s", prefix, key);
    return api_fail(e, 400, "unknown_field", field, "%s: unknown field", field);
  }
  return 0;
}

/* The scheduler block: a solver name (shorthand), or {name, steps, options, data}; data names
 * solver data of the model (MODEL/solver_data), never a path, so a client cannot make the server
 * read a file of its choosing. */
static int parse_scheduler(const api_ctx *c, const json_t *sc, api_job_fields *f, api_error *e) {
  static const char *const sched_keys[] = {"name", "steps", "options", "data", NULL};
  if (sc && !json_is_object(sc) && !json_is_string(sc))
    return api_fail(e, 400, "wrong_type", "scheduler",
                    "scheduler: expected an object {name, steps, options, data}, got %s",
                    sched_json_kind(sc));
  if (json_is_string(sc)) { /* shorthand: "scheduler": "ddim" */
    f->solver = json_string_value(sc);
    f->solver_field = "scheduler";
    return 0;
  }
  if (!sc)
    return 0;
  int rc = api_check_keys(sc, "scheduler.", sched_keys, e);
  const json_t *v = json_object_get(sc, "name");
  if (!rc && v && !json_is_string(v))
    rc = api_fail(e, 400, "wrong_type", "scheduler.name",
                  "scheduler.name: expected a solver name, got %s", sched_json_kind(v));
  f->solver = json_is_string(v) ? json_string_value(v) : NULL;
  if (!rc)
    rc = api_get_int(sc, "steps", "scheduler.steps", 1, c->max_steps, &f->steps, &f->has_steps, e);
  v = json_object_get(sc, "options");
  if (!rc && v && !json_is_object(v))
    rc = api_fail(e, 400, "wrong_type", "scheduler.options",
                  "scheduler.options: expected an object of scheduler_config keys, got %s",
                  sched_json_kind(v));
  f->options = (json_t *)v;
  v = json_object_get(sc, "data");
  if (!rc && v && !json_is_null(v) &&
      !(json_is_string(v) && sampler_data_name_ok(json_string_value(v))))
    rc = api_fail(e, 400, "invalid_field", "scheduler.data",
                  "scheduler.data: expected the name of one of the model's solver data (1 to %d "
                  "characters of A-Z a-z 0-9 . _ -, starting with a letter or digit; GET "
                  "/v1/models lists them), never a path",
                  SAMPLER_DATA_NAME_MAX);
  f->data = json_is_string(v) ? json_string_value(v) : NULL;
  return rc;
}

/* A field, or NULL when absent or null (the default). */
static const json_t *not_null(const json_t *v) {
  return json_is_null(v) ? NULL : v;
}

int api_parse_job(const api_ctx *c, const char *body, size_t len, const char *owner,
                  queue_spec *out, api_error *e) {
  static const char *const top[] = {
      "model",     "batch_size",  "seed",        "class_label", "width",
      "height",    "scheduler",   "first_image", "preview",     "guidance",
      "edit",      "input_image", "mask",        "prompt",      "negative_prompt",
      "clip_skip", NULL};
  static const char *const preview_keys[] = {"every", NULL};
  json_t *j = NULL;
  int rc = parse_body(body, len, &j, e);
  if (rc)
    return rc;
  api_job_fields f = {.batch = 1, .solver_field = "scheduler.name"};
  int present;
  if ((rc = api_check_keys(j, "", top, e)))
    goto done;
  const json_t *v = json_object_get(j, "model");
  if (json_is_null(v)) /* as for every other nullable field: the default */
    v = NULL;
  if (v && !json_is_string(v)) {
    rc = api_fail(e, 400, "wrong_type", "model", "model: expected a model name, got %s",
                  sched_json_kind(v));
    goto done;
  }
  f.model = v ? json_string_value(v) : NULL;
  if ((rc = api_get_int(j, "batch_size", "batch_size", 1, c->max_batch, &f.batch, &present, e)))
    goto done;
  v = json_object_get(j, "seed");
  if (v && !json_is_null(v)) {
    if ((rc = api_get_int(j, "seed", "seed", -1, MAX_SEED, &f.seed, &present, e)))
      goto done;
    f.has_seed = f.seed >= 0;
  }
  f.label = json_object_get(j, "class_label");
  if (f.label && json_is_null(f.label))
    f.label = NULL;
  f.guidance = json_object_get(j, "guidance");
  if (json_is_null(f.guidance)) { /* explicitly none: not even the model's recommended scale */
    f.guidance = NULL;
    f.no_guidance = 1;
  }
  if (f.guidance && json_is_null(f.guidance))
    f.guidance = NULL;
  f.edit = json_object_get(j, "edit");
  f.input_image = json_object_get(j, "input_image");
  f.mask = json_object_get(j, "mask");
  f.prompt = not_null(json_object_get(j, "prompt"));
  f.negative_prompt = not_null(json_object_get(j, "negative_prompt"));
  f.clip_skip = not_null(json_object_get(j, "clip_skip"));
  if ((rc = api_get_int(j, "width", "width", 1, c->max_image_size, &f.width, &f.has_width, e)) ||
      (rc =
           api_get_int(j, "height", "height", 1, c->max_image_size, &f.height, &f.has_height, e)) ||
      (rc = api_get_int(j, "first_image", "first_image", 0, MAX_FIRST_IMAGE, &f.first_image,
                        &present, e)))
    goto done;
  if ((rc = parse_scheduler(c, json_object_get(j, "scheduler"), &f, e)))
    goto done;
  const json_t *pv = json_object_get(j, "preview");
  if (pv) {
    if (!json_is_object(pv)) {
      rc = api_fail(e, 400, "wrong_type", "preview", "preview: expected an object {every}, got %s",
                    sched_json_kind(pv));
      goto done;
    }
    if ((rc = api_check_keys(pv, "preview.", preview_keys, e)) ||
        (rc = api_get_int(pv, "every", "preview.every", 1, c->max_steps, &f.preview, &present, e)))
      goto done;
    if (!present) {
      rc = api_fail(e, 400, "missing_field", "preview.every",
                    "preview.every: give the number of steps between previews");
      goto done;
    }
  }
  rc = finish_spec(c, &f, owner, out, e);
done:
  json_decref(j);
  return rc;
}

json_t *api_job_json(const queue_job_view *v, const char *prefix) {
  char self[256], url[300];
  snprintf(self, sizeof self, "%s%s", prefix, v->id);
  const queue_spec *s = &v->spec;
  json_t *req =
      json_pack("{s:s, s:i, s:I, s:i, s:i, s:I, s:{s:s, s:i, s:O}}", "model", s->model,
                "batch_size", s->batch, "seed", (json_int_t)s->seed, "width", s->width, "height",
                s->height, "first_image", (json_int_t)s->first_image, "scheduler", "name",
                s->solver, "steps", s->steps, "options", s->options ? s->options : json_object());
  if (s->has_label)
    json_object_set_new(req, "class_label", json_integer(s->label));
  if (s->prompt)
    json_object_set_new(req, "prompt", json_string(s->prompt));
  if (s->negative_prompt)
    json_object_set_new(req, "negative_prompt", json_string(s->negative_prompt));
  if (s->clip_skip)
    json_object_set_new(req, "clip_skip", json_integer(s->clip_skip));
  if (s->data[0])
    json_object_set_new(json_object_get(req, "scheduler"), "data", json_string(s->data));
  if (s->preview_every)
    json_object_set_new(req, "preview", json_pack("{s:i}", "every", s->preview_every));
  if (s->edit) {
    json_t *ed = json_pack("{s:s, s:b}", "type", queue_edit_name(s->edit), "mask", s->mask != NULL);
    if (s->edit != QUEUE_EDIT_DEBLUR) /* a restoration has no strength */
      json_object_set_new(ed, "strength", json_real(s->strength));
    const char *key;
    json_t *a;
    json_object_foreach(s->edit_args, key, a) {
      if (strcmp(key, "noise") == 0) /* the maps themselves stay out of the echo */
        json_object_set_new(ed, "noise", json_true());
      else if (strcmp(key, "boundary") == 0)
        json_object_set_new(
            ed, "boundary",
            json_pack(
                "{s:O, s:O, s:O}", "attribute",
                json_object_get(a, "attribute") ? json_object_get(a, "attribute") : json_null(),
                "step", json_object_get(a, "step") ? json_object_get(a, "step") : json_null(),
                "model", json_object_get(a, "model") ? json_object_get(a, "model") : json_null()));
      else
        json_object_set(ed, key, a);
    }
    json_object_set_new(req, "edit", ed);
  }
  if (s->has_guidance) /* a text model's unconditional side is its negative prompt */
    json_object_set_new(req, "guidance",
                        s->prompt && s->null_class < 0
                            ? json_pack("{s:f}", "scale", s->guidance_scale)
                            : json_pack("{s:f, s:I}", "scale", s->guidance_scale, "null_class",
                                        (json_int_t)s->null_class));
  if (s->has_classifier && json_object_get(req, "guidance"))
    json_object_set_new(json_object_get(req, "guidance"), "classifier",
                        json_pack("{s:f, s:i, s:I}", "scale", s->clf_scale, "head", s->clf_head,
                                  "target", (json_int_t)s->clf_target));
  json_t *images = json_array(), *links = json_array();
  for (int i = 0; i < s->batch; i++) {
    snprintf(url, sizeof url, "%s/images/%d", self, i);
    json_array_append_new(links, json_string(url));
    if (i < v->images)
      json_array_append_new(images, json_pack("{s:i, s:s, s:I, s:I}", "index", i, "url", url,
                                              "seed", (json_int_t)s->seed, "image_index",
                                              (json_int_t)(s->first_image + (uint64_t)i)));
  }
  snprintf(url, sizeof url, "%s/events", self);
  json_t *j = json_pack("{s:s, s:s, s:I, s:o, s:{s:i, s:i, s:i}, s:o, s:o, s:o, s:o, s:o, "
                        "s:{s:s, s:s, s:o}}",
                        "id", v->id, "state", queue_state_name(v->state), "seed",
                        (json_int_t)s->seed, "request", req, "progress", "step", v->step, "total",
                        v->total ? v->total : s->steps, "nfe", v->nfe, "created_at",
                        api_time_json(v->created), "started_at", api_time_json(v->started),
                        "finished_at", api_time_json(v->finished), "images", images, "timings",
                        json_object(), "links", "self", self, "events", url, "images", links);
  if (((s->edit == QUEUE_EDIT_INVERT_DDIM || s->edit == QUEUE_EDIT_INVERT_DDPM) &&
       s->input_image) ||
      s->edit == QUEUE_EDIT_AUDIT) {
    snprintf(url, sizeof url, "%s/noise.npy", self);
    json_object_set_new(json_object_get(j, "links"), "noise", json_string(url));
  }
  if (s->edit == QUEUE_EDIT_AUDIT) {
    snprintf(url, sizeof url, "%s/report.json", self);
    json_object_set_new(json_object_get(j, "links"), "report", json_string(url));
  }
  if (v->state == QUEUE_QUEUED)
    json_object_set_new(j, "position", json_integer(v->position));
  if (v->state == QUEUE_RUNNING && v->batched_with)
    json_object_set_new(j, "batched_with", json_integer(v->batched_with));
  if (v->state == QUEUE_FAILED || v->state == QUEUE_CANCELLED)
    json_object_set_new(j, "error", json_pack("{s:s}", "message", v->error));
  if (v->store_error[0]) /* finished, but not on disk yet: the state shown is the one before */
    json_object_set_new(j, "store_error", json_string(v->store_error));
  json_t *t = json_object_get(j, "timings");
  if (v->started > 0)
    json_object_set_new(t, "queued_seconds", seconds_between(v->created, v->started));
  if (v->finished > 0 && v->started > 0)
    json_object_set_new(t, "run_seconds", seconds_between(v->started, v->finished));
  if (v->finished > 0)
    json_object_set_new(t, "total_seconds", seconds_between(v->created, v->finished));
  return j;
}

json_t *api_models_json(const api_ctx *c, int internals) {
  json_t *arr = json_array();
  for (int i = 0; i < queue_model_count(c->q); i++) {
    queue_model_desc d;
    if (queue_model_get(c->q, i, NULL, &d) != ERR_OK)
      continue;
    /* what a request needs: sizes (in pixels), channels, classes or prompts */
    const int multiple = api_size_multiple(&d);
    json_t *m = json_pack(
        "{s:s, s:i, s:i, s:i, s:b, s:b, s:i, s:{s:i, s:o}}", "name", d.name, "sample_size",
        api_model_size(&d), "channels", d.image_channels, "num_classes", d.num_classes, "default",
        strcmp(d.name, c->default_model) == 0, "text_conditional", d.text_conditional,
        "latent_factor", d.latent_factor, "sizes", "default", api_model_size(&d), "multiple_of",
        multiple ? json_integer(multiple) : json_null());
    if (d.text_conditional) /* what prompt, negative_prompt and clip_skip may be */
      json_object_set_new(m, "text_encoder",
                          json_pack("{s:i, s:i, s:i}", "layers", d.text_layers, "tokens",
                                    d.text_tokens, "max_prompt_bytes", CLIP_MAX_PROMPT_BYTES));
    if (internals) {
      json_object_set_new(m, "kind",
                          json_string(d.kind == MODEL_UNET2D             ? "UNet2DModel"
                                      : d.kind == MODEL_GAUSSIAN_MIXTURE ? "GaussianMixtureDenoiser"
                                                                         : "UNet2DConditionModel"));
      json_object_set_new(m, "prediction_type",
                          json_string(d.prediction_type[0] ? d.prediction_type : "epsilon"));
      json_object_set_new(m, "num_params", json_integer((json_int_t)d.num_params));
    }
    if (d.class_labels)
      json_object_set(m, "class_labels", d.class_labels);
    /* what a job gets for what it leaves out (config.json "_recommended") */
    json_t *rec = json_object();
    if (d.rec_solver[0])
      json_object_set_new(rec, "scheduler", json_string(d.rec_solver));
    if (d.rec_steps > 0)
      json_object_set_new(rec, "steps", json_integer(d.rec_steps));
    if (d.rec_guidance >= 0)
      json_object_set_new(rec, "guidance_scale", json_real(d.rec_guidance));
    json_object_set_new(m, "recommended", rec);
    /* what a job may name as scheduler.data, with what each was computed for */
    json_object_set_new(m, "solver_data",
                        d.solver_data ? json_incref(d.solver_data) : json_array());
    if (d.classifier) /* what guidance.classifier may name */
      json_object_set(m, "classifier", d.classifier);
    json_array_append_new(arr, m);
    queue_model_desc_clear(&d);
  }
  return json_pack("{s:o}", "models", arr);
}

json_t *api_capabilities_json(const api_ctx *c) {
  json_t *solvers = json_array();
  for (int i = 0; i < sampler_solver_count(); i++) {
    const char *n = sampler_solver_name(i);
    /* the keys this solver reads, with the values its name implies, from the engine itself */
    json_t *spec = json_pack("{s:s}", "name", n), *opts = NULL;
    sampler *s = NULL;
    err e;
    if (spec && sampler_new_from_json(spec, NULL, &s, &e) == ERR_OK) {
      opts = sampler_config_json(s);
      sampler_free(s);
    }
    json_decref(spec);
    const char *summary = sampler_solver_summary(i);
    json_array_append_new(
        solvers, json_pack("{s:s, s:s?, s:s?, s:i, s:o}", "name", n, "diffusers_class",
                           sampler_solver_class(n), "summary", summary, "default_steps",
                           sampler_solver_default_steps(n), "options", opts ? opts : json_null()));
  }
  return json_pack(
      "{s:o, s:{s:i, s:i, s:i, s:i, s:i, s:i}, s:{s:i, s:i, s:i, s:i}, s:{s:b, s:b, s:b, s:b, "
      "s:b, s:b, s:b, s:b, s:b, s:b, s:b}, s:s}",
      "solvers", solvers, "limits", "max_batch", c->max_batch, "max_steps", c->max_steps,
      "max_image_size", c->max_image_size, "max_body_bytes", c->max_body_bytes, "queue_max",
      c->queue_max, "result_ttl_seconds", c->result_ttl, "workers", "workers", c->workers,
      "threads_per_job", c->threads_per_job, "cpu_budget", c->workers * c->threads_per_job,
      "batch_max_images", c->batch_max_images, "features", "events_sse", 1, "event_resume", 1,
      "preview", 1, "batching", c->batch_max_images > 1, "auth", c->auth, "a1111_compat", 1,
      "guidance", 1, "img2img", 1, "inpaint", 1, "invert", 1, "boundary", 1, "seed_scheme",
      "image i of a job uses Philox4x32 noise stream (seed, first_image + i): a job with "
      "batch_size 1 and first_image i regenerates it alone");
}
