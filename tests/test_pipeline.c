/* The one job runner (engine/pipeline): every kind gives the same floats as the engine calls it
 * assembles (what the CLI and the daemon ran before they shared it), one progress count over all
 * phases, cancellation, replication of one input picture, errors naming the request's part, and
 * the metadata of pipeline_png. On the analytic class-conditional mixture (3 x 8 x 8). */
#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "boundary.h"
#include "edit.h"
#include "image.h"
#include "invert.h"
#include "meta.h"
#include "model.h"
#include "npy.h"
#include "pipeline.h"
#include "rng.h"
#include "sampler.h"
#include "testutil.h"

enum { B = 2, D = 192, S = 8 };

static model *load_cond4(void) {
  char path[512];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/gmm/cond4"), &m, &e) ==
                    0,
                "%s", e.msg);
  return m;
}

static void assert_same(const float *a, const float *b, size_t n, const char *what) {
  for (size_t i = 0; i < n; i++)
    ck_assert_msg(a[i] == b[i], "%s: value %zu differs (%g vs %g)", what, i, a[i], b[i]);
}

/* A record of the progress events of one run. */
typedef struct trace {
  int n, last_step, last_total, last_nfe, monotone, cancel_at;
  atomic_int *cancel;
} trace;

static void on_progress(const pipeline_progress *p, void *user) {
  trace *t = user;
  if (t->n && (p->step < t->last_step || p->nfe < t->last_nfe || p->total != t->last_total))
    t->monotone = 0;
  t->n++;
  t->last_step = p->step;
  t->last_total = p->total;
  t->last_nfe = p->nfe;
  if (t->cancel && p->step == t->cancel_at)
    atomic_store(t->cancel, 1);
}

START_TEST(generate_matches_the_sampler) {
  model *m = load_cond4();
  err e = {0};
  const int64_t labels[B] = {0, 2};
  guidance g = guidance_for(m, 3.0);
  json_t *opts = json_pack("{s:s}", "timestep_spacing", "trailing");
  const pipeline_solver sv = {.name = "dpm++2m", .steps = 12, .options = opts};
  pipeline_request r = {.kind = PIPELINE_GENERATE,
                        .solver = sv,
                        .batch = B,
                        .seed = 11,
                        .first_image = 3,
                        .labels = labels,
                        .guidance = &g};
  trace t = {.monotone = 1};
  pipeline_hooks h = {.progress = on_progress, .progress_user = &t, .threads = 1};
  pipeline_result res;
  ck_assert_msg(pipeline_run(m, &r, &h, &res, &e) == 0, "%s", e.msg);
  /* the same run assembled by hand */
  sampler *s = NULL;
  ck_assert_int_eq(pipeline_sampler(m, &sv, &s, NULL, 0, &e), 0);
  float direct[B * D];
  int nfe = 0;
  sampler_run_opts o = {.batch = B,
                        .height = S,
                        .width = S,
                        .seed = 11,
                        .first_image = 3,
                        .labels = labels,
                        .guidance = &g,
                        .threads = 1};
  ck_assert_int_eq(sampler_run(s, m, &o, direct, &nfe, &e), 0);
  assert_same(res.images, direct, B * D, "generate");
  ck_assert_int_eq(res.nfe, nfe);
  ck_assert(t.monotone && t.n == 12 && t.last_step == 12 && t.last_total == 12);
  ck_assert_int_eq(t.last_nfe, nfe);
  /* image 1 alone is image 1 of the batch (its own seed stream) */
  pipeline_result one;
  pipeline_request r1 = r;
  r1.batch = 1;
  r1.first_image = 4;
  r1.labels = labels + 1;
  ck_assert_int_eq(pipeline_run(m, &r1, NULL, &one, &e), 0);
  assert_same(one.images, res.images + D, D, "image alone");
  pipeline_result_clear(&one);
  pipeline_result_clear(&res);
  sampler_free(s);
  json_decref(opts);
  model_free(m);
}
END_TEST

START_TEST(one_picture_serves_the_batch) {
  model *m = load_cond4();
  err e = {0};
  float pic[D], pics[B * D], mask[S * S], masks[B * S * S];
  rng_normal(5, 0, 0, pic, D);
  for (int i = 0; i < D; i++)
    pic[i] = tanhf(pic[i]);
  for (int i = 0; i < S * S; i++)
    mask[i] = (i % S) < S / 2;
  for (int b = 0; b < B; b++) {
    memcpy(pics + b * D, pic, sizeof pic);
    memcpy(masks + b * S * S, mask, sizeof mask);
  }
  const int64_t labels[B] = {1, 1};
  pipeline_request r = {.kind = PIPELINE_GENERATE,
                        .solver = {.name = "ddim", .steps = 10},
                        .batch = B,
                        .seed = 3,
                        .labels = labels,
                        .image = pic,
                        .images = 1,
                        .mask = mask,
                        .strength = 0.7};
  pipeline_result a, b;
  ck_assert_msg(pipeline_run(m, &r, NULL, &a, &e) == 0, "%s", e.msg);
  r.image = pics;
  r.mask = masks;
  r.images = B;
  ck_assert_int_eq(pipeline_run(m, &r, NULL, &b, &e), 0);
  assert_same(a.images, b.images, B * D, "replicated picture");
  pipeline_result_clear(&b);
  /* 3 pictures for a batch of 2: refused, naming the counts */
  r.images = 3;
  ck_assert_int_eq(pipeline_run(m, &r, NULL, &b, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "3 input pictures"));
  ck_assert_ptr_null(b.images);
  pipeline_result_clear(&a);
  model_free(m);
}
END_TEST

START_TEST(ddpm_inversion_counts_both_phases_and_round_trips) {
  model *m = load_cond4();
  err e = {0};
  const int64_t labels[B] = {0, 1};
  float x0[B * D];
  rng_normal(9, 0, 0, x0, B * D);
  for (int i = 0; i < B * D; i++)
    x0[i] = tanhf(x0[i]);
  pipeline_request r = {.kind = PIPELINE_INVERT_DDPM,
                        .solver = {.name = "ddim", .steps = 10},
                        .batch = B,
                        .seed = 4,
                        .labels = labels,
                        .image = x0,
                        .images = B};
  /* inversion and sampling: one count of 2 n steps */
  trace t = {.monotone = 1};
  pipeline_hooks h = {.progress = on_progress, .progress_user = &t};
  pipeline_result full;
  ck_assert_msg(pipeline_run(m, &r, &h, &full, &e) == 0, "%s", e.msg);
  ck_assert(t.monotone && t.last_step == 20 && t.last_total == 20);
  ck_assert_int_eq(t.last_nfe, full.nfe);
  ck_assert(full.noise != NULL);
  for (int i = 0; i < B * D; i++) /* edit-friendly maps reproduce the picture */
    ck_assert_msg(fabsf(full.images[i] - x0[i]) < 1e-4f, "value %d: %g vs %g", i, full.images[i],
                  x0[i]);
  /* invert only: n steps, the same maps */
  pipeline_request ro = r;
  ro.invert.invert_only = 1;
  trace t2 = {.monotone = 1};
  h.progress_user = &t2;
  pipeline_result inv;
  ck_assert_int_eq(pipeline_run(m, &ro, &h, &inv, &e), 0);
  ck_assert(t2.monotone && t2.last_step == 10 && t2.last_total == 10);
  ck_assert(inv.noise_len == full.noise_len && memcmp(inv.noise, full.noise, inv.noise_len) == 0);
  /* the maps given back with a class change and a skip: what invert_edit_sample gives */
  npy_array maps = {0};
  ck_assert_int_eq(npy_parse_f32(inv.noise, inv.noise_len, "maps", &maps, &e), 0);
  const int64_t target[B] = {2, 2};
  pipeline_request re = r;
  re.image = NULL;
  re.labels = target;
  re.noise = maps.data;
  re.noise_shape = maps.shape;
  re.noise_ndim = maps.ndim;
  re.invert.source_labels = labels;
  re.invert.skip = 3;
  re.invert.edit.colour_from = -1;
  pipeline_result ed;
  ck_assert_msg(pipeline_run(m, &re, NULL, &ed, &e) == 0, "%s", e.msg);
  sampler *s = NULL;
  json_t *o = json_pack("{s:f, s:b, s:b, s:b}", "eta", 1.0, "set_alpha_to_one", 0, "clip_sample", 0,
                        "thresholding", 0);
  const pipeline_solver sv = {.name = "ddim", .steps = 10, .options = o};
  ck_assert_int_eq(pipeline_sampler(m, &sv, &s, NULL, 0, &e), 0);
  float direct[B * D];
  invert_opts io = {.batch = B, .height = S, .width = S, .labels = target, .seed = 4};
  invert_sample_opts so = {.skip = 3, .src_labels = labels};
  invert_edit edn = {.ddpm = 1, .colour_from = -1};
  int part = 0;
  ck_assert_int_eq(invert_edit_sample(s, m, &io, &so, &edn, maps.data, direct, &part, &e), 0);
  assert_same(ed.images, direct, B * D, "edit of given maps");
  /* maps of the wrong shape: ERR_SHAPE naming edit.noise */
  re.noise_shape = (const int64_t[]){B, 11, 3, 8, 9};
  pipeline_result bad;
  ck_assert_int_eq(pipeline_run(m, &re, NULL, &bad, &e), ERR_SHAPE);
  ck_assert_ptr_nonnull(strstr(e.msg, "edit.noise"));
  /* neither an image nor noise */
  re.noise = NULL;
  pipeline_result none;
  ck_assert_int_eq(pipeline_run(m, &re, NULL, &none, &e), ERR_INVALID);
  sampler_free(s);
  json_decref(o);
  npy_array_free(&maps);
  pipeline_result_clear(&ed);
  pipeline_result_clear(&inv);
  pipeline_result_clear(&full);
  model_free(m);
}
END_TEST

START_TEST(boundary_matches_edit_boundary) {
  model *m = load_cond4();
  err e = {0};
  float normal[D];
  for (int i = 0; i < D; i++)
    normal[i] = (i % 2 ? 1.0f : -1.0f) / sqrtf((float)D);
  boundary b = {.dim = D,
                .c = 3,
                .h = S,
                .w = S,
                .normal = normal,
                .scale = 1.0,
                .step = 4,
                .solver = json_pack("{s:s, s:i}", "name", "ddim", "steps", 10)};
  const int64_t labels[B] = {0, 2};
  pipeline_request r = {
      .kind = PIPELINE_BOUNDARY,
      .batch = B,
      .seed = 8,
      .labels = labels,
      .bound = {.boundary = &b, .strength = 2.5, .space = EDIT_SPACE_X, .eta = 1}};
  pipeline_result res;
  ck_assert_msg(pipeline_run(m, &r, NULL, &res, &e) == 0, "%s", e.msg);
  sampler *grid = NULL, *rest = NULL;
  ck_assert_int_eq(edit_grid_sampler(b.solver, model_scheduler_config(m), 0.0, &grid, &e), 0);
  ck_assert_int_eq(edit_grid_sampler(b.solver, model_scheduler_config(m), 1.0, &rest, &e), 0);
  edit_src src = {.batch = B, .seed = 8, .labels = labels, .threads = 1};
  float direct[B * D];
  int nfe = 0;
  ck_assert_int_eq(
      edit_boundary(grid, rest, m, &b, &src, 2.5, EDIT_SPACE_X, direct, NULL, &nfe, &e), 0);
  assert_same(res.images, direct, B * D, "boundary");
  ck_assert_int_eq(res.nfe, nfe);
  /* a boundary of another size is refused naming edit.boundary */
  b.dim = D - 1;
  pipeline_result bad;
  ck_assert_int_eq(pipeline_run(m, &r, NULL, &bad, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "edit.boundary"));
  sampler_free(grid);
  sampler_free(rest);
  json_decref(b.solver);
  pipeline_result_clear(&res);
  model_free(m);
}
END_TEST

START_TEST(cancel_keeps_the_last_step) {
  model *m = load_cond4();
  err e = {0};
  atomic_int cancel = 0;
  const int64_t labels[1] = {1};
  pipeline_request r = {.kind = PIPELINE_GENERATE,
                        .solver = {.name = "euler", .steps = 10},
                        .batch = 1,
                        .seed = 2,
                        .labels = labels};
  trace t = {.monotone = 1, .cancel = &cancel, .cancel_at = 4};
  pipeline_hooks h = {.progress = on_progress, .progress_user = &t, .cancel = &cancel};
  pipeline_result res;
  ck_assert_int_eq(pipeline_run(m, &r, &h, &res, &e), ERR_CANCELLED);
  ck_assert_int_eq(t.last_step, 4);
  ck_assert_ptr_nonnull(res.images);
  pipeline_result_clear(&res);
  model_free(m);
}
END_TEST

/* Issue 13.1 through the one job runner the CLI and the daemon share: given noise that is not
 * noise (3e38, inf) is refused naming edit.noise, and a run that goes non-finite (NaN step noise
 * of DDPM, from the hook the daemon's batching uses) returns ERR_NUMERIC naming the step, with no
 * images. */
static int nan_in_step3(void *user, uint64_t image, uint64_t stream, float *out, size_t n, err *e) {
  (void)user;
  (void)e;
  rng_normal(9, image, stream, out, n);
  if (stream == 3)
    out[n - 1] = NAN;
  return ERR_OK;
}

START_TEST(non_finite_runs_fail_naming_the_step) {
  model *m = load_cond4();
  err e = {0};
  const int64_t labels[B] = {0, 2};
  float *x = malloc(sizeof *x * B * D);
  const float bad[] = {3e38f, -INFINITY, 1.5e4f};
  for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
    rng_normal(1, 0, 0, x, B * D);
    x[D + 7] = bad[k];
    pipeline_request r = {.kind = PIPELINE_GENERATE,
                          .solver = {.name = "ddim", .steps = 6},
                          .batch = B,
                          .labels = labels,
                          .noise = x};
    pipeline_result res;
    ck_assert_int_eq(pipeline_run(m, &r, NULL, &res, &e), ERR_INVALID);
    ck_assert_msg(strstr(e.msg, "edit.noise: value 199"), "%s", e.msg);
    ck_assert_ptr_null(res.images);
    /* an inversion's x_T likewise */
    const int64_t shape[4] = {B, 3, S, S};
    r.kind = PIPELINE_INVERT_DDIM;
    r.noise_shape = shape;
    r.noise_ndim = 4;
    ck_assert_int_eq(pipeline_run(m, &r, NULL, &res, &e), ERR_INVALID);
    ck_assert_msg(strstr(e.msg, "edit.noise"), "%s", e.msg);
  }
  pipeline_request r = {.kind = PIPELINE_GENERATE,
                        .solver = {.name = "ddpm", .steps = 8},
                        .batch = B,
                        .seed = 4,
                        .labels = labels};
  pipeline_hooks h = {.noise = nan_in_step3, .threads = 1};
  pipeline_result res;
  ck_assert_int_eq(pipeline_run(m, &r, &h, &res, &e), ERR_NUMERIC);
  ck_assert_msg(strstr(e.msg, "non-finite values in the sampler state at step 4 of 8 (t="), "%s",
                e.msg);
  ck_assert_ptr_null(res.images);
  free(x);
  model_free(m);
}
END_TEST

START_TEST(solver_errors_name_the_field) {
  model *m = load_cond4();
  err e = {0};
  sampler *s = NULL;
  char field[128];
  struct {
    const char *name, *options, *field;
  } cases[] = {
      {"nope", NULL, "scheduler.name"},
      {"dpm++2m", "{\"solver_order\": 9}", "scheduler.options.solver_order"},
      {"ddim", "{\"bogus\": 1}", "scheduler.options.bogus"},
      {"ddim", "{\"prediction_type\": \"v_prediction\"}", "scheduler.options.prediction_type"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    json_t *o = cases[i].options ? json_loads(cases[i].options, 0, NULL) : NULL;
    const pipeline_solver sv = {.name = cases[i].name, .steps = 10, .options = o};
    field[0] = 0;
    ck_assert_int_ne(pipeline_sampler(m, &sv, &s, field, sizeof field, &e), 0);
    ck_assert_ptr_null(s);
    ck_assert_msg(strcmp(field, cases[i].field) == 0, "%s: field '%s', expected '%s'",
                  cases[i].name, field, cases[i].field);
    json_decref(o);
  }
  model_free(m);
}
END_TEST

START_TEST(png_metadata_for_every_kind) {
  model *m = load_cond4();
  err e = {0};
  const int64_t labels[B] = {0, 2}, src[B] = {1, 1};
  float x0[B * D];
  rng_normal(1, 0, 0, x0, B * D);
  for (int i = 0; i < B * D; i++)
    x0[i] = tanhf(x0[i]);
  guidance g = guidance_for(m, 2.0);
  pipeline_request r = {.kind = PIPELINE_INVERT_DDPM,
                        .solver = {.name = "ddim", .steps = 6},
                        .batch = B,
                        .seed = 5,
                        .first_image = 7,
                        .labels = labels,
                        .guidance = &g,
                        .image = x0,
                        .images = B,
                        .invert = {.source_labels = src,
                                   .skip = 2,
                                   .edit = {.dx = 1, .has_colour = 1, .colour_from = 3}}};
  pipeline_result res;
  ck_assert_msg(pipeline_run(m, &r, NULL, &res, &e) == 0, "%s", e.msg);
  uint8_t *png = NULL;
  size_t len = 0;
  json_t *extra = json_pack("{s:s}", "job_id", "j1");
  ck_assert_int_eq(
      pipeline_png(m, &r, res.sampler, res.images + D, 1, "cond4", extra, &png, &len, &e), 0);
  char tmp[64], path[128];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  snprintf(path, sizeof path, "%s/m.png", tmp);
  ck_assert_int_eq(image_file_write(path, png, len, &e), 0);
  char *text = NULL, *info = NULL;
  ck_assert_int_eq(image_png_read_text(path, META_JSON_KEY, &text, &e), 0);
  ck_assert_int_eq(image_png_read_text(path, META_TEXT_KEY, &info, &e), 0);
  json_t *j = json_loads(text, 0, NULL);
  ck_assert_ptr_nonnull(j);
  ck_assert_int_eq(json_integer_value(json_object_get(j, "class_label")), 2);
  ck_assert_int_eq(json_integer_value(json_object_get(j, "image_index")), 8);
  ck_assert_str_eq(json_string_value(json_object_get(j, "job_id")), "j1");
  json_t *ed = json_object_get(j, "edit");
  ck_assert_str_eq(json_string_value(json_object_get(ed, "type")), "invert_ddpm");
  ck_assert_int_eq(json_integer_value(json_object_get(ed, "source_class")), 1);
  ck_assert_int_eq(json_integer_value(json_object_get(ed, "skip")), 2);
  ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(ed, "shift"), 0)), 1);
  ck_assert_int_eq(json_integer_value(json_object_get(ed, "colour_from")), 3);
  ck_assert_ptr_nonnull(strstr(info, "Edit: invert_ddpm"));
  ck_assert_ptr_nonnull(strstr(info, "CFG scale: 2"));
  /* plain generation has no edit block; img2img records its strength */
  pipeline_request gen = {.kind = PIPELINE_GENERATE, .strength = 0.5};
  ck_assert_ptr_null(pipeline_edit_json(&gen, 0));
  gen.image = x0;
  json_t *ge = pipeline_edit_json(&gen, 0);
  ck_assert_str_eq(json_string_value(json_object_get(ge, "type")), "img2img");
  ck_assert(json_real_value(json_object_get(ge, "strength")) == 0.5);
  json_decref(ge);
  json_decref(j);
  json_decref(extra);
  free(text);
  free(info);
  free(png);
  pipeline_result_clear(&res);
  model_free(m);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("pipeline");
  TCase *tc = tcase_create("pipeline");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, generate_matches_the_sampler);
  tcase_add_test(tc, one_picture_serves_the_batch);
  tcase_add_test(tc, ddpm_inversion_counts_both_phases_and_round_trips);
  tcase_add_test(tc, boundary_matches_edit_boundary);
  tcase_add_test(tc, cancel_keeps_the_last_step);
  tcase_add_test(tc, solver_errors_name_the_field);
  tcase_add_test(tc, non_finite_runs_fail_naming_the_step);
  tcase_add_test(tc, png_metadata_for_every_kind);
  suite_add_tcase(s, tc);
  return s;
}
