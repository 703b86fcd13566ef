"""The one write-behind: its policy is a parameter (backpressure then a drop, or a drop at once), every
chunk given up or not taken is counted, and `write_each` sends each chunk to the tier it names."""

from __future__ import annotations

import threading
import time

import pytest

from nencache.errors import ConfigError
from nencache.tiers.base import Distance, TierStats
from nencache.writer import Drop, WriteBehind, WritePolicy, write_each


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


class Lease:
    def release(self) -> None:
        pass


def test_write_each_puts_once_per_named_tier_and_counts_what_a_tier_did_not_take() -> None:
    from nencache.writer import TierWrite

    a, b = ListTier("a"), ListTier("b", full_after=1)
    batch = [TierWrite(a, b"1", Lease(), memoryview(b"x")), TierWrite(b, b"2", Lease(), memoryview(b"y")),  # type: ignore[arg-type]
             TierWrite(a, b"3", Lease(), memoryview(b"z")), TierWrite(b, b"4", Lease(), memoryview(b"w"))]  # type: ignore[arg-type]
    assert write_each(batch, lambda tier, exc: None) == 1  # b was full for its second chunk
    assert [k for k, _ in a.items] == [b"1", b"3"] and [k for k, _ in b.items] == [b"2"]
