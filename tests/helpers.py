"""Handlers that record what they see, for the tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import llmtally


class Recorder(llmtally.AsyncCallbackHandler):
    """Records every event it gets, with its arguments and kwargs."""

    def __init__(self, name: str = "rec", log: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.events: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.log = log

    def _rec(self, event: str, *args: Any, **kwargs: Any) -> None:
        self.events.append((event, args, kwargs))
        if self.log is not None:
            self.log.append((self.name, event))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def of(self, event: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for e, a, k in self.events if e == event]

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        self._rec("on_llm_start", messages, **kwargs)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._rec("on_llm_end", response, **kwargs)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_llm_error", error, **kwargs)

    async def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        self._rec("on_llm_stream_chunk", chunk, **kwargs)

    async def on_agent_start(self, goal: Any, **kwargs: Any) -> None:
        self._rec("on_agent_start", goal, **kwargs)

    async def on_agent_end(self, result: Any, **kwargs: Any) -> None:
        self._rec("on_agent_end", result, **kwargs)

    async def on_agent_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_agent_error", error, **kwargs)

    async def on_agent_step(self, step: Any, **kwargs: Any) -> None:
        self._rec("on_agent_step", step, **kwargs)

    async def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None:
        self._rec("on_tool_start", tool_name, args, **kwargs)

    async def on_tool_end(self, tool_name: str, result: Any, **kwargs: Any) -> None:
        self._rec("on_tool_end", tool_name, result, **kwargs)

    async def on_tool_error(self, tool_name: str, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_tool_error", tool_name, error, **kwargs)

    async def on_chain_start(self, chain_name: str, **kwargs: Any) -> None:
        self._rec("on_chain_start", chain_name, **kwargs)

    async def on_chain_end(self, result: Any, **kwargs: Any) -> None:
        self._rec("on_chain_end", result, **kwargs)

    async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_chain_error", error, **kwargs)

    async def on_retrieval_start(self, query: Any, **kwargs: Any) -> None:
        self._rec("on_retrieval_start", query, **kwargs)

    async def on_retrieval_end(self, documents: Any, **kwargs: Any) -> None:
        self._rec("on_retrieval_end", documents, **kwargs)

    async def on_retrieval_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_retrieval_error", error, **kwargs)


class Failing(llmtally.AsyncCallbackHandler):
    """Raises ``exc`` from every LLM event."""

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc or RuntimeError("handler bug")
        self.calls = 0

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.exc

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.exc


class Hanging(llmtally.AsyncCallbackHandler):
    """Never returns from ``on_llm_end`` (until cancelled)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# -- processes that meter calls into a store

#: A metering script: `calls` LLM calls through a manager with a UsageRecorder into `url`,
#: `progress` (when given) counting the calls whose end was recorded.
METER = """
import asyncio, os, sys, mmap
import llmtally
url, calls, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = llmtally.open_store(url)
manager = llmtally.CallbackManager([llmtally.UsageRecorder(store=store)])
messages = [{"role": "user", "content": "hi"}]
response = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
if mode == "signal":
    llmtally.flush_on_exit_signals()

async def main():
    for i in range(calls):
        async with manager.llm_call(messages, model="gpt-4o", user_id=f"u{i % 7}",
                                    cycle_start_date="2026-12-01") as call:
            call.set_response(response)
        if mode == "signal" and i == calls - 1:
            print("ready", flush=True)
            await asyncio.sleep(60)
        elif i % 50 == 0:
            await asyncio.sleep(0)

asyncio.run(main())  # returns without closing the store
"""


def run_python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """``python -c code args...`` with its stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


async def totals(url: str, cycle: str = "2026-12-01") -> tuple[int, int]:
    """``(calls, total_tokens)`` of every user of ``cycle`` in the store at ``url``."""
    store = llmtally.open_store(url, flush_interval_s=3600)
    calls = tokens = 0
    for key in await store.usage_keys(cycle):
        fields = await store.read(key)
        calls += fields.get("calls", 0)
        tokens += fields.get("total_tokens", 0)
    await store.aclose()
    return calls, tokens


# -- the reliability table (RELIABILITY.md): each scenario's test reports what it saw


def report(
    scenario: str, backend: str, sent: int, stored: int, *, in_flight: int = 0, note: str = ""
) -> None:
    """Record a scenario's outcome when ``LLMTALLY_RELIABILITY_REPORT`` names a file:
    ``scripts/reliability_table.py`` turns those lines into RELIABILITY.md's table. ``sent``:
    calls whose end was accepted (known to the test); ``in_flight``: calls that may have been
    accepted without the test knowing yet (a kill mid-run), so up to that many more stored is
    not a double count."""
    import json
    import os

    path = os.environ.get("LLMTALLY_RELIABILITY_REPORT")
    if not path:
        return
    line = {
        "scenario": scenario,
        "backend": backend,
        "sent": sent,
        "stored": stored,
        "in_flight": in_flight,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
