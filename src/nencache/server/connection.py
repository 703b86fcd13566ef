"""One client connection of the server: reads frames, answers them, several in flight at once.

Frames are read in order; replies go out whenever they are ready, each written whole, matched
by the client through request ids. Every header is checked against the limits before anything is
allocated; a malformed frame gets an error frame and the connection is closed. Nothing that
happens on one connection reaches another.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from nencache.errors import PoolExhaustedError
from nencache.server.channel import Buffer, Channel
from nencache.server.protocol import (
    HEADER_SIZE, KEY_SIZE, MAX_NAMESPACE, MISSING, SPOT, UNPLACED, Code, Flag, Frame, Op, ProtocolError, check_request,
    error_frame, pack_lengths, parse_keyed_meta, unpack_header,
)
from nencache.server.store import Namespace, NamespaceLimitError

if TYPE_CHECKING:
    from nencache.server.server import NenCacheServer

log = logging.getLogger("nencache.server")
MAX_INFLIGHT = 32  # requests of one connection being answered at once
T = TypeVar("T")


class Connection:
    """The reader loop of one connection and the tasks answering its requests."""

    def __init__(self, server: NenCacheServer, channel: Channel, peer: str) -> None:
        self.server, self.channel, self.peer = server, channel, peer
        self.store, self.limits, self.counters = server.store, server.settings.limits, server.counters
        self.timeout = server.settings.io_timeout
        self.authed = server.token is None
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
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.channel.close()

    # --- reading ---------------------------------------------------------------------------------
    async def _read_header(self) -> bool:
        """Wait for the next frame (an authenticated connection may idle); False at a clean end of stream."""
        view = memoryview(self._header)
        self.idle = True
        got = await self.channel.recv_into(view, None if self.authed else self.timeout)
        self.idle = False
        if got == 0:
            return False
        if got < HEADER_SIZE:
            await self._read_exact(view[got:])
        self.counters.received_bytes += got
        return True

    async def _read_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = await self.channel.recv_into(view[got:], self.timeout)
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
        check_request(frame, self.limits)
        op = Op(frame.op)
        if not self.authed and op not in (Op.PING, Op.AUTH):
            raise ProtocolError(Code.AUTH_REQUIRED, "this server requires an auth token: send AUTH first "
                                                    "(set auth_token or NENCACHE_AUTH_TOKEN on the client)")
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
                task = asyncio.create_task(self._answer(op, frame, namespace, keys, started))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _auth(self, frame: Frame, token: bytes, started: float) -> None:
        expected = self.server.token
        if expected is not None and not hmac.compare_digest(token, expected):
            raise ProtocolError(Code.AUTH_FAILED, "wrong auth token; give the client the server's auth_token "
                                                  "(NENCACHE_AUTH_TOKEN)")
        self.authed = True
        hello = {"server": "nencache", "protocol": 1, "auth": expected is not None, **self.limits.as_dict()}
        await self._reply(frame, started, body=[json.dumps(hello).encode()])

    async def _answer(self, op: Op, frame: Frame, namespace: bytes, keys: list[bytes], started: float) -> None:
        """EXISTS (with a disk tier), GET, DELETE and CLEAR, answered beside the reader loop."""
        try:
            space = await self._namespace(namespace, create=False)
            if op is Op.GET:
                await self._get(frame, space, keys, started)
            elif op is Op.LOCATE:
                await self._locate(frame, space, keys, started)
            elif op is Op.EXISTS:
                count = await self._on_disk(space, self.store.exists, space, keys) if space else 0
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
        if space is None:
            await self._reply(frame, started, count=len(keys), meta=pack_lengths([MISSING] * len(keys)))
            return
        pins = self.server.pins
        await pins.acquire(len(keys))
        leases = self.store.lease(space, keys)
        try:
            blobs: list[Any] = [self.store.view(lease) if lease else None for lease in leases]
            missing = [i for i, blob in enumerate(blobs) if blob is None]
            if missing and space.disk is not None:
                found = await self._blocking(self.store.read_disk, space, [keys[i] for i in missing])
                for i, blob in zip(missing, found):
                    blobs[i] = None if blob is None else memoryview(blob).cast("B")
            lengths = [MISSING if blob is None else len(blob) for blob in blobs]
            await self._reply(frame, started, count=len(keys), meta=pack_lengths(lengths),
                              body=[blob for blob in blobs if blob is not None])
        finally:
            for lease in leases:
                if lease is not None:
                    lease.release()
            pins.release(len(keys))

    async def _locate(self, frame: Frame, space: Namespace | None, keys: list[bytes], started: float) -> None:
        """Offsets of chunks in the shared region; chunks only on disk are promoted first."""
        region = self.store.region
        if region is None:
            raise ProtocolError(Code.UNSUPPORTED, "this server's pool is not shared; use GET", fatal=False)
        spots = self.store.locate(space, keys) if space is not None else [None] * len(keys)
        missing = [i for i, spot in enumerate(spots) if spot is None]
        unplaced: set[int] = set()
        if missing and space is not None and space.disk is not None:
            found = await self._blocking(self.store.read_disk, space, [keys[i] for i in missing])
            held = [i for i, blob in zip(missing, found) if blob is not None]
            for i, spot in zip(held, self.store.locate(space, [keys[i] for i in held])):
                spots[i] = spot
                if spot is None:  # on disk, but memory had no room for it: GET serves it
                    unplaced.add(i)
        meta = [region.nonce]
        for i, spot in enumerate(spots):
            if spot is not None:
                meta.append(SPOT.pack(spot.offset, spot.length, spot.generation))
            else:
                meta.append(SPOT.pack(UNPLACED if i in unplaced else MISSING, 0, 0))
        await self._reply(frame, started, count=len(keys), meta=b"".join(meta))

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
        for key, nbytes in zip(keys, lengths):
            try:
                page, view = self.store.take_page(nbytes)
            except PoolExhaustedError:
                busy += 1
                await self._discard(nbytes)
                continue
            try:
                await self._read_exact(view)
                if space.disk is not None and self.store.writer is not None:
                    await self.store.writer.reserve()
            except BaseException:
                self.store.abandon(page)
                raise
            if self.store.commit(space, key, page, nbytes):
                stored += 1
            else:
                bad += 1
        if busy:
            raise ProtocolError(Code.BUSY, f"{busy} of {len(keys)} chunks not stored: every pool page is being "
                                           "read; retry later or raise cpu_size on the server", fatal=False)
        if bad:
            raise ProtocolError(Code.BAD_CHUNK, f"{bad} of {len(keys)} blobs are not NenCache chunks (header, length "
                                                "or key do not match); they were not stored", fatal=False)
        await self._reply(frame, started, count=stored)

    # --- helpers ---------------------------------------------------------------------------------
    async def _namespace(self, name: bytes, *, create: bool) -> Namespace | None:
        space = self.store.known(name)
        if space is not None:
            return space
        if self.store.disk_root is None:
            return self.store.open(name, create=create) if create else None
        return await self._blocking(self.store.open, name, create=create)

    async def _on_disk(self, space: Namespace, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` off the event loop when it may touch the disk tier, else right here."""
        return fn(*args) if space.disk is None else await self._blocking(fn, *args)

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.server.executor, partial(fn, *args, **kwargs))

    async def _reply(self, frame: Frame, started: float, *, count: int = 0, meta: bytes = b"",
                     body: Sequence[Buffer] = ()) -> None:
        body_len = sum(len(part) for part in body)
        header = Frame(frame.op, frame.request_id, count, len(meta), body_len, int(Flag.RESPONSE)).pack()
        async with self._write:
            await self.channel.send([header, meta, *body], self.timeout)
        self.counters.sent_bytes += HEADER_SIZE + len(meta) + body_len
        self.counters.request(Op(frame.op), started)

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
