#!/usr/bin/python3
"""PyTorch autograd references for UNet2DConditionModel's backward (tests/test_grad_cunet.c).

    /usr/bin/python3 tools/gen_cunet_grad_fixtures.py [--out tests/fixtures/cunet_grad] [--seed S]

Tiny random diffusers UNet2DConditionModels (diffusers' own class, from a diffusers source tree:
tools/diffusers_env.py), random inputs x, timesteps, encoder hidden states E, an upstream
gradient G, and the gradients of L = sum(G * unet(x, t, E).sample) by torch.autograd with the
model in float64 (gen_cunet_fixtures.exact: softmax and upcast_attention kept in float64; the
timestep sinusoid in float32 as diffusers computes it). Cases:
  conv_proj    SD-1.x structure: conv proj_in/proj_out, a scalar head count, a plain down level
  linear_proj  SD-2.x structure: use_linear_projection, per-block heads, two transformer layers
               in the lower level's blocks, scale-shift time conditioning, (0,1,0,1) downsampling, centred input,
               a class embedding (num_class_embeds)
Per case NAME/ (F32 weights, a model folder the engine loads):
  config.json, diffusion_pytorch_model.safetensors
  input.npy, timesteps.npy (float32), encoder_hidden_states.npy, grad_output.npy,
  class_labels.npy (int64, with a class embedding)
  output.npy, grad_input.npy, grad_encoder_hidden_states.npy,
  grad_class.npy (the class-embedding row each image adds, with a class embedding)
  grad_params.safetensors   every parameter's gradient under diffusers' name
With --seed other than the default the same structures get other weights and inputs (fixtures
not in the repo: write them elsewhere and point DENOISED_CUNET_GRAD_FIXTURES at them).
"""
import argparse
import json
import os
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import st  # noqa: E402
from gen_cunet_fixtures import _SD_KEYS, exact  # noqa: E402
from gen_unet_fixtures import stored_weights  # noqa: E402

CASES = {
    "conv_proj": dict(
        config=dict(_SD_KEYS, block_out_channels=[8, 12], layers_per_block=1, norm_num_groups=4,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    attention_head_dim=2, cross_attention_dim=12, sample_size=8),
        seed=31, batch=2, seq=5, timesteps=[17.0, 640.5]),
    "linear_proj": dict(
        config=dict(_SD_KEYS, block_out_channels=[8, 12], layers_per_block=1, norm_num_groups=4,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                    attention_head_dim=[2, 4], use_linear_projection=True,
                    transformer_layers_per_block=[1, 2], resnet_time_scale_shift="scale_shift",
                    downsample_padding=0, center_input_sample=True, num_class_embeds=3,
                    upcast_attention=True, cross_attention_dim=8, sample_size=8),
        seed=32, batch=3, seq=4, timesteps=[999.0, 3.25, 401.0], labels=[2, 0, 1]),
}


def make_case(name, spec, out_root, seed, torch, UNet2DConditionModel, diffusers_env):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**spec["config"])
    sd = stored_weights(model, torch, "F32")
    g = torch.Generator().manual_seed(seed * 1000 + 7)
    cfg, n, s = model.config, spec["batch"], spec["config"]["sample_size"]
    x = torch.randn(n, cfg.in_channels, s, s, generator=g)
    ehs = torch.randn(n, spec["seq"], spec["config"]["cross_attention_dim"], generator=g)
    grad_out = torch.randn(n, cfg.out_channels, s, s, generator=g)
    ts = spec["timesteps"] if seed == spec["seed"] else (torch.rand(n, generator=g) * 999).tolist()
    t = torch.tensor(ts, dtype=torch.float32)
    labels = torch.tensor(spec["labels"], dtype=torch.int64) if "labels" in spec else None

    m = exact(model, diffusers_env)
    cls_rows = []
    if labels is not None:
        def keep(mod, inp, out):
            out.retain_grad()
            cls_rows.append(out)
        m.class_embedding.register_forward_hook(keep)
    xd = x.double().requires_grad_()
    ed = ehs.double().requires_grad_()
    with diffusers_env.safe_baddbmm():
        y = m(xd, t, encoder_hidden_states=ed, class_labels=labels).sample
    (grad_out.double() * y).sum().backward()

    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    model.save_config(out)
    st.save(os.path.join(out, "diffusion_pytorch_model.safetensors"), sd, dtype="F32",
            metadata={"format": "pt"})
    f32 = lambda v: v.detach().numpy().astype(np.float32)  # noqa: E731
    arrays = dict(input=x.numpy(), timesteps=t.numpy(), encoder_hidden_states=ehs.numpy(),
                  grad_output=grad_out.numpy(), output=f32(y), grad_input=f32(xd.grad),
                  grad_encoder_hidden_states=f32(ed.grad))
    if labels is not None:
        arrays["class_labels"] = labels.numpy()
        arrays["grad_class"] = f32(cls_rows[0].grad)
    for k, v in arrays.items():
        np.save(os.path.join(out, k + ".npy"), v)
    grads = {k: f32(p.grad) for k, p in m.named_parameters()}
    missing = sorted(set(sd) - set(grads))
    if missing:
        raise SystemExit("parameters without a gradient: %s" % missing[:5])
    st.save(os.path.join(out, "grad_params.safetensors"), grads, dtype="F32")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print("%s: %d params in %d tensors, out rms %.3f, %.0f KB" % (
        out, sum(v.size for v in sd.values()), len(sd), float(np.sqrt(np.mean(arrays["output"] ** 2))),
        size / 1024))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(TOOLS, "..", "tests", "fixtures", "cunet_grad"))
    ap.add_argument("--seed", type=int, help="other weights and inputs (default: each case's own)")
    ap.add_argument("--diffusers-src", help="diffusers src dir (default $DIFFUSERS_SRC or /tmp/diffusers-0.21/src)")
    args = ap.parse_args()
    import diffusers_env
    try:
        diffusers_env.setup(args.diffusers_src)
    except diffusers_env.DiffusersEnvError as e:
        raise SystemExit(str(e))
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(1)
    for name, spec in CASES.items():
        seed = spec["seed"] if args.seed is None else args.seed * 100 + spec["seed"]
        make_case(name, spec, args.out, seed, torch, UNet2DConditionModel, diffusers_env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
