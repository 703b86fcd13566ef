"""`BeladyPolicy`: evict the key used farthest in the future — the offline optimum, for the simulator only.

It is told the future by the simulator: before each request's tier calls, `next_use` maps each key of
the request to (the index of the next request that uses it or infinity, its depth, its parent key).
A chunk counts only as part of a leading run, so a held chunk whose parent is not held (an orphan)
cannot hit at its next use: orphans go first, farthest first; then the farthest next use, deepest
first on ties.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from nencache.policy.base import Evictable, Key
from nencache.policy.heap import LazyHeap

Future = tuple[float, int, Key | None]  # (next request using the key, depth, parent key)


class BeladyPolicy:
    name = "belady"

    def __init__(self) -> None:
        self.next_use: dict[Key, Future] = {}  # set by the simulator before each request
        self._heap = LazyHeap()  # (-next use, -depth): the farthest, then the deepest, first
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, set[Key]] = {}
        self._orphans: set[Key] = set()

    def _push(self, key: Key) -> None:
        when, depth, _ = self.next_use.get(key, (math.inf, 0, None))
        self._heap.push(key, -when, -depth)

    def insert(self, key: Key) -> None:
        parent = self.next_use.get(key, (math.inf, 0, None))[2]
        self._parent[key] = parent
        if parent is not None:
            self._children.setdefault(parent, set()).add(key)
            if parent not in self._heap:
                self._orphans.add(key)
        self._orphans.difference_update(self._children.get(key, ()))
        self._push(key)

    def touch(self, key: Key) -> None:
        self._push(key)

    def remove(self, key: Key) -> None:
        if not self._heap.discard(key):
            return
        self._orphans.discard(key)
        self._orphans.update(c for c in self._children.get(key, ()) if c in self._heap)
        parent = self._parent.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent].discard(key)

    def victim(self, evictable: Evictable) -> Key | None:
        orphans = [k for k in self._orphans if evictable(k)]
        if orphans:
            return min(orphans, key=lambda k: self._heap.entries[k])
        return self._heap.first(evictable)

    def order(self) -> Iterator[Key]:
        return self._heap.order()

    def __len__(self) -> int:
        return len(self._heap)
