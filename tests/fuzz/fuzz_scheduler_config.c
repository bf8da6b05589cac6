/* libFuzzer harness: solver data from outside, a model's scheduler_config.json (read leniently,
 * as diffusers writes Infinity and NaN): the config as the model loader reads it, its tables
 * (betas, alphas_cumprod, timesteps), and every kind of solver built over it as a request
 * would. Each either works, with finite tables, or is refused with an error. */
#include <math.h>

#include "fuzz.h"
#include "sampler.h"
#include "schedule.h"

#define MAX_TRAIN 4096 /* larger tables only cost time */

static const char *const solvers[] = {"ddim",
                                      "ddpm",
                                      "pndm",
                                      "f-pndm",
                                      "dpm++2m",
                                      "dpm++3m",
                                      "dpm++2m-sde-karras",
                                      "dpm++2s",
                                      "unipc",
                                      "deis",
                                      "euler",
                                      "euler-a",
                                      "heun",
                                      "dpm-solver-fast",
                                      "dpm-solver-adaptive"};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  return 0;
}

static void tables(const sched_config *cfg) {
  err e = {0};
  if (sched_config_validate(cfg, &e) != ERR_OK || cfg->num_train_timesteps < 1 ||
      cfg->num_train_timesteps > MAX_TRAIN)
    return;
  float *betas = malloc(sizeof *betas * (size_t)cfg->num_train_timesteps);
  float *abar = malloc(sizeof *abar * (size_t)cfg->num_train_timesteps);
  int64_t ts[10];
  if (!betas || !abar)
    abort();
  sched_betas(cfg, betas, &e);
  sched_alphas_cumprod(cfg, abar, &e);
  sched_timesteps(cfg, 10, ts, &e);
  free(betas);
  free(abar);
}

static void solvers_over(const json_t *model_config) {
  for (size_t i = 0; i < sizeof solvers / sizeof solvers[0]; i++) {
    json_t *spec = json_pack("{s:s, s:i}", "name", solvers[i], "steps", 10);
    sampler *s = NULL;
    err e = {0};
    if (sampler_new_from_json(spec, model_config, &s, &e) == ERR_OK) {
      const double *t = sampler_timesteps(s);
      for (int k = 0; t && k < sampler_nfe(s); k++)
        if (!isfinite(t[k]))
          abort();
      sampler_free(s);
    }
    json_decref(spec);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fuzz_write_file(data, size, ".json");
  err e = {0};
  sched_config cfg;
  if (sched_config_load_file(path, NULL, 0, &cfg, &e) == ERR_OK) {
    tables(&cfg);
    sched_config_free(&cfg);
  }
  json_t *model_config = sched_config_read_json(path, &e);
  if (model_config) {
    solvers_over(model_config);
    json_decref(model_config);
  }
  return 0;
}
