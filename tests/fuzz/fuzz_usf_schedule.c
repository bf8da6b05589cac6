/* libFuzzer harness: a USF solver schedule (engine/solver/sampler_usf.c: sampler_usf_attach, as
 * `denoised sample --scheduler usf --solver-data` and the spec key "data" read it). The input is
 * the schedule JSON, written as u.json beside a copy of the fixture v3 statistics (stats.json,
 * stats.npy) that its "statistics" key may name. An accepted schedule must build the solver, and
 * a run on the analytic three-component mixture (tests/fixtures/gmm/mix3) either refuses with an
 * error or gives finite samples: every value of a schedule reaches the maths. */
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"
#include "model.h"
#include "sampler.h"

static model *mix3;
static char dir[256], sched_path[300], stats_path[300], npy_path[300];

static void remove_files(void) {
  unlink(sched_path);
  unlink(stats_path);
  unlink(npy_path);
  rmdir(dir);
}

static void copy_file(const char *from, const char *to) {
  FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
  char buf[65536];
  size_t n;
  if (!a || !b)
    abort();
  while ((n = fread(buf, 1, sizeof buf, a)) > 0)
    if (fwrite(buf, 1, n, b) != n)
      abort();
  fclose(a);
  if (fclose(b) != 0)
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  err e = {0};
  if (model_load(DENOISED_SOURCE_DIR "/tests/fixtures/gmm/mix3", &mix3, &e) != ERR_OK) {
    fprintf(stderr, "fuzz_usf_schedule: %s\n", e.msg);
    abort();
  }
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/denoised-fuzz-usf-%ld", tmp && *tmp ? tmp : "/tmp", (long)getpid());
  if (mkdir(dir, 0700) != 0)
    abort();
  snprintf(sched_path, sizeof sched_path, "%s/u.json", dir);
  snprintf(stats_path, sizeof stats_path, "%s/stats.json", dir);
  snprintf(npy_path, sizeof npy_path, "%s/stats.npy", dir);
  atexit(remove_files);
  copy_file(DENOISED_SOURCE_DIR "/tests/fixtures/usf/stats.json", stats_path);
  copy_file(DENOISED_SOURCE_DIR "/tests/fixtures/usf/stats.npy", npy_path);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  FILE *f = fopen(sched_path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
    abort();
  json_t *spec = json_pack("{s:s, s:s}", "name", "usf", "data", sched_path);
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
  int nfe = 0;
  rc = sampler_run(s, mix3, &o, out, &nfe, &e);
  if (rc == ERR_OK) {
    if (nfe != sampler_nfe(s))
      abort(); /* the plan is what runs */
    for (size_t i = 0; i < sizeof out / sizeof *out; i++)
      if (!isfinite(out[i]))
        abort(); /* a non-finite sample must be a failed run, never a result */
  } else if (!e.msg[0]) {
    abort();
  }
  sampler_free(s);
  return 0;
}
