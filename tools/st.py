"""Minimal safetensors reader/writer for numpy arrays (no third-party deps beyond numpy).

File layout: u64 little-endian header length N, N bytes of JSON header
  {name: {"dtype": D, "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
then the raw little-endian tensor bytes (offsets are relative to the end of the header).

Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
numpy has no bfloat16, so BF16 tensors are returned as float32 by load() (exact widening)
or as raw uint16 bit patterns with load(..., bf16="raw").  To write BF16 pass
dtypes={name: "BF16"} (or dtype="BF16" for all float tensors); float data is rounded
to nearest-even from float32.

Usage:
    import st
    tensors = st.load("model.safetensors")            # {name: np.ndarray}
    meta = st.load_metadata("model.safetensors")      # {str: str} or {}
    st.save("out.safetensors", tensors, dtype="F16", metadata={"format": "pt"})
"""
import json
import os
import struct

import numpy as np

__all__ = ["load", "load_header", "load_metadata", "save", "f32_to_bf16_bits",
           "bf16_bits_to_f32", "round_to_dtype", "SafetensorsError"]

_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "BF16": np.dtype("<u2"),  # stored as bit patterns
}
_SIZE = {k: v.itemsize for k, v in _NP.items()}
_FROM_NP = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
    np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def f32_to_bf16_bits(a):
    """float array -> uint16 bf16 bit patterns, round-to-nearest-even (NaN kept quiet NaN)."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    u = a.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out.reshape(a.shape)


def bf16_bits_to_f32(bits):
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(a, dtype):
    """Round a float array through storage dtype ("F32"/"F16"/"BF16"); returns float32."""
    a = np.asarray(a, dtype=np.float32)
    dtype = dtype.upper()
    if dtype == "F32":
        return a.copy()
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a))
    raise SafetensorsError("round_to_dtype: unsupported dtype %r" % dtype)


def _read_header(f, path, file_size):
    raw = f.read(8)
    if len(raw) != 8:
        raise SafetensorsError("%s: file too short for a safetensors header" % path)
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or n + 8 > file_size:
        raise SafetensorsError("%s: bad header length %d (file size %d)" % (path, n, file_size))
    hb = f.read(n)
    try:
        header = json.loads(hb.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError("%s: header is not valid JSON: %s" % (path, e))
    if not isinstance(header, dict):
        raise SafetensorsError("%s: header is not a JSON object" % path)
    return header, 8 + n


def load_header(path):
    """Returns (header dict without __metadata__, metadata dict, data start offset)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, start = _read_header(f, path, size)
    meta = header.pop("__metadata__", None) or {}
    return header, meta, start


def load_metadata(path):
    return load_header(path)[1]


def load(path, bf16="f32", names=None):
    """Load tensors as numpy arrays.  bf16: "f32" (widen) or "raw" (uint16 bits)."""
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        header, start = _read_header(f, path, size)
        header.pop("__metadata__", None)
        data_len = size - start
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            try:
                dt = info["dtype"]
                shape = [int(s) for s in info["shape"]]
                b, e = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError("%s: malformed entry for tensor %r" % (path, name))
            if dt not in _NP:
                raise SafetensorsError("%s: tensor %r has unsupported dtype %s" % (path, name, dt))
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if any(s < 0 for s in shape) or e - b != count * _SIZE[dt] or b < 0 or e > data_len:
                raise SafetensorsError("%s: tensor %r: offsets [%d,%d] do not match dtype %s shape %s "
                                       "(data section %d bytes)" % (path, name, b, e, dt, shape, data_len))
            f.seek(start + b)
            arr = np.empty(shape, dtype=_NP[dt])
            if arr.nbytes and f.readinto(memoryview(arr.reshape(-1)).cast("B")) != arr.nbytes:
                raise SafetensorsError("%s: short read for tensor %r" % (path, name))
            if dt == "BF16" and bf16 != "raw":
                arr = bf16_bits_to_f32(arr)
            out[name] = arr
    return out


def save(path, tensors, dtype=None, dtypes=None, metadata=None):
    """Write {name: array} to path.

    dtype:  if given ("F32"/"F16"/"BF16"), every floating tensor is stored as that dtype.
    dtypes: per-tensor override {name: "F16"|...}.
    Integer tensors are stored with their own dtype.  Tensors are laid out contiguously in
    sorted-name order; the JSON header is space-padded so the data section starts 8-aligned.
    """
    dtypes = dtypes or {}
    entries = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        want = dtypes.get(name)
        if want is None:
            if a.dtype.kind == "f" and dtype is not None:
                want = dtype.upper()
            else:
                want = _FROM_NP.get(a.dtype)
                if want is None:
                    raise SafetensorsError("tensor %r: unsupported numpy dtype %s" % (name, a.dtype))
        want = want.upper()
        if want == "BF16":
            data = f32_to_bf16_bits(a)
        elif want in _NP:
            data = np.ascontiguousarray(a.astype(_NP[want]))
        else:
            raise SafetensorsError("tensor %r: unsupported dtype %s" % (name, want))
        raw = data.tobytes()
        entries.append((name, want, list(a.shape), offset, offset + len(raw), raw))
        offset += len(raw)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dt, shape, b, e, _ in entries:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [b, e]}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)  # pad so the data section starts 8-aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for e in entries:
            f.write(e[5])
    os.replace(tmp, path)
