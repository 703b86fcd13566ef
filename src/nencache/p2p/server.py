"""`PeerServer`: the server of a cache's peer endpoint, one blocking thread per connection.

A peer's requests are reads of chunks already in this cache's memory, each waited for by a fetch on
another engine. On a thread blocked in `recv`, a request costs one wake-up, a lookup and one `sendmsg`;
on the event loop of `nencache serve` it also costs a readiness callback, a future, a task step and the
loop's own bookkeeping, which at 64 KiB was about as long as the rest of the fetch (RESULTS "p2p: a
thread per connection"). Peers keep a few connections to each other (`nencache.tiers.peer.client`), so
threads are few; `max_connections` and `max_client_connections` bound them.

The protocol, limits and deadlines are the server's (docs/protocol.md). Every header is checked before
its meta is read. A frame must arrive whole within `io_timeout` of its first byte, and a reply be read
whole within `io_timeout`. A connection that sends no frame for `idle_timeout` is closed, and on an
endpoint with a token one that has not authenticated within `auth_timeout`. Pages of GET replies on the
wire come from a budget of half the pool, so peers can never pin all of this cache's memory. A
malformed frame gets an error frame and its connection is closed; nothing on one connection reaches another.

The store is read-only and in memory (`ServedStore`): no request waits on a disk, PUT is refused,
DELETE and CLEAR are ignored. Timeouts are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO), set only when they
change, so a request that arrives whole is one `recv` and its reply one `sendmsg`. A connection's repeated
GETs of a namespace it has named before are unpacked and checked in one step (`_plain_get`); every other
frame takes the general path, which answers errors too. After an idle every Python step costs several
times its warm cost, so the steps a GET takes are what its latency is (RESULTS "p2p: lab notes on the
ratio to a raw socket").
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from nencache.net.protocol import (
    HEADER, HEADER_SIZE, KEY_SIZE, MAGIC, MAX_NAMESPACE, MAX_TOKEN, MISSING, VERSION, Code, Frame, Op, ProtocolError,
    check_authed, check_request, check_token, error_frame, hello, pack_lengths, parse_keyed_meta, reply_header,
    unpack_header,
)
from nencache.net.shared import SharedRegion, Spot, locate_reply
from nencache.net.wire import set_kernel_timeout, unsent
from nencache.pool import MemoryPool
from nencache.server.channel import Buffer, finish, listen, refuse, tune
from nencache.server.metrics import ServerCounters
from nencache.server.settings import ServerSettings
from nencache.server.store import Namespace
from nencache.tiers.memory import ChunkLease

log = logging.getLogger("nencache.p2p")
GRACE_SECONDS = 10.0  # `stop` lets replies on the wire finish this long before it cuts their connections
_IOV_MAX = 512
_NO_FRAME = Frame(0, 0)  # what an error answers before a frame was read
_GET = int(Op.GET)
_MAX_SPACES = 16  # namespaces a connection remembers for `_plain_get`


class ServedStore(Protocol):
    """What the peer server reads: a cache's memory tier, by namespace (`nencache.p2p.endpoint.PeerStore`)."""

    pool: MemoryPool
    region: SharedRegion | None  # the pool's shared region (SHARED, LOCATE); None when it is not shared

    def known(self, name: bytes) -> Namespace | None: ...

    def exists(self, space: Namespace, keys: Sequence[bytes]) -> int: ...

    def lease(self, space: Namespace, keys: Sequence[bytes]) -> list[ChunkLease | None]: ...

    def view(self, lease: ChunkLease) -> Buffer: ...

    def locate(self, space: Namespace, keys: Sequence[bytes]) -> list[Spot | None]: ...

    def stats(self) -> dict[str, Any]: ...


class PageBudget:
    """Pool pages that replies on the wire may pin at once; a request asks for all of its pages together."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.free = self.total
        self._waiting = 0  # threads waiting in `take` (a reply that finds pages free wakes nobody)
        self._changed = threading.Condition(threading.Lock())

    def take(self, pages: int, timeout: float) -> int:
        """Wait up to `timeout` seconds for `pages` (at most the whole budget); the pages taken, 0 if none."""
        pages = min(pages, self.total)
        with self._changed:
            if self.free < pages:
                self._waiting += 1
                try:
                    if not self._changed.wait_for(lambda: self.free >= pages, timeout):
                        return 0
                finally:
                    self._waiting -= 1
            self.free -= pages
        return pages

    def give(self, pages: int) -> None:
        with self._changed:
            self.free += pages
            if self._waiting:
                self._changed.notify_all()


class PeerServer:
    """A `ServedStore` on `settings.host:settings.port` (0: any free port) until `stop`."""

    def __init__(self, settings: ServerSettings, store: ServedStore) -> None:
        self.settings, self.store = settings, store
        self.limits = settings.limits
        self.token = settings.auth_token.encode() if settings.auth_token else None
        self.counters = ServerCounters()
        self.counting = threading.Lock()  # counters are updated from every connection's thread
        self.replies = PageBudget(settings.page_budgets(store.pool.num_pages).replies)
        self.stopping = False
        self.port = settings.port
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._open: dict[PeerConnection, threading.Thread] = {}
        self._per_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self) -> PeerServer:
        self._listener = listen(self.settings.host, self.settings.port, instead="p2p_port (0: any free port)")
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept_loop, name="nencache-p2p-accept", daemon=True)
        self._accepting.start()
        return self

    def stats(self) -> dict[str, Any]:
        with self.counting:
            server = self.counters.as_dict() | {"host": self.settings.host, "port": self.port, "tls": False,
                                                "auth": self.token is not None}
        return {"server": server, **self.store.stats()}

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Stop accepting; connections waiting for a frame end at once, replies being sent get `grace`
        seconds to finish, then every connection is cut. Returns once no thread uses the store. Safe twice."""
        self.stopping = True
        if self._listener is not None:
            _shutdown(self._listener, socket.SHUT_RDWR)  # wakes `accept`
            self._listener.close()
        if self._accepting is not None:
            self._accepting.join()
        with self._lock:
            connections = list(self._open.items())
        for connection, _ in connections:
            connection.wake()
        deadline = time.monotonic() + grace
        for connection, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                connection.abort()
                thread.join(1.0)

    def count(self, op: int, started: float, received: int, sent: int) -> None:
        with self.counting:
            self.counters.request(op, started)
            self.counters.received_bytes += received
            self.counters.sent_bytes += sent

    def count_error(self, code: Code, sent: int) -> None:
        with self.counting:
            self.counters.error(code)
            self.counters.sent_bytes += sent

    # --- connections -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping:
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                log.warning("P2P endpoint: accept failed: %s", exc)  # e.g. out of file descriptors
                time.sleep(0.05)
                continue
            client = str(address[0])
            with self._lock:
                refusal = self._refusal(client)
                if refusal is None:
                    connection = PeerConnection(self, sock)
                    thread = threading.Thread(target=self._serve, args=(connection, client),
                                              name="nencache-p2p-connection", daemon=True)
                    self._open[connection] = thread
                    self._per_client[client] = self._per_client.get(client, 0) + 1
            if refusal is not None:
                self._refuse(sock, refusal)
                continue
            thread.start()

    def _refusal(self, client: str) -> str | None:
        if len(self._open) >= self.settings.max_connections:
            return "too many connections to this peer (server_max_connections); retry later"
        if self._per_client.get(client, 0) >= self.settings.max_client_connections:
            return ("too many connections to this peer from this address (server_max_client_connections); "
                    "close idle ones or retry later")
        return None

    def _refuse(self, sock: socket.socket, message: str) -> None:
        with self.counting:
            self.counters.refused += 1
            self.counters.error(Code.BUSY)
        refuse(sock, message)

    def _serve(self, connection: PeerConnection, client: str) -> None:
        with self.counting:
            self.counters.accepted += 1
            self.counters.connections += 1
        try:
            connection.run()
        finally:
            with self.counting:
                self.counters.connections -= 1
            with self._lock:
                del self._open[connection]
                left = self._per_client.pop(client) - 1
                if left:
                    self._per_client[client] = left


class PeerConnection:
    """One connection's frames, read and answered in turn on its own thread (see the module docstring)."""

    def __init__(self, server: PeerServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.store, self.limits = server.store, server.limits
        self.settings = server.settings
        self.authed = server.token is None
        self._auth_deadline = time.monotonic() + self.settings.auth_timeout
        self._frame_deadline = 0.0
        # Requests have no body (PUT is refused from its header), so the inbox holds any whole request
        # and, behind it, whatever of the next ones has already come.
        self._inbox = bytearray(2 * (HEADER_SIZE + max(MAX_TOKEN, 1 + MAX_NAMESPACE + self.limits.max_keys * KEY_SIZE)))
        self._view = memoryview(self._inbox)
        self._start = self._end = 0
        self._timeouts = {socket.SO_RCVTIMEO: -1.0, socket.SO_SNDTIMEO: -1.0}  # as set on the socket now
        # Namespaces this connection's GETs have named, as their meta starts (length byte, name) -> the store's
        # namespace: a GET of one of them is answered without the general path (`_plain_get`).
        self._spaces: dict[bytes, Namespace] = {}

    def run(self) -> None:
        frame = _NO_FRAME
        try:
            tune(self.sock)
            while not self.server.stopping:
                frame = _NO_FRAME
                if self._end == self._start:
                    self._start = self._end = 0
                    if not self._receive(self._idle_wait()):
                        return  # a clean end of stream
                try:
                    plain = self._plain_get()
                    if plain is not None:
                        frame = plain[0]
                        self._get(*plain)
                    else:
                        frame, op, meta, started = self._next_frame()
                        self._handle(frame, op, meta, started)
                except ProtocolError as exc:
                    if exc.fatal:
                        raise
                    self._fail(frame, exc)
        except ProtocolError as exc:
            self._fail(frame, exc)
        except (OSError, EOFError):
            pass  # the peer went away, stalled or idled out (TimeoutError is an OSError): nothing to answer
        except Exception as exc:  # a bug must cost one connection, never the endpoint
            log.exception("P2P endpoint: unexpected error on a connection")
            self._fail(frame, ProtocolError(Code.INTERNAL, f"internal error ({type(exc).__name__})"))
        finally:
            finish(self.sock)

    def wake(self) -> None:
        """End a wait for the next frame (a reply being sent still goes out)."""
        _shutdown(self.sock, socket.SHUT_RD)

    def abort(self) -> None:
        _shutdown(self.sock, socket.SHUT_RDWR)

    # --- reading ---------------------------------------------------------------------------------
    def _plain_get(self) -> tuple[Frame, Namespace, list[bytes], float, int] | None:
        """The request at the head of the inbox, if it is a whole GET of a namespace this connection has asked
        for before (what a peer sends, over and over), unpacked and checked in one step: its frame, namespace,
        keys, start time and size. None for anything else, valid or not: the general path (`_next_frame`,
        `_handle`) reads, checks and answers it, errors included."""
        start, inbox = self._start, self._inbox
        if self._end - start <= HEADER_SIZE or not self._spaces:
            return None
        magic, version, op, flags, request_id, count, meta_len, status, body_len = HEADER.unpack_from(inbox, start)
        at = start + HEADER_SIZE
        keys_at = at + 1 + inbox[at]
        if (op != _GET or flags or status or body_len or magic != MAGIC or version != VERSION
                or not 0 < count <= self.limits.max_get_keys or meta_len != keys_at - at + KEY_SIZE * count
                or self._end < at + meta_len):
            return None
        space = self._spaces.get(bytes(inbox[at:keys_at]))
        if space is None:
            return None
        started = time.perf_counter()
        self._start = at + meta_len
        keys = [bytes(inbox[i : i + KEY_SIZE]) for i in range(keys_at, self._start, KEY_SIZE)]
        return Frame(op, request_id, count, meta_len), space, keys, started, HEADER_SIZE + meta_len

    def _next_frame(self) -> tuple[Frame, Op, memoryview, float]:
        """The next request's header (checked), op and meta (the inbox holds at least its first byte)."""
        started = time.perf_counter()
        self._frame_deadline = time.monotonic() + self.settings.io_timeout
        self._fill(HEADER_SIZE)
        frame = unpack_header(self._view[self._start : self._start + HEADER_SIZE])
        op = check_request(frame, self.limits)
        if op is Op.PUT:
            raise ProtocolError(Code.UNSUPPORTED, "this is a read-only NenCache peer endpoint: it serves EXISTS and "
                                                  "GET of its own chunks and takes no PUT")
        size = HEADER_SIZE + frame.meta_len
        self._fill(size)
        meta = self._view[self._start + HEADER_SIZE : self._start + size]
        self._start += size
        return frame, op, meta, started

    def _idle_wait(self) -> float:
        if self.authed:
            return self.settings.idle_timeout
        wait = self._auth_deadline - time.monotonic()  # PING and failed attempts do not move this deadline
        if wait <= 0:
            raise TimeoutError("the connection did not authenticate in time (server_auth_timeout)")
        return wait

    def _fill(self, size: int) -> None:
        """Have the current frame's first `size` bytes in the inbox, before the frame's deadline."""
        if self._start + size > len(self._inbox):
            held = self._end - self._start
            self._inbox[:held] = self._inbox[self._start : self._end]
            self._start, self._end = 0, held
        while self._end - self._start < size:
            if not self._receive(self._frame_deadline - time.monotonic()):
                raise EOFError("peer closed the connection inside a frame")

    def _receive(self, timeout: float) -> bool:
        """Some bytes into the inbox within `timeout` seconds; False at the end of the stream."""
        if timeout <= 0:
            raise TimeoutError("the frame did not arrive whole in time (server_io_timeout)")
        self._set_timeout(socket.SO_RCVTIMEO, timeout)
        try:
            got = self.sock.recv_into(self._view[self._end :])
        except BlockingIOError:  # the kernel's receive timeout
            raise TimeoutError("no frame in time (server_idle_timeout or server_io_timeout)") from None
        self._end += got
        return got > 0

    # --- answering -------------------------------------------------------------------------------
    def _handle(self, frame: Frame, op: Op, meta: memoryview, started: float) -> None:
        if not self.authed:
            check_authed(op, self.authed)
        received = HEADER_SIZE + frame.meta_len
        if op is Op.GET:  # by far the most frequent
            namespace, keys, _ = parse_keyed_meta(op, frame.count, meta, self.limits)
            space = self.store.known(namespace)
            if space is not None and len(self._spaces) < _MAX_SPACES:
                self._spaces[bytes(meta[: 1 + len(namespace)])] = space
            self._get(frame, space, keys, started, received)
        elif op is Op.PING:
            self._reply(frame, started, received)
        elif op is Op.AUTH:
            check_token(bytes(meta), self.server.token)
            self.authed = True
            body = hello(self.limits, auth=self.server.token is not None, idle_timeout=self.settings.idle_timeout)
            self._reply(frame, started, received, body=[body])
        elif op is Op.STATS:
            self._reply(frame, started, received, body=[json.dumps(self.server.stats()).encode()])
        elif op is Op.SHARED:
            region = self._region()
            self._reply(frame, started, received, body=[json.dumps(region.describe()).encode()])
        else:
            namespace, keys, _ = parse_keyed_meta(op, frame.count, meta, self.limits)
            space = self.store.known(namespace)
            if op is Op.EXISTS:
                count = self.store.exists(space, keys) if space is not None else 0
                self._reply(frame, started, received, count=count)
            elif op is Op.LOCATE:
                region = self._region()
                spots = self.store.locate(space, keys) if space is not None else [None] * len(keys)
                self._reply(frame, started, received, count=len(keys), meta=locate_reply(region.nonce, spots))
            else:  # DELETE and CLEAR: peers do not change this cache
                self._reply(frame, started, received)

    def _region(self) -> SharedRegion:
        if self.store.region is None:
            raise ProtocolError(Code.UNSUPPORTED, "this peer's pool is not shared (p2p_shared_memory is off, or the "
                                                  "platform has no memfd); use GET", fatal=False)
        return self.store.region

    def _get(self, frame: Frame, space: Namespace | None, keys: list[bytes], started: float, received: int) -> None:
        """The held chunks as they sit in the pool; their pages are pinned (and counted in the server's
        replies budget) only while the reply is on the wire."""
        if space is None:
            self._reply(frame, started, received, count=len(keys), meta=pack_lengths([MISSING] * len(keys)))
            return
        pages = self.server.replies.take(len(keys), self.settings.io_timeout)
        if not pages:
            raise ProtocolError(Code.BUSY, "this peer's replies budget stayed full (peers reading slowly); retry "
                                           "later", fatal=False)
        try:
            leases = self.store.lease(space, keys)
            try:
                blobs = [None if lease is None else self.store.view(lease) for lease in leases]
                lengths = [MISSING if blob is None else len(blob) for blob in blobs]
                self._reply(frame, started, received, count=len(keys), meta=pack_lengths(lengths),
                            body=[blob for blob in blobs if blob is not None], body_len=sum(lengths))
            finally:
                for lease in leases:
                    if lease is not None:
                        lease.release()
        finally:
            self.server.replies.give(pages)

    def _reply(self, frame: Frame, started: float, received: int, *, count: int = 0, meta: bytes = b"",
               body: Sequence[Buffer] = (), body_len: int | None = None) -> None:
        """Send a reply; `body_len` is the body's size in bytes where the caller knows it."""
        if body_len is None:
            body_len = sum(memoryview(part).nbytes for part in body)
        total = HEADER_SIZE + len(meta) + body_len
        self._send([reply_header(frame, count, len(meta), body_len), meta, *body], total)
        self.server.count(frame.op, started, received, total)

    def _fail(self, frame: Frame, exc: ProtocolError) -> None:
        """Send an error frame (best effort); after a fatal one the caller closes the connection."""
        header, body = error_frame(frame.op, frame.request_id, exc.code, str(exc), closing=exc.fatal)
        try:
            self._send([header.pack(), body], HEADER_SIZE + len(body))
        except OSError:
            pass
        self.server.count_error(exc.code, HEADER_SIZE + len(body))

    def _send(self, parts: list[Buffer], total: int) -> None:
        """Write `parts` (`total` bytes) whole within `io_timeout`; a peer that reads too slowly loses its
        connection. Usually the first `sendmsg` takes them all."""
        timeout = self.settings.io_timeout
        deadline = time.monotonic() + timeout
        pending: list[Any] = parts
        done = 0
        while True:
            self._set_timeout(socket.SO_SNDTIMEO, timeout)
            try:
                done += self.sock.sendmsg(pending[:_IOV_MAX])
            except BlockingIOError:  # the kernel's send timeout, with nothing sent
                pass
            if done == total:
                return
            pending = unsent(parts, done)
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                self.abort()
                raise TimeoutError("the peer did not read the reply in time (server_io_timeout)")

    def _set_timeout(self, option: int, seconds: float) -> None:
        if self._timeouts[option] == seconds:
            return
        set_kernel_timeout(self.sock, option, seconds)
        self._timeouts[option] = seconds



def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass

