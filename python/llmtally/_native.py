"""The one door to the Rust core: every module of llmtally imports the core's types and
functions from here, never from ``llmtally._core`` itself (as ``tiktoken.core`` wraps
``tiktoken._tiktoken``). ``_core.pyi`` types them; ``mypy.stubtest`` checks the stub against the
compiled module in the suite.

Units: token counts are ints in ``[0, 10**12)``; costs are counted in whole pico-USD (1e-12 USD),
converted from USD by :func:`usd_to_pusd` only.
"""

from __future__ import annotations

from typing import Final, TypeAlias

from llmtally._core import (
    DECLINED,
    LEDGER_FIELDS,
    READ_BAD_USAGE,
    READ_NO_USAGE,
    READ_NOT_A_RESPONSE,
    READ_OK,
    RECORDED,
    BadUsage,
    Batch,
    CallScope,
    CallStats,
    CallUserSink,
    Histogram,
    IdMaker,
    Lease,
    LeaseBook,
    Ledger,
    PerfModel,
    PerfSink,
    Prices,
    Ready,
    Recorder,
    TrackerSink,
    Usage,
    UserKeySink,
    call_modifiers,
    current_cycle,
    estimate_messages,
    estimate_text,
    extract_text,
    extract_usage,
    finish_response,
    key_slot,
    make_response,
    merge_stream_usage,
    normalize_usage_block,
    read_response,
    response_meta,
    usd_to_pusd,
)
from llmtally._core import __version__ as core_version

#: What a built-in handler records in the manager's one-crossing recorder.
Sink: TypeAlias = UserKeySink | CallUserSink | TrackerSink | PerfSink

__all__ = [
    "DECLINED",
    "LEDGER_FIELDS",
    "PUSD_PER_USD",
    "READ_BAD_USAGE",
    "READ_NOT_A_RESPONSE",
    "READ_NO_USAGE",
    "READ_OK",
    "RECORDED",
    "BadUsage",
    "Batch",
    "CallScope",
    "CallStats",
    "CallUserSink",
    "Histogram",
    "IdMaker",
    "Lease",
    "LeaseBook",
    "Ledger",
    "PerfModel",
    "PerfSink",
    "Prices",
    "Ready",
    "Recorder",
    "Sink",
    "TrackerSink",
    "Usage",
    "UserKeySink",
    "call_modifiers",
    "core_version",
    "current_cycle",
    "estimate_messages",
    "estimate_text",
    "extract_text",
    "extract_usage",
    "finish_response",
    "key_slot",
    "make_response",
    "merge_stream_usage",
    "normalize_usage_block",
    "pusd_to_usd",
    "read_response",
    "response_meta",
    "usd_to_pusd",
]

#: Pico-USD per USD.
PUSD_PER_USD: Final = 10**12


def pusd_to_usd(pusd: int) -> float:
    """Whole pico-USD as USD."""
    return pusd / PUSD_PER_USD
