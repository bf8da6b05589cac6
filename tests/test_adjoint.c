/* engine/solver/adjoint: the discrete adjoint of DDIM and DPM-Solver++(2M) against PyTorch
 * autograd through the same scheduler loops (tools/gen_adjoint_fixtures.py, float64): the
 * sample, the gradients of sum(G * sample) with respect to the noise, the class-embedding rows
 * and every weight, each below 1e-4 relative L2, with guidance and the x0 clip; finite
 * differences of the engine's own sampler along random directions; the refusals; and
 * `denoised adjoint` end to end. */
#include <math.h>

#include "adjoint.h"
#include "npy.h"
#include "rng.h"
#include "safetensors.h"
#include "testutil.h"

#define FX "tests/fixtures/adjoint"

typedef struct fcase {
  model *m;
  sampler *s;
  int batch;
  int64_t labels[8];
  guidance g;
  int guided, conditional;
  npy_array noise, gout;
  size_t nd;
} fcase;

static npy_array fx_npy(const char *name, const char *file) {
  char rel[256], path[1024];
  snprintf(rel, sizeof rel, FX "/%s/%s", name, file);
  npy_array a;
  err e = {0};
  ck_assert_msg(npy_read_f32(test_src_path(path, sizeof path, rel), &a, &e) == ERR_OK, "%s", e.msg);
  return a;
}

static void case_open(const char *name, fcase *c) {
  char path[1024], rel[256];
  err e = {0};
  memset(c, 0, sizeof *c);
  snprintf(rel, sizeof rel, FX "/%s/case.json", name);
  json_error_t je;
  json_t *cj = json_load_file(test_src_path(path, sizeof path, rel), 0, &je);
  ck_assert_ptr_nonnull(cj);
  snprintf(rel, sizeof rel, FX "/%s", json_string_value(json_object_get(cj, "model")));
  ck_assert_msg(model_load(test_src_path(path, sizeof path, rel), &c->m, &e) == ERR_OK, "%s",
                e.msg);
  snprintf(rel, sizeof rel, FX "/%s/scheduler_config.json", name);
  json_t *sc = json_load_file(test_src_path(path, sizeof path, rel), 0, &je);
  ck_assert_ptr_nonnull(sc);
  json_t *spec = json_pack("{s:O, s:O, s:O}", "name", json_object_get(cj, "solver"), "steps",
                           json_object_get(cj, "steps"), "config", sc);
  ck_assert_msg(sampler_new_from_json(spec, NULL, &c->s, &e) == ERR_OK, "%s", e.msg);
  const json_t *labels = json_object_get(cj, "labels"), *scale = json_object_get(cj, "scale");
  c->conditional = json_is_array(labels);
  c->batch = c->conditional ? (int)json_array_size(labels) : 2;
  for (int b = 0; b < c->batch; b++)
    c->labels[b] = json_integer_value(json_array_get(labels, (size_t)b));
  c->guided = json_is_number(scale);
  c->g = guidance_for(c->m, c->guided ? json_number_value(scale) : 1.0);
  c->noise = fx_npy(name, "noise.npy");
  c->gout = fx_npy(name, "grad_output.npy");
  c->nd = (size_t)c->noise.count;
  json_decref(spec), json_decref(sc), json_decref(cj);
}

static void case_close(fcase *c) {
  npy_array_free(&c->noise);
  npy_array_free(&c->gout);
  sampler_free(c->s);
  model_free(c->m);
}

static adjoint_opts case_opts(fcase *c) {
  adjoint_opts o = {.batch = c->batch,
                    .noise = c->noise.data,
                    .labels = c->conditional ? c->labels : NULL,
                    .guidance = c->guided ? &c->g : NULL,
                    .grad_output = c->gout.data,
                    .threads = 2};
  return o;
}

/* Every parameter gradient against the fixture: the worst tensor and all of them together. */
static void check_params(const char *name, const model *m, const model_grads *gp, double *worst_out,
                         double *all_out) {
  char rel[256], path[1024];
  snprintf(rel, sizeof rel, FX "/%s/grad_params.safetensors", name);
  st_file *f;
  err e = {0};
  ck_assert_msg(st_open(test_src_path(path, sizeof path, rel), &f, &e) == ERR_OK, "%s", e.msg);
  double num = 0, den = 0, worst = 0;
  for (int i = 0; i < model_param_count(m); i++) {
    const model_param *p = model_param_at(m, i);
    float *ref = malloc(p->count * sizeof(float));
    ck_assert_msg(st_read_f32(f, p->name, 0, NULL, ref, &e) == ERR_OK, "%s", e.msg);
    const float *got = model_grads_at(gp, i);
    double tn = 0, td = 0;
    for (size_t k = 0; k < p->count; k++) {
      tn += ((double)got[k] - ref[k]) * ((double)got[k] - ref[k]);
      td += (double)ref[k] * ref[k];
    }
    num += tn, den += td;
    /* a floor for tensors whose gradient is tiny against the rest (relative to the total) */
    const double r = sqrt(tn / fmax(td, 1e-6 * den + 1e-30));
    worst = r > worst ? r : worst;
    free(ref);
  }
  st_close(f);
  *worst_out = worst;
  *all_out = sqrt(num / den);
}

static void check_fixture(const char *name) {
  fcase c;
  case_open(name, &c);
  err e = {0};
  adjoint_opts o = case_opts(&c);
  const model_info *mi = model_get_info(c.m);
  float *sample = malloc(c.nd * 4), *gn = malloc(c.nd * 4);
  float *gc = malloc((size_t)c.batch * mi->class_embed_dim * 4);
  model_grads *gp;
  ck_assert_int_eq(model_grads_new(c.m, &gp, &e), ERR_OK);
  o.sample = sample, o.grad_noise = gn, o.grad_class = c.conditional ? gc : NULL;
  o.grad_params = gp;
  ck_assert_msg(adjoint_run(c.s, c.m, &o, &e) == ERR_OK, "%s: %s", name, e.msg);
  npy_array rs = fx_npy(name, "sample.npy"), rn = fx_npy(name, "grad_noise.npy"), rc = {0};
  double r[6] = {0};
  r[0] = test_rel_l2(sample, rs.data, c.nd);
  r[1] = test_rel_l2(gn, rn.data, c.nd);
  if (c.conditional) {
    rc = fx_npy(name, "grad_class.npy");
    ck_assert_int_eq((int)rc.count, c.batch * mi->class_embed_dim);
    r[2] = test_rel_l2(gc, rc.data, (size_t)rc.count);
  }
  check_params(name, c.m, gp, &r[3], &r[4]);
  r[5] = o.replay_err;
  printf("%-22s sample %.1e noise %.1e class %.1e params %.1e (worst tensor %.1e) replay %.1e\n",
         name, r[0], r[1], r[2], r[4], r[3], r[5]);
  static const char *what[6] = {"sample",          "grad_noise", "grad_class",
                                "worst parameter", "parameters", "replay"};
  for (int i = 0; i < 6; i++)
    ck_assert_msg(r[i] < (i == 3 ? 1e-3 : 1e-4), "%s: %s rel L2 %.3g", name, what[i], r[i]);
  npy_array_free(&rs), npy_array_free(&rn);
  if (c.conditional)
    npy_array_free(&rc);
  free(sample), free(gn), free(gc);
  model_grads_free(gp);
  case_close(&c);
}

START_TEST(ddim_guided_clip) {
  check_fixture("ddim_guided_clip");
}
END_TEST

START_TEST(dpmpp2m_guided_clip) {
  check_fixture("dpmpp2m_guided_clip");
}
END_TEST

START_TEST(dpmpp2m_plain) {
  check_fixture("dpmpp2m_plain");
}
END_TEST

START_TEST(ddim_v_guided) {
  check_fixture("ddim_v_guided");
}
END_TEST

START_TEST(dpmpp2m_uncond) {
  check_fixture("dpmpp2m_uncond");
}
END_TEST

/* L = sum(G * sample) by the engine's own sampler, accumulated in double. */
static double loss_at(fcase *c, const float *noise) {
  float *x = malloc(c->nd * 4);
  sampler_run_opts ro = {.batch = c->batch,
                         .init_noise = noise,
                         .labels = c->conditional ? c->labels : NULL,
                         .guidance = c->guided ? &c->g : NULL,
                         .threads = 2};
  err e = {0};
  ck_assert_msg(sampler_run(c->s, c->m, &ro, x, NULL, &e) == ERR_OK, "%s", e.msg);
  double l = 0;
  for (size_t k = 0; k < c->nd; k++)
    l += (double)c->gout.data[k] * x[k];
  free(x);
  return l;
}

/* Central differences of the engine's sampler along random directions of the noise, the
 * class-embedding row of image 0 and all weights at once, against the adjoint's gradients. */
static void check_fd(const char *name) {
  fcase c;
  case_open(name, &c);
  err e = {0};
  const model_info *mi = model_get_info(c.m);
  const int dim = mi->class_embed_dim;
  adjoint_opts o = case_opts(&c);
  float *gn = malloc(c.nd * 4), *gc = malloc((size_t)c.batch * dim * 4);
  model_grads *gp;
  ck_assert_int_eq(model_grads_new(c.m, &gp, &e), ERR_OK);
  o.grad_noise = gn, o.grad_class = gc, o.grad_params = gp;
  ck_assert_msg(adjoint_run(c.s, c.m, &o, &e) == ERR_OK, "%s", e.msg);
  const double h = 1e-3;
  /* noise */
  float *v = malloc(c.nd * 4), *xp = malloc(c.nd * 4);
  rng_normal(11, 0, 0, v, c.nd);
  double an = 0, fd;
  for (size_t k = 0; k < c.nd; k++)
    an += (double)gn[k] * v[k];
  for (size_t k = 0; k < c.nd; k++)
    xp[k] = c.noise.data[k] + (float)h * v[k];
  fd = loss_at(&c, xp);
  for (size_t k = 0; k < c.nd; k++)
    xp[k] = c.noise.data[k] - (float)h * v[k];
  fd = (fd - loss_at(&c, xp)) / (2 * h);
  const double r_noise = fabs(fd - an) / fabs(an);
  /* all weights along one direction (the class row of image 0 among them) */
  double ap = 0, lp, lm;
  for (int sign = 1; sign >= -1; sign -= 2) {
    for (int i = 0; i < model_param_count(c.m); i++) {
      const model_param *p = model_param_at(c.m, i);
      float *dir = malloc(p->count * 4);
      rng_normal(12, (uint64_t)i, 0, dir, p->count);
      for (size_t k = 0; k < p->count; k++) {
        const float step = (float)h * dir[k] * (sign == 1 ? 1.0f : -2.0f);
        p->data[k] += step;
        if (sign == 1)
          ap += (double)model_grads_at(gp, i)[k] * dir[k];
      }
      free(dir);
    }
    ck_assert_int_eq(model_repack(c.m, &e), ERR_OK);
    if (sign == 1)
      lp = loss_at(&c, c.noise.data);
    else
      lm = loss_at(&c, c.noise.data);
  }
  const double r_params = fabs((lp - lm) / (2 * h) - ap) / fabs(ap);
  printf("%-22s finite differences: noise %.2e (d/dv %.4g), weights %.2e (d/dv %.4g)\n", name,
         r_noise, an, r_params, ap);
  ck_assert_msg(r_noise < 2e-3, "%s: noise directional derivative off by %.3g", name, r_noise);
  ck_assert_msg(r_params < 2e-3, "%s: weights directional derivative off by %.3g", name, r_params);
  free(v), free(xp), free(gn), free(gc);
  model_grads_free(gp);
  case_close(&c);
}

START_TEST(finite_differences) {
  check_fd("dpmpp2m_plain");
  check_fd("ddim_v_guided");
}
END_TEST

/* The continuous adjoint (AdjointDPM's ODE method) against the discrete adjoint of DPM-Solver++
 * (2M) at the same N on the unclipped v-prediction fixture: every gradient's relative L2
 * difference falls as N grows, at first order (measured for the noise: 0.63 at 40 steps, 0.36
 * at 80, 0.19 at 160, 0.097 at 320), inside a tolerance of 36 / N. */
static void grads_at(fcase *c, int steps, adjoint_method method, float *gn, float *gc,
                     model_grads *gp, double *recon) {
  char spec_s[128];
  snprintf(spec_s, sizeof spec_s, "{\"name\": \"dpm++2m\", \"steps\": %d}", steps);
  json_t *spec = json_loads(spec_s, 0, NULL);
  sampler *s;
  err e = {0};
  json_t *cfg = sampler_config_json(c->s);
  json_object_set_new(spec, "config", cfg);
  ck_assert_msg(sampler_new_from_json(spec, NULL, &s, &e) == ERR_OK, "%s", e.msg);
  adjoint_opts o = case_opts(c);
  o.method = method, o.grad_noise = gn, o.grad_class = gc, o.grad_params = gp;
  model_grads_zero(gp);
  ck_assert_msg(adjoint_run(s, c->m, &o, &e) == ERR_OK, "%s", e.msg);
  *recon = o.replay_err;
  sampler_free(s);
  json_decref(spec);
}

static double grads_rel_l2(const model *m, const model_grads *a, const model_grads *b) {
  double num = 0, den = 0;
  for (int i = 0; i < model_param_count(m); i++)
    for (size_t k = 0; k < model_param_at(m, i)->count; k++) {
      const double x = model_grads_at(a, i)[k], y = model_grads_at(b, i)[k];
      num += (x - y) * (x - y), den += y * y;
    }
  return sqrt(num / den);
}

START_TEST(continuous_converges) {
  fcase c;
  case_open("dpmpp2m_plain", &c);
  err e = {0};
  const size_t nc = (size_t)c.batch * model_get_info(c.m)->class_embed_dim;
  float *gn[2] = {malloc(c.nd * 4), malloc(c.nd * 4)}, *gc[2] = {malloc(nc * 4), malloc(nc * 4)};
  model_grads *gp[2];
  ck_assert_int_eq(model_grads_new(c.m, &gp[0], &e), ERR_OK);
  ck_assert_int_eq(model_grads_new(c.m, &gp[1], &e), ERR_OK);
  double prev = INFINITY;
  for (int steps = 40; steps <= 160; steps *= 2) {
    double recon, unused;
    grads_at(&c, steps, ADJOINT_CONTINUOUS, gn[0], gc[0], gp[0], &recon);
    grads_at(&c, steps, ADJOINT_DISCRETE, gn[1], gc[1], gp[1], &unused);
    const double rn = test_rel_l2(gn[0], gn[1], c.nd), rc = test_rel_l2(gc[0], gc[1], nc);
    const double rp = grads_rel_l2(c.m, gp[0], gp[1]), tol = 36.0 / steps;
    printf("continuous vs discrete, %3d steps: noise %.3f class %.3f params %.3f "
           "(reconstruction %.1e)\n",
           steps, rn, rc, rp, recon);
    ck_assert_msg(rn < tol && rc < tol && rp < tol, "%d steps: %.3g %.3g %.3g >= %.3g", steps, rn,
                  rc, rp, tol);
    ck_assert_msg(rn < prev, "%d steps: noise gradient %.3g not closer than %.3g", steps, rn, prev);
    prev = rn;
  }
  for (int i = 0; i < 2; i++)
    free(gn[i]), free(gc[i]), model_grads_free(gp[i]);
  case_close(&c);
}
END_TEST

START_TEST(refusals) {
  fcase c;
  case_open("dpmpp2m_plain", &c);
  err e = {0};
  adjoint_opts o = case_opts(&c);
  float *gn = malloc(c.nd * 4);
  o.grad_noise = gn;
  struct {
    const char *spec, *needle;
  } bad[] = {
      {"{\"name\": \"euler\", \"steps\": 4}", "not 'euler'"},
      {"{\"name\": \"dpm++2m-sde\", \"steps\": 4}", "deterministic"},
      {"{\"name\": \"ddim\", \"steps\": 4, \"options\": {\"eta\": 0.5}}", "deterministic"},
      {"{\"name\": \"ddim\", \"steps\": 4, \"options\": {\"thresholding\": true, "
       "\"sample_max_value\": 2.0}}",
       "sample_max_value"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    json_t *spec = json_loads(bad[i].spec, 0, NULL);
    sampler *s;
    ck_assert_msg(sampler_new_from_json(spec, NULL, &s, &e) == ERR_OK, "%s", e.msg);
    ck_assert_int_eq(adjoint_run(s, c.m, &o, &e), ERR_UNSUPPORTED);
    ck_assert_msg(strstr(e.msg, bad[i].needle), "%s", e.msg);
    sampler_free(s);
    json_decref(spec);
  }
  c.gout.data[3] = NAN;
  ck_assert_int_eq(adjoint_run(c.s, c.m, &o, &e), ERR_NUMERIC);
  /* the analytic model has no weights */
  model *gmm;
  char path[1024];
  ck_assert_int_eq(model_load(test_src_path(path, sizeof path, "models/shapes-gmm"), &gmm, &e),
                   ERR_OK);
  ck_assert_int_eq(adjoint_run(c.s, gmm, &o, &e), ERR_UNSUPPORTED);
  ck_assert_msg(strstr(e.msg, "weights"), "%s", e.msg);
  model_free(gmm);
  free(gn);
  case_close(&c);
}
END_TEST

/* The command writes what the engine computes (checked against the fixture) and refuses bad
 * inputs with messages that name the flag. */
START_TEST(cli_adjoint) {
  char tmp[64], m[1024], d[1024], out[8192], cmd[4096];
  ck_assert_ptr_nonnull(test_tmpdir(tmp, sizeof tmp));
  test_src_path(m, sizeof m, FX "/model");
  test_src_path(d, sizeof d, FX "/ddim_guided_clip");
  const char *base = "adjoint --model %s --noise %s/noise.npy --scheduler ddim --steps 6 "
                     "--scheduler-config %s/scheduler_config.json --class 1,3 "
                     "--guidance-scale 2 --grad-output %s/grad_output.npy --quiet";
  snprintf(cmd, sizeof cmd, base, m, d, d, d);
  int rc = test_run_cli(out, sizeof out,
                        "%s --grad-noise %s/gn.npy --grad-class-embedding %s/gc.npy "
                        "--grad-params %s/gp.safetensors --sample %s/s.npy",
                        cmd, tmp, tmp, tmp, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  char got_dir[128];
  snprintf(got_dir, sizeof got_dir, "%s", tmp);
  npy_array gn, rn = fx_npy("ddim_guided_clip", "grad_noise.npy"), gc,
                rc2 = fx_npy("ddim_guided_clip", "grad_class.npy");
  char path[256];
  err e = {0};
  snprintf(path, sizeof path, "%s/gn.npy", got_dir);
  ck_assert_int_eq(npy_read_f32(path, &gn, &e), ERR_OK);
  snprintf(path, sizeof path, "%s/gc.npy", got_dir);
  ck_assert_int_eq(npy_read_f32(path, &gc, &e), ERR_OK);
  ck_assert_double_lt(test_rel_l2(gn.data, rn.data, (size_t)rn.count), 1e-4);
  ck_assert_double_lt(test_rel_l2(gc.data, rc2.data, (size_t)rc2.count), 1e-4);
  npy_array_free(&gn), npy_array_free(&rn), npy_array_free(&gc), npy_array_free(&rc2);
  struct {
    const char *extra, *needle;
    int status;
  } bad[] = {
      {"", "nothing to compute", 2},
      {"--grad-noise /dev/null --method adjoint", "discrete or continuous", 2},
      {"--grad-noise /dev/null --scheduler euler", "not 'euler'", 1},
      {"--grad-noise /dev/null --class 9", "--class", 1},
      {"--grad-noise /dev/null --steps 0", "--steps", 2},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    rc = test_run_cli(out, sizeof out, "%s %s", cmd, bad[i].extra);
    ck_assert_msg(rc == bad[i].status && strstr(out, bad[i].needle), "case %zu: rc %d: %s", i, rc,
                  out);
  }
  /* --seed S draws the noise `sample --seed S` does: --sample is that command's image */
  rc = test_run_cli(out, sizeof out,
                    "sample --model %s --class 2 --scheduler dpm++2m --steps 3 --seed 9 "
                    "--scheduler-config %s/scheduler_config.json --out %s/s1.npy --quiet",
                    m, d, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "adjoint --model %s --class 2 --scheduler dpm++2m --steps 3 --seed 9 "
                    "--scheduler-config %s/scheduler_config.json --grad-output %s/s1.npy "
                    "--grad-noise %s/gn2.npy --sample %s/s2.npy --quiet",
                    m, d, tmp, tmp, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  char p1[128], p2[128];
  snprintf(p1, sizeof p1, "%s/s1.npy", tmp);
  snprintf(p2, sizeof p2, "%s/s2.npy", tmp);
  ck_assert_msg(test_files_equal(p1, p2), "adjoint --seed's sample differs from sample --seed's");
  rc = test_run_cli(out, sizeof out,
                    "adjoint --model %s --class 2 --scheduler ddim --steps 3 --seed 9 --noise "
                    "%s/noise.npy --grad-output %s/s1.npy --grad-noise %s/x.npy",
                    m, d, tmp, tmp);
  ck_assert_msg(rc == 2 && strstr(out, "one"), "%s", out);
  /* an unconditional model: no --class, and none of the class flags */
  char u[1024], ud[1024];
  test_src_path(u, sizeof u, FX "/model_uncond");
  test_src_path(ud, sizeof ud, FX "/dpmpp2m_uncond");
  rc = test_run_cli(out, sizeof out,
                    "adjoint --model %s --noise %s/noise.npy --scheduler dpm++2m --steps 4 "
                    "--scheduler-config %s/scheduler_config.json --grad-output "
                    "%s/grad_output.npy --grad-noise %s/gu.npy --quiet",
                    u, ud, ud, ud, tmp);
  ck_assert_msg(rc == 0, "%s", out);
  rc = test_run_cli(out, sizeof out,
                    "adjoint --model %s --noise %s/noise.npy --scheduler dpm++2m --steps 4 "
                    "--class 1 --grad-output %s/grad_output.npy --grad-noise %s/gu.npy",
                    u, ud, ud, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "not class-conditional"), "%s", out);
  /* a noise of the wrong size, a gradient of another batch */
  rc = test_run_cli(out, sizeof out,
                    "adjoint --model %s --noise %s/grad_class.npy --scheduler ddim --steps 2 "
                    "--class 1 --grad-output %s/grad_output.npy --grad-noise %s/x.npy",
                    m, d, d, tmp);
  ck_assert_msg(rc == 1 && strstr(out, "--noise"), "%s", out);
  snprintf(cmd, sizeof cmd, "rm -r %s", tmp);
  ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* `denoised audit` runs end to end on the default model (a tiny run: the figures are in the
 * README) and refuses bad inputs naming them. */
START_TEST(cli_audit) {
  char out[8192], u[1024];
  int rc = test_run_cli(out, sizeof out,
                        "audit --class A --batch 2 --iters 1 --eps 0.1 --random 1 --steps 3 "
                        "--quiet");
  ck_assert_msg(rc == 0 && strstr(out, "clean: ") && strstr(out, "eps 0.1: adversarial "),
                "rc %d: %s", rc, out);
  test_src_path(u, sizeof u, FX "/model_uncond");
  struct {
    const char *args, *needle;
    int status;
  } bad[] = {
      {"--class A --eps 3", "--eps", 2},
      {"--class A --eps 0.1,0.1,0.1,0.1,0.1", "at most 4", 2},
      {"--eps 0.1", "--class is required", 2},
      {"--class A --head nosuch --steps 2", "no such head", 1},
      {"--class A --target nosuch --steps 2", "--target 'nosuch'", 1},
      {"--class A --scheduler euler --steps 2", "not 'euler'", 1},
      {"--class 1 --model %s", "class-conditional", 1},
      {"--class A --threads 0", "--threads", 2},
      {"--class A --classifier /nonexistent --steps 2", "--classifier", 1},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char args[2048];
    snprintf(args, sizeof args, bad[i].args, u);
    rc = test_run_cli(out, sizeof out, "audit %s --quiet", args);
    ck_assert_msg(rc == bad[i].status && strstr(out, bad[i].needle), "case %zu: rc %d: %s", i, rc,
                  out);
  }
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("adjoint");
  TCase *tc = tcase_create("adjoint");
  tcase_add_test(tc, ddim_guided_clip);
  tcase_add_test(tc, dpmpp2m_guided_clip);
  tcase_add_test(tc, dpmpp2m_plain);
  tcase_add_test(tc, ddim_v_guided);
  tcase_add_test(tc, dpmpp2m_uncond);
  tcase_add_test(tc, finite_differences);
  tcase_add_test(tc, continuous_converges);
  tcase_add_test(tc, refusals);
  tcase_add_test(tc, cli_adjoint);
  tcase_add_test(tc, cli_audit);
  suite_add_tcase(s, tc);
  return s;
}
