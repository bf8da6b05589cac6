#!/usr/bin/env python3
"""Write models/shapes-gmm: the analytic demo model the README's run command samples from.

    python3 tools/make_demo_model.py [--out models/shapes-gmm]

A GaussianMixtureDenoiser over 32x32 RGB pictures of simple coloured shapes (disc, square,
ring, diamond, stripes, cross on a plain background), one mixture component per picture and
class, with a small spread so every sample is recognisably its shape. Needs numpy only;
rerunning reproduces the committed files byte for byte.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

SIZE = 32
SHAPES = ["disc", "square", "ring", "diamond", "stripes", "cross"]
# (foreground, background) colours in [0, 1]
COLOURS = [((0.95, 0.75, 0.1), (0.1, 0.15, 0.35)), ((0.85, 0.2, 0.2), (0.95, 0.92, 0.85)),
           ((0.2, 0.7, 0.4), (0.08, 0.08, 0.1)), ((0.3, 0.5, 0.95), (0.98, 0.97, 0.9))]


def mask(shape):
    yy, xx = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5, indexing="ij")
    cy = cx = SIZE / 2
    r = np.hypot(yy - cy, xx - cx)
    if shape == "disc":
        return r < 10
    if shape == "square":
        return (abs(yy - cy) < 9) & (abs(xx - cx) < 9)
    if shape == "ring":
        return (r < 12) & (r > 7)
    if shape == "diamond":
        return abs(yy - cy) + abs(xx - cx) < 12
    if shape == "stripes":
        return (xx // 4) % 2 == 0
    if shape == "cross":
        return (abs(yy - cy) < 3) | (abs(xx - cx) < 3)
    raise ValueError(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "shapes-gmm"))
    args = ap.parse_args()
    means, labels = [], []
    for ci, shape in enumerate(SHAPES):
        m = mask(shape).astype(np.float64)
        for fg, bg in COLOURS:
            img = np.stack([m * f + (1 - m) * b for f, b in zip(fg, bg)])
            means.append(img * 2 - 1)  # pixel range [-1, 1], as diffusers models use
            labels.append(ci)
    k = len(means)
    tensors = {
        "means": np.asarray(means, dtype=np.float32),
        "log_weights": np.zeros(k, dtype=np.float32),
        "stds": np.full(k, 0.04, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }
    os.makedirs(args.out, exist_ok=True)
    config = {"_class_name": "GaussianMixtureDenoiser", "sample_size": SIZE, "in_channels": 3,
              "prediction_type": "epsilon", "num_class_embeds": len(SHAPES),
              "_class_labels": SHAPES}
    sched = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "num_train_timesteps": 1000, "clip_sample": True,
             "prediction_type": "epsilon", "variance_type": "fixed_small"}
    for name, obj in (("config.json", config), ("scheduler_config.json", sched)):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    st.save(os.path.join(args.out, "diffusion_pytorch_model.safetensors"), tensors)
    print("wrote", args.out, "components", k)


if __name__ == "__main__":
    main()
