#!/usr/bin/python3
"""Makes the (blurry, sharp) glyph pairs of the deblurring task (issue 18) from the glyph data
set of tools/glyphs (render.py's train.npz and heldout.npz), with numpy only.

    /usr/bin/python3 tools/deblur/make_pairs.py [--glyphs /work/glyphs-data]
        [--out /work/glyphs-data/deblur] [--train 8192] [--test 512] [--seed 0]
        [--preview grid.png]

Writes one folder per set under OUT, in the layout `denoised train` reads (cli/train_data.c):
    sharp.npy    float32 [N, 3, 32, 32]  the clean glyph, x = pixel / 127.5 - 1
    blurry.npy   float32 [N, 3, 32, 32]  its degraded copy, same scale (8-bit quantised)
    chars.npy    int64   [N]  class index into CLASSES (for evaluation only: the deblurring
                              models are not class-conditional, so do not pass it as --labels)
    meta.npz     per image: source index into the glyph split, face, group, blur kind
                 (KINDS), its parameters p0..p2, noise sigma, JPEG quality (0: none)
Sets (see README.md for the why of each):
    train          train fonts, training blurs (Gaussian or motion) + sensor noise
    indomain       train fonts (images not in `train`), the same blur distribution
    defocus        train fonts, defocus disc kernels (never seen in training)
    motion_unseen  train fonts, motion blur along diagonal angles and longer than in training
    blur_jpeg      train fonts, training blurs + noise, then JPEG-like 8x8 DCT quantisation
    fonts          held-out font groups (heldout.npz), training blur distribution

Determinism: image i of set s takes its random numbers from numpy's PCG64 seeded with
(seed, s, i); the pick of source images from (seed, s). The same arguments give the same files.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SETS = ("train", "indomain", "defocus", "motion_unseen", "blur_jpeg", "fonts")
KINDS = ("gaussian", "motion", "defocus")
R = 8  # kernel radius: every kernel lives on a 17x17 grid
SS = 8  # supersampling of discs
# Training motion: near-horizontal or near-vertical, length 3..9 px; held-out motion: the
# diagonals in between, 10..13 px (both outside the training ranges).
TRAIN_ANGLES = ((-30.0, 30.0), (60.0, 120.0))
UNSEEN_ANGLES = ((35.0, 55.0), (125.0, 145.0))
TRAIN_LEN = (3.0, 9.0)
UNSEEN_LEN = (10.0, 13.0)
GAUSS_SIGMA = (0.6, 2.0)
DISC_RADIUS = (1.5, 3.5)
NOISE_SIGMA = (0.0, 0.03)  # of the [0, 1] pixel range
JPEG_QUALITY = (20, 50)
# The JPEG standard's (Annex K) luminance and chrominance tables.
Q_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64).reshape(8, 8)
Q_CHROMA = np.full((8, 8), 99.0)
Q_CHROMA[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99],
                            np.float64).reshape(4, 4)


def gaussian_kernel(sx, sy, theta):
    """Anisotropic Gaussian with standard deviations sx, sy along axes rotated by theta."""
    c = np.arange(-R, R + 1, dtype=np.float64)
    y, x = np.meshgrid(c, c, indexing="ij")
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    k = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return k / k.sum()


def motion_kernel(length, angle_deg):
    """A straight camera path of `length` px at `angle_deg`, sampled 8 times per pixel of its
    length and splatted bilinearly: the exposure is spread evenly along it."""
    a = np.deg2rad(angle_deg)
    s = np.linspace(-length / 2, length / 2, int(np.ceil(length * SS)) + 1)
    px, py = s * np.cos(a), -s * np.sin(a)  # image y points down
    k = np.zeros((2 * R + 1, 2 * R + 1))
    x0, y0 = np.floor(px), np.floor(py)
    fx, fy = px - x0, py - y0
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                        (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, ((y0 + dy).astype(int) + R, (x0 + dx).astype(int) + R), wgt)
    return k / k.sum()


def disc_kernel(radius):
    """Defocus: a uniform disc, each pixel weighted by the fraction of it the disc covers."""
    off = (np.arange(SS) + 0.5) / SS - 0.5
    p = (np.arange(-R, R + 1)[:, None] + off[None, :]).reshape(-1)
    y, x = np.meshgrid(p, p, indexing="ij")
    inside = (x * x + y * y <= radius * radius).astype(np.float64)
    n = 2 * R + 1
    k = inside.reshape(n, SS, n, SS).mean(axis=(1, 3))
    return k / k.sum()


def draw_motion(rng, angles, lengths):
    lo, hi = angles[int(rng.integers(len(angles)))]
    ang = rng.uniform(lo, hi)
    length = rng.uniform(*lengths)
    return 1, (length, ang, 0.0), motion_kernel(length, ang)


def draw_training_blur(rng):
    """(kind, params, kernel) of the training distribution: half Gaussian, half motion."""
    if rng.random() < 0.5:
        sx, sy = rng.uniform(*GAUSS_SIGMA, size=2)
        theta = rng.uniform(0, np.pi)
        return 0, (sx, sy, theta), gaussian_kernel(sx, sy, theta)
    return draw_motion(rng, TRAIN_ANGLES, TRAIN_LEN)


def blur(img, k):
    """img [H, W, 3] float in [0, 1] convolved with k, the border extended by its edge pixels
    (the glyphs sit on a uniform background, so this adds no false edges)."""
    h, w, _ = img.shape
    p = np.pad(img, ((R, R), (R, R), (0, 0)), mode="edge")
    out = np.zeros_like(img)
    kf = k[::-1, ::-1]  # convolution, not correlation: matters for asymmetric motion paths
    for dy, dx in zip(*np.nonzero(kf > 0)):
        out += kf[dy, dx] * p[dy:dy + h, dx:dx + w]
    return out


def dct_matrix():
    n = np.arange(8)
    c = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * np.sqrt(2 / 8)
    c[0] /= np.sqrt(2)
    return c


DCT = dct_matrix()


def jpeg_like(img, quality):
    """JPEG's lossy core without chroma subsampling or entropy coding: to YCbCr (JFIF), each 8x8
    block's DCT divided by the standard table scaled to `quality` (libjpeg's rule), rounded,
    multiplied back, inverse DCT, back to RGB. img [H, W, 3] in [0, 255]."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    tabs = [np.clip(np.floor((q * scale + 50) / 100), 1, 255) for q in (Q_LUMA, Q_CHROMA)]
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    ycc = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1) - 128
    h, w, _ = img.shape
    out = np.empty_like(ycc)
    for ch in range(3):
        q = tabs[0] if ch == 0 else tabs[1]
        blocks = ycc[..., ch].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
        coef = np.round((DCT @ blocks @ DCT.T) / q) * q
        out[..., ch] = (DCT.T @ coef @ DCT).transpose(0, 2, 1, 3).reshape(h, w)
    y, cb, cr = out[..., 0] + 128, out[..., 1], out[..., 2]
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


def degrade(sharp_u8, set_name, rng):
    """(blurry uint8 [H, W, 3], meta row) for one sharp image of a set."""
    if set_name == "defocus":
        radius = rng.uniform(*DISC_RADIUS)
        kind, par, k = 2, (radius, 0.0, 0.0), disc_kernel(radius)
    elif set_name == "motion_unseen":
        kind, par, k = draw_motion(rng, UNSEEN_ANGLES, UNSEEN_LEN)
    else:
        kind, par, k = draw_training_blur(rng)
    sigma = rng.uniform(*NOISE_SIGMA)
    x = blur(sharp_u8.astype(np.float64) / 255.0, k)
    x = x + sigma * rng.standard_normal(x.shape)
    x = np.clip(x, 0, 1) * 255.0
    quality = 0
    if set_name == "blur_jpeg":
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        x = jpeg_like(x, quality)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out, (kind, par[0], par[1], par[2], sigma, quality)


def pick_sources(set_name, n_src, n, seed, exclude):
    """n distinct source indices for a set, none of them in `exclude` (the training pairs)."""
    rng = np.random.default_rng([seed, SETS.index(set_name), 1 << 20])
    pool = np.setdiff1d(np.arange(n_src), exclude) if len(exclude) else np.arange(n_src)
    if n > len(pool):
        sys.exit("make_pairs.py: %s wants %d images, only %d available" % (set_name, n, len(pool)))
    return np.sort(rng.choice(pool, n, replace=False))


def to_model(u8):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return (u8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def make_set(set_name, glyphs, src, seed):
    n = len(src)
    sharp = glyphs["images"][src]
    blurry = np.empty_like(sharp)
    meta = np.zeros((n, 6), np.float64)
    sidx = SETS.index(set_name)
    for i in range(n):
        blurry[i], meta[i] = degrade(sharp[i], set_name, np.random.default_rng([seed, sidx, i]))
    return sharp, blurry, meta


def write_set(out_dir, set_name, glyphs, src, sharp, blurry, meta):
    d = os.path.join(out_dir, set_name)
    os.makedirs(d, exist_ok=True)
    np.save(os.path.join(d, "sharp.npy"), to_model(sharp))
    np.save(os.path.join(d, "blurry.npy"), to_model(blurry))
    np.save(os.path.join(d, "chars.npy"), glyphs["char"][src].astype(np.int64))
    np.savez(os.path.join(d, "meta.npz"), source=src.astype(np.int64),
             face=glyphs["face"][src], group=glyphs["group"][src],
             kind=meta[:, 0].astype(np.int8), p0=meta[:, 1], p1=meta[:, 2], p2=meta[:, 3],
             noise_sigma=meta[:, 4], jpeg_quality=meta[:, 5].astype(np.int16),
             kinds=np.array(KINDS), classes=np.array(list(CLASSES)))


def psnr(a_u8, b_u8):
    mse = np.mean((a_u8.astype(np.float64) - b_u8.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def load_split(path):
    with np.load(path) as z:
        return {k: z[k] for k in ("images", "char", "face", "group")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glyphs", default="/work/glyphs-data", help="render.py's output folder")
    ap.add_argument("--out", default=None, help="default: GLYPHS/deblur")
    ap.add_argument("--train", type=int, default=8192, help="training pairs")
    ap.add_argument("--test", type=int, default=512, help="pairs per evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", help="also write a PNG grid: per set a row of 8 (sharp, blurry) pairs")
    args = ap.parse_args()
    if args.train < 1 or args.test < 1:
        sys.exit("make_pairs.py: --train and --test must be at least 1")
    out_dir = args.out or os.path.join(args.glyphs, "deblur")
    paths = {s: os.path.join(args.glyphs, s + ".npz") for s in ("train", "heldout")}
    for p in paths.values():
        if not os.path.isfile(p):
            sys.exit("make_pairs.py: %s missing (make it with tools/glyphs/render.py)" % p)
    t0 = time.time()
    tr = load_split(paths["train"])
    ho = load_split(paths["heldout"])
    summary = {"seed": args.seed, "glyphs": args.glyphs, "sets": {}}
    train_src = pick_sources("train", len(tr["char"]), args.train, args.seed, [])
    previews = []
    for s in SETS:
        glyphs = ho if s == "fonts" else tr
        n = args.train if s == "train" else args.test
        src = train_src if s == "train" else pick_sources(
            s, len(glyphs["char"]), n, args.seed, [] if s == "fonts" else train_src)
        sharp, blurry, meta = make_set(s, glyphs, src, args.seed)
        write_set(out_dir, s, glyphs, src, sharp, blurry, meta)
        summary["sets"][s] = {"pairs": int(n), "psnr_blurry_db": round(psnr(sharp, blurry), 3),
                              "kinds": {KINDS[k]: int(np.sum(meta[:, 0] == k)) for k in range(3)}}
        print("%-13s %6d pairs  blurry PSNR %.2f dB  (%.0f s)"
              % (s, n, summary["sets"][s]["psnr_blurry_db"], time.time() - t0), file=sys.stderr)
        if args.preview:
            previews.append(np.stack([sharp[:8], blurry[:8]], axis=1).reshape(-1, 32, 32, 3))
    with open(os.path.join(out_dir, "pairs.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.preview:
        from PIL import Image  # only for the optional preview
        rows = [np.concatenate(list(r), axis=1) for r in previews]
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.preview)


if __name__ == "__main__":
    main()
