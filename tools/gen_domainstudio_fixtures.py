#!/usr/bin/python3
"""DomainStudio's loss terms as the authors' own code computes them, for engine/train/dstudio.c
(tests/test_dstudio.c reads the files).

    /usr/bin/python3 tools/gen_domainstudio_fixtures.py [--out tests/fixtures/dstudio] \
        [--mirror /work/.mirror/bbzhu-jy16+DomainStudio/repo] [--seed 1]

Imports GaussianDiffusion.training_fewshot_losses from the official repository
(bbzhu-jy16/DomainStudio @ cc69341, Unconditional/guided_diffusion/gaussian_diffusion.py, taken
out of the bare mirror with `git archive`) and calls it unchanged on fixed tensors: the "models" are functions returning fixed outputs, so
the adapted model's output is a leaf whose gradient autograd gives. One correction is needed to
run it at all: the constructor's `pair_weight=pair_weight,` lines build tuples instead of setting
attributes, so the released code raises AttributeError; the attributes are set here to the
recipe's values (4, 4, 1, the README's MODEL_FLAGS).

It runs twice on the same float32 inputs: in float64 (torch's default dtype float64, so their
th.zeros similarity tables are double, and get_wave's fixed +-1/2 convolutions cast to double,
which changes no value; their timestep coefficients stay float32 as _extract_into_tensor makes
them), which is what the engine's double arithmetic is held to, and in float32 as the authors ran
it, whose rounding of the cosine similarities alone moves the small pairwise KL terms by about
1e-5 relative (meta.json "terms_float32"). The sim_batch draw (np.random.choice) is replayed from the seed and
stored. Files (float32 .npy unless said):
  x_t.npy [B,C,H,W]  q_sample(x_start, t, noise) as their code computes it
  noise.npy          the target (epsilon prediction)
  out_ada.npy out_sou.npy   adapted and source model outputs
  cx.npy co.npy [B]  their float32 coefficients: x0 = cx * x_t + co * eps
  idx.npy [3]        sim_batch (int64)
  x_start.npy        the clean images
  grad.npy           d(sum of the four terms) / d out_ada by autograd (float64 run)
  hf.npy [B,C,H/2,W/2]  LH + HL + HH of x_t by their get_wave convolutions
  meta.json          torch version, commit, t, weights, sim_batch; "terms": mse (batch mean),
                     similarity (4 KL), similarity2 (4 KL of hf), mse2 (1 hf MSE, batch mean)
                     and their sum, float64 run; "terms_float32": the same in float32
Needs Debian's python3-torch and python3-numpy, and git.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch as th

COMMIT = "cc69341d5380ddaf684fe7dddf5a2d19101d9bb2"


def import_theirs(mirror, tmp):
    tar = subprocess.run(["git", "-C", mirror, "archive", COMMIT, "Unconditional/guided_diffusion"],
                         check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    sys.path.insert(0, os.path.join(tmp, "Unconditional"))
    import guided_diffusion.gaussian_diffusion as gd  # noqa: E402
    return gd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/dstudio")
    ap.add_argument("--mirror", default="/work/.mirror/bbzhu-jy16+DomainStudio/repo")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gd = import_theirs(args.mirror, tmp)
        betas = gd.get_named_beta_schedule("linear", 1000)
        diff = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                                    model_var_type=gd.ModelVarType.FIXED_SMALL,
                                    loss_type=gd.LossType.MSE)
        weights = {"pair_weight": 4.0, "hf_pair_weight": 4.0, "hf_mse_weight": 1.0}
        for k, v in weights.items():  # the constructor forgets to (see the docstring)
            setattr(diff, k, v)

        gen = th.Generator().manual_seed(args.seed)
        B, C, H, W = 5, 3, 8, 6
        x_start = th.rand(B, C, H, W, generator=gen) * 2 - 1
        noise = th.randn(B, C, H, W, generator=gen)
        t = th.tensor([13, 250, 499, 731, 960])
        out_sou = noise + 0.3 * th.randn(B, C, H, W, generator=gen)
        out_ada = out_sou + 0.25 * th.randn(B, C, H, W, generator=gen)
        np.random.seed(args.seed)
        idx = np.random.choice(B, 3, replace=False)

        def run(dtype):
            th.set_default_dtype(dtype)
            own_wave = diff.get_wave
            if dtype == th.float64:  # their float32 filters, as doubles (same values)
                diff.get_wave = lambda x, pool=True: tuple(m.double() for m in own_wave(x, pool))
            ada = out_ada.detach().to(dtype).clone().requires_grad_(True)
            model = lambda x, ts, **kw: ada  # noqa: E731
            model_base = lambda x, ts, **kw: out_sou.to(dtype)  # noqa: E731
            np.random.seed(args.seed)  # the same sim_batch draw inside their function
            terms = diff.training_fewshot_losses(model, model_base, x_start.to(dtype), t,
                                                 noise=noise.to(dtype))
            mse, mse2 = terms["mse"].mean(), terms["mse2"].mean()
            total = mse + terms["similarity"] + terms["similarity2"] + mse2
            total.backward()
            x_t = diff.q_sample(x_start.to(dtype), t, noise=noise.to(dtype))
            LH, HL, HH = diff.get_wave(x_t)
            with th.no_grad():
                hf = LH(x_t) + HL(x_t) + HH(x_t)
            diff.get_wave = own_wave
            th.set_default_dtype(th.float32)
            vals = [float(mse), float(terms["similarity"]), float(terms["similarity2"]),
                    float(mse2), float(total)]
            return vals, ada.grad.detach(), x_t.detach(), hf

        vals32, _, _, _ = run(th.float32)
        vals, grad, x_t, hf = run(th.float64)
        cx = gd._extract_into_tensor(diff.sqrt_recip_alphas_cumprod, t, (B,))
        co = -gd._extract_into_tensor(diff.sqrt_recipm1_alphas_cumprod, t, (B,))

    def save(name, a, dtype=np.float32):
        np.save(os.path.join(args.out, name + ".npy"), np.asarray(a, dtype=dtype))

    save("x_t", x_t.numpy())
    save("x_start", x_start.numpy())
    save("noise", noise.numpy())
    save("out_ada", out_ada.numpy())
    save("out_sou", out_sou.numpy())
    save("cx", cx.numpy())
    save("co", co.numpy())
    save("grad", grad.numpy())
    save("hf", hf.numpy())
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(dict(weights, torch=th.__version__, commit=COMMIT, t=t.tolist(),
                       idx=idx.tolist(), terms=vals, terms_float32=vals32, shape=[B, C, H, W]),
                  f, indent=1)
    print("dstudio: terms %s (float32: %s; sim_batch %s) in %s" % (vals, vals32, idx.tolist(), args.out))


if __name__ == "__main__":
    main()
