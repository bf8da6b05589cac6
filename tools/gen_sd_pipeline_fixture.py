#!/usr/bin/python3
"""A tiny Stable-Diffusion pipeline folder and diffusers' txt2img result on it (issue 16.6).

tests/fixtures/sd_pipeline/tiny is a diffusers pipeline layout assembled from fixtures already in
the repository (relative symlinks, so no weights are stored twice):
  unet/          -> ../../cunet/sd1_small      UNet2DConditionModel, 4 latent channels, cross 32
  vae/           -> ../../vae/two_level        AutoencoderKL, 4 latent channels, factor 2
  text_encoder/  -> ../../clip/sd1/text_encoder  CLIPTextModel, width 32 (OpenAI CLIP's modules)
  tokenizer/     -> ../../clip/sd1/tokenizer
  scheduler/scheduler_config.json   DDIMScheduler with SD's schedule (scaled_linear 0.00085-0.012)
  model_index.json
and the reference of one guided txt2img run, computed here in float64 with diffusers v0.21's own
UNet2DConditionModel, DDIMScheduler and AutoencoderKL, following StableDiffusionPipeline's loop
(latents x init_noise_sigma, [uncond, cond] in one batch, uncond + g (cond - uncond), scheduler
step, decode latents / scaling_factor):
  noise.npy     [1, 4, 16, 16] the initial latents (standard normal, seed 0)
  images.npy    [1, 3, 32, 32] the decoded image, unclamped
  fixture.json  prompt, negative prompt, steps, guidance, how it was made
The text encoder's hidden states are the CLIP fixture's own references (tests/fixtures/clip/sd1/
hidden_last.npy rows of "a photo of a cat" and of the empty prompt, made with OpenAI CLIP's code),
so the whole loop is checked against reference code end to end.

Usage: /usr/bin/python3 tools/gen_sd_pipeline_fixture.py [--diffusers-src PATH]
"""
import argparse
import json
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import diffusers_env  # noqa: E402
import st  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "tiny")
LINKS = {"unet": "../../cunet/sd1_small", "vae": "../../vae/two_level",
         "text_encoder": "../../clip/sd1/text_encoder", "tokenizer": "../../clip/sd1/tokenizer"}
SCHED = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
         "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
         "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
STEPS, GUIDANCE = 6, 7.5


def load_module(cls, folder, torch):
    cfg = {k: v for k, v in json.load(open(os.path.join(folder, "config.json"))).items()
           if not k.startswith("_")}
    m = cls(**cfg)
    sd = st.load(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in sd.items()})
    return m.double().eval(), cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffusers-src", default=None)
    args = ap.parse_args()
    diffusers = diffusers_env.setup(args.diffusers_src)
    import torch
    os.makedirs(os.path.join(OUT, "scheduler"), exist_ok=True)
    for name, target in LINKS.items():
        link = os.path.join(OUT, name)
        if not os.path.islink(link):
            os.symlink(target, link)
    json.dump(SCHED, open(os.path.join(OUT, "scheduler", "scheduler_config.json"), "w"), indent=2)
    json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.21.0",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDIMScheduler"]},
              open(os.path.join(OUT, "model_index.json"), "w"), indent=2)
    unet, ucfg = load_module(diffusers.UNet2DConditionModel, os.path.join(OUT, "unet"), torch)
    vae, vcfg = load_module(diffusers.AutoencoderKL, os.path.join(OUT, "vae"), torch)
    prompts = json.load(open(os.path.join(ROOT, "tests", "fixtures", "clip", "prompts.json")))["model"]
    hidden = np.load(os.path.join(ROOT, "tests", "fixtures", "clip", "sd1", "hidden_last.npy"))
    ci, ui = 0, prompts.index("")
    cond = torch.from_numpy(hidden[ci:ci + 1].astype(np.float64))
    uncond = torch.from_numpy(hidden[ui:ui + 1].astype(np.float64))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, ucfg["in_channels"], 16, 16)).astype(np.float32)
    sched = diffusers.DDIMScheduler(**{k: v for k, v in SCHED.items() if not k.startswith("_")})
    sched.set_timesteps(STEPS)
    lat = torch.from_numpy(noise.astype(np.float64)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t)
            eps = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            u, c = eps.chunk(2)
            eps = u + GUIDANCE * (c - u)
            lat = sched.step(eps, t, lat).prev_sample
        img = vae.decode(lat / vcfg.get("scaling_factor", 0.18215)).sample
    np.save(os.path.join(OUT, "noise.npy"), noise)
    np.save(os.path.join(OUT, "images.npy"), img.numpy().astype(np.float32))
    json.dump({"prompt": prompts[ci], "negative_prompt": "", "scheduler": "ddim", "steps": STEPS,
               "guidance_scale": GUIDANCE, "reference": "diffusers 0.21 UNet2DConditionModel, "
               "DDIMScheduler, AutoencoderKL in float64; hidden states from OpenAI CLIP's code "
               "(tests/fixtures/clip)", "torch_version": torch.__version__,
               "command": "tools/gen_sd_pipeline_fixture.py"},
              open(os.path.join(OUT, "fixture.json"), "w"), indent=2)
    print("images rms %.4f, latents rms %.4f" % (float(img.pow(2).mean().sqrt()),
                                                  float(lat.pow(2).mean().sqrt())))


if __name__ == "__main__":
    main()
