"""The client end of one connection to a NenCache server: URL parsing, framing, blocking I/O with deadlines.

Blobs are sent with `sendmsg` straight from the caller's buffers and received with `recv_into`
straight into pooled buffers: no joining, no intermediate copies.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import HEADER_SIZE as CHUNK_HEADER_SIZE
from nencache.format import NO_KEY, parse_header
from nencache.net.buffers import BufferPool
from nencache.net.protocol import (
    CLOSING, HEADER_SIZE, MAX_MESSAGE, MAX_TOKEN, RESPONSE, Code, Frame, Limits, Op, ProtocolError,
    reply_meta_size, request_header, unpack_header, unpack_lengths,
)

Buffer = bytes | bytearray | memoryview
DEFAULT_PORT = 5870
SCHEMES = frozenset({"nencache", "nencaches"})  # every scheme `parse_url` accepts (nencaches: TLS)
_MAX_SMALL_BODY = 16 << 20  # STATS / hello replies
_MIN_RATE = 50e6  # bytes/s a transfer may not fall below before its deadline passes
_IOV_MAX = 512
_INBOX = 4096  # bytes for headers and metas (grown for larger ones)
_TIMEVAL = struct.Struct("@ll")
_MAX_TIMEOUT = 1e6  # seconds: longer kernel timeouts are this long (struct timeval's range)


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None

    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'nencaches' if self.tls else 'nencache'}://{host}:{self.port}"


def parse_url(url: str) -> Target:
    """`nencache://host[:port]` or `nencaches://host[:port][?ca=/path/ca.pem]` (TLS)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"remote_url {url!r}: a NenCache server URL looks like nencache://127.0.0.1:5870")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"remote_url {url!r}: the port must be a number 1-65535") from None
    options = dict(parse_qsl(parts.query))
    unknown = set(options) - {"ca"}
    if unknown or (options and scheme == "nencache"):
        raise ConfigError(f"remote_url {url!r}: the only option is ?ca=/path/to/ca.pem, with nencaches://")
    return Target(parts.hostname or "127.0.0.1", port, scheme == "nencaches", options.get("ca"))


class ErrorReply(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code: int, message: str, closing: bool) -> None:
        name = Code(code).name if code in Code._value2member_map_ else str(code)
        super().__init__(f"server error {name}: {message}")
        self.code, self.closing = code, closing


@dataclass(slots=True)
class Reply:
    frame: Frame
    blobs: list[memoryview | None] | None = None  # GET
    body: bytes = b""  # everything else
    error: ErrorReply | None = None


class WireConnection:
    """One socket; `send` any number of frames, then `read` their replies (in whatever order they come)."""

    def __init__(self, target: Target, timeout: float, token: bytes, buffers: BufferPool) -> None:
        self.timeout, self._buffers = timeout, buffers
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
            if target.tls:
                context = ssl.create_default_context(cafile=target.ca_file)
                sock = context.wrap_socket(sock, server_hostname=target.host)
            else:
                sock.settimeout(None)  # blocking, bounded by the kernel's timeouts (`_wait`)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._kernel_timeouts = not target.tls  # TLS retries inside its reads, so it keeps Python's timeouts
        self._armed = {socket.SO_RCVTIMEO: -1.0, socket.SO_SNDTIMEO: -1.0}  # kernel timeouts set now
        self._ids = itertools.count(1)
        self._inbox = bytearray(_INBOX)
        self._ahead = memoryview(self._inbox)[:0]  # bytes received and not yet read (headers, metas)
        self._expect: dict[int, int] = {}  # request id -> size of its reply's meta, for reading it with the header
        self._deadline = 0.0
        self.limits = Limits(1 << 30, 1 << 30, 1)
        self.idle_timeout = float("inf")  # the server closes the connection after this long without a frame
        self.idle_since = time.monotonic()
        try:
            hello: dict[str, Any] = json.loads(self.call(Op.AUTH, meta=token).body)
            self.limits = Limits(int(hello["max_chunk_bytes"]), int(hello["max_request_bytes"]),
                                 int(hello["max_keys"]))
            self.idle_timeout = float(hello.get("idle_timeout", self.idle_timeout))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- framing -----------------------------------------------------------------------------
    def send(self, op: Op, *, count: int = 0, meta: bytes = b"", body: Sequence[Buffer] = ()) -> int:
        """Send one request; its id."""
        request_id = next(self._ids) & 0xFFFFFFFF
        body_len = sum(memoryview(b).nbytes for b in body) if body else 0
        self.extend_deadline(body_len)
        header = request_header(op, request_id, count, len(meta), body_len)
        self._send_all([header, meta, *body], HEADER_SIZE + len(meta) + body_len)
        if len(self._expect) > 64:
            self._expect.clear()  # replies that never came (their exchange failed): only a hint is lost
        self._expect[request_id] = reply_meta_size(op, count)
        return request_id

    def call(self, op: Op, *, count: int = 0, meta: bytes = b"", body: Sequence[Buffer] = ()) -> Reply:
        """One request and its reply; an error reply raises `ErrorReply`."""
        self.start()
        request_id = self.send(op, count=count, meta=meta, body=body)
        reply = self.read({request_id: count})
        if reply.error is not None:
            raise reply.error
        return reply

    def start(self) -> None:
        """Start the deadline of a new exchange."""
        self._deadline = time.monotonic() + 4 * self.timeout

    def extend_deadline(self, nbytes: int) -> None:
        self._deadline += nbytes / _MIN_RATE

    def read(self, pending: dict[int, int]) -> Reply:
        """The next reply of one of `pending` (request id -> key count of a GET, else anything)."""
        frame = unpack_header(self._next(HEADER_SIZE, self._expect.get(next(iter(pending), -1), 0)))
        self._expect.pop(frame.request_id, None)
        if not frame.flags & RESPONSE:
            raise ProtocolError(Code.BAD_FRAME, "the server sent a request frame")
        if frame.is_error:
            if frame.body_len > MAX_MESSAGE or frame.meta_len:
                raise ProtocolError(Code.BAD_FRAME, "oversized error frame")
            message = bytes(self._next(frame.body_len)).decode("utf-8", "replace")
            error = ErrorReply(frame.status, message, bool(frame.flags & CLOSING))
            if error.closing:
                raise error
            if frame.request_id not in pending:
                raise ProtocolError(Code.BAD_FRAME, f"error reply to unknown request {frame.request_id}: {error}")
            pending.pop(frame.request_id)
            return Reply(frame, error=error)
        if frame.request_id not in pending:
            raise ProtocolError(Code.BAD_FRAME, f"reply to unknown request {frame.request_id}")
        keys = pending.pop(frame.request_id)
        if frame.op == Op.LOCATE:
            if frame.count != keys or frame.meta_len != reply_meta_size(Op.LOCATE, keys) or frame.body_len:
                raise ProtocolError(Code.BAD_FRAME, f"LOCATE reply for {frame.count} keys, asked {keys}")
            return Reply(frame, body=bytes(self._next(frame.meta_len)))
        if frame.op != Op.GET:
            if frame.meta_len or frame.body_len > _MAX_SMALL_BODY:
                raise ProtocolError(Code.BAD_FRAME, "malformed reply")
            return Reply(frame, body=self._read_bytes(frame.body_len))
        if frame.count != keys or frame.meta_len != reply_meta_size(Op.GET, keys):
            raise ProtocolError(Code.BAD_FRAME, f"GET reply for {frame.count} keys, asked {keys}")
        lengths = unpack_lengths(self._next(frame.meta_len), keys)
        if sum(lengths) != frame.body_len or max(lengths, default=0) > self.limits.max_chunk_bytes:
            raise ProtocolError(Code.BAD_FRAME, "GET reply lengths do not add up")
        self.extend_deadline(frame.body_len)
        blobs: list[memoryview | None] = []
        for length in lengths:
            if length == 0:
                blobs.append(None)
                continue
            view = self._buffers.take(length)
            self._read_exact(view)
            blobs.append(view)
        return Reply(frame, blobs=blobs)

    # --- I/O -------------------------------------------------------------------------------------
    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the NenCache server did not answer in time (remote_timeout)")
        return min(left, self.timeout)

    def _wait(self, option: int) -> None:
        """Bound the next send (SO_SNDTIMEO) or receive (SO_RCVTIMEO) by what is left of the exchange.

        On a plain socket these are the kernel's timeouts, set only when they change (near the deadline), so a
        call is one system call; a TLS socket takes Python's (a poll before each call)."""
        seconds = self._remaining()
        if not self._kernel_timeouts:
            self.sock.settimeout(seconds)
        elif self._armed[option] != seconds:
            set_kernel_timeout(self.sock, option, seconds)
            self._armed[option] = seconds

    def _send_all(self, parts: list[Buffer], total: int) -> None:
        """Write `parts` (`total` bytes); on a plain socket the first `sendmsg` usually takes them all (TLS sends
        one buffer at a time)."""
        pending: list[Any] = parts if self._kernel_timeouts else unsent(parts, 0)
        done = 0
        while done < total:
            self._wait(socket.SO_SNDTIMEO)
            try:
                sent = self.sock.sendmsg(pending[:_IOV_MAX]) if self._kernel_timeouts else self.sock.send(pending[0])
            except BlockingIOError:  # the kernel's timeout, with nothing sent
                raise TimeoutError("the NenCache server did not read the request in time (remote_timeout)") from None
            done += sent
            if done < total:
                pending = unsent(parts, done)

    def _recv_into(self, view: memoryview) -> int:
        self._wait(socket.SO_RCVTIMEO)
        try:
            n = self.sock.recv_into(view)
        except BlockingIOError:  # the kernel's timeout
            raise TimeoutError("the NenCache server did not answer in time (remote_timeout)") from None
        if n == 0:
            raise ConnectionResetError("the NenCache server closed the connection")
        return n

    def _next(self, size: int, more: int = 0) -> memoryview:
        """The next `size` bytes of the stream (valid until the next read). Headers and metas come through
        here: a receive also asks for the `more` bytes expected next, so that a reply's header and meta
        usually take one call."""
        if len(self._ahead) < size:
            held = bytes(self._ahead)
            want = size + more
            if len(self._inbox) < want:
                self._inbox = bytearray(want)
            inbox = memoryview(self._inbox)
            inbox[: len(held)] = held
            got = len(held)
            while got < size:
                got += self._recv_into(inbox[got:want])
            self._ahead = inbox[:got]
        out, self._ahead = self._ahead[:size], self._ahead[size:]
        return out

    def _read_exact(self, view: memoryview) -> None:
        got = min(len(self._ahead), len(view))
        if got:
            view[:got] = self._ahead[:got]
            self._ahead = self._ahead[got:]
        while got < len(view):
            got += self._recv_into(view[got:])

    def _read_bytes(self, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        self._read_exact(memoryview(out))
        return bytes(out)


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Set SO_RCVTIMEO or SO_SNDTIMEO: a blocking call on `sock` then fails with EAGAIN after `seconds`."""
    whole = min(seconds, _MAX_TIMEOUT)
    micros = max(1, round((whole % 1) * 1e6))  # 0 would mean no timeout at all
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(int(whole), min(micros, 999_999)))


def unsent(parts: Sequence[Buffer], done: int) -> list[memoryview]:
    """What is left of `parts` after their first `done` bytes were written, as byte views (made only after a
    write that took part of them: the first write hands `parts` to `sendmsg` as they are)."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    drop_sent(views, done)
    return views


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first `sent` bytes from a list of buffers being written out."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


def split_keys(keys: Sequence[bytes], size: int) -> list[list[bytes]]:
    """`keys` in groups of at most `size`."""
    return [[bytes(k) for k in keys[i : i + size]] for i in range(0, len(keys), size)]


Item = tuple[bytes, memoryview]


def split_items(items: list[Item], max_keys: int, max_bytes: int) -> list[list[Item]]:
    """Consecutive PUT batches of at most `max_keys` items and `max_bytes` bytes (a larger item goes alone)."""
    out: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for key, view in items:
        if current and (len(current) == max_keys or size + view.nbytes > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append((bytes(key), view))
        size += view.nbytes
    if current:
        out.append(current)
    return out


def blob_ok(key: bytes, blob: Buffer) -> bool:
    """A chunk's header is intact and names `key` (or no key), and its length matches the header."""
    try:
        header = parse_header(blob)
    except CorruptChunkError:
        return False
    return header.payload_len + CHUNK_HEADER_SIZE == memoryview(blob).nbytes and header.key in (NO_KEY, key)


def describe_failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, ErrorReply) and exc.code in (Code.AUTH_FAILED, Code.AUTH_REQUIRED):
        text += "; set auth_token (NENCACHE_AUTH_TOKEN) to the server's token"
    return text


def token_bytes(token: str | None) -> bytes:
    """The token to send: `token`, else NENCACHE_AUTH_TOKEN, else none (empty)."""
    text = token if token is not None else os.environ.get("NENCACHE_AUTH_TOKEN", "")
    data = text.encode("utf-8")
    if len(data) > MAX_TOKEN:
        raise ConfigError(f"auth_token is longer than {MAX_TOKEN} bytes")
    return data
