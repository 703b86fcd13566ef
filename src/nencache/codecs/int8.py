"""`Int8Codec`: 8-bit affine quantization, keys per channel, values per token (about 1.93x vs bf16).

Keys carry outlier channels, so each key channel gets its own grid over the chunk's tokens; values
vary per token, so each token and head gets its own grid over its head_dim values.

The grid parameters are stored as fp16 when fp16 holds every one of them at least as finely as bf16
(codec parameter 1), else as bf16 (codec parameter 0): fp16's three extra mantissa bits keep the grid
from widening to cover a bf16-rounded minimum and step. The measurements behind both choices are in
benchmarks/RESULTS.md ("codecs: lab notes on int8"). The loops over the chunk are `nencache.codecs.kernels`.

Payload (little-endian, in order; P = fp16 if the codec parameter is 1, bf16 if it is 0)::

    key_low   P    [layers, kv_heads, head_dim]       grid minimum per key channel
    key_step  P    [layers, kv_heads, head_dim]       grid step per key channel
    val_low   P    [layers, tokens, kv_heads]         grid minimum per value token and head
    val_step  P    [layers, tokens, kv_heads]         grid step per value token and head
    codes     u8   [layers, 2, tokens, kv_heads, head_dim]   x ~= low + step * code
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from nencache.codecs import kernels
from nencache.codecs.common import (
    CodesWriter, InPlaceSectionCodec, Spec, bad_param, check_header, read_sections, section_bytes,
)
from nencache.errors import LayoutError
from nencache.format import HEADER_SIZE, ChunkHeader
from nencache.layout import KVLayout

_LEVELS = 255
_PARAM_DTYPES = {0: torch.bfloat16, 1: torch.float16}  # codec parameter -> dtype of the grid parameters


def _spec(layers: int, tokens: int, heads: int, head_dim: int,
          dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(dtype, (layers, heads, head_dim)), (dtype, (layers, heads, head_dim)),
            (dtype, (layers, tokens, heads)), (dtype, (layers, tokens, heads)),
            (torch.uint8, (layers, 2, tokens, heads, head_dim))]


@dataclasses.dataclass(slots=True)
class Int8Codec(InPlaceSectionCodec):
    """8-bit codes on fp16 (or bf16) grids: keys per channel over the chunk, values per token and head."""

    name: ClassVar[str] = "int8"
    codec_id: ClassVar[int] = 1
    lossy: ClassVar[bool] = True

    def payload_spec(self, shape: torch.Size, dtype: torch.dtype) -> Spec:
        layers, _, tokens, heads, head_dim = shape
        return _spec(layers, tokens, heads, head_dim)

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile (or load from numba's cache) the loops for chunks of `dtype`."""
        chunk = torch.linspace(-1, 1, 16, dtype=dtype).view(1, 2, 2, 2, 2)
        self.decode_into(self.encode(chunk), torch.empty_like(chunk))

    def encode_parts(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int, CodesWriter]:
        """The grid parameters of `chunk`, the header's codec parameter (1: fp16 grid parameters, 0: bf16
        ones, for chunks whose parameters fp16 cannot hold as well) and the writer of its codes."""
        layers, _, tokens, heads, head_dim = chunk.shape
        if tokens == 0:
            zeros = torch.zeros(layers, heads, head_dim, dtype=torch.bfloat16)
            none = torch.empty(layers, 0, heads, dtype=torch.bfloat16)
            return [zeros, zeros, none, none], 0, lambda codes: None
        source = kernels.readable(chunk)
        lo_hi = kernels.ranges(source)  # the key channels' ranges, then the value tokens'
        if lo_hi is None:
            raise LayoutError("chunk contains NaN or inf values; lossy codecs need finite KV (use raw for these)")
        (low, step), fp16 = kernels.grid_params(*lo_hi, _LEVELS)  # fp16 only if every group fits
        param = 0
        if fp16 is not None:
            (low, step), param = fp16, 1
        inv = step.float().reciprocal()
        bias = -low.float() * inv
        split = layers * heads * head_dim
        key_low, val_low = low[:split].view(layers, heads, head_dim), low[split:].view(layers, tokens, heads)
        key_step, val_step = step[:split].view(layers, heads, head_dim), step[split:].view(layers, tokens, heads)

        def write(codes: torch.Tensor) -> None:
            kernels.quantize(source, bias[:split], inv[:split], bias[split:], inv[split:], _LEVELS, codes)

        return [key_low, key_step, val_low, val_step], param, write

    def payload_sections(self, header: ChunkHeader, payload: memoryview, copy: bool) -> list[torch.Tensor]:
        check_header(header, self.codec_id, self.name)
        param_dtype = _PARAM_DTYPES.get(header.codec_param)
        if param_dtype is None:
            raise bad_param(self.name, header.codec_param)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        return read_sections(payload, _spec(layers, tokens, heads, head_dim, param_dtype), copy)

    def decode_sections_into(self, header: ChunkHeader, sections: list[torch.Tensor], out: torch.Tensor) -> None:
        key_low, key_step, val_low, val_step, codes = sections
        kernels.decode_to(out, lambda target: kernels.dequantize(codes, key_low, key_step, val_low, val_step, target))

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return HEADER_SIZE + section_bytes(_spec(layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim))
