#!/usr/bin/python3
"""torch.optim.AdamW reference for engine/train/optim.c (tests/test_optim.c reads it).

    /usr/bin/python3 tools/gen_optim_fixtures.py [--out tests/fixtures/optim] [--seed 1]

Two float32 tensors (7 and 3x4 values), STEPS steps of torch.optim.AdamW (single-tensor path,
foreach=False) with a different random gradient and learning rate each step. Files:
  p<i>.init.npy  initial values      g<i>.npy  [STEPS, ...] gradients
  p<i>.final.npy values after STEPS  lr.npy    [STEPS] learning rates
  adamw.json     betas, eps, weight_decay, steps, torch version
Needs Debian's python3-torch and python3-numpy only.
"""
import argparse
import json
import os

import numpy as np
import torch

STEPS = 6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/optim")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = [(7,), (3, 4)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    for i, p in enumerate(params):
        np.save(os.path.join(args.out, "p%d.init.npy" % i), p.detach().numpy())
    cfg = {"betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.05}
    opt = torch.optim.AdamW(params, lr=1e-2, betas=tuple(cfg["betas"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"], foreach=False)
    grads = [[] for _ in params]
    lrs = []
    for step in range(STEPS):
        lr = 1e-2 * (1 + step) / STEPS  # a warm-up, so each step has its own rate
        for group in opt.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        for i, p in enumerate(params):
            g = torch.randn(*p.shape, generator=gen) * (0.1 if step % 2 else 2.0)
            p.grad = g
            grads[i].append(g.numpy().copy())
        opt.step()
    for i, p in enumerate(params):
        np.save(os.path.join(args.out, "g%d.npy" % i), np.stack(grads[i]).astype(np.float32))
        np.save(os.path.join(args.out, "p%d.final.npy" % i), p.detach().numpy())
    np.save(os.path.join(args.out, "lr.npy"), np.array(lrs, dtype=np.float64))
    with open(os.path.join(args.out, "adamw.json"), "w") as f:
        json.dump(dict(cfg, steps=STEPS, torch=torch.__version__), f, indent=1)
    print("adamw: %d steps in %s" % (STEPS, args.out))


if __name__ == "__main__":
    main()
