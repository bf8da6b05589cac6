/* libFuzzer harness: an AUTOMATIC1111 /sdapi/v1/txt2img body (api_parse_txt2img) and the
 * response's echo of it (api_txt2img_json reads the body again). Unknown A1111 fields are
 * ignored, the ones used are checked: a refusal is a 4xx with a code and a message. */
#include "fuzz_api.h"

static api_ctx ctx;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fuzz_api_open(&ctx);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  queue_spec spec = {0};
  api_error ae = {0};
  int rc = api_parse_txt2img(&ctx, (const char *)data, size, "", &spec, &ae);
  if (rc) {
    if (rc < 400 || rc > 499 || !ae.code[0] || !ae.message[0])
      abort();
    return 0;
  }
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
