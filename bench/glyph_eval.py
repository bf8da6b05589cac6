#!/usr/bin/python3
"""Sample quality of the glyph model (models/glyphs32): classifier accuracy and Frechet distance.

    OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/glyph_eval.py \
        --solvers ddim,dpm++2m --steps 5,10,20 --guidance 1,2,4 [--n-per-class 28]

For every (solver, steps, guidance) of the grid (the cartesian product of --solvers, --steps,
--guidance, plus any --config SOLVER:STEPS[:GUIDANCE]) it generates --n-per-class samples of
each of the 36 classes through the C engine:

    build/denoised sample --model M --class C --batch N --seed S+C --steps K --scheduler SOLVER
                          [--guidance-scale G] --threads T --out x.npy --quiet [--engine-arg ...]

(`--guidance -` leaves --guidance-scale out: plain conditional sampling, for an engine without
guidance), or with --backend torch through this script's own PyTorch samplers with classifier-free
guidance (tools/torch_unet.py; solvers ddim and dpm++2m, diffusers' DDIMScheduler and
DPMSolverMultistepScheduler defaults as the engine runs them; --snapshot RUN/ema-N.pt evaluates a training snapshot).  It then reports
  acc     the fraction of samples the classifier reads as the requested character
  min     the lowest per-class accuracy (and which class)
  FD      the Frechet distance between classifier features (bench/glyph_classifier.pt, the
          128-d penultimate layer; the FID recipe) of the samples and of held-out half B
  FD/base FD divided by the real-vs-real baseline FD(held-out half A, half B), both halves'
          samples class-balanced and of the same size as the generated set
Baselines printed first: the held-out set (fonts never seen in training) is split into halves
by design group ("group", the default reference, both halves are unseen designs), by face
("face") and by image ("image": the pure finite-sample floor); "train" is real training images
against half B, the FD a perfect model of the training set would get.

The classifier is the instrument: tools/glyphs/train_classifier.py regenerates it
deterministically (it is small enough to live in bench/).  The data set is rendered by
tools/glyphs/render.py into --data (default /work/glyphs-data).
"""
import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "glyphs"))
import torch_unet  # noqa: E402
from train_classifier import load_classifier, predict  # noqa: E402

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NULL_CLASS = 36


# ---- statistics ----------------------------------------------------------------------------
def _sqrtm_psd(c):
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets [N, D]."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    s1 = _sqrtm_psd(c1)
    m = s1 @ c2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)


def balanced(chars, n_per_class, rng, pool=None):
    """Indices of n_per_class images of each class (from pool, default all), without replacement."""
    pool = np.arange(len(chars)) if pool is None else np.asarray(pool)
    out = []
    for c in range(len(CLASSES)):
        idx = pool[chars[pool] == c]
        out.append(rng.choice(idx, n_per_class, replace=len(idx) < n_per_class))
    return np.concatenate(out)


def halves(ho, how, seed):
    """Boolean mask of half A of the held-out set (B is the rest)."""
    faces = ho["face"]
    if how == "image":
        rng = np.random.default_rng(seed)
        a = np.zeros(len(faces), bool)
        a[rng.permutation(len(faces))[: len(faces) // 2]] = True
        return a
    if how == "face":
        a_faces = set()
        for g in np.unique(ho["group"]):
            fs = np.unique(faces[ho["group"] == g])
            a_faces.update(fs[::2].tolist())
        return np.isin(faces, list(a_faces))
    if how == "group":
        sizes = {g: len(np.unique(faces[ho["group"] == g])) for g in np.unique(ho["group"])}
        a_groups, na, nb = [], 0, 0
        for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
            if na <= nb:
                a_groups.append(g)
                na += sizes[g]
            else:
                nb += sizes[g]
        return np.isin(ho["group"], a_groups)
    raise ValueError(how)


# ---- samplers ------------------------------------------------------------------------------
def to_u8(x):
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (the engine's PNG conversion)."""
    x = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def sample_cli(args, solver, steps, guidance, cls, n, seed):
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "x.npy")
        cmd = [args.engine, "sample", "--model", args.model, "--class", str(cls), "--batch", str(n),
               "--seed", str(seed), "--steps", str(steps), "--scheduler", solver,
               "--threads", str(args.threads), "--out", out, "--quiet"]
        if guidance is not None:
            cmd += ["--guidance-scale", str(guidance)]
        cmd += args.engine_arg
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("glyph_eval: %s failed (%d): %s" % (" ".join(cmd), r.returncode, r.stderr.strip()))
        return np.load(out)


class TorchSampler:
    """DDIM (diffusers DDIMScheduler semantics: 'leading' spacing, eta 0, set_alpha_to_one,
    clip_sample or thresholding) and DPM-Solver++(2M) (thresholding if the scheduler config
    asks), with classifier-free guidance eps = eps(null) + g * (eps(c) - eps(null))."""

    def __init__(self, net, sched):
        self.net = net
        betas = torch.linspace(sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02),
                               sched.get("num_train_timesteps", 1000), dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0)
        self.T = len(betas)
        self.clip = sched.get("clip_sample", True)
        self.clip_range = float(sched.get("clip_sample_range", 1.0))
        self.thresholding = sched.get("thresholding", False)
        self.ratio = float(sched.get("dynamic_thresholding_ratio", 0.995))
        self.max_value = float(sched.get("sample_max_value", 1.0))

    def threshold(self, x0):
        """diffusers' _threshold_sample (dynamic thresholding; with sample_max_value 1 a clip)."""
        n = x0.shape[0]
        a = x0.reshape(n, -1).abs()
        s = torch.quantile(a, self.ratio, dim=1).clamp(min=1.0, max=self.max_value).view(n, 1, 1, 1)
        return torch.clamp(x0, -s, s) / s

    @torch.no_grad()
    def eps(self, x, t, y, guidance):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        if guidance is None or guidance == 1:
            return self.net(x, tt, y).double()
        both = self.net(torch.cat([x, x]), torch.cat([tt, tt]),
                        torch.cat([y, torch.full_like(y, NULL_CLASS)])).double()
        ec, eu = both[: x.shape[0]], both[x.shape[0]:]
        return eu + guidance * (ec - eu)

    @torch.no_grad()
    def ddim(self, y, steps, guidance, gen, x=None):
        n = y.shape[0]
        if x is None:
            x = torch.randn((n, 3, 32, 32), generator=gen, dtype=torch.float64)
        ratio = self.T // steps
        ts = (np.arange(steps) * ratio).round()[::-1].astype(np.int64)
        for t in ts:
            a = self.abar[t]
            prev = t - ratio
            ap = self.abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            e = self.eps(x.float(), t, y, guidance)
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            if self.thresholding:
                x0 = self.threshold(x0)
            elif self.clip:
                x0 = x0.clamp(-self.clip_range, self.clip_range)
            x = ap.sqrt() * x0 + (1 - ap).sqrt() * e
        return x.float().numpy()


    @torch.no_grad()
    def dpmpp2m(self, y, steps, guidance, gen, x=None):
        """DPM-Solver++(2M) as current diffusers' DPMSolverMultistepScheduler defaults (and our
        engine): 'linspace' timesteps from 999, data prediction (thresholded if the config
        asks), midpoint second-order update, first order on the first step and the last, which
        goes to sigma = 0 (final_sigmas_type "zero": the result is the last x0 estimate).
        (diffusers 0.21 instead ended on t = 0, second order from 15 steps on.)"""
        n = y.shape[0]
        if x is None:
            x = torch.randn((n, 3, 32, 32), generator=gen, dtype=torch.float64)
        alpha = self.abar.sqrt()
        sigma = (1 - self.abar).sqrt()
        lam = alpha.log() - sigma.log()
        ts = np.linspace(0, self.T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        prev_m, prev_t = None, None
        for i, t in enumerate(ts):
            e = self.eps(x.float(), t, y, guidance)
            m = (x - sigma[t] * e) / alpha[t]
            if self.thresholding:
                m = self.threshold(m)
            if i == len(ts) - 1:
                x = m
                break
            tn = int(ts[i + 1])
            h = lam[tn] - lam[t]
            x_new = (sigma[tn] / sigma[t]) * x - alpha[tn] * torch.expm1(-h) * m
            if prev_m is not None:
                r0 = (lam[t] - lam[prev_t]) / h
                d1 = (m - prev_m) / r0
                x_new = x_new - 0.5 * alpha[tn] * torch.expm1(-h) * d1
            x = x_new
            prev_m, prev_t = m, t
        return x.float().numpy()


def load_torch_model(args):
    import json
    path = os.path.join(args.model, "scheduler_config.json")
    # a snapshot before the model folder exists: the schedule train_unet.py exports (x0 clipped
    # by thresholding with sample_max_value 1; without it DPM-Solver++ reads ~40% lower)
    sched = {"thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    if os.path.isfile(path) or not args.snapshot:
        with open(path) as f:
            sched = json.load(f)
    if args.snapshot:
        s = torch.load(args.snapshot)
        net = torch_unet.TorchUNet(torch_unet.full_config(s["config"]), dict(s["ema"]))
    else:
        net = torch_unet.TorchUNet.from_dir(args.model)
    return TorchSampler(net, sched)


def generate(args, cfg, torch_sampler):
    solver, steps, guidance = cfg
    n = args.n_per_class
    if args.backend == "cli":
        xs = [sample_cli(args, solver, steps, guidance, c, n, args.seed + c) for c in range(len(CLASSES))]
        return np.concatenate(xs)
    fns = {"ddim": torch_sampler.ddim, "dpm++2m": torch_sampler.dpmpp2m}
    if solver not in fns:
        raise SystemExit("glyph_eval: the torch backend has %s (asked for %s)" % (", ".join(fns), solver))
    out = []
    labels = np.repeat(np.arange(len(CLASSES)), n)
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(0, len(labels), args.torch_batch):
        y = torch.from_numpy(labels[i:i + args.torch_batch])
        out.append(fns[solver](y, steps, guidance, gen))
    return np.concatenate(out)


def save_grid(path, imgs, n_per_class, cols=None):
    from PIL import Image
    k = min(n_per_class, 8)
    rows = [imgs[c * n_per_class: c * n_per_class + k] for c in range(len(CLASSES))]
    h = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(h).save(path)


def parse_grid(args):
    cfgs = []

    def g(v):
        return None if v in ("-", "none", "") else float(v)
    if args.solvers:
        for s, k, gg in itertools.product(args.solvers.split(","), args.steps.split(","), args.guidance.split(",")):
            cfgs.append((s, int(k), g(gg)))
    for c in args.config:
        parts = c.split(":")
        cfgs.append((parts[0], int(parts[1]), g(parts[2]) if len(parts) > 2 else None))
    return cfgs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "glyphs32"))
    ap.add_argument("--engine", default=os.path.join(ROOT, "build", "denoised"))
    ap.add_argument("--backend", choices=("cli", "torch"), default="cli")
    ap.add_argument("--snapshot", help="torch backend: EMA snapshot RUN/ema-N.pt instead of --model's weights")
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--classifier", default=os.path.join(BENCH, "glyph_classifier.pt"))
    ap.add_argument("--solvers", help="comma list, e.g. ddim,dpm++2m")
    ap.add_argument("--steps", default="20", help="comma list of step counts (NFE per guidance branch)")
    ap.add_argument("--guidance", default="-", help="comma list of guidance scales; '-' = no --guidance-scale flag")
    ap.add_argument("--config", action="append", default=[], metavar="SOLVER:STEPS[:G]")
    ap.add_argument("--n-per-class", type=int, default=28, help="samples per class (36 classes; 28 -> 1008)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="engine threads (cli backend)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--torch-batch", type=int, default=252)
    ap.add_argument("--engine-arg", action="append", default=[], help="extra argument for denoised sample")
    ap.add_argument("--reference", choices=("group", "face", "image"), default="group")
    ap.add_argument("--grid-dir", help="write an 8-per-class sample grid PNG per configuration here")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    cfgs = parse_grid(args)
    if not cfgs:
        ap.error("nothing to evaluate: give --solvers (with --steps/--guidance) or --config")
    if not os.path.isfile(args.classifier):
        sys.exit("glyph_eval: no classifier %s (train it: tools/glyphs/train_classifier.py)" % args.classifier)
    clf = load_classifier(args.classifier)
    ts = load_torch_model(args) if args.backend == "torch" else None
    ho_path = os.path.join(args.data, "heldout.npz")
    if not os.path.isfile(ho_path):
        sys.exit("glyph_eval: no %s (render it: tools/glyphs/render.py --out %s)" % (ho_path, args.data))
    with np.load(ho_path) as z:
        ho = {k: z[k] for k in ("images", "char", "face", "group")}
    n = args.n_per_class
    rng = np.random.default_rng(args.seed)
    hp, hfeat = predict(clf, ho["images"])
    print("classifier on held-out real images: char accuracy %.4f (%d images)"
          % ((hp["char"] == ho["char"]).mean(), len(ho["char"])))
    base, refs = {}, {}
    for how in ("group", "face", "image"):
        a = halves(ho, how, args.seed)
        ia = balanced(ho["char"], n, rng, np.flatnonzero(a))
        refs[how] = hfeat[~a]
        base[how] = frechet(hfeat[ia], refs[how])
    ref = refs[args.reference]
    with np.load(os.path.join(args.data, "train.npz")) as z:
        tchars = z["char"]
        it = balanced(tchars, n, rng)
        timgs = z["images"][np.sort(it)]
    tp, tfeat = predict(clf, timgs)
    base["train"] = frechet(tfeat, ref)
    print("real-vs-real FD baselines (N = %d per side vs the other half): group %.3f, face %.3f, image %.3f;"
          " train-real vs half B (%s) %.3f" % (n * 36, base["group"], base["face"], base["image"],
                                               args.reference, base["train"]))
    b = base[args.reference]
    src = args.snapshot or args.model
    print("model %s, backend %s, %d samples per configuration, seed %d" % (src, args.backend, n * 36, args.seed))
    print()
    print("| solver | steps | guidance | acc | min class acc | FD | FD/base | s/sample |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = np.repeat(np.arange(len(CLASSES)), n)
    for cfg in cfgs:
        t0 = time.time()
        x = generate(args, cfg, ts)
        dt = (time.time() - t0) / len(x)
        imgs = to_u8(x)
        p, f = predict(clf, imgs)
        ok = p["char"] == labels
        per = ok.reshape(len(CLASSES), n).mean(1)
        fd = frechet(f, ref)
        gs = "-" if cfg[2] is None else "%g" % cfg[2]
        print("| %s | %d | %s | %.4f | %.2f (%s) | %.3f | %.2f | %.3f |"
              % (cfg[0], cfg[1], gs, ok.mean(), per.min(), CLASSES[int(per.argmin())], fd, fd / b, dt), flush=True)
        if args.grid_dir:
            os.makedirs(args.grid_dir, exist_ok=True)
            save_grid(os.path.join(args.grid_dir, "%s-%d-%s.png" % (cfg[0], cfg[1], gs)), imgs, n)


if __name__ == "__main__":
    main()
