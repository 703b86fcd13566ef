"""The learned policy: never evicts a pinned chunk, decides the same way every time, learns from reuse."""

from __future__ import annotations

import numpy as np

from nencache.policy.learned import LearnedPolicy
from nencache.policy.model import ReuseModel
from nencache.policy.simulate import SimConfig, simulate
from nencache.policy.synthetic import ConversationModel, conversation_trace
from nencache.pool import MemoryPool
from nencache.tiers.memory import MemoryTier


def test_the_chunk_it_would_evict_first_stays_while_pinned(context) -> None:
    ctx, clock = context
    policy = LearnedPolicy(ctx.history, ctx.model)
    tier = MemoryTier(MemoryPool(6, 1, pin_memory=False), policy=policy)
    for step in range(40):  # chains whose partial last chunk is never seen again, whose full ones are
        clock.now = float(step)
        chain = [("root",), (step % 3, "full"), (step, "partial")]
        ctx.history.observe(chain, [4, 4, 2])
        for key in chain:
            if key in tier:
                tier.lease(key, count=False).release()
            else:
                tier.commit_page(key, tier.reserve_page(0), 0, 4)
    first = policy.victim(lambda key: True)
    assert first is not None
    lease = tier.lease(first, count=False)
    assert policy.victim(lambda key: key != first) != first
    for step in range(40, 60):
        clock.now = float(step)
        key = (step, "partial")
        ctx.history.observe([key], [2])
        tier.commit_page(key, tier.reserve_page(0), 0, 4)
        assert first in tier
    lease.release()


def test_decisions_are_the_same_on_every_run() -> None:
    trace = conversation_trace(ConversationModel(duration=600.0, rate=1.0, block_tokens=16), seed=11)
    runs = [simulate(trace, SimConfig(cpu_chunks=150, disk_chunks=600, policy="learned", prefetch="learned",
                                      prefetch_max_waste=0.9), record=True) for _ in range(2)]
    first, second = (r.as_dict() for r in runs)
    for timing in ("decision_seconds", "wall_seconds", "decision_us"):
        first.pop(timing), second.pop(timing)
    assert first == second and runs[0].per_request == runs[1].per_request
    other = conversation_trace(ConversationModel(duration=600.0, rate=1.0, block_tokens=16), seed=12)
    assert simulate(other, SimConfig(cpu_chunks=150, policy="learned"), record=True).per_request != runs[0].per_request


def test_it_learns_which_chunks_come_back() -> None:
    trace = conversation_trace(ConversationModel(duration=1200.0, rate=2.0, block_tokens=16), seed=3)
    capacity = trace.unique_blocks() // 50
    learned = simulate(trace, SimConfig(cpu_chunks=capacity, policy="learned")).token_hit_rate
    lru = simulate(trace, SimConfig(cpu_chunks=capacity, policy="lru")).token_hit_rate
    assert learned > lru * 1.1


def test_the_model_sees_partial_chunks_are_not_reused(context) -> None:
    ctx, clock = context
    for step in range(300):
        clock.now = float(step)
        ctx.history.observe([("root",), (step % 5, "full"), (step, "partial")], [4, 4, 1])
    ctx.history.refresh_learner()
    full, partial = ctx.history.cls[ctx.history.slot_of[(0, "full")]], ctx.history.cls[ctx.history.slot_of[(299, "partial")]]
    expected = ctx.model.expected
    assert expected[full, 1] < expected[partial, 1]  # the full chunk is expected back sooner


def test_saved_counts_load_into_a_fresh_model() -> None:
    model = ReuseModel()
    model.learn(np.array([3, 3, 7]), np.array([1.0, 30.0, 500.0]))
    model.refresh(np.array([3]), np.array([10.0]))
    fresh = ReuseModel()
    assert fresh.load_state({k: v.copy() for k, v in model.state().items()})
    assert np.array_equal(fresh.hits, model.hits) and fresh.hits.sum() == 3
    assert not fresh.load_state({"hits": np.zeros(3), "ends": np.zeros(3)})


def test_the_history_forgets_loose_keys_but_never_held_ones(context) -> None:
    ctx, clock = context
    history = type(ctx.history)(clock, chunk_tokens=4, max_keys=64, learner=ctx.model)
    policy = LearnedPolicy(history, ctx.model)
    for key in range(40):
        history.observe([("held", key)], [4])
        policy.insert(("held", key))
    for step in range(500):
        clock.now = float(step)
        history.observe([("loose", step)], [4])
    assert all(("held", key) in history.slot_of for key in range(40))
    assert len(history.slot_of) < 200 and ("loose", 499) in history.slot_of and ("loose", 0) not in history.slot_of
    for key in range(100):  # more held keys than max_keys: the history grows for them
        history.observe([("more", key)], [4])
        policy.insert(("more", key))
    assert len(policy) == 140 and all(("more", key) in history.slot_of for key in range(100))


def test_a_replay_of_the_calls_makes_the_same_decisions() -> None:
    import pytest

    from nencache.errors import NenCacheError
    from nencache.policy.calls import replay_calls

    trace = conversation_trace(ConversationModel(duration=300.0, rate=1.0, block_tokens=16), seed=4)
    calls: list[tuple] = []
    simulate(trace, SimConfig(cpu_chunks=60, policy="learned"), calls=calls)
    assert any(op == "victim" for op, *_ in calls)
    assert replay_calls(calls, "learned", 1, 16, learn=True, max_keys=1 << 16) >= 0.0
    index = next(i for i, call in enumerate(calls) if call[0] == "victim" and call[2] is not None)
    op, tier, key, now = calls[index]
    calls[index] = (op, tier, ("someone", "else"), now)
    with pytest.raises(NenCacheError, match="not deterministic"):
        replay_calls(calls, "learned", 1, 16, learn=True, max_keys=1 << 16)


def test_without_requests_reported_it_falls_back_to_least_recently_used(context) -> None:
    """Keys no request was observed for (an engine that reports none) all look alike to the model: the
    policy then orders them by their own recency."""
    ctx, clock = context
    tier = MemoryTier(MemoryPool(3, 1, pin_memory=False), policy=LearnedPolicy(ctx.history, ctx.model))
    for step, key in enumerate("abc"):
        clock.now = float(step)
        tier.commit_page(key, tier.reserve_page(0), 0, 4)
    clock.now = 3.0
    tier.lease("a", count=False).release()  # a is used again: b is now the least recently used
    for step, key in enumerate("def", start=4):
        clock.now = float(step)
        tier.commit_page(key, tier.reserve_page(0), 0, 4)
        assert "a" in tier or key == "f"
    assert "b" not in tier and "c" not in tier and "a" not in tier and set("def") <= {k for k, _ in tier._index.items()}


def test_ranking_after_the_held_chunks_shrink_evicts_the_orphan(context) -> None:
    """A chunk whose parent left since the last ranking is ranked first (it cannot hit without it), even
    though the parent's remembered position lies past the end of the smaller set."""
    ctx, _ = context
    policy = LearnedPolicy(ctx.history, ctx.model)
    tier = MemoryTier(MemoryPool(12, 1, pin_memory=False), policy=policy)
    chain = [("k", i) for i in range(10)]
    ctx.history.observe(chain, [4] * 10)
    for key in chain:
        tier.commit_page(key, tier.reserve_page(0), 0, 4)
    assert policy.victim(lambda key: True) is not None  # ranks all ten
    tier.delete(chain[:8])
    assert policy.victim(lambda key: key != chain[9]) == chain[8]  # ranks again, over two
