"""Load diffusers' scheduler modules alone, without importing the diffusers package.

    import diffusers_sched
    sched = diffusers_sched.load("/tmp/diffusers-main/src")      # or $DIFFUSERS_SRC
    s = sched.DPMSolverMultistepScheduler.from_config({...}, solver_order=3)

Recent diffusers (main) does not import on Debian's torch 1.13, but its scheduler files need only
torch and numpy plus four helpers from the package (ConfigMixin/register_to_config, BaseOutput,
randn_tensor, deprecate). This module provides those helpers in memory and executes the real
scheduler files, so the reference numbers come from diffusers' own step code. Tooling only.
"""
import functools
import importlib
import inspect
import logging
import os
import re
import sys
import types

DEFAULT_SRC = "/tmp/diffusers-main/src"

CLASSES = {
    "DDPMScheduler": "scheduling_ddpm",
    "DDIMScheduler": "scheduling_ddim",
    "PNDMScheduler": "scheduling_pndm",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "scheduling_dpmsolver_singlestep",
    "UniPCMultistepScheduler": "scheduling_unipc_multistep",
    "DEISMultistepScheduler": "scheduling_deis_multistep",
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "HeunDiscreteScheduler": "scheduling_heun_discrete",
}


class FrozenDict(dict):
    """diffusers' config object: a dict whose keys are also attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key)

    def __setattr__(self, key, value):
        self[key] = value


class ConfigMixin:
    config_name = "scheduler_config.json"

    def register_to_config(self, **kwargs):
        if "_internal_dict" not in self.__dict__:
            self.__dict__["_internal_dict"] = FrozenDict()
        self.__dict__["_internal_dict"].update(kwargs)

    @property
    def config(self):
        return self.__dict__["_internal_dict"]

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Keys of the class's __init__ are taken from config, kwargs override; others ignored."""
        params = inspect.signature(cls.__init__).parameters
        init = {k: v for k, v in dict(config or {}).items() if k in params and k != "self"}
        for k, v in kwargs.items():
            if k not in params:
                raise TypeError("%s has no config key %r" % (cls.__name__, k))
            init[k] = v
        return cls(**init)


def register_to_config(init):
    """Records every __init__ argument (defaults included) in self.config before __init__ runs."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        params = list(inspect.signature(init).parameters.values())[1:]
        cfg = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        for p, a in zip(params, args):
            cfg[p.name] = a
        cfg.update(kwargs)
        ConfigMixin.register_to_config(self, **cfg)
        init(self, *args, **kwargs)

    return inner


class BaseOutput:
    def __getitem__(self, i):
        return list(self.__dict__.values())[i]


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    import torch

    return torch.randn(shape, generator=generator, dtype=dtype)


def deprecate(*args, **kwargs):
    pass


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load(src=None):
    """Returns a namespace with the classes of CLASSES, loaded from diffusers source `src`."""
    src = os.path.abspath(src or os.environ.get("DIFFUSERS_SRC") or DEFAULT_SRC)
    if os.path.isdir(os.path.join(src, "src", "diffusers")):
        src = os.path.join(src, "src")
    sdir = os.path.join(src, "diffusers", "schedulers")
    if not os.path.isfile(os.path.join(sdir, "scheduling_ddim.py")):
        raise RuntimeError("no diffusers scheduler sources under %r (pass the 'src' directory of "
                           "a diffusers checkout)" % src)
    if "diffusers" in sys.modules and not getattr(sys.modules["diffusers"], "_denoised_stub", 0):
        raise RuntimeError("the real diffusers package is already imported")
    logging_mod = types.SimpleNamespace(get_logger=logging.getLogger)
    version = "unknown"
    with open(os.path.join(src, "diffusers", "__init__.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
        if m:
            version = m.group(1)
    pkg = _module("diffusers", _denoised_stub=1, __version__=version)
    pkg.__path__ = []
    _module("diffusers.configuration_utils", ConfigMixin=ConfigMixin,
            register_to_config=register_to_config, FrozenDict=FrozenDict)
    utils = _module("diffusers.utils", BaseOutput=BaseOutput, PushToHubMixin=object,
                    deprecate=deprecate, is_scipy_available=lambda: False, logging=logging_mod)
    utils.__path__ = []
    _module("diffusers.utils.torch_utils", randn_tensor=randn_tensor)
    schedulers = _module("diffusers.schedulers")
    schedulers.__path__ = [sdir]
    if "huggingface_hub.utils" not in sys.modules:
        try:
            from huggingface_hub.utils import validate_hf_hub_args  # noqa: F401
        except ImportError:
            _module("huggingface_hub").__path__ = []
            _module("huggingface_hub.utils", validate_hf_hub_args=lambda f: f)
    out = types.SimpleNamespace(src=src, version=version)
    for cls, mod in CLASSES.items():
        m = importlib.import_module("diffusers.schedulers." + mod)
        setattr(out, cls, getattr(m, cls))
        setattr(out, cls + "_module", m)
    return out


if __name__ == "__main__":
    ns = load(sys.argv[1] if len(sys.argv) > 1 else None)
    print("loaded", ", ".join(CLASSES), "from", ns.src)
