/* What the libFuzzer harnesses of tests/fuzz share: the entry points libFuzzer calls, and a
 * scratch file for the parsers that only read from a path (the bytes go through the same code a
 * file on disk would). Built with DENOISED_FUZZ=ON; scripts/fuzz.sh runs them. */
#ifndef DENOISED_FUZZ_H
#define DENOISED_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static char fuzz_path[256];

static inline void fuzz_unlink(void) {
  unlink(fuzz_path);
}

/* One file per process (libFuzzer's -jobs run several), named after suffix, rewritten with each
 * input and removed at exit. Aborts if it cannot be written: a harness that silently tests
 * nothing would report coverage it does not have. */
static inline const char *fuzz_write_file(const uint8_t *data, size_t size, const char *suffix) {
  if (!fuzz_path[0]) {
    const char *dir = getenv("TMPDIR");
    snprintf(fuzz_path, sizeof fuzz_path, "%s/denoised-fuzz-%ld%s", dir && *dir ? dir : "/tmp",
             (long)getpid(), suffix);
    atexit(fuzz_unlink);
  }
  FILE *f = fopen(fuzz_path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
    abort();
  return fuzz_path;
}

#endif
