"""The `Codec` interface: how a chunk tensor becomes the shared byte format and back."""

from __future__ import annotations

from collections.abc import Callable
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


@runtime_checkable
class EncodesInPlace(Protocol):
    """A codec that writes its blob straight into a buffer the caller reserves, and decodes straight into
    the caller's tensor: no chunk-sized blob, code or decoded temporaries, whose memory the process's
    allocator would otherwise keep resident after each chunk. The memory tier uses it when its codec has it.
    """

    def encode_into(self, chunk: torch.Tensor, reserve: Callable[[int], torch.Tensor], key: bytes = NO_KEY) -> int:
        """Encode `chunk` into the uint8 tensor `reserve(nbytes)` returns (called once, after the chunk
        was checked, so a bad chunk raises before anything is reserved); return the blob's size."""
        ...

    def decode_into(self, blob: bytes | bytearray | memoryview, out: torch.Tensor,
                    expected_key: bytes | None = None, verify: bool = True) -> None:
        """Decode `blob` into the CPU tensor `out` (its shape and dtype, any strides); `CorruptChunkError` for
        damaged bytes, `LayoutError` if `out` does not match the chunk. A writable `blob` is read in place.
        `verify=False` skips the payload's checksum, for bytes a tier already checked (the header, length
        and key are checked still)."""
        ...


@runtime_checkable
class WarmsUp(Protocol):
    """A codec with work to do once per process before its first chunk (compiling its loops): the store does
    it in the background at start-up, so that no request waits for it."""

    def warm_up(self, dtype: torch.dtype) -> None:
        """Prepare for chunks of `dtype` (only that one: each element type is compiled code of its own)."""
        ...
