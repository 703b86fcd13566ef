"""KVCache: exact round trips, prefixes, salts, invalidation, bounded memory, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nencache import CacheConfig, ChunkMissingError, ClosedError, KVCache, KVLayout, LayoutError
from nencache.tiers.memory import raw_page_bytes

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)


def make_kv(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    data = torch.randn(layout.shape(tokens), generator=torch.Generator().manual_seed(seed))
    return data.to(layout.dtype)


def make_cache(chunk_size: int = 16, cpu_size: str | int = "16MiB", layout: KVLayout = LAYOUT, **kwargs) -> KVCache:
    return KVCache(CacheConfig(chunk_size=chunk_size, cpu_size=cpu_size, **kwargs), layout, model_id="test-model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [16, 37, 64, 1, 100])
def test_retrieve_is_bit_exact(dtype, tokens) -> None:
    layout = KVLayout(3, 2, 8, dtype)
    kv = make_kv(layout, tokens)
    if dtype != torch.float32:  # include values that only survive an exact byte copy
        kv.view(torch.int16)[0, 0, 0, 0, :4] = torch.tensor([0x7C01, -1, 0x0001, -32768], dtype=torch.int16)  # NaN payload, NaN, denormal, -0
    with make_cache(layout=layout) as cache:
        ids = list(range(1000, 1000 + tokens))
        assert cache.store(ids, kv) == -(-tokens // 16)
        assert cache.lookup(ids) == tokens
        out = cache.retrieve(ids)
        assert out.dtype == dtype and torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_public_api_shapes_and_tensor_tokens() -> None:
    with make_cache() as cache:
        ids = torch.arange(50)
        kv = make_kv(LAYOUT, 50)
        cache.store(ids, kv)
        n = cache.lookup(ids)
        assert n == 50
        assert torch.equal(cache.retrieve(ids[:n]), kv)
        assert cache.lookup(ids[:40]) == 32  # the stored partial covers 48..50, not 32..40
        assert torch.equal(cache.retrieve(ids[:32]), kv[:, :, :32])
        stats = cache.stats()
        for field in ("hits", "misses", "stored_chunks", "stored_bytes", "evicted_chunks", "evicted_bytes"):
            assert field in stats
        assert stats["tiers"]["memory"]["chunks"] == 4


def test_longer_prompt_reuses_stored_partial_chunk() -> None:
    with make_cache() as cache:
        ids = list(range(40))
        cache.store(ids, make_kv(LAYOUT, 40))
        longer = ids + [7, 8, 9, 10, 11]
        assert cache.lookup(longer) == 40
        assert torch.equal(cache.retrieve(longer[:40]), make_kv(LAYOUT, 40))


def test_without_unfull_chunks_only_full_chunks_are_kept() -> None:
    with make_cache(save_unfull_chunk=False) as cache:
        ids = list(range(40))
        assert cache.store(ids, make_kv(LAYOUT, 40)) == 2
        assert cache.lookup(ids) == 32


def test_store_skips_chunks_already_held() -> None:
    with make_cache() as cache:
        ids = list(range(64))
        assert cache.store(ids, make_kv(LAYOUT, 64)) == 4
        assert cache.store(ids[:48] + [1, 2, 3], make_kv(LAYOUT, 51, seed=1)) == 1
        assert torch.equal(cache.retrieve(ids[:48]), make_kv(LAYOUT, 64)[:, :, :48])


def test_a_changed_token_invalidates_the_rest_of_the_prefix() -> None:
    with make_cache() as cache:
        ids = list(range(64))
        cache.store(ids, make_kv(LAYOUT, 64))
        changed = list(ids)
        changed[20] = 999
        assert cache.lookup(changed) == 16


def test_salt_isolates_requests() -> None:
    with make_cache() as cache:
        ids = list(range(32))
        cache.store(ids, make_kv(LAYOUT, 32), salt="tenant-a")
        assert cache.lookup(ids, salt="tenant-a") == 32
        assert cache.lookup(ids) == 0 and cache.lookup(ids, salt="tenant-b") == 0
        with pytest.raises(ChunkMissingError):
            cache.retrieve(ids, salt="tenant-b")


def test_different_models_never_share_chunks() -> None:
    config = CacheConfig(chunk_size=16, cpu_size="1MiB")
    a = KVCache(config, LAYOUT, model_id="model-a")
    b = KVCache(config, LAYOUT, model_id="model-b")
    ids = list(range(32))
    a.store(ids, make_kv(LAYOUT, 32))
    assert a.lookup(ids) == 32 and b.lookup(ids) == 0
    assert a.namespace != b.namespace


def test_invalidate_prefix_and_everything() -> None:
    with make_cache() as cache:
        cache.store(list(range(48)), make_kv(LAYOUT, 48))
        cache.store(list(range(100, 132)), make_kv(LAYOUT, 32, seed=3))
        cache.invalidate(list(range(48)))
        assert cache.lookup(list(range(48))) == 0 and cache.lookup(list(range(100, 132))) == 32
        cache.invalidate()
        assert cache.lookup(list(range(100, 132))) == 0
        assert cache.stats()["pool_used_bytes"] == 0


@pytest.mark.parametrize(
    ("kv_shape", "dtype", "message"),
    [
        ((4, 2, 31, 2, 16), torch.bfloat16, "shape"),  # one token short
        ((4, 2, 32, 3, 16), torch.bfloat16, "shape"),  # wrong heads
        ((4, 32, 2, 16), torch.bfloat16, "shape"),  # wrong rank
        ((4, 2, 32, 2, 16), torch.float32, "dtype"),
    ],
)
def test_bad_kv_raises_and_changes_nothing(kv_shape, dtype, message) -> None:
    with make_cache() as cache:
        cache.store(list(range(16)), make_kv(LAYOUT, 16))
        before = cache.stats()
        with pytest.raises(LayoutError, match=message):
            cache.store(list(range(32)), torch.zeros(kv_shape, dtype=dtype))
        after = cache.stats()
        assert after["stored_chunks"] == before["stored_chunks"] and after["pool_used_bytes"] == before["pool_used_bytes"]
        assert torch.equal(cache.retrieve(list(range(16))), make_kv(LAYOUT, 16))


def test_bad_tokens_and_bad_out_raise() -> None:
    with make_cache() as cache:
        with pytest.raises(LayoutError):
            cache.store([[1, 2]], make_kv(LAYOUT, 1))
        with pytest.raises(LayoutError):
            cache.lookup(torch.ones(3, 3, dtype=torch.long))
        cache.store(list(range(16)), make_kv(LAYOUT, 16))
        with pytest.raises(LayoutError):
            cache.retrieve(list(range(16)), out=torch.empty(LAYOUT.shape(15), dtype=LAYOUT.dtype))
        with pytest.raises(LayoutError):
            KVCache(CacheConfig(), None)


def test_retrieve_of_uncached_tokens_says_what_to_do() -> None:
    with make_cache() as cache:
        cache.store(list(range(16)), make_kv(LAYOUT, 16))
        with pytest.raises(ChunkMissingError, match="call lookup"):
            cache.retrieve(list(range(32)))


def test_closed_cache_refuses_use() -> None:
    cache = make_cache()
    cache.close()
    cache.close()
    with pytest.raises(ClosedError):
        cache.lookup([1, 2, 3])


def test_three_times_the_pool_stays_bounded_and_exact() -> None:
    chunk_bytes = raw_page_bytes(LAYOUT, 16)
    with make_cache(cpu_size=20 * chunk_bytes) as cache:
        pool = cache.memory.pool
        pointer, size = pool.buffer.data_ptr(), pool.buffer.numel()
        prompts = [list(range(i * 1000, i * 1000 + 64)) for i in range(15)]  # 60 chunks: 3x the pool
        for index, ids in enumerate(prompts):
            cache.store(ids, make_kv(LAYOUT, 64, seed=index))
        assert pool.buffer.data_ptr() == pointer and pool.buffer.numel() == size
        stats = cache.stats()
        assert stats["pool_used_bytes"] <= pool.capacity_bytes and stats["evicted_chunks"] == 40
        assert cache.lookup(prompts[0]) == 0  # the oldest went first
        assert cache.lookup(prompts[-1]) == 64
        for index, ids in enumerate(prompts):
            n = cache.lookup(ids)
            if n:
                assert torch.equal(cache.retrieve(ids[:n]), make_kv(LAYOUT, 64, seed=index)[:, :, :n])


def test_no_large_allocation_after_warm_up() -> None:
    with make_cache(cpu_size="4MiB") as cache:
        ids = list(range(1000))
        kv = make_kv(LAYOUT, 1000)
        out = torch.empty_like(kv)
        cache.store(ids, kv)
        cache.retrieve(ids, out=out)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(3):
                cache.invalidate()
                cache.store(ids, kv)
                cache.retrieve(ids, out=out)
        largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
        assert largest < 64 * 1024, f"an op allocated {largest} bytes on the hot path"
        assert torch.equal(out, kv)


def test_resident_memory_stays_within_the_pool() -> None:
    psutil = pytest.importorskip("psutil")
    layout = KVLayout(8, 4, 64, torch.float16)
    chunk_bytes = raw_page_bytes(layout, 64)  # 512 KiB + the header slot
    pool_bytes = 64 * chunk_bytes  # 32 MiB
    kv = make_kv(layout, 64 * 16)
    process = psutil.Process()
    with make_cache(chunk_size=64, cpu_size=pool_bytes, layout=layout) as cache:
        before = process.memory_info().rss
        for round_ in range(12):  # 3x the pool
            ids = list(range(round_ * 100_000, round_ * 100_000 + 64 * 16))
            cache.store(ids, kv)
        grown = process.memory_info().rss - before
        assert grown <= pool_bytes + 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB for a 32 MiB pool"
        assert cache.stats()["evicted_chunks"] == 12 * 16 - 64


def test_store_from_kv_start_leaves_the_prefix_and_checks_its_arguments() -> None:
    with make_cache() as cache:
        tokens = list(range(70))
        kv = make_kv(LAYOUT, 70, seed=9)
        assert cache.store(tokens[:32], kv[:, :, :32]) == 2
        assert cache.store(tokens, kv[:, :, 32:], kv_start=32) == 3  # two full chunks and the partial one
        assert torch.equal(cache.retrieve(tokens), kv)
        with pytest.raises(LayoutError, match="multiple of chunk_size"):
            cache.store(tokens, kv[:, :, 20:], kv_start=20)
        with pytest.raises(LayoutError, match="shape"):
            cache.store(tokens, kv, kv_start=16)
        assert torch.equal(cache.retrieve(tokens), kv)  # bad calls changed nothing


def test_a_prompt_is_hashed_once_and_serves_every_call(monkeypatch) -> None:
    import hashlib

    with make_cache() as cache:
        ids = list(range(500, 500 + 40))  # 2 whole chunks and a partial one
        kv = make_kv(LAYOUT, 40, seed=3)
        hashes = []
        real = hashlib.blake2b
        monkeypatch.setattr(hashlib, "blake2b", lambda *args, **kwargs: hashes.append(1) or real(*args, **kwargs))
        prompt = cache.prompt(ids)
        assert len(hashes) == 3
        assert cache.store(prompt, kv) == 3 and cache.lookup(prompt) == 40
        assert torch.equal(cache.retrieve(prompt), kv) and cache.retrieve_prefix(prompt) == 40
        assert cache.prefetch(prompt).result(5) == 0
        cache.pin_prefix(prompt).release()
        assert len(hashes) == 3  # no call hashed the tokens again
        head = prompt.head(20)  # the first chunk is the prompt's; only the new partial chunk is hashed
        assert len(hashes) == 4 and [s.key for s in head.spans] == [s.key for s in cache.prompt(ids[:20]).spans]
        assert cache.lookup(head) == 16  # that partial chunk was never stored
        assert prompt.head(40) is prompt and len(prompt.head(0).spans) == 0


def test_a_prompt_keeps_its_salt_and_its_cache() -> None:
    with make_cache() as cache, make_cache(chunk_size=32) as other:
        ids = list(range(64))
        cache.store(ids, make_kv(LAYOUT, 64), salt="tenant-a")
        salted = cache.prompt(ids, salt="tenant-a")
        assert cache.lookup(salted) == 64 and cache.lookup(cache.prompt(ids)) == 0
        assert cache.lookup(salted, salt="tenant-a") == 64
        with pytest.raises(LayoutError, match="carries its salt"):
            cache.lookup(salted, salt="tenant-b")
        with pytest.raises(LayoutError, match="another KVCache"):
            other.lookup(salted)
