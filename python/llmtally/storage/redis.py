"""``redis://``, ``rediss://``, ``unix://`` and ``redis+cluster://``: usage hashes in Redis.

A batch is written as EVALSHA calls of one Lua script, pipelined (one pipeline per node on a
cluster), each applying up to 512 keys' ``HINCRBY``s: a *unit* that succeeds or fails alone.
Each unit records ``seq`` under its own field in the flusher's marker hash (one marker per slot
on a cluster, next to the keys it writes), so a retried batch skips exactly the units already
applied, whichever of them failed. Inside a unit, every key is checked before anything is
written: a key whose sum would leave the signed 64-bit range, or whose stored field is not an
integer, is refused alone. A reply that is not the script's is a failed unit, never a success.

The client is redis-py's synchronous one (with hiredis): the store calls this backend from its
own threads, so no event loop owns a connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis import exceptions as rexc
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from llmtally._native import Batch
from llmtally.errors import ConfigError, StoreError, StoreUnavailable
from llmtally.storage._limits import NO_LIMIT, LeaseState, RateResult
from llmtally.storage.keys import MARKER_TTL_S, marker_key, reservations_key, usage_pattern

__all__ = ["APPLY_LUA", "LEASE_LUA", "RATE_LUA", "RedisBackend"]

logger = logging.getLogger("llmtally")

T = TypeVar("T")

#: One unit of a batch. KEYS[1]: the flusher's marker hash; KEYS[2..]: usage hashes.
#: ARGV: unit, seq, marker TTL (s), then per key: n, then n pairs of field, delta.
#: Returns {0} when this unit of batch seq (or a later one) was applied before, else
#: {1, refused keys...}.
APPLY_LUA = """
local done = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= done then return {0} end
-- Exact signed 64-bit addition of two decimal strings, in two limbs of 9 digits (Lua numbers
-- are doubles: exact only to 2^53).
local function limbs(s)
  local neg = string.sub(s, 1, 1) == '-'
  local d = neg and string.sub(s, 2) or s
  local n = #d
  local h = n > 9 and tonumber(string.sub(d, 1, n - 9)) or 0
  local l = tonumber(string.sub(d, math.max(1, n - 8)))
  if neg then return -h, -l end
  return h, l
end
local function inrange(h, l)
  if h > 9223372036 or (h == 9223372036 and l > 854775807) then return false end
  if h < -9223372036 or (h == -9223372036 and l < -854775808) then return false end
  return true
end
-- Whether HINCRBY would take `delta` on a field holding `cur` (false: absent): the stored value
-- must be an integer as Redis writes them (no sign on 0, no leading zeros, in range) and the sum
-- must stay in range. Anything HINCRBY would refuse is refused here, before any write.
local function fits(cur, delta)
  if cur == false then return true end
  if type(cur) ~= 'string' or #cur > 20 then return false end
  if cur ~= '0' and not string.match(cur, '^-?[1-9]%d*$') then return false end
  local c, d = tonumber(cur), tonumber(delta)
  if math.abs(c) < 4e15 and math.abs(d) < 4e15 then return true end
  local ch, cl = limbs(cur)
  if not inrange(ch, cl) then return false end
  local dh, dl = limbs(delta)
  local h, l = ch + dh, cl + dl
  if l >= 1e9 then
    l = l - 1e9; h = h + 1
  elseif l <= -1e9 then
    l = l + 1e9; h = h - 1
  end
  if h > 0 and l < 0 then
    h = h - 1; l = l + 1e9
  elseif h < 0 and l > 0 then
    h = h + 1; l = l - 1e9
  end
  return inrange(h, l)
end
local out = {1}
local accepted = {}
local a = 4
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  local fields = {}
  for j = 0, n - 1 do fields[#fields + 1] = ARGV[a + 1 + 2 * j] end
  local ok = true
  local current = redis.pcall('HMGET', KEYS[i], unpack(fields))
  if type(current) ~= 'table' or current.err then
    ok = false
  else
    for j = 0, n - 1 do
      if not fits(current[j + 1], ARGV[a + 2 + 2 * j]) then ok = false end
    end
  end
  if ok then accepted[#accepted + 1] = {i, a} else out[#out + 1] = KEYS[i] end
  a = a + 1 + 2 * n
end
for _, k in ipairs(accepted) do
  local i, b = k[1], k[2]
  for j = 0, tonumber(ARGV[b]) - 1 do
    redis.call('HINCRBY', KEYS[i], ARGV[b + 1 + 2 * j], ARGV[b + 2 + 2 * j])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return out
"""

#: KEYS[1]: a usage hash; KEYS[2]: a flusher's marker. ARGV[1]: a unit. One atomic read of the
#: hash and of the last batch that unit applied.
READ_LUA = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGET', KEYS[2], ARGV[1]) or '0'}
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

#: KEYS[1]: the usage hash; KEYS[2]: its leases (keys.reservations_key), a hash of
#: id -> "expires_ms tokens pusd".
#: ARGV: now_ms ('' for the server's TIME); lease id ('' to read only); ttl_ms; want ('' for a
#: plain renewal: base only); then per unit (tokens, pusd): base, want, slice, limit (-1: none);
#: then '1' when the hash's `limit` field caps the tokens.
#: Returns {ok, total_tokens, cost_pusd, others tokens, others pusd, held tokens, held pusd,
#: token limit applied}
#: (semantics: storage/_limits.py, LocalLimits.lease).
LEASE_LUA = (
    _NOW_LUA
    + """
local function fmt(x) return string.format('%.0f', x) end
local id = ARGV[2]
if id ~= '' then redis.call('HDEL', KEYS[2], id) end
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
local limit_t = tonumber(ARGV[8])
if ARGV[13] == '1' then
  local stored = tonumber(redis.call('HGET', KEYS[1], 'limit') or '')
  if stored then
    if limit_t < 0 or stored < limit_t then limit_t = stored end
  end
end
local function grant(used, others, base, want, slice, limit)
  if ARGV[4] == '' then return true, base end
  if limit >= 0 then
    local committed = used + others + base
    if want == 0 then
      if committed >= limit then return false, base end
    elseif committed + want > limit then
      return false, base
    end
  end
  local need = base + want
  if limit < 0 then return true, need + slice end
  return true, need + math.max(0, math.min(slice, limit - used - others - need))
end
local ok, ht, hp = 1, 0, 0
if id ~= '' then
  local a = tonumber
  local okt, gt = grant(a(ut), rt, a(ARGV[5]), a(ARGV[6]), a(ARGV[7]), limit_t)
  local okp, gp = grant(a(up), rp, a(ARGV[9]), a(ARGV[10]), a(ARGV[11]), a(ARGV[12]))
  if okt and okp then
    ht, hp = gt, gp
  else
    ok, ht, hp = 0, a(ARGV[5]), a(ARGV[9])
  end
  if ht ~= 0 or hp ~= 0 then
    local exp = now + a(ARGV[3])
    redis.call('HSET', KEYS[2], id, fmt(exp) .. ' ' .. fmt(ht) .. ' ' .. fmt(hp))
    if exp > last then last = exp end
  end
end
if rt + ht ~= 0 or redis.call('HEXISTS', KEYS[1], 'reserved_tokens') == 1 then
  redis.call('HSET', KEYS[1], 'reserved_tokens', fmt(rt + ht))
end
if rp + hp ~= 0 or redis.call('HEXISTS', KEYS[1], 'reserved_pusd') == 1 then
  redis.call('HSET', KEYS[1], 'reserved_pusd', fmt(rp + hp))
end
if last > 0 then redis.call('PEXPIRE', KEYS[2], fmt(last - now + 60000)) end
return {ok, ut, up, fmt(rt), fmt(rp), fmt(ht), fmt(hp), fmt(limit_t)}
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

#: Keys per unit: one EVALSHA applies at most this many.
CHUNK_KEYS = 512
#: Connections per backend (the flusher and the store's I/O threads share them).
MAX_CONNECTIONS = 32

_ERRORS = (rexc.RedisError, rexc.RedisClusterException, OSError)
_UNAVAILABLE = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    OSError,
)


def _translate(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, _UNAVAILABLE) or (
        isinstance(exc, rexc.RedisClusterException)
        and any(w in str(exc).lower() for w in ("down", "cannot be connected"))
    ):
        return StoreUnavailable(f"Redis unavailable during {what}: {exc}")
    return StoreError(f"Redis error during {what}: {exc}")


def _unit_result(reply: Any) -> list[str] | None:
    """The refused keys of one unit's reply (``None``: not a reply of APPLY_LUA)."""
    if not isinstance(reply, list) or not reply or reply[0] not in (0, 1):
        return None
    if reply[0] == 0:
        return [] if len(reply) == 1 else None
    rest = reply[1:]
    return rest if all(isinstance(k, str) for k in rest) else None


def _fields(flat: Any) -> dict[str, int]:
    """An HGETALL reply (a flat list from Lua, a dict from redis-py) as integer fields."""
    pairs = flat.items() if isinstance(flat, dict) else zip(flat[::2], flat[1::2], strict=True)
    out = {}
    for field, value in pairs:
        try:
            out[field] = int(value)
        except (TypeError, ValueError):
            continue
    return out


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
            # untyped in redis-py < 6
            nodes.append(ClusterNode(host.strip("[]"), int(port)))  # type: ignore[no-untyped-call, unused-ignore]
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
    """Usage hashes in Redis or Redis Cluster, through redis-py's synchronous client."""

    blocking = True

    def __init__(self, url: str, *, socket_timeout_s: float = 5.0) -> None:
        self.url = url
        self.cluster = url.startswith("redis+cluster://")
        self.name = "redis-cluster" if self.cluster else "redis"
        self._timeout = socket_timeout_s
        self._common: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": min(socket_timeout_s, 2.0),
        }
        self._pool: Any = None
        if self.cluster:
            self._cluster_kwargs = _cluster_kwargs(url)  # validated now, connected on first use
        else:
            try:
                # (redis-py < 6 leaves from_url, Retry and NoBackoff untyped)
                self._pool = redis.BlockingConnectionPool.from_url(  # type: ignore[no-untyped-call, unused-ignore]
                    url, max_connections=MAX_CONNECTIONS, timeout=socket_timeout_s, **self._common
                )
            except ValueError as exc:
                raise ConfigError(f"bad Redis URL {url!r}: {exc}") from None
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The redis-py client, built on first use (a cluster client connects when built)."""
        client = self._client
        if client is None:
            with self._client_lock:
                client = self._client
                if client is None:
                    client = self._client = self._connect()
        return client

    def _connect(self) -> Any:
        client: Any
        if self.cluster:
            # redis-py < 5.3 declares connection_pool abstract in its types (not at run time)
            client = RedisCluster(  # type: ignore[abstract, unused-ignore]
                **self._cluster_kwargs, max_connections=MAX_CONNECTIONS, **self._common
            )
        else:
            # The flusher retries whole batches itself (each unit applies once).
            no_retry = Retry(NoBackoff(), 0)  # type: ignore[no-untyped-call, unused-ignore]
            client = redis.Redis(connection_pool=self._pool, retry=no_retry)
        register = client.register_script
        self._apply_script = register(APPLY_LUA)
        self._read_script = register(READ_LUA)
        self._lease_script = register(LEASE_LUA)
        self._rate_script = register(RATE_LUA)
        self._rate_update_script = register(RATE_UPDATE_LUA)
        return client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            _ = self.client  # connects on first use
            return fn()
        except _ERRORS as exc:
            raise _translate(exc, what) from exc

    # -- usage ---------------------------------------------------------------------------------

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        chunks = batch.lua_chunks(CHUNK_KEYS, self.cluster)
        if not chunks:
            return []
        seq = batch.seq
        groups: dict[str, tuple[Any, list[int]]] = {}
        if self.cluster:
            try:
                _ = self.client
                for index, (tag, *_rest) in enumerate(chunks):
                    node = self.client.get_node_from_key(marker_key(flusher_id, tag))
                    if node is None:
                        raise StoreUnavailable(f"Redis Cluster: no node serves slot tag {tag}")
                    client = self.client.get_redis_connection(node)
                    groups.setdefault(node.name, (client, []))[1].append(index)
            except _ERRORS as exc:
                raise _translate(exc, "flush") from exc
        else:
            groups[""] = (self._call("flush", lambda: self.client), list(range(len(chunks))))
        results: list[Any] = [None] * len(chunks)
        for client, indices in groups.values():
            replies = self._evalsha_units(client, [chunks[i] for i in indices], flusher_id, seq)
            for index, reply in zip(indices, replies, strict=True):
                results[index] = reply
        refused: list[str] = []
        failed: list[str] = []
        for reply in results:
            if isinstance(reply, BaseException):
                failed.append(f"{type(reply).__name__}: {reply}")
                continue
            unit_refused = _unit_result(reply)
            if unit_refused is None:
                failed.append(f"unexpected reply {reply!r:.80}")
            else:
                refused.extend(unit_refused)
        if failed:
            moved = (rexc.MovedError, rexc.AskError, rexc.TryAgainError, rexc.ClusterDownError)
            if self.cluster and any(isinstance(r, moved) for r in results):
                try:
                    self.client.nodes_manager.initialize()  # the retry goes to the new owner
                except _ERRORS as exc:
                    logger.debug("refreshing the cluster slots: %r", exc)
            cls = (
                StoreUnavailable
                if any(isinstance(r, _UNAVAILABLE) for r in results)
                else StoreError
            )
            raise cls(
                f"Redis flush: {len(failed)} of {len(chunks)} units failed (the others are "
                f"applied; the failed ones are retried): {failed[0]}"
            )
        return refused

    def _evalsha_units(
        self, client: Any, chunks: list[Any], flusher_id: str, seq: int
    ) -> list[Any]:
        """One pipeline of the units' EVALSHA calls to one server: their replies, or the error
        of each. The script is loaded only when the server says it lacks it (a restart): no
        round trip to check first. Units applied before a reload are skipped by their
        markers."""
        script = self._apply_script
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for tag, unit, keys, args in chunks:
                marker = marker_key(flusher_id, tag)
                pipe.evalsha(
                    script.sha, len(keys) + 1, marker, *keys, unit, seq, MARKER_TTL_S, *args
                )
            try:
                replies: list[Any] = pipe.execute(raise_on_error=False)
            except _ERRORS as exc:
                return [exc] * len(chunks)
            if attempt or not any(isinstance(r, rexc.NoScriptError) for r in replies):
                return replies
            try:
                script.sha = client.script_load(script.script)
            except _ERRORS as exc:
                return [exc] * len(chunks)
        return replies

    def applied(self, key: str, batch: Batch, flusher_id: str) -> tuple[dict[str, int], bool]:
        unit = batch.unit_of(key, CHUNK_KEYS, self.cluster)
        if unit is None:
            return self.read(key), True
        tag = None
        if self.cluster:
            chunks = batch.lua_chunks(CHUNK_KEYS, self.cluster)
            tag = chunks[unit][0]
        marker = marker_key(flusher_id, tag)
        reply = self._call("read", lambda: self._read_script(keys=[key, marker], args=[unit]))
        return _fields(reply[0]), int(reply[1]) >= batch.seq

    def read(self, key: str) -> dict[str, int]:
        return _fields(self._call("read", lambda: self.client.hgetall(key)))

    def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        to_set = {f: v for f, v in fields.items() if v is not None}
        to_del = [f for f, v in fields.items() if v is None]

        def write() -> None:
            if to_set:
                self.client.hset(key, mapping=to_set)
            if to_del:
                self.client.hdel(key, *to_del)

        self._call("write", write)

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.delete(key))

    def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = usage_pattern(cycle_start_date)
        found = self._call("scan", lambda: set(self.client.scan_iter(match=pattern, count=1000)))
        return sorted(found)

    def ping(self) -> None:
        self._call("ping", lambda: self.client.ping())

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        except _ERRORS as exc:
            logger.debug("closing the Redis client of %s: %r", self.url, exc)

    def after_fork(self) -> None:
        # redis-py's pools notice the new pid and open new connections in the child.
        return None

    # -- limits (see storage/_limits.py for the semantics) ---------------------------------

    def lease(
        self,
        key: str,
        lease_id: str,
        *,
        base: tuple[int, int] = (0, 0),
        want: tuple[int, int] | None = None,
        slice_: tuple[int, int] = (0, 0),
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        ttl_ms: int = 0,
        now_ms: int | None = None,
        stored_limit: bool = False,
    ) -> LeaseState:
        wanted = (0, 0) if want is None else want
        args: list[Any] = ["" if now_ms is None else now_ms, lease_id, ttl_ms]
        args.append("" if want is None else 1)
        for unit in (0, 1):
            args.extend((base[unit], wanted[unit], slice_[unit], limits[unit]))
        args.append(1 if stored_limit else "")
        keys = [key, reservations_key(key)]
        r = self._call("lease", lambda: self._lease_script(keys=keys, args=args))
        return LeaseState(bool(r[0]), *(int(x) for x in r[1:8]))

    def claim_flag(self, key: str, field: str) -> bool:
        return bool(self._call("write", lambda: self.client.hsetnx(key, field, 1)))

    def rate_acquire(
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
        r = self._call("rate limit", lambda: self._rate_script(keys=keys, args=args))
        return RateResult(bool(r[0]), int(r[1]), int(r[2]))

    def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        new = "" if weight is None else f"{weight} {member}"
        old = f"{old_weight} {member}"
        self._call("rate limit", lambda: self._rate_update_script(keys=[key], args=[old, new]))
