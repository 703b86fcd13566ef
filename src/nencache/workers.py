"""`Workers`: a thread pool started on first use, for the store's CPU work on several chunks at once.

Decoders and encoders (numba loops, torch copies) and file writes release the GIL, so chunks of one call
run side by side; a single chunk runs inline, with no hand-off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def core_threads(most: int = 4) -> int:
    """One thread per core, at most `most`."""
    return max(1, min(most, os.cpu_count() or 1))


class Workers:
    """`map(fn, items)` on `threads` threads named `name`, started by the first call with two or more items."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) < 2 or self.threads < 2:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix=self.name)
        return list(self._pool.map(fn, items))

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
