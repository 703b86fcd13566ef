"""`IndexMirror`: a local copy of the P2P index's holder lists, kept by the peers' announcements.

Every publish and unpublish of a peer is also announced on its namespace's channel
(`nencache.tiers.peer.announce`). The mirror subscribes to that channel on a background thread and
applies each announcement to a dict, so that `PeerTier` finds the holders of a chunk published since
the subscription without a round trip to the index. It holds positives only: a key it does not list is
asked of the index, as before. Holders refresh their entries every `ttl / 3`, so a key published before
the subscription is listed here within that time.

Staleness is bounded as the index's own: an entry expires when the index's does, and an unpublish
removes it as soon as its announcement arrives. A stale entry costs a fetch the holder answers as a
miss (every fetched chunk is checked against its key), never a wrong chunk. While the subscription is
down, announcements may be lost: the copy is dropped and not used until it is subscribed again (with
exponential backoff). Its size is bounded (`max_keys`); past it, new keys are left to the index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from nencache.net.retry import FIRST_RETRY
from nencache.tiers.peer.announce import Announcement
from nencache.tiers.peer.index import Holder

log = logging.getLogger("nencache.p2p")
_WAIT = 0.1  # seconds the feed waits for a message before it checks whether it was closed
_SWEEP_EVERY = 1.0  # seconds between sweeps of expired entries while the mirror is full
_RETRY_CAP = 2.0  # seconds between attempts to subscribe again, at most


class Subscription(Protocol):
    def next(self, timeout: float) -> bytes | None:
        """The next message, or None after `timeout` seconds without one; `OSError` when the feed failed."""
        ...

    def close(self) -> None: ...


class IndexMirror:
    """Holders per key, as announced since the subscription. Thread-safe; see the module docstring."""

    def __init__(self, subscribe: Callable[[], Subscription], *, max_keys: int) -> None:
        self.max_keys = max_keys
        self.applied = 0  # announcements applied
        self.malformed = 0  # messages on the channel that were not announcements
        self.dropped = 0  # keys not copied because the mirror was full
        self._subscribe = subscribe
        self._holders: dict[bytes, dict[str, tuple[int, bytes | None]]] = {}  # key -> peer -> (expires ms, placement)
        self._lock = threading.Lock()
        self._live = False
        self._swept = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="nencache-p2p-mirror", daemon=True)

    @property
    def live(self) -> bool:
        """True while subscribed: only then is the copy used."""
        return self._live

    def start(self) -> IndexMirror:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def lookup(self, keys: Sequence[bytes]) -> list[list[Holder] | None]:
        """Each key's live holders, latest expiry first, with their placements; None where none is known here
        (or while the mirror is not subscribed)."""
        if not self._live:
            return [None] * len(keys)
        now = _now_ms()
        out: list[list[Holder] | None] = []
        with self._lock:
            for key in keys:
                peers = self._holders.get(bytes(key))
                live = sorted(((e, p, at) for p, (e, at) in peers.items() if e > now), reverse=True) if peers else ()
                out.append([Holder(peer, placement) for _, peer, placement in live] or None)
        return out

    def apply(self, announcement: Announcement) -> None:
        with self._lock:
            self.applied += 1
            if not announcement.held:
                for key in announcement.keys:
                    if (peers := self._holders.get(key)) is not None:
                        peers.pop(announcement.peer, None)
                        if not peers:
                            del self._holders[key]
                return
            expires = announcement.expires_ms
            for key, placement in zip(announcement.keys, announcement.placements):
                peers = self._holders.get(key)
                if peers is None:
                    if len(self._holders) >= self.max_keys and not self._sweep():
                        self.dropped += 1
                        continue
                    peers = self._holders[key] = {}
                peers[announcement.peer] = (expires, placement)

    def __len__(self) -> int:
        with self._lock:
            return len(self._holders)

    def _sweep(self) -> bool:
        """Drop expired entries (at most once per `_SWEEP_EVERY`, under the lock); True if there is room now."""
        now = time.monotonic()
        if now - self._swept >= _SWEEP_EVERY:
            self._swept = now
            wall = _now_ms()
            for key in [k for k, peers in self._holders.items() if all(e <= wall for e, _ in peers.values())]:
                del self._holders[key]
        return len(self._holders) < self.max_keys

    def _follow(self) -> None:
        """Subscribe, apply announcements until the feed fails, drop the copy, subscribe again (with backoff)."""
        delay = FIRST_RETRY
        while not self._closed.is_set():
            try:
                subscription = self._subscribe()
            except OSError as exc:
                log.debug("P2P announcements: subscribing failed (%s)", exc)
                self._closed.wait(delay)
                delay = min(delay * 2, _RETRY_CAP)
                continue
            delay = FIRST_RETRY
            self._live = True
            try:
                while not self._closed.is_set():
                    message = subscription.next(_WAIT)
                    if message is not None:
                        if (announcement := Announcement.unpack(message)) is None:
                            self.malformed += 1
                        else:
                            self.apply(announcement)
            except OSError as exc:
                log.debug("P2P announcements: the subscription failed (%s)", exc)
            finally:
                self._live = False
                with self._lock:
                    self._holders.clear()
                subscription.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
