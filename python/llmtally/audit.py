"""``AuditLogger``: one structured record per LLM call, prompt text kept only by policy.

Records go to a JSON-lines file (written by a background thread from a bounded queue, so the
event loop never waits on disk; a full queue drops the oldest record and counts it) or to a
``logging.Logger``. The default policy keeps no prompt or completion text at all.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmtally._calls import is_timeout
from llmtally.errors import ConfigError
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import user_of

__all__ = ["AuditLogger", "redact"]

_PATTERNS = [
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"\b(?:sk|pk|rk|xox[abp])-[A-Za-z0-9_-]{10,}\b"), "[secret]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[card]"),
    (re.compile(r"\+?\d[\d ()-]{7,}\d"), "[phone]"),
]
POLICIES = ("none", "truncate", "redact", "full")


def redact(text: str) -> str:
    """Mask e-mail addresses, API keys, card and phone numbers.

    >>> redact("mail bob@example.com, key sk-abcdefghijklmnop")
    'mail [email], key [secret]'
    """
    for pattern, label in _PATTERNS:
        text = pattern.sub(label, text)
    return text


def _text_of(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    parts = []
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, str):
                parts.append(content)
    return "\n".join(parts)


class AuditLogger(AsyncCallbackHandler):
    """One JSON record per call: time, user, provider, model, request and trace ids, tokens,
    cost, latency, outcome (``success``, ``error``, ``timeout``, ``aborted``) and error type.

    Args:
        path: a JSON-lines file to append to; or
        logger: a ``logging.Logger`` (records are its messages, at INFO); default: the
            ``llmtally.audit`` logger when no path is given.
        text: ``"none"`` (default: no prompt or completion text), ``"truncate"`` (the first
            ``max_chars``), ``"redact"`` (masked, then truncated) or ``"full"``.
        max_chars: the length kept by ``truncate``/``redact``.
        redactor: replaces the built-in :func:`redact`.
        max_queue: records waiting for the file writer; past it the oldest are dropped and
            counted in ``dropped``.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        logger: logging.Logger | None = None,
        text: str = "none",
        max_chars: int = 200,
        redactor: Callable[[str], str] | None = None,
        max_queue: int = 10_000,
    ) -> None:
        if text not in POLICIES:
            raise ConfigError(f"text must be one of {', '.join(POLICIES)}, not {text!r}")
        if path is not None and logger is not None:
            raise ConfigError("give a path or a logger, not both")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
            raise ConfigError(f"max_chars must be an int >= 0, not {max_chars!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"max_queue must be an int >= 1, not {max_queue!r}")
        self.path = Path(path) if path is not None else None
        self._logger = logger or (None if path is not None else logging.getLogger("llmtally.audit"))
        self.text = text
        self.max_chars = max_chars
        self._redact = redactor or redact
        self._queue: deque[str] = deque(maxlen=max_queue)
        self._prompts: dict[Any, str] = {}
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.records = 0
        self.bad_input = 0  # bad user ids (charged to "anonymous")
        self.dropped = 0
        self.write_errors = 0

    # -- text policy ---------------------------------------------------------------------------

    def _keep(self, text: str | None) -> str | None:
        if text is None or self.text == "none":
            return None
        if self.text == "redact":
            text = self._redact(text)
        if self.text in ("truncate", "redact") and len(text) > self.max_chars:
            text = text[: self.max_chars] + "…"
        return text

    # -- events --------------------------------------------------------------------------------

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        if self.text != "none":
            if len(self._prompts) >= 100_000:
                self._prompts.clear()
            self._prompts[kwargs.get("request_id")] = _text_of(messages)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        record = self._base(kwargs, "success")
        if isinstance(response, dict):
            for field in (
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            ):
                if field in response:
                    record[field] = response[field]
            record["total_tokens"] = response.get("tokens_used")
            record["estimated"] = response.get("estimated", False)
            record["cost_usd"] = response.get("cost_estimate")
            record["cost_source"] = response.get("cost_source")
            if response.get("model"):
                record["model"] = response["model"]
            completion = self._keep(response.get("content"))
            if completion is not None:
                record["completion"] = completion
        self._emit(record)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        outcome = (
            "aborted" if kwargs.get("aborted") else "timeout" if is_timeout(error) else "error"
        )
        record = self._base(kwargs, outcome)
        record["error_type"] = type(error).__name__
        self._emit(record)

    def _base(self, kwargs: Mapping[str, Any], outcome: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "event": "llm_call",
            "outcome": outcome,
            "user_id": user_of(kwargs.get("user_id"), self),
            "provider": kwargs.get("provider"),
            "model": kwargs.get("model"),
            "request_id": kwargs.get("request_id"),
            "trace_id": kwargs.get("trace_id"),
            "latency_ms": kwargs.get("duration_ms"),
        }
        prompt = self._keep(self._prompts.pop(kwargs.get("request_id"), None))
        if prompt is not None:
            record["prompt"] = prompt
        return record

    # -- output --------------------------------------------------------------------------------

    def _emit(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, ensure_ascii=False)
        self.records += 1
        if self.path is None:
            assert self._logger is not None
            self._logger.info(line)
            return
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(line)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._write_loop, name="llmtally-audit", daemon=True
                )
                self._writer.start()
            self._wake.notify()

    def _write_loop(self) -> None:
        assert self.path is not None
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait(timeout=1.0)
                if not self._queue and self._closed:
                    return
                lines = list(self._queue)
                self._queue.clear()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
            except OSError as exc:
                self.write_errors += 1
                logging.getLogger("llmtally").error("audit log %s: %s", self.path, exc)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued record is written (True) or ``timeout_s`` passed."""
        writer = self._writer
        if writer is None:
            return True
        with self._wake:
            self._closed = True
            self._wake.notify()
        writer.join(timeout_s)
        done = not writer.is_alive()
        with self._wake:
            self._closed = False
            self._writer = None
            if self._queue:  # arrived while stopping: start a new writer
                self._writer = threading.Thread(
                    target=self._write_loop, name="llmtally-audit", daemon=True
                )
                self._writer.start()
        return done

    async def aclose(self) -> bool:
        """Write what is queued (without blocking the loop)."""
        import asyncio

        return await asyncio.to_thread(self.flush)
