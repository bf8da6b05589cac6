"""OpenAI's CLIP reference (model.py and simple_tokenizer.py with its BPE file) and the ftfy it
cleans text with, each loaded from a git mirror (github.com/openai/CLIP, github.com/rspeer/
python-ftfy at a release tag) without installing anything, for tools/gen_clip_fixtures.py and
development checks of the C tokenizer.

ftfy's formatting module imports wcwidth (terminal display widths), which is not installed and
which fix_text never calls: a stub stands in for it.
"""
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import types

DEFAULT_REPO = "/work/.mirror/openai+CLIP/repo"
FTFY_REPO = "/work/.mirror/rspeer+python-ftfy/repo"
FTFY_TAG = "v6.3.1"


def git_show(repo, spec):
    return subprocess.run(["git", "--git-dir", repo, "show", spec], check=True,
                          capture_output=True).stdout


def load_ftfy(repo=FTFY_REPO, tag=FTFY_TAG):
    """The ftfy package of that release."""
    tmp = tempfile.mkdtemp(prefix="ftfy_ref_")
    tar = subprocess.run(["git", "--git-dir", repo, "archive", tag, "ftfy"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(tmp)
    if "wcwidth" not in sys.modules:
        stub = types.ModuleType("wcwidth")
        stub.wcwidth = lambda c: 1
        stub.wcswidth = lambda s: len(s)
        sys.modules["wcwidth"] = stub
    sys.path.insert(0, tmp)
    import ftfy  # noqa: E402
    sys.path.remove(tmp)
    return ftfy


def load(repo=DEFAULT_REPO, ftfy_repo=FTFY_REPO):
    """(model module, simple_tokenizer module, path of bpe_simple_vocab_16e6.txt.gz, ftfy)."""
    tmp = tempfile.mkdtemp(prefix="clip_ref_")
    for name in ("model.py", "simple_tokenizer.py", "bpe_simple_vocab_16e6.txt.gz"):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(git_show(repo, "HEAD:clip/" + name))
    ftfy = load_ftfy(ftfy_repo)
    sys.modules["ftfy"] = ftfy
    mods = []
    for name in ("model", "simple_tokenizer"):
        spec = importlib.util.spec_from_file_location("clip_ref_" + name,
                                                      os.path.join(tmp, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1], os.path.join(tmp, "bpe_simple_vocab_16e6.txt.gz"), ftfy
