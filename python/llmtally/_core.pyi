"""Type stubs for the compiled hot path, ``llmtally._core`` (internal)."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Self, final

from typing_extensions import disjoint_base

from llmtally.errors import BadUsage as BadUsage

__all__ = [
    "DECLINED",
    "LEDGER_FIELDS",
    "RECORDED",
    "READ_BAD_USAGE",
    "READ_NOT_A_RESPONSE",
    "READ_NO_USAGE",
    "READ_OK",
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
    "TrackerSink",
    "Usage",
    "UserKeySink",
    "__version__",
    "_estimate_feature_names",
    "_estimate_contexts",
    "_estimate_pieces",
    "call_modifiers",
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
    "read_response",
    "response_meta",
    "usd_to_pusd",
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

def _estimate_contexts(
    text: str, encoding: str = "cl100k"
) -> list[tuple[int, int, tuple[int, list[int]]]]: ...
def _estimate_pieces(text: str, encoding: str = "cl100k") -> list[tuple[int, int, list[int]]]:
    """The estimator's pieces as ``(byte_start, byte_end, feature_ids)``, for calibration."""

def _estimate_feature_names() -> list[str]:
    """Names of the estimator's features, indexed like its cost tables."""

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
    def __new__(
        cls,
        total_tokens: int | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_usd: float | None = None,
    ) -> Usage: ...

def extract_usage(obj: Any) -> Usage | None:
    """The usage reported in a response, stream chunk/event or usage dict, or ``None``.

    Raises ``BadUsage`` for a count of the wrong type, outside ``[0, 10**12)``, or inconsistent
    subsets.
    """

def merge_stream_usage(previous: Usage | None, chunk: Any) -> Usage | None:
    """Fold the usage a stream chunk carries into what the stream reported so far (``previous``
    itself when the chunk carries none). Cumulative shapes (OpenAI chat chunks, Responses
    events, Anthropic ``message_start``/``message_delta``, Gemini ``usageMetadata``) are replaced
    field by field, LangChain message-chunk deltas are added; a field a later report leaves out
    never erases an earlier value.

    Raises ``BadUsage`` when the chunk's usage cannot be trusted.
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
    table_cost_pusd: int | None = None,
    response_id: str | None = None,
    finish_reason: str | None = None,
    price_version: str | None = None,
) -> dict[str, Any]:
    """The normalized response dict given to ``on_llm_end`` (``price_version`` beside a table
    cost)."""

READ_NO_USAGE: Final[int]

def response_meta(obj: Any) -> tuple[str | None, str | None]:
    """The provider's response id and finish reason, each ``None`` when absent."""

def finish_response(
    obj: Any,
    provider: str,
    model: str,
    duration_s: float,
    request_id: str,
    prices: Prices | None = None,
) -> tuple[int, dict[str, Any] | None, str | None, Usage | None]:
    """Read a response and build the response dict in one crossing: ``(code, response,
    message, usage)``; ``response`` is ``None`` for ``READ_NO_USAGE`` and
    ``READ_NOT_A_RESPONSE``; with ``prices``, a response without a provider cost is priced."""

LEDGER_FIELDS: Final[tuple[str, ...]]

@final
class Ledger:
    """Usage counters per key, added in O(1) from any thread and drained in batches.

    Counters, in ``LEDGER_FIELDS`` order: total, prompt, completion, cached, cache-write and
    reasoning tokens, ``cost_pusd``, calls, errors, timeouts. A delta that would overflow a 64-bit
    counter is refused with ``OverflowError`` and counted in ``overflows``.
    """

    def __init__(self) -> None: ...
    def add(
        self,
        key: str,
        total_tokens: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_pusd: int = 0,
        calls: int = 0,
        errors: int = 0,
        timeouts: int = 0,
    ) -> None: ...
    def add_counters(self, key: str, counters: list[int] | tuple[int, ...]) -> None: ...
    def add_response(self, key: str, response: dict[str, Any]) -> int: ...
    def get(self, key: str) -> tuple[int, ...]: ...
    def keys(self) -> list[str]: ...
    def drain(self) -> Batch: ...
    @property
    def pending(self) -> int: ...
    @property
    def oldest_pending_s(self) -> float | None:
        """Seconds since the oldest pending delta arrived (``None`` when nothing is pending)."""
    def journal(self, directory: str | os.PathLike[str], flusher_id: str, tag: int) -> None:
        """Journal every delta into ``directory`` from now on (the spool)."""
    def close_journal(self) -> None: ...
    @property
    def journal_incomplete(self) -> bool: ...
    @property
    def journal_errors(self) -> tuple[int, str | None]: ...
    @property
    def overflows(self) -> int: ...
    def __contains__(self, key: object, /) -> bool:
        """True when ``key`` has counters."""

    def __len__(self) -> int: ...

@final
class Batch:
    """Deltas drained from a ledger, sorted by key, numbered ``seq`` by that ledger (1, 2, ...;
    0 when empty): written to a store as one batch."""

    @property
    def seq(self) -> int: ...
    @property
    def oldest_s_ago(self) -> float | None: ...
    @property
    def journal_path(self) -> Path | None: ...
    @property
    def journal_complete(self) -> bool: ...
    def discard_journal(self) -> None: ...
    @staticmethod
    def from_journal(path: str | os.PathLike[str]) -> tuple[Batch, int, int, bool]:
        """``(batch, tag, records, torn)`` read back from a spool file."""
    def items(self) -> list[tuple[str, tuple[int, ...]]]: ...
    def get(self, key: str) -> tuple[int, ...]: ...
    def lua_chunks(
        self, max_keys: int = 512, cluster: bool = False
    ) -> list[tuple[str | None, int, list[str], list[str | int]]]:
        """``(slot_tag, unit, keys, args)`` per unit of at most ``max_keys`` keys; the same
        split every time."""
    def unit_of(self, key: str, max_keys: int = 512, cluster: bool = False) -> int | None: ...
    def sql_rows(self) -> str:
        """The batch as a JSON array of ``[key, field, delta]`` rows (non-zero fields)."""
    def totals(self) -> tuple[int, ...]: ...
    def __len__(self) -> int: ...

@final
class Histogram:
    """Fixed-memory log-linear histogram; percentiles within 0.8% of the true sample."""

    def __new__(cls, scale: float = 1000.0) -> Histogram: ...
    def record(self, value: float, n: int = 1) -> None: ...
    def percentile(self, p: float) -> float | None: ...
    def percentiles(self, ps: list[float]) -> list[float | None]: ...
    @property
    def count(self) -> int: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...
    @property
    def mean(self) -> float | None: ...
    def merge(self, other: Histogram) -> None: ...
    def reset(self) -> None: ...
    def cumulative(self, bounds: list[float]) -> tuple[list[int], int, float]: ...
    def __len__(self) -> int: ...

@final
class IdMaker:
    """Ids ``"<prefix>-<hex counter>"``, from 1."""

    def __new__(cls, prefix: str) -> IdMaker: ...
    def next(self) -> str: ...
    def mark(self, id: str) -> None: ...
    def counted(self, id: str) -> bool: ...
    @property
    def prefix(self) -> str: ...

@final
class PerfModel:
    """One model's performance accumulators: latency, time to first token and tokens/s
    histograms, errors, and calls per minute (per-second buckets, fixed memory)."""

    def __init__(self) -> None: ...
    @property
    def latency(self) -> Histogram: ...
    @property
    def ttft(self) -> Histogram: ...
    @property
    def tps(self) -> Histogram: ...
    @property
    def errors(self) -> int: ...
    def record(
        self,
        duration_ms: float,
        ttft_ms: float | None = None,
        completion_tokens: int | None = None,
        now: float | None = None,
    ) -> None: ...
    def record_error(self) -> None: ...
    def requests_per_min(self, now: float | None = None) -> int: ...
    def merge(self, other: PerfModel) -> None: ...

RECORDED: Final[int]
DECLINED: Final[int]

@final
class UserKeySink:
    """A seed handler's record: one user's key, ``prefix`` + the cycle (``cycle``, else the
    current month), in ``store``."""

    @property
    def store(self) -> Any: ...
    def __new__(cls, store: Any, prefix: str, cycle: str | None = None) -> UserKeySink: ...

@final
class CallUserSink:
    """A ``UsageRecorder``'s record: the call's user, under ``key_for(user_id, cycle)``."""

    @property
    def store(self) -> Any: ...
    def __new__(cls, store: Any, key_for: Callable[[str, str], str]) -> CallUserSink: ...

@final
class TrackerSink:
    """A ``TokenCounter`` / ``CostTracker``'s record: the ledger slot of ``(provider, model,
    user)`` in ``slots``, else ``admit(key)``."""

    def __new__(
        cls, ledger: Ledger, slots: dict[Any, Any], admit: Callable[[Any], Any]
    ) -> TrackerSink: ...

@final
class PerfSink:
    """A ``PerformanceTracker``'s record: per-model accumulators in ``models``, else
    ``admit(model)``."""

    def __new__(cls, models: dict[Any, Any], admit: Callable[[Any], Any]) -> PerfSink: ...

@final
class Recorder:
    """Every built-in accumulator of one end event, updated in one crossing."""

    def __new__(
        cls, sinks: list[UserKeySink | CallUserSink | TrackerSink | PerfSink], flush_at: int
    ) -> Recorder: ...
    def end(self, response: object, kwargs: dict[str, Any], id_prefix: str) -> tuple[int, bool]: ...
    def finish(
        self,
        obj: Any,
        provider: str,
        model: str,
        duration_s: float,
        prices: Prices | None,
        user_id: object,
        cycle_start_date: object,
        ids: IdMaker,
        request_id: str,
        lookup: Callable[[str, str], Prices | None] | None = None,
    ) -> tuple[
        int,
        Usage | None,
        str | None,
        str | None,
        int | None,
        str | None,
        int,
        bool,
        str | None,
        str | None,
    ]: ...
    def __len__(self) -> int: ...

@final
class Lease:
    """One budget's state in this process (``BudgetLimiter``'s quota leases): token amounts in
    tokens, cost amounts in pusd."""

    key: str
    scope_id: str
    cycle: str
    recorded_t: int
    recorded_p: int
    held_t: int
    held_p: int
    inflight_t: int
    inflight_p: int
    settled_t: int
    settled_p: int
    draining_t: int
    draining_p: int
    used_t: int
    used_p: int
    others_t: int
    others_p: int
    flushed_t: int
    flushed_p: int
    renew_at: float
    known: bool
    last_used: float
    limit_t: int
    shrinking: bool
    renewing: Any
    refused: Any
    def __new__(cls, key: str, scope_id: str, cycle: str) -> Lease: ...
    def settle(self, estimate_t: int, estimate_p: int, tokens: int, pusd: int) -> bool: ...

@final
class LeaseBook:
    """A token-only user budget limiter's leases by user: the admission of a call (``start``)
    and its settlement (``settle``, in a batch by ``catch_up``) with no I/O."""

    @property
    def admitted(self) -> int: ...
    def __new__(
        cls,
        keys: dict[tuple[str, Any], Lease],
        opened: dict[Any, Any],
        opened_more: dict[Any, Any],
        counted: dict[Any, bool],
        lock: Any,
        owner: Any,
        settled: set[Any],
        start_fallback: Callable[[Any, Any], Any],
        settle_fallback: Callable[[Any, Any], Any],
        catch_up_now: Callable[[], Any],
        estimate_messages: Callable[[list[Any], str], int],
        o200k_prefixes: list[str],
        max_open: int,
        max_ended: int,
        monotonic_now: float,
    ) -> LeaseBook: ...
    def __len__(self) -> int: ...
    def start(self, messages: Any, kwargs: dict[str, Any]) -> Any: ...
    def settle(self, call: Any, meters: Any) -> None: ...
    def catch_up(self) -> None: ...

@final
class Prices:
    """A model's prices in USD per 1M tokens (at most six decimals), as exact integers.

    Every kind (input, output, cache read, 5-minute and 1-hour cache writes, reasoning) has a
    price in every long-context tier, resolved once here: a kind the tier lists takes the
    tier's price; a kind priced on its own below keeps it; a kind without a price of its own
    derives from the tier's (cache prices from the tier's input, 1 h writes from its 5-minute
    writes, reasoning from its output). ``inclusive``: a prompt of exactly a threshold is in
    the tier (xAI). ``service_tiers``: whole tables for ``flex``/``priority``/``batch``;
    ``geo``: cost multipliers by inference geography; ``off_peak``: the table billed inside
    ``off_peak_windows`` (``(weekday bits, Monday = 1, start minute, end minute)``, UTC).
    """

    def __new__(
        cls,
        input_price: float,
        output_price: float,
        cache_read_price: float | None = None,
        cache_write_price: float | None = None,
        cache_write_1h_price: float | None = None,
        reasoning_price: float | None = None,
        tiers: Sequence[Sequence[float | None]] | None = None,
        *,
        inclusive: bool = False,
        version: str | None = None,
        service_tiers: dict[str, Prices] | None = None,
        geo: Sequence[tuple[str, float]] | None = None,
        speed: Sequence[tuple[str, float]] | None = None,
        off_peak: Prices | None = None,
        off_peak_windows: Sequence[tuple[int, int, int]] | None = None,
    ) -> Prices:
        """``tiers``: ``(above_prompt_tokens, input, output[, cache_read[, cache_write[,
        cache_write_1h[, reasoning]]]])``; ``None`` in a tier: not listed there."""
    def cost_pusd(
        self,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
        *,
        service_tier: str | None = None,
        inference_geo: str | None = None,
        at: float | None = None,
        speed: str | None = None,
    ) -> int:
        """Cost in pico-USD; ``at``: UNIX seconds of the call (default now) for off-peak."""
    def usage_cost_pusd(
        self,
        usage: Usage,
        *,
        service_tier: str | None = None,
        inference_geo: str | None = None,
        at: float | None = None,
        speed: str | None = None,
    ) -> int | None: ...
    def rates(
        self, prompt_tokens: int = 0, *, service_tier: str | None = None, at: float | None = None
    ) -> tuple[float, float, float, float, float, float]:
        """``(input, output, cache_read, cache_write, cache_write_1h, reasoning)`` USD per 1M
        tokens billed for a prompt of ``prompt_tokens``, before a geo or speed multiplier."""
    @property
    def input_price(self) -> float: ...
    @property
    def output_price(self) -> float: ...
    @property
    def cache_read_price(self) -> float: ...
    @property
    def cache_write_price(self) -> float: ...
    @property
    def cache_write_1h_price(self) -> float: ...
    @property
    def reasoning_price(self) -> float: ...
    @property
    def version(self) -> str | None:
        """The effective date of this price version (``YYYY-MM-DD``), or ``"registered"``."""
    @property
    def inclusive(self) -> bool: ...
    @property
    def has_modifiers(self) -> bool:
        """Whether a call's service tier, geography, speed or time can change its price."""
    @property
    def service_tiers(self) -> list[str]: ...

def call_modifiers(obj: object) -> tuple[str | None, str | None, str | None]:
    """``(service_tier, inference_geo, speed)`` a provider response states (OpenAI top-level
    ``service_tier``; Anthropic ``usage.service_tier``, ``usage.inference_geo``,
    ``usage.speed``)."""

def usd_to_pusd(usd: float) -> int | None:
    """A cost in USD as whole pico-USD, rounded half away from zero (the one conversion every
    counter, ledger and limiter uses); ``None`` for a cost that is not a finite amount in
    ``[0, 2**63)`` pico-USD."""

def current_cycle() -> str:
    """``YYYY-MM-01`` of the current UTC month: the process's one billing-cycle clock."""

def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (hash tags honoured)."""

@final
class Ready:
    """An awaitable that is already done: ``await`` gives its value without suspending."""

    def __await__(self) -> Ready: ...
    def __iter__(self) -> Ready: ...
    def __next__(self) -> Any: ...
    def send(self, _value: Any) -> Any: ...
    def throw(self, kind: Any, value: Any = None, _traceback: Any = None) -> None: ...
    def close(self) -> None: ...

@disjoint_base
class CallScope:
    """One LLM call's state and its common enter and exit (the base of ``LLMCall``)."""

    _ctx: Any
    messages: Any
    provider: str
    model: str
    _kwargs: dict[str, Any]
    request_id: str
    run_id: str
    _id_given: bool
    started_at: float
    _response: Any
    _response_set: bool
    _done: bool
    _token: Any
    _table: Any
    _first_chunk_at: float | None
    _chunks: int
    _texts: list[str] | None
    _stream_usage: Usage | None
    _usage: Usage | None
    _response_dict: dict[str, Any] | None
    _parts: tuple[Any, ...] | None
    duplicate: bool
    _stoppable: bool
    _abandoned: bool
    _open: bool
    def __new__(
        cls, ctx: Any, messages: Any, provider: Any, model: Any, context: dict[str, Any]
    ) -> Self: ...
    @staticmethod
    def configure(
        globals: Any,
        ids: Any,
        observed: Any,
        current: Any,
        not_inherited: Any,
        price_cache: dict[Any, Any],
        price_lookup: Any,
        lookup_found: Any,
        safe_user_chars: int,
        max_id_chars: int,
        now: float,
    ) -> None: ...
    @staticmethod
    def now() -> float: ...
    def set_response(self, response: Any) -> None: ...
    def record_chunk(self, chunk: Any, *, usage: Any = None) -> None: ...
    def __aenter__(self) -> Any: ...
    def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Any: ...

@final
class CallStats:
    """A manager's call counters (``health()``)."""

    abandoned: int
    bad_input: int
    duplicates: int
    llm_calls: int
    llm_errors: int
    llm_timeouts: int
    usage_warnings: int
    def __init__(self) -> None: ...
