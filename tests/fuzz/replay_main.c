/* A main for the fuzz harnesses without libFuzzer: runs LLVMFuzzerTestOneInput once on every file
 * of the directories given (seed corpus, regressions: inputs that once crashed a harness), so
 * the normal test builds (release and ASan+UBSan, any compiler) check every past finding. A
 * harness that finds a problem aborts, which fails the test. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static void replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "replay: cannot open %s\n", path);
    exit(1);
  }
  size_t cap = 4096, n = 0, got;
  uint8_t *buf = malloc(cap);
  while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
    n += got;
    uint8_t *more = n == cap ? realloc(buf, cap *= 2) : buf;
    if (!more)
      exit(1);
    buf = more;
  }
  fclose(f);
  if (!buf)
    exit(1);
  /* a copy of exactly n bytes, so ASan sees any read past the input */
  uint8_t *in = malloc(n ? n : 1);
  if (!in)
    exit(1);
  memcpy(in, buf, n);
  free(buf);
  LLVMFuzzerTestOneInput(in, n);
  free(in);
}

/* Replays the files of dir in name order; a missing directory holds nothing. */
static int replay_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d)
    return 0;
  char **names = NULL;
  int count = 0;
  for (struct dirent *de; (de = readdir(d));) {
    if (de->d_name[0] == '.')
      continue;
    char **more = realloc(names, sizeof *names * (size_t)(count + 1));
    if (!more || !(more[count] = malloc(strlen(dir) + strlen(de->d_name) + 2)))
      exit(1);
    names = more;
    sprintf(names[count++], "%s/%s", dir, de->d_name);
  }
  closedir(d);
  qsort(names, (size_t)count, sizeof *names, by_name);
  for (int i = 0; i < count; i++) {
    replay_file(names[i]);
    free(names[i]);
  }
  free(names);
  return count;
}

int main(int argc, char **argv) {
  LLVMFuzzerInitialize(&argc, &argv);
  int total = 0;
  for (int i = 1; i < argc; i++) {
    int n = replay_dir(argv[i]);
    printf("%s: %d inputs replayed\n", argv[i], n);
    total += n;
  }
  if (total == 0) {
    fprintf(stderr, "replay: no inputs found\n");
    return 1;
  }
  return 0;
}
