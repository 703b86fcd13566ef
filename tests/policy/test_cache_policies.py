"""The policies inside KVCache: config keys, the model surviving a restart, planned prefetches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.errors import ConfigError
from nencache.keys import ChunkSpan
from nencache.policy.live import CachePolicies
from nencache.policy.state import STATE_FILE

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16)


def test_config_takes_the_policy_names() -> None:
    assert CacheConfig(eviction="learned", prefetch="learned").eviction == "learned"
    with pytest.raises(ConfigError, match="eviction must be one of lru, leaf-lru, s3fifo, learned"):
        CacheConfig(eviction="belady")
    with pytest.raises(ConfigError, match="prefetch must be one of off, learned"):
        CacheConfig(prefetch="always")


def test_the_learned_model_survives_a_restart_with_the_disk_tier(tmp_path: Path) -> None:
    config = CacheConfig(chunk_size=4, cpu_size="64KiB", disk_path=str(tmp_path), disk_size="1MiB",
                         eviction="learned", pin_memory=False)
    with KVCache(config, LAYOUT, model_id="m") as cache:
        for turn in range(30):
            tokens = list(range(4 * (turn % 6 + 2)))
            cache.lookup(tokens)
            cache.store(tokens, torch.zeros(LAYOUT.shape(len(tokens)), dtype=LAYOUT.dtype))
        cache.policies.context.history.refresh_learner()
        learned = cache.policies.context.model.hits.copy()
        directory = cache._policy_dir
    assert learned.sum() > 0 and (directory / STATE_FILE).is_file()
    with KVCache(config, LAYOUT, model_id="m") as again:
        assert torch.equal(torch.from_numpy(again.policies.context.model.hits), torch.from_numpy(learned))
    (directory / STATE_FILE).write_bytes(b"not a model")
    with KVCache(config, LAYOUT, model_id="m") as fresh:  # a damaged state is ignored, not an error
        assert fresh.policies.context.model.hits.sum() == 0


class Planned:
    """A planner that always plans a prefetch `delay` seconds ahead."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def plan(self, slots, now, residence):  # noqa: ANN001 - the PrefetchPlanner signature
        return now + self.delay


def test_a_planned_prefetch_runs_when_due_unless_the_chain_came_back() -> None:
    policies = CachePolicies("learned", "learned", 4)
    policies.tier_policy()  # the memory tier's, whose residence sizes the window
    policies.planner = Planned(0.05)  # type: ignore[assignment]
    chain = [ChunkSpan(bytes([i]) * 16, 4 * i, 4 * i + 4) for i in range(3)]
    promoted: list[list[ChunkSpan]] = []
    done = threading.Event()
    policies.observe_request(chain, lambda spans: (promoted.append(spans), done.set()))
    assert done.wait(5) and promoted == [chain]
    done.clear()
    policies.planner = Planned(0.3)  # type: ignore[assignment]
    policies.observe_request(chain, lambda spans: (promoted.append(spans), done.set()))
    policies.planner = None  # the chain comes back before its plan is due: the plan lapses
    policies.observe_request(chain, lambda spans: None)
    time.sleep(0.5)
    assert len(promoted) == 1 and not done.is_set()
    policies.close()


@pytest.mark.parametrize("eviction", ["lru", "leaf-lru", "s3fifo", "learned"])
def test_every_policy_serves_a_cache_with_a_disk_tier(tmp_path: Path, eviction: str) -> None:
    config = CacheConfig(chunk_size=4, cpu_size="8KiB", disk_path=str(tmp_path), disk_size="64KiB",
                         eviction=eviction, prefetch="learned", pin_memory=False)
    with KVCache(config, LAYOUT, model_id="m") as cache:
        kv = torch.randn(LAYOUT.shape(64), generator=torch.Generator().manual_seed(1)).to(LAYOUT.dtype)
        tokens = list(range(64))
        cache.lookup(tokens)
        cache.store(tokens, kv)
        for other in range(5):  # push the first prompt out of the small pool
            more = list(range(1000 * (other + 1), 1000 * (other + 1) + 64))
            cache.lookup(more)
            cache.store(more, kv)
        cache.flush()
        assert cache.lookup(tokens) == 64
        assert torch.equal(cache.retrieve(tokens), kv)


def test_note_request_feeds_the_history_once_per_request() -> None:
    config = CacheConfig(chunk_size=4, cpu_size="64KiB", eviction="learned", pin_memory=False)
    with KVCache(config, LAYOUT, model_id="m") as cache:
        history = cache.policies.context.history
        cache.note_request(list(range(10)))  # two full chunks and a partial one
        assert history.requests == 1 and history.accesses == 3
        cache.lookup(list(range(10)), record=False)  # a repeated check: not a request
        assert history.requests == 1
        cache.lookup(list(range(8)))
        assert history.requests == 2 and history.accesses == 5
    with KVCache(CacheConfig(chunk_size=4, cpu_size="64KiB", pin_memory=False), LAYOUT, model_id="m") as plain:
        plain.note_request(list(range(10)))  # LRU and no prefetch: nothing to learn, nothing kept
        assert plain.policies.context is None
