/* libFuzzer harness: a DPM-Solver-v3 statistics file (engine/solver/sampler_v3.c:
 * sampler_v3_attach, as `denoised sample --solver-data` and the spec key "data" read it): the
 * input is the JSON header, a NUL byte, then the .npy the header may name (written beside it as
 * "s.npy"). Accepted statistics must build the solver, and a run of it on the analytic
 * three-component mixture (tests/fixtures/gmm/mix3) either refuses with an error or gives finite
 * samples: statistics are outside values that reach the maths. */
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"
#include "model.h"
#include "sampler.h"

static model *mix3;
static char dir[256], header_path[300], arrays_path[300];

static void remove_files(void) {
  unlink(header_path);
  unlink(arrays_path);
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  err e = {0};
  if (model_load(DENOISED_SOURCE_DIR "/tests/fixtures/gmm/mix3", &mix3, &e) != ERR_OK) {
    fprintf(stderr, "fuzz_solver_data: %s\n", e.msg);
    abort();
  }
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/denoised-fuzz-v3-%ld", tmp && *tmp ? tmp : "/tmp", (long)getpid());
  if (mkdir(dir, 0700) != 0)
    abort();
  snprintf(header_path, sizeof header_path, "%s/stats.json", dir);
  snprintf(arrays_path, sizeof arrays_path, "%s/s.npy", dir);
  atexit(remove_files);
  return 0;
}

static void write_file(const char *path, const uint8_t *data, size_t size) {
  FILE *f = fopen(path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *nul = memchr(data, 0, size);
  const size_t hsize = nul ? (size_t)(nul - data) : size;
  write_file(header_path, data, hsize);
  unlink(arrays_path);
  if (nul)
    write_file(arrays_path, nul + 1, size - hsize - 1);
  /* the step count comes from the input too, so short and long plans both run */
  const int steps = 1 + (int)((hsize + size) % 10);
  json_t *spec =
      json_pack("{s:s, s:i, s:s}", "name", "dpm-solver-v3", "steps", steps, "data", header_path);
  sampler *s = NULL;
  err e = {0};
  if (!spec)
    abort();
  int rc = sampler_new_from_json(spec, model_scheduler_config(mix3), &s, &e);
  json_decref(spec);
  if (rc != ERR_OK) {
    if (!e.msg[0])
      abort(); /* every refusal says why */
    return 0;
  }
  float out[3 * 8 * 8];
  sampler_run_opts o = {.batch = 1, .seed = size, .threads = 1};
  rc = sampler_run(s, mix3, &o, out, NULL, &e);
  if (rc == ERR_OK) {
    for (size_t i = 0; i < sizeof out / sizeof *out; i++)
      if (!isfinite(out[i]))
        abort(); /* a non-finite sample must be a failed run, never a result */
  } else if (!e.msg[0]) {
    abort();
  }
  sampler_free(s);
  return 0;
}
