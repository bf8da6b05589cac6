#!/usr/bin/python3
"""Reconstruction quality of a glyph VAE (issue 16 item 7): PSNR and the glyph classifier's
accuracy on reconstructions of held-out renders (fonts never seen in training).

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/glyph_vae_eval.py --model models/glyphs-vae \
        [--n 2000] [--seed 0] [--bin build/denoised] [--threads 2]

Draws --n images of DATA/heldout.npz (seed), encodes them with the C engine (`denoised vae
encode`, posterior mean) and decodes the means (`denoised vae decode`), then reports
  PSNR     over [0, 255] after rounding the reconstruction to uint8 (mean of per-image PSNR, and
           the PSNR of the pooled MSE)
  acc      bench/glyph_classifier.pt's accuracy per head (char, fg, bg, bold, italic, style) on
           the originals and on the reconstructions, against the render labels
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
from train_classifier import HEADS, load_classifier, predict  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classifier", default=os.path.join(BENCH, "glyph_classifier.pt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = np.load(os.path.join(args.data, "heldout.npz"))
    idx = np.sort(np.random.default_rng(args.seed).choice(len(d["images"]), args.n, replace=False))
    u8 = d["images"][idx]
    x = u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    with tempfile.TemporaryDirectory() as tmp:
        xin, z, rec = (os.path.join(tmp, f) for f in ("x.npy", "z.npy", "rec.npy"))
        np.save(xin, x)
        for cmd in (["vae", "encode", "--model", args.model, "--input", xin, "--out", z],
                    ["vae", "decode", "--model", args.model, "--input", z, "--out", rec]):
            subprocess.run([args.bin] + cmd + ["--threads", str(args.threads)], check=True)
        r = np.load(rec)
        zz = np.load(z)
    r8 = np.clip(np.round((r + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    err = (r8.astype(np.float64) - u8.astype(np.float64)) ** 2
    mse_img = err.reshape(len(u8), -1).mean(1)
    psnr_img = 10 * np.log10(255.0 ** 2 / np.maximum(mse_img, 1e-10))
    psnr_pool = 10 * np.log10(255.0 ** 2 / err.mean())
    net = load_classifier(args.classifier)
    p_orig, _ = predict(net, u8)
    p_rec, _ = predict(net, r8)
    print("model %s: %d held-out renders, latents %s (std %.3f)" % (args.model, len(u8),
                                                                  "x".join(map(str, zz.shape[1:])),
                                                                  zz.std()))
    print("PSNR mean per image %.2f dB, pooled %.2f dB (min image %.2f dB)" % (
        psnr_img.mean(), psnr_pool, psnr_img.min()))
    print("%-8s %8s %8s" % ("head", "orig", "recon"))
    for name, _ in HEADS:
        lab = d[name][idx]
        print("%-8s %7.2f%% %7.2f%%" % (name, 100 * (p_orig[name] == lab).mean(),
                                        100 * (p_rec[name] == lab).mean()))


if __name__ == "__main__":
    main()
