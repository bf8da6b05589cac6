#!/usr/bin/python3
"""Generate AutoencoderKL reference fixtures with diffusers (run at development time only).

A fixture directory is a diffusers VAE folder plus reference tensors:
  config.json                          AutoencoderKL config as diffusers saves it (plus
                                       "shift_factor" when the preset sets one: newer diffusers
                                       key, read by denoised, ignored by diffusers 0.21)
  diffusion_pytorch_model.safetensors  random weights, diffusers key names (or the legacy
                                       mid-block attention names with --legacy-attention-names)
  input.npy          float32 [N,in,H,W]          uniform in [-1, 1]
  mean.npy, std.npy  float32 [N,latent,H/f,W/f]  vae.encode(input).latent_dist .mean / .std
  latents.npy        float32 [N,latent,h,w]      standard normal
  decoded.npy        float32 [N,out,h*f,w*f]     vae.decode(latents).sample (no tiling)
  latents_tiled.npy  float32 [1,latent,th,tw]    (only with --tile) a latent larger than a tile
  decoded_tiled.npy  float32 [1,out,th*f,tw*f]   vae.decode with enable_tiling(), the tile
                                                 being --tile latent pixels (sample_size = tile*f)
  input_tiled.npy    float32 [1,in,th*f,tw*f]    (only with --tile) an image larger than a tile,
  mean_tiled.npy, std_tiled.npy                  and vae.encode of it with enable_tiling()
                                                 (tiled_encode: tiles of tile*f pixels)
  fixture.json                                   how it was made (seed, dtype, tile, command, ...)
where f = 2^(levels-1).  References are computed with the model and inputs in float64.

Weights are diffusers' default init after torch.manual_seed(seed), then every GroupNorm affine
and every all-zero/all-one parameter is re-drawn (as tools/gen_unet_fixtures.py does).  With
--dtype f16/bf16 the weights are rounded to that dtype before the reference is computed.

Examples:
  tools/gen_vae_fixtures.py --list-presets
  tools/gen_vae_fixtures.py --all-presets tests/fixtures/vae
  tools/gen_vae_fixtures.py --config two_level --seed 11 --out /tmp/vae_fx
  tools/gen_vae_fixtures.py --config two_level --channels 32,64 --set norm_num_groups=32 \\
      --size 32x24 --tile 8 --out /tmp/vae_fx2
Needs python3-torch + a diffusers source tree (see tools/diffusers_env.py).
"""
import argparse
import copy
import json
import os
import shlex
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import st  # noqa: E402
from gen_unet_fixtures import legacy_names, randomise  # noqa: E402

ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"

# Committed presets: widths scaled down from the SD VAE ([128, 256, 512, 512], 32 groups,
# 2 layers per block) so the three folders stay small in git; the structure is the same.
PRESETS = {
    "two_level": dict(
        doc="2 levels, 8 groups, one resnet per block, F32, modern attention names, tiled decode",
        config=dict(block_out_channels=[16, 24], down_block_types=[ENC] * 2,
                    up_block_types=[DEC] * 2, layers_per_block=1, norm_num_groups=8,
                    latent_channels=4, sample_size=16),
        seed=1, batch=2, size=(16, 16), latent=(8, 8), tile=4, tiled_latent=(11, 7),
        legacy=False, dtype="f32"),
    "groups32_f16": dict(
        doc="2 levels of 32 channels in 32 groups, F16 storage, legacy "
            "attention names (query/key/value/proj_attn), non-square, SD-XL's scaling factor",
        config=dict(block_out_channels=[32, 32], down_block_types=[ENC] * 2,
                    up_block_types=[DEC] * 2, layers_per_block=1, norm_num_groups=32,
                    latent_channels=4, sample_size=16, scaling_factor=0.13025),
        seed=2, batch=1, size=(24, 16), latent=(6, 10), tile=None, legacy=True, dtype="f16"),
    "three_level": dict(
        doc="3 levels, sample 32, two resnets per block (as SD's VAE), 8 latent channels, BF16 storage, a shift factor, tiled decode",
        config=dict(block_out_channels=[8, 16, 16], down_block_types=[ENC] * 3,
                    up_block_types=[DEC] * 3, layers_per_block=2, norm_num_groups=8,
                    latent_channels=8, sample_size=32, scaling_factor=0.3611),
        extra=dict(shift_factor=0.1159),
        seed=3, batch=1, size=(32, 32), latent=(4, 4), tile=8, tiled_latent=(13, 9),
        legacy=False, dtype="bf16"),
}


def die(msg):
    sys.stderr.write("gen_vae_fixtures: %s\n" % msg)
    sys.exit(2)


def parse_hw(s, what):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        die("%s wants HxW, got %r" % (what, s))
    if h < 1 or w < 1:
        die("%s must be positive" % what)
    return h, w


def load_spec(arg):
    if arg in PRESETS:
        spec = copy.deepcopy(PRESETS[arg])
        spec["name"] = arg
        return spec
    if not os.path.isfile(arg):
        die("--config %r is neither a preset (%s) nor a JSON file" % (arg, ", ".join(PRESETS)))
    try:
        with open(arg) as f:
            cfg = json.load(f)
    except ValueError as e:
        die("%s: invalid JSON: %s" % (arg, e))
    if not isinstance(cfg, dict) or cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        die("%s: expected an AutoencoderKL config object" % arg)
    extra = {k: cfg.pop(k) for k in ("shift_factor",) if k in cfg}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    s = cfg.get("sample_size", 32)
    s = s[0] if isinstance(s, (list, tuple)) else s
    f = 2 ** (len(cfg.get("block_out_channels", [64])) - 1)
    return dict(name=os.path.basename(arg), doc="from " + arg, config=cfg, extra=extra, seed=0,
                batch=1, size=(s, s), latent=(s // f, s // f), tile=None, legacy=False, dtype="f32")


def build(spec, args, torch, AutoencoderKL):
    cfg = spec["config"]
    if args.channels:
        cfg["block_out_channels"] = [int(c) for c in args.channels.split(",")]
        n = len(cfg["block_out_channels"])
        cfg["down_block_types"] = [ENC] * n
        cfg["up_block_types"] = [DEC] * n
    for kv in args.set:
        if "=" not in kv:
            die("--set wants KEY=JSON, got %r" % kv)
        k, v = kv.split("=", 1)
        try:
            cfg[k] = json.loads(v)
        except ValueError:
            cfg[k] = v
    try:
        return AutoencoderKL(**cfg)
    except (TypeError, ValueError) as e:
        die("bad AutoencoderKL config: %s" % e)


def tiled_reference(model64, z, tile, factor, diffusers_env, torch, encode_x=None):
    """diffusers' tiled decode with a tile of `tile` latent pixels (tile * factor image pixels);
    with encode_x, its tiled encode (posterior mean and std) instead."""
    model64.enable_tiling()
    model64.tile_latent_min_size = tile
    model64.tile_sample_min_size = tile * factor
    try:
        with torch.no_grad(), diffusers_env.safe_baddbmm():
            if encode_x is not None:
                post = model64.encode(encode_x.double()).latent_dist
                return post.mean, post.std
            return model64.decode(z.double()).sample
    finally:
        model64.disable_tiling()


def reference(model64, x, z, diffusers_env, torch):
    with torch.no_grad(), diffusers_env.safe_baddbmm():
        post = model64.encode(x.double()).latent_dist
        dec = model64.decode(z.double()).sample
    return post.mean, post.std, dec


def f32(t, what):
    a = t.numpy().astype(np.float32)
    if not np.all(np.isfinite(a)):
        die("non-finite %s" % what)
    return a


def rms(a):
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="preset name or AutoencoderKL config.json")
    ap.add_argument("--out", help="output directory (created)")
    ap.add_argument("--all-presets", metavar="ROOT", help="write every preset to ROOT/<name>")
    ap.add_argument("--list-presets", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", help="encoder input HxW (a multiple of the downsampling factor)")
    ap.add_argument("--latent", help="decoder input hxw")
    ap.add_argument("--tile", type=int, help="also write a tiled decode with tiles of this many "
                                             "latent pixels (a multiple of 4)")
    ap.add_argument("--tiled-latent", help="hxw of the latent decoded in tiles (default 2.5 tiles)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--legacy-attention-names", dest="legacy", action="store_true", default=None)
    g.add_argument("--modern-attention-names", dest="legacy", action="store_false")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="weight storage dtype")
    ap.add_argument("--channels", help="override block_out_channels, e.g. 32,64 (all blocks "
                                       "Down/UpEncoder/DecoderBlock2D)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override any config key, e.g. --set norm_num_groups=4")
    ap.add_argument("--no-check", action="store_true", help="skip reloading the dir with diffusers")
    ap.add_argument("--diffusers-src", help="diffusers src dir (default $DIFFUSERS_SRC or /tmp/diffusers-0.21/src)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    if args.list_presets:
        for k, v in PRESETS.items():
            print("%-14s %s" % (k, v["doc"]))
        return 0
    if args.all_presets:
        if args.config or args.out:
            die("--all-presets takes no --config/--out")
        for name in PRESETS:
            one = list(argv if argv is not None else sys.argv[1:])
            i = one.index("--all-presets")
            del one[i:i + 2]
            rc = main(one + ["--config", name, "--out", os.path.join(args.all_presets, name)])
            if rc:
                return rc
        return 0
    if not args.config or not args.out:
        die("need --config and --out (or --all-presets ROOT / --list-presets)")

    import diffusers_env
    try:
        diffusers = diffusers_env.setup(args.diffusers_src)
    except diffusers_env.DiffusersEnvError as e:
        die(str(e))
    import torch
    from diffusers import AutoencoderKL
    torch.set_num_threads(max(1, args.threads))

    spec = load_spec(args.config)
    seed = spec["seed"] if args.seed is None else args.seed
    batch = spec["batch"] if args.batch is None else args.batch
    legacy = spec["legacy"] if args.legacy is None else args.legacy
    dtype = (args.dtype or spec["dtype"]).upper()
    h, w = parse_hw(args.size, "--size") if args.size else spec["size"]
    lh, lw = parse_hw(args.latent, "--latent") if args.latent else spec["latent"]
    tile = args.tile if args.tile is not None else spec.get("tile")

    torch.manual_seed(seed)
    model = build(spec, args, torch, AutoencoderKL)
    randomise(model, torch)
    model.eval()
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if h % factor or w % factor:
        die("--size %dx%d is not a multiple of the downsampling factor %d" % (h, w, factor))
    if tile is not None and (tile < 4 or tile % 4):
        die("--tile must be a positive multiple of 4 (diffusers' overlap of a quarter tile is "
            "then exact)")
    if tile is not None:
        th, tw = (parse_hw(args.tiled_latent, "--tiled-latent") if args.tiled_latent
                  else spec.get("tiled_latent") or (tile * 5 // 2, tile * 5 // 2))

    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    sd = {k: st.round_to_dtype(v, dtype) for k, v in sd.items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

    gen = torch.Generator().manual_seed(seed * 1000 + 29)
    cin, lat = model.config.in_channels, model.config.latent_channels
    x = torch.rand(batch, cin, h, w, generator=gen, dtype=torch.float32) * 2 - 1
    z = torch.randn(batch, lat, lh, lw, generator=gen, dtype=torch.float32)
    zt = torch.randn(1, lat, th, tw, generator=gen, dtype=torch.float32) if tile else None
    # drawn after everything else, so the other arrays stay what they were before tiled encodes
    xt = (torch.rand(1, cin, th * factor, tw * factor, generator=gen, dtype=torch.float32) * 2 - 1
          if tile else None)

    model64 = diffusers_env.exact_f64(copy.deepcopy(model))
    mean, std, dec = reference(model64, x, z, diffusers_env, torch)
    out = {"input": x.numpy(), "mean": f32(mean, "mean"), "std": f32(std, "std"),
           "latents": z.numpy(), "decoded": f32(dec, "decoded")}
    if tile:
        dect = tiled_reference(model64, zt, tile, factor, diffusers_env, torch)
        out["latents_tiled"] = zt.numpy()
        out["decoded_tiled"] = f32(dect, "tiled decode")
        mt, st_ = tiled_reference(model64, None, tile, factor, diffusers_env, torch, encode_x=xt)
        out["input_tiled"] = xt.numpy()
        out["mean_tiled"] = f32(mt, "tiled encode mean")
        out["std_tiled"] = f32(st_, "tiled encode std")

    os.makedirs(args.out, exist_ok=True)
    model.save_config(args.out)
    extra = spec.get("extra") or {}
    if extra:
        cpath = os.path.join(args.out, "config.json")
        with open(cpath) as f:
            saved = json.load(f)
        saved.update(extra)
        with open(cpath, "w") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
            f.write("\n")
    store = legacy_names(model, sd) if legacy else sd
    st.save(os.path.join(args.out, "diffusion_pytorch_model.safetensors"), store, dtype=dtype,
            metadata={"format": "pt"})
    for name in ("latents_tiled", "decoded_tiled", "input_tiled", "mean_tiled", "std_tiled"):
        p = os.path.join(args.out, name + ".npy")
        if name not in out and os.path.exists(p):
            os.remove(p)
    for name, a in out.items():
        np.save(os.path.join(args.out, name + ".npy"), a)
    cmd = "tools/gen_vae_fixtures.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    info = dict(
        preset=spec["name"], description=spec["doc"], seed=seed, batch=batch, dtype=dtype,
        legacy_attention_names=legacy, downsampling_factor=factor, tile_latent=tile,
        num_parameters=int(sum(v.size for v in sd.values())),
        rms={k: rms(v) for k, v in out.items()},
        reference="diffusers AutoencoderKL encode (latent_dist mean/std) and decode in float64 "
                  "(attention softmax kept in float64; baddbmm(beta=0) as bmm); the tiled decode "
                  "with enable_tiling() and tile_latent_min_size = tile_latent",
        diffusers_version=diffusers.__version__, torch_version=torch.__version__, command=cmd,
    )
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")

    if not args.no_check:
        # Reload through diffusers' own loader (legacy-name conversion and dtype upcast).
        m2 = diffusers_env.exact_f64(AutoencoderKL.from_pretrained(args.out))
        _, _, d2 = reference(m2, x, z, diffusers_env, torch)
        rel = float((d2 - dec).norm() / dec.norm())
        if rel > 1e-12:
            die("reload check failed: rel diff %.3g" % rel)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print("%s: %s params=%d dtype=%s legacy=%s batch=%d tile=%s dir=%.0f KB%s" % (
        args.out, spec["name"], info["num_parameters"], dtype, legacy, batch, tile, size / 1024,
        "" if args.no_check else " (diffusers reload ok)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
