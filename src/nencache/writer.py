"""`WriteBehind`: writes chunks held in the memory pool down to slower tiers, in the background.

Callers return as soon as a chunk is in the pool; one background thread writes it below. Each
pending write pins its chunk's page, so the queue *is* the pool: nothing else bounds how many writes
may wait (unless `WritePolicy.max_pending` does), and no write is given up while the pool still has
a page for the next chunk.

When the pool is full of pending writes, the one that needs a page calls `make_room`, and the
`WritePolicy` decides: wait up to `wait_seconds` for the writer to finish something (backpressure),
then give up either the oldest pending write or the new chunk. The same policy applies when
`max_pending` writes wait. Every chunk given up (`dropped`) or not taken by a tier (`failed`) is
counted, and `flush` answers False when any was since the previous `flush`.

Every store (`nencache.store`) has one; the policy is the only difference between its users: a
cache's store waits for the writer before it drops (`WritePolicy(write_wait_seconds, ...)`:
backpressure, then a drop); the server's never makes a PUT wait (`WritePolicy(0, ...)`: drop at
once). `WriteBehind` itself knows nothing of tiers or codecs: it drains pinned items through a
`write` callable. `TierSink` is that callable: each chunk into every tier below memory, encoded per
tier, or as the bytes it already is for a tier that takes chunks as they are (`LowerTier.codec` None).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from nencache.codecs import Codec
from nencache.codecs.base import EncodesInPlace
from nencache.errors import ConfigError
from nencache.tiers.base import Tier
from nencache.tiers.disk.io import aligned_array
from nencache.tiers.memory import ChunkLease
from nencache.workers import core_threads

log = logging.getLogger("nencache.writer")


class Drop(StrEnum):
    """Which write is given up when the pool (or `max_pending`) is full and the wait is over."""

    OLDEST = "oldest"  # the longest-waiting pending write; the new chunk is kept
    NEWEST = "newest"  # the new chunk; the pending writes are kept


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """What a full write-behind does: wait up to `wait_seconds` for the writer, then drop per `drop`.

    `max_pending`: most writes that may wait (None: as many as the pool has pages for).
    """

    wait_seconds: float = 1.0
    drop: Drop = Drop.OLDEST
    max_pending: int | None = None

    def __post_init__(self) -> None:
        if not self.wait_seconds >= 0:
            raise ConfigError(f"write_wait_seconds must be 0 or more seconds, got {self.wait_seconds}")
        if self.drop not in tuple(Drop):
            raise ConfigError(f"write_drop must be one of {', '.join(Drop)}, got {self.drop!r}")
        if self.max_pending is not None and self.max_pending < 1:
            raise ConfigError(f"write_queue_chunks must be at least 1 (or null: the pool), got {self.max_pending}")


class Pinned(Protocol):
    """A pending write: it holds its chunk's page until `release`."""

    def release(self) -> None: ...


@dataclass(slots=True)
class WriteCounts:
    """Chunks through the write-behind. After a flush, submitted == written + dropped + failed."""

    submitted: int = 0
    written: int = 0  # reached every tier below
    dropped: int = 0  # given up by the policy (or at close), never written
    failed: int = 0  # some tier below did not take it (error, disk full)
    pending: int = 0


P = TypeVar("P", bound=Pinned)


class WriteBehind(Generic[P]):
    """One background thread draining pinned items through `write` under a `WritePolicy`.

    `write(batch)` writes a batch and returns how many of its items some tier did not take (it should
    not raise; if it does, the whole batch counts as failed). `sync()`, run by `flush` after the queue
    drains, makes what was written durable and returns False if it could not.
    """

    def __init__(self, write: Callable[[list[P]], int], policy: WritePolicy, *,
                 sync: Callable[[], bool] | None = None, batch: int = 16, name: str = "nencache-writer") -> None:
        self._write = write
        self._sync = sync
        self.policy = policy
        self._batch = batch
        self._name = name
        self._queue: deque[P] = deque()
        self._busy = 0
        self._finished = 0  # batches finished so far: a waiter for room watches it move
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._counts = WriteCounts()
        self._lost_at_flush = 0

    # --- producers -------------------------------------------------------------------------------
    def deadline(self) -> float:
        """The end of a backpressure wait starting now (one per caller's operation, shared by its chunks)."""
        return time.monotonic() + self.policy.wait_seconds

    def submit(self, item: P, deadline: float | None = None) -> bool:
        """Queue a pinned item. With `max_pending` items waiting, the policy applies (waiting until
        `deadline` at most); False when the item itself was dropped (and released)."""
        given_up: P | None = None
        with self._cond:
            if self._closed:
                self._counts.submitted += 1
                self._counts.dropped += 1
                given_up = item
            else:
                if self._full_locked():
                    self._cond.wait_for(lambda: not self._full_locked(), self._left(deadline))
                    if self._full_locked():
                        given_up = self._give_up_locked(item)
                self._counts.submitted += 1
                if given_up is not item:
                    self._queue.append(item)
                    self._start_locked()
                    self._cond.notify_all()
        if given_up is not None:
            given_up.release()
        return given_up is not item

    @property
    def progress(self) -> int:
        """A count that moves each time the writer finishes a batch (and so unpins pages)."""
        with self._cond:
            return self._finished

    def make_room(self, deadline: float, since: int) -> bool:
        """The pool had no page for a new chunk (tried when `progress` was `since`): free one held by a
        pending write, per the policy.

        Waits until a pending write finishes (at once if one has since `since`) or `deadline` passes;
        then (policy `oldest`) drops the oldest queued write. True when a page was unpinned (try again);
        False when the new chunk should be skipped (policy `newest`, or nothing pending that could be
        dropped).
        """
        dropped: P | None = None
        with self._cond:
            if self._finished != since:
                return True
            if not self._queue and not self._busy:
                return False
            if self._cond.wait_for(lambda: self._finished != since, self._left(deadline)):
                return True
            if self.policy.drop is Drop.NEWEST or not self._queue:
                return False
            dropped = self._queue.popleft()
            self._counts.dropped += 1
        dropped.release()
        return True

    # --- state -----------------------------------------------------------------------------------
    def counts(self) -> WriteCounts:
        with self._cond:
            return replace(self._counts, pending=len(self._queue) + self._busy)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued item was handed to `write`; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Drain, then `sync`. True only if that finished in time and no item was dropped or failed
        since the previous `flush` (`counts()` says how many)."""
        ok = self.drain(timeout)
        if ok and self._sync is not None:
            ok = self._sync()
        with self._cond:
            lost = self._counts.dropped + self._counts.failed
            ok = ok and lost == self._lost_at_flush
            self._lost_at_flush = lost
        return ok

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout`), stop the thread; whatever is still queued is dropped and counted."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._counts.dropped += len(leftovers)
            self._cond.notify_all()
        for item in leftovers:
            item.release()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- internals -------------------------------------------------------------------------------
    def _full_locked(self) -> bool:
        limit = self.policy.max_pending
        return limit is not None and len(self._queue) + self._busy >= limit

    @staticmethod
    def _left(deadline: float | None) -> float:
        return 0.0 if deadline is None else max(0.0, deadline - time.monotonic())

    def _give_up_locked(self, item: P) -> P:
        """`max_pending` is reached and the wait is over: the item to release (counted as dropped)."""
        self._counts.dropped += 1
        if self.policy.drop is Drop.OLDEST and self._queue:
            return self._queue.popleft()
        return item

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                self._busy = len(batch)
            try:
                failed = min(len(batch), max(0, self._write(batch)))
            except Exception:  # a failing tier costs its writes, never the writer
                log.exception("%s: a write of %d chunks failed", self._name, len(batch))
                failed = len(batch)
            finally:
                for item in batch:
                    item.release()
            with self._cond:
                self._counts.written += len(batch) - failed
                self._counts.failed += failed
                self._busy = 0
                self._finished += 1
                self._cond.notify_all()


def put_counted(tier: Tier, items: Sequence[tuple[bytes, object]],
                on_error: Callable[[Tier, BaseException], None]) -> int:
    """`tier.put(items)`; how many of them the tier did not take (all on an exception, else the rise of
    its `dropped` counter, e.g. a full disk). Errors go to `on_error`, never up."""
    before = tier.stats().dropped
    try:
        tier.put(items)  # type: ignore[arg-type]
    except Exception as exc:
        on_error(tier, exc)
        return len(items)
    return min(len(items), max(0, tier.stats().dropped - before))


@dataclass(slots=True)
class LowerTier:
    """A byte tier below memory and the codec its chunks are written with; None: each chunk is written as
    the blob memory holds, never decoded (a store of opaque chunks, the server's)."""

    tier: Tier
    codec: Codec | None


# `each(fn, items)`: `[fn(item) for item in items]`, maybe on several threads (the store's encoders)
Each = Callable[[Callable[[list[ChunkLease]], int], Sequence[list[ChunkLease]]], list[int]]


class TierSink:
    """The `write` of the store's write-behind: pinned chunks, encoded once per codec, into every lower tier.

    When some tier takes an encoded copy, the batch's chunks go through `each` one by one: on several threads,
    one chunk is encoded while another's bytes go out. Otherwise the batch goes to the tiers whole (a disk
    tier then writes its chunks on its own I/O threads, a remote tier pipelines them).

    A `publish_only` tier is told the keys (empty values), nothing is encoded for it. `after_write(key)`
    runs for each chunk once every tier was asked (a store that only stages chunks then lets the pool
    forget it).
    """

    def __init__(self, tiers: Sequence[LowerTier], on_error: Callable[[Tier, BaseException], None],
                 after_write: Callable[[bytes], None] | None = None, each: Each | None = None) -> None:
        self.tiers = list(tiers)
        self._on_error = on_error
        self._after_write = after_write
        self._each: Each = each or (lambda fn, items: [fn(item) for item in items])
        self._cores = threading.BoundedSemaphore(core_threads())
        self._encodes = any(not one.tier.publish_only and one.codec is not None and not one.codec.zero_copy
                            for one in self.tiers)
        # chunks the write-behind hands over at once: encoding threads idle while a batch's last writes finish,
        # so a sink that encodes takes larger batches (benchmarks/RESULTS.md, "disk: fused int8 loops")
        self.batch = 64 if self._encodes else 16

    def __call__(self, batch: list[ChunkLease]) -> int:
        """Write `batch`; how many chunks some tier did not take (at most one count per chunk and tier,
        at most the batch)."""
        if not self._encodes:
            return self._write(batch)
        return sum(self._each(self._write, [[lease] for lease in batch]))

    def _write(self, batch: list[ChunkLease]) -> int:
        encoded: dict[str, list[tuple[bytes, object]]] = {}
        failed = 0
        for lower in self.tiers:
            if lower.tier.publish_only:
                failed += put_counted(lower.tier, [(lease.key, b"") for lease in batch], self._on_error)
                continue
            form = "" if lower.codec is None else lower.codec.name
            items = encoded.get(form)
            if items is None:
                try:
                    with self._cores:  # encodes share the cores; the threads beyond them wait on writes
                        items = [(lease.key, self._encode(lower.codec, lease)) for lease in batch]
                except Exception as exc:
                    self._on_error(lower.tier, exc)
                    failed += len(batch)
                    continue
                encoded[form] = items
            failed += put_counted(lower.tier, items, self._on_error)
        if self._after_write is not None:
            for lease in batch:
                self._after_write(lease.key)
        return min(failed, len(batch))

    def sync(self) -> bool:
        """Make every tier durable (`flush`); False if one failed (counted through `on_error`)."""
        ok = True
        for lower in self.tiers:
            try:
                lower.tier.flush()
            except Exception as exc:  # a failing tier is counted, never raised to the engine
                self._on_error(lower.tier, exc)
                ok = False
        return ok

    @staticmethod
    def _encode(codec: Codec | None, lease: ChunkLease) -> bytes | memoryview:
        """The chunk in `codec`'s bytes (None: the blob it is); a raw chunk goes out as its own pool page,
        header stamped in front. A codec that encodes in place writes into a page-aligned buffer, which a
        disk tier's direct I/O writes where it is (a `bytes` blob is copied into an aligned one first)."""
        if codec is None or (codec.zero_copy and not lease.entry.is_blob):
            return lease.blob()
        if isinstance(codec, EncodesInPlace) and not lease.entry.is_blob:
            reserved: list[np.ndarray] = []

            def reserve(nbytes: int) -> torch.Tensor:
                reserved.append(aligned_array(nbytes))
                return torch.from_numpy(reserved[-1])

            size = codec.encode_into(lease.tensor(), reserve, lease.key)
            return memoryview(reserved[0])[:size]
        return codec.encode(lease.tensor(), lease.key)
