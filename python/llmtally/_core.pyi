"""Type stubs for the compiled hot path, ``llmtally._core`` (internal)."""

from typing import Any, Final, final

__all__ = [
    "READ_BAD_USAGE",
    "READ_NOT_A_RESPONSE",
    "READ_NO_USAGE",
    "READ_OK",
    "BadUsage",
    "Usage",
    "__version__",
    "estimate_messages",
    "estimate_text",
    "extract_text",
    "extract_usage",
    "finish_response",
    "make_response",
    "normalize_usage_block",
    "read_response",
]

__version__: Final[str]

def estimate_text(text: str, encoding: str = "cl100k") -> int:
    """Estimated token count of ``text`` for the ``cl100k``/``o200k`` (or ``*_base``) family."""

def estimate_messages(messages: list[Any], encoding: str = "cl100k") -> int:
    """Estimated prompt tokens of a chat message list, with the per-message overhead."""

@final
class Usage:
    """A normalized usage record; ``None`` means the provider did not say.

    Cache reads and writes are part of ``prompt_tokens``; reasoning is part of
    ``completion_tokens``.
    """

    @property
    def total_tokens(self) -> int: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def cache_write_1h_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def cost_usd(self) -> float | None: ...
    @property
    def warning(self) -> str | None: ...
    def __init__(
        self,
        total_tokens: int | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_usd: float | None = None,
    ) -> None: ...

class BadUsage(ValueError):
    """Usage that cannot be trusted (wrong type, out of range, inconsistent); skipped whole."""

def extract_usage(obj: Any) -> Usage | None:
    """The usage reported in a response, stream chunk/event or usage dict, or ``None``.

    Raises ``BadUsage`` for a count of the wrong type, outside ``[0, 10**12)``, or inconsistent
    subsets.
    """

def normalize_usage_block(usage: Any, anthropic: bool = False) -> Usage:
    """Normalize one provider ``usage`` block (``anthropic=True``: input excludes cache)."""

READ_OK: Final[int]
READ_BAD_USAGE: Final[int]
READ_NOT_A_RESPONSE: Final[int]

def extract_text(obj: Any) -> str | None:
    """The generated text in a response or stream chunk, or ``None``."""

def read_response(obj: Any) -> tuple[int, Usage | None, str | None, str | None, str | None]:
    """``(code, usage, content, model, message)`` of a response set on a call; ``code`` is
    ``READ_OK``, ``READ_BAD_USAGE`` (usage skipped, ``message`` says why) or
    ``READ_NOT_A_RESPONSE``."""

def make_response(
    usage: Usage | None,
    usage_error: str | None,
    estimated: bool,
    content: str | None,
    provider: str,
    model: str,
    duration_s: float,
    request_id: str,
    ttft_s: float | None = None,
    chunks: int = 0,
) -> dict[str, Any]:
    """The normalized response dict given to ``on_llm_end``."""

READ_NO_USAGE: Final[int]

def finish_response(
    obj: Any, provider: str, model: str, duration_s: float, request_id: str
) -> tuple[int, dict[str, Any] | None, str | None]:
    """Read a response and build the response dict in one crossing: ``(code, response,
    message)``; ``response`` is ``None`` for ``READ_NO_USAGE`` and ``READ_NOT_A_RESPONSE``."""
