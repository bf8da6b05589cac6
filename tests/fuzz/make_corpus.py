#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/NAME/) from nothing but the
standard library: small valid examples of each format (and a few near misses), a few kilobytes
each. Run from anywhere; the files are committed, so this only needs rerunning when a format
changes."""
import base64
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "corpus")


def put(harness, name, data):
    d = os.path.join(OUT, harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def png(w, h, colour_type=2, depth=8, pixel=(200, 40, 90), text=None, interlace=0):
    """A PNG of one colour; colour_type 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body) & 0xffffffff))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    if colour_type == 3:
        sample = [1]
    else:
        sample = list(pixel[:channels]) + [255] * max(0, channels - len(pixel))
    if depth == 16:
        row = b"".join(struct.pack(">H", v * 257) for v in sample) * w
    elif depth < 8:
        row = bytes((w * depth + 7) // 8)
    else:
        row = bytes(sample) * w
    raw = b"".join(b"\0" + row for _ in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth,
                                                             colour_type, 0, 0, interlace))
    if colour_type == 3:
        out += chunk(b"PLTE", bytes([0, 0, 0, 250, 10, 10])) + chunk(b"tRNS", b"\x00")
    for key, value in (text or []):
        if key == "denoised":
            out += chunk(b"iTXt", key.encode() + b"\0\0\0\0\0" + value.encode())
        else:
            out += chunk(b"tEXt", key.encode() + b"\0" + value.encode("latin-1"))
    out += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return out


def npy(shape, values, descr="<f4", version=1):
    fmt = {"<f4": "<f", "<f8": "<d", "<i4": "<i", "<i8": "<q", "|u1": "B", "|i1": "b"}[descr]
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr, "".join("%d, " % n for n in shape) if len(shape) != 1 else "%d," % shape[0])
    pre = 10 if version == 1 else 12
    header += " " * ((64 - (pre + len(header) + 1) % 64) % 64) + "\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    body = b"".join(struct.pack(fmt, v) for v in values)
    return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode() + body


def safetensors(tensors, metadata=None):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def boundary(shape, with_mid=True, solver=True):
    dim = shape[0] * shape[1] * shape[2]
    b = {"format": "denoised-boundary", "version": 1, "model": "models/glyphs32",
         "attribute": "polarity", "step": 3, "timestep": 700.0, "shape": shape,
         "normal": [(1.0 if i == 0 else 0.0) for i in range(dim)], "offset": -0.25,
         "scale": 1.5, "mean_positive": 1.2, "mean_negative": -1.1, "train_accuracy": 1.0,
         "test_accuracy": -1, "n_train": 10, "n_test": 0, "radius": 1.0}
    if solver:
        b["solver"] = {"name": "ddim", "steps": 10,
                       "config": {"clip_sample": True, "timestep_spacing": "leading"}}
    if with_mid:
        b["mid"] = {"shape": [2, 1, 2], "normal": [0.6, 0.8, 0.0, 0.0], "offset": 0.1,
                    "scale": 2.0}
    return b


def main():
    # base64: texts as jobs carry them
    put("base64", "png", base64.b64encode(png(2, 2)))
    put("base64", "pad1", "aGVsbG8gd29ybGQ=")
    put("base64", "pad2", "aGVsbG8gd29ybGQhIQ==")
    put("base64", "bad", "aGVs*G8=")

    # npy: the dtypes and versions the reader takes, and near misses
    put("npy", "f4_2x3", npy((2, 3), [0.5, -1, 2, 3.25, 1e-3, 7]))
    put("npy", "f8_4", npy((4,), [1, 2, 3, 4], "<f8"))
    put("npy", "i8_3", npy((3,), [999, 500, 1], "<i8"))
    put("npy", "i4_scalar", npy((), [42], "<i4"))
    put("npy", "u1_v2", npy((2, 2), [0, 1, 2, 255], "|u1", version=2))
    put("npy", "empty_0x3", npy((0, 3), []))
    put("npy", "nan", npy((2,), [float("nan"), float("inf")]))
    put("npy", "bad_dtype", npy((2,), [1, 2]).replace(b"<f4", b"<f5"))
    with open(os.path.join(ROOT, "tests/fixtures/sched/linear_37_betas.npy"), "rb") as f:
        put("npy", "fixture_betas", f.read())

    # npy_shaped: first byte picks the shape (fuzz_npy_shaped.c's table)
    put("npy_shaped", "x_T", b"\0" + npy((1, 3, 32, 32), [0.01 * (i % 17) for i in range(3072)]))
    put("npy_shaped", "vec4", b"\2" + npy((4,), [1, 2, 3, 4]))
    put("npy_shaped", "wrong_shape", b"\2" + npy((2, 2), [1, 2, 3, 4]))
    put("npy_shaped", "empty", b"\3" + npy((0, 3), []))
    put("npy_shaped", "nan", b"\2" + npy((4,), [1, float("nan"), 3, 4]))

    # png: colour types, depths, interlacing and the text chunks --replay reads
    put("png", "rgb32", png(32, 32, text=[("parameters", "A\nSteps: 20, Seed: 1"),
                                          ("denoised", '{"steps": 20}')]))
    put("png", "gray_1bit", png(32, 32, colour_type=0, depth=1))
    put("png", "palette_trns", png(8, 8, colour_type=3))
    put("png", "rgba16", png(4, 4, colour_type=6, depth=16))
    put("png", "graya_interlaced", png(9, 7, colour_type=4, interlace=1))
    put("png", "too_big", png(300, 1, colour_type=0))

    # safetensors: every dtype the reader knows, one it does not, metadata
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    put("safetensors", "f32", safetensors({"w": ("F32", [2, 2], f32)}))
    put("safetensors", "mixed", safetensors({
        "a": ("F16", [3], struct.pack("<3e", 1.0, -2.5, 65504.0)),
        "b": ("BF16", [2], b"\x80\x3f\x00\xc0"),
        "c": ("F64", [1], struct.pack("<d", 0.1)),
        "d": ("I64", [2], struct.pack("<2q", 7, -7)),
        "e": ("I32", [1, 1], struct.pack("<i", 5)),
        "f": ("U8", [2], b"\1\2")}, metadata={"format": "pt"}))
    put("safetensors", "empty_tensor", safetensors({"z": ("F32", [0, 4], b"")}))
    put("safetensors", "truncated", safetensors({"w": ("F32", [2, 2], f32)})[:-3])

    # config: the example file, a small one, a bad one
    with open(os.path.join(ROOT, "config/denoised.json"), "rb") as f:
        put("config", "example", f.read())
    put("config", "small", json.dumps({"listen": "[::1]:0", "workers": 1, "models": {
        "default": "models/glyphs32"}, "cors_origins": ["http://localhost:3000"],
        "log_level": "debug"}))
    put("config", "env_and_flags", "DENOISED_WORKERS=1\nDENOISED_MODELS=a=/x,b=/y\n"
        "listen=127.0.0.1:0\nmodel=x=/tmp\ncors-origin=http://a.example\nmax_steps=50\n")
    put("config", "bad", '{"workers": "two", "listen": "nowhere"}')

    # boundary files
    put("boundary", "x_and_h", json.dumps(boundary([1, 2, 2])))
    put("boundary", "x_only", json.dumps(boundary([2, 1, 1], with_mid=False)))
    put("boundary", "no_solver", json.dumps(boundary([1, 1, 3], solver=False)))
    put("boundary", "bad_step", json.dumps(dict(boundary([1, 2, 2]), step=12)))

    # scheduler_config.json: the models' own, and diffusers-style ones with their quirks
    for m in ("glyphs32", "shapes-gmm"):
        with open(os.path.join(ROOT, "models", m, "scheduler_config.json"), "rb") as f:
            put("scheduler_config", m, f.read())
    put("scheduler_config", "dpm_infinity",
        '{"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.30.0",'
        ' "algorithm_type": "dpmsolver++", "solver_order": 2, "lambda_min_clipped": -Infinity,'
        ' "use_karras_sigmas": true, "beta_schedule": "scaled_linear", "beta_start": 0.00085,'
        ' "beta_end": 0.012, "num_train_timesteps": 1000, "timestep_spacing": "trailing"}')
    put("scheduler_config", "trained_betas", json.dumps({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 4,
        "trained_betas": [0.1, 0.2, 0.3, 0.4], "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "set_alpha_to_one": False, "steps_offset": 1}))
    put("scheduler_config", "unipc", json.dumps({
        "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "disable_corrector": [0],
        "beta_schedule": "squaredcos_cap_v2", "thresholding": True,
        "dynamic_thresholding_ratio": 0.99, "sample_max_value": 1.5}))

    # job bodies (POST /v1/jobs)
    img = base64.b64encode(png(32, 32)).decode()
    mask = base64.b64encode(png(32, 32, colour_type=0, pixel=(255,))).decode()
    jobs = {
        "plain": {"class_label": 2, "seed": 7, "scheduler": {"name": "ddim", "steps": 10}},
        "options": {"class_label": "A", "batch_size": 2, "scheduler": {
            "name": "dpm++2m", "steps": 20, "options": {"use_karras_sigmas": True,
                                                        "final_sigmas_type": "zero"}},
            "preview": {"every": 5}, "first_image": 3},
        "guidance": {"class_label": 1, "guidance": {"scale": 3, "null_class": 36,
                                                    "thresholding": {"ratio": 0.99, "cap": 2}}},
        "shapes": {"model": "shapes", "class_label": "ring", "scheduler": "euler-a",
                   "width": 32, "height": 32, "seed": None},
        "img2img": {"class_label": 1, "input_image": img,
                    "edit": {"type": "img2img", "strength": 0.6}},
        "inpaint": {"class_label": 1, "input_image": "data:image/png;base64," + img,
                    "mask": mask, "edit": {"type": "inpaint"}},
        "invert_ddpm": {"class_label": 1, "input_image": img, "scheduler": {"steps": 10},
                        "edit": {"type": "invert_ddpm", "source_class": 2, "skip": 3,
                                 "shift": [2, -1], "colour": [0.3, -0.2, 0.1],
                                 "colour_from": 4, "source_guidance": 1.5}},
        "invert_ddim_noise": {"class_label": 1, "scheduler": {"name": "ddim", "steps": 5},
                              "edit": {"type": "invert_ddim", "noise": base64.b64encode(
                                  npy((1, 3, 32, 32), [0.0] * 3072)).decode()}},
        "boundary": {"class_label": 3, "scheduler": {"name": "ddim", "steps": 10},
                     "edit": {"type": "boundary", "strength": 2, "eta": 0.5, "space": "x",
                              "boundary": dict(boundary([3, 32, 32], with_mid=False))}},
    }
    for name, body in jobs.items():
        put("job", name, json.dumps(body))
    put("job", "trailing_comma", '{"class_label": 1,}')

    # txt2img bodies (AUTOMATIC1111)
    t2i = {
        "plain": {"prompt": "ring", "steps": 20, "seed": 5, "sampler_name": "Euler a"},
        "full": {"prompt": "G", "negative_prompt": "", "steps": 12, "cfg_scale": 4,
                 "width": 32, "height": 32, "batch_size": 2, "n_iter": 1,
                 "sampler_name": "DPM++ 2M Karras", "eta": 0.5, "seed": -1,
                 "override_settings": {"sd_model_checkpoint": "default"},
                 "styles": [], "send_images": True},
        "scheduler": {"prompt": "disc", "sampler_index": "k_euler_a", "scheduler": "Karras",
                      "override_settings": {"sd_model_checkpoint": "shapes"}},
    }
    for name, body in t2i.items():
        put("txt2img", name, json.dumps(body))
    put("txt2img", "empty", "")

    # DPM-Solver-v3 statistics (fuzz_solver_data.c): the JSON header, a NUL, then the .npy it
    # names ("s.npy"); l, s, b of shape [3, K + 1, C, H, W], broadcast when C = H = W = 1
    def v3(K, shape, values, **over):
        h = dict({"format": "denoised-v3-stats", "version": 1, "lambda_T": -4.5,
                  "lambda_0": 4.0, "grid": K, "shape": shape, "arrays": "s.npy"}, **over)
        n = 3 * (K + 1) * shape[0] * shape[1] * shape[2]
        return json.dumps(h).encode() + b"\0" + npy([3, K + 1] + shape, values(n))
    put("solver_data", "flat", v3(12, [1, 1, 1], lambda n: [1.0] * (n // 3) + [0.0] * (2 * n // 3)))
    put("solver_data", "varied", v3(16, [1, 1, 1], lambda n: [0.1 * ((i * 7) % 5 - 2)
                                                            for i in range(n)]))
    put("solver_data", "per_pixel", v3(8, [3, 8, 8], lambda n: [0.01 * (i % 13)
                                                               for i in range(n)]))
    put("solver_data", "wrong_shape", v3(12, [3, 4, 4], lambda n: [0.0] * n))
    put("solver_data", "outside_schedule", v3(2, [1, 1, 1], lambda n: [0.0] * n,
                                               lambda_T=-40.0))
    put("solver_data", "header_only", json.dumps({"format": "denoised-v3-stats", "version": 1}))

    # http: the first byte picks the method (fuzz_http.c: GET HEAD DELETE OPTIONS POST PUT), the
    # rest is the request target
    targets = {
        "healthz": b"\0/healthz", "readyz": b"\1/readyz", "metrics": b"\0/metrics",
        "models": b"\0/v1/models", "list": b"\0/v1/jobs?limit=5&state=queued",
        "list_cursor": b"\0/v1/jobs/?cursor=0123456789abcdef&limit=100",
        "list_bad": b"\0/v1/jobs?limit=%205", "job": b"\0/v1/jobs/0123456789abcdef",
        "cancel": b"\2/v1/jobs/0123456789abcdef",
        "image": b"\0/v1/jobs/0123456789abcdef/images/0",
        "image_plus": b"\0/v1/jobs/0123456789abcdef/images/%2B0",
        "events": b"\0/v1/jobs/0123456789abcdef/events?access_token=k",
        "noise": b"\0/v1/jobs/0123456789abcdef/noise.npy", "post_job": b"\4/v1/jobs",
        "txt2img": b"\4/sdapi/v1/txt2img", "progress": b"\0/sdapi/v1/progress",
        "options": b"\3/v1/jobs", "escapes": b"\0/v1/%6aobs?state=%00queued",
    }
    for name, t in targets.items():
        put("http", name, t)


if __name__ == "__main__":
    main()
