"""Where an attention backend puts each token's KV inside a paged block, read from the backend itself.

vLLM declares each layer's paged buffer as a logical `[blocks, heads, block_tokens, content]` view
(its `KVCacheLayout` fixes the strides), but what the content axis holds, and in which order a
block's tokens sit, is each backend's own business. The CPU backend, for one, keeps a block's keys
dimension-major (`[head_dim, tokens]`) and its values token-major: copying a token's row of the
declared view copies the wrong numbers.

So the placement is not guessed. `BlockPlacement.probe` runs the backend's own cache-write
operation (the one the model calls in every forward pass) on a scratch block, writing numbers that
encode (token, part, head, dim), reads back where each landed, and checks that every value landed
exactly once and unchanged. A token's vector is its key followed by its value (`2 * head_dim`), or,
for MLA, its latent vector, whose halves take the key and value places of a chunk.

When the placement is affine in (token, head, dim) for keys and for values (every backend seen so
far), `PagedKV` copies through strided views; otherwise it gathers by precomputed offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nencache.errors import LayoutError

# writer(vectors `[tokens, heads, 2 * head_dim]`, slots `[tokens]` int64, buffer `[blocks, heads, block_tokens, content]`)
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, slots=True)
class Affine:
    """Element offset `base + token * per_token + head * per_head + dim * per_dim` within a block."""

    base: int
    per_token: int
    per_head: int
    per_dim: int


@dataclass(frozen=True, slots=True)
class BlockPlacement:
    """For each (token in block, part, head, dim), its element offset from the block's first element.

    `part` 0 is the key (or the first half of an MLA latent), 1 the value (or the second half).
    Offsets are in the strides of the buffer it was probed for; every layer of a KV cache group has them.
    """

    block_tokens: int
    num_heads: int
    head_dim: int
    offsets: torch.Tensor  # int64 [block_tokens, 2, num_heads, head_dim]
    affine: tuple[Affine, Affine] | None

    @classmethod
    def probe(cls, writer: CacheWriter, like: torch.Tensor, vector_dim: int) -> "BlockPlacement":
        """Learn the placement of `writer` (the backend's cache-write op) for buffers shaped like `like`.

        `like` is one layer's declared buffer `[blocks, heads, block_tokens, content]`; the probe
        writes into a fresh one-block buffer of the same per-block shape, never into `like` itself.
        """
        if like.dim() != 4:
            raise LayoutError(f"a layer's paged KV buffer must be [blocks, heads, block_tokens, content], "
                              f"got shape {tuple(like.shape)}")
        if vector_dim % 2:
            raise LayoutError(f"a token's KV vector of {vector_dim} elements cannot be split into key and value halves")
        _, heads, tokens, content = (int(n) for n in like.shape)
        positions = _probe_positions(writer, like, tokens, heads, vector_dim)
        return cls.from_positions(positions, like, vector_dim // 2)

    @classmethod
    def from_positions(cls, positions: torch.Tensor, like: torch.Tensor, head_dim: int) -> "BlockPlacement":
        """From logical positions `[tokens, heads, 2 * head_dim, 3]` = (head, token row, content column)."""
        tokens, heads = positions.shape[0], positions.shape[1]
        strides = torch.tensor(like.stride()[1:], dtype=torch.int64)
        flat = (positions * strides).sum(-1)  # [tokens, heads, 2D]
        offsets = flat.view(tokens, heads, 2, head_dim).permute(0, 2, 1, 3).contiguous()
        return cls(tokens, heads, head_dim, offsets, _affine_parts(offsets))

    def describe(self) -> str:
        if self.affine is None:
            return "gathered by offset"
        key, value = self.affine
        return (f"keys (token {key.per_token}, head {key.per_head}, dim {key.per_dim}), "
                f"values (token {value.per_token}, head {value.per_head}, dim {value.per_dim})")


def exact_integer_base(dtype: torch.dtype) -> int:
    """The count of consecutive integers from 1 that `dtype` holds exactly (2**24 for float32, 256 for bf16)."""
    if not dtype.is_floating_point:
        raise LayoutError(f"KV dtype {dtype} is not a floating-point type")
    return int(round(2.0 / torch.finfo(dtype).eps))


def _probe_positions(writer: CacheWriter, like: torch.Tensor, tokens: int, heads: int, vector_dim: int) -> torch.Tensor:
    """Where `writer` puts each (token, head, element) of a block: `[tokens, heads, vector_dim, 3]`."""
    count = tokens * heads * vector_dim
    base = min(exact_integer_base(like.dtype), 1 << 20)
    codes = torch.arange(count, dtype=torch.int64)
    found = torch.zeros(like.shape[1:], dtype=torch.int64)  # code + 1 at each logical position, 0 where unwritten
    scale, digit = 1, 0
    slots = torch.arange(tokens, dtype=torch.int64, device=like.device)
    while scale < count or digit == 0:
        scratch = torch.zeros((1, *like.shape[1:]), dtype=like.dtype, device=like.device)
        values = (codes // scale % base + 1).to(torch.float64).view(tokens, heads, vector_dim)
        writer(values.to(like.dtype).to(like.device), slots, scratch)
        read = scratch[0].to("cpu", torch.float64)
        digits = read.round()
        if not torch.equal(digits, read) or bool((digits < 0).any()) or bool((digits > base).any()):
            raise LayoutError("the attention backend's cache write changed the values it was given (a quantizing "
                              "KV cache?); NenCache can only move KV that the backend stores as given")
        written = digits > 0
        if digit == 0:
            mask = written
        elif not torch.equal(written, mask):
            raise LayoutError("the attention backend's cache write is not a fixed placement")
        found += torch.where(written, (digits.to(torch.int64) - 1) * scale, 0)
        scale *= base
        digit += 1
    positions = mask.nonzero()  # [n, 3] logical (head, row, column), in row-major order
    if positions.shape[0] != count:
        raise LayoutError(f"the attention backend wrote {positions.shape[0]} values for a block's {count}")
    values = found[mask]  # codes, in the same order as `positions`
    order = torch.argsort(values)
    if not torch.equal(values[order], codes):
        raise LayoutError("the attention backend's cache write lost or duplicated values")
    return positions[order].view(tokens, heads, vector_dim, 3)


def _affine_parts(offsets: torch.Tensor) -> tuple[Affine, Affine] | None:
    """The affine form of keys' and values' offsets, or None if either is not affine."""
    tokens, _, heads, dim = offsets.shape
    parts = []
    for part in (0, 1):
        grid = offsets[:, part]  # [tokens, heads, dim]
        base = int(grid[0, 0, 0])
        per_token = int(grid[1, 0, 0] - base) if tokens > 1 else 0
        per_head = int(grid[0, 1, 0] - base) if heads > 1 else 0
        per_dim = int(grid[0, 0, 1] - base) if dim > 1 else 0
        t = torch.arange(tokens).view(-1, 1, 1)
        h = torch.arange(heads).view(1, -1, 1)
        d = torch.arange(dim).view(1, 1, -1)
        if not torch.equal(grid, base + t * per_token + h * per_head + d * per_dim):
            return None
        parts.append(Affine(base, per_token, per_head, per_dim))
    return parts[0], parts[1]
