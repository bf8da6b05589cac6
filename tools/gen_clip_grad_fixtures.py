#!/usr/bin/python3
"""PyTorch autograd references for the CLIP text encoder's backward (tests/test_clip_grad.c).

    /usr/bin/python3 tools/gen_clip_grad_fixtures.py [--out tests/fixtures/clip_grad]

Tiny random CLIPTextModels (transformers' tensor names and semantics, written out in
torch.nn.functional: token + position embeddings, pre-norm layers with causal self-attention,
quick_gelu or gelu MLP, final layer norm; clip skip N runs the first layers - (N - 1) layers
then the final norm, as diffusers and AUTOMATIC1111 do), token ids, an upstream gradient G, and
d sum(G * hidden) / d every weight by torch.autograd in float64. Per case NAME/:
  config.json, model.safetensors     the text encoder (F32)
  ids.npy (int64 [n, len]), grad_output.npy, hidden.npy ([n, len, d] float32)
  grad_params.safetensors            every weight's gradient under its own name
  case.json                          {"clip_skip": N}
Needs Debian's python3-torch and python3-numpy only.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

CASES = {
    "quick_gelu": dict(act="quick_gelu", clip_skip=1, seed=3),
    "gelu_skip2": dict(act="gelu", clip_skip=2, seed=4),
}
VOCAB, D, INNER, LAYERS, HEADS, POSITIONS, N, LEN = 40, 16, 32, 3, 2, 12, 2, 10


def weights(gen):
    w = {}

    def r(name, *shape, scale=0.3, shift=0.0):
        w[name] = (torch.randn(*shape, generator=gen) * scale + shift).float()
    r("text_model.embeddings.token_embedding.weight", VOCAB, D, scale=1.0)
    r("text_model.embeddings.position_embedding.weight", POSITIONS, D, scale=0.5)
    for i in range(LAYERS):
        p = "text_model.encoder.layers.%d." % i
        for ln in ("layer_norm1", "layer_norm2"):
            r(p + ln + ".weight", D, shift=1.0, scale=0.2)
            r(p + ln + ".bias", D, scale=0.2)
        for pr in ("q_proj", "k_proj", "v_proj", "out_proj"):
            r(p + "self_attn." + pr + ".weight", D, D, scale=D ** -0.5)
            r(p + "self_attn." + pr + ".bias", D, scale=0.2)
        r(p + "mlp.fc1.weight", INNER, D, scale=D ** -0.5)
        r(p + "mlp.fc1.bias", INNER, scale=0.2)
        r(p + "mlp.fc2.weight", D, INNER, scale=INNER ** -0.5)
        r(p + "mlp.fc2.bias", D, scale=0.2)
    r("text_model.final_layer_norm.weight", D, shift=1.0, scale=0.2)
    r("text_model.final_layer_norm.bias", D, scale=0.2)
    return w


def forward(w, ids, act, clip_skip):
    n, L = ids.shape
    x = F.embedding(ids, w["text_model.embeddings.token_embedding.weight"]) + \
        w["text_model.embeddings.position_embedding.weight"][:L][None]
    mask = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
    dh = D // HEADS
    for i in range(LAYERS - (clip_skip - 1)):
        p = "text_model.encoder.layers.%d." % i

        def lin(h, name):
            return F.linear(h, w[p + name + ".weight"], w[p + name + ".bias"])

        def heads(t):
            return t.reshape(n, L, HEADS, dh).transpose(1, 2)
        h = F.layer_norm(x, (D,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], 1e-5)
        q, k, v = (heads(lin(h, "self_attn.%s_proj" % s)) for s in "qkv")
        s = q @ k.transpose(2, 3) * dh ** -0.5 + mask
        o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(n, L, D)
        x = x + lin(o, "self_attn.out_proj")
        h = F.layer_norm(x, (D,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], 1e-5)
        h = lin(h, "mlp.fc1")
        h = F.gelu(h) if act == "gelu" else h * torch.sigmoid(1.702 * h)
        x = x + lin(h, "mlp.fc2")
    return F.layer_norm(x, (D,), w["text_model.final_layer_norm.weight"],
                        w["text_model.final_layer_norm.bias"], 1e-5)


def config(act):
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": INNER,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "max_position_embeddings": POSITIONS, "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/clip_grad")
    args = ap.parse_args()
    for name, spec in CASES.items():
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        gen = torch.Generator().manual_seed(spec["seed"])
        w = weights(gen)
        ids = torch.randint(0, VOCAB, (N, LEN), generator=gen)
        params = {k: v.double().requires_grad_(True) for k, v in w.items()}
        y = forward(params, ids, spec["act"], spec["clip_skip"])
        g = torch.randn(*y.shape, generator=gen).float()
        (y * g.double()).sum().backward()
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy()
                 for k, p in params.items()}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config(spec["act"]), f, indent=1)
        with open(os.path.join(folder, "case.json"), "w") as f:
            json.dump({"clip_skip": spec["clip_skip"], "torch": torch.__version__}, f)
        st.save(os.path.join(folder, "model.safetensors"), {k: v.numpy() for k, v in w.items()},
                metadata={"format": "pt"})
        st.save(os.path.join(folder, "grad_params.safetensors"), grads, metadata={"format": "pt"})
        np.save(os.path.join(folder, "ids.npy"), ids.numpy().astype(np.int64))
        np.save(os.path.join(folder, "grad_output.npy"), g.numpy())
        np.save(os.path.join(folder, "hidden.npy"), y.detach().float().numpy())
        print(name, len(grads), "tensors")


if __name__ == "__main__":
    main()
