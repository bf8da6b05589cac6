/* libFuzzer harness: an AUTOMATIC1111 /sdapi/v1/txt2img body (api_parse_txt2img) and the
 * response's echo of it (api_txt2img_json reads the body again). Unknown A1111 fields are
 * ignored, the ones used are checked: a refusal is a 4xx with a code and a message. */
#define FUZZ_BODY_HARNESS
#include "fuzz_api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  queue_spec spec;
  if (!fuzz_body_parse(api_parse_txt2img, data, size, &spec))
    return 0;
  static char image[] = "iVBORw0KGgo="; /* the images themselves are not read */
  char *images[64];
  int n = spec.batch < 64 ? spec.batch : 64;
  for (int i = 0; i < n; i++)
    images[i] = image;
  queue_job_view v = {.state = QUEUE_SUCCEEDED, .images = n};
  v.spec = spec; /* the view owns the spec from here */
  json_t *resp = api_txt2img_json(&v, images, n, (const char *)data, size);
  if (!resp)
    abort();
  json_decref(resp);
  queue_view_clear(&v);
  return 0;
}
