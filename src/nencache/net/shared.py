"""Shared-memory reads: the server's pool in a memfd that clients on the same machine map read-only.

A client on the server's machine (same user, same PID namespace) opens the pool through
`/proc/<server pid>/fd/<fd>` and copies chunks straight out of it instead of receiving them over the
socket: one memory copy instead of a send, a receive and a copy. The region starts with a control
block, then the pool::

    offset 0   magic        8 bytes   b"NENCSHM1"
    offset 8   nonce       16 bytes   random; proves the client mapped this server's region
    offset 24  pages        u64
    offset 32  page_bytes   u64
    offset 40  pool_offset  u64       where page 0 starts (a multiple of 4096)
    offset 48  directory_at u64       where the directory starts (a multiple of 64)
    offset 56  slots        u64       the directory's slots (a power of two)
    offset 64  generations  u64 per page, bumped by the server each time the page is freed
    then       directory    where each published chunk sits (`nencache.net.directory`)

The server pins nothing for these reads. It answers LOCATE with each chunk's offset, length and page
generation; the client copies the bytes, then reads the generation again. If the page was freed in
between (evicted, overwritten), the generation moved and the read counts as stale: the client asks
for it over the socket instead. A page is freed (generation bumped) before anything else is written
into it, and x86 keeps stores in order and loads in order, so an unchanged generation after the copy
means every byte copied is the chunk that was there when the spot was taken (CPUs that reorder loads,
such as ARM, would need barriers the copy does not issue: there the checksum is always verified). The
chunk's header and key are checked as for any read; its payload checksum too, unless the region says
`checked`: its owner took in only chunks it had verified or computed itself, and stamped each checksum
from the pool's own bytes (a P2P cache's pool; not a server's, which keeps PUT bodies as they come).
Re-verifying a copy of such a pool would only catch the owner's memory changing under a page it holds,
which the owner's own reads of its pool do not check either: the copy is exactly as trustworthy as a
memory-tier hit there.

A `Placement` (nonce + spot) is a spot that travels without LOCATE: P2P caches publish one per chunk in
the index, so a peer that has mapped their region copies the chunk without asking them first. They
also record each chunk's spot in the region's directory, where such a peer finds it without asking
the index either (`MappedRegion.find`).
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nencache.net.directory import SLOT_BYTES, Directory, slot_count
from nencache.net.protocol import MISSING, SPOT, UNPLACED

MAGIC = b"NENCSHM1"
_CONTROL = struct.Struct("<8s16sQQQQQ")
# loads and stores kept in order by the CPU, which the generation check relies on (see the module docstring)
ORDERED_MEMORY = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
_GENERATIONS_AT = 64
_ALIGN = 4096


def _round_up(value: int, step: int) -> int:
    return (value + step - 1) // step * step


def _page_starting_at(offset: int, pool_offset: int, page_bytes: int, pages: int) -> int | None:
    """The page of the pool that starts at `offset` in the region, or None if no page starts there."""
    page, within = divmod(offset - pool_offset, page_bytes)
    return page if offset >= pool_offset and not within and page < pages else None


class SharedRegion:
    """The server side: a memfd holding the control block and the pool (see the module docstring)."""

    def __init__(self, num_pages: int, page_bytes: int, *, checked: bool = False) -> None:
        self.checked = checked  # every chunk's payload was checked when it entered (see the module docstring)
        slots = slot_count(num_pages)
        directory_at = _round_up(_GENERATIONS_AT + 8 * num_pages, 64)
        self.pool_offset = _round_up(directory_at + SLOT_BYTES * slots, _ALIGN)
        self.size = self.pool_offset + num_pages * page_bytes
        self.nonce = os.urandom(16)
        self.fd = os.memfd_create("nencache-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._map[: _CONTROL.size] = _CONTROL.pack(MAGIC, self.nonce, num_pages, page_bytes, self.pool_offset,
                                                   directory_at, slots)
        self.pages, self.page_bytes = num_pages, page_bytes
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8, count=num_pages * page_bytes,
                                       offset=self.pool_offset)
        self.generations = np.frombuffer(self._map, dtype=np.uint64, count=num_pages, offset=_GENERATIONS_AT)
        self.directory = Directory(self._map, directory_at, slots, live=self._holds)

    def _holds(self, offset: int, generation: int) -> bool:
        """True while the page at `offset` has not been freed since it was at `generation`."""
        page = _page_starting_at(offset, self.pool_offset, self.page_bytes, self.pages)
        return page is not None and int(self.generations[page]) == generation

    def record(self, key: bytes, spot: Spot) -> None:
        """Say in the directory where the chunk `key` sits, for peers on this machine that mapped the region."""
        self.directory.record(key, spot.offset, spot.length, spot.generation)

    @classmethod
    def create(cls, num_pages: int, page_bytes: int, *, checked: bool = False) -> SharedRegion | None:
        """A region, or None where memfds are not available (the pool then lives in private memory)."""
        if not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(num_pages, page_bytes, checked=checked)
        except OSError:
            return None

    def describe(self) -> dict[str, Any]:
        """What a client needs to map the region (the SHARED reply's body)."""
        return {"pid": os.getpid(), "fd": self.fd, "size": self.size, "nonce": self.nonce.hex(),
                "checked": self.checked}

    def close(self) -> None:
        """No new client can map the region; mapped ones keep their view until they drop it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Spot:
    """Where a chunk sits in the region, as LOCATE answers it."""

    offset: int
    length: int
    generation: int


def locate_reply(nonce: bytes, spots: Sequence[Spot | None], unplaced: Collection[int] = ()) -> bytes:
    """LOCATE's reply meta: the region's nonce, then per key its spot, or (length 0) UNPLACED for the
    indexes in `unplaced` (held, but not in the region) and MISSING for the other ones without a spot."""
    parts = [nonce]
    for i, spot in enumerate(spots):
        if spot is not None:
            parts.append(SPOT.pack(spot.offset, spot.length, spot.generation))
        else:
            parts.append(SPOT.pack(UNPLACED if i in unplaced else MISSING, 0, 0))
    return b"".join(parts)


_PLACEMENT = struct.Struct("<16sQQQ")


@dataclass(frozen=True, slots=True)
class Placement:
    """A spot in the region whose nonce is `nonce`, as bytes that can be published (40 bytes)."""

    nonce: bytes
    spot: Spot

    def pack(self) -> bytes:
        return _PLACEMENT.pack(self.nonce, self.spot.offset, self.spot.length, self.spot.generation)

    @classmethod
    def unpack(cls, data: bytes) -> Placement | None:
        """The placement `data` packs; None if it is not one (the bytes come from outside: never trusted)."""
        if len(data) != _PLACEMENT.size:
            return None
        nonce, offset, length, generation = _PLACEMENT.unpack(data)
        return cls(nonce, Spot(offset, length, generation))


class MappedRegion:
    """The client side: a read-only mapping of a server's region."""

    def __init__(self, mapping: mmap.mmap, nonce: bytes) -> None:
        magic, found, pages, page_bytes, pool_offset, directory_at, slots = _CONTROL.unpack_from(mapping, 0)
        if magic != MAGIC or found != nonce:
            raise ValueError("the mapped file is not this server's pool")
        directory_fits = not slots or _GENERATIONS_AT + 8 * pages <= directory_at <= pool_offset - SLOT_BYTES * slots
        if pool_offset < _GENERATIONS_AT + 8 * pages or pool_offset + pages * page_bytes > len(mapping) \
                or not directory_fits:
            raise ValueError("the pool's control block does not fit the mapping")
        self.nonce, self.pages, self.page_bytes, self.pool_offset = nonce, pages, page_bytes, pool_offset
        self.checked = False  # copies need no checksum pass: the server vouches for its payloads, and this CPU
        # keeps loads in order (`SharedRegion.checked`, `ORDERED_MEMORY`)
        self._source: tuple[str, int] | None = None  # the path it was opened by and the file's inode
        self._seen_alive = -float("inf")  # when `alive` last found the owner's file
        self._map = mapping
        self._generations = np.frombuffer(mapping, dtype=np.uint64, count=pages, offset=_GENERATIONS_AT)
        # A region made before directories existed has none (`slots` 0): the index answers for all of it.
        self._directory = Directory(mapping, directory_at, slots) if slots else None

    @classmethod
    def attach(cls, info: dict[str, Any]) -> MappedRegion:
        """Map the region a SHARED reply describes; `OSError`/`ValueError`/`KeyError` if this process cannot."""
        path = f"/proc/{int(info['pid'])}/fd/{int(info['fd'])}"
        nonce = bytes.fromhex(str(info["nonce"]))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            found = os.fstat(fd)
            if found.st_size != int(info["size"]) or found.st_size < _GENERATIONS_AT:
                raise ValueError(f"{path} is {found.st_size} bytes, the server said {info['size']}")
            mapping = mmap.mmap(fd, found.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        region = cls(mapping, nonce)
        region.checked = info.get("checked") is True and ORDERED_MEMORY
        region._source = (path, found.st_ino)
        return region

    def alive(self, max_age: float = 0.0) -> bool:
        """False once the server has closed the region or exited (this mapping alone keeps the memory then).

        A True found less than `max_age` seconds ago is answered again without a new look (a `stat` of
        /proc, tens of microseconds when cold). Meanwhile a closed region's pages no longer change, so a
        copy out of one is still checked, and still the chunk its key names."""
        if self._source is None:
            return True
        now = time.monotonic()
        if now - self._seen_alive < max_age:
            return True
        try:
            alive = os.stat(self._source[0]).st_ino == self._source[1]
        except OSError:
            alive = False
        self._seen_alive = now if alive else -float("inf")
        return alive

    def page_of(self, spot: Spot) -> int | None:
        """The page a spot names, or None unless it is a whole chunk at the start of a page of this pool."""
        if not 0 < spot.length <= self.page_bytes:
            return None
        return _page_starting_at(spot.offset, self.pool_offset, self.page_bytes, self.pages)

    def find(self, key: bytes) -> Spot | None:
        """Where the region's directory says the chunk `key` sits, if its page still holds it; None otherwise
        (the copy that follows is checked as any: generation after the copy, header and key)."""
        found = self._directory.find(key) if self._directory is not None else None
        if found is None:
            return None
        spot = Spot(*found)
        return spot if self.current(spot) else None

    def current(self, spot: Spot) -> bool:
        """True while the page at `spot` still holds what it held when the spot was taken (not freed since)."""
        page = self.page_of(spot)
        return page is not None and int(self._generations[page]) == spot.generation

    def copy(self, spot: Spot, into: memoryview) -> bool:
        """Copy the chunk at `spot` into `into`; False if the spot is not a chunk of this pool or went stale
        before the copy ended."""
        page = self.page_of(spot)
        if page is None:
            return False
        # numpy copies without the GIL: other threads decode and copy meanwhile
        np.copyto(np.frombuffer(into, dtype=np.uint8, count=spot.length),
                  np.frombuffer(self._map, dtype=np.uint8, count=spot.length, offset=spot.offset))
        return int(self._generations[page]) == spot.generation

