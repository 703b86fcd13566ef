"""The `Codec` interface: how a chunk tensor becomes the shared byte format and back."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from nencache.format import NO_KEY
from nencache.layout import KVLayout


@runtime_checkable
class Codec(Protocol):
    """Turns a chunk `[layers, 2, tokens, kv_heads, head_dim]` into bytes (header included) and back.

    `decode` raises `CorruptChunkError` for truncated, damaged or foreign bytes; it never returns a
    wrong tensor.
    """

    name: str
    codec_id: int
    lossy: bool
    zero_copy: bool
    """The payload is the tensor's own bytes, unchanged: the memory tier keeps such a chunk as a plain tensor
    in its page and the write-behind sends the page itself out (header stamped in front), with no encode."""

    def encode(self, chunk: torch.Tensor, key: bytes = NO_KEY) -> bytes: ...

    def decode(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor: ...

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        """Upper bound of `len(encode(chunk))` for a chunk of this layout and token count."""
        ...
