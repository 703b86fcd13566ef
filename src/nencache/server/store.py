"""`ChunkStore`: the server's chunks, a thin layer over the one core store (`nencache.store.Store`).

The server keeps blobs it never decodes, of many namespaces, in one store: a chunk's key there is
its namespace's prefix (a length byte and the name) followed by its 16-byte key, so namespaces never
collide and share one pool. With a disk path the store's one lower tier is `NamespaceDisks`, which
sends each key to its namespace's `DiskTier`. The store does the rest: leading runs over memory and
disk, disk reads checked and promoted as bytes (`fetch_blobs`), the write-behind, and the guard (a
failing disk is counted and warned once, and is a miss).

What this layer adds is the server's own:
- namespaces: opened on first use, at most `max_namespaces` (those without a disk whose chunks were
  all evicted are forgotten to make room), each with the memory keys put under it;
- PUT bodies received straight into pool pages (`take_page`) and checked and indexed by `commit`;
  replies sent straight from pinned pages (`lease`, `view`): no extra copies;
- a GET's memory hits and misses counted once around a disk read (`present`, `lease_after_read`);
- where the platform has memfds, the pool in a `SharedRegion`, which clients on the same machine map
  read-only and copy chunks out of (`locate` tells them where).

The write-behind's policy never makes a PUT wait: when every page is pinned by pending disk writes,
`write_drop` at once gives up the oldest pending disk write (the chunk stays in memory; the default)
or refuses the new chunk with BUSY (`newest`). Blocking disk calls run off the event loop (callers' job).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nencache.net.shared import SharedRegion, Spot
from nencache.net.warn import WarnOnce
from nencache.pool import MemoryPool
from nencache.server.disks import NamespaceDisks
from nencache.server.settings import ServerSettings
from nencache.store import Blob, Store
from nencache.tiers.base import Tier
from nencache.tiers.memory import ChunkLease, MemoryTier
from nencache.writer import Drop, LowerTier, WritePolicy

log = logging.getLogger("nencache.server")


class NamespaceLimitError(Exception):
    """The server holds `max_namespaces` namespaces that all still have chunks."""


@dataclass(slots=True)
class Namespace:
    name: bytes
    prefix: bytes
    disk: Tier | None = None  # its disk tier (read and written only through the store)
    keys: set[bytes] = field(default_factory=set)  # memory keys put here (some may be evicted since)


class ChunkStore:
    """Chunk blobs of many namespaces. Thread-safe; see the module docstring."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        pages = settings.pool_bytes // settings.max_chunk_bytes
        self.region = SharedRegion.create(pages, settings.max_chunk_bytes) if settings.shared_memory else None
        self.pool = MemoryPool(settings.pool_bytes, settings.max_chunk_bytes, pin_memory=False,
                               buffer=self.region.buffer if self.region else None,
                               generations=self.region.generations if self.region else None)
        self.memory = MemoryTier(self.pool)
        self._bytes = memoryview(self.pool.buffer.numpy())
        self._lock = threading.Lock()
        self._namespaces: dict[bytes, Namespace] = {}
        self.disks = (NamespaceDisks(settings.disk_path, settings.disk_bytes, io_threads=min(2, settings.io_threads))
                      if settings.disk_path else None)
        self.disk_root = self.disks.root if self.disks is not None else None
        self.core = Store(self.memory, [LowerTier(self.disks, None)] if self.disks is not None else [],
                          policy=WritePolicy(0.0, Drop(settings.disk_drop)), warn=WarnOnce(log))

    # --- namespaces --------------------------------------------------------------------------
    def known(self, name: bytes) -> Namespace | None:
        """The namespace if it is open (no disk access)."""
        return self._namespaces.get(name)

    def needs_open(self, name: bytes) -> bool:
        """True when `open` may touch the disk (the namespace is not open and a disk tier is configured)."""
        return name not in self._namespaces and self.disks is not None

    def open(self, name: bytes, *, create: bool) -> Namespace | None:
        """The namespace `name`; without `create`, None unless it is open or has a directory on disk. Blocking."""
        with self._lock:
            found = self._namespaces.get(name)
            if found is not None:
                return found
            if not create and (self.disks is None or not self.disks.has(name)):
                return None
            if len(self._namespaces) >= self.settings.max_namespaces and not self._reclaim():
                raise NamespaceLimitError(
                    f"this server already holds {len(self._namespaces)} namespaces (server_max_namespaces)")
            prefix = bytes((len(name),)) + name
            space = Namespace(name, prefix, self.disks.open(name, prefix) if self.disks is not None else None)
            self._namespaces[name] = space
            return space

    def _reclaim(self) -> bool:
        """Forget namespaces with no disk tier whose chunks have all been evicted (caller holds the lock)."""
        idle = [n for n, s in self._namespaces.items() if s.disk is None and not any(k in self.memory for k in s.keys)]
        for name in idle:
            del self._namespaces[name]
        return bool(idle)

    def _remember(self, space: Namespace, keys: Sequence[bytes]) -> None:
        """Note memory keys now held under `space` (pruned of evicted ones once they outgrow the pool)."""
        with self._lock:
            space.keys.update(keys)
            if len(space.keys) > 2 * self.pool.num_pages + 1024:
                space.keys = {k for k in space.keys if k in self.memory}

    # --- reads ---------------------------------------------------------------------------------
    def exists(self, space: Namespace, keys: Sequence[bytes], *, disk: bool = True) -> int:
        """Length of the run of leading keys held in memory or (with `disk`) on disk (blocking when the disk
        tier is asked)."""
        composite = [space.prefix + k for k in keys]
        if space.disk is None or not disk:
            return self.memory.contains_prefix(composite)
        return self.core.contains_prefix(composite)

    def present(self, space: Namespace, keys: Sequence[bytes]) -> list[bool]:
        """Which of `keys` memory holds now, nothing pinned; a memory miss is counted for each one it does not
        (before a disk read: then `lease_after_read` pins what that read promoted without counting again)."""
        held = [space.prefix + k in self.memory for k in keys]
        if missed := held.count(False):
            self.memory.count_misses(missed)
        return held

    def lease_after_read(self, space: Namespace, keys: Sequence[bytes], held: Sequence[bool]) -> list[ChunkLease | None]:
        """`lease` after `present` and a disk read: keys memory held are counted as hits (or misses if evicted
        since), the others (counted by `present`) are pinned uncounted where the read promoted them."""
        return [self.memory.lease(space.prefix + key, count=was) for key, was in zip(keys, held)]

    def lease(self, space: Namespace, keys: Sequence[bytes]) -> list[ChunkLease | None]:
        """Pinned memory hits (release each), None for misses."""
        return [self.memory.lease(space.prefix + k) for k in keys]

    def locate(self, space: Namespace, keys: Sequence[bytes]) -> list[Spot | None]:
        """Where memory hits sit in the shared region (None for the rest); nothing stays pinned."""
        assert self.region is not None, "locate needs the shared region"
        spots: list[Spot | None] = []
        for key in keys:
            lease = self.memory.lease(space.prefix + key)
            if lease is None:
                spots.append(None)
                continue
            page = lease.entry.page
            spots.append(Spot(self.region.pool_offset + page * self.pool.page_bytes, lease.entry.nbytes,
                              int(self.region.generations[page])))
            lease.release()
        return spots

    def view(self, lease: ChunkLease) -> memoryview:
        return lease.blob()

    def read_disk(self, space: Namespace, keys: Sequence[bytes]) -> list[Blob | None]:
        """Blobs of `keys` from the disk tier (None where absent or failing), promoted into memory. Blocking."""
        if space.disk is None or not keys:
            return [None] * len(keys)
        composite = [space.prefix + k for k in keys]
        blobs = self.core.fetch_blobs(composite)
        self._remember(space, [k for k, blob in zip(composite, blobs) if blob is not None])
        return blobs

    # --- writes --------------------------------------------------------------------------------
    def take_page(self, nbytes: int) -> tuple[int, memoryview]:
        """A free page (evicting if needed) and a view of its first `nbytes`; `PoolExhaustedError` if all pinned.

        A pool pinned by pending disk writes gets a page back from the write-behind's policy, at once.
        """
        page = self.core.reserve_page(nbytes, self.core.deadline())
        start = page * self.pool.page_bytes
        return page, self._bytes[start : start + nbytes]

    def abandon(self, page: int) -> None:
        self.pool.release(page)

    def commit(self, space: Namespace, key: bytes, page: int, nbytes: int) -> bool:
        """Index a received page under `key` (the page is given up either way). False if not a valid chunk.

        With a disk tier the chunk is queued for it, pinned from the moment it is indexed; this never waits.
        """
        composite = space.prefix + key
        if not self.core.commit_page(composite, page, nbytes, self.core.deadline()):
            return False
        self._remember(space, [composite])
        return True

    def delete(self, space: Namespace, keys: Sequence[bytes]) -> None:
        """Forget `keys` in memory and on disk. Blocking when there is a disk tier."""
        composite = [space.prefix + k for k in keys]
        with self._lock:
            space.keys.difference_update(composite)
        self.core.delete(composite)

    def clear(self, space: Namespace) -> None:
        """Forget everything of one namespace. Blocking when there is a disk tier."""
        with self._lock:
            keys, space.keys = list(space.keys), set()
        disks = self.disks
        self.core.delete(keys, below=None if disks is None else lambda _: disks.clear_namespace(space.prefix))

    # --- lifecycle and stats -------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything queued to disk and make it durable. Blocking."""
        self.core.flush()

    def close(self) -> None:
        self.core.close()
        if self.region is not None:
            self.region.close()

    def stats(self) -> dict[str, Any]:
        tiers = self.core.tier_stats()
        data: dict[str, Any] = {"memory": tiers["memory"]}
        data["pool"] = {"capacity_bytes": self.pool.capacity_bytes, "page_bytes": self.pool.page_bytes,
                        "pages": self.pool.num_pages, "free_pages": self.pool.free_pages}
        data["namespaces"] = len(self._namespaces)
        if self.disks is not None:
            data["disk"] = tiers[self.disks.name] | {"path": str(self.disks.root), "namespaces": len(self.disks)}
        if self.core.writer is not None:
            counts = self.core.writer.counts()
            data["disk_writer"] = {"pending": counts.pending, "queued": counts.submitted, "written": counts.written,
                                   "dropped": counts.dropped, "errors": counts.failed}
        return data
