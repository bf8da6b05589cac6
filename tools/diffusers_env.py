"""Import a diffusers *source tree* on a machine without huggingface_hub/safetensors.

    import diffusers_env
    diffusers = diffusers_env.setup()            # or setup("/path/to/diffusers/src")

The source path comes from the argument, else $DIFFUSERS_SRC, else /tmp/diffusers-0.21/src.
tools/pystubs (offline huggingface_hub + safetensors stand-ins) is put in front of sys.path.
Needs Debian's python3-torch python3-numpy python3-packaging python3-filelock python3-regex
python3-requests python3-yaml python3-importlib-metadata python3-tqdm python3-pil
(scripts/install-deps.sh --reference).  Only tooling uses this; nothing at run time does.
"""
import os
import sys

DEFAULT_SRC = "/tmp/diffusers-0.21/src"
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
STUBS_DIR = os.path.join(TOOLS_DIR, "pystubs")


class DiffusersEnvError(RuntimeError):
    pass


def source_path(src=None):
    return src or os.environ.get("DIFFUSERS_SRC") or DEFAULT_SRC


def setup(src=None, quiet=True):
    """Put stubs + diffusers src on sys.path and import diffusers.  Returns the module."""
    src = os.path.abspath(source_path(src))
    if os.path.isdir(os.path.join(src, "src", "diffusers")):
        src = os.path.join(src, "src")  # accept a checkout root too
    if not os.path.isfile(os.path.join(src, "diffusers", "__init__.py")):
        raise DiffusersEnvError(
            "diffusers source not found at %r (expected %s/diffusers/__init__.py).\n"
            "Pass --diffusers-src PATH or set DIFFUSERS_SRC to the 'src' directory of a diffusers "
            "checkout (tested with v0.21.0)." % (src, src))
    for p in (src, STUBS_DIR, TOOLS_DIR):
        if p in sys.path:
            sys.path.remove(p)
    sys.path[0:0] = [STUBS_DIR, src, TOOLS_DIR]
    if quiet:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        import warnings
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise DiffusersEnvError("PyTorch is not importable (%s). Install python3-torch via "
                                "scripts/install-deps.sh --reference and run with /usr/bin/python3." % e)
    # diffusers 0.21.0 evaluates `Optional[PreTrainedTokenizer]` etc. in loaders.py annotations even
    # when transformers is absent (upstream issue #5022, fixed in 0.21.1), so importing UNet2DModel
    # dies with NameError.  Provide placeholder names in builtins during the import only.
    import builtins
    import importlib.util
    shim = []
    if importlib.util.find_spec("transformers") is None:
        for n in ("PreTrainedTokenizer", "PreTrainedModel", "CLIPTextModel", "CLIPTextModelWithProjection"):
            if not hasattr(builtins, n):
                setattr(builtins, n, type(n, (), {"__doc__": "placeholder (tools/diffusers_env.py)"}))
                shim.append(n)
    try:
        import diffusers
        from diffusers import UNet2DModel, DDPMScheduler  # noqa: F401  (force the lazy imports)
    except (ImportError, RuntimeError) as e:
        raise DiffusersEnvError(
            "importing diffusers from %r failed: %s\n"
            "Missing Debian python modules? run scripts/install-deps.sh --reference" % (src, e))
    finally:
        for n in shim:
            delattr(builtins, n)
    got = os.path.dirname(os.path.dirname(os.path.abspath(diffusers.__file__)))
    if os.path.realpath(got) != os.path.realpath(src):
        raise DiffusersEnvError("diffusers was imported from %r, not %r (another copy is installed "
                                "or already imported)" % (got, src))
    if quiet:
        try:
            diffusers.utils.logging.set_verbosity_error()
        except Exception:
            pass
    return diffusers


def exact_f64(model):
    """Turn a diffusers model into a genuinely float64 reference (in place; returns it).

    diffusers' Attention is built with upcast_softmax=True, which does scores.float() before
    the softmax -- for a float64 model that is a *down*-cast to float32 (~1e-8 relative effect
    on a UNet output).  It is a no-op for float32 models, so switch it off.  The sinusoidal
    timestep embedding stays float32: that is what the model computes in every dtype."""
    model = model.double().eval()
    for m in model.modules():
        if hasattr(m, "upcast_softmax"):
            m.upcast_softmax = False
    return model


class safe_baddbmm:
    """Context manager: torch.baddbmm(x, a, b, beta=0, alpha=s) -> s * bmm(a, b).

    Debian's torch 1.13 CPU float64 baddbmm with beta=0 intermittently returns NaN for tiny
    attention matrices (seen on a 2x2 / 1x1 attention: ~4% of float64 forwards), although
    beta=0 must ignore the input.  diffusers' AttnProcessor calls it with torch.empty() input
    and beta=0, so float64 references are computed under this patch."""

    def __enter__(self):
        import torch
        self._orig = orig = torch.baddbmm

        def baddbmm(input, batch1, batch2, *args, beta=1, alpha=1, out=None, **kw):
            if beta == 0 and not args and not kw and out is None:
                r = torch.bmm(batch1, batch2)
                return r * alpha if alpha != 1 else r
            return orig(input, batch1, batch2, *args, beta=beta, alpha=alpha, out=out, **kw)

        torch.baddbmm = baddbmm
        return self

    def __exit__(self, *exc):
        import torch
        torch.baddbmm = self._orig
        return False


if __name__ == "__main__":
    d = setup(sys.argv[1] if len(sys.argv) > 1 else None)
    print("diffusers %s from %s" % (d.__version__, os.path.dirname(d.__file__)))
