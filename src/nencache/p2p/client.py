"""`PeerClients`: connections to other peers' endpoints, cached per peer, with bounded timeouts.

A peer speaks the NenCache server protocol (`nencache.net.wire`). A peer that is down, slow,
killed or refuses a request is never an error for the caller: the call answers a miss, the failure
is counted, and the peer is skipped for `retry_after` seconds (its index entries expire meanwhile).
Returned blobs are checked (header, length, key); the codec checks the payload checksum.
With `shared_memory`, a peer on this machine that shares its pool is read through it
(`nencache.net.shared_pool`): one LOCATE round trip, then a memory copy per chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from nencache.net.buffers import BufferPool
from nencache.net.protocol import ProtocolError
from nencache.net.requests import count_present, fetch
from nencache.net.shared import MappedRegion
from nencache.net.shared_pool import attach, read_shared
from nencache.net.warn import ThrottledWarning
from nencache.net.wire import (
    ErrorReply, Target, WireConnection, blob_ok, describe_failure, token_bytes,
)

log = logging.getLogger("nencache.p2p")
T = TypeVar("T")
_FAILURES = (OSError, ProtocolError, ErrorReply, ValueError, KeyError)
_MAX_IDLE = 4  # idle connections kept per peer
_MAX_PEERS = 64  # peers with cached connections


def parse_peer(address: str) -> Target:
    """`host:port` or `[v6-host]:port` as a connection target; `ValueError` if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad peer address {address!r}")
    return Target(host.removeprefix("[").removesuffix("]"), int(port))


def peer_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerClients:
    """Pooled connections to peers of one namespace. Thread-safe; see the module docstring."""

    def __init__(self, namespace: bytes, *, timeout: float, auth_token: str | None = None,
                 retry_after: float = 2.0, on_failure: Callable[[], None] | None = None,
                 shared_memory: bool = True) -> None:
        self.namespace, self.timeout, self.retry_after = namespace, timeout, retry_after
        self.shared_memory = shared_memory
        self.shared_reads = 0  # chunks copied out of a local peer's shared pool
        self._regions: dict[str, MappedRegion | None] = {}  # peer -> its mapped pool (None: read over the socket)
        self.on_failure = on_failure  # told of each failed call (the owner counts it)
        self._token = token_bytes(auth_token)
        self._buffers = BufferPool()
        self._idle: OrderedDict[str, list[WireConnection]] = OrderedDict()
        self._failed: dict[str, float] = {}  # peer -> monotonic time it may be tried again
        self._lock = threading.Lock()
        self._warn = ThrottledWarning(log)

    def usable(self, peer: str) -> bool:
        """False while `peer` is being skipped after a failure."""
        with self._lock:
            until = self._failed.get(peer)
            if until is None:
                return True
            if time.monotonic() < until:
                return False
            del self._failed[peer]
            return True

    def exists(self, peer: str, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, `peer` holds (0 when it fails)."""
        return self._call(peer, lambda conn: count_present(conn, self.namespace, keys), 0) if keys else 0

    def get(self, peer: str, keys: Sequence[bytes]) -> list[memoryview | None]:
        """The blobs `peer` holds for `keys` (header, length and key checked), None elsewhere or on failure."""
        blobs = self._call(peer, lambda conn: self._fetch(peer, conn, keys), None) if keys else []
        if blobs is None or len(blobs) != len(keys):
            return [None] * len(keys)
        return [blob if blob is not None and blob_ok(key, blob) else None for key, blob in zip(keys, blobs)]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, OrderedDict()
            self._regions.clear()
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # --- reads -----------------------------------------------------------------------------------
    def _fetch(self, peer: str, conn: WireConnection, keys: Sequence[bytes]) -> list[memoryview | None]:
        """The blobs of `keys` from `peer`: out of its shared pool where it can be mapped, else with GET."""
        region = self._region(peer, conn) if self.shared_memory else None
        if region is not None:
            got = read_shared(conn, region, self.namespace, keys, self._buffers)
            if got is not None:
                rest = [i for i, blob in enumerate(got) if blob is True]
                copied = len(got) - len(rest) - sum(blob is None for blob in got)
                if rest:
                    for i, blob in zip(rest, fetch(conn, self.namespace, [keys[i] for i in rest])):
                        got[i] = blob
                with self._lock:
                    self.shared_reads += copied
                return [None if blob is None or blob is True else blob for blob in got]  # type: ignore[misc]
            with self._lock:  # the peer restarted with a new pool: map it again next time
                self._regions.pop(peer, None)
        return fetch(conn, self.namespace, keys)

    def _region(self, peer: str, conn: WireConnection) -> MappedRegion | None:
        with self._lock:
            if peer in self._regions:
                return self._regions[peer]
        region = attach(conn)
        with self._lock:
            if len(self._regions) >= 4 * _MAX_PEERS:
                self._regions.clear()
            self._regions[peer] = region
        return region

    # --- connections -----------------------------------------------------------------------------
    def _call(self, peer: str, run: Callable[[WireConnection], T], default: T) -> T:
        if not self.usable(peer):
            return default
        try:
            conn, reused = self._checkout(peer)
        except _FAILURES as exc:
            self._fail(peer, exc)
            return default
        try:
            try:
                result = run(conn)
            except (ConnectionResetError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
                conn = self._connect(peer)  # a cached connection the peer dropped: once more, fresh
                result = run(conn)
        except _FAILURES as exc:
            conn.close()
            self._fail(peer, exc)
            return default
        self._checkin(peer, conn)
        return result

    def _connect(self, peer: str) -> WireConnection:
        return WireConnection(parse_peer(peer), self.timeout, self._token, self._buffers)

    def _checkout(self, peer: str) -> tuple[WireConnection, bool]:
        with self._lock:
            idle = self._idle.get(peer)
            if idle:
                return idle.pop(), True
        return self._connect(peer), False

    def _checkin(self, peer: str, conn: WireConnection) -> None:
        surplus: list[WireConnection] = []
        with self._lock:
            idle = self._idle.setdefault(peer, [])
            self._idle.move_to_end(peer)
            (idle if len(idle) < _MAX_IDLE else surplus).append(conn)
            if len(self._idle) > _MAX_PEERS:
                surplus.extend(self._idle.popitem(last=False)[1])
        for old in surplus:
            old.close()

    def _fail(self, peer: str, exc: BaseException) -> None:
        if self.on_failure is not None:
            self.on_failure()
        with self._lock:
            now = time.monotonic()
            if len(self._failed) > 4 * _MAX_PEERS:
                self._failed = {p: t for p, t in self._failed.items() if t > now}
            self._failed[peer] = now + self.retry_after
            dropped = self._idle.pop(peer, [])
            self._regions.pop(peer, None)
        for conn in dropped:
            conn.close()
        self._warn("peer %s failed (%s); its chunks are misses for %gs", peer, describe_failure(exc), self.retry_after)
