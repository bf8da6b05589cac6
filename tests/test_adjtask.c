/* engine/adjtask and named class embeddings: rows appended to a model (by model_add_class and
 * from MODEL/embeddings/ at load) behave as the class they copy and are refused where they must
 * be; classifier verdicts parse as documented; a concept step moves the row downhill on the
 * margin loss; `denoised concept` and `denoised stylize` end to end (tiny runs) and their
 * refusals. */
#include <sys/stat.h>
#include <unistd.h>

#include "adjtask.h"
#include "safetensors.h"
#include "testutil.h"

#define MODEL_DIR "models/glyphs32"

static model *load_default(void) {
  char path[1024];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, MODEL_DIR), &m, &e) == ERR_OK, "%s",
                e.msg);
  return m;
}

static classifier *load_clf(void) {
  char path[1024];
  classifier *c = NULL;
  err e = {0};
  ck_assert_msg(
      classifier_load(test_src_path(path, sizeof path, MODEL_DIR "/classifier"), &c, &e) == ERR_OK,
      "%s", e.msg);
  return c;
}

static sampler *make_sampler(const char *name, int steps) {
  char spec[256];
  snprintf(spec, sizeof spec, "{\"name\": \"%s\", \"steps\": %d}", name, steps);
  json_t *j = json_loads(spec, 0, NULL);
  sampler *s = NULL;
  err e = {0};
  char path[1024];
  json_t *cfg =
      json_load_file(test_src_path(path, sizeof path, MODEL_DIR "/scheduler_config.json"), 0, NULL);
  ck_assert_msg(sampler_new_from_json(j, cfg, &s, &e) == ERR_OK, "%s", e.msg);
  json_decref(j);
  json_decref(cfg);
  return s;
}

/* A folder that is the default model (its files linked) plus embeddings/ holding `files`. */
static void model_copy(char *dir, size_t n) {
  char src[1024], dst[1200];
  ck_assert_ptr_nonnull(test_tmpdir(dir, n));
  const char *files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                         "scheduler_config.json", "classifier"};
  for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
    snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
    char rel[256];
    snprintf(rel, sizeof rel, MODEL_DIR "/%s", files[i]);
    char *real = realpath(test_src_path(src, sizeof src, rel), NULL);
    ck_assert_int_eq(symlink(real, dst), 0);
    free(real);
  }
  snprintf(dst, sizeof dst, "%s/embeddings", dir);
  ck_assert_int_eq(mkdir(dst, 0777), 0);
}

static void write_row(const char *dir, const char *file, const float *row, int64_t dim) {
  char path[1400];
  snprintf(path, sizeof path, "%s/embeddings/%s", dir, file);
  const st_out_tensor t = {.name = MODEL_EMBEDDING_TENSOR, .ndim = 1, .shape = &dim, .data = row};
  err e = {0};
  ck_assert_msg(st_write_f32(path, &t, 1, NULL, 0, &e) == ERR_OK, "%s", e.msg);
}

/* K's row saved as an embedding: the named class samples exactly as K, is listed by name, and
 * takes no weight gradient; broken embedding files fail the load naming the file. */
START_TEST(named_embeddings) {
  model *m = load_default();
  const model_info *mi0 = model_get_info(m);
  const int k0 = mi0->num_classes, dim = mi0->class_embed_dim;
  const int64_t K = model_class_from_name(m, "K");
  float row[256];
  memcpy(row, model_class_row(m, K), (size_t)dim * sizeof(float));
  char dir[64];
  model_copy(dir, sizeof dir);
  write_row(dir, "myK.safetensors", row, dim);
  model_free(m);

  err e = {0};
  ck_assert_msg(model_load(dir, &m, &e) == ERR_OK, "%s", e.msg);
  const model_info *mi = model_get_info(m);
  const int64_t lab = model_class_from_name(m, "myk");
  ck_assert_int_eq(lab, k0);
  ck_assert_int_eq(mi->num_classes, k0 + 1);
  ck_assert_int_eq(mi->num_embeddings, 1);
  ck_assert_str_eq(mi->class_labels[k0 - 1], "36"); /* the null class, named by its index */
  ck_assert_int_eq(mi->null_class, 36);

  sampler *s = make_sampler("ddim", 3);
  const size_t nd = (size_t)mi->in_channels * mi->sample_size * mi->sample_size;
  float *a = malloc(nd * sizeof(float)), *b = malloc(nd * sizeof(float));
  const guidance g = guidance_for(m, 2.0);
  int64_t la = K, lb = lab;
  sampler_run_opts o = {.batch = 1, .seed = 5, .labels = &la, .guidance = &g, .threads = 1};
  ck_assert_msg(sampler_run(s, m, &o, a, NULL, &e) == ERR_OK, "%s", e.msg);
  o.labels = &lb;
  ck_assert_msg(sampler_run(s, m, &o, b, NULL, &e) == ERR_OK, "%s", e.msg);
  ck_assert_int_eq(memcmp(a, b, nd * sizeof(float)), 0);

  /* Weight gradients through the named row are refused; its row gradient is not. */
  model_grads *pg = NULL;
  ck_assert_int_eq(model_grads_new(m, &pg, &e), ERR_OK);
  const float t = 500;
  float gc[256];
  const model_call c = {.x = a,
                        .n = 1,
                        .h = mi->sample_size,
                        .w = mi->sample_size,
                        .t = &t,
                        .labels = &lb,
                        .threads = 1};
  model_grad_call gcall = {.grad_out = a, .params = pg};
  ck_assert_int_eq(model_backward(m, &c, &gcall, &e), ERR_UNSUPPORTED);
  ck_assert_msg(strstr(e.msg, "'myK'"), "%s", e.msg);
  gcall = (model_grad_call){.grad_out = a, .grad_class = gc};
  ck_assert_msg(model_backward(m, &c, &gcall, &e) == ERR_OK, "%s", e.msg);
  model_grads_free(pg);

  /* The name is taken now; a bad row or name is refused. */
  ck_assert_int_eq(model_add_class(m, "myK", row, &lb, &e), ERR_INVALID);
  ck_assert_int_eq(model_add_class(m, "A", row, &lb, &e), ERR_INVALID);
  ck_assert_int_eq(model_add_class(m, "12", row, &lb, &e), ERR_INVALID);
  row[3] = NAN;
  ck_assert_int_eq(model_add_class(m, "nan", row, &lb, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "not finite"), "%s", e.msg);
  row[3] = 0;
  model_free(m);
  sampler_free(s);
  free(a), free(b);

  /* A clash with a class name, a wrong length: the load fails naming the file. */
  write_row(dir, "K.safetensors", row, dim);
  ck_assert_int_eq(model_load(dir, &m, &e), ERR_INVALID);
  ck_assert_msg(strstr(e.msg, "K.safetensors") && strstr(e.msg, "already has a class"), "%s",
                e.msg);
  char p[1400];
  snprintf(p, sizeof p, "%s/embeddings/K.safetensors", dir);
  unlink(p);
  write_row(dir, "short.safetensors", row, dim - 1);
  ck_assert_int_ne(model_load(dir, &m, &e), ERR_OK);
  ck_assert_msg(strstr(e.msg, "short.safetensors"), "%s", e.msg);
}
END_TEST

/* A model without class embeddings takes no named row. */
START_TEST(no_class_embeddings) {
  char path[1024];
  model *m = NULL;
  err e = {0};
  ck_assert_msg(model_load(test_src_path(path, sizeof path, "tests/fixtures/adjoint/model_uncond"),
                           &m, &e) == ERR_OK,
                "%s", e.msg);
  float row[64] = {0};
  int64_t l;
  ck_assert_int_eq(model_add_class(m, "x", row, &l, &e), ERR_UNSUPPORTED);
  ck_assert_msg(strstr(e.msg, "no class embeddings"), "%s", e.msg);
  ck_assert_ptr_null(model_class_row(m, 0));
  model_free(m);
}
END_TEST

START_TEST(targets) {
  classifier *c = load_clf();
  adjtask_target t[ADJTASK_MAX_TARGETS];
  int n;
  err e = {0};
  char s[256];
  ck_assert_msg(adjtask_parse_targets(c, "K,italic,fg=red", t, &n, &e) == ERR_OK, "%s", e.msg);
  ck_assert_int_eq(n, 3);
  adjtask_targets_str(c, t, n, s, sizeof s);
  ck_assert_str_eq(s, "char=K,italic=italic,fg=red");
  ck_assert_int_eq(t[0].head, classifier_head_index(c, "char"));
  ck_assert_int_eq(t[0].cls, classifier_class_index(c, t[0].head, "K"));
  struct {
    const char *spec, *needle;
  } bad[] = {{"red", "several heads"},    {"nope", "no head"},
             {"K,char=A", "named twice"}, {"size=big", "no head 'size'"},
             {"fg=pink", "not a class"},  {"K,,A", "empty"},
             {"", "give a class"}};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    ck_assert_int_eq(adjtask_parse_targets(c, bad[i].spec, t, &n, &e), ERR_INVALID);
    ck_assert_msg(strstr(e.msg, bad[i].needle), "'%s': %s", bad[i].spec, e.msg);
  }
  classifier_free(c);
}
END_TEST

static void last_loss(const concept_progress *p, void *user) {
  *(double *)user = p->loss;
}

/* The loss on one batch of noises at the row, read by a step of a negligible size. */
static double batch_loss(model *m, concept_opts o) {
  double loss = -1;
  o.lr = 1e-7, o.steps = 1, o.progress = last_loss, o.progress_user = &loss;
  err e = {0};
  ck_assert_msg(concept_optimize(m, &o, &e) == ERR_OK, "%s", e.msg);
  return loss;
}

/* One Adam step from the mean row lowers the margin loss on the batch it was taken on: the
 * gradient through the sampling run points downhill. */
START_TEST(concept_step_downhill) {
  model *m = load_default();
  classifier *c = load_clf();
  sampler *s = make_sampler("ddim", 4);
  const model_info *mi = model_get_info(m);
  float row[256];
  err e = {0};
  ck_assert_int_eq(concept_mean_row(m, row, &e), ERR_OK);
  int64_t lab;
  ck_assert_msg(model_add_class(m, "work", row, &lab, &e) == ERR_OK, "%s", e.msg);
  adjtask_target t[1];
  int nt;
  ck_assert_int_eq(adjtask_parse_targets(c, "K", t, &nt, &e), ERR_OK);
  const guidance g = guidance_for(m, 2.0);
  const concept_opts o = {.gen = {.s = s, .gd = &g, .threads = 2},
                          .clf = c,
                          .targets = t,
                          .n_targets = nt,
                          .label = lab,
                          .steps = 1,
                          .batch = 3,
                          .lr = 0.05,
                          .margin = 2,
                          .seed = 7};
  const double before = batch_loss(m, o);
  ck_assert_msg(concept_optimize(m, &o, &e) == ERR_OK, "%s", e.msg);
  const double after = batch_loss(m, o);
  ck_assert_msg(before > 0 && after < before, "loss %g -> %g", before, after);
  ck_assert_msg(memcmp(row, model_class_row(m, lab), (size_t)mi->class_embed_dim * 4) != 0,
                "the row did not move");
  /* Refusals: the null class cannot hold the row; a stochastic solver has no adjoint. */
  concept_opts bad = o;
  bad.label = mi->null_class;
  ck_assert_int_eq(concept_optimize(m, &bad, &e), ERR_INVALID);
  sampler *anc = make_sampler("euler-a", 3);
  bad = o;
  bad.gen.s = anc;
  ck_assert_int_eq(concept_optimize(m, &bad, &e), ERR_UNSUPPORTED);
  sampler_free(anc);
  sampler_free(s);
  classifier_free(c);
  model_free(m);
}
END_TEST

/* `denoised concept` end to end on a copy of the default model (a tiny run: README has the
 * figures), the embedding used by name, and its refusals. */
START_TEST(cli_concept) {
  char dir[64], out[8192], u[1024];
  model_copy(dir, sizeof dir);
  int rc = test_run_cli(out, sizeof out,
                        "concept --model %s --target K --name myK --steps 1 --batch 2 "
                        "--sampler-steps 2 --eval 2 --compare K --quiet",
                        dir);
  ck_assert_msg(rc == 0 && strstr(out, "embeddings/myK.safetensors") &&
                    strstr(out, "held-out: myK agreed on ") &&
                    strstr(out, "held-out: class K agreed on "),
                "rc %d: %s", rc, out);
  rc = test_run_cli(out, sizeof out,
                    "sample --model %s --class myK --batch 1 --seed 1 --steps 2 --out %s/x.npy "
                    "--quiet",
                    dir, dir);
  ck_assert_msg(rc == 0, "rc %d: %s", rc, out);
  test_src_path(u, sizeof u, "tests/fixtures/adjoint/model_uncond");
  struct {
    const char *args, *needle;
    int status;
  } bad[] = {
      {"--model %s --target K --name myK --steps 1", "exists (--force", 1},
      {"--model %s --target K --name A --steps 1", "has a class of that name", 1},
      {"--model %s --target nope --name zz --steps 1", "--target: target 'nope'", 1},
      {"--model %s --target K --name 12", "--name '12'", 2},
      {"--model %s --target K", "--name are required", 2},
      {"--model %s --target K --name zz --init nope --steps 1", "--init 'nope'", 1},
      {"--model %s --target K --name zz --scheduler euler-a --steps 1", "euler", 1},
      {"--model %s --target K --name zz --lr 0", "--lr", 2},
      {"--model %s --target K --name zz --guidance-scale -1", "--guidance-scale", 2},
      {"--model %s --target K --name zz --seed -1", "--seed", 2},
      {"--model %s --target K --name zz --classifier /nonexistent", "--classifier", 1},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char args[2048];
    snprintf(args, sizeof args, bad[i].args, dir);
    rc = test_run_cli(out, sizeof out, "concept %s --sampler-steps 2 --batch 1 --quiet", args);
    ck_assert_msg(rc == bad[i].status && strstr(out, bad[i].needle), "case %zu: rc %d: %s", i, rc,
                  out);
  }
  rc = test_run_cli(out, sizeof out, "concept --model %s --target K --name zz --quiet", u);
  ck_assert_msg(rc == 1 && strstr(out, "no class embeddings"), "rc %d: %s", rc, out);
  /* --force replaces it. */
  rc = test_run_cli(out, sizeof out,
                    "concept --model %s --target K --name myK --steps 1 --batch 1 "
                    "--sampler-steps 2 --force --quiet",
                    dir);
  ck_assert_msg(rc == 0 && strstr(out, "saved "), "rc %d: %s", rc, out);
}
END_TEST

/* `denoised stylize` end to end (a tiny run: README has the figures): a new model folder that
 * loads and samples, weights that moved; and its refusals. */
START_TEST(cli_stylize) {
  char dir[64], out[8192], u[1024], o[256];
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
  snprintf(o, sizeof o, "%s/italic", dir);
  int rc = test_run_cli(out, sizeof out,
                        "stylize --target italic --out %s --steps 1 --batch 2 --sampler-steps 2 "
                        "--eval 2 --quiet",
                        o);
  ck_assert_msg(rc == 0 && strstr(out, "before: style ") && strstr(out, "after: style ") &&
                    strstr(out, "saved "),
                "rc %d: %s", rc, out);
  model *m = NULL, *m0 = load_default();
  err e = {0};
  ck_assert_msg(model_load(o, &m, &e) == ERR_OK, "%s", e.msg);
  ck_assert_int_eq(model_param_count(m), model_param_count(m0));
  int moved = 0;
  for (int i = 0; i < model_param_count(m); i++)
    moved += memcmp(model_param_at(m, i)->data, model_param_at(m0, i)->data,
                    model_param_at(m, i)->count * sizeof(float)) != 0;
  ck_assert_msg(moved > model_param_count(m) / 2, "%d tensors of %d moved", moved,
                model_param_count(m));
  model_free(m);
  model_free(m0);
  rc = test_run_cli(out, sizeof out, "sample --model %s --class K --steps 2 --out %s/x.npy --quiet",
                    o, dir);
  ck_assert_msg(rc == 0, "rc %d: %s", rc, out);
  test_src_path(u, sizeof u, "tests/fixtures/adjoint/model_uncond");
  struct {
    const char *args, *needle;
    int status;
  } bad[] = {
      {"--target italic --out %s", "exists", 1},
      {"--target char=K --out %s/n1", "cannot be a verdict of the head 'char'", 1},
      {"--target italic --keep nosuch --out %s/n2", "--keep 'nosuch'", 1},
      {"--target nope --out %s/n3", "--target: target 'nope'", 1},
      {"--target italic --out %s/n4 --scheduler euler-a", "euler", 1},
      {"--out %s/n5", "--target and --out are required", 2},
      {"--target italic --out %s/n7 --threads 300", "--threads", 2},
      {"--target italic --out %s/n8 --classifier /nonexistent", "--classifier", 1},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char args[2048];
    snprintf(args, sizeof args, bad[i].args, i == 0 ? o : dir);
    rc = test_run_cli(out, sizeof out, "stylize %s --steps 1 --batch 1 --sampler-steps 2 --quiet",
                      args);
    ck_assert_msg(rc == bad[i].status && strstr(out, bad[i].needle), "case %zu: rc %d: %s", i, rc,
                  out);
  }
  rc = test_run_cli(out, sizeof out, "stylize --model %s --target italic --out %s/n6 --quiet", u,
                    dir);
  ck_assert_msg(rc == 1 && strstr(out, "no class embeddings"), "rc %d: %s", rc, out);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("adjtask");
  TCase *tc = tcase_create("adjtask");
  tcase_add_test(tc, named_embeddings);
  tcase_add_test(tc, no_class_embeddings);
  tcase_add_test(tc, targets);
  tcase_add_test(tc, concept_step_downhill);
  tcase_add_test(tc, cli_concept);
  tcase_add_test(tc, cli_stylize);
  suite_add_tcase(s, tc);
  return s;
}
