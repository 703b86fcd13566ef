"""`PeerClients`: connections to other peers' endpoints, cached per peer, with bounded timeouts.

A peer speaks the NenCache server protocol (`nencache.net.wire`). A peer that is down, slow,
killed or refuses a request is never an error for the caller: the call answers a miss, the failure
is counted, and the peer is skipped for `retry_after` seconds (its index entries expire meanwhile).
Returned blobs are checked: header, length and key, and the payload checksum, except for a copy out
of a shared pool that vouches for its payloads (`nencache.net.shared`: its bytes are then exactly the
holder's, as trustworthy as a hit in the holder's own memory). A blob that fails is dropped and counted.
With `shared_memory`, a peer on this machine that shares its pool is read through it
(`nencache.net.shared_pool`): once its pool is mapped, a chunk whose placement the index gave is
copied without asking the peer anything; others take one LOCATE round trip, then a copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from nencache.errors import CorruptChunkError
from nencache.format import split_blob
from nencache.net.buffers import BufferPool
from nencache.net.protocol import ProtocolError
from nencache.net.requests import count_present, fetch
from nencache.net.shared import MappedRegion, Placement, Spot
from nencache.net.shared_pool import attach, copy_out, read_shared
from nencache.net.warn import ThrottledWarning
from nencache.net.wire import (
    ErrorReply, Target, WireConnection, blob_ok, describe_failure, token_bytes,
)
from nencache.tiers.peer.index import Holder

log = logging.getLogger("nencache.p2p")
T = TypeVar("T")
_FAILURES = (OSError, ProtocolError, ErrorReply, ValueError, KeyError)
_MAX_IDLE = 4  # idle connections kept per peer
_MAX_PEERS = 64  # peers with cached connections
_ALIVE_AGE = 1.0  # seconds a mapped pool's owner, once found running, is not looked for again


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
        self.on_corrupt: Callable[[int], None] | None = None  # told how many blobs of a call failed their checks
        self._token = token_bytes(auth_token)
        self._buffers = BufferPool()
        self._idle: OrderedDict[str, list[WireConnection]] = OrderedDict()
        self._failed: dict[str, float] = {}  # peer -> monotonic time it may be tried again
        self._lock = threading.Lock()
        self._warn = ThrottledWarning(log)

    def usable(self, peer: str) -> bool:
        """False while `peer` is being skipped after a failure."""
        if not self._failed:  # no peer is being skipped (the usual case): no lock taken
            return True
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

    def find_local(self, keys: Sequence[bytes]) -> list[Holder | None]:
        """For each key, a peer whose pool is mapped here and whose directory places the chunk in a page
        that still holds it, with that placement; None where no such peer does (the index is asked)."""
        with self._lock:
            mapped = [(peer, region) for peer, region in self._regions.items() if region is not None]
        regions = [(peer, region) for peer, region in mapped if self._mapped(peer) is region and self.usable(peer)]
        out: list[Holder | None] = [None] * len(keys)
        if regions:
            for i, key in enumerate(keys):
                for peer, region in regions:
                    if (spot := region.find(key)) is not None:
                        out[i] = Holder(peer, Placement(region.nonce, spot).pack())
                        break
        return out

    def confirm(self, peer: str, placements: Sequence[bytes | None]) -> int:
        """How many of `placements`, from the first, still hold their chunk in `peer`'s mapped pool: an
        EXISTS answered without asking the peer (0 where its pool is not mapped here)."""
        region = self._mapped(peer)
        found = 0
        while region is not None and found < len(placements):
            spot = _spot(region, placements[found])
            if spot is None or not region.current(spot):
                break
            found += 1
        return found

    def get(self, peer: str, keys: Sequence[bytes],
            placements: Sequence[bytes | None] | None = None) -> list[memoryview | None]:
        """The blobs `peer` holds for `keys`, checked (see the module docstring), None elsewhere or on failure.

        `placements` (from the index, per key; None where unknown) are copied straight out of the peer's
        pool where it is mapped here; the rest, and whatever went stale, are asked of the peer."""
        if not keys:
            return []
        out: list[memoryview | None] = [None] * len(keys)
        bad = 0
        region = self._mapped(peer) if placements is not None else None
        if region is not None and placements is not None:
            for i, placement in enumerate(placements):
                spot = _spot(region, placement)
                if spot is not None and (blob := copy_out(region, spot, self._buffers)) is not None:
                    out[i] = _checked(keys[i], blob, region.checked)  # a bad one is asked of the peer below
                    bad += out[i] is None
            with self._lock:
                self.shared_reads += sum(blob is not None for blob in out)
        rest = [i for i, blob in enumerate(out) if blob is None]
        if rest:
            asked = [keys[i] for i in rest]
            fetched = self._call(peer, lambda conn: self._fetch(peer, conn, asked), None)
            if fetched is not None and len(fetched) == len(rest):
                for i, (blob, vouched) in zip(rest, fetched):
                    out[i] = _checked(keys[i], blob, vouched)
                    bad += blob is not None and out[i] is None
        if bad and self.on_corrupt is not None:
            self.on_corrupt(bad)
        return out

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, OrderedDict()
            self._regions.clear()
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # --- reads -----------------------------------------------------------------------------------
    def _fetch(self, peer: str, conn: WireConnection, keys: Sequence[bytes]) -> list[tuple[memoryview | None, bool]]:
        """The blobs of `keys` from `peer`, each with whether its pool vouches for its payload: out of its
        shared pool where it can be mapped (LOCATE, then a copy), else with GET."""
        region = self._region(peer, conn) if self.shared_memory else None
        if region is not None:
            got = read_shared(conn, region, self.namespace, keys, self._buffers)
            if got is not None:
                rest = [i for i, blob in enumerate(got) if blob is True]
                copied = len(got) - len(rest) - sum(blob is None for blob in got)
                out = [(None if blob is None or blob is True else blob, region.checked) for blob in got]
                if rest:
                    for i, blob in zip(rest, fetch(conn, self.namespace, [keys[i] for i in rest])):
                        out[i] = (blob, False)
                with self._lock:
                    self.shared_reads += copied
                return out  # type: ignore[return-value]
            with self._lock:  # the peer restarted with a new pool: map it again next time
                self._regions.pop(peer, None)
        return [(blob, False) for blob in fetch(conn, self.namespace, keys)]

    def _mapped(self, peer: str) -> MappedRegion | None:
        """`peer`'s pool if it is mapped here and its owner still runs (else the mapping is dropped)."""
        if not self.shared_memory:
            return None
        with self._lock:
            region = self._regions.get(peer)
        if region is not None and not region.alive(max_age=_ALIVE_AGE):
            with self._lock:
                self._regions.pop(peer, None)
            return None
        return region

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


def _spot(region: MappedRegion, placement: bytes | None) -> Spot | None:
    """The spot a placement from the index names in `region`; None if it names another pool, or nothing."""
    found = Placement.unpack(placement) if placement is not None else None
    return found.spot if found is not None and found.nonce == region.nonce else None


def _checked(key: bytes, blob: memoryview | None, vouched: bool) -> memoryview | None:
    """`blob` if its header, length and key (and, unless `vouched`, its payload checksum) are right; else None."""
    if blob is None:
        return None
    if vouched:
        return blob if blob_ok(key, blob) else None
    try:
        split_blob(blob, key, verify=True)
    except CorruptChunkError:
        return None
    return blob
