#!/usr/bin/python3
"""Generate UNet2DConditionModel reference fixtures with diffusers (development time only).

A fixture directory is a diffusers model layout plus reference tensors:
  config.json                          UNet2DConditionModel config exactly as diffusers saves it
  diffusion_pytorch_model.safetensors  random weights under diffusers' names
  input.npy                  float32 [N,C,H,W]      standard normal
  timesteps.npy              int64 [N] (float32 [N] with fractional timesteps)
  encoder_hidden_states.npy  float32 [N,S,cross_attention_dim]  standard normal
  output.npy                 float32 [N,C,H,W]      model(input, t, encoder_hidden_states).sample,
                                                     computed with the model and inputs in float64
  fixture.json               how it was made (seed, dtype, command, versions)

Weights are diffusers' default init after torch.manual_seed(seed), every norm's affine
parameters and every all-zero/all-one tensor re-drawn (gen_unet_fixtures.randomise) so nothing
is trivial; with --dtype f16/bf16 they are rounded to that dtype before the reference is taken.

Presets imitate the two Stable-Diffusion families at toy widths (each directory well under 1 MB):
  sd1_small  SD-1.x: conv proj_in/proj_out, attention_head_dim a scalar (8 heads everywhere),
             flip_sin_to_cos, freq_shift 0, F16 storage as SD checkpoints are shipped
  sd2_small  SD-2.x: use_linear_projection, attention_head_dim per block, upcast_attention,
             three levels, fractional timesteps

Examples:
  tools/gen_cunet_fixtures.py --list-presets
  tools/gen_cunet_fixtures.py --all-presets tests/fixtures/cunet
  tools/gen_cunet_fixtures.py --config sd2_small --seed 11 --batch 3 --out /tmp/cunet_extra
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
from gen_unet_fixtures import each_preset, stored_weights  # noqa: E402

_SD_KEYS = dict(  # keys every SD 1.x / 2.x unet/config.json shares
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, out_channels=4, mid_block_scale_factor=1, norm_eps=1e-5,
    dual_cross_attention=False, only_cross_attention=False, mid_block_type="UNetMidBlock2DCrossAttn",
)

PRESETS = {
    "sd1_small": dict(
        doc="SD-1.x structure: conv proj_in/out, 8 heads (scalar attention_head_dim), F16 storage",
        config=dict(_SD_KEYS, block_out_channels=[16, 32], layers_per_block=2, norm_num_groups=8,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    attention_head_dim=8, cross_attention_dim=32, sample_size=16),
        seed=21, batch=2, seq=5, timesteps=[999, 41], dtype="f16"),
    "sd2_small": dict(
        doc="SD-2.x structure: linear proj_in/out, per-block heads, upcast_attention, 3 levels, BF16 storage",
        config=dict(_SD_KEYS, block_out_channels=[16, 24, 32], layers_per_block=1,
                    norm_num_groups=8,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    attention_head_dim=[2, 4, 4], use_linear_projection=True,
                    upcast_attention=True, cross_attention_dim=24, sample_size=8),
        seed=22, batch=2, seq=7, timesteps=[0.5, 612.25], fractional=True, dtype="bf16"),
}


def die(msg):
    sys.stderr.write("gen_cunet_fixtures: %s\n" % msg)
    sys.exit(2)


def exact(model, diffusers_env):
    """A float64 copy of the model that really computes in float64: upcast_attention casts q and
    k with .float() -- a downcast for a float64 model -- so switch it off as exact_f64 does
    upcast_softmax (both are no-ops in float32, where the C code computes)."""
    m = diffusers_env.exact_f64(copy.deepcopy(model))
    for mod in m.modules():
        if hasattr(mod, "upcast_attention"):
            mod.upcast_attention = False
    return m


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="preset name")
    ap.add_argument("--out", help="output directory (created)")
    ap.add_argument("--all-presets", metavar="ROOT", help="write every preset to ROOT/<name>")
    ap.add_argument("--list-presets", action="store_true")
    ap.add_argument("--seed", type=int, help="other weights and inputs (random timesteps)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int, help="encoder sequence length")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="weight storage dtype")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config key, e.g. --set attention_head_dim=[4,2,2]")
    ap.add_argument("--no-check", action="store_true", help="skip reloading the dir with diffusers")
    ap.add_argument("--diffusers-src", help="diffusers src dir (default $DIFFUSERS_SRC or /tmp/diffusers-0.21/src)")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def build_spec(args):
    if args.config not in PRESETS:
        die("--config %r is not a preset (%s)" % (args.config, ", ".join(PRESETS)))
    spec = copy.deepcopy(PRESETS[args.config])
    spec["name"] = args.config
    for kv in args.set:
        if "=" not in kv:
            die("--set wants KEY=JSON, got %r" % kv)
        k, v = kv.split("=", 1)
        try:
            spec["config"][k] = json.loads(v)
        except ValueError:
            spec["config"][k] = v
    changed = args.seed is not None or args.batch is not None
    for k in ("seed", "batch", "seq", "dtype"):
        if getattr(args, k) is not None:
            spec[k] = getattr(args, k)
    if changed:  # the preset's timesteps belong to its own seed and batch
        spec["timesteps"] = None
    spec["dtype"] = spec["dtype"].upper()
    return spec


def make_inputs(spec, model, torch):
    seed, batch, cfg = spec["seed"], spec["batch"], model.config
    g = torch.Generator().manual_seed(seed * 1000 + 17)
    s = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=g, dtype=torch.float32)
    cross = cfg.cross_attention_dim
    if not isinstance(cross, int):
        cross = cross[0]
    ehs = torch.randn(batch, spec["seq"], cross, generator=g, dtype=torch.float32)
    fractional = bool(spec.get("fractional"))
    ts = spec["timesteps"]
    if ts is None:
        if fractional:
            ts = (torch.rand(batch, generator=g, dtype=torch.float64) * 999).tolist()
        else:
            ts = torch.randint(0, 1000, (batch,), generator=g).tolist()
    if len(ts) != batch:
        die("%d timesteps for batch %d" % (len(ts), batch))
    t = torch.tensor(ts, dtype=torch.float32 if fractional else torch.int64)
    return x, t, ehs


def write_dir(out, spec, model, sd, x, t, ehs, out_np, diffusers, torch, argv):
    os.makedirs(out, exist_ok=True)
    model.save_config(out)
    st.save(os.path.join(out, "diffusion_pytorch_model.safetensors"), sd, dtype=spec["dtype"],
            metadata={"format": "pt"})
    np.save(os.path.join(out, "input.npy"), x.numpy())
    np.save(os.path.join(out, "timesteps.npy"), t.numpy())
    np.save(os.path.join(out, "encoder_hidden_states.npy"), ehs.numpy())
    np.save(os.path.join(out, "output.npy"), out_np)
    cmd = "tools/gen_cunet_fixtures.py " + " ".join(shlex.quote(a) for a in argv)
    info = dict(
        preset=spec["name"], description=spec["doc"], seed=spec["seed"], batch=spec["batch"],
        seq=spec["seq"], dtype=spec["dtype"], timesteps=t.tolist(),
        num_parameters=int(sum(v.size for v in sd.values())),
        output_rms=float(np.sqrt(np.mean(out_np.astype(np.float64) ** 2))),
        reference="diffusers UNet2DConditionModel forward in float64 (timestep sinusoid in float32 "
                  "as diffusers computes it; softmax and upcast_attention kept in float64; "
                  "baddbmm(beta=0) as bmm)",
        diffusers_version=diffusers.__version__, torch_version=torch.__version__, command=cmd,
    )
    with open(os.path.join(out, "fixture.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list_presets:
        for k, v in PRESETS.items():
            print("%-12s %s" % (k, v["doc"]))
        return 0
    if args.all_presets:
        if args.config or args.out:
            die("--all-presets takes no --config/--out")
        return each_preset(main, argv, PRESETS, args.all_presets)
    if not args.config or not args.out:
        die("need --config and --out (or --all-presets ROOT / --list-presets)")

    import diffusers_env
    try:
        diffusers = diffusers_env.setup(args.diffusers_src)
    except diffusers_env.DiffusersEnvError as e:
        die(str(e))
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(max(1, args.threads))

    spec = build_spec(args)
    torch.manual_seed(spec["seed"])
    try:
        model = UNet2DConditionModel(**spec["config"])
    except (TypeError, ValueError) as e:
        die("bad UNet2DConditionModel config: %s" % e)
    sd = stored_weights(model, torch, spec["dtype"])

    x, t, ehs = make_inputs(spec, model, torch)
    with torch.no_grad(), diffusers_env.safe_baddbmm():
        out = exact(model, diffusers_env)(x.double(), t, encoder_hidden_states=ehs.double()).sample
    out_np = out.numpy().astype(np.float32)
    if not np.all(np.isfinite(out_np)):
        die("non-finite output")
    info = write_dir(args.out, spec, model, sd, x, t, ehs, out_np, diffusers, torch, argv)

    if not args.no_check:
        m2 = exact(UNet2DConditionModel.from_pretrained(args.out), diffusers_env)
        with torch.no_grad(), diffusers_env.safe_baddbmm():
            o2 = m2(x.double(), t, encoder_hidden_states=ehs.double()).sample
        rel = float((o2 - out).norm() / out.norm())
        if rel > 1e-12:
            die("reload check failed: rel diff %.3g" % rel)
        # and float32 diffusers, as a user runs it, is within the tolerance the C code must meet
        with torch.no_grad():
            o32 = model(x, t, encoder_hidden_states=ehs).sample.double()
        info_f32 = float((o32 - out).norm() / out.norm())
        print("  float32 diffusers vs float64 reference: rel L2 %.3g" % info_f32)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print("%s: %s params=%d dtype=%s batch=%d seq=%d out_rms=%.4f dir=%.0f KB%s" % (
        args.out, spec["name"], info["num_parameters"], spec["dtype"], spec["batch"], spec["seq"],
        info["output_rms"], size / 1024, "" if args.no_check else " (diffusers reload ok)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
