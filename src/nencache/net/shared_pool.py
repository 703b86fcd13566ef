"""Shared-memory reads between peers on one machine (`p2p_shared_memory`).

A cache with `enable_p2p` keeps its pool in a `SharedRegion` (a memfd, `nencache.net.shared`):
the same region a `nencache serve` shares with its clients. A peer on the same machine maps it
read-only (SHARED, once per peer) and copies chunks out (one memory copy per chunk, no socket
transfer), checking each page's generation after the copy: a page freed meanwhile is fetched with GET
instead. Where a chunk sits comes with its holder in the P2P index (a `Placement`, published beside
the holder's address), so a read asks the holder nothing; a chunk without one is asked for with
LOCATE (one round trip). Header and key are checked as for any read; the payload checksum is not
re-verified for a P2P cache's pool (its region is `checked`: see `nencache.net.shared`).

A peer counts as local when the connection to it has the same address at both ends (the kernel routes
it to this machine), whatever address it published. A pool that must be pinned for CUDA copies
(`pin_memory`) stays private: peers then read it over the socket.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence

from nencache.net.buffers import BufferPool
from nencache.net.protocol import Op
from nencache.net.requests import locate
from nencache.net.shared import MappedRegion, SharedRegion, Spot
from nencache.net.wire import ErrorReply, WireConnection
from nencache.pool import MemoryPool, cuda_pinning_available

log = logging.getLogger("nencache.p2p")
Blob = bytes | bytearray | memoryview


class SharedPool(MemoryPool):
    """A `MemoryPool` whose buffer is a `SharedRegion` that peers on this machine may map read-only."""

    def __init__(self, region: SharedRegion, capacity_bytes: int, page_bytes: int) -> None:
        super().__init__(capacity_bytes, page_bytes, pin_memory=False, buffer=region.buffer,
                         generations=region.generations)
        self.region = region


def peer_pool(capacity_bytes: int, page_bytes: int, *, pin_memory: bool | None) -> MemoryPool:
    """The pool of a P2P cache: shared with local peers where memfds exist and no CUDA pinning is
    wanted, else a private `MemoryPool` (peers then read over the socket)."""
    if page_bytes <= 0 or capacity_bytes // page_bytes < 1:
        return MemoryPool(capacity_bytes, page_bytes, pin_memory=pin_memory)  # raises the usual ConfigError
    pin = cuda_pinning_available() if pin_memory is None else pin_memory
    # checked: a cache's pool holds only chunks it computed or verified, their checksums stamped from the pool
    region = None if pin else SharedRegion.create(capacity_bytes // page_bytes, page_bytes, checked=True)
    if region is None:
        return MemoryPool(capacity_bytes, page_bytes, pin_memory=pin_memory)
    return SharedPool(region, capacity_bytes, page_bytes)


def region_of(pool: MemoryPool) -> SharedRegion | None:
    """The shared region under `pool`, if it has one."""
    return getattr(pool, "region", None)


def is_local(conn: WireConnection) -> bool:
    """True when `conn` leads to this machine (same address at both ends, or loopback)."""
    try:
        here, there = conn.sock.getsockname()[0], conn.sock.getpeername()[0]
    except OSError:
        return False
    return here == there or str(there).startswith("127.") or there == "::1"


def attach(conn: WireConnection) -> MappedRegion | None:
    """Map the peer's shared pool read-only (SHARED); None where it does not share one or this process
    cannot map it (another machine, another user)."""
    if not is_local(conn):
        return None
    try:
        info = json.loads(conn.call(Op.SHARED).body)
    except ErrorReply as exc:
        if exc.closing:
            raise
        return None  # the peer does not share its pool
    except ValueError:
        return None
    try:
        path = f"/proc/{int(info['pid'])}/fd/{int(info['fd'])}"
        if not stat.S_ISREG(os.stat(path).st_mode):  # a memfd is a regular file; never open anything else
            return None
        return MappedRegion.attach(info)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("cannot map the peer's pool (%s); reading it over the socket", exc)
        return None


def read_shared(conn: WireConnection, region: MappedRegion, namespace: bytes, keys: Sequence[bytes],
                buffers: BufferPool) -> list[Blob | bool | None] | None:
    """Blobs copied out of the peer's pool (True: held but not copyable, fetch it with GET; None: absent),
    or None when the peer answers about another pool (it restarted): map it again."""
    spots = locate(conn, namespace, keys, region.nonce)
    if spots is None:
        return None
    out: list[Blob | bool | None] = []
    for spot in spots:
        if isinstance(spot, Spot):
            out.append(copy_out(region, spot, buffers) or True)
        else:
            out.append(True if spot else None)
    return out


def copy_out(region: MappedRegion, spot: Spot, buffers: BufferPool) -> memoryview | None:
    """The chunk at `spot` copied into a pooled buffer; None if the spot is not one of the region's chunks or
    the page was freed before the copy ended."""
    if region.page_of(spot) is None:
        return None
    buffer = buffers.take(spot.length)
    return buffer if region.copy(spot, buffer) else None

