#!/usr/bin/python3
"""Relative L2 error of solver configurations against a many-step reference, through the C engine.

    nice -n 10 /usr/bin/python3 bench/solver_ref.py --model models/glyphs32 --class A \\
        --guidance 2 --batch 8 --seed 7 --ref dpm++2m:1000 \\
        --config dpm++2m:5 --config dpm-solver-v3:5:g2-A [--config NAME:NFE[:DATA[:OPT=V,...]]]

Every configuration and the reference start from the same noise (--seed, image i noise stream i)
and run with the model's own scheduler_config.json (so dynamic thresholding is on where the model
asks for it; add `thresholding=false` as an option to turn it off), through

    build/denoised sample --model M --class C --guidance-scale G --batch B --seed S
                          --scheduler NAME --steps NFE [--solver-data DATA]
                          [--scheduler-opt K=V ...] --out x.npy --quiet

The error is ||x - ref|| / ||ref|| over the whole batch (the measure of `denoised bench solvers`,
which solves the plain ODE; this script keeps the model's configuration). The reference's own
error is estimated by the same solve at half its steps. --reps R repeats each run R times and
prints the median wall time per image; runs are interleaved (configuration order within a
repetition), so load from other work spreads over all of them.

`usf` and `dpm-ot` configurations take the schedule or map as DATA (the steps come from it; the
NFE is the label);
`--json FILE` writes the rows.

--classify (the glyph model; bench/glyph_classifier.pt, tools/glyphs/train_classifier.py) adds,
on the same samples, the share the classifier reads as the requested class ("acc") and the
mode-mixture rate: the share whose top class probability is below 0.5 ("mix").
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_config(text):
    parts = text.split(":", 3)
    if len(parts) < 2:
        sys.exit("bad --config %r: NAME:NFE[:DATA[:OPT=V,...]]" % text)
    name, steps = parts[0], int(parts[1])
    data = parts[2] if len(parts) > 2 and parts[2] else None
    opts = [o for o in parts[3].split(",") if o] if len(parts) > 3 else []
    for o in opts:
        if "=" not in o:
            sys.exit("bad option %r in --config %r: KEY=VALUE" % (o, text))
    return {"label": text, "name": name, "steps": steps, "data": data, "opts": opts}


def run(args, cfg, out):
    cmd = [args.denoised, "sample", "--model", args.model, "--batch", str(args.batch),
           "--seed", str(args.seed), "--scheduler", cfg["name"], "--threads", str(args.threads),
           "--out", out, "--quiet"]
    if cfg["name"] not in ("usf", "dpm-ot"):  # their data fixes the steps
        cmd += ["--steps", str(cfg["steps"])]
    if args.cls is not None:
        cmd += ["--class", args.cls]
    if args.guidance is not None:
        cmd += ["--guidance-scale", str(args.guidance)]
    if cfg["data"]:
        cmd += ["--solver-data", cfg["data"]]
    for o in cfg["opts"]:
        cmd += ["--scheduler-opt", o]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit("%s failed (%d): %s" % (" ".join(cmd), p.returncode, p.stderr.strip()))
    return np.load(out).astype(np.float64), dt / args.batch


def classify(x, cls_index):
    """(accuracy for cls_index, share with top probability < 0.5) of samples x [N, 3, H, W]."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_classifier import load_classifier, to_input
    from glyph_eval import to_u8
    net = load_classifier(os.path.join(ROOT, "bench", "glyph_classifier.pt"))
    with torch.no_grad():
        p = torch.softmax(net.heads["char"](net.features(to_input(to_u8(x)))), 1).numpy()
    return float((p.argmax(1) == cls_index).mean()), float((p.max(1) < 0.5).mean())


def rel_l2(x, ref):
    return float(np.sqrt(((x - ref) ** 2).sum() / (ref ** 2).sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "glyphs32"))
    ap.add_argument("--denoised", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--class", dest="cls")
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref", default="dpm++2m:1000")
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--classify", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference (with --classify)")
    args = ap.parse_args()
    if not args.config:
        sys.exit("give at least one --config NAME:NFE[:DATA[:OPT=V,...]]")
    ref_cfg = parse_config(args.ref)
    half = dict(ref_cfg, steps=ref_cfg["steps"] // 2)
    cfgs = [parse_config(c) for c in args.config]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.npy")
        ref = None
        if not args.no_ref:
            ref, _ = run(args, ref_cfg, out)
            ref_half, _ = run(args, half, out)
            print("reference %s: %d images, seed %d, class %s, guidance %s; its own error "
                  "(vs %d steps) %.2e; |x| max %.3f"
                  % (args.ref, args.batch, args.seed, args.cls, args.guidance, half["steps"],
                     rel_l2(ref_half, ref), np.abs(ref).max()))
        times = {c["label"]: [] for c in cfgs}
        xs = {}
        for _ in range(args.reps):
            for c in cfgs:
                x, dt = run(args, c, out)
                xs[c["label"]] = x
                times[c["label"]].append(dt)
    rows = []
    cls_index = None
    if args.classify:
        labels = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        cls_index = int(args.cls) if args.cls.isdigit() else labels.index(args.cls)
    print("| configuration | rel L2 | max abs | s/image |%s" % (" acc | mix |" if args.classify else ""))
    print("| --- | --- | --- | --- |%s" % (" --- | --- |" if args.classify else ""))
    for c in cfgs:
        x = xs[c["label"]]
        row = {"config": c["label"], "rel_l2": rel_l2(x, ref) if ref is not None else None,
               "max_abs": float(np.abs(x).max()),
               "seconds_per_image": float(np.median(times[c["label"]]))}
        extra = ""
        if args.classify:
            row["acc"], row["mix"] = classify(x, cls_index)
            extra = " %.3f | %.3f |" % (row["acc"], row["mix"])
        rows.append(row)
        print("| %s | %s | %.2f | %.3f |%s" % (row["config"], "%.4f" % row["rel_l2"] if ref is not
                                               None else "-", row["max_abs"],
                                               row["seconds_per_image"], extra))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference": args.ref, "model": args.model, "class": args.cls,
                       "guidance": args.guidance, "batch": args.batch, "seed": args.seed,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
