"""Locate tiktoken encoding files for offline use (shared by scripts, tests and benches).

tiktoken caches a downloaded encoding under ``$TIKTOKEN_CACHE_DIR/<sha1 of its URL>``. The litellm
wheel ships ``cl100k_base`` and ``o200k_base`` under those same names in
``litellm/litellm_core_utils/tokenizers/``, so pointing ``TIKTOKEN_CACHE_DIR`` there lets tiktoken
load them with no network. The folder is found without importing litellm (its import is slow and
tries the network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

BLOB_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def cache_name(encoding: str) -> str:
    """The file name tiktoken looks for in its cache folder."""
    return hashlib.sha1(BLOB_URLS[encoding].encode()).hexdigest()


def litellm_tokenizer_dir() -> Path | None:
    """litellm's bundled tokenizer folder when litellm is installed and holds both files."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "litellm_core_utils" / "tokenizers"
        if all((folder / cache_name(enc)).is_file() for enc in BLOB_URLS):
            return folder
    return None


def load_encodings() -> dict[str, object] | None:
    """tiktoken encodings keyed "cl100k"/"o200k", or None when they cannot be loaded offline."""
    try:
        import tiktoken
    except ImportError:
        return None
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        folder = litellm_tokenizer_dir()
        if folder is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    try:
        return {
            "cl100k": tiktoken.get_encoding("cl100k_base"),
            "o200k": tiktoken.get_encoding("o200k_base"),
        }
    except Exception:
        return None
