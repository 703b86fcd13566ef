"""The one chunk store: leading runs across tiers, fetch/check/decode/promote, the write-behind and the
guard (failures and corrupt chunks counted per tier, warned once, treated as misses)."""

from __future__ import annotations

import logging
import threading

import torch

from nencache.codecs import RawCodec
from nencache.layout import KVLayout
from nencache.pool import MemoryPool
from nencache.store import Store, Want, leading_run
from nencache.tiers.base import Distance
from nencache.tiers.memory import MemoryTier, raw_page_bytes
from nencache.writer import Drop, LowerTier, WritePolicy
from tests.dict_tier import DictTier

LAYOUT = KVLayout(2, 2, 8, torch.float16)
TOKENS = 4


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(TOKENS), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make_store(*tiers: DictTier, pages: int = 16, policy: WritePolicy | None = WritePolicy()) -> Store:
    page = raw_page_bytes(LAYOUT, TOKENS)
    memory = MemoryTier(MemoryPool(pages * page, page), LAYOUT)
    return Store(memory, [LowerTier(t, RawCodec()) for t in tiers], layout=LAYOUT, policy=policy)


def put(store: Store, i: int) -> bool:
    return store.put(key(i), TOKENS, lambda target: target.copy_(chunk(i)), store.deadline())


def test_leading_run_asks_the_fastest_source_again_after_each_advance() -> None:
    asked: list[tuple[str, int]] = []
    held = {"fast": {0, 1, 4}, "slow": {2, 3, 5}}

    def source(name: str):
        def holds_from(start: int) -> int:
            asked.append((name, start))
            run = 0
            while start + run < 7 and start + run in held[name]:
                run += 1
            return run
        return holds_from

    assert leading_run(7, [source("fast"), source("slow")]) == 6
    assert asked[:4] == [("fast", 0), ("fast", 2), ("slow", 2), ("fast", 4)]


def test_tiers_are_asked_by_their_declared_distance_and_the_run_spans_them() -> None:
    remote, disk = DictTier("remote", Distance.REMOTE), DictTier("disk", Distance.LOCAL)
    store = make_store(remote, disk)
    assert [one.tier.name for one in store.lower] == ["disk", "remote"]
    for i in range(4):
        put(store, i)
    assert store.flush(10)
    store.memory.delete([key(1)])
    disk.delete([key(2)])
    store.memory.delete([key(2)])  # 0 in memory, 1 on disk, 2 only remote, 3 in memory
    assert store.contains_prefix([key(i) for i in range(4)]) == 4
    outs = [torch.empty(LAYOUT.shape(TOKENS), dtype=LAYOUT.dtype) for _ in range(4)]
    assert store.read([Want(key(i), TOKENS, o) for i, o in enumerate(outs)]) == [True] * 4
    assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))
    assert store.counters()["lower_hits"] == 2 and key(2) in store.memory  # promoted
    store.close()


def test_a_publish_only_tier_is_told_keys_and_gets_no_bytes() -> None:
    peer, disk = DictTier("p2p", Distance.PEER, publish_only=True), DictTier("disk")
    store = make_store(peer, disk)
    put(store, 1)
    assert store.flush(10)
    assert peer.puts == [[(key(1), b"")]] and len(disk.blobs[key(1)]) > 100
    store.close()


def test_a_failing_tier_is_counted_for_that_tier_warned_once_and_is_a_miss(caplog) -> None:
    disk = DictTier("disk")
    store = make_store(disk)
    disk.broken = True
    with caplog.at_level(logging.WARNING, logger="nencache"):
        for _ in range(3):
            assert store.contains_prefix([key(9)]) == 0
    assert [r.message for r in caplog.records].count("tier disk failed (ConnectionError('disk is down')); "
                                                     "treating it as a miss") == 1
    assert store.tier_stats()["disk"]["errors"] == 3 and store.counters()["tier_errors"] == 3
    store.close()


def test_a_corrupt_chunk_is_dropped_counted_and_never_served() -> None:
    disk = DictTier("disk")
    store = make_store(disk)
    put(store, 1)
    assert store.flush(10)
    store.memory.clear()
    blob = bytearray(disk.blobs[key(1)])
    blob[-1] ^= 0xFF
    disk.blobs[key(1)] = bytes(blob)
    out = torch.zeros(LAYOUT.shape(TOKENS), dtype=LAYOUT.dtype)
    assert store.read([Want(key(1), TOKENS, out)]) == [False]
    assert key(1) not in disk.blobs and store.tier_stats()["disk"]["corrupt"] == 1
    assert not torch.any(out != 0)
    store.close()


def test_prefetch_promotes_and_a_read_waits_for_it() -> None:
    disk = DictTier("disk")
    store = make_store(disk)
    for i in range(3):
        put(store, i)
    assert store.flush(10)
    store.memory.clear()
    assert store.prefetch([Want(key(i), TOKENS) for i in range(3)]).result(10) == 3
    assert all(key(i) in store.memory for i in range(3))
    store.close()


def test_a_full_pool_of_pending_writes_drops_the_oldest_under_the_policy() -> None:
    disk = DictTier("disk")
    gate = threading.Event()
    real_put = disk.put
    disk.put = lambda items: (gate.wait(10), real_put(items))[1]  # type: ignore[method-assign]
    store = make_store(disk, pages=2, policy=WritePolicy(0.0, Drop.OLDEST))
    assert all(put(store, i) for i in range(4))  # never waits: the oldest pending writes are given up
    assert store.write_stats()["write_dropped"] >= 1
    gate.set()
    assert store.flush(10) is False  # a write was lost since the last flush, and that is said
    store.close()


def test_pin_promotes_and_pins_the_leading_run() -> None:
    disk = DictTier("disk")
    store = make_store(disk)
    for i in range(2):
        put(store, i)
    assert store.flush(10)
    store.memory.clear()
    leases = store.pin([Want(key(0), TOKENS), Want(key(1), TOKENS), Want(key(7), TOKENS)])
    assert [lease.key for lease in leases] == [key(0), key(1)]
    for lease in leases:
        lease.release()
    store.close()
