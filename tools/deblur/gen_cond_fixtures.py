#!/usr/bin/python3
"""Fixtures of the image-conditioned UNet (issue 18) for tests/test_cond_unet.c, made with the
reference module of tools/deblur/cond_unet.py in float64 and cross-checked against diffusers'
own UNet2DModel on the concatenated input (run at development time only).

    /usr/bin/python3 tools/deblur/gen_cond_fixtures.py [--out tests/fixtures/cond_unet]

Writes OUT/ with
  config.json, diffusion_pytorch_model.safetensors   the model folder (in 3 + _cond_channels 3)
  scheduler_config.json                              DDPM, linear betas, 1000 steps
  input.npy float32 [2,3,16,16], cond.npy float32 [2,3,16,16], timesteps.npy float32 [2]
  output.npy      model(input, cond, t) in float64
  grad_out.npy    a fixed upstream gradient G, and for L = sum(G * output):
  grad_input.npy  dL/d input, grad_conv_in.npy dL/d conv_in.weight [16, 6, 3, 3] (its last
                  three input channels are the conditioning image's), grad_conv_out.npy
                  dL/d conv_out.weight
Weights are PyTorch's default init with no zeroed layers (every path of the network matters),
rounded to float32 before the float64 reference is computed.

It also writes GUIDED_OUT (default tests/fixtures/guided_unet), the icDPM with multiscale structure
guidance (cond_unet.GuidedUNet, scales 1 and 2, 8-wide guide networks) on 16x16 images:
  the model folder, input.npy, cond.npy, sharp.npy (the guide target), timesteps.npy,
  grad_out.npy G, output.npy, and for L = sum(G * output) + 0.7 * guide loss (guide_loss.npy [1]):
  grad_input.npy and grad_<name>.npy for conv_in.weight and the guidance tensors listed in
  GUIDED_GRADS (dots as underscores).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from cond_unet import GuidedUNet, ImageConditionedUNet, write_model_dir  # noqa: E402
from torch_unet import init_weights  # noqa: E402

CONFIG = dict(
    sample_size=16, in_channels=6, out_channels=3, _cond_channels=3, layers_per_block=1,
    block_out_channels=[16, 24], norm_num_groups=8, attention_head_dim=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
)
GUIDED_CONFIG = dict(
    sample_size=16, in_channels=6, out_channels=3, _cond_channels=3, layers_per_block=1,
    block_out_channels=[16, 24, 24], norm_num_groups=8, attention_head_dim=8,
    down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    _guide_scales=[1, 2], _guide_channels=8,
)
GUIDE_WEIGHT = 0.7
GUIDED_GRADS = ["conv_in.weight", "guide.1.conv_in.weight", "guide.1.resnet.conv2.weight",
                "guide.1.conv_out.weight", "guide.2.resnet.norm1.weight", "guide.2.conv_out.bias",
                "down_blocks.1.resnets.0.guide_proj.weight",
                "down_blocks.2.resnets.0.guide_proj.weight"]
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "clip_sample": True}


def diffusers_check(cfg, weights, x, cond, t, ref):
    """diffusers' UNet2DModel(in_channels 6) on cat([x, cond]) must give the same output."""
    sys.path.insert(0, os.path.dirname(HERE))
    import diffusers_env
    diffusers_env.setup()
    from diffusers import UNet2DModel
    kw = {k: v for k, v in cfg.items() if not k.startswith("_")}
    m = UNet2DModel(**kw).double()
    m.load_state_dict({k: torch.from_numpy(v).double() for k, v in weights.items()})
    with torch.no_grad():
        out = m(torch.cat([x, cond], 1), t).sample
    rel = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
    print("reference vs diffusers UNet2DModel: relative L2 %.2e" % rel)
    if rel > 1e-6:
        sys.exit("the reference module disagrees with diffusers")


def guided(out_dir, seed):
    """The guided icDPM's fixture (see the module's docstring)."""
    w = {k: v.float().numpy() for k, v in init_weights(GUIDED_CONFIG, seed, zero_out=False).items()}
    torch.manual_seed(seed)  # the guide networks' PyTorch default init
    net = GuidedUNet(GUIDED_CONFIG, seed=seed)
    with torch.no_grad():  # the UNet's weights unzeroed, the guidance's rounded to float32
        for k, p in net.unet.named_parameters():
            p.copy_(torch.from_numpy(w[k]))
        for p in net.named_weights().values():
            p.copy_(p.float())
    write_model_dir(out_dir, GUIDED_CONFIG, net)
    with open(os.path.join(out_dir, "scheduler_config.json"), "w") as f:
        json.dump(dict(SCHEDULER, prediction_type="v_prediction"), f, indent=2)
        f.write("\n")
    g = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(2, 3, 16, 16, generator=g).float().double()
    cond = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).float().double()
    sharp = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).float().double()
    t = torch.tensor([5.0, 640.25], dtype=torch.float64)
    gout = torch.randn(2, 3, 16, 16, generator=g).float().double()
    net = net.double()
    x.requires_grad_(True)
    out, preds = net(x, cond, t)
    aux = net.guide_loss(preds, sharp, GUIDE_WEIGHT)
    ((out * gout).sum() + aux).backward()
    params = dict(net.unet.named_parameters())
    params.update(net.named_weights())
    save = {"input": x.detach(), "cond": cond, "sharp": sharp, "timesteps": t,
            "output": out.detach(), "grad_out": gout, "grad_input": x.grad,
            "guide_loss": aux.detach().reshape(1)}
    for k in GUIDED_GRADS:
        save["grad_" + k.replace(".", "_")] = params[k].grad
    for k, v in save.items():
        np.save(os.path.join(out_dir, k + ".npy"), v.numpy().astype(np.float32))
    print("guided: guide loss %.6f; wrote %s" % (float(aux), os.path.abspath(out_dir)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "tests", "fixtures", "cond_unet"))
    ap.add_argument("--guided-out",
                    default=os.path.join(HERE, "..", "..", "tests", "fixtures", "guided_unet"))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers cross-check")
    args = ap.parse_args()
    w = {k: v.float().numpy() for k, v in init_weights(CONFIG, args.seed, zero_out=False).items()}
    net = ImageConditionedUNet(CONFIG, weights=w)
    write_model_dir(args.out, CONFIG, net)
    with open(os.path.join(args.out, "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
        f.write("\n")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2, 3, 16, 16, generator=g).float().double()
    cond = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).float().double()
    t = torch.tensor([17.0, 803.5], dtype=torch.float64)
    gout = torch.randn(2, 3, 16, 16, generator=g).float().double()
    net = net.double()
    x.requires_grad_(True)
    out = net(x, cond, t)
    (out * gout).sum().backward()
    p = dict(net.unet.named_parameters())
    save = {"input": x.detach(), "cond": cond, "timesteps": t, "output": out.detach(),
            "grad_out": gout, "grad_input": x.grad, "grad_conv_in": p["conv_in.weight"].grad,
            "grad_conv_out": p["conv_out.weight"].grad}
    for k, v in save.items():
        np.save(os.path.join(args.out, k + ".npy"), v.numpy().astype(np.float32))
    if not args.no_diffusers:
        diffusers_check(CONFIG, w, x.detach(), cond, t, out.detach())
    print("wrote %s" % os.path.abspath(args.out))
    guided(args.guided_out, args.seed)


if __name__ == "__main__":
    main()
