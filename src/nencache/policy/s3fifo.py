"""`S3FifoPolicy`: S3-FIFO (Yang et al., SOSP'23), a small probation FIFO, a main FIFO and a ghost list.

New keys enter the small queue (a tenth of the tier). A key leaving the small queue moves to the main
queue if it was used again while there, else it is evicted and remembered in the ghost list; a key
inserted while remembered goes straight to the main queue. The main queue is a FIFO with a 2-bit
use counter per key: a used key goes round once more with its counter lowered (CLOCK-like).
Sizes are in keys, relative to the number of resident keys when the tier is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from nencache.policy.base import Evictable, Key

SMALL_SHARE = 0.1
MAX_FREQ = 3


class S3FifoPolicy:
    name = "s3fifo"

    def __init__(self) -> None:
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def insert(self, key: Key) -> None:
        self._freq[key] = 0
        if self._ghost.pop(key, 0) is None:
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)

    def remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is None:
            return
        if self._small.pop(key, 0) is None:
            self._ghost[key] = None
            while len(self._ghost) > max(1, len(self._freq)):
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def victim(self, evictable: Evictable) -> Key | None:
        for _ in range(2 * len(self._freq) + 2):
            from_small = self._small and len(self._small) >= SMALL_SHARE * len(self._freq) or not self._main
            queue = self._small if from_small else self._main
            if not queue:
                return None
            key = next(iter(queue))
            freq = self._freq[key]
            if from_small and freq >= 1:
                del self._small[key]
                self._main[key] = None
                self._freq[key] = 0
            elif not from_small and freq > 0:
                self._main.move_to_end(key)
                self._freq[key] = freq - 1
            elif evictable(key):
                return key
            else:
                queue.move_to_end(key)  # pinned: try it again after the others
        return None

    def order(self) -> Iterator[Key]:
        return iter(list(self._small) + list(self._main))

    def __len__(self) -> int:
        return len(self._freq)
