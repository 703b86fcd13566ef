"""Network parts shared by the server, the remote and peer tiers, and the P2P client.

`protocol` (the NenCache frame format, ops, codes and limits), `wire` (the client end of a connection:
framing, deadlines, `nencache://` URLs), `requests` (pipelined EXISTS/GET/LOCATE exchanges),
`buffers` (reused receive buffers), `retry` (reconnect with backoff), `warn` (warn-once and throttled
warnings), `shared` (the shared-memory region a server exposes) and `shared_pool` (a memory pool
placed in such a region, and reading chunks out of a peer's). Nothing here imports the server, the
tiers or the cache: they all import this.
"""
