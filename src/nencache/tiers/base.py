"""The `Tier` protocol every byte tier implements, and the counters every tier keeps.

A byte tier (disk, Redis, a NenCache server, a peer) stores whole chunks in the shared byte format
(`nencache.format`) under 16-byte keys. A tier instance serves one namespace: `clear()` removes what
this instance stores for that namespace and nothing else. Tiers may raise (`TierError`, `OSError`,
...); the core store (`nencache.store`) turns any failure below memory into a counted miss.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class TierStats:
    """Counters of one tier. Updated under `lock` by the tier that owns them, and only by it: others read a
    `snapshot()` (what `Tier.stats()` returns), so no count lands on a copy by mistake."""

    hits: int = 0
    misses: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    read_bytes: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    dropped: int = 0
    chunks: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        """Add to counters by name, under the lock."""
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> "TierStats":
        """A consistent copy, taken under the lock (its own lock is a fresh one)."""
        with self.lock:
            return replace(self, lock=threading.Lock())

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


class Distance(IntEnum):
    """How far a tier's chunks are: the store asks nearer tiers first (ties keep the configured order)."""

    LOCAL = 1  # this machine: disk
    PEER = 2  # other caches' memory, found through the P2P index
    REMOTE = 3  # a shared service: Redis/Valkey, a NenCache server


@runtime_checkable
class Tier(Protocol):
    """A place chunks live below the memory pool, and what it can do.

    Capabilities (class attributes), read by the store instead of any type or name test:
    - `checks_payload`: `get` verifies each blob's payload checksum itself, so the store skips its own
      second pass over raw payloads (lossy codecs still check theirs as they decode);
    - `publish_only`: the tier holds no bytes of this process's chunks; `put` only announces which keys
      this process now holds (values are empty and nothing is encoded for it), as the peer tier does;
    - `distance`: its place in the order the store asks tiers in.
    """

    name: str
    checks_payload: bool
    publish_only: bool
    distance: Distance

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are present (stops at the first missing one)."""
        ...

    def get(self, keys: Sequence[bytes]) -> list[bytes | bytearray | memoryview | None]:
        """The stored blobs of `keys` (header included), `None` where absent. Fetched in parallel where possible."""
        ...

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        """Store blobs under keys; an existing key may be kept or overwritten."""
        ...

    def delete(self, keys: Sequence[bytes]) -> None:
        """Forget these keys (missing ones are ignored)."""
        ...

    def clear(self) -> None:
        """Forget everything this tier holds for its namespace."""
        ...

    def flush(self) -> None:
        """Return once everything `put` so far is durable (a no-op where puts are synchronous)."""
        ...

    def stats(self) -> TierStats:
        """A snapshot of the tier's counters (`TierStats.snapshot`): changing it changes nothing."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ReportsLookups(Protocol):
    """A tier that finds holders before it reads, and counts where it found them (the peer tier)."""

    def lookup_stats(self) -> dict[str, int]:
        """Counters and gauges of its lookups, named as `nencache.metrics.LOOKUP_STATS` lists them."""
        ...

