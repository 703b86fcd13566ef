"""`PolicyIndex`: a tier's key -> entry map whose eviction order an `EvictionPolicy` decides.

It speaks the part of `OrderedDict` the tiers used when their order was plain LRU (`move_to_end`
marks a use, `popitem(last=False)` takes the next victim), so a tier switches policy by the object
it builds, not by rewriting its bookkeeping. Iteration follows dictionary order; `items()` follows
the policy's eviction order (next victim first), as an `OrderedDict`'s did for LRU. Not thread-safe: the tier holds its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, KeysView, ValuesView
from typing import Generic, TypeVar

from nencache.policy.base import EvictionPolicy, Key
from nencache.policy.lru import LruPolicy

V = TypeVar("V")
_MISSING = object()


class PolicyIndex(Generic[V]):
    """Key -> entry, with `policy` told of every insert, use and removal."""

    __slots__ = ("_map", "policy")

    def __init__(self, policy: EvictionPolicy | None = None) -> None:
        self._map: dict[Key, V] = {}
        self.policy: EvictionPolicy = policy if policy is not None else LruPolicy()

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._map)

    def __getitem__(self, key: Key) -> V:
        return self._map[key]

    def get(self, key: Key, default: V | None = None) -> V | None:
        return self._map.get(key, default)

    def __setitem__(self, key: Key, value: V) -> None:
        """Insert `key` (a new key is a new resident for the policy; an existing one counts as used)."""
        fresh = key not in self._map
        self._map[key] = value
        if fresh:
            self.policy.insert(key)
        else:
            self.policy.touch(key)

    def use(self, key: Key) -> V | None:
        """The value of `key`, marked as used now; None when it is not held (`get` and `move_to_end` in one)."""
        value = self._map.get(key)
        if value is not None:
            self.policy.touch(key)
        return value

    def move_to_end(self, key: Key) -> None:
        """Mark `key` as used now."""
        if key in self._map:
            self.policy.touch(key)

    def pop(self, key: Key, default: object = _MISSING) -> V:
        if key in self._map:
            self.policy.remove(key)
            return self._map.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default  # type: ignore[return-value]

    def victim(self, evictable: Callable[[Key, V], bool] | None = None) -> Key | None:
        """The next key to evict among those `evictable(key, entry)` accepts; it stays indexed."""
        if evictable is None:
            return self.policy.victim(lambda key: True)
        entries = self._map
        return self.policy.victim(lambda key: evictable(key, entries[key]))

    def popitem(self, last: bool = False) -> tuple[Key, V]:
        """Remove and return the policy's next victim (`last` is accepted for `OrderedDict` callers)."""
        key = self.victim()
        if key is None:
            raise KeyError("popitem(): index is empty")
        return key, self.pop(key)

    def keys(self) -> KeysView[Key]:
        return self._map.keys()

    def values(self) -> ValuesView[V]:
        return self._map.values()

    def items(self) -> list[tuple[Key, V]]:
        """(key, entry) pairs in the policy's eviction order, the next victim first (a snapshot)."""
        return [(key, self._map[key]) for key in self.policy.order() if key in self._map]

    def clear(self) -> None:
        for key in list(self._map):
            self.policy.remove(key)
        self._map.clear()
