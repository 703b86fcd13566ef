"""A small RESP2 client for the Redis tier's bulk path: pipelined GET/SET/EXISTS, values without extra copies.

Large values are sent straight from the caller's buffers (`sendmsg`) and received straight into their
final buffers (`recv_into`); every socket operation has a timeout. Error replies inside a pipeline come
back as `ReplyError` objects in place; transport failures raise `OSError` (`ConnectionError`,
`TimeoutError`, `ssl.SSLError`, `ProtocolError`). The P2P index's lookups on a single server use its
connections too (`nencache.tiers.peer.index`). Everything else (topology, control commands) uses
redis-py; see `nencache.tiers.redis.control` and benchmarks/RESULTS.md for why this one stays.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Iterable, Sequence
from typing import Self, TypeAlias

from nencache.net.buffers import BufferPool
from nencache.tiers.redis.url import Address, RedisTarget

Arg: TypeAlias = "bytes | bytearray | memoryview | str | int"
Reply: TypeAlias = "None | int | bytes | memoryview | list[Reply] | ReplyError"
Command: TypeAlias = "Sequence[Arg]"

_BIG = 1 << 14  # arguments this large are sent from their own buffer instead of being copied
_READ_BUF = 1 << 18
_MAX_BULK = 1 << 33
_MAX_ARRAY = 1 << 24
_IOV_MAX = 512
RECV_BUFFERS = BufferPool(128 << 20)  # large values land in reused memory (see nencache.net.buffers)


class ReplyError(Exception):
    """An error reply from the server, e.g. `MOVED 3999 127.0.0.1:7002` or `OOM ...`."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class ProtocolError(ConnectionError):
    """The server sent bytes that are not valid RESP; the connection is unusable."""


def pack(commands: Iterable[Command]) -> list[bytes | bytearray | memoryview]:
    """Encode commands as RESP arrays; large arguments stay in their own buffers (no copy)."""
    out: list[bytes | bytearray | memoryview] = []
    small = bytearray()
    for command in commands:
        small += b"*%d\r\n" % len(command)
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, memoryview) and (arg.format != "B" or arg.ndim != 1):
                arg = arg.cast("B")
            small += b"$%d\r\n" % len(arg)
            if len(arg) >= _BIG:
                out.append(small)
                out.append(arg)
                small = bytearray(b"\r\n")
            else:
                small += arg
                small += b"\r\n"
    if small:
        out.append(small)
    return out


def _open_socket(address: Address, timeout: float, ctx: ssl.SSLContext | None) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=address[0])
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


class Connection:
    """One socket to one Redis server, authenticated and on the right database."""

    def __init__(self, address: Address, target: RedisTarget, timeout: float,
                 ctx: ssl.SSLContext | None = None, generation: int = 0) -> None:
        self.address = address
        self.generation = generation
        self._sock = _open_socket(address, timeout, ctx)
        self._tls = isinstance(self._sock, ssl.SSLSocket)
        self._buf = bytearray(_READ_BUF)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.into: memoryview | None = None  # where the next bulk reply goes, if it is exactly this long
        try:
            hello: list[Command] = []
            if target.password is not None:
                hello.append(("AUTH", target.username, target.password) if target.username else ("AUTH", target.password))
            if target.db:
                hello.append(("SELECT", target.db))
            if hello:
                self.send(hello)
                for reply in self.read(len(hello)):
                    if isinstance(reply, ReplyError):
                        raise reply
        except BaseException:
            self.close()
            raise

    def call(self, *args: Arg) -> Reply:
        """Send one command and return its reply; raise `ReplyError` for an error reply."""
        self.send([args])
        reply = self.read_reply()
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def send(self, commands: Iterable[Command]) -> None:
        """Write a pipeline of commands (their replies are read with `read`)."""
        buffers = pack(commands)
        if self._tls:
            for buf in buffers:
                self._sock.sendall(buf)
            return
        views = [memoryview(b) for b in buffers]
        i = 0
        while i < len(views):
            sent = self._sock.sendmsg(views[i:i + _IOV_MAX])
            while sent:
                size = len(views[i])
                if sent >= size:
                    sent -= size
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0

    def read(self, count: int) -> list[Reply]:
        """The next `count` replies, error replies included as `ReplyError` objects."""
        return [self.read_reply() for _ in range(count)]

    def read_reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = self._int(rest)
            if size == -1:
                return None
            if not 0 <= size <= _MAX_BULK:
                raise ProtocolError(f"bad bulk length {size}")
            return self._bulk(size)
        if kind == b"*":
            count = self._int(rest)
            if count == -1:
                return None
            if not 0 <= count <= _MAX_ARRAY:
                raise ProtocolError(f"bad array length {count}")
            return [self.read_reply() for _ in range(count)]
        if kind == b"+":
            return rest
        if kind == b":":
            return self._int(rest)
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        raise ProtocolError(f"unexpected reply type {line[:20]!r}")

    def idle_ok(self) -> bool:
        """True if the connection has no unread bytes and the server has not closed it."""
        if self._start != self._end:
            return False
        try:
            ready, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not ready

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _int(text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise ProtocolError(f"bad integer {text[:20]!r} in reply") from None

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise ProtocolError("reply line longer than the read buffer")
            pending = self._end - self._start
            self._buf[:pending] = self._view[self._start:self._end]
            self._start, self._end = 0, pending
        got = self._sock.recv_into(self._view[self._end:])
        if not got:
            raise ConnectionError("Redis closed the connection")
        self._end += got

    def _line(self) -> bytes:
        while True:
            stop = self._buf.find(b"\r\n", self._start, self._end)
            if stop >= 0:
                line = bytes(self._view[self._start:stop])
                self._start = stop + 2
                return line
            self._fill()

    def _bulk(self, size: int) -> memoryview:
        if self.into is not None and len(self.into) == size:
            view, self.into = self.into, None
        else:
            view = RECV_BUFFERS.take(size) if size >= _BIG else memoryview(bytearray(size))
        have = min(size, self._end - self._start)
        view[:have] = self._view[self._start:self._start + have]
        self._start += have
        while have < size:
            got = self._sock.recv_into(view[have:], size - have)
            if not got:
                raise ConnectionError("Redis closed the connection")
            have += got
        while self._end - self._start < 2:
            self._fill()
        if self._buf[self._start:self._start + 2] != b"\r\n":
            raise ProtocolError("bulk value not followed by CRLF")
        self._start += 2
        return view


class ConnectionPool:
    """Idle connections per server address, shared by threads; `reset()` retires every connection."""

    def __init__(self, target: RedisTarget, timeout: float, max_idle: int = 8) -> None:
        self._target = target
        self._timeout = timeout
        self._ctx = target.ssl_context()
        self._max_idle = max_idle
        self._idle: dict[Address, list[Connection]] = {}
        self._lock = threading.Lock()
        self._generation = 0

    def acquire(self, address: Address) -> Connection:
        """An idle healthy connection to `address`, or a new one (raises `OSError`/`ReplyError` if that fails)."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else None
                generation = self._generation
            if conn is None:
                return Connection(address, self._target, self._timeout, self._ctx, generation)
            if conn.idle_ok():
                return conn
            conn.close()

    def release(self, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.address, [])
            if conn.generation == self._generation and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def reset(self) -> None:
        """Close idle connections; those in use are closed when released."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
