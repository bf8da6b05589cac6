/* Image metadata in the two forms other tools read: A1111 infotext for viewers and the exact
 * resolved request as JSON for replay. One writer, so CLI and daemon PNGs carry the same keys. */
#include "meta.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "mem.h"

json_t *meta_json(const meta_image *m) {
  json_t *j =
      json_pack("{s:s, s:s, s:i, s:I, s:I, s:i, s:i, s:o, s:s}", "model", m->model, "scheduler",
                m->solver, "steps", m->steps, "seed", (json_int_t)m->seed, "image_index",
                (json_int_t)m->image_index, "height", m->height, "width", m->width,
                "scheduler_config", sched_config_to_json(m->cfg), "version", META_VERSION);
  if (!j)
    return NULL;
  if (m->solver_data)
    json_object_set_new(j, "solver_data", json_string(m->solver_data));
  if (m->has_label)
    json_object_set_new(j, "class_label", json_integer(m->label));
  if (m->has_guidance)
    json_object_set_new(j, "guidance_scale", json_real(m->guidance_scale));
  if (m->has_strength)
    json_object_set_new(j, "strength", json_real(m->strength));
  if (m->prompt)
    json_object_set_new(j, "prompt", json_string(m->prompt));
  if (m->negative_prompt)
    json_object_set_new(j, "negative_prompt", json_string(m->negative_prompt));
  if (m->clip_skip > 1)
    json_object_set_new(j, "clip_skip", json_integer(m->clip_skip));
  if (m->edit)
    json_object_set(j, "edit", (json_t *)m->edit);
  if (m->extra)
    json_object_update(j, (json_t *)m->extra);
  return j;
}

void meta_infotext(const meta_image *m, char *buf, size_t n) {
  const char *name = strrchr(m->model, '/');
  name = name && name[1] ? name + 1 : m->model;
  size_t off = 0;
  if (m->prompt)
    off += (size_t)snprintf(buf, n, "%s\n", m->prompt);
  if (m->prompt && m->negative_prompt && m->negative_prompt[0] && off < n)
    off += (size_t)snprintf(buf + off, n - off, "Negative prompt: %s\n", m->negative_prompt);
  if (off < n)
    off += (size_t)snprintf(buf + off, n - off, "Steps: %d, Sampler: %s", m->steps,
                            m->sampler_label ? m->sampler_label : m->solver);
  if (m->schedule_label && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Schedule type: %s", m->schedule_label);
  if (off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Seed: %llu, Size: %dx%d, Model: %s",
                            (unsigned long long)m->seed, m->width, m->height, name);
  if (m->has_label && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Class: %lld", (long long)m->label);
  if (m->has_guidance && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", CFG scale: %g", m->guidance_scale);
  if (m->clip_skip > 1 && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Clip skip: %d", m->clip_skip);
  if (m->has_strength && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Denoising strength: %g", m->strength);
  if (m->solver_data && off < n) { /* a name as is; of a file path, its last component */
    const char *sd = strrchr(m->solver_data, '/');
    off += (size_t)snprintf(buf + off, n - off, ", Solver data: %s",
                            sd && sd[1] ? sd + 1 : m->solver_data);
  }
  const char *type = json_string_value(json_object_get(m->edit, "type"));
  if (type && off < n)
    off += (size_t)snprintf(buf + off, n - off, ", Edit: %s", type);
  if (off < n)
    snprintf(buf + off, n - off, ", Version: %s", META_VERSION);
}

int meta_png_encode(const meta_image *m, const float *chw, int channels, uint8_t **png,
                    size_t *png_len, err *e) {
  const int c = channels < 3 ? 1 : 3;
  const size_t plane = (size_t)m->height * m->width;
  uint8_t *px = mem_malloc(plane * 3);
  json_t *j = meta_json(m);
  char *js = j ? json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
  json_decref(j);
  int rc;
  if (!px || !js) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
  } else {
    const size_t n = 1024 + (m->prompt ? strlen(m->prompt) : 0) +
                     (m->negative_prompt ? strlen(m->negative_prompt) : 0);
    char *info = mem_malloc(n);
    if (!info) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
    } else {
      meta_infotext(m, info, n);
      image_to_u8(chw, c, m->height, m->width, px);
      image_text texts[2] = {{META_TEXT_KEY, info, 0}, {META_JSON_KEY, js, 1}};
      rc = image_png_encode(px, c, m->height, m->width, texts, 2, png, png_len, e);
      free(info);
    }
  }
  free(px);
  free(js);
  return rc;
}
