"""MemoryTier: the tier contract, LRU eviction, pinned chunks never evicted."""

from __future__ import annotations

import pytest
import torch

from nencache.codecs import get_codec
from nencache.errors import LayoutError, PoolExhaustedError, TierError
from nencache.layout import KVLayout
from nencache.pool import MemoryPool
from nencache.tiers.memory import MemoryTier, raw_page_bytes
from tests.tiers.contract import TierContract, make_blob, make_key

LAYOUT = KVLayout(2, 2, 8, torch.bfloat16)


class TestMemoryContract(TierContract):
    @pytest.fixture
    def tier(self):
        tier = MemoryTier(MemoryPool(64 * 4096, 4096), LAYOUT)
        yield tier
        tier.close()


def chunk(seed: int, tokens: int = 4) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def test_lru_eviction_keeps_recent_chunks() -> None:
    tier = MemoryTier(MemoryPool(3 * raw_page_bytes(LAYOUT, 4), raw_page_bytes(LAYOUT, 4)), LAYOUT)
    for i in range(3):
        tier.put_tensor(make_key(i), chunk(i))
    assert tier.lease(make_key(0)) is not None  # touch 0 (and leak nothing: release below)
    tier.lease(make_key(0), count=False).release()
    tier.lease(make_key(0), count=False).release()
    tier.put_tensor(make_key(3), chunk(3))
    assert make_key(1) not in tier and make_key(0) in tier and make_key(3) in tier
    assert tier.stats().evicted_chunks == 1


def test_pinned_chunk_is_never_evicted() -> None:
    tier = MemoryTier(MemoryPool(2 * raw_page_bytes(LAYOUT, 4), raw_page_bytes(LAYOUT, 4)), LAYOUT)
    tier.put_tensor(make_key(0), chunk(0))
    tier.put_tensor(make_key(1), chunk(1))
    lease = tier.lease(make_key(0), count=False)  # 0 is the oldest, but it is being read
    tier.put_tensor(make_key(2), chunk(2))
    assert make_key(0) in tier and make_key(1) not in tier
    assert torch.equal(lease.tensor(), chunk(0))
    other = tier.lease(make_key(2), count=False)
    with pytest.raises(PoolExhaustedError):
        tier.put_tensor(make_key(3), chunk(3))
    lease.release()
    other.release()
    tier.put_tensor(make_key(3), chunk(3))
    assert make_key(3) in tier


def test_read_into_strided_view_is_exact() -> None:
    tier = MemoryTier(MemoryPool(4 * raw_page_bytes(LAYOUT, 4), raw_page_bytes(LAYOUT, 4)), LAYOUT)
    tier.put_tensor(make_key(0), chunk(0))
    buffer = torch.zeros(2, 2, 2, 4, 8, dtype=LAYOUT.dtype)  # heads-first, as transformers keeps it
    assert tier.read_into(make_key(0), buffer.permute(0, 1, 3, 2, 4))
    assert torch.equal(buffer.permute(0, 1, 3, 2, 4), chunk(0))
    assert not tier.read_into(make_key(9), buffer.permute(0, 1, 3, 2, 4))


def test_oversized_blob_is_refused_and_changes_nothing() -> None:
    tier = MemoryTier(MemoryPool(4 * 1024, 1024), LAYOUT)
    with pytest.raises(TierError, match="larger than a pool page"):
        tier.put([(make_key(0), make_blob(make_key(0), tokens=64))])
    assert len(tier) == 0 and tier.pool.free_pages == 4


@pytest.mark.parametrize("name", ["int8", "fp8", "zstd+int8"])
def test_codec_pages_hold_the_codecs_own_blob_and_read_into_any_view(name: str) -> None:
    """In-place codecs (int8, fp8) encode into the page and decode into the reader's view; the others
    through a blob. Either way the page holds exactly `encode`'s bytes and reads give exactly `decode`'s."""
    codec = get_codec(name)
    page = codec.max_encoded_size(LAYOUT, 8)
    tier = MemoryTier(MemoryPool(4 * page, page), LAYOUT, codec)
    whole = torch.randn(LAYOUT.shape(16), generator=torch.Generator().manual_seed(3)).to(LAYOUT.dtype)
    sources = [whole[:, :, :8], whole[:, :, 8:]]  # strided views, read where they are
    for i, source in enumerate(sources):
        assert tier.put_tensor(make_key(i), source)
    for i, source in enumerate(sources):
        lease = tier.lease(make_key(i), count=False)
        assert bytes(lease.blob()) == codec.encode(source.contiguous(), make_key(i))
        lease.release()
    canvas = torch.zeros(LAYOUT.num_layers, 2, 20, LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=LAYOUT.dtype)
    assert tier.read_into(make_key(0), canvas[:, :, 1:9])
    assert tier.read_many([make_key(1)], [canvas[:, :, 10:18]]) == 1
    for i, (start, source) in enumerate(zip((1, 10), sources)):
        expected = codec.decode(codec.encode(source.contiguous(), make_key(i)))
        assert torch.equal(canvas[:, :, start : start + 8], expected)
    assert not canvas[:, :, [0, 9, 18, 19]].any()
    as_fp32 = torch.zeros(LAYOUT.shape(8), dtype=torch.float32)  # not the layout's dtype: decoded, then converted
    assert tier.read_into(make_key(0), as_fp32)
    assert torch.equal(as_fp32, canvas[:, :, 1:9].float())


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_a_chunk_a_codec_refuses_evicts_nothing(name: str) -> None:
    codec = get_codec(name)
    page = codec.max_encoded_size(LAYOUT, 4)
    tier = MemoryTier(MemoryPool(2 * page, page), LAYOUT, codec)
    tier.put_tensor(make_key(0), chunk(0))
    tier.put_tensor(make_key(1), chunk(1))
    bad = chunk(2)
    bad[0, 1, 2, 0, 3] = float("inf")
    with pytest.raises(LayoutError, match="NaN or inf"):
        tier.put_filled(make_key(2), 4, lambda target: target.copy_(bad))
    assert make_key(0) in tier and make_key(1) in tier and make_key(2) not in tier
    assert tier.stats().evicted_chunks == 0 and tier.pool.free_pages == 0


def test_small_raw_chunks_read_under_the_lock_into_any_out() -> None:
    """A small raw chunk is copied under the index lock into a matching tensor, and through the pinned
    path into anything else; a page reused by another chunk reads as that chunk."""
    tier = MemoryTier(MemoryPool(2 * raw_page_bytes(LAYOUT, 4), raw_page_bytes(LAYOUT, 4)), LAYOUT)
    tier.put_tensor(make_key(0), chunk(0))
    outs = [torch.zeros(LAYOUT.shape(4), dtype=LAYOUT.dtype),
            torch.zeros(2, 2, 2, 4, 8, dtype=LAYOUT.dtype).permute(0, 1, 3, 2, 4),
            torch.zeros(LAYOUT.shape(4), dtype=torch.float32)]
    for out in outs:
        assert tier.read_into(make_key(0), out)
        assert torch.equal(out, chunk(0).to(out.dtype))
    assert tier.pool.refcount(tier._index[make_key(0)].page) == 1  # every read gave its pin back
    tier.put_tensor(make_key(1), chunk(1))
    tier.put_tensor(make_key(2), chunk(2))  # evicts 0: its page now holds 2
    assert not tier.read_into(make_key(0), outs[0])
    assert tier.read_into(make_key(2), outs[0]) and torch.equal(outs[0], chunk(2))
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.read_bytes) == (4, 1, 4 * LAYOUT.nbytes(4))
