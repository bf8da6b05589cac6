#!/usr/bin/python3
"""PyTorch autograd through whole sampling loops, the references of the discrete adjoint
(engine/solver/adjoint.h; tests/test_adjoint.c reads them).

    /usr/bin/python3 tools/gen_adjoint_fixtures.py [--out tests/fixtures/adjoint] [--seed 1]

A tiny class-conditional UNet2DModel (tools/torch_unet.py, random weights, 8x8, 5 classes with
the null class 4) and, per case, the scheduler loop written in torch after diffusers' step code
(diffusers is not installed here): DDIMScheduler.step with eta 0 ("leading" timesteps,
set_alpha_to_one, _threshold_sample / clip_sample on pred_original_sample) and
DPMSolverMultistepScheduler (dpmsolver++ midpoint, timesteps linspace over the unclipped
schedule, sigmas np.interp'ed and cast to float32, final_sigmas_type zero, lower_order_final,
convert_model_output with _threshold_sample), classifier-free guidance uncond + g (cond -
uncond) with both passes in one batch. Everything runs in float64 from the float32 weights,
noise and sigmas; L = sum(G * sample) is differentiated by torch.autograd with respect to the
noise, the class-embedding table (each image's label row: distinct labels, so row = image) and
every weight. Files:
  model/, model_v/           config.json, diffusion_pytorch_model.safetensors (model_v: the
                             same weights, "prediction_type": "v_prediction"); model_uncond/
                             the same without the class embedding (v-prediction)
  CASE/scheduler_config.json the model's scheduler config for this case
  CASE/case.json             solver, steps, labels, guidance scale
  CASE/noise.npy, grad_output.npy, sample.npy, grad_noise.npy, grad_class.npy
  CASE/grad_params.safetensors
Needs Debian's python3-torch and python3-numpy only.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st  # noqa: E402
from torch_unet import TorchUNet  # noqa: E402
from unet_arch import full_config, random_weights, write_model_dir  # noqa: E402

MODEL = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[4, 8],
             layers_per_block=1, norm_num_groups=2, attention_head_dim=4,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D"], num_class_embeds=5,
             flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5)
NULL_CLASS = 4
SCHED = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
CLIPPED = dict(SCHED, clip_sample=True, clip_sample_range=1.0, thresholding=True,
               sample_max_value=1.0, dynamic_thresholding_ratio=0.995)

CASES = {
    # the glyph model's settings: thresholding with sample_max_value 1 (a clip), guidance 2
    "ddim_guided_clip": dict(solver="ddim", steps=6, sched=CLIPPED, scale=2.0, labels=[1, 3]),
    "dpmpp2m_guided_clip": dict(solver="dpm++2m", steps=6, sched=CLIPPED, scale=1.5, labels=[2, 0]),
    # smooth cases (no clip; the finite-difference checks run on these), v-prediction: an
    # unclipped epsilon x0 of a random network at t = 999 is off by hundreds
    "dpmpp2m_plain": dict(solver="dpm++2m", steps=5, sched=dict(SCHED, prediction_type="v_prediction"),
                          scale=None, labels=[3, 1]),
    "ddim_v_guided": dict(solver="ddim", steps=4,
                          sched=dict(SCHED, prediction_type="v_prediction", clip_sample=False),
                          scale=3.0, labels=[0, 2]),
    # an unconditional model (no class embedding): noise and weights only; last, so that the
    # earlier cases' random draws stay as they were
    "dpmpp2m_uncond": dict(solver="dpm++2m", steps=4, sched=dict(SCHED, prediction_type="v_prediction"),
                           scale=None, labels=None, batch=2),
}


def alphas_cumprod(cfg):
    T = cfg["num_train_timesteps"]
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)  # float32, as the scheduler holds it


def threshold(x0, cfg):
    """DDPM/DDIM/DPM's _threshold_sample, or DDIM's clip_sample (when ddim)."""
    if cfg.get("thresholding"):
        b = x0.shape[0]
        a = x0.reshape(b, -1).abs()
        s = torch.quantile(a, cfg.get("dynamic_thresholding_ratio", 0.995), dim=1)
        s = torch.clamp(s, min=1, max=cfg.get("sample_max_value", 1.0))[:, None, None, None]
        return torch.clamp(x0, -s, s) / s
    return x0


def model_eps(net, x, t, labels, scale):
    n = x.shape[0]
    if labels is None:
        return net(x, torch.full((n,), float(t), dtype=torch.float64))
    tt = torch.full((n,), float(t), dtype=torch.float64)
    if scale is None or scale == 1.0:
        return net(x, tt, labels)
    both = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
    cond, unc = both[:n], both[n:]
    return unc + scale * (cond - unc)


def ddim_loop(net, x, labels, cfg, steps, scale):
    abar = alphas_cumprod(cfg).double()
    T = cfg["num_train_timesteps"]
    ratio = T // steps
    ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64)
    pred = cfg.get("prediction_type", "epsilon")
    for t in ts:
        mo = model_eps(net, x, t, labels, scale)
        prev = t - ratio
        a_t = abar[t]
        a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        b_t = 1 - a_t
        if pred == "epsilon":
            x0 = (x - b_t ** 0.5 * mo) / a_t ** 0.5
            eps = mo
        elif pred == "v_prediction":
            x0 = a_t ** 0.5 * x - b_t ** 0.5 * mo
            eps = a_t ** 0.5 * mo + b_t ** 0.5 * x
        else:
            raise ValueError(pred)
        if cfg.get("thresholding"):
            x0 = threshold(x0, cfg)
        elif cfg.get("clip_sample", True):  # DDIMScheduler's default
            r = cfg.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def dpm_loop(net, x, labels, cfg, steps, scale):
    abar32 = alphas_cumprod(cfg)
    T = cfg["num_train_timesteps"]
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    sig = ((1 - abar32) / abar32) ** 0.5
    sig = np.interp(ts, np.arange(0, len(sig)), sig.numpy())
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)

    def a_s(s):
        alpha = 1.0 / (s * s + 1.0) ** 0.5
        return alpha, s * alpha

    def lam(s):
        alpha, sigma = a_s(s)
        return np.log(alpha) - np.log(sigma) if sigma > 0 else np.inf

    history = []
    lower = 0
    for i, t in enumerate(ts):
        mo = model_eps(net, x, t, labels, scale)
        alpha, sigma = a_s(sigmas[i])
        if cfg.get("prediction_type", "epsilon") == "v_prediction":
            m = threshold(alpha * x - sigma * mo, cfg)
        else:
            m = threshold((x - sigma * mo) / alpha, cfg)
        history = (history + [m])[-2:]
        last = i == len(ts) - 1  # final_sigmas_type zero: the last step is first order
        second_low = i == len(ts) - 2 and steps < 15
        alpha_t, sigma_t = a_s(sigmas[i + 1])
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        em1 = np.expm1(-h) if np.isfinite(h) else -1.0
        if lower < 1 or last:
            x = (sigma_t / sigma) * x - alpha_t * em1 * m
        else:
            m0, m1 = history[-1], history[-2]
            r0 = (lam(sigmas[i]) - lam(sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - m1)
            x = (sigma_t / sigma) * x - alpha_t * em1 * m0 - 0.5 * alpha_t * em1 * d1
        del second_low  # order 2: the lower-order-second rule changes nothing
        lower = min(lower + 1, 2)
    return x


def run_case(out, name, spec, weights, config, gen):
    params = {k: torch.from_numpy(v).double().requires_grad_(True) for k, v in weights.items()}
    net = TorchUNet(config, params, dtype=torch.float64)
    n = len(spec["labels"]) if spec["labels"] else spec["batch"]
    size = config["sample_size"]
    noise = torch.randn((n, 3, size, size), generator=gen)
    g = torch.randn((n, 3, size, size), generator=gen)
    labels = torch.tensor(spec["labels"]) if spec["labels"] else None
    x = noise.double().requires_grad_(True)
    loop = ddim_loop if spec["solver"] == "ddim" else dpm_loop
    sample = loop(net, x, labels, spec["sched"], spec["steps"], spec["scale"])
    loss = (sample * g.double()).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [x] + [params[k] for k in names])
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump(spec["sched"], f, indent=1)
    with open(os.path.join(folder, "case.json"), "w") as f:
        meta = {k: spec[k] for k in ("solver", "steps", "scale", "labels")}
        meta["model"] = "model_v" if spec["sched"].get("prediction_type") == "v_prediction" else "model"
        if labels is None:
            meta["model"] = "model_uncond"
        json.dump(meta, f, indent=1)
    np.save(os.path.join(folder, "noise.npy"), noise.numpy())
    np.save(os.path.join(folder, "grad_output.npy"), g.numpy())
    np.save(os.path.join(folder, "sample.npy"), sample.detach().float().numpy())
    np.save(os.path.join(folder, "grad_noise.npy"), grads[0].float().numpy())
    table = grads[1 + names.index("class_embedding.weight")] if labels is not None else None
    if table is not None:
        np.save(os.path.join(folder, "grad_class.npy"), table[labels].float().numpy())
    st.save(os.path.join(folder, "grad_params.safetensors"),
            {k: v.float().numpy() for k, v in zip(names, grads[1:])}, metadata={"format": "pt"})
    print("%-22s |sample| %.3f |grad_noise| %.3g |grad_class| %.3g" % (
        name, float(sample.abs().mean()), float(grads[0].norm()),
        float(table[labels].norm()) if table is not None else 0.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "fixtures", "adjoint"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    config = full_config(MODEL)
    weights = random_weights(config, seed=args.seed)
    write_model_dir(os.path.join(args.out, "model"), MODEL, weights)
    # the same weights declaring v-prediction (the engine holds a run to the model's own type)
    write_model_dir(os.path.join(args.out, "model_v"), MODEL, weights)
    path = os.path.join(args.out, "model_v", "config.json")
    cfg = dict(json.load(open(path)), prediction_type="v_prediction")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    # the same network without the class embedding, declaring v-prediction
    uconfig = full_config({k: v for k, v in MODEL.items() if k != "num_class_embeds"})
    uweights = {k: v for k, v in weights.items() if k != "class_embedding.weight"}
    write_model_dir(os.path.join(args.out, "model_uncond"),
                    {k: v for k, v in MODEL.items() if k != "num_class_embeds"}, uweights)
    path = os.path.join(args.out, "model_uncond", "config.json")
    cfg = dict(json.load(open(path)), prediction_type="v_prediction")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    gen = torch.Generator().manual_seed(args.seed)
    for name, spec in CASES.items():
        if spec["labels"] is None:
            run_case(args.out, name, spec, uweights, uconfig, gen)
        else:
            run_case(args.out, name, spec, weights, config, gen)


if __name__ == "__main__":
    main()
