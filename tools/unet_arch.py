"""UNet2DModel architecture facts without PyTorch (numpy only).

  DEFAULT_CONFIG            UNet2DModel.__init__ defaults of diffusers v0.21
  full_config(cfg)          the config.json diffusers would save for UNet2DModel(**cfg)
  param_shapes(cfg, legacy) {name: shape} of its state_dict (diffusers names, or the legacy
                            google/ddpm-* attention names query/key/value/proj_attn)
  random_weights(cfg, seed) random float32 weights with those names/shapes
  write_model_dir(dir, cfg, weights, dtype)   config.json + diffusion_pytorch_model.safetensors
  flops(cfg, batch, h, w)   2*MACs of all convs, linears and attention matmuls of one forward

tools/check_torch_unet.py checks param_shapes/full_config/flops against diffusers itself.
bench/unet uses this module so that its parent process never imports torch.
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


class UNetConfigError(ValueError):
    pass


# UNet2DModel.__init__ defaults in diffusers v0.21 (what config.json holds for unspecified keys).
DEFAULT_CONFIG = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None,
)


def full_config(overrides, diffusers_version="0.21.0"):
    """A config.json dict as diffusers would save it for UNet2DModel(**overrides)."""
    cfg = dict(DEFAULT_CONFIG)
    for k, v in overrides.items():
        if k.startswith("_"):
            continue
        if k not in cfg:
            raise UNetConfigError("unknown UNet2DModel config key %r" % k)
        cfg[k] = list(v) if isinstance(v, tuple) else v
    cfg["_class_name"] = "UNet2DModel"
    cfg["_diffusers_version"] = diffusers_version
    return dict(sorted(cfg.items()))


def param_shapes(config, legacy=False):
    """{name: shape} of a UNet2DModel state_dict (diffusers v0.21 names; legacy attention
    names query/key/value/proj_attn with legacy=True).  Same checks as TorchUNet."""
    c = dict(DEFAULT_CONFIG)
    c.update({k: v for k, v in config.items() if not k.startswith("_")})
    ch = list(c["block_out_channels"])
    if not len(ch) == len(c["down_block_types"]) == len(c["up_block_types"]):
        raise UNetConfigError("block_out_channels/down_block_types/up_block_types lengths differ")
    L = int(c["layers_per_block"])
    temb = ch[0] * 4
    ss = c["resnet_time_scale_shift"] == "scale_shift"
    hd = c["attention_head_dim"]
    P = {}

    def conv(pfx, cin, cout, k=3):
        P[pfx + ".weight"] = (cout, cin, k, k)
        P[pfx + ".bias"] = (cout,)

    def lin(pfx, cin, cout):
        P[pfx + ".weight"] = (cout, cin)
        P[pfx + ".bias"] = (cout,)

    def norm(pfx, n):
        P[pfx + ".weight"] = (n,)
        P[pfx + ".bias"] = (n,)

    def resnet(pfx, cin, cout):
        norm(pfx + ".norm1", cin)
        conv(pfx + ".conv1", cin, cout)
        lin(pfx + ".time_emb_proj", temb, 2 * cout if ss else cout)
        norm(pfx + ".norm2", cout)
        conv(pfx + ".conv2", cout, cout)
        if cin != cout:
            conv(pfx + ".conv_shortcut", cin, cout, 1)

    def attn(pfx, ch_, with_norm=True):
        d = hd if hd is not None else ch_
        inner = (ch_ // d) * d
        if with_norm:
            norm(pfx + ".group_norm", ch_)
        names = ("query", "key", "value", "proj_attn") if legacy else ("to_q", "to_k", "to_v", "to_out.0")
        for n in names[:3]:
            lin(pfx + "." + n, ch_, inner)
        lin(pfx + "." + names[3], inner, ch_)

    conv("conv_in", c["in_channels"], ch[0])
    lin("time_embedding.linear_1", ch[0], temb)
    lin("time_embedding.linear_2", temb, temb)
    if c.get("class_embed_type") is not None:
        raise UNetConfigError("class_embed_type unsupported")
    if c.get("num_class_embeds") is not None:
        P["class_embedding.weight"] = (int(c["num_class_embeds"]), temb)
    nb = len(ch)
    out = ch[0]
    for i, bt in enumerate(c["down_block_types"]):
        cin, out = out, ch[i]
        pfx = "down_blocks.%d" % i
        for j in range(L):
            resnet("%s.resnets.%d" % (pfx, j), cin if j == 0 else out, out)
            if bt == "AttnDownBlock2D":
                attn("%s.attentions.%d" % (pfx, j), out)
        if i < nb - 1:
            if bt == "AttnDownBlock2D" and (c["downsample_type"] or "conv") == "resnet":
                resnet(pfx + ".downsamplers.0", out, out)
            else:
                conv(pfx + ".downsamplers.0.conv", out, out)
    resnet("mid_block.resnets.0", ch[-1], ch[-1])
    if c["add_attention"]:
        attn("mid_block.attentions.0", ch[-1], with_norm=c["resnet_time_scale_shift"] == "default")
    resnet("mid_block.resnets.1", ch[-1], ch[-1])
    rev = list(reversed(ch))
    out = rev[0]
    for i, bt in enumerate(c["up_block_types"]):
        prev, out = out, rev[i]
        inp = rev[min(i + 1, nb - 1)]
        pfx = "up_blocks.%d" % i
        for j in range(L + 1):
            skip = inp if j == L else out
            resnet("%s.resnets.%d" % (pfx, j), (prev if j == 0 else out) + skip, out)
            if bt == "AttnUpBlock2D":
                attn("%s.attentions.%d" % (pfx, j), out)
        if i < nb - 1:
            if bt == "AttnUpBlock2D" and (c["upsample_type"] or "conv") == "resnet":
                resnet(pfx + ".upsamplers.0", out, out)
            else:
                conv(pfx + ".upsamplers.0.conv", out, out)
    norm("conv_norm_out", ch[0])
    conv("conv_out", ch[0], c["out_channels"])
    return P


def random_weights(config, seed=0, legacy=False):
    """Random float32 weights for a UNet2DModel config, numpy only: uniform(+-1/sqrt(fan_in))
    for conv/linear weights and biases (PyTorch's default init range), GroupNorm weight
    1+0.1*randn and bias 0.1*randn, class embedding randn."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config, legacy=legacy)
    out = {}
    for name, shape in shapes.items():
        is_norm = ("norm" in name.rsplit(".", 2)[-2]) and len(shape) == 1
        if is_norm:
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
            if name.endswith(".weight"):
                v += np.float32(1)
        elif name == "class_embedding.weight":
            v = rng.standard_normal(shape, dtype=np.float32)
        else:
            wshape = shapes[name[:-len("bias")] + "weight"] if name.endswith(".bias") else shape
            fan_in = int(np.prod(wshape[1:]))
            bound = np.float32(1.0 / math.sqrt(fan_in))
            v = (rng.random(shape, dtype=np.float32) * np.float32(2) - np.float32(1)) * bound
        out[name] = v
    return out


def write_model_dir(path, config, weights, dtype="F32"):
    """Write config.json + diffusion_pytorch_model.safetensors (diffusers layout)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(full_config(config), f, indent=2, sort_keys=True)
        f.write("\n")
    st.save(os.path.join(path, "diffusion_pytorch_model.safetensors"), weights, dtype=dtype,
            metadata={"format": "pt"})


def flops(config, batch, height, width=None):
    """2*MACs of every conv, linear and attention matmul in one forward (element-wise ops excluded)."""
    width = height if width is None else width
    ch = list(config["block_out_channels"])
    L = int(config.get("layers_per_block", 2))
    hd = config.get("attention_head_dim", 8)
    tss = config.get("resnet_time_scale_shift", "default")
    temb = ch[0] * 4
    macs = 0
    H, W = height, width

    def conv(cin, cout, k, h, w):
        return cin * cout * k * k * h * w

    def resnet(cin, cout, h, w, hout=None, wout=None):
        hout = h if hout is None else hout
        wout = w if wout is None else wout
        m = conv(cin, cout, 3, hout, wout) + conv(cout, cout, 3, hout, wout)
        m += temb * cout * (2 if tss == "scale_shift" else 1)
        if cin != cout:
            m += conv(cin, cout, 1, hout, wout)
        return m

    def attn(c, h, w):
        s = h * w
        d = hd if hd is not None else c
        inner = (c // d) * d
        return 4 * s * c * inner + 2 * s * s * inner

    macs += ch[0] * temb + temb * temb
    macs += conv(config.get("in_channels", 3), ch[0], 3, H, W)
    out_ch = ch[0]
    skip_ch = [ch[0]]
    nb = len(ch)
    for i, bt in enumerate(config["down_block_types"]):
        cin, out_ch = out_ch, ch[i]
        for j in range(L):
            macs += resnet(cin if j == 0 else out_ch, out_ch, H, W)
            if bt == "AttnDownBlock2D":
                macs += attn(out_ch, H, W)
            skip_ch.append(out_ch)
        if i < nb - 1:
            if bt == "AttnDownBlock2D" and (config.get("downsample_type") or "conv") == "resnet":
                macs += resnet(out_ch, out_ch, H, W, H // 2, W // 2)
                H, W = H // 2, W // 2
            else:
                pad = int(config.get("downsample_padding", 1))
                extra = 1 if pad == 0 else 2 * pad  # padding 0 means an asymmetric (0,1) pad
                H, W = (H + extra - 3) // 2 + 1, (W + extra - 3) // 2 + 1
                macs += conv(out_ch, out_ch, 3, H, W)
            skip_ch.append(out_ch)
    c = ch[-1]
    macs += 2 * resnet(c, c, H, W)
    if config.get("add_attention", True):
        macs += attn(c, H, W)
    rev = list(reversed(ch))
    prev = rev[0]
    for i, bt in enumerate(config["up_block_types"]):
        out_ch = rev[i]
        for j in range(L + 1):
            cin = (prev if j == 0 else out_ch) + skip_ch.pop()
            macs += resnet(cin, out_ch, H, W)
            if bt == "AttnUpBlock2D":
                macs += attn(out_ch, H, W)
        if i < nb - 1:
            if bt == "AttnUpBlock2D" and (config.get("upsample_type") or "conv") == "resnet":
                macs += resnet(out_ch, out_ch, H, W, 2 * H, 2 * W)
            else:
                macs += conv(out_ch, out_ch, 3, 2 * H, 2 * W)
            H, W = 2 * H, 2 * W
        prev = out_ch
    macs += conv(ch[0], config.get("out_channels", 3), 3, H, W)
    return 2 * macs * batch
