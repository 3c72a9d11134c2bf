"""Type stubs for the compiled hot path, ``llmtally._core`` (internal)."""

from typing import Any, Final

__all__ = [
    "__version__",
    "_estimate_feature_names",
    "_estimate_pieces",
    "estimate_messages",
    "estimate_text",
]

__version__: Final[str]

def estimate_text(text: str, encoding: str = "cl100k") -> int:
    """Estimated token count of ``text`` for the ``cl100k``/``o200k`` (or ``*_base``) family.

    Raises ``TypeError`` when ``text`` is not a str, ``ValueError`` for an unknown encoding.
    The GIL is released for long strings.
    """

def estimate_messages(messages: list[Any], encoding: str = "cl100k") -> int:
    """Estimated prompt tokens of a chat message list, with the per-message overhead.

    3 tokens per message, 1 per ``name``, 3 for the reply. Raises ``TypeError`` for a message
    that is not a dict, or a ``role``/``name``/``content`` of the wrong type.
    """

def _estimate_pieces(text: str, encoding: str = "cl100k") -> list[tuple[int, int, list[int]]]:
    """The estimator's pieces as ``(byte_start, byte_end, feature_ids)``, for calibration."""

def _estimate_feature_names() -> list[str]:
    """Names of the estimator's features, indexed like its cost tables."""
