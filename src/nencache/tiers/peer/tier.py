"""`PeerTier`: other peers' memory as a byte tier, found through the P2P index.

`contains_prefix` finds the holders of the keys: in the directories of the pools of peers on this
machine that are mapped here (`nencache.net.directory`), else in the local copy of the index that the
peers' announcements keep (`nencache.tiers.peer.mirror`), else in the index, in one round trip. Then
it makes sure the chosen holder still has them: where the chunks' placements in a holder's shared
pool are known and that pool is mapped here, by reading the pages' generations, else by asking it
(EXISTS). While the index is down, chunks found in those directories are still hits. `get` copies
placed chunks straight out of that pool, and fetches the rest from the holders. `put` publishes keys
(with their placements where this cache's pool is shared) only: no chunk bytes leave this process on
store (peers fetch them from this cache's `PeerEndpoint`). Evicted, deleted and cleared keys are
unpublished; a background thread refreshes the entries of the keys still held every `ttl / 3`. A
dead or slow index or peer is never an error: calls answer misses, failures are counted, and while
the index is down a background probe (exponential backoff) waits for it to come back, then
republishes everything held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from nencache.tiers.peer.client import PeerClients
from nencache.tiers.peer.index import Holder, PeerIndex
from nencache.tiers.peer.mirror import IndexMirror
from nencache.tiers.base import Distance, TierStats
from nencache.tiers.redis.resp import ReplyError
from nencache.net.warn import ThrottledWarning

log = logging.getLogger("nencache.p2p")
T = TypeVar("T")
Blob = bytes | bytearray | memoryview
_INDEX_FAILURES = (OSError, ReplyError)


class PreparedChunks(Protocol):
    def prepare(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Ready `keys` to be served; where each sits in the shared pool (packed placements; None: not shared)."""
        ...


class Endpoint(Protocol):
    """What the peer tier needs of the endpoint that serves this cache's chunks (`p2p.endpoint.PeerEndpoint`):
    the address it publishes, the store it readies chunks in before publishing them, and closing it."""

    address: str
    store: PreparedChunks

    def close(self) -> None: ...


_FIRST_RETRY = 0.25
_RETRY_CAP = 2.0
_HOLDERS_TTL = 5.0  # seconds holders found by a lookup are reused by the retrieve that follows it
_MAX_HOLDERS = 4096


class PeerTier:
    """A byte tier over peers. See the module docstring."""

    name = "p2p"
    checks_payload = True  # `PeerClients` checks every blob (or its shared pool vouches for it)
    publish_only = True  # `put` publishes keys; peers fetch the bytes from this cache's endpoint
    distance = Distance.PEER

    def __init__(self, index: PeerIndex, endpoint: Endpoint, clients: PeerClients, *, ttl: float,
                 mirror_keys: int = 0) -> None:
        self.index, self.endpoint, self.clients = index, endpoint, clients
        self.mirror = IndexMirror(index.subscribe, max_keys=mirror_keys).start() if mirror_keys else None
        clients.on_failure = lambda: self._stats.add(errors=1)
        clients.on_corrupt = lambda count: self._stats.add(corrupt=count)
        self.address = endpoint.address
        self._interval = ttl / 3
        self._stats = TierStats()
        self._lock = threading.Lock()
        # Keys whose holders were found in local peers' directories, in the mirror, and keys asked of the index.
        self._lookups = {"found_directory": 0, "found_mirror": 0, "asked_index": 0}
        self._published: dict[bytes, bytes | None] = {}  # key -> its placement in this cache's shared pool
        self._gone: set[bytes] = set()  # evicted keys waiting to be unpublished
        self._holders: dict[bytes, tuple[float, list[Holder]]] = {}
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._up = True
        self._warn = ThrottledWarning(log)
        try:
            index.check()
        except _INDEX_FAILURES as exc:
            self._index_failed(exc)
        self._thread = threading.Thread(target=self._run, name="nencache-p2p", daemon=True)
        self._thread.start()

    @property
    def is_up(self) -> bool:
        """True while the index answers; False while every lookup is a miss."""
        return self._up

    # --- the Tier protocol -----------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        holders = self.holders(keys)
        run = 0
        while run < len(holders) and holders[run]:
            run += 1
        confirmed = 0
        for peer, start, end in self._segments(holders[:run]):  # usually one holder
            found = self.clients.confirm(peer, [_placement(one, peer) for one in holders[start:end]])
            if found < end - start:
                found += self.clients.exists(peer, keys[start + found : end])
            confirmed = start + found
            if found < end - start:
                break
        return confirmed

    def get(self, keys: Sequence[bytes]) -> list[Blob | None]:
        started = time.perf_counter()
        out: list[Blob | None] = [None] * len(keys)
        candidates = self._cached_holders(keys)
        unknown = [i for i, c in enumerate(candidates) if c is None]
        if unknown:
            for i, found in zip(unknown, self.holders([keys[i] for i in unknown])):
                candidates[i] = found
        for attempt in range(2):  # the first holder of each key, then the second for what it lacked
            wanted: dict[str, list[int]] = {}
            for i, found in enumerate(candidates):
                if out[i] is None and found and len(found) > attempt:
                    wanted.setdefault(found[attempt].address, []).append(i)
            for peer, positions in wanted.items():
                placements = [_placement(candidates[i], peer) for i in positions]
                for i, blob in zip(positions, self.clients.get(peer, [keys[i] for i in positions], placements)):
                    out[i] = blob
        hits = sum(b is not None for b in out)
        self._stats.add(hits=hits, misses=len(keys) - hits, read_bytes=sum(len(b) for b in out if b is not None),
                        read_seconds=time.perf_counter() - started)
        with self._lock:
            for key in keys:
                self._holders.pop(key, None)
        return out

    def put(self, items: Sequence[tuple[bytes, Blob]]) -> None:
        """Publish the keys of chunks this cache now holds (values are ignored: peers fetch them here)."""
        keys = [bytes(k) for k, _ in items]
        placements = self.endpoint.store.prepare(keys)
        with self._lock:
            self._published.update(zip(keys, placements))
            self._gone.difference_update(keys)
        self._stats.add(stored_chunks=len(keys))
        self._index_call(lambda: self.index.publish(keys, self.address, placements), None)

    def delete(self, keys: Sequence[bytes]) -> None:
        keys = [bytes(k) for k in keys]
        with self._lock:
            for key in keys:
                self._published.pop(key, None)
            self._gone.difference_update(keys)
        self._index_call(lambda: self.index.unpublish(keys, self.address), None)

    def clear(self) -> None:
        with self._lock:
            keys = [*self._published, *self._gone]
        self.delete(keys)

    def flush(self) -> None:
        """Unpublish the evicted keys now."""
        self._unpublish_gone()

    def lookup_stats(self) -> dict[str, int]:
        """Keys found in local peers' directories, in the mirror, and asked of the index; the mirror's state."""
        mirror = self.mirror
        with self._lock:
            out = dict(self._lookups)
        out.update(mirror_live=int(mirror is not None and mirror.live), mirror_keys=len(mirror) if mirror else 0,
                   mirror_malformed=mirror.malformed if mirror else 0, mirror_dropped=mirror.dropped if mirror else 0,
                   announce_failures=self.index.announce_failures)
        return out

    def stats(self) -> TierStats:
        with self._lock, self._stats.lock:
            self._stats.chunks = len(self._published)
        return self._stats.snapshot()

    def close(self) -> None:
        """Unpublish everything (best effort), stop serving and close connections."""
        if self._closed.is_set():
            return
        self.clear()
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        if self.mirror is not None:
            self.mirror.close()
        self.endpoint.close()
        self.clients.close()
        self.index.close()

    def evicted(self, key: bytes) -> None:
        """Told by the memory tier when it evicts `key`: unpublished in the background."""
        with self._lock:
            if key in self._published:
                del self._published[key]
                self._gone.add(key)
        self._wake.set()

    # --- lookups ---------------------------------------------------------------------------------
    def holders(self, keys: Sequence[bytes]) -> list[list[Holder]]:
        """Usable holders of each key (not this peer, not a peer being skipped). A key a peer on this machine
        holds is found in the directory of its pool, where that pool is mapped here, and that peer comes
        first; the mirror of the index adds the other holders it lists (a read tries a second holder when
        the first no longer has the chunk); the keys neither knows take one index round trip."""
        if not keys:
            return []
        holders: list[list[Holder]] = [[] if local is None else [local] for local in self.clients.find_local(keys)]
        local = sum(1 for found in holders if found)
        if self.mirror is not None:
            for found, peers in zip(holders, self.mirror.lookup(keys)):
                found.extend(h for h in self._usable(peers or ()) if not found or h.address != found[0].address)
        ask = [i for i, found in enumerate(holders) if not found]
        mirrored, asked = len(keys) - len(ask) - local, 0
        if ask:
            found = self._index_call(lambda: self.index.lookup([keys[i] for i in ask]), None)
            asked = len(ask) if found is not None else 0  # None: the index is down, or failed this time
            for i, peers in zip(ask, found or ()):
                holders[i] = self._usable(peers)
        expires = time.monotonic() + _HOLDERS_TTL
        with self._lock:
            self._lookups["found_directory"] += local
            self._lookups["found_mirror"] += mirrored
            self._lookups["asked_index"] += asked
            if len(self._holders) + len(keys) > _MAX_HOLDERS:
                self._holders.clear()
            for key, peers in zip(keys, holders):
                if peers:
                    self._holders[bytes(key)] = (expires, peers)
                else:  # the index no longer lists a holder: a read must not use an older answer
                    self._holders.pop(bytes(key), None)
        return holders

    def _usable(self, holders: Sequence[Holder]) -> list[Holder]:
        return [h for h in holders if h.address != self.address and self.clients.usable(h.address)]

    def _cached_holders(self, keys: Sequence[bytes]) -> list[list[Holder] | None]:
        now = time.monotonic()
        with self._lock:
            cached = [self._holders.get(bytes(k)) for k in keys]
        return [c[1] if c is not None and c[0] > now else None for c in cached]

    @staticmethod
    def _segments(holders: list[list[Holder]]) -> list[tuple[str, int, int]]:
        """(peer, start, end): consecutive keys served by one peer, keeping the current peer while it can."""
        out: list[tuple[str, int, int]] = []
        for i, peers in enumerate(holders):
            if out and any(h.address == out[-1][0] for h in peers):
                out[-1] = (out[-1][0], out[-1][1], i + 1)
            else:
                out.append((peers[0].address, i, i + 1))
        return out

    # --- the index: health, refresh, unpublish ---------------------------------------------------
    def _index_call(self, call: Callable[[], T], default: T) -> T:
        if not self._up or self._closed.is_set():
            return default
        try:
            return call()
        except _INDEX_FAILURES as exc:
            self._index_failed(exc)
            return default

    def _index_failed(self, exc: BaseException) -> None:
        self._stats.add(errors=1)
        with self._lock:
            was_up, self._up = self._up, False
        self.index.reset()
        if was_up:
            self._warn("P2P index %s failed (%s: %s); peers are misses until it answers again", self.index.url,
                       type(exc).__name__, exc)
        self._wake.set()

    def _unpublish_gone(self) -> None:
        with self._lock:
            gone = [k for k in self._gone if k not in self._published]
            self._gone.clear()
        if gone:
            self._index_call(lambda: self.index.unpublish(gone, self.address), None)

    def _republish(self) -> None:
        with self._lock:
            keys, placements = list(self._published), list(self._published.values())
        if keys:
            self._index_call(lambda: self.index.publish(keys, self.address, placements), None)

    def _run(self) -> None:
        """Refresh held keys every `ttl / 3`, unpublish evicted ones, probe the index while it is down."""
        next_refresh = time.monotonic() + self._interval
        delay = _FIRST_RETRY
        while not self._closed.is_set():
            timeout = delay if not self._up else max(0.0, next_refresh - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._closed.is_set():
                return
            if not self._up:
                try:
                    self.index.check()
                except _INDEX_FAILURES:
                    delay = min(delay * 2, _RETRY_CAP)
                    continue
                delay = _FIRST_RETRY
                self._up = True
                log.info("P2P index %s answers again; republishing the chunks held here", self.index.url)
                next_refresh = 0.0
            self._unpublish_gone()
            if time.monotonic() >= next_refresh:
                self._republish()
                next_refresh = time.monotonic() + self._interval


def _placement(holders: list[Holder] | None, peer: str) -> bytes | None:
    """Where `peer` said the chunk sits in its shared pool, if it is among `holders` and said so."""
    return next((h.placement for h in holders or () if h.address == peer), None)
