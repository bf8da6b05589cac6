/* The guidance and editing commands end to end: `sample --guidance-scale/--init-image/--mask`,
 * `invert`, `edit` (noise maps and boundaries) and `boundary fit`, their flag validation, and
 * corrupt, truncated or oversized PNG inputs (errors with exit status 1 or 2, never a crash). */
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "npy.h"
#include "testutil.h"

static char gmm[3][1024]; /* cond4, mix3, mix3_v */

static void setup(void) {
  test_src_path(gmm[0], sizeof gmm[0], "tests/fixtures/gmm/cond4");
  test_src_path(gmm[1], sizeof gmm[1], "tests/fixtures/gmm/mix3");
  test_src_path(gmm[2], sizeof gmm[2], "tests/fixtures/gmm/mix3_v");
}

static npy_array read_npy(const char *path) {
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(path, &a, &e) == 0, "%s", e.msg);
  return a;
}

START_TEST(guided_img2img_and_inpainting) {
  char out[16384], tmp[64];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  /* guidance 1 equals plain conditional sampling; 3 differs; metadata records it */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 1 --seed 4 --steps 10 --out %s/a.npy "
                                "--quiet",
                                gmm[0], tmp),
                   0);
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "sample --model %s --class 1 --seed 4 --steps 10 --guidance-scale 1 "
                   "--out %s/b.npy --quiet",
                   gmm[0], tmp),
      0);
  char pa[128], pb[128], pc[128];
  snprintf(pa, sizeof pa, "%s/a.npy", tmp);
  snprintf(pb, sizeof pb, "%s/b.npy", tmp);
  ck_assert(test_files_equal(pa, pb));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "sample --model %s --class 1 --seed 4 --steps 10 --guidance-scale 3 "
                   "-o %s/g.png --out %s/c.npy",
                   gmm[0], tmp, tmp),
      0);
  ck_assert_ptr_nonnull(strstr(out, "10 NFE per image"));
  snprintf(pc, sizeof pc, "%s/c.npy", tmp);
  ck_assert(!test_files_equal(pa, pc));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --replay %s/g.png -o %s/g2.png --quiet", tmp, tmp), 0);
  snprintf(pa, sizeof pa, "%s/g.png", tmp);
  snprintf(pb, sizeof pb, "%s/g2.png", tmp);
  ck_assert(test_files_equal(pa, pb));
  /* img2img: strength picks the steps run; inpainting keeps the black part exactly */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 2 --seed 5 --steps 20 --init-image "
                                "%s/c.npy --strength 0.5 --out %s/i.npy",
                                gmm[0], tmp, tmp),
                   0);
  ck_assert_ptr_nonnull(strstr(out, "10 NFE per image"));
  float mask[64];
  for (int k = 0; k < 64; k++)
    mask[k] = k % 8 >= 4;
  char mpath[128];
  snprintf(mpath, sizeof mpath, "%s/m.npy", tmp);
  const int64_t ms[2] = {8, 8};
  err e = {0};
  ck_assert(npy_write_f32(mpath, mask, 2, ms, &e) == 0);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 2 --seed 5 --steps 20 --batch 2 "
                                "--init-image %s/c.npy --mask %s --out %s/p.npy --quiet",
                                gmm[0], tmp, mpath, tmp),
                   0);
  snprintf(pb, sizeof pb, "%s/p.npy", tmp);
  npy_array src = read_npy(pc), inp = read_npy(pb);
  ck_assert_int_eq((int)inp.shape[0], 2);
  double kept = 0, changed = 0;
  for (int b = 0; b < 2; b++)
    for (int k = 0; k < 192; k++) {
      const double dlt = fabs(inp.data[b * 192 + k] - src.data[k]);
      if (mask[k % 64] == 0)
        kept = fmax(kept, dlt);
      else
        changed += dlt / (2 * 96);
    }
  ck_assert_msg(kept == 0, "kept region moved by %g", kept);
  ck_assert(changed > 0.05);
  /* a PNG mask and init image work the same way */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --seed 6 --steps 8 --init-image "
                                "%s/g.png --mask %s/g.png -o %s/q.png --quiet",
                                gmm[0], tmp, tmp, tmp),
                   0);
  npy_array_free(&src);
  npy_array_free(&inp);
}
END_TEST

START_TEST(invert_and_edit_noise) {
  char out[16384], tmp[64];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --seed 7 --steps 20 --batch 2 "
                                "--out %s/x.npy --quiet",
                                gmm[0], tmp),
                   0);
  /* edit-friendly: exact reconstruction, maps and sidecar */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "invert --model %s --method ddpm --image %s/x.npy --class 0,0 "
                                "--guidance-scale 2 --steps 30 --out %s/n.npy --verify --quiet",
                                gmm[0], tmp, tmp),
                   0);
  double mx = -1, rl = -1;
  const char *r = strstr(out, "reconstruction: max abs error");
  ck_assert_ptr_nonnull(r);
  ck_assert_int_eq(sscanf(r, "reconstruction: max abs error %lf, rel L2 %lf", &mx, &rl), 2);
  ck_assert(mx < 1e-4);
  char p[128], q[128];
  snprintf(p, sizeof p, "%s/n.npy", tmp);
  npy_array maps = read_npy(p);
  ck_assert_int_eq(maps.ndim, 5);
  ck_assert(maps.shape[0] == 2 && maps.shape[1] == 31 && maps.shape[2] == 3);
  npy_array_free(&maps);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "edit --model %s --noise %s/n.npy --out %s/r.npy",
                                gmm[0], tmp, tmp),
                   0);
  snprintf(p, sizeof p, "%s/x.npy", tmp);
  snprintf(q, sizeof q, "%s/r.npy", tmp);
  npy_array x = read_npy(p), rec = read_npy(q);
  double worst = 0;
  for (int k = 0; k < 384; k++)
    worst = fmax(worst, fabs(x.data[k] - rec.data[k]));
  ck_assert_msg(worst < 1e-4, "edit without changes is %g off", worst);
  npy_array_free(&rec);
  /* the edits run and change the result */
  const char *edits[] = {"--class 2 --guidance-scale 4 --skip 6", "--class 1,2", "--shift 2,-1",
                         "--colour 0.3,0,-0.2", "--colour 0.1,0.1,0.1 --colour-from 20"};
  for (int i = 0; i < 5; i++) {
    ck_assert_msg(test_run_cli(out, sizeof out,
                               "edit --model %s --noise %s/n.npy %s --out %s/e.npy --quiet", gmm[0],
                               tmp, edits[i], tmp) == 0,
                  "%s: %s", edits[i], out);
    snprintf(q, sizeof q, "%s/e.npy", tmp);
    npy_array ed = read_npy(q);
    ck_assert_msg(test_rel_l2(ed.data, x.data, 384) > 0.01, "%s changed nothing", edits[i]);
    npy_array_free(&ed);
  }
  /* an edited PNG records the edit: `edit --replay` redoes that one image bit for bit, and
   * `sample --replay` sends it there */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --noise %s/n.npy --class 1,2 --skip 4 --shift 1,0 "
                                "--colour 0.2,0,0 --colour-from 25 -o %s/e.png --quiet",
                                gmm[0], tmp, tmp),
                   0);
  ck_assert_msg(
      test_run_cli(out, sizeof out, "edit --replay %s/e-1.png -o %s/e1.png --quiet", tmp, tmp) == 0,
      "%s", out);
  snprintf(p, sizeof p, "%s/e-1.png", tmp);
  snprintf(q, sizeof q, "%s/e1.png", tmp);
  ck_assert_msg(test_files_equal(p, q), "the replayed edit differs");
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "sample --replay %s/e-1.png -o %s/e2.png", tmp, tmp), 1);
  ck_assert_ptr_nonnull(strstr(out, "edit --replay"));
  ck_assert_int_eq(
      test_run_cli(out, sizeof out, "edit --replay %s/e1.png --skip 2 -o %s/e2.png", tmp, tmp), 2);
  /* DDIM inversion: x_T goes back through sample --noise and edit --noise */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "invert --model %s --method ddim --image %s/x.npy --class 0 "
                                "--steps 20 --out %s/t.npy --verify",
                                gmm[0], tmp, tmp),
                   0);
  ck_assert_ptr_nonnull(strstr(out, "reconstruction: max abs error"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --noise %s/t.npy --batch 2 --steps 20 "
                                "--out %s/u.npy --quiet",
                                gmm[0], tmp, tmp),
                   0);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --noise %s/t.npy --class 2 --out %s/v.npy --quiet",
                                gmm[0], tmp, tmp),
                   0);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --noise %s/t.npy --skip 3 --out %s/v.npy", gmm[0],
                                tmp, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "ddpm noise maps"));
  /* the maps of another model, a missing sidecar, a bad skip */
  ck_assert_int_eq(test_run_cli(out, sizeof out, "edit --model %s --noise %s/n.npy --out %s/v.npy",
                                gmm[1], tmp, tmp),
                   1);
  ck_assert_int_eq(test_run_cli(out, sizeof out, "edit --model %s --noise %s/x.npy --out %s/v.npy",
                                gmm[0], tmp, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "sidecar"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --noise %s/n.npy --skip 30 --out %s/v.npy", gmm[0],
                                tmp, tmp),
                   2);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --noise %s/n.npy --class 7 --out %s/v.npy", gmm[0],
                                tmp, tmp),
                   2);
  npy_array_free(&x);
}
END_TEST

START_TEST(boundary_fit_and_edit) {
  char out[16384], tmp[64], p[128];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  /* label: the sign of the mean of the red channel's left half, a smooth attribute of mix3 */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --seed 2 --steps 20 --batch 60 --out %s/s.npy "
                                "--quiet",
                                gmm[1], tmp),
                   0);
  snprintf(p, sizeof p, "%s/s.npy", tmp);
  npy_array s = read_npy(p);
  double med[60], sorted[60];
  for (int i = 0; i < 60; i++) {
    double m = 0;
    for (int k = 0; k < 64; k++)
      m += k % 8 < 4 ? s.data[i * 192 + k] : 0;
    med[i] = sorted[i] = m;
  }
  for (int i = 0; i < 60; i++) /* median split: both labels present */
    for (int j = i + 1; j < 60; j++)
      if (sorted[j] < sorted[i]) {
        double t = sorted[i];
        sorted[i] = sorted[j];
        sorted[j] = t;
      }
  snprintf(p, sizeof p, "%s/l.txt", tmp);
  FILE *f = fopen(p, "w");
  fprintf(f, "# label per image of s.npy\n");
  for (int i = 0; i < 60; i++)
    fprintf(f, "%d\n", med[i] > sorted[30]);
  fclose(f);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "boundary fit --model %s --images %s/s.npy --labels %s/l.txt "
                             "--steps 20 --attribute red-left --out %s/b.json --quiet",
                             gmm[1], tmp, tmp, tmp) == 0,
                "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "test accuracy"));
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "edit --model %s --boundary %s/b.json --strength 3 --seed 1 --batch 4 "
                             "--out %s/e.npy --quiet",
                             gmm[1], tmp, tmp) == 0,
                "%s", out);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --boundary %s/b.json --strength -3 --image "
                                "%s/s.npy -o %s/e.png --quiet",
                                gmm[1], tmp, tmp, tmp),
                   0);
  snprintf(p, sizeof p, "%s/e-59.png", tmp);
  ck_assert_int_eq(access(p, F_OK), 0);
  /* both kinds of boundary edit replay from their PNGs: generated (that image's streams) and
   * inverted (the input file again) */
  ck_assert_int_eq(
      test_run_cli(out, sizeof out,
                   "edit --model %s --boundary %s/b.json --strength 3 --seed 1 --batch 3 "
                   "-o %s/g.png --quiet",
                   gmm[1], tmp, tmp),
      0);
  const char *replays[] = {"g-2", "e-7"};
  for (int i = 0; i < 2; i++) {
    char a[128], b[128];
    snprintf(a, sizeof a, "%s/%s.png", tmp, replays[i]);
    snprintf(b, sizeof b, "%s/r%d.png", tmp, i);
    ck_assert_msg(test_run_cli(out, sizeof out, "edit --replay %s -o %s --quiet", a, b) == 0,
                  "%s: %s", replays[i], out);
    ck_assert_msg(test_files_equal(a, b), "%s: the replayed boundary edit differs", replays[i]);
  }
  /* fixed step; PATH LABEL lines; the boundary of another model's size */
  snprintf(p, sizeof p, "%s/l2.txt", tmp);
  f = fopen(p, "w");
  fprintf(f, "e-0.png 0\ne-1.png 1\ne-2.png 0\ne-3.png 1\ne-4.png 0\ne-5.png 1\n");
  fclose(f);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "boundary fit --model %s --labels %s/l2.txt --step 5 --steps 10 "
                             "--test-fraction 0 --out %s/b2.json --quiet",
                             gmm[1], tmp, tmp) == 0,
                "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "step 5"));
  /* bad inputs */
  const char *bad[] = {
      "boundary fit --model %s --labels %s/l.txt --out %s/x.json", /* no --images */
      "boundary fit --model %s --images %s/s.npy --labels %s/l2.txt --out %s/x.json", /* count */
      "boundary fit --model %s --images %s/s.npy --labels %s/l.txt --step 20 --steps 20 --out "
      "%s/x.json",
  };
  for (int i = 0; i < 3; i++) {
    char line[1024];
    snprintf(line, sizeof line, bad[i], gmm[1], tmp, tmp, tmp);
    const int rc = test_run_cli(out, sizeof out, "%s", line);
    ck_assert_msg(rc == 1 || rc == 2, "%s: exit %d", line, rc);
  }
  snprintf(p, sizeof p, "%s/l3.txt", tmp);
  f = fopen(p, "w");
  fprintf(f, "e-0.png 2\n");
  fclose(f);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "boundary fit --model %s --labels %s/l3.txt --out %s/x.json",
                                gmm[1], tmp, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "not 0 or 1"));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --boundary %s/l.txt --strength 1 --seed 1 "
                                "--out %s/x.npy",
                                gmm[1], tmp, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "invalid JSON"));
  /* a mixture has no h-space: its boundary is x only, and --space h is refused */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --boundary %s/b.json --strength 1 --seed 1 "
                                "--space h --out %s/x.npy",
                                gmm[1], tmp, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "no h-space part"));
  npy_array_free(&s);
}
END_TEST

/* On a UNet the fit writes an h-space boundary too (the mid block's output), and each space
 * edits: x alone, h alone, both (the default when the file has h). */
START_TEST(boundary_h_space) {
  char out[16384], tmp[64], p[128], unet[1024];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  test_src_path(unet, sizeof unet, "tests/fixtures/unet/classcond_small");
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 3 --seed 4 --steps 10 --batch 24 "
                                "--out %s/s.npy --quiet",
                                unet, tmp),
                   0);
  snprintf(p, sizeof p, "%s/l.txt", tmp);
  FILE *f = fopen(p, "w");
  for (int i = 0; i < 24; i++)
    fprintf(f, "%d 3\n", i % 2);
  fclose(f);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "boundary fit --model %s --images %s/s.npy --labels %s/l.txt "
                             "--steps 10 --step 4 --out %s/b.json",
                             unet, tmp, tmp, tmp) == 0,
                "%s", out);
  ck_assert_ptr_nonnull(strstr(out, "h-space boundary (mid block 32x4x4)"));
  snprintf(p, sizeof p, "%s/b.json", tmp);
  json_error_t je;
  json_t *j = json_load_file(p, 0, &je);
  ck_assert_ptr_nonnull(j);
  json_t *mid = json_object_get(j, "mid");
  ck_assert_int_eq(json_array_size(json_object_get(mid, "normal")), 32 * 4 * 4);
  json_decref(j);
  npy_array res[3];
  static const char *const spaces[] = {"x", "h", "both"};
  for (int k = 0; k < 3; k++) {
    ck_assert_msg(test_run_cli(out, sizeof out,
                               "edit --model %s --boundary %s/b.json --strength 20 --seed 1 "
                               "--class 3 --batch 2 --space %s --out %s/e%d.npy",
                               unet, tmp, spaces[k], tmp, k) == 0,
                  "%s", out);
    ck_assert_ptr_nonnull(strstr(out, spaces[k]));
    snprintf(p, sizeof p, "%s/e%d.npy", tmp, k);
    res[k] = read_npy(p);
  }
  ck_assert(memcmp(res[0].data, res[1].data, sizeof(float) * 2 * 192) != 0);
  ck_assert(memcmp(res[0].data, res[2].data, sizeof(float) * 2 * 192) != 0);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "edit --model %s --boundary %s/b.json --strength 20 --seed 1 "
                             "--class 3 --batch 2 --out %s/d.npy",
                             unet, tmp, tmp) == 0,
                "%s", out);
  snprintf(p, sizeof p, "%s/d.npy", tmp);
  npy_array d = read_npy(p);
  ck_assert(memcmp(d.data, res[2].data, sizeof(float) * 2 * 192) == 0); /* default: both */
  npy_array_free(&d);
  for (int k = 0; k < 3; k++)
    npy_array_free(&res[k]);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "edit --model %s --boundary %s/b.json --strength 1 --seed 1 "
                                "--class 3 --space z --out %s/x.npy",
                                unet, tmp, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "--space"));
  /* classes by name, in the labels and --class (shapes-gmm names its classes) */
  char shapes[1024];
  test_src_path(shapes, sizeof shapes, "models/shapes-gmm");
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class ring --seed 4 --steps 10 --batch 8 "
                                "--out %s/r.npy --quiet",
                                shapes, tmp),
                   0);
  snprintf(p, sizeof p, "%s/n.txt", tmp);
  f = fopen(p, "w");
  for (int i = 0; i < 8; i++)
    fprintf(f, i < 4 ? "%d ring\n" : "%d\n", i % 2);
  fclose(f);
  ck_assert_msg(test_run_cli(out, sizeof out,
                             "boundary fit --model %s --images %s/r.npy --labels %s/n.txt "
                             "--class RING --steps 10 --step 4 --out %s/n.json --quiet",
                             shapes, tmp, tmp, tmp) == 0,
                "%s", out);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "boundary fit --model %s --images %s/r.npy --labels %s/n.txt "
                                "--class hexagon --steps 10 --out %s/n.json",
                                shapes, tmp, tmp, tmp),
                   2);
  ck_assert_ptr_nonnull(strstr(out, "'hexagon' is not a class"));
  f = fopen(p, "w");
  for (int i = 0; i < 8; i++)
    fprintf(f, "%d %s\n", i % 2, i == 5 ? "hexagon" : "ring");
  fclose(f);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "boundary fit --model %s --images %s/r.npy --labels %s/n.txt "
                                "--steps 10 --out %s/n.json",
                                shapes, tmp, tmp, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "n.txt:6: class 'hexagon' is not a class"));
}
END_TEST

START_TEST(flags_are_validated) {
  char out[16384], tmp[64];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  static const struct {
    const char *args, *want;
    int status;
  } cases[] = {
      {"sample --model M --class 0 --guidance-scale -1 --out T/a.npy", "--guidance-scale", 2},
      {"sample --model M --class 0 --guidance-scale abc --out T/a.npy", "--guidance-scale", 2},
      {"sample --model M --class 0 --guidance-scale 1000 --out T/a.npy", "--guidance-scale", 2},
      {"sample --model U --guidance-scale 2 --out T/a.npy", "class-conditional", 2},
      {"sample --model M --class 0 --strength 0.5 --out T/a.npy", "--init-image", 2},
      {"sample --model M --class 0 --mask T/m.png --out T/a.npy", "--init-image", 2},
      {"sample --model M --class 0 --init-image T/none.png --strength 0 --out T/a.npy",
       "--strength", 2},
      {"sample --model M --class 0 --init-image T/none.png --strength 1.5 --out T/a.npy",
       "--strength", 2},
      {"sample --model M --class 0 --init-image T/none.png --out T/a.npy", "No such file", 1},
      {"sample --model M --class 0 --steps 4 --init-image T/x.npy --strength 0.1 --out T/a.npy",
       "strength", 1},
      {"sample --model M --class 0 --scheduler dpm-solver-fast --init-image T/x.npy --out T/a.npy",
       "paper", 1},
      {"sample --replay T/a.png --guidance-scale 2 -o T/b.png", "--replay takes only", 2},
      {"invert --model M --image T/x.npy --out T/n.npy", "required", 2},
      {"invert --model M --method dpm --image T/x.npy --out T/n.npy", "ddim or ddpm", 2},
      {"invert --model M --method ddim --image T/x.npy --out T/n.png --class 0", ".npy", 2},
      {"invert --model M --method ddim --image T/x.npy --out T/n.npy", "pass --class", 2},
      {"invert --model M --method ddim --image T/x.npy --out T/n.npy --class 0,1,2", "classes", 2},
      {"invert --model U --method ddim --image T/x.npy --out T/n.npy --class 0", "not class", 2},
      {"invert --model M --method ddpm --image T/x.npy --out T/n.npy --class 0 --steps 0",
       "--steps", 2},
      {"edit --model M --out T/e.npy", "either --noise", 2},
      {"edit --model M --noise T/n.npy", "-o OUT.png", 2},
      {"edit --model M --noise T/n.npy --boundary T/b.json --out T/e.npy", "either", 2},
      {"edit --model M --noise T/n.npy --shift 1.5,0 --out T/e.npy", "whole pixels", 2},
      {"edit --model M --noise T/n.npy --shift 1 --out T/e.npy", "--shift", 2},
      {"edit --model M --noise T/n.npy --colour 1,2 --out T/e.npy", "--colour", 2},
      {"edit --model M --noise T/n.npy --colour 9,0,0 --out T/e.npy", "--colour", 2},
      {"edit --model M --noise T/n.npy --colour-from 3 --out T/e.npy", "needs --colour", 2},
      {"edit --model M --noise T/n.npy --strength 1 --out T/e.npy", "--boundary", 2},
      {"edit --model M --boundary T/b.json --out T/e.npy", "--strength", 2},
      {"edit --model M --boundary T/b.json --strength 1 --out T/e.npy", "--image or --seed", 2},
      {"edit --model M --boundary T/b.json --strength nan --seed 1 --out T/e.npy", "--strength", 2},
      {"edit --model M --boundary T/b.json --strength 1 --seed 1 --eta 2 --out T/e.npy", "--eta",
       2},
      {"edit --model M --noise T/n.npy --space h --out T/e.npy", "--space", 2},
      {"edit --model M --boundary T/b.json --strength 1 --seed 1 --skip 2 --out T/e.npy", "--noise",
       2},
      {"boundary fit --model M --labels T/l.txt", "required", 2},
      {"boundary fit --model M --labels T/l.txt --out T/b.json --step x", "--step", 2},
      {"boundary fit --model M --labels T/l.txt --out T/b.json --C -1", "--C", 2},
      {"boundary fit --model M --labels T/l.txt --out T/b.json --test-fraction 1", "--test", 2},
      {"boundary fit --model M --labels T/none.txt --out T/b.json --class 0", "No such file", 1},
      {"boundary frob", "boundary fit", 2},
  };
  /* x.npy: one cond4 image */
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --seed 1 --steps 5 --out %s/x.npy "
                                "--quiet",
                                gmm[0], tmp),
                   0);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char line[2048] = "";
    for (const char *c = cases[i].args; *c; c++) {
      size_t n = strlen(line);
      if (*c == 'M' && (c[1] == ' ' || !c[1]))
        snprintf(line + n, sizeof line - n, "%s", gmm[0]);
      else if (*c == 'U' && (c[1] == ' ' || !c[1]))
        snprintf(line + n, sizeof line - n, "%s", gmm[1]);
      else if (*c == 'T' && c[1] == '/')
        snprintf(line + n, sizeof line - n, "%s", tmp);
      else
        snprintf(line + n, sizeof line - n, "%c", *c);
    }
    const int rc = test_run_cli(out, sizeof out, "%s", line);
    ck_assert_msg(rc == cases[i].status, "%s: exit %d (want %d): %s", line, rc, cases[i].status,
                  out);
    ck_assert_msg(strstr(out, cases[i].want) != NULL, "%s: no '%s' in: %s", line, cases[i].want,
                  out);
  }
  const char *helps[] = {"invert --help", "edit --help", "boundary fit --help"};
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(test_run_cli(out, sizeof out, "%s", helps[i]), 0);
    ck_assert_ptr_nonnull(strstr(out, "usage:"));
  }
}
END_TEST

/* ---- PNG fuzzing ---- */

static uint32_t crc32_png(const uint8_t *p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++)
      c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
  }
  return c ^ 0xffffffffu;
}

static size_t read_all(const char *path, uint8_t *buf, size_t cap) {
  FILE *f = fopen(path, "rb");
  ck_assert_ptr_nonnull(f);
  size_t n = fread(buf, 1, cap, f);
  fclose(f);
  return n;
}

static void write_all(const char *path, const uint8_t *buf, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  fwrite(buf, 1, n, f);
  fclose(f);
}

/* Every command that reads a PNG, on a damaged file: exit 1 or 2 with a message, no signal
 * (`may_pass`: damage libpng tolerates, such as in an ancillary chunk, may also succeed). */
static void expect_clean_failure(const char *tmp, const char *png, int may_pass, int *failures) {
  char out[8192];
  const char *cmds[] = {
      "sample --model %s --class 0 --steps 4 --seed 1 --init-image %s --out %s/o.npy",
      "sample --model %s --class 0 --steps 4 --seed 1 --init-image %s/x.npy --mask %s --out "
      "%s/o.npy",
      "invert --model %s --method ddpm --class 0 --steps 4 --image %s --out %s/o.npy",
  };
  for (int c = 0; c < 3; c++) {
    const int rc = c == 1 ? test_run_cli(out, sizeof out, cmds[c], gmm[0], tmp, png, tmp)
                          : test_run_cli(out, sizeof out, cmds[c], gmm[0], png, tmp);
    if (rc != 1 && rc != 2 && !(may_pass && rc == 0)) {
      fprintf(stderr, "%s: exit %d: %s\n", png, rc, out);
      (*failures)++;
    }
  }
}

START_TEST(corrupt_pngs_are_errors) {
  char out[8192], tmp[64], path[128], bad[128];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --seed 1 --steps 5 -o %s/ok.png "
                                "--out %s/x.npy --quiet",
                                gmm[0], tmp, tmp),
                   0);
  snprintf(path, sizeof path, "%s/ok.png", tmp);
  snprintf(bad, sizeof bad, "%s/bad.png", tmp);
  static uint8_t png[1 << 16], mod[1 << 16];
  const size_t n = read_all(path, png, sizeof png);
  ck_assert(n > 60 && n < sizeof png);
  int failures = 0, cases = 0;
  /* truncated at many lengths, including inside the header and IDAT */
  for (size_t len = 0; len < n; len += len < 64 ? 7 : 97) {
    write_all(bad, png, len);
    expect_clean_failure(tmp, bad, 0, &failures);
    cases++;
  }
  /* bytes flipped through the file (chunk data, lengths, CRCs) */
  for (size_t pos = 8; pos < n; pos += n / 12) {
    memcpy(mod, png, n);
    mod[pos] ^= 0x5a;
    write_all(bad, mod, n);
    expect_clean_failure(tmp, bad, 1, &failures);
    cases++;
  }
  /* a valid header claiming a huge image (CRC fixed), and a wrong size */
  memcpy(mod, png, n);
  const uint32_t dims[2][2] = {{100000, 100000}, {16, 16}};
  for (int k = 0; k < 2; k++) {
    for (int b = 0; b < 4; b++) {
      mod[16 + b] = (uint8_t)(dims[k][0] >> (24 - 8 * b));
      mod[20 + b] = (uint8_t)(dims[k][1] >> (24 - 8 * b));
    }
    const uint32_t crc = crc32_png(mod + 12, 17);
    for (int b = 0; b < 4; b++)
      mod[29 + b] = (uint8_t)(crc >> (24 - 8 * b));
    write_all(bad, mod, n);
    expect_clean_failure(tmp, bad, 0, &failures);
    cases++;
  }
  /* not a PNG at all, and a folder */
  write_all(bad, (const uint8_t *)"GIF89a not a png", 16);
  expect_clean_failure(tmp, bad, 0, &failures);
  expect_clean_failure(tmp, tmp, 0, &failures);
  cases += 2;
  fprintf(stderr, "corrupt PNG inputs: %d files x 3 commands, %d not clean\n", cases, failures);
  ck_assert_int_eq(failures, 0);
  /* the oversized one says so */
  memcpy(mod, png, n);
  for (int b = 0; b < 4; b++)
    mod[16 + b] = mod[20 + b] = (uint8_t)(100000u >> (24 - 8 * b));
  const uint32_t crc = crc32_png(mod + 12, 17);
  for (int b = 0; b < 4; b++)
    mod[29 + b] = (uint8_t)(crc >> (24 - 8 * b));
  write_all(bad, mod, n);
  ck_assert_int_eq(test_run_cli(out, sizeof out,
                                "sample --model %s --class 0 --seed 1 --init-image %s --out "
                                "%s/o.npy",
                                gmm[0], bad, tmp),
                   1);
  ck_assert_ptr_nonnull(strstr(out, "larger than"));
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("edit_cli");
  TCase *tc = tcase_create("edit_cli");
  tcase_add_unchecked_fixture(tc, setup, NULL);
  tcase_set_timeout(tc, 900);
  tcase_add_test(tc, guided_img2img_and_inpainting);
  tcase_add_test(tc, invert_and_edit_noise);
  tcase_add_test(tc, boundary_fit_and_edit);
  tcase_add_test(tc, boundary_h_space);
  tcase_add_test(tc, flags_are_validated);
  tcase_add_test(tc, corrupt_pngs_are_errors);
  suite_add_tcase(s, tc);
  return s;
}
