"""`LearnedPolicy`: evict the chunk whose next use the `ReuseModel` expects farthest away.

Ranking every resident chunk on each eviction would cost too much, so the policy ranks them all
at once, vectorised, and keeps the worst `1/rank_fraction` of them as a queue of victims; the queue
is used up before the next ranking. A victim used again since it was ranked (its last-access time
changed), removed, or pinned (`evictable` says no) is skipped, so a pinned chunk is never named.
A chunk counts as expected back no sooner than its parent, the deeper one goes first on ties, and a
chunk whose parent the tier no longer holds (an orphan) goes before all others: a chunk is useless
without its prefix.

Admission: a chunk inserted with an expectation farther than the least bad queued victim's goes to
the front of the queue, so it is the next one out; it never pushes out a chunk worth more. Which
lower tier keeps it is the same decision made by that tier's own `LearnedPolicy`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import numpy as np

from nencache.policy.base import Evictable, Key
from nencache.policy.history import AccessHistory
from nencache.policy.model import AGE_BINS_PER_OCTAVE, NUM_AGE_BINS, ReuseModel, age_bin

DEPTH_TIEBREAK = 1e-3  # seconds per level of depth: orders chunks of equal expectation, deepest first


class LearnedPolicy:
    """One tier's eviction order from a `ReuseModel` shared through an `AccessHistory`."""

    name = "learned"

    def __init__(self, history: AccessHistory, model: ReuseModel, *, rank_fraction: int = 32) -> None:
        self.history = history
        self.model = model
        self.rank_fraction = rank_fraction
        self._resident = bytearray(history.size)  # 1: the tier holds the key of this slot
        self._listed = bytearray(history.size)  # 1: the slot is in `_slots` or `_added`
        self._slots = np.zeros(0, dtype=np.int64)  # resident slots at the last ranking (some left since)
        self._added: list[int] = []  # slots that became resident since
        self._count = 0
        self._queue: deque[tuple[int, float]] = deque()  # (slot, its last access when ranked)
        self._threshold = np.inf  # expectation of the least bad queued victim
        self.rankings = 0
        self._position = np.zeros(0, dtype=np.int64)  # slot -> its index in the slots being ranked

    def insert(self, key: Key) -> None:
        history = self.history
        slot = history.slot_of.get(key)
        if slot is None:
            slot = history.slot(key)
        if slot >= len(self._resident):
            self._resident.extend(bytearray(history.size - len(self._resident)))
            self._listed.extend(bytearray(history.size - len(self._listed)))
        if not self._resident[slot]:
            self._resident[slot] = 1
            self._count += 1
            history.held[slot] += 1
            if not self._listed[slot]:
                self._listed[slot] = 1
                self._added.append(slot)
        if self._queue:  # admission: a chunk no better than the queued victims is the next one out
            last = history.last.item(slot)
            age = history.clock() - last
            column = 0 if age < 1.0 else min(NUM_AGE_BINS - 1, int(AGE_BINS_PER_OCTAVE * math.log2(age)) + 1)
            score = self.model.expected_rows[history.cls.item(slot)][column] + DEPTH_TIEBREAK * history.depth.item(slot)
            if score > self._threshold:
                self._queue.appendleft((slot, last))

    def touch(self, key: Key) -> None:
        """Recency lives in the history, fed per request; only a key no request was seen for (a cache whose
        engine reports no requests) gets its recency here, so that it is ordered least recently used first."""
        history = self.history
        slot = history.slot_of.get(key)
        if slot is not None and history.count.item(slot) == 0:
            history.last[slot] = history.clock()

    def remove(self, key: Key) -> None:
        slot = self.history.slot_of.get(key)
        if slot is not None and slot < len(self._resident) and self._resident[slot]:
            self._resident[slot] = 0
            self._count -= 1
            self.history.held[slot] -= 1

    def victim(self, evictable: Evictable) -> Key | None:
        for attempt in range(2):
            key = self._pop_valid(evictable)
            if key is not None:
                return key
            if attempt == 0:
                self._rank()
        return self._scan(evictable)  # every ranked candidate was pinned: the best unpinned one

    def order(self) -> Iterator[Key]:
        slots = self._ranked(self._resident_slots())
        keys = self.history.keys
        return iter([keys[s] for s in slots.tolist()])

    def __len__(self) -> int:
        return self._count

    # --- internals -------------------------------------------------------------------------------
    def _resident_slots(self) -> np.ndarray:
        """The resident slots (and `_slots` brought up to date with them)."""
        slots = np.concatenate((self._slots, np.array(self._added, dtype=np.int64))) if self._added else self._slots
        self._added = []
        resident = np.frombuffer(self._resident, dtype=np.uint8)[slots].astype(np.bool_)
        if not resident.all():
            np.frombuffer(self._listed, dtype=np.uint8)[slots[~resident]] = 0
            slots = slots[resident]
        self._slots = slots
        return slots

    def _expected(self, slots: np.ndarray) -> np.ndarray:
        """Seconds until each chunk's expected next use, from its class and the age of its last use."""
        history = self.history
        return self.model.expected[history.cls[slots], age_bin(history.clock() - history.last[slots])]

    def _score(self, slots: np.ndarray) -> np.ndarray:
        return self._expected(slots) + DEPTH_TIEBREAK * self.history.depth[slots]

    def _ranked(self, slots: np.ndarray) -> np.ndarray:
        self.history.refresh_learner()
        return slots[np.lexsort((slots, self.history.last[slots], -self._score(slots)))]

    def _rank(self) -> None:
        history = self.history
        history.refresh_learner()
        if len(self._resident) < history.size:  # parents may sit in slots this policy has not seen yet
            self._resident.extend(bytearray(history.size - len(self._resident)))
            self._listed.extend(bytearray(history.size - len(self._listed)))
        slots = self._resident_slots()
        if not len(slots):
            return
        take = min(len(slots), max(1, len(slots) // self.rank_fraction))
        scores = self._no_better_than_parents(slots, self._expected(slots))
        last = self.history.last[slots]
        if take < len(slots):  # the `take` worst; among equal scores at the cut, the least recently used
            cut = np.partition(scores, len(slots) - take)[len(slots) - take]
            worse, tied = np.flatnonzero(scores > cut), np.flatnonzero(scores == cut)
            tied = tied[np.lexsort((slots[tied], last[tied]))][: take - len(worse)]
            part = np.concatenate((worse, tied))
        else:
            part = np.arange(len(slots))
        part = part[np.lexsort((slots[part], last[part], -scores[part]))]  # worst first; ties: least recently used
        chosen = slots[part]
        last = self.history.last[chosen]
        self._queue = deque(zip(chosen.tolist(), last.tolist()))
        self._threshold = float(scores[part[-1]])
        self.rankings += 1

    def _no_better_than_parents(self, slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Scores where a chunk is expected back no sooner than its parent (it hits only with it), deeper
        chunks first on ties, and an orphan (its parent not held) first of all: it cannot hit."""
        position = self._position
        if len(position) < self.history.size:
            position = self._position = np.zeros(self.history.size, dtype=np.int64)
        position[slots] = np.arange(len(slots))
        parents = self.history.parent[slots]
        up = np.minimum(position[np.maximum(parents, 0)], len(slots) - 1)  # a stale position may lie past the end
        held = (parents >= 0) & (slots[up] == parents)  # the parent is among the held chunks
        scores = np.where(held, np.maximum(scores, scores[up]), scores)
        scores += DEPTH_TIEBREAK * self.history.depth[slots]
        scores[(parents >= 0) & ~held] = np.inf
        return scores

    def _pop_valid(self, evictable: Evictable) -> Key | None:
        """The first queued victim still resident, unused since ranking and evictable (pinned ones are
        dropped from the queue; the next ranking sees them again)."""
        queue, history, resident = self._queue, self.history, self._resident
        while queue:
            slot, stamp = queue[0]
            if resident[slot] and history.last.item(slot) == stamp:
                key = history.keys[slot]
                if evictable(key):
                    return key  # stays queued until the tier removes it
            queue.popleft()
        return None

    def _scan(self, evictable: Evictable) -> Key | None:
        keys = self.history.keys
        for slot in self._ranked(self._resident_slots()).tolist():
            if evictable(keys[slot]):
                return keys[slot]
        return None
