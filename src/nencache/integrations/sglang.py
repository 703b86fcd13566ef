"""SGLang integration: NenCache as a HiCache storage backend (SGLang's L3, below GPU and host memory).

Launch SGLang with::

    python -m sglang.launch_server --model-path MODEL --page-size 64 --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"nencache","module_path":"nencache.integrations.sglang",
                                               "class_name":"NenCacheHiCacheStorage","interface_v1":1}'

HiCache names each page of `page_size` tokens by a hash of its prefix and moves pages between its
host pool and the storage backend by those names. `HiCacheBackend` implements HiCache's storage
calls over a host pool and a `PageStore`, which keeps the pages in NenCache's tiers as ordinary
chunks whatever the host pool's memory layout (`HostPageLayout` converts). SGLang itself is
imported only by `NenCacheHiCacheStorage` (in `sglang_backend`), loaded on first use of that name.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore
from nencache.layout import KVLayout

# Host pool layout -> (page shape from (layers, tokens, heads, dim), permutation to [layers, 2, tokens, heads, dim]).
_PAGE_SHAPES = {
    "layer_first": (lambda l, t, h, d: (2, l, t, h, d), (1, 0, 2, 3, 4)),
    "page_first": (lambda l, t, h, d: (2, t, l, h, d), (2, 0, 1, 3, 4)),
    "page_first_direct": (lambda l, t, h, d: (2, l, t, h, d), (1, 0, 2, 3, 4)),
    "page_head": (lambda l, t, h, d: (2, h, t, l, d), (3, 0, 2, 1, 4)),
}


def __getattr__(name: str) -> Any:
    if name != "NenCacheHiCacheStorage":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        backend = importlib.import_module("nencache.integrations.sglang_backend")
    except ImportError as exc:
        raise ImportError(
            f"nencache.integrations.sglang.{name} needs SGLang, which could not be imported ({exc}). Install "
            "SGLang on a machine it supports; HiCacheBackend, HostPageLayout and PageStore work without it."
        ) from exc
    return backend.NenCacheHiCacheStorage


class HostPool(Protocol):
    """What the backend uses of SGLang's host KV pool (`HostKVCache`)."""

    page_size: int

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor: ...

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None: ...


@dataclass(frozen=True, slots=True)
class HostPageLayout:
    """How one page of SGLang's MHA host pool is laid out, and the conversion to and from a chunk."""

    kind: str
    layout: KVLayout
    page_tokens: int

    def __post_init__(self) -> None:
        if self.kind not in _PAGE_SHAPES:
            raise LayoutError(f"host memory layout {self.kind!r} is not supported; use one of {', '.join(_PAGE_SHAPES)}")

    @classmethod
    def of(cls, pool: Any) -> "HostPageLayout":
        """From an SGLang host pool (`MHATokenToKVPoolHost`: layer_num, head_num, head_dim, dtype, layout)."""
        if not hasattr(pool, "head_num"):
            raise LayoutError(f"{type(pool).__name__} is not an MHA host pool; MLA and hybrid pools are not supported")
        layout = KVLayout(int(pool.layer_num), int(pool.head_num), int(pool.head_dim), pool.dtype)
        return cls(str(pool.layout), layout, int(pool.page_size))

    @property
    def page_shape(self) -> tuple[int, ...]:
        shape_of, _ = _PAGE_SHAPES[self.kind]
        return shape_of(self.layout.num_layers, self.page_tokens, self.layout.num_kv_heads, self.layout.head_dim)

    def to_chunk(self, page: torch.Tensor) -> torch.Tensor:
        """A host page (flat, or shaped as the pool returns it) as a `[layers, 2, tokens, heads, dim]` view."""
        _, order = _PAGE_SHAPES[self.kind]
        if page.numel() != self.layout.nbytes(self.page_tokens) // self.layout.itemsize or page.dtype != self.layout.dtype:
            raise LayoutError(f"host page is {page.numel()} x {page.dtype}; expected {self.page_shape} {self.layout.dtype}")
        return page.reshape(self.page_shape).permute(order)

    def from_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """A chunk as the flat page the host pool takes (`set_from_flat_data_page`)."""
        _, order = _PAGE_SHAPES[self.kind]
        inverse = [order.index(axis) for axis in range(len(order))]
        return self.layout.check(chunk, self.page_tokens).permute(inverse).contiguous().view(-1)


class HiCacheBackend:
    """HiCache's storage calls (`batch_exists`, `batch_get_v1`, `batch_set_v1`, and the older per-key
    ones) over a host pool and a `PageStore`. Keys are SGLang's page hashes; `host_indices` are token
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
