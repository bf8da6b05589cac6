/* The AutoencoderKL's gradients (vae.h): the encoder or the decoder run again on a tape of
 * engine/grad nodes (tape.h) in the order vae.c's forward runs them, so the tape's output is
 * vae_encode's moments or vae_decode's whole (untiled) images, then the nodes' rules in reverse.
 * A training step nests them: the encoder's loss_grad samples latents from the moments and runs
 * the decoder's backward on them, so no pass runs twice. */
#include <string.h>

#include "mem.h"
#include "ops.h"
#include "tape.h"
#include "vae_impl.h"

#define LOGVAR_MIN (-30.0f)
#define LOGVAR_MAX 20.0f

static int t_mid(tape *T, const coder *k, tape_act *cur) {
  tape_act a, b;
  int rc;
  if ((rc = tape_resnet(T, &k->mid_res[0], cur, NULL, &a)) ||
      (k->mid_has_attn && (rc = tape_attn(T, &k->mid_attn, &a, &a))) ||
      (rc = tape_resnet(T, &k->mid_res[1], &a, NULL, &b)))
    return rc;
  *cur = b;
  return ERR_OK;
}

/* A block's resnets and its resampler (the encoder's padded stride-2 conv, the decoder's
 * nearest 2x then conv). */
static int t_block(tape *T, const coder *k, const vae_block *b, tape_act *cur) {
  int rc;
  for (int l = 0; l < b->nlayers; l++) {
    tape_act nx;
    if ((rc = tape_resnet(T, &b->res[l], cur, NULL, &nx)))
      return rc;
    *cur = nx;
  }
  if (!b->has_sample)
    return ERR_OK;
  tape_act src = *cur;
  if (!k->encoder && (rc = tape_unary(T, GRAD_UPSAMPLE_NEAREST2X, cur, &src)))
    return rc;
  return tape_conv(T, &b->sample, &src, cur);
}

static int t_coder(tape *T, const coder *k, const tape_act *x, tape_act *out) {
  tape_act cur, normed;
  int rc;
  if ((rc = tape_conv(T, &k->conv_in, x, &cur)) || (!k->encoder && (rc = t_mid(T, k, &cur))))
    return rc;
  for (int i = 0; i < k->nlevels; i++)
    if ((rc = t_block(T, k, &k->blocks[i], &cur)))
      return rc;
  if ((k->encoder && (rc = t_mid(T, k, &cur))) ||
      (rc = tape_norm(T, &k->norm_out, &cur, 1, &normed)))
    return rc;
  return tape_conv(T, &k->conv_out, &normed, out);
}

/* The shared frame of both backwards: input checks, the tape, the upstream gradient, the
 * reverse sweep, dL/d(input). `encoder` picks the network. */
static int backward(const vae *v, int encoder, const float *in, int n, int h, int w,
                    const vae_grad_call *g, err *e) {
  const vae_info *vi = &v->info;
  const int cin = encoder ? vi->in_channels : vi->latent_channels;
  int rc = vae_check_size(n, h, w, encoder ? vi->factor : 1, encoder ? "image" : "latent", e);
  if (rc)
    return rc;
  if (!g->grad_out == !g->loss_grad)
    return err_set(e, ERR_INVALID, "a VAE backward needs exactly one of grad_out and loss_grad");
  const size_t in_count = (size_t)n * cin * h * w;
  if (!ops_all_finite(in, in_count))
    return err_set(e, ERR_INVALID, "the %s hold NaN or infinite values",
                   encoder ? "images to encode" : "latents to decode");
  workspace ws;
  if ((rc = blocks_workspace_take(&((vae *)v)->spares, g->threads, &ws, e)))
    return rc;
  tape T = {.ps = &v->ps, .n = n, .pg = g->params, .what = "VAE", .e = e, .a = ws.a, .p = ws.p};
  tape_act x, out, mid;
  float *clamped = NULL;
  if ((rc = tape_new_act(&T, cin, h, w, &x)))
    goto done;
  memcpy(x.v, in, in_count * sizeof(float));
  if (encoder) {
    (void)((rc = t_coder(&T, &v->enc, &x, &mid)) ||
           (rc = v->has_quant ? tape_conv(&T, &v->quant, &mid, &out) : (out = mid, ERR_OK)));
  } else {
    (void)((rc = v->has_post_quant ? tape_conv(&T, &v->post_quant, &x, &mid) : (mid = x, ERR_OK)) ||
           (rc = t_coder(&T, &v->dec, &mid, &out)));
  }
  if (rc)
    goto done;
  const size_t per = (size_t)out.c * out.h * out.w;
  const size_t ocount = (size_t)n * per, half = per / 2;
  /* the encoder's log-variance is clamped as diffusers' posterior does */
  if (encoder && (clamped = mem_aligned(64, ocount * sizeof(float))) == NULL) {
    rc = err_set(e, ERR_NOMEM, "out of memory for the VAE's moments");
    goto done;
  }
  float *y = encoder ? clamped : out.v;
  for (size_t i = 0; encoder && i < ocount; i++) {
    const float lv = out.v[i];
    y[i] = i % per < half ? lv : lv < LOGVAR_MIN ? LOGVAR_MIN : lv > LOGVAR_MAX ? LOGVAR_MAX : lv;
  }
  if (g->out)
    memcpy(g->out, y, ocount * sizeof(float));
  if (g->loss_grad)
    rc = g->loss_grad(y, out.d, g->loss_user, e);
  else
    memcpy(out.d, g->grad_out, ocount * sizeof(float));
  for (size_t i = 0; encoder && i < ocount; i++) /* torch.clamp passes the bounds themselves */
    if (i % per >= half && (out.v[i] < LOGVAR_MIN || out.v[i] > LOGVAR_MAX))
      out.d[i] = 0.0f;
  if (rc || (rc = tape_backward(&T)))
    goto done;
  if (g->grad_in)
    memcpy(g->grad_in, x.d, in_count * sizeof(float));
done:
  free(clamped);
  tape_free(&T);
  blocks_workspace_give(&((vae *)v)->spares, &ws);
  return rc;
}

int vae_decode_backward(const vae *v, const float *z, int n, int h, int w, const vae_grad_call *g,
                        err *e) {
  return backward(v, 0, z, n, h, w, g, e);
}

int vae_encode_backward(const vae *v, const float *x, int n, int h, int w, const vae_grad_call *g,
                        err *e) {
  return backward(v, 1, x, n, h, w, g, e);
}
