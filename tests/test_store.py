"""The one chunk store: leading runs across tiers, fetch/check/decode/promote, the write-behind and the
guard (failures and corrupt chunks counted per tier, warned once, treated as misses), and its blob path
(pages received in place, written below and fetched back as bytes, never decoded)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from nencache.codecs import get_codec
from nencache.errors import PoolExhaustedError
from nencache.layout import KVLayout
from nencache.pool import MemoryPool
from nencache.store import Store, Want, leading_run
from nencache.tiers.base import Distance
from nencache.tiers.memory import MemoryTier, raw_page_bytes
from nencache.writer import Drop, LowerTier, WritePolicy
from tests.dict_tier import DictTier
from tests.tiers.contract import make_blob, make_key

LAYOUT = KVLayout(2, 2, 8, torch.float16)
TOKENS = 4


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(TOKENS), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make_store(*tiers: DictTier, pages: int = 16, policy: WritePolicy | None = WritePolicy(),
               codec: str = "raw") -> Store:
    page = raw_page_bytes(LAYOUT, TOKENS)
    memory = MemoryTier(MemoryPool(pages * page, page), LAYOUT)
    return Store(memory, [LowerTier(t, get_codec(codec)) for t in tiers], layout=LAYOUT, policy=policy)


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


@pytest.mark.parametrize("codec", ["raw", "int8", "fp8"])  # int8 and fp8 decode straight into `out`
def test_a_corrupt_chunk_is_dropped_counted_and_never_served(codec: str) -> None:
    disk = DictTier("disk")  # a tier that leaves the payload's checksum to the store
    store = make_store(disk, codec=codec)
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


# --- the blob path: chunks the store never decodes (the server's) -----------------------------------------
SCOPE = b"\x02ns"  # a layer's scope in front of the 16-byte chunk key, as the server's namespaces are


def blob_store(tier: DictTier, pages: int = 4, drop: Drop = Drop.OLDEST) -> Store:
    memory = MemoryTier(MemoryPool(pages * 4096, 4096))  # no layout: nothing here could decode a chunk
    return Store(memory, [LowerTier(tier, None)], policy=WritePolicy(0.0, drop))


def receive(store: Store, scoped_key: bytes, blob: bytes) -> bool:
    """A chunk received straight into a pool page, as the server receives a PUT body."""
    page = store.reserve_page(len(blob), store.deadline())
    store.memory.pool.page(page)[: len(blob)].numpy()[:] = np.frombuffer(blob, dtype=np.uint8)
    return store.commit_page(scoped_key, page, len(blob), store.deadline())


def test_committed_pages_are_written_below_as_they_are_and_commit_never_waits_on_a_stalled_tier() -> None:
    disk, gate = DictTier("disk"), threading.Event()
    real_put = disk.put
    disk.put = lambda items: (gate.wait(30), real_put(items))[1]  # type: ignore[method-assign]
    store = blob_store(disk, pages=4)
    blobs = {SCOPE + make_key(i): make_blob(make_key(i), seed=i) for i in range(10)}
    started = time.perf_counter()
    assert all(receive(store, k, b) for k, b in blobs.items())  # 10 chunks into 4 pages, nothing written yet
    assert time.perf_counter() - started < 5.0  # far under the tier's 30 s stall: nobody waited for it
    assert store.write_stats()["write_dropped"] >= 1  # the oldest pending writes were given up for room
    gate.set()
    assert store.flush(10) is False  # and that is said
    assert disk.blobs and all(disk.blobs[k] == blobs[k] for k in disk.blobs)  # byte for byte, never re-encoded
    assert SCOPE + make_key(9) in disk.blobs and SCOPE + make_key(9) in store.memory
    store.close()


def test_a_full_pool_refuses_the_new_chunk_at_once_under_drop_newest() -> None:
    disk, gate = DictTier("disk"), threading.Event()
    real_put = disk.put
    disk.put = lambda items: (gate.wait(30), real_put(items))[1]  # type: ignore[method-assign]
    store = blob_store(disk, pages=2, drop=Drop.NEWEST)
    for i in range(2):
        assert receive(store, SCOPE + make_key(i), make_blob(make_key(i)))
    started = time.perf_counter()
    with pytest.raises(PoolExhaustedError):
        store.reserve_page(1000, store.deadline())
    assert time.perf_counter() - started < 5.0
    gate.set()
    assert store.flush(10) and len(disk.blobs) == 2
    store.close()


def test_commit_page_refuses_a_page_that_is_not_a_whole_chunk_under_its_key() -> None:
    store = blob_store(DictTier("disk"))
    free = store.memory.pool.free_pages
    blob = make_blob(make_key(1))
    assert not receive(store, SCOPE + make_key(2), blob)  # stamped with another key
    assert not receive(store, SCOPE + make_key(1), blob[:-1])  # one byte short of its header's length
    assert not receive(store, SCOPE + make_key(1), b"\0" * len(blob))  # no header at all
    assert store.memory.pool.free_pages == free and len(store.memory) == 0  # every page given back
    assert store.flush(10) and store.write_stats()["written_chunks"] == 0
    store.close()


def test_fetch_blobs_promotes_bytes_and_a_failing_tier_is_a_counted_miss_warned_once(caplog) -> None:
    disk = DictTier("disk")
    store = blob_store(disk)
    found, absent = SCOPE + make_key(1), SCOPE + make_key(2)
    disk.blobs[found] = make_blob(make_key(1))
    got = store.fetch_blobs([found, absent])
    assert bytes(got[0]) == disk.blobs[found] and got[1] is None  # type: ignore[arg-type]
    lease = store.memory.lease(found)  # promoted as the bytes it is
    assert lease is not None and bytes(lease.blob()) == disk.blobs[found]
    lease.release()
    assert store.counters()["lower_hits"] == 1
    store.memory.clear()
    disk.broken = True
    with caplog.at_level(logging.WARNING, logger="nencache"):
        assert store.fetch_blobs([found]) == [None] and store.fetch_blobs([found]) == [None]
    assert sum("tier disk failed" in r.message for r in caplog.records) == 1
    assert store.tier_stats()["disk"]["errors"] == 2 and found not in store.memory
    store.close()


def test_fetch_blobs_drops_a_corrupt_or_misplaced_blob_and_counts_it() -> None:
    disk = DictTier("disk")  # checks no payload itself: the store does
    store = blob_store(disk)
    damaged = bytearray(make_blob(make_key(1)))
    damaged[-1] ^= 0xFF
    disk.blobs[SCOPE + make_key(1)] = bytes(damaged)
    disk.blobs[SCOPE + make_key(2)] = make_blob(make_key(3))  # a value stored under another key
    assert store.fetch_blobs([SCOPE + make_key(1), SCOPE + make_key(2)]) == [None, None]
    assert not disk.blobs and len(store.memory) == 0
    assert store.tier_stats()["disk"]["corrupt"] == 2 and store.counters()["lower_hits"] == 0
    store.close()


def test_delete_can_ask_the_lower_tiers_for_something_else() -> None:
    disk = DictTier("disk")
    store = blob_store(disk)
    receive(store, SCOPE + make_key(1), make_blob(make_key(1)))
    disk.blobs[SCOPE + make_key(5)] = make_blob(make_key(5))  # only below
    store.delete([SCOPE + make_key(1)], below=lambda tier: tier.clear())  # drains the write first
    assert len(store.memory) == 0 and not disk.blobs
    store.close()
