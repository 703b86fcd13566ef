"""`BufferPool`: receive buffers reused only once nobody holds them."""

from __future__ import annotations

import numpy as np

from nencache.net.buffers import BufferPool


def test_buffer_pool_reuses_only_released_memory() -> None:
    pool = BufferPool(limit=1 << 20)
    first = pool.take(4096)
    address = np.frombuffer(first, dtype=np.uint8).ctypes.data
    second = pool.take(4096)
    assert np.frombuffer(second, dtype=np.uint8).ctypes.data != address  # `first` is still held
    del first
    third = pool.take(4096)
    assert np.frombuffer(third, dtype=np.uint8).ctypes.data == address  # released, so reused
    del second, third
    assert len(pool.take(2 << 20)) == 2 << 20  # large sizes come from huge-page mappings
