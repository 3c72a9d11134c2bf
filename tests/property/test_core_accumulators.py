"""The Rust ledger, histograms and cost math against plain-Python oracles."""

from __future__ import annotations

import json
import random
import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtally import _core
from llmtally.storage.keys import marker_key

N = len(_core.LEDGER_FIELDS)
deltas = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "llmtally:{u}:2026-11-01", "ü", ""]),
        st.lists(st.integers(min_value=0, max_value=10**9), min_size=N, max_size=N),
    ),
    max_size=60,
)
drain_points = st.sets(st.integers(min_value=0, max_value=60))


def add_up(batches: list[list[tuple[str, tuple[int, ...]]]]) -> dict[str, list[int]]:
    total: dict[str, list[int]] = {}
    for batch in batches:
        for key, counters in batch:
            acc = total.setdefault(key, [0] * N)
            for i, v in enumerate(counters):
                acc[i] += v
    return {k: v for k, v in total.items() if any(v)}


@settings(max_examples=200, deadline=None)
@given(deltas, drain_points, st.sets(st.integers(min_value=0, max_value=60)))
def test_drained_batches_sum_to_the_adds(
    adds: list[tuple[str, list[int]]], drains: set[int], failures: set[int]
) -> None:
    """Any interleaving of adds, drains and failed writes (the batch kept and written again
    before anything newer, as the flusher does) loses nothing; non-empty batches are numbered
    1, 2, ... and sorted by key."""
    ledger = _core.Ledger()
    written: list[list[tuple[str, tuple[int, ...]]]] = []
    retry: _core.Batch | None = None
    seqs: list[int] = []
    for i, (key, counters) in enumerate(adds):
        ledger.add_counters(key, counters)
        if i in drains:
            if retry is None:
                retry = ledger.drain()
                if len(retry):
                    seqs.append(retry.seq)
                    items = retry.items()
                    assert [k for k, _ in items] == sorted(k for k, _ in items)
            if i not in failures:  # the write succeeded
                written.append(retry.items())
                retry = None
    if retry is not None:
        written.append(retry.items())
    final = ledger.drain()
    if len(final):
        seqs.append(final.seq)
    written.append(final.items())
    assert seqs == list(range(1, len(seqs) + 1))
    assert add_up(written) == add_up([[(k, tuple(c)) for k, c in adds]])
    assert ledger.pending == 0


def test_concurrent_adders_and_drainers_lose_nothing() -> None:
    ledger = _core.Ledger()
    batches: list[list[tuple[str, tuple[int, ...]]]] = []
    stop = threading.Event()

    def adder(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20_000):
            ledger.add(f"user-{rng.randrange(50)}", 1, 1, 0, 0, 0, 0, 7, 1, 0, 0)

    def drainer() -> None:
        while not stop.is_set():
            batches.append(ledger.drain().items())

    threads = [threading.Thread(target=adder, args=(s,)) for s in range(4)]
    d = threading.Thread(target=drainer)
    d.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    d.join()
    batches.append(ledger.drain().items())
    totals = [0] * N
    for counters in add_up(batches).values():
        totals = [a + b for a, b in zip(totals, counters, strict=True)]
    assert totals == [80_000, 80_000, 0, 0, 0, 0, 560_000, 80_000, 0, 0]


def test_ledger_get_and_lua_chunks() -> None:
    ledger = _core.Ledger()
    ledger.add("k", total_tokens=15, prompt_tokens=10, completion_tokens=5, cost_pusd=99, calls=1)
    ledger.add("k", errors=1)
    assert ledger.get("k") == (15, 10, 5, 0, 0, 0, 99, 1, 1, 0)
    assert ledger.get("absent") == (0,) * N
    batch = ledger.drain()
    assert (batch.seq, ledger.drain().seq) == (1, 0)  # an empty drain is not numbered
    assert batch.lua_chunks() == [
        (None, 0, ["k"], [
            6, "total_tokens", 15, "prompt_tokens", 10, "completion_tokens", 5,
            "cost_pusd", 99, "calls", 1, "errors", 1,
        ]),
    ]  # fmt: skip
    assert (batch.unit_of("k"), batch.unit_of("absent")) == (0, None)
    assert json.loads(batch.sql_rows()) == [
        ["k", "total_tokens", 15], ["k", "prompt_tokens", 10], ["k", "completion_tokens", 5],
        ["k", "cost_pusd", 99], ["k", "calls", 1], ["k", "errors", 1],
    ]  # fmt: skip
    assert batch.totals() == (15, 10, 5, 0, 0, 0, 99, 1, 1, 0)


def test_cluster_chunks_keep_one_slot_per_script_call() -> None:
    ledger = _core.Ledger()
    keys = [f"llmtally:{{user-{i}}}:2026-11-01" for i in range(300)]
    for key in keys:
        ledger.add(key, total_tokens=1)
    batch = ledger.drain()
    chunks = batch.lua_chunks(max_keys=2, cluster=True)
    assert chunks == batch.lua_chunks(max_keys=2, cluster=True)  # the same split every time
    seen = []
    for unit, (tag, number, chunk_keys, args) in enumerate(chunks):
        assert number == unit
        assert tag is not None
        slot = _core.key_slot(marker_key("f", tag))
        assert 1 <= len(chunk_keys) <= 2
        assert all(batch.unit_of(k, 2, True) == unit for k in chunk_keys)
        assert all(_core.key_slot(k) == slot for k in chunk_keys)  # marker and keys share a slot
        assert args == [1, "total_tokens", 1] * len(chunk_keys)
        seen += chunk_keys
    assert sorted(seen) == sorted(keys)  # every key exactly once


def test_ledger_refuses_overflow_and_counts_it() -> None:
    ledger = _core.Ledger()
    ledger.add("k", cost_pusd=2**63 - 1)
    with pytest.raises(OverflowError, match="cost_pusd"):
        ledger.add("k", cost_pusd=1, calls=1)
    assert ledger.get("k")[6] == 2**63 - 1 and ledger.get("k")[7] == 0  # nothing half-applied
    assert ledger.overflows == 1
    with pytest.raises(ValueError):
        ledger.add_counters("k", [1, 2])
    with pytest.raises(OverflowError):
        ledger.add("k", total_tokens=2**64)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=500))
def test_histogram_percentiles_match_the_sorted_sample(values: list[float]) -> None:
    h = _core.Histogram(scale=1000.0)
    for v in values:
        h.record(v)
    ordered = sorted(round(v * 1000) / 1000 for v in values)
    assert h.count == len(values)
    for p in (50, 95, 99, 100):
        rank = max(1, -(-p * len(ordered) // 100))
        exact = ordered[rank - 1]
        got = h.percentile(p)
        assert got is not None
        assert abs(got - exact) <= 0.008 * exact + 0.001
    assert h.max == pytest.approx(ordered[-1], abs=1e-3)
    assert h.min == pytest.approx(ordered[0], abs=1e-3)


def test_histogram_merge_and_bad_values() -> None:
    a, b = _core.Histogram(), _core.Histogram()
    a.record(10.0)
    b.record(30.0, n=3)
    a.merge(b)
    assert (a.count, a.max, a.mean) == (4, 30.0, 25.0)
    assert a.percentiles([0, 100]) == [10.0, 30.0]
    assert _core.Histogram().percentile(50) is None
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            a.record(bad)
    with pytest.raises(ValueError):
        a.percentile(101)
    with pytest.raises(ValueError):
        a.merge(_core.Histogram(scale=1.0))


def oracle_cost(prices: dict[str, str], c: dict[str, int]) -> int:
    """Exact cost in pico-USD with Fractions, from the accounting rule in DESIGN.md."""
    per_token = {k: Fraction(v) * 10**6 for k, v in prices.items()}  # pUSD per token
    cost = (
        (c["prompt"] - c["cached"] - c["write"]) * per_token["input"]
        + c["cached"] * per_token["cache_read"]
        + (c["write"] - c["write_1h"]) * per_token["cache_write"]
        + c["write_1h"] * per_token["cache_write_1h"]
        + (c["completion"] - c["reasoning"]) * per_token["output"]
        + c["reasoning"] * per_token["reasoning"]
    )
    assert cost.denominator == 1
    return int(cost)


price = st.decimals(min_value=0, max_value=200, places=6).map(str)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            k: price
            for k in ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning")
        }
    ),
    st.integers(0, 10**7),
    st.integers(0, 10**6),
    st.data(),
)
def test_cost_is_exact(
    prices: dict[str, str], prompt: int, completion: int, data: st.DataObject
) -> None:
    cached = data.draw(st.integers(0, prompt))
    write = data.draw(st.integers(0, prompt - cached))
    counts = {
        "prompt": prompt,
        "completion": completion,
        "cached": cached,
        "write": write,
        "write_1h": data.draw(st.integers(0, write)),
        "reasoning": data.draw(st.integers(0, completion)),
    }
    p = _core.Prices(
        float(prices["input"]),
        float(prices["output"]),
        float(prices["cache_read"]),
        float(prices["cache_write"]),
        float(prices["cache_write_1h"]),
        float(prices["reasoning"]),
    )
    got = p.cost_pusd(
        prompt, completion, cached, counts["write"], counts["write_1h"], counts["reasoning"]
    )
    assert got == oracle_cost(prices, counts)


def test_cost_defaults_tiers_and_errors() -> None:
    p = _core.Prices(3.0, 15.0)  # cache and reasoning default to the input/output prices
    assert p.cost_pusd(prompt_tokens=1000, completion_tokens=100, cached_tokens=100) == (
        1000 * 3_000_000 + 100 * 15_000_000
    )
    tiered = _core.Prices(1.25, 10.0, tiers=[(200_000, 2.5, 15.0)])
    assert tiered.cost_pusd(200_001, 10) == 200_001 * 2_500_000 + 10 * 15_000_000
    assert tiered.cost_pusd(200_000, 10) == 200_000 * 1_250_000 + 10 * 10_000_000
    usage = _core.Usage(prompt_tokens=10, completion_tokens=5)
    assert p.usage_cost_pusd(usage) == 10 * 3_000_000 + 5 * 15_000_000
    assert p.usage_cost_pusd(_core.Usage(total_tokens=15)) is None  # unknown split
    with pytest.raises(ValueError, match="six decimals"):
        _core.Prices(0.0000001, 1.0)
    with pytest.raises(ValueError, match="exceed"):
        p.cost_pusd(prompt_tokens=1, cached_tokens=2)
    with pytest.raises(OverflowError):
        _core.Prices(1_000_000.0, 1.0).cost_pusd(prompt_tokens=999_999_999_999)
