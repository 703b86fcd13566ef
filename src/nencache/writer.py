"""`WriteBehind`: copies chunks from the memory pool down to the byte tiers in the background.

`store` returns once a chunk is in the pool; this writer encodes it and puts it into every lower
tier. The queue is bounded: when it is full, the oldest pending write is dropped and counted, so
the engine never waits on a disk or a network. Queued chunks stay pinned in the pool until written.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nencache.codecs import Codec, RawCodec
from nencache.tiers.base import Tier
from nencache.tiers.memory import ChunkLease

log = logging.getLogger("nencache.writer")


@dataclass(slots=True)
class LowerTier:
    """A byte tier below memory and the codec its chunks are written with.

    `keys_only`: the tier is told which keys were stored (`put` with empty values), nothing is encoded.
    """

    tier: Tier
    codec: Codec
    keys_only: bool = False


class WriteBehind:
    """One background thread draining a bounded queue of pinned chunks into the lower tiers."""

    def __init__(self, tiers: Sequence[LowerTier], max_pending: int, on_error: Callable[[Tier, BaseException], None],
                 after_write: Callable[[bytes], None] | None = None, batch: int = 16) -> None:
        self._tiers = list(tiers)
        self._max_pending = max_pending
        self._on_error = on_error
        self._after_write = after_write
        self._batch = batch
        self._queue: deque[ChunkLease] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0

    def submit(self, lease: ChunkLease) -> None:
        """Queue a pinned chunk; drops (and unpins) the oldest pending one when the queue is full."""
        dropped: ChunkLease | None = None
        with self._cond:
            if self._closed:
                lease.release()
                return
            if len(self._queue) >= self._max_pending:
                dropped = self._queue.popleft()
                self.dropped += 1
            self._queue.append(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nencache-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
        if dropped is not None:
            dropped.release()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk was handed to the tiers, then make the tiers durable."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._queue and not self._busy, timeout):
                return False
        for lower in self._tiers:
            try:
                lower.tier.flush()
            except Exception as exc:  # a failing tier is counted, never raised to the engine
                self._on_error(lower.tier, exc)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for lease in leftovers:
            lease.release()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                self._busy = len(batch)
            try:
                self._write(batch)
            finally:
                for lease in batch:
                    lease.release()
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()

    def _write(self, batch: list[ChunkLease]) -> None:
        encoded: dict[str, list[tuple[bytes, bytes]]] = {}
        for lower in self._tiers:
            try:
                if lower.keys_only:
                    lower.tier.put([(lease.key, b"") for lease in batch])
                    continue
                items = encoded.get(lower.codec.name)
                if items is None:
                    items = [(lease.key, self._encode(lower.codec, lease)) for lease in batch]
                    encoded[lower.codec.name] = items
                lower.tier.put(items)
            except Exception as exc:
                self._on_error(lower.tier, exc)
        self.written += len(batch)
        if self._after_write is not None:
            for lease in batch:
                self._after_write(lease.key)

    @staticmethod
    def _encode(codec: Codec, lease: ChunkLease) -> bytes | memoryview:
        """The chunk in `codec`'s bytes; a raw chunk goes out as its own pool page, header stamped in front."""
        if isinstance(codec, RawCodec) and not lease.entry.is_blob:
            return lease.blob()
        return codec.encode(lease.tensor(), lease.key)
