"""`ChunkStore`: the server's chunks, in a `MemoryTier` over a static `MemoryPool`, with an optional disk tier.

Pages are one `max_chunk_bytes` each. Keys in memory are the namespace (length-prefixed) followed by
the 16-byte chunk key, so namespaces never collide. Put bodies are received straight into pool
pages and get replies are sent straight from them (pinned while on the wire): no extra copies.
Where the platform has memfds the pool lives in a `SharedRegion`, which clients on the same machine
map read-only and copy chunks out of (`locate` tells them where).
With a disk path, each namespace has a `DiskTier` under it, written behind the replies; memory
misses are read from disk and promoted. Blocking disk calls run off the event loop (callers' job).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from nencache.errors import ConfigError, CorruptChunkError, PoolExhaustedError
from nencache.format import HEADER_SIZE, NO_KEY, parse_header
from nencache.pool import MemoryPool
from nencache.server.disk_writer import DiskWriter
from nencache.server.shared import SharedRegion, Spot
from nencache.server.settings import ServerSettings
from nencache.tiers.base import Tier, TierStats
from nencache.tiers.memory import ChunkLease, MemoryTier

_HEX = re.compile(r"[0-9a-fA-F]{1,128}")


class NamespaceLimitError(Exception):
    """The server holds `max_namespaces` namespaces that all still have chunks."""


@dataclass(slots=True)
class Namespace:
    name: bytes
    prefix: bytes
    disk: Tier | None = None
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
        self.disk_root = Path(settings.disk_path).expanduser() if settings.disk_path else None
        if self.disk_root is not None:
            try:
                self.disk_root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"disk_path {self.disk_root}: cannot create it ({exc.strerror or exc}); choose "
                                  "a writable directory") from None
            if not os.access(self.disk_root, os.W_OK | os.X_OK):
                raise ConfigError(f"disk_path {self.disk_root} is not writable by this user; choose another")
        threading.Thread(target=self.pool.prefault, name="nencache-prefault", daemon=True).start()
        self.writer = (DiskWriter(min(settings.disk_queue_chunks, max(1, self.pool.num_pages // 2)))
                       if self.disk_root else None)

    # --- namespaces --------------------------------------------------------------------------
    def known(self, name: bytes) -> Namespace | None:
        """The namespace if it is open (no disk access)."""
        return self._namespaces.get(name)

    def needs_open(self, name: bytes) -> bool:
        """True when `open` may touch the disk (the namespace is not open and a disk tier is configured)."""
        return name not in self._namespaces and self.disk_root is not None

    def open(self, name: bytes, *, create: bool) -> Namespace | None:
        """The namespace `name`; without `create`, None unless it is open or has a directory on disk. Blocking."""
        with self._lock:
            found = self._namespaces.get(name)
            if found is not None:
                return found
            directory = self._disk_dir(name)
            if not create and (directory is None or not (self.disk_root / directory).is_dir()):  # type: ignore[operator]
                return None
            if len(self._namespaces) >= self.settings.max_namespaces and not self._reclaim():
                raise NamespaceLimitError(
                    f"this server already holds {len(self._namespaces)} namespaces (server_max_namespaces)")
            disk = None
            if directory is not None:
                from nencache.tiers.disk import DiskTier

                disk = DiskTier(str(self.disk_root), directory, self.settings.disk_bytes,
                                io_threads=min(2, self.settings.io_threads))
            space = Namespace(name, bytes((len(name),)) + name, disk)
            self._namespaces[name] = space
            return space

    def _disk_dir(self, name: bytes) -> str | None:
        if self.disk_root is None:
            return None
        text = name.decode("ascii")
        return text.lower() if _HEX.fullmatch(text) else hashlib.blake2b(name, digest_size=16).hexdigest()

    def _reclaim(self) -> bool:
        """Forget namespaces with no disk tier whose chunks have all been evicted (caller holds the lock)."""
        idle = [n for n, s in self._namespaces.items() if s.disk is None and not any(k in self.memory for k in s.keys)]
        for name in idle:
            del self._namespaces[name]
        return bool(idle)

    # --- reads ---------------------------------------------------------------------------------
    def exists(self, space: Namespace, keys: Sequence[bytes]) -> int:
        """Length of the run of leading keys held in memory or on disk (blocking when there is a disk tier)."""
        composite = [space.prefix + k for k in keys]
        found = 0
        while found < len(keys):
            found += self.memory.contains_prefix(composite[found:])
            if found == len(keys) or space.disk is None:
                break
            more = space.disk.contains_prefix(keys[found:])
            if not more:
                break
            found += more
        return found

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

    def read_disk(self, space: Namespace, keys: Sequence[bytes]) -> list[Any]:
        """Blobs of `keys` from the disk tier (None where absent), promoted into memory. Blocking."""
        if space.disk is None or not keys:
            return [None] * len(keys)
        blobs = space.disk.get(keys)
        for key, blob in zip(keys, blobs):
            if blob is None:
                continue
            try:
                self.memory.put([(space.prefix + key, blob)])
            except (PoolExhaustedError, CorruptChunkError, ValueError):
                continue  # served anyway, just not promoted
            with self._lock:
                space.keys.add(space.prefix + key)
        return blobs

    # --- writes --------------------------------------------------------------------------------
    def take_page(self, nbytes: int) -> tuple[int, memoryview]:
        """A free page (evicting if needed) and a view of its first `nbytes`; `PoolExhaustedError` if all pinned."""
        page = self.memory.reserve_page(nbytes)
        start = page * self.pool.page_bytes
        return page, self._bytes[start : start + nbytes]

    def abandon(self, page: int) -> None:
        self.pool.release(page)

    def commit(self, space: Namespace, key: bytes, page: int, nbytes: int) -> bool:
        """Index a received page under `key` (the page is given up either way). False if not a valid chunk.

        With a disk tier the caller has taken a writer slot (`writer.reserve`); it is used or given back.
        """
        start = page * self.pool.page_bytes
        try:
            header = parse_header(self._bytes[start : start + HEADER_SIZE])
        except CorruptChunkError:
            header = None
        if header is None or header.payload_len + HEADER_SIZE != nbytes or header.key not in (NO_KEY, key):
            self.pool.release(page)
            if space.disk is not None and self.writer is not None:
                self.writer.unreserve()
            return False
        composite = space.prefix + key
        self.memory.commit_page(composite, page, nbytes, header.num_tokens)
        with self._lock:
            space.keys.add(composite)
            if len(space.keys) > 2 * self.pool.num_pages + 1024:
                space.keys = {k for k in space.keys if k in self.memory}
        if space.disk is not None and self.writer is not None:
            lease = self.memory.lease(composite, count=False)
            if lease is not None:
                self.writer.submit(space.disk, key, lease, self.view(lease))
                return True
            self.writer.unreserve()
        return True

    def delete(self, space: Namespace, keys: Sequence[bytes]) -> None:
        """Forget `keys` in memory and on disk. Blocking when there is a disk tier."""
        composite = [space.prefix + k for k in keys]
        self.memory.delete(composite)
        with self._lock:
            space.keys.difference_update(composite)
        if space.disk is not None:
            if self.writer is not None:
                self.writer.flush()  # a queued write must not bring a deleted chunk back
            space.disk.delete(keys)

    def clear(self, space: Namespace) -> None:
        """Forget everything of one namespace. Blocking when there is a disk tier."""
        with self._lock:
            keys, space.keys = list(space.keys), set()
        self.memory.delete(keys)
        if space.disk is not None:
            if self.writer is not None:
                self.writer.flush()
            space.disk.clear()

    # --- lifecycle and stats -------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything queued to disk and make it durable. Blocking."""
        if self.writer is not None:
            self.writer.flush()
        for space in list(self._namespaces.values()):
            if space.disk is not None:
                space.disk.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for space in list(self._namespaces.values()):
            if space.disk is not None:
                space.disk.close()
        self.memory.close()
        if self.region is not None:
            self.region.close()

    def stats(self) -> dict[str, Any]:
        memory = self.memory.stats()
        with memory.lock:
            data: dict[str, Any] = {"memory": memory.as_dict()}
        data["pool"] = {"capacity_bytes": self.pool.capacity_bytes, "page_bytes": self.pool.page_bytes,
                        "pages": self.pool.num_pages, "free_pages": self.pool.free_pages}
        data["namespaces"] = len(self._namespaces)
        disks = [s.disk.stats() for s in list(self._namespaces.values()) if s.disk is not None]
        if self.disk_root is not None:
            total = TierStats()
            for one in disks:
                for name, value in one.as_dict().items():
                    setattr(total, name, getattr(total, name) + value)
            data["disk"] = total.as_dict() | {"path": str(self.disk_root), "namespaces": len(disks)}
            if self.writer is not None:
                data["disk_writer"] = {"pending": self.writer.pending, "queued": self.writer.stats.queued,
                                       "written": self.writer.stats.written, "errors": self.writer.stats.errors}
        return data
