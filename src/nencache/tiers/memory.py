"""`MemoryTier`: chunks in the static memory pool, a pluggable eviction policy (LRU by default), pinned readers.

Each stored chunk owns one pool page. A chunk is either a raw tensor (its bytes exactly as the
layout says, the fast path) or a blob in the shared byte format (when the CPU codec compresses, or
when a byte tier stores through the blob API). Readers pin the page, so a chunk being read or
written behind is never evicted under them.

A raw chunk's bytes start `HEADER_SIZE` bytes into its page: the writer stamps the chunk's header
in front of them and hands the page itself to the lower tiers, so chunks leave memory in the shared
byte format without being copied first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nencache.codecs import Codec, RawCodec
from nencache.codecs.base import EncodesInPlace
from nencache.codecs.raw import header_for
from nencache.copy import SmallCopier, as_numpy, copy_into
from nencache.errors import LayoutError, PoolExhaustedError, TierError
from nencache.format import HEADER_SIZE
from nencache.layout import KVLayout
from nencache.policy.base import EvictionPolicy
from nencache.policy.index import PolicyIndex
from nencache.pool import MemoryPool
from nencache.tiers.base import Distance, TierStats

Fill = Callable[[torch.Tensor], object] | torch.Tensor
"""A chunk for the pool: a callable that writes it into the `[layers, 2, tokens, heads, dim]` tensor it is
given, or the chunk itself (any strides, any device)."""


SMALL_READ = 1 << 16
"""Bytes: a raw chunk this small is copied out under the index lock (a few microseconds at most) instead
of being pinned and copied outside it: the pin and its release cost more than such a copy."""


def raw_page_bytes(layout: KVLayout, num_tokens: int) -> int:
    """The page size that holds a raw chunk of `num_tokens` tokens (its header slot included)."""
    return HEADER_SIZE + layout.nbytes(num_tokens)


@dataclass(slots=True)
class Entry:
    """Where one chunk lives in the pool."""

    page: int
    nbytes: int
    num_tokens: int
    is_blob: bool
    stamped: memoryview | None = None  # a raw chunk as a blob (its header stamped in the page's header slot)
    view: torch.Tensor | None = None  # a raw chunk's tensor over its page, made once at store time for reads
    small_bytes: memoryview | None = None  # a small raw chunk's bytes, read under the index lock (`SMALL_READ`)
    shape: torch.Size | None = None  # a small raw chunk's tensor shape


class ChunkLease:
    """A pinned chunk: its page cannot be evicted until `release()`."""

    __slots__ = ("_tier", "entry", "key", "_released")

    def __init__(self, tier: "MemoryTier", key: bytes, entry: Entry) -> None:
        self._tier, self.key, self.entry, self._released = tier, key, entry, False

    def tensor(self) -> torch.Tensor:
        """The chunk as a `[layers, 2, tokens, kv_heads, head_dim]` tensor (a view for raw chunks)."""
        return self._tier._as_tensor(self.entry, self.key)

    def blob(self) -> memoryview:
        """The chunk in the shared byte format, as a view of its page (valid while the lease is held)."""
        return self._tier._blob(self.entry, self.key)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._tier.pool.release(self.entry.page)


class MemoryTier:
    """The CPU tier: a key -> page index over a `MemoryPool`; `policy` orders evictions (default LRU)."""

    name = "memory"
    checks_payload = False
    publish_only = False
    distance = Distance.LOCAL  # as a byte tier below another store (tests, the server's pool)

    def __init__(self, pool: MemoryPool, layout: KVLayout | None = None, codec: Codec | None = None,
                 policy: EvictionPolicy | None = None) -> None:
        self.pool = pool
        self.layout = layout
        self.codec: Codec = codec or RawCodec()
        self._raw = self.codec.zero_copy
        # Encodes into the page and decodes into the reader's tensor: no chunk-sized temporaries kept around.
        self._in_place: EncodesInPlace | None = (
            self.codec if not self._raw and isinstance(self.codec, EncodesInPlace) else None)
        self._index: PolicyIndex[Entry] = PolicyIndex(policy)
        self._lock = threading.Lock()
        # One lock for the index and the counters: a small read takes it once.
        self._stats = TierStats(capacity_bytes=pool.capacity_bytes, lock=self._lock)
        self._small = SmallCopier()
        self._dtype = layout.dtype if layout is not None else None
        self.on_evict: Callable[[bytes], None] | None = None  # told each evicted key (must be quick, never raise)

    # --- the tensor path used by KVCache -------------------------------------------------------
    def put_tensor(self, key: bytes, chunk: torch.Tensor) -> bool:
        """Copy a chunk (any strides, any device) into a page. False if the key was already held."""
        return self.put_filled(key, chunk.shape[2], chunk)

    def put_filled(self, key: bytes, num_tokens: int, fill: Fill) -> bool:
        """Store a chunk that `fill` writes into the `[layers, 2, tokens, heads, dim]` tensor it is given,
        or the chunk `fill` is (any strides, any device).

        With the raw codec that tensor is the pool page itself (one copy, no allocation). A codec reads a
        chunk given as a CPU tensor of the layout's dtype where it is; otherwise it is first copied into
        a chunk-sized staging tensor. False if the key was already held (then `fill` is not called).
        """
        lease = self.store_filled(key, num_tokens, fill)
        if lease is None:
            return False
        lease.release()
        return True

    def store_filled(self, key: bytes, num_tokens: int, fill: Fill) -> ChunkLease | None:
        """`put_filled`, returning the new chunk already pinned (release it), or None if the key was held.

        The pin is taken before the chunk becomes visible, so no other thread can evict it first: a
        writer that queues the chunk for the tiers below always gets it.
        """
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return None
        assert self.layout is not None, "put_filled needs a layout"
        started = time.perf_counter()
        shape = self.layout.shape(num_tokens)
        if isinstance(fill, torch.Tensor):
            source = fill
            fill = lambda target: copy_into(target, source)  # noqa: E731
        else:
            source = None
        if self._raw:
            nbytes = self.layout.nbytes(num_tokens)
            page = self._take_page(HEADER_SIZE + nbytes)
            try:
                fill(self.pool.page(page)[HEADER_SIZE : HEADER_SIZE + nbytes].view(self.layout.dtype).view(shape))
            except BaseException:
                self.pool.release(page)
                raise
        elif self._in_place is not None:
            chunk = self._staged(shape, source, fill)
            taken: list[int] = []

            def reserve(size: int) -> torch.Tensor:
                taken.append(self._take_page(size))
                return self.pool.page(taken[-1])

            try:
                nbytes = self._in_place.encode_into(chunk, reserve, key)
            except BaseException:
                for page in taken:
                    self.pool.release(page)
                raise
            del chunk
            page = taken[0]
        else:
            blob = self.codec.encode(self._staged(shape, source, fill), key)
            nbytes = len(blob)
            page = self._take_page(nbytes)
            as_numpy(self.pool.page(page))[:nbytes] = np.frombuffer(blob, dtype=np.uint8)
        entry = Entry(page, nbytes, num_tokens, is_blob=not self._raw)
        if self._raw:
            entry.view = self._as_tensor(entry, key)
            if nbytes <= SMALL_READ:
                entry.small_bytes, entry.shape = memoryview(as_numpy(self.payload(entry))), entry.view.shape
        return ChunkLease(self, key, entry) if self._insert(key, entry, started, pin=True) else None

    def read_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Copy a held chunk into `out` (a `[layers, 2, tokens, heads, dim]` view); False on a miss.

        The hot path of a retrieve. A small raw chunk is copied under the index lock, which also guards
        the counters; any other chunk is pinned under it and copied outside it."""
        with self._lock:
            entry = self._index.use(key)
            if entry is None:
                self._stats.misses += 1
                return False
            started = time.perf_counter()
            if entry.small_bytes is not None and self._small.copy(out, self._dtype, entry.shape, entry.small_bytes):
                self._stats.hits += 1
                self._stats.read_bytes += entry.nbytes
                self._stats.read_seconds += time.perf_counter() - started
                return True
            self.pool.acquire(entry.page)
        try:
            self._copy_out(entry, key, out)
        finally:
            self.pool.release(entry.page)
        with self._stats.lock:
            self._stats.hits += 1
            self._stats.read_bytes += entry.nbytes
            self._stats.read_seconds += time.perf_counter() - started
        return True

    def read_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> int:
        """Copy the leading run of held `keys` into `outs` (the first miss ends it); how many were copied.

        One lock round for the index and the pins, the copies outside any lock, one for the counters."""
        entries: list[Entry] = []
        with self._lock:
            get, touch, acquire = self._index.get, self._index.move_to_end, self.pool.acquire
            for key in keys:
                entry = get(key)
                if entry is None:
                    break
                touch(key)
                acquire(entry.page)
                entries.append(entry)
        started = time.perf_counter()
        read = 0
        try:
            for key, entry, out in zip(keys, entries, outs):
                self._copy_out(entry, key, out)
                read += entry.nbytes
        finally:
            for entry in entries:
                self.pool.release(entry.page)
        with self._stats.lock:
            self._stats.hits += len(entries)
            self._stats.misses += len(entries) < len(keys)
            self._stats.read_bytes += read
            self._stats.read_seconds += time.perf_counter() - started
        return len(entries)

    def count_misses(self, count: int) -> None:
        """Count reads this tier could not serve that a caller decided on by itself (`key in tier`)."""
        self._stats.add(misses=count)

    def lease(self, key: bytes, *, count: bool = True) -> ChunkLease | None:
        """Pin a held chunk or return None; `count` says whether this is a read (hit/miss counted)."""
        with self._lock:
            entry = self._index.get(key)
            if entry is not None:
                self._index.move_to_end(key)
                self.pool.acquire(entry.page)
        if not count:
            return None if entry is None else ChunkLease(self, key, entry)
        with self._stats.lock:
            if entry is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        return None if entry is None else ChunkLease(self, key, entry)

    def num_tokens(self, key: bytes) -> int | None:
        with self._lock:
            entry = self._index.get(key)
            return None if entry is None else entry.num_tokens

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    # --- the byte-tier protocol ------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key not in self._index:
                    return count
            return len(keys)

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        blobs: list[bytes | None] = []
        for key in keys:
            lease = self.lease(key)
            if lease is None:
                blobs.append(None)
                continue
            try:
                blobs.append(bytes(lease.blob()))
            finally:
                lease.release()
        return blobs

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        for key, blob in items:
            if len(blob) > self.pool.page_bytes:
                raise TierError(f"chunk of {len(blob)} bytes is larger than a pool page ({self.pool.page_bytes})")
            if len(blob) < HEADER_SIZE:
                raise LayoutError(f"a blob must hold at least the {HEADER_SIZE}-byte chunk header")
            with self._lock:
                if key in self._index:
                    self._index.move_to_end(key)
                    continue
            started = time.perf_counter()
            page = self._take_page(len(blob))
            as_numpy(self.pool.page(page))[: len(blob)] = np.frombuffer(blob, dtype=np.uint8)
            tokens = int.from_bytes(bytes(blob[16:20]), "little")
            self._insert(key, Entry(page, len(blob), tokens, is_blob=True), started)

    def delete(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            with self._lock:
                entry = self._index.pop(key, None)
            if entry is not None:
                self._drop(entry)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._index.values())
            self._index.clear()
        for entry in entries:
            self._drop(entry)

    def flush(self) -> None:
        """Memory writes are synchronous."""

    def stats(self) -> TierStats:
        with self._stats.lock:
            self._stats.chunks = len(self._index)
        return self._stats.snapshot()

    def close(self) -> None:
        self.clear()

    def reserve_page(self, nbytes: int) -> int:
        """A free page for `nbytes` (evicting LRU chunks if needed), owned by the caller until
        `commit_page` indexes it or `pool.release(page)` gives it back. For writers that fill pages in place."""
        return self._take_page(nbytes)

    def commit_page(self, key: bytes, page: int, nbytes: int, num_tokens: int, *, is_blob: bool = True,
                    pin: bool = False) -> ChunkLease | None:
        """Index a page filled after `reserve_page` under `key` (a duplicate key gives the page back).

        With `pin`, the new chunk comes back pinned before any other thread can evict it (release it);
        None when the key was already held, or without `pin`.
        """
        entry = Entry(page, nbytes, num_tokens, is_blob)
        stored = self._insert(key, entry, time.perf_counter(), pin=pin)
        return ChunkLease(self, key, entry) if stored and pin else None

    # --- internals -------------------------------------------------------------------------------
    def payload(self, entry: Entry) -> torch.Tensor:
        """The stored bytes of an entry (a blob's whole bytes; a raw chunk's tensor bytes, after its header slot)."""
        start = 0 if entry.is_blob else HEADER_SIZE
        return self.pool.page(entry.page)[start : start + entry.nbytes]

    def _staged(self, shape: torch.Size, source: torch.Tensor | None, fill: Callable[[torch.Tensor], object]
                ) -> torch.Tensor:
        """The chunk to encode: `source` itself when a codec can read it where it is (a CPU tensor of the
        layout's dtype and shape), else a new tensor `fill` writes."""
        assert self.layout is not None
        if source is not None and source.device.type == "cpu" and source.dtype == self.layout.dtype \
                and tuple(source.shape) == tuple(shape):
            return source
        chunk = torch.empty(shape, dtype=self.layout.dtype)
        fill(chunk)
        return chunk

    def _copy_out(self, entry: Entry, key: bytes, out: torch.Tensor) -> None:
        """Copy a pinned chunk into `out`: a raw chunk's view copied, a blob decoded (straight into `out`
        when the codec can and `out` is a CPU tensor of the layout's dtype)."""
        if entry.view is not None:
            if entry.small_bytes is None or not self._small.copy(out, self._dtype, entry.shape, entry.small_bytes):
                copy_into(out, entry.view)
        elif (self._in_place is not None and entry.is_blob and out.device.type == "cpu"
              and out.dtype == self.layout.dtype):
            self._in_place.decode_into(memoryview(self.payload(entry).numpy()), out, key)
        else:
            copy_into(out, self._as_tensor(entry, key))

    def _as_tensor(self, entry: Entry, key: bytes) -> torch.Tensor:
        page = self.payload(entry)
        if entry.is_blob:
            return self.codec.decode(memoryview(page.numpy()), expected_key=key)
        assert self.layout is not None
        return page.view(self.layout.dtype).view(self.layout.shape(entry.num_tokens))

    def _blob(self, entry: Entry, key: bytes) -> memoryview:
        if entry.stamped is not None:
            return entry.stamped
        if entry.is_blob:
            return memoryview(self.payload(entry).numpy())
        # Once per stored chunk: the page holds these bytes until it is freed, and the view is kept for the
        # chunk's later reads (a peer's GET, a server's reply), which then make no torch or numpy view.
        page = as_numpy(self.pool.page(entry.page))
        payload = memoryview(page[HEADER_SIZE : HEADER_SIZE + entry.nbytes])
        header = header_for(self._as_tensor(entry, key), RawCodec.codec_id, payload, key).pack()
        page[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
        entry.stamped = memoryview(page[: HEADER_SIZE + entry.nbytes])
        return entry.stamped

    def _take_page(self, nbytes: int) -> int:
        """A free page, evicting unpinned chunks in the policy's order if needed."""
        if nbytes > self.pool.page_bytes:
            raise TierError(f"chunk of {nbytes} bytes is larger than a pool page ({self.pool.page_bytes})")
        while True:
            page = self.pool.allocate()
            if page is not None:
                return page
            if not self._evict_one():
                raise PoolExhaustedError(
                    f"all {self.pool.num_pages} pool pages are in use by readers; raise cpu_size "
                    "or read fewer chunks at once"
                )

    def _evict_one(self) -> bool:
        with self._lock:
            victim = self._index.victim(lambda _, e: self.pool.refcount(e.page) == 1)
            if victim is None:
                return False
            entry = self._index.pop(victim)
        self._drop(entry, evicted=True)
        if self.on_evict is not None:
            self.on_evict(victim)
        return True

    def _insert(self, key: bytes, entry: Entry, started: float, *, pin: bool = False) -> bool:
        """Index `entry` (pinned first when `pin`); False if another thread stored the key meanwhile."""
        with self._lock:
            duplicate = key in self._index
            if not duplicate:
                if pin:
                    self.pool.acquire(entry.page)
                self._index[key] = entry
        if duplicate:  # another thread stored the same chunk meanwhile
            self.pool.release(entry.page)
            return False
        with self._stats.lock:
            self._stats.stored_chunks += 1
            self._stats.stored_bytes += entry.nbytes
            self._stats.bytes_used += entry.nbytes
            self._stats.write_seconds += time.perf_counter() - started
        return True

    def _drop(self, entry: Entry, evicted: bool = False) -> None:
        self.pool.release(entry.page)
        with self._stats.lock:
            self._stats.bytes_used -= entry.nbytes
            if evicted:
                self._stats.evicted_chunks += 1
                self._stats.evicted_bytes += entry.nbytes
