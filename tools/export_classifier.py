#!/usr/bin/python3
"""Exports the glyph classifier (tools/glyphs/train_classifier.py's GlyphNet, the instrument
bench/glyph_eval.py measures with) as a model folder the engine loads (engine/model/classifier.h):

    /usr/bin/python3 tools/export_classifier.py [--checkpoint bench/glyph_classifier.pt] \
        [--out models/glyph-classifier]

Writes OUT/config.json and OUT/model.safetensors (F32). The tensors keep PyTorch's state_dict
names (body.0.0.weight, body.0.1.running_mean, heads.char.weight, ...; the integer
num_batches_tracked counters are dropped). config.json has "_class_name": "GlyphClassifier" and
describes the network as a list of layers in order, so the engine builds it without knowing the
module indices:
  conv_bn_relu   Conv2d(3x3, padding 1, no bias) + BatchNorm2d (eval: running statistics) + ReLU
  max_pool       MaxPool2d(2)
  global_avg_pool AdaptiveAvgPool2d(1) + Flatten
  linear_relu    Linear + ReLU (the feature layer)
then "heads": one Linear per attribute on the features, with the names of its classes. Inputs are
float images in [-1, 1], NCHW, 3 x 32 x 32. Needs Debian's python3-torch only; also usable as a
module (build_config, export_state) by tools/gen_classifier_fixtures.py.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "glyphs"))
sys.path.insert(0, HERE)
import st  # noqa: E402
from render import CLASSES, PALETTE, STYLES  # noqa: E402
from train_classifier import GlyphNet  # noqa: E402

HEAD_LABELS = {
    "char": list(CLASSES),
    "bold": ["regular", "bold"],
    "italic": ["upright", "italic"],
    "style": list(STYLES),
    "fg": [name for name, _ in PALETTE],
    "bg": [name for name, _ in PALETTE],
}


def build_config(net, heads, extra=None):
    """The config.json of a GlyphNet-shaped nn.Module (body of Sequentials, heads ModuleDict)."""
    layers = []
    eps = None
    for idx, mod in enumerate(net.body):
        if isinstance(mod, torch.nn.Sequential):
            conv, bn, _ = mod
            if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.bias is not None:
                raise SystemExit("export_classifier: body.%d is not a 3x3, padding 1, bias-free conv" % idx)
            if eps is not None and bn.eps != eps:
                raise SystemExit("export_classifier: batch-norm eps differs between layers")
            eps = bn.eps
            layers.append({"type": "conv_bn_relu", "prefix": "body.%d" % idx,
                           "out_channels": conv.out_channels})
        elif isinstance(mod, torch.nn.MaxPool2d):
            layers.append({"type": "max_pool", "size": 2})
        elif isinstance(mod, torch.nn.AdaptiveAvgPool2d):
            layers.append({"type": "global_avg_pool"})
        elif isinstance(mod, torch.nn.Linear):
            layers.append({"type": "linear_relu", "prefix": "body.%d" % idx,
                           "out_features": mod.out_features})
        elif isinstance(mod, (torch.nn.Flatten, torch.nn.ReLU)):
            continue  # part of global_avg_pool / linear_relu
        else:
            raise SystemExit("export_classifier: body.%d: %s has no engine layer" % (idx, type(mod).__name__))
    cfg = {
        "_class_name": "GlyphClassifier",
        "in_channels": 3,
        "sample_size": 32,
        "batch_norm_eps": eps,
        "layers": layers,
        "heads": [{"name": name, "classes": n,
                   "labels": HEAD_LABELS.get(name, [str(i) for i in range(n)])[:n]}
                  for name, n in heads],
    }
    cfg.update(extra or {})
    return cfg


def export_state(net):
    """{name: float32 array} of every floating tensor of the state_dict."""
    return {k: v.detach().float().numpy().copy() for k, v in net.state_dict().items()
            if v.is_floating_point()}


def write_folder(out, cfg, tensors):
    os.makedirs(out, exist_ok=True)
    st.save(os.path.join(out, "model.safetensors"), tensors, dtype="F32",
            metadata={"format": "pt", "source": "tools/export_classifier.py"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "bench", "glyph_classifier.pt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "glyph-classifier"))
    args = ap.parse_args()
    ck = torch.load(args.checkpoint)
    heads = [tuple(h) for h in ck["heads"]]
    net = GlyphNet(heads=heads, **ck["arch"])
    net.load_state_dict(ck["state_dict"])
    net.eval()
    extra = {"_source": "tools/glyphs/train_classifier.py (GlyphNet), exported by "
             "tools/export_classifier.py",
             "heldout_accuracy": {k: round(float(v), 4) for k, v in ck.get("heldout_accuracy", {}).items()}}
    cfg = build_config(net, heads, extra)
    write_folder(args.out, cfg, export_state(net))
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print("wrote %s (%d layers, %d heads, %d bytes of weights)" % (args.out, len(cfg["layers"]),
                                                                   len(heads), size))
    # a self-check: the exported tensors rebuild the same network
    net2 = GlyphNet(heads=heads, **ck["arch"])
    sd = {k: torch.from_numpy(v) for k, v in st.load(os.path.join(args.out, "model.safetensors")).items()}
    missing = net2.load_state_dict(sd, strict=False)
    if missing.unexpected_keys or [k for k in missing.missing_keys if "num_batches" not in k]:
        raise SystemExit("export_classifier: round trip lost %s" % (missing,))
    net2.eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        a, b = net(x), net2(x)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print("round trip max |diff| %.3g" % diff)


if __name__ == "__main__":
    main()
