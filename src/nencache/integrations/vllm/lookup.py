"""Lookups across processes: the engine's scheduler asks every worker that holds a cache.

vLLM runs its scheduler in one process and its workers (one per tensor/pipeline-parallel rank) in
others, or all in one. Each worker keeps a `PinBook` over its `KVCache`: a lookup pins the prefix it
finds (`KVCache.pin_prefix`), keyed by request, so that the load, a step or many steps later, finds
exactly what was promised. The load takes the pin; a request that ends without a load has its pin
released; a pin nobody claims is released after `ttl` seconds.

`LookupServer` serves a book on a local Unix socket; `RankLookups` is what the scheduler holds: for
every rank, the book itself when it lives in the same process (`register_local`), else a client of
that rank's socket. A prompt's hit is the smallest over the ranks. Any failure is a miss.

Wire format (little-endian), one request and one reply per message:
`PIN`: `u8 op, u32 id_len, id, u32 salt_len, salt, int64 tokens...` -> `u64 pinned tokens`;
`RELEASE`: `u8 op, ids joined by newlines` -> `u64 1`; `RESET`: `u8 op` -> `u64 1`.
The socket is created with owner-only permissions and connections authenticate with a key derived
from the engine id, which only processes of the same engine know.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol

import numpy as np

from nencache.keys import TokenIds, token_array
from nencache.pinned import PinnedPrefix

log = logging.getLogger("nencache.vllm")

PIN, RELEASE, RESET = 1, 2, 3
_NOTED_REQUESTS = 1 << 16  # request ids remembered so a request's arrival is reported once
_OP = struct.Struct("<B")
_LEN = struct.Struct("<I")
_REPLY = struct.Struct("<Q")
MAX_REQUEST_BYTES = 64 << 20  # 8M tokens


class PinSource(Protocol):
    """What a book needs from a cache: `KVCache.prompt`, `pin_prefix`, `note_request` and `invalidate`."""

    def prompt(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> Any: ...

    def pin_prefix(self, token_ids: Any, *, salt: str | bytes | None = None) -> PinnedPrefix: ...

    def note_request(self, token_ids: Any, *, salt: str | bytes | None = None) -> None: ...

    def invalidate(self) -> None: ...


class PinBook:
    """One worker's pins, by request id."""

    def __init__(self, cache: PinSource, *, ttl: float = 600.0) -> None:
        self.cache = cache
        self.ttl = ttl
        self._pins: dict[str, tuple[PinnedPrefix, float]] = {}
        self._noted: OrderedDict[str, None] = OrderedDict()  # requests the cache's policies were told about
        self._lock = threading.Lock()

    def pin(self, req_id: str, token_ids: TokenIds, salt: str | bytes | None = None) -> int:
        """Pin the cached prefix of a request's tokens (replacing its earlier pin); its length in tokens.

        A request's first pin also tells the cache's eviction and prefetch policies that it arrived."""
        with self._lock:
            first = req_id not in self._noted
            self._noted[req_id] = None
            if len(self._noted) > _NOTED_REQUESTS:
                self._noted.popitem(last=False)
        prompt = self.cache.prompt(token_ids, salt=salt)  # hashed once for both calls
        if first:
            self.cache.note_request(prompt)
        pinned = self.cache.pin_prefix(prompt)
        now = time.monotonic()
        with self._lock:
            old = self._pins.pop(req_id, None)
            self._pins[req_id] = (pinned, now + self.ttl)
            expired = [key for key, (_, deadline) in self._pins.items() if deadline < now]
            dropped = [self._pins.pop(key)[0] for key in expired]
        for stale in ([old[0]] if old else []) + dropped:
            stale.release()
        return pinned.tokens

    def take(self, req_id: str) -> PinnedPrefix | None:
        """The request's pin, now owned by the caller (who releases it), or None."""
        with self._lock:
            entry = self._pins.pop(req_id, None)
        return entry[0] if entry else None

    def release(self, req_ids: Iterable[str]) -> None:
        with self._lock:
            dropped = [entry[0] for req_id in req_ids if (entry := self._pins.pop(req_id, None)) is not None]
        for pinned in dropped:
            pinned.release()

    def reset(self) -> None:
        """Release every pin and drop everything the cache holds (vLLM's reset of the prefix cache)."""
        self.clear()
        self.cache.invalidate()

    def clear(self) -> None:
        with self._lock:
            dropped = [pinned for pinned, _ in self._pins.values()]
            self._pins.clear()
        for pinned in dropped:
            pinned.release()

    def __len__(self) -> int:
        return len(self._pins)


_LOCAL: dict[tuple[str, int], PinBook] = {}
_LOCAL_LOCK = threading.Lock()


def register_local(engine_key: str, rank: int, book: PinBook | None) -> None:
    """Make a worker's book visible to a scheduler in the same process (None: remove it)."""
    with _LOCAL_LOCK:
        if book is None:
            _LOCAL.pop((engine_key, rank), None)
        else:
            _LOCAL[(engine_key, rank)] = book


def endpoint(engine_key: str, rank: int) -> tuple[str, bytes]:
    """The socket path and authentication key of one rank's lookup server."""
    name = f"{engine_key}#{rank}".encode()
    digest = hashlib.blake2b(name, digest_size=16, person=b"nencache-lookup").hexdigest()
    path = os.path.join(tempfile.gettempdir(), f"nencache-{digest[:20]}.sock")
    authkey = hashlib.blake2b(engine_key.encode(), digest_size=32, person=b"nencache-authkey").digest()
    return path, authkey


def encode_pin(req_id: str, token_ids: TokenIds, salt: str | bytes | None) -> bytes:
    ident = req_id.encode()
    raw = salt.encode() if isinstance(salt, str) else bytes(salt or b"")
    return (_OP.pack(PIN) + _LEN.pack(len(ident)) + ident + _LEN.pack(len(raw)) + raw
            + token_array(token_ids).astype("<i8", copy=False).tobytes())


def decode_pin(data: bytes) -> tuple[str, np.ndarray, bytes | None]:
    """(request id, tokens, salt) of a PIN message; ValueError when it is malformed."""
    at = _OP.size
    ident, at = _field(data, at)
    salt, at = _field(data, at)
    body = data[at:]
    if len(body) % 8:
        raise ValueError("malformed lookup request: the token array is not whole int64s")
    return ident.decode(), np.frombuffer(body, dtype="<i8"), salt or None


def _field(data: bytes, at: int) -> tuple[bytes, int]:
    if at + _LEN.size > len(data):
        raise ValueError("malformed lookup request: truncated length")
    (length,) = _LEN.unpack_from(data, at)
    at += _LEN.size
    if at + length > len(data):
        raise ValueError("malformed lookup request: a field runs past the message")
    return data[at : at + length], at + length


class LookupServer:
    """Answers one rank's PIN / RELEASE / RESET requests on a Unix socket, a thread per scheduler."""

    def __init__(self, book: PinBook, engine_key: str, rank: int) -> None:
        self.book = book
        self.path, authkey = endpoint(engine_key, rank)
        if os.path.exists(self.path):
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._listener = Listener(self.path, family="AF_UNIX", authkey=authkey)
        finally:
            os.umask(old_umask)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="nencache-lookup", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # closed, or a peer that failed authentication
                if self._closed.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="nencache-lookup-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while not self._closed.is_set():
                try:
                    data = conn.recv_bytes(MAX_REQUEST_BYTES)
                    conn.send_bytes(_REPLY.pack(self._answer(data)))
                except (EOFError, OSError):
                    return
                except Exception as exc:
                    log.warning("NenCache lookup server: dropped a bad request (%r)", exc)
                    return

    def _answer(self, data: bytes) -> int:
        if not data:
            raise ValueError("empty lookup request")
        op = data[0]
        if op == PIN:
            req_id, tokens, salt = decode_pin(data)
            return self.book.pin(req_id, tokens, salt)
        if op == RELEASE:
            self.book.release(data[1:].decode().split("\n"))
            return 1
        if op == RESET:
            self.book.reset()
            return 1
        raise ValueError(f"unknown lookup operation {op}")


class RankChannel:
    """The scheduler's line to one rank's book: in-process when it can be, else over the socket."""

    def __init__(self, engine_key: str, rank: int, *, retry_seconds: float = 1.0) -> None:
        self.engine_key, self.rank = engine_key, rank
        self.path, self._authkey = endpoint(engine_key, rank)
        self.retry_seconds = retry_seconds
        self._conn: Connection | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def local(self) -> PinBook | None:
        with _LOCAL_LOCK:
            return _LOCAL.get((self.engine_key, self.rank))

    def call(self, message: bytes) -> int | None:
        """Send one message and return the reply; None when the rank cannot be reached."""
        with self._lock:
            conn = self._connect()
            if conn is None:
                return None
            try:
                conn.send_bytes(message)
                return int(_REPLY.unpack(conn.recv_bytes(_REPLY.size))[0])
            except Exception as exc:
                log.warning("NenCache lookup server of rank %d unreachable (%r); treating it as a miss", self.rank, exc)
                self._drop()
                return None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> Connection | None:
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._next_try or not os.path.exists(self.path):
            return None
        try:
            self._conn = Client(self.path, family="AF_UNIX", authkey=self._authkey)
        except Exception as exc:
            log.debug("cannot reach the lookup server at %s: %r", self.path, exc)
            self._next_try = time.monotonic() + self.retry_seconds
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._next_try = time.monotonic() + self.retry_seconds


class RankLookups:
    """The scheduler's view of all workers' caches: a prompt's hit is what every rank has pinned."""

    def __init__(self, engine_key: str, num_ranks: int = 1) -> None:
        self.channels = [RankChannel(engine_key, rank) for rank in range(max(1, num_ranks))]

    def pin(self, req_id: str, token_ids: TokenIds, *, salt: str | bytes | None = None) -> int:
        """Pin the request's cached prefix on every rank; the tokens all of them hold (0 on any failure)."""
        tokens = token_array(token_ids)
        message: bytes | None = None
        held: list[int] = []
        for channel in self.channels:
            book = channel.local()
            if book is not None:
                try:
                    held.append(book.pin(req_id, tokens, salt))
                except Exception as exc:
                    log.warning("NenCache lookup failed (%r); treating it as a miss", exc)
                    held.append(0)
                continue
            message = message or encode_pin(req_id, tokens, salt)
            reply = channel.call(message)
            held.append(0 if reply is None else reply)
        return min(held)

    def release(self, req_ids: Iterable[str]) -> None:
        ids = [req_id for req_id in req_ids if req_id]
        if not ids:
            return
        for channel in self.channels:
            book = channel.local()
            if book is not None:
                book.release(ids)
            else:
                channel.call(_OP.pack(RELEASE) + "\n".join(ids).encode())

    def reset(self) -> bool:
        """Clear every rank's cache and pins; True when every rank confirmed."""
        confirmed = True
        for channel in self.channels:
            book = channel.local()
            if book is not None:
                book.reset()
            else:
                confirmed = channel.call(_OP.pack(RESET)) == 1 and confirmed
        return confirmed

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
