#!/usr/bin/python3
"""Differential check of `denoised encode-text --out-ids` against OpenAI CLIP's tokenizer (with
the real ftfy, tools/clip_ref.py) on random prompts: words and pieces chosen to hit the clean-up
(nested and upper-case entities, terminal escapes, C1 controls, ligatures, full-width forms,
curly quotes, line breaks, combining marks, Hangul, final sigma) and the pre-split and BPE
(contractions, numbers, punctuation runs, CJK, emoji, long words), tokenized with the WHOLE
released vocabulary written as vocab.json + merges.txt. The encoder is a 1-wide stand-in: only
the ids matter here. Prompts that ftfy's mojibake repair changes are skipped (README.md "Text
encoder": not implemented). Development check, not a test.

Run: /usr/bin/python3 tools/fuzz_clip_ids.py --denoised build/denoised --work /tmp/clipfuzz \
         [--seed 1] [--prompts 3000]
"""
import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import clip_ref  # noqa: E402
import gen_clip_fixtures as fx  # noqa: E402
import st  # noqa: E402

PIECES = [
    "a", "photo", "of", "cat", "it's", "we'll", "I'M", "'S", "masterpiece", ",", "(", ")",
    "1girl", "8k", "1.5", "!!!", "  ", "--", "x" * 40, "qwzxv", "supercalifragilistic",
    "\u00e9t\u00e9", "na\u00efve", "\u00c6\u00d8\u00c5", "e\u0301", "\u0301", "\u0323",
    "\u6771\u4eac", "\U0001f431", "\U0001f469\u200d\U0001f52c", "\u0928\u092e", "\u0663",
    "\u00bd", "\u2160", "\u1100\u1161\u11a8", "\uac00", "\u03a3\u039f\u03a6\u0399\u0391\u03a3",
    "\u0130", "\u017f", "\u212a", "<|endoftext|>", "<|startoftext|>", "<lora:x:0.8>",
    "&", "amp;", "&amp;amp;", "&lt;", "#", "&#65;", "&#x1F600;", "&#0;", "&EACUTE;",
    "&nTILDE;", "&notin", "\uff06", "\uff1b", "\uff41", "\uff10", "\ufb01", "\ufb05",
    "\u0149", "\u01c4", "\x1b[31m", "\x1b", "[", "\r", "\n", "\r\n", "<", "\t", "\u3000",
    "\u00a0", "\u2028", "\u0085", "\u0093", "\u0081", "\u201c", "\u2019", "\u02bc", "\ufeff",
    "\x07", "\x7f", "\ufff9", "\uffe3", "\uff9e",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--denoised", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=3000)
    args = ap.parse_args()
    _, tokmod, gz, ftfy = clip_ref.load()
    tok = tokmod.SimpleTokenizer(gz)
    eot = tok.encoder["<|endoftext|>"]
    fx.write_tokenizer(os.path.join(args.work, "tokenizer"), tok.encoder,
                       sorted(tok.bpe_ranks, key=lambda p: tok.bpe_ranks[p]), "<|endoftext|>")
    te = os.path.join(args.work, "text_encoder")
    os.makedirs(te, exist_ok=True)
    vocab = len(tok.encoder)
    rng = np.random.default_rng(0)
    tensors = {"text_model.embeddings.token_embedding.weight": rng.standard_normal((vocab, 1)),
               "text_model.embeddings.position_embedding.weight": np.zeros((fx.CTX, 1)),
               "text_model.final_layer_norm.weight": np.ones(1),
               "text_model.final_layer_norm.bias": np.zeros(1)}
    p = "text_model.encoder.layers.0."
    for name, shape in (("self_attn.q_proj", (1, 1)), ("self_attn.k_proj", (1, 1)),
                        ("self_attn.v_proj", (1, 1)), ("self_attn.out_proj", (1, 1)),
                        ("mlp.fc1", (4, 1)), ("mlp.fc2", (1, 4))):
        tensors[p + name + ".weight"] = np.full(shape, 0.1)
        tensors[p + name + ".bias"] = np.zeros(shape[0])
    for n in ("layer_norm1", "layer_norm2"):
        tensors[p + n + ".weight"], tensors[p + n + ".bias"] = np.ones(1), np.zeros(1)
    st.save(os.path.join(te, "model.safetensors"),
            {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
    with open(os.path.join(te, "config.json"), "w") as f:
        cfg = fx.config_json(vocab, False, "float32")
        cfg.update(hidden_size=1, intermediate_size=4, num_hidden_layers=1,
                   num_attention_heads=1, projection_dim=1)
        json.dump(cfg, f)
    random.seed(args.seed)
    prompts, skipped = [], 0
    while len(prompts) < args.prompts:
        s = "".join(random.choice(PIECES) + random.choice(["", " ", " ", ","])
                    for _ in range(random.randint(0, 40)))
        if ftfy.fix_text(s) != ftfy.fix_text(s, fix_encoding=False):
            skipped += 1
        else:
            prompts.append(s)
    bad = 0
    for b in range(0, len(prompts), 256):
        batch = prompts[b:b + 256]
        cmd = [args.denoised, "encode-text", "--model", args.work,
               "--out-ids", os.path.join(args.work, "ids.npy"),
               "--out", os.path.join(args.work, "h.npy")]
        for s in batch:
            cmd += ["--prompt", s]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        got = np.load(os.path.join(args.work, "ids.npy"))
        want = fx.pad_rows(fx.clip_ids(tok, batch), eot)
        for i in np.nonzero((got != want).any(axis=1))[0]:
            bad += 1
            if bad <= 5:
                print("different ids:", repr(batch[i]))
    print(f"{len(prompts)} prompts ({skipped} more skipped: mojibake repair), "
          f"{bad} with ids other than CLIP's")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
