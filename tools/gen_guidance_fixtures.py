#!/usr/bin/env python3
"""Reference runs for tests/test_guidance.c: diffusers' pipeline loops for classifier-free
guidance, img2img (SDEdit, `strength`) and inpainting (the 4-channel branch of the inpainting
pipeline) on the class-conditional GaussianMixtureDenoiser models, with diffusers' own
scheduler code (tools/diffusers_sched.py) from stored noise.

    /usr/bin/python3 tools/gen_guidance_fixtures.py [--diffusers-src /tmp/diffusers-main/src] \\
        [--models tests/fixtures/gmm] [--out tests/fixtures/guidance] [--seed 4321]

The guided loop is the one every diffusers pipeline writes out:
    out = model(cat([x, x]), t, cat([labels, null]))
    model_output = uncond + g * (cond - uncond)
    x = scheduler.step(model_output, t, x).prev_sample
with g > 1 (g = 1 is the conditional model alone). The analytic model's null class is a negative
label: the whole mixture. img2img follows StableDiffusionImg2ImgPipeline (get_timesteps,
set_begin_index, add_noise at the first kept timestep); inpainting follows
StableDiffusionInpaintPipeline for models without mask channels (the known region re-noised with
the same noise to timesteps[i + 1] after each step, clean after the last; pure noise times
init_noise_sigma at strength 1). Mask: 1 = generate, 0 = keep.

Writes <out>/cases.json and <case>_{init,out[,noise,image,mask]}.npy; for stochastic solvers
the noise of every evaluation, indexed by the evaluation's position in the full schedule.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_sched  # noqa: E402
from gen_sampler_fixtures import Gmm  # noqa: E402
from gen_solver_fixtures import abar_at, resolve  # noqa: E402

M = "DPMSolverMultistepScheduler"
# name, model, solver, steps, options, labels, guidance, strength (None: plain), mask (bool)
CASES = [
    ("ddim20_g3", "cond4", "ddim", 20, {}, [1, 2], 3.0, None, False),
    ("ddim20_g7_5_v", "cond4_v", "ddim", 20, {}, [0, 2], 7.5, None, False),
    ("ddim15_g4_sample", "cond4_sample", "ddim", 15, {}, [2, 1], 4.0, None, False),
    ("ddim10_g1", "cond4", "ddim", 10, {}, [1, 0], 1.0, None, False),
    ("ddpm25_g3", "cond4", "ddpm", 25, {}, [0, 1], 3.0, None, False),
    ("dpmpp2m_15_g5", "cond4", "dpm++2m", 15, {}, [1, 2], 5.0, None, False),
    ("dpmpp2m_20_g8_thresh", "cond4", "dpm++2m", 20, {"thresholding": True}, [1, 2], 8.0,
     None, False),
    ("dpmpp3m_12_g3_v", "cond4_v", "dpm++3m", 12, {}, [2, 0], 3.0, None, False),
    ("dpmpp2s_10_g2", "cond4", "dpm++2s", 10, {}, [0, 1], 2.0, None, False),
    ("dpmpp2m_sde_10_g3", "cond4", "dpm++2m-sde", 10, {}, [1, 1], 3.0, None, False),
    ("unipc_10_g4", "cond4", "unipc", 10, {}, [2, 2], 4.0, None, False),
    ("deis_12_g3", "cond4", "deis", 12, {}, [0, 2], 3.0, None, False),
    ("euler_12_g5", "cond4", "euler", 12, {}, [1, 0], 5.0, None, False),
    ("euler_a_10_g3", "cond4", "euler-a", 10, {}, [2, 1], 3.0, None, False),
    ("heun_8_g3_sample", "cond4_sample", "heun", 8, {}, [0, 1], 3.0, None, False),
    ("pndm_10_g3", "cond4", "pndm", 10, {}, [1, 2], 3.0, None, False),
    ("plms_12_g6", "cond4", "plms", 12, {}, [2, 0], 6.0, None, False),
    # img2img
    ("i2i_ddim20_s06", "cond4", "ddim", 20, {}, [1, 2], 1.0, 0.6, False),
    ("i2i_ddim20_s1_g3", "cond4", "ddim", 20, {}, [0, 2], 3.0, 1.0, False),
    ("i2i_ddpm20_s05", "cond4", "ddpm", 20, {}, [1, 0], 1.0, 0.5, False),
    ("i2i_dpmpp2m_15_s05_g3", "cond4", "dpm++2m", 15, {}, [2, 1], 3.0, 0.5, False),
    ("i2i_euler_12_s07", "cond4", "euler", 12, {}, [1, 1], 1.0, 0.7, False),
    ("i2i_heun_8_s05", "cond4", "heun", 8, {}, [0, 2], 1.0, 0.5, False),
    ("i2i_unipc_10_s08_v", "cond4_v", "unipc", 10, {}, [2, 0], 2.0, 0.8, False),
    ("i2i_euler_a_10_s06", "cond4", "euler-a", 10, {}, [1, 2], 1.0, 0.6, False),
    # inpainting
    ("inp_ddim20_s1", "cond4", "ddim", 20, {}, [1, 2], 1.0, 1.0, True),
    ("inp_ddim20_s1_g3", "cond4", "ddim", 20, {}, [2, 0], 3.0, 1.0, True),
    ("inp_dpmpp2m_15_s075", "cond4", "dpm++2m", 15, {}, [0, 1], 1.0, 0.75, True),
    ("inp_euler_10_s1", "cond4", "euler", 10, {}, [1, 0], 1.0, 1.0, True),
    ("inp_heun_6_s1_g2", "cond4", "heun", 6, {}, [2, 2], 2.0, 1.0, True),
    ("inp_ddpm16_s08", "cond4", "ddpm", 16, {}, [0, 2], 1.0, 0.8, True),
]
BATCH = 2


def is_stochastic(sched):
    name = type(sched).__name__
    return (name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
            or str(getattr(sched.config, "algorithm_type", "")).startswith("sde"))


def run_case(ns, models, case, rng):
    import torch

    name, model, solver, steps, options, labels, g, strength, masked = case
    mdir = os.path.join(models, model)
    with open(os.path.join(mdir, "scheduler_config.json")) as f:
        sconf = json.load(f)
    if solver in ("ddim", "ddpm"):
        cls, kw = getattr(ns, {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}[solver]), {}
    else:
        cls, kw = resolve(ns, solver)
    kw.update(options)
    sched = cls.from_config(sconf, **kw)
    sched.set_timesteps(steps)
    mcls = getattr(ns, sconf.get("_class_name", "DDPMScheduler"), ns.DDPMScheduler)
    model_abar = mcls.from_config(sconf).alphas_cumprod.numpy().astype(np.float64)
    gmm = Gmm(mdir)
    c, s = gmm.config["in_channels"], gmm.config["sample_size"]
    shape = (BATCH, c, s, s)
    init = rng.standard_normal(shape).astype(np.float32)
    all_ts = list(sched.timesteps)
    order = getattr(sched, "order", 1)
    image = mask = None
    first = 0
    if strength is not None:
        # an "image": a component mean of another class plus texture, clipped to [-1, 1]
        means = gmm.means.reshape((-1,) + shape[1:])
        image = np.clip(means[[3, 0]] + 0.3 * rng.standard_normal(shape), -1, 1).astype(np.float32)
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        first = t_start * order
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)
    ts = all_ts[first:]
    if masked:
        yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
        m0 = ((yy >= 2) & (yy < 6) & (xx >= 1) & (xx < 5)).astype(np.float32)
        m1 = (xx >= s // 2).astype(np.float32)
        mask = np.stack([m0, m1])
    stochastic = is_stochastic(sched)
    noise = np.zeros((len(all_ts),) + shape, np.float32) if stochastic else None
    if stochastic:
        noise[first:] = rng.standard_normal((len(ts),) + shape).astype(np.float32)
    mod = sys.modules[cls.__module__]
    orig = getattr(mod, "randn_tensor", None)
    cur = {"i": 0}
    if stochastic:
        mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise[cur["i"]].copy())
    nz = torch.from_numpy(init.copy())
    try:
        if image is None:
            x = nz * sched.init_noise_sigma
        elif masked and strength == 1.0:
            x = nz * sched.init_noise_sigma
        else:
            x = sched.add_noise(torch.from_numpy(image), nz, torch.tensor(ts[:1]))
        for i, t in enumerate(ts):
            cur["i"] = first + i
            xin = sched.scale_model_input(x, t)
            a = np.full(BATCH, abar_at(model_abar, float(np.float32(float(t)))))
            xd = xin.numpy().astype(np.float64)
            cond = torch.from_numpy(gmm(xd, a, labels).astype(np.float32))
            if g > 1.0:
                uncond = torch.from_numpy(gmm(xd, a, [-1] * BATCH).astype(np.float32))
                mo = uncond + g * (cond - uncond)
            else:
                mo = cond
            extra = {}
            if stochastic and type(sched).__name__ == M:
                extra["variance_noise"] = torch.from_numpy(noise[first + i].copy())
            x = sched.step(mo, t, x, **extra).prev_sample
            if masked:
                proper = torch.from_numpy(image)
                if i < len(ts) - 1:
                    proper = sched.add_noise(proper, nz, torch.tensor([ts[i + 1]]))
                mk = torch.from_numpy(mask)[:, None]
                x = (1 - mk) * proper + mk * x
    finally:
        if orig is not None:
            mod.randn_tensor = orig
    out = x.numpy()
    if not np.all(np.isfinite(out)):
        raise RuntimeError("%s: diffusers returned non-finite values" % name)
    return init, noise, image, mask, out, len(ts)


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-src", default=None)
    ap.add_argument("--models", default=os.path.join(here, "tests", "fixtures", "gmm"))
    ap.add_argument("--out", default=os.path.join(here, "tests", "fixtures", "guidance"))
    ap.add_argument("--seed", type=int, default=4321)
    args = ap.parse_args()
    ns = diffusers_sched.load(args.diffusers_src)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.RandomState(args.seed)
    index = {"diffusers_version": ns.version, "batch": BATCH, "cases": []}
    for case in CASES:
        name, model, solver, steps, options, labels, g, strength, masked = case
        init, noise, image, mask, out, nev = run_case(ns, args.models, case, rng)
        np.save(os.path.join(args.out, name + "_init.npy"), init)
        np.save(os.path.join(args.out, name + "_out.npy"), out.astype(np.float32))
        for what, arr in (("noise", noise), ("image", image), ("mask", mask)):
            if arr is not None:
                np.save(os.path.join(args.out, "%s_%s.npy" % (name, what)), arr)
        index["cases"].append({"name": name, "model": model, "solver": solver, "steps": steps,
                               "options": options, "labels": labels, "guidance_scale": g,
                               "strength": strength, "mask": masked,
                               "stochastic": noise is not None, "evaluations": nev})
        print("%-26s %-12s %3d steps g=%-4g strength=%-4s mask=%d %3d evals  out rms %.4f" % (
            name, solver, steps, g, strength, masked, nev, float(np.sqrt((out ** 2).mean()))))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
