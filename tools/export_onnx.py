#!/usr/bin/python3
"""Exports a diffusers-layout UNet2DModel folder to ONNX (for bench/peers' ONNX Runtime runs).

    /usr/bin/python3 tools/export_onnx.py MODEL_DIR OUT.onnx [--size S] [--opset 17]

Traces tools/torch_unet.py (our PyTorch UNet2DModel, checked against diffusers by
tools/check_torch_unet.py) with Debian's torch, float32, so ONNX Runtime runs the same weights
and the same network as ours and PyTorch's. Inputs: `sample` float32 [N, C, H, W], `timestep`
float32 [N], and `class_labels` int64 [N] when the model has num_class_embeds; output `eps`.
The batch and the image side are dynamic axes, so one file serves every case of a model.
--size is only the side of the tracing example (default: the model's sample_size).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--size", type=int)
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    import torch
    from torch_unet import TorchUNet

    net = TorchUNet.from_dir(a.model_dir, dtype=torch.float32)
    cfg = net.c
    classes = cfg.get("num_class_embeds") is not None
    size = a.size or cfg.get("sample_size")
    if not isinstance(size, int) or size < 1:
        sys.exit("export_onnx: %s has no sample_size: pass --size" % a.model_dir)

    class Wrapped(torch.nn.Module):
        # torch.onnx.export wants a Module; TorchUNet is a plain callable over its tensors,
        # which the tracer records as the graph's initializers
        def forward(self, sample, timestep, class_labels=None):
            return net(sample, timestep, class_labels)

    n = 2
    x = torch.randn(n, cfg.get("in_channels", 3), size, size)
    t = torch.full((n,), 500.0)
    args = (x, t, torch.zeros(n, dtype=torch.int64)) if classes else (x, t)
    names = ["sample", "timestep"] + (["class_labels"] if classes else [])
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "eps": {0: "batch", 2: "height", 3: "width"}}
    if classes:
        axes["class_labels"] = {0: "batch"}
    with torch.inference_mode():
        ref = net(*args)
    with torch.no_grad():
        torch.onnx.export(Wrapped(), args, a.out, input_names=names, output_names=["eps"],
                          dynamic_axes=axes, opset_version=a.opset, do_constant_folding=True)
    print(json.dumps(dict(onnx=a.out, bytes=os.path.getsize(a.out), inputs=names,
                          ref_norm=float(ref.norm()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
