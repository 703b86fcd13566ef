"""KVCache with codecs: a compressed CPU pool holds more tokens; lower tiers store compressed chunks."""

from __future__ import annotations

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.pool import MemoryPool
from nencache.tiers.memory import MemoryTier, raw_page_bytes

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)


def make_kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def tokens_held(codec: str, pool_bytes: int) -> int:
    """Fill a pool of `pool_bytes` with 256-token chunks (the default size) and count the tokens still cached."""
    prompts = [list(range(i * 1000, i * 1000 + 256)) for i in range(48)]
    with KVCache(CacheConfig(chunk_size=256, cpu_size=pool_bytes, cpu_codec=codec), LAYOUT, model_id="m") as cache:
        for index, ids in enumerate(prompts):
            cache.store(ids, make_kv(256, seed=index))
        return sum(cache.lookup(ids) for ids in prompts)


def test_int8_pool_holds_at_least_1_9x_the_tokens() -> None:
    pool_bytes = 20 * raw_page_bytes(LAYOUT, 256)
    raw, int8 = tokens_held("raw", pool_bytes), tokens_held("int8", pool_bytes)
    assert raw == 20 * 256
    assert int8 >= 1.9 * raw, (raw, int8)


@pytest.mark.parametrize("codec", ["int8", "fp8", "int4", "zstd+int8"])
def test_compressed_pool_serves_close_values(codec) -> None:
    with KVCache(CacheConfig(chunk_size=64, cpu_size="8MiB", cpu_codec=codec), LAYOUT, model_id="m") as cache:
        ids = list(range(150))
        kv = make_kv(150, seed=3)
        cache.store(ids, kv)
        out = cache.retrieve(ids)
        assert out.dtype == kv.dtype and out.shape == kv.shape
        error = (out.float() - kv.float()).abs().mean() / kv.float().abs().mean()
        assert error < (0.2 if codec == "int4" else 0.05), error


@pytest.mark.parametrize(("codec", "exact"), [("zstd", True), ("lz4", True), ("int8", False)])
def test_lower_tier_codec(codec, exact) -> None:
    lower = MemoryTier(MemoryPool(64 * LAYOUT.nbytes(64) + 64 * 4096, LAYOUT.nbytes(64) + 4096))
    lower.name = "lower"
    config = CacheConfig(chunk_size=64, cpu_size="8MiB")
    with KVCache(config, LAYOUT, model_id="m", lower_tiers=[(lower, codec)]) as cache:
        ids = list(range(128))
        kv = make_kv(128, seed=5)
        cache.store(ids, kv)
        cache.flush()
        stored = lower.stats().stored_bytes
        if codec == "int8":
            assert stored < 0.6 * LAYOUT.nbytes(128)
        cache.memory.clear()
        out = cache.retrieve(ids)
        if exact:
            assert torch.equal(out, kv)
        else:
            assert ((out.float() - kv.float()).abs().mean() / kv.float().abs().mean()) < 0.05


def test_chunks_written_with_another_codec_are_decoded_by_their_header() -> None:
    lower = MemoryTier(MemoryPool(64 * LAYOUT.nbytes(64) + 64 * 4096, LAYOUT.nbytes(64) + 4096))
    lower.name = "lower"
    config = CacheConfig(chunk_size=64, cpu_size="8MiB")
    kv = make_kv(128, seed=8)
    ids = list(range(128))
    writer = KVCache(config, LAYOUT, model_id="m", lower_tiers=[(lower, "zstd+int8")])
    writer.store(ids, kv)
    writer.flush()
    reader = KVCache(config, LAYOUT, model_id="m", lower_tiers=[(lower, "raw")])  # closing either clears `lower`
    out = reader.retrieve(ids)
    assert ((out.float() - kv.float()).abs().mean() / kv.float().abs().mean()) < 0.05
    reader.close()
    writer.close()
