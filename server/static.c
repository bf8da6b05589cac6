/* The files the daemon serves to browsers (the web UI at /, the API docs at /docs and the spec
 * at /openapi.yaml): compiled into the binary from server/ui/ and openapi.yaml by CMake
 * (server/embed.cmake), so a daemon needs no install folder and no network to show them. */
#include <string.h>

#include "internal.h"

const static_file *static_find(const char *path) {
  for (int i = 0; i < static_nfiles; i++)
    if (strcmp(static_files[i].path, path) == 0)
      return &static_files[i];
  return NULL;
}
