"""OpenAI's CLIP reference (model.py and simple_tokenizer.py with its BPE file), loaded from a git
mirror of github.com/openai/CLIP without its package's image dependencies, for
tools/gen_clip_fixtures.py and the development checks of the C tokenizer.

CLIP's tokenizer imports ftfy, which is not installable here. STAND_IN_FTFY replaces it with a
fix_text that applies exactly the ftfy subset engine/text/clip_tok.c implements (README.md "Text
encoder" lists it), so fixtures test everything downstream of that subset bit for bit; real ftfy
additionally repairs mojibake and unescapes HTML once more when the text has no '<'.
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types
import unicodedata

DEFAULT_REPO = "/work/.mirror/openai+CLIP/repo"

CP1252_HIGH = [0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030,
               0x0160, 0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D,
               0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E,
               0x0178]
LIGATURES = "\u0132\u0133\u0149\u01c4\u01c5\u01c6\u01c7\u01c8\u01c9\u01ca\u01cb\u01cc" \
            "\u01f1\u01f2\u01f3\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06"


def _maps():
    m = {0x80 + i: chr(c) for i, c in enumerate(CP1252_HIGH)}
    lig = {ord(c): unicodedata.normalize("NFKC", c) for c in LIGATURES}
    width = {0x3000: " "}
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            width[cp] = alt
    control = {c: None for c in list(range(0, 9)) + [0x0B] + list(range(0x0E, 0x20)) + [0x7F] +
               list(range(0x206A, 0x2070)) + [0xFEFF] + list(range(0xFFF9, 0xFFFD))}
    return m, lig, width, control


C1, LIG, WIDTH, CONTROL = _maps()


def stand_in_fix_text(text):
    """ftfy.fix_text's default steps that the C tokenizer implements, in ftfy's order."""
    text = re.sub("\x1b\\[[0-9;]*[a-zA-Z]", "", text)
    text = text.translate(C1).translate(LIG).translate(WIDTH)
    text = re.sub("[\u02bc\u2018-\u201b]", "'", text)
    text = re.sub("[\u201c-\u201f]", '"', text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
    text = text.translate(CONTROL)
    return unicodedata.normalize("NFC", text)


STAND_IN_FTFY = types.ModuleType("ftfy")
STAND_IN_FTFY.fix_text = stand_in_fix_text


def load(repo=DEFAULT_REPO):
    """(model module, simple_tokenizer module, path of bpe_simple_vocab_16e6.txt.gz)."""
    tmp = tempfile.mkdtemp(prefix="clip_ref_")
    for name in ("model.py", "simple_tokenizer.py", "bpe_simple_vocab_16e6.txt.gz"):
        data = subprocess.run(["git", "--git-dir", repo, "show", "HEAD:clip/" + name],
                              check=True, capture_output=True).stdout
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    sys.modules["ftfy"] = STAND_IN_FTFY
    mods = []
    for name in ("model", "simple_tokenizer"):
        spec = importlib.util.spec_from_file_location("clip_ref_" + name,
                                                      os.path.join(tmp, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1], os.path.join(tmp, "bpe_simple_vocab_16e6.txt.gz")
