"""`AccessHistory`: what the cache has seen of each chunk key, in arrays the policies score at once.

The cache feeds it once per request with the request's chain of chunk keys (`observe`): key `i` of
a chain is the chunk after key `i - 1`, so the chain gives each key its depth. For every key it
keeps, by slot: the time of its last access, its access count, its depth in the chain it was last
seen in, and the class the learner gave that access (from the count, whether the chunk is partial,
the chain's length and the gap since the access before). Keys seen again after a gap are the
training examples of the reuse model (`ReuseModel.learn`); keys not seen again are its open
(censored) examples. Nothing here looks at the future.

Memory: about 150 bytes a key. When `max_keys` keys are known, the older half of those no tier holds
is forgotten; keys the tiers hold are never forgotten (the history grows past `max_keys` for them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import numpy as np

from nencache.errors import ConfigError

Key = Hashable
OPEN_SAMPLE = 32768  # open examples a refresh of the learner looks at (every n-th of them beyond that)


class Learner(Protocol):
    """Told about each finished reuse interval and each forgotten key (see `ReuseModel`)."""

    def classify(self, count: np.ndarray, partial: np.ndarray, chain: int, gap: np.ndarray) -> np.ndarray: ...

    def learn(self, classes: np.ndarray, gaps: np.ndarray) -> None: ...

    def censor(self, classes: np.ndarray, ages: np.ndarray) -> None: ...

    def stale(self) -> bool: ...

    def refresh(self, open_classes: np.ndarray, open_ages: np.ndarray, weight: float = 1.0) -> None: ...


class AccessHistory:
    """Per-key features by slot; `slot_of` maps keys to slots. Not thread-safe: callers serialise."""

    def __init__(self, clock: Callable[[], float], *, chunk_tokens: int, max_keys: int = 1 << 18,
                 learner: Learner | None = None) -> None:
        if max_keys < 16:
            raise ConfigError(f"the access history needs room for at least 16 keys, got max_keys={max_keys}")
        self.clock = clock
        self.chunk_tokens = chunk_tokens
        self.max_keys = max_keys
        self.learner = learner
        self.slot_of: dict[Key, int] = {}
        self.keys: list[Key | None] = []
        self._free: list[int] = []
        self.requests = 0  # chains observed
        self.accesses = 0  # keys observed
        self._grow(min(1024, max_keys))

    def _grow(self, size: int) -> None:
        old = len(self.keys)

        def grown(array: np.ndarray | None, fill: float | int, dtype: type) -> np.ndarray:
            out = np.full(size, fill, dtype=dtype)
            if array is not None:
                out[:old] = array
            return out

        first = old == 0
        self.last = grown(None if first else self.last, -np.inf, np.float64)
        self.count = grown(None if first else self.count, 0, np.int64)
        self.depth = grown(None if first else self.depth, 0, np.int64)
        self.cls = grown(None if first else self.cls, 0, np.int64)
        self.parent = grown(None if first else self.parent, -1, np.int64)
        self.held = bytearray(self.held if not first else b"") + bytearray(size - old)  # tiers holding each key
        self.keys.extend([None] * (size - old))
        self._free.extend(range(size - 1, old - 1, -1))

    @property
    def size(self) -> int:
        """Slots allocated (arrays indexed by slot have this length)."""
        return len(self.keys)

    def slot(self, key: Key) -> int:
        """The slot of `key`, given a fresh one (last seen now, no accesses) if it is not known."""
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self._new_slot(key)
            self.last[slot] = self.clock()
        return slot

    def observe(self, keys: Sequence[Key], tokens: Sequence[int] | None = None, now: float | None = None) -> np.ndarray:
        """One request's chain of keys, root first, and each chunk's token count; returns their slots."""
        now = self.clock() if now is None else now
        get = self.slot_of.get
        slots = np.array([s if (s := get(k)) is not None else self._new_slot(k) for k in keys], dtype=np.int64)
        n = len(slots)
        if not n:
            return slots
        count = self.count[slots]
        seen = count > 0
        gaps = np.where(seen, now - self.last[slots], np.nan)
        learner = self.learner
        if learner is not None and seen.any():
            learner.learn(self.cls[slots[seen]], gaps[seen])
        count += 1
        self.count[slots] = count
        self.last[slots] = now
        self.depth[slots] = np.arange(n)
        self.parent[slots[1:]] = slots[:-1]
        self.parent[slots[0]] = -1
        if learner is not None:
            partial = np.zeros(n, dtype=np.bool_)  # only a chain's last chunk can be partial
            partial[-1] = tokens is not None and tokens[-1] < self.chunk_tokens
            self.cls[slots] = learner.classify(count, partial, n, gaps)
        self.requests += 1
        self.accesses += n
        return slots

    def refresh_learner(self) -> None:
        """Let the learner recompute its estimates if it has learned enough since it last did; the keys
        seen and not seen again since are its open examples."""
        if self.learner is not None and self.learner.stale():
            open_slots = np.flatnonzero(self.count > 0)
            stride = max(1, len(open_slots) // OPEN_SAMPLE)  # a fixed stride through the slots: deterministic
            sample = open_slots[::stride]
            self.learner.refresh(self.cls[sample], self.clock() - self.last[sample], weight=float(stride))

    def hold(self, slot: int) -> None:
        """A tier holds the key of `slot`: it is not forgotten while held (up to 255 tiers)."""
        self.held[slot] += 1

    def release(self, slot: int) -> None:
        self.held[slot] -= 1

    # --- internals -------------------------------------------------------------------------------
    def _new_slot(self, key: Key) -> int:
        if not self._free and self.size >= self.max_keys:
            self._forget()
        if not self._free:  # under the bound, or every key is held by a tier: the tiers' keys always fit
            self._grow(max(min(self.max_keys, self.size * 2), self.size + 1024))
        slot = self._free.pop()  # its fields hold their initial values (see `_grow` and `_forget`)
        self.slot_of[key] = slot
        self.keys[slot] = key
        return slot

    def _forget(self) -> None:
        """Free the older half of the slots no tier holds (their open reuse intervals end censored)."""
        loose = np.flatnonzero(np.frombuffer(self.held, dtype=np.uint8) == 0)
        if not len(loose):
            return
        order = loose[np.argsort(self.last[loose], kind="stable")]
        drop = order[: max(1, len(order) // 2)]
        seen = drop[self.count[drop] > 0]
        if self.learner is not None and len(seen):
            self.learner.censor(self.cls[seen], self.clock() - self.last[seen])
        for slot in drop.tolist():
            del self.slot_of[self.keys[slot]]
            self.keys[slot] = None
        self.parent[np.isin(self.parent, drop)] = -1
        self.last[drop], self.count[drop], self.depth[drop], self.cls[drop] = -np.inf, 0, 0, 0
        self.parent[drop] = -1
        self._free.extend(drop.tolist())
