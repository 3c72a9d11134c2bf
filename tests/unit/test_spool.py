"""The spool (``open_store(url, spool=path)``): every delta journaled before it is accepted,
written by the next store opened on the spool when the process died, exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtally import ConfigError, StoreUnavailable, open_store
from llmtally._core import Batch
from llmtally.storage.keys import usage_key
from llmtally.storage.memory import MemoryBackend
from llmtally.storage.store import Store

from helpers import report

CYCLE = "2026-12-01"

CHILD = """
import asyncio, os, sys
import llmtally
url, spool, calls, mode, progress = sys.argv[1:6]
calls = int(calls)
page = None
if progress != "-":
    import mmap
    with open(progress, "r+b") as f:
        page = mmap.mmap(f.fileno(), 8)
done = 0
# "held" and "applied" write only when told (a timed flush could die before "done" is
# printed, on a slow machine); "flushing" writes all along.
store = llmtally.open_store(url, spool=spool, flush_interval_s=0.01 if mode == "flushing" else 3600)
manager = llmtally.CallbackManager([llmtally.UsageRecorder(store=store)])
messages = [{"role": "user", "content": "hi"}]
response = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
if mode == "applied":
    real = store.backend.apply
    def apply_then_die(batch, flusher_id):
        real(batch, flusher_id)
        os._exit(9)  # killed after the store took the batch, before its spool file was removed
    store.backend.apply = apply_then_die

async def one(i):
    global done
    async with manager.llm_call(messages, model="gpt-4o", user_id=f"u{i % 13}",
                                cycle_start_date="2026-12-01") as call:
        await asyncio.sleep(0)
        call.set_response(response)
    done += 1
    if page is not None:
        page[0:8] = done.to_bytes(8, "little")

async def main():
    for start in range(0, calls, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(calls, start + 100))))
    print("done", flush=True)
    if mode == "applied":
        store.flush_sync()
    await asyncio.sleep(60)

asyncio.run(main())
"""


def run_child(
    url: str, spool: Path, calls: int, mode: str, progress: str = "-"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), url, str(spool), str(calls), mode, progress],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def stored(url: str, spool: Path | None = None) -> tuple[int, int]:
    store = open_store(url, flush_interval_s=3600, spool=spool)
    calls = tokens = 0
    await store.flush()  # writes what a dead process left in the spool
    for key in await store.usage_keys(CYCLE):
        fields = await store.read(key)
        calls += fields.get("calls", 0)
        tokens += fields.get("total_tokens", 0)
    await store.aclose()
    return calls, tokens


async def test_sigkill_loses_nothing_with_a_spool(tmp_path: Path) -> None:
    url, spool = f"sqlite:///{tmp_path}/s.db", tmp_path / "spool"
    proc = run_child(url, spool, 3000, "held")  # nothing is flushed before the kill
    assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert await stored(url) == (0, 0)  # nothing reached the store
    got = await stored(url, spool)
    report("SIGKILL, spool, nothing flushed before", "sqlite", 3000, got[0])
    assert got == (3000, 15000)  # all of it was in the spool
    assert await stored(url, spool) == (3000, 15000)  # and it is written once
    assert sorted(p.name for p in spool.iterdir()) == []  # nothing left behind


async def test_a_batch_written_just_before_the_kill_is_not_written_again(tmp_path: Path) -> None:
    url, spool = f"sqlite:///{tmp_path}/s.db", tmp_path / "spool"
    proc = run_child(url, spool, 1000, "applied")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
    proc.communicate(timeout=30)
    assert proc.returncode == 9
    assert any(p.suffix == ".journal" for p in spool.iterdir())  # the file stayed
    got = await stored(url, spool)
    report("SIGKILL right after a batch was written (spool)", "sqlite", 1000, got[0])
    assert got == (1000, 5000)  # replayed, and skipped by the marker


@pytest.mark.parametrize("seed", range(3))
async def test_sigkill_while_flushing_neither_loses_nor_doubles(tmp_path: Path, seed: int) -> None:
    url, spool = f"sqlite:///{tmp_path}/s.db", tmp_path / "spool"
    progress = tmp_path / "progress"
    progress.write_bytes(b"\0" * 8)
    proc = run_child(url, spool, 200_000, "flushing", str(progress))
    await asyncio.sleep(0.5 + 0.3 * seed)  # somewhere in the middle of the run, flushing
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    finished = int.from_bytes(progress.read_bytes(), "little")
    assert finished > 1000  # the kill came while calls (and flushes) were going on
    calls, tokens = await stored(url, spool)
    report("SIGKILL while flushing, spool", "sqlite", finished, calls, in_flight=100)
    # Every call that finished is counted, and none twice: at most the 100 calls in flight at
    # the kill had their end accepted without being counted by the child yet.
    assert finished <= calls <= finished + 100, (finished, calls)
    assert tokens == 5 * calls
    assert list(spool.iterdir()) == []


async def test_the_spool_of_a_live_process_or_another_store_is_left_alone(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    live = open_store(f"sqlite:///{tmp_path}/a.db", flush_interval_s=3600, spool=spool)
    live.add(usage_key("a", CYCLE), calls=1)
    other = open_store(f"sqlite:///{tmp_path}/b.db", flush_interval_s=3600, spool=spool)
    assert await other.flush()
    assert (other.backend.read(usage_key("a", CYCLE))) == {}  # not b's, and a is alive
    await other.aclose()
    assert await live.flush()
    assert live.backend.read(usage_key("a", CYCLE)) == {"calls": 1}
    await live.aclose()


class Down(MemoryBackend):
    """A store that is down until ``up`` is set."""

    up = False

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        if not self.up:
            raise StoreUnavailable("down")
        return super().apply(batch, flusher_id)


async def test_past_max_pending_deltas_wait_in_the_spool_not_in_memory(tmp_path: Path) -> None:
    backend = Down()
    spool = tmp_path / "spool"
    store = Store(backend, url="memory://down", flush_interval_s=3600, max_pending=100, spool=spool)
    for _wave in range(3):
        for i in range(1000):
            store.add(usage_key(f"user-{i}", CYCLE), total_tokens=1, calls=1)
        assert await store.flush() is False
        assert (store.ledger.pending, store._flusher.retry) == (0, None)  # all in the spool
    health = await store.health()
    assert health["spilled_batches"] == 3 and health["pending_deltas"] == 3000
    assert len(list(spool.glob("*.journal"))) == 4  # three spilled batches and the open one
    backend.up = True
    assert await store.flush() is True
    assert backend.data[usage_key("user-7", CYCLE)] == {"total_tokens": 3, "calls": 3}
    written = sum(v.get("calls", 0) for v in backend.data.values())
    report("outage past max_pending, backlog in the spool", "memory", 3000, written)
    assert len(backend.data) == 1000
    health = await store.health()
    assert health["spilled_batches"] == 0 and health["pending_deltas"] == 0
    await store.aclose()


def test_a_spool_must_be_a_writable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError):
        open_store("memory://", spool=blocker / "spool")


def test_a_journal_write_that_fails_keeps_the_delta_and_says_so(tmp_path: Path) -> None:
    """The spool's disk fails (here: a file size limit, which binds root too): the deltas stay
    in memory and are written to the store; health says the spool failed."""
    code = """
    import asyncio, json, resource, signal, sys, llmtally
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = llmtally.open_store("memory://", spool=sys.argv[1], flush_interval_s=3600)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    for i in range(1000):
        store.add(f"llmtally:{{u{i}}}:2026-12-01", total_tokens=2, calls=1)
    async def main():
        assert await store.flush()
        health = await store.health()
        calls = sum(v.get("calls", 0) for v in store.backend.data.values())
        print(json.dumps([health["status"], health["spool_errors"], health["last_error"], calls]))
    asyncio.run(main())
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "spool")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    status, errors, error, calls = json.loads(out)
    assert status == "unhealthy" and errors > 0 and "File too large" in error
    assert calls == 1000  # every delta accepted reached the store


@pytest.mark.parametrize("room", [0, 2], ids=["no-header", "two-records"])
def test_a_store_down_while_the_spool_disk_fails_keeps_and_writes_every_delta(
    tmp_path: Path, room: int
) -> None:
    """Past max_pending, deltas move to the spool, but only generations whose every record
    reached the disk: with a failing disk (a file size limit) the others stay in memory. No
    delta is dropped and an unreadable file never wedges the flusher."""
    code = """
    import json, resource, signal, sys
    from llmtally._core import Batch
    from llmtally.storage.memory import MemoryBackend
    from llmtally.storage.store import Store
    from llmtally.errors import StoreUnavailable
    class Down(MemoryBackend):
        up = False
        def apply(self, batch, flusher_id):
            if not self.up:
                raise StoreUnavailable("down")
            return super().apply(batch, flusher_id)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    key = "llmtally:{{u{}}}:2026-12-01".format
    record = 4 + len(key(0)) + 80 + 4
    backend = Down()
    store = Store(backend, url="memory://down", spool=sys.argv[1], max_pending=1,
                  flush_interval_s=3600)
    resource.setrlimit(resource.RLIMIT_FSIZE, (24 + int(sys.argv[2]) * record,) * 2)
    for wave in range(3):
        for i in range(6):
            store.add(key(wave * 6 + i), calls=1)
        assert store.flush_sync() is False
    backend.up = True
    results = [store.flush_sync() for _ in range(2)]
    calls = sum(v.get("calls", 0) for v in backend.data.values())
    print(json.dumps([results, calls, store._flusher.pending, store.ledger.journal_errors[0] > 0]))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "spool"), str(room)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    results, calls, pending, journal_failed = json.loads(out.stdout)
    report(f"store down and spool disk full ({room} records fit)", "memory", 18, calls)
    assert (calls, pending, journal_failed) == (18, 0, True)
    assert results[-1] is True
