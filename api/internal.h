/* Helpers the files of api/ share (not part of the module's interface): field checks that name
 * the offending field, and the edit block's validation. */
#ifndef DENOISED_API_INTERNAL_H
#define DENOISED_API_INTERNAL_H

#include <jansson.h>

#include "api.h"
#include "sampler.h"

/* The one reader of integer fields: a JSON integer or, with allow_real, an integral number
 * (A1111 clients send 20.0), in [lo, hi]. The range is checked before any conversion, so
 * 2.13e58 is a 400 naming the field and the range, never an out-of-range cast. */
int api_int_value(const json_t *v, const char *field, long long lo, long long hi, int allow_real,
                  long long *out, api_error *e);
/* An integer field in [lo, hi]; 0 with *out untouched when absent. */
int api_get_int(const json_t *obj, const char *key, const char *field, long long lo, long long hi,
                long long *out, int *present, api_error *e);
/* A number field in [lo, hi]; 0 with *out untouched when absent. */
int api_get_number(const json_t *obj, const char *key, const char *field, double lo, double hi,
                   double *out, int *present, api_error *e);
/* Unknown keys of obj (field names prefixed) are a 400. */
int api_check_keys(const json_t *obj, const char *prefix, const char *const *allowed, api_error *e);
/* A class: an index, or one of the model's class names. */
int api_parse_label(const json_t *v, const queue_model_desc *md, const char *field, int64_t *out,
                    api_error *e);

/* A base64 PNG field (optionally a data: URL): its base64 text (malloc'ed) and its bytes; a
 * 400 naming field when it is not one or is over the size limit. */
int api_get_png(const json_t *v, const char *field, char **b64, uint8_t **png, size_t *len,
                api_error *e);
/* A fresh seed: 53 bits, so that JSON and A1111 clients carry it exactly. */
uint64_t api_random_seed(void);

/* The fields every form of request shares, already pulled out of their JSON. */
typedef struct api_job_fields {
  const char *model;
  const json_t *label;
  int has_seed;
  long long seed, batch, width, height, first_image, steps, preview;
  int has_width, has_height, has_steps;
  const char *solver;
  const char *solver_field;
  json_t *options;                         /* borrowed */
  const char *data;                        /* scheduler.data, a solver data name, or NULL */
  const json_t *guidance;                  /* the "guidance" block, borrowed, or NULL */
  int no_guidance;                         /* "guidance": null: none, not the model's */
  const json_t *edit, *input_image, *mask; /* editing, borrowed, or NULL */
  /* text-to-image: prompt, negative_prompt and clip_skip as sent (borrowed, null as absent) */
  const json_t *prompt, *negative_prompt, *clip_skip;
} api_job_fields;

/* The default image side of a model in pixels (a latent model's sample_size is in latents)
 * and the multiple other sizes must be of (0: the default size only). */
int api_model_size(const queue_model_desc *md);
int api_size_multiple(const queue_model_desc *md);

/* The edit block with input_image, mask and the noise of earlier inversions, after the size and
 * the solver s are known: images and noise are decoded here so a bad one is a 400, never a
 * failed job. */
/* The name of a model a job will make (a stylization, a fine-tuning): a 400 naming field for a
 * bad one, a 409 for a name served already. */
int api_new_model_name(const api_ctx *c, const char *name, const char *field, api_error *e);
/* edit.type finetune (api/finetune.c): the new model's name, the method, settings and images,
 * each checked against the model (field names in the errors). */
int api_parse_finetune(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                       queue_spec *out, api_error *e);
int api_parse_edit(const api_ctx *c, const api_job_fields *f, const queue_model_desc *md,
                   const sampler *s, const char *owner, queue_spec *out, api_error *e);

#endif
