#!/usr/bin/env python3
"""Dump diffusers' noise schedules, set_timesteps() results and from_config() defaults as the
reference values tests/test_schedule.c compares engine/noise/schedule.c with.

    /usr/bin/python3 tools/gen_sched_fixtures.py [--diffusers-src /tmp/diffusers-0.21/src] \
        [--out tests/fixtures/sched]

Writes <out>/cases.json and one <case>_betas.npy / <case>_alphas_cumprod.npy (float32) per beta
schedule case.  Needs Debian's python3-torch and a diffusers source tree (tools/diffusers_env.py).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_env  # noqa: E402

# name -> (scheduler class, constructor kwargs). The kwargs double as the JSON config the C
# side builds its sched_config from.
SCHEDULE_CASES = [
    ("linear", "DDPMScheduler", {}),
    ("linear_37", "DDPMScheduler", {"num_train_timesteps": 37}),
    ("linear_4000", "DDIMScheduler",
     {"num_train_timesteps": 4000, "beta_start": 1e-5, "beta_end": 0.03}),
    ("scaled_linear", "DDIMScheduler",
     {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", "DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    ("zero_snr", "DDIMScheduler",
     {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "rescale_betas_zero_snr": True}),
    ("sigmoid", "DDPMScheduler", {"beta_schedule": "sigmoid"}),
    ("trained", "DDIMScheduler", None),  # trained_betas filled in below
]

STEP_COUNTS = [1, 3, 7, 10, 50, 61, 103, 250, 1000]


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-src", default=None)
    ap.add_argument("--out", default=os.path.join(here, "tests", "fixtures", "sched"))
    args = ap.parse_args()
    diffusers = diffusers_env.setup(args.diffusers_src)
    os.makedirs(args.out, exist_ok=True)

    out = {"diffusers_version": diffusers.__version__, "schedules": [], "timesteps": [],
           "from_config": []}

    rng = np.random.RandomState(7)
    trained = sorted(float(x) for x in rng.uniform(1e-4, 0.05, size=50))
    for name, cls_name, kwargs in SCHEDULE_CASES:
        if kwargs is None:
            kwargs = {"num_train_timesteps": 50, "trained_betas": trained}
        sched = getattr(diffusers, cls_name)(**kwargs)
        np.save(os.path.join(args.out, name + "_betas.npy"), sched.betas.numpy().astype(np.float32))
        np.save(os.path.join(args.out, name + "_alphas_cumprod.npy"),
                sched.alphas_cumprod.numpy().astype(np.float32))
        out["schedules"].append({"name": name, "scheduler": cls_name, "config": kwargs,
                                 # torch's vectorised sigmoid is not libm's: ulps may differ
                                 "exact": name != "sigmoid"})

    ts_cases = []
    for spacing in ("leading", "trailing", "linspace"):
        for n in STEP_COUNTS:
            ts_cases.append(("DDIMScheduler", {"timestep_spacing": spacing}, n))
    for n in (10, 50, 250):
        ts_cases.append(("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, n))
        ts_cases.append(("DDPMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, n))
    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 5, 36, 37):
            ts_cases.append(("DDPMScheduler",
                             {"num_train_timesteps": 37, "timestep_spacing": spacing}, n))
    for cls_name, kwargs, n in ts_cases:
        sched = getattr(diffusers, cls_name)(**kwargs)
        sched.set_timesteps(n)
        out["timesteps"].append({"scheduler": cls_name, "config": kwargs, "steps": n,
                                 "timesteps": [int(t) for t in sched.timesteps]})

    # How diffusers fills a scheduler from another one's config: the target's own defaults for
    # the keys the file lacks, the file's values for the keys both share.
    old_ddpm = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1",
                "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                "variance_type": "fixed_large"}
    sd_like = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0",
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    keys = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
            "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
            "sample_max_value", "variance_type"]
    for src in (old_ddpm, sd_like):
        for target in ("DDIMScheduler", "DDPMScheduler"):
            sched = getattr(diffusers, target).from_config(src)
            cfg = dict(sched.config)
            out["from_config"].append({"source": src, "scheduler": target,
                                       "expect": {k: cfg[k] for k in keys if k in cfg}})

    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(out, f, sort_keys=True)
        f.write("\n")
    print("wrote %s (%d schedules, %d timestep cases, %d from_config cases)"
          % (args.out, len(out["schedules"]), len(out["timesteps"]), len(out["from_config"])))


if __name__ == "__main__":
    main()
