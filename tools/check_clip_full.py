#!/usr/bin/python3
"""CLIP ViT-L/14's text tower at full size (Stable Diffusion 1.x's text encoder: width 768, 12
layers, 12 heads, vocabulary 49,408) with random weights, run by OpenAI CLIP's own modules and
by `denoised encode-text` on the same ids: relative L2 of the hidden states (last layer and
clip skip 2) and the wall time of each (PyTorch float32 on the same threads); and the ids of
every fixture prompt from the whole released vocabulary written as vocab.json + merges.txt. Development
check, not a test: it writes ~250 MB (F16 weights) under --work.

Run: /usr/bin/python3 tools/check_clip_full.py --denoised build/denoised --work /tmp/clipL
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import clip_ref  # noqa: E402
import gen_clip_fixtures as fx  # noqa: E402
import st  # noqa: E402

WIDTH, LAYERS, HEADS, VOCAB, CTX = 768, 12, 12, 49408, 77


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--denoised", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_mod, tokmod, gz, _ = clip_ref.load()
    tok = tokmod.SimpleTokenizer(gz)
    prompts = [fx.PROMPTS_FULL[0], fx.PROMPTS_FULL[10]]
    ids = fx.pad_rows(fx.clip_ids(tok, prompts), tok.encoder["<|endoftext|>"])
    fx.WIDTH, fx.LAYERS, fx.HEADS = WIDTH, LAYERS, HEADS
    tr, emb, pos, ln_final = fx.random_model(model_mod, VOCAB, False, 7)
    with torch.no_grad():  # the reference runs on the weights the F16 file holds
        for p in list(tr.parameters()) + list(emb.parameters()) + [pos] + \
                list(ln_final.parameters()):
            p.copy_(p.half().float())
    te = os.path.join(args.work, "text_encoder")
    os.makedirs(te, exist_ok=True)
    st.save(os.path.join(te, "model.safetensors"), fx.hf_tensors(tr, emb, pos, ln_final),
            dtype="F16")
    with open(os.path.join(te, "config.json"), "w") as f:
        cfg = fx.config_json(VOCAB, False, "float16")
        cfg.update(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, projection_dim=WIDTH)
        json.dump(cfg, f, indent=2)
    fx.write_tokenizer(os.path.join(args.work, "tokenizer"), tok.encoder,
                       sorted(tok.bpe_ranks, key=lambda p: tok.bpe_ranks[p]), "<|endoftext|>")
    fx.reference_hidden(tr, emb, pos, ln_final, ids)  # warm-up
    t0 = time.perf_counter()
    last, skip2 = fx.reference_hidden(tr, emb, pos, ln_final, ids)
    t_ref = time.perf_counter() - t0
    outs = {}
    for skip in (1, 2):
        out = os.path.join(args.work, f"h{skip}.npy")
        cmd = [args.denoised, "encode-text", "--model", args.work, "--clip-skip", str(skip),
               "--threads", str(args.threads), "--out-ids", os.path.join(args.work, "ids.npy"),
               "--out", out]
        for p in prompts:
            cmd += ["--prompt", p]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        outs[skip] = (np.load(out), time.perf_counter() - t0)
    assert (np.load(os.path.join(args.work, "ids.npy")) == ids).all(), "ids differ"
    # every prompt of the fixture set through the whole released vocabulary's files
    cmd = [args.denoised, "encode-text", "--model", args.work, "--threads", str(args.threads),
           "--out-ids", os.path.join(args.work, "ids_all.npy"),
           "--out", os.path.join(args.work, "h_all.npy")]
    for p in fx.PROMPTS_FULL:
        cmd += ["--prompt", p]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    want_ids = fx.pad_rows(fx.clip_ids(tok, fx.PROMPTS_FULL), tok.encoder["<|endoftext|>"])
    same = (np.load(os.path.join(args.work, "ids_all.npy")) == want_ids).all(axis=1)
    print(f"ids with the full vocabulary files: {same.sum()} of {len(same)} prompts identical")
    for skip, want in ((1, last), (2, skip2)):
        got, secs = outs[skip]
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        print(f"clip skip {skip}: relative L2 {rel:.3g}; denoised {secs * 1e3:.0f} ms "
              f"(whole command: load + tokenize + encode), PyTorch {t_ref * 1e3:.0f} ms "
              f"(forward only, float32, {args.threads} threads)")


if __name__ == "__main__":
    main()
