/* libFuzzer harness: a .npy file of any bytes, as an upload (npy_parse_f32 from memory) and as a
 * file on disk (npy_read_f32, npy_read_i64 through a path). The two readers share the header
 * checks, so they must agree on what is a valid file. */
#include <string.h>

#include "fuzz.h"
#include "npy.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  err e = {0};
  npy_array mem = {0}, file = {0};
  int rc_mem = npy_parse_f32(data, size, "upload", &mem, &e);
  if (rc_mem == ERR_OK)
    npy_check_finite(&mem, "upload", &e);
  const char *path = fuzz_write_file(data, size, ".npy");
  int rc_file = npy_read_f32(path, &file, &e);
  /* an empty upload is refused before its header; an empty file by its header */
  if (size && (rc_mem == ERR_OK) != (rc_file == ERR_OK))
    abort();
  if (rc_mem == ERR_OK && rc_file == ERR_OK &&
      (mem.count != file.count || mem.ndim != file.ndim ||
       memcmp(mem.data, file.data, (size_t)mem.count * sizeof *mem.data) != 0))
    abort();
  npy_array_free(&mem);
  npy_array_free(&file);
  int64_t *ints = NULL, count = 0, shape[NPY_MAX_DIMS];
  int ndim = 0;
  if (npy_read_i64(path, &ints, &count, &ndim, shape, &e) == ERR_OK && (ndim < 0 || count < 0))
    abort();
  free(ints);
  return 0;
}
