#!/usr/bin/env python3
"""Converts the USF authors' released solver schedules (thu-nics/USF, codebases/*/solver_schedules/
*.pth) into our schedule format (README "USF", "format": "denoised-usf-schedule"), without ever
unpickling them.

    python3 tools/usf_convert.py SCHEDULE.pth [--time t|linear-vp|edm] [--statistics NAME]
        [--average-x0 average_x0.pth] [--drop-skip-coefficients] [-o OUT.json]

A .pth file is a zip holding a pickle (data.pkl) and raw tensor storages (data/N). The pickle is
read by a small interpreter of its opcodes (pickletools decodes them; nothing is imported or
called): it builds only dicts, lists, tuples, strings, numbers, booleans and None, and accepts
only these globals, each replaced by an inert stand-in: collections.OrderedDict (an empty dict),
torch.*Storage (a reference to a data/N member), torch._utils._rebuild_tensor_v2 (a tensor read
from that member's bytes with the given offset, size and stride), and for the numpy scalars of
the latent-diffusion schedules numpy.dtype, numpy.core.multiarray.scalar (decoded with struct)
and _codecs.encode(text, "latin1") (protocol 2's bytes). Any other opcode, global or call is
refused with its byte offset.

The authors' decisions map to ours as follows. Timesteps are their sampler's time t, whose meaning
depends on the codebase's noise schedule: for the discrete-schedule models (latent_diffusion LSUN
and Stable Diffusion, imagenet256) it is t = (n + 1) / N, the engine's `"time": "t"` (--time t,
the default); score_sde's continuous linear VP (beta 0.1 to 20) and EDM's t = sigma are converted
to lambda (--time linear-vp / edm). Prediction types noise_prediction, data_prediction and
dpmsolver_v3_prediction become "noise", "data" and "v3" (the latter needs statistics computed for
the model the schedule is used with: --statistics NAME names the file beside the output).
"Difference_k" becomes "estimate": k and active_points "points"; relaxations beyond the first
derivative, which their code ignores, are dropped. Their correctors, "pseudo" and "implicit" alike,
never evaluate the model again in the released code, so both become our "pseudo". afs becomes
"first_step"; average_x0 needs the codebase's average_x0.pth (--average-x0). skip_coefficients
are kept (our executor refuses them unless all 1) or dropped with --drop-skip-coefficients.
"""
import argparse
import array
import json
import math
import pickletools
import struct
import sys
import zipfile

STORAGES = {"FloatStorage": ("f", 4), "DoubleStorage": ("d", 8), "LongStorage": ("q", 8),
            "IntStorage": ("i", 4), "ShortStorage": ("h", 2), "CharStorage": ("b", 1),
            "ByteStorage": ("B", 1), "BoolStorage": ("?", 1)}


class Refused(Exception):
    pass


class Global:
    def __init__(self, module, name):
        self.module, self.name = module, name


class Storage:
    def __init__(self, kind, key):
        self.kind, self.key = kind, key


class Dtype:
    """numpy.dtype(code) as their pickles of numpy scalars carry it."""

    def __init__(self, code):
        self.code, self.order = code, "<"


NUMPY_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
               "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}


def numpy_scalar(args, pos):
    """numpy.core.multiarray.scalar(dtype, bytes): the number, decoded by struct."""
    if (len(args) != 2 or not isinstance(args[0], Dtype) or args[0].code not in NUMPY_CODES
            or not isinstance(args[1], bytes)):
        raise Refused("numpy scalar at byte %d is not a plain number" % pos)
    order = ">" if args[0].order == ">" else "<"
    fmt = order + NUMPY_CODES[args[0].code]
    if struct.calcsize(fmt) != len(args[1]):
        raise Refused("numpy scalar at byte %d has %d bytes" % (pos, len(args[1])))
    v = struct.unpack(fmt, args[1])[0]
    return float(v) if args[0].code[0] == "f" else v


class Tensor:
    """A tensor as flat row-major values and a shape."""

    def __init__(self, values, shape):
        self.values, self.shape = values, shape


def read_storage(zf, prefix, st, little):
    code, size = STORAGES[st.kind]
    raw = zf.read(prefix + "data/" + st.key)
    a = array.array(code)
    if len(raw) % size:
        raise Refused("storage %s has %d bytes, not a multiple of %d" % (st.key, len(raw), size))
    a.frombytes(raw)
    if little != (sys.byteorder == "little") and size > 1:
        a.byteswap()
    return a


def rebuild_tensor(zf, prefix, little, args):
    if len(args) < 4 or not isinstance(args[0], Storage):
        raise Refused("_rebuild_tensor_v2 with unexpected arguments")
    st, offset, size, stride = args[0], args[1], tuple(args[2]), tuple(args[3])
    if not all(isinstance(v, int) and v >= 0 for v in (offset,) + size + stride):
        raise Refused("tensor offset, size and stride must be non-negative integers")
    data = read_storage(zf, prefix, st, little)
    n = 1
    for s in size:
        n *= s
    values = []
    for flat in range(n):  # row-major walk over the index space
        rem, pos = flat, offset
        for dim in range(len(size) - 1, -1, -1):
            pos += (rem % size[dim]) * stride[dim]
            rem //= size[dim]
        if pos >= len(data):
            raise Refused("tensor reads past its storage")
        values.append(data[pos])
    return Tensor(values, size)


def load_pth(path):
    """The object in a torch zip file, by the restricted opcode interpreter."""
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise Refused("%s: expected one data.pkl in the zip (legacy torch files are not read)"
                      % path)
    prefix = pkl[0][: -len("data.pkl")]
    little = True
    if prefix + "byteorder" in zf.namelist():
        little = zf.read(prefix + "byteorder").decode().strip() == "little"
    stack, marks, memo = [], [], {}

    def pop_mark():
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, pos in pickletools.genops(zf.read(pkl[0])):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise Refused("malformed pickle (stack at STOP)")
            return stack[0]
        if name == "MARK":
            marks.append(len(stack))
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT",
                      "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT",
                      "FLOAT"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if not isinstance(stack[-1], list):
                raise Refused("APPEND to a non-list at byte %d" % pos)
            stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else pop_mark()
            if name == "SETITEM":
                del stack[-2:]
            d = stack[-1]
            if not isinstance(d, dict):
                raise Refused("SETITEM on a non-dict at byte %d" % pos)
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                    raise Refused("dict key of type %s at byte %d" % (type(k).__name__, pos))
                d[k] = v
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, attr = arg.split(" ", 1)
            else:
                attr, module = stack.pop(), stack.pop()
            ok = ((module, attr) in (("collections", "OrderedDict"),
                                     ("torch._utils", "_rebuild_tensor_v2"),
                                     ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"),
                                     ("_codecs", "encode"))
                  or (module == "torch" and attr in STORAGES))
            if not ok:
                raise Refused("global %s.%s at byte %d is not one a schedule needs"
                              % (module, attr, pos))
            stack.append(Global(module, attr))
        elif name == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], Dtype) or not isinstance(state, tuple) or len(state) < 2:
                raise Refused("BUILD at byte %d on something other than a numpy dtype" % pos)
            stack[-1].order = state[1]
        elif name == "BINPERSID":
            pid = stack.pop()
            if (not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage"
                    or not isinstance(pid[1], Global) or pid[1].name not in STORAGES
                    or not isinstance(pid[2], str) or "/" in pid[2] or ".." in pid[2]):
                raise Refused("persistent id at byte %d is not a tensor storage" % pos)
            stack.append(Storage(pid[1].name, pid[2]))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, Global) or not isinstance(args, tuple):
                raise Refused("REDUCE of a non-global at byte %d" % pos)
            if fn.name == "OrderedDict" and args == ():
                stack.append({})
            elif fn.name == "_rebuild_tensor_v2":
                stack.append(rebuild_tensor(zf, prefix, little, args))
            elif fn.name == "dtype" and len(args) == 3 and isinstance(args[0], str):
                stack.append(Dtype(args[0]))
            elif fn.name == "scalar":
                stack.append(numpy_scalar(args, pos))
            elif (fn.name == "encode" and len(args) == 2 and isinstance(args[0], str)
                  and args[1] == "latin1"):
                stack.append(args[0].encode("latin1"))  # how pickles spell bytes in protocol 2
            else:
                raise Refused("call of %s.%s at byte %d" % (fn.module, fn.name, pos))
        else:
            raise Refused("opcode %s at byte %d is not allowed" % (name, pos))
    raise Refused("pickle without STOP")


def lam_linear_vp(t, b0=0.1, b1=20.0):
    log_alpha = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
    return log_alpha - 0.5 * math.log(-math.expm1(2 * log_alpha))


def convert_derivs(ders, order, where):
    out = []
    if ders is None:
        return None
    if not isinstance(ders, list) or len(ders) < order - 1:
        raise Refused("%s: expected %d derivative entries" % (where, order - 1))
    for i, dv in enumerate(ders[: order - 1]):
        est = dv.get("estimate")
        if not isinstance(est, str) or not est.startswith("Difference_"):
            raise Refused("%s[%d]: estimate %r is not Difference_k" % (where, i, est))
        o = {"estimate": int(est.split("_")[1])}
        if dv.get("active_points") is not None:
            o["points"] = [int(p) for p in dv["active_points"]]
        relax = dv.get("relaxation")
        if i == 0 and relax not in (None, "no_relaxation"):  # their code relaxes only the first
            o["relaxation"] = relax
            if relax == "linear":
                o["coefficient"] = float(dv.get("relaxation_coefficient", 0))
        out.append(o)
    return out


def convert(dec, args, source):
    need = ("timesteps", "orders", "prediction_types", "start_points", "derivative_types",
            "corrector_types")
    missing = [k for k in need if dec.get(k) is None]
    if missing:
        raise Refused("the schedule lacks %s (their defaults depend on sample()'s arguments)"
                      % ", ".join(missing))
    ts = dec["timesteps"]
    ts = ts.values if isinstance(ts, Tensor) else list(ts)
    n = len(ts) - 1
    for k in need[1:]:
        if len(dec[k]) != n:
            raise Refused("%s has %d entries for %d steps" % (k, len(dec[k]), n))
    if args.time == "t":
        times, unit = [float(t) for t in ts], "t"
    elif args.time == "linear-vp":
        times, unit = [lam_linear_vp(float(t)) for t in ts], "lambda"
    else:
        times, unit = [-math.log(float(t)) for t in ts], "lambda"
    pmap = {"noise_prediction": "noise", "data_prediction": "data",
            "dpmsolver_v3_prediction": "v3"}
    steps = []
    for k in range(n):
        where = "step %d" % k
        pt = dec["prediction_types"][k]
        if pt not in pmap:
            raise Refused("%s: prediction type %r" % (where, pt))
        order = int(dec["orders"][k])
        s = {"prediction": pmap[pt], "order": order, "start_point": int(dec["start_points"][k])}
        d = convert_derivs(dec["derivative_types"][k], order, where + " derivatives")
        if d:
            s["derivatives"] = d
        c = dec["corrector_types"][k]
        ctype = c.get("type") if isinstance(c, dict) else c
        if ctype in ("pseudo", "implicit"):
            corder = int(c["taylor_order"])
            s["corrector"] = {"type": "pseudo", "order": corder,
                              "start_point": int(c["start_point"])}
            cd = convert_derivs(c.get("derivative_type"), corder, where + " corrector")
            if cd:
                s["corrector"]["derivatives"] = cd
        elif ctype != "no_corrector":
            raise Refused("%s: corrector %r" % (where, c))
        steps.append(s)
    out = {"format": "denoised-usf-schedule", "version": 1, "time": unit, "timesteps": times,
           "steps": steps, "source": source}
    afs = dec.get("afs", "no_afs")
    if afs == "zero_x0":
        out["first_step"] = "zero_x0"
    elif afs == "average_x0":
        if not args.average_x0:
            raise Refused("the schedule starts from average_x0: give the codebase's "
                          "average_x0.pth with --average-x0")
        avg = load_pth(args.average_x0)
        if not isinstance(avg, Tensor):
            raise Refused("%s does not hold a tensor" % args.average_x0)
        out["first_step"] = "average_x0"
        out["average_x0"] = [float(v) for v in avg.values]
    elif afs != "no_afs":
        raise Refused("afs %r" % afs)
    sk = dec.get("skip_coefficients")
    if sk is not None and not args.drop_skip_coefficients:
        sk = sk.values if isinstance(sk, Tensor) else sk
        out["skip_coefficients"] = [float(v) for v in sk]
    if any(s["prediction"] == "v3" for s in steps):
        if not args.statistics:
            print("usf_convert: note: v3 steps need --statistics NAME (statistics computed for "
                  "your model with `denoised stats`) before the schedule runs", file=sys.stderr)
        else:
            out["statistics"] = args.statistics
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("schedule", help="the authors' .pth schedule")
    ap.add_argument("--time", choices=("t", "linear-vp", "edm"), default="t",
                    help="what their t means: discrete-schedule t (kept as t), score_sde's "
                         "continuous linear VP, or EDM's sigma (both written as lambda)")
    ap.add_argument("--statistics", help="v3 statistics file name beside the output")
    ap.add_argument("--average-x0", help="the codebase's average_x0.pth")
    ap.add_argument("--drop-skip-coefficients", action="store_true")
    ap.add_argument("-o", "--out", help="output JSON (default: stdout)")
    args = ap.parse_args()
    try:
        dec = load_pth(args.schedule)
        source = ("converted by tools/usf_convert.py from " + args.schedule.split("/")[-1]
                  + " (--time " + args.time + ")")
        # the latent-diffusion files hold [decisions, the search's score]
        if (isinstance(dec, list) and len(dec) == 2 and isinstance(dec[0], dict)
                and isinstance(dec[1], (int, float))):
            source += "; search score %g" % dec[1]
            dec = dec[0]
        if not isinstance(dec, dict):
            raise Refused("the pickle does not hold a dict of decisions")
        out = convert(dec, args, source)
    except (Refused, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        print("usf_convert: %s: %s" % (args.schedule, e), file=sys.stderr)
        return 1
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
