#!/usr/bin/python3
"""Trains the class-conditional glyph UNet (models/glyphs32) on the rendered glyph set.

    OPENBLAS_NUM_THREADS=1 nice -n 19 /usr/bin/python3 tools/glyphs/train_unet.py \
        --data /work/glyphs-data --threads 1 [--resume]

Network: diffusers' UNet2DModel (tools/torch_unet.py UNet2D: same module tree and parameter
names, so the weights load in diffusers and in our C engine), num_class_embeds = 37: classes
0-35 are the characters "0-9A-Z" in that order, 36 is the null class used for classifier-free
guidance (each training label is replaced by 36 with probability --p-uncond).
Diffusion: DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon prediction; loss is the MSE on
epsilon with min-SNR weighting (min(SNR, 5) / SNR, --min-snr 0 for plain MSE).
Optimiser AdamW (weight decay 0), linear warm-up then cosine decay to 10%, gradient clipping
at 1; EMA of the weights with decay min(--ema, (1 + n) / (10 + n)).  The EMA weights are shipped.

Determinism: all randomness (init, batches, timesteps, noise, label dropout) comes from torch
generators seeded by --seed; checkpoints store their states, so a resumed run continues the
same sequence (bit-identical on the same machine and thread count).

Checkpoints (model, EMA, optimiser, RNG states, loss history) go to RUN/ckpt.pt every
--ckpt-minutes and at the end, EMA-only snapshots to RUN/ema-<step>.pt every --snapshot-every
steps; the log is RUN/train.log.  RUN defaults to DATA/run.  At the end (or with --export-only)
the model directory is written: config.json, diffusion_pytorch_model.safetensors (EMA),
scheduler_config.json, MODEL_CARD.md.

--measure times training steps (batch --batch) for the configured network and exits.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, HERE)
import st  # noqa: E402
import torch_unet  # noqa: E402

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NULL_CLASS = len(CLASSES)
T = 1000
BETA = (1e-4, 0.02)


def unet_config(args):
    ch = [int(c) for c in args.channels.split(",")]
    attn = [int(a) for a in args.attn_levels.split(",")] if args.attn_levels else []
    down = ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(ch))]
    up = ["AttnUpBlock2D" if (len(ch) - 1 - i) in attn else "UpBlock2D" for i in range(len(ch))]
    return dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=ch,
                layers_per_block=args.layers, down_block_types=down, up_block_types=up,
                num_class_embeds=NULL_CLASS + 1, attention_head_dim=args.head_dim,
                norm_num_groups=args.groups, resnet_time_scale_shift=args.time_scale_shift,
                add_attention=True)


def schedule():
    betas = torch.linspace(BETA[0], BETA[1], T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    return betas, abar


def load_data(data_dir):
    path = os.path.join(data_dir, "train.npz")
    with np.load(path) as z:
        images = z["images"]
        chars = z["char"]
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # uint8 NCHW
    y = torch.from_numpy(chars.astype(np.int64))
    return x, y


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class Trainer:
    def __init__(self, args, data=None):
        self.args = args
        self.cfg = unet_config(args)
        torch.manual_seed(args.seed)
        # channels_last: oneDNN's convolutions (forward and backward) are ~25% faster with it
        self.net = torch_unet.UNet2D(self.cfg, seed=args.seed).to(memory_format=torch.channels_last)
        self.ema = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                     weight_decay=0.0, eps=1e-8)
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        _, abar = schedule()
        self.sqrt_ab = abar.sqrt().float()
        self.sqrt_1mab = (1 - abar).sqrt().float()
        snr = abar / (1 - abar)
        if args.min_snr > 0:
            self.w = (torch.clamp(snr, max=args.min_snr) / snr).float()
        else:
            self.w = torch.ones(T)
        self.step = 0
        self.losses = []  # (step, mean loss over the logging window)
        self.elapsed = 0.0
        self.data = data

    def n_params(self):
        return sum(p.numel() for p in self.net.parameters())

    def train_step(self, x0, y):
        a, g = self.args, self.gen
        n = x0.shape[0]
        t = torch.randint(0, T, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(n, generator=g) < a.p_uncond
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        xt = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        xt = xt.contiguous(memory_format=torch.channels_last)
        for grp in self.opt.param_groups:
            grp["lr"] = lr_at(self.step, a)
        eps = self.net(xt, t, y)
        per = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * self.w[t]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        d = min(a.ema, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        self.step += 1
        return float(per.mean())  # unweighted MSE, for the log

    def batch(self):
        x, y = self.data
        idx = torch.randint(0, x.shape[0], (self.args.batch,), generator=self.gen)
        return x[idx].float() / 127.5 - 1.0, y[idx]

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self):
        return dict(step=self.step, model=self.net.state_dict(), ema=self.ema,
                    opt=self.opt.state_dict(), gen=self.gen.get_state(),
                    torch_rng=torch.get_rng_state(), losses=self.losses, elapsed=self.elapsed,
                    config=self.cfg, args=vars(self.args))

    def save(self, path):
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def load(self, path):
        s = torch.load(path)
        if s["config"] != self.cfg:
            raise SystemExit("train_unet: %s was trained with a different network: %s" % (path, s["config"]))
        self.net.load_state_dict(s["model"])
        self.ema = s["ema"]
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        self.step = s["step"]
        self.losses = s["losses"]
        self.elapsed = s["elapsed"]


def export(trainer, out_dir, args, wall=None, data_info=None):
    """Writes the diffusers model folder from the EMA weights."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = torch_unet.full_config(trainer.cfg)
    cfg["_null_class"] = NULL_CLASS
    cfg["_class_labels"] = list(CLASSES)
    cfg["_guidance"] = "classifier-free: eps = eps(null) + s * (eps(class) - eps(null)), null class = _null_class"
    cfg = dict(sorted(cfg.items()))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    weights = {k: v.detach().float().contiguous().numpy() for k, v in trainer.ema.items()}
    nbytes = sum(v.size for v in weights.values()) * 4
    dtype = "F32" if nbytes < 19e6 else "F16"
    st.save(os.path.join(out_dir, "diffusion_pytorch_model.safetensors"), weights, dtype=dtype,
            metadata={"format": "pt", "step": str(trainer.step), "seed": str(args.seed)})
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": T, "beta_start": BETA[0],
             "beta_end": BETA[1], "beta_schedule": "linear", "prediction_type": "epsilon",
             "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
             "thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    # thresholding with sample_max_value 1 clips every x0 prediction to [-1, 1] -- the same as
    # clip_sample, but honoured by the data-prediction solvers (DPM-Solver++, UniPC, DEIS) too.
    # A small epsilon model's x0 estimate at t ~ 999 (alpha ~ 0.006) is off by several units,
    # which unclipped DPM-Solver++ carries into saturated colours.
    # no timestep_spacing / steps_offset: every solver keeps its own diffusers default (DDIM and
    # DDPM "leading", DPM-Solver "linspace"); a shared "leading" would start DPM-Solver++ at t=900
    with open(os.path.join(out_dir, "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2, sort_keys=True)
        f.write("\n")
    write_card(trainer, out_dir, args, dtype, data_info)


def write_card(trainer, out_dir, args, dtype, data_info):
    a = args
    losses = trainer.losses
    rows = []
    if losses:
        marks = sorted({min(len(losses) - 1, int(round(i * (len(losses) - 1) / 10))) for i in range(11)})
        rows = [losses[i] for i in marks]
    cmd = ("OPENBLAS_NUM_THREADS=1 nice -n 19 /usr/bin/python3 tools/glyphs/train_unet.py "
           "--data %s --out %s --channels %s --layers %d --attn-levels %s --head-dim %d --groups %d "
           "--time-scale-shift %s --batch %d --steps %d --lr %g --warmup %d --ema %g --p-uncond %g "
           "--min-snr %g --seed %d --threads %d"
           % ("/work/glyphs-data", "models/glyphs32", a.channels, a.layers, a.attn_levels, a.head_dim,
              a.groups, a.time_scale_shift, a.batch, a.steps, a.lr, a.warmup, a.ema, a.p_uncond,
              a.min_snr, a.seed, a.threads))
    di = data_info or {}
    lines = [
        "# glyphs32: class-conditional glyph UNet",
        "",
        "A diffusers `UNet2DModel` (%d parameters, %s weights = the EMA of training) that draws one"
        % (trainer.n_params(), dtype),
        "character (`0-9`, `A-Z`) in a foreground colour on a background colour at 32x32, trained here",
        "from Debian's fonts with Debian's `python3-torch`.  Nothing in it was downloaded.",
        "",
        "## Conditioning",
        "",
        "- `num_class_embeds` = 37.  Class `i` < 36 is the character `_class_labels[i]` =",
        "  `\"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\"[i]`; class 36 (`_null_class`) is the",
        "  unconditional / null class (labels were dropped to 36 with probability %g)." % a.p_uncond,
        "- Classifier-free guidance with scale s: `eps = eps(x, t, 36) + s * (eps(x, t, c) - eps(x, t, 36))`",
        "  (s = 1 is plain conditional sampling).",
        "- Schedule: DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon prediction",
        "  (`scheduler_config.json`, DDPMScheduler keys).",
        "",
        "## Data",
        "",
        "`tools/glyphs/render.py` (seed 0) from the %s faces in `tools/glyphs/fonts.txt`: %s training"
        % (di.get("fonts", "?"), di.get("train_images", "?")),
        "images (%s faces x 36 characters x 16 colour/position/scale variants), split from the"
        % di.get("train_faces", "?"),
        "held-out set by design group (%s held-out faces never seen in training)." % di.get("heldout_faces", "?"),
        "",
        "## Training",
        "",
        "- Network: block_out_channels %s, layers_per_block %d, attention at levels %s (head dim %d),"
        % (a.channels, a.layers, a.attn_levels, a.head_dim),
        "  norm_num_groups %d, resnet_time_scale_shift %s." % (a.groups, a.time_scale_shift),
        "- %d steps of batch %d (%.1f epochs), AdamW lr %g (warm-up %d, cosine to 10%%), grad clip 1,"
        % (trainer.step, a.batch, trainer.step * a.batch / max(1, di.get("train_images", 1)), a.lr, a.warmup),
        "  min-SNR-%g loss weighting, EMA decay %g (with warm-up), seed %d." % (a.min_snr, a.ema, a.seed),
        "- Wall time: %.1f min of training on %d torch thread(s) (Debian python3-torch %s)."
        % (trainer.elapsed / 60, a.threads, torch.__version__),
        "- Command (renders nothing itself: run `tools/glyphs/render.py` first):",
        "",
        "      " + cmd,
        "",
        "Loss (unweighted epsilon MSE, mean over the logging window):",
        "",
        "| step | loss |",
        "|---:|---:|",
    ]
    lines += ["| %d | %.4f |" % (s, l) for s, l in rows]
    lines += ["", "Quality: see `bench/glyph_eval.py` (classifier accuracy and Frechet distance).", ""]
    with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(lines))


def data_info(data_dir):
    try:
        with open(os.path.join(data_dir, "render.json")) as f:
            r = json.load(f)
        return dict(fonts=r["fonts"], train_images=r["splits"]["train"]["images"],
                    train_faces=r["splits"]["train"]["faces"], heldout_faces=r["splits"]["heldout"]["faces"])
    except (OSError, KeyError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--run", help="checkpoint/log dir (default DATA/run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "glyphs32"))
    ap.add_argument("--channels", default="16,32,64")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--attn-levels", default="2", help="comma list of levels with attention (0 = 32x32)")
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--time-scale-shift", default="scale_shift", choices=("default", "scale_shift"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from RUN/ckpt.pt if it exists")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--snapshot-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--export-only", action="store_true", help="write the model folder from RUN/ckpt.pt")
    ap.add_argument("--measure", type=int, default=0, metavar="N", help="time N steps and exit")
    args = ap.parse_args()

    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        print("train_unet: warning: set OPENBLAS_NUM_THREADS=1 (else OpenBLAS oversubscribes the cores)",
              file=sys.stderr)
    torch.set_num_threads(args.threads)
    run = args.run or os.path.join(args.data, "run")

    if args.measure:
        tr = Trainer(args)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand((args.batch, 3, 32, 32), generator=g) * 2 - 1
        y = torch.randint(0, NULL_CLASS, (args.batch,), generator=g)
        for _ in range(2):
            tr.train_step(x0, y)
        t0 = time.perf_counter()
        for _ in range(args.measure):
            tr.train_step(x0, y)
        dt = (time.perf_counter() - t0) / args.measure
        print("channels %s layers %d attn %s params %d batch %d threads %d: %.3f s/step"
              % (args.channels, args.layers, args.attn_levels, tr.n_params(), args.batch, args.threads, dt))
        return

    ckpt = os.path.join(run, "ckpt.pt")
    if args.export_only:
        tr = Trainer(args)
        tr.load(ckpt)
        export(tr, args.out, args, data_info=data_info(args.data))
        print("wrote %s (step %d)" % (args.out, tr.step))
        return

    os.makedirs(run, exist_ok=True)
    logf = open(os.path.join(run, "train.log"), "a")

    def log(msg):
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + msg
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    tr = Trainer(args, load_data(args.data))
    if args.resume and os.path.isfile(ckpt):
        tr.load(ckpt)
        log("resumed from %s at step %d (%.1f min trained)" % (ckpt, tr.step, tr.elapsed / 60))
    else:
        log("start: %d params, %d training images, args %s" % (tr.n_params(), tr.data[0].shape[0], vars(args)))

    stop = {"flag": False}

    def on_term(signum, frame):
        stop["flag"] = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    last_ckpt = time.time()
    window = []
    t_prev = time.time()
    while tr.step < args.steps and not stop["flag"]:
        x0, y = tr.batch()
        window.append(tr.train_step(x0, y))
        now = time.time()
        # wall time between steps; a gap > 60 s (SIGSTOP, suspend) is not counted
        dt = now - t_prev
        tr.elapsed += dt if dt < 60 else 0.0
        t_prev = now
        if tr.step % args.log_every == 0:
            m = float(np.mean(window))
            tr.losses.append((tr.step, m))
            window = []
            rate = tr.elapsed / tr.step if tr.step else 0
            log("step %d loss %.4f lr %.2e  %.2f s/step  %.1f min, eta %.1f min"
                % (tr.step, m, lr_at(tr.step - 1, args), rate, tr.elapsed / 60,
                   (args.steps - tr.step) * rate / 60))
        if tr.step % args.snapshot_every == 0:
            torch.save({"step": tr.step, "ema": tr.ema, "config": tr.cfg}, os.path.join(run, "ema-%06d.pt" % tr.step))
        if now - last_ckpt > args.ckpt_minutes * 60:
            tr.save(ckpt)
            last_ckpt = now
    tr.save(ckpt)
    if stop["flag"]:
        log("stopped at step %d; checkpoint %s (continue with --resume)" % (tr.step, ckpt))
        return
    export(tr, args.out, args, data_info=data_info(args.data))
    log("done: %d steps, %.1f min; wrote %s" % (tr.step, tr.elapsed / 60, args.out))


if __name__ == "__main__":
    main()
