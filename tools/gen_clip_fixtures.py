#!/usr/bin/python3
"""Generate the CLIP tokenizer and text-encoder fixtures (tests/fixtures/clip) from OpenAI's CLIP
reference and the real ftfy it cleans text with (tools/clip_ref.py; run at development time
only).

  tok_full/   Token ids from the FULL released vocabulary (bpe_simple_vocab_16e6.txt.gz) for
              PROMPTS_FULL, with the part of that vocabulary those prompts use, in Hugging Face
              layout: vocab.json keeps every token's real id, merges.txt every merge the
              reference applied, in rank order. BPE picks the lowest-ranked pair present at each
              step, so dropping merges it never applied changes nothing: the C tokenizer reads
              this and must give the full vocabulary's ids (ids.npy int64 [P, 77]).
  sd1/        A pipeline folder: tokenizer/ (the first SMALL_MERGES merges of the real file, pad
              <|endoftext|>) and text_encoder/ (config.json + model.safetensors, F32,
              quick_gelu, plus the position_ids buffer older checkpoints carry) with random
              weights; ids.npy from CLIP's SimpleTokenizer on that vocabulary; hidden_last.npy
              and hidden_skip2.npy float32 [P, 77, D] from CLIP's own Transformer / LayerNorm
              modules in float32 (last layer through ln_final; penultimate through ln_final).
  sd2/        The same with pad token "!", hidden_act gelu (nn.GELU in place of QuickGELU, as
              OpenCLIP's SD 2.x text tower) and F16 weights (the reference uses the F16-rounded
              weights): text_encoder/ and tokenizer/ side by side for --tokenizer.
  prompts.json The prompt sets.
  clean.json   For each prompt of the full set, the text CLIP tokenizes (ftfy.fix_text, html
              unescape twice, whitespace clean-up, lower-case); and MOJIBAKE: prompts on which
              ftfy's mojibake repair (fix_encoding, which the C tokenizer does not do) changes
              the text, with CLIP's text and the text without that repair. Every prompt of the
              sets is checked to be one that repair leaves alone.

Run: /usr/bin/python3 tools/gen_clip_fixtures.py [--clip-repo DIR] --out tests/fixtures/clip
"""
import argparse
import gzip
import html
import html.entities
import json
import os
import sys

import numpy as np
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import clip_ref  # noqa: E402
import gen_unicode_tables  # noqa: E402
import st  # noqa: E402

SMALL_MERGES = 1000
WIDTH, LAYERS, HEADS, CTX = 32, 3, 4, 77

LONG = ("a highly detailed oil painting of a lighthouse on a rocky cliff at sunset, dramatic "
        "clouds, crashing waves, seagulls, warm golden light, volumetric fog, intricate "
        "brushwork, by a famous artist, trending on artstation, 8k resolution, masterpiece, "
        "best quality, ultra sharp focus, cinematic composition, wide angle lens, "
        "award winning photograph of the year, and more words to go past the limit")

PROMPTS_MODEL = [
    "a photo of a cat",
    "",
    "A   PHOTO,   of 3 dogs!!! 12.5% (best:1.2) [blurry]",
    "it's the cat's toy; we'll see, they're \u201chere\u201d and I'M 'S sure",
    "caf\u00e9 na\u00efve \u00d1and\u00fa \u6771\u4eac\u30bf\u30ef\u30fc \U0001f431\U0001f3a8",
    LONG,
    "&amp;lt;b&amp;gt; &copy; 2024 &#x1F600; &notin &#128512;",
    "e\u0301 decomposed, \ufb01ne \uff46\uff55\uff4c\uff4c width\t\n  tabs",
    "<|endoftext|> inside <|startoftext|>",
    "\u00c4rger \u00fcber \u00d6l, \u03b1\u03b2\u03b3 \u0434\u043e\u043c, \ud55c\uad6d\uc5b4",
]

PROMPTS_FULL = PROMPTS_MODEL + [
    "masterpiece, best quality, 1girl, solo, looking at viewer, <lora:foo_v2:0.8>",
    "1920x1080 8k uhd, f/1.8, 35mm, ISO-100, 1/250s",
    "don't won't can't shouldn't y'all o'clock rock'n'roll",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",  # Devanagari
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\U0001f469\u200d\U0001f52c\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u017ftrange long s: '\u017f and \u212a kelvin, \u0130stanbul",
    "\x1b[31mred\x1b[0m text \u0080\u0093quoted\u0094 \u2028line\u2029para\r\nend",
    "\u2160\u2161\u2162 roman, \u00bd half, \u00b2 squared, \u0663\u0664 arabic digits",
    "-- ... ??? !!! ''' \"\"\" ___ ~~~ $$$ @@@",
    "hello&nbsp;world &amp;amp; &#0; &#x110000; &#65; &AMP &ampere",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u03a3\u039f\u03a6\u0399\u0391\u03a3 \u03a3\u0391\u03a3' \u03a3",  # final sigma
    LONG + ", " + LONG,
    "&amp;amp;amp;lt;deep&amp;amp;amp;gt; &EACUTE;t&EACUTE; &NTILDE;o &SZLIG; &nTILDE; &#65x;",
    "one &amp;amp;amp; line\n<b>two</b> &amp;amp;amp; &EACUTE;\nthree &amp;amp;amp;",
    "\x1b[1\ufb01 \ufb05 \ufb03 \uffe3 \x1b[\u0663m digit \uff02quoted\uff02 \u0149",
]

MOJIBAKE = ["caf\u00c3\u00a9 cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e"]


def byte_vocab(tok):
    vocab = list(tok.byte_encoder.values())
    return vocab + [v + "</w>" for v in vocab]


def write_tokenizer(path, vocab, merges, pad):
    """Hugging Face CLIPTokenizer files: vocab (str -> id), merges in rank order."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>", pad_token=pad)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=CTX, do_lower_case=True,
                       tokenizer_class="CLIPTokenizer"), f, indent=2)


def clip_ids(tok, prompts):
    """clip.tokenize(..., truncate=True): sot + tokens + eot, cut to 77 with eot last, padded
    with pad_id (CLIP pads with 0 = "!"; Stable Diffusion 1.x with eot)."""
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    rows = []
    for p in prompts:
        t = [sot] + tok.encode(p) + [eot]
        if len(t) > CTX:
            t = t[:CTX]
            t[-1] = eot
        rows.append(t)
    return rows


def pad_rows(rows, pad_id):
    return np.array([r + [pad_id] * (CTX - len(r)) for r in rows], dtype=np.int64)


class Recording(dict):
    """bpe_ranks that records each merge the reference applies (a pair it tests and finds)."""

    def __init__(self, ranks):
        super().__init__(ranks)
        self.used = set()

    def __contains__(self, pair):
        found = dict.__contains__(self, pair)
        if found:
            self.used.add(pair)
        return found


def gen_full(out, tokmod, gz):
    tok = tokmod.SimpleTokenizer(gz)
    tok.bpe_ranks = Recording(tok.bpe_ranks)
    ids = pad_rows(clip_ids(tok, PROMPTS_FULL), tok.encoder["<|endoftext|>"])
    merges = sorted(tok.bpe_ranks.used, key=lambda p: tok.bpe_ranks[p])
    keep = set(byte_vocab(tok)) | {"".join(m) for m in merges}
    keep |= {"<|startoftext|>", "<|endoftext|>"}
    vocab = {k: v for k, v in tok.encoder.items() if k in keep}
    d = os.path.join(out, "tok_full")
    write_tokenizer(d, vocab, merges, "<|endoftext|>")
    np.save(os.path.join(d, "ids.npy"), ids)
    print(f"tok_full: {len(PROMPTS_FULL)} prompts, {len(merges)} merges of the full vocabulary")


def small_tokenizer(tokmod, gz, path):
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    small = os.path.join(path, "bpe_small.txt.gz")
    with gzip.open(small, "wb") as f:
        f.write("\n".join(lines[:SMALL_MERGES + 1]).encode("utf-8"))
    tok = tokmod.SimpleTokenizer(small)
    os.remove(small)
    merges = sorted(tok.bpe_ranks, key=lambda p: tok.bpe_ranks[p])
    return tok, merges


def random_model(model_mod, vocab_size, gelu, seed):
    """CLIP's text tower (token and position embeddings, Transformer, ln_final) with random
    weights at CLIP's initialisation scales; layer norms drawn away from 1 / 0."""
    torch.manual_seed(seed)
    mask = torch.empty(CTX, CTX).fill_(float("-inf")).triu_(1)
    tr = model_mod.Transformer(WIDTH, LAYERS, HEADS, attn_mask=mask)
    emb = torch.nn.Embedding(vocab_size, WIDTH)
    pos = torch.nn.Parameter(torch.empty(CTX, WIDTH))
    ln_final = model_mod.LayerNorm(WIDTH)
    torch.nn.init.normal_(emb.weight, std=0.02)
    torch.nn.init.normal_(pos, std=0.01)
    attn_std, proj_std = WIDTH ** -0.5, WIDTH ** -0.5 * (2 * LAYERS) ** -0.5
    with torch.no_grad():
        for blk in tr.resblocks:
            torch.nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * WIDTH) ** -0.5)
            torch.nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
            for b in (blk.attn.in_proj_bias, blk.attn.out_proj.bias, blk.mlp.c_fc.bias,
                      blk.mlp.c_proj.bias):
                b.normal_(std=0.02)
            if gelu:
                blk.mlp.gelu = torch.nn.GELU()
        for ln in [b.ln_1 for b in tr.resblocks] + [b.ln_2 for b in tr.resblocks] + [ln_final]:
            ln.weight.copy_(1 + 0.1 * torch.randn(WIDTH))
            ln.bias.copy_(0.1 * torch.randn(WIDTH))
    return tr, emb, pos, ln_final


def hf_tensors(tr, emb, pos, ln_final):
    """The tower's tensors under transformers' CLIPTextModel names."""
    t = {"text_model.embeddings.token_embedding.weight": emb.weight,
         "text_model.embeddings.position_embedding.weight": pos,
         "text_model.final_layer_norm.weight": ln_final.weight,
         "text_model.final_layer_norm.bias": ln_final.bias}
    for i, blk in enumerate(tr.resblocks):
        p = f"text_model.encoder.layers.{i}."
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            t[p + f"self_attn.{name}.weight"] = w[k * WIDTH:(k + 1) * WIDTH]
            t[p + f"self_attn.{name}.bias"] = b[k * WIDTH:(k + 1) * WIDTH]
        pairs = [("self_attn.out_proj", blk.attn.out_proj), ("layer_norm1", blk.ln_1),
                 ("layer_norm2", blk.ln_2), ("mlp.fc1", blk.mlp.c_fc), ("mlp.fc2", blk.mlp.c_proj)]
        for name, mod in pairs:
            t[p + name + ".weight"] = mod.weight
            t[p + name + ".bias"] = mod.bias
    return {k: v.detach().numpy().astype(np.float32) for k, v in t.items()}


def reference_hidden(tr, emb, pos, ln_final, ids):
    """(last layer, penultimate layer), each through ln_final. In float32: CLIP's LayerNorm
    casts its input to float32, so the modules cannot run in float64."""
    with torch.no_grad():
        x = emb(torch.from_numpy(ids)) + pos
        x = x.permute(1, 0, 2)
        states = [x]
        for blk in tr.resblocks:
            x = blk(x)
            states.append(x)
        out = [ln_final(s.permute(1, 0, 2)).float().numpy() for s in (states[-1], states[-2])]
    return out


def config_json(vocab_size, gelu, dtype):
    return dict(architectures=["CLIPTextModel"], model_type="clip_text_model",
                vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=CTX, hidden_act="gelu" if gelu else "quick_gelu",
                layer_norm_eps=1e-5, projection_dim=WIDTH, bos_token_id=0, eos_token_id=2,
                pad_token_id=1, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0,
                initializer_range=0.02, torch_dtype=dtype)


def gen_model(out, name, model_mod, tok, merges, gelu, f16, pad, seed):
    d = os.path.join(out, name)
    write_tokenizer(os.path.join(d, "tokenizer"), tok.encoder, merges, pad)
    pad_id = tok.encoder[pad]
    ids = pad_rows(clip_ids(tok, PROMPTS_MODEL), pad_id)
    tr, emb, pos, ln_final = random_model(model_mod, len(tok.encoder), gelu, seed)
    tensors = hf_tensors(tr, emb, pos, ln_final)
    if f16:  # the reference runs on the weights the file holds
        with torch.no_grad():
            for p in list(tr.parameters()) + list(emb.parameters()) + [pos] + \
                    list(ln_final.parameters()):
                p.copy_(p.half().float())
        tensors = hf_tensors(tr, emb, pos, ln_final)
    te = os.path.join(d, "text_encoder")
    os.makedirs(te, exist_ok=True)
    with open(os.path.join(te, "config.json"), "w") as f:
        json.dump(config_json(len(tok.encoder), gelu, "float16" if f16 else "float32"), f,
                  indent=2)
    if not f16:
        tensors["text_model.embeddings.position_ids"] = np.arange(CTX, dtype=np.int64)[None]
    st.save(os.path.join(te, "model.safetensors"), tensors, dtype="F16" if f16 else None,
            metadata={"format": "pt"})
    last, skip2 = reference_hidden(tr, emb, pos, ln_final, ids)
    np.save(os.path.join(d, "ids.npy"), ids)
    np.save(os.path.join(d, "hidden_last.npy"), last)
    np.save(os.path.join(d, "hidden_skip2.npy"), skip2)
    print(f"{name}: vocab {len(tok.encoder)}, {'gelu' if gelu else 'quick_gelu'}, "
          f"{'F16' if f16 else 'F32'}, pad {pad!r}")


def clip_clean(tokmod, text):
    return tokmod.whitespace_clean(tokmod.basic_clean(text)).lower()


def gen_clean(out, tokmod, ftfy):
    """clean.json, after checking that the prompts stay inside what the C side implements and
    that its entity rule gives ftfy's table."""
    want = dict(ftfy.chardata.HTML_ENTITIES)
    rule = {k: v for k, v in html.entities.html5.items() if k.endswith(";")}
    rule.update(gen_unicode_tables.ftfy_upper_entities())
    assert {"&" + k: v for k, v in rule.items()} == want, "ftfy's entity table moved"
    for p in PROMPTS_FULL:
        assert ftfy.fix_text(p) == ftfy.fix_text(p, fix_encoding=False), \
            f"ftfy repairs mojibake in {p!r}: not a parity prompt"
    moji = []
    for p in MOJIBAKE:
        ref = clip_clean(tokmod, p)
        ours = tokmod.whitespace_clean(html.unescape(html.unescape(
            ftfy.fix_text(p, fix_encoding=False))).strip()).lower()
        assert ref != ours
        moji.append([p, ref, ours])
    with open(os.path.join(out, "clean.json"), "w", encoding="utf-8") as f:
        json.dump(dict(full=[clip_clean(tokmod, p) for p in PROMPTS_FULL], mojibake=moji), f,
                  ensure_ascii=False, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-repo", default=clip_ref.DEFAULT_REPO)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model_mod, tokmod, gz, ftfy = clip_ref.load(args.clip_repo)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(dict(model=PROMPTS_MODEL, full=PROMPTS_FULL), f, ensure_ascii=False, indent=1)
    gen_clean(args.out, tokmod, ftfy)
    gen_full(args.out, tokmod, gz)
    tok, merges = small_tokenizer(tokmod, gz, args.out)
    gen_model(args.out, "sd1", model_mod, tok, merges, False, False, "<|endoftext|>", 1)
    gen_model(args.out, "sd2", model_mod, tok, merges, True, True, "!", 2)


if __name__ == "__main__":
    main()
