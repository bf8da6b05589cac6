"""Offline stub of huggingface_hub.utils (denoised tools/pystubs)."""
import importlib.util

from requests import HTTPError


class HfHubHTTPError(HTTPError):
    pass


class RepositoryNotFoundError(HfHubHTTPError):
    pass


class RevisionNotFoundError(HfHubHTTPError):
    pass


class EntryNotFoundError(HfHubHTTPError):
    pass


class LocalEntryNotFoundError(EntryNotFoundError, FileNotFoundError, ValueError):
    pass


def is_jinja_available():
    return importlib.util.find_spec("jinja2") is not None


def validate_hf_hub_args(fn):
    return fn
