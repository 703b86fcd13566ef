"""Storage tiers: the memory pool tier and the byte tiers below it (disk, Redis, server, peers)."""
