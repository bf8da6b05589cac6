#!/usr/bin/python3
"""Check tools/torch_unet.py (our PyTorch UNet) against diffusers' UNet2DModel.

For every fixture directory given (default: all of tests/fixtures/unet/*), load it with
diffusers' UNet2DModel.from_pretrained and with TorchUNet.from_dir, run both on the fixture
inputs and compare:
  * float64: rel L2 must be < 1e-6 (default --tol).  diffusers' attention casts the scores to
    float32 before the softmax ("upcast_softmax", a down-cast for a float64 model); for this
    comparison that cast is switched off so both sides are genuinely float64.  The effect of
    the cast is printed as "f32-softmax".  (float64 runs use diffusers_env.safe_baddbmm, see
    there: torch 1.13's float64 baddbmm(beta=0) intermittently yields NaN.)
  * output.npy stored in the fixture vs our float64 output (should be ~1e-16 relative,
    the fixture is written as float32 so ~1e-8 is expected)
  * float32: ours vs diffusers, both float32, and diffusers float32 vs float64 -- the error
    an exact float32 implementation has against output.npy (informational)
Exit status 1 if any tolerance fails.
  tools/check_torch_unet.py [--tol 1e-6] [DIR ...]
"""
import argparse
import glob
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def load_inputs(d, torch):
    x = torch.from_numpy(np.load(os.path.join(d, "input.npy")))
    t = torch.from_numpy(np.load(os.path.join(d, "timesteps.npy")))
    yp = os.path.join(d, "class_labels.npy")
    y = torch.from_numpy(np.load(yp)) if os.path.exists(yp) else None
    return x, t, y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--diffusers-src")
    args = ap.parse_args()
    dirs = args.dirs or sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "unet", "*", "config.json")))
    dirs = [os.path.dirname(d) if d.endswith("config.json") else d for d in dirs]
    if not dirs:
        sys.exit("check_torch_unet: no fixture directories")

    import diffusers_env
    diffusers_env.setup(args.diffusers_src)
    import torch
    from diffusers import UNet2DModel
    from torch_unet import TorchUNet
    torch.set_num_threads(1)

    ok = True
    for d in dirs:
        x, t, y = load_inputs(d, torch)
        ref = UNet2DModel.from_pretrained(d).eval()
        with torch.no_grad(), diffusers_env.safe_baddbmm():
            ref64 = ref.double()
            d_f32softmax = ref64(x.double(), t, class_labels=y).sample.numpy()
            diffusers_env.exact_f64(ref64)
            d64 = ref64(x.double(), t, class_labels=y).sample.numpy()
            o64 = TorchUNet.from_dir(d, dtype=torch.float64)(x, t, y).numpy()
            d32 = ref64.float()(x, t, class_labels=y).sample.numpy()
            o32 = TorchUNet.from_dir(d, dtype=torch.float32)(x, t, y).numpy()
        stored = np.load(os.path.join(d, "output.npy"))
        r64 = rel(o64, d64)
        rst = rel(o64, stored)
        r32 = rel(o32, d32)
        e32 = rel(d32, d64)
        rsm = rel(d_f32softmax, d64)
        good = r64 < args.tol and rst < 1e-6
        ok &= good
        print("%-32s f64 ours/diffusers %.1e | ours/output.npy %.1e | f32 ours/diffusers %.1e | "
              "diffusers f32/f64 %.1e | f32-softmax effect %.1e  %s"
              % (os.path.relpath(d, ROOT) if d.startswith(ROOT) else d, r64, rst, r32, e32, rsm,
                 "OK" if good else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
