"""Our own compact PyTorch UNet2DModel forward (no diffusers import).

Loads a diffusers-layout directory (config.json + diffusion_pytorch_model.safetensors, modern
`to_q/to_k/to_v/to_out.0` or legacy `query/key/value/proj_attn` attention names) via tools/st.py
and runs the forward pass with diffusers v0.21 semantics.  Used as the PyTorch reference in
benchmarks and checked against diffusers by tools/check_torch_unet.py.

    from torch_unet import TorchUNet
    net = TorchUNet.from_dir("tests/fixtures/unet/cifar_small", dtype=torch.float64)
    eps = net(x, timesteps, class_labels)          # x [N,C,H,W]; timesteps [N] int or float

Supported: time_embedding_type "positional"; down blocks DownBlock2D/AttnDownBlock2D, up
blocks UpBlock2D/AttnUpBlock2D; downsample_type/upsample_type "conv"|"resnet";
resnet_time_scale_shift "default"|"scale_shift"; add_attention; num_class_embeds
(class_embed_type null); act_fn silu/swish/mish/gelu/relu; center_input_sample;
mid_block_scale_factor.

Semantics worth knowing (all mirrored here):
 * The sinusoidal timestep embedding is computed in float32 whatever the model dtype:
   freq_i = exp(f32(-ln 10000) * i / (half - freq_shift)), arg = f32(t) * freq_i,
   [sin | cos] (or [cos | sin] when flip_sin_to_cos), then cast to the model dtype.
 * Downsample conv with downsample_padding=0 pads (left 0, right 1, top 0, bottom 1) and
   uses a stride-2 3x3 conv with no further padding; padding=1 is a plain padded conv.
 * Only the Attn* blocks honour downsample_type/upsample_type="resnet" (a ResnetBlock2D
   with 2x2 avg-pool / nearest-2x applied after norm1+act to both branches); DownBlock2D
   and UpBlock2D always use the conv samplers.
 * Attention: heads = C // attention_head_dim (attention_head_dim null -> one head of C),
   scale = attention_head_dim ** -0.5, residual add, then divide by rescale_output_factor
   (= mid_block_scale_factor in the mid block, 1 elsewhere).  The mid-block attention has
   no GroupNorm when resnet_time_scale_shift != "default".
 * ResnetBlock2D: out = (shortcut(x) + conv2(...)) / output_scale_factor; the temb goes
   through the block's act_fn before time_emb_proj; the time MLP itself always uses SiLU.
"""
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402
from unet_arch import (DEFAULT_CONFIG, UNetConfigError, flops, full_config, param_shapes,  # noqa: E402,F401
                       random_weights, write_model_dir)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_LEGACY = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
_LEGACY_MAP = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modernise_names(sd):
    """Map legacy google/ddpm-* attention names to diffusers' current ones."""
    return {_LEGACY.sub(lambda m: "%s.%s." % (m.group(1), _LEGACY_MAP[m.group(2)]), k): v
            for k, v in sd.items()}


def _act(name):
    name = (name or "silu").lower()
    if name in ("silu", "swish"):
        return F.silu
    if name == "mish":
        return F.mish
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise UNetConfigError("unsupported act_fn %r" % name)


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """diffusers get_timestep_embedding, float32 like upstream."""
    half = dim // 2
    expo = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32)
    expo = expo / (half - freq_shift)
    arg = t.reshape(-1, 1).float() * torch.exp(expo)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class TorchUNet:
    def __init__(self, config, params, dtype=torch.float32, memory_format=torch.contiguous_format,
                 consume=False):
        """params: {name: numpy array or tensor}; consume=True empties the dict while converting."""
        c = dict(config)
        self.c = c
        self.dtype = dtype
        self.mf = memory_format
        if c.get("time_embedding_type", "positional") != "positional":
            raise UNetConfigError("time_embedding_type %r unsupported" % c.get("time_embedding_type"))
        if c.get("class_embed_type") is not None:
            raise UNetConfigError("class_embed_type %r unsupported" % c.get("class_embed_type"))
        self.tss = c.get("resnet_time_scale_shift", "default")
        if self.tss not in ("default", "scale_shift"):
            raise UNetConfigError("resnet_time_scale_shift %r unsupported" % self.tss)
        self.ch = list(c["block_out_channels"])
        self.down = list(c["down_block_types"])
        self.up = list(c["up_block_types"])
        if not (len(self.ch) == len(self.down) == len(self.up)):
            raise UNetConfigError("block_out_channels/down_block_types/up_block_types lengths differ")
        for b in self.down:
            if b not in ("DownBlock2D", "AttnDownBlock2D"):
                raise UNetConfigError("down block %r unsupported" % b)
        for b in self.up:
            if b not in ("UpBlock2D", "AttnUpBlock2D"):
                raise UNetConfigError("up block %r unsupported" % b)
        self.L = int(c.get("layers_per_block", 2))
        self.groups = c.get("norm_num_groups", 32)
        if self.groups is None:
            raise UNetConfigError("norm_num_groups null unsupported")
        self.eps = float(c.get("norm_eps", 1e-5))
        self.act = _act(c.get("act_fn", "silu"))
        self.head_dim = c.get("attention_head_dim", 8)
        self.dpad = int(c.get("downsample_padding", 1))
        self.p = {}
        for k in list(params):
            # pop as we go: converted copies then reuse the memory of the freed originals
            v = params.pop(k) if consume else params[k]
            k = _LEGACY.sub(lambda m: "%s.%s." % (m.group(1), _LEGACY_MAP[m.group(2)]), k)
            t = v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v))
            if t.is_floating_point():
                t = t.to(dtype)
                if t.dim() == 4:
                    t = t.contiguous(memory_format=memory_format)
            self.p[k] = t
        self._check_params()

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path, dtype=torch.float32, memory_format=torch.contiguous_format):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UNetConfigError("%s: no config.json" % path)
        with open(cfg_path) as f:
            config = json.load(f)
        if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise UNetConfigError("%s: _class_name %r is not UNet2DModel" % (path, config.get("_class_name")))
        for wf in WEIGHT_FILES:
            wp = os.path.join(path, wf)
            if os.path.isfile(wp):
                break
        else:
            raise UNetConfigError("%s: no %s" % (path, " or ".join(WEIGHT_FILES)))
        return cls(config, st.load(wp), dtype=dtype, memory_format=memory_format, consume=True)

    def _check_params(self):
        want = param_shapes(self.c)
        missing = sorted(k for k in want if k not in self.p)
        extra = sorted(k for k in self.p if k not in want)
        bad = sorted("%s %s (expected %s)" % (k, tuple(self.p[k].shape), want[k])
                     for k in want if k in self.p and tuple(self.p[k].shape) != tuple(want[k]))
        msg = []
        if missing:
            msg.append("missing tensors: %s%s" % (", ".join(missing[:8]), " ..." if len(missing) > 8 else ""))
        if extra:
            msg.append("unexpected tensors: %s%s" % (", ".join(extra[:8]), " ..." if len(extra) > 8 else ""))
        if bad:
            msg.append("shape mismatch: %s" % "; ".join(bad[:8]))
        if msg:
            raise UNetConfigError("weights do not match the config: " + " | ".join(msg))

    # ---- primitives ------------------------------------------------------------------------
    def _gn(self, x, pfx, groups=None):
        return F.group_norm(x, groups or self.groups, self.p[pfx + ".weight"], self.p[pfx + ".bias"], self.eps)

    def _conv(self, x, pfx, stride=1, padding=1):
        return F.conv2d(x, self.p[pfx + ".weight"], self.p.get(pfx + ".bias"), stride=stride, padding=padding)

    def _lin(self, x, pfx):
        return F.linear(x, self.p[pfx + ".weight"], self.p.get(pfx + ".bias"))

    def _resnet(self, x, emb, pfx, out_scale=1.0, up=False, down=False, add=None):
        h = self.act(self._gn(x, pfx + ".norm1"))
        if up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        elif down:
            x = F.avg_pool2d(x, 2, 2)
            h = F.avg_pool2d(h, 2, 2)
        h = self._conv(h, pfx + ".conv1")
        if add is not None:  # structure guidance (tools/deblur/cond_unet.py GuidedUNet)
            h = h + add
        te = self._lin(self.act(emb), pfx + ".time_emb_proj")[:, :, None, None]
        if self.tss == "default":
            h = h + te
            h = self._gn(h, pfx + ".norm2")
        else:
            scale, shift = te.chunk(2, dim=1)
            h = self._gn(h, pfx + ".norm2") * (1 + scale) + shift
        h = self._conv(self.act(h), pfx + ".conv2")
        if pfx + ".conv_shortcut.weight" in self.p:
            x = self._conv(x, pfx + ".conv_shortcut", padding=0)
        out = x + h
        return out / out_scale if out_scale != 1.0 else out

    def _attn(self, x, pfx, rescale=1.0):
        n, c, hh, ww = x.shape
        d = self.head_dim if self.head_dim is not None else c
        heads = c // d
        h = self._gn(x, pfx + ".group_norm") if pfx + ".group_norm.weight" in self.p else x
        h = h.reshape(n, c, hh * ww).transpose(1, 2)
        q = self._lin(h, pfx + ".to_q").reshape(n, hh * ww, heads, d).transpose(1, 2)
        k = self._lin(h, pfx + ".to_k").reshape(n, hh * ww, heads, d).transpose(1, 2)
        v = self._lin(h, pfx + ".to_v").reshape(n, hh * ww, heads, d).transpose(1, 2)
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (d ** -0.5), dim=-1)
        o = torch.matmul(w, v).transpose(1, 2).reshape(n, hh * ww, heads * d)
        o = self._lin(o, pfx + ".to_out.0").transpose(1, 2).reshape(n, c, hh, ww)
        out = o + x
        return out / rescale if rescale != 1.0 else out

    def _downsample(self, x, pfx):
        if self.dpad == 0:
            return self._conv(F.pad(x, (0, 1, 0, 1)), pfx + ".conv", stride=2, padding=0)
        return self._conv(x, pfx + ".conv", stride=2, padding=self.dpad)

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, x, timesteps, class_labels=None, guide=None):
        """guide: {down level: [tensor per resnet]} added to those resnets' conv1 outputs."""
        c = self.c
        x = x.to(self.dtype)
        if self.mf is not torch.contiguous_format:
            x = x.contiguous(memory_format=self.mf)
        n = x.shape[0]
        t = torch.as_tensor(timesteps)
        if t.dim() == 0:
            t = t[None]
        t = t * torch.ones(n, dtype=t.dtype)
        if c.get("center_input_sample", False):
            x = 2 * x - 1.0
        temb = timestep_embedding(t, self.ch[0], c.get("flip_sin_to_cos", True),
                                  c.get("freq_shift", 0)).to(self.dtype)
        emb = self._lin(F.silu(self._lin(temb, "time_embedding.linear_1")), "time_embedding.linear_2")
        if "class_embedding.weight" in self.p:
            if class_labels is None:
                raise ValueError("class_labels are required for this model")
            emb = emb + self.p["class_embedding.weight"][torch.as_tensor(class_labels, dtype=torch.long)]

        h = self._conv(x, "conv_in")
        skips = [h]
        nb = len(self.ch)
        for i, bt in enumerate(self.down):
            pfx = "down_blocks.%d" % i
            attn = bt == "AttnDownBlock2D"
            for j in range(self.L):
                add = guide[i][j] if guide and i in guide else None
                h = self._resnet(h, emb, "%s.resnets.%d" % (pfx, j), add=add)
                if attn:
                    h = self._attn(h, "%s.attentions.%d" % (pfx, j))
                skips.append(h)
            if i < nb - 1:
                if attn and (c.get("downsample_type") or "conv") == "resnet":
                    h = self._resnet(h, emb, pfx + ".downsamplers.0", down=True)
                else:
                    h = self._downsample(h, pfx + ".downsamplers.0")
                skips.append(h)

        ms = float(c.get("mid_block_scale_factor", 1.0))
        h = self._resnet(h, emb, "mid_block.resnets.0", out_scale=ms)
        if c.get("add_attention", True):
            h = self._attn(h, "mid_block.attentions.0", rescale=ms)
        h = self._resnet(h, emb, "mid_block.resnets.1", out_scale=ms)

        for i, bt in enumerate(self.up):
            pfx = "up_blocks.%d" % i
            attn = bt == "AttnUpBlock2D"
            for j in range(self.L + 1):
                h = torch.cat([h, skips.pop()], dim=1)
                h = self._resnet(h, emb, "%s.resnets.%d" % (pfx, j))
                if attn:
                    h = self._attn(h, "%s.attentions.%d" % (pfx, j))
            if i < nb - 1:
                if attn and (c.get("upsample_type") or "conv") == "resnet":
                    h = self._resnet(h, emb, pfx + ".upsamplers.0", up=True)
                else:
                    h = self._conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), pfx + ".upsamplers.0.conv")

        h = F.silu(self._gn(h, "conv_norm_out"))
        return self._conv(h, "conv_out")


# ---- trainable module ----------------------------------------------------------------------
class _Node(torch.nn.Module):
    """Container so that parameters get diffusers' dotted names (down_blocks.0.resnets.0...)."""


class UNet2D(torch.nn.Module):
    """Trainable UNet2DModel: an nn.Module whose state_dict() has exactly diffusers' parameter
    names and shapes (param_shapes), and whose forward is TorchUNet's (one definition of the
    network for training, the PyTorch reference and the benchmarks).

        net = UNet2D(config, seed=0)                 # fresh init (see init_weights)
        net = UNet2D(config, weights=st.load(path))  # or from a {name: array} dict
        eps = net(x, t, class_labels)
        write_model_dir(path, config, {k: v.detach().numpy() for k, v in net.state_dict().items()})
    """

    def __init__(self, config, weights=None, seed=0):
        super().__init__()
        self.config = full_config(config)
        shapes = param_shapes(self.config)
        if weights is None:
            weights = init_weights(self.config, seed)
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, _Node())
                node = getattr(node, part)
            w = weights[name]
            w = w.detach().clone() if torch.is_tensor(w) else torch.from_numpy(np.array(w, dtype=np.float32))
            if tuple(w.shape) != tuple(shape):
                raise UNetConfigError("%s: shape %s, expected %s" % (name, tuple(w.shape), shape))
            node.register_parameter(leaf, torch.nn.Parameter(w.float()))
        self._fn = TorchUNet(self.config, dict(self.named_parameters()))

    def forward(self, x, timesteps, class_labels=None, guide=None):
        # re-read the parameters each call (cheap) so .to()/load_state_dict() can never leave
        # the functional forward holding stale tensors
        self._fn.p = dict(self.named_parameters())
        self._fn.dtype = next(iter(self._fn.p.values())).dtype
        return self._fn(x, timesteps, class_labels, guide)


def init_weights(config, seed=0, zero_out=True):
    """Fresh float32 training init as torch tensors: PyTorch's default for Conv2d/Linear
    (uniform +-1/sqrt(fan_in) for weight and bias, i.e. what diffusers' UNet2DModel() gets),
    GroupNorm weight 1 / bias 0, class embedding N(0, 1).  zero_out=True zeroes the last conv
    of every resnet, every attention output projection and conv_out (the usual DDPM /
    guided-diffusion trick: each block starts as the identity, training is more stable)."""
    g = torch.Generator().manual_seed(int(seed))
    shapes = param_shapes(config)
    out = {}
    for name, shape in shapes.items():
        mod, kind = name.rsplit(".", 1)
        last = mod.rsplit(".", 1)[-1]
        if "norm" in last and len(shape) == 1:
            v = torch.ones(shape) if kind == "weight" else torch.zeros(shape)
        elif name == "class_embedding.weight":
            v = torch.randn(shape, generator=g)
        else:
            wshape = shapes[mod + ".weight"]
            fan_in = int(np.prod(wshape[1:]))
            bound = 1.0 / math.sqrt(fan_in)
            v = (torch.rand(shape, generator=g) * 2 - 1) * bound
            if zero_out and (mod.endswith((".conv2", ".to_out.0")) or mod == "conv_out"):
                v = torch.zeros(shape)
        out[name] = v
    return out
