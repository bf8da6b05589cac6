#!/usr/bin/python3
"""PyTorch references for the engine's classifier (tests/test_classifier.c reads them).

    /usr/bin/python3 tools/gen_classifier_fixtures.py [--out tests/fixtures/classifier] [--seed 1]

Two cases, each a folder with
  x.npy           float32 [N, C, S, S] input images in [-1, 1]
  logits.npy      all heads' logits [N, n_logits] (heads in config order), features.npy
  grad_logits.npy a random upstream gradient G; grad_x.npy = d sum(G * logits) / dx
  target.npy      int64 [N] classes of the first head; logp.npy = log_softmax(head 0)[target],
                  grad_logp.npy = d sum(logp) / dx (classifier guidance's term)
computed by torch.autograd in float64 from the float32 weights (BatchNorm in eval mode):
  glyph/  the exported glyph classifier (models/glyph-classifier, from
          tools/export_classifier.py), on 6 tiles of models/glyphs32/samples.png and 2 of them
          with Gaussian noise (sigma 0.3), as classifier guidance sees them
  tiny/   a GlyphNet of another shape (1 channel, 16x16, widths 4/6/8/8, 3 heads, random weights
          and batch-norm statistics), whose model folder is written here too: the engine builds
          the network from config.json's layer list, not from the glyph model's shape
Needs Debian's python3-torch, python3-numpy and python3-pil.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "glyphs"))
import export_classifier as ex  # noqa: E402
import st  # noqa: E402
from train_classifier import GlyphNet  # noqa: E402


class OneChannelNet(GlyphNet):
    """GlyphNet with 1 input channel (the first conv replaced)."""

    def __init__(self, widths, features, heads):
        super().__init__(widths=widths, features=features, heads=heads)
        self.body[0][0] = torch.nn.Conv2d(1, widths[0], 3, padding=1, bias=False)


def references(net, x, gen, out, heads):
    net = net.double().eval()
    xd = torch.from_numpy(x).double().requires_grad_(True)
    f = net.features(xd)
    logits = torch.cat([net.heads[name](f) for name, _ in heads], dim=1)
    g = torch.randn(logits.shape, generator=gen).double()
    (gx,) = torch.autograd.grad((logits * g).sum(), xd, retain_graph=True)
    n0 = heads[0][1]
    target = torch.randint(0, n0, (x.shape[0],), generator=gen)
    logp = F.log_softmax(logits[:, :n0], dim=1).gather(1, target[:, None])[:, 0]
    (glp,) = torch.autograd.grad(logp.sum(), xd)
    os.makedirs(out, exist_ok=True)
    for name, arr in (("x", x), ("logits", logits), ("features", f), ("grad_logits", g),
                      ("grad_x", gx), ("logp", logp), ("grad_logp", glp)):
        a = arr.detach().numpy() if torch.is_tensor(arr) else arr
        np.save(os.path.join(out, name + ".npy"), a.astype(np.float32))
    np.save(os.path.join(out, "target.npy"), target.numpy().astype(np.int64))


def glyph_case(out, gen):
    from PIL import Image
    folder = os.path.join(ROOT, "models", "glyph-classifier")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    heads = [(h["name"], h["classes"]) for h in cfg["heads"]]
    net = GlyphNet(heads=heads)
    sd = {k: torch.from_numpy(v) for k, v in st.load(os.path.join(folder, "model.safetensors")).items()}
    net.load_state_dict(sd, strict=False)
    grid = np.asarray(Image.open(os.path.join(ROOT, "models", "glyphs32", "samples.png")).convert("RGB"))
    tiles = [grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] for r, c in
             ((0, 0), (1, 10), (3, 17), (5, 22), (9, 30), (15, 35), (2, 4), (7, 12))]
    x = np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    x[6:] += 0.3 * torch.randn(x[6:].shape, generator=gen).numpy()
    references(net, x.astype(np.float32), gen, out, heads)


def tiny_case(out, gen):
    heads = (("shape", 5), ("flag", 2), ("tone", 3))
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    net = OneChannelNet(widths=(4, 6, 8, 8), features=12, heads=heads)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    net.eval()
    cfg = ex.build_config(net, heads)
    cfg["in_channels"], cfg["sample_size"] = 1, 16
    for h in cfg["heads"]:
        if h["name"] not in ex.HEAD_LABELS:
            h["labels"] = ["%s%d" % (h["name"], i) for i in range(h["classes"])]
    ex.write_folder(out, cfg, ex.export_state(net))
    x = (torch.rand((3, 1, 16, 16), generator=gen) * 2 - 1).numpy().astype(np.float32)
    references(net, x, gen, out, heads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "classifier"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    glyph_case(os.path.join(args.out, "glyph"), gen)
    tiny_case(os.path.join(args.out, "tiny"), gen)
    print("wrote %s/{glyph,tiny}" % args.out)


if __name__ == "__main__":
    main()
