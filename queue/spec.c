/* Job specs: what a client asked for, copied, compared for batching, and kept as JSON in the
 * job record. */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "mem.h"

/* ---- specs ---- */

static const char *const edit_names[] = {NULL,          "img2img",  "inpaint", "invert_ddim",
                                         "invert_ddpm", "boundary", "deblur",  "concept",
                                         "audit",       "stylize",  "finetune"};

const char *queue_edit_name(int edit) {
  return edit > 0 && edit < (int)(sizeof edit_names / sizeof *edit_names) ? edit_names[edit] : NULL;
}

int queue_edit_from_name(const char *name) {
  for (int k = 1; k < (int)(sizeof edit_names / sizeof *edit_names); k++)
    if (strcmp(name, edit_names[k]) == 0)
      return k;
  return -1;
}

/* Inversions of an input image store the noise they found, audits the adversarial noise. */
int qspec_has_noise(const queue_spec *s) {
  return ((s->edit == QUEUE_EDIT_INVERT_DDIM || s->edit == QUEUE_EDIT_INVERT_DDPM) &&
          s->input_image) ||
         s->edit == QUEUE_EDIT_AUDIT;
}

static void decoded_free(queue_decoded *d) {
  if (!d)
    return;
  free(d->image);
  free(d->mask);
  free(d->noise);
  free(d);
}

queue_decoded *queue_spec_decoded(queue_spec *s) {
  if (!s->decoded)
    s->decoded = mem_calloc(1, sizeof *s->decoded);
  return s->decoded;
}

void queue_spec_clear(queue_spec *s) {
  decoded_free(s->decoded);
  json_decref(s->options);
  free(s->input_image);
  free(s->mask);
  free(s->prompt);
  free(s->negative_prompt);
  json_decref(s->edit_args);
  memset(s, 0, sizeof *s);
}

/* dst's own copies of src's prompts (dst a shallow copy of src); -1 out of memory. Prompts are
 * at most CLIP_MAX_PROMPT_BYTES: views carry them too. */
static int copy_prompts(queue_spec *dst, const queue_spec *src) {
  dst->prompt = src->prompt ? mem_strdup(src->prompt) : NULL;
  dst->negative_prompt = src->negative_prompt ? mem_strdup(src->negative_prompt) : NULL;
  return (src->prompt && !dst->prompt) || (src->negative_prompt && !dst->negative_prompt) ? -1 : 0;
}

/* Two optional strings alike. */
static int same_text(const char *a, const char *b) {
  return a && b ? strcmp(a, b) == 0 : a == b;
}

int queue_spec_copy(queue_spec *dst, const queue_spec *src) {
  *dst = *src;
  dst->decoded = NULL;
  dst->options = src->options ? json_deep_copy(src->options) : NULL;
  dst->input_image = src->input_image ? mem_strdup(src->input_image) : NULL;
  dst->mask = src->mask ? mem_strdup(src->mask) : NULL;
  dst->edit_args = src->edit_args ? json_deep_copy(src->edit_args) : NULL;
  return copy_prompts(dst, src) || (src->options && !dst->options) ||
                 (src->input_image && !dst->input_image) || (src->mask && !dst->mask) ||
                 (src->edit_args && !dst->edit_args)
             ? ERR_NOMEM
             : ERR_OK;
}

/* edit_args without what is large: the noise maps become true, a fine-tuning's images their
 * count, a boundary keeps only its attribute, step and model (what views echo). NULL out of
 * memory. */
static json_t *light_args(const json_t *args) {
  json_t *out = json_object();
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)args, key, v) {
    json_t *c;
    if (!out)
      break;
    if (strcmp(key, "noise") == 0) {
      c = json_true();
    } else if (strcmp(key, "images") == 0 && json_is_array(v)) {
      c = json_integer((json_int_t)json_array_size(v)); /* a fine-tuning's: their count */
    } else if (strcmp(key, "boundary") == 0 && json_is_object(v)) {
      c = json_object();
      static const char *const keep[] = {"attribute", "step", "model"};
      for (int k = 0; c && k < 3; k++)
        if (json_object_get(v, keep[k]))
          json_object_set_new(c, keep[k], json_deep_copy(json_object_get(v, keep[k])));
    } else {
      c = json_deep_copy(v);
    }
    if (!c || json_object_set_new(out, key, c) != 0) {
      json_decref(out);
      out = NULL;
    }
  }
  return out;
}

int qspec_copy_light(queue_spec *dst, const queue_spec *src) {
  *dst = *src;
  dst->decoded = NULL;
  dst->options = src->options ? json_deep_copy(src->options) : NULL;
  dst->input_image = src->input_image ? mem_strdup("") : NULL;
  dst->mask = src->mask ? mem_strdup("") : NULL;
  dst->edit_args = src->edit_args ? light_args(src->edit_args) : NULL;
  return copy_prompts(dst, src) || (src->options && !dst->options) ||
                 (src->input_image && !dst->input_image) || (src->mask && !dst->mask) ||
                 (src->edit_args && !dst->edit_args)
             ? ERR_NOMEM
             : ERR_OK;
}

void qspec_release_inputs(queue_spec *s) {
  queue_spec light;
  if (qspec_copy_light(&light, s) != ERR_OK) {
    queue_spec_clear(&light);
    return; /* kept as it is: correct, only larger */
  }
  queue_spec_clear(s);
  *s = light;
}

int queue_spec_compatible(const queue_spec *a, const queue_spec *b) {
  return strcmp(a->model, b->model) == 0 && strcmp(a->solver, b->solver) == 0 &&
         a->steps == b->steps && strcmp(a->data, b->data) == 0 && a->height == b->height &&
         a->width == b->width && !a->nfe_varies && !b->nfe_varies && a->has_label == b->has_label &&
         !a->preview_every && !b->preview_every && !a->edit && !b->edit &&
         a->has_guidance == b->has_guidance && !a->has_classifier && !b->has_classifier &&
         same_text(a->prompt, b->prompt) && same_text(a->negative_prompt, b->negative_prompt) &&
         a->clip_skip == b->clip_skip &&
         (!a->has_guidance ||
          (a->guidance_scale == b->guidance_scale && a->null_class == b->null_class)) &&
         json_equal(a->options ? a->options : json_null(), b->options ? b->options : json_null());
}

json_t *queue_spec_to_json(const queue_spec *s) {
  json_t *j = json_pack(
      "{s:s, s:s, s:i, s:O, s:i, s:I, s:I, s:i, s:i, s:i, s:s}", "model", s->model, "solver",
      s->solver, "steps", s->steps, "options", s->options ? s->options : json_null(), "batch",
      s->batch, "seed", (json_int_t)s->seed, "first_image", (json_int_t)s->first_image, "height",
      s->height, "width", s->width, "preview_every", s->preview_every, "owner", s->owner);
  if (j && s->data[0])
    json_object_set_new(j, "data", json_string(s->data));
  if (j && s->has_label)
    json_object_set_new(j, "class_label", json_integer(s->label));
  if (j && s->prompt)
    json_object_set_new(j, "prompt", json_string(s->prompt));
  if (j && s->negative_prompt)
    json_object_set_new(j, "negative_prompt", json_string(s->negative_prompt));
  if (j && s->clip_skip)
    json_object_set_new(j, "clip_skip", json_integer(s->clip_skip));
  if (j && s->has_guidance) {
    json_object_set_new(j, "guidance_scale", json_real(s->guidance_scale));
    json_object_set_new(j, "null_class", json_integer(s->null_class));
  }
  if (j && s->has_classifier)
    json_object_set_new(j, "classifier",
                        json_pack("{s:f, s:i, s:I}", "scale", s->clf_scale, "head", s->clf_head,
                                  "target", (json_int_t)s->clf_target));
  if (j && s->edit) {
    json_object_set_new(j, "edit", json_string(queue_edit_name(s->edit)));
    json_object_set_new(j, "strength", json_real(s->strength));
    if (s->input_image)
      json_object_set_new(j, "input_image", json_string(s->input_image));
    if (s->mask)
      json_object_set_new(j, "mask", json_string(s->mask));
    if (s->edit_args)
      json_object_set(j, "edit_args", s->edit_args);
  }
  if (j && s->cost > 0)
    json_object_set_new(j, "cost", json_real(s->cost));
  if (j && s->nfe_varies)
    json_object_set_new(j, "nfe_varies", json_true());
  if (j && s->client[0])
    json_object_set_new(j, "client", json_string(s->client));
  if (j && s->idem_key[0]) {
    char hash[17];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)s->idem_hash);
    json_object_set_new(j, "idempotency_key", json_string(s->idem_key));
    json_object_set_new(j, "idempotency_hash", json_string(hash));
  }
  return j;
}

/* A record's prompts and clip skip, as the API validated them. */
static int prompts_from_json(const json_t *j, queue_spec *s, err *e) {
  const json_t *p = json_object_get(j, "prompt"), *np = json_object_get(j, "negative_prompt");
  const json_t *cs = json_object_get(j, "clip_skip");
  if ((p && !json_is_string(p)) || (np && !json_is_string(np)) || (cs && !json_is_integer(cs)) ||
      json_integer_value(cs) < 0 || json_integer_value(cs) > 1000)
    return err_set(e, ERR_FORMAT, "job spec: a bad prompt, negative_prompt or clip_skip");
  s->prompt = p ? mem_strdup(json_string_value(p)) : NULL;
  s->negative_prompt = np ? mem_strdup(json_string_value(np)) : NULL;
  s->clip_skip = (int)json_integer_value(cs);
  return (p && !s->prompt) || (np && !s->negative_prompt) ? err_set(e, ERR_NOMEM, "out of memory")
                                                          : ERR_OK;
}

int queue_spec_from_json(const json_t *j, queue_spec *s, err *e) {
  memset(s, 0, sizeof *s);
  const char *model, *solver, *owner;
  json_t *options = NULL, *label = NULL, *gscale = NULL, *gnull = NULL, *edit = NULL;
  json_t *strength = NULL, *input = NULL, *mask = NULL, *args = NULL;
  json_int_t seed, first;
  json_error_t je;
  if (json_unpack_ex((json_t *)j, &je, 0,
                     "{s:s, s:s, s:i, s:o, s:i, s:I, s:I, s:i, s:i, s:i, s:s, s?o, s?o, s?o, s?o, "
                     "s?o, s?o, s?o, s?o}",
                     "model", &model, "solver", &solver, "steps", &s->steps, "options", &options,
                     "batch", &s->batch, "seed", &seed, "first_image", &first, "height", &s->height,
                     "width", &s->width, "preview_every", &s->preview_every, "owner", &owner,
                     "class_label", &label, "guidance_scale", &gscale, "null_class", &gnull, "edit",
                     &edit, "strength", &strength, "input_image", &input, "mask", &mask,
                     "edit_args", &args))
    return err_set(e, ERR_FORMAT, "job spec: %s", je.text);
  if (strlen(model) >= sizeof s->model || strlen(solver) >= sizeof s->solver ||
      strlen(owner) >= sizeof s->owner || s->batch < 1 || s->steps < 1 || seed < 0 || first < 0)
    return err_set(e, ERR_FORMAT, "job spec: out-of-range values");
  snprintf(s->model, sizeof s->model, "%s", model);
  snprintf(s->solver, sizeof s->solver, "%s", solver);
  snprintf(s->owner, sizeof s->owner, "%s", owner);
  s->seed = (uint64_t)seed;
  s->first_image = (uint64_t)first;
  const json_t *data = json_object_get(j, "data");
  if (data && !(json_is_string(data) && sampler_data_name_ok(json_string_value(data))))
    return err_set(e, ERR_FORMAT, "job spec: 'data' is not a solver data name");
  if (data)
    snprintf(s->data, sizeof s->data, "%s", json_string_value(data));
  if (json_is_object(options))
    s->options = json_deep_copy(options);
  if (label && json_is_integer(label)) {
    s->has_label = 1;
    s->label = json_integer_value(label);
  }
  s->cost = json_number_value(json_object_get(j, "cost")); /* 0 when absent */
  s->nfe_varies = json_is_true(json_object_get(j, "nfe_varies"));
  if (!(s->cost >= 0 && s->cost < 1e300))
    s->cost = 0;
  const char *client = json_string_value(json_object_get(j, "client"));
  if (client && strlen(client) < sizeof s->client)
    snprintf(s->client, sizeof s->client, "%s", client);
  const char *key = json_string_value(json_object_get(j, "idempotency_key"));
  const char *hash = json_string_value(json_object_get(j, "idempotency_hash"));
  if (key && hash && strlen(key) < sizeof s->idem_key && strlen(hash) == 16) {
    snprintf(s->idem_key, sizeof s->idem_key, "%s", key);
    s->idem_hash = strtoull(hash, NULL, 16);
  }
  if (prompts_from_json(j, s, e)) {
    queue_spec_clear(s);
    return e->code;
  }
  const json_t *clf = json_object_get(j, "classifier");
  if (clf) {
    const json_t *cs = json_object_get(clf, "scale"), *ch = json_object_get(clf, "head"),
                 *ct = json_object_get(clf, "target");
    if (!json_is_number(cs) || !json_is_integer(ch) || !json_is_integer(ct) ||
        json_integer_value(ch) < 0 || json_integer_value(ch) > 1000) {
      queue_spec_clear(s);
      return err_set(e, ERR_FORMAT, "job spec: a bad classifier block");
    }
    s->has_classifier = 1;
    s->clf_scale = json_number_value(cs);
    s->clf_head = (int)json_integer_value(ch);
    s->clf_target = json_integer_value(ct);
  }
  if (gscale && json_is_number(gscale)) {
    s->has_guidance = 1;
    s->guidance_scale = json_number_value(gscale);
    s->null_class = json_is_integer(gnull) ? json_integer_value(gnull) : -1;
  }
  if (edit) {
    int k = json_is_string(edit) ? queue_edit_from_name(json_string_value(edit)) : -1;
    const int needs_input =
        k == QUEUE_EDIT_IMG2IMG || k == QUEUE_EDIT_INPAINT || k == QUEUE_EDIT_DEBLUR;
    if (k <= 0 || !json_is_number(strength) || (input && !json_is_string(input)) ||
        (needs_input && !input) || (k == QUEUE_EDIT_INPAINT && !json_is_string(mask)) ||
        (needs_input ? args != NULL : !json_is_object(args))) {
      queue_spec_clear(s);
      return err_set(e, ERR_FORMAT, "job spec: a bad edit");
    }
    s->edit = k;
    s->strength = json_number_value(strength);
    s->input_image = input ? mem_strdup(json_string_value(input)) : NULL;
    s->mask = json_is_string(mask) ? mem_strdup(json_string_value(mask)) : NULL;
    s->edit_args = args ? json_deep_copy(args) : NULL;
    if ((input && !s->input_image) || (json_is_string(mask) && !s->mask) ||
        (args && !s->edit_args)) {
      queue_spec_clear(s);
      return err_set(e, ERR_NOMEM, "out of memory");
    }
  }
  return ERR_OK;
}
