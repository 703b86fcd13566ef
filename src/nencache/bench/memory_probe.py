"""NenCache's side of the `memory` suite, in a fresh process: `python -m nencache.bench.memory_probe CODEC TOKENS`.

Prints one JSON line: the resident memory (RSS) a `KVCache` adds to this process once it holds
TOKENS tokens of SmolLM2-135M's KV in its CPU pool with `cpu_codec` CODEC, the pool sized to hold
exactly them. Code is imported and the engine's own KV buffers exist before the baseline is taken,
so only what the cache holds is counted: that includes the codec's code, loaded by one small chunk
through it (int8's and fp8's compiled loops: numba and the compiled code).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from nencache.bench.context import SMOLLM2
from nencache.cache import KVCache
from nencache.codecs import get_codec
from nencache.config import CacheConfig
from nencache.tiers.memory import raw_page_bytes

CHUNK = 256


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(codec_name: str, tokens: int) -> dict[str, object]:
    layout = SMOLLM2
    codec = get_codec(codec_name)
    page = raw_page_bytes(layout, CHUNK) if codec.zero_copy else codec.max_encoded_size(layout, CHUNK)
    pages = -(-tokens // CHUNK)
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(layout.shape(tokens), generator=gen).to(layout.dtype)
    ids = torch.randint(0, 50_000, (tokens,), generator=gen).tolist()
    out = torch.zeros_like(kv)
    small = kv[:, :, :16].contiguous()
    codec.decode(codec.encode(small))
    before = rss_bytes()
    config = CacheConfig(chunk_size=CHUNK, cpu_size=pages * page, cpu_codec=codec_name, pin_memory=False)
    with KVCache(config, layout, "nencache-bench-memory") as cache:
        cache._prefault.join()  # the pool is mapped at start-up; count all of it
        cache.store(ids, kv)
        cached = cache.lookup(ids)
        cache.retrieve(ids[:cached], out=out[:, :, :cached])
        after = rss_bytes()
        exact = bool(torch.equal(out.view(torch.int16), kv.view(torch.int16)))
    return {"codec": codec_name, "rss_bytes": after - before, "tokens": tokens, "cached_tokens": cached,
            "pool_bytes": pages * page, "bytes_equal": exact}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))), flush=True)
