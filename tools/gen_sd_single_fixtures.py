#!/usr/bin/python3
"""Name maps for single-file Stable-Diffusion checkpoints, made by diffusers' own converter.

For a small SD 1.x-shaped and a small SD 2.x-shaped pipeline (diffusers v0.21 modules, random
weights; the structure of the real ones: 4 levels, 2 resnets per level, cross-attention in the
first three, a 4-level VAE, CLIP / OpenCLIP text encoders with 64-wide heads), this runs
scripts/convert_diffusers_to_original_stable_diffusion.py's functions to get the original-layout
checkpoint, and writes, per family, tests/fixtures/sd_single/sdN.json:
  "original": {name: shape} of the single-file checkpoint the converter writes
  "parts": {"unet"|"vae"|"text_encoder": [[diffusers_name, original_name, row0, rows], ...]}
  "config": {part: the structural keys of the part's diffusers/transformers config}
Only names and shapes are committed; tests/test_sd_single.c builds a checkpoint of those shapes
and checks that engine/model/sd_single.c sees exactly diffusers' tensors in it.
The SD 2.x text encoder is converted with 24 layers as the released checkpoints have them;
diffusers' loader (convert_open_clip_checkpoint) keeps 23, and so must we.

The converter must be v0.27's or later: v0.21's predates the VAE's to_q/to_k/to_v/to_out.0
names and writes them unconverted (real checkpoints say q/k/v/proj_out). Get it with
  git -C DIFFUSERS show v0.27.0:scripts/convert_diffusers_to_original_stable_diffusion.py > F
The models themselves come from the v0.21 source tree (tools/diffusers_env.py).

Usage: /usr/bin/python3 tools/gen_sd_single_fixtures.py --converter F [--out DIR]
       [--diffusers-src PATH]
"""
import argparse
import importlib.util
import json
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import diffusers_env  # noqa: E402


def text_state(layers, width, vocab, positions, torch):
    """A CLIPTextModel state dict (transformers names) of random tensors."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {"text_model.embeddings.token_embedding.weight": r(vocab, width),
          "text_model.embeddings.position_embedding.weight": r(positions, width),
          "text_model.final_layer_norm.weight": r(width), "text_model.final_layer_norm.bias": r(width)}
    for n in range(layers):
        p = "text_model.encoder.layers.%d." % n
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + "self_attn.%s.weight" % proj] = r(width, width)
            sd[p + "self_attn.%s.bias" % proj] = r(width)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + ln + ".weight"] = r(width)
            sd[p + ln + ".bias"] = r(width)
        sd[p + "mlp.fc1.weight"] = r(4 * width, width)
        sd[p + "mlp.fc1.bias"] = r(4 * width)
        sd[p + "mlp.fc2.weight"] = r(width, 4 * width)
        sd[p + "mlp.fc2.bias"] = r(width)
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(TOOLS, "..", "tests", "fixtures", "sd_single"))
    ap.add_argument("--diffusers-src", default=None)
    ap.add_argument("--converter", required=True,
                    help="diffusers v0.27+ scripts/convert_diffusers_to_original_stable_diffusion.py")
    args = ap.parse_args()
    diffusers = diffusers_env.setup(args.diffusers_src)
    import torch
    spec = importlib.util.spec_from_file_location("conv", args.converter)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    quiet = print
    conv.print = lambda *a, **k: None  # it reports every reshape
    del quiet
    torch.manual_seed(0)
    for family in (1, 2):
        width = 64 if family == 1 else 128  # heads of 64 channels, as the real encoders
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), cross_attention_dim=width,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8 if family == 1 else (1, 1, 1, 1),
            use_linear_projection=family == 2)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        with torch.no_grad():  # distinct values everywhere, so tensors are found by content
            for m in (unet, vae):
                for prm in m.parameters():
                    prm.copy_(torch.randn_like(prm))
        layers = 2 if family == 1 else 24
        text = text_state(layers, width, 100, 77, torch)
        u = {"model.diffusion_model." + k: v for k, v in conv.convert_unet_state_dict(unet.state_dict()).items()}
        v = {"first_stage_model." + k: t for k, t in conv.convert_vae_state_dict(vae.state_dict()).items()}
        if family == 1:
            t = {"cond_stage_model.transformer." + k: x for k, x in text.items()}
        else:
            t = {"transformer." + k: x for k, x in text.items()}
            t = conv.convert_text_enc_state_dict_v20(t)
            t = {"cond_stage_model.model." + k: x for k, x in t.items()}
        original = {**u, **v, **t}
        # Back again by identity of the data: each diffusers tensor is found in the original
        # checkpoint (whole, or as a row block of a fused q/k/v matrix).
        def find(name, x, pool, rows_of=None):
            for oname, o in pool.items():
                if o.shape == x.shape and torch.equal(o, x):
                    return [oname, 0, 0]
                if o.dim() >= 1 and o.shape[1:] == x.shape[1:] and o.shape[0] > x.shape[0] \
                        and o.shape[0] % x.shape[0] == 0:
                    for k in range(o.shape[0] // x.shape[0]):
                        blk = o[k * x.shape[0]:(k + 1) * x.shape[0]]
                        if torch.equal(blk, x):
                            return [oname, k * x.shape[0], x.shape[0]]
                if o.dim() == 4 and x.dim() == 2 and o.shape == x.shape + (1, 1) and \
                        torch.equal(o.reshape(x.shape), x):
                    return [oname, 0, 0]
            raise SystemExit("no original tensor for %s" % name)
        parts = {}
        kept_text = {k: x for k, x in text.items() if family == 1 or ".layers.23." not in k}
        for part, sd, pool in (("unet", unet.state_dict(), u), ("vae", vae.state_dict(), v),
                               ("text_encoder", kept_text, t)):
            parts[part] = [[k] + find(k, x, pool) for k, x in sd.items()]
        config = {
            "unet": {k: unet.config[k] for k in ("in_channels", "out_channels", "block_out_channels",
                     "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                     "use_linear_projection")},
            "vae": {k: vae.config[k] for k in ("in_channels", "out_channels", "block_out_channels",
                    "layers_per_block", "latent_channels")},
            "text_encoder": {"hidden_size": width, "intermediate_size": 4 * width,
                             "num_hidden_layers": layers if family == 1 else layers - 1,
                             "vocab_size": 100, "max_position_embeddings": 77},
        }
        for part in config:
            for k, x in list(config[part].items()):
                config[part][k] = list(x) if isinstance(x, tuple) else x
        out = {"original": {k: list(x.shape) for k, x in original.items()}, "parts": parts,
               "config": config}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sd%d.json" % family), "w") as f:
            json.dump(out, f, separators=(",", ":"), sort_keys=True)
        print("sd%d: %d original tensors, %s" % (family, len(original),
              {p: len(x) for p, x in parts.items()}))


if __name__ == "__main__":
    main()
