/* libFuzzer harness: an AUTOMATIC1111 /sdapi/v1/txt2img or img2img body (api_sd_parse; a
 * first byte other than '{' picks which and is cut, so JSON seeds stay txt2img bodies) and the
 * response's echo of it (api_sd_result_json reads the body again). Unknown A1111 fields are
 * ignored, the ones used are checked: a refusal is a 4xx with a code and a message. */
#define FUZZ_BODY_HARNESS
#include "fuzz_api.h"

static int img2img_mode;

static int parse_sd(const api_ctx *c, const char *body, size_t len, const char *owner,
                    queue_spec *out, api_error *e) {
  api_sd_job t;
  int rc = api_sd_parse(c, img2img_mode, body, len, owner, NULL, 0, &t, e);
  if (!rc) {
    if (t.count < 1 || t.count > 64 || api_sd_job_at(c, &t, t.count - 1, out))
      abort();
    api_sd_job_clear(&t);
  }
  return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const size_t cut = data[0] != '{';
  img2img_mode = cut && (data[0] & 1);
  data += cut;
  size -= cut;
  queue_spec spec;
  if (!fuzz_body_parse(parse_sd, data, size, &spec))
    return 0;
  static char image[] = "iVBORw0KGgo="; /* the images themselves are not read */
  char *images[1] = {image};
  queue_job_view v = {.state = QUEUE_SUCCEEDED, .images = 1};
  v.spec = spec; /* the view owns the spec from here */
  json_t *resp = api_sd_result_json(fuzz_body_ctx(), &v, 1, images, (const char *)data, size);
  if (!resp)
    abort();
  json_decref(resp);
  queue_view_clear(&v);
  return 0;
}
