/* libFuzzer harness: the daemon's configuration (config/): the input as a config file
 * (config_load_file, then the cross-key checks and the effective JSON), and its lines as
 * DENOISED_* environment entries and as --NAME=VALUE flags, the two other layers. */
#include <string.h>

#include "config.h"
#include "fuzz.h"

#define MAX_LINES 64

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

static void check_effective(config *c) {
  err e = {0};
  if (config_finalize(c, &e) != ERR_OK)
    return;
  json_t *j = config_to_json(c);
  char *text = j ? json_dumps(j, 0) : NULL;
  if (!text)
    abort();
  free(text);
  json_decref(j);
  char host[256];
  int port;
  if (config_listen_split(c->listen, host, sizeof host, &port, &e) != ERR_OK || port < 0 ||
      port > 65535)
    abort(); /* finalize accepted it */
}

/* Lines "DENOISED_X=V" as an environment, lines "name=value" as flags. */
static void layers(const uint8_t *data, size_t size) {
  char *copy = malloc(size + 1);
  if (!copy)
    abort();
  memcpy(copy, data, size);
  copy[size] = 0;
  char *env[MAX_LINES + 1];
  int n = 0;
  config c;
  config_defaults(&c);
  err e = {0};
  for (char *save = NULL, *line = strtok_r(copy, "\n", &save); line && n < MAX_LINES;
       line = strtok_r(NULL, "\n", &save)) {
    env[n++] = line;
    char *eq = strchr(line, '=');
    if (eq && strncmp(line, "DENOISED_", 9) != 0) {
      *eq = 0;
      config_set_flag(&c, line, eq + 1, &e);
      *eq = '=';
    }
  }
  env[n] = NULL;
  check_effective(&c);
  config_defaults(&c);
  if (config_apply_env(&c, env, &e) == ERR_OK)
    check_effective(&c);
  free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fuzz_write_file(data, size, ".json");
  config c;
  config_defaults(&c);
  err e = {0};
  if (config_load_file(&c, path, &e) == ERR_OK)
    check_effective(&c);
  layers(data, size);
  return 0;
}
