"""The SGLang-facing class: `NenCacheHiCacheStorage`, a `HiCacheStorage`. The one module of the package
that imports SGLang; SGLang's backend factory loads it by its module path (see the package docstring).

SGLang creates dynamic backends as `cls(storage_config, kwargs)`, then registers the host pool that
holds the KV (`register_mem_pool_host`), hybrid models' other host pools by name
(`register_mem_host_pool_v2`), and says when that burst is over (`on_host_pools_registered`). The
page stores are built then, when every pool's page geometry is known: one per MHA or MLA pool, the
memory tier's `cpu_size` shared among them in proportion to their page sizes. A pool registered
later, or one whose pages are not KV pages NenCache can read (Mamba states, for example), is stored
in the lower tiers only, or not at all: its pages are then misses and SGLang recomputes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
        PoolHitPolicy,
        PoolName,
        PoolTransfer,
        PoolTransferResult,
    )
    from sglang.srt.observability.metrics_collector import StorageMetrics
except ImportError as exc:
    raise ImportError(
        f"{__name__} needs SGLang, which could not be imported ({exc}). Install SGLang "
        "(`pip install 'nencache[sglang]'`); the rest of nencache.integrations.sglang works without it."
    ) from exc

from nencache.config_loader import load_config
from nencache.errors import ClosedError, LayoutError
from nencache.integrations.page_store import PageStore, page_namespace
from nencache.integrations.sglang.backend import HiCacheBackend
from nencache.integrations.sglang.metrics import TransferLog
from nencache.integrations.sglang.pages import HostPageLayout
from nencache.integrations.sglang.settings import config_overrides
from nencache.tiers.memory import raw_page_bytes

log = logging.getLogger("nencache.sglang")

_ANCHOR = str(PoolName.KV)


class NenCacheHiCacheStorage(HiCacheStorage):
    """HiCache L3 storage in NenCache's tiers (configured by NENCACHE_* / LMCACHE_* and the extra config)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.config = load_config(overrides=config_overrides(dict(storage_config.extra_config or {}))).config
        self.metrics = TransferLog() if storage_config.enable_storage_metrics else None
        self.backends: dict[str, HiCacheBackend] = {}
        self._pending: dict[str, Any] = {}  # name -> host pool, until the stores are built
        self._ready = False
        self._lock = threading.Lock()

    # --- registration --------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        HostPageLayout.of(mem_pool_host)  # an unsupported KV pool fails the attach, with its reason
        with self._lock:
            self._pending = {_ANCHOR: mem_pool_host, **self._pending}

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        with self._lock:
            if self._ready:
                self._serve({str(host_pool_name): host_pool}, memory=False)
            else:
                self._pending.setdefault(str(host_pool_name), host_pool)

    def on_host_pools_registered(self) -> None:
        with self._lock:
            self._build()

    # --- the zero-copy interface (extra config "interface_v1": 1) ------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        return self._backend().batch_exists(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        backend = self._backend()
        return self._timed(False, backend, lambda: backend.batch_get_v1(keys, host_indices))

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        backend = self._backend()
        return self._timed(True, backend, lambda: backend.batch_set_v1(keys, host_indices))

    # --- the per-pool interface of hybrid models -----------------------------------------------------
    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: Any = None) -> PoolTransferResult:
        """The longest KV prefix whose pages every pool can restore, as SGLang's file backend counts it:
        an `ALL_PAGES` pool must hold each page of the prefix, a `TRAILING_PAGES` pool the last
        `len(transfer.keys)` pages before the prefix's end; `BLOCK_GROUPS` pools do not limit it."""
        kv_pages = self.batch_exists(keys)
        hits: dict[Any, int] = {PoolName.KV: kv_pages} if kv_pages else {}
        restorable = set(range(1, kv_pages + 1))
        for transfer in pool_transfers or []:
            if not restorable or transfer.hit_policy == PoolHitPolicy.BLOCK_GROUPS:
                continue
            backend = self.backends.get(str(transfer.name))
            if transfer.hit_policy == PoolHitPolicy.ALL_PAGES:
                boundary = 0 if backend is None else backend.batch_exists(keys[:kv_pages])
                pool_restorable = set(range(1, boundary + 1))
            else:
                present = [backend is not None and backend.batch_exists([key]) == 1 for key in keys[:kv_pages]]
                trailing = max(1, len(transfer.keys or ()))
                pool_restorable = {end for end in range(1, kv_pages + 1) if all(present[max(0, end - trailing):end])}
                boundary = max(pool_restorable, default=0)
            if boundary:
                hits[transfer.name] = boundary
            restorable &= pool_restorable
        ordered = sorted(restorable)
        return PoolTransferResult(ordered[-1] if ordered else 0, hits, ordered)

    def batch_get_v2(self, transfers: list[PoolTransfer], extra_info: Any = None) -> dict[Any, list[bool]]:
        return self._per_pool(transfers, backup=False)

    def batch_set_v2(self, transfers: list[PoolTransfer], extra_info: Any = None) -> dict[Any, list[bool]]:
        return self._per_pool(transfers, backup=True)

    # --- the older per-page interface -------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._backend().batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        backend = self._backend()
        return self._timed(False, backend, lambda: backend.get(key, target_location))

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        backend, targets = self._backend(), target_locations or [None] * len(keys)
        return self._timed(False, backend, lambda: [backend.get(key, t) for key, t in zip(keys, targets)])

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        backend = self._backend()
        return self._timed(True, backend, lambda: backend.set(key, value))

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        backend = self._backend()
        done = self._timed(True, backend, lambda: [backend.set(key, value) for key, value in zip(keys, values or [])])
        return all(done)

    # --- housekeeping --------------------------------------------------------------------------------
    def clear(self) -> None:
        for backend in self._distinct():
            backend.store.clear()

    def get_stats(self) -> StorageMetrics:
        """SGLang's storage metrics since the last call (empty unless `--enable-storage-metrics`)."""
        metrics = StorageMetrics()
        if self.metrics is not None:
            prefetch, backup, prefetch_gbps, backup_gbps = self.metrics.drain()
            metrics.prefetch_pgs.extend(prefetch)
            metrics.backup_pgs.extend(backup)
            metrics.prefetch_bandwidth.extend(prefetch_gbps)
            metrics.backup_bandwidth.extend(backup_gbps)
        return metrics

    def nencache_stats(self) -> dict[str, Any]:
        """NenCache's own counters and tier statistics, per served host pool."""
        return {name: backend.store.stats() for name, backend in self.backends.items()}

    def close(self) -> None:
        with self._lock:
            for backend in self._distinct():
                backend.store.close()
            self.backends, self._pending, self._ready = {}, {}, False

    # --- internals -----------------------------------------------------------------------------------
    def _backend(self) -> HiCacheBackend:
        if not self._ready:
            with self._lock:
                self._build()
        backend = self.backends.get(_ANCHOR)
        if backend is None:
            raise ClosedError("NenCacheHiCacheStorage has no host pool yet (or was closed)")
        return backend

    def _build(self) -> None:
        """Build the page stores of the pools registered so far (under the lock)."""
        if self._ready or _ANCHOR not in self._pending:
            return
        self._serve(self._pending, memory=True)
        self._pending, self._ready = {}, True

    def _serve(self, pools: dict[str, Any], memory: bool) -> None:
        """Give each pool a backend; names registered for one host pool object share its backend."""
        fresh: dict[str, HostPageLayout] = {}
        same: dict[str, str] = {}
        for name, pool in pools.items():
            twin = next((b for b in self.backends.values() if b.pool is pool), None)
            earlier = next((n for n in fresh if pools[n] is pool), None)
            if twin is not None:
                self.backends[name] = twin
            elif earlier is not None:
                same[name] = earlier
            else:
                try:
                    fresh[name] = HostPageLayout.of(pool)
                except LayoutError as exc:
                    log.warning("NenCache HiCache storage: the %s host pool (%s) is not stored: %s. Its pages are "
                                "misses, so SGLang recomputes what needs them", name, type(pool).__name__, exc)
        total = sum(page.page_bytes for page in fresh.values())
        for name, page in fresh.items():
            share = int(self.config.tiers.cpu.size) * page.page_bytes // total if memory else 0
            self.backends[name] = self._make_backend(name, pools[name], page, share)
        for name, earlier in same.items():
            self.backends[name] = self.backends[earlier]

    def _make_backend(self, name: str, pool: Any, page: HostPageLayout, cpu_bytes: int) -> HiCacheBackend:
        cfg = self.storage_config
        shard = [page.page_format, name, f"pp={cfg.pp_rank}/{cfg.pp_size}"]
        if not (cfg.is_mla_model and page.latent):  # MLA KV is the same on every TP rank: they share its pages
            shard.append(f"tp={cfg.tp_rank}/{cfg.tp_size}")
        if cfg.attn_cp_size > 1:
            shard.append(f"cp={cfg.attn_cp_rank}/{cfg.attn_cp_size}")
        namespace = page_namespace(str(cfg.model_name or ""), page.layout, page.page_tokens, shard="/".join(shard),
                                   tenant=self.config.tenant)
        config = self.config
        if config.tiers.cpu.enabled and cpu_bytes < raw_page_bytes(page.layout, page.page_tokens):
            config = config.replace(local_cpu=False)
        elif config.tiers.cpu.enabled:
            config = config.replace(cpu_size=cpu_bytes)
        store = PageStore.from_config(config, page.layout, page.page_tokens, namespace)
        log.info("NenCache HiCache storage: %s pool, layout %s (%s), %s pages of %d tokens, memory tier %s", name,
                 page.layout.describe(), page.page_format, page.kind, page.page_tokens,
                 f"{cpu_bytes} bytes" if store.memory is not None else "off")
        return HiCacheBackend(store, pool, page)

    def _distinct(self) -> list[HiCacheBackend]:
        return list({id(b): b for b in self.backends.values()}.values())

    def _per_pool(self, transfers: Sequence[PoolTransfer], backup: bool) -> dict[Any, list[bool]]:
        self._backend()
        results: dict[Any, list[bool]] = {}
        for transfer in transfers:
            keys = list(transfer.keys or [])
            backend = self.backends.get(str(transfer.name))
            indices = transfer.host_indices
            if backend is None or indices is None or indices.numel() != len(keys) * backend.page.page_tokens:
                if backend is not None:
                    log.error("%s: %d pages of %s need %d host indices, got %s", "batch_set_v2" if backup
                              else "batch_get_v2", len(keys), transfer.name, len(keys) * backend.page.page_tokens,
                              None if indices is None else indices.numel())
                results[transfer.name] = [False] * len(keys)
                continue
            call = backend.batch_set_v1 if backup else backend.batch_get_v1
            results[transfer.name] = self._timed(backup, backend, lambda: call(keys, indices))
        return results

    def _timed(self, backup: bool, backend: HiCacheBackend, call: Callable[[], Any]) -> Any:
        if self.metrics is None:
            return call()
        start = time.perf_counter()
        result = call()
        pages = sum(1 for r in result if r is not None and r is not False) if isinstance(result, list) else int(
            result is not None and result is not False)
        self.metrics.record(backup, pages, pages * backend.page.page_bytes, time.perf_counter() - start)
        return result
