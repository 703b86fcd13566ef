"""The one write-behind: its policy is a parameter (backpressure then a drop, or a drop at once), every
chunk given up or not taken is counted, and its sink writes a chunk that is an opaque blob as it is."""

from __future__ import annotations

import threading
import time

import pytest

from nencache.errors import ConfigError
from nencache.tiers.base import Distance, TierStats
from nencache.pool import MemoryPool
from nencache.tiers.memory import MemoryTier
from nencache.writer import Drop, LowerTier, TierSink, WriteBehind, WritePolicy
from tests.tiers.contract import make_blob, make_key


class Item:
    def __init__(self, name: str) -> None:
        self.name, self.released = name, False

    def release(self) -> None:
        self.released = True


def gated_writer(policy: WritePolicy) -> tuple[WriteBehind[Item], threading.Event, list[str]]:
    gate, written = threading.Event(), []

    def write(batch: list[Item]) -> int:
        gate.wait(10)
        written.extend(item.name for item in batch)
        return 0

    return WriteBehind(write, policy, batch=1), gate, written


def test_backpressure_waits_for_the_writer_and_loses_nothing() -> None:
    writer, gate, written = gated_writer(WritePolicy(5.0, Drop.OLDEST, max_pending=1))
    threading.Timer(0.2, gate.set).start()
    started = time.perf_counter()
    items = [Item(str(i)) for i in range(3)]
    assert all(writer.submit(item, writer.deadline()) for item in items)
    assert time.perf_counter() - started >= 0.15  # it waited for room
    assert writer.flush(10) and written == ["0", "1", "2"] and all(item.released for item in items)
    counts = writer.counts()
    assert (counts.submitted, counts.written, counts.dropped, counts.failed) == (3, 3, 0, 0)
    writer.close()


@pytest.mark.parametrize("drop, kept", [(Drop.OLDEST, "2"), (Drop.NEWEST, "1")])
def test_without_backpressure_a_full_queue_drops_at_once_per_policy(drop: Drop, kept: str) -> None:
    writer, gate, written = gated_writer(WritePolicy(0.0, drop, max_pending=2))
    first = Item("0")
    writer.submit(first)
    time.sleep(0.1)  # the writer holds item 0 (busy)
    started = time.perf_counter()
    second, third = Item("1"), Item("2")
    writer.submit(second)
    accepted = writer.submit(third)
    assert time.perf_counter() - started < 0.1  # never waited
    assert accepted == (drop is Drop.OLDEST)
    gate.set()
    assert writer.flush(10) is False  # a drop since the last flush is reported
    assert written == ["0", kept] and writer.counts().dropped == 1
    assert second.released and third.released
    assert writer.flush(10) is True  # and only once
    writer.close()


def test_a_failing_write_is_counted_never_raised() -> None:
    writer = WriteBehind(lambda batch: 1 / 0, WritePolicy())  # type: ignore[arg-type, return-value]
    item = Item("x")
    writer.submit(item)
    assert writer.flush(10) is False and writer.counts().failed == 1 and item.released
    writer.close()


def test_close_drops_and_counts_what_is_still_queued() -> None:
    writer, gate, _ = gated_writer(WritePolicy(0.0, Drop.OLDEST))
    items = [Item(str(i)) for i in range(3)]
    for item in items:
        writer.submit(item)
    writer.close(timeout=0.1)
    gate.set()
    counts = writer.counts()
    assert counts.dropped >= 1 and all(item.released for item in items[1:])


def test_policy_rejects_bad_values_with_the_config_key() -> None:
    with pytest.raises(ConfigError, match="write_wait_seconds"):
        WritePolicy(-1.0)
    with pytest.raises(ConfigError, match="write_queue_chunks"):
        WritePolicy(max_pending=0)


class ListTier:
    checks_payload = False
    publish_only = False
    distance = Distance.LOCAL

    def __init__(self, name: str, full_after: int = 1 << 30) -> None:
        self.name, self.items, self.full_after = name, [], full_after
        self._stats = TierStats()

    def put(self, items):
        for item in items:
            if len(self.items) >= self.full_after:
                self._stats.add(dropped=1)
            else:
                self.items.append(item)

    def stats(self):
        return self._stats.snapshot()


def test_a_tier_without_a_codec_gets_each_blob_as_memory_holds_it_and_failures_are_counted() -> None:
    memory = MemoryTier(MemoryPool(4 * 4096, 4096))  # no layout: these chunks could not be decoded here
    blobs = {make_key(i): make_blob(make_key(i), seed=i) for i in range(3)}
    memory.put(list(blobs.items()))
    a, b = ListTier("a"), ListTier("b", full_after=2)
    sink = TierSink([LowerTier(a, None), LowerTier(b, None)], lambda tier, exc: None)
    leases = [memory.lease(key) for key in blobs]
    assert sink(leases) == 1  # b was full for the third chunk
    assert [(key, bytes(blob)) for key, blob in a.items] == list(blobs.items()) and len(b.items) == 2
    assert all(isinstance(blob, memoryview) for _, blob in a.items)  # the pool pages themselves, not copies
    for lease in leases:
        lease.release()
