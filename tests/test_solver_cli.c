/* The solver family from the command line: `denoised sample` with every kind of solver and
 * option, PNG replay of the paper variants, clear errors for bad names, options and
 * combinations, and `denoised bench solvers` on the analytic model. */
#include <math.h>
#include <stdarg.h>
#include <sys/wait.h>

#include "npy.h"
#include "testutil.h"

START_TEST(sample_with_each_solver) {
  static const struct {
    const char *args;
    const char *nfe; /* in the summary line */
  } cases[] = {
      {"--scheduler dpm++2m-karras --steps 8", "8 NFE"},
      {"--scheduler DPMSolverMultistepScheduler --steps 9 --scheduler-opt solver_order=3 "
       "--scheduler-opt use_karras_sigmas=True",
       "9 NFE"},
      {"--scheduler unipc --steps 6 --scheduler-opt disable_corrector=[0]", "6 NFE"},
      {"--scheduler heun --steps 5", "9 NFE"},
      {"--scheduler pndm --steps 6", "15 NFE"},
      {"--scheduler plms --steps 6", "7 NFE"},
      {"--scheduler euler-a --steps 6 --scheduler-opt timestep_spacing=trailing", "6 NFE"},
      {"--scheduler dpm++2m-sde --steps 6", "6 NFE"},
      {"--scheduler f-pndm --steps 5", "14 NFE"}, /* 3 pseudo-RK4 steps of 4, then 2 */
      {"--scheduler dpm-solver-fast --steps 10 --scheduler-opt skip_type=time_quadratic", "10 NFE"},
      {"--scheduler dpm-solver-adaptive --scheduler-opt rtol=0.01", "NFE"},
      {"--scheduler DPM_Solver --steps 6 --scheduler-opt thresholding=true", "6 NFE"},
  };
  char out[8192], model[1024], tmp[256];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    ck_assert_msg(test_run_cli(out, sizeof out,
                               "sample --model %s %s --seed 4 --batch 2 --out %s/x.npy", model,
                               cases[i].args, tmp) == 0,
                  "%s: %s", cases[i].args, out);
    ck_assert_msg(strstr(out, cases[i].nfe) != NULL, "%s: no '%s' in: %s", cases[i].args,
                  cases[i].nfe, out);
    npy_array a;
    err e;
    char path[512];
    snprintf(path, sizeof path, "%s/x.npy", tmp);
    ck_assert_int_eq(npy_read_f32(path, &a, &e), 0);
    ck_assert_int_eq(a.count, 2 * 192);
    for (int64_t k = 0; k < a.count; k++)
      ck_assert_msg(isfinite(a.data[k]), "%s: non-finite output", cases[i].args);
    npy_array_free(&a);
  }
}
END_TEST

START_TEST(bad_solver_requests) {
  static const struct {
    const char *args;
    int status;
    const char *words[2];
  } cases[] = {
      {"--scheduler dpm++4m", 2, {"unknown scheduler 'dpm++4m'", NULL}},
      {"--scheduler dpm++2m --scheduler-opt solver_order=3", 2, {"solver_order", "contradicts"}},
      {"--scheduler ddim --scheduler-opt solver_order=2", 2, {"solver_order", "ddim"}},
      {"--scheduler unipc --scheduler-opt solver_type=bh3", 2, {"solver_type", "bh3"}},
      {"--scheduler euler --scheduler-opt use_beta_sigmas=true", 2, {"use_beta_sigmas", NULL}},
      {"--scheduler DPMSolverMultistepScheduler --scheduler-opt algorithm_type=dpmsolver",
       2,
       {"final_sigmas_type", "sigma_min"}},
      {"--scheduler dpm-solver-adaptive --scheduler-opt solver_order=1", 2, {"solver_order", NULL}},
      {"--scheduler pndm --steps 3", 2, {"4 steps", NULL}},
      {"--scheduler heun --scheduler-opt noequals", 2, {"KEY=VALUE", NULL}},
      /* issue 13.1: values that would make the run non-finite, refused with their range */
      {"--scheduler ddim --scheduler-opt eta=1e6", 2, {"'eta'", "[0, 1]"}},
      {"--scheduler ddim --scheduler-opt beta_start=1 --scheduler-opt beta_end=1",
       2,
       {"'beta_start'", "(0, 1)"}},
  };
  char out[8192], model[1024], tmp[256];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    int st = test_run_cli(out, sizeof out, "sample --model %s %s --seed 4 --out %s/x.npy", model,
                          cases[i].args, tmp);
    ck_assert_msg(st == cases[i].status, "%s: exit %d, expected %d: %s", cases[i].args, st,
                  cases[i].status, out);
    for (int w = 0; w < 2 && cases[i].words[w]; w++)
      ck_assert_msg(strstr(out, cases[i].words[w]) != NULL, "%s: no '%s' in: %s", cases[i].args,
                    cases[i].words[w], out);
  }
}
END_TEST

/* The PNG records the resolved config; replay rebuilds the same solver and image. */
START_TEST(replay_paper_variants) {
  static const char *const args[] = {
      "--scheduler dpm-solver-fast --steps 9 --scheduler-opt algorithm_type=dpmsolver++",
      "--scheduler f-pndm --steps 5", "--scheduler unipc --steps 7 --scheduler-opt solver_order=3",
      "--scheduler euler-a --steps 6"};
  char out[8192], model[1024], tmp[256], a[512], b[512];
  test_tmpdir(tmp, sizeof tmp);
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  for (size_t i = 0; i < sizeof args / sizeof *args; i++) {
    ck_assert_msg(test_run_cli(out, sizeof out,
                               "sample --model %s %s --seed 77 --batch 2 -o %s/i.png --quiet",
                               model, args[i], tmp) == 0,
                  "%s: %s", args[i], out);
    snprintf(a, sizeof a, "%s/i-1.png", tmp);
    snprintf(b, sizeof b, "%s/r.png", tmp);
    ck_assert_msg(test_run_cli(out, sizeof out, "sample --replay %s -o %s --quiet", a, b) == 0,
                  "%s: %s", args[i], out);
    ck_assert_msg(test_files_equal(a, b), "%s: replayed image differs", args[i]);
  }
}
END_TEST

START_TEST(bench_solvers_table) {
  char out[16384], model[1024];
  test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3");
  ck_assert_msg(
      test_run_cli(out, sizeof out,
                   "bench solvers --model %s --nfe 10,20 --solvers dpm++2m,unipc,ddim,heun,"
                   "euler-a,dpm-solver-adaptive --batch 2 --ref-nfe 300",
                   model) == 0,
      "%s", out);
  fputs(out, stderr);
  ck_assert_ptr_nonnull(strstr(out, "NFE 10"));
  ck_assert_ptr_nonnull(strstr(out, "p 10-20"));
  ck_assert_ptr_nonnull(strstr(out, "dpm++2m"));
  ck_assert_ptr_nonnull(strstr(out, "(19)")); /* Heun spends 2n - 1 */
  ck_assert_ptr_nonnull(strstr(out, "stochastic: skipped"));
  ck_assert_ptr_nonnull(strstr(out, "with"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "bench solvers --model %s --solvers nope", model),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "unknown solver 'nope'"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "bench solvers --model %s --nfe 5,x", model), 2);
  /* a solver whose step count must divide T is refused quietly, not a crash (NULL error path) */
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "bench solvers --model %s --solvers pndm --nfe 10 --ref-nfe 100",
                             model) == 0,
                "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "pndm"));
  ck_assert_int_eq(test_run_cli(out, sizeof out, "bench solvers --help"), 0);
  ck_assert_ptr_nonnull(strstr(out, "--ref-nfe"));
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("solver_cli");
  TCase *tc = tcase_create("solver_cli");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, sample_with_each_solver);
  tcase_add_test(tc, bad_solver_requests);
  tcase_add_test(tc, replay_paper_variants);
  tcase_add_test(tc, bench_solvers_table);
  suite_add_tcase(s, tc);
  return s;
}
