/* `denoised search` (S^3-style schedule search) on the analytic class-conditional mixture: the
 * schedule it writes runs with the planned NFE and beats lambda-uniform DPM-Solver++(2M) on
 * held-out noise, and a search stopped early resumes with every candidate it had tried. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

START_TEST(search_resume_and_run) {
  char dir[64], out[16384], cmd[1024], src[512];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(cmd, sizeof cmd, "cp -r %s %s/m",
           test_src_path(src, sizeof src, "tests/fixtures/gmm/cond4"), dir);
  ck_assert_int_eq(system(cmd), 0);
  const char *search = "search --model %s/m --nfe 4 --class 1 --guidance-scale 2 --budget %d "
                       "--quiet --out s4 %s";
  ck_assert_msg(test_run_cli(out, sizeof out, search, dir, 10, "") == 0, "%s", out);
  ck_assert_msg(test_run_cli(out, sizeof out, search, dir, 30, "--resume") == 0, "%s", out);
  snprintf(cmd, sizeof cmd, "%s/m/solver_data/s4.search.json", dir);
  json_t *st = json_load_file(cmd, 0, NULL);
  ck_assert_ptr_nonnull(st);
  ck_assert_int_eq(json_array_size(json_object_get(st, "tried")), 30);
  const json_t *r = json_object_get(st, "result");
  const double held = json_number_value(json_object_get(r, "heldout")),
               base = json_number_value(json_object_get(r, "heldout_dpmpp_2m"));
  ck_assert_msg(held < base, "held-out %g, DPM-Solver++(2M) %g", held, base);
  json_decref(st);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s/m --scheduler usf --solver-data s4 --class 1 "
                             "--guidance-scale 2 --batch 2 --seed 1 --out %s/x.npy",
                             dir, dir) == 0,
                "%s", out);
  ck_assert_msg(strstr(out, "4 NFE per image") != NULL, "%s", out);
  ck_assert_int_ne(test_run_cli(out, sizeof out, search, dir, 12, "--resume --nfe 5"), 0);
  ck_assert_msg(strstr(out, "not a schedule of 5 steps") != NULL, "%s", out);
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("search");
  TCase *tc = tcase_create("search");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, search_resume_and_run);
  suite_add_tcase(s, tc);
  return s;
}
