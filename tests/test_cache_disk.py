"""KVCache with the disk tier: restart in a new process, memory cleared, prefetch from disk."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from nencache import CacheConfig, KVCache, KVLayout

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float16)


def make_kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def make_cache(path: Path, **kwargs) -> KVCache:
    config = CacheConfig(chunk_size=16, cpu_size="4MiB", disk_path=str(path), disk_size="64MiB", **kwargs)
    return KVCache(config, LAYOUT, model_id="disk-model")


def test_store_close_reopen_in_a_new_process_is_bit_exact(tmp_path: Path) -> None:
    with make_cache(tmp_path) as cache:
        cache.store(list(range(150)), make_kv(150, seed=4))
        assert cache.flush(timeout=30)
    script = textwrap.dedent(f"""
        import torch
        from nencache import CacheConfig, KVCache, KVLayout
        layout = KVLayout(4, 2, 16, torch.float16)
        config = CacheConfig(chunk_size=16, cpu_size="4MiB", disk_path={str(tmp_path)!r}, disk_size="64MiB")
        with KVCache(config, layout, model_id="disk-model") as cache:
            ids = list(range(150))
            assert cache.lookup(ids) == 150, cache.lookup(ids)
            expected = torch.randn(layout.shape(150), generator=torch.Generator().manual_seed(4)).to(torch.float16)
            assert torch.equal(cache.retrieve(ids), expected)
            assert cache.stats()["lower_hits"] == 10
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("OK"), done.stderr


def test_memory_cleared_then_served_from_disk_and_promoted(tmp_path: Path) -> None:
    with make_cache(tmp_path) as cache:
        ids = list(range(64))
        cache.store(ids, make_kv(64, seed=1))
        cache.flush()
        cache.memory.clear()
        assert cache.prefetch(ids).result(timeout=30) == 4
        assert len(cache.memory) == 4
        assert torch.equal(cache.retrieve(ids), make_kv(64, seed=1))


def test_pool_smaller_than_the_data_still_serves_everything_from_disk(tmp_path: Path) -> None:
    with make_cache(tmp_path) as cache:  # the write-behind queues as many chunks as the pool holds
        prompts = [list(range(i * 1000, i * 1000 + 64)) for i in range(300)]  # ~4.7 MiB of KV > 4 MiB pool
        for index, ids in enumerate(prompts):
            cache.store(ids, make_kv(64, seed=index))
            if index % 20 == 19:
                cache.flush(timeout=60)
        cache.flush(timeout=60)
        stats = cache.stats()
        assert stats["evicted_chunks"] > 0 and stats["store_failures"] == 0 and stats["write_dropped"] == 0
        for index in (0, 1, 150, 299):
            assert cache.lookup(prompts[index]) == 64
            assert torch.equal(cache.retrieve(prompts[index]), make_kv(64, seed=index))


def test_a_burst_the_pool_can_hold_reaches_a_slow_disk_whole_and_survives_a_restart(
        tmp_path: Path, monkeypatch) -> None:
    """Stores back to back on a slow disk: nothing is dropped while the pool has room, flush says all is well
    only because it is, and a restart finds every prompt."""
    import time

    from nencache.tiers.disk.tier import DiskTier
    from nencache.tiers.memory import raw_page_bytes

    real_put = DiskTier.put
    monkeypatch.setattr(DiskTier, "put", lambda self, items: (time.sleep(0.03), real_put(self, items))[1])
    config = CacheConfig(chunk_size=16, cpu_size=64 * raw_page_bytes(LAYOUT, 16), local_cpu=False,
                         disk_path=str(tmp_path), disk_size="64MiB")
    prompts = [list(range(i * 10_000, i * 10_000 + 7 * 16)) for i in range(8)]  # 56 chunks, a 64-page pool
    with KVCache(config, LAYOUT, model_id="burst") as cache:
        for index, ids in enumerate(prompts):
            assert cache.store(ids, make_kv(len(ids), seed=index)) == 7
        assert cache.flush(timeout=60) is True
        stats = cache.stats()
        assert stats["write_dropped"] == 0 and stats["store_skipped_chunks"] == 0
    with KVCache(config, LAYOUT, model_id="burst") as cache:
        assert [cache.lookup(ids) for ids in prompts] == [len(prompts[0])] * 8
        for index, ids in enumerate(prompts):
            assert torch.equal(cache.retrieve(ids), make_kv(len(ids), seed=index))


def test_failures_and_corrupt_chunks_of_the_disk_tier_show_in_its_stats(tmp_path: Path) -> None:
    """The store counts what it saw of a tier (a call that raised, a chunk that did not decode) in that
    tier's entry of `stats()`: the disk tier's own `stats()` is a snapshot, so nothing lands on a copy."""
    from nencache.codecs import RawCodec
    from nencache.keys import chunk_keys

    with make_cache(tmp_path) as cache:
        ids = list(range(32))
        key = chunk_keys(ids, 16, cache.namespace)[0]
        wrong = torch.zeros((1, 2, 16, 2, 16), dtype=torch.float16)  # a valid blob of another layout
        disk = cache.lower[0].tier
        disk.put([(key, RawCodec().encode(wrong, key))])
        disk.flush()
        assert cache.retrieve_prefix(ids, out=torch.empty(LAYOUT.shape(32), dtype=LAYOUT.dtype)) == 0
        assert cache.stats()["tiers"]["disk"]["corrupt"] == 1 and disk.contains_prefix([key]) == 0  # dropped
        disk.close()  # every call now raises
        assert cache.lookup(ids) == 0
        stats = cache.stats()
        assert stats["tiers"]["disk"]["errors"] >= 1 and stats["tier_errors"] == stats["tiers"]["disk"]["errors"]
        snapshot = disk.stats()
        snapshot.errors += 100
        assert disk.stats().errors == 0  # a snapshot: changing it changes nothing
