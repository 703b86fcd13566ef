"""Fixtures for the tests against SGLang's own HiCache classes (sglang 0.5.23, CPU).

SGLang's cache modules import `sglang.srt.configs`, whose multimodal helpers (InternVL, DeepSeek-OCR,
...) import torchvision at module level. PyPI's torchvision wheels are CUDA builds that do not load
with the CPU torch used here, so when `import torchvision` fails, the `sglang` fixture imports SGLang
with a stand-in `torchvision` in `sys.modules`: it has only the names those modules bind at import
(`transforms`, `transforms.functional`, `transforms.v2.functional`, `InterpolationMode`); any image
transform through it fails. It is taken out of `sys.modules` again right after the import, and
transformers' own torchvision probe runs first, so transformers still sees torchvision as absent.
Nothing under test touches an image. A real torchvision, where one imports, is always used instead.

Without SGLang installed the tests that use these fixtures are skipped.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

LAYERS, HEADS, DIM, PAGE = 3, 2, 8, 4
LATENT = 24  # an MLA row: kv_lora_rank 16 + rope 8
DEVICE_TOKENS = 64  # the device pool; host pools hold about twice that

_MODULES = {
    "hicache_storage": "sglang.srt.mem_cache.hicache_storage",
    "memory_pool_host": "sglang.srt.mem_cache.memory_pool_host",
    "backend_factory": "sglang.srt.mem_cache.storage.backend_factory",
    "memory_pool": "sglang.srt.mem_cache.memory_pool",
    "mha": "sglang.srt.mem_cache.pool_host.mha",
    "mla": "sglang.srt.mem_cache.pool_host.mla",
    "mamba": "sglang.srt.mem_cache.pool_host.mamba",
    "device_pool_info": "sglang.srt.mem_cache.device_pool_info",
    "allocator": "sglang.srt.mem_cache.allocator.paged",
    "cache_controller": "sglang.srt.managers.cache_controller",
    "metrics": "sglang.srt.observability.metrics_collector",
    "runtime_context": "sglang.srt.runtime_context",
    "utils": "sglang.srt.mem_cache.utils",
}


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    class InterpolationMode(enum.Enum):  # the values torchvision's enum has
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]
    doc = "stand-in: SGLang's cache modules import these names only"
    modules = {name: types.ModuleType(name, doc) for name in names}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    for name in ("torchvision.transforms", "torchvision.transforms.functional"):
        modules[name].InterpolationMode = InterpolationMode
    return modules


def _import_sglang() -> SimpleNamespace:
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed (make setup installs it: the sglang extra, sglang==0.5.23 --no-deps)")
    stand_in: dict[str, types.ModuleType] = {}
    try:
        import torchvision  # noqa: F401
    except Exception:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()  # cached: transformers keeps its true answer (absent)
        stand_in = _torchvision_stand_in()
        sys.modules.update(stand_in)
    try:
        return SimpleNamespace(**{alias: importlib.import_module(path) for alias, path in _MODULES.items()})
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def sglang() -> SimpleNamespace:
    """SGLang's real modules, by short name (see `_MODULES`)."""
    return _import_sglang()


@pytest.fixture()
def parallel(sglang: SimpleNamespace) -> Iterator[None]:
    """One rank, no model parallelism: the values SGLang's launcher would publish for such a run."""
    with sglang.runtime_context.get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                                         attn_dcp_size=1, attn_dcp_rank=0):
        yield


@pytest.fixture()
def make_pool(sglang: SimpleNamespace) -> Callable[..., Any]:
    """`make_pool(kind, layout)`: a real SGLang host pool ("mha" or "mla") on CPU over a real device pool."""

    def make(kind: str, layout: str, dtype: torch.dtype = torch.bfloat16) -> Any:
        return build_host_pool(sglang, kind, layout, dtype)[1]

    return make


def build_host_pool(sglang: SimpleNamespace, kind: str, layout: str, dtype: torch.dtype = torch.bfloat16,
                    page: int = PAGE) -> tuple[Any, Any]:
    """(device pool, host pool), built as SGLang's pool assembler builds them, on CPU."""
    pools = sglang.memory_pool
    if kind == "mha":
        device = pools.MHATokenToKVPool(DEVICE_TOKENS, page, dtype, HEADS, DIM, LAYERS, "cpu", False,
                                        start_layer=0, end_layer=LAYERS)
        host = sglang.mha.MHATokenToKVPoolHost(
            device.get_device_pool_infos()[0].buffer_info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
            device_capacity_tokens=device.size, start_layer=device.start_layer, end_layer=device.end_layer)
    elif kind == "mla":
        device = pools.MLATokenToKVPool(DEVICE_TOKENS, page, dtype, 16, LATENT - 16, LAYERS, "cpu", False,
                                        start_layer=0, end_layer=LAYERS)
        host = sglang.mla.MLATokenToKVPoolHost(
            device.get_device_pool_infos()[0].buffer_info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
            device_capacity_tokens=device.size, start_layer=device.start_layer, end_layer=device.end_layer,
            target_layer_num=device.layer_num)
    else:
        raise ValueError(kind)
    return device, host


def random_pages(host: Any, starts: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Fill the host pool's pages at `starts` with random values; return each page as SGLang holds it."""
    generator = torch.Generator().manual_seed(seed)
    pages = []
    for start in starts:
        page = host.get_data_page(start, flat=True)
        values = torch.randn(page.shape, generator=generator).to(page.dtype)
        host.set_from_flat_data_page(start, values)
        pages.append(values)
    return pages


def host_indices(starts: list[int], page: int = PAGE) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + page, dtype=torch.int64) for s in starts])


def storage_config(sglang: SimpleNamespace, extra: dict[str, Any] | None = None, *, mla: bool = False,
                   tp_rank: int = 0, tp_size: int = 1, metrics: bool = False, model: str = "tiny-model") -> Any:
    """A `HiCacheStorageConfig` as HiCacheController makes one, NenCache named in its extra config."""
    return sglang.hicache_storage.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=mla,
        enable_storage_metrics=metrics, is_page_first_layout=False, model_name=model,
        extra_config={**DYNAMIC, **(extra or {})})


# The extra config of docs/migrating-from-lmcache.md and the README.
DYNAMIC = {"backend_name": "nencache", "module_path": "nencache.integrations.sglang.storage",
           "class_name": "NenCacheHiCacheStorage", "interface_v1": 1}


def create_storage(sglang: SimpleNamespace, host: Any, config: Any) -> Any:
    """The backend, created and attached as HiCacheController.attach_storage_backend does."""
    storage = sglang.backend_factory.StorageBackendFactory.create_backend("dynamic", config, host)
    storage.register_mem_pool_host(host)
    storage.on_host_pools_registered()
    return storage
