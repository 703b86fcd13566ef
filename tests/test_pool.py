"""MemoryPool: one allocation, fixed pages, reference counts."""

from __future__ import annotations

import pytest

from nencache.errors import ConfigError
from nencache.pool import MemoryPool, cuda_pinning_available


def test_carves_whole_pages_from_one_buffer() -> None:
    pool = MemoryPool(10_000, 1_000)
    assert pool.num_pages == 10 and pool.capacity_bytes == 10_000 and pool.buffer.numel() == 10_000
    pages = [pool.allocate() for _ in range(10)]
    assert sorted(pages) == list(range(10)) and pool.allocate() is None
    assert pool.page(3).data_ptr() == pool.buffer.data_ptr() + 3_000 and pool.page(3).numel() == 1_000


def test_refcounts_free_only_at_zero() -> None:
    pool = MemoryPool(2_000, 1_000)
    page = pool.allocate()
    pool.acquire(page)
    pool.release(page)
    assert pool.free_pages == 1
    pool.release(page)
    assert pool.free_pages == 2 and pool.refcount(page) == 0


def test_too_small_pool_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="smaller than one chunk"):
        MemoryPool(999, 1_000)


@pytest.mark.skipif(cuda_pinning_available(), reason="this machine has CUDA")
def test_pinning_without_cuda_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        MemoryPool(2_000, 1_000, pin_memory=True)
    assert MemoryPool(2_000, 1_000).pinned is False


@pytest.mark.skipif(not cuda_pinning_available(), reason="pinned host memory needs CUDA")
def test_pool_is_pinned_with_cuda() -> None:
    assert MemoryPool(2_000, 1_000).buffer.is_pinned()
