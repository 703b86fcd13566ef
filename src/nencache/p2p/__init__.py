"""Peer-to-peer sharing of memory tiers (`enable_p2p`): each `KVCache` serves its chunks to its peers.

`PeerEndpoint` serves the cache's memory tier over the NenCache server protocol, `PeerIndex` (in
Redis) says which peer holds which chunk, and `PeerTier` is the byte tier that finds and fetches
chunks from peers. docs/p2p.md describes the whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from nencache.config import CacheConfig
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE
from nencache.layout import KVLayout
from nencache.p2p.client import PeerClients
from nencache.p2p.endpoint import PeerEndpoint, PeerStore
from nencache.p2p.index import PeerIndex
from nencache.net.shared_pool import peer_pool, region_of
from nencache.p2p.tier import PeerTier
from nencache.tiers.base import Tier
from nencache.tiers.memory import MemoryTier

__all__ = ["PeerClients", "PeerEndpoint", "PeerIndex", "PeerStore", "PeerTier", "build_peer_tier", "peer_pool",
           "with_peer_tier"]


def build_peer_tier(config: CacheConfig, namespace: str, memory: MemoryTier, layout: KVLayout) -> PeerTier:
    """The peer tier of a `KVCache` with `enable_p2p`: its endpoint serves `memory` from now on."""
    if not config.p2p_index_url:
        raise ConfigError("enable_p2p needs p2p_index_url, the Redis URL (e.g. redis://127.0.0.1:6379) of the index "
                          "where peers publish the chunks they hold")
    if not config.local_cpu:
        raise ConfigError("enable_p2p serves chunks from the CPU pool, so it needs local_cpu: true")
    index = PeerIndex(config.p2p_index_url, namespace, ttl=config.p2p_ttl, timeout=config.remote_timeout,
                      key_prefix=config.remote_key_prefix)
    clients = PeerClients(namespace.encode("ascii"), timeout=config.remote_timeout, auth_token=config.auth_token,
                          shared_memory=config.p2p_shared_memory)
    endpoint = PeerEndpoint(memory, namespace, host=config.p2p_host, port=config.p2p_port,
                            auth_token=config.auth_token,
                            max_chunk_bytes=HEADER_SIZE + layout.nbytes(config.chunk_size),
                            region=region_of(memory.pool) if config.p2p_shared_memory else None)
    try:
        return PeerTier(index, endpoint, clients, ttl=config.p2p_ttl)
    except BaseException:
        endpoint.close()
        raise


def with_peer_tier(pairs: Sequence[tuple[Tier, str]], peer: PeerTier) -> list[tuple[Tier, str]]:
    """`pairs` with the peer tier (raw codec) placed after the disk tier and before the remote tier."""
    out = list(pairs)
    position = max((i + 1 for i, (tier, _) in enumerate(out) if tier.name == "disk"), default=0)
    out.insert(position, (peer, "raw"))
    return out
