#!/usr/bin/python3
"""Prompt following of a text-to-glyph pipeline (issue 16 item 7) on held-out attribute combinations.

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/glyph_text_eval.py --model PIPELINE \
        --captions-json /work/glyphs-data/captions.json [--per-combo 2] [--steps 20] \
        [--guidance 4] [--bin build/denoised]

For every (character, foreground, background) triple that tools/glyphs/captions.py held out of
training, --per-combo samples of the prompt "a FG letter|digit C on a BG background, STYLE" (the
style cycling through serif, sans, mono) from `denoised sample --prompt ... --scheduler dpm++2m`,
then the glyph classifier (bench/glyph_classifier.pt: heads char, fg, bg, bold, italic, style)
reads each sample. Prints the fraction with the requested character, foreground, background,
both colours, and style, and how often bold / italic were read (never asked for).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
from train_classifier import load_classifier, predict  # noqa: E402

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("serif", "sans", "mono")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--captions-json", default="/work/glyphs-data/captions.json")
    ap.add_argument("--data", default="/work/glyphs-data", help="for the palette's names (train.npz)")
    ap.add_argument("--per-combo", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    combos = json.load(open(args.captions_json))["heldout_combos"]
    names = [str(n) for n in np.load(os.path.join(args.data, "train.npz"))["palette_names"]]
    images, want = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (c, fg, bg) in enumerate(combos):
            style = k % 3
            kind = "digit" if c.isdigit() else "letter"
            prompt = "a %s %s %s on a %s background, %s" % (fg, kind, c.lower(), bg, STYLES[style])
            out = os.path.join(tmp, "x.npy")
            subprocess.run([args.bin, "sample", "--model", args.model, "--prompt", prompt,
                            "--batch", str(args.per_combo), "--seed", str(args.seed + k),
                            "--steps", str(args.steps), "--scheduler", "dpm++2m",
                            "--guidance-scale", str(args.guidance), "--threads", str(args.threads),
                            "--out", out, "--quiet"], check=True)
            x = np.load(out)
            images.append(np.clip((x.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8))
            want += [(CLASSES.index(c), names.index(fg), names.index(bg), style)] * len(x)
    images = np.concatenate(images)
    want = np.array(want)
    net = load_classifier(os.path.join(BENCH, "glyph_classifier.pt"))
    with torch.no_grad():
        pred, _ = predict(net, images)
    ok = {"char": pred["char"] == want[:, 0], "fg": pred["fg"] == want[:, 1],
          "bg": pred["bg"] == want[:, 2], "style": pred["style"] == want[:, 3]}
    ok["both colours"] = ok["fg"] & ok["bg"]
    print("%s: %d samples over %d held-out combinations (dpm++2m %d steps, guidance %g)" % (
        args.model, len(images), len(combos), args.steps, args.guidance))
    for k in ("char", "fg", "bg", "both colours", "style"):
        print("  %-13s %.1f%%" % (k, 100 * ok[k].mean()))
    print("  read as bold %.1f%%, italic %.1f%% (neither asked)" % (
        100 * pred["bold"].mean(), 100 * pred["italic"].mean()))


if __name__ == "__main__":
    main()
