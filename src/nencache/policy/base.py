"""What an eviction policy is: the order in which a tier gives up the chunks it holds.

A tier (the memory tier, the disk tier's index) owns its chunks and its capacity; it tells its
policy which keys arrived, were used and left, and asks it for the next victim when it is full.
The policy never decides by itself to drop a chunk, so a tier's capacity is always the tier's.
Policies that look at the prefix structure of requests (leaf-first, learned) read it from a shared
`AccessHistory` (see `history.py`), which the cache feeds once per request.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Protocol, runtime_checkable

Key = Hashable
Evictable = Callable[[Key], bool]


@runtime_checkable
class EvictionPolicy(Protocol):
    """The eviction order of one tier's resident keys. Not thread-safe: the tier holds its lock."""

    name: str

    def insert(self, key: Key) -> None:
        """`key` became resident (it is not resident yet)."""

    def touch(self, key: Key) -> None:
        """A resident `key` was used."""

    def remove(self, key: Key) -> None:
        """A resident `key` left the tier (deleted, or evicted after `victim` named it)."""

    def victim(self, evictable: Evictable) -> Key | None:
        """The resident key to evict next among those `evictable` accepts (None: there is none).

        The key stays resident until the tier calls `remove`; `evictable` is False for pinned chunks
        (being read, or waiting to be written below), which are never named.
        """

    def order(self) -> Iterator[Key]:
        """Resident keys, the next victim first (as far as the policy knows without a clock)."""

    def __len__(self) -> int: ...


class Clock(Protocol):
    """Seconds on a monotonic scale: wall time in the cache, trace time in the simulator."""

    def __call__(self) -> float: ...
