"""Peer-to-peer sharing of memory tiers (`enable_p2p`): each `KVCache` serves its chunks to its peers.

`PeerEndpoint` serves the cache's memory tier over the NenCache server protocol, `PeerIndex` (in
Redis) says which peer holds which chunk, and `PeerTier` is the byte tier that finds and fetches
chunks from peers. `nencache.assemble` builds them; docs/p2p.md describes the whole.
"""

from __future__ import annotations

from nencache.p2p.client import PeerClients
from nencache.p2p.endpoint import PeerEndpoint, PeerStore
from nencache.p2p.index import PeerIndex
from nencache.p2p.shared import peer_pool, region_of
from nencache.p2p.tier import PeerTier

__all__ = ["PeerClients", "PeerEndpoint", "PeerIndex", "PeerStore", "PeerTier", "peer_pool", "region_of"]
