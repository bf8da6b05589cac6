#!/usr/bin/python3
"""Training images for the glyph VAE (issue 16 item 7): `denoised train vae --data` takes them.

    /usr/bin/python3 tools/glyphs/vae_data.py [--data /work/glyphs-data] [--n 60000] [--seed 0]
        --out X.npy

Draws --n images (without replacement, from the seed) of DATA/train.npz whose (character, fg,
bg) triple is not held out by tools/glyphs/captions.py (--keep, default DATA/train_keep.npy, when it exists, so
the VAE never sees the combinations prompt-following is measured on) and writes them as float32
[N, 3, 32, 32] in [-1, 1] (x / 127.5 - 1, the classifier's and the UNet trainer's scaling).
"""
import argparse
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="captions.py's train_keep.npy (default DATA/train_keep.npy)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d = np.load(os.path.join(args.data, "train.npz"))
    images = d["images"]
    keep_path = args.keep or os.path.join(args.data, "train_keep.npy")
    pool = np.arange(len(images))
    if os.path.exists(keep_path):
        keep = np.load(keep_path)
        if keep.shape != (len(images),):
            raise SystemExit("%s: %s, expected [%d]" % (keep_path, keep.shape, len(images)))
        pool = pool[keep]
    n = min(args.n, len(pool))
    idx = np.sort(np.random.default_rng(args.seed).choice(pool, n, replace=False))
    x = images[idx].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    np.save(args.out, x)
    print("%s: %d images of %d (%d kept of %d train renders)" % (args.out, n, len(pool), len(pool),
                                                                  len(images)))


if __name__ == "__main__":
    main()
