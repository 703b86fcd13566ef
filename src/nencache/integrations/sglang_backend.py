"""The SGLang-facing class: `NenCacheHiCacheStorage`, a `HiCacheStorage`. Imports SGLang; load it
through `nencache.integrations.sglang`, which explains what is missing when SGLang is not installed.

SGLang creates dynamic backends as `cls(storage_config, kwargs)` and then calls
`register_mem_pool_host(host_pool)`; the page store is built then, when the page geometry is known.
Every storage call delegates to `HiCacheBackend`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from nencache.config import load_config
from nencache.errors import ClosedError, LayoutError
from nencache.integrations.page_store import PageStore, page_namespace
from nencache.integrations.sglang import HiCacheBackend, HostPageLayout

log = logging.getLogger("nencache.sglang")

_FACTORY_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")


class NenCacheHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage in NenCache's tiers (configured by NENCACHE_* / LMCACHE_* and `nencache.*` /
    `lmcache.*` keys of `--hicache-storage-backend-extra-config`)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        if getattr(storage_config, "is_mla_model", False):
            raise LayoutError("NenCacheHiCacheStorage stores MHA pages; MLA models are not supported yet")
        self.storage_config = storage_config
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        overrides = {key.split(".", 1)[1]: value for key, value in extra.items()
                     if key not in _FACTORY_KEYS and key.startswith(("nencache.", "lmcache."))}
        self.config = load_config(overrides=overrides).config
        self.backend: HiCacheBackend | None = None

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = HostPageLayout.of(mem_pool_host)
        cfg = self.storage_config
        namespace = page_namespace(str(getattr(cfg, "model_name", "") or ""), page.layout, page.page_tokens,
                                   tp_rank=int(getattr(cfg, "tp_rank", 0)), tp_size=int(getattr(cfg, "tp_size", 1)),
                                   pp_rank=int(getattr(cfg, "pp_rank", 0) or 0), tenant=self.config.tenant)
        store = PageStore.from_config(self.config, page.layout, page.page_tokens, namespace)
        self.backend = HiCacheBackend(store, mem_pool_host, page)
        log.info("NenCache HiCache storage: layout %s, %s pages of %d tokens", page.layout.describe(), page.kind,
                 page.page_tokens)

    # --- the zero-copy interface (extra config "interface_v1": 1) ------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        return self._backend().batch_exists(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._backend().batch_get_v1(keys, host_indices)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._backend().batch_set_v1(keys, host_indices)

    # --- the older per-page interface -------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._backend().batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self._backend().get(key, target_location)

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        targets = target_locations or [None] * len(keys)
        return [self._backend().get(key, target) for key, target in zip(keys, targets)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self._backend().set(key, value)

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        return all(self._backend().set(key, value) for key, value in zip(keys, values or []))

    def clear(self) -> None:
        if self.backend is not None:
            self.backend.store.clear()

    def get_stats(self) -> dict[str, Any] | None:
        return None if self.backend is None else self.backend.store.stats()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.store.close()
            self.backend = None

    def _backend(self) -> HiCacheBackend:
        if self.backend is None:
            raise ClosedError("NenCacheHiCacheStorage has no host pool yet (or was closed)")
        return self.backend
