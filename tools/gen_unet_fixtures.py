#!/usr/bin/python3
"""Generate UNet2DModel reference fixtures with diffusers (run at development time only).

A fixture directory is a diffusers model layout plus reference tensors:
  config.json                          UNet2DModel config exactly as diffusers saves it
  diffusion_pytorch_model.safetensors  random weights, diffusers key names (or legacy
                                       attention names with --legacy-attention-names)
  scheduler_config.json                DDPMScheduler, linear betas 1e-4..0.02, 1000 steps
  input.npy       float32 [N,C,H,W]    standard normal
  timesteps.npy   int64 [N]  (float32 [N] with --fractional-timesteps)
  class_labels.npy int64 [N]           only when num_class_embeds is set
  output.npy      float32 [N,C,H,W]    model(input, timesteps, class_labels).sample, computed
                                       with the model and inputs in float64
  fixture.json                         how it was made (seed, dtype, command, versions)

Weights are diffusers' default init after torch.manual_seed(seed); every GroupNorm
weight/bias and every parameter that would be all-zeros/all-ones is then re-drawn as
1+0.1*randn / 0.1*randn so no affine parameter is trivial.  With --dtype f16/bf16 the
weights are rounded to that dtype before the reference is computed, so loading the file
and upcasting reproduces the reference exactly.

Examples:
  tools/gen_unet_fixtures.py --list-presets
  tools/gen_unet_fixtures.py --config cifar_small --out tests/fixtures/unet/cifar_small
  tools/gen_unet_fixtures.py --all-presets tests/fixtures/unet
  tools/gen_unet_fixtures.py --config cifar_small --seed 7 --batch 3 --channels 32,64,64,64 \\
      --timesteps 1,500,999 --out /tmp/fx
  tools/gen_unet_fixtures.py --config my_unet_config.json --dtype bf16 --out /tmp/fx2
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

_GOOGLE_KEYS = dict(  # keys shared by the google/ddpm-* UNet2DModel configs
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, in_channels=3, out_channels=3, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-6, time_embedding_type="positional",
)
CIFAR_DOWN = ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
CIFAR_UP = ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
CHURCH_DOWN = ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"]
CHURCH_UP = ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4

# Committed presets.  Widths are scaled down from the real models so the four directories
# stay ~3 MB in git; all structural keys follow the model each preset imitates.
PRESETS = {
    "cifar_small": dict(
        doc="google/ddpm-cifar10-32 block structure, legacy attention names, F32",
        config=dict(_GOOGLE_KEYS, block_out_channels=[16, 24, 24, 24], norm_num_groups=8,
                    down_block_types=CIFAR_DOWN, up_block_types=CIFAR_UP, sample_size=16),
        seed=1, batch=2, timesteps=[10, 937], legacy=True, dtype="f32"),
    "church_small": dict(
        doc="google/ddpm-ema-church-256 block structure, legacy attention names, F16 storage",
        config=dict(_GOOGLE_KEYS, block_out_channels=[16, 16, 16, 16, 24, 24], norm_num_groups=8,
                    down_block_types=CHURCH_DOWN, up_block_types=CHURCH_UP, sample_size=32),
        seed=2, batch=1, timesteps=[640], legacy=True, dtype="f16"),
    "classcond_small": dict(
        doc="class-conditional, multi-head attention (head dim 8), flip_sin_to_cos, BF16 storage",
        config=dict(_GOOGLE_KEYS, num_class_embeds=11, attention_head_dim=8, flip_sin_to_cos=True,
                    freq_shift=0, downsample_padding=1, block_out_channels=[16, 32],
                    norm_num_groups=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "UpBlock2D"], sample_size=8),
        seed=3, batch=3, timesteps=[0.375, 421.6133, 999.5], fractional=True,
        class_labels=[3, 10, 0], legacy=False, dtype="bf16"),
    "resnet_updown_small": dict(
        doc="resnet down/upsamplers (avg-pool / nearest inside ResnetBlock2D), scale_shift time "
            "conditioning, mid-block attention without group norm",
        config=dict(_GOOGLE_KEYS, downsample_type="resnet", upsample_type="resnet",
                    resnet_time_scale_shift="scale_shift", add_attention=True,
                    block_out_channels=[16, 24], norm_num_groups=8,
                    down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "UpBlock2D"], sample_size=8),
        seed=4, batch=2, timesteps=[0, 999], legacy=False, dtype="f32"),
}

LEGACY_ATTN = [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]


def die(msg):
    sys.stderr.write("gen_unet_fixtures: %s\n" % msg)
    sys.exit(2)


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
    if not isinstance(cfg, dict):
        die("%s: expected a JSON object" % arg)
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        die("%s: _class_name is %r, only UNet2DModel is supported" % (arg, cfg["_class_name"]))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return dict(name=os.path.basename(arg), doc="from " + arg, config=cfg, seed=0, batch=2,
                timesteps=None, legacy=False, dtype="f32")


def legacy_names(model, sd):
    """Rename diffusers attention params to the pre-0.14 AttentionBlock names used by google/ddpm-*."""
    paths = [n for n, m in model.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]
    out = {}
    for k, v in sd.items():
        nk = k
        for p in paths:
            if k.startswith(p + "."):
                rest = k[len(p) + 1:]
                for new, old in LEGACY_ATTN:
                    if rest.startswith(new):
                        rest = old + rest[len(new):]
                nk = p + "." + rest
        out[nk] = v
    return out


def randomise(model, torch, gen_scale=0.1):
    for mod in model.modules():
        if isinstance(mod, torch.nn.GroupNorm) and mod.affine:
            with torch.no_grad():
                mod.weight.copy_(1 + gen_scale * torch.randn_like(mod.weight))
                mod.bias.copy_(gen_scale * torch.randn_like(mod.bias))
    for name, p in model.named_parameters():
        with torch.no_grad():
            if torch.all(p == 0):
                p.copy_(gen_scale * torch.randn_like(p))
            elif torch.all(p == 1):
                p.copy_(1 + gen_scale * torch.randn_like(p))


def stored_weights(model, torch, dtype):
    """Randomises the model (eval mode) and rounds its weights through the storage dtype, so the
    reference sees the stored values; returns them as float32 numpy arrays by name."""
    randomise(model, torch)
    model.eval()
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    sd = {k: st.round_to_dtype(v, dtype) for k, v in sd.items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return sd


def each_preset(main, argv, presets, root):
    """Runs main once per preset with --all-presets ROOT replaced by --config NAME --out ROOT/NAME."""
    rest = list(argv)
    i = rest.index("--all-presets")
    del rest[i:i + 2]
    for name in presets:
        rc = main(rest + ["--config", name, "--out", os.path.join(root, name)])
        if rc:
            return rc
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="preset name or UNet2DModel config.json")
    ap.add_argument("--out", help="output directory (created)")
    ap.add_argument("--all-presets", metavar="ROOT", help="write every preset to ROOT/<name>")
    ap.add_argument("--list-presets", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--timesteps", help="comma list, one per batch item (default: the preset's, or random "
                                        "when --seed/--batch is given or the config is a file)")
    ap.add_argument("--fractional-timesteps", action="store_true", default=None,
                    help="store float32 timesteps (random ones get fractional parts)")
    ap.add_argument("--class-labels", help="comma list of ints (when num_class_embeds is set)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--legacy-attention-names", dest="legacy", action="store_true", default=None,
                   help="store attention params as query/key/value/proj_attn (google/ddpm-* naming)")
    g.add_argument("--modern-attention-names", dest="legacy", action="store_false",
                   help="store attention params as to_q/to_k/to_v/to_out.0")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="weight storage dtype")
    ap.add_argument("--channels", help="override block_out_channels, e.g. 32,64,64,64")
    ap.add_argument("--sample-size", type=int, help="override sample_size (input H=W)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override any config key, e.g. --set norm_num_groups=4")
    ap.add_argument("--no-check", action="store_true", help="skip reloading the dir with diffusers")
    ap.add_argument("--diffusers-src", help="diffusers src dir (default $DIFFUSERS_SRC or /tmp/diffusers-0.21/src)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    if args.list_presets:
        for k, v in PRESETS.items():
            print("%-20s %s" % (k, v["doc"]))
        return 0
    if args.all_presets:
        if args.config or args.out:
            die("--all-presets takes no --config/--out")
        return each_preset(main, argv if argv is not None else sys.argv[1:], PRESETS,
                           args.all_presets)
    if not args.config or not args.out:
        die("need --config and --out (or --all-presets ROOT / --list-presets)")

    import diffusers_env
    try:
        diffusers = diffusers_env.setup(args.diffusers_src)
    except diffusers_env.DiffusersEnvError as e:
        die(str(e))
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    torch.set_num_threads(max(1, args.threads))

    spec = load_spec(args.config)
    cfg = spec["config"]
    if args.channels:
        cfg["block_out_channels"] = [int(c) for c in args.channels.split(",")]
    if args.sample_size:
        cfg["sample_size"] = args.sample_size
    for kv in args.set:
        if "=" not in kv:
            die("--set wants KEY=JSON, got %r" % kv)
        k, v = kv.split("=", 1)
        try:
            cfg[k] = json.loads(v)
        except ValueError:
            cfg[k] = v
    seed = spec["seed"] if args.seed is None else args.seed
    batch = spec["batch"] if args.batch is None else args.batch
    legacy = spec["legacy"] if args.legacy is None else args.legacy
    dtype = (args.dtype or spec["dtype"]).upper()
    fractional = bool(spec.get("fractional")) if args.fractional_timesteps is None else True
    # Preset timesteps/labels only apply while the batch is unchanged.
    ts = spec.get("timesteps") if args.batch is None and args.seed is None else None
    labels = spec.get("class_labels") if args.batch is None and args.seed is None else None
    try:
        if args.timesteps:
            ts = [float(t) if fractional else int(t) for t in args.timesteps.split(",")]
        if args.class_labels:
            labels = [int(c) for c in args.class_labels.split(",")]
    except ValueError as e:
        die("bad --timesteps/--class-labels (%s); fractional timesteps need --fractional-timesteps" % e)

    torch.manual_seed(seed)
    try:
        model = UNet2DModel(**cfg)
    except TypeError as e:
        die("bad UNet2DModel config: %s" % e)
    sd = stored_weights(model, torch, dtype)

    g = torch.Generator().manual_seed(seed * 1000 + 17)
    c = model.config.in_channels
    s = model.config.sample_size
    if isinstance(s, (list, tuple)):
        h, w = s
    elif s is None:
        die("config has no sample_size; pass --sample-size")
    else:
        h = w = s
    x = torch.randn(batch, c, h, w, generator=g, dtype=torch.float32)
    if ts is None:
        if fractional:
            ts = (torch.rand(batch, generator=g, dtype=torch.float64) * 999).tolist()
        else:
            ts = torch.randint(0, 1000, (batch,), generator=g).tolist()
    if len(ts) != batch:
        die("%d timesteps for batch %d" % (len(ts), batch))
    t = torch.tensor(ts, dtype=torch.float32 if fractional else torch.int64)
    ncls = model.config.num_class_embeds
    y = None
    if ncls is not None:
        if labels is None:
            labels = torch.randint(0, ncls, (batch,), generator=g).tolist()
            labels[-1] = ncls - 1
        if len(labels) != batch or min(labels) < 0 or max(labels) >= ncls:
            die("class labels %r invalid for batch %d / num_class_embeds %d" % (labels, batch, ncls))
        y = torch.tensor(labels, dtype=torch.int64)
    elif labels:
        die("--class-labels given but the config has no num_class_embeds")
    if model.config.class_embed_type is not None:
        die("class_embed_type %r is not supported by the fixtures" % model.config.class_embed_type)

    model64 = diffusers_env.exact_f64(copy.deepcopy(model))
    with torch.no_grad(), diffusers_env.safe_baddbmm():
        out = model64(x.double(), t, class_labels=y).sample
    out_np = out.numpy().astype(np.float32)
    if not np.all(np.isfinite(out_np)):
        die("non-finite output")

    os.makedirs(args.out, exist_ok=True)
    model.save_config(args.out)
    store = legacy_names(model, sd) if legacy else sd
    st.save(os.path.join(args.out, "diffusion_pytorch_model.safetensors"), store, dtype=dtype,
            metadata={"format": "pt"})
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
    sched.save_config(args.out)
    np.save(os.path.join(args.out, "input.npy"), x.numpy())
    np.save(os.path.join(args.out, "timesteps.npy"), t.numpy())
    if y is not None:
        np.save(os.path.join(args.out, "class_labels.npy"), y.numpy())
    elif os.path.exists(os.path.join(args.out, "class_labels.npy")):
        os.remove(os.path.join(args.out, "class_labels.npy"))
    np.save(os.path.join(args.out, "output.npy"), out_np)
    cmd = "tools/gen_unet_fixtures.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    info = dict(
        preset=spec["name"], description=spec["doc"], seed=seed, batch=batch, dtype=dtype,
        legacy_attention_names=legacy, fractional_timesteps=fractional,
        timesteps=t.tolist(), class_labels=None if y is None else y.tolist(),
        num_parameters=int(sum(v.size for v in sd.values())),
        output_rms=float(np.sqrt(np.mean(out_np.astype(np.float64) ** 2))),
        reference="diffusers UNet2DModel forward in float64 (timestep sinusoid computed in float32 as "
                  "diffusers does; attention softmax kept in float64; baddbmm(beta=0) as bmm)",
        diffusers_version=diffusers.__version__, torch_version=torch.__version__, command=cmd,
    )
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")

    if not args.no_check:
        # Reload through diffusers' own loader (exercises legacy-name conversion + dtype upcast).
        m2 = diffusers_env.exact_f64(UNet2DModel.from_pretrained(args.out))
        with torch.no_grad(), diffusers_env.safe_baddbmm():
            o2 = m2(x.double(), t, class_labels=y).sample
        rel = float((o2 - out).norm() / out.norm())
        if rel > 1e-12:
            die("reload check failed: rel diff %.3g" % rel)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print("%s: %s params=%d dtype=%s legacy=%s batch=%d out_rms=%.4f dir=%.0f KB%s" % (
        args.out, spec["name"], info["num_parameters"], dtype, legacy, batch, info["output_rms"],
        size / 1024, "" if args.no_check else " (diffusers reload ok)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
