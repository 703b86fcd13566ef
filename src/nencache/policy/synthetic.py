"""Synthetic conversation traces: for tests, and to check that policies generalise beyond one trace.

Conversations arrive as a Poisson process. Each opens with a shared system-prompt block and a prompt
of its own; after each turn it continues with a probability that grows with the number of turns so
far (`continue_base`, `continue_growth`), after a log-normal think time, adding a few new blocks. The
blocks of a turn are the previous turn's full blocks plus new ones, as in a chat: the last block of
each request is partial, so it is never reused. Deterministic for a seed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from nencache.policy.trace import Trace, block_tokens_of


@dataclass(slots=True)
class ConversationModel:
    duration: float = 1800.0  # seconds of arrivals
    rate: float = 2.0  # new conversations per second
    first_blocks: tuple[int, int] = (2, 40)  # a first prompt's own blocks, uniform in [low, high)
    new_blocks: tuple[int, int] = (1, 6)  # blocks a later turn adds
    continue_base: float = 0.3
    continue_growth: float = 0.08  # added per turn, up to 0.9
    think_median: float = 90.0  # seconds between turns (median of a log-normal)
    think_sigma: float = 0.9
    block_tokens: int = 512


def conversation_trace(model: ConversationModel, seed: int) -> Trace:
    """A trace drawn from `model` with `seed` (the same seed, the same trace)."""
    rng = np.random.default_rng(seed)
    next_id = 1  # block 0: the shared system prompt
    events: list[tuple[float, int, list[int], int]] = []  # (time, order, full blocks so far, turn)
    order = 0
    t = 0.0
    while True:
        t += rng.exponential(1.0 / model.rate)
        if t >= model.duration:
            break
        own = int(rng.integers(*model.first_blocks))
        heapq.heappush(events, (t, order, [0] + list(range(next_id, next_id + own)), 0))
        next_id += own
        order += 1
    times: list[float] = []
    counts: list[int] = []
    ids: list[int] = []
    tokens: list[int] = []
    while events:
        when, _, blocks, turn = heapq.heappop(events)
        length = (len(blocks) - 1) * model.block_tokens + int(rng.integers(1, model.block_tokens))
        chain = blocks[:-1] + [next_id]  # the last block is partial: its id is this request's own
        next_id += 1
        times.append(when)
        counts.append(len(chain))
        ids.extend(chain)
        tokens.extend(block_tokens_of(length, len(chain), model.block_tokens))
        if rng.random() < min(0.9, model.continue_base + model.continue_growth * turn):
            added = int(rng.integers(*model.new_blocks))
            later = blocks + list(range(next_id, next_id + added))
            next_id += added
            think = float(rng.lognormal(np.log(model.think_median), model.think_sigma))
            heapq.heappush(events, (when + think, order, later, turn + 1))
            order += 1
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Trace(np.asarray(times), offsets, np.asarray(ids, dtype=np.int64), np.asarray(tokens, dtype=np.int64),
                 model.block_tokens)
