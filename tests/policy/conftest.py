"""Shared pieces of the policy tests: small traces and a policy context on a settable clock."""

from __future__ import annotations

import numpy as np
import pytest

from nencache.policy.registry import PolicyContext
from nencache.policy.simulate import SimClock
from nencache.policy.synthetic import ConversationModel, conversation_trace
from nencache.policy.trace import Trace, block_tokens_of


def make_trace(requests: list[list[int]], *, gap: float = 1.0, block_tokens: int = 4,
               partial_last: bool = False) -> Trace:
    """A trace of `requests` (block ids each), one every `gap` seconds; every block full unless `partial_last`."""
    counts = [len(r) for r in requests]
    offsets = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    tokens: list[int] = []
    for blocks in requests:
        length = len(blocks) * block_tokens - (1 if partial_last else 0)
        tokens.extend(block_tokens_of(length, len(blocks), block_tokens))
    return Trace(np.arange(len(requests), dtype=np.float64) * gap, offsets,
                 np.asarray([b for r in requests for b in r], dtype=np.int64), np.asarray(tokens, dtype=np.int64),
                 block_tokens)


@pytest.fixture
def small_conversations() -> Trace:
    return conversation_trace(ConversationModel(duration=300.0, rate=1.0, first_blocks=(2, 10), think_median=20.0,
                                                block_tokens=4), seed=7)


@pytest.fixture
def context() -> tuple[PolicyContext, SimClock]:
    clock = SimClock()
    return PolicyContext.create(clock, 4), clock
