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

__all__ = ["APPLY_LUA", "RedisBackend"]

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

MARKER_TTL_S = 7 * 86_400
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
            return RedisCluster(**_cluster_kwargs(self.url), **common)
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
                raise rexc.ClusterDownError(f"no node serves the slot of {call[0]}")
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
