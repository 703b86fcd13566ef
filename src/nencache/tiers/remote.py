"""`ServerTier`: a byte tier on a NenCache server (`remote_url = "nencache://host:port"`).

Each call takes a pooled connection and pipelines its frames (many in flight, replies matched by
request id). Every socket call is bounded by `timeout`. A server that is down, slow or killed never
raises here: the call is counted as an error and answered as a miss. A refused or broken connection
marks the tier down at once (so do a few timed-out calls in a row; a single one is a busy server, not
a dead one), and until a background probe (exponential backoff) reaches the server again every call
is an immediate miss. Returned blobs are checked (header, length, key); the codec checks the payload
checksum.

When the server runs on this machine and shares its pool (`server_shared_memory`), `get` maps that
pool read-only and copies chunks straight out of it after one LOCATE round trip, instead of
receiving them over the socket (see `nencache.net.shared`). Chunks that went stale during the
copy, or that the server holds only on disk, are then fetched with GET as usual.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from nencache.errors import ClosedError, ConfigError, TierError
from nencache.net.buffers import BufferPool
from nencache.net.protocol import KEY_SIZE, Op, ProtocolError, check_namespace, pack_keyed_meta
from nencache.net.requests import count_present, fetch, locate
from nencache.net.retry import Reconnector
from nencache.net.shared import MappedRegion, Spot
from nencache.net.warn import ThrottledWarning
from nencache.net.wire import (
    ErrorReply, Reply, WireConnection, blob_ok, describe_failure, parse_url, split_items, split_keys, token_bytes,
)
from nencache.tiers.base import Distance, TierStats

log = logging.getLogger("nencache.server")
Blob = bytes | bytearray | memoryview
T = TypeVar("T")
_FAILURES = (OSError, ProtocolError, ErrorReply, ssl.SSLError, ValueError, KeyError)
_MAX_IDLE = 8
_TIMEOUTS_BEFORE_DOWN = 3  # consecutive timed-out calls after which a slow server counts as down


class ServerTier:
    """A byte tier on a NenCache server, for one namespace. See the module docstring."""

    name = "server"
    checks_payload = False
    publish_only = False
    distance = Distance.REMOTE

    def __init__(self, url: str, namespace: str, *, timeout: float = 0.25, auth_token: str | None = None,
                 retry_cap: float = 2.0, shared_memory: bool = True) -> None:
        if not timeout > 0:
            raise ConfigError(f"remote_timeout must be > 0 seconds, got {timeout}")
        self.target = parse_url(url)
        self.url = self.target.display()
        try:
            self.namespace = check_namespace(namespace.encode("ascii"))
        except (ProtocolError, UnicodeEncodeError):
            raise ConfigError(f"namespace {namespace!r}: use 1-255 characters of A-Z a-z 0-9 . _ : -") from None
        self.timeout = timeout
        self._token = token_bytes(auth_token)
        self._buffers = BufferPool()
        self._stats = TierStats()
        self._idle: list[WireConnection] = []
        self._state = threading.Lock()
        self._closed = threading.Event()
        self._retry = Reconnector("nencache-server-retry", self._probe, self._back_up, self._closed, retry_cap)
        self._warn = ThrottledWarning(log)
        self._up = True
        self._timeouts = 0  # consecutive calls that timed out
        self._share = shared_memory
        self._region: MappedRegion | None = None
        self._region_tried = False
        self.shared_reads = 0  # chunks copied out of the server's shared pool
        try:
            self._checkin(self._connect())
        except _FAILURES as exc:
            self._failed(exc)

    @property
    def is_up(self) -> bool:
        """True while the server answers; False while calls are served as misses."""
        return self._up

    # --- the Tier protocol -----------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check(keys)
        if not keys:
            return 0
        return self._call(lambda conn: count_present(conn, self.namespace, keys), 0)

    def get(self, keys: Sequence[bytes]) -> list[Blob | None]:
        self._check(keys)
        started = time.perf_counter()
        blobs = self._read_shared(keys) if self._share else None
        if blobs is None:
            blobs = self._call(lambda conn: fetch(conn, self.namespace, keys, self._error_reply), None)
        elif rest := [i for i, blob in enumerate(blobs) if blob is True]:
            more = self._call(lambda conn: fetch(conn, self.namespace, [keys[i] for i in rest], self._error_reply), None)
            for i, blob in zip(rest, more or [None] * len(rest)):
                blobs[i] = blob
        if blobs is None:
            self._stats.add(misses=len(keys))
            return [None] * len(keys)
        checked = [blob if blob is None or blob_ok(key, blob) else None for key, blob in zip(keys, blobs)]
        if corrupt := sum(b is not None for b in blobs) - sum(b is not None for b in checked):
            self._stats.add(corrupt=corrupt)
        hits = sum(b is not None for b in checked)
        self._stats.add(hits=hits, misses=len(keys) - hits, read_seconds=time.perf_counter() - started,
                    read_bytes=sum(len(b) for b in checked if b is not None))
        return checked

    def put(self, items: Sequence[tuple[bytes, Blob]]) -> None:
        self._check([key for key, _ in items])
        started = time.perf_counter()
        views = [(key, memoryview(blob).cast("B")) for key, blob in items]

        def run(conn: WireConnection) -> int:
            limits = conn.limits
            fitting = [(k, v) for k, v in views if 64 <= v.nbytes <= limits.max_chunk_bytes]
            if len(fitting) < len(views):
                self._stats.add(dropped=len(views) - len(fitting))
                self._warn(f"{len(views) - len(fitting)} chunks are larger than the server's max chunk size "
                           f"({limits.max_chunk_bytes} bytes) and were not sent; raise server_max_chunk_bytes")
            conn.start()
            ids = {}
            for group in split_items(fitting, limits.max_keys, limits.max_request_bytes):
                meta = pack_keyed_meta(self.namespace, [k for k, _ in group], [v.nbytes for _, v in group])
                ids[conn.send(Op.PUT, count=len(group), meta=meta, body=[v for _, v in group])] = len(group)
            replies = self._read_all(conn, dict(ids))
            return sum(r.frame.count for r in replies.values() if r.error is None)

        stored = self._call(run, None)
        if stored is None:
            self._stats.add(dropped=len(items))
            return
        self._stats.add(stored_chunks=stored, stored_bytes=sum(v.nbytes for _, v in views),
                    write_seconds=time.perf_counter() - started)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._check(keys)

        def run(conn: WireConnection) -> None:
            conn.start()
            groups = split_keys(keys, conn.limits.max_keys)
            ids = [conn.send(Op.DELETE, count=len(g), meta=pack_keyed_meta(self.namespace, g)) for g in groups]
            self._read_all(conn, {i: 0 for i in ids})

        if keys:
            self._call(run, None)

    def clear(self) -> None:
        self._check([])
        self._call(lambda conn: conn.call(Op.CLEAR, meta=pack_keyed_meta(self.namespace, [])), None)

    def flush(self) -> None:
        """Puts are acknowledged once the server holds them: nothing to wait for."""

    def stats(self) -> TierStats:
        return self._stats.snapshot()

    def server_stats(self) -> dict[str, object] | None:
        """The server's own counters (as on its admin /stats), or None when it is down."""
        import json

        reply = self._call(lambda conn: conn.call(Op.STATS), None)
        return None if reply is None else json.loads(reply.body)

    def close(self) -> None:
        self._closed.set()
        with self._state:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self._retry.join()

    # --- shared-memory reads ---------------------------------------------------------------------
    def _read_shared(self, keys: Sequence[bytes]) -> list[Blob | bool | None] | None:
        """Blobs copied out of the server's shared pool (True: fetch it with GET; None: absent), or None
        when the pool cannot be mapped from here."""
        region = self._mapped()
        if region is None:
            return None
        spots = self._call(lambda conn: locate(conn, self.namespace, keys, region.nonce), None)
        if spots is None:  # failed, or the server restarted with a new pool: map again next time
            self._region, self._region_tried = None, False
            return None
        out: list[Blob | bool | None] = []
        for spot in spots:
            if isinstance(spot, Spot):
                buffer = self._buffers.take(spot.length)
                copied = region.copy(spot, buffer)
                out.append(buffer if copied else True)
                self.shared_reads += copied
            else:
                out.append(True if spot else None)
        return out

    def _mapped(self) -> MappedRegion | None:
        """The server's pool, mapped read-only; None where it is not shared or not reachable from this process."""
        if self._region is not None or self._region_tried or not self._up:
            return self._region
        self._region_tried = True
        info = self._call(self._shared_info, None)
        try:
            self._region = MappedRegion.attach(info) if info is not None else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("%s: cannot map the server's pool (%s); reading over the socket", self.url, exc)
        return self._region

    @staticmethod
    def _shared_info(conn: WireConnection) -> dict[str, object] | None:
        import json

        try:
            reply = conn.call(Op.SHARED)
        except ErrorReply as exc:
            if exc.closing:
                raise
            return None  # the server does not share its pool
        try:
            info = json.loads(reply.body)
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    # --- calls and health ------------------------------------------------------------------------
    def _call(self, run: Callable[[WireConnection], T], default: T) -> T:
        if not self._up:
            return default
        try:
            conn, reused = self._checkout()
        except _FAILURES as exc:
            self._failed(exc)
            return default
        try:
            try:
                result = run(conn)
            except (ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                conn.close()  # a pooled connection the server dropped (e.g. it restarted): once more, fresh
                conn = self._connect()
                result = run(conn)
        except ErrorReply as exc:
            if exc.closing:
                conn.close()
                self._failed(exc)
            else:  # the server refused this request but is fine
                self._stats.add(errors=1)
                self._warn(f"{self.url}: {exc}")
                self._checkin(conn)
            return default
        except _FAILURES as exc:
            conn.close()
            self._failed(exc)
            return default
        self._timeouts = 0
        self._checkin(conn)
        return result

    def _error_reply(self, error: ErrorReply) -> None:
        """An error reply: counted and logged; the connection stays usable."""
        self._stats.add(errors=1)
        self._warn(f"{self.url}: {error}")

    def _read_all(self, conn: WireConnection, pending: dict[int, int]) -> dict[int, Reply]:
        """Every pending reply; error replies (the connection stays usable) are counted, not raised."""
        replies: dict[int, Reply] = {}
        while pending:
            reply = conn.read(pending)
            replies[reply.frame.request_id] = reply
            if reply.error is not None:
                self._stats.add(errors=1)
                self._warn(f"{self.url}: {reply.error}")
        return replies

    def _connect(self) -> WireConnection:
        return WireConnection(self.target, self.timeout, self._token, self._buffers)

    def _checkout(self) -> tuple[WireConnection, bool]:
        """A connection, and whether it was pooled (it may have gone stale). Pooled connections that idled
        near the server's idle timeout are closed instead: the server is about to close them."""
        stale: list[WireConnection] = []
        now = time.monotonic()
        try:
            with self._state:
                while self._idle:
                    conn = self._idle.pop()
                    if now - conn.idle_since < 0.8 * conn.idle_timeout:
                        return conn, True
                    stale.append(conn)
        finally:
            for conn in stale:
                conn.close()
        return self._connect(), False

    def _checkin(self, conn: WireConnection) -> None:
        with self._state:
            if self._up and not self._closed.is_set() and len(self._idle) < _MAX_IDLE:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
                return
        conn.close()

    def _failed(self, exc: BaseException) -> None:
        """A call failed: the server counts as down (misses at once, a background probe) unless it only
        timed out, fewer than `_TIMEOUTS_BEFORE_DOWN` times in a row: a busy server is not a dead one."""
        self._stats.add(errors=1)
        if isinstance(exc, TimeoutError):
            with self._state:
                self._timeouts += 1
                busy = self._timeouts < _TIMEOUTS_BEFORE_DOWN
            if busy:
                self._warn(f"{self.url}: a call timed out ({describe_failure(exc)}); answered as a miss")
                return
        with self._state:
            was_up, self._up = self._up, False
            idle, self._idle = self._idle, []
            self._region, self._region_tried = None, False
        for conn in idle:
            conn.close()
        if was_up and not self._closed.is_set():
            self._warn(f"NenCache server {self.url} failed ({describe_failure(exc)}); serving misses and retrying "
                       "in the background")
        self._retry.start()

    def _probe(self) -> bool:
        try:
            conn = self._connect()
            conn.call(Op.PING)
        except _FAILURES:
            return False
        conn.close()
        return True

    def _back_up(self) -> None:
        with self._state:
            self._up = not self._closed.is_set()
            self._timeouts = 0
        log.info("NenCache server %s is reachable again", self.url)

    def _check(self, keys: Sequence[bytes]) -> None:
        if self._closed.is_set():
            raise ClosedError("this ServerTier was closed; create a new one to use the server again")
        for key in keys:
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
                raise TierError(f"ServerTier keys are {KEY_SIZE}-byte chunk keys, got {key!r:.40}")

