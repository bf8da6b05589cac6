/* `denoised info`: what a model folder holds, as a person or a script needs it before a run:
 * the network's shape and classes, its weights digest, and the solver data kept beside it
 * (MODEL/solver_data), with what each was computed for. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "sampler.h"

static const char help[] =
    "usage: denoised info [--model DIR] [--json]\n"
    "\n"
    "Describes a model folder and lists its solver data (DIR/solver_data/NAME.json, which\n"
    "'sample --solver-data NAME' and the daemon's scheduler.data name).\n"
    "  --model DIR    diffusers model folder (default: the built-in default model)\n"
    "  --json         one JSON object instead of text\n";

/* The model and its solver data as one JSON object (new reference), or NULL. */
static json_t *info_json(const char *dir, const model *m, json_t *data) {
  const model_info *mi = model_get_info(m);
  json_t *j = json_pack("{s:s, s:s, s:i, s:i, s:i, s:s, s:I, s:s, s:O}", "model", dir, "class_name",
                        mi->class_name ? mi->class_name : "", "sample_size", mi->sample_size,
                        "channels", mi->in_channels, "num_classes", mi->num_classes,
                        "prediction_type", mi->prediction_type ? mi->prediction_type : "epsilon",
                        "num_params", (json_int_t)mi->num_params, "weights_digest",
                        model_weights_digest(m), "solver_data", data);
  if (j && mi->num_classes)
    json_object_set_new(j, "null_class", json_integer(mi->null_class));
  json_t *rec = json_object(); /* config.json "_recommended", what sample uses by default */
  if (mi->rec_solver)
    json_object_set_new(rec, "scheduler", json_string(mi->rec_solver));
  if (mi->rec_steps > 0)
    json_object_set_new(rec, "steps", json_integer(mi->rec_steps));
  if (mi->rec_guidance >= 0)
    json_object_set_new(rec, "guidance_scale", json_real(mi->rec_guidance));
  if (j)
    json_object_set_new(j, "recommended", rec);
  else
    json_decref(rec);
  return j;
}

static void print_text(const json_t *j) {
  printf("model        %s\n", json_string_value(json_object_get(j, "model")));
  printf("network      %s, %lldx%lld, %lld channels, %lld parameters, predicts %s\n",
         json_string_value(json_object_get(j, "class_name")),
         (long long)json_integer_value(json_object_get(j, "sample_size")),
         (long long)json_integer_value(json_object_get(j, "sample_size")),
         (long long)json_integer_value(json_object_get(j, "channels")),
         (long long)json_integer_value(json_object_get(j, "num_params")),
         json_string_value(json_object_get(j, "prediction_type")));
  const long long nc = (long long)json_integer_value(json_object_get(j, "num_classes"));
  if (nc)
    printf("classes      %lld (null class %lld)\n", nc,
           (long long)json_integer_value(json_object_get(j, "null_class")));
  const json_t *rec = json_object_get(j, "recommended");
  if (json_object_size(rec)) {
    char *t = json_dumps(rec, JSON_COMPACT | JSON_REAL_PRECISION(6));
    printf("recommended  %s\n", t ? t : "");
    free(t);
  }
  printf("weights      %s\n", json_string_value(json_object_get(j, "weights_digest")));
  const json_t *data = json_object_get(j, "solver_data");
  printf("solver data  %zu%s\n", json_array_size(data), json_array_size(data) ? ":" : "");
  size_t i;
  const json_t *d;
  json_array_foreach(data, i, d) {
    const json_t *cl = json_object_get(d, "class_label"),
                 *gs = json_object_get(d, "guidance_scale");
    char cls[32] = "any class", gsc[32] = "no guidance";
    if (json_is_integer(cl))
      snprintf(cls, sizeof cls, "class %lld", (long long)json_integer_value(cl));
    if (json_is_number(gs))
      snprintf(gsc, sizeof gsc, "guidance %g", json_number_value(gs));
    const char *kind = json_string_value(json_object_get(d, "kind"));
    /* a DPM-OT map (version 1) records what it is for; v3 statistics do from version 2; a USF
     * schedule shows its statistics' record */
    const int ot = kind && strcmp(kind, "dpm-ot-map") == 0;
    const int usf = kind && strcmp(kind, "usf-schedule") == 0;
    const int unrec = !ot && !usf && json_integer_value(json_object_get(d, "version")) < 2;
    if (usf && !json_is_number(gs)) /* no statistics: nothing ties it to a scale */
      snprintf(gsc, sizeof gsc, "%s", "any guidance");
    if (unrec)
      snprintf(cls, sizeof cls, "%s", "not recorded (version 1)");
    char what[64];
    if (ot)
      snprintf(what, sizeof what, "%lld targets at step %lld of %lld",
               (long long)json_integer_value(json_object_get(d, "targets")),
               (long long)json_integer_value(json_object_get(d, "step")),
               (long long)json_integer_value(json_object_get(d, "steps")));
    else if (usf) /* class and scale: those of the statistics it names, if any */
      snprintf(what, sizeof what, "%lld steps",
               (long long)json_integer_value(json_object_get(d, "steps")));
    else
      snprintf(what, sizeof what, "grid %lld",
               (long long)json_integer_value(json_object_get(d, "grid")));
    printf("  %-20s %s, %s, %s, %s\n", json_string_value(json_object_get(d, "name")), kind, what,
           cls, unrec ? "guidance not recorded" : gsc);
  }
}

int cmd_info(int argc, char **argv) {
  static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                       {"json", no_argument, 0, 'j'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
  const char *dir = NULL;
  int as_json = 0, c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "m:jh", opts, NULL)) != -1) {
    if (c == 'm')
      dir = optarg;
    else if (c == 'j')
      as_json = 1;
    else if (c == 'h')
      return fputs(help, stdout) < 0;
    else
      return cli_usage_error("info", "bad option");
  }
  if (optind < argc)
    return cli_usage_error("info", "unexpected argument '%s'", argv[optind]);
  dir = dir ? dir : cli_default_model();
  err e = {0};
  model *m = NULL;
  if (model_load(dir, &m, &e))
    return cli_fail("info", "%s", e.msg);
  json_t *data = sampler_data_list(dir, &e);
  json_t *j = data ? info_json(dir, m, data) : NULL;
  int status = 0;
  if (!j) {
    status = cli_fail("info", "out of memory");
  } else if (as_json) {
    char *text = json_dumps(j, JSON_INDENT(1) | JSON_REAL_PRECISION(17));
    status = text ? (puts(text), 0) : cli_fail("info", "out of memory");
    free(text);
  } else {
    print_text(j);
  }
  json_decref(j);
  json_decref(data);
  model_free(m);
  return status;
}
