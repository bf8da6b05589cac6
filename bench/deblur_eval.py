#!/usr/bin/python3
"""Deblurring quality of the engine's deblurring models (issue 18 item 4).

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/deblur_eval.py [--pairs DIR] [--n 200] \\
        [--model NAME=DIR ...] [--scheduler dpm++2m] [--steps 20] [--seed 0] [--json OUT.json]

For each set of tools/deblur/make_pairs.py (in domain and every out-of-domain set) the first
--n pairs are restored by each model through the C engine (`denoised deblur --image
BLURRY.npy --out OUT.npy`, one batched run per model and set) and compared with the sharp
images, beside the blurry input itself:

  PSNR    dB on the 8-bit images (mean over images of each image's PSNR)
  SSIM    Wang et al.'s SSIM on the 8-bit luma (11x11 Gaussian window, sigma 1.5), mean
  acc     the glyph classifier's (bench/glyph_classifier.pt, head "char") character accuracy
  FD      Frechet distance between the classifier's features of the restored images and of
          the sharp images of the same set (lower is better)
  NFE     network evaluations per image (1 for a regression model)
  s/img   wall time of the engine run divided by the images (model load included; the machine
          is shared, so this is an upper bound)

The default models are the shipped ones under models/ (deblur-reg, deblur-icdpm and, when
present, deblur-guided); --model NAME=DIR replaces the list.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
sys.path.insert(0, BENCH)
from glyph_eval import frechet, to_u8  # noqa: E402
from train_classifier import load_classifier, predict  # noqa: E402

SETS = ("indomain", "defocus", "motion_unseen", "blur_jpeg", "fonts")


def psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def ssim(a, b):
    """Mean SSIM of uint8 HWC image pairs on BT.601 luma."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x = torch.from_numpy(a.astype(np.float64)) @ w
    y = torch.from_numpy(b.astype(np.float64)) @ w
    x, y = x[:, None], y[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]
    f = lambda t: F.conv2d(t, k)  # noqa: E731  ('valid' window, as skimage's default crop)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def restore(args, model_dir, blurry):
    """The engine's restorations of blurry [N, 3, H, W], NFE per image and wall seconds."""
    with tempfile.TemporaryDirectory() as td:
        inp, out = os.path.join(td, "in.npy"), os.path.join(td, "out.npy")
        np.save(inp, np.ascontiguousarray(blurry, dtype=np.float32))
        cmd = [args.engine, "deblur", "--model", model_dir, "--image", inp, "--out", out,
               "--scheduler", args.scheduler, "--steps", str(args.steps), "--seed",
               str(args.seed), "--threads", str(args.threads)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            raise SystemExit("deblur_eval: %s failed (%d): %s" % (" ".join(cmd), r.returncode,
                                                                 r.stderr.strip()))
        nfe = int(r.stderr.rsplit(",", 1)[1].split()[0]) if "NFE" in r.stderr else -1
        return np.load(out), nfe, wall


def metrics(clf, out_u8, sharp_u8, chars, sharp_feat):
    p, f = predict(clf, out_u8)
    return {"psnr": psnr(out_u8, sharp_u8), "ssim": ssim(out_u8, sharp_u8),
            "acc": float((p["char"] == chars).mean()), "fd": frechet(f, sharp_feat)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pairs", default="/work/glyphs-data/deblur", help="make_pairs.py's --out")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--n", type=int, default=200, help="pairs per set (the first N)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--engine", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--classifier", default=os.path.join(BENCH, "glyph_classifier.pt"))
    ap.add_argument("--scheduler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = [m.split("=", 1) for m in args.model]
    if not models:
        for name in ("reg", "icdpm", "guided"):
            d = os.path.join(ROOT, "models", "deblur-" + name)
            if os.path.isdir(d):
                models.append((name, d))
    clf = load_classifier(args.classifier)
    rows = []
    for s in args.sets.split(","):
        d = os.path.join(args.pairs, s)
        sharp = np.load(os.path.join(d, "sharp.npy"))[: args.n]
        blurry = np.load(os.path.join(d, "blurry.npy"))[: args.n]
        chars = np.load(os.path.join(d, "chars.npy"))[: args.n]
        sharp_u8 = to_u8(sharp)
        sp, sharp_feat = predict(clf, sharp_u8)
        row = {"set": s, "n": len(sharp), "sharp_acc": float((sp["char"] == chars).mean())}
        row["blurry"] = metrics(clf, to_u8(blurry), sharp_u8, chars, sharp_feat)
        row["blurry"].update(nfe=0, s_per_img=0.0)
        for name, md in models:
            out, nfe, wall = restore(args, md, blurry)
            row[name] = metrics(clf, to_u8(out), sharp_u8, chars, sharp_feat)
            row[name].update(nfe=nfe, s_per_img=wall / len(sharp))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    cols = ["blurry"] + [n for n, _ in models]
    print("| set | input | PSNR dB | SSIM | char acc | FD | NFE | s/img |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for c in cols:
            m = row[c]
            print("| %s | %s | %.2f | %.3f | %.1f%% | %.2f | %d | %.3f |" % (
                row["set"], c, m["psnr"], m["ssim"], 100 * m["acc"], m["fd"], m["nfe"],
                m["s_per_img"]))
    print("\nsharp images' char accuracy: " + ", ".join(
        "%s %.1f%%" % (r["set"], 100 * r["sharp_acc"]) for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
