#!/usr/bin/python3
"""Where an icDPM's denoiser stands at each noise level (issue 18's diagnosis of the first
shipped icDPM): for training pairs noised at timestep t, the mean squared error of the x0 the
model implies, with its blurry image and with a zero image in its place, beside the blurry
image's own error. A model whose x0 error at high t is far above the blurry image's has not
learnt to read the conditioning there, and every solver starts from that x0.

    /usr/bin/python3 tools/deblur/x0_by_noise.py MODEL_DIR PAIRS/train [--n 64]

Runs tools/torch_unet.py's reference forward (float32) on the exported folder; the schedule
and prediction type come from its scheduler_config.json.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_unet import TorchUNet  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("pairs", help="a folder with sharp.npy and blurry.npy")
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    with open(os.path.join(a.model, "scheduler_config.json")) as f:
        sc = json.load(f)
    if sc.get("beta_schedule", "linear") != "linear":
        sys.exit("only the linear beta schedule is handled here")
    pred = sc.get("prediction_type", "epsilon")
    net = TorchUNet.from_dir(a.model, dtype=torch.float32)
    sharp = torch.tensor(np.load(os.path.join(a.pairs, "sharp.npy"))[:a.n])
    blurry = torch.tensor(np.load(os.path.join(a.pairs, "blurry.npy"))[:a.n])
    T = int(sc.get("num_train_timesteps", 1000))
    betas = torch.linspace(sc.get("beta_start", 1e-4), sc.get("beta_end", 0.02), T,
                           dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    print("prediction %s; blurry x0 MSE %.4f" % (pred, float(((blurry - sharp) ** 2).mean())))
    print("   t   x0 MSE  (zero cond)")
    for t in (10, 100, 300, 500, 700, 900, T - 1):
        z = torch.randn(sharp.shape, generator=g)
        ac = float(abar[t])
        xt = ac ** 0.5 * sharp + (1 - ac) ** 0.5 * z
        row = []
        for c in (blurry, torch.zeros_like(blurry)):
            with torch.no_grad():
                o = net(torch.cat([xt, c], 1), torch.full((a.n,), float(t)))
            if pred == "epsilon":
                x0 = (xt - (1 - ac) ** 0.5 * o) / ac ** 0.5
            elif pred == "v_prediction":
                x0 = ac ** 0.5 * xt - (1 - ac) ** 0.5 * o
            else:
                x0 = o
            row.append(float(((x0 - sharp) ** 2).mean()))
        print("%4d %8.4f  %8.4f" % (t, row[0], row[1]))


if __name__ == "__main__":
    main()
