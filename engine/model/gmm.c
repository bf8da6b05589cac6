/* GaussianMixtureDenoiser: the exact denoiser of an isotropic Gaussian mixture under the
 * variance-preserving forward process, computed in double and returned as eps (or, when its
 * config says so, x0 or v). Tests use it as a network whose right answer is known. */
#include "gmm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "safetensors.h"

/* Sizes beyond these are not a test model any more, and would overflow int products. */
#define GMM_MAX_COMPONENTS 65536
#define GMM_MAX_CHANNELS 64
#define GMM_MAX_SIZE 4096
#define GMM_MAX_CLASSES 1000000

/* What gmm_eval returns, from config.json "prediction_type". */
typedef enum { GMM_OUT_EPSILON, GMM_OUT_SAMPLE, GMM_OUT_V } gmm_output;

struct gmm {
  int k, c, s, d; /* components, channels, side, values per image */
  int num_classes;
  gmm_output output;
  int num_train_timesteps;
  double *means;     /* k * d */
  double *log_w;     /* log softmax(log_weights) */
  double *var;       /* s_k^2 */
  int64_t *labels;   /* k, or NULL */
  double *abar;      /* alphas_cumprod */
  double *log_sigma; /* log sqrt((1 - abar) / abar), the VE sigma diffusers interpolates */
};

void gmm_free(gmm *g) {
  if (!g)
    return;
  free(g->means);
  free(g->log_w);
  free(g->var);
  free(g->labels);
  free(g->abar);
  free(g->log_sigma);
  free(g);
}

int gmm_sample_size(const gmm *g) {
  return g->s;
}
int gmm_channels(const gmm *g) {
  return g->c;
}
int gmm_num_classes(const gmm *g) {
  return g->num_classes;
}
int64_t gmm_num_values(const gmm *g) {
  return (int64_t)g->k * g->d + 2 * (int64_t)g->k + (g->labels ? g->k : 0);
}

/* A positive integer config key; `required` says whether absence is an error. */
static int cfg_int(const json_t *cfg, const char *key, int required, int max, int *out, err *e) {
  const json_t *v = json_object_get(cfg, key);
  if (!v || json_is_null(v)) {
    if (required)
      return err_set(e, ERR_FORMAT, "config.json: missing key '%s'", key);
    *out = 0;
    return ERR_OK;
  }
  if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > max)
    return err_set(e, ERR_FORMAT, "config.json: key '%s' must be an integer in [1, %d]", key, max);
  *out = (int)json_integer_value(v);
  return ERR_OK;
}

static int parse_config(gmm *g, const json_t *cfg, err *e) {
  if (!json_is_object(cfg))
    return err_set(e, ERR_FORMAT, "config.json: expected a JSON object");
  const json_t *cn = json_object_get(cfg, "_class_name");
  if (cn && (!json_is_string(cn) || strcmp(json_string_value(cn), "GaussianMixtureDenoiser") != 0))
    return err_set(e, ERR_FORMAT,
                   "config.json: key '_class_name' must be "
                   "\"GaussianMixtureDenoiser\"");
  int rc;
  if ((rc = cfg_int(cfg, "sample_size", 1, GMM_MAX_SIZE, &g->s, e)) != ERR_OK ||
      (rc = cfg_int(cfg, "in_channels", 1, GMM_MAX_CHANNELS, &g->c, e)) != ERR_OK ||
      (rc = cfg_int(cfg, "num_class_embeds", 0, GMM_MAX_CLASSES, &g->num_classes, e)) != ERR_OK)
    return rc;
  int outc = 0;
  if ((rc = cfg_int(cfg, "out_channels", 0, GMM_MAX_CHANNELS, &outc, e)) != ERR_OK)
    return rc;
  if (outc && outc != g->c)
    return err_set(e, ERR_FORMAT,
                   "config.json: key 'out_channels' (%d) must equal in_channels "
                   "(%d): the mixture predicts eps only",
                   outc, g->c);
  const json_t *pt = json_object_get(cfg, "prediction_type");
  g->output = GMM_OUT_EPSILON;
  if (pt && !json_is_null(pt)) {
    const char *p = json_is_string(pt) ? json_string_value(pt) : "";
    if (strcmp(p, "epsilon") == 0)
      g->output = GMM_OUT_EPSILON;
    else if (strcmp(p, "sample") == 0)
      g->output = GMM_OUT_SAMPLE;
    else if (strcmp(p, "v_prediction") == 0)
      g->output = GMM_OUT_V;
    else
      return err_set(e, ERR_UNSUPPORTED,
                     "config.json: key 'prediction_type' must be "
                     "\"epsilon\", \"sample\" or \"v_prediction\"");
  }
  g->d = g->c * g->s * g->s;
  return ERR_OK;
}

/* Reads a float tensor of the given shape and widens it; checks every value is finite. */
static int read_tensor(const st_file *f, const char *name, int ndim, const int64_t *shape,
                       double **out, err *e) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++)
    n *= shape[i];
  float *tmp = mem_malloc((size_t)n * sizeof *tmp);
  double *d = mem_malloc((size_t)n * sizeof *d);
  if (!tmp || !d) {
    free(tmp);
    free(d);
    return err_set(e, ERR_NOMEM, "out of memory reading '%s'", name);
  }
  int rc = st_read_f32(f, name, ndim, shape, tmp, e);
  for (int64_t i = 0; rc == ERR_OK && i < n; i++) {
    if (!isfinite(tmp[i]))
      rc = err_set(e, ERR_FORMAT, "tensor '%s': value %lld is not finite", name, (long long)i);
    d[i] = tmp[i];
  }
  free(tmp);
  if (rc != ERR_OK) {
    free(d);
    return rc;
  }
  *out = d;
  return ERR_OK;
}

static int load_tensors(gmm *g, const st_file *f, err *e) {
  const st_tensor_info *lw = st_find(f, "log_weights");
  if (!lw)
    return err_set(e, ERR_FORMAT, "missing tensor 'log_weights'");
  if (lw->ndim != 1 || lw->shape[0] < 1 || lw->shape[0] > GMM_MAX_COMPONENTS)
    return err_set(e, ERR_FORMAT, "tensor 'log_weights' must have shape [K] with 1 <= K <= %d",
                   GMM_MAX_COMPONENTS);
  g->k = (int)lw->shape[0];
  if ((int64_t)g->k * g->d > ((int64_t)1 << 31))
    return err_set(e, ERR_FORMAT, "mixture too large: %d components of %d values", g->k, g->d);
  if (!st_find(f, "means"))
    return err_set(e, ERR_FORMAT, "missing tensor 'means'");
  if (!st_find(f, "stds"))
    return err_set(e, ERR_FORMAT, "missing tensor 'stds'");
  const int64_t kshape[1] = {g->k};
  const int64_t mshape[4] = {g->k, g->c, g->s, g->s};
  double *logits = NULL, *stds = NULL;
  int rc;
  if ((rc = read_tensor(f, "log_weights", 1, kshape, &logits, e)) != ERR_OK ||
      (rc = read_tensor(f, "stds", 1, kshape, &stds, e)) != ERR_OK ||
      (rc = read_tensor(f, "means", 4, mshape, &g->means, e)) != ERR_OK)
    goto done;
  g->log_w = mem_malloc((size_t)g->k * sizeof *g->log_w);
  g->var = mem_malloc((size_t)g->k * sizeof *g->var);
  if (!g->log_w || !g->var) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  double mx = logits[0], sum = 0;
  for (int k = 1; k < g->k; k++)
    mx = logits[k] > mx ? logits[k] : mx;
  for (int k = 0; k < g->k; k++)
    sum += exp(logits[k] - mx);
  for (int k = 0; k < g->k; k++) {
    g->log_w[k] = logits[k] - mx - log(sum);
    if (!(stds[k] > 0)) {
      rc = err_set(e, ERR_FORMAT, "tensor 'stds': value %d is %g, must be > 0", k, stds[k]);
      goto done;
    }
    g->var[k] = stds[k] * stds[k];
  }
  const st_tensor_info *li = st_find(f, "labels");
  if (li && !g->num_classes) {
    rc = err_set(e, ERR_FORMAT, "tensor 'labels' present but config.json has no num_class_embeds");
    goto done;
  }
  if (g->num_classes && !li) {
    rc = err_set(e, ERR_FORMAT, "missing tensor 'labels' (config.json sets num_class_embeds)");
    goto done;
  }
  if (li) {
    if (li->ndim != 1 || li->shape[0] != g->k) {
      rc = err_set(e, ERR_FORMAT, "tensor 'labels' must have shape [%d]", g->k);
      goto done;
    }
    g->labels = mem_malloc((size_t)g->k * sizeof *g->labels);
    if (!g->labels) {
      rc = err_set(e, ERR_NOMEM, "out of memory");
      goto done;
    }
    if ((rc = st_read_i64(f, "labels", g->labels, g->k, e)) != ERR_OK)
      goto done;
    for (int k = 0; k < g->k; k++)
      if (g->labels[k] < 0 || g->labels[k] >= g->num_classes) {
        rc = err_set(e, ERR_FORMAT, "tensor 'labels': value %d is %lld, outside [0, %d)", k,
                     (long long)g->labels[k], g->num_classes);
        goto done;
      }
  }
done:
  free(logits);
  free(stds);
  return rc;
}

static int set_schedule(gmm *g, const double *abar, int n, err *e) {
  if (!abar || n < 1)
    return err_set(e, ERR_INVALID, "GaussianMixtureDenoiser needs a noise schedule");
  g->num_train_timesteps = n;
  g->abar = mem_malloc((size_t)n * sizeof *g->abar);
  g->log_sigma = mem_malloc((size_t)n * sizeof *g->log_sigma);
  if (!g->abar || !g->log_sigma)
    return err_set(e, ERR_NOMEM, "out of memory");
  for (int i = 0; i < n; i++) {
    /* abar = 1 would make sigma 0 and eps undefined; abar = 0 (zero terminal SNR) is fine */
    if (!(abar[i] >= 0 && abar[i] < 1))
      return err_set(e, ERR_INVALID, "alphas_cumprod[%d] = %g is outside [0, 1)", i, abar[i]);
    g->abar[i] = abar[i];
    g->log_sigma[i] = 0.5 * (log1p(-abar[i]) - log(abar[i]));
  }
  return ERR_OK;
}

int gmm_load(const json_t *config, const char *weights_path, const double *alphas_cumprod,
             int num_train_timesteps, gmm **out, err *e) {
  gmm *g = mem_calloc(1, sizeof *g);
  if (!g)
    return err_set(e, ERR_NOMEM, "out of memory");
  st_file *f = NULL;
  int rc = parse_config(g, config, e);
  if (rc == ERR_OK)
    rc = set_schedule(g, alphas_cumprod, num_train_timesteps, e);
  if (rc == ERR_OK && (rc = st_open(weights_path, &f, e)) == ERR_OK) {
    rc = load_tensors(g, f, e);
    if (rc != ERR_OK)
      err_prefix(e, "%s", weights_path);
    st_close(f);
  }
  if (rc != ERR_OK) {
    gmm_free(g);
    return rc;
  }
  *out = g;
  return ERR_OK;
}

/* alpha_bar at a possibly fractional timestep: diffusers maps sigmas to timesteps by linear
 * interpolation of log sigma between integer neighbours (_sigma_to_t); this is its inverse. */
static double abar_at(const gmm *g, double t) {
  const int last = g->num_train_timesteps - 1;
  if (!(t > 0)) /* NaN too: never cast to int below */
    return g->abar[0];
  if (t >= last)
    return g->abar[last];
  int lo = (int)floor(t);
  double w = t - lo;
  if (w == 0)
    return g->abar[lo];
  double ls = (1 - w) * g->log_sigma[lo] + w * g->log_sigma[lo + 1];
  if (isinf(ls)) /* next to a zero-SNR step: sigma is infinite, alpha_bar zero */
    return 0.0;
  double s2 = exp(2 * ls);
  return 1 / (1 + s2);
}

int gmm_eval(const gmm *g, const float *x, int n, const float *t, const int64_t *labels, float *out,
             err *e) {
  const int d = g->d, kk = g->k;
  double *logp = mem_malloc((size_t)kk * sizeof *logp);
  double *ex0 = mem_malloc((size_t)d * sizeof *ex0);
  if (!logp || !ex0) {
    free(logp);
    free(ex0);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  int rc = ERR_OK;
  for (int b = 0; b < n && rc == ERR_OK; b++) {
    const float *xb = x + (size_t)b * d;
    if (!isfinite(t[b])) {
      rc = err_set(e, ERR_INVALID, "timestep of image %d is not finite", b);
      break;
    }
    /* a negative label asks for the unconditional mixture (classifier-free guidance) */
    int64_t c = labels && g->labels ? labels[b] : -1;
    if (labels && g->labels && c >= g->num_classes) {
      rc = err_set(e, ERR_INVALID, "class label %lld of image %d is outside [0, %d)", (long long)c,
                   b, g->num_classes);
      break;
    }
    const double abar = abar_at(g, t[b]);
    const double alpha = sqrt(abar), sigma = sqrt(1 - abar);
    double mx = -INFINITY;
    for (int k = 0; k < kk; k++) {
      if (c >= 0 && g->labels[k] != c) {
        logp[k] = -INFINITY;
        continue;
      }
      const double *mu = g->means + (size_t)k * d;
      const double v = alpha * alpha * g->var[k] + sigma * sigma;
      double d2 = 0;
      for (int i = 0; i < d; i++) {
        double r = xb[i] - alpha * mu[i];
        d2 += r * r;
      }
      /* the (2 pi)^(-d/2) factor is common to all components and cancels */
      logp[k] = g->log_w[k] - 0.5 * d * log(v) - 0.5 * d2 / v;
      mx = logp[k] > mx ? logp[k] : mx;
    }
    if (mx == -INFINITY) {
      rc = err_set(e, ERR_INVALID, "no mixture component has class label %lld", (long long)c);
      break;
    }
    double z = 0;
    for (int k = 0; k < kk; k++)
      z += logp[k] == -INFINITY ? 0 : exp(logp[k] - mx);
    memset(ex0, 0, (size_t)d * sizeof *ex0);
    for (int k = 0; k < kk; k++) {
      if (logp[k] == -INFINITY)
        continue;
      const double r = exp(logp[k] - mx) / z;
      if (r == 0)
        continue;
      const double *mu = g->means + (size_t)k * d;
      const double v = alpha * alpha * g->var[k] + sigma * sigma;
      const double gain = alpha * g->var[k] / v;
      for (int i = 0; i < d; i++)
        ex0[i] += r * (mu[i] + gain * (xb[i] - alpha * mu[i]));
    }
    float *ob = out + (size_t)b * d;
    for (int i = 0; i < d; i++) {
      const double eps = (xb[i] - alpha * ex0[i]) / sigma;
      ob[i] = (float)(g->output == GMM_OUT_EPSILON  ? eps
                      : g->output == GMM_OUT_SAMPLE ? ex0[i]
                                                    : alpha * eps - sigma * ex0[i]);
    }
  }
  free(logp);
  free(ex0);
  return rc;
}
