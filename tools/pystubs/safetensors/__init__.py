"""Stub of the safetensors package (denoised tools/pystubs); see safetensors/torch.py."""
__version__ = "0.3.1+denoised.stub"


class SafetensorError(Exception):
    pass


def safe_open(*args, **kwargs):
    raise SafetensorError("safetensors.safe_open is not implemented by the denoised stub")


def __getattr__(name):  # `import safetensors; safetensors.torch.load_file(...)` must work
    if name == "torch":
        import importlib
        return importlib.import_module(".torch", __name__)
    raise AttributeError(name)
