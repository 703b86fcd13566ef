"""Peer-to-peer sharing of memory tiers (`enable_p2p`): the serving side.

`PeerEndpoint` (`p2p.endpoint`) serves this cache's memory tier to its peers over the NenCache server
protocol. The fetching side, the peer tier and its index, is `nencache.tiers.peer`. `nencache.assemble`
builds both; docs/p2p.md describes the whole.
"""
