#!/usr/bin/python3
"""Training data for the text-to-glyph model (issue 16 item 7): captioned glyph renders in the
form `denoised train --data X.npy --captions CAPTIONS.txt` reads.

    /usr/bin/python3 tools/glyphs/text_data.py [--data /work/glyphs-data] --n 32768 [--seed 0]
        --out DIR

Takes --n images of DATA/train.npz whose (character, fg, bg) triple is not held out
(DATA/train_keep.npy from tools/glyphs/captions.py), drawn without replacement with the seed, and
writes
    DIR/x.npy          float32 [N, 3, 32, 32] in [-1, 1] (the renders, channel-first)
    DIR/captions.txt   their captions (DATA/train_captions.txt), one per line, same order
    DIR/index.npy      int64 [N]: the rows of train.npz they are
Run tools/glyphs/captions.py first (it writes the captions, the tokenizer and train_keep.npy).
"""
import argparse
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    keep = np.load(os.path.join(args.data, "train_keep.npy"))
    with open(os.path.join(args.data, "train_captions.txt"), encoding="utf-8") as f:
        captions = f.read().split("\n")[:len(keep)]
    if len(captions) != len(keep):
        raise SystemExit("train_captions.txt has %d lines for %d images" % (len(captions), len(keep)))
    rows = np.flatnonzero(keep)
    if args.n > len(rows):
        raise SystemExit("--n %d: only %d images are outside the held-out combinations" % (args.n, len(rows)))
    rows = np.sort(np.random.default_rng(args.seed).choice(rows, args.n, replace=False))
    images = np.load(os.path.join(args.data, "train.npz"))["images"]
    x = images[rows].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "x.npy"), x)
    np.save(os.path.join(args.out, "index.npy"), rows.astype(np.int64))
    with open(os.path.join(args.out, "captions.txt"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(captions[r] + "\n")
    print("%s: %d images, %d captions" % (args.out, len(rows), len(rows)))


if __name__ == "__main__":
    main()
