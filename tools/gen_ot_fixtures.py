#!/usr/bin/python3
"""Reference data for tests/test_ot.c: the DPM-OT authors' semi-discrete transport solver
(cognaclee/DPM-OT @b7956eb, ot_utils/optimal_transport.py, class OptimalTransport) run on small
random targets with source points we hand it, so that our sampler_ot_fit and sampler_ot_assign
can be held to it exactly.

    git -C MIRROR show b7956eb:ot_utils/optimal_transport.py > /tmp/dpmot_optimal_transport.py
    /usr/bin/python3 tools/gen_ot_fixtures.py --authors /tmp/dpmot_optimal_transport.py \\
        [--out tests/fixtures/ot]

The authors' file is imported from where it lies (never copied into this repository), on the
CPU with Debian's torch: its torch.cuda memory reports become 0, and torch.rand, its only source
of randomness (U[0, 1]^d source points), is replaced by a small LCG (class Feed) that the test
repeats, so ours sees the same points. Their train_ot writes h files
into a scratch folder. Written:
  targets.npy [N, C, H, W]   the targets (random, float32)
  h_short.npy, h_long.npy [N]  their intercepts after train_ot of 100 and 400 iterations
  map_x.npy   [M, d]         points to map; map_idx.npy [M] (float32) their argmax with h_long
                             (OptimalTransport.forward, as their sampler maps with topk 1)
  cases.json                 N, d, bat_size_sr, bat_size_tg, lr, seed, and per fit max_iter, the
                             source batches drawn, batches per iteration and lr at the end
"""
import argparse
import importlib.util
import json
import os
import tempfile

import numpy as np
import torch

N, SHAPE, BAT_SR, BAT_TG, LR, M, SEED = 40, (3, 2, 2), 100, 20, 0.1, 300, 11
# two fits: "short" before the first doubling, where every histogram is the same in both
# float32 computations; "long" through all three doublings, where after some hundred thousand
# argmaxes float32 rounding (their mm against our gemm, their mean of h against ours) flips a
# near-tied point and the trajectories part: the test holds it to the doublings and the size of h
CASES = {"short": 100, "long": 400}


MUL, INC = 6364136223846793005, 1442695040888963407


class Feed:
    """torch.rand(n, d): u = (x >> 40) / 2^24 (exact in float32) of the 64-bit LCG
    x <- x * MUL + INC, starting from x = seed; tests/test_ot.c draws the same sequence, so the
    source points need not be stored."""

    def __init__(self, seed):
        self.x = seed
        self.count = 0

    def __call__(self, *size, **kw):
        n = int(np.prod(size))
        out = np.empty(n, dtype=np.float32)
        x = self.x
        for k in range(n):
            x = (x * MUL + INC) & 0xFFFFFFFFFFFFFFFF
            out[k] = (x >> 40) / 16777216.0
        self.x = x
        self.count += n
        return torch.from_numpy(out.reshape(size))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--authors", required=True, help="their optimal_transport.py")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                  "fixtures", "ot"))
    args = ap.parse_args()
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_cached = lambda *a, **k: 0
    spec = importlib.util.spec_from_file_location("dpmot_ot", args.authors)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(7)
    # targets: spread so that cells differ in size and a few start empty
    tg = (rng.standard_normal((N,) + SHAPE) * 0.6 + rng.random((N, 1, 1, 1)) * 0.8)
    tg = tg.astype(np.float32)
    os.makedirs(args.out, exist_ok=True)
    info = {"n": N, "shape": list(SHAPE), "d": int(np.prod(SHAPE)), "bat_size_sr": BAT_SR,
            "bat_size_tg": BAT_TG, "lr": LR, "seed": SEED, "cases": {}}
    for name, max_iter in CASES.items():
        feed = Feed(SEED)
        torch.rand = feed

        class A:
            lr_ot, bat_size_sr, bat_size_tg = LR, BAT_SR, BAT_TG

        A.max_iter = max_iter
        with tempfile.TemporaryDirectory() as tmp:
            ot = mod.OptimalTransport(torch.from_numpy(tg), A(), device="cpu", out_dir=tmp)
            ot.train_ot(torch.ones(N) / N, 1)
        np.save(os.path.join(args.out, "h_%s.npy" % name), ot.d_h.numpy().astype(np.float32))
        info["cases"][name] = {"max_iter": max_iter,
                               "source_batches": feed.count // (BAT_SR * info["d"]),
                               "batches_per_iteration_end": int(ot.num_bat_sr),
                               "final_lr": float(ot.lr)}
        print("%s: %d source batches, %d per iteration at the end, lr %g"
              % (name, info["cases"][name]["source_batches"], ot.num_bat_sr, ot.lr))
    # their transfer_topk fails (it unpacks torch.topk into three values); their sampler maps
    # with forward (topk 1), which returns the targets themselves: find their rows
    mx = np.random.default_rng(13).random((M, info["d"]), dtype=np.float32)
    mapped = ot.forward(torch.from_numpy(mx)).numpy().reshape(M, -1)
    flat = tg.reshape(N, -1)
    idx = np.array([int(np.flatnonzero((flat == r).all(1))[0]) for r in mapped])
    np.save(os.path.join(args.out, "targets.npy"), tg)
    np.save(os.path.join(args.out, "map_x.npy"), mx)
    np.save(os.path.join(args.out, "map_idx.npy"), idx.astype(np.float32))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
