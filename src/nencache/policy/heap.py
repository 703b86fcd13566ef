"""`LazyHeap`: keys in a binary heap by a priority tuple; re-prioritising pushes anew, stale entries are
skipped (and the heap rebuilt when they outnumber the live ones)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from nencache.policy.base import Evictable, Key


class LazyHeap:
    """The smallest priority first; ties go to the key pushed first."""

    __slots__ = ("entries", "_heap", "_seq")

    def __init__(self) -> None:
        self.entries: dict[Key, tuple] = {}  # key -> its current (priority..., sequence)
        self._heap: list[tuple] = []
        self._seq = itertools.count()

    def push(self, key: Key, *priority: float) -> None:
        entry = (*priority, next(self._seq))
        self.entries[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._heap = [(*e, k) for k, e in self.entries.items()]
            heapq.heapify(self._heap)

    def discard(self, key: Key) -> bool:
        """Forget `key`; whether it was there."""
        return self.entries.pop(key, None) is not None

    def first(self, evictable: Evictable) -> Key | None:
        """The key of smallest priority that `evictable` accepts (it stays in the heap)."""
        heap, entries = self._heap, self.entries
        skipped = []
        found = None
        while heap:
            top = heap[0]
            key = top[-1]
            if entries.get(key) != top[:-1]:
                heapq.heappop(heap)
                continue
            if evictable(key):
                found = key
                break
            skipped.append(heapq.heappop(heap))
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def order(self) -> Iterator[Key]:
        return iter([k for k, _ in sorted(self.entries.items(), key=lambda item: item[1])])

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)
