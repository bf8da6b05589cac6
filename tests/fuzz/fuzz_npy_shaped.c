/* libFuzzer harness: an uploaded .npy that must have one exact shape and finite values
 * (npy_parse_f32_shaped, as the daemon takes edit.noise and noise maps): the first byte of the
 * input picks the shape, the rest is the file. Whatever is accepted has that shape and only
 * finite values. */
#include <math.h>
#include <string.h>

#include "fuzz.h"
#include "npy.h"

static const struct {
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
} shapes[] = {
    {4, {1, 3, 32, 32}},     /* DDIM x_T of one image */
    {5, {2, 11, 3, 32, 32}}, /* edit-friendly DDPM maps: batch 2, 10 steps */
    {1, {4}},
    {2, {0, 3}},
    {0, {0}},
};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const size_t k = data[0] % (sizeof shapes / sizeof shapes[0]);
  err e = {0};
  npy_array a = {0};
  if (npy_parse_f32_shaped(data + 1, size - 1, "edit.noise", shapes[k].shape, shapes[k].ndim, &a,
                           &e) == ERR_OK) {
    if (a.ndim != shapes[k].ndim ||
        memcmp(a.shape, shapes[k].shape, sizeof a.shape[0] * (size_t)a.ndim) != 0)
      abort();
    for (int64_t i = 0; i < a.count; i++)
      if (!isfinite(a.data[i]))
        abort();
  } else if (!strstr(e.msg, "edit.noise")) {
    abort(); /* every refusal names the field */
  }
  npy_array_free(&a);
  return 0;
}
