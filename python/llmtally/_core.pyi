"""Type stubs for the compiled hot path, ``llmtally._core`` (internal)."""

from typing import Any, Final

__all__ = ["__version__", "estimate_messages", "estimate_text"]

__version__: Final[str]

def estimate_text(text: str, encoding: str = "cl100k") -> int:
    """Estimated token count of ``text`` for the ``cl100k``/``o200k`` (or ``*_base``) family."""

def estimate_messages(messages: list[Any], encoding: str = "cl100k") -> int:
    """Estimated prompt tokens of a chat message list, with the per-message overhead."""
