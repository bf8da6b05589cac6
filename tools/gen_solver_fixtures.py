#!/usr/bin/env python3
"""Reference runs for tests/test_sampler.c: diffusers' own scheduler loops (PNDM, DPM-Solver
multistep/singlestep, UniPC, DEIS, Euler, Euler ancestral, Heun) on GaussianMixtureDenoiser
models, from stored initial noise (and, for the stochastic ones, stored per-step noise).

    /usr/bin/python3 tools/gen_solver_fixtures.py [--diffusers-src /tmp/diffusers-main/src] \\
        [--models tests/fixtures/gmm] [--out tests/fixtures/solvers] [--seed 1234] \\
        [--only NAME,...] [--cases cases.json]

Writes <out>/cases.json and <case>_{init,out[,noise]}.npy. --cases takes a JSON list of extra
cases ([name, model, solver, steps, options, labels]) instead of the built-in ones, and --seed
other noise: the C test runs any such directory listed in $DENOISED_SOLVER_FIXTURES. Needs
Debian's python3-torch and a diffusers source tree (newest; see tools/diffusers_sched.py).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_sched  # noqa: E402
from gen_sampler_fixtures import Gmm  # noqa: E402

# What the engine's short names stand for: (diffusers class, fixed options). Keep in step with
# engine/solver/sampler.c's names[].
ALIASES = {
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm-solver": ("DPMSolverMultistepScheduler",
                   {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2,
                        "use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler",
                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler",
                           {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                            "use_karras_sigmas": True}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2s-sde": ("DPMSolverSinglestepScheduler",
                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}

M, S = "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"
# name, model, solver (alias or class), steps, options, labels
CASES = [
    ("dpmpp2m_10", "mix3", "dpm++2m", 10, {}, None),
    ("dpmpp2m_heun_25", "mix3", M, 25, {"solver_type": "heun"}, None),
    ("dpmpp3m_20", "mix3", "dpm++3m", 20, {}, None),
    ("dpmpp3m_v_12", "mix3_v", "dpm++3m", 12, {}, None),
    ("dpmsolver3_15", "mix3", "dpm-solver", 15, {"solver_order": 3}, None),
    ("dpmsolver2_heun_sample_10", "mix3_sample", "dpm-solver", 10, {"solver_type": "heun"}, None),
    ("dpmpp2m_karras_20", "mix3", "dpm++2m-karras", 20, {}, None),
    ("dpmpp_lu_15", "mix3", M, 15, {"use_lu_lambdas": True}, None),
    ("dpmpp2m_trailing_sigmamin_12", "mix3", "dpm++2m", 12,
     {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, None),
    ("dpmpp2m_leading_offset_10", "mix3", "dpm++2m", 10,
     {"timestep_spacing": "leading", "steps_offset": 1}, None),
    ("dpmpp2m_cos_clip_cond_20", "cond4", "dpm++2m", 20, {"lambda_min_clipped": -5.1}, [1, 2]),
    ("dpmpp2m_threshold_15", "wide2", "dpm++2m", 15,
     {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, None),
    ("dpmpp3m_eulerfinal_8", "mix3", "dpm++3m", 8,
     {"euler_at_final": True, "lower_order_final": False}, None),
    ("dpmsolver_threshold_12", "wide2", "dpm-solver", 12,
     {"thresholding": True, "sample_max_value": 1.3}, None),
    ("dpmpp2m_zsnr_v_12", "mix3_v", "dpm++2m", 12,
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, None),
    ("dpmpp2s_10", "mix3", "dpm++2s", 10, {}, None),
    ("dpmpp3s_12", "mix3", S, 12, {"solver_order": 3}, None),
    ("dpms3_heun_v_15", "mix3_v", S, 15, {"solver_order": 3, "solver_type": "heun"}, None),
    ("dpms3_dpmsolver_9", "mix3", S, 9,
     {"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min",
      "lower_order_final": False}, None),
    ("dpms2_karras_14", "mix3", S, 14, {"use_karras_sigmas": True}, None),
    ("dpms2_dpmsolver_heun_sample_11", "mix3_sample", S, 11,
     {"algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
     None),
    ("unipc_10", "mix3", "unipc", 10, {}, None),
    ("unipc3_20", "mix3", "unipc", 20, {"solver_order": 3}, None),
    ("unipc_bh1_sigmamin_12", "mix3", "unipc", 12,
     {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, None),
    ("unipc3_noisepred_v_15", "mix3_v", "unipc", 15, {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}, None),
    ("unipc_karras_nocorr_14", "mix3", "unipc", 14,
     {"use_karras_sigmas": True, "disable_corrector": [0, 3]}, None),
    ("unipc_trailing_sample_9", "mix3_sample", "unipc", 9, {"timestep_spacing": "trailing"}, None),
    ("unipc_threshold_10", "wide2", "unipc", 10, {"thresholding": True, "sample_max_value": 1.4},
     None),
    ("unipc3_cond_12", "cond4", "unipc", 12, {"solver_order": 3}, [0, 1]),
    ("deis_10", "mix3", "deis", 10, {}, None),
    ("deis3_20", "mix3", "deis", 20, {"solver_order": 3}, None),
    ("deis3_v_karras_16", "mix3_v", "deis", 16, {"solver_order": 3, "use_karras_sigmas": True}, None),
    ("deis_leading_sample_12", "mix3_sample", "deis", 12, {"timestep_spacing": "leading"}, None),
    ("euler_10", "mix3", "euler", 10, {}, None),
    ("euler_7", "mix3", "euler", 7, {}, None),
    ("euler_karras_v_15", "mix3_v", "euler", 15, {"use_karras_sigmas": True}, None),
    ("euler_leading_sample_12", "mix3_sample", "euler", 12,
     {"timestep_spacing": "leading", "steps_offset": 1}, None),
    ("euler_trailing_sigmamin_9", "mix3", "euler", 9,
     {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, None),
    ("euler_karras_range_11", "mix3", "euler", 11,
     {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 50.0}, None),
    ("euler_zsnr_v_10", "mix3_v", "euler", 10,
     {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, None),
    ("heun_10", "mix3", "heun", 10, {}, None),
    ("heun_karras_v_8", "mix3_v", "heun", 8, {"use_karras_sigmas": True}, None),
    ("heun_leading_clip_sample_9", "mix3_sample", "heun", 9,
     {"timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 0.8}, None),
    ("heun_cond_6", "cond4", "heun", 6, {}, [2, 0]),
    ("pndm_10", "mix3", "pndm", 10, {}, None),
    ("pndm_v_20", "mix3_v", "pndm", 20, {}, None),
    ("pndm_trailing_8", "mix3", "pndm", 8, {"timestep_spacing": "trailing"}, None),
    ("plms_15", "mix3", "plms", 15, {}, None),
    ("plms_linspace_alpha1_12", "mix3", "plms", 12,
     {"timestep_spacing": "linspace", "set_alpha_to_one": True}, None),
    ("plms_1", "mix3", "plms", 1, {}, None),
    ("pndm_cond_6", "cond4", "pndm", 6, {}, [1, 1]),
    # stochastic: the noise each step draws is stored and handed to the engine
    ("dpmpp2m_sde_10", "mix3", "dpm++2m-sde", 10, {}, None),
    ("dpmpp2m_sde_heun_v_8", "mix3_v", "dpm++2m-sde", 8, {"solver_type": "heun"}, None),
    ("sde_dpmsolver_8", "mix3", M, 8,
     {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, None),
    ("dpmpp3m_sde_10", "mix3", M, 10, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
     None),
    ("dpmpp2s_sde_8", "mix3", "dpm++2s-sde", 8, {}, None),
    ("euler_a_10", "mix3", "euler-a", 10, {}, None),
    ("euler_a_v_leading_8", "mix3_v", "euler-a", 8, {"timestep_spacing": "leading"}, None),
]
BATCH = 2


def abar_at(abar, t):
    """alpha_bar at a fractional timestep the way the engine's GaussianMixtureDenoiser reads
    it: log sigma_VE interpolated linearly (the inverse of diffusers' _sigma_to_t)."""
    last = len(abar) - 1
    if t <= 0:
        return abar[0]
    if t >= last:
        return abar[last]
    lo = int(math.floor(t))
    w = t - lo
    if w == 0:
        return abar[lo]
    ls = lambda a: 0.5 * (math.log1p(-a) - math.log(a))  # noqa: E731
    v = (1 - w) * ls(abar[lo]) + w * ls(abar[lo + 1])
    if math.isinf(v):
        return 0.0
    return 1.0 / (1.0 + math.exp(2 * v))


def resolve(ns, solver):
    if solver in ALIASES:
        cls, fixed = ALIASES[solver]
        return getattr(ns, cls), dict(fixed)
    return getattr(ns, solver), {}


def run_case(ns, models, case, rng):
    import torch

    name, model, solver, steps, options, labels = case
    mdir = os.path.join(models, model)
    with open(os.path.join(mdir, "scheduler_config.json")) as f:
        sconf = json.load(f)
    cls, kw = resolve(ns, solver)
    kw.update(options)
    sched = cls.from_config(sconf, **kw)
    sched.set_timesteps(steps)
    # the model's own schedule (what the GaussianMixtureDenoiser is built on)
    mcls = getattr(ns, sconf.get("_class_name", "DDPMScheduler"), ns.DDPMScheduler)
    model_abar = mcls.from_config(sconf).alphas_cumprod.numpy().astype(np.float64)
    gmm = Gmm(mdir)
    shape = (BATCH, gmm.config["in_channels"], gmm.config["sample_size"],
             gmm.config["sample_size"])
    init = rng.standard_normal(shape).astype(np.float32)
    ts = list(sched.timesteps)
    stochastic = (getattr(sched.config, "algorithm_type", "").startswith("sde")
                  or cls.__name__ == "EulerAncestralDiscreteScheduler")
    noise = rng.standard_normal((len(ts),) + shape).astype(np.float32) if stochastic else None
    mod = sys.modules[cls.__module__]
    orig = getattr(mod, "randn_tensor", None)
    cur = {"i": 0}
    if stochastic:
        mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise[cur["i"]].copy())
    try:
        x = torch.from_numpy(init.copy()) * sched.init_noise_sigma
        for i, t in enumerate(ts):
            cur["i"] = i
            xin = sched.scale_model_input(x, t)
            tf = float(t)
            a = np.full(BATCH, abar_at(model_abar, float(np.float32(tf))))
            mo = gmm(xin.numpy().astype(np.float64), a, labels)
            mo = torch.from_numpy(mo.astype(np.float32))
            extra = {}
            if stochastic and cls.__name__ == "DPMSolverMultistepScheduler":
                extra["variance_noise"] = torch.from_numpy(noise[i].copy())
            x = sched.step(mo, t, x, **extra).prev_sample
    finally:
        if orig is not None:
            mod.randn_tensor = orig
    out = x.numpy()
    if not np.all(np.isfinite(out)):
        raise RuntimeError("%s: diffusers returned non-finite values" % name)
    return init, noise, out, [float(t) for t in ts]


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-src", default=None)
    ap.add_argument("--models", default=os.path.join(here, "tests", "fixtures", "gmm"))
    ap.add_argument("--out", default=os.path.join(here, "tests", "fixtures", "solvers"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--cases", default=None, help="JSON file with a list of cases")
    args = ap.parse_args()
    ns = diffusers_sched.load(args.diffusers_src)
    cases = CASES
    if args.cases:
        with open(args.cases) as f:
            cases = [tuple(c) for c in json.load(f)]
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c[0] in keep]
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.RandomState(args.seed)
    index = {"diffusers_version": ns.version, "batch": BATCH, "models": os.path.relpath(args.models, here)
             if args.models.startswith(here) else args.models, "cases": []}
    for case in cases:
        name, model, solver, steps, options, labels = case
        init, noise, out, ts = run_case(ns, args.models, case, rng)
        np.save(os.path.join(args.out, name + "_init.npy"), init)
        if noise is not None:
            np.save(os.path.join(args.out, name + "_noise.npy"), noise)
        np.save(os.path.join(args.out, name + "_out.npy"), out.astype(np.float32))
        index["cases"].append({"name": name, "model": model, "solver": solver, "steps": steps,
                               "options": options, "labels": labels,
                               "stochastic": noise is not None, "timesteps": ts})
        print("%-34s %-28s %3d steps %3d NFE  out rms %.4f" % (
            name, solver, steps, len(ts), float(np.sqrt((out ** 2).mean()))))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
