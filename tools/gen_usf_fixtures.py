#!/usr/bin/env python3
"""Reference outputs for tests/test_usf.c: the USF authors' executor (thu-nics/USF @5b89ef5,
uni_sampler.py, class uni_sampler) driven by the exact GaussianMixtureDenoiser
(tests/fixtures/gmm/mix3) on decision sets that together cover every option of the framework,
from stored initial noise.

    git -C MIRROR show 5b89ef5:uni_sampler.py > /tmp/usf_uni_sampler.py
    /usr/bin/python3 tools/gen_usf_fixtures.py --authors /tmp/usf_uni_sampler.py \\
        [--models tests/fixtures/gmm] [--out tests/fixtures/usf]

The authors' file is imported from where it lies (never copied into this repository); its
`.cuda()` calls are made no-ops so it runs on the CPU, and torch's default dtype is float64 so
that their Taylor systems and our lambdas agree to rounding. As for the v3 fixtures
(tools/gen_v3_fixtures.py, whose model, schedule and statistics maker this reuses), time is
t = exp(-lambda), so every lambda reaches their code exactly and the model call sees the
engine's own lambda-to-timestep map.

Each case is written twice: as our schedule file (<out>/<case>.json, what `--scheduler usf
--solver-data` reads) and, translated, as the decisions dict their `sample` takes; the test runs
ours on <case>_init.npy and compares with <case>_out.npy. The decisions dict is also saved the
way the authors ship schedules (<case>.pth, torch.save; average_x0.pth), and refused.pth is a
file whose pickle would call os.system: tools/usf_convert.py must turn the former into schedules
that reproduce <case>_out.npy and refuse the latter. Also writes <out>/stats.json + .npy (the v3
statistics of the v3-type steps) and <out>/cases.json.
"""
import argparse
import copy
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_v3_fixtures as v3fix  # noqa: E402

BATCH = 2
LAM_T, LAM_0 = v3fix.LAM_T, v3fix.LAM_0


def lams(n, lo=-3.2, hi=3.6, bend=1.3):
    """n + 1 increasing lambdas inside the statistics range, not uniform (bend != 1)."""
    u = np.linspace(0, 1, n + 1) ** bend
    return [float(lo + (hi - lo) * v) for v in u]


def d(est=None, points=None, relax=None, coef=None):
    out = {}
    if est is not None:
        out["estimate"] = est
    if points is not None:
        out["points"] = points
    if relax is not None:
        out["relaxation"] = relax
    if coef is not None:
        out["coefficient"] = coef
    return out


def step(pred, order, start=-1, ders=None, corr=None):
    s = {"prediction": pred, "order": order, "start_point": start}
    if ders is not None:
        s["derivatives"] = ders
    if corr is not None:
        s["corrector"] = corr
    return s


def corr(kind, order, start=-2, ders=None):
    c = {"type": kind, "order": order, "start_point": start}
    if ders is not None:
        c["derivatives"] = ders
    return c


# Each case: (name, first_step, steps). The authors' corrector type is "implicit" in
# data_relaxed_corr (their code runs it as "pseudo"). Together they cover the three prediction types, orders
# 1-4, start points -1/-2/-3, default and explicit points, estimates beyond the order, every
# relaxation, pseudo correctors (one on the last step), and the three first steps.
CASES = [
    ("noise_multistep", "model",
     [step("noise", 1), step("noise", 2), step("noise", 3), step("noise", 3), step("noise", 2)]),
    ("data_relaxed_corr", "zero_x0",
     [step("data", 1, corr=corr("pseudo", 2)),
      step("data", 2, ders=[d(1, [-2], "linear", 0.37)], corr=corr("pseudo", 2)),
      step("data", 3, ders=[d(2, None, "dpmsolver-2"), d(2)], corr=corr("pseudo", 3)),
      step("data", 2, ders=[d(1, None, "unipc-bh1")]),
      step("data", 2, ders=[d(2, [-2, -3], "0.5exp")], corr=corr("pseudo", 2))]),
    ("v3_corr", "model",
     [step("v3", 1), step("v3", 2, ders=[d(1, None, "linear", -0.21)], corr=corr("pseudo", 2)),
      step("v3", 3, corr=corr("pseudo", 3, -2, [d(2, [-1, -3]), d(2, [-1, -3])])),
      step("v3", 3, ders=[d(2, [-3, -2], "unipc-bh2"), d(2, [-3, -2])]),
      step("v3", 2, ders=[d(1, None, "-0.5exp")])]),
    ("mixed_skipback_avg", "average_x0",
     [step("v3", 1), step("v3", 1), step("data", 2, start=-2, ders=[d(1, [-1])]),
      step("noise", 3, ders=[d(2, [-2, -3], "linear", 0.05), d(2, [-2, -3])]),
      step("data", 4, start=-1, ders=[d(3), d(3), d(3)], corr=corr("pseudo", 2, -3, [d(1)])),
      step("noise", 2, start=-3, ders=[d(3, [-1, -2, -4], "dpmsolver-2")])]),
    ("order4_lastcorr", "model",
     [step("noise", 1), step("data", 2), step("data", 3), step("v3", 4),
      step("noise", 4, ders=[d(4, None, "unipc-bh1"), d(3), d(3)]),
      step("data", 2, corr=corr("pseudo", 4, -2, [d(3), d(3), d(3)]))]),
]


def decisions(case_steps, lam, first, their_corr):
    """Our schedule's decisions as the authors' decisions dict (the converter's inverse); their
    corrector type their_corr ("pseudo" or "implicit", the same in their code) for ours."""
    pmap = {"noise": "noise_prediction", "data": "data_prediction",
            "v3": "dpmsolver_v3_prediction"}

    def ders(u):
        out = []
        for dv in u.get("derivatives", [{}] * (u["order"] - 1)):
            out.append({"estimate": "Difference_%d" % dv.get("estimate", u["order"] - 1),
                        "active_points": dv.get("points"),
                        "relaxation": dv.get("relaxation"),
                        "relaxation_coefficient": dv.get("coefficient", 0)})
        return out

    dec = {"timesteps": torch.tensor([math.exp(-v) for v in lam], dtype=torch.float64),
           "orders": [s["order"] for s in case_steps],
           "prediction_types": [pmap[s["prediction"]] for s in case_steps],
           "start_points": [s.get("start_point", -1) for s in case_steps],
           "derivative_types": [ders(s) for s in case_steps],
           "corrector_types": [], "afs": "no_afs" if first == "model" else first}
    for s in case_steps:
        c = s.get("corrector")
        if c is None:
            dec["corrector_types"].append({"type": "no_corrector"})
        else:
            dec["corrector_types"].append({"type": their_corr, "start_point": c["start_point"],
                                           "taylor_order": c["order"], "derivative_type": ders(c)})
    return dec


def save_pth(dec, name, out):
    """The decisions as the authors ship schedules (torch.save), for tools/usf_convert.py: the
    mixed case as the latent-diffusion files are, [decisions, score] with numpy scalars."""
    if name == "mixed_skipback_avg":
        dec = copy.deepcopy(dec)
        for ders in dec["derivative_types"]:
            for dv in ders:
                dv["relaxation_coefficient"] = np.float64(dv["relaxation_coefficient"])
        dec = [dec, np.float64(4.25)]
    torch.save(dec, os.path.join(out, name + ".pth"))


def write_refused(path):
    """A .pth whose pickle would call os.system: the converter must refuse it, not run it."""
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("refused/data.pkl", evil)
        z.writestr("refused/version", "3\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--authors", required=True, help="path of the authors' uni_sampler.py")
    ap.add_argument("--models", default="tests/fixtures/gmm")
    ap.add_argument("--out", default="tests/fixtures/usf")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    usf = v3fix.import_authors(args.authors, "authors_usf")
    mdir, shape = v3fix.mix3(args.models)
    os.makedirs(args.out, exist_ok=True)
    stats = v3fix.make_stats(shape)
    np.save(os.path.join(args.out, "stats.npy"), stats)
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump({"format": "denoised-v3-stats", "version": 1, "lambda_T": LAM_T,
                   "lambda_0": LAM_0, "grid": v3fix.K, "shape": list(shape),
                   "arrays": "stats.npy"}, f, indent=1)
    # their loader reads l.npz / sb.npz from a directory and average_x0 from a torch file
    tmp = os.path.join(args.out, "_authors_tmp")
    os.makedirs(tmp, exist_ok=True)
    np.savez(os.path.join(tmp, "l.npz"), l=stats[0])
    np.savez(os.path.join(tmp, "sb.npz"), s=stats[1], b=stats[2])
    c, h, w = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2]),
                          indexing="ij")
    avg = (0.3 * np.sin(0.9 * c + 0.4 * h) * np.cos(0.3 * w)).astype(np.float32)
    torch.save(torch.from_numpy(avg[None].astype(np.float64)), os.path.join(tmp, "avg.pth"))

    gmm = v3fix.Gmm(mdir)
    ns = v3fix.SigmaTimeVP()

    def model_fn(x, t):
        lam = -math.log(float(t[0]))
        abar = 1 / (1 + math.exp(-2 * lam))
        return torch.from_numpy(gmm.eps(x.numpy().astype(np.float64), abar))

    sampler = usf.uni_sampler(model_fn, ns, statistics_dir=tmp,
                              dpmsolver_v3_t_start=math.exp(-LAM_T),
                              dpmsolver_v3_t_end=math.exp(-LAM_0),
                              average_x0_dir=os.path.join(tmp, "avg.pth"))
    rng = np.random.default_rng(20261206)
    cases = []
    for name, first, case_steps in CASES:
        lam = lams(len(case_steps))
        init = rng.standard_normal((BATCH,) + shape).astype(np.float32)
        calls = [0]

        def counted(x, t):
            calls[0] += 1
            return model_fn(x, t)

        sampler.model = lambda x, t: counted(x, t.expand((x.shape[0])))
        dec = decisions(case_steps, lam, first,
                        "implicit" if name == "data_relaxed_corr" else "pseudo")
        x = sampler.sample(torch.from_numpy(init.astype(np.float64)), dec)
        save_pth(dec, name, args.out)
        sched = {"format": "denoised-usf-schedule", "version": 1, "time": "lambda",
                 "timesteps": lam, "first_step": first, "steps": case_steps,
                 "source": "tools/gen_usf_fixtures.py case " + name}
        if first == "average_x0":
            sched["average_x0"] = [float(v) for v in avg.reshape(-1)]
        if any(s["prediction"] == "v3" for s in case_steps):
            sched["statistics"] = "stats.json"
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(sched, f, indent=1)
        np.save(os.path.join(args.out, name + "_init.npy"), init)
        np.save(os.path.join(args.out, name + "_out.npy"), x.numpy().astype(np.float32))
        cases.append({"name": name, "nfe": calls[0]})
    os.replace(os.path.join(tmp, "avg.pth"), os.path.join(args.out, "average_x0.pth"))
    write_refused(os.path.join(args.out, "refused.pth"))
    for f in ("l.npz", "sb.npz"):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"model": "gmm/mix3", "batch": BATCH, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
