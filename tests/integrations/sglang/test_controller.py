"""SGLang's own HiCacheController on CPU, with NenCache attached as its storage backend the way
`--hicache-storage-backend dynamic` attaches it: the controller's backup thread writes host pages,
its prefetch threads query and read them back into other host slots, bit-exact, through the
zero-copy (`interface_v1`) and the generic page paths, across a backend restart, with a corrupt page
ending the prefetch early instead of failing it. (The device <-> host copies need SGLang's CUDA
kernels and are not run here: pages are written into the host pool directly.)"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
import torch

from nencache.integrations.sglang.pages import HostPageLayout

from .conftest import DYNAMIC, PAGE, build_host_pool, random_pages

WAIT = 30.0


def controller(sglang, kind: str, layout: str, extra: dict, metrics: bool = False):
    device, host = build_host_pool(sglang, kind, layout)
    allocator = sglang.allocator.PagedTokenToKVPoolAllocator(device.size, PAGE, device.dtype, "cpu", device,
                                                              need_sort=False)
    return sglang.cache_controller.HiCacheController(
        allocator, host, PAGE, None, threading.Event(), io_backend="direct", storage_backend="dynamic",
        model_name="tiny-model", storage_backend_extra_config={**DYNAMIC, **extra}, enable_storage_metrics=metrics)


def chunks(host, indices: torch.Tensor) -> list[torch.Tensor]:
    page = HostPageLayout.of(host)
    return [page.to_chunk(host.get_data_page(int(i), flat=False)).contiguous().view(torch.int16)
            for i in indices[::PAGE]]


def backup(ctl, tokens: list[int], hashes: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pages for `tokens` in fresh host slots, written to storage by the controller's backup thread."""
    indices = ctl.mem_pool_host.alloc(len(tokens))
    random_pages(ctl.mem_pool_host, [int(i) for i in indices[::PAGE]], seed=len(tokens))
    op_id = ctl.write_storage(indices, tokens, hash_value=hashes)
    done = ctl.ack_backup_queue.get(timeout=WAIT)
    assert done.id == op_id
    assert done.completed_tokens == len(tokens)
    return indices, chunks(ctl.mem_pool_host, indices)


def prefetch(ctl, tokens: list[int]) -> tuple[int, torch.Tensor | None, int]:
    """(storage hit tokens, host slots, loaded tokens): the controller's query, then what the scheduler
    does with a hit (allocate host slots, hand the operation back), then its load thread's acks."""
    op = ctl.prefetch("req", tokens)
    hit = ctl.prefetch_hit_queue.get(timeout=WAIT)
    assert hit is op
    if op.storage_hit_count == 0:
        return 0, None, 0
    op.host_indices = ctl.alloc_prefetch_host_buffers(op, op.storage_hit_count)
    ctl.prefetch_buffer.put(op)
    loaded = 0
    while True:
        ack = ctl.ack_prefetch_queue.get(timeout=WAIT)
        if ack.completed_req:
            return op.storage_hit_count, op.host_indices, loaded
        loaded = max(loaded, ack.completed_tokens or 0)


@pytest.mark.parametrize(("kind", "layout", "zero_copy"), [("mha", "page_first", 1), ("mha", "layer_first", 0),
                                                           ("mla", "page_first_direct", 1), ("mla", "layer_first", 0)])
def test_controller_backs_up_and_prefetches_through_nencache(sglang, parallel, tmp_path, kind, layout,
                                                             zero_copy) -> None:
    extra = {"interface_v1": zero_copy, "nencache.cpu_size": "1MiB", "nencache.disk_path": str(tmp_path)}
    ctl = controller(sglang, kind, layout, extra, metrics=True)
    try:
        assert type(ctl.storage_backend).__name__ == "NenCacheHiCacheStorage"
        assert (ctl.page_get_func == ctl._page_get_zero_copy) == bool(zero_copy)
        tokens = list(range(1000, 1000 + 5 * PAGE))
        hashes = sglang.utils.get_storage_hash_str(tokens, None, page_size=PAGE)
        _, sent = backup(ctl, tokens, hashes)

        hit, indices, loaded = prefetch(ctl, tokens + [7, 7])  # a partial last page is never queried
        assert hit == loaded == len(tokens)
        assert all(torch.equal(a, b) for a, b in zip(chunks(ctl.mem_pool_host, indices), sent))
        assert prefetch(ctl, [5] * len(tokens))[0] == 0  # other text: no hit

        metrics = ctl.storage_backend.get_stats()
        assert isinstance(metrics, sglang.metrics.StorageMetrics)
        assert sum(metrics.backup_pgs) == 5 and sum(metrics.prefetch_pgs) == 5
    finally:
        ctl.detach_storage_backend()
    assert ctl.storage_backend is None

    # a restarted server: new controller, new backend, empty memory tier, pages from disk
    ctl = controller(sglang, kind, layout, extra)
    try:
        hit, indices, loaded = prefetch(ctl, tokens)
        assert hit == loaded == len(tokens)
        assert all(torch.equal(a, b) for a, b in zip(chunks(ctl.mem_pool_host, indices), sent))
    finally:
        ctl.detach_storage_backend()


def test_a_corrupt_page_ends_the_prefetch_early_and_nothing_fails(sglang, parallel, tmp_path) -> None:
    extra = {"nencache.local_cpu": False, "nencache.disk_path": str(tmp_path)}
    ctl = controller(sglang, "mha", "page_first", extra)
    try:
        tokens = list(range(4 * PAGE))
        hashes = sglang.utils.get_storage_hash_str(tokens, None, page_size=PAGE)
        _, sent = backup(ctl, tokens, hashes)
        store = ctl.storage_backend.backends["kv"].store
        assert store.flush(10)  # pages reach the disk behind the backup's acknowledgement
        victim = next(Path(tmp_path).rglob(store.key(hashes[2]).hex() + "*"))
        victim.write_bytes(victim.read_bytes()[:-5] + b"\x00" * 5)

        hit, indices, loaded = prefetch(ctl, tokens)
        assert hit == len(tokens)  # the query still saw the file
        assert loaded == 2 * PAGE  # the load stops at the corrupt page; SGLang recomputes the rest
        assert all(torch.equal(a, b) for a, b in zip(chunks(ctl.mem_pool_host, indices)[:2], sent[:2]))
        assert prefetch(ctl, tokens)[0] == 2 * PAGE  # the corrupt page was dropped
        with pytest.raises(queue.Empty):
            ctl.prefetch_hit_queue.get(timeout=0.1)
    finally:
        ctl.detach_storage_backend()
