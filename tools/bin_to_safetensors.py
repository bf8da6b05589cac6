#!/usr/bin/python3
"""Convert a PyTorch .bin/.pt state_dict (e.g. diffusion_pytorch_model.bin) to .safetensors.

    tools/bin_to_safetensors.py IN.bin OUT.safetensors [--dtype keep|f32|f16|bf16]
                                [--key state_dict] [--skip-non-tensors] [--force]

The file is read with torch.load(map_location="cpu", weights_only=True) when this torch
supports weights_only (>= 1.13); otherwise (or with --unsafe-pickle) with a full unpickle --
only do that for files you trust.  Tensors keep their names and dtype unless --dtype is given
(F32/F16/BF16 for floating tensors; integer tensors are never converted).  Writing uses our
own tools/st.py; metadata {"format": "pt"} like diffusers.
"""
import argparse
import inspect
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)


def die(msg, code=1):
    sys.stderr.write("bin_to_safetensors: %s\n" % msg)
    sys.exit(code)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--dtype", default="keep", choices=["keep", "f32", "f16", "bf16"])
    ap.add_argument("--key", help="take the state dict from this top-level key (default: auto-detect "
                                  "'state_dict'/'model'/'ema' wrappers)")
    ap.add_argument("--skip-non-tensors", action="store_true", help="drop non-tensor entries instead of failing")
    ap.add_argument("--unsafe-pickle", action="store_true", help="allow arbitrary pickles (trusted files only)")
    ap.add_argument("--force", action="store_true", help="overwrite OUT")
    args = ap.parse_args(argv)

    if not os.path.isfile(args.input):
        die("%s: no such file" % args.input)
    if os.path.exists(args.output) and not args.force:
        die("%s exists (use --force)" % args.output)
    try:
        import numpy as np
        import torch
    except ImportError as e:
        die("needs python3-torch and python3-numpy (scripts/install-deps.sh --reference): %s" % e)
    import st

    with open(args.input, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        die("%s is a git-lfs pointer, not the weights (run git lfs pull)" % args.input)
    if len(head) >= 8 and head[8:9] == b"{" and not head.startswith(b"PK"):
        die("%s looks like a safetensors file already" % args.input)

    kw = {"map_location": "cpu"}
    has_wo = "weights_only" in inspect.signature(torch.load).parameters
    if has_wo and not args.unsafe_pickle:
        kw["weights_only"] = True
    elif not has_wo and not args.unsafe_pickle:
        die("this torch (%s) has no torch.load(weights_only=...); re-run with --unsafe-pickle if you "
            "trust %s" % (torch.__version__, args.input))
    try:
        obj = torch.load(args.input, **kw)
    except Exception as e:  # noqa: BLE001 -- torch raises many kinds
        hint = ""
        if kw.get("weights_only"):
            hint = " (weights_only load refused it; if the file is trusted, try --unsafe-pickle)"
        die("cannot load %s: %s: %s%s" % (args.input, type(e).__name__, str(e).splitlines()[0] if str(e) else "", hint))

    if args.key:
        if not isinstance(obj, dict) or args.key not in obj:
            die("top-level key %r not found (keys: %s)" % (args.key, ", ".join(map(str, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__))
        obj = obj[args.key]
    elif isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for k in ("state_dict", "model", "ema", "module"):
            if isinstance(obj.get(k), dict):
                sys.stderr.write("bin_to_safetensors: using top-level key %r\n" % k)
                obj = obj[k]
                break
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        die("%s holds a pickled module (%s), not a state_dict" % (args.input, type(obj).__name__))
    if not isinstance(obj, dict):
        die("%s does not contain a state_dict (got %s)" % (args.input, type(obj).__name__))

    arrays, dtypes, skipped = {}, {}, []
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(args.dtype)
    for name, t in obj.items():
        if not isinstance(name, str):
            die("non-string key %r" % (name,))
        if not torch.is_tensor(t):
            if args.skip_non_tensors:
                skipped.append(name)
                continue
            die("entry %r is a %s, not a tensor (use --skip-non-tensors)" % (name, type(t).__name__))
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            if t.dtype == torch.bfloat16:
                arrays[name] = t.float().numpy()
                dtypes[name] = want or "BF16"
            elif t.dtype in (torch.float16, torch.float32, torch.float64):
                arrays[name] = t.numpy()
                if want:
                    dtypes[name] = want
            else:
                die("tensor %r has unsupported dtype %s" % (name, t.dtype))
        elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
            arrays[name] = t.numpy()
        else:
            die("tensor %r has unsupported dtype %s" % (name, t.dtype))
    if not arrays:
        die("no tensors in %s" % args.input)
    st.save(args.output, arrays, dtypes=dtypes, metadata={"format": "pt"})
    back = st.load(args.output)
    for k, a in arrays.items():
        b = back[k]
        if b.shape != a.shape:
            die("verification failed for %r" % k)
        if k not in dtypes and not np.array_equal(np.asarray(a), b, equal_nan=a.dtype.kind == "f"):
            die("verification failed for %r" % k)
    print("%s -> %s: %d tensors%s, %.1f MB" % (args.input, args.output, len(arrays),
          (" (%d non-tensor entries skipped)" % len(skipped)) if skipped else "",
          os.path.getsize(args.output) / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
