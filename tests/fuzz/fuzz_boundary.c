/* libFuzzer harness: a boundary file (engine/edit/boundary.c: boundary_load through a path, as
 * `denoised edit --boundary` reads it; the daemon takes the same object in edit.boundary). An
 * accepted boundary has unit normals, survives its own JSON round trip, and its recorded solver
 * grid either builds the DDIM sampler the edit runs on or is refused with an error. */
#include <math.h>

#include "boundary.h"
#include "edit.h"
#include "fuzz.h"
#include "sampler.h"
#include "schedule.h"

static json_t *model_config; /* the default model's scheduler_config.json */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  err e = {0};
  model_config =
      sched_config_read_json(DENOISED_SOURCE_DIR "/models/glyphs32/scheduler_config.json", &e);
  if (!model_config) {
    fprintf(stderr, "fuzz_boundary: %s\n", e.msg);
    abort();
  }
  return 0;
}

static void check_geometry(const boundary *b) {
  double norm = 0;
  for (int i = 0; i < b->dim; i++)
    norm += (double)b->normal[i] * b->normal[i];
  if (b->dim != b->c * b->h * b->w || !(fabs(sqrt(norm) - 1) < 1e-3))
    abort();
  float *x = calloc((size_t)b->dim, sizeof *x);
  if (!x)
    abort();
  boundary_move(b, x, 1, 1.0);
  if (!isfinite(boundary_distance(b, x)))
    abort();
  free(x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fuzz_write_file(data, size, ".json");
  boundary b;
  err e = {0};
  if (boundary_load(path, &b, &e) != ERR_OK)
    return 0;
  check_geometry(&b);
  if (b.mid)
    check_geometry(b.mid);
  json_t *j = boundary_to_json(&b);
  boundary again;
  if (!j || boundary_from_json(j, &again, &e) != ERR_OK || again.dim != b.dim ||
      again.step != b.step)
    abort();
  json_decref(j);
  boundary_free(&again);
  if (b.solver) {
    sampler *s = NULL;
    if (edit_grid_sampler(b.solver, model_config, 0.0, &s, &e) == ERR_OK) {
      if (b.step >= sampler_num_steps(s))
        abort(); /* the mixing step lies on the grid */
      sampler_free(s);
    }
  }
  boundary_free(&b);
  return 0;
}
