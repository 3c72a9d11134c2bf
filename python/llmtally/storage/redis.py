"""``redis://``, ``rediss://``, ``unix://`` and ``redis+cluster://``: usage hashes in Redis.

A batch is written in one round trip: a pipeline of EVALSHA calls of one Lua script, each
applying up to 512 keys' ``HINCRBY``s together with the flusher's sequence number, so a batch
retried after a lost reply is applied once. On a cluster the keys are grouped by hash slot (one
user's keys share a slot through the ``{user}`` hash tag) and each group's sequence marker lives
in that slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

from llmtally._core import Batch
from llmtally.errors import ConfigError, StoreError, StoreUnavailable
from llmtally.storage._limits import NO_LIMIT, BudgetState, RateResult

__all__ = ["APPLY_LUA", "BUDGET_LUA", "RATE_LUA", "RedisBackend"]

logger = logging.getLogger("llmtally")

#: KEYS[1]: the flusher marker hash; KEYS[2..]: usage hashes.
#: ARGV: flusher id, sequence, marker TTL (s), then per key: n, field, value, ... (n pairs).
#: Returns {1, refused keys...} when applied, {0} when this (flusher, seq) was applied before.
APPLY_LUA = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
local seq = tonumber(ARGV[2])
if seq <= last then return {0} end
local out = {1}
local a = 4
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  local ok = true
  for j = 0, n - 1 do
    if ARGV[a + 2 * j] == 'cost_pusd' then
      local cur = tonumber(redis.call('HGET', KEYS[i], 'cost_pusd') or '0')
      if math.abs(cur + tonumber(ARGV[a + 2 * j + 1])) > 9.2e18 then ok = false end
    end
  end
  if ok then
    for j = 0, n - 1 do
      redis.call('HINCRBY', KEYS[i], ARGV[a + 2 * j], ARGV[a + 2 * j + 1])
    end
  else
    out[#out + 1] = KEYS[i]
  end
  a = a + 2 * n
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return out
"""

_NOW_LUA = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: KEYS[1]: the usage hash; KEYS[2]: its reservations hash (id -> "expires_ms tokens pusd").
#: ARGV: now_ms ('' for the server's TIME); reserve id ('' for none), tokens, pusd, ttl_ms;
#: settle id ('' for none), tokens, pusd, ttl_ms; tokens limit, pusd limit (-1: none);
#: tokens adjust, pusd adjust; then ids to release.
#: Returns {ok, total_tokens, reserved_tokens, cost_pusd, reserved_pusd}.
BUDGET_LUA = (
    _NOW_LUA
    + """
local function fmt(x) return string.format('%.0f', x) end
for i = 14, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[6], fmt(now + tonumber(ARGV[9])) .. ' ' .. ARGV[7] .. ' '
    .. ARGV[8])
end
local rt, rp, last = 0, 0, 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local e, t, p = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  local exp = tonumber(e or '0')
  if exp <= now then
    redis.call('HDEL', KEYS[2], all[i])
  else
    rt = rt + tonumber(t)
    rp = rp + tonumber(p)
    if exp > last then last = exp end
  end
end
local ut = redis.call('HGET', KEYS[1], 'total_tokens') or '0'
local up = redis.call('HGET', KEYS[1], 'cost_pusd') or '0'
local function fits(used, reserved, adjust, amount, limit)
  if limit < 0 then return true end
  local committed = used + reserved + adjust
  if amount == 0 then return committed < limit end
  return committed + amount <= limit
end
local ok = 1
if ARGV[2] ~= '' then
  local at, ap = tonumber(ARGV[3]), tonumber(ARGV[4])
  if fits(tonumber(ut), rt, tonumber(ARGV[12]), at, tonumber(ARGV[10]))
      and fits(tonumber(up), rp, tonumber(ARGV[13]), ap, tonumber(ARGV[11])) then
    local exp = now + tonumber(ARGV[5])
    redis.call('HSET', KEYS[2], ARGV[2], fmt(exp) .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
    rt = rt + at
    rp = rp + ap
    if exp > last then last = exp end
  else
    ok = 0
  end
end
if rt ~= 0 or redis.call('HEXISTS', KEYS[1], 'reserved_tokens') == 1 then
  redis.call('HSET', KEYS[1], 'reserved_tokens', fmt(rt))
end
if rp ~= 0 or redis.call('HEXISTS', KEYS[1], 'reserved_pusd') == 1 then
  redis.call('HSET', KEYS[1], 'reserved_pusd', fmt(rp))
end
if last > 0 then redis.call('PEXPIRE', KEYS[2], fmt(last - now + 60000)) end
return {ok, ut, fmt(rt), up, fmt(rp)}
"""
)

#: KEYS: sliding windows (sorted sets of "weight id" scored by time in ms).
#: ARGV: now_ms ('' for the server's TIME), window_ms, member id, then per key: weight, limit.
#: Returns {1, 0, -1} when added everywhere, else {0, retry_after_ms, index of the window}.
RATE_LUA = (
    _NOW_LUA
    + """
local window = tonumber(ARGV[2])
local wait, refused = 0, -1
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local w, limit = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local entries = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  local total = 0
  for j = 1, #entries, 2 do total = total + tonumber(string.match(entries[j], '^(%d+) ')) end
  if total + w > limit then
    local ms = window
    if w <= limit then
      for j = 1, #entries, 2 do
        total = total - tonumber(string.match(entries[j], '^(%d+) '))
        if total + w <= limit then
          ms = math.max(1, tonumber(entries[j + 1]) + window - now)
          break
        end
      end
    end
    if ms > wait then
      wait = ms
      refused = i - 1
    end
  end
end
if refused >= 0 then return {0, wait, refused} end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2 + 2 * i] .. ' ' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[i], window + 1000)
end
return {1, 0, -1}
"""
)

#: KEYS[1]: a sliding window. ARGV: old member, new member ('' removes it).
RATE_UPDATE_LUA = """
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[1], at, ARGV[2]) end
return 1
"""

MARKER_TTL_S = 7 * 86_400
#: Limit operations one backend runs at once (the rest wait; the default pool holds 100).
LIMIT_CONCURRENCY = 64
CHUNK_KEYS = 512

_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    OSError,
    asyncio.TimeoutError,
)


def _translate(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, _UNAVAILABLE) or (
        isinstance(exc, rexc.RedisClusterException) and "down" in str(exc).lower()
    ):
        return StoreUnavailable(f"Redis unavailable during {what}: {exc}")
    return StoreError(f"Redis error during {what}: {exc}")


def _cluster_kwargs(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    netloc = parts.netloc
    auth, _, hosts = netloc.rpartition("@")
    nodes = []
    for hostport in hosts.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, "6379"
        if not host:
            raise ConfigError(f"Redis Cluster URL {url!r} names no host")
        try:
            nodes.append(ClusterNode(host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigError(f"bad port in Redis Cluster URL {url!r}") from None
    if not nodes or not nodes[0].host:
        raise ConfigError(f"Redis Cluster URL {url!r} names no host")
    kwargs: dict[str, Any] = {"startup_nodes": nodes}
    if auth:
        user, _, password = auth.partition(":")
        if password:
            kwargs["password"] = unquote(password)
            if user:
                kwargs["username"] = unquote(user)
        elif user:
            kwargs["password"] = unquote(user)
    query = parse_qs(parts.query)
    if query.get("ssl", ["false"])[0].lower() in ("1", "true", "yes"):
        kwargs["ssl"] = True
    return kwargs


class RedisBackend:
    """Usage hashes in Redis or Redis Cluster, through redis-py's asyncio client (hiredis)."""

    def __init__(self, url: str, *, socket_timeout_s: float = 5.0) -> None:
        self.url = url
        self.cluster = url.startswith("redis+cluster://")
        self.name = "redis-cluster" if self.cluster else "redis"
        self._timeout = socket_timeout_s
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sha: str | None = None
        self._node_clients: dict[str, Any] = {}
        self._shas: dict[str, str] = {}
        self._limit_gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        if self.cluster:
            _cluster_kwargs(url)  # validate now
        else:
            try:
                aioredis.connection.parse_url(url)
            except ValueError as exc:
                raise ConfigError(f"bad Redis URL {url!r}: {exc}") from None

    def _make_client(self) -> Any:
        common: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": self._timeout,
            "socket_connect_timeout": min(self._timeout, 2.0),
        }
        if self.cluster:
            # redis-py < 5.3 declares connection_pool abstract in its types (not at run time)
            return RedisCluster(**_cluster_kwargs(self.url), **common)  # type: ignore[abstract, unused-ignore]
        return aioredis.Redis.from_url(self.url, **common)

    def _get(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # redis-py clients belong to one event loop; a store used from another loop (a new
            # asyncio.run, interpreter exit) gets a client of its own.
            self._client = self._make_client()
            self._loop = loop
            self._node_clients = {}
        return self._client

    async def _eval_chunks(
        self,
        client: Any,
        calls: list[tuple[str, list[str], list[Any]]],
        flusher_id: str,
        seq: int,
        reloaded: bool = False,
        indices: list[int] | None = None,
    ) -> list[Any]:
        """One pipeline of EVALSHA calls to one server (``indices``: the chunks' numbers in the
        whole batch, when this is one node's share of it)."""
        sha = self._sha
        if sha is None:
            sha = self._sha = await client.script_load(APPLY_LUA)
        if indices is None:
            indices = list(range(len(calls)))

        def argv(index: int, args: list[Any]) -> list[Any]:
            # One batch seq per flush, one sub-sequence per chunk, so chunks are applied in order.
            return [flusher_id, seq * 65_536 + index, MARKER_TTL_S, *args]

        pipe = client.pipeline(transaction=False)
        for index, (marker, keys, args) in zip(indices, calls, strict=True):
            pipe.evalsha(sha, len(keys) + 1, marker, *keys, *argv(index, args))
        results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, rexc.NoScriptError) for r in results) and not reloaded:
            # The server lost its script cache (restart): load it and run again; chunks that
            # did apply are skipped by their sequence numbers.
            self._sha = await client.script_load(APPLY_LUA)
            return await self._eval_chunks(
                client, calls, flusher_id, seq, reloaded=True, indices=indices
            )
        for r in results:
            if isinstance(r, Exception):
                raise r
        return list(results)

    def _node_client(self, host: str, port: int) -> Any:
        name = f"{host}:{port}"
        found = self._node_clients.get(name)
        if found is None:
            kwargs = _cluster_kwargs(self.url)
            kwargs.pop("startup_nodes")
            found = self._node_clients[name] = aioredis.Redis(
                host=host,
                port=port,
                decode_responses=True,
                socket_timeout=self._timeout,
                socket_connect_timeout=min(self._timeout, 2.0),
                **kwargs,
            )
        return found

    async def _eval_cluster(
        self, client: Any, calls: list[tuple[str, list[str], list[Any]]], flusher_id: str, seq: int
    ) -> list[Any]:
        """One pipeline per cluster node: the chunks of the slots it serves, each an EVALSHA
        whose keys share one slot. A moved slot fails the flush, which is retried with the same
        sequence numbers after the slot map is refreshed."""
        await client.initialize()
        by_node: dict[str, tuple[Any, list[tuple[int, tuple[str, list[str], list[Any]]]]]] = {}
        for index, call in enumerate(calls):
            node = client.get_node_from_key(call[0])
            if node is None:
                # untyped in redis-py < 8
                raise rexc.ClusterDownError(  # type: ignore[no-untyped-call, unused-ignore]
                    f"no node serves the slot of {call[0]}"
                )
            by_node.setdefault(node.name, (node, []))[1].append((index, call))
        results: list[Any] = [None] * len(calls)

        async def run(node: Any, items: list[tuple[int, tuple[str, list[str], list[Any]]]]) -> None:
            node_client = self._node_client(node.host, node.port)
            out = await self._eval_chunks(
                node_client, [c for _, c in items], flusher_id, seq, indices=[i for i, _ in items]
            )
            for (index, _), result in zip(items, out, strict=True):
                results[index] = result

        try:
            await asyncio.gather(*(run(node, items) for node, items in by_node.values()))
        except rexc.ResponseError as exc:
            if str(exc).startswith(("MOVED", "ASK")):
                await client.initialize()  # refresh the slot map; the retry goes to the new owner
            raise
        return results

    async def apply(self, batch: Batch, flusher_id: str, seq: int) -> list[str]:
        calls = batch.lua_chunks(CHUNK_KEYS, self.cluster)
        if not calls:
            return []
        try:
            if self.cluster:
                results = await self._eval_cluster(self._get(), calls, flusher_id, seq)
            else:
                results = await self._eval_chunks(self._get(), calls, flusher_id, seq)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "flush") from exc
        refused: list[str] = []
        for r in results:
            refused.extend(str(k) for k in r[1:])
        return refused

    async def read(self, key: str) -> dict[str, int]:
        try:
            raw = await self._get().hgetall(key)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "read") from exc
        out = {}
        for field, value in raw.items():
            try:
                out[field] = int(value)
            except ValueError:
                continue
        return out

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        client = self._get()
        to_set = {f: v for f, v in fields.items() if v is not None}
        to_del = [f for f, v in fields.items() if v is None]
        try:
            if to_set:
                await client.hset(key, mapping=to_set)
            if to_del:
                await client.hdel(key, *to_del)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "write") from exc

    async def delete(self, key: str) -> None:
        try:
            await self._get().delete(key)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "delete") from exc

    async def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = f"llmtally:{{*}}:{cycle_start_date or '*'}"
        client = self._get()
        found: set[str] = set()
        try:
            async for key in client.scan_iter(match=pattern, count=1000):
                found.add(key)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "scan") from exc
        return sorted(k for k in found if not k.endswith(":flushed"))

    # -- limits (see storage/_limits.py for the semantics) ---------------------------------

    def _gate(self) -> asyncio.Semaphore:
        """Bounds the limit operations in flight, so a burst of calls queues for a connection
        instead of exhausting the pool (``Too many connections``)."""
        loop = asyncio.get_running_loop()
        gate = self._limit_gate
        if gate is None or gate[0] is not loop:
            gate = self._limit_gate = (loop, asyncio.Semaphore(LIMIT_CONCURRENCY))
        return gate[1]

    async def _script(self, script: str, keys: list[str], args: list[Any], what: str) -> Any:
        async with self._gate():
            return await self._script_now(script, keys, args, what)

    async def _script_now(self, script: str, keys: list[str], args: list[Any], what: str) -> Any:
        client = self._get()
        try:
            sha = self._shas.get(script)
            if sha is not None:
                try:
                    return await client.evalsha(sha, len(keys), *keys, *args)
                except rexc.NoScriptError:
                    pass  # the server lost its script cache (restart)
            self._shas[script] = await client.script_load(script)
            return await client.evalsha(self._shas[script], len(keys), *keys, *args)
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, what) from exc

    async def budget(
        self,
        key: str,
        *,
        reserve: tuple[str, int, int, int] | None = None,
        settle: tuple[str, int, int, int] | None = None,
        release: list[str] | None = None,
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        adjust: tuple[int, int] = (0, 0),
        now_ms: int | None = None,
    ) -> BudgetState:
        args: list[Any] = ["" if now_ms is None else now_ms]
        args.extend(reserve if reserve is not None else ("", 0, 0, 0))
        args.extend(settle if settle is not None else ("", 0, 0, 0))
        args.extend((*limits, *adjust))
        args.extend(release or ())
        r = await self._script(BUDGET_LUA, [key, key + ":reservations"], args, "budget")
        return BudgetState(bool(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]))

    async def claim_flag(self, key: str, field: str) -> bool:
        try:
            async with self._gate():
                return bool(await self._get().hsetnx(key, field, 1))
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "write") from exc

    async def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        args: list[Any] = ["" if now_ms is None else now_ms, window_ms, member]
        for weight, limit in zip(weights, limits, strict=True):
            args.extend((weight, limit))
        r = await self._script(RATE_LUA, keys, args, "rate limit")
        return RateResult(bool(r[0]), int(r[1]), int(r[2]))

    async def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        new = "" if weight is None else f"{weight} {member}"
        await self._script(RATE_UPDATE_LUA, [key], [f"{old_weight} {member}", new], "rate limit")

    async def ping(self) -> None:
        try:
            await self._get().ping()
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise _translate(exc, "ping") from exc

    async def aclose(self) -> None:
        nodes, self._node_clients = self._node_clients, {}
        for node_client in nodes.values():
            try:
                await node_client.aclose()
            except (rexc.RedisError, OSError, RuntimeError) as exc:
                logger.debug("closing a Redis Cluster node client: %r", exc)
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            try:
                await client.aclose()
            except (rexc.RedisError, OSError, RuntimeError) as exc:
                # Closing a client whose connections are already gone; nothing is lost here.
                logger.debug("closing the Redis client of %s: %r", self.url, exc)
