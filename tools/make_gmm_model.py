#!/usr/bin/env python3
"""Write the small GaussianMixtureDenoiser model directories the tests load.

    python3 tools/make_gmm_model.py [--out tests/fixtures/gmm]

Each <out>/<name>/ holds config.json, diffusion_pytorch_model.safetensors (means F32 [K,C,S,S],
log_weights F32 [K], stds F32 [K], labels I64 [K] when class-conditional) and
scheduler_config.json.  Everything is drawn from fixed numpy seeds, so rerunning the script
reproduces the committed files byte for byte.  Needs numpy only.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

# An old hub-style DDPM config (like google/ddpm-cifar10-32's): DDIM sampling must read its
# beta schedule and take its own defaults for the keys the file does not have.
OLD_DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def smooth_means(rng, k, c, s, amp):
    """Component means that look a little like images: low-frequency patterns in [-amp, amp]."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s), indexing="ij")
    out = np.zeros((k, c, s, s))
    for i in range(k):
        for ch in range(c):
            fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
            out[i, ch] = np.sin(fx * np.pi * xx + ph) * np.cos(fy * np.pi * yy)
    return (amp * out).astype(np.float32)


def write_model(root, name, config, tensors, scheduler):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    cfg = {"_class_name": "GaussianMixtureDenoiser"}
    cfg.update(config)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(d, "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2, sort_keys=True)
        f.write("\n")
    st.save(os.path.join(d, "diffusion_pytorch_model.safetensors"), tensors)
    print("wrote", d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(here, "tests", "fixtures", "gmm"))
    args = ap.parse_args()

    # mix3: three components of different widths, unconditional, eps output.
    rng = np.random.RandomState(20240601)
    k, c, s = 3, 3, 8
    mix3 = {
        "means": smooth_means(rng, k, c, s, 0.7),
        "log_weights": np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32),
        "stds": np.array([0.30, 0.45, 0.20], dtype=np.float32),
    }
    base = {"sample_size": s, "in_channels": c, "num_class_embeds": None}
    write_model(args.out, "mix3", dict(base, prediction_type="epsilon"), mix3, OLD_DDPM_SCHEDULER)
    # The same mixture answering in v and x0, to drive the solvers' other prediction types.
    write_model(args.out, "mix3_v", dict(base, prediction_type="v_prediction"), mix3,
                dict(OLD_DDPM_SCHEDULER, prediction_type="v_prediction"))
    write_model(args.out, "mix3_sample", dict(base, prediction_type="sample"), mix3,
                dict(OLD_DDPM_SCHEDULER, prediction_type="sample"))

    # cond4: four components over three classes (class 1 has two), cosine schedule.
    rng = np.random.RandomState(20240602)
    k = 4
    cond4 = {
        "means": smooth_means(rng, k, c, s, 0.6),
        "log_weights": np.array([0.0, 0.4, -0.3, 0.1], dtype=np.float32),
        "stds": np.array([0.25, 0.35, 0.30, 0.40], dtype=np.float32),
        "labels": np.array([0, 1, 1, 2], dtype=np.int64),
    }
    write_model(args.out, "cond4",
                {"sample_size": s, "in_channels": c, "num_class_embeds": 3,
                 "prediction_type": "epsilon"},
                cond4,
                {"_class_name": "DDIMScheduler", "_diffusers_version": "0.21.0",
                 "beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
                 "num_train_timesteps": 1000, "set_alpha_to_one": True, "steps_offset": 0,
                 "prediction_type": "epsilon", "timestep_spacing": "leading"})

    # The same class-conditional mixture answering in v and x0, for guidance of those outputs.
    for pred, suffix in (("v_prediction", "_v"), ("sample", "_sample")):
        write_model(args.out, "cond4" + suffix,
                    {"sample_size": s, "in_channels": c, "num_class_embeds": 3,
                     "prediction_type": pred},
                    cond4,
                    {"_class_name": "DDIMScheduler", "_diffusers_version": "0.21.0",
                     "beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
                     "num_train_timesteps": 1000, "set_alpha_to_one": True, "steps_offset": 0,
                     "prediction_type": pred, "timestep_spacing": "leading"})

    # wide2: two components reaching past [-1, 1], so that dynamic thresholding really rescales.
    rng = np.random.RandomState(20240604)
    wide2 = {
        "means": smooth_means(rng, 2, c, s, 1.6),
        "log_weights": np.log(np.array([0.6, 0.4])).astype(np.float32),
        "stds": np.array([0.3, 0.4], dtype=np.float32),
    }
    write_model(args.out, "wide2", dict(base, prediction_type="epsilon"), wide2,
                dict(OLD_DDPM_SCHEDULER, clip_sample=False))

    # gauss1: one Gaussian N(mu, 0.5^2 I), no clipping: its samples must have mean mu and
    # variance 0.25, which the statistical sampler tests check.
    rng = np.random.RandomState(20240603)
    gauss1 = {
        "means": smooth_means(rng, 1, c, s, 0.4),
        "log_weights": np.zeros(1, dtype=np.float32),
        "stds": np.array([0.5], dtype=np.float32),
    }
    write_model(args.out, "gauss1", dict(base, prediction_type="epsilon"), gauss1,
                dict(OLD_DDPM_SCHEDULER, clip_sample=False))


if __name__ == "__main__":
    main()
