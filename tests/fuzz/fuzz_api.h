/* For the harnesses of request bodies: the API context the daemon builds (config defaults, the
 * default model and shapes-gmm loaded, a queue over a scratch state directory that no job ever
 * reaches: nothing is submitted or started), so bodies are validated exactly as `denoised serve`
 * validates them. */
#ifndef DENOISED_FUZZ_API_H
#define DENOISED_FUZZ_API_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api.h"
#include "config.h"
#include "fuzz.h"

static queue *fuzz_q;
static char fuzz_state[256];

static void fuzz_api_close(void) {
  static const char *const parts[] = {"lock", "jobs", "images"};
  char p[300];
  queue_free(fuzz_q);
  for (int i = 0; i < 3; i++) { /* the store's empty skeleton */
    snprintf(p, sizeof p, "%s/%s", fuzz_state, parts[i]);
    if (unlink(p) != 0)
      rmdir(p);
  }
  rmdir(fuzz_state);
}

static void fuzz_api_fail(const char *what, const err *e) {
  fprintf(stderr, "fuzz harness setup: %s: %s\n", what, e->msg);
  abort();
}

/* Fills ctx as serve.c does from the configuration's defaults. */
static void fuzz_api_open(api_ctx *ctx) {
  config c;
  err e = {0};
  config_defaults(&c);
  if (config_set_flag(&c, "model", "shapes=" DENOISED_SOURCE_DIR "/models/shapes-gmm", &e) ||
      config_finalize(&c, &e))
    fuzz_api_fail("config", &e);
  const char *tmp = getenv("TMPDIR");
  snprintf(fuzz_state, sizeof fuzz_state, "%s/denoised-fuzz-state-XXXXXX",
           tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(fuzz_state))
    abort();
  queue_opts qo = {.state_dir = fuzz_state,
                   .workers = 1,
                   .threads_per_job = 1,
                   .queue_max = c.queue_max,
                   .max_job_bytes = (size_t)c.max_job_bytes,
                   .url_prefix = "/v1/jobs/"};
  if (queue_new(&qo, &fuzz_q, &e))
    fuzz_api_fail("queue", &e);
  atexit(fuzz_api_close);
  queue_model_conf models[CONFIG_MAX_MODELS];
  for (int i = 0; i < c.nmodels; i++)
    models[i] = (queue_model_conf){c.models[i].name, c.models[i].path, c.models[i].precision};
  if (queue_set_models(fuzz_q, models, c.nmodels, &e))
    fuzz_api_fail("models", &e);
  static char default_model[CONFIG_NAME_MAX];
  snprintf(default_model, sizeof default_model, "%s", c.default_model);
  *ctx = (api_ctx){.q = fuzz_q,
                   .default_model = default_model,
                   .max_batch = c.max_batch,
                   .max_steps = c.max_steps,
                   .max_image_size = c.max_image_size,
                   .queue_max = c.queue_max,
                   .workers = c.workers,
                   .threads_per_job = c.threads_per_job,
                   .batch_max_images = c.batch_max_images,
                   .max_body_bytes = c.max_body_bytes,
                   .result_ttl = c.result_ttl};
}

/* ---- the harnesses of request bodies (fuzz_job, fuzz_txt2img) ---- */

typedef int (*fuzz_body_parser)(const api_ctx *c, const char *body, size_t len, const char *owner,
                                queue_spec *out, api_error *e);

/* Their one context, opened before the first input. */
static inline api_ctx *fuzz_body_ctx(void) {
  static api_ctx ctx;
  return &ctx;
}

#ifdef FUZZ_BODY_HARNESS /* defined by the harnesses of bodies, which need no other set-up */
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fuzz_api_open(fuzz_body_ctx());
  return 0;
}
#endif

/* Parses one body as the daemon does: 1 with *spec filled (the caller clears it) when the body
 * is accepted, 0 when it is refused as a refusal must be (a 4xx with a code and a message);
 * aborts on any other answer. */
static inline int fuzz_body_parse(fuzz_body_parser parse, const uint8_t *data, size_t size,
                                  queue_spec *spec) {
  api_error ae = {0};
  memset(spec, 0, sizeof *spec);
  int rc = parse(fuzz_body_ctx(), (const char *)data, size, "", spec, &ae);
  if (rc && (rc < 400 || rc > 499 || !ae.code[0] || !ae.message[0]))
    abort();
  return rc == 0;
}

#endif
