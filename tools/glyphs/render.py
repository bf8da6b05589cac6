#!/usr/bin/python3
"""Renders the glyph data set: 32x32 RGB images of one character in a foreground colour on a
background colour, from the faces pinned in tools/glyphs/fonts.txt (Debian font packages, see
scripts/install-deps.sh --training), with Pillow's FreeType rasteriser.

    /usr/bin/python3 tools/glyphs/render.py [--out /work/glyphs-data] [--train-variants 16]
        [--heldout-variants 8] [--seed 0] [--preview grid.png]

Writes OUT/train.npz and OUT/heldout.npz (the split is by design group, column 1 of
fonts.txt: no face of a held-out group, nor a clone of its design, is in train).  Each holds
    images   uint8 [N, 32, 32, 3]   (HWC, sRGB)
    char     uint8 [N]   class index into CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         (0-9 are the digits, 10-35 the letters A-Z; 36 is the model's null class)
    face     int16 [N]   line index of the face in fonts.txt (comment lines not counted)
    family   int16 [N]   index into family_names
    group    int16 [N]   index into group_names
    bold, italic uint8 [N]   0/1
    style    uint8 [N]   index into STYLES = (serif, sans, mono)
    fg, bg   uint8 [N]   index into PALETTE (fg != bg, luminance contrast ratio >= MIN_CONTRAST)
    variant  int16 [N]   variant number of the (face, char) pair
and the string tables classes, styles, palette (uint8 [P,3]), family_names, group_names,
face_names ("family|style").

Every image is a pure function of (seed, face index, char, variant): its random numbers come
from numpy's PCG64 seeded with that tuple, so the set is identical on every run and any image
can be re-rendered alone.  Rendering: the glyph is drawn at 4x (128x128) with the font size
chosen so the face's cap height ("H" ink height) is 4*U(17, 22) px, shrunk if the glyph's ink
would exceed 28x28 px, its ink box centred with a U(-2, 2) px offset per axis (kept inside the
canvas), then box-filtered to 32x32 and used as the alpha of fg over bg.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
FONTS_TXT = os.path.join(HERE, "fonts.txt")
CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("serif", "sans", "mono")
# name, sRGB
PALETTE = (
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
    ("red", (214, 39, 40)),
    ("green", (44, 160, 44)),
    ("blue", (31, 80, 200)),
    ("yellow", (250, 215, 50)),
    ("orange", (255, 127, 14)),
    ("purple", (128, 50, 160)),
    ("cyan", (80, 210, 230)),
    ("gray", (110, 110, 110)),
)
MIN_CONTRAST = 3.0
SIZE = 32
SS = 4  # supersampling factor
CAP_RANGE = (17.0, 22.0)  # cap height in output pixels
MAX_INK = 28.0  # largest ink extent in output pixels
JITTER = 2.0  # centre offset in output pixels, per axis


def luminance(rgb):
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def contrast(a, b):
    la, lb = luminance(a), luminance(b)
    hi, lo = max(la, lb), min(la, lb)
    return (hi + 0.05) / (lo + 0.05)


def colour_pairs():
    """All (fg, bg) palette index pairs with enough contrast, in a fixed order."""
    return [(f, b) for f in range(len(PALETTE)) for b in range(len(PALETTE))
            if f != b and contrast(PALETTE[f][1], PALETTE[b][1]) >= MIN_CONTRAST]


def read_fonts(path=FONTS_TXT):
    faces = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            split, group, family, style, bold, italic, cls, pkg, fpath = line.rstrip("\n").split("\t")
            faces.append(dict(split=split, group=group, family=family, style_name=style,
                              bold=int(bold), italic=int(italic), style=STYLES.index(cls),
                              package=pkg, path=fpath))
    return faces


class FaceRenderer:
    def __init__(self, path):
        self.path = path
        self._fonts = {}
        ref = 200
        self.cap_ref = self._ink(ref, "H").size[1] / ref  # cap height per unit of font size

    def font(self, size):
        f = self._fonts.get(size)
        if f is None:
            f = self._fonts[size] = ImageFont.truetype(self.path, size)
        return f

    def _ink(self, size, ch):
        """The glyph's ink as an L image cropped to its bounding box."""
        font = self.font(size)
        l, t, r, b = font.getbbox(ch)
        pad = size // 2 + 4
        w, h = r - l + 2 * pad, b - t + 2 * pad
        im = Image.new("L", (w, h), 0)
        ImageDraw.Draw(im).text((pad - l, pad - t), ch, fill=255, font=font)
        box = im.getbbox()
        if box is None:
            raise RuntimeError("%s: no ink for %r" % (self.path, ch))
        return im.crop(box)

    def alpha(self, ch, rng):
        """32x32 float alpha in [0, 1] for one character, with random scale and offset."""
        cap = rng.uniform(*CAP_RANGE) * SS
        size = max(4, int(round(cap / self.cap_ref)))
        ink = self._ink(size, ch)
        limit = MAX_INK * SS
        if max(ink.size) > limit:
            size = max(4, int(size * limit / max(ink.size)))
            ink = self._ink(size, ch)
            while max(ink.size) > limit and size > 4:
                size -= 1
                ink = self._ink(size, ch)
        big = SIZE * SS
        w, h = ink.size
        dx, dy = rng.uniform(-JITTER, JITTER, size=2) * SS
        x = int(round((big - w) / 2 + dx))
        y = int(round((big - h) / 2 + dy))
        x = min(max(x, SS), big - SS - w)
        y = min(max(y, SS), big - SS - h)
        canvas = Image.new("L", (big, big), 0)
        canvas.paste(ink, (x, y))
        small = canvas.resize((SIZE, SIZE), Image.BOX)
        return np.asarray(small, dtype=np.float32) / 255.0


def render_split(faces, face_ids, variants, seed, pairs, log=None):
    n = len(face_ids) * len(CLASSES) * variants
    out = {k: np.zeros(n, dtype=t) for k, t in (
        ("char", np.uint8), ("face", np.int16), ("bold", np.uint8), ("italic", np.uint8),
        ("style", np.uint8), ("fg", np.uint8), ("bg", np.uint8), ("variant", np.int16))}
    images = np.zeros((n, SIZE, SIZE, 3), dtype=np.uint8)
    pal = np.array([c for _, c in PALETTE], dtype=np.float32)
    i = 0
    t0 = time.time()
    for k, fi in enumerate(face_ids):
        face = faces[fi]
        fr = FaceRenderer(face["path"])
        for ci, ch in enumerate(CLASSES):
            for v in range(variants):
                rng = np.random.default_rng([seed, fi, ci, v])
                fg, bg = pairs[int(rng.integers(len(pairs)))]
                a = fr.alpha(ch, rng)[:, :, None]
                img = pal[bg] * (1.0 - a) + pal[fg] * a
                images[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
                out["char"][i] = ci
                out["face"][i] = fi
                out["bold"][i] = face["bold"]
                out["italic"][i] = face["italic"]
                out["style"][i] = face["style"]
                out["fg"][i] = fg
                out["bg"][i] = bg
                out["variant"][i] = v
                i += 1
        if log and (k + 1) % 20 == 0:
            log("  %d/%d faces, %.0f s" % (k + 1, len(face_ids), time.time() - t0))
    out["images"] = images
    return out


def save_split(path, data, faces):
    family_names = sorted({f["family"] for f in faces})
    group_names = sorted({f["group"] for f in faces})
    fam_of = np.array([family_names.index(f["family"]) for f in faces], dtype=np.int16)
    grp_of = np.array([group_names.index(f["group"]) for f in faces], dtype=np.int16)
    data = dict(data)
    data["family"] = fam_of[data["face"]]
    data["group"] = grp_of[data["face"]]
    np.savez_compressed(
        path, **data,
        classes=np.array(list(CLASSES)), styles=np.array(STYLES),
        palette=np.array([c for _, c in PALETTE], dtype=np.uint8),
        palette_names=np.array([n for n, _ in PALETTE]),
        family_names=np.array(family_names), group_names=np.array(group_names),
        face_names=np.array(["%s|%s" % (f["family"], f["style_name"]) for f in faces]))


def load(path):
    """{name: array} of a train.npz / heldout.npz (everything loaded into memory)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def grid(images, cols):
    n = len(images)
    rows = (n + cols - 1) // cols
    g = np.zeros((rows * SIZE, cols * SIZE, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        g[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = im
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/glyphs-data", help="data dir (outside the repo)")
    ap.add_argument("--fonts", default=FONTS_TXT)
    ap.add_argument("--train-variants", type=int, default=16, help="images per (face, char), train")
    ap.add_argument("--heldout-variants", type=int, default=8, help="images per (face, char), held-out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", help="also write a PNG grid (one row per class, random faces)")
    args = ap.parse_args()

    faces = read_fonts(args.fonts)
    missing = [f["path"] for f in faces if not os.path.isfile(f["path"])]
    if missing:
        sys.exit("render.py: %d font files missing (install with scripts/install-deps.sh --training): %s"
                 % (len(missing), ", ".join(missing[:5])))
    pairs = colour_pairs()
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    splits = {"train": args.train_variants, "heldout": args.heldout_variants}
    summary = {"fonts": len(faces), "colour_pairs": len(pairs), "seed": args.seed, "splits": {}}
    for name, variants in splits.items():
        ids = [i for i, f in enumerate(faces) if f["split"] == name]
        log("%s: %d faces x %d chars x %d variants" % (name, len(ids), len(CLASSES), variants))
        data = render_split(faces, ids, variants, args.seed, pairs, log)
        path = os.path.join(args.out, name + ".npz")
        save_split(path, data, faces)
        summary["splits"][name] = {"faces": len(ids), "images": int(len(data["char"])),
                                   "groups": sorted({faces[i]["group"] for i in ids})}
        log("wrote %s (%d images)" % (path, len(data["char"])))
        if args.preview and name == "train":
            rng = np.random.default_rng(args.seed)
            pick = []
            for ci in range(len(CLASSES)):
                idx = np.flatnonzero(data["char"] == ci)
                pick.extend(rng.choice(idx, 16, replace=False))
            Image.fromarray(grid(data["images"][pick], 16)).save(args.preview)
    with open(os.path.join(args.out, "render.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
