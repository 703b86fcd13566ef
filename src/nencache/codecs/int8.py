"""`Int8Codec`: 8-bit affine quantization, keys per channel, values per token (about 1.93x vs bf16).

Keys carry outlier channels, so each key channel gets its own grid over the chunk's tokens; values
vary per token, so each token and head gets its own grid over its head_dim values.

The grid parameters are stored as fp16 when fp16 holds every one of them at least as finely as bf16
(codec parameter 1), else as bf16 (codec parameter 0): fp16's three extra mantissa bits keep the grid
from widening to cover a bf16-rounded minimum and step. The measurements behind both choices are in
benchmarks/RESULTS.md ("codecs: lab notes on int8").

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

from nencache.codecs.common import (
    IN_PLACE_BLOCK, CodesWriter, InPlaceSectionCodec, Spec,
    affine_params, bad_param, check_header, layer_blocks, quantize_into, read_sections,
    section_bytes,
)
from nencache.format import HEADER_SIZE, ChunkHeader
from nencache.layout import KVLayout

_LEVELS = 255
_PARAM_DTYPES = {0: torch.bfloat16, 1: torch.float16}  # codec parameter -> dtype of the grid parameters


def _spec(layers: int, tokens: int, heads: int, head_dim: int,
          dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(dtype, (layers, heads, head_dim)), (dtype, (layers, heads, head_dim)),
            (dtype, (layers, tokens, heads)), (dtype, (layers, tokens, heads)),
            (torch.uint8, (layers, 2, tokens, heads, head_dim))]


def _fp16_params(lo: torch.Tensor, hi: torch.Tensor, bf16_step: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 (min, step) covering [lo, hi] in `_LEVELS` steps, rounded exactly in the covering direction
    (min down, step up, one ulp at most), or None if some group does not fit fp16 as well as bf16
    does: a parameter out of range or a step coarser than the bf16 one (subnormal, or a constant group).
    """
    f16 = torch.float16
    low = lo.to(f16)
    low = torch.where(low.float() > lo, low.nextafter(low.new_full((), float("-inf"))), low)
    step = ((hi - low.float()) / _LEVELS).to(f16)
    short = low.float() + _LEVELS * step.float() < hi
    step = torch.where(short, step.nextafter(step.new_full((), float("inf"))), step)
    lowf, stepf = low.float(), step.float()
    fits = (torch.isfinite(lowf) & torch.isfinite(stepf) & (stepf > 0) & (lowf <= lo)
            & (lowf + _LEVELS * stepf >= hi) & (stepf <= bf16_step.float()))
    return (low, step) if bool(fits.all()) else None


@dataclasses.dataclass(slots=True)
class Int8Codec(InPlaceSectionCodec):
    """8-bit codes on fp16 (or bf16) grids: keys per channel over the chunk, values per token and head."""

    name: ClassVar[str] = "int8"
    codec_id: ClassVar[int] = 1
    lossy: ClassVar[bool] = True

    def payload_spec(self, shape: torch.Size) -> Spec:
        layers, _, tokens, heads, head_dim = shape
        return _spec(layers, tokens, heads, head_dim)

    def encode_parts(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int, CodesWriter]:
        """The grid parameters of `chunk`, the header's codec parameter (1: fp16 grid parameters, 0: bf16
        ones, for chunks whose parameters fp16 cannot hold as well) and the writer of its codes."""
        layers, _, tokens, heads, head_dim = chunk.shape
        if tokens == 0:
            zeros = torch.zeros(layers, heads, head_dim, dtype=torch.bfloat16)
            none = torch.empty(layers, 0, heads, dtype=torch.bfloat16)
            return [zeros, zeros, none, none], 0, lambda codes: None
        keys, values = chunk[:, 0], chunk[:, 1]
        key_lo, key_hi = keys.amin(1).float(), keys.amax(1).float()
        val_lo, val_hi = values.amin(-1).float(), values.amax(-1).float()
        key_low, key_step = affine_params(key_lo, key_hi, _LEVELS)  # also refuses non-finite chunks
        val_low, val_step = affine_params(val_lo, val_hi, _LEVELS)
        param = 0
        fp16_keys = _fp16_params(key_lo, key_hi, key_step)
        fp16_vals = _fp16_params(val_lo, val_hi, val_step) if fp16_keys is not None else None
        if fp16_vals is not None:
            (key_low, key_step), (val_low, val_step), param = fp16_keys, fp16_vals, 1

        def write(codes: torch.Tensor) -> None:
            quantize_into(codes[:, 0], keys, key_low[:, None], key_step[:, None], _LEVELS)
            quantize_into(codes[:, 1], values, val_low[..., None], val_step[..., None], _LEVELS)

        return [key_low, key_step, val_low, val_step], param, write

    def payload_sections(self, header: ChunkHeader, payload: memoryview, copy: bool) -> list[torch.Tensor]:
        check_header(header, self.codec_id, self.name)
        param_dtype = _PARAM_DTYPES.get(header.codec_param)
        if param_dtype is None:
            raise bad_param(self.name, header.codec_param)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        return read_sections(payload, _spec(layers, tokens, heads, head_dim, param_dtype), copy)

    def decode_sections_into(self, sections: list[torch.Tensor], out: torch.Tensor) -> None:
        key_low, key_step, val_low, val_step, codes = sections
        layers, _, tokens, heads, head_dim = codes.shape
        klo, kst = key_low.float()[:, None], key_step.float()[:, None]
        vlo, vst = val_low.float()[..., None], val_step.float()[..., None]
        for block in layer_blocks(layers, tokens * heads * head_dim, IN_PLACE_BLOCK):
            # fp32 `low + step * code`, rounded once into the output
            torch.addcmul(klo[block], codes[block, 0], kst[block], out=out[block, 0])
            torch.addcmul(vlo[block], codes[block, 1], vst[block], out=out[block, 1])

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return HEADER_SIZE + section_bytes(_spec(layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim))
