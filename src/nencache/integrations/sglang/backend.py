"""`HiCacheBackend`: HiCache's storage calls over one host pool and a `PageStore`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore
from nencache.integrations.sglang.pages import HostPageLayout, HostPool


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
