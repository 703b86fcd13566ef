"""`PinnedPrefix`: a cached prefix held in the memory pool until its reader lets it go.

An engine looks a prompt up when the request is queued and loads its KV later, when blocks are
allocated for it. Between the two, another request's stores may evict the chunks, a disk file may
be damaged, a Redis server may go away. `KVCache.pin_prefix` closes that window: it brings the
prefix into the pool (from whichever tier holds it, checking each chunk) and pins every chunk, so
what the lookup promised is exactly what the load finds. Release it when the load is done or the
request is gone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from nencache.tiers.memory import ChunkLease


@dataclass(frozen=True, slots=True)
class PinnedChunk:
    """Tokens `[start, end)` of the prefix, pinned in one pool page."""

    start: int
    end: int
    lease: ChunkLease

    def tensor(self) -> torch.Tensor:
        """The chunk as `[layers, 2, end - start, heads, dim]` (a view of its page for raw chunks)."""
        return self.lease.tensor()


@dataclass(slots=True)
class PinnedPrefix:
    """The first `tokens` tokens of a prompt, pinned chunk by chunk until `release()`."""

    tokens: int
    chunks: list[PinnedChunk] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _released: bool = False

    def release(self) -> None:
        """Unpin every chunk (safe to call more than once, from any thread)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        for chunk in self.chunks:
            chunk.lease.release()

    @property
    def released(self) -> bool:
        return self._released
