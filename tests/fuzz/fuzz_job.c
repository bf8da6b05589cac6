/* libFuzzer harness: a POST /v1/jobs body (api_parse_job), with every block it can carry
 * (scheduler options, guidance, edit with base64 images, masks, noise and boundaries). An
 * accepted body yields a spec that survives the store's round trip (queue_spec_to_json, then
 * queue_spec_from_json, as recovery reads it); a refused one gets a 4xx naming what is wrong. */
#include <string.h>

#define FUZZ_BODY_HARNESS
#include "fuzz_api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  queue_spec spec;
  if (!fuzz_body_parse(api_parse_job, data, size, &spec))
    return 0;
  json_t *j = queue_spec_to_json(&spec);
  queue_spec back = {0};
  err e = {0};
  if (!j || queue_spec_from_json(j, &back, &e) != ERR_OK || back.steps != spec.steps ||
      back.batch != spec.batch || back.seed != spec.seed || strcmp(back.solver, spec.solver))
    abort();
  json_decref(j);
  queue_spec_clear(&back);
  queue_spec_clear(&spec);
  return 0;
}
