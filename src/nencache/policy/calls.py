"""The policy calls of a replay, recorded and replayed alone: decision cost as CPU time.

Timing each call with a wall clock counts whatever else the machine runs while the call is on the
CPU's queue; on a busy machine that inflates fine-grained figures several times. Recording the calls
(with the clock at each) and replaying them, alone, through fresh policies lets the cost be measured
as the process's CPU time — and checks on the way that the replay makes the same decisions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from nencache.errors import NenCacheError
from nencache.policy.base import EvictionPolicy, Evictable, Key
from nencache.policy.registry import PolicyContext, make_policy
from nencache.policy.clock import SimClock

Call = tuple  # (op, tier, key or payload, clock)


class LoggedPolicy:
    """`inner`, with each call appended to `log` as (op, tier, key, clock())."""

    __slots__ = ("inner", "log", "tier", "clock", "name")

    def __init__(self, inner: EvictionPolicy, log: list[Call], tier: int, clock: SimClock) -> None:
        self.inner, self.log, self.tier, self.clock, self.name = inner, log, tier, clock, inner.name

    def insert(self, key: Key) -> None:
        self.log.append(("insert", self.tier, key, self.clock.now))
        self.inner.insert(key)

    def touch(self, key: Key) -> None:
        self.log.append(("touch", self.tier, key, self.clock.now))
        self.inner.touch(key)

    def remove(self, key: Key) -> None:
        self.log.append(("remove", self.tier, key, self.clock.now))
        self.inner.remove(key)

    def victim(self, evictable: Evictable) -> Key | None:
        key = self.inner.victim(evictable)
        self.log.append(("victim", self.tier, key, self.clock.now))
        return key

    def order(self) -> Iterator[Key]:
        return self.inner.order()

    def __len__(self) -> int:
        return len(self.inner)


def replay_calls(log: Sequence[Call], policy: str, tiers: int, chunk_tokens: int, *, learn: bool,
                 max_keys: int) -> float:
    """CPU seconds to replay `log` through fresh `policy` objects (one per tier) and their history.
    Raises if a victim differs from the recorded one (the policies must be deterministic)."""
    clock = SimClock()
    context = PolicyContext.create(clock, chunk_tokens, max_keys=max_keys, learn=learn)
    policies = [make_policy(policy, context, simulator=True) for _ in range(tiers)]
    observe = context.history.observe
    anything = lambda key: True  # noqa: E731 - nothing is pinned in a replay
    started = time.process_time()
    for op, tier, payload, now in log:
        clock.now = now
        if op == "observe":
            observe(payload[0], payload[1], now)
        elif op == "insert":
            policies[tier].insert(payload)
        elif op == "touch":
            policies[tier].touch(payload)
        elif op == "remove":
            policies[tier].remove(payload)
        elif policies[tier].victim(anything) != payload:
            raise NenCacheError(f"the {policy} policy chose another victim on replay: it is not deterministic")
    return time.process_time() - started
