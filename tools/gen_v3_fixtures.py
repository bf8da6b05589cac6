#!/usr/bin/env python3
"""Reference outputs for tests/test_v3.c: the DPM-Solver-v3 authors' own sampler
(thu-ml/DPM-Solver-v3 @ba16871, dpm_solver_v3.py, class DPM_Solver_v3) driven by the exact
GaussianMixtureDenoiser (tests/fixtures/gmm/mix3) on made-up, non-flat statistics written in our
statistics file format, from stored initial noise.

    git -C MIRROR show ba16871:dpm_solver_v3.py > /tmp/dpm_solver_v3.py
    /usr/bin/python3 tools/gen_v3_fixtures.py --authors /tmp/dpm_solver_v3.py \
        [--models tests/fixtures/gmm] [--out tests/fixtures/v3]

The authors' file is imported from where it lies (never copied into this repository); its
`.cuda()` calls are made no-ops so it runs on the CPU. Their sampler takes any noise-schedule
object: ours parametrizes time by t = exp(-lambda) (sigma_VE), so a float32 time (their code
rounds step times to float32) still carries lambda to ~1e-7 absolute, and uses the schedule's
lambda-to-timestep map only through the model call, which is the engine's (log sigma_VE linear
between training timesteps, i.e. abar = sigmoid(2 lambda)). Steps use skip_type logSNR, the one
spacing that does not depend on the time parametrization.

Writes <out>/stats.json + stats.npy (l, s, b [3, K+1, C, H, W]), <out>/cases.json and
<out>/<case>_{init,out}.npy. Needs Debian's python3-torch and python3-numpy.
"""
import argparse
import importlib.util
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

K = 40
LAM_T, LAM_0 = -math.log(64.0), math.log(64.0)  # exp(-lambda) exact in float32
BATCH = 2
# name, steps, order, p_pseudo, use_corrector, c_pseudo, lower_order_final
CASES = [
    ("o1_n5", 5, 1, False, False, False, True),
    ("o2_n8_corr", 8, 2, False, True, False, True),
    ("o2_n6_cpseudo", 6, 2, False, True, True, True),
    ("o3_n5_ppseudo_corr", 5, 3, True, True, False, True),
    ("o3_n8_corr", 8, 3, False, True, False, True),
    ("o3_n10_plain", 10, 3, False, False, False, False),
    ("o3_n8_all_pseudo", 8, 3, True, True, True, True),
]


class SigmaTimeVP:
    """VP schedule with time t = sigma_VE = exp(-lambda)."""

    T = float(math.exp(-LAM_T))
    total_N = 1000

    def marginal_lambda(self, t):
        return -torch.log(torch.as_tensor(t).to(torch.float64))

    def marginal_log_mean_coeff(self, t):
        lam = self.marginal_lambda(t)
        return -0.5 * torch.log1p(torch.exp(-2 * lam))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t) - self.marginal_lambda(t))

    def inverse_lambda(self, lamb):
        return torch.exp(-torch.as_tensor(lamb).to(torch.float64))


class Gmm:
    """Exact noise prediction of the mixture sum_k w_k N(mu_k, s_k^2 I), float64."""

    def __init__(self, model_dir):
        t = st.load(os.path.join(model_dir, "diffusion_pytorch_model.safetensors"))
        self.means = t["means"].astype(np.float64).reshape(t["means"].shape[0], -1)
        lw = t["log_weights"].astype(np.float64)
        self.log_w = lw - lw.max() - np.log(np.exp(lw - lw.max()).sum())
        self.var = t["stds"].astype(np.float64) ** 2

    def eps(self, x, abar):
        shape = x.shape
        x = x.reshape(shape[0], -1)
        d = x.shape[1]
        out = np.empty_like(x)
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        for b in range(shape[0]):
            v = a * a * self.var + s * s
            diff = x[b][None, :] - a * self.means
            logp = self.log_w - 0.5 * d * np.log(v) - 0.5 * (diff ** 2).sum(1) / v
            r = np.exp(logp - logp.max())
            r /= r.sum()
            ex0 = (r[:, None] * (self.means + (a * self.var / v)[:, None] * diff)).sum(0)
            out[b] = (x[b] - a * ex0) / s
        return out.reshape(shape)


def make_stats(shape):
    """Smooth, non-flat l, s, b per dimension (float32): l near 1, s and b of order 0.1-0.3."""
    C, H, W = shape
    lam = np.linspace(LAM_T, LAM_0, K + 1)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    h = np.arange(H)[None, None, :, None]
    w = np.arange(W)[None, None, None, :]
    ph = 0.7 * c + 0.3 * h - 0.2 * w
    l = 1 + 0.3 * np.sin(0.5 * lam + ph) - 0.1 * np.tanh(lam)
    s = 0.2 * np.cos(0.4 * lam - ph) + 0.05 * lam / 4
    b = 0.1 * np.sin(0.3 * lam * (1 + 0.1 * c) + 0.5 * h) * np.cos(0.2 * w)
    return np.stack([l, s, b]).astype(np.float32)


def import_authors(path, name):
    """The authors' module from where it lies, with `.cuda()` a no-op so it runs on the CPU."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mix3(models):
    """The mixture model's folder and its sample shape (C, H, W)."""
    mdir = os.path.join(models, "mix3")
    with open(os.path.join(mdir, "config.json")) as f:
        conf = json.load(f)
    return mdir, (conf["in_channels"], conf["sample_size"], conf["sample_size"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--authors", required=True, help="path of the authors' dpm_solver_v3.py")
    ap.add_argument("--models", default="tests/fixtures/gmm")
    ap.add_argument("--out", default="tests/fixtures/v3")
    args = ap.parse_args()
    v3 = import_authors(args.authors, "authors_v3")
    mdir, shape = mix3(args.models)
    os.makedirs(args.out, exist_ok=True)
    stats = make_stats(shape)
    np.save(os.path.join(args.out, "stats.npy"), stats)
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump({"format": "denoised-v3-stats", "version": 1, "lambda_T": LAM_T,
                   "lambda_0": LAM_0, "grid": K, "shape": list(shape), "arrays": "stats.npy"},
                  f, indent=1)
    # their loader reads l.npz / sb.npz from a directory
    sdir = os.path.join(args.out, "_authors_tmp")
    os.makedirs(sdir, exist_ok=True)
    np.savez(os.path.join(sdir, "l.npz"), l=stats[0])
    np.savez(os.path.join(sdir, "sb.npz"), s=stats[1], b=stats[2])

    gmm = Gmm(mdir)
    ns = SigmaTimeVP()

    def model_fn(x, t):
        lam = -math.log(float(t[0]))
        abar = 1 / (1 + math.exp(-2 * lam))
        return torch.from_numpy(gmm.eps(x.numpy().astype(np.float64), abar))

    rng = np.random.default_rng(20261205)
    cases = []
    for name, steps, order, pp, corr, cp, lof in CASES:
        init = rng.standard_normal((BATCH,) + shape).astype(np.float32)
        solver = v3.DPM_Solver_v3(sdir, ns, steps=steps, t_start=math.exp(-LAM_T),
                                  t_end=math.exp(-LAM_0), skip_type="logSNR", device="cpu")
        x = solver.sample(torch.from_numpy(init.astype(np.float64)), model_fn, order=order,
                          p_pseudo=pp, use_corrector=corr, c_pseudo=cp, lower_order_final=lof)
        np.save(os.path.join(args.out, name + "_init.npy"), init)
        np.save(os.path.join(args.out, name + "_out.npy"), x.numpy().astype(np.float32))
        cases.append({"name": name, "steps": steps, "options": {
            "solver_order": order, "predictor_pseudo": pp, "use_corrector": corr,
            "corrector_pseudo": cp, "lower_order_final": lof, "skip_type": "logSNR"}})
    for f in ("l.npz", "sb.npz"):
        os.remove(os.path.join(sdir, f))
    os.rmdir(sdir)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"model": "gmm/mix3", "stats": "stats.json", "batch": BATCH, "cases": cases},
                  f, indent=1)


if __name__ == "__main__":
    main()
