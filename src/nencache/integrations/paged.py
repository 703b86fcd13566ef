"""Paged KV: moving tokens between an engine's block-paged KV buffers and NenCache chunks.

Engines such as vLLM keep one KV tensor per attention layer, split into fixed-size blocks:
`[2, num_blocks, block_size, kv_heads, head_dim]` (FlashAttention, the default) or
`[num_blocks, 2, block_size, kv_heads, head_dim]` (FlashInfer). A request's token `t` lives at
slot `block_ids[t // block_size] * block_size + t % block_size`. `PagedKV` gathers the tokens of
a slot list into the chunk layout `[layers, 2, tokens, kv_heads, head_dim]` and scatters chunks
back, with one `index_select` / `index_copy_` per layer (no loop over tokens). Buffers whose
memory order differs from their shape (an HND stride order) are indexed without being copied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from nencache.copy import copy_into
from nencache.errors import LayoutError
from nencache.layout import KVLayout

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def slot_mapping(block_ids: Sequence[int] | torch.Tensor, block_size: int, start: int, end: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The int64 slots of tokens `[start, end)` of a request whose blocks are `block_ids`."""
    if block_size <= 0:
        raise LayoutError(f"block_size must be positive, got {block_size}")
    if not 0 <= start <= end:
        raise LayoutError(f"token range [{start}, {end}) is not valid")
    blocks = torch.as_tensor(block_ids, dtype=torch.int64, device=device)
    needed = -(-end // block_size)
    if blocks.numel() < needed:
        raise LayoutError(f"{end} tokens need {needed} blocks of {block_size}, but the request has {blocks.numel()}")
    positions = torch.arange(start, end, dtype=torch.int64, device=blocks.device)
    return blocks[positions // block_size] * block_size + positions % block_size


def blocks_of(block_ids: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """The block ids holding tokens `[start, end)` (empty for an empty range)."""
    if end <= start:
        return []
    return [int(b) for b in block_ids[start // block_size : -(-end // block_size)]]


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names sorted by the layer number they carry (`model.layers.12.self_attn.attn` -> 12)."""
    def number(name: str) -> tuple[int, str]:
        found = _LAYER_NUMBER.findall(name)
        return (int(found[0]) if found else 1 << 30, name)

    return sorted(names, key=number)


def detect_kv_dim(shape: Sequence[int], block_size: int, num_blocks: int | None = None) -> int:
    """Which dimension of a per-layer paged buffer holds (keys, values): 0 or 1."""
    if len(shape) != 5 or shape[2] != block_size:
        raise LayoutError(
            f"paged KV buffer of shape {tuple(shape)} is not [2, num_blocks, {block_size}, kv_heads, head_dim] "
            f"or [num_blocks, 2, {block_size}, kv_heads, head_dim] (MLA and other packed layouts are not supported)"
        )
    candidates = [dim for dim in (0, 1) if shape[dim] == 2 and (num_blocks is None or shape[1 - dim] == num_blocks)]
    if len(candidates) == 2 and num_blocks is None:
        candidates = [0]  # two blocks in all: the FlashAttention order is the default
    if not candidates:
        raise LayoutError(f"paged KV buffer of shape {tuple(shape)} has no dimension of size 2 for keys/values")
    return candidates[0]


@dataclass(frozen=True, slots=True)
class PagedLayer:
    """One layer's paged buffer viewed as `[2, num_blocks, block_size, kv_heads, head_dim]`."""

    kv: torch.Tensor
    flat: torch.Tensor | None  # `[2, slots, heads, dim]` view when the block and offset dims merge without a copy

    @classmethod
    def of(cls, tensor: torch.Tensor, kv_dim: int) -> "PagedLayer":
        kv = tensor if kv_dim == 0 else tensor.transpose(0, 1)
        mergeable = kv.stride(1) == kv.stride(2) * kv.shape[2]
        flat = kv.flatten(1, 2) if mergeable else None
        return cls(kv, flat)


class PagedKV:
    """The paged KV buffers of all layers of one model replica, in layer order."""

    def __init__(self, layers: Sequence[torch.Tensor], block_size: int, *, kv_dim: int | None = None,
                 num_blocks: int | None = None) -> None:
        if not layers:
            raise LayoutError("PagedKV needs at least one layer buffer")
        first = layers[0]
        dim = detect_kv_dim(first.shape, block_size, num_blocks) if kv_dim is None else kv_dim
        for index, layer in enumerate(layers):
            if layer.shape != first.shape or layer.dtype != first.dtype or layer.device != first.device:
                raise LayoutError(f"layer {index} buffer is {tuple(layer.shape)} {layer.dtype} on {layer.device}; "
                                  f"layer 0 is {tuple(first.shape)} {first.dtype} on {first.device}")
        self.block_size = block_size
        self.kv_dim = dim
        self.layers = [PagedLayer.of(layer, dim) for layer in layers]
        view = self.layers[0].kv
        self.num_blocks = view.shape[1]
        self.layout = KVLayout(len(layers), int(view.shape[3]), int(view.shape[4]), first.dtype)
        self.device = first.device

    @classmethod
    def from_named(cls, kv_caches: Mapping[str, torch.Tensor], block_size: int, **kwargs: int | None) -> "PagedKV":
        """From an engine's `{layer_name: buffer}` map (vLLM's `register_kv_caches`), ordered by layer number."""
        return cls([kv_caches[name] for name in layer_order(list(kv_caches))], block_size, **kwargs)  # type: ignore[arg-type]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The KV of `slots` as `[layers, 2, len(slots), heads, dim]`, written into `out` when given (any device)."""
        slots = self._slots(slots)
        out = self._out(out, len(slots))
        for index, layer in enumerate(self.layers):
            if layer.flat is not None:
                picked = layer.flat.index_select(1, slots)
            else:
                picked = layer.kv[:, slots // self.block_size, slots % self.block_size]
            copy_into(out[index], picked)
        return out

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write `kv` (`[layers, 2, len(slots), heads, dim]`, any device) into `slots` of every layer."""
        slots = self._slots(slots)
        self.layout.check(kv, len(slots))
        for index, layer in enumerate(self.layers):
            src = kv[index].to(self.device, non_blocking=True)
            if layer.flat is not None:
                layer.flat.index_copy_(1, slots, src)
            else:
                layer.kv[:, slots // self.block_size, slots % self.block_size] = src

    def _slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = torch.as_tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        if slots.dim() != 1:
            raise LayoutError(f"slots must be 1-D, got shape {tuple(slots.shape)}")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_slots):
            raise LayoutError(f"slot out of range: the buffers hold {self.num_slots} slots")
        return slots

    def _out(self, out: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        if out is None:
            return torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=self.device)
        return self.layout.check(out, num_tokens)
