/* `denoised sample`: placeholder until the sampler lands (filled in below). */
#include "cli.h"
int cmd_sample(int argc, char **argv) {
  (void)argc;
  (void)argv;
  return cli_fail("sample", "not built yet");
}
