/* What the AdjointDPM task commands (`denoised concept`, `stylize`, `audit`) share: their common
 * flags and, from them, the classifier, the guidance and the solver their runs use. */
#include <getopt.h>
#include <stdio.h>

#include "cli.h"

int cli_adj_flag(cli_adj_flags *f, int c, const char *arg) {
  switch (c) {
  case 'm': f->model_dir = arg; return 1;
  case 'c': f->clf_dir = arg; return 1;
  case 'S': f->scheduler = arg; return 1;
  case 'q': f->quiet = 1; return 1;
  case 's': return cli_parse_int("--seed", arg, 0, (1ll << 53) - 1, &f->seed) ? 2 : 1;
  case 'j': return cli_parse_int("--threads", arg, 1, 256, &f->threads) ? 2 : 1;
  case 'g':
    f->has_guidance = 1;
    return cli_parse_double("--guidance-scale", arg, 0, GUIDANCE_MAX_SCALE, &f->guidance) ? 2 : 1;
  default: return 0;
  }
}

void cli_adj_classifier_dir(const cli_adj_flags *f, char *dir, size_t n) {
  snprintf(dir, n, "%s%s", f->clf_dir ? f->clf_dir : f->model_dir, f->clf_dir ? "" : "/classifier");
}

int cli_adj_classifier(const cli_adj_flags *f, classifier **clf, err *e) {
  char dir[4096];
  cli_adj_classifier_dir(f, dir, sizeof dir);
  return classifier_load(dir, clf, e) ? err_prefix(e, "--classifier") : ERR_OK;
}

int cli_adj_guidance(const cli_adj_flags *f, const model *m, guidance *gd, err *e) {
  const model_info *mi = model_get_info(m);
  *gd = guidance_for(m, f->has_guidance         ? f->guidance
                        : mi->rec_guidance >= 0 ? mi->rec_guidance
                                                : 1.0);
  return guidance_check(gd, m, e);
}

int cli_adj_solver(const cli_adj_flags *f, const model *m, int rec, long long steps, char *name,
                   size_t n, sampler **s, err *e) {
  const model_info *mi = model_get_info(m);
  const char *solver = f->scheduler            ? f->scheduler
                       : rec && mi->rec_solver ? mi->rec_solver
                                               : "dpm++2m";
  if (name)
    snprintf(name, n, "%s", solver);
  cli_solver cs = {0};
  int rc = cli_solver_from_flags(solver, steps, NULL, NULL, 0, &cs, e);
  if (rc == ERR_OK)
    rc = cli_solver_make(m, &cs, NULL, s, e);
  cli_solver_clear(&cs);
  return rc;
}
