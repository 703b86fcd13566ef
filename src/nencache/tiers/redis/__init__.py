"""The Redis/Valkey tier: `tier` (`RedisTier`), `client` (the bulk data path: keyed commands routed to
servers and pipelined) over `resp` (a small RESP2 client), `parts` (large chunks in several values),
`control` (redis-py for topology, health checks and the P2P index), `url` (URLs and schemes)."""
