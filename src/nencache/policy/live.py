"""`CachePolicies`: the policies of one live cache — its tiers' eviction, the history, learned prefetch.

`KVCache` builds one from its config, gives each tier `tier_policy()`, reports every request's chain
with `observe_request` (from `lookup(record=True)` or `note_request`), and calls `save`/`close`. With `prefetch: learned` a planned
promotion runs on a background thread at its due time, unless the chain came back before then.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from nencache.policy.base import EvictionPolicy
from nencache.policy.prefetch import PrefetchPlanner
from nencache.policy.registry import OBSERVING, PolicyContext, make_policy
from nencache.policy.state import load_model, save_model
from nencache.policy.wrappers import LockedPolicy, MeteredPolicy


class Chunk(Protocol):
    """What the policies read of a request's chunk (`ChunkSpan` is one)."""

    key: bytes

    @property
    def num_tokens(self) -> int: ...


class CachePolicies:
    """Eviction policies for the tiers of one cache, and the request history they share."""

    def __init__(self, eviction: str, prefetch: str, chunk_tokens: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.eviction = eviction
        self.chunk_tokens = chunk_tokens
        self.context = (PolicyContext.create(clock, chunk_tokens, learn=eviction == "learned" or prefetch != "off")
                        if eviction in OBSERVING or prefetch != "off" else None)
        self._first: MeteredPolicy | None = None  # the memory tier's: its residence sizes prefetch windows
        self.planner = (PrefetchPlanner(self.context.history, self.context.model)
                        if prefetch == "learned" and self.context is not None else None)
        self._plans: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def observing(self) -> bool:
        """Whether the policies learn from requests (`observe_request` does something)."""
        return self.context is not None

    def tier_policy(self) -> EvictionPolicy:
        """A new eviction policy for one tier (the first one asked for is the memory tier's)."""
        context = self.context
        if context is None:
            return make_policy(self.eviction, None)
        policy: EvictionPolicy = make_policy(self.eviction, context)
        if self._first is None:
            self._first = MeteredPolicy(policy, context.history)
            policy = self._first
        return LockedPolicy(policy, context.lock)

    def observe_request(self, chunks: Sequence[Chunk], promote: Callable[[list[Any]], object]) -> None:
        """A request's chunks, root first, as a lookup saw them; `promote(chunks)` is called if a prefetch
        of the full ones is planned and falls due before they are used again."""
        context = self.context
        if context is None or not chunks:
            return
        with context.lock:
            slots = context.history.observe([c.key for c in chunks], [c.num_tokens for c in chunks])
            if self.planner is None or self._first is None:
                return
            full = [i for i, c in enumerate(chunks) if c.num_tokens == self.chunk_tokens]
            if not full:
                return
            last_slot = int(slots[full[-1]])
            stamp = float(context.history.last[last_slot])  # the time `observe` gave this request
            due = self.planner.plan(slots[full], stamp, self._first.residence)
            if due is None:
                return
        todo = [chunks[i] for i in full]

        def run() -> None:
            with context.lock:
                if context.history.keys[last_slot] != todo[-1].key or context.history.last[last_slot] != stamp:
                    return  # the chain came back (or was forgotten) before the plan fell due
            promote(todo)

        self._schedule(due, run)

    def load(self, directory: Path | None) -> bool:
        """Adopt the model state saved in `directory` (the disk tier's), if there is one."""
        if directory is None or self.context is None or self.context.history.learner is None:
            return False
        with self.context.lock:
            return load_model(directory, self.context.model)

    def save(self, directory: Path | None) -> None:
        if (directory is not None and self.context is not None and self.context.history.learner is not None
                and directory.is_dir()):
            with self.context.lock:
                self.context.history.refresh_learner()
                save_model(directory, self.context.model)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._plans.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the prefetch timer ------------------------------------------------------------------------
    def _schedule(self, due: float, run: Callable[[], None]) -> None:
        with self._wake:
            if self._closed:
                return
            heapq.heappush(self._plans, (due, next(self._seq), run))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nencache-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _loop(self) -> None:
        clock = self.context.history.clock if self.context is not None else time.monotonic
        while True:
            with self._wake:
                while not self._closed and (not self._plans or self._plans[0][0] > clock()):
                    self._wake.wait(None if not self._plans else max(0.0, self._plans[0][0] - clock()))
                if self._closed:
                    return
                _, _, run = heapq.heappop(self._plans)
            try:
                run()
            except Exception:  # a failed prefetch is a miss later, never an error now
                pass
