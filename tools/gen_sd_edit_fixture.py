#!/usr/bin/python3
"""diffusers' img2img and inpainting loops on the tiny Stable-Diffusion pipeline (issue 16.4).

Runs, in float64 with diffusers v0.21's own UNet2DConditionModel, DDIMScheduler and AutoencoderKL
on tests/fixtures/sd_pipeline/tiny (tools/gen_sd_pipeline_fixture.py), the loops of
StableDiffusionImg2ImgPipeline and of StableDiffusionInpaintPipeline for a UNet without mask
channels (v0.21, pipeline_stable_diffusion_img2img.py / _inpaint.py), step for step:
  img2img:  get_timesteps (t_start = n - int(n strength)), init latents =
            scaling_factor * latent_dist.sample(generator), add_noise at timesteps[0], guided
            DDIM steps ([uncond, cond] in one batch), decode latents / scaling_factor
  inpaint:  the same start (pure noise x init_noise_sigma at strength 1), the mask binarized at
            0.5 and interpolate()d (nearest) to the latent size, and after every step
            latents = (1 - mask) * add_noise(image_latents, noise, timesteps[i + 1]) + mask * latents
            (the clean image latents after the last step)
on a non-square picture (32 x 48 pixels, 16 x 24 latents). The posterior sample's noise is the
engine's: Philox4x32-10 stream VAE_SAMPLE_STREAM of (seed, image 0) as engine/core/rng.h lays it
out (ported below), so `denoised sample --seed S --noise noise.npy` draws the same sample; the
initial noise is given (noise.npy). The prompts' hidden states are the CLIP fixture's references
(tests/fixtures/clip/sd1/hidden_last.npy, from OpenAI CLIP's code).

Writes tests/fixtures/sd_pipeline/edit/: image.npy [1, 3, 32, 48] in [-1, 1], mask.npy
[32, 48] (grey levels on both sides of 0.5), noise.npy [1, 4, 16, 24], img2img.npy, inpaint.npy,
inpaint_full.npy (strength 1), fixture.json (seed, strengths, steps, guidance, prompts).

Usage: /usr/bin/python3 tools/gen_sd_edit_fixture.py [--diffusers-src PATH]
"""
import argparse
import json
import math
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import diffusers_env  # noqa: E402
from gen_sd_pipeline_fixture import SCHED, load_module  # noqa: E402

PIPE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "edit")
H, W, STEPS, GUIDANCE, SEED = 32, 48, 6, 7.5, 11
STRENGTH_IMG2IMG, STRENGTH_INPAINT = 0.6, 0.75
VAE_SAMPLE_STREAM = 0x7661656B
M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & M32
            k1 = (k1 + 0xBB67AE85) & M32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def rng_normal(seed, image, stream, n):
    """engine/core/rng.c rng_normal: Box-Muller in double on Philox words, rounded to float."""
    out = np.empty(n, dtype=np.float32)
    key = (seed & M32, seed >> 32)
    for block in range((n + 3) // 4):
        x = philox4x32_10((block & M32, block >> 32, image & M32, stream & M32), key)
        z = []
        for a, b in ((x[0], x[1]), (x[2], x[3])):
            u, t = (a + 1.0) * 2.0 ** -32, b * 2.0 ** -32
            r = math.sqrt(-2.0 * math.log(u))
            z += [r * math.cos(6.283185307179586476925286766559 * t),
                  r * math.sin(6.283185307179586476925286766559 * t)]
        for lane in range(4):
            if 4 * block + lane < n:
                out[4 * block + lane] = np.float32(z[lane])
    return out


def get_timesteps(sched, strength):
    n = len(sched.timesteps)
    init = min(int(n * strength), n)
    return sched.timesteps[max(n - init, 0):]


def run(diffusers, torch, unet, vae, vcfg, states, image, noise, eps, strength, mask=None):
    sched = diffusers.DDIMScheduler(**{k: v for k, v in SCHED.items() if not k.startswith("_")})
    sched.set_timesteps(STEPS)
    timesteps = get_timesteps(sched, strength)
    sf = vcfg.get("scaling_factor", 0.18215)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        image_latents = sf * (dist.mean + dist.std * eps)  # latent_dist.sample(generator)
        if mask is not None and strength == 1.0:
            lat = noise * sched.init_noise_sigma
        else:
            lat = sched.add_noise(image_latents, noise, timesteps[:1])
        if mask is not None:
            m = torch.from_numpy(mask[None, None].astype(np.float64))
            m = (m >= 0.5).double()  # the mask processor's binarize
            m = torch.nn.functional.interpolate(m, size=(H // 2, W // 2))
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(torch.cat([lat] * 2), t)
            out = unet(inp, t, encoder_hidden_states=states).sample
            u, c = out.chunk(2)
            lat = sched.step(u + GUIDANCE * (c - u), t, lat).prev_sample
            if mask is not None:
                proper = image_latents
                if i < len(timesteps) - 1:
                    proper = sched.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
                lat = (1 - m) * proper + m * lat
        return vae.decode(lat / sf).sample.numpy().astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffusers-src", default=None)
    args = ap.parse_args()
    diffusers = diffusers_env.setup(args.diffusers_src)
    import torch
    os.makedirs(OUT, exist_ok=True)
    unet, ucfg = load_module(diffusers.UNet2DConditionModel, os.path.join(PIPE, "unet"), torch)
    vae, vcfg = load_module(diffusers.AutoencoderKL, os.path.join(PIPE, "vae"), torch)
    prompts = json.load(open(os.path.join(ROOT, "tests", "fixtures", "clip", "prompts.json")))["model"]
    hidden = np.load(os.path.join(ROOT, "tests", "fixtures", "clip", "sd1", "hidden_last.npy"))
    ci, ui = 0, prompts.index("")
    states = torch.from_numpy(np.concatenate([hidden[ui:ui + 1], hidden[ci:ci + 1]]).astype(np.float64))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    image = np.stack([np.sin(xx / 7.0) * np.cos(yy / 5.0), (xx - yy) / (W + H),
                      np.cos((xx + 2 * yy) / 9.0) * 0.8]).astype(np.float32)[None]
    # grey levels either side of 0.5 (binarized), a hole not aligned to the latent grid
    mask = np.where((xx >= 13) & (xx < 35) & (yy >= 7) & (yy < 26), 0.7, 0.3).astype(np.float32)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((1, ucfg["in_channels"], H // 2, W // 2)).astype(np.float32)
    eps = rng_normal(SEED, 0, VAE_SAMPLE_STREAM, noise.size).reshape(noise.shape)
    t = lambda a: torch.from_numpy(a.astype(np.float64))  # noqa: E731
    res = {
        "img2img": run(diffusers, torch, unet, vae, vcfg, states, t(image), t(noise), t(eps),
                       STRENGTH_IMG2IMG),
        "inpaint": run(diffusers, torch, unet, vae, vcfg, states, t(image), t(noise), t(eps),
                       STRENGTH_INPAINT, mask),
        "inpaint_full": run(diffusers, torch, unet, vae, vcfg, states, t(image), t(noise), t(eps),
                            1.0, mask),
    }
    np.save(os.path.join(OUT, "image.npy"), image)
    np.save(os.path.join(OUT, "mask.npy"), mask)
    np.save(os.path.join(OUT, "noise.npy"), noise)
    for k, v in res.items():
        np.save(os.path.join(OUT, k + ".npy"), v)
        print("%s: rms %.4f" % (k, float(np.sqrt((v ** 2).mean()))))
    json.dump({"prompt": prompts[ci], "negative_prompt": "", "scheduler": "ddim", "steps": STEPS,
               "guidance_scale": GUIDANCE, "seed": SEED, "height": H, "width": W,
               "strength_img2img": STRENGTH_IMG2IMG, "strength_inpaint": STRENGTH_INPAINT,
               "reference": "diffusers 0.21 StableDiffusionImg2ImgPipeline and "
               "StableDiffusionInpaintPipeline (4-channel UNet) loops with its UNet2DConditionModel, "
               "DDIMScheduler, AutoencoderKL in float64; posterior noise = the engine's Philox "
               "stream VAE_SAMPLE_STREAM of (seed, 0)", "torch_version": torch.__version__,
               "command": "tools/gen_sd_edit_fixture.py"},
              open(os.path.join(OUT, "fixture.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
