"""The serving peer of the `p2p` suite, run in its own process: `python -m nencache.bench.p2p_peer SPEC_JSON`.

SPEC_JSON: `{"index_url": ..., "model": ..., "layouts": [[layers, kv_heads, head_dim], ...], "shared": bool}`.
For each layout it opens a `KVCache` with `enable_p2p`, stores one 256-token chunk (normal values,
seed 7) and publishes it, prints one JSON line with each cache's endpoint address, and serves until
its stdin closes.
"""

from __future__ import annotations

import json
import sys

import torch

from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.layout import KVLayout

CHUNK = 256
TOKENS = list(range(1000, 1000 + CHUNK))


def chunk_kv(layout: KVLayout) -> torch.Tensor:
    return torch.randn(layout.shape(CHUNK), generator=torch.Generator().manual_seed(7)).to(layout.dtype)


def main(spec: dict) -> None:
    caches = []
    for layers, heads, dim in spec["layouts"]:
        layout = KVLayout(layers, heads, dim, torch.bfloat16)
        config = CacheConfig(chunk_size=CHUNK, cpu_size=4 * (layout.nbytes(CHUNK) + 64), pin_memory=False,
                             enable_p2p=True, p2p_index_url=spec["index_url"], p2p_shared_memory=spec["shared"],
                             remote_timeout=5.0)
        cache = KVCache(config, layout, spec["model"])
        cache.store(TOKENS, chunk_kv(layout))
        if not cache.flush(timeout=60):
            raise SystemExit("the peer could not publish its chunk")
        caches.append(cache)
    print(json.dumps({"addresses": [c.peer.address for c in caches]}), flush=True)  # type: ignore[union-attr]
    sys.stdin.read()
    for cache in caches:
        cache.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
