"""`ChunkStore`: the server's chunks, in a `MemoryTier` over a static `MemoryPool`, with an optional disk tier.

Pages are one `max_chunk_bytes` each. Keys in memory are the namespace (length-prefixed) followed by
the 16-byte chunk key, so namespaces never collide. Put bodies are received straight into pool
pages and get replies are sent straight from them (pinned while on the wire): no extra copies.
Where the platform has memfds the pool lives in a `SharedRegion`, which clients on the same machine
map read-only and copy chunks out of (`locate` tells them where).
With a disk path, each namespace has a `DiskTier` under it, written behind the replies by the shared
write-behind (`nencache.writer`) under a policy that never makes a PUT wait: when every page is
pinned by pending disk writes, `write_drop` at once gives up the oldest pending disk write (the chunk
stays in memory; the default) or refuses the new chunk with BUSY (`newest`). Memory misses are read
from disk and promoted. Blocking disk calls run off the event loop (callers' job).

Namespaces are case-sensitive, on disk too: a lower-case hex namespace (what `KVCache` sends: its
namespace digest) names its directory under `disk_path` itself; any other namespace lives under
`disk_path/by-digest/` in the directory named by its BLAKE2b digest, so `ABCDEF` and `abcdef`, or a
namespace and a digest, never share a directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from nencache.errors import ConfigError, CorruptChunkError, PoolExhaustedError
from nencache.format import HEADER_SIZE, NO_KEY, parse_header
from nencache.pool import MemoryPool
from nencache.net.shared import SharedRegion, Spot
from nencache.server.settings import ServerSettings
from nencache.net.warn import WarnOnce
from nencache.store import leading_run
from nencache.tiers.base import Tier, TierStats
from nencache.tiers.memory import ChunkLease, MemoryTier
from nencache.writer import Drop, TierWrite, WriteBehind, WritePolicy, write_each

log = logging.getLogger("nencache.server")

_HEX = re.compile(r"[0-9a-f]{1,128}")
DIGESTS = "by-digest"  # not hex: never the directory of a namespace named by itself


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
        self._warn = WarnOnce(log)
        self.writer: WriteBehind[TierWrite] | None = (
            WriteBehind(lambda batch: write_each(batch, self._disk_failed), WritePolicy(0.0, Drop(settings.disk_drop)),
                        name="nencache-server-disk") if self.disk_root else None)

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
            if not create and (directory is None or not (directory[0] / directory[1]).is_dir()):
                return None
            if len(self._namespaces) >= self.settings.max_namespaces and not self._reclaim():
                raise NamespaceLimitError(
                    f"this server already holds {len(self._namespaces)} namespaces (server_max_namespaces)")
            disk = None
            if directory is not None:
                from nencache.tiers.disk import DiskTier

                disk = DiskTier(str(directory[0]), directory[1], self.settings.disk_bytes,
                                io_threads=min(2, self.settings.io_threads))
            space = Namespace(name, bytes((len(name),)) + name, disk)
            self._namespaces[name] = space
            return space

    def _disk_dir(self, name: bytes) -> tuple[Path, str] | None:
        """(root, directory name) of a namespace's disk tier (see the module docstring); None without a disk."""
        if self.disk_root is None:
            return None
        text = name.decode("ascii")
        if _HEX.fullmatch(text):
            return self.disk_root, text
        return self.disk_root / DIGESTS, hashlib.blake2b(name, digest_size=16).hexdigest()

    def _reclaim(self) -> bool:
        """Forget namespaces with no disk tier whose chunks have all been evicted (caller holds the lock)."""
        idle = [n for n, s in self._namespaces.items() if s.disk is None and not any(k in self.memory for k in s.keys)]
        for name in idle:
            del self._namespaces[name]
        return bool(idle)

    # --- reads ---------------------------------------------------------------------------------
    def exists(self, space: Namespace, keys: Sequence[bytes], *, disk: bool = True) -> int:
        """Length of the run of leading keys held in memory or (with `disk`) on disk (blocking when the disk
        tier is asked)."""
        composite = [space.prefix + k for k in keys]
        sources = [lambda start: self.memory.contains_prefix(composite[start:])]
        if space.disk is not None and disk:
            sources.append(lambda start, tier=space.disk: tier.contains_prefix(keys[start:]))
        return leading_run(len(keys), sources)

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
        """A free page (evicting if needed) and a view of its first `nbytes`; `PoolExhaustedError` if all pinned.

        A pool pinned by pending disk writes gets a page back from the disk writer's policy, at once.
        """
        while True:
            progress = self.writer.progress if self.writer is not None else 0
            try:
                page = self.memory.reserve_page(nbytes)
                break
            except PoolExhaustedError:
                if self.writer is None or not self.writer.make_room(time.monotonic(), progress):
                    raise
        start = page * self.pool.page_bytes
        return page, self._bytes[start : start + nbytes]

    def abandon(self, page: int) -> None:
        self.pool.release(page)

    def commit(self, space: Namespace, key: bytes, page: int, nbytes: int) -> bool:
        """Index a received page under `key` (the page is given up either way). False if not a valid chunk.

        With a disk tier the chunk is queued for it, pinned from the moment it is indexed; this never waits.
        """
        to_disk = space.disk is not None and self.writer is not None
        start = page * self.pool.page_bytes
        try:
            header = parse_header(self._bytes[start : start + HEADER_SIZE])
        except CorruptChunkError:
            header = None
        if header is None or header.payload_len + HEADER_SIZE != nbytes or header.key not in (NO_KEY, key):
            self.pool.release(page)
            return False
        composite = space.prefix + key
        lease = self.memory.commit_page(composite, page, nbytes, header.num_tokens, pin=to_disk)
        with self._lock:
            space.keys.add(composite)
            if len(space.keys) > 2 * self.pool.num_pages + 1024:
                space.keys = {k for k in space.keys if k in self.memory}
        if lease is not None and space.disk is not None and self.writer is not None:
            self.writer.submit(TierWrite(space.disk, key, lease, self.view(lease)))
        return True

    def delete(self, space: Namespace, keys: Sequence[bytes]) -> None:
        """Forget `keys` in memory and on disk. Blocking when there is a disk tier."""
        composite = [space.prefix + k for k in keys]
        self.memory.delete(composite)
        with self._lock:
            space.keys.difference_update(composite)
        if space.disk is not None:
            if self.writer is not None:
                self.writer.drain()  # a queued write must not bring a deleted chunk back
            space.disk.delete(keys)

    def clear(self, space: Namespace) -> None:
        """Forget everything of one namespace. Blocking when there is a disk tier."""
        with self._lock:
            keys, space.keys = list(space.keys), set()
        self.memory.delete(keys)
        if space.disk is not None:
            if self.writer is not None:
                self.writer.drain()
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

    def _disk_failed(self, tier: Tier, exc: BaseException) -> None:
        """A full or failing disk loses only its copy; memory still holds the chunk (counted by the writer)."""
        self._warn("disk", f"disk tier write failed ({exc!r}); the chunks stay in memory")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = {"memory": self.memory.stats().as_dict()}
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
                counts = self.writer.counts()
                data["disk_writer"] = {"pending": counts.pending, "queued": counts.submitted, "written": counts.written,
                                       "dropped": counts.dropped, "errors": counts.failed}
        return data
