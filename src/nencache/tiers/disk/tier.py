"""`DiskTier`: chunks as files on a local disk, bounded by bytes, least recently used evicted first.

Layout: `<path>/<namespace>/<key hex>.kv`, one file per chunk holding its blob in the shared byte
format. `put` returns once each chunk file is synced and renamed into place: it is whole for every
reader and survives `kill -9` of the writer. `flush` syncs the directory, after which every chunk put
before it also survives a power loss. No crash leaves a torn chunk under a chunk name, and every read
is checked against the blob's checksums anyway.

Several processes may share one directory: each writes under unique temporary names and renames
atomically, a chunk another process evicted is a miss, and a chunk another process wrote is found on
a miss. Each process bounds the chunks it knows of by `capacity_bytes`.

All methods are thread-safe. Reads and writes of several chunks run on `io_threads` threads.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from nencache.errors import ClosedError, ConfigError
from nencache.policy.base import EvictionPolicy
from nencache.policy.index import PolicyIndex
from nencache.tiers.base import Distance, TierStats
from nencache.tiers.disk.faults import FULL_ERRNOS, DiskFaults
from nencache.tiers.disk.index import CHECKPOINT, SUFFIX, LruIndex, chunk_name, save_checkpoint, scan
from nencache.tiers.disk.io import (
    BadChunkFile,
    ChunkWriter,
    ReadBuffers,
    disk_path,
    fsync_dir,
    prepare_directory,
    probe_direct_io,
    read_chunk,
)

Blob = bytes | bytearray | memoryview
T = TypeVar("T")
R = TypeVar("R")
_NAMESPACE = re.compile(r"[0-9a-f]{1,128}")  # case-sensitive: one namespace, one directory


class DiskTier:
    """A byte tier on a local directory. See the module docstring for layout, durability and sharing.

    `read_buffer_bytes` bounds the idle read buffers kept for reuse; `full_retry_seconds` is how long
    writes pause after ENOSPC; the index checkpoint is rewritten at most every `checkpoint_seconds`;
    `eviction` orders evictions (default least recently used first).
    """

    name = "disk"
    checks_payload = True  # `get` returns only blobs whose payload checksum it has verified
    publish_only = False
    distance = Distance.LOCAL

    def __init__(self, path: str | Path, namespace: str, capacity_bytes: int, *, io_threads: int = 4,
                 use_direct_io: bool | None = None, read_buffer_bytes: int = 64 << 20,
                 full_retry_seconds: float = 30.0, checkpoint_seconds: float = 30.0,
                 eviction: EvictionPolicy | None = None) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"disk tier namespace must be a lower-case hex string (the namespace digest), "
                              f"got {namespace!r}")
        if capacity_bytes <= 0:
            raise ConfigError(f"disk tier capacity_bytes must be positive, got {capacity_bytes}; set disk_size")
        if io_threads < 1:
            raise ConfigError(f"disk tier io_threads must be at least 1, got {io_threads}")
        root = disk_path(path)
        self.path = root / namespace
        prepare_directory(root, self.path)
        self.direct_io = probe_direct_io(self.path) if use_direct_io is not False else False
        if use_direct_io and not self.direct_io:
            raise ConfigError(f"the filesystem of {self.path} does not support O_DIRECT; leave use_direct_io unset")
        self.capacity_bytes = capacity_bytes
        self._writer = ChunkWriter(self.direct_io)
        self._buffers = ReadBuffers(read_buffer_bytes)
        self._faults = DiskFaults(self.path, full_retry_seconds)
        self._lock = threading.Lock()  # guards _index, _reserved, _writing, _changes
        self._sync_lock = threading.Lock()
        self._stats = TierStats(capacity_bytes=capacity_bytes)
        self._index = LruIndex(PolicyIndex(eviction))
        self._reserved = 0
        self._writing: dict[bytes, int] = {}  # keys with a write in flight (how many)
        self._dirty = False
        self._closed = False
        self._checkpoint_every = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._tmp_tag = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._seq = itertools.count()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="nencache-disk")
        started = time.perf_counter()
        entries, unlisted = scan(self.path, self._pool.map)
        for key, size in entries:
            self._index.add(key, size)
        self._changes = unlisted  # a checkpoint that missed files is rewritten at the next flush or close
        self._drop_victims(self._evict_locked(0))
        self.startup_seconds = time.perf_counter() - started

    # -- the Tier protocol -------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check_open()
        found = 0
        for key in keys:
            with self._lock:
                known = key in self._index
            if not known and not self._adopt(key):
                break
            found += 1
        return found

    def get(self, keys: Sequence[bytes]) -> list[Blob | None]:
        self._check_open()
        started = time.perf_counter()
        results = self._map(self._get_one, keys)
        with self._stats.lock:
            self._stats.read_seconds += time.perf_counter() - started
        return results

    def put(self, items: Sequence[tuple[bytes, Blob]]) -> None:
        self._check_open()
        started = time.perf_counter()
        jobs: list[tuple[bytes, Blob, int, list[bytes]]] = []
        seen: set[bytes] = set()
        dropped = 0
        paused = self._faults.writes_paused()
        with self._lock:
            for key, blob in items:
                size = memoryview(blob).nbytes
                if key in seen or self._index.touch(key):
                    continue
                seen.add(key)
                if paused or size > self.capacity_bytes:
                    dropped += 1
                    continue
                jobs.append((key, blob, size, self._evict_locked(size)))
                self._reserved += size
                self._writing[key] = self._writing.get(key, 0) + 1
        written = self._map(lambda job: self._put_one(*job), jobs)
        with self._lock:  # writes finish in any order; recency follows the order of `items`
            for (key, *_), ok in zip(jobs, written):
                if ok:
                    self._index.touch(key)
        with self._stats.lock:
            self._stats.dropped += dropped + written.count(False)
            self._stats.write_seconds += time.perf_counter() - started

    def delete(self, keys: Sequence[bytes]) -> None:
        self._check_open()
        with self._lock:  # unlinked under the lock: a get in flight cannot index the key again in between
            for key in keys:
                self._index.remove(key)
            self._changes += 1
            self._unlink(keys)
        self._faults.space_freed()

    def clear(self) -> None:
        self._check_open()
        with self._lock:  # unlinked under the lock: a get in flight cannot index a key again in between
            self._index.clear()
            self._changes += 1
            with os.scandir(self.path) as it:
                names = [e.name for e in it if e.name.endswith(SUFFIX) or e.name == CHECKPOINT]
            for name in names:
                (self.path / name).unlink(missing_ok=True)
        self._faults.space_freed()
        self._dirty = True
        self.flush()

    def flush(self) -> None:
        self._check_open()
        with self._sync_lock:
            if self._dirty:
                self._dirty = False
                try:
                    fsync_dir(self.path)
                except OSError as exc:
                    self._dirty = True
                    self._count_error("sync", exc)
            if self._changes and time.monotonic() - self._last_checkpoint >= self._checkpoint_every:
                self._checkpoint()

    def stats(self) -> TierStats:
        with self._lock:
            chunks, used = len(self._index), self._index.bytes_used
        with self._stats.lock:
            self._stats.chunks, self._stats.bytes_used = chunks, used
        return self._stats.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            with self._sync_lock:
                if self._changes:
                    self._checkpoint()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"disk tier {self.path} is closed; create a new DiskTier to use it again")

    def _map(self, fn: Callable[[T], R], args: Sequence[T]) -> list[R]:
        if len(args) <= 1:
            return [fn(a) for a in args]
        return list(self._pool.map(fn, args))

    def _file(self, key: bytes) -> Path:
        return self.path / chunk_name(key)

    def _evict_locked(self, incoming: int) -> list[bytes]:
        """Drop least recently used entries until `incoming` more bytes fit; returns the keys to unlink."""
        victims: list[bytes] = []
        while self._index.bytes_used + self._reserved + incoming > self.capacity_bytes and len(self._index):
            key, size = self._index.pop_oldest()
            victims.append(key)
            with self._stats.lock:
                self._stats.evicted_chunks += 1
                self._stats.evicted_bytes += size
        self._changes += len(victims)
        return victims

    def _unlink(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            try:
                self._file(key).unlink(missing_ok=True)
            except OSError as exc:
                self._count_error("delete", exc)
        if keys:
            self._dirty = True

    def _done_writing(self, key: bytes) -> None:
        left = self._writing.pop(key) - 1
        if left:
            self._writing[key] = left

    def _drop_victims(self, keys: Sequence[bytes]) -> None:
        """Unlink evicted chunks, unless a put has brought the key back (indexed or being written) since."""
        for key in keys:
            with self._lock:
                if key in self._index or key in self._writing:
                    continue
                self._unlink([key])

    def _put_one(self, key: bytes, blob: Blob, size: int, victims: list[bytes]) -> bool:
        self._drop_victims(victims)
        tmp = self.path / f".{key.hex()}.{self._tmp_tag}.{next(self._seq)}.tmp"
        try:
            self._writer.write(tmp, self._file(key), blob)
        except OSError as exc:
            with self._lock:
                self._reserved -= size
                self._done_writing(key)
            if exc.errno in FULL_ERRNOS:
                self._faults.disk_full()
            else:
                self._count_error("write", exc)
            return False
        with self._lock:
            self._reserved -= size
            self._done_writing(key)
            self._index.add(key, size)
            self._changes += 1
            self._dirty = True
            victims = self._evict_locked(0)  # concurrent puts may have reserved more than was free
        self._drop_victims(victims)
        self._faults.wrote()
        with self._stats.lock:
            self._stats.stored_chunks += 1
            self._stats.stored_bytes += size
        return True

    def _get_one(self, key: bytes) -> Blob | None:
        path = self._file(key)
        try:
            blob = read_chunk(path, key, self.direct_io, self._buffers)
        except FileNotFoundError:
            with self._lock:  # a put renames before it indexes: forget the key only if it is still absent
                if key in self._index and not path.exists():
                    self._index.remove(key)
            self._miss()
            return None
        except BadChunkFile as exc:
            self._drop_corrupt(key, path, exc)
            self._miss()
            return None
        except OSError as exc:
            self._count_error("read", exc)
            self._miss()
            return None
        size = len(blob)
        with self._lock:
            self._changes += 1
            victims = self._index_read_locked(key, path, size)
        self._drop_victims(victims)
        try:
            os.utime(path)  # recency survives a restart without a checkpoint
        except OSError:
            pass
        with self._stats.lock:
            self._stats.hits += 1
            self._stats.read_bytes += size
        return blob

    def _miss(self) -> None:
        with self._stats.lock:
            self._stats.misses += 1

    def _index_read_locked(self, key: bytes, path: Path, size: int) -> list[bytes]:
        """After reading `size` bytes of `key`'s file: mark it used, correct a wrong indexed size (from a
        bad checkpoint), or index a file another process wrote. The keys to unlink to stay within capacity.

        A key the index no longer has is indexed again only if its file is still there (checked under the
        lock, under which evictions and deletes unlink): the read may have raced an eviction.
        """
        known = self._index.entries.get(key)
        if known is None:
            try:
                size = os.stat(path).st_size
            except OSError:
                return []  # evicted or deleted since it was read: served, but not held any more
        elif known == size:
            self._index.touch(key)
            return []
        else:
            self._faults.warn("size", "disk tier %s: a chunk's indexed size (%d) was not its file's (%d); "
                              "corrected. Further corrections are logged at debug level.", self.path, known, size)
        self._index.add(key, size)
        return self._evict_locked(0)

    def _adopt(self, key: bytes) -> bool:
        """Index a chunk file this instance did not write (another process's); False if there is none."""
        with self._lock:  # stat under the lock, under which evictions and deletes unlink
            try:
                size = self._file(key).stat().st_size
            except OSError:
                return False
            if key not in self._index:
                self._index.add(key, size)
            victims = self._evict_locked(0)
        self._drop_victims(victims)
        return key not in victims

    def _drop_corrupt(self, key: bytes, path: Path, exc: BadChunkFile) -> None:
        with self._lock:
            self._index.remove(key)
            try:
                if path.stat().st_ino == exc.inode:  # not a good copy renamed in since
                    path.unlink()
            except OSError:
                pass
        with self._stats.lock:
            self._stats.corrupt += 1
        self._faults.warn("corrupt", "disk tier %s: removed a damaged chunk (%s); it will be recomputed. "
                          "Further damaged chunks are logged at debug level.", self.path, exc)

    def _count_error(self, what: str, exc: OSError) -> None:
        with self._stats.lock:
            self._stats.errors += 1
        self._faults.io_error(what, exc)

    def _checkpoint(self) -> None:
        with self._lock:
            entries = list(self._index.entries.items())
            self._changes = 0
        self._last_checkpoint = time.monotonic()
        try:
            save_checkpoint(self.path, entries, f".index.{self._tmp_tag}.{next(self._seq)}.tmp")
        except OSError as exc:
            self._count_error("checkpoint", exc)
