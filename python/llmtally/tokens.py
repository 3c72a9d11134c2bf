"""Token counting: a fast estimator in Rust, and exact counts through tiktoken when available."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from llmtally import _core
from llmtally.errors import TokenizerUnavailable

__all__ = ["encoding_for_model", "estimate_tokens"]

_O200K_PREFIXES = (
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
    "chatgpt-4o",
    "gpt-oss",
)


def encoding_for_model(model: str | None) -> str:
    """The tokenizer family whose counts the estimate imitates for ``model``.

    >>> encoding_for_model("gpt-4o-mini")
    'o200k_base'
    >>> encoding_for_model("gpt-3.5-turbo")
    'cl100k_base'
    """
    if model:
        name = model.rsplit("/", 1)[-1].lower()
        if name.startswith(_O200K_PREFIXES):
            return "o200k_base"
    return "cl100k_base"


def estimate_tokens(
    text_or_messages: str | Sequence[Mapping[str, Any]],
    model: str | None = None,
    *,
    exact: bool = False,
) -> int:
    """Count the tokens of a string or a chat message list.

    The default is the Rust estimator (no tokenizer needed, script-aware, with the chat format's
    per-message overhead for message lists). ``exact=True`` counts with tiktoken and raises
    :class:`TokenizerUnavailable` when tiktoken or the model's encoding cannot be loaded.

    >>> estimate_tokens("")
    0
    >>> estimate_tokens([{"role": "user", "content": "hi"}]) > 3
    True
    """
    encoding = encoding_for_model(model)
    if exact:
        return _exact(text_or_messages, encoding)
    if isinstance(text_or_messages, str):
        return _core.estimate_text(text_or_messages, encoding)
    if isinstance(text_or_messages, list):
        return _core.estimate_messages(text_or_messages, encoding)
    if isinstance(text_or_messages, Sequence):
        return _core.estimate_messages(list(text_or_messages), encoding)
    raise TypeError(
        "estimate_tokens() takes a str or a list of message dicts, "
        f"not {type(text_or_messages).__name__}"
    )


@functools.cache
def _encoder(encoding: str) -> Any:
    try:
        import tiktoken
    except ImportError as exc:
        raise TokenizerUnavailable(
            "exact token counts need tiktoken: pip install 'llmtally[tiktoken]'"
        ) from exc
    try:
        return tiktoken.get_encoding(encoding)
    except Exception as exc:
        raise TokenizerUnavailable(
            f"tiktoken encoding {encoding!r} could not be loaded ({exc}); offline machines can "
            "point TIKTOKEN_CACHE_DIR at a folder holding the encoding file"
        ) from exc


def _exact(text_or_messages: str | Sequence[Mapping[str, Any]], encoding: str) -> int:
    enc = _encoder(encoding)
    if isinstance(text_or_messages, str):
        return len(enc.encode(text_or_messages, disallowed_special=()))
    total = 0
    for msg in text_or_messages:
        if not isinstance(msg, Mapping):
            raise TypeError(f"each message must be a dict, not {type(msg).__name__}")
        total += 3
        for key in ("role", "content", "name"):
            value = msg.get(key)
            if isinstance(value, str):
                total += len(enc.encode(value, disallowed_special=()))
                if key == "name":
                    total += 1
            elif isinstance(value, list):
                for part in value:
                    text = (
                        part
                        if isinstance(part, str)
                        else part.get("text")
                        if isinstance(part, Mapping)
                        else None
                    )
                    if isinstance(text, str):
                        total += len(enc.encode(text, disallowed_special=()))
    return total + 3
