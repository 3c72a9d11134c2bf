"""``import llmtally`` has no side effects: no Prometheus collector, no fork or exit hook. They
are registered when first needed, and forked workers still make distinct ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

# Runs in a fresh interpreter: records the fork and exit hooks llmtally's own code registers.
_PROBE = """
import atexit, json, os, sys

hooks = []
real_fork, real_atexit = os.register_at_fork, atexit.register

def mine(fn):
    return (getattr(fn, "__module__", None) or "").startswith("llmtally")

def register_at_fork(**kwargs):
    hooks.extend(f"fork:{fn.__module__}" for fn in kwargs.values() if mine(fn))
    return real_fork(**kwargs)

def register(fn, *args, **kwargs):
    if mine(fn):
        hooks.append(f"atexit:{fn.__module__}")
    return real_atexit(fn, *args, **kwargs)

os.register_at_fork, atexit.register = register_at_fork, register

import llmtally, llmtally.dispatch, llmtally.metrics, llmtally.cli
import llmtally.storage.sqlite, llmtally.storage.redis, llmtally.storage.memory
from llmtally._observe import state

out = {"hooks_at_import": list(hooks), "metrics_on_at_import": state.on}
try:
    import prometheus_client
except ImportError:
    out["collector_at_import"] = None
else:
    names = {m.name for c in list(prometheus_client.REGISTRY._collector_to_names)
             for m in c.collect()}
    out["collector_at_import"] = any(n.startswith("llmtally_") for n in names)
manager = llmtally.CallbackManager([])
out["hooks_after_manager"] = sorted(set(hooks))
print(json.dumps(out))
"""


def _run(code: str, **env: str) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMTALLY_METRICS")}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_import_registers_no_collector_and_no_hook() -> None:
    found = _run(_PROBE)
    assert found["hooks_at_import"] == []
    assert found["metrics_on_at_import"] is False
    assert found["collector_at_import"] in (False, None)  # None: prometheus_client absent
    # Registered when first needed: the first manager makes ids (and watches forks).
    assert "fork:llmtally._ids" in found["hooks_after_manager"]
    assert "fork:llmtally._tables" in found["hooks_after_manager"]


_FORKED_IDS = """
import asyncio, json, os, sys
import llmtally
from llmtally.dispatch import new_id

def ids_of_a_worker():
    manager = llmtally.CallbackManager([])
    async def call():
        async with manager.llm_call([{"role": "user", "content": "hi"}]) as c:
            c.set_response({"prompt_tokens": 1, "completion_tokens": 1})
        return c.request_id
    return [asyncio.run(call()), new_id()]

def fork_workers(n):
    # Workers forked from this process, each making ids and sending them back.
    found = []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, json.dumps(ids_of_a_worker()).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            found.extend(json.loads(f.read()))
        os.waitpid(pid, 0)
    return found

# Forked before any id was made (a pre-fork server that imports, then forks its workers), then
# after the parent made ids of its own.
before = fork_workers(3)
parent = ids_of_a_worker()
after = fork_workers(3)
print(json.dumps({"before": before, "parent": parent, "after": after}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_workers_make_distinct_ids() -> None:
    found = _run(_FORKED_IDS, LLMTALLY_METRICS="0")
    ids = [i for key in ("before", "parent", "after") for i in found[key]]
    assert len(ids) == 14
    assert len(set(ids)) == len(ids)
    prefixes = {i.rsplit("-", 1)[0] for i in ids}
    assert len(prefixes) == 7  # one per process
