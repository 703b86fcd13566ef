"""`Int4Codec`: KIVI-style 4-bit quantization (about 3.7x vs bf16 with the default groups).

Keys are quantized per channel over groups of `key_group` tokens (outlier channels get their own
grid); values per token over groups of `value_group` channels. Each group has a bf16 (min, step)
grid of 16 levels. KIVI also keeps the newest tokens in full precision; a stored chunk has no
"newest" tokens, and keeping any window full-precision cost more size than it saved error on
SmolLM2-135M (16 of 256 tokens: +23% bytes for -0.1% perplexity), so there is none.

Codec parameter: `key_group | value_group << 16` as written (0 = one group over the whole axis).
Payload (little-endian, in order; G = ceil(tokens / key_group), V = head_dim / value_group)::

    key_low   bf16 [layers, G, kv_heads, head_dim]
    key_step  bf16 [layers, G, kv_heads, head_dim]
    val_low   bf16 [layers, tokens, kv_heads, V]
    val_step  bf16 [layers, tokens, kv_heads, V]
    codes     u8   [layers, 2, tokens, kv_heads, ceil(head_dim / 2)]
              two codes a byte along head_dim, the even channel in the low nibble; x ~= low + step * code
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from nencache.codecs.common import (
    affine_params, bad_param, build_blob, check_chunk, check_header, dequantize, pack_nibbles, quantize_into,
    read_sections, section_bytes, unpack_nibbles,
)
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE, NO_KEY, ChunkHeader, split_blob
from nencache.layout import KVLayout

_LEVELS = 15


@dataclasses.dataclass(frozen=True, slots=True)
class _Groups:
    key: int    # tokens per key group as written (0 = all tokens)
    value: int  # channels per value group as written (0 = the whole head_dim)

    def key_count(self, tokens: int) -> int:
        return -(-tokens // self.key) if self.key else min(tokens, 1)

    def value_count(self, head_dim: int) -> int:
        return head_dim // self.value if self.value else 1

    def spec(self, layers: int, tokens: int, heads: int, head_dim: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        bf, g, v = torch.bfloat16, self.key_count(tokens), self.value_count(head_dim)
        return [(bf, (layers, g, heads, head_dim)), (bf, (layers, g, heads, head_dim)),
                (bf, (layers, tokens, heads, v)), (bf, (layers, tokens, heads, v)),
                (torch.uint8, (layers, 2, tokens, heads, (head_dim + 1) // 2))]


@dataclasses.dataclass(slots=True)
class Int4Codec:
    """4-bit codes: keys per channel in groups of `key_group` tokens (0 = the whole chunk), values per
    token in groups of `value_group` channels (0 = the whole head; used only if it divides head_dim)."""

    key_group: int = 0
    value_group: int = 0
    name: ClassVar[str] = "int4"
    codec_id: ClassVar[int] = 3
    lossy: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for field in ("key_group", "value_group"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise ConfigError(f"Int4Codec.{field} must be an int in 0..65535 (0 = whole axis), got {value!r}")

    def _groups(self, tokens: int, head_dim: int) -> _Groups:
        key = self.key_group if 0 < self.key_group < tokens else 0
        value = self.value_group if 0 < self.value_group < head_dim and head_dim % self.value_group == 0 else 0
        return _Groups(key, value)

    def encode(self, chunk: torch.Tensor, key: bytes = NO_KEY) -> bytes:
        chunk = check_chunk(chunk)
        sections, param = self.encode_sections(chunk)
        return build_blob(chunk, self.codec_id, sections, key, param)

    def encode_sections(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The payload sections of `chunk` and the header's codec parameter (the groups used)."""
        layers, _, tokens, heads, head_dim = chunk.shape
        groups = self._groups(tokens, head_dim)
        param = groups.key | groups.value << 16
        if tokens == 0:
            return [torch.empty(shape, dtype=dt) for dt, shape in groups.spec(layers, 0, heads, head_dim)], param
        g, v = groups.key_count(tokens), groups.value_count(head_dim)
        keys = chunk[:, 0]
        if g * (groups.key or tokens) != tokens:  # a partial last group: repeat the last token into it
            pad = g * groups.key - tokens
            keys = torch.cat([keys, keys[:, -1:].expand(layers, pad, heads, head_dim)], dim=1)
        keys = keys.reshape(layers, g, -1, heads, head_dim)
        key_low, key_step = affine_params(keys.amin(2).float(), keys.amax(2).float(), _LEVELS)
        key_codes = torch.empty(keys.shape, dtype=torch.uint8)
        quantize_into(key_codes, keys, key_low[:, :, None], key_step[:, :, None], _LEVELS)
        values = chunk[:, 1].reshape(layers, tokens, heads, v, -1)
        val_low, val_step = affine_params(values.amin(-1).float(), values.amax(-1).float(), _LEVELS)
        val_codes = torch.empty(values.shape, dtype=torch.uint8)
        quantize_into(val_codes, values, val_low[..., None], val_step[..., None], _LEVELS)
        codes = torch.empty((layers, 2, tokens, heads, (head_dim + 1) // 2), dtype=torch.uint8)
        codes[:, 0] = pack_nibbles(key_codes.reshape(layers, -1, heads, head_dim)[:, :tokens])
        codes[:, 1] = pack_nibbles(val_codes.reshape(layers, tokens, heads, head_dim))
        return [key_low, key_step, val_low, val_step, codes], param

    def decode(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor:
        return self.decode_payload(*split_blob(blob, expected_key))

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        """Decode a checked payload (used by the lossless wrappers after decompressing)."""
        dtype = check_header(header, self.codec_id, self.name)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        groups = _Groups(header.codec_param & 0xFFFF, header.codec_param >> 16)
        if groups.value and (head_dim % groups.value or groups.value >= head_dim) or 0 < tokens <= groups.key:
            raise bad_param(self.name, header.codec_param)
        key_low, key_step, val_low, val_step, codes = read_sections(
            payload, groups.spec(layers, tokens, heads, head_dim))
        out = torch.empty((layers, 2, tokens, heads, head_dim), dtype=dtype)
        if tokens == 0:
            return out
        g, v = groups.key_count(tokens), groups.value_count(head_dim)
        padded = g * (groups.key or tokens)
        klo, kst = key_low.float()[:, :, None], key_step.float()[:, :, None]
        vlo, vst = val_low.float()[..., None], val_step.float()[..., None]
        for layer in range(layers):
            key_codes = unpack_nibbles(codes[layer, 0], head_dim)
            if padded != tokens:
                key_codes = torch.nn.functional.pad(key_codes, (0, 0, 0, 0, 0, padded - tokens))
            keys = dequantize(key_codes.reshape(g, -1, heads, head_dim), klo[layer], kst[layer])
            out[layer, 0] = keys.reshape(padded, heads, head_dim)[:tokens]
            val_codes = unpack_nibbles(codes[layer, 1], head_dim).reshape(tokens, heads, v, -1)
            out[layer, 1] = dequantize(val_codes, vlo[layer], vst[layer]).reshape(tokens, heads, head_dim)
        return out

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        groups = self._groups(num_tokens, layout.head_dim)
        spec = groups.spec(layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
        return HEADER_SIZE + section_bytes(spec)
