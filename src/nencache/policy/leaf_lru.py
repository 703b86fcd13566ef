"""`LeafLruPolicy`: least recently used first, and within one request the deepest chunk first.

A radix-tree cache (SGLang, vLLM's prefix cache) stamps every node of a matched path with the same
time and evicts leaves first: a chunk is useless without its prefix. Here each key carries the time
of the request it was last seen in (from the `AccessHistory`) and its depth; the victim is the key of
the oldest request, deepest first. Keys the history has not seen order by the time of their own use.
"""

from __future__ import annotations

from collections.abc import Iterator

from nencache.policy.base import Evictable, Key
from nencache.policy.heap import LazyHeap
from nencache.policy.history import AccessHistory


class LeafLruPolicy:
    """A heap of (request time, -depth) per resident key."""

    name = "leaf-lru"

    def __init__(self, history: AccessHistory) -> None:
        self.history = history
        self._heap = LazyHeap()

    def _push(self, key: Key) -> None:
        history = self.history
        slot = history.slot_of.get(key)
        if slot is None:
            self._heap.push(key, float(history.clock()), 0)
        else:
            self._heap.push(key, float(history.last[slot]), -int(history.depth[slot]))

    def insert(self, key: Key) -> None:
        self._push(key)

    def touch(self, key: Key) -> None:
        self._push(key)

    def remove(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, evictable: Evictable) -> Key | None:
        return self._heap.first(evictable)

    def order(self) -> Iterator[Key]:
        return self._heap.order()

    def __len__(self) -> int:
        return len(self._heap)
