"""`PeerEndpoint`: a server of the NenCache protocol over a `KVCache`'s own memory tier, serving its chunks to peers.

The server is `nencache.p2p.server.PeerServer` (a thread per connection; the protocol, limits and
deadlines of `nencache serve`); its store, `PeerStore`, answers from the memory tier of the cache's
store (`nencache.store`), read-only, and allocates no pool of its own. A raw chunk goes out as its
own pool page, the raw-codec header (payload CRC32 included) stamped in the page's header slot when
the chunk is published (on the background writer). Only EXISTS, GET, PING, AUTH and STATS are served; PUT is refused and DELETE and
CLEAR are ignored: peers never change this cache. Where the cache's pool is a shared region
(`nencache.net.shared_pool`), SHARED and LOCATE are served too: peers on this machine copy chunks out of it.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence
from typing import Any

from nencache.codecs import RawCodec
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE, parse_header
from nencache.tiers.peer.client import peer_address
from nencache.p2p.server import PeerServer
from nencache.server.settings import ServerSettings
from nencache.net.shared import Placement, SharedRegion, Spot
from nencache.server.store import Namespace
from nencache.tiers.memory import ChunkLease, MemoryTier


class PeerStore:
    """What the peer server asks of its store (`nencache.p2p.server.ServedStore`), answered read-only from a
    cache's memory tier, for one namespace. It allocates nothing: the pool is the cache's."""

    def __init__(self, memory: MemoryTier, namespace: bytes, region: SharedRegion | None = None) -> None:
        self.memory = memory
        self.pool = memory.pool
        self._space = Namespace(namespace, b"")  # memory keys are the bare chunk keys
        self.region = region  # the pool's shared region, which local peers map read-only (None: not shared)
        self.served_chunks = 0
        self._counting = threading.Lock()  # connections are served on threads of their own

    # --- what the server asks ------------------------------------------------------------------
    def known(self, name: bytes) -> Namespace | None:
        return self._space if name == self._space.name else None

    def exists(self, space: Namespace, keys: Sequence[bytes]) -> int:
        return self.memory.contains_prefix(keys)

    def lease(self, space: Namespace, keys: Sequence[bytes]) -> list[ChunkLease | None]:
        return [self.memory.lease(k, count=False) for k in keys]  # peers' reads are not this cache's hits

    def view(self, lease: ChunkLease) -> Any:
        """The chunk in the shared byte format, as one buffer over the pool."""
        with self._counting:
            self.served_chunks += 1
        if not lease.entry.is_blob:
            return lease.blob()
        page = lease.blob()
        header = parse_header(page)
        if header.codec_id == RawCodec.codec_id and not header.wrapper_id:
            return page
        return memoryview(RawCodec().encode(lease.tensor(), lease.key))  # another CPU codec: served as raw

    def locate(self, space: Namespace, keys: Sequence[bytes]) -> list[Spot | None]:
        """Where held chunks sit in the shared region, in the shared byte format (a raw chunk's header is
        stamped first); None for the rest. Nothing stays pinned: the reader checks the page's generation."""
        spots = self._spots(keys)
        with self._counting:
            self.served_chunks += sum(spot is not None for spot in spots)
        return spots

    def _spots(self, keys: Sequence[bytes]) -> list[Spot | None]:
        """`locate` without counting: each held chunk's header stamped, and where it sits."""
        region = self.region
        assert region is not None, "locate needs the shared region"
        spots: list[Spot | None] = []
        for key in keys:
            lease = self.memory.lease(key, count=False)
            if lease is None:
                spots.append(None)
                continue
            try:
                length = len(lease.blob())
                page = lease.entry.page
                spots.append(Spot(region.pool_offset + page * self.pool.page_bytes, length,
                                  int(region.generations[page])))
            finally:
                lease.release()
        return spots

    def stats(self) -> dict[str, Any]:
        return {"memory": self.memory.stats().as_dict(),
                "pool": {"capacity_bytes": self.pool.capacity_bytes, "page_bytes": self.pool.page_bytes,
                         "pages": self.pool.num_pages, "free_pages": self.pool.free_pages},
                "namespaces": 1, "served_chunks": self.served_chunks}

    # --- headers ---------------------------------------------------------------------------------
    def prepare(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Stamp the headers of raw chunks about to be published, so serving them is a lookup; where each
        sits in the shared pool (a packed `Placement`; None where the pool is not shared or it is gone),
        also recorded in the pool's directory for peers on this machine."""
        if self.region is not None:
            placements: list[bytes | None] = []
            for key, spot in zip(keys, self._spots(keys)):
                if spot is not None:
                    self.region.record(key, spot)
                placements.append(None if spot is None else Placement(self.region.nonce, spot).pack())
            return placements
        for key in keys:
            lease = self.memory.lease(key, count=False)
            if lease is not None:
                try:
                    lease.blob()
                finally:
                    lease.release()
        return [None] * len(keys)


class PeerEndpoint:
    """A `PeerStore` served on `host:port` (0: any free port) by a `PeerServer`, until `close`."""

    def __init__(self, memory: MemoryTier, namespace: str, *, host: str = "127.0.0.1", port: int = 0,
                 auth_token: str | None = None, max_chunk_bytes: int, io_timeout: float = 30.0,
                 region: SharedRegion | None = None) -> None:
        _check_host(host)
        max_chunk = max(max_chunk_bytes, memory.pool.page_bytes, HEADER_SIZE)
        self.settings = ServerSettings(host=host, port=port, admin_port=None, auth_token=auth_token,
                                       pool_bytes=max(memory.pool.capacity_bytes, max_chunk), max_chunk_bytes=max_chunk,
                                       max_request_bytes=max(8 * max_chunk, 64 << 20), io_timeout=io_timeout)
        self.store = PeerStore(memory, namespace.encode("ascii"), region)
        self._server = PeerServer(self.settings, self.store)
        try:
            self._server.start()
        except ConfigError as exc:
            raise ConfigError(f"P2P endpoint: {exc}") from None
        self.host, self.port = host, self._server.port
        self.address = peer_address(host, self.port)

    def close(self) -> None:
        self._server.stop()


def _check_host(host: str) -> None:
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return
    if unspecified:
        raise ConfigError(f"p2p_host {host!r} is published in the P2P index as this cache's address, so it must be "
                          "one that other peers can reach (e.g. this machine's IP), not a wildcard")
