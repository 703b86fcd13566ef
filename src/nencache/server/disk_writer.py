"""`DiskWriter`: writes chunks the server received down to its disk tier, behind the replies.

The pages being written are pinned (leased) until written, so the queue is bounded: a put takes a
slot (`reserve`, on the event loop) before its chunk is queued, and waits for one only when the
disk has fallen `max_pending` chunks behind.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from nencache.tiers.base import Tier
from nencache.tiers.memory import ChunkLease

log = logging.getLogger("nencache.server")
_BATCH = 16


@dataclass(slots=True)
class DiskWriterStats:
    queued: int = 0
    written: int = 0
    errors: int = 0


class DiskWriter:
    """One background thread draining a bounded queue of (disk tier, key, pinned page view)."""

    def __init__(self, max_pending: int) -> None:
        self._queue: queue.Queue[tuple[Tier, bytes, ChunkLease, Any] | None] = queue.Queue()
        self._slots = asyncio.Semaphore(max(1, max_pending))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = DiskWriterStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="nencache-server-disk", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def reserve(self) -> None:
        """Wait for room in the queue (call on the event loop before `submit`)."""
        self._loop = asyncio.get_running_loop()
        await self._slots.acquire()

    def unreserve(self) -> None:
        """Give back a slot that was not used (on the event loop)."""
        self._slots.release()

    def submit(self, tier: Tier, key: bytes, lease: ChunkLease, view: Any) -> None:
        """Queue a write of `view` (the leased page's bytes) into a slot taken with `reserve`."""
        self._queue.put_nowait((tier, key, lease, view))
        with self._lock:
            self.stats.queued += 1

    def flush(self) -> None:
        """Wait until everything queued so far is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    self._queue.task_done()
                    break
                batch.append(item)
            self._write(batch)
            for _ in batch:
                self._queue.task_done()
            if stop:
                return

    def _write(self, batch: list[tuple[Tier, bytes, ChunkLease, Any]]) -> None:
        by_tier: dict[int, list[tuple[Tier, bytes, ChunkLease, Any]]] = {}
        for item in batch:
            by_tier.setdefault(id(item[0]), []).append(item)
        for items in by_tier.values():
            tier = items[0][0]
            try:
                tier.put([(key, view) for _, key, _, view in items])
                with self._lock:
                    self.stats.written += len(items)
            except Exception as exc:  # a full or failing disk loses only its copy; memory still holds the chunk
                with self._lock:
                    self.stats.errors += 1
                log.warning("disk tier write of %d chunks failed: %r", len(items), exc)
            finally:
                for _, _, lease, _ in items:
                    lease.release()
                if self._loop is not None and not self._loop.is_closed():
                    for _ in items:
                        self._loop.call_soon_threadsafe(self._slots.release)
