/* libFuzzer harness: PNG bytes as the daemon and the CLI take them (engine/io/image.c): decoding
 * under a size limit, input images and masks of a model's exact size (1 and 3 channels), and the
 * text chunks `--replay` reads from a PNG file. Whatever decodes has the size it reports. */
#include <math.h>

#include "fuzz.h"
#include "image.h"

#define LIMIT 256 /* larger images are refused before any allocation; keeps executions fast */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

static void decode(const uint8_t *data, size_t size) {
  err e = {0};
  uint8_t *px = NULL;
  int h = 0, w = 0;
  if (image_png_decode(data, size, LIMIT, LIMIT, &px, &h, &w, &e) == ERR_OK) {
    if (h < 1 || w < 1 || h > LIMIT || w > LIMIT || !px)
      abort();
    volatile uint8_t last = px[(size_t)h * w * 3 - 1]; /* ASan: the buffer holds h*w*3 bytes */
    (void)last;
  }
  free(px);
}

static void model_inputs(const uint8_t *data, size_t size) {
  static float img[3 * 32 * 32], mask[32 * 32];
  err e = {0};
  for (int c = 1; c <= 3; c += 2)
    if (image_from_png(data, size, "input_image", c, 32, 32, img, &e) == ERR_OK)
      for (int i = 0; i < c * 32 * 32; i++)
        if (!(img[i] >= -1.0f && img[i] <= 1.0f))
          abort();
  if (image_mask_from_png(data, size, "mask", 32, 32, mask, &e) == ERR_OK)
    for (int i = 0; i < 32 * 32; i++)
      if (mask[i] != 0.0f && mask[i] != 1.0f)
        abort();
}

static void text(const uint8_t *data, size_t size) {
  const char *path = fuzz_write_file(data, size, ".png");
  static const char *const keys[] = {"parameters", "denoised"};
  for (int k = 0; k < 2; k++) {
    err e = {0};
    char *value = NULL;
    image_png_read_text(path, keys[k], &value, &e);
    free(value);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  decode(data, size);
  model_inputs(data, size);
  text(data, size);
  return 0;
}
