/* The `denoised` command line end to end: help texts, usage errors with the
 * right exit codes, forward parity through .npy files, and PNG metadata that
 * regenerates the same image bit for bit. */
#include <stdarg.h>
#include <sys/wait.h>

#include "npy.h"
#include "testutil.h"

START_TEST(help_and_usage_errors) {
  char out[8192];
  ck_assert_int_eq(test_run_cli(out, sizeof out, "--help"), 0);
  ck_assert_ptr_nonnull(strstr(out, "sample"));
  const char *cmds[] = {"sample --help", "forward --help", "bench --help", "bench unet --help"};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(test_run_cli(out, sizeof out, "%s", cmds[i]), 0);
    ck_assert_ptr_nonnull(strstr(out, "usage:"));
  }
  ck_assert_int_eq(test_run_cli(out, sizeof out, "frobnicate"), 2);
  ck_assert_ptr_nonnull(strstr(out, "unknown command 'frobnicate'"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --model x --steps abc --out y.npy"), 2);
  ck_assert_ptr_nonnull(strstr(out, "--steps expects an integer"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --model x --steps 0 --out y.npy"), 2);
  /* without --model: the default model, which is class-conditional (without --class each
   * image's class is drawn: test_rough_edges); a size it was not built for is refused */
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --size 48 --out y.npy"), 2);
  ck_assert_ptr_nonnull(strstr(out, "--size 48"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "sample --model x --steps 5"), 2);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --model x --seed 1 --noise n.npy --out y.npy"), 2);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "forward --model x"), 2);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "bench mystery"), 2);
}
END_TEST

START_TEST(runtime_errors_are_clear) {
  char out[8192], model[1024], tmp[256];
  test_tmpdir(tmp, sizeof tmp);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --model /nonexistent --seed 1 --out %s/a.npy", tmp), 1);
  ck_assert_ptr_nonnull(strstr(out, "does not exist"));
  test_src_path(model, sizeof model, "tests/fixtures/gmm/cond4");
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --seed 1 --guidance-scale 2 --steps 5 "
                                "--out %s/a.npy",
                                model, tmp),
                   0);
  ck_assert_ptr_nonnull(strstr(out, "classes drawn from the seed"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 9 --seed 1 --out %s/a.npy", model, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "is not a class of this model"));
  /* classes by name (config.json _class_labels), case-insensitive, in every command */
  char shapes[1024], a_npy[600], b_npy[600];
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  snprintf(a_npy, sizeof a_npy, "%s/by-name.npy", tmp);
  snprintf(b_npy, sizeof b_npy, "%s/by-index.npy", tmp);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "sample --model %s --class Ring --seed 3 --steps 4 --out %s --quiet", shapes,
                   a_npy),
      0);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 2 --seed 3 --steps 4 --out %s --quiet",
                                shapes, b_npy),
                   0);
  ck_assert(test_files_equal(a_npy, b_npy));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class hexagon --seed 3 --out %s", shapes,
                                a_npy),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "'hexagon' is not a class"));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "invert --model %s --method ddim --image %s --class ring,nope --out %s/n.npy",
                   shapes, a_npy, tmp),
      2);
  ck_assert_ptr_nonnull(strstr(out, "class names"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --scheduler nope --out %s/a.npy",
                                model, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "unknown scheduler 'nope'"));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "sample --model %s --class 0 --scheduler-opt bogus_key=1 --out %s/a.npy", model,
                   tmp),
      2);
  ck_assert_ptr_nonnull(strstr(out, "bogus_key"));
  ck_assert_int_eq(
      test_run_cli(
          out, sizeof out,
          "sample --model %s --class 0 --scheduler-opt timestep_spacing=sideways --out %s/a.npy",
          model, tmp),
      2);
  ck_assert_ptr_nonnull(strstr(out, "timestep_spacing"));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --replay %s/missing.png -o %s/b.png", tmp, tmp), 1);
}
END_TEST

START_TEST(forward_matches_fixture) {
  char out[8192], fx[1024], tmp[256], path[512];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(fx, sizeof fx, "tests/fixtures/unet/classcond_small");
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "forward --model %s --input %s/input.npy --timesteps %s/timesteps.npy "
                             "--class-labels %s/class_labels.npy --out %s/o.npy --threads 2",
                             fx, fx, fx, fx, tmp) == 0,
                "%s", out);
  npy_array a, b;
  err e;
  snprintf(path, sizeof path, "%s/o.npy", tmp);
  ck_assert_int_eq(npy_read_f32(path, &a, &e), 0);
  snprintf(path, sizeof path, "%s/output.npy", fx);
  ck_assert_int_eq(npy_read_f32(path, &b, &e), 0);
  ck_assert_int_eq(a.count, b.count);
  ck_assert(test_rel_l2(a.data, b.data, (size_t)a.count) < 1e-4);
  npy_array_free(&a);
  npy_array_free(&b);
  /* wrong channel count in the input is an error, not a crash */
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "forward --model %s --input %s/timesteps.npy --timesteps %s/timesteps.npy "
                   "--out %s/o.npy",
                   fx, fx, fx, tmp),
      1);
  ck_assert_ptr_nonnull(strstr(out, "expected shape"));
}
END_TEST

START_TEST(png_metadata_replays_bit_for_bit) {
  char out[8192], model[1024], tmp[256], a[512], b[512];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "tests/fixtures/unet/cifar_small");
  /* DDPM is stochastic at every step: replay must reproduce the step noise too */
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s --scheduler ddpm --steps 8 --seed 1234 "
                             "--batch 3 -o %s/img.png --quiet",
                             model, tmp) == 0,
                "%s", out);
  snprintf(a, sizeof a, "%s/img-2.png", tmp);
  snprintf(b, sizeof b, "%s/replayed.png", tmp);
  ck_assert_msg(test_run_cli(out, sizeof out, "sample --replay %s -o %s --quiet", a, b) == 0, "%s",
                out);
  ck_assert_msg(test_files_equal(a, b), "replayed image differs from the original");
  /* and the image differs from its batch neighbour (per-image noise streams) */
  snprintf(b, sizeof b, "%s/img-1.png", tmp);
  ck_assert(!test_files_equal(a, b));
  /* an image comes out bit-identical alone, in a bigger batch, on any thread count */
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "sample --model %s --steps 5 --seed 9 --batch 2 --out %s/two.npy --quiet", model,
                   tmp),
      0);
  ck_assert_int_eq(
      test_run_cli(
          out, sizeof out,
          "sample --model %s --steps 5 --seed 9 --batch 1 --threads 1 --out %s/one.npy --quiet",
          model, tmp),
      0);
  npy_array one, two;
  err e;
  snprintf(a, sizeof a, "%s/one.npy", tmp);
  snprintf(b, sizeof b, "%s/two.npy", tmp);
  ck_assert_int_eq(npy_read_f32(a, &one, &e), 0);
  ck_assert_int_eq(npy_read_f32(b, &two, &e), 0);
  ck_assert_int_eq(two.count, 2 * one.count);
  ck_assert(memcmp(one.data, two.data, (size_t)one.count * sizeof(float)) == 0);
  npy_array_free(&one);
  npy_array_free(&two);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("cli");
  TCase *tc = tcase_create("cli");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, help_and_usage_errors);
  tcase_add_test(tc, runtime_errors_are_clear);
  tcase_add_test(tc, forward_matches_fixture);
  tcase_add_test(tc, png_metadata_replays_bit_for_bit);
  suite_add_tcase(s, tc);
  return s;
}
