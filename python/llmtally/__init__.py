"""llmtally: exact, fast metering of LLM calls through async callbacks."""

from llmtally._core import __version__ as _core_version
from llmtally.errors import (
    BadInput,
    BudgetExceeded,
    CallbackAbort,
    ConfigError,
    LlmtallyError,
    RateLimited,
    StoreError,
    StoreUnavailable,
    TokenizerUnavailable,
)
from llmtally.tokens import estimate_tokens

__version__ = _core_version

__all__ = [
    "BadInput",
    "BudgetExceeded",
    "CallbackAbort",
    "ConfigError",
    "LlmtallyError",
    "RateLimited",
    "StoreError",
    "StoreUnavailable",
    "TokenizerUnavailable",
    "__version__",
    "estimate_tokens",
]
