#!/usr/bin/python3
"""Captions and a small CLIP-format vocabulary for the text-to-glyph model (issue 16 item 7).

    /usr/bin/python3 tools/glyphs/captions.py [--data /work/glyphs-data] [--out /work/glyphs-data]
        [--heldout-pairs 3] [--seed 0] [--max-length 16]

For every image of DATA/train.npz and DATA/heldout.npz (tools/glyphs/render.py), a caption built
from its attributes:
    "a [bold] [italic] FG letter|digit C on a BG background, STYLE"
e.g. "a bold italic red letter q on a blue background, serif" (CLIP lower-cases; the colours are
render.py's palette names). Held-out attribute combinations: for each of the 36 characters,
--heldout-pairs (foreground, background) pairs drawn with the seed from the pairs the data has
for it; no training caption has one of these (character, fg, bg) triples, and prompt-following is
measured on them. Writes
    OUT/tokenizer/        vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
                          (Hugging Face CLIPTokenizer layout: the 512 byte-level base tokens, the
                          merges that make each caption word one token, start and end tokens;
                          pad with the end token; model_max_length --max-length)
    OUT/captions.json     {"heldout_combos": [[char, fg, bg], ...], "words": [...],
                           "train_keep": count of train images outside the held-out triples}
    OUT/train_captions.txt, OUT/heldout_captions.txt   one caption per image, in npz order
    OUT/train_keep.npy    bool [N]: the train image's triple is not held out
Every caption word is checked to come out as exactly one token under CLIP's BPE rules.
"""
import argparse
import json
import os

import numpy as np

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("serif", "sans", "mono")


def bytes_to_unicode():
    """CLIP's byte -> printable unicode table (the order of the first 256 vocabulary ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe(word, ranks):
    """CLIP's BPE of one pre-split word: the lowest-ranked adjacent pair merges first."""
    sym = list(word[:-1]) + [word[-1] + "</w>"]
    while len(sym) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
        best = min(pairs)[0]
        if best == 1 << 30:
            break
        pair = next((sym[i], sym[i + 1]) for r, i in pairs if r == best)
        out, i = [], 0
        while i < len(sym):
            if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
                out.append(sym[i] + sym[i + 1])
                i += 2
            else:
                out.append(sym[i])
                i += 1
        sym = out
    return sym


def merges_for(words):
    """Merges, in rank order, under which every word is a single token: while a word still
    splits, merge its first two symbols (a new, highest rank), until none splits."""
    merges, ranks = [], {}
    changed = True
    while changed:
        changed = False
        for w in words:
            sym = bpe(w, ranks)
            if len(sym) > 1:
                ranks[(sym[0], sym[1])] = len(merges)
                merges.append((sym[0], sym[1]))
                changed = True
    for w in words:
        assert bpe(w, ranks) == [w + "</w>"], w
    return merges


def caption(char, fg, bg, bold, italic, style, palette_names):
    c = CLASSES[char]
    kind = "digit" if c.isdigit() else "letter"
    words = ["a"] + (["bold"] if bold else []) + (["italic"] if italic else [])
    words += [palette_names[fg], kind, c.lower(), "on", "a", palette_names[bg], "background,",
              STYLES[style]]
    return " ".join(words)


def write_tokenizer(path, words, max_length):
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    vocab = base + [v + "</w>" for v in base]
    merges = merges_for(words)
    vocab += [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write("%s %s\n" % (a, b))
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=max_length, do_lower_case=True,
                       tokenizer_class="CLIPTokenizer"), f, indent=2)
    return len(vocab)


LABELS = ("char", "fg", "bg", "bold", "italic", "style")


def load_labels(path):
    """The label arrays of a render.py npz, read once: an NpzFile reads (and decompresses) an
    array again on every d[key], so indexing d["char"][i] per image made this script take ~an
    hour on the 148k training renders; the images are not needed here."""
    with np.load(path) as d:
        out = {k: d[k] for k in LABELS + ("palette_names",)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/glyphs-data")
    ap.add_argument("--out", default="/work/glyphs-data")
    ap.add_argument("--heldout-pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=16)
    args = ap.parse_args()
    train = load_labels(os.path.join(args.data, "train.npz"))
    held = load_labels(os.path.join(args.data, "heldout.npz"))
    names = [str(s) for s in train["palette_names"]]
    rng = np.random.Generator(np.random.PCG64(args.seed))
    combos = []
    for ch in range(len(CLASSES)):
        sel = train["char"] == ch
        pairs = sorted(set(zip(train["fg"][sel].tolist(), train["bg"][sel].tolist())))
        for k in rng.choice(len(pairs), size=args.heldout_pairs, replace=False):
            combos.append((ch, int(pairs[k][0]), int(pairs[k][1])))
    hset = set(combos)
    keep = np.array([(c, f, b) not in hset for c, f, b in
                     zip(train["char"].tolist(), train["fg"].tolist(), train["bg"].tolist())])
    # the CLIP pre-split makes "background," two words: "background" and ","
    words = sorted({w for w in ["a", "bold", "italic", "letter", "digit", "on", "background", ","]
                    + names + list(STYLES) + [c.lower() for c in CLASSES]})
    nvocab = write_tokenizer(os.path.join(args.out, "tokenizer"), words, args.max_length)
    for split, d in (("train", train), ("heldout", held)):
        with open(os.path.join(args.out, split + "_captions.txt"), "w") as f:
            for i in range(len(d["char"])):
                f.write(caption(int(d["char"][i]), int(d["fg"][i]), int(d["bg"][i]),
                                int(d["bold"][i]), int(d["italic"][i]), int(d["style"][i]),
                                names) + "\n")
    np.save(os.path.join(args.out, "train_keep.npy"), keep)
    with open(os.path.join(args.out, "captions.json"), "w") as f:
        json.dump({"heldout_combos": [[CLASSES[c], names[fg], names[bg]] for c, fg, bg in combos],
                   "words": words, "vocab_size": nvocab, "train_keep": int(keep.sum()),
                   "train": int(len(keep)), "seed": args.seed}, f, indent=1)
    print("%d words, vocabulary %d; %d of %d train images kept (%d held-out triples)"
          % (len(words), nvocab, keep.sum(), len(keep), len(combos)))


if __name__ == "__main__":
    main()
