#!/usr/bin/python3
"""PyTorch reference of three training steps for engine/train/train.c (tests/test_train.c).

    /usr/bin/python3 tools/gen_train_fixtures.py [--out tests/fixtures/train] [--seed 1]

For each case: a tiny class-conditional UNet2DModel with random weights (tools/torch_unet.py's
UNet2D: diffusers' module tree and names, checked against diffusers by tools/check_torch_unet.py),
a fixed batch of clean images, and per step fixed timesteps, noise and labels (given to our
engine as .npy, so neither side's random generator matters). Each step does what diffusers'
training examples do: noisy = DDPMScheduler.add_noise (sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar)
noise, float32), the target of the prediction type (noise, x0, or get_velocity's
sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0), MSE per image, weighted by min-SNR-gamma as
train_text_to_image.py does on training_utils.compute_snr (epsilon min(snr, g) / snr,
v_prediction min(snr, g) / (snr + 1)), mean; loss.backward(); clip_grad_norm_;
torch.optim.AdamW (foreach=False) at get_cosine_schedule_with_warmup's rate (LambdaLR);
then diffusers' EMAModel update (decay min(max, (1 + s) / (10 + s)), s = step - 1).
The formulas are written here from diffusers' definitions (diffusers is not needed).
Every case starts from the same model and data (kept small: the fixtures are committed):
  model/config.json, model/diffusion_pytorch_model.safetensors   the initial model (F32)
  x0.npy [B,C,H,W]; labels.npy [S,B] int64; timesteps.npy [S,B] int64; noise.npy [S,B,C,H,W]
  cases.json       per case the settings (prediction type, gamma, clip), and the shared ones
                   (lr, warm-up, cosine schedule, AdamW, EMA decay)
  NAME.losses.npy [S]   the loss of every step (float64)
  NAME.final.safetensors   the weights after S steps (not for "sample_minsnr", whose losses
                           after the first step already depend on every gradient)
  NAME.ema.safetensors     the EMA after S steps (eps_minsnr only)
Needs Debian's python3-torch and python3-numpy only.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402
import torch_unet  # noqa: E402
from unet_arch import write_model_dir  # noqa: E402

STEPS = 3
BATCH = 2
CONFIG = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[4, 8],
              layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
              up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4,
              norm_num_groups=2, num_class_embeds=5)
CASES = {
    # clip at 1 rarely bites on a random model; 0.05 does, so both paths of clipping are seen
    "eps_minsnr": dict(prediction_type="epsilon", min_snr_gamma=5.0, clip=0.05, ema=True),
    "v_plain": dict(prediction_type="v_prediction", min_snr_gamma=0.0, clip=1.0),
    "sample_minsnr": dict(prediction_type="sample", min_snr_gamma=5.0, clip=0.0, final=False),
}
SCHED = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
OPT = dict(lr=2e-3, warmup=1, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, ema_decay=0.9)


def alphas_cumprod():
    # DDPMScheduler "linear": torch.linspace in float32, cumprod of 1 - beta in float32
    betas = torch.linspace(SCHED["beta_start"], SCHED["beta_end"], SCHED["num_train_timesteps"],
                           dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_lambda(step, warmup, total):
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def make_data(out, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = torch_unet.init_weights(torch_unet.full_config(CONFIG), seed, zero_out=False)
    write_model_dir(os.path.join(out, "model"), CONFIG, {k: v.numpy() for k, v in weights.items()})
    c, s = CONFIG["in_channels"], CONFIG["sample_size"]
    data = dict(x0=(torch.rand(BATCH, c, s, s, generator=gen) * 2 - 1).float(),
                labels=torch.randint(0, CONFIG["num_class_embeds"], (STEPS, BATCH), generator=gen),
                timesteps=torch.randint(0, SCHED["num_train_timesteps"], (STEPS, BATCH),
                                        generator=gen),
                noise=torch.randn(STEPS, BATCH, c, s, s, generator=gen))
    for k, v in data.items():
        np.save(os.path.join(out, k + ".npy"), v.numpy())
    return weights, data


def loss_weights(spec, t, ac, sqrt_ac, sqrt_1m):
    pt, g = spec["prediction_type"], spec["min_snr_gamma"]
    if g > 0:
        snr = (sqrt_ac[t] / sqrt_1m[t]) ** 2
        w = torch.minimum(snr, torch.full_like(snr, g))
        if pt == "epsilon":
            w = w / snr
        elif pt == "v_prediction":
            w = w / (snr + 1)
        return w
    if pt == "sample":  # train_unconditional.py's weighting of an x0 loss
        return ac[t] / (1 - ac[t])
    return torch.ones(t.shape[0])


def run_case(out, name, spec, weights, data):
    net = torch_unet.UNet2D(CONFIG, weights={k: v.clone() for k, v in weights.items()})
    x0, labels, ts, noise = data["x0"], data["labels"], data["timesteps"], data["noise"]
    ac = alphas_cumprod()
    sqrt_ac, sqrt_1m = ac ** 0.5, (1.0 - ac) ** 0.5
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=OPT["lr"], betas=tuple(OPT["betas"]), eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"], foreach=False)
    ema = {k: v.detach().clone() for k, v in net.named_parameters()}
    losses = []
    for step in range(STEPS):
        t = ts[step]
        a = sqrt_ac[t].view(-1, 1, 1, 1)
        b = sqrt_1m[t].view(-1, 1, 1, 1)
        z = noise[step]
        noisy = a * x0 + b * z
        pt = spec["prediction_type"]
        target = z if pt == "epsilon" else (x0 if pt == "sample" else a * z - b * x0)
        for group in opt.param_groups:
            group["lr"] = OPT["lr"] * cosine_lambda(step, OPT["warmup"], STEPS)
        pred = net(noisy, t, labels[step])
        per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        loss = (per * loss_weights(spec, t, ac, sqrt_ac, sqrt_1m)).mean()
        opt.zero_grad()
        loss.backward()
        if spec["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, spec["clip"])
        opt.step()
        k = step  # EMAModel: optimization_step = step + 1, its decay step = that - 1
        d = 0.0 if k <= 0 else min(OPT["ema_decay"], (1.0 + k) / (10.0 + k))
        with torch.no_grad():
            for n_, p in net.named_parameters():
                ema[n_].sub_((1 - d) * (ema[n_] - p))
        losses.append(float(loss))
    np.save(os.path.join(out, name + ".losses.npy"), np.array(losses, dtype=np.float64))
    if spec.get("final", True):
        st.save(os.path.join(out, name + ".final.safetensors"),
                {k: v.detach().numpy() for k, v in net.named_parameters()}, dtype="F32")
    if spec.get("ema", False):
        st.save(os.path.join(out, name + ".ema.safetensors"),
                {k: v.numpy() for k, v in ema.items()}, dtype="F32")
    print("%s: losses %s" % (name, ", ".join("%.6f" % v for v in losses)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/train")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    weights, data = make_data(args.out, args.seed)
    for name, spec in sorted(CASES.items()):
        run_case(args.out, name, spec, weights, data)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(dict(cases=CASES, steps=STEPS, batch=BATCH, schedule="cosine", **OPT, **SCHED,
                       torch=torch.__version__), f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
