#!/usr/bin/python3
"""Trains the glyph classifier, the instrument bench/glyph_eval.py measures samples with.

    OPENBLAS_NUM_THREADS=1 nice -n 19 /usr/bin/python3 tools/glyphs/train_classifier.py \
        --data /work/glyphs-data [--epochs 1.5] [--threads 1] [--copy bench/glyph_classifier.pt]

A small CNN (GlyphNet, ~0.4M parameters) on the rendered glyph set (tools/glyphs/render.py)
with one head per attribute: char (36, "0-9A-Z"), bold (2), italic (2), style (3: serif, sans,
mono), fg and bg (palette indices).  Its penultimate layer (FEATURES = 128 values after ReLU)
is the feature space of the Frechet distance.  Inputs are float images in [-1, 1], NCHW.
Training adds Gaussian noise (sigma ~ U(0, 0.1)) to half the images so that slightly noisy
samples are not out of distribution.  Deterministic for a given --seed and thread count.

Writes DATA/glyph_classifier.pt ({"state_dict", "arch", "heads", "accuracy", ...}) and, when
it is under 2 MB, a copy to --copy (default bench/glyph_classifier.pt).  Prints held-out
accuracy per head.
"""
import argparse
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADS = (("char", 36), ("bold", 2), ("italic", 2), ("style", 3), ("fg", 10), ("bg", 10))
LOSS_W = {"char": 1.0, "bold": 0.5, "italic": 0.5, "style": 0.5, "fg": 0.25, "bg": 0.25}
FEATURES = 128
ARCH = dict(widths=(32, 64, 128, 128), features=FEATURES)


class GlyphNet(nn.Module):
    def __init__(self, widths=(32, 64, 128, 128), features=FEATURES, heads=HEADS):
        super().__init__()
        w0, w1, w2, w3 = widths

        def cbr(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            cbr(3, w0), nn.MaxPool2d(2),                # 16x16
            cbr(w0, w1), nn.MaxPool2d(2),               # 8x8
            cbr(w1, w2), cbr(w2, w2), nn.MaxPool2d(2),  # 4x4
            cbr(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(w3, features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in heads})

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        f = self.body(x)
        return {name: head(f) for name, head in self.heads.items()}


def load_classifier(path):
    """GlyphNet in eval mode from a file written by this script."""
    ck = torch.load(path)
    net = GlyphNet(**ck["arch"])
    net.load_state_dict(ck["state_dict"])
    net.eval()
    return net


def to_input(images_u8):
    """uint8 [N, 32, 32, 3] (HWC) -> float [N, 3, 32, 32] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def predict(net, images_u8, batch=500):
    """{head: argmax [N]} and features [N, FEATURES] (numpy) for uint8 HWC images."""
    preds = {name: [] for name, _ in HEADS}
    feats = []
    for i in range(0, len(images_u8), batch):
        x = to_input(images_u8[i:i + batch]).contiguous(memory_format=torch.channels_last)
        f = net.features(x)
        feats.append(f.numpy())
        for name, head in net.heads.items():
            preds[name].append(head(f).argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats).astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--epochs", type=float, default=1.5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--copy", default=os.path.join(ROOT, "bench", "glyph_classifier.pt"),
                    help="copy here if the file is under 2 MB ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    tr = np.load(os.path.join(args.data, "train.npz"))
    ho = np.load(os.path.join(args.data, "heldout.npz"))
    x_u8 = torch.from_numpy(tr["images"]).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    labels = {name: torch.from_numpy(tr[name].astype(np.int64)) for name, _ in HEADS}
    n = x_u8.shape[0]
    steps = int(math.ceil(args.epochs * n / args.batch))
    net = GlyphNet(**ARCH).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    print("classifier: %d params, %d images, %d steps" % (sum(p.numel() for p in net.parameters()), n, steps),
          flush=True)
    t0 = time.time()
    perm = torch.randperm(n, generator=g)
    pos = 0
    net.train()
    for step in range(steps):
        if pos + args.batch > n:
            perm = torch.randperm(n, generator=g)
            pos = 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x = x_u8[idx].float() / 127.5 - 1.0
        sig = torch.rand(len(idx), 1, 1, 1, generator=g) * 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5)
        x = (x + sig * torch.randn(x.shape, generator=g)).contiguous(memory_format=torch.channels_last)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps)) * min(1.0, (step + 1) / 100)
        for grp in opt.param_groups:
            grp["lr"] = lr
        out = net(x)
        loss = sum(LOSS_W[k] * F.cross_entropy(out[k], labels[k][idx]) for k in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            acc = (out["char"].argmax(1) == labels["char"][idx]).float().mean().item()
            print("step %d/%d loss %.4f char acc %.3f  %.0f s" % (step + 1, steps, loss.item(), acc, time.time() - t0),
                  flush=True)
    net.eval()
    preds, _ = predict(net, ho["images"])
    acc = {name: float((preds[name] == ho[name]).mean()) for name, _ in HEADS}
    print("held-out accuracy (%d images, %d faces never seen): %s"
          % (len(ho["char"]), len(np.unique(ho["face"])), ", ".join("%s %.4f" % kv for kv in acc.items())))
    conf = {}
    classes = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for t, p in zip(ho["char"], preds["char"]):
        if t != p:
            conf[(classes[t], classes[p])] = conf.get((classes[t], classes[p]), 0) + 1
    top = sorted(conf.items(), key=lambda kv: -kv[1])[:10]
    print("most frequent char confusions (true->pred: count): %s" % ", ".join("%s->%s: %d" % (a, b, c) for (a, b), c in top))
    out_path = os.path.join(args.data, "glyph_classifier.pt")
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "arch": ARCH, "heads": HEADS, "heldout_accuracy": acc,
                "seed": args.seed, "epochs": args.epochs, "train_seconds": time.time() - t0,
                "torch": torch.__version__}, out_path)
    size = os.path.getsize(out_path)
    print("wrote %s (%d bytes)" % (out_path, size))
    if args.copy:
        if size < 2 * 1024 * 1024:
            shutil.copyfile(out_path, args.copy)
            print("copied to %s" % args.copy)
        else:
            print("not copied to %s: %d bytes >= 2 MB" % (args.copy, size))


if __name__ == "__main__":
    main()
