"""The peer tier: other caches' memory tiers as a byte tier (`enable_p2p`). `tier` (`PeerTier`: finds
holders, fetches, publishes what this cache holds), `index` (`PeerIndex`, in Redis: which peer holds
which chunk, and where in its shared pool), `client` (`PeerClients`: connections to the holders, the
checks on what they send). The side that serves this cache's chunks is `nencache.p2p.endpoint`."""
