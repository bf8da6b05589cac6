/* libFuzzer harness: a .safetensors file of any bytes (a model folder is outside data): st_open
 * validates the header against the file, then every tensor it lists is read as float32 and as
 * int64, which must stay inside the mapped file. */
#include "fuzz.h"
#include "safetensors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fuzz_write_file(data, size, ".safetensors");
  err e = {0};
  st_file *f = NULL;
  if (st_open(path, &f, &e) != ERR_OK)
    return 0;
  for (int i = 0; i < st_count(f); i++) {
    const st_tensor_info *t = st_info_at(f, i);
    if (!t || st_find(f, t->name) == NULL || t->count < 0)
      abort();
    /* a tensor's values lie in the file, at least 2 bytes each, unless its dtype is unknown */
    if (t->count > (int64_t)size / 2 && t->dtype != ST_OTHER)
      abort();
    if (t->count > (int64_t)size)
      continue;
    size_t n = t->count ? (size_t)t->count : 1;
    float *fl = malloc(n * sizeof *fl);
    int64_t *in = malloc(n * sizeof *in);
    if (!fl || !in)
      abort();
    st_read_f32(f, t->name, t->ndim, t->shape, fl, &e);
    st_read_i64(f, t->name, in, t->count, &e);
    free(fl);
    free(in);
  }
  st_close(f);
  return 0;
}
