"""KVCache over lower tiers: write-behind, promotion, prefetch, corrupt bytes, failing and slow tiers.

The lower tier here is a second `MemoryTier` (a real byte tier); the fault-injecting wrappers only add
delays or exceptions around it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.format import HEADER_SIZE
from nencache.pool import MemoryPool
from nencache.tiers.base import Distance, TierStats
from nencache.tiers.memory import MemoryTier, raw_page_bytes

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16)
CHUNK = 16


def make_kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def byte_tier(name: str = "lower") -> MemoryTier:
    tier = MemoryTier(MemoryPool(256 * 4096, 4096))
    tier.name = name
    return tier


class FaultyTier:
    """Wraps a tier; `fail` makes every call raise, `delay` makes every put slow."""

    checks_payload = False
    publish_only = False
    distance = Distance.LOCAL

    def __init__(self, inner: MemoryTier) -> None:
        self.inner, self.name, self.fail, self.delay = inner, "faulty", False, 0.0

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("tier is down")

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check()
        return self.inner.contains_prefix(keys)

    def get(self, keys):
        self._check()
        return self.inner.get(keys)

    def put(self, items) -> None:
        time.sleep(self.delay)
        self._check()
        self.inner.put(items)

    def delete(self, keys) -> None:
        self._check()
        self.inner.delete(keys)

    def clear(self) -> None:
        self._check()
        self.inner.clear()

    def flush(self) -> None:
        self._check()

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def make_cache(tier, **kwargs) -> KVCache:
    config = CacheConfig(chunk_size=CHUNK, cpu_size=40 * raw_page_bytes(LAYOUT, CHUNK), **kwargs)
    return KVCache(config, LAYOUT, model_id="m", lower_tiers=[(tier, "raw")])


def test_write_behind_then_lower_tier_hit_is_exact_and_promoted() -> None:
    lower = byte_tier()
    with make_cache(lower) as cache:
        ids = list(range(70))
        cache.store(ids, make_kv(70))
        assert cache.flush(timeout=10)
        assert len(lower) == 5
        cache.memory.clear()
        assert cache.lookup(ids) == 70
        assert torch.equal(cache.retrieve(ids), make_kv(70))
        assert len(cache.memory) == 5  # promoted
        assert cache.stats()["lower_hits"] == 5


def test_prefetch_promotes_before_retrieve() -> None:
    lower = byte_tier()
    with make_cache(lower) as cache:
        ids = list(range(64))
        cache.store(ids, make_kv(64, seed=2))
        cache.flush()
        cache.memory.clear()
        assert cache.prefetch(ids).result(timeout=10) == 4
        reads = lower.stats().hits
        assert torch.equal(cache.retrieve(ids), make_kv(64, seed=2))
        assert lower.stats().hits == reads  # served from memory, the lower tier was not asked again


def test_retrieve_waits_for_an_inflight_prefetch() -> None:
    lower = FaultyTier(byte_tier())
    with make_cache(lower) as cache:
        ids = list(range(64))
        cache.store(ids, make_kv(64, seed=3))
        cache.flush()
        cache.memory.clear()
        original_get = lower.get
        lower.get = lambda keys: (time.sleep(0.2), original_get(keys))[1]
        future = cache.prefetch(ids)
        assert torch.equal(cache.retrieve(ids), make_kv(64, seed=3))
        assert future.done() and future.result() == 4


def test_corrupt_lower_chunk_is_a_counted_miss_never_a_wrong_tensor() -> None:
    lower = byte_tier()
    with make_cache(lower) as cache:
        ids = list(range(48))
        cache.store(ids, make_kv(48))
        cache.flush()
        cache.memory.clear()
        keys = list(lower._index)  # noqa: SLF001 - reach into the tier to damage one stored chunk
        entry = lower._index[keys[1]]
        page = lower.pool.page(entry.page)
        page[HEADER_SIZE + 5] ^= 0xFF
        out = torch.zeros(LAYOUT.shape(48), dtype=LAYOUT.dtype)
        assert cache.retrieve_prefix(ids, out=out) == 16
        assert torch.equal(out[:, :, :16], make_kv(48)[:, :, :16])
        assert cache.stats()["tiers"]["lower"]["corrupt"] == 1  # counted by the store, the one that found it
        assert keys[1] not in lower  # removed
        assert cache.lookup(ids) == 16


def test_failing_tier_degrades_to_memory_only() -> None:
    lower = FaultyTier(byte_tier())
    with make_cache(lower) as cache:
        lower.fail = True
        ids = list(range(64))
        cache.store(ids, make_kv(64))
        cache.flush()
        assert cache.lookup(ids) == 64
        assert torch.equal(cache.retrieve(ids), make_kv(64))
        assert cache.lookup(list(range(500, 600))) == 0  # a miss everywhere, no exception
        cache.invalidate()
        stats = cache.stats()
        assert stats["tier_errors"] >= 2 and stats["tiers"]["faulty"]["errors"] >= 2
        lower.fail = False
        cache.store(ids, make_kv(64))
        cache.flush()
        cache.memory.clear()
        assert cache.lookup(ids) == 64  # the tier is used again once it works


def test_a_capped_write_queue_without_backpressure_drops_the_oldest_and_never_blocks() -> None:
    lower = FaultyTier(byte_tier())
    lower.delay = 0.2
    with make_cache(lower, write_queue_chunks=2, write_wait_seconds=0) as cache:
        started = time.perf_counter()
        for i in range(8):
            cache.store(list(range(i * 100, i * 100 + CHUNK)), make_kv(CHUNK, seed=i))
        assert time.perf_counter() - started < 0.5  # with no wait allowed, the engine never waits on the slow tier
        dropped = cache.stats()["write_dropped"]
        assert dropped >= 4
        assert cache.flush() is False
        assert len(lower.inner) == 8 - dropped
        assert all(cache.lookup(list(range(i * 100, i * 100 + CHUNK))) for i in range(8))


def test_a_capped_write_queue_waits_for_the_writer_before_it_drops() -> None:
    lower = FaultyTier(byte_tier())
    lower.delay = 0.05
    with make_cache(lower, write_queue_chunks=2, write_wait_seconds=5.0) as cache:
        for i in range(8):
            cache.store(list(range(i * 100, i * 100 + CHUNK)), make_kv(CHUNK, seed=i))
        assert cache.flush(timeout=10) is True
        assert cache.stats()["write_dropped"] == 0 and len(lower.inner) == 8


def test_without_local_cpu_the_pool_only_stages() -> None:
    lower = byte_tier()
    with make_cache(lower, local_cpu=False) as cache:
        ids = list(range(32))
        cache.store(ids, make_kv(32))
        cache.flush()
        deadline = time.time() + 5
        while len(cache.memory) and time.time() < deadline:
            time.sleep(0.01)
        assert len(cache.memory) == 0 and len(lower) == 2
        assert cache.lookup(ids) == 32


def test_concurrent_stores_and_retrieves_stay_exact() -> None:
    lower = byte_tier()
    errors: list[BaseException] = []
    with make_cache(lower) as cache:
        def worker(seed: int) -> None:
            try:
                for round_ in range(20):
                    ids = list(range(seed * 10_000 + round_ * 100, seed * 10_000 + round_ * 100 + 40))
                    kv = make_kv(40, seed=seed * 100 + round_)
                    cache.store(ids, kv)
                    out = torch.empty_like(kv)
                    got = cache.retrieve_prefix(ids, out=out)
                    assert torch.equal(out[:, :, :got], kv[:, :, :got])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


class CountingTier(FaultyTier):
    """Records the keys of every `get`."""

    def __init__(self, inner: MemoryTier) -> None:
        super().__init__(inner)
        self.gets: list[list[bytes]] = []

    def get(self, keys):
        self.gets.append(list(keys))
        return super().get(keys)


def test_lower_tier_reads_come_in_batches_and_stop_at_the_first_gap(monkeypatch) -> None:
    import nencache.cache
    import nencache.store

    # batches are sized by the bytes read: two chunks' blobs (header included)
    monkeypatch.setattr(nencache.store, "FETCH_BATCH_BYTES", 2 * (LAYOUT.nbytes(CHUNK) + HEADER_SIZE))
    lower = CountingTier(byte_tier())
    with make_cache(lower, local_cpu=False) as cache:
        ids = list(range(10 * CHUNK))
        kv = make_kv(len(ids), seed=5)
        cache.store(ids, kv)
        assert cache.flush(timeout=10)
        assert torch.equal(cache.retrieve(ids), kv)
        assert [len(g) for g in lower.gets] == [2] * 5
        lower.gets.clear()
        spans = nencache.cache.chunk_spans(nencache.cache.token_array(ids), CHUNK, cache.namespace,
                                           include_partial=True)
        lower.inner.delete([spans[4].key])  # chunk 4 of 10 is gone: the prefix ends there
        out = torch.zeros_like(kv)
        assert cache.retrieve_prefix(ids, out=out) == 4 * CHUNK
        assert torch.equal(out[:, :, : 4 * CHUNK], kv[:, :, : 4 * CHUNK])
        keys = [k for g in lower.gets for k in g]
        assert spans[4].key in keys and spans[8].key not in keys  # at most one batch read ahead past the gap


class CheckingTier(FaultyTier):
    """Says its `get` verifies payload checksums (as DiskTier and RedisTier do)."""

    checks_payload = True


def _payload_checksums_on_retrieve(tier, monkeypatch) -> int:
    import nencache.format

    calls = []
    real = nencache.format.checksum
    with make_cache(tier, local_cpu=False) as cache:
        ids = list(range(3 * CHUNK))
        kv = make_kv(len(ids), seed=9)
        cache.store(ids, kv)
        assert cache.flush(timeout=10)
        monkeypatch.setattr(nencache.format, "checksum", lambda payload: calls.append(1) or real(payload))
        assert torch.equal(cache.retrieve(ids), kv)
        monkeypatch.setattr(nencache.format, "checksum", real)
    return len(calls)


def test_payload_checked_once_when_the_tier_checks_it(monkeypatch) -> None:
    assert _payload_checksums_on_retrieve(FaultyTier(byte_tier()), monkeypatch) == 3  # the cache checks each
    assert _payload_checksums_on_retrieve(CheckingTier(byte_tier()), monkeypatch) == 0  # the tier did already


class GatedTier(FaultyTier):
    """Every `put` waits until `gate` is set: a lower tier that has stopped taking writes for a while."""

    def __init__(self, inner: MemoryTier) -> None:
        super().__init__(inner)
        self.gate = threading.Event()

    def put(self, items) -> None:
        self.gate.wait(30)
        super().put(items)


def big_byte_tier() -> MemoryTier:
    tier = MemoryTier(MemoryPool(2048 * 4096, 4096))
    tier.name = "lower"
    return tier


def one_chunk_prompts(count: int, start: int = 0) -> list[list[int]]:
    return [list(range(i * 1000, i * 1000 + CHUNK)) for i in range(start, start + count)]


def test_a_pool_full_of_pending_writes_waits_then_drops_the_oldest_and_flush_says_so() -> None:
    lower = GatedTier(big_byte_tier())
    with make_cache(lower, write_wait_seconds=0.3) as cache:  # 40 pages; default drop: the oldest
        for i, ids in enumerate(one_chunk_prompts(40)):
            assert cache.store(ids, make_kv(CHUNK, seed=i)) == 1  # every page now pins a pending write
        started = time.perf_counter()
        ids = list(range(900_000, 900_000 + 5 * CHUNK))
        assert cache.store(ids, make_kv(5 * CHUNK, seed=99)) == 5
        waited = time.perf_counter() - started
        assert 0.3 <= waited < 2.0  # backpressure, bounded by write_wait_seconds for the whole call
        stats = cache.stats()
        assert stats["write_dropped"] == 5 and stats["store_skipped_chunks"] == 0
        lower.gate.set()
        assert cache.flush(timeout=10) is False  # five chunks never reached the tier
        assert lower.inner.stats().stored_chunks == 40
        assert cache.stats()["write_dropped"] + lower.inner.stats().stored_chunks == cache.stats()["stored_chunks"]
        assert cache.flush(timeout=10) is True  # nothing lost since the last flush
        assert cache.lookup(ids) == 5 * CHUNK


def test_drop_newest_keeps_the_pending_writes_and_skips_the_new_chunks() -> None:
    lower = GatedTier(big_byte_tier())
    with make_cache(lower, write_wait_seconds=0.0, write_drop="newest") as cache:
        for i, ids in enumerate(one_chunk_prompts(40)):
            assert cache.store(ids, make_kv(CHUNK, seed=i)) == 1
        ids = list(range(900_000, 900_000 + 5 * CHUNK))
        assert cache.store(ids, make_kv(5 * CHUNK, seed=99)) == 0
        stats = cache.stats()
        assert stats["store_skipped_chunks"] == 5 and stats["write_dropped"] == 0
        lower.gate.set()
        assert cache.flush(timeout=10) is False
        assert lower.inner.stats().stored_chunks == 40


def test_a_store_into_a_pool_pinned_by_readers_counts_every_chunk_it_skips() -> None:
    lower = big_byte_tier()
    with make_cache(lower) as cache:
        prompts = one_chunk_prompts(40)
        for i, ids in enumerate(prompts):
            cache.store(ids, make_kv(CHUNK, seed=i))
        assert cache.flush(timeout=10) is True
        spans = [nencache_chunk_key(cache, ids) for ids in prompts]
        leases = [cache.memory.lease(key, count=False) for key in spans]  # readers pin every page
        try:
            assert cache.store(list(range(900_000, 900_000 + 5 * CHUNK)), make_kv(5 * CHUNK)) == 0
            assert cache.stats()["store_skipped_chunks"] == 5  # per chunk, not per call
            assert cache.flush(timeout=10) is False
        finally:
            for lease in leases:
                lease.release()


def nencache_chunk_key(cache: KVCache, ids: list[int]) -> bytes:
    import nencache.cache

    return nencache.cache.chunk_spans(nencache.cache.token_array(ids), CHUNK, cache.namespace,
                                      include_partial=True)[0].key


def test_every_chunk_not_stored_or_not_written_is_counted() -> None:
    lower = FaultyTier(big_byte_tier())
    lower.delay = 0.005  # 5 ms a batch
    threads_, prompts_each, chunks_each = 4, 25, 3
    with make_cache(lower, write_wait_seconds=0.01) as cache:  # 40 pages for 300 chunks: drops happen
        def worker(seed: int) -> None:
            for p in range(prompts_each):
                start = (seed * 1000 + p) * 10_000
                cache.store(list(range(start, start + chunks_each * CHUNK)), make_kv(chunks_each * CHUNK, seed=p))

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(threads_)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cache.flush(timeout=30)
        stats = cache.stats()
        given = threads_ * prompts_each * chunks_each
        assert stats["stored_chunks"] + stats["store_skipped_chunks"] == given, stats
        written = lower.inner.stats().stored_chunks
        assert stats["write_pending"] == 0
        assert written + stats["write_dropped"] + stats["write_failed_chunks"] == stats["stored_chunks"], stats
