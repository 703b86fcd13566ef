"""SGLang integration: NenCache as a HiCache storage backend (SGLang's L3, below GPU and host memory).

Launch SGLang with::

    python -m sglang.launch_server --model-path MODEL --page-size 64 --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"nencache","module_path":"nencache.integrations.sglang",
                                               "class_name":"NenCacheHiCacheStorage","interface_v1":1}'

HiCache names each page of `page_size` tokens by a hash of its prefix and moves pages between its
host pool and the storage backend by those names. `HiCacheBackend` implements HiCache's storage
calls over one host pool and a `PageStore`, which keeps the pages in NenCache's tiers as ordinary
chunks whatever the host pool's memory layout (`HostPageLayout` converts, reading the geometry the
pool declares). SGLang itself is imported only by `NenCacheHiCacheStorage` (in `sglang_backend`),
loaded on first use of that name.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore
from nencache.layout import KVLayout

# (page shape from (layers, tokens, heads, dim), permutation of that shape to [layers, 2, tokens, heads, dim]).
_PageShape = tuple[Callable[[int, int, int, int], tuple[int, ...]], tuple[int, ...]]

# MHA host pools (`MHATokenToKVPoolHost`): the page `get_data_page` returns, per `--hicache-mem-layout`.
_MHA_PAGES: dict[str, _PageShape] = {
    "layer_first": (lambda l, t, h, d: (2, l, t, h, d), (1, 0, 2, 3, 4)),
    "page_first": (lambda l, t, h, d: (2, t, l, h, d), (2, 0, 1, 3, 4)),
    "page_first_direct": (lambda l, t, h, d: (2, l, t, h, d), (1, 0, 2, 3, 4)),
    "page_head": (lambda l, t, h, d: (2, h, t, l, d), (3, 0, 2, 1, 4)),
}
# MLA host pools (`MLATokenToKVPoolHost`) hold one latent row of `kv_cache_dim` per token and layer
# (no separate V). A chunk keeps the row's first half where keys go and its second half where values
# go: `[layers, 2, tokens, 1, kv_cache_dim / 2]`, the same bytes reordered, nothing added.
_MLA_PAGES: dict[str, _PageShape] = {
    "layer_first": (lambda l, t, h, d: (l, t, h, 2, d), (0, 3, 1, 2, 4)),
    "page_first": (lambda l, t, h, d: (t, l, h, 2, d), (1, 3, 0, 2, 4)),
    "page_first_direct": (lambda l, t, h, d: (l, t, h, 2, d), (0, 3, 1, 2, 4)),
}


def __getattr__(name: str) -> Any:
    if name != "NenCacheHiCacheStorage":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        backend = importlib.import_module("nencache.integrations.sglang_backend")
    except ImportError as exc:
        raise ImportError(
            f"nencache.integrations.sglang.{name} needs SGLang, which could not be imported ({exc}). Install "
            "SGLang (`pip install 'nencache[sglang]'`); HiCacheBackend, HostPageLayout and PageStore work without it."
        ) from exc
    return backend.NenCacheHiCacheStorage


class HostPool(Protocol):
    """What the backend uses of SGLang's host KV pool (`HostKVCache`)."""

    page_size: int

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor: ...

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None: ...


@dataclass(frozen=True, slots=True)
class HostPageLayout:
    """How one page of an SGLang host pool is laid out, and the conversion to and from a chunk.

    `latent` marks an MLA pool: `layout.head_dim` is then half the latent row and `num_kv_heads` 1.
    """

    kind: str
    layout: KVLayout
    page_tokens: int
    latent: bool = False

    def __post_init__(self) -> None:
        table = _MLA_PAGES if self.latent else _MHA_PAGES
        if self.kind not in table:
            pool = "MLA" if self.latent else "MHA"
            raise LayoutError(
                f"host memory layout {self.kind!r} of an {pool} host pool is not supported (SGLang's pool has no "
                f"per-page access for it); start SGLang with --hicache-mem-layout {' or '.join(table)}"
            )

    @classmethod
    def of(cls, pool: Any) -> "HostPageLayout":
        """From the geometry an SGLang host pool declares.

        MLA pools declare `kv_cache_dim` (the latent row), MHA pools `head_num`, `head_dim` and
        `v_head_dim`; both declare `layer_num`, `dtype`, `page_size` and `layout`. Where the pool can
        make an empty page (`get_dummy_flat_data_page`), its size must agree with that reading.
        """
        if int(getattr(pool, "dcp_size", 1) or 1) != 1:
            raise LayoutError("host pools split by decode context parallelism (--dcp-size > 1) are not supported")
        if hasattr(pool, "kv_cache_dim"):
            width = int(pool.kv_cache_dim)
            if width % 2:
                raise LayoutError(f"MLA latent rows of odd width ({width}) are not supported")
            layout, latent = KVLayout(int(pool.layer_num), 1, width // 2, pool.dtype), True
        elif hasattr(pool, "head_num"):
            head_dim = int(pool.head_dim)
            if int(getattr(pool, "v_head_dim", head_dim) or head_dim) != head_dim:
                raise LayoutError(f"host pool keys are {head_dim} wide but values {pool.v_head_dim}; K and V of "
                                  "different widths are not supported")
            layout, latent = KVLayout(int(pool.layer_num), int(pool.head_num), head_dim, pool.dtype), False
        else:
            raise LayoutError(f"{type(pool).__name__} declares neither MHA heads (head_num) nor an MLA latent "
                              "(kv_cache_dim); only MHA and MLA KV host pools are supported")
        page = cls(str(pool.layout), layout, int(pool.page_size), latent)
        empty = getattr(pool, "get_dummy_flat_data_page", None)
        if empty is not None and (numel := empty().numel()) != page.page_numel:
            raise LayoutError(f"{type(pool).__name__} pages hold {numel} values, but its declared geometry "
                              f"{layout.describe()} x {page.page_tokens} tokens gives {page.page_numel}")
        return page

    @property
    def page_numel(self) -> int:
        return self.layout.nbytes(self.page_tokens) // self.layout.itemsize

    @property
    def page_bytes(self) -> int:
        return self.layout.nbytes(self.page_tokens)

    @property
    def page_format(self) -> str:
        """What kind of page a chunk holds: part of the key namespace, so MHA and MLA pages never mix."""
        return "mla-latent" if self.latent else "mha"

    @property
    def page_shape(self) -> tuple[int, ...]:
        shape_of, _ = self._shape()
        return shape_of(self.layout.num_layers, self.page_tokens, self.layout.num_kv_heads, self.layout.head_dim)

    def to_chunk(self, page: torch.Tensor) -> torch.Tensor:
        """A host page (flat, or shaped as the pool returns it) as a `[layers, 2, tokens, heads, dim]` view."""
        _, order = self._shape()
        if page.numel() != self.page_numel or page.dtype != self.layout.dtype:
            raise LayoutError(f"host page is {page.numel()} x {page.dtype}; "
                              f"expected {self.page_shape} {self.layout.dtype}")
        return page.reshape(self.page_shape).permute(order)

    def from_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """A chunk as the flat page the host pool takes (`set_from_flat_data_page`)."""
        _, order = self._shape()
        inverse = [order.index(axis) for axis in range(len(order))]
        return self.layout.check(chunk, self.page_tokens).permute(inverse).contiguous().view(-1)

    def _shape(self) -> _PageShape:
        return (_MLA_PAGES if self.latent else _MHA_PAGES)[self.kind]


class HiCacheBackend:
    """HiCache's storage calls (`batch_exists`, `batch_get_v1`, `batch_set_v1`, and the older per-key
    ones) over one host pool and a `PageStore`. Keys are SGLang's page hashes; `host_indices` are token
    slots of the host pool, `page_size` per key."""

    def __init__(self, store: PageStore, pool: HostPool, page_layout: HostPageLayout) -> None:
        if page_layout.page_tokens != store.page_tokens or page_layout.layout != store.layout:
            raise LayoutError("the host pool's page geometry differs from the page store's")
        self.store = store
        self.pool = pool
        self.page = page_layout

    def batch_exists(self, keys: Sequence[str]) -> int:
        """How many keys, from the first, are stored."""
        return self.store.exists_prefix(list(keys))

    def batch_get_v1(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[bool]:
        """Copy pages into the host pool at `host_indices` (page `i` starts at `host_indices[i * page_size]`)."""
        starts = self._starts(keys, host_indices)
        staging = [self._empty() for _ in keys]
        found = self.store.get_into(list(keys), staging)
        for start, chunk, ok in zip(starts, staging, found):
            if ok:
                self.pool.set_from_flat_data_page(start, self.page.from_chunk(chunk))
        return found

    def batch_set_v1(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[bool]:
        """Store the host pool's pages at `host_indices` under `keys`."""
        starts = self._starts(keys, host_indices)
        chunks = [self.page.to_chunk(self.pool.get_data_page(start, flat=False)) for start in starts]
        return self.store.put(list(keys), chunks)

    def get(self, key: str, target: torch.Tensor | None = None) -> torch.Tensor | None:
        """One page as a flat host page (into `target` when given), None when not stored."""
        chunk = self._empty()
        if not self.store.get_into([key], [chunk])[0]:
            return None
        flat = self.page.from_chunk(chunk)
        if target is None:
            return flat
        target.view(-1).copy_(flat)
        return target

    def set(self, key: str, value: torch.Tensor) -> bool:
        """Store one flat host page."""
        return self.store.put([key], [self.page.to_chunk(value)])[0]

    def _starts(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[int]:
        size = self.page.page_tokens
        indices = torch.as_tensor(host_indices).reshape(-1)
        if indices.numel() < len(keys) * size:
            raise LayoutError(f"{len(keys)} pages need {len(keys) * size} host indices, got {indices.numel()}")
        return [int(i) for i in indices[: len(keys) * size : size]]

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.store.layout.shape(self.page.page_tokens), dtype=self.store.layout.dtype)


@dataclass(slots=True)
class TransferLog:
    """Pages and bandwidth (GB/s) of each storage read (prefetch) and write (backup) until `drain`.

    SGLang's `--enable-storage-metrics` drains it through `get_stats` into its Prometheus histograms;
    calls from SGLang's prefetch and backup threads record concurrently.
    """

    prefetch_pages: list[int] = field(default_factory=list)
    backup_pages: list[int] = field(default_factory=list)
    prefetch_gbps: list[float] = field(default_factory=list)
    backup_gbps: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, backup: bool, pages: int, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, 1e-9) / 1e9
        with self._lock:
            (self.backup_pages if backup else self.prefetch_pages).append(pages)
            (self.backup_gbps if backup else self.prefetch_gbps).append(rate)

    def drain(self) -> tuple[list[int], list[int], list[float], list[float]]:
        """(prefetch pages, backup pages, prefetch GB/s, backup GB/s) since the last drain."""
        with self._lock:
            out = (self.prefetch_pages, self.backup_pages, self.prefetch_gbps, self.backup_gbps)
            self.prefetch_pages, self.backup_pages, self.prefetch_gbps, self.backup_gbps = [], [], [], []
        return out
