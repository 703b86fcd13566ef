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
    offset 64  generations  u64 per page, bumped by the server each time the page is freed

The server pins nothing for these reads. It answers LOCATE with each chunk's offset, length and page
generation; the client copies the bytes, then reads the generation again. If the page was freed in
between (evicted, overwritten), the generation moved and the read counts as stale: the client asks
for it over the socket instead. The chunk's header, key and checksum are checked as for any read.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAGIC = b"NENCSHM1"
_CONTROL = struct.Struct("<8s16sQQQ")
_GENERATIONS_AT = 64
_ALIGN = 4096


def _round_up(value: int, step: int) -> int:
    return (value + step - 1) // step * step


class SharedRegion:
    """The server side: a memfd holding the control block and the pool (see the module docstring)."""

    def __init__(self, num_pages: int, page_bytes: int) -> None:
        self.pool_offset = _round_up(_GENERATIONS_AT + 8 * num_pages, _ALIGN)
        self.size = self.pool_offset + num_pages * page_bytes
        self.nonce = os.urandom(16)
        self.fd = os.memfd_create("nencache-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._map[: _CONTROL.size] = _CONTROL.pack(MAGIC, self.nonce, num_pages, page_bytes, self.pool_offset)
        self.pages, self.page_bytes = num_pages, page_bytes
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8, count=num_pages * page_bytes,
                                       offset=self.pool_offset)
        self.generations = np.frombuffer(self._map, dtype=np.uint64, count=num_pages, offset=_GENERATIONS_AT)

    @classmethod
    def create(cls, num_pages: int, page_bytes: int) -> SharedRegion | None:
        """A region, or None where memfds are not available (the pool then lives in private memory)."""
        if not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(num_pages, page_bytes)
        except OSError:
            return None

    def describe(self) -> dict[str, Any]:
        """What a client needs to map the region (the SHARED reply's body)."""
        return {"pid": os.getpid(), "fd": self.fd, "size": self.size, "nonce": self.nonce.hex()}

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


class MappedRegion:
    """The client side: a read-only mapping of a server's region."""

    def __init__(self, mapping: mmap.mmap, nonce: bytes) -> None:
        magic, found, pages, page_bytes, pool_offset = _CONTROL.unpack_from(mapping, 0)
        if magic != MAGIC or found != nonce:
            raise ValueError("the mapped file is not this server's pool")
        if pool_offset < _GENERATIONS_AT + 8 * pages or pool_offset + pages * page_bytes > len(mapping):
            raise ValueError("the pool's control block does not fit the mapping")
        self.nonce, self.pages, self.page_bytes, self.pool_offset = nonce, pages, page_bytes, pool_offset
        self._map = mapping
        self._generations = np.frombuffer(mapping, dtype=np.uint64, count=pages, offset=_GENERATIONS_AT)

    @classmethod
    def attach(cls, info: dict[str, Any]) -> MappedRegion:
        """Map the region a SHARED reply describes; `OSError`/`ValueError`/`KeyError` if this process cannot."""
        path = f"/proc/{int(info['pid'])}/fd/{int(info['fd'])}"
        nonce = bytes.fromhex(str(info["nonce"]))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != int(info["size"]) or size < _GENERATIONS_AT:
                raise ValueError(f"{path} is {size} bytes, the server said {info['size']}")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(mapping, nonce)

    def copy(self, spot: Spot, into: memoryview) -> bool:
        """Copy the chunk at `spot` into `into`; False if the spot is out of bounds or went stale meanwhile."""
        page, within = divmod(spot.offset - self.pool_offset, self.page_bytes)
        if spot.offset < self.pool_offset or page >= self.pages or within + spot.length > self.page_bytes:
            return False
        # numpy copies without the GIL: other threads decode and copy meanwhile
        np.copyto(np.frombuffer(into, dtype=np.uint8, count=spot.length),
                  np.frombuffer(self._map, dtype=np.uint8, count=spot.length, offset=spot.offset))
        return int(self._generations[page]) == spot.generation

