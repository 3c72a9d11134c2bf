"""llmtally: exact, fast metering of LLM calls through async callbacks.

>>> import asyncio, llmtally
>>> class Count(llmtally.AsyncCallbackHandler):
...     total = 0
...     async def on_llm_end(self, response, **kwargs):
...         Count.total += response["tokens_used"]
>>> async def main():
...     manager = llmtally.CallbackManager([Count()])
...     async with manager.llm_call([{"role": "user", "content": "hi"}], model="gpt-4o") as call:
...         call.set_response({"usage": {"prompt_tokens": 8, "completion_tokens": 2}})
>>> asyncio.run(main()); Count.total
10
"""

from typing import TYPE_CHECKING

from llmtally import pricing
from llmtally._native import core_version as _core_version
from llmtally.audit import AuditLogger
from llmtally.dispatch import (
    AgentRun,
    CallbackManager,
    ChainRun,
    CompositeCallbackHandler,
    LLMCall,
    Retrieval,
    ToolCall,
    create_composite_callback,
    current_run,
    get_global_callbacks,
    set_global_callbacks,
)
from llmtally.errors import (
    BadInput,
    BadUsage,
    BudgetExceeded,
    CallbackAbort,
    ConfigError,
    InvalidHandler,
    LlmtallyError,
    RateLimited,
    StoreError,
    StoreUnavailable,
    TokenizerUnavailable,
)
from llmtally.events import AsyncCallbackHandler, Callbacks, CustomAsyncCallbackHandler
from llmtally.integrations.instrument import instrument
from llmtally.limits import BudgetLimiter, RateLimiter
from llmtally.metering import (
    DetailedRedisTokenCallbackHandler,
    RedisTokenCallbackHandler,
    UsageRecorder,
    create_detailed_token_callback,
    create_token_callback,
)
from llmtally.metrics import disable_metrics, enable_metrics
from llmtally.pricing import register_model
from llmtally.repository import TokenUsageRepository
from llmtally.storage import Store, default_store, flush_on_exit_signals, open_store
from llmtally.tokens import estimate_tokens
from llmtally.trackers import CostTracker, PerformanceTracker, StreamingProgress, TokenCounter
from llmtally.usage import Usage, extract_usage

if TYPE_CHECKING:
    from llmtally.integrations.otel import OpenTelemetryHandler as OpenTelemetryHandler

__version__ = _core_version


def __getattr__(name: str) -> object:
    # ``OpenTelemetryHandler`` loads on first use, so ``import llmtally`` never imports
    # opentelemetry (an optional extra, ``llmtally[otel]``).
    if name == "OpenTelemetryHandler":
        from llmtally.integrations.otel import OpenTelemetryHandler

        return OpenTelemetryHandler
    raise AttributeError(f"module 'llmtally' has no attribute {name!r}")


__all__ = [
    "AgentRun",
    "AuditLogger",
    "AsyncCallbackHandler",
    "BadInput",
    "BadUsage",
    "BudgetExceeded",
    "BudgetLimiter",
    "CallbackAbort",
    "CallbackManager",
    "Callbacks",
    "ChainRun",
    "CompositeCallbackHandler",
    "ConfigError",
    "CostTracker",
    "CustomAsyncCallbackHandler",
    "DetailedRedisTokenCallbackHandler",
    "InvalidHandler",
    "LLMCall",
    "LlmtallyError",
    "PerformanceTracker",
    "RateLimited",
    "RateLimiter",
    "RedisTokenCallbackHandler",
    "Retrieval",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StreamingProgress",
    "TokenizerUnavailable",
    "TokenCounter",
    "TokenUsageRepository",
    "ToolCall",
    "Usage",
    "UsageRecorder",
    "__version__",
    "create_composite_callback",
    "create_detailed_token_callback",
    "create_token_callback",
    "current_run",
    "default_store",
    "flush_on_exit_signals",
    "disable_metrics",
    "enable_metrics",
    "estimate_tokens",
    "extract_usage",
    "get_global_callbacks",
    "instrument",
    "open_store",
    "pricing",
    "register_model",
    "set_global_callbacks",
]
