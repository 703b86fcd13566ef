"""The simulator and the live cache (KVCache over the real tiers) give the same hits, request by request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.policy.simulate import SimClock, SimConfig, simulate
from nencache.policy.synthetic import ConversationModel, conversation_trace
from nencache.policy.trace import Trace
from nencache.tiers.memory import raw_page_bytes

from tests.policy.conftest import make_trace

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16)
CHUNK = 4


def tokens_of(trace: Trace, request: int) -> list[int]:
    """Token ids standing for a request's blocks: block `b` is `b * CHUNK + 0, 1, ...` (as many as it holds)."""
    first, end = int(trace.offsets[request]), int(trace.offsets[request + 1])
    return [int(b) * CHUNK + j for b, n in zip(trace.ids[first:end], trace.tokens[first:end]) for j in range(int(n))]


def replay_live(trace: Trace, config: CacheConfig) -> list[tuple[int, int]]:
    """(CPU hit chunks, disk hit chunks) per request, as an engine's lookup / retrieve / store sees them."""
    hits: list[tuple[int, int]] = []
    clock = SimClock()
    with KVCache(config, LAYOUT, model_id="sim-check") as cache:
        if cache.policies.context is not None:
            cache.policies.context.history.clock = clock  # the trace's time, as the simulator's
        for request in range(trace.num_requests):
            clock.now = float(trace.times[request])
            tokens = tokens_of(trace, request)
            before_cpu, before_lower = cache.memory.stats().hits, cache.stats()["lower_hits"]
            matched = cache.lookup(tokens)
            if matched:
                cache.retrieve(tokens[:matched])
            start = matched - matched % CHUNK
            if start < len(tokens):
                kv = torch.zeros(LAYOUT.shape(len(tokens) - start), dtype=LAYOUT.dtype)
                cache.store(tokens, kv, kv_start=start)
            cache.flush()
            hits.append((cache.memory.stats().hits - before_cpu, cache.stats()["lower_hits"] - before_lower))
    return hits


def config_for(cpu_chunks: int, policy: str, disk: Path | None = None, disk_chunks: int = 0) -> CacheConfig:
    page = raw_page_bytes(LAYOUT, CHUNK)
    extra = {"disk_path": str(disk), "disk_size": disk_chunks * page} if disk is not None else {}
    return CacheConfig(chunk_size=CHUNK, cpu_size=cpu_chunks * page, pin_memory=False, eviction=policy, **extra)


@pytest.fixture(scope="module")
def conversations() -> Trace:
    return conversation_trace(ConversationModel(duration=120.0, rate=0.5, first_blocks=(2, 8), new_blocks=(1, 3),
                                                think_median=15.0, block_tokens=CHUNK), seed=5)


@pytest.mark.parametrize("policy", ["lru", "leaf-lru", "s3fifo", "learned"])
def test_memory_tier_hits_match(conversations: Trace, policy: str) -> None:
    expected = simulate(conversations, SimConfig(cpu_chunks=24, policy=policy), record=True).per_request
    assert expected is not None and sum(c for c, _ in expected) > 0
    assert replay_live(conversations, config_for(24, policy)) == expected


@pytest.mark.parametrize("policy", ["lru", "leaf-lru", "s3fifo"])
def test_memory_and_disk_tier_hits_match(tmp_path: Path, policy: str) -> None:
    """One chunk a request, so a request promotes at most one chunk from disk (promotions of several run
    on decoder threads, in no fixed order)."""
    requests = [[b] for b in (1, 1, 2, 3, 1, 4, 4, 5, 2, 6, 1, 3, 3, 7, 2, 8, 4, 1, 9, 3, 5, 2, 1)]
    trace = make_trace(requests, block_tokens=CHUNK)
    expected = simulate(trace, SimConfig(cpu_chunks=2, disk_chunks=5, policy=policy), record=True).per_request
    assert expected is not None and sum(d for _, d in expected) > 0 and sum(c for c, _ in expected) > 0
    assert replay_live(trace, config_for(2, policy, tmp_path, 5)) == expected
