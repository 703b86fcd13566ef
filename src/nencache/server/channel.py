"""Sockets of the servers, and the asyncio server's byte channels: a plain socket (zero-copy) or a TLS stream.

`listen`, `tune`, `refuse` and `finish` serve both servers (`nencache serve` and the peer endpoint's).
A channel's `recv_into` fills caller buffers (pool pages included) with `socket.recv_into`; `send` writes
memoryviews with `socket.sendmsg` (scatter-gather, no joining, no transport buffer copies).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from typing import Protocol

from nencache.errors import ConfigError
from nencache.net.protocol import Code, error_frame
from nencache.net.wire import drop_sent

Buffer = bytes | bytearray | memoryview
_IOV_MAX = 512


class Channel(Protocol):
    async def recv_into(self, view: memoryview, timeout: float | None) -> int:
        """Read some bytes into `view` (0 at end of stream); `TimeoutError` when nothing came within `timeout`."""
        ...

    async def send(self, parts: Sequence[Buffer], timeout: float) -> None:
        """Write all of `parts` within `timeout` seconds in all; `TimeoutError` if the peer reads too slowly."""
        ...

    def abort(self) -> None:
        """Cut the connection now: a reader waiting on it sees the end of the stream."""
        ...

    def close(self) -> None: ...


def listen(host: str, port: int, *, instead: str) -> socket.socket:
    """A listening TCP socket on `host:port`; `ConfigError` naming `instead` (the setting to change) if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); choose another {instead} or stop what "
                          "uses it") from None


def refuse(sock: socket.socket, message: str) -> None:
    """Answer a connection that is not taken with a closing BUSY frame saying why, and close it."""
    header, body = error_frame(0, 0, Code.BUSY, message, closing=True)
    try:
        sock.setblocking(False)
        sock.send(header.pack() + body)
    except OSError:
        pass
    sock.close()


def finish(sock: socket.socket) -> None:
    """Close after what was written: send FIN and drop unread input first, so the peer reads the last frame."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    sock.close()


def tune(sock: socket.socket) -> None:
    """No Nagle delay for small frames; large kernel buffers for chunk transfers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        except OSError:
            pass


async def _ready(register, unregister, fd: int, timeout: float | None) -> None:  # type: ignore[no-untyped-def]
    future = asyncio.get_running_loop().create_future()
    register(fd, _wake, future)
    try:
        if timeout is None:
            await future
        else:
            async with asyncio.timeout(timeout):
                await future
    finally:
        unregister(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SocketChannel:
    """A non-blocking TCP socket driven by the event loop's readiness callbacks."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview, timeout: float | None) -> int:
        while True:
            try:
                return self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await _ready(self._loop.add_reader, self._loop.remove_reader, self._fd, timeout)

    async def send(self, parts: Sequence[Buffer], timeout: float) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        deadline = self._loop.time() + timeout  # for the whole reply: a peer reading a byte at a time is cut too
        while views:
            try:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                left = deadline - self._loop.time()
                if left <= 0:
                    raise TimeoutError("the peer did not read the reply in time") from None
                await _ready(self._loop.add_writer, self._loop.remove_writer, self._fd, left)
                continue
            drop_sent(views, sent)

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        finish(self.sock)


class StreamChannel:
    """A TLS (or any asyncio stream) connection; the TLS layer copies, so nothing is saved here."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def recv_into(self, view: memoryview, timeout: float | None) -> int:
        async with asyncio.timeout(timeout):
            data = await self.reader.read(len(view))
        view[: len(data)] = data
        return len(data)

    async def send(self, parts: Sequence[Buffer], timeout: float) -> None:
        for part in parts:
            if len(part):
                self.writer.write(part)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


async def accept_tls(sock: socket.socket, context: object, timeout: float) -> StreamChannel:
    """Wrap an accepted socket in TLS (the handshake is bounded by `timeout`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=context,  # type: ignore[arg-type]
                                                      ssl_handshake_timeout=timeout)
    return StreamChannel(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
