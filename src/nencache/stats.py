"""`CacheCounters`: the token-level counters behind `KVCache.stats()`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class CacheCounters:
    """Lookups and their hit rate in chunks and tokens, stores (and chunks not stored), retrieves.

    What the lower tiers served and how often they failed is the store's to count (`Store.counters`)."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    hits: int = 0
    misses: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    store_failures: int = 0  # store calls that could not put every chunk into the pool
    store_skipped_chunks: int = 0  # chunks those calls did not store (the pool was pinned by readers and writes)
    retrieved_tokens: int = 0
    retrieved_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def count_lookup(self, tokens: int, matched: int, hit_chunks: int, missed_chunks: int) -> None:
        with self._lock:
            self.lookups += 1
            self.lookup_tokens += tokens
            self.hit_tokens += matched
            self.hits += hit_chunks
            self.misses += missed_chunks

    def count_retrieve(self, tokens: int, nbytes: int) -> None:
        with self._lock:
            self.retrieved_tokens += tokens
            self.retrieved_bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
