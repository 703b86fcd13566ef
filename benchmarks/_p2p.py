"""P2P fetch latency for `server.py`: one SmolLM2-shaped chunk fetched from a peer process.

Peer A (a child process) is a `KVCache` with `enable_p2p` holding one 256-token chunk of SmolLM2-135M's
KV shape (30 layers x 3 KV heads x head dim 64, bf16: 5,898,240 bytes + a 64-byte header); the index is a
throwaway redis-server. Peer B (this process, its own `KVCache`) times, per fetch: the index lookup
(`PeerIndex.lookup`, one round trip: the holders and where the chunk sits in their shared pools), the
fetch from A (`PeerClients.get`: a copy out of A's mapped pool, with the peer tier's own checks) and the
check (`split_blob`: what the store adds; the CRC32 only for a tier that does not check it). Also the whole engine path,
`KVCache.retrieve` into an engine KV tensor with B's memory emptied before each call (index lookup, fetch,
check, decode, promotion into B's pool, copy out). Reference, in the same reps: the same number of bytes
`sendall`'d by a child process over one loopback TCP connection into a preallocated buffer (no framing).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nencache.bench.references import RawSocket
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.format import HEADER_SIZE, split_blob
from nencache.keys import chunk_keys
from nencache.layout import KVLayout

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
TOKENS = list(range(1000, 1256))
MODEL = "bench-smollm2-135m"
PEER_A = r"""
import sys, torch
from nencache import CacheConfig, KVCache, KVLayout
layout = KVLayout(30, 3, 64, torch.bfloat16)
cache = KVCache(CacheConfig(chunk_size=256, cpu_size=4 * layout.nbytes(256), pin_memory=False, enable_p2p=True,
                            p2p_index_url=sys.argv[1]), layout, sys.argv[2])
kv = torch.randn(layout.shape(256), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
cache.store(list(range(1000, 1256)), kv)
assert cache.flush(timeout=30)
print(cache.peer.address, flush=True)
sys.stdin.read()
cache.close()
"""

@dataclass(slots=True)
class Latency:
    """p50 and p99 of one step, in microseconds."""

    p50: float
    p99: float


def percentiles(samples: list[float]) -> Latency:
    ordered = sorted(samples)
    return Latency(ordered[len(ordered) // 2] * 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6)


def measure(index_url: str, samples: int = 400, warmup: int = 20) -> dict[str, Latency]:
    """Latencies of the P2P steps (see the module docstring), keyed by step."""
    peer_a = subprocess.Popen([sys.executable, "-c", PEER_A, index_url, MODEL], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert peer_a.stdout is not None
        address = peer_a.stdout.readline().strip()
        if not address:
            raise SystemExit("the P2P peer process did not start")
        config = CacheConfig(chunk_size=256, cpu_size=4 * LAYOUT.nbytes(256), pin_memory=False, enable_p2p=True,
                             p2p_index_url=index_url, remote_timeout=5.0)
        with KVCache(config, LAYOUT, MODEL) as b:
            return _measure(b, address, samples, warmup)
    finally:
        if peer_a.stdin is not None:
            peer_a.stdin.close()
        peer_a.wait(30)


def _measure(b: KVCache, address: str, samples: int, warmup: int) -> dict[str, Latency]:
    tier = b.peer
    assert tier is not None
    index, clients = tier.index, tier.clients  # type: ignore[attr-defined]
    [key] = chunk_keys(TOKENS, 256, b.namespace)
    steps: dict[str, list[float]] = {"lookup": [], "fetch": [], "check": [], "total": [], "raw": [], "retrieve": []}
    raw = RawSocket(HEADER_SIZE + LAYOUT.nbytes(256))
    for rep in range(warmup + samples):
        started = time.perf_counter()
        raw.fetch()
        t0 = time.perf_counter()
        [holders] = index.lookup([key])
        t1 = time.perf_counter()
        [blob] = clients.get(holders[0].address, [key], [holders[0].placement])
        t2 = time.perf_counter()
        assert blob is not None, "peer A did not serve its chunk"
        split_blob(blob, key, verify=not tier.checks_payload)
        t3 = time.perf_counter()
        del blob
        if rep >= warmup:
            for name, seconds in (("lookup", t1 - t0), ("fetch", t2 - t1), ("check", t3 - t2), ("total", t3 - t0),
                                  ("raw", t0 - started)):
                steps[name].append(seconds)
    raw.close()
    out = torch.empty(LAYOUT.shape(256), dtype=LAYOUT.dtype)
    steps["retrieve"] = _timed(lambda: _retrieve(b, out), samples, warmup)
    assert b.stats()["tiers"]["p2p"]["errors"] == 0
    return {name: percentiles(values) for name, values in steps.items()}


def _retrieve(b: KVCache, out: torch.Tensor) -> None:
    b.memory.clear()
    assert b.retrieve_prefix(TOKENS, out=out) == 256, "KVCache did not fetch the chunk from peer A"


def _timed(call: Callable[[], None], samples: int, warmup: int) -> list[float]:
    times = []
    for rep in range(warmup + samples):
        started = time.perf_counter()
        call()
        if rep >= warmup:
            times.append(time.perf_counter() - started)
    return times
