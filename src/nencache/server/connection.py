"""One client connection of the server: reads frames, answers them, several in flight at once.

Frames are read in order; replies go out whenever they are ready, each written whole, matched
by the client through request ids. Every header is checked against the limits before anything is
allocated; a malformed frame gets an error frame and the connection is closed. Nothing that
happens on one connection reaches another.

Deadlines, so that a slow or silent peer holds nothing for long: a frame must arrive whole within
`io_timeout` of its first byte, and a reply be read whole within `io_timeout`; a connection with no
frame and no reply in flight for `idle_timeout` is closed; on a server with a token, a connection
must authenticate within `auth_timeout` of being accepted (PING does not extend it). Pool pages held
by replies on the wire and by PUT bodies being received come from the server's fair budgets (see
`nencache.server.budget`); a PUT that finds no room there within `ADMISSION_WAIT` is answered BUSY
at once, its body read and discarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from nencache.errors import PoolExhaustedError
from nencache.net.protocol import (
    HEADER_SIZE, KEY_SIZE, MAX_NAMESPACE, MISSING, Code, Frame, Op, ProtocolError, check_authed,
    check_request, check_token, error_frame, hello, pack_lengths, parse_keyed_meta, reply_header, unpack_header,
)
from nencache.net.shared import locate_reply
from nencache.server.budget import Holder
from nencache.server.channel import Buffer, Channel
from nencache.server.host import Host
from nencache.server.store import Namespace, NamespaceLimitError

log = logging.getLogger("nencache.server")
MAX_INFLIGHT = 32  # requests of one connection being answered at once
ADMISSION_WAIT = 0.25  # seconds a PUT waits for room to receive a body before it is answered BUSY
INLINE_REPLY_BYTES = 4 << 20  # GET replies at most this large may be answered in the reader loop (see `_inline`)
T = TypeVar("T")


class Connection:
    """The reader loop of one connection and the tasks answering its requests."""

    def __init__(self, server: Host, channel: Channel, peer: str, client: str) -> None:
        self.server, self.channel, self.peer = server, channel, peer
        self.store, self.limits, self.counters = server.store, server.settings.limits, server.counters
        self.timeout = server.settings.io_timeout
        self.idle_timeout = server.settings.idle_timeout
        self.holder = Holder(self, client)
        self.authed = server.token is None
        self._auth_deadline = time.monotonic() + server.settings.auth_timeout
        self._frame_deadline = 0.0
        self.idle = True
        self._write = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._header = bytearray(HEADER_SIZE)
        self._meta = bytearray(1 + MAX_NAMESPACE + self.limits.max_keys * (KEY_SIZE + 8))
        self._scratch: bytearray | None = None

    async def run(self) -> None:
        frame = Frame(0, 0)
        try:
            while not self.server.stopping:
                frame = Frame(0, 0)
                if not await self._read_header():
                    return
                frame = unpack_header(self._header)
                try:
                    await self._handle(frame, time.perf_counter())
                except ProtocolError as exc:
                    if exc.fatal:
                        raise
                    await self._fail(frame, exc)
        except ProtocolError as exc:
            await self._fail(frame, exc)
        except (ConnectionError, TimeoutError, EOFError, OSError):
            pass  # the peer went away or stalled: nothing to answer
        except Exception as exc:  # a bug must cost one connection, never the server
            log.exception("connection %s: unexpected error", self.peer)
            await self._fail(frame, ProtocolError(Code.INTERNAL, f"internal server error ({type(exc).__name__})"))
        finally:
            for budget in (self.server.replies, self.server.bodies):
                budget.forget(self)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.channel.close()

    # --- reading ---------------------------------------------------------------------------------
    async def _read_header(self) -> bool:
        """Wait for the next frame; False at a clean end of stream, `TimeoutError` when the connection idled
        too long (or did not authenticate in time). The frame's deadline starts with its first byte."""
        view = memoryview(self._header)
        self.idle = True
        try:
            got = await self._first_bytes(view)
        finally:
            self.idle = False
        if got == 0:
            return False
        self._frame_deadline = time.monotonic() + self.timeout
        if got < HEADER_SIZE:
            await self._read_exact(view[got:])
        self.counters.received_bytes += got
        return True

    async def _first_bytes(self, view: memoryview) -> int:
        while True:
            if self.authed:
                wait = self.idle_timeout
            else:  # PING and failed attempts do not move this deadline
                wait = self._auth_deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError("the connection did not authenticate in time (server_auth_timeout)")
            try:
                return await self.channel.recv_into(view, wait)
            except TimeoutError:
                if self.authed and self._tasks:
                    continue  # replies still in flight: busy, not idle
                raise

    async def _read_exact(self, view: memoryview) -> None:
        """Fill `view` from the peer before the current frame's deadline."""
        got = 0
        while got < len(view):
            left = self._frame_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame did not arrive whole in time (server_io_timeout)")
            n = await self.channel.recv_into(view[got:], left)
            if n == 0:
                raise EOFError("peer closed the connection inside a frame")
            got += n
        self.counters.received_bytes += len(view)

    async def _discard(self, nbytes: int) -> None:
        if self._scratch is None:
            self._scratch = bytearray(256 << 10)
        view = memoryview(self._scratch)
        while nbytes:
            step = min(nbytes, len(view))
            await self._read_exact(view[:step])
            nbytes -= step

    # --- dispatch --------------------------------------------------------------------------------
    async def _handle(self, frame: Frame, started: float) -> None:
        op = check_request(frame, self.limits)
        check_authed(op, self.authed)
        meta = memoryview(self._meta)[: frame.meta_len] if frame.meta_len else memoryview(b"")
        if frame.meta_len:
            if frame.meta_len > len(self._meta):
                self._meta = bytearray(frame.meta_len)  # only AUTH can get here (token <= MAX_TOKEN)
                meta = memoryview(self._meta)[: frame.meta_len]
            await self._read_exact(meta)
        if op is Op.PING:
            await self._reply(frame, started)
        elif op is Op.AUTH:
            await self._auth(frame, bytes(meta), started)
        elif op is Op.STATS:
            await self._reply(frame, started, body=[json.dumps(self.server.stats()).encode()])
        elif op is Op.SHARED:
            if self.store.region is None:
                raise ProtocolError(Code.UNSUPPORTED, "this server's pool is not shared (server_shared_memory is off "
                                                      "or the platform has no memfd); use GET", fatal=False)
            await self._reply(frame, started, body=[json.dumps(self.store.region.describe()).encode()])
        else:
            namespace, keys, lengths = parse_keyed_meta(op, frame.count, meta, self.limits)
            if op is Op.PUT:
                await self._put(frame, namespace, keys, lengths, started)
            elif op is Op.EXISTS and self.store.disk_root is None:
                space = self.store.known(namespace)
                await self._reply(frame, started, count=self.store.exists(space, keys) if space else 0)
            else:
                await self._slots.acquire()
                answer = self._answer(op, frame, namespace, keys, started)
                if self._inline(op, frame.count):
                    await answer  # answered at once, without a task and a turn of the event loop
                    return
                task = asyncio.create_task(answer)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _inline(self, op: Op, count: int) -> bool:
        """Whether a read can be answered in the reader loop itself: memory only (no disk read to wait for),
        nothing else of this connection in flight, and a reply small enough for the socket's send buffer
        (LOCATE's always is), so that the reader loop never waits on a client that pipelines a large body
        behind it."""
        if self.store.disk_root is not None or self._tasks:
            return False
        return op is Op.LOCATE or (op is Op.GET and count * self.limits.max_chunk_bytes <= INLINE_REPLY_BYTES)

    async def _auth(self, frame: Frame, token: bytes, started: float) -> None:
        expected = self.server.token
        check_token(token, expected)
        self.authed = True
        await self._reply(frame, started, body=[hello(self.limits, auth=expected is not None,
                                                      idle_timeout=self.idle_timeout)])

    async def _answer(self, op: Op, frame: Frame, namespace: bytes, keys: list[bytes], started: float) -> None:
        """EXISTS (with a disk tier), GET, LOCATE, DELETE and CLEAR, answered beside the reader loop (in the
        loop itself where `_inline` allows)."""
        try:
            space = await self._namespace(namespace, create=False)
            if op is Op.GET:
                await self._get(frame, space, keys, started)
            elif op is Op.LOCATE:
                await self._locate(frame, space, keys, started)
            elif op is Op.EXISTS:
                count = 0
                if space is not None:
                    count = await self._disk_read(lambda: self.store.exists(space, keys),
                                                  lambda: self.store.exists(space, keys, disk=False))
                await self._reply(frame, started, count=count)
            else:
                if space is not None:
                    if op is Op.DELETE:
                        await self._on_disk(space, self.store.delete, space, keys)
                    else:
                        await self._on_disk(space, self.store.clear, space)
                await self._reply(frame, started)
        except NamespaceLimitError as exc:
            await self._fail(frame, ProtocolError(Code.BUSY, f"{exc}; retry later", fatal=False))
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception as exc:
            log.exception("connection %s: %s failed", self.peer, op.name)
            await self._fail(frame, ProtocolError(Code.INTERNAL, f"{op.name} failed ({type(exc).__name__})",
                                                  fatal=False))
        finally:
            self._slots.release()

    async def _get(self, frame: Frame, space: Namespace | None, keys: list[bytes], started: float) -> None:
        """Chunks held only on disk are read and promoted into memory first, holding nothing; then the reply's
        pages come from the replies budget, so a GET pins pool pages only while its reply is on the wire."""
        if space is None:
            await self._reply(frame, started, count=len(keys), meta=pack_lengths([MISSING] * len(keys)))
            return
        held: list[bool] | None = None
        if space.disk is not None:
            held = self.store.present(space, keys)
            if not all(held):
                wanted = [k for k, h in zip(keys, held) if not h]
                await self._disk_read(lambda: self.store.read_disk(space, wanted), lambda: None)
        replies = self.server.replies
        await replies.take(self.holder, len(keys))  # at most one GET's worth per connection; fair across them
        leases = self.store.lease(space, keys) if held is None else self.store.lease_after_read(space, keys, held)
        try:
            blobs: list[Any] = [None if lease is None else self.store.view(lease) for lease in leases]
            if held is not None and (late := [i for i, blob in enumerate(blobs) if blob is None and held[i]]):
                # evicted from memory while this GET waited for the budget (which covers these reads too)
                found = await self._disk_read(lambda: self.store.read_disk(space, [keys[i] for i in late]),
                                              lambda: [None] * len(late))
                for i, blob in zip(late, found):
                    blobs[i] = None if blob is None else memoryview(blob).cast("B")
            lengths = [MISSING if blob is None else len(blob) for blob in blobs]
            await self._reply(frame, started, count=len(keys), meta=pack_lengths(lengths),
                              body=[blob for blob in blobs if blob is not None])
        finally:
            for lease in leases:
                if lease is not None:
                    lease.release()
            replies.give(self.holder, len(keys))

    async def _locate(self, frame: Frame, space: Namespace | None, keys: list[bytes], started: float) -> None:
        """Offsets of chunks in the shared region; chunks only on disk are promoted first."""
        region = self.store.region
        if region is None:
            raise ProtocolError(Code.UNSUPPORTED, "this server's pool is not shared; use GET", fatal=False)
        spots = self.store.locate(space, keys) if space is not None else [None] * len(keys)
        missing = [i for i, spot in enumerate(spots) if spot is None]
        unplaced: set[int] = set()
        if missing and space is not None and space.disk is not None:
            found = await self._disk_read(lambda: self.store.read_disk(space, [keys[i] for i in missing]),
                                          lambda: [None] * len(missing))
            held = [i for i, blob in zip(missing, found) if blob is not None]
            for i, spot in zip(held, self.store.locate(space, [keys[i] for i in held])):
                spots[i] = spot
                if spot is None:  # on disk, but memory had no room for it: GET serves it
                    unplaced.add(i)
        await self._reply(frame, started, count=len(keys), meta=locate_reply(region.nonce, spots, unplaced))

    async def _put(self, frame: Frame, namespace: bytes, keys: list[bytes], lengths: list[int],
                   started: float) -> None:
        if sum(lengths) != frame.body_len:
            raise ProtocolError(Code.BAD_FRAME, f"PUT body is {frame.body_len} bytes but its blobs add up to "
                                                f"{sum(lengths)}")
        try:
            space = await self._namespace(namespace, create=True)
        except NamespaceLimitError as exc:
            await self._discard(frame.body_len)
            raise ProtocolError(Code.BUSY, f"{exc}; retry later or raise server_max_namespaces", fatal=False) from None
        assert space is not None
        stored = bad = busy = 0
        bodies = self.server.bodies
        for key, nbytes in zip(keys, lengths):
            taken = await self._admit(nbytes, shed=busy > 0)
            if taken is None:
                busy += 1  # shed: the rest of the frame is read and dropped without waiting again
                await self._discard(nbytes)
                continue
            page, view = taken
            try:
                await self._read_exact(view)
            except BaseException:
                self.store.abandon(page)
                raise
            finally:
                bodies.give(self.holder, 1)
            if self.store.commit(space, key, page, nbytes):
                stored += 1
            else:
                bad += 1
        if busy:
            raise ProtocolError(Code.BUSY, f"{busy} of {len(keys)} chunks not stored: the server is taking in as much "
                                           "as its pool and disk allow; retry later, or raise cpu_size on the "
                                           "server", fatal=False)
        if bad:
            raise ProtocolError(Code.BAD_CHUNK, f"{bad} of {len(keys)} blobs are not NenCache chunks (header, length "
                                                "or key do not match); they were not stored", fatal=False)
        await self._reply(frame, started, count=stored)

    async def _admit(self, nbytes: int, *, shed: bool) -> tuple[int, memoryview] | None:
        """A pool page (and a view of its first `nbytes`) to receive one PUT chunk into, or None to refuse it
        (BUSY): no room for a body to be received (after `ADMISSION_WAIT`), or every pool page pinned and
        none freed by the disk writer's policy. Holds one page of the bodies budget (the caller gives it back)."""
        bodies = self.server.bodies
        if shed or not await bodies.take(self.holder, 1, ADMISSION_WAIT):
            return None
        try:
            return self.store.take_page(nbytes)
        except PoolExhaustedError:
            bodies.give(self.holder, 1)
            return None
        except BaseException:
            bodies.give(self.holder, 1)
            raise

    # --- helpers ---------------------------------------------------------------------------------
    async def _namespace(self, name: bytes, *, create: bool) -> Namespace | None:
        space = self.store.known(name)
        if space is not None:
            return space
        if self.store.disk_root is None:
            return self.store.open(name, create=create) if create else None
        return await self._blocking(self.store.open, name, create=create)

    async def _disk_read(self, read: Callable[[], T], instead: Callable[[], T]) -> T:
        """`read()` (a disk tier lookup, which also promotes what it finds) off the event loop, or `instead()`
        (its memory-only answer) when the disk has fallen behind: when `server.max_disk_reads` reads are in
        flight, or when this one takes longer than `server_disk_read_wait` (it then finishes
        in the background, promoting for the next request). A late hit is a miss to a client that timed out:
        replies stay fast rather than queueing past the clients' timeouts."""
        server = self.server
        if server.disk_reads >= server.max_disk_reads:
            self.counters.disk_reads_skipped += 1
            return instead()
        server.disk_reads += 1
        future = asyncio.get_running_loop().run_in_executor(server.executor, read)

        def done(finished: asyncio.Future[T]) -> None:
            server.disk_reads -= 1
            if not finished.cancelled() and finished.exception() is not None:  # seen here if nobody waited
                log.debug("connection %s: a disk read failed: %r", self.peer, finished.exception())

        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), server.settings.disk_read_wait)
        except TimeoutError:
            self.counters.disk_reads_skipped += 1
            return instead()

    async def _on_disk(self, space: Namespace, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` off the event loop when it may touch the disk tier, else right here."""
        return fn(*args) if space.disk is None else await self._blocking(fn, *args)

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.server.executor, partial(fn, *args, **kwargs))

    async def _reply(self, frame: Frame, started: float, *, count: int = 0, meta: bytes = b"",
                     body: Sequence[Buffer] = ()) -> None:
        body_len = sum(len(part) for part in body)
        header = reply_header(frame, count, len(meta), body_len)
        async with self._write:
            try:
                await self.channel.send([header, meta, *body], self.timeout)
            except (TimeoutError, OSError):
                self.channel.abort()  # a peer that does not read its replies loses the connection, and only it
                raise
        self.counters.sent_bytes += HEADER_SIZE + len(meta) + body_len
        self.counters.request(frame.op, started)

    async def _fail(self, frame: Frame, exc: ProtocolError) -> None:
        """Send an error frame (best effort); a fatal error also ends the reader loop (the caller returns)."""
        self.counters.error(exc.code)
        header, body = error_frame(frame.op, frame.request_id, exc.code, str(exc), closing=exc.fatal)
        try:
            async with self._write:
                await self.channel.send([header.pack(), body], min(self.timeout, 5.0))
            self.counters.sent_bytes += HEADER_SIZE + len(body)
        except (ConnectionError, TimeoutError, OSError):
            pass
