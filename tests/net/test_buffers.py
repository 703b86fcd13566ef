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


def test_a_buffer_stays_held_while_any_view_of_it_lives() -> None:
    import torch

    pool = BufferPool(limit=1 << 20)
    addresses = set()
    for make in (lambda m: m[64:], lambda m: np.frombuffer(m, dtype=np.uint8),
                 lambda m: torch.frombuffer(m, dtype=torch.uint8), lambda m: m.cast("B")[::2]):
        first = pool.take(8192)
        address = np.frombuffer(first, dtype=np.uint8).ctypes.data
        held = make(first)
        del first
        again = pool.take(8192)
        assert np.frombuffer(again, dtype=np.uint8).ctypes.data != address  # a view still uses it
        addresses.add(address)
        del held, again
    assert len(addresses) == 1  # and once the view is gone, the same memory is handed out again


def test_memory_past_the_limit_is_not_kept() -> None:
    pool = BufferPool(limit=8192)
    kept = pool.take(8192)
    address = np.frombuffer(kept, dtype=np.uint8).ctypes.data
    extra = pool.take(8192)  # over the limit: fresh memory, dropped when released
    assert np.frombuffer(extra, dtype=np.uint8).ctypes.data != address
    del kept, extra
    assert np.frombuffer(pool.take(8192), dtype=np.uint8).ctypes.data == address
