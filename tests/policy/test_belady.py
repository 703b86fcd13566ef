"""Belady is optimal: on small hand-made prefix traces it hits as much as the best of all eviction choices
that the memory tier allows (it takes a page for an incoming chunk by evicting a chunk it holds)."""

from __future__ import annotations

import random
from functools import lru_cache

import pytest

from nencache.policy.simulate import SimConfig, simulate

from tests.policy.conftest import make_trace


def best_possible(requests: list[list[int]], capacity: int) -> int:
    """Most leading-run hits (in blocks) over every choice of victim, with the tier's own rules: each
    request's blocks after its run are stored in order, and a full tier evicts a held block to take one."""

    @lru_cache(maxsize=None)
    def best(index: int, position: int, held: frozenset[int]) -> int:
        if index == len(requests):
            return 0
        blocks = requests[index]
        if position == 0:  # the request's lookup: its leading run hits
            run = next((i for i, b in enumerate(blocks) if b not in held), len(blocks))
            return run + best(index, run if run else -1, held) if run < len(blocks) else run + best(index + 1, 0, held)
        position = max(position, 0)
        if position == len(blocks):
            return best(index + 1, 0, held)
        block = blocks[position]
        if block in held:
            return best(index, position + 1, held)
        if len(held) < capacity:
            return best(index, position + 1, held | {block})
        return max(best(index, position + 1, (held - {victim}) | {block}) for victim in held)

    return best(0, 0, frozenset())


def random_prefix_trace(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    chains = [[0] + [10 * c + i for i in range(1, 5)] for c in range(1, 4)]  # three conversations under one root
    return [rng.choice(chains)[: rng.randrange(1, 6)] for _ in range(7)]


HAND_MADE = [
    [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [1, 2]],  # keeping an orphan (5 without 4) is worth nothing
    [[0, 1, 2], [0, 3, 4], [0, 1, 2, 5], [0, 3], [0, 1]],
    [[7, 8, 9, 10], [7, 8], [11], [7, 8, 9], [11], [7]],
    [[0, 11, 12], [0, 21], [0, 11, 12, 13], [0, 21, 22], [0, 11], [0, 21, 22]],
]


@pytest.mark.parametrize("requests", HAND_MADE)
@pytest.mark.parametrize("capacity", [2, 3, 4])
def test_belady_matches_the_brute_force_optimum(requests: list[list[int]], capacity: int) -> None:
    result = simulate(make_trace(requests), SimConfig(cpu_chunks=capacity, policy="belady"))
    assert result.hit_blocks == best_possible(requests, capacity)


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_within_a_block_of_the_optimum_and_above_every_online_policy(seed: int) -> None:
    """Farthest-next-use is not always exactly optimal for prefix hits (a chunk's worth depends on its
    parent being held); on random small traces it is at most one block short, and never below a policy
    that cannot see the future."""
    requests = random_prefix_trace(seed)
    for capacity in (2, 3, 4):
        belady = simulate(make_trace(requests), SimConfig(cpu_chunks=capacity, policy="belady")).hit_blocks
        assert best_possible(requests, capacity) - 1 <= belady
        for online in ("lru", "leaf-lru", "s3fifo", "learned"):
            assert simulate(make_trace(requests), SimConfig(cpu_chunks=capacity, policy=online)).hit_blocks <= belady


def test_lru_falls_short_of_the_optimum_where_belady_does_not() -> None:
    requests = [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [1, 2]]
    lru = simulate(make_trace(requests), SimConfig(cpu_chunks=3, policy="lru")).hit_blocks
    assert lru < best_possible(requests, 3)
