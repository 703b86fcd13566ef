"""SGLang host-pool pages as NenCache chunks: `HostPageLayout` reads the geometry a host pool declares and
converts its pages to and from `[layers, 2, tokens, heads, dim]` chunks (the same bytes, reordered)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nencache.errors import LayoutError
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
