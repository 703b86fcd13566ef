"""MemoryTier: the tier contract, LRU eviction, pinned chunks never evicted."""

from __future__ import annotations

import pytest
import torch

from nencache.errors import PoolExhaustedError, TierError
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
