"""`LruPolicy`: least recently used first — the cache's behaviour before policies were pluggable."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from nencache.policy.base import Evictable, Key


class LruPolicy:
    """Resident keys in an `OrderedDict`, least recently used first."""

    name = "lru"
    __slots__ = ("_keys", "touch")

    def __init__(self) -> None:
        self._keys: OrderedDict[Key, None] = OrderedDict()
        # Mark `key` as used now: the dict's own method, so a hit runs no Python frame here.
        self.touch: Callable[[Key], None] = self._keys.move_to_end

    def insert(self, key: Key) -> None:
        self._keys[key] = None

    def remove(self, key: Key) -> None:
        self._keys.pop(key, None)

    def victim(self, evictable: Evictable) -> Key | None:
        return next((key for key in self._keys if evictable(key)), None)

    def order(self) -> Iterator[Key]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)
