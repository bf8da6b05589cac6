#!/usr/bin/python3
"""Editing quality of a class-conditional model through the C engine (issue 7's targets).

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/edit_eval.py --model models/glyphs32 \\
        [--engine build/denoised] [--n 200] [--n-fit 400] [--steps 50] [--guidance 3] \\
        [--strengths 1,2,3,4] [--skips 0,20,40,60] [--g-tgt 4] [--inv-steps 10,20,50,100,200]
        [--attributes polarity,bold,italic] [--mixing-step auto|K] [--space x,h,both]
        [--only boundary,classchange,inversion]

The figures of issue 7's closing note:
    ... --guidance 2 --steps 20 --only boundary --attributes polarity,bold,italic \
        --mixing-step 8 --strengths 4,6 --space x,both
    ... --only classchange --g-tgt 3 --skips 40,50,60

1. BoundaryDiffusion attribute flips. A labelled pool of --n-fit generated images (classes
   spread evenly) is classified, `denoised boundary fit` fits one boundary per attribute (in
   x_t and, for a UNet, in h) at the mixing step (automatic, or --mixing-step) of a --steps
   DDIM grid, and --n fresh generated images are edited with `denoised edit --boundary --seed`
   towards the opposite side, at each of --strengths, in each of --space. Reported per
   attribute, space and strength: the share whose attribute verdict flips, the share still read
   as the requested class, and both together. Target: flip >= 80% with the class kept >= 90%.
2. Class change through edit-friendly DDPM inversion. --n source images (held-out real glyphs
   from --data when there, else generated) are inverted (`denoised invert --method ddpm`, their
   own class, guidance --g-src) and sampled again (`denoised edit --noise`) with a random other
   class at guidance --g-tgt, for each of --skips. Reported: the share read as the target
   class, the share keeping the colours (classifier fg and bg heads, or the mixture's colour
   scheme) and the position (centre of the ink's bounding box within 2 px, where the renderer
   places a glyph; the ink centroid is printed too), and all three. Target: class >= 90%
   while keeping position and colour. --target same resamples in the source's own class: what
   the guidance and the skip alone change.

3. Inversion round trips: --n source images DDIM-inverted and edit-friendly-DDPM-inverted at
   each of --inv-steps and sampled back (`denoised invert --verify`): max abs and relative L2
   reconstruction error. Target: edit-friendly below 1e-4 at every step count.

The instrument: for a UNet model the glyph classifier (bench/glyph_classifier.pt, heads char,
bold, italic, fg, bg; tools/glyphs/train_classifier.py; the attribute "polarity" is 1 for light
ink on a darker ground, from the fg and bg heads and the palette's luminance); for a GaussianMixtureDenoiser model
(e.g. models/shapes-gmm) the mixture itself: an image's component is the nearest mean, its class
the component's label, and the attributes are the two bits of the component's index within its
class (for shapes-gmm: the colour scheme, bit0 = light background, bit1 = green/blue shape).
Writes a JSON summary with --json.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))


def to_u8(x):
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (the engine's PNG conversion)."""
    x = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


# ---- instruments ---------------------------------------------------------------------------
class GlyphInstrument:
    attributes = ("bold", "italic", "polarity")

    def __init__(self, path):
        from train_classifier import load_classifier
        from render import PALETTE
        self.net = load_classifier(path)
        rgb = np.array([c for _, c in PALETTE], np.float64) / 255.0
        self.luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])

    def read(self, x):
        """{head: [N]} for float images [N, 3, H, W]."""
        from train_classifier import predict
        preds, _ = predict(self.net, to_u8(x))
        # polarity 1: light ink on a darker ground (from the fg and bg colour heads)
        polarity = (self.luminance[preds["fg"]] > self.luminance[preds["bg"]]).astype(np.int64)
        return {"char": preds["char"], "bold": preds["bold"], "italic": preds["italic"],
                "polarity": polarity, "colour": preds["fg"] * 100 + preds["bg"]}


class MixtureInstrument:
    attributes = ("variant_bit0", "variant_bit1")

    def __init__(self, model_dir):
        import st
        t = st.load(os.path.join(model_dir, "diffusion_pytorch_model.safetensors"))
        self.means = t["means"].reshape(t["means"].shape[0], -1).astype(np.float64)
        self.labels = t["labels"].astype(np.int64)
        self.index = np.zeros(len(self.labels), np.int64)  # index of a component in its class
        for c in np.unique(self.labels):
            k = np.nonzero(self.labels == c)[0]
            self.index[k] = np.arange(len(k))

    def read(self, x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        d = (x ** 2).sum(1)[:, None] - 2 * x @ self.means.T + (self.means ** 2).sum(1)[None]
        k = d.argmin(1)
        v = self.index[k]
        return {"char": self.labels[k], "variant_bit0": v & 1, "variant_bit1": (v >> 1) & 1,
                "colour": v}


def ink_weight(x):
    """Per-pixel distance [N, H, W] of float images from their border colour (the ground)."""
    x = np.asarray(x, np.float64)
    border = np.concatenate([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], 2)
    bg = np.median(border, 2)[:, :, None, None]
    return np.sqrt(((x - bg) ** 2).sum(1))


def centroid(x):
    """Ink centroid [N, 2] (y, x): the mean position weighted by ink_weight."""
    w = ink_weight(x)
    w = w / np.maximum(w.sum((1, 2), keepdims=True), 1e-9)
    h, wd = w.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(wd), indexing="ij")
    return np.stack([(w * yy).sum((1, 2)), (w * xx).sum((1, 2))], 1)


def box_centre(x):
    """Centre [N, 2] (y, x) of the ink's bounding box (pixels with at least half the image's
    largest ink weight): where the renderer places a glyph, whatever its shape."""
    w = ink_weight(x)
    ink = w >= 0.5 * np.maximum(w.max((1, 2), keepdims=True), 1e-9)
    out = np.zeros((len(w), 2))
    for i, m in enumerate(ink):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        out[i] = ((ys[0] + ys[-1]) / 2.0, (xs[0] + xs[-1]) / 2.0)
    return out


# ---- the engine ----------------------------------------------------------------------------
class Engine:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.calls = 0

    def run(self, *argv):
        cmd = [self.args.engine] + [str(a) for a in argv] + ["--threads", str(self.args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.calls += 1
        if r.returncode:
            raise SystemExit("edit_eval: %s failed (%d): %s" % (" ".join(cmd), r.returncode,
                                                               r.stderr.strip()))
        return r.stdout

    def path(self, name):
        return os.path.join(self.work, name)

    def guidance(self):
        return ["--guidance-scale", self.args.guidance] if self.args.guidance is not None else []

    def sample(self, cls, n, seed):
        out = self.path("s.npy")
        self.run("sample", "--model", self.args.model, "--class", cls, "--batch", n, "--seed",
                 seed, "--steps", self.args.steps, "--scheduler", "ddim", "--out", out, "--quiet",
                 *self.guidance())
        return np.load(out)


def per_class(n, n_classes):
    """n images spread over the classes: [(class, count)]"""
    base, extra = divmod(n, n_classes)
    return [(c, base + (c < extra)) for c in range(n_classes) if base + (c < extra)]


# ---- 1. boundaries -------------------------------------------------------------------------
def boundary_eval(args, eng, inst, n_classes, report):
    print("== BoundaryDiffusion attribute flips (%d fit images, %d edited, %d-step DDIM grid)" %
          (args.n_fit, args.n, args.steps))
    xs, cls = [], []
    for c, k in per_class(args.n_fit, n_classes):
        xs.append(eng.sample(c, k, args.seed + 1000 + c))
        cls += [c] * k
    fit = np.concatenate(xs)
    cls = np.array(cls)
    np.save(eng.path("fit.npy"), fit.astype(np.float32))
    read = inst.read(fit)
    print("fit pool: %.1f%% read as their class" % (100 * np.mean(read["char"] == cls)))
    strengths = [float(s) for s in args.strengths.split(",")]
    wanted = args.attributes.split(",") if args.attributes else inst.attributes
    for attr in wanted:
        if attr not in inst.attributes:
            raise SystemExit("edit_eval: --attributes: %s is not one of %s" %
                             (attr, ",".join(inst.attributes)))
        lab = read[attr]
        if lab.min() == lab.max():
            print("%s: the pool has only label %d; skipped" % (attr, lab[0]))
            continue
        lpath = eng.path(attr + ".txt")
        with open(lpath, "w") as f:
            f.write("".join("%d %d\n" % (a, c) for a, c in zip(lab, cls)))
        bpath = eng.path(attr + ".json")
        out = eng.run("boundary", "fit", "--model", args.model, "--images", eng.path("fit.npy"),
                      "--labels", lpath, "--steps", args.steps, "--attribute", attr, "--out",
                      bpath, "--quiet", *eng.guidance(),
                      *(["--step", args.mixing_step] if args.mixing_step != "auto" else []))
        print(out.strip())
        with open(bpath) as f:
            b = json.load(f)
        # originals and their verdicts, then edits towards both sides, in each space
        spaces = args.space.split(",") if args.space else [""]
        runs = [(sp, s) for sp in spaces for s in strengths]
        orig, ocls, plus, minus = [], [], {r: [] for r in runs}, {r: [] for r in runs}
        for c, k in per_class(args.n, n_classes):
            seed = args.seed + 5000 + c
            orig.append(eng.sample(c, k, seed))
            ocls += [c] * k
            for sp, s in runs:
                for sign, dst in ((1, plus), (-1, minus)):
                    o = eng.path("e.npy")
                    eng.run("edit", "--model", args.model, "--boundary", bpath, "--strength",
                            sign * s, "--seed", seed, "--batch", k, "--class", c, "--out", o,
                            "--quiet", *eng.guidance(), *(["--space", sp] if sp else []))
                    dst[(sp, s)].append(np.load(o))
        orig = np.concatenate(orig)
        ocls = np.array(ocls)
        r0 = inst.read(orig)
        before = r0[attr]
        rows = []
        for sp, s in runs:
            rp = inst.read(np.concatenate(plus[(sp, s)]))
            rm = inst.read(np.concatenate(minus[(sp, s)]))
            # each image pushed to the side it is not on
            after = np.where(before == 0, rp[attr], rm[attr])
            char = np.where(before == 0, rp["char"], rm["char"])
            flip = after != before
            kept = char == ocls
            row = {"attribute": attr, "space": sp or "default", "strength": s,
                   "flip": float(flip.mean()), "class_kept": float(kept.mean()),
                   "both": float((flip & kept).mean()), "n": int(len(orig)), "step": b["step"],
                   "timestep": b["timestep"], "test_accuracy": b["test_accuracy"]}
            rows.append(row)
            print("  %-10s space %-7s strength %4.1f: flipped %5.1f%%, class kept %5.1f%%, "
                  "both %5.1f%%" % (attr, row["space"], s, 100 * row["flip"],
                                    100 * row["class_kept"], 100 * row["both"]), flush=True)
        ok = [r for r in rows if r["flip"] >= 0.8 and r["class_kept"] >= 0.9]
        print("  %s: %s" % (attr, "target met (space %s, strength %g)" %
                            (ok[0]["space"], ok[0]["strength"]) if ok
                            else "target (flip >= 80%, class >= 90%) not met"))
        report["boundary"].extend(rows)


# ---- 2. class change -----------------------------------------------------------------------
def sources(args, eng, inst, n_classes, rng):
    """--n source images with their classes: held-out real glyphs if available."""
    ho = os.path.join(args.data, "heldout.npz") if args.data else None
    if isinstance(inst, GlyphInstrument) and ho and os.path.isfile(ho):
        with np.load(ho) as z:
            idx = rng.choice(len(z["char"]), args.n, replace=False)
            imgs = z["images"][idx]
            cls = z["char"][idx].astype(np.int64)
        x = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        return x, cls, "held-out real glyphs"
    xs, cls = [], []
    for c, k in per_class(args.n, n_classes):
        xs.append(eng.sample(c, k, args.seed + 9000 + c))
        cls += [c] * k
    return np.concatenate(xs), np.array(cls), "generated samples"


def classchange_eval(args, eng, inst, n_classes, report):
    rng = np.random.RandomState(args.seed)
    x, cls, what = sources(args, eng, inst, n_classes, rng)
    tgt = (cls + rng.randint(1, n_classes, len(cls))) % n_classes
    if args.target == "same":  # the drift of resampling alone, without a class change
        tgt = cls.copy()
    print("== class change by edit-friendly DDPM inversion (%d %s, %d steps, g_src %s, g_tgt %s, "
          "target %s class)" % (len(x), what, args.ddpm_steps, args.g_src, args.g_tgt, args.target))
    src = eng.path("src.npy")
    np.save(src, x.astype(np.float32))
    maps = eng.path("maps.npy")
    ginv = ["--guidance-scale", args.g_src] if args.g_src is not None else []
    out = eng.run("invert", "--model", args.model, "--method", "ddpm", "--image", src, "--class",
                  ",".join(map(str, cls)), "--steps", args.ddpm_steps, "--seed", args.seed,
                  "--out", maps, "--verify", "--quiet", *ginv)
    print("inversion", out.strip())
    r0 = inst.read(x)
    c0, b0 = centroid(x), box_centre(x)
    print("sources: %.1f%% read as their class" % (100 * np.mean(r0["char"] == cls)))
    for skip in [int(s) for s in args.skips.split(",")]:
        o = eng.path("cc.npy")
        eng.run("edit", "--model", args.model, "--noise", maps, "--class",
                ",".join(map(str, tgt)), "--guidance-scale", args.g_tgt, "--skip", skip, "--out",
                o, "--quiet")
        y = np.load(o)
        r = inst.read(y)
        hit = r["char"] == tgt
        colour = r["colour"] == r0["colour"]
        pos = np.hypot(*(box_centre(y) - b0).T) <= 2.0
        cen = np.hypot(*(centroid(y) - c0).T) <= 2.0
        row = {"skip": skip, "target_class": float(hit.mean()), "colour_kept": float(colour.mean()),
               "position_kept": float(pos.mean()), "centroid_kept": float(cen.mean()),
               "all": float((hit & colour & pos).mean()), "n": int(len(x)), "g_src": args.g_src,
               "g_tgt": args.g_tgt, "steps": args.ddpm_steps}
        report["classchange"].append(row)
        print("  skip %3d: target class %5.1f%%, colour kept %5.1f%%, position kept %5.1f%% "
              "(ink centroid %5.1f%%), all three %5.1f%%" %
              (skip, 100 * row["target_class"], 100 * row["colour_kept"],
               100 * row["position_kept"], 100 * row["centroid_kept"], 100 * row["all"]))


def inversion_eval(args, eng, inst, n_classes, report):
    """Reconstruction error of DDIM and edit-friendly DDPM inversion per step count (issue 7's
    table): invert --n source images and sample them back (`denoised invert --verify`)."""
    rng = np.random.RandomState(args.seed + 1)
    x, cls, what = sources(args, eng, inst, n_classes, rng)
    src = eng.path("inv-src.npy")
    np.save(src, x.astype(np.float32))
    print("== inversion round trips (%d %s; errors in [-1, 1] units over all values)"
          % (len(x), what))
    print("| method | steps | max abs error | rel L2 |")
    print("|---|---:|---:|---:|")
    for method in ("ddim", "ddpm"):
        for steps in [int(s) for s in args.inv_steps.split(",")]:
            out = eng.run("invert", "--model", args.model, "--method", method, "--image", src,
                          "--class", ",".join(map(str, cls)), "--steps", steps, "--seed",
                          args.seed, "--out", eng.path("inv.npy"), "--verify", "--quiet")
            m = re.search(r"max abs error ([0-9.e+-]+), rel L2 ([0-9.e+-]+)", out)
            if not m:
                raise SystemExit("edit_eval: no reconstruction line in: %s" % out)
            row = {"method": method, "steps": steps, "max_abs": float(m.group(1)),
                   "rel_l2": float(m.group(2)), "n": int(len(x))}
            report["inversion"].append(row)
            print("| %s | %d | %.3g | %.3g |" % (method, steps, row["max_abs"], row["rel_l2"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "glyphs32"))
    ap.add_argument("--engine", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--classifier", default=os.path.join(BENCH, "glyph_classifier.pt"))
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-fit", type=int, default=400)
    ap.add_argument("--steps", type=int, default=50, help="DDIM grid of the boundary edits")
    ap.add_argument("--mixing-step", default="auto")
    ap.add_argument("--space", default="",
                    help="boundary edit spaces, e.g. x,h,both (default: the CLI's default)")
    ap.add_argument("--attributes", default="",
                    help="boundary attributes to edit (default: all the instrument reads)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="guidance of generation and boundary edits (default: none)")
    ap.add_argument("--strengths", default="1,2,3,4")
    ap.add_argument("--ddpm-steps", type=int, default=100)
    ap.add_argument("--skips", default="0,20,40,60")
    ap.add_argument("--g-src", type=float, default=None, help="guidance of the inversion")
    ap.add_argument("--g-tgt", type=float, default=4.0, help="guidance of the class change")
    ap.add_argument("--target", choices=("other", "same"), default="other",
                    help="class change to a random other class, or resampling in the same one")
    ap.add_argument("--inv-steps", default="10,20,50,100,200",
                    help="step counts of the inversion table")
    ap.add_argument("--only", default="boundary,classchange,inversion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    n_classes = cfg.get("num_class_embeds") or 0
    null = cfg.get("_null_class")
    if cfg.get("_class_name") == "GaussianMixtureDenoiser":
        inst = MixtureInstrument(args.model)
    else:
        inst = GlyphInstrument(args.classifier)
        if null is None and n_classes:
            null = n_classes - 1
    if null is not None and 0 <= null < n_classes:
        n_classes = null  # the null class is not a class to draw or target
    if n_classes < 2:
        raise SystemExit("edit_eval: %s is not a class-conditional model" % args.model)
    report = {"model": args.model, "n": args.n, "boundary": [], "classchange": [], "inversion": []}
    with tempfile.TemporaryDirectory() as work:
        eng = Engine(args, work)
        only = set(args.only.split(","))
        if "boundary" in only:
            boundary_eval(args, eng, inst, n_classes, report)
        if "classchange" in only:
            classchange_eval(args, eng, inst, n_classes, report)
        if "inversion" in only:
            inversion_eval(args, eng, inst, n_classes, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
