#!/usr/bin/python3
"""PyTorch autograd references for the grad room's single ops (tests/test_grad_ops.c reads them).

    /usr/bin/python3 tools/gen_grad_fixtures.py [--out tests/fixtures/grad] [--seed 1]

For every case: random float32 inputs, a random upstream gradient G, then y = op(inputs) and
d sum(G * y) / d input for every input by torch.autograd, computed in float64 from the float32
values and stored as float32. Each op is written with torch.nn.functional the way diffusers'
modules compose it (Conv2d, Downsample2D's F.pad(0, 1, 0, 1) before a stride-2 conv, GroupNorm,
SiLU, Linear, Attention with AttnProcessor on a 4-D input, Upsample2D's nearest interpolate,
avg_pool2d, get_timestep_embedding, TimestepEmbedding, nn.Embedding, torch.cat, the resnet's
time shift and scale-shift, residual add with output_scale_factor; and the glyph classifier's
relu, max_pool2d and adaptive_avg_pool2d(1); the transformers' layer_norm, gelu, CLIP's
quick_gelu, GEGLU, the attention core as self-, cross- and causal attention, and CLIP's token +
position embedding). Files, per case NAME:
  NAME.in<i>.npy   input slot i (the grad table's slot order), NAME.labels.npy (int64: class
                   labels, or token ids [n][L])
  NAME.g.npy       upstream gradient; NAME.out.npy the output
  NAME.d<i>.npy    gradient of slot i
  cases.json       [{name, op, n, c, h, w, params, slots}]

Whole-model cases (--unet, on by default): tiny UNet2DModel configs (two levels, attention, one
class-conditional with legacy attention names and (0,1,0,1) downsampling, one unconditional
with scale-shift, resnet resamplers, centred input and a mid-block attention without group norm),
random weights, and the gradient of sum(G * model(x, t, labels)) by torch.autograd in float64
through tools/torch_unet.py (diffusers' UNet2DModel composed of torch.nn.functional, checked
against diffusers by tools/check_torch_unet.py). Each is a model folder NAME/ with
  config.json, diffusion_pytorch_model.safetensors   the model (F32)
  input.npy, timesteps.npy (float32), class_labels.npy (int64, conditional only), grad_output.npy
  output.npy, grad_input.npy, grad_class.npy (the class-embedding row each image adds)
  grad_params.safetensors                            every parameter's gradient, modern names
Needs Debian's python3-torch and python3-numpy only.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


def rnd(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).float()


def conv(cin, cout, k, stride, pads, n, h, w):
    t, l, b, r = pads

    def fn(x, wt, bias):
        return F.conv2d(F.pad(x, (l, r, t, b)), wt, bias, stride=stride)
    shapes = [(n, cin, h, w), (cout, cin, k, k), (cout,)]
    params = {"cin": cin, "cout": cout, "k": k, "stride": stride, "pads": list(pads)}
    return "conv2d", (n, cin, h, w), params, shapes, fn


def group_norm(n, c, h, w, groups, eps, silu):
    def fn(x, g, b):
        y = F.group_norm(x, groups, g, b, eps)
        return F.silu(y) if silu else y
    return ("group_norm", (n, c, h, w), {"groups": groups, "eps": eps, "silu": int(silu)},
            [(n, c, h, w), (c,), (c,)], fn)


def linear(n, cin, cout):
    return "linear", (n, cin, 1, 1), {"out": cout}, [(n, cin), (cout, cin), (cout,)], F.linear


def attention(n, c, h, w, heads, groups, rescale, eps=1e-5):
    """diffusers' Attention(AttnProcessor) on [n, c, h, w] with residual_connection."""
    def fn(x, gg, gb, wq, bq, wk, bk, wv, bv, wo, bo):
        hs = x.view(n, c, h * w)
        if groups:
            hs = F.group_norm(hs, groups, gg, gb, eps)
        hs = hs.transpose(1, 2)
        dh = c // heads

        def split(t):
            return t.reshape(n, h * w, heads, dh).permute(0, 2, 1, 3).reshape(n * heads, h * w, dh)
        q, k, v = split(F.linear(hs, wq, bq)), split(F.linear(hs, wk, bk)), split(F.linear(hs, wv, bv))
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * dh ** -0.5, dim=-1)
        o = torch.bmm(p, v).reshape(n, heads, h * w, dh).permute(0, 2, 1, 3).reshape(n, h * w, c)
        o = F.linear(o, wo, bo).transpose(1, 2).reshape(n, c, h, w)
        return (o + x) / rescale
    shapes = [(n, c, h, w), (c,), (c,)] + [(c, c), (c,)] * 4
    params = {"heads": heads, "groups": groups, "eps": eps, "rescale": rescale}
    return "attention", (n, c, h, w), params, shapes, fn


def upsample(n, c, h, w):
    return ("upsample_nearest2x", (n, c, h, w), {}, [(n, c, h, w)],
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"))


def avgpool(n, c, h, w):
    return ("avgpool2x2", (n, c, h, w), {}, [(n, c, h, w)],
            lambda x: F.avg_pool2d(x, kernel_size=2, stride=2))


def timestep_embedding(n, dim, flip, shift):
    """diffusers' get_timestep_embedding; the frequencies in float32 as it computes them."""
    def fn(t):
        half = dim // 2
        expo = -math.log(10000) * torch.arange(0, half, dtype=torch.float32)
        freqs = torch.exp(expo / (half - shift)).to(t.dtype)
        emb = t[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if dim % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb
    return ("timestep_embedding", (n, dim, 1, 1), {"flip_sin_to_cos": int(flip), "freq_shift": shift},
            [(n,)], fn)


def time_mlp(n, cin, hidden, out):
    def fn(x, w1, b1, w2, b2):
        return F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)
    return ("time_mlp", (n, cin, 1, 1), {"hidden": hidden, "out": out},
            [(n, cin), (hidden, cin), (hidden,), (out, hidden), (out,)], fn)


def concat(n, ca, cb, h, w):
    return ("concat", (n, ca, h, w), {"cb": cb}, [(n, ca, h, w), (n, cb, h, w)],
            lambda a, b: torch.cat([a, b], dim=1))


def scale_shift(n, c, h, w, has_scale):
    def fn(x, emb):
        if has_scale:
            scale, shift = torch.chunk(emb[:, :, None, None], 2, dim=1)
            return x * (1 + scale) + shift
        return x + emb[:, :, None, None]
    return ("scale_shift", (n, c, h, w), {"has_scale": int(has_scale)},
            [(n, c, h, w), (n, 2 * c if has_scale else c)], fn)


def add(n, c, h, w, divisor):
    return ("add", (n, c, h, w), {"divisor": divisor}, [(n, c, h, w)] * 2,
            lambda a, b: (a + b) / divisor)


CASES = {
    "conv3x3": conv(3, 5, 3, 1, (1, 1, 1, 1), 2, 6, 5),
    "conv1x1": conv(4, 6, 1, 1, (0, 0, 0, 0), 2, 5, 7),
    "conv3x3_s2": conv(5, 4, 3, 2, (1, 1, 1, 1), 2, 7, 6),
    "conv3x3_s2_pad0101": conv(4, 4, 3, 2, (0, 0, 1, 1), 2, 8, 8),
    "conv3x3_8x8": conv(16, 16, 3, 1, (1, 1, 1, 1), 1, 8, 8),
    "group_norm": group_norm(2, 8, 5, 5, 4, 1e-5, False),
    "group_norm_silu": group_norm(2, 6, 4, 3, 3, 1e-6, True),
    "silu": ("silu", (2, 3, 4, 5), {}, [(2, 3, 4, 5)], F.silu),
    "linear": linear(3, 7, 5),
    "attention_2heads": attention(2, 8, 4, 4, 2, 4, 1.0),
    "attention_nogn": attention(2, 6, 3, 3, 1, 0, 1.4142135),
    "upsample": upsample(2, 3, 3, 4),
    "avgpool_odd": avgpool(1, 2, 5, 7),
    "timestep_embedding": timestep_embedding(4, 8, True, 0.0),
    "timestep_embedding_odd": timestep_embedding(3, 7, False, 1.0),
    "time_mlp": time_mlp(3, 6, 10, 10),
    "concat": concat(2, 3, 2, 3, 3),
    "time_shift": scale_shift(2, 4, 3, 3, False),
    "scale_shift": scale_shift(2, 4, 3, 2, True),
    "add_scaled": add(1, 3, 2, 3, 0.7071),
}


# The classifier's ops (engine/model/classifier.h), drawn after the UNet ops' cases so that
# adding them left the earlier fixtures' random draws unchanged.
CLASSIFIER_CASES = {
    "relu": ("relu", (2, 3, 4, 5), {}, [(2, 3, 4, 5)], F.relu),
    "maxpool_odd": ("maxpool2x2", (1, 2, 5, 7), {}, [(1, 2, 5, 7)],
                    lambda x: F.max_pool2d(x, kernel_size=2, stride=2)),
    "global_avgpool": ("global_avgpool", (2, 5, 4, 3), {}, [(2, 5, 4, 3)],
                       lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1)),
}


# The transformers' ops (UNet2DConditionModel's BasicTransformerBlock, CLIP's encoder layers), on
# channel-major [n, c, L] sequences as the engine keeps them; drawn last for the same reason.
def layer_norm(n, c, L, eps):
    def fn(x, g, b):
        return F.layer_norm(x.transpose(1, 2), (c,), g, b, eps).transpose(1, 2)
    return "layer_norm", (n, c, L, 1), {"eps": eps}, [(n, c, L), (c,), (c,)], fn


def geglu(n, inner, L):
    def fn(x):
        a, g = x.chunk(2, dim=1)  # diffusers' GEGLU: hidden_states, gate = proj(x).chunk(2, -1)
        return a * F.gelu(g)
    return "geglu", (n, 2 * inner, L, 1), {}, [(n, 2 * inner, L)], fn


def mha(n, c, heads, lq, lk, causal):
    """diffusers' Attention core (and CLIPAttention's, causal) on [n, c, L] q, k, v."""
    def fn(q, k, v):
        dh = c // heads

        def split(t, L):
            return t.reshape(n, heads, dh, L).transpose(2, 3)
        s = split(q, lq) @ split(k, lk).transpose(2, 3) * dh ** -0.5
        if causal:
            mask = torch.full((lq, lk), float("-inf"), dtype=s.dtype).triu(1)
            s = s + mask
        o = torch.softmax(s, dim=-1) @ split(v, lk)
        return o.transpose(2, 3).reshape(n, c, lq)
    return ("mha", (n, c, lq, 1), {"heads": heads, "lk": lk, "causal": int(causal)},
            [(n, c, lq), (n, c, lk), (n, c, lk)], fn)


TEXT_CASES = {
    "layer_norm": layer_norm(2, 8, 5, 1e-5),
    "gelu": ("gelu", (2, 3, 4, 5), {}, [(2, 3, 4, 5)], F.gelu),
    "quick_gelu": ("quick_gelu", (2, 3, 4, 5), {}, [(2, 3, 4, 5)],
                   lambda x: x * torch.sigmoid(1.702 * x)),
    "geglu": geglu(2, 3, 5),
    "mha_cross": mha(2, 8, 2, 9, 5, False),
    "mha_causal": mha(2, 6, 3, 7, 7, True),
}


def token_embedding(n=2, d=6, L=5, vocab=4, positions=7):
    """CLIPTextEmbeddings: token rows plus position rows, returned channel-major."""
    ids = torch.tensor([(i * 7 + 3) % vocab for i in range(n * L)]).reshape(n, L)

    def fn(tok, pos):
        return (F.embedding(ids, tok) + pos[:L][None]).transpose(1, 2)
    return ("token_embedding", (n, d, L, 1), {"vocab": vocab, "positions": positions},
            [(vocab, d), (positions, d)], fn), ids


def class_embedding(gen, n=4, classes=5, dim=6):
    labels = torch.tensor([1, 3, 1, 0])
    return ("class_embedding", (n, dim, 1, 1), {"classes": classes}, [(classes, dim)],
            lambda table: F.embedding(labels, table)), labels


def save(out, name, arr):
    np.save(os.path.join(out, name + ".npy"), arr)


def run_case(gen, out, name, spec, labels=None):
    op, shape, params, shapes, fn = spec
    inputs = []
    for i, s in enumerate(shapes):
        x = rnd(gen, *s, scale=1.0 if i == 0 else 0.5)
        if op in ("group_norm", "attention", "layer_norm") and i == 1:
            x = x + 1
        if op == "timestep_embedding":
            x = (x.abs() * 40).float()
        inputs.append(x)
        save(out, "%s.in%d" % (name, i), x.numpy())
    xs = [x.double().requires_grad_(True) for x in inputs]
    y = fn(*xs)
    g = rnd(gen, *y.shape)
    (y * g.double()).sum().backward()
    save(out, name + ".g", g.numpy())
    save(out, name + ".out", y.detach().float().numpy())
    for i, x in enumerate(xs):
        grad = x.grad if x.grad is not None else torch.zeros_like(x)  # unused (attention without GN)
        save(out, "%s.d%d" % (name, i), grad.float().numpy())
    if labels is not None:
        save(out, name + ".labels", labels.numpy().astype(np.int64))
    n, c, h, w = shape
    return {"name": name, "op": op, "n": n, "c": c, "h": h, "w": w, "params": params,
            "slots": len(shapes)}


UNET_CASES = {
    "unet_classcond": dict(
        config=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[4, 8],
                    layers_per_block=1, norm_num_groups=2, attention_head_dim=4,
                    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "UpBlock2D"], num_class_embeds=5,
                    flip_sin_to_cos=True, freq_shift=0, downsample_padding=0, norm_eps=1e-5),
        legacy=True, batch=3, timesteps=[3.5, 410.0, 977.25], labels=[0, 3, 4]),
    "unet_scaleshift": dict(
        config=dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=[4, 8],
                    layers_per_block=1, norm_num_groups=2, attention_head_dim=None,
                    down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"],
                    resnet_time_scale_shift="scale_shift", downsample_type="resnet",
                    upsample_type="resnet", center_input_sample=True, flip_sin_to_cos=False,
                    freq_shift=1, mid_block_scale_factor=1.4142135, norm_eps=1e-6),
        legacy=False, batch=2, timesteps=[17.0, 600.5], labels=None),
}


def run_unet_case(seed, out, name, spec):
    """One tiny UNet2DModel, its inputs and torch.autograd's gradients (float64 compute)."""
    from torch_unet import TorchUNet
    from unet_arch import full_config, random_weights, write_model_dir

    config = full_config(spec["config"])
    weights = random_weights(config, seed=seed, legacy=spec["legacy"])
    folder = os.path.join(out, name)
    write_model_dir(folder, spec["config"], weights)
    gen = torch.Generator().manual_seed(seed)
    n, c, size = spec["batch"], config["in_channels"], config["sample_size"]
    x = rnd(gen, n, c, size, size)
    t = torch.tensor(spec["timesteps"], dtype=torch.float32)
    labels = torch.tensor(spec["labels"]) if spec["labels"] else None

    class Taped(TorchUNet):
        """Keeps the time MLP's output, whose gradient is the class row's (emb = mlp + row)."""
        def _lin(self, h, pfx):
            y = super()._lin(h, pfx)
            if pfx == "time_embedding.linear_2":
                y.retain_grad()
                self.mlp_out = y
            return y

    params = {k: torch.from_numpy(v).double().requires_grad_(True) for k, v in weights.items()}
    net = Taped(config, params, dtype=torch.float64)
    xd = x.double().requires_grad_(True)
    y = net(xd, t, labels)
    g = rnd(gen, *y.shape)
    (y * g.double()).sum().backward()
    save(folder, "input", x.numpy())
    save(folder, "timesteps", t.numpy())
    if labels is not None:
        save(folder, "class_labels", labels.numpy().astype(np.int64))
        save(folder, "grad_class", net.mlp_out.grad.float().numpy())
    save(folder, "grad_output", g.numpy())
    save(folder, "output", y.detach().float().numpy())
    save(folder, "grad_input", xd.grad.float().numpy())
    grads = {k: p.grad.float().numpy() for k, p in net.p.items()}
    st.save(os.path.join(folder, "grad_params.safetensors"), grads, metadata={"format": "pt"})
    return {"name": name, "seed": seed, "params": len(grads),
            "values": int(sum(v.size for v in grads.values()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/grad")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-unet", action="store_true", help="single ops only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    cases = [run_case(gen, args.out, name, spec) for name, spec in CASES.items()]
    spec, labels = class_embedding(gen)
    cases.append(run_case(gen, args.out, "class_embedding", spec, labels))
    cases += [run_case(gen, args.out, name, spec) for name, spec in CLASSIFIER_CASES.items()]
    cases += [run_case(gen, args.out, name, spec) for name, spec in TEXT_CASES.items()]
    spec, ids = token_embedding()
    cases.append(run_case(gen, args.out, "token_embedding", spec, ids))
    unets = [] if args.no_unet else [run_unet_case(args.seed + i, args.out, name, spec)
                                     for i, (name, spec) in enumerate(UNET_CASES.items())]
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"torch": torch.__version__, "seed": args.seed, "dtype": "float64 compute",
                   "cases": cases, "unets": unets}, f, indent=1)
    print("%d cases in %s" % (len(cases), args.out))


if __name__ == "__main__":
    main()
