"""SGLang HiCache backend: pages through real host-pool layouts, NenCache tiers, bit-exact, failures as misses."""

from __future__ import annotations

import pytest
import torch

from nencache import CacheConfig, KVLayout
from nencache.codecs import RawCodec
from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore, page_namespace
from nencache.integrations.sglang import HiCacheBackend, HostPageLayout
from nencache.tiers.base import TierStats

LAYERS, HEADS, DIM, PAGE = 3, 2, 8, 4


class HostPool:
    """SGLang's `MHATokenToKVPoolHost` buffers and page accessors, for each of its memory layouts."""

    def __init__(self, layout: str, num_pages: int = 8, dtype: torch.dtype = torch.bfloat16) -> None:
        self.layout, self.page_size, self.dtype = layout, PAGE, dtype
        self.layer_num, self.head_num, self.head_dim = LAYERS, HEADS, DIM
        size = num_pages * PAGE
        dims = {"layer_first": (2, LAYERS, size, HEADS, DIM), "page_first": (2, size, LAYERS, HEADS, DIM),
                "page_first_direct": (2, num_pages, LAYERS, PAGE, HEADS, DIM),
                "page_head": (2, num_pages, HEADS, PAGE, LAYERS, DIM)}[layout]
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + PAGE]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + PAGE]
        else:
            page = self.kv_buffer[:, index // PAGE : index // PAGE + 1]
        return page.flatten() if flat else page

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        target = self.get_data_page(index, flat=False)
        target.copy_(data_page.reshape(target.shape))


class DictTier:
    """A byte tier in a dict, optionally broken."""

    name = "dict"

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.broken = False
        self._stats = TierStats()

    def _check(self) -> None:
        if self.broken:
            raise ConnectionError("tier down")

    def contains_prefix(self, keys):
        self._check()
        return next((i for i, k in enumerate(keys) if k not in self.blobs), len(keys))

    def get(self, keys):
        self._check()
        return [self.blobs.get(k) for k in keys]

    def put(self, items):
        self._check()
        self.blobs.update((k, bytes(v)) for k, v in items)

    def delete(self, keys):
        for key in keys:
            self.blobs.pop(key, None)

    def clear(self):
        self.blobs.clear()

    def flush(self):
        pass

    def stats(self):
        return self._stats

    def close(self):
        pass


def make_store(config: CacheConfig, lower=()) -> PageStore:
    layout = KVLayout(LAYERS, HEADS, DIM, torch.bfloat16)
    namespace = page_namespace("tiny-model", layout, PAGE)
    store = PageStore.from_config(config, layout, PAGE, namespace)
    store.lower.extend(lower)
    return store


def fill_pages(pool: HostPool, page_layout: HostPageLayout, starts: list[int]) -> list[torch.Tensor]:
    chunks = [torch.randn(LAYERS, 2, PAGE, HEADS, DIM).to(torch.bfloat16) for _ in starts]
    for start, chunk in zip(starts, chunks):
        pool.set_from_flat_data_page(start, page_layout.from_chunk(chunk))
    return chunks


def host_indices(starts: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + PAGE) for s in starts])


@pytest.mark.parametrize(("write_layout", "read_layout"), [
    ("layer_first", "page_first"), ("page_first", "layer_first"), ("page_first_direct", "page_head"),
    ("page_head", "layer_first"),
])
def test_pages_round_trip_between_host_layouts(write_layout, read_layout) -> None:
    torch.manual_seed(0)
    store = make_store(CacheConfig(cpu_size="1MiB"))
    writer_pool, reader_pool = HostPool(write_layout), HostPool(read_layout)
    writer = HiCacheBackend(store, writer_pool, HostPageLayout.of(writer_pool))
    reader = HiCacheBackend(store, reader_pool, HostPageLayout.of(reader_pool))
    keys = ["h0", "h1", "h2"]
    chunks = fill_pages(writer_pool, writer.page, [20, 4, 12])
    assert writer.batch_set_v1(keys, host_indices([20, 4, 12])) == [True] * 3
    assert writer.batch_exists(keys + ["h9"]) == 3

    assert reader.batch_get_v1(keys, host_indices([0, 28, 8])) == [True] * 3
    for start, chunk in zip([0, 28, 8], chunks):
        page = reader.page.to_chunk(reader_pool.get_data_page(start, flat=False))
        assert torch.equal(page.view(torch.int16), chunk.view(torch.int16))
    flat = reader.get("h1")
    assert flat is not None and torch.equal(reader.page.to_chunk(flat), chunks[1])
    assert reader.get("nope") is None
    store.close()


def test_lower_tier_serves_promotes_and_failures_are_misses() -> None:
    lower = DictTier()
    store = make_store(CacheConfig(cpu_size="1MiB", local_cpu=False), lower=[(lower, RawCodec())])
    assert store.memory is None
    pool = HostPool("layer_first")
    backend = HiCacheBackend(store, pool, HostPageLayout.of(pool))
    chunks = fill_pages(pool, backend.page, [0, 4])
    assert backend.batch_set_v1(["a", "b"], host_indices([0, 4])) == [True, True]
    assert len(lower.blobs) == 2
    assert backend.batch_exists(["a", "missing", "b"]) == 1

    # a corrupt page is dropped and reported as a miss, never served
    key_b = store.key("b")
    lower.blobs[key_b] = lower.blobs[key_b][:-1] + bytes([lower.blobs[key_b][-1] ^ 1])
    assert backend.batch_get_v1(["a", "b"], host_indices([8, 12])) == [True, False]
    assert key_b not in lower.blobs and store.counters["corrupt"] == 1
    assert torch.equal(backend.page.to_chunk(pool.get_data_page(8, flat=False)), chunks[0])

    lower.broken = True
    assert backend.batch_exists(["a"]) == 0
    assert backend.batch_get_v1(["a"], host_indices([8])) == [False]
    assert backend.batch_set_v1(["c"], host_indices([0])) == [False]
    assert store.counters["tier_errors"] >= 3


def test_memory_tier_promotion_and_geometry_checks() -> None:
    lower = DictTier()
    store = make_store(CacheConfig(cpu_size="1MiB"), lower=[(lower, RawCodec())])
    pool = HostPool("page_first")
    backend = HiCacheBackend(store, pool, HostPageLayout.of(pool))
    fill_pages(pool, backend.page, [0])
    backend.batch_set_v1(["p"], host_indices([0]))
    store.memory.clear()
    assert backend.batch_get_v1(["p"], host_indices([4])) == [True]  # from the lower tier, promoted
    assert store.memory.contains_prefix([store.key("p")]) == 1
    other = page_namespace("other-model", store.layout, PAGE)
    assert other != store.namespace
    with pytest.raises(LayoutError, match="not supported"):
        HostPageLayout("weird", store.layout, PAGE)
    with pytest.raises(LayoutError, match="host indices"):
        backend.batch_get_v1(["p", "q"], host_indices([0]))
    with pytest.raises(LayoutError, match="MHA"):
        HostPageLayout.of(object())
    store.close()


def test_adapter_needs_sglang() -> None:
    import nencache.integrations.sglang as module

    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs SGLang"):
            module.NenCacheHiCacheStorage
    with pytest.raises(AttributeError):
        module.NoSuchThing


def install_sglang_stub(monkeypatch) -> type:
    """SGLang's `HiCacheStorage` ABC and `HiCacheStorageConfig` (python/sglang/srt/mem_cache/hicache_storage.py)."""
    import abc
    import dataclasses
    import sys
    import types

    @dataclasses.dataclass
    class HiCacheStorageConfig:
        tp_rank: int
        tp_size: int
        is_mla_model: bool
        is_page_first_layout: bool
        model_name: str | None
        extra_config: dict | None = None

    class HiCacheStorage(abc.ABC):
        def register_mem_pool_host(self, mem_pool_host):
            self.mem_pool_host = mem_pool_host

        @abc.abstractmethod
        def get(self, key, target_location=None, target_sizes=None): ...

        @abc.abstractmethod
        def batch_get(self, keys, target_locations=None, target_sizes=None): ...

        @abc.abstractmethod
        def set(self, key, value=None, target_location=None, target_sizes=None): ...

        @abc.abstractmethod
        def batch_set(self, keys, values=None, target_locations=None, target_sizes=None): ...

        @abc.abstractmethod
        def exists(self, key): ...

    names = ["sglang", "sglang.srt", "sglang.srt.mem_cache", "sglang.srt.mem_cache.hicache_storage"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].HiCacheStorage = HiCacheStorage
    sys.modules[names[-1]].HiCacheStorageConfig = HiCacheStorageConfig
    monkeypatch.setitem(sys.modules, "nencache.integrations.sglang_backend", None)  # restored (or removed) after the test
    del sys.modules["nencache.integrations.sglang_backend"]
    return HiCacheStorageConfig


def test_adapter_as_sglang_creates_and_calls_it(monkeypatch) -> None:
    import nencache.integrations.sglang as module

    config_cls = install_sglang_stub(monkeypatch)
    storage_cls = module.NenCacheHiCacheStorage
    extra = {"backend_name": "nencache", "module_path": "nencache.integrations.sglang",
             "class_name": "NenCacheHiCacheStorage", "interface_v1": 1, "nencache.cpu_size": "1MiB"}
    storage = storage_cls(config_cls(0, 1, False, False, "tiny-model", extra), {})  # as the dynamic factory does
    pool = HostPool("page_first")
    storage.register_mem_pool_host(pool)
    chunks = fill_pages(pool, storage.backend.page, [0, 4])
    assert storage.batch_set_v1(["k0", "k1"], host_indices([0, 4])) == [True, True]
    assert storage.batch_exists(["k0", "k1", "k2"]) == 2 and storage.exists("k1") and not storage.exists("k2")
    assert storage.batch_get_v1(["k1"], host_indices([8])) == [True]
    assert torch.equal(storage.backend.page.to_chunk(pool.get_data_page(8, flat=False)), chunks[1])
    target = torch.zeros(LAYERS * 2 * PAGE * HEADS * DIM, dtype=torch.bfloat16)
    assert storage.get("k0", target) is target and torch.equal(storage.backend.page.to_chunk(target), chunks[0])
    assert storage.batch_set(["k3"], [pool.get_data_page(0)]) and storage.exists("k3")
    assert storage.get_stats()["stored_pages"] == 3
    storage.clear()
    assert storage.batch_exists(["k0"]) == 0
    storage.close()
    with pytest.raises(LayoutError, match="MLA"):
        storage_cls(config_cls(0, 1, True, False, "mla-model", extra), {})
