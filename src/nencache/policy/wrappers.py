"""Policies around a policy: one that serialises calls on a shared lock, one that measures residence.

Tiers call their policy under their own lock; policies that share an `AccessHistory` (the memory
tier's and the disk tier's) must also not run at the same time as each other or as `observe`, so a
live cache wraps them in `LockedPolicy` on the history's lock. `MeteredPolicy` measures how long a
chunk stays in a tier after its last use, which tells the prefetch planner how long a promoted chunk
is likely to wait for its reuse before the tier gives it up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from nencache.policy.base import EvictionPolicy, Evictable, Key
from nencache.policy.history import AccessHistory


class LockedPolicy:
    """Every call of `inner` under `lock`."""

    __slots__ = ("inner", "lock", "name")

    def __init__(self, inner: EvictionPolicy, lock: threading.RLock) -> None:
        self.inner, self.lock, self.name = inner, lock, inner.name

    def insert(self, key: Key) -> None:
        with self.lock:
            self.inner.insert(key)

    def touch(self, key: Key) -> None:
        with self.lock:
            self.inner.touch(key)

    def remove(self, key: Key) -> None:
        with self.lock:
            self.inner.remove(key)

    def victim(self, evictable: Evictable) -> Key | None:
        with self.lock:
            return self.inner.victim(evictable)

    def order(self) -> Iterator[Key]:
        with self.lock:
            return self.inner.order()

    def __len__(self) -> int:
        return len(self.inner)


class MeteredPolicy:
    """`inner`, plus `residence`: a moving average of the age (since last use) of the keys that leave after
    a second or more."""

    __slots__ = ("inner", "history", "name", "residence")

    def __init__(self, inner: EvictionPolicy, history: AccessHistory) -> None:
        self.inner, self.history, self.name = inner, history, inner.name
        self.residence = 0.0

    def insert(self, key: Key) -> None:
        self.inner.insert(key)

    def touch(self, key: Key) -> None:
        self.inner.touch(key)

    def remove(self, key: Key) -> None:
        self.inner.remove(key)
        slot = self.history.slot_of.get(key)
        if slot is not None:
            age = self.history.clock() - float(self.history.last[slot])
            if age >= 1.0:  # chunks given up within their own request (not admitted) say nothing of a stay
                self.residence = age if self.residence == 0.0 else 0.99 * self.residence + 0.01 * age

    def victim(self, evictable: Evictable) -> Key | None:
        return self.inner.victim(evictable)

    def order(self) -> Iterator[Key]:
        return self.inner.order()

    def __len__(self) -> int:
        return len(self.inner)
