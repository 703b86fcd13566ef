"""Every policy, through the real memory tier and disk index: capacity held exactly, pins respected."""

from __future__ import annotations

import random

import pytest

from nencache.errors import ConfigError
from nencache.policy.index import PolicyIndex
from nencache.policy.leaf_lru import LeafLruPolicy
from nencache.policy.lru import LruPolicy
from nencache.policy.registry import SIM_POLICIES, make_policy
from nencache.policy.s3fifo import S3FifoPolicy
from nencache.policy.simulate import SimConfig, simulate
from nencache.pool import MemoryPool
from nencache.tiers.disk.index import LruIndex
from nencache.tiers.memory import MemoryTier

from tests.policy.conftest import make_trace


def byteless_tier(pages: int, policy) -> MemoryTier:
    return MemoryTier(MemoryPool(pages, 1, pin_memory=False), policy=policy)


def put(tier: MemoryTier, key: int) -> None:
    tier.commit_page(key, tier.reserve_page(0), 0, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SIM_POLICIES)
def test_memory_tier_holds_exactly_its_capacity(name: str, context) -> None:
    ctx, clock = context
    policy = make_policy(name, ctx, simulator=True)
    tier = byteless_tier(16, policy)
    rng = random.Random(3)
    puts = 0
    for step in range(400):
        clock.now = float(step)
        chain = [rng.randrange(60) for _ in range(rng.randrange(1, 6))]
        ctx.history.observe(chain, [4] * len(chain))
        for key in chain:
            if key in tier:
                tier.lease(key, count=False).release()  # type: ignore[union-attr]
            else:
                put(tier, key)
                puts += 1
            assert len(tier) == min(16, puts) == len(policy)  # full once filled, never over
    assert tier.stats().evicted_chunks == puts - 16
    assert sorted(policy.order()) == sorted(k for k, _ in tier._index.items())


@pytest.mark.parametrize("name", SIM_POLICIES)
def test_disk_index_holds_exactly_its_byte_bound(name: str, context) -> None:
    ctx, clock = context
    index = LruIndex(PolicyIndex(make_policy(name, ctx, simulator=True)))
    rng = random.Random(5)
    capacity = 1000
    for step in range(500):
        clock.now = float(step)
        key, size = rng.randrange(80), rng.randrange(10, 120)
        ctx.history.observe([key], [4])
        if not index.touch(key):  # as DiskTier.put: evict until the new file fits, then index it
            while index.bytes_used + size > capacity and len(index):
                index.pop_oldest()
            index.add(key, size)
        assert index.bytes_used <= capacity
        assert index.bytes_used == sum(s for _, s in index.entries.items())
        assert len(index.entries.policy) == len(index)


@pytest.mark.parametrize("name", SIM_POLICIES)
def test_no_policy_names_a_pinned_chunk(name: str, context) -> None:
    ctx, clock = context
    tier = byteless_tier(8, make_policy(name, ctx, simulator=True))
    for key in range(8):
        clock.now = float(key)
        ctx.history.observe([key], [4])
        put(tier, key)
    leases = [tier.lease(key, count=False) for key in range(6)]  # pin six of eight
    for key in range(8, 30):
        clock.now = float(key)
        ctx.history.observe([key], [4])
        put(tier, key)
        assert all(k in tier for k in range(6))
    for lease in leases:
        lease.release()  # type: ignore[union-attr]


def test_lru_order_is_the_order_of_use() -> None:
    policy = LruPolicy()
    index: PolicyIndex[int] = PolicyIndex(policy)
    for key in "abc":
        index[key] = 1
    index.move_to_end("a")
    assert [k for k, _ in index.items()] == ["b", "c", "a"]
    assert index.popitem(last=False) == ("b", 1) and "b" not in index


def test_leaf_lru_evicts_the_deepest_chunk_of_the_oldest_request_first(context) -> None:
    ctx, clock = context
    index: PolicyIndex[int] = PolicyIndex(LeafLruPolicy(ctx.history))
    ctx.history.observe(["r", "a1", "a2"], [4, 4, 4])
    for key in ("r", "a1", "a2"):
        index[key] = 1
    clock.now = 1.0
    ctx.history.observe(["r", "b1"], [4, 4])
    index.move_to_end("r")
    index["b1"] = 1
    assert [index.popitem()[0] for _ in range(4)] == ["a2", "a1", "b1", "r"]


def test_s3fifo_keeps_a_reused_key_over_one_hit_wonders() -> None:
    index: PolicyIndex[int] = PolicyIndex(S3FifoPolicy())
    index["hot"] = 1
    index.move_to_end("hot")  # used again while in the small queue: promoted on its way out
    for key in range(20):
        index[key] = 1
        while len(index) > 10:
            index.popitem()
    assert "hot" in index


def test_belady_is_refused_outside_the_simulator(context) -> None:
    with pytest.raises(ConfigError, match="eviction must be one of"):
        make_policy("belady", context[0])
    with pytest.raises(ConfigError, match="reads the access history"):
        make_policy("learned", None)


@pytest.mark.parametrize("name", SIM_POLICIES)
def test_simulated_hits_never_exceed_what_was_asked(name: str, small_conversations) -> None:
    result = simulate(small_conversations, SimConfig(cpu_chunks=20, disk_chunks=60, policy=name))
    assert 0 < result.cpu_hit_tokens + result.disk_hit_tokens <= result.tokens
    assert result.cpu_evictions > 0 and result.disk_evictions > 0


def test_a_single_repeated_request_hits_in_full_after_the_first() -> None:
    trace = make_trace([[1, 2, 3]] * 4)
    result = simulate(trace, SimConfig(cpu_chunks=3, policy="lru"))
    assert result.cpu_hit_tokens == 3 * 12 and result.token_hit_rate == pytest.approx(0.75)


def test_a_warm_up_is_left_out_of_the_figures() -> None:
    trace = make_trace([[1, 2], [1, 2], [3, 4], [1, 2]])
    whole = simulate(trace, SimConfig(cpu_chunks=4, policy="lru"))
    later = simulate(trace, SimConfig(cpu_chunks=4, policy="lru", measure_from=2))
    assert whole.hit_blocks == 4 and whole.blocks == 8
    assert later.hit_blocks == 2 and later.blocks == 4 and later.tokens == 16 and later.token_hit_rate == 0.5
