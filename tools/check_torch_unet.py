#!/usr/bin/python3
"""Check tools/torch_unet.py (our PyTorch UNet) against diffusers' UNet2DModel.

For every fixture directory given (default: all of tests/fixtures/unet/*), load it with
diffusers' UNet2DModel.from_pretrained and with TorchUNet.from_dir, run both on the fixture
inputs and compare:
  * float64: rel L2 must be < 1e-6 (default --tol).  diffusers' attention casts the scores to
    float32 before the softmax ("upcast_softmax", a down-cast for a float64 model); for this
    comparison that cast is switched off so both sides are genuinely float64.  The effect of
    the cast is printed as "f32-softmax".  (float64 runs use diffusers_env.safe_baddbmm, see
    there: torch 1.13's float64 baddbmm(beta=0) intermittently yields NaN.)
  * output.npy stored in the fixture vs our float64 output (should be ~1e-16 relative,
    the fixture is written as float32 so ~1e-8 is expected)
  * float32: ours vs diffusers, both float32, and diffusers float32 vs float64 -- the error
    an exact float32 implementation has against output.npy (informational)
Exit status 1 if any tolerance fails.
  tools/check_torch_unet.py [--tol 1e-6] [DIR ...]
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)


_G = dict(act_fn="silu", attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
          freq_shift=1, norm_eps=1e-6, layers_per_block=2, norm_num_groups=32)
BENCH_ARCHS = [  # must match bench/unet
    ("ddpm-cifar10-32", dict(_G, block_out_channels=[128, 256, 256, 256], sample_size=32,
                             down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]), 32),
    ("ddpm-celebahq-256@64", dict(_G, block_out_channels=[128, 128, 256, 256, 512, 512], sample_size=256,
                                  down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                                  up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4), 64),
]


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def load_inputs(d, torch):
    x = torch.from_numpy(np.load(os.path.join(d, "input.npy")))
    t = torch.from_numpy(np.load(os.path.join(d, "timesteps.npy")))
    yp = os.path.join(d, "class_labels.npy")
    y = torch.from_numpy(np.load(yp)) if os.path.exists(yp) else None
    return x, t, y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--diffusers-src")
    ap.add_argument("--bench-archs", action="store_true",
                    help="also check param shapes/config/FLOP count of the full-size bench/unet archs "
                         "(instantiates ~150M params; slow)")
    args = ap.parse_args()
    dirs = args.dirs or sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "unet", "*", "config.json")))
    dirs = [os.path.dirname(d) if d.endswith("config.json") else d for d in dirs]
    if not dirs:
        sys.exit("check_torch_unet: no fixture directories")

    import diffusers_env
    diffusers_env.setup(args.diffusers_src)
    import torch
    from diffusers import UNet2DModel
    import st
    import torch_unet
    from torch_unet import TorchUNet
    torch.set_num_threads(1)

    def count_flops(model, x, t, y):
        """2*MACs of Conv2d/Linear modules (hooks) + attention matmuls, from a diffusers run."""
        tot = [0]
        hooks = []

        def conv_hook(m, i, o):
            tot[0] += 2 * o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

        def lin_hook(m, i, o):
            tot[0] += 2 * o.numel() * m.in_features

        def attn_hook(m, i, o):
            n, c, h, w = i[0].shape
            tot[0] += 2 * 2 * n * (h * w) ** 2 * m.inner_dim

        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                hooks.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, torch.nn.Linear):
                hooks.append(m.register_forward_hook(lin_hook))
            elif hasattr(m, "inner_dim") and hasattr(m, "to_q"):
                hooks.append(m.register_forward_hook(attn_hook))
        with torch.no_grad():
            model(x, t, class_labels=y)
        for h in hooks:
            h.remove()
        return tot[0]

    def check_static(name, model, cfg, legacy, x, t, y, file_shapes=None):
        """param_shapes / full_config / flops of torch_unet vs diffusers' own model."""
        errs = []
        sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        mine = torch_unet.param_shapes(cfg)
        if mine != sd:
            errs.append("param_shapes differs: %s" % sorted(set(mine.items()) ^ set(sd.items()))[:4])
        if file_shapes is not None and torch_unet.param_shapes(cfg, legacy=legacy) != file_shapes:
            errs.append("param_shapes(legacy=%s) differs from the safetensors file" % legacy)
        fc = torch_unet.full_config(cfg)
        dc = dict(model.config)
        dc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items() if not k.startswith("_")}
        fc = {k: v for k, v in fc.items() if not k.startswith("_")}
        if fc != dc:
            errs.append("full_config differs: %s" % sorted(k for k in set(fc) | set(dc) if fc.get(k) != dc.get(k)))
        f_mine = torch_unet.flops(cfg, x.shape[0], x.shape[2], x.shape[3])
        f_ref = count_flops(model, x, t, y)
        if f_mine != f_ref:
            errs.append("flops %d != counted %d" % (f_mine, f_ref))
        print("%-32s static: params %d tensors, %.3f GFLOP/forward  %s" % (
            name, len(sd), f_ref / 1e9, "OK" if not errs else "FAIL " + "; ".join(errs)))
        return not errs

    ok = True
    for d in dirs:
        x, t, y = load_inputs(d, torch)
        ref = UNet2DModel.from_pretrained(d).eval()
        with torch.no_grad(), diffusers_env.safe_baddbmm():
            ref64 = ref.double()
            d_f32softmax = ref64(x.double(), t, class_labels=y).sample.numpy()
            diffusers_env.exact_f64(ref64)
            d64 = ref64(x.double(), t, class_labels=y).sample.numpy()
            o64 = TorchUNet.from_dir(d, dtype=torch.float64)(x, t, y).numpy()
            d32 = ref64.float()(x, t, class_labels=y).sample.numpy()
            o32 = TorchUNet.from_dir(d, dtype=torch.float32)(x, t, y).numpy()
        with open(os.path.join(d, "config.json")) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        hdr = st.load_header(os.path.join(d, "diffusion_pytorch_model.safetensors"))[0]
        legacy = any(".query." in k for k in hdr)
        ok &= check_static(os.path.basename(os.path.normpath(d)), ref.float(), cfg, legacy, x, t, y,
                           {k: tuple(v["shape"]) for k, v in hdr.items()})
        stored = np.load(os.path.join(d, "output.npy"))
        r64 = rel(o64, d64)
        rst = rel(o64, stored)
        r32 = rel(o32, d32)
        e32 = rel(d32, d64)
        rsm = rel(d_f32softmax, d64)
        good = r64 < args.tol and rst < 1e-6
        ok &= good
        print("%-32s f64 ours/diffusers %.1e | ours/output.npy %.1e | f32 ours/diffusers %.1e | "
              "diffusers f32/f64 %.1e | f32-softmax effect %.1e  %s"
              % (os.path.relpath(d, ROOT) if d.startswith(ROOT) else d, r64, rst, r32, e32, rsm,
                 "OK" if good else "FAIL"))
    if args.bench_archs:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        for name, cfg, size in BENCH_ARCHS:
            torch.manual_seed(0)
            model = UNet2DModel(**cfg).eval()
            x = torch.randn(1, 3, size, size)
            t = torch.tensor([500])
            ok &= check_static(name, model, cfg, True, x, t, None)
            del model
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
