"""safetensors.torch stand-in built on tools/st.py (denoised tools/pystubs)."""
import os
import sys

import numpy as np
import torch

_TOOLS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
import st  # noqa: E402  (tools/st.py)


def load_file(filename, device="cpu"):
    header, _, _ = st.load_header(filename)
    arrays = st.load(filename, bf16="raw")
    out = {}
    for name, a in arrays.items():
        if header[name]["dtype"] == "BF16":
            t = torch.from_numpy(a.astype(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        out[name] = t.to(device)
    return out


def save_file(tensors, filename, metadata=None):
    arrays, dtypes = {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arrays[name] = t.float().numpy()
            dtypes[name] = "BF16"
        else:
            arrays[name] = t.numpy()
    st.save(filename, arrays, dtypes=dtypes, metadata=metadata)
