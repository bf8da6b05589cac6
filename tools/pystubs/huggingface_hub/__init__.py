"""Offline stub of huggingface_hub (denoised tools/pystubs); only names diffusers imports."""
__version__ = "0.16.4+denoised.stub"


class HubUnavailableError(RuntimeError):
    pass


def _unavailable(name):
    def fn(*args, **kwargs):
        raise HubUnavailableError(
            "huggingface_hub.%s is not available: this is an offline stub (tools/pystubs). "
            "Load models from a local directory instead." % name)
    fn.__name__ = name
    return fn


for _n in ("create_repo", "hf_hub_download", "model_info", "snapshot_download", "cached_download",
           "upload_folder", "whoami", "create_commit", "hf_hub_url", "HfApi"):
    globals()[_n] = _unavailable(_n)


class HfFolder:
    @staticmethod
    def get_token():
        return None


class ModelCardData:
    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)


class ModelCard:
    def __init__(self, *args, **kwargs):
        raise HubUnavailableError("huggingface_hub.ModelCard is not available (offline stub)")

    @classmethod
    def load(cls, *args, **kwargs):
        raise HubUnavailableError("huggingface_hub.ModelCard is not available (offline stub)")

    @classmethod
    def from_template(cls, *args, **kwargs):
        raise HubUnavailableError("huggingface_hub.ModelCard is not available (offline stub)")
