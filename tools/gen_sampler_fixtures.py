#!/usr/bin/env python3
"""Reference outputs for tests/test_sampler.c and tests/test_gmm.c: diffusers' DDIMScheduler and
DDPMScheduler loops driven by a numpy implementation of the GaussianMixtureDenoiser, from stored
initial (and per-step) noise, plus GMM evaluations at integer and fractional timesteps.

    /usr/bin/python3 tools/gen_sampler_fixtures.py [--diffusers-src /tmp/diffusers-0.21/src] \
        [--models tests/fixtures/gmm] [--out tests/fixtures/sampler]

Run tools/make_gmm_model.py first.  Writes <out>/cases.json, <case>_{init,noise,out}.npy and
gmm_eval_{x,out}.npy.  Needs Debian's python3-torch and a diffusers source tree.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_env  # noqa: E402
import st  # noqa: E402

# name, model dir, solver, steps, overrides on the model's scheduler_config.json (eta included),
# labels (None: unconditional)
CASES = [
    ("ddim10_leading", "mix3", "ddim", 10, {}, None),
    ("ddim50_trailing", "mix3", "ddim", 50, {"timestep_spacing": "trailing"}, None),
    ("ddim25_linspace", "mix3", "ddim", 25,
     {"timestep_spacing": "linspace", "set_alpha_to_one": False}, None),
    ("ddim20_eta_threshold", "wide2", "ddim", 20,
     {"eta": 0.7, "thresholding": True, "sample_max_value": 1.5,
      "dynamic_thresholding_ratio": 0.9}, None),
    ("ddim12_v_trailing", "mix3_v", "ddim", 12, {"timestep_spacing": "trailing"}, None),
    ("ddim15_sample_offset", "mix3_sample", "ddim", 15,
     {"steps_offset": 1, "set_alpha_to_one": False}, None),
    ("ddim10_cond", "cond4", "ddim", 10, {}, [1, 2]),
    ("ddpm20_leading", "mix3", "ddpm", 20, {}, None),
    ("ddpm30_v_small_log", "mix3_v", "ddpm", 30,
     {"variance_type": "fixed_small_log", "clip_sample": False}, None),
    ("ddpm25_sample_large", "mix3_sample", "ddpm", 25, {"variance_type": "fixed_large"}, None),
    ("ddpm16_trailing", "mix3", "ddpm", 16, {"timestep_spacing": "trailing"}, None),
    ("ddpm25_threshold", "wide2", "ddpm", 25,
     {"thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.3}, None),
]
BATCH = 2


class Gmm:
    """Exact denoiser of sum_k w_k N(mu_k, s_k^2 I) under x_t = a x0 + s eps, in float64."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        t = st.load(os.path.join(model_dir, "diffusion_pytorch_model.safetensors"))
        self.means = t["means"].astype(np.float64).reshape(t["means"].shape[0], -1)
        lw = t["log_weights"].astype(np.float64)
        self.log_w = lw - lw.max() - np.log(np.exp(lw - lw.max()).sum())
        self.var = t["stds"].astype(np.float64) ** 2
        self.labels = t.get("labels")
        self.pred = self.config.get("prediction_type") or "epsilon"

    def __call__(self, x, abar, labels=None):
        """x [B, ...] float64, abar per image -> output [B, ...] float64."""
        shape = x.shape
        x = x.reshape(shape[0], -1)
        out = np.empty_like(x)
        d = x.shape[1]
        for b in range(x.shape[0]):
            a, s = np.sqrt(abar[b]), np.sqrt(1 - abar[b])
            v = a * a * self.var + s * s
            diff = x[b][None, :] - a * self.means
            logp = self.log_w - 0.5 * d * np.log(v) - 0.5 * (diff ** 2).sum(1) / v
            if labels is not None and labels[b] >= 0:
                logp = np.where(self.labels == labels[b], logp, -np.inf)
            r = np.exp(logp - logp.max())
            r /= r.sum()
            ex0 = (r[:, None] * (self.means + (a * self.var / v)[:, None] * diff)).sum(0)
            eps = (x[b] - a * ex0) / s
            out[b] = {"epsilon": eps, "sample": ex0, "v_prediction": a * eps - s * ex0}[self.pred]
        return out.reshape(shape)


def run_case(diffusers, models, name, model, solver, steps, overrides, labels, rng):
    import torch

    mdir = os.path.join(models, model)
    with open(os.path.join(mdir, "scheduler_config.json")) as f:
        sconf = json.load(f)
    kw = dict(overrides)
    eta = kw.pop("eta", 0.0)
    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[solver]
    sched = cls.from_config(sconf, **kw)
    sched.set_timesteps(steps)
    if solver == "ddpm":
        # Current diffusers steps DDPM to the next timestep of the schedule; 0.21 went to
        # t - T // n, which differs for trailing/linspace spacing. Follow current diffusers.
        ts_list = [int(t) for t in sched.timesteps]
        sched.previous_timestep = lambda t: (
            ts_list[ts_list.index(int(t)) + 1] if ts_list.index(int(t)) + 1 < len(ts_list) else -1)
    gmm = Gmm(mdir)
    abar = sched.alphas_cumprod.numpy().astype(np.float64)
    shape = (BATCH, gmm.config["in_channels"], gmm.config["sample_size"],
             gmm.config["sample_size"])
    init = rng.standard_normal(shape).astype(np.float32)
    stochastic = (solver == "ddpm") or eta > 0
    noise = rng.standard_normal((steps,) + shape).astype(np.float32) if stochastic else None

    # DDPMScheduler.step draws its noise through the module's randn_tensor; hand it ours.
    ddpm_mod = sys.modules[diffusers.DDPMScheduler.__module__]
    orig_randn = ddpm_mod.randn_tensor
    cur = {"i": 0}
    ddpm_mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise[cur["i"]].copy())
    try:
        x = torch.from_numpy(init.copy())
        for i, t in enumerate(sched.timesteps):
            cur["i"] = i
            mo = gmm(x.numpy().astype(np.float64), np.full(BATCH, abar[int(t)]), labels)
            mo = torch.from_numpy(mo.astype(np.float32))
            if solver == "ddim":
                extra = {"variance_noise": torch.from_numpy(noise[i].copy())} if eta > 0 else {}
                x = sched.step(mo, t, x, eta=eta, **extra).prev_sample
            else:
                x = sched.step(mo, t, x).prev_sample
    finally:
        ddpm_mod.randn_tensor = orig_randn
    return init, noise, x.numpy(), [int(t) for t in sched.timesteps]


def gmm_eval_cases(diffusers, models, out_dir, rng):
    """Evaluations at integer timesteps and at fractional ones obtained from chosen sigmas
    through diffusers' own sigma -> t map (EulerDiscreteScheduler._sigma_to_t)."""
    cases = []
    xs, outs = [], []
    for model in ("mix3", "mix3_v", "mix3_sample", "cond4"):
        mdir = os.path.join(models, model)
        with open(os.path.join(mdir, "scheduler_config.json")) as f:
            sched = diffusers.DDIMScheduler.from_config(json.load(f))
        abar = sched.alphas_cumprod.numpy().astype(np.float64)
        log_sigmas = np.log(np.sqrt((1 - abar) / abar))
        gmm = Gmm(mdir)
        shape = (gmm.config["in_channels"], gmm.config["sample_size"], gmm.config["sample_size"])
        for t in (0, 1, 250, 999):
            cases.append({"model": model, "t": float(t), "abar": float(abar[t])})
        for sigma in (0.05, 0.7, 3.0, 40.0):
            t = float(diffusers.EulerDiscreteScheduler._sigma_to_t(None, np.array(sigma),
                                                                     log_sigmas))
            cases.append({"model": model, "t": t, "abar": 1.0 / (1.0 + sigma * sigma)})
        for c in cases[-8:]:
            label = None
            if gmm.labels is not None:
                label = int(rng.randint(-1, 3))
                c["label"] = label
            a = c["abar"]
            x0 = gmm.means[rng.randint(len(gmm.means))].reshape(shape)
            x = (np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal(shape)).astype(np.float32)
            y = gmm(x[None].astype(np.float64), np.array([a]),
                    None if label is None else [label])[0]
            xs.append(x)
            outs.append(y.astype(np.float32))
    np.save(os.path.join(out_dir, "gmm_eval_x.npy"), np.stack(xs))
    np.save(os.path.join(out_dir, "gmm_eval_out.npy"), np.stack(outs))
    return cases


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-src", default=None)
    ap.add_argument("--models", default=os.path.join(here, "tests", "fixtures", "gmm"))
    ap.add_argument("--out", default=os.path.join(here, "tests", "fixtures", "sampler"))
    args = ap.parse_args()
    diffusers = diffusers_env.setup(args.diffusers_src)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.RandomState(1234)
    index = {"diffusers_version": diffusers.__version__, "batch": BATCH, "cases": []}
    for name, model, solver, steps, overrides, labels in CASES:
        init, noise, out, ts = run_case(diffusers, args.models, name, model, solver, steps,
                                        overrides, labels, rng)
        np.save(os.path.join(args.out, name + "_init.npy"), init)
        if noise is not None:
            np.save(os.path.join(args.out, name + "_noise.npy"), noise)
        np.save(os.path.join(args.out, name + "_out.npy"), out.astype(np.float32))
        index["cases"].append({"name": name, "model": model, "solver": solver, "steps": steps,
                               "overrides": overrides, "labels": labels,
                               "stochastic": noise is not None, "timesteps": ts})
        print("%-32s %s %3d steps  out rms %.4f" % (name, solver, steps,
                                                     float(np.sqrt((out ** 2).mean()))))
    index["gmm_eval"] = gmm_eval_cases(diffusers, args.models, args.out, rng)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
