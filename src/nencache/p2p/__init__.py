"""Peer-to-peer sharing of memory tiers (`enable_p2p`): each `KVCache` serves its chunks to its peers.

`PeerEndpoint` serves the cache's memory tier over the NenCache server protocol, `PeerIndex` (in
Redis) says which peer holds which chunk, and `PeerTier` is the byte tier that finds and fetches
chunks from peers (`p2p.endpoint`, `p2p.index`, `p2p.tier`). `nencache.assemble` builds them; docs/p2p.md describes the whole.
"""
