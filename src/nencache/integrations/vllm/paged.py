"""Paged KV: moving tokens between an engine's paged layer buffers and NenCache chunks.

vLLM keeps one buffer per attention layer, declared as `[kernel_blocks, heads, block_tokens,
content]` with the strides of its `KVCacheLayout`. A request's token `t` lives at slot
`block_ids[t // block_size] * block_size + t % block_size`; a manager block of `block_size` tokens
may be split into kernel blocks of `block_tokens`, so a slot's kernel block is
`slot // block_tokens` and its place inside it `slot % block_tokens`. Where inside the block a
token's keys and values sit is the backend's `BlockPlacement`.

`PagedKV` gathers the tokens of a slot list into the chunk layout `[layers, 2, tokens, heads, dim]`
and scatters chunks back, with one indexing operation per layer and part (no loop over tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nencache.errors import LayoutError
from nencache.integrations.vllm.placement import BlockPlacement
from nencache.layout import KVLayout


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


class PagedLayer:
    """One layer's buffer, seen as keys and values `[kernel_blocks, block_tokens, heads, dim]` (strided
    views when the placement is affine) or as its flat storage plus the placement's offsets."""

    __slots__ = ("parts", "flat", "start", "block_stride")

    def __init__(self, buffer: torch.Tensor, placement: BlockPlacement) -> None:
        storage = torch.empty(0, dtype=buffer.dtype, device=buffer.device).set_(buffer.untyped_storage())
        self.flat = storage
        self.start = buffer.storage_offset()
        self.block_stride = buffer.stride(0)
        blocks = buffer.shape[0]
        size = (blocks, placement.block_tokens, placement.num_heads, placement.head_dim)
        self.parts = None if placement.affine is None else tuple(
            storage.as_strided(size, (self.block_stride, a.per_token, a.per_head, a.per_dim), self.start + a.base)
            for a in placement.affine)


class PagedKV:
    """The paged KV buffers of all layers of one KV cache group, in layer order."""

    def __init__(self, layers: Sequence[torch.Tensor], placement: BlockPlacement) -> None:
        if not layers:
            raise LayoutError("PagedKV needs at least one layer buffer")
        first = layers[0]
        for index, layer in enumerate(layers):
            if (layer.shape != first.shape or layer.stride() != first.stride() or layer.dtype != first.dtype
                    or layer.device != first.device):
                raise LayoutError(f"layer {index} buffer is {tuple(layer.shape)} strides {layer.stride()} "
                                  f"{layer.dtype} on {layer.device}; layer 0 is {tuple(first.shape)} strides "
                                  f"{first.stride()} {first.dtype} on {first.device}")
        if first.shape[2] != placement.block_tokens or first.shape[1] != placement.num_heads:
            raise LayoutError(f"buffers of shape {tuple(first.shape)} do not match a placement of "
                              f"{placement.num_heads} heads x {placement.block_tokens} tokens")
        self.placement = placement
        self.block_tokens = placement.block_tokens
        self.num_kernel_blocks = int(first.shape[0])
        self.layers = [PagedLayer(layer, placement) for layer in layers]
        self.layout = KVLayout(len(layers), placement.num_heads, placement.head_dim, first.dtype)
        self.device = first.device

    @property
    def num_slots(self) -> int:
        return self.num_kernel_blocks * self.block_tokens

    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The KV of `slots` as `[layers, 2, len(slots), heads, dim]`, written into `out` when given."""
        block, offset = self._split(slots)
        out = self._out(out, len(block))
        for index, layer in enumerate(self.layers):
            if layer.parts is not None:
                for part, view in enumerate(layer.parts):
                    out[index, part] = view[block, offset]
            else:
                picked = layer.flat.take(self._offsets(layer, block, offset))  # [tokens, 2, heads, dim]
                out[index] = picked.transpose(0, 1)
        return out

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write `kv` (`[layers, 2, len(slots), heads, dim]`, any device) into `slots` of every layer."""
        block, offset = self._split(slots)
        self.layout.check(kv, len(block))
        for index, layer in enumerate(self.layers):
            src = kv[index].to(self.device, non_blocking=True)
            if layer.parts is not None:
                for part, view in enumerate(layer.parts):
                    view.index_put_((block, offset), src[part])
            else:
                layer.flat.index_put_((self._offsets(layer, block, offset),), src.transpose(0, 1))

    def _split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.as_tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        if slots.dim() != 1:
            raise LayoutError(f"slots must be 1-D, got shape {tuple(slots.shape)}")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_slots):
            raise LayoutError(f"slot out of range: the buffers hold {self.num_slots} slots")
        return slots // self.block_tokens, slots % self.block_tokens

    def _offsets(self, layer: PagedLayer, block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        inner = self.placement.offsets.to(self.device)[offset]  # [tokens, 2, heads, dim]
        return inner + (layer.start + block * layer.block_stride).view(-1, 1, 1, 1)

    def _out(self, out: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        if out is None:
            return torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype, device=self.device)
        return self.layout.check(out, num_tokens)
