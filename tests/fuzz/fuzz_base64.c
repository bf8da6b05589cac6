/* libFuzzer harness: base64_decode on any text (images and noise arrive base64 in job bodies):
 * the length it reports matches the text's, and whatever is encoded decodes back to the same
 * bytes. */
#include <string.h>

#include "base64.h"
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t *out = NULL;
  size_t n = 0;
  if (base64_decode((const char *)data, size, &out, &n) == 0) {
    /* 3 bytes per 4 characters, less one per '=' */
    size_t pad = size && data[size - 1] == '=' ? 1 + (data[size - 2] == '=') : 0;
    if (n != size / 4 * 3 - pad)
      abort();
  }
  free(out);
  char *text = base64_encode(data, size);
  if (!text)
    abort();
  if (base64_decode(text, strlen(text), &out, &n) != 0 || n != size ||
      (size && memcmp(out, data, size) != 0))
    abort();
  free(out);
  free(text);
  return 0;
}
