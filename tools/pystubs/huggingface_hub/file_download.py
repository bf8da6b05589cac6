"""Offline stub of huggingface_hub.file_download (denoised tools/pystubs)."""
import re

REGEX_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
