/* `denoised train` end to end on a tiny class-conditional UNet (the training fixture's config,
 * 8x8): the loss falls on a trivially learnable data set, the folder it writes loads as a model,
 * a run stopped and resumed (on another thread count) is bit-identical to an uninterrupted one,
 * an imagefolder trains, and bad data or settings are refused before anything is written. */
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "image.h"
#include "model.h"
#include "npy.h"
#include "testutil.h"

#define N_IMAGES 8

static char dir[256], cfg[1024];
static char out[16384];

/* Two classes of flat images (dark and light): the network only has to learn two colours. */
static void setup(void) {
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  test_src_path(cfg, sizeof cfg, "tests/fixtures/train/model/config.json");
  float x[N_IMAGES * 3 * 8 * 8], lab[N_IMAGES];
  for (int i = 0; i < N_IMAGES; i++) {
    for (int k = 0; k < 3 * 64; k++)
      x[i * 192 + k] = i % 2 ? 0.8f : -0.8f;
    lab[i] = (float)(i % 2);
  }
  char path[512];
  err e = {0};
  const int64_t shape[4] = {N_IMAGES, 3, 8, 8}, lshape[1] = {N_IMAGES};
  snprintf(path, sizeof path, "%s/x.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, x, 4, shape, &e), 0);
  snprintf(path, sizeof path, "%s/l.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, lab, 1, lshape, &e), 0);
}

static void teardown(void) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  ck_assert_int_eq(system(cmd), 0);
}

static int train(const char *extra) {
  return test_run_cli(
      out, sizeof out,
      "train --model-config %s --data %s/x.npy --labels %s/l.npy --batch 4 "
      "--lr 3e-3 --warmup 5 --ema 0.99 --null-class-dropout 0.1 --seed 3 --quiet %s",
      cfg, dir, dir, extra);
}

/* Mean loss of steps [a, b] of a loss.jsonl. */
static double mean_loss(const char *path, long a, long b) {
  FILE *f = fopen(path, "r");
  ck_assert_ptr_nonnull(f);
  char line[512];
  double sum = 0;
  long n = 0, step;
  double loss;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "{\"step\": %ld, \"loss\": %lf", &step, &loss) == 2 && step >= a && step <= b)
      sum += loss, n++;
  fclose(f);
  ck_assert_int_eq(n, b - a + 1);
  return sum / n;
}

START_TEST(loss_falls_and_folder_loads) {
  char extra[512], path[600];
  snprintf(extra, sizeof extra, "--steps 150 --out %s/m", dir);
  ck_assert_msg(train(extra) == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "trained 150 steps"));
  snprintf(path, sizeof path, "%s/m/loss.jsonl", dir);
  const double first = mean_loss(path, 1, 20), last = mean_loss(path, 131, 150);
  printf("loss: first 20 steps %.4f, last 20 %.4f\n", first, last);
  ck_assert_msg(last < 0.6 * first, "loss %.4f -> %.4f", first, last);
  static const char *const files[] = {"config.json",
                                      "diffusion_pytorch_model.safetensors",
                                      "scheduler_config.json",
                                      "README.md",
                                      "loss.png",
                                      "checkpoint/state.json"};
  struct stat sb;
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(path, sizeof path, "%s/m/%s", dir, files[i]);
    ck_assert_msg(stat(path, &sb) == 0 && sb.st_size > 0, "%s missing", path);
  }
  snprintf(path, sizeof path, "%s/m", dir);
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(path, &m, &e) == 0, "%s", e.msg);
  ck_assert_int_eq(model_get_info(m)->num_classes, 5);
  ck_assert_ptr_nonnull(model_scheduler_config(m));
  model_free(m);
  snprintf(path, sizeof path, "%s/m/README.md", dir);
  FILE *f = fopen(path, "r");
  char card[8192] = "";
  ck_assert_uint_gt(fread(card, 1, sizeof card - 1, f), 0);
  fclose(f);
  ck_assert_ptr_nonnull(strstr(card, "final loss"));
  ck_assert_ptr_nonnull(strstr(card, "--null-class-dropout 0.1"));
  ck_assert_ptr_nonnull(strstr(card, "wall time"));
  /* the sampler takes it */
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "sample --model %s/m --class 1 --steps 5 --quiet "
                             "--out %s/s.png",
                             dir, dir) == 0,
                "%s", out);
}
END_TEST

START_TEST(resume_is_bit_identical) {
  char extra[512], a[600], b[600];
  snprintf(extra, sizeof extra, "--steps 40 --threads 2 --ema-warmup 0 --out %s/full", dir);
  ck_assert_msg(train(extra) == 0, "%s", out);
  snprintf(extra, sizeof extra,
           "--steps 40 --threads 1 --ema-warmup 0 --checkpoint-every 7 --stop-after 17 "
           "--out %s/part",
           dir);
  ck_assert_msg(train(extra) == 0, "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "stopped after step 17"));
  snprintf(a, sizeof a, "%s/part/diffusion_pytorch_model.safetensors", dir);
  struct stat sb;
  ck_assert_int_ne(stat(a, &sb), 0); /* no model until the run is done */
  snprintf(extra, sizeof extra, "--steps 40 --out %s/part", dir);
  ck_assert_int_eq(train(extra), 1); /* the run is there: continuing needs --resume */
  ck_assert_ptr_nonnull(strstr(out, "--resume"));
  snprintf(extra, sizeof extra, "--steps 40 --threads 2 --ema-warmup 0 --resume --out %s/part",
           dir);
  ck_assert_msg(train(extra) == 0, "%s", out);
  static const char *const same[] = {"diffusion_pytorch_model.safetensors", "loss.jsonl",
                                     "config.json", "scheduler_config.json"};
  for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
    snprintf(a, sizeof a, "%s/full/%s", dir, same[i]);
    snprintf(b, sizeof b, "%s/part/%s", dir, same[i]);
    ck_assert_msg(test_files_equal(a, b), "%s differs", same[i]);
  }
  /* another setting is refused by name */
  snprintf(extra, sizeof extra,
           "--steps 40 --ema-warmup 0 --resume --out %s/part --min-snr-gamma 5", dir);
  ck_assert_int_eq(train(extra), 1);
  ck_assert_msg(strstr(out, "min_snr_gamma"), "%s", out);
}
END_TEST

static long count_lines(const char *path) {
  FILE *f = fopen(path, "r");
  long n = 0;
  for (int c; f && (c = fgetc(f)) != EOF;)
    n += c == '\n';
  if (f)
    fclose(f);
  return n;
}

/* SIGINT finishes the step, writes a checkpoint of it and exits 130; --resume goes on from it. */
START_TEST(interrupt_writes_checkpoint) {
  char log[600], errpath[600];
  snprintf(log, sizeof log, "%s/i/loss.jsonl", dir);
  snprintf(errpath, sizeof errpath, "%s/stderr.txt", dir);
  char odir[600], data[600], labels[600];
  snprintf(odir, sizeof odir, "%s/i", dir);
  snprintf(data, sizeof data, "%s/x.npy", dir);
  snprintf(labels, sizeof labels, "%s/l.npy", dir);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    FILE *ef = freopen(errpath, "w", stderr);
    (void)ef;
    execl(test_bin(), "denoised", "train", "--model-config", cfg, "--data", data, "--labels",
          labels, "--steps", "1000000", "--batch", "2", "--quiet", "--out", odir, (char *)NULL);
    _exit(127);
  }
  const double t0 = test_now_s();
  while (count_lines(log) < 3 && test_now_s() - t0 < 60)
    usleep(10000);
  ck_assert_int_eq(kill(pid, SIGINT), 0);
  int st;
  ck_assert_int_eq(waitpid(pid, &st, 0), pid);
  ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 130, "status %d", st);
  FILE *f = fopen(errpath, "r");
  char msg[1024] = "";
  ck_assert_uint_gt(fread(msg, 1, sizeof msg - 1, f), 0);
  fclose(f);
  long k = 0;
  const char *p = strstr(msg, "interrupted after step ");
  ck_assert_msg(p && sscanf(p, "interrupted after step %ld", &k) == 1, "%s", msg);
  ck_assert_int_eq(count_lines(log), k);
  char extra[256];
  snprintf(extra, sizeof extra, "--steps 1000000 --resume --stop-after %ld --out %s", k + 2, odir);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "train --model-config %s --data %s --labels %s --batch 2 --quiet %s",
                             cfg, data, labels, extra) == 0,
                "%s", out);
  ck_assert_int_eq(count_lines(log), k + 2);
}
END_TEST

/* An imagefolder: 8x8 PNGs with labels by metadata.jsonl. */
static void write_folder(const char *name, int grey_one, const char *meta_extra) {
  char path[600];
  err e = {0};
  snprintf(path, sizeof path, "%s/%s", dir, name);
  ck_assert_int_eq(mkdir(path, 0777), 0);
  snprintf(path, sizeof path, "%s/%s/metadata.jsonl", dir, name);
  FILE *meta = fopen(path, "w");
  for (int i = 0; i < 4; i++) {
    uint8_t px[8 * 8 * 3];
    memset(px, i % 2 ? 220 : 30, sizeof px);
    snprintf(path, sizeof path, "%s/%s/img%d.png", dir, name, i);
    const int c = grey_one && i == 2 ? 1 : 3;
    ck_assert_int_eq(image_png_write(path, px, c, 8, 8, NULL, 0, &e), 0);
    fprintf(meta, "{\"file_name\": \"img%d.png\", \"label\": %d}\n", i, i % 2);
  }
  fputs(meta_extra, meta);
  fclose(meta);
}

static int train_folder(const char *name) {
  return test_run_cli(out, sizeof out,
                      "train --model-config %s --data %s/%s --steps 3 --batch 2 --quiet "
                      "--out %s/out-%s",
                      cfg, dir, name, dir, name);
}

START_TEST(imagefolder_trains) {
  write_folder("good", 0, "");
  ck_assert_msg(train_folder("good") == 0, "%s", out);
  char path[600];
  snprintf(path, sizeof path, "%s/out-good/README.md", dir);
  struct stat sb;
  ck_assert_int_eq(stat(path, &sb), 0);
}
END_TEST

/* Refused before anything is written: the error names the file, line or key. */
static void refused(int rc, const char *needle, const char *outdir) {
  ck_assert_msg(rc == 1 || rc == 2, "exit %d: %s", rc, out);
  ck_assert_msg(strstr(out, needle), "expected '%s' in: %s", needle, out);
  char path[600];
  struct stat sb;
  snprintf(path, sizeof path, "%s/%s", dir, outdir);
  ck_assert_msg(stat(path, &sb) != 0, "%s was created", path);
}

static void write_npy(const char *name, int n, int c, int hw, float value) {
  char path[600];
  err e = {0};
  float *x = malloc((size_t)n * c * hw * hw * sizeof *x);
  for (int i = 0; i < n * c * hw * hw; i++)
    x[i] = value;
  const int64_t shape[4] = {n, c, hw, hw};
  snprintf(path, sizeof path, "%s/%s", dir, name);
  ck_assert_int_eq(npy_write_f32(path, x, 4, shape, &e), 0);
  free(x);
}

START_TEST(refusals) {
  write_npy("big.npy", 8, 3, 16, 0);
  write_npy("grey.npy", 8, 1, 8, 0);
  write_npy("bright.npy", 8, 3, 8, 2.0f);
  const char *fmt = "train --model-config %s --data %s/%s --labels %s/%s --steps 3 --batch 2 "
                    "--null-class-dropout 0.1 --quiet --out %s/r";
  struct {
    const char *data, *labels, *needle;
  } cases[] = {{"big.npy", "l.npy", "sample_size is 8"},
               {"grey.npy", "l.npy", "1 channels, the model takes 3"},
               {"bright.npy", "l.npy", "must be in [-1, 1]"}};
  for (size_t i = 0; i < 3; i++)
    refused(test_run_cli(out, sizeof out, fmt, cfg, dir, cases[i].data, dir, cases[i].labels, dir),
            cases[i].needle, "r");
  float bad[N_IMAGES] = {0, 1, 0, 7, 0, 1, 0, 1}, nul[N_IMAGES] = {0, 1, 0, 4, 0, 1, 0, 1};
  const int64_t ls[1] = {N_IMAGES};
  char path[600];
  err e = {0};
  snprintf(path, sizeof path, "%s/bad.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, bad, 1, ls, &e), 0);
  snprintf(path, sizeof path, "%s/nul.npy", dir);
  ck_assert_int_eq(npy_write_f32(path, nul, 1, ls, &e), 0);
  refused(test_run_cli(out, sizeof out, fmt, cfg, dir, "x.npy", dir, "bad.npy", dir),
          "bad.npy [3]: label 7 outside [0, 5)", "r");
  refused(test_run_cli(out, sizeof out, fmt, cfg, dir, "x.npy", dir, "nul.npy", dir), "null class",
          "r");
  refused(test_run_cli(out, sizeof out,
                       "train --model-config %s --data %s/x.npy --steps 3 --batch 2 --out %s/r",
                       cfg, dir, dir),
          "--labels L.npy is needed", "r");
  write_folder("mixed", 1, "");
  refused(train_folder("mixed"), "mixed channel counts", "out-mixed");
  write_folder("ghost", 0, "{\"file_name\": \"nope.png\", \"label\": 1}\n");
  refused(train_folder("ghost"), "metadata.jsonl:5: file_name 'nope.png'", "out-ghost");
  write_folder("junk", 0, "");
  snprintf(path, sizeof path, "%s/junk/img1.png", dir);
  FILE *f = fopen(path, "w");
  fputs("not an image", f);
  fclose(f);
  refused(train_folder("junk"), "img1.png: not a PNG", "out-junk");
  snprintf(path, sizeof path, "%s/cfg.json", dir);
  f = fopen(path, "w");
  fputs("{\"_class_name\": \"UNet2DModel\", \"block_out_channels\": [4, \"x\"]}", f);
  fclose(f);
  refused(test_run_cli(out, sizeof out,
                       "train --model-config %s --data %s/x.npy --steps 3 --batch 2 --out %s/r",
                       path, dir, dir),
          "block_out_channels", "r");
  refused(test_run_cli(out, sizeof out,
                       "train --model-config %s --data %s/x.npy --labels %s/l.npy --steps 3 "
                       "--batch 2 --resume --out %s/r",
                       cfg, dir, dir, dir),
          "no checkpoint", "r");
  refused(test_run_cli(out, sizeof out,
                       "train --model-config %s --data %s/x.npy --batch 2 "
                       "--out %s/r",
                       cfg, dir, dir),
          "--steps", "r");
  refused(test_run_cli(out, sizeof out,
                       "train --model-config %s --data %s/x.npy --labels %s/l.npy --steps 3 "
                       "--batch 2 --adam-betas 0.9 --out %s/r",
                       cfg, dir, dir, dir),
          "--adam-betas expects 2", "r");
  ck_assert_int_eq(test_run_cli(out, sizeof out, "train --help"), 0);
  ck_assert_ptr_nonnull(strstr(out, "--null-class-dropout"));
}
END_TEST

/* `denoised bench train` (the engine half of bench/train) runs steps on the fixture model and
 * reports them in the line bench/train parses; options that only 'bench unet' has are refused. */
START_TEST(bench_train_reports_steps) {
  char model[1024];
  test_src_path(model, sizeof model, "tests/fixtures/train/model");
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "bench train --model %s --batch 3 --iters 2 --warmup 1 --threads 1",
                                model),
                   0);
  double ms = -1, rss = -1;
  const char *line = strstr(out, "bench train: batch=3 threads=1 size=");
  ck_assert_msg(line, "%s", out);
  ck_assert_int_eq(sscanf(strstr(line, "ms_per_step="), "ms_per_step=%lf", &ms), 1);
  ck_assert_int_eq(sscanf(strstr(line, "peak_rss_mb="), "peak_rss_mb=%lf", &rss), 1);
  ck_assert(ms > 0 && rss > 0);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "bench train --model %s --size 8", model), 2);
  ck_assert_ptr_nonnull(strstr(out, "--size"));
  ck_assert_int_ne(test_run_cli(out, sizeof out, "bench train --model %s/nowhere", model), 0);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("train_cli");
  TCase *tc = tcase_create("train_cli");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, loss_falls_and_folder_loads);
  tcase_add_test(tc, resume_is_bit_identical);
  tcase_add_test(tc, imagefolder_trains);
  tcase_add_test(tc, interrupt_writes_checkpoint);
  tcase_add_test(tc, refusals);
  tcase_add_test(tc, bench_train_reports_steps);
  suite_add_tcase(s, tc);
  return s;
}
