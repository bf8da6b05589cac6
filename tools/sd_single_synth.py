#!/usr/bin/env python3
"""A stand-in single-file Stable-Diffusion checkpoint for examples: the original key layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`) with the names and
shapes of tests/fixtures/sd_single/sdN.json (the tiny SD 1.x / 2.x configurations whose names
diffusers' own converter produced), filled with a small smooth pattern, and a tokenizer/ folder
beside it (a single file carries no vocabulary). It is what tests/readme_examples.sh gives the
README's single-file command in place of the reader's real checkpoint; pure Python, no torch.

Usage: tools/sd_single_synth.py --family 1 --tokenizer DIR --out FILE.safetensors
"""
import argparse
import array
import json
import math
import os
import shutil
import struct
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=int, choices=(1, 2), default=1)
    ap.add_argument("--tokenizer", required=True, help="a CLIP tokenizer folder (vocab.json, merges.txt)")
    ap.add_argument("--out", required=True, help="the .safetensors to write; tokenizer/ goes beside it")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fx = json.load(open(os.path.join(root, "tests/fixtures/sd_single/sd%d.json" % a.family)))
    try:
        vocab = len(json.load(open(os.path.join(a.tokenizer, "vocab.json"))))
    except (OSError, ValueError) as ex:
        sys.exit("sd_single_synth: %s: no readable vocab.json (%s)" % (a.tokenizer, ex))
    header, blobs, offset = {}, [], 0
    for index, (name, shape) in enumerate(fx["original"].items(), start=1):
        shape = list(shape)
        if "token_embedding.weight" in name:
            shape[0] = vocab  # one row per token of the tokenizer beside it
        count = math.prod(shape)
        # the test's pattern: 0.05 sin(0.37 (i mod 1000) + index), small enough to stay finite
        period = array.array("f", (0.05 * math.sin(0.37 * i + index) for i in range(min(count, 1000))))
        data = (period * (count // 1000 + 1))[:count]
        if sys.byteorder != "little":
            data.byteswap()
        blob = data.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(a.out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    tok = os.path.join(os.path.dirname(os.path.abspath(a.out)), "tokenizer")
    if not os.path.isdir(tok):
        shutil.copytree(a.tokenizer, tok)
    print("sd_single_synth: wrote %s (%.1f MB) and %s" % (a.out, (offset + len(text) + 8) / 1e6, tok))


if __name__ == "__main__":
    main()
