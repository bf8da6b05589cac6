#!/usr/bin/python3
"""DomainStudio against plain fine-tuning on 10 shots of a glyph style the default model never saw.

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/domainstudio.py [--group concrete] \
        [--shots 10] [--steps 400] [--n-per-class 8] [--methods domainstudio,plain] \
        [--work /tmp/dstudio-bench] [--threads 2]

The style: one held-out design group of /work/glyphs-data/heldout.npz (fonts in no training
image; "concrete" = Concrete Roman by default). The shots: --shots images of as many different
characters of that group (colours and placement as rendered), written as PNGs with a
metadata.jsonl, drawn from --seed. Each method fine-tunes models/glyphs32 through the engine:

    build/denoised finetune --init models/glyphs32 --images SHOTS --method M --steps N \
        --seed S --threads T --out WORK/M [--engine-arg ...]

(the authors' recipe otherwise: Adam lr 1e-4, batch 3), then samples --n-per-class images of
each of the 36 classes (dpm++2m, 20 steps, guidance 2: the model's recommended settings; seeds
from 5000 + class), as does the unadapted model ("source"). Reported per model, with the glyph
classifier (bench/glyph_classifier.pt, 128-d penultimate features, bench/glyph_eval.py's FD):
  FD       Frechet distance of the samples' features to all real renders of the group
  div      diversity: mean pairwise L2 distance of the features among samples of one class,
           averaged over the classes (the paper's intra-LPIPS, with this classifier's features)
  acc_new  the classifier's accuracy on the classes not among the shots (are they still drawn?)
  acc_shot the same on the shot classes
  nn_shot  mean feature distance of shot-class samples to the nearest shot (small: copies)
and the fine-tuning wall time. DomainStudio's target (issue 17): div >= 1.2x plain's at an
equal or better FD.

Figures (models/glyphs32, group concrete, 10 shots, 400 steps, 8 samples per class; busy
2-core machine, nice -n 10; "DS" = --method domainstudio):

  --seed 0 (shots 012689EHMT), the engine's defaults (pair 4, hf_pair 4, hf_mse 1):
    source  FD  93.43  div 20.37  acc_new 0.971
    DS      FD 111.23  div 22.14  acc_new 0.827   fine-tune 100 s
    plain   FD  69.98  div 19.52  acc_new 0.976   fine-tune  93 s
    DS / plain: diversity x1.134, FD 111.2 vs 70.0: MISSED (x1.2 needed, FD worse)
  --seed 0, --engine-arg=--hf-pair-weight=0 --engine-arg=--hf-mse-weight=0 --methods
  domainstudio --no-source (what the authors' training_fewshot_losses computes for a model
  without learned variance, like ours: loss = mse + similarity, the hf terms only enter the
  learned-sigma branch):
    DS      FD 108.37  div 20.19  acc_new 0.899   fine-tune  92 s
    DS / plain: diversity x1.034, FD 108.4 vs 70.0: MISSED
  --seed 1 (other shots: 148BCELRSW, and other training noise), defaults, --no-source:
    DS      FD 114.11  div 22.71  acc_new 0.779   fine-tune  77 s
    plain   FD  55.70  div 21.36  acc_new 0.942   fine-tune  54 s
    DS / plain: diversity x1.063, FD 114.1 vs 55.7: MISSED

The loss scaling is the authors': their hf MSE is mean_flat over the same [-1, 1] images of
hf(x0) with x0 = _predict_xstart_from_eps(x_t, t, eps) for both the model's eps and the true
noise (so the target is x_start itself); its size (~1e3 against ~0.2 for the other terms at
400 steps) comes from 1 / sqrt(alpha_bar_t), up to ~160 at t near T of the linear schedule,
amplifying the eps error of late timesteps, in their code as in ours. On this model and data
DomainStudio keeps somewhat more diversity than plain fine-tuning (x1.03 to x1.13) but moves
the samples away from the style (FD worse than the unadapted model's) and loses recognition
of the unseen classes; the 1.2x target at equal FD is not met.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
from glyph_eval import CLASSES, frechet, to_u8  # noqa: E402
from train_classifier import load_classifier, predict  # noqa: E402


def make_shots(ho, group, n, seed, out):
    from PIL import Image
    names = list(ho["group_names"])
    if group not in names:
        raise SystemExit("domainstudio: no group %r (held-out groups: %s)" % (
            group, ", ".join(sorted(set(names[g] for g in np.unique(ho["group"]))))))
    sel = np.where(ho["group"] == names.index(group))[0]
    if len(sel) == 0:
        raise SystemExit("domainstudio: group %r is not held out" % group)
    rng = np.random.default_rng(seed)
    chars = rng.choice(len(CLASSES), n, replace=False)
    os.makedirs(out, exist_ok=True)
    meta, picked = [], []
    for c in chars:
        i = rng.choice(sel[ho["char"][sel] == c])
        picked.append(i)
        fn = "%s.png" % CLASSES[c]
        Image.fromarray(ho["images"][i]).save(os.path.join(out, fn))
        meta.append(json.dumps({"file_name": fn, "label": CLASSES[c]}))
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        f.write("\n".join(meta) + "\n")
    return sorted(int(c) for c in chars), sel, np.array(picked)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit("domainstudio: %s failed (%d): %s" % (" ".join(cmd), r.returncode,
                                                                r.stderr.strip()[-2000:]))
    return r


def samples(args, model):
    out = os.path.join(args.work, "x.npy")
    xs = []
    for c in range(len(CLASSES)):
        run([args.engine, "sample", "--model", model, "--class", str(c), "--batch",
             str(args.n_per_class), "--seed", str(args.sample_seed + c), "--steps",
             str(args.sample_steps), "--scheduler", "dpm++2m", "--guidance-scale",
             str(args.guidance), "--threads", str(args.threads), "--out", out, "--quiet"])
        xs.append(np.load(out))
    return to_u8(np.concatenate(xs))


def metrics(net, imgs, n_per_class, shot_classes, real_feats, shot_feats):
    pred, feats = predict(net, imgs)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    ok = pred["char"] == labels
    shot = np.isin(labels, shot_classes)
    div = []
    for c in range(len(CLASSES)):
        f = feats[labels == c]
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        div.append(d[np.triu_indices(len(f), 1)].mean())
    fs = feats[shot]
    nn = np.sqrt(((fs[:, None, :] - shot_feats[None, :, :]) ** 2).sum(-1)).min(1).mean()
    return {"FD": frechet(feats, real_feats), "div": float(np.mean(div)),
            "acc_new": float(ok[~shot].mean()), "acc_shot": float(ok[shot].mean()),
            "nn_shot": float(nn)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "glyphs32"))
    ap.add_argument("--engine", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--classifier", default=os.path.join(BENCH, "glyph_classifier.pt"))
    ap.add_argument("--group", default="concrete")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
    ap.add_argument("--methods", default="domainstudio,plain")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="extra argument for denoised finetune (e.g. --hf-mse-weight=0)")
    ap.add_argument("--n-per-class", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sample-seed", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/dstudio-bench")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-source", action="store_true",
                    help="skip the unadapted model's samples (its figures do not change)")
    args = ap.parse_args()
    if args.n_per_class < 2:
        raise SystemExit("domainstudio: --n-per-class must be >= 2 (diversity is pairwise)")
    os.makedirs(args.work, exist_ok=True)
    ho = np.load(os.path.join(args.data, "heldout.npz"))
    shot_dir = os.path.join(args.work, "shots")
    shot_classes, sel, picked = make_shots(ho, args.group, args.shots, args.seed, shot_dir)
    net = load_classifier(args.classifier)
    _, real_feats = predict(net, ho["images"][sel])
    _, shot_feats = predict(net, ho["images"][picked])
    print("group %s: %d real renders; shots %s; fine-tuning %d steps; %d samples per class, "
          "dpm++2m %d steps, guidance %g" % (args.group, len(sel),
                                             "".join(CLASSES[c] for c in shot_classes), args.steps,
                                             args.n_per_class, args.sample_steps, args.guidance))
    results = {}
    for method in ([] if args.no_source else ["source"]) + args.methods.split(","):
        model, wall = args.model, 0.0
        if method != "source":
            model = os.path.join(args.work, method)
            subprocess.run(["rm", "-rf", model], check=True)
            t0 = time.time()
            run([args.engine, "finetune", "--init", args.model, "--images", shot_dir, "--method",
                 method, "--steps", str(args.steps), "--seed", str(args.seed), "--threads",
                 str(args.threads), "--out", model, "--quiet"] + args.engine_arg)
            wall = time.time() - t0
        t0 = time.time()
        m = metrics(net, samples(args, model), args.n_per_class, shot_classes, real_feats,
                    shot_feats)
        m.update(finetune_s=wall, sample_s=time.time() - t0)
        results[method] = m
        print("%-13s FD %7.2f  div %6.3f  acc_new %.3f  acc_shot %.3f  nn_shot %6.3f  "
              "fine-tune %5.0f s" % (method, m["FD"], m["div"], m["acc_new"], m["acc_shot"],
                                      m["nn_shot"], wall), flush=True)
    if "domainstudio" in results and "plain" in results:
        d, p = results["domainstudio"], results["plain"]
        print("domainstudio / plain: diversity x%.3f (target >= 1.2), FD %.2f vs %.2f (target: <=)"
              % (d["div"] / p["div"], d["FD"], p["FD"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), results=results, shot_classes=shot_classes), f, indent=1)


if __name__ == "__main__":
    main()
