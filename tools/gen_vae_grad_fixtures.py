#!/usr/bin/python3
"""PyTorch autograd references for the AutoencoderKL's backward (tests/test_vae_grad.c reads
them; run at development time only, with Debian's torch and a diffusers source tree, see
tools/diffusers_env.py):

    /usr/bin/python3 tools/gen_vae_grad_fixtures.py [--out tests/fixtures/vae_grad]

Per preset, a folder with a tiny random diffusers AutoencoderKL (weights as
tools/gen_vae_fixtures.py draws them, F32) and, computed by diffusers' own modules in float64:
  input.npy, grad_moments.npy    images [N,in,H,W] in [-1, 1]; G_enc [N,2*latent,H/f,W/f]
  moments.npy                    cat(posterior.mean, posterior.logvar) (logvar clamped as
                                 DiagonalGaussianDistribution clamps it)
  enc_grad_input.npy             d sum(G_enc * moments) / d input
  enc_grad_params.safetensors    ... / d every parameter (zero for the decoder's)
  latents.npy, grad_decoded.npy  z [N,latent,h,w] standard normal; G_dec shaped like decode(z)
  decoded.npy                    vae.decode(z).sample
  dec_grad_input.npy             d sum(G_dec * decoded) / d z
  dec_grad_params.safetensors    ... / d every parameter (zero for the encoder's)
Parameter names are diffusers' modern ones (to_q/to_k/to_v/to_out.0), as the engine reports
them. fixture.json records how the folder was made.
"""
import argparse
import copy
import json
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import st  # noqa: E402
from gen_unet_fixtures import randomise  # noqa: E402

ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"

PRESETS = {
    "two_level": dict(
        doc="2 levels [8, 16], 4 groups, one resnet per block, 16x16 images, batch 2",
        config=dict(block_out_channels=[8, 16], down_block_types=[ENC] * 2,
                    up_block_types=[DEC] * 2, layers_per_block=1, norm_num_groups=4,
                    latent_channels=4, sample_size=16),
        seed=21, batch=2, size=(16, 16)),
    "three_level": dict(
        doc="3 levels [8, 12, 12], two resnets per block (as SD's VAE), 3 latent channels, "
            "non-square 16x24 images, batch 1",
        config=dict(block_out_channels=[8, 12, 12], down_block_types=[ENC] * 3,
                    up_block_types=[DEC] * 3, layers_per_block=2, norm_num_groups=4,
                    latent_channels=3, sample_size=16),
        seed=22, batch=1, size=(16, 24)),
}


def make(name, spec, out_root, diffusers, torch, AutoencoderKL, diffusers_env):
    torch.manual_seed(spec["seed"])
    model = AutoencoderKL(**spec["config"])
    randomise(model, torch)
    model.eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    factor = 2 ** (len(spec["config"]["block_out_channels"]) - 1)
    gen = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)
    n, (h, w) = spec["batch"], spec["size"]
    lat, cin = model.config.latent_channels, model.config.in_channels
    lh, lw = h // factor, w // factor
    x = torch.rand(n, cin, h, w, generator=gen) * 2 - 1
    g_enc = torch.randn(n, 2 * lat, lh, lw, generator=gen)
    z = torch.randn(n, lat, lh, lw, generator=gen)
    g_dec = torch.randn(n, model.config.out_channels, h, w, generator=gen)

    m64 = diffusers_env.exact_f64(copy.deepcopy(model))
    params = dict(m64.named_parameters())
    out = {"input": x.numpy(), "grad_moments": g_enc.numpy(), "latents": z.numpy(),
           "grad_decoded": g_dec.numpy()}
    grads = {}
    with diffusers_env.safe_baddbmm():
        xd = x.double().requires_grad_(True)
        post = m64.encode(xd).latent_dist
        moments = torch.cat([post.mean, post.logvar], 1)
        (g_enc.double() * moments).sum().backward()
        out["moments"] = moments.detach().float().numpy()
        out["enc_grad_input"] = xd.grad.float().numpy()
        grads["enc"] = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy()
                        for k, p in params.items()}
        m64.zero_grad(set_to_none=True)
        zd = z.double().requires_grad_(True)
        dec = m64.decode(zd).sample
        (g_dec.double() * dec).sum().backward()
        out["decoded"] = dec.detach().float().numpy()
        out["dec_grad_input"] = zd.grad.float().numpy()
        grads["dec"] = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy()
                        for k, p in params.items()}
    folder = os.path.join(out_root, name)
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    st.save(os.path.join(folder, "diffusion_pytorch_model.safetensors"), sd, dtype="F32",
            metadata={"format": "pt"})
    for k, a in out.items():
        np.save(os.path.join(folder, k + ".npy"), a.astype(np.float32))
    for k, gd in grads.items():
        # the grads' keys are named_parameters'; the state dict's names are the same for
        # AutoencoderKL (no buffers), which the engine's parameter list must match
        st.save(os.path.join(folder, "%s_grad_params.safetensors" % k), gd,
                metadata={"format": "pt"})
    info = dict(preset=name, description=spec["doc"], seed=spec["seed"], batch=n,
                size=[h, w], downsampling_factor=factor, num_parameters=len(sd),
                reference="diffusers AutoencoderKL in float64 (exact_f64, safe_baddbmm), "
                          "torch.autograd of sum(G * output)",
                diffusers_version=diffusers.__version__, torch_version=torch.__version__,
                command="tools/gen_vae_grad_fixtures.py --out " + out_root)
    with open(os.path.join(folder, "fixture.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print("%s: %d tensors, %d values" % (folder, len(sd), sum(v.size for v in sd.values())))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/vae_grad")
    ap.add_argument("--diffusers-src")
    args = ap.parse_args()
    import diffusers_env
    try:
        diffusers = diffusers_env.setup(args.diffusers_src)
    except diffusers_env.DiffusersEnvError as e:
        sys.exit("gen_vae_grad_fixtures: %s" % e)
    import torch
    from diffusers import AutoencoderKL
    torch.set_num_threads(1)
    for name, spec in PRESETS.items():
        make(name, spec, args.out, diffusers, torch, AutoencoderKL, diffusers_env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
